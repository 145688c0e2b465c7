"""Float latency of the same models exported at two ONNX opsets, on ONNX Runtime and OpenVINO, side by side.

    python benchmarks/opset.py [--models efficientformerv2_s0 mobilevig_ti ...] [--opsets 18 20] [--out DIR]

Why ``leanvit.deploy.export.DEFAULT_OPSET`` is 20: from opset 20 torch's exporter writes GELU as ONNX's ``Gelu``
op; at 18 it writes Div, Erf, Add, Mul, Mul, which ONNX Runtime does not fuse. Random weights (latency does not
depend on them), 224x224, batch 1, ``--threads`` threads, every file timed in alternating rounds
(``leanvit.bench.time_alternating``). Writes ``opset.json`` and ``opset.md``.
"""
from __future__ import annotations

import warnings

import torch

from leanvit.bench import host_info
from leanvit.bench.report import host_lines
from leanvit.bench.timing import TimingBudget, time_alternating
from leanvit.deploy import export_onnx, get_engine
from leanvit.models.registry import create_model
from manifest import latency_parser, save_report


def main() -> None:
    parser = latency_parser(__doc__.splitlines()[0], "opset", rounds=5, budget_s=8.0)
    parser.add_argument("--opsets", nargs=2, type=int, default=[18, 20])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    engines = {"onnxruntime": get_engine("onnxruntime", threads=args.threads),
               "openvino": get_engine("openvino", threads=args.threads, precision="f32")}
    x = torch.randn(1, 3, 224, 224)
    rows = []
    for name in args.models:
        model = create_model(name).eval()
        fns = {}
        for opset in args.opsets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = export_onnx(model, x, args.out / name / f"opset{opset}.onnx", opset=opset)
            for engine_name, engine in engines.items():
                runner = engine.load_model_file(path)
                fns[(engine_name, opset)] = (lambda r=runner, a=x.numpy(): r(a))
        # --budget-s is each file's (time_alternating gives every function the whole budget, over the rounds)
        timings = time_alternating(fns, TimingBudget(budget_s=args.budget_s), rounds=args.rounds)
        row = {"model": name, **{f"{e}_op{o}_ms": round(t.median, 3) for (e, o), t in timings.items()}}
        rows.append(row)
        print(row, flush=True)
    low, high = args.opsets
    host = host_info()
    lines = [f"# Float latency at ONNX opset {low} and {high} (batch 1, {args.threads} threads, 224x224, ms)", "",
             *host_lines(host), "",
             f"| model | ORT op{low} | ORT op{high} | ORT op{low} / op{high} | OpenVINO op{low} | OpenVINO op{high} |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ort_low, ort_high = r[f"onnxruntime_op{low}_ms"], r[f"onnxruntime_op{high}_ms"]
        lines.append(f"| {r['model']} | {ort_low:.2f} | {ort_high:.2f} | {ort_low / ort_high:.2f} | "
                     f"{r[f'openvino_op{low}_ms']:.2f} | {r[f'openvino_op{high}_ms']:.2f} |")
    save_report(args.out, "opset", {"host": host, "threads": args.threads, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
