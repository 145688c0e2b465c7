"""leanvit INT8 against NNCF INT8 over several calibration draws: is the accuracy gap more than the draw?

    python benchmarks/ptq_draws.py --manifest benchmarks/checkpoints.json --models mobilevig_ti-cifar10 \\
        --data ~/.cache/leanvit/cifar10/test --calib ~/.cache/leanvit/cifar10 [--seeds 0 1 2 3 4] [--out DIR]

``ptq.py`` compares the two on one set of calibration images; on the shipped checkpoints their top-1 differ
by a few test images, within what a different draw of the same number of images moves either. Here each seed
draws its own class-balanced calibration set (``calibration_subset(seed=...)``, from the training split), both
quantize the same FP32 model from it (leanvit's recipe for OpenVINO; ``nncf.quantize`` on the FP32 ONNX export,
as in ``ptq.py``) and both INT8 models are scored executed on OpenVINO (batch 1, static shape) on the same test
images. Reported per model: each draw's top-1, paired McNemar split and top-1 agreement with the FP32 model
(how faithfully each INT8 model keeps the float model's decisions: a finer measure of the quantization than
top-1, which its errors move both ways), the mean and standard deviation over draws, and the mean leanvit - NNCF
top-1 difference with its standard error. Accuracy only (``ptq.py`` times them).
Writes ``draws.json``, ``draws.md`` and ``draws.png``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from leanvit.bench import host_info
from leanvit.bench.report import host_lines
from leanvit.compress import quant
from leanvit.data import DecodedDataset, build_transform, calibration_subset, make_loader, open_dataset
from leanvit.deploy import export_onnx, get_engine
from leanvit.evaluate import compare_paired
from manifest import DEFAULT as DEFAULT_MANIFEST, read_manifest, save_report
from ptq import load, nncf_kwargs, nncf_openvino, percent_equal, predictions

HERE = Path(__file__).resolve().parent


def bench_model(entry: dict, args) -> dict:
    model, data_config = load(entry, {})
    transform = build_transform(data_config)
    trainset = open_dataset(args.calib, train=True, transform=transform)
    evalset = open_dataset(args.data, transform=transform)
    if args.eval_images and args.eval_images < len(evalset):
        evalset = calibration_subset(evalset, args.eval_images, seed=1)
    evalset = DecodedDataset(evalset)
    out = args.out / entry["name"]
    out.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, *data_config["input_size"])
    engine = get_engine("openvino", threads=args.threads, precision="f32")
    fp_onnx = export_onnx(model, x, out / "fp32.onnx")
    with torch.inference_mode():
        fp_preds, labels = predictions(lambda b: model(b).numpy(), make_loader(evalset, args.batch_size))
    config = quant.QuantConfig.recipe(args.recipe, "w8a8", target=args.target)
    row = {"model": entry["model"], "checkpoint": entry["name"], "eval_images": len(evalset),
           "calib_images": args.calib_images, "fp32_top1": percent_equal(fp_preds, labels), "draws": []}
    eval_one = make_loader(evalset, 1)
    for seed in args.seeds:
        start = time.perf_counter()
        calib = DecodedDataset(calibration_subset(trainset, args.calib_images, seed=seed))
        qmodel = quant.quantize(model, make_loader(calib, args.batch_size), config, progress=False)
        xml = quant.export(qmodel, out / "leanvit_int8.xml", engine="openvino", example=x, dynamic_batch=False)
        lean = engine.load_model_file(xml)
        lean_preds, _ = predictions(lambda b: lean(b.numpy()), eval_one)
        anchor = engine.load_model_file(nncf_openvino(fp_onnx, calib, out / "nncf_int8.xml", nncf_kwargs(model)))
        nncf_preds, _ = predictions(lambda b: anchor(b.numpy()), eval_one)
        paired = compare_paired(lean_preds, nncf_preds, labels)
        draw = {"seed": seed, "leanvit_top1": percent_equal(lean_preds, labels),
                "nncf_top1": percent_equal(nncf_preds, labels),
                "leanvit_fp32_agreement": percent_equal(lean_preds, fp_preds),
                "nncf_fp32_agreement": percent_equal(nncf_preds, fp_preds), "leanvit_only": paired.a_only,
                "nncf_only": paired.b_only, "mcnemar_p": paired.p_value}
        row["draws"].append(draw)
        print(f"   seed {seed}: leanvit {draw['leanvit_top1']:.2f}  NNCF {draw['nncf_top1']:.2f}  agree with FP32 "
              f"{draw['leanvit_fp32_agreement']:.2f} / {draw['nncf_fp32_agreement']:.2f}  "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    row.update(summarize(row["draws"]))
    return row


def summarize(draws: list[dict]) -> dict:
    """Mean and standard deviation over the draws of each top-1 and agreement with FP32; the paired top-1
    difference's mean and standard error."""
    def mean_sd(values):
        return round(statistics.mean(values), 3), round(statistics.stdev(values), 3) if len(values) > 1 else 0.0

    lean = [d["leanvit_top1"] for d in draws]
    anchor = [d["nncf_top1"] for d in draws]
    diff = [a - b for a, b in zip(lean, anchor)]
    diff_mean, diff_sd = mean_sd(diff)
    return {"leanvit_mean_sd": mean_sd(lean), "nncf_mean_sd": mean_sd(anchor),
            "leanvit_fp32_agreement_mean_sd": mean_sd([d["leanvit_fp32_agreement"] for d in draws]),
            "nncf_fp32_agreement_mean_sd": mean_sd([d["nncf_fp32_agreement"] for d in draws]), "diff_mean": diff_mean,
            "diff_se": round(diff_sd / len(diff) ** 0.5, 3), "draws_leanvit_at_least_nncf": sum(d >= 0 for d in diff)}


