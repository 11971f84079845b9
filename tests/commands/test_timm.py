"""timm models in every command (issue 25): names and tags, mistakes, weights files, timm's own preprocessing
and layers, finetune/evaluate round trips, summary and profile.

References are timm's public API on the same weights file: ``timm.create_model`` + ``load_state_dict``,
``timm.data.create_transform(**resolve_data_config({}, model=m, use_test_size=False))``,
``forward_intermediates``, ``forward_head``. Every model is built with random weights (no network).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import GENEROUS_S
from torchtool.cli import app
from torchtool.core.output import EXIT_FAILURE, EXIT_USAGE

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from PIL import Image  # noqa: E402

from tests.commands.test_summary import PEAK_RSS  # noqa: E402
from tests.test_cli import PROBE, _new_modules  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
CPU = ["--device", "cpu"]


def cli(*args):
    """``torchtool ARGS...`` in-process (stdout and stderr apart)."""
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="torchtool")


def error_line(stderr: str) -> str:
    """The one ``torchtool: error:`` line (at most a hint line after it, no traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("torchtool: error: ")]
    assert len(errors) == 1, stderr
    assert len(lines) - errors[0] <= 2, f"more than an error line and a hint:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[errors[0]]


def read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def offline_env(root: Path) -> dict[str, str]:
    """No network, empty caches for timm (Hugging Face Hub) and torch."""
    (root / "hf").mkdir(exist_ok=True)
    (root / "torch_home").mkdir(exist_ok=True)
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "HF_HUB_CACHE": str(root / "hf" / "hub"),
            "TORCH_HOME": str(root / "torch_home")}


