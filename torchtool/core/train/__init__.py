"""Fine-tuning: ``fit(TrainConfig(data, out, model="resnet18"))`` is ``torchtool finetune`` from Python.

- :mod:`~torchtool.core.train.config`: :class:`TrainConfig` and its choices (a leaf).
- :mod:`~torchtool.core.train.recipes`: parameter groups, frozen backbone, optimizer, epoch schedule.
- :mod:`~torchtool.core.train.augment`: presets, region confusion, MixUp/CutMix.
- :mod:`~torchtool.core.train.epoch`: one training epoch; validation through the shared inference loop.
- :mod:`~torchtool.core.train.state`: checkpoints and resuming.
- :mod:`~torchtool.core.train.setup`: checks, model, optimizer and loaders before the first epoch.
- :mod:`~torchtool.core.train.log`, :mod:`~torchtool.core.train.plots`: metrics.csv, TensorBoard, curves.png.
- :mod:`~torchtool.core.train.loop`: :func:`fit`, the loop itself (the root: nothing imports it).
"""

from torchtool.core.train.config import TrainConfig
from torchtool.core.train.loop import fit

__all__ = ["TrainConfig", "fit"]
