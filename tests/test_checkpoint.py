import os
import pickle

import pytest
import torch

from finetune.errors import ConfigError
from finetune.state.files import UMASK, link_atomic, load_safe, save_atomic
from finetune.state.saver import BackgroundSaver, RunCheckpoints, read_joined


def test_save_then_load_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 2, "names": ["a"]}
    save_atomic(state, str(tmp_path / "ckpt" / "last.pt"))
    loaded = load_safe(str(tmp_path / "ckpt" / "last.pt"))
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 2


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    save_atomic({"epoch": 1}, path)

    def crash(obj, stream):
        stream.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_safe(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"model": RunsCode(str(marker))}, handle, protocol=2)
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_safe(str(path), key="backbone.checkpoint")
    assert not marker.exists()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint=.*missing.pt' does not exist"):
        load_safe(str(tmp_path / "missing.pt"))


def test_linked_best_checkpoint_keeps_its_content_when_last_moves_on(tmp_path):
    last, best = str(tmp_path / "last.pt"), str(tmp_path / "best.pt")
    save_atomic({"epoch": 1}, last)
    link_atomic(last, best)
    save_atomic({"epoch": 2}, last)
    assert load_safe(best) == {"epoch": 1} and load_safe(last) == {"epoch": 2}
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]


def test_background_saver_writes_the_state_as_it_was_when_asked(tmp_path):
    weights = torch.zeros(1000)
    saver = BackgroundSaver()
    saver.save({"w": weights, "epoch": 1}, str(tmp_path / "last.pt"), link_to=str(tmp_path / "best.pt"))
    weights += 1  # training goes on while the file is written
    saver.save({"w": weights, "epoch": 2}, str(tmp_path / "last.pt"))
    saver.wait()
    assert torch.equal(load_safe(str(tmp_path / "best.pt"))["w"], torch.zeros(1000))
    assert torch.equal(load_safe(str(tmp_path / "last.pt"))["w"], torch.ones(1000))


def test_background_saver_reports_a_failed_write(tmp_path):
    saver = BackgroundSaver()
    (tmp_path / "file").write_text("not a folder")
    saver.save({"epoch": 1}, str(tmp_path / "file" / "last.pt"))
    with pytest.raises(OSError):
        saver.wait()


def test_checkpoint_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        save_atomic({"epoch": 1}, str(tmp_path / "last.pt"))
    finally:
        os.umask(previous)
    assert oct((tmp_path / "last.pt").stat().st_mode & 0o777) == oct(0o666 & ~UMASK)


def test_frozen_part_is_joined_back_and_a_phase_moves_tensors_into_last(tmp_path):
    checkpoints = RunCheckpoints(str(tmp_path))
    model = {"frozen": torch.zeros(3), "later": torch.ones(2), "head": torch.full((2,), 5.0)}
    checkpoints.write_frozen(model, unchanging={"frozen", "later"})
    checkpoints.save({"model": model, "epoch": 1}, unchanging={"frozen", "later"}, best=True)
    checkpoints.wait()
    assert set(load_safe(str(tmp_path / "last.pt"))["model"]) == {"head"}
    model = {**model, "later": torch.full((2,), 7.0)}  # unfrozen by a phase, then trained
    checkpoints.save({"model": model, "epoch": 2}, unchanging={"frozen"}, best=False)
    checkpoints.wait()
    assert set(load_safe(str(tmp_path / "last.pt"))["model"]) == {"head", "later"}
    last, best = read_joined(str(tmp_path / "last.pt")), read_joined(str(tmp_path / "best.pt"))
    assert all(torch.equal(last["model"][name], model[name]) for name in model)
    assert torch.equal(best["model"]["later"], torch.ones(2)) and best["epoch"] == 1


def test_a_checkpoint_without_its_own_frozen_file_is_refused(tmp_path):
    for run in ("a", "b"):
        checkpoints = RunCheckpoints(str(tmp_path / run))
        checkpoints.write_frozen({"w": torch.zeros(1)}, unchanging={"w"})
        checkpoints.save({"model": {"w": torch.zeros(1)}}, unchanging={"w"}, best=False)
        checkpoints.wait()
    os.replace(tmp_path / "b" / "frozen.pt", tmp_path / "a" / "frozen.pt")
    with pytest.raises(ConfigError, match="belongs to another run"):
        read_joined(str(tmp_path / "a" / "last.pt"))
    with pytest.raises(ConfigError, match="keep the checkpoints/ folder's files together"):
        read_joined(str(tmp_path / "b" / "last.pt"))
