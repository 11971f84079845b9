"""torchtool env-info, through the Typer app, and the core functions behind it."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
import types
from importlib import metadata

import pytest
from typer.testing import CliRunner

from torchtool.cli import app
from torchtool.core import env

torch = pytest.importorskip("torch")

KEYS = [
    "torch.version", "torch.debug_build", "torch.cuda_build", "torch.cudnn_benchmark", "torch.cudnn_deterministic",
    "cuda.available", "cuda.device_count", "cuda.cudnn_version", "cuda.nccl_version", "cuda.gpus",
    "nvidia.driver_version", "mps_available", "xpu_available",
    "cpu.model", "cpu.logical_cores", "cpu.torch_threads", "cpu.capability", "cpu.mkl", "cpu.mkldnn", "cpu.openmp",
    "system.os", "system.python", "system.libc",
    "packages.torchvision", "packages.numpy", "packages.pillow", "packages.scikit_learn", "packages.typer",
    "packages.tqdm", "environment",
]


def invoke(*args: str):
    return CliRunner().invoke(app, ["env-info", *args], prog_name="torchtool")


def lookup(data: dict, dotted: str):
    for part in dotted.split("."):
        assert part in data, f"missing key {dotted!r}"
        data = data[part]
    return data


@pytest.fixture(scope="module")
def info() -> dict:
    result = invoke("--format", "json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)


# --- the report ---------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_json_has_key(info, key):
    lookup(info, key)


def test_json_values_describe_this_machine(info):
    assert info["torch"]["version"] == torch.__version__
    assert info["torch"]["cuda_build"] == torch.version.cuda
    assert info["cuda"]["available"] is torch.cuda.is_available()
    assert info["cuda"]["device_count"] == torch.cuda.device_count()
    assert len(info["cuda"]["gpus"]) == torch.cuda.device_count()
    assert info["cpu"]["logical_cores"] == os.cpu_count()
    assert info["cpu"]["torch_threads"] == torch.get_num_threads()
    assert info["system"]["python"] == platform.python_version()
    assert info["packages"]["typer"] == metadata.version("typer")
    assert info["packages"]["scikit_learn"] == metadata.version("scikit-learn")


def test_json_numbers_are_numbers(info):
    for key in ("cuda.device_count", "cpu.logical_cores", "cpu.torch_threads"):
        value = lookup(info, key)
        assert isinstance(value, int) and not isinstance(value, bool), key
    assert info["cuda"]["cudnn_version"] is None or isinstance(info["cuda"]["cudnn_version"], int)
    for key in ("torch.debug_build", "cuda.available", "mps_available", "xpu_available", "cpu.mkl"):
        assert isinstance(lookup(info, key), bool), key
    for gpu in info["cuda"]["gpus"]:
        assert isinstance(gpu["total_memory_mib"], int)


def test_json_flag_is_the_same_report(info):
    result = invoke("--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout).keys() == info.keys()


def test_environment_lists_only_relevant_variables(info, monkeypatch):
    # `info` first: CUDA is initialised before CUDA_VISIBLE_DEVICES changes here.
    import torchtool

    # the environment as the user set it when torchtool started (env-info reports that, not later edits)
    for name, value in {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0"), "OMP_NUM_THREADS": "3",
                        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "MY_UNRELATED_SETTING": "42"}.items():
        monkeypatch.setenv(name, value)
        monkeypatch.setitem(torchtool.STARTUP_ENVIRON, name, value)
    result = invoke("--format", "json")
    environment = json.loads(result.stdout)["environment"]
    assert environment["CUDA_VISIBLE_DEVICES"] == os.environ["CUDA_VISIBLE_DEVICES"]
    assert environment["OMP_NUM_THREADS"] == "3"
    assert environment["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "MY_UNRELATED_SETTING" not in environment
    assert "HOME" not in environment and "PATH" not in environment


@pytest.mark.parametrize("flag", [True, False])
def test_cudnn_flags_reflect_torch_settings(info, monkeypatch, flag):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", flag)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", not flag)
    report = json.loads(invoke("--json").stdout)["torch"]
    assert report["cudnn_benchmark"] is flag
    assert report["cudnn_deterministic"] is (not flag)


# --- formats -------------------------------------------------------------------------


def test_markdown_is_pasteable(info):
    result = invoke("--format", "markdown")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "<details><summary>torchtool env-info</summary>"
    assert lines[-1] == "</details>"
    assert "- **torch**:" in lines
    assert f"  - version: {torch.__version__}" in lines


def test_csv_is_one_flat_record(info):
    result = invoke("--format", "csv")
    assert result.exit_code == 0
    header, row, *rest = csv.reader(io.StringIO(result.stdout))
    assert rest == []
    record = dict(zip(header, row))
    assert record["torch.version"] == torch.__version__
    assert record["cpu.logical_cores"] == str(os.cpu_count())
    assert record["packages.typer"] == metadata.version("typer")


def test_jsonl_is_one_line(info):
    result = invoke("--format", "jsonl")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["torch"] == info["torch"]


def test_table_is_the_default(info):
    result = invoke()
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert "torch:" in lines and "cpu:" in lines
    assert any(line.split() == ["version", torch.__version__] for line in lines)
    assert result.stdout == invoke("--format", "table").stdout


# --- requirements ---------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_require_cuda_fails_without_a_gpu(info):
    result = invoke("--format", "json", "--require", "cuda")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["cuda"]["available"] is False  # the report is still printed
    lines = result.stderr.splitlines()
    assert lines[0].startswith("torchtool: error: CUDA is not available")
    assert len(lines) == 2 and lines[1].startswith("  hint: ")


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_min_gpus_fails_without_a_gpu(info):
    result = invoke("--json", "--min-gpus", "1")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == "torchtool: error: 1 GPU(s) required, 0 visible"


def _machine(monkeypatch, cuda: bool, gpus: int) -> None:
    """env-info's real report, with the CUDA section of a machine that has (or lacks) ``gpus`` GPUs."""
    real = env.collect

    def collect() -> dict:
        info = real()
        info["cuda"].update(available=cuda, device_count=gpus, cudnn_version=90100 if cuda else None)
        if not cuda:
            info["cuda"]["reason"] = "no NVIDIA driver"
        return info

    monkeypatch.setattr(env, "collect", collect)


