"""Every `python train.py` command in the README and the docs runs (as a dry run, on test
data), the docs site builds without a warning, and the README stays a short front door.

Commands are composed and built in-process (a subprocess costs ~5 s of imports): a sweep's
jobs one by one; `--help`, which only Hydra's command line shows, through train.py's main().
"""

import csv
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image

from finetune.cli import compose_unresolved
from finetune.run import run
from finetune.state.resume import load_last, resumed_config, with_resume_dir

from conftest import CONF_DIR, FAST, HANG_SECONDS, ROOT, make_config, run_cli

pytestmark = pytest.mark.slow


# The files whose commands run: the README, then every docs page.
DOCS = ["README.md", *sorted(path.relative_to(ROOT).as_posix()
                             for path in (ROOT / "docs").rglob("*.md"))]


def readme_commands(name: str = "README.md") -> list[str]:
    """The `python train.py` lines of the file's bash blocks, without their comments."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / name).read_text(), re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("python train.py")]


def documented_commands() -> list:
    """One case per command per file (README.md, then docs/), its id naming both."""
    return [pytest.param(command, id=f"{name}: {command}",
                         marks=[pytest.mark.slow] if "hparams_search=" in command else [])
            for name in DOCS for command in readme_commands(name)]  # a search runs for real


def test_readme_shows_the_contract_commands():
    text = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[dev]"' in text and "\npytest" in text
    assert "python train.py" in readme_commands()


def test_readme_is_a_short_front_door():
    assert (ROOT / "README.md").stat().st_size < 12_000  # the rest belongs in docs/


def test_docs_site_builds_strictly(tmp_path):
    """Every page in the nav, every page link and #anchor valid (mkdocs.yml's validation)."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def photos(tmp_path):
    """/data/photos of the docs: class folders, labels.csv listing the same images, and
    tags.csv giving them space-separated labels (multi-label)."""
    lines, tags = ["image,label,split"], ["image,tags,split"]
    for split in ("train", "val"):
        for label in ("ants", "bees"):
            (tmp_path / "photos" / split / label).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / "photos" / split / label / "0.png")
            lines.append(f"{split}/{label}/0.png,{label},{split}")
            tags.append(f"{split}/{label}/0.png,{'ants bees' if label == 'bees' else label},{split}")
    (tmp_path / "photos" / "labels.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "photos" / "tags.csv").write_text("\n".join(tags) + "\n")
    return tmp_path / "photos"


@pytest.fixture
def pets(tmp_path):
    """/data/pets of the docs (Parquet files, train and validation) and /data/pets-saved (the
    same data set, written by save_to_disk)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    image = io.BytesIO()
    Image.new("RGB", (32, 32)).save(image, format="PNG")
    rows = {"image": [{"bytes": image.getvalue(), "path": None}] * 32,  # a batch (streamed)
            "label": [0, 1] * 16}
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(tmp_path / "pets" / "data" / f"{split}-00000-of-00001.parquet"))
    datasets.load_dataset(str(tmp_path / "pets"), cache_dir=str(tmp_path / "hf")).save_to_disk(
        str(tmp_path / "pets-saved"))
    return tmp_path


@pytest.fixture
def tar_shards(tmp_path):
    """/data/shards of the docs: three train and three val WebDataset shards."""
    import webdataset

    image = io.BytesIO()
    Image.new("RGB", (32, 32)).save(image, format="PNG")
    (tmp_path / "shards").mkdir()
    for split in ("train", "val"):
        with webdataset.ShardWriter(str(tmp_path / "shards" / f"{split}-%04d.tar"), maxcount=2,
                                    verbose=0) as sink:
            for number in range(6):
                sink.write({"__key__": f"s{number}", "png": image.getvalue(), "cls": number % 2})
    return tmp_path / "shards"


@pytest.fixture
def saved_run(tmp_path, monkeypatch):
    """The run the docs' resume / evaluate / predict examples name, under the cwd."""
    overrides = [*FAST, "backbone.allow_download=false"]
    run(make_config(*overrides), str(tmp_path / "outputs/2026-11-26/10-00-00"), overrides)
    monkeypatch.chdir(tmp_path)


def check_search(arguments: list[str], tmp_path: Path) -> None:
    """A search command, briefly and for real: one trial of one epoch, on the storage it
    names (a /shared path made a tmp one); two trials and two workers where it shares a
    storage (tests/test_search.py runs the local workers of n_jobs)."""
    small = ("hparams_search.n_trials", "hparams_search.n_jobs", "hydra.sweep.dir")
    kept = [arg.replace("/shared", str(tmp_path / "shared")) for arg in arguments
            if not arg.startswith(small)]
    jobs = 2 if any(arg.startswith("hparams_search.storage=") for arg in arguments) else 1
    (tmp_path / "shared").mkdir(exist_ok=True)
    result = run_cli("-m", *kept, *FAST, f"hparams_search.n_trials={jobs}", f"hparams_search.n_jobs={jobs}",
                     f"hydra.sweep.dir={tmp_path / 'shared' / 'sweep'}")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "shared" / "sweep" / "summary.csv")))
    assert len(rows) == jobs and {row["state"] for row in rows} <= {"complete", "pruned"}


