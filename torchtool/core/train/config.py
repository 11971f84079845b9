"""A finetune run's settings: :class:`TrainConfig` (stored in every checkpoint) and its choices.

A leaf: it imports nothing of the training code, so every other piece can import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torchtool.core.data.images import MAX_PIXELS
from torchtool.core.models.preprocess import check_crop_pct
from torchtool.core.output import UsageError
from torchtool.core.runtime import DEFAULT_WORKERS, TRAIN_BATCH, check_batch_size

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "multistep", "plateau", "none")
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}
AUGMENTS = ("standard", "light", "none", "randaugment", "trivialaugment", "autoaugment")
# Settings that may change on --resume without changing the result, and settings that cannot change.
RESUMABLE = ("data", "out", "device", "workers", "strict", "max_pixels", "keep_best", "compile")
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
    batch_size: int = TRAIN_BATCH  # per process: under torchrun the global batch is batch_size x processes
    workers: int = DEFAULT_WORKERS
    image_size: int | None = None  # None: the weights' own crop size
    crop_pct: float | None = None  # the share of the resized short side the center crop keeps; None: the weights'
    interpolation: str | None = None  # bilinear, bicubic or nearest; None: the weights'
    augment: str = "standard"
    color_jitter: float = 0.0  # brightness, contrast and saturation jitter strength
    random_erasing: float = 0.0  # probability of erasing a random rectangle
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
    ema: float | None = None  # decay of an exponential moving average of the weights
    keep_best: int = 1  # checkpoints kept of the best epochs
    compile: bool = False  # torch.compile the model for training
    amp: bool = False
    fast_decode: bool = False  # JPEGs decoded at a reduced DCT scale (augment.decode_floor)
    sync_bn: bool = False
    device: str = "auto"
    strict: bool = False
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        # Resolve defaults so the stored config holds the values actually used.
        self.optimizer = self.optimizer or "sgd"
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}", hint=f"choose from: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}", hint=f"choose from: {', '.join(SCHEDULES)}")
        if self.augment not in AUGMENTS:
            raise UsageError(f"unknown augmentation {self.augment!r}", hint=f"choose from: {', '.join(AUGMENTS)}")
        if self.schedule == "multistep" and not self.milestones:
            raise UsageError("--schedule multistep needs --milestones", hint="e.g. --milestones 30,60")
        for name in ("lr", "backbone_lr", "weight_decay", "label_smoothing", "mixup", "cutmix", "l1", "clip_grad_norm",
                     "gamma", "color_jitter", "random_erasing"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"--{name.replace('_', '-')} {value} must be a finite number >= 0")
        check_batch_size(self.batch_size)
        check_crop_pct(self.crop_pct)  # before anything is read, not only when the model is built
        if self.random_erasing > 1:
            raise UsageError(f"--random-erasing {self.random_erasing} is a probability: at most 1")
        if self.ema is not None and not 0 < self.ema < 1:
            raise UsageError(f"--ema {self.ema} must be a decay between 0 and 1", hint="e.g. 0.999")
        if self.keep_best < 1:
            raise UsageError(f"--keep-best {self.keep_best}: keep at least 1 checkpoint")
        if any(m < 1 for m in self.milestones):
            raise UsageError(f"--milestones {','.join(map(str, self.milestones))}: epochs count from 1")
        self.lr = DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None else self.weight_decay
        self.backbone_lr = self.lr if self.backbone_lr is None else self.backbone_lr
        self.milestones = sorted(int(m) for m in self.milestones)

    @property
    def warmup_covers_run(self) -> bool:
        """True when --warmup-epochs leaves no epoch for the schedule: the whole run warms up."""
        return self.warmup_epochs >= self.epochs > 0 and self.warmup_epochs > 0
