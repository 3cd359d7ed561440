"""Spot lattices → LR/HR rasters, degradation pairs and aligned H&E tiles (Qt-free).

Frames (see ``docs/coordinates.md``)
------------------------------------
* **spot frame**: ``adata.obsm['spatial']`` (x, y) in full-resolution image pixels *before*
  registration; ``Sample.transform`` maps it onto the **image frame** (full-res px of the H&E).
  Pixel-index convention everywhere: the centre of pixel ``[r, c]`` is at (x, y) = (c, r).
* **lattice**: spot ``k`` sits at ``origin + i_k·a1 + j_k·a2`` (integer i, j). ``a1`` is the lattice
  direction nearest the image +x axis, ``a2`` the second basis vector (square: ⟂, nearest +y;
  hexagonal: at 60°, towards +y). Pitch and axes are the two shortest lattice vectors, started from
  the array indices when given (their occupied sublattice, :mod:`napari_diffst.data.lattice`: an
  offset array with x + y even is a square lattice at 45° with pitch √2 index steps, not a
  checkerboard), refined on the positions, and checked against the indices (:func:`estimate_lattice`).
* **raster at the pitch**: a square pixel grid whose axes are the lattice axes, one pixel per
  pitch. Square lattices (legacy ST, Visium HD bins): one pixel per spot, exactly.
  Hexagonal lattices (Visium): rows of the raster follow the spot rows (axis ``a1``), the second
  axis is perpendicular, pixel size = pitch on both axes; each pixel takes the **nearest spot
  within that spot's hexagonal cell** (distance ≤ pitch/√3). Because the square grid has ~13 %
  fewer pixels than the hexagonal lattice has spots, ~13 % of spots are not the nearest spot of
  any pixel in native mode (their counts still enter degraded LR blocks, which aggregate by spot
  centre).
* **LR / HR grids**: ``mode='degrade'``: HR = raster at the pitch, LR = s×s blocks of it;
  ``mode='native'``/``'truth'``: LR = raster at the pitch, HR = pitch/s. Pixel (0, 0) of LR, HR
  and H&E rasters share their top-left corner (``SRField.origin_px``, image frame).
  ``SRField.extra['hr_affine']`` / ``['lr_affine']`` are 3×3 maps from (col, row, 1) pixel
  indices to image-frame (x, y, 1) full-res px (registration included);
  :func:`field_napari_affine` turns them into a napari (row, col) µm affine.

Values ("model units", :mod:`napari_diffst.data.pairs`): ``log1p(CP10k) / gene_scale`` with the
library size of each spot / block over *all* genes; ``gene_scale`` per gene = 99th percentile of
in-tissue spot log1p(CP10k) values on the training sections (:func:`compute_gene_scale`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from ..errors import DataFormatError
from .lattice import fit_index_lattice
from .pairs import SRField
from .sample import Sample, apply_affine

__all__ = ["shown_maps", 
    "Lattice",
    "SpotRaster",
    "estimate_lattice",
    "lattice_for",
    "rasterise_spots",
    "block_membership",
    "aggregate_counts",
    "normalise_counts",
    "compute_gene_scale",
    "spot_values",
    "sample_image",
    "make_field",
    "field_napari_affine",
    "index_affine_um",
    "display_mask",
    "SCALE_RANGE",
]

#: Allowed super-resolution factors.
SCALE_RANGE = (2, 10)
#: Fallback H&E sampling (µm per H&E pixel) when neither ``he_um_per_px`` nor ``he_per_hr`` is given.
DEFAULT_HE_UM_PER_PX = 4.0
#: Largest H&E raster (values) :func:`make_field` builds in memory (3·4096², 192 MiB as float32); sampling
#: above it is tiled automatically (:func:`napari_diffst.tiling.plan_sampling`).
MAX_HE_VALUES = 3 * 4096 * 4096


# --------------------------------------------------------------------------------------------
# lattice
# --------------------------------------------------------------------------------------------
@dataclass
class Lattice:
    """A square or hexagonal spot lattice fitted to spot centres (spot frame, full-res px)."""

    kind: str                 # 'square' | 'hex'
    origin: np.ndarray        # (2,) xy of lattice point (0, 0)
    a1: np.ndarray            # (2,) step of index i
    a2: np.ndarray            # (2,) step of index j
    ij: np.ndarray            # (N, 2) integer lattice indices of the spots
    residual_px: float        # RMS distance spot ↔ its lattice point
    outliers: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,) far from the lattice

    @property
    def pitch_px(self) -> float:
        """Centre-to-centre nearest-neighbour distance (mean length of the two basis vectors)."""
        return float((np.hypot(*self.a1) + np.hypot(*self.a2)) / 2)

    @property
    def angle_deg(self) -> float:
        """Angle of ``a1`` from the image +x axis (degrees, y down = clockwise positive)."""
        return float(math.degrees(math.atan2(self.a1[1], self.a1[0])))

    def positions(self, ij: np.ndarray) -> np.ndarray:
        ij = np.asarray(ij, float).reshape(-1, 2)
        return self.origin + ij[:, :1] * self.a1 + ij[:, 1:] * self.a2

    def raster_axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel steps (e1 along columns, e2 along rows) of the raster at the pitch."""
        if self.kind == "square":
            return self.a1.copy(), self.a2.copy()
        p = float(np.hypot(*self.a1))
        perp = np.array([-self.a1[1], self.a1[0]]) / p
        if perp @ self.a2 < 0:
            perp = -perp
        return self.a1.copy(), perp * p

    def neighbour_offsets(self, rings: int = 1) -> np.ndarray:
        """Integer (di, dj) offsets of lattice points within ``rings`` pitches (excluding 0)."""
        r = int(rings) + 1
        d = np.array([(i, j) for i in range(-2 * r, 2 * r + 1) for j in range(-2 * r, 2 * r + 1)
                      if (i, j) != (0, 0)], float)
        vec = d[:, :1] * self.a1 + d[:, 1:] * self.a2
        keep = np.hypot(vec[:, 0], vec[:, 1]) <= rings * self.pitch_px * 1.05
        return d[keep].astype(int)


