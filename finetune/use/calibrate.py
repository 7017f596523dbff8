"""mode=calibrate: fit the temperature (use/calibration.py) on a checkpoint's validation
logits, score it on the test split when the data has one (else on the validation images
themselves, in-sample), and store it.

`mode=calibrate checkpoint=.../best.pt` (or `calibrate=true` after training) stores T in
the checkpoint, where mode=predict, mode=evaluate, load_model and mode=export find it,
and writes calibration.json (the temperature, NLL and ECE before and after) and, with
plots, reliability.png. Multi-label models are not calibrated here: their sigmoid per
class would need a temperature per class."""

import logging
import os
from typing import Any

from omegaconf import DictConfig

from finetune.errors import ConfigError
from finetune.state.files import save_atomic, write_json
from finetune.use.calibration import BINS, calibration_scores, fit_temperature, validation_logits

log = logging.getLogger(__name__)


def store(path: str, scores: dict[str, Any]) -> None:
    """Write the temperature into the checkpoint file, atomically (its other entries as
    they were: a checkpoint whose frozen weights sit in frozen.pt keeps pointing there)."""
    from finetune.state.files import load_safe

    state = load_safe(path, "checkpoint")
    state["calibration"] = {key: scores[key] for key in
                            ("temperature", "images", "nll_before", "nll_after", "ece_before",
                             "ece_after")}
    save_atomic(state, path)


EXTREME = (0.25, 4.0)  # a temperature outside: the model's confidence is far off (warned)


def run_calibration(cfg: DictConfig, run_dir: str, plots: bool, overrides: list[str]) -> float:
    """mode=calibrate: fit T on the checkpoint's validation data, store it in the checkpoint,
    write calibration.json (and reliability.png); return T. The scores before and after are
    on the test split when the data has one (images T never saw), else on the validation
    images themselves (in-sample, said so); a T that makes them worse, or an extreme one,
    is warned of."""
    from finetune.data.loaders import has_test_split
    from finetune.train.trainer import resolve_device
    from finetune.use.evaluate import checkpoint_data
    from finetune.use.load import load_model

    path = os.path.expanduser(cfg.checkpoint)
    device = resolve_device(cfg.trainer.device)
    model = load_model(path, device, trust=cfg.trust)
    if model.multi_label:
        raise ConfigError(f"checkpoint={cfg.checkpoint!r} is a multi-label model: temperature "
                          "scaling here calibrates a softmax over the classes, not a sigmoid per class.")
    loader, _, data_cfg = checkpoint_data(cfg, model, overrides, pin_memory=device.type == "cuda")
    logits, labels = validation_logits(model.net, loader, device)
    temperature, held_out = fit_temperature(logits, labels), has_test_split(data_cfg)
    if held_out:
        test = checkpoint_data(cfg, model, overrides, split="test", pin_memory=device.type == "cuda")
        logits, labels = validation_logits(model.net, test[0], device)
    scores = calibration_scores(logits, labels, temperature)
    scores["fitted_on"] = "val"
    scores["scored_on"] = "test" if held_out else "val (in-sample: the images T was fitted on)"
    store(path, scores)
    os.makedirs(run_dir, exist_ok=True)
    write_json(scores, os.path.join(run_dir, "calibration.json"))
    if plots:
        from finetune.show.plots import draw_or_warn, plot_reliability

        draw_or_warn(plot_reliability, scores, os.path.join(run_dir, "reliability.png"))
    log.info("calibrated %s: temperature %.4f fitted on the validation split; on %d images of "
             "the %s split, NLL %.4f -> %.4f, ECE (%d bins) %.4f -> %.4f. Stored in this file "
             "(mode=predict, mode=evaluate and load_model use it; a run's last.pt is not "
             "changed, so it now predicts uncalibrated probabilities), details in %s",
             cfg.checkpoint, temperature, len(labels), scores["scored_on"], scores["nll_before"],
             scores["nll_after"], BINS, scores["ece_before"], scores["ece_after"],
             os.path.join(run_dir, "calibration.json"))
    warn_if_doubtful(scores)
    return temperature


def warn_if_doubtful(scores: dict[str, Any]) -> None:
    """A temperature that made the scores worse, or one far from 1, is kept (it is the best
    fit on validation) but said: probabilities after it may mislead."""
    low, high = EXTREME
    if scores["ece_after"] > scores["ece_before"]:
        log.warning("calibration made the expected calibration error worse on the %s split "
                    "(%.4f -> %.4f): the validation split may be too small or unlike the "
                    "data; mode=calibrate on another checkpoint or more validation images",
                    scores["scored_on"], scores["ece_before"], scores["ece_after"])
    if not low <= scores["temperature"] <= high:
        log.warning("the temperature %.4g is extreme (outside %g-%g): the model's confidence "
                    "is far off at this checkpoint (trained briefly, or overfitted), and "
                    "calibrated probabilities are nearly %s", scores["temperature"], low, high,
                    "uniform" if scores["temperature"] > high else "one-hot")
