"""The command line's overrides are checked before Hydra runs: one clear message (exit code
2 through finetune.cli), with the keys or options the user probably meant."""

import pytest

from finetune.config.overrides import check_command_line
from finetune.errors import ConfigError
from finetune.threads import jobs_at_once, share_cores

from conftest import CONF_DIR


def refused(*arguments: str) -> str:
    with pytest.raises(ConfigError) as info:
        check_command_line(["train.py", *arguments], str(CONF_DIR))
    return str(info.value)


@pytest.mark.parametrize("arguments, fragments", [
    (["trainer.max_epoch=3"], ["there is no key trainer.max_epoch", "Did you mean trainer.max_epochs"]),
    (["optimizer.lrr=0.01"], ["no key optimizer.lrr in optimizer=sgd", "Did you mean optimizer.lr"]),
    (["data.root=/photos"], ["no key data.root in data=digits",
                             "It belongs to data=imagefolder and data=csv: add data=imagefolder"]),
    (["optimizer=adamw", "optimizer.momentum=0.9"], ["in optimizer=adamw", "belongs to optimizer=sgd"]),
    (["-m", "optimizer.lrr=0.1,0.01"], ["no key optimizer.lrr"]),  # a sweep: its first value
    (["backbone=resnet99"], ["backbone=resnet99 is not an option", "did you mean backbone=resnet50 or "
                             "backbone=resnet18", "alexnet, convnext_tiny"]),
    (["optimizer.lr=fast"], ["optimizer.lr=fast", "could not be converted to Float"]),
    (["freeze=[a"], ["freeze=[a"]),  # Hydra's grammar, its own words
    (["~seed"], ["~seed: seed is a setting every run reads; it cannot be deleted"]),
])
@pytest.mark.slow
def test_a_bad_override_is_named_with_what_was_meant(arguments, fragments):
    message = refused(*arguments)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message  # one paragraph


@pytest.mark.parametrize("arguments, first", [
    (["data.root=/x"], "data=imagefolder"),  # both have root; csv also needs data.file
    (["data.augment=light"], "data=imagefolder"),
    (["data.root=/x", "data.file=/y.csv"], "data=csv"),  # the option that has both
    (["data.file=/y.csv", "data.root=/x"], "data=csv"),
])
def test_the_option_that_fits_the_command_line_is_suggested_first(arguments, first):
    assert f"It belongs to {first}" in refused(*arguments)


@pytest.mark.parametrize("arguments, meant, section", [
    (["optimizer.lrr=0.01"], "optimizer.lr", "optimizer"),
    (["trainer.early_stoping.patience=3"], "trainer.early_stopping.patience", "trainer.early_stopping"),
])
def test_only_keys_that_take_the_value_are_suggested(arguments, meant, section):
    suggested = refused(*arguments).split("Did you mean ")[1].split("?")[0].split(", ")
    assert meant in suggested and section not in suggested, suggested


def test_a_mapping_for_a_mistyped_section_gets_the_section():
    assert "Did you mean trainer.early_stopping" in refused("trainer.early_stoping={patience: 3}")


@pytest.mark.parametrize("arguments", [
    ["data=imagefolder", "data.root=/photos", "trainer.max_epochs=3"],
    ["-m", "optimizer.lr=0.1,0.01", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["+extra=1", "hparams_search=optuna", "-m"],
    ["--help"],
    ["--cfg", "job", "seed=1"],
    ["--config-dir", "/my/conf", "mykey=1"],  # the user's own configs: Hydra checks them
    ["logger=tensorboard", "~logger.tensorboard"],  # an entry of a free-form section
])
def test_good_command_lines_pass(arguments):
    check_command_line(["train.py", *arguments], str(CONF_DIR))


@pytest.mark.parametrize("launcher, cores, jobs", [
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 2, 1),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
      "n_jobs": -1}, 2, 2),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
      "n_jobs": -2}, 8, 7),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
      "n_jobs": 4}, 2, 2),
])
def test_parallel_jobs_are_counted_as_joblib_counts_them(monkeypatch, launcher, cores, jobs):
    monkeypatch.setattr("finetune.threads.machine_cores", lambda: cores)
    assert jobs_at_once(launcher) == jobs


def test_parallel_jobs_split_the_cores_and_say_so(monkeypatch):
    import torch

    monkeypatch.setattr("finetune.threads.machine_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    launcher = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
                "n_jobs": 2}
    try:
        assert share_cores(launcher).startswith("torch threads: 2 (4 cores shared by 2 jobs")
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
        torch.set_num_threads(before)
        assert share_cores(launcher) is None and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
