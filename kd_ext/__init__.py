"""kd_ext: knowledge-distillation anomaly detection for anomalib.

Importing ``kd_ext`` is cheap: models, kernels and the edge runtime live in sub-packages that are
imported on demand (``kd_ext.models``, ``kd_ext.kernels``).
"""

__version__ = "0.1.0"
