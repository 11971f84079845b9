"""timm (pytorch-image-models) as a model source: ``timm:NAME`` or ``timm:NAME.TAG`` everywhere a model is named.

timm is optional (``pip install 'torchtool[timm]'``); without it a ``timm:`` name fails in one
line saying how to install it. The rest of the model layer asks this module for what it asks
torchvision: whether a name exists (close matches when not), the model itself, its head, and
the evaluation preprocessing of the name's pretrained tag (timm's resolved data config, as
every timm model card shows it: ``resolve_model_data_config`` + ``create_transform``;
validate.py's larger test size, where a tag has one, is ``--image-size N --crop-pct P``).
Nothing here runs at import: timm is imported when a function needs it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from torchtool.core.output import Failure, UsageError, suggest

PREFIX = "timm:"
INSTALL = "pip install 'torchtool[timm]' (or pip install timm)"


def is_timm(arch: str | None) -> bool:
    """True for ``timm:NAME[.TAG]``."""
    return bool(arch) and arch.startswith(PREFIX)


def timm_name(arch: str) -> str:
    """``timm:convnext_tiny.fb_in1k`` -> ``convnext_tiny.fb_in1k`` (what timm.create_model takes)."""
    return arch[len(PREFIX):]


def import_timm() -> Any:
    """The timm module, or one line telling how to install it."""
    try:
        import timm
    except ImportError as exc:
        if exc.name not in (None, "timm") and not str(exc.name).startswith("timm."):
            raise Failure(f"timm cannot be imported: {exc}", hint=f"reinstall it: {INSTALL}") from None
        raise UsageError("timm: models need timm, which is not installed", hint=INSTALL) from None
    return timm


def timm_version() -> str:
    """The installed timm's version (recorded in checkpoints of timm models)."""
    return import_timm().__version__


def source_versions(arch: str) -> dict[str, str]:
    """``{"timm_version": ...}`` for a timm model (what a checkpoint records beside its arch), else {}."""
    return {"timm_version": timm_version()} if is_timm(arch) else {}


def check_timm(arch: str) -> str:
    """Fail with close matches unless ``arch`` is a timm model (and its tag a pretrained tag of it)."""
    timm = import_timm()
    name = timm_name(arch)
    base, _, tag = name.partition(".")
    if not base or not timm.is_model(base):
        names = timm.list_models()
        close = suggest(base, names)
        hint = close.replace("did you mean ", "did you mean timm:").replace(", ", ", timm:") if close else \
            "list them with --list-models 'timm:*PATTERN*'"
        raise UsageError(f"unknown timm model {base!r}", hint=hint)
    if tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*")]
        if tag not in tags:
            shown = ", ".join(tags[:8]) + (f" ({len(tags)} in all)" if len(tags) > 8 else "")
            raise UsageError(f"timm:{base} has no pretrained tag {tag!r}",
                             hint=f"choose from: {shown}" if tags else f"timm:{base} has no pretrained weights")
    return arch


def list_timm(pattern: str) -> list[str]:
    """``timm:`` names matching a glob: architectures, and pretrained tags when the pattern holds a dot."""
    timm = import_timm()
    pattern = pattern or "*"
    names = timm.list_pretrained(pattern) if "." in pattern else timm.list_models(pattern)
    return [PREFIX + n for n in names]


def pretrained_cfg(arch: str) -> dict[str, Any]:
    """timm's pretrained config of the name's tag (the default tag when none is given), as a dict."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name(arch), allow_unregistered=True)
    return cfg.to_dict() if cfg is not None else {}


def data_config(arch: str) -> dict[str, Any]:
    """timm's resolved data config of the name and tag (its model cards' recipe: the train size), checked
    to be one torchtool's crops can do: square, a center or squash crop."""
    from timm.data import resolve_data_config

    data = resolve_data_config({}, pretrained_cfg=pretrained_cfg(arch), use_test_size=False)
    _, height, width = data["input_size"]
    mode = data.get("crop_mode") or "center"
    if height != width:
        raise Failure(f"{arch}'s input is {height}x{width}: torchtool's crops are square",
                      hint="pass --image-size N (and --resize or --crop-pct) for a square input")
    if mode not in ("center", "squash"):
        raise Failure(f"{arch} is evaluated with timm's crop_mode {mode!r}, which torchtool does not do",
                      hint="pass --image-size/--crop-pct to use a center crop instead")
    if data["interpolation"] not in ("bilinear", "bicubic", "nearest"):
        data["interpolation"] = "bicubic"
    return {**data, "crop_mode": mode}


