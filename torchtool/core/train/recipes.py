"""Training recipes as small pieces: parameter groups, a frozen backbone, the optimizer, the epoch schedule."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from torchtool.core.output import first_line, warn
from torchtool.core.train.config import TrainConfig

# torch's warning when a scheduler steps before its optimizer ever did (said in our words instead)
_NO_STEP_YET = "Detected call of `lr_scheduler.step()` before `optimizer.step()`"

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def param_groups(model: nn.Module, head: str, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: head vs backbone (``--lr`` / ``--backbone-lr``), decay vs no decay.

    Biases and normalisation weights get weight_decay 0 unless ``--decay-all``; with
    ``--freeze-backbone`` only the head's parameters are trainable, so only they appear.
    """
    head_ids = {id(p) for p in model.get_submodule(head).parameters()}
    no_decay: set[int] = set()
    if not cfg.decay_all:
        for module in model.modules():
            if isinstance(module, NORM_LAYERS):
                no_decay.update(id(p) for p in module.parameters(recurse=False))
        no_decay.update(id(p) for name, p in model.named_parameters() if name.endswith("bias"))
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part, decay = ("head" if id(p) in head_ids else "backbone"), id(p) not in no_decay
        group = groups.setdefault((part, decay), {
            "name": part + ("" if decay else " (no decay)"), "params": [],
            "lr": cfg.lr if part == "head" else cfg.backbone_lr, "weight_decay": cfg.weight_decay if decay else 0.0})
        group["params"].append(p)
    order = [("head", True), ("head", False), ("backbone", True), ("backbone", False)]
    return [groups[k] for k in order if k in groups]


def freeze_backbone(model: nn.Module, head: str) -> list[nn.Module]:
    """Stop gradients to everything but the head; returns the backbone's norm layers to keep in eval mode.

    Frozen BatchNorm layers must not keep updating their running statistics, or the
    "frozen" features would drift under the head being trained.
    """
    head_module = model.get_submodule(head)
    head_ids = {id(p) for p in head_module.parameters()}
    for p in model.parameters():
        if id(p) not in head_ids:
            p.requires_grad_(False)
    in_head = set(head_module.modules())
    return [m for m in model.modules() if isinstance(m, NORM_LAYERS) and m not in in_head]


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, or AdamW; learning rates and weight decay come per group."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr)


class EpochSchedule:
    """torch's schedulers, stepped once per epoch: linear warm-up, then cosine/step/multistep/plateau.

    ``--milestones`` count epochs from the start of the run (warm-up included); plateau
    multiplies by ``--gamma`` when validation accuracy stalls for ``plateau_patience`` epochs.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        from torch.optim import lr_scheduler as sched

        # A warm-up as long as the run (a smoke test of a recipe) warms up over the whole run.
        w = min(cfg.warmup_epochs, cfg.epochs)
        main_epochs = max(1, cfg.epochs - w)
        # Start at lr/(w+1), not 0, so the first epoch is not wasted; reach lr after w epochs.
        warmup = sched.LinearLR(optimizer, start_factor=1 / (w + 1), total_iters=w) if w else None
        main: Any = None
        if cfg.schedule == "cosine":
            main = sched.CosineAnnealingLR(optimizer, T_max=main_epochs)
        elif cfg.schedule == "step":
            main = sched.StepLR(optimizer, step_size=cfg.milestones[0] if cfg.milestones else max(1, main_epochs // 3),
                                gamma=cfg.gamma)
        elif cfg.schedule == "multistep":
            main = sched.MultiStepLR(optimizer, [m - w for m in cfg.milestones if m > w], gamma=cfg.gamma)
        elif cfg.schedule == "plateau":
            main = sched.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.gamma, patience=cfg.plateau_patience)
        self.plateau, self.warmup_epochs, self.epochs_done = cfg.schedule == "plateau", w, 0
        if self.plateau:  # SequentialLR cannot hold ReduceLROnPlateau: step the two by hand
            self.parts = {"warmup": warmup, "main": main}
        elif warmup is not None and main is not None:
            self.parts = {"sequence": sched.SequentialLR(optimizer, [warmup, main], milestones=[w])}
        else:
            self.parts = {"sequence": warmup or main}

    def step(self, val_acc: float) -> None:
        """Call after each epoch: sets the learning rate of the next one."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self._step(val_acc)
        for w in caught:
            if str(w.message).startswith(_NO_STEP_YET):
                # fp16 mixed precision skips the steps whose gradients overflow; an epoch can skip them all
                warn(f"epoch {self.epochs_done} took no optimizer step (every step was skipped, e.g. mixed-precision "
                     "gradients that overflowed): the schedule moves on as planned")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def replay(self, val_accs: Iterable[float]) -> None:
        """Step through finished epochs without their optimizer steps (a resume with a changed schedule)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape(_NO_STEP_YET))
            for acc in val_accs:
                self._step(acc)

    def _step(self, val_acc: float) -> None:
        self.epochs_done += 1
        if self.plateau:
            if self.epochs_done <= self.warmup_epochs:
                self.parts["warmup"].step()
            else:
                self.parts["main"].step(val_acc)
        elif self.parts["sequence"] is not None:
            self.parts["sequence"].step()

    def state_dict(self) -> dict[str, Any]:
        return {"epochs_done": self.epochs_done,
                **{k: v.state_dict() if v is not None else None for k, v in self.parts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs_done = state["epochs_done"]
        for key, part in self.parts.items():
            if part is not None and state.get(key) is not None:
                part.load_state_dict(state[key])


class Ema:
    """An exponential moving average of ``model``'s weights and buffers (``--ema DECAY``).

    torch's own :class:`~torch.optim.swa_utils.AveragedModel` with
    :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`: after every optimizer step
    ``ema = decay * ema + (1 - decay) * weights`` (the first step copies the weights).
    BatchNorm statistics are averaged alike (``use_buffers``), so :attr:`module` is a
    model to validate and save as it is.
    """

    def __init__(self, model: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.source = model
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def update(self) -> None:
        self.averaged.update_parameters(self.source)

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


def compile_for_training(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(``torch.compile(model)``, the fallback) for ``--compile``; (model, None) with one line where
    torch.compile refuses at once (compilation itself happens, and may fail, at the first step)."""
    try:
        return torch.compile(model), model
    except Exception as exc:  # e.g. "Dynamo is not supported on Python 3.x"
        warn(f"--compile: torch.compile is not available here ({first_line(exc)[:300]}); training uncompiled")
        return model, None
