"""This tool against a bare PyTorch loop doing the same work, in one invocation.

    python benchmarks/speed.py [--repeats 3]

The bare loop is the seed recipe written out by hand: Net(pretrained, add_layers), freezing
by requires_grad, SGD on the trainable parameters, model.train() / model.eval() around each
epoch, on the same digits tensors (32x32, batch 64), resnet18 from random init. As in the
seed, its frozen BatchNorm layers run in train mode; the tool keeps them in eval mode. Each item is
measured --repeats times and the median ratio printed as a Markdown table:

1. full fine-tuning, 3 epochs: tool / bare median epoch time (train + validation; the
   tool's includes copying its checkpoint state, whose writing overlaps the next epoch)
2. linear probe, 10 epochs: tool wall time / bare wall time (model building included)
3. sweep of 8 linear-probe jobs over head and optimizer (python train.py -m, one process):
   wall time / 8 x the bare linear probe's
4. peak RSS of a linear probe / peak RSS of full fine-tuning, same batch size (tool runs)
5. `python train.py --help` wall time / `python -c "import torch"` wall time
"""

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["backbone.weights=null", "backbone.allow_download=false", "data.batch_size=64",
          "trainer.device=cpu"]
LINEAR_PROBE = ["freeze=[pretrained]", "optimizer.lr=0.1", "trainer.max_epochs=10"]
FULL = ["freeze=[]", "trainer.max_epochs=3"]


# --- the bare loop -------------------------------------------------------------------------

def digits_tensors():
    """The same inputs the tool's data=digits builds (fixed stratified split, 32x32, 3 channels)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_index, val_index = train_test_split(range(len(digits.target)), test_size=0.2,
                                              stratify=digits.target, random_state=0)
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = ((pixels.expand(-1, 3, -1, -1) - mean) / std).contiguous()
    labels = torch.tensor(digits.target)
    return (pixels[train_index], labels[train_index]), (pixels[val_index], labels[val_index])


def bare_loop(epochs: int, freeze_backbone: bool, data) -> list[float]:
    """The seed recipe by hand; returns each epoch's seconds (train + validation)."""
    import torch
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Net(nn.Module):
        def __init__(self, pretrained_model):
            super().__init__()
            self.pretrained = pretrained_model
            self.add_layers = nn.Linear(512, 10)

        def forward(self, x):
            return self.add_layers(self.pretrained(x))

    torch.manual_seed(0)
    backbone = torchvision.models.resnet18()
    backbone.fc = nn.Identity()
    net = Net(backbone)
    for name, param in net.named_parameters():
        if freeze_backbone and "pretrained" in name.split("."):
            param.requires_grad = False
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad],
                                lr=0.1 if freeze_backbone else 0.05, momentum=0.9, weight_decay=5e-4)
    (train_x, train_y), (val_x, val_y) = data
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(val_x, val_y), batch_size=64)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        net.train()
        for images, labels in train:
            loss = nn.functional.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in val:
                correct += (net(images).argmax(dim=1) == labels).sum().item()
        seconds.append(time.perf_counter() - started)
    return seconds


# --- this tool -----------------------------------------------------------------------------

def tool_run(overrides: list[str], folder: Path) -> Path:
    """`run()` in this process, as train.py does it; returns the run directory."""
    from hydra import compose, initialize_config_dir

    from finetune.config import register_schemas
    from finetune.run import run

    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*COMMON, *overrides,
                                                       f"trainer.cache_dir={folder}/cache"])
    run_dir = folder / "run"
    run(cfg, str(run_dir))
    return run_dir


def epoch_seconds(run_dir: Path) -> list[float]:
    return [float(row["seconds"]) for row in csv.DictReader(open(run_dir / "metrics.csv"))]


def peak_rss_mib(overrides: list[str]) -> float:
    """Peak resident memory of a separate process running the tool."""
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's size when it forks
    code = ("import sys, tempfile, pathlib; sys.path.insert(0, sys.argv[1]);"
            "from benchmarks.speed import tool_run;"
            "tool_run(sys.argv[2:], pathlib.Path(tempfile.mkdtemp()));"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT), *overrides],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, cwd=ROOT)
    return time.perf_counter() - started


# --- the items -----------------------------------------------------------------------------

