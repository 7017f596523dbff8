"""The package's shape: the public names where users import them, the old paths of the
last release (one deprecated with a warning), and the wings' import order, which
`lint-imports` enforces (pyproject.toml; .ci/run runs it too)."""

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import finetune

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_are_importable_from_the_package():
    from finetune.model.net import Net
    from finetune.use.load import load_model
    from finetune.use.loaded_model import LoadedModel

    assert finetune.Net is Net and finetune.load_model is load_model
    assert finetune.LoadedModel is LoadedModel
    assert importlib.import_module("finetune.model").Net is Net  # the seed's path still works


def test_logger_targets_of_saved_configs_still_resolve():
    from finetune.show import loggers

    stable = importlib.import_module("finetune.loggers")
    for name in ("TensorBoardLogger", "MLflowLogger", "WandbLogger"):
        assert getattr(stable, name) is getattr(loggers, name)


def test_the_old_inference_module_warns_and_still_works(monkeypatch):
    monkeypatch.delitem(sys.modules, "finetune.inference", raising=False)
    with pytest.warns(DeprecationWarning, match="finetune.inference is deprecated"):
        old = importlib.import_module("finetune.inference")
    assert old.load_model is finetune.load_model and old.LoadedModel is finetune.LoadedModel


def lint_imports(checkout: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("importlinter", reason="import-linter (the dev extra) is not installed")
    # this copy's finetune, ahead of the installed checkout
    code = ("import sys; sys.path.insert(0, '.'); from importlinter.cli import lint_imports_command;"
            "lint_imports_command(['--no-cache'])")
    return subprocess.run([sys.executable, "-c", code],
                          cwd=checkout, capture_output=True, text=True, timeout=600)


@pytest.fixture
def package_copy(tmp_path):
    shutil.copytree(ROOT / "finetune", tmp_path / "finetune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.slow  # a second each: import-linter builds the import graph
def test_the_wings_import_downwards_only(package_copy):
    result = lint_imports(package_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.slow  # a second: import-linter builds the import graph
def test_an_upward_import_and_a_cycle_inside_a_wing_are_named(package_copy):
    files = package_copy / "finetune" / "state" / "files.py"
    files.write_text(files.read_text() + "\nfrom finetune.train.trainer import autocast  # upward\n")
    images = package_copy / "finetune" / "data" / "images.py"
    images.write_text(images.read_text() + "\nfrom finetune.data.folders import unreadable  # a cycle\n")
    result = lint_imports(package_copy)
    assert result.returncode != 0
    assert "finetune.state is not allowed to import finetune.train" in result.stdout
    assert "finetune.state.files -> finetune.train.trainer" in result.stdout
    assert "No cycles are allowed in finetune.data" in result.stdout
