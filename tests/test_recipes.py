"""Training recipes: class weights, label smoothing, gradient accumulation, early stopping
and augmentation policies (docs/recipes.md)."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import InterpolationMode

from finetune.data.transforms import batch_mixing, image_transforms
from finetune.errors import ConfigError
from finetune.hooks import Hook
from finetune.model.net import InputSpec
from finetune.run import build, recipe, run, training_inputs
from finetune.state.checkpoint import read_run_checkpoint
from finetune.train import trainer
from finetune.train.ema import WeightAverage
from finetune.train.loss import class_weights, dataset_labels
from finetune.train.lr_find import range_test
from finetune.train.stopping import EarlyStopping
from finetune.train.trainer import EpochMetrics, Monitor, Step, confusion_scores, train_one_epoch
from finetune.use.load import load_model

from conftest import FAST, make_config
from test_resume import interrupt_at, resumed


def test_balanced_class_weights_follow_the_label_counts():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])  # 6 images: 3, 1 and 2 of the three classes
    weights = class_weights("balanced", labels, ["a", "b", "c"])
    assert weights.tolist() == pytest.approx([6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2)])
    with pytest.raises(ConfigError, match="no image of class c"):
        class_weights("balanced", torch.tensor([0, 1]), ["a", "b", "c"])
    with pytest.raises(ConfigError, match="2 weights for 3 classes"):
        class_weights([1, 2], labels, ["a", "b", "c"])
    assert class_weights("none", labels, ["a", "b", "c"]) is None


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_and_macro_f1_match_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

    generator = torch.Generator().manual_seed(0)
    for classes in (2, 5):
        truth = torch.randint(0, classes, (60,), generator=generator)
        truth[truth == classes - 1] = 0  # the last class has no image, only predictions
        predicted = torch.randint(0, classes, (60,), generator=generator)
        confusion = confusion_matrix(truth, predicted, labels=list(range(classes))).tolist()
        balanced, macro_f1 = confusion_scores(confusion)
        assert balanced == pytest.approx(balanced_accuracy_score(truth, predicted))
        assert macro_f1 == pytest.approx(f1_score(truth, predicted, average="macro"))


def test_the_best_checkpoint_follows_the_optimized_metric():
    assert Monitor.for_metric("best_val_macro_f1") == Monitor("val_macro_f1", True)
    assert Monitor.for_metric("last_val_loss") == Monitor("val_loss", False)
    assert Monitor.for_metric("best_val_balanced_acc") == Monitor("val_balanced_acc", True)


def test_a_run_weighs_its_loss_by_the_training_labels_and_smooths_it():
    setup = build(make_config(*FAST, "loss.class_weights=balanced", "loss.label_smoothing=0.1"))
    dataset = setup.data.train_loader.dataset
    counts = torch.bincount(torch.tensor([dataset[i][1] for i in range(len(dataset))]),
                            minlength=10).double()  # counted image by image, as a check
    assert torch.equal(dataset_labels(dataset), torch.tensor([dataset[i][1] for i in range(len(dataset))]))
    expected = counts.sum() / (10 * counts)
    assert setup.criterion.weight.double().tolist() == pytest.approx(expected.tolist())
    logits, labels = torch.randn(5, 10), torch.tensor([0, 3, 3, 9, 1])
    # smoothed targets by hand: 0.9 on the label plus 0.01 on every class, class-weighted
    targets = 0.9 * F.one_hot(labels, 10).double() + 0.1 / 10
    weight = setup.criterion.weight.double()
    per_image = -(targets * weight * F.log_softmax(logits.double(), dim=1)).sum(dim=1)
    by_hand = per_image.sum() / weight[labels].sum()
    assert setup.criterion(logits, labels).item() == pytest.approx(by_hand.item(), rel=1e-5)


class StepCounter(Hook):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, step, loss):
        self.steps.append(step)


def linear_epoch(batch_size: int, accumulate: int, images, labels) -> tuple[torch.Tensor, list]:
    """One epoch of a BatchNorm-free linear model, plain SGD; its weights and step numbers."""
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)
    counter = StepCounter()
    train_one_epoch(net, loader, optimizer, Step(net, torch.device("cpu"), accumulate=accumulate),
                    1, 1, [counter])
    return torch.cat([param.detach().flatten() for param in net.parameters()]), counter.steps


def test_accumulating_two_batches_steps_as_one_batch_twice_the_size():
    torch.manual_seed(1)
    images, labels = torch.randn(24, 8), torch.randint(0, 3, (24,))
    weights, steps = linear_epoch(4, 2, images, labels)  # 6 batches of 4: 3 steps
    expected, expected_steps = linear_epoch(8, 1, images, labels)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert steps == expected_steps == [1, 2, 3]
    # 5 batches of 4 (the last of 4 too: 20 images), N=2: a last group of one batch, whose
    # step uses that batch's mean gradient, as batches of 8, 8, 4 do
    weights, steps = linear_epoch(4, 2, images[:20], labels[:20])
    expected, _ = linear_epoch(8, 1, images[:20], labels[:20])
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert steps == [1, 2, 3]


def test_the_step_count_of_an_accumulating_run():
    step = Step(torch.nn.Linear(1, 1), torch.device("cpu"), accumulate=3)
    assert step.steps_per_epoch(7) == 3
    assert [step.share(index, 7) for index in range(7)] == [
        (3, False), (3, False), (3, True), (3, False), (3, False), (3, True), (1, True)]


class WeightRecorder(Hook):
    def __init__(self, net):
        self.net, self.weights = net, []

    def on_train_batch_end(self, step, loss):
        self.weights.append(self.net.weight.detach().clone())


def test_the_weight_average_is_the_ema_of_the_weights_after_each_step():
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 3)
    loader = DataLoader(TensorDataset(torch.randn(12, 8), torch.randint(0, 3, (12,))), batch_size=4)
    recorder, average = WeightRecorder(net), WeightAverage(net, 0.75, lambda net: set())
    train_one_epoch(net, loader, torch.optim.SGD(net.parameters(), lr=0.5),
                    Step(net, torch.device("cpu")), 1, 1, [recorder, average])
    first, *rest = recorder.weights  # AveragedModel starts at the first step's weights
    by_hand = first
    for weights in rest:
        by_hand = 0.75 * by_hand + 0.25 * weights
    torch.testing.assert_close(average.average.module.weight, by_hand)
    assert not torch.allclose(by_hand, net.weight)  # the raw weights train on
    # its state leaves out what cannot change, and a fresh average takes it back exactly
    state = average.state_dict()
    assert set(state["weights"]) == {"weight", "bias"} and int(state["n_averaged"]) == 3
    other = WeightAverage(net, 0.75, lambda net: {"bias"})
    assert set(other.state_dict()["weights"]) == {"weight"}
    other.load_state_dict(state)
    torch.testing.assert_close(other.average.module.weight, by_hand)


@pytest.mark.slow
def test_validation_best_pt_and_evaluate_use_the_average(tmp_path):
    run(make_config(*FAST, "trainer.max_epochs=2", "trainer.ema_decay=0.9"), str(tmp_path / "run"))
    last = read_run_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.pt"))
    ema = last["state"]["ema"]["weights"]
    assert any(not torch.equal(ema[name], last["model"][name]) for name in ema)
    best = read_run_checkpoint(str(tmp_path / "run" / "checkpoints" / "best.pt"))
    loaded = load_model(str(tmp_path / "run" / "checkpoints" / "best.pt"))
    for name, value in loaded.net.state_dict().items():
        expected = best["state"]["ema"]["weights"].get(name, best["model"][name])
        assert torch.equal(value, expected), name
    accuracy = run(make_config(*FAST, "mode=evaluate",
                               f"checkpoint={tmp_path}/run/checkpoints/last.pt"), str(tmp_path / "eval"))
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert accuracy == float(rows[-1]["val_acc"])  # the epoch's validation saw the average
    loss = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["loss"]
    assert loss == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-5)


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixed_targets_are_class_probabilities_that_sum_to_one(mixup, cutmix):
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, targets = batch_mixing(mixup, cutmix, 4)(images, labels)
    assert mixed.shape == images.shape and targets.shape == (8, 4)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    # each image is its own label's and its neighbour's (the batch rolled by one), no other
    for row, label in zip(targets, labels, strict=True):
        assert set(row.nonzero().flatten().tolist()) <= {int(label), int(label - 1) % 4}
    assert batch_mixing(0.0, 0.0, 4) is None


def test_a_mixed_run_claims_no_training_accuracy_and_computes_no_features(tmp_path, caplog):
    caplog.set_level("INFO")
    run(make_config(*FAST, "freeze=[@backbone]", "data.mixup_alpha=0.2"), str(tmp_path))
    (row,) = csv.DictReader(open(tmp_path / "metrics.csv"))
    assert row["train_acc"] == "nan" and 0 <= float(row["val_acc"]) <= 1
    assert "feature cache: off: the training images are randomly augmented" in caplog.text


def rows(*losses: float) -> list[EpochMetrics]:
    return [EpochMetrics(epoch, 0, 0, loss, 1 - loss, 0, 0) for epoch, loss in enumerate(losses, 1)]


def test_early_stopping_counts_epochs_since_the_last_improvement_beyond_min_delta():
    stopping = EarlyStopping(patience=2, monitor="val_loss", min_delta=0.05)
    assert stopping.waited(rows(1.0, 0.9, 0.88, 0.87)) == (2, 0.9, 2)  # 0.02 and 0.03: too small
    assert stopping.waited(rows(1.0, 0.9, 0.8)) == (0, 0.8, 3)
    by_accuracy = EarlyStopping(patience=2, monitor="val_acc")
    assert by_accuracy.waited(rows(0.5, 0.2, 0.3)) == (1, pytest.approx(0.8), 2)


def scripted_val_losses(monkeypatch, losses: list[float]) -> None:
    """Validation reports these losses, epoch by epoch (training is real)."""
    evaluate = trainer.evaluate
    calls = iter(losses)

    def scripted(*args):
        result = evaluate(*args)
        result.loss = next(calls)
        return result

    monkeypatch.setattr(trainer, "evaluate", scripted)


LOSSES = [1.0, 0.9, 0.95, 0.92, 0.91, 0.5, 0.4, 0.3]  # best at 2, then 3 epochs without
STOPPING = (*FAST, "trainer.max_epochs=8", "trainer.early_stopping.patience=3",
            "optimized_metric=best_val_loss")


@pytest.mark.slow
def test_early_stopping_stops_at_the_right_epoch_and_a_resume_goes_on_counting(
        tmp_path, monkeypatch, caplog):
    scripted_val_losses(monkeypatch, LOSSES)
    run(make_config(*STOPPING), str(tmp_path / "twin"))
    summary = json.loads((tmp_path / "twin" / "summary.json").read_text())
    assert summary["epochs_completed"] == 5 and summary["status"] == "ok"
    assert summary["stop_reason"] == ("early stopping: val_loss has not improved by more than 0 "
                                      "for 3 epochs (best 0.9000 at epoch 2)")
    # stopped at epoch 4 and resumed: it still stops after epoch 5, as the unbroken run
    monkeypatch.undo()
    scripted_val_losses(monkeypatch, LOSSES)
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(make_config(*STOPPING), str(tmp_path / "stopped"))
    monkeypatch.undo()
    scripted_val_losses(monkeypatch, LOSSES[3:])
    run(resumed(tmp_path / "stopped"), str(tmp_path / "stopped"))
    again = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert again["epochs_completed"] == 5 and again["stop_reason"] == summary["stop_reason"]
    saved = read_run_checkpoint(str(tmp_path / "stopped" / "checkpoints" / "last.pt"))
    assert saved["state"]["progress"]["stop_reason"] == summary["stop_reason"]
    # a stopped run is finished: resuming it, even with more epochs, trains nothing
    before = {path: path.read_bytes() for path in (tmp_path / "stopped").rglob("*") if path.is_file()}
    caplog.set_level("INFO")
    cfg = resumed(tmp_path / "stopped")
    cfg.trainer.max_epochs = 12
    run(cfg, str(tmp_path / "stopped"))
    assert "had already stopped after epoch 5 (early stopping" in caplog.text
    assert "train more" not in caplog.text
    after = {path: path.read_bytes() for path in (tmp_path / "stopped").rglob("*") if path.is_file()}
    assert after == before


SPEC = InputSpec(image_size=24, resize_size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                 interpolation=InterpolationMode.BILINEAR)


@pytest.mark.parametrize("policy", ["flip", "light", "randaugment", "trivialaugment",
                                    "autoaugment", "true"])
def test_an_augmentation_policy_changes_training_images_only(policy):
    image = Image.frombytes("RGB", (40, 32), bytes(range(256)) * 15)
    training, evaluation = image_transforms(SPEC, policy)
    plain, _ = image_transforms(SPEC, "none")
    assert torch.equal(evaluation(image), plain(image))  # validation images never change
    outputs = []
    for seed in range(8):
        torch.manual_seed(seed)
        outputs.append(training(image))
    assert all(output.shape == (3, 24, 24) and output.dtype == torch.float32 for output in outputs)
    assert any(not torch.equal(outputs[0], output) for output in outputs[1:])
    # the same scale as the evaluation images: a flip of them, for the flip policy
    if policy == "flip":
        same = [torch.allclose(output, plain(image), atol=1e-5) for output in outputs]
        flipped = [torch.allclose(output, plain(image).flip(-1), atol=1e-5) for output in outputs]
        assert all(a or b for a, b in zip(same, flipped, strict=True)) and any(same) and any(flipped)
    assert not math.isnan(float(torch.stack(outputs).mean()))


def test_no_policy_is_the_evaluation_transform():
    training, evaluation = image_transforms(SPEC, "none")
    assert training is evaluation
    training, evaluation = image_transforms(SPEC, "false")  # an older run's data.augment=false
    assert training is evaluation


def test_the_lr_range_test_keeps_group_ratios_and_leaves_everything_as_it_was(monkeypatch):
    cfg = make_config(*FAST, "mode=lr_find", "param_groups=[{patterns: [add_layers], lr_mult: 10}]")
    setup = build(cfg)
    training = training_inputs(cfg, setup)
    weights = {name: value.clone() for name, value in setup.net.state_dict().items()}
    trainable = {name for name, param in setup.net.named_parameters() if param.requires_grad}
    random_state = torch.get_rng_state()
    rates = []
    optimizer_step = Step.optimizer_step

    def recording(self, optimizer):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer_step(self, optimizer)

    monkeypatch.setattr(Step, "optimizer_step", recording)
    test = range_test(setup.net, training.step, setup.optimizer, training.loaders[0], 0.05,
                      1e-5, 1.0, 12)  # 12 steps over 4 batches: the data 3 times
    assert len(test.rates) == len(rates) <= 12 and test.rates[0] == pytest.approx(1e-5)
    assert all(later > earlier for earlier, later in zip(test.rates, test.rates[1:], strict=False))
    names = [group["name"] for group in setup.optimizer.param_groups]
    for rate, groups in zip(test.rates, rates, strict=True):  # each group at its multiple
        for name, lr in zip(names, groups, strict=True):
            assert lr == pytest.approx(rate * (10 if name.startswith("group0") else 1))
    assert all(torch.equal(value, weights[name]) for name, value in setup.net.state_dict().items())
    assert torch.equal(torch.get_rng_state(), random_state)
    assert {name for name, param in setup.net.named_parameters() if param.requires_grad} == trainable
    assert test.suggestion() == pytest.approx(test.rates[test.smoothed.index(min(test.smoothed))] / 10)


@pytest.mark.slow
def test_lr_find_mode_writes_its_curve_and_prints_the_command(tmp_path, caplog):
    caplog.set_level("INFO")
    suggested = run(make_config(*FAST, "mode=lr_find", "lr_find.steps=30"), str(tmp_path),
                    ["mode=lr_find", "data=fake"])
    rows = (tmp_path / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "lr,loss,smoothed_loss" and 2 <= len(rows) - 1 <= 30
    assert 1e-8 <= suggested <= 1.0
    assert f"python train.py data=fake optimizer.lr={suggested:.2g}" in caplog.text
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.csv").exists()


def test_the_start_up_report_names_each_recipe_setting_that_is_on():
    assert recipe(make_config()).startswith("plain")
    line = recipe(make_config("data=imagefolder", "data.augment=true", "data.cutmix_alpha=1",
                              "loss.class_weights=balanced", "trainer.ema_decay=0.999",
                              "trainer.early_stopping.patience=3",
                              "trainer.accumulate_grad_batches=2"))
    for part in ("data.augment=light", "data.cutmix_alpha=1", "loss.class_weights=balanced",
                 "trainer.ema_decay=0.999", "early stopping on val_loss after 3 epochs",
                 "a step every 64 images"):
        assert part in line
