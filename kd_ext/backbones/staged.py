"""Split a timm backbone into consecutive stages that end at given feature levels."""

from collections.abc import Iterator, Sequence

import torch
from torch import nn


def _flatten_children(module: nn.Module, targets: Sequence[str], prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        full_name = f"{prefix}{name}"
        if any(target.startswith(f"{full_name}.") for target in targets):
            yield from _flatten_children(child, targets, prefix=f"{full_name}.")
        else:
            yield full_name, child


def split_into_stages(model: nn.Module, layers: Sequence[str]) -> nn.ModuleList:
    """Cut ``model``'s children, in forward order, into stages ending at each of ``layers``.

    Valid for backbones whose forward pass runs their children in definition order (timm ResNets and
    EfficientNets).

    Args:
        model: Backbone.
        layers: Module names of the feature levels, shallow to deep (e.g. ``["layer1", "layer2"]``).

    Returns:
        nn.ModuleList: One ``nn.Sequential`` per level.

    Raises:
        ValueError: If a layer is not a module of ``model`` or the layers are not in forward order.
    """
    if not layers:
        msg = "At least one feature layer is required."
        raise ValueError(msg)
    stages: list[nn.Sequential] = []
    current: list[nn.Module] = []
    remaining = list(layers)
    for name, child in _flatten_children(model, layers):
        current.append(child)
        if name == remaining[0]:
            stages.append(nn.Sequential(*current))
            current = []
            remaining.pop(0)
            if not remaining:
                return nn.ModuleList(stages)
    available = [name for name, _ in model.named_modules() if name.count(".") <= 1 and name]
    msg = (
        f"Feature layer '{remaining[0]}' was not found after {list(layers[: len(layers) - len(remaining)])} "
        f"in {type(model).__name__}. Layers must be module names in forward order, e.g. {available[:12]}."
    )
    raise ValueError(msg)


class StagedFeatureExtractor(nn.Module):
    """Run backbone stages in sequence and return the output of each.

    Args:
        stages: Stages from :func:`split_into_stages`.
        stage_adapters: Optional modules applied to each stage's output before the next stage (e.g.
            attention). ``None`` entries or ``None`` for no adapters.
    """

    def __init__(self, stages: nn.ModuleList, stage_adapters: Sequence[nn.Module | None] | None = None) -> None:
        super().__init__()
        self.stages = stages
        adapters = list(stage_adapters) if stage_adapters is not None else [None] * len(stages)
        if len(adapters) != len(stages):
            msg = f"Got {len(adapters)} stage adapters for {len(stages)} stages."
            raise ValueError(msg)
        self.adapters = nn.ModuleList(adapter if adapter is not None else nn.Identity() for adapter in adapters)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the features of every stage, shallow to deep."""
        features = []
        hidden = images
        for stage, adapter in zip(self.stages, self.adapters, strict=True):
            hidden = adapter(stage(hidden))
            features.append(hidden)
        return features

    @torch.no_grad()
    def channels(self, image_size: tuple[int, int] = (64, 64)) -> list[int]:
        """Channels of each stage's output, found with a dry run."""
        was_training = self.training
        self.eval()
        parameter = next(self.parameters())
        dummy = torch.zeros(1, 3, *image_size, dtype=parameter.dtype, device=parameter.device)
        channels = [feature.shape[1] for feature in self(dummy)]
        self.train(was_training)
        return channels
