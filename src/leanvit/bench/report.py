"""Bench results as files: ``results.json``, ``results.csv``, ``report.md`` and ``pareto.png``."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from ..deploy.engine import REDUCED_PRECISION_RTOL
from .runner import BenchConfig, BenchRow, checked_images
from .timing import median_speedup, round_ratios

_CSV_FIELDS = [f for f in BenchRow.__dataclass_fields__ if f != "engine_info"]


def write_results(rows: Sequence[BenchRow], cfg: BenchConfig, host: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in asdict(cfg).items()}
    doc = {"created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": host, "config": config,
           "rows": [r.to_dict() for r in rows]}
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "report.md", "png": out / "pareto.png"}
    paths["json"].write_text(json.dumps(doc, indent=2, default=str))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r.to_dict() for r in rows)
    title = f"{input_sizes(rows)}, batch {cfg.batch}, {cfg.threads} threads, {cfg.device}, {host.get('cpu', '')}"
    plot_pareto(rows, paths["png"], title=title)
    paths["md"].write_text(render_markdown(rows, cfg, host, doc["created"]))
    return paths


def _fmt(v, spec: str = ".2f", none: str = "–") -> str:
    return none if v is None else format(v, spec)


def input_sizes(rows: Sequence[BenchRow]) -> str:
    """The input resolution of the run ("224x224"), or each model's where they differ (no --img-size)."""
    per_model = {r.model: r.img_size for r in rows}
    sizes = set(per_model.values())
    if len(sizes) == 1:
        return "{0}x{0}".format(*sizes)
    return ", ".join(f"{m} {s}x{s}" for m, s in per_model.items())


def host_lines(host: dict) -> list[str]:
    """The markdown bullets that describe ``host`` (:func:`~leanvit.host.host_info`) in every report."""
    versions = ", ".join(f"{k} {v}" for k, v in host.get("versions", {}).items())
    cpu_id = ", ".join(f"{k} {v}" for k, v in host.get("cpu_id", {}).items())
    return [
        f"- CPU: {host.get('cpu')} ({host.get('usable_cpus')} usable of {host.get('logical_cpus')} logical CPUs)"
        + (f"; {cpu_id}" if cpu_id else ""),
        *([f"- load average (1, 5, 15 min) at {host.get('loadavg_at', 'the time the host was recorded')}: "
           f"{', '.join(map(str, host['loadavg']))}"] if host.get("loadavg") else []),
        f"- CPU flags: {', '.join(host.get('cpu_flags', [])) or 'none of interest'}",
        *([f"- GPU: {host['gpu']}"] if host.get("gpu") else []),
        f"- OS: {host.get('os')}, Python {host.get('python')}",
        f"- Versions: {versions}",
    ]


def vs_row(base: BenchRow, row: BenchRow) -> float | None:
    """How many times faster ``row`` runs than ``base``: the median of their per-round ratios where they were timed
    in the same alternating rounds (a ratio of pooled medians mixes the machine's states), else of their medians."""
    paired = base.latency_ms_rounds and len(base.latency_ms_rounds) == len(row.latency_ms_rounds)
    ratios = round_ratios(base.latency_ms_rounds, row.latency_ms_rounds) if paired else ()
    return median_speedup(ratios, base.latency_ms_median, row.latency_ms_median)


def render_markdown(rows: Sequence[BenchRow], cfg: BenchConfig, host: dict, created: str) -> str:
    """A run's ``report.md``: host, settings, the results table, the token variants, correctness, papers' figures."""
    lines = [
        "# leanvit bench report", "",
        f"Created {created}. Every row was measured in this one run; "
        + (f"each model's configurations were timed side by side, in {cfg.rounds} alternating rounds, so that the "
           "machine's drift reached them alike." if cfg.rounds > 1 else
           "each configuration was timed in one block, one after another (--rounds 1)."), "",
        "## Host", "", *host_lines(host), "",
        "## Settings", "", *_settings_lines(rows, cfg), "",
        "## Results", "", *_results_table(rows),
    ]
    lines += _token_section(rows)
    lines += ["", "## Correctness", "", *_correctness_lines(rows)]
    paper = sorted({(r.model, r.paper_speed) for r in rows if r.paper_speed})
    if paper:
        lines += ["", "## Papers' own speed figures (their hardware, not this host)", ""]
        lines += [f"- {m}: {s}" for m, s in paper]
    lines += ["", "![latency vs published top-1](pareto.png)", ""]
    return "\n".join(lines)


