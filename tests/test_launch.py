"""Under torchrun, before Hydra: the attempt's corner of the job's store, the run directory,
and whether a restarted attempt resumes (finetune/launch.py, train/distributed.py)."""

import functools
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from finetune.errors import ConfigError
from finetune.launch import CLOCK_DIR, Plan, place_problem, plan_launch, rank_argv
from finetune.state.resume import LAST
from finetune.train.distributed import Job, attempt_token, backend_for

from conftest import FAST, run_cli, run_forked

TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                "SLURM_RESTART_COUNT")


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def job_on(store) -> Job:
    return Job(store, dist.PrefixStore("attempt/", store), rank=0, world=2)


def tokens(store, world: int, late: int) -> dict[int, str]:
    """attempt_token on `world` threads, rank `late` asking a moment after the others."""
    found = {}

    def rank(number):
        if number == late:
            time.sleep(0.3)  # rank 0 meanwhile reads what an earlier attempt left
        found[number] = attempt_token(store, number, world)

    threads = [threading.Thread(target=rank, args=(number,)) for number in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return found


def test_every_rank_of_an_attempt_agrees_on_a_token_no_earlier_attempt_used():
    store = dist.HashStore()
    first = tokens(store, 3, late=2)
    assert len(set(first.values())) == 1
    # rank 2 of a lost attempt asked and died before it read the answer: its key is stale
    store.set("finetune/ask/2", "a dead process's nonce")
    second = tokens(store, 3, late=2)
    assert len(set(second.values())) == 1
    assert set(second.values()) != set(first.values())


def test_the_backend_follows_the_device_not_the_machine():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda")) == backend_for(torch.device("cuda:1")) == "nccl"


def test_a_new_job_runs_in_a_folder_named_by_its_rendezvous_id(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    job = job_on(dist.HashStore())
    assert plan_launch(["train.py"], job) == Plan(os.path.join("outputs", "torchrun", "job42"),
                                                  False, "")
    assert job.earlier("run_dir") == os.path.join("outputs", "torchrun", "job42")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "../../etc")
    with pytest.raises(ConfigError, match=r"--rdzv-id='../../etc' cannot name a run directory"):
        plan_launch(["train.py"], job_on(dist.HashStore()))


def test_the_static_rendezvous_keeps_rank_0s_clock_for_a_restart(monkeypatch, tmp_path):
    store = dist.HashStore()
    plan = plan_launch(["train.py"], job_on(store))
    assert CLOCK_DIR.fullmatch(plan.run_dir) and os.path.isdir(plan.run_dir)  # claimed
    (tmp_path / plan.run_dir / "metrics.csv").write_text("epoch\n")  # lost before epoch 1 ended
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    again = plan_launch(["train.py"], job_on(store))
    assert again.run_dir == plan.run_dir and not again.resume
    assert again.note == (f"torchrun restart 1 of at most 3 (a worker or node was lost): the lost "
                          f"attempt finished no epoch; {plan.run_dir} starts again")
    [aside] = (tmp_path / plan.run_dir).glob("attempt-*")  # kept, out of the new run's way
    assert (aside / "metrics.csv").is_file()
    os.makedirs(os.path.join(plan.run_dir, "checkpoints"))
    open(os.path.join(plan.run_dir, LAST), "wb").close()
    resumed = plan_launch(["train.py"], job_on(store))
    assert resumed == Plan(plan.run_dir, True, "torchrun restart 1 of at most 3 (a worker or node "
                           f"was lost): resuming {plan.run_dir} from its last checkpoint ({LAST})")


def test_a_store_never_chooses_a_folder_outside_the_clocks_names(monkeypatch):
    store = dist.HashStore()
    store.set("finetune/job/run_dir", "/etc")  # anyone who reaches the store's port
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    plan = plan_launch(["train.py"], job_on(store))
    assert CLOCK_DIR.fullmatch(plan.run_dir)


def test_a_requeued_slurm_job_resumes_its_directory(monkeypatch, tmp_path):
    run_dir = tmp_path / "runs" / "1234"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / LAST).write_bytes(b"")
    argv = ["train.py", f"hydra.run.dir={run_dir}"]
    assert not plan_launch(argv, job_on(dist.HashStore())).resume  # a new store: no restart
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    plan = plan_launch(argv, job_on(dist.HashStore()))
    assert plan.resume and plan.note.startswith("SLURM requeued the job (SLURM_RESTART_COUNT=1)")
    for rank in (0, 1):  # resume= in the run's own directory; the other ranks write nothing
        resumed = rank_argv(argv, plan, rank)
        assert f"resume={run_dir}" in resumed and f"hydra.run.dir={run_dir}" in resumed
        subdirs = [arg for arg in resumed if arg.startswith("hydra.output_subdir=")]
        assert (subdirs == ["hydra.output_subdir=null"] if rank else
                len(subdirs) == 1 and subdirs[0].startswith("hydra.output_subdir=.hydra/resume-"))


