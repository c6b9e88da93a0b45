"""``cnnft evaluate``: a checkpoint's accuracy, top-5, loss, per-class results, confusion matrix
and most confidently wrong images on the run's val/test split or a folder, written under
``RUN/eval/<data>`` (see :func:`cnnft.run.evaluation.evaluate`, which ``train`` and ``report``
use too).
"""

from __future__ import annotations

from ..results.evaluation import Evaluation
from ..run.evaluation import CONFIDENT_ERRORS, SPLITS, evaluate

__all__ = ["CONFIDENT_ERRORS", "SPLITS", "Evaluation", "evaluate"]
