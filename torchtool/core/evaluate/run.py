"""``torchtool evaluate``: a model (or a prediction file) over labelled images -> the classification report.

The pieces are the other commands': build_model/choose_weights for the model, the
checkpoint's own preprocessing and validation images, ImageDataset with the uint8
CenterCrop workers, the on-device Normalize, make_loader and THE inference loop
(infer.run: autocast, inference_mode, the unreadable-input rule). Under torchrun each
process takes a shard without padding, so every image is counted exactly once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from torchtool.core import infer, runtime
from torchtool.core.data.folders import scan_image_folder
from torchtool.core.data.images import MAX_PIXELS
from torchtool.core.data.loading import shard
from torchtool.core.evaluate.plots import plot_confusion
from torchtool.core.evaluate.predictions import read_class_names, read_predictions, write_predictions
from torchtool.core.evaluate.report import Predictions, build_report, confusion_csv, report_csv
from torchtool.core.files import atomic_write_text, check_writable
from torchtool.core.models.build import build_model, choose_weights
from torchtool.core.models.fuse import fold_batchnorm
from torchtool.core.output import Failure, TorchtoolError, UsageError, first_line, info, progress, warn

# each output: its key in the run, its option, its EvalConfig field
OUTPUTS = {"csv": ("--csv", "csv"), "confusion_csv": ("--confusion-csv", "confusion_csv"), "plot": ("--plot", "plot"),
           "predictions": ("--save-predictions", "save_predictions")}


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
    csv: str | None = None
    confusion_csv: str | None = None
    plot: str | None = None
    save_predictions: str | None = None
    batch_size: int | None = None
    workers: int = runtime.DEFAULT_WORKERS
    device: str = "auto"
    amp: bool = False
    fast_decode: bool = False  # JPEGs decoded at a reduced DCT scale (data.images.load_image)
    strict: bool = False
    max_pixels: int = MAX_PIXELS
    overwrite: bool = False
    quiet: bool = False


@dataclass
class Images:
    """The labelled images to evaluate, already mapped onto the model's class indices."""

    paths: list[Path]
    targets: list[int]
    classes: list[str]  # the report's class names, one per model output
    matched_by: str  # "name" or "index"
    source: str


def _outputs(cfg: EvalConfig) -> dict[str, Path]:
    """Every output checked before any image is read: a run must not end in a file it cannot write."""
    outs = {k: Path(getattr(cfg, field)).expanduser() for k, (_, field) in OUTPUTS.items() if getattr(cfg, field)}
    if "plot" in outs and outs["plot"].suffix.lower() != ".png":
        raise UsageError(f"--plot {cfg.plot} must end in .png")
    if len(set(outs.values())) < len(outs):
        raise UsageError("two outputs are the same file",
                         hint=f"give {', '.join(o for o, _ in OUTPUTS.values())} different paths")
    for key, path in outs.items():
        check_writable(path, cfg.overwrite, what=OUTPUTS[key][0])
        if not path.parent.is_dir():
            raise UsageError(f"no such directory for {path}", hint="create the folder first")
    return outs


