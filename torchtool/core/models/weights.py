"""What ``--weights`` means: a pretrained enum member (through torchvision's cache), a local file, or none.

Pretrained files live where torchvision keeps them (TORCH_HOME); when one cannot be
downloaded the error names the expected file and the ``--weights PATH`` / ``none`` ways out.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtool.core.models.checkpoint import WeightsFile, read_weights_file
from torchtool.core.models.names import check_arch, weights_enum
from torchtool.core.models.timm_models import is_timm, pretrained_cfg, timm_name
from torchtool.core.output import Failure, UsageError


@dataclass
class WeightsChoice:
    """What ``--weights`` resolved to: an enum member, a local file, or nothing."""

    kind: str  # "pretrained" | "file" | "none"
    label: str
    enum: Any = None
    file: WeightsFile | None = None

    @property
    def arch(self) -> str | None:
        return self.file.arch if self.file else None


def resolve_weights(arch: str | None, spec: str) -> WeightsChoice:
    """Turn a ``--weights`` value into a :class:`WeightsChoice` (reads local files)."""
    if spec.lower() == "none":
        return WeightsChoice("none", "none")
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt") or path.exists() or os.sep in spec:
        wf = read_weights_file(path)
        return WeightsChoice("file", str(path.resolve()), file=wf)
    if arch is None:
        raise UsageError("--model is required unless --weights is a torchtool checkpoint")
    if is_timm(arch):
        return _timm_weights(check_arch(arch), spec)
    enum = weights_enum(check_arch(arch))
    names = [m for m in enum.__members__]
    key = spec.split(".")[-1]
    if key not in enum.__members__:
        raise UsageError(f"{arch} has no weights named {spec!r}",
                         hint=f"choose from: {', '.join(names)}, none, or a local file")
    member = enum[key]
    return WeightsChoice("pretrained", f"{type(member).__name__}.{member.name}", enum=member)


def _timm_weights(arch: str, spec: str) -> WeightsChoice:
    """A timm model's pretrained weights are its tag's (``timm:NAME.TAG``): DEFAULT is the only name."""
    if spec.upper() != "DEFAULT":
        raise UsageError(f"{arch} takes its pretrained weights from the name's tag, not --weights {spec}",
                         hint=f"pass --model {arch}.TAG --weights DEFAULT (list the tags with --list-models "
                         f"'{arch}.*'), none, or a local file")
    cfg = pretrained_cfg(arch)
    tag = f"{cfg.get('architecture')}.{cfg.get('tag')}" if cfg.get("tag") else timm_name(arch)
    if not cfg.get("url") and not cfg.get("hf_hub_id") and not cfg.get("file"):
        raise UsageError(f"{arch} has no pretrained weights in timm", hint="pass --weights none or a local file")
    return WeightsChoice("pretrained", f"timm:{tag}")


def cached_weights_path(member: Any) -> Path:
    """Where torchvision keeps (or will keep) ``member``'s file under TORCH_HOME."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(member.url)


def ensure_downloaded(member: Any) -> Path:
    """Fetch ``member`` into torchvision's cache unless it is there; fail clearly when offline."""
    import torch

    path = cached_weights_path(member)
    if path.is_file():
        return path
    try:
        # torch.hub says "Downloading: ..." on stdout; stdout is for data (`--json | jq` must not break)
        with contextlib.redirect_stdout(sys.stderr):
            torch.hub.load_state_dict_from_url(member.url, progress=True, check_hash=True, map_location="cpu")
    except Exception as exc:  # URLError, timeouts, hash mismatch: all mean "not available here"
        raise Failure(
            f"cannot download {type(member).__name__}.{member.name} ({exc.__class__.__name__}: {str(exc)[:120]})",
            hint=f"torchvision expected the file at {path}; copy it there, or pass --weights PATH for a local "
            "file, or --weights none for random initialisation",
        ) from None
    return path


