"""Readers: spatial-transcriptomics outputs and histology images -> :class:`~napari_diffst.data.sample.Sample`.

Supported inputs (details, accepted column names and error messages in ``docs/formats.md``):

* **10x Visium** Space Ranger ``outs`` (v1 ``tissue_positions_list.csv`` / v2+ ``tissue_positions.csv``),
  counts from ``filtered_feature_bc_matrix.h5`` or the MTX folder — :func:`read_visium`;
* **10x Visium HD** ``binned_outputs/square_XXXum`` folders — :func:`read_visium_hd`;
* **legacy Spatial Transcriptomics** (her2st / ST spot detector / STUtility layouts) — :func:`read_legacy_st`;
* **AnnData** ``.h5ad`` with ``obsm['spatial']`` — :func:`read_h5ad`;
* a **histology image** alone (TIFF/OME-TIFF/SVS/JPEG/PNG) — :func:`read_image`.

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

import gzip
import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.sample import (
    LATTICE_PITCH_UM,
    SPOT_DIAMETER_UM,
    HistologyImage,
    Sample,
    build_uns_spatial,
    estimate_um_per_px,
)
from ..errors import DataFormatError

__all__ = [
    "read",
    "detect_format",
    "read_visium",
    "read_visium_hd",
    "read_legacy_st",
    "read_h5ad",
    "read_image",
    "FORMATS",
    "VISIUM_SPOT_DIAMETER_FULLRES_UM",
]

#: Human-readable names of the formats :func:`detect_format` returns.
FORMATS = {
    "visium": "10x Visium Space Ranger outs",
    "visium_hd": "10x Visium HD binned output (square_XXXum)",
    "legacy_st": "legacy Spatial Transcriptomics (counts .tsv + spot file + H&E)",
    "h5ad": "AnnData .h5ad with obsm['spatial']",
    "image": "histology image",
    "merscope": "Vizgen MERSCOPE region folder (detected_transcripts.csv + images/)",
    "xenium": "10x Xenium output bundle (experiment.xenium)",
}

#: Space Ranger defines ``spot_diameter_fullres`` as the pixels spanning a *theoretical 65 µm* spot
#: (the physical capture area is 55 µm). Using 55 here would make µm/px 18 % too small; on the
#: fixtures 65 µm agrees with the 100 µm spot lattice to <0.5 % (V1 mouse brain / squidpy).
VISIUM_SPOT_DIAMETER_FULLRES_UM = 65.0

#: Tolerance (relative) between metadata µm/px and the lattice estimate before warning.
SCALE_TOL = 0.10

_IMAGE_EXT = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf", ".svs", ".ndpi", ".scn", ".jpg", ".jpeg", ".png")
_FULLRES_EXCLUDE = ("cytassist", "fiducial", "detected_tissue", "aligned", "lowres", "hires", "spot", "mask")
_TABLE_EXT = (".tsv", ".tsv.gz", ".csv", ".csv.gz", ".txt", ".txt.gz")
_LABEL_RE = re.compile(r"^\s*[A-Za-z_]*?(-?\d+(?:\.\d+)?)\s*[xX]\s*(-?\d+(?:\.\d+)?)\s*$")
_SPOTFILE_RE = re.compile(r"(selection|spot_data|^spots?[_\-.]|_spots?\.|spot_?coord|spot_?pos)", re.I)
_SQUARE_RE = re.compile(r"square_(\d+(?:\.\d+)?)um", re.I)

_EXPECT_COUNTS = "raw integer counts (non-negative, finite)"


# ================================================================================================
# small helpers
# ================================================================================================
def _lower_name(p: Path) -> str:
    return p.name.lower()


def _has_ext(p: Path, exts: Iterable[str]) -> bool:
    n = _lower_name(p)
    return any(n.endswith(e) for e in exts)


def _open_binary(path: Path):
    """Open a file for reading, gunzipping when the content is gzip (whatever the extension says:
    some published '.gz' files are plain text)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_text_head(path: Path, n_bytes: int = 65536) -> str:
    with _open_binary(path) as fh:
        raw = fh.read(n_bytes)
    return raw.decode("utf-8", errors="replace")


def _sniff_sep(first_line: str) -> str:
    if "\t" in first_line:
        return "\t"
    if "," in first_line:
        return ","
    if ";" in first_line:
        return ";"
    return r"\s+"


def _wrap(path, what: str, expected: str):
    """Context manager turning any parser exception into a DataFormatError."""

    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, et, ev, tb):
            if ev is None or isinstance(ev, DataFormatError):
                return False
            if isinstance(ev, (KeyboardInterrupt, SystemExit, MemoryError)):
                return False
            msg = str(ev).strip().splitlines()[0][:200] if str(ev).strip() else ""
            raise DataFormatError(path, f"{what} ({type(ev).__name__}: {msg})", expected) from ev

    return _Ctx()


def _as_str_array(values) -> np.ndarray:
    out = []
    for v in np.asarray(values).ravel():
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        out.append(str(v))
    return np.asarray(out, dtype=object)


def _make_unique(names: Iterable[str]) -> list[str]:
    """anndata's ``var_names_make_unique`` rule: later duplicates get ``-1``, ``-2`` ..."""
    names = [str(n) for n in names]
    seen: dict[str, int] = {}
    taken = set(names)
    out = []
    for n in names:
        if n in seen:
            k = seen[n] + 1
            while f"{n}-{k}" in taken:
                k += 1
            seen[n] = k
            new = f"{n}-{k}"
            taken.add(new)
            out.append(new)
        else:
            seen[n] = 0
            out.append(n)
    return out


def _finite_pos(v) -> bool:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and v > 0


def _validate_counts(X, path, *, allow_float: bool = False):
    """Check a spots × genes matrix: not empty, finite, non-negative; integer-valued -> int CSR.

    Returns ``(X_csr, values)`` with ``values`` 'counts' (integers) or, when ``allow_float``,
    'lognorm'/'float' for non-integer data (kept as float32)."""
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataFormatError(path, f"empty count matrix (shape {X.shape[0]} spots × {X.shape[1]} genes)",
                              "at least one spot and one gene")
    data = X.data
    if data.dtype.kind not in "biuf":
        raise DataFormatError(path, f"count matrix has non-numeric dtype {data.dtype}", _EXPECT_COUNTS)
    if data.size:
        if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
            raise DataFormatError(path, f"count matrix contains {int((~np.isfinite(data)).sum())} NaN/inf values",
                                  _EXPECT_COUNTS)
        if data.min() < 0:
            raise DataFormatError(path, f"count matrix contains negative values (min {data.min():g})",
                                  _EXPECT_COUNTS)
    if data.dtype.kind == "f":
        integral = bool(np.all(np.mod(data, 1) == 0)) if data.size else True
        if integral:
            if data.size and data.max() > 2 ** 53:
                raise DataFormatError(path, f"count values too large (max {data.max():g})", _EXPECT_COUNTS)
        elif not allow_float:
            bad = data[np.mod(data, 1) != 0][0]
            raise DataFormatError(path, f"counts are not integers (e.g. {bad:g}; normalised data?)",
                                  _EXPECT_COUNTS)
        else:
            X = X.astype(np.float32)
            values = "lognorm" if (not data.size or data.max() <= 30) else "float"
            return X, values
    mx = int(data.max()) if data.size else 0
    dtype = np.int32 if mx < 2 ** 31 else np.int64
    X = sp.csr_matrix((data.astype(dtype), X.indices, X.indptr), shape=X.shape)
    X.eliminate_zeros()
    return X, "counts"


