"""Shared fixtures: composed configs, an offline torch cache, small models."""

import copy
import functools
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

from finetune.config.store import register_schemas

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

register_schemas()

# One torch thread, in this process and in the runs it starts: the tests' tensors are tiny,
# so a second thread adds only its hand-offs (and fights the other process where two run).
# FINETUNE_TEST_THREADS=2 runs the suite with two: every test must hold with either.
# Hugging Face's caches (datasets' Arrow copies, its modules folder) in a folder of the
# session's own, removed when it ends: never the user's ~/.cache/huggingface
HF_HOME = tempfile.mkdtemp(prefix="finetune-tests-hf-")
os.environ["HF_HOME"] = HF_HOME

THREADS = os.environ.get("FINETUNE_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = THREADS
torch.set_num_threads(int(THREADS))


def make_config(*overrides: str) -> DictConfig:
    """The config `python train.py OVERRIDES` would run with (without the hydra section),
    except that plots are off unless asked for: drawing costs about half a second a run,
    and tests/test_plots.py and the command-line tests draw them."""
    if not any(override.startswith("plots=") for override in overrides):
        overrides = ("plots=false", *overrides)
    return copy.deepcopy(composed(tuple(overrides)))  # a copy: tests may change theirs


@functools.lru_cache(maxsize=256)
def composed(overrides: tuple[str, ...]) -> DictConfig:
    """Composing takes ~0.1 s and many tests share their overrides: once per distinct list."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# Small and quick: random init, tiny fake images, one epoch, the quickest torchvision model
# to build and train here (squeezenet1_1: 1.2M parameters, a third of resnet18's time).
FAST = ("backbone.weights=null", "backbone.name=squeezenet1_1", "data=fake",
        "data.train_size=64", "data.val_size=32", "data.batch_size=16", "trainer.max_epochs=1",
        "trainer.device=cpu")
RESNET = "backbone.name=resnet18"
# one short epoch on small image files, after FAST's backbone (the data tests' runs)
IMAGE_RUN = ("trainer.max_epochs=1", "trainer.device=cpu", "data.image_size=32", "data.num_workers=0",
             "data.batch_size=8", "plots=false")


def png_bytes(pixels) -> bytes:
    """A grey uint8 array as a 16x16 PNG file's bytes."""
    from PIL import Image

    stream = io.BytesIO()
    Image.fromarray(pixels).resize((16, 16)).save(stream, format="PNG")
    return stream.getvalue()  # after FAST: where a test needs BatchNorm or resnet's names


# Seconds a subprocess may take before a test calls it hung: a guard against hangs only.
# A run that takes 15 s alone on a quick 2-core machine takes ~90 s on one 6x slower, and
# 5-20x that again beside another torch job; no test waits on a clock otherwise.
HANG_SECONDS = 1800


def run_forked(target, argument_lists: list[tuple]) -> list[int]:
    """`target(*arguments)` in one forked process per argument tuple, all at once (forked:
    no second import of torch); their exit codes. Each child runs torch on one thread:
    OpenMP's thread pool does not survive a fork, and a child entering a parallel region
    with more than one thread waits forever (torchrun gives its workers one thread too)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    jobs = [context.Process(target=one_thread, args=(target, *arguments))
            for arguments in argument_lists]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=HANG_SECONDS)
    return [job.exitcode for job in jobs]


def one_thread(target, *arguments) -> None:
    torch.set_num_threads(1)
    own_progress_lock()
    target(*arguments)


def own_progress_lock() -> None:
    """In a forked child: a progress-bar lock of its own. tqdm's lock holds a multiprocessing
    semaphore that forked children share with the test process; a child SIGKILLed while
    holding it (the soak test kills at random moments) would block every later bar."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


@pytest.fixture(autouse=True)
def offline_torch_cache(monkeypatch, tmp_path_factory, tmp_path):
    """An empty torch cache and home (so an empty feature cache) per test, no network
    (downloads fail as they would offline), and the test's tmp dir as the working directory:
    a default run directory (outputs/...) lands there, never in the checkout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # timm weights: the Hugging Face cache only

    def no_network(url, *args, **kwargs):
        raise OSError(f"network disabled in tests: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


# torch.nn.init's functions, no-ops while building on the meta device: each draw there runs
# a Python decomposition for nothing (60% of building an efficientnet_b5)
WEIGHT_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                         "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_")


@contextmanager
def parameters_on_meta():
    """Build models with parameters and buffers on the meta device: shapes only, no memory,
    no initial weights drawn."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer
    init_functions = {name: getattr(nn.init, name) for name in WEIGHT_INIT_FUNCTIONS}

    def to_meta_parameter(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def to_meta_buffer(module, name, buffer, persistent=True):
        register_buffer(module, name, None if buffer is None else buffer.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = to_meta_parameter, to_meta_buffer
    for name in init_functions:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
        for name, function in init_functions.items():
            setattr(nn.init, name, function)


def run_train(*overrides: str, cwd: Path | None = None, timeout: int = HANG_SECONDS,
              plots: bool = False) -> subprocess.CompletedProcess:
    """`python train.py OVERRIDES` in a subprocess (in the test's working directory, its tmp
    dir, unless `cwd`), never downloading; plots off unless asked for (importing matplotlib
    and drawing cost a second or two a process)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, str(ROOT / "train.py"), *overrides, "backbone.allow_download=false",
               *([] if plots else ["plots=false"])]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_cli(*arguments: str, plots: bool = False) -> SimpleNamespace:
    """`python train.py ARGUMENTS` in this process: the script's own main(), exit code and
    console output, without a new interpreter's imports (3 s here, 15 s on a slow machine).
    Logging handlers and torch's thread count are put back afterwards. The command line's
    own process is tested by the runs that need one (tests/test_cli.py)."""
    from finetune.cli import main

    argv = ["train.py", *arguments, "backbone.allow_download=false",
            *([] if plots else ["plots=false"])]
    stdout, stderr = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    with (mock.patch.object(sys, "argv", argv), mock.patch.dict(os.environ, HYDRA_FULL_ERROR="0"),
          redirect_stdout(stdout), redirect_stderr(stderr)):
        try:
            main()
            code = 0
        except SystemExit as exit:
            if isinstance(exit.code, str):  # sys.exit("message") prints it
                print(exit.code, file=sys.stderr)
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        finally:
            for handler in set(root.handlers) - set(handlers):
                handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
            torch.set_num_threads(threads)
    return SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def checkout_outputs() -> set[Path]:
    """What runs write by default, in the checkout (outputs/, multirun/)."""
    return {path for folder in ("outputs", "multirun") for path in (ROOT / folder).rglob("*")}


def pytest_sessionstart(session):
    session.config.stash[OUTPUTS_BEFORE] = checkout_outputs()


def pytest_sessionfinish(session, exitstatus):
    """Tests write only under their tmp dirs: a new file or folder in the checkout fails
    the session, naming it."""
    shutil.rmtree(HF_HOME, ignore_errors=True)
    added = sorted(checkout_outputs() - session.config.stash.get(OUTPUTS_BEFORE, set()))
    if added:
        print(f"\nFAILED: the tests wrote into the checkout: {[str(p) for p in added[:5]]}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


OUTPUTS_BEFORE = pytest.StashKey[set]()
