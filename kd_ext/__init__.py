"""kd_ext: knowledge-distillation anomaly detection for anomalib.

Importing ``kd_ext`` is cheap: models, kernels and the edge runtime live in sub-packages that are
imported on demand (``kd_ext.models``, ``kd_ext.kernels``, ``kd_ext.edge``). ``kd_ext.__version__`` is
the installed distribution's version (written once, in ``pyproject.toml``), read on first access.
"""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """Return ``__version__`` from the installed distribution's metadata (looked up on first use).

    Args:
        name: Attribute name.

    Returns:
        The version string (``"0+unknown"`` for a source tree that was never installed).

    Raises:
        AttributeError: For any other name.
    """
    if name != "__version__":
        msg = f"module 'kd_ext' has no attribute {name!r}"
        raise AttributeError(msg)
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415 - costs ~50 ms, only on use

    try:
        value = version("kd_ext")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        value = "0+unknown"
    globals()["__version__"] = value
    return value
