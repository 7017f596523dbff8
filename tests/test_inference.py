"""A run's checkpoint, used on its own: load_model, mode=evaluate and mode=predict."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import finetune
from finetune.errors import ConfigError
from finetune.run import build, run
from finetune.state.checkpoint import read_run_checkpoint

from conftest import FAST, make_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-epoch run on fake data; its run directory."""
    run_dir = tmp_path_factory.mktemp("trained")
    run(make_config(*FAST, "trainer.max_epochs=2", "head=mlp"), str(run_dir))
    return run_dir


@pytest.mark.slow
def test_load_model_is_the_trained_net_in_eval_mode(trained, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no config files around: the checkpoint is enough
    model = finetune.load_model(str(trained / "checkpoints" / "best.pt"))
    net = model.net
    assert not net.training and not any(module.training for module in net.modules())
    assert model.class_names == [str(index) for index in range(10)]
    assert (model.input_spec.image_size, model.config["data"]["name"]) == (32, "fake")
    image = model.transform()(Image.new("RGB", (40, 40)))
    assert image.shape == (3, 32, 32)
    saved = read_run_checkpoint(str(trained / "checkpoints" / "best.pt"))
    assert all(torch.equal(value, saved["model"][name]) for name, value in net.state_dict().items())
    val = build(make_config(*FAST)).data.val_loader  # the same fake validation images
    with torch.no_grad():
        losses = [F.cross_entropy(net(images), labels, reduction="sum") for images, labels in val]
    best = json.loads((trained / "summary.json").read_text())
    best_row = list(csv.DictReader(open(trained / "metrics.csv")))[best["best_epoch"] - 1]
    assert float(sum(losses)) / 32 == pytest.approx(float(best_row["val_loss"]), rel=1e-5)


def test_load_model_predicts_paths_and_images_in_one_call(trained, tmp_path):
    model = finetune.load_model(str(trained / "checkpoints" / "best.pt"))
    images = [Image.new("RGB", (40, 30), (index * 60, 90, 0)) for index in range(3)]
    images[2].save(tmp_path / "two.png")
    labels, probabilities = model.predict([images[0], images[1], tmp_path / "two.png"])
    assert probabilities.shape == (3, 10)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(3))
    with torch.no_grad():  # by hand: the checkpoint's preprocessing, the net, a softmax
        expected = model.net(torch.stack([model.transform()(image) for image in images])).softmax(1)
    assert torch.allclose(probabilities, expected, atol=1e-6)
    assert labels == [model.class_names[index] for index in expected.argmax(1).tolist()]
    one_label, one = model.predict(str(tmp_path / "two.png"))  # one path: its label, its row
    assert one_label == labels[2] and torch.allclose(one, probabilities[2])


@pytest.mark.slow
def test_evaluate_reads_only_the_validation_images_of_the_trained_data(tmp_path, caplog):
    """mode=evaluate with a checkpoint alone: the run's own image folder and size; a broken
    file in train/ is not read, so not warned about."""
    for split in ("train", "val"):
        for label in ("ants", "bees"):
            (tmp_path / "photos" / split / label).mkdir(parents=True)
            for index in range(2):
                Image.new("RGB", (40, 30), (index * 90, 0, 0)).save(
                    tmp_path / "photos" / split / label / f"{index}.png")
    overrides = ["backbone.weights=null", "trainer.max_epochs=1", "trainer.device=cpu",
                 "data=imagefolder", f"data.root={tmp_path}/photos", "data.image_size=48"]
    run(make_config(*overrides), str(tmp_path / "run"), overrides)
    (tmp_path / "photos" / "train" / "ants" / "broken.png").write_bytes(b"not a png")
    caplog.set_level("INFO")
    arguments = ["mode=evaluate", f"checkpoint={tmp_path}/run/checkpoints/best.pt"]
    run(make_config(*arguments), str(tmp_path / "evaluated"), arguments)  # default data: digits
    result = json.loads((tmp_path / "evaluated" / "evaluation.json").read_text())
    assert result["data"]["root"] == f"{tmp_path}/photos" and result["images"] == 4
    assert "broken.png" not in caplog.text
    assert "trained on data=imagefolder" in caplog.text and "data=digits" not in caplog.text
    assert f"results: {tmp_path}/evaluated/evaluation.json" in caplog.text


def test_evaluate_mode_reports_the_runs_validation_metrics(trained, tmp_path):
    cfg = make_config(*FAST, "mode=evaluate", f"checkpoint={trained}/checkpoints/best.pt")
    accuracy = run(cfg, str(tmp_path))
    summary = json.loads((trained / "summary.json").read_text())
    best_row = list(csv.DictReader(open(trained / "metrics.csv")))[summary["best_epoch"] - 1]
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert accuracy == result["accuracy"] == summary["best_val_acc"]
    assert result["loss"] == pytest.approx(float(best_row["val_loss"]), rel=1e-5)
    rows = list(csv.DictReader(open(tmp_path / "per_class.csv")))
    assert [row["class"] for row in rows] == [str(index) for index in range(10)]
    assert sum(int(row["images"]) for row in rows) == result["images"] == 32
    right = sum(int(row["images"]) * float(row["accuracy"]) for row in rows)
    assert right == pytest.approx(result["accuracy"] * 32)
    # the same weights on the same images: the matrix training kept for its best epoch
    progress = read_run_checkpoint(str(trained / "checkpoints" / "best.pt"))["state"]["progress"]
    assert result["confusion"] == progress["best_confusion"]


