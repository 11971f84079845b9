"""Options shared by every command, defined once so defaults never drift apart."""

from typing import Annotated, Literal, Optional

import typer

from torchtool.core.data.images import MAX_PIXELS
from torchtool.core.runtime import DEFAULT_WORKERS, INFER_BATCH, MAX_BATCH, TRAIN_BATCH

__all__ = ["DEFAULT_WORKERS", "INFER_BATCH", "MAX_PIXELS", "TRAIN_BATCH", "given_options"]

def _complete(choices):
    """A tab-completion callback offering ``choices()`` that start with what was typed (nothing heavy imported)."""
    return lambda incomplete: [c for c in choices() if c.startswith(incomplete)]


def complete_list(choices):
    """Completion of a comma-separated list: the last item completed, the ones before kept (a,b,c)."""
    def complete(incomplete: str) -> list[str]:
        done, _, last = incomplete.rpartition(",")
        prefix = f"{done}," if done else ""
        return [prefix + c for c in choices() if c.startswith(last) and c not in done.split(",")]

    return complete


def _model_names() -> tuple[str, ...]:
    from torchtool.core.models.names import KNOWN_MODELS

    return KNOWN_MODELS


DEVICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps")
Device = Annotated[str, typer.Option(
    "--device", autocompletion=_complete(lambda: DEVICES),
    help="auto, cpu, cuda, cuda:N or mps (auto: CUDA when available).")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, max=MAX_BATCH, help="Images per batch.")]
InferBatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", "-b", min=1, max=MAX_BATCH, show_default=False,
    help=f"Images per batch (default: {INFER_BATCH['accelerator']} on a GPU, {INFER_BATCH['cpu']} on CPU).")]
Workers = Annotated[
    int, typer.Option("--workers", "-j", min=0, help="Data-loading worker processes (0: load in the main process).")
]
Format = Annotated[
    Literal["table", "json", "jsonl", "csv", "markdown"],
    typer.Option("--format", "-f", help="Output format: a table for people; json, jsonl or csv for scripts; "
                 "markdown for pasting into an issue."),
]
Json = Annotated[bool, typer.Option("--json", help="Shorthand for --format json.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log lines on stderr.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files instead of refusing.")]
OverwriteRun = Annotated[bool, typer.Option(
    "--overwrite", help="Start afresh: replace what an earlier run wrote in the output folder instead of resuming it.")]
