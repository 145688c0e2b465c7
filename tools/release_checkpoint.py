"""Ship a finished ``leanvit train`` run as one of the project's checkpoints, with its model card.

    python tools/release_checkpoint.py RUN --name deit_tiny-cifar10 [--data ~/.cache/leanvit/cifar10/test]

Writes ``src/leanvit/assets/checkpoints/NAME.safetensors`` (the run's EMA weights when it kept an EMA,
else, or with ``--weights final``, its final weights, stored in half precision so each file stays under 20 MB) and ``NAME.md``, the
model card: the exact training command, epochs, wall time and hardware read from the run's own
log, and the top-1/top-5 of the *shipped file* measured here on the full test split. The card's
entry in ``benchmarks/checkpoints.json`` is added or replaced, so ``benchmarks/eval_checkpoints.py``
re-checks it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path


from leanvit.checkpoint import (SHIPPED_DIR, WEIGHTS_FILE, checkpoint_sha256, model_from_checkpoint, read_checkpoint,
                                read_metadata, save_weights)
from leanvit.data import build_transform, make_loader, open_dataset
from leanvit.errors import LeanvitError
from leanvit.evaluate import evaluate
from leanvit.train import TrainConfig
from leanvit.train.state import EMA_FILE, latest_checkpoint, read_state

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "benchmarks" / "checkpoints.json"
FULL_TEST_SPLIT = 10_000
MAX_BYTES = 20 * 2**20
TOLERANCE = 0.1  # points: what benchmarks/eval_checkpoints.py allows between the card and a re-run


def training_command(config: dict) -> str:
    """The ``leanvit train`` command line that gives ``config`` (only the flags that differ from the defaults)."""
    parts = ["leanvit train", config["model"]]
    config = {**TrainConfig.EARLIER_VALUES, **config}  # a field newer than the run: it ran with its earlier value,
    for f in fields(TrainConfig):
        if f.name == "model" or f.name not in config:  # or with the default
            continue
        value, flag = config.get(f.name), "--" + f.name.replace("_", "-")
        default = f.default_factory() if callable(f.default_factory) else f.default
        if value == default:
            continue
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, dict):
            parts.append(f"{flag} '{json.dumps(value)}'")
        else:
            parts.append(f"{flag} {value if value is not None else 'none'}")
    return " ".join(parts)


def portable(text: str, runs: Path) -> str:
    """``text`` without this machine's absolute paths: the folder holding the run folders written ``runs/``, the
    home folder ``~/``, so a card's commands read the same wherever they ran."""
    return text.replace(f"{runs.resolve()}/", "runs/").replace(f"{Path.home()}/", "~/")


def provenance(config: dict, inputs: dict | None = None) -> str:
    """How the weights came about: from scratch, or from ``--init-checkpoint``, with any teacher; each weights
    file named with the sha256 the run recorded (``inputs``), since a shipped name may later mean other weights."""
    def weights(key: str) -> str:
        sha = (inputs or {}).get(key, {}).get("sha256")
        return f"`{config[key]}`" + (f" (sha256 `{sha[:16]}…`)" if sha else "")

    how = f"fine-tuned from {weights('init_checkpoint')}" if config.get("init_checkpoint") else "trained from scratch"
    if config.get("teacher"):
        mode = config.get("distill", "hard")
        params = f"alpha {config.get('distill_alpha')}" + (f", temperature {config.get('distill_tau')}"
                                                          if mode == "soft" else "")
        how += (f" with DeiT {mode} distillation ({params}) from `{config['teacher']}` (weights "
                + (weights("teacher_checkpoint") if config.get("teacher_checkpoint") else "`timm pretrained`") + ")")
    return f"`{config['model']}` {how} on CIFAR-10 by `leanvit train`"


def training_time(log: list[dict]) -> tuple[float, list[str]]:
    """Training seconds summed over a run's epoch log, and the hardware it names."""
    return sum(e.get("seconds", 0.0) for e in log), sorted({e["hardware"] for e in log if "hardware" in e})


def resume_changes(state: dict, note: str = "") -> str:
    """What a run's resumes changed (recorded by ``leanvit train --resume`` in ``changes``), plus ``note``
    for what the state does not hold (runs from before the record existed): '' when nothing changed."""
    said = [f"from epoch {c['epoch']}, " + ", ".join(f"`{k}` {old!r} → {new!r}" for k, (old, new)
                                                    in c["changes"].items())
            for c in state.get("changes", [])]
    return "; ".join(said + ([note.rstrip(".")] if note else []))


