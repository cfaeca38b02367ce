"""PyTorch model of SignalKD: teacher-student anomaly detection for 1-D signals (e.g. ECG beats).

The teacher is a convolutional + recurrent encoder (two convolution stages, the second at half the time
resolution, then a bidirectional GRU) giving per-time-step features at three levels. It is pretrained
self-supervised by masked reconstruction: contiguous spans of each series are hidden (set to zero, the mean of a
z-normalised series) and a small head reconstructs the series from the teacher's features (see
:func:`~kd_ext.models.signal_kd.loss.masked_reconstruction_loss`). Pretraining needs no labels, so it can use more
signal than the normal training series, e.g. every training series, normal or not. Then the teacher is frozen and
two students learn the normal series only:

* the forward student, an encoder of the teacher's architecture trained from scratch, regresses the teacher's
  features from the series (STFPM-like);
* the reverse student compresses the teacher's three levels into a one-class code of a few numbers per series
  (``bottleneck``) and decodes the levels back from it (RD4AD-like).

Where a series departs from the normal ones, the students fail to follow the teacher: the distillation map is the
mean over the map levels and both students of the per-time-step ``1 - cos(t, s)`` (upsampled to the series length,
smoothed along time). Students learn all three levels, but the map leaves the first out by default: its features
are local convolution responses that abnormal beats share with normal ones, and in cross-validation over ECG200's
training series its map ranked abnormal beats no better than chance while the two deeper levels did. The reverse
student's code is small on purpose: an embedding with more numbers than the series has samples (the former
``hidden`` channels at a quarter of the resolution) rebuilt abnormal beats as well as normal ones, and in that
cross-validation its map ranked abnormal beats below chance on some folds.

With ``prior=True`` (the default) the distillation map is fused with a normal-feature prior, PaDiM in 1-D: a
Gaussian of the teacher's two deeper levels at every time step, fitted on the normal training series (see
:class:`~kd_ext.models.components.prior.PriorFusion`, the prior of kd_ext's image models, here on a one-row grid).
Both maps are standardised with their statistics on the normal training series and averaged. On small sets of
short, aligned beats the students generalise to abnormal beats: a student trained on a few dozen beats imitates
the teacher on most unseen shapes, so the cosine discrepancy alone ranks abnormal beats poorly, whereas how far a
beat's features lie from the normal beats' at the same time step is the signal that separates them; the
distillation map keeps what the prior misses (a local shape the students never saw). The series' score is the
mean of the map (or its maximum, or the mean of its largest values).
"""

from collections.abc import Callable, Iterable, Sequence

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from kd_ext.edge.contract import top_k_count
from kd_ext.kernels.reference import image_score
from kd_ext.models.components import FrozenTeacherModel, check_score_options
from kd_ext.models.components.prior import PriorFusion

from .anomaly_map import SeriesAnomalyMapGenerator
from .loss import masked_reconstruction_loss

SCORE_MODES = ("mean", "max", "topk")
DEFAULT_BOTTLENECK = 16
"""Size of the reverse student's code per series (see :class:`ReverseStudent`)."""
CODE_STEPS = 8
"""Time steps the reverse student's encoding is resampled to before it is projected to the code."""
LEVELS = 3
MIN_SERIES_LENGTH = 8


