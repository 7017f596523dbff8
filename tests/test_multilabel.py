"""Multi-label data (data=csv with data.label_delimiter or data.label_columns): 0/1 targets,
BCE-with-logits, mAP and F1 instead of accuracy, every label over predict.threshold."""

import csv
import json
import math
import multiprocessing
import random

import pytest
import torch
from PIL import Image

from finetune.config.validation import validate
from finetune.errors import ConfigError
from finetune.run import build, run
from finetune.train.multilabel import multi_label_scores
from finetune.train.trainer import Totals
from finetune.use.load import load_model

from conftest import FAST, HANG_SECONDS, make_config, run_forked

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230)}
CORNERS = {"red": (0, 0), "green": (16, 0), "blue": (8, 16)}  # where each label's square sits


@pytest.fixture
def shapes(tmp_path):
    """root/images/*.png: 32x32 noise with a coloured square for each of the image's labels
    (each label on about half the images, some with none); labels.csv lists them with
    space-separated labels, onehot.csv with a 0/1 column per label."""
    root, rng = tmp_path / "shapes", random.Random(0)
    (root / "images").mkdir(parents=True)
    spaced, onehot = [], []
    for number in range(72):
        labels = [name for name in COLOURS if rng.random() < 0.5]
        image = Image.frombytes("RGB", (32, 32), bytes(rng.randrange(60) for _ in range(32 * 32 * 3)))
        for name in labels:
            left, top = CORNERS[name]
            image.paste(COLOURS[name], (left, top, left + 14, top + 14))
        path, split = f"images/{number:03d}.png", "val" if number % 3 == 0 else "train"
        image.save(root / path)
        spaced.append({"image": path, "labels": " ".join(labels), "split": split})
        onehot.append({"image": path, **{name: int(name in labels) for name in COLOURS},
                       "split": split})
    write_csv(root / "labels.csv", spaced)
    write_csv(root / "onehot.csv", onehot)
    return root


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def spaced(root):
    return ("data=csv", f"data.file={root}/labels.csv", "data.label_column=labels",
            "data.label_delimiter=' '")


def test_scores_match_a_hand_computed_case():
    probabilities = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.6, 0.1], [0.3, 0.7, 0.1],
                                  [0.1, 0.1, 0.1]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    scores = multi_label_scores(probabilities, targets, threshold=0.5)
    # class 0 ranks pos, neg, pos, neg: AP = (1/1 + 2/3) / 2; class 1 ranks neg, pos: 1/2
    assert scores.average_precision[:2] == pytest.approx([5 / 6, 1 / 2])
    assert math.isnan(scores.average_precision[2])  # no positive image: left out of the mean
    assert scores.map == pytest.approx((5 / 6 + 1 / 2) / 2)
    # at 0.5, class 0: 1 right, 1 wrong, 1 missed (F1 1/2); class 1: 1 right, 1 wrong (2/3)
    assert scores.f1[:2] == pytest.approx([1 / 2, 2 / 3])
    assert scores.macro_f1 == pytest.approx((1 / 2 + 2 / 3) / 2)  # class 2 never seen: out
    assert scores.micro_f1 == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert scores.positives == [2, 1, 0]


def test_both_csv_forms_give_the_same_targets_and_the_loss_is_bce(shapes):
    common = (*FAST[:2], "data.image_size=32", "data.num_workers=0", "trainer.device=cpu")
    by_delimiter = build(make_config(*common, *spaced(shapes), "loss.class_weights=balanced"))
    by_columns = build(make_config(*common, "data=csv", f"data.file={shapes}/onehot.csv",
                                   "data.label_columns=[blue,green,red]"))
    for setup in (by_delimiter, by_columns):
        assert setup.data.class_names == ["blue", "green", "red"] and setup.data.multi_label
    train = by_delimiter.data.train_loader.dataset
    assert [(path, target.tolist()) for path, target in train.samples] == [
        (path, target.tolist()) for path, target in by_columns.data.train_loader.dataset.samples]
    rows = {row["image"]: row["labels"].split() for row in csv.DictReader(open(shapes / "labels.csv"))}
    for path, target in train.samples:  # an image without labels is all zeros
        named = [name for name, bit in zip(["blue", "green", "red"], target, strict=True) if bit]
        assert named == sorted(rows[path.split("shapes/", 1)[1]])
    criterion = by_delimiter.criterion
    assert isinstance(criterion, torch.nn.BCEWithLogitsLoss)
    positives = torch.stack(train.targets).sum(dim=0)
    assert torch.equal(criterion.pos_weight, (len(train) - positives) / positives)  # balanced
    assert make_config(*spaced(shapes)).optimized_metric == "best_val_map"  # the default


