"""Fine-tuning: ``fit(TrainConfig(...))`` is ``torchtool finetune`` from Python.

The loop in :func:`_loop` reads top to bottom; setup, one epoch, checkpoints and logs are
named helpers in their own modules. Under torchrun every process runs the same code:
DistributedSampler shards the data, DDP averages gradients, metrics are all-reduced so
every rank agrees, and only rank 0 writes files or draws bars.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Collection
from typing import Any

from torchtool.core.infer import BadInputs
from torchtool.core.models.timm_models import source_versions
from torchtool.core.models.checkpoint import load_checkpoint, save_safetensors
from torchtool.core.output import progress, warn
from torchtool.core.runtime import Dist, determinism, distributed, resolve_device, rng_state
from torchtool.core.train import epoch as epochs, setup, state
from torchtool.core.train.config import TrainConfig
from torchtool.core.train.log import RunLog
from torchtool.core.train.state import Run


def fit(cfg: TrainConfig, *, resume: bool = False, resume_from: str | None = None, overwrite: bool = False,
        quiet: bool = False, tensorboard: bool = False, export: str | None = None,
        given: Collection[str] = (), argv: list[str] | None = None) -> dict[str, Any]:
    """Train ``cfg`` and return the run's summary (best epoch, accuracy, paths, skipped images).

    ``resume`` continues OUT/last.pth (starting afresh when there is none), ``resume_from`` a
    given checkpoint; the checkpoint's settings are kept except those named in ``given``
    (e.g. ``{"epochs"}``: the options the user set). ``argv`` (default ``sys.argv``) is the
    command line recorded in OUT/config.json.
    """
    with distributed(cfg.device) as dist, contextlib.ExitStack() as held:
        run = setup.prepare(cfg, dist, held, resume=resume, resume_from=resume_from, overwrite=overwrite,
                            export=export, tensorboard=tensorboard, given=given, quiet=quiet)
        with determinism(run.cfg.deterministic):
            # run.cfg: with --resume, merged with the checkpoint's
            return _loop(run.cfg, run, dist, quiet=quiet, argv=list(sys.argv if argv is None else argv))


def _loop(cfg: TrainConfig, run: Run, dist: Dist, *, quiet: bool, argv: list[str]) -> dict[str, Any]:
    # --- setup: device, model, data, optimizer, schedule ---
    device = resolve_device(cfg.device, dist.local_rank)
    step, schedule, model = setup.build(cfg, run, dist, device)
    loaders = setup.loaders(cfg, run, dist, device)
    bad = (BadInputs(run.splits.train_paths, cfg.strict), BadInputs(run.splits.val_paths, cfg.strict))
    schedule, start, best, history = state.restore(run.checkpoint, cfg, step, schedule, dist)
    log = None
    if dist.is_main:
        state.write_run_config(run, argv, start)
        log = RunLog(run.out, history, cfg.epochs, ema=step.ema is not None, tensorboard=run.tensorboard, quiet=quiet,
                     top_k=min(5, len(run.splits.classes)))
    stopped_early, done, began = False, start, time.perf_counter()

    # --- the loop: train, validate, schedule, checkpoint, log ---
    for epoch in range(start, cfg.epochs):
        if cfg.patience and epoch - best.epoch >= cfg.patience:
            stopped_early = True  # checked before the epoch, so a resumed run stops where this one would
            break
        t0 = time.perf_counter()
        loaders.train.sampler.set_epoch(epoch)  # this epoch's order and augmentations, same on resume
        seen = min(len(loaders.train.sampler), len(loaders.train) * cfg.batch_size)  # drop_last drops a few
        with progress(total=seen, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", quiet=quiet) as bar:
            sums, first_bad = epochs.train_one_epoch(step, loaders.train, bad[0], bar)
        train = dist.all_reduce(sums)  # [loss sum, correct, non-finite batches, images]: every rank agrees
        epochs.check_epoch(train, first_bad, epoch + 1)
        row = {"epoch": epoch + 1, "train_loss": train[0] / train[3], "train_acc": train[1] / train[3],
               **_validate(model, loaders.val, step, bad[1], dist, quiet, "val"),
               "lr": step.optimizer.param_groups[0]["lr"], "seconds": 0.0}
        if step.ema is not None:
            row.update(_validate(step.ema.module, loaders.val, step, bad[1], dist, quiet, "ema_val"))
        schedule.step(row["val_acc"])
        note_skipped(bad, dist, quiet)
        rng = dist.all_gather(rng_state())  # a collective: every rank takes part
        history.append(row)
        done = epoch + 1
        metric, source = _winner(row)
        at = best.add(metric, done)  # on every rank: patience reads it
        if dist.is_main:
            row["seconds"] = time.perf_counter() - t0  # so far; the log adds the checkpoint and plot time
            state.save(run, step, schedule, model, epoch=done, best=best, history=history, rng=rng, at=at,
                       source=source)
            log.epoch(row, started=t0)
        dist.barrier()  # nobody starts the next epoch (or exits) before the checkpoint is on disk

    # --- finish: export the best weights, summarise ---
    if log is not None:
        log.close()
    del loaders  # shut the loader workers down now, not whenever a garbage collection finds them
    return finish(run, dist, bad, best=best, history=history, stopped_early=stopped_early,
                  epochs_done=done, seconds=time.perf_counter() - began)


def _winner(row: dict[str, Any]) -> tuple[float, str]:
    """An epoch's (validation accuracy, weights that reached it): the EMA's when it did better."""
    if row.get("ema_val_acc", -1.0) > row["val_acc"]:
        return row["ema_val_acc"], "ema"
    return row["val_acc"], "model"


def _validate(model: Any, loader: Any, step: Any, bad: BadInputs, dist: Dist, quiet: bool,
              prefix: str) -> dict[str, float]:
    """{prefix_loss, prefix_acc, prefix_top5} of ``model`` over the validation data, every rank's."""
    with progress(total=len(loader.dataset), desc="validate" if prefix == "val" else "validate EMA", unit="img",
                  quiet=quiet) as bar:
        val = dist.all_reduce(epochs.validate(model, loader, step, bad, bar))
    n = max(val[3], 1)
    return {f"{prefix}_loss": val[0] / n, f"{prefix}_acc": val[1] / n, f"{prefix}_top5": val[2] / n}