def _lattice_fit_um_per_px(array_cr, xy, step_um) -> float:
    """µm per pixel from a least-squares affine fit ``pixel = A @ (array · step) + t``.

    ``array_cr`` are the lattice indices as (column, row), ``step_um`` the µm per index step in each
    direction (legacy ST: 200, 200; Visium: 50 per column, 50·√3 per row; HD: bin, bin).
    ``|det A|`` is px² per µm², so µm/px = |det A|^(-1/2). Works on sparse subsets and rotated or
    flipped images; returns NaN when fewer than 3 non-collinear spots."""
    a = np.asarray(array_cr, float).reshape(-1, 2) * np.asarray(step_um, float)
    xy = np.asarray(xy, float).reshape(-1, 2)
    ok = np.isfinite(a).all(1) & np.isfinite(xy).all(1)
    a, xy = a[ok], xy[ok]
    if len(a) < 3:
        return float("nan")
    D = np.c_[a, np.ones(len(a))]
    try:
        with np.errstate(all="ignore"):
            if np.linalg.matrix_rank(D) < 3:
                return float("nan")
            coef, *_ = np.linalg.lstsq(D, xy, rcond=None)
            det = abs(float(np.linalg.det(coef[:2])))
    except (np.linalg.LinAlgError, ValueError, OverflowError):
        return float("nan")
    if not math.isfinite(det) or det <= 0:
        return float("nan")
    return 1.0 / math.sqrt(det)


def _warn_scale(name: str, um_meta: float, um_lattice: float, pitch: float, source: str):
    if math.isfinite(um_lattice) and um_meta > 0:
        rel = abs(um_lattice - um_meta) / um_meta
        if rel > SCALE_TOL:
            warnings.warn(
                f"{name}: µm/px from {source} ({um_meta:.4g}) and from the {pitch:g} µm spot lattice "
                f"({um_lattice:.4g}) differ by {rel:.0%}; check the scale factors (full-res vs hires pixels?)",
                stacklevel=3,
            )


def _image_extent_fullres(image: HistologyImage) -> tuple[float, float]:
    H, W = image.shape
    return W * image.fullres_per_px, H * image.fullres_per_px


def _spots_inside(xy: np.ndarray, image: HistologyImage, margin_px: float) -> np.ndarray:
    W, H = _image_extent_fullres(image)
    return ((xy[:, 0] >= -margin_px) & (xy[:, 0] <= W + margin_px)
            & (xy[:, 1] >= -margin_px) & (xy[:, 1] <= H + margin_px))


def _margin_px(image: HistologyImage, spot_diameter_px: float) -> float:
    W, H = _image_extent_fullres(image)
    m = 0.02 * max(W, H)
    if math.isfinite(spot_diameter_px):
        m = max(m, spot_diameter_px)
    return m


def _check_spots_inside(coord_file, xy, image: HistologyImage, spot_diameter_px: float, what: str = "image"):
    if image is None or len(xy) == 0:
        return
    inside = _spots_inside(xy, image, _margin_px(image, spot_diameter_px))
    if not inside.all():
        W, H = _image_extent_fullres(image)
        i = int(np.flatnonzero(~inside)[0])
        raise DataFormatError(
            coord_file,
            f"{int((~inside).sum())} of {len(xy)} spots lie outside the {what} {image.path.name if image.path else ''}"
            f" ({W:.0f}×{H:.0f} full-res px; e.g. spot at x={xy[i, 0]:.0f}, y={xy[i, 1]:.0f})",
            "spot pixel coordinates inside the image they were registered to (right image? coordinates in "
            "another image's pixels?)",
        )


def _guard_downscaled_coordinates(coord_file, xy, um_meta: float, um_lattice: float,
                                  scalefs: dict, shapes: dict):
    """The classic bug: positions stored in hires/lowres image pixels instead of full-res pixels.

    Then the spot lattice looks ``1/scalef`` times too coarse in µm/px and every spot fits inside
    the downscaled image. Raises a DataFormatError explaining the fix."""
    if not (math.isfinite(um_lattice) and _finite_pos(um_meta)) or len(xy) == 0:
        return
    for key, s in scalefs.items():
        if not _finite_pos(s) or s >= 0.7:
            continue
        ratio = um_lattice / (um_meta / s)
        shape = shapes.get(key)
        fits = True
        if shape is not None:
            H, W = shape
            fits = bool(np.all(xy[:, 0] <= W * 1.05) and np.all(xy[:, 1] <= H * 1.05))
        if abs(ratio - 1) < 0.15 and fits:
            raise DataFormatError(
                coord_file,
                f"spot coordinates look like {key}-image pixels, not full-resolution pixels: the spot lattice "
                f"gives {um_lattice:.3g} µm/px, {1 / s:.2f}× the {um_meta:.3g} µm/px of the scale factors, and all "
                f"spots fit inside the {key} image",
                f"coordinates in full-resolution pixels (multiply them by 1/tissue_{key}_scalef = {1 / s:.4g})",
            )


def _find_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _has_ext(p, _IMAGE_EXT)
                  and not p.name.startswith("."))


def _open_image(path: Path, fullres_per_px: float = 1.0) -> HistologyImage:
    img = HistologyImage.open(path, fullres_per_px=fullres_per_px)
    try:
        H, W = img.shape
    except DataFormatError:
        raise
    except Exception as exc:
        raise DataFormatError(path, f"cannot read image header ({exc})", "a readable JPEG/PNG/TIFF") from exc
    if H <= 0 or W <= 0:
        raise DataFormatError(path, f"image has no pixels ({W}×{H})", "a non-empty RGB image")
    return img


def _decoded(img: HistologyImage) -> np.ndarray:
    """Decode a (small) image and return its level-0 RGB array."""
    try:
        return np.asarray(img.levels[0])[..., :3]
    except DataFormatError:
        raise
    except Exception as exc:
        raise DataFormatError(img.path, f"corrupted image ({exc})", "a readable RGB image") from exc


def _thumbnail(img: HistologyImage, max_size: int = 2000) -> tuple[np.ndarray, float]:
    """A ≤ max_size thumbnail (JPEG: DCT draft decode, never the full image) and its scale."""
    try:
        arr, scale = img.thumbnail(max_size)
    except DataFormatError:
        raise
    except Exception as exc:
        raise DataFormatError(img.path, f"corrupted or truncated image ({type(exc).__name__}: {exc})",
                              "a readable RGB JPEG/PNG/TIFF") from exc
    return np.ascontiguousarray(np.asarray(arr)[..., :3]), float(scale)


def _new_adata(X, obs: pd.DataFrame, var: pd.DataFrame, xy: np.ndarray, uns: dict | None = None):
    import anndata as ad

    obs = obs.copy()
    obs.index = pd.Index([str(i) for i in obs.index])
    var = var.copy()
    var.index = pd.Index([str(i) for i in var.index])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["spatial"] = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if uns:
        adata.uns.update(uns)
    return adata


# ================================================================================================
# dispatch
# ================================================================================================
def detect_format(path) -> str | None:
    """What :func:`read` would read at ``path``: 'visium', 'visium_hd', 'legacy_st', 'h5ad', 'image'
    or ``None`` for anything else. Looks at names and folder structure only; never raises."""
    try:
        return _detect(Path(os.fspath(path)))
    except Exception:
        return None


