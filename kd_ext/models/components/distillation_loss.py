"""Cosine feature-distillation losses shared by kd_ext models (forward and reverse students)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def cosine_distillation_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over levels of the mean per-position ``1 - cos(t, s)`` over channels.

    Args:
        teacher: Teacher features, one tensor per level.
        student: Student features, matching shapes.

    Returns:
        torch.Tensor: Scalar loss.
    """
    losses = [(1 - F.cosine_similarity(t, s, dim=1)).mean() for t, s in zip(teacher, student, strict=True)]
    return torch.stack(losses).sum()


class TwoStudentDistillationLoss(nn.Module):
    """Forward (student mimics teacher) plus reverse (student reconstructs teacher) distillation loss."""

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        forward_student: Sequence[torch.Tensor] | None,
        reverse_student: Sequence[torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        """Compute the loss terms of the enabled students.

        Returns:
            dict[str, torch.Tensor]: ``loss`` (the total) and ``forward_loss`` / ``reverse_loss``.
        """
        terms: dict[str, torch.Tensor] = {}
        if forward_student is not None:
            terms["forward_loss"] = cosine_distillation_loss(teacher, forward_student)
        if reverse_student is not None:
            terms["reverse_loss"] = cosine_distillation_loss(teacher, reverse_student)
        terms["loss"] = torch.stack(list(terms.values())).sum()
        return terms
