import json
import os

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from torchvision.transforms import InterpolationMode

from finetune.config.validation import validate
from finetune.data.images import image_decoder, read_image
from finetune.data.loaders import build_data, tensor_loader, worker_count
from finetune.errors import ConfigError
from finetune.model.net import IMAGENET_MEAN, IMAGENET_STD, InputSpec

from conftest import make_config


def spec(size=32):
    return InputSpec(size, round(size / 0.875), IMAGENET_MEAN, IMAGENET_STD,
                     InterpolationMode.BILINEAR)


def test_digits_are_resized_three_channel_tensors_with_a_fixed_split():
    data = build_data(make_config().data, spec(32), seed=0)
    assert data.class_names == [str(i) for i in range(10)]
    train, val = data.train_loader.dataset, data.val_loader.dataset
    assert (len(train), len(val)) == (1437, 360)
    images, labels = next(iter(data.train_loader))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert labels.min() >= 0 and labels.max() <= 9
    other_seed = build_data(make_config().data, spec(32), seed=7)
    assert torch.equal(other_seed.val_loader.dataset.tensors[0], val.tensors[0])


def test_digits_class_subset_is_relabelled():
    data = build_data(make_config("data.classes=[0,1]").data, spec(16), seed=0)
    assert data.class_names == ["0", "1"] and data.num_classes == 2
    labels = data.train_loader.dataset.tensors[1]
    assert set(labels.tolist()) == {0, 1}


@pytest.mark.parametrize("classes", ["[3]", "[1,1]", "[0,12]"])
def test_bad_digit_classes_are_refused(classes):
    with pytest.raises(ConfigError, match="data.classes="):
        build_data(make_config(f"data.classes={classes}").data, spec(), seed=0)


def test_shuffle_order_follows_the_seed():
    first = next(iter(build_data(make_config().data, spec(8), seed=1).train_loader))[1]
    again = next(iter(build_data(make_config().data, spec(8), seed=1).train_loader))[1]
    other = next(iter(build_data(make_config().data, spec(8), seed=2).train_loader))[1]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_fake_data():
    cfg = make_config("data=fake", "data.num_classes=3", "data.train_size=12", "data.val_size=6")
    data = build_data(cfg.data, spec(16), seed=0)
    assert data.num_classes == 3
    assert len(data.train_loader.dataset) == 12 and len(data.val_loader.dataset) == 6
    assert next(iter(data.val_loader))[0].shape == (6, 3, 16, 16)


def make_image_folder(root, classes=("cat", "dog"), per_class=3, splits=("train", "val")):
    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for n in range(per_class):
                Image.new("RGB", (40 + n, 30), (index * 100, n * 40, 0)).save(folder / f"{n}.png")
    return root


def test_image_folder_reads_train_and_val(tmp_path):
    make_image_folder(tmp_path)
    cfg = make_config("data=imagefolder", f"data.root={tmp_path}", "data.num_workers=0",
                      "data.batch_size=4", "data.augment=true")
    data = build_data(cfg.data, spec(24), seed=0)
    assert data.class_names == ["cat", "dog"]
    images, labels = next(iter(data.val_loader))
    assert images.shape == (4, 3, 24, 24)
    assert labels.tolist() == [0, 0, 0, 1]
    assert next(iter(data.train_loader))[0].shape == (4, 3, 24, 24)


def test_missing_data_root_is_named(tmp_path):
    cfg = make_config("data=imagefolder", f"data.root={tmp_path}/photos")
    with pytest.raises(ConfigError, match=f"data.root='{tmp_path}/photos': .*photos does not exist"):
        build_data(cfg.data, spec(), seed=0)


def test_unset_data_root_says_what_to_set():
    with pytest.raises(ConfigError, match="data.root is not set"):
        build_data(make_config("data=imagefolder").data, spec(), seed=0)


