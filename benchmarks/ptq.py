"""FP32 vs leanvit INT8 vs NNCF INT8 on the same models and calibration images: accuracy, OpenVINO / ORT latency.

    python benchmarks/ptq.py --manifest benchmarks/checkpoints.json --data DIR --calib DIR \\
        [--calib-images 256] [--eval-images N] [--bits w8a8] [--threads 2] [--out benchmarks/results/ptq]
    python benchmarks/ptq.py --models deit_tiny_patch16_224 --data cifar10-test500 --calib cifar10-test500 \\
        --model-kwargs '{"num_classes": 10}' --eval-images 64      # smoke run, random weights

For every model, one FP32 ONNX export (batch 1, static) feeds OpenVINO FP32, ONNX Runtime FP32 and NNCF
(``nncf.quantize`` on the OpenVINO model read from it, and on the ONNX model itself for ONNX Runtime;
``ModelType.TRANSFORMER`` for models with attention, as NNCF recommends; the same calibration images). leanvit's
INT8 model is the QDQ export of its own simulation: for ONNX Runtime the same recipe with quantized convolution
outputs (``QuantConfig.recipe(engine="onnxruntime")``), without which its QDQ convolutions run in float.
Accuracy is top-1 of each engine running its file at batch 1, plus the simulation's top-1 and its top-1
agreement with each engine, and McNemar's paired test of leanvit's INT8 against NNCF's on OpenVINO; latency is
batch 1 with ``--threads`` threads, the six files timed in alternating rounds
(``leanvit.bench.time_alternating``) so that the machine's drift hits them alike; ``--profile`` adds each
engine's own per-op timings. Which compute nodes each engine runs in INT8 is read from the engine (OpenVINO's runtime
precisions, the graph ONNX Runtime executes after its fusions; those left in float are listed by layer). Writes
``ptq.json``, ``ptq.md`` and ``ptq.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from leanvit.bench import host_info
from leanvit.bench.report import host_lines
from leanvit.bench.timing import TimingBudget, round_ratios, time_alternating
from leanvit.checkpoint import model_from_checkpoint
from leanvit.compress import quant
from leanvit.data import (
    DecodedDataset, build_transform, calibration_subset, make_loader, open_dataset, resolve_data_config,
)
from leanvit.deploy import export_onnx, get_engine
from leanvit.deploy.ov import openvino_core
from leanvit.errors import LeanvitError
from leanvit.evaluate import compare_paired
from leanvit.models.registry import create_model, resolve_model_name
from manifest import read_manifest, save_report

HERE = Path(__file__).resolve().parent


def load(entry: dict, model_kwargs: dict):
    if entry.get("path"):
        model, meta = model_from_checkpoint(entry["model"], entry["path"], **model_kwargs)
    else:
        torch.manual_seed(0)  # random weights: the same model in every run, so that runs compare
        model, meta = create_model(entry["model"], **model_kwargs), {}
    img_size = model_kwargs.get("img_size") if isinstance(model_kwargs.get("img_size"), int) else None
    return model.eval(), resolve_data_config(model, img_size=img_size, saved=meta.get("data_config"))


def predictions(predict, loader) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    for images, targets in loader:
        preds.append(np.asarray(predict(images)).argmax(-1))
        labels.append(targets.numpy())
    return np.concatenate(preds), np.concatenate(labels)


def percent_equal(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 (predictions against labels) or agreement (two models' predictions), in percent."""
    return round(100.0 * float((a == b).mean()), 2)


