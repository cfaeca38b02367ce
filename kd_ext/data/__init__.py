"""Datamodules for data anomalib has no module for, following anomalib's ``AnomalibDataModule`` conventions.

Use them from anomalib's command line by dotted path, e.g. ``--data kd_ext.data.VideoFrames``.
"""

from .video_frames import VideoFrames, VideoFramesDataset, make_video_frames_dataset

__all__ = ["VideoFrames", "VideoFramesDataset", "make_video_frames_dataset"]

from .ucr import SeriesBatch, SeriesImage, UCRSeries, UCRSeriesDataset

__all__ += ["SeriesBatch", "SeriesImage", "UCRSeries", "UCRSeriesDataset"]
