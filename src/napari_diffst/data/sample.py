"""The per-section data model: histology image + AnnData of spots, in one physical frame.

Coordinate conventions (see docs/coordinates.md):

* ``adata.obsm['spatial']`` holds spot centres as (x, y) = (column, row) in **full-resolution
  image pixels**, exactly like scanpy/squidpy.
* ``Sample.um_per_px`` is the size of one full-resolution pixel in µm.
* ``Sample.image`` may be stored at a lower resolution than full-res (Visium hires/lowres PNGs);
  ``HistologyImage.fullres_per_px`` says how many full-res pixels one stored pixel spans, so the
  napari layer scale is ``um_per_px * fullres_per_px`` and coordinates are never mixed up.
* ``Sample.transform`` is a 3×3 affine on homogeneous (x, y, 1) full-res pixel coordinates that
  maps spot positions onto the image (registration). It is identity when the metadata is
  consistent, and is applied as a napari layer affine, never by resampling the image.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataFormatError

__all__ = [
    "HistologyImage",
    "Sample",
    "LATTICE_PITCH_UM",
    "estimate_um_per_px",
    "nearest_neighbour_distance",
    "build_uns_spatial",
]

#: Centre-to-centre spot pitch of each technology's lattice, in µm.
LATTICE_PITCH_UM = {"visium": 100.0, "legacy_st": 200.0}

#: Spot diameter in µm per technology.
SPOT_DIAMETER_UM = {"visium": 55.0, "legacy_st": 100.0}

_RASTER_EXT = {".jpg", ".jpeg", ".png", ".bmp"}
_TIFF_EXT = {".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".ndpi", ".scn"}

# Pillow refuses images above ~89 MPx by default ("decompression bomb"); whole-slide JPEGs are
# legitimately larger, so lift the guard once for this process.
try:  # pragma: no cover - trivial
    from PIL import Image as _PILImage

    _PILImage.MAX_IMAGE_PIXELS = None
except Exception:  # pragma: no cover
    _PILImage = None


def _file_key(path: Path) -> tuple[str, float, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime, st.st_size)


@functools.lru_cache(maxsize=6)
def _decode_raster(key: tuple[str, float, int]) -> np.ndarray:
    """Decode a JPEG/PNG once per process (keyed by path, mtime and size)."""
    path = Path(key[0])
    try:
        with _PILImage.open(path) as im:
            im = im.convert("RGB")
            arr = np.asarray(im)
    except Exception as exc:  # corrupted / truncated / not an image
        raise DataFormatError(path, f"cannot decode image ({exc})", "a readable RGB JPEG/PNG/TIFF") from exc
    arr.setflags(write=False)
    return arr


def decode_count() -> int:
    """How many distinct raster images were decoded in this process (for tests)."""
    info = _decode_raster.cache_info()
    return info.misses


class HistologyImage:
    """A lazily-read RGB histology image, optionally pyramidal.

    Parameters
    ----------
    levels : sequence of array-likes ``(Y, X, 3)``, largest first; may be lazy (zarr) arrays.
        Use :meth:`open` for files; for files the pixels are only read on first access.
    fullres_per_px : full-resolution pixels spanned by one pixel of level 0.
    path : source file, if any.
    """

    def __init__(self, levels=None, *, fullres_per_px: float = 1.0, path: str | os.PathLike | None = None,
                 shape: tuple[int, int] | None = None, loader=None):
        self.path = None if path is None else Path(path)
        self.fullres_per_px = float(fullres_per_px)
        self._levels = None if levels is None else list(levels)
        self._loader = loader
        self._shape = shape
        if self._levels is None and self._loader is None:
            raise ValueError("HistologyImage needs levels or a loader")

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_array(cls, arr: np.ndarray, *, fullres_per_px: float = 1.0) -> "HistologyImage":
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise DataFormatError(None, f"image array has shape {arr.shape}", "(Y, X, 3) RGB")
        return cls([arr[..., :3]], fullres_per_px=fullres_per_px)

    @classmethod
    def open(cls, path: str | os.PathLike, *, fullres_per_px: float = 1.0) -> "HistologyImage":
        """Open an image file lazily: JPEG/PNG decoded on first pixel access (once per process),
        TIFF/OME-TIFF/SVS pyramids opened through tifffile's zarr store (tiles read on demand)."""
        path = Path(path)
        if not path.is_file():
            raise DataFormatError(path, "image file not found", "an existing JPEG/PNG/TIFF file")
        name = path.name.lower()
        if any(name.endswith(e) for e in _TIFF_EXT):
            return cls._open_tiff(path, fullres_per_px)
        try:
            with _PILImage.open(path) as im:
                w, h = im.size
        except Exception as exc:
            raise DataFormatError(path, f"not a readable image ({exc})", "a JPEG/PNG/TIFF file") from exc
        key = _file_key(path)
        return cls(loader=lambda: [_decode_raster(key)], fullres_per_px=fullres_per_px, path=path, shape=(h, w))

    @classmethod
    def _open_tiff(cls, path: Path, fullres_per_px: float) -> "HistologyImage":
        import tifffile
        import zarr

        try:
            tif = tifffile.TiffFile(path)
            series = tif.series[0]
            store = series.aszarr()
            grp = zarr.open(store, mode="r")
        except Exception as exc:
            raise DataFormatError(path, f"cannot open TIFF ({exc})", "a readable (OME-)TIFF/SVS file") from exc
        if hasattr(grp, "shape"):  # a single array
            arrays = [grp]
        else:
            keys = sorted(grp.array_keys(), key=lambda k: int(k) if str(k).isdigit() else k)
            arrays = [grp[k] for k in keys]
        levels = []
        for a in arrays:
            axes = series.axes if a is arrays[0] else series.levels[arrays.index(a)].axes
            levels.append(_LazyRGB(a, axes, path))
        img = cls(levels, fullres_per_px=fullres_per_px, path=path)
        img._tiff = tif  # keep the file handle alive
        return img

    # -- access -----------------------------------------------------------------------------
    @property
    def levels(self) -> list:
        if self._levels is None:
            self._levels = list(self._loader())
        return self._levels

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of level 0, without decoding pixels where the format allows."""
        if self._shape is None:
            self._shape = tuple(int(s) for s in self.levels[0].shape[:2])
        return self._shape

    @property
    def is_multiscale(self) -> bool:
        return len(self.levels) > 1

    @property
    def is_loaded(self) -> bool:
        return self._levels is not None

    def level_downsample(self, level: int) -> float:
        return self.shape[0] / self.levels[level].shape[0]

    def read_region(self, r0: int, r1: int, c0: int, c1: int, level: int = 0) -> np.ndarray:
        """Pixels [r0:r1, c0:c1] of a level as a uint8 ``(h, w, 3)`` array, zero-padded outside."""
        arr = self.levels[level]
        H, W = arr.shape[:2]
        out = np.zeros((max(r1 - r0, 0), max(c1 - c0, 0), 3), np.uint8)
        rr0, rr1, cc0, cc1 = max(r0, 0), min(r1, H), max(c0, 0), min(c1, W)
        if rr1 > rr0 and cc1 > cc0:
            out[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = np.asarray(arr[rr0:rr1, cc0:cc1])[..., :3]
        return out

    def thumbnail(self, max_size: int = 2000) -> tuple[np.ndarray, float]:
        """A small RGB copy (longest side ≤ max_size) and its scale relative to level 0.

        JPEGs use libjpeg's DCT scaling (``draft``) so this never decodes the full image."""
        H, W = self.shape
        if max(H, W) <= max_size:
            return np.asarray(self.levels[0][:, :])[..., :3].copy(), 1.0
        if not self.is_loaded and self.path is not None and self.path.suffix.lower() in (".jpg", ".jpeg"):
            with _PILImage.open(self.path) as im:
                im.draft("RGB", (max(1, W * max_size // max(H, W)), max(1, H * max_size // max(H, W))))
                im = im.convert("RGB")
                im.thumbnail((max_size, max_size))
                arr = np.asarray(im)
            return arr, arr.shape[0] / H
        # pick the smallest pyramid level that is still ≥ max_size, then stride
        lvl = 0
        for i, a in enumerate(self.levels):
            if max(a.shape[:2]) >= max_size:
                lvl = i
        a = self.levels[lvl]
        step = int(np.ceil(max(a.shape[:2]) / max_size))
        arr = np.asarray(a[::step, ::step])[..., :3]
        return arr, arr.shape[0] / H

    def napari_data(self):
        """Data for a napari image layer: a multiscale list when the image is large or pyramidal.

        For single-level images the pyramid is made of strided *views* (no copies)."""
        levels = self.levels
        if len(levels) > 1:
            return list(levels), True
        a = levels[0]
        if max(a.shape[:2]) <= 4096 or not isinstance(a, np.ndarray):
            return a, False
        pyr = [a]
        step = 2
        while max(a.shape[:2]) / step > 1024:
            pyr.append(a[::step, ::step])
            step *= 2
        return pyr, True


class _LazyRGB:
    """Array-like view of a zarr level that presents (Y, X, C) RGB whatever the TIFF axes are."""

    def __init__(self, arr, axes: str, path: Path):
        self._arr = arr
        self.axes = axes
        self.path = path
        ax = axes.upper()
        if "Y" not in ax or "X" not in ax:
            raise DataFormatError(path, f"TIFF axes {axes!r} have no Y/X", "a 2D RGB image")
        self._yx = (ax.index("Y"), ax.index("X"))
        self._c = ax.index("S") if "S" in ax else (ax.index("C") if "C" in ax else None)
        shp = arr.shape
        nch = shp[self._c] if self._c is not None else 1
        self.shape = (shp[self._yx[0]], shp[self._yx[1]], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self._nch = nch

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (2 - len(key[:2]))
        sel = [0] * self._arr.ndim
        sel[self._yx[0]] = key[0]
        sel[self._yx[1]] = key[1]
        if self._c is not None:
            sel[self._c] = slice(None)
        a = np.asarray(self._arr[tuple(sel)])
        # move axes to (Y, X, C)
        order = [i for i in (self._yx[0], self._yx[1], self._c) if i is not None]
        kept = [i for i in range(self._arr.ndim) if not isinstance(sel[i], int)]
        a = np.transpose(a, [kept.index(i) for i in order])
        if a.ndim == 2:
            a = a[..., None]
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        a = a[..., :3]
        if a.dtype != np.uint8:
            a = _to_uint8(a)
        return a

    def __array__(self, dtype=None, copy=None):
        a = self[:, :]
        return a if dtype is None else a.astype(dtype)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    hi = float(np.percentile(a, 99.9)) if a.size else 1.0
    return np.clip(a / max(hi, 1e-6) * 255, 0, 255).astype(np.uint8)


def nearest_neighbour_distance(xy: np.ndarray) -> float:
    """Median distance from each spot to its nearest neighbour (pixels)."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, float)
    if len(xy) < 2:
        return float("nan")
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def estimate_um_per_px(xy_px: np.ndarray, pitch_um: float) -> float:
    """µm per full-res pixel estimated from the spot lattice pitch (nearest-neighbour distance)."""
    nn = nearest_neighbour_distance(xy_px)
    return float(pitch_um / nn) if np.isfinite(nn) and nn > 0 else float("nan")


def build_uns_spatial(library_id: str, *, hires: np.ndarray | None, hires_scalef: float,
                      spot_diameter_fullres: float, lowres: np.ndarray | None = None,
                      lowres_scalef: float | None = None, metadata: dict | None = None) -> dict:
    """scanpy's ``uns['spatial']`` layout, so scanpy/squidpy plotting works on our AnnData."""
    images = {}
    if hires is not None:
        images["hires"] = np.ascontiguousarray(hires)
    if lowres is not None:
        images["lowres"] = np.ascontiguousarray(lowres)
    sf = {"tissue_hires_scalef": float(hires_scalef), "spot_diameter_fullres": float(spot_diameter_fullres)}
    if lowres_scalef is not None:
        sf["tissue_lowres_scalef"] = float(lowres_scalef)
    return {library_id: {"images": images, "scalefactors": sf, "metadata": dict(metadata or {})}}


@dataclass
class Sample:
    """One tissue section: histology + spots (AnnData with raw counts) in one physical frame.

    Attributes
    ----------
    adata : AnnData, raw integer counts in ``X`` (CSR sparse), ``obsm['spatial']`` (x, y) full-res px,
        ``obs`` with ``in_tissue`` and, where the technology has them, ``array_row``/``array_col``.
    image : the H&E image (lazy), or None.
    um_per_px : µm per full-resolution image pixel.
    spot_diameter_um : spot (or bin) diameter/side in µm.
    technology : 'visium', 'visium_hd', 'legacy_st', 'h5ad', 'synthetic', ...
    name : short section name used for layer names and benchmark keys.
    transform : 3×3 affine on (x, y, 1) full-res px mapping spot coordinates onto the image.
    provenance : source files, reader, and notes.
    hr_truth : optional HR ground truth (synthetic sample / Visium HD), a dict with keys
        ``maps`` (G, H, W) float, ``genes`` list, ``um_per_px`` float, ``origin_px`` (x0, y0).
    molecules : imaging-based platforms (MERSCOPE, Xenium): one row per decoded transcript, a DataFrame
        with ``x``, ``y`` (full-res image px, the frame of ``obsm['spatial']``), ``gene`` (categorical;
        control probes removed) and, when known, ``z``/``qv`` (:mod:`napari_diffst.data.molecules`).
    """

    adata: Any
    image: HistologyImage | None
    um_per_px: float
    spot_diameter_um: float
    technology: str
    name: str = "section"
    transform: np.ndarray = field(default_factory=lambda: np.eye(3))
    provenance: dict = field(default_factory=dict)
    hr_truth: dict | None = None
    lattice_pitch_um: float | None = None
    molecules: Any = None

    def __post_init__(self):
        self.transform = np.asarray(self.transform, float).reshape(3, 3)
        if self.lattice_pitch_um is None:
            self.lattice_pitch_um = LATTICE_PITCH_UM.get(self.technology)

    # -- convenience ----------------------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        return list(map(str, self.adata.var_names))

    @property
    def n_spots(self) -> int:
        return int(self.adata.n_obs)

    @property
    def library_id(self) -> str:
        sp = self.adata.uns.get("spatial", {})
        return next(iter(sp), self.name)

    @property
    def spot_diameter_px(self) -> float:
        return self.spot_diameter_um / self.um_per_px

    @property
    def spots_xy_px(self) -> np.ndarray:
        """Spot centres (x, y) in full-res image pixels, with the registration transform applied."""
        xy = np.asarray(self.adata.obsm["spatial"], float)
        return apply_affine(self.transform, xy)

    @property
    def spots_yx_um(self) -> np.ndarray:
        """Spot centres as napari (row, col) world coordinates in µm."""
        return self.spots_xy_px[:, ::-1] * self.um_per_px

    @property
    def image_scale_um(self) -> float:
        """µm per stored image pixel (napari image layer scale)."""
        fr = self.image.fullres_per_px if self.image is not None else 1.0
        return self.um_per_px * fr

    def counts(self):
        """Raw counts as a CSR matrix (spots × genes)."""
        import scipy.sparse as sp

        X = self.adata.layers["counts"] if "counts" in self.adata.layers else self.adata.X
        return X.tocsr() if sp.issparse(X) else sp.csr_matrix(X)

    def check_scale(self, pitch_um: float | None = None, tol: float = 0.10) -> float | None:
        """Compare ``um_per_px`` with the estimate from the lattice pitch; warn above ``tol``.

        Returns the estimate (or None when the technology has no lattice)."""
        pitch = pitch_um or self.lattice_pitch_um
        if not pitch or self.n_spots < 3:
            return None
        est = estimate_um_per_px(np.asarray(self.adata.obsm["spatial"], float), pitch)
        if np.isfinite(est) and abs(est - self.um_per_px) / self.um_per_px > tol:
            warnings.warn(
                f"{self.name}: µm/px from metadata ({self.um_per_px:.4g}) and from the {pitch:g} µm spot "
                f"lattice ({est:.4g}) differ by {abs(est - self.um_per_px) / self.um_per_px:.0%}; check the "
                "scale factors (full-res vs hires pixels?)",
                stacklevel=2,
            )
        return est

    def summary(self) -> str:
        shp = "no image" if self.image is None else f"image {self.image.shape[1]}×{self.image.shape[0]} px"
        if self.molecules is not None or "imaging" in self.adata.uns:  # imaging-based ST (MERSCOPE, Xenium)
            from .molecules import describe_imaging

            unit = (self.adata.uns.get("imaging") or {}).get("unit")
            obs = "cells" if unit == "cells" else "bins" if unit == "bins" else "spots"
            return (f"{self.name}: {self.technology}, {self.n_spots} {obs} × {self.adata.n_vars} genes, {shp}, "
                    f"{self.um_per_px:.4g} µm/px" + describe_imaging(self))
        return (f"{self.name}: {self.technology}, {self.n_spots} spots × {self.adata.n_vars} genes, "
                f"{shp}, {self.um_per_px:.4g} µm/px, spot Ø {self.spot_diameter_um:g} µm")

    def __repr__(self) -> str:  # dataclass repr would dump the AnnData
        return f"Sample({self.summary()})"


def apply_affine(T: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3×3 homogeneous affine to (N, 2) points."""
    xy = np.asarray(xy, float)
    return xy @ np.asarray(T)[:2, :2].T + np.asarray(T)[:2, 2]


def xy_affine_to_napari(T_xy_px: np.ndarray, um_per_px: float) -> np.ndarray:
    """Express a full-res-pixel (x, y) affine as a napari (row, col) world affine in µm.

    napari applies ``affine`` after the layer scale, i.e. in µm; axis order is (row, col)."""
    T = np.asarray(T_xy_px, float)
    P = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float)  # swap x<->y
    A = P @ T @ P
    A[:2, 2] *= um_per_px
    return A
