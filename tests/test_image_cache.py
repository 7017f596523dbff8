"""data.cache_images: image files decoded and resized once, read back from disk after that,
giving the same batches; a changed file, a truncated entry or a full folder handled."""

import logging
import random

import pytest
import torch
from PIL import Image

from finetune.errors import ConfigError
from finetune.run import build

from conftest import FAST, make_config, run_forked

CLASSES = ("cats", "dogs")


@pytest.fixture
def jpegs(tmp_path):
    """root/{train,val}/<class>/*.jpg: 6 and 2 per class, of different sizes and shapes."""
    root, rng = tmp_path / "jpegs", random.Random(0)
    for split, count in (("train", 6), ("val", 2)):
        for index, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for number in range(count):
                size = (rng.randrange(30, 60), rng.randrange(30, 60))
                pixels = bytes(min(255, 100 * index + rng.randrange(120))
                               for _ in range(size[0] * size[1] * 3))
                Image.frombytes("RGB", size, pixels).save(root / split / name / f"{number}.jpg", quality=90)
    return root


def setup(root, cache_dir, *overrides):
    return build(make_config(*FAST[:2], "data=imagefolder", f"data.root={root}",
                             "data.image_size=32", "data.num_workers=0", "data.batch_size=4",
                             "trainer.device=cpu", f"trainer.cache_dir={cache_dir}", *overrides))


def batches(built, split="train"):
    loader = built.data.train_loader if split == "train" else built.data.val_loader
    return [(images.clone(), labels.clone()) for images, labels in loader]


def entries(cache_dir):
    return sorted(path.name for path in (cache_dir / "images").glob("*.u8"))


@pytest.mark.parametrize("augment", ["none", "trivialaugment"])  # whole batches; per image
def test_the_cache_gives_the_batches_the_files_give(jpegs, tmp_path, augment):
    torch.manual_seed(0)
    without = batches(setup(jpegs, tmp_path / "cache", f"data.augment={augment}",
                            "data.cache_images=false"))
    torch.manual_seed(0)
    cached = setup(jpegs, tmp_path / "cache", f"data.augment={augment}", "data.cache_images=true")
    assert cached.data.image_cache.startswith("on: 16 images") and "built now" in cached.data.image_cache
    # without random steps after the cache, batches are read whole, in this process
    assert cached.data.train_loader.dataset.whole_batches == (augment == "none")
    assert cached.data.val_loader.dataset.whole_batches and cached.data.val_loader.num_workers == 0
    with_cache = batches(cached)
    assert len(without) == len(with_cache) == 3
    for (images, labels), (cached_images, cached_labels) in zip(without, with_cache, strict=True):
        assert torch.equal(images, cached_images) and torch.equal(labels, cached_labels)


def test_a_second_run_reads_the_entry_and_a_changed_file_rebuilds_it(jpegs, tmp_path, monkeypatch):
    """... and opens no image at start-up: the check's verdict and the entry's size are kept
    (light augmentation: the training entry's size would come from every image's header)."""
    from finetune.data import folders

    first = setup(jpegs, tmp_path / "cache", "data.augment=light")
    assert "built now" in first.data.image_cache
    before, opened, open_image = entries(tmp_path / "cache"), [], folders.open_image
    monkeypatch.setattr(folders, "open_image", lambda path: opened.append(path) or open_image(path))
    second = setup(jpegs, tmp_path / "cache", "data.augment=light")
    assert "read from the cache" in second.data.image_cache and entries(tmp_path / "cache") == before
    assert opened == []
    Image.new("RGB", (40, 40), (255, 255, 255)).save(jpegs / "val" / "cats" / "0.jpg")
    changed = setup(jpegs, tmp_path / "cache")
    assert "built now" in changed.data.image_cache  # the val entry: the train one still hits
    images, _ = batches(changed, "val")[0]
    assert torch.equal(images[0], batches(setup(jpegs, tmp_path / "other", "data.cache_images=false"),
                                          "val")[0][0][0])  # the new picture, not the old


@pytest.mark.parametrize("damage", ["truncated", "offsets"])
def test_a_truncated_or_crafted_entry_is_rebuilt(jpegs, tmp_path, caplog, damage):
    setup(jpegs, tmp_path / "cache")
    for entry in (tmp_path / "cache" / "images").glob("*.u8"):
        if damage == "truncated":
            entry.write_bytes(entry.read_bytes()[:100])
            continue
        index_file = entry.with_name(entry.name.replace(".u8", ".idx.pt"))
        saved = torch.load(index_file, weights_only=True)
        saved["index"][:, 0] = saved["index"][:, 0].flip(0)  # the same size, images swapped
        torch.save(saved, index_file)
    with caplog.at_level(logging.WARNING):
        again = setup(jpegs, tmp_path / "cache")
    assert "incomplete or stale; rebuilding it" in caplog.text and "built now" in again.data.image_cache
    expected = batches(setup(jpegs, tmp_path / "other", "data.cache_images=false"), "val")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches(again, "val"), expected, strict=True))


