import csv
import functools

import pytest
import torch
from PIL import Image

from finetune.data import digest
from finetune.errors import ConfigError
from finetune.run import build, run

from conftest import FAST, make_config, run_forked

PROBE = (*FAST, "freeze=[@backbone]", "trainer.max_epochs=3")


def metrics(run_dir):
    """Each epoch's scores but its time, and but those left out (NaN: multi-label data's)."""
    return [{key: float(value) for key, value in row.items() if key != "seconds" and value != "nan"}
            for row in csv.DictReader(open(run_dir / "metrics.csv"))]


def cache_files(home):
    return sorted((home / ".cache" / "finetune" / "features").glob("*.pt"))


@pytest.mark.parametrize("overrides, reason", [
    ([], "backbone parameters are trainable"),
    (["freeze=[@backbone]", "frozen_modules=train"], "runs in train mode"),
    (["freeze=[@backbone]", "trainer.max_epochs=3", "unfreeze=[{epoch: 2, patterns: [@stage-1]}]"],
     "unfreeze phases"),
])
def test_auto_is_off_with_the_reason_when_caching_would_change_results(overrides, reason):
    setup = build(make_config(*FAST, *overrides))
    assert not setup.cache.enabled and reason in setup.cache.reason
    refused = f"trainer.cache_features=true would change the results: .*{reason}"
    with pytest.raises(ConfigError, match=refused):
        build(make_config(*FAST, *overrides, "trainer.cache_features=true"))


def test_random_augmentation_turns_the_cache_off(tmp_path):
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (20, 20)).save(tmp_path / split / label / "0.png")
    base = ("backbone.weights=null", "data=imagefolder", f"data.root={tmp_path}", "data.image_size=16",
            "data.num_workers=0", "freeze=[@backbone]")
    assert build(make_config(*base)).cache.enabled
    setup = build(make_config(*base, "data.augment=true"))
    assert not setup.cache.enabled and "randomly augmented" in setup.cache.reason


def test_auto_is_on_for_a_frozen_backbone_and_false_turns_it_off():
    assert build(make_config(*PROBE)).cache.enabled
    setup = build(make_config(*PROBE, "trainer.cache_features=false"))
    assert not setup.cache.enabled and "trainer.cache_features=false" in setup.cache.reason


