"""BiDirMSKD: bidirectional multi-scale knowledge distillation."""

from .lightning_model import BiDirMSKD
from .torch_model import BiDirMSKDModel

__all__ = ["BiDirMSKD", "BiDirMSKDModel"]
