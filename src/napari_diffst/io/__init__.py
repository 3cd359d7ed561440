"""Input/output: readers for spatial-transcriptomics outputs and histology images."""
from __future__ import annotations

from .readers import (
    FORMAT_MODULES,
    FORMATS,
    SPOT_COLUMN_ALIASES,
    VISIUM_SPOT_DIAMETER_FULLRES_UM,
    detect_format,
    read,
    read_h5ad,
    read_image,
    read_legacy_st,
    read_visium,
    read_visium_hd,
)

__all__ = [
    "FORMAT_MODULES",
    "FORMATS",
    "SPOT_COLUMN_ALIASES",
    "VISIUM_SPOT_DIAMETER_FULLRES_UM",
    "detect_format",
    "read",
    "read_h5ad",
    "read_image",
    "read_legacy_st",
    "read_visium",
    "read_visium_hd",
]