def _index_basis(xy: np.ndarray, array_rc: np.ndarray, kind: str | None):
    """Initial lattice from array indices (``array_rc`` = (row, col)): the occupied index sublattice
    mapped to pixels and reduced to its two shortest vectors (:mod:`napari_diffst.data.lattice`), so
    a square 1k array, Visium's hexagonal numbering and offset (x + y even) arrays all give their true
    nearest-neighbour basis. Returns (kind, theta, pitch) of the canonical first axis, or None when
    the indices do not describe a square/hexagonal lattice (or not the requested ``kind``)."""
    rc = np.asarray(array_rc, float).reshape(-1, 2)
    fit = fit_index_lattice(rc[:, ::-1], xy)
    if fit is None or fit.kind not in ("square", "hex") or (kind is not None and fit.kind != kind):
        return None
    b1 = fit.basis_px[:, 0]
    order = 4 if fit.kind == "square" else 6
    theta = float(np.angle(np.exp(1j * order * math.atan2(b1[1], b1[0])))) / order
    return fit.kind, theta, fit.pitch_px


def estimate_lattice(xy: np.ndarray, kind: str | None = None, *, array_rc: np.ndarray | None = None,
                     path=None) -> Lattice:
    """Fit a square or hexagonal lattice to spot centres.

    Orientation and pitch come from the array indices when given (``array_rc`` = (array_row,
    array_col) per spot, Visium/legacy-ST convention; needed for sparse subsets of an array), else
    from the positions alone: nearest-neighbour bond angles φ decide the symmetry — a square lattice
    has ``|⟨e^{4iφ}⟩| ≈ 1`` and ``⟨e^{6iφ}⟩ ≈ 0``, a hexagonal one the reverse — and the phase gives
    the orientation. Integer indices are then assigned by rounding and the basis refined by least
    squares on a growing disc (so a slightly wrong initial pitch cannot drift over large arrays).
    The pitch is the least-squares lattice constant, not the median nearest-neighbour distance
    (which is biased low when positions are jittered, as in legacy ST).

    Raises DataFormatError when the positions are not on a regular lattice.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, float).reshape(-1, 2)
    N = len(xy)
    if N < 3 or not np.isfinite(xy).all():
        raise DataFormatError(path, f"cannot fit a spot lattice to {N} spot positions"
                              + ("" if np.isfinite(xy).all() else " (non-finite coordinates)"),
                              "at least 3 finite spot centres on a square or hexagonal array")
    if kind not in (None, "square", "hex"):
        raise ValueError(f"lattice kind must be 'square' or 'hex', not {kind!r}")
    init = None
    if array_rc is not None:
        init = _index_basis(xy, array_rc, kind)
    if init is not None:
        kind, theta, nn = init
    else:
        if N < 5:
            raise DataFormatError(path, f"cannot fit a spot lattice to {N} spot positions without array "
                                  "indices", "at least 5 spot centres, or array_row/array_col")
        tree = cKDTree(xy)
        d, idx = tree.query(xy, k=min(7, N))
        nn = float(np.median(d[:, 1]))
        if not nn > 0:
            raise DataFormatError(path, "more than half of the spots share their position with another spot",
                                  "distinct spot centres")
        v = xy[idx[:, 1:]] - xy[:, None, :]
        ok = np.abs(d[:, 1:] / nn - 1) < 0.2
        phi = np.arctan2(v[..., 1], v[..., 0])[ok]
        z4, z6 = np.mean(np.exp(4j * phi)), np.mean(np.exp(6j * phi))
        if kind is None:
            kind = "square" if abs(z4) >= abs(z6) else "hex"
        z = z4 if kind == "square" else z6
        if abs(z) < 0.5:
            raise DataFormatError(path, f"spot positions do not form a regular {kind} lattice "
                                  f"(bond-angle order {abs(z):.2f} < 0.5)",
                                  "spots on a square (legacy ST, Visium HD) or hexagonal (Visium) array, "
                                  "or array_row/array_col indices")
        theta = float(np.angle(z)) / (4 if kind == "square" else 6)
    a1 = nn * np.array([math.cos(theta), math.sin(theta)])
    beta = theta + (math.pi / 2 if kind == "square" else math.pi / 3)
    a2 = nn * np.array([math.cos(beta), math.sin(beta)])
    if a2[1] < 0 and kind == "hex":  # prefer the 60° neighbour towards +y
        beta = theta - math.pi / 3
        a2 = nn * np.array([math.cos(beta), math.sin(beta)])
    centre = xy.mean(axis=0)
    origin = xy[int(np.argmin(np.hypot(*(xy - centre).T)))].copy()
    r = np.hypot(*(xy - origin).T)
    radius = 4.0 * nn
    while True:
        sel = r <= radius
        B = np.stack([a1, a2], axis=1)
        ij = np.rint(np.linalg.solve(B, (xy[sel] - origin).T).T)
        D = np.c_[np.ones(len(ij)), ij]
        if np.linalg.matrix_rank(D) == 3:
            coef, *_ = np.linalg.lstsq(D, xy[sel], rcond=None)
            res = np.hypot(*(D @ coef - xy[sel]).T)
            inl = res < 0.35 * nn
            if inl.sum() >= 3 and np.linalg.matrix_rank(D[inl]) == 3:
                coef, *_ = np.linalg.lstsq(D[inl], xy[sel][inl], rcond=None)
            origin, a1, a2 = coef[0], coef[1], coef[2]
        if radius >= r.max():
            break
        radius *= 1.6
    B = np.stack([a1, a2], axis=1)
    ij = np.rint(np.linalg.solve(B, (xy - origin).T).T).astype(np.int64)
    pos = origin + ij[:, :1] * a1 + ij[:, 1:] * a2
    res = np.hypot(*(pos - xy).T)
    pitch = float((np.hypot(*a1) + np.hypot(*a2)) / 2)
    outl = res > 0.35 * pitch
    if outl.mean() > 0.1:
        raise DataFormatError(path, f"{outl.mean():.0%} of spots lie more than 0.35 pitch from the fitted "
                              f"{kind} lattice", "spots on a regular array")
    if outl.any():
        warnings.warn(f"{int(outl.sum())} spot(s) lie more than 0.35 pitch from the fitted lattice",
                      stacklevel=2)
    if array_rc is not None:
        _check_against_indices(ij[~outl], np.asarray(array_rc, float).reshape(-1, 2)[~outl], kind)
    return Lattice(kind, np.asarray(origin, float), np.asarray(a1, float), np.asarray(a2, float), ij,
                   float(np.sqrt(np.mean(res[~outl] ** 2))) if (~outl).any() else float("nan"), outl)


def _check_against_indices(ij: np.ndarray, array_rc: np.ndarray, kind: str) -> None:
    """The lattice indices found on the positions must be one affine function of the array indices
    for all spots (e.g. i = (col − row)/2 on Visium, (x ± y)/2 on offset arrays); warn when more than
    1 % of the spots disagree, since the positions (not the indices) then define the grid."""
    if len(ij) < 3 or not np.isfinite(array_rc).all():
        return
    D = np.c_[np.ones(len(array_rc)), array_rc]
    if np.linalg.matrix_rank(D) < 3:
        return
    coef, *_ = np.linalg.lstsq(D, ij.astype(float), rcond=None)
    pred = D @ coef
    bad = np.abs(pred - ij).max(axis=1) > 0.25
    if bad.mean() > 0.01:
        warnings.warn(f"the array indices of {int(bad.sum())} of {len(ij)} spots disagree with the {kind} lattice "
                      "fitted to their positions; the grid follows the positions", stacklevel=3)


#: Lattice symmetry per technology (others: detected from the positions).
TECH_LATTICE = {"visium": "hex", "legacy_st": "square", "visium_hd": "square"}


def lattice_for(sample: Sample, keep: np.ndarray | None = None) -> Lattice:
    """The spot lattice of a section (in-tissue spots unless ``keep`` selects others), using
    ``obs['array_row'/'array_col']`` when present and the technology's symmetry when known."""
    obs = sample.adata.obs
    if keep is None:
        keep = np.flatnonzero(_in_tissue(sample))
    xy = np.asarray(sample.adata.obsm["spatial"], float)[keep]
    kind = TECH_LATTICE.get(str(sample.technology).lower())
    rc = None
    if "array_row" in obs and "array_col" in obs:
        rc = np.c_[np.asarray(obs["array_row"], float)[keep], np.asarray(obs["array_col"], float)[keep]]
        if not np.isfinite(rc).all():
            rc = None
    if rc is not None:  # the indices + positions say what the lattice is (offset legacy arrays are not square
        fit = fit_index_lattice(rc[:, ::-1], xy)  # index grids); the technology's symmetry is the fallback
        if fit is not None and fit.kind in ("square", "hex"):
            kind = fit.kind
    path = sample.provenance.get("path") or (sample.provenance.get("files") or {}).get("spots")
    try:
        return estimate_lattice(xy, kind, array_rc=rc, path=path)
    except DataFormatError:
        if rc is None:
            raise
        return estimate_lattice(xy, kind, path=path)


