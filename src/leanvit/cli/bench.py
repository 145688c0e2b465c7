"""``leanvit bench``: latency of models on inference engines, side by side, with reports."""
from __future__ import annotations

import argparse
import sys

from ..bench import DEFAULT_ENGINES, DEFAULT_MODELS, BenchConfig, TimingBudget, host_info, run_bench, write_results
from ..host import usable_cpus
from . import number_in, positive_int, prepare_out_dir, print_json


def _names(values: list[str] | None) -> list[str]:
    """Accept both ``--engines a b`` and ``--engines a,b``."""
    return [v for item in values or [] for v in item.split(",") if v]


_seconds = number_in(0, 3600, "seconds")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="measure latency on inference engines (default: 5 models x eager/onnxruntime/openvino)",
        description="Measure models on inference engines, check each against PyTorch eager, and write "
                    "results.json, results.csv, report.md and pareto.png.",
    )
    p.add_argument("models", nargs="*", help=f"model names (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--engines", nargs="+", metavar="ENGINE", help=f"engines (default: {' '.join(DEFAULT_ENGINES)})")
    p.add_argument("--precision", nargs="+", default=["f32"], metavar="P", help="precisions: f32, bf16, fp16 (default f32); "
                   "an engine that does not run one skips it")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--threads", type=positive_int, default=usable_cpus(), help="CPU threads per engine (default: all usable)")
    p.add_argument("--img-size", type=positive_int, help="input resolution (default: each model's own)")
    p.add_argument("--budget", type=_seconds, default=2.0, help="seconds of timed calls per configuration (default 2)")
    p.add_argument("--warmup", type=_seconds, default=0.5, help="seconds of warm-up per configuration (default 0.5)")
    p.add_argument("--rounds", type=positive_int, default=5,
                   help="alternating rounds in which each model's configurations are timed side by side (default 5)")
    p.add_argument("--tokens", nargs="+", metavar="SPEC",
                   help="token-reduction variants measured beside each model: evit:KEEP, tome:R, diffrate:GMACS")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device for GPU-capable engines")
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (needs them cached or a network)")
    p.add_argument("--cache-dir", help="export cache (default: $LEANVIT_CACHE/exports or ~/.cache/leanvit/exports)")
    p.add_argument("--out", default="bench-out", help="output directory (default: ./bench-out)")
    p.add_argument("--json", action="store_true", help="also print the result rows as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    cfg = BenchConfig(
        models=_names(args.models) or list(DEFAULT_MODELS),
        engines=_names(args.engines) or list(DEFAULT_ENGINES),
        precisions=_names(args.precision),
        batch=args.batch, threads=args.threads, img_size=args.img_size,
        budget=TimingBudget(warmup_s=args.warmup, budget_s=args.budget), rounds=args.rounds,
        pretrained=args.pretrained, device=args.device, cache_dir=args.cache_dir, tokens=_names(args.tokens),
    )
    cfg.validate()  # a typo in a name fails before --out is created
    prepare_out_dir(args.out, "the results")
    host = host_info()  # before the run: its load average then says whether other work shares the machine
    rows = run_bench(cfg, progress=not args.no_progress)
    paths = write_results(rows, cfg, host, args.out)
    if args.json:
        print_json([r.to_dict() for r in rows])
    else:
        print(f"{'model':40} {'engine':12} {'prec':5} {'median ms':>10} {'p90':>8} {'img/s':>8}  agree")
        for r in rows:
            label = r.label
            if not r.ran:
                print(f"{label:40} {r.engine:12} {r.precision:5} {'FAILED' if r.error else 'skipped':>10}  "
                      f"{(r.error or r.skipped)[:60]}")
            else:
                flag = "  DIVERGES" if r.diverges else ""
                print(f"{label:40} {r.engine:12} {r.precision:5} {r.latency_ms_median:10.2f} "
                      f"{r.latency_ms_p90:8.2f} {r.throughput:8.1f}  {r.top1_agreement:.0%}{flag}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 1 if any(r.error for r in rows) else 0
