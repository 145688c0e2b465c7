"""The scripts under ``tools/``: what they refuse to write over the project's shipped files."""
from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
import timm
import torch

from leanvit.checkpoint import model_from_checkpoint, save_weights

TOOLS = Path(__file__).resolve().parents[1] / "tools"
TINY = dict(img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2, num_classes=10)


def _tool(name: str):
    """``tools/<name>.py`` as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def release(tmp_path, monkeypatch):
    """``release_checkpoint`` writing to ``tmp_path`` (an earlier release of ``tiny`` already there), and a
    finished one-epoch run of a tiny DeiT to release."""
    from leanvit.data import resolve_data_config
    from leanvit.train import TrainConfig
    from leanvit.train.state import STATE_FILE

    tool = _tool("release_checkpoint")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(tool, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(tool, "MANIFEST", tmp_path / "checkpoints.json")
    (shipped / "tiny.safetensors").write_bytes(b"earlier weights")
    (shipped / "tiny.md").write_text("earlier card: 70.00 %")
    tool.MANIFEST.write_text(json.dumps([{"name": "tiny", "model": "deit_tiny_patch16_224", "top1": 70.0}]))

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", **TINY)
    run = tmp_path / "runs" / "tiny"
    (run / "epoch-0001").mkdir(parents=True)
    save_weights(run / "model.safetensors", model.state_dict(),
                 {"model": "deit_tiny_patch16_224", "model_kwargs": TINY,
                  "data_config": resolve_data_config(model, img_size=32)})
    config = TrainConfig(model="deit_tiny_patch16_224", data="/data/train", epochs=1, batch_size=8).to_dict()
    (run / "epoch-0001" / STATE_FILE).write_text(json.dumps(
        {"epoch": 1, "step": 4, "config": config, "epochs": [{"epoch": 0, "loss": 2.3, "seconds": 1.0}]}))
    tool.run, tool.shipped = run, shipped
    return tool


def _untouched(release) -> bool:
    shipped = release.shipped
    return (sorted(p.name for p in shipped.iterdir()) == ["tiny.md", "tiny.safetensors"]  # no staged file left
            and (shipped / "tiny.safetensors").read_bytes() == b"earlier weights"
            and (shipped / "tiny.md").read_text() == "earlier card: 70.00 %"
            and json.loads(release.MANIFEST.read_text())[0]["top1"] == 70.0)


@pytest.mark.parametrize("data", ["/nonexistent/cifar10/test", "cifar10-test500"])
def test_release_with_wrong_data_is_one_error_and_keeps_the_shipped_release(release, data, capsys):
    """A missing folder, or the 500-image subset instead of the full test split: refused before anything shipped
    is written, so the weights, their card and the manifest's top-1 still agree."""
    assert release.main([str(release.run), "--name", "tiny", "--data", data]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert _untouched(release)


def test_release_replaces_the_shipped_weights_only_after_evaluating_them(release, monkeypatch, capsys):
    monkeypatch.setattr(release, "FULL_TEST_SPLIT", 500)  # the bundled subset stands in for the full split

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(release, "evaluate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            release.main([str(release.run), "--name", "tiny", "--data", "cifar10-test500", "--batch-size", "100"])
    assert _untouched(release)

    assert release.main([str(release.run), "--name", "tiny", "--data", "cifar10-test500", "--batch-size", "100"]) == 0
    shipped = release.shipped
    assert sorted(p.name for p in shipped.iterdir()) == ["tiny.md", "tiny.safetensors"]
    model, meta = model_from_checkpoint("deit_tiny_patch16_224", shipped / "tiny.safetensors")
    assert meta["run"]["step"] == 4 and next(model.parameters()).dtype == torch.float32
    (entry,) = json.loads(release.MANIFEST.read_text())
    assert entry["name"] == "tiny" and entry["top1"] != 70.0
    assert f"**{entry['top1']:.2f} %**" in (shipped / "tiny.md").read_text()


def _archive(path: Path, classes: dict[str, int], top: str = "") -> Path:
    """A tar.gz of ``test/<class>/<i>.jpg`` (``count`` stand-in files per class), under ``top`` if given."""
    with tarfile.open(path, "w:gz") as tar:
        for name, count in classes.items():
            for i in range(count):
                data = f"{name} {i}".encode()
                info = tarfile.TarInfo(f"{top}test/{name}/{i:04d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.mark.parametrize("classes", [dict.fromkeys(CIFAR10[:2], 60), {**dict.fromkeys(CIFAR10, 60), "cat": 49},
                                     dict.fromkeys(CIFAR10 + ("extra",), 60)], ids=["2 classes", "49 cats", "11"])
def test_cifar10_subset_refuses_an_archive_without_the_whole_test_split(tmp_path, classes, capsys):
    """The default output is the shipped asset: a partial split is an error and writes nothing."""
    build = _tool("build_cifar10_subset")
    out = tmp_path / "subset.npz"
    assert build.main([str(_archive(tmp_path / "a.tar.gz", classes)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not out.exists()
    assert build.main([str(tmp_path / "missing.tar.gz"), "--out", str(out)]) == 2 and not out.exists()


def test_cifar10_subset_reads_the_split_under_one_top_folder_as_at_the_top(tmp_path):
    """``cifar10/test/...`` (an archive of the extracted folder) packs the very same asset as ``test/...``."""
    import numpy as np

    build = _tool("build_cifar10_subset")
    counts = dict(zip(CIFAR10, range(50, 60)))
    for top in ("", "cifar10/"):
        out = tmp_path / f"subset-{top.strip('/') or 'top'}.npz"
        assert build.main([str(_archive(tmp_path / "a.tar.gz", counts, top)), "--out", str(out)]) == 0
    top, nested = np.load(tmp_path / "subset-top.npz"), np.load(tmp_path / "subset-cifar10.npz")
    assert len(top["labels"]) == 500 and list(top["classes"]) == list(CIFAR10)
    assert top["names"][0].startswith("test/airplane/")
    for key in ("jpeg", "offsets", "labels", "names", "classes"):
        assert np.array_equal(top[key], nested[key])


@pytest.mark.parametrize("weights", ["ema", "final"])
def test_release_ships_the_ema_weights_unless_final_is_asked(release, monkeypatch, weights):
    """A run's EMA (``--weights ema``, the default, as the model cards' figures are) or its final weights, in half
    precision."""
    from leanvit.checkpoint import read_checkpoint
    from leanvit.train.state import EMA_FILE

    monkeypatch.setattr(release, "FULL_TEST_SPLIT", 500)
    final, meta = read_checkpoint(release.run / "model.safetensors")
    save_weights(release.run / EMA_FILE, {k: v + 1 if v.is_floating_point() else v for k, v in final.items()}, meta)
    args = [str(release.run), "--name", "tiny", "--data", "cifar10-test500", "--batch-size", "100"]
    assert release.main(args + ([] if weights == "ema" else ["--weights", "final"])) == 0
    shipped, _ = read_checkpoint(release.shipped / "tiny.safetensors")
    source, _ = read_checkpoint(release.run / (EMA_FILE if weights == "ema" else "model.safetensors"))
    assert shipped.keys() == source.keys()
    assert all(torch.equal(shipped[k], v.half() if v.is_floating_point() else v) for k, v in source.items())
