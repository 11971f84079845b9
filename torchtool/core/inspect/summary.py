"""summary: a model's layers, parameters, MACs and memory from one forward pass on the meta device.

The model is built under ``torch.device("meta")`` and run there: no memory for weights or
activations, so a model larger than RAM is summarised in seconds without a GPU. FLOPs come
from torch's ``FlopCounterMode`` (matmul and attention included), attributed to modules;
MACs = FLOPs / 2. Parameters are counted once each, however many modules share them.
Activation memory is the peak of the tensors alive at once (:class:`LiveBytes`) in an
inference forward, and in a training forward + backward (gradients included).

A forward that cannot run on the meta device (``.item()``, data-dependent shapes, an op
without a meta kernel) runs once for real on the CPU instead, with a note, if its weights fit
in half the free memory (:mod:`~torchtool.core.inspect.bounds`). Both paths count the same
kernels (:func:`countable_kernels`); a compute-heavy operator that FlopCounterMode cannot count
is listed in ``uncounted_ops``, never silently left out of the totals.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from torchtool.core.files import human_bytes
from torchtool.core.inspect.bounds import build_within, check_fits
from torchtool.core.inspect.graph import autograd_dot, check_graph_path, write_graph
from torchtool.core.inspect.inputs import InputSpec, make_inputs, parse_input_size, torch_dtype
from torchtool.core.inspect.tracking import LiveBytes, ModuleCalls, Uncounted
from torchtool.core.models.spec import ModelSource, resolve_model, stdout_to_stderr
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
    uncounted: dict[str, int] = field(default_factory=dict)  # heavy ops without a FLOP formula -> calls


def _is_meta_limit(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, NotImplementedError) or any(word in text for word in _META_LIMITS)


@contextlib.contextmanager
def countable_kernels():
    """Kernels FlopCounterMode has formulas for, on the meta device and the CPU alike: nn.MultiheadAttention's
    fused inference path and the CPU's flash attention would hide their matmuls (12.6 and 1.4 GFLOPs of
    vit_b_16's 35.1), and oneDNN's fused LSTM/GRU/RNN kernel all of an RNN's (meta decomposes them anyway)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = getattr(torch.backends, "mha", None)
    before = mha.get_fastpath_enabled() if mha else None
    onednn = torch.backends.mkldnn.enabled
    if mha:
        mha.set_fastpath_enabled(False)
    torch.backends.mkldnn.enabled = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mkldnn.enabled = onednn
        if mha:
            mha.set_fastpath_enabled(before)


def _inference(model: Any, inputs: list[Any], calls: ModuleCalls) -> Forward:
    counter, uncounted = FlopCounterMode(display=False), Uncounted()
    live = LiveBytes(ignore=[*model.parameters(), *model.buffers(), *inputs])
    model.eval()
    with torch.no_grad(), countable_kernels(), calls, counter, uncounted, live:
        model(*inputs)
    return Forward(calls.output_shapes, {k: sum(v.values()) for k, v in counter.get_flop_counts().items()},
                   counter.get_total_flops(), live.peak, dict(uncounted.calls))


