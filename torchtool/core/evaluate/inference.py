"""The model side of evaluate: one model (or two, for --compare) over labelled images -> Predictions.

The pieces are the other commands': build_model/choose_weights for the model, the
checkpoint's own preprocessing (or the --image-size ... overrides), its validation images,
ImageDataset with the uint8 CenterCrop workers, the on-device Normalize, make_loader and
THE inference loop (infer.run: autocast, inference_mode, the unreadable-input rule). Under
torchrun each process takes a shard without padding, so every image is counted exactly
once. Two models that read the images the same way share one pass (one loader, both
models per batch).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchtool.core import infer, runtime
from torchtool.core.data.folders import scan_image_folder
from torchtool.core.data.loading import shard
from torchtool.core.evaluate.report import Predictions
from torchtool.core.models.build import build_model, choose_weights
from torchtool.core.models.fuse import fold_batchnorm
from torchtool.core.output import Failure, UsageError, info, progress


@dataclass
class Images:
    """The labelled images to evaluate, already mapped onto the model's class indices."""

    paths: list[Path]
    targets: list[int]
    classes: list[str]  # the report's class names, one per model output
    matched_by: str  # "name" or "index"
    source: str


@dataclass
class Loaded:
    """A model ready to run and how it reads images."""

    built: Any
    choice: Any
    preprocess: Any  # the Preprocess used: the stored one with the overrides applied
    label: str  # the model as named on the command line


@dataclass
class ModelRun:
    """What a model run gives the report: predictions (and the --compare model's), where they came from."""

    preds: Predictions
    other: Predictions | None
    images: Images
    source: dict[str, Any]
    skipped: list[dict[str, str]]
    images_per_s: float
    loaded: Loaded


def load(cfg: Any, weights: str, arch: str | None, *, default_arch: str | None = None, what: str = "") -> Loaded:
    """Build the model of ``weights`` (a checkpoint, weights file or name) with the preprocessing overrides."""
    is_file = weights.lower() != "none" and (Path(weights).expanduser().is_file() or what == "CHECKPOINT")
    if not arch and not is_file:
        raise UsageError("nothing to evaluate", hint="give a finetune checkpoint (evaluate run/best.pth), --model NAME "
                         "[--weights W] --data DIR, or --predictions FILE")
    arch, choice = choose_weights(arch, weights, **({"default_arch": default_arch} if default_arch else {}))
    built = build_model(arch, choice, device="cpu")
    if built.classes is not None and len(built.classes) != built.num_classes:
        raise Failure(f"{choice.label}: the model's head has {built.num_classes} outputs but the file names "
                      f"{len(built.classes)} classes", hint="the weights and the class list belong to different models")
    pre = built.preprocessing(cfg.image_size, cfg.resize, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                              mean=cfg.mean, std=cfg.std)
    label = weights if is_file or what == "CHECKPOINT" else f"{arch} ({built.weights})"
    changed = built.preprocess.changes(pre)
    if changed:  # said once: the numbers this model was (probably) trained with are not the ones used
        info(f"preprocessing of {label}: {changed} (the options override its own)", cfg.quiet)
    return Loaded(built, choice, pre, label)


def find_images(cfg: Any, built: Any, choice: Any) -> Images:
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


def _check_other(main: Loaded, other: Loaded, images: Images) -> None:
    """--compare CHECKPOINT: the second model must name the same classes in the same order."""
    names = other.built.classes
    if other.built.num_classes != len(images.classes) or (names is not None and names != images.classes):
        shown = f"{len(names)} classes" if names else f"{other.built.num_classes} outputs"
        raise UsageError(f"--compare {other.label} has {shown}, not the {len(images.classes)} classes of "
                         f"{main.label} in the same order", hint="compare models trained on the same classes")


def preload(*modules: str) -> None:
    """Import ``modules`` (in order, on one thread) while the model runs: torch releases the GIL in its kernels."""
    import importlib
    import threading

    def load() -> None:
        for module in modules:
            importlib.import_module(module)

    threading.Thread(target=load, daemon=True).start()


class _Both(torch.nn.Module):
    """Two models on one batch: one loader, one decode, one copy to the device for both."""

    def __init__(self, a: Any, b: Any):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def _pass(cfg: Any, models: list[Any], pre: Any, paths: list[Path], targets: list[int], dev: Any,
          desc: str) -> tuple[list[tuple[Any, ...]], infer.BadInputs, infer.LoadWait, Any]:
    """One pass over this process's images: per batch (local indices, targets, [probs per model], finite)."""
    loader, normalize = infer.image_loader(paths, pre, dev, targets=targets, batch_size=cfg.batch_size,
                                           workers=cfg.workers, max_pixels=cfg.max_pixels, fast_decode=cfg.fast_decode)
    bad = infer.BadInputs(paths, cfg.strict)
    model = models[0] if len(models) == 1 else _Both(*models)
    parts, wait = [], infer.LoadWait()
    with progress(total=len(paths), desc=desc, unit="img", quiet=cfg.quiet) as bar:
        for batch in infer.run(model, loader, dev, bad=bad, normalize=normalize, amp=cfg.amp, bar=bar, wait=wait):
            if batch.outputs is None:
                continue
            outputs = batch.outputs if isinstance(batch.outputs, tuple) else (batch.outputs,)
            # float32 softmax of float32 logits (amp's float16 would round the small scores to 0)
            logits = [o.float() for o in outputs]
            parts.append((batch.indices[batch.good].numpy(), batch.targets.cpu().numpy(),
                          [x.softmax(dim=1).cpu().numpy() for x in logits],
                          [torch.isfinite(x).all(dim=1).cpu().numpy() for x in logits]))
    return parts, bad, wait, loader


