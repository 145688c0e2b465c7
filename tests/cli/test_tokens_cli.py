"""``leanvit tokens``: JSON report, evaluation on the bundled CIFAR-10 subset, user errors."""
import json
import re

import pytest

from leanvit.cli import main
from leanvit.errors import LeanvitWarning

TINY = ["deit_tiny_patch16_224", "--model-kwargs", '{"num_classes": 10, "img_size": 32, "patch_size": 8}']


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_evit_json_with_eval(capsys):
    code, out, _ = run_cli(capsys, "tokens", *TINY, "--method", "evit", "--keep-rate", "0.5",
                           "--eval", "cifar10-test500", "--eval-images", "20", "--json")
    report = json.loads(out)
    assert code == 0
    assert report["tokens_per_block"] == [17, 17, 17, 1 + 8 + 1, 10, 10, 1 + 5 + 1, 7, 7, 1 + 3 + 1, 5, 5]
    assert report["reduced_macs"] < report["macs"]
    assert report["macs_cut_pct"] == pytest.approx(100 * (1 - report["reduced_macs"] / report["macs"]), abs=0.01)
    assert report["eval_images"] == 20 and 0 <= report["reduced_top1"] <= 100


def test_tome_table(capsys):
    code, out, _ = run_cli(capsys, "tokens", *TINY, "--method", "tome", "--r", "1")
    assert code == 0
    assert "16 15 14 13 12 11 10 9 8 7 6 5" in out and "MACs" in out


def test_tome_per_block_schedule(capsys):
    code, out, _ = run_cli(capsys, "tokens", *TINY, "--method", "tome", "--r", "0,2,2,1", "--json")
    assert code == 0
    assert json.loads(out)["tokens_per_block"] == [17, 15, 13, 12, 12, 12, 12, 12, 12, 12, 12, 12]


@pytest.mark.parametrize("r,counts", [("1x2", [16, 15] + [15] * 10), ("2,1", [15, 14] + [14] * 10),
                                      ("2,0", [15] * 12)])
def test_tome_two_block_specs(capsys, r, counts):
    """RxK and comma lists are per-block counts, even with two entries (not official ToMe's (r, inflection))."""
    code, out, err = run_cli(capsys, "tokens", *TINY, "--method", "tome", "--r", r, "--json")
    assert code == 0, err
    assert json.loads(out)["tokens_per_block"] == counts


def test_diffrate_searches_on_calibration_images(capsys):
    code, out, _ = run_cli(capsys, "tokens", *TINY, "--method", "diffrate", "--target-gmacs", "0.05",
                           "--calib", "cifar10-test500", "--calib-images", "16", "--steps", "2", "--json")
    report = json.loads(out)
    assert code == 0
    assert report["tokens_per_block"][0] == 17 and report["tokens_per_block"][-1] < 17
    assert report["reduced_macs"] < report["macs"]


def test_diffrate_calibration_labels_that_are_not_the_models_classes_are_not_used(capsys):
    """A 5-class head and CIFAR-10's labels (or ImageNet's head and CIFAR-10's 0-9 read as ImageNet classes)."""
    five = ["deit_tiny_patch16_224", "--model-kwargs", '{"num_classes": 5, "img_size": 32, "patch_size": 8}']
    code, out, err = run_cli(capsys, "tokens", *five, "--method", "diffrate", "--target-gmacs", "0.05",
                             "--calib", "cifar10-test500", "--calib-images", "16", "--steps", "2", "--json")
    assert code == 0, err
    assert "are not the model's 5 classes; the search matches the unreduced model's own top-1" in err
    assert json.loads(out)["reduced_macs"] < json.loads(out)["macs"]


def _image_tree(root, classes=10, per_class=3):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return sorted(root.glob("*/*.png"))