# --- data: real photos as JPEG files, random timm weights saved as files ------------------------------


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    """scikit-learn's two photos (640x427) as JPEGs and three crops of them at odd sizes."""
    from sklearn.datasets import load_sample_image

    root = tmp_path_factory.mktemp("timm_photos")
    china, flower = (Image.fromarray(load_sample_image(n)).convert("RGB") for n in ("china.jpg", "flower.jpg"))
    shots = {"a_china.jpg": china, "b_flower.jpg": flower,
             "c_china_wide.jpg": china.crop((13, 57, 314, 230)),  # 301x173
             "d_flower_tall.jpg": flower.crop((121, 40, 218, 251)),  # 97x211
             "e_china_small.jpg": china.crop((400, 190, 459, 251))}  # 59x61: every model scales it up
    for name, image in shots.items():
        image.save(root / name, quality=90)
    return [root / name for name in shots]


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """``timm_weights(name, suffix) -> Path``: timm.create_model(name)'s random state_dict (seeded, with
    BatchNorm statistics that are not 0/1, so a layer that is not loaded shows) as .safetensors or .pth."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("timm_weights")
    made: dict[tuple[str, str], Path] = {}

    def make(name: str, suffix: str) -> Path:
        if (name, suffix) not in made:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False)
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            path = folder / f"{name}{suffix}"
            if suffix == ".safetensors":
                save_file(state, str(path))
            else:
                torch.save(state, path)
            made[name, suffix] = path
        return made[name, suffix]

    return make


@pytest.fixture(scope="module")
def timm_reference(timm_weights, jpegs):
    """``timm_reference(name, suffix) -> (weights file, model, data config, batch of every photo)``: the file
    loaded into timm's own model, the photos through timm's own transform (made once per model)."""
    made: dict[tuple[str, str], tuple] = {}

    def make(name: str, suffix: str):
        if (name, suffix) not in made:
            weights = timm_weights(name, suffix)
            model = timm.create_model(name, pretrained=False)
            model.load_state_dict(read_state(weights))
            model.eval()
            config = timm.data.resolve_data_config({}, model=model, use_test_size=False)
            transform = timm.data.create_transform(**config)
            batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in jpegs])
            made[name, suffix] = weights, model, config, batch
        return made[name, suffix]

    return make


def load(out: Path, layer: str) -> np.ndarray:
    path = out / f"{layer}.npy"
    assert path.exists(), f"{path.name} not among {sorted(p.name for p in out.iterdir())}"
    return np.load(path)


def assert_cosine(got: np.ndarray, want, what: str, at_least: float = 0.99999) -> None:
    want = want.detach().double().numpy()
    assert got.shape == want.shape, what
    a, b = got.reshape(len(got), -1).astype(np.float64), want.reshape(len(want), -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= at_least, f"{what}: cosine {cos}"


# --- start-up, names, listing -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["extract-features", "--help"], ["summary", "--help"]],
                         ids=["help", "extract-features-help", "summary-help"])
def test_help_imports_neither_torch_nor_timm(run_python, args):
    proc = run_python("-c", PROBE, *args)
    assert proc.returncode == 0, proc.stderr
    new = set(_new_modules(proc.stderr))
    assert "torchtool" in new  # the probe sees what the CLI imports
    assert not new & {"torch", "timm", "huggingface_hub", "torchvision", "safetensors"}, sorted(new)


COMMANDS = ["extract-features", "finetune", "evaluate", "summary", "profile"]


@pytest.mark.parametrize("command", COMMANDS)
def test_list_models_prints_timm_and_torchvision_names(command):
    result = cli(command, "--list-models", "timm:*convnext_t*")
    assert result.exit_code == 0, result.stderr
    names = result.stdout.splitlines()
    assert "timm:convnext_tiny" in names
    assert all(fnmatch.fnmatchcase(n, "timm:*convnext_t*") for n in names), names  # stdout: names, nothing else
    assert {n.split(".")[0] for n in names} == {f"timm:{n}" for n in timm.list_models("*convnext_t*")}

    result = cli(command, "--list-models", "resnet*")
    assert result.exit_code == 0, result.stderr
    names = result.stdout.splitlines()
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"} <= set(names)
    assert all(fnmatch.fnmatchcase(n, "resnet*") for n in names), names  # torchvision's: no timm: names


def _with_model(command: str, model: str, photo: Path, data: Path, out: Path) -> list:
    """A cheap, otherwise valid command line of ``command`` with ``model``."""
    return {
        "summary": ["summary", model],
        "profile": ["profile", model, "--input-size", "3,32,32", "--max-time", "0.05", *CPU],
        "extract-features": ["extract-features", photo, "-m", model, "-w", "none", "-o", out, "--workers", "0", *CPU],
        "finetune": ["finetune", data, "--out", out, "-m", model, "-w", "none", "--epochs", "1", "--image-size", "32",
                     "--workers", "0", *CPU],
        "evaluate": ["evaluate", "-m", model, "-w", "none", "-d", data / "val", "--workers", "0", *CPU],
    }[command]


def _tags(text: str) -> bool:
    """At least two of resnet18's real pretrained tags are named in ``text``."""
    return sum(n.split(".", 1)[1] in text for n in timm.list_pretrained("resnet18.*")) >= 2


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("name", "wrong", "helps"), [
    ("timm:convnext_tny", "convnext_tny", lambda text: "timm:convnext_tiny" in text),  # a close match
    ("timm:resnet18.nosuchtag", "nosuchtag", _tags),  # the real tags
], ids=["unknown-name", "unknown-tag"])
def test_an_unknown_name_or_tag_is_one_line_with_what_exists(command, name, wrong, helps, jpegs, digits4, tmp_path):
    out = tmp_path / "out"
    result = cli(*_with_model(command, name, jpegs[0], digits4, out))
    assert result.exit_code == EXIT_USAGE, result.stderr
    assert wrong in error_line(result.stderr)
    assert helps(result.stderr), result.stderr
    assert result.stdout == "" and not out.exists()


# Runs each argv of sys.argv[1] (JSON) through the app in this process; prints [{code, stdout, stderr}].
RUN_MANY = """
import json, sys
from typer.testing import CliRunner
from torchtool.cli import app
print(json.dumps([{"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr}
                  for r in (CliRunner().invoke(app, argv, prog_name="torchtool") for argv in json.loads(sys.argv[1]))]))
"""