def check_sweep(arguments: list[str], tmp_path: Path) -> None:
    """A sweep command: its launcher or sweeper composes, and a grid's first and last jobs
    build (a dry run in-process: no cluster here, and a search needs finished trials)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[arg for arg in arguments if "," not in arg],
                      return_hydra_config=True)
    if "hparams_search=optuna" in arguments:
        return check_search(arguments, tmp_path)
    launcher = next((arg.split("=")[1] for arg in arguments if arg.startswith("hydra/launcher=")),
                    "basic")
    assert launcher.lower() in cfg.hydra.launcher._target_.lower()
    grid = OverridesParser.create().parse_overrides(
        [arg for arg in arguments if not arg.startswith("hydra")])
    jobs = BasicSweeper.split_arguments(grid, max_batch_size=None)[0]
    assert len(jobs) >= 2
    for index, job in enumerate([jobs[0], jobs[-1]]):  # the others compose the same way
        cfg = make_config(*job, "dry_run=true", "backbone.allow_download=false")
        assert run(cfg, str(tmp_path / "sweep" / str(index))) is None


@pytest.mark.parametrize("command", documented_commands())
def test_readme_command_runs(command, tmp_path, photos, request):
    arguments = [arg.replace("/data/photos", str(photos)).replace("/data/new_photos", str(photos))
                 for arg in shlex.split(command)[2:]]
    if "data=webdataset" in arguments:
        folder = request.getfixturevalue("tar_shards")
        arguments = [arg.replace("/data/shards", str(folder)) for arg in arguments]
    if "data=hf" in arguments:  # its Arrow copy under the test's folder
        folder = request.getfixturevalue("pets")
        arguments = [arg.replace("/data/pets", str(folder / "pets")) for arg in arguments]
        arguments.append(f"data.cache_dir={folder / 'hf'}")
    if "mode=lr_find" in arguments:  # the range test itself, briefly, on a small model
        cfg = make_config(*arguments, *FAST[:2], "lr_find.steps=4", "trainer.device=cpu")
        assert run(cfg, str(tmp_path / "out")) > 0
        assert (tmp_path / "out" / "lr_find.csv").is_file()
        return
    if any(arg.startswith(("resume=", "mode=")) for arg in arguments):
        request.getfixturevalue("saved_run")
    if any(arg.startswith("resume=") for arg in arguments):  # a real continuation, briefly,
        # through the command line's own steps (tests/test_cli.py runs one as a subprocess)
        arguments = [re.sub(r"max_epochs=\d+", "max_epochs=2", arg) for arg in arguments]
        argv = with_resume_dir(["train.py", *arguments])
        run_dir = next(arg.split("=", 1)[1] for arg in argv if arg.startswith("hydra.run.dir="))
        saved = load_last(run_dir)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = resumed_config(run_dir, saved["run"], arguments, compose_unresolved)
        run(cfg, run_dir, saved["run"]["overrides"])
        assert json.loads(Path(run_dir, "summary.json").read_text())["epochs_completed"] == 2
    elif any(arg.startswith("mode=") for arg in arguments):
        assert run(make_config(*arguments, "trainer.device=cpu"), str(tmp_path / "out")) > 0
    elif "--help" in arguments:  # in-process: test_cli runs `finetune --help` as a process
        result = run_cli(*arguments)
        assert result.returncode == 0 and "backbone" in result.stdout
    elif "-m" in arguments:  # tests/test_sweep.py runs real grids and searches as subprocesses
        check_sweep([arg for arg in arguments if arg != "-m"], tmp_path)
    else:
        cfg = make_config(*arguments, "dry_run=true", "backbone.allow_download=false")
        assert run(cfg, str(tmp_path / "out")) is None
        assert (tmp_path / "out" / "params.tsv").is_file()