def note_skipped(bad: tuple[BadInputs, BadInputs], dist: Dist, quiet: bool) -> None:
    """Merge every rank's unreadable images, and say so on stderr when new ones turn up."""
    for part, name in zip(bad, ("training", "validation")):
        before = len(part.errors)
        for errors in dist.all_gather(part.errors):  # this rank's own among them
            part.errors.update(errors)
        if len(part.errors) > before and not quiet:
            warn(f"skipped {len(part.errors)} unreadable {name} image(s), e.g. "
                 f"{part.paths[next(iter(part.errors))]}: {next(iter(part.errors.values()))}")


def finish(run: Run, dist: Dist, bad: tuple[BadInputs, BadInputs], *, best: state.Best,
           history: list[dict[str, Any]], stopped_early: bool, epochs_done: int, seconds: float) -> dict[str, Any]:
    """Export the best weights when asked; the run's summary."""
    best_path = run.out / "best.pth"
    if run.export is not None and dist.is_main:
        ckpt = load_checkpoint(best_path)
        save_safetensors(run.export, ckpt["model"], {"arch": run.arch, "classes": ckpt["classes"],
                                                     "preprocess": ckpt["preprocess"], **source_versions(run.arch)})
    dist.barrier()
    listed = [{"path": str(part.paths[i]), "split": split, "error": e}
              for part, split in zip(bad, ("train", "val")) for i, e in sorted(part.errors.items())]
    if listed:  # even with --quiet: the run's exit code 3 needs its reason
        warn(f"{len(listed)} unreadable image(s) skipped ({len(bad[0].errors)} training, "
             f"{len(bad[1].errors)} validation); the summary lists them")
    row = next((r for r in history if r["epoch"] == best.epoch), None)
    source = _winner(row)[1] if row else None
    return {"model": run.arch, "classes": len(run.splits.classes), "train_images": len(run.splits.train_paths),
            "val_images": len(run.splits.val_paths), "epochs": epochs_done, "best_epoch": best.epoch,
            "best_val_acc": best.metric,
            "best_val_top5": row.get("ema_val_top5" if source == "ema" else "val_top5") if row else None,
            "top_k": min(5, len(run.splits.classes)),  # what best_val_top5 counted: the top min(5, classes)
            "best_weights": source,
            "stopped_early": stopped_early, "skipped_images": len(listed),
            "out": str(run.out), "best": str(best_path),
            "kept": [str(best.path(run.out, r)) for r in range(len(best.ranked))],
            "last": str(run.out / "last.pth"), "config": str(run.out / "config.json"),
            "metrics": str(run.out / "metrics.csv"), "curves": str(run.out / "curves.png"),
            "export": str(run.export) if run.export else None, "seconds": round(seconds, 2), "skipped": listed}
