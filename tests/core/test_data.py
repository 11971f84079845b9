"""Finding images, loading them robustly (modes, EXIF, bad files, bombs), the never-raising dataset."""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from torchtool.core.data import loading, transforms
from torchtool.core.data import describe_error, find_images, load_image
from torchtool.core.output import EXIT_USAGE, UsageError

# --- bad files, made for real ---------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of width x height white pixels; all-zero rows compress to almost nothing."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 500) for _ in range(height // 500)) + packer.compress(row * (height % 500))
    idat += packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def make_bad_files(folder: Path, good_jpeg: Path) -> dict[str, Path]:
    """One file of each bad kind, named so they sort after any good photo."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = good_jpeg.read_bytes()
    files = {
        "truncated": folder / "x1_truncated.jpg",
        "empty": folder / "x2_empty.jpg",
        "not_image": folder / "x3_not_an_image.png",
        "bomb": folder / "x4_bomb.png",
    }
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["empty"].write_bytes(b"")
    files["not_image"].write_text("name,label\ncat.jpg,1\n")
    write_png_bomb(files["bomb"], 20000, 20000)
    return files


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, photo_files) -> dict[str, Path]:
    return make_bad_files(tmp_path_factory.mktemp("bad"), photo_files[0])


def test_the_bomb_is_a_real_png_claiming_400_megapixels(bad_files):
    bomb = bad_files["bomb"]
    assert bomb.stat().st_size < 200_000
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(bomb) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "1", (20000, 20000))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("truncated", "truncated"), ("empty", "not an image"), ("not_image", "not an image"),
     ("bomb", "decompression bomb")],
)
def test_bad_files_raise_with_a_short_reason(bad_files, kind, reason):
    with pytest.raises(Exception) as err:
        load_image(bad_files[kind])
    text = describe_error(err.value)
    assert reason in text
    assert "\n" not in text and len(text) <= 200


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_torchtool_pixel_limit_applies_before_decoding(tmp_path, photo_files):
    # 10000x10000 is under PIL's hard limit (2x89M) but over torchtool's MAX_PIXELS
    bomb = write_png_bomb(tmp_path / "big.png", 10000, 10000)
    with pytest.raises(ValueError, match="decompression bomb: 10000x10000"):
        load_image(bomb)
    with pytest.raises(ValueError, match="exceeds the limit of 100"):
        load_image(photo_files[0], max_pixels=100)


def test_missing_file_reason(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_image(tmp_path / "gone.jpg")
    assert describe_error(err.value) == "file not found"


def test_dataset_never_raises(bad_files, photo_files, tmp_path):
    paths = [photo_files[0], bad_files["truncated"], tmp_path / "gone.jpg", bad_files["bomb"], photo_files[1]]
    transform = transforms.eval_transform(32, 36, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    ds = loading.ImageDataset(paths, transform, fallback_shape=(3, 32, 32))
    items = [ds[i] for i in range(len(ds))]
    assert [it[2] for it in items] == list(range(5))
    assert [bool(it[3]) for it in items] == [False, True, True, True, False]
    assert items[2][3] == "file not found"
    assert "decompression bomb" in items[3][3]
    for x, _, _, err in items:
        assert x.shape == (3, 32, 32)
        if err:
            assert not x.any()
        else:
            assert x.std() > 0.1  # a real photo, not a blank fallback


# --- modes and orientation -----------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb_photo(photo_files) -> Image.Image:
    with Image.open(photo_files[0]) as img:
        return img.convert("RGB")


def _save_mode(img: Image.Image, mode: str, path: Path) -> Path:
    if mode == "I;16":
        gray16 = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        Image.fromarray(gray16).save(path)
    elif mode == "P":
        img.quantize(256).save(path)  # an adaptive palette, as real palette images have
    else:
        img.convert(mode).save(path)
    return path


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", ".png"), ("LA", ".png"), ("RGBA", ".png"), ("P", ".png"), ("P", ".gif"), ("CMYK", ".jpg"),
     ("I;16", ".png"), ("1", ".png")],
)
def test_modes_are_converted_to_rgb(tmp_path, rgb_photo, mode, suffix):
    path = _save_mode(rgb_photo, mode, tmp_path / f"img{suffix}")
    with Image.open(path) as raw:
        assert raw.mode == mode
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == rgb_photo.size
    pixels = np.asarray(img, dtype=np.float64)
    assert pixels.std() > 20  # content, not a flat white or black image
    if mode in ("L", "LA", "I;16"):
        gray = np.asarray(rgb_photo.convert("L"), dtype=np.float64)
        for channel in range(3):
            np.testing.assert_allclose(pixels[..., channel], gray, atol=1)
    elif mode != "1":
        # colour modes keep the colours (CMYK JPEG and palettes only approximately)
        assert np.abs(pixels - np.asarray(rgb_photo, dtype=np.float64)).mean() < 12


def test_exif_orientation_is_applied(tmp_path, rgb_photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    rgb_photo.save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.size == rgb_photo.size  # stored as taken
    img = load_image(path)
    w, h = rgb_photo.size
    assert img.size == (h, w)
    upright = np.asarray(rgb_photo.transpose(Image.Transpose.ROTATE_270), dtype=np.float64)
    assert np.abs(np.asarray(img, dtype=np.float64) - upright).mean() < 6


# --- finding images ------------------------------------------------------------------------


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_directories_are_walked_recursively_sorted_any_case(tmp_path):
    root = tmp_path / "imgs"
    # created out of order: the result must not depend on creation or readdir order
    # (neither creation order nor its reverse is sorted: some file systems list one or the other)
    for name in ["m/n.tif", "z/b.PNG", "c.JPG", "q/r.gif", "z/a.jpeg", "b/deep/x.Png", "a.png", "notes.txt",
                 "b/y.webp", "b/data.npy", "a/e.bmp", "B.Jpg", "b/readme"]:
        _touch(root / name)
    found = find_images([str(root)])
    rel = [p.relative_to(root).as_posix() for p in found]
    # each folder's files in name order, then its sub-folders in name order
    assert rel == ["B.Jpg", "a.png", "c.JPG", "a/e.bmp", "b/y.webp", "b/deep/x.Png", "m/n.tif", "q/r.gif", "z/a.jpeg",
                   "z/b.PNG"]


def test_symlinked_folders_are_followed_but_a_cycle_is_walked_once(tmp_path):
    root = tmp_path / "imgs"
    photo = _touch(root / "d" / "a.jpg")
    _touch(tmp_path / "elsewhere" / "b.png")
    (root / "d" / "up").symlink_to(root, target_is_directory=True)  # d/up -> imgs: a cycle
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert find_images([str(root)]) == [photo, root / "linked" / "b.png"]


def test_files_and_lists_keep_their_order(tmp_path, monkeypatch):
    files = [_touch(tmp_path / n) for n in ["c.jpg", "a.jpg", "b.jpg"]]
    assert find_images([str(files[2]), str(files[0])]) == [files[2], files[0]]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{files[1]}\n\n{files[2]}\r\n{tmp_path / 'missing.jpg'}\n{files[0]}\n")
    # paths from a list are kept even when missing: they become skipped rows, not silent gaps
    assert find_images([], listing) == [files[1], files[2], tmp_path / "missing.jpg", files[0]]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{files[2]}\n{files[1]}\n"))
    assert find_images(["-", str(files[0])]) == [files[2], files[1], files[0]]


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda d: ([str(d / "nope.jpg")], None), "no such file or directory"),
     (lambda d: ([], d / "nolist.txt"), "no such list file"),
     (lambda d: ([str(d)], None), "no images found")],
    ids=["missing-path", "missing-list", "empty-folder"],
)
def test_input_mistakes_are_usage_errors(tmp_path, make, message):
    _touch(tmp_path / "notes.txt")
    paths, listing = make(tmp_path)
    with pytest.raises(UsageError, match=message) as err:
        find_images(paths, listing)
    assert err.value.exit_code == EXIT_USAGE


def test_eval_transform_output(photo_files):
    transform = transforms.eval_transform(48, 56, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = transform(load_image(photo_files[0]))
    assert x.shape == (3, 48, 48)
    assert str(x.dtype) == "torch.float32"
    assert -3 < x.min() < 0 < x.max() < 3  # normalised, not 0..255


# --- the evaluation crop and the batch normalisation ---------------------------------------


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize(("size", "crop", "resize"), [
    ((640, 427), 224, 256),   # the usual preset, landscape
    ((131, 397), 64, 73),     # portrait, odd sizes
    ((300, 200), 200, 200),   # already the right size: no resample at all
    ((90, 60), 100, 96),      # the crop is larger than the resized image: zero padding
])
def test_center_crop_is_pixel_for_pixel_torchvisions(rgb_photo, interpolation, size, crop, resize):
    import torch
    from torchvision.transforms import InterpolationMode, v2

    img = rgb_photo.crop((3, 5, 3 + min(size[0], rgb_photo.width - 3), 5 + min(size[1], rgb_photo.height - 5)))
    img = img.resize(size) if img.size != size else img
    reference = v2.Compose([v2.Resize(resize, interpolation=InterpolationMode(interpolation), antialias=True),
                            v2.CenterCrop(crop), v2.PILToTensor()])(img)
    got = transforms.CenterCrop(crop, resize, interpolation)(img)
    assert got.dtype == torch.uint8 and got.shape == (crop, crop, 3)
    assert torch.equal(got.permute(2, 0, 1), reference)


def test_normalize_matches_torchvision_and_is_channels_last(rgb_photo):
    import torch
    from torchvision.transforms import v2

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    crops = torch.stack([transforms.CenterCrop(40, 48)(rgb_photo.rotate(k * 90)) for k in range(3)])
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])(crops.permute(0, 3, 1, 2))
    batch = transforms.Normalize(mean, std)(crops)
    assert batch.shape == (3, 3, 40, 40) and batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(batch, reference, rtol=1e-6, atol=1e-6)
    # one image at a time: exactly torchvision's arithmetic
    assert torch.equal(transforms.eval_transform(40, 48, mean, std)(rgb_photo), reference[0])


def test_dataset_fallback_has_the_transforms_dtype(bad_files, photo_files):
    import torch

    ds = loading.ImageDataset([photo_files[0], bad_files["truncated"]], transforms.CenterCrop(32, 36),
                           fallback_shape=(32, 32, 3), fallback_dtype="uint8")
    (good, *_), (bad, *_, err) = ds[0], ds[1]
    assert good.dtype == bad.dtype == torch.uint8 and good.shape == bad.shape
    assert err and not bad.any()
    torch.utils.data.default_collate([ds[0], ds[1]])  # stacks into one batch
