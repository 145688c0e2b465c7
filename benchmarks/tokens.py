"""EViT, ToMe and DiffRate at matched MACs: MACs, engine latency and (with a checkpoint) accuracy.

EViT (keep rate 0.7 by default) sets the budget. ToMe gets the constant ``r`` whose counted MACs are
closest to EViT's. DiffRate gets EViT's MACs as its target: its rates are searched on ``--calib``
when given; otherwise the published DeiT rates nearest in counted MACs are used when the model is an
official DeiT; otherwise the search runs on random images labelled by the model itself, which fixes
the MACs and latency but says nothing about accuracy.

Every variant is exported for each engine and batch size and checked against eager PyTorch
(top-1 agreement, on the evaluation images when given); then, per engine and batch size, all
variants are timed side by side in alternating rounds (``leanvit.bench.time_alternating``), so
that the machine's drift hits them alike. ``--eval`` adds the top-1 of each variant
(no fine-tuning) and a plot of accuracy against measured latency. The papers' numbers sit next to
ours in the report, but they hold for the official ImageNet weights only.

    python benchmarks/tokens.py --out benchmarks/results/tokens
    python benchmarks/tokens.py --model deit_small_patch16_224 --checkpoint runs/deit_s_cifar10 \\
        --eval DATA --calib DATA --sweep --out benchmarks/results/tokens-cifar10

Writes ``tokens.json``, ``tokens.md`` and ``tokens.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import leanvit.tokens as tokens
from leanvit.bench import TimingBudget, host_info, time_alternating
from leanvit.host import usable_cpus
from leanvit.checkpoint import model_from_checkpoint
from leanvit.data import (
    DecodedDataset, build_transform, calibration_subset, make_loader, open_dataset, resolve_data_config,
)
from leanvit.compress.tokens.diffrate import PUBLISHED_RATES
from leanvit.compress.tokens.patch import model_tokens
from leanvit.deploy import check_agreement, get_engine
from leanvit.errors import LeanvitError
from leanvit.evaluate import evaluate
from leanvit.models.registry import create_model
from leanvit.profile import count_macs
from manifest import save_report

#: The papers' DeiT-S (ImageNet-1k) numbers, from ../shared/specs (EViT README, ToMe README,
#: DiffRate README and compression_rate.json). Throughput is on the papers' GPUs, not comparable to ours.
PAPER = {
    "baseline": {"gmacs": 4.6, "top1": 79.9, "note": "DeiT-S (EViT README baseline)"},
    "evit": {"gmacs": 3.0, "top1": 79.5,
             "note": "EViT-DeiT-S keep 0.7 + fusion, trained with EViT; 4,385 img/s, GPU not named"},
    "tome": {"gmacs": None, "top1": 79.36, "note": "DeiT-S r=13 trained with ToMe; 930 -> 1,550 img/s on V100"},
    "diffrate": {"gmacs": 2.9, "top1": 79.54, "note": "DiffRate DeiT-S 2.9G, off-the-shelf (no fine-tuning)"},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON kwargs for timm.create_model")
    p.add_argument("--checkpoint", help="weights (a `leanvit train` folder or file); random weights otherwise")
    p.add_argument("--keep-rate", type=float, default=0.7, help="EViT keep rate that sets the MAC budget")
    p.add_argument("--sweep", action="store_true", help="keep rates 0.9, 0.7 and 0.5 (and matched ToMe/DiffRate)")
    p.add_argument("--keep-rates", nargs="+", type=float,
                   help="EViT keep rates, each with ToMe and DiffRate matched to its MACs (overrides --sweep)")
    p.add_argument("--tome-r", nargs="+", default=[],
                   help="extra ToMe variants: R (every block), RxK (R in the first K blocks, e.g. 1x6) or one "
                        "count per block (e.g. 0,2,2,1)")
    p.add_argument("--engines", nargs="+", default=["openvino", "onnxruntime"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all usable CPUs)")
    p.add_argument("--budget-s", type=float, default=3.0, help="timing budget per variant, engine and batch size")
    p.add_argument("--rounds", type=int, default=5,
                   help="the variants are timed side by side in this many alternating rounds")
    p.add_argument("--eval", help="dataset for top-1 (any layout `leanvit eval` reads, e.g. cifar10-test500)")
    p.add_argument("--eval-images", type=int, help="class-balanced subset of the eval data")
    p.add_argument("--agreement-images", type=int, default=1024,
                   help="evaluation images each export is compared with eager PyTorch on (with --eval)")
    p.add_argument("--calib", help="dataset whose training split DiffRate's rates are searched on")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--steps", type=int, default=300, help="DiffRate search steps")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or usable_cpus()
    torch.set_num_threads(threads)
    if args.checkpoint:
        base, meta = model_from_checkpoint(args.model, args.checkpoint, **args.model_kwargs)
    else:
        base, meta = create_model(args.model, **args.model_kwargs), {}
    base.eval()
    input_size = (base.patch_embed.proj.in_channels, *base.patch_embed.img_size)
    data_config = resolve_data_config(base, img_size=input_size[-1], saved=meta.get("data_config"))
    transform = build_transform(data_config)

    eval_loader = eval_images = None
    if args.eval:
        data = open_dataset(args.eval, transform=transform)
        if args.eval_images and args.eval_images < len(data):
            data = calibration_subset(data, args.eval_images)
        data = DecodedDataset(data)  # decoded once, scored for every variant
        eval_loader, eval_images = make_loader(data, 64), data.tensors[0]
    calib = None
    if args.calib:
        data = open_dataset(args.calib, train=True, transform=transform)
        subset = calibration_subset(data, min(args.calib_images, len(data)))
        calib = [b for b in make_loader(subset, 32) if b is not None]

    variants = plan_variants(base, input_size, args, calib)
    budget = TimingBudget(warmup_s=1.0, budget_s=args.budget_s, min_iters=10)
    rows, timed = [], {}  # timed: "engine/bN" -> {variant: call}
    for label, method in variants:
        model = copy.deepcopy(base) if method is None else tokens.apply(copy.deepcopy(base), method)
        row = {"variant": label, "method": "baseline" if method is None else type(method).__name__.lower(),
               "config": repr(tokens.applied(model)) if method is not None else "",
               "tokens_per_block": tokens.token_counts(model) if method is not None else None,
               "macs": count_macs(model, input_size), "latency_ms": {}, "agreement": {}}
        for engine_name in args.engines:
            engine = get_engine(engine_name, threads=threads)
            for batch in args.batches:
                x = torch.randn(batch, *input_size)
                runner = engine.load(model, x)  # the export key includes the token method (model repr)
                with torch.inference_mode():
                    agr = check_agreement(model, runner, agreement_inputs(eval_images, x, args.agreement_images))
                key = f"{engine_name}/b{batch}"
                timed.setdefault(key, {})[label] = lambda r=runner, x_np=x.numpy(): r(x_np)
                row["agreement"][key] = {"top1": agr.top1_agreement, "max_abs_err": agr.max_abs_err, "images": agr.n}
        if eval_loader is not None:
            row["top1"] = evaluate(model, eval_loader, device="cpu", progress=False).top1
        print(f"{label:28} exported; top-1 agreement {min(a['top1'] for a in row['agreement'].values()):.3f}"
              + (f", top-1 {row['top1']:.2f} %" if "top1" in row else ""), file=sys.stderr)
        rows.append(row)
    for key, calls in timed.items():  # all variants side by side, in alternating rounds
        by_label = {row["variant"]: row for row in rows}
        for label, timing in time_alternating(calls, budget, rounds=args.rounds).items():
            by_label[label]["latency_ms"][key] = round(timing.median, 3)
            print(f"{label:28} {key:18} {timing.median:9.2f} ms", file=sys.stderr)

    report = {"model": args.model, "checkpoint": args.checkpoint, "input_size": list(input_size),
              "threads": threads, "engines": args.engines, "batches": args.batches, "eval": args.eval,
              "host": host_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "rows": rows, "rounds": args.rounds,
              "checks": checks(rows, spec_setting=args.model == "deit_small_patch16_224" and input_size[-1] == 224),
              "paper": PAPER}
    save_report(args.out, "tokens", report, markdown(report), lambda path: plot(rows, path))
    print(f"wrote {args.out / 'tokens.md'}, tokens.json, tokens.png", file=sys.stderr)
    return 0


def agreement_inputs(images: torch.Tensor | None, like: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Batches shaped like ``like`` for the export check: the first ``count`` evaluation images
    when there are any (a trained model's agreement on real images is what matters), else two
    random batches."""
    if images is None or len(images) < like.shape[0]:
        return [like, torch.randn_like(like)]
    batch = like.shape[0]
    usable = min(count, len(images)) // batch * batch
    return list(images[:max(usable, batch)].split(batch))


