"""CSV injection: a class name, group name, path, job folder or error that starts like a
spreadsheet formula (= + - @, a tab) is written as text, with a leading ', in every CSV/TSV
file the tool writes; numbers stay numbers."""

import csv
import json

import pytest
from omegaconf import OmegaConf
from PIL import Image

from finetune.config.schemas import ParamGroupConfig
from finetune.run import run
from finetune.state.files import FORMULA_STARTS, spreadsheet_cell
from finetune.sweep import SweepSummary

from conftest import make_config

pytestmark = pytest.mark.slow  # one shared run, evaluated and predicted on

CLASSES = ['=HYPERLINK("x")', "@SUM(A1)", "+cmd", "\ttab", "-minus"]  # every one a formula start
GROUP = '=HYPERLINK("g")'  # a param group's name, in params.tsv
SMALL = ("backbone.weights=null", "backbone.name=squeezenet1_1", "data=imagefolder",
         "data.image_size=32", "data.batch_size=10", "data.num_workers=0",
         "data.cache_images=false", "trainer.device=cpu")
FILES = ["train/metrics.csv", "train/params.tsv", "train/params_epoch2.tsv",
         "evaluate/per_class.csv", "predict/predictions.csv", "sweep/summary.csv"]


def quoted(text: str) -> str:
    return "'" + text


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One small run (two epochs: an unfreeze phase at the second writes params_epoch2.tsv)
    on images of the classes above, then mode=evaluate and mode=predict on its checkpoint,
    and a sweep's summary of a job with such a folder, override and error; the folder."""
    base = tmp_path_factory.mktemp("cells")
    for split in ("train", "val"):
        for index, name in enumerate(CLASSES):
            folder = base / "photos" / split / name
            folder.mkdir(parents=True)
            for image in range(2):
                Image.new("RGB", (32, 32), (index * 50, image * 100, 0)).save(folder / f"{image}.png")
    (base / "=pics").mkdir()  # predict_input, relative: each row's path starts with =
    for image in range(3):
        Image.new("RGB", (32, 32), (image * 80, 0, 0)).save(base / "=pics" / f"{image}.png")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)
        patch.setenv("HOME", str(base / "home"))
        train = make_config(*SMALL, "trainer.max_epochs=2", "freeze=[@backbone]",
                            "unfreeze=[{epoch: 2, patterns: [@stage-1]}]")
        train.data.root = str(base / "photos")
        train.param_groups = [ParamGroupConfig(patterns=["@head"], name=GROUP)]
        run(train, str(base / "train"))
        best = str(base / "train" / "checkpoints" / "best.pt")
        evaluate = make_config(*SMALL, "mode=evaluate", f"checkpoint={best}")
        run(evaluate, str(base / "evaluate"), ["mode=evaluate", f"checkpoint={best}"])
        predict = make_config(*SMALL, "mode=predict", f"checkpoint={best}")
        predict.predict_input = "=pics"
        run(predict, str(base / "predict"))
    job = base / "sweep" / '=HYPERLINK("job")'
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- +tag=@x\n")
    (job / "summary.json").write_text(json.dumps({"status": "failed", "overrides": ["+tag=@x"],
                                                  "error": "-1 is not valid"}))
    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(base / "sweep")}}, "dry_run": False,
                              "optimized_metric": "best_val_acc", "plots": False})
    with pytest.raises(SystemExit):  # its one job failed
        SweepSummary().on_multirun_end(sweep)
    return base


def cells(path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle, delimiter="\t" if path.suffix == ".tsv" else ","))


def test_every_csv_and_tsv_file_written_is_checked(written):
    found = sorted(str(path.relative_to(written)) for pattern in ("*/*.csv", "*/*.tsv")
                   for path in written.glob(pattern))
    assert found == sorted(FILES)


@pytest.mark.parametrize("name", FILES)
def test_no_cell_starts_a_formula_unless_quoted(written, name):
    rows = cells(written / name)
    assert len(rows) > 1
    for row in rows:  # "-" alone: params.tsv's mark for no group, which holds no formula
        for cell in row:
            assert cell == "-" or not cell.startswith(FORMULA_STARTS), (name, row)


def test_what_came_from_names_is_kept_as_text_with_a_quote(written):
    classes = [row["class"] for row in csv.DictReader(open(written / "evaluate/per_class.csv"))]
    assert classes == [quoted(name) for name in sorted(CLASSES)]
    predicted = list(csv.DictReader(open(written / "predict/predictions.csv")))
    assert [row["path"] for row in predicted] == [quoted(f"=pics/{index}.png") for index in range(3)]
    assert {row["class"] for row in predicted} <= {quoted(name) for name in CLASSES}
    for name in ("params.tsv", "params_epoch2.tsv"):
        groups = {row["group"] for row in csv.DictReader(open(written / "train" / name), delimiter="\t")}
        assert {quoted(GROUP), quoted(GROUP + "/no_decay")} <= groups
    (job,) = csv.DictReader(open(written / "sweep/summary.csv"))
    assert (job["job"], job["overrides"], job["error"]) == (
        quoted('=HYPERLINK("job")'), quoted("+tag=@x"), quoted("-1 is not valid"))


def test_numbers_stay_numbers(written):
    for row in csv.DictReader(open(written / "train/metrics.csv")):
        assert all(isinstance(float(value), float) for value in row.values())
    for row in csv.DictReader(open(written / "evaluate/per_class.csv")):
        assert int(row["images"]) == 2 and 0 <= float(row["accuracy"]) <= 1
    assert [spreadsheet_cell(value) for value in (-1.5, -3, None, True, "a-b", "")] == [
        -1.5, -3, None, True, "a-b", ""]
    assert spreadsheet_cell("\r=1") == "'\r=1"
