"""evaluate: predictions -> the classification report, from a model over images or from a prediction file.

- :mod:`~torchtool.core.evaluate.report`: scikit-learn's metrics, ECE, ranking, the most-confused classes, the CSV.
- :mod:`~torchtool.core.evaluate.stats`: calibration bins, bootstrap intervals, two models compared (McNemar).
- :mod:`~torchtool.core.evaluate.predictions`: :class:`Predictions` and prediction files in and out.
- :mod:`~torchtool.core.evaluate.plots`, :mod:`~torchtool.core.evaluate.gallery`,
  :mod:`~torchtool.core.evaluate.html`: the pictures and the page.
- :mod:`~torchtool.core.evaluate.run`: :func:`evaluate`, the command's one call
  (:mod:`~torchtool.core.evaluate.inference`: the model side; :mod:`~torchtool.core.evaluate.outputs`: the files).
- :mod:`~torchtool.core.evaluate.many`: :func:`evaluate_many`, several checkpoints -> one row each
  (:mod:`~torchtool.core.evaluate.results`: ``--results-file``).
"""

from torchtool.core.evaluate.config import EvalConfig
from torchtool.core.evaluate.many import evaluate_many
from torchtool.core.evaluate.predictions import Predictions
from torchtool.core.evaluate.report import build_report, expected_calibration_error
from torchtool.core.evaluate.run import evaluate

__all__ = ["EvalConfig", "Predictions", "build_report", "evaluate", "evaluate_many", "expected_calibration_error"]
