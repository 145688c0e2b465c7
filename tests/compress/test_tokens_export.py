"""Reduced ViTs export with static token counts and agree with PyTorch on ONNX Runtime and OpenVINO."""
import copy

import pytest
import torch

import leanvit.tokens as tokens
from leanvit.deploy import check_agreement, export_onnx, get_engine

torch.set_num_threads(1)

# a reduced model must go through the torch.export-based exporter, not the TorchScript fallback
pytestmark = pytest.mark.filterwarnings("error:torch.export-based ONNX export failed:UserWarning")

# tiny_vit (conftest): 2 blocks, 16 patch tokens + the class token
METHODS = {
    "evit": tokens.EViT(keep_rate=0.5, fuse=True, layers=(0, 1)),
    "tome": tokens.ToMe(r=4),
    "diffrate": tokens.DiffRate(prune=(15, 9), merge=(11, 5)),
}


@pytest.fixture(scope="module")
def batches():
    torch.manual_seed(3)
    return [torch.randn(4, 3, 32, 32) for _ in range(3)]


@pytest.mark.parametrize("name", METHODS)
def test_onnxruntime_agrees(tiny_vit, batches, name, tmp_path):
    model = tokens.apply(copy.deepcopy(tiny_vit), METHODS[name])
    runner = get_engine("onnxruntime", threads=1).load(model, batches[0], cache_dir=tmp_path)
    agreement = check_agreement(model, runner, batches)
    assert agreement.top1_agreement >= 0.99
    assert not agreement.diverges("f32")


def test_openvino_agrees(tiny_vit, batches, tmp_path):
    model = tokens.apply(copy.deepcopy(tiny_vit), METHODS["tome"])  # the scatter-add merge path
    runner = get_engine("openvino", threads=1, precision="f32").load(model, batches[0], cache_dir=tmp_path)
    assert check_agreement(model, runner, batches).top1_agreement >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("name", ["evit", "diffrate"])
def test_openvino_agrees_slow(tiny_vit, batches, name, tmp_path):
    model = tokens.apply(copy.deepcopy(tiny_vit), METHODS[name])
    runner = get_engine("openvino", threads=1, precision="f32").load(model, batches[0], cache_dir=tmp_path)
    assert check_agreement(model, runner, batches).top1_agreement >= 0.99


def test_dynamic_batch_export(tiny_vit, tmp_path):
    model = tokens.apply(copy.deepcopy(tiny_vit), METHODS["diffrate"])
    path = export_onnx(model, torch.zeros(2, 3, 32, 32), tmp_path / "m.onnx", dynamic_batch=True)
    runner = get_engine("onnxruntime", threads=1).load_onnx(path)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(runner(x.numpy())), model(x), atol=1e-4, rtol=1e-4)
