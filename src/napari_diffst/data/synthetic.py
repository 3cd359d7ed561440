"""A seeded synthetic section: H&E-like histology, a known high-resolution truth, and spot counts.

The generator exists so that super-resolution can be *scored against a known answer* and so
that the plugin has a sample that opens instantly (``File ▸ Open Sample``).

Model
-----
Everything lives in one physical frame in µm whose origin is the top-left corner of the image.
Full-resolution pixel coordinates follow the napari/scanpy convention (integer = pixel centre):
``x_px = x_um / um_per_px − ½``. So ``obsm['spatial']`` holds spot centres in those
coordinates and the HR truth grid's top-left corner is at ``hr_truth['origin_px'] = (−½, −½)``
(the image's top-left corner); HR pixel (i, j) covers ``[j·hr_um, (j+1)·hr_um)`` µm in x.

1. *Layout* — smooth Gaussian random fields (white noise convolved with a Gaussian, standardised)
   define an irregular tissue outline and four tissue domains (:data:`DOMAINS`): stroma, tumour
   nests, lymphoid (immune) aggregates and fat.
2. *Cells* — nuclei are placed per domain (jittered hexagonal packing in tumour and aggregates,
   Poisson in stroma, with a lymphocyte infiltrate that decays with distance from tumour) and
   rendered as anti-aliased ellipses: large pleomorphic nuclei in tumour, small round dark ones in
   aggregates, elongated fibroblast nuclei aligned with wavy eosin collagen fibres in stroma.
3. *Colour* — Beer–Lambert stain mixing: optical density ``OD = H·h + E·e`` with haematoxylin and
   eosin stain vectors ``h, e``, ``RGB = 255·10^(−OD)``.
4. *Expression truth* — for each gene ``g`` a rate ``λ_g(x) ≥ 0`` (expected UMI per µm² of
   capture area) on an HR grid of ``hr_um`` µm pixels::

       λ_g(x) = tissue(x) · b_g / A_ref · exp( Σ_k w_gk f_k(x) + a_g Z_g(x) )

   where ``f_k`` are morphology features computed from the rendered cells (domain fractions,
   nuclear density at 10/40/120 µm, lymphocyte and fibroblast density, tumour-boundary proximity,
   distance to the tissue edge), ``Z_g`` is a smooth random field (histology-invisible structure),
   ``b_g`` the gene's baseline count in a reference spot of area ``A_ref`` (legacy ST, 100 µm Ø).
   So histology is informative about most genes but never determines them completely.
5. *Observations* — counts in a capture area ``S`` are ``Poisson(∫_S λ_g)``, the integral being
   exact for the piecewise-constant HR map (disk ∩ pixel areas by sub-sampling, square cells by
   interval overlaps). Spots (:func:`make_synthetic`, :func:`synthetic_spots_at`) and arbitrary
   square bins (:func:`truth_counts_on_grid`) are drawn from the *same* rate.

``sample.hr_truth`` (see :class:`~napari_diffst.data.sample.Sample`) holds
``maps`` (G, H, W) float32 **λ in expected UMI per µm²** (not normalised; use
:func:`truth_log1p_cp10k` for log1p(CP10k) expression, or :func:`truth_counts_on_grid` for Poisson
counts aggregated into cells of any size), ``genes``, ``um_per_px`` (= ``hr_um``),
``origin_px`` ``(−0.5, −0.5)`` (x, y full-res px of the grid's top-left corner), ``units``,
``tissue`` (H, W) tissue area fraction, ``domains`` (H, W) uint8 majority domain, ``domain_names`` and ``nuclear_density`` (nuclei per 1000 µm², 20 µm
Gaussian smoothing).

The same seed always gives the identical sample. Random streams are separated (layout, cells,
texture, each gene, counts), so asking for more genes does not change the image or earlier genes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import ndimage as ndi

from .sample import LATTICE_PITCH_UM, SPOT_DIAMETER_UM, HistologyImage, Sample, build_uns_spatial

__all__ = [
    "DOMAINS",
    "GENE_PROGRAMMES",
    "make_synthetic",
    "synthetic_spots_at",
    "truth_counts_on_grid",
    "truth_expected_on_grid",
    "truth_log1p_cp10k",
    "spot_expected_counts",
]

#: Tissue domains; ``hr_truth['domains']`` and the internal label image use these indices.
DOMAINS = ("background", "stroma", "tumour", "immune", "fat")
_BG, _STROMA, _TUMOUR, _IMMUNE, _FAT = range(5)

#: Reference capture area for the gene baselines ``b_g``: one legacy-ST spot (100 µm Ø), µm².
A_REF_UM2 = math.pi * 50.0 ** 2

#: Beer–Lambert stain vectors (optical density per unit stain, RGB), unit length.
_H_VEC = np.array([0.65, 0.70, 0.29], np.float32)
_E_VEC = np.array([0.10, 0.85, 0.40], np.float32)
_H_VEC /= np.linalg.norm(_H_VEC)
_E_VEC /= np.linalg.norm(_E_VEC)


@dataclass(frozen=True)
class GeneProgramme:
    """How one synthetic gene depends on morphology: ``b`` baseline counts per reference spot,
    ``w`` log-scale weights on features, ``a`` amplitude and ``sigma_um`` scale of its own
    histology-invisible smooth field."""

    name: str
    b: float
    w: dict
    a: float = 0.3
    sigma_um: float = 150.0


#: The named programmes (the first ``n_genes`` are used; further genes are random mixtures).
GENE_PROGRAMMES: tuple[GeneProgramme, ...] = (
    GeneProgramme("ERBB2", 4.0, {"tumour": 3.2, "shared1": 0.6}, a=0.6, sigma_um=300),
    GeneProgramme("EPCAM", 3.0, {"tumour": 3.0, "nuc_fine": 0.4}, a=0.2),
    GeneProgramme("KRT8", 5.0, {"tumour": 2.6, "nuc_mid": 0.8}, a=0.25),
    GeneProgramme("MKI67", 0.8, {"tumour": 1.8, "nuc_fine": 1.2, "nuc_coarse": 0.8}, a=0.5, sigma_um=100),
    GeneProgramme("COL1A1", 6.0, {"stroma": 2.4, "fibro": 0.8, "tumour": -0.8}, a=0.25),
    GeneProgramme("COL3A1", 4.0, {"stroma": 2.2, "fibro": 0.6}, a=0.3),
    GeneProgramme("DCN", 3.0, {"stroma": 2.2, "interface": -1.2, "edge": 0.6}, a=0.3),
    GeneProgramme("POSTN", 1.5, {"stroma_near_tumour": 3.2, "stroma": 0.6}, a=0.3),
    GeneProgramme("MMP11", 1.0, {"interface": 2.8}, a=0.35),
    GeneProgramme("PTPRC", 1.5, {"lymph": 3.0, "immune": 1.0}, a=0.2),
    GeneProgramme("CD74", 4.0, {"lymph": 2.0, "immune": 1.2, "tumour": 0.6}, a=0.3),
    GeneProgramme("MS4A1", 0.5, {"immune": 3.6}, a=0.25, sigma_um=80),
    GeneProgramme("CD3E", 0.8, {"lymph": 2.4, "stroma_near_tumour": 1.0}, a=0.3),
    GeneProgramme("ADIPOQ", 0.5, {"fat": 4.0}, a=0.2),
    GeneProgramme("PLIN1", 0.6, {"fat": 3.6, "edge": 0.4}, a=0.25),
    GeneProgramme("ACTB", 25.0, {"nuc_coarse": 0.6, "fat": -1.0}, a=0.15),
    GeneProgramme("GAPDH", 15.0, {"nuc_mid": 0.5, "tumour": 0.3, "fat": -1.0}, a=0.15),
    GeneProgramme("VIM", 5.0, {"stroma": 1.4, "immune": 1.4, "tumour": -0.8}, a=0.25),
    GeneProgramme("SPARC", 3.0, {"stroma": 1.2, "interface": 1.4}, a=0.3),
    GeneProgramme("ESR1", 1.0, {"tumour": 2.4, "shared2": 0.9}, a=0.7, sigma_um=250),
    GeneProgramme("KRT5", 0.6, {"edge": 2.4, "tumour": 1.2}, a=0.3),
    GeneProgramme("MUC1", 1.5, {"tumour": 2.6, "nuc_coarse": -0.8}, a=0.35),
    GeneProgramme("CXCL13", 0.4, {"immune": 2.6, "lymph": 1.4}, a=0.3),
    GeneProgramme("TFF1", 0.8, {"tumour": 2.0, "shared1": -0.8}, a=0.8, sigma_um=200),
    GeneProgramme("HIDDEN1", 3.0, {}, a=1.0, sigma_um=250),
)

_FEATURES = ("tumour", "stroma", "immune", "fat", "nuc_fine", "nuc_mid", "nuc_coarse", "lymph",
             "fibro", "interface", "stroma_near_tumour", "edge", "shared1", "shared2")

# random-stream identifiers (``default_rng([seed, stream, ...])``)
_S_LAYOUT, _S_CELLS, _S_TEXTURE, _S_GENE, _S_COUNTS, _S_GRID = 1, 2, 3, 4, 5, 6
_LATTICE_CODE = {"square": 1, "hex": 2}


# --------------------------------------------------------------------------------------------
# grids and resampling
# --------------------------------------------------------------------------------------------
def _um_to_px(xy_um: np.ndarray, um_per_px: float) -> np.ndarray:
    """Physical µm (origin at the image's top-left corner) → full-res px (integer = pixel centre)."""
    return np.asarray(xy_um, np.float64) / float(um_per_px) - 0.5


def _px_to_um(xy_px: np.ndarray, um_per_px: float) -> np.ndarray:
    return (np.asarray(xy_px, np.float64) + 0.5) * float(um_per_px)


def _overlap_matrix(n_out: int, step_out: float, n_in: int, step_in: float,
                    origin_out: float = 0.0) -> sp.csr_matrix:
    """Interval-overlap lengths between output cells ``[o + i·step_out, o + (i+1)·step_out)`` and
    input pixels ``[j·step_in, (j+1)·step_in)`` (same unit), as a sparse ``(n_out, n_in)`` matrix."""
    start = origin_out + np.arange(n_out) * step_out
    end = start + step_out
    j0 = np.floor(start / step_in).astype(np.int64)
    k = int(math.ceil(step_out / step_in)) + 1
    j = j0[:, None] + np.arange(k)[None, :]
    ov = np.minimum(end[:, None], (j + 1) * step_in) - np.maximum(start[:, None], j * step_in)
    ok = (ov > 1e-12 * step_in) & (j >= 0) & (j < n_in)
    rows = np.broadcast_to(np.arange(n_out)[:, None], j.shape)[ok]
    return sp.csr_matrix((ov[ok], (rows, j[ok])), shape=(n_out, n_in))


def _interp_matrix(n_out: int, step_out: float, n_in: int, step_in: float) -> sp.csr_matrix:
    """Linear interpolation from pixel centres ``(i+½)·step_in`` to ``(p+½)·step_out``."""
    if n_in == 1:
        return sp.csr_matrix(np.ones((n_out, 1)))
    u = np.clip((np.arange(n_out) + 0.5) * step_out / step_in - 0.5, 0, n_in - 1)
    i0 = np.minimum(np.floor(u).astype(np.int64), n_in - 2)
    f = u - i0
    rows = np.repeat(np.arange(n_out), 2)
    cols = np.stack([i0, i0 + 1], 1).ravel()
    vals = np.stack([1 - f, f], 1).ravel()
    return sp.csr_matrix((vals, (rows, cols)), shape=(n_out, n_in))


def _apply_sep(Mr: sp.csr_matrix, F: np.ndarray, Mc: sp.csr_matrix, dtype=np.float32) -> np.ndarray:
    """``Mr @ F @ Mc.T`` for a 2-D array with sparse separable factors."""
    T = np.asarray(Mr @ F.astype(np.float32, copy=False))
    out = np.asarray(Mc @ T.T).T
    return np.ascontiguousarray(out, dtype=dtype)


def _resample(F: np.ndarray, step_in: float, shape_out: tuple[int, int], step_out: float) -> np.ndarray:
    """Bilinear resampling between two grids sharing the physical origin."""
    Mr = _interp_matrix(shape_out[0], step_out, F.shape[0], step_in).astype(np.float32)
    Mc = _interp_matrix(shape_out[1], step_out, F.shape[1], step_in).astype(np.float32)
    return _apply_sep(Mr, F, Mc)


def _smooth_field(rng: np.random.Generator, extent_um: tuple[float, float], sigma_um: float,
                  shape_out: tuple[int, int], step_out: float) -> np.ndarray:
    """A standardised Gaussian random field (white noise ∗ Gaussian of ``sigma_um``), generated on
    a grid of ``sigma/3`` and resampled bilinearly onto the requested grid."""
    step = max(sigma_um / 3.0, min(step_out, sigma_um))
    n = (int(math.ceil(extent_um[0] / step)) + 1, int(math.ceil(extent_um[1] / step)) + 1)
    z = ndi.gaussian_filter(rng.standard_normal(n), sigma_um / step, mode="reflect")
    z = (z - z.mean()) / max(z.std(), 1e-12)
    return _resample(z.astype(np.float32), step, shape_out, step_out)


def _rescale01(f: np.ndarray, mask: np.ndarray, q: float = 99.0) -> np.ndarray:
    hi = float(np.percentile(f[mask], q)) if mask.any() else 1.0
    return (f / max(hi, 1e-9)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# layout and cells
# --------------------------------------------------------------------------------------------
@dataclass
class _Layout:
    H_um: float
    W_um: float
    step: float                  # layout grid step (µm)
    tissue: np.ndarray           # margins on the layout grid (> 0 inside)
    tumour: np.ndarray
    fat: np.ndarray
    immune: np.ndarray
    warp: np.ndarray             # fibre phase warp (µm)
    cellularity: np.ndarray      # smooth field in ~[0.5, 1]
    infiltrate: np.ndarray       # lymphocyte intensity factor in stroma (0..1)


def _make_layout(seed: int, H_um: float, W_um: float, tumour_fraction: float) -> _Layout:
    rng = np.random.default_rng([seed, _S_LAYOUT])
    step = 5.0
    shp = (int(math.ceil(H_um / step)), int(math.ceil(W_um / step)))
    ext = (H_um, W_um)
    yy = (np.arange(shp[0], dtype=np.float32) + 0.5)[:, None] * step
    xx = (np.arange(shp[1], dtype=np.float32) + 0.5)[None, :] * step
    # tissue: a rotated ellipse with a wobbly outline
    cy = H_um * (0.5 + 0.02 * rng.uniform(-1, 1))
    cx = W_um * (0.5 + 0.02 * rng.uniform(-1, 1))
    ry, rx = 0.36 * H_um, 0.38 * W_um
    th = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(th) + dy * np.sin(th)) / rx
    v = (-dx * np.sin(th) + dy * np.cos(th)) / ry
    r = np.sqrt(u * u + v * v)
    scale = min(H_um, W_um)
    border = np.minimum(np.minimum(yy, H_um - yy), np.minimum(xx, W_um - xx)) / scale
    tissue = (1.0 - r + 0.11 * _smooth_field(rng, ext, 0.08 * scale, shp, step)
              + 0.045 * _smooth_field(rng, ext, 0.02 * scale + 20, shp, step)
              - 6.0 * np.maximum(0.05 - border, 0.0))
    tissue = tissue.astype(np.float32)
    tmask = tissue > 0
    # tumour nests
    tum = 0.8 * _smooth_field(rng, ext, 45.0, shp, step) + 0.6 * _smooth_field(rng, ext, 220.0, shp, step)
    thr = np.quantile(tum[tmask], 1 - tumour_fraction) if tmask.any() else 0.0
    tumour = (tum - thr).astype(np.float32)
    # fat lobules
    fz = _smooth_field(rng, ext, 160.0, shp, step) + 0.3 * _smooth_field(rng, ext, 40.0, shp, step)
    nontum = tmask & (tumour <= 0)
    thr = np.quantile(fz[nontum], 0.88) if nontum.any() else 0.0
    fat = (fz - thr).astype(np.float32)
    # lymphoid aggregates: blobs centred in stroma
    stroma_pts = np.argwhere(nontum & (fat <= 0))
    area_mm2 = tmask.sum() * step * step / 1e6
    n_agg = int(rng.poisson(max(area_mm2, 0.0) * 1.6))
    immune = np.full(shp, -1.0, np.float32)
    if len(stroma_pts) and n_agg:
        pick = stroma_pts[rng.integers(0, len(stroma_pts), n_agg)]
        radii = rng.uniform(35.0, 110.0, n_agg)
        for (i, j), R in zip(pick, radii):
            i0, i1 = max(i - int(2 * R / step) - 1, 0), min(i + int(2 * R / step) + 2, shp[0])
            j0, j1 = max(j - int(2 * R / step) - 1, 0), min(j + int(2 * R / step) + 2, shp[1])
            d = np.hypot(yy[i0:i1] - yy[i, 0], xx[:, j0:j1] - xx[0, j])
            np.maximum(immune[i0:i1, j0:j1], 1.0 - d / R, out=immune[i0:i1, j0:j1])
        immune += 0.25 * _smooth_field(rng, ext, 15.0, shp, step)
    # fibre warp (µm) and cellularity
    warp = 140.0 * _smooth_field(rng, ext, 110.0, shp, step) + 20.0 * _smooth_field(rng, ext, 25.0, shp, step)
    cell = np.clip(0.78 + 0.18 * _smooth_field(rng, ext, 120.0, shp, step), 0.45, 1.0)
    # lymphocyte infiltrate decays with distance from tumour
    d_tum = ndi.distance_transform_edt(~(tumour > 0)) * step
    infil = np.exp(-d_tum / 90.0) * np.clip(0.6 + 0.5 * _smooth_field(rng, ext, 150.0, shp, step), 0, None)
    return _Layout(H_um, W_um, step, tissue, tumour, fat, immune.astype(np.float32), warp.astype(np.float32),
                   cell.astype(np.float32), infil.astype(np.float32))


def _label_image(lay: _Layout, shape_px: tuple[int, int], um: float) -> np.ndarray:
    """Full-resolution domain labels from the upsampled layout margins (smooth boundaries)."""
    up = lambda f: _resample(f, lay.step, shape_px, um)  # noqa: E731
    lab = np.zeros(shape_px, np.uint8)
    tis = up(lay.tissue) > 0
    lab[tis] = _STROMA
    fat = up(lay.fat) > 0
    lab[tis & fat] = _FAT
    imm = up(lay.immune) > 0
    lab[tis & imm] = _IMMUNE
    tum = up(lay.tumour) > 0
    lab[tis & tum] = _TUMOUR
    return lab


def _hex_points(rng, H_um, W_um, spacing, jitter):
    dy = spacing * math.sqrt(3) / 2
    ys = np.arange(0.0, H_um + dy, dy)
    xs = np.arange(0.0, W_um + spacing, spacing)
    X, Y = np.meshgrid(xs, ys)
    X = X + (np.arange(len(ys))[:, None] % 2) * spacing / 2
    pts = np.stack([X.ravel(), Y.ravel()], 1)
    pts += rng.normal(0, jitter * spacing, pts.shape)
    return pts


def _lookup(arr: np.ndarray, xy_um: np.ndarray, step: float) -> np.ndarray:
    r = np.clip((xy_um[:, 1] / step).astype(np.int64), 0, arr.shape[0] - 1)
    c = np.clip((xy_um[:, 0] / step).astype(np.int64), 0, arr.shape[1] - 1)
    return arr[r, c]


@dataclass
class _Nuclei:
    xy: np.ndarray      # (N, 2) centres, µm
    a: np.ndarray       # semi-major axis, µm
    b: np.ndarray       # semi-minor axis, µm
    theta: np.ndarray   # major-axis angle from +x (radians)
    h: np.ndarray       # haematoxylin density
    kind: np.ndarray    # 0 tumour, 1 lymphocyte, 2 fibroblast
    rim: np.ndarray     # 0..1 pallor of the nucleus centre (vesicular chromatin)


def _make_nuclei(seed: int, lay: _Layout, lab: np.ndarray, um: float) -> _Nuclei:
    rng = np.random.default_rng([seed, _S_CELLS])
    H_um, W_um = lay.H_um, lay.W_um
    parts = []

    def keep_in(pts, dom):
        pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < W_um) & (pts[:, 1] >= 0) & (pts[:, 1] < H_um)]
        return pts[_lookup(lab, pts, um) == dom]

    # tumour: jittered hex packing thinned by cellularity; large pleomorphic nuclei
    p = keep_in(_hex_points(rng, H_um, W_um, 15.5, 0.2), _TUMOUR)
    p = p[rng.random(len(p)) < _lookup(lay.cellularity, p, lay.step)]
    n = len(p)
    a = rng.uniform(4.8, 7.6, n)
    parts.append((p, a, a * rng.uniform(0.6, 0.95, n), rng.uniform(0, np.pi, n), rng.uniform(0.7, 1.05, n), 0))
    # lymphoid aggregates: dense small round dark nuclei
    p = keep_in(_hex_points(rng, H_um, W_um, 8.0, 0.2), _IMMUNE)
    p = p[rng.random(len(p)) < 0.85]
    n = len(p)
    a = rng.uniform(2.4, 3.4, n)
    parts.append((p, a, a * rng.uniform(0.85, 1.0, n), rng.uniform(0, np.pi, n), rng.uniform(1.25, 1.6, n), 1))
    # stromal lymphocyte infiltrate (Poisson, intensity from the layout)
    area = H_um * W_um
    n = rng.poisson(area / 150.0)
    p = np.column_stack([rng.uniform(0, W_um, n), rng.uniform(0, H_um, n)])
    p = p[rng.random(n) < _lookup(lay.infiltrate, p, lay.step)]
    p = keep_in(p, _STROMA)
    n = len(p)
    a = rng.uniform(2.4, 3.3, n)
    parts.append((p, a, a * rng.uniform(0.85, 1.0, n), rng.uniform(0, np.pi, n), rng.uniform(1.2, 1.55, n), 1))
    # fibroblasts: sparse elongated nuclei along the collagen fibres
    n = rng.poisson(area / 1100.0)
    p = keep_in(np.column_stack([rng.uniform(0, W_um, n), rng.uniform(0, H_um, n)]), _STROMA)
    n = len(p)
    gy, gx = np.gradient(lay.warp, lay.step)
    ang = np.arctan2(-gx, 1.0 + gy)  # tangent of the fibre level sets of (y + warp)
    a = rng.uniform(5.5, 9.0, n)
    parts.append((p, a, rng.uniform(1.4, 2.2, n), _lookup(ang, p, lay.step) + rng.normal(0, 0.15, n),
                  rng.uniform(0.9, 1.2, n), 2))
    xy = np.concatenate([q[0] for q in parts]).reshape(-1, 2)
    cat = lambda i: np.concatenate([q[i] for q in parts])  # noqa: E731
    kind = np.concatenate([np.full(len(q[0]), q[5], np.int8) for q in parts])
    rim = np.where(kind == 0, rng.uniform(0.2, 0.55, len(kind)), 0.0)
    return _Nuclei(xy, cat(1), cat(2), cat(3), cat(4), kind, rim)


