"""MODEL as summary and profile take it: a torchvision or timm name, a weights file, or ``module:factory``.

- ``resnet50`` (any torchvision classification model) or ``timm:convnext_tiny`` (a timm model);
  ``kwargs`` go to its builder, e.g. ``{"num_classes": 10}``;
- a torchtool checkpoint or a weights file that names its architecture (what ``--weights``
  takes elsewhere);
- ``package.module:factory`` or ``path/to/file.py:factory``: a callable returning an
  ``nn.Module``, called with ``kwargs``.

:func:`resolve_model` checks the spec (imports the factory, reads the file) without building
anything; :meth:`ModelSource.build` builds, on the meta device when asked, so a model larger
than RAM costs nothing. User code (a factory's module, its constructor) runs inside
:func:`user_code`: what it prints goes to stderr, and its ``sys.exit`` is reported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torchtool.core.models.names import check_arch
from torchtool.core.models.preprocess import Preprocess
from torchtool.core.models.timm_models import is_timm
from torchtool.core.output import Failure, TorchtoolError, UsageError, first_line, suggest

# A constructor's own small tensors (timm's drop-path rates: [x.item() for x in torch.linspace(0, rate, depth)],
# index tables) are made for real on the CPU during a meta build, so that it can read them.
SMALL_NUMEL = 1 << 16


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """While user code runs, its prints go to stderr (Python's ``sys.stdout`` and the file descriptor C
    extensions write to): stdout is for the tool's tables and JSON."""
    sys.stdout.flush()
    saved = _redirect_fd(1, 2)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run a user's code (``what`` names it) with :func:`stdout_to_stderr`; its ``sys.exit`` is a one-line
    :class:`Failure` with the code and message."""
    try:
        with stdout_to_stderr():
            yield
    except SystemExit as done:
        code = done.code
        said = "" if code is None or isinstance(code, int) else f": {code}"
        number = 1 if said else (code or 0)
        raise Failure(f"{what} called sys.exit({number}){said}".splitlines()[0],
                      hint="a factory must return the model, not exit") from None


def _redirect_fd(fd: int, to: int) -> int | None:
    """Point ``fd`` at ``to``'s file (C extensions print there); the saved copy to restore, or None."""
    try:
        saved = os.dup(fd)
    except OSError:
        return None
    try:
        os.dup2(to, fd)
    except OSError:
        os.close(saved)
        return None
    return saved


def _meta_build(build: Callable[[str], Any]) -> Any:
    """``build("meta")`` under ``torch.device("meta")``, except that a factory call (no device given) whose result
    has at most SMALL_NUMEL elements makes it on the CPU; the model's own tensors then move to meta."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors

    constructors = _device_constructors()

    class MetaBuild(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if func not in constructors or kwargs.get("device") is not None:
                return func(*args, **kwargs)
            out = func(*args, **{**kwargs, "device": "meta"})
            if isinstance(out, torch.Tensor) and out.numel() <= SMALL_NUMEL:
                return func(*args, **{**kwargs, "device": "cpu"})
            return out

    with MetaBuild():
        model = build("meta")
    if isinstance(model, torch.nn.Module):
        _to_meta(model)
    return model


def _to_meta(model: Any) -> None:
    """Move the CPU parameters and buffers of ``model`` to meta in place, a shared tensor once (ties kept)."""
    import torch

    moved: dict[int, tuple[Any, Any]] = {}  # id -> (the original, kept alive so ids stay unique; its meta copy)
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is None or tensor.device.type == "meta":
                    continue
                if id(tensor) not in moved:
                    meta = tensor.to("meta")
                    if isinstance(tensor, torch.nn.Parameter):
                        meta = torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
                    moved[id(tensor)] = (tensor, meta)
                store[key] = moved[id(tensor)][1]


@dataclass
class ModelSource:
    """A resolved MODEL: what it is, its default input size, and how to build it."""

    label: str
    kind: str  # "torchvision" | "timm" | "file" | "factory"
    preprocess: Preprocess  # how images are prepared for it (the weights' own; ImageNet's 224 px for a factory)
    _build: Callable[[str], Any] = field(default=None, repr=False)  # device -> nn.Module

    @property
    def input_size(self) -> tuple[int, ...]:
        """The default input: an image of the preprocessing's crop size."""
        return (3, self.preprocess.crop_size, self.preprocess.crop_size)

    def build(self, device: str = "cpu") -> Any:
        """The model, built directly on ``device`` ("meta": no memory for its weights)."""
        import torch

        with user_code(f"building {self.label}"):
            if device == "meta":
                model = _meta_build(self._build)
            else:
                with torch.device(device):
                    model = self._build(device)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"{self.label} returned a {type(model).__name__}, not a torch.nn.Module",
                             hint="the factory must return the model itself")
        return model