Strict = Annotated[bool, typer.Option("--strict", help="Fail the run on the first unreadable input.")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", min=1, metavar="N", help="Images with more pixels are refused "
                                        "as decompression bombs; raise it to accept a known-large image.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Amp = Annotated[bool, typer.Option("--amp", help="Mixed precision (autocast: bf16 or fp16 where it helps).")]
FastDecode = Annotated[bool, typer.Option(
    "--fast-decode", help="Decode JPEGs at a reduced DCT scale that still covers the resize: about 5x less decoding "
    "CPU for 12 MP photos; not pixel-exact (about 44 dB PSNR).")]
FastDecodeTrain = Annotated[bool, typer.Option(
    "--fast-decode", help="Decode JPEGs at a reduced DCT scale that still covers the smallest random crop (and, for "
    "validation, the resize): less decoding CPU for large photos; not pixel-exact.")]
MIN_IMAGE_SIZE = 8  # pixels: the smallest crop a command accepts

# preprocessing: one group, the same names and meaning in every command that reads images for a model
PREPROCESSING = "Preprocessing"
ImageSize = Annotated[Optional[int], typer.Option(
    "--image-size", min=MIN_IMAGE_SIZE, show_default=False, rich_help_panel=PREPROCESSING,
    help="Crop size (default: the checkpoint's or the weights' own, e.g. 224).")]
Resize = Annotated[Optional[int], typer.Option(
    "--resize", min=MIN_IMAGE_SIZE, show_default=False, rich_help_panel=PREPROCESSING,
    help="Resize the short side to N before the center crop (default: the weights' ratio, e.g. 256 for 224).")]
CropPct = Annotated[Optional[float], typer.Option(
    "--crop-pct", min=0, max=1, metavar="P", show_default=False, rich_help_panel=PREPROCESSING,
    help="Resize the short side to crop / P before the center crop: P is the share of it the crop keeps (timm's crop_pct; "
    "1.0: resize straight to the crop).")]
Interpolation = Annotated[Optional[Literal["bilinear", "bicubic", "nearest"]], typer.Option(
    "--interpolation", show_default=False, rich_help_panel=PREPROCESSING,
    help="Resampling of the resize (default: the weights').")]
Mean = Annotated[Optional[str], typer.Option(
    "--mean", metavar="R,G,B", show_default=False, rich_help_panel=PREPROCESSING,
    help="Normalisation mean per channel (default: the weights', e.g. ImageNet's 0.485,0.456,0.406).")]
Std = Annotated[Optional[str], typer.Option(
    "--std", metavar="R,G,B", show_default=False, rich_help_panel=PREPROCESSING,
    help="Normalisation standard deviation per channel (default: the weights').")]

Weights = Annotated[
    str,
    typer.Option("--weights", "-w", help="DEFAULT (pretrained, cached under TORCH_HOME; a timm model's through timm's "
                 "cache), a weights name such as IMAGENET1K_V1, none (random init), or a local .pth/.pt/.bin/"
                 ".safetensors file or torchtool checkpoint."),
]
ModelName = Annotated[Optional[str], typer.Option(
    "--model", "-m", show_default=False, autocompletion=_complete(_model_names), help="A torchvision classification "
    "model, e.g. resnet18, vgg16, or a timm one, timm:NAME[.TAG] (default: the one a torchtool checkpoint names, "
    "else resnet18).")]


def _list_models(value: Optional[str]) -> None:
    """``--list-models PATTERN``: the model names matching a glob, one a line on stdout; then exit."""
    if value is None:
        return
    from torchtool.core.models.names import list_models
    from torchtool.core.output import TorchtoolError, UsageError, error_line

    try:
        names = list_models(value)
        if not names:
            raise UsageError(f"no model matches {value!r}", hint="the pattern is a glob: e.g. 'resnet*', "
                             "'timm:*convnext*' or 'timm:vit_small*.*' (pretrained tags)")
    except TorchtoolError as exc:
        typer.echo(error_line(exc.message, exc.hint), err=True)
        raise typer.Exit(exc.exit_code) from None
    typer.echo("\n".join(names))
    raise typer.Exit()


ListModels = Annotated[Optional[str], typer.Option(
    "--list-models", metavar="PATTERN", is_eager=True, expose_value=False, callback=_list_models,
    help="Print the model names matching a glob and exit: 'resnet*' (torchvision), 'timm:*convnext*' (timm), "
    "'timm:vit_small*.*' (timm's pretrained tags).")]


def given_options(ctx: typer.Context) -> set[str]:
    """The parameters the user set (command line or environment), asked of click, never guessed from defaults."""
    return {name for name in ctx.params
            if (source := ctx.get_parameter_source(name)) is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")}


# summary and profile: MODEL as a name, a weights file or module:factory
ModelSpec = Annotated[str, typer.Argument(
    metavar="MODEL", show_default=False, help="A torchvision model name (resnet50), a timm one (timm:convnext_tiny), "
    "a checkpoint or weights file, or module:factory / path/to/file.py:factory (a callable returning an nn.Module).")]
Kwargs = Annotated[Optional[str], typer.Option(
    "--kwargs", metavar="JSON", show_default=False,
    help="""Arguments for the model's builder or factory, e.g. '{"num_classes": 10}'.""")]
InputSize = Annotated[Optional[list[str]], typer.Option(
    "--input-size", metavar="C,H,W", show_default=False,
    help="One input's size without the batch dimension (default: the weights' crop, else 3,224,224); repeat it "
    "for several inputs; :int64 for integer inputs such as token ids (128:int64).")]


def humanize(func):
    """Give each parameter of a command a metavar people read, where none was chosen: none for a flag
    (it takes no value), N for an integer, X for a number, PATH for a path, the option's own name
    (DEVICE, WEIGHTS) for text, the parameter's name for an argument (DATA, INPUTS). Typer would
    print ``<bool>``, ``<int range>``, ``<list[str]>``."""
    import inspect
    import typing
    from pathlib import Path

    from typer.models import ArgumentInfo, OptionInfo

    hints = typing.get_type_hints(func, include_extras=True)
    for name, param in inspect.signature(func).parameters.items():
        kind, meta = hints.get(name), [param.default]  # typer.Option(...) as the default, or in Annotated
        if typing.get_origin(kind) is typing.Annotated:
            kind, *more = typing.get_args(kind)
            meta += more
        info = next((m for m in meta if isinstance(m, (ArgumentInfo, OptionInfo))), None)
        if info is None or info.metavar is not None:
            continue
        inner = [a for a in typing.get_args(kind) if a is not type(None)]  # Optional[X] / list[X] -> X
        base = inner[0] if inner and typing.get_origin(kind) in (typing.Union, list) else kind
        if isinstance(info, ArgumentInfo):
            info.metavar = name.upper()
        elif base is bool:
            info.metavar = ""
        elif typing.get_origin(base) is typing.Literal:
            continue  # typer lists the choices
        elif base is int:
            info.metavar = "N"
        elif base is float:
            info.metavar = "X"
        elif base is Path:
            info.metavar = "PATH"
        else:
            long = next((d for d in (info.param_decls or ()) if d.startswith("--")), f"--{name}")
            info.metavar = long.lstrip("-").upper().replace("-", "_")
    return func