def _settings_lines(rows: Sequence[BenchRow], cfg: BenchConfig) -> list[str]:
    """The run's settings, the timing protocol and what the correctness and memory columns mean."""
    on_cpu = sorted({r.engine for r in rows if cfg.device != "cpu" and r.engine_info.get("device") == "cpu"})
    on_gpu = sorted({r.engine for r in rows if cfg.device == "cpu" and r.engine_info.get("device", "cpu") != "cpu"})
    capped = sorted({f"{r.engine} {r.threads_used}" for r in rows if r.threads_used not in (None, r.threads)})
    return [
        f"- input: {input_sizes(rows)}; batch {cfg.batch}, threads {cfg.threads}, weights: {'pretrained' if cfg.pretrained else 'random init (latency does not depend on weight values)'}",
        f"- device: {cfg.device}" + (f" (CPU-only engines on the CPU: {', '.join(on_cpu)})" if on_cpu else "")
        + (f" (GPU-only engines on the GPU: {', '.join(on_gpu)})" if on_gpu else ""),
        *([f"- threads as the engine reports them, where not as asked: {', '.join(capped)}"] if capped else []),
        f"- protocol: per configuration, warm-up ≥ {cfg.budget.warmup_s} s and ≥ {cfg.budget.warmup_iters} calls, then "
        f"single calls timed for {cfg.budget.budget_s} s in all (≥ {cfg.budget.min_iters}, ≤ {cfg.budget.max_iters} "
        f"calls)" + (f", spread over {cfg.rounds} rounds that alternate the model's configurations (as many calls in "
                     "each round, a shorter warm-up before each); statistics over the *calls* timed (a p99 of fewer than 100 "
                     "is near their slowest); *vs eager* is the median over "
                     "the rounds of eager's latency over the row's, both timed in that round" if cfg.rounds > 1 else
                     "; statistics over the *calls* timed (a p99 of fewer than 100 is near their slowest); *vs eager* "
                     "is eager's median latency over the row's"),
        f"- correctness: each engine's logits against PyTorch eager on {checked_images(cfg)} random images",
        "- memory: each model's engines are loaded together; before each one's warm-up calls, run on its own ahead of "
        "the timed rounds, Python's garbage is collected and freed memory handed back to the OS (glibc's "
        "malloc_trim, where the C library is glibc), and the resident set then is the row's baseline; *RSS growth* "
        "is the resident-set high-water mark during those calls minus that baseline: what running the engine takes "
        "(activations, workspaces), not its loaded weights, the model or the export; *peak RSS* is that high-water "
        "mark itself, process-wide: it also holds the Python process, the model, all of its loaded engines and "
        "whatever the exports and earlier rows left that could not be handed back, so it depends on what ran before",
    ]


