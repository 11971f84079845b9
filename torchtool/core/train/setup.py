"""Before the first epoch: check the inputs, build the model and its optimizer, make the loaders."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from torchtool.core.data.folders import changed_files, find_splits
from torchtool.core.data.images import DecodeFloor
from torchtool.core.data.loading import EpochSampler, ImageDataset, SeededSamples, cap_workers, make_loader, shard
from torchtool.core.data.transforms import preprocess_transform
from torchtool.core.files import LOCK_NAME, check_writable, run_lock, writable_dir
from torchtool.core.models.build import build_model
from torchtool.core.models.names import check_arch
from torchtool.core.models.preprocess import Preprocess
from torchtool.core.models.weights import resolve_weights
from torchtool.core.output import UsageError, warn
from torchtool.core.runtime import Dist, amp_dtype, resolve_device, seed_everything
from torchtool.core.train import augment
from torchtool.core.train.config import TrainConfig
from torchtool.core.train.epoch import Step
from torchtool.core.train.log import TENSORBOARD_HINT, tensorboard_available
from torchtool.core.train.recipes import (Ema, EpochSchedule, build_optimizer, compile_for_training, freeze_backbone,
                                          param_groups)
from torchtool.core.train.state import RUN_FILES, Run, load_resume, resumed_config


def prepare(cfg: TrainConfig, dist: Dist, held: contextlib.ExitStack, *, resume: bool, resume_from: str | None,
            overwrite: bool, export: str | None, tensorboard: bool, given: Collection[str] = (),
            quiet: bool = False) -> Run:
    """Check every input before anything expensive happens; clear OUT for --overwrite.

    With ``resume`` (OUT/last.pth) or ``resume_from`` (a checkpoint) the checkpoint's settings
    are taken, except those named in ``given``. OUT is locked for the run in ``held``.
    """
    out = writable_dir(cfg.out).resolve()
    resume = resume or resume_from is not None
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other", hint="continue a run, or start it again")
    checkpoint = load_resume(out, resume_from, quiet) if resume else None
    if checkpoint is not None:  # before the data: --val-split and --seed may come from it
        cfg = resumed_config(cfg, checkpoint["config"], given)
    if not resume and out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()) and not overwrite:
        raise UsageError(f"{out} already exists", hint="pass --resume to continue that run, --overwrite to start "
                         "it again, or choose another --out")
    splits = find_splits(cfg.data, cfg.val_split, cfg.seed)
    export_path = None
    if export:
        export_path = Path(export).expanduser().resolve()
        if export_path.suffix != ".safetensors":
            raise UsageError(f"--export-weights {export} must end in .safetensors")
        check_writable(export_path, overwrite or resume)  # a resumed run may replace its own export
    weights = None
    image_files = splits.image_files()
    if checkpoint is not None:
        arch = checkpoint["arch"]
        if list(checkpoint["classes"]) != splits.classes:
            raise UsageError("the data's classes differ from the checkpoint's",
                             hint="resume with the same DATA the run started with")
        changed = changed_files(checkpoint["image_files"], image_files) if "image_files" in checkpoint else []
        if changed:
            warn(f"the images in {cfg.data} differ from those the run started with ({'; '.join(changed)}): "
                 "the resumed run will not match an uninterrupted one")
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
        warn(TENSORBOARD_HINT)
        tensorboard = False
    if cfg.warmup_covers_run:
        warn(f"--warmup-epochs {cfg.warmup_epochs} covers the whole run (--epochs {cfg.epochs}): the learning "
             "rate only warms up, the schedule never starts")
    held.enter_context(run_lock(out, dist.is_main))  # before --overwrite clears anything
    if dist.is_main and overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    dist.barrier()  # every rank has looked at OUT before rank 0 writes to it
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return Run(cfg, out, splits, arch, weights, checkpoint, export_path, tensorboard, image_files=image_files)


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
        run.preprocess = built.preprocessing(cfg.image_size, crop_pct=cfg.crop_pct,
                                             interpolation=cfg.interpolation)
    if cfg.sync_bn and dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cfg.sync_bn:
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
    uncompiled = None
    if cfg.compile:
        wrapped, uncompiled = compile_for_training(wrapped)
    optimizer = build_optimizer(groups, cfg)
    schedule = EpochSchedule(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype(device) == torch.float16)
    step = Step(wrapped, optimizer, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), scaler,
                augment.batch_mixer(len(run.splits.classes), cfg.mixup, cfg.cutmix), device, cfg,
                [p for g in groups if "no decay" not in g["name"] for p in g["params"]], frozen, channels_last,
                ema=Ema(model, cfg.ema) if cfg.ema else None, uncompiled=uncompiled)
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
                                 cfg.rcm, cfg.rcm_neighbour, color_jitter=cfg.color_jitter,
                                 random_erasing=cfg.random_erasing, squash=pre.crop_mode == "squash")
    fast = cfg.fast_decode  # JPEGs decoded at a reduced scale that still covers every crop
    train = SeededSamples(ImageDataset(s.train_paths, tf, s.train_targets, fallback, cfg.max_pixels,
                                       decode=augment.decode_floor(cfg.augment, pre.crop_size, pre.resize_size)
                                       if fast else None), cfg.seed)
    # DistributedSampler also with one process: the epoch's order depends on (seed, epoch) only.
    sampler = EpochSampler(DistributedSampler(train, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed))
    val = Subset(ImageDataset(s.val_paths, preprocess_transform(pre), s.val_targets, fallback, cfg.max_pixels,
                              decode=DecodeFloor(pre.resize_size) if fast else None),
                 shard(len(s.val_paths), dist.rank, dist.world_size))
    pin = device.type == "cuda"
    # A loader-owned generator: creating iterators must not draw from the global one (resume exactness).
    kwargs = {"pin_memory": pin, "seed": cfg.seed}
    # Drop the last partial batch (different images each epoch): a batch of one breaks BatchNorm.
    drop_last = len(sampler) >= cfg.batch_size
    workers = cap_workers(cfg.workers)
    return Loaders(make_loader(train, cfg.batch_size, workers, sampler=sampler, drop_last=drop_last, **kwargs),
                   make_loader(val, cfg.batch_size, workers, **kwargs))
