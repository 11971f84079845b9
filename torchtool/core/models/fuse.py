"""BatchNorm folded into the convolution before it, for inference (extract-features, evaluate, profile)."""

from __future__ import annotations

from typing import Any


def fold_batchnorm(model: Any, traced: bool = False) -> Any:
    """``model`` with each eval-mode BatchNorm folded into the convolution before it (torch.fx's ``fuse``).

    The same outputs up to float rounding and ~15% faster on CPU; inference only. Unless
    ``traced`` (an FX GraphModule, changed in place), ``model`` itself is left alone and a
    folded copy is returned; a model that does not trace is returned as it is.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval(), inplace=traced, no_trace=traced)
    except Exception:  # not FX-traceable (data-dependent control flow): run it unfolded
        return model