def _detect(p: Path) -> str | None:
    if not p.exists():
        return None
    from .merscope import is_merscope  # imaging-based ST: one module per format
    from .xenium import is_xenium

    if is_xenium(p):
        return "xenium"
    if is_merscope(p):
        return "merscope"
    if p.is_dir():
        if _resolve_hd_dir(p, strict=False) is not None:
            return "visium_hd"
        outs = _resolve_outs(p, strict=False)
        if outs is not None:
            return "visium_hd" if _is_hd_outs(outs) else "visium"
        if _legacy_pairs(p):
            return "legacy_st"
        return None
    name = _lower_name(p)
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.startswith("tissue_positions") or name == "scalefactors_json.json":
        outs = _resolve_outs(p, strict=False)
        if outs is not None:
            return "visium_hd" if _is_hd_outs(outs) else "visium"
        return None
    if name.endswith(".h5") and "feature_bc_matrix" in name:
        return _detect(p.parent)
    if _has_ext(p, _TABLE_EXT):
        return "legacy_st" if _legacy_pairs(p.parent, counts_hint=p) else None
    if _has_ext(p, _IMAGE_EXT):
        return "image"
    return None


def read(path, **kwargs) -> Sample:
    """Read any supported dataset or image into a :class:`Sample` (dispatch on :func:`detect_format`).

    Keyword arguments go to the specific reader (e.g. ``image=`` for a full-resolution H&E,
    ``name=``, ``um_per_px=``)."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise DataFormatError(p, "path does not exist", "an existing file or folder")
    fmt = detect_format(p)
    if fmt is None:
        raise DataFormatError(
            p, "not a recognised spatial-transcriptomics dataset or histology image",
            "a Space Ranger outs folder, a Visium HD square_XXXum folder, a legacy ST folder (counts .tsv + "
            "spot/selection .tsv + H&E), an .h5ad with obsm['spatial'], a MERSCOPE region folder, a Xenium output folder, or a "
            "TIFF/SVS/JPEG/PNG image")
    from .merscope import read_merscope
    from .xenium import read_xenium

    reader = {"visium": read_visium, "visium_hd": read_visium_hd, "legacy_st": read_legacy_st,
              "h5ad": read_h5ad, "image": read_image, "merscope": read_merscope, "xenium": read_xenium}[fmt]
    return reader(p, **kwargs)


# ================================================================================================
# 10x matrices
# ================================================================================================
def _read_10x_h5(path: Path):
    """10x feature-barcode HDF5 (CSC, features × barcodes) -> (CSR barcodes × features, barcodes,
    names, ids, feature_types)."""
    import h5py

    exp = "a 10x Genomics feature-barcode matrix .h5 (matrix/data, indices, indptr, shape, barcodes, features)"
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise DataFormatError(path, f"not a readable HDF5 file ({exc})", exp) from exc
    with f, _wrap(path, "malformed 10x HDF5 matrix", exp):
        if "matrix" in f:
            g = f["matrix"]
        else:  # Cell Ranger 2 layout: one group per genome
            groups = [k for k in f.keys() if isinstance(f[k], h5py.Group)]
            if len(groups) != 1:
                raise DataFormatError(path, "no 'matrix' group", exp)
            g = f[groups[0]]
        missing = [k for k in ("data", "indices", "indptr", "shape", "barcodes") if k not in g]
        if missing:
            raise DataFormatError(path, f"missing datasets {missing} in the HDF5 matrix", exp)
        data = g["data"][()]
        indices = g["indices"][()].astype(np.int64)
        indptr = g["indptr"][()].astype(np.int64)
        shape = tuple(int(s) for s in g["shape"][()])
        barcodes = _as_str_array(g["barcodes"][()])
        if "features" in g:
            fg = g["features"]
            ids = _as_str_array(fg["id"][()]) if "id" in fg else None
            names = _as_str_array(fg["name"][()]) if "name" in fg else ids
            ftype = _as_str_array(fg["feature_type"][()]) if "feature_type" in fg else None
        else:
            ids = _as_str_array(g["genes"][()]) if "genes" in g else None
            names = _as_str_array(g["gene_names"][()]) if "gene_names" in g else ids
            ftype = None
        if names is None:
            raise DataFormatError(path, "no feature names (features/name or gene_names)", exp)
        if ids is None:
            ids = names
    n_feat, n_bc = shape
    if len(indptr) != n_bc + 1 or len(barcodes) != n_bc or len(names) != n_feat or len(data) != len(indices) \
            or (len(indptr) and indptr[-1] != len(data)) or (len(indices) and (indices.max() >= n_feat
                                                                               or indices.min() < 0)):
        raise DataFormatError(path, f"inconsistent matrix: shape {shape}, {len(barcodes)} barcodes, "
                              f"{len(names)} features, indptr {len(indptr)}, data {len(data)}", exp)
    X = sp.csc_matrix((data, indices, indptr), shape=shape).T.tocsr()
    return X, barcodes, names, ids, ftype


def _first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    for n in names:
        q = folder / n
        if q.is_file():
            return q
    return None


def _read_10x_mtx(folder: Path):
    """10x MTX folder (matrix.mtx[.gz] features × barcodes, features.tsv[.gz], barcodes.tsv[.gz])."""
    import scipy.io

    mtx = _first_existing(folder, ("matrix.mtx.gz", "matrix.mtx"))
    feats = _first_existing(folder, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    bcs = _first_existing(folder, ("barcodes.tsv.gz", "barcodes.tsv"))
    exp = "a 10x MTX folder with matrix.mtx.gz, features.tsv.gz and barcodes.tsv.gz"
    for q, n in ((mtx, "matrix.mtx.gz"), (feats, "features.tsv.gz"), (bcs, "barcodes.tsv.gz")):
        if q is None:
            raise DataFormatError(folder, f"{n} is missing", exp)
    with _wrap(mtx, "cannot parse Matrix Market file", "a MatrixMarket coordinate matrix (features × barcodes)"):
        with _open_binary(mtx) as fh:
            M = scipy.io.mmread(fh)
        M = sp.csr_matrix(M)
    with _wrap(feats, "cannot parse features table", "tab-separated: feature id, name[, type]"):
        with _open_binary(feats) as fh:
            fdf = pd.read_csv(fh, sep="\t", header=None, dtype=str, keep_default_na=False)
    with _wrap(bcs, "cannot parse barcodes table", "one barcode per line"):
        with _open_binary(bcs) as fh:
            bdf = pd.read_csv(fh, sep="\t", header=None, dtype=str, keep_default_na=False)
    ids = fdf.iloc[:, 0].to_numpy(object)
    names = fdf.iloc[:, 1].to_numpy(object) if fdf.shape[1] > 1 else ids
    ftype = fdf.iloc[:, 2].to_numpy(object) if fdf.shape[1] > 2 else None
    barcodes = bdf.iloc[:, 0].to_numpy(object)
    if M.shape != (len(ids), len(barcodes)):
        raise DataFormatError(mtx, f"matrix shape {M.shape} does not match {len(ids)} features × "
                              f"{len(barcodes)} barcodes in {feats.name}/{bcs.name}", exp)
    return M.T.tocsr(), barcodes, names, ids, ftype


def _load_matrix(root: Path):
    """Counts in a Space Ranger folder: filtered h5 > filtered MTX > raw h5 > raw MTX.

    Returns (X, barcodes, names, ids, ftype, source_path, filtered: bool)."""
    for kind in ("filtered", "raw"):
        h5 = sorted(root.glob(f"*{kind}_feature_bc_matrix.h5"))
        if h5:
            return (*_read_10x_h5(h5[0]), h5[0], kind == "filtered")
        mdir = root / f"{kind}_feature_bc_matrix"
        if mdir.is_dir():
            return (*_read_10x_mtx(mdir), mdir, kind == "filtered")
    raise DataFormatError(root, "no count matrix found",
                          "filtered_feature_bc_matrix.h5 or a filtered_feature_bc_matrix/ MTX folder")


def _gene_var(names, ids, ftype) -> tuple[pd.DataFrame, np.ndarray | None]:
    """var with unique gene symbols; keeps only 'Gene Expression' features when types are mixed."""
    names = np.asarray([str(n) for n in names], dtype=object)
    ids = np.asarray([str(i) for i in ids], dtype=object)
    keep = None
    if ftype is not None:
        ftype = np.asarray([str(t) for t in ftype], dtype=object)
        ge = ftype == "Gene Expression"
        if ge.any() and not ge.all():
            keep = np.flatnonzero(ge)
            names, ids, ftype = names[keep], ids[keep], ftype[keep]
    var = pd.DataFrame({"gene_ids": ids}, index=_make_unique(names))
    if ftype is not None:
        var["feature_types"] = ftype
    return var, keep


# ================================================================================================
# Visium
# ================================================================================================
_POS_COLS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _resolve_outs(p: Path, strict: bool = True) -> Path | None:
    """The Space Ranger ``outs`` folder for a path given as outs, its parent, spatial/, or a file in them."""
    cands = []
    if p.is_file():
        p = p.parent
    if p.name == "spatial":
        cands.append(p.parent)
    cands += [p / "outs", p]
    for c in cands:
        spatial = c / "spatial"
        if spatial.is_dir() and _positions_file(spatial) is not None:
            return c
    if strict:
        raise DataFormatError(p, "no Space Ranger spatial/tissue_positions file found",
                              "the 'outs' folder (or its parent, or outs/spatial) of a Space Ranger run")
    return None


def _is_hd_outs(outs: Path) -> bool:
    sf = outs / "spatial" / "scalefactors_json.json"
    if (outs / "spatial" / "tissue_positions.parquet").is_file() or _SQUARE_RE.search(outs.name):
        return True
    if sf.is_file():
        try:
            return "bin_size_um" in json.loads(sf.read_text())
        except Exception:
            return False
    return False


def _positions_file(spatial: Path) -> Path | None:
    return _first_existing(spatial, ("tissue_positions.parquet", "tissue_positions.csv",
                                     "tissue_positions_list.csv"))


def _read_positions(path: Path) -> pd.DataFrame:
    """Space Ranger tissue positions (v1 headerless CSV, v2 CSV with header, parquet) indexed by barcode."""
    exp = ("columns barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres "
           "(tissue_positions_list.csv has no header)")
    with _wrap(path, "cannot parse tissue positions", exp):
        if _lower_name(path).endswith(".parquet"):
            df = pd.read_parquet(path)
        else:
            head = _read_text_head(path, 4096)
            first = head.splitlines()[0] if head.strip() else ""
            has_header = "barcode" in first.lower() or "in_tissue" in first.lower()
            with _open_binary(path) as fh:
                df = pd.read_csv(fh, header=0 if has_header else None, dtype={0: str} if not has_header else None)
            if not has_header:
                if df.shape[1] != 6:
                    raise DataFormatError(path, f"{df.shape[1]} columns without a header", exp)
                df.columns = _POS_COLS
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in _POS_COLS if c not in df.columns]
    if missing:
        raise DataFormatError(path, f"missing columns {missing} (found {list(df.columns)[:8]})", exp)
    if len(df) == 0:
        raise DataFormatError(path, "no spots listed", exp)
    df = df[_POS_COLS].copy()
    df["barcode"] = df["barcode"].astype(str)
    for c in _POS_COLS[1:]:
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any():
            i = int(np.flatnonzero(v.isna().to_numpy())[0])
            raw = df[c].iloc[i]
            shown = "an empty/NaN value" if pd.isna(raw) else f"non-numeric value {str(raw)!r}"
            raise DataFormatError(path, f"{shown} in column {c!r} (row {i + 1})", exp)
        if not np.all(np.isfinite(v.to_numpy(float))):
            raise DataFormatError(path, f"infinite value in column {c!r}", exp)
        df[c] = v
    for c in ("in_tissue", "array_row", "array_col"):
        df[c] = df[c].astype(np.int64)
    if df["barcode"].duplicated().any():
        raise DataFormatError(path, f"duplicated barcode {df['barcode'][df['barcode'].duplicated()].iloc[0]!r}",
                              "one row per barcode")
    return df.set_index("barcode", drop=True)


def _read_scalefactors(spatial: Path) -> tuple[dict, Path | None]:
    sf_path = spatial / "scalefactors_json.json"
    if not sf_path.is_file():
        return {}, None
    with _wrap(sf_path, "cannot parse scale factors JSON", "a JSON object of numeric scale factors"):
        sf = json.loads(sf_path.read_text())
    if not isinstance(sf, dict):
        raise DataFormatError(sf_path, "not a JSON object", "a JSON object of numeric scale factors")
    out = {}
    for k, v in sf.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    for k in ("tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres", "microns_per_pixel"):
        if k in sf and not _finite_pos(sf[k]):
            raise DataFormatError(sf_path, f"scale factor {k}={sf[k]!r} is not a positive number",
                                  "positive numeric scale factors")
    return out, sf_path


def _fullres_candidates(dirs: Iterable[Path]) -> list[Path]:
    out = []
    for d in dirs:
        for q in _find_images(d):
            n = _lower_name(q)
            if q.suffix.lower() == ".png":
                continue
            if any(x in n for x in _FULLRES_EXCLUDE):
                continue
            if "full" in n or "image" in n or n.startswith("he") or "_he" in n or "h&e" in n:
                out.append(q)
    return out


def _pick_visium_image(*, coord_file, xy, sf: dict, spatial: Path, search_dirs, image, name: str,
                       spot_diameter_px: float):
    """Choose the Sample image: user image > full-res beside outs > hires PNG > lowres PNG.

    Returns (HistologyImage | None, source string, {key: decoded PNG array}, {key: (H, W)})."""
    hires_s, lowres_s = sf.get("tissue_hires_scalef"), sf.get("tissue_lowres_scalef")
    arrays, imgs, shapes = {}, {}, {}
    for key, fname, s in (("hires", "tissue_hires_image.png", hires_s),
                          ("lowres", "tissue_lowres_image.png", lowres_s)):
        q = spatial / fname
        if q.is_file() and _finite_pos(s):
            im = _open_image(q, fullres_per_px=1.0 / s)
            arr = _decoded(im)
            arrays[key] = arr
            imgs[key] = im
            shapes[key] = arr.shape[:2]
    expected_full = None
    for key, s in (("hires", hires_s), ("lowres", lowres_s)):
        if key in shapes:
            expected_full = (shapes[key][0] / s, shapes[key][1] / s)
            break

    if image is not None:
        im = _open_image(Path(image), 1.0)
        _check_spots_inside(coord_file, xy, im, spot_diameter_px, "image")
        return im, f"user image {Path(image).name}", arrays, shapes

    for cand in _fullres_candidates(search_dirs):
        try:
            im = _open_image(cand, 1.0)
        except DataFormatError as exc:
            warnings.warn(f"{name}: skipping {cand.name}: {exc}", stacklevel=3)
            continue
        H, W = im.shape
        if expected_full is not None:
            if abs(H / expected_full[0] - 1) > 0.03 or abs(W / expected_full[1] - 1) > 0.03:
                warnings.warn(f"{name}: {cand} is {W}×{H} px but the scale factors imply a "
                              f"{expected_full[1]:.0f}×{expected_full[0]:.0f} px full-resolution image; not used",
                              stacklevel=3)
                continue
        if _spots_inside(xy, im, _margin_px(im, spot_diameter_px)).all():
            return im, f"full-resolution {cand.name}", arrays, shapes

    for key in ("hires", "lowres"):
        if key not in imgs:
            continue
        arr = arrays[key]
        if arr.size == 0 or int(arr.max()) == int(arr.min()):
            warnings.warn(f"{name}: tissue_{key}_image.png is blank (one colour); not used as histology",
                          stacklevel=3)
            continue
        _check_spots_inside(coord_file, xy, imgs[key], spot_diameter_px, f"{key} image")
        return imgs[key], f"tissue_{key}_image.png", arrays, shapes
    warnings.warn(f"{name}: no usable histology image found (spots only)", stacklevel=3)
    return None, "none", arrays, shapes


def _visium_lattice_um(pos: pd.DataFrame) -> float:
    """Visium hexagonal lattice: one array_col step is 50 µm, one array_row step 50·√3 µm."""
    return _lattice_fit_um_per_px(pos[["array_col", "array_row"]].to_numpy(float),
                                  pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float),
                                  (50.0, 50.0 * math.sqrt(3.0)))


def _join_counts_positions(X, barcodes, pos: pd.DataFrame, matrix_path: Path, pos_path: Path,
                           filtered: bool, name: str):
    barcodes = np.asarray([str(b) for b in barcodes], dtype=object)
    if len(set(barcodes)) != len(barcodes):
        raise DataFormatError(matrix_path, "duplicated barcodes in the count matrix", "unique barcodes")
    in_pos = pd.Index(pos.index).get_indexer(barcodes)
    keep = np.flatnonzero(in_pos >= 0)
    if not filtered:
        keep = keep[pos["in_tissue"].to_numpy()[in_pos[keep]] == 1]
    if len(keep) == 0:
        raise DataFormatError(
            matrix_path,
            f"barcode mismatch: none of the {len(barcodes)} barcodes of the count matrix ({matrix_path.name}) "
            f"appear in {pos_path} (e.g. {barcodes[0] if len(barcodes) else '—'!s} vs {pos.index[0]!s})",
            "the count matrix and spatial/tissue_positions of the same run (same barcode suffix, e.g. -1)")
    n_drop = len(barcodes) - len(keep)
    if n_drop:
        warnings.warn(f"{name}: {n_drop} of {len(barcodes)} barcodes in {matrix_path.name} have no position in "
                      f"{pos_path.name} (or are off tissue) and were dropped", stacklevel=3)
    return X[keep], barcodes[keep], pos.iloc[in_pos[keep]], n_drop


def _sample_name(outs: Path) -> str:
    return outs.parent.name if outs.name == "outs" else outs.name


def read_visium(path, *, image=None, name: str | None = None, library_id: str | None = None) -> Sample:
    """Read 10x Visium Space Ranger output.

    ``path``: the ``outs`` folder, its parent, ``outs/spatial`` or a file inside them. ``image``:
    optional full-resolution H&E (the one Space Ranger was run with); otherwise a ``*full*``/``*image*``
    TIFF/JPEG beside ``outs`` is used when its size matches the scale factors, else the hires PNG
    (``fullres_per_px = 1/tissue_hires_scalef``), else the lowres PNG. Spot positions stay in
    full-resolution pixels. µm/px: ``microns_per_pixel`` if present, else
    ``spot_diameter_fullres`` ↔ 65 µm (Space Ranger's definition), else the 100 µm lattice;
    cross-checked against the lattice fit (warning above 10 %)."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise DataFormatError(p, "path does not exist", "a Space Ranger outs folder")
    if _resolve_hd_dir(p, strict=False) is not None:
        return read_visium_hd(p, image=image, name=name)
    outs = _resolve_outs(p)
    if _is_hd_outs(outs):
        return read_visium_hd(outs, image=image, name=name)
    spatial = outs / "spatial"
    pos_path = _positions_file(spatial)
    pos = _read_positions(pos_path)
    sf, sf_path = _read_scalefactors(spatial)
    name = name or _sample_name(outs)

    X, barcodes, names, ids, ftype, mpath, filtered = _load_matrix(outs)
    X, values = _validate_counts(X, mpath)
    var, keep_f = _gene_var(names, ids, ftype)
    if keep_f is not None:
        X = X[:, keep_f]
    X, barcodes, pos_k, n_drop = _join_counts_positions(X, barcodes, pos, mpath, pos_path, filtered, name)

    # -- scale ------------------------------------------------------------------------------------
    um_lattice = _visium_lattice_um(pos)
    if "microns_per_pixel" in sf:
        um, um_src = sf["microns_per_pixel"], "scalefactors microns_per_pixel"
    elif "spot_diameter_fullres" in sf:
        um = VISIUM_SPOT_DIAMETER_FULLRES_UM / sf["spot_diameter_fullres"]
        um_src = f"scalefactors spot_diameter_fullres ↔ {VISIUM_SPOT_DIAMETER_FULLRES_UM:g} µm"
    elif math.isfinite(um_lattice):
        um, um_src = um_lattice, "100 µm spot lattice fit"
    else:
        raise DataFormatError(sf_path or spatial / "scalefactors_json.json",
                              "cannot determine µm per pixel (no scale factors, too few spots for the lattice)",
                              "scalefactors_json.json with spot_diameter_fullres")
    xy = pos_k[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    scalefs = {k: sf.get(f"tissue_{k}_scalef") for k in ("hires", "lowres")}

    # -- image ------------------------------------------------------------------------------------
    spot_d_px = SPOT_DIAMETER_UM["visium"] / um
    # guard first: downscaled coordinates would otherwise fail the image checks confusingly
    arrays_shapes = {}
    for key, fname in (("hires", "tissue_hires_image.png"), ("lowres", "tissue_lowres_image.png")):
        q = spatial / fname
        if q.is_file():
            try:
                arrays_shapes[key] = _open_image(q).shape
            except DataFormatError:
                pass
    _guard_downscaled_coordinates(pos_path, pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float),
                                  um, um_lattice, scalefs, arrays_shapes)
    _warn_scale(name, um, um_lattice, 100.0, um_src)
    img, img_src, arrays, shapes = _pick_visium_image(
        coord_file=pos_path, xy=xy, sf=sf, spatial=spatial, search_dirs=[outs, outs.parent], image=image,
        name=name, spot_diameter_px=spot_d_px)

    lib = library_id or name
    hs = scalefs["hires"] or (scalefs["lowres"] or 1.0)
    uns = {"spatial": build_uns_spatial(
        lib, hires=arrays.get("hires"), hires_scalef=hs,
        spot_diameter_fullres=sf.get("spot_diameter_fullres", VISIUM_SPOT_DIAMETER_FULLRES_UM / um),
        lowres=arrays.get("lowres"), lowres_scalef=scalefs["lowres"],
        metadata={"source": str(outs), "reader": "napari_diffst.read_visium"})}
    for k in ("fiducial_diameter_fullres", "regist_target_img_scalef"):
        if k in sf:
            uns["spatial"][lib]["scalefactors"][k] = sf[k]
    obs = pos_k[["in_tissue", "array_row", "array_col"]].copy()
    obs.index = barcodes
    adata = _new_adata(X, obs, var, xy, uns)
    return Sample(
        adata=adata, image=img, um_per_px=float(um), spot_diameter_um=SPOT_DIAMETER_UM["visium"],
        technology="visium", name=name, lattice_pitch_um=LATTICE_PITCH_UM["visium"],
        provenance={"reader": "read_visium", "format": "visium", "values": values,
                    "files": {"matrix": str(mpath), "positions": str(pos_path),
                              "scalefactors": str(sf_path) if sf_path else None,
                              "image": str(img.path) if img is not None and img.path else None},
                    "image_source": img_src, "um_per_px_source": um_src, "um_per_px_lattice": um_lattice,
                    "n_dropped_barcodes": int(n_drop)},
    )


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
    shapes0 = {}
    for key in ("hires", "lowres"):
        q = spatial / f"tissue_{key}_image.png"
        if q.is_file():
            try:
                shapes0[key] = _open_image(q).shape
            except DataFormatError:
                pass
    _guard_downscaled_coordinates(pos_path, pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float),
                                  um, um_lattice, scalefs, shapes0)
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