# --------------------------------------------------------------------------------------------
# raster at the pitch
# --------------------------------------------------------------------------------------------
@dataclass
class SpotRaster:
    """Spots on a square raster at the lattice pitch, in the spot frame.

    ``index[r, c]`` is the spot shown by pixel (r, c) (−1 = none); ``spot_cr[k]`` the continuous
    (col, row) raster coordinate of spot k (integers for square lattices); pixel (r, c) is centred
    at ``centre00 + c·e1 + r·e2``."""

    index: np.ndarray
    spot_cr: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    centre00: np.ndarray
    lattice: Lattice

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.index.shape)

    def affine(self, sub: float = 1.0) -> np.ndarray:
        """3×3 map from (col, row, 1) pixel indices of a grid with ``sub`` pixels per raster pixel
        (sub = s for HR at pitch/s, 1/s for s×s blocks) to spot-frame (x, y, 1) px. All such grids
        share the top-left corner of raster pixel (0, 0)."""
        corner = self.centre00 - 0.5 * (self.e1 + self.e2)
        A = np.eye(3)
        A[:2, 0] = self.e1 / sub
        A[:2, 1] = self.e2 / sub
        A[:2, 2] = corner + 0.5 / sub * (self.e1 + self.e2)
        return A


def rasterise_spots(xy: np.ndarray, lattice: Lattice | None = None, *, pad: int = 0) -> SpotRaster:
    """Place spots on the square raster at the lattice pitch (see module docstring)."""
    xy = np.asarray(xy, float).reshape(-1, 2)
    lat = lattice if lattice is not None else estimate_lattice(xy)
    e1, e2 = lat.raster_axes()
    if lat.kind == "square":
        ij = lat.ij
        imin, jmin = ij.min(axis=0) - pad
        cr = (ij - [imin, jmin]).astype(float)
        w, h = (ij.max(axis=0) - [imin, jmin] + 1 + pad).astype(int)
        index = np.full((h, w), -1, np.int64)
        c, r = cr[:, 0].astype(int), cr[:, 1].astype(int)
        # duplicates: keep the spot closest to its lattice point
        res = np.hypot(*(lat.positions(ij) - xy).T)
        order = np.argsort(-res)  # worst first, best written last
        index[r[order], c[order]] = order
        centre00 = lat.positions(np.array([[imin, jmin]]))[0]
        ndup = len(xy) - int((index >= 0).sum())
        if ndup:
            warnings.warn(f"{ndup} spot(s) share a lattice site with another spot; the closest one is kept",
                          stacklevel=2)
        return SpotRaster(index, cr, e1, e2, centre00, lat)
    # hexagonal: square raster along the rows, nearest spot within its hexagonal cell
    from scipy.spatial import cKDTree

    E = np.stack([e1, e2], axis=1)
    uv = np.linalg.solve(E, (xy - lat.origin).T).T
    umin, vmin = uv.min(axis=0) - pad  # first pixel row/column centred on the first spot row/column
    w = int(np.ceil(uv[:, 0].max() - umin - 1e-6)) + 1 + pad
    h = int(np.ceil(uv[:, 1].max() - vmin - 1e-6)) + 1 + pad
    centre00 = lat.origin + umin * e1 + vmin * e2
    rr, cc = np.mgrid[0:h, 0:w]
    pts = centre00 + cc.reshape(-1, 1) * e1 + rr.reshape(-1, 1) * e2
    dist, nearest = cKDTree(xy).query(pts, k=1, distance_upper_bound=lat.pitch_px / math.sqrt(3) * 1.02)
    index = np.where(np.isfinite(dist), nearest, -1).reshape(h, w).astype(np.int64)
    cr = uv - [umin, vmin]
    return SpotRaster(index, cr, e1, e2, centre00, lat)


