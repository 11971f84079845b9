"""profile: how fast a model runs here, which speed tips pay off, whether loading keeps up, where time goes.

Models are taken as summary takes them (:func:`~torchtool.core.models.spec.resolve_model`),
built on the device (on the CPU only when a meta build says it fits in half the free memory,
:mod:`~torchtool.core.inspect.bounds`) and fed random inputs of ``--input-size``. Latency is
``torch.utils.benchmark``'s adaptive measurement with the thread count torch really uses, over
at least five timed blocks; throughput is the batch size over the median latency. A busy or
oversubscribed machine is warned about (``warnings``), as it makes every figure slower.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves

from torchtool.core import output
from torchtool.core.data.images import MAX_PIXELS, find_images
from torchtool.core.env import cpu_model
from torchtool.core.files import check_writable, is_stream
from torchtool.core.inspect.bounds import build_checked
from torchtool.core.inspect.dataloader import bottleneck, sweep
from torchtool.core.inspect.inputs import InputSpec, make_inputs, parse_input_size
from torchtool.core.inspect.timing import busy_machine, measure, warm_up
from torchtool.core.inspect.tips import CATALOG, TIPS, compare_tips
from torchtool.core.inspect.trace import check_script, profile_steps, run_script
from torchtool.core.inspect.tracking import ModuleCalls
from torchtool.core.models.spec import resolve_model, stdout_to_stderr
from torchtool.core.output import Failure, TorchtoolError, UsageError, first_line
from torchtool.core.runtime import resolve_device

TRACE_STEPS = 3


@dataclass
class ProfileConfig:
    """What ``torchtool profile`` was asked for."""

    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_sizes: list[str] = field(default_factory=list)
    batch_size: int = 1
    device: str = "auto"
    threads: int | None = None
    backward: bool = False
    compare: bool = False
    tips: list[str] | None = None  # None: every tip
    dataloader: str | None = None
    dataloader_images: int = 256
    max_pixels: int = MAX_PIXELS
    trace: str | None = None
    top: int = 0
    max_time: float = 2.0
    script_args: list[str] = field(default_factory=list)
    overwrite: bool = False
    quiet: bool = False


def is_script(model: str) -> bool:
    """``profile script.py -- ARGS``: a Python file without ``:factory``."""
    return model.endswith(".py") and ":" not in model


def _check(cfg: ProfileConfig) -> Path | None:
    """Everything that can be wrong before a model is built; returns the trace path."""
    if cfg.top < 0 or cfg.max_time <= 0 or cfg.dataloader_images < 1:
        raise UsageError("--top must be >= 0, --max-time > 0 and --dataloader-images >= 1")
    unknown = [t for t in cfg.tips or [] if t not in CATALOG]
    if unknown:
        raise UsageError(f"unknown tip {unknown[0]!r}", hint=f"choose from: {', '.join(TIPS)}")
    if cfg.script_args and not is_script(cfg.model):
        raise UsageError(f"arguments after MODEL ({' '.join(cfg.script_args)}) are for a script",
                         hint="torchtool profile script.py -- ARGS...")
    trace = None
    if cfg.trace:
        trace = check_writable(cfg.trace, cfg.overwrite, what="--trace")
        if trace.suffix.lower() != ".json" and not is_stream(trace):
            raise UsageError(f"--trace {cfg.trace}: a trace is written as .json", hint="e.g. --trace trace.json")
    if cfg.dataloader:
        if not Path(cfg.dataloader).is_dir():
            raise UsageError(f"--dataloader {cfg.dataloader}: no such folder")
        find_images([cfg.dataloader])  # a folder without images fails here, before the model is built
    return trace


def _train_step(model: Any, inputs: list[Any]) -> Callable[[], None]:
    """Forward, a loss on every floating output, backward, an SGD step (what a training loop does)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        outs = [t for t in tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        sum(t.float().mean() for t in outs).backward()
        optimizer.step()

    return step


def profile(cfg: ProfileConfig) -> dict[str, Any]:
    """The measurements asked for, as one report (see the command's help for the keys)."""
    with stdout_to_stderr():  # a model's or script's prints never reach the tool's stdout
        return _run(cfg)


def _run(cfg: ProfileConfig) -> dict[str, Any]:
    trace = _check(cfg)
    if is_script(cfg.model):
        return run_script(check_script(cfg.model), cfg.script_args, cfg.top or 15, trace)
    device = resolve_device(cfg.device)
    source = resolve_model(cfg.model, cfg.kwargs)
    specs = [parse_input_size(s) for s in cfg.input_sizes] or [InputSpec(source.input_size)]
    sizes = " ".join(map(str, specs))
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _profile(cfg, device, source, specs, sizes, trace)
    finally:
        torch.set_num_threads(threads_before)


def _profile(cfg: ProfileConfig, device: torch.device, source: Any, specs: list[InputSpec], sizes: str,
             trace: Path | None) -> dict[str, Any]:
    threads = torch.get_num_threads()
    warnings = busy_machine(threads)
    for warning in warnings:
        output.warn(warning)
    try:
        model = build_checked(source, str(device)).eval()
    except TorchtoolError:
        raise
    except Exception as exc:
        raise Failure(f"building {source.label} failed: {first_line(exc)}",
                      hint="rerun with --debug for the traceback") from None
    inputs = make_inputs(specs, cfg.batch_size, torch.float32, device)
    calls = ModuleCalls(model)
    try:
        with calls, torch.no_grad():
            model(*inputs)
    except Exception as exc:
        raise calls.failure(exc, source.label, sizes) from None

    def forward() -> Any:
        with torch.no_grad():
            return model(*inputs)

    note = (lambda what: output.info(what, cfg.quiet))
    say = (lambda what: note(f"timing {what}"))
    say("the forward")
    timing = measure(forward, device, threads, cfg.max_time, note)
    report: dict[str, Any] = {
        "model": source.label, "device": str(device), "cpu": cpu_model(), "threads": threads,
        "batch_size": cfg.batch_size, "warnings": warnings,
        "input_size": [list(s.shape) for s in specs], "forward": timing.record(cfg.batch_size),
        "training_step": None, "compare": None, "dataloader": None, "bottleneck": None, "top_ops": None,
        "trace": None,
    }
    if cfg.compare:
        report["compare"] = compare_tips(model, inputs, device, threads, cfg.max_time,
                                         list(cfg.tips) if cfg.tips is not None else list(TIPS), cfg.batch_size,
                                         on_row=say, note=note)
    if cfg.dataloader:
        say(f"loading {cfg.dataloader}")
        report["dataloader"] = sweep(cfg.dataloader, source.preprocess, device, cfg.batch_size,
                                     cfg.dataloader_images, cfg.max_pixels, on_row=say)
        report["bottleneck"] = bottleneck(report["dataloader"], report["forward"]["samples_per_s"], cfg.batch_size)
    step = None
    if cfg.backward:
        trained = copy.deepcopy(model).train()  # the SGD steps change weights: not the model the rest measured
        step = _train_step(trained, inputs)
        try:
            warm_up(step, device, seconds=0)
        except Exception as exc:  # e.g. BatchNorm refusing a batch of 1 in training mode
            raise UsageError(f"--backward: the training step of {source.label} fails: {first_line(exc)}",
                             hint="a batch of 1 cannot train BatchNorm: use --batch-size 2 or more") from None
        say("a training step")
        report["training_step"] = measure(step, device, threads, cfg.max_time, note).record(cfg.batch_size)
    if cfg.top or trace is not None:
        say("with torch.profiler")
        report["top_ops"] = profile_steps(lambda: (forward(), step() if step else None), device, TRACE_STEPS,
                                          cfg.top or 15, trace)
        report["trace"] = str(trace) if trace else None
    return report
