"""A finetune run's state: checks before training, building the pieces, checkpoints, resume, summary.

Checkpoints are plain dicts of tensors and plain types (``torch.load(weights_only=True)``
reads them) written atomically to OUT/last.pth every epoch; OUT/best.pth is a hard link
to (or a copy of) the epoch's last.pth when validation accuracy improves. Keys: arch,
classes, model, preprocess, config, epoch (epochs finished), best_metric, best_epoch,
optimizer, scheduler, scaler, rng (one entry per process), val_dir, val_files, history.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from torchtool.core import augment, traindata
from torchtool.core.checkpoint import is_torchtool_checkpoint, load_checkpoint, save_checkpoint, save_safetensors
from torchtool.core.data import ImageDataset, lower_priority, make_loader, preprocess_transform
from torchtool.core.device import Dist, amp_dtype, resolve_device, seed_everything
from torchtool.core.models import Preprocess, WeightsChoice, build_model, check_arch, resolve_weights
from torchtool.core.output import UsageError, atomic_path, check_writable, warn
from torchtool.core.train import FIXED_ON_RESUME, RESUMABLE, EpochSchedule, Skipped, Step, TrainConfig, build_optimizer, \
    freeze_backbone, param_groups
from torchtool.core.trainlog import TENSORBOARD_HINT, tensorboard_available

RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "curves.png")
# Settings that shape the learning-rate schedule or the optimizer's hyperparameters.
SCHEDULE_KEYS = ("epochs", "lr", "backbone_lr", "weight_decay", "schedule", "milestones", "gamma",
                 "warmup_epochs", "plateau_patience")


@dataclass
class Run:
    """What the checks found: data splits, output folder, architecture, weights, the checkpoint to resume."""

    cfg: TrainConfig
    out: Path
    splits: traindata.Splits
    arch: str
    weights: WeightsChoice | None
    checkpoint: dict[str, Any] | None
    export: Path | None
    tensorboard: bool
    preprocess: Preprocess | None = None


def prepare(cfg: TrainConfig, dist: Dist, *, resume: str | None, overwrite: bool, export: str | None,
            tensorboard: bool) -> Run:
    """Check every input before anything expensive happens; clear OUT for --overwrite."""
    out = Path(cfg.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {cfg.out} is a file", hint="give a folder for the run's checkpoints and logs")
    if resume is not None and overwrite:
        raise UsageError("--resume and --overwrite contradict each other", hint="continue a run, or start it again")
    checkpoint = _load_resume(out, resume, dist) if resume is not None else None
    if checkpoint is not None:
        cfg = resumed_config(cfg, checkpoint["config"], dist)  # before the data: --val-split and --seed may come from it
    if resume is None and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} already exists", hint="pass --resume to continue that run, --overwrite to start "
                         "it again, or choose another --out")
    splits = traindata.find_splits(cfg.data, cfg.val_split, cfg.seed)
    export_path = None
    if export:
        export_path = Path(export).expanduser().resolve()
        if export_path.suffix != ".safetensors":
            raise UsageError(f"--export-weights {export} must end in .safetensors")
        check_writable(export_path, overwrite or resume is not None)  # a resumed run may replace its own export
    weights = None
    if checkpoint is not None:
        arch = checkpoint["arch"]
        if list(checkpoint["classes"]) != splits.classes:
            raise UsageError("the data's classes differ from the checkpoint's",
                             hint="resume with the same DATA the run started with")
    else:
        if not cfg.model and not (cfg.weights.lower() != "none" and Path(cfg.weights).expanduser().is_file()):
            raise UsageError("--model is required", hint="e.g. --model resnet18, or --weights a torchtool checkpoint")
        weights = resolve_weights(cfg.model, cfg.weights)
        if cfg.model and weights.arch and weights.arch != cfg.model:
            raise UsageError(f"--weights {cfg.weights} holds a {weights.arch} model, not {cfg.model}",
                             hint=f"pass --model {weights.arch} or leave --model out")
        arch = check_arch(weights.arch or cfg.model or "")
    cfg.model = arch
    if cfg.sync_bn and dist.enabled and resolve_device(cfg.device, dist.local_rank).type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices: torch's SyncBatchNorm runs on GPUs only",
                         hint="leave out --sync-bn on CPU (each process then normalises over its own batch)")
    if tensorboard and not tensorboard_available():
        if dist.is_main:
            warn(TENSORBOARD_HINT)
        tensorboard = False
    if dist.is_main and overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    dist.barrier()  # every rank has looked at OUT before rank 0 writes to it
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return Run(cfg, out, splits, arch, weights, checkpoint, export_path, tensorboard)


def _load_resume(out: Path, resume: str, dist: Dist) -> dict[str, Any] | None:
    path = Path(resume).expanduser() if resume else out / "last.pth"
    if not path.is_file():
        if resume:
            raise UsageError(f"no such checkpoint: {resume}")
        if dist.is_main:
            warn(f"no checkpoint in {out} yet: starting a new run")
        return None
    state = load_checkpoint(path)
    if not is_torchtool_checkpoint(state) or "optimizer" not in state:
        raise UsageError(f"{path} is not a finetune checkpoint", hint="resume from OUT/last.pth or OUT/best.pth")
    return state


def resumed_config(cli: TrainConfig, stored: dict[str, Any], dist: Dist) -> TrainConfig:
    """The checkpoint's configuration, overridden by the options given on this command line.

    An option counts as given when it differs from its default, so `finetune DATA -o OUT --resume`
    continues the run as it was, and `--epochs 30 --resume` extends it.
    """
    values: dict[str, Any] = {}
    for f in fields(TrainConfig):
        now = getattr(cli, f.name)
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        given = f.name in RESUMABLE or f.name not in stored or (now != default and f.name not in cli._unset)
        values[f.name] = now if given else stored[f.name]
    changed = [k for k in values if k not in RESUMABLE and k in stored and values[k] != stored[k]]
    fixed = [k for k in changed if k in FIXED_ON_RESUME]
    if fixed:
        raise UsageError(f"cannot resume with a different {', '.join('--' + k.replace('_', '-') for k in fixed)}",
                         hint=f"the checkpoint was trained with {', '.join(f'{k}={stored[k]!r}' for k in fixed)}")
    if changed and dist.is_main:
        warn("resuming with settings that differ from the checkpoint's, so the run will not match an "
             "uninterrupted one: " + ", ".join(f"{k} {stored[k]!r} -> {values[k]!r}" for k in changed))
    return TrainConfig(**values)


def build(cfg: TrainConfig, run: Run, dist: Dist, device: torch.device) -> tuple[Step, EpochSchedule, nn.Module]:
    """Model (new head, frozen backbone, SyncBN, DDP), optimizer, schedule, loss, scaler, mixer."""
    seed_everything(cfg.seed)  # the same new head on every rank, and in every run with this seed
    ckpt = run.checkpoint
    if not dist.is_main:
        dist.barrier()  # let rank 0 fetch pretrained weights into the cache first
    built = build_model(run.arch, "none" if ckpt else run.weights, num_classes=len(run.splits.classes))
    if dist.is_main:
        dist.barrier()
    model = built.model
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        run.preprocess = Preprocess.from_dict(ckpt["preprocess"])
    else:
        run.preprocess = built.preprocess.resized(cfg.image_size)
    if cfg.sync_bn and dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cfg.sync_bn and dist.is_main:
        warn("--sync-bn only matters under torchrun with several processes; ignored")
    frozen = freeze_backbone(model, built.head) if cfg.freeze_backbone else []
    groups = param_groups(model, built.head, cfg)
    # channels_last: tensor cores on CUDA; on a 2-core CPU it measured 13-31% faster training steps at
    # 224 px (resnet18/50, mobilenet_v3_small, efficientnet_b0) and the same speed at 32 px.
    channels_last = device.type in ("cuda", "cpu")
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    wrapped = model
    if dist.enabled:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(groups, cfg)
    schedule = EpochSchedule(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype(device) == torch.float16)
    step = Step(wrapped, optimizer, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), scaler,
                augment.batch_mixer(len(run.splits.classes), cfg.mixup, cfg.cutmix), device, cfg,
                [p for g in groups if "no decay" not in g["name"] for p in g["params"]], frozen, channels_last)
    return step, schedule, model


@dataclass
class Loaders:
    train: Any
    val: Any


def loaders(cfg: TrainConfig, run: Run, dist: Dist, device: torch.device) -> Loaders:
    """Training loader (sharded, shuffled per epoch, seeded per sample) and this rank's validation shard."""
    from torch.utils.data import DistributedSampler, Subset

    pre, s = run.preprocess, run.splits
    fallback = (3, pre.crop_size, pre.crop_size)
    tf = augment.train_transform(cfg.augment, pre.crop_size, pre.resize_size, pre.mean, pre.std, pre.interpolation,
                                 cfg.rcm, cfg.rcm_neighbour)
    train = traindata.SeededSamples(ImageDataset(s.train_paths, tf, s.train_targets, fallback), cfg.seed)
    # DistributedSampler also with one process: the epoch's order depends on (seed, epoch) only.
    sampler = traindata.EpochSampler(DistributedSampler(train, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed))
    val = Subset(ImageDataset(s.val_paths, preprocess_transform(pre), s.val_targets, fallback),
                 traindata.shard(len(s.val_paths), dist.rank, dist.world_size))
    pin = device.type == "cuda"
    # A loader-owned generator: creating iterators must not draw from the global one (resume exactness).
    kwargs = {"pin_memory": pin, "seed": cfg.seed, "worker_init": lower_priority}
    # Drop the last partial batch (different images each epoch): a batch of one breaks BatchNorm.
    drop_last = len(sampler) >= cfg.batch_size
    return Loaders(make_loader(train, cfg.batch_size, cfg.workers, sampler=sampler, drop_last=drop_last, **kwargs),
                   make_loader(val, cfg.batch_size, cfg.workers, **kwargs))


