"""Writers (and round-trip readers) for super-resolved gene maps. Qt-free.

Every writer takes a stack of maps ``(C, Y, X)`` — one channel per gene — with the pixel size
``um_per_px`` in µm and ``origin_um = (y, x)``, the world position in µm of the **centre** of
pixel (0, 0) (the napari ``translate`` convention, also what NGFF's ``translation`` means).

* :func:`write_ome_zarr` / :class:`OmeZarrWriter` — OME-NGFF 0.4 (Zarr v2, ``/`` chunk keys) or
  0.5 (Zarr v3) multiscale image with axes ``c, y, x`` (units micrometer), per-level
  ``scale`` + ``translation``, ``omero`` channel labels = gene names, and a 2×2 NaN-aware mean
  pyramid. :class:`OmeZarrWriter` accepts tiles one at a time (tiled inference) and finalises the
  pyramid and metadata on :meth:`~OmeZarrWriter.close`.
* :func:`write_tiff` — OME-TIFF (tifffile) with ``PhysicalSizeX/Y`` in µm and channel names.
* :func:`write_h5ad` — AnnData with one observation per (masked) pixel in the section's frame, for
  scanpy/squidpy (:mod:`napari_diffst.io.scverse`): ``obsm['spatial']`` in full-resolution pixels,
  ``obsm['spatial_um']`` in µm, ``uns['spatial']`` with the section's image.
* :func:`write_maps` — any of these (or SpatialData, :mod:`napari_diffst.io.spatialdata`), chosen by
  :func:`choose_format` from the suffix or an explicit format.

Optional ``extra_channels`` (e.g. ``{'uncertainty': (G, Y, X)}``) are appended as channels
labelled ``"GENE [name]"`` (Zarr/TIFF) or stored as ``layers[name]`` (h5ad).

All writes are atomic: data go to a hidden temporary sibling (``.tmp-XXXX-<name>``) that is
renamed into place only once complete; on any error the temporary is removed and an existing
target is left untouched.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..errors import DataFormatError
from .safety import remove_path

__all__ = [
    "OmeZarrWriter",
    "Placement",
    "placement_of",
    "MapsFile",
    "atomic_path",
    "write_ome_zarr",
    "write_tiff",
    "write_h5ad",
    "write_maps",
    "choose_format",
    "OUTPUT_FORMATS",
    "read_ome_zarr",
    "read_tiff_maps",
    "read_h5ad_maps",
    "read_maps",
    "is_ome_zarr",
    "open_ome_zarr_levels",
]

#: Key of this package's own metadata block (in Zarr attributes, OME-TIFF description, h5ad uns).
META_KEY = "napari_diffst"

_UNIT_TO_UM = {"micrometer": 1.0, "µm": 1.0, "um": 1.0, "micron": 1.0, "nanometer": 1e-3, "nm": 1e-3,
               "millimeter": 1e3, "mm": 1e3, "meter": 1e6, "m": 1e6}


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
def _remove(p: Path) -> None:
    remove_path(p)


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif", ".h5ad"):
        if name.lower().endswith(suf):
            return name[: -len(suf)] or name
    return name


def _tmp_sibling(target: Path, tag: str = "tmp") -> Path:
    return target.parent / f".{tag}-{uuid.uuid4().hex[:8]}-{target.name}"


def _commit(tmp: Path, target: Path) -> None:
    """Move a finished temporary into place (replacing ``target``)."""
    if tmp.is_dir():
        if target.exists() or target.is_symlink():
            backup = _tmp_sibling(target, "old")
            os.replace(target, backup)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(backup, target)
                raise
            _remove(backup)
        else:
            os.replace(tmp, target)
    else:
        if target.is_dir():
            raise DataFormatError(target, "a folder of that name exists", "a file path to write to")
        os.replace(tmp, target)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; rename it onto ``target`` on success.

    On any exception the temporary (file or folder) is removed and ``target`` is unchanged."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(target)
    try:
        yield tmp
        _commit(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _as_stack(path, maps, name: str = "maps"):
    """(C, Y, X) array-like (2-D gets a channel axis); stays lazy when it already is 3-D."""
    if not hasattr(maps, "shape") or not hasattr(maps, "ndim"):
        maps = np.asarray(maps)
    if maps.ndim == 2:
        maps = np.asarray(maps)[None]
    if maps.ndim != 3:
        raise DataFormatError(path, f"{name} have shape {tuple(maps.shape)}", "a (genes, Y, X) or (Y, X) array")
    return maps


@dataclass(frozen=True)
class Placement:
    """Where a ``(Y, X)`` pixel grid lies in the µm world: ``affine`` (3×3) maps napari ``(row, col, 1)``
    pixel-centre indices to ``(y, x, 1)`` µm.

    ``scale`` = ``(sy, sx)``, the µm length of one row / one column step (per-axis: a spot lattice's
    HR pixel is rarely square); ``origin`` = ``(y, x)`` µm of the centre of pixel (0, 0);
    ``axis_aligned`` is False when the grid is rotated or sheared (then only ``affine`` places it exactly;
    NGFF 0.4/0.5 and OME-TIFF store ``scale`` + ``origin``, and ``affine`` goes in this package's
    metadata as ``affine_um``)."""

    affine: np.ndarray

    @property
    def scale(self) -> tuple[float, float]:
        L = np.asarray(self.affine, float)[:2, :2]
        return (float(np.hypot(L[0, 0], L[1, 0])), float(np.hypot(L[0, 1], L[1, 1])))

    @property
    def origin(self) -> tuple[float, float]:
        return (float(self.affine[0, 2]), float(self.affine[1, 2]))

    @property
    def um_per_px(self) -> float:
        """One number for the pixel size: ``√(sy·sx)`` (equal-area square pixel)."""
        sy, sx = self.scale
        return float(math.sqrt(sy * sx))

    @property
    def axis_aligned(self) -> bool:
        L = np.asarray(self.affine, float)[:2, :2]
        tol = 1e-6 * max(self.scale)
        return bool(abs(L[0, 1]) <= tol and abs(L[1, 0]) <= tol and L[0, 0] > 0 and L[1, 1] > 0)

    def level(self, k: int) -> "Placement":
        """Placement of pyramid level ``k`` (2^k × 2^k level-0 pixels per pixel, same footprint)."""
        f = float(2 ** int(k))
        D = np.array([[f, 0, (f - 1) / 2], [0, f, (f - 1) / 2], [0, 0, 1]])
        return Placement(np.asarray(self.affine, float) @ D)

    @classmethod
    def from_scale(cls, um_per_px, origin_um=(0.0, 0.0)) -> "Placement":
        sy, sx = _pair(um_per_px)
        oy, ox = (float(v) for v in origin_um)
        return cls(np.array([[sy, 0.0, oy], [0.0, sx, ox], [0.0, 0.0, 1.0]]))


def _pair(um_per_px) -> tuple[float, float]:
    v = np.ravel(np.asarray(um_per_px, float))
    if v.size == 1:
        return (float(v[0]), float(v[0]))
    if v.size == 2:
        return (float(v[0]), float(v[1]))
    raise ValueError(f"{um_per_px!r}")


def placement_of(path, um_per_px=1.0, origin_um=(0.0, 0.0), affine_um=None) -> Placement:
    """Checked :class:`Placement` from ``affine_um`` (3×3 napari (row, col) → µm, when given) or from
    ``um_per_px`` (one number, or ``(y, x)`` per axis) and ``origin_um``."""
    if affine_um is not None:
        try:
            A = np.asarray(affine_um, float)
        except (TypeError, ValueError):
            raise DataFormatError(path, f"affine {affine_um!r} is not numeric", "a 3×3 (row, col) → µm affine") from None
        if A.shape != (3, 3) or not np.isfinite(A).all() or abs(np.linalg.det(A[:2, :2])) < 1e-12:
            raise DataFormatError(path, f"affine of shape {A.shape} (or singular / not finite)",
                                  "an invertible 3×3 (row, col) → µm affine")
        A = A.copy()
        A[2] = (0.0, 0.0, 1.0)
        return Placement(A)
    try:
        sy, sx = _pair(um_per_px)
    except (TypeError, ValueError):
        raise DataFormatError(path, f"pixel size {um_per_px!r} is not a number", "µm per pixel > 0") from None
    if not all(math.isfinite(v) and v > 0 for v in (sy, sx)):
        raise DataFormatError(path, f"pixel size {um_per_px!r}", "µm per pixel > 0")
    origin = tuple(float(v) for v in (origin_um if origin_um is not None else (0.0, 0.0)))
    if len(origin) != 2:
        raise DataFormatError(path, f"origin {origin_um!r}", "(y, x) in µm")
    return Placement.from_scale((sy, sx), origin)


def _check(path, maps, genes, um_per_px, origin_um, extra_channels, affine_um=None):
    maps = _as_stack(path, maps)
    if isinstance(genes, str):
        genes = [genes]
    genes = [str(g) for g in (genes if genes is not None else [f"channel{i}" for i in range(maps.shape[0])])]
    if len(genes) != maps.shape[0]:
        raise DataFormatError(path, f"{len(genes)} gene names for {maps.shape[0]} map channels",
                              "one gene name per channel")
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})
        raise DataFormatError(path, f"duplicate gene names {dup}", "unique gene names")
    place = placement_of(path, um_per_px, origin_um, affine_um)
    extra = {}
    for k, v in dict(extra_channels or {}).items():
        v = _as_stack(path, v, f"extra channel {k!r}")
        if tuple(v.shape) != tuple(maps.shape):
            raise DataFormatError(path, f"extra channel {k!r} has shape {tuple(v.shape)}, maps {tuple(maps.shape)}",
                                  "the same (genes, Y, X) shape as the maps")
        extra[str(k)] = v
    return maps, genes, place, extra


def _labels(genes: Sequence[str], extra: Sequence[str]) -> list[str]:
    return list(genes) + [f"{g} [{k}]" for k in extra for g in genes]


def _meta(genes, place: Placement, extra_names, metadata=None) -> dict:
    origin = place.origin
    m = {"genes": list(genes), "um_per_px": place.um_per_px, "pixel_um": [float(v) for v in place.scale],
         "origin_um": [float(origin[0]), float(origin[1])],
         "extra_channels": list(extra_names), "axes": "cyx", "origin_convention": "pixel (0,0) centre, (y, x) µm"}
    if not place.axis_aligned:
        m["affine_um"] = np.asarray(place.affine, float).tolist()
        m["affine_convention"] = "napari (row, col, 1) pixel centre -> (y, x, 1) µm"
    if metadata:
        m.update(_jsonable(metadata))
    return m


def _jsonable(obj):
    """Best-effort conversion of metadata to JSON-safe values (drops what cannot be stored)."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            try:
                out[str(k)] = _jsonable(v)
            except TypeError:
                continue
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray) and obj.size <= 64:
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"not JSON-serialisable: {type(obj)}")


