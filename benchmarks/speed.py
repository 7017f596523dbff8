"""This tool against a bare PyTorch loop doing the same work, in one invocation.

    python benchmarks/speed.py [--repeats 5]           # items 1-8 on the CPU
    python benchmarks/speed.py --gpu [--repeats 3]     # items 1-2 on a CUDA GPU

The bare loop is the seed recipe written out by hand: Net(pretrained, add_layers), freezing
by requires_grad, SGD on the trainable parameters, model.train() / model.eval() around each
epoch, on the same digits tensors (batch 64), from random init. On the CPU: resnet18 at 32x32
in float32; with --gpu: resnet50 at 224x224 under bf16 autocast, in both. As in the seed,
the bare loop's frozen BatchNorm layers run in train mode; the tool keeps them in eval mode.
Each item is measured --repeats times and the median ratio printed as a Markdown table:

1. full fine-tuning, 3 epochs: tool / bare median epoch time (train + validation; the
   tool's includes copying its checkpoint state, whose writing overlaps the next epoch)
2. linear probe, 10 epochs: tool wall time / bare wall time (data and model building
   included on both sides)
3. sweep of 8 linear-probe jobs over head and optimizer (`python train.py -m`, one process):
   wall time / 8 x the wall time of `python benchmarks/speed.py --bare-probe`, the bare
   linear probe as its own process, so that both sides include starting Python and importing
   torch and torchvision (the in-process figure is printed beside it)
4. peak RSS of a linear probe / peak RSS of full fine-tuning, same batch size (tool runs);
   also the same ratio counting only what each run adds to the memory its imports take
5. `python train.py --help` wall time / `python -c "import torch"` wall time

On a folder of 3,000 JPEGs (256x256, quality 90, 10 classes; benchmarks/jpeg_data.py draws
it once), against torchvision's ImageFolder + PIL transforms + DataLoader with the same two
workers (`--folder` runs these alone):

7. the training loader alone, epoch 2: tool images/s / bare images/s, at 112x112 (resize
   128, center crop); 7b the same with a random resized crop and a flip; 7c every image
   decoded (data.cache_images=false), epoch 1: the tool's decoder (TorchCodec when
   installed) and tensor resize against PIL's
8. full fine-tuning of mobilenet_v3_small at 112x112, 3 epochs: tool / bare time per epoch
   over epochs 2-3 (the tool's first epoch reads the image cache it built at start-up)

The same JPEGs as Parquet files and WebDataset shards (`--hf` runs these alone): the
training loader of data=hf (10), data=webdataset (10b) and data=hf data.streaming=true
(10c, against the folder with data.cache_images=false) / data=imagefolder's, the median
of epochs 2-6 (an epoch from the image cache takes about 0.1 s, too short to time alone)

The bare loop draws no pictures, so the tool runs with plots=false in items 1-4; what the
default plots=auto adds is measured on its own (row 6: item 2's linear probe with plots on
/ the same with plots off; no target).
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `finetune` is importable
sys.path.insert(0, str(ROOT / "benchmarks"))  # and its data modules
LINEAR_PROBE = ["freeze=[pretrained]", "optimizer.lr=0.1", "trainer.max_epochs=10"]
FULL = ["freeze=[]", "trainer.max_epochs=3"]


@dataclass
class Work:
    """What both sides run: backbone, image size, device and precision."""

    backbone: str = "resnet18"
    image_size: int = 32
    device: str = "cpu"
    bf16: bool = False

    def overrides(self) -> list[str]:
        return ["backbone.weights=null", "backbone.allow_download=false", "data.batch_size=64",
                "plots=false",  # the bare loop draws nothing; row 6 measures what plots add
                f"backbone={self.backbone}", f"data.image_size={self.image_size}",
                f"trainer.device={self.device}", f"trainer.precision={'bf16' if self.bf16 else 32}"]


CPU_WORK = Work()
GPU_WORK = Work("resnet50", 224, "cuda", bf16=True)


# --- the bare loop -------------------------------------------------------------------------

def digits_tensors(image_size: int = 32):
    """The same inputs the tool's data=digits builds (fixed stratified split, 3 channels)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_index, val_index = train_test_split(range(len(digits.target)), test_size=0.2,
                                              stratify=digits.target, random_state=0)
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear",
                           align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = ((pixels.expand(-1, 3, -1, -1) - mean) / std).contiguous()
    labels = torch.tensor(digits.target)
    return (pixels[train_index], labels[train_index]), (pixels[val_index], labels[val_index])


