"""Building a model for real only when it fits: half the memory this machine has free, as summary and profile need.

The weights' size comes from a meta build (free, and robust to constructors that read their
own small tensors, see :func:`~torchtool.core.models.spec.ModelSource.build`); a model that
cannot be built on the meta device is built for real under a :class:`LiveBytes` limit that
stops it at half the free memory, before the memory is touched.
"""

from __future__ import annotations

from typing import Any

from torchtool.core.files import human_bytes
from torchtool.core.inspect.tracking import LiveBytes, OverBudget, available_memory
from torchtool.core.output import Failure, TorchtoolError, first_line


def too_large(label: str, need: str, available: int, reason: str | None = None) -> Failure:
    """The one line for a model whose weights (``need``, in words) exceed half of ``available``."""
    head = f"the forward of {label} cannot run on the meta device ({reason}), and its" if reason else \
        f"{label}:"
    hint = ("make the model free of data-dependent steps (.item(), .tolist(), nonzero), or use a machine with more "
            "memory") if reason else "use a machine with more memory, or a GPU (--device cuda)"
    return Failure(f"{head} weights ({need}) are too large for a real forward here ({human_bytes(available)} free)",
                   hint=hint)


def weight_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def check_fits(model: Any, label: str, reason: str | None = None) -> None:
    """Refuse when ``model`` (built on meta) has weights above half the free memory."""
    available = available_memory()
    if available is not None and (need := weight_bytes(model)) > available // 2:
        raise too_large(label, human_bytes(need), available, reason)


def build_within(source: Any, device: str, reason: str | None = None) -> Any:
    """``source.build(device)`` for real; on the CPU stopped with :func:`too_large` past half the free memory."""
    available = available_memory()
    if device != "cpu" or available is None:
        return source.build(device)
    try:
        with LiveBytes(limit=available // 2):
            return source.build(device)
    except OverBudget:
        raise too_large(source.label, f"more than {human_bytes(available // 2)}", available, reason) from None


def build_checked(source: Any, device: str) -> Any:
    """The model on ``device``, after a meta build said it fits (or, where that fails, built under the limit)."""
    if device != "cpu":
        return source.build(device)
    try:
        meta = source.build("meta")
    except TorchtoolError:
        raise
    except Exception as exc:  # needs real data to build: the limit stops it instead
        return build_within(source, device, f"building it: {first_line(exc)}")
    check_fits(meta, source.label)
    del meta
    return source.build(device)
