"""What GELU costs an INT8 model on OpenVINO: the same architectures built with GELU and with ReLU, f32 and INT8.

    python benchmarks/activation_cost.py [--models efficientformerv2_s0 mobilevig_ti ...] [--acts gelu relu]
                                         [--out DIR]

Why the hybrids' INT8 speed-up stops short of the convolutions' own: OpenVINO runs each activation as a post-op of
the convolution before it, in float, once per output element, in f32 and INT8 models alike. An INT8 convolution
is 2-3x faster than its f32 one, but GELU's erf costs the same in both, so the more of a model's time is
activation (depthwise convs on 4x-wide hidden maps), the lower its INT8 speed-up. Swapping the activation class
(every model here takes ``act_layer``) and keeping everything else measures that share directly. The ReLU models
are ablations for timing, not models anyone trained: random weights, random calibration images.

Each model: f32 ONNX and leanvit's INT8 IR (``QuantConfig.recipe("mse", target=...)``), per activation, all
timed in alternating rounds on OpenVINO (``leanvit.bench.time_alternating``; 224x224, batch 1, ``--threads``).
Writes ``activation_cost.json`` and ``activation_cost.md``.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn

from leanvit.bench import host_info
from leanvit.bench.report import host_lines
from leanvit.bench.timing import TimingBudget, time_alternating
from leanvit.compress import quant
from leanvit.deploy import export_onnx, get_engine
from leanvit.models.registry import create_model
from manifest import latency_parser, save_report

ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"), "relu": nn.ReLU,
               "hardswish": nn.Hardswish, "silu": nn.SiLU}


def main() -> None:
    parser = latency_parser(__doc__.splitlines()[0], "activation-cost", rounds=6, budget_s=6.0)
    parser.add_argument("--acts", nargs="+", choices=sorted(ACTIVATIONS), default=["gelu", "relu"])
    parser.add_argument("--target", choices=quant.TARGETS, default="auto", help="leanvit's INT8 recipe target")
    args = parser.parse_args()
    args.target = quant.resolve_target(args.target)  # once: the models and the report name it
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    engine = get_engine("openvino", threads=args.threads, precision="f32")
    config = quant.QuantConfig.recipe("mse", "w8a8", target=args.target)
    calib = torch.randn(16, 3, 224, 224)
    x = calib[:1]
    rows = []
    for name in args.models:
        runners = {}
        for act in args.acts:
            model = create_model(name, act_layer=ACTIVATIONS[act]).eval()
            folder = args.out / name / act
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # float layers are listed in the other benchmarks' reports
                fp32 = export_onnx(model, x, folder / "fp32.onnx")
                qmodel = quant.quantize(model, calib, config, progress=False)
                int8 = quant.export(qmodel, folder / "int8.xml", engine="openvino", example=x)
            runners[(act, "fp32")] = engine.load_model_file(fp32)
            runners[(act, "int8")] = engine.load_model_file(int8)
        fns = {key: (lambda r=runner, a=x.numpy(): r(a)) for key, runner in runners.items()}
        # --budget-s is each file's (time_alternating gives every function the whole budget, over the rounds)
        timings = time_alternating(fns, TimingBudget(budget_s=args.budget_s), rounds=args.rounds)
        row = {"model": name,
               **{f"{act}_{precision}_ms": round(t.median, 3) for (act, precision), t in timings.items()}}
        rows.append(row)
        print(row, flush=True)

    head = " | ".join(f"{a} f32 | {a} INT8 | {a} f32/INT8" for a in args.acts)
    host = host_info()
    lines = [f"# INT8 speed-up on OpenVINO with each activation (batch 1, {args.threads} threads, 224x224, ms)", "",
             *host_lines(host), f"- leanvit recipe: mse, w8a8, target {args.target}", "",
             f"| model | {head} |", "|---|" + "---:|" * (3 * len(args.acts))]
    for r in rows:
        cells = [f"{r[f'{a}_fp32_ms']:.2f} | {r[f'{a}_int8_ms']:.2f} | {r[f'{a}_fp32_ms'] / r[f'{a}_int8_ms']:.2f}"
                 for a in args.acts]
        lines.append(f"| {r['model']} | {' | '.join(cells)} |")
    save_report(args.out, "activation_cost",
                {"host": host, "threads": args.threads, "target": args.target, "rows": rows},
                "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
