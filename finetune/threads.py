"""Torch's CPU threads when jobs share one machine: jobs that run at once split its cores.

torch starts as many threads as there are cores, so two parallel jobs on two cores each
run two threads on one core's worth of time, and both slow down more than they gain.
"""

import os
from typing import Any


def machine_cores() -> int:
    """The cores this process may run on (a CPU affinity or a container's set, if any)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def jobs_at_once(launcher: Any) -> int:
    """How many jobs a Hydra launcher runs at once here: joblib's n_jobs, counted as joblib
    counts it (-1: every core, -2: all but one), capped at the cores; otherwise 1."""
    if "JoblibLauncher" not in str(launcher.get("_target_", "")):
        return 1
    cores, jobs = machine_cores(), launcher.get("n_jobs") or 1
    return max(1, min(cores, jobs if jobs > 0 else cores + 1 + jobs))


def share_cores(launcher: Any) -> str | None:
    """Give this job its share of the cores (unless OMP_NUM_THREADS says otherwise); the
    line for its log, or None when it runs alone."""
    jobs = jobs_at_once(launcher)
    if jobs == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    import torch

    threads = max(1, machine_cores() // jobs)
    torch.set_num_threads(threads)
    return (f"torch threads: {threads} ({machine_cores()} cores shared by {jobs} jobs at "
            "once; set OMP_NUM_THREADS to choose)")
