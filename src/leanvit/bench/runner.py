"""``leanvit bench``: every model on every engine, timed side by side and checked against eager."""
from __future__ import annotations

import copy
import math
import sys
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import timm
import torch
from tqdm.auto import tqdm

from ..catalog import ModelFacts, find_facts
from ..compress.tokens import apply as token_apply
from ..compress.tokens import from_spec
from ..deploy import (check_agreement, check_export_dir, engine_device, engine_names, engine_precisions, export_dir,
                      get_engine)
from ..deploy.engine import Runner
from ..errors import LeanvitError, check_range, warn
from ..models.registry import resolve_model_name
from ..profile import check_img_size, count_macs, count_params, create_model_at
from ..host import usable_cpus
from .timing import TimingBudget, peak_rss_mb, reset_peak_rss, rss_mb, time_alternating, time_calls

DEFAULT_MODELS = (
    "efficientformer_l1", "efficientformerv2_s0", "tiny_vit_5m_224", "deit_tiny_patch16_224", "mobilenetv2_100",
)
DEFAULT_ENGINES = ("eager", "onnxruntime", "openvino")


@dataclass
class BenchConfig:
    models: Sequence[str] = DEFAULT_MODELS
    engines: Sequence[str] = DEFAULT_ENGINES
    precisions: Sequence[str] = ("f32",)
    batch: int = 1
    threads: int = field(default_factory=usable_cpus)  #: one per CPU this process may use
    img_size: int | None = None  #: None: each model's own pretrained_cfg input size
    budget: TimingBudget = TimingBudget()  #: each configuration's, spread over ``rounds``
    rounds: int = 5  #: alternating rounds in which a model's configurations are timed side by side
    n_check: int = 8  #: random images compared against eager per engine
    pretrained: bool = False  #: random weights need no network; latency does not depend on them
    device: str = "cpu"
    cache_dir: str | None = None
    seed: int = 0
    #: token-reduction variants measured beside each unreduced model, e.g. ("evit:0.7", "tome:8")
    tokens: Sequence[str] = ()

    def validate(self) -> None:
        check_range("--batch", self.batch, 1, 4096)
        check_range("--threads", self.threads, 1, 1024)
        check_range("--rounds", self.rounds, 1, 1000)
        for flag, names in (("--engines", self.engines), ("models", self.models), ("--precision", self.precisions),
                            ("--tokens", self.tokens)):
            if twice := [n for n, k in Counter(names).items() if k > 1]:  # a row twice, its "vs eager" ambiguous
                raise LeanvitError(f"{flag} lists {', '.join(twice)} more than once: give each once.")
        if self.img_size is not None:
            check_img_size(self.img_size)
        if not self.models:
            raise LeanvitError("no models to benchmark.")
        for m in self.models:
            resolve_model_name(m)
        for spec in self.tokens:
            from_spec(spec)
        exporting = False
        for e in self.engines:  # unknown, not installed, not on this device: the whole run's problem
            exporting |= get_engine(e, threads=self.threads, device=engine_device(e, self.device)).exports
        unrunnable = unrunnable_pairs(self)  # a pair an engine cannot run is a skipped row, not an error
        for p in self.precisions:
            if all((e, p) in unrunnable for e in self.engines):
                able = [n for n in engine_names() if p in engine_precisions(n)]
                runs = ", ".join(dict.fromkeys(q for e in self.engines for q in engine_precisions(e)))
                who = (f"engine '{self.engines[0]}' does not run it (it runs {runs})" if len(self.engines) == 1 else
                       f"none of the engines {', '.join(self.engines)} runs it (they run {runs})")
                raise LeanvitError(f"--precision {p}: {who}" + (f"; engines for {p}: {', '.join(able)}." if able else "."))
        if exporting:  # a cache that cannot be written: one error now, not one per row
            try:
                check_export_dir(self.cache_dir)
            except LeanvitError as e:
                if not export_dir(self.cache_dir).is_dir():
                    raise
                warn(f"{e} Exports already cached there are used; a row whose model is not among them fails.")


