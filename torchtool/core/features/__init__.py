"""CNN features: layer names, one-pass multi-layer extraction, pooling, the resumable on-disk store.

- :mod:`~torchtool.core.features.pooling`: none/avg/max/bilinear pooling, L2 normalisation.
- :mod:`~torchtool.core.features.capture`: raw outputs of many nodes from one forward (FX or hooks).
- :mod:`~torchtool.core.features.layers`: :class:`LayerCatalog` (aliases, nodes, modules, shapes).
- :mod:`~torchtool.core.features.extractor`: :class:`FeatureExtractor`, the nn.Module to use from Python.
- :mod:`~torchtool.core.features.store`: memory-mapped ``<layer>.npy``, index.csv, meta.json, resume state.
- :mod:`~torchtool.core.features.run`: ``torchtool extract-features`` as :func:`run_extraction`.
"""

from torchtool.core.features.extractor import FeatureExtractor
from torchtool.core.features.layers import Layer, LayerCatalog
from torchtool.core.features.pooling import POOLS, bilinear_pool, l2_normalize, pool_features

__all__ = ["POOLS", "FeatureExtractor", "Layer", "LayerCatalog", "bilinear_pool", "l2_normalize", "pool_features"]