# ================================================================================================
# legacy ST (her2st, ST spot detector, STUtility)
# ================================================================================================
#: Accepted (case-insensitive; spaces/dots/dashes read as '_') names for the spot-table columns.
SPOT_COLUMN_ALIASES = {
    "x": ("x", "array_x", "arrayx", "array_col", "spot_x", "col"),
    "y": ("y", "array_y", "arrayy", "array_row", "spot_y", "row"),
    "new_x": ("new_x", "newx", "adj_x", "x_adj", "adjusted_x"),
    "new_y": ("new_y", "newy", "adj_y", "y_adj", "adjusted_y"),
    "pixel_x": ("pixel_x", "pixelx", "px_x", "x_pixel", "pixel_col", "pxl_col_in_fullres", "imagecol", "image_x"),
    "pixel_y": ("pixel_y", "pixely", "px_y", "y_pixel", "pixel_row", "pxl_row_in_fullres", "imagerow", "image_y"),
    "selected": ("selected", "in_tissue", "under_tissue", "tissue", "is_selected"),
}
_HEADERLESS_SPOT_COLS = ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]
_EXPECT_SPOTS = ("a tab-separated spot table with columns x, y, pixel_x, pixel_y[, new_x, new_y, selected] "
                 "(ST spot detector / her2st *_selection.tsv)")
