"""Models by name: torchvision builders, ``--weights``, classification heads, preprocessing, weight files.

- :mod:`~torchtool.core.models.names`: the model list, name checks, builder arguments.
- :mod:`~torchtool.core.models.preprocess`: the weights' evaluation preprocessing as data.
- :mod:`~torchtool.core.models.weights`: what ``--weights`` resolves to; the download cache.
- :mod:`~torchtool.core.models.checkpoint`: torchtool checkpoints, state_dict/.safetensors files (safe loads).
- :mod:`~torchtool.core.models.heads`: find and replace the classification head.
- :mod:`~torchtool.core.models.build`: :func:`build_model`, all of the above in one call.
- :mod:`~torchtool.core.models.fuse`: BatchNorm folded into convolutions for inference.

Importing this package imports no torch; each function imports it when called.
"""

from torchtool.core.models.build import BuiltModel, build_model
from torchtool.core.models.heads import find_head, num_outputs, replace_head
from torchtool.core.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from torchtool.core.models.weights import WeightsChoice, resolve_weights

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BuiltModel", "Preprocess", "WeightsChoice", "build_model", "find_head",
           "num_outputs", "replace_head", "resolve_weights"]
