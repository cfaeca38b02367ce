"""Cross-task adaptive distillation: N trained task teachers -> one lightweight multi-task edge student.

Library API: :func:`distill` with a :class:`DistillConfig` (or ``kd-ext distill CONFIG.yaml``); the trained
student is :class:`CrossTaskStudent`, an anomalib model with a task selector, exportable to one OpenVINO IR
for all tasks (:func:`export_all_tasks_openvino`).
"""

from kd_ext.models.cross_task import CalibratedPostProcessor, CrossTaskStudent

from .config import DistillConfig, ExportConfig, StudentConfig, TaskConfig, TrainingConfig
from .distill import DistillResult, distill
from .export import export_all_tasks_openvino
from .losses import AdaptiveTemperature, DynamicWeightAverage, soft_label_loss
from .teachers import TeacherCalibration, load_anomaly_model

__all__ = [
    "AdaptiveTemperature",
    "CalibratedPostProcessor",
    "CrossTaskStudent",
    "DistillConfig",
    "DistillResult",
    "DynamicWeightAverage",
    "ExportConfig",
    "StudentConfig",
    "TaskConfig",
    "TeacherCalibration",
    "TrainingConfig",
    "distill",
    "export_all_tasks_openvino",
    "load_anomaly_model",
    "soft_label_loss",
]
