"""Does leanvit's W8A8 PTQ work on any timm ViT or hybrid? One row per architecture family, on both engines.

    python benchmarks/ptq_families.py [--models deit_tiny_patch16_224 xcit_nano_12_p16_224 ...] [--out DIR] [--update]
                                      [--latency]

For each model (random weights, 16 random calibration images at its own input size): ``quantize`` with the
OpenVINO recipe and with the ONNX Runtime recipe (``QuantConfig.recipe("mse", target="vnni", engine=...)``),
``export`` to that engine, run 4 other random images there and in the simulation, and record

- how many layers are quantized, and which compute layers stay float and why (``QuantReport``);
- which compute layers the engine runs in float (``openvino_precisions`` / ``onnxruntime_precisions``);
- engine vs simulation: max |logit difference| / max |simulated logit|, next to simulation vs float (the
  quantization error itself). An engine that differs from the simulation by more than twice as much as the
  simulation differs from float (random weights make both noisy) is not computing what was simulated: such rows
  are flagged.

``--latency`` also times, on each engine (batch 1, 2 threads, alternating rounds so that drift hits all alike), the
float model, leanvit's INT8 model and NNCF's (``nncf.quantize`` on the same FP32 ONNX file and calibration images,
``ModelType.TRANSFORMER`` where the model has attention, as in ``ptq.py``): whether INT8 is faster than float on this
CPU, family by family, and how leanvit's compares with the anchor's. Run nothing else meanwhile.

It checks the plumbing, not accuracy: random weights say nothing about top-1 (``ptq.py`` measures that on
trained checkpoints). A model that fails is a row with its error, not a crash. Writes ``ptq_families.json/.md``;
``--update`` re-measures the given models and replaces only their rows in the existing report (each row records
the leanvit commit it was measured at).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from leanvit.bench import host_info
from leanvit.bench.report import host_lines
from leanvit.bench.timing import TimingBudget, time_alternating
from leanvit.compress import quant
from leanvit.deploy import export_onnx, get_engine
from leanvit.models.registry import create_model
from manifest import save_report
from ptq import nncf_kwargs, nncf_onnx_runner, nncf_openvino

FAMILIES = (
    # plain and modified ViTs
    "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_patch16_rope_224", "eva02_tiny_patch14_224",
    "cait_xxs24_224", "xcit_nano_12_p16_224", "convit_tiny", "crossvit_tiny_240", "vit_tiny_r_s16_p8_224",
    # hierarchical and hybrid
    "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "pvt_v2_b0", "levit_128s", "tiny_vit_5m_224", "coatnet_nano_rw_224",
    "maxvit_nano_rw_256", "efficientformer_l1", "efficientformerv2_s0", "efficientvit_b0", "efficientvit_m0",
    "fastvit_t8", "mobilevit_xxs", "mobilevitv2_050", "edgenext_xx_small", "mobilevig_ti", "efficientmod_xxs",
    # convolutional and MetaFormer references
    "repvit_m0_9", "convnext_atto", "mambaout_femto", "poolformerv2_s12", "mobilenetv3_small_100",
)
ENGINES = ("openvino", "onnxruntime")
#: an engine off the simulation by more than this many times the quantization error is flagged (XCiT's quantized
#: positional encoding on OpenVINO, before leanvit kept it float: 16x)
SUSPECT = 2.0


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def engine_float_layers(engine: str, path: Path, runner) -> list[str]:
    modules = quant.source_modules(path.with_suffix(".onnx"))
    if engine == "openvino":
        precisions = quant.openvino_precisions(runner.compiled, modules)
        return [n for n, (_, p) in precisions.items() if p not in ("i8", "u8")]
    return [n for n, (_, p) in quant.onnxruntime_precisions(path, modules).items() if p != "int8"]


def latency(model: torch.nn.Module, calib: torch.Tensor, runner, engine, engine_name: str, out: Path) -> dict:
    """Median ms of the float model, leanvit's INT8 ``runner`` and NNCF's INT8 model on ``engine``, timed
    side by side; NNCF's failure is recorded, not fatal."""
    x = calib[:1]
    fp_onnx = export_onnx(model, x, out / "fp32.onnx")
    runners, row = {"fp32": engine.load_model_file(fp_onnx), "leanvit": runner}, {}
    calib_set = torch.utils.data.TensorDataset(calib)  # nncf_* read batch[0] of each batch-1 item
    x_np = x.numpy()
    try:
        if engine_name == "openvino":
            nncf = engine.load_model_file(nncf_openvino(fp_onnx, calib_set, out / "nncf_int8.xml", nncf_kwargs(model)))
        else:
            nncf = nncf_onnx_runner(fp_onnx, calib_set, out / "nncf_int8.onnx", engine, nncf_kwargs(model))
            if isinstance(nncf, str):
                raise RuntimeError(nncf)
        nncf(x_np)  # an anchor the engine cannot run fails here, not in the timing
        runners["nncf"] = nncf
    except Exception as error:  # the anchor failing on a family is a finding, not a crash
        row["nncf_error"] = f"{type(error).__name__}: {error}"[:1000]
    timings = time_alternating({kind: (lambda r=r: r(x_np)) for kind, r in runners.items()},
                               TimingBudget(budget_s=4.0), rounds=8)
    return {**row, **{f"{kind}_ms": round(t.median, 3) for kind, t in timings.items()}}


