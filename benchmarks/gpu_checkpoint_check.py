"""On a GPU: a checkpoint written in the background holds the state at `save` time, even
though the copies to pinned memory are not waited for and training changes the weights
right after. Run by benchmarks/gpu.sh."""

import tempfile

import torch

from finetune.state.files import load_safe
from finetune.state.saver import BackgroundSaver

weights = torch.randn(64, 1024, 1024, device="cuda")  # 256 MB: the copy takes a while
expected = weights.cpu()
with tempfile.TemporaryDirectory() as folder:
    saver = BackgroundSaver()
    saver.save({"w": weights}, f"{folder}/last.pt")
    weights.mul_(0).add_(1)  # the next "optimizer step", queued right behind the copies
    saver.wait()
    assert torch.equal(load_safe(f"{folder}/last.pt")["w"], expected), "checkpoint changed"
print("gpu checkpoint check: ok")