def restore(run: Run, step: Step, schedule: EpochSchedule,
            dist: Dist) -> tuple[EpochSchedule, int, float, int, list[dict[str, Any]]]:
    """(schedule, first epoch to run, best val accuracy, best epoch, history) of the run to continue.

    Loads the optimizer, schedule, scaler and RNG states. When --resume changed the schedule
    (--epochs, --lr, --schedule, ...), the schedule is rebuilt from the new settings and
    replayed over the finished epochs instead, so the next epoch gets the learning rate the
    new settings prescribe (a cosine stretched to the new length, not one restarting).
    """
    ckpt = run.checkpoint
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
    if any(stored.get(k) != getattr(run.cfg, k) for k in SCHEDULE_KEYS):
        for group, new in zip(step.optimizer.param_groups, fresh):
            group.update(new, lr=new["initial_lr"])
        schedule = EpochSchedule(step.optimizer, run.cfg)
        with warnings.catch_warnings():  # replaying without optimizer steps is the point here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler", category=UserWarning)
            for row in history:
                schedule.step(row["val_acc"])
    else:
        schedule.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        step.scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"]
    if len(states) != dist.world_size and dist.is_main:
        warn(f"the checkpoint was written by {len(states)} process(es), this run has {dist.world_size}: "
             "random state is approximate")
    set_rng_state(states[dist.rank % len(states)])
    return schedule, int(ckpt["epoch"]), float(ckpt["best_metric"]), int(ckpt["best_epoch"]), history


