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


#: (params M, GMACs, top-1 %) of the families leanvit provides, restated from the papers / official READMEs as
#: ../shared/specs/zoo-hybrids.md records them (sections 4-7), independently of the catalog.
PUBLISHED = {
    # MobileViG, arXiv 2307.00395 (Ti / B top-1 from its abstract; params, GMACs and S / M top-1 as the RepViT
    # comparison table restates the paper's)
    "mobilevig_ti": (5.2, 0.7, 75.7), "mobilevig_s": (7.2, 1.0, 78.2),
    "mobilevig_m": (14.0, 1.5, 80.6), "mobilevig_b": (26.7, 2.8, 82.6),
    # EfficientMod: README params and (distilled) top-1, paper Tables 1-3 FLOPs
    "efficientmod_xxs": (4.7, 0.6, 77.1), "efficientmod_xs": (6.6, 0.8, 79.4),
    "efficientmod_s": (12.9, 1.4, 81.9), "efficientmod_s_conv": (12.9, 1.5, 80.5),
    # FcaFormer README (L1 MACs, L3 / L4 params: the more precise comments beside the official model functions,
    # 1.37 G / 27.9 M / 65.6 M, which the README rounds to 1.4 / 28 / 66)
    "fcaformer_l1": (6.2, 1.37, 80.3), "fcaformer_l2": (16.3, 3.6, 83.1),
    "fcaformer_l3": (27.9, 6.7, 84.2), "fcaformer_l4": (65.6, 14.5, 84.9),
    # VCMamba README
    "vcmamba_s": (10.5, 1.1, 78.7), "vcmamba_m": (21.0, 2.3, 81.5), "vcmamba_b": (31.5, 4.0, 82.6),
}


def test_leanvits_own_families_have_their_published_figures():
    ours = {f.name: (f.params_m, f.gmacs, f.top1) for f in CATALOG.values() if f.provider == "leanvit"}
    assert ours == PUBLISHED
    assert all(CATALOG[n].num_classes == 1000 and CATALOG[n].img_size == 224 for n in PUBLISHED)
