import pytest
import timm

from leanvit.catalog import CATALOG, find_facts, get_facts
from leanvit.errors import LeanvitError, UnknownModelError

FOUNDATION = [
    "efficientformer_l1", "efficientformer_l3", "efficientformer_l7",
    "efficientformerv2_s0", "efficientformerv2_s1", "efficientformerv2_s2", "efficientformerv2_l",
    "nextvit_small", "nextvit_base", "nextvit_large",
    "tiny_vit_5m_224", "tiny_vit_11m_224", "tiny_vit_21m_224",
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
    "mobilenetv2_100",
]


def test_catalog_covers_the_foundation_models():
    assert set(FOUNDATION) <= set(CATALOG)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_entry_is_a_registered_model_with_sane_facts(name):
    facts = CATALOG[name]
    assert timm.is_model(name)
    assert 0.5 < facts.params_m < 200 and 0.05 < facts.gmacs < 60 and 50 < facts.top1 < 90
    assert facts.source


def test_tag_is_kept_out_of_the_lookup():
    assert get_facts("efficientformer_l1.snap_dist_in1k").name == "efficientformer_l1"
    assert get_facts("tiny_vit_5m_224").model_id == "tiny_vit_5m_224.dist_in22k_ft_in1k"


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UnknownModelError, match="efficientformer_l1"):
        get_facts("efficientformer_l2")


def test_a_tag_with_another_head_has_no_published_facts():
    """tiny_vit_5m_224.dist_in22k has 21,841 classes (12.1 M parameters): the published 5.4 M are the 1k model's."""
    assert find_facts("tiny_vit_5m_224.dist_in22k") is None
    assert find_facts("tiny_vit_5m_224.in1k").name == find_facts("tiny_vit_5m_224").name == "tiny_vit_5m_224"
    assert find_facts("deit_tiny_patch16_224", num_classes=10) is None
    with pytest.raises(LeanvitError, match="published figure is for the 1000-class head .*this one has 21841"):
        get_facts("tiny_vit_5m_224.dist_in22k")
