"""``kd-ext distill``: distil N trained task teachers into one multi-task edge student, evaluate and export it.

The pipeline around the model of :mod:`kd_ext.models.cross_task`: :mod:`.config` (the configuration, parsed as
anomalib's CLI parses its own), :mod:`.tasks` and :mod:`.teachers` (checks, teachers loaded without running code
from a checkpoint), :mod:`.targets` (the teachers' soft targets and features on normal and synthetic images),
:mod:`.data` (the tasks' loaders, one batch of every task per step), :mod:`.training` (Lightning's trainer: DDP,
progress bar, loggers), :mod:`.pipeline` (:func:`distill`: evaluation, checkpoint, report) and :mod:`.export` (one
OpenVINO IR for all tasks).

Example:
    >>> from kd_ext.distill import DistillConfig, distill
    >>> result = distill(DistillConfig.from_yaml("distill.yaml"))  # doctest: +SKIP
    >>> result.report["tasks"]["bottle"]["student"]["image_AUROC"]  # doctest: +SKIP
"""

from .config import DistillConfig, parse_distill_args
from .pipeline import DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "distill", "parse_distill_args"]