def bare_loop(epochs: int, freeze_backbone: bool, data, work: Work = CPU_WORK) -> list[float]:
    """The seed recipe by hand; returns each epoch's seconds (train + validation)."""
    import torch
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Net(nn.Module):
        def __init__(self, pretrained_model, features):
            super().__init__()
            self.pretrained = pretrained_model
            self.add_layers = nn.Linear(features, 10)

        def forward(self, x):
            return self.add_layers(self.pretrained(x))

    torch.manual_seed(0)
    backbone = torchvision.models.get_model(work.backbone)
    features = backbone.fc.in_features
    backbone.fc = nn.Identity()
    net = Net(backbone, features).to(work.device)
    for name, param in net.named_parameters():
        if freeze_backbone and "pretrained" in name.split("."):
            param.requires_grad = False
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad],
                                lr=0.1 if freeze_backbone else 0.05, momentum=0.9, weight_decay=5e-4)
    (train_x, train_y), (val_x, val_y) = data
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(val_x, val_y), batch_size=64)
    return bare_epochs(net, optimizer, train, val, epochs, work)


def bare_epochs(net, optimizer, train, val, epochs: int, work: Work) -> list[float]:
    """The seed recipe's epoch loop by hand: each epoch's seconds (train + validation)."""
    import contextlib

    import torch
    from torch import nn

    def autocast():
        if work.bf16:
            return torch.autocast(torch.device(work.device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        net.train()
        for images, labels in train:
            images, labels = images.to(work.device), labels.to(work.device)
            with autocast():
                loss = nn.functional.cross_entropy(net(images).float(), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in val:
                with autocast():
                    logits = net(images.to(work.device))
                correct += (logits.argmax(dim=1).cpu() == labels).sum().item()
        seconds.append(time.perf_counter() - started)
    return seconds


def bare_probe_process() -> None:
    """`--bare-probe`: one bare linear probe as a user would run it, imports included."""
    bare_loop(10, True, digits_tensors())


# --- this tool -----------------------------------------------------------------------------

def tool_run(overrides: list[str], folder: Path, work: Work = CPU_WORK, name: str = "run") -> Path:
    """`run()` in this process, as train.py does it, into folder/name, with its feature cache
    in folder/cache; returns the run directory."""
    from hydra import compose, initialize_config_dir

    from finetune.config.store import register_schemas
    from finetune.run import run

    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*work.overrides(), *overrides,
                                                       f"trainer.cache_dir={folder}/cache"])
    run_dir = folder / name
    run(cfg, str(run_dir))
    return run_dir


def epoch_seconds(run_dir: Path) -> list[float]:
    return [float(row["seconds"]) for row in csv.DictReader(open(run_dir / "metrics.csv"))]


def peak_rss_mib(overrides: list[str]) -> tuple[float, float]:
    """Peak resident memory of a separate process running the tool, and its resident
    memory once the imports are done, before anything is built."""
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's size when it forks
    code = ("import sys, tempfile, pathlib; sys.path.insert(0, sys.argv[1]);"
            "import finetune.run; from benchmarks.speed import tool_run, memory_line;"
            "imported = memory_line('VmRSS');"
            "tool_run(sys.argv[2:], pathlib.Path(tempfile.mkdtemp()));"
            "print(imported, memory_line('VmHWM'))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT), *overrides],
                            capture_output=True, text=True, check=True)
    imported, peak = result.stdout.split()[-2:]
    return int(peak) / 1024, int(imported) / 1024


def memory_line(field: str) -> str:
    return next(line.split()[1] for line in open("/proc/self/status") if line.startswith(field))


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, cwd=ROOT)
    return time.perf_counter() - started