def unrunnable_pairs(cfg: BenchConfig) -> dict[tuple[str, str], str]:
    """The ``(engine, precision)`` pairs of ``cfg`` that the engine does not run, each with why: their rows are
    skipped (``--precision f32 bf16`` runs bf16 where an engine can, and f32 everywhere)."""
    return {(e, p): f"{e} does not run {p} (it runs {', '.join(engine_precisions(e))})"
            for e in cfg.engines for p in cfg.precisions if p not in engine_precisions(e)}


def checked_images(cfg: BenchConfig) -> int:
    """How many random images each engine is checked against eager on: ``n_check`` in whole batches."""
    return max(1, math.ceil(cfg.n_check / cfg.batch)) * cfg.batch


def row_label(model: str, variant: str) -> str:
    """The model, with its token-reduction variant if any: how the progress bar, the table and the report name a row."""
    return f"{model} + {variant}" if variant else model


@dataclass
class BenchRow:
    model: str
    engine: str
    precision: str
    batch: int
    threads: int  #: the thread count asked for (--threads)
    img_size: int
    variant: str = ""  #: token-reduction spec applied to the model ("" for the model as built)
    latency_ms_median: float | None = None
    latency_ms_p90: float | None = None
    latency_ms_p99: float | None = None
    latency_ms_iqr: float | None = None
    latency_ms_mean: float | None = None
    latency_ms_min: float | None = None
    #: the thread count the engine reports it runs with, where it reports one (OpenVINO caps it at the usable
    #: CPUs, eager reads torch's back); None where it does not say (ONNX Runtime)
    threads_used: int | None = None
    iterations: int = 0
    #: the median of each alternating round, in round order: the configurations of one model were timed side by
    #: side, so a ratio of two rows is best taken round by round (:func:`~leanvit.bench.timing.round_ratios`)
    latency_ms_rounds: tuple[float, ...] = ()
    throughput: float | None = None  #: images per second at the median latency
    params: int | None = None
    macs: int | None = None  #: per image
    max_abs_err: float | None = None
    top1_agreement: float | None = None
    diverges: bool = False
    #: memory, in MiB, during the engine's warm-up calls, run on their own (freed memory handed back to the OS
    #: first): the process-wide resident-set high-water mark, which holds the model, all its loaded engines and
    #: whatever the exports and earlier rows left resident
    peak_rss_mb: float | None = None
    rss_baseline_mb: float | None = None  #: the resident set just before those calls, the model's engines loaded
    peak_rss_above_baseline_mb: float | None = None  #: peak_rss_mb - rss_baseline_mb: what running the engine adds
    published_top1: float | None = None
    paper_speed: str | None = None
    engine_info: dict = field(default_factory=dict)
    error: str | None = None
    skipped: str | None = None  #: why this configuration was not run (a token variant the model cannot take)

    @property
    def label(self) -> str:
        return row_label(self.model, self.variant)

    @property
    def ran(self) -> bool:
        return self.error is None and self.skipped is None

    def to_dict(self) -> dict:
        return asdict(self)


def run_bench(cfg: BenchConfig, *, progress: bool = True) -> list[BenchRow]:
    """Benchmark every model x engine x precision of ``cfg``; one row each, failures included.

    A configuration that fails is recorded with its ``error`` and reported, not dropped: a model that cannot be
    built at ``img_size``, an engine that cannot load it (OpenVINO bf16 on a CPU without BF16) or crashes. A precision
    an engine does not run at all (ONNX Runtime bf16) is a ``skipped`` row, said once in a warning. Only errors about
    the whole run (a bad setting, an unknown model or engine, a precision none of the engines runs, an export cache
    that cannot be written) stop it, up front in ``validate``.
    """
    cfg.validate()
    unrunnable = unrunnable_pairs(cfg)
    if unrunnable:
        warn(f"{'; '.join(unrunnable.values())}: those rows are skipped.")
    if cfg.threads > (cpus := usable_cpus()):
        warn(f"--threads {cfg.threads} is more than the {cpus} CPUs this process may use: engines "
             "that take the count as given oversubscribe the cores, OpenVINO caps it (each row's threads_used "
             f"says what an engine reports). Use --threads {cpus} or fewer for comparable rows.")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    total = len(cfg.models) * (1 + len(cfg.tokens)) * len(cfg.engines) * len(cfg.precisions)
    rows: list[BenchRow] = []
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress, file=sys.stderr)
    for name in cfg.models:
        rows += _bench_model(name, cfg, unrunnable, bar)
    bar.close()
    return rows