def run_models(cfg: Any, dist: runtime.Dist, compare: str | None = None,
               before: Callable[[list[str]], None] | None = None) -> ModelRun:
    """The model (and the --compare model) over the images; every process gets the whole result.

    ``before(classes)`` checks what depends on the class names, before the first image is read.
    """
    # seconds of imports on a 2-core CPU (sklearn ~1.2 s, matplotlib ~1 s), needed only once the images are done
    pictures = cfg.plot or cfg.calibration_plot or cfg.gallery or cfg.html
    preload("sklearn.metrics", *(["matplotlib.figure"] if pictures else []), *(["scipy.stats"] if cfg.compare else []))
    # 1. everything cheap first: models, images, device
    main = load(cfg, cfg.checkpoint or cfg.weights or "DEFAULT", cfg.model,
                what="CHECKPOINT" if cfg.checkpoint else "--weights")
    other = load(cfg, compare, None, default_arch=main.built.arch, what="--compare") if compare else None
    images = find_images(cfg, main.built, main.choice)
    if other is not None:
        _check_other(main, other, images)
    if before is not None:
        before(images.classes)
    dev = runtime.resolve_device(cfg.device, dist.local_rank)
    loaded = [m for m in (main, other) if m is not None]
    models = [fold_batchnorm(m.built.model).to(dev, memory_format=torch.channels_last) for m in loaded]
    passes = [[0, 1]] if other is not None and other.preprocess == main.preprocess else [[i] for i in range(len(loaded))]
    if len(passes) > 1:
        info(f"--compare {other.label} reads the images differently ({main.preprocess.changes(other.preprocess)}): "
             "two passes over the images", cfg.quiet)

    # 2. this process's share of the images (no padding: each image once), through THE inference loop
    mine = np.asarray(shard(len(images.paths), dist.rank, dist.world_size), dtype=np.int64)
    my_paths, my_targets = [images.paths[i] for i in mine], [images.targets[i] for i in mine]
    chunks: list[list[tuple[Any, ...]]] = [[] for _ in loaded]
    errors: dict[int, str] = {}
    wait_s, last = 0.0, None
    for which in passes:
        desc = "evaluate" if len(passes) == 1 else f"evaluate {loaded[which[0]].label}"
        parts, bad, wait, loader = _pass(cfg, [models[i] for i in which], loaded[which[0]].preprocess, my_paths,
                                         my_targets, dev, desc)
        for local, labels, probs, finite in parts:
            for slot, i in enumerate(which):
                chunks[i].append((mine[local], labels, probs[slot], finite[slot]))
        errors.update({int(mine[i]): e for i, e in bad.errors.items()})
        wait_s += wait.total_s
        last = (wait, loader)

    # 3. every process's rows, in input order
    gathered = dist.all_gather((chunks, errors))
    errors = {i: e for _, rank_errors in gathered for i, e in rank_errors.items()}
    skipped = [{"path": os.fsdecode(images.paths[i]), "error": errors[i]} for i in sorted(errors)]
    preds = [_predictions(cfg, [c for rank_chunks, _ in gathered for c in rank_chunks[i]], images, skipped,
                          "" if i == 0 else f"--compare {m.label}: ") for i, m in enumerate(loaded)]
    if dist.is_main:
        infer.note_loader_bound(last[0], last[1], fast_decode=cfg.fast_decode, model=main.built.arch, quiet=cfg.quiet)
    pre = main.preprocess
    source = {"model": main.built.arch, "weights": main.built.weights, "data": images.source, "device": str(dev),
              "amp": cfg.amp, "fast_decode": cfg.fast_decode, "preprocess": pre.to_dict()}
    # the rate of the inference loop itself (model loading and start-up are in "seconds")
    rate = round(len(images.paths) / max(wait_s, 1e-9), 2)
    return ModelRun(preds[0], preds[1] if other else None, images, source, skipped, rate, main)


def _predictions(cfg: Any, chunks: list[tuple[Any, ...]], images: Images, skipped: list[dict[str, str]],
                 who: str) -> Predictions:
    if not chunks:
        raise Failure(f"none of the {len(images.paths)} images could be read",
                      hint=f"the first: {skipped[0]['path']}: {skipped[0]['error']}")
    index, labels, probs, finite = (np.concatenate(col) for col in zip(*chunks))
    if not finite.all():  # NaN logits "predict" class 0 with a NaN score: no report beats a wrong one
        hint = "the weights may hold NaN/Inf (a training run that diverged?)"
        hint = f"float16 may overflow: try without --amp; if that fails too, {hint}" if cfg.amp else hint
        raise Failure(f"{who}the model's outputs are not finite (NaN or Inf) for {int((~finite).sum())} of "
                      f"{len(finite)} images: no report", hint=hint)
    order = np.argsort(index, kind="stable")
    index, labels, probs = index[order], labels[order], np.ascontiguousarray(probs[order], dtype=np.float32)
    # scores as written to --save-predictions, so a --predictions run of that file gives this very report
    scores = np.round(probs.max(axis=1).astype(np.float64), 6)
    return Predictions(images.classes, labels.astype(np.int64), probs.argmax(axis=1).astype(np.int64), scores,
                       [os.fsdecode(images.paths[i]) for i in index], probs=probs)
