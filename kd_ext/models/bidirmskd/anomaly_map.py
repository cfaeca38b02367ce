"""Multi-scale, bidirectional anomaly-map fusion of BiDirMSKD (the generator shared in models.components)."""

from kd_ext.models.components.multiscale_map import MAP_FUSIONS, AnomalyMapGenerator, gaussian_blur

__all__ = ["MAP_FUSIONS", "AnomalyMapGenerator", "gaussian_blur"]
