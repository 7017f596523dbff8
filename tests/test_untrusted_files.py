"""Crafted files against every entry point that reads them (issue 24's audit, as a table).

One real run (squeezenet1_1, one epoch) is trained once; each payload edits a copy of its
checkpoints, and each entry point that reads that file runs on it the way a user runs it:
`python train.py resume=RUN`, `mode=evaluate|predict|export checkpoint=...` (the command
line's own main(), in this process) and `finetune.load_model`. Every one must end with exit
code 2 and one paragraph naming the file, never a traceback; nothing the payload names may
run (a marker file), be read out (a secret's text) or be written (a folder outside).
The decoded-image and feature caches, CSVs, images and exported models have their payloads
beside their readers' tests (test_image_cache, test_features, test_csv_data, test_export,
test_untrusted_inputs_memory).
"""

import json
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

import finetune
from finetune.errors import ConfigError
from finetune.run import run
from finetune.state.files import load_safe
from finetune.state.trust import check_targets
from finetune.sweep import job_rows

from conftest import FAST, HANG_SECONDS, make_config, run_cli

pytestmark = pytest.mark.slow  # a trained run, then a command line per payload and entry

SECRET = "SECRET-LINE-never-quoted"


@dataclass
class Place:
    """Where a payload may reach: the marker a call would create, a folder it would
    write into, a file whose text it would read out."""

    marker: Path
    outside: Path
    secret: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    overrides = [*FAST, "backbone.allow_download=false", "plots=false"]  # as run_cli's
    run(make_config(*overrides), str(run_dir), overrides)
    return run_dir


def popen(marker) -> str:
    return f"{{_target_: subprocess.Popen, args: [touch, {marker}]}}"


def escaped(text: str) -> str:
    """Hydra's override grammar reads `\\{`, `\\}`, `\\:` and `\\,` as the plain characters."""
    return "".join("\\" + char if char in "{}:,[]" else char for char in text)


def without(key: str) -> Callable:
    def edit(record, place):
        record["run"]["config"].pop(key)
    return edit


def config_change(section: str, value) -> Callable:
    def edit(record, place):
        record["run"]["config"][section] = value(place) if callable(value) else value
    return edit


def escaped_override(template: str, drop: str | None = None) -> Callable:
    """A saved override that composes into a live interpolation, the key left out of the
    saved config so that the composed value would have survived the merge."""
    def edit(record, place):
        record["run"]["overrides"] = [escaped(template.format(**vars(place)))]
        if drop:
            record["run"]["config"].pop(drop)
    return edit


def data_from(place) -> dict:
    """A data section that makes mode=evaluate read a file the user never named."""
    return {"name": "csv", "file": str(place.secret), "root": None, "image_column": "image",
            "label_column": "label", "split_column": "split", "val_fraction": 0.2,
            "batch_size": 16, "num_workers": 0, "image_size": 32}


def spec_change(**values) -> Callable:
    def edit(record, place):
        record["run"]["input_spec"].update(values)
    return edit


def progress_change(**values) -> Callable:
    def edit(record, place):
        record["state"]["progress"].update(values)
    return edit


def loader_change(**values) -> Callable:
    def edit(record, place):
        record["run"]["config"]["data"].update(values)
    return edit


def timm_kwargs(record, place):
    record["run"]["config"]["backbone"].update(
        name="timm/resnet10t", kwargs={"checkpoint_path": str(place.secret), "cache_dir": str(place.outside)})


def partial_logger(record, place):
    record["run"]["config"]["logger"] = {"tensorboard": {
        "_target_": "finetune.loggers.TensorBoardLogger", "_partial_": True}}


def deflated(run_dir: Path, place) -> None:
    """The checkpoints re-zipped with deflate, and 64 MiB of zeros added in a few kilobytes:
    a zip bomb (tests/test_untrusted_inputs_memory.py measures that loading one stays small)."""
    for name in ("last.pt", "best.pt"):
        path = run_dir / "checkpoints" / name
        with zipfile.ZipFile(path) as original:
            entries = {info.filename: original.read(info) for info in original.infolist()}
        path.unlink()
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
            for entry, content in entries.items():
                bomb.writestr(entry, content)
            with bomb.open(f"{next(iter(entries)).split('/')[0]}/zeros", "w") as stream:
                for _ in range(64):
                    stream.write(bytes(1 << 20))


deflated.whole_file = True  # an edit of the file, not of what it holds