# --- the items -----------------------------------------------------------------------------

def full_finetune_ratio(data, repeat: int, work: Work) -> tuple[float, str]:
    def tool_epochs():
        with tempfile.TemporaryDirectory() as folder:
            return epoch_seconds(tool_run(FULL, Path(folder), work))

    runs = [tool_epochs, lambda: bare_loop(3, False, data, work)]
    if repeat % 2:  # alternate which goes first: the machine warms up and cools down
        runs.reverse()
    results = [run() for run in runs]
    tool, bare = (statistics.median(seconds) for seconds in (results if repeat % 2 == 0
                                                                 else results[::-1]))
    return tool / bare, f"{tool:.2f} s / {bare:.2f} s per epoch"


def linear_probe_ratio(bare_seconds: list[float], work: Work) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        tool_run(LINEAR_PROBE, Path(folder), work)  # a fresh cache: features computed here
        tool = time.perf_counter() - started
    started = time.perf_counter()
    bare_loop(10, True, digits_tensors(work.image_size), work)  # its data built too, as the tool's
    bare = time.perf_counter() - started
    bare_seconds.append(bare)
    return tool / bare, f"{tool:.2f} s / {bare:.2f} s"


def sweep_ratio(bare_in_process: float) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as folder:
        seconds = wall([sys.executable, "train.py", "-m", *CPU_WORK.overrides(), *LINEAR_PROBE,
                        "head=linear,mlp", "optimizer=sgd,adamw", "optimizer.lr=0.1,0.01",
                        f"hydra.sweep.dir={folder}/sweep", f"trainer.cache_dir={folder}/cache"])
        jobs = len(list(Path(folder, "sweep").glob("*/summary.json")))
    assert jobs == 8, f"the sweep finished {jobs} jobs, not 8"
    bare = wall([sys.executable, "benchmarks/speed.py", "--bare-probe"])
    return seconds / (8 * bare), (f"{seconds:.1f} s / (8 x {bare:.2f} s); against the "
                                  f"in-process bare probe: {seconds / (8 * bare_in_process):.3f}")


def plots_cost(repeat: int) -> tuple[float, str]:
    """Item 2's linear probe with plots=auto (the default) / with plots=false, each timed in
    its own process (so each pays for importing matplotlib, if it draws), features cached."""
    code = ("import sys, time, pathlib; sys.path.insert(0, sys.argv[1]);"
            "from benchmarks.speed import tool_run; started = time.perf_counter();"
            "tool_run(sys.argv[4:], pathlib.Path(sys.argv[2]), name=sys.argv[3]);"
            "print(time.perf_counter() - started)")
    seconds = {}
    with tempfile.TemporaryDirectory() as folder:
        tool_run(LINEAR_PROBE, Path(folder), name="first")  # then both runs load the features
        for plots in ("auto", "false") if repeat % 2 == 0 else ("false", "auto"):
            result = subprocess.run([sys.executable, "-c", code, str(ROOT), folder, plots,
                                     *LINEAR_PROBE, f"plots={plots}"],
                                    capture_output=True, text=True, check=True)
            seconds[plots] = float(result.stdout.split()[-1])
    auto, off = seconds["auto"], seconds["false"]
    return auto / off, f"{auto:.2f} s / {off:.2f} s (imports included): plots add {auto - off:.2f} s"


def memory_ratio() -> tuple[float, str]:
    probe, probe_imports = peak_rss_mib([*LINEAR_PROBE, "trainer.max_epochs=2"])
    full, full_imports = peak_rss_mib([*FULL, "trainer.max_epochs=2"])
    added = (probe - probe_imports) / (full - full_imports)
    return probe / full, (f"{probe:.0f} MiB / {full:.0f} MiB; above the {full_imports:.0f} MiB "
                          f"the imports take: {probe - probe_imports:.0f} / "
                          f"{full - full_imports:.0f} MiB = {added:.3f}")


