"""timm backbones (backbone.name=timm/<model>): built without their classifier, stage
aliases from timm's own grouping, timm's preprocessing, hub weights (cached, downloaded, or
random init and why), local checkpoints, a whole run."""

import json
import logging
from pathlib import Path

import pytest
import torch

from finetune.errors import ConfigError
from finetune.model.net import Weights, build_backbone, input_spec, resolve_weights
from finetune.model.stages import resolve_aliases
from finetune.run import build, run
from finetune.use.load import load_model

from conftest import FAST, make_config

pytest.importorskip("timm")  # the timm extra; CI installs dev, which includes it

RANDOM = Weights(None, "random init")
TINY = "backbone.name=timm/test_vit"  # 0.4M parameters; on the hub as timm/test_vit.r160_in1k

# family -> its stage count under timm's coarse grouping
FAMILIES = {"resnet18": 4, "convnext_atto": 4, "efficientnet_b0": 7, "vit_tiny_patch16_224": 12,
            "regnetx_002": 4, "mobilenetv3_small_050": 6, "swin_tiny_patch4_window7_224": 4}


def timm_backbone(name: str, *overrides: str):
    cfg = make_config(f"backbone.name=timm/{name}", *overrides).backbone
    return build_backbone(cfg, resolve_weights(cfg))


@pytest.mark.parametrize("name, stages", FAMILIES.items())
def test_stage_aliases_cover_every_parameter_once(name, stages):
    backbone = timm_backbone(name)
    aliases = resolve_aliases(backbone)
    assert aliases.stage_count == stages
    assert aliases.paths["@stage-1"] == aliases.paths[f"@stage{stages}"]
    covered = [path.removeprefix("pretrained.") for alias in ("@stem", *(f"@stage{i}" for i in
               range(1, stages + 1))) for path in aliases.paths[alias]]
    assert sorted(covered) == sorted(name for name, _ in backbone.named_parameters())
    assert len(covered) == len(set(covered))
    assert not hasattr(backbone, "fc") or isinstance(backbone.fc, torch.nn.Identity)


def test_a_kept_classifier_is_its_own_alias():
    aliases = resolve_aliases(timm_backbone("resnet18", "backbone.keep_classifier=true"))
    assert aliases.paths["@classifier"] == ["pretrained.fc.weight", "pretrained.fc.bias"]
    assert "pretrained.fc.weight" not in aliases.paths["@stage4"]


@pytest.mark.slow
def test_the_classifier_is_left_out_and_a_local_timm_checkpoint_loads(tmp_path):
    import timm

    torch.manual_seed(3)
    trained = timm.create_model("resnet18", num_classes=7)  # a full timm state dict, fc included
    torch.save(trained.state_dict(), tmp_path / "resnet18.pth")
    backbone = timm_backbone("resnet18", f"backbone.checkpoint={tmp_path}/resnet18.pth")
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, trained.state_dict()[name]), name
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 512)  # pooled features, no logits
    other = timm.create_model("convnext_atto")
    torch.save(other.state_dict(), tmp_path / "convnext.pth")
    with pytest.raises(ConfigError, match="does not match the backbone"):
        timm_backbone("resnet18", f"backbone.checkpoint={tmp_path}/convnext.pth")


def test_preprocessing_follows_timms_data_config():
    vit = timm_backbone("vit_tiny_patch16_224")
    spec = input_spec(vit, RANDOM, "timm/vit_tiny_patch16_224", 32, True)
    assert (spec.image_size, spec.resize_size) == (224, round(224 / 0.9))  # a fixed input size
    assert tuple(spec.mean) == (0.5, 0.5, 0.5) and spec.interpolation.value == "bicubic"
    convnext = timm_backbone("convnext_atto")
    spec = input_spec(convnext, RANDOM, "timm/convnext_atto", 64, True)
    assert (spec.image_size, spec.resize_size) == (64, round(64 / 0.875))


def test_a_misspelled_timm_name_is_named_with_the_closest():
    with pytest.raises(ConfigError, match=r"timm/convnext_atoo.*Did you mean 'convnext_atto'"):
        build(make_config(*FAST, "backbone.name=timm/convnext_atoo"))
    with pytest.raises(ConfigError, match="a timm backbone takes auto"):
        resolve_weights(make_config("backbone.name=timm/resnet18", "backbone.weights=DEFAULT").backbone)