def _render_nuclei(nuc: _Nuclei, shape_px: tuple[int, int], um: float) -> np.ndarray:
    """Haematoxylin density of all nuclei as anti-aliased ellipses (vectorised per size class)."""
    H, W = shape_px
    acc = np.zeros(H * W, np.float64)
    if len(nuc.xy) == 0:
        return acc.reshape(H, W).astype(np.float32)
    f32 = np.float32
    cx, cy = (nuc.xy[:, 0] / um).astype(f32), (nuc.xy[:, 1] / um).astype(f32)  # continuous px (corner)
    a_px, b_px = (nuc.a / um).astype(f32), (nuc.b / um).astype(f32)
    R_all = np.ceil(a_px + 1.0).astype(np.int64)
    cos, sin = np.cos(nuc.theta).astype(f32), np.sin(nuc.theta).astype(f32)
    hh, rim = nuc.h.astype(f32), nuc.rim.astype(f32)
    for R in np.unique(R_all):
        idx = np.nonzero(R_all == R)[0]
        off = np.arange(-R, R + 1)
        oy, ox = np.meshgrid(off, off, indexing="ij")
        oy, ox = oy.ravel(), ox.ravel()
        batch = max(1, 4_000_000 // len(off) ** 2)
        for s in range(0, len(idx), batch):
            ii = idx[s:s + batch]
            r0 = np.floor(cy[ii]).astype(np.int64)
            c0 = np.floor(cx[ii]).astype(np.int64)
            rr = r0[:, None] + oy[None, :]
            cc = c0[:, None] + ox[None, :]
            dy = (r0 - cy[ii] + f32(0.5))[:, None] + oy[None, :].astype(f32)
            dx = (c0 - cx[ii] + f32(0.5))[:, None] + ox[None, :].astype(f32)
            u = (dx * cos[ii, None] + dy * sin[ii, None]) / a_px[ii, None]
            v = (dy * cos[ii, None] - dx * sin[ii, None]) / b_px[ii, None]
            q2 = u * u + v * v
            # 1-px soft edge, measured along the minor axis
            val = np.clip((f32(1.0) - np.sqrt(q2)) * b_px[ii, None] + f32(0.5), 0.0, 1.0) * hh[ii, None]
            # vesicular nuclei: paler centre, darker rim
            val *= f32(1.0) - rim[ii, None] * np.clip(f32(1.0) - q2, 0.0, 1.0)
            ok = (val > 0) & (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
            acc += np.bincount((rr[ok] * W + cc[ok]), weights=val[ok], minlength=H * W)
    return acc.reshape(H, W).astype(np.float32)


def _render_he(seed: int, lay: _Layout, lab: np.ndarray, nuc: _Nuclei, um: float) -> np.ndarray:
    rng = np.random.default_rng([seed, _S_TEXTURE])
    H, W = lab.shape
    ext = (lay.H_um, lay.W_um)
    up = lambda f: _resample(f, lay.step, (H, W), um)  # noqa: E731
    f32 = np.float32
    grain = _noise_up(rng, lay, 1.5, (H, W), um)      # ~1.5 µm grain
    # nuclei with chromatin texture
    Ht = np.minimum(_render_nuclei(nuc, (H, W), um), f32(1.8))
    Ht *= f32(0.85) + f32(0.22) * grain
    # collagen fibres: wavy level sets of (y + warp), with phase jitter and breaks
    lam = max(10.0, 3.0 * um)
    yy = ((np.arange(H, dtype=np.float32) + 0.5) * um)[:, None]
    phase = (yy + up(lay.warp)) * f32(2 * np.pi / lam) + f32(0.9) * _noise_up(rng, lay, 7.0, (H, W), um)
    fib = f32(0.5) + f32(0.5) * np.sin(phase)
    fib *= fib
    fib *= np.clip(f32(0.7) + f32(0.35) * _noise_up(rng, lay, 3.0, (H, W), um), 0, 1.2)
    dens = np.clip(0.85 + 0.25 * _smooth_field(rng, ext, 200.0, lay.tissue.shape, lay.step), 0.4, 1.2)
    E = np.zeros((H, W), np.float32)
    tab_e = np.array([0.0, 0.0, 0.24, 0.14, 0.0], np.float32)
    tab_h = np.array([0.0, 0.02, 0.10, 0.10, 0.0], np.float32)
    st = lab == _STROMA
    E = np.where(st, (f32(0.22) + f32(0.26) * fib) * up(dens), tab_e[lab] + f32(0.04) * grain * (lab == _TUMOUR))
    del fib, phase
    Ht += tab_h[lab]
    idx, memb = _fat_membranes(rng, lay, lab, um)
    E.ravel()[idx] = 0.5 * memb
    E *= f32(1.0) + f32(0.08) * grain
    # stain intensity varies smoothly over the slide
    stain = np.clip(1.0 + 0.12 * _smooth_field(rng, ext, 400.0, lay.tissue.shape, lay.step), 0.7, 1.3)
    stain = up(stain) * (lab != _BG)
    Ht *= stain
    E *= stain
    bg = f32(0.025) + f32(0.004) * grain  # slide glass
    out = np.empty((H, W, 3), np.uint8)
    k = f32(-np.log(10.0))
    for ch in range(3):
        od = Ht * _H_VEC[ch] + E * _E_VEC[ch] + bg
        out[..., ch] = np.clip(f32(255.0) * np.exp(od * k), 0, 255).astype(np.uint8)
    return out


def _fat_membranes(rng, lay: _Layout, lab: np.ndarray, um: float) -> tuple[np.ndarray, np.ndarray]:
    """Adipocyte membranes (Voronoi borders of jittered seeds): flat indices of the full-res fat
    pixels and their membrane strength in 0..1 (distance to the bisector on a ≥2 µm grid)."""
    from scipy.spatial import cKDTree

    H, W = lab.shape
    idx = np.flatnonzero(lab.ravel() == _FAT)
    if len(idx) == 0:
        return idx, np.zeros(0, np.float32)
    seeds = _hex_points(rng, lay.H_um, lay.W_um, 75.0, 0.28)
    step = max(um, 2.0)
    shp = (int(math.ceil(lay.H_um / step)), int(math.ceil(lay.W_um / step)))
    ri = np.minimum(((np.arange(shp[0]) + 0.5) * step / um).astype(np.int64), H - 1)
    ci = np.minimum(((np.arange(shp[1]) + 0.5) * step / um).astype(np.int64), W - 1)
    fat_c = ndi.binary_dilation(lab[np.ix_(ri, ci)] == _FAT, iterations=2)
    gap = np.full(shp, 50.0, np.float32)
    ij = np.argwhere(fat_c)
    d, _ = cKDTree(seeds).query((ij[:, ::-1] + 0.5) * step, k=2)
    gap[ij[:, 0], ij[:, 1]] = (d[:, 1] - d[:, 0]) / 2.0
    r, c = np.divmod(idx, W)
    coords = np.stack([(r + 0.5) * um / step - 0.5, (c + 0.5) * um / step - 0.5])
    g = ndi.map_coordinates(gap, coords, order=1, mode="nearest")
    return idx, np.exp(-(g / 1.4) ** 2).astype(np.float32)


def _noise_up(rng, lay: _Layout, step: float, shape_px, um: float) -> np.ndarray:
    """White noise on a ``step`` µm grid, bilinearly upsampled (a cheap ~step-correlated field)."""
    step = max(step, um)
    gshape = (int(math.ceil(lay.H_um / step)) + 1, int(math.ceil(lay.W_um / step)) + 1)
    return _resample(rng.standard_normal(gshape, dtype=np.float32), step, shape_px, um)


# --------------------------------------------------------------------------------------------
# truth
# --------------------------------------------------------------------------------------------
def _features(seed: int, lay: _Layout, lab: np.ndarray, nuc: _Nuclei, um: float, hr_um: float,
              hr_shape: tuple[int, int]) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Morphology features on the HR grid (area fractions from the full-res labels)."""
    Hh, Wh = hr_shape
    H, W = lab.shape
    Ar = (_overlap_matrix(Hh, hr_um, H, um) / hr_um).astype(np.float32).tocsr()
    Ac = (_overlap_matrix(Wh, hr_um, W, um) / hr_um).astype(np.float32).tocsr()
    frac = np.stack([_apply_sep(Ar, (lab == d), Ac) for d in range(len(DOMAINS))])
    tissue = np.clip(1.0 - frac[_BG], 0.0, 1.0)
    tmask = tissue > 0.05
    domains = np.argmax(frac, axis=0).astype(np.uint8)

    def density(sel, sigma_um):  # nuclei per 1000 µm²
        xy = nuc.xy[sel]
        h, _, _ = np.histogram2d(xy[:, 1], xy[:, 0], bins=(Hh, Wh), range=((0, Hh * hr_um), (0, Wh * hr_um)))
        d = h * (1000.0 / hr_um ** 2)
        return ndi.gaussian_filter(d, sigma_um / hr_um, mode="constant").astype(np.float32)

    allk = np.ones(len(nuc.xy), bool)
    f = {"tumour": frac[_TUMOUR], "stroma": frac[_STROMA], "immune": frac[_IMMUNE], "fat": frac[_FAT]}
    f["nuc_fine"] = _rescale01(density(allk, 10.0), tmask)
    f["nuc_mid"] = _rescale01(density(allk, 40.0), tmask)
    f["nuc_coarse"] = _rescale01(density(allk, 120.0), tmask)
    f["lymph"] = _rescale01(density(nuc.kind == 1, 25.0), tmask)
    f["fibro"] = _rescale01(density(nuc.kind == 2, 40.0), tmask)
    tum = frac[_TUMOUR] > 0.5
    d_out = ndi.distance_transform_edt(~tum) * hr_um
    d_in = ndi.distance_transform_edt(tum) * hr_um
    f["interface"] = np.exp(-np.where(tum, d_in, d_out) / 40.0).astype(np.float32) * (tum.any())
    f["stroma_near_tumour"] = (np.exp(-d_out / 60.0) * (1.0 - frac[_TUMOUR])).astype(np.float32) * (tum.any())
    d_edge = ndi.distance_transform_edt(tissue > 0.5) * hr_um
    f["edge"] = (np.exp(-d_edge / 100.0) * (tissue > 0)).astype(np.float32)
    rng = np.random.default_rng([seed, _S_GENE, 0])
    f["shared1"] = _smooth_field(rng, (Hh * hr_um, Wh * hr_um), 260.0, hr_shape, hr_um)
    f["shared2"] = _smooth_field(rng, (Hh * hr_um, Wh * hr_um), 200.0, hr_shape, hr_um)
    nd = density(allk, 20.0)
    return {k: v.astype(np.float32) for k, v in f.items()}, tissue.astype(np.float32), domains, nd


def _programme(seed: int, g: int) -> GeneProgramme:
    if g < len(GENE_PROGRAMMES):
        return GENE_PROGRAMMES[g]
    rng = np.random.default_rng([seed, _S_GENE, 1000 + g])
    k = rng.choice(len(_FEATURES), size=int(rng.integers(1, 4)), replace=False)
    w = {_FEATURES[i]: float(rng.choice([-1, 1]) * rng.uniform(0.8, 3.0)) for i in k}
    return GeneProgramme(f"SYN{g:03d}", float(np.exp(rng.uniform(-1, 2.5))), w,
                         a=float(rng.uniform(0.2, 0.7)), sigma_um=float(rng.uniform(80, 300)))


def _gene_maps(seed: int, feats: dict, tissue: np.ndarray, n_genes: int, hr_um: float,
               depth: float) -> tuple[np.ndarray, list[str]]:
    Hh, Wh = tissue.shape
    maps = np.zeros((n_genes, Hh, Wh), np.float32)
    names = []
    for g in range(n_genes):
        p = _programme(seed, g)
        rng = np.random.default_rng([seed, _S_GENE, g + 1])
        z = _smooth_field(rng, (Hh * hr_um, Wh * hr_um), p.sigma_um, (Hh, Wh), hr_um)
        logit = p.a * z
        for k, w in p.w.items():
            logit = logit + w * feats[k]
        maps[g] = tissue * (depth * p.b / A_REF_UM2) * np.exp(logit)
        names.append(p.name)
    return maps, names


# --------------------------------------------------------------------------------------------
# spots
# --------------------------------------------------------------------------------------------
def _lattice(kind: str, pitch: float, H_um: float, W_um: float):
    """Spot centres (x, y) µm, array_row, array_col, barcodes for a square or hex lattice.

    Square: centres at ((j+½)·pitch, (i+½)·pitch), so spot (i, j) sits at the centre of LR cell
    (i, j) of a grid of ``pitch`` anchored at the origin. Hex (Visium): rows ``pitch·√3/2`` apart,
    odd rows shifted by ``pitch/2``, ``array_col = 2j + (i mod 2)`` as in Visium."""
    if kind == "square":
        ni, nj = int(H_um // pitch), int(W_um // pitch)
        I, J = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
        I, J = I.ravel(), J.ravel()
        xy = np.column_stack([(J + 0.5) * pitch, (I + 0.5) * pitch])
        return xy, I, J, np.array([f"{j}x{i}" for i, j in zip(I, J)], dtype=object)
    if kind == "hex":
        dy = pitch * math.sqrt(3) / 2
        ni = int((H_um - pitch / 2) // dy) + 1 if H_um >= pitch else 0
        nj = int((W_um - pitch) // pitch) + 1 if W_um >= 1.5 * pitch else 0
        I, J = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
        I, J = I.ravel(), J.ravel()
        xy = np.column_stack([(J + 0.5 + 0.5 * (I % 2)) * pitch, I * dy + pitch / 2])
        col = 2 * J + (I % 2)
        return xy, I, col, np.array([f"SYN-{i:03d}-{c:03d}" for i, c in zip(I, col)], dtype=object)
    raise ValueError(f"unknown lattice {kind!r} (expected 'square' or 'hex')")


def _disk_weights(xy_um: np.ndarray, radius_um: float, hr_um: float, hr_shape: tuple[int, int]) -> sp.csr_matrix:
    """Area (µm²) of each disk ∩ each HR pixel, by n×n sub-sampling of the pixels, as a sparse
    (n_spots, H·W) matrix; integrating a piecewise-constant rate is then a mat-vec product."""
    Hh, Wh = hr_shape
    n = len(xy_um)
    if n == 0:
        return sp.csr_matrix((0, Hh * Wh))
    nsub = int(np.clip(math.ceil(40.0 * hr_um / (2 * radius_um)), 4, 12))
    sub = (np.arange(nsub) + 0.5) / nsub
    R = int(math.ceil(radius_um / hr_um)) + 1
    off = np.arange(-R, R + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    oy, ox = oy.ravel(), ox.ravel()
    sy, sx = np.meshgrid(sub, sub, indexing="ij")
    sy, sx = sy.ravel(), sx.ravel()
    rows, cols, vals = [], [], []
    batch = max(1, 2_000_000 // (len(off) ** 2 * nsub * nsub))
    for s in range(0, n, batch):
        c = xy_um[s:s + batch]
        r0 = np.floor(c[:, 1] / hr_um).astype(np.int64)
        c0 = np.floor(c[:, 0] / hr_um).astype(np.int64)
        rr = r0[:, None] + oy[None, :]  # (b, P)
        cc = c0[:, None] + ox[None, :]
        py = (rr[..., None] + sy) * hr_um - c[:, 1, None, None]  # (b, P, S)
        px = (cc[..., None] + sx) * hr_um - c[:, 0, None, None]
        inside = (px * px + py * py <= radius_um * radius_um).mean(-1) * hr_um * hr_um
        ok = (inside > 0) & (rr >= 0) & (rr < Hh) & (cc >= 0) & (cc < Wh)
        b_idx = np.broadcast_to(np.arange(s, s + len(c))[:, None], rr.shape)
        rows.append(b_idx[ok])
        cols.append((rr * Wh + cc)[ok])
        vals.append(inside[ok])
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, Hh * Wh))


def _spots_adata(truth: dict, xy_um, rows, cols, barcodes, diameter_um, um_per_px, counts_rng,
                 min_tissue: float, image: np.ndarray | None, library_id: str, meta: dict):
    import anndata as ad
    import pandas as pd

    maps, hr_um = truth["maps"], float(truth["um_per_px"])
    G, Hh, Wh = maps.shape
    r = diameter_um / 2
    Wm = _disk_weights(np.asarray(xy_um, float), r, hr_um, (Hh, Wh))
    tfrac = np.asarray(Wm @ truth["tissue"].ravel().astype(np.float64)) / (math.pi * r * r)
    keep = tfrac >= min_tissue
    Wm = Wm[keep]
    expected = np.asarray(Wm @ maps.reshape(G, -1).T.astype(np.float64))  # (n, G)
    counts = counts_rng.poisson(expected).astype(np.int32)
    obs = pd.DataFrame({
        "in_tissue": np.ones(int(keep.sum()), np.int64),
        "array_row": np.asarray(rows)[keep].astype(np.int64),
        "array_col": np.asarray(cols)[keep].astype(np.int64),
        "tissue_fraction": tfrac[keep].astype(np.float32),
    }, index=pd.Index(np.asarray(barcodes)[keep].astype(str), name="barcode"))
    var = pd.DataFrame(index=pd.Index(list(truth["genes"]), name="gene"))
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.obsm["spatial"] = _um_to_px(np.asarray(xy_um, float)[keep], um_per_px)
    adata.obsm["synthetic_expected"] = expected.astype(np.float32)
    hires, f = None, 1.0
    if image is not None:
        f = max(1, int(math.ceil(max(image.shape[:2]) / 2000)))
        hires = image[::f, ::f] if f > 1 else image
    adata.uns["spatial"] = build_uns_spatial(library_id, hires=hires, hires_scalef=1.0 / f,
                                             spot_diameter_fullres=diameter_um / um_per_px, metadata=meta)
    return adata


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def make_synthetic(seed: int = 0, size_um: tuple[float, float] = (3000.0, 3000.0), um_per_px: float = 1.0,
                   n_genes: int = 25, technology: str = "legacy_st", hr_um: float | None = None, *,
                   depth: float = 1.0, tumour_fraction: float = 0.35, min_tissue: float = 0.5,
                   name: str = "synthetic") -> Sample:
    """A seeded synthetic H&E + spot-count section with a known HR expression truth.

    Parameters
    ----------
    seed : random seed; the same seed (and parameters) gives an identical sample.
    size_um : (height, width) of the section image in µm.
    um_per_px : µm per full-resolution H&E pixel.
    n_genes : number of genes (the first 25 are the named programmes of :data:`GENE_PROGRAMMES`).
    technology : ``'legacy_st'`` (100 µm spots on a 200 µm square grid) or ``'visium'`` (55 µm
        spots on a 100 µm hexagonal lattice).
    hr_um : pixel size of the HR truth grid in µm (default 10).
    depth : multiplies every rate (sequencing depth / capture efficiency).
    tumour_fraction : share of the tissue in tumour nests.
    min_tissue : spots are kept when at least this fraction of their disk is under tissue.

    Returns
    -------
    Sample with ``technology`` = the lattice kind, ``provenance['technology'] == 'synthetic'``,
    ``hr_truth`` as described in the module docstring, and the noise-free expected spot counts in
    ``adata.obsm['synthetic_expected']``.
    """
    t0 = time.perf_counter()
    technology = str(technology).lower()
    if technology not in ("legacy_st", "visium"):
        raise ValueError(f"technology must be 'legacy_st' or 'visium', not {technology!r}")
    H_um, W_um = (float(size_um[0]), float(size_um[1])) if np.ndim(size_um) else (float(size_um),) * 2
    um = float(um_per_px)
    hr_um = 10.0 if hr_um is None else float(hr_um)
    if not (um > 0 and hr_um > 0 and H_um > 0 and W_um > 0):
        raise ValueError("size_um, um_per_px and hr_um must be positive")
    if n_genes < 1:
        raise ValueError("n_genes must be >= 1")
    shape_px = (int(round(H_um / um)), int(round(W_um / um)))
    hr_shape = (int(math.ceil(H_um / hr_um - 1e-9)), int(math.ceil(W_um / hr_um - 1e-9)))

    lay = _make_layout(seed, H_um, W_um, tumour_fraction)
    lab = _label_image(lay, shape_px, um)
    nuc = _make_nuclei(seed, lay, lab, um)
    img = _render_he(seed, lay, lab, nuc, um)
    feats, tissue, domains, ndens = _features(seed, lay, lab, nuc, um, hr_um, hr_shape)
    maps, genes = _gene_maps(seed, feats, tissue, n_genes, hr_um, depth)
    truth = {
        "maps": maps, "genes": genes, "um_per_px": hr_um, "origin_px": (-0.5, -0.5),
        "units": "expected UMI per um^2", "tissue": tissue, "domains": domains,
        "domain_names": list(DOMAINS), "nuclear_density": ndens,
    }
    lattice = "square" if technology == "legacy_st" else "hex"
    pitch, diam = LATTICE_PITCH_UM[technology], SPOT_DIAMETER_UM[technology]
    xy, rows, cols, bcs = _lattice(lattice, pitch, H_um, W_um)
    library_id = f"{name}_{technology}_seed{seed}"
    meta = {"source": "napari_diffst.data.synthetic", "seed": int(seed)}
    adata = _spots_adata(truth, xy, rows, cols, bcs, diam, um,
                         np.random.default_rng([seed, _S_COUNTS, _LATTICE_CODE[lattice]]),
                         min_tissue, img, library_id, meta)
    prov = {
        "technology": "synthetic", "lattice": technology, "seed": int(seed),
        "generator": "napari_diffst.data.synthetic.make_synthetic",
        "params": {"size_um": (H_um, W_um), "um_per_px": um, "n_genes": int(n_genes), "hr_um": hr_um,
                   "depth": float(depth), "tumour_fraction": float(tumour_fraction), "min_tissue": min_tissue},
        "n_nuclei": int(len(nuc.xy)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return Sample(adata=adata, image=HistologyImage.from_array(img), um_per_px=um, spot_diameter_um=diam,
                  technology=technology, name=name, provenance=prov, hr_truth=truth, lattice_pitch_um=pitch)


def _truth_of(obj) -> dict:
    truth = obj.hr_truth if isinstance(obj, Sample) else obj
    if not isinstance(truth, dict) or "maps" not in truth:
        raise ValueError("expected a synthetic Sample (with hr_truth) or its hr_truth dict")
    return truth


def _seed_of(obj) -> int:
    if isinstance(obj, Sample):
        return int(obj.provenance.get("seed", 0))
    return 0


def synthetic_spots_at(sample: Sample, pitch_um: float, spot_diameter_um: float | None = None,
                       lattice: str = "square", seed: int | None = None, min_tissue: float = 0.5,
                       name: str | None = None) -> Sample:
    """Re-measure a synthetic sample's truth with spots on another lattice / at another scale.

    Counts are ``Poisson(∫_disk λ_g)`` (see module docstring) drawn from the same HR rate; the image
    and ``hr_truth`` are shared with ``sample``. ``spot_diameter_um`` defaults to ``pitch/2``
    (square, legacy-ST ratio) or ``0.55·pitch`` (hex, Visium ratio)."""
    truth = _truth_of(sample)
    if lattice not in _LATTICE_CODE:
        raise ValueError(f"lattice must be 'square' or 'hex', not {lattice!r}")
    pitch = float(pitch_um)
    diam = float(spot_diameter_um) if spot_diameter_um else (0.5 if lattice == "square" else 0.55) * pitch
    G, Hh, Wh = truth["maps"].shape
    hr_um = float(truth["um_per_px"])
    H_um, W_um = sample.image.shape[0] * sample.um_per_px, sample.image.shape[1] * sample.um_per_px
    xy, rows, cols, bcs = _lattice(lattice, pitch, H_um, W_um)
    seed = _seed_of(sample) if seed is None else int(seed)
    rng = np.random.default_rng([seed, _S_COUNTS, _LATTICE_CODE[lattice], int(round(pitch * 1000)),
                                 int(round(diam * 1000))])
    name = name or f"{sample.name}_{lattice}{pitch:g}um"
    adata = _spots_adata(truth, xy, rows, cols, bcs, diam, sample.um_per_px, rng, min_tissue,
                         None, name, {"source": "napari_diffst.data.synthetic", "seed": seed})
    prov = dict(sample.provenance, seed=seed, lattice=f"{lattice}:{pitch:g}um",
                generator="napari_diffst.data.synthetic.synthetic_spots_at")
    if lattice == "square" and pitch == 200.0:
        tech = "legacy_st"
    elif lattice == "hex" and pitch == 100.0:
        tech = "visium"
    else:
        tech = "synthetic"
    return Sample(adata=adata, image=sample.image, um_per_px=sample.um_per_px, spot_diameter_um=diam,
                  technology=tech, name=name, provenance=prov, hr_truth=truth, lattice_pitch_um=pitch)


def truth_expected_on_grid(sample_or_truth, cell_um: float, origin_um: tuple[float, float] = (0.0, 0.0),
                           shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact expected counts ``∫_cell λ_g`` in square cells of ``cell_um`` µm.

    Cells are ``[origin + i·cell_um, origin + (i+1)·cell_um)`` along y (rows) and x (cols), origin
    given as (y, x) µm; ``shape`` defaults to covering the truth grid. Returns ``(expected (G, h, w)
    float64, tissue_fraction (h, w))`` — with ``cell_um`` a multiple of ``hr_um`` this is a block sum."""
    truth = _truth_of(sample_or_truth)
    maps, hr = truth["maps"], float(truth["um_per_px"])
    G, Hh, Wh = maps.shape
    cell = float(cell_um)
    if cell <= 0:
        raise ValueError("cell_um must be positive")
    oy, ox = float(origin_um[0]), float(origin_um[1])
    if shape is None:
        shape = (int(math.ceil((Hh * hr - oy) / cell - 1e-9)), int(math.ceil((Wh * hr - ox) / cell - 1e-9)))
    Ar = _overlap_matrix(shape[0], cell, Hh, hr, oy).toarray()
    Ac = _overlap_matrix(shape[1], cell, Wh, hr, ox).toarray()
    exp_ = Ar[None] @ maps.astype(np.float64) @ Ac.T[None]
    tis = (Ar @ truth["tissue"].astype(np.float64) @ Ac.T) / (cell * cell)
    return exp_, tis


def truth_counts_on_grid(sample_or_truth, cell_um: float, seed: int | None = None,
                         origin_um: tuple[float, float] = (0.0, 0.0), shape: tuple[int, int] | None = None,
                         rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Poisson counts of the HR truth aggregated into square cells of ``cell_um`` µm.

    ``counts[g, i, j] ~ Poisson(∫_cell(i,j) λ_g)`` (exact integral, :func:`truth_expected_on_grid`),
    seeded by ``seed`` (default: the sample's seed) and the cell size so that e.g. a 5× run on
    legacy ST can bin the truth at 200/5 = 40 µm reproducibly. Returns ``(counts (G, h, w) int64,
    tissue_fraction (h, w))``."""
    exp_, tis = truth_expected_on_grid(sample_or_truth, cell_um, origin_um, shape)
    if rng is None:
        s = _seed_of(sample_or_truth) if seed is None else int(seed)
        rng = np.random.default_rng([s, _S_GRID, int(round(float(cell_um) * 1000))])
    return rng.poisson(exp_), tis


def truth_log1p_cp10k(maps: np.ndarray, target: float = 1e4) -> np.ndarray:
    """log1p(CP10k) of noise-free expression: each pixel's rates normalised to sum ``target``
    over the panel (0 where a pixel has no expression) — the units the spots layer shows."""
    from .normalise import cp10k_factor

    maps = np.asarray(maps, np.float64)
    return np.log1p(maps * cp10k_factor(maps.sum(axis=0, keepdims=True), target)).astype(np.float32)


def spot_expected_counts(sample: Sample) -> np.ndarray:
    """Noise-free expected counts per spot and gene (spots × genes), recomputed from the truth."""
    truth = _truth_of(sample)
    maps, hr = truth["maps"], float(truth["um_per_px"])
    xy_um = _px_to_um(np.asarray(sample.adata.obsm["spatial"], float), sample.um_per_px)
    Wm = _disk_weights(xy_um, sample.spot_diameter_um / 2, hr, maps.shape[1:])
    return np.asarray(Wm @ maps.reshape(maps.shape[0], -1).T.astype(np.float64))
