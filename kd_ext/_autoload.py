"""Make ``anomalib`` see kd_ext's models without users importing kd_ext.

anomalib resolves ``--model NAME`` and ``get_model("NAME")`` among the imported subclasses of
``AnomalibModule`` and has no plugin entry points. The ``kd_ext_autoload.pth`` file installed into
site-packages imports this module (installed there as the top-level module ``_kd_ext_autoload``, so
that the kd_ext package itself is not imported) at interpreter start. It only places a finder on
``sys.meta_path`` that waits for ``anomalib.models`` to be imported; once that module has run, it
imports ``kd_ext.models`` so that the kd_ext classes are registered. Processes that never import
anomalib pay only for reading this file: it imports nothing (``os`` and ``sys`` are loaded by the
interpreter before any ``.pth`` file runs).

Set ``KD_EXT_NO_AUTOLOAD=1`` to switch the hook off.
"""

import os
import sys

TRIGGER_MODULE = "anomalib.models"
MODELS_MODULE = "kd_ext.models"
DISABLE_VARIABLE = "KD_EXT_NO_AUTOLOAD"


class _RegisterAfterExec:
    """Loader proxy: runs the real loader, then imports kd_ext's models."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)

    def create_module(self, spec: object) -> object:
        return self._loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)
        try:
            __import__(MODELS_MODULE)
        except Exception as error:
            sys.stderr.write(f"kd_ext: models not registered with anomalib ({type(error).__name__}: {error})\n")


class AnomalibModelsFinder:
    """Meta-path finder that reacts only to the import of ``anomalib.models``."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        """Return the real spec of ``anomalib.models`` with a registering loader, else ``None``."""
        if fullname != TRIGGER_MODULE:
            return None
        uninstall()
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def uninstall() -> None:
    """Remove every kd_ext finder from ``sys.meta_path``."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, AnomalibModelsFinder)]


def install() -> None:
    """Place the finder on ``sys.meta_path`` unless switched off or anomalib is already imported."""
    if os.environ.get(DISABLE_VARIABLE, "") not in {"", "0"}:
        return
    if TRIGGER_MODULE in sys.modules:
        __import__(MODELS_MODULE)
        return
    uninstall()
    sys.meta_path.insert(0, AnomalibModelsFinder())


install()
