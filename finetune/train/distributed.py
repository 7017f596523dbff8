"""Multi-GPU / multi-node training under torchrun, with DistributedDataParallel.

`torchrun --nproc_per_node=N train.py ...` starts N processes; each trains on its shard
of every batch (the global batch is data.batch_size x N) and gradients are averaged.
All ranks share one run directory, chosen by rank 0 before Hydra starts (otherwise each
rank would stamp its own time into outputs/<date>/<time>); only rank 0 writes Hydra's
files, the log, metrics.csv, checkpoints and summary.json. `gloo` on CPU, `nccl` on CUDA.
"""

import os
import time
from dataclasses import dataclass

from finetune.config.store import new_dir
from finetune.errors import ConfigError
from finetune.hooks import Hook


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(argv: list[str]) -> list[str]:
    """Before Hydra: join the process group; the same run directory for every rank, and
    Hydra's own files and logging on rank 0 only."""
    import torch
    import torch.distributed as dist

    if {"-m", "--multirun"} & set(argv):
        raise ConfigError("torchrun trains one run over several processes; a sweep (-m) "
                          "cannot run inside it. Drop -m, or sweep without torchrun.")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    given = [arg.split("=", 1)[1] for arg in argv if arg.startswith("hydra.run.dir=")]
    run_dir = [given[-1] if given else None]
    if not given and dist.get_rank() == 0:  # rank 0's clock decides, and claims the folder
        run_dir = [new_dir(time.strftime("outputs/%Y-%m-%d/%H-%M-%S"))]
    dist.broadcast_object_list(run_dir, src=0)
    extra = [] if given else [f"hydra.run.dir={run_dir[0]}"]
    if dist.get_rank() > 0:  # no .hydra/, no log file, errors only on the console
        extra += ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]",
                  "hydra.job_logging.root.level=ERROR"]
    return [*argv, *extra]


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def wrap(net, device):
    """DDP over what trains now: call again after an unfreeze phase changes that set."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


class Rewrap(Hook):
    """A trainer hook: DDP syncs the gradients of the parameters that trained when it was
    built, so the step's wrapper is built again whenever the trainable set has changed (an
    unfreeze phase, or the phases a resumed run re-applied)."""

    def __init__(self, net, step):
        from finetune.model.freeze import trainable_names

        self.net, self.step, self.trainable_names = net, step, trainable_names
        self.wrapped = trainable_names(net)  # the step was built with this set

    def on_fit_start(self, progress) -> None:  # a resumed run's phases are applied by now
        self.on_epoch_start(progress.epoch + 1)

    def on_epoch_start(self, epoch: int) -> None:
        if self.trainable_names(self.net) != self.wrapped:
            self.step.rewrap()
            self.wrapped = self.trainable_names(self.net)


def all_sum(tensor):
    """Sum over ranks, in place (no-op in a single process)."""
    import torch.distributed as dist

    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_max(tensor):
    import torch.distributed as dist

    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_rows(tensor):
    """Every rank's rows, one after the other (a CPU tensor; itself in a single process)."""
    import torch
    import torch.distributed as dist

    if not active():
        return tensor
    parts = [None] * world()
    dist.all_gather_object(parts, tensor)
    return torch.cat([part for part in parts if part.numel()] or [tensor])


def same_on_every_rank(value: str) -> bool:
    import torch.distributed as dist

    if not active():
        return True
    values = [None] * world()
    dist.all_gather_object(values, value)
    return len(set(values)) == 1


@dataclass
class Shard:
    """This process's part of the data under torchrun: rank `rank` of `world` processes."""

    rank: int
    world: int


def shard() -> Shard | None:
    """This process's part of the data under torchrun, else None (all of it)."""
    return Shard(rank(), world()) if active() else None


def set_epoch(loader, epoch: int) -> None:
    """DistributedSampler shuffles by epoch; other orders ignore it."""
    from torch.utils.data.distributed import DistributedSampler

    order = loader.batch_sampler or loader.sampler  # tensor_loader: its sampler is batched
    order = getattr(order, "sampler", order)
    if isinstance(order, DistributedSampler):
        order.set_epoch(epoch)