def test_diffrate_eval_leaves_out_the_calibration_images_as_quantize_does(tmp_path, capsys):
    """--eval on the images DiffRate searched on scored the reduced model on them, silently."""
    tree = tmp_path / "tree"
    _image_tree(tree)
    search = ["--method", "diffrate", "--target-gmacs", "0.05", "--steps", "1", "--eval", str(tree), "--json"]
    code, out, err = run_cli(capsys, "tokens", *TINY, *search, "--calib", str(tree), "--calib-images", "16")
    assert code == 0, err
    assert json.loads(out)["eval_images"] == 30 - 16
    assert "leanvit tokens: note: 16 of the --eval images are calibration images" in err
    # the same images under other names (a flat copy of some), found by their bytes; and a short set is warned
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(tree.glob("*/*.png"))[:12]):
        (flat / f"img{i}.png").write_bytes(path.read_bytes())
    with pytest.warns(LeanvitWarning, match="holds 12 images, fewer than --calib-images 1000"):
        code, out, err = run_cli(capsys, "tokens", *TINY, *search, "--calib", str(flat), "--calib-images", "1000")
    assert code == 0, err
    assert json.loads(out)["eval_images"] == 30 - 12
    assert "12 of the --eval images are calibration images" in err
    code, out, err = run_cli(capsys, "tokens", *TINY, *search, "--calib", str(tree), "--calib-images", "100")
    assert code == 2 and "Every image of --eval" in err


def test_diffrate_macs_weight_flag(capsys, monkeypatch):
    """The search's missed-target warning says to raise macs_weight: the CLI sets it with --macs-weight."""
    from leanvit.compress.tokens import diffrate

    seen, search = [], diffrate.search_rates
    monkeypatch.setattr(diffrate, "search_rates", lambda model, calib, cfg: seen.append(cfg.macs_weight)
                        or search(model, calib, cfg))
    code, _, err = run_cli(capsys, "tokens", *TINY, "--method", "diffrate", "--target-gmacs", "0.05",
                           "--calib", "cifar10-test500", "--calib-images", "8", "--steps", "1",
                           "--macs-weight", "250", "--json")
    assert code == 0, err
    assert seen == [250.0]


@pytest.mark.parametrize("argv,match", [
    (["--method", "tome", "--r", "9"], "ToMe r=9 is too large"),
    (["--method", "tome", "--r", "1x"], "RxK"),
    (["--method", "evit", "--keep-rate", "1.5"], r"keep_rate must be in \(0, 1\]"),
    (["--method", "diffrate"], "needs --target-gmacs"),
    (["--method", "diffrate", "--target-gmacs", "0.2"], "calib"),
    (["--method", "evit", "--keep-rate", "0"], r"keep_rate must be in \(0, 1\]"),  # not the default 0.7
    (["--method", "tome", "--keep-rate", "0.3"], "--keep-rate is an evit option; it has no effect with --method tome"),
    (["--method", "tome", "--calib", "NOWHERE"], "--calib is a diffrate option"),
    (["--method", "evit", "--r", "4"], "--r is a tome option"),
    (["--method", "tome", "--eval-images", "5"], "--eval-images has no effect without --eval"),
])
def test_user_errors(capsys, argv, match):
    code, _, err = run_cli(capsys, "tokens", *TINY, *argv)
    assert code == 2
    assert "leanvit tokens: error:" in err and re.search(match, err)


@pytest.mark.parametrize("flag", [["--steps", "5"], ["--calib-images", "8"], ["--steps", "300"],
                                  ["--macs-weight", "50"]])
def test_diffrate_search_options_need_calib(capsys, flag):
    """Without --calib DiffRate takes the published rates (here DeiT-S at 2.9 G) and runs no search: refused, not ignored."""
    code, out, err = run_cli(capsys, "tokens", "deit_small_patch16_224", "--method", "diffrate",
                             "--target-gmacs", "2.9", *flag)
    assert code == 2 and not out
    assert f"leanvit tokens: error: {flag[0]} sets DiffRate's search, which needs --calib DATA" in err


def test_not_a_vit(capsys):
    code, _, err = run_cli(capsys, "tokens", "resnet10t", "--method", "evit")
    assert code == 2 and "plain ViTs" in err


