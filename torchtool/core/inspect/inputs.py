"""``--input-size`` and ``--dtype``: what the model is fed, parsed once for summary and profile."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torchtool.core.output import UsageError

# --dtype names -> torch dtype attribute names
DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "double": "float64",
          "int64": "int64", "long": "int64", "int32": "int32", "int": "int32", "int16": "int16", "uint8": "uint8",
          "bool": "bool"}


def torch_dtype(name: str) -> Any:
    """The torch dtype called ``name`` (float32, bf16, int64, ...)."""
    import torch

    key = DTYPES.get(name.lower())
    if key is None:
        raise UsageError(f"unknown dtype {name!r}", hint=f"choose from: {', '.join(sorted(set(DTYPES.values())))}")
    return getattr(torch, key)


@dataclass(frozen=True)
class InputSpec:
    """One input's size without the batch dimension, and its dtype when not the model's (e.g. int64 tokens)."""

    shape: tuple[int, ...]
    dtype: str | None = None

    def __str__(self) -> str:
        return ",".join(map(str, self.shape)) + (f":{self.dtype}" if self.dtype else "")


def parse_input_size(text: str) -> InputSpec:
    """``3,224,224`` (or ``3x224x224``), optionally ``:int64`` for an integer input such as token ids."""
    size, _, dtype = text.strip().partition(":")
    parts = re.split(r"[,x]", size)
    shape = tuple(int(part) for part in parts) if all(part.strip().isdigit() for part in parts) else ()
    if not shape or any(n < 1 for n in shape):
        raise UsageError(f"--input-size {text!r}: expected positive integers such as 3,224,224",
                         hint="one --input-size per input, without the batch dimension; e.g. 3,224,224 or 128:int64")
    if dtype:
        torch_dtype(dtype)
    return InputSpec(shape, dtype or None)


def make_inputs(specs: list[InputSpec], batch_size: int, dtype: Any, device: Any) -> list[Any]:
    """One tensor per spec, shaped (batch, *shape): random floats (zeros for integer inputs) on ``device``."""
    import torch

    tensors = []
    for spec in specs:
        kind = torch_dtype(spec.dtype) if spec.dtype else dtype
        shape = (batch_size, *spec.shape)
        if kind.is_floating_point:
            tensors.append(torch.randn(shape, dtype=kind, device=device))
        else:
            tensors.append(torch.zeros(shape, dtype=kind, device=device))
    return tensors
