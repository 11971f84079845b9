"""The cookbook's inference speed tips, each measured against the fp32 baseline on this machine.

Every tip is a way to run the same model on the same inputs; its outputs are compared with
the baseline's (the largest difference relative to the largest baseline value) so a tip
that is fast but wrong shows as such. A tip that cannot run here is skipped with the reason.
A tip is called faster or slower (``verdict``) only when its speed-up's range, from the
quartiles of both timings, lies wholly above or below 1, and only when its outputs agree.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves

from torchtool.core.inspect import TIPS  # defined in the light package module, for tab completion
from torchtool.core.inspect.timing import measure
from torchtool.core.models.fuse import fold_batchnorm
from torchtool.core.output import first_line
FP32_TOLERANCE = 1e-3  # a different kernel or summation order; TF32 convolutions on CUDA are the baseline's too
HALF_TOLERANCE = 5e-2  # 8 (bf16) or 11 (fp16) bits of mantissa, through every layer


class Skip(Exception):
    """A tip that does not apply here (the reason is the message)."""


@dataclass
class Tip:
    name: str
    what: str
    prepare: Callable[[Any, list[Any], torch.device], Callable[[], Any]]  # -> a callable returning outputs
    tolerance: float = FP32_TOLERANCE


def _baseline(model: Any, inputs: list[Any], device: torch.device) -> Callable[[], Any]:
    def fn() -> Any:
        with torch.no_grad():
            return model(*inputs)

    return fn


def _inference_mode(model: Any, inputs: list[Any], device: torch.device) -> Callable[[], Any]:
    def fn() -> Any:
        with torch.inference_mode():
            return model(*inputs)

    return fn


def _channels_last(model: Any, inputs: list[Any], device: torch.device) -> Callable[[], Any]:
    if not any(x.dim() == 4 for x in inputs):
        raise Skip("no 4-D (image) input")
    local = copy.deepcopy(model).to(memory_format=torch.channels_last)
    moved = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs]
    return _baseline(local, moved, device)


def _autocast(dtype: torch.dtype) -> Callable[[Any, list[Any], torch.device], Callable[[], Any]]:
    def prepare(model: Any, inputs: list[Any], device: torch.device) -> Callable[[], Any]:
        if dtype == torch.float16 and device.type != "cuda":
            raise Skip("fp16 autocast is for CUDA")
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise Skip("this GPU has no bf16")

        def fn() -> Any:
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=dtype):
                return model(*inputs)

        return fn

    return prepare


def _cudnn_benchmark(model: Any, inputs: list[Any], device: torch.device) -> Callable[[], Any]:
    if device.type != "cuda":
        raise Skip("cuDNN is CUDA's")

    def fn() -> Any:
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True  # each input shape is autotuned once, on the warm-up calls
        try:
            with torch.no_grad():
                return model(*inputs)
        finally:
            torch.backends.cudnn.benchmark = before

    return fn


def _fold_bn(model: Any, inputs: list[Any], device: torch.device) -> Callable[[], Any]:
    norms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not norms:
        raise Skip("no BatchNorm layers")
    folded = fold_batchnorm(model)
    if folded is model:
        raise Skip("the model does not trace with torch.fx, so nothing is folded")
    if sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules()) == norms:
        raise Skip("no BatchNorm follows a convolution")
    return _baseline(folded, inputs, device)


def _compile(model: Any, inputs: list[Any], device: torch.device) -> Callable[[], Any]:
    compiled = torch.compile(copy.deepcopy(model))
    fn = _baseline(compiled, inputs, device)
    fn()  # compiles now, so that the failure (no C++ compiler, an unsupported op) is a skip with its reason
    return fn


CATALOG = {tip.name: tip for tip in (
    Tip("channels_last", "model and input in channels_last memory format", _channels_last),
    Tip("bf16", "autocast to bfloat16", _autocast(torch.bfloat16), HALF_TOLERANCE),
    Tip("fp16", "autocast to float16", _autocast(torch.float16), HALF_TOLERANCE),
    Tip("cudnn_benchmark", "torch.backends.cudnn.benchmark = True", _cudnn_benchmark),
    Tip("compile", "torch.compile (inductor; compile time not in the latency)", _compile),
    Tip("inference_mode", "torch.inference_mode() instead of torch.no_grad()", _inference_mode),
    Tip("fold_bn", "BatchNorm folded into the convolution before it (as extract-features does)", _fold_bn),
)}


def relative_error(outputs: Any, reference: Any) -> float:
    """max |outputs - reference| / max |reference| over every output tensor."""
    got = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    ref = [t for t in tree_leaves(reference) if isinstance(t, torch.Tensor)]
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
        return float("inf")
    diff = max((float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref) if a.numel()), default=0.0)
    scale = max((float(b.float().abs().max()) for b in ref if b.numel()), default=0.0)
    return diff / scale if scale > 0 else diff


def compare_tips(model: Any, inputs: list[Any], device: torch.device, threads: int, max_time: float,
                 tips: list[str], batch_size: int, on_row: Callable[[str], None] | None = None,
                 note: Callable[[str], None] | None = None) -> list[dict]:
    """The matrix: the baseline first, then one row per tip (speed-up, error vs the baseline, or why skipped)."""
    base_fn = _baseline(model, inputs, device)
    reference = base_fn()
    base = measure(base_fn, device, threads, max_time, note)
    rows = [_row("fp32 baseline", "torch.no_grad(), float32, contiguous", base, base, 0.0, FP32_TOLERANCE,
                 batch_size)]
    for name in tips:
        tip = CATALOG[name]
        if on_row:
            on_row(name)
        started = time.perf_counter()
        try:
            fn = tip.prepare(model, inputs, device)
            outputs = fn()
        except Skip as why:
            rows.append({"tip": name, "what": tip.what, "skipped": str(why)})
            continue
        except Exception as exc:  # e.g. torch.compile without a working C++ compiler
            rows.append({"tip": name, "what": tip.what, "skipped": f"cannot run here: {first_line(exc)[:200]}"})
            continue
        prepared = time.perf_counter() - started
        timing = measure(fn, device, threads, max_time, note)
        row = _row(name, tip.what, timing, base, relative_error(outputs, reference), tip.tolerance, batch_size)
        if name == "compile":
            row["compile_s"] = prepared
        rows.append(row)
        del fn
    return rows


def verdict(base: Any, timing: Any, same_outputs: bool) -> tuple[float, float, str]:
    """(lowest, highest speed-up the quartiles allow, the word for it): "faster"/"slower" only when that range
    excludes 1; a tip whose outputs differ is never a speed-up."""
    low, high = base.q1_s / timing.q3_s, base.q3_s / timing.q1_s
    if not same_outputs:
        return low, high, "outputs differ"
    return low, high, "faster" if low > 1 else "slower" if high < 1 else "no clear difference"


def _row(name: str, what: str, timing: Any, base: Any, error: float, tolerance: float, batch: int) -> dict:
    same = error <= tolerance
    low, high, word = verdict(base, timing, same) if timing is not base else (1.0, 1.0, "baseline")
    return {"tip": name, "what": what, "median_ms": timing.median_s * 1e3, "iqr_ms": timing.iqr_s * 1e3,
            "samples_per_s": batch / timing.median_s, "speedup": base.median_s / timing.median_s,
            "speedup_low": low, "speedup_high": high, "verdict": word,
            "max_rel_error": error, "tolerance": tolerance, "within_tolerance": same, "skipped": None}
