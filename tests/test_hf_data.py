"""data=hf: a Hugging Face data set (Parquet files, a save_to_disk folder) trains exactly as
the same images in class folders do; what the data set holds is checked and named."""

import csv
import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from finetune.errors import ConfigError
from finetune.run import build, run

from conftest import FAST, IMAGE_RUN, make_config, png_bytes

datasets = pytest.importorskip("datasets", reason="data=hf needs the hf extra (in dev)")

PER_CLASS = {"train": 6, "validation": 2}
SMALL = (*FAST[:2], *IMAGE_RUN)


@pytest.fixture
def digits(tmp_path):
    """The same digit images twice: folders/{train,val}/<digit>/<n>.png, and Parquet files
    data/{train,validation}-00000-of-00001.parquet with an Image and a ClassLabel column,
    rows in the folders' order (class, then file name)."""
    bundle, names = load_digits(), [f"digit_{digit}" for digit in range(10)]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=names)})
    used = 0
    for split, count in PER_CLASS.items():
        rows = {"image": [], "label": []}
        for digit in range(10):
            folder = tmp_path / "folders" / ("val" if split == "validation" else split) / names[digit]
            folder.mkdir(parents=True)
            chosen = np.flatnonzero(bundle.target == digit)[used:used + count]
            for number, index in enumerate(chosen):
                data = png_bytes((bundle.images[index] * 15).astype(np.uint8))
                (folder / f"{number}.png").write_bytes(data)
                rows["image"].append({"bytes": data, "path": None})
                rows["label"].append(digit)
        used += count
        table = datasets.Dataset.from_dict(rows, features=features)
        table.to_parquet(str(tmp_path / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    return tmp_path


def hf(digits, *overrides: str) -> list[str]:
    return ["data=hf", f"data.path={digits}/parquet", f"data.cache_dir={digits}/hf-cache", *overrides]


def metrics(run_dir):
    return [{key: value for key, value in row.items() if key != "seconds"}
            for row in csv.DictReader(open(run_dir / "metrics.csv"))]


@pytest.mark.slow
@pytest.mark.parametrize("cache_images", ["false", "true"])
def test_parquet_files_train_exactly_as_the_same_images_in_folders(digits, tmp_path, cache_images):
    common = [*SMALL, f"data.cache_images={cache_images}", f"trainer.cache_dir={tmp_path}/cache"]
    run(make_config(*common, "data=imagefolder", f"data.root={digits}/folders"),
        str(tmp_path / "folder"))
    run(make_config(*common, *hf(digits)), str(tmp_path / "hf"))
    assert metrics(tmp_path / "folder") == metrics(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "summary.json").read_text())["epochs_completed"] == 1
    if cache_images == "true":  # the table's images have an entry of their own, read back
        setup = build(make_config(*common, *hf(digits)))
        assert setup.data.image_cache.endswith("read from the cache")
        assert setup.data.train_loader.dataset.decoded is not None


def test_the_splits_classes_and_rows_are_read_as_the_data_set_has_them(digits):
    setup = build(make_config(*FAST[:2], *hf(digits), "data.num_workers=0", "data.image_size=16",
                              "dry_run=true"))
    train, val = setup.data.train_loader.dataset, setup.data.val_loader.dataset
    assert setup.data.class_names == [f"digit_{digit}" for digit in range(10)]
    assert (len(train), len(val)) == (60, 20)
    assert train.targets == sorted(train.targets)  # class, then row: the folders' order


@pytest.mark.slow
def test_a_saved_data_set_without_a_validation_split_is_split_by_val_fraction(digits, tmp_path):
    table = datasets.load_dataset(f"{digits}/parquet", cache_dir=str(tmp_path / "c"))["train"]
    table.save_to_disk(str(tmp_path / "saved"))
    cfg = make_config(*FAST[:2], "data=hf", f"data.path={tmp_path}/saved", "data.val_fraction=0.5",
                      "data.num_workers=0", "data.image_size=16", "dry_run=true")
    data = build(cfg).data
    train, val = data.train_loader.dataset, data.val_loader.dataset
    assert len(train) == len(val) == 30
    assert sorted(train.targets) == sorted(val.targets)  # stratified: 3 of each class each
    with pytest.raises(ConfigError, match="data.val_split='validation' is not a split of the "
                                          "data set: it has train"):
        build(make_config(*FAST[:2], "data=hf", f"data.path={tmp_path}/saved", "dry_run=true"))


@pytest.mark.parametrize("target", ["state.json", "dataset_dict.json"])
def test_a_saved_folder_cannot_name_files_outside_itself(digits, tmp_path, target):
    table = datasets.load_dataset(f"{digits}/parquet", cache_dir=str(tmp_path / "c"))
    table.save_to_disk(str(tmp_path / "saved"))
    outside = tmp_path / "outside.arrow"
    outside.write_bytes((tmp_path / "saved" / "train" / "data-00000-of-00001.arrow").read_bytes())
    if target == "state.json":
        state = tmp_path / "saved" / "train" / "state.json"
        saved = json.loads(state.read_text())
        saved["_data_files"] = [{"filename": "../../outside.arrow"}]
        state.write_text(json.dumps(saved))
        message = r"names the data file\(s\) \[\{'filename': '../../outside.arrow'\}\]"
    else:
        (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["../saved/train"]}))
        message = r"names the split '../saved/train', which is not a plain folder name"
    with pytest.raises(ConfigError, match=message):
        build(make_config(*FAST[:2], "data=hf", f"data.path={tmp_path}/saved", "dry_run=true",
                          "data.num_workers=0"))


