"""The compiled extension is built, importable and computes the right thing."""

import numpy as np
import pytest
import torch
from kornia.filters import get_gaussian_kernel1d

from kd_ext import _native


def test_build_info_reports_features() -> None:
    info = _native.build_info()
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["cuda"], bool)


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