_EXPECT_LEGACY_COUNTS = ("a spots × genes table: first column spot labels 'XxY' (e.g. 10x21), header of gene "
                         "names, raw integer counts (genes × spots is transposed automatically)")


def _norm_col(c) -> str:
    return re.sub(r"[\s.\-]+", "_", str(c).strip().lower())


def _is_spot_file(p: Path) -> bool:
    return _has_ext(p, _TABLE_EXT) and bool(_SPOTFILE_RE.search(p.name))


def _strip_table_ext(name: str) -> str:
    n = name
    for e in (".gz", ".tsv", ".csv", ".txt"):
        if n.lower().endswith(e):
            n = n[: -len(e)]
    return n


def _section_tokens(name: str) -> set[str]:
    stem = _strip_table_ext(name)
    toks = set(t for t in re.split(r"[_\-.\s]+", stem) if t)
    return toks - {"selection", "spot", "spots", "data", "stdata", "counts", "count", "tsv", "all", "matrix"}


def _legacy_pairs(folder: Path, counts_hint: Path | None = None) -> list[tuple[Path, Path]]:
    """(counts, spot file) pairs in a folder, matched by shared name tokens (C2.tsv.gz ↔ C2_selection.tsv,
    stdata_A1.tsv ↔ spots_A1.tsv). Names only; no content read."""
    if not folder.is_dir():
        return []
    files = [q for q in folder.iterdir() if q.is_file() and not q.name.startswith(".")]
    spots = [q for q in files if _is_spot_file(q)]
    counts = [q for q in files if _has_ext(q, _TABLE_EXT) and q not in spots
              and not _lower_name(q).startswith(("readme", "metadata", "meta_", "info"))]
    if counts_hint is not None:
        if counts_hint in spots:
            if len(counts) == 1:
                return [(counts[0], counts_hint)]
            tok = _section_tokens(counts_hint.name)
            m = [c for c in counts if _section_tokens(c.name) & tok]
            return [(m[0], counts_hint)] if len(m) == 1 else []
        counts = [c for c in counts if c == counts_hint]
    if not spots or not counts:
        return []
    if len(spots) == 1 and len(counts) == 1:
        return [(counts[0], spots[0])]
    pairs = []
    for c in counts:
        tok = _section_tokens(c.name)
        m = [s for s in spots if _section_tokens(s.name) & tok]
        if len(m) == 1:
            pairs.append((c, m[0]))
        elif len(m) == 0 and len(spots) == 1 and len(counts) == 1:
            pairs.append((c, spots[0]))
    return pairs if (counts_hint is not None or len(pairs) == 1) else []


