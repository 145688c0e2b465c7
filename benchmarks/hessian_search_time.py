"""How long ``hessian_search`` takes, and where: its layer part against its attention-matmul (product) part, the
current source against the one of an earlier commit, timed alternately on the same calibrated model.

    python benchmarks/hessian_search_time.py deit_tiny_patch16_224 --baseline ccf11d6 --repeats 3

The model (random init, seed 0) is calibrated once at ``--bits`` with the attention matmuls quantized; the
quantized model and the calibration batches ``hessian_search`` would receive are captured and each variant
searches a copy of them. Also reports which quantizer values the two variants chose differently (a timing change
should change none). Writes ``OUT/results.json`` and ``OUT/report.md``.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import timm
import torch

import leanvit  # noqa: F401  (registers the zoo)
import leanvit.compress.quant.hessian as current_hessian
from leanvit.bench import host_info
from leanvit.compress.quant import QuantConfig, quantize

PARTS = ("_collect", "_collect_products", "_search_layer", "_search_product")
REPO = Path(__file__).resolve().parents[1]


def baseline_module(rev: str):
    """``leanvit.compress.quant.hessian`` as it was at ``rev``, imported beside the current one."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:src/leanvit/compress/quant/hessian.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "hessian_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("leanvit.compress.quant._hessian_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def captured_search_inputs(model_name: str, images: int, size: int, bits: str) -> dict:
    """The quantized model, batches and fixed inputs that ``quantize`` hands to ``hessian_search``."""
    captured = {}

    def capture(qmodel, batches, *, fixed_inputs=frozenset(), progress=True):
        captured.update(qmodel=copy.deepcopy(qmodel), batches=batches, fixed=set(fixed_inputs))
        return []

    torch.manual_seed(0)
    model = timm.create_model(model_name).eval()
    config = QuantConfig.from_bits(bits, attn_bits=int(bits.split("a")[1]), hessian_search=True)
    search, current_hessian.hessian_search = current_hessian.hessian_search, capture
    try:
        quantize(model, torch.randn(images, 3, size, size), config, progress=False)
    finally:
        current_hessian.hessian_search = search
    return captured


def timed_search(module, captured: dict) -> tuple[dict, dict]:
    """Seconds in each part of ``module.hessian_search`` and in all of it, and the quantizer values it chose."""
    spent = dict.fromkeys(PARTS, 0.0)
    originals = {name: getattr(module, name) for name in PARTS}

    def timing(name):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started
        return call

    qmodel = copy.deepcopy(captured["qmodel"])
    for name in PARTS:
        setattr(module, name, timing(name))
    started = time.perf_counter()
    try:
        module.hessian_search(qmodel, captured["batches"], fixed_inputs=captured["fixed"], progress=False)
    finally:
        for name, function in originals.items():
            setattr(module, name, function)
    spent["total"] = time.perf_counter() - started
    return spent, {n: t.clone() for n, t in qmodel.state_dict().items() if "quantizer" in n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="deit_tiny_patch16_224")
    p.add_argument("--baseline", required=True, help="the commit whose hessian.py is timed against the current one")
    p.add_argument("--images", type=int, default=32, help="calibration images (hessian_search's default draw)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="hessian-search-time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    variants = {args.baseline: baseline_module(args.baseline), "current": current_hessian}
    captured = captured_search_inputs(args.model, args.images, args.size, args.bits)
    times, chosen = {v: [] for v in variants}, {}
    for repeat in range(args.repeats):
        for name, module in variants.items():  # alternating, so that the machine's drift hits both alike
            spent, chosen[name] = timed_search(module, captured)
            times[name].append(spent)
            print(f"[{repeat}] {name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items()), flush=True)
    medians = {name: {k: round(statistics.median(t[k] for t in ts), 2) for k in ts[0]} for name, ts in times.items()}
    baseline, current = chosen.values()
    differing = [n for n in current if not torch.equal(current[n], baseline[n])]
    result = {"host": host_info(), "threads": args.threads, "model": args.model, "images": args.images,
              "size": args.size, "bits": args.bits, "repeats": args.repeats, "medians_s": medians, "runs_s": times,
              "quantizer_values": len(current), "differing": {n: [baseline[n].flatten().tolist()[:4],
                                                                  current[n].flatten().tolist()[:4]]
                                                              for n in differing}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    host = result["host"]
    lines = [f"# hessian_search time: {args.model}, {args.images} images at {args.size}, {args.bits}", "",
             f"`python benchmarks/hessian_search_time.py {args.model} --baseline {args.baseline} --images "
             f"{args.images} --repeats {args.repeats}`; host: {json.dumps(host)}; {args.threads} threads; medians of "
             f"{args.repeats} alternating runs (s).", "",
             "| variant | " + " | ".join((*PARTS, "total")) + " |", "|---|" + "---:|" * (len(PARTS) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in (*PARTS, "total")) + " |" for name, m in medians.items()]
    lines += ["", f"Quantizer values chosen differently: {len(differing)} of {len(current)}"
              + (f" ({', '.join(differing)})" if differing else "") + "."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
