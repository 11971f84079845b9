"""The extract-features run: inputs -> model -> layers -> memory-mapped files, resumable.

Under torchrun every process takes every ``world_size``-th pending row and writes its
rows into the same files; rank 0 writes index.csv and meta.json at the end.
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchtool.core import data, device as devices
from torchtool.core.feature_store import FeatureStore, prepare_output
from torchtool.core.features import POOLS, FeatureExtractor, LayerCatalog
from torchtool.core.models import build_model
from torchtool.core.output import Failure, UsageError, atomic_write_text, progress, to_json, warn


@dataclass
class ExtractConfig:
    """Everything an extraction depends on (plain values: it is recorded in meta.json)."""

    inputs: list[str]
    model: str | None = "resnet18"
    weights: str = "DEFAULT"
    layers: list[str] = field(default_factory=lambda: ["gap"])
    pool: list[str] = field(default_factory=lambda: ["none"])
    normalize: bool = False
    dtype: str = "float32"
    out: str = "features"
    list_file: str | None = None
    batch_size: int | None = None  # None: 64 on accelerators, 16 on CPU (smaller batches stay in cache)
    workers: int = 2
    device: str = "auto"
    amp: bool = False
    image_size: int | None = None
    resize: int | None = None
    overwrite: bool = False
    strict: bool = False
    quiet: bool = False
    seed: int = 0


def parse_pools(specs: list[str]) -> tuple[str, dict[str, str]]:
    """``--pool avg`` and ``--pool layer:bilinear`` -> (default, per-layer)."""
    default, per_layer = "none", {}
    for spec in specs:
        name, sep, how = spec.rpartition(":")
        if how not in POOLS:
            raise UsageError(f"unknown pooling {how!r}", hint=f"choose from: {', '.join(POOLS)}")
        if sep:
            per_layer[name] = how
        else:
            default = how
    return default, per_layer


def split_layers(specs: list[str]) -> list[str]:
    """Repeatable and comma-separated ``--layer`` values, in order, without duplicates."""
    names = [s.strip() for spec in specs for s in spec.split(",") if s.strip()]
    if not names:
        raise UsageError("no --layer given")
    return list(dict.fromkeys(names))


def _fingerprint(cfg: ExtractConfig, arch: str, weights: str, layers: list[Any], preprocess: dict,
                 paths: list[Path]) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()
    weights_file = Path(weights)
    if weights_file.is_file():  # a file replaced at the same path must not be resumed into
        stat = weights_file.stat()
        weights = f"{weights} ({stat.st_size} bytes, mtime_ns {stat.st_mtime_ns})"
    return {"model": arch, "weights": weights, "seed": cfg.seed, "layers": [asdict(lay) for lay in layers], "normalize": cfg.normalize,
            "amp": cfg.amp, "dtype": cfg.dtype, "preprocess": preprocess, "inputs_sha256": digest, "rows": len(paths)}


def _versions() -> dict[str, str]:
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _share_paths(dist: devices.Dist, paths: list[Path] | None) -> list[Path]:
    """Rank 0's input list for every rank (stdin can only be read once)."""
    if not dist.enabled:
        return paths or []
    import torch.distributed as tdist

    box = [paths]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _layer_shapes(extractor: FeatureExtractor, crop: int, dev: torch.device, amp: bool) -> dict[str, tuple]:
    with torch.inference_mode(), devices.autocast(dev, amp):
        out = extractor(torch.zeros(1, 3, crop, crop, device=dev))
    return {name: tuple(t.shape[1:]) for name, t in out.items()}


