"""What the console shows: the config view, the progress bar, --help; fresh run directories."""

import io
import re
import shlex
import sys
import threading

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from finetune.config.store import new_dir
from finetune.run import build
from finetune.show.console import app_choices, choice_overrides, config_view
from finetune.train.trainer import Step, train_one_epoch

from conftest import CONF_DIR, FAST, make_config, run_cli


def composed(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_the_config_view_names_the_groups_and_only_the_keys_that_changed():
    choices = app_choices({"hydra/launcher": "basic", "scheduler": "cosine", "backbone": "resnet18",
                           "experiment": "linear_probe", "head": "linear", "hparams_search": None,
                           "data": "digits", "optimizer": "sgd", "logger": "csv"})
    assert list(choices) == ["backbone", "head", "data", "optimizer", "scheduler", "logger",
                             "experiment"]
    defaults = composed(*choice_overrides(choices))  # the presets' changes stay visible
    config = composed("experiment=linear_probe", "optimizer.lr=0.2", "trainer.max_epochs=3",
                      "+backbone.kwargs.dropout=0.3")
    lines = config_view(choices, config, defaults).splitlines()
    assert lines[0] == ("config: backbone=resnet18  head=linear  data=digits  optimizer=sgd  "
                        "scheduler=cosine  logger=csv  experiment=linear_probe")
    assert sorted(lines[2:]) == sorted([
        "  optimizer.lr: 0.2  (default: 0.05)", "  trainer.max_epochs: 3  (default: 10)",
        '  freeze: ["@backbone"]  (default: ["@stem", "@stage1"])',
        "  backbone.kwargs.dropout: 0.3  (new)"])  # scheduler.T_max follows max_epochs: not listed


@pytest.mark.parametrize("overrides, shown", [
    (["backbone.name=timm/vit_small_patch16_224"], "backbone=timm/vit_small_patch16_224  head=linear"),
    (["backbone=resnet50"], "backbone=resnet50  head=linear"),
    (["experiment=seed"], "backbone=alexnet  head=seed"),  # a preset's choice
    (["experiment=seed", "backbone.name=resnet18"], "backbone=resnet18  head=seed"),
])
def test_the_config_view_names_the_backbone_actually_built(overrides, shown):
    choices = app_choices(OmegaConf.to_container(composed(*overrides, hydra=True).hydra.runtime.choices))
    view = config_view(choices, composed(*overrides), composed(*choice_overrides(choices)))
    assert view.startswith(f"config: {shown}"), view


def test_the_progress_bar_shows_loss_accuracy_and_learning_rate_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    setup = build(make_config(*FAST))
    for stream, expect_bar in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        train_one_epoch(setup.net, setup.data.train_loader, setup.optimizer,
                        Step(setup.net, setup.device), 1, 3)
        shown = stream.getvalue()
        if expect_bar:
            assert "epoch 1/3" in shown and re.search(r"loss=[\d.]+, acc=[\d.]+, lr=0.05", shown)
        else:
            assert shown == ""  # not a terminal (CI, SLURM logs): no bar at all


@pytest.mark.slow
def test_help_lists_groups_options_main_keys_and_examples_that_compose():
    result = run_cli("--help")  # in-process; test_cli runs `finetune --help` as a process
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for group in sorted(path for path in CONF_DIR.iterdir() if path.is_dir() and path.name != "hydra"):
        options = ", ".join(sorted(option.stem for option in group.glob("*.yaml")))
        assert f"\n{group.name}: {options}\n" in text
    assert "schema" not in text  # the typed schemas are not groups to choose
    keys_section = text.split("== Main keys: key=value ==\n")[1].split("\n\n")[0]
    config = composed("data=csv", hydra=True)  # its keys: imagefolder's (root, augment) and file
    for line in keys_section.splitlines():
        for key in line[:24].strip().split(", "):  # "param_groups, lr_decay  per-part ..."
            parent, _, leaf = key.rpartition(".")  # looked up, not resolved: no run directory
            assert leaf in (OmegaConf.select(config, parent) if parent else config), key
    examples = [shlex.split(line.split("  #")[0])[2:] for line in text.splitlines()
                if line.startswith("python train.py")]
    assert len(examples) >= 5
    for arguments in examples:  # the sweep and resume examples also stand in the README,
        if "-m" not in arguments and not any(a.startswith("resume=") for a in arguments):
            composed(*arguments)  # whose test runs them


def test_run_directories_never_collide(tmp_path, monkeypatch):
    claimed = []
    threads = [threading.Thread(target=lambda: claimed.append(new_dir(str(tmp_path / "10-00-00"))))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted([str(tmp_path / "10-00-00")] +
                                     [str(tmp_path / f"10-00-00-{n}") for n in range(2, 9)])
    monkeypatch.chdir(tmp_path)  # the configured run directory resolves through new_dir once
    first, second = composed(hydra=True), composed(hydra=True)
    assert first.hydra.run.dir == first.hydra.run.dir != second.hydra.run.dir
    assert (tmp_path / first.hydra.run.dir).is_dir() and (tmp_path / second.hydra.run.dir).is_dir()


def test_a_directory_that_cannot_be_created_is_left_for_check_writable(tmp_path):
    (tmp_path / "file").write_text("")
    assert new_dir(str(tmp_path / "file" / "run")) == str(tmp_path / "file" / "run")
