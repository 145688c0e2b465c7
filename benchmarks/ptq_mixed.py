"""Mixed precision under an average weight-bit budget (simulation): does the measured sensitivity choose the
low-bit layers better than chance, and better than one uniform bit-width at the same average?

    python benchmarks/ptq_mixed.py --manifest benchmarks/checkpoints.json \\
        --data ~/.cache/leanvit/cifar10/test --calib ~/.cache/leanvit/cifar10 [--budgets 5 6 7] [--out DIR]

Per checkpoint each quantized layer either goes to ``--low`` (W4A4) or stays at ``--high`` (W8A8), chosen by
``leanvit.compress.quant.assign_bits`` from a per-layer score (cheapest per weight first) until the average
weight bit-width, over all quantized weights, meets the budget. The scores:

- ``logit``: ``layer_sensitivity(method="logit")``, the logit error with that layer alone at the low bits
  (what ``allocate_bits`` and ``leanvit quantize --avg-bits`` use by default);
- ``hessian``: ``layer_sensitivity(method="hessian")``, HAWQ's ``Tr(H) / n * ||Q(W) - W||^2``;
- ``random``: a random order of the layers (``--random-seeds`` draws): the control a sensitivity must beat;
- ``uniform``: no mixing, every layer at the budget's bit-width (``w6a6`` for a budget of 6; ``w6a8`` when both
  ends have 8-bit activations), the same average.

Both ends (every layer low, every layer high) are scored as well. Every run is ``--recipe`` (default ``mse``:
fast, so the allocation is what differs) with the attention matmuls at 8 bits; the sensitivities are measured
once per checkpoint on the calibration images. Top-1 is the simulation's on the evaluation images.
Writes ``mixed.json``, ``mixed.md`` and ``mixed.png`` (top-1 against the average weight bit-width).
"""
from __future__ import annotations

import random
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

from leanvit.bench import host_info
from leanvit.bench.report import host_lines
from leanvit.compress import quant
from leanvit.data import make_loader
from leanvit.evaluate import evaluate
from manifest import save_report
from ptq_lowbit import checkpoints, open_checkpoint, simulation_parser

SENSITIVITIES = ("logit", "hessian")


