"""kd_ext's anomalib models.

Importing this package registers the models with anomalib (``--model BiDirMSKD``, ``get_model``).
"""

from .bidirmskd import BiDirMSKD
from .cross_task import CrossTaskStudent
from .mthf import MTHF
from .signal_kd import SignalKD

__all__ = ["MTHF", "BiDirMSKD", "CrossTaskStudent", "SignalKD"]
