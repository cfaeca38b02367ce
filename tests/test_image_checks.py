"""Unreadable images are named before a run starts."""

from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from kd_ext.models.image_checks import check_dataloader_images, dataset_image_paths, unreadable_images


class _PredictLike:
    def __init__(self, paths: list[Path]) -> None:
        self.image_filenames = paths

    def __len__(self) -> int:
        return len(self.image_filenames)

    def __getitem__(self, index: int) -> Path:
        return self.image_filenames[index]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 30), "red").save(tmp_path / "good.png")
    Image.new("L", (40, 30)).save(tmp_path / "gray.png")
    (tmp_path / "empty.png").write_bytes(b"")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    return tmp_path


def test_unreadable_images_finds_broken_and_missing_files(folder: Path) -> None:
    paths = [*sorted(folder.glob("*.png")), folder / "missing.png"]
    failures = dict(unreadable_images(paths))
    assert set(failures) == {str(folder / name) for name in ("empty.png", "truncated.png", "missing.png")}
    assert "FileNotFoundError" in failures[str(folder / "missing.png")]


def test_check_dataloader_images_names_every_bad_file(folder: Path) -> None:
    loader = DataLoader(_PredictLike(sorted(folder.glob("*.png"))))
    with pytest.raises(ValueError, match=r"2 of 4 images cannot be read") as error:
        check_dataloader_images([loader])
    assert "empty.png" in str(error.value)
    assert "truncated.png" in str(error.value)
    assert "good.png" not in str(error.value)


def test_check_passes_on_readable_real_images(hazelnut_datamodule) -> None:
    hazelnut_datamodule.setup()
    loader = hazelnut_datamodule.train_dataloader()
    assert len(dataset_image_paths(loader.dataset)) == len(loader.dataset) > 0
    check_dataloader_images(loader)
    check_dataloader_images(None)
