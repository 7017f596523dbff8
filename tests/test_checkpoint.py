import os
import pickle

import pytest
import torch

from finetune.checkpoint import UMASK, BackgroundSaver, link_atomic, load_safe, save_atomic
from finetune.errors import ConfigError


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