def _training_peak(model: Any, inputs: list[Any]) -> tuple[int | None, str | None]:
    """Peak live bytes of a training forward + backward (activations kept for backward, gradients)."""
    live = LiveBytes(ignore=[*model.parameters(), *model.buffers(), *inputs])
    model.train()
    try:
        with countable_kernels(), live:
            out = [t for t in tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not out:
                return None, "no output requires grad (no trainable parameters?)"
            sum(t.float().sum() for t in out).backward()
    except Exception as exc:  # e.g. BatchNorm refusing a batch of 1 in training mode: the caller retries at 2
        return None, first_line(exc)
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
    with countable_kernels():
        out = [t for t in tree_leaves(model(*leaves)) if isinstance(t, torch.Tensor)]
    return autograd_dot(out, names, title=label)


class _MetaLimit(Exception):
    """The model needs real data to build or run (it cannot on the meta device)."""

    def __init__(self, reason: str, model: Any = None):
        super().__init__(reason)
        self.reason, self.model = reason, model


def _measure(source: ModelSource, specs: list[InputSpec], batch_size: int, dtype: Any, device: str,
             sizes: str, reason: str | None = None) -> tuple[Any, list[Any], Forward]:
    """Build the model on ``device`` and run the inference forward: (model, inputs, what it showed)."""
    try:  # a model that cannot be built on meta is built for real only within half the free memory
        model = source.build(device) if device == "meta" else build_within(source, device, reason)
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
    with stdout_to_stderr():  # the model's own prints (its forward's too) never reach the tool's stdout
        return _summarize(cfg)


def _summarize(cfg: SummaryConfig) -> dict[str, Any]:
    if cfg.depth < 0:
        raise UsageError("--depth must be 0 or more")
    specs = [parse_input_size(s) for s in cfg.input_sizes]
    dtype = torch_dtype(cfg.dtype)
    if not dtype.is_floating_point:
        raise UsageError(f"--dtype {cfg.dtype} is not a floating-point type",
                         hint="give integer inputs as --input-size 128:int64")
    graph = check_graph_path(cfg.graph, cfg.overwrite) if cfg.graph else None
    source = resolve_model(cfg.model, cfg.kwargs)
    specs = specs or [InputSpec(source.input_size)]
    sizes = " ".join(map(str, specs))
    notes: list[str] = []

    device = "meta"
    try:
        model, inputs, fwd = _measure(source, specs, cfg.batch_size, dtype, device, sizes)
    except _MetaLimit as limit:
        if limit.model is not None:
            check_fits(limit.model, source.label, limit.reason)
        notes.append(f"the forward of {source.label} cannot run on the meta device ({limit.reason}): "
                     "measured with one real forward on the CPU")
        device = "cpu"
        model, inputs, fwd = _measure(source, specs, cfg.batch_size, dtype, device, sizes, limit.reason)
    if fwd.uncounted:
        notes.append(f"MACs and FLOPs leave out {_uncounted_text(fwd.uncounted)}: torch's FlopCounterMode has no "
                     "formula for them, so their share of the total is unknown")
    train_peak, train_batch, why = _training_memory(model, inputs, specs, cfg.batch_size, dtype, device)
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
        "forward_backward_batch_size": train_batch,
        "uncounted_ops": [{"op": op, "calls": n} for op, n in fwd.uncounted.items()],
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


def _uncounted_text(ops: dict[str, int]) -> str:
    return ", ".join(f"{op} ({n} call{'s' if n > 1 else ''})" for op, n in ops.items())


def _training_memory(model: Any, inputs: list[Any], specs: list[InputSpec], batch_size: int, dtype: Any,
                     device: str) -> tuple[int | None, int, str | None]:
    """(peak bytes, the batch size it was measured at, a note): BatchNorm cannot train on a batch of 1, so
    a batch of 1 that fails is measured at 2 and said so."""
    peak, why = _training_peak(model, inputs)
    if peak is None and batch_size == 1 and why and "no output requires grad" not in why:
        peak, again = _training_peak(model, make_inputs(specs, 2, dtype, device))
        if peak is not None:
            return peak, 2, f"forward+backward memory is for a batch of 2: at 1, {why}"
    return peak, batch_size, f"forward+backward memory not estimated: {why}" if why else None


def totals(report: dict[str, Any]) -> dict[str, str]:
    """The totals block under the table, in human units (MACs and FLOPs named as such)."""
    def count(n: int) -> str:
        for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= size:
                return f"{n / size:.3f} {unit}"
        return str(n)

    def memory(n: int | None) -> str:
        return "not estimated" if n is None else human_bytes(n)

    batch = report["batch_size"]
    shapes = ", ".join("x".join(map(str, [batch, *s])) for s in report["input_size"])
    train = report["forward_backward_batch_size"]
    rows = {
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
        "forward+backward": f"{memory(report['forward_backward_bytes'])} (peak of a training step"
                            f"{f' at batch {train}' if train != batch else ''}: activations and gradients, "
                            "weights and optimizer state not included)",
        "measured on": "the meta device (no memory used)" if report["measured_on"] == "meta"
        else "a real forward on the CPU",
    }
    if report["uncounted_ops"]:
        rows["not counted"] = _uncounted_text({r["op"]: r["calls"] for r in report["uncounted_ops"]}) + \
            " (no FLOP formula: the MACs above leave them out)"
    return rows


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
