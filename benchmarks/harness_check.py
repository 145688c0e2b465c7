"""Does ``leanvit bench`` add bias? Compare it with independent timers, back to back.

1. OpenVINO f32: ``leanvit bench``'s median for a model against OpenVINO's own ``benchmark_app``
   on the very same IR file, with the same settings (CPU, latency hint, N threads, f32, sync API).
2. Eager: ``leanvit bench``'s eager median against a bare ``time.perf_counter`` loop.

leanvit's side is exactly what ``leanvit bench`` times: the engine's runner (``engine.load``) under
``leanvit.bench.time_calls``. The two timers of each pair alternate in short rounds, so that the
drift of a shared machine hits both alike; the ratio of the medians of their per-round medians
must stay within ``--tolerance``.

    python benchmarks/harness_check.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import leanvit
from leanvit.bench import TimingBudget, host_info, time_calls
from leanvit.deploy import get_engine
from manifest import save_report


def leanvit_median(runner, x: torch.Tensor, seconds: float) -> float:
    x_np = x.numpy()
    return time_calls(lambda: runner(x_np), TimingBudget(warmup_s=1.0, budget_s=seconds, max_iters=100_000)).median


def benchmark_app_median(xml: Path, threads: int, seconds: float) -> tuple[float, list[str]]:
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    cmd = [exe, "-m", str(xml), "-d", "CPU", "-hint", "none", "-nstreams", "1", "-nthreads", str(threads),
           "-infer_precision", "f32", "-api", "sync", "-t", str(int(seconds))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    match = re.search(r"Latency:.*?Median:\s+([\d.]+) ms", out, re.S)
    if not match:
        raise SystemExit(f"could not read the median from benchmark_app:\n{out[-2000:]}")
    return float(match.group(1)), cmd


@torch.inference_mode()
def bare_loop_median(model: torch.nn.Module, x: torch.Tensor, seconds: float) -> float:
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        model(x)
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        model(x)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientformer_l1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = leanvit.create_model(args.model)
    x = torch.randn(1, 3, 224, 224)
    ov_engine = get_engine("openvino", threads=args.threads, precision="f32")
    ov_runner = ov_engine.load(model, x)
    xml = Path(ov_runner.info["model_file"])
    assert ov_runner.precision == "f32", ov_runner.precision
    eager_runner = get_engine("eager", threads=args.threads).load(model, x)

    pairs = {"openvino_f32": {"leanvit": [], "reference": []}, "eager_f32": {"leanvit": [], "reference": []}}
    ref_cmd = None
    for r in range(args.rounds):
        pairs["openvino_f32"]["leanvit"].append(leanvit_median(ov_runner, x, args.seconds))
        median, ref_cmd = benchmark_app_median(xml, args.threads, args.seconds)
        pairs["openvino_f32"]["reference"].append(median)
        pairs["eager_f32"]["leanvit"].append(leanvit_median(eager_runner, x, args.seconds))
        pairs["eager_f32"]["reference"].append(bare_loop_median(model, x, args.seconds))
        print(f"round {r + 1}: " + ", ".join(f"{k} leanvit {v['leanvit'][-1]:.2f} ms / reference {v['reference'][-1]:.2f} ms"
                                              for k, v in pairs.items()), file=sys.stderr)

    results = {}
    for key, v in pairs.items():
        a, b = statistics.median(v["leanvit"]), statistics.median(v["reference"])
        results[key] = {**v, "leanvit_median_ms": a, "reference_median_ms": b, "ratio": a / b,
                        "within_tolerance": abs(a / b - 1) <= args.tolerance}
    doc = {"model": args.model, "threads": args.threads, "batch": 1, "seconds_per_measurement": args.seconds,
           "rounds": args.rounds, "tolerance": args.tolerance, "benchmark_app_command": " ".join(ref_cmd),
           "host": host_info(), "results": results}
    lines = [
        "# Harness bias check", "",
        f"`python benchmarks/harness_check.py` — {args.model}, batch 1, {args.threads} threads, "
        f"{args.seconds:g} s per measurement, {args.rounds} alternating rounds, host {doc['host']['cpu']}, "
        f"OpenVINO {doc['host']['versions'].get('openvino')}, torch {doc['host']['versions'].get('torch')}.", "",
        "| pair | leanvit bench median ms | reference median ms | ratio | within ±"
        f"{args.tolerance:.0%} |", "|---|---:|---:|---:|---|",
    ]
    names = {"openvino_f32": "OpenVINO f32 vs benchmark_app", "eager_f32": "eager f32 vs bare perf_counter loop"}
    for key, r in results.items():
        lines.append(f"| {names[key]} | {r['leanvit_median_ms']:.2f} | {r['reference_median_ms']:.2f} | "
                     f"{r['ratio']:.3f} | {'yes' if r['within_tolerance'] else '**no**'} |")
    lines += ["", f"benchmark_app command: `{doc['benchmark_app_command']}`", ""]
    save_report(Path(args.out), "harness_check", doc, "\n".join(lines))
    print("\n".join(lines))
    return 0 if all(r["within_tolerance"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