@pytest.mark.slow
def test_a_timm_run_trains_loads_and_caches_a_frozen_backbone(tmp_path):
    overrides = (*FAST, "backbone.name=timm/convnext_atto", "trainer.max_epochs=2")
    run(make_config(*overrides), str(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["status"] == "ok"
    params = (tmp_path / "run" / "params.tsv").read_text()
    assert "pretrained.stem.0.weight\t" in params and "pretrained.stages.3." in params
    model = load_model(str(tmp_path / "run" / "checkpoints" / "best.pt"))
    labels, probabilities = model.predict(torch.randn(3, 3, 32, 32))
    assert len(labels) == 3 and probabilities.shape == (3, 10)
    probe = build(make_config(*overrides, "experiment=linear_probe"))
    assert probe.cache.enabled  # a frozen timm backbone is computed once, as any other


@pytest.fixture(autouse=True)
def hugging_face_hub_offline(monkeypatch, tmp_path):
    """huggingface_hub not in offline mode, but its requests fail as they do without a
    network, and its cache is the test's own: no test here reaches the hub."""
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise OSError(f"network disabled in tests: {args}")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def fake_hugging_face_cache(folder, repository: str, state: dict) -> str:
    """What huggingface_hub leaves after downloading `repository`'s model.safetensors; the
    file's path."""
    from safetensors.torch import save_file

    root = Path(folder) / f"models--{repository.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0123abcd")
    (root / "snapshots" / "0123abcd").mkdir(parents=True)
    path = str(root / "snapshots" / "0123abcd" / "model.safetensors")
    save_file({name: value.contiguous() for name, value in state.items()}, path)
    return path


def fake_hub(monkeypatch, state: dict, probe_error=None, download_error=None) -> list[str]:
    """A reachable hub: the metadata request answers (or raises `probe_error`) and
    hf_hub_download writes `state` into the cache as the real one does (or raises
    `download_error`). The requests made, in order."""
    import huggingface_hub

    calls = []

    def metadata(url, **kwargs):
        calls.append(f"metadata {url}")
        if probe_error is not None:
            raise probe_error
        return object()

    def download(repository, filename, cache_dir=None, **kwargs):
        calls.append(f"download {repository} {filename}")
        if download_error is not None:
            raise download_error
        return fake_hugging_face_cache(cache_dir, repository, state)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def tiny_release() -> tuple[dict, str]:
    """test_vit's weights as published (its classifier included), and their repository."""
    import timm

    torch.manual_seed(7)
    state = timm.create_model("test_vit").state_dict()
    return state, timm.models.get_pretrained_cfg("test_vit").hf_hub_id


def assert_loaded(backbone, state: dict) -> None:
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_auto_takes_the_weights_from_the_hugging_face_cache_else_random_init(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = make_config("backbone.name=timm/convnext_atto").backbone
    weights = resolve_weights(cfg)
    assert weights.file is None and not weights.pretrained
    assert "random init: the weights of timm/convnext_atto" in weights.description
    torch.manual_seed(5)
    released = timm.create_model("convnext_atto")  # as published: with its classifier
    repository = timm.models.get_pretrained_cfg("convnext_atto").hf_hub_id
    fake_hugging_face_cache(tmp_path / "hub", repository, released.state_dict())
    weights = resolve_weights(cfg)
    assert weights.pretrained and weights.file.endswith("model.safetensors")
    backbone = build_backbone(cfg, weights)
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, released.state_dict()[name]), name
    spec = input_spec(backbone, weights, cfg.name, 32, True)
    assert spec.image_size == 224  # the weights' own preprocessing
    assert resolve_weights(make_config("backbone.name=timm/convnext_atto",
                                       "backbone.weights=null").backbone).file is None


def test_auto_takes_cached_weights_without_a_request(tmp_path, monkeypatch):
    state, repository = tiny_release()
    path = fake_hugging_face_cache(tmp_path / "hub", repository, state)
    calls = fake_hub(monkeypatch, state)
    cfg = make_config(TINY).backbone
    weights = resolve_weights(cfg)
    assert calls == [] and weights.file == path
    assert weights.description == f"timm {repository} from the Hugging Face cache ({path})"
    assert_loaded(build_backbone(cfg, weights), state)


def test_auto_downloads_the_weights_into_the_cache_when_online(tmp_path, monkeypatch, caplog):
    state, repository = tiny_release()
    calls = fake_hub(monkeypatch, state)
    cfg = make_config(*FAST, TINY, "backbone.weights=auto")
    with caplog.at_level(logging.INFO, logger="finetune.run"):
        setup = build(cfg)
    path = str(tmp_path / "hub" / f"models--{repository.replace('/', '--')}" / "snapshots" /
               "0123abcd" / "model.safetensors")
    assert calls == [f"metadata https://huggingface.co/{repository}/resolve/main/model.safetensors",
                     f"download {repository} model.safetensors"]
    assert f"starts from timm {repository}, downloaded now ({path})" in caplog.text
    assert_loaded(setup.net.pretrained, state)
    assert "from the Hugging Face cache" in resolve_weights(cfg.backbone).description
    assert len(calls) == 2  # the next run takes it from the cache


@pytest.mark.parametrize("how", ["backbone.allow_download=false", "HF_HUB_OFFLINE=1"])
def test_no_request_without_download_permission(tmp_path, monkeypatch, how):
    state, repository = tiny_release()
    calls = fake_hub(monkeypatch, state)
    if how.startswith("HF_HUB_OFFLINE"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = resolve_weights(make_config(TINY, *([how] if how.startswith("backbone.") else [])).backbone)
    assert calls == [] and not weights.pretrained
    assert weights.description.startswith(
        f"random init: the weights of {repository} are not in the Hugging Face cache "
        f"({tmp_path / 'hub'}) and {how} (backbone.weights=auto). Download https://huggingface.co/"
        f"{repository}/resolve/main/model.safetensors on a machine with network and load it with "
        "backbone.checkpoint=PATH")


def test_a_failed_download_starts_from_random_init(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    state, repository = tiny_release()
    offline = LocalEntryNotFoundError("cannot find the requested files in the local cache")
    failures = ({"download_error": offline}, 2), ({"probe_error": OSError("Name or service not known")}, 1)
    for failure, requests in failures:
        calls = fake_hub(monkeypatch, state, **failure)
        weights = resolve_weights(make_config(TINY).backbone)
        assert not weights.pretrained and len(calls) == requests
        assert (f"and could not be downloaded from https://huggingface.co/{repository} "
                "(backbone.weights=auto)") in weights.description


def test_a_safetensors_checkpoint_loads_and_a_damaged_one_is_named(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(6)
    trained = timm.create_model("resnet18", num_classes=3)
    save_file(trained.state_dict(), str(tmp_path / "weights.safetensors"))
    backbone = timm_backbone("resnet18", f"backbone.checkpoint={tmp_path}/weights.safetensors")
    assert torch.equal(backbone.conv1.weight, trained.conv1.weight)
    (tmp_path / "damaged.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ConfigError, match="damaged.safetensors.*not a readable safetensors file"):
        timm_backbone("resnet18", f"backbone.checkpoint={tmp_path}/damaged.safetensors")


def test_the_builders_own_arguments_are_refused_in_backbone_kwargs():
    """config.TIMM_BUILDER_KWARGS is every argument of timm's builder but the layer flags,
    so a timm that adds one (a new way to name a file) fails here, not in a user's run."""
    import inspect

    import timm
    from timm.models import build_model_with_cfg

    from finetune.config.schemas import TIMM_BUILDER_KWARGS
    from finetune.config.validation import validate

    builder = {*inspect.signature(timm.create_model).parameters,
               *inspect.signature(build_model_with_cfg).parameters}
    assert set(TIMM_BUILDER_KWARGS) == builder - {"scriptable", "exportable", "no_jit"}
    cfg = make_config("backbone.name=timm/resnet10t", "+backbone.kwargs.checkpoint_path=/etc/passwd",
                      "+backbone.kwargs.drop_path_rate=0.1")
    with pytest.raises(ConfigError, match="backbone.kwargs='checkpoint_path' is not valid"):
        validate(cfg)

