"""MTHF: multi-group teacher-student network with hierarchical feature fusion."""

from .lightning_model import MTHF
from .torch_model import MTHFModel

__all__ = ["MTHF", "MTHFModel"]
