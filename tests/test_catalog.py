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


#: (params M, GMACs, top-1 %, img_size, {tag: top-1 % of that training}) of the families timm provides, restated from
#: the papers / official READMEs as ../shared/specs records them (zoo-hybrids.md sections 1-3, zoo-vits-and-methods.md
#: TinyViT and DeiT), independently of the catalog; MobileNetV2 from its paper's Table 4.
PUBLISHED_TIMM = {
    # EfficientFormer paper via the RepViT table (the V1 README has no params / MACs); top-1 300 epochs, 80.2 for
    # the 1000-epoch L1 that timm's snap_dist_in1k weights are
    "efficientformer_l1": (12.3, 1.3, 79.2, 224, {"snap_dist_in1k": 80.2}),
    "efficientformer_l3": (31.3, 3.9, 82.4, 224, {}), "efficientformer_l7": (82.1, 10.2, 83.3, 224, {}),
    # EfficientFormerV2 README, 450-epoch top-1
    "efficientformerv2_s0": (3.5, 0.40, 76.2, 224, {}), "efficientformerv2_s1": (6.1, 0.65, 79.7, 224, {}),
    "efficientformerv2_s2": (12.6, 1.25, 82.0, 224, {}), "efficientformerv2_l": (26.1, 2.56, 83.5, 224, {}),
    # Next-ViT README: ImageNet-1k training, and the SSLD-6M one at 224
    "nextvit_small": (31.7, 5.8, 82.5, 224, {"bd_ssld_6m_in1k": 84.8}),
    "nextvit_base": (44.8, 8.3, 83.2, 224, {"bd_ssld_6m_in1k": 85.1}),
    "nextvit_large": (57.8, 10.8, 83.6, 224, {"bd_ssld_6m_in1k": 85.4}),
    # TinyViT README: IN-22k distilled -> 1k, and ImageNet-1k only
    "tiny_vit_5m_224": (5.4, 1.3, 80.7, 224, {"in1k": 79.1}), "tiny_vit_11m_224": (11.0, 2.0, 83.2, 224, {"in1k": 81.5}),
    "tiny_vit_21m_224": (21.0, 4.3, 84.8, 224, {"in1k": 83.1}),
    "tiny_vit_21m_384": (21.0, 13.8, 86.2, 384, {}), "tiny_vit_21m_512": (21.0, 27.0, 86.5, 512, {}),
    # DeiT README top-1; params and GMACs timm's
    "deit_tiny_patch16_224": (5.72, 1.26, 72.2, 224, {}), "deit_small_patch16_224": (22.05, 4.61, 79.9, 224, {}),
    "deit_base_patch16_224": (86.57, 17.58, 81.8, 224, {}),
    "deit_tiny_distilled_patch16_224": (5.91, 1.27, 74.5, 224, {}),
    "deit_small_distilled_patch16_224": (22.44, 4.63, 81.2, 224, {}),
    "deit_base_distilled_patch16_224": (87.34, 17.68, 83.4, 224, {}),
    "deit_base_patch16_384": (86.86, 55.54, 82.9, 384, {}), "deit_base_distilled_patch16_384": (87.63, 55.65, 85.2, 384, {}),
    "mobilenetv2_100": (3.4, 0.30, 72.0, 224, {}),
}


def test_timm_families_have_their_published_figures():
    ours = {f.name: (f.params_m, f.gmacs, f.top1, f.img_size, dict(f.tag_top1))
            for f in CATALOG.values() if f.provider == "timm"}
    assert ours == PUBLISHED_TIMM
    assert all(CATALOG[n].num_classes == 1000 for n in PUBLISHED_TIMM)  # every figure is an ImageNet-1k model's


