"""A normal-feature prior: a per-location Gaussian of the frozen teacher's deep features on normal images.

Distillation maps find what a student cannot imitate; they are weakest where an anomaly is *made of normal-looking
parts* (a missing, misplaced or bent component, an unusual layout), because every local patch still looks like
something the student has learned. A statistics prior sees exactly that: at every location of the teacher's deepest
levels it stores the mean and covariance of the normal training images' features (as PaDiM does) and scores a test
feature by its Mahalanobis distance. The prior is fitted, not trained: one pass over the normal training images,
after which its buffers are constants (saved in checkpoints, folded into exported graphs).

:class:`MapStandardiser` puts maps that live on different scales (a distillation discrepancy and a Mahalanobis
distance) on a common one, with statistics of the maps on normal training images, so that they can be fused with
equal weights: no weight is chosen on test images.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import Enum
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from kd_ext.edge.contract import PRIOR_OUTPUT, TailPrior
from kd_ext.edge.tail import fuse_standardised

PRIOR_POOL = 3
"""Side of the neighbourhood averaged into each location's feature (locally aware patches, as PatchCore)."""
COVARIANCE_EPSILON = 0.01
"""Ridge added to every covariance (PaDiM's regulariser)."""
HELD_OUT_FOLDS = 4
"""Parts of the training images for the held-out standardisation of the prior's map (see :class:`PriorFusion`)."""
HELD_OUT_BLOCK = 8
"""Consecutive training images that go to the same part: neighbouring video frames are held out together."""


