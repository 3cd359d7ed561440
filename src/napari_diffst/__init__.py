"""napari-diffst: histology-guided super-resolution of spatial transcriptomics (Diff-ST).

The package core (everything except ``_widgets``) is Qt-free and runs headless.
"""
from __future__ import annotations

try:  # pragma: no cover - set by setuptools-scm style builds
    from importlib.metadata import version as _version

    __version__ = _version("napari-diffst")
except Exception:  # pragma: no cover
    __version__ = "0.0.0+unknown"

from .errors import DiffSTError, DataFormatError

__all__ = ["__version__", "DiffSTError", "DataFormatError"]
