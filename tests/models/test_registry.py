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


def test_a_user_set_offline_mode_is_left_on(monkeypatch):
    """With HF_HUB_OFFLINE already on (the user's HF_HUB_OFFLINE=1) there is nothing to probe, and it must stay on: the
    switch back after the call is only for the offline mode create_model turned on itself."""
    import huggingface_hub.constants as hub
    import torch

    from leanvit.models import registry

    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: torch.nn.Linear(1, 1))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(registry, "_hub_reachable", lambda endpoint: pytest.fail("probed the Hub in offline mode"))
    registry.create_model("deit_tiny_patch16_224", pretrained=True)
    assert hub.HF_HUB_OFFLINE is True


def test_the_hub_probe_connects_to_the_endpoints_host_and_port(monkeypatch):
    """The port is the URL's, else the scheme's (443 for https: the Hub's own endpoint has none), within the timeout."""
    import socket

    from leanvit.models.registry import _hub_reachable

    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    seen = []

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: seen.append((address, timeout)) or Connection())
    assert _hub_reachable("https://huggingface.co") and _hub_reachable("http://mirror.example:8080/hf", timeout=1.5)
    assert _hub_reachable("http://mirror.example")
    assert seen == [(("huggingface.co", 443), 3.0), (("mirror.example", 8080), 1.5), (("mirror.example", 80), 3.0)]


def test_a_catalog_name_keeps_a_tag_it_is_given_and_models_come_in_eval_mode(monkeypatch):
    """Only a bare catalog name gets the published tag: tiny_vit_5m_224.in1k is asked for by name (its own 79.1 %
    training), not swapped for dist_in22k_ft_in1k; other names pass as given. Every model comes back in eval mode
    (timm's are built in training mode: dropout and drop path on, BatchNorm updating its statistics)."""
    import torch

    built = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: built.append(name) or torch.nn.Dropout())
    for name in ("tiny_vit_5m_224", "tiny_vit_5m_224.in1k", "deit_tiny_patch16_224"):
        assert not create_model(name).training
    assert built == ["tiny_vit_5m_224.dist_in22k_ft_in1k", "tiny_vit_5m_224.in1k", "deit_tiny_patch16_224"]


def test_pretrained_num_classes_are_those_of_the_weights_create_model_loads():
    """A teacher's class count is checked before its download: for a bare catalog name it is the published tag's
    (tiny_vit_5m_224: 1,000; timm's default tag for it, dist_in22k, has 21,841), for a tagged name that tag's."""
    from leanvit.models.registry import pretrained_num_classes

    assert pretrained_num_classes("tiny_vit_5m_224") == 1000
    assert pretrained_num_classes("tiny_vit_5m_224.dist_in22k") == 21841
    assert pretrained_num_classes("deit_tiny_patch16_224") == 1000


def test_an_os_error_without_pretrained_weights_passes_unchanged(monkeypatch):
    """Only a pretrained download's OSError means 'not in the local cache'; a missing checkpoint_path file (a
    FileNotFoundError, an OSError too) must say what it is."""
    def missing(name, pretrained=False, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "weights.pth")

    monkeypatch.setattr(timm, "create_model", missing)
    with pytest.raises(FileNotFoundError, match="weights.pth"):
        create_model("deit_tiny_patch16_224", checkpoint_path="weights.pth")


def test_a_family_filter_reads_the_whole_file_only_where_timm_loads_from_that_file(tmp_path):
    """timm's file loader hands a family's filter the EMA of a trainer's checkpoint; whole_file_filter reads the file
    again whole (DDP's ``module.`` prefixes cleaned, as timm does) so the filter can take the evaluated weights. Where
    timm loads from another source the filter gets what timm gives: a ``state_dict`` beside the file comes first
    (timm's order), as does an explicit Hub source, and nothing is read without pretrained weights."""
    import torch

    from leanvit.models._pretrained import whole_file_filter

    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"module.w": torch.ones(1)}, "model_ema": {"module.w": torch.zeros(1)}, "epoch": 3}, path)
    seen = []

    def family_filter(state_dict, model):
        seen.append(state_dict)
        return state_dict

    for pretrained, overlay in [(False, dict(file=str(path))), (True, dict(file=str(path), state_dict={"w": torch.ones(1)})),
                                (True, dict(file=str(path), source="hf-hub")), (True, {})]:
        assert whole_file_filter(family_filter, pretrained, {"pretrained_cfg_overlay": overlay}) is family_filter
    reread = whole_file_filter(family_filter, True, {"pretrained_cfg": {"file": str(path)}})
    reread({"w": torch.zeros(1)}, None)  # what timm's file loader passes: the EMA
    assert seen[0].keys() == {"model", "model_ema", "epoch"} and torch.equal(seen[0]["model"]["w"], torch.ones(1))