def test_a_readme_in_the_folder_cannot_name_files_outside_it(digits, tmp_path):
    """datasets reads a data set card's `configs: data_files` when it loads a folder: the
    tool finds the folder's files by their names alone, and refuses a link out of it."""
    (tmp_path / "outside").mkdir()
    outside = tmp_path / "outside" / "secret-00000-of-00001.parquet"
    datasets.Dataset.from_parquet(str(digits / "parquet" / "data" / "train-00000-of-00001.parquet"),
                                  cache_dir=str(tmp_path / "c")).select(range(3)).to_parquet(str(outside))
    (digits / "parquet" / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        f"    path: \"{tmp_path}/outside/*.parquet\"\n---\n")
    setup = build(make_config(*FAST[:2], *hf(digits), "data.num_workers=0", "dry_run=true"))
    assert len(setup.data.train_loader.dataset) == 60  # the folder's own, not the card's 3
    link = digits / "parquet" / "data" / "test-00000-of-00001.parquet"
    link.symlink_to(outside)
    with pytest.raises(ConfigError, match=r"test-00000-of-00001.parquet leads out of the folder"):
        build(make_config(*FAST[:2], *hf(digits), "data.num_workers=0", "dry_run=true"))


def write_table(folder, rows: dict, features=None) -> str:
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(folder / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(folder / "data" / "validation-00000-of-00001.parquet"))
    return str(folder)


@pytest.mark.parametrize("change, message", [
    (["data.image_column=picture"], r"data.image_column='picture' is not a column of the data "
                                    r"set: its columns are \['image', 'label'\]"),
    (["data.label_column=image"], r"data.label_column='image' holds Image"),
    (["data.train_split=training"], r"data.train_split='training' is not a split of the data "
                                    "set: it has train, validation"),
    (["data.multi_label=true"], r"data.multi_label=True: .* one label per image"),
    (["data.path=/nowhere/at/all"], r"data.path='/nowhere/at/all' is not a folder"),
])
def test_bad_settings_are_named(digits, change, message):
    with pytest.raises(ConfigError, match=message):
        build(make_config(*FAST[:2], *hf(digits), "data.num_workers=0", "dry_run=true", *change))


