"""What ``torchtool evaluate`` is asked to do, as plain values, and the table of its output files."""

from __future__ import annotations

from dataclasses import dataclass, field

from torchtool.core import runtime
from torchtool.core.data.images import MAX_PIXELS

# each output file: its key in the run, its option, its EvalConfig field, the suffixes it must have
OUTPUTS = {"csv": ("--csv", "csv", ()), "confusion_csv": ("--confusion-csv", "confusion_csv", ()),
           "plot": ("--plot", "plot", (".png",)), "predictions": ("--save-predictions", "save_predictions", ()),
           "calibration": ("--calibration-plot", "calibration_plot", (".png",)),
           "gallery": ("--gallery", "gallery", (".png",)), "html": ("--html", "html", (".html", ".htm"))}
PREPROCESSING = {"image_size": "--image-size", "resize": "--resize", "crop_pct": "--crop-pct",
                 "interpolation": "--interpolation", "mean": "--mean", "std": "--std"}


@dataclass
class EvalConfig:
    """What to evaluate and where the report goes, as plain values."""

    checkpoint: str | None = None  # a finetune checkpoint or weights file (the same as --weights FILE)
    model: str | None = None
    weights: str | None = None  # None: DEFAULT, or the checkpoint
    data: str | None = None  # None: the checkpoint's validation images
    predictions: str | None = None  # a label,prediction CSV instead of a model ("-": stdin)
    classes: str | None = None  # class names for --predictions (file or comma list)
    topk: list[int] = field(default_factory=lambda: [1, 5])
    # preprocessing overrides (None: the checkpoint's or the weights' own)
    image_size: int | None = None
    resize: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # output files
    csv: str | None = None
    confusion_csv: str | None = None
    plot: str | None = None
    save_predictions: str | None = None
    all_scores: bool = False  # --scores all: --save-predictions also writes every class's score (.scores.npy)
    calibration_plot: str | None = None
    gallery: str | None = None
    gallery_n: int = 16
    gallery_classes: list[str] | None = None  # only mistakes involving these classes
    html: str | None = None
    results_file: str | None = None  # .csv or .json: one row appended per evaluated model
    # statistics
    bootstrap: int = 0  # resamples for the 95% intervals (0: none)
    seed: int = 0
    compare: str | None = None  # a second checkpoint, weights file or prediction file on the same images
    # the run
    batch_size: int | None = None
    workers: int = runtime.DEFAULT_WORKERS
    device: str = "auto"
    amp: bool = False
    fast_decode: bool = False  # JPEGs decoded at a reduced DCT scale (data.images.load_image)
    strict: bool = False
    max_pixels: int = MAX_PIXELS
    overwrite: bool = False
    quiet: bool = False

    def preprocessing_given(self) -> list[str]:
        """The preprocessing options set, as their flags."""
        return [flag for name, flag in PREPROCESSING.items() if getattr(self, name) is not None]
