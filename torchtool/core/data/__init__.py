"""Images in: finding and decoding files, transforms, datasets and loaders, class folders and splits.

- :mod:`~torchtool.core.data.images`: find image files, decode them robustly (no torch).
- :mod:`~torchtool.core.data.transforms`: the weights' evaluation preset (uint8 crops, batch Normalize).
- :mod:`~torchtool.core.data.loading`: ImageDataset (never raises on a bad file), loaders, seeded samplers.
- :mod:`~torchtool.core.data.folders`: ``root/<class>/...`` trees and train/validation splits.

Only :mod:`images` is imported here; the others import torch and are imported by name.
"""

from torchtool.core.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, describe_error, find_images, load_image

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "describe_error", "find_images", "load_image"]