# name -> (the edit, the entry points that read what it edits, what the message says)
# evaluate, predict, export and calibrate read a checkpoint through load_model: each of them
# with the payloads that reach their own code, load_model itself with all
CONFIG_ENTRIES = ("resume", "load_model")
PAYLOADS = {
    "Popen in an escaped override, its key left out": (
        escaped_override("head.layers=${{oc.create:[" + "{{_target_: subprocess.Popen, "
                         "args: [touch, {marker}]}}" + "]}}", drop="head"),
        ("resume",), "saved override"),
    "environment read through an escaped override": (
        escaped_override("+trainer.cache_dir=${{oc.env:HOME}}"), ("resume",), "saved override"),
    "directory made through an escaped override": (
        escaped_override("+data.root=${{finetune_new_dir:{outside}/made}}"), ("resume",),
        "saved override"),
    "an override for a key the saved config lacks": (
        escaped_override("+logger.x._target_=subprocess.Popen"), ("resume",), "saved override"),
    "Popen head layer": (config_change("head", lambda place: {"layers": [
        {"_target_": "subprocess.Popen", "args": ["touch", str(place.marker)]}]}),
        (*CONFIG_ENTRIES, "evaluate", "predict", "export"),
        r"head.layers\[0\]._target_='subprocess.Popen'"),
    "interpolation in the saved config": (config_change("seed", "${oc.env:HOME}"),
                                          CONFIG_ENTRIES, "interpolation at seed"),
    "timm builder kwargs choose files": (timm_kwargs, CONFIG_ENTRIES,
                                         "backbone.kwargs='cache_dir, checkpoint_path'"),
    "empty data section": (config_change("data", {}), CONFIG_ENTRIES, "data.name=None"),
    "head is a string": (config_change("head", "torch.nn.Linear"), CONFIG_ENTRIES, "HeadConfig"),
    "no optimizer section": (without("optimizer"), CONFIG_ENTRIES, "optimizer"),
    "unknown key": (config_change("hydra", {"run": {"dir": "/"}}), CONFIG_ENTRIES, "hydra"),
    "logger built partially": (partial_logger, CONFIG_ENTRIES, "_partial_"),
    "huge batch": (loader_change(batch_size=10**9), ("resume",), "data.batch_size=1000000000"),
    "a loader process per byte": (loader_change(num_workers=10**6), ("resume",),
                                  "data.num_workers=1000000"),
    "string means": (spec_change(mean="abc"), ("load_model", "evaluate"), "input spec"),
    "zero std": (spec_change(std=[0.0, 1.0, 1.0]), ("load_model", "predict"), "std positive"),
    "a 12 TB input": (spec_change(image_size=10**6, resize_size=10**6), ("load_model", "evaluate"),
                      "image_size must be"),
    "best epoch past the history": (progress_change(best_epoch=7), ("resume",), "progress state"),
    "evaluate reads a file it names": (config_change("data", data_from), ("evaluate",),
                                       "came from the checkpoint's saved config"),
    "zip bomb": (deflated, ("resume", "evaluate", "load_model"), "compressed entries"),
}


def crafted(trained: Path, folder: Path, edit: Callable, place: Place) -> Path:
    run_dir = folder / "crafted"
    shutil.copytree(trained, run_dir)
    if getattr(edit, "whole_file", False):
        edit(run_dir, place)
        return run_dir
    for name in ("last.pt", "best.pt"):
        path = run_dir / "checkpoints" / name
        record = load_safe(str(path))
        edit(record, place)
        path.unlink()  # best.pt is a hard link to last.pt: write each anew
        torch.save(record, path)
    return run_dir


def entry_point(name: str, run_dir: Path, folder: Path):
    """Run one entry point; (exit code, what it printed on stderr)."""
    best = run_dir / "checkpoints" / "best.pt"
    if name == "load_model":
        try:
            finetune.load_model(str(best))
        except ConfigError as error:
            return 2, f"error: {error}"
        return 0, ""
    photos = folder / "photos"
    photos.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(photos / "a.png")
    arguments = {"resume": [f"resume={run_dir}", "trainer.max_epochs=2"],
                 "evaluate": ["mode=evaluate", f"checkpoint={best}"],
                 "predict": ["mode=predict", f"checkpoint={best}", f"predict_input={photos}"],
                 "export": ["mode=export", f"checkpoint={best}", "export.format=torchscript"]}[name]
    if name != "resume":
        arguments.append(f"hydra.run.dir={folder / name}")
    result = run_cli(*arguments)
    return result.returncode, result.stderr