def help_ratio() -> tuple[float, str]:
    cli = wall([sys.executable, "train.py", "--help"])
    torch = wall([sys.executable, "-c", "import torch"])
    return cli / torch, f"{cli:.2f} s / {torch:.2f} s"


# --- a folder of JPEGs (items 7 and 8) ----------------------------------------------------

FOLDER_WORK = Work("mobilenet_v3_small", 112)  # small enough that decoding matters on a CPU
FOLDER_WORKERS = 2  # loader processes, the same on both sides


def bare_folder_loaders(root: Path, augment: bool, image_size: int = FOLDER_WORK.image_size,
                        workers: int = FOLDER_WORKERS):
    """torchvision's ImageFolder, PIL transforms and a DataLoader, as a user writes them."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    from finetune.model.net import IMAGENET_MEAN, IMAGENET_STD

    to_tensor = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    center = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    random_crop = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    train = datasets.ImageFolder(str(root / "train"),
                                 T.Compose([*(random_crop if augment else center), *to_tensor]))
    val = datasets.ImageFolder(str(root / "val"), T.Compose([*center, *to_tensor]))
    pin = torch.cuda.is_available()
    return (DataLoader(train, batch_size=64, shuffle=True, num_workers=workers, pin_memory=pin),
            DataLoader(val, batch_size=64, num_workers=workers, pin_memory=pin))


def images_per_second(loader, epochs: int = 2) -> list[float]:
    """Each epoch's images per second through a loader, nothing else done with them."""
    rates = []
    for _ in range(epochs):
        started, count = time.perf_counter(), 0
        for images, _ in loader:
            count += len(images)
        rates.append(count / (time.perf_counter() - started))
    return rates


def tool_folder_overrides(root: Path, augment: bool) -> list[str]:
    return ["data=imagefolder", f"data.root={root}", f"data.num_workers={FOLDER_WORKERS}",
            f"data.augment={'light' if augment else 'none'}"]


def loader_rates(root: Path, augment: bool, *overrides: str):
    """Images/s of the tool's training loader and the bare one, epochs 1 and 2; the tool's
    start-up seconds (the image cache filled, unless off) and how its batches are read."""
    from hydra import compose, initialize_config_dir

    from finetune.config.store import register_schemas
    from finetune.run import build

    bare = images_per_second(bare_folder_loaders(root, augment)[0])
    register_schemas()
    with tempfile.TemporaryDirectory() as folder, \
            initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            *FOLDER_WORK.overrides(), *tool_folder_overrides(root, augment),
            f"trainer.cache_dir={folder}", *overrides])
        started = time.perf_counter()
        setup = build(cfg)  # the image cache is filled here, once
        built = time.perf_counter() - started
        loader = setup.data.train_loader
        tool = images_per_second(loader)
    how = (f"{loader.num_workers} workers" if loader.num_workers
           else "whole batches read from the cache in the main process")
    return tool, bare, built, how


def pipeline_ratio(root: Path, augment: bool) -> tuple[float, str]:
    """Item 7: the training loader alone, epoch 2: tool images/s / bare images/s."""
    tool, bare, built, how = loader_rates(root, augment)
    return tool[1] / bare[1], (f"tool {tool[1]:.0f} images/s (epoch 1: {tool[0]:.0f}; {how}; "
                               f"start-up with the cache built: {built:.1f} s), bare "
                               f"{bare[1]:.0f} images/s (epoch 1: {bare[0]:.0f}; "
                               f"{FOLDER_WORKERS} workers)")


def decoding_ratio(root: Path) -> tuple[float, str]:
    """Item 7c: every image decoded (no image cache), epoch 1: tool images/s / bare, the
    same worker count; the tool's decoder against PIL's."""
    from finetune.data.images import decoder_name

    tool, bare, _, how = loader_rates(root, False, "data.cache_images=false")
    return tool[0] / bare[0], (f"tool {tool[0]:.0f} images/s ({decoder_name()}, tensor resize; "
                               f"{how}), bare {bare[0]:.0f} images/s (PIL; {FOLDER_WORKERS} workers)")


