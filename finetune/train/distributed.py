"""Multi-GPU / multi-node training under torchrun, with DistributedDataParallel.

`torchrun --nproc_per_node=N train.py ...` starts N processes; each trains on its shard
of every batch (the global batch is data.batch_size x N) and gradients are averaged.
Which run directory they share, and whether a restarted job resumes, is finetune/launch.py's
business; this module joins the processes: first through the job's key-value store
(`open_job`, before Hydra), then in a process group (`connect`, once the config names the
device: `gloo` for a CPU run, `nccl` for CUDA). Only rank 0 writes the run's files.
"""

import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from finetune.hooks import Hook

STORE_TIMEOUT = timedelta(minutes=30)  # torch's own default for a process group
JOB_KEYS = "finetune/job/"  # keys that outlive an attempt: what an earlier one chose


def launched_by_torchrun() -> bool:
    """torchrun's agent names its job even with one process (`--nproc-per-node=1`), whose
    restarts must resume like any job's; a launch without the agent sets WORLD_SIZE."""
    return "TORCHELASTIC_RUN_ID" in os.environ or several_processes()


def several_processes() -> bool:
    """A process group only where there are processes to join: one trains as a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class Job:
    """This process's place in a torchrun job: the job's store (the elastic agent's, which
    lives as long as the job and so still holds what earlier attempts wrote, or rank 0's)
    and this attempt's own corner of it."""

    store: Any
    attempt: Any  # a PrefixStore no earlier attempt wrote into
    rank: int
    world: int
    notes: list[str] = field(default_factory=list)  # said in the run's log once it has one

    def earlier(self, key: str) -> str | None:
        """What an earlier attempt of this job recorded under `key`, if any."""
        found = self.store.check([JOB_KEYS + key])
        return self.store.get(JOB_KEYS + key).decode() if found else None

    def record(self, key: str, value: str) -> None:
        self.store.set(JOB_KEYS + key, value)


_job: Job | None = None


def open_job() -> Job:
    """Reach the job's store and agree with the other ranks on a fresh corner of it."""
    import torch.distributed as dist

    global _job
    if _job is None:
        store, rank, world = next(dist.rendezvous("env://", timeout=STORE_TIMEOUT))
        token = attempt_token(store, rank, world)
        _job = Job(store, dist.PrefixStore(f"finetune/attempt/{token}/", store), rank, world)
    return _job


def attempt_token(store, rank: int, world: int) -> str:
    """A name every rank of this attempt agrees on and no earlier attempt used.

    torchrun's agent keeps one store for the whole job, and an attempt restarted after a
    lost worker finds the dead workers' keys still in it: a process group built on the
    bare store reads the dead ranks' gloo addresses ("connectFullMesh failed ... Connection
    refused") or waits on them, depending on who writes first. TORCHELASTIC_RESTART_COUNT
    cannot name the attempt either: a node that joins an elastic job counts from 0 while
    the others may not. So rank 0 draws a token, and every other rank asks for it under a
    nonce of its own (an answer to a stale nonce is never read) until all have confirmed.
    """
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"finetune/ask/{rank}", nonce)
        token = store.get(f"finetune/answer/{nonce}").decode()
        store.set(f"finetune/confirmed/{token}/{rank}", "1")
        return token
    token, answered = uuid.uuid4().hex, set()
    waiting = set(range(1, world))
    while waiting:
        for other in sorted(waiting):
            if store.check([f"finetune/confirmed/{token}/{other}"]):
                waiting.discard(other)
            elif store.check([f"finetune/ask/{other}"]):
                nonce = store.get(f"finetune/ask/{other}").decode()
                if nonce not in answered:  # this attempt's, or a dead one's: answer both
                    store.set(f"finetune/answer/{nonce}", token)
                    answered.add(nonce)
        if waiting:
            time.sleep(0.02)
    return token


def launch_notes() -> list[str]:
    """What the launch decided that the run's log should say (a restart resumed, say)."""
    return list(_job.notes) if _job is not None else []


def backend_for(device) -> str:
    """gloo for a run on the CPU (even on a machine with GPUs), nccl for CUDA."""
    return "nccl" if device.type == "cuda" else "gloo"


def connect(device) -> None:
    """Under torchrun, join the process group for a run on `device` (once)."""
    import torch
    import torch.distributed as dist

    if not several_processes() or active():
        return
    job = open_job()
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend_for(device), store=dist.PrefixStore("group/", job.attempt),
                            rank=job.rank, world_size=job.world, timeout=STORE_TIMEOUT)


def leave() -> None:
    import torch.distributed as dist

    global _job
    if dist.is_initialized():
        dist.destroy_process_group()
    _job = None


@contextmanager
def node_first():
    """The body on each node's local rank 0 first, then on the node's other ranks: what
    it caches on disk (decoded images, backbone outputs) they then load, not build again."""
    import torch.distributed as dist

    if active() and local_rank() != 0:
        dist.barrier()
    yield
    if active() and local_rank() == 0:
        dist.barrier()


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
    """DistributedSampler and a stream (data.streaming=true) read by epoch; other orders
    ignore it."""
    from torch.utils.data.distributed import DistributedSampler

    if hasattr(loader.dataset, "set_epoch"):  # a stream: it has no sampler
        loader.dataset.set_epoch(epoch)
        return
    order = loader.batch_sampler or loader.sampler  # tensor_loader: its sampler is batched
    order = getattr(order, "sampler", order)
    if isinstance(order, DistributedSampler):
        order.set_epoch(epoch)