def _read_table_str(path: Path) -> tuple[pd.DataFrame, str]:
    head = _read_text_head(path, 8192)
    if not head.strip():
        raise DataFormatError(path, "file is empty", _EXPECT_SPOTS)
    sep = _sniff_sep(head.splitlines()[0])
    with _open_binary(path) as fh:
        df = pd.read_csv(fh, sep=sep, header=None, dtype=str, keep_default_na=False, engine="python"
                         if sep == r"\s+" else "c", skip_blank_lines=True)
    return df, sep


def _to_float(s: str) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v


def _read_spot_table(path: Path) -> pd.DataFrame:
    """Spot table with canonical columns x, y, pixel_x, pixel_y, selected[, new_x, new_y]."""
    with _wrap(path, "cannot parse spot table", _EXPECT_SPOTS):
        raw, _ = _read_table_str(path)
    if raw.shape[0] == 0:
        raise DataFormatError(path, "no rows", _EXPECT_SPOTS)
    first = [str(v) for v in raw.iloc[0].tolist()]
    numeric_first = all(_to_float(v) is not None for v in first if v != "")
    if numeric_first:  # headerless ST spot detector output: x y new_x new_y pixel_x pixel_y [selected]
        if raw.shape[1] not in (6, 7):
            raise DataFormatError(path, f"no header and {raw.shape[1]} columns", _EXPECT_SPOTS)
        df = raw.copy()
        df.columns = _HEADERLESS_SPOT_COLS[: raw.shape[1]]
    else:
        cols = [_norm_col(c) for c in first]
        df = raw.iloc[1:].reset_index(drop=True)
        # R-style tables: header one shorter than the rows (row names in the first column)
        if len(cols) == df.shape[1] - 1:
            cols = ["_rowname"] + cols
        df.columns = cols[: df.shape[1]] + [f"_c{i}" for i in range(len(cols), df.shape[1])]
        rename = {}
        for canon, aliases in SPOT_COLUMN_ALIASES.items():
            for a in aliases:
                if a in df.columns and canon not in rename.values():
                    rename[a] = canon
                    break
        df = df.rename(columns=rename)
        df = df.loc[:, ~df.columns.duplicated()]
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in df.columns]
    if missing:
        raise DataFormatError(path, f"missing columns {missing} (found {[c for c in df.columns][:10]})",
                              _EXPECT_SPOTS)
    if len(df) == 0:
        raise DataFormatError(path, "no spot rows", _EXPECT_SPOTS)
    out = pd.DataFrame(index=range(len(df)))
    for c in ("x", "y", "pixel_x", "pixel_y", "new_x", "new_y", "selected"):
        if c not in df.columns:
            continue
        v = pd.to_numeric(df[c].astype(str).str.strip(), errors="coerce").to_numpy(float)
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataFormatError(path, f"non-numeric, missing or infinite value {df[c].iloc[i]!r} in column "
                                  f"{c!r} (row {i + 1})", _EXPECT_SPOTS)
        out[c] = v
    if "selected" not in out:
        out["selected"] = 1.0
    elif not np.isin(out["selected"].to_numpy(), (0.0, 1.0)).all():
        raise DataFormatError(path, "column 'selected' has values other than 0/1", _EXPECT_SPOTS)
    return out


