"""Cross-task adaptive distillation's model: N trained task teachers -> one lightweight multi-task edge student.

As anomalib's model folders: :mod:`.torch_model` (:class:`CrossTaskStudentModel`: a shared trunk, one head per
task, a task selector), :mod:`.loss` (soft labels, features, adaptive temperature, DWA and uncertainty weights) and
:mod:`.lightning_model` (:class:`CrossTaskStudent`, the deployed anomalib model, and :class:`CrossTaskDistillation`,
the LightningModule that trains it over every task's loader). The pipeline around them (``kd-ext distill``'s
configuration, task checks, teacher targets, loaders, export) is :mod:`kd_ext.distill`.
"""

from .lightning_model import CALIBRATED_THRESHOLD, CalibratedPostProcessor, CrossTaskDistillation, CrossTaskStudent
from .torch_model import CrossTaskStudentModel, DistilledHead, FeatureAdapters, check_task_names

__all__ = [
    "CALIBRATED_THRESHOLD",
    "CalibratedPostProcessor",
    "CrossTaskDistillation",
    "CrossTaskStudent",
    "CrossTaskStudentModel",
    "DistilledHead",
    "FeatureAdapters",
    "check_task_names",
]
