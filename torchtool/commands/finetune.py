"""torchtool finetune: fine-tune a torchvision classifier on an image folder, every recipe a flag."""

import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from torchtool.commands._options import (DEFAULT_WORKERS, MAX_PIXELS, TRAIN_BATCH, Amp, BatchSize, CropPct, Device,
                                         FastDecodeTrain, Format, ImageSize, Interpolation, Json, ListModels,
                                         MaxPixels, ModelName, OverwriteRun, Quiet, Seed, Strict, Weights, Workers,
                                         given_options)
from torchtool.core import output

Recipe = "Recipes"
Schedule = "Schedule"
Run = "Run"


def _milestones(text: str) -> list[int]:
    try:
        return [int(m) for m in text.replace(",", " ").split()]
    except ValueError:
        raise output.UsageError(f"--milestones {text!r}: expected epochs such as 30,60") from None


def run(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="DATA/train/<class>/... and DATA/val/<class>/..., or DATA/<class>/... "
                                         "with --val-split.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: last.pth, best.pth, metrics.csv, curves.png.",
                                      show_default=False)],
    model: ModelName = None,
    list_models: ListModels = None,
    weights: Weights = "DEFAULT",
    val_split: Annotated[Optional[float], typer.Option(help="Hold out this fraction of each class (stratified, "
                                                       "seeded) when DATA has no val/ folder.")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs to train.")] = 10,
    batch_size: BatchSize = TRAIN_BATCH,
    workers: Workers = DEFAULT_WORKERS,
    image_size: ImageSize = None,
    crop_pct: CropPct = None,
    interpolation: Interpolation = None,
    augment: Annotated[Literal["standard", "light", "none", "randaugment", "trivialaugment", "autoaugment"], typer.Option(
        help="standard: RandomResizedCrop 0.08-1 + flip; light: RandomResizedCrop 0.6-1, no flip (small or "
        "orientation-sensitive images); randaugment, trivialaugment, autoaugment: standard + that torchvision policy; "
        "none: resize + center crop.", rich_help_panel=Recipe)] = "standard",
    color_jitter: Annotated[float, typer.Option(min=0, metavar="S", help="Jitter brightness, contrast and saturation "
                                                "by up to S (0: off).", rich_help_panel=Recipe)] = 0.0,
    random_erasing: Annotated[float, typer.Option(min=0, max=1, metavar="P", help="Erase a random rectangle with "
                                                  "probability P (0: off).", rich_help_panel=Recipe)] = 0.0,
    rcm: Annotated[int, typer.Option(min=0, help="Region confusion (DCL): shuffle NxN blocks locally (0: off).",
                                     rich_help_panel=Recipe)] = 0,
    rcm_neighbour: Annotated[int, typer.Option(min=0, help="Most positions a block moves along rows, then columns.",
                                               rich_help_panel=Recipe)] = 1,
    freeze_backbone: Annotated[bool, typer.Option("--freeze-backbone", help="Train only the new head (backbone BatchNorm frozen too).",
                                                  rich_help_panel=Recipe)] = False,
    optimizer: Annotated[Optional[Literal["sgd", "adamw"]], typer.Option(
        help="SGD with momentum 0.9 (the default) or AdamW.", rich_help_panel=Recipe)] = None,
    lr: Annotated[Optional[float], typer.Option(min=0, help="Learning rate of the head (default: 0.01 for SGD, "
                                                "0.001 for AdamW).", rich_help_panel=Recipe)] = None,
    backbone_lr: Annotated[Optional[float], typer.Option(min=0, help="Learning rate of the rest (default: --lr).",
                                                         rich_help_panel=Recipe)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(min=0, help="Weight decay (default: 1e-4 for SGD, 0.05 for "
                                                          "AdamW); never on biases and norm layers...",
                                                          rich_help_panel=Recipe)] = None,
    decay_all: Annotated[bool, typer.Option("--decay-all", help="...unless this: decay every parameter.", rich_help_panel=Recipe)] = False,
    label_smoothing: Annotated[float, typer.Option(min=0, max=1, help="Label smoothing of the cross-entropy.",
                                                   rich_help_panel=Recipe)] = 0.0,
    mixup: Annotated[float, typer.Option(min=0, metavar="ALPHA", help="MixUp with Beta(ALPHA, ALPHA) (0: off).",
                                         rich_help_panel=Recipe)] = 0.0,
    cutmix: Annotated[float, typer.Option(min=0, metavar="ALPHA", help="CutMix (0: off); with --mixup each batch "
                                          "gets one of the two.", rich_help_panel=Recipe)] = 0.0,
    l1: Annotated[float, typer.Option(min=0, metavar="LAMBDA", help="L1 penalty on the weights that get weight decay.",
                                      rich_help_panel=Recipe)] = 0.0,
    clip_grad_norm: Annotated[Optional[float], typer.Option(min=0, metavar="MAX", help="Clip the gradient norm.",
                                                            rich_help_panel=Recipe)] = None,
    schedule: Annotated[Literal["cosine", "step", "multistep", "plateau", "none"], typer.Option(
        help="Per-epoch learning-rate schedule after the warm-up; plateau watches validation accuracy.",
        rich_help_panel=Schedule)] = "cosine",
    milestones: Annotated[str, typer.Option(metavar="EPOCHS", help="multistep: epochs where lr is multiplied by "
                                            "--gamma, e.g. 30,60; step: its first value is the period.",
                                            rich_help_panel=Schedule)] = "",
    gamma: Annotated[float, typer.Option(min=0, help="Factor of step, multistep and plateau.",
                                         rich_help_panel=Schedule)] = 0.1,
    warmup_epochs: Annotated[int, typer.Option(min=0, help="Linear warm-up from lr/(N+1) to lr over N epochs (with "
                                               "N >= --epochs the whole run warms up).",
                                               rich_help_panel=Schedule)] = 0,
    plateau_patience: Annotated[int, typer.Option(min=0, help="plateau: epochs without a better validation "
                                                  "accuracy before lr drops.", rich_help_panel=Schedule)] = 2,
    patience: Annotated[Optional[int], typer.Option(min=1, help="Stop early after N epochs without a better "
                                                    "validation accuracy.", rich_help_panel=Schedule)] = None,
    seed: Seed = 0,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic algorithms and cuDNN (slower; otherwise cuDNN "
                                                "autotunes).", rich_help_panel=Run)] = False,
    ema: Annotated[Optional[float], typer.Option(metavar="DECAY", help="Keep an exponential moving average of the "
                                                 "weights (e.g. 0.999), validated every epoch beside them; best.pth "
                                                 "takes it when it does better.", rich_help_panel=Recipe)] = None,
    keep_best: Annotated[int, typer.Option(min=1, metavar="N", help="Keep the N best checkpoints: best.pth, "
                                           "best-2.pth ... best-N.pth.", rich_help_panel=Run)] = 1,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model for training (where it cannot, "
                                          "one line says why and training goes on uncompiled).",
                                          rich_help_panel=Run)] = False,
    amp: Amp = False,
    fast_decode: FastDecodeTrain = False,
    sync_bn: Annotated[bool, typer.Option("--sync-bn", help="Under torchrun on GPUs: BatchNorm statistics over all processes.",
                                          rich_help_panel=Run)] = False,
    device: Device = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.pth with the run's settings; "
                                         "the options given override them (e.g. --epochs 30 to train longer). Starts "
                                         "afresh when there is no checkpoint yet.",
                                         rich_help_panel=Run)] = False,
    resume_from: Annotated[Optional[Path], typer.Option(help="Continue from this checkpoint (a last.pth or best.pth), "
                                                        "writing to --out.", rich_help_panel=Run)] = None,
    overwrite: OverwriteRun = False,
    export_weights: Annotated[Optional[Path], typer.Option(metavar="FILE.safetensors", help="Write the best model's "
                                                           "weights here for sharing.", rich_help_panel=Run)] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard event files to OUT/tensorboard.",
                                              rich_help_panel=Run)] = False,
    strict: Strict = False,
    max_pixels: MaxPixels = MAX_PIXELS,
    format: Format = "table",
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a torchvision classifier on an image folder: new head, every recipe a flag.

    Writes OUT/last.pth every epoch and OUT/best.pth when validation accuracy improves (atomically; --resume continues exactly), OUT/metrics.csv and OUT/curves.png; the summary goes to stdout.

    Under `torchrun --nproc-per-node N -m torchtool finetune ...` it trains with DDP; --batch-size is per process, so the global batch is N times larger.

    Unreadable images are skipped, listed, and end the run with exit code 3 (--strict: the first one fails it).
    """
    from torchtool.core.train import TrainConfig, fit

    fmt = output.pick_format(format, json_)
    cfg = TrainConfig(
        data=str(data), out=str(out), model=model, weights=weights, val_split=val_split, epochs=epochs,
        batch_size=batch_size, workers=workers, image_size=image_size, crop_pct=crop_pct, interpolation=interpolation,
        augment=augment, color_jitter=color_jitter, random_erasing=random_erasing, ema=ema, keep_best=keep_best,
        compile=compile, rcm=rcm,
        rcm_neighbour=rcm_neighbour, optimizer=optimizer, lr=lr, backbone_lr=backbone_lr,
        freeze_backbone=freeze_backbone, weight_decay=weight_decay, decay_all=decay_all,
        label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, l1=l1, clip_grad_norm=clip_grad_norm,
        schedule=schedule, milestones=_milestones(milestones), gamma=gamma, warmup_epochs=warmup_epochs,
        plateau_patience=plateau_patience, patience=patience, seed=seed, deterministic=deterministic, amp=amp,
        fast_decode=fast_decode, sync_bn=sync_bn, device=device, strict=strict, max_pixels=max_pixels)
    summary = fit(cfg, resume=resume, resume_from=str(resume_from) if resume_from else None, overwrite=overwrite, quiet=quiet, tensorboard=tensorboard,
                  export=str(export_weights) if export_weights else None, given=given_options(ctx), argv=sys.argv)
    output.emit(_shown(summary, relative=not out.is_absolute(), table=fmt in ("table", "markdown")), fmt)
    if summary["skipped_images"]:
        raise typer.Exit(output.EXIT_PARTIAL)


def _shown(summary: dict, relative: bool, table: bool) -> dict:
    """The summary as printed: paths as the user gave --out (relative stays relative, as extract-features
    prints them); in a table, rows without a value (no --export-weights, nothing skipped) left out."""
    import os

    def path(value):
        if isinstance(value, list):
            return [path(v) for v in value]
        return os.path.relpath(value) if relative and isinstance(value, str) and os.path.isabs(value) else value

    shown = {k: path(v) if k in PATH_KEYS else v for k, v in summary.items()}
    return {k: v for k, v in shown.items() if v not in (None, [], "")} if table else shown


PATH_KEYS = ("out", "best", "kept", "last", "config", "metrics", "curves", "export", "tensorboard")
