"""Image files -> pixels: TorchCodec when installed, else PIL, behind PIL's decompression-bomb
limit (the header is read first, so a file that declares gigabytes of pixels is refused
before any decoder runs). The image cache and the folders both read through here."""

import functools
import io
from collections.abc import Callable
from typing import BinaryIO

import torch
from PIL import Image
from torchvision.transforms import v2

from finetune.errors import ConfigError


@functools.cache
def image_decoder() -> Callable | None:
    """TorchCodec's decode_image (the `decode` extra, in dev), or None: PIL decodes. It gives
    PIL's pixels for JPEG, PNG, WebP and GIF files, 1.5x faster on JPEG (docs/speed.md)."""
    try:
        from torchcodec.decoders import decode_image
    except ImportError:
        return None
    return decode_image


def decoder_name() -> str:
    """Which library decodes images here, and its version (part of the image cache's key)."""
    import importlib.metadata

    import PIL

    if image_decoder() is None:
        return f"PIL {PIL.__version__}"
    return f"torchcodec {importlib.metadata.version('torchcodec')} (else PIL {PIL.__version__})"


def read_image(path: "str | BinaryIO") -> torch.Tensor:
    """An image file (or its bytes, in a file object) as an RGB uint8 tensor (3, H, W), its
    first frame if animated. PIL reads its header first (open_image: a file it cannot
    identify is refused, its size unknown), then TorchCodec decodes a file or bytes in
    memory (a table's cell, a shard's member), else PIL (BMP, TIFF; a broken file, naming
    what is wrong)."""
    with open_image(path) as image:
        source = path.getvalue() if isinstance(path, io.BytesIO) else path
        decode = image_decoder() if isinstance(source, str | bytes) else None
        # TorchCodec decodes every frame of an animation: PIL decodes the first one alone
        if decode is not None and not getattr(image, "is_animated", False):
            try:
                decoded = decode(source, mode="RGB")
                return decoded[0] if decoded.dim() == 4 else decoded
            except (RuntimeError, ValueError):  # another format, or a broken file: PIL says which
                pass
        return v2.functional.pil_to_tensor(image.convert("RGB"))


def open_image(path: "str | BinaryIO") -> Image.Image:
    """The image's header (PIL reads no pixels yet), refused past PIL's decompression-bomb
    limit before any decoder runs: TorchCodec has no limit of its own, and a small file can
    declare gigabytes of pixels. PIL reads Image.MAX_IMAGE_PIXELS at each call and refuses
    over twice it (PIL only warns below), so a user who raises or clears it is obeyed."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:
        raise ConfigError(f"{path} is too large an image to decode safely: {error} PIL refuses "
                          "images over twice PIL.Image.MAX_IMAGE_PIXELS pixels, and so does this "
                          "tool whichever library decodes them. If you trust the file, raise "
                          "PIL.Image.MAX_IMAGE_PIXELS in Python (None: no limit) before it is read, "
                          "or make the image smaller.") from error
