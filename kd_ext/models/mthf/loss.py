"""Distillation loss of MTHF: the sum of every group's multi-scale cosine distillation loss."""

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from kd_ext.models.components.distillation_loss import cosine_distillation_loss


class MTHFLoss(nn.Module):
    """Sum over groups of the per-level ``1 - cos`` distillation loss (each group has its own student)."""

    def forward(
        self,
        pairs: Mapping[str, tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
    ) -> dict[str, torch.Tensor]:
        """Compute the loss of every group.

        Args:
            pairs: ``group name -> (teacher features, student features)``.

        Returns:
            dict[str, torch.Tensor]: ``loss`` (the total) and ``loss_<group>`` per group.
        """
        terms = {
            f"loss_{name}": cosine_distillation_loss(teacher, student) for name, (teacher, student) in pairs.items()
        }
        terms["loss"] = torch.stack(list(terms.values())).sum()
        return terms