def test_without_timm_timm_names_say_how_to_install_and_torchvision_still_works(run_python, jpegs, tmp_path):
    fake = tmp_path / "no_timm"
    (fake / "timm").mkdir(parents=True)
    (fake / "timm" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'timm'\", name='timm')\n")
    out = tmp_path / "feats"
    argvs = [["summary", "timm:resnet18"],
             ["extract-features", str(jpegs[0]), "-m", "timm:resnet18", "-w", "none", "-o", str(out),
              "--workers", "0", *CPU],
             ["summary", "resnet18", "--json"],
             ["summary", "--list-models", "resnet1*"]]
    proc = run_python("-c", RUN_MANY, json.dumps(argvs), env={"PYTHONPATH": str(fake)})
    assert proc.returncode == 0, proc.stderr
    missing_summary, missing_extract, plain, listed = json.loads(proc.stdout)
    for result in (missing_summary, missing_extract):
        assert result["code"] == EXIT_USAGE, result
        error_line(result["stderr"])
        assert "timm" in result["stderr"]
        assert "pip install 'torchtool[timm]'" in result["stderr"] or "pip install timm" in result["stderr"], result
    assert not out.exists()
    assert plain["code"] == 0, plain["stderr"]
    assert json.loads(plain["stdout"])["total_params"] == 11_689_512  # torchvision's resnet18, no timm needed
    assert listed["code"] == 0 and "resnet18" in listed["stdout"].split(), listed


def test_default_weights_offline_name_timms_cache(run_torchtool, jpegs, tmp_path):
    env = offline_env(tmp_path)
    out = tmp_path / "feats"
    proc = run_torchtool("extract-features", str(jpegs[0]), "-m", "timm:resnet18", "-o", str(out),
                         "--workers", "0", *CPU, env=env, timeout=GENEROUS_S)
    assert proc.returncode == EXIT_FAILURE, proc.stderr
    line = error_line(proc.stderr)
    assert "resnet18" in line
    assert env["HF_HUB_CACHE"] in proc.stderr  # where timm (the Hugging Face Hub) keeps the weights
    assert "--weights" in proc.stderr  # the way out: a local file, or none
    assert proc.stdout == "" and not out.exists()


# --- weights files ---------------------------------------------------------------------------------


def test_a_file_from_another_architecture_names_the_key_counts(timm_weights, jpegs, tmp_path):
    weights = timm_weights("seresnet18", ".safetensors")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in timm.create_model("resnet34").state_dict().items()}
    given = {k: v.shape for k, v in read_state(weights).items()}
    missing, unexpected = len(expected.keys() - given.keys()), len(given.keys() - expected.keys())
    assert missing and unexpected  # the premise: both kinds, and no shared key of another shape
    assert all(given[k] == expected[k] for k in given.keys() & expected.keys())
    out = tmp_path / "feats"
    result = cli("extract-features", jpegs[0], "-m", "timm:resnet34", "-w", weights, "-o", out, "--workers", "0", *CPU)
    assert result.exit_code == EXIT_FAILURE, result.stderr
    line = error_line(result.stderr)
    assert f"{missing} missing" in line and f"{unexpected} unexpected" in line, line
    assert not out.exists()


# --- timm's preprocessing and layers, against timm itself --------------------------------------------

PREPROCESS = [
    # timm name, weights file format, what its data config is (the premise of the case)
    pytest.param("resnet18", ".safetensors", {"interpolation": "bicubic", "crop_pct": 0.95, "mean": IMAGENET_MEAN},
                 id="resnet18-crop_pct-0.95"),
    pytest.param("resnet10t", ".pth", {"input_size": (3, 176, 176), "crop_pct": 0.875}, id="176px"),
    pytest.param("vit_small_patch16_224", ".pth", {"mean": (0.5,) * 3, "std": (0.5,) * 3}, id="vit-mean-0.5"),
    pytest.param("tf_efficientnetv2_b3.in21k_ft_in1k", ".safetensors", {"crop_mode": "squash"}, id="squash-tag"),
]