def build_in_child(root, cache_dir) -> None:
    setup(root, cache_dir)


def test_two_runs_building_the_same_entry_at_once_both_succeed(jpegs, tmp_path):
    assert run_forked(build_in_child, [(jpegs, tmp_path / "cache")] * 2) == [0, 0]
    assert "read from the cache" in setup(jpegs, tmp_path / "cache").data.image_cache


def test_the_folder_stays_under_its_bound(jpegs, tmp_path):
    with pytest.raises(ConfigError, match=r"data.cache_images=true: 16 images would take .* GiB, "
                                          r"over data.cache_max_gb=1e-06"):
        setup(jpegs, tmp_path / "cache", "data.cache_images=true", "data.cache_max_gb=1e-6")
    off = setup(jpegs, tmp_path / "cache", "data.cache_max_gb=1e-6")
    assert off.data.image_cache.startswith("off: 16 images would take")
    entry = 16 * 3 * 32 * 32  # each image resized and cropped to 32x32, uint8
    setup(jpegs, tmp_path / "cache")  # a train and a val entry
    assert len(entries(tmp_path / "cache")) == 2
    # 64x64 images (4 x the bytes) under a bound of 4.5 x the first run's: its older entries
    # go as far as needed (a part of them), the new ones stay
    bound = [f"data.cache_max_gb={4.5 * entry / 2**30}", "data.image_size=64"]
    setup(jpegs, tmp_path / "cache", *bound)
    assert len(entries(tmp_path / "cache")) == 3
    held = sum(path.stat().st_size for path in (tmp_path / "cache" / "images").iterdir())
    assert 4 * entry < held <= 4.5 * entry
    assert "read from the cache" in setup(jpegs, tmp_path / "cache", *bound).data.image_cache


def test_a_file_that_became_unreadable_is_still_named(jpegs, tmp_path, caplog):
    setup(jpegs, tmp_path / "cache")
    (jpegs / "train" / "dogs" / "3.jpg").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        again = setup(jpegs, tmp_path / "cache")
    assert "leaving out 1 unreadable image file(s)" in caplog.text and "dogs/3.jpg" in caplog.text
    assert len(again.data.train_loader.dataset) == 11


def rewrite_images(index_file, data_file, change) -> None:
    """An entry with `change` applied to each image, its offsets laid out again: a whole
    entry, as build_entry writes one, of other images."""
    saved = torch.load(index_file, weights_only=True)
    data = torch.frombuffer(bytearray(data_file.read_bytes()), dtype=torch.uint8)
    images, offset = [], 0
    for row, (start, *shape) in enumerate(saved["index"].tolist()):
        image = change(data[start:start + shape[0] * shape[1] * shape[2]].view(shape)).contiguous()
        images.append(image.flatten())
        saved["index"][row] = torch.tensor([offset, *image.shape])
        offset += image.numel()
    data_file.write_bytes(torch.cat(images).numpy().tobytes())
    torch.save(saved, index_file)


@pytest.mark.slow
@pytest.mark.parametrize("augment, wanted", [("none", "not (3, 32, 32)"),  # a center crop's size
                                             ("trivialaugment", "not 3 channels, the shorter side 37")])
@pytest.mark.parametrize("damage, found", [("one channel", "((1, 3"), ("smaller", "((3, 16, 16), ")])
def test_an_entry_of_other_image_shapes_is_rebuilt(jpegs, tmp_path, caplog, augment, wanted, damage, found):
    setup(jpegs, tmp_path / "cache", f"data.augment={augment}")
    change = (lambda image: image[:1]) if damage == "one channel" else (lambda image: image[:, :16, :16])
    for entry in (tmp_path / "cache" / "images").glob("*.u8"):
        rewrite_images(entry.with_name(entry.name.replace(".u8", ".idx.pt")), entry, change)
    with caplog.at_level(logging.WARNING):
        again = setup(jpegs, tmp_path / "cache", f"data.augment={augment}")
    assert "incomplete or stale" not in caplog.text  # the offsets add up: the shapes are wrong
    for entry in (tmp_path / "cache" / "images").glob("*.u8"):  # train and val
        assert f"image cache {entry} holds images of other shapes than the transform gives {found}" in (
            caplog.text)
    assert f"{wanted}); rebuilding it" in caplog.text and "built now" in again.data.image_cache
    expected = batches(setup(jpegs, tmp_path / "other", "data.cache_images=false"), "val")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches(again, "val"), expected, strict=True))
