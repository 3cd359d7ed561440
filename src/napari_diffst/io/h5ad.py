"""AnnData ``.h5ad`` with ``obsm['spatial']``."""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from ..data.sample import (
    LATTICE_PITCH_UM,
    SPOT_DIAMETER_UM,
    HistologyImage,
    Sample,
    build_uns_spatial,
    estimate_um_per_px,
)
from ..errors import DataFormatError
from ._common import (
    _check_spots_inside,
    _find_images,
    _finite_pos,
    _guard_downscaled_coordinates,
    _lattice_fit_um_per_px,
    _lower_name,
    _margin_px,
    _open_image,
    _spots_inside,
    _thumbnail,
    _validate_counts,
    _warn_scale,
    _wrap,
)
from .visium import VISIUM_SPOT_DIAMETER_FULLRES_UM

#: Format key and name for :func:`napari_diffst.io.readers.detect_format` / ``FORMATS``.
FORMAT = "h5ad"
DESCRIPTION = "AnnData .h5ad with obsm['spatial']"


# ================================================================================================
# AnnData
# ================================================================================================
def _h5ad_values(adata, path):
    """Pick raw counts (layers['counts'] > raw.X > X) or keep non-integer X and say so."""
    import anndata as ad

    cands = []
    if "counts" in adata.layers:
        cands.append(("layers['counts']", adata.layers["counts"], adata))
    if adata.raw is not None and adata.raw.n_obs == adata.n_obs:
        cands.append(("raw.X", adata.raw.X, adata.raw))
    for where, M, src in cands:
        try:
            X, values = _validate_counts(M, path)
        except DataFormatError:
            continue
        if src is adata.raw:
            adata = ad.AnnData(X=X, obs=adata.obs.copy(), var=adata.raw.var.copy(), obsm=dict(adata.obsm),
                               uns=dict(adata.uns))
        else:
            adata.X = X
        return adata, values, where
    X = adata.X
    if X is None:
        raise DataFormatError(path, "AnnData has no X", "an AnnData with raw counts in X or layers['counts']")
    X, values = _validate_counts(X, path, allow_float=True)
    adata.X = X
    return adata, values, "X"


def _h5ad_sibling_images(path: Path) -> list[Path]:
    imgs = [q for q in _find_images(path.parent)]
    stem = path.name[: -len(".h5ad")].lower()
    same = [q for q in imgs if _lower_name(q).startswith(stem)]
    if same:
        return same
    if len(imgs) == 1:
        return imgs
    return [q for q in imgs if any(t in _lower_name(q) for t in ("full", "image", "img", "he"))]


