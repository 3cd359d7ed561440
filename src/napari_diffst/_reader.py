"""npe2 reader hook: ``get_reader(path)`` returns a reader for paths napari-diffst understands.

The returned callable gives napari LayerDataTuples (H&E image + spots Points, both in µm; see
:mod:`napari_diffst.layer_data`). ``get_reader`` never raises: anything it does not recognise (or any
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
    """Return :func:`read_paths` if every path is an OME-Zarr image (gene maps written by napari-diffst or
    any NGFF image) or a format :func:`~napari_diffst.io.detect_format` recognises, else ``None``."""
    try:
        from .io.readers import detect_format
        from .io.writers import is_ome_zarr

        paths = _as_list(path)
        if not paths:
            return None
        if all(is_ome_zarr(p) or detect_format(p) is not None for p in paths):
            return read_paths
    except Exception:
        return None
    return None


def read_paths(path, **kwargs) -> list[tuple]:
    """Read each path into layer data in µm: a section → H&E image + spots; an OME-Zarr of gene maps → one
    layer per gene and per uncertainty channel (:func:`napari_diffst.layer_data.maps_layer_data`).

    Extra keyword arguments from napari/npe2 (``stack``) are accepted and ignored."""
    from .io.readers import read
    from .io.writers import is_ome_zarr
    from .layer_data import maps_layer_data, sample_to_layer_data

    out: list[tuple] = []
    for p in _as_list(path):
        out.extend(maps_layer_data(p) if is_ome_zarr(p) else sample_to_layer_data(read(p)))
    return out
