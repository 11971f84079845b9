"""A finetune run on disk: checkpoints, and resuming one (settings, optimizer, schedule, random state).

Checkpoints are plain dicts of tensors and plain types (``torch.load(weights_only=True)``
reads them) written atomically to OUT/last.pth every epoch; OUT/best.pth is the epoch's
checkpoint without the optimizer state, when validation accuracy improves. Keys: arch,
classes, model, preprocess, config, epoch (epochs finished), best_metric, best_epoch,
optimizer, scheduler, scaler, rng (one entry per process), val_dir, val_files, image_files (both
splits' files, so --resume can tell when the data changed), history.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch.nn as nn

from torchtool.core.data.folders import Splits
from torchtool.core.env import run_versions
from torchtool.core.files import atomic_path, atomic_write_text
from torchtool.core.models.timm_models import source_versions
from torchtool.core.models.checkpoint import is_torchtool_checkpoint, load_checkpoint, save_checkpoint, write_checkpoint
from torchtool.core.models.preprocess import Preprocess
from torchtool.core.models.weights import WeightsChoice
from torchtool.core.output import UsageError, info, to_json, warn
from torchtool.core.runtime import Dist, set_rng_state
from torchtool.core.train.config import FIXED_ON_RESUME, RESUMABLE, TrainConfig
from torchtool.core.train.epoch import Step
from torchtool.core.train.recipes import EpochSchedule

RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "curves.png", "config.json")  # and best-N.pth (Best)
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


@dataclass
class Best:
    """The best epochs so far, best first, as [metric, epoch] pairs: at most ``keep`` (``--keep-best``).

    Their checkpoints are OUT/best.pth (the best), then OUT/best-2.pth ... best-N.pth; an
    epoch enters ahead of those it beats (a tie keeps the earlier epoch ahead).
    """

    keep: int = 1
    ranked: list[list[float]] = field(default_factory=list)

    @property
    def metric(self) -> float:
        return self.ranked[0][0] if self.ranked else -1.0

    @property
    def epoch(self) -> int:
        return int(self.ranked[0][1]) if self.ranked else 0

    def add(self, metric: float, epoch: int) -> int | None:
        """Rank an epoch: where it entered (0: the new best), None when it is not among the best."""
        at = next((i for i, (m, _) in enumerate(self.ranked) if metric > m), len(self.ranked))
        if at >= self.keep:
            return None
        self.ranked.insert(at, [metric, epoch])
        del self.ranked[self.keep:]
        return at

    @staticmethod
    def path(out: Path, rank: int) -> Path:
        return out / ("best.pth" if rank == 0 else f"best-{rank + 1}.pth")

    def files(self, out: Path) -> list[Path]:
        """Every ranked checkpoint file there may be in ``out``, kept or not (best-N.pth beyond ``keep`` too)."""
        ranked = [(int(p.stem[5:]), p) for p in out.glob("best-*.pth") if p.stem[5:].isdigit()]
        return [self.path(out, 0), *(p for _, p in sorted(ranked))]


def load_resume(out: Path, resume_from: str | None, quiet: bool = False) -> dict[str, Any] | None:
    """The checkpoint to continue: ``resume_from``, else OUT/last.pth (None when there is none yet)."""
    path = Path(resume_from).expanduser() if resume_from else out / "last.pth"
    if not path.is_file():
        if resume_from:
            raise UsageError(f"no such checkpoint: {resume_from}")
        info(f"no checkpoint in {out} yet: starting a new run (next time, leave out --resume to start one)", quiet)
        return None
    state = load_checkpoint(path)
    if not is_torchtool_checkpoint(state) or not {"config", "epoch", "history", "rng"} <= state.keys():
        raise UsageError(f"{path} is not a finetune checkpoint", hint="resume from OUT/last.pth or OUT/best.pth")
    if "optimizer" not in state:
        warn(f"{path} holds no optimizer state (best checkpoints leave it out): the optimizer starts afresh from "
             "its weights; OUT/last.pth continues exactly")
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
            dist: Dist) -> tuple[EpochSchedule, int, Best, list[dict[str, Any]]]:
    """(schedule, first epoch to run, the best epochs, history) of the run to continue.

    Loads the optimizer, schedule, scaler, EMA and RNG states. When --resume changed the schedule
    (--epochs, --lr, --schedule, ...), the schedule is rebuilt from the new settings and
    replayed over the finished epochs instead, so the next epoch gets the learning rate the
    new settings prescribe (a cosine stretched to the new length, not one restarting).
    """
    ckpt = checkpoint
    if ckpt is None:
        return schedule, 0, Best(cfg.keep_best), []
    fresh = [{k: g[k] for k in ("initial_lr", "weight_decay")} for g in step.optimizer.param_groups]
    try:  # after the schedulers were built: building them rewrites the learning rates this restores
        if "optimizer" in ckpt:  # a best.pth has none: the optimizer starts afresh (load_resume said so)
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
    if step.ema is not None:
        if ckpt.get("ema"):
            step.ema.load_state_dict(ckpt["ema"])
        else:
            warn("the checkpoint has no EMA of its weights (it was trained without --ema): the average starts now")
    states = ckpt["rng"]
    if len(states) != dist.world_size:
        warn(f"the checkpoint was written by {len(states)} process(es), this run has {dist.world_size}: "
             "random state is approximate")
    set_rng_state(states[dist.rank % len(states)])
    ranked = ckpt.get("best_ranked") or ([[float(ckpt["best_metric"]), int(ckpt["best_epoch"])]]
                                         if int(ckpt["best_epoch"]) else [])
    return schedule, int(ckpt["epoch"]), Best(cfg.keep_best, [list(r) for r in ranked[: cfg.keep_best]]), history


def save(run: Run, step: Step, schedule: EpochSchedule, model: nn.Module, *, epoch: int, best: Best,
         history: list[dict[str, Any]], rng: list[dict[str, Any]], at: int | None, source: str) -> None:
    """OUT/last.pth, and the epoch's ranked checkpoint when it entered ``best`` at ``at``; all atomic.

    ``source`` is "model" or "ema": the weights that reached the epoch's metric. Written
    before the next epoch starts: writing on a background thread measured slower on a 2-core
    CPU (the writer competes with the training threads for cores and the GIL).
    """
    s = run.splits
    state = {"arch": run.arch, "classes": s.classes, "model": model.state_dict(),
             "preprocess": run.preprocess.to_dict(), "config": asdict(run.cfg), "epoch": epoch,
             "best_metric": best.metric, "best_epoch": best.epoch, "best_ranked": best.ranked,
             "optimizer": step.optimizer.state_dict(), "scheduler": schedule.state_dict(),
             "scaler": step.scaler.state_dict(), "rng": rng, "val_dir": str(s.val_dir), "val_files": s.val_files,
             "image_files": run.image_files, "history": history, **source_versions(run.arch)}
    if step.ema is not None:
        state["ema"] = step.ema.state_dict()
    save_checkpoint(run.out / "last.pth", state)
    for stale in best.files(run.out)[best.keep:]:  # --keep-best lowered on --resume
        stale.unlink(missing_ok=True)
    if at is None:
        return
    # the ranked checkpoints hold weights to use, not a run to continue: no optimizer state (as large
    # as the weights again with SGD momentum, twice that with AdamW) and no second copy for the EMA
    kept = {k: v for k, v in state.items() if k not in ("optimizer", "scaler", "ema")}
    if source == "ema":  # the average did better: that checkpoint holds the average's weights
        kept.update(model=step.ema.module.state_dict(), weights_from="ema")
    with atomic_path(Best.path(run.out, at)) as tmp:  # written whole before the ones it beat move down
        write_checkpoint(tmp, kept)
        for rank in range(len(best.ranked) - 1, at, -1):  # the ones it beat move down a place
            if Best.path(run.out, rank - 1).exists():
                os.replace(Best.path(run.out, rank - 1), Best.path(run.out, rank))


def write_run_config(run: Run, argv: list[str], started_epoch: int) -> None:
    """OUT/config.json: every setting, the versions, and each command line that ran (or resumed) the run."""
    import json
    import shlex
    import time

    path = run.out / "config.json"
    commands = []
    if started_epoch and path.is_file():
        with contextlib.suppress(ValueError, OSError):
            commands = list(json.loads(path.read_text(encoding="utf-8")).get("commands", []))
    commands.append({"command": shlex.join(["torchtool", *argv[1:]]), "argv": list(argv), "from_epoch": started_epoch,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    data = {"config": asdict(run.cfg), "arch": run.arch, "classes": run.splits.classes,
            "preprocess": run.preprocess.to_dict(),
            "versions": run_versions(),
            "commands": commands}
    atomic_write_text(path, to_json(data) + "\n")