def block_membership(raster: SpotRaster, s: int) -> tuple[np.ndarray, tuple[int, int]]:
    """LR block (row, col) of each spot for s×s blocks of the raster (by spot centre), and the
    LR grid shape (the raster is padded up to a multiple of s)."""
    s = int(s)
    cr = raster.spot_cr
    blk = np.floor((cr + 0.5) / s).astype(np.int64)[:, ::-1]  # (row, col)
    h, w = raster.shape
    shape = (max(-(-h // s), int(blk[:, 0].max()) + 1), max(-(-w // s), int(blk[:, 1].max()) + 1))
    return blk, shape


def aggregate_counts(counts, groups: np.ndarray, n_groups: int):
    """Sum rows of a counts matrix by group id (−1 = dropped): ``M @ counts`` with a 0/1 membership
    matrix. Returns a CSR matrix (n_groups × genes)."""
    groups = np.asarray(groups, np.int64)
    keep = groups >= 0
    M = sp.csr_matrix((np.ones(int(keep.sum())), (groups[keep], np.flatnonzero(keep))),
                      shape=(n_groups, len(groups)))
    C = counts if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts))
    return (M @ C).tocsr()


def normalise_counts(counts: np.ndarray, library_size: np.ndarray, gene_scale: np.ndarray | None = None
                     ) -> np.ndarray:
    """``log1p(counts / library_size × 10⁴) / gene_scale`` (model units), float32; rows with a zero
    library give 0."""
    from .normalise import log_cp10k

    v = log_cp10k(counts, library_size=library_size)
    if gene_scale is not None:
        v = v / np.asarray(gene_scale, np.float64).reshape(1, -1)
    return v.astype(np.float32)


def _in_tissue(sample: Sample) -> np.ndarray:
    obs = sample.adata.obs
    if "in_tissue" in obs:
        return np.asarray(obs["in_tissue"]).astype(bool)
    return np.ones(sample.n_spots, bool)


def spot_values(sample: Sample, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """log1p(CP10k) of ``genes`` at the in-tissue spots (n, G) and those spots' indices."""
    from .genes import resolve_genes

    cols = resolve_genes(sample, list(genes), section=sample.name)
    keep = np.flatnonzero(_in_tissue(sample))
    C = sample.counts()[keep]
    lib = np.asarray(C.sum(axis=1)).ravel()
    return normalise_counts(C[:, cols], lib), keep


def compute_gene_scale(samples: Sequence[Sample] | Sample, genes: Sequence[str], q: float = 99.0) -> np.ndarray:
    """Per-gene scale for model units: the ``q``-th percentile of in-tissue spot log1p(CP10k)
    pooled over the (training) sections; falls back to the maximum, then 1, for genes that are
    zero at that percentile. Store it and pass it to :func:`make_field` for other sections."""
    if isinstance(samples, Sample):
        samples = [samples]
    vals = np.concatenate([spot_values(s, genes)[0] for s in samples], axis=0)
    if len(vals) == 0:
        return np.ones(len(genes), np.float32)
    sc = np.percentile(vals, q, axis=0)
    mx = vals.max(axis=0)
    sc = np.where(sc > 1e-6, sc, mx)
    sc = np.where(sc > 1e-6, sc, 1.0)
    return sc.astype(np.float32)


# --------------------------------------------------------------------------------------------
# histology sampling
# --------------------------------------------------------------------------------------------
def sample_image(sample: Sample, A_spot: np.ndarray, shape: tuple[int, int], *, strip: int = 2048) -> np.ndarray:
    """H&E sampled on a pixel grid: ``A_spot`` maps (col, row, 1) of the output to spot-frame px;
    the registration ``sample.transform`` is applied on top (spots → image), so the H&E is sampled
    where the spots actually lie. Never resamples or stores the whole image.

    The coarsest pyramid level whose pixels are not larger than the output pixels is read with
    ``sample.image.read_region`` in horizontal strips, box-averaged by the integer part of the
    remaining down-sampling (anti-aliasing), then bilinearly interpolated at the output pixel
    centres (``scipy.ndimage.map_coordinates``; this also handles small rotations). Outside the
    image: 0. Returns float32 (3, H, W) in [0, 1]."""
    from PIL import Image
    from scipy.ndimage import map_coordinates

    H, W = int(shape[0]), int(shape[1])
    out = np.zeros((3, H, W), np.float32)
    img = sample.image
    if img is None or H == 0 or W == 0:
        return out
    M = np.asarray(sample.transform, float) @ np.asarray(A_spot, float)  # out index → full-res px
    step_fr = math.sqrt(abs(np.linalg.det(M[:2, :2])))  # full-res px per output px
    fr = float(img.fullres_per_px)
    level, D = 0, 1.0
    for L in range(len(img.levels)):
        d = img.level_downsample(L)
        if fr * d <= step_fr * 1.0001:
            level, D = L, d
    # output index → level px (pixel-centre convention for pyramid down-sampling)
    S = np.eye(3)
    S[:2, :2] /= fr * D
    S[:2, 2] = 0.5 / D - 0.5
    ML = S @ M
    corners = np.array([[-0.5, -0.5], [W - 0.5, -0.5], [-0.5, H - 0.5], [W - 0.5, H - 0.5]])
    cxy = apply_affine(ML, corners)
    LH, LW = img.levels[level].shape[:2]
    c0 = max(int(np.floor(cxy[:, 0].min())) - 2, 0)
    c1 = min(int(np.ceil(cxy[:, 0].max())) + 3, LW)
    r0 = max(int(np.floor(cxy[:, 1].min())) - 2, 0)
    r1 = min(int(np.ceil(cxy[:, 1].max())) + 3, LH)
    if c1 <= c0 or r1 <= r0:
        return out
    f = max(1, int(np.floor(step_fr / (fr * D) + 1e-6)))
    strip = max(f, (strip // f) * f)
    parts = []
    for a in range(r0, r1, strip):
        reg = img.read_region(a, min(a + strip, r1), c0, c1, level)
        if f > 1:
            reg = np.asarray(Image.fromarray(reg).reduce(f))
        parts.append(reg)
    region = np.concatenate(parts, axis=0)
    # level px → reduced-region px
    R = np.eye(3)
    R[:2, :2] /= f
    R[:2, 2] = [(-c0 + 0.5) / f - 0.5, (-r0 + 0.5) / f - 0.5]
    MR = R @ ML
    rr, cc = np.mgrid[0:H, 0:W]
    pts = apply_affine(MR, np.c_[cc.ravel(), rr.ravel()])
    coords = np.stack([pts[:, 1], pts[:, 0]])
    for ch in range(3):
        out[ch] = map_coordinates(region[..., ch].astype(np.float32), coords, order=1, mode="constant",
                                  cval=0.0).reshape(H, W)
    np.clip(out / 255.0, 0, 1, out=out)
    return out


# --------------------------------------------------------------------------------------------
# fields
# --------------------------------------------------------------------------------------------
def _check_scale(scale) -> int:
    s = int(scale)
    if s != scale or not SCALE_RANGE[0] <= s <= SCALE_RANGE[1]:
        raise ValueError(f"scale must be an integer in {SCALE_RANGE[0]}..{SCALE_RANGE[1]}, got {scale!r}")
    return s


def _bin_raster(raster: SpotRaster, counts, k: int) -> tuple[SpotRaster, sp.csr_matrix, np.ndarray]:
    """Aggregate k×k cells of a square raster into pseudo-spots (e.g. Visium HD 2 µm bins → 8 µm)."""
    cr = np.floor((raster.spot_cr + 0.5) / k).astype(np.int64)
    keys, grp = np.unique(cr, axis=0, return_inverse=True)
    grp = grp.ravel()
    C = aggregate_counts(counts, grp, len(keys))
    w, h = cr.max(axis=0) + 1
    index = np.full((h, w), -1, np.int64)
    index[keys[:, 1], keys[:, 0]] = np.arange(len(keys))
    e1, e2 = raster.e1 * k, raster.e2 * k
    corner = raster.centre00 - 0.5 * (raster.e1 + raster.e2)
    centre00 = corner + 0.5 * (e1 + e2)
    lat = raster.lattice
    blat = Lattice("square", centre00.copy(), e1.copy(), e2.copy(), keys.copy(), lat.residual_px,
                   np.zeros(len(keys), bool))
    return SpotRaster(index, keys.astype(float), e1, e2, centre00, blat), C, grp


def make_field(sample: Sample, genes: Sequence[str], scale: int = 2, mode: str = "degrade", *,
               he_um_per_px: float | None = None, he_per_hr: int | None = None,
               gene_scale: np.ndarray | None = None, gene_scale_q: float = 99.0,
               lattice: Lattice | None = None, bin_lattice: int = 1, with_he: bool = True,
               min_occupancy: float = 0.01, max_he_values: int = MAX_HE_VALUES) -> SRField:
    """Rasterise one section into an :class:`~napari_diffst.data.pairs.SRField`.

    Modes
    -----
    ``'degrade'`` (training pairs without HR truth, and the real-data benchmark): HR = the raster
        at the lattice pitch (each spot one HR pixel; ``hr`` = the spots' own normalised counts),
        LR = s×s lattice blocks with the **raw counts of the block's spots summed**, then
        normalised by the block's summed library size. HR pixel = pitch, LR pixel = s·pitch
        (her2st, s=2: LR 400 µm, HR 200 µm).
    ``'native'`` (apply a trained model): LR = the observed spots at the pitch, HR grid = pitch/s,
        ``hr=None``; ``hr_spot_index`` gives the spot whose cell contains each HR pixel.
    ``'truth'`` (samples with ``sample.hr_truth``, e.g. the synthetic sample): LR from the spots
        at the pitch, HR = truth maps averaged into pitch/s pixels.

    Parameters
    ----------
    genes : gene names (resolved case-insensitively; missing → GeneNotFoundError).
    scale : s in 2..10.
    he_um_per_px / he_per_hr : H&E sampling; ``he_per_hr = round(hr_um / he_um_per_px)`` H&E pixels
        per HR pixel (default he_um_per_px = 4 µm).
    gene_scale : per-gene divisor (from :func:`compute_gene_scale` on the training sections);
        computed on this section when None.
    lattice : a pre-fitted lattice of the in-tissue spots (else estimated).
    bin_lattice : aggregate k×k cells of a square lattice first (Visium HD bins → HR pixel size).
    with_he : sample the H&E (False leaves ``he`` as zeros of the right shape).
    min_occupancy : refuse rasters where spots fill less than this fraction of the lattice
        bounding box (sparse subsets of an array).
    max_he_values : refuse H&E rasters with more values than this (default 3·4096², 200 MB).

    ``extra`` holds: ``hr_affine``/``lr_affine``/``he_affine`` (pixel index → image px),
    ``pitch_px``/``pitch_um``, ``lr_um``, ``he_um_per_px``, lattice kind/angle/residual,
    ``spot_obs_index``/``spot_obs_names`` (rows of ``hr_counts`` → ``adata`` rows),
    ``hr_library_size`` (per spot, all genes), ``gene_scale_source``; degrade: ``lr_counts``
    (blocks × G raw sums), ``lr_library_size``, ``lr_n_spots``; native/truth: ``lr_spot_index``.
    """
    from .genes import resolve_genes

    s = _check_scale(scale)
    if mode not in ("degrade", "native", "truth"):
        raise ValueError(f"mode must be 'degrade', 'native' or 'truth', not {mode!r}")
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("make_field needs at least one gene")
    cols = resolve_genes(sample, genes, section=sample.name)
    keep = np.flatnonzero(_in_tissue(sample))
    if len(keep) < 5:
        raise DataFormatError(sample.provenance.get("path"), f"section {sample.name} has {len(keep)} "
                              "in-tissue spots", "at least 5 spots under tissue")
    xy = np.asarray(sample.adata.obsm["spatial"], float)[keep]
    C_all = sample.counts()[keep]
    lib = np.asarray(C_all.sum(axis=1)).ravel().astype(np.float64)
    C = C_all[:, cols].tocsr()
    lat = lattice if lattice is not None else lattice_for(sample, keep)
    raster = rasterise_spots(xy, lat)
    spot_of_pseudo = None
    if int(bin_lattice) > 1:
        if lat.kind != "square":
            raise ValueError("bin_lattice > 1 needs a square lattice (e.g. Visium HD bins)")
        raster, C, spot_of_pseudo = _bin_raster(raster, C, int(bin_lattice))
        lib = np.asarray(aggregate_counts(lib.reshape(-1, 1), spot_of_pseudo, raster.index.max() + 1)
                         .toarray()).ravel()
    pitch_px = float(np.hypot(*raster.e1) + np.hypot(*raster.e2)) / 2
    pitch_um = pitch_px * float(sample.um_per_px)
    occupancy = float((raster.index >= 0).sum()) / max(raster.index.size, 1)
    if occupancy < min_occupancy:
        raise DataFormatError(
            sample.provenance.get("path"),
            f"section {sample.name}: {int((raster.index >= 0).sum())} spots cover only {occupancy:.2%} of their "
            f"{raster.shape[0]}×{raster.shape[1]} lattice bounding box (a sparse subset of the array)",
            "spots filling the tissue area; pass min_occupancy=0 to rasterise anyway")
    nominal = sample.lattice_pitch_um if bin_lattice == 1 else None
    if nominal and abs(pitch_um / nominal - 1) > 0.05:
        warnings.warn(f"{sample.name}: the spot lattice pitch is {pitch_px:.4g} px × {sample.um_per_px:.4g} µm/px = "
                      f"{pitch_um:.4g} µm, not the nominal {nominal:g} µm of {sample.technology}; pixel sizes "
                      "follow the image scale (check the reader's µm/px)", stacklevel=2)
    spot_vals = normalise_counts(C, lib)  # (n, G) log1p CP10k
    if gene_scale is None:
        gs = np.percentile(spot_vals, gene_scale_q, axis=0) if len(spot_vals) else np.ones(len(genes))
        mx = spot_vals.max(axis=0) if len(spot_vals) else np.ones(len(genes))
        gs = np.where(gs > 1e-6, gs, np.where(mx > 1e-6, mx, 1.0)).astype(np.float32)
        gs_src = f"{sample.name} (q{gene_scale_q:g})"
    else:
        gs = np.asarray(gene_scale, np.float32).reshape(-1)
        if gs.shape[0] != len(genes):
            raise ValueError(f"gene_scale has {gs.shape[0]} entries for {len(genes)} genes")
        gs_src = "given"
    G = len(genes)
    h, w = raster.shape
    extra: dict = {"mode": mode, "lattice_kind": lat.kind, "lattice_angle_deg": lat.angle_deg,
                   "pitch_px": pitch_px, "pitch_um": pitch_um, "lattice_residual_px": lat.residual_px,
                   "gene_scale_source": gs_src, "spot_obs_index": keep,
                   "spot_obs_names": np.asarray(sample.adata.obs_names)[keep].astype(str)}
    if spot_of_pseudo is not None:
        extra["bin_lattice"] = int(bin_lattice)
        extra["pseudo_spot_of_spot"] = spot_of_pseudo
    if mode == "degrade":
        blk, (lh, lw) = block_membership(raster, s)
        gid = blk[:, 0] * lw + blk[:, 1]
        Cb = aggregate_counts(C, gid, lh * lw)
        libb = np.asarray(aggregate_counts(lib.reshape(-1, 1), gid, lh * lw).toarray()).ravel()
        nspots = np.bincount(gid, minlength=lh * lw).reshape(lh, lw)
        lr = normalise_counts(Cb, libb, gs).T.reshape(G, lh, lw)
        lr_mask = nspots > 0
        H, W = lh * s, lw * s
        hr_index = np.full((H, W), -1, np.int64)
        hr_index[:h, :w] = raster.index
        hr_mask = hr_index >= 0
        hr = np.zeros((G, H, W), np.float32)
        sv = spot_vals / gs
        hr[:, hr_mask] = sv[hr_index[hr_mask]].T
        hr_um = pitch_um
        A_hr = raster.affine(1.0)
        A_lr = raster.affine(1.0 / s)
        extra["lr_n_spots"] = nspots
        extra["lr_counts"] = Cb
        extra["lr_library_size"] = libb.reshape(lh, lw)
        hr_counts = C
    else:
        lr_index = raster.index
        lh, lw = h, w
        lr_mask = lr_index >= 0
        lr = np.zeros((G, lh, lw), np.float32)
        lr[:, lr_mask] = (spot_vals / gs)[lr_index[lr_mask]].T
        H, W = lh * s, lw * s
        hr_um = pitch_um / s
        A_hr = raster.affine(float(s))
        A_lr = raster.affine(1.0)
        hr_index = _hr_spot_index(raster, s)
        extra["lr_spot_index"] = lr_index
        # the spots' own geometry and values (napari_diffst.spot_consistency): centres in HR (col, row), disk
        # radius in HR px, log1p(CP10k) (n, G) — rows follow hr_spot_index
        if spot_of_pseudo is None:
            extra["spot_hr_cr"] = apply_affine(np.linalg.inv(A_hr), xy)
            extra["spot_radius_hr"] = 0.5 * float(sample.spot_diameter_um) / hr_um
        else:  # k×k binned squares: their centres, and the disk of the same area
            extra["spot_hr_cr"] = apply_affine(np.linalg.inv(A_hr), apply_affine(A_lr, raster.spot_cr))
            extra["spot_radius_hr"] = pitch_um / math.sqrt(math.pi) / hr_um
        extra["spot_log1p"] = spot_vals
        hr_counts = C
        if mode == "native":
            hr = None
            hr_mask = hr_index >= 0
        else:
            if sample.hr_truth is None:
                raise DataFormatError(sample.provenance.get("path"), f"section {sample.name} has no HR truth",
                                      "a sample with hr_truth (synthetic) for mode='truth'")
            hr_raw, inside = _bin_truth(sample, genes, np.asarray(sample.transform, float) @ A_hr, (H, W))
            hr = (hr_raw / gs.reshape(-1, 1, 1)).astype(np.float32)
            hr_mask = (hr_index >= 0) & inside
            hr[:, ~inside] = 0.0
    lr[:, ~lr_mask] = 0.0
    T = np.asarray(sample.transform, float)
    hr_affine = T @ A_hr
    lr_affine = T @ A_lr
    origin = apply_affine(hr_affine, np.array([[-0.5, -0.5]]))[0]
    if he_per_hr is None:
        hu = float(he_um_per_px) if he_um_per_px else DEFAULT_HE_UM_PER_PX
        he_per_hr = max(1, int(round(hr_um / hu)))
    k = int(he_per_hr)
    if k < 1:
        raise ValueError("he_per_hr must be ≥ 1")
    A_he = A_hr @ np.array([[1 / k, 0, 0.5 / k - 0.5], [0, 1 / k, 0.5 / k - 0.5], [0, 0, 1]])
    if with_he and 3 * H * k * W * k > max_he_values:
        raise ValueError(f"the H&E raster would be {H * k}×{W * k} px ({3 * H * k * W * k * 4 / 2**30:.1f} GiB); "
                         f"use a larger he_um_per_px (now {hr_um / k:.3g} µm) or with_he=False (tiled sampling: "
                         "napari_diffst.tiling.plan_sampling)")
    if with_he and sample.image is not None:
        he = sample_image(sample, A_he, (H * k, W * k))
    else:
        he = np.zeros((3, H * k, W * k), np.float32)
        extra["he_missing"] = True
    extra.update({"hr_affine": hr_affine, "lr_affine": lr_affine, "he_affine": T @ A_he,
                  "lr_um": hr_um * s, "he_um_per_px": hr_um / k, "hr_library_size": lib})
    return SRField(name=sample.name, genes=genes, scale=s, lr=lr.astype(np.float32), lr_mask=lr_mask,
                   hr=hr, hr_mask=hr_mask, he=he, he_per_hr=k, hr_um=float(hr_um), gene_scale=gs,
                   origin_px=(float(origin[0]), float(origin[1])), um_per_px=float(sample.um_per_px),
                   hr_spot_index=hr_index, hr_counts=hr_counts, extra=extra)


def _hr_spot_index(raster: SpotRaster, s: int) -> np.ndarray:
    """Spot whose lattice cell contains each HR pixel (−1 outside): square → the LR pixel's spot;
    hexagonal → nearest spot within pitch/√3 (its Voronoi cell)."""
    h, w = raster.shape
    if raster.lattice.kind == "square":
        return np.repeat(np.repeat(raster.index, s, axis=0), s, axis=1)
    from scipy.spatial import cKDTree

    A = raster.affine(float(s))
    rr, cc = np.mgrid[0:h * s, 0:w * s]
    pts = apply_affine(A, np.c_[cc.ravel(), rr.ravel()])
    spot_xy = raster.centre00 + raster.spot_cr[:, :1] * raster.e1 + raster.spot_cr[:, 1:] * raster.e2
    d, nearest = cKDTree(spot_xy).query(pts, k=1,
                                        distance_upper_bound=raster.lattice.pitch_px / math.sqrt(3) * 1.02)
    return np.where(np.isfinite(d), nearest, -1).reshape(h * s, w * s).astype(np.int64)


def _bin_truth(sample: Sample, genes: Sequence[str], A_hr_img: np.ndarray, shape: tuple[int, int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """HR targets from ``sample.hr_truth``: the truth rates averaged over each HR pixel (m×m
    supersampling, bilinear), then expressed as log1p(CP10k) with the library = the summed rate of
    *all* truth genes in that pixel (the spots' library is their sum over all genes too).

    The truth grid (``um_per_px`` µm pixels, top-left corner of pixel (0, 0) at ``origin_px``
    full-res px) is rendered with the image, so HR pixels are mapped with the image-frame affine
    ``A_hr_img`` (registration included). Returns (G, H, W) log1p(CP10k) and a mask of HR pixels
    inside the truth grid and under tissue (binned ``tissue`` fraction ≥ ½ when the truth has one,
    else any expression)."""
    from scipy.ndimage import map_coordinates

    from ..errors import GeneNotFoundError

    t = sample.hr_truth
    tg = [str(g).lower() for g in t["genes"]]
    idx = []
    for g in genes:
        if g.lower() not in tg:
            raise GeneNotFoundError(f"gene '{g}' has no HR truth map in {sample.name} "
                                    f"(truth genes: {', '.join(map(str, list(t['genes'])[:10]))}…)")
        idx.append(tg.index(g.lower()))
    maps = np.asarray(t["maps"], np.float32)
    total = maps.sum(axis=0)
    tpx = float(t["um_per_px"]) / float(sample.um_per_px)  # full-res px per truth px
    ox, oy = (float(v) for v in t.get("origin_px", (0.0, 0.0)))
    H, W = shape
    step = math.sqrt(abs(np.linalg.det(A_hr_img[:2, :2])))
    m = int(min(8, max(1, math.ceil(step / tpx - 1e-6))))
    acc = np.zeros((len(idx) + 2, H, W), np.float64)
    rr, cc = np.mgrid[0:H, 0:W]
    inside = np.ones((H, W), bool)
    Th, Tw = maps.shape[1:]
    tissue = t.get("tissue")
    tissue = None if tissue is None else np.asarray(tissue, np.float32)
    layers = [maps[i] for i in idx] + [total] + ([] if tissue is None or tissue.shape != total.shape else [tissue])
    for a in range(m):
        for b in range(m):
            du, dv = (b + 0.5) / m - 0.5, (a + 0.5) / m - 0.5
            pts = apply_affine(A_hr_img, np.c_[cc.ravel() + du, rr.ravel() + dv])
            tx = (pts[:, 0] - ox) / tpx - 0.5
            ty = (pts[:, 1] - oy) / tpx - 0.5
            inside &= ((tx >= -0.5) & (tx <= Tw - 0.5) & (ty >= -0.5) & (ty <= Th - 0.5)).reshape(H, W)
            crd = np.stack([ty, tx])
            for gi, L in enumerate(layers):
                acc[gi] += map_coordinates(L, crd, order=1, mode="nearest").reshape(H, W)
    acc /= m * m
    G = len(idx)
    rate, tot = acc[:G], acc[G]
    if len(layers) == G + 2:  # HR pixels mostly (≥ half) under tissue count as tissue
        inside &= acc[G + 1] >= 0.5
    else:
        inside &= tot > 0
    from .normalise import cp10k_factor

    return np.log1p(rate * cp10k_factor(tot)).astype(np.float32), inside


#: how far (in lattice pitches) past the in-tissue spots' cells a shown map may reach where the H&E is tissue
DISPLAY_REACH_PITCH = 0.25


def shown_maps(maps: np.ndarray, hr_mask: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """``maps`` (G, H, W) as written and shown: NaN outside ``shown`` (the :func:`display_mask`), and on the rim
    of ``shown`` beyond ``hr_mask`` (tissue just past the in-tissue spots' lattice cells, where a masked
    prediction holds 0) the value of the nearest ``hr_mask`` pixel, so no map carries a 0 that means "not
    predicted" (0 means "no expression").  float32."""
    from scipy import ndimage as ndi

    a = np.asarray(maps, np.float32)
    hm, sh = np.asarray(hr_mask, bool), np.asarray(shown, bool)
    rim = sh & ~hm
    if rim.any() and hm.any():
        _, (ri, ci) = ndi.distance_transform_edt(~hm, return_indices=True)
        a = a.copy()
        a[:, rim] = a[:, ri[rim], ci[rim]]
    return np.where(sh[None], a, np.nan).astype(np.float32)


def display_mask(sample: Sample, grid, *, thumb_px: int | None = None) -> np.ndarray:
    """Where a super-resolved map is shown and written (NaN elsewhere): the H&E's tissue (holes filled, so
    fat inside the section stays) within ``DISPLAY_REACH_PITCH`` pitches of the in-tissue spots' cells
    (``grid.hr_mask``), so the map's outline follows the tissue instead of the lattice's squares. Falls back
    to ``hr_mask`` without an image or when the tissue mask covers under half of it (a failed detection).
    ``grid``: an :class:`SRField` or a tiling source (``hr_mask``, ``hr_affine``/``extra['hr_affine']``,
    ``hr_um``); the result is cached in ``grid.extra['display_mask']``.

    ``thumb_px``: the longest side of the H&E thumbnail the tissue is detected on; by default four thumbnail
    pixels per HR pixel along the grid's longest side, at least 512 (pale-tissue texture needs a few
    thumbnail pixels per fat cell) and at most 1024. Tying it to the grid keeps the mask's memory in step
    with the HR rasters instead of the image: whole-slide tiled sampling stays bounded by its tile."""
    from scipy import ndimage as ndi

    extra = getattr(grid, "extra", None)
    if isinstance(extra, dict) and isinstance(extra.get("display_mask"), np.ndarray):
        return extra["display_mask"]
    hr_mask = np.asarray(grid.hr_mask, bool)
    out = hr_mask
    if sample.image is not None and hr_mask.any():
        from .registration import _thumb_frame, tissue_mask

        A_hr = np.asarray(getattr(grid, "hr_affine", None) if getattr(grid, "hr_affine", None) is not None
                          else grid.extra["hr_affine"], float)
        if thumb_px is None:
            thumb_px = int(np.clip(4 * max(hr_mask.shape), 512, 1024))
        thumb, A_th = _thumb_frame(sample, thumb_px)
        tis = ndi.binary_fill_holes(tissue_mask(thumb))
        H, W = hr_mask.shape
        rr, cc = np.mgrid[0:H, 0:W]
        pts = np.rint(apply_affine(A_th @ A_hr, np.c_[cc.ravel(), rr.ravel()])).astype(np.int64)
        ok = (pts[:, 0] >= 0) & (pts[:, 0] < tis.shape[1]) & (pts[:, 1] >= 0) & (pts[:, 1] < tis.shape[0])
        on = np.zeros(H * W, bool)
        on[ok] = tis[pts[ok, 1], pts[ok, 0]]
        on = on.reshape(H, W)
        pitch_um = float((extra or {}).get("pitch_um") or grid.hr_um * getattr(grid, "scale", 1))
        reach = ndi.distance_transform_edt(~hr_mask) * float(grid.hr_um) <= DISPLAY_REACH_PITCH * pitch_um + 1e-9
        cand = reach & on
        if (cand & hr_mask).sum() >= 0.5 * hr_mask.sum():
            out = cand
    if isinstance(extra, dict):
        extra["display_mask"] = out
    return out


def field_napari_affine(fld: SRField, which: str = "hr") -> np.ndarray:
    """napari (row, col) affine in µm for a raster of ``fld`` (``'hr'``, ``'lr'`` or ``'he'``), to be
    used with ``scale=(1, 1)``: world µm = affine @ (row, col, 1)."""
    key = {"hr": "hr_affine", "lr": "lr_affine", "he": "he_affine"}[which]
    return index_affine_um(fld.extra[key], fld.um_per_px)


def index_affine_um(A_px: np.ndarray, um_per_px: float) -> np.ndarray:
    """A raster's (col, row, 1) → full-res (x, y, 1) px affine as a napari (row, col, 1) → (y, x, 1) µm
    affine (what the writers store: :class:`napari_diffst.io.writers.Placement`)."""
    P = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float)
    B = P @ np.asarray(A_px, float) @ P
    B[:2, :] *= float(um_per_px)
    return B
