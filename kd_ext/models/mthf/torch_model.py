"""PyTorch model of MTHF: multi-group teacher-student network with hierarchical feature fusion.

Seed paper 002 builds three *distinct* teacher-student detection groups, puts a feature-fusion
(attention) module after each student's distillation layers and fuses the anomaly maps in two
stages. By default all groups share one frozen teacher (the offline ImageNet EfficientNet-Lite0, so
everything works without internet), computed once per batch for every level any group needs;
``group_backbones`` gives each group a teacher of its own (e.g. the offline EfficientNet-Lite0, Lite1
and Lite2: three distinct teacher-student pairs, as in the paper). The groups differ in teacher,
distillation direction and feature levels:

* **A - forward, shallow**: a randomly initialised copy of the teacher's first stages (CBAM after each
  stage) regresses the teacher's ``blocks.1/2/4`` features (strides 4/8/16) from the image, as in
  STFPM. Fine texture and small defects, sharp boundaries.
* **B - reverse, shallow**: a one-class bottleneck (OCBE) compresses the teacher's ``blocks.1/2/4``
  features and a decoder reconstructs them, as in reverse distillation (RD4AD). The compact
  embedding cannot carry anomalous detail, so large or structural anomalies, which a forward student
  may imitate, are still reconstructed as normal and stand out.
* **C - forward, deep**: a second forward student regresses the deeper ``blocks.2/4/6`` features
  (strides 8/16/32). Semantic, large-area anomalies (missing parts, misplacement) with a larger
  receptive field.

After each student a :class:`HierarchicalAttentionFusion` module fuses that student's levels
(cross-level context through CBAM). The per-level maps are fused within each group, then across
groups after per-group standardisation (:class:`MTHFAnomalyMap`). With ``prior=True`` the fused map is
further fused with a normal-feature prior of the main teacher's features (:class:`PriorFusion`).
"""

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from torch import nn

from kd_ext.backbones import create_backbone, get_backbone_spec
from kd_ext.backbones.registry import resolve_layers
from kd_ext.edge.contract import MapTail
from kd_ext.kernels import SCORE_MODES, reference
from kd_ext.models.components import (
    FrozenTeacherModel,
    OneClassBottleneck,
    PriorFusion,
    PriorScope,
    ReverseDecoder,
    TeacherFinetune,
    build_forward_student,
    build_teacher,
    check_score_options,
    probe_levels,
    require_halving_strides,
)

from .anomaly_map import MTHFAnomalyMap, downsampled_size
from .fusion import HierarchicalAttentionFusion

GROUPS = ("A", "B", "C")
GROUP_DESCRIPTIONS = {
    "A": "forward student on the shallow levels",
    "B": "reverse-distillation student (OCBE + decoder) on the shallow levels",
    "C": "forward student on the deep levels",
}
DEEP_LAYERS = {
    "efficientnet_lite0": ("blocks.2", "blocks.4", "blocks.6"),
    "efficientnet_lite1": ("blocks.2", "blocks.4", "blocks.6"),
    "efficientnet_lite2": ("blocks.2", "blocks.4", "blocks.6"),
    "resnet18": ("layer2", "layer3", "layer4"),
    "resnet34": ("layer2", "layer3", "layer4"),
    "wide_resnet50_2": ("layer2", "layer3", "layer4"),
}
GroupPairs = dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]
FeaturePair = tuple[torch.Tensor, torch.Tensor]
"""A teacher level and the matching student level."""


class ReverseStudent(nn.Module):
    """Reverse-distillation student: one-class bottleneck, then a decoder back to the teacher's levels.

    Args:
        channels: Teacher channels of each level, shallow to deep.
        strides: Stride of each level.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        embedding_channels = 2 * channels[-1]
        self.bottleneck = OneClassBottleneck(channels, strides, embedding_channels)
        self.decoder = ReverseDecoder(embedding_channels, channels)

    def forward(self, teacher: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Reconstruct the teacher features from their one-class embedding."""
        return self.decoder(self.bottleneck(teacher), [(feature.shape[-2], feature.shape[-1]) for feature in teacher])