def render_markdown(rows: list[dict], args, host: dict) -> str:
    lines = [f"# leanvit W8A8 ({args.recipe} recipe, {args.target} target) vs NNCF over {len(args.seeds)} "
             "calibration draws (OpenVINO, batch 1)", "",
             f"Calibration: {args.calib_images} class-balanced images of {args.calib} per draw (seeds "
             f"{', '.join(map(str, args.seeds))}); evaluation: {args.data}.", "",
             "Host:", "", *host_lines(host), "",
             "| model | eval imgs | FP32 top-1 | leanvit OV mean ± sd | NNCF OV mean ± sd | leanvit - NNCF "
             "(mean ± s.e.) | draws leanvit ≥ NNCF | agreement with FP32 %, leanvit / NNCF (mean ± sd) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (lm, ls), (nm, ns) = r["leanvit_mean_sd"], r["nncf_mean_sd"]
        (la, lsd), (na, nsd) = r["leanvit_fp32_agreement_mean_sd"], r["nncf_fp32_agreement_mean_sd"]
        lines.append(f"| {r['checkpoint']} | {r['eval_images']} | {r['fp32_top1']:.2f} | {lm:.2f} ± {ls:.2f} | "
                     f"{nm:.2f} ± {ns:.2f} | {r['diff_mean']:+.2f} ± {r['diff_se']:.2f} | "
                     f"{r['draws_leanvit_at_least_nncf']} / {len(r['draws'])} | {la:.2f} ± {lsd:.2f} / "
                     f"{na:.2f} ± {nsd:.2f} |")
    lines += ["", "Per draw (leanvit-only / NNCF-only right: McNemar's split of the images only one classifies "
              "right, p its exact two-sided chance between equally accurate models):", "",
              "| model | seed | leanvit OV | NNCF OV | leanvit-only / NNCF-only (p) | agreement with FP32 %, "
              "leanvit / NNCF |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['checkpoint']} | {d['seed']} | {d['leanvit_top1']:.2f} | {d['nncf_top1']:.2f} | "
              f"{d['leanvit_only']} / {d['nncf_only']} ({d['mcnemar_p']:.2f}) | "
              f"{d['leanvit_fp32_agreement']:.2f} / {d['nncf_fp32_agreement']:.2f} |" for r in rows for d in r["draws"]]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for i, (kind, key) in enumerate((("leanvit", "leanvit_top1"), ("NNCF", "nncf_top1"))):
            values = [d[key] for d in r["draws"]]
            ax.scatter([i] * len(values), values, alpha=0.6, label=kind)
            ax.hlines(statistics.mean(values), i - 0.2, i + 0.2, color="k")
        ax.axhline(r["fp32_top1"], ls="--", color="gray", label="FP32")
        ax.set_xticks([0, 1], ["leanvit", "NNCF"])
        ax.set_title(r["checkpoint"], fontsize=9)
        ax.set_ylabel("top-1 on OpenVINO (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="JSON list of checkpoints")
    p.add_argument("--models", nargs="+", default=[], help="only these manifest entries (by name)")
    p.add_argument("--data", required=True, help="evaluation data (e.g. the CIFAR-10 test folder)")
    p.add_argument("--calib", required=True, help="calibration data (its training split if any)")
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one calibration draw per seed")
    p.add_argument("--eval-images", type=int, help="evaluate on this many images (class-balanced)")
    p.add_argument("--target", default="auto", choices=quant.TARGETS)
    p.add_argument("--recipe", default="mse", choices=("minmax", "mse", "hybrid"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=HERE / "results" / "ptq-draws")
    args = p.parse_args(argv)
    if len(set(args.seeds)) < 2:
        p.error("give at least two different --seeds: one draw says nothing about the spread")
    args.target = quant.resolve_target(args.target)
    try:
        entries = read_manifest(args.manifest, args.models)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*VNNI.*")
    host, rows = host_info(), []
    for entry in entries:
        print(f"== {entry['name']}", file=sys.stderr)
        rows.append(bench_model(entry, args))
        # written after each model: a long run keeps what it measured
        report = {"host": host, "threads": args.threads, "recipe": args.recipe, "target": args.target,
                  "calib": args.calib, "data": args.data, "seeds": args.seeds, "rows": rows}
        markdown = render_markdown(rows, args, host)
        save_report(args.out, "draws", report, markdown, lambda path: plot(rows, path))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