def test_the_top1_of_a_tagged_training_is_its_own():
    """bench plots a model's measured accuracy against top1_for(its name): a tag with its own training (TinyViT's 1k-only,
    Next-ViT's SSLD) has its own figure, any other name the entry's. Each such tag is one timm registers for the
    model: a misspelt one would never match a name, and the entry's figure would stand for that training."""
    assert CATALOG["tiny_vit_5m_224"].top1_for("tiny_vit_5m_224.in1k") == 79.1
    assert CATALOG["tiny_vit_5m_224"].top1_for("tiny_vit_5m_224") == 80.7
    assert CATALOG["tiny_vit_5m_224"].top1_for("tiny_vit_5m_224.dist_in22k_ft_in1k") == 80.7
    assert CATALOG["efficientformer_l1"].top1_for("efficientformer_l1.snap_dist_in1k") == 80.2
    assert CATALOG["nextvit_base"].top1_for("nextvit_base.bd_ssld_6m_in1k") == 85.1
    assert CATALOG["nextvit_base"].top1_for("nextvit_base.bd_in1k") == 83.2
    for facts in CATALOG.values():
        tags = {name.partition(".")[2] for name in timm.models.get_arch_pretrained_cfgs(facts.name)}
        assert {tag for tag, _ in facts.tag_top1} <= tags, facts.name


#: (figures in the order given, device) of each paper's own speed figure (ms, or img/s for TinyViT), restated from
#: ../shared/specs/zoo-hybrids.md and zoo-vits-and-methods.md; None where the sources give none of their own (DeiT's
#: table is timm's RTX 4090 run, MobileViG S / M only RepViT's re-measure, VCMamba and EfficientMod s_conv none).
#: MobileNetV2: its paper's Table 4.
PUBLISHED_SPEED = {
    "efficientformer_l1": ((1.6,), "iPhone 12"), "efficientformer_l3": ((3.0,), "iPhone 12"),
    "efficientformer_l7": ((7.0,), "iPhone 12"),
    "efficientformerv2_s0": ((0.9,), "iPhone 12"), "efficientformerv2_s1": ((1.1,), "iPhone 12"),
    "efficientformerv2_s2": ((1.6,), "iPhone 12"), "efficientformerv2_l": ((2.7,), "iPhone 12"),
    "nextvit_small": ((3.5, 7.7), "iPhone 12 Pro Max"), "nextvit_base": ((4.5, 10.5), "iPhone 12 Pro Max"),
    "nextvit_large": ((5.5, 13.0), "iPhone 12 Pro Max"),
    "tiny_vit_5m_224": ((3060,), "V100"), "tiny_vit_11m_224": ((2468,), "V100"), "tiny_vit_21m_224": ((1571,), "V100"),
    "tiny_vit_21m_384": ((394,), "V100"), "tiny_vit_21m_512": ((167,), "V100"),
    **{name: None for name in ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
                               "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
                               "deit_base_distilled_patch16_224", "deit_base_patch16_384",
                               "deit_base_distilled_patch16_384", "mobilevig_s", "mobilevig_m", "efficientmod_s_conv",
                               "vcmamba_s", "vcmamba_m", "vcmamba_b")},
    "mobilevig_ti": ((0.78,), "iPhone 13 Mini"), "mobilevig_b": ((2.30,), "iPhone 13 Mini"),
    "efficientmod_xxs": ((10.2, 3.0), "Xeon E5-2680"), "efficientmod_xs": ((13.4, 3.6), "Xeon E5-2680"),
    "efficientmod_s": ((23.5, 5.5), "Xeon E5-2680"),
    "fcaformer_l1": ((312,), "Cortex-A17"), "fcaformer_l2": ((728,), "Cortex-A17"),
    "fcaformer_l3": ((1344,), "Cortex-A17"), "fcaformer_l4": ((2624,), "Cortex-A17"),
    "mobilenetv2_100": ((75,), "Pixel 1"),
}


def test_every_speed_figure_is_the_papers_own_on_its_device():
    """``leanvit models`` prints these and ``leanvit bench`` plots measured latency against them."""
    import re

    figures = {facts.name: tuple(float(f.replace(",", "")) for f in re.findall(r"(\d[\d,]*(?:\.\d+)?) (?:ms|img/s)",
                                                                                 facts.speed or "")) or None
               for facts in CATALOG.values()}
    assert figures == {name: published and published[0] for name, published in PUBLISHED_SPEED.items()}
    for name, published in PUBLISHED_SPEED.items():
        assert published is None or published[1] in CATALOG[name].speed, name


def test_the_built_models_class_count_decides_over_its_tags():
    """tiny_vit_5m_224.dist_in22k given a 1000-class head (``num_classes=1000``) is the published model's size."""
    assert find_facts("tiny_vit_5m_224.dist_in22k", num_classes=1000).name == "tiny_vit_5m_224"
