"""Checkpoints: atomic save, safe load (``weights_only``), weight files of any common shape.

A torchtool checkpoint is a plain dict (tensors and plain types only, so
``torch.load(weights_only=True)`` reads it) with at least::

    {"format": FORMAT, "arch": "resnet18", "classes": [...], "model": state_dict,
     "preprocess": {...}, "config": {...}}

finetune adds optimizer/scheduler/scaler/RNG state; evaluate and extract-features only
need arch, classes, preprocess and model.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtool.core.files import atomic_save
from torchtool.core.output import Failure, UsageError, warn

FORMAT = "torchtool.checkpoint/1"
# Where common training scripts nest the weights inside a checkpoint dict.
_NESTED_KEYS = ("model", "state_dict", "model_state_dict", "model_ema", "net")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` with torch.save atomically (a crash mid-write keeps the old file)."""
    atomic_save(path, lambda tmp: write_checkpoint(tmp, state))
    return Path(path)


def write_checkpoint(file: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save ``state`` as a torchtool checkpoint into ``file`` itself (a caller's atomic temporary)."""
    import torch

    torch.save({"format": FORMAT, **state}, file)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a file that needs code to unpickle is refused."""
    import pickle

    import torch

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a weights file", hint="give the .pth/.pt/.safetensors file itself")
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise Failure(f"{path} is empty (0 bytes)", hint="a write of it was cut short; use another copy")
    with warnings.catch_warnings(record=True) as said:  # torch's notes, said in our words below
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _refusal(path, str(exc), said) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            if any("TorchScript archive" in str(w.message) for w in said):
                raise Failure(f"{path} is a TorchScript archive (torch.jit.save), not a weights file",
                              hint="save the model's weights instead: torch.save(model.state_dict(), path), "
                              "or as .safetensors") from None
            raise Failure(f"cannot read {path}: {exc}".splitlines()[0], hint="is it a PyTorch weights file?") from None
    for note in {str(w.message).splitlines()[0] for w in said if "pickle protocol" not in str(w.message)}:
        warn(f"{path}: {note}")  # the pickle-protocol note is about a risk the load above did not meet
    return state


def _refusal(path: Path, message: str, said: list[warnings.WarningMessage]) -> Failure:
    """Why the safe loader refused ``path``, in one line: newer pickle instructions, or code to run."""
    protocol = next((re.search(r"pickle protocol (\d+)", str(w.message)) for w in said
                     if "pickle protocol" in str(w.message)), None)
    if protocol and "Unsupported operand" in message:
        return Failure(f"{path} was saved with pickle protocol {protocol.group(1)}, which torch's safe loader "
                       "(weights_only=True) cannot read", hint="re-save it with torch.save(state_dict, path) "
                       "(the default protocol) or as .safetensors")
    # torch's message goes on to explain how to load it anyway (weights_only=False): not advice to pass on
    found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)", message)
    return Failure(
        f"refusing to load {path}: it needs code to unpickle ({found.group(1) if found else 'not plain tensors'})",
        hint="only tensors and plain types are loaded (weights_only=True); re-save the state_dict "
        "with torch.save(model.state_dict(), path) or as .safetensors",
    )


def is_torchtool_checkpoint(obj: Any) -> bool:
    """True for dicts written by :func:`save_checkpoint`."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


@dataclass
class WeightsFile:
    """A state_dict read from disk, with what the file says about its model."""

    path: Path
    state_dict: dict[str, Any]
    arch: str | None = None
    classes: list[str] | None = None
    preprocess: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None  # a finetune checkpoint's val_dir and val_files


def read_weights_file(path: str | os.PathLike) -> WeightsFile:
    """Read a .safetensors file, a .pth/.pt state_dict or a torchtool checkpoint."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--weights {path} is a folder", hint="give the weights file inside it (.pth, .pt, "
                         ".safetensors, or a finetune run's best.pth)")
    if not path.is_file():
        raise UsageError(f"no such weights file: {path}", hint="pass DEFAULT, a weights name, none, or an existing file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:
            raise Failure(f"cannot read {path}: {exc}") from None
        info = json.loads(meta.get("torchtool", "{}"))
        return WeightsFile(path, state, info.get("arch"), info.get("classes"), info.get("preprocess"))

    obj = load_checkpoint(path)
    if is_torchtool_checkpoint(obj):
        validation = {"val_dir": obj["val_dir"], "val_files": obj.get("val_files")} if obj.get("val_dir") else None
        return WeightsFile(path, obj["model"], obj.get("arch"), obj.get("classes"), obj.get("preprocess"), validation)
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise Failure(f"{path} holds no state_dict", hint="expected a dict of tensor names to tensors")
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    obj = dict(obj)  # our own copy: it is edited in place
    for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
        consume_prefix_in_state_dict_if_present(obj, prefix)
    return WeightsFile(path, obj)


def save_safetensors(path: str | os.PathLike, state_dict: dict[str, Any], info: dict[str, Any]) -> Path:
    """Write weights as .safetensors atomically, with ``info`` (arch, classes...) as metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata={"torchtool": json.dumps(info)}))
    return Path(path)
