"""Losses of SignalKD: the teacher's self-supervised pretext task and the students' distillation."""

import torch

from kd_ext.models.components.distillation_loss import TwoStudentDistillationLoss


def masked_reconstruction_loss(reconstruction: torch.Tensor, series: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the masked time steps plus half that of all time steps.

    The first term is the pretext task (predict what was hidden); the second keeps the teacher's features
    describing the visible signal too.

    Args:
        reconstruction: The teacher's reconstruction ``[B, C, L]``.
        series: The original series ``[B, C, L]``.
        mask: ``True`` where the input was hidden, ``[B, 1, L]``.

    Returns:
        torch.Tensor: Scalar loss.
    """
    error = (reconstruction - series) ** 2
    weight = mask.to(error.dtype).expand_as(error)
    masked = (error * weight).sum() / weight.sum().clamp_min(1)
    return masked + 0.5 * error.mean()


class SignalKDLoss(TwoStudentDistillationLoss):
    """BiDirMSKD's distillation loss on 1-D features: per level, the mean over time steps of ``1 - cos(t, s)``.

    The forward student regresses the teacher's features from the series; the reverse student reconstructs them
    from the one-class embedding. Returns ``loss``, ``forward_loss`` and ``reverse_loss`` for the enabled students.
    """