@pytest.mark.parametrize("spelling", ["cuda", "CUDA", "Cuda"])
def test_requirements_are_case_insensitive(monkeypatch, spelling):
    _machine(monkeypatch, cuda=False, gpus=0)
    missing = invoke("--json", "--require", spelling)
    assert missing.exit_code == 1, missing.output
    assert missing.stderr.startswith("torchtool: error: CUDA is not available: no NVIDIA driver")
    _machine(monkeypatch, cuda=True, gpus=1)
    met = invoke("--json", "--require", spelling, "--require", spelling.replace("cuda", "cudnn").replace(
        "CUDA", "CUDNN").replace("Cuda", "Cudnn"))
    assert met.exit_code == 0, met.output


def test_requirements_that_are_met_exit_0(monkeypatch):
    _machine(monkeypatch, cuda=True, gpus=2)
    met = invoke("--json", "--require", "cuda", "--require", "cudnn", "--min-gpus", "2")
    assert met.exit_code == 0 and met.stderr == ""
    assert json.loads(met.stdout)["cuda"]["device_count"] == 2  # the report is the one checked
    short = invoke("--json", "--require", "cuda", "--min-gpus", "3")
    assert short.exit_code == 1
    assert short.stderr.splitlines()[0] == "torchtool: error: 3 GPU(s) required, 2 visible"


def test_unknown_requirement_is_a_usage_error():
    result = invoke("--require", "bogus")
    assert result.exit_code == 2
    assert result.stdout == ""  # refused before any work
    assert result.stderr.splitlines() == ["torchtool: error: unknown requirement 'bogus'",
                                          "  hint: choose from: cuda, cudnn, mps, xpu"]


# --- core.env ----------------------------------------------------------------------------


def synthetic(cuda: bool, gpus: int = 0) -> dict:
    section = {"available": cuda, "device_count": gpus, "cudnn_version": 90100 if cuda else None,
               "nccl_version": "2.21.5" if cuda else None, "gpus": [{"index": i} for i in range(gpus)]}
    if not cuda:
        section["reason"] = "torch was built without CUDA"
    return {"cuda": section, "mps_available": False, "xpu_available": False}


