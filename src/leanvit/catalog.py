"""Published facts of the models leanvit covers, in one table.

Each entry is what the model's paper or official repository reports (see ``../shared/specs`` in
the development tree for the sources): parameters, multiply-accumulates at the reference
resolution, ImageNet-1k top-1 and the paper's own speed figure with the device it was measured on.
These are the anchors ``leanvit profile`` compares against and ``leanvit bench`` plots measured
latency against. Numbers are *published*, never measured here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from timm.models import get_arch_pretrained_cfgs

from .errors import LeanvitError, UnknownModelError, close_matches


@dataclass(frozen=True)
class ModelFacts:
    name: str  #: timm / leanvit registered name
    family: str
    params_m: float  #: published parameters, millions (distillation head included where it has one)
    gmacs: float  #: published multiply-accumulates, G, at ``img_size``
    top1: float  #: published ImageNet-1k top-1, %
    speed: str | None  #: the paper's own latency/throughput figure, with its device; None if none
    source: str  #: where the numbers come from
    img_size: int = 224
    provider: str = "timm"  #: "timm" or "leanvit" (leanvit's own model file)
    tag: str | None = None  #: timm pretrained tag whose head matches the published model
    note: str | None = None  #: how the published figure was counted, where that differs from ours
    num_classes: int = 1000  #: classes of the published model's head (ImageNet-1k)
    #: the published top-1 of other trainings of the model, by timm pretrained tag (TinyViT trained on 1k only)
    tag_top1: tuple[tuple[str, float], ...] = ()

    def top1_for(self, name: str) -> float:
        """The published top-1 of ``name``: its pretrained tag's where that training has its own figure."""
        return dict(self.tag_top1).get(name.partition(".")[2], self.top1)

    @property
    def model_id(self) -> str:
        """The name to pass to ``timm.create_model`` to get the published configuration."""
        return f"{self.name}.{self.tag}" if self.tag else self.name

    def to_dict(self) -> dict:
        return asdict(self)


def _f(name, family, params_m, gmacs, top1, speed, source, **kw) -> ModelFacts:
    return ModelFacts(name, family, params_m, gmacs, top1, speed, source, **kw)


_EF1 = "EfficientFormer paper (params/MACs via RepViT table; timm agrees), snap-research README"
_EF2 = "snap-research/EfficientFormer README (V2, 450-epoch top-1)"
_NXT = "bytedance/Next-ViT README"
_TVT = "microsoft/Cream TinyViT README (top-1: IN-22k distilled -> 1k)"
_DEIT = "facebookresearch/deit README (top-1); params/GMACs: timm's count"
_MVIG = "MobileViG paper (arXiv 2307.00395) / RepViT comparison table"
_EMOD = "ma-xu/EfficientMod README (params, top-1 distilled); FLOPs and latency: paper Tables 1-3"
_FCA = "hkzhang-git/FcaFormer README (L1 GMACs, L3/L4 params: the official code's more precise comments)"
_VCM = "Wertyuui345/VCMamba README"
_FCA_QUERIES = ("the official model also projects queries for the cross tokens and discards them, work leanvit skips: ")

