"""summary: a model's layers, parameters, MACs and memory from one forward pass on the meta device.

The model is built under ``torch.device("meta")`` and run there: no memory for weights or
activations, so a model larger than RAM is summarised in seconds without a GPU. FLOPs come
from torch's ``FlopCounterMode`` (matmul and attention included), attributed to modules;
MACs = FLOPs / 2. Parameters are counted once each, however many modules share them.
Activation memory is the peak of the tensors alive at once (:class:`LiveBytes`) in an
inference forward, and in a training forward + backward (gradients included).

A forward that cannot run on the meta device (``.item()``, data-dependent shapes, an op
without a meta kernel) runs once for real on the CPU instead, with a note.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from torchtool.core.files import check_writable, human_bytes
from torchtool.core.inspect.graph import autograd_dot, check_graph_path, write_graph
from torchtool.core.inspect.inputs import InputSpec, make_inputs, parse_input_size, torch_dtype
from torchtool.core.inspect.tracking import LiveBytes, ModuleCalls
from torchtool.core.models.spec import ModelSource, resolve_model
from torchtool.core.output import Failure, TorchtoolError, UsageError, first_line

# Errors that say "the meta device cannot do this" rather than "the input does not fit".
_META_LIMITS = ("meta", "data-dependent", "data dependent", "item()", "cannot be called on", "nonzero",
                "tolist", "numpy")


@dataclass
class SummaryConfig:
    """What ``torchtool summary`` was asked for."""

    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_sizes: list[str] = field(default_factory=list)  # "3,224,224" each; empty: the model's default
    batch_size: int = 1
    dtype: str = "float32"
    depth: int = 3
    graph: str | None = None
    overwrite: bool = False


@dataclass
class Forward:
    """What one inference forward showed: per-module output shapes and FLOPs, and the peak live bytes."""

    shapes: dict[str, Any]
    flops: dict[str, int]  # FlopCounterMode's names ("ResNet.layer1.0") -> FLOPs, parents include children
    total_flops: int
    peak_bytes: int


def _is_meta_limit(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, NotImplementedError) or any(word in text for word in _META_LIMITS)


@contextlib.contextmanager
def _countable_kernels():
    """Kernels FlopCounterMode has formulas for: nn.MultiheadAttention's fused inference path and the
    CPU's flash attention would hide their matmuls (12.6 and 1.4 GFLOPs of vit_b_16's 35.1)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = getattr(torch.backends, "mha", None)
    before = mha.get_fastpath_enabled() if mha else None
    if mha:
        mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if mha:
            mha.set_fastpath_enabled(before)


def _inference(model: Any, inputs: list[Any], calls: ModuleCalls) -> Forward:
    counter = FlopCounterMode(display=False)
    live = LiveBytes(ignore=[*model.parameters(), *model.buffers(), *inputs])
    model.eval()
    with torch.no_grad(), _countable_kernels(), calls, counter, live:
        model(*inputs)
    return Forward(calls.output_shapes, {k: sum(v.values()) for k, v in counter.get_flop_counts().items()},
                   counter.get_total_flops(), live.peak)


