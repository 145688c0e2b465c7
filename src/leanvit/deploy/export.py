"""Export to ONNX and OpenVINO IR, cached on disk by model, settings, weights and input shape.

Exports are the slow part of getting a model onto an engine (seconds to a minute), so each one is
stored under a key of: the model's architecture; a fingerprint of its structure (its repr), of every
module's plain settings (:func:`module_settings`, such as a ViT's ``global_pool``) and of its weights;
the input shape, dynamic batch, opset and the torch and onnxscript versions. An OpenVINO IR is named by
the OpenVINO version that converted it. A model whose weights or settings changed never reuses a stale
export; state held in any other form (a dict, an object, a method patched in without a repr of its own)
is not in the key.
"""
from __future__ import annotations

import enum
import hashlib
import importlib.metadata
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..errors import LeanvitError, warn
from ..files import write_problem
from ..modes import eval_mode

#: 20: GELU exports as ONNX's own Gelu op, which ONNX Runtime runs as one kernel; at 18 the exporter writes it as
#: five element-wise ops (Div, Erf, Add, Mul, Mul) that ONNX Runtime does not fuse (efficientformerv2_s0 at 224x224,
#: 2 threads, f32: 8.68 ms at opset 18, 5.67 ms at 20; OpenVINO fuses either form; benchmarks/opset.py).
DEFAULT_OPSET = 20


def cache_root() -> Path:
    """``$LEANVIT_CACHE`` or ``~/.cache/leanvit``."""
    return Path(os.environ.get("LEANVIT_CACHE", Path.home() / ".cache" / "leanvit"))


def export_dir(cache_dir: str | Path | None = None) -> Path:
    """The directory exports are cached in: ``cache_dir``, else ``cache_root() / "exports"``."""
    return Path(cache_dir) if cache_dir else cache_root() / "exports"


def check_export_dir(cache_dir: str | Path | None = None) -> Path:
    """:func:`export_dir`, created and checked that an export can be written there: a bad directory is one clear
    error (naming it, why, and the fix), not a traceback from the exporter. Asked on a cache miss only, so a
    read-only cache that already holds the exports still serves them."""
    path = export_dir(cache_dir)
    problem = write_problem(path)
    if problem:
        fix = ("point --cache-dir at a directory you can write to" if cache_dir else
               "point LEANVIT_CACHE (or leanvit bench's --cache-dir) at a directory you can write to")
        raise LeanvitError(f"Cannot cache exports in {path} ({problem}): {fix}.")
    return path


def _setting(v) -> str | None:
    """``v`` written out where it is a plain setting (a number, string, bool, None or enum, or a tuple/list of
    them), else None. Enums by class and member name: their repr is the same in every process."""
    if isinstance(v, enum.Enum):
        return f"{type(v).__module__}.{type(v).__qualname__}.{v.name}"
    if v is None or isinstance(v, (bool, int, float, str)):
        return repr(v)
    if isinstance(v, (tuple, list)):
        items = [_setting(i) for i in v]
        if None not in items:
            return ("[{}]" if isinstance(v, list) else "({})").format(", ".join(items))
    return None