def plan_variants(base, input_size, args, calib) -> list[tuple[str, tokens.TokenMethod | None]]:
    """Baseline, then EViT at each keep rate with ToMe and DiffRate matched to its MACs."""
    variants = [("baseline", None)]
    unreduced = count_macs(base, input_size)
    for keep_rate in args.keep_rates or ([0.9, args.keep_rate, 0.5] if args.sweep else [args.keep_rate]):
        evit = tokens.EViT(keep_rate=keep_rate)
        target = count_macs(tokens.apply(copy.deepcopy(base), evit), input_size)
        variants += [(f"evit keep={keep_rate}", evit),
                     (f"tome matched to {keep_rate}", matched_tome(base, input_size, target))]
        if target < 0.99 * unreduced:
            variants.append((f"diffrate matched to {keep_rate}",
                             matched_diffrate(base, input_size, target, calib, args)))
        else:  # too few tokens for this keep rate to remove any: nothing for DiffRate to match
            print(f"DiffRate: EViT keep={keep_rate} removes {cut(unreduced, target)} % of the MACs; no DiffRate "
                  "variant at that budget", file=sys.stderr)
    variants += [(f"tome r={text}", tokens.ToMe(r=tokens.parse_r(text))) for text in args.tome_r]
    unique, seen = [], set()
    for label, method in variants:  # with few tokens, several budgets can match the same ToMe r
        if repr(method) in seen:
            print(f"{label}: same configuration as an earlier variant ({method!r}); measured once", file=sys.stderr)
            continue
        seen.add(repr(method))
        unique.append((label, method))
    return unique


