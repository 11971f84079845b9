"""One epoch of training, and one pass of validation (through the shared inference loop)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from torchtool.core import infer
from torchtool.core.infer import BadInputs
from torchtool.core.output import Failure, first_line, warn
from torchtool.core.runtime import autocast
from torchtool.core.train.config import TrainConfig


@dataclass
class Step:
    """What one optimisation step needs, built once from the config."""

    model: nn.Module  # DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    scaler: Any
    mixer: Any
    device: torch.device
    cfg: TrainConfig
    l1_params: list[torch.Tensor]
    frozen_norms: list[nn.Module]
    channels_last: bool
    ema: Any = None  # recipes.Ema, updated after every optimizer step
    uncompiled: nn.Module | None = None  # with --compile, until the first step has compiled: the fallback


def _forward_loss(step: Step, images: torch.Tensor, targets: torch.Tensor):
    """Logits and the task loss (label smoothing, MixUp/CutMix) of one batch."""
    inputs, soft = step.mixer(images, targets) if step.mixer is not None else (images, targets)
    with autocast(step.device, step.cfg.amp):
        logits = step.model(inputs)
        loss = step.criterion(logits, soft)
    return logits, loss


def _backward(step: Step, images: torch.Tensor, targets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss (+ L1) and backward of one batch: (logits, task loss).

    The first step of a ``--compile``d model is where torch.compile compiles; when that
    fails here (no C++ compiler, an unsupported backend) one line says why and the step is
    redone, and the run goes on, uncompiled.
    """
    def attempt() -> tuple[torch.Tensor, torch.Tensor]:
        logits, loss = _forward_loss(step, images, targets)
        total = loss if n else loss * 0.0
        if step.cfg.l1 and n:
            total = total + step.cfg.l1 * sum(p.abs().sum() for p in step.l1_params)
        step.optimizer.zero_grad(set_to_none=True)
        step.scaler.scale(total).backward()
        return logits, loss

    if step.uncompiled is None:
        return attempt()
    try:
        return attempt()
    except Exception as exc:  # any compiler failure; the model's own errors recur uncompiled
        warn(f"--compile: torch.compile could not compile the model here ({first_line(exc)[:300]}); "
             "training uncompiled")
        step.model = step.uncompiled
        return attempt()
    finally:
        step.uncompiled = None


def train_one_epoch(step: Step, loader: Any, bad: BadInputs, bar: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the training data: ([loss sum, correct, non-finite batches, images], first non-finite batch).

    Both on the device (the first non-finite batch is -1 when there was none); all-reduce the
    sums, then :func:`check_epoch`.
    """
    step.model.train()
    for module in step.frozen_norms:
        module.eval()
    dev, seen, shown = step.device, 0, time.monotonic()
    # Running sums stay on the device: reading them (.item()) each batch would force a sync.
    totals = torch.zeros(3, dtype=torch.float64, device=dev)
    first_bad = torch.full((), -1, dtype=torch.long, device=dev)
    for batch_no, (images, targets, indices, errors) in enumerate(loader):
        whole = images
        good = bad.check(indices.tolist(), errors)
        if good is not None:
            images, targets = images[good], targets[good]
        n = targets.shape[0]
        bar.update(len(errors))
        if n == 0:
            if not isinstance(step.model, nn.parallel.DistributedDataParallel):
                continue
            # Every image unreadable: the other processes still expect this step's all-reduce,
            # so take part with a zero loss (the placeholder images touch only BatchNorm statistics).
            images, targets = whole, torch.zeros(len(errors), dtype=torch.long)
        images = images.to(dev, non_blocking=True)
        targets = targets.to(dev, non_blocking=True)
        if step.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits, loss = _backward(step, images, targets, n)
        if step.cfg.clip_grad_norm:
            step.scaler.unscale_(step.optimizer)  # clip the true gradients, not the fp16-scaled ones
            nn.utils.clip_grad_norm_([p for g in step.optimizer.param_groups for p in g["params"]],
                                     step.cfg.clip_grad_norm)
        step.scaler.step(step.optimizer)
        step.scaler.update()
        if step.ema is not None:
            step.ema.update()
        if n:
            finite = torch.isfinite(loss.detach())
            first_bad = torch.where((first_bad < 0) & ~finite, batch_no, first_bad)
            totals += torch.stack([loss.detach().double() * n, (logits.argmax(1) == targets).sum().double(),
                                   (~finite).double()])
            seen += n
        if not bar.disable and time.monotonic() - shown > 1:  # only when a person watches: one sync a second
            shown = time.monotonic()
            t = totals.tolist()
            bar.set_postfix(loss=f"{t[0] / max(seen, 1):.4f}", acc=f"{t[1] / max(seen, 1):.3f}",
                            lr=f"{step.optimizer.param_groups[0]['lr']:.3g}", refresh=False)
    return torch.cat([totals, totals.new_tensor([seen])]), first_bad


def check_epoch(sums: list[float], first_bad: torch.Tensor, epoch: int) -> None:
    """Fail the run, before its checkpoint, when epoch ``epoch`` (from 1) diverged or read no image.

    ``sums`` are :func:`train_one_epoch`'s sums over every process (the same on each, so every
    rank stops together).
    """
    if sums[3] == 0:
        raise Failure(f"epoch {epoch}: no training image could be read",
                      hint="fix or remove the unreadable images (--strict names the first); OUT/last.pth, if any, "
                      "holds the last good epoch")
    if sums[2]:
        where = int(first_bad.item())
        at = f", batch {where + 1}" if where >= 0 else ""  # another process met it first
        raise Failure(f"the training loss is not finite at epoch {epoch}{at}: the run diverged",
                      hint="lower --lr or set --clip-grad-norm, then rerun; OUT/last.pth holds the last good epoch")


TOP_K = 5  # the second accuracy of the log, capped at the class count


def validate(model: nn.Module, loader: Any, step: Step, bad: BadInputs, bar: Any) -> torch.Tensor:
    """[loss sum, correct, correct in the top 5, images] over this process's share of the validation data.

    The loss is plain cross-entropy; "top 5" is top-min(5, classes).
    """
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=step.device)
    seen = 0
    for batch in infer.run(model, loader, step.device, bad=bad, amp=step.cfg.amp, channels_last=step.channels_last,
                           bar=bar):
        if batch.outputs is None:
            continue
        logits, targets = batch.outputs.float(), batch.targets
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
        top = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices
        totals += torch.stack([loss.double(), (top[:, 0] == targets).sum().double(),
                               (top == targets[:, None]).any(dim=1).sum().double()])
        seen += targets.shape[0]
    return torch.cat([totals, totals.new_tensor([seen])])
