"""Under torchrun: two CPU processes (gloo) train one run in one directory.

The two ranks are forked from the test process with torchrun's environment (WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and run train.py's own main(): the code path of
`torchrun --nproc_per_node=2 train.py ...` without starting three new interpreters (each
import of torch costs 3 s here, 15 s on a slow machine). The launcher itself is PyTorch's.
"""

import csv
import json
import os
import socket
import sys

import numpy as np
import pytest
import timm  # noqa: F401  (imported once, before the ranks are forked)

from finetune.run import run

from conftest import FAST, make_config, png_bytes, run_cli, run_forked

pytestmark = pytest.mark.slow

# a timm backbone: DDP wraps any Net alike, and this checks a timm model's stage aliases,
# phases and checkpoints across ranks too (imported here, before the ranks are forked)
DATA = ["backbone.weights=null", "backbone.name=timm/convnext_atto", "data=fake",
        "data.train_size=64", "data.val_size=30", "trainer.device=cpu"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_process(rank: int, port: int, folder, arguments: list[str]) -> None:
    """One rank, as torchrun starts it: its console output to folder/rank<N>.log."""
    os.chdir(folder)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = run_cli(*arguments, plots=True)
    (folder / f"rank{rank}.log").write_text(result.stdout + result.stderr)
    sys.exit(result.returncode)


def two_ranks(tmp_path, arguments: list[str], process=rank_process) -> list[str]:
    """A forked two-rank job of train.py's main(); each rank's console output, once both
    ended well."""
    port = free_port()
    codes = run_forked(process, [(rank, port, tmp_path, arguments) for rank in range(2)])
    logs = [(tmp_path / f"rank{rank}.log").read_text() for rank in range(2)]
    assert codes == [0, 0], "".join(logs)[-3000:]
    return logs


def test_two_ranks_share_one_run_and_agree(tmp_path):
    arguments = [*DATA, "trainer.max_epochs=2", "freeze=[@backbone]",  # frozen, then a phase:
                 "unfreeze=[{epoch: 2, patterns: [@stage-1]}]",  # re-wrapped
                 "logger=tensorboard"]
    output = "".join(two_ranks(tmp_path, arguments))
    runs = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    assert len(runs) == 1  # one directory, whatever each rank's clock said
    run_dir = runs[0]
    assert sorted(path.name for path in run_dir.iterdir()) == [
        ".hydra", "checkpoints", "confusion.png", "curves.png", "metrics.csv", "params.tsv",
        "params_epoch2.tsv", "summary.json", "tensorboard", "train.log"]
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # rank 0's event file only
    assert (run_dir / "train.log").read_text().count("epoch 2/2") == 1  # rank 0's log only
    assert "the final weights are identical on all 2 ranks" in output
    assert "feature cache: off: unfreeze phases" in output
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    # the ranks' summed validation equals one process evaluating the saved checkpoint
    evaluated = tmp_path / "evaluated"
    accuracy = run(make_config(*DATA, "mode=evaluate",
                               f"checkpoint={run_dir}/checkpoints/last.pt"), str(evaluated))
    assert accuracy == float(rows[-1]["val_acc"])
    loss = json.loads((evaluated / "evaluation.json").read_text())["loss"]
    assert loss == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-5)
    # goes on in one process: what that changes is said
    resumed = run_cli(f"resume={run_dir}", "trainer.max_epochs=3", plots=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ("the run trained with 2 processes and goes on with 1: the global batch is now "
            "32 x 1 = 32 images (it was 64; optimizer.lr is not rescaled)") in resumed.stdout


def test_auto_measures_alike_on_every_rank(tmp_path):
    """freeze=auto's scales are the mean over the ranks' measurements (an all-reduce on
    gloo, the one auto:select's choice goes through too), so every rank scales alike and
    the ranks end with the same weights; rank 0 writes rgn.csv and rgn.png."""
    arguments = [*DATA, "trainer.max_epochs=1", "freeze=auto", "hydra.run.dir=run"]
    logs = two_ranks(tmp_path, arguments)
    assert "auto: epoch 1 learning-rate scales" in logs[0]  # rank 0 reports; had a rank
    assert "the final weights are identical on all 2 ranks" in logs[0]  # scaled otherwise,
    assert (tmp_path / "run" / "rgn.png").is_file()  # its weights would differ
    rows = list(csv.DictReader(open(tmp_path / "run" / "rgn.csv")))
    assert rows and {row["epoch"] for row in rows} == {"1"}


def test_webdataset_shards_of_uneven_size_end_on_both_ranks(tmp_path):
    """Three shards (5, 5 and 3 samples) for two ranks: each rank trains on as many batches
    (DistributedSampler's equal share of the indexed samples), so the job ends, and the
    ranks agree."""
    webdataset = pytest.importorskip("webdataset", reason="needs the webdataset extra (in dev)")
    (tmp_path / "shards").mkdir()
    for split in ("train", "val"):
        with webdataset.ShardWriter(str(tmp_path / "shards" / f"{split}-%04d.tar"), maxcount=5,
                                    verbose=0) as sink:
            for number in range(13):
                pixels = np.full((8, 8), 20 * (number % 3), np.uint8)
                sink.write({"__key__": f"s{number:03d}", "png": png_bytes(pixels), "cls": number % 3})
    arguments = [*FAST[:2], "data=webdataset", "trainer.device=cpu", "trainer.max_epochs=1",
                 f"data.train_shards='{tmp_path}/shards/train-{{0000..0002}}.tar'",
                 f"data.val_shards='{tmp_path}/shards/val-{{0000..0002}}.tar'",
                 "data.batch_size=4", "data.num_workers=0", "data.image_size=16", "hydra.run.dir=run"]
    logs = two_ranks(tmp_path, arguments)
    assert "13 training and 13 validation images, tar shards" in logs[0]
    assert "each of 2 processes trains on its own 1/2" in logs[0]
    assert "the final weights are identical on all 2 ranks" in logs[0]


def test_streamed_parquet_files_of_uneven_size_end_on_both_ranks(tmp_path):
    """data.streaming=true on three Parquet files (9, 7 and 5 rows) for two ranks of two
    loader workers each: every rank trains on 21 // (2 x 4) = 2 batches an epoch, so the job
    ends, and the ranks agree."""
    datasets = pytest.importorskip("datasets", reason="needs the hf extra (in dev)")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"])})
    for split, sizes in (("train", (9, 7, 5)), ("validation", (7,))):
        for number, size in enumerate(sizes):
            rows = {"image": [{"bytes": png_bytes(np.full((8, 8), 20 * (row % 3), np.uint8)),
                               "path": None} for row in range(size)],
                    "label": [row % 3 for row in range(size)]}
            datasets.Dataset.from_dict(rows, features=features).to_parquet(
                str(tmp_path / "pq" / f"{split}-{number:05d}-of-{len(sizes):05d}.parquet"))
    arguments = [*FAST[:2], "data=hf", f"data.path={tmp_path}/pq", "data.streaming=true",
                 "trainer.device=cpu", "trainer.max_epochs=2", "data.batch_size=4",
                 "data.num_workers=2", "data.image_size=16", "hydra.run.dir=run"]
    logs = two_ranks(tmp_path, arguments)
    assert "21 training and 7 validation rows streamed from 3 Parquet file(s)" in logs[0]
    assert "each of 2 process(es) trains on 2 batches of 4 per epoch" in logs[0]
    assert "the final weights are identical on all 2 ranks" in logs[0]


def probing_rank(rank: int, port: int, folder, arguments: list[str]) -> None:
    """rank_process, noting each time this rank runs the backbone over a split to cache it."""
    from finetune.data import features

    compute = features.compute

    def noted(*args, **kwargs):
        with open(folder / f"computed{rank}", "a") as note:
            note.write("split\n")
        return compute(*args, **kwargs)

    features.compute = noted
    rank_process(rank, port, folder, arguments)


def test_each_nodes_first_rank_caches_the_features_the_others_load(tmp_path):
    """A linear probe under torchrun trains the head on cached backbone outputs: local rank
    0 computes them (train and val) while rank 1 waits, then rank 1 loads them."""
    arguments = [*FAST, "freeze=[@backbone]", "trainer.max_epochs=2"]
    output = "".join(two_ranks(tmp_path, arguments, probing_rank))
    assert "feature cache: on" in output
    assert (tmp_path / "computed0").read_text() == "split\nsplit\n"
    assert not (tmp_path / "computed1").exists()
    assert "the final weights are identical on all 2 ranks" in output
