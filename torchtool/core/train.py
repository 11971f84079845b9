"""Fine-tuning: the training loop and its recipes (param groups, schedules, mixup, DDP, resume).

``fit(TrainConfig(...))`` is ``torchtool finetune`` from Python. The loop in :func:`_loop`
reads top to bottom; each recipe is a small named helper above it. Under torchrun every
process runs the same code: DistributedSampler shards the data, DDP averages gradients,
metrics are all-reduced so every rank agrees, and only rank 0 writes files or draws bars.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from torchtool.core import augment
from torchtool.core.device import Dist, autocast, close_distributed, init_distributed, resolve_device
from torchtool.core.output import Failure, UsageError, progress

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "multistep", "plateau", "none")
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# Settings that may change on --resume without changing the result, and settings that cannot change.
RESUMABLE = ("data", "out", "device", "workers", "strict")
FIXED_ON_RESUME = ("model", "optimizer", "freeze_backbone", "decay_all")


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in every checkpoint (``dataclasses.asdict``)."""

    data: str
    out: str
    model: str | None = None
    weights: str = "DEFAULT"
    val_split: float | None = None
    epochs: int = 10
    batch_size: int = 64  # per process: under torchrun the global batch is batch_size x processes
    workers: int = 4
    image_size: int | None = None  # None: the weights' own crop size
    augment: str = "standard"
    rcm: int = 0
    rcm_neighbour: int = 1
    optimizer: str | None = None  # None: sgd
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    backbone_lr: float | None = None  # None: same as lr
    freeze_backbone: bool = False
    weight_decay: float | None = None  # None: DEFAULT_WEIGHT_DECAY of the optimizer
    decay_all: bool = False
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    l1: float = 0.0
    clip_grad_norm: float | None = None
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0
    plateau_patience: int = 2
    patience: int | None = None  # early stopping: epochs without a better val accuracy
    seed: int = 0
    deterministic: bool = False
    amp: bool = False
    sync_bn: bool = False
    device: str = "auto"
    strict: bool = False

    def __post_init__(self) -> None:
        # Resolve defaults so the stored config holds the values actually used (remembering which
        # were left unset: --resume takes those from the checkpoint).
        self._unset = {k for k in ("optimizer", "lr", "backbone_lr", "weight_decay") if getattr(self, k) is None}
        self.optimizer = self.optimizer or "sgd"
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}", hint=f"choose from: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}", hint=f"choose from: {', '.join(SCHEDULES)}")
        if self.augment not in augment.AUGMENTS:
            raise UsageError(f"unknown augmentation {self.augment!r}", hint=f"choose from: {', '.join(augment.AUGMENTS)}")
        if self.schedule == "multistep" and not self.milestones:
            raise UsageError("--schedule multistep needs --milestones", hint="e.g. --milestones 30,60")
        if self.warmup_epochs >= self.epochs > 0 and self.warmup_epochs:
            raise UsageError(f"--warmup-epochs {self.warmup_epochs} leaves no epoch of the schedule",
                             hint=f"use fewer than --epochs {self.epochs}")
        self.lr = DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None else self.weight_decay
        self.backbone_lr = self.lr if self.backbone_lr is None else self.backbone_lr
        self.milestones = sorted(int(m) for m in self.milestones)


# --- recipes -------------------------------------------------------------------------------------


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

        w, main_epochs = cfg.warmup_epochs, max(1, cfg.epochs - cfg.warmup_epochs)
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


class Skipped:
    """Unreadable images met so far (index -> reason), for one split."""

    def __init__(self, paths: list[Path], strict: bool):
        self.paths, self.strict, self.errors = paths, strict, {}

    def drop(self, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor, errors: list[str]):
        ok = [not e for e in errors]
        for i, e in zip(indices.tolist(), errors):
            if e:
                if self.strict:
                    raise Failure(f"cannot read {self.paths[i]}: {e}", hint="remove it, or leave out --strict to skip it")
                self.errors[i] = e
        keep = torch.tensor(ok)
        return images[keep], targets[keep]


def _forward_loss(step: Step, images: torch.Tensor, targets: torch.Tensor):
    """Logits and the task loss (label smoothing, MixUp/CutMix) of one batch."""
    inputs, soft = step.mixer(images, targets) if step.mixer is not None else (images, targets)
    with autocast(step.device, step.cfg.amp):
        logits = step.model(inputs)
        loss = step.criterion(logits, soft)
    return logits, loss