def score(config: quant.QuantConfig, entry: dict, args) -> list[dict]:
    """Rows of one checkpoint: both ends, then every allocation at every budget."""
    model, calib, loader, fp32 = open_checkpoint(entry, args)
    (low_w, low_a), (_, high_a) = quant.parse_bits(args.low), quant.parse_bits(args.high)

    def run(allocation: str, layer_bits: tuple, budget: float | None = None, seed: int | None = None) -> dict:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # float layers are listed in the json instead
            qmodel = quant.quantize(model, make_loader(calib, 32), replace(config, layer_bits=layer_bits),
                                    progress=False)
        top1 = evaluate(qmodel, loader, progress=False).top1
        low = [name for name, bits in qmodel.quant_report.weight_bits.items() if bits == low_w]
        row = {"checkpoint": entry["name"], "allocation": allocation, "budget": budget, "seed": seed, "top1": top1,
               "fp32_top1": fp32, "avg_weight_bits": round(quant.average_weight_bits(qmodel), 3),
               "low_layers": low, "layers": len(qmodel.quant_report.quantized),
               "float_layers": dict(qmodel.quant_report.float_layers),
               "seconds": round(time.perf_counter() - started, 1)}
        print(f"   {allocation:8} budget {budget or '-':>4} seed {seed if seed is not None else '-'}: top-1 "
              f"{top1:6.2f}  avg {row['avg_weight_bits']:.2f} bits, {len(low)} layers low ({row['seconds']:.0f} s)",
              file=sys.stderr)
        return row

    rows = [run("all-low", (("*", args.low),)), run("all-high", (("*", args.high),))]
    low_config = replace(config, layer_bits=(("*", args.low),))
    scores = {}
    for method in SENSITIVITIES:
        started = time.perf_counter()
        scores[method] = quant.layer_sensitivity(model, make_loader(calib, 32), low_config, method=method)
        print(f"   {method} sensitivity of {len(scores[method])} layers: {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    sizes = {name: model.get_submodule(name).weight.numel() for name in scores["logit"]}
    for budget in args.budgets:
        for method in SENSITIVITIES:
            rows.append(run(method, quant.assign_bits(scores[method], sizes, budget, low=args.low, high=args.high),
                            budget))
        for seed in args.random_seeds:  # score / size uniform at random: a random order of the layers
            draw = random.Random(seed)
            shuffled = {name: draw.random() * size for name, size in sizes.items()}
            rows.append(run("random", quant.assign_bits(shuffled, sizes, budget, low=args.low, high=args.high),
                            budget, seed))
        if float(budget).is_integer():  # activations at the budget's bits too, unless both ends share theirs
            bits = f"w{int(budget)}a{low_a if low_a == high_a else int(budget)}"
            rows.append(run("uniform", (("*", bits),), budget))
    return rows


def main(argv=None) -> int:
    p = simulation_parser(__doc__.split("\n\n")[0], "ptq-mixed")
    p.add_argument("--budgets", nargs="+", type=float, default=[5.0, 6.0, 7.0], help="average weight bits")
    p.add_argument("--low", default="w4a4")
    p.add_argument("--high", default="w8a8")
    p.add_argument("--recipe", default="mse", choices=("minmax", "mse", "hybrid"))
    p.add_argument("--random-seeds", nargs="+", type=int, default=[0, 1])
    args = p.parse_args(argv)
    entries = checkpoints(p, args)
    config = quant.QuantConfig.recipe(args.recipe, args.high, attn_bits=8, **args.quant_kwargs)
    rows = [row for entry in entries for row in score(config, entry, args)]
    host = host_info()
    report = {"host": host, "threads": args.threads, "calib": args.calib, "data": args.data,
              "recipe": args.recipe, "low": args.low, "high": args.high, "quant_kwargs": args.quant_kwargs,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    text = markdown(rows, args, host)
    save_report(args.out, "mixed", report, text, lambda path: plot(rows, path))
    print(text)
    return 0


def markdown(rows: list[dict], args, host: dict) -> str:
    lines = [f"# Mixed precision under an average weight-bit budget ({args.low} / {args.high}, simulation)", "",
             f"Recipe `{args.recipe}` with the attention matmuls at 8 bits and `{args.quant_kwargs}`; calibration "
             f"{args.calib_images} images of {args.calib}; evaluation {args.eval_images or 'all'} images of "
             f"{args.data}. Top-1 %; in brackets the average weight bits reached. `random`: mean over seeds "
             f"{', '.join(map(str, args.random_seeds))} (min-max). `uniform`: every layer at the budget's bits.", "",
             "| checkpoint | FP32 | all " + args.low + " | all " + args.high + " | budget | logit | hessian | random | "
             "uniform |", "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["checkpoint"] for r in rows):
        mine = [r for r in rows if r["checkpoint"] == name]
        ends = {r["allocation"]: r["top1"] for r in mine if r["budget"] is None}
        for budget in args.budgets:
            cell = {}
            for allocation in ("logit", "hessian", "uniform"):
                hit = [r for r in mine if r["allocation"] == allocation and r["budget"] == budget]
                cell[allocation] = f"{hit[0]['top1']:.2f} ({hit[0]['avg_weight_bits']:.2f})" if hit else "–"
            draws = [r for r in mine if r["allocation"] == "random" and r["budget"] == budget]
            tops = [r["top1"] for r in draws]
            cell["random"] = (f"{statistics.mean(tops):.2f} ({min(tops):.2f}–{max(tops):.2f}; "
                              f"{statistics.mean(r['avg_weight_bits'] for r in draws):.2f})" if draws else "–")
            lines.append(f"| {name} | {mine[0]['fp32_top1']:.2f} | {ends['all-low']:.2f} | {ends['all-high']:.2f} | "
                         f"{budget:g} | {cell['logit']} | {cell['hessian']} | {cell['random']} | {cell['uniform']} |")
    return "\n".join(lines + ["", "Host:", "", *host_lines(host)]) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["checkpoint"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 3.9), squeeze=False)
    styles = {"logit": "o-", "hessian": "s-", "random": "x", "uniform": "^--"}
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["checkpoint"] == name]
        for allocation, style in styles.items():
            points = sorted((r["avg_weight_bits"], r["top1"]) for r in mine if r["allocation"] == allocation)
            if points:
                ax.plot(*zip(*points), style, label=allocation, alpha=0.8)
        for r in mine:
            if r["budget"] is None:
                ax.plot(r["avg_weight_bits"], r["top1"], "k*", markersize=9)
                ax.annotate(r["allocation"], (r["avg_weight_bits"], r["top1"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
        ax.axhline(mine[0]["fp32_top1"], color="grey", linestyle=":", label="FP32")
        ax.set_title(name)
        ax.set_xlabel("average weight bits")
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