def test_check_requirements_met_with_cuda():
    assert env.check_requirements(synthetic(True, 2), ["cuda", "cudnn"], min_gpus=2) == []
    assert env.check_requirements(synthetic(True, 2), ["CUDA"]) == []


def test_check_requirements_reports_each_missing_thing():
    assert env.check_requirements(synthetic(True, 2), ["mps", "xpu"], min_gpus=4) == [
        "MPS is not available", "XPU is not available", "4 GPU(s) required, 2 visible"]


def test_check_requirements_without_cuda():
    reasons = env.check_requirements(synthetic(False), ["cuda", "cudnn"], min_gpus=1)
    assert reasons == ["CUDA is not available: torch was built without CUDA", "cuDNN is not available (no CUDA)",
                       "1 GPU(s) required, 0 visible"]


def test_check_requirements_when_the_gpu_count_could_not_be_read():
    info = synthetic(True, 1)
    info["cuda"]["device_count"] = "unavailable: RuntimeError: driver too old"
    assert env.check_requirements(info, [], min_gpus=1)[0].startswith("1 GPU(s) required")
    info["cuda"]["cudnn_version"] = "unavailable: OSError"
    assert env.check_requirements(info, ["cudnn"]) == ["cuDNN is not available"]


def test_nvml_info_never_raises_here():
    facts = env.nvml_info()
    assert set(facts) >= {"driver_version", "error"}
    assert (facts["driver_version"] is None) == (facts["error"] is not None)


def _fake_pynvml(**overrides) -> types.SimpleNamespace:
    calls = []
    module = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlSystemGetCudaDriverVersion_v2=lambda: 12040,
        nvmlDeviceGetCount=lambda: 2,
        calls=calls,
    )
    for name, value in overrides.items():
        setattr(module, name, value)
    return module


def _raise(exc):
    def fail():
        raise exc
    return fail


def test_nvml_info_reads_the_driver(monkeypatch):
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert env.nvml_info() == {"driver_version": "550.54.15", "driver_cuda_version": "12.4", "device_count": 2,
                               "error": None}
    assert fake.calls == ["init", "shutdown"]


@pytest.mark.parametrize(
    ("fake", "error"),
    [
        (None, "nvidia-ml-py is not installed"),
        (_fake_pynvml(nvmlInit=_raise(RuntimeError("Driver Not Loaded"))), "NVML unavailable (Driver Not Loaded)"),
        (_fake_pynvml(nvmlSystemGetDriverVersion=_raise(RuntimeError("GPU is lost"))), "NVML query failed (GPU is lost)"),
    ],
    ids=["not-installed", "no-driver", "query-fails"],
)
def test_nvml_info_explains_failures(monkeypatch, fake, error):
    monkeypatch.setitem(sys.modules, "pynvml", fake)  # None makes `import pynvml` raise ImportError
    assert env.nvml_info() == {"driver_version": None, "error": error}


def test_ld_library_path_is_reported_as_the_user_set_it(monkeypatch):
    import torchtool

    monkeypatch.setitem(torchtool.STARTUP_ENVIRON, "LD_LIBRARY_PATH", "/opt/mine/lib")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/mine/lib")
    import cv2  # noqa: F401  (its import prepends its own folder to LD_LIBRARY_PATH)

    monkeypatch.setenv("LD_LIBRARY_PATH", "/site-packages/cv2/../../lib64:/opt/mine/lib")  # what cv2 leaves
    environment = json.loads(invoke("--json").stdout)["environment"]
    assert environment["LD_LIBRARY_PATH"] == "/opt/mine/lib"


def test_the_package_list_includes_triton_and_matplotlib():
    versions = env.package_versions()
    assert versions["matplotlib"] == metadata.version("matplotlib")
    assert "triton" in versions  # None where it is not installed (CPU-only torch)


def test_package_versions_use_snake_case_keys():
    versions = env.package_versions()
    assert versions["torch"] == metadata.version("torch")
    assert "scikit_learn" in versions and "scikit-learn" not in versions
    assert all("-" not in key for key in versions)
