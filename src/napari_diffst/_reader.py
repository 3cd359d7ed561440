"""npe2 reader hook: ``get_reader(path)`` returns a reader for paths napari-diffst understands.

The returned callable gives napari LayerDataTuples (H&E image + spots Points, both in µm; see
:mod:`napari_diffst.layers`). ``get_reader`` never raises: anything it does not recognise (or any
error while looking) yields ``None`` so napari can try other readers.
"""
from __future__ import annotations

import os

__all__ = ["get_reader", "read_paths"]


def _as_list(path) -> list[str]:
    if isinstance(path, (str, bytes, os.PathLike)):
        return [os.fsdecode(path)]
    return [os.fsdecode(p) for p in path]


def get_reader(path):
    """Return :func:`read_paths` if every path is a format :func:`~napari_diffst.io.detect_format`
    recognises, else ``None``."""
    try:
        from .io.readers import detect_format

        paths = _as_list(path)
        if not paths:
            return None
        if all(detect_format(p) is not None for p in paths):
            return read_paths
    except Exception:
        return None
    return None


def read_paths(path, **kwargs) -> list[tuple]:
    """Read each path into a Sample and convert it to layer data (image + spots, in µm).

    Extra keyword arguments from napari/npe2 (``stack``) are accepted and ignored."""
    from .io.readers import read
    from .layers import sample_to_layer_data

    out: list[tuple] = []
    for p in _as_list(path):
        out.extend(sample_to_layer_data(read(p)))
    return out