def _parse_labels(labels) -> np.ndarray:
    """'XxY' spot labels -> (N, 2) float array (NaN where unparsable)."""
    out = np.full((len(labels), 2), np.nan)
    for i, lab in enumerate(labels):
        m = _LABEL_RE.match(str(lab))
        if m:
            out[i] = float(m.group(1)), float(m.group(2))
    return out


def _unquote(t: str) -> str:
    t = t.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1]
    return t


def _fast_table(text: str, sep: str):
    """Fast path for a plain rectangular numeric table with row labels (np.loadtxt on the body):
    returns (row labels, column labels, float array) or None (then pandas parses it)."""
    if sep not in ("\t", ","):
        return None
    try:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) < 2 or '"' in lines[1].split(sep, 1)[-1]:
            return None
        header = [_unquote(t) for t in lines[0].split(sep)]
        parts = [ln.split(sep, 1) for ln in lines[1:]]
        if any(len(pp) != 2 for pp in parts):
            return None
        labels = [_unquote(pp[0]) for pp in parts]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vals = np.loadtxt(io.StringIO("\n".join(pp[1] for pp in parts)), delimiter=sep, dtype=np.float64,
                              ndmin=2, comments=None)
        if vals.shape[0] != len(labels):
            return None
        if len(header) == vals.shape[1] + 1:
            cols = header[1:]
        elif len(header) == vals.shape[1]:
            cols = header
        else:
            return None
        return labels, cols, vals
    except Exception:
        return None


def _read_legacy_counts(path: Path):
    """Counts table -> (CSR int spots × genes, spot labels, (N,2) label coords, gene names)."""
    with _wrap(path, "cannot parse counts table", _EXPECT_LEGACY_COUNTS):
        with _open_binary(path) as fh:
            text = fh.read().decode("utf-8", errors="replace")
        if not text.strip():
            raise DataFormatError(path, "file is empty", _EXPECT_LEGACY_COUNTS)
        sep = _sniff_sep(text.lstrip("\n\r").splitlines()[0])
        fast = _fast_table(text, sep)
        if fast is not None:
            rows, cols, vals = fast
            df = None
        else:
            df = pd.read_csv(io.StringIO(text), sep=sep, index_col=0, header=0,
                             engine="python" if sep == r"\s+" else "c")
            rows, cols, vals = [str(i) for i in df.index], [str(c) for c in df.columns], None
    if len(rows) == 0 or len(cols) == 0:
        raise DataFormatError(path, f"empty count matrix ({len(rows)} rows × {len(cols)} columns)",
                              _EXPECT_LEGACY_COUNTS)
    if vals is None:  # slow path: locate non-numeric cells for the message
        raw = df.to_numpy()
        if raw.dtype.kind not in "biuf":
            num = df.apply(pd.to_numeric, errors="coerce")
            badm = num.isna().to_numpy() & ~df.isna().to_numpy()
            if badm.any():
                r, c = np.argwhere(badm)[0]
                raise DataFormatError(path, f"non-numeric value {df.iat[r, c]!r} in row {rows[r]!r}, column "
                                      f"{cols[c]!r}", _EXPECT_LEGACY_COUNTS)
            raw = num.to_numpy(float)
        vals = np.asarray(raw, dtype=np.float64)
    row_xy = _parse_labels(rows)
    col_xy = _parse_labels(cols)
    r_ok, c_ok = np.isfinite(row_xy).all(1), np.isfinite(col_xy).all(1)
    if r_ok.sum() == 0 and c_ok.sum() > 0 and c_ok.mean() > 0.5:  # genes × spots: transpose
        rows, cols, vals = cols, rows, vals.T
        row_xy, r_ok = col_xy, c_ok
    if r_ok.sum() == 0:
        raise DataFormatError(path, f"no spot labels like '10x21' in the first column (found e.g. {rows[0]!r})",
                              _EXPECT_LEGACY_COUNTS)
    if not r_ok.all():
        warnings.warn(f"{path.name}: {int((~r_ok).sum())} rows without an 'XxY' spot label ignored "
                      f"(e.g. {rows[int(np.flatnonzero(~r_ok)[0])]!r})", stacklevel=3)
        keep = np.flatnonzero(r_ok)
        vals, row_xy = vals[keep], row_xy[keep]
        rows = [rows[i] for i in keep]
    labels = np.asarray([str(i).strip() for i in rows], dtype=object)
    if len(set(labels)) != len(labels):
        dup = pd.Series(labels)[pd.Series(labels).duplicated()].iloc[0]
        raise DataFormatError(path, f"duplicated spot label {dup!r}", "one row per spot")
    if np.isnan(vals).any():
        r, c = np.argwhere(np.isnan(vals))[0]
        raise DataFormatError(path, f"missing/NaN count at spot {labels[r]!r}, gene {cols[c]!r}",
                              _EXPECT_LEGACY_COUNTS)
    X, _ = _validate_counts(sp.csr_matrix(vals), path)
    return X, labels, row_xy, [str(g) for g in cols]


def _pick_legacy_image(folder: Path, section: str, image) -> Path | None:
    if image is not None:
        return Path(image)
    imgs = [q for q in _find_images(folder) if not any(x in _lower_name(q) for x in ("thumb", "mask", "small"))]
    if not imgs:
        return None
    if len(imgs) == 1:
        return imgs[0]
    by_id = [q for q in imgs if section.lower() in _lower_name(q)]
    if len(by_id) == 1:
        return by_id[0]
    he = [q for q in imgs if re.search(r"(^|[_\-.])he([_\-.]|$)", _lower_name(q))]
    pool = he or imgs
    return max(pool, key=lambda q: q.stat().st_size)


