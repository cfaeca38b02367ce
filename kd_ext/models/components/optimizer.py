"""The students' optimiser: Adam (kd_ext's models) or SGD with momentum (anomalib's Stfpm)."""

from collections.abc import Iterable
from enum import Enum

import torch

from kd_ext.options import check_choice, check_learning_rate


class Optimizer(str, Enum):
    """Optimiser of a model's trainable parameters.

    ``adam``: Adam with ``betas=(0.5, 0.999)``, the learning rate defaulting to 0.005. ``sgd``: anomalib Stfpm's SGD
    (momentum 0.9, weight decay 0.001), the learning rate defaulting to Stfpm's 0.4.
    """

    ADAM = "adam"
    SGD = "sgd"


DEFAULT_LEARNING_RATES = {Optimizer.ADAM: 0.005, Optimizer.SGD: 0.4}
"""The learning rate of each optimiser when a model is given none."""


def resolve_optimizer(optimizer: object, learning_rate: object) -> tuple[str, float]:
    """Check an optimiser choice and its learning rate; ``None`` takes the optimiser's default rate.

    Args:
        optimizer: An :class:`Optimizer` or its value.
        learning_rate: A finite number ``> 0``, or ``None``.

    Returns:
        tuple[str, float]: The optimiser's value (a plain str, as saved hyperparameters need) and the learning rate.

    Raises:
        ValueError: If the optimiser is unknown or the learning rate is not a finite number ``> 0``.
    """
    choice = check_choice(optimizer, Optimizer, "optimizer")
    rate = DEFAULT_LEARNING_RATES[choice] if learning_rate is None else check_learning_rate(learning_rate)
    return choice.value, rate


def build_optimizer(
    optimizer: Optimizer | str, parameters: Iterable[torch.nn.Parameter], learning_rate: float
) -> torch.optim.Optimizer:
    """The torch optimiser of ``parameters``.

    Args:
        optimizer: Which one (see :class:`Optimizer`).
        parameters: Trainable parameters.
        learning_rate: Its learning rate.

    Returns:
        torch.optim.Optimizer: The optimiser.
    """
    if Optimizer(optimizer) is Optimizer.SGD:
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, dampening=0, weight_decay=0.001)
    return torch.optim.Adam(parameters, lr=learning_rate, betas=(0.5, 0.999))