def validate_groups(groups: Sequence[str]) -> tuple[str, ...]:
    """Check the requested groups and return them in canonical order.

    Args:
        groups: Group names, a non-empty subset of :data:`GROUPS`.

    Returns:
        tuple[str, ...]: The groups, ordered as in :data:`GROUPS`.

    Raises:
        ValueError: If ``groups`` is empty, a string, has unknown names or duplicates.
    """
    if isinstance(groups, str):
        msg = f"groups must be a sequence of group names such as ('A', 'B', 'C'), not the string {groups!r}."
        raise ValueError(msg)
    names = tuple(groups)
    if not names:
        msg = f"At least one group is required; choose from {GROUPS}."
        raise ValueError(msg)
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        described = "; ".join(f"{name}: {text}" for name, text in GROUP_DESCRIPTIONS.items())
        msg = f"Unknown group(s) {unknown}; choose from {GROUPS} ({described})."
        raise ValueError(msg)
    if len(set(names)) != len(names):
        msg = f"Duplicate groups in {names}; each group can be used once."
        raise ValueError(msg)
    return tuple(name for name in GROUPS if name in names)


class MTHFModel(FrozenTeacherModel):
    """Frozen teachers (shared or one per group), up to three teacher-student groups, fusion modules, map fusion.

    Args:
        backbone: Teacher backbone (see :data:`kd_ext.backbones.BACKBONES`).
        layers: Shallow levels of groups A and B, shallow to deep; ``None`` for the backbone's defaults.
        deep_layers: Levels of group C, shallow to deep; ``None`` for :data:`DEEP_LAYERS`.
        groups: Groups to use, a subset of ``("A", "B", "C")`` (see the module docstring).
        pre_trained: Load the teacher's ImageNet weights.
        attention: CBAM after each stage of the forward students (groups A and C).
        fusion_modules: Hierarchical attention fusion after each student's distillation layers.
        fusion_stages: ``2`` (within groups across scales, then across groups) or ``1`` (all at once).
        group_fusion: Stage-2 combination of standardised group maps: ``"mean"`` or ``"max"``.
        sigma: Gaussian smoothing of the fused anomaly map (0 disables).
        score_mode: Image score from the map: ``"max"`` or ``"topk"`` (mean of the top pixels).
        top_k_ratio: Fraction of pixels averaged by ``"topk"``.
        kernel_backend: ``kd_ext.kernels`` backend of the anomaly maps: ``"auto"`` (fused native kernel at
            inference when available, torch reference while training or exporting), ``"native"`` or
            ``"reference"`` (force pure torch).
        group_backbones: One teacher backbone per group (in the order of ``groups``); ``None`` shares
            ``backbone``. Teachers must share one input normalisation.
        prior: Fuse a normal-feature prior of the main teacher's two deepest shallow levels into the map.
        prior_scope: What the fused map decides: ``"score"`` (the image score; the anomaly map stays the
            distillation map) or ``"map"`` (the anomaly map and the image score). See :class:`PriorScope`.
        teacher_finetune: ``"none"`` (frozen pretrained teachers) or ``"synthetic"`` (every teacher's last stages
            adapted to the normal training images by :meth:`finetune_teachers` before distillation, then frozen
            again; see :mod:`kd_ext.models.components.finetune`). ``True`` / ``False`` also work.

    Raises:
        ValueError: If an argument is invalid.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        deep_layers: Sequence[str] | None = None,
        groups: Sequence[str] = GROUPS,
        pre_trained: bool = True,
        attention: bool = True,
        fusion_modules: bool = True,
        fusion_stages: int = 2,
        group_fusion: str = "mean",
        sigma: float = 4.0,
        score_mode: str = "max",
        top_k_ratio: float = 0.01,
        kernel_backend: str = "auto",
        group_backbones: Sequence[str] | None = None,
        prior: bool = False,
        prior_scope: PriorScope | str = PriorScope.SCORE,
        teacher_finetune: TeacherFinetune | str | bool = TeacherFinetune.NONE,
    ) -> None:
        super().__init__()
        self.setup_teacher_finetune(teacher_finetune)
        self.groups = validate_groups(groups)
        check_score_options(score_mode, top_k_ratio, SCORE_MODES)
        # Built first: it validates the map-fusion arguments before the networks are created.
        self.anomaly_map_generator = MTHFAnomalyMap(
            num_groups=len(self.groups),
            fusion_stages=fusion_stages,
            group_fusion=group_fusion,
            sigma=sigma,
            backend=kernel_backend,
        )
        self.group_backbones = self._validate_group_backbones(backbone, group_backbones)
        self.group_layers = {
            name: self._group_levels(name, self.group_backbones[name], layers, deep_layers) for name in self.groups
        }
        for name in ("A", "B"):
            if (
                name in self.groups
                and "C" in self.groups
                and self.group_backbones[name] == self.group_backbones["C"]
                and self.group_layers[name] == self.group_layers["C"]
            ):
                msg = (
                    f"Group C must use other feature levels than groups A and B (both got "
                    f"{list(self.group_layers['C'])}); pass different layers and deep_layers."
                )
                raise ValueError(msg)
        self.score_mode = score_mode
        self.top_k_ratio = top_k_ratio

        # One teacher per distinct backbone, computing every level its groups (and the prior) need.
        shallow = resolve_layers(get_backbone_spec(backbone), layers)
        prior_layers = tuple(shallow[-2:])
        own = [self.group_layers[name] for name in self.groups if self.group_backbones[name] == backbone]
        self.layers = self._union_in_forward_order(backbone, [*own, prior_layers] if prior else own or [shallow])
        self.teacher = build_teacher(backbone, self.layers, pre_trained)
        self.extra_teachers = nn.ModuleDict()
        self.teacher_layers = {backbone: self.layers}
        for other in dict.fromkeys(self.group_backbones.values()):
            if other != backbone:
                levels = [self.group_layers[name] for name in self.groups if self.group_backbones[name] == other]
                self.teacher_layers[other] = self._union_in_forward_order(other, levels)
                self.extra_teachers[other] = build_teacher(other, self.teacher_layers[other], pre_trained)
        self.group_indices = {
            name: [self.teacher_layers[self.group_backbones[name]].index(layer) for layer in self.group_layers[name]]
            for name in self.groups
        }
        channels, strides = self._probe_levels()

        self.students = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        for name in self.groups:
            group_channels, group_strides = channels[name], strides[name]
            if name == "B":
                self.students[name] = ReverseStudent(group_channels, group_strides)
            else:
                self.students[name] = build_forward_student(
                    self.group_backbones[name], self.group_layers[name], group_channels, attention
                )
            if fusion_modules:
                self.fusions[name] = HierarchicalAttentionFusion(group_channels, group_strides)
        prior_indices = tuple(self.layers.index(layer) for layer in prior_layers)
        self.prior_fusion = PriorFusion(levels=prior_indices, scope=prior_scope) if prior else None
        self.needs_calibration = False

    def _validate_group_backbones(self, backbone: str, group_backbones: Sequence[str] | None) -> dict[str, str]:
        if group_backbones is None:
            return dict.fromkeys(self.groups, backbone)
        if isinstance(group_backbones, str) or len(group_backbones) != len(self.groups):
            msg = (
                f"group_backbones needs one backbone per group {list(self.groups)}, got {group_backbones!r} "
                "(e.g. ['efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2'])."
            )
            raise ValueError(msg)
        normalisations = {tuple(get_backbone_spec(name).mean + get_backbone_spec(name).std) for name in group_backbones}
        if len(normalisations | {tuple(get_backbone_spec(backbone).mean + get_backbone_spec(backbone).std)}) > 1:
            msg = (
                f"The group teachers {list(group_backbones)} and the backbone '{backbone}' expect different input "
                "normalisations; one pre-processor serves all groups: choose teachers of one family."
            )
            raise ValueError(msg)
        return dict(zip(self.groups, group_backbones, strict=True))

    @staticmethod
    def _group_levels(
        name: str, backbone: str, layers: Sequence[str] | None, deep_layers: Sequence[str] | None
    ) -> tuple[str, ...]:
        if name != "C":
            return tuple(resolve_layers(get_backbone_spec(backbone), layers))
        if deep_layers is not None:
            return tuple(deep_layers)
        if backbone not in DEEP_LAYERS:
            msg = f"No default deep_layers for backbone '{backbone}'; pass deep_layers for group C."
            raise ValueError(msg)
        return DEEP_LAYERS[backbone]

    def train(self, mode: bool = True) -> "MTHFModel":
        """Set train/eval mode; every teacher stays in eval mode.

        Args:
            mode: Train mode if ``True``, eval mode otherwise.

        Returns:
            MTHFModel: ``self``.
        """
        super().train(mode)
        self.extra_teachers.eval()
        return self

    @staticmethod
    def _union_in_forward_order(backbone: str, level_sets: Sequence[Sequence[str]]) -> tuple[str, ...]:
        names = [name for name, _ in create_backbone(backbone, pre_trained=False).named_modules()]
        requested = {layer for levels in level_sets for layer in levels}
        missing = sorted(requested.difference(names))
        if missing:
            msg = f"Feature layer(s) {missing} are not modules of backbone '{backbone}'."
            raise ValueError(msg)
        for levels in level_sets:
            if list(levels) != sorted(levels, key=names.index):
                msg = f"Feature layers {list(levels)} must be given shallow to deep."
                raise ValueError(msg)
        return tuple(sorted(requested, key=names.index))

    def _teachers(self) -> dict[str, nn.Module]:
        return {self.teacher_name: self.teacher, **dict(self.extra_teachers.items())}

    def finetuned_teachers(self) -> list[nn.Module]:
        """Every teacher (the shared one and those of ``group_backbones``): fine-tuning adapts each in turn."""
        return list(self._teachers().values())

    @property
    def teacher_name(self) -> str:
        """Backbone of the main teacher (the one the prior reads)."""
        return next(iter(self.teacher_layers))

    def _probe_levels(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        probed = {name: probe_levels(teacher) for name, teacher in self._teachers().items()}
        channels, strides = {}, {}
        for name in self.groups:
            teacher_channels, teacher_strides = probed[self.group_backbones[name]]
            channels[name] = [teacher_channels[index] for index in self.group_indices[name]]
            strides[name] = [teacher_strides[index] for index in self.group_indices[name]]
            require_halving_strides(strides[name], f"Group {name}'s levels {list(self.group_layers[name])}")
        return channels, strides

    def teacher_features(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Features of every teacher (one pass each), by backbone name."""
        with torch.no_grad():
            return {name: teacher(images) for name, teacher in self._teachers().items()}

    def distill(self, images: torch.Tensor, teachers: dict[str, list[torch.Tensor]] | None = None) -> GroupPairs:
        """Run every teacher once and every group's student (and fusion module).

        Args:
            images: Normalised images ``[B, 3, H, W]``.
            teachers: Teacher features from :meth:`teacher_features`, if already computed.

        Returns:
            dict: ``group name -> (teacher features, student features)`` on the group's levels.
        """
        teachers = self.teacher_features(images) if teachers is None else teachers
        pairs: GroupPairs = {}
        for name in self.groups:
            features = teachers[self.group_backbones[name]]
            targets = [features[index] for index in self.group_indices[name]]
            student = self.students[name](targets if name == "B" else images)
            if name in self.fusions:
                student = self.fusions[name](student)
            pairs[name] = (targets, student)
        return pairs

    def image_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Reduce anomaly maps ``[B, 1, H, W]`` to image scores ``[B]`` by the score rule of :meth:`tail`."""
        tail = self.tail(statistics=False)
        size = (int(anomaly_map.shape[-2]), int(anomaly_map.shape[-1]))
        return reference.image_score(anomaly_map, tail.score, tail.top_k(size))

    def tail(self, statistics: bool = True) -> MapTail:
        """The model's anomaly-map tail, described once: the forward, the exporter and the edge runtime read it.

        Two-stage fusion: one group per teacher-student group (its levels averaged), the groups standardised with
        the moving statistics and combined by ``group_fusion``. One-stage fusion: one group of every level of every
        group, averaged. Then the blur (``sigma``), the score (``score_mode`` / ``top_k_ratio``) and, with a fitted
        prior, its rule, scope and map statistics.

        Args:
            statistics: Read the fitted statistics (the group maps' and the prior's) as numbers; ``False`` for the
                forward, which uses its buffers.

        Returns:
            MapTail: The description, from the model's current settings.
        """
        generator = self.anomaly_map_generator
        two_stage = generator.fusion_stages == 2
        group_statistics = two_stage and statistics
        fusion = self.prior_fusion
        return MapTail(
            fusions=(generator.group_map.fusion,) * (len(self.groups) if two_stage else 1),
            distance=generator.group_map.distance,
            align_corners=generator.group_map.align_corners,
            sigma=float(generator.sigma),
            score=self.score_mode,
            top_k_ratio=self.top_k_ratio,
            group_fusion=generator.group_fusion if two_stage else "none",
            group_mean=tuple(float(value) for value in generator.map_mean) if group_statistics else (),
            group_std=tuple(float(value) for value in generator.map_std) if group_statistics else (),
            prior=fusion.tail_prior(statistics) if fusion is not None and fusion.ready else None,
            statistics=statistics,
        )

    def tail_features(self, images: torch.Tensor) -> tuple[list[list[FeaturePair]], list[torch.Tensor]]:
        """The teacher/student feature pairs of each group of :meth:`tail`, and the teacher features the prior reads.

        Args:
            images: Normalised images ``[B, 3, H, W]``.

        Returns:
            tuple: One list of ``(teacher, student)`` pairs per group (in :attr:`MapTail.fusions` order; one group of
            all pairs for one-stage fusion), and the main teacher's features.
        """
        teachers = self.teacher_features(images)
        groups = [
            list(zip(teacher, student, strict=True)) for teacher, student in self.distill(images, teachers).values()
        ]
        if self.anomaly_map_generator.fusion_stages == 1:
            groups = [[pair for group in groups for pair in group]]
        return groups, teachers[self.teacher_name]

    def forward(self, images: torch.Tensor) -> GroupPairs | InferenceBatch:
        """Distillation outputs in training mode; anomaly map and score in eval mode.

        In training mode the moving statistics of each group's map (used by stage-2 fusion) are
        updated from the batch as a side effect, like batch-norm running statistics.

        Args:
            images: Normalised images ``[B, 3, H, W]``.

        Returns:
            Training: see :meth:`distill`. Eval: ``InferenceBatch(pred_score, anomaly_map)``.
        """
        teachers = self.teacher_features(images)
        pairs = self.distill(images, teachers)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if self.training:
            detached = [
                ([t.detach() for t in teacher], [s.detach() for s in student]) for teacher, student in pairs.values()
            ]
            self.anomaly_map_generator.update_statistics(detached, downsampled_size(size))
            self.needs_calibration = self.prior_fusion is not None
            return pairs
        anomaly_map = self.anomaly_map_generator(list(pairs.values()), size)
        tail = self.tail(statistics=False)
        if tail.prior is None:
            return InferenceBatch(pred_score=self.image_score(anomaly_map), anomaly_map=anomaly_map)
        fused = self.prior_fusion(anomaly_map, teachers[self.teacher_name], size)
        if tail.prior.scope == PriorScope.MAP.value:
            anomaly_map = fused
        return InferenceBatch(pred_score=self.image_score(fused), anomaly_map=anomaly_map)

    def _outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        teachers = self.teacher_features(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        pairs = list(self.distill(images, teachers).values())
        return teachers[self.teacher_name], self.anomaly_map_generator(pairs, size)