def ten_class_model(work: Work):
    """The work's torchvision model with a 10-way last layer, on its device; its optimizer."""
    import torch
    import torchvision
    from torch import nn

    torch.manual_seed(0)
    net = torchvision.models.get_model(work.backbone)
    if work.backbone.startswith("resnet"):
        net.fc = nn.Linear(net.fc.in_features, 10)
    else:  # mobilenet_v3: its last classifier layer
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, 10)
    net.to(work.device)
    return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def bare_folder_finetune(root: Path, epochs: int, work: Work = FOLDER_WORK,
                         workers: int = FOLDER_WORKERS) -> list[float]:
    """Full fine-tuning on the folder by hand: each epoch's seconds (train + validation)."""
    net, optimizer = ten_class_model(work)
    train, val = bare_folder_loaders(root, augment=False, image_size=work.image_size, workers=workers)
    return bare_epochs(net, optimizer, train, val, epochs, work)


def ceiling_epochs(work: Work, train_images: int, val_images: int, epochs: int) -> list[float]:
    """The same epochs on one random batch already on the device: no data pipeline at all,
    the most any pipeline can reach (the ceiling of item 9)."""
    import torch

    net, optimizer = ten_class_model(work)
    images = torch.randn(64, 3, work.image_size, work.image_size, device=work.device)
    labels = torch.randint(0, 10, (64,), device=work.device)
    return bare_epochs(net, optimizer, [(images, labels)] * (train_images // 64),
                       [(images, labels.cpu())] * (val_images // 64), epochs, work)


def gpu_folder_ratio(root: Path) -> tuple[float, str]:
    """Item 9: resnet50 at 224 in bf16 on the JPEG folder, 3 epochs: the ceiling's time per
    epoch / the tool's (epochs 2-3; 1.0 would be a GPU never kept waiting), the bare
    ImageFolder loop's beside it, both loaders with data.num_workers=auto's count."""
    from finetune.data.loaders import worker_count

    workers = worker_count("auto")
    with tempfile.TemporaryDirectory() as folder:
        run_dir = tool_run([*tool_folder_overrides(root, False), "data.num_workers=auto",
                            "freeze=[]", "trainer.max_epochs=3"],
                           Path(folder), GPU_WORK)
        tool = epoch_seconds(run_dir)
    bare = bare_folder_finetune(root, 3, GPU_WORK, workers)
    train_images = len(list((root / "train").rglob("*.jpg")))
    ceiling = ceiling_epochs(GPU_WORK, train_images, len(list((root / "val").rglob("*.jpg"))), 3)
    ratio = statistics.mean(ceiling[1:]) / statistics.mean(tool[1:])
    bare_ratio = statistics.mean(ceiling[1:]) / statistics.mean(bare[1:])
    return ratio, (f"ceiling {', '.join(f'{s:.2f}' for s in ceiling)} s, tool "
                   f"{', '.join(f'{s:.2f}' for s in tool)} s, bare "
                   f"{', '.join(f'{s:.2f}' for s in bare)} s per epoch ({workers} workers; "
                   f"the bare loop reaches {bare_ratio:.3f} of the ceiling)")


def folder_finetune_ratio(root: Path) -> tuple[float, str]:
    """Item 8: full fine-tuning on the folder, 3 epochs: tool / bare time per epoch, 2-3."""
    bare = bare_folder_finetune(root, 3)
    with tempfile.TemporaryDirectory() as folder:
        run_dir = tool_run([*tool_folder_overrides(root, False), "freeze=[]", "trainer.max_epochs=3"],
                           Path(folder), FOLDER_WORK)
        tool = epoch_seconds(run_dir)
    ratio = statistics.mean(tool[1:]) / statistics.mean(bare[1:])
    return ratio, (f"tool {', '.join(f'{s:.1f}' for s in tool)} s, bare "
                   f"{', '.join(f'{s:.1f}' for s in bare)} s per epoch ({FOLDER_WORK.backbone} at "
                   f"{FOLDER_WORK.image_size}, {FOLDER_WORKERS} workers each; epochs 2-3 compared)")


def folder_rows(repeats: int) -> list[tuple]:
    import jpeg_data

    root = jpeg_data.jpeg_folder()
    return [("7. image folder, training loader alone, epoch 2: images/s", ">= 5",
             *median_of(repeats, lambda _: pipeline_ratio(root, augment=False))),
            ("7b. the same with random resized crop + flip", ">= 3",
             *median_of(repeats, lambda _: pipeline_ratio(root, augment=True))),
            ("7c. every image decoded (data.cache_images=false), epoch 1: images/s", "> 1",
             *median_of(repeats, lambda _: decoding_ratio(root))),
            ("8. image folder, full fine-tuning, 3 epochs: time per epoch", "<= 0.7",
             *median_of(repeats, lambda _: folder_finetune_ratio(root)))]


SOURCE_EPOCHS = 6  # an epoch from the image cache takes ~0.1 s: one is all noise


def source_ratio(root: Path, name: str, data: list[str], folder_extra: tuple[str, ...] = ()
                 ) -> tuple[float, str]:
    """Items 10, 10b and 10c: the training loader alone, the median of epochs 2-6, the same
    JPEGs read by another data option (`data`) against data=imagefolder on the folder (and
    `folder_extra`), both with the image cache unless told, as a user runs them: its
    images/s / the folder's. Both are built first and their epochs alternate, so a slow
    spell of the machine falls on both sides, not on whichever ran second."""
    from hydra import compose, initialize_config_dir

    from finetune.config.store import register_schemas
    from finetune.run import build

    register_schemas()
    loaders, built, rates = {}, {}, {"folder": [], name: []}
    with tempfile.TemporaryDirectory() as folder, \
            initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for side, overrides in (("folder", [*tool_folder_overrides(root, False), *folder_extra]),
                                (name, [*data, f"data.num_workers={FOLDER_WORKERS}"])):
            cfg = compose(config_name="config", overrides=[
                *FOLDER_WORK.overrides(), *overrides, f"trainer.cache_dir={folder}/{side}",
                *([f"data.cache_dir={folder}/hf"] if side == "hf" else [])])
            started = time.perf_counter()
            loaders[side] = build(cfg).data.train_loader  # the image cache is filled here
            built[side] = time.perf_counter() - started
        for _ in range(SOURCE_EPOCHS):
            for side, loader in loaders.items():
                rates[side] += images_per_second(loader, epochs=1)
    other, files = rates[name], rates["folder"]
    later_other, later_files = statistics.median(other[1:]), statistics.median(files[1:])
    return later_other / later_files, (
        f"{name} {later_other:.0f} images/s (epochs 2-{SOURCE_EPOCHS}: {spread(other[1:])}; "
        f"epoch 1: {other[0]:.0f}; start-up {built[name]:.1f} s), folder {later_files:.0f} "
        f"images/s (epochs 2-{SOURCE_EPOCHS}: {spread(files[1:])}; epoch 1: {files[0]:.0f}; "
        f"start-up {built['folder']:.1f} s)")


def spread(rates: list[float]) -> str:
    return f"{min(rates):.0f} to {max(rates):.0f}"


def hf_rows(repeats: int) -> list[tuple]:
    import jpeg_data

    root, parquet, shards = jpeg_data.jpeg_folder(), jpeg_data.parquet_folder(), jpeg_data.shard_folder()
    webdataset = ["data=webdataset", f"data.train_shards='{shards}/train-{{0000..0004}}.tar'",
                  f"data.val_shards='{shards}/val-0000.tar'"]
    return [("10. data=hf (Parquet of the same JPEGs) / data=imagefolder, training loader, "
             f"the median of epochs 2-{SOURCE_EPOCHS}: images/s", ">= 0.9",
             *median_of(repeats, lambda _: source_ratio(root, "hf", ["data=hf", f"data.path={parquet}"]))),
            ("10b. data=webdataset (tar shards of the same JPEGs) / data=imagefolder, the same",
             ">= 0.9", *median_of(repeats, lambda _: source_ratio(root, "webdataset", webdataset))),
            ("10c. data=hf data.streaming=true / data=imagefolder with data.cache_images=false "
             "(both decode every image each epoch), the same", "(>= 0.9)",
             *median_of(repeats, lambda _: source_ratio(
                 root, "streaming", ["data=hf", f"data.path={parquet}", "data.streaming=true"],
                 ("data.cache_images=false",))))]


def median_of(repeats: int, measure) -> tuple[float, str]:
    """`measure(repeat)` `repeats` times: the median ratio and the details of that run."""
    results = [measure(repeat) for repeat in range(repeats)]
    ratios = [result[0] for result in results]
    middle = results[ratios.index(statistics.median_low(ratios))]
    return statistics.median(ratios), middle[1]


def cpu_rows(repeats: int) -> list[tuple]:
    data = digits_tensors()
    rows = [("1. full fine-tuning, 3 epochs: time per epoch", "<= 1.05",
             *median_of(repeats, lambda repeat: full_finetune_ratio(data, repeat, CPU_WORK)))]
    bare_probes: list[float] = []
    rows.append(("2. linear probe, 10 epochs: total time", "<= 0.25",
                 *median_of(repeats, lambda _: linear_probe_ratio(bare_probes, CPU_WORK))))
    bare_probe = statistics.median(bare_probes)
    rows.append(("3. sweep of 8 linear probes / 8 bare probes", "<= 0.2",
                 *median_of(repeats, lambda _: sweep_ratio(bare_probe))))
    rows.append(("4. peak RSS, linear probe / full fine-tuning", "<= 0.7",
                 *median_of(repeats, lambda _: memory_ratio())))
    rows.append(("5. `train.py --help` / `import torch` wall time", "<= 1.0",
                 *median_of(repeats, lambda _: help_ratio())))
    rows.append(("6. what plots=auto adds: item 2's probe with plots / without", "(cost)",
                 *median_of(repeats, plots_cost)))
    return rows + folder_rows(repeats)


def gpu_rows(repeats: int) -> list[tuple]:
    import jpeg_data
    import torch

    data = digits_tensors(GPU_WORK.image_size)
    name = torch.cuda.get_device_name()
    return [(f"1. full fine-tuning, 3 epochs: time per epoch ({name}, resnet50, 224, bf16)",
             "<= 1.05", *median_of(repeats, lambda r: full_finetune_ratio(data, r, GPU_WORK))),
            (f"2. linear probe, 10 epochs: total time ({name}, resnet50, 224, bf16)", "<= 0.25",
             *median_of(repeats, lambda _: linear_probe_ratio([], GPU_WORK))),
            (f"9. image folder, full fine-tuning ({name}, resnet50, 224, bf16): the ceiling's "
             "time per epoch / the tool's, epochs 2-3", ">= 0.9",
             *median_of(repeats, lambda _: gpu_folder_ratio(jpeg_data.jpeg_folder())))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="items 1, 2 and 9 on a CUDA GPU")
    parser.add_argument("--folder", action="store_true", help="items 7-8 only (a JPEG folder)")
    parser.add_argument("--hf", action="store_true",
                        help="items 10, 10b and 10c only (data=hf, webdataset, streaming vs the folder)")
    parser.add_argument("--bare-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_probe:
        return bare_probe_process()
    import logging

    import torch
    logging.disable(logging.INFO)  # the tool's per-epoch log lines would drown the table
    if args.gpu:
        rows = gpu_rows(args.repeats)
    elif args.hf:
        rows = hf_rows(args.repeats)
    else:
        rows = folder_rows(args.repeats) if args.folder else cpu_rows(args.repeats)
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
