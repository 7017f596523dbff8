"""torchrun beyond one process group: two hosts, and a job that loses a worker.

Each host is torchrun's own agent (its command line parsed by torch.distributed.run, the
elastic agent, the rendezvous and the restarts all PyTorch's), run in a process forked from
this one; the agent forks its workers instead of starting interpreters (LaunchConfig's
start_method), so torch is imported once. Two hosts are two Linux network namespaces joined
by a veth pair, each agent in its own (root is needed: CI runs as root); where they cannot
be made, both agents run on 127.0.0.1 and the test says why in a warning.

The property: the final weights equal those of an uninterrupted two-process run on one
machine (same seed), bit for bit.
"""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from finetune.state.files import load_safe

from conftest import FAST, run_cli, run_forked

pytestmark = pytest.mark.slow

TRAINING = [*FAST, "trainer.max_epochs=3"]  # 2 optimizer steps per rank and epoch on 2 ranks
CLONE_NEWNET = 0x40000000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_safe(str(run_dir / "checkpoints" / "last.pt"))["model"]


def assert_same_weights(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    different = [name for name in ours if not torch.equal(ours[name], reference[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def forked_rank(rank: int, port: int, folder: Path, arguments: list[str]) -> None:
    """One rank of a plain two-process job (torchrun's environment, no agent)."""
    os.chdir(folder)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = run_cli(*arguments)
    (folder / f"reference-rank{rank}.log").write_text(result.stdout + result.stderr)
    sys.exit(result.returncode)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted run: two processes on one machine."""
    folder = tmp_path_factory.mktemp("reference")
    arguments = [*TRAINING, f"hydra.run.dir={folder / 'run'}"]
    port = free_port()
    codes = run_forked(forked_rank, [(rank, port, folder, arguments) for rank in range(2)])
    assert codes == [0, 0], (folder / "reference-rank0.log").read_text()[-3000:]
    return final_weights(folder / "run")


# -- the agents --------------------------------------------------------------------------

def worker(folder: str, arguments: list[str], kill: tuple[int, int] | None) -> None:
    """A worker as torchrun starts it, running train.py's main(); its console output to
    worker-rank<R>-attempt<A>.log. With `kill` = (rank, step), that rank of the first
    attempt SIGKILLs itself at that optimizer step, once the epoch before it has its
    checkpoint on disk."""
    torch.set_num_threads(1)
    rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
    if kill is not None and rank == str(kill[0]) and attempt == "0":
        die_at_step(kill[1])
    result = run_cli(*arguments)
    Path(folder, f"worker-rank{rank}-attempt{attempt}.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        sys.exit(result.returncode)


def die_at_step(number: int) -> None:
    from finetune.train.trainer import Step

    original, steps = Step.optimizer_step, []

    def step(self, optimizer):
        steps.append(1)
        if len(steps) == number:
            for _ in range(6000):  # rank 0 writes it in the background
                if list(Path("outputs").glob("*/*/checkpoints/last.pt")):
                    break
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, optimizer)

    Step.optimizer_step = step


def agent(folder: Path, torchrun: list[str], arguments: list[str], namespace: str | None = None,
          interface: str | None = None, kill: tuple[int, int] | None = None) -> None:
    """`torchrun TORCHRUN train.py ARGUMENTS` on one host (a network namespace, or this one)."""
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    os.chdir(folder)
    if namespace is not None:
        enter_namespace(namespace)
    if interface is not None:  # gloo's own connections on the host's link
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    config, _, _ = config_from_args(parse_args(
        [*torchrun, f"--log-dir={folder / 'torchelastic'}", "--monitor-interval=0.1", "train.py"]))
    config.start_method = "fork"  # workers forked from here: no new interpreter
    elastic_launch(config, worker)(str(folder), arguments, kill)


def enter_namespace(name: str) -> None:
    descriptor = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    if hasattr(os, "setns"):
        os.setns(descriptor, CLONE_NEWNET)
    elif ctypes.CDLL(None, use_errno=True).setns(descriptor, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
    os.close(descriptor)


def worker_logs(folder: Path) -> str:
    return "".join(f"== {path.name}\n{path.read_text()}"
                   for path in sorted(folder.glob("worker-*.log")))


# -- two hosts ---------------------------------------------------------------------------

def ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True, timeout=60)


@pytest.fixture
def two_hosts():
    """[(namespace, address, interface)] for two hosts joined by a veth pair, or two hosts on
    127.0.0.1 (namespace None) with a warning saying why namespaces could not be made."""
    tag = f"ft{os.getpid() % 100000}"
    names, made = [f"{tag}a", f"{tag}b"], []
    try:
        if shutil.which("ip") is None:
            raise OSError("the ip command (iproute2) is not installed")
        if os.geteuid() != 0:
            raise OSError("making network namespaces needs root")
        for name in names:
            ip("netns", "add", name)
            made.append(name)
        ip("link", "add", f"{tag}a0", "type", "veth", "peer", "name", f"{tag}b0")
        hosts = []
        for index, name in enumerate(names):
            interface, address = f"{name}0", f"10.213.0.{index + 1}"
            ip("link", "set", interface, "netns", name)
            ip("-n", name, "addr", "add", f"{address}/24", "dev", interface)
            ip("-n", name, "link", "set", interface, "up")
            ip("-n", name, "link", "set", "lo", "up")
            hosts.append((name, address, interface))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"two hosts on 127.0.0.1 instead of two network namespaces: {detail}",
                      stacklevel=1)
        hosts = [(None, "127.0.0.1", None), (None, "127.0.0.1", None)]
    yield hosts
    for name in made:  # its end of the veth pair goes with it
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=60)


def test_two_hosts_train_one_run_equal_to_one_machine(tmp_path, two_hosts, reference):
    (_, endpoint, _), port = two_hosts[0], 29400 if two_hosts[0][0] else free_port()
    common = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
              f"--rdzv-endpoint={endpoint}:{port}", "--rdzv-id=twohosts"]
    agents = [(tmp_path, [*common, f"--local-addr={address}",
                          *(["--rdzv-conf=is_host=1"] if index == 0 else [])],
               TRAINING, namespace, interface)
              for index, (namespace, address, interface) in enumerate(two_hosts)]
    started = time.perf_counter()
    codes = run_forked(agent, agents)
    print(f"two-host job: {time.perf_counter() - started:.1f} s")
    assert codes == [0, 0], worker_logs(tmp_path)[-4000:]
    run_dir = tmp_path / "outputs" / "torchrun" / "twohosts"  # named by the rendezvous id
    assert [path for path in (tmp_path / "outputs").glob("*/*")] == [run_dir]
    assert "the final weights are identical on all 2 ranks" in (run_dir / "train.log").read_text()
    assert_same_weights(final_weights(run_dir), reference)


# -- a lost worker -----------------------------------------------------------------------

def test_a_killed_worker_is_restarted_and_the_run_resumes_exactly(tmp_path, reference):
    """SIGKILL rank 1 in epoch 2 of 3 under --max-restarts=1 (the static rendezvous, whose
    run directory comes from rank 0's clock and is kept in the job's store)."""
    torchrun = ["--nnodes=1", "--nproc-per-node=2", "--max-restarts=1",
                f"--master-port={free_port()}"]
    started = time.perf_counter()
    codes = run_forked(agent, [(tmp_path, torchrun, TRAINING, None, None, (1, 3))])
    print(f"job with a restart: {time.perf_counter() - started:.1f} s")
    logs = worker_logs(tmp_path)
    assert codes == [0], logs[-4000:]
    names = {path.name for path in tmp_path.glob("worker-*.log")}
    assert "worker-rank1-attempt0.log" not in names  # killed; rank 0 lost its peer
    assert {"worker-rank0-attempt1.log", "worker-rank1-attempt1.log"} <= names
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*")]  # one, kept on restart
    log = (run_dir / "train.log").read_text()
    assert "torchrun restart 1 of at most 1 (a worker or node was lost): resuming" in log
    assert f"resumed {run_dir} after epoch 1 of 3" in log
    assert [line.split(",")[0] for line in (run_dir / "metrics.csv").read_text().splitlines()] == [
        "epoch", "1", "2", "3"]
    assert_same_weights(final_weights(run_dir), reference)


def plain_run(folder: Path) -> None:
    """`python train.py` without torchrun, as the reference for a one-process job."""
    result = run_cli(*TRAINING, f"hydra.run.dir={folder / 'run'}")
    (folder / "plain.log").write_text(result.stdout + result.stderr)
    sys.exit(result.returncode)


def test_a_one_process_job_is_restarted_and_resumes_exactly(tmp_path):
    """`torchrun --nproc-per-node=1 --max-restarts=1` (a one-GPU job kept alive): no process
    group, yet a restart resumes the run as a job of several processes does, and the final
    weights equal a plain run's."""
    plain = tmp_path / "plain"
    plain.mkdir()
    assert run_forked(plain_run, [(plain,)]) == [0], (plain / "plain.log").read_text()[-3000:]
    torchrun = ["--nnodes=1", "--nproc-per-node=1", "--max-restarts=1",
                f"--master-port={free_port()}"]
    codes = run_forked(agent, [(tmp_path, torchrun, TRAINING, None, None, (0, 6))])  # epoch 2
    logs = worker_logs(tmp_path)
    assert codes == [0], logs[-4000:]
    assert {path.name for path in tmp_path.glob("worker-*.log")} == {"worker-rank0-attempt1.log"}
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*")]  # one, kept on restart
    log = (run_dir / "train.log").read_text()
    assert "torchrun restart 1 of at most 1 (a worker or node was lost): resuming" in log
    assert f"resumed {run_dir} after epoch 1 of 3" in log
    assert_same_weights(final_weights(run_dir), final_weights(plain / "run"))