@torch.no_grad()
def measure(name: str, engine_name: str, out: Path, timed: bool = False) -> dict:
    torch.manual_seed(0)
    model = create_model(name)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear) and not head.weight.any():  # timm zero-initialises some heads (MLP-Mixer,
        torch.nn.init.trunc_normal_(head.weight, std=0.02)           # Hiera): all-zero logits would compare nothing
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    calib, images = torch.randn(16, *size), torch.randn(4, *size)
    config = quant.QuantConfig.recipe("mse", "w8a8", target="vnni", engine=engine_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every float layer is recorded below
        qmodel = quant.quantize(model, calib, config, progress=False)
        path = quant.export(qmodel, out / name / f"{engine_name}.xml", engine=engine_name, example=images[:1])
    engine = get_engine(engine_name, threads=2)
    runner = engine.load_model_file(path)
    on_engine = np.concatenate([runner(images[i:i + 1].numpy()) for i in range(len(images))])
    simulated, fp32 = qmodel(images).numpy(), model(images).numpy()
    report = qmodel.quant_report
    reasons = Counter(reason.split(":")[0].split(" (")[0] for reason in report.float_compute_layers.values())
    row = {"quantized": len(report.quantized), "float_compute": len(report.float_compute_layers),
           "float_reasons": dict(reasons), "engine_float": engine_float_layers(engine_name, path, runner),
           "engine_vs_sim": relative_error(on_engine, simulated), "sim_vs_fp32": relative_error(simulated, fp32)}
    if timed:
        row["latency"] = latency(model, calib, runner, engine, engine_name, out / name / engine_name)
    return row


def earlier_rows(out: Path) -> list[dict]:
    """The rows of the report in ``out`` that ``--update`` keeps, read before anything is measured (a report that
    cannot be read fails then, not after the run); none where there is no report yet."""
    path = out / "ptq_families.json"
    if not path.is_file():
        print(f"{path} does not exist yet: --update writes the measured rows alone.", file=sys.stderr)
        return []
    try:
        return json.loads(path.read_text())["rows"]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} is not a ptq_families report ({type(e).__name__}: {e}); move it away "
                         "or drop --update.") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ptq-families")
    parser.add_argument("--update", action="store_true",
                        help="replace the given models' rows in the existing report, keep the others")
    parser.add_argument("--latency", action="store_true",
                        help="also time FP32, leanvit INT8 and NNCF INT8 on each engine (batch 1, 2 threads)")
    args = parser.parse_args(argv)
    old = earlier_rows(args.out) if args.update else []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or None
    rows = []
    for name in args.models:
        for engine_name in ENGINES:
            start = time.perf_counter()
            try:
                row = {"model": name, "engine": engine_name, **measure(name, engine_name, args.out, args.latency)}
            except Exception as error:  # a row, not a crash: the table says which families fail and how
                row = {"model": name, "engine": engine_name, "error": f"{type(error).__name__}: {error}"[:300]}
                traceback.print_exc()
            row["seconds"] = round(time.perf_counter() - start, 1)
            row["commit"] = commit
            rows.append(row)
            print({k: v for k, v in row.items() if k != "engine_float"}, flush=True)

    failed = all("error" in r for r in rows)  # nothing measured: the run failed, whatever the report keeps
    host = host_info()
    if args.update:
        new = {(r["model"], r["engine"]): r for r in rows}
        rows = [new.pop((r["model"], r["engine"]), r) for r in old] + list(new.values())
    save_report(args.out, "ptq_families", {"host": host, "rows": rows}, markdown(rows, host))
    print(markdown(rows, host))
    if failed:
        print("error: every model failed on every engine (the rows say why).", file=sys.stderr)
    return 1 if failed else 0