def test_evaluate_refuses_data_with_other_classes(trained, tmp_path):
    overrides = ["mode=evaluate", f"checkpoint={trained}/checkpoints/last.pt",
                 "data.num_classes=5"]  # the command line's data key wins over the saved one
    with pytest.raises(ConfigError, match="trained on 10 classes.*has 5 classes"):
        run(make_config(*FAST, *overrides), str(tmp_path), overrides)


def test_predict_writes_one_row_per_readable_image(trained, tmp_path, caplog):
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for index in range(5):
        Image.new("RGB", (40, 30), (index * 50, 0, 0)).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    cfg = make_config(*FAST, "mode=predict", f"checkpoint={trained}/checkpoints/best.pt",
                      f"predict_input={tmp_path}/photos")
    assert run(cfg, str(tmp_path / "out")) == 5
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [row["path"] for row in rows] == [str(folder / f"{index}.png") for index in range(5)]
    assert all(row["class"] in [str(i) for i in range(10)] for row in rows)
    assert all(0.1 <= float(row["probability"]) <= 1 for row in rows)  # the top of 10 classes
    assert "broken.png" in caplog.text


@pytest.mark.parametrize("mode, extra, message", [
    ("evaluate", [], "checkpoint=None is not valid: mode=evaluate needs checkpoint=PATH"),
    ("predict", ["checkpoint=x.pt"], "mode=predict needs predict_input=FOLDER"),
])
def test_modes_name_what_they_need(tmp_path, mode, extra, message):
    with pytest.raises(ConfigError, match=message):
        run(make_config(*FAST, f"mode={mode}", *extra), str(tmp_path))


def test_a_file_that_is_not_a_run_checkpoint_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="not a checkpoint written by a run of this tool"):
        finetune.load_model(str(tmp_path / "plain.pt"))


def test_hflip_tta_averages_the_logits_of_each_image_and_its_mirror(trained, tmp_path):
    model = finetune.load_model(str(trained / "checkpoints" / "best.pt"))
    images = torch.randn(6, 3, 32, 32)
    with torch.inference_mode():
        by_hand = ((model.net(images) + model.net(images.flip(-1))) / 2).softmax(dim=1)
        plain = model.net(images).softmax(dim=1)
    labels, probabilities = model.predict(images, tta="hflip")
    torch.testing.assert_close(probabilities, by_hand)
    assert not torch.allclose(probabilities, plain)
    assert labels == [model.class_names[i] for i in by_hand.argmax(dim=1).tolist()]
    # mode=evaluate tta=hflip: the validation images' loss under the averaged logits
    cfg = make_config(*FAST, "mode=evaluate", "tta=hflip", f"checkpoint={trained}/checkpoints/best.pt")
    run(cfg, str(tmp_path))
    result = json.loads((tmp_path / "evaluation.json").read_text())
    loader = build(make_config(*FAST)).data.val_loader
    with torch.inference_mode():
        batches = [(model.net(x) + model.net(x.flip(-1))) / 2 for x, _ in loader]
        expected = F.cross_entropy(torch.cat(batches),
                                   torch.cat([y for _, y in loader]))
    assert result["tta"] == "hflip" and result["loss"] == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="tta='vflip'"):
        model.predict(images, tta="vflip")


@pytest.mark.slow
def test_top5_accuracy_is_scored_and_predict_lists_the_k_best(trained, tmp_path):
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    for row in rows:  # 10 classes: top-5 counts every image top-1 counts, and more
        assert float(row["val_acc"]) <= float(row["val_top5_acc"]) <= 1
    summary = json.loads((trained / "summary.json").read_text())
    best = str(trained / "checkpoints" / "best.pt")
    run(make_config(*FAST, "mode=evaluate", f"checkpoint={best}"), str(tmp_path / "evaluated"))
    evaluation = json.loads((tmp_path / "evaluated" / "evaluation.json").read_text())
    assert evaluation["top5_accuracy"] == pytest.approx(
        float(rows[summary["best_epoch"] - 1]["val_top5_acc"]))
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "one.png")
    run(make_config(*FAST, "mode=predict", f"checkpoint={best}", f"predict_input={tmp_path}",
                    "predict.top_k=3"), str(tmp_path / "predicted"))
    (row,) = list(csv.DictReader(open(tmp_path / "predicted" / "predictions.csv")))
    classes, probabilities = row["top_classes"].split(";"), row["top_probabilities"].split(";")
    _, expected = finetune.load_model(best).predict(tmp_path / "one.png")
    assert classes == [str(index) for index in expected.topk(3).indices.tolist()]
    assert classes[0] == row["class"] and [float(p) for p in probabilities] == pytest.approx(
        expected.topk(3).values.tolist(), abs=1e-4)
    with pytest.raises(ConfigError, match="predict.top_k=0 is not valid"):
        run(make_config(*FAST, "mode=predict", f"checkpoint={best}", f"predict_input={tmp_path}",
                        "predict.top_k=0"), str(tmp_path / "refused"))