def read_h5ad(path, *, image=None, name: str | None = None, um_per_px: float | None = None,
              library_id: str | None = None) -> Sample:
    """Read an AnnData ``.h5ad`` with spots in ``obsm['spatial']`` (x, y full-res px).

    Counts: ``layers['counts']`` > ``raw.X`` > ``X``; non-integer ``X`` (e.g. log-normalised) is kept
    with a warning and ``provenance['values'] = 'lognorm'``. Image: ``image=``, else a sibling image
    file in full-res px (1:1), else ``uns['spatial'][lib]['images']['hires'|'lowres']`` with its
    scale factor — the first one that the spots fit in. µm/px: ``microns_per_pixel`` or
    ``spot_diameter_fullres`` ↔ 65 µm from ``uns['spatial']``, else the Visium 100 µm lattice."""
    import anndata as ad

    p = Path(os.fspath(path))
    if not p.is_file():
        raise DataFormatError(p, "file does not exist", "an .h5ad file")
    exp = "an AnnData .h5ad with obsm['spatial'] = (x, y) spot centres in full-resolution image pixels"
    with _wrap(p, "cannot read AnnData file", exp):
        adata = ad.read_h5ad(p)
    if "spatial" not in adata.obsm:
        raise DataFormatError(p, "obsm['spatial'] is missing (no spot coordinates)", exp)
    xy = np.asarray(adata.obsm["spatial"])
    if xy.ndim != 2 or xy.shape[1] < 2 or xy.dtype.kind not in "biuf":
        raise DataFormatError(p, f"obsm['spatial'] has shape {xy.shape} / dtype {xy.dtype}", exp)
    xy = xy[:, :2].astype(np.float64)
    if not np.all(np.isfinite(xy)):
        raise DataFormatError(p, "obsm['spatial'] contains NaN/inf", exp)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataFormatError(p, f"empty AnnData ({adata.n_obs} spots × {adata.n_vars} genes)", exp)
    adata, values, where = _h5ad_values(adata, p)
    adata.obsm["spatial"] = xy
    name = name or p.name[: -len(".h5ad")]
    if values != "counts":
        warnings.warn(f"{p.name}: {where} is not raw counts ({values}, max {adata.X.max():.3g}); kept as is — "
                      "methods that need counts will treat these as expression values", stacklevel=2)

    uns_sp = adata.uns.get("spatial", {}) if isinstance(adata.uns.get("spatial", {}), dict) else {}
    lib = library_id or (next(iter(uns_sp)) if uns_sp else None)
    libd = uns_sp.get(lib, {}) if lib else {}
    sf = {k: float(v) for k, v in dict(libd.get("scalefactors", {})).items()
          if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
    meta = dict(libd.get("metadata", {})) if isinstance(libd.get("metadata", {}), dict) else {}
    is_hd = "bin_size_um" in sf
    technology = "visium_hd" if is_hd else ("visium" if (
        "spot_diameter_fullres" in sf or "spaceranger" in str(meta.get("software_version", "")).lower()
        or "spatial" in str(meta.get("chemistry_description", "")).lower()) else "h5ad")
    pitch = sf["bin_size_um"] if is_hd else LATTICE_PITCH_UM["visium"]

    if {"array_row", "array_col"} <= set(adata.obs.columns):
        try:
            ar = adata.obs[["array_col", "array_row"]].to_numpy(float)
            steps = (pitch, pitch) if is_hd else (50.0, 50.0 * math.sqrt(3))
            um_lattice = _lattice_fit_um_per_px(ar, xy, steps)
        except (TypeError, ValueError):
            um_lattice = float("nan")
    else:
        um_lattice = estimate_um_per_px(xy, pitch) if len(xy) >= 2 else float("nan")
    if um_per_px is not None:
        if not _finite_pos(um_per_px):
            raise DataFormatError(None, f"um_per_px={um_per_px!r} is not a positive number", "a positive float")
        um, um_src = float(um_per_px), "user"
    elif _finite_pos(sf.get("microns_per_pixel")):
        um, um_src = sf["microns_per_pixel"], "uns scalefactors microns_per_pixel"
    elif _finite_pos(sf.get("spot_diameter_fullres")):
        d_um = sf["bin_size_um"] if is_hd else VISIUM_SPOT_DIAMETER_FULLRES_UM
        um, um_src = d_um / sf["spot_diameter_fullres"], f"uns spot_diameter_fullres ↔ {d_um:g} µm"
    elif _finite_pos(um_lattice):
        um, um_src = um_lattice, f"{pitch:g} µm lattice (no scale factors; Visium assumed)"
        warnings.warn(f"{p.name}: no scale factors in uns['spatial']; µm/px {um:.4g} estimated assuming a "
                      f"Visium {pitch:g} µm spot lattice", stacklevel=2)
    else:
        raise DataFormatError(p, "cannot determine µm per pixel (no scale factors, too few spots)",
                              "uns['spatial'][library]['scalefactors'] or pass um_per_px=")

    images = dict(libd.get("images", {})) if isinstance(libd.get("images", {}), dict) else {}
    scalefs = {"hires": sf.get("tissue_hires_scalef"), "lowres": sf.get("tissue_lowres_scalef")}
    shapes = {k: tuple(np.asarray(images[k]).shape[:2]) for k in ("hires", "lowres") if k in images}
    if um_src != "user":
        _guard_downscaled_coordinates(p, xy, um, um_lattice, scalefs, shapes)
        _warn_scale(name, um, um_lattice, pitch, um_src)
    spot_um = sf["bin_size_um"] if is_hd else SPOT_DIAMETER_UM["visium"]
    spot_d_px = spot_um / um

    # -- image --------------------------------------------------------------------------------------
    img, img_src = None, "none"
    if image is not None:
        img = _open_image(Path(image), 1.0)
        _check_spots_inside(p, xy, img, spot_d_px, "image")
        img_src = f"user image {Path(image).name}"
    else:
        tried = []
        for q in _h5ad_sibling_images(p):
            try:
                cand = _open_image(q, 1.0)
            except DataFormatError as exc:
                warnings.warn(f"{name}: skipping {q.name}: {exc}", stacklevel=2)
                continue
            tried.append(q.name)
            if _spots_inside(xy, cand, _margin_px(cand, spot_d_px)).all():
                img, img_src = cand, f"sibling image {q.name} (full-res px)"
                break
        if img is None:
            for key in ("hires", "lowres"):
                arr = images.get(key)
                s = scalefs.get(key)
                if arr is None or not _finite_pos(s):
                    continue
                arr = np.asarray(arr)
                if arr.ndim not in (2, 3) or arr.size == 0:
                    continue
                if arr.dtype != np.uint8:
                    a = arr.astype(np.float32)
                    arr = (np.clip(a if a.max() > 1.0 else a * 255.0, 0, 255)).astype(np.uint8)
                cand = HistologyImage.from_array(arr, fullres_per_px=1.0 / s)
                tried.append(f"uns {key}")
                if _spots_inside(xy, cand, _margin_px(cand, spot_d_px)).all():
                    img, img_src = cand, f"uns['spatial']['{lib}']['images']['{key}']"
                    break
        if img is None and tried:
            raise DataFormatError(
                p, f"spots lie outside every candidate image ({', '.join(tried)}); spot x ≤ {xy[:, 0].max():.0f}, "
                   f"y ≤ {xy[:, 1].max():.0f} px",
                "obsm['spatial'] in full-resolution pixels of the image (sibling file 1:1, uns images via "
                "scalefactors)")
        if img is None:
            warnings.warn(f"{name}: no histology image found (spots only)", stacklevel=2)
    if "spatial" not in adata.uns or not uns_sp:
        hires, hs = (None, 1.0)
        if img is not None:
            hires, hs = _thumbnail(img, 2000)
            hs = hs / img.fullres_per_px
        adata.uns["spatial"] = build_uns_spatial(name, hires=hires, hires_scalef=hs, spot_diameter_fullres=spot_d_px,
                                                 metadata={"reader": "napari_diffst.read_h5ad"})
    return Sample(
        adata=adata, image=img, um_per_px=float(um), spot_diameter_um=float(spot_um), technology=technology,
        name=name, lattice_pitch_um=float(pitch),
        provenance={"reader": "read_h5ad", "format": "h5ad", "values": values, "values_from": where,
                    "files": {"h5ad": str(p), "image": str(img.path) if img is not None and img.path else None},
                    "image_source": img_src, "um_per_px_source": um_src, "um_per_px_lattice": um_lattice},
    )


def detect(p: Path) -> bool:
    """A file named ``*.h5ad``."""
    return p.is_file() and _lower_name(p).endswith(".h5ad")


read = read_h5ad