CATALOG: dict[str, ModelFacts] = {f.name: f for f in [
    # --- EfficientFormer V1 (timm) ---
    _f("efficientformer_l1", "EfficientFormer", 12.3, 1.3, 79.2, "1.6 ms, iPhone 12 (CoreML)", _EF1,
       tag_top1=(("snap_dist_in1k", 80.2),),
       note="top-1 79.2 is the paper's 300-epoch model; timm's weights (snap_dist_in1k) are the 1000-epoch one, 80.2"),
    _f("efficientformer_l3", "EfficientFormer", 31.3, 3.9, 82.4, "3.0 ms, iPhone 12 (CoreML)", _EF1),
    _f("efficientformer_l7", "EfficientFormer", 82.1, 10.2, 83.3, "7.0 ms, iPhone 12 (CoreML)", _EF1),
    # --- EfficientFormer V2 (timm) ---
    _f("efficientformerv2_s0", "EfficientFormerV2", 3.5, 0.40, 76.2, "0.9 ms, iPhone 12 (CoreML)", _EF2,
       note="the README's parameters leave BatchNorm out: 3.55 M by that rule"),
    _f("efficientformerv2_s1", "EfficientFormerV2", 6.1, 0.65, 79.7, "1.1 ms, iPhone 12 (CoreML)", _EF2),
    _f("efficientformerv2_s2", "EfficientFormerV2", 12.6, 1.25, 82.0, "1.6 ms, iPhone 12 (CoreML)", _EF2),
    _f("efficientformerv2_l", "EfficientFormerV2", 26.1, 2.56, 83.5, "2.7 ms, iPhone 12 (CoreML)", _EF2),
    # --- Next-ViT (timm) ---
    _f("nextvit_small", "Next-ViT", 31.7, 5.8, 82.5, "3.5 ms, iPhone 12 Pro Max (CoreML); 7.7 ms TensorRT fp16", _NXT,
       tag_top1=(("bd_ssld_6m_in1k", 84.8),)),
    _f("nextvit_base", "Next-ViT", 44.8, 8.3, 83.2, "4.5 ms, iPhone 12 Pro Max (CoreML); 10.5 ms TensorRT fp16", _NXT,
       tag_top1=(("bd_ssld_6m_in1k", 85.1),)),
    _f("nextvit_large", "Next-ViT", 57.8, 10.8, 83.6, "5.5 ms, iPhone 12 Pro Max (CoreML); 13.0 ms TensorRT fp16", _NXT,
       tag_top1=(("bd_ssld_6m_in1k", 85.4),)),
    # --- TinyViT (timm) ---
    _f("tiny_vit_5m_224", "TinyViT", 5.4, 1.3, 80.7, "3,060 img/s throughput, V100", _TVT, tag="dist_in22k_ft_in1k",
       tag_top1=(("in1k", 79.1),), note="1.3 GMACs is printed to one digit (1.255 rounds to it)"),
    _f("tiny_vit_11m_224", "TinyViT", 11.0, 2.0, 83.2, "2,468 img/s throughput, V100", _TVT, tag="dist_in22k_ft_in1k",
       tag_top1=(("in1k", 81.5),)),
    _f("tiny_vit_21m_224", "TinyViT", 21.0, 4.3, 84.8, "1,571 img/s throughput, V100", _TVT, tag="dist_in22k_ft_in1k",
       tag_top1=(("in1k", 83.1),)),
    _f("tiny_vit_21m_384", "TinyViT", 21.0, 13.8, 86.2, "394 img/s throughput, V100", _TVT, tag="dist_in22k_ft_in1k",
       img_size=384),
    _f("tiny_vit_21m_512", "TinyViT", 21.0, 27.0, 86.5, "167 img/s throughput, V100", _TVT, tag="dist_in22k_ft_in1k",
       img_size=512),
    # --- DeiT (timm) ---
    _f("deit_tiny_patch16_224", "DeiT", 5.72, 1.26, 72.2, None, _DEIT),
    _f("deit_small_patch16_224", "DeiT", 22.05, 4.61, 79.9, None, _DEIT),
    _f("deit_base_patch16_224", "DeiT", 86.57, 17.58, 81.8, None, _DEIT),
    _f("deit_tiny_distilled_patch16_224", "DeiT", 5.91, 1.27, 74.5, None, _DEIT),
    _f("deit_small_distilled_patch16_224", "DeiT", 22.44, 4.63, 81.2, None, _DEIT),
    _f("deit_base_distilled_patch16_224", "DeiT", 87.34, 17.68, 83.4, None, _DEIT),
    _f("deit_base_patch16_384", "DeiT", 86.86, 55.54, 82.9, None, _DEIT, img_size=384),
    _f("deit_base_distilled_patch16_384", "DeiT", 87.63, 55.65, 85.2, None, _DEIT, img_size=384),
    # --- MobileViG (leanvit) --- params: the paper's counter leaves BatchNorm out (true count +0.5-1.4 %)
    _f("mobilevig_ti", "MobileViG", 5.2, 0.7, 75.7, "0.78 ms, iPhone 13 Mini NPU (CoreML)", _MVIG, provider="leanvit",
       note="the paper's counter (official util/profile.py) leaves BatchNorm out: 5.24 M by that rule; "
            "0.7 GMACs is printed to one digit (0.662 rounds to it)"),
    _f("mobilevig_s", "MobileViG", 7.2, 1.0, 78.2, None, _MVIG, provider="leanvit",
       note="the paper's counter leaves BatchNorm out: 7.23 M by that rule"),
    _f("mobilevig_m", "MobileViG", 14.0, 1.5, 80.6, None, _MVIG, provider="leanvit"),
    _f("mobilevig_b", "MobileViG", 26.7, 2.8, 82.6, "2.30 ms, iPhone 13 Mini NPU (CoreML)", _MVIG, provider="leanvit"),
    # --- EfficientMod (leanvit) ---
    _f("efficientmod_xxs", "EfficientMod", 4.7, 0.6, 77.1, "10.2 ms, Xeon E5-2680 4 threads (ONNX); 3.0 ms P100", _EMOD, provider="leanvit",
       note="0.6 GMACs is printed to one digit (0.579 rounds to it)"),
    _f("efficientmod_xs", "EfficientMod", 6.6, 0.8, 79.4, "13.4 ms, Xeon E5-2680 4 threads (ONNX); 3.6 ms P100", _EMOD, provider="leanvit",
       note="0.8 GMACs is printed to one digit (0.773 rounds to it)"),
    _f("efficientmod_s", "EfficientMod", 12.9, 1.4, 81.9, "23.5 ms, Xeon E5-2680 4 threads (ONNX); 5.5 ms P100", _EMOD, provider="leanvit"),
    _f("efficientmod_s_conv", "EfficientMod", 12.9, 1.5, 80.5, None, _EMOD, provider="leanvit"),
    # --- FcaFormer (leanvit) --- latency: ARM Cortex-A17, 4 threads, batch 1
    _f("fcaformer_l1", "FcaFormer", 6.2, 1.37, 80.3, "312 ms, ARM Cortex-A17 4 threads", _FCA, provider="leanvit"),
    _f("fcaformer_l2", "FcaFormer", 16.3, 3.6, 83.1, "728 ms, ARM Cortex-A17 4 threads", _FCA, provider="leanvit"),
    _f("fcaformer_l3", "FcaFormer", 27.9, 6.7, 84.2, "1344 ms, ARM Cortex-A17 4 threads", _FCA, provider="leanvit",
       note=_FCA_QUERIES + "6.65 G with them"),
    _f("fcaformer_l4", "FcaFormer", 65.6, 14.5, 84.9, "2624 ms, ARM Cortex-A17 4 threads", _FCA, provider="leanvit",
       note=_FCA_QUERIES + "14.49 G with them"),
    # --- VCMamba (leanvit) --- GMACs: the README's are fvcore counts, which include norm layers
    _f("vcmamba_s", "VCMamba", 10.5, 1.1, 78.7, None, _VCM, provider="leanvit",
       note="the README's GMACs are fvcore counts, which include norm layers: 1.062 G by that rule"),
    _f("vcmamba_m", "VCMamba", 21.0, 2.3, 81.5, None, _VCM, provider="leanvit"),
    _f("vcmamba_b", "VCMamba", 31.5, 4.0, 82.6, None, _VCM, provider="leanvit"),
    # --- CNN reference (timm) ---
    _f("mobilenetv2_100", "MobileNetV2", 3.4, 0.30, 72.0, "75 ms, Google Pixel 1 CPU (TFLite)",
       "MobileNetV2 paper (Sandler et al. 2018), Table 4"),
]}


