"""Pictures: curves.png after every epoch, confusion.png of the best epoch, summary.png."""

import json
import time

import pytest
from PIL import Image

import finetune.show.plots
from finetune.errors import ConfigError
from finetune.run import run
from finetune.show.plots import (
    BackgroundPlots,
    log_searched_keys,
    plot_confusion,
    plot_sweep,
    plots_enabled,
    sweep_figure,
    swept_keys,
)
from finetune.state.checkpoint import read_run_checkpoint
from finetune.sweep import group_repeats

from conftest import FAST, make_config


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.mark.slow
def test_curves_are_redrawn_each_epoch_and_confusion_shows_the_best_epoch(tmp_path, monkeypatch):
    drawn = []
    real_plot_curves = finetune.show.plots.plot_curves

    def recording_plot_curves(history, phase_epochs, best_epoch, path):
        drawn.append(([row.epoch for row in history], list(phase_epochs), sorted(
            {group for row in history for group in row.group_lrs})))
        real_plot_curves(history, phase_epochs, best_epoch, path)

    monkeypatch.setattr(finetune.show.plots, "plot_curves", recording_plot_curves)
    run(make_config(*FAST, "plots=true", "trainer.max_epochs=3", "freeze=[@backbone]",
                    "unfreeze=[{epoch: 2, patterns: [@stage-1]}]"), str(tmp_path))
    assert drawn[0][0] == [1] and drawn[-1][0] == [1, 2, 3]  # the first epoch, and the end
    assert drawn[-1][1] == [2]  # the phase is marked
    assert "unfreeze1" in drawn[-1][2]  # and its group's learning rate drawn
    width, height = png_size(tmp_path / "curves.png")
    assert width > 1000 and height > 300
    png_size(tmp_path / "confusion.png")
    # the matrix drawn is the best epoch's, on the validation set
    summary = json.loads((tmp_path / "summary.json").read_text())
    progress = read_run_checkpoint(str(tmp_path / "checkpoints" / "best.pt"))["state"]["progress"]
    matrix = progress["best_confusion"]
    assert progress["best_epoch"] == summary["best_epoch"]
    assert sum(map(sum, matrix)) == 32  # every validation image once
    assert sum(matrix[index][index] for index in range(10)) / 32 == summary["best_val_acc"]


@pytest.mark.slow
def test_curves_are_redrawn_after_slow_epochs_and_only_the_newest_waits_after_fast_ones():
    drawn = []

    def draw(value, path):
        time.sleep(0.02)
        drawn.append((path, value))

    plots = BackgroundPlots()
    plots.draw(draw, "fast", 1)  # starts at once
    plots.draw(draw, "fast", 2)  # the first is still drawing: these wait, the newest wins
    plots.draw(draw, "fast", 3)
    plots.draw(draw, "slow", 1)
    time.sleep(0.02 / BackgroundPlots.DRAWING_SHARE + 0.5)  # a slow epoch later
    plots.draw(draw, "slow", 2)  # due: drawn now, not only at the end
    time.sleep(0.3)
    assert ("slow", 2) in drawn and ("fast", 3) not in drawn
    plots.wait()
    assert [value for path, value in drawn if path == "fast"] == [1, 3]
    assert [value for path, value in drawn if path == "slow"] == [1, 2]


@pytest.mark.slow
def test_plots_off_and_plots_true_without_matplotlib(tmp_path, monkeypatch):
    run(make_config(*FAST, "plots=false"), str(tmp_path / "off"))
    assert not list((tmp_path / "off").glob("*.png"))
    monkeypatch.setattr(finetune.show.plots, "matplotlib_installed", lambda: False)
    assert plots_enabled("auto") is False
    with pytest.raises(ConfigError, match=r"plots=true needs matplotlib: pip install"):
        run(make_config(*FAST, "plots=true"), str(tmp_path / "true"))
    assert not (tmp_path / "true").exists()  # said before anything is written


