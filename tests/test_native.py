"""The compiled extension is built, importable and computes the right thing."""

from pathlib import Path

import numpy as np
import pytest
import torch
from kornia.filters import get_gaussian_kernel1d

from kd_ext import _native

REPO = Path(__file__).resolve().parents[1]


def test_build_info_reports_features() -> None:
    info = _native.build_info()
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["cuda"], bool)
    assert info["threads"] >= 1  # the CPU thread pool's size


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 4.0])
def test_gaussian_kernel_matches_kornia(sigma: float) -> None:
    taps = _native.gaussian_kernel_1d(sigma)
    size = 2 * int(4 * sigma + 0.5) + 1
    expected = get_gaussian_kernel1d(size, torch.tensor([[sigma]], dtype=torch.float64)).flatten().numpy()
    assert taps.dtype == np.float32
    assert taps.shape == (size,)
    np.testing.assert_allclose(taps, expected, atol=1e-7)
    assert taps.sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_gaussian_kernel_rejects_bad_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        _native.gaussian_kernel_1d(sigma)


@pytest.mark.parametrize("sigma", [1e12, 1e30])
def test_gaussian_kernel_rejects_a_radius_too_large_to_build(sigma: float) -> None:
    with pytest.raises(ValueError, match="use a smaller sigma"):
        _native.gaussian_kernel_1d(sigma)


def test_binding_pixel_cap_is_the_python_rule() -> None:
    from kd_ext.kernels import MAX_MAP_PIXELS

    assert _native.MAX_MAP_PIXELS == MAX_MAP_PIXELS


@pytest.mark.parametrize("size", [(5, 7), (16, 16), (33, 17)])
@pytest.mark.parametrize("sigma", [0.0, 0.3, 1.0, 1.124, 1.125, 3.874, 3.875, 4.0, 8.0])
def test_binding_radius_guard_agrees_with_validate_sigma(size: tuple[int, int], sigma: float) -> None:
    """The binding's memory-safety check refuses exactly what kernels.validate_sigma refuses."""
    from kd_ext.kernels import validate_sigma

    feats = [np.ones((1, 2, 3, 3), np.float32)]
    try:
        validate_sigma(sigma, size)
    except ValueError:
        with pytest.raises(ValueError, match="blur radius"):
            _native.anomaly_map(feats, feats, size[0], size[1], sigma=sigma)
    else:
        maps, _ = _native.anomaly_map(feats, feats, size[0], size[1], sigma=sigma)
        assert maps.shape == (1, 1, *size)


def test_version_is_written_once_in_pyproject() -> None:
    """CMake takes the version from scikit-build-core; kd_ext reads it from the installed metadata."""
    from importlib.metadata import version

    import kd_ext

    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert kd_ext.__version__ == version("kd_ext") == declared
    assert _native.__version__ == declared
    assert declared not in (REPO / "CMakeLists.txt").read_text()


def test_cmake_lists_every_source_of_csrc() -> None:
    """Explicit source lists (no glob): a new file under csrc/ must be added to CMakeLists.txt."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "GLOB" not in cmake
    sources = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "csrc").rglob("*") if p.suffix in {".cpp", ".cu"})
    assert sources, "no sources found"
    missing = [source for source in sources if source not in cmake]
    assert not missing, f"sources not listed in CMakeLists.txt: {missing}"


def test_kernels_import_and_run_without_torch() -> None:
    """kd_ext and kd_ext.kernels (native backend, numpy in and out) need no torch."""
    import subprocess
    import sys

    code = """
import sys
sys.modules.update(dict.fromkeys(("torch", "torchvision", "anomalib", "lightning")))  # None: import fails
import numpy as np
import kd_ext
from kd_ext import kernels
rng = np.random.default_rng(0)
t = [rng.standard_normal((2, 4, 8, 8), dtype=np.float32)]
s = [rng.standard_normal((2, 4, 8, 8), dtype=np.float32)]
maps, scores = kernels.anomaly_map_and_score(t, s, (32, 32), sigma=1.0, score="topk", top_k=3)
assert maps.shape == (2, 1, 32, 32) and scores.shape == (2,)
assert sys.modules["torch"] is None
print("ok", kd_ext.__version__)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")