def _check(cfg: EvalConfig) -> None:
    runtime.check_batch_size(cfg.batch_size)
    if any(k < 1 for k in cfg.topk):
        raise UsageError(f"--topk {','.join(map(str, cfg.topk))}: k counts from 1")
    if cfg.predictions is not None:
        given = [o for o, v in (("CHECKPOINT", cfg.checkpoint), ("--model", cfg.model), ("--weights", cfg.weights),
                                ("--data", cfg.data)) if v]
        if given:
            raise UsageError(f"--predictions needs no model or images: leave out {', '.join(given)}")
    elif cfg.classes:
        raise UsageError("--classes only applies to --predictions", hint="a model brings its own class names")
    if cfg.checkpoint and cfg.weights:
        raise UsageError("give the checkpoint or --weights, not both")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate and write the requested files; returns the report (every process has it)."""
    _check(cfg)
    outs = _outputs(cfg)
    if cfg.predictions is not None:
        classes = read_class_names(cfg.classes) if cfg.classes else None
        preds = read_predictions(cfg.predictions, classes)
        unknown = 0 if preds.scores is None else int(np.isnan(preds.scores).sum())
        if unknown:
            warn(f"{unknown} of {len(preds.labels)} scores in {cfg.predictions} are NaN: the report has no ece")
        report = {**build_report(preds), "source": {"predictions": cfg.predictions}, "skipped": []}
        _write(report, preds, outs)
        return report
    with runtime.distributed(cfg.device) as dist:
        return _evaluate_model(cfg, dist, outs)


def _model(cfg: EvalConfig) -> tuple[Any, Any]:
    weights = cfg.checkpoint or cfg.weights or "DEFAULT"
    is_file = weights.lower() != "none" and (Path(weights).expanduser().is_file() or cfg.checkpoint is not None)
    if not cfg.model and not is_file:
        raise UsageError("nothing to evaluate", hint="give a finetune checkpoint (evaluate run/best.pth), --model NAME "
                         "[--weights W] --data DIR, or --predictions FILE")
    arch, choice = choose_weights(cfg.model, weights)
    built = build_model(arch, choice, device="cpu")
    if built.classes is not None and len(built.classes) != built.num_classes:
        raise Failure(f"{choice.label}: the model's head has {built.num_classes} outputs but the file names "
                      f"{len(built.classes)} classes", hint="the weights and the class list belong to different models")
    return built, choice


def _images(cfg: EvalConfig, built: Any, choice: Any) -> Images:
    """The images and their labels: --data, else the checkpoint's validation images."""
    file = choice.file
    from_checkpoint = file is not None and file.classes is not None  # torchtool's files know their classes
    val = file.validation if file is not None else None
    files = None
    if cfg.data:
        root = Path(cfg.data).expanduser()
    elif val:
        root = Path(val["val_dir"])
        files = val.get("val_files")
        if not root.is_dir():
            raise UsageError(f"the checkpoint's validation folder {root} is gone",
                             hint="pass --data DIR (one sub-folder per class) to evaluate other images")
    else:
        raise UsageError("--data DIR is needed: these weights record no validation images",
                         hint="--data DIR with one sub-folder of images per class")
    if files is not None:  # --val-split: the held-out files, CLASS/NAME relative to DATA
        paths = [root / f for f in files]
        folders = sorted({Path(f).parts[0] for f in files})
        targets = [folders.index(Path(f).parts[0]) for f in files]
    else:
        paths, targets, folders = scan_image_folder(root)
        if not folders:
            raise UsageError(f"no class folders in {root}", hint="expected DIR/<class>/<image>")
    if not paths:
        raise UsageError(f"no images in the class folders of {root}")
    names = built.classes
    n_out = built.num_classes
    unknown = [f for f in folders if names is None or f not in names]
    if names is not None and not unknown:
        mapping, how = [names.index(f) for f in folders], "name"
    elif from_checkpoint:
        raise UsageError(f"class folder(s) unknown to the model: {', '.join(unknown[:10])}",
                         hint=f"the checkpoint's classes: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    else:
        if len(folders) > n_out:
            raise UsageError(f"{len(folders)} class folders but the model has {n_out} outputs")
        mapping, how = list(range(len(folders))), "index"
        if names is None:
            names = folders + [str(i) for i in range(len(folders), n_out)]
    if how == "index":
        info(f"matched the {len(folders)} class folders of {root} to the model's classes by sorted index "
             "(their names are not the model's class names)", cfg.quiet)
    return Images(paths, [mapping[t] for t in targets], list(names), how, str(root))


def _preload(module: str) -> None:
    """Import ``module`` on a thread while the model runs (torch releases the GIL in its kernels)."""
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=(module,), daemon=True).start()