def all_reduce(totals: torch.Tensor, dist: Dist) -> list[float]:
    """Sum over processes, then read back once: every rank gets the same numbers."""
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(totals)
    return totals.tolist()


@contextlib.contextmanager
def determinism(deterministic: bool):
    """--deterministic: deterministic algorithms and cuDNN; otherwise cuDNN autotuning. Restored after."""
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    # warn_only: an op without a deterministic kernel warns instead of stopping a long run.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = deterministic, not deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]


def rng_state() -> dict[str, Any]:
    """python, numpy, torch and CUDA generator states as plain types and tensors."""
    import numpy as np

    npst = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"key": npst["state"]["key"].tolist(), "pos": int(npst["state"]["pos"]),
                      "has_gauss": int(npst["has_gauss"]), "gauss": float(npst["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng(dist: Dist) -> list[dict[str, Any]]:
    """Every process's generator states, indexed by rank (a collective under torchrun)."""
    state = rng_state()
    if not dist.enabled:
        return [state]
    import torch.distributed as tdist

    states: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(states, state)
    return states


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
             "val_dir": str(s.val_dir), "val_files": s.val_files, "history": history}
    last = save_checkpoint(run.out / "last.pth", state)
    if improved:
        with atomic_path(run.out / "best.pth") as tmp:
            tmp.unlink()
            try:  # the bytes are already on disk: a hard link costs nothing
                os.link(last, tmp)
            except OSError:
                shutil.copyfile(last, tmp)


def note_skipped(skipped: tuple[Skipped, Skipped], dist: Dist, quiet: bool) -> None:
    """Merge every rank's unreadable images, and say so on stderr when new ones turn up."""
    for part, name in zip(skipped, ("training", "validation")):
        before = len(part.errors)
        if dist.enabled:
            import torch.distributed as tdist

            found: list[Any] = [None] * dist.world_size
            tdist.all_gather_object(found, part.errors)
            for errors in found:
                part.errors.update(errors)
        if len(part.errors) > before and dist.is_main and not quiet:
            warn(f"skipped {len(part.errors)} unreadable {name} image(s), e.g. "
                 f"{part.paths[next(iter(part.errors))]}: {next(iter(part.errors.values()))}")


def finish(run: Run, dist: Dist, skipped: tuple[Skipped, Skipped], *, best: tuple[float, int], stopped_early: bool,
           epochs_done: int, seconds: float) -> dict[str, Any]:
    """Export the best weights when asked; the run's summary."""
    best_path = run.out / "best.pth"
    if run.export is not None and dist.is_main:
        ckpt = load_checkpoint(best_path)
        save_safetensors(run.export, ckpt["model"], {"arch": run.arch, "classes": ckpt["classes"],
                                                     "preprocess": ckpt["preprocess"]})
    dist.barrier()
    listed = [{"path": str(part.paths[i]), "split": split, "error": e}
              for part, split in zip(skipped, ("train", "val")) for i, e in sorted(part.errors.items())]
    if listed and dist.is_main:  # even with --quiet: the run's exit code 3 needs its reason
        warn(f"{len(listed)} unreadable image(s) skipped ({len(skipped[0].errors)} training, "
             f"{len(skipped[1].errors)} validation); the summary lists them")
    return {"model": run.arch, "classes": len(run.splits.classes), "train_images": len(run.splits.train_paths),
            "val_images": len(run.splits.val_paths), "epochs": epochs_done, "best_epoch": best[1],
            "best_val_acc": best[0], "stopped_early": stopped_early, "skipped_images": len(listed),
            "out": str(run.out), "best": str(best_path), "last": str(run.out / "last.pth"),
            "metrics": str(run.out / "metrics.csv"), "curves": str(run.out / "curves.png"),
            "export": str(run.export) if run.export else None, "seconds": round(seconds, 2), "skipped": listed}
