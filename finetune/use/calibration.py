"""Temperature scaling's maths: one temperature T for a trained model's logits, so that its
softmax probabilities can be trusted for a threshold (Guo et al., 2017, "On Calibration
of Modern Neural Networks").

T is fitted on the validation logits by minimizing the negative log-likelihood of
softmax(logits / T) (LBFGS on log T, so T stays positive). Dividing by one positive
number never changes which class is predicted: accuracy stays, only the confidence moves.
`stored_temperature` reads T back from a checkpoint, for load_model; the command that
fits and stores it is use/calibrate.py."""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from finetune.errors import ConfigError

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