def op_profile(engine, path: Path, x: np.ndarray, runs: int = 50) -> dict[str, float]:
    """OpenVINO's own per-node timings summed by node type and the precision it ran in (ms per
    inference, median-free mean over ``runs``): where an INT8 model's time goes, and which ops it
    left in f32."""
    compiled = openvino_core().compile_model(str(path), "CPU", {**engine.compile_config(), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    for _ in range(10):
        request.infer([x])
    totals: dict[str, float] = {}
    for _ in range(runs):
        request.infer([x])
        for node in request.profiling_info:
            if node.status == node.Status.EXECUTED:
                key = f"{node.node_type} ({node.exec_type.rsplit('_', 1)[-1].lower()})"
                totals[key] = totals.get(key, 0.0) + node.real_time.total_seconds() * 1e3 / runs
    return _largest_first(totals)


def _largest_first(totals: dict[str, float]) -> dict[str, float]:
    """Per-op milliseconds, largest first, rounded, without the ones under 0.01 ms."""
    return {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v >= 0.01}


def ort_op_profile(ort, path: Path, x: np.ndarray, runs: int = 50, warmup: int = 10) -> dict[str, float]:
    """ONNX Runtime's own per-kernel timings summed by op type and input element type (ms per inference, mean
    over ``runs`` after ``warmup``): which ops an INT8 model runs in float, what its quantize / dequantize cost."""
    runner = ort.load_onnx(path, profile=True)
    for _ in range(warmup + runs):
        runner(x)
    trace = Path(runner.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= starts[warmup]:
            inputs = event["args"].get("input_type_shape") or [{"-": None}]
            key = f"{event['args']['op_name']} ({next(iter(inputs[0]))})"
            totals[key] = totals.get(key, 0.0) + event["dur"] / 1e3 / runs
    return _largest_first(totals)


def has_attention(model: torch.nn.Module) -> bool:
    return any("attn" in name.split(".")[-1].lower() or "attention" in type(m).__name__.lower()
               for name, m in model.named_modules())


def bench_model(entry: dict, args) -> dict:
    model, data_config = load(entry, args.model_kwargs)
    transform = build_transform(data_config)
    calib = open_dataset(args.calib, train=True, transform=transform)
    calib = DecodedDataset(calibration_subset(calib, args.calib_images))  # read by leanvit and by NNCF
    evalset = open_dataset(args.data, transform=transform)
    if args.eval_images and args.eval_images < len(evalset):
        evalset = calibration_subset(evalset, args.eval_images, seed=1)
    evalset = DecodedDataset(evalset)  # scored by FP32, the simulation, and each engine model
    eval_one = make_loader(evalset, 1)
    out = args.out / entry.get("name", entry["model"])  # per checkpoint: one model may have several
    out.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, *data_config["input_size"])
    budget = TimingBudget(budget_s=args.budget_s)
    engine = get_engine("openvino", threads=args.threads, precision="f32")
    row = {"model": entry["model"], "checkpoint": entry.get("name"), "calib_images": len(calib),
           "eval_images": len(evalset), "bits": args.bits, "recipe": args.recipe,
           "quant_kwargs": args.quant_kwargs}

    # FP32: eager accuracy, OpenVINO f32 latency, from the ONNX file NNCF also starts from
    fp_onnx = export_onnx(model, x, out / "fp32.onnx")
    fp32 = engine.load_model_file(fp_onnx)
    with torch.inference_mode():
        preds, labels = predictions(lambda b: model(b).numpy(), make_loader(evalset, args.batch_size))
    row["fp32_top1"] = percent_equal(preds, labels)

    # leanvit: simulation, then the exported INT8 IR on OpenVINO
    row["target"] = args.target
    config = quant.QuantConfig.recipe(args.recipe, args.bits, target=args.target, **args.quant_kwargs)
    qmodel = quant.quantize(model, make_loader(calib, args.batch_size), config, progress=False)
    with torch.inference_mode():
        sim_preds, _ = predictions(lambda b: qmodel(b).numpy(), make_loader(evalset, args.batch_size))
    row["leanvit_sim_top1"] = percent_equal(sim_preds, labels)
    row["leanvit_float_layers"] = dict(qmodel.quant_report.float_layers)  # layer -> why it stays float
    xml = quant.export(qmodel, out / "leanvit_int8.xml", engine="openvino", example=x, dynamic_batch=False)
    lean = engine.load_model_file(xml)
    lean_preds, _ = predictions(lambda b: lean(b.numpy()), eval_one)
    row["leanvit_top1"] = percent_equal(lean_preds, labels)
    row["sim_engine_agreement"] = percent_equal(lean_preds, sim_preds)
    row["leanvit_int8_layers"] = sum(p in ("i8", "u8") for _, p in quant.openvino_precisions(lean.compiled).values())

    # ONNX Runtime: leanvit's model for it (the same recipe with quantized conv outputs, which its QLinearConv
    # needs: QuantConfig.recipe(engine="onnxruntime")), simulated, exported as QDQ ONNX and run
    ort = get_engine("onnxruntime", threads=args.threads, precision="f32")
    fp32_ort = ort.load_onnx(fp_onnx)
    ort_config = quant.QuantConfig.recipe(args.recipe, args.bits, target=args.target, engine="onnxruntime",
                                          **args.quant_kwargs)
    ort_qmodel, ort_sim_preds = qmodel, sim_preds
    if ort_config != config:
        ort_qmodel = quant.quantize(model, make_loader(calib, args.batch_size), ort_config, progress=False)
        with torch.inference_mode():
            ort_sim_preds, _ = predictions(lambda b: ort_qmodel(b).numpy(), make_loader(evalset, args.batch_size))
    row["leanvit_ort_sim_top1"] = percent_equal(ort_sim_preds, labels)
    # export_quantized, not export(engine=...): the float layers are read once, below, and listed in the report
    lean_onnx = quant.export_quantized(ort_qmodel, out / "leanvit_ort_int8.onnx", x)
    lean_ort = ort.load_onnx(lean_onnx)
    ort_preds, _ = predictions(lambda b: lean_ort(b.numpy()), eval_one)
    row["leanvit_ort_top1"] = percent_equal(ort_preds, labels)
    row["sim_ort_agreement"] = percent_equal(ort_preds, ort_sim_preds)
    ort_precisions = quant.onnxruntime_precisions(lean_onnx, quant.source_modules(lean_onnx))
    row["leanvit_ort_precisions"] = dict(Counter(p for _, p in ort_precisions.values()))
    row["leanvit_ort_float_nodes"] = [node for node, (_, p) in ort_precisions.items() if p != "int8"]

    # NNCF on the same FP32 model and calibration images
    kwargs = nncf_kwargs(model)
    nncf_xml = nncf_openvino(fp_onnx, calib, out / "nncf_int8.xml", kwargs)
    anchor = engine.load_model_file(nncf_xml)
    nncf_preds, _ = predictions(lambda b: anchor(b.numpy()), eval_one)
    row["nncf_top1"] = percent_equal(nncf_preds, labels)
    paired = compare_paired(lean_preds, nncf_preds, labels)  # is the gap more than chance?
    row["leanvit_vs_nncf"] = {"leanvit_only": paired.a_only, "nncf_only": paired.b_only, "mcnemar_p": paired.p_value}
    nncf_ort = nncf_onnx_runner(fp_onnx, calib, out / "nncf_int8.onnx", ort, kwargs)
    if isinstance(nncf_ort, str):  # NNCF's ONNX backend failed: say so, keep the rest of the row
        print(f"NNCF (ONNX backend) failed on {entry.get('name', entry['model'])}: {nncf_ort}", file=sys.stderr)
        row["nncf_ort_error"], nncf_ort = nncf_ort, None
    else:
        nncf_ort_preds, _ = predictions(lambda b: nncf_ort(b.numpy()), eval_one)
        row["nncf_ort_top1"] = percent_equal(nncf_ort_preds, labels)
    x_np = x.numpy()
    runners = [("fp32", fp32), ("leanvit", lean), ("nncf", anchor), ("ort_fp32", fp32_ort), ("ort_leanvit", lean_ort)]
    runners += [("ort_nncf", nncf_ort)] if nncf_ort is not None else []
    timings = time_alternating({kind: (lambda r=runner: r(x_np)) for kind, runner in runners}, budget,
                               rounds=args.rounds)
    row.update({f"{kind}_ms": round(t.median, 3) for kind, t in timings.items()})
    # the same ratios round by round: how far the shared machine's state moved them in this run
    pairs = {"fp32_over_leanvit": ("fp32", "leanvit"), "leanvit_over_nncf": ("leanvit", "nncf")}
    row["round_ratios"] = {name: np.round(round_ratios(timings[a], timings[b]), 3).tolist()
                           for name, (a, b) in pairs.items()}
    row["nncf_int8_layers"] = sum(p in ("i8", "u8") for _, p in quant.openvino_precisions(anchor.compiled).values())
    if args.profile:
        row["op_ms"] = {kind: op_profile(engine, path, x.numpy())
                        for kind, path in (("fp32", fp_onnx), ("leanvit", xml), ("nncf", nncf_xml))}
        ort_files = [("fp32", fp_onnx), ("leanvit", lean_onnx)]
        ort_files += [("nncf", out / "nncf_int8.onnx")] if nncf_ort is not None else []
        row["ort_op_ms"] = {kind: ort_op_profile(ort, path, x.numpy()) for kind, path in ort_files}
    return row


def nncf_kwargs(model: torch.nn.Module) -> dict:
    """``nncf.quantize``'s options for ``model``: ``ModelType.TRANSFORMER`` where it has attention, as NNCF advises."""
    import nncf

    return {"model_type": nncf.ModelType.TRANSFORMER} if has_attention(model) else {}


def nncf_openvino(fp_onnx: Path, calib, path: Path, kwargs: dict) -> Path:
    """NNCF's INT8 OpenVINO IR of the FP32 ONNX file, calibrated on ``calib`` (all of it, batch 1), saved at ``path``."""
    import nncf
    import openvino as ov

    quantized = nncf.quantize(openvino_core().read_model(str(fp_onnx)),
                              nncf.Dataset(make_loader(calib, 1), lambda batch: batch[0].numpy()),
                              subset_size=len(calib), **kwargs)
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return path


def nncf_onnx_runner(fp_onnx: Path, calib, path: Path, ort, kwargs: dict):
    """NNCF's INT8 model for ONNX Runtime (its ONNX backend, same calibration images), or the error's text."""
    import nncf
    import onnx

    model = onnx.load(str(fp_onnx))
    name = model.graph.input[0].name
    try:
        quantized = nncf.quantize(model, nncf.Dataset(make_loader(calib, 1), lambda batch: {name: batch[0].numpy()}),
                                  subset_size=len(calib), **kwargs)
    except Exception as e:  # an anchor that cannot be built is reported, not fatal to the benchmark
        return f"{type(e).__name__}: {e}"
    onnx.save(quantized, str(path))
    return ort.load_onnx(path)


def label(row: dict) -> str:
    """What names a row: its checkpoint (a model such as efficientmod_xxs has several), else its model."""
    return row.get("checkpoint") or row["model"]


def render_markdown(rows: list[dict], args, host: dict) -> str:
    lines = [f"# PTQ: FP32 vs leanvit {args.bits} ({args.recipe} recipe, {args.target} target) vs NNCF (OpenVINO, "
             f"batch 1, {args.threads} threads)", "",
             f"Calibration: {args.calib} ({args.calib_images} images); evaluation: {args.data}.", "",
             "Host:", "", *host_lines(host), "",
             "| model | eval imgs | FP32 top-1 | leanvit sim | leanvit OV | sim/OV agree % | NNCF OV | "
             "leanvit-only / NNCF-only right (McNemar p) | FP32 ms | leanvit ms | NNCF ms | leanvit / NNCF | "
             "FP32 / leanvit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {label(r)} | {r['eval_images']} | {r['fp32_top1']:.2f} | {r['leanvit_sim_top1']:.2f} | "
            f"{r['leanvit_top1']:.2f} | {r['sim_engine_agreement']:.1f} | {r['nncf_top1']:.2f} | "
            f"{r['leanvit_vs_nncf']['leanvit_only']} / {r['leanvit_vs_nncf']['nncf_only']} "
            f"({r['leanvit_vs_nncf']['mcnemar_p']:.2f}) | {r['fp32_ms']:.2f} | "
            f"{r['leanvit_ms']:.2f} | {r['nncf_ms']:.2f} | {r['leanvit_ms'] / r['nncf_ms']:.2f} | "
            f"{r['fp32_ms'] / r['leanvit_ms']:.2f} |")
    lines += ["", f"ONNX Runtime (CPU execution provider), batch 1, {args.threads} threads; leanvit's model for it "
              "quantizes conv outputs too (`QuantConfig.recipe(engine=\"onnxruntime\")`); INT8 / float: leanvit's "
              "compute nodes in the graph ONNX Runtime executes after its fusions:", "",
              "| model | leanvit sim (ORT recipe) | leanvit ORT top-1 | sim/ORT agree % | leanvit INT8 / float nodes | "
              "NNCF ORT top-1 | FP32 ms | leanvit ms | NNCF ms | leanvit / NNCF | FP32 / leanvit |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nncf_ms = r.get("ort_nncf_ms")
        lines.append(
            f"| {label(r)} | {r['leanvit_ort_sim_top1']:.2f} | {r['leanvit_ort_top1']:.2f} | "
            f"{r['sim_ort_agreement']:.1f} | "
            f"{r['leanvit_ort_precisions'].get('int8', 0)} / {r['leanvit_ort_precisions'].get('float', 0)} | "
            + (f"{r['nncf_ort_top1']:.2f}" if "nncf_ort_top1" in r else "failed (ptq.json)")
            + f" | {r['ort_fp32_ms']:.2f} | {r['ort_leanvit_ms']:.2f} | "
            + (f"{nncf_ms:.2f} | {r['ort_leanvit_ms'] / nncf_ms:.2f}" if nncf_ms else "– | –")
            + f" | {r['ort_fp32_ms'] / r['ort_leanvit_ms']:.2f} |")
    lines += ["", "OpenVINO ratios round by round (each round times the models back to back; min / median / max over "
              f"the {args.rounds} rounds):", ""]
    for r in (r for r in rows if "round_ratios" in r):  # (rows of runs before the per-round record have none)
        fp32_over, over_nncf = r["round_ratios"]["fp32_over_leanvit"], r["round_ratios"]["leanvit_over_nncf"]
        lines.append(f"- {label(r)}: FP32 / leanvit {_spread(fp32_over)}; leanvit / NNCF {_spread(over_nncf)}")
    lines += ["", "The McNemar column counts the test images only one of the two INT8 models classifies right; p is "
              "the exact two-sided chance of a split at least that lopsided between equally accurate models.",
              "", "Layers leanvit leaves in float (reasons in ptq.json):", ""]
    for r in rows:
        kinds = Counter(reason.split(":")[0] for reason in r["leanvit_float_layers"].values())
        lines.append(f"- {label(r)}: " + (", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) or "none"))
    lines += ["", "Compute nodes ONNX Runtime runs in float in leanvit's ORT model:", ""]
    lines += [f"- {label(r)}: {', '.join(r.get('leanvit_ort_float_nodes', [])) or 'none'}" for r in rows]
    profiles = (("op_ms", "OpenVINO time per op type and execution precision", "op (precision)"),
                ("ort_op_ms", "ONNX Runtime time per op type and input element type", "op (input type)"))
    for r in rows:
        for key, title, column in profiles:
            if key not in r:
                continue
            kinds = list(r[key])
            ops = list(dict.fromkeys(op for kind in kinds for op in r[key][kind]))
            lines += ["", f"## {label(r)}: {title} (ms per inference)", "",
                      f"| {column} | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
            lines += [f"| {op} | " + " | ".join(f"{r[key][k].get(op, 0):.2f}" for k in kinds) + " |" for op in ops]
            lines.append("| total | " + " | ".join(f"{sum(r[key][k].values()):.2f}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {float(np.median(values)):.2f} / {max(values):.2f}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (engine, prefix) in zip(axes, (("OpenVINO", ""), ("ONNX Runtime", "ort_"))):
        for kind, marker in (("fp32", "o"), ("leanvit", "s"), ("nncf", "^")):
            key = f"{kind}_ort_top1" if prefix and kind != "fp32" else f"{kind}_top1"  # FP32: eager's top-1
            points = [(r[f"{prefix}{kind}_ms"], r[key]) for r in rows if f"{prefix}{kind}_ms" in r and key in r]
            if points:
                ax.scatter(*zip(*points), marker=marker, label=kind)
        for r in rows:
            ax.annotate(label(r), (r[f"{prefix}fp32_ms"], r["fp32_top1"]), fontsize=7)
        ax.set_xlabel(f"{engine} latency, batch 1 (ms)")
        ax.legend()
    axes[0].set_ylabel("top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, help="JSON list of {model, checkpoint} (see eval_checkpoints.py)")
    p.add_argument("--models", nargs="+", default=[],
                   help="with --manifest: only these entries (by name); without: model names (random weights)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="kwargs for timm.create_model (JSON)")
    p.add_argument("--data", default="cifar10-test500", help="evaluation data (default: the shipped subset)")
    p.add_argument("--calib", default="cifar10-test500", help="calibration data (its training split if any)")
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--eval-images", type=int, help="evaluate on this many images (class-balanced)")
    p.add_argument("--bits", default="w8a8", help="leanvit's bit-widths: w8a8, or w7a8 on CPUs without VNNI")
    p.add_argument("--target", default="auto", choices=quant.TARGETS,
                   help="the CPU leanvit's INT8 model is for (auto: this machine's; see QuantConfig.recipe)")
    p.add_argument("--recipe", default="mse", choices=("minmax", "mse", "hybrid"),
                   help="leanvit's recipe (QuantConfig.recipe); --quant-kwargs override its fields")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--budget-s", type=float, default=6.0, help="timing budget per model and engine file (s)")
    p.add_argument("--rounds", type=int, default=6, help="FP32, leanvit and NNCF alternate in this many rounds")
    p.add_argument("--profile", action="store_true",
                   help="also OpenVINO's and ONNX Runtime's per-op timings of the models: where the INT8 time goes")
    p.add_argument("--quant-kwargs", type=json.loads, default={},
                   help="other QuantConfig fields for leanvit's model (JSON), e.g. '{\"quantize_depthwise\": true}'")
    p.add_argument("--out", type=Path, default=HERE / "results" / "ptq")
    args = p.parse_args(argv)
    args.target = quant.resolve_target(args.target)  # once: each row and the report name the CPU kind
    if args.manifest:
        try:
            entries = read_manifest(args.manifest, args.models)
        except ValueError as e:
            p.error(str(e))
        if not entries:
            p.error(f"{args.manifest} lists no checkpoints")
    else:
        entries = [{"model": m} for m in args.models]
        if not entries:
            p.error("give --manifest or --models")
        try:  # a typo: one line before anything is exported, not a traceback after the models before it
            for m in args.models:
                resolve_model_name(m)
        except LeanvitError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*VNNI.*")  # the bits are the user's choice here
    host = host_info()  # before the run: its load average says whether other work shared the machine
    rows = []
    for entry in entries:
        print(f"== {entry.get('name', entry['model'])}", file=sys.stderr)
        rows.append(bench_model(entry, args))
        print(json.dumps(rows[-1]), file=sys.stderr)
    report = {"host": host, "threads": args.threads, "bits": args.bits, "recipe": args.recipe,
              "calib": args.calib, "data": args.data, "rows": rows}
    markdown = render_markdown(rows, args, host)
    save_report(args.out, "ptq", report, markdown, lambda path: plot(rows, path))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