def module_settings(model: nn.Module) -> list[tuple[str, str, str]]:
    """Every module's plain settings, ``(module name, attribute, value)`` in module order, attributes sorted.

    Settings kept as plain attributes change ``forward`` without showing in the repr or the weights (timm ViT's
    ``global_pool``, ``num_prefix_tokens``); ``_``-prefixed attributes and ``training`` are left out.
    """
    out = []
    for name, module in model.named_modules():
        for attr, v in sorted(vars(module).items()):
            if attr.startswith("_") or attr == "training":
                continue
            text = _setting(v)
            if text is not None:
                out.append((name, attr, text))
    return out


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's structure (its repr, which names patched-in methods such as token
    reduction), every module's plain settings (:func:`module_settings`) and its parameter/buffer names,
    shapes and values. No ids or addresses: the same model gives the same fingerprint in every process."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(model).encode())
    for name, attr, text in module_settings(model):
        h.update(f"{name}.{attr}={text}\n".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_key(model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool, opset: int) -> str:
    arch = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    shape = "x".join(str(s) for s in example.shape)
    dyn = "dyn" if dynamic_batch else "static"
    torch_v = torch.__version__.split("+")[0]
    osc = _version("onnxscript")  # the torch.export-based exporter writes its graph with onnxscript
    return f"{arch}-{shape}-{dyn}-op{opset}-pt{torch_v}" + (f"-osc{osc}" if osc else "") + f"-{model_fingerprint(model)}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
) -> Path:
    """Export ``model`` (in eval mode) to a single-file ONNX model at ``path``.

    Uses the ``torch.export``-based exporter; a model it cannot trace falls back to the
    TorchScript exporter with a warning that says so.
    """
    if opset < 17:
        raise LeanvitError(f"ONNX opset must be >= 17 (LayerNormalization), got {opset}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dynamic_batch and example.shape[0] == 1:
        example = example.expand(2, *example.shape[1:]).contiguous()  # torch.export specialises size-1 dims
    with eval_mode(model):
        try:
            _export_dynamo(model, example, path, opset, dynamic_batch)
        except Exception as e:  # noqa: BLE001 - any exporter failure: retry with the other exporter
            warn(
                f"torch.export-based ONNX export failed for {type(model).__name__} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); using the TorchScript exporter."
            )
            _export_torchscript(model, example, path, opset, dynamic_batch)
    return path


def _export_dynamo(model, example, path, opset, dynamic_batch) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():  # grad mode breaks views of parameter-built masks
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, input_names=["input"],
            output_names=["logits"], dynamic_shapes=dynamic_shapes, verbose=False,
        )
    program.save(str(path), external_data=False)


def _export_torchscript(model, example, path, opset, dynamic_batch) -> None:
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["logits"], dynamic_axes=axes,
        )


def cached_onnx(
    model: nn.Module,
    example: torch.Tensor,
    *,
    cache_dir: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
) -> Path:
    """The ONNX export of ``model`` at ``example``'s shape, exporting only on a cache miss."""
    key = export_key(model, example, dynamic_batch=dynamic_batch, opset=opset)
    return cached_file(key, lambda path: export_onnx(model, example, path, opset=opset, dynamic_batch=dynamic_batch),
                       cache_dir=cache_dir)


def _write_once(path: Path, write: Callable[[Path], object], check: Callable[[], object],
                companions: tuple[str, ...] = ()) -> Path:
    """``path``, written by ``write(tmp)`` where it is missing (after ``check()``, which raises where it cannot be)
    and moved into place whole, the files of ``companions`` (suffixes: an IR's ``.bin``) written beside it moved
    first: an interrupted export never leaves a half file in the cache."""
    if not path.exists():
        check()
        tmp = path.with_suffix(".tmp" + path.suffix)
        write(tmp)
        for suffix in companions:
            tmp.with_suffix(suffix).replace(path.with_suffix(suffix))
        tmp.replace(path)
    return path


def cached_file(key: str, write: Callable[[Path], object], *, cache_dir: str | Path | None = None) -> Path:
    """``model.onnx`` in the export cache's folder ``key``, written by ``write(path)`` on a cache miss only."""
    return _write_once(export_dir(cache_dir) / key / "model.onnx", write, lambda: check_export_dir(cache_dir))


def cached_openvino_ir(onnx_path: Path) -> Path:
    """The OpenVINO IR (``model-ov<version>.xml`` + ``.bin``, weights kept in f32) next to ``onnx_path``.

    Named by the OpenVINO version that converted it: another version's converter can write another graph.
    """
    import openvino as ov

    xml = onnx_path.with_name(f"model-ov{_version('openvino')}.xml")

    def write(tmp: Path) -> None:
        ov.save_model(ov.convert_model(str(onnx_path)), str(tmp), compress_to_fp16=False)

    # (checked: a read-only cache may hold the ONNX export but not this OpenVINO's IR)
    return _write_once(xml, write, lambda: check_export_dir(xml.parent), companions=(".bin",))