def train_one_epoch(step: Step, loader: Any, skipped: Skipped, bar: Any) -> torch.Tensor:
    """One pass over the training data; returns [loss sum, correct, images] (on the device)."""
    step.model.train()
    for module in step.frozen_norms:
        module.eval()
    dev, seen, shown = step.device, 0, time.monotonic()
    # Running sums stay on the device: reading them (.item()) each batch would force a sync.
    totals = torch.zeros(2, dtype=torch.float64, device=dev)
    for images, targets, indices, errors in loader:
        whole = images
        if any(errors):
            images, targets = skipped.drop(images, targets, indices, errors)
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
        logits, loss = _forward_loss(step, images, targets)
        total = loss if n else loss * 0.0
        if step.cfg.l1 and n:
            total = total + step.cfg.l1 * sum(p.abs().sum() for p in step.l1_params)
        step.optimizer.zero_grad(set_to_none=True)
        step.scaler.scale(total).backward()
        if step.cfg.clip_grad_norm:
            step.scaler.unscale_(step.optimizer)  # clip the true gradients, not the fp16-scaled ones
            nn.utils.clip_grad_norm_([p for g in step.optimizer.param_groups for p in g["params"]],
                                     step.cfg.clip_grad_norm)
        step.scaler.step(step.optimizer)
        step.scaler.update()
        if n:
            totals += torch.stack([loss.detach().double() * n, (logits.argmax(1) == targets).sum().double()])
            seen += n
        if not bar.disable and time.monotonic() - shown > 1:  # only when a person watches: one sync a second
            shown = time.monotonic()
            t = totals.tolist()
            bar.set_postfix(loss=f"{t[0] / max(seen, 1):.4f}", acc=f"{t[1] / max(seen, 1):.3f}",
                            lr=f"{step.optimizer.param_groups[0]['lr']:.3g}", refresh=False)
    return torch.cat([totals, totals.new_tensor([seen])])


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, step: Step, skipped: Skipped, bar: Any) -> torch.Tensor:
    """[loss sum, correct, images] over this process's share of the validation data (plain cross-entropy)."""
    model.eval()
    dev, seen = step.device, 0
    totals = torch.zeros(2, dtype=torch.float64, device=dev)
    for images, targets, indices, errors in loader:
        if any(errors):
            images, targets = skipped.drop(images, targets, indices, errors)
        bar.update(len(errors))
        if targets.shape[0] == 0:
            continue
        images, targets = images.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
        if step.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(dev, step.cfg.amp):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        totals += torch.stack([loss.double(), (logits.argmax(1) == targets).sum().double()])
        seen += targets.shape[0]
    return torch.cat([totals, totals.new_tensor([seen])])


def fit(cfg: TrainConfig, *, resume: str | None = None, overwrite: bool = False, quiet: bool = False,
        tensorboard: bool = False, export: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` and return the run's summary (best epoch, accuracy, paths, skipped images).

    ``resume``: "" for OUT/last.pth (starting afresh when there is none), or a checkpoint path.
    """
    from torchtool.core import runstate

    dist = init_distributed(cfg.device)
    try:
        run = runstate.prepare(cfg, dist, resume=resume, overwrite=overwrite, export=export, tensorboard=tensorboard)
        with runstate.determinism(run.cfg.deterministic):
            return _loop(run.cfg, run, dist, quiet=quiet)  # run.cfg: with --resume, merged with the checkpoint's
    finally:
        close_distributed()


def _loop(cfg: TrainConfig, run: Any, dist: Dist, *, quiet: bool) -> dict[str, Any]:
    from torchtool.core import runstate
    from torchtool.core.trainlog import RunLog

    # --- setup: device, model, data, optimizer, schedule ---
    device = resolve_device(cfg.device, dist.local_rank)
    step, schedule, model = runstate.build(cfg, run, dist, device)
    loaders = runstate.loaders(cfg, run, dist, device)
    skipped = (Skipped(run.splits.train_paths, cfg.strict), Skipped(run.splits.val_paths, cfg.strict))
    schedule, start, best_acc, best_epoch, history = runstate.restore(run, step, schedule, dist)
    log = RunLog(run.out, history, cfg.epochs, tensorboard=run.tensorboard, quiet=quiet) if dist.is_main else None
    stopped_early, done, began = False, start, time.perf_counter()

    # --- the loop: train, validate, schedule, checkpoint, log ---
    for epoch in range(start, cfg.epochs):
        if cfg.patience and epoch - best_epoch >= cfg.patience:
            stopped_early = True  # checked before the epoch, so a resumed run stops where this one would
            break
        t0 = time.perf_counter()
        loaders.train.sampler.set_epoch(epoch)  # this epoch's order and augmentations, same on resume
        seen = min(len(loaders.train.sampler), len(loaders.train) * cfg.batch_size)  # drop_last drops a few
        with progress(total=seen, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img",
                      quiet=quiet or not dist.is_main) as bar:
            train = runstate.all_reduce(train_one_epoch(step, loaders.train, skipped[0], bar), dist)
        with progress(total=len(loaders.val.dataset), desc="validate", unit="img",
                      quiet=quiet or not dist.is_main) as bar:
            val = runstate.all_reduce(evaluate(model, loaders.val, step, skipped[1], bar), dist)
        row = {"epoch": epoch + 1, "train_loss": train[0] / max(train[2], 1), "train_acc": train[1] / max(train[2], 1),
               "val_loss": val[0] / max(val[2], 1), "val_acc": val[1] / max(val[2], 1),
               "lr": step.optimizer.param_groups[0]["lr"], "seconds": 0.0}
        schedule.step(row["val_acc"])
        improved = row["val_acc"] > best_acc
        if improved:
            best_acc, best_epoch = row["val_acc"], epoch + 1
        runstate.note_skipped(skipped, dist, quiet)
        rng = runstate.gather_rng(dist)  # a collective: every rank takes part
        history.append(row)
        done = epoch + 1
        if dist.is_main:
            row["seconds"] = time.perf_counter() - t0  # so far; the log adds the checkpoint and plot time
            runstate.save(run, step, schedule, model, epoch=done, best=(best_acc, best_epoch), history=history,
                          rng=rng, improved=improved)
            log.epoch(row, started=t0)
        dist.barrier()  # nobody starts the next epoch (or exits) before the checkpoint is on disk

    # --- finish: export the best weights, summarise ---
    if log is not None:
        log.close()
    del loaders  # shut the loader workers down now, not whenever a garbage collection finds them
    return runstate.finish(run, dist, skipped, best=(best_acc, best_epoch), stopped_early=stopped_early,
                           epochs_done=done, seconds=time.perf_counter() - began)
