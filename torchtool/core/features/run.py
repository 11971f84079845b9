"""The extract-features run: inputs -> model -> layers -> .npy files row by row, resumable; --list-layers.

Under torchrun every process takes every ``world_size``-th pending row and writes its
rows into the same files; rank 0 writes index.csv and meta.json at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchtool.core import infer, runtime
from torchtool.core.env import run_versions
from torchtool.core.data.images import MAX_PIXELS, find_images
from torchtool.core.features.extractor import FeatureExtractor
from torchtool.core.features.layers import LayerCatalog
from torchtool.core.features.pooling import POOLS
from torchtool.core.features.store import FeatureStore, prepare_output
from torchtool.core.files import atomic_write_text, run_lock, writable_dir
from torchtool.core.models.build import build_model, choose_weights
from torchtool.core.output import Failure, UsageError, info, progress, to_json, warn


@dataclass
class ExtractConfig:
    """Everything an extraction depends on, as plain values (recorded in meta.json as "config")."""

    inputs: list[str]
    model: str | None = None  # None: the weights file's architecture, else models.names.DEFAULT_MODEL
    weights: str = "DEFAULT"
    layers: list[str] = field(default_factory=lambda: ["gap"])
    pool: list[str] = field(default_factory=lambda: ["none"])
    normalize: bool = False
    dtype: str = "float32"
    out: str = "features"
    list_file: str | None = None
    batch_size: int | None = None  # None: runtime.default_batch_size of the device
    workers: int = runtime.DEFAULT_WORKERS
    device: str = "auto"
    amp: bool = False
    fast_decode: bool = False  # JPEGs decoded at a reduced DCT scale (data.images.load_image)
    image_size: int | None = None
    resize: int | None = None
    overwrite: bool = False
    strict: bool = False
    max_pixels: int = MAX_PIXELS
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
    digest = hashlib.sha256(b"\n".join(map(os.fsencode, paths))).hexdigest()  # any file name
    weights_file = Path(weights)
    if weights_file.is_file():  # a file replaced at the same path must not be resumed into
        stat = weights_file.stat()
        weights = f"{weights} ({stat.st_size} bytes, mtime_ns {stat.st_mtime_ns})"
    return {"model": arch, "weights": weights, "seed": cfg.seed, "layers": [asdict(lay) for lay in layers], "normalize": cfg.normalize,
            "amp": cfg.amp, "dtype": cfg.dtype, "preprocess": preprocess, "fast_decode": cfg.fast_decode,
            "inputs_sha256": digest, "rows": len(paths)}


def list_layers(model: str | None, weights: str, image_size: int | None = None) -> list[dict[str, Any]]:
    """``--list-layers``: every layer name of the model with its per-sample shape (nothing is downloaded)."""
    arch, choice = choose_weights(model, weights)
    built = build_model(arch, choice if choice.kind == "file" else "none")  # pretrained or not, the same layers
    return LayerCatalog(built.model, built.arch).table(image_size or built.preprocess.crop_size)


def _layer_shapes(extractor: FeatureExtractor, crop: int, dev: torch.device, amp: bool) -> dict[str, tuple]:
    with torch.inference_mode(), runtime.autocast(dev, amp):
        out = extractor(torch.zeros(1, 3, crop, crop, device=dev))
    return {name: tuple(t.shape[1:]) for name, t in out.items()}


def run_extraction(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract features for every input; returns the run's summary (every process has it)."""
    started = time.perf_counter()
    if cfg.dtype not in ("float32", "float16"):
        raise UsageError(f"unknown --dtype {cfg.dtype!r}", hint="choose float32 or float16")
    runtime.check_batch_size(cfg.batch_size)
    default_pool, per_layer_pool = parse_pools(cfg.pool)
    layer_names = split_layers(cfg.layers)
    with runtime.distributed(cfg.device) as dist, contextlib.ExitStack() as held:
        return _run(cfg, dist, held, default_pool, per_layer_pool, layer_names, started)


