"""Low-bit PTQ in simulation: min-max against leanvit's hybrid-aware recipe at W8A8, W6A6 and W4A4.

    python benchmarks/ptq_lowbit.py --manifest benchmarks/checkpoints.json \\
        --data ~/.cache/leanvit/cifar10/test --calib ~/.cache/leanvit/cifar10 [--bits w6a6 w4a4] [--out DIR]

Every recipe (``leanvit.QuantConfig.recipe``) quantizes the same checkpoint from the same calibration
images (class-balanced, from the training split) and is scored on the same evaluation images, top-1
against the FP32 model's; the attention matmuls are quantized at the activation bit-width in all:

- ``minmax``: the textbook baseline, min-max ranges for weights (per channel) and activations
  (per tensor), uniform softmax levels;
- ``mse``: leanvit's deployable W8A8 recipe (MSE-searched ranges, RepQ-ViT LayerNorm
  reparameterisation), uniform softmax levels;
- ``hybrid``: the hybrid-aware method: ``mse`` plus a per-layer choice of symmetric or asymmetric
  activations, PTQ4ViT's Hessian-guided range search, bias correction, BRECQ/AdaRound block
  reconstruction (Q-HyViT's bridge blocks included), and twin-uniform softmax quantization.

As in RepQ-ViT and PTQ4ViT, the first and the last quantized layer (stem, classifier) stay at 8 bits
in every recipe. Writes ``lowbit.json``, ``lowbit.md`` and ``lowbit.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from leanvit.bench import host_info
from leanvit.checkpoint import model_from_checkpoint
from leanvit.compress import quant
from leanvit.data import DecodedDataset, build_transform, calibration_subset, make_loader, open_dataset
from leanvit.evaluate import evaluate
from manifest import DEFAULT as DEFAULT_MANIFEST, read_manifest, save_report

HERE = Path(__file__).resolve().parent
RECIPES = ("minmax", "mse", "hybrid")  #: QuantConfig.recipe's names


def simulation_parser(description: str, out: str) -> argparse.ArgumentParser:
    """The options of a benchmark scoring simulated quantized models of the manifest's checkpoints: which
    checkpoints, the data, ``--quant-kwargs`` for every configuration, threads, output folder ``results/<out>``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument("--models", nargs="+", help="only these manifest entries (by name)")
    p.add_argument("--data", default=str(Path("~/.cache/leanvit/cifar10/test").expanduser()))
    p.add_argument("--calib", default=str(Path("~/.cache/leanvit/cifar10").expanduser()),
                   help="calibration data (its training split when it has one)")
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--eval-images", type=int, help="class-balanced subset of --data (default: all of it)")
    p.add_argument("--quant-kwargs", type=json.loads, default={"quantize_depthwise": True},
                   help="QuantConfig fields for every configuration (JSON); by default depthwise convs are "
                        "quantized too: a simulated W4A4 model has every weight at 4 bits (leanvit keeps them "
                        "float only where an engine's INT8 depthwise kernel is slower)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / out)
    return p


def checkpoints(parser: argparse.ArgumentParser, args) -> list[dict]:
    """The manifest entries ``args`` names (an error through ``parser`` if none or unknown); sets the threads."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*VNNI.*")
    try:
        entries = read_manifest(args.manifest, args.models or ())
    except ValueError as e:
        parser.error(str(e))
    if not entries:
        parser.error(f"{args.manifest} lists no checkpoints")
    return entries

def open_checkpoint(entry: dict, args):
    """The manifest ``entry``'s FP32 model, its calibration images (``args.calib_images`` class-balanced ones of
    ``args.calib``'s training split), a loader of its evaluation images (``args.data``, or ``args.eval_images``
    class-balanced ones of it), both decoded once for every model scored on them, and its FP32 top-1."""
    model, meta = model_from_checkpoint(entry["model"], entry["path"])
    model.eval()
    transform = build_transform(meta["data_config"])
    calib = open_dataset(args.calib, train=True, transform=transform)
    calib = DecodedDataset(calibration_subset(calib, args.calib_images))
    evalset = open_dataset(args.data, transform=transform)
    if args.eval_images and args.eval_images < len(evalset):
        evalset = calibration_subset(evalset, args.eval_images, seed=1)
    loader = make_loader(DecodedDataset(evalset), 100)
    fp32 = evaluate(model, loader, progress=False).top1
    print(f"== {entry['name']}: FP32 {fp32:.2f} % on {len(evalset)} images", file=sys.stderr)
    return model, calib, loader, fp32


def main(argv=None) -> int:
    p = simulation_parser(__doc__.split("\n\n")[0], "ptq-lowbit")
    p.add_argument("--bits", nargs="+", default=["w8a8", "w6a6", "w4a4"])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--iters", type=int, default=500, help="reconstruction steps per block (hybrid recipe)")
    args = p.parse_args(argv)
    entries = checkpoints(p, args)
    rows = []
    for entry in entries:
        model, calib, loader, fp32 = open_checkpoint(entry, args)
        name = entry["name"]
        for bits in args.bits:
            for recipe_name in args.recipes:
                config = quant.QuantConfig.recipe(recipe_name, bits, attn_bits=quant.parse_bits(bits)[1],
                                                  reconstruct_iters=args.iters, **args.quant_kwargs)
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # float layers are listed in the report instead
                    qmodel = quant.quantize(model, make_loader(calib, 32), config, progress=False)
                seconds = time.perf_counter() - started
                top1 = evaluate(qmodel, loader, progress=False).top1
                rows.append({"checkpoint": name, "model": entry["model"], "bits": bits, "recipe": recipe_name,
                             "top1": top1, "fp32_top1": fp32, "drop": round(fp32 - top1, 2),
                             "quantize_s": round(seconds, 1), "calib_images": len(calib),
                             "eval_images": len(loader.dataset), "float_layers": dict(qmodel.quant_report.float_layers),
                             "reconstructed": qmodel.quant_report.reconstructed,
                             "per_channel_inputs": qmodel.quant_report.per_channel_inputs})
                print(f"   {bits} {recipe_name:7} top-1 {top1:6.2f} (drop {fp32 - top1:+.2f}) "
                      f"quantize {seconds:.0f} s", file=sys.stderr)
    report = {"host": host_info(), "threads": args.threads, "calib": args.calib, "data": args.data,
              "quant_kwargs": args.quant_kwargs,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    save_report(args.out, "lowbit", report, markdown(rows, args), lambda path: plot(rows, path))
    print(markdown(rows, args))
    return 0


def markdown(rows: list[dict], args) -> str:
    lines = ["# Low-bit PTQ (simulation): min-max vs leanvit", "",
             f"Calibration: {rows[0]['calib_images']} images of {args.calib}; evaluation: {rows[0]['eval_images']} "
             f"images of {args.data}. Top-1 %, drop against FP32 in brackets. First and last layers at 8 bits, "
             "attention matmuls quantized at the activation bit-width. Every recipe also sets "
             f"`{json.dumps(args.quant_kwargs)}`.", "",
             "| checkpoint | FP32 | bits | " + " | ".join(args.recipes) + " |",
             "|---|---|---|" + "---|" * len(args.recipes)]
    for (name, bits) in dict.fromkeys((r["checkpoint"], r["bits"]) for r in rows):
        cells = {r["recipe"]: r for r in rows if r["checkpoint"] == name and r["bits"] == bits}
        fp32 = next(iter(cells.values()))["fp32_top1"]
        lines.append(f"| {name} | {fp32:.2f} | {bits} | " + " | ".join(
            f"{cells[k]['top1']:.2f} ({cells[k]['top1'] - fp32:+.2f})" if k in cells else "–" for k in args.recipes) + " |")
    per_channel = [f"{r['checkpoint']} {r['bits']} {r['recipe']}: {len(r['per_channel_inputs'])}" for r in rows
                   if r.get("per_channel_inputs")]
    if per_channel:
        lines += ["", "Layers whose inputs the granularity choice quantized per channel (names in the json): "
                  + "; ".join(per_channel) + "."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["checkpoint"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["checkpoint"] == name]
        bits = list(dict.fromkeys(r["bits"] for r in mine))
        for recipe_name in dict.fromkeys(r["recipe"] for r in mine):
            points = {r["bits"]: r["top1"] for r in mine if r["recipe"] == recipe_name}
            ax.plot(bits, [points.get(b) for b in bits], marker="o", label=recipe_name)
        ax.axhline(mine[0]["fp32_top1"], color="grey", linestyle="--", label="FP32")
        ax.set_title(name)
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