def test_a_row_without_a_label_and_a_cell_naming_a_file_are_refused(digits, tmp_path):
    names = datasets.ClassLabel(names=["a", "b"])
    image = {"bytes": png_bytes(np.zeros((8, 8), np.uint8)), "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": names})
    unlabelled = write_table(tmp_path / "unlabelled", {"image": [image] * 3, "label": [0, -1, 1]},
                             features)
    with pytest.raises(ConfigError, match=r"1 row\(s\) without a valid label \(class ids 0 to "
                                          r"1\): row 1: -1"):
        build(make_config(*FAST[:2], "data=hf", f"data.path={unlabelled}", "dry_run=true",
                          f"data.cache_dir={tmp_path}/c", "data.num_workers=0"))
    secret = tmp_path / "secret.png"
    secret.write_bytes(image["bytes"])
    pointing = write_table(tmp_path / "pointing", {
        "image": [image, {"bytes": None, "path": str(secret)}] * 2, "label": [0, 1, 0, 1]}, features)
    with pytest.raises(ConfigError, match=r"holds no image bytes \(its cell names a file, "
                                          f"'{secret}', which this tool does not open\\)"):
        build(make_config(*FAST[:2], "data=hf", f"data.path={pointing}", "dry_run=true",
                          f"data.cache_dir={tmp_path}/c", "data.num_workers=0",
                          "data.bad_images=fail"))


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_a_plain_label_the_training_split_lacks_is_named(tmp_path, streaming):
    """Plain values' classes are the training split's: a validation value outside them was
    a KeyError."""
    image = {"bytes": png_bytes(np.zeros((8, 8), np.uint8)), "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    for split, labels in (("train", ["cat", "dog"] * 2), ("validation", ["cat", "dog", "bird", "dog"])):
        datasets.Dataset.from_dict({"image": [image] * 4, "label": labels}, features=features
                                   ).to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(ConfigError, match=r"data.label_column='label', split 'validation': 1 row\(s\) "
                                          r"with a label the training split 'train' does not have "
                                          r"\(its 2 classes: cat, dog\): row 2: 'bird'\."):
        build(make_config(*FAST[:2], "data=hf", f"data.path={tmp_path}", "dry_run=true",
                          f"data.cache_dir={tmp_path}/c", "data.num_workers=0",
                          f"data.streaming={streaming}", "data.batch_size=2"))


def test_a_data_set_not_in_the_local_cache_is_named_without_reaching_the_network(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path='someone/no-such-set' is not a folder, and "
                                          "no data set of that name is in the local Hugging Face "
                                          "cache"):
        build(make_config(*FAST[:2], "data=hf", "data.path=someone/no-such-set", "dry_run=true",
                          f"data.cache_dir={tmp_path}"))


@pytest.mark.slow
def test_multi_label_rows_train_with_their_label_lists(tmp_path):
    names = ["red", "green", "blue"]
    features = datasets.Features({"image": datasets.Image(),
                                  "labels": datasets.List(datasets.ClassLabel(names=names))})
    images = [{"bytes": png_bytes(np.full((8, 8), 40 * index, np.uint8)), "path": None} for index in range(6)]
    folder = write_table(tmp_path / "multi", {"image": images,
                                              "labels": [[0], [1, 2], [], [2], [0, 1], [1]]}, features)
    common = [*SMALL, "data=hf", f"data.path={folder}", f"data.cache_dir={tmp_path}/c",
              "data.label_column=labels"]
    with pytest.raises(ConfigError, match=r"data.multi_label=False: .* set data.multi_label=true"):
        build(make_config(*common, "dry_run=true"))
    run(make_config(*common, "data.multi_label=true"), str(tmp_path / "run"))
    rows = metrics(tmp_path / "run")
    assert len(rows) == 1 and all(row["val_map"] != "nan" for row in rows)


@pytest.mark.parametrize("names, multi_label, cells", [
    (["a", "b", "c"], False, [[0, 2], [1, 1, 0]]),
    (["a", "b", "c"], False, [[0, -1], [5, None, 2, -1, 7, 9, 9]]),
    (None, False, [[10, 2], [10, 33]]),
    (None, False, [["cat", "", None], ["dog"]]),
    (None, False, [[1.0, float("nan")], [2.0]]),
    (["a", "b", "c"], True, [[[0, 2], None, []], [[1, 1], [2]]]),
    (["a", "b", "c"], True, [[[0], [0, -1]], [None, [7], [1, None]]]),
])
def test_a_streams_class_ids_are_the_map_style_rows_labels(names, multi_label, cells):
    """A stream reads its labels column-wise into one array of class ids: the targets, and
    the refusal of a row without a valid label, are map-style's row by row."""
    import pyarrow as pa
    import torch
    from omegaconf import OmegaConf

    from finetune.data.folders import multi_hot
    from finetune.data.hf_labels import column_ids, labelled_rows, value_classes

    cfg = OmegaConf.create({"label_column": "label", "train_split": "train"})
    column = pa.chunked_array(cells)  # two chunks, as two Parquet files give
    classes = names or value_classes(column.to_pylist())
    try:
        rows = labelled_rows({"label": column.to_pylist()}, cfg, names, multi_label, "train")
    except ConfigError as refused:
        with pytest.raises(ConfigError) as streamed:
            column_ids(column, cfg, names, multi_label, classes, "train")
        assert str(streamed.value) == str(refused)
        return
    ids = column_ids(column, cfg, names, multi_label, classes, "train")
    index = {name: number for number, name in enumerate(classes)}
    expected = [multi_hot(labels, index) if multi_label else index[labels[0]] for _, labels in rows]
    assert len(ids) == len(expected) == len(column)
    assert all(torch.equal(torch.as_tensor(ids.target(row)), torch.as_tensor(target))
               for row, target in enumerate(expected))
    assert torch.equal(ids.targets(), torch.stack(expected) if multi_label else torch.tensor(expected))
