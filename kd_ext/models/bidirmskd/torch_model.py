"""PyTorch model of BiDirMSKD: bidirectional multi-scale knowledge distillation.

An asymmetric teacher-student network (seed paper 001): a frozen pretrained teacher; a forward
student that regresses the teacher's multi-scale features from the image (STFPM-like, with CBAM
attention in each stage); a reverse student that reconstructs them from a one-class bottleneck
embedding (RD4AD-like); and a feature-fusion residual module that feeds the forward student's
multi-scale features into the reverse student's bottleneck.

With ``prior=True`` a normal-feature prior (a per-location Gaussian of the teacher's deep features on the
normal training images, :class:`~kd_ext.models.components.NormalFeaturePrior`) is fused into the map: the
distillation map and the prior's Mahalanobis map are standardised with their statistics on normal training
images and averaged. Distillation finds local defects a student cannot imitate; the prior finds anomalies made
of normal-looking parts (missing, misplaced or bent components).
"""

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch

from kd_ext.backbones import get_backbone_spec
from kd_ext.backbones.registry import resolve_layers
from kd_ext.edge.contract import MapTail
from kd_ext.kernels import SCORE_MODES
from kd_ext.kernels.reference import image_score
from kd_ext.models.components import (
    FeatureFusionResidual,
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

from .anomaly_map import AnomalyMapGenerator

MIN_IMAGE_SIZE = 32
FeaturePair = tuple[torch.Tensor, torch.Tensor]
"""A teacher level and the matching student level."""


def check_images(images: torch.Tensor) -> None:
    """Reject tensors a model cannot score, with a message that says how to fix the input.

    Args:
        images: Candidate batch.

    Raises:
        ValueError: If ``images`` is not a floating-point ``[B, 3, H, W]`` batch of at least 32x32 pixels.
    """
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return
    if images.ndim != 4:
        msg = f"Expected a batch of images [B, 3, H, W], got a tensor of shape {tuple(images.shape)}."
        raise ValueError(msg)
    if images.shape[1] != 3:
        msg = (
            f"Expected images with 3 channels, got {images.shape[1]}: convert grayscale or RGBA images to RGB "
            "(anomalib's datasets and pre-processor do this for image files)."
        )
        raise ValueError(msg)
    if not images.is_floating_point():
        msg = f"Expected floating point images scaled to [0, 1] and normalised, got dtype {images.dtype}."
        raise ValueError(msg)
    if min(images.shape[-2:]) < MIN_IMAGE_SIZE:
        msg = f"Images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels, got {tuple(images.shape[-2:])}."
        raise ValueError(msg)


class BiDirMSKDModel(FrozenTeacherModel):
    """Teacher, forward student, reverse student and fusion module.

    Args:
        backbone: Teacher backbone (see :data:`kd_ext.backbones.BACKBONES`).
        layers: Teacher feature levels, shallow to deep; ``None`` for the backbone's defaults.
        pre_trained: Load the teacher's ImageNet weights.
        forward_student: Use the forward (feature-regression) student.
        reverse_student: Use the reverse-distillation student.
        attention: CBAM attention in the forward student's stages.
        fusion: Feature-fusion residual module between the students (needs both students).
        map_fusion: How per-level, per-direction maps are combined: ``"mean"``, ``"sum"`` or ``"product"``.
        sigma: Gaussian smoothing of the anomaly map (0 disables).
        score_mode: Image score from the map: ``"max"`` or ``"topk"`` (mean of the top pixels).
        top_k_ratio: Fraction of pixels averaged by ``"topk"``.
        kernel_backend: Anomaly-map kernel: ``"auto"`` (fused native kernel at inference when the extension is
            available, torch reference while exporting), ``"native"`` or ``"reference"`` (force pure torch).
        prior: Fuse a normal-feature prior of the teacher's two deepest levels into the map (fitted on the
            normal training images by :meth:`calibrate`).
        prior_scope: What the fused map decides: ``"score"`` (the image score; the anomaly map stays the
            distillation map) or ``"map"`` (the anomaly map and the image score). See :class:`PriorScope`.
        teacher_finetune: ``"none"`` (frozen pretrained teacher) or ``"synthetic"`` (its last stages adapted to the
            normal training images by :meth:`finetune_teachers` before distillation, then frozen again; see
            :mod:`kd_ext.models.components.finetune`). ``True`` / ``False`` also work.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        forward_student: bool = True,
        reverse_student: bool = True,
        attention: bool = True,
        fusion: bool = True,
        map_fusion: str = "mean",
        sigma: float = 4.0,
        score_mode: str = "max",
        top_k_ratio: float = 0.01,
        kernel_backend: str = "auto",
        prior: bool = False,
        prior_scope: PriorScope | str = PriorScope.SCORE,
        teacher_finetune: TeacherFinetune | str | bool = TeacherFinetune.NONE,
    ) -> None:
        super().__init__()
        self.setup_teacher_finetune(teacher_finetune)
        if not (forward_student or reverse_student):
            msg = "At least one of forward_student and reverse_student must be enabled."
            raise ValueError(msg)
        if fusion and not (forward_student and reverse_student):
            msg = "fusion=True needs both students; pass fusion=False for a forward-only or reverse-only model."
            raise ValueError(msg)
        if attention and not forward_student:
            msg = "attention=True applies to the forward student; pass attention=False for a reverse-only model."
            raise ValueError(msg)
        check_score_options(score_mode, top_k_ratio, SCORE_MODES)
        spec = get_backbone_spec(backbone)
        self.layers = resolve_layers(spec, layers)
        self.score_mode = score_mode
        self.top_k_ratio = top_k_ratio

        self.teacher = build_teacher(backbone, self.layers, pre_trained)
        channels, strides = probe_levels(self.teacher)
        require_halving_strides(strides, f"Feature levels {list(self.layers)}")
        self.forward_student = (
            build_forward_student(backbone, self.layers, channels, attention) if forward_student else None
        )
        self.bottleneck: OneClassBottleneck | None = None
        self.decoder: ReverseDecoder | None = None
        self.fusion: FeatureFusionResidual | None = None
        if reverse_student:
            embedding_channels = 2 * channels[-1]
            self.bottleneck = OneClassBottleneck(channels, strides, embedding_channels)
            self.decoder = ReverseDecoder(embedding_channels, channels)
            if fusion:
                self.fusion = FeatureFusionResidual(channels, strides, embedding_channels)
        self.anomaly_map_generator = AnomalyMapGenerator(fusion=map_fusion, sigma=sigma, backend=kernel_backend)
        levels = (-2, -1) if len(self.layers) > 1 else (-1,)
        self.prior_fusion = PriorFusion(levels=levels, scope=prior_scope) if prior else None
        self.needs_calibration = False

    def distill(
        self,
        images: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Teacher features and both students' outputs.

        Args:
            images: Normalised images ``[B, 3, H, W]``.

        Returns:
            tuple: Teacher features, forward-student features (or ``None``), reverse-student features (or ``None``).
        """
        check_images(images)
        with torch.no_grad():
            teacher = self.teacher(images)
        forward = self.forward_student(images) if self.forward_student is not None else None
        reverse = None
        if self.bottleneck is not None and self.decoder is not None:
            fused = self.bottleneck.fuse(teacher)
            if self.fusion is not None and forward is not None:
                fused = self.fusion(fused, forward)
            embedding = self.bottleneck.embed(fused)
            reverse = self.decoder(embedding, [tuple(feature.shape[-2:]) for feature in teacher])
        return teacher, forward, reverse

    def forward(
        self,
        images: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None] | InferenceBatch:
        """Distillation outputs in training mode; anomaly map and score in eval mode.

        Args:
            images: Normalised images ``[B, 3, H, W]``.

        Returns:
            Training: see :meth:`distill`. Eval: ``InferenceBatch(pred_score, anomaly_map)``.
        """
        teacher, forward, reverse = self.distill(images)
        if self.training:
            self.needs_calibration = self.prior_fusion is not None
            return teacher, forward, reverse
        size = (int(images.shape[-2]), int(images.shape[-1]))
        tail = self.tail(statistics=False)
        top_k = tail.top_k(size)
        students = self._students(forward, reverse)
        if tail.prior is None:
            anomaly_map, pred_score = self.anomaly_map_generator.map_and_score(
                teacher, students, size, tail.score, top_k
            )
            return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
        distillation_map = self.anomaly_map_generator(teacher, students, size)
        fused = self.prior_fusion(distillation_map, teacher, size)
        anomaly_map = fused if tail.prior.scope == PriorScope.MAP.value else distillation_map
        return InferenceBatch(pred_score=image_score(fused, tail.score, top_k), anomaly_map=anomaly_map)

    def tail(self, statistics: bool = True) -> MapTail:
        """The model's anomaly-map tail, described once: the forward, the exporter and the edge runtime read it.

        One group (every teacher level paired with each student's, forward student first) fused by ``map_fusion``,
        blurred by ``sigma`` and scored by ``score_mode`` / ``top_k_ratio``; with a fitted prior, its rule, scope
        and map statistics.

        Args:
            statistics: Read the fitted statistics (the prior's) as numbers; ``False`` for the forward, which uses
                its buffers.

        Returns:
            MapTail: The description, from the model's current settings.
        """
        generator = self.anomaly_map_generator
        fusion = self.prior_fusion
        return MapTail(
            fusions=(generator.fusion,),
            distance=generator.distance,
            align_corners=generator.align_corners,
            sigma=float(generator.sigma),
            score=self.score_mode,
            top_k_ratio=self.top_k_ratio,
            prior=fusion.tail_prior(statistics) if fusion is not None and fusion.ready else None,
            statistics=statistics,
        )

    def tail_features(self, images: torch.Tensor) -> tuple[list[list[FeaturePair]], list[torch.Tensor]]:
        """The teacher/student feature pairs of each group of :meth:`tail`, and the teacher features the prior reads.

        Args:
            images: Normalised images ``[B, 3, H, W]``.

        Returns:
            tuple: One list of ``(teacher, student)`` pairs per group (in :attr:`MapTail.fusions` order), and the
            teacher features.
        """
        teacher, forward, reverse = self.distill(images)
        pairs = [
            (level, student_level)
            for student in self._students(forward, reverse)
            for level, student_level in zip(teacher, student, strict=True)
        ]
        return [pairs], teacher

    @staticmethod
    def _students(forward: list[torch.Tensor] | None, reverse: list[torch.Tensor] | None) -> list[list[torch.Tensor]]:
        return [student for student in (forward, reverse) if student is not None]

    def _outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        teacher, forward, reverse = self.distill(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return teacher, self.anomaly_map_generator(teacher, self._students(forward, reverse), size)