def conv_block(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Convolution (same padding), batch norm and ReLU along time."""
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm1d(out_channels),
        nn.ReLU(inplace=True),
    )


def resize_time(features: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation of ``[B, C, L']`` features to ``length`` time steps (unchanged when equal)."""
    if features.shape[-1] == length:
        return features
    return F.interpolate(features, size=length, mode="linear", align_corners=False)


def normalize_series(series: torch.Tensor) -> torch.Tensor:
    """Per-series, per-channel z-normalisation (idempotent; a constant series becomes zeros).

    Args:
        series: ``[B, C, L]``.

    Returns:
        torch.Tensor: ``[B, C, L]`` with zero mean and unit standard deviation along time.
    """
    centred = series - series.mean(dim=-1, keepdim=True)
    scale = centred.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return centred / scale.clamp_min(1e-6)


class SignalEncoder(nn.Module):
    """Convolutional + recurrent encoder with per-time-step features at three levels.

    Levels: ``width`` channels at full resolution, ``2 * width`` at half resolution, then the bidirectional GRU's
    ``hidden`` channels at half resolution.

    Args:
        in_channels: Channels of the series (1 for a single lead).
        width: Channels of the first convolution stage.
        hidden: Channels of the recurrent level (both directions together; even).
    """

    def __init__(self, in_channels: int = 1, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        if hidden % 2:
            msg = f"hidden must be even (two GRU directions of hidden/2 channels), got {hidden}."
            raise ValueError(msg)
        self.stem = nn.Sequential(conv_block(in_channels, width, 7), conv_block(width, width, 7))
        self.down = nn.Sequential(conv_block(width, 2 * width, 5, stride=2), conv_block(2 * width, 2 * width, 5))
        self.recurrent = nn.GRU(2 * width, hidden // 2, batch_first=True, bidirectional=True)
        self.channels = (width, 2 * width, hidden)

    def forward(self, series: torch.Tensor) -> list[torch.Tensor]:
        """Features ``[B, C_k, L_k]`` of the three levels, shallow to deep."""
        first = self.stem(series)
        second = self.down(first)
        third, _ = self.recurrent(second.transpose(1, 2))
        return [first, second, third.transpose(1, 2)]


class ReconstructionHead(nn.Module):
    """Pretext head of the teacher's pretraining: the series from the teacher's levels (upsampled and concatenated).

    Args:
        channels: Channels of each level.
        out_channels: Channels of the series.
    """

    def __init__(self, channels: Sequence[int], out_channels: int = 1) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv1d(sum(channels), channels[0], 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels[0], out_channels, 1),
        )

    def forward(self, features: Sequence[torch.Tensor], length: int) -> torch.Tensor:
        """The reconstructed series ``[B, C, length]``."""
        return self.head(torch.cat([resize_time(feature, length) for feature in features], dim=1))


class ReverseStudent(nn.Module):
    """One-class bottleneck of the teacher's three levels and a decoder back to them (reverse distillation in 1-D).

    The teacher's levels are fused and encoded at an eighth of the series' resolution, resampled to
    ``CODE_STEPS`` steps and projected to a code of ``bottleneck`` numbers per series, from which the decoder
    rebuilds the three levels. The code is what makes the student one-class: it can only hold the shapes of the
    normal training series. Without it (``bottleneck=None``) the embedding keeps ``hidden`` channels at a quarter of
    the resolution, more numbers than the series has samples, and the student rebuilds abnormal series' features
    as well as normal ones.

    Args:
        channels: Channels of the teacher's levels ``(width, 2 * width, hidden)``.
        bottleneck: Size of the code; ``None`` for the former embedding without a code (``hidden`` channels at a
            quarter of the resolution).
    """

    def __init__(self, channels: Sequence[int], bottleneck: int | None = DEFAULT_BOTTLENECK) -> None:
        super().__init__()
        first, second, third = channels
        self.squeeze = conv_block(first, second, 3, stride=2)
        self.code: nn.ModuleList | None = None
        if bottleneck is None:
            self.embed = nn.Sequential(conv_block(2 * second + third, third, 3, stride=2), conv_block(third, third, 3))
        else:
            if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
                msg = f"bottleneck must be a whole number >= 1 (the code size) or None, got {bottleneck!r}."
                raise ValueError(msg)
            self.embed = nn.Sequential(
                conv_block(2 * second + third, third, 3, stride=2), conv_block(third, third, 3, stride=2)
            )
            self.code = nn.ModuleList(
                [
                    nn.Linear(third * CODE_STEPS, bottleneck),
                    nn.Sequential(nn.Linear(bottleneck, third * CODE_STEPS), nn.ReLU(inplace=True)),
                ]
            )
        self.decode_third = nn.GRU(third, third // 2, batch_first=True, bidirectional=True)
        self.decode_second = nn.Sequential(conv_block(third, second, 5), nn.Conv1d(second, second, 1))
        self.decode_first = nn.Sequential(conv_block(second, first, 7), nn.Conv1d(first, first, 1))

    def forward(self, teacher: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Reconstructed teacher features, shallow to deep, shaped like ``teacher``."""
        first, second, third = teacher
        half = second.shape[-1]
        fused = torch.cat([resize_time(self.squeeze(first), half), second, third], dim=1)
        embedding = self.embed(fused)
        if self.code is not None:
            encode, decode = self.code
            code = encode(resize_time(embedding, CODE_STEPS).flatten(1))
            embedding = decode(code).view(code.shape[0], -1, CODE_STEPS)
        embedding = resize_time(embedding, half)
        decoded_third, _ = self.decode_third(embedding.transpose(1, 2))
        decoded_third = decoded_third.transpose(1, 2)
        decoded_second = self.decode_second(decoded_third)
        decoded_first = self.decode_first(resize_time(decoded_second, first.shape[-1]))
        return [decoded_first, decoded_second, decoded_third]


def augment(series: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Pretraining augmentation: random amplitude scaling (0.8 to 1.2) and Gaussian noise (standard deviation 0.05).

    Args:
        series: ``[B, C, L]``.
        generator: Random generator (``None``: torch's global one).

    Returns:
        torch.Tensor: Augmented series ``[B, C, L]``.
    """
    scale = 0.8 + 0.4 * torch.rand((len(series), 1, 1), generator=generator)
    noise = 0.05 * torch.randn(series.shape, generator=generator)
    return series * scale.to(series.device) + noise.to(series.device)


def span_mask(shape: tuple[int, int, int], ratio: float, span: int, generator: torch.Generator | None) -> torch.Tensor:
    """Random contiguous spans covering about ``ratio`` of each series' time steps.

    Args:
        shape: ``(B, C, L)`` of the series.
        ratio: Share of time steps to hide.
        span: Length of each hidden span.
        generator: Random generator (``None``: torch's global one).

    Returns:
        torch.Tensor: ``[B, 1, L]``, ``True`` where hidden.
    """
    batch, _, length = shape
    span = max(1, min(span, length))
    count = max(1, round(ratio * length / span))
    starts = torch.randint(0, length - span + 1, (batch, count, 1), generator=generator)
    steps = torch.arange(length).view(1, 1, length)
    return ((steps >= starts) & (steps < starts + span)).any(dim=1, keepdim=True)


class SignalKDModel(FrozenTeacherModel):
    """Self-supervised conv + GRU teacher, forward and reverse students, per-time-step anomaly map.

    Args:
        in_channels: Channels of the series.
        width: Channels of the encoders' first stage.
        hidden: Channels of the encoders' recurrent level (even).
        forward_student: Use the forward (feature-regression) student.
        reverse_student: Use the reverse (one-class embedding) student.
        bottleneck: Size of the reverse student's code per series, or ``None`` for no code (see
            :class:`ReverseStudent`).
        sigma: Gaussian smoothing of the map along time, in time steps (0 disables it).
        score_mode: Series score from the map: ``"mean"``, ``"max"`` or ``"topk"`` (mean of the largest
            ``top_k_ratio``).
        top_k_ratio: Share of time steps averaged by ``"topk"`` (counted by
            :func:`~kd_ext.edge.contract.top_k_count`, the image models' rule).
        map_levels: Levels (0, 1, 2: shallow to deep) whose discrepancies make the map.
        normalize_input: Z-normalise each series first (idempotent: series the datamodule normalised are unchanged),
            so that the model, and its exported IR, can take raw series.
        prior: Fuse a normal-feature prior of the teacher's two deeper levels into the map (fitted on the normal
            training series by :meth:`calibrate`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 32,
        hidden: int = 64,
        forward_student: bool = True,
        reverse_student: bool = True,
        bottleneck: int | None = DEFAULT_BOTTLENECK,
        sigma: float = 2.0,
        score_mode: str = "mean",
        top_k_ratio: float = 0.1,
        map_levels: Sequence[int] = (1, 2),
        normalize_input: bool = True,
        prior: bool = True,
    ) -> None:
        super().__init__()
        if not (forward_student or reverse_student):
            msg = "At least one of forward_student and reverse_student must be enabled."
            raise ValueError(msg)
        check_score_options(score_mode, top_k_ratio, SCORE_MODES)
        levels = sorted({int(level) for level in map_levels})
        if not levels or not set(levels) <= set(range(LEVELS)):
            msg = f"map_levels must be a non-empty subset of {list(range(LEVELS))}, got {list(map_levels)}."
            raise ValueError(msg)
        self.map_levels = levels
        self.in_channels = in_channels
        self.score_mode = score_mode
        self.top_k_ratio = top_k_ratio
        self.normalize_input = normalize_input
        self.teacher = SignalEncoder(in_channels, width, hidden)
        self.reconstruction_head = ReconstructionHead(self.teacher.channels, in_channels)
        self.forward_student = SignalEncoder(in_channels, width, hidden) if forward_student else None
        self.reverse_student = ReverseStudent(self.teacher.channels, bottleneck) if reverse_student else None
        self.anomaly_map_generator = SeriesAnomalyMapGenerator(sigma)
        self.prior_fusion = PriorFusion(levels=(-2, -1)) if prior else None
        self.needs_calibration = False
        self.register_buffer("series_length", torch.tensor(0))
        self.register_buffer("pretraining_series_count", torch.tensor(0))

    @property
    def teacher_pretrained(self) -> bool:
        """Whether the teacher has been pretrained (its series length is then known)."""
        return int(self.series_length) > 0

    def student_parameters(self) -> list[nn.Parameter]:
        """The parameters distillation trains (the students')."""
        students = [student for student in (self.forward_student, self.reverse_student) if student is not None]
        return [parameter for student in students for parameter in student.parameters()]

    def check_series(self, series: torch.Tensor) -> None:
        """Reject input the model cannot score, with the fix.

        Raises:
            ValueError: If ``series`` is not a floating-point ``[B, C, L]`` batch with the model's channels and (once
                the teacher is pretrained) its series length.
        """
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return
        if series.ndim != 3 or not series.is_floating_point():
            msg = (
                f"Expected a floating-point batch of series [B, C, L], got {series.dtype} {tuple(series.shape)}; "
                "images are for image models (use kd_ext.data.UCRSeries without as_image for series)."
            )
            raise ValueError(msg)
        if series.shape[1] != self.in_channels:
            msg = f"Expected series with {self.in_channels} channel(s), got {series.shape[1]}."
            raise ValueError(msg)
        if self.teacher_pretrained and series.shape[-1] != int(self.series_length):
            msg = (
                f"This model was trained on series of {int(self.series_length)} time steps, got {series.shape[-1]}: "
                "resample the series to that length, or train a model on series of this length."
            )
            raise ValueError(msg)
        if series.shape[-1] < MIN_SERIES_LENGTH:
            msg = f"Series must have at least {MIN_SERIES_LENGTH} time steps, got {series.shape[-1]}."
            raise ValueError(msg)

    def pretrain_teacher(
        self,
        series: torch.Tensor,
        epochs: int = 100,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        mask_ratio: float = 0.25,
        span: int = 8,
        seed: int | None = None,
    ) -> list[float]:
        """Pretrain the teacher by masked reconstruction, then freeze it.

        Each epoch visits every series once, in random order, augmented (:func:`augment`); about ``mask_ratio`` of
        its time steps are hidden in spans of ``span``.

        Args:
            series: The pretraining series ``[N, C, L]`` (labels are not used: any series of the domain will do).
            epochs: Passes over ``series``.
            batch_size: Series per step.
            learning_rate: Adam learning rate.
            mask_ratio: Share of time steps hidden.
            span: Length of each hidden span.
            seed: Seed of shuffling, augmentation and masks (``None``: torch's global generator).

        Returns:
            list[float]: Mean loss of each epoch.

        Raises:
            ValueError: If ``series`` is not a valid batch (see :meth:`check_series`) or the settings are invalid.
        """
        if epochs < 1 or batch_size < 1 or not 0 < mask_ratio < 1:
            msg = f"Need epochs >= 1, batch_size >= 1 and 0 < mask_ratio < 1, got {epochs}, {batch_size}, {mask_ratio}."
            raise ValueError(msg)
        self.series_length.zero_()
        self.check_series(series)
        if self.prior_fusion is not None:  # a new teacher: the prior of the old one no longer applies
            self.prior_fusion.prior.reset()
            self.prior_fusion.standardiser.reset()
        device = self.series_length.device
        series = series.to(device)
        series = normalize_series(series) if self.normalize_input else series
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        modules = nn.ModuleList([self.teacher, self.reconstruction_head])
        modules.requires_grad_(True)
        optimizer = torch.optim.Adam(modules.parameters(), lr=learning_rate)
        was_training = self.training
        modules.train()
        history = []
        try:
            for _ in range(epochs):
                order = torch.randperm(len(series), generator=generator).to(device)
                total = 0.0
                for indices in order.split(batch_size):
                    batch = augment(series[indices], generator)
                    mask = span_mask(tuple(batch.shape), mask_ratio, span, generator).to(device)
                    total += self._pretraining_step(batch, mask, optimizer) * len(batch)
                history.append(total / len(series))
        finally:
            modules.requires_grad_(False)
            self.train(was_training)
        self.series_length.fill_(series.shape[-1])
        self.pretraining_series_count.fill_(len(series))
        return history

    def _pretraining_step(self, batch: torch.Tensor, mask: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
        """One masked-reconstruction step of teacher and head; returns the loss."""
        with torch.enable_grad():
            reconstruction = self.reconstruction_head(self.teacher(batch.masked_fill(mask, 0)), batch.shape[-1])
            loss = masked_reconstruction_loss(reconstruction, batch, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.item()

    def distill(
        self,
        series: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Teacher features and both students' outputs.

        Args:
            series: Series ``[B, C, L]``.

        Returns:
            tuple: Teacher features, forward-student features (or ``None``), reverse-student features (or ``None``).
        """
        self.check_series(series)
        series = normalize_series(series) if self.normalize_input else series
        with torch.no_grad():
            teacher = self.teacher(series)
        forward = self.forward_student(series) if self.forward_student is not None else None
        reverse = self.reverse_student(teacher) if self.reverse_student is not None else None
        return teacher, forward, reverse

    def forward(
        self,
        series: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None] | InferenceBatch:
        """Distillation outputs in training mode; anomaly map ``[B, L]`` and score ``[B]`` in eval mode.

        Args:
            series: Series ``[B, C, L]``.

        Returns:
            Training: see :meth:`distill`. Eval: ``InferenceBatch(pred_score, anomaly_map)``.
        """
        teacher, forward, reverse = self.distill(series)
        if self.training:
            self.needs_calibration = self.prior_fusion is not None
            return teacher, forward, reverse
        length = int(series.shape[-1])
        anomaly_map = self.distillation_map(teacher, forward, reverse, length)
        if self.prior_fusion is not None and self.prior_fusion.ready:
            anomaly_map = self.prior_fusion(as_grid(anomaly_map), [as_grid(level) for level in teacher], (1, length))
            anomaly_map = anomaly_map.flatten(1)
        if self.score_mode == "mean":
            return InferenceBatch(pred_score=anomaly_map.mean(dim=-1), anomaly_map=anomaly_map)
        top_k = None if self.score_mode == "max" else top_k_count(length, self.top_k_ratio)
        return InferenceBatch(pred_score=image_score(anomaly_map, self.score_mode, top_k), anomaly_map=anomaly_map)

    def distillation_map(
        self,
        teacher: Sequence[torch.Tensor],
        forward: Sequence[torch.Tensor] | None,
        reverse: Sequence[torch.Tensor] | None,
        length: int,
    ) -> torch.Tensor:
        """The students' discrepancy map ``[B, length]`` over the map levels (see :meth:`distill`'s outputs)."""
        students = [
            [student[level] for level in self.map_levels] for student in (forward, reverse) if student is not None
        ]
        return self.anomaly_map_generator([teacher[level] for level in self.map_levels], students, length)

    def _teacher_features(self, series: torch.Tensor) -> list[torch.Tensor]:
        """Teacher features of series, as the prior reads them (``[B, C_k, 1, L_k]``, a one-row grid)."""
        series = normalize_series(series) if self.normalize_input else series
        return [as_grid(level) for level in self.teacher(series)]

    def _outputs(self, series: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Teacher features (one-row grids) and the distillation map ``[B, 1, 1, L]`` of series."""
        teacher, forward, reverse = self.distill(series)
        distillation = self.distillation_map(teacher, forward, reverse, int(series.shape[-1]))
        return [as_grid(level) for level in teacher], as_grid(distillation)

    @torch.no_grad()
    def calibrate(self, batches: Callable[[], Iterable[torch.Tensor]]) -> None:
        """Fit the prior (once per pretrained teacher) and both maps' statistics on normal training series.

        Does nothing without a prior. Runs in eval mode and restores the previous mode.

        Args:
            batches: Returns a fresh iterable of normal training series ``[B, C, L]`` each call.

        Raises:
            RuntimeError: If the teacher has not been pretrained.
        """
        if self.prior_fusion is not None and not self.teacher_pretrained:
            msg = "SignalKD's prior is fitted on the pretrained teacher's features: pretrain the teacher first."
            raise RuntimeError(msg)
        super().calibrate(batches)


def as_grid(features: torch.Tensor) -> torch.Tensor:
    """``[B, C, L]`` features or ``[B, L]`` maps as the one-row grids ``[B, C, 1, L]`` / ``[B, 1, 1, L]``."""
    return features.view(features.shape[0], -1, 1, features.shape[-1])
