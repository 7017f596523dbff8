"""mode=export: ONNX, TorchScript and torch.export files of a checkpoint, parity-checked;
an exported ONNX model evaluates and predicts as its checkpoint does."""

import csv
import json
import shutil

import pytest
import torch
from PIL import Image

import finetune.use.export
from finetune.errors import ConfigError, TrainingFailed
from finetune.run import run
from finetune.use.exported import onnx_session

from conftest import FAST, make_config

pytestmark = pytest.mark.slow  # an export takes seconds


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One trained run for the module's tests (they only read it)."""
    folder = tmp_path_factory.mktemp("trained")
    run(make_config(*FAST), str(folder / "run"))
    return folder / "run" / "checkpoints" / "best.pt"


def exported(checkpoint, folder, *overrides):
    return run(make_config(*FAST, "mode=export", f"checkpoint={checkpoint}", *overrides), str(folder))


@pytest.fixture(scope="module")
def onnx_folder(checkpoint, tmp_path_factory):
    """The checkpoint exported to ONNX once, and the largest difference it reported."""
    folder = tmp_path_factory.mktemp("onnx")
    return folder, exported(checkpoint, folder)


def test_an_onnx_model_gives_the_checkpoints_results(checkpoint, onnx_folder, tmp_path):
    folder, difference = onnx_folder
    assert 0 <= difference <= 1e-3  # export.tolerance
    description = json.loads((folder / "model.json").read_text())
    saved = torch.load(checkpoint, weights_only=True)["run"]
    assert description["class_names"] == saved["class_names"]
    assert description["input_spec"] == saved["input_spec"] and description["multi_label"] is False
    assert description["format"] == "onnx" and description["versions"]["torch"] == torch.__version__
    session = onnx_session(str(folder / "model.onnx"))  # any batch size
    assert session.run(None, {"images": torch.randn(3, 3, 32, 32).numpy()})[0].shape == (3, 10)

    model_file = folder / "model.onnx"
    for name, source in (("checkpoint", checkpoint), ("onnx", model_file)):
        run(make_config(*FAST, "mode=evaluate", f"checkpoint={source}"), str(tmp_path / f"eval_{name}"))
    by_checkpoint, by_onnx = (json.loads((tmp_path / f"eval_{name}" / "evaluation.json").read_text())
                              for name in ("checkpoint", "onnx"))
    assert by_onnx["confusion"] == by_checkpoint["confusion"] and by_onnx["images"] == 32
    assert by_onnx["loss"] == pytest.approx(by_checkpoint["loss"], abs=1e-5)

    (tmp_path / "pictures").mkdir()
    for number in range(4):
        Image.new("RGB", (40, 40), (60 * number, 30, 200 - 40 * number)).save(
            tmp_path / "pictures" / f"{number}.png")
    rows = {}
    for name, source in (("checkpoint", checkpoint), ("onnx", model_file)):
        run(make_config(*FAST, "mode=predict", f"checkpoint={source}",
                        f"predict_input={tmp_path / 'pictures'}"), str(tmp_path / f"predict_{name}"))
        rows[name] = list(csv.DictReader(open(tmp_path / f"predict_{name}" / "predictions.csv")))
    assert [row["class"] for row in rows["onnx"]] == [row["class"] for row in rows["checkpoint"]]
    assert [float(row["probability"]) for row in rows["onnx"]] == pytest.approx(
        [float(row["probability"]) for row in rows["checkpoint"]], abs=1e-5)


@pytest.mark.parametrize("format_name, file_name", [("torchscript", "model.torchscript.pt"),
                                                    ("exported_program", "model.pt2")])
def test_torchscript_and_exported_programs_are_checked_too(checkpoint, tmp_path, format_name, file_name):
    assert exported(checkpoint, tmp_path / "out", f"export.format={format_name}") <= 1e-3
    assert (tmp_path / "out" / file_name).is_file()


def test_a_mismatch_fails_the_export_and_writes_nothing(checkpoint, tmp_path, monkeypatch):
    runner = finetune.use.export.exported_runner
    monkeypatch.setattr(finetune.use.export, "exported_runner",
                        lambda *args: (lambda images: runner(*args)(images) + 0.5))
    with pytest.raises(TrainingFailed, match=r"differ from the checkpoint's by up to 0.5.*nothing was"):
        exported(checkpoint, tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == []


def test_an_exported_models_description_is_checked(onnx_folder, tmp_path):
    shutil.copytree(onnx_folder[0], tmp_path / "onnx")
    description = tmp_path / "onnx" / "model.json"
    entries = json.loads(description.read_text())
    entries["class_names"] = "all of them"
    description.write_text(json.dumps(entries))
    with pytest.raises(ConfigError, match=r"model.json: its entries class_names are not what"):
        run(make_config(*FAST, "mode=evaluate", f"checkpoint={tmp_path / 'onnx' / 'model.onnx'}"),
            str(tmp_path / "eval"))
    description.unlink()
    with pytest.raises(ConfigError, match=r"needs the model.json written beside it"):
        run(make_config(*FAST, "mode=evaluate", f"checkpoint={tmp_path / 'onnx' / 'model.onnx'}"),
            str(tmp_path / "eval"))


@pytest.mark.parametrize("changes, message", [
    ({"class_names": ["cat", "dog", "bird"]}, r"model.json: class_names has 3 names, but model.onnx gives "
                                              r"10 logits per image"),
    ({"input_spec": {"image_size": 64, "resize_size": 73}},
     r"model.json: input_spec.image_size=64, but model.onnx takes images of 32x32"),
    ({"input_spec": {"image_size": 10**6, "resize_size": 10**6}},  # refused before an image that size
     r"model.json: its saved input spec .*1000000.* is not valid"),
    ({"input_spec": {"std": [0.2, 0.0, 0.2]}}, r"model.json: its saved input spec .* is not valid"),
    ({"class_names": list(range(10))}, r"model.json: its entries class_names are not"),
])
def test_a_description_that_does_not_fit_its_onnx_model_is_refused(onnx_folder, tmp_path, changes, message):
    shutil.copytree(onnx_folder[0], tmp_path / "onnx")
    description = tmp_path / "onnx" / "model.json"
    entries = json.loads(description.read_text())
    entries.update(changes, input_spec={**entries["input_spec"], **changes.get("input_spec", {})})
    description.write_text(json.dumps(entries))
    with pytest.raises(ConfigError, match=message):
        finetune.load_model(str(tmp_path / "onnx" / "model.onnx"))
    with pytest.raises(ConfigError, match=message):  # before the first batch
        run(make_config(*FAST, "mode=evaluate", f"checkpoint={tmp_path / 'onnx' / 'model.onnx'}"),
            str(tmp_path / "eval"))


def test_a_description_that_is_not_an_object_is_refused(onnx_folder, tmp_path):
    shutil.copytree(onnx_folder[0], tmp_path / "onnx")
    (tmp_path / "onnx" / "model.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"model.json: its entries class_names, input_spec, .* are not"):
        finetune.load_model(str(tmp_path / "onnx" / "model.onnx"))