@pytest.mark.parametrize(("name", "suffix", "premise"), PREPROCESS)
def test_logits_equal_timms_model_on_timms_own_transform(tmp_path, jpegs, timm_reference, name, suffix, premise):
    """No preprocessing option given: timm's data config of the name (and tag) is the preprocessing."""
    weights, model, config, batch = timm_reference(name, suffix)
    assert {k: config[k] for k in premise} == premise
    out = tmp_path / "feats"
    result = cli("extract-features", *jpegs, "-m", f"timm:{name}", "-w", weights, "-l", "logits", "--pool", "none",
                 "-o", out, "--workers", "0", "-b", "2", *CPU, "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["ok"]) == (5, 5)
    with torch.no_grad():
        want = model(batch).numpy()
    got = load(out, "logits")
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4, f"max abs diff {np.abs(got - want).max():.3g}"

    info = json.loads((out / "meta.json").read_text())
    assert info["model"] == f"timm:{name}"
    pre = info["preprocess"]  # timm's data config, as stored
    crop = config["input_size"][-1]
    assert (pre["crop_size"], pre["resize_size"]) == (crop, math.floor(crop / config["crop_pct"]))
    assert pre["interpolation"] == config["interpolation"]
    assert pre["mean"] == pytest.approx(config["mean"]) and pre["std"] == pytest.approx(config["std"])
    assert pre.get("crop_mode", "center") == config["crop_mode"]


LAYERS = [
    # timm name, weights file format, a stage, a module name whose output is compared too
    pytest.param("resnet18", ".safetensors", 3, "layer3", id="resnet18"),
    pytest.param("vit_small_patch16_224", ".pth", 5, "blocks.5", id="vit"),
    pytest.param("mobilenetv3_small_100", ".safetensors", 2, "blocks.2", id="mobilenetv3"),
    pytest.param("tf_efficientnet_b0", ".safetensors", 2, "blocks.2", id="untraceable-hooks"),  # FX fails: hooks
]


@pytest.mark.parametrize(("name", "suffix", "stage", "module"), LAYERS)
def test_layers_equal_timms_own_forwards(tmp_path, jpegs, timm_reference, name, suffix, stage, module):
    """stage:K = forward_intermediates, gap = pre-logits, logits = model(x), module names as they are; the
    crop and crop_pct are given (the data config's values), so that only the layers are compared here."""
    rows = [0, 2, 3]
    files = [jpegs[i] for i in rows]
    weights, model, config, batch = timm_reference(name, suffix)
    batch = batch[rows]
    layers = ["logits", "gap", f"stage:{stage}", module]
    out = tmp_path / "feats"
    result = cli("extract-features", *files, "-m", f"timm:{name}", "-w", weights, "-l", ",".join(layers),
                 "--pool", "none", "--image-size", config["input_size"][-1], "--crop-pct", config["crop_pct"],
                 "-o", out, "--workers", "0", "-b", "2", *CPU, "--quiet")
    assert result.exit_code == 0, result.stderr

    captured = {}
    hook = model.get_submodule(module).register_forward_hook(lambda m, i, o: captured.update(module=o))
    try:
        with torch.no_grad():
            logits = model(batch)
            pre_logits = model.forward_head(model.forward_features(batch), pre_logits=True)
            [fmap] = model.forward_intermediates(batch, indices=[stage], intermediates_only=True)
    finally:
        hook.remove()  # the model is shared with other tests
    got = load(out, "logits")
    assert got.shape == tuple(logits.shape)
    assert np.abs(got - logits.numpy()).max() <= 1e-4, f"max abs diff {np.abs(got - logits.numpy()).max():.3g}"
    assert_cosine(load(out, "gap"), pre_logits, "gap")
    assert_cosine(load(out, f"stage:{stage}"), fmap, f"stage:{stage}")
    assert_cosine(load(out, module), captured["module"], module)


@pytest.mark.parametrize(("model", "node"), [("timm:resnet18", "layer3"),
                                             ("timm:vit_small_patch16_224.augreg_in21k", "blocks.5"),
                                             ("timm:tf_efficientnetv2_b3.in21k_ft_in1k", "blocks.2")],
                         ids=["resnet18", "vit-in21k-tag", "efficientnetv2-tag"])
def test_list_layers_offers_gap_logits_and_timms_stages(model, node):
    result = cli("extract-features", "--list-layers", "-m", model, "-w", "none", "--format", "json")
    assert result.exit_code == 0, result.stderr
    shapes = {row["name"]: row["shape"] for row in json.loads(result.stdout)}
    with torch.device("meta"):
        reference = timm.create_model(model.removeprefix("timm:"))  # the tag's head: 21843 classes for in21k
    channels = [info["num_chs"] for info in reference.feature_info]  # a FeatureInfo or a list of dicts
    assert {n for n in shapes if n.startswith("stage:")} == {f"stage:{k}" for k in range(len(channels))}
    assert [shapes[f"stage:{k}"][0] for k in range(len(channels))] == channels
    assert shapes["gap"] == [getattr(reference, "head_hidden_size", reference.num_features)]
    assert shapes["logits"] == [reference.num_classes]
    assert any(n == node or n.startswith(node + ".") for n in shapes), node  # its module, or nodes in it


# --- finetune, and its checkpoint in evaluate and extract-features --------------------------------------

TRAIN = ["--model", "timm:resnet18", "--image-size", "32", "--crop-pct", "1.0", "--batch-size", "16",
         "--workers", "0", "--augment", "none", *CPU, "--quiet", "--json"]


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, digits4) -> tuple[Path, dict]:
    """(run folder, finetune's summary): timm:resnet18 from random weights, 2 epochs on 4 digits at 32 px."""
    out = tmp_path_factory.mktemp("timm_finetune") / "run"
    result = cli("finetune", digits4, "--out", out, *TRAIN, "--weights", "none", "--epochs", "2")
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def test_finetune_checkpoint_holds_timms_model(timm_run):
    out, summary = timm_run
    assert summary["classes"] == 4 and summary["epochs"] == 2
    ckpt = torch.load(out / "best.pth", weights_only=True)
    assert ckpt["arch"] == "timm:resnet18"
    assert ckpt["timm_version"] == timm.__version__
    assert ckpt["classes"] == ["0", "1", "2", "3"]
    with torch.device("meta"):
        reference = timm.create_model("resnet18", num_classes=4).state_dict()
    assert {k: tuple(v.shape) for k, v in ckpt["model"].items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert tuple(ckpt["model"]["fc.weight"].shape) == (4, 512)  # timm's head, for the dataset's classes
    pre = ckpt["preprocess"]
    assert pre["crop_size"] == 32 and pre["interpolation"] == "bicubic"  # timm's resnet18: bicubic, ImageNet's
    assert pre["mean"] == pytest.approx(IMAGENET_MEAN)


def test_checkpoint_rebuilds_offline_in_evaluate_and_extract_features(timm_run, digits4, run_torchtool, tmp_path):
    out, summary = timm_run
    proc = run_torchtool("evaluate", str(out / "best.pth"), "--json", "--workers", "0", *CPU, "--quiet",
                         env=offline_env(tmp_path), timeout=GENEROUS_S)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["images"] == summary["val_images"] == 16
    assert report["accuracy"] == pytest.approx(summary["best_val_acc"], abs=1e-9)

    # extract-features with the checkpoint alone: its model, its head, its (timm's) preprocessing
    ckpt = torch.load(out / "best.pth", weights_only=True)
    files = sorted((digits4 / "val").rglob("*.png"))
    feats = tmp_path / "feats"
    result = cli("extract-features", *files, "-w", out / "best.pth", "-l", "logits", "-o", feats, "--workers", "0",
                 *CPU, "--quiet")
    assert result.exit_code == 0, result.stderr
    model = timm.create_model("resnet18", num_classes=4)
    model.load_state_dict(ckpt["model"])
    model.eval()
    pre = ckpt["preprocess"]
    transform = timm.data.create_transform(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=1.0,
                                           mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    with torch.no_grad():
        want = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files])).numpy()
    got = load(feats, "logits")
    assert got.shape == (16, 4) and np.abs(got - want).max() <= 1e-4
    assert json.loads((feats / "meta.json").read_text())["model"] == "timm:resnet18"


