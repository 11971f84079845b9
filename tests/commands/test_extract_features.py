"""torchtool extract-features: through the Typer app, end to end, resumed after a kill, under torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import GENEROUS_S
from typer.testing import CliRunner

from torchtool.cli import app
from torchtool.core.data import images, loading
from torchtool.core.output import EXIT_FAILURE, EXIT_PARTIAL, EXIT_USAGE

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

from tests.core.test_data import make_bad_files  # noqa: E402
from tests.core.test_features import reference_bilinear, without_inplace  # noqa: E402

SIZE = ["--image-size", "64", "--resize", "72"]


def invoke(*args: str, input: str | None = None):
    """The command in-process, on the CPU unless a test names a device: the references are CPU ones
    (on a GPU machine, TF32 convolutions would differ from them by more than the tolerances)."""
    args = tuple(map(str, args))
    device = () if "--device" in args else ("--device", "cpu")
    return CliRunner().invoke(app, ["extract-features", *args, *device], input=input, prog_name="torchtool")


def small(weights: Path | str, *extra: str) -> list[str]:
    """resnet18 at 64 px, loaded in the main process: the fast settings most tests use."""
    return ["-m", "resnet18", "-w", str(weights), *SIZE, "--workers", "0", *extra]


def load(out: Path, name: str) -> np.ndarray:
    """``out/name.npy``, which must end where its array ends (rows are written at offsets: none past it)."""
    path = out / f"{name}.npy"
    array = np.load(path)
    assert path.stat().st_size == np.load(path, mmap_mode="r").offset + array.nbytes, f"{path} has bytes past its array"
    return array


def index(out: Path) -> list[dict[str, str]]:
    with open(out / "index.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def meta(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text(encoding="utf-8"))


def unit_rows(a: np.ndarray) -> np.ndarray:
    flat = a.reshape(len(a), -1).astype(np.float64)
    return np.linalg.norm(flat, axis=1)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, photos_dir, resnet18_weights_pth) -> Path:
    """layer3 + gap of every photo, one plain in-process run that other tests compare against."""
    out = tmp_path_factory.mktemp("baseline") / "feats"
    result = invoke(photos_dir, "-o", out, "-l", "layer3,gap", *small(resnet18_weights_pth, "-b", "3"))
    assert result.exit_code == 0, result.stderr
    return out


# --- values: parity with torchvision -----------------------------------------------------

PARITY = [
    # arch, weights fixture, layers, their torchvision nodes where the name is an alias, classes in the file
    ("resnet18", "resnet18_weights_pth", ["bn1", "layer3", "gap", "logits"], {"gap": "avgpool", "logits": "fc"}, 10),
    ("mobilenet_v3_small", "mobilenet_weights_safetensors", ["features.3", "classifier.0", "gap", "logits"],
     {"gap": "avgpool", "logits": "classifier.3"}, 1000),
    ("squeezenet1_0", "squeezenet_weights_pth", ["features.12", "gap", "logits"],
     {"gap": "classifier.0", "logits": "flatten"}, 1000),
]


def _reference_model(arch: str, weights: Path, classes: int):
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, weights_only=True)
    model = torchvision.models.get_model(arch, weights=None, num_classes=classes)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize(("arch", "fixture", "layers", "nodes", "classes"), PARITY, ids=[p[0] for p in PARITY])
def test_every_layer_equals_create_feature_extractor(request, tmp_path, photo_files, photos_dir, arch, fixture,
                                                     layers, nodes, classes):
    weights = request.getfixturevalue(fixture)
    out = tmp_path / "feats"
    result = invoke(photos_dir, "-m", arch, "-w", weights, "-l", ",".join(layers), *SIZE, "-o", out,
                    "--workers", "0", "-b", "3", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["ok"], summary["skipped"]) == (8, 8, 0)

    # the reference: the same file loaded by hand, torchvision's own preprocessing and extractor
    model = _reference_model(arch, weights, classes)
    transform = torchvision.models.get_model_weights(arch).DEFAULT.transforms(crop_size=64, resize_size=72)
    batch = torch.stack([transform(images.load_image(p)) for p in photo_files])
    reference = create_feature_extractor(without_inplace(model), {nodes.get(n, n): n for n in layers})
    with torch.no_grad():
        expected = reference(batch)
    for name in layers:
        want = expected[name].mean(dim=(2, 3)) if name == "gap" else expected[name]
        got = load(out, name)
        assert got.shape == tuple(want.shape), name
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{arch} {name}")
    assert load(out, "logits").shape == (8, classes)

    rows = index(out)
    assert [r["path"] for r in rows] == [str(p) for p in photo_files]
    assert {r["status"] for r in rows} == {"ok"}
    info = meta(out)
    assert info["complete"] is True
    assert info["weights"] == str(weights.resolve())
    assert {n: info["layers"][n]["shape"][0] for n in layers} == dict.fromkeys(layers, 8)
    assert not (out / ".state").exists()


def test_real_extraction_at_224_has_the_documented_shapes(tmp_path, photo_files):
    out = tmp_path / "feats"
    result = invoke(photo_files[0], "-m", "resnet18", "-w", "none", "-l", "gap,layer4", "-o", out, "--workers", "0")
    assert result.exit_code == 0, result.stderr
    assert load(out, "gap").shape == (1, 512)
    assert load(out, "layer4").shape == (1, 512, 7, 7)
    assert meta(out)["preprocess"]["crop_size"] == 224  # the weights' own preset when not overridden
    np.testing.assert_allclose(load(out, "gap")[0], load(out, "layer4")[0].mean(axis=(1, 2)), rtol=1e-4, atol=1e-6)


def test_random_weights_are_seeded(tmp_path, photo_files):
    """--weights none: the same --seed gives the same features (so resumes and ranks agree)."""
    runs = {}
    for name, seed in [("a", "0"), ("b", "0"), ("c", "1")]:
        result = invoke(*photo_files[:2], "-o", tmp_path / name, "-l", "gap", *small("none", "--seed", seed))
        assert result.exit_code == 0, result.stderr
        runs[name] = load(tmp_path / name, "gap")
    np.testing.assert_array_equal(runs["a"], runs["b"])
    assert not np.allclose(runs["a"], runs["c"])


# --- pooling and normalisation -----------------------------------------------------------


def test_pooling_options_against_references(tmp_path, photos_dir, resnet18_weights_pth, baseline):
    # four names for the same feature map: the alias, its FX node, its module; and GAP
    out = tmp_path / "feats"
    result = invoke(photos_dir, "-o", out, "-l", "layer4,layer4.1.relu_1:bilinear,gap", "-l", "layer4.1",
                    "--pool", "layer4.1:max", *small(resnet18_weights_pth, "-b", "4"))
    assert result.exit_code == 0, result.stderr
    fmap = load(out, "layer4")
    assert fmap.shape == (8, 512, 2, 2)

    bil = load(out, "layer4.1.relu_1")
    assert bil.shape == (8, 512 * 512)
    mats = bil.reshape(8, 512, 512)
    np.testing.assert_allclose(mats, mats.transpose(0, 2, 1), atol=1e-7)  # symmetric before flattening
    np.testing.assert_allclose(unit_rows(bil), 1.0, rtol=1e-5)
    np.testing.assert_allclose(bil, reference_bilinear(fmap), rtol=1e-4, atol=1e-6)

    np.testing.assert_allclose(load(out, "layer4.1"), fmap.max(axis=(2, 3)), rtol=1e-6)
    np.testing.assert_allclose(load(out, "gap"), fmap.mean(axis=(2, 3)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(load(out, "gap"), load(baseline, "gap"), rtol=1e-4, atol=1e-5)
    assert meta(out)["pooling"] == {"layer4": "none", "layer4.1.relu_1": "bilinear", "gap": "avg", "layer4.1": "max"}


def test_normalize_gives_unit_rows(tmp_path, photos_dir, resnet18_weights_pth, baseline):
    out = tmp_path / "feats"
    result = invoke(photos_dir, "-o", out, "-l", "layer3,gap", "--normalize", *small(resnet18_weights_pth, "-b", "8"))
    assert result.exit_code == 0, result.stderr
    for name in ("layer3", "gap"):
        normed, plain = load(out, name), load(baseline, name)
        assert normed.shape == plain.shape
        np.testing.assert_allclose(unit_rows(normed), 1.0, rtol=1e-5)
        expected = plain / unit_rows(plain).reshape(-1, *[1] * (plain.ndim - 1))
        np.testing.assert_allclose(normed, expected, rtol=1e-4, atol=1e-6)
    assert meta(out)["normalize"] is True


# --- layer names ---------------------------------------------------------------------------


def test_list_layers_prints_friendly_names_first_with_shapes(resnet18_weights_pth):
    result = invoke("--list-layers", "-m", "resnet18", "-w", resnet18_weights_pth, "--image-size", "64",
                    "--format", "json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows[:6]] == ["gap", "layer1", "layer2", "layer3", "layer4", "logits"]
    assert [r["kind"] for r in rows[:6]] == ["alias"] * 6
    assert {r["kind"] for r in rows[6:]} == {"node"}
    shapes = {r["name"]: r["shape"] for r in rows}
    assert shapes["gap"] == [512]
    assert shapes["layer3"] == [256, 4, 4]
    assert shapes["logits"] == [10]  # the head of the weights file, not ImageNet's
    assert shapes["layer2.1.bn2"] == [128, 8, 8]


def test_list_layers_table_needs_no_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    result = invoke("--list-layers", "-m", "vgg16")  # --weights DEFAULT: the names do not need the file
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "target", "kind", "shape"]
    assert lines[1].split() == ["gap", "avgpool", "alias", "512"]
    table = {line.split()[0]: line.split() for line in lines[1:]}
    assert table["relu5_3"] == ["relu5_3", "features.29", "alias", "512", "14", "14"]
    assert table["pool5"][-3:] == ["512", "7", "7"]
    assert table["fc7"] == ["fc7", "classifier.3", "alias", "4096"]
    aliases = [line.split()[0] for line in lines[1:] if line.split()[2] == "alias"]
    assert lines[1 + len(aliases)].split()[2] == "node"  # every alias is listed before any node
    assert not list((tmp_path / "torch_home").rglob("*.pth"))


def test_unknown_layer_fails_before_any_image_is_read(tmp_path, photos_dir, resnet18_weights_pth, monkeypatch):
    opened: list[str] = []
    real_load = images.load_image
    monkeypatch.setattr(loading, "load_image", lambda path, *a, **k: opened.append(str(path)) or real_load(path, *a, **k))
    out = tmp_path / "feats"
    result = invoke(photos_dir, "-o", out, "-l", "gap,layr3", *small(resnet18_weights_pth))
    assert result.exit_code == EXIT_USAGE
    assert "torchtool: error: unknown layer 'layr3' for resnet18" in result.stderr
    assert "did you mean layer3" in result.stderr
    assert "Traceback" not in result.stderr
    assert opened == []
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--pool", "median"], "unknown pooling 'median'"), (["-l", "gap:median"], "unknown pooling 'median'"),
     (["-l", "gap", "-l", "gap"], None), (["-l", "gap,gap:avg"], None),
     (["-l", "layer3,layer3:avg"], "a layer is requested twice"), (["--batch-size", str(2**64)], "--batch-size")],
    ids=["pool", "layer-pool", "duplicate-merged", "duplicate-same-pool", "duplicate-pools", "batch-past-maxsize"],
)
def test_layer_and_pool_mistakes(tmp_path, photo_files, resnet18_weights_pth, args, message):
    out = tmp_path / "feats"
    result = invoke(photo_files[0], "-o", out, *args, *small(resnet18_weights_pth))
    if message is None:  # the same name twice is the same request: one file
        assert result.exit_code == 0, result.stderr
        assert load(out, "gap").shape == (1, 512)
    else:
        assert result.exit_code == EXIT_USAGE
        assert message in result.stderr
        assert not out.exists()


# --- inputs: order, stdin, lists, folders ---------------------------------------------------


@pytest.mark.parametrize("via", ["stdin", "list"])
def test_stdin_and_list_keep_their_order(tmp_path, photo_files, resnet18_weights_pth, baseline, via):
    order = [5, 0, 7, 2, 6, 1, 4, 3] if via == "list" else [7, 6, 5, 4, 3, 2, 1, 0]
    text = "".join(f"{photo_files[i]}\n" for i in order)
    out = tmp_path / "feats"
    if via == "stdin":
        result = invoke("-", "-o", out, "-l", "gap", *small(resnet18_weights_pth, "-b", "3"), input=text)
    else:
        (tmp_path / "list.txt").write_text(text)
        result = invoke("--list", tmp_path / "list.txt", "-o", out, "-l", "gap",
                        *small(resnet18_weights_pth, "-b", "3"))
    assert result.exit_code == 0, result.stderr
    assert [r["path"] for r in index(out)] == [str(photo_files[i]) for i in order]
    np.testing.assert_allclose(load(out, "gap"), load(baseline, "gap")[order], rtol=1e-4, atol=1e-5)


def test_folders_are_walked_recursively_with_any_case_extension(tmp_path, photo_files, resnet18_weights_pth,
                                                                 baseline):
    root = tmp_path / "imgs"
    (root / "deeper" / "deepest").mkdir(parents=True)
    shutil.copy(photo_files[1], root / "B.JPG")
    shutil.copy(photo_files[2], root / "a.Png")
    shutil.copy(photo_files[0], root / "deeper" / "deepest" / "c.jpeg")
    (root / "notes.txt").write_text("not an image\n")
    (root / "deeper" / "labels.csv").write_text("a,1\n")
    out = tmp_path / "feats"
    result = invoke(root, "-o", out, "-l", "gap", *small(resnet18_weights_pth))
    assert result.exit_code == 0, result.stderr
    assert [r["path"] for r in index(out)] == [str(root / "B.JPG"), str(root / "a.Png"),
                                               str(root / "deeper" / "deepest" / "c.jpeg")]
    np.testing.assert_allclose(load(out, "gap"), load(baseline, "gap")[[1, 2, 0]], rtol=1e-4, atol=1e-5)


def test_file_names_that_are_not_utf8_are_kept_byte_for_byte(tmp_path, photo_files, resnet18_weights_pth):
    root = tmp_path / "imgs"
    root.mkdir()
    raw = os.path.join(os.fsencode(root), b"caf\xe9.jpg")  # Latin-1, as old cameras and shares name files
    shutil.copy(photo_files[0], raw)
    shutil.copy(photo_files[1], root / "plain.jpg")
    listing = tmp_path / "list.txt"
    listing.write_bytes(raw + b"\n" + os.fsencode(root / "plain.jpg") + b"\n")
    for inputs in ([root], ["--list", listing]):
        out = tmp_path / f"feats{len(inputs)}"
        result = invoke(*inputs, "-o", out, "-l", "gap", *small(resnet18_weights_pth), "--json")
        assert result.exit_code == 0, result.stderr
        index_bytes = (out / "index.csv").read_bytes()
        assert raw + b",ok," in index_bytes  # the name's own bytes
        info = json.loads((out / "meta.json").read_text(encoding="utf-8"))  # still valid UTF-8 JSON
        assert info["complete"] is True and np.isfinite(load(out, "gap")).all()


def test_image_modes_all_give_finite_features(tmp_path, photo_files, resnet18_weights_pth):
    from PIL import Image

    src = Image.open(photo_files[0]).convert("RGB")
    root = tmp_path / "modes"
    root.mkdir()
    src.convert("L").save(root / "1_gray.png")
    src.convert("RGBA").save(root / "2_rgba.png")
    src.quantize(64).save(root / "3_palette.gif")
    src.convert("CMYK").save(root / "4_cmyk.jpg")
    Image.fromarray(np.asarray(src.convert("L"), dtype=np.uint16) * 257).save(root / "5_gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    src.save(root / "6_exif_rotated.jpg", exif=exif)
    out = tmp_path / "feats"
    result = invoke(root, "-o", out, "-l", "layer2,gap", "--dtype", "float16", *small(resnet18_weights_pth))
    assert result.exit_code == 0, result.stderr
    assert [r["status"] for r in index(out)] == ["ok"] * 6
    gap = load(out, "gap")
    assert gap.dtype == np.float16 and gap.shape == (6, 512)
    assert np.isfinite(gap).all() and np.isfinite(load(out, "layer2")).all()
    # gray and 16-bit gray hold the same picture: the same features
    np.testing.assert_allclose(gap[0].astype(np.float32), gap[4].astype(np.float32), rtol=1e-2, atol=1e-2)


# --- bad inputs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, photo_files) -> tuple[Path, list[Path], dict[str, str]]:
    """A --list file: two photos among one of each bad kind and a missing path; expected reasons."""
    root = tmp_path_factory.mktemp("bad_inputs")
    bad = make_bad_files(root, photo_files[0])
    missing = root / "deleted_since.jpg"
    paths = [photo_files[0], bad["truncated"], missing, bad["empty"], photo_files[1], bad["not_image"], bad["bomb"]]
    listing = root / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    reasons = {str(bad["truncated"]): "truncated", str(missing): "file not found", str(bad["empty"]): "not an image",
               str(bad["not_image"]): "not an image", str(bad["bomb"]): "decompression bomb"}
    return listing, paths, reasons


def test_bad_files_are_skipped_recorded_and_exit_3(tmp_path, bad_inputs, resnet18_weights_pth, baseline):
    listing, paths, reasons = bad_inputs
    out = tmp_path / "feats"
    result = invoke("--list", listing, "-o", out, "-l", "layer3,gap", "--json", *small(resnet18_weights_pth, "-b", "3"))
    assert result.exit_code == EXIT_PARTIAL, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["ok"], summary["skipped"]) == (7, 2, 5)
    assert f"5 of 7 inputs could not be read; see {out / 'index.csv'}" in result.stderr

    rows = index(out)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for row in rows:
        if row["path"] in reasons:
            assert row["status"] == "skipped"
            assert reasons[row["path"]] in row["error"], row
        else:
            assert (row["status"], row["error"]) == ("ok", "")
    good = np.array([str(p) not in reasons for p in paths])
    for name in ("layer3", "gap"):
        arr = load(out, name)
        assert arr.shape[0] == 7
        assert np.isnan(arr[~good]).all()
        assert np.isfinite(arr[good]).all()
        # bad rows do not shift the good ones
        np.testing.assert_allclose(arr[good], load(baseline, name)[:2], rtol=1e-4, atol=1e-5)
    assert meta(out)["complete"] is True


def test_no_readable_input_at_all_is_a_failure(tmp_path, bad_inputs, resnet18_weights_pth):
    listing, paths, reasons = bad_inputs
    only_bad = tmp_path / "bad.txt"
    only_bad.write_text("".join(f"{p}\n" for p in paths if str(p) in reasons))
    result = invoke("--list", only_bad, "-o", tmp_path / "feats", "-l", "gap", *small(resnet18_weights_pth))
    assert result.exit_code == EXIT_FAILURE, result.stderr
    assert "torchtool: error: none of the 5 inputs could be read" in result.stderr
    assert len(index(tmp_path / "feats")) == 5  # the index still says why, row by row


def test_max_pixels_accepts_or_refuses_a_large_image(tmp_path, photo_files, resnet18_weights_pth):
    from PIL import Image

    large = tmp_path / "large.jpg"
    Image.open(photo_files[0]).resize((1500, 1000)).save(large)  # 1.5 megapixels
    strict = invoke(large, "-o", tmp_path / "a", *small(resnet18_weights_pth), "--max-pixels", "1000000", "--strict")
    assert strict.exit_code == EXIT_FAILURE
    assert "decompression bomb: 1500x1000 pixels exceeds the limit of 1000000 (--max-pixels)" in strict.stderr
    assert invoke(large, "-o", tmp_path / "b", *small(resnet18_weights_pth), "--max-pixels", "2000000").exit_code == 0


def test_strict_fails_on_the_first_bad_file(tmp_path, bad_inputs, resnet18_weights_pth):
    listing, paths, _ = bad_inputs
    result = invoke("--list", listing, "-o", tmp_path / "feats", "-l", "gap", "--strict",
                    *small(resnet18_weights_pth, "-b", "1"))
    assert result.exit_code == EXIT_FAILURE
    assert f"torchtool: error: cannot read {paths[1]}: image file is truncated" in result.stderr
    assert "--strict" in result.stderr  # the hint says how to keep going instead
    assert "Traceback" not in result.stderr


# --- weights: offline and unsafe files ---------------------------------------------------------


def test_offline_default_weights_name_the_expected_file(tmp_path, photo_files, monkeypatch):
    import urllib.error

    import torch.hub

    home = tmp_path / "empty_torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    asked: list[str] = []

    def offline(url, *args, **kwargs):  # the download itself fails, network or not
        asked.append(url)
        print(f"Downloading: {url!r}")  # as torch.hub does, on stdout
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    out = tmp_path / "feats"
    result = invoke(photo_files[0], "-m", "resnet18", "-o", out, "--workers", "0")
    assert asked == [torchvision.models.ResNet18_Weights.DEFAULT.url]
    assert result.exit_code == EXIT_FAILURE
    assert result.stdout == "" and "Downloading:" in result.stderr  # stdout stays data only
    expected = home / "hub" / "checkpoints" / os.path.basename(torchvision.models.ResNet18_Weights.DEFAULT.url)
    assert "torchtool: error: cannot download ResNet18_Weights.IMAGENET1K_V1" in result.stderr
    assert str(expected) in result.stderr
    assert "--weights none" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_a_checkpoint_names_the_model(tmp_path, photo_files, mobilenet_weights_safetensors):
    from safetensors.torch import load_file

    from torchtool.core.models.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "best.pth", {
        "arch": "mobilenet_v3_small", "classes": [f"c{i}" for i in range(1000)], "model": load_file(
            mobilenet_weights_safetensors), "preprocess": {"crop_size": 64, "resize_size": 72,
                                                           "mean": [0.5] * 3, "std": [0.25] * 3}})
    out = tmp_path / "feats"
    result = invoke(*photo_files[:2], "-w", ckpt, "-o", out, "--workers", "0", "--json")  # no --model
    assert result.exit_code == 0, result.stderr
    assert meta(out)["model"] == "mobilenet_v3_small" and meta(out)["preprocess"]["crop_size"] == 64
    clash = invoke(*photo_files[:2], "-m", "resnet18", "-w", ckpt, "-o", tmp_path / "clash", "--workers", "0")
    assert clash.exit_code == EXIT_USAGE
    assert "holds a mobilenet_v3_small model, not resnet18" in clash.stderr
    listed = invoke("--list-layers", "-w", ckpt, "--format", "json")
    assert listed.exit_code == 0 and any(r["name"] == "gap" and r["shape"] == [576] for r in json.loads(listed.stdout))


class TrainingArgs:
    """A custom class, as training scripts pickle into checkpoints; unpickling it would run __setstate__."""

    def __init__(self, marker: str):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).write_text("executed")


class Payload:
    """An object whose unpickling runs a builtin (here: creating a file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", [TrainingArgs, Payload])
def test_weights_needing_code_to_unpickle_are_refused(tmp_path, photo_files, resnet18_weights_pth, kind):
    marker = tmp_path / "was_executed"
    weights = tmp_path / "checkpoint.pth"
    torch.save({"model": torch.load(resnet18_weights_pth, weights_only=True), "args": kind(str(marker))}, weights)
    out = tmp_path / "feats"
    result = invoke(photo_files[0], "-o", out, "-l", "gap", *small(weights))
    assert result.exit_code == EXIT_FAILURE
    assert f"refusing to load {weights}: it needs code to unpickle (Unsupported global: GLOBAL " in result.stderr
    assert "weights_only=True" in result.stderr and "weights_only=False" not in result.stderr  # no advice to run it
    assert "Traceback" not in result.stderr
    assert not marker.exists(), "the file's code was executed"
    assert not out.exists()


@pytest.mark.parametrize(("make", "message"), [
    (lambda p, w: p.write_bytes(b"") and None, "is empty (0 bytes)"),
    (lambda p, w: p.mkdir() or None, "is a folder"),
    (lambda p, w: torch.save({k: v for k, v in torch.load(w, weights_only=True).items() if "layer4" not in k}
                             | {"extra.weight": torch.zeros(1)}, p), "does not fit resnet18: 30 missing keys, "
                                                                       "1 unexpected keys"),
], ids=["empty", "folder", "other-architecture"])
def test_weights_files_that_cannot_serve_say_why_in_one_line(tmp_path, photo_files, resnet18_weights_pth, make,
                                                             message):
    weights = tmp_path / "w.pth"
    make(weights, resnet18_weights_pth)
    result = invoke(photo_files[0], "-o", tmp_path / "feats", *small(weights))
    assert result.exit_code in (EXIT_FAILURE, EXIT_USAGE), result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("torchtool: error: ") and message in first and len(first) < 200, first


# --- end to end, in other processes ---------------------------------------------------------------


def test_end_to_end_through_the_installed_executable(tmp_path, photos_dir, photo_files, resnet18_weights_pth,
                                                     baseline, run_torchtool):
    root = tmp_path / "in"
    shutil.copytree(photos_dir, root)
    (root / "sub" / "z_truncated.jpg").write_bytes(photo_files[0].read_bytes()[:900])
    out = tmp_path / "feats"
    proc = run_torchtool("extract-features", str(root), "-o", str(out), "-m", "resnet18", "-w",
                         str(resnet18_weights_pth), *SIZE, "-l", "layer3,gap", "--workers", "2", "-b", "3", "--json",
                         "--device", "cpu", timeout=GENEROUS_S)
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    summary = json.loads(proc.stdout)  # stdout holds the summary and nothing else (flushed before the quick exit)
    assert not _processes_mentioning(str(out)), "loader workers outlived the command"
    assert (summary["rows"], summary["ok"], summary["skipped"]) == (9, 8, 1)
    assert isinstance(summary["seconds"], (int, float)) and isinstance(summary["images_per_s"], (int, float))
    assert summary["files"] == [str(out / n) for n in ("layer3.npy", "gap.npy", "index.csv", "meta.json")]
    assert all(Path(f).is_file() for f in summary["files"])
    assert "1 of 9 inputs could not be read" in proc.stderr
    rows = index(out)
    assert rows[-1]["path"] == str(root / "sub" / "z_truncated.jpg") and rows[-1]["status"] == "skipped"
    # two loader workers, same rows in the same order as the in-process run
    for name in ("layer3", "gap"):
        arr = load(out, name)
        assert np.isnan(arr[-1]).all()
        np.testing.assert_allclose(arr[:8], load(baseline, name), rtol=1e-4, atol=1e-5)


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line holds ``text`` (the command's forked workers carry its argv)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (proc / "cmdline").read_bytes() and (proc / "stat").read_text().split()[2] != "Z":
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _wait_for_rows(out: Path, rows: int, proc: subprocess.Popen, timeout: float = GENEROUS_S) -> np.ndarray:
    """Poll .state/status.npy until the first ``rows`` rows are recorded (the run still going)."""
    deadline = time.monotonic() + timeout
    status_file = out / ".state" / "status.npy"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1]}"
        if status_file.exists():
            try:
                status = np.load(status_file)
            except (ValueError, OSError, EOFError):  # caught mid-creation
                status = np.zeros(0)
            if len(status) and (status[:rows] != 0).all():
                return status
        time.sleep(0.1)
    raise AssertionError(f"no {rows} rows written within {timeout}s")


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (read from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _many(tmp_path: Path, photo_files: list[Path], n: int) -> Path:
    """A --list of ``n`` rows of the photos: long enough that a run is mid-way when a test kills it."""
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{photo_files[i % len(photo_files)]}\n" for i in range(n)))
    return listing


def test_loader_workers_die_with_a_killed_parent(tmp_path, photo_files, resnet18_weights_pth, torchtool_exe):
    listing = _many(tmp_path, photo_files, 600)
    proc = subprocess.Popen([str(torchtool_exe), "extract-features", "--list", str(listing), "-o", str(tmp_path / "f"),
                             "-m", "resnet18", "-w", str(resnet18_weights_pth), *SIZE, "--workers", "2", "-b", "2",
                             "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    args = ["--list", listing, "-o", tmp_path / "f", *small(resnet18_weights_pth, "-b", "2")]
    try:
        _wait_for_rows(tmp_path / "f", 2, proc)
        workers = _children(proc.pid)
        assert len(workers) >= 2
        second = invoke(*args)  # a second run on the folder a live run holds
        assert second.exit_code == EXIT_FAILURE
        assert f"{tmp_path / 'f'} is in use by another torchtool run (pid {proc.pid})" in second.stderr
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + GENEROUS_S
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.1)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == [], "loader workers outlived their SIGKILLed parent"
    assert meta(tmp_path / "f")["complete"] is False  # killed mid-way
    rerun = invoke(*args)  # the dead run holds nothing: it resumes
    assert rerun.exit_code == 0, rerun.stderr
    assert "resuming" in rerun.stderr and not (tmp_path / "f" / ".torchtool.lock").exists()


def test_fifos_and_folders_named_like_images_are_skipped_not_waited_for(tmp_path, photo_files, resnet18_weights_pth,
                                                                         run_torchtool):
    root = tmp_path / "imgs"
    root.mkdir()
    shutil.copy(photo_files[0], root / "a.jpg")
    os.mkfifo(root / "b_stalled.jpg")  # opening it for reading would block forever
    (root / "c_folder.jpg").mkdir()  # a folder: walked (it is empty), never opened
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'a.jpg'}\n{root / 'b_stalled.jpg'}\n{root / 'c_folder.jpg'}\n")
    for inputs in ([str(root)], ["--list", str(listing)]):
        out = tmp_path / f"f{len(inputs)}"
        proc = run_torchtool("extract-features", *inputs, "-o", str(out), "-m", "resnet18", "-w",
                             str(resnet18_weights_pth), *SIZE, "--workers", "1", "--device", "cpu", timeout=GENEROUS_S)
        assert proc.returncode == EXIT_PARTIAL, proc.stderr
        rows = {Path(r["path"]).name: r for r in index(out)}
        assert rows["a.jpg"]["status"] == "ok"
        assert rows["b_stalled.jpg"]["error"] == "not a regular file: a FIFO"
        if len(inputs) == 2:
            assert rows["c_folder.jpg"]["error"] == "not a regular file: a folder"
        else:
            assert "c_folder.jpg" not in rows


def test_workers_beyond_the_cpus_are_capped_with_one_note(tmp_path, photo_files, resnet18_weights_pth):
    from torchtool.core.runtime import available_cpus

    many = available_cpus() + 6
    result = invoke(*photo_files[:4], "-o", tmp_path / "f", "-l", "gap", *small(resnet18_weights_pth)[:-2],
                    "--workers", str(many))
    assert result.exit_code == 0, result.stderr
    note = f"--workers {many} is more than the {available_cpus()} CPU(s) available here: using {available_cpus()}"
    assert result.stderr.count(note) == 1
    assert "suggested max number of worker" not in result.stderr  # torch's own warning never shows


def test_resume_after_a_kill(tmp_path, photo_files, resnet18_weights_pth, torchtool_exe):
    n = 160  # long enough to be mid-way when the kill comes (8 rows, polled every 0.1 s)
    listing = _many(tmp_path, photo_files, n)
    out = tmp_path / "feats"
    args = ["--list", str(listing), "-o", str(out), "-l", "layer3,gap", *small(resnet18_weights_pth, "-b", "2"),
            "--device", "cpu"]

    proc = subprocess.Popen([str(torchtool_exe), "extract-features", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(out, 8, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=GENEROUS_S)
    assert proc.returncode == -signal.SIGKILL
    status = np.load(out / ".state" / "status.npy")
    done = int((status != 0).sum())
    assert 8 <= done < n and (status[:done] == 1).all() and (status[done:] == 0).all()  # a prefix, in order
    assert meta(out)["complete"] is False

    # another setting on the unfinished output is refused, and leaves it alone
    other = invoke(*[a if a != "layer3,gap" else "gap" for a in args])
    assert other.exit_code == EXIT_USAGE
    assert "unfinished extraction with different settings" in other.stderr
    assert meta(out)["complete"] is False
    assert (np.load(out / ".state" / "status.npy") == status).all()
    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resuming {out}: {done} of {n} rows already done" in resumed.stderr
    info = meta(out)
    assert info["complete"] is True and info["counts"] == {"ok": n, "skipped": 0, "pending": 0}
    assert not (out / ".state").exists()

    reference = tmp_path / "uninterrupted"
    fresh = invoke(*[a if a != str(out) else str(reference) for a in args])
    assert fresh.exit_code == 0, fresh.stderr
    for name in ("layer3", "gap"):
        np.testing.assert_allclose(load(out, name), load(reference, name), rtol=1e-5, atol=1e-6)
    assert (out / "index.csv").read_text() == (reference / "index.csv").read_text()

    done = invoke(*args)
    assert done.exit_code == EXIT_USAGE
    assert "already holds a finished extraction" in done.stderr and "--overwrite" in done.stderr

    redone = invoke(*args, "--overwrite")
    assert redone.exit_code == 0, redone.stderr
    assert "resuming" not in redone.stderr
    for name in ("layer3", "gap"):
        np.testing.assert_allclose(load(out, name), load(reference, name), rtol=1e-5, atol=1e-6)


@pytest.fixture
def unfinished(tmp_path, photo_files, resnet18_weights_pth) -> tuple[list[str], list[Path], Path]:
    """An extraction of 8 rows that --strict stopped at row 4 (a truncated file): rows 0-3 are on disk.

    Returns the arguments that resume it (without --strict), the rows' paths and the output folder.
    """
    truncated = make_bad_files(tmp_path / "bad", photo_files[0])["truncated"]
    paths = [*photo_files[:4], truncated, *photo_files[4:7]]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    out = tmp_path / "feats"
    args = ["--list", str(listing), "-o", str(out), "-l", "layer3,gap", *small(resnet18_weights_pth, "-b", "2")]
    stopped = invoke(*args, "--strict")
    assert stopped.exit_code == EXIT_FAILURE and "cannot read" in stopped.stderr
    status = np.load(out / ".state" / "status.npy")
    assert status.tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and meta(out)["complete"] is False
    return args, paths, out


def test_resume_reads_only_the_missing_rows(unfinished, monkeypatch):
    args, paths, out = unfinished
    opened: list[str] = []
    real_load = images.load_image
    monkeypatch.setattr(loading, "load_image", lambda path, *a, **k: opened.append(str(path)) or real_load(path, *a, **k))
    resumed = invoke(*args)  # --workers 0: every load happens in this process
    assert resumed.exit_code == EXIT_PARTIAL, resumed.stderr  # row 4 is still truncated
    assert opened == [str(p) for p in paths[4:]]
    assert "resuming" in resumed.stderr and "4 of 8 rows already done" in resumed.stderr
    info = meta(out)
    assert info["complete"] is True and info["counts"] == {"ok": 7, "skipped": 1, "pending": 0}
    assert info["config"]["layers"] == ["layer3,gap"] and info["config"]["batch_size"] == 2  # the whole config


def test_quiet_silences_notes_not_warnings(unfinished):
    args, _, _ = unfinished
    resumed = invoke(*args, "--quiet")
    assert resumed.exit_code == EXIT_PARTIAL
    assert "resuming" not in resumed.stderr  # a note
    assert "1 of 8 inputs could not be read" in resumed.stderr  # a warning: the exit code's reason


@pytest.mark.parametrize("change", [
    ["--normalize"], ["--pool", "avg"], ["--image-size", "56"], ["--resize", "80"], ["--dtype", "float16"], "weights",
], ids=["normalize", "pool", "image-size", "resize", "dtype", "weights"])
def test_resuming_with_other_settings_is_refused(unfinished, resnet18_weights_pth, tmp_path, change):
    args, _, out = unfinished
    if change == "weights":  # the same weights under another name still make another run
        copy = tmp_path / "copy.pth"
        shutil.copy(resnet18_weights_pth, copy)
        change = ["-w", str(copy)]
    before = np.load(out / ".state" / "status.npy")
    refused = invoke(*args, *change)
    assert refused.exit_code == EXIT_USAGE, refused.stderr
    assert "unfinished extraction with different settings" in refused.stderr
    assert (np.load(out / ".state" / "status.npy") == before).all() and meta(out)["complete"] is False


# --- full disks and unwritable outputs -------------------------------------------------------------


def test_a_full_disk_fails_before_the_run_and_the_rerun_works(tmp_path, photo_files, resnet18_weights_pth,
                                                               mount_tmpfs):
    disk = mount_tmpfs("1m")
    filler = disk / "someone_elses.bin"
    filler.write_bytes(b"x" * 600_000)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{photo_files[i % 8]}\n" for i in range(40)))  # layer3 at 64 px: 16 KB a row
    args = ["--list", listing, "-l", "layer3", "-o", disk / "feats", *small(resnet18_weights_pth)]
    full = invoke(*args)
    assert full.exit_code == EXIT_FAILURE, full.stderr
    assert full.stderr.startswith(f"torchtool: error: {disk / 'feats'} needs 655.4 KB for the features, ")
    assert "KB free" in full.stderr and "Traceback" not in full.stderr
    assert not (disk / "feats" / "layer3.npy").exists()
    filler.unlink()  # space freed: the same command now runs
    again = invoke(*args)
    assert again.exit_code == 0, again.stderr
    assert load(disk / "feats", "layer3").shape == (40, 256, 4, 4) and np.isfinite(load(disk / "feats", "layer3")).all()


def test_a_write_error_mid_run_is_one_line_and_the_rerun_resumes(tmp_path, photo_files, resnet18_weights_pth,
                                                                 monkeypatch):
    import errno

    out = tmp_path / "feats"
    args = [*photo_files, "-o", out, "-l", "layer3,gap", *small(resnet18_weights_pth, "-b", "2")]
    real_pwrite, calls = os.pwrite, []

    def failing(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("layer3.npy"):
            calls.append(fd)
            if len(calls) == 2:  # batch 2's layer3 rows, once batch 1 is recorded
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    failed = invoke(*args)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert failed.exit_code == EXIT_FAILURE
    assert failed.stderr.splitlines()[0] == f"torchtool: error: no space left on device while writing {out / 'layer3.npy'}"
    assert "Traceback" not in failed.stderr
    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.stderr
    assert "2 of 8 rows already done" in resumed.stderr and meta(out)["complete"] is True


def test_out_that_is_a_file_or_read_only_is_one_line(tmp_path, photo_files, resnet18_weights_pth, mount_tmpfs):
    (tmp_path / "taken").write_text("x")
    as_file = invoke(photo_files[0], "-o", tmp_path / "taken", *small(resnet18_weights_pth))
    assert as_file.exit_code == EXIT_USAGE and f"--out {tmp_path / 'taken'} is a file" in as_file.stderr
    readonly = mount_tmpfs("1m", ro=True)
    denied = invoke(photo_files[0], "-o", readonly / "feats", *small(resnet18_weights_pth))
    assert denied.exit_code == EXIT_FAILURE
    assert denied.stderr.splitlines()[0] == f"torchtool: error: cannot write to --out {readonly / 'feats'}: " \
                                            "read-only file system"


def test_torchrun_two_processes_equal_one(tmp_path, photos_dir, run_python):
    args = [str(photos_dir), "-l", "layer3,gap:bilinear", *small("none", "-b", "2"), "--device", "cpu"]
    out = tmp_path / "two"
    proc = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "torchtool",
                      "extract-features", *args, "-o", str(out), "--json",
                      env={"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}, timeout=GENEROUS_S)  # torchrun's files there
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # rank 0 alone prints the summary
    assert (summary["rows"], summary["ok"], summary["skipped"]) == (8, 8, 0)

    single = tmp_path / "one"
    result = invoke(*args, "-o", single)
    assert result.exit_code == 0, result.stderr
    for name in ("layer3", "gap"):
        np.testing.assert_allclose(load(out, name), load(single, name), rtol=1e-4, atol=1e-5)
    assert (out / "index.csv").read_text() == (single / "index.csv").read_text()
    assert meta(out)["complete"] is True
    assert not (out / ".state").exists()