def _shorten(text: str, width: int = 110) -> str:
    """``text``'s start and end (an engine's error names the failing node first and the reason last)."""
    return text if len(text) <= width else f"{text[:40]} … {text[-(width - 43):]}"


def markdown(rows: list[dict], host: dict) -> str:
    lines = ["# leanvit W8A8 on timm families (random weights; OpenVINO and ONNX Runtime recipes, target vnni)", "",
             *host_lines(host), "",
             "Engine vs sim: max |engine logit - simulated logit| / max |simulated logit| on 4 random images; sim vs "
             "FP32 the same for the simulation against the float model. ⚠: the engine differs from the simulation "
             f"by more than {SUSPECT}× the simulation's own error (random weights make both noisy: on a plain DeiT the "
             "two are alike). Float in sim counts layers (an attention module once, however many matrix products it "
             "computes); float on engine counts the engine's compute nodes (each matmul, or OpenVINO's fused "
             "attention Subgraph), named in ptq_families.json.", "",
             "| model | engine | quantized | float in sim (why) | float on engine | engine vs sim | sim vs FP32 |",
             "|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['engine']} | **failed**: {r['error']} | | | | |")
            continue
        why = ", ".join(f"{n} {reason}" for reason, n in r["float_reasons"].items()) or "–"
        flag = " ⚠" if r["engine_vs_sim"] > SUSPECT * r["sim_vs_fp32"] else ""
        lines.append(f"| {r['model']} | {r['engine']} | {r['quantized']} | {r['float_compute']}: {why} | "
                     f"{len(r['engine_float'])} | {r['engine_vs_sim']:.4f}{flag} | {r['sim_vs_fp32']:.4f} |")
    timed = [r for r in rows if "latency" in r]
    if timed:
        lines += ["", "Latency (`--latency`): median ms at batch 1, 2 threads, the float model, leanvit's INT8 model and "
                  "NNCF's timed in alternating rounds on the engine (random weights; NNCF on the same FP32 ONNX file "
                  "and calibration images). ↓: leanvit's INT8 model slower than float.", "",
                  "| model | engine | FP32 ms | leanvit INT8 ms | FP32 / leanvit | NNCF INT8 ms | leanvit / NNCF |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in timed:
            t = r["latency"]
            speedup = t["fp32_ms"] / t["leanvit_ms"]
            nncf = (f"{t['nncf_ms']:.2f} | {t['leanvit_ms'] / t['nncf_ms']:.2f}" if "nncf_ms" in t
                    else f"failed: {_shorten(t.get('nncf_error', '?'))} | –")
            lines.append(f"| {r['model']} | {r['engine']} | {t['fp32_ms']:.2f} | {t['leanvit_ms']:.2f} | "
                         f"{speedup:.2f}{' ↓' if speedup < 1 else ''} | {nncf} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
