"""A histology image alone (TIFF/OME-TIFF/SVS/JPEG/PNG)."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.sample import Sample
from ..errors import DataFormatError
from ._common import (
    _IMAGE_EXT,
    _finite_pos,
    _has_ext,
    _new_adata,
    _open_image,
)

#: Format key and name for :func:`napari_diffst.io.readers.detect_format` / ``FORMATS``.
FORMAT = "image"
DESCRIPTION = "histology image"


# ================================================================================================
# image only
# ================================================================================================
def _tiff_um_per_px(path: Path) -> float | None:
    """Pixel size from OME-XML PhysicalSizeX, an Aperio 'MPP = ' description, or resolution tags."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if tif.ome_metadata:
                m = re.search(r'PhysicalSizeX="([0-9.eE+\-]+)"', tif.ome_metadata)
                if m:
                    v = float(m.group(1))
                    u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
                    unit = u.group(1) if u else "µm"
                    v *= {"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit, 1.0)
                    if _finite_pos(v):
                        return v
            page = tif.pages[0]
            desc = page.description or ""
            m = re.search(r"MPP\s*=\s*([0-9.eE+\-]+)", desc)
            if m and _finite_pos(m.group(1)):
                return float(m.group(1))
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                unit = int(tags["ResolutionUnit"].value)
                if num and den:
                    ppu = num / den
                    per = {2: 25400.0, 3: 10000.0}.get(unit)
                    if per and ppu > 0:
                        v = per / ppu
                        if 0.05 <= v <= 50:  # 72/96 dpi defaults are not microscope pixel sizes
                            return v
    except Exception:
        return None
    return None


def read_image(path, *, um_per_px: float | None = None, name: str | None = None) -> Sample:
    """A histology image alone -> Sample with **0 spots** (empty AnnData, ``obsm['spatial']`` (0, 2)).

    Returning a Sample (not a bare image) keeps one type through readers, layers and widgets; spots
    can be added later. µm/px: ``um_per_px=``, else OME ``PhysicalSizeX``, Aperio ``MPP``, or TIFF
    resolution tags; otherwise 1.0 with a warning (``provenance['um_per_px_source'] = 'assumed'``)."""
    p = Path(os.fspath(path))
    img = _open_image(p, 1.0)
    um, src = None, None
    if um_per_px is not None:
        if not _finite_pos(um_per_px):
            raise DataFormatError(None, f"um_per_px={um_per_px!r} is not a positive number", "a positive float")
        um, src = float(um_per_px), "user"
    elif _has_ext(p, (".tif", ".tiff", ".svs", ".btf", ".ndpi", ".scn")):
        um = _tiff_um_per_px(p)
        src = "TIFF metadata" if um else None
    if um is None:
        um, src = 1.0, "assumed"
        warnings.warn(f"{p.name}: pixel size unknown; assuming 1 µm/px (pass um_per_px=)", stacklevel=2)
    name = name or re.sub(r"(\.ome)?\.[^.]+$", "", p.name)
    adata = _new_adata(sp.csr_matrix((0, 0), dtype=np.int32), pd.DataFrame(index=[]), pd.DataFrame(index=[]),
                       np.zeros((0, 2)))
    return Sample(adata=adata, image=img, um_per_px=um, spot_diameter_um=float("nan"), technology="image",
                  name=name, lattice_pitch_um=None,
                  provenance={"reader": "read_image", "format": "image", "values": "none",
                              "files": {"image": str(p)}, "um_per_px_source": src, "image_source": p.name})


def detect(p: Path) -> bool:
    """A file with an image extension (TIFF/OME-TIFF/SVS/NDPI/JPEG/PNG)."""
    return p.is_file() and _has_ext(p, _IMAGE_EXT)


read = read_image