@pytest.mark.slow
def test_a_confusion_matrix_of_many_long_class_names_stays_readable(tmp_path):
    names = [f"a rather long class name {index}" for index in range(40)]
    matrix = [[5 if row == column else 0 for column in range(40)] for row in range(40)]
    plot_confusion(matrix, names, "40 classes", str(tmp_path / "confusion.png"))
    width, height = png_size(tmp_path / "confusion.png")
    assert 1500 < width < 4000 and 1500 < height < 4000  # grows with the classes, bounded


def test_a_sweep_picture_names_only_the_swept_keys(tmp_path):
    def row(job, lr, freeze, value, status="ok"):
        overrides = ["data=fake", f"optimizer.lr={lr}", f"freeze={freeze}"]
        return {"job": job, "status": status, "value": value, "overrides": " ".join(overrides),
                "override_list": overrides}

    rows = [row("1", 0.1, "[]", 0.9), row("0", 0.01, "[pretrained]", 0.5),
            row("2", 0.001, "[]", "", status="failed")]
    assert swept_keys([{"a": "1", "b": "2"}, {"a": "1", "b": "3"}, {"a": "1"}]) == ["b"]
    plot_sweep(rows, "best_val_acc", str(tmp_path / "summary.png"))
    width, _ = png_size(tmp_path / "summary.png")
    assert width > 1200  # the per-job bars and one panel per swept key (lr, freeze)


def test_a_search_picture_rounds_values_and_puts_log_searched_keys_on_log_axes():
    """An Optuna search: floats sampled to 17 digits, lr and weight decay searched on a log
    scale (even when the sampled values happen to span less than 100x)."""
    def row(job, lr, decay, value):
        overrides = [f"optimizer.lr={lr}", f"optimizer.weight_decay={decay}", "freeze=[]"]
        return {"job": job, "status": "ok", "value": value, "overrides": " ".join(overrides),
                "override_list": overrides}

    rows = [row("0", 0.012345678901234, 2.3456789e-05, 0.9), row("1", 0.0456789, 5.5e-05, 0.8)]
    params = {"optimizer.lr": "tag(log, interval(1e-4, 1e-1))",
              "optimizer.weight_decay": "tag(log, interval(1e-6, 1e-2))",
              "freeze": 'choice("[]", "[pretrained]")'}
    figure = sweep_figure(rows, "best_val_acc", log_searched_keys(params))
    jobs, lr, decay = figure.axes[:3]
    assert [label.get_text() for label in jobs.get_yticklabels()] == [
        "0: lr=0.0123 weight_decay=2.35e-05", "1: lr=0.0457 weight_decay=5.5e-05"]
    assert lr.get_xscale() == decay.get_xscale() == "log"
    assert log_searched_keys(params) == {"optimizer.lr", "optimizer.weight_decay"}


def test_a_sweep_over_folds_shows_each_settings_spread():
    def row(job, lr, fold, value):
        overrides = [f"optimizer.lr={lr}", f"data.fold={fold}"]
        return {"job": job, "status": "ok", "value": value, "overrides": " ".join(overrides),
                "override_list": overrides}

    rows = [row("0", 0.1, 0, 0.6), row("1", 0.1, 1, 0.8), row("2", 0.01, 0, 0.9),
            row("3", 0.01, 1, 0.9)]
    groups = group_repeats(rows, "best_val_acc")
    figure = sweep_figure(rows, "best_val_acc", groups=groups)
    spread = figure.axes[-1]
    assert [label.get_text() for label in spread.get_yticklabels()] == [
        "optimizer.lr=0.01 (n=2)", "optimizer.lr=0.1 (n=2)"]  # best mean first
    dots = [line for line in spread.get_lines() if line.get_marker() == "o"]
    assert [list(line.get_xdata()) for line in dots] == [[0.9, 0.9], [0.6, 0.8]]
    means = [line for line in spread.get_lines() if line.get_marker() == "D"]
    assert [line.get_xdata()[0] for line in means] == pytest.approx([0.9, 0.7])