def test_a_non_square_vit_is_fed_and_reported_height_by_width(capsys):
    """A ViT built for 48x64 images: evaluated on 48x64 images (its first side, 48x48, stopped the command at the
    input-size check) and reported as 48x64, not as a square of its width."""
    kwargs = '{"num_classes": 10, "img_size": [48, 64], "patch_size": 16, "depth": 2}'
    code, out, _ = run_cli(capsys, "tokens", "deit_tiny_patch16_224", "--model-kwargs", kwargs, "--method", "tome",
                           "--r", "2", "--eval", "cifar10-test500", "--eval-images", "4", "--json")
    report = json.loads(out)
    assert code == 0 and report["img_size"] == [48, 64] and report["eval_images"] == 4
    assert report["tokens_per_block"] == [1 + 12 - 2, 1 + 12 - 4]
    code, out, _ = run_cli(capsys, "tokens", "deit_tiny_patch16_224", "--model-kwargs", kwargs, "--method", "tome",
                           "--r", "2")
    assert code == 0 and "deit_tiny_patch16_224 @ 48x64" in out


def test_img_size_kwarg_over_a_checkpoints_saved_config(tmp_path, capsys):
    # the checkpoint's saved pre-processing is 32x32; a model rebuilt at 48x48 must be fed 48x48 images
    import timm

    from leanvit.checkpoint import save_weights

    kwargs = {"num_classes": 10, "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}
    model = timm.create_model("deit_tiny_patch16_224", **kwargs)
    saved = {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
             "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    path = save_weights(tmp_path / "m.safetensors", model.state_dict(),
                        {"model": "deit_tiny_patch16_224", "model_kwargs": kwargs, "data_config": saved})
    code, out, _ = run_cli(capsys, "tokens", "deit_tiny_patch16_224", "--checkpoint", str(path), "--model-kwargs",
                           '{"img_size": 48}', "--method", "tome", "--r", "1", "--eval", "cifar10-test500",
                           "--eval-images", "10", "--json")
    report = json.loads(out)
    assert code == 0 and report["img_size"] == 48 and report["eval_images"] == 10


def test_a_checkpoint_trained_with_a_reduction_is_measured_unreduced_first(tmp_path, capsys):
    """``leanvit train --tokens`` records its reduction, which loading re-applied: the "before" MACs were those of the
    reduced model (a cut of 0 % for the same EViT, -56 % for ToMe), and a ToMe r too large at another size failed."""
    import timm

    from leanvit.checkpoint import save_weights
    from leanvit.profile import count_macs

    kwargs = {"num_classes": 10, "img_size": 64, "patch_size": 8, "depth": 12, "embed_dim": 16, "num_heads": 2}
    model = timm.create_model("deit_tiny_patch16_224", **kwargs)
    for recorded, argv in (("evit:0.5", ["--method", "evit", "--keep-rate", "0.5"]),
                           ("tome:20", ["--model-kwargs", '{"img_size": 32}', "--method", "evit"])):
        path = save_weights(tmp_path / "m.safetensors", model.state_dict(),
                            {"model": "deit_tiny_patch16_224", "model_kwargs": kwargs, "tokens": recorded})
        code, out, err = run_cli(capsys, "tokens", "deit_tiny_patch16_224", "--checkpoint", str(path), *argv, "--json")
        assert code == 0, err
        report = json.loads(out)
        size = report["img_size"]
        assert report["macs"] == count_macs(timm.create_model("deit_tiny_patch16_224", **{**kwargs, "img_size": size}),
                                            (3, size, size))
        assert report["reduced_macs"] < report["macs"] and f"trained with the reduction {recorded}" in err


@pytest.mark.parametrize("classes, said", [(10, "lie beside its class folders, of no class"),
                                            (3, "are not the model's 10 classes")])
def test_diffrate_calibration_images_of_no_class_are_said_so(classes, said, tmp_path, capsys):
    """Images beside the class folders are read, as class "."; the note blamed the labels not being the model's
    classes. Where the class folders would not fit either, moving the images is no fix: the classes are named."""
    import shutil

    _image_tree(tmp_path / "calib", classes=classes, per_class=2)
    shutil.copy(tmp_path / "calib" / "c0" / "0.png", tmp_path / "calib" / "stray.png")
    code, out, err = run_cli(capsys, "tokens", *TINY, "--method", "diffrate", "--target-gmacs", "0.05", "--calib",
                             str(tmp_path / "calib"), "--calib-images", "16", "--steps", "2", "--json")
    assert code == 0, err
    assert said in err and err.count("note:") == 1


def test_the_top1_before_is_the_unreduced_models(capsys, monkeypatch):
    """The report's top1 is the model as built and reduced_top1 the model with the reduction: each evaluation is
    marked here by whether the model it scored was reduced, and the report must quote each under its own name."""
    import dataclasses

    import leanvit.cli.tokens
    from leanvit import tokens

    real, scored = leanvit.cli.tokens.evaluate, []

    def evaluate(model, loader, **kwargs):
        reduced = tokens.applied(model) is not None
        scored.append(reduced)
        return dataclasses.replace(real(model, loader, **kwargs), top1=25.0 if reduced else 75.0)

    monkeypatch.setattr(leanvit.cli.tokens, "evaluate", evaluate)
    code, out, err = run_cli(capsys, "tokens", *TINY, "--method", "evit", "--keep-rate", "0.5",
                             "--eval", "cifar10-test500", "--eval-images", "10", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert scored == [False, True]
    assert report["top1"] == 75.0 and report["reduced_top1"] == 25.0 and report["eval_images"] == 10


def test_evit_no_fuse_drops_the_inattentive_tokens(capsys):
    """Without fusing, the dropped tokens leave no fused token behind: one token fewer after each reducing block."""
    code, out, err = run_cli(capsys, "tokens", *TINY, "--method", "evit", "--keep-rate", "0.5", "--no-fuse", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tokens_per_block"] == [17, 17, 17, 1 + 8, 9, 9, 1 + 4, 5, 5, 1 + 2, 3, 3]
    assert "fuse=False" in report["method"]


def test_each_methods_defaults_and_the_layers_flag(capsys):
    """EViT keeps ceil(0.7 n) of the n patch tokens after blocks 3, 6 and 9 (plus the fused one); ToMe merges 8 a
    block (65 tokens: 57, 49, 41); --layers 1,4 moves EViT's reductions."""
    code, out, err = run_cli(capsys, "tokens", *TINY, "--method", "evit", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens_per_block"] == [17] * 3 + [1 + 12 + 1] * 3 + [1 + 10 + 1] * 3 + [1 + 8 + 1] * 3
    code, out, err = run_cli(capsys, "tokens", *TINY, "--method", "evit", "--keep-rate", "0.5", "--layers", "1,4",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["tokens_per_block"] == [17, 10, 10, 10, 7] + [7] * 7
    code, out, err = run_cli(capsys, "tokens", "deit_tiny_patch16_224", "--model-kwargs",
                             '{"num_classes": 10, "img_size": 64, "patch_size": 8, "depth": 3}', "--method", "tome",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["tokens_per_block"] == [57, 49, 41]


def test_diffrate_search_defaults_and_labelled_batches(capsys, monkeypatch):
    """With only --target-gmacs and --calib, the search runs 300 steps weighing the MAC target by 100, towards the
    target in MACs, on 256 images paired with their labels (the model's 10 classes)."""
    from leanvit.compress.tokens import diffrate

    seen = {}

    class Searched(Exception):
        pass

    def search_rates(model, calib, cfg):
        seen.update(cfg=cfg, calib=calib)
        raise Searched  # the 300 steps themselves are not what is tested

    monkeypatch.setattr(diffrate, "search_rates", search_rates)
    with pytest.raises(Searched):
        main(["tokens", *TINY, "--method", "diffrate", "--target-gmacs", "0.05", "--calib", "cifar10-test500"])
    cfg, calib = seen["cfg"], seen["calib"]
    assert (cfg.steps, cfg.macs_weight, cfg.target_macs) == (300, 100.0, pytest.approx(5e7))
    assert all(len(pair) == 2 and len(pair[0]) == len(pair[1]) for pair in calib)
    assert sum(len(y) for _, y in calib) == 256 and all(0 <= int(v) < 10 for _, y in calib for v in y)
    with pytest.raises(Searched):  # and the flags, given, set them
        main(["tokens", *TINY, "--method", "diffrate", "--target-gmacs", "0.06", "--calib", "cifar10-test500",
              "--calib-images", "20", "--steps", "5", "--macs-weight", "7"])
    cfg, calib = seen["cfg"], seen["calib"]
    assert (cfg.steps, cfg.macs_weight, cfg.target_macs) == (5, 7, pytest.approx(6e7))
    assert sum(len(y) for _, y in calib) == 20


def _checkpoint(tmp_path, classes):
    import timm

    from leanvit.checkpoint import save_weights

    kwargs = json.loads(TINY[2])
    return str(save_weights(tmp_path / "m.safetensors", timm.create_model(TINY[0], **kwargs).state_dict(),
                            {"model": TINY[0], "model_kwargs": kwargs, "classes": classes}))


def test_a_checkpoint_of_other_classes_is_neither_searched_with_nor_scored_on_these_labels(tmp_path, capsys,
                                                                                          monkeypatch):
    """Ten outputs are not enough: a checkpoint naming other classes than the data's (c0..c9, not CIFAR-10's) gets
    no labels for the search, and --eval on that data is refused."""
    from leanvit.compress.tokens import diffrate

    seen = []
    monkeypatch.setattr(diffrate, "search_rates", lambda model, calib, cfg: seen.append(calib) or ((17,) * 12,) * 2)
    path = _checkpoint(tmp_path, [f"c{i}" for i in range(10)])
    code, out, err = run_cli(capsys, "tokens", TINY[0], "--checkpoint", path, "--method", "diffrate",
                             "--target-gmacs", "0.05", "--calib", "cifar10-test500", "--calib-images", "16", "--json")
    assert code == 0, err
    assert "are not the model's 10 classes" in err and all(not isinstance(b, tuple) for b in seen[0])
    code, out, err = run_cli(capsys, "tokens", TINY[0], "--checkpoint", path, "--method", "evit", "--eval",
                             "cifar10-test500", "--eval-images", "10")
    assert code == 2 and "trained on the classes ['c0', 'c1'" in err


def test_the_text_report_quotes_the_json_figures(tmp_path, capsys, monkeypatch):
    """Each line of the text report: the checkpoint, the method, every block's tokens, the MACs in G with the cut,
    and the top-1 before -> after (the evaluations told apart as in the JSON test above), on --batch-size batches."""
    import dataclasses

    import leanvit.cli.tokens
    from leanvit import tokens

    real, real_loader, sizes = leanvit.cli.tokens.evaluate, leanvit.cli.tokens.make_loader, []
    monkeypatch.setattr(leanvit.cli.tokens, "evaluate", lambda model, loader, **kw: dataclasses.replace(
        real(model, loader, **kw), top1=25.0 if tokens.applied(model) else 75.0))
    monkeypatch.setattr(leanvit.cli.tokens, "make_loader", lambda data, size, **kw: sizes.append(size)
                        or real_loader(data, size, **kw))
    path = _checkpoint(tmp_path, None)
    argv = ["tokens", TINY[0], "--checkpoint", path, "--method", "evit", "--keep-rate", "0.5", "--eval",
            "cifar10-test500", "--eval-images", "10", "--batch-size", "4"]
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    report = json.loads(out)
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    macs, reduced = report["macs"] / 1e9, report["reduced_macs"] / 1e9
    assert out.splitlines() == [
        f"model    {TINY[0]} @ 32x32  ({path})",
        f"method   {report['method']}",
        "tokens   17 17 17 10 10 10 7 7 7 5 5 5  (after each block)",
        f"MACs     {macs:.3f} G -> {reduced:.3f} G  (-{100 * (1 - reduced / macs):.1f} %)",
        "top-1    75.00 % -> 25.00 %  on 10 images of cifar10-test500 (no fine-tuning)",
    ]
    assert sizes == [4, 4]


def test_evaluating_random_weights_is_warned(capsys):
    with pytest.warns(LeanvitWarning, match="no --checkpoint, evaluating random weights"):
        code, _, _ = run_cli(capsys, "tokens", *TINY, "--method", "tome", "--r", "1", "--eval", "cifar10-test500",
                             "--eval-images", "4")
    assert code == 0