def run_record(weights: str) -> dict | None:
    """The training record (config, epoch log, resume changes, input hashes) of the run that wrote ``weights``:
    its run folder's state while the folder exists, else the record a released checkpoint carries in its
    metadata, so a stage shipped in one session can be built on after its run folder is gone."""
    run = Path(weights).expanduser().parent
    last = latest_checkpoint(run) if run.is_dir() else None
    if last is not None:
        return read_state(last)
    try:
        return read_metadata(weights).get("run")
    except LeanvitError as e:  # the card then ends its list of stages here, and says so on the console
        print(f"release_checkpoint: warning: no training record of {weights}, so the card lists no stage "
              f"before it: {e}", file=sys.stderr)
        return None


def earlier_stages(config: dict) -> tuple[list[str], float]:
    """The card section for the runs that made ``--init-checkpoint``, followed back as long as each
    initial checkpoint has a training record (:func:`run_record`), oldest first, so every command
    is on the card; and those runs' training seconds."""
    chain = []  # (init checkpoint, state of the run that wrote it), oldest first
    init = config.get("init_checkpoint")
    while init and init not in (path for path, _ in chain):  # a run is never its own ancestor
        state = run_record(init)
        if state is None:
            break
        chain.insert(0, (init, state))
        init = state["config"].get("init_checkpoint")
    if not chain:
        return [], 0.0
    lines, seconds = ["## Earlier stages" if len(chain) > 1 else "## Earlier stage", ""], 0.0
    for i, (init, state) in enumerate(chain, 1):
        log = state["epochs"]
        run_seconds, hardware = training_time(log)
        seconds += run_seconds
        if len(chain) > 1:
            lines += [f"### Stage {i} of {len(chain) + 1}", ""]
        where = f"`{Path(init).parent.name}/{Path(init).name}`" if Path(init).parent.name else f"`{init}`"
        lines += [
            (f"The initial weights (`--init-checkpoint`, {where}) come" if len(chain) == 1 else
             f"The initial weights of stage {i + 1} ({where}) come") + f" from this run: {len(log)} epochs, "
            f"{run_seconds / 3600:.2f} h of training on {'; '.join(hardware) or 'hardware not logged'}, "
            f"last epoch test500 top-1 {log[-1].get('top1', float('nan')):.1f} % "
            f"(EMA {log[-1].get('ema_top1', float('nan')):.1f} %)."
            + (f" Settings changed on a resume: {changed}." if (changed := resume_changes(state)) else ""), "",
            "```", training_command(state["config"]), "```", "",
        ]
    return lines, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the --output folder of a finished leanvit train run")
    ap.add_argument("--name", required=True, help="checkpoint name, e.g. deit_tiny-cifar10")
    ap.add_argument("--data", type=Path, default=Path("~/.cache/leanvit/cifar10/test").expanduser(),
                    help="the full CIFAR-10 JPEG test split (../shared/data/cifar10-jpeg.tar.gz, extracted)")
    ap.add_argument("--notes", default="", help="a paragraph for the card: the resolution/stem adaptation and why")
    ap.add_argument("--resume-note", default="",
                    help="a setting changed on a resume that the run's state does not record (runs from before "
                         "leanvit train recorded them): the card then says so instead of claiming the resumed "
                         "run equals an uninterrupted one")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--weights", choices=("ema", "final"), default="ema",
                    help="ship the EMA weights (default, when the run kept an EMA) or the final weights, "
                         "e.g. when a slow EMA still lags at the end of a short schedule (say why in --notes)")
    args = ap.parse_args(argv)
    try:
        return release(args)
    except LeanvitError as e:  # a wrong --data, an unreadable run: one line, and the shipped files are as they were
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        staged(args.name).unlink(missing_ok=True)  # moved into place on success; a failure's leftover


def staged(name: str) -> Path:
    """Where the weights are written and evaluated before they replace the shipped file (not ``*.safetensors``:
    never listed as a shipped checkpoint)."""
    return SHIPPED_DIR / f".{name}.safetensors.tmp"


