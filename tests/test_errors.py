"""Close-name hints: what the user was typing ranks before difflib's look-alikes."""
import timm

from leanvit.errors import close_matches


def test_a_prefix_ranks_before_look_alikes():
    """difflib alone filled the 5 slots with rdnet_tiny, davit_tiny, ... and never offered the DeiT."""
    hints = close_matches("deit_tiny", timm.list_models())
    assert hints[:2] == ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"] and len(hints) == 5
    assert close_matches("DeiT_Tiny", timm.list_models())[0] == "deit_tiny_patch16_224"


def test_substrings_then_difflib_fill_the_rest():
    assert close_matches("vig_s", ["vig_b", "mobilevig_s", "vig_s2"]) == ["vig_s2", "mobilevig_s", "vig_b"]
    assert close_matches("deit_tiny_patch16_244", timm.list_models())[0] == "deit_tiny_patch16_224"  # typo: difflib
    assert close_matches("", ["a", "b"]) == []


def test_a_key_compares_names_as_it_normalises_them():
    families = ["Next-ViT", "TinyViT", "MobileViG", "MobileNetV2", "DeiT"]
    assert close_matches("vit", families) == ["TinyViT", "Next-ViT"]
    assert close_matches("nextvit", families, key=lambda f: f.lower().replace("-", "")) == ["Next-ViT"]


def test_a_range_check_takes_both_of_its_bounds():
    """``[lo, hi]``, both ends in: --percentile 100 or a calibration set of the whole dataset are valid."""
    import pytest

    from leanvit.errors import LeanvitError, check_range

    for value in (0, 5, 0.0, 1.0):
        check_range("x", value, 0, 5 if isinstance(value, int) else 1.0)
    with pytest.raises(LeanvitError, match=r"x must be between 0.0 and 1.0, got 1.01\."):
        check_range("x", 1.01, 0.0, 1.0)
    with pytest.raises(LeanvitError, match=r"between 0 and 5, got -1"):
        check_range("x", -1, 0, 5)