def test_train_and_val_classes_must_match(tmp_path):
    make_image_folder(tmp_path, classes=("cat", "dog"), splits=("train",))
    make_image_folder(tmp_path, classes=("cat", "cow"), splits=("val",))
    cfg = make_config("data=imagefolder", f"data.root={tmp_path}")
    with pytest.raises(ConfigError, match="different class folders"):
        build_data(cfg.data, spec(), seed=0)


def test_a_split_that_leaves_a_class_out_is_named():
    with pytest.raises(ConfigError, match="data.val_fraction=0.999"):
        build_data(make_config("data.val_fraction=0.999").data, spec(8), seed=0)


@pytest.mark.parametrize("train_size, batches", [(32, 2), (33, 2), (34, 3), (1, 1)])
def test_a_last_training_batch_of_one_image_is_dropped(train_size, batches):
    cfg = make_config("data=fake", f"data.train_size={train_size}", "data.batch_size=16")
    data = build_data(cfg.data, spec(8), seed=0)
    assert len(data.train_loader) == batches
    assert len(data.val_loader) == 4  # validation keeps every image


@pytest.mark.parametrize("shuffle", [True, False])
def test_in_memory_batches_equal_the_usual_loaders_and_leave_the_global_rng(shuffle):
    dataset = TensorDataset(torch.randn(130, 3), torch.arange(130))
    usual = DataLoader(dataset, batch_size=64, shuffle=shuffle, drop_last=shuffle,
                       generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    order = RandomSampler(dataset, generator=generator) if shuffle else None
    batched = tensor_loader(dataset, 64, order, shuffle, generator)
    global_rng = torch.get_rng_state()
    for _ in range(2):  # the second epoch's order too
        pairs = list(zip(usual, batched, strict=True))
        assert all(torch.equal(a, b) for one, other in pairs for a, b in zip(one, other, strict=True))
    assert torch.equal(torch.get_rng_state(), global_rng)


def test_an_empty_data_root_is_named(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    cfg = make_config("data=imagefolder", f"data.root={tmp_path}")
    with pytest.raises(ConfigError, match=f"data.root='{tmp_path}'.*class folder"):
        build_data(cfg.data, spec(), seed=0)


def break_images(root) -> list:
    broken = [root / "train" / "cat" / "torn.png", root / "val" / "dog" / "empty.jpg"]
    broken[0].write_bytes((root / "train" / "cat" / "0.png").read_bytes()[:40])
    broken[1].write_bytes(b"")
    return broken


def test_unreadable_images_are_skipped_with_one_warning_naming_each(tmp_path, caplog):
    make_image_folder(tmp_path)
    broken = break_images(tmp_path)
    cfg = make_config("data=imagefolder", f"data.root={tmp_path}", "data.num_workers=0",
                      "data.batch_size=64")
    data = build_data(cfg.data, spec(24), seed=0)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 2 and all(str(path) in "".join(warnings) for path in broken)
    images, labels = next(iter(data.train_loader))  # the good images only, whole
    assert images.shape[0] == len(data.train_loader.dataset) == 6  # 2 classes x 3


def test_unreadable_images_fail_the_run_naming_each_when_asked(tmp_path):
    make_image_folder(tmp_path)
    broken = break_images(tmp_path)
    cfg = make_config("data=imagefolder", f"data.root={tmp_path}", "data.bad_images=fail")
    with pytest.raises(ConfigError, match="data.bad_images=fail") as error:
        build_data(cfg.data, spec(), seed=0)
    assert str(broken[0]) in str(error.value)


def test_an_image_that_breaks_after_the_check_is_named_or_skipped(tmp_path, caplog):
    make_image_folder(tmp_path)
    for policy in ("skip", "fail"):
        cfg = make_config("data=imagefolder", f"data.root={tmp_path}", "data.num_workers=0",
                          f"data.bad_images={policy}", "data.batch_size=64")
        data = build_data(cfg.data, spec(24), seed=0)
        path = data.val_loader.dataset.samples[0][0]
        original = open(path, "rb").read()
        open(path, "wb").write(original[:60])  # truncated after start-up
        try:
            if policy == "fail":
                with pytest.raises(RuntimeError, match=f"cannot read image {path}"):
                    next(iter(data.val_loader))
            else:
                assert next(iter(data.val_loader))[0].shape[0] == 5  # 6 images, one broken
                assert path in caplog.text
        finally:
            open(path, "wb").write(original)


def test_the_start_up_check_is_kept_until_an_image_changes(tmp_path, monkeypatch, caplog):
    """Built again on the same images, a data set opens none of them for the check and leaves
    out the same unreadable ones; a changed image checks its split again; a verdict file this
    tool did not write is ignored."""
    from finetune.data import image_check

    root = make_image_folder(tmp_path / "photos")
    break_images(root)
    checked, check = [], image_check.unreadable
    monkeypatch.setattr(image_check, "unreadable",
                        lambda paths, opener: checked.append(len(paths)) or check(paths, opener))
    cfg = make_config("data=imagefolder", f"data.root={root}", "data.num_workers=0",
                      "data.cache_images=false")

    def kept() -> tuple[int, int]:
        data = build_data(cfg.data, spec(24), seed=0, cache_dir=str(tmp_path / "cache"))
        return len(data.train_loader.dataset), len(data.val_loader.dataset)

    assert kept() == (6, 6) and checked == [7, 7]  # each split: 6 images and a broken one
    assert kept() == (6, 6) and checked == [7, 7]
    (root / "train" / "cat" / "0.png").write_bytes(b"broken now")
    assert kept() == (5, 6) and checked == [7, 7, 7]
    for verdict in (tmp_path / "cache" / "checks").glob("*.json"):
        verdict.write_text(json.dumps({"format": 1, "images": 7, "unreadable": {"/etc/passwd": "x"}}))
    assert kept() == (5, 6) and checked == [7, 7, 7, 7, 7]
    assert caplog.text.count("ignoring the start-up check's verdict") == 2
    (root / "val" / "cat" / "gone.png").symlink_to(root / "nowhere.png")  # listed, then missing
    assert kept() == (5, 6) and "gone.png" in caplog.text and checked[-1] == 8


def test_num_workers_auto_leaves_a_core_to_training(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert worker_count("auto") == 8  # at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four processes share the cores
    assert worker_count("auto") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert worker_count("auto") == 1 and worker_count(3) == 3
    assert make_config("data=imagefolder", "data.root=/x").data.num_workers == "auto"
    with pytest.raises(ConfigError, match="data.num_workers='many' is not valid"):
        validate(make_config("data=imagefolder", "data.num_workers=many"))


def test_images_decode_to_the_pixels_pil_gives_and_pil_reads_the_rest(tmp_path, monkeypatch):
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    for name in ("a.jpg", "a.png", "a.webp", "a.bmp"):
        picture.save(tmp_path / name)
    picture.convert("CMYK").save(tmp_path / "cmyk.jpg")
    picture.convert("P").save(tmp_path / "palette.png")
    frames = [picture, Image.fromarray(255 - pixels)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:300])
    assert image_decoder() is not None  # the decode extra, part of dev
    files = sorted(path for path in tmp_path.iterdir() if path.name != "cut.jpg")
    decoded = {path.name: read_image(str(path)) for path in files}
    with pytest.raises(OSError, match="(?i)truncated"):  # named by PIL, as before
        read_image(str(tmp_path / "cut.jpg"))
    monkeypatch.setattr("finetune.data.images.image_decoder", lambda: None)  # PIL alone
    for path in files:
        with Image.open(path) as image:
            expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        assert decoded[path.name].shape == expected.shape, path.name
        assert torch.equal(decoded[path.name], expected), path.name
        assert torch.equal(read_image(str(path)), expected)