CASES = [(payload, entry) for payload, (_, entries, _) in PAYLOADS.items() for entry in entries]


@pytest.mark.parametrize("payload, entry", CASES)
def test_a_crafted_checkpoint_is_refused_by_every_reader(trained, tmp_path, payload, entry):
    place = Place(tmp_path / "code_ran", tmp_path / "outside", tmp_path / "secret.csv")
    place.outside.mkdir()
    place.secret.write_text(f"{SECRET},label,split\nx.png,a,val\n")
    edit, _, expected = PAYLOADS[payload]
    run_dir = crafted(trained, tmp_path, edit, place)
    code, stderr = entry_point(entry, run_dir, tmp_path)
    assert code == 2, stderr
    assert "Traceback" not in stderr and stderr.startswith("error: ")
    assert str(run_dir) in stderr, stderr  # the file (resuming: its run) is named
    assert len(stderr.strip().splitlines()) == 1, stderr  # one paragraph
    assert re.search(expected, stderr), stderr
    assert not place.marker.exists() and not list(place.outside.iterdir())
    assert SECRET not in stderr and str(Path.home()) not in stderr.replace(str(tmp_path), "")


def test_the_payloads_are_live(trained, tmp_path):
    """The controls: an escaped override composes into a live interpolation (what the old
    resume did with a file's overrides), and a Popen head runs when trusted."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    marker = tmp_path / "code_ran"
    override = escaped("head.layers=${oc.create:[" + popen(marker) + "]}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose(config_name="config", overrides=[override])
    assert str(composed.head.layers[0]._target_) == "subprocess.Popen"  # resolved: live
    run_dir = crafted(trained, tmp_path, PAYLOADS["Popen head layer"][0],
                      Place(marker, tmp_path, tmp_path))
    with pytest.raises(AttributeError):  # Popen is no layer: found after it ran
        finetune.load_model(str(run_dir / "checkpoints" / "best.pt"), trust=["*"])
    for _ in range(HANG_SECONDS):  # Popen does not wait for its `touch`
        if marker.exists():
            break
        time.sleep(1)
    assert marker.exists()


def test_a_run_with_a_shipped_tracker_can_be_resumed():
    for target in ("finetune.loggers.MLflowLogger", "finetune.loggers.WandbLogger",
                   "finetune.loggers.TensorBoardLogger"):
        check_targets({"logger": {"tracker": {"_target_": target}}}, "test")
    with pytest.raises(ConfigError, match="RunLog"):
        check_targets({"logger": {"x": {"_target_": "finetune.loggers.RunLog"}}}, "test")


def test_a_crafted_summary_in_a_sweep_is_a_failed_job(tmp_path):
    for name, summary in (("0", {"status": ["ok"]}), ("1", {"status": "ok", "seconds": "x"}),
                          ("2", {"status": "ok", "best_val_acc": {"a": 1}, "overrides": []})):
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("[]\n")
        (job / "summary.json").write_text(json.dumps(summary))
    rows = job_rows(str(tmp_path), "best_val_acc")
    assert [row["status"] for row in rows] == ["failed"] * 3
    assert all("no readable summary.json" in row["error"] for row in rows)


CSV_PAYLOADS = {
    "a cell over the csv module's limit": (b"image,label\n" + b"x" * 200_000 + b".png,a\n",
                                           "line 2 cannot be parsed"),
    "not UTF-8": ("image,label\na.png,caf\u00e9\n".encode("latin-1"), "line 2 is not UTF-8"),
}


@pytest.mark.parametrize("entry", ["train", "evaluate"])
@pytest.mark.parametrize("payload", CSV_PAYLOADS)
def test_a_crafted_csv_is_refused_by_every_reader(trained, tmp_path, payload, entry):
    content, expected = CSV_PAYLOADS[payload]
    (tmp_path / "labels.csv").write_bytes(content)
    data = ["data=csv", f"data.file={tmp_path / 'labels.csv'}", "data.num_workers=0"]
    if entry == "train":
        result = run_cli(*FAST[:2], "trainer.device=cpu", *data, f"hydra.run.dir={tmp_path / 'run'}")
    else:
        result = run_cli("mode=evaluate", f"checkpoint={trained / 'checkpoints' / 'best.pt'}", *data,
                         f"hydra.run.dir={tmp_path / 'evaluated'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert re.search(f"data.file='{tmp_path / 'labels.csv'}': {expected}", result.stderr)
    assert "xxxxxxxx" not in result.stderr and len(result.stderr.strip().splitlines()) == 1

