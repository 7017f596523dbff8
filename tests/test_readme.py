"""Every `python train.py` command in the README runs (as a dry run, on test data).

Plain commands are composed and built in-process (a subprocess costs ~5 s of imports);
`--help` and `-m` sweeps, which only Hydra's command line does, run as subprocesses.
"""

import re
import shlex

import pytest
from PIL import Image

from finetune.run import run

from conftest import ROOT, make_config, run_train

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


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, tmp_path, photos):
    arguments = [arg.replace("~/photos", str(photos)) for arg in shlex.split(command)[2:]]
    if "--help" in arguments:
        result = run_train(*arguments)
        assert result.returncode == 0 and "backbone" in result.stdout
    elif "-m" in arguments:
        result = run_train(*arguments, "dry_run=true", f"hydra.sweep.dir={tmp_path}/out")
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("dry run: built") == 4
    else:
        cfg = make_config(*arguments, "dry_run=true", "backbone.allow_download=false")
        assert run(cfg, str(tmp_path / "out")) is None
        assert (tmp_path / "out" / "params.tsv").is_file()
