"""Frame-wise image models on anomalib's clip-based video datamodules (``UCSDped``, ``Avenue``, ``ShanghaiTech``).

anomalib's video datasets return clips: ``VideoBatch.image`` is ``[B, T, C, H, W]`` (``[B, C, H, W]`` when
``clip_length_in_frames`` is 1). Unless ``target_frame`` is ``"all"``, each clip carries the ground truth of one
frame only, its *target* frame (first, middle or last; anomalib's ``AnomalibVideoDataset._select_targets``), and
anomalib's video evaluation expects one score per clip (``pred_score [B]``, ``pred_label [B]``) and the target
frame's map (``anomaly_map [B, 1, H, W]`` against ``gt_mask [B, H, W]``).

A model that scores single images uses clips this way:

- training and calibration on normal clips: every frame is one image (:func:`clip_frames` flattens the clips into
  the batch);
- validation, test and prediction: the clip is scored by its target frame (:func:`target_frames`), the frame whose
  label and mask the dataset returned, so the score, label and map line up with anomalib's ground truth.

:class:`ClipVisualizer` draws each scored clip as its target frame (anomalib's ``ImageVisualizer`` reads image files,
which clips do not name).

``target_frame="all"`` labels every frame of a clip, which anomalib's ``VideoBatch`` cannot hold predictions for
(its predicted labels are one per clip): such datasets are refused with a message naming
:class:`kd_ext.data.VideoFrames`, kd_ext's frame-folder datamodule that scores every frame.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from anomalib.data import ImageItem, VideoBatch
from anomalib.data.datasets.base.video import AnomalibVideoDataset, VideoTargetFrame
from anomalib.visualization import ImageVisualizer
from anomalib.visualization.image.item_visualizer import visualize_image_item
from torch.utils.data import DataLoader, Dataset

CLIP_DIMS = 5
"""Dimensions of a batch of clips, ``[B, T, C, H, W]``."""


def clip_frames(images: torch.Tensor) -> torch.Tensor:
    """Every frame of a batch of clips as one image: ``[B, T, C, H, W] -> [B * T, C, H, W]`` (images unchanged).

    Args:
        images: Images ``[B, C, H, W]`` or clips ``[B, T, C, H, W]``.

    Returns:
        torch.Tensor: Images ``[N, C, H, W]``.
    """
    return images.flatten(0, 1) if images.ndim == CLIP_DIMS else images


def target_frame_index(dataset: Dataset | None) -> int | None:
    """Index within a clip of the frame whose ground truth ``dataset`` returns, as anomalib selects it.

    Args:
        dataset: A dataset of the evaluation loader.

    Returns:
        int | None: ``0`` (first), ``-1`` (last) or ``T // 2`` (middle); ``None`` when ``dataset`` is not one of
        anomalib's video datasets or its clips are single frames.

    Raises:
        ValueError: If the dataset labels every frame of its clips (``target_frame="all"``).
    """
    if not isinstance(dataset, AnomalibVideoDataset) or dataset.clip_length_in_frames <= 1:
        return None
    target = VideoTargetFrame(dataset.target_frame)
    if target is VideoTargetFrame.ALL:
        msg = (
            "anomalib's video datamodule is set to target_frame='all' (a label per frame of each clip), but anomalib's "
            "VideoBatch holds one predicted label per clip, so kd_ext's frame-wise models cannot be scored on it. "
            "Use --data.target_frame last (or first, mid) to score each clip by that frame, or "
            "--data.clip_length_in_frames 1, or kd_ext.data.VideoFrames (every frame one image, frame-level AUROC)."
        )
        raise ValueError(msg)
    return {VideoTargetFrame.FIRST: 0, VideoTargetFrame.LAST: -1}.get(target, dataset.clip_length_in_frames // 2)


def loaders_target_frame(loaders: DataLoader | Iterable[DataLoader] | None) -> int | None:
    """The target-frame index of the clips that evaluation loaders give (see :func:`target_frame_index`).

    Args:
        loaders: The trainer's validation, test or predict loader(s).

    Returns:
        int | None: The index, or ``None`` without clip datasets.

    Raises:
        ValueError: If the loaders' clip datasets select different target frames, or one selects all frames.
    """
    if loaders is None:
        return None
    loaders = [loaders] if isinstance(loaders, DataLoader) else list(loaders)
    targets = {target_frame_index(getattr(loader, "dataset", None)) for loader in loaders} - {None}
    if len(targets) > 1:
        msg = "The evaluation loaders' video datasets pick different target frames; use one target_frame."
        raise ValueError(msg)
    return targets.pop() if targets else None


def target_frames(images: torch.Tensor, index: int | None) -> torch.Tensor:
    """The frame of each clip that the clip is scored by: ``[B, T, C, H, W] -> [B, C, H, W]`` (images unchanged).

    Args:
        images: Images ``[B, C, H, W]`` or clips ``[B, T, C, H, W]``.
        index: The target frame's index within a clip (:func:`loaders_target_frame`).

    Returns:
        torch.Tensor: Images ``[B, C, H, W]``.

    Raises:
        ValueError: If clips arrive without a known target frame (outside anomalib's video datamodules).
    """
    if images.ndim != CLIP_DIMS:
        return images
    if index is None:
        msg = (
            f"Got clips of shape {tuple(images.shape)} from a loader that is not one of anomalib's video datasets, "
            "so the frame their ground truth belongs to is unknown; evaluate with anomalib's video datamodule "
            "(UCSDped, Avenue, ShanghaiTech) or kd_ext.data.VideoFrames."
        )
        raise ValueError(msg)
    return images[:, index]


def scored_frames(batch: VideoBatch) -> Iterator[tuple[str, int, ImageItem]]:
    """Each scored clip of ``batch`` as its target frame: ``(clip source, frame index, image item)``.

    The item holds the frame's original pixels and the clip's ground truth and predictions.

    Args:
        batch: A clip batch after :func:`target_frames` scoring.

    Yields:
        tuple[str, int, ImageItem]: The clip's video path, the target frame's index in it, and the item.
    """
    size = len(batch.video_path)
    original = batch.original_image
    if original is not None:
        original = original.reshape(size, -1, *original.shape[-3:])[:, 0].float() / 255.0
    frames = batch.frames.reshape(size, -1)[:, 0] if batch.frames is not None else torch.arange(size)
    fields = ("gt_label", "gt_mask", "anomaly_map", "pred_score", "pred_label", "pred_mask")
    for index in range(size):
        values = {name: getattr(batch, name)[index] for name in fields if getattr(batch, name) is not None}
        image = original[index] if original is not None else batch.image[index]
        yield batch.video_path[index], int(frames[index]), ImageItem(image=image, **values)


class ClipVisualizer(ImageVisualizer):
    """anomalib's ``ImageVisualizer`` that also draws clips: each as its target frame, ``<video>/<frame>.png``.

    Image batches are drawn exactly as ``ImageVisualizer`` draws them; every argument is its.
    """

    def on_test_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Draw the batch's predictions (clips: one image per clip, under ``images/<video name>/``)."""
        if not isinstance(batch, VideoBatch):
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
            return
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        for video_path, frame, item in scored_frames(batch):
            image = visualize_image_item(
                item,
                fields=self.fields,
                overlay_fields=self.overlay_fields,
                field_size=self.field_size,
                fields_config=self.fields_config,
                overlay_fields_config=self.overlay_fields_config,
                text_config=self.text_config,
            )
            if image is not None:
                path = Path(self.output_dir) / Path(video_path).stem / f"{frame:06d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)


__all__ = [
    "ClipVisualizer",
    "clip_frames",
    "loaders_target_frame",
    "scored_frames",
    "target_frame_index",
    "target_frames",
]