def matched_tome(base, input_size, target: int) -> tokens.ToMe:
    best = None
    for r in range(1, base.patch_embed.num_patches):
        try:
            macs = count_macs(tokens.apply(copy.deepcopy(base), tokens.ToMe(r=r)), input_size)
        except LeanvitError:  # r past the largest every block can merge
            break
        if best is None or abs(macs - target) < best[0]:
            best = (abs(macs - target), r)
    return tokens.ToMe(r=best[1])


def matched_diffrate(base, input_size, target: int, calib, args) -> tokens.DiffRate:
    if calib is not None:
        return tokens.DiffRate(target_macs=target, calib=calib, steps=args.steps)
    arch = base.pretrained_cfg.get("architecture")
    published = [tokens.DiffRate.published(a, g) for a, g in PUBLISHED_RATES if a == arch]
    if published and model_tokens(base) == published[0].prune[0]:
        return min(published, key=lambda m: abs(count_macs(tokens.apply(copy.deepcopy(base), m), input_size) - target))
    print("DiffRate: no calibration data and no published rates: searching on random images "
          "(matches MACs and latency, not accuracy)", file=sys.stderr)
    torch.manual_seed(0)
    images = torch.randn(64, *input_size)
    return tokens.DiffRate(target_macs=target, calib=images, steps=args.steps)


#: "~1.3x" in the ToMe check: a measured speed-up within this much of 1.3x.
TOME_SPEEDUP_TOLERANCE = 0.05


def checks(rows: list[dict], spec_setting: bool) -> list[dict]:
    """The issue's acceptance criteria: EViT keep 0.7 against the baseline (stated for DeiT-S at 224,
    ``spec_setting``); with accuracy, ToMe at ~1.3x OpenVINO batch-32 speed-up loses at most 1 point:
    of the ToMe variants measured within 1.3 ± ``TOME_SPEEDUP_TOLERANCE``x, the most accurate, as a
    user choosing r for that speed-up would pick it (the nearest-to-1.3x one would be picked by timing
    noise; every variant stays in the table)."""
    base = rows[0]
    found = []
    b32 = "openvino/b32"
    tome = [r for r in rows[1:] if r["method"] == "tome" and "top1" in r and b32 in r["latency_ms"]]
    if tome and "top1" in base and b32 in base["latency_ms"]:
        speedups = {r["variant"]: base["latency_ms"][b32] / r["latency_ms"][b32] for r in tome}
        near = [r for r in tome if abs(speedups[r["variant"]] - 1.3) <= TOME_SPEEDUP_TOLERANCE]
        if not near:
            found.append({"check": f"a ToMe variant is 1.3 ± {TOME_SPEEDUP_TOLERANCE}x faster on {b32} (measured: "
                                   + ", ".join(f"{v} {x:.2f}x" for v, x in speedups.items())
                                   + "); try other --tome-r values", "value_pt": None, "pass": False})
        else:
            row = max(near, key=lambda r: r["top1"])
            drop = base["top1"] - row["top1"]
            found.append({"check": f"ToMe at ~1.3x {b32} speed-up (most accurate of {len(near)} variants within "
                                   f"1.3 ± {TOME_SPEEDUP_TOLERANCE}x: {row['variant']}, "
                                   f"{speedups[row['variant']]:.2f}x) loses <= 1 pt",
                          "value_pt": round(drop, 2), "pass": drop <= 1.0})
    for row in rows:
        if row["variant"] != "evit keep=0.7" or not spec_setting:
            continue
        found.append({"check": "EViT 0.7 cuts MACs >= 30 %", "value_pct": cut(base["macs"], row["macs"]),
                      "pass": cut(base["macs"], row["macs"]) >= 30})
        for key, ms in row["latency_ms"].items():
            if key.startswith("openvino/"):
                pct = cut(base["latency_ms"][key], ms)
                found.append({"check": f"EViT 0.7 cuts {key} latency >= 25 %", "value_pct": pct, "pass": pct >= 25})
    return found


