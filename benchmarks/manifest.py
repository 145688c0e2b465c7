"""The manifest of shipped checkpoints (``benchmarks/checkpoints.json``) that every benchmark reads, and the
options and result files the benchmarks share.

A JSON list, one entry per checkpoint (``tools/release_checkpoint.py`` writes it):

    {"name": "mobilevig_ti-cifar10", "model": "mobilevig_ti",
     "checkpoint": "../src/leanvit/assets/checkpoints/mobilevig_ti-cifar10.safetensors",
     "top1": 83.66, "tolerance": 0.1}

``checkpoint`` is relative to the manifest's folder; ``top1`` is the model card's accuracy (%) on the
full 10,000-image CIFAR-10 JPEG test split; ``tolerance`` (points, default 0.05) allows for
non-determinism across machines.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "checkpoints.json"
#: the models the PTQ issue's latency checks name, timed at 224x224 with random weights by the latency benchmarks
LATENCY_MODELS = ("efficientformer_l1", "efficientformerv2_s0", "deit_tiny_patch16_224", "mobilevig_ti")


def latency_parser(description: str, out: str, rounds: int, budget_s: float) -> argparse.ArgumentParser:
    """The options every latency benchmark takes (models, threads, alternating rounds, budget, output folder
    ``results/<out>``); each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=list(LATENCY_MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=rounds, help="the files are timed in this many alternating rounds")
    parser.add_argument("--budget-s", type=float, default=budget_s, help="timing budget per file (s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / out)
    return parser


def save_report(out: Path, stem: str, report: dict, markdown: str, plot=None) -> None:
    """Write a benchmark's results to ``out``: ``stem.json`` (``report``), ``stem.md`` (``markdown``) and, given
    ``plot`` (a function of the image's path), ``stem.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown.rstrip("\n") + "\n")
    if plot is not None:
        plot(out / f"{stem}.png")


def read_manifest(path: str | Path = DEFAULT, names=()) -> list[dict]:
    """The manifest's entries (all, or those ``names`` picks, in the manifest's order), each with its
    ``name`` filled in and ``path``, the checkpoint's absolute path. A name the manifest lacks is an error, not
    a silently shorter benchmark."""
    path = Path(path)
    entries = json.loads(path.read_text())
    for entry in entries:
        entry.setdefault("name", entry["model"])
        entry["path"] = (path.parent / entry["checkpoint"]).resolve()
    known = [e["name"] for e in entries]
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"{path} has no checkpoint named {', '.join(missing)}; it lists: "
                         f"{', '.join(known) or 'nothing'}")
    return [e for e in entries if not names or e["name"] in names]
