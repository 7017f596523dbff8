"""Calibration stage: one temperature T for a trained model's logits, so that its softmax
probabilities can be trusted for a threshold (Guo et al., 2017, "On Calibration of Modern
Neural Networks").

T is fitted on the validation logits by minimizing the negative log-likelihood of
softmax(logits / T) (LBFGS on log T, so T stays positive), and scored on the test split
when the data has one (else on the validation images themselves, in-sample). Dividing by one positive number
never changes which class is predicted: accuracy stays, only the confidence moves.

`mode=calibrate checkpoint=.../best.pt` (or `calibrate=true` after training) stores T in
the checkpoint, where mode=predict, mode=evaluate, load_model and mode=export find it,
and writes calibration.json (the temperature, NLL and ECE before and after) and, with
plots, reliability.png. Multi-label models are not calibrated here: their sigmoid per
class would need a temperature per class.
"""

import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from finetune.errors import ConfigError
from finetune.files import save_atomic, write_json

log = logging.getLogger(__name__)

BINS = 15  # confidence bins of the expected calibration error, as Guo et al. use


def validation_logits(net: nn.Module, loader: DataLoader, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every readable validation image's logits and label, on the CPU."""
    net.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            images, targets = batch
            logits.append(net(images.to(device)).float().cpu())
            labels.append(targets)
    if not logits:
        raise ConfigError("no readable validation image to calibrate on.")
    return torch.cat(logits), torch.cat(labels)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimizing the NLL of softmax(logits / T) over the images."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    logits = logits.double()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels))


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor,
                               bins: int = BINS) -> tuple[float, list[dict[str, float]]]:
    """ECE: over equal-width confidence bins, the gap between accuracy and mean confidence,
    weighted by the share of images in the bin; and each non-empty bin's figures."""
    confidence, predicted = probabilities.double().max(dim=1)
    correct = (predicted == labels).double()
    # bin b holds confidences in (b / bins, (b + 1) / bins]
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    error, table = 0.0, []
    for index in range(bins):
        inside = which == index
        if inside.any():
            accuracy, mean = correct[inside].mean().item(), confidence[inside].mean().item()
            error += inside.double().mean().item() * abs(accuracy - mean)
            table.append({"low": index / bins, "high": (index + 1) / bins,
                          "images": int(inside.sum()), "accuracy": accuracy, "confidence": mean})
    return error, table


def calibration_scores(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, Any]:
    """NLL and ECE before (T = 1) and after (T), with each one's reliability table."""
    before, before_bins = expected_calibration_error(logits.softmax(dim=1), labels)
    after, after_bins = expected_calibration_error((logits.double() / temperature).softmax(dim=1), labels)
    return {"temperature": temperature, "images": len(labels),
            "nll_before": negative_log_likelihood(logits, labels, 1.0),
            "nll_after": negative_log_likelihood(logits, labels, temperature),
            "ece_before": before, "ece_after": after, "bins": BINS,
            "reliability_before": before_bins, "reliability_after": after_bins}


def stored_temperature(checkpoint: dict[str, Any], source: str) -> float:
    """The checkpoint's temperature (1.0 when it was never calibrated), checked."""
    calibration = checkpoint.get("calibration")
    if calibration is None:
        return 1.0
    value = calibration.get("temperature") if isinstance(calibration, dict) else None
    if not (isinstance(value, float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{source}: its calibration entry is not a positive temperature; the "
                          "file is damaged or not this tool's.")
    return value


def store(path: str, scores: dict[str, Any]) -> None:
    """Write the temperature into the checkpoint file, atomically (its other entries as
    they were: a checkpoint whose frozen weights sit in frozen.pt keeps pointing there)."""
    from finetune.files import load_safe

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
    from finetune.data import has_test_split
    from finetune.inference import checkpoint_data, load_model
    from finetune.trainer import resolve_device

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
        from finetune.plots import draw_or_warn, plot_reliability

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
