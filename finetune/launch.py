"""Under torchrun, before Hydra: the run directory every rank of every attempt trains in,
and whether this attempt resumes it.

The directory is `hydra.run.dir` when given, else `outputs/torchrun/<rendezvous id>`, else
(the static rendezvous, whose id is `none`) rank 0's clock, which the job's store keeps for
a restarted attempt. Never each machine's clock: Hydra resolves `${now:}` in each process.
An attempt is a restart when an earlier one of this job chose a directory (the store
remembers), when torchrun counts restarts, or when SLURM requeued the job; a restart
resumes from the directory's checkpoints/last.pt, or starts it again when the lost attempt
never finished an epoch. Every rank must see the same absolute directory (and, to resume,
the checkpoint), or the job is refused before anything is written.
"""

import json
import logging
import os
import re
import socket
import time
from dataclasses import asdict, dataclass

from finetune.config.store import new_dir
from finetune.errors import ConfigError
from finetune.state.resume import LAST, with_resume_dir
from finetune.sweep import set_aside_failed_attempt
from finetune.train.distributed import Job, open_job

log = logging.getLogger(__name__)

BY_RUN_ID = os.path.join("outputs", "torchrun")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CLOCK_DIR = re.compile(r"outputs/\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}(-\d+)?")  # new_dir's names
RANK_ZERO_ONLY = ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]",
                  "hydra.job_logging.root.level=ERROR"]  # the other ranks: errors, on the console


@dataclass
class Plan:
    """Rank 0's decision, sent to the other ranks."""

    run_dir: str
    resume: bool  # continue from run_dir's last checkpoint
    note: str  # what happened, for the run's log


def torchrun_argv(argv: list[str]) -> list[str]:
    """The command line this rank runs Hydra with: its run directory (and resume=) named."""
    if {"-m", "--multirun"} & set(argv):
        raise ConfigError("torchrun trains one run over several processes; a sweep (-m) "
                          "cannot run inside it. Drop -m, or sweep without torchrun.")
    job = open_job()
    if job.rank == 0:
        plan = plan_launch(argv, job)
        job.attempt.set("plan", json.dumps(asdict(plan)))
    else:
        plan = Plan(**json.loads(job.attempt.get("plan")))
    check_same_place(job, plan)
    if plan.note:
        job.notes.append(plan.note)
    return rank_argv(argv, plan, job.rank)


def given_run_dir(argv: list[str]) -> str | None:
    given = [arg.split("=", 1)[1] for arg in argv if arg.startswith("hydra.run.dir=")]
    return given[-1] if given else None


def resumes(argv: list[str]) -> bool:
    return any(arg.lstrip("+").startswith("resume=") for arg in argv)


def restart_reason(job: Job) -> str | None:
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts:
        return (f"torchrun restart {restarts} of at most "
                f"{os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')} (a worker or node was lost)")
    if job.earlier("run_dir") is not None:
        return "torchrun started the workers again (the job's nodes changed)"
    if int(os.environ.get("SLURM_RESTART_COUNT", "0")):
        return f"SLURM requeued the job (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']})"
    return None


def run_dir_for(argv: list[str], job: Job) -> str:
    """hydra.run.dir, or one named by the rendezvous id, or rank 0's clock (kept)."""
    given = given_run_dir(argv)
    if given is not None:
        return given
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        if not RUN_ID.fullmatch(run_id):
            raise ConfigError(f"torchrun --rdzv-id={run_id!r} cannot name a run directory: use "
                              "letters, digits, '.', '_' and '-' (at most 128), or give "
                              "hydra.run.dir=PATH.")
        return os.path.join(BY_RUN_ID, run_id)
    earlier = job.earlier("run_dir")
    if earlier is not None and CLOCK_DIR.fullmatch(earlier):
        return earlier
    return new_dir(time.strftime("outputs/%Y-%m-%d/%H-%M-%S"))  # claims the folder


def plan_launch(argv: list[str], job: Job) -> Plan:
    """Rank 0: where the job runs and whether it resumes."""
    reason = restart_reason(job)  # before this attempt records its own choice
    run_dir = run_dir_for(argv, job)
    job.record("run_dir", run_dir)
    if reason is None or resumes(argv):  # a new run, or one the user resumes by name
        return Plan(run_dir, False, f"{reason}: resuming {run_dir} again" if reason else "")
    if os.path.isfile(os.path.join(run_dir, LAST)):
        return Plan(run_dir, True, f"{reason}: resuming {run_dir} from its last checkpoint "
                                   f"({LAST})")
    set_aside_failed_attempt(run_dir)
    return Plan(run_dir, False, f"{reason}: the lost attempt finished no epoch; {run_dir} "
                                "starts again")


def check_same_place(job: Job, plan: Plan) -> None:
    """Every rank must resolve the run directory to the same absolute path (and see the
    checkpoint it resumes from), or the job is refused on every rank, naming the first
    that differs."""
    place = {"host": socket.gethostname(), "path": os.path.abspath(plan.run_dir),
             "sees": not plan.resume or os.path.isfile(os.path.join(plan.run_dir, LAST))}
    if job.rank != 0:
        job.attempt.set(f"place/{job.rank}", json.dumps(place))
        problem = job.attempt.get("verdict").decode()
        job.attempt.set(f"heard/{job.rank}", "1")
    else:
        places = [place] + [json.loads(job.attempt.get(f"place/{rank}"))
                            for rank in range(1, job.world)]
        problem = place_problem(plan.run_dir, places)
        job.attempt.set("verdict", problem)
        # rank 0 may host the store (a launch without torchrun's agent): it stays until
        # every rank has the verdict
        job.attempt.wait([f"heard/{rank}" for rank in range(1, job.world)])
    if problem:
        raise ConfigError(problem)


def place_problem(run_dir: str, places: list[dict]) -> str:
    """Why the ranks cannot share `run_dir` ('' when they can)."""
    first = places[0]
    for rank, place in enumerate(places):
        if place["path"] != first["path"]:
            return (f"torchrun: the run directory would differ between processes: {run_dir!r} is "
                    f"{first['path']} on rank 0 (host {first['host']}) but {place['path']} on "
                    f"rank {rank} (host {place['host']}); their working directories differ. "
                    "Give hydra.run.dir as an absolute path on a file system every node shares.")
        if not place["sees"]:
            return (f"torchrun: rank {rank} (host {place['host']}) does not see "
                    f"{os.path.join(first['path'], LAST)}, which the job resumes from: the run "
                    "directory must be on a file system every node shares.")
    return ""


def rank_argv(argv: list[str], plan: Plan, rank: int) -> list[str]:
    if plan.resume:  # in the run's own directory, as resume= does
        argv = with_resume_dir([arg for arg in argv if not arg.startswith("hydra.run.dir=")]
                               + [f"resume={plan.run_dir}"])
    elif given_run_dir(argv) is None:
        argv = [*argv, f"hydra.run.dir={plan.run_dir}"]
    if rank > 0:  # no .hydra/, no log file
        argv = [arg for arg in argv if not arg.startswith("hydra.output_subdir=")] + RANK_ZERO_ONLY
    return argv
