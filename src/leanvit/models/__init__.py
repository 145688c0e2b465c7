"""The model zoo: efficient backbones timm lacks, one file per family, registered with timm.

Importing a family module runs its ``@register_model`` factories; ``leanvit.models.registry``
resolves names across timm and these families.
"""
from __future__ import annotations

import importlib

#: Family modules in this package. Each registers its variants with timm on import.
FAMILIES: tuple[str, ...] = ("mobilevig", "efficientmod", "fcaformer", "vcmamba")

for _family in FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")