def run_extraction(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract features for every input; returns the summary (with this process's ``rank``)."""
    started = time.perf_counter()
    if cfg.dtype not in ("float32", "float16"):
        raise UsageError(f"unknown --dtype {cfg.dtype!r}", hint="choose float32 or float16")
    default_pool, per_layer_pool = parse_pools(cfg.pool)
    layer_names = split_layers(cfg.layers)
    dist = devices.init_distributed(cfg.device)
    try:
        return _run(cfg, dist, default_pool, per_layer_pool, layer_names, started)
    finally:
        devices.close_distributed()


def _run(cfg: ExtractConfig, dist: devices.Dist, default_pool: str, per_layer_pool: dict[str, str],
         layer_names: list[str], started: float) -> dict[str, Any]:
    # 1. validate everything cheap before any image is read
    paths = _share_paths(dist, data.find_images(cfg.inputs, cfg.list_file) if dist.is_main else None)
    dev = devices.resolve_device(cfg.device, dist.local_rank)
    devices.seed_everything(cfg.seed)  # random-init weights (--weights none) must agree across ranks and reruns
    built = build_model(cfg.model, cfg.weights, device="cpu")
    preprocess = built.preprocess.resized(cfg.image_size, cfg.resize)
    catalog = LayerCatalog(built.model, built.arch)
    layers = [catalog.resolve(n, default_pool, per_layer_pool) for n in layer_names]
    names = [lay.name for lay in layers]
    if len(set(names)) < len(names):
        raise UsageError("a layer is requested twice", hint="name each layer once; use LAYER:POOL to pick its pooling")
    # channels_last is faster for convolutions on CUDA and on CPU (oneDNN) alike
    extractor = FeatureExtractor(built.model, layers, normalize=cfg.normalize, nodes=catalog.nodes, fold_bn=True)
    extractor = extractor.to(dev, memory_format=torch.channels_last)
    shapes = _layer_shapes(extractor, preprocess.crop_size, dev, cfg.amp)
    out = Path(cfg.out)
    fingerprint = _fingerprint(cfg, built.arch, built.weights, layers, preprocess.to_dict(), paths)

    # 2. fresh output or resume (rank 0 decides and creates the files, the others open them)
    resuming = prepare_output(out, fingerprint, names, cfg.overwrite) if dist.is_main else True
    meta = {"model": built.arch, "weights": built.weights, "complete": False, "fingerprint": fingerprint,
            "layers": {lay.name: {"target": lay.target, "pool": lay.pool, "shape": [len(paths), *shapes[lay.name]],
                                  "dtype": cfg.dtype} for lay in layers},
            "pooling": {lay.name: lay.pool for lay in layers}, "normalize": cfg.normalize,
            "preprocess": preprocess.to_dict(), "rows": len(paths), "versions": _versions()}
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "meta.json", to_json(meta))  # first, so a killed run is never taken as done
        store = FeatureStore(out, len(paths), shapes, cfg.dtype, create=not resuming, rank=0)
    dist.barrier()
    if not dist.is_main:
        store = FeatureStore(out, len(paths), shapes, cfg.dtype, create=False, rank=dist.rank)
    pending = store.pending()
    todo = pending[dist.rank::dist.world_size]
    if dist.is_main and len(pending) < len(paths):
        warn(f"resuming {out}: {len(paths) - len(pending)} of {len(paths)} rows already done")

    # 3. the loop: workers decode and crop to uint8 (4x less to pass on than floats), the batch
    # is normalised on the device, one forward gives every layer, rows are written as they come
    crop = preprocess.crop_size
    dataset = data.ImageDataset([paths[i] for i in todo],
                                data.CenterCrop(crop, preprocess.resize_size, preprocess.interpolation),
                                fallback_shape=(crop, crop, 3), fallback_dtype="uint8")
    normalize = data.Normalize(preprocess.mean, preprocess.std, dev)
    batch_size = cfg.batch_size or (16 if dev.type == "cpu" else 64)
    loader = data.make_loader(dataset, batch_size, cfg.workers, pin_memory=dev.type == "cuda",
                              worker_init=data.lower_priority)
    bar = progress(total=len(todo), desc="extract", unit="img", quiet=cfg.quiet or not dist.is_main)
    trim = devices.HeapTrimmer() if dev.type == "cpu" else (lambda: None)  # RSS stays flat over long runs
    loop_started = time.perf_counter()
    with torch.inference_mode(), bar:
        for x, _, local, errors in loader:
            rows = todo[local.numpy()]
            good = np.array([not e for e in errors], dtype=bool)
            bad = {int(r): e for r, e, g in zip(rows, errors, good) if not g}
            if bad and cfg.strict:
                raise Failure(f"cannot read {paths[next(iter(bad))]}: {next(iter(bad.values()))}",
                              hint="drop --strict to skip unreadable inputs and keep going")
            feats: dict[str, np.ndarray] = {}
            if good.any():
                xb = x[torch.from_numpy(good)] if not good.all() else x
                xb = normalize(xb)  # channels_last float on the device
                with devices.autocast(dev, cfg.amp):
                    result = extractor(xb)
                feats = {k: v.float().cpu().numpy().astype(cfg.dtype, copy=False) for k, v in result.items()}
            store.write(rows[good], feats, bad)
            bar.update(len(rows))
            trim()

    # 4. finish: rank 0 writes the index and marks the run complete
    dist.barrier()
    counts = store.counts()
    summary = {"rows": len(paths), "ok": counts["ok"], "skipped": counts["skipped"],
               "seconds": round(time.perf_counter() - started, 3), "out": str(out),
               "files": [str(out / f"{n}.npy") for n in names] + [str(out / "index.csv"), str(out / "meta.json")]}
    # the rate of the extraction loop itself (model loading and start-up are in "seconds")
    loop_seconds = time.perf_counter() - loop_started
    summary["images_per_s"] = round(len(todo) * dist.world_size / max(loop_seconds, 1e-9), 2)
    if dist.is_main:
        store.write_index(paths)
        complete = counts["pending"] == 0
        meta.update(complete=complete, counts=counts, elapsed_s=summary["seconds"])
        atomic_write_text(out / "meta.json", to_json(meta))
        store.finish() if complete else store.close()
        if counts["skipped"]:
            warn(f"{counts['skipped']} of {len(paths)} inputs could not be read; see {out / 'index.csv'}")
    else:
        store.close()
    dist.barrier()  # no process exits (and gets its siblings killed by torchrun) before the files are final
    summary["rank"] = dist.rank
    return summary
