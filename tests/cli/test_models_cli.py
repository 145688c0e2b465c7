"""`leanvit models --family`: an unknown family's hints."""
import pytest

from leanvit.cli import main


@pytest.mark.parametrize("family, hints", [("vit", "Next-ViT, TinyViT"), ("mobile", "MobileViG, MobileNetV2"),
                                           ("MOBILENET", "MobileNetV2, MobileViG")])
def test_family_hints_ignore_case_and_hyphens(capsys, family, hints):
    assert main(["models", "--family", family]) == 2
    assert f"(did you mean {hints}?)" in capsys.readouterr().err
