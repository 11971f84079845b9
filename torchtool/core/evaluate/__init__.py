"""evaluate: predictions -> the classification report, from a model over images or from a prediction file.

- :mod:`~torchtool.core.evaluate.report`: scikit-learn's metrics, ECE, the most-confused classes, the CSV.
- :mod:`~torchtool.core.evaluate.predictions`: prediction files in and out.
- :mod:`~torchtool.core.evaluate.plots`: the confusion-matrix picture.
- :mod:`~torchtool.core.evaluate.run`: :func:`evaluate`, the command's one call.
"""

from torchtool.core.evaluate.report import Predictions, build_report, expected_calibration_error
from torchtool.core.evaluate.run import EvalConfig, evaluate

__all__ = ["EvalConfig", "Predictions", "build_report", "evaluate", "expected_calibration_error"]
