"""MTHF as an anomalib model.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from kd_ext.models import MTHF
    >>> engine = Engine(max_epochs=20)
    >>> engine.train(MTHF(), datamodule=MVTecAD(root="datasets/MVTecAD", category="bottle"))  # doctest: +SKIP
"""

from collections.abc import Sequence

from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from kd_ext.kernels import Backend, ScoreMode, validate_sigma
from kd_ext.models.base import DEFAULT_EPOCHS, KDExtModelMixin
from kd_ext.models.checkpoint import ARCHITECTURE_KEYS, pre_processor_image_size, teacher_pre_processor
from kd_ext.models.components import PriorScope, TeacherFinetune, resolve_teacher_finetune
from kd_ext.models.components.optimizer import Optimizer, resolve_optimizer
from kd_ext.options import check_choice, check_epochs, check_name, literal_of

from .anomaly_map import GROUP_FUSIONS
from .loss import MTHFLoss
from .torch_model import GROUPS, MTHFModel


class MTHF(KDExtModelMixin, AnomalibModule):
    """Multi-group teacher-student network with hierarchical feature fusion (seed paper 002).

    Three teacher-student groups share one frozen teacher (one forward pass per batch):
    **A** a forward student on the shallow levels (``blocks.1/2/4`` of EfficientNet-Lite0),
    **B** a reverse-distillation student (one-class bottleneck + decoder) on the same levels,
    **C** a forward student on the deeper levels (``blocks.2/4/6``). They differ in distillation
    direction (A vs B) and in feature levels / receptive field (A vs C). A hierarchical attention
    fusion module (cross-level concatenation + CBAM, gated residual) follows each student. Anomaly
    maps are fused in two stages: across scales within each group (mean of upsampled ``1 - cos``
    maps), then across groups after standardising each group's map with its statistics on normal
    training images (mean by default), then Gaussian-smoothed once.

    The ablations are the same class: ``groups=("A",)`` (one group), ``fusion_stages=1`` (all
    per-level maps averaged at once), ``fusion_modules=False`` (no fusion modules).

    Teacher fine-tuning (``teacher_finetune="synthetic"``, off by default) adapts every teacher's last two stages to
    the normal training images before distillation, inside the trainer, by segmenting anomalib's Perlin synthetic
    anomalies with an L2-SP penalty towards the pretrained weights; the teachers never see the distillation loss
    (which they could collapse onto) and are frozen again before the students train. Checkpoints hold the adapted
    teachers. See :class:`~kd_ext.models.BiDirMSKD` and :mod:`kd_ext.models.components.finetune`.

    Args:
        backbone: Teacher backbone: ``"efficientnet_lite0"`` (offline ImageNet weights, default),
            ``"resnet18"``, ``"resnet34"`` or ``"wide_resnet50_2"`` (downloaded by timm).
        layers: Shallow levels of groups A and B; ``None`` for the backbone's defaults.
        deep_layers: Levels of group C; ``None`` for the backbone's defaults.
        groups: Groups to use, a non-empty subset of ``("A", "B", "C")``.
        pre_trained: Load the teacher's ImageNet weights. ``False`` only for tests.
        attention: CBAM after each stage of the forward students (A and C).
        fusion_modules: Hierarchical attention fusion module after each student.
        fusion_stages: ``2`` (within groups, then across groups) or ``1`` (all maps at once).
        group_fusion: Stage-2 combination of standardised group maps: ``"mean"`` or ``"max"``.
        sigma: Gaussian smoothing of the anomaly map (0 disables).
        score_mode: Image score: ``"max"`` or ``"topk"`` (mean of the top 1 % of the map).
        optimizer: ``"adam"`` (default) or ``"sgd"`` (anomalib Stfpm's SGD with momentum); see
            :class:`~kd_ext.models.components.optimizer.Optimizer`.
        learning_rate: The optimiser's learning rate; ``None`` for its default (Adam 0.005, SGD 0.4).
        epochs: Training epochs. They become the trainer's ``max_epochs`` through :attr:`trainer_arguments`,
            which anomalib applies over the trainer's own settings: change them with ``--model.epochs``.
        kernel_backend: Anomaly-map kernel: ``"auto"`` (fused native kernel at inference when the extension is
            available, torch reference while training or exporting), ``"native"`` or ``"reference"``.
        group_backbones: One teacher per group, e.g. ``["efficientnet_lite0", "efficientnet_lite1",
            "efficientnet_lite2"]`` (the paper's distinct teacher-student pairs); ``None`` shares ``backbone``.
        prior: Fuse a normal-feature prior (a per-location Gaussian of the teacher's deep features, fitted on
            the normal training images) with the distillation map, both standardised on normal training images.
            Off by default.
        prior_scope: What the fused map decides: ``"score"`` (default: the image score, while the anomaly map stays
            the distillation map, whose localisation of small defects a coarse prior would blur) or ``"map"`` (the
            anomaly map too, for anomalies made of normal-looking parts such as missing or misplaced components).
        teacher_finetune: ``"none"`` (frozen ImageNet teachers, default) or ``"synthetic"`` (adapted to the normal
            training images before distillation, then frozen; see above). ``True`` / ``False`` also work.
        pre_processor: Pre-processor; ``True`` resizes to 256x256 and normalises as the teacher expects.
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for anomalib's default.
        visualizer: Visualizer, or ``True`` for anomalib's default.
    """

    architecture_keys = (
        *ARCHITECTURE_KEYS,
        "deep_layers",
        "groups",
        "fusion_modules",
        "group_backbones",
        "teacher_finetune",
    )

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
        group_fusion: literal_of(GROUP_FUSIONS) = "mean",
        sigma: float = 4.0,
        score_mode: literal_of(ScoreMode) = ScoreMode.MAX.value,
        optimizer: literal_of(Optimizer) = Optimizer.ADAM.value,
        learning_rate: float | None = None,
        epochs: int = DEFAULT_EPOCHS,
        kernel_backend: literal_of(Backend) = Backend.AUTO.value,
        group_backbones: Sequence[str] | None = None,
        prior: bool = False,
        prior_scope: PriorScope | literal_of(PriorScope) = PriorScope.SCORE.value,
        teacher_finetune: TeacherFinetune | literal_of(TeacherFinetune) | bool = TeacherFinetune.NONE,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        # Checked, and plain strs in the hparams anomalib saves next (checkpoints load with weights_only)
        teacher_finetune = resolve_teacher_finetune(teacher_finetune).value
        prior_scope = check_choice(prior_scope, PriorScope, "prior_scope").value
        group_fusion = check_name(group_fusion, GROUP_FUSIONS, "group_fusion")
        score_mode = check_choice(score_mode, ScoreMode, "score_mode").value
        kernel_backend = check_choice(kernel_backend, Backend, "kernel backend").value
        optimizer, learning_rate = resolve_optimizer(optimizer, learning_rate)
        epochs = check_epochs(epochs)
        if pre_processor is True:
            pre_processor = teacher_pre_processor(backbone)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        validate_sigma(sigma, pre_processor_image_size(self.pre_processor))
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        self.epochs = epochs
        self.model = MTHFModel(
            backbone=backbone,
            layers=layers,
            deep_layers=deep_layers,
            groups=groups,
            pre_trained=pre_trained,
            attention=attention,
            fusion_modules=fusion_modules,
            fusion_stages=fusion_stages,
            group_fusion=group_fusion,
            sigma=sigma,
            score_mode=score_mode,
            kernel_backend=kernel_backend,
            group_backbones=group_backbones,
            prior=prior,
            prior_scope=prior_scope,
            teacher_finetune=teacher_finetune,
        )
        self.loss = MTHFLoss()

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Distil the shared teacher into every group's student on a batch of normal images."""
        del args, kwargs
        images = self.training_input(batch.image)
        terms = self.loss(self.model(images))
        self.log_loss_terms(terms, images.shape[0])
        return {"loss": terms["loss"]}