def _training_peak(model: Any, inputs: list[Any]) -> tuple[int | None, str | None]:
    """Peak live bytes of a training forward + backward (activations kept for backward, gradients)."""
    live = LiveBytes(ignore=[*model.parameters(), *model.buffers(), *inputs])
    model.train()
    try:
        with _countable_kernels(), live:
            out = [t for t in tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not out:
                return None, "forward+backward memory not estimated: no output requires grad (no trainable parameters?)"
            sum(t.float().sum() for t in out).backward()
    except Exception as exc:  # e.g. BatchNorm refusing a batch of 1 in training mode
        return None, f"forward+backward memory not estimated: {first_line(exc)}"
    finally:
        model.eval()
        for p in model.parameters():
            p.grad = None
    return live.peak, None


def _graph(model: Any, inputs: list[Any], label: str) -> str:
    """DOT of the autograd graph of one forward (floating inputs require grad so they appear)."""
    names = {id(p): name for name, p in model.named_parameters()}
    leaves = []
    for i, x in enumerate(inputs):
        if x.is_floating_point():
            x = x.detach().requires_grad_(True)
            names[id(x)] = f"input {i}"
        leaves.append(x)
    model.eval()
    with _countable_kernels():
        out = [t for t in tree_leaves(model(*leaves)) if isinstance(t, torch.Tensor)]
    return autograd_dot(out, names, title=label)


class _MetaLimit(Exception):
    """The model needs real data to build or run (it cannot on the meta device)."""

    def __init__(self, reason: str, model: Any = None):
        super().__init__(reason)
        self.reason, self.model = reason, model


def _measure(source: ModelSource, specs: list[InputSpec], batch_size: int, dtype: Any, device: str,
             sizes: str) -> tuple[Any, list[Any], Forward]:
    """Build the model on ``device`` and run the inference forward: (model, inputs, what it showed)."""
    try:
        model = source.build(device)
        model = model.to(dtype) if dtype != torch.float32 else model
    except TorchtoolError:
        raise
    except Exception as exc:
        if device == "meta":
            raise _MetaLimit(first_line(exc)) from exc
        raise Failure(f"building {source.label} failed: {first_line(exc)}",
                      hint="rerun with --debug for the traceback") from None
    inputs = make_inputs(specs, batch_size, dtype, device)
    calls = ModuleCalls(model)
    try:
        return model, inputs, _inference(model, inputs, calls)
    except TorchtoolError:
        raise
    except Exception as exc:
        if device == "meta" and _is_meta_limit(exc):
            raise _MetaLimit(first_line(exc), model) from exc
        raise calls.failure(exc, source.label, sizes) from None


def _counts(module: Any) -> tuple[int, int]:
    """(parameters, trainable parameters) of ``module`` and its children, each tensor once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _layers(model: Any, fwd: Forward, depth: int) -> list[dict[str, Any]]:
    """One record per module down to ``depth`` (values include the module's children)."""
    root = type(model).__name__
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    def flops(module: Any) -> int:  # a container never called itself (ModuleList) costs what its children do
        called = [fwd.flops[key] for alias in aliases[id(module)] if (key := f"{root}.{alias}") in fwd.flops]
        return max(called) if called else sum(flops(child) for child in module.children())

    rows = []
    for name, module in model.named_modules():
        if not name or name.count(".") >= depth:
            continue
        params, trainable = _counts(module)
        rows.append({"name": name, "depth": name.count(".") + 1, "type": type(module).__name__,
                     "output_shape": fwd.shapes.get(name), "params": params, "trainable": trainable,
                     "macs": flops(module) // 2})
    return rows


def _bytes(tensors: list[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def summarize(cfg: SummaryConfig) -> dict[str, Any]:
    """The summary of ``cfg.model``: totals, memory and one record per layer (``layers``)."""
    if cfg.depth < 0:
        raise UsageError("--depth must be 0 or more")
    specs = [parse_input_size(s) for s in cfg.input_sizes]
    dtype = torch_dtype(cfg.dtype)
    if not dtype.is_floating_point:
        raise UsageError(f"--dtype {cfg.dtype} is not a floating-point type",
                         hint="give integer inputs as --input-size 128:int64")
    graph = check_writable(check_graph_path(cfg.graph), cfg.overwrite) if cfg.graph else None
    source = resolve_model(cfg.model, cfg.kwargs)
    specs = specs or [InputSpec(source.input_size)]
    sizes = " ".join(map(str, specs))
    notes: list[str] = []

    device = "meta"
    try:
        model, inputs, fwd = _measure(source, specs, cfg.batch_size, dtype, device, sizes)
    except _MetaLimit as limit:
        _check_fits(limit.model, source.label, limit.reason)
        notes.append(f"the forward of {source.label} cannot run on the meta device ({limit.reason}): "
                     "measured with one real forward on the CPU")
        device = "cpu"
        model, inputs, fwd = _measure(source, specs, cfg.batch_size, dtype, device, sizes)
    train_peak, why = _training_peak(model, inputs)
    if why:
        notes.append(why)

    total, trainable = _counts(model)
    report: dict[str, Any] = {
        "model": source.label,
        "input_size": [list(s.shape) for s in specs],
        "input_dtypes": [s.dtype or cfg.dtype for s in specs],
        "batch_size": cfg.batch_size,
        "dtype": str(dtype).removeprefix("torch."),
        "measured_on": device,
        "total_params": total,
        "trainable_params": trainable,
        "non_trainable_params": total - trainable,
        "macs": fwd.total_flops // 2,
        "flops": fwd.total_flops,
        "param_bytes": _bytes(list(model.parameters())),
        "buffer_bytes": _bytes(list(model.buffers())),
        "input_bytes": _bytes(inputs),
        "forward_bytes": fwd.peak_bytes,
        "forward_backward_bytes": train_peak,
        "output_shape": fwd.shapes.get(""),
        "layers": _layers(model, fwd, cfg.depth),
        "notes": notes,
    }
    if graph is not None:
        written, note = write_graph(_graph(model, inputs, source.label), graph)
        report["graph"] = str(written)
        if note:
            notes.append(note)
    return report


def _check_fits(model: Any, label: str, reason: str) -> None:
    """Refuse a real CPU forward of a model whose weights would not fit in memory."""
    if model is None:
        return
    need = _bytes(list(model.parameters())) + _bytes(list(model.buffers()))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > available // 2:
        raise Failure(f"the forward of {label} cannot run on the meta device ({reason}), and its weights "
                      f"({human_bytes(need)}) are too large for a real forward here ({human_bytes(available)} free)",
                      hint="make the forward free of data-dependent steps (.item(), .tolist(), nonzero)")


def totals(report: dict[str, Any]) -> dict[str, str]:
    """The totals block under the table, in human units (MACs and FLOPs named as such)."""
    def count(n: int) -> str:
        for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= size:
                return f"{n / size:.3f} {unit}"
        return str(n)

    def memory(n: int | None) -> str:
        return "not estimated" if n is None else human_bytes(n)

    batch = report["batch_size"]
    shapes = ", ".join("x".join(map(str, [batch, *s])) for s in report["input_size"])
    return {
        "model": report["model"],
        "input": f"{shapes} ({', '.join(dict.fromkeys(report['input_dtypes']))})",
        "total params": f"{report['total_params']:,} ({count(report['total_params'])})",
        "trainable params": f"{report['trainable_params']:,}",
        "non-trainable params": f"{report['non_trainable_params']:,}",
        "MACs": f"{count(report['macs'])} multiply-accumulates ({report['macs']:,})",
        "FLOPs": f"{count(report['flops'])} (2 x MACs)",
        "parameter memory": f"{human_bytes(report['param_bytes'])} (+ {human_bytes(report['buffer_bytes'])} buffers)",
        "input memory": human_bytes(report["input_bytes"]),
        "forward activations": f"{memory(report['forward_bytes'])} (peak, inference)",
        "forward+backward": f"{memory(report['forward_backward_bytes'])} (peak of a training step: activations "
                            "and gradients, weights and optimizer state not included)",
        "measured on": "the meta device (no memory used)" if report["measured_on"] == "meta"
        else "a real forward on the CPU",
    }


def layer_rows(report: dict[str, Any], fmt: str = "table") -> list[dict[str, Any]]:
    """The layer records for ``fmt``: indented names and grouped digits for people, shapes as text in CSV."""
    if fmt == "jsonl":
        return report["layers"]
    if fmt == "csv":
        return [row | {"output_shape": _shape_text(row["output_shape"])} for row in report["layers"]]
    return [{"layer": "  " * (row["depth"] - 1) + row["name"], "type": row["type"],
             "output_shape": _shape_text(row["output_shape"]), "params": f"{row['params']:,}",
             "trainable": f"{row['trainable']:,}", "macs": f"{row['macs']:,}"} for row in report["layers"]]


def _shape_text(shape: Any) -> str:
    if shape is None:
        return "-"
    if shape and all(isinstance(n, int) for n in shape):
        return "[" + ", ".join(map(str, shape)) + "]"
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{k}: {_shape_text(v)}" for k, v in shape.items()) + "}"
    return "(" + ", ".join(_shape_text(s) for s in shape) + ")" if shape else "[]"