def cut(before: float, after: float) -> float:
    return round(100.0 * (1 - after / before), 1)


def markdown(report: dict) -> str:
    rows, keys = report["rows"], list(report["rows"][0]["latency_ms"])
    base = rows[0]
    has_acc = "top1" in base
    lines = [
        f"# Token reduction on {report['model']} @ {report['input_size'][-1]}",
        "",
        f"Weights: {report['checkpoint'] or 'random (latency and MACs only)'}. Threads: {report['threads']}. "
        f"CPU: {report['host'].get('cpu')}. {report['created']}.",
        "MACs: leanvit.profile.count_macs (batch 1). Latency: median ms per call (change against the "
        f"baseline), all variants timed in alternating rounds. Lowest top-1 agreement of an export with "
        f"eager PyTorch: "
        f"{min(a['top1'] for r in rows for a in r['agreement'].values()):.3f} "
        f"(on {min(a['images'] for r in rows for a in r['agreement'].values())} "
        f"{'evaluation' if report['eval'] else 'random'} images per export and batch size).",
        "",
        "| variant | GMACs | MACs cut | " + " | ".join(f"{k} ms" for k in keys)
        + (" | top-1 | " if has_acc else " | ") + "tokens after each block |",
        "|---|---|---|" + "---|" * len(keys) + ("---|" if has_acc else "") + "---|",
    ]
    for row in rows:
        lat = " | ".join(f"{row['latency_ms'][k]:.2f} ({-cut(base['latency_ms'][k], row['latency_ms'][k]):+.1f} %)"
                         if row is not base else f"{row['latency_ms'][k]:.2f}" for k in keys)
        acc = f" | {row['top1']:.2f}" if has_acc else ""
        counts = " ".join(map(str, row["tokens_per_block"])) if row["tokens_per_block"] else "all"
        lines.append(f"| {row['variant']} | {row['macs'] / 1e9:.3f} | {cut(base['macs'], row['macs']):.1f} % "
                     f"| {lat}{acc} | {counts} |")
    lines += ["", "## Acceptance checks", ""]
    lines += [f"- {'PASS' if c['pass'] else 'FAIL'}: {c['check']} (measured {c['value_pct']} %)" if "value_pct" in c
              else f"- {'PASS' if c['pass'] else 'FAIL'}: {c['check']}"
              + (f" (measured {c['value_pt']} pt)" if c["value_pt"] is not None else "")
              for c in report["checks"]]
    lines += ["", "## The papers' numbers (DeiT-S, ImageNet-1k, official weights)", "",
              "| method | GMACs | top-1 | note |", "|---|---|---|---|"]
    for name, p in report["paper"].items():
        lines.append(f"| {name} | {p['gmacs'] or '–'} | {p['top1']} | {p['note']} |")
    lines += ["", "Configurations:", ""] + [f"- {r['variant']}: `{r['config'] or 'unreduced'}`" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Latency against GMACs, and top-1 against latency when measured, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next(iter(rows[0]["latency_ms"]))
    has_acc = "top1" in rows[0]
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4.2), squeeze=False)
    colours = {"baseline": "black", "evit": "tab:blue", "tome": "tab:orange", "diffrate": "tab:green"}
    for method, colour in colours.items():
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        lat = np.array([r["latency_ms"][key] for r in mine])
        axes[0, 0].scatter([r["macs"] / 1e9 for r in mine], lat, color=colour, label=method)
        if has_acc:
            axes[0, 1].scatter(lat, [r["top1"] for r in mine], color=colour, label=method)
    axes[0, 0].set(xlabel="GMACs", ylabel=f"{key} latency, ms", title="MACs vs measured latency")
    if has_acc:
        axes[0, 1].set(xlabel=f"{key} latency, ms", ylabel="top-1 %", title="accuracy (no fine-tuning) vs latency")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
