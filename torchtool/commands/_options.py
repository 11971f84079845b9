"""Options shared by every command, defined once so defaults never drift apart."""

import os
from typing import Annotated, Literal

import typer

DEFAULT_WORKERS = min(os.cpu_count() or 1, 8)

Device = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (auto: CUDA when available).")
]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
Workers = Annotated[
    int, typer.Option("--workers", "-j", min=0, help="Data-loading worker processes (0: load in the main process).")
]
Format = Annotated[
    Literal["table", "json", "jsonl", "csv"],
    typer.Option("--format", "-f", help="Output format: a table for people, json, jsonl or csv for scripts."),
]
Json = Annotated[bool, typer.Option("--json", help="Shorthand for --format json.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log lines on stderr.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs instead of refusing or resuming.")]
Strict = Annotated[bool, typer.Option("--strict", help="Fail the run on the first unreadable input.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Amp = Annotated[bool, typer.Option("--amp", help="Mixed precision (autocast: bf16 or fp16 where it helps).")]
Weights = Annotated[
    str,
    typer.Option("--weights", "-w", help="DEFAULT (pretrained, cached under TORCH_HOME), a weights name such as "
                 "IMAGENET1K_V1, none (random init), or a local .pth/.pt/.safetensors file or torchtool checkpoint."),
]
ModelName = Annotated[str, typer.Option("--model", "-m", help="A torchvision classification model, e.g. resnet18, vgg16.")]
