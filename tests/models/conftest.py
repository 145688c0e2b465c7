"""Shared checks for the zoo's model files."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn as nn

from leanvit.deploy import check_agreement, export_onnx, get_engine


@pytest.fixture
def check_engines(tmp_path):
    """``check(model, size)``: export with a dynamic batch through torch.export (a TorchScript fallback
    fails the test), then ONNX Runtime and OpenVINO must match eager at batch 1 and 3."""

    def check(model: nn.Module, size: int) -> None:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            path = export_onnx(model, torch.randn(1, 3, size, size), tmp_path / "model.onnx",
                               dynamic_batch=True)
        assert not [w for w in record if "TorchScript exporter" in str(w.message)]
        batches = [torch.randn(1, 3, size, size), torch.randn(3, 3, size, size)]
        for engine in (get_engine("onnxruntime", threads=1), get_engine("openvino", threads=1)):
            runner = engine.load_model_file(path)
            agreement = check_agreement(model, runner, batches)
            assert agreement.max_abs_err <= 1e-3 and agreement.top1_agreement == 1.0, (engine.name, agreement)

    return check


@pytest.fixture
def check_meta_materialises():
    """``check(name, reference, input_shape, **kwargs)``: a model built on the meta device, materialised with
    to_empty (buffers garbage) and loaded with ``reference``'s state dict, computes what ``reference`` does after
    timm's reinit_non_persistent_buffers: buffers left out of the state dict must be recomputable."""
    from timm.models._manipulate import reinit_non_persistent_buffers

    def check(name: str, reference: nn.Module, input_shape: tuple, **kwargs) -> None:
        model = timm.create_model(name, device="meta", **kwargs).to_empty(device="cpu")
        for buffer in model.buffers():
            buffer.fill_(-1)  # whatever the uninitialised memory held
        model.load_state_dict(reference.state_dict())
        reinit_non_persistent_buffers(model)
        x = torch.randn(*input_shape)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=0, atol=0)

    return check


@pytest.fixture
def check_every_route_loads():
    """``check(name, path, filter_fn, expected, key, **kwargs)``: an official checkpoint file at
    ``path`` loads the weights ``expected`` (the filter's output for its evaluated state dict, named ``key`` in the
    message) through every route: timm's file and hub sources, ``--checkpoint`` (model_from_checkpoint),
    ``load_weights`` and the filter itself."""
    from leanvit.checkpoint import load_weights, model_from_checkpoint

    def check(name, path, filter_fn, expected, key, **kwargs) -> None:
        overlay = dict(num_classes=kwargs["num_classes"])
        whole = torch.load(path, weights_only=False)
        routes = {
            "timm file": timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(overlay, file=str(path)), **kwargs),
            "timm hub (whole checkpoint)": timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(overlay, state_dict=whole), **kwargs),
            "model_from_checkpoint (--checkpoint)": model_from_checkpoint(name, path, **kwargs)[0],
        }
        routes["load_weights"] = timm.create_model(name, **kwargs)
        load_weights(routes["load_weights"], path)
        routes["checkpoint_filter_fn"] = timm.create_model(name, **kwargs)
        routes["checkpoint_filter_fn"].load_state_dict(filter_fn(whole, routes["checkpoint_filter_fn"]))
        for route, model in routes.items():
            loaded = model.state_dict()
            assert all(torch.equal(loaded[k], v) for k, v in expected.items()), f"{route} did not load '{key}'"

    return check


@pytest.fixture
def check_grad_checkpointing():
    """``check(build, x, units, forwards=(forward,))``: after ``set_grad_checkpointing(True)`` each of ``units(model)``
    runs again during backward, with the same gradients as without, and ``set_grad_checkpointing(False)`` turns it
    back off; ``build()`` makes a fresh model, ``forwards`` are the calls run and backpropagated (e.g. also
    ``forward_intermediates``). Calls are counted in each unit's forward itself: hooks do not fire when
    checkpointing reruns one."""

    def check(build, x: torch.Tensor, units, forwards=(lambda model, x: model(x),)) -> None:
        calls, grads = [], []
        for enable in (False, True, False):
            model = build().train()
            model.set_grad_checkpointing(True)
            model.set_grad_checkpointing(enable)
            seen = []
            for unit in units(model):
                unit.forward = lambda x, run=unit.forward: (seen.append(1), run(x))[1]
            for forward in forwards:
                forward(model, x).sum().backward()
            calls.append(len(seen))
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        once = len(units(build())) * len(forwards)
        assert calls == [once, 2 * once, once]
        for checkpointed, plain in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(checkpointed, plain)

    return check
