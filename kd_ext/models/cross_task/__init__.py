"""The cross-task student: shared trunk, one anomaly head per task (trained by :mod:`kd_ext.crosstask`)."""

from .lightning_model import CalibratedPostProcessor, CrossTaskStudent
from .torch_model import CrossTaskStudentModel, TaskHead, check_task_names

__all__ = ["CalibratedPostProcessor", "CrossTaskStudent", "CrossTaskStudentModel", "TaskHead", "check_task_names"]