def full_finetune_ratio(data, repeat: int) -> tuple[float, str]:
    def tool_epochs():
        with tempfile.TemporaryDirectory() as folder:
            return epoch_seconds(tool_run(FULL, Path(folder)))

    runs = [tool_epochs, lambda: bare_loop(3, False, data)]
    if repeat % 2:  # alternate which goes first: the machine warms up and cools down
        runs.reverse()
    results = [run() for run in runs]
    tool, bare = (statistics.median(seconds) for seconds in (results if repeat % 2 == 0
                                                                 else results[::-1]))
    return tool / bare, f"{tool:.2f} s / {bare:.2f} s per epoch"


def linear_probe_ratio(data, bare_seconds: list[float]) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        tool_run(LINEAR_PROBE, Path(folder))  # a fresh cache: the features are computed here
        tool = time.perf_counter() - started
    started = time.perf_counter()
    bare_loop(10, True, data)
    bare = time.perf_counter() - started
    bare_seconds.append(bare)
    return tool / bare, f"{tool:.2f} s / {bare:.2f} s"


def sweep_ratio(bare_probe: float) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as folder:
        seconds = wall([sys.executable, "train.py", "-m", *COMMON, *LINEAR_PROBE,
                        "head=linear,mlp", "optimizer=sgd,adamw", "optimizer.lr=0.1,0.01",
                        f"hydra.sweep.dir={folder}/sweep", f"trainer.cache_dir={folder}/cache"])
        jobs = len(list(Path(folder, "sweep").glob("*/summary.json")))
    assert jobs == 8, f"the sweep finished {jobs} jobs, not 8"
    return seconds / (8 * bare_probe), f"{seconds:.1f} s / (8 x {bare_probe:.2f} s)"


def memory_ratio() -> tuple[float, str]:
    probe = peak_rss_mib([*LINEAR_PROBE, "trainer.max_epochs=2"])
    full = peak_rss_mib([*FULL, "trainer.max_epochs=2"])
    return probe / full, f"{probe:.0f} MiB / {full:.0f} MiB"


def help_ratio() -> tuple[float, str]:
    cli = wall([sys.executable, "train.py", "--help"])
    torch = wall([sys.executable, "-c", "import torch"])
    return cli / torch, f"{cli:.2f} s / {torch:.2f} s"


def median_of(repeats: int, measure) -> tuple[float, str]:
    """`measure(repeat)` `repeats` times: the median ratio and the details of that run."""
    results = [measure(repeat) for repeat in range(repeats)]
    ratios = [result[0] for result in results]
    middle = results[ratios.index(statistics.median_low(ratios))]
    return statistics.median(ratios), middle[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import logging

    import torch
    logging.disable(logging.INFO)  # the tool's per-epoch log lines would drown the table
    data = digits_tensors()
    rows = [("1. full fine-tuning, 3 epochs: time per epoch", "<= 1.05",
             *median_of(args.repeats, lambda repeat: full_finetune_ratio(data, repeat)))]
    bare_probes: list[float] = []
    rows.append(("2. linear probe, 10 epochs: total time", "<= 0.25",
                 *median_of(args.repeats, lambda repeat: linear_probe_ratio(data, bare_probes))))
    bare_probe = statistics.median(bare_probes)
    rows.append(("3. sweep of 8 linear probes / 8 bare probes", "<= 0.2",
                 *median_of(args.repeats, lambda repeat: sweep_ratio(bare_probe))))
    rows.append(("4. peak RSS, linear probe / full fine-tuning", "<= 0.7",
                 *median_of(args.repeats, lambda repeat: memory_ratio())))
    rows.append(("5. `train.py --help` / `import torch` wall time", "<= 1.0",
                 *median_of(args.repeats, lambda repeat: help_ratio())))
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"Python {platform.python_version()}, torch {torch.__version__}, "
          f"median of {args.repeats} runs\n")
    print("| item | target | ratio | measured (median run) |")
    print("| --- | --- | --- | --- |")
    for item, target, value, detail in rows:
        print(f"| {item} | {target} | {value:.3f} | {detail} |")
    print(json.dumps({row[0]: round(row[2], 4) for row in rows}), file=sys.stderr)


if __name__ == "__main__":
    main()