def _load_file(path: Path) -> Any:
    """Run a .py file as a module; its folder joins sys.path, as `python file.py` does, so its own imports work."""
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"torchtool_factory_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _import_module(where: str) -> Any:
    """The module of ``where``: a dotted name on sys.path (and the current folder), or a .py file."""
    if where.endswith(".py") or os.sep in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise UsageError(f"no such file: {path}", hint="give path/to/file.py:factory")
        load = lambda: _load_file(path)  # noqa: E731
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` and uvicorn do: the current folder
            sys.path.insert(0, os.getcwd())
        load = lambda: importlib.import_module(where)  # noqa: E731
    try:
        with user_code(f"importing {where}"):
            return load()
    except TorchtoolError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and where.startswith(exc.name):
            raise UsageError(f"cannot import {where!r}: no module named {exc.name!r}",
                             hint="is it installed, or on PYTHONPATH? a file is given as path/to/file.py:factory"
                             ) from None
        raise Failure(f"importing {where} failed: {first_line(exc)}") from None
    except Exception as exc:  # the module's own code failed
        raise Failure(f"importing {where} failed: {first_line(exc)}", hint="rerun with --debug for the traceback"
                      ) from None


def _factory(spec: str, kwargs: dict[str, Any]) -> ModelSource:
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UsageError(f"{spec!r} is not module:factory", hint="e.g. mypkg.models:build or models.py:build")
    module = _import_module(where)
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise UsageError(f"{where} has no {name!r}", hint=suggest(name, names) or None)
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec} is a {type(obj).__name__}, not a callable", hint="name a function or class")

    def build(device: str) -> Any:
        try:
            return obj(**kwargs)
        except TypeError as exc:
            raise UsageError(f"{spec}(**kwargs) failed: {first_line(exc)}", hint="check --kwargs") from None

    return ModelSource(spec, "factory", Preprocess(), build)


def _weights_file(spec: str, kwargs: dict[str, Any]) -> ModelSource:
    from torchtool.core.models.build import build_model
    from torchtool.core.models.weights import resolve_weights

    if kwargs:
        raise UsageError("--kwargs applies to a model name or a factory, not to a weights file",
                         hint="the file's architecture and classes are used as saved")
    choice = resolve_weights(None, spec)
    if not choice.arch:
        raise UsageError(f"{spec} does not say which architecture it holds (a bare state_dict)",
                         hint="summarise the architecture by name, e.g. resnet18 --kwargs '{\"num_classes\": 10}'")
    arch = choice.arch
    preprocess = build_model(arch, choice, device="meta").preprocess  # a check that it fits, too

    def build(device: str) -> Any:
        return build_model(arch, choice, device=device).model

    return ModelSource(f"{Path(spec).name} ({arch})", "file", preprocess, build)


def _named(name: str, kwargs: dict[str, Any]) -> ModelSource:
    """A torchvision model or a timm one (``timm:NAME``), at random init: its weights do not change a summary."""
    from torchtool.core.models.build import create_model
    from torchtool.core.models.preprocess import preprocess_for

    check_arch(name)  # an unknown name fails with close matches
    preprocess = preprocess_for(name)

    def build(device: str) -> Any:
        try:
            return create_model(name, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{name}(**kwargs) failed: {first_line(exc)}", hint="check --kwargs") from None

    return ModelSource(name, "timm" if is_timm(name) else "torchvision", preprocess, build)


def resolve_model(spec: str, kwargs: dict[str, Any] | None = None) -> ModelSource:
    """Check MODEL and say how to build it (nothing is built yet; a factory's module is imported)."""
    kwargs = dict(kwargs or {})
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt") or path.is_file():
        return _weights_file(spec, kwargs)
    if ":" in spec and not is_timm(spec):
        return _factory(spec, kwargs)
    if os.sep in spec or (path.exists() and not is_timm(spec)):
        raise UsageError(f"{spec} is not a weights file", hint="give a .pth/.pt/.safetensors file, a torchvision "
                         "model name, timm:NAME, or module:factory")
    return _named(spec, kwargs)


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``--kwargs '{"num_classes": 10}'`` -> a dict (one line for malformed JSON)."""
    import json

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--kwargs is not valid JSON: {exc.msg} at character {exc.pos}",
                         hint="""e.g. --kwargs '{"num_classes": 10}'""") from None
    if not isinstance(value, dict):
        raise UsageError(f"--kwargs must be a JSON object, not {type(value).__name__}",
                         hint="""e.g. --kwargs '{"num_classes": 10}'""")
    return value
