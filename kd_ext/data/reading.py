"""kd_ext's image-reading rule (:mod:`kd_ext.image_input`) in anomalib's datasets.

anomalib's image datasets (``MVTecAD``, ``Folder``, ``PredictDataset``, ...) read every file with
``anomalib.data.utils.read_image``, which converts to 8-bit RGB with Pillow: a 16-bit image saturates (``4112``
becomes ``255``). kd_ext's edge runtime reads files by :mod:`kd_ext.image_input`, so a model trained or tested
through anomalib's reader would score a 16-bit image differently in ``anomalib test`` and ``kd-ext infer``.

:func:`read_image` is a drop-in for anomalib's ``read_image`` that follows kd_ext's rule: for 8-bit files it
returns the same bits, 16-bit files are scaled by ``1/65535``, and floating-point files are refused.
:func:`kd_ext_image_reading` puts it in place of the name anomalib's datasets call, for as long as it is
entered (reentrant; the original comes back when the outermost entry exits). kd_ext's image models start it in
``setup`` and stop it in ``teardown`` of every trainer run, so ``anomalib train/test/predict --model BiDirMSKD
--data Folder ...`` reads images as ``kd-ext infer`` does; kd_ext's own datamodules enter it for each sample,
whatever the model.

The swap is process-wide: data-loader workers started by ``fork`` (Linux's default) inherit it; workers
started by ``spawn`` or ``forkserver`` read anomalib's datasets with anomalib's reader unless the dataset
enters :func:`kd_ext_image_reading` itself, as :class:`kd_ext.data.VideoFramesDataset` does.

Example:
    >>> from kd_ext.data.reading import kd_ext_image_reading
    >>> with kd_ext_image_reading():  # doctest: +SKIP
    ...     item = folder_datamodule.test_data[0]  # 16-bit files scaled, not saturated
"""

import importlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils import image as anomalib_image
from torchvision.tv_tensors import Image as ImageTensor

from kd_ext.image_input import read_rgb

ANOMALIB_READER_MODULES = (
    "anomalib.data.datasets.base.image",
    "anomalib.data.predict",
    "anomalib.data.utils.synthetic",
    "anomalib.data.datasets.image.mvtec_loco",
    "anomalib.data.datasets.video.ucsd_ped",
    "anomalib.data.datasets.video.shanghaitech",
)
"""anomalib modules whose datasets read images through their module-level name ``read_image``."""

ANOMALIB_READ_IMAGE = anomalib_image.read_image

_lock = threading.Lock()
_depth = 0


def read_image(path: str | Path, as_tensor: bool = False) -> torch.Tensor | np.ndarray:
    """Read an image by kd_ext's rule, with the signature of anomalib's ``read_image``.

    Args:
        path: Image file.
        as_tensor: Return a torchvision ``Image`` tensor ``[3, H, W]`` (as anomalib's datasets ask for) instead
            of an array ``[H, W, 3]``.

    Returns:
        torch.Tensor | np.ndarray: ``float32`` RGB in ``[0, 1]`` (see :func:`kd_ext.image_input.rgb_values`).

    Raises:
        kd_ext.image_input.ImageValueRangeError: If the image has no defined value range.
    """
    values = read_rgb(path)
    return ImageTensor(torch.from_numpy(values.transpose(2, 0, 1).copy())) if as_tensor else values


def _install(reader: object) -> None:
    """Bind ``read_image`` to ``reader`` in every module of :data:`ANOMALIB_READER_MODULES`."""
    for name in ANOMALIB_READER_MODULES:
        importlib.import_module(name).read_image = reader


def start_kd_ext_image_reading() -> None:
    """Make anomalib's datasets read with :func:`read_image` until a matching :func:`stop_kd_ext_image_reading`.

    Entries are counted: anomalib's reader comes back when every start has been stopped.
    """
    global _depth  # noqa: PLW0603 - one process-wide swap, counted so that nested entries keep it
    with _lock:
        if _depth == 0:
            _install(read_image)
        _depth += 1


def stop_kd_ext_image_reading() -> None:
    """End one :func:`start_kd_ext_image_reading`; the last one puts anomalib's reader back."""
    global _depth  # noqa: PLW0603
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth == 0:
            _install(ANOMALIB_READ_IMAGE)


@contextmanager
def kd_ext_image_reading() -> Iterator[None]:
    """Inside this context anomalib's datasets read images with :func:`read_image` (see the module).

    Yields:
        None
    """
    start_kd_ext_image_reading()
    try:
        yield
    finally:
        stop_kd_ext_image_reading()


__all__ = [
    "ANOMALIB_READER_MODULES",
    "ANOMALIB_READ_IMAGE",
    "kd_ext_image_reading",
    "read_image",
    "start_kd_ext_image_reading",
    "stop_kd_ext_image_reading",
]