def test_evaluate_model_option_with_a_plain_weights_file(timm_run, digits4, tmp_path):
    from safetensors.torch import save_file

    out, summary = timm_run
    plain = tmp_path / "resnet18_digits.safetensors"  # a bare state_dict: the head's size says 4 classes
    state = torch.load(out / "best.pth", weights_only=True)["model"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(plain))
    result = cli("evaluate", "-m", "timm:resnet18", "-w", plain, "-d", digits4 / "val", "--image-size", "32",
                 "--crop-pct", "1.0", "--json", "--workers", "0", *CPU, "--quiet")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 16
    assert report["accuracy"] == pytest.approx(summary["best_val_acc"], abs=1e-9)


def test_freeze_backbone_trains_only_timms_head(digits4, timm_weights, tmp_path):
    start = timm_weights("resnet18", ".safetensors")  # 1000 classes: the head is replaced
    result = cli("finetune", digits4, "--out", tmp_path / "run", *TRAIN, "--weights", start, "--epochs", "1",
                 "--freeze-backbone")
    assert result.exit_code == 0, result.stderr
    trained = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model"]
    initial = read_state(start)
    assert set(trained) == set(initial)
    assert tuple(trained["fc.weight"].shape) == (4, 512)
    changed = [k for k in initial if not k.startswith("fc.") and not torch.equal(initial[k], trained[k])]
    assert changed == []  # weights and BatchNorm statistics of the backbone as loaded


