"""Former home of the cross-task pipeline, now :mod:`kd_ext.models.cross_task` (kept so old imports still work).

``kd_ext.crosstask.<module>`` resolves to ``kd_ext.models.cross_task.<module>`` for the pipeline's modules.
"""

import sys

from kd_ext.models.cross_task import config, distill, export, loss, tasks, teachers, training
from kd_ext.models.cross_task.config import DistillConfig, TaskConfig
from kd_ext.models.cross_task.teachers import load_anomaly_model

for _name, _module in {
    "config": config,
    "distill": distill,
    "export": export,
    "losses": loss,
    "tasks": tasks,
    "teachers": teachers,
    "training": training,
}.items():
    sys.modules[f"{__name__}.{_name}"] = _module

__all__ = ["DistillConfig", "TaskConfig", "load_anomaly_model"]
