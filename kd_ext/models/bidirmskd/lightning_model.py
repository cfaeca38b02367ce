"""BiDirMSKD as an anomalib model.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from kd_ext.models import BiDirMSKD
    >>> engine = Engine(max_epochs=30)
    >>> engine.train(BiDirMSKD(), datamodule=MVTecAD(root="datasets/MVTecAD", category="bottle"))  # doctest: +SKIP
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
from kd_ext.models.components.multiscale_map import MapFusion
from kd_ext.models.components.optimizer import Optimizer, resolve_optimizer
from kd_ext.options import check_choice, check_epochs, literal_of

from .loss import BiDirMSKDLoss
from .torch_model import BiDirMSKDModel


class BiDirMSKD(KDExtModelMixin, AnomalibModule):
    """Bidirectional multi-scale knowledge distillation (forward + reverse students, fused maps).

    Every component can be switched off, so the ablations are the same class:
    ``reverse_student=False, fusion=False`` is forward-only (STFPM-like with attention),
    ``forward_student=False, attention=False, fusion=False`` is reverse-only (RD-like),
    ``attention=False`` and ``fusion=False`` remove one module each.

    Teacher fine-tuning (``teacher_finetune="synthetic"``, off by default): small, domain-specific sets (greyscale
    medical slices) are far from the ImageNet photographs the teacher learnt on. Before the first distillation step,
    inside the trainer, the teacher's last two stages are adapted to the normal training images by a separate
    self-supervised task that has negatives: segmenting anomalib's Perlin synthetic anomalies drawn on those images,
    with an L2-SP penalty towards the pretrained weights and batch-norm statistics kept. The teacher never sees the
    distillation loss (trained jointly with the students it could collapse to features that are trivial to imitate),
    and it is frozen again before distillation. Checkpoints hold the adapted teacher. See
    :mod:`kd_ext.models.components.finetune`.

    Args:
        backbone: Teacher backbone: ``"efficientnet_lite0"`` (offline ImageNet weights, default),
            ``"resnet18"`` (the paper's), ``"resnet34"`` or ``"wide_resnet50_2"`` (downloaded by timm).
        layers: Teacher feature levels, shallow to deep; ``None`` for the backbone's defaults.
        pre_trained: Load the teacher's ImageNet weights. ``False`` only for tests.
        forward_student: Use the forward student.
        reverse_student: Use the reverse-distillation student.
        attention: CBAM attention in the forward student.
        fusion: Feature-fusion residual module between the students.
        map_fusion: Fusion of per-level, per-direction anomaly maps: ``"mean"``, ``"sum"``, ``"product"``.
        sigma: Gaussian smoothing of the anomaly map (0 disables).
        score_mode: Image score: ``"max"`` or ``"topk"`` (mean of the top 1 % of pixels).
        optimizer: ``"adam"`` (default) or ``"sgd"`` (anomalib Stfpm's SGD with momentum); see
            :class:`~kd_ext.models.components.optimizer.Optimizer`.
        learning_rate: The optimiser's learning rate; ``None`` for its default (Adam 0.005, SGD 0.4).
        epochs: Training epochs. They become the trainer's ``max_epochs`` through :attr:`trainer_arguments`,
            which anomalib applies over the trainer's own settings: change them with ``--model.epochs``.
        kernel_backend: Anomaly-map kernel at inference: ``"auto"`` (fused native kernel when available),
            ``"native"`` or ``"reference"`` (pure torch). Export always traces the torch reference.
        prior: Fuse a normal-feature prior (a per-location Gaussian of the teacher's deep features, fitted on
            the normal training images) with the distillation map, both standardised on normal training images.
            On by default: the default configuration is chosen by ``benchmarks/accuracy.py`` over the five dev sets
            (see ``benchmarks/results/accuracy_screen.md``).
        prior_scope: What the fused map decides: ``"score"`` (default: the image score, while the anomaly map stays
            the distillation map, whose localisation of small defects a coarse prior would blur) or ``"map"`` (the
            anomaly map too, for anomalies made of normal-looking parts such as missing or misplaced components).
        teacher_finetune: ``"none"`` (frozen ImageNet teacher, default) or ``"synthetic"`` (adapted to the normal
            training images before distillation, then frozen; see above). ``True`` / ``False`` also work.
        pre_processor: Pre-processor; ``True`` resizes to 256x256 and normalises as the teacher expects.
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for anomalib's default.
        visualizer: Visualizer, or ``True`` for anomalib's default.
    """

    architecture_keys = (*ARCHITECTURE_KEYS, "teacher_finetune")

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        forward_student: bool = True,
        reverse_student: bool = True,
        attention: bool = True,
        fusion: bool = True,
        map_fusion: literal_of(MapFusion) = MapFusion.MEAN.value,
        sigma: float = 4.0,
        score_mode: literal_of(ScoreMode) = ScoreMode.MAX.value,
        optimizer: literal_of(Optimizer) = Optimizer.ADAM.value,
        learning_rate: float | None = None,
        epochs: int = DEFAULT_EPOCHS,
        kernel_backend: literal_of(Backend) = Backend.AUTO.value,
        prior: bool = True,
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
        map_fusion = check_choice(map_fusion, MapFusion, "map fusion").value
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
        self.model = BiDirMSKDModel(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            forward_student=forward_student,
            reverse_student=reverse_student,
            attention=attention,
            fusion=fusion,
            map_fusion=map_fusion,
            sigma=sigma,
            score_mode=score_mode,
            kernel_backend=kernel_backend,
            prior=prior,
            prior_scope=prior_scope,
            teacher_finetune=teacher_finetune,
        )
        self.loss = BiDirMSKDLoss()

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Distil the teacher into the students on a batch of normal images."""
        del args, kwargs
        images = self.training_input(batch.image)
        teacher, forward, reverse = self.model(images)
        terms = self.loss(teacher, forward, reverse)
        self.log_loss_terms(terms, images.shape[0])
        return {"loss": terms["loss"]}
