"""Every `python train.py` command in the README runs (as a dry run, on test data).

Commands are composed and built in-process (a subprocess costs ~5 s of imports): a sweep's
jobs one by one; `--help`, which only Hydra's command line shows, runs as a subprocess.
"""

import json
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image

from finetune.cli import compose_unresolved, with_resume_dir
from finetune.resume import load_last, resumed_config
from finetune.run import run

from conftest import CONF_DIR, FAST, ROOT, make_config, run_train

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("python train.py")]


def test_readme_shows_the_contract_commands():
    text = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[dev]"' in text and "\npytest" in text
    assert "python train.py" in readme_commands()


@pytest.fixture
def photos(tmp_path):
    for split in ("train", "val"):
        for label in ("ants", "bees"):
            (tmp_path / "photos" / split / label).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / "photos" / split / label / "0.png")
    return tmp_path / "photos"


@pytest.fixture
def saved_run(tmp_path, monkeypatch):
    """The run the README's resume / evaluate / predict examples name, under the cwd."""
    overrides = [*FAST, "backbone.allow_download=false"]
    run(make_config(*overrides), str(tmp_path / "outputs/2026-11-26/10-00-00"), overrides)
    monkeypatch.chdir(tmp_path)


def check_sweep(arguments: list[str], tmp_path: Path) -> None:
    """A sweep command: its launcher or sweeper composes, and every job of a grid builds (a
    dry run in-process: no cluster here, and a search needs finished trials)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[arg for arg in arguments if "," not in arg],
                      return_hydra_config=True)
    if "hparams_search=optuna" in arguments:
        assert "Optuna" in cfg.hydra.sweeper._target_
        return
    launcher = next((arg.split("=")[1] for arg in arguments if arg.startswith("hydra/launcher=")),
                    "basic")
    assert launcher.lower() in cfg.hydra.launcher._target_.lower()
    grid = OverridesParser.create().parse_overrides(
        [arg for arg in arguments if not arg.startswith("hydra")])
    jobs = BasicSweeper.split_arguments(grid, max_batch_size=None)[0]
    assert len(jobs) >= 2
    for index, job in enumerate(jobs):
        cfg = make_config(*job, "dry_run=true", "backbone.allow_download=false")
        assert run(cfg, str(tmp_path / "sweep" / str(index))) is None


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, tmp_path, photos, request):
    arguments = [arg.replace("/data/photos", str(photos)).replace("/data/new_photos", str(photos))
                 for arg in shlex.split(command)[2:]]
    if any(arg.startswith(("resume=", "mode=")) for arg in arguments):
        request.getfixturevalue("saved_run")
    if any(arg.startswith("resume=") for arg in arguments):  # a real continuation, briefly,
        # through the command line's own steps (tests/test_cli.py runs one as a subprocess)
        arguments = [re.sub(r"max_epochs=\d+", "max_epochs=2", arg) for arg in arguments]
        argv = with_resume_dir(["train.py", *arguments])
        run_dir = next(arg.split("=", 1)[1] for arg in argv if arg.startswith("hydra.run.dir="))
        saved = load_last(run_dir)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = resumed_config(run_dir, saved["config"], saved["overrides"], arguments,
                                 compose_unresolved)
        run(cfg, run_dir, saved["overrides"])
        assert json.loads(Path(run_dir, "summary.json").read_text())["epochs_completed"] == 2
    elif any(arg.startswith("mode=") for arg in arguments):
        assert run(make_config(*arguments, "trainer.device=cpu"), str(tmp_path / "out")) > 0
    elif "--help" in arguments:
        result = run_train(*arguments)
        assert result.returncode == 0 and "backbone" in result.stdout
    elif "-m" in arguments:  # tests/test_sweep.py runs real grids and searches as subprocesses
        check_sweep([arg for arg in arguments if arg != "-m"], tmp_path)
    else:
        cfg = make_config(*arguments, "dry_run=true", "backbone.allow_download=false")
        assert run(cfg, str(tmp_path / "out")) is None
        assert (tmp_path / "out" / "params.tsv").is_file()