def _bench_model(name: str, cfg: BenchConfig, unrunnable: dict, bar) -> list[BenchRow]:
    """The rows of one model: each token variant x engine x precision loaded (or its failure recorded), then all
    that loaded timed side by side. A model that cannot be built gives a failed row for each."""
    rows: list[BenchRow] = []
    bar.set_description(f"{name}: create")
    try:
        model = create_model_at(name, cfg.img_size, pretrained=cfg.pretrained)
    except LeanvitError as e:  # (cannot run at --img-size, weights not cached): the other models still run
        error = str(e).splitlines()[0][:500]
        tqdm.write(f"!! {name} FAILED: {error}", file=sys.stderr)
        rows = [BenchRow(model=name, engine=engine_name, variant=variant, precision=p, batch=cfg.batch,
                         threads=cfg.threads, img_size=cfg.img_size or _native_size(name),
                         skipped=unrunnable.get((engine_name, p)),
                         error=None if (engine_name, p) in unrunnable else error)
                for variant in ("", *cfg.tokens) for engine_name in cfg.engines for p in cfg.precisions]
        bar.update(len(rows))
        return rows
    chans, h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))
    size = cfg.img_size or h
    params = count_params(model)
    facts = find_facts(name)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, chans, size, size, generator=gen)
    checks = [torch.randn(cfg.batch, chans, size, size, generator=gen)
              for _ in range(checked_images(cfg) // cfg.batch)]
    loaded: dict[str, tuple[BenchRow, Runner]] = {}  # all of the model's loaded engines, timed side by side
    for variant in ("", *cfg.tokens):
        label = row_label(name, variant)
        inapplicable, reduced = None, model
        if variant:
            # its own modules (the rows of the model as built keep running it unreduced), the same weights
            reduced = copy.deepcopy(model, {id(t): t for t in (*model.parameters(), *model.buffers())})
            try:
                token_apply(reduced, from_spec(variant))
            except LeanvitError as e:  # (not a plain ViT, r too large): the other models' rows still count
                inapplicable = f"token reduction does not apply: {e}"
                tqdm.write(f"!! {label}: {inapplicable}", file=sys.stderr)
        macs = None if inapplicable else count_macs(reduced, (chans, size, size))
        for engine_name in cfg.engines:
            for precision in cfg.precisions:
                bar.set_description(f"{label}: load {engine_name} {precision}")
                row = BenchRow(model=name, engine=engine_name, variant=variant, precision=precision,
                               batch=cfg.batch, threads=cfg.threads, img_size=size, params=params, macs=macs,
                               published_top1=published_top1(facts, name, size, variant, precision),
                               paper_speed=facts.speed if facts else None,
                               skipped=inapplicable or unrunnable.get((engine_name, precision)))
                rows.append(row)
                if row.skipped:
                    bar.update()
                    continue
                try:
                    loaded[f"{label} {engine_name} {precision}"] = row, _load(row, reduced, x, checks, cfg)
                except Exception as e:  # noqa: BLE001 - one engine failing must not hide the others
                    _failed(row, e)
                    bar.update()
    bar.set_description(f"{name}: timing {len(loaded)} side by side")
    _time_side_by_side(loaded, x.numpy(), cfg)
    bar.update(len(loaded))
    return rows


def _native_size(name: str) -> int:
    """The input resolution timm's pretrained config gives ``name``, without building the model."""
    return (timm.models.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224))[-1]


def published_top1(facts: ModelFacts | None, name: str, img_size: int, variant: str,
                   precision: str = "f32") -> float | None:
    """The paper's top-1 where it describes the row: the model as published (its pretrained tag's training where
    that has its own figure), in f32, at its published resolution (not a token-reduced variant, nor the model at
    another ``--img-size``, nor in a reduced precision, whose accuracy no one measured)."""
    if facts and not variant and img_size == facts.img_size and precision == "f32":
        return facts.top1_for(name)
    return None


def _failed(row: BenchRow, e: Exception) -> None:
    """Record ``e`` as ``row``'s error, said at once (a traceback too where it is not a leanvit error)."""
    known = isinstance(e, LeanvitError)  # this configuration's own problem: no traceback
    row.error = (str(e) if known else f"{type(e).__name__}: {e}").splitlines()[0][:500]
    tqdm.write(f"!! {row.label} on {row.engine} ({row.precision}) FAILED: {row.error}", file=sys.stderr)
    if not known:
        traceback.print_exc(file=sys.stderr)


def _load(row: BenchRow, model, x, checks, cfg: BenchConfig) -> Runner:
    """``row``'s engine with ``model`` loaded, checked against eager on ``checks`` (recorded in the row)."""
    # --device cuda: CPU-only engines run on the CPU; --device cpu: GPU-only ones (TensorRT) on the GPU; recorded
    device = engine_device(row.engine, cfg.device)
    engine = get_engine(row.engine, threads=cfg.threads, precision=row.precision, device=device)
    runner = engine.load(model, x, cache_dir=cfg.cache_dir)
    row.precision = runner.precision  # what the engine actually runs, not what was asked
    row.engine_info = {"device": engine.device, **runner.info}
    row.threads_used = runner.info.get("threads")
    agreement = check_agreement(model, runner, checks)
    row.max_abs_err, row.top1_agreement = agreement.max_abs_err, agreement.top1_agreement
    row.diverges = agreement.diverges(row.precision)
    if row.diverges:
        tqdm.write(f"!! {row.label} on {row.engine} ({row.precision}) DIVERGES from eager: top-1 agreement "
                   f"{row.top1_agreement:.1%}, max abs err {row.max_abs_err:.3g}", file=sys.stderr)
    return runner


class _CallFailed(Exception):
    """A runner that raised while being timed, and which one."""

    def __init__(self, key: str, error: Exception):
        super().__init__(str(error))
        self.key, self.error = key, error


def _time_side_by_side(loaded: dict[str, tuple[BenchRow, Runner]], x_np, cfg: BenchConfig) -> None:
    """Time the loaded engines of one model on ``x_np`` in ``cfg.rounds`` alternating rounds
    (:func:`time_alternating`): a shared machine's drift over the minutes a model takes then reaches all its rows
    alike, and their ratios hold. Each engine's memory is read first, on its own (its warm-up calls)."""
    for key, (row, runner) in list(loaded.items()):
        # the running engine's peak, not the exporter's nor the eager reference's; what they (and the other loaded
        # engines) left resident is in the baseline, so the growth over it is what running this engine takes
        if reset_peak_rss():
            row.rss_baseline_mb = rss_mb()
        try:
            time_calls(lambda: runner(x_np), replace(cfg.budget, budget_s=0.0, min_iters=1, max_iters=1))
        except Exception as e:  # noqa: BLE001 - one engine failing must not hide the others
            _failed(row, e)
            row.rss_baseline_mb = None  # a failed row has no figures: no baseline without its peak
            del loaded[key]
            continue
        row.peak_rss_mb = peak_rss_mb()
        if row.rss_baseline_mb is not None and row.peak_rss_mb is not None:
            row.peak_rss_above_baseline_mb = row.peak_rss_mb - row.rss_baseline_mb

    def call(key: str, runner: Runner):
        def timed():
            try:
                runner(x_np)
            except Exception as e:  # noqa: BLE001 - whose call failed, so that the others are timed again
                raise _CallFailed(key, e) from e
        return timed

    timings = {}
    while loaded and not timings:
        try:
            timings = time_alternating({key: call(key, runner) for key, (_, runner) in loaded.items()}, cfg.budget,
                                       rounds=cfg.rounds)
        except _CallFailed as failure:  # that row fails; the others are timed again, without it
            _failed(loaded.pop(failure.key)[0], failure.error)
    for key, (row, _) in loaded.items():
        timing = timings[key]
        row.latency_ms_median, row.latency_ms_p90, row.latency_ms_p99 = timing.median, timing.p90, timing.p99
        row.latency_ms_iqr, row.latency_ms_mean, row.latency_ms_min = timing.iqr, timing.mean, timing.min
        row.iterations, row.latency_ms_rounds = timing.n, timing.round_medians_ms
        row.throughput = cfg.batch * 1000.0 / timing.median
