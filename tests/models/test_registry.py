"""leanvit's create_model: timm's, with one-line errors that name the fix."""
import pytest
import timm

from leanvit.errors import InputSizeError, LeanvitError, UnknownModelError
from leanvit.models.registry import create_model, resolve_model_name


def test_pretrained_weights_offline_name_the_file_flags(monkeypatch):
    def offline(name, pretrained=False, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")  # what huggingface_hub raises offline

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(LeanvitError, match=r"not in the local cache.*--checkpoint FILE; train: --init-checkpoint FILE; "
                                           r"a teacher: --teacher-checkpoint FILE; bench times random weights: drop "
                                           r"--pretrained"):
        create_model("resnet18", pretrained=True)


def test_an_unknown_pretrained_tag_names_the_valid_ones():
    """timm's own error is a RuntimeError from inside create_model (a traceback in the CLI)."""
    with pytest.raises(UnknownModelError, match=r"Unknown pretrained tag 'bogus' for deit_tiny_patch16_224\. "
                                                r"Its tags: deit_tiny_patch16_224\.fb_in1k\.$"):
        resolve_model_name("deit_tiny_patch16_224.bogus")
    with pytest.raises(UnknownModelError, match="It has none: use 'mobilevig_ti'"):
        resolve_model_name("mobilevig_ti.in1k")
    # registered tags without downloadable weights build too
    assert resolve_model_name("vit_large_patch14_224.untrained") == "vit_large_patch14_224.untrained"
    assert resolve_model_name("deit_tiny_patch16_224.fb_in1k") == "deit_tiny_patch16_224.fb_in1k"


def test_pretrained_without_registered_weights_names_the_file_flags():
    """timm's 'No pretrained weights exist' RuntimeError was a traceback from `leanvit eval MODEL --pretrained`."""
    with pytest.raises(LeanvitError, match=r"mobilevig_ti has no pretrained weights registered with timm.*"
                                           r"--checkpoint FILE.*drop --pretrained"):
        create_model("mobilevig_ti", pretrained=True)
    with pytest.raises(LeanvitError, match=r"Baidu pan"):  # the cfg's notes say where the official weights are
        create_model("fcaformer_l2", pretrained=True)


@pytest.mark.parametrize("kwargs, why", [
    ({"embed_dim": 100}, "AssertionError: dim should be divisible by num_heads"),  # timm's asserts
    ({"img_size": 0}, "ValueError: Expected a positive image size"),
])
def test_a_model_kwarg_value_the_constructor_refuses_is_a_one_line_error(kwargs, why):
    with pytest.raises(LeanvitError, match=rf"deit_tiny_patch16_224 cannot be built with the model kwargs .*\({why}"):
        create_model("deit_tiny_patch16_224", **kwargs)


def test_leanvits_own_errors_from_a_constructor_pass_unchanged(monkeypatch):
    """An InputSizeError is a ValueError too: its own fix, not the kwargs wording."""
    def refuses(name, pretrained=False, **kwargs):
        raise InputSizeError("takes 224x224 inputs only: pass --img-size 224")

    monkeypatch.setattr(timm, "create_model", refuses)
    with pytest.raises(InputSizeError, match="^takes 224x224 inputs only: pass --img-size 224$"):
        create_model("deit_tiny_patch16_224", img_size=100)


def test_pretrained_weights_are_read_from_the_cache_at_once_when_the_hub_is_unreachable(monkeypatch):
    """With no network a download retried for most of a minute, printing each retry, before reading the cache (56 s
    for weights not cached): while the Hub cannot be reached huggingface_hub runs in its offline mode."""
    import huggingface_hub.constants as hub
    import torch

    from leanvit.models import registry

    seen = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: seen.append(hub.HF_HUB_OFFLINE) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    for reachable in (False, True):
        monkeypatch.setattr(registry, "_hub_reachable", lambda endpoint: reachable)
        registry.create_model("deit_tiny_patch16_224", pretrained=True)
        registry.create_model("deit_tiny_patch16_224")  # no weights: no probe
    assert seen == [True, False, False, False] and hub.HF_HUB_OFFLINE is False


def test_the_hub_probe(monkeypatch):
    from leanvit.models.registry import _hub_reachable

    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    assert not _hub_reachable("http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert _hub_reachable("http://127.0.0.1:9")  # behind a proxy a direct connection proves nothing


def test_a_catalog_name_gets_its_published_tag():
    """A bare catalog name builds the published configuration: tiny_vit_5m_224's default tag would be a 21,841-class
    head; the catalog's tag is dist_in22k_ft_in1k (1,000 classes, the published 5.4 M / 79.1 %)."""
    model = create_model("tiny_vit_5m_224")
    assert model.num_classes == 1000 and model.pretrained_cfg["tag"] == "dist_in22k_ft_in1k"