def get_facts(name: str) -> ModelFacts:
    """The published facts for ``name``; a pretrained tag (``.snap_dist_in1k``) is ignored if its head is the
    published model's, else a :class:`LeanvitError` says the figures are another model's."""
    arch = name.split(".", 1)[0]
    if arch in CATALOG:
        mismatch = head_mismatch(CATALOG[arch], name)
        if mismatch:
            raise LeanvitError(f"No published facts for '{name}': {mismatch}.")
        return CATALOG[arch]
    hints = close_matches(arch, CATALOG)
    hint = f" Did you mean: {', '.join(hints)}?" if hints else ""
    raise UnknownModelError(f"'{name}' is not in leanvit's catalog.{hint} See `leanvit models`.")


def find_facts(name: str, num_classes: int | None = None) -> ModelFacts | None:
    """Like :func:`get_facts` but ``None`` for models outside the catalog (any timm model) and for a variant whose
    head is not the published model's (see :func:`head_mismatch`): its parameters and top-1 are another model's."""
    facts = CATALOG.get(name.split(".", 1)[0])
    return facts if facts is not None and not head_mismatch(facts, name, num_classes) else None


def head_mismatch(facts: ModelFacts, name: str, num_classes: int | None = None) -> str | None:
    """Why ``facts`` do not describe ``name`` (None where they do): its classifier has another class count,
    ``num_classes`` where given (the built model's), else that of ``name``'s pretrained tag
    (``tiny_vit_5m_224.dist_in22k``: 21,841 classes, 12.1 M parameters against the 1k model's 5.4 M)."""
    if num_classes is None and "." in name:
        cfg = get_arch_pretrained_cfgs(facts.name).get(name.rstrip("."))
        num_classes = getattr(cfg, "num_classes", None)
    if num_classes is None or num_classes == facts.num_classes:
        return None
    return (f"the published figure is for the {facts.num_classes}-class head ({facts.model_id}); "
            f"this one has {num_classes}")
