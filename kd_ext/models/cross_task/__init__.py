"""The cross-task student: shared trunk, one anomaly head per task (trained by :mod:`kd_ext.crosstask`)."""

from .lightning_model import CALIBRATED_THRESHOLD, CalibratedPostProcessor, CrossTaskStudent
from .torch_model import CrossTaskStudentModel, TaskHead, check_task_names

__all__ = [
    "CALIBRATED_THRESHOLD",
    "CalibratedPostProcessor",
    "CrossTaskStudent",
    "CrossTaskStudentModel",
    "TaskHead",
    "check_task_names",
]
