"""Shared fixtures: real data from ../shared/data (never bundled), small trained models."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("KD_EXT_DATA", REPO.parent / "shared" / "data"))
HAZELNUT_ROOT = DATA
MVTEC_ROOT = DATA / "mvtec_ad"


def _require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set KD_EXT_DATA to the folder described in shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def hazelnut_root() -> Path:
    """Root of the tiny real hazelnut set (MVTec AD layout, category ``hazelnut_toy``)."""
    _require(HAZELNUT_ROOT / "hazelnut_toy")
    return HAZELNUT_ROOT


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """Root of MVTec AD with the *bottle* category."""
    _require(MVTEC_ROOT / "bottle")
    return MVTEC_ROOT


@pytest.fixture
def hazelnut_datamodule(hazelnut_root: Path):
    from anomalib.data import MVTecAD

    return MVTecAD(root=hazelnut_root, category="hazelnut_toy", train_batch_size=8, eval_batch_size=8, num_workers=0)


@pytest.fixture
def tiny_folder(tmp_path: Path, hazelnut_root: Path) -> Path:
    """A 64x64 copy of 10 real hazelnut photos in anomalib's ``Folder`` layout (6 train, 2 + 2 test)."""
    from PIL import Image

    images = sorted((hazelnut_root / "hazelnut_toy" / "train" / "good").glob("*.png"))
    root = tmp_path / "tiny_folder"
    for folder, chosen in (("train/good", images[:6]), ("test/good", images[6:8]), ("test/bad", images[8:10])):
        (root / folder).mkdir(parents=True)
        for image in chosen:
            Image.open(image).resize((64, 64)).save(root / folder / image.name)
    return root


@pytest.fixture
def tiny_folder_datamodule(tiny_folder: Path):
    """A factory of fresh anomalib ``Folder`` datamodules over :func:`tiny_folder` (batch 3, no workers)."""
    from anomalib.data import Folder

    def build() -> Folder:
        return Folder(
            name="tiny",
            root=tiny_folder,
            normal_dir="train/good",
            abnormal_dir="test/bad",
            normal_test_dir="test/good",
            train_batch_size=3,
            eval_batch_size=3,
            num_workers=0,
        )

    return build