class NormalFeaturePrior(nn.Module):
    """Per-location Gaussian of teacher features on normal images; Mahalanobis distance maps.

    The selected levels are each averaged over a ``PRIOR_POOL``-sized neighbourhood, resized to the grid of the
    deepest selected level and concatenated into one embedding per location. Fitting accumulates, per location,
    the count, sum and sum of outer products of the embeddings (float64), then stores the mean and the inverse of
    a shrunk covariance: ``(1 - a) * S + a * (trace(S) / D) * I + eps * I`` with ``a = D / (D + N)`` for ``N``
    images and ``D`` channels, so that small training sets (fewer images than channels) give a well-conditioned
    estimate without any tuning.

    Args:
        levels: Indices of the teacher levels used (deep levels; negative indices count from the deepest).

    Example:
        >>> prior = NormalFeaturePrior(levels=(-2, -1))
        >>> features = [torch.rand(4, 8, 16, 16), torch.rand(4, 16, 8, 8)]
        >>> prior.accumulate(features); prior.finalize()
        >>> prior(features, (64, 64)).shape
        torch.Size([4, 1, 64, 64])
    """

    def __init__(self, levels: Sequence[int] = (-2, -1)) -> None:
        super().__init__()
        if not levels:
            msg = "The normal-feature prior needs at least one teacher level."
            raise ValueError(msg)
        self.levels = tuple(levels)
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("precision", torch.zeros(0))
        self._count = 0
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        """Whether :meth:`finalize` has stored a mean and precision."""
        return self.mean.numel() > 0

    def embed(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Locally averaged features of the selected levels on the deepest level's grid, ``[B, D, h, w]``."""
        selected = [features[index] for index in self.levels]
        grid = tuple(selected[-1].shape[-2:])
        pooled = [
            F.avg_pool2d(feature, PRIOR_POOL, stride=1, padding=PRIOR_POOL // 2, count_include_pad=False)
            for feature in selected
        ]
        resized = [
            feature if tuple(feature.shape[-2:]) == grid else F.adaptive_avg_pool2d(feature, grid) for feature in pooled
        ]
        return torch.cat(resized, dim=1)

    def reset(self) -> None:
        """Forget the fitted statistics and any accumulated sums."""
        self._count, self._sum, self._outer = 0, None, None
        self.mean = torch.zeros(0, device=self.mean.device)
        self.precision = torch.zeros(0, device=self.precision.device)

    @torch.no_grad()
    def accumulate(self, features: Sequence[torch.Tensor]) -> None:
        """Add the teacher features of a batch of normal images to the running sums.

        Args:
            features: Teacher features, one tensor per level (all levels of the model, shallow to deep).
        """
        embedding = self.embed(features).double()
        batch, channels = embedding.shape[:2]
        flat = embedding.flatten(2).permute(2, 0, 1)  # [L, B, D]
        if self._sum is None:
            self._sum = flat.new_zeros(flat.shape[0], channels)
            self._outer = flat.new_zeros(flat.shape[0], channels, channels)
        elif self._sum.shape != (flat.shape[0], channels):
            msg = (
                f"Images of one fit must share one size: the prior's grid is {tuple(self._sum.shape)} "
                f"(locations, channels), this batch gives {(flat.shape[0], channels)}."
            )
            raise ValueError(msg)
        self._count += batch
        self._sum += flat.sum(dim=1)
        self._outer += flat.transpose(1, 2) @ flat

    def without(self, part: "NormalFeaturePrior") -> "NormalFeaturePrior":
        """A prior fitted on the images accumulated here but not in ``part`` (a subset accumulated alongside).

        Args:
            part: A prior that accumulated some of this prior's images (not finalised).

        Returns:
            NormalFeaturePrior: Finalised on the remaining images.

        Raises:
            RuntimeError: If either prior has no accumulated sums, or no image remains.
        """
        if self._sum is None or self._outer is None or part._sum is None or part._outer is None:
            msg = "Both priors need accumulated, not finalised, sums to leave a part out."
            raise RuntimeError(msg)
        if self._count <= part._count:
            msg = f"Leaving {part._count} of {self._count} images out leaves none to fit on."
            raise RuntimeError(msg)
        rest = NormalFeaturePrior(self.levels).to(self.mean.device)
        rest._count = self._count - part._count
        rest._sum = self._sum - part._sum
        rest._outer = self._outer - part._outer
        rest.finalize()
        return rest

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the accumulated sums into the mean and the shrunk inverse covariance.

        Raises:
            RuntimeError: If nothing was accumulated.
        """
        if self._sum is None or self._outer is None or self._count < 1:
            msg = "The normal-feature prior saw no normal images; accumulate training features before finalize()."
            raise RuntimeError(msg)
        count = self._count
        mean = self._sum / count
        covariance = self._outer / count - mean.unsqueeze(2) * mean.unsqueeze(1)
        channels = mean.shape[1]
        shrink = channels / (channels + count)
        identity = torch.eye(channels, dtype=covariance.dtype, device=covariance.device)
        scale = covariance.diagonal(dim1=1, dim2=2).mean(dim=1).view(-1, 1, 1)
        shrunk = (1 - shrink) * covariance + shrink * scale * identity + COVARIANCE_EPSILON * identity
        device = self.mean.device
        self.mean = mean.float().to(device)
        self.precision = torch.linalg.inv(shrunk).float().to(device)
        self._count, self._sum, self._outer = 0, None, None

    def distance_grid(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mahalanobis distance of every location to the normal Gaussian, on the prior's own grid.

        This is the prior's whole rule before upsampling: :meth:`forward` upsamples it, and the features IR
        (:mod:`kd_ext.export.features`) outputs it for the edge runtime to upsample.

        Args:
            features: Teacher features, one tensor per level.

        Returns:
            torch.Tensor: Distances ``[B, 1, h, w]`` on the deepest selected level's grid.

        Raises:
            RuntimeError: If the prior is not fitted, or the features' grid differs from the fitted one.
        """
        if not self.fitted:
            msg = "The normal-feature prior is not fitted: train the model (or call calibrate) first."
            raise RuntimeError(msg)
        embedding = self.embed(features)
        batch, channels, height, width = embedding.shape
        if (height * width, channels) != tuple(self.mean.shape):
            msg = (
                f"The prior was fitted on a {tuple(self.mean.shape)} (locations, channels) grid but got "
                f"{(height * width, channels)}: score images at the size the model was trained at."
            )
            raise RuntimeError(msg)
        centred = embedding.flatten(2).permute(2, 0, 1) - self.mean.unsqueeze(1)  # [L, B, D]
        distance = ((centred @ self.precision) * centred).sum(dim=2).clamp_min(0).sqrt()  # [L, B]
        return distance.permute(1, 0).reshape(batch, 1, height, width)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Mahalanobis distance of every location to the normal Gaussian (:meth:`distance_grid`), upsampled to ``size``.

        Args:
            features: Teacher features, one tensor per level.
            size: Output size ``(H, W)``.

        Returns:
            torch.Tensor: Distance maps ``[B, 1, H, W]`` (bilinear, ``align_corners=False``).

        Raises:
            RuntimeError: If the prior is not fitted, or the features' grid differs from the fitted one.
        """
        return F.interpolate(self.distance_grid(features), size=size, mode="bilinear", align_corners=False)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args, **kwargs) -> None:
        """Take the fitted buffers' shapes from the checkpoint (they are empty until fitted)."""
        for name in ("mean", "precision"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PriorRule(str, Enum):
    """How standardised maps are combined: their mean, or their pixel-wise maximum."""

    MEAN = "mean"
    MAX = "max"


class PriorScope(str, Enum):
    """What the fused map decides: the anomaly map and the image score, or the image score only.

    With ``"score"`` the image score comes from the fused map while the anomaly map stays the distillation map:
    the prior's coarse grid then never blurs the localisation of small defects.
    """

    MAP = "map"
    SCORE = "score"


class MapStandardiser(nn.Module):
    """Standardise several anomaly maps with their normal-image statistics and combine them.

    Args:
        num_maps: Number of maps fused.
        rule: ``"mean"`` averages the standardised maps; ``"max"`` keeps, at every pixel, the most anomalous one (a
            detection by either map keeps its full strength).
    """

    def __init__(self, num_maps: int, rule: PriorRule | str = PriorRule.MEAN) -> None:
        super().__init__()
        self.rule = PriorRule(rule)
        self.register_buffer("map_mean", torch.zeros(num_maps))
        self.register_buffer("map_std", torch.ones(num_maps))
        self._moments: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget accumulated moments (the stored statistics stay)."""
        self._moments = None

    @torch.no_grad()
    def accumulate(self, maps: Sequence[torch.Tensor]) -> None:
        """Add the maps of a batch of normal images to the running moments (count, sum, sum of squares)."""
        moments = torch.stack(
            [
                torch.stack([torch.tensor(float(m.numel())), m.double().sum().cpu(), m.double().square().sum().cpu()])
                for m in maps
            ]
        )
        self._moments = moments if self._moments is None else self._moments + moments

    @torch.no_grad()
    def finalize(self) -> None:
        """Store the means and standard deviations of the accumulated maps.

        Raises:
            RuntimeError: If nothing was accumulated.
        """
        if self._moments is None:
            msg = "No normal maps were accumulated; run accumulate() on training images first."
            raise RuntimeError(msg)
        count, total, squares = self._moments.unbind(dim=1)
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
        self.map_mean.copy_(mean.float())
        self.map_std.copy_(std.float())
        self._moments = None

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean or maximum (see ``rule``) of the standardised maps ``[B, 1, H, W]``.

        The rule is :func:`kd_ext.edge.tail.fuse_standardised`, which the edge tail runs in numpy.
        """
        return fuse_standardised(list(maps), self.map_mean.unbind(), self.map_std.unbind(), self.rule.value)


class PriorFusion(nn.Module):
    """A model's distillation map fused with a normal-feature prior, both standardised on normal training images.

    The fused map is ``(z(distillation) + z(prior)) / 2`` where ``z`` standardises with the map's mean and standard
    deviation over the normal training images (:meth:`calibrate`). Until calibrated, :attr:`ready` is ``False`` and
    models fall back to the distillation map alone; a calibration that fails leaves it uncalibrated.

    The prior's map statistics are *held out*: the training images are dealt, in blocks of ``HELD_OUT_BLOCK``
    consecutive images, into ``HELD_OUT_FOLDS`` parts, and each image's prior map for the statistics comes from a
    prior fitted without its part. A Gaussian scores the images it was fitted on as closer than any new normal
    image, so in-sample statistics would give every new image a large standardised prior distance and let the
    prior outweigh the distillation map; held-out statistics measure the spread a new normal image has. The prior
    that scores is fitted on all training images. With ``HELD_OUT_BLOCK`` or fewer training images nothing can be
    held out and the statistics are in-sample.

    Args:
        levels: Teacher levels of the prior (see :class:`NormalFeaturePrior`).
        rule: How the standardised maps are combined (see :class:`PriorRule`).
        scope: Whether the fused map is also the anomaly map or decides the image score only (see
            :class:`PriorScope`); models read it.
        held_out: Standardise the prior's map with held-out statistics (see above); ``False`` takes them from the
            images the prior was fitted on.
    """

    def __init__(
        self,
        levels: Sequence[int] = (-2, -1),
        rule: PriorRule | str = PriorRule.MEAN,
        scope: PriorScope | str = PriorScope.MAP,
        held_out: bool = True,
    ) -> None:
        super().__init__()
        self.prior = NormalFeaturePrior(levels)
        self.standardiser = MapStandardiser(num_maps=2, rule=rule)
        self.scope = PriorScope(scope)
        self.held_out = held_out

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args, **kwargs) -> None:
        """Also read early checkpoints that still carry the former ``calibrated`` flag.

        Readiness is now decided by the prior's buffer shapes: the flag is dropped, and where it says the prior was
        not calibrated the prior's buffers are emptied too, so the restored model calibrates before it scores.
        """
        flag = state_dict.pop(prefix + "calibrated", None)
        if flag is not None and not bool(flag):
            for name in ("mean", "precision"):
                key = f"{prefix}prior.{name}"
                if key in state_dict:
                    state_dict[key] = state_dict[key].new_zeros(0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def ready(self) -> bool:
        """Whether the prior and the map statistics are fitted (decided by buffer shapes: static when exporting)."""
        return self.prior.fitted

    def tail_prior(self, statistics: bool = True) -> TailPrior:
        """This fusion as its part of a model's :class:`~kd_ext.edge.contract.MapTail`.

        Args:
            statistics: Read the map statistics into the description; ``False`` leaves
                :class:`~kd_ext.edge.contract.TailPrior`'s defaults (for a forward that reads its buffers).

        Returns:
            TailPrior: The rule, the scope and (with ``statistics``) the map means and standard deviations.
        """
        if not statistics:
            return TailPrior(output=PRIOR_OUTPUT, rule=self.standardiser.rule.value, scope=self.scope.value)
        mean = [float(value) for value in self.standardiser.map_mean]
        std = [float(value) for value in self.standardiser.map_std]
        return TailPrior(
            output=PRIOR_OUTPUT,
            rule=self.standardiser.rule.value,
            scope=self.scope.value,
            map_mean=(mean[0], mean[1]),
            map_std=(std[0], std[1]),
        )

    def forward(
        self, distillation_map: torch.Tensor, teacher_features: Sequence[torch.Tensor], size: tuple[int, int]
    ) -> torch.Tensor:
        """The fused map ``[B, 1, H, W]`` from the distillation map and the teacher features of the same images."""
        return self.standardiser([distillation_map, self.prior(teacher_features, size)])

    @torch.no_grad()
    def calibrate(
        self,
        batches: Callable[[], Iterable[torch.Tensor]],
        teacher: Callable[[torch.Tensor], Sequence[torch.Tensor]],
        outputs: Callable[[torch.Tensor], tuple[Sequence[torch.Tensor], torch.Tensor]],
    ) -> None:
        """Fit the prior and the held-out priors, then the statistics of both maps (see the class).

        Args:
            batches: Returns a fresh iterable of normalised normal training images each call, the same images in
                the same order every call (iterated twice).
            teacher: Teacher features of images.
            outputs: Teacher features and the distillation map (at the images' size) of images.

        Raises:
            RuntimeError: If the second pass reads other images than the first (their count or order).
        """
        try:
            self.prior.reset()
            parts = [NormalFeaturePrior(self.prior.levels).to(self.prior.mean.device) for _ in range(HELD_OUT_FOLDS)]
            for start, images in _numbered(batches()):
                features = teacher(images)
                self.prior.accumulate(features)
                for part, rows in _parts(start, images.shape[0]):
                    parts[part].accumulate([feature[rows] for feature in features])
            if self.held_out and sum(part._count > 0 for part in parts) > 1:
                held_out = [self.prior.without(part) if part._count > 0 else None for part in parts]
                self.prior.finalize()
            else:  # too few images to hold any out: the statistics are in-sample
                self.prior.finalize()
                held_out = [self.prior] * HELD_OUT_FOLDS
            for start, images in _numbered(batches()):
                features, distillation_map = outputs(images)
                size = tuple(images.shape[-2:])
                prior_map = torch.empty_like(distillation_map)
                for part, rows in _parts(start, images.shape[0]):
                    fitted = held_out[part]
                    if fitted is None:
                        msg = "The training images changed between the calibration's passes (their count or order)."
                        raise RuntimeError(msg)
                    prior_map[rows] = fitted([feature[rows] for feature in features], size)
                self.standardiser.accumulate([distillation_map, prior_map])
            self.standardiser.finalize()
        except BaseException:
            self.prior.reset()  # never half-calibrated: a prior without its map statistics is not used
            self.standardiser.reset()
            raise


def _numbered(batches: Iterable[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """Each batch with the index of its first image among all images."""
    start = 0
    for images in batches:
        yield start, images
        start += images.shape[0]


def _parts(start: int, count: int) -> Iterator[tuple[int, torch.Tensor]]:
    """For a batch whose first image has index ``start``: each held-out part it touches and the rows in it."""
    indices = torch.arange(start, start + count)
    owners = (indices // HELD_OUT_BLOCK) % HELD_OUT_FOLDS
    for part in owners.unique().tolist():
        yield part, (owners == part).nonzero().flatten()
