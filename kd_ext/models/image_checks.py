"""Find unreadable image files before a run starts, and name them.

anomalib reads images lazily inside its data loaders; a corrupt file surfaces mid-run as a bare
``OSError: Truncated File Read`` that does not say which file is broken. kd_ext models check every
image of the data loaders they are about to consume and fail first, naming each bad file: before
training, that includes the validation and test images the run will read after its first epoch.
"""

from collections.abc import Iterable
from pathlib import Path

from anomalib.data.datasets.base.video import AnomalibVideoDataset
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from kd_ext.edge.images import list_images
from kd_ext.image_input import check_value_range


def unreadable_images(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """Decode each image fully and collect those that fail, or that have no defined value range (``F`` mode).

    Args:
        paths: Image files.

    Returns:
        list[tuple[str, str]]: ``(path, reason)`` for every file that is missing, cannot be decoded or has
        no defined value range.
    """
    failures = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                check_value_range(image)  # read later by kd_ext's rule, which refuses floating-point images
        except Image.DecompressionBombError as error:
            reason = (
                f"too large for Pillow ({error}); downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS "
                "if it is trusted"
            )
            failures.append((str(path), reason))
        except (OSError, SyntaxError, ValueError) as error:  # PIL raises all three for broken files
            failures.append((str(path), f"{type(error).__name__}: {error}"))
    return failures


def dataset_image_paths(dataset: object) -> list[str]:
    """Image paths of an anomalib dataset (``samples.image_path``) or ``PredictDataset`` (``image_filenames``).

    In anomalib's video datasets a sample is a clip source: a folder of frames (UCSD Ped's ``Train001/``,
    ShanghaiTech's test frames) stands for the image files in it, and a video file (Avenue's ``.avi``), which is
    decoded as video and not as an image, for none.
    """
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in getattr(samples, "columns", ()):
        return [str(path) for path in getattr(dataset, "image_filenames", [])]
    if not isinstance(dataset, AnomalibVideoDataset):
        return [str(path) for path in samples["image_path"]]
    folders = [Path(path) for path in samples["image_path"] if Path(path).is_dir()]
    return [str(frame) for folder in folders for frame in list_images(folder)]


def check_dataloader_images(dataloaders: DataLoader | Iterable[DataLoader | Dataset] | None) -> None:
    """Raise if any image of the given data loaders (or datasets) is missing or corrupt.

    Each file is decoded once, even when several loaders share it (a validation split taken from the test set).

    Args:
        dataloaders: A data loader, several data loaders or datasets, or ``None``.

    Raises:
        ValueError: Listing every unreadable file and why.
    """
    if dataloaders is None:
        return
    sources = [dataloaders] if isinstance(dataloaders, DataLoader) else list(dataloaders)
    datasets = [source.dataset if isinstance(source, DataLoader) else source for source in sources]
    paths = [path for dataset in datasets if dataset is not None for path in dataset_image_paths(dataset)]
    paths = list(dict.fromkeys(paths))
    failures = unreadable_images(paths)
    if failures:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in failures[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        msg = f"{len(failures)} of {len(paths)} images cannot be read; fix or remove them:\n{listed}{more}"
        raise ValueError(msg)


def evaluation_datasets(trainer: object) -> list[Dataset]:
    """The validation and test datasets a training run will read later (its datamodule's, or its loaders').

    Args:
        trainer: The Lightning trainer about to train.

    Returns:
        list[Dataset]: Validation and test datasets that exist at this point.
    """
    datamodule = getattr(trainer, "datamodule", None)
    datasets = [getattr(datamodule, name, None) for name in ("val_data", "test_data")]
    loaders = getattr(trainer, "val_dataloaders", None)
    if loaders is not None:
        datasets += [loader.dataset for loader in ([loaders] if isinstance(loaders, DataLoader) else loaders)]
    return [dataset for dataset in datasets if dataset is not None]
