"""Offline, seeded data for benchmarks/transfer.py: a source task and a target task with
disjoint labels, drawn the same way, so features learned on one help on the other.

- Source: 50 procedurally generated glyph classes. Each class is a fixed random set of 2-4
  strokes (lines and arcs); each image draws it with a small random rotation, scale, shear,
  shift and stroke width.
- Target: scikit-learn's bundled handwritten digits (10 classes). Training images come
  from the first 1000 digits (50 per class), validation from the other 797 (other writers).

Both go through the same two steps. First the 8x8 low-resolution look of the digits: a glyph
is drawn at 32x32, area-averaged to 8x8 and quantized to 17 grey levels, as load_digits is.
Then one cluttered 32x32 scene per image: the object resized to 20-30 px at a random
place, a textured background, a random ink contrast and polarity (light on dark or dark on
light), a faint distractor stroke, a colour tint and a little noise. Random convolutional
features separate clean centred digits well (a linear probe on a random resnet18 reaches
0.96), but not these scenes, which is what makes the pretrained backbone's head start
visible.
"""

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32  # scene size in pixels
GLYPH_CLASSES, GLYPHS_PER_CLASS = 50, 100
TARGET_TRAIN_PER_CLASS = 50


def glyph_strokes(classes: int, rng: np.random.Generator) -> list[list[tuple]]:
    """Each class: 2-4 lines or arcs in the unit square."""
    shapes = []
    for _ in range(classes):
        strokes = []
        for _ in range(rng.integers(2, 5)):
            if rng.random() < 0.5:
                start = rng.uniform(0.15, 0.85, 2)
                end = rng.uniform(0.15, 0.85, 2)
                while np.linalg.norm(end - start) < 0.3:
                    end = rng.uniform(0.15, 0.85, 2)
                strokes.append(("line", start, end))
            else:
                strokes.append(("arc", rng.uniform(0.3, 0.7, 2), rng.uniform(0.12, 0.3),
                                rng.uniform(0, 360), rng.uniform(120, 330)))
        shapes.append(strokes)
    return shapes


def draw_glyph(strokes: list[tuple], rng: np.random.Generator) -> np.ndarray:
    """One jittered drawing of a class, as an 8x8 array of grey levels 0..16 (digits-like)."""
    angle = math.radians(rng.uniform(-12, 12))
    scale_x, scale_y = rng.uniform(0.85, 1.1, 2)
    shear = rng.uniform(-0.15, 0.15)
    shift = rng.uniform(-0.06, 0.06, 2)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    affine = rotation @ np.array([[scale_x, shear], [0, scale_y]])

    def place(point) -> tuple[float, float]:
        return tuple(((affine @ (np.asarray(point) - 0.5) + 0.5 + shift) * SIZE).tolist())

    canvas = Image.new("L", (SIZE, SIZE), 0)
    pen = ImageDraw.Draw(canvas)
    width = int(rng.integers(3, 6))
    for stroke in strokes:
        if stroke[0] == "line":
            pen.line([place(stroke[1]), place(stroke[2])], fill=255, width=width)
        else:
            _, centre, radius, start, span = stroke
            points = [place(centre + radius * np.array([math.cos(math.radians(start + span * k / 16)),
                                                        math.sin(math.radians(start + span * k / 16))]))
                      for k in range(17)]
            pen.line(points, fill=255, width=width, joint="curve")
    small = np.asarray(canvas.resize((8, 8), Image.BOX), dtype=np.float32) / 255
    return np.clip(np.round(small * 16 * rng.uniform(1.0, 1.6)), 0, 16)


def background(rng: np.random.Generator) -> np.ndarray:
    """Smooth and fine random texture, values in [0, 1]."""
    def upscaled(cells: int, resample) -> np.ndarray:
        noise = (rng.random((cells, cells)) * 255).astype(np.uint8)
        return np.asarray(Image.fromarray(noise).resize((SIZE, SIZE), resample), dtype=np.float32) / 255

    smooth, middle = upscaled(4, Image.BICUBIC), upscaled(SIZE // 4, Image.BILINEAR)
    fine = rng.random((SIZE, SIZE)).astype(np.float32)
    return 0.5 * smooth + 0.3 * middle * rng.uniform(0.3, 1.0) + 0.2 * fine * rng.uniform(0.2, 1.0)


def distractor(rng: np.random.Generator) -> np.ndarray:
    """At most one faint random stroke, as a soft mask in [0, 1]."""
    canvas = Image.new("L", (SIZE, SIZE), 0)
    pen = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 2))):
        shade = int(rng.integers(120, 256))
        if rng.random() < 0.5:
            pen.line([tuple(rng.uniform(0, SIZE, 2).tolist()), tuple(rng.uniform(0, SIZE, 2).tolist())],
                     fill=shade, width=1)
        else:
            (x, y), radius = rng.uniform(0, SIZE, 2), rng.uniform(3, 10)
            start = rng.uniform(0, 360)
            pen.arc([x - radius, y - radius, x + radius, y + radius], start,
                    start + rng.uniform(60, 270), fill=shade, width=1)
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32) / 255


