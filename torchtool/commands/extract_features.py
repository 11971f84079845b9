"""torchtool extract-features: multi-layer CNN features for any folder of images."""

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from torchtool.commands._options import (
    DEFAULT_WORKERS, MAX_PIXELS, Amp, CropPct, Device, FastDecode, Format, ImageSize, InferBatchSize, Interpolation, Json,
    MaxPixels, Mean, ListModels, ModelName, OverwriteRun, Quiet, Resize, Seed, Std, Strict, Weights, Workers,
)
from torchtool.core import output

VIDEOS = "Videos"


def run(
    inputs: Annotated[
        Optional[list[str]],
        typer.Argument(help="Image or video files, folders (walked recursively) or - to read paths from stdin.",
                       show_default=False),
    ] = None,
    model: ModelName = None,
    list_models: ListModels = None,
    weights: Weights = "DEFAULT",
    layer: Annotated[
        list[str],
        typer.Option("--layer", "-l", help="Layer to extract (repeatable or comma-separated): relu5_3, fc7, gap, "
                     "logits, layer3, any FX node or module name; NAME:POOL sets its pooling."),
    ] = ["gap"],  # noqa: B006
    pool: Annotated[
        list[str],
        typer.Option("--pool", help="none, avg, max or bilinear for every layer, or LAYER:POOL for one (repeatable)."),
    ] = ["none"],  # noqa: B006
    normalize: Annotated[bool, typer.Option("--normalize", help="L2-normalise every output vector.")] = False,
    dtype: Annotated[Literal["float32", "float16"], typer.Option("--dtype", help="Stored dtype.")] = "float32",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("features"),
    list_file: Annotated[
        Optional[Path], typer.Option("--list", help="A file with one image or video path per line (kept in that order).")
    ] = None,
    list_layers: Annotated[
        bool, typer.Option("--list-layers", help="Print the layer names the model offers, with shapes, and exit.")
    ] = False,
    segments: Annotated[Optional[int], typer.Option(
        "--segments", min=1, show_default=False, rich_help_panel=VIDEOS,
        help="Videos: K frames each, TSN's way (the middle of K equal segments; --mode train: a random frame in "
        "each), the indices video-info gives. The default: 8.")] = None,
    mode: Annotated[Optional[Literal["test", "train"]], typer.Option(
        "--mode", show_default=False, rich_help_panel=VIDEOS, help="With --segments: test (middle frames, the "
        "default) or train (random, seeded by --seed and each video's path).")] = None,
    fps: Annotated[Optional[float], typer.Option(
        "--fps", min=0, show_default=False, rich_help_panel=VIDEOS,
        help="Videos: F frames per second of the video's own timeline (writes offsets.npy).")] = None,
    every: Annotated[Optional[int], typer.Option(
        "--every", min=1, show_default=False, rich_help_panel=VIDEOS,
        help="Videos: every N-th frame, from the first (writes offsets.npy).")] = None,
    max_frames: Annotated[Optional[int], typer.Option(
        "--max-frames", min=1, show_default=False, rich_help_panel=VIDEOS,
        help="With --fps or --every: at most the first N sampled frames of each video.")] = None,
    pool_frames: Annotated[Optional[Literal["none", "mean", "max"]], typer.Option(
        "--pool-frames", show_default=False, rich_help_panel=VIDEOS,
        help="Videos: mean or max, one row per video over its frames that decoded (default: none, a row per "
        "frame).")] = None,
    image_size: ImageSize = None,
    resize: Resize = None,
    crop_pct: CropPct = None,
    interpolation: Interpolation = None,
    mean: Mean = None,
    std: Std = None,
    batch_size: InferBatchSize = None,
    workers: Workers = DEFAULT_WORKERS,
    device: Device = "auto",
    amp: Amp = False,
    fast_decode: FastDecode = False,
    seed: Seed = 0,
    overwrite: OverwriteRun = False,
    strict: Strict = False,
    max_pixels: MaxPixels = MAX_PIXELS,
    quiet: Quiet = False,
    format: Format = "table",
    json_: Json = False,
) -> None:
    """Extract features of many layers in one forward pass, streamed to .npy files.

    The model is --model, else the architecture a torchtool checkpoint given as --weights names, else resnet18.

    Writes OUT/<layer>.npy (one row per image, NaN rows for unreadable ones), OUT/index.csv and OUT/meta.json. Rerunning an interrupted command resumes it. Exit 3 when some inputs could not be read. Works under `torchrun --nproc-per-node N -m torchtool`.

    Videos (by extension; not mixed with images): --segments K gives <layer>.npy of [videos, K, ...]; --fps F or --every N give [frames, ...] and OUT/offsets.npy, video i's rows being offsets[i]:offsets[i+1]; --pool-frames mean|max gives [videos, ...]. index.csv has one row per video: path, status, frame count, fps, the sampled indices, error.
    """
    fmt = output.pick_format(format, json_)
    if list_layers:
        from torchtool.core.features.run import list_layers as layer_table

        output.emit(layer_table(model, weights, image_size), fmt, ["name", "target", "kind", "shape"])
        return
    if not inputs and list_file is None:
        raise output.UsageError("no inputs given", hint="pass image or video files or folders, - for stdin, or --list FILE")

    from torchtool.core.features.run import ExtractConfig, run_extraction

    config = ExtractConfig(
        inputs=inputs or [], model=model, weights=weights, layers=layer, pool=pool, normalize=normalize, dtype=dtype,
        out=str(out), list_file=str(list_file) if list_file else None, batch_size=batch_size, workers=workers,
        device=device, amp=amp, image_size=image_size, resize=resize, crop_pct=crop_pct, interpolation=interpolation,
        mean=mean, std=std, segments=segments, mode=mode, fps=fps, every=every, max_frames=max_frames,
        pool_frames=pool_frames, overwrite=overwrite, strict=strict,
        max_pixels=max_pixels, fast_decode=fast_decode,
        quiet=quiet, seed=seed,
    )
    summary = run_extraction(config)
    output.emit(summary, fmt)
    if summary["skipped"] or summary.get("partial"):
        raise typer.Exit(output.EXIT_PARTIAL)
