"""data=csv: images listed in a CSV file train as the same images in class folders do;
bad rows are named by their line."""

import csv
import json
import random

import pytest
from PIL import Image

from finetune.errors import ConfigError
from finetune.run import build, run

from conftest import FAST, make_config

CLASSES = ("ants", "bees", "wasps")
SMALL = (*FAST[:2], "trainer.max_epochs=2", "trainer.device=cpu", "data.image_size=32",
         "data.num_workers=0", "data.batch_size=8", "plots=false")


@pytest.fixture
def photos(tmp_path):
    """root/{train,val}/<class>/*.png (8 and 3 per class, a colour per class plus noise),
    and photos.csv listing them in a shuffled order with their split."""
    root, rng, rows = tmp_path / "photos", random.Random(0), []
    for split, count in (("train", 8), ("val", 3)):
        for index, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for number in range(count):
                pixels = bytes(min(255, 80 * index + rng.randrange(60)) for _ in range(16 * 16 * 3))
                Image.frombytes("RGB", (16, 16), pixels).save(root / split / name / f"{number}.png")
                rows.append({"image": f"{split}/{name}/{number}.png", "label": name, "split": split})
    rng.shuffle(rows)
    write_csv(root / "photos.csv", rows)
    return root


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def metrics(run_dir):
    return [{key: value for key, value in row.items() if key != "seconds"}
            for row in csv.DictReader(open(run_dir / "metrics.csv"))]


@pytest.mark.slow
def test_a_csv_of_an_image_folder_trains_exactly_as_the_folder(photos, tmp_path):
    run(make_config(*SMALL, "data=imagefolder", f"data.root={photos}"), str(tmp_path / "folder"))
    run(make_config(*SMALL, "data=csv", f"data.file={photos}/photos.csv"), str(tmp_path / "csv"))
    assert metrics(tmp_path / "folder") == metrics(tmp_path / "csv")
    summary = json.loads((tmp_path / "csv" / "summary.json").read_text())
    assert summary["epochs_completed"] == 2


@pytest.mark.slow
def test_without_a_split_column_the_split_is_stratified_and_fixed(photos):
    rows = [row for row in csv.DictReader(open(photos / "photos.csv"))]
    write_csv(photos / "nosplit.tsv", [{"path": row["image"], "class": row["label"]} for row in rows],
              delimiter="\t")
    overrides = (*SMALL, "data=csv", f"data.file={photos}/nosplit.tsv", "data.image_column=path",
                 "data.label_column=class", "data.val_fraction=0.3")
    first, again = build(make_config(*overrides, "seed=1")), build(make_config(*overrides, "seed=2"))
    val = first.data.val_loader.dataset
    assert val.samples == again.data.val_loader.dataset.samples  # the run's seed does not move it
    assert first.data.class_names == list(CLASSES)
    per_class = [val.targets.count(index) for index in range(3)]
    assert sum(per_class) == 10 and max(per_class) - min(per_class) <= 1  # 30% of 33, stratified
    assert len(first.data.train_loader.dataset) == 23


@pytest.mark.parametrize("change, message", [
    (lambda rows: rows[2].update(image="train/ants/missing.png"), "line 4: .*missing.png does not exist"),
    (lambda rows: rows[0].update(label=" "), "line 2: empty label"),
    (lambda rows: rows[5].update(split="testing"), "line 7: split 'testing' is not train, val or test"),
])
def test_a_bad_row_is_named_by_its_line(photos, change, message):
    rows = [row for row in csv.DictReader(open(photos / "photos.csv"))]
    change(rows)
    write_csv(photos / "bad.csv", rows)
    with pytest.raises(ConfigError, match=message):
        build(make_config(*SMALL, "data=csv", f"data.file={photos}/bad.csv"))


def test_missing_columns_and_files_are_named(photos):
    with pytest.raises(ConfigError, match=r"data.label_column='species' is not a column .*'label'"):
        build(make_config(*SMALL, "data=csv", f"data.file={photos}/photos.csv",
                          "data.label_column=species"))
    with pytest.raises(ConfigError, match="data.file='/no/such.csv' does not exist"):
        build(make_config(*SMALL, "data=csv", "data.file=/no/such.csv"))
    with pytest.raises(ConfigError, match="data.file is not set"):
        build(make_config(*SMALL, "data=csv"))


def test_an_unreadable_image_is_left_out_and_named(photos, caplog):
    (photos / "train" / "bees" / "0.png").write_bytes(b"not an image")
    setup = build(make_config(*SMALL, "data=csv", f"data.file={photos}/photos.csv"))
    assert len(setup.data.train_loader.dataset) == 23
    assert "bees/0.png" in caplog.text and "data.bad_images=skip" in caplog.text


def test_a_cell_over_the_csv_field_limit_is_named_by_its_line(photos):
    text = (photos / "photos.csv").read_text().splitlines()
    text[3] += "x" * 200_000  # line 4's last cell
    (photos / "long.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(ConfigError, match=rf"data.file='{photos}/long.csv': line 4 cannot be parsed "
                                          r"\(field larger than field limit .*131,072 characters") as error:
        build(make_config(*SMALL, "data=csv", f"data.file={photos}/long.csv"))
    assert "xxx" not in str(error.value)  # the file's contents are not quoted


def test_a_file_that_is_not_utf8_is_named_by_its_line(photos):
    rows = [row for row in csv.DictReader(open(photos / "photos.csv"))]
    rows[4]["label"] = "abeille"
    write_csv(photos / "latin1.csv", rows)
    content = (photos / "latin1.csv").read_bytes().replace(b"abeille", "abeillé".encode("latin-1"))
    (photos / "latin1.csv").write_bytes(content)
    with pytest.raises(ConfigError, match=rf"data.file='{photos}/latin1.csv': line 6 is not UTF-8 "
                                          r"\(invalid continuation byte\); data=csv reads files as UTF-8"):
        build(make_config(*SMALL, "data=csv", f"data.file={photos}/latin1.csv"))


def test_the_line_that_is_not_utf8_is_found_whatever_the_chunks(tmp_path, monkeypatch):
    from finetune.data import csv_data

    path = tmp_path / "mixed.csv"
    path.write_bytes("image,label\ncafé.png,€\n".encode() + b"b.png,caf\xe9\nc.png,ok\n")
    for chunk in range(1, 12):  # characters and the bad byte cut across chunks
        monkeypatch.setattr(csv_data, "CHUNK", chunk)
        assert csv_data.undecodable_line(str(path)) == 3, chunk
    path.write_bytes("image,label\na.png,€".encode()[:-1])  # a character cut at the end
    assert csv_data.undecodable_line(str(path)) == 2
