"""Real image folders for the finetune tests: scikit-learn's digits and sample photos, written as files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np


def digit_images(size: int = 32):
    """(PIL images, labels) of scikit-learn's 1,797 real 8x8 handwritten digits, upscaled to ``size`` px."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((img * (255 / 16)).astype(np.uint8), "L").resize((size, size), Image.BILINEAR)
              for img in digits.images]
    return images, digits.target.tolist()


def write_digits(root: Path, *, labels: Iterable[int] = range(10), train_per_class: int | None = None,
                 val_per_class: int | None = None, val_fraction: float = 0.2, size: int = 32,
                 layout: str = "split") -> Path:
    """Write digits as PNGs: ``split`` makes root/train/<d>/ and root/val/<d>/, ``flat`` makes root/<d>/.

    The first images of each digit (in scikit-learn's order) go to validation.
    """
    images, targets = digit_images(size)
    for label in labels:
        idx = [i for i, t in enumerate(targets) if t == label]
        n_val = val_per_class if val_per_class is not None else round(len(idx) * val_fraction)
        n_train = train_per_class if train_per_class is not None else len(idx) - n_val
        for k, i in enumerate(idx[: n_val + n_train]):
            if layout == "flat":
                folder = root / str(label)
            else:
                folder = root / ("val" if k < n_val else "train") / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            images[i].save(folder / f"{i:04d}.png")
    return root


def write_photo_classes(root: Path, *, size: int = 64, per_class: int = 8) -> Path:
    """root/train/{china,flower}/ and root/val/{china,flower}/: crops of scikit-learn's two photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    for name in ("china", "flower"):
        photo = Image.fromarray(load_sample_image(f"{name}.jpg")).convert("RGB")  # 640x427
        for k in range(per_class + 2):
            x, y = 40 * k % 380, 25 * k % 160
            crop = photo.crop((x, y, x + 256, y + 256)).resize((size, size), Image.BILINEAR)
            split = "val" if k < 2 else "train"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            crop.save(folder / f"{name}_{k}.jpg", quality=90)
    return root


def add_broken_images(folder: Path, source: Path) -> list[Path]:
    """A truncated JPEG (half of ``source``), a zero-byte PNG and a text file named .png, in ``folder``."""
    truncated, empty, text = folder / "zz_truncated.jpg", folder / "zz_empty.png", folder / "zz_not_an_image.png"
    data = source.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty.write_bytes(b"")
    text.write_text("this is not an image\n")
    return [truncated, empty, text]
