"""Distillation loss of BiDirMSKD."""

from kd_ext.models.components.distillation_loss import TwoStudentDistillationLoss


class BiDirMSKDLoss(TwoStudentDistillationLoss):
    """Forward (student mimics teacher) plus reverse (student reconstructs teacher) cosine distillation loss."""
