"""Environment facts for bug reports and scripts, as one JSON-ready dict.

Everything is read in-process (no subprocess): torch's own build info, NVML for the
driver, package metadata for versions. A failing probe never raises: its field says why.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any

# Variables that change how PyTorch, CUDA, NCCL or the BLAS libraries behave.
ENV_PREFIXES = ("CUDA_", "TORCH_", "PYTORCH_", "NCCL_", "CUBLAS_", "CUDNN_", "NVIDIA_", "TORCHINDUCTOR_")
ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KMP_AFFINITY",
             "LD_LIBRARY_PATH", "TORCH_HOME", "XDG_CACHE_HOME", "HIP_VISIBLE_DEVICES",
             "ROCR_VISIBLE_DEVICES", "HF_HOME", "HF_HUB_OFFLINE", "TORCHTOOL_DEBUG")
PACKAGES = ("torch", "torchvision", "triton", "numpy", "pillow", "opencv-python-headless", "opencv-python",
            "scikit-learn", "matplotlib", "typer", "tqdm", "safetensors", "nvidia-ml-py", "timm", "huggingface-hub")

REQUIREMENTS = ("cuda", "cudnn", "mps", "xpu")


def _safe(probe: Callable[[], Any]) -> Any:
    """Run a probe; on any failure return a string saying why instead of raising."""
    try:
        return probe()
    except Exception as exc:  # a broken driver or library must not break the report
        return f"unavailable: {type(exc).__name__}: {exc}".strip()


def package_versions() -> dict[str, str | None]:
    """Installed versions from package metadata (nothing is imported); keys are snake_case."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        key = name.replace("-", "_")
        try:
            out[key] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if not name.startswith("opencv"):  # either opencv flavour provides cv2
                out[key] = None
    return out


def run_versions() -> dict[str, str]:
    """The versions a run's results depend on, for the files it writes (meta.json, config.json)."""
    import numpy
    import torch
    import torchvision

    from torchtool import __version__

    versions = {"torchtool": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                "numpy": numpy.__version__, "python": platform.python_version()}
    timm = sys.modules.get("timm")  # imported only when a timm: model is in use
    return versions | ({"timm": timm.__version__} if timm is not None else {})


def environment_variables() -> dict[str, str]:
    """The variables that change PyTorch's behaviour, as the user set them (not as a library's import
    changed them since: OpenCV prepends its own folder to LD_LIBRARY_PATH)."""
    from torchtool import STARTUP_ENVIRON

    return {k: v for k, v in sorted(STARTUP_ENVIRON.items()) if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _os_name() -> str:
    try:
        info = platform.freedesktop_os_release()
        return info.get("PRETTY_NAME") or f"{info.get('NAME', '')} {info.get('VERSION', '')}".strip()
    except (OSError, AttributeError):
        return platform.platform()


def nvml_info() -> dict[str, Any]:
    """NVIDIA driver facts through NVML; ``error`` says why when there is no driver."""
    try:
        import pynvml
    except ImportError:
        return {"driver_version": None, "error": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return {"driver_version": None, "error": f"NVML unavailable ({exc})"}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        return {
            "driver_version": driver.decode() if isinstance(driver, bytes) else driver,
            "driver_cuda_version": f"{cuda // 1000}.{(cuda % 1000) // 10}",
            "device_count": pynvml.nvmlDeviceGetCount(),
            "error": None,
        }
    except Exception as exc:
        return {"driver_version": None, "error": f"NVML query failed ({exc})"}
    finally:
        _safe(pynvml.nvmlShutdown)


def _gpus(torch: Any) -> list[dict[str, Any]]:
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({
            "index": i,
            "name": p.name,
            "compute_capability": f"{p.major}.{p.minor}",
            "total_memory_mib": p.total_memory // (1024 * 1024),
            "multiprocessor_count": p.multi_processor_count,
        })
    return gpus


def _nccl_version(torch: Any) -> str | None:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _cuda_section(torch: Any) -> dict[str, Any]:
    available = _safe(torch.cuda.is_available)
    section: dict[str, Any] = {"available": available is True}
    if available is not True:
        section["reason"] = available if isinstance(available, str) else (
            "torch was built without CUDA" if torch.version.cuda is None and torch.version.hip is None
            else "no CUDA device visible (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them)")
    section["device_count"] = _safe(torch.cuda.device_count) if available is True else 0
    section["cudnn_version"] = _safe(torch.backends.cudnn.version) if torch.backends.cudnn.is_available() else None
    section["nccl_version"] = _safe(lambda: _nccl_version(torch)) if torch.version.cuda else None
    section["gpus"] = _safe(lambda: _gpus(torch)) if available is True else []
    return section


def collect() -> dict[str, Any]:
    """Everything env-info reports, as a JSON-ready dict with stable snake_case keys."""
    import torch

    cpu_capability = _safe(torch.backends.cpu.get_cpu_capability)
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return {
        "torchtool_version": _safe(lambda: metadata.version("torchtool")),
        "torch": {
            "version": torch.__version__,
            "debug_build": bool(torch.version.debug),
            "git_version": torch.version.git_version,
            "cuda_build": torch.version.cuda,
            "hip_build": torch.version.hip,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        },
        "cuda": _cuda_section(torch),
        "nvidia": nvml_info(),
        "mps_available": bool(mps and _safe(mps.is_available) is True),
        "xpu_available": bool(xpu and _safe(xpu.is_available) is True),
        "cpu": {
            "model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "capability": cpu_capability,
            "mkl": torch.backends.mkl.is_available(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "openmp": torch.backends.openmp.is_available(),
        },
        "system": {
            "os": _os_name(),
            "kernel": platform.release(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "libc": " ".join(platform.libc_ver()).strip() or None,
        },
        "packages": package_versions(),
        "environment": environment_variables(),
    }


def check_requirements(info: dict[str, Any], require: list[str], min_gpus: int = 0) -> list[str]:
    """Reasons why ``info`` does not meet the requirements; empty when all are met."""
    reasons = []
    cuda = info["cuda"]
    for need in require:
        need = need.lower()
        if need == "cuda" and not cuda["available"]:
            reasons.append(f"CUDA is not available: {cuda.get('reason', 'unknown reason')}")
        elif need == "cudnn" and not (cuda["available"] and isinstance(cuda["cudnn_version"], int)):
            reasons.append("cuDNN is not available" + ("" if cuda["available"] else " (no CUDA)"))
        elif need == "mps" and not info["mps_available"]:
            reasons.append("MPS is not available")
        elif need == "xpu" and not info["xpu_available"]:
            reasons.append("XPU is not available")
    if min_gpus and (cuda["device_count"] if isinstance(cuda["device_count"], int) else 0) < min_gpus:
        reasons.append(f"{min_gpus} GPU(s) required, {cuda['device_count'] or 0} visible")
    return reasons