def release(args: argparse.Namespace) -> int:
    """Check the data, evaluate the weights as they will be shipped, and only then replace the shipped file, its
    card and its manifest entry, so that a failure leaves the previous release (weights and the top-1 its card and
    the manifest claim) as it was."""
    last = latest_checkpoint(args.run)
    use_ema = args.weights == "ema" and (args.run / EMA_FILE).is_file()
    weights = args.run / (EMA_FILE if use_ema else WEIGHTS_FILE)
    if last is None or not weights.is_file():
        print(f"error: {args.run} holds no finished run (no {WEIGHTS_FILE}); finish it with --resume first.",
              file=sys.stderr)
        return 2
    state = read_state(last)
    config, log = state["config"], state["epochs"]
    if len(log) != config["epochs"]:
        print(f"error: {args.run} logged {len(log)} of {config['epochs']} epochs.", file=sys.stderr)
        return 2

    tensors, meta = read_checkpoint(weights)
    dataset = open_dataset(args.data, transform=build_transform(meta["data_config"]))
    if len(dataset) != FULL_TEST_SPLIT:
        print(f"error: {args.data} has {len(dataset)} images, not the full {FULL_TEST_SPLIT}-image test split.",
              file=sys.stderr)
        return 2
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    path, draft = SHIPPED_DIR / f"{args.name}.safetensors", staged(args.name)
    record = {k: state[k] for k in ("config", "epochs", "step", "changes", "inputs") if k in state}
    save_weights(draft, half, {**meta, "source": f"{weights.name} of {config['epochs']} epochs, stored as float16",
                               "run": record})
    size = draft.stat().st_size
    if size > MAX_BYTES:
        print(f"error: {path.name} would be {size / 2**20:.1f} MB, over the 20 MB limit.", file=sys.stderr)
        return 2

    model, meta = model_from_checkpoint(config["model"], draft)
    result = evaluate(model, make_loader(dataset, args.batch_size))

    seconds, hardware = training_time(log)
    untimed = sum("seconds" not in e for e in log)
    sha = checkpoint_sha256(draft)
    input_size = meta["data_config"]["input_size"]
    stage, stage_seconds = earlier_stages(config)
    card = "\n".join([
        f"# {args.name}", "",
        f"{provenance(config, state.get('inputs'))}; "
        f"{sum(t.numel() for t in tensors.values() if t.is_floating_point()) / 1e6:.2f} M parameters and buffers.", "",
        "| | |", "|---|---|",
        f"| test top-1 (full 10,000-image JPEG test split, this file) | **{result.top1:.2f} %** |",
        f"| test top-5 | {result.top5:.2f} % |",
        f"| input | {input_size[1]}×{input_size[2]}, mean {meta['data_config']['mean']}, "
        f"std {meta['data_config']['std']}, crop_pct {meta['data_config']['crop_pct']} |",
        f"| model kwargs | `{json.dumps(meta['model_kwargs'])}` |",
        f"| weights | {'EMA' if use_ema else 'final'} weights after epoch {len(log)}, float16 safetensors, "
        f"{size / 2**20:.1f} MB, sha256 `{sha[:16]}…` |",
        f"| epochs | {len(log)} ({state['step']} steps of {config['batch_size']} images) |",
        f"| wall time | {seconds / 3600:.2f} h of training (evaluation excluded)"
        + (f"; {untimed} epochs untimed" if untimed else "")
        + (f"; {(seconds + stage_seconds) / 3600:.2f} h with the earlier stages" if stage else "") + " |",
        f"| hardware | {'; '.join(hardware) or 'not logged'} |",
        f"| final training loss | {log[-1]['loss']:.4f} |", "",
        "## Adaptation", "", args.notes or "-", "",
        "## Command", "",
        "Data: the CIFAR-10 JPEG train split (`../shared/data/cifar10-jpeg.tar.gz`, extracted to "
        "`~/.cache/leanvit/cifar10`); `runs/` is the folder holding the run folders. Checkpoints were written "
        "every epoch; the run resumed with "
        "`--resume` after each interruption, "
        + (f"and settings changed on a resume: {changed}. The command below is the final configuration."
           if (changed := resume_changes(state, args.resume_note))
           else "which repeats exactly what an uninterrupted run computes."), "",
        "```", training_command(config), "```", "",
        *stage,
        "## Reproduce the accuracy", "",
        "```",
        f"leanvit eval {config['model']} --checkpoint {args.name} --data ~/.cache/leanvit/cifar10/test",
        "python benchmarks/eval_checkpoints.py",
        "```", "",
        "## Per-epoch log", "",
        "| epoch | loss | test500 top-1 | EMA test500 top-1 | seconds |", "|---:|---:|---:|---:|---:|",
        *(f"| {e['epoch']} | {e['loss']:.4f} | {e.get('top1', float('nan')):.1f} | "
          f"{e.get('ema_top1', float('nan')):.1f} | {e.get('seconds', float('nan')):.0f} |" for e in log), "",
    ])
    os.replace(draft, path)  # evaluated: it replaces the shipped file, and the card and manifest follow
    path.with_suffix(".md").write_text(portable(card, args.run.parent))

    entries = [e for e in json.loads(MANIFEST.read_text()) if e.get("name") != args.name]
    entries.append({"name": args.name, "model": config["model"],
                    "checkpoint": os.path.relpath(path, MANIFEST.parent),
                    "top1": result.top1, "tolerance": TOLERANCE})
    MANIFEST.write_text(json.dumps(entries, indent=2) + "\n")
    print(f"{args.name}: top-1 {result.top1:.2f} % on {len(dataset)} images, {size / 2**20:.1f} MB -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
