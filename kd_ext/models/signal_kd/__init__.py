"""SignalKD: teacher-student anomaly detection for 1-D signals (self-supervised conv + GRU teacher)."""

from .lightning_model import SignalKD
from .torch_model import SignalKDModel

__all__ = ["SignalKD", "SignalKDModel"]