def read_legacy_st(path, *, image=None, name: str | None = None, um_per_px: float | None = None) -> Sample:
    """Read a legacy Spatial Transcriptomics section (Ståhl et al. 2016 arrays; her2st, STUtility).

    ``path``: the section folder, or its counts / spot file. The folder holds a counts table
    (spots × genes, ``XxY`` labels), a spot table (``*_selection.tsv``, ``spots_*.tsv``,
    ``*spot_data*.tsv``; columns see :data:`SPOT_COLUMN_ALIASES`) and the H&E image (found by
    extension). Only ``selected == 1`` spots that have counts are kept. ``obsm['spatial']`` =
    (pixel_x, pixel_y) full-res px, ``obs.array_col/array_row`` = x/y. µm/px is fitted from the
    200 µm lattice (array index → pixel affine). The image is opened lazily; ``uns['spatial']`` gets a
    ≤2000 px hires thumbnail from a JPEG draft decode (the full image is not decoded here)."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise DataFormatError(p, "path does not exist", "a legacy ST section folder")
    folder = p if p.is_dir() else p.parent
    pairs = _legacy_pairs(folder, counts_hint=None if p.is_dir() else p)
    if not pairs:
        raise DataFormatError(
            p, "cannot find exactly one (counts table, spot table) pair",
            "a folder with one counts table ('<id>.tsv.gz', spots × genes) and one spot table "
            "('<id>_selection.tsv', 'spots_<id>.tsv' or '*spot_data*.tsv'); pass the counts file when a folder "
            "holds several sections")
    if len(pairs) > 1:
        raise DataFormatError(p, f"{len(pairs)} sections in one folder ({', '.join(c.name for c, _ in pairs)})",
                              "the counts file of the section to open")
    counts_path, spots_path = pairs[0]
    section = _strip_table_ext(counts_path.name)
    for suf in ("_stdata", "_counts", "_count", "_matrix"):
        if section.lower().endswith(suf):
            section = section[: -len(suf)]
    for pre in ("stdata_", "counts_", "count_"):
        if section.lower().startswith(pre):
            section = section[len(pre):]
    name = name or section or folder.name

    spots = _read_spot_table(spots_path)
    X, labels, lab_xy, genes = _read_legacy_counts(counts_path)
    sel = spots[spots["selected"] == 1].reset_index(drop=True)
    if len(sel) == 0:
        raise DataFormatError(spots_path, "no spot has selected == 1", "spots under tissue marked selected = 1")

    def keys(a):
        return [(round(float(u), 3), round(float(v), 3)) for u, v in a]

    skeys = keys(sel[["x", "y"]].to_numpy())
    if len(set(skeys)) != len(skeys):
        raise DataFormatError(spots_path, "duplicated (x, y) array positions among selected spots",
                              "one row per array spot")
    lookup = {k: i for i, k in enumerate(skeys)}
    lkeys = keys(lab_xy)
    idx = np.asarray([lookup.get(k, -1) for k in lkeys])
    if (idx >= 0).sum() == 0 and {"new_x", "new_y"} <= set(sel.columns):
        nkeys = keys(sel[["new_x", "new_y"]].to_numpy())
        lookup = {k: i for i, k in enumerate(nkeys)}
        idx = np.asarray([lookup.get(k, -1) for k in lkeys])
    keep = np.flatnonzero(idx >= 0)
    if len(keep) == 0:
        raise DataFormatError(
            counts_path,
            f"spot mismatch: none of the {len(labels)} spot labels of {counts_path.name} (e.g. {labels[0]!r}) "
            f"match a selected spot (x, y) in {spots_path.name}",
            "counts labels 'XxY' equal to the x, y columns of the spot table of the same section")
    X = X[keep]
    labels = labels[keep]
    srow = sel.iloc[idx[keep]].reset_index(drop=True)
    n_unmatched = int(len(sel) - len(keep))
    xy = srow[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    array_cr = srow[["x", "y"]].to_numpy(np.float64)

    # -- scale: 200 µm lattice -------------------------------------------------------------------
    pitch = LATTICE_PITCH_UM["legacy_st"]
    um_fit = _lattice_fit_um_per_px(sel[["x", "y"]].to_numpy(float), sel[["pixel_x", "pixel_y"]].to_numpy(float),
                                    (pitch, pitch))
    um_nn = estimate_um_per_px(sel[["pixel_x", "pixel_y"]].to_numpy(float), pitch)
    if um_per_px is not None:
        if not _finite_pos(um_per_px):
            raise DataFormatError(None, f"um_per_px={um_per_px!r} is not a positive number", "a positive float")
        um, um_src = float(um_per_px), "user"
    elif _finite_pos(um_fit):
        um, um_src = um_fit, "200 µm lattice fit (array index → pixel affine)"
    elif _finite_pos(um_nn):
        um, um_src = um_nn, "200 µm lattice (median nearest-neighbour distance)"
    else:
        raise DataFormatError(spots_path, f"cannot estimate µm per pixel from {len(sel)} selected spot(s) "
                              "(need ≥ 3 non-collinear spots at distinct pixel positions)",
                              "a spot table covering the section, or pass um_per_px=")
    if not (1e-3 < um < 1e3):
        raise DataFormatError(spots_path, f"implausible pixel size {um:.3g} µm/px from the spot lattice "
                              "(pixel_x/pixel_y inconsistent with x/y?)", _EXPECT_SPOTS)

    # -- image -----------------------------------------------------------------------------------
    img_path = _pick_legacy_image(folder, section, image)
    img = None
    uns = None
    spot_d_px = SPOT_DIAMETER_UM["legacy_st"] / um
    if img_path is not None:
        img = _open_image(img_path, 1.0)
        _check_spots_inside(spots_path, xy, img, spot_d_px, "image")
        thumb, scale = _thumbnail(img, 2000)
        uns = {"spatial": build_uns_spatial(name, hires=thumb, hires_scalef=scale, spot_diameter_fullres=spot_d_px,
                                            metadata={"source_image_path": str(img_path),
                                                      "reader": "napari_diffst.read_legacy_st"})}
    else:
        warnings.warn(f"{name}: no H&E image (.jpg/.tif/.png) found in {folder}; spots only", stacklevel=2)
    obs = pd.DataFrame({"in_tissue": np.ones(len(labels), np.int64),
                        "array_row": srow["y"].to_numpy(), "array_col": srow["x"].to_numpy()}, index=labels)
    for c in ("new_x", "new_y"):
        if c in srow:
            obs[c] = srow[c].to_numpy()
    for c in ("array_row", "array_col"):
        if np.all(np.mod(obs[c].to_numpy(), 1) == 0):
            obs[c] = obs[c].astype(np.int64)
    var = pd.DataFrame(index=_make_unique(genes))
    adata = _new_adata(X, obs, var, xy, uns)
    return Sample(
        adata=adata, image=img, um_per_px=float(um), spot_diameter_um=SPOT_DIAMETER_UM["legacy_st"],
        technology="legacy_st", name=name, lattice_pitch_um=pitch,
        provenance={"reader": "read_legacy_st", "format": "legacy_st", "values": "counts",
                    "files": {"counts": str(counts_path), "spots": str(spots_path),
                              "image": str(img_path) if img_path else None},
                    "image_source": img_path.name if img_path else "none",
                    "um_per_px_source": um_src, "um_per_px_lattice": um_fit, "um_per_px_nn": um_nn,
                    "n_selected_without_counts": n_unmatched, "array_coords_for_fit": "x, y"},
    )


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