def scene(glyph: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An 8x8 glyph (0..16) in a cluttered SIZE x SIZE RGB scene."""
    size = int(rng.integers(20, 31))
    resized = Image.fromarray((glyph / 16 * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    mask = np.zeros((SIZE, SIZE), np.float32)
    left, top = (int(rng.integers(0, SIZE - size + 1)) for _ in range(2))
    mask[top:top + size, left:left + size] = np.asarray(resized, dtype=np.float32) / 255
    texture, stroke = background(rng), distractor(rng)
    level = rng.uniform(0.2, 0.8)
    ink = rng.uniform(0.35, 0.7) * (1 if rng.random() < 0.5 else -1)  # either polarity
    grey = level + (texture - 0.5) * rng.uniform(0.1, 0.3)
    grey = grey + stroke * ink * rng.uniform(0.2, 0.5)
    grey = grey * (1 - mask) + (level + ink) * mask + (grey - level) * mask * 0.3
    tint = rng.uniform(0.6, 1.0, 3)
    rgb = np.clip(np.clip(grey, 0, 1)[..., None] * tint + rng.normal(0, 0.02, (SIZE, SIZE, 3)), 0, 1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def source_images(seed: int = 0) -> tuple[list[Image.Image], list[int], list[str]]:
    rng = np.random.default_rng(seed)
    shapes = glyph_strokes(GLYPH_CLASSES, np.random.default_rng(seed + 12345))
    images, labels = [], []
    for label, strokes in enumerate(shapes):
        for _ in range(GLYPHS_PER_CLASS):
            images.append(scene(draw_glyph(strokes, rng), rng))
            labels.append(label)
    return images, labels, [f"glyph_{label:03d}" for label in range(GLYPH_CLASSES)]


def target_images(seed: int = 0):
    """(train images, train labels, val images, val labels, class names)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed + 777)
    train, train_labels = [], []
    for digit in range(10):
        pool = [i for i in range(1000) if digits.target[i] == digit]
        for index in rng.permutation(pool)[:TARGET_TRAIN_PER_CLASS]:
            train.append(scene(digits.images[index], rng))
            train_labels.append(digit)
    val = [scene(digits.images[i], rng) for i in range(1000, len(digits.target))]
    return (train, train_labels, val, digits.target[1000:].tolist(),
            [f"digit_{digit}" for digit in range(10)])


def write_split(root: str, split: str, images: list[Image.Image], labels: list[int],
                names: list[str]) -> None:
    """root/split/<class>/<index>.png, as data=imagefolder reads it."""
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = os.path.join(root, split, names[label])
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{index:05d}.png"))


# The three shifts of `transfer.py --shifts`, after Lee et al. (ICLR 2023): the pretrained
# backbone's own glyph classes with corrupted pixels (input level), the digits (feature level,
# target_images above) and the glyphs under new labels (output level). Both glyph shifts draw
# new images of the source's 50 glyph shapes, not the images the backbone was trained on.
SHIFT_PER_CLASS = 10  # glyph images per class in each split: 500 training, 500 validation
MERGED_GROUPS = 10  # output level: glyph k is labelled k mod 10


def fresh_glyphs(per_class: int, draw_seed: int) -> tuple[list[Image.Image], list[int]]:
    """New drawings of the source's glyph classes (the same shapes, other draws)."""
    rng = np.random.default_rng(draw_seed)
    shapes = glyph_strokes(GLYPH_CLASSES, np.random.default_rng(12345))  # source_images' shapes
    images, labels = [], []
    for label, strokes in enumerate(shapes):
        for _ in range(per_class):
            images.append(scene(draw_glyph(strokes, rng), rng))
            labels.append(label)
    return images, labels


def corrupted(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What the pretraining never saw: a blur, strong pixel noise, and every other 4x4 cell
    of a fixed checkerboard inverted."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32) / 255
    pixels = np.clip(pixels + rng.normal(0, 0.08, pixels.shape), 0, 1)
    cells = (np.indices((SIZE, SIZE)) // 4).sum(axis=0) % 2 == 1
    pixels[cells] = 1 - pixels[cells]
    return Image.fromarray((pixels * 255).astype(np.uint8))


def input_shift(seed: int = 0):
    """(train images, train labels, val images, val labels, class names): the glyph classes,
    corrupted."""
    rng = np.random.default_rng(seed + 4242)
    names = [f"glyph_{label:03d}" for label in range(GLYPH_CLASSES)]
    splits = [fresh_glyphs(SHIFT_PER_CLASS, seed + 1000 + split) for split in range(2)]
    (train, train_labels), (val, val_labels) = [
        ([corrupted(image, rng) for image in images], labels) for images, labels in splits]
    return train, train_labels, val, val_labels, names


def output_shift(seed: int = 0):
    """The glyphs as they were drawn for the source, under new labels: 50 classes merged
    into 10 groups."""
    (train, train_labels), (val, val_labels) = [
        fresh_glyphs(SHIFT_PER_CLASS, seed + 2000 + split) for split in range(2)]
    merge = [label % MERGED_GROUPS for label in train_labels], [
        label % MERGED_GROUPS for label in val_labels]
    return train, merge[0], val, merge[1], [f"group_{group}" for group in range(MERGED_GROUPS)]
