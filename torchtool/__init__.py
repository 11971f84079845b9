"""torchtool: everyday PyTorch recipes as dependable, fast, scriptable commands.

The command line lives in :mod:`torchtool.cli`; everything a Python user may want
(models, features, data, checkpoints, metrics) lives in :mod:`torchtool.core`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
