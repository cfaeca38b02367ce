"""Find unreadable image files before a run starts, and name them.

anomalib reads images lazily inside its data loaders; a corrupt file surfaces mid-run as a bare
``OSError: Truncated File Read`` that does not say which file is broken. kd_ext models check every
image of the data loaders they are about to consume and fail first, naming each bad file.
"""

from collections.abc import Iterable
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader


def unreadable_images(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """Decode each image fully and collect those that fail.

    Args:
        paths: Image files.

    Returns:
        list[tuple[str, str]]: ``(path, reason)`` for every file that is missing or cannot be decoded.
    """
    failures = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError) as error:  # PIL raises all three for broken files
            failures.append((str(path), f"{type(error).__name__}: {error}"))
    return failures


def dataset_image_paths(dataset: object) -> list[str]:
    """Image paths of an anomalib dataset (``samples.image_path``) or ``PredictDataset`` (``image_filenames``)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None and "image_path" in getattr(samples, "columns", ()):
        return [str(path) for path in samples["image_path"]]
    return [str(path) for path in getattr(dataset, "image_filenames", [])]


def check_dataloader_images(dataloaders: DataLoader | Iterable[DataLoader] | None) -> None:
    """Raise if any image of the given data loaders is missing or corrupt.

    Args:
        dataloaders: A data loader, several, or ``None``.

    Raises:
        ValueError: Listing every unreadable file and why.
    """
    if dataloaders is None:
        return
    loaders = [dataloaders] if isinstance(dataloaders, DataLoader) else list(dataloaders)
    paths = [path for loader in loaders for path in dataset_image_paths(loader.dataset)]
    failures = unreadable_images(paths)
    if failures:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in failures[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        msg = f"{len(failures)} of {len(paths)} images cannot be read; fix or remove them:\n{listed}{more}"
        raise ValueError(msg)
