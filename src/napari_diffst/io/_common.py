"""Shared helpers of the format readers (one module per format in :mod:`napari_diffst.io`): file and
table sniffing, count validation, the lattice scale fit, image checks. Qt-free."""
from __future__ import annotations

import gzip
import math
import re
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.sample import HistologyImage
from ..errors import DataFormatError

#: Tolerance (relative) between metadata µm/px and the lattice estimate before warning.
SCALE_TOL = 0.10

_IMAGE_EXT = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf", ".svs", ".ndpi", ".scn", ".jpg", ".jpeg", ".png")
_TABLE_EXT = (".tsv", ".tsv.gz", ".csv", ".csv.gz", ".txt", ".txt.gz")
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


def _spaceranger_image_shapes(spatial: Path) -> dict:
    """Shapes of Space Ranger's ``tissue_{hires,lowres}_image.png`` in ``spatial`` (those present and readable),
    for :func:`_guard_downscaled_coordinates`."""
    shapes = {}
    for key in ("hires", "lowres"):
        q = Path(spatial) / f"tissue_{key}_image.png"
        if q.is_file():
            try:
                shapes[key] = _open_image(q).shape
            except DataFormatError:
                pass
    return shapes


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
