"""Cross-task adaptive distillation: N trained task teachers -> one lightweight multi-task edge student.

The model (:class:`CrossTaskStudent`: a shared trunk, one head per task, a task selector) is importable from here
and from :mod:`kd_ext.models`. The pipeline that trains it lives in submodules, imported on use:
:mod:`.config` (``kd-ext distill``'s configuration), :mod:`.tasks` and :mod:`.teachers` (checks and teacher
targets), :mod:`.loss`, :mod:`.training`, :mod:`.distill` (:func:`~.distill.distill`) and :mod:`.export`
(one OpenVINO IR for all tasks).
"""

from .lightning_model import CALIBRATED_THRESHOLD, CalibratedPostProcessor, CrossTaskStudent
from .torch_model import CrossTaskStudentModel, DistilledHead, TaskHead, TrunkKind, check_task_names

__all__ = [
    "CALIBRATED_THRESHOLD",
    "CalibratedPostProcessor",
    "CrossTaskStudent",
    "CrossTaskStudentModel",
    "DistilledHead",
    "TaskHead",
    "TrunkKind",
    "check_task_names",
]