@pytest.mark.parametrize("extra, message", [
    (("optimized_metric=best_val_acc",), "optimized_metric='best_val_acc' is not valid for multi-label"),
    (("loss.label_smoothing=0.1",), "loss.label_smoothing=0.1 is not valid for multi-label"),
    (("data.mixup_alpha=0.2",), "data.mixup_alpha=0.2 is not valid for multi-label"),
    (("data.label_columns=[red]",), "label_delimiter and data.label_columns are both set"),
    (("trainer.early_stopping.monitor=val_acc",), "monitor='val_acc' is not valid for multi-label"),
])
def test_what_multi_label_data_cannot_take_is_refused(shapes, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_config(*spaced(shapes), *extra))


def test_a_label_column_holding_other_than_0_or_1_is_named_by_its_line(shapes):
    rows = list(csv.DictReader(open(shapes / "onehot.csv")))
    rows[3]["green"] = "yes"
    write_csv(shapes / "onehot.csv", rows)
    with pytest.raises(ConfigError, match=r"line 5: green='yes' \(a label column holds 0 or 1\)"):
        build(make_config(*FAST[:2], "data=csv", f"data.file={shapes}/onehot.csv",
                          "data.label_columns=[red,green,blue]", "trainer.device=cpu"))


@pytest.mark.slow
def test_a_multi_label_run_trains_evaluates_and_predicts(shapes, tmp_path):
    overrides = ("backbone.weights=null", "backbone.name=squeezenet1_1", *spaced(shapes), "freeze=[]",
                 "data.image_size=32", "data.num_workers=0", "data.batch_size=16",
                 "trainer.max_epochs=3", "trainer.device=cpu", "optimizer=adamw")
    run_dir = tmp_path / "run"
    run(make_config(*overrides), str(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_map"] > 0.8  # each label is a coloured square: easy to learn
    assert summary["best_val_acc"] is None and summary["best_val_balanced_acc"] is None
    epochs = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert epochs[-1]["val_acc"] == "nan" and float(epochs[-1]["val_micro_f1"]) > 0

    best = run_dir / "checkpoints" / "best.pt"
    evaluated = tmp_path / "evaluated"
    run(make_config(*overrides, "mode=evaluate", f"checkpoint={best}"), str(evaluated))
    result = json.loads((evaluated / "evaluation.json").read_text())
    assert result["map"] == pytest.approx(summary["best_val_map"], abs=1e-6)  # the best epoch
    assert result["images"] == 24 and "accuracy" not in result
    assert [row["class"] for row in result["per_class"]] == ["blue", "green", "red"]

    predicted = tmp_path / "predicted"
    run(make_config(*overrides, "mode=predict", f"checkpoint={best}",
                    f"predict_input={shapes}/images", "predict.threshold=0.4"), str(predicted))
    rows = list(csv.DictReader(open(predicted / "predictions.csv")))
    model = load_model(str(best))
    names, probabilities = model.predict([row["path"] for row in rows[:8]], threshold=0.4)
    for row, expected, row_probabilities in zip(rows, names, probabilities, strict=False):
        listed = row["classes"].split(";") if row["classes"] else []
        assert sorted(listed) == sorted(expected)  # every label at 0.4 or above, no other
        over = sorted((p for p in row_probabilities.tolist() if p >= 0.4), reverse=True)
        shown = [float(p) for p in row["probabilities"].split(";")] if listed else []
        assert shown == pytest.approx(over, abs=1e-4)

    probe = tmp_path / "probe"  # the frozen backbone's outputs cached, 0/1 targets beside them
    probing = [item for item in overrides if item != "freeze=[]" and "max_epochs" not in item]
    run(make_config(*probing, "experiment=linear_probe", "trainer.max_epochs=1",
                    f"trainer.cache_dir={tmp_path}/cache"), str(probe))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert json.loads((probe / "summary.json").read_text())["best_val_map"] > 0.5


def gather_on_rank(rank, store, results):
    """One of two gloo processes: validation scores of its own images, then every rank's."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    totals = Totals(torch.device("cpu"), validation=True, multi_label=True)
    if rank == 0:  # rank 1 saw no batch (fewer validation images than ranks)
        totals.add(torch.tensor(0.5), torch.tensor([[2.0, -2.0], [0.0, 1.0]]),
                   torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    probabilities, targets = totals.probabilities_and_targets()
    results.put((rank, probabilities.tolist(), targets.tolist()))
    dist.destroy_process_group()


def test_under_torchrun_every_rank_scores_all_validation_images(tmp_path):
    results = multiprocessing.get_context("fork").Queue()
    ranks = [(rank, tmp_path / "store", results) for rank in range(2)]
    assert run_forked(gather_on_rank, ranks) == [0, 0]
    gathered = sorted(results.get(timeout=HANG_SECONDS) for _ in range(2))
    expected = torch.tensor([[2.0, -2.0], [0.0, 1.0]]).sigmoid()
    for _, probabilities, targets in gathered:
        assert torch.equal(torch.tensor(probabilities), expected)
        assert targets == [[1.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("setting, message", [
    ("optimized_metric=best_val_map", "val_map and val_micro_f1 are scores of multi-label data"),
    ("trainer.early_stopping.monitor=val_map", "val_map is a score of multi-label data"),
])
def test_multi_label_scores_are_refused_for_single_label_data(setting, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_config(setting))