def _run(cfg: ExtractConfig, dist: runtime.Dist, held: contextlib.ExitStack, default_pool: str,
         per_layer_pool: dict[str, str], layer_names: list[str], started: float) -> dict[str, Any]:
    # 1. validate everything cheap before any image is read (stdin is read once, by rank 0)
    paths = dist.broadcast(find_images(cfg.inputs, cfg.list_file) if dist.is_main else None)
    dev = runtime.resolve_device(cfg.device, dist.local_rank)
    runtime.seed_everything(cfg.seed)  # random-init weights (--weights none) must agree across ranks and reruns
    built = build_model(*choose_weights(cfg.model, cfg.weights), device="cpu")
    preprocess = built.preprocess.resized(cfg.image_size, cfg.resize)
    catalog = LayerCatalog(built.model, built.arch)
    # gap,gap:avg asks for one layer twice, alike: kept once; gap:avg,gap:max is a contradiction
    layers = list(dict.fromkeys(catalog.resolve(n, default_pool, per_layer_pool) for n in layer_names))
    names = [lay.name for lay in layers]
    if len(set(names)) < len(names):
        raise UsageError("a layer is requested twice with different pooling",
                         hint="name each layer once; use LAYER:POOL to pick its pooling")
    # channels_last is faster for convolutions on CUDA and on CPU (oneDNN) alike
    extractor = FeatureExtractor(built.model, layers, normalize=cfg.normalize, nodes=catalog.nodes, fold_bn=True)
    extractor = extractor.to(dev, memory_format=torch.channels_last)
    shapes = _layer_shapes(extractor, preprocess.crop_size, dev, cfg.amp)
    out = writable_dir(cfg.out)
    fingerprint = _fingerprint(cfg, built.arch, built.weights, layers, preprocess.to_dict(), paths)

    # 2. fresh output or resume (rank 0 holds OUT for the run, decides, creates the files; the others open them)
    held.enter_context(run_lock(out, dist.is_main))
    resuming = prepare_output(out, fingerprint, names, cfg.overwrite) if dist.is_main else True
    meta = {"model": built.arch, "weights": built.weights, "complete": False, "fingerprint": fingerprint,
            "layers": {lay.name: {"target": lay.target, "pool": lay.pool, "shape": [len(paths), *shapes[lay.name]],
                                  "dtype": cfg.dtype} for lay in layers},
            "pooling": {lay.name: lay.pool for lay in layers}, "normalize": cfg.normalize,
            "preprocess": preprocess.to_dict(), "rows": len(paths), "config": asdict(cfg), "versions": run_versions()}
    if dist.is_main:  # run_lock made OUT
        atomic_write_text(out / "meta.json", to_json(meta))  # first, so a killed run is never taken as done
        store = FeatureStore(out, len(paths), shapes, cfg.dtype, create=not resuming, rank=0)
    dist.barrier()
    if not dist.is_main:
        store = FeatureStore(out, len(paths), shapes, cfg.dtype, create=False, rank=dist.rank)
    pending = store.pending()
    todo = pending[dist.rank::dist.world_size]
    if dist.is_main and len(pending) < len(paths):
        info(f"resuming {out}: {len(paths) - len(pending)} of {len(paths)} rows already done", cfg.quiet)

    # 3. the loop: workers decode and crop to uint8 (4x less to pass on than floats), the batch
    # is normalised on the device, one forward gives every layer, rows are written as they come
    mine = [paths[i] for i in todo]
    loader, normalize = infer.image_loader(mine, preprocess, dev, batch_size=cfg.batch_size, workers=cfg.workers,
                                           max_pixels=cfg.max_pixels, fast_decode=cfg.fast_decode)
    bad = infer.BadInputs(mine, cfg.strict)
    trim = runtime.HeapTrimmer() if dev.type == "cpu" else (lambda: None)  # RSS stays flat over long runs
    wait = infer.LoadWait()
    with progress(total=len(todo), desc="extract", unit="img", quiet=cfg.quiet) as bar:
        for batch in infer.run(extractor, loader, dev, bad=bad, normalize=normalize, amp=cfg.amp, bar=bar, wait=wait):
            rows = todo[batch.indices.numpy()]
            feats = {} if batch.outputs is None else {
                k: v.float().cpu().numpy().astype(cfg.dtype, copy=False) for k, v in batch.outputs.items()}
            store.write(rows[batch.good.numpy()], feats, {int(todo[i]): e for i, e in batch.errors.items()})
            trim()

    # 4. finish: rank 0 writes the index and marks the run complete
    dist.barrier()
    counts = store.counts()
    summary = {"rows": len(paths), "ok": counts["ok"], "skipped": counts["skipped"],
               "seconds": round(time.perf_counter() - started, 3), "out": str(out),
               "files": [str(out / f"{n}.npy") for n in names] + [str(out / "index.csv"), str(out / "meta.json")]}
    # the rate of the extraction loop itself (model loading and start-up are in "seconds")
    summary["images_per_s"] = round(len(todo) * dist.world_size / max(wait.total_s, 1e-9), 2)
    if dist.is_main:
        store.write_index(paths)
        complete = counts["pending"] == 0
        meta.update(complete=complete, counts=counts, elapsed_s=summary["seconds"])
        atomic_write_text(out / "meta.json", to_json(meta))
        store.finish() if complete else store.close()
        if counts["skipped"]:
            warn(f"{counts['skipped']} of {len(paths)} inputs could not be read; see {out / 'index.csv'}")
        infer.note_loader_bound(wait, loader, fast_decode=cfg.fast_decode, model=built.arch, quiet=cfg.quiet)
    else:
        store.close()
    dist.barrier()  # no process exits (and gets its siblings killed by torchrun) before the files are final
    if counts["skipped"] and not counts["ok"]:  # nothing to show for the run: a failure, not a partial success
        raise Failure(f"none of the {len(paths)} inputs could be read", hint=f"see {out / 'index.csv'} for why")
    return summary