# --------------------------------------------------------------------------------------------
# OME-Zarr
# --------------------------------------------------------------------------------------------
def _down2(a: np.ndarray) -> np.ndarray:
    """2×2 NaN-aware mean over the last two axes (odd edges padded with NaN)."""
    a = np.asarray(a, np.float32)
    *lead, h, w = a.shape
    H2, W2 = (h + 1) // 2, (w + 1) // 2
    if h % 2 or w % 2:
        p = np.full((*lead, H2 * 2, W2 * 2), np.nan, np.float32)
        p[..., :h, :w] = a
        a = p
    b = a.reshape(*lead, H2, 2, W2, 2)
    fin = np.isfinite(b)
    cnt = fin.sum(axis=(-3, -1))
    s = np.where(fin, b, 0).sum(axis=(-3, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan).astype(np.float32)


class OmeZarrWriter:
    """Write an OME-NGFF multiscale ``(C, Y, X)`` image tile by tile, atomically.

    Parameters
    ----------
    path : target ``.zarr`` / ``.ome.zarr`` folder (replaced on :meth:`close`).
    shape : ``(C, Y, X)`` at full resolution; ``C = len(genes) · (1 + len(extra_channels))``.
    genes : gene names of the first ``len(genes)`` channels.
    um_per_px : pixel size in µm (one number, or ``(y, x)`` per axis).
    origin_um : (y, x) µm of the centre of pixel (0, 0).
    affine_um : optional 3×3 napari ``(row, col, 1)`` → ``(y, x, 1)`` µm affine; overrides ``um_per_px``
        and ``origin_um`` (per-axis scale from its columns; stored whole when rotated or sheared).
    extra_channels : names of extra per-gene channel groups (e.g. ``['uncertainty']``) that follow
        the genes in that order.
    chunks : chunk shape ``(c, y, x)``.
    levels : number of pyramid levels (``None``: halve until the image fits one chunk, at most 8).
    ngff_version : ``'0.4'`` (Zarr v2) or ``'0.5'`` (Zarr v3).
    metadata : extra JSON-serialisable metadata stored under ``attrs['napari_diffst']``.

    Unwritten pixels read back as NaN. Use as a context manager: an exception inside the block
    discards everything and leaves an existing ``path`` untouched.
    """

    def __init__(self, path, shape, genes, um_per_px, origin_um=(0.0, 0.0), *,
                 extra_channels: Sequence[str] = (), chunks=(1, 256, 256), levels: int | None = None,
                 ngff_version: str = "0.4", metadata: dict | None = None, name: str | None = None,
                 affine_um=None):
        import zarr

        self.path = Path(path)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise DataFormatError(self.path, f"shape {shape}", "(C, Y, X) with positive sizes")
        self.genes = [str(g) for g in genes]
        self.extra = [str(e) for e in extra_channels]
        if len(self.genes) * (1 + len(self.extra)) != shape[0]:
            raise DataFormatError(self.path, f"{shape[0]} channels for {len(self.genes)} genes and extra "
                                             f"channels {self.extra}", "C = genes × (1 + extra channel groups)")
        _, _, self.place, _ = _check(self.path, np.zeros((len(self.genes), 1, 1)), self.genes,
                                     um_per_px, origin_um, None, affine_um)
        if str(ngff_version) not in ("0.4", "0.5"):
            raise ValueError(f"ngff_version must be '0.4' or '0.5', not {ngff_version!r}")
        self.ngff = str(ngff_version)
        self.shape = shape
        self.chunks = (max(1, min(int(chunks[0]), shape[0])), max(1, min(int(chunks[1]), shape[1])),
                       max(1, min(int(chunks[2]), shape[2])))
        if levels is None:
            levels, m = 1, max(shape[1:])
            while m > max(self.chunks[1:]) and levels < 8:
                m = (m + 1) // 2
                levels += 1
        self.levels = max(1, int(levels))
        self.metadata = metadata
        self.name = name or _stem(self.path)
        self._cmin = np.full(shape[0], np.inf)
        self._cmax = np.full(shape[0], -np.inf)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _tmp_sibling(self.path)
        self._closed = False
        try:
            zf = 2 if self.ngff == "0.4" else 3
            self._root = zarr.open_group(str(self._tmp), mode="w", zarr_format=zf)
            self._arrays = [self._create(0, shape)]
        except BaseException:
            _remove(self._tmp)
            raise

    # -- internals ------------------------------------------------------------------------------
    def _create(self, level: int, shape):
        kw = dict(shape=shape, chunks=self.chunks, dtype="float32", fill_value=float("nan"))
        if self.ngff == "0.4":
            kw["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        else:
            kw["dimension_names"] = ["c", "y", "x"]
        return self._root.create_array(str(level), **kw)

    def _level_shape(self, k: int):
        C, h, w = self.shape
        for _ in range(k):
            h, w = (h + 1) // 2, (w + 1) // 2
        return (C, h, w)

    def _tile_region(self, row, col, tile, channels):
        """Checked ``(tile (c, h, w) float32, channel selection, channel indices, (r0, r1, c0, c1))``."""
        if self._closed:
            raise RuntimeError("writer is closed")
        t = np.asarray(tile, np.float32)
        if t.ndim == 2:
            t = t[None]
        if channels is None:
            channels = slice(0, self.shape[0]) if t.shape[0] == self.shape[0] else slice(0, t.shape[0])
        if isinstance(channels, (int, np.integer)):
            channels = slice(int(channels), int(channels) + 1)
        idx = np.arange(self.shape[0])[channels]
        if t.ndim != 3 or len(idx) != t.shape[0]:
            raise DataFormatError(self.path, f"tile of shape {t.shape} for {len(idx)} channels",
                                  "(channels, h, w) matching the channel selection")
        r0, c0 = int(row), int(col)
        r1, c1 = r0 + t.shape[1], c0 + t.shape[2]
        if r0 < 0 or c0 < 0 or r1 > self.shape[1] or c1 > self.shape[2]:
            raise DataFormatError(self.path, f"tile [{r0}:{r1}, {c0}:{c1}] outside the image {self.shape[1:]}",
                                  "tiles inside the declared shape")
        return t, channels, idx, (r0, r1, c0, c1)

    # -- public -----------------------------------------------------------------------------------
    def write_tile(self, row: int, col: int, tile, channels=None) -> None:
        """Write ``tile`` (``(c, h, w)``, or ``(h, w)`` for one channel) with its top-left pixel at
        (``row``, ``col``) of level 0, into ``channels`` (slice/int/list; default all)."""
        t, channels, idx, (r0, r1, c0, c1) = self._tile_region(row, col, tile, channels)
        a = self._arrays[0]
        if isinstance(channels, slice) and (channels.step in (None, 1)):
            a[int(idx[0]):int(idx[-1]) + 1, r0:r1, c0:c1] = t
        else:
            for k, ci in enumerate(idx):
                a[int(ci), r0:r1, c0:c1] = t[k]
        with np.errstate(invalid="ignore"):
            fin = np.isfinite(t)
            if fin.any():
                lo = np.where(fin, t, np.inf).min(axis=(1, 2))
                hi = np.where(fin, t, -np.inf).max(axis=(1, 2))
                self._cmin[idx] = np.minimum(self._cmin[idx], lo)
                self._cmax[idx] = np.maximum(self._cmax[idx], hi)

    def read_rows(self, r0: int, r1: int, channels=slice(None)) -> np.ndarray:
        """Level-0 rows ``r0:r1`` (all columns) of ``channels`` as written so far (NaN where nothing was), for a
        pass over the whole image before :meth:`close` (the projection onto the spots of tiled output)."""
        if self._closed:
            raise RuntimeError("writer is closed")
        return np.asarray(self._arrays[0][channels, int(r0):int(r1), :], np.float32)

    def add_tile(self, row: int, col: int, tile, channels=None) -> None:
        """Add ``tile`` to what level 0 already holds at (``row``, ``col``) — read, add, write back — so
        overlapping, pre-weighted tiles blend (tiled inference: weights that sum to one per pixel). NaN in
        ``tile`` adds nothing; pixels that never received a finite value stay NaN. Contrast limits are
        recomputed from level 0 when the writer closes."""
        t, channels, idx, (r0, r1, c0, c1) = self._tile_region(row, col, tile, channels)
        if not (isinstance(channels, slice) and channels.step in (None, 1)):
            raise DataFormatError(self.path, f"channels {channels}", "a contiguous channel range for add_tile")
        a = self._arrays[0]
        sl = (slice(int(idx[0]), int(idx[-1]) + 1), slice(r0, r1), slice(c0, c1))
        cur = np.asarray(a[sl], np.float32)
        fin = np.isfinite(t)
        out = np.where(fin, np.where(np.isfinite(cur), cur, 0.0) + np.where(fin, t, 0.0), cur)
        a[sl] = out.astype(np.float32)
        self._recompute_range = True

    def _build_pyramid(self) -> None:
        if getattr(self, "_recompute_range", False):  # tiles were added: limits from the final level 0
            self._cmin[:] = np.inf
            self._cmax[:] = -np.inf
            src, band = self._arrays[0], 2 * self.chunks[1]
            for c0 in range(0, self.shape[0], self.chunks[0]):  # one chunk row of channels at a time
                c1 = min(c0 + self.chunks[0], self.shape[0])
                for r0 in range(0, self.shape[1], band):
                    blk = np.asarray(src[c0:c1, r0:min(r0 + band, self.shape[1]), :], np.float32)
                    fin = np.isfinite(blk)
                    if fin.any():
                        self._cmin[c0:c1] = np.minimum(self._cmin[c0:c1], np.where(fin, blk, np.inf).min(axis=(1, 2)))
                        self._cmax[c0:c1] = np.maximum(self._cmax[c0:c1], np.where(fin, blk, -np.inf).max(axis=(1, 2)))
        band = 2 * self.chunks[1]
        for k in range(1, self.levels):
            src = self._arrays[k - 1]
            dst = self._create(k, self._level_shape(k))
            self._arrays.append(dst)
            H = src.shape[1]
            for c0 in range(0, self.shape[0], self.chunks[0]):
                c1 = min(c0 + self.chunks[0], self.shape[0])
                for r0 in range(0, H, band):
                    blk = np.asarray(src[c0:c1, r0:min(r0 + band, H), :])
                    dst[c0:c1, r0 // 2:r0 // 2 + (blk.shape[1] + 1) // 2, :] = _down2(blk)

    def _attrs(self) -> dict:
        labels = _labels(self.genes, self.extra)
        datasets = []
        for k in range(self.levels):
            # keep the image footprint: a level-k pixel centre sits (2^k − 1)/2 level-0 pixels past level 0's
            pk = self.place if self.place.axis_aligned else Placement.from_scale(self.place.scale,
                                                                                 self.place.origin)
            pk = pk.level(k)
            datasets.append({"path": str(k), "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, *pk.scale]},
                {"type": "translation", "translation": [0.0, *pk.origin]}]})
        ms = {"name": self.name,
              "axes": [{"name": "c", "type": "channel"},
                       {"name": "y", "type": "space", "unit": "micrometer"},
                       {"name": "x", "type": "space", "unit": "micrometer"}],
              "datasets": datasets, "type": "mean",
              "metadata": {"description": "2x2 NaN-aware mean", "method": "napari_diffst.io.writers._down2"}}
        chans = []
        for i, lab in enumerate(labels):
            lo, hi = float(self._cmin[i]), float(self._cmax[i])
            if not (math.isfinite(lo) and math.isfinite(hi)):
                lo, hi = 0.0, 1.0
            chans.append({"label": lab, "color": "FFFFFF", "active": i == 0, "coefficient": 1.0,
                          "family": "linear", "inverted": False,
                          "window": {"start": lo, "end": hi if hi > lo else lo + 1.0, "min": lo, "max": hi}})
        omero = {"name": self.name, "channels": chans, "rdefs": {"model": "greyscale", "defaultT": 0, "defaultZ": 0}}
        meta = _meta(self.genes, self.place, self.extra, self.metadata)
        if self.ngff == "0.4":
            ms["version"] = "0.4"
            omero["version"] = "0.4"
            return {"multiscales": [ms], "omero": omero, META_KEY: meta}
        return {"ome": {"version": "0.5", "multiscales": [ms], "omero": omero}, META_KEY: meta}

    def close(self) -> Path:
        """Build the pyramid, write the metadata and move the result onto ``path``."""
        if self._closed:
            return self.path
        try:
            self._build_pyramid()
            self._root.attrs.update(self._attrs())
            _commit(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written so far (the target is never touched)."""
        self._closed = True
        _remove(self._tmp)

    def __enter__(self) -> "OmeZarrWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_ome_zarr(path, maps, genes=None, um_per_px: float = 1.0, origin_um=(0.0, 0.0), *,
                   extra_channels: Mapping[str, object] | None = None, chunks=(1, 256, 256),
                   levels: int | None = None, ngff_version: str = "0.4", metadata: dict | None = None,
                   affine_um=None) -> Path:
    """Write ``maps`` ``(G, Y, X)`` (or ``(Y, X)``) as an OME-NGFF multiscale image (atomically).

    ``maps`` and the extra channels may be lazy arrays; they are read one channel at a time. Placement:
    ``affine_um`` (see :class:`OmeZarrWriter`) or ``um_per_px`` (number or (y, x)) + ``origin_um``."""
    path = Path(path)
    maps, genes, place, extra = _check(path, maps, genes, um_per_px, origin_um, extra_channels, affine_um)
    G, H, W = (int(s) for s in maps.shape)
    shape = (G * (1 + len(extra)), H, W)
    with OmeZarrWriter(path, shape, genes, affine_um=place.affine, extra_channels=list(extra), chunks=chunks,
                       um_per_px=None, levels=levels, ngff_version=ngff_version, metadata=metadata) as w:
        for k, src in enumerate([maps, *extra.values()]):
            for g in range(G):
                w.write_tile(0, 0, np.asarray(src[g], np.float32), channels=k * G + g)
    return path


def _open_ngff(path: Path):
    import zarr

    if not path.exists():
        raise DataFormatError(path, "not found", "an OME-Zarr folder")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise DataFormatError(path, f"not a Zarr group ({exc})", "an OME-Zarr folder") from exc
    attrs = dict(root.attrs)
    ome = attrs.get("ome", attrs)
    ms = ome.get("multiscales")
    if not ms:
        raise DataFormatError(path, "no 'multiscales' metadata", "an OME-NGFF image (0.4 or 0.5)")
    return root, attrs, ome, ms[0]


def _read_ngff(path: Path, level: int = 0, lazy: bool = False):
    root, attrs, ome, ms = _open_ngff(path)
    datasets = ms.get("datasets", [])
    if not (0 <= level < len(datasets)):
        raise DataFormatError(path, f"level {level} not present ({len(datasets)} levels)", "an existing level")
    ds = datasets[level]
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", ["c", "y", "x"])]
    if lazy:
        import dask.array as da

        arr = da.from_zarr(root[ds["path"]])
    else:
        arr = np.asarray(root[ds["path"]][...], np.float32)
    if "y" not in axes or "x" not in axes or arr.ndim != len(axes):
        raise DataFormatError(path, f"axes {axes} for an array of shape {arr.shape}", "axes including y and x")
    # reduce to (c, y, x)
    for i in reversed(range(len(axes))):
        if axes[i] not in ("c", "y", "x"):
            arr = arr.take(0, axis=i)
            axes.pop(i)
    if "c" not in axes:
        arr, axes = arr[None], ["c"] + axes
    arr = np.moveaxis(arr, [axes.index("c"), axes.index("y"), axes.index("x")], [0, 1, 2])
    scale, trans = [1.0] * 3, [0.0] * 3
    full_axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
    for tr in list(ms.get("coordinateTransformations", [])) + list(ds.get("coordinateTransformations", [])):
        vals = tr.get("scale") or tr.get("translation")
        if vals is None:
            continue
        sel = [vals[full_axes.index(n)] if n in full_axes else (1.0 if "scale" in tr else 0.0) for n in "cyx"]
        if tr.get("type") == "scale":
            scale = [a * b for a, b in zip(scale, sel)]
        elif tr.get("type") == "translation":
            trans = [a + b for a, b in zip(trans, sel)]
    unit = "micrometer"
    for a in ms.get("axes", []):
        if isinstance(a, dict) and a.get("name") == "x" and a.get("unit"):
            unit = a["unit"]
    f = _UNIT_TO_UM.get(str(unit).lower(), 1.0)
    meta = attrs.get(META_KEY, {})
    labels = [c.get("label", f"channel{i}") for i, c in enumerate(ome.get("omero", {}).get("channels", []))]
    place = Placement.from_scale((scale[1] * f, scale[2] * f), (trans[1] * f, trans[2] * f))
    if meta.get("affine_um") is not None:  # rotated / sheared grid: this package's exact placement
        try:
            place = placement_of(path, affine_um=meta["affine_um"]).level(level)
        except DataFormatError:
            pass
    return arr, place, meta, labels, len(datasets)


@dataclass
class MapsFile:
    """Gene maps read back from a file written here (or any compatible OME-Zarr/OME-TIFF)."""

    maps: np.ndarray                  # (G, Y, X) float32
    genes: list
    um_per_px: float                  # √(sy·sx); see ``pixel_um`` for the per-axis size
    origin_um: tuple = (0.0, 0.0)     # (y, x) µm of the centre of pixel (0, 0)
    extra: dict = field(default_factory=dict)   # name -> (G, Y, X)
    metadata: dict = field(default_factory=dict)
    n_levels: int = 1
    placement: Placement | None = None   # exact placement (per-axis scale, rotation)

    @property
    def pixel_um(self) -> tuple[float, float]:
        """(y, x) µm per pixel."""
        return self.placement.scale if self.placement is not None else (self.um_per_px, self.um_per_px)

    @property
    def affine_um(self) -> np.ndarray:
        """3×3 napari (row, col, 1) → (y, x, 1) µm affine of the pixel centres."""
        if self.placement is not None:
            return np.asarray(self.placement.affine, float)
        return Placement.from_scale(self.um_per_px, self.origin_um).affine


def _split_extra(arr, genes, meta, labels):
    G = arr.shape[0]
    if genes is None:
        genes = labels if len(labels) == G else [f"channel{i}" for i in range(G)]
        return arr, list(genes), {}
    extra_names = list(meta.get("extra_channels", []))
    n = len(genes)
    if n * (1 + len(extra_names)) != G:
        extra_names = []
        n = G if len(genes) != G else n
    extra = {k: arr[(i + 1) * n:(i + 2) * n] for i, k in enumerate(extra_names)}
    return arr[:n], list(genes)[:n], extra


def read_ome_zarr(path, level: int = 0) -> tuple[np.ndarray, list, float]:
    """``(maps (G, Y, X) float32, genes, um_per_px)`` of an OME-Zarr written by :func:`write_ome_zarr`
    (extra channels excluded; see :func:`read_maps`). ``level`` picks a pyramid level."""
    m = _read_ome_zarr_full(Path(path), level)
    return m.maps, m.genes, m.um_per_px


def is_ome_zarr(path) -> bool:
    """True for a folder holding OME-NGFF multiscale image metadata (0.4 ``.zattrs`` or 0.5 ``zarr.json``)."""
    p = Path(path)
    for name in (".zattrs", "zarr.json"):
        f = p / name
        if f.is_file():
            try:
                a = json.loads(f.read_text())
            except (OSError, ValueError):
                return False
            a = a.get("attributes", a) if name == "zarr.json" else a
            return bool((a.get("ome") or a).get("multiscales"))
    return False


def open_ome_zarr_levels(path) -> tuple[MapsFile, list]:
    """Lazy read of an OME-Zarr image: ``(MapsFile of level 0 with dask arrays, [level k (C, Y, X) dask
    array for every level])`` — nothing is loaded until indexed."""
    path = Path(path)
    m = _read_ome_zarr_full(path, 0, lazy=True)
    levels = [_read_ngff(path, k, lazy=True)[0] for k in range(m.n_levels)]
    return m, levels


def _read_ome_zarr_full(path: Path, level: int = 0, lazy: bool = False) -> MapsFile:
    arr, place, meta, labels, nlev = _read_ngff(path, level, lazy)
    maps, genes, extra = _split_extra(arr, meta.get("genes"), meta, labels)
    return MapsFile(maps, genes, place.um_per_px, place.origin, extra, dict(meta), nlev, place)


# --------------------------------------------------------------------------------------------
# OME-TIFF
# --------------------------------------------------------------------------------------------
def write_tiff(path, maps, genes=None, um_per_px: float = 1.0, origin_um=(0.0, 0.0), *,
               extra_channels: Mapping[str, object] | None = None, metadata: dict | None = None,
               compression: str | None = "zlib", affine_um=None) -> Path:
    """Write ``maps`` as a float32 OME-TIFF (axes CYX) with physical pixel sizes in µm, channel
    names = gene names (``"GENE [extra]"`` for extra channels) and the origin as plane positions."""
    import tifffile

    path = Path(path)
    maps, genes, place, extra = _check(path, maps, genes, um_per_px, origin_um, extra_channels, affine_um)
    (sy, sx), origin = place.scale, place.origin
    data = np.concatenate([np.asarray(maps, np.float32)] + [np.asarray(v, np.float32) for v in extra.values()])
    labels = _labels(genes, list(extra))
    C, H, W = data.shape
    md = {
        "axes": "CYX", "Name": _stem(path),
        "Description": json.dumps({META_KEY: _meta(genes, place, list(extra), metadata)}),
        "Channel": {"Name": labels},
        "PhysicalSizeX": sx, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": sy, "PhysicalSizeYUnit": "µm",
        "Plane": {"PositionX": [origin[1]] * C, "PositionXUnit": ["µm"] * C,
                  "PositionY": [origin[0]] * C, "PositionYUnit": ["µm"] * C},
    }
    kw = {}
    if H >= 256 and W >= 256:
        kw["tile"] = (256, 256)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, ome=True, photometric="minisblack", metadata=md, compression=compression,
                         bigtiff=data.nbytes > 2 ** 31 - 2 ** 25, **kw)
    return path


def read_tiff_maps(path) -> tuple[np.ndarray, list, float]:
    """``(maps, genes, um_per_px)`` of an OME-TIFF written by :func:`write_tiff`."""
    m = _read_tiff_full(Path(path))
    return m.maps, m.genes, m.um_per_px


def _read_tiff_full(path: Path) -> MapsFile:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            arr = tf.series[0].asarray()
            axes = tf.series[0].axes
            xml = tf.ome_metadata
    except Exception as exc:
        raise DataFormatError(path, f"cannot read TIFF ({exc})", "an OME-TIFF of gene maps") from exc
    arr = np.asarray(arr, np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim != 3:
        raise DataFormatError(path, f"image axes {axes!r} shape {arr.shape}", "CYX gene maps")
    um, umy, origin, meta, labels = 1.0, None, (0.0, 0.0), {}, []
    if xml:
        d = tifffile.xml2dict(xml).get("OME", {})
        img = d.get("Image", {})
        img = img[0] if isinstance(img, list) else img
        px = img.get("Pixels", {})
        um = float(px.get("PhysicalSizeX", 1.0)) * _UNIT_TO_UM.get(str(px.get("PhysicalSizeXUnit", "µm")), 1.0)
        umy = float(px.get("PhysicalSizeY", um)) * _UNIT_TO_UM.get(str(px.get("PhysicalSizeYUnit", "µm")), 1.0)
        ch = px.get("Channel", [])
        ch = ch if isinstance(ch, list) else [ch]
        labels = [str(c.get("Name", f"channel{i}")) for i, c in enumerate(ch)]
        desc = img.get("Description")
        if desc:
            try:
                meta = json.loads(desc).get(META_KEY, {})
            except (ValueError, AttributeError):
                meta = {}
        if "origin_um" in meta:
            origin = tuple(float(v) for v in meta["origin_um"])
    maps, genes, extra = _split_extra(arr, meta.get("genes"), meta, labels)
    place = _meta_placement(path, meta, (umy if umy is not None else um, um), origin)
    return MapsFile(maps, genes, float(meta.get("um_per_px", place.um_per_px)), place.origin, extra, dict(meta),
                    1, place)


def _meta_placement(path, meta: dict, scale_yx, origin) -> Placement:
    """Placement from this package's metadata (``affine_um``, else ``pixel_um``/``um_per_px``), falling back
    to the file's own pixel size."""
    try:
        if meta.get("affine_um") is not None:
            return placement_of(path, affine_um=meta["affine_um"])
        if meta.get("pixel_um") is not None:
            return placement_of(path, meta["pixel_um"], origin)
        if meta.get("um_per_px") is not None:
            return placement_of(path, meta["um_per_px"], origin)
    except DataFormatError:
        pass
    return placement_of(path, scale_yx, origin)


# --------------------------------------------------------------------------------------------
# AnnData (.h5ad)
# --------------------------------------------------------------------------------------------
def pixel_mask(path, maps: np.ndarray, mask=None) -> np.ndarray:
    """The (Y, X) pixels a per-pixel writer keeps: ``mask``, checked against ``maps`` (G, Y, X), or the
    pixels with any finite value."""
    H, W = maps.shape[1:]
    mask = np.isfinite(maps).any(axis=0) if mask is None else np.asarray(mask, bool)
    if mask.shape != (H, W):
        raise DataFormatError(path, f"mask of shape {mask.shape} for maps of {(H, W)}", "a (Y, X) boolean mask")
    return mask


def write_h5ad(path, maps, genes=None, um_per_px: float = 1.0, mask=None, origin_um=(0.0, 0.0), *,
               extra_channels: Mapping[str, object] | None = None, metadata: dict | None = None,
               frame=None, affine_um=None) -> Path:
    """Write the maps as an AnnData with one observation per pixel of ``mask`` (default: pixels with
    any finite value), laid out for scanpy/squidpy by :func:`napari_diffst.io.scverse.sr_anndata`:
    ``obsm['spatial']`` in full-resolution pixels of the section image, ``obsm['spatial_um']`` in µm,
    ``uns['spatial']`` with the section's image and scale factors, ``obs`` ``row``/``col``/``barcode``/
    ``in_tissue``, ``layers[name]`` for extra channels, ``uns['napari_diffst']`` the grid metadata.

    ``frame`` (a :class:`~napari_diffst.io.scverse.SectionFrame`, e.g. ``SectionFrame.from_field(field,
    sample)``) places the grid in its section. Without it only the µm grid is known: full-res pixels
    are then taken as 1 µm (placed by ``affine_um`` when given), there is no image and no barcode."""
    import anndata  # noqa: F401  (fail early with the real ImportError)

    from .scverse import SectionFrame, sr_anndata

    path = Path(path)
    maps, genes, place, extra = _check(path, maps, genes, um_per_px, origin_um, extra_channels, affine_um)
    maps = np.asarray(maps, np.float32)
    G, H, W = maps.shape
    mask = pixel_mask(path, maps, mask)
    if frame is None:
        frame = SectionFrame.from_placement(place)
    meta = _meta(genes, place, list(extra), metadata)
    meta["shape"] = [int(H), int(W)]
    adata = sr_anndata(maps, genes, mask, frame, extra=extra, meta=meta, meta_key=META_KEY)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def read_h5ad_maps(path) -> tuple[np.ndarray, list, float]:
    """``(maps, genes, um_per_px)`` rebuilt on the grid from an h5ad written by :func:`write_h5ad`
    (NaN at pixels that were not written)."""
    m = _read_h5ad_full(Path(path))
    return m.maps, m.genes, m.um_per_px


def _read_h5ad_full(path: Path) -> MapsFile:
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:
        raise DataFormatError(path, f"cannot read h5ad ({exc})", "an AnnData .h5ad file") from exc
    meta = dict(adata.uns.get(META_KEY, {}))
    if "shape" not in meta or "row" not in adata.obs or "col" not in adata.obs:
        raise DataFormatError(path, "no per-pixel grid metadata", "an h5ad written by napari-diffst's write_h5ad")
    H, W = (int(v) for v in meta["shape"])
    rr, cc = adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()

    def grid(X):
        X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
        out = np.full((X.shape[1], H, W), np.nan, np.float32)
        out[:, rr, cc] = X.T
        return out

    extra = {k: grid(adata.layers[k]) for k in meta.get("extra_channels", []) if k in adata.layers}
    origin = tuple(float(v) for v in meta.get("origin_um", (0.0, 0.0)))
    meta = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in meta.items()}
    um = float(meta.get("um_per_px", 1.0))
    place = _meta_placement(path, meta, (um, um), origin)
    return MapsFile(grid(adata.X), list(map(str, adata.var_names)), um, place.origin, extra, meta, 1, place)


#: Output formats: name → the suffixes that choose it (first: the default suffix).
OUTPUT_FORMATS = {
    "ome-zarr": (".ome.zarr", ".zarr"),
    "tiff": (".ome.tif", ".ome.tiff", ".tif", ".tiff"),
    "h5ad": (".h5ad",),
    "spatialdata": (".sdata.zarr",),
}


def choose_format(path, fmt: str | None = None) -> str:
    """The output format for ``path``: ``fmt`` when given (``ome-zarr``, ``tiff``, ``h5ad``,
    ``spatialdata``), else from the suffix (``.ome.zarr``/``.zarr``, ``.ome.tif(f)``/``.tif(f)``,
    ``.h5ad``, ``.sdata.zarr``). An unknown suffix or format raises :class:`DataFormatError`."""
    path = Path(path)
    if fmt:
        key = str(fmt).lower().replace("_", "-")
        key = {"zarr": "ome-zarr", "omezarr": "ome-zarr", "tif": "tiff", "ome-tiff": "tiff", "ome-tif": "tiff",
               "anndata": "h5ad", "sdata": "spatialdata"}.get(key, key)
        if key not in OUTPUT_FORMATS:
            raise DataFormatError(path, f"unknown output format {fmt!r}", "one of " + ", ".join(OUTPUT_FORMATS))
        return key
    name = path.name.lower()
    for key in ("spatialdata", "ome-zarr", "tiff", "h5ad"):
        if name.endswith(OUTPUT_FORMATS[key]):
            return key
    raise DataFormatError(path, f"unknown output suffix {''.join(path.suffixes) or '(none)'!r}",
                          ".ome.zarr/.zarr, .ome.tif(f)/.tif(f), .h5ad or .sdata.zarr, or a --format")


def write_maps(path, maps, genes=None, um_per_px: float = 1.0, origin_um=(0.0, 0.0), *, fmt: str | None = None,
               mask=None, extra_channels: Mapping[str, object] | None = None, metadata: dict | None = None,
               frame=None, affine_um=None) -> Path:
    """Write maps in the format :func:`choose_format` picks for ``path`` / ``fmt`` (``affine_um``: the
    grid's exact placement, see :class:`Placement`).

    ``mask`` (h5ad: the pixels written) and ``frame`` (a :class:`~napari_diffst.io.scverse.SectionFrame`:
    h5ad and SpatialData place the grid in the section with it) are used where the format needs them."""
    kind = choose_format(path, fmt)
    if kind == "ome-zarr":
        return write_ome_zarr(path, maps, genes, um_per_px, origin_um, extra_channels=extra_channels,
                              metadata=metadata, affine_um=affine_um)
    if kind == "tiff":
        return write_tiff(path, maps, genes, um_per_px, origin_um, extra_channels=extra_channels, metadata=metadata,
                          affine_um=affine_um)
    if kind == "h5ad":
        return write_h5ad(path, maps, genes, um_per_px, mask, origin_um, extra_channels=extra_channels,
                          metadata=metadata, frame=frame, affine_um=affine_um)
    from .spatialdata import write_spatialdata

    if affine_um is not None:  # SpatialData places the maps by the section frame; its metadata keeps the grid's size
        place = placement_of(path, affine_um=affine_um)
        um_per_px, origin_um = place.um_per_px, place.origin
    return write_spatialdata(path, maps, genes, um_per_px, origin_um, mask=mask, extra_channels=extra_channels,
                             metadata=metadata, frame=frame)


def read_maps(path) -> MapsFile:
    """Read gene maps written by any writer here (chosen by the path: SpatialData folder, folder/.zarr,
    .tif(f), .h5ad)."""
    from .spatialdata import is_spatialdata

    path = Path(path)
    name = path.name.lower()
    if is_spatialdata(path):
        from .spatialdata import read_spatialdata_maps

        return read_spatialdata_maps(path)
    if path.is_dir() or name.endswith(".zarr"):
        return _read_ome_zarr_full(path)
    if name.endswith((".tif", ".tiff")):
        return _read_tiff_full(path)
    if name.endswith(".h5ad"):
        return _read_h5ad_full(path)
    raise DataFormatError(path, "unknown maps format", "an .ome.zarr folder, .ome.tif or .h5ad file")
