"""What a finished run keeps in checkpoints/ (trainer.checkpoints), and `finetune cache`."""

import pytest
import torch

import finetune
from finetune.cache_command import main as cache_main
from finetune.config.validation import validate
from finetune.errors import ConfigError
from finetune.run import checkpoint_policy, run
from finetune.state.resume import find_run_dir

from conftest import FAST, make_config

pytestmark = pytest.mark.slow  # a run per policy


def kept(run_dir) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_each_policy_keeps_what_it_says_and_best_alone_predicts_the_same(tmp_path, caplog):
    caplog.set_level("INFO")
    runs, closing = {}, {}
    for policy in ("all", "last", "best", "none"):
        runs[policy] = tmp_path / policy
        caplog.clear()
        run(make_config(*FAST, "trainer.ema_decay=0.9", f"trainer.checkpoints={policy}"),
            str(runs[policy]))
        closing[policy] = caplog.records[-1].getMessage()
    assert kept(runs["all"]) == ["best.pt", "frozen.pt", "last.pt"]
    assert kept(runs["last"]) == ["frozen.pt", "last.pt"] and kept(runs["best"]) == ["best.pt"]
    assert kept(runs["none"]) == []
    assert "checkpoint=all/checkpoints/best.pt" in closing["all"] and "train more" in closing["all"]
    assert "checkpoint=last/checkpoints/last.pt" in closing["last"]
    assert "evaluate:" in closing["best"] and "train more" not in closing["best"]
    assert "run directory: none" in closing["none"] and "evaluate:" not in closing["none"]
    full, slim = (finetune.load_model(str(runs[policy] / "checkpoints" / "best.pt"))
                  for policy in ("all", "best"))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # the weights it predicts with (the EMA here), in a file of its own
        assert torch.equal(full.net(images), slim.net(images))
    assert (runs["best"] / "checkpoints" / "best.pt").stat().st_nlink == 1
    with pytest.raises(ConfigError, match="kept its best weights alone"):
        find_run_dir(str(runs["best"]))
    assert find_run_dir(str(runs["last"])) == str(runs["last"])


def test_the_policy_is_checked_and_auto_keeps_all_outside_a_sweep():
    assert checkpoint_policy(make_config(*FAST)) == "all"
    assert checkpoint_policy(make_config(*FAST, "trainer.checkpoints=best")) == "best"
    with pytest.raises(ConfigError, match="trainer.checkpoints='some' is not valid"):
        validate(make_config(*FAST, "trainer.checkpoints=some"))
    with pytest.raises(ConfigError, match="calibration is stored in best.pt"):
        validate(make_config(*FAST, "trainer.checkpoints=none", "calibrate=true"))


def test_the_cache_command_lists_and_clears_only_the_caches_files(tmp_path, capsys):
    cache = tmp_path / "cache"
    run(make_config(*FAST, "experiment=linear_probe", "trainer.max_epochs=1",
                    f"trainer.cache_dir={cache}"), str(tmp_path / "probe"))
    (cache / "notes.txt").write_text("mine")
    (cache / "checks").mkdir()
    (cache / "checks" / f"{'a' * 64}.json").write_text("{}")  # a start-up check's verdict
    (cache / "checks" / "mine.json").write_text("{}")
    assert cache_main(["--dir", str(cache)]) == 0
    listed = capsys.readouterr().out
    assert "feature cache: 1 files" in listed and "image cache: 0 files" in listed
    assert "image checks: 1 files" in listed
    assert cache_main(["clear", "--dir", str(cache)]) == 0
    cleared = capsys.readouterr().out
    assert "feature cache: removed 1 files" in cleared and "image checks: removed 1 files" in cleared
    assert sorted(path.name for path in cache.rglob("*") if path.is_file()) == ["mine.json", "notes.txt"]
