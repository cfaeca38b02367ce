"""OpenVINO inference of an exported anomaly-detection IR (anomalib / kd_ext export), torch-free.

The IR is anomalib's whole ``AnomalibModule.forward``: input ``float32`` RGB ``[N, 3, H, W]`` in ``[0, 1]``;
outputs ``pred_score`` ``[N]`` and ``anomaly_map`` ``[N, 1, H, W]`` (normalised by the model's post-processor
so that 0.5 is the threshold), and, when the post-processor thresholds, ``pred_label`` ``[N]`` and
``pred_mask`` ``[N, 1, H, W]``. A 1-D model's IR (kd_ext's SignalKD) takes series ``[N, C, L]`` instead and
outputs per-time-step maps and masks ``[N, L]`` (:attr:`EdgeModel.input_kind` is ``"series"``).
Labels and masks are taken from the IR when it has them; otherwise a threshold must be given and is applied to
the score and the map here.

A cross-task student's IR serves several tasks from one trunk pass: its outputs are ``<task>/pred_score``,
``<task>/anomaly_map``, ... and :class:`EdgeModel` reads one task's (``task=``).

A features IR (``export_openvino(..., mode="features")``) ends at the per-scale teacher/student features and
records its anomaly-map tail in ``rt_info`` (:class:`~kd_ext.edge.contract.AnomalyTail`); :class:`EdgeModel`
detects it and runs the tail and anomalib's post-processing with :mod:`kd_ext.kernels` and numpy
(:mod:`kd_ext.edge.tail`), returning the same fields as for the standard IR. The names an IR is read by live in
:mod:`kd_ext.edge.contract`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from .contract import (
    CHECKSUM_KEY,
    OUTPUT_FIELDS,
    REQUIRED_OUTPUTS,
    RT_INFO_KEY,
    TAIL_KEY,
    AnomalyTail,
    file_sha256,
    task_output,
    tasks_of,
)
from .errors import EdgeInputError, EdgeModelError, text_name
from .tail import run_tail

PRECISION_HINTS = ("f32", "bf16", "f16")
MODES = ("throughput", "latency")
DEFAULT_IMAGE_SIZE = (256, 256)
IMAGE, SERIES = "image", "series"
"""Values of :attr:`EdgeModel.input_kind`: ``[N, 3, H, W]`` images or ``[N, C, L]`` series."""

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "IMAGE",
    "MODES",
    "OUTPUT_FIELDS",
    "PRECISION_HINTS",
    "REQUIRED_OUTPUTS",
    "RT_INFO_KEY",
    "SERIES",
    "EdgeModel",
    "Prediction",
    "file_sha256",
    "fold_constant_nan_checks",
    "openvino_message",
]


@dataclass
class Prediction:
    """Predictions for a batch of images (or series).

    Attributes:
        pred_score: Image scores ``[N]`` (normalised: > threshold means anomalous).
        pred_label: Image labels ``[N]`` (``True`` = anomalous).
        anomaly_map: Anomaly maps ``[N, H, W]`` (series: ``[N, L]``).
        pred_mask: Binary masks ``[N, H, W]`` (series: ``[N, L]``).
    """

    pred_score: np.ndarray
    pred_label: np.ndarray
    anomaly_map: np.ndarray
    pred_mask: np.ndarray


def openvino_message(error: BaseException) -> str:
    """OpenVINO's error text without its source-location lines (``Exception from src/...:84:``, ``Check ... at``).

    Args:
        error: An exception raised by OpenVINO.

    Returns:
        str: The lines that describe the problem, joined by spaces (the whole text if nothing else is left).
    """
    lines = [line.strip() for line in str(error).splitlines()]
    location = re.compile(r"^(Exception from \S+:\d+:|Check '.*' failed at \S+:\d+:)$")
    useful = [line for line in lines if line and not location.match(line)]
    return " ".join(useful) or " ".join(line for line in lines if line)


def _rt_info(model: ov.Model, key: str, section: str = RT_INFO_KEY) -> str | None:
    try:
        if model.has_rt_info([section, key]):
            value = model.get_rt_info([section, key])
            return value.astype(str) if hasattr(value, "astype") else str(value)
    except (RuntimeError, TypeError):
        return None
    return None


def fold_constant_nan_checks(model: ov.Model) -> int:
    """Replace ``IsNaN`` of a constant by its (constant) result, in place.

    anomalib's post-processor guards its normalisation with ``where(not isnan(min) and not isnan(max), ...)`` on
    constants. OpenVINO 2026.4's CPU plugin evaluates that guard wrongly when the model is compiled with more than
    one stream (``PERFORMANCE_HINT`` ``THROUGHPUT`` on a multi-core CPU): SignalKD's IR then returned its raw,
    unnormalised anomaly maps (scores were right). With the ``IsNaN`` folded here, every stream count gives the
    single-stream results. Nothing else in the graph changes.

    Args:
        model: The IR, as read.

    Returns:
        int: How many ``IsNaN`` nodes were replaced.
    """
    replaced = 0
    for node in model.get_ordered_ops():
        source = node.input(0).get_source_output().get_node() if node.get_type_name() == "IsNaN" else None
        if source is not None and source.get_type_name() == "Constant":
            value = np.isnan(source.get_data())
            node.output(0).replace(ops.constant(value, dtype=ov.Type.boolean).output(0))
            replaced += 1
    return replaced


class EdgeModel:
    """An exported anomaly-detection IR compiled for inference.

    Args:
        xml_path: The IR's ``.xml`` (its ``.bin`` must be next to it with the same stem).
        device: OpenVINO device.
        precision_hint: ``INFERENCE_PRECISION_HINT``: ``"f32"`` (default; exact), ``"bf16"`` or ``"f16"``
            (faster where the CPU supports them, less accurate). Always set explicitly: this machine's CPU
            default is bf16.
        mode: ``"throughput"`` (several parallel requests, for folders) or ``"latency"`` (one stream).
        num_requests: Parallel infer requests (``None``: OpenVINO's optimal number for ``mode``).
        threshold: Threshold on score and map, required when the IR has no ``pred_label`` output; overrides
            the IR's labels and masks when given.
        image_size: ``(H, W)`` images are resized to when the IR's input size is dynamic (image IRs).
        task: Task to read from a multi-task IR (a cross-task student's, outputs ``<task>/pred_score``, ...).
        verify_weights: Check the ``.bin`` against the checksum kd_ext's exporter stored in the ``.xml``.
        core: OpenVINO ``Core`` to use.

    Raises:
        EdgeModelError: If the IR is missing, unreadable, mismatched or not an anomaly model.
    """

    def __init__(
        self,
        xml_path: str | Path,
        device: str = "CPU",
        precision_hint: str = "f32",
        mode: str = "throughput",
        num_requests: int | None = None,
        threshold: float | None = None,
        image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
        task: str | None = None,
        verify_weights: bool = True,
        core: ov.Core | None = None,
    ) -> None:
        if precision_hint not in PRECISION_HINTS:
            msg = f"Unknown precision hint '{precision_hint}'; choose one of {PRECISION_HINTS}."
            raise ValueError(msg)
        if mode not in MODES:
            msg = f"Unknown mode '{mode}'; choose one of {MODES}."
            raise ValueError(msg)
        self.xml_path = Path(xml_path)
        self.bin_path = self.xml_path.with_suffix(".bin")
        self.core = core or ov.Core()
        self.model = self._read(verify_weights)
        self.task = task
        self.output_prefix = task_output(task, "")
        self.tail = self._read_tail()
        self.output_names = self._check_outputs()
        self.input_kind = IMAGE
        self.channels = 3
        self.batch_size, self.input_size = self._check_input(image_size)
        if threshold is None and "pred_label" not in self.output_names:
            msg = (
                f"{self.xml_path.name} has no pred_label output (exported without a thresholding post-processor); "
                "pass a threshold (--threshold) for its raw scores."
            )
            raise EdgeModelError(msg)
        self.threshold = threshold
        self.export_precision = _rt_info(self.model, "precision") or "unknown (not exported by kd_ext)"
        config = {
            "INFERENCE_PRECISION_HINT": precision_hint,
            "PERFORMANCE_HINT": mode.upper(),
        }
        try:
            self.compiled = self.core.compile_model(self.model, device, config)
        except RuntimeError as error:
            msg = f"OpenVINO could not compile {self.xml_path} for {device} with {config}: {openvino_message(error)}"
            raise EdgeModelError(msg) from error
        self.precision_hint = precision_hint
        used = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.inference_precision = used.to_string() if hasattr(used, "to_string") else str(used)
        optimal = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.num_requests = max(1, num_requests or optimal)
        self._request: ov.InferRequest | None = None

    def _read(self, verify_weights: bool) -> ov.Model:
        if self.xml_path.suffix != ".xml":
            msg = f"Expected an OpenVINO IR .xml file, got '{self.xml_path}'."
            raise EdgeModelError(msg)
        if not self.xml_path.is_file():
            msg = f"Model file not found: {self.xml_path}"
            raise EdgeModelError(msg)
        if not self.bin_path.is_file():
            msg = (
                f"Weights file {self.bin_path.name} is missing next to {self.xml_path.name}; an IR is a pair of "
                ".xml and .bin files with the same name from the same export."
            )
            raise EdgeModelError(msg)
        try:
            model = self.core.read_model(self.xml_path, self.bin_path)
        except RuntimeError as error:
            msg = (
                f"Could not read the IR {self.xml_path} with weights {self.bin_path.name} (corrupt file, or .xml and "
                f".bin from different exports?): {openvino_message(error)}"
            )
            raise EdgeModelError(msg) from error
        expected = _rt_info(model, CHECKSUM_KEY)
        if verify_weights and expected is not None and file_sha256(self.bin_path) != expected:
            msg = (
                f"{self.bin_path.name} does not belong to {self.xml_path.name}: its checksum differs from the one "
                "recorded at export. Copy the .xml and .bin of the same export together."
            )
            raise EdgeModelError(msg)
        fold_constant_nan_checks(model)
        return model

    def _read_tail(self) -> AnomalyTail | None:
        """The anomaly-map tail of a features IR (``None`` for a standard IR)."""
        text = _rt_info(self.model, TAIL_KEY)
        if text is None:
            return None
        try:
            tail = AnomalyTail.from_json(text)
        except ValueError as error:
            msg = f"{self.xml_path.name}: {error}"
            raise EdgeModelError(msg) from error
        from kd_ext.kernels import native_available  # noqa: PLC0415 - only features IRs need the compiled kernels

        if not native_available():
            msg = (
                f"{self.xml_path.name} is a features IR whose anomaly-map tail runs in kd_ext's compiled kernels, "
                "but kd_ext._native is not importable here. Install a kd_ext wheel built for this platform, or "
                "export the model with mode='standard'."
            )
            raise EdgeModelError(msg)
        if self.task is not None:
            msg = f"{self.xml_path.name} is a single-task features IR: drop --task."
            raise EdgeModelError(msg)
        return tail

    def _check_outputs(self) -> set[str]:
        """Output field names (without the task prefix) this IR provides for the chosen task."""
        names = {name for output in self.model.outputs for name in output.get_names()}
        if self.tail is not None:
            missing = sorted(set(self.tail.feature_names) - names)
            if missing:
                msg = f"{self.xml_path.name} lacks the feature outputs {missing} its anomaly tail reads; re-export it."
                raise EdgeModelError(msg)
            return set(OUTPUT_FIELDS if self.tail.thresholds else REQUIRED_OUTPUTS)
        tasks = tasks_of(names)
        if self.task is not None and self.task not in tasks:
            msg = f"{self.xml_path.name} has no task '{self.task}'; " + (
                f"its tasks are {tasks}." if tasks else "it is a single-task IR: drop --task."
            )
            raise EdgeModelError(msg)
        if self.task is None and tasks and "pred_score" not in names:
            msg = f"{self.xml_path.name} is a multi-task IR with tasks {tasks}: choose one with task= / --task."
            raise EdgeModelError(msg)
        fields = {name.removeprefix(self.output_prefix) for name in names if name.startswith(self.output_prefix)}
        missing = [name for name in REQUIRED_OUTPUTS if name not in fields]
        if missing:
            msg = (
                f"{self.xml_path.name} is not an anomaly-detection IR: outputs {sorted(names) or 'unnamed'} lack "
                f"{missing}. Export the model with anomalib (`anomalib export --export_type openvino`) or "
                "kd_ext.export.export_openvino."
            )
            raise EdgeModelError(msg)
        return fields

    def _check_input(self, image_size: tuple[int, int]) -> tuple[int | None, tuple[int, ...]]:
        """Batch size (``None``: dynamic) and input size: ``(H, W)`` of images, ``(L,)`` of series.

        Sets :attr:`input_kind` and :attr:`channels` for a series IR.
        """
        if len(self.model.inputs) != 1:
            msg = f"{self.xml_path.name} has {len(self.model.inputs)} inputs; an anomaly IR takes one image batch."
            raise EdgeModelError(msg)
        shape = self.model.input(0).get_partial_shape()
        rank = None if shape.rank.is_dynamic else shape.rank.get_length()
        batch = shape[0].get_length() if rank and shape[0].is_static else None
        if rank == 3 and shape[1].is_static and shape[2].is_static:
            self.input_kind, self.channels = SERIES, shape[1].get_length()
            return batch, (shape[2].get_length(),)
        if rank == 3:
            msg = (
                f"{self.xml_path.name} takes series {shape} with a dynamic channel count or length; export the 1-D "
                "model with its training length (SignalKD exports [N, 1, L])."
            )
            raise EdgeModelError(msg)
        if rank != 4 or (shape[1].is_static and shape[1].get_length() != 3):
            msg = f"{self.xml_path.name} takes input {shape}; expected images [N, 3, H, W] or series [N, C, L]."
            raise EdgeModelError(msg)
        if shape[2].is_static and shape[3].is_static:
            return batch, (shape[2].get_length(), shape[3].get_length())
        return batch, image_size

    def check_source(self, source: str | Path, kind: str | None = None) -> None:
        """Refuse what this IR cannot score: a folder of images for a series IR, a series file for an image IR.

        Args:
            source: What is to be scored.
            kind: :data:`IMAGE` or :data:`SERIES`; ``None``: a folder holds images, a file series (a missing path is
                left to the reader, which says it is missing).

        Raises:
            EdgeInputError: If ``source`` is of the other kind, naming it and the fix.
        """
        source = Path(source)
        shown = text_name(source)
        if kind is None:
            kind = IMAGE if source.is_dir() else SERIES if source.is_file() else self.input_kind
        if kind == self.input_kind:
            return
        if self.input_kind == SERIES:
            msg = (
                f"{self.xml_path.name} scores series [N, {self.channels}, {self.input_size[0]}], not images: pass a "
                f"series file (UCR format), not the folder {shown}, or an image model's IR."
            )
        else:
            msg = (
                f"{self.xml_path.name} scores images [N, 3, H, W], not series: pass a folder of images, not {shown}, "
                "or score the series with a 1-D model's IR (e.g. SignalKD's)."
            )
        raise EdgeInputError(msg)

    def describe(self) -> dict[str, Any]:
        """What was loaded and how it runs (for reports).

        Returns:
            dict: Paths, export precision, inference precision, threshold source, input kind and size, requests.
        """
        return {
            "model": str(self.xml_path),
            "task": self.task,
            "input_kind": self.input_kind,
            "export_precision": self.export_precision,
            "precision_hint": self.precision_hint,
            "inference_precision": self.inference_precision,
            "threshold": self.threshold if self.threshold is not None else "IR (0.5 on normalised scores)",
            "input_size": list(self.input_size),
            "num_requests": self.num_requests,
            "outputs": sorted(self.output_names & set(OUTPUT_FIELDS)),
            "anomaly_tail": "IR" if self.tail is None else "kd_ext.kernels (native) + numpy",
        }

    def _check_batch(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """Validate a batch and, for an IR with a static batch, pad a short one by repeating its last image.

        Returns:
            tuple: ``(images to infer, number of real images)``; outputs past that number are padding.
        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        expected = (self.channels, *self.input_size)
        if images.ndim != len(expected) + 1 or tuple(images.shape[1:]) != expected:
            if self.input_kind == SERIES:
                msg = (
                    f"Expected float32 series [N, {self.channels}, {self.input_size[0]}], got {images.shape}; use "
                    "kd_ext.edge.series.load_series to read and preprocess a series file."
                )
            else:
                msg = (
                    f"Expected float32 images [N, 3, {self.input_size[0]}, {self.input_size[1]}] in [0, 1], got "
                    f"{images.shape}; use kd_ext.edge.load_image to read and resize files."
                )
            raise EdgeInputError(msg)
        count = images.shape[0]
        if count == 0:
            msg = f"Got an empty batch; pass at least one {self.input_kind}."
            raise EdgeInputError(msg)
        if self.batch_size is not None and count > self.batch_size:
            msg = (
                f"{self.xml_path.name} has a static batch of {self.batch_size}; got {count} images. Pass at most "
                f"{self.batch_size} images per batch."
            )
            raise EdgeInputError(msg)
        if self.batch_size is not None and count < self.batch_size:
            padding = np.repeat(images[-1:], self.batch_size - count, axis=0)
            images = np.ascontiguousarray(np.concatenate([images, padding]))
        return images, count

    def _prediction(self, outputs: dict[str, np.ndarray], count: int) -> Prediction:
        outputs = {name: value[:count] if value.ndim else value for name, value in outputs.items()}
        if self.tail is not None:
            outputs = run_tail(self.tail, {name: np.ascontiguousarray(value) for name, value in outputs.items()})
        score = outputs["pred_score"].reshape(-1).astype(np.float32)
        anomaly_map = outputs["anomaly_map"].astype(np.float32)
        spatial = 1 if self.input_kind == SERIES else 2
        anomaly_map = anomaly_map.reshape(anomaly_map.shape[0], *anomaly_map.shape[-spatial:])
        if self.threshold is not None or "pred_label" not in outputs:
            label = score > self.threshold
        else:
            label = outputs["pred_label"].reshape(-1).astype(bool)
        if self.threshold is not None or "pred_mask" not in outputs:
            threshold = 0.5 if self.threshold is None else self.threshold
            mask = anomaly_map > threshold
        else:
            mask = outputs["pred_mask"].reshape(anomaly_map.shape).astype(bool)
        return Prediction(pred_score=score, pred_label=label, anomaly_map=anomaly_map, pred_mask=mask)

    def _outputs(self, request: ov.InferRequest) -> dict[str, np.ndarray]:
        outputs: dict[str, np.ndarray] = {}
        wanted = set(OUTPUT_FIELDS) if self.tail is None else set(self.tail.feature_names)
        for index, port in enumerate(self.compiled.outputs):
            for name in port.get_names():
                field = name.removeprefix(self.output_prefix) if name.startswith(self.output_prefix) else None
                if field in wanted:
                    outputs[field] = np.array(request.get_output_tensor(index).data, copy=True)
        return outputs

    def predict(self, images: np.ndarray) -> Prediction:
        """Score one batch synchronously.

        Args:
            images: ``float32`` ``[N, 3, H, W]`` RGB in ``[0, 1]`` at :attr:`input_size`, or for a series IR
                preprocessed ``[N, C, L]`` series (for an IR with a static batch, at most that many; a shorter batch
                is padded and the padding's outputs dropped).

        Returns:
            Prediction: Scores, labels, maps and masks of the ``N`` images (series).
        """
        images, count = self._check_batch(images)
        if self._request is None:
            self._request = self.compiled.create_infer_request()
        self._request.infer({0: images})
        return self._prediction(self._outputs(self._request), count)

    def iter_predict(self, batches: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, Prediction]]:
        """Score batches on :attr:`num_requests` asynchronous infer requests, yielding results in input order.

        The requests are used in turn: a batch goes to the request that finished longest ago, after that request's
        previous result has been read and yielded. Reading the next batch (the caller's iterator) overlaps with
        inference of the previous ones. No Python code runs on OpenVINO's threads (no completion callbacks), so
        garbage collection never destroys OpenVINO objects from inside OpenVINO's own threads. With a static batch
        IR, a short batch (typically the last) is padded as in :meth:`predict`.

        Args:
            batches: ``(key, images)`` pairs; ``key`` is handed back with the batch's prediction.

        Yields:
            tuple: ``(key, Prediction)`` in the order the batches came.
        """
        requests = [self.compiled.create_infer_request() for _ in range(self.num_requests)]
        in_flight: deque[tuple[ov.InferRequest, Any, int]] = deque()

        def finish_oldest() -> tuple[Any, Prediction]:
            request, key, count = in_flight.popleft()
            request.wait()
            return key, self._prediction(self._outputs(request), count)

        try:
            for index, (key, images) in enumerate(batches):
                checked, count = self._check_batch(images)
                if len(in_flight) == len(requests):
                    yield finish_oldest()
                request = requests[index % len(requests)]
                request.start_async({0: checked})
                in_flight.append((request, key, count))
            while in_flight:
                yield finish_oldest()
        finally:
            for request, _, _ in in_flight:  # the caller stopped early or a batch was refused: let requests finish
                request.wait()
