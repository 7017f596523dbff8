"""Files a bad actor made are refused before they take memory: a checkpoint re-zipped into a
zip bomb, an image whose header declares more pixels than PIL's limit, an animation."""

import json
import multiprocessing
import os
import struct
import zipfile

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from finetune.data.images import image_decoder, read_image
from finetune.data.loaders import build_data
from finetune.errors import ConfigError
from finetune.model.net import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from finetune.run import run
from finetune.state.files import load_safe

from conftest import FAST, HANG_SECONDS, make_config

MIB = 1 << 20


def status(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_growth(function, *arguments) -> tuple[int, str]:
    """How far `function(*arguments)` raises the peak resident memory of a forked child over
    what it held before (bytes), and what it raised ("" if nothing)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child():
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # the peak (VmHWM) starts again from what is held now
        before, raised = status("VmRSS"), ""
        try:
            function(*arguments)
        except Exception as error:
            raised = f"{type(error).__name__}: {error}"
        send.send((status("VmHWM") - before, raised))

    process = context.Process(target=child)
    process.start()
    process.join(timeout=HANG_SECONDS)
    assert receive.poll(), f"the child sent nothing (exit code {process.exitcode})"
    return receive.recv()


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="measures memory through Linux's /proc")


def zip_bomb(path, inflated: int = 512 * MIB) -> None:
    """A torch.save file re-zipped with deflate, its tensor's entry replaced by `inflated`
    zero bytes (written in chunks: they never sit in memory); half a megabyte on disk."""
    torch.save({"weight": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as original:
        entries = {info.filename: original.read(info) for info in original.infolist()}
    tensor = next(name for name in entries if name.endswith("/data/0"))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        for name, content in entries.items():
            if name != tensor:
                bomb.writestr(name, content)
        with bomb.open(tensor, "w", force_zip64=True) as stream:
            for _ in range(inflated // MIB):
                stream.write(bytes(MIB))


@needs_proc
@pytest.mark.slow
def test_a_zip_bomb_checkpoint_is_refused_before_it_inflates(tmp_path):
    path = tmp_path / "best.pt"
    zip_bomb(path)
    assert os.path.getsize(path) < 2 * MIB
    growth, raised = peak_growth(load_safe, str(path))
    assert raised.startswith("ConfigError") and growth < 200 * MIB, (growth, raised)
    with pytest.raises(ConfigError, match=rf"checkpoint='{path}' holds \d+ compressed entries, the "
                                          r"largest '.*/data/0' \(deflate: .* inflate to 536,870,912\)"):
        load_safe(str(path))


def test_entries_declaring_more_than_the_file_holds_are_refused(tmp_path):
    """Entries stored whole fit in their file; an index saying otherwise (overlapping
    entries, or a size changed) is refused, naming the largest entry."""
    path = tmp_path / "last.pt"
    torch.save({"weight": torch.zeros(4)}, path)
    content = bytearray(path.read_bytes())
    name = content.rindex(b"/data/0")  # in the central directory, after every entry
    record = content.rindex(b"PK\x01\x02", 0, name)  # the tensor's record there
    content[record + 24:record + 28] = struct.pack("<I", 1 << 30)  # its uncompressed size
    path.write_bytes(bytes(content))
    with pytest.raises(ConfigError, match=r"backbone.checkpoint='.*last.pt' declares .* bytes of "
                                          r"entries in a file of .* '.*/data/0': 1,073,741,824\)"):
        load_safe(str(path), key="backbone.checkpoint")


def test_what_torch_save_writes_loads_in_either_format(tmp_path):
    state = {"weight": torch.arange(6.0), "epoch": 3}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # torch < 1.6
    for name in ("zip.pt", "legacy.pt"):
        loaded = load_safe(str(tmp_path / name))
        assert torch.equal(loaded["weight"], state["weight"]) and loaded["epoch"] == 3


def test_a_safetensors_header_declaring_more_than_the_file_is_refused(tmp_path):
    header = json.dumps({"weight": {"dtype": "F32", "shape": [1 << 28],
                                    "data_offsets": [0, 1 << 30]}}).encode()
    path = tmp_path / "weights.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(ConfigError, match=f"checkpoint='{path}' is not a readable safetensors"):
        load_safe(str(path))


@pytest.fixture
def large_image(tmp_path, monkeypatch):
    """A 3000 x 3000 PNG of a few kilobytes, over a limit of 1,000,000 pixels (refused over
    twice that): what a decompression bomb is, made small."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    path = tmp_path / "large.png"
    Image.new("1", (3000, 3000)).save(path)
    return path


@pytest.mark.parametrize("decoder", ["torchcodec", "pil"])
def test_an_image_over_pils_limit_is_refused_before_it_is_decoded(large_image, monkeypatch, decoder):
    if decoder == "pil":
        monkeypatch.setattr("finetune.data.images.image_decoder", lambda: None)
    else:
        assert image_decoder() is not None  # the decode extra, part of dev
    with pytest.raises(ConfigError, match=rf"{large_image} is too large an image .*9000000 pixels\) "
                                          r"exceeds limit of 2000000 .*raise PIL.Image.MAX_IMAGE_PIXELS"):
        read_image(str(large_image))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit, as PIL documents
    assert read_image(str(large_image)).shape == (3, 3000, 3000)


def test_an_animation_is_decoded_one_frame_only(tmp_path, monkeypatch):
    """TorchCodec decodes every frame (a small GIF of many frames: gigabytes); PIL the first."""
    frames = [Image.new("RGB", (64, 48), (40 * index, 0, 0)) for index in range(3)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "still.gif")
    decoded = []
    decode = image_decoder()
    monkeypatch.setattr("finetune.data.images.image_decoder",
                        lambda: lambda path, mode: decoded.append(path) or decode(path, mode=mode))
    first = read_image(str(tmp_path / "animated.gif"))
    assert first.shape == (3, 48, 64) and torch.equal(first, read_image(str(tmp_path / "still.gif")))
    assert decoded == [str(tmp_path / "still.gif")]


def image_folder(root, large_image):
    """root/{train,val}/{a,b}/: three small images per class, and the large one in train/a."""
    for split in ("train", "val"):
        for index, name in enumerate("ab"):
            (root / split / name).mkdir(parents=True)
            for number in range(3):
                Image.new("RGB", (20, 20), (200 * index, 50 * number, 0)).save(
                    root / split / name / f"{number}.png")
    os.replace(large_image, root / "train" / "a" / "large.png")
    return root / "train" / "a" / "large.png"


def spec(size=16):
    return InputSpec(size, size, IMAGENET_MEAN, IMAGENET_STD, InterpolationMode.BILINEAR)


def test_in_training_an_image_over_the_limit_is_a_bad_image(tmp_path, large_image, caplog):
    large = image_folder(tmp_path / "data", large_image)
    settings = ("data=imagefolder", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                "data.batch_size=64")
    with pytest.raises(ConfigError, match=rf"data.bad_images=fail: 1 unreadable .*{large}"):
        build_data(make_config(*settings, "data.bad_images=fail").data, spec(), seed=0)
    data = build_data(make_config(*settings, "data.bad_images=skip").data, spec(), seed=0)
    assert str(large) in caplog.text and len(data.train_loader.dataset) == 6


def test_an_image_found_over_the_limit_while_training_is_named_or_skipped(tmp_path, large_image,
                                                                         monkeypatch, caplog):
    """The start-up check passed (the limit was raised then); read_image refuses it later."""
    large = image_folder(tmp_path / "data", large_image)
    for policy in ("fail", "skip"):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        cfg = make_config("data=imagefolder", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                          "data.batch_size=64", f"data.bad_images={policy}")
        data = build_data(cfg.data, spec(), seed=0)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
        if policy == "fail":
            with pytest.raises(RuntimeError, match=f"cannot read image {large}: {large} is too large"):
                next(iter(data.train_loader))
        else:
            assert next(iter(data.train_loader))[0].shape[0] == 6  # 7 images, the large one out
            assert f"leaving out unreadable image {large}" in caplog.text


@pytest.mark.slow
def test_predicting_refuses_an_image_over_the_limit(tmp_path, large_image, caplog):
    import finetune
    from finetune.use.predict import ImageFiles

    files = ImageFiles(str(large_image.parent), transform=lambda image: image)  # mode=predict's
    assert files[0] is None and f"leaving out unreadable image {large_image}" in caplog.text
    run(make_config(*FAST), str(tmp_path / "run"))
    model = finetune.load_model(str(tmp_path / "run" / "checkpoints" / "best.pt"))
    with pytest.raises(ConfigError, match=f"{large_image} is too large an image"):
        model.predict(large_image)


def test_data_max_image_pixels_sets_the_limit_for_a_run(tmp_path, large_image, monkeypatch):
    large = image_folder(tmp_path / "data", large_image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit (put back after the test)
    settings = ("backbone.weights=null", "backbone.name=squeezenet1_1", "trainer.device=cpu",
                "data=imagefolder", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                "data.bad_images=fail", "dry_run=true")
    with pytest.raises(ConfigError, match=rf"1 unreadable .*{large}.*too large an image"):
        run(make_config(*settings, "data.max_image_pixels=1000000"), str(tmp_path / "refused"))
    assert Image.MAX_IMAGE_PIXELS == 1_000_000
    assert run(make_config(*settings, "data.max_image_pixels=5000000"), str(tmp_path / "ok")) is None