def _results_table(rows: Sequence[BenchRow]) -> list[str]:
    """One line per row: its latency statistics, speed against eager f32, size, accuracy check and memory."""
    eager = {(r.model, r.variant, r.batch): r for r in rows if r.engine == "eager" and r.precision == "f32" and r.ran}
    lines = [
        "| model | engine | precision | median ms | p90 | p99 | IQR | calls | vs eager | img/s | params M | GMACs | published top-1 | max abs err | top-1 agree | RSS growth MiB | peak RSS MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = r.label
        if not r.ran:
            lines.append(f"| {label} | {r.engine} | {r.precision} | **{'failed' if r.error else 'skipped'}** "
                         "| | | | | | | | | | | | | |")
            continue
        base = eager.get((r.model, r.variant, r.batch))
        speedup = vs_row(base, r) if base is not None else None
        ratio = f"{speedup:.2f}×" if speedup else "–"
        flag = " ⚠" if r.diverges else ""
        lines.append(
            f"| {label} | {r.engine} | {r.precision} | {_fmt(r.latency_ms_median)} | {_fmt(r.latency_ms_p90)} | "
            f"{_fmt(r.latency_ms_p99)} | {_fmt(r.latency_ms_iqr)} | {r.iterations} | {ratio} | {_fmt(r.throughput, '.1f')} | "
            f"{_fmt(r.params and r.params / 1e6)} | {_fmt(r.macs and r.macs / 1e9, '.3f')} | {_fmt(r.published_top1, '.1f')} | "
            f"{_fmt(r.max_abs_err, '.2e')}{flag} | {_fmt(r.top1_agreement, '.0%')} | "
            f"{_fmt(r.peak_rss_above_baseline_mb, '.0f')} | {_fmt(r.peak_rss_mb, '.0f')} |"
        )
    return lines


def _correctness_lines(rows: Sequence[BenchRow]) -> list[str]:
    """Which engines diverge from eager (or that all agree), then the failed and the skipped configurations."""
    lines = []
    bad = [r for r in rows if r.diverges]
    failed = [r for r in rows if r.error]
    skipped = [r for r in rows if r.skipped]
    checked = sum(r.ran for r in rows)
    if bad:
        lines += ["**Engines that diverge from eager (⚠):**", ""]
        lines += [f"- {r.label} on {r.engine} ({r.precision}): top-1 agreement {r.top1_agreement:.1%}, "
                  f"max abs err {r.max_abs_err:.3g}" for r in bad]
    elif checked:
        lines.append(f"Every engine agrees with eager in the {checked} configurations that ran (f32: 100 % top-1 "
                     "agreement, max abs error ≤ 1e-3 relative; bf16/fp16: max abs error ≤ "
                     f"{REDUCED_PRECISION_RTOL * 100:g} % of the largest logit)"
                     + ("; the failed ones are listed below." if failed else "."))
    else:
        lines.append("No configuration ran, so none was checked against eager: see the failures below.")
    if failed:
        lines += ["", "## Failed configurations", ""]
        lines += [f"- {r.label} on {r.engine} ({r.precision}): `{r.error}`" for r in failed]
    if skipped:
        lines += ["", "## Skipped configurations", ""]
        lines += [f"- {r.label} on {r.engine} ({r.precision}): {r.skipped}" for r in skipped]
    return lines


def _token_section(rows: Sequence[BenchRow]) -> list[str]:
    """Each token-reduced variant against its unreduced model on the same engine and precision, timed in the same
    alternating rounds: the latency cut and speed-up from the median of their per-round ratios (:func:`vs_row`)."""
    base = {(r.model, r.engine, r.precision, r.batch): r for r in rows if not r.variant and r.ran}
    pairs = [(r, base.get((r.model, r.engine, r.precision, r.batch))) for r in rows if r.variant and r.ran]
    pairs = [(r, b) for r, b in pairs if b is not None]
    if not pairs:
        return []
    lines = ["", "## Token reduction against the unreduced model", "",
             "| model | variant | engine | precision | GMACs | MACs cut | median ms | latency cut | speed-up |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r, b in pairs:
        speedup = vs_row(b, r)
        lines.append(
            f"| {r.model} | {r.variant} | {r.engine} | {r.precision} | {r.macs / 1e9:.3f} | "
            f"{1 - r.macs / b.macs:.1%} | {r.latency_ms_median:.2f} | {1 - 1 / speedup:.1%} | {speedup:.2f}× |"
        )
    return lines


def plot_pareto(rows: Sequence[BenchRow], path: Path, title: str = "") -> None:
    """Measured median latency (log x) against published top-1, one point per model x engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # rows carry a published top-1 only where it describes them (runner.published_top1)
    pts = [r for r in rows if r.latency_ms_median and r.published_top1 is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    markers = "osD^v<>p*h"
    for i, engine in enumerate(sorted({(r.engine, r.precision) for r in pts})):
        sel = [r for r in pts if (r.engine, r.precision) == engine]
        ax.scatter([r.latency_ms_median for r in sel], [r.published_top1 for r in sel],
                   marker=markers[i % len(markers)], s=46, label=f"{engine[0]} {engine[1]}", alpha=0.85)
    for model in sorted({r.model for r in pts}):
        fastest = min((r for r in pts if r.model == model), key=lambda r: r.latency_ms_median)
        ax.annotate(model, (fastest.latency_ms_median, fastest.published_top1), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    front, best = [], -1.0
    for r in sorted(pts, key=lambda r: r.latency_ms_median):
        if r.published_top1 > best:
            front.append(r)
            best = r.published_top1
    if len(front) > 1:  # (one point is no front)
        ax.step([r.latency_ms_median for r in front], [r.published_top1 for r in front], where="post",
                color="gray", lw=1, ls="--", label="Pareto front")
    if pts:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("measured median latency (ms, log scale)")
    ax.set_ylabel("published ImageNet-1k top-1 (%)")
    ax.set_title(f"latency vs accuracy — {title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no model with a published top-1 in this run", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
