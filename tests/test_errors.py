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
