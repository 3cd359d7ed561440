"""10x Visium HD ``binned_outputs/square_XXXum`` folders."""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from ..data.sample import Sample, build_uns_spatial
from ..errors import DataFormatError
from ._common import (
    _SQUARE_RE,
    _finite_pos,
    _guard_downscaled_coordinates,
    _spaceranger_image_shapes,
    _lattice_fit_um_per_px,
    _new_adata,
    _validate_counts,
    _warn_scale,
)
from .visium import (
    _gene_var,
    _join_counts_positions,
    _load_matrix,
    _pick_visium_image,
    _positions_file,
    _read_positions,
    _read_scalefactors,
    _sample_name,
)

#: Format key and name for :func:`napari_diffst.io.readers.detect_format` / ``FORMATS``.
FORMAT = "visium_hd"
DESCRIPTION = "10x Visium HD binned output (square_XXXum)"


# ================================================================================================
# Visium HD
# ================================================================================================
def _resolve_hd_dir(p: Path, strict: bool = True) -> Path | None:
    """The ``square_XXXum`` folder for a path given as that folder, its spatial/, a file in it, or an
    HD ``outs`` folder / its parent (then the 8 µm bins, else the coarsest available)."""
    if p.is_file():
        p = p.parent
    if p.name == "spatial":
        p = p.parent

    def ok(d: Path) -> bool:
        sp_ = d / "spatial"
        if not sp_.is_dir() or _positions_file(sp_) is None:
            return False
        if _SQUARE_RE.search(d.name) or (sp_ / "tissue_positions.parquet").is_file():
            return True
        try:
            return "bin_size_um" in json.loads((sp_ / "scalefactors_json.json").read_text())
        except Exception:
            return False

    if ok(p):
        return p
    for base in (p / "binned_outputs", p / "outs" / "binned_outputs"):
        if base.is_dir():
            squares = sorted((d for d in base.iterdir() if d.is_dir() and _SQUARE_RE.search(d.name) and ok(d)),
                             key=lambda d: float(_SQUARE_RE.search(d.name).group(1)))
            if squares:
                for d in squares:
                    if float(_SQUARE_RE.search(d.name).group(1)) == 8.0:
                        return d
                return squares[-1]
    if strict:
        raise DataFormatError(p, "not a Visium HD binned output",
                              "a binned_outputs/square_XXXum folder with spatial/tissue_positions.parquet")
    return None


def read_visium_hd(path, *, image=None, name: str | None = None) -> Sample:
    """Read a Visium HD ``square_XXXum`` bin folder (``spatial/tissue_positions.parquet``, h5 or MTX,
    scale factors with ``bin_size_um`` and ``microns_per_pixel``). Bins are the spots: spot diameter
    and lattice pitch are the bin size."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise DataFormatError(p, "path does not exist", "a Visium HD square_XXXum folder")
    sq = _resolve_hd_dir(p)
    spatial = sq / "spatial"
    pos_path = _positions_file(spatial)
    pos = _read_positions(pos_path)
    sf, sf_path = _read_scalefactors(spatial)
    if "bin_size_um" in sf and _finite_pos(sf["bin_size_um"]):
        bin_um = sf["bin_size_um"]
    elif _SQUARE_RE.search(sq.name):
        bin_um = float(_SQUARE_RE.search(sq.name).group(1))
    else:
        raise DataFormatError(sf_path or spatial, "bin size unknown",
                              "scalefactors bin_size_um or a square_XXXum folder")
    if name is None:
        name = sq.name
        if sq.parent.name == "binned_outputs":
            outs = sq.parent.parent
            name = f"{_sample_name(outs)}_{sq.name}"

    X, barcodes, names, ids, ftype, mpath, filtered = _load_matrix(sq)
    X, values = _validate_counts(X, mpath)
    if X.nnz == 0:
        warnings.warn(f"{name}: the count matrix {mpath.name} holds no non-zero counts", stacklevel=2)
    var, keep_f = _gene_var(names, ids, ftype)
    if keep_f is not None:
        X = X[:, keep_f]
    X, barcodes, pos_k, n_drop = _join_counts_positions(X, barcodes, pos, mpath, pos_path, filtered, name)

    um_lattice = _lattice_fit_um_per_px(pos[["array_col", "array_row"]].to_numpy(float),
                                        pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float),
                                        (bin_um, bin_um))
    if "microns_per_pixel" in sf:
        um, um_src = sf["microns_per_pixel"], "scalefactors microns_per_pixel"
    elif "spot_diameter_fullres" in sf:
        um, um_src = bin_um / sf["spot_diameter_fullres"], "scalefactors spot_diameter_fullres ↔ bin size"
    elif math.isfinite(um_lattice):
        um, um_src = um_lattice, f"{bin_um:g} µm bin lattice fit"
    else:
        raise DataFormatError(sf_path or spatial, "cannot determine µm per pixel",
                              "scalefactors_json.json with microns_per_pixel")
    xy = pos_k[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    scalefs = {k: sf.get(f"tissue_{k}_scalef") for k in ("hires", "lowres")}
    _guard_downscaled_coordinates(pos_path, pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float),
                                  um, um_lattice, scalefs, _spaceranger_image_shapes(spatial))
    _warn_scale(name, um, um_lattice, bin_um, um_src)
    search = [sq, sq.parent]
    if sq.parent.name == "binned_outputs":
        search += [sq.parent.parent, sq.parent.parent.parent]
    img, img_src, arrays, shapes = _pick_visium_image(
        coord_file=pos_path, xy=xy, sf=sf, spatial=spatial, search_dirs=search, image=image, name=name,
        spot_diameter_px=bin_um / um)
    hs = scalefs["hires"] or (scalefs["lowres"] or 1.0)
    uns = {"spatial": build_uns_spatial(
        name, hires=arrays.get("hires"), hires_scalef=hs,
        spot_diameter_fullres=sf.get("spot_diameter_fullres", bin_um / um), lowres=arrays.get("lowres"),
        lowres_scalef=scalefs["lowres"], metadata={"source": str(sq), "reader": "napari_diffst.read_visium_hd",
                                                   "bin_size_um": bin_um})}
    obs = pos_k[["in_tissue", "array_row", "array_col"]].copy()
    obs.index = barcodes
    adata = _new_adata(X, obs, var, xy, uns)
    return Sample(
        adata=adata, image=img, um_per_px=float(um), spot_diameter_um=float(bin_um), technology="visium_hd",
        name=name, lattice_pitch_um=float(bin_um),
        provenance={"reader": "read_visium_hd", "format": "visium_hd", "values": values,
                    "files": {"matrix": str(mpath), "positions": str(pos_path),
                              "scalefactors": str(sf_path) if sf_path else None,
                              "image": str(img.path) if img is not None and img.path else None},
                    "image_source": img_src, "um_per_px_source": um_src, "um_per_px_lattice": um_lattice,
                    "bin_size_um": bin_um, "n_dropped_barcodes": int(n_drop)},
    )


def detect(p: Path) -> bool:
    """A ``square_XXXum`` folder, an HD outs folder or its parent, or a positions/scalefactors file in them."""
    from .visium import tenx_kind

    return tenx_kind(p) == FORMAT


read = read_visium_hd