def _evaluate_model(cfg: EvalConfig, dist: runtime.Dist, outs: dict[str, Path]) -> dict[str, Any]:
    import time

    import torch

    started = time.perf_counter()
    _preload("sklearn.metrics")  # ~1.2 s of imports on a 2-core CPU, needed only once the images are done
    # 1. everything cheap first: model, images, device
    built, choice = _model(cfg)
    images = _images(cfg, built, choice)
    dev = runtime.resolve_device(cfg.device, dist.local_rank)
    pre = built.preprocess
    n_classes = len(images.classes)
    ks = sorted({min(k, n_classes) for k in cfg.topk})
    model = fold_batchnorm(built.model).to(dev, memory_format=torch.channels_last)

    # 2. this process's share of the images (no padding: each image once), through THE inference loop
    mine = np.asarray(shard(len(images.paths), dist.rank, dist.world_size), dtype=np.int64)
    my_paths = [images.paths[i] for i in mine]
    loader, normalize = infer.image_loader(my_paths, pre, dev, targets=[images.targets[i] for i in mine],
                                           batch_size=cfg.batch_size, workers=cfg.workers, max_pixels=cfg.max_pixels,
                                           fast_decode=cfg.fast_decode)
    bad = infer.BadInputs(my_paths, cfg.strict)
    parts: list[tuple[np.ndarray, ...]] = []
    wait = infer.LoadWait()
    with progress(total=len(mine), desc="evaluate", unit="img", quiet=cfg.quiet) as bar:
        for batch in infer.run(model, loader, dev, bad=bad, normalize=normalize, amp=cfg.amp, bar=bar, wait=wait):
            if batch.outputs is None:
                continue
            logits = batch.outputs.float()
            top = logits.softmax(dim=1).topk(max(ks), dim=1)
            parts.append((mine[batch.indices[batch.good].numpy()], batch.targets.cpu().numpy(),
                          top.indices.cpu().numpy(), top.values[:, 0].cpu().numpy(),
                          torch.isfinite(logits).all(dim=1).cpu().numpy()))

    # 3. every process's rows, in input order; rank 0 reports and writes
    gathered = dist.all_gather((parts, {int(mine[i]): e for i, e in bad.errors.items()}))
    rows = [part for rank_parts, _ in gathered for part in rank_parts]
    errors = {i: e for _, rank_errors in gathered for i, e in rank_errors.items()}
    skipped = [{"path": os.fsdecode(images.paths[i]), "error": errors[i]} for i in sorted(errors)]
    if not rows:
        raise Failure(f"none of the {len(images.paths)} images could be read",
                      hint=f"the first: {skipped[0]['path']}: {skipped[0]['error']}")
    index, labels, top_idx, conf, finite = (np.concatenate(col) for col in zip(*rows))
    if not finite.all():  # NaN logits "predict" class 0 with a NaN score: no report beats a wrong one
        hint = "the weights may hold NaN/Inf (a training run that diverged?)"
        hint = f"float16 may overflow: try without --amp; if that fails too, {hint}" if cfg.amp else hint
        raise Failure(f"the model's outputs are not finite (NaN or Inf) for {int((~finite).sum())} of "
                      f"{len(finite)} images: no report", hint=hint)
    order = np.argsort(index, kind="stable")
    index, labels, top_idx, conf = index[order], labels[order], top_idx[order], conf[order]
    # scores as written to --save-predictions, so a --predictions run of that file gives this very report
    scores = np.round(conf.astype(np.float64), 6)
    preds = Predictions(images.classes, labels.astype(np.int64), top_idx[:, 0].astype(np.int64), scores,
                        [os.fsdecode(images.paths[i]) for i in index])
    top_k = {f"top{k}": float((top_idx[:, :k] == labels[:, None]).any(axis=1).mean()) for k in ks}
    report = {**build_report(preds, top_k), "matched_by": images.matched_by, "skipped": skipped,
              "source": {"model": built.arch, "weights": built.weights, "data": images.source,
                         "device": str(dev), "amp": cfg.amp, "fast_decode": cfg.fast_decode,
                         "preprocess": pre.to_dict()},
              # the rate of the inference loop itself (model loading and start-up are in "seconds")
              "images_per_s": round(len(images.paths) / max(wait.total_s, 1e-9), 2),
              "seconds": round(time.perf_counter() - started, 3)}
    if dist.is_main:
        _write(report, preds, outs)
        if skipped:
            warn(f"{len(skipped)} of {len(images.paths)} images could not be read and are not in the report")
        infer.note_loader_bound(wait, loader, fast_decode=cfg.fast_decode, model=built.arch, quiet=cfg.quiet)
    dist.barrier()
    return report


def _write(report: dict[str, Any], preds: Predictions, outs: dict[str, Path]) -> None:
    """The files, the picture last: matplotlib failing on a class name must not cost the others.

    A picture that cannot be made is said in ``report["output_errors"]`` (the command fails with it
    after printing the report); notes about it are warned.
    """
    if "csv" in outs:
        atomic_write_text(outs["csv"], report_csv(report), errors="surrogateescape")
    if "confusion_csv" in outs:
        atomic_write_text(outs["confusion_csv"], confusion_csv(report), errors="surrogateescape")
    if "predictions" in outs:
        write_predictions(outs["predictions"], preds)
    report["output_errors"] = {}
    if "plot" in outs:
        try:
            for note in plot_confusion(report, outs["plot"]):
                warn(note)
        except Exception as exc:  # noqa: BLE001 - whatever matplotlib raises, the report is kept
            why = exc.message if isinstance(exc, TorchtoolError) else first_line(exc)
            report["output_errors"]["plot"] = f"could not draw --plot {outs['plot']}: {why}"
    report["files"] = {k: str(v) for k, v in outs.items() if k not in report["output_errors"]}
