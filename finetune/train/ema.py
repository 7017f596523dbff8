"""Weight EMA (trainer.ema_decay): an exponential moving average of the weights, updated
after every optimizer step by torch.optim.swa_utils.AveragedModel (BatchNorm statistics
averaged too). Validation, best.pt, `mode=evaluate|predict` and load_model use the average;
training goes on with the raw weights, which last.pt keeps for resuming. Reading the average
back from a checkpoint is checkpoint.py's (inference_weights): the schema's owner.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from finetune.hooks import Hook
from finetune.state.checkpoint import averaged_weights


class WeightAverage(Hook):
    """A hook and a stateful part (run.stateful_parts): its state is the average's entries
    that training can change; the rest (frozen weights) equals the model's."""

    def __init__(self, net: nn.Module, decay: float,
                 unchanging: Callable[[nn.Module], set[str]]):
        self.net, self.unchanging = net, unchanging
        self.average = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                     use_buffers=True)
        self.training_state: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, step: int, loss: Any) -> None:
        self.average.update_parameters(self.net)

    def on_validation_start(self) -> None:
        """Validate the average: its weights into the model, the raw ones kept aside."""
        self.training_state = {name: value.clone() for name, value in self.net.state_dict().items()}
        self.net.load_state_dict(self.average.module.state_dict())

    def on_validation_end(self) -> None:
        self.net.load_state_dict(self.training_state)
        self.training_state = None

    def state_dict(self) -> dict[str, Any]:
        unchanging = self.unchanging(self.net)
        return {"n_averaged": self.average.n_averaged.clone(),
                "weights": {name: value for name, value in self.average.module.state_dict().items()
                            if name not in unchanging}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After the model's weights are restored (they fill in what the state leaves out)."""
        self.average.module.load_state_dict(averaged_weights(self.net.state_dict(), state))
        self.average.n_averaged.copy_(state["n_averaged"])
