"""data=webdataset: shards written by WebDataset's own writer train exactly as the same
images in class folders do; shards are split evenly across processes; what a shard holds
beyond its images and labels is never read."""

import csv
import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits
from torchvision.transforms import InterpolationMode

from finetune.data.loaders import build_data
from finetune.errors import ConfigError
from finetune.model.net import InputSpec
from finetune.run import build, run
from finetune.train.distributed import Shard

from conftest import FAST, IMAGE_RUN, make_config, png_bytes

wds = pytest.importorskip("webdataset", reason="data=webdataset's tests write shards with the "
                                               "webdataset extra (in dev)")

PER_CLASS = {"train": 6, "val": 2}
SMALL = (*FAST[:2], *IMAGE_RUN)


class Payload:
    """A pickle that writes a file when it is loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture
def digits(tmp_path):
    """The same digit images twice: folders/{train,val}/<digit>/<n>.png, and WebDataset
    shards (3 per split, the last one short: an odd number) in the folders' order; every
    sample also carries a .pyd member that would write `unpickled` if anything loaded it."""
    bundle, used = load_digits(), 0
    for split, count in PER_CLASS.items():
        (tmp_path / "shards").mkdir(exist_ok=True)
        total = 10 * count
        with wds.ShardWriter(str(tmp_path / "shards" / f"{split}-%04d.tar"),
                             maxcount=(total + 2) // 3, verbose=0) as sink:
            for digit in range(10):
                folder = tmp_path / "folders" / split / str(digit)
                folder.mkdir(parents=True)
                for number, index in enumerate(np.flatnonzero(bundle.target == digit)[used:used + count]):
                    data = png_bytes((bundle.images[index] * 15).astype(np.uint8))
                    (folder / f"{number}.png").write_bytes(data)
                    sink.write({"__key__": f"d{digit}_{number:03d}", "png": data, "cls": digit,
                                "pyd": pickle.dumps(Payload(tmp_path / "unpickled"))})
        used += count
    return tmp_path


def shards(digits, *overrides: str) -> list[str]:
    return ["data=webdataset", f"data.train_shards='{digits}/shards/train-{{0000..0002}}.tar'",
            f"data.val_shards='{digits}/shards/val-{{0000..0002}}.tar'", *overrides]


def metrics(run_dir):
    return [{key: value for key, value in row.items() if key != "seconds"}
            for row in csv.DictReader(open(run_dir / "metrics.csv"))]


@pytest.mark.slow
def test_shards_train_exactly_as_the_same_images_in_folders(digits, tmp_path):
    common = [*SMALL, f"trainer.cache_dir={tmp_path}/cache"]
    run(make_config(*common, "data=imagefolder", f"data.root={digits}/folders"),
        str(tmp_path / "folder"))
    run(make_config(*common, *shards(digits)), str(tmp_path / "shards-run"))
    assert metrics(tmp_path / "folder") == metrics(tmp_path / "shards-run")
    assert not (digits / "unpickled").exists()  # the .pyd members were never read


def test_every_process_gets_as_many_batches_with_an_odd_number_of_shards(digits):
    cfg = make_config(*FAST[:2], *shards(digits), "data.num_workers=0", "data.batch_size=8",
                      "data.cache_images=false")
    spec = InputSpec(16, 16, (0.5,) * 3, (0.5,) * 3, InterpolationMode.BILINEAR)
    ranks = [build_data(cfg.data, spec, 0, shard=Shard(rank, 2)) for rank in range(2)]
    train = [len(data.train_loader) for data in ranks]
    assert train[0] == train[1] == 4  # 60 images: 30 each, padded by DistributedSampler
    assert sum(len(data.val_loader.sampler) for data in ranks) == 20  # each image once
    assert ranks[0].class_names == [str(digit) for digit in range(10)]
    assert not (digits / "unpickled").exists()


@pytest.mark.parametrize("change, message", [
    (["data.train_shards=null"], r"data.train_shards is not set"),
    (["data.train_shards='pipe:cat /etc/passwd'"], r"a URL or a pipe: command is not followed"),
    (["data.val_shards='/nowhere/val-{0..1}.tar'"], r"2 of its 2 shard\(s\) are not files"),
    (["data.class_names=[a,b,c]"], r"label 3, outside the 3 classes"),
    (["data.label_key=txt"], r"lacks an image \(jpg, jpeg, png, webp\) or a label \(txt\)"),
])
def test_bad_settings_are_named(digits, change, message):
    with pytest.raises(ConfigError, match=message):
        build(make_config(*FAST[:2], *shards(digits), "data.num_workers=0", "dry_run=true", *change))


def test_a_file_that_is_not_a_tar_shard_is_named(tmp_path):
    (tmp_path / "train-0.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(ConfigError, match=r"train-0.tar cannot be read as an uncompressed tar"):
        build(make_config(*FAST[:2], "data=webdataset", f"data.train_shards={tmp_path}/train-0.tar",
                          f"data.val_shards={tmp_path}/train-0.tar", "dry_run=true"))
