"""Readers: spatial-transcriptomics outputs and histology images -> :class:`~napari_diffst.data.sample.Sample`.

One module per format, each small and with its own file-name constants, behind one :func:`read`:

* :mod:`.visium` — **10x Visium** Space Ranger ``outs`` (v1 ``tissue_positions_list.csv`` / v2+
  ``tissue_positions.csv``), counts from ``filtered_feature_bc_matrix.h5`` or the MTX folder;
* :mod:`.visium_hd` — **10x Visium HD** ``binned_outputs/square_XXXum`` folders;
* :mod:`.legacy_st` — **legacy Spatial Transcriptomics** (her2st / ST spot detector / STUtility layouts);
* :mod:`.h5ad` — **AnnData** ``.h5ad`` with ``obsm['spatial']``;
* :mod:`.images` — a **histology image** alone (TIFF/OME-TIFF/SVS/JPEG/PNG).

A format module defines ``FORMAT`` (the key :func:`detect_format` returns), ``DESCRIPTION``,
``detect(path) -> bool`` (names, folder structure and at most a table header; never raises) and
``read(path, **kwargs) -> Sample``. **Adding a format = one new module + one line in
:data:`FORMAT_MODULES`.** Shared helpers live in :mod:`._common`.

Coordinate rules (the same for every reader):

* ``adata.obsm['spatial']`` is (x, y) = (column, row) in **full-resolution image pixels** and is never
  rescaled; a lower-resolution image (Visium hires/lowres PNG, a thumbnail) carries
  ``HistologyImage.fullres_per_px`` instead.
* ``Sample.um_per_px`` is the size of one full-resolution pixel. Metadata wins where it exists
  (``microns_per_pixel``, ``spot_diameter_fullres``); otherwise it is fitted from the spot lattice:
  a least-squares affine from array indices (×pitch in µm) to pixel coordinates, whose determinant
  gives px/µm. That fit is unbiased under spot-detection jitter, unlike the median
  nearest-neighbour distance (see ``docs/formats.md``).

Every problem with the input raises :class:`~napari_diffst.errors.DataFormatError` naming the file,
the problem and the expected form.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..data.sample import Sample
from ..errors import DataFormatError
from . import h5ad, images, legacy_st, merscope, spatialdata, visium, visium_hd, xenium
from ._common import SCALE_TOL  # noqa: F401  (re-exported)
from .h5ad import read_h5ad
from .images import read_image
from .legacy_st import SPOT_COLUMN_ALIASES, read_legacy_st
from .visium import VISIUM_SPOT_DIAMETER_FULLRES_UM, read_visium
from .visium_hd import read_visium_hd

__all__ = [
    "read",
    "detect_format",
    "read_visium",
    "read_visium_hd",
    "read_legacy_st",
    "read_h5ad",
    "read_image",
    "FORMATS",
    "FORMAT_MODULES",
    "SPOT_COLUMN_ALIASES",
    "VISIUM_SPOT_DIAMETER_FULLRES_UM",
]

#: The format modules, in detection order (the first whose ``detect`` accepts a path reads it).
#: More specific layouts come first: an HD bin folder is also a Space Ranger outs folder, and images
#: are the fallback for single files.
FORMAT_MODULES = (xenium, merscope, spatialdata, visium_hd, visium, legacy_st, h5ad, images)

#: Human-readable names of the formats :func:`detect_format` returns.
FORMATS = {m.FORMAT: m.DESCRIPTION for m in FORMAT_MODULES}

_EXPECTED_ANY = ("a Space Ranger outs folder, a Visium HD square_XXXum folder, a legacy ST / STUtility folder "
                 "(counts '<id>.tsv' + spot table '<id>_selection.tsv' or 'alignment_table_<id>.tsv' with columns "
                 "x, y, pixel_x, pixel_y + H&E image), an .h5ad with obsm['spatial'], a SpatialData zarr (image + spot circles + table), a MERSCOPE region folder, a Xenium output folder, or a TIFF/SVS/JPEG/PNG image")


def _module_for(p: Path):
    if not p.exists():
        return None
    for m in FORMAT_MODULES:
        try:
            if m.detect(p):
                return m
        except Exception:
            continue
    return None


def detect_format(path) -> str | None:
    """What :func:`read` would read at ``path``: one of :data:`FORMATS`' keys ('visium', 'visium_hd',
    'legacy_st', 'h5ad', 'image'), or ``None`` for anything else. Looks at names, folder structure and
    table headers only; never raises."""
    try:
        m = _module_for(Path(os.fspath(path)))
    except Exception:
        return None
    return None if m is None else m.FORMAT


def read(path, **kwargs) -> Sample:
    """Read any supported dataset or image into a :class:`Sample` (dispatch on :func:`detect_format`).

    Keyword arguments go to the specific reader (e.g. ``image=`` for a full-resolution H&E,
    ``name=``, ``um_per_px=``)."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise DataFormatError(p, "path does not exist", "an existing file or folder")
    m = _module_for(p)
    if m is None:
        raise DataFormatError(p, "not a recognised spatial-transcriptomics dataset or histology image", _EXPECTED_ANY)
    return m.read(p, **kwargs)
