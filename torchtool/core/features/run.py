"""The extract-features run: inputs -> model -> layers -> .npy files row by row, resumable; --list-layers.

The inputs are images (one row each) or videos (their sampled frames: features.videos). Under
torchrun every process takes every ``world_size``-th pending image or video and writes its rows
into the same files; rank 0 writes index.csv and meta.json at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchtool.core import infer, runtime
from torchtool.core.env import run_versions
from torchtool.core.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, is_image_name
from torchtool.core.features import videos as vids
from torchtool.core.features.extractor import FeatureExtractor
from torchtool.core.features.layers import LayerCatalog
from torchtool.core.features.pooling import POOLS
from torchtool.core.features.store import OFFSETS, PENDING, FeatureStore, prepare_output
from torchtool.core.files import atomic_write, atomic_write_text, find_inputs, run_lock, writable_dir
from torchtool.core.models.build import build_model, choose_weights
from torchtool.core.models.preprocess import parse_channels
from torchtool.core.output import Failure, UsageError, info, progress, to_json, warn
from torchtool.core.video.inputs import VIDEO_EXTENSIONS, is_video_name


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
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: str | None = None  # "R,G,B"
    std: str | None = None
    # videos (features.videos.Sampling): one of segments / fps / every; None each: --segments 8
    segments: int | None = None
    mode: str | None = None  # None: test
    fps: float | None = None
    every: int | None = None
    max_frames: int | None = None
    pool_frames: str | None = None  # None: none
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


def find_inputs_of_one_kind(paths: list[str], list_file: str | None) -> tuple[str, list[Path]]:
    """The inputs in order, and what they are: "images" or "videos" (by extension; never both)."""
    found = [p for p, _ in find_inputs(paths, list_file, lambda n: is_image_name(n) or is_video_name(n),
                                       "images or videos", IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)]
    videos = [p for p in found if is_video_name(p)]
    if videos and len(videos) < len(found):
        image = next(p for p in found if not is_video_name(p))
        raise UsageError(f"the inputs mix images and videos ({image}, {videos[0]})",
                         hint="extract them in separate runs, each with its own --out")
    return ("videos" if videos else "images"), found


def _sampling(cfg: ExtractConfig, kind: str, dist: runtime.Dist) -> vids.Sampling | None:
    """The videos' sampling, checked; None for images (a video option with images is refused)."""
    if kind == "images":
        given = [o for o, v in (("--segments", cfg.segments), ("--fps", cfg.fps), ("--every", cfg.every),
                                ("--max-frames", cfg.max_frames), ("--mode", cfg.mode),
                                ("--pool-frames", cfg.pool_frames)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} applies to videos, and the inputs are images")
        return None
    sampling, default = vids.sampling_from(cfg.segments, cfg.fps, cfg.every, cfg.mode, cfg.seed, cfg.max_frames,
                                           cfg.pool_frames)
    if default and dist.is_main:
        info(f"taking {sampling.segments} frames per video, one in the middle of each of {sampling.segments} equal "
             "segments (--segments); --fps F or --every N take frames at a fixed rate", cfg.quiet)
    return sampling


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
    return LayerCatalog(built.model, built.arch).table(built.preprocessing(image_size).crop_size)


def _layer_shapes(extractor: FeatureExtractor, crop: int, dev: torch.device, amp: bool) -> dict[str, tuple]:
    with torch.inference_mode(), runtime.autocast(dev, amp):
        out = extractor(torch.zeros(1, 3, crop, crop, device=dev))
    return {name: tuple(t.shape[1:]) for name, t in out.items()}


def run_extraction(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract features for every input (image or video); returns the run's summary (every process has it)."""
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
    # 1. validate everything cheap before any input is read (stdin is read once, by rank 0)
    kind, paths = dist.broadcast(find_inputs_of_one_kind(cfg.inputs, cfg.list_file) if dist.is_main else None)
    sampling = _sampling(cfg, kind, dist)
    dev = runtime.resolve_device(cfg.device, dist.local_rank)
    runtime.seed_everything(cfg.seed)  # random-init weights (--weights none) must agree across ranks and reruns
    built = build_model(*choose_weights(cfg.model, cfg.weights), device="cpu")
    preprocess = built.preprocessing(cfg.image_size, cfg.resize, crop_pct=cfg.crop_pct,
                                     interpolation=cfg.interpolation, mean=parse_channels(cfg.mean, "--mean"),
                                     std=parse_channels(cfg.std, "--std"))
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
    layout = None
    if sampling is not None:  # each video's frame count and sampled frames, read once by rank 0
        threads = max(1, min(cfg.workers, runtime.available_cpus()) * 2)
        layout = vids.Layout(dist.broadcast(vids.plan_videos(paths, sampling, threads) if dist.is_main else None),
                             sampling)
        fingerprint |= {"sampling": asdict(sampling), "plan_sha256": vids.plan_digest(layout.plan), "rows": layout.rows}
        failed = next((v for v in layout.plan if v.error), None)
        if cfg.strict and failed is not None:  # before OUT is touched, as a bad frame would fail the run later
            raise Failure(f"cannot read {failed.path}: {failed.error}",
                          hint="drop --strict to skip unreadable inputs and keep going")
    rows = len(paths) if layout is None else layout.rows
    lead = [rows] if layout is None or layout.group == 1 else [len(paths), layout.group]
    variable = layout is not None and not layout.pooled and not sampling.fixed  # offsets.npy says whose rows

    # 2. fresh output or resume (rank 0 holds OUT for the run, decides, creates the files; the others open them)
    held.enter_context(run_lock(out, dist.is_main))
    resuming = prepare_output(out, fingerprint, names + (["offsets"] if variable else []), cfg.overwrite) \
        if dist.is_main else True
    meta = {"model": built.arch, "weights": built.weights, "complete": False, "fingerprint": fingerprint,
            "layers": {lay.name: {"target": lay.target, "pool": lay.pool, "shape": [*lead, *shapes[lay.name]],
                                  "dtype": cfg.dtype} for lay in layers},
            "pooling": {lay.name: lay.pool for lay in layers}, "normalize": cfg.normalize,
            "preprocess": preprocess.to_dict(), "rows": rows, "input": kind}
    if layout is not None:
        meta |= {"videos": len(paths), "sampling": asdict(sampling)} | ({"offsets": OFFSETS} if variable else {})
    meta |= {"config": asdict(cfg), "versions": run_versions()}
    group = 1 if layout is None else layout.group
    if dist.is_main:  # run_lock made OUT
        atomic_write_text(out / "meta.json", to_json(meta))  # first, so a killed run is never taken as done
        store = FeatureStore(out, rows, shapes, cfg.dtype, create=not resuming, rank=0, group=group)
        if layout is not None:
            _start_videos(out, store, layout, variable)
    dist.barrier()
    if not dist.is_main:
        store = FeatureStore(out, rows, shapes, cfg.dtype, create=False, rank=dist.rank, group=group)

    # 3. the loop: workers decode and crop to uint8 (4x less to pass on than floats), the batch
    # is normalised on the device, one forward gives every layer, rows are written as they come
    # what is left, read by rank 0 before any rank writes and shared: a rank reading it itself could see rows another
    # rank has already written, and the ranks would split the work differently (rows done twice, others never)
    if layout is None:
        pending = dist.broadcast(store.pending() if dist.is_main else None)
        todo = pending[dist.rank::dist.world_size]
        what, total = "rows", len(paths)
        mine = [paths[i] for i in todo]
        loader, normalize = infer.image_loader(mine, preprocess, dev, batch_size=cfg.batch_size, workers=cfg.workers,
                                               max_pixels=cfg.max_pixels, fast_decode=cfg.fast_decode)
        bad, units = infer.BadInputs(mine, cfg.strict), len(todo)
    else:
        pending = dist.broadcast(layout.pending(store.status.read()) if dist.is_main else None)
        todo = np.asarray(pending[dist.rank::dist.world_size], dtype=np.int64)
        what, total = "videos", len(paths)
        loader, normalize = vids.frame_loader(layout, todo, preprocess, dev, batch_size=cfg.batch_size,
                                              workers=cfg.workers)
        bad, units = infer.BadInputs(layout.labels(), cfg.strict), sum(len(layout.frames(v)) for v in todo)
    if dist.is_main and resuming and len(pending) < total:
        info(f"resuming {out}: {total - len(pending)} of {total} {what} already done", cfg.quiet)
    pool = vids.FramePool(layout, sampling.pool_frames, cfg.normalize) if layout is not None and layout.pooled else None
    trim = runtime.HeapTrimmer() if dev.type == "cpu" else (lambda: None)  # RSS stays flat over long runs
    wait = infer.LoadWait()
    unit = "img" if layout is None else "frame"
    with progress(total=units, desc="extract", unit=unit, quiet=cfg.quiet) as bar:
        for batch in infer.run(extractor, loader, dev, bad=bad, normalize=normalize, amp=cfg.amp, bar=bar, wait=wait,
                               pad_to=loader.batch_size):  # the same bytes from one process or several
            # image runs number their own inputs; a video run's loader gives the frame rows themselves
            at = (lambda i: int(todo[i])) if layout is None else int
            good = batch.indices[batch.good].numpy()
            good = todo[good] if layout is None else good
            feats = {} if batch.outputs is None else {
                k: v.float().cpu().numpy().astype(cfg.dtype, copy=False) for k, v in batch.outputs.items()}
            errors = {at(i): e for i, e in batch.errors.items()}
            if pool is None:
                store.write(good, feats, errors)
            else:
                store.write(*pool.add(good, feats, errors))
            trim()

    # 4. finish: rank 0 writes the index and marks the run complete
    dist.barrier()
    counts = store.counts()
    summary = {"rows": rows, "ok": counts["ok"], "skipped": counts["skipped"],
               "seconds": round(time.perf_counter() - started, 3), "out": str(out),
               "files": [str(out / f"{n}.npy") for n in names] + [str(out / "index.csv"), str(out / "meta.json")]}
    if layout is not None:
        states = vids.video_status(layout, store.status.read(), store.errors())
        done = [s for s, _ in states]
        summary |= {"videos": len(paths), "frames": int(layout.offsets[-1]), "ok": done.count("ok"),
                    "partial": done.count("partial"), "skipped": done.count("skipped")}
        summary["files"] += [str(out / OFFSETS)] if variable else []
    # the rate of the extraction loop itself (model loading and start-up are in "seconds")
    summary[f"{'images' if layout is None else 'frames'}_per_s"] = round(
        units * dist.world_size / max(wait.total_s, 1e-9), 2)
    if dist.is_main:
        if layout is None:
            store.write_index(paths)
        else:
            atomic_write_text(out / "index.csv", vids.video_index(layout, states), errors="surrogateescape")
        complete = counts["pending"] == 0
        meta.update(complete=complete, counts=counts, elapsed_s=summary["seconds"])
        atomic_write_text(out / "meta.json", to_json(meta))
        store.finish() if complete else store.close()
        failed = summary["skipped"] + summary.get("partial", 0)
        if failed:
            warn(f"{failed} of {total} {'inputs' if layout is None else 'videos'} could not be read"
                 f"{'' if layout is None else ' (whole or in part)'}; see {out / 'index.csv'}")
        # (--fast-decode, a JPEG decoder setting, is no advice for videos)
        infer.note_loader_bound(wait, loader, fast_decode=cfg.fast_decode or layout is not None, model=built.arch,
                                quiet=cfg.quiet)
    else:
        store.close()
    dist.barrier()  # no process exits (and gets its siblings killed by torchrun) before the files are final
    if summary["skipped"] and not summary["ok"] and not summary.get("partial"):  # nothing to show for the run
        raise Failure(f"none of the {total} inputs could be read", hint=f"see {out / 'index.csv'} for why")
    return summary


def _start_videos(out: Path, store: FeatureStore, layout: vids.Layout, variable: bool) -> None:
    """Rank 0, before the loop: offsets.npy, and the rows of the videos that failed in planning (once)."""
    if variable:
        with atomic_write(out / OFFSETS, "wb") as fh:
            np.save(fh, layout.offsets)
    status = store.status.read()
    bad = {row: error for row, error in layout.failed()[1].items() if status[row] == PENDING}
    if bad:
        store.write(np.empty(0, dtype=np.int64), {}, bad)
