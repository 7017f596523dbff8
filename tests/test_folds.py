"""Cross-validation folds (data.folds, data.fold) and the sweep summary's mean +- std over
repeats of one setting (data.fold, seed)."""

import statistics

import pytest
import torch

from finetune.errors import ConfigError
from finetune.run import build
from finetune.sweep import format_groups, group_repeats

from conftest import FAST, make_config

DIGITS = (*FAST[:2], "data=digits", "trainer.device=cpu")


def fold(index: int, *overrides: str):
    data = build(make_config(*DIGITS, "data.folds=5", f"data.fold={index}", *overrides)).data
    return data.train_loader.dataset, data.val_loader.dataset


@pytest.mark.slow
def test_five_folds_partition_the_training_data_by_class_whatever_the_seed():
    everything = build(make_config(*DIGITS)).data.train_loader.dataset  # the digits' own train split
    labels = everything.tensors[1]
    seen = []
    for index in range(5):
        train, val = fold(index, f"seed={index}")  # the run's seed does not move the folds
        assert sorted(train.indices + val.indices) == list(range(len(everything)))
        assert set(train.indices).isdisjoint(val.indices)
        per_class = torch.bincount(labels[val.indices], minlength=10)
        overall = torch.bincount(labels, minlength=10) / 5
        assert (per_class - overall).abs().max() <= 1  # stratified
        seen += val.indices
    assert sorted(seen) == list(range(len(everything)))  # each image validates exactly once
    assert fold(2)[1].indices == fold(2, "seed=7")[1].indices


def test_an_image_folder_fold_validates_without_augmentation(tmp_path):
    from PIL import Image

    for name in ("ants", "bees"):
        for split, count in (("train", 5), ("val", 1)):
            (tmp_path / split / name).mkdir(parents=True)
            for number in range(count):
                image = Image.new("RGB", (16, 16), (40 * number, 0, 0))
                image.save(tmp_path / split / name / f"{number}.png")
    data = build(make_config(*FAST[:2], "trainer.device=cpu", "data=imagefolder", f"data.root={tmp_path}",
                             "data.image_size=32", "data.augment=light", "data.folds=5", "data.fold=1",
                             "data.num_workers=0")).data
    train, val = data.train_loader.dataset, data.val_loader.dataset
    assert len(train) == 8 and len(val) == 2
    assert "RandomResizedCrop" in repr(train.dataset.transform)
    assert "RandomResizedCrop" not in repr(val.dataset.transform)
    assert torch.equal(val[0][0], val[0][0])  # the same every time: no random transform


def test_a_fold_outside_the_folds_is_named():
    with pytest.raises(ConfigError, match=r"data.fold=5 is not valid: use 0 to 4"):
        build(make_config(*DIGITS, "data.folds=5", "data.fold=5"))
    with pytest.raises(ConfigError, match=r"data.folds=1 is not valid"):
        build(make_config(*DIGITS, "data.folds=1"))


def job(number: int, value, *overrides: str, status: str = "ok") -> dict:
    return {"job": str(number), "status": status, "value": value, "override_list": list(overrides)}


def test_the_sweep_summary_groups_repeats_with_mean_std_and_n():
    rows = [job(0, 0.80, "head=linear", "data.fold=0"), job(1, 0.90, "head=mlp", "data.fold=0"),
            job(2, 0.70, "head=linear", "data.fold=1"), job(3, 0.86, "head=mlp", "data.fold=1"),
            job(4, 0.75, "head=linear", "data.fold=2"), job(5, "", "head=mlp", "data.fold=2",
                                                          status="failed")]
    groups = group_repeats(rows, "best_val_acc")
    assert [group["setting"] for group in groups] == ["head=mlp", "head=linear"]  # best mean first
    mlp, linear = groups
    assert mlp["n"] == 2 and mlp["mean"] == pytest.approx(0.88)
    assert mlp["std"] == pytest.approx(statistics.stdev([0.90, 0.86]))
    assert linear["n"] == 3 and linear["mean"] == pytest.approx(0.75)
    assert linear["std"] == pytest.approx(0.05)  # sample std of 0.80, 0.70, 0.75
    assert rows[0]["setting_mean"] == pytest.approx(0.75) and rows[0]["setting_n"] == 3
    assert rows[5]["setting_n"] == 2  # a failed job: its setting's figures, from the others
    text = format_groups(groups, "best_val_acc")
    assert "0.8800 +- 0.0283  n=2  head=mlp" in text
    # losses: the lowest mean first; a sweep without repeats gets no grouping
    assert group_repeats([job(0, 0.3, "seed=0"), job(1, 0.1, "seed=1"), job(2, 0.9, "lr=1", "seed=0"),
                          job(3, 0.7, "lr=1", "seed=1")], "best_val_loss")[0]["setting"] == "(defaults)"
    assert group_repeats([job(0, 0.8, "head=linear"), job(1, 0.9, "head=mlp")], "best_val_acc") == []
