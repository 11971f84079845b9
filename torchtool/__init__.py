"""torchtool: everyday PyTorch recipes as dependable, fast, scriptable commands.

The command line lives in :mod:`torchtool.cli`; everything a Python user may want
(models, features, data, checkpoints, metrics) lives in :mod:`torchtool.core`.
"""

import os as _os

__version__ = "0.1.0"
__all__ = ["__version__"]

# The environment as the user set it, before any library we import edits it (OpenCV's cv2
# prepends its own folder to LD_LIBRARY_PATH): env-info reports these values.
STARTUP_ENVIRON = dict(_os.environ)
