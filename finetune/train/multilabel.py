"""Multi-label scores: every class is its own yes/no question, so accuracy (all labels of an
image right at once) would mislead; these are the usual measures instead, as scikit-learn
computes them.

- average precision (AP) per class, from the probabilities alone (no threshold); mAP is its
  mean over the classes that have a positive image (AP is undefined without one);
- micro and macro F1 at the threshold (a label is predicted when its probability is at
  least the threshold); macro F1 averages over the classes that have a positive image or a
  prediction, as the single-label macro F1 does (a class never right scores 0).
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class MultiLabelScores:
    map: float
    micro_f1: float
    macro_f1: float
    average_precision: list[float]  # per class; NaN for a class without a positive image
    f1: list[float]  # per class, at the threshold
    positives: list[int]  # images with each label

    def epoch_scores(self) -> dict[str, float]:
        """As EpochMetrics names them."""
        return {"val_map": self.map, "val_micro_f1": self.micro_f1, "val_macro_f1": self.macro_f1}


def multi_label_scores(probabilities: torch.Tensor, targets: torch.Tensor,
                       threshold: float) -> MultiLabelScores:
    """Scores of (images x classes) probabilities against 0/1 targets."""
    from sklearn.metrics import average_precision_score, f1_score

    truth = targets.cpu().numpy().astype(int)
    scores = probabilities.cpu().double().numpy()
    predicted = (scores >= threshold).astype(int)
    positives = truth.sum(axis=0)
    precision = [float(average_precision_score(truth[:, c], scores[:, c])) if positives[c] else math.nan
                 for c in range(truth.shape[1])]
    found = [value for value in precision if not math.isnan(value)]
    seen = [c for c in range(truth.shape[1]) if positives[c] or predicted[:, c].any()]
    per_class = f1_score(truth, predicted, average=None, zero_division=0.0)
    return MultiLabelScores(
        map=sum(found) / len(found) if found else math.nan,
        micro_f1=float(f1_score(truth, predicted, average="micro", zero_division=0.0)),
        macro_f1=float(per_class[seen].mean()) if seen else math.nan,
        average_precision=precision, f1=[float(value) for value in per_class],
        positives=[int(count) for count in positives])
