"""What one forward pass does, watched from outside the model: module calls, output shapes, live bytes.

- :class:`ModuleCalls`: forward hooks on every module; the output shape of each, and the
  module that was running when the forward failed (so a wrong ``--input-size`` names its layer).
- :class:`LiveBytes`: a dispatch mode that follows every tensor the forward (and backward)
  creates until it is freed (storage weak references, so views and in-place results are not
  counted twice), giving the peak activation memory, on the meta device as on a real one;
  with a ``limit`` it stops a real build that would not fit (:class:`OverBudget`).
- :class:`Uncounted`: the compute-heavy operators FlopCounterMode has no formula for.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry

from torchtool.core.output import UsageError, first_line


def shapes_of(value: Any) -> Any:
    """A tensor's shape as a list; tuples, lists and dicts of tensors as the same structure of shapes."""
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, (list, tuple)):
        return [shapes_of(v) for v in value]
    if isinstance(value, dict):
        return {str(k): shapes_of(v) for k, v in value.items()}
    return None


class ModuleCalls:
    """Hooks on each module of ``model``: the first output shape of each, and the stack of running modules."""

    def __init__(self, model: Any):
        self.model = model
        self.output_shapes: dict[str, Any] = {}
        self.stack: list[tuple[str, Any, Any]] = []  # (name, module, its inputs)
        self._handles: list[Any] = []

    def __enter__(self) -> ModuleCalls:
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._leave(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            self.stack.append((name, module, args))

        return hook

    def _leave(self, name: str) -> Any:  # not called when the forward raises: the stack keeps the failing path
        def hook(module: Any, args: Any, output: Any) -> None:
            if self.stack and self.stack[-1][0] == name:
                self.stack.pop()
            self.output_shapes.setdefault(name, shapes_of(output))

        return hook

    def failure(self, exc: BaseException, label: str, sizes: str) -> UsageError:
        """``exc`` as one line naming the innermost module that was running (for a forward that failed)."""
        name, module, args = self.stack[-1] if self.stack else ("", self.model, ())
        where = f"in layer {name} ({type(module).__name__})" if name else f"in {type(module).__name__}.forward"
        return UsageError(f"{label} does not run on --input-size {sizes}: {where}: "
                          f"{first_line(_cpu_reason(module, args, exc))}",
                          hint="check --input-size (one per input, without the batch dimension) and --batch-size")


def _cpu_reason(module: Any, args: Any, exc: BaseException) -> BaseException:
    """The CPU's error for a layer that failed on the meta device: meta kernels word it tersely
    ("Invalid channel dimensions" where the CPU says which channels it expected). The layer is
    copied to the CPU with uninitialised weights and called with zeros of the same shapes;
    only for layers small enough for that to be cheap, and only to read its message."""
    import copy

    tensors = [t for t in tree_leaves((list(module.parameters()), args)) if isinstance(t, torch.Tensor)]
    if not tensors or any(t.device.type != "meta" for t in tensors) or \
            sum(t.numel() * t.element_size() for t in tensors) > 256 << 20:
        return exc
    try:
        local = copy.deepcopy(module).to_empty(device="cpu")
        cpu_args = tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t, args)
        with torch.no_grad():
            local(*cpu_args)
    except Exception as cpu_exc:  # the same mistake, in the CPU kernel's words
        return cpu_exc
    return exc


def storage_key(tensor: Any) -> int | None:
    """An id of the memory behind ``tensor`` (shared by its views), or None for tensors without storage."""
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):  # sparse, nested, some subclasses
        return None


def available_memory() -> int | None:
    """Bytes this machine can still give a process without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class OverBudget(BaseException):
    """The tensors alive passed :class:`LiveBytes`' ``limit`` (a BaseException: a constructor's own
    ``except Exception`` must not swallow it and build on)."""


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the block that are alive at once (weights and inputs excluded).

    Every op's outputs are looked at; a new storage is remembered with a weak reference and
    counted until it is freed. ``ignore`` holds tensors that existed before (parameters,
    buffers, inputs): their views and in-place results cost nothing new.

    Asking every weak reference after every op costs O(ops x tensors alive): minutes for a
    training step of a large model. The running sum over-counts only the freed ones, so the
    references are asked only when that sum passes the peak by 1%: the peak is exact to 1%.
    """

    def __init__(self, ignore: list[Any] = (), limit: int | None = None):
        super().__init__()
        self.limit = limit
        self.known = {k for t in ignore if (k := storage_key(t)) is not None}
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = storage_key(t)
                if key is not None and key not in self.known and key not in self.alive:
                    storage = t.untyped_storage()
                    self.alive[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.live += storage.nbytes()
        if self.live > self.peak + self.peak // 100 or (self.limit is not None and self.live > self.limit):
            for key in [k for k, (ref, _) in self.alive.items() if ref.expired()]:
                self.live -= self.alive.pop(key)[1]
            self.peak = max(self.peak, self.live)
            if self.limit is not None and self.live > self.limit:  # an empty() is seen before its pages are touched
                raise OverBudget(self.live)
        return out


# Operators that multiply matrices or convolve: if FlopCounterMode has no formula for one, its FLOPs are missing.
_HEAVY = re.compile(r"mm|mv|dot|addr|conv|lstm|gru|rnn|attention|transformer|einsum|fft|linear|mkldnn|cudnn|"
                    r"miopen|cdist|trilinear|tensordot|nnpack|matmul|linalg")


class Uncounted(TorchDispatchMode):
    """The compute-heavy operators a forward ran that FlopCounterMode cannot count: name -> calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        packet = func.overloadpacket
        if packet not in flop_registry and _HEAVY.search(str(packet).removeprefix("aten.")):
            self.calls[str(packet)] += 1
        return func(*args, **(kwargs or {}))
