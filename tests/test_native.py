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