@pytest.mark.slow
def test_results_with_the_cache_equal_those_without(tmp_path):
    run(make_config(*PROBE, "head=mlp", "trainer.cache_features=false"), str(tmp_path / "off"))
    run(make_config(*PROBE, "head=mlp", "trainer.cache_features=true"), str(tmp_path / "on"))
    off, on = metrics(tmp_path / "off"), metrics(tmp_path / "on")
    assert len(off) == len(on) == 3
    for row_off, row_on in zip(off, on, strict=True):
        for key in row_off:
            assert row_on[key] == pytest.approx(row_off[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_a_second_run_and_other_heads_reuse_the_features(tmp_path, caplog, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    caplog.set_level("INFO")
    run(make_config(*PROBE), str(tmp_path / "first"))
    assert "feature cache: computed" in caplog.text and len(cache_files(home)) == 1
    (entry,) = cache_files(home)  # said once at the end: where, how big, how to clear it
    size = f"{entry.stat().st_size / 2**20:.1f} MiB"
    assert f"feature cache: {entry} ({size}); {entry.parent} holds {size} in all" in caplog.text
    assert f"(rm -r {entry.parent} clears it)" in caplog.text
    caplog.clear()
    run(make_config(*PROBE, "head=mlp", "optimizer=adamw"), str(tmp_path / "second"))
    assert "feature cache: loaded" in caplog.text and "feature cache: computed" not in caplog.text
    assert "clears it" not in caplog.text  # it wrote nothing there
    caplog.clear()
    run(make_config(*PROBE, "seed=1"), str(tmp_path / "other_weights"))  # another random init
    assert "feature cache: computed" in caplog.text and len(cache_files(home)) == 2


@pytest.mark.parametrize("damage", ["truncate", "other_key"])
@pytest.mark.slow
def test_a_corrupt_or_stale_entry_is_rebuilt_never_used(tmp_path, caplog, monkeypatch, damage):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    run(make_config(*PROBE), str(tmp_path / "first"))
    (entry,) = cache_files(home)
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:1000])
    else:
        content = torch.load(entry, weights_only=True)
        content["key"] = "0" * 32
        content["train"] = torch.zeros_like(content["train"])
        torch.save(content, entry)
    caplog.set_level("INFO")
    run(make_config(*PROBE), str(tmp_path / "second"))
    assert "rebuilding it" in caplog.text and "feature cache: computed" in caplog.text
    assert metrics(tmp_path / "second") == metrics(tmp_path / "first")


def test_precision_is_part_of_the_key(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    run(make_config(*PROBE, "trainer.max_epochs=1"), str(tmp_path / "fp32"))
    run(make_config(*PROBE, "trainer.max_epochs=1", "trainer.precision=bf16"), str(tmp_path / "bf16"))
    assert len(cache_files(home)) == 2


@pytest.mark.parametrize("overrides", [["trainer.precision=bf16"], ["trainer.precision=16-mixed"],
                                       ["trainer.channels_last=true"]])
@pytest.mark.slow
def test_precision_and_memory_format_options_train(tmp_path, overrides):
    run(make_config(*FAST, *overrides, "data.train_size=16", "data.val_size=8", "data.batch_size=8"),
        str(tmp_path))
    (row,) = metrics(tmp_path)
    assert all(torch.isfinite(torch.tensor(value)) for value in row.values())


def train_in_child(overrides, run_dir):
    run(make_config(*overrides), run_dir)


@pytest.mark.slow
def test_two_jobs_writing_the_same_entry_at_once_both_succeed(tmp_path):
    """Two training processes (forked: no second import of torch) fill one cache entry."""
    overrides = [*PROBE, f"trainer.cache_dir={tmp_path}/cache"]
    runs = [(overrides, str(tmp_path / f"run{i}")) for i in range(2)]
    assert run_forked(train_in_child, runs) == [0, 0]
    assert metrics(tmp_path / "run0") == metrics(tmp_path / "run1")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert not list((tmp_path / "cache").glob(".tmp-*"))


@pytest.mark.slow
def test_compile_trains_the_same_as_eager(tmp_path, monkeypatch):
    """The tool's part of trainer.compile (wrapping, rewrapping, checkpoints without
    torch.compile's prefixes) through TorchDynamo and AOTAutograd. The aot_eager backend
    stands in for inductor, whose numerics are torch's own and whose first C++ build takes
    ~18 s here (90 s on a slow machine)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    run(make_config(*PROBE, "trainer.max_epochs=2"), str(tmp_path / "eager"))
    run(make_config(*PROBE, "trainer.max_epochs=2", "trainer.compile=true"), str(tmp_path / "compiled"))
    for eager, compiled in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled"), strict=True):
        assert compiled["val_acc"] == pytest.approx(eager["val_acc"], abs=1e-6)
        assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)


def test_tensor_digest_is_the_same_on_any_number_of_cores_and_sees_every_byte(monkeypatch):
    monkeypatch.setattr(digest, "CHUNK_BYTES", 1000)  # 4000-byte tensors: four chunks each
    tensors = [torch.randn(1000), torch.arange(1000, dtype=torch.int32)]
    monkeypatch.setattr(digest.os, "cpu_count", lambda: 1)
    one_core = digest.tensors_digest(tensors)
    monkeypatch.setattr(digest.os, "cpu_count", lambda: 8)
    assert digest.tensors_digest(tensors) == one_core
    changed = tensors[0].clone()
    changed[-1] += 1
    assert digest.tensors_digest([changed, tensors[1]]) != one_core
    assert digest.tensors_digest([tensors[0].view(10, 100), tensors[1]]) != one_core  # shape


@pytest.mark.slow
def test_an_entry_of_another_width_dtype_or_labels_is_rebuilt_never_used(tmp_path, caplog, monkeypatch):
    """Tensors under the right key that are not what the backbone and the data give: each
    entry is rebuilt with a warning naming the problem, and the run trains as the first."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    overrides = (*PROBE, "trainer.max_epochs=1")
    run(make_config(*overrides), str(tmp_path / "first"))
    (entry,) = cache_files(home)
    width = torch.load(entry, weights_only=True)["train"].shape[1]
    damages = {  # both splits alike (the other split cannot tell), the dtype, labels
        "width": (lambda saved: {name: saved[name][:, :100] for name in ("train", "val")},
                  f"its train features are torch.float32 (64, 100), not torch.float32 (64, {width})"),
        "dtype": (lambda saved: {"val": saved["val"].double()}, "its val features are torch.float64"),
        "range": (lambda saved: {"train_labels": saved["train_labels"] + 5},  # 5..14 of 10 classes
                  "its train labels (torch.int64 (64,)) are not the data's"),
        "multi-label": (lambda saved: {"val_labels": torch.nn.functional.one_hot(saved["val_labels"], 10)
                                       .float()},
                        "its val labels (torch.float32 (32, 10)) are not the data's (torch.int64 (32,))"),
    }
    for name, (damage, problem) in damages.items():
        saved = torch.load(entry, weights_only=True)
        torch.save({**saved, **damage(saved)}, entry)
        caplog.clear()
        with caplog.at_level("INFO"):
            run(make_config(*overrides), str(tmp_path / name))
        assert f"feature cache {entry} does not match this run ({problem}" in caplog.text, name
        assert "feature cache: computed" in caplog.text
        assert metrics(tmp_path / name) == metrics(tmp_path / "first")