# --- summary and profile -------------------------------------------------------------------------------


def test_summary_resnet50_macs_match_torchinfo():
    from torchinfo import summary as torchinfo_summary

    result = cli("summary", "timm:resnet50", "--input-size", "3,224,224", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    model = timm.create_model("resnet50")
    expected = torchinfo_summary(model, (1, 3, 224, 224), verbose=0).total_mult_adds
    assert abs(report["macs"] - expected) <= 0.01 * expected, (report["macs"], expected)
    assert report["total_params"] == sum(p.numel() for p in model.parameters())


def test_summary_vit_counts_attention_and_tags():
    result = cli("summary", "timm:vit_small_patch16_224", "--input-size", "3,224,224", "--json")
    assert result.exit_code == 0, result.stderr
    macs = json.loads(result.stdout)["macs"]

    with torch.device("meta"):
        model = timm.create_model("vit_small_patch16_224")
    layer_macs = []  # Linear and Conv2d MACs from their output shapes: output elements x inputs per output

    def count(module, inputs, output):
        per_output = module.in_features if isinstance(module, torch.nn.Linear) else \
            module.in_channels // module.groups * math.prod(module.kernel_size)
        layer_macs.append(output.numel() * per_output)

    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    attention = len(model.blocks) * 2 * tokens * tokens * model.embed_dim  # q @ k^T and attn @ v
    assert macs > sum(layer_macs) + attention / 2, (macs, sum(layer_macs), attention)
    assert macs == pytest.approx(sum(layer_macs) + attention, rel=0.01)

    tagged = cli("summary", "timm:vit_small_patch16_224.augreg_in21k", "--input-size", "3,224,224", "--json")
    assert tagged.exit_code == 0, tagged.stderr
    with torch.device("meta"):
        in21k = timm.create_model("vit_small_patch16_224.augreg_in21k")  # 21843 classes
    assert json.loads(tagged.stdout)["total_params"] == sum(p.numel() for p in in21k.parameters())


def test_summary_of_a_billion_parameter_vit_in_little_memory(run_python):
    proc = run_python("-c", PEAK_RSS, "summary", "timm:vit_giant_patch14_224", "--depth", "1", "--json",
                      timeout=GENEROUS_S)
    assert proc.returncode == 0, proc.stderr
    with torch.device("meta"):
        params = sum(p.numel() for p in timm.create_model("vit_giant_patch14_224").parameters())
    assert params > 1e9
    assert json.loads(proc.stdout)["total_params"] == params
    peak = int(re.search(r"peak_rss_kib (\d+)", proc.stderr).group(1)) * 1024
    assert peak < 2 << 30, f"peak RSS {peak / 2**20:.0f} MiB"


def test_profile_a_timm_model():
    result = cli("profile", "timm:resnet18", "--input-size", "3,64,64", "--batch-size", "2", *CPU,
                 "--max-time", "0.05", "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "timm:resnet18" and report["device"] == "cpu" and report["input_size"] == [[3, 64, 64]]
    forward = report["forward"]
    assert forward["runs"] >= 5 and forward["samples_per_s"] == pytest.approx(2 / (forward["median_ms"] / 1e3))
