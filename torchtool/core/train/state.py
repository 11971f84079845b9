"""A finetune run on disk: checkpoints, and resuming one (settings, optimizer, schedule, random state).

Checkpoints are plain dicts of tensors and plain types (``torch.load(weights_only=True)``
reads them) written atomically to OUT/last.pth every epoch; OUT/best.pth is a hard link
to (or a copy of) the epoch's last.pth when validation accuracy improves. Keys: arch,
classes, model, preprocess, config, epoch (epochs finished), best_metric, best_epoch,
optimizer, scheduler, scaler, rng (one entry per process), val_dir, val_files, image_files (both
splits' files, so --resume can tell when the data changed), history.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch.nn as nn

from torchtool.core.data.folders import Splits
from torchtool.core.files import atomic_path
from torchtool.core.models.checkpoint import is_torchtool_checkpoint, load_checkpoint, save_checkpoint
from torchtool.core.models.preprocess import Preprocess
from torchtool.core.models.weights import WeightsChoice
from torchtool.core.output import UsageError, info, warn
from torchtool.core.runtime import Dist, set_rng_state
from torchtool.core.train.config import FIXED_ON_RESUME, RESUMABLE, TrainConfig
from torchtool.core.train.epoch import Step
from torchtool.core.train.recipes import EpochSchedule

RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "curves.png")
# Settings that shape the learning-rate schedule or the optimizer's hyperparameters.
SCHEDULE_KEYS = ("epochs", "lr", "backbone_lr", "weight_decay", "schedule", "milestones", "gamma",
                 "warmup_epochs", "plateau_patience")


@dataclass
class Run:
    """What the checks found: data splits, output folder, architecture, weights, the checkpoint to resume."""

    cfg: TrainConfig
    out: Path
    splits: Splits
    arch: str
    weights: WeightsChoice | None
    checkpoint: dict[str, Any] | None
    export: Path | None
    tensorboard: bool
    preprocess: Preprocess | None = None
    image_files: dict[str, list[str]] | None = None  # splits.image_files(), computed once per run


def load_resume(out: Path, resume_from: str | None, quiet: bool = False) -> dict[str, Any] | None:
    """The checkpoint to continue: ``resume_from``, else OUT/last.pth (None when there is none yet)."""
    path = Path(resume_from).expanduser() if resume_from else out / "last.pth"
    if not path.is_file():
        if resume_from:
            raise UsageError(f"no such checkpoint: {resume_from}")
        info(f"no checkpoint in {out} yet: starting a new run (next time, leave out --resume to start one)", quiet)
        return None
    state = load_checkpoint(path)
    if not is_torchtool_checkpoint(state) or "optimizer" not in state:
        raise UsageError(f"{path} is not a finetune checkpoint", hint="resume from OUT/last.pth or OUT/best.pth")
    return state


def resumed_config(cli: TrainConfig, stored: dict[str, Any], given: Collection[str] = ()) -> TrainConfig:
    """The checkpoint's configuration, overridden by the options ``given`` on this command line.

    ``given`` names the settings the user set (the command asks click where each value came
    from, never compares it with the default), so `finetune DATA -o OUT --resume` continues
    the run as it was, and `--resume --epochs 10` extends it even though 10 is the default.
    """
    values: dict[str, Any] = {}
    for f in fields(TrainConfig):
        take = f.name in RESUMABLE or f.name in given or f.name not in stored
        values[f.name] = getattr(cli, f.name) if take else stored[f.name]
    changed = [k for k in values if k not in RESUMABLE and k in stored and values[k] != stored[k]]
    fixed = [k for k in changed if k in FIXED_ON_RESUME]
    if fixed:
        raise UsageError(f"cannot resume with a different {', '.join('--' + k.replace('_', '-') for k in fixed)}",
                         hint=f"the checkpoint was trained with {', '.join(f'{k}={stored[k]!r}' for k in fixed)}")
    if changed:
        warn("resuming with settings that differ from the checkpoint's, so the run will not match an "
             "uninterrupted one: " + ", ".join(f"{k} {stored[k]!r} -> {values[k]!r}" for k in changed))
    return TrainConfig(**values)


def restore(checkpoint: dict[str, Any] | None, cfg: TrainConfig, step: Step, schedule: EpochSchedule,
            dist: Dist) -> tuple[EpochSchedule, int, float, int, list[dict[str, Any]]]:
    """(schedule, first epoch to run, best val accuracy, best epoch, history) of the run to continue.

    Loads the optimizer, schedule, scaler and RNG states. When --resume changed the schedule
    (--epochs, --lr, --schedule, ...), the schedule is rebuilt from the new settings and
    replayed over the finished epochs instead, so the next epoch gets the learning rate the
    new settings prescribe (a cosine stretched to the new length, not one restarting).
    """
    ckpt = checkpoint
    if ckpt is None:
        return schedule, 0, -1.0, 0, []
    fresh = [{k: g[k] for k in ("initial_lr", "weight_decay")} for g in step.optimizer.param_groups]
    try:  # after the schedulers were built: building them rewrites the learning rates this restores
        step.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise UsageError(f"the checkpoint's optimizer state does not fit this run ({exc})",
                         hint="resume with the same --freeze-backbone/--decay-all/--optimizer") from None
    history = list(ckpt["history"])
    stored = ckpt["config"]
    if any(stored.get(k) != getattr(cfg, k) for k in SCHEDULE_KEYS):
        for group, new in zip(step.optimizer.param_groups, fresh):
            group.update(new, lr=new["initial_lr"])
        schedule = EpochSchedule(step.optimizer, cfg)
        schedule.replay(row["val_acc"] for row in history)
    else:
        schedule.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        step.scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"]
    if len(states) != dist.world_size:
        warn(f"the checkpoint was written by {len(states)} process(es), this run has {dist.world_size}: "
             "random state is approximate")
    set_rng_state(states[dist.rank % len(states)])
    return schedule, int(ckpt["epoch"]), float(ckpt["best_metric"]), int(ckpt["best_epoch"]), history


def save(run: Run, step: Step, schedule: EpochSchedule, model: nn.Module, *, epoch: int, best: tuple[float, int],
         history: list[dict[str, Any]], rng: list[dict[str, Any]], improved: bool) -> None:
    """OUT/last.pth, and OUT/best.pth when this epoch improved; both atomic.

    Written before the next epoch starts: writing on a background thread measured slower on a
    2-core CPU (the writer competes with the training threads for cores and the GIL).
    """
    s = run.splits
    state = {"arch": run.arch, "classes": s.classes, "model": model.state_dict(),
             "preprocess": run.preprocess.to_dict(), "config": asdict(run.cfg), "epoch": epoch,
             "best_metric": best[0], "best_epoch": best[1], "optimizer": step.optimizer.state_dict(),
             "scheduler": schedule.state_dict(), "scaler": step.scaler.state_dict(), "rng": rng,
             "val_dir": str(s.val_dir), "val_files": s.val_files, "image_files": run.image_files, "history": history}
    last = save_checkpoint(run.out / "last.pth", state)
    if improved:
        with atomic_path(run.out / "best.pth") as tmp:
            tmp.unlink()
            try:  # the bytes are already on disk: a hard link costs nothing
                os.link(last, tmp)
            except OSError:
                shutil.copyfile(last, tmp)
