"""leanvit's create_model: timm's, with one-line errors that name the fix."""
import pytest
import timm

from leanvit.errors import LeanvitError
from leanvit.models.registry import create_model


def test_pretrained_weights_offline_name_the_file_flags(monkeypatch):
    def offline(name, pretrained=False, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")  # what huggingface_hub raises offline

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(LeanvitError, match=r"not in the local cache.*--checkpoint FILE; a teacher: "
                                           r"--teacher-checkpoint FILE; bench times random weights: drop --pretrained"):
        create_model("resnet18", pretrained=True)
