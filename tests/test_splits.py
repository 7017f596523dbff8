"""Where the images of each split come from: one folder split by data.val_fraction, and a
test split (a test/ folder, or a CSV's split=test rows) that training never sees, scored
once at the end of a run and by `mode=evaluate data.split=test`."""

import csv
import json

import pytest
from PIL import Image

from finetune.config.validation import validate
from finetune.data.loaders import build_data, has_test_split, validation_data
from finetune.errors import ConfigError
from finetune.run import run
from finetune.use.calibrate import EXTREME, warn_if_doubtful

from conftest import make_config
from test_data import make_image_folder, spec

SMALL = ("backbone.weights=null", "backbone.name=squeezenet1_1", "trainer.device=cpu",
         "trainer.max_epochs=1", "data.num_workers=0", "data.batch_size=8", "data.image_size=32")


def paths(dataset) -> set[str]:
    return {path for path, _ in dataset.samples}


def one_folder(root, per_class=10):
    """root/<class>/*.png: no train/ or val/."""
    for index, name in enumerate(("ant", "bee")):
        (root / name).mkdir(parents=True)
        for n in range(per_class):
            Image.new("RGB", (20, 20), (index * 200, n * 20, 0)).save(root / name / f"{n}.png")
    return root


@pytest.mark.slow
def test_class_folders_under_the_root_are_split_per_class_whatever_the_seed(tmp_path):
    one_folder(tmp_path)
    cfg = make_config("data=imagefolder", f"data.root={tmp_path}", "data.num_workers=0")
    first, second = (build_data(cfg.data, spec(16), seed=seed) for seed in (0, 1))
    train, val = first.train_loader.dataset, first.val_loader.dataset
    assert first.class_names == ["ant", "bee"] and (len(train), len(val)) == (16, 4)
    assert sorted(label for _, label in val.samples) == [0, 0, 1, 1]  # 0.2 of each class
    assert not paths(train) & paths(val) and len(paths(train) | paths(val)) == 20
    assert paths(val) == paths(second.val_loader.dataset)  # fixed: not the run's seed
    halves = make_config("data=imagefolder", f"data.root={tmp_path}", "data.val_fraction=0.5")
    assert len(build_data(halves.data, spec(16), seed=0).val_loader.dataset) == 10
    with pytest.raises(ConfigError, match="data.val_fraction=1.5 is not valid"):
        validate(make_config("data=imagefolder", f"data.root={tmp_path}", "data.val_fraction=1.5"))
    with pytest.raises(ConfigError, match="holds the class folders themselves, so it has no test"):
        validation_data(make_config("data=imagefolder", f"data.root={tmp_path}", "mode=evaluate",
                                    "data.split=test").data, spec(16), seed=0)


@pytest.mark.slow
def test_a_test_folder_is_never_trained_or_validated_on(tmp_path):
    make_image_folder(tmp_path, per_class=3, splits=("train", "val", "test"))
    cfg = make_config("data=imagefolder", f"data.root={tmp_path}", "data.num_workers=0")
    data = build_data(cfg.data, spec(16), seed=0)
    seen = paths(data.train_loader.dataset) | paths(data.val_loader.dataset)
    assert not any("/test/" in path for path in seen) and has_test_split(cfg.data)
    testing = make_config("data=imagefolder", f"data.root={tmp_path}", "data.num_workers=0",
                          "mode=evaluate", "data.split=test")
    loader, classes = validation_data(testing.data, spec(16), seed=0)
    assert classes == ["cat", "dog"] and all("/test/" in path for path in paths(loader.dataset))
    plain = make_image_folder(tmp_path / "plain", per_class=1)
    assert not has_test_split(make_config("data=imagefolder", f"data.root={plain}").data)
    with pytest.raises(ConfigError, match="data.split='test' is not valid: it chooses what mode=evaluate"):
        validate(make_config("data=imagefolder", f"data.root={tmp_path}", "data.split=test"))
    with pytest.raises(ConfigError, match="data=digits has no test split"):
        validation_data(make_config("mode=evaluate", "data.split=test").data, spec(16), seed=0)


@pytest.mark.slow
def test_a_csvs_test_rows_are_held_out(tmp_path):
    make_image_folder(tmp_path / "images", per_class=4, splits=("all",))
    rows = [{"image": f"all/{name}/{n}.png", "label": name, "split": split}
            for name in ("cat", "dog") for n, split in enumerate(("train", "train", "val", "test"))]
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    settings = ("data=csv", f"data.file={tmp_path / 'labels.csv'}", f"data.root={tmp_path / 'images'}",
                "data.num_workers=0")
    data = build_data(make_config(*settings).data, spec(16), seed=0)
    assert (len(data.train_loader.dataset), len(data.val_loader.dataset)) == (4, 2)
    testing = make_config(*settings, "mode=evaluate", "data.split=test")
    loader, _ = validation_data(testing.data, spec(16), seed=0)
    assert sorted(p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in paths(loader.dataset)) == [
        "cat/3.png", "dog/3.png"]
    assert has_test_split(testing.data)


@pytest.mark.slow
def test_a_run_scores_its_best_checkpoint_on_the_test_split_once(tmp_path):
    make_image_folder(tmp_path / "data", per_class=6, splits=("train", "val", "test"))
    settings = (*SMALL, "data=imagefolder", f"data.root={tmp_path / 'data'}", "calibrate=true")
    run_dir = tmp_path / "run"
    run(make_config(*settings), str(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = json.loads((run_dir / "test" / "evaluation.json").read_text())
    assert summary["test_images"] == evaluation["images"] == 12
    assert summary["test_accuracy"] == evaluation["accuracy"] and summary["test_loss"] == evaluation["loss"]
    calibration = json.loads((run_dir / "calibration.json").read_text())
    assert calibration["fitted_on"] == "val" and calibration["scored_on"] == "test"
    assert calibration["images"] == 12  # the test split's, not validation's
    evaluated = tmp_path / "evaluated"
    run(make_config(*settings[:-1], "mode=evaluate", f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}",
                    "data.split=test"), str(evaluated), ["data.split=test"])
    again = json.loads((evaluated / "evaluation.json").read_text())
    assert again["confusion"] == evaluation["confusion"] and again["images"] == 12


def test_a_doubtful_temperature_is_warned_of(caplog):
    low, high = EXTREME
    warn_if_doubtful({"temperature": 1.2, "ece_before": 0.03, "ece_after": 0.02, "scored_on": "test"})
    assert not caplog.text
    warn_if_doubtful({"temperature": 1.2, "ece_before": 0.0303, "ece_after": 0.0321, "scored_on": "test"})
    assert "made the expected calibration error worse on the test split (0.0303 -> 0.0321)" in caplog.text
    warn_if_doubtful({"temperature": 164.0, "ece_before": 0.2, "ece_after": 0.1, "scored_on": "val"})
    assert f"the temperature 164 is extreme (outside {low:g}-{high:g})" in caplog.text
    assert "nearly uniform" in caplog.text


@pytest.mark.parametrize("layout", ["split folders", "one folder"])
def test_an_empty_class_folder_is_named(tmp_path, layout):
    if layout == "split folders":
        make_image_folder(tmp_path, per_class=2)
        (tmp_path / "train" / "temple").mkdir()
        named = "train/temple"
    else:
        one_folder(tmp_path, per_class=5)
        (tmp_path / "temple").mkdir()
        named = "temple"
    cfg = make_config("data=imagefolder", f"data.root={tmp_path}", "data.num_workers=0")
    with pytest.raises(ConfigError, match=f"data.root='{tmp_path}': {named} holds no image file"):
        build_data(cfg.data, spec(16), seed=0)
