"""Does a quantization option pay on this engine? leanvit's INT8 model with and without it, timed side by side.

    python benchmarks/recipe_ab.py --change '{"share_qkv_quantizer": false}' \\
        [--models efficientformerv2_s0 deit_tiny_patch16_224 ...] [--engine openvino] [--rounds 10] [--out DIR]

Which ops are worth running in INT8, and where a quantizer sits, are engine- and CPU-dependent choices
(``QuantConfig.recipe(target=, engine=)``); a gain of a few percent is below the drift between two runs of
``ptq.py`` on a shared machine. Here the recipe's INT8 model (A), the same recipe with ``--change`` applied (B)
and the FP32 model are timed in alternating rounds (``leanvit.bench.time_alternating``; 224x224, batch 1,
``--threads``), so the drift hits all three alike. Also reported: how far B's simulated outputs are from A's
(0 when the change only moves where the same integers are computed). Random weights and calibration images:
a latency A/B, not an accuracy one. The verdict is A / B's median over the rounds (``median_speedup``, as ``leanvit
bench`` rates its rows): the ratio of the pooled medians can land between two load states of the machine, outside
every round's range (0.74 once where each of the 12 rounds gave 0.91-1.05). Writes ``recipe_ab.json`` and
``recipe_ab.md``.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import torch

from leanvit.bench import host_info
from leanvit.bench.report import host_lines
from leanvit.bench.timing import TimingBudget, median_speedup, round_ratios, time_alternating
from leanvit.compress import quant
from leanvit.compress.quant.export import ENGINES
from leanvit.deploy import export_onnx, get_engine
from leanvit.models.registry import create_model
from manifest import latency_parser, save_report


def main() -> None:
    parser = latency_parser(__doc__.splitlines()[0], "recipe-ab", rounds=10, budget_s=6.0)
    parser.add_argument("--change", type=json.loads, required=True,
                        help="QuantConfig fields that make B from the recipe (JSON), e.g. '{\"share_qkv_quantizer\": false}'")
    parser.add_argument("--engine", choices=ENGINES, default="openvino")
    parser.add_argument("--recipe", choices=("minmax", "mse", "hybrid"), default="mse")
    parser.add_argument("--target", choices=quant.TARGETS, default="auto", help="leanvit's INT8 recipe target")
    args = parser.parse_args()
    args.target = quant.resolve_target(args.target)  # once: the models and the report name it
    base = quant.QuantConfig.recipe(args.recipe, "w8a8", target=args.target, engine=args.engine)
    try:
        changed = replace(base, **args.change)
    except TypeError as e:
        parser.error(f"--change: {e} (fields: see leanvit.QuantConfig)")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    engine = get_engine(args.engine, threads=args.threads, precision="f32")
    calib = torch.randn(16, 3, 224, 224)
    x = calib[:1]
    suffix = ".xml" if args.engine == "openvino" else ".onnx"
    rows = []
    for name in args.models:
        model = create_model(name).eval()
        folder = args.out / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # float layers are listed in ptq.py's reports
            runners = {"fp32": engine.load_model_file(export_onnx(model, x, folder / "fp32.onnx"))}
            outputs = {}
            for label, config in (("A", base), ("B", changed)):
                qmodel = quant.quantize(model, calib, config, progress=False)
                with torch.no_grad():
                    outputs[label] = qmodel(calib)
                path = quant.export(qmodel, folder / f"int8_{label}{suffix}", engine=args.engine, example=x)
                runners[label] = engine.load_model_file(path)
        fns = {key: (lambda r=runner, a=x.numpy(): r(a)) for key, runner in runners.items()}
        # --budget-s is each file's (time_alternating gives every function the whole budget, over the rounds)
        timings = time_alternating(fns, TimingBudget(budget_s=args.budget_s), rounds=args.rounds)
        ms = {key: t.median for key, t in timings.items()}
        diff = float((outputs["B"] - outputs["A"]).abs().max() / outputs["A"].abs().max())
        a_over_b = round_ratios(timings["A"], timings["B"])
        rows.append({"model": name, **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
                     "fp32_over_A": round(ms["fp32"] / ms["A"], 3), "fp32_over_B": round(ms["fp32"] / ms["B"], 3),
                     "A_over_B": round(ms["A"] / ms["B"], 3),  # (of the pooled medians)
                     "A_over_B_round_median": round(median_speedup(a_over_b, ms["A"], ms["B"]), 3),
                     "A_over_B_rounds": np.round(a_over_b, 3).tolist(),
                     "max_output_change": round(diff, 5)})
        print(rows[-1], flush=True)

    host = host_info()
    lines = [f"# leanvit INT8, recipe {args.recipe!r} (A) vs A with {json.dumps(args.change)} (B) on {args.engine} "
             f"(batch 1, {args.threads} threads, 224x224, {args.rounds} alternating rounds, ms)", "",
             *host_lines(host), f"- target: {args.target}", "",
             "| model | FP32 | A | B | FP32 / A | FP32 / B | A / B, median of rounds (> 1: B faster) | "
             "A / B by round (min–max) | A / B of the pooled medians | B's output change (of A's max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['fp32_ms']:.2f} | {r['A_ms']:.2f} | {r['B_ms']:.2f} | {r['fp32_over_A']:.2f} | "
              f"{r['fp32_over_B']:.2f} | **{r['A_over_B_round_median']:.3f}** | {min(r['A_over_B_rounds']):.2f}–"
              f"{max(r['A_over_B_rounds']):.2f} | {r['A_over_B']:.3f} | {r['max_output_change']:.2%} |" for r in rows]
    report = {"host": host, "engine": args.engine, "recipe": args.recipe, "change": args.change,
              "threads": args.threads, "rounds": args.rounds, "target": args.target,
              "rows": rows}
    save_report(args.out, "recipe_ab", report, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