def create_timm(arch: str, pretrained: bool = False, **kwargs: Any) -> Any:
    """``timm.create_model``; pretrained weights come through timm's own download cache (one line when offline)."""
    timm = import_timm()
    if not pretrained:
        return timm.create_model(timm_name(arch), pretrained=False, **kwargs)
    with _hub_quiet_and_offline_when_unreachable(arch), contextlib.redirect_stdout(sys.stderr):  # stdout: data
        try:
            return timm.create_model(timm_name(arch), pretrained=True, **kwargs)
        except Exception as exc:  # offline, a hub error, a missing file: all mean "not available here"
            raise _not_downloaded(arch, exc) from None


def _not_downloaded(arch: str, exc: BaseException) -> Failure:
    message = str(exc).splitlines()[0] if str(exc) else ""
    return Failure(f"cannot download the weights of {arch} ({exc.__class__.__name__}: {message[:120]})",
                   hint=f"timm keeps them in {weights_cache(arch)}; copy them there, or pass --weights PATH "
                   "for a local file, or --weights none for random initialisation")


@contextlib.contextmanager
def _hub_quiet_and_offline_when_unreachable(arch: str) -> Any:
    """Without a connection to the Hugging Face hub, its client retries for ~45 s, saying so each time: ask once
    (3 s), then fail at once when the weights are not cached, or read the cache in offline mode when they are."""
    import logging

    if not pretrained_cfg(arch).get("hf_hub_id"):
        yield  # a plain URL (torch's cache): urllib fails fast on its own
        return
    from huggingface_hub import constants

    hub_logger = logging.getLogger("huggingface_hub")
    level, offline = hub_logger.level, constants.HF_HUB_OFFLINE
    if not offline and not _reachable(constants.ENDPOINT):
        if not any((weights_cache(arch) / "snapshots").glob("*/*")):
            raise _not_downloaded(arch, ConnectionError(f"{constants.ENDPOINT} cannot be reached"))
        constants.HF_HUB_OFFLINE = True
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)
        constants.HF_HUB_OFFLINE = offline


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True


def weights_cache(arch: str) -> Path:
    """Where timm keeps (or would keep) the pretrained file of ``arch``: the Hugging Face cache or torch's."""
    cfg = pretrained_cfg(arch)
    if cfg.get("hf_hub_id"):
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE) / f"models--{cfg['hf_hub_id'].replace('/', '--')}"
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.get("url") or arch)


def pretrained_classes(model: Any) -> list[str] | None:
    """The class names of a pretrained timm model's ImageNet subset (None for other label sets)."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if not subset:
        return None
    info = ImageNetInfo(subset)
    return [info.index_to_description(i) for i in range(model.num_classes)]


def is_timm_model(model: Any) -> bool:
    """True for a model timm built (it has timm's classifier interface and pretrained config)."""
    return hasattr(model, "reset_classifier") and hasattr(model, "get_classifier") and \
        isinstance(getattr(model, "pretrained_cfg", None), dict)


def classifier_name(model: Any) -> str | None:
    """The module name of a timm model's classifier (its pretrained config's ``classifier``), None if not one."""
    name = model.pretrained_cfg.get("classifier")
    if isinstance(name, (tuple, list)):  # distilled models: (head, head_dist); the first is the class head
        name = name[0]
    try:
        model.get_submodule(name)
    except (AttributeError, TypeError):
        return None
    return name


def check_input_size(model: Any, crop: int) -> None:
    """A timm model with a fixed input (a ViT's position embeddings) takes only its own size: one line otherwise."""
    if not is_timm_model(model) or not model.pretrained_cfg.get("fixed_input_size"):
        return
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or model.pretrained_cfg["input_size"][1:]
    if tuple(size) != (crop, crop):
        raise UsageError(f"this model takes {size[0]}x{size[1]} inputs only (fixed position embeddings), not {crop} px",
                         hint=f"leave --image-size out, or pass --image-size {size[0]}")


def stage_modules(model: Any) -> list[tuple[str, int]]:
    """(module name, channels) of each of a timm model's feature stages (``feature_info``), in order."""
    info = getattr(model, "feature_info", None) or []
    return [(f["module"], int(f.get("num_chs", 0))) for f in info if isinstance(f, dict) and f.get("module")]