def test_ranks_that_would_write_different_folders_are_named():
    places = [{"host": "node0", "path": "/home/a/outputs/x", "sees": True},
              {"host": "node0", "path": "/home/a/outputs/x", "sees": True},
              {"host": "node1", "path": "/scratch/outputs/x", "sees": True}]
    problem = place_problem("outputs/x", places)
    assert "'outputs/x' is /home/a/outputs/x on rank 0 (host node0) but /scratch/outputs/x on " \
           "rank 2 (host node1)" in problem and "absolute path on a file system" in problem
    places[2] = {"host": "node1", "path": "/home/a/outputs/x", "sees": False}
    assert "rank 2 (host node1) does not see /home/a/outputs/x/checkpoints/last.pt" in \
           place_problem("outputs/x", places)
    assert place_problem("outputs/x", places[:2]) == ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_in(rank: int, port: int, folder, arguments: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    os.chdir(folder)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = run_cli(*arguments)
    (folder / "console.log").write_text(result.stdout + result.stderr)
    sys.exit(result.returncode)


def test_two_nodes_whose_run_directories_differ_are_refused_before_writing(tmp_path):
    """Two 'nodes' in different working directories, a relative hydra.run.dir: both exit
    with the reason, and neither writes a run."""
    port, folders = free_port(), [tmp_path / "node0", tmp_path / "node1"]
    arguments = [*FAST, "hydra.run.dir=runs/shared"]
    codes = run_forked(rank_in, [(rank, port, folders[rank], arguments) for rank in range(2)])
    assert codes == [2, 2]
    for folder in folders:
        console = (folder / "console.log").read_text()
        assert (f"'runs/shared' is {folders[0]}/runs/shared on rank 0 (host {socket.gethostname()})"
                f" but {folders[1]}/runs/shared on rank 1") in console
        assert not (folder / "runs").exists()


def documented_torchrun_commands() -> list[str]:
    """docs/multi-gpu.md's torchrun command lines (continuations joined), variables given
    the values SLURM would."""
    from conftest import ROOT

    text = (ROOT / "docs" / "multi-gpu.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    values = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "1234", "ENDPOINT": "node0"}
    expand = functools.partial(re.sub, r"\$\{?(\w+)\}?", lambda found: values[found.group(1)])
    return [expand(line) for line in lines if re.match(r"\s*(srun )?torchrun ", line)]


def test_the_documented_torchrun_commands_parse_and_the_slurm_script_is_bash():
    from torch.distributed.run import parse_args

    from conftest import ROOT

    commands = documented_torchrun_commands()
    assert len(commands) == 3  # one node, several machines, SLURM
    for command in commands:
        words = shlex.split(command)
        words = words[words.index("torchrun") + 1:]
        parsed = parse_args(words[:words.index("train.py") + 1])
        assert parsed.training_script == "train.py"
    slurm = re.search(r"```bash\n(#!/bin/bash\n.*?)```", (ROOT / "docs" / "multi-gpu.md").read_text(),
                      re.S).group(1)
    checked = subprocess.run(["bash", "-n"], input=slurm, text=True, capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "--requeue" in slurm and '--rdzv-id="$SLURM_JOB_ID"' in slurm
