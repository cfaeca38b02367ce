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
