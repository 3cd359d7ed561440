"""Registration of spots onto the histology: metadata, landmarks, automatic refinement.

The result is always a 3×3 affine on homogeneous (x, y, 1) **full-resolution image pixels** that
maps spot coordinates (``adata.obsm['spatial']``, the *spot frame*) onto the H&E (the *image
frame*). It is stored in ``Sample.transform`` and shown in napari as a layer affine; the image is
never resampled.

Three ways to get it
--------------------
(a) :func:`from_metadata` — identity: exact when the reader's pixel coordinates and the image are
    consistent (Space Ranger, legacy-ST ``*_selection.tsv``).
(b) :func:`fit_landmarks` — ≥ 3 pairs (image point, spot-frame point); similarity (Umeyama, no
    reflection) or full affine by linear least squares; residual per landmark and RMS in µm.
(c) :func:`refine_registration` — a small similarity (or affine) correction that puts the
    in-tissue spots on tissue and the empty lattice sites around them off tissue.

Refinement objective
--------------------
A tissue mask is computed on a thumbnail (≤ ``max_size`` px; Otsu threshold of the smoothed HSV
saturation — stained tissue is saturated, glass is not — grown by hysteresis into pale, textured tissue
such as fat and loose stroma, small objects removed, small holes filled; :func:`tissue_mask`) and grown by ``edge_offset_um`` (the spot-selection rule: on her2st a spot counts as
under tissue when its centre is within ~10–30 µm of it). From its signed distance ``d`` (> 0
inside) a smooth tissue probability ``P_σ = Φ(d/σ)`` is formed (its ½-level is the edge at every
σ, unlike a blurred mask, whose corners erode and bias the scale). With ``in`` the edge spots
(in-tissue spots with an empty lattice neighbour) and ``out`` the empty lattice sites next to them
(off tissue by construction of the spot selection; an empty site surrounded by spots is a QC
drop-out and is ignored)::

    score(T) = mean_{k∈in} P_σ(T x_k) − mean_{k∈out} P_σ(T x_k)

Each (in, out) pair across the edge scores best with the edge half-way between them, so the score
is not biased towards growing or shrinking the spot pattern. ``T = D(p) ∘ T₀`` with ``D`` a
similarity about the spots' centroid, ``p = (tx, ty, θ, log s)`` scaled so that one unit of each
moves the outermost spots by ~one pitch. ``score`` is maximised coarse-to-fine (σ = 1, ½, ¼, ⅛
pitch): a vectorised grid search over shifts ±``max_shift``, rotations ±``max_rotation_deg`` and
scales ±``max_scale`` at the coarsest σ, Nelder–Mead from the best five grid points, the best
three carried through every finer σ (and a 6-parameter affine at the end when ``model='affine'``).

Legacy-ST slides show the printed spot array as faint dots on bare glass. When these are detected
(:func:`_fit_array_dots`), a last stage aligns the empty lattice sites on glass with them (a
one-period shift search, then Nelder–Mead within ±0.35 pitch), which brings the error from the
~10–45 µm of the tissue outline down to 5–14 µm on her2st C2–C6.

Measured (her2st C2–C6 × 9 perturbations of up to 250 µm, ±5°, ±5 %): maximum error over all
spots 5–13 µm (tissue outline alone: 11–45 µm), 1.4–2.7 s per section on a 1024-px thumbnail on a
loaded 2-core machine. The fraction of spots on the
(unblurred) tissue mask is reported before → after.

A correction that is not significant is not applied: the result keeps the input (``result.kept``) unless
the correction moves some spot by ≥ 0.1 pitch and raises the score by ≥ 0.01 (or darkens the printed
array dots at the empty sites, paired t ≥ 3). her2st C2–C6 as loaded are kept (the refinement proposed
moves of 0.03–0.07 pitch there, below its own 5–13 µm accuracy).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataFormatError
from .sample import Sample, apply_affine

#: Blur widths of the coarse-to-fine stages, in lattice pitches.
SIGMAS = (1.0, 0.5, 0.25, 0.125)

__all__ = [
    "RegistrationResult",
    "from_metadata",
    "fit_landmarks",
    "similarity_matrix",
    "tissue_mask",
    "fraction_on_tissue",
    "refine_registration",
    "spot_errors_um",
]


@dataclass
class RegistrationResult:
    """A spot→image affine and how it was obtained."""

    transform: np.ndarray
    method: str                                   # 'metadata' | 'landmarks' | 'refine'
    model: str = "identity"                       # 'identity' | 'similarity' | 'affine'
    residuals_um: np.ndarray | None = None        # per landmark
    rms_um: float | None = None
    frac_on_tissue_before: float | None = None
    frac_on_tissue_after: float | None = None
    score_before: float | None = None
    score_after: float | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def apply(self, sample: Sample) -> Sample:
        """Store the transform in ``sample.transform`` and log it in ``sample.provenance``."""
        sample.transform = np.asarray(self.transform, float).copy()
        sample.provenance.setdefault("registration", []).append(self.summary())
        return sample

    @property
    def kept(self) -> bool:
        """True when an automatic refinement found nothing significant to correct and kept the input."""
        return bool(self.info.get("kept"))

    def summary(self) -> str:
        """One line; the fraction of spots on tissue appears once (``… → …``, or ``… kept``)."""
        parts = [f"{self.method} ({self.model})"]
        if self.rms_um is not None:
            parts.append(f"landmark RMS {self.rms_um:.1f} µm")
        if self.kept:
            f = self.frac_on_tissue_before
            parts.append("already registered" + (f" ({f:.1%} of spots on tissue)" if f is not None else "")
                         + "; kept")
        elif self.frac_on_tissue_before is not None and self.frac_on_tissue_after is not None:
            parts.append(f"spots on tissue {self.frac_on_tissue_before:.1%} → {self.frac_on_tissue_after:.1%}")
        d = self.info.get("delta")
        if d and not self.kept:
            parts.append(f"Δ shift ({d['shift_um'][0]:.1f}, {d['shift_um'][1]:.1f}) µm, rot {d['rotation_deg']:.2f}°, "
                         f"scale {d['scale']:.4f}")
        parts.append(f"{self.seconds:.2f} s")
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# (a) metadata
# --------------------------------------------------------------------------------------------
def from_metadata(sample: Sample) -> RegistrationResult:
    """Identity: the reader's spot pixel coordinates already refer to the image."""
    return RegistrationResult(np.eye(3), "metadata", "identity",
                              info={"note": "spot pixel coordinates from the reader are used as they are"})


# --------------------------------------------------------------------------------------------
# (b) landmarks
# --------------------------------------------------------------------------------------------
def similarity_matrix(tx: float = 0.0, ty: float = 0.0, rotation_deg: float = 0.0, scale: float = 1.0,
                      center: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """3×3 similarity on (x, y, 1): rotate by ``rotation_deg`` (y down, so positive = clockwise on
    screen) and scale about ``center``, then translate by (tx, ty)."""
    th = math.radians(rotation_deg)
    c, s = math.cos(th) * scale, math.sin(th) * scale
    cx, cy = center
    A = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    A[:2, 2] = np.array([cx, cy]) - A[:2, :2] @ np.array([cx, cy]) + np.array([tx, ty])
    return A


def fit_landmarks(image_xy, spot_xy, model: str = "similarity", um_per_px: float = 1.0) -> RegistrationResult:
    """Spot→image transform from landmark pairs by least squares.

    Parameters
    ----------
    image_xy : (N, 2) landmark positions on the H&E, full-res px (x, y).
    spot_xy : (N, 2) the same landmarks in the spot frame (``obsm['spatial']`` px), N ≥ 3.
    model : ``'similarity'`` (rotation + uniform scale + shift, Umeyama 1991, no reflection) or
        ``'affine'`` (6 parameters).
    um_per_px : for residuals in µm.

    Returns a :class:`RegistrationResult` with per-landmark residuals and their RMS in µm.
    """
    t0 = time.perf_counter()
    dst = np.asarray(image_xy, float).reshape(-1, 2)
    src = np.asarray(spot_xy, float).reshape(-1, 2)
    if len(dst) != len(src):
        raise DataFormatError(None, f"{len(dst)} image points but {len(src)} spot points",
                              "the same number of image and spot landmarks, in pairs")
    n = len(src)
    if n < 3:
        raise DataFormatError(None, f"only {n} landmark pair(s)", "at least 3 pairs (image point, spot point)")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise DataFormatError(None, "landmarks contain NaN/inf", "finite pixel coordinates")
    if model == "similarity":
        mu_s, mu_d = src.mean(0), dst.mean(0)
        S, Dd = src - mu_s, dst - mu_d
        var_s = (S ** 2).sum() / n
        if var_s <= 1e-12:
            raise DataFormatError(None, "all spot landmarks coincide", "landmarks spread over the section")
        cov = Dd.T @ S / n
        U, sig, Vt = np.linalg.svd(cov)
        d = np.sign(np.linalg.det(U) * np.linalg.det(Vt)) or 1.0
        Dm = np.diag([1.0, d])
        R = U @ Dm @ Vt
        c = float(np.trace(np.diag(sig) @ Dm) / var_s)
        T = np.eye(3)
        T[:2, :2] = c * R
        T[:2, 2] = mu_d - c * R @ mu_s
    elif model == "affine":
        X = np.c_[src, np.ones(n)]
        if np.linalg.matrix_rank(X) < 3:
            raise DataFormatError(None, "the spot landmarks are collinear",
                                  "at least 3 non-collinear landmarks for an affine fit")
        coef, *_ = np.linalg.lstsq(X, dst, rcond=None)
        T = np.eye(3)
        T[:2, :] = coef.T
    else:
        raise ValueError(f"model must be 'similarity' or 'affine', not {model!r}")
    res_px = np.hypot(*(apply_affine(T, src) - dst).T)
    res_um = res_px * float(um_per_px)
    return RegistrationResult(T, "landmarks", model, residuals_um=res_um,
                              rms_um=float(np.sqrt(np.mean(res_um ** 2))), seconds=time.perf_counter() - t0,
                              info={"n_landmarks": n, "residuals_px": res_px})


def spot_errors_um(T_est: np.ndarray, T_true: np.ndarray, spot_xy: np.ndarray, um_per_px: float) -> np.ndarray:
    """Distance (µm) between where two transforms put each spot."""
    return np.hypot(*(apply_affine(T_est, spot_xy) - apply_affine(T_true, spot_xy)).T) * float(um_per_px)


# --------------------------------------------------------------------------------------------
# (c) automatic refinement
# --------------------------------------------------------------------------------------------
def tissue_mask(rgb: np.ndarray, *, sigma: float = 1.5, min_object_frac: float = 0.02,
                max_hole_frac: float = 0.002, modality: str | None = None, pale: bool = True,
                pale_z: float = 8.0) -> np.ndarray:
    """Tissue mask of an RGB thumbnail, components smaller than ``min_object_frac`` of the largest removed,
    holes smaller than ``max_hole_frac`` of the image filled.

    Brightfield (H&E): Otsu threshold of the Gaussian-smoothed HSV saturation (the *core*: stained, cellular
    tissue).  With ``pale`` (default) the mask then grows, by hysteresis from the core, into tissue that is
    hardly stained but textured — fat (empty adipocytes with thin eosin membranes), loose stroma, pale
    regions: a pixel counts when the local texture of the saturation (RMS of its high-pass over ≈ 3 px) or its
    band-pass level exceeds the bare glass by ``pale_z`` robust standard deviations (median/MAD of the glass
    far from the core), and its region touches the core; the rim that the texture window adds outside every
    edge is eroded away again, so the outline of dense tissue does not move.  Fluorescence (DAPI/PolyT on a
    dark background; ``modality`` None detects it, :func:`napari_diffst.data.fluorescence.detect_modality`):
    the stain intensity smoothed over ≈ 1 % of the image side (nuclei merge into tissue) above
    ``p1 + 0.15·(p99 − p1)`` — Otsu would split dense from sparse tissue when the whole field is tissue."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    from .fluorescence import detect_modality

    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise DataFormatError(None, f"image of shape {a.shape}", "an RGB (H, W, 3) image")
    rgb = a[..., :3].astype(np.float32)
    if (modality or detect_modality(a)) == "fluorescence":
        grey = rgb.mean(axis=-1)
        sm = ndi.gaussian_filter(grey, max(float(sigma), 0.01 * max(grey.shape)))
        lo, hi = (float(v) for v in np.percentile(sm, [1, 99]))
        if hi - lo < 1e-6:
            return np.zeros(sm.shape, bool)
        m = sm > lo + 0.15 * (hi - lo)
        return _clean_mask(m, min_object_frac, max_hole_frac)
    mx = rgb.max(axis=-1)
    sat0 = np.divide(mx - rgb.min(axis=-1), mx, out=np.zeros_like(mx), where=mx > 0)  # HSV saturation
    sat = ndi.gaussian_filter(sat0, sigma) if sigma > 0 else sat0
    if float(sat.max() - sat.min()) < 1e-6:
        return np.zeros(sat.shape, bool)
    m = sat > threshold_otsu(sat)
    m = _clean_mask(m, min_object_frac, max_hole_frac)
    if pale and m.any():
        m = _grow_pale(sat0, m, pale_z, min_object_frac, max_hole_frac)
    return m


def _grow_pale(sat: np.ndarray, core: np.ndarray, z_min: float, min_object_frac: float,
               max_hole_frac: float, r_tex: float = 3.0) -> np.ndarray:
    """Refine the saturation ``core`` by texture — see :func:`tissue_mask`: drop its untextured parts (an even
    stain blush on the glass), then grow it into pale, textured tissue (fat, loose stroma)."""
    from scipy import ndimage as ndi

    def texture(x):
        hp = x - ndi.gaussian_filter(x, 2.0)
        return np.sqrt(ndi.gaussian_filter(hp * hp, r_tex))

    dist = ndi.distance_transform_edt(~core)
    glass = dist > 25 * r_tex
    if glass.sum() < 0.05 * core.size:   # the tissue fills the field: no glass to compare with
        return core
    g0 = float(np.median(sat[glass]))

    def z(t):
        g = t[glass]
        med = float(np.median(g))
        return (t - med) / (1.4826 * float(np.median(np.abs(g - med))) + 1e-6)

    # (1) the core without its untextured parts: tissue has structure (nuclei, fibres), a stain blush has none
    flat = core & (z(texture(np.where(core, sat, np.float32(g0)).astype(np.float32))) <= z_min)
    flat = ndi.binary_opening(flat, iterations=2)
    core2 = _clean_mask(core & ~flat, min_object_frac, max_hole_frac) if (core & ~flat).any() else core
    # (2) grow: the core (and its partial-volume rim) painted as glass, so its strong edge is no texture;
    # textured regions touching the core are tissue
    dist = ndi.distance_transform_edt(~core2)
    tex = z(texture(np.where(dist <= 2.0, np.float32(g0), sat).astype(np.float32)))
    weak = (tex > z_min) | core2
    lab, n = ndi.label(weak)
    touch = np.unique(lab[core2])
    keep = np.zeros(n + 1, bool)
    keep[touch[touch > 0]] = True
    grown = keep[lab]
    # the texture window reaches ≈ 3·r_tex px beyond every edge: take that rim off again
    rim = int(round(3 * r_tex))
    grown = ndi.binary_erosion(ndi.binary_closing(grown, iterations=rim), iterations=rim, border_value=1)
    # only regions of pale tissue, not slivers along the edge of the core (a fringe of the stain)
    added = ndi.binary_opening(grown & ~core2, iterations=rim)
    return _clean_mask(core2 | added, min_object_frac, max_hole_frac)


def _clean_mask(m: np.ndarray, min_object_frac: float, max_hole_frac: float) -> np.ndarray:
    from scipy import ndimage as ndi

    lab, n = ndi.label(m)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        keep = sizes >= min_object_frac * sizes.max()
        m = keep[lab]
    holes = ndi.binary_fill_holes(m) & ~m
    lab, n = ndi.label(holes)
    if n:
        sizes = np.bincount(lab.ravel())
        small = sizes <= max_hole_frac * m.size
        small[0] = False
        m = m | small[lab]
    return m


def _thumb_frame(sample: Sample, max_size: int):
    """Thumbnail, and the affine from image-frame full-res px to thumbnail (col, row) indices."""
    img = sample.image
    thumb, _ = img.thumbnail(max_size)
    H, W = img.shape
    sx, sy = thumb.shape[1] / W, thumb.shape[0] / H
    fr = float(img.fullres_per_px)
    A = np.array([[sx / fr, 0, 0.5 * sx - 0.5], [0, sy / fr, 0.5 * sy - 0.5], [0, 0, 1.0]])
    return np.asarray(thumb), A


def fraction_on_tissue(sample: Sample, mask: np.ndarray | None = None, transform: np.ndarray | None = None,
                       max_size: int = 1024) -> float:
    """Fraction of in-tissue spots whose centre falls on the tissue mask."""
    thumb, A = _thumb_frame(sample, max_size)
    if mask is None:
        mask = tissue_mask(thumb)
    T = sample.transform if transform is None else transform
    xy = _in_tissue_xy(sample)
    return _frac(mask, apply_affine(A @ T, xy))


def _frac(mask: np.ndarray, pts: np.ndarray) -> float:
    c = np.rint(pts).astype(int)
    ok = (c[:, 0] >= 0) & (c[:, 0] < mask.shape[1]) & (c[:, 1] >= 0) & (c[:, 1] < mask.shape[0])
    on = np.zeros(len(c), bool)
    on[ok] = mask[c[ok, 1], c[ok, 0]]
    return float(on.mean()) if len(on) else float("nan")


def _in_tissue_xy(sample: Sample) -> np.ndarray:
    xy = np.asarray(sample.adata.obsm["spatial"], float)
    if "in_tissue" in sample.adata.obs:
        xy = xy[np.asarray(sample.adata.obs["in_tissue"]).astype(bool)]
    return xy


def _empty_sites(sample: Sample, rings: int):
    """Lattice sites within ``rings`` pitches of the in-tissue spots that hold no such spot (spot
    frame), a flag per in-tissue spot telling whether it has such a site among its nearest
    neighbours (an edge spot), and the lattice (None when the spots are not on a lattice)."""
    from .grids import lattice_for

    n = len(_in_tissue_xy(sample))
    try:
        lat = lattice_for(sample)
    except DataFormatError:
        return np.zeros((0, 2)), np.ones(n, bool), None
    occ = {tuple(v) for v in lat.ij.tolist()}
    cand = (lat.ij[:, None, :] + lat.neighbour_offsets(rings)[None]).reshape(-1, 2)
    cand = np.unique(cand, axis=0)
    nb = lat.neighbour_offsets(1)
    # an empty site whose nearest neighbours are all occupied is a dropped spot inside the
    # tissue (QC), not a site off the tissue: leave it out
    empty = [c for c in cand.tolist() if tuple(c) not in occ
             and not all((c[0] + int(d[0]), c[1] + int(d[1])) in occ for d in nb)]
    eset = {tuple(c) for c in empty}
    edge = np.array([any((i + int(d[0]), j + int(d[1])) in eset for d in nb) for i, j in lat.ij.tolist()])
    return lat.positions(np.array(empty, float).reshape(-1, 2)), edge, lat


def _hull_occupancy(ij: np.ndarray) -> float:
    """Fraction of the lattice sites inside the convex hull of the occupied ones that are occupied."""
    from scipy.spatial import ConvexHull, QhullError

    ij = np.unique(np.asarray(ij, int), axis=0)
    if len(ij) < 4:
        return 1.0
    try:
        eq = ConvexHull(ij.astype(float)).equations  # a·x + b ≤ 0 inside
    except QhullError:  # collinear spots
        return 1.0
    lo, hi = ij.min(0), ij.max(0)
    gi, gj = np.mgrid[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1]
    g = np.c_[gi.ravel(), gj.ravel()].astype(float)
    inside = np.all(g @ eq[:, :2].T + eq[:, 2] <= 1e-9, axis=1)
    return float(len(ij) / max(int(inside.sum()), len(ij)))


def _delta(p: np.ndarray, c: np.ndarray, unit_t: float, unit_r: float) -> np.ndarray:
    """Batch of 3×3 corrections from normalised parameters (B, 4) or (B, 6)."""
    p = np.atleast_2d(p)
    B = len(p)
    tx, ty = p[:, 0] * unit_t, p[:, 1] * unit_t
    th, ls = p[:, 2] * unit_r, p[:, 3] * unit_r
    s = np.exp(ls)
    L = np.zeros((B, 2, 2))
    L[:, 0, 0] = np.cos(th) * s
    L[:, 0, 1] = -np.sin(th) * s
    L[:, 1, 0] = np.sin(th) * s
    L[:, 1, 1] = np.cos(th) * s
    if p.shape[1] >= 6:
        sh, la = p[:, 4] * unit_r, p[:, 5] * unit_r
        M = np.zeros((B, 2, 2))
        M[:, 0, 0] = np.exp(la / 2)
        M[:, 0, 1] = sh
        M[:, 1, 1] = np.exp(-la / 2)
        L = L @ M
    D = np.zeros((B, 3, 3))
    D[:, :2, :2] = L
    D[:, :2, 2] = c[None] + np.stack([tx, ty], 1) - np.einsum("bij,j->bi", L, c)
    D[:, 2, 2] = 1.0
    return D


def _fit_array_dots(thumb, mask, lat, xy_in, M0, p, c, unit_t, unit_r, thumb_um, radius_um, force=False,
                    rings: int = 6, t_min: float = 8.0, z_max: float = -0.5):
    """Final stage: align empty lattice sites on bare glass with the faint printed array dots.

    A difference-of-Gaussians (σ = r/2 minus σ = 2r, r = spot radius) of the grey thumbnail is
    z-scored on glass; dots are darker than the glass, so the mean DoG at the sites is minimised,
    within ±0.35 pitch / ±0.35 pitch-at-the-edge of the tissue-based solution ``p`` (the dot
    pattern is periodic; the tissue fit resolves the period). Used only when the dots are
    detected — sites darker than the glass (mean z < ``z_max``) and darker than the half-pitch
    offsets between them (paired t-statistic > ``t_min``) — unless ``force``. On her2st C2–C6:
    t = 21–42, mean z ≈ −1.5 … −2.1; synthetic sections (no dots): t ≈ 6, z > 0."""
    from scipy import ndimage as ndi
    from scipy.optimize import minimize

    r = radius_um / thumb_um
    if r < 2.0:
        return p, {"used": False, "reason": "spots smaller than 2 thumbnail px"}
    g = np.asarray(thumb, np.float32)[..., :3].mean(-1)
    dog = ndi.gaussian_filter(g, r / 2) - ndi.gaussian_filter(g, 2 * r)
    glass = ndi.distance_transform_edt(~mask) > 3 * r
    if glass.sum() < 100:
        return p, {"used": False, "reason": "no bare glass"}
    med = float(np.median(dog[glass]))
    mad = max(float(np.median(np.abs(dog[glass] - med))) * 1.4826, 0.25)
    z = (dog - med) / mad
    occ = {tuple(v) for v in lat.ij.tolist()}
    cand = np.unique((lat.ij[:, None, :] + lat.neighbour_offsets(rings)[None]).reshape(-1, 2), axis=0)
    cand = np.array([q for q in cand.tolist() if tuple(q) not in occ], float).reshape(-1, 2)
    D = _delta(p, c, unit_t, unit_r)[0]
    pts = apply_affine(D @ M0, lat.positions(cand))
    H, W = mask.shape
    ok = (pts[:, 0] > 3 * r) & (pts[:, 0] < W - 3 * r) & (pts[:, 1] > 3 * r) & (pts[:, 1] < H - 3 * r)
    ci = np.rint(pts).astype(int)
    ok[ok] &= glass[ci[ok, 1], ci[ok, 0]]
    sites0 = apply_affine(M0, lat.positions(cand[ok]))
    n = len(sites0)
    if n < 20:
        return p, {"used": False, "reason": f"only {n} lattice sites on bare glass", "n_sites": n}

    def vals(params, offset=(0.0, 0.0)):
        Dd = _delta(params, c, unit_t, unit_r)[0]
        q = apply_affine(Dd, sites0) + np.asarray(offset)
        return ndi.map_coordinates(z, [q[:, 1], q[:, 0]], order=1, mode="nearest")

    e1, e2 = (D[:2, :2] @ M0[:2, :2] @ lat.a1), (D[:2, :2] @ M0[:2, :2] @ lat.a2)
    # capture: the tissue fit may be off by up to ~½ pitch; search the shift over one period
    u = np.arange(-0.5, 0.5 + 1e-9, 0.05)
    U, V = np.meshgrid(u, u, indexing="ij")
    shifts = U.reshape(-1, 1) * e1 + V.reshape(-1, 1) * e2
    q0 = apply_affine(D, sites0)
    pts = q0[None] + shifts[:, None, :]
    mz = ndi.map_coordinates(z, [pts[..., 1].ravel(), pts[..., 0].ravel()], order=1,
                             mode="nearest").reshape(len(shifts), -1).mean(1)
    best = shifts[int(np.argmin(mz))]
    p_tissue = p
    p = np.array(p, float).copy()
    p[:2] += best / unit_t
    v0 = vals(p)
    off = np.mean([vals(p, o) for o in (e1 / 2, -e1 / 2, e2 / 2, -e2 / 2)], axis=0)
    d = off - v0
    t = float(d.mean() / (d.std(ddof=1) / math.sqrt(n) + 1e-12))
    info = {"n_sites": n, "t": t, "z_sites": float(v0.mean()), "capture_shift_px": [float(v) for v in best]}
    if (t < t_min or v0.mean() > z_max) and not force:
        info.update(used=False, reason=f"array dots not detected (t = {t:.1f}, mean z = {v0.mean():.2f})")
        return p_tissue, info
    lim = 0.35

    def fun(q):
        ex = np.maximum(np.abs(q - p) - lim, 0.0)
        return float(vals(q).mean()) + 100.0 * float(np.sum(ex ** 2))

    q = minimize(fun, p, method="Nelder-Mead", options={"xatol": 2e-3, "fatol": 1e-5, "maxiter": 600}).x
    # how much darker the dots are under the result than under the input (paired over sites)
    g = vals(np.zeros_like(q)) - vals(q)
    t_gain = float(g.mean() / (g.std(ddof=1) / math.sqrt(n) + 1e-12))
    info.update(used=True, contrast_after=float(vals(q).mean()), t_gain=t_gain)
    return q, info


def refine_registration(sample: Sample, init: np.ndarray | None = None, model: str = "similarity", *,
                        max_size: int = 1024, max_shift_um: float | None = None, max_rotation_deg: float = 8.0,
                        max_scale: float = 0.10, rings: int = 1, edge_only: bool = True, mask: np.ndarray | None = None,
                        edge_offset_um: float | None = None, fiducial_dots: bool | None = None,
                        keep_margin: float = 0.01, min_shift_pitch: float = 0.1) -> RegistrationResult:
    """Fit a small correction so that spots sit on tissue (see module docstring).

    Parameters
    ----------
    init : starting spot→image transform (default ``sample.transform``); the result is
        ``D ∘ init`` with D a similarity (``model='similarity'``) or affine about the spots' centroid.
    max_size : thumbnail size (longest side, px) the mask is computed on.
    max_shift_um : search range of the shift (default 2 lattice pitches).
    max_rotation_deg, max_scale : search ranges of the rotation and of |scale − 1|.
    rings : how many rings of empty lattice sites around the spots count as "off tissue".
    mask : a precomputed tissue mask of the thumbnail (else :func:`tissue_mask`).
    edge_offset_um : signed distance from the tissue edge (µm, negative = outside) at which a spot
        stops counting as under tissue (the mask is grown by it); default −0.3 × spot radius
        (−15 µm for legacy ST; on her2st C2–C6 the selection boundary fits −10 … −30 µm).
    fiducial_dots : use the printed spot array visible on bare glass (legacy ST) for a final
        sub-pitch refinement; ``None`` = automatically when the dots are detected (t-statistic of
        the dot contrast at lattice sites vs half-pitch offsets > 8, sites darker than glass), ``False`` = never.
    keep_margin, min_shift_pitch : the input registration is *kept* (``result.kept``, transform = ``init``)
        unless the correction is significant: it moves some in-tissue spot by ≥ ``min_shift_pitch`` lattice
        pitches (0.1 = 20 µm for legacy ST, 10 µm for Visium — below the 5–13 µm accuracy measured on her2st
        such a move is noise) **and** it raises the tissue score by ≥ ``keep_margin`` or, when the printed
        array dots are used, makes the dots at the empty lattice sites significantly darker (paired t ≥ 3).
        ``min_shift_pitch=0`` and ``keep_margin=-inf`` always apply the correction.
    """
    from scipy import ndimage as ndi
    from scipy.optimize import minimize

    t_start = time.perf_counter()
    if sample.image is None:
        raise DataFormatError(sample.provenance.get("path"), f"section {sample.name} has no image",
                              "an H&E image to register the spots to")
    if model not in ("similarity", "affine"):
        raise ValueError(f"model must be 'similarity' or 'affine', not {model!r}")
    T0 = np.asarray(sample.transform if init is None else init, float).reshape(3, 3)
    thumb, A = _thumb_frame(sample, max_size)
    if mask is None:
        mask = tissue_mask(thumb)
    if mask.shape != thumb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the thumbnail {thumb.shape[:2]}")
    if edge_offset_um is None:
        edge_offset_um = -0.3 * float(sample.spot_diameter_um) / 2
    xy_in = _in_tissue_xy(sample)
    if len(xy_in) < 3:
        raise DataFormatError(sample.provenance.get("path"), f"{len(xy_in)} in-tissue spots",
                              "at least 3 spots to register")
    xy_out, edge, lat = _empty_sites(sample, rings)
    if lat is not None:
        occ = _hull_occupancy(lat.ij)
        if occ < 0.3:
            raise DataFormatError(sample.provenance.get("path"),
                                  f"section {sample.name}: the in-tissue spots fill only {occ:.0%} of the lattice "
                                  "sites inside their outline (a sparse subset of the array), so empty sites do "
                                  "not mark glass", "all spots under the tissue, for automatic refinement; "
                                  "use landmarks instead")
    # everything in thumbnail pixels under T0
    M0 = A @ T0
    pin_all = apply_affine(M0, xy_in)
    pin = pin_all[edge] if (edge_only and edge.sum() >= 3 and len(xy_out)) else pin_all
    pout = apply_affine(M0, xy_out)
    c = pin_all.mean(0)
    lin_scale = math.sqrt(abs(np.linalg.det(M0[:2, :2])))  # thumb px per spot-frame px
    if lat is not None:
        pitch_t = lat.pitch_px * lin_scale
    else:
        from .sample import nearest_neighbour_distance

        pitch_t = nearest_neighbour_distance(xy_in) * lin_scale
    R = float(np.sqrt(np.mean(np.sum((pin_all - c) ** 2, 1)))) or pitch_t
    unit_t, unit_r = pitch_t, pitch_t / R
    thumb_um = float(sample.um_per_px) / (lin_scale / math.sqrt(abs(np.linalg.det(T0[:2, :2]))))
    if max_shift_um is None:
        max_shift = 2.0
    else:
        max_shift = float(max_shift_um) / (pitch_t * thumb_um)
    lim = np.array([max_shift, max_shift, math.radians(max_rotation_deg) / unit_r,
                    math.log1p(max_scale) / unit_r, 0.05 / unit_r, 0.05 / unit_r])
    allp = np.vstack([pin, pout])
    n_in = len(pin)
    has_out = len(pout) > 0
    if edge_offset_um:
        # selection rule: a spot counts as "under tissue" when its centre is within
        # |edge_offset_um| of the tissue, i.e. move the mask boundary out by that much
        d_px = abs(float(edge_offset_um)) / thumb_um
        grow = ndi.distance_transform_edt(~mask) <= d_px if edge_offset_um < 0 else \
            ndi.distance_transform_edt(mask) > d_px
        mask_f = grow.astype(np.float32)
    else:
        mask_f = mask.astype(np.float32)

    # signed distance to the tissue edge (thumb px, > 0 inside): Φ(sd/σ) is a tissue probability
    # whose 0.5 level is the edge at every σ (a Gaussian blur of the mask would erode corners and
    # bias the scale at coarse σ)
    mb = mask_f > 0.5
    sd = (ndi.distance_transform_edt(mb) - ndi.distance_transform_edt(~mb)).astype(np.float32)
    sd += np.where(mb, -0.5, 0.5).astype(np.float32)

    def make_map(sig):
        from scipy.special import ndtr

        return ndtr(sd / max(sig, 0.5)).astype(np.float32)

    # the grid search uses at most 300 points of each set (evenly strided)
    sub_in = np.arange(0, n_in, max(1, n_in // 300))
    sub_out = n_in + np.arange(0, len(pout), max(1, len(pout) // 300))
    sub = np.r_[sub_in, sub_out]

    def score_batch(P, params, idx=None):
        D = _delta(params, c, unit_t, unit_r)
        q = allp if idx is None else allp[idx]
        k_in = n_in if idx is None else len(sub_in)
        pts = np.matmul(q[None], np.transpose(D[:, :2, :2], (0, 2, 1))) + D[:, None, :2, 2]  # (B, N, 2)
        v = ndi.map_coordinates(P, [pts[..., 1].ravel(), pts[..., 0].ravel()], order=1, mode="constant",
                                cval=0.0).reshape(len(params), -1)
        sc = v[:, :k_in].mean(1)
        if has_out:
            sc = sc - v[:, k_in:].mean(1)
        return sc

    def penalty(p):
        k = len(p)
        ex = np.maximum(np.abs(p) - lim[:k], 0.0)
        return 10.0 * float(np.sum(ex ** 2))

    def fun(p, P):
        return -float(score_batch(P, p[None])[0]) + penalty(p)

    sigmas = [pitch_t * f for f in SIGMAS]
    P0 = make_map(sigmas[0])
    # grid search (at the second blur: the coarsest one hardly sees the scale)
    Pg = make_map(sigmas[min(1, len(sigmas) - 1)])
    ts = np.arange(-max_shift, max_shift + 1e-9, 0.25)
    rs = np.linspace(-lim[2], lim[2], 9)
    ss = np.linspace(-lim[3], lim[3], 5)
    g = np.array(np.meshgrid(ts, ts, rs, ss, indexing="ij")).reshape(4, -1).T
    scores = np.concatenate([score_batch(Pg, g[i:i + 2000], sub) for i in range(0, len(g), 2000)])
    order = np.argsort(-scores)
    starts = []

    def distinct(q):
        return all(np.max(np.abs(q - s_) / np.maximum(lim[:4], 1e-9) * np.array([4, 4, 2, 2])) > 1.0
                   for s_ in starts)

    for i in order:  # the three best distinct grid points ...
        if distinct(g[i]):
            starts.append(g[i])
        if len(starts) >= 3:
            break
    for sv in ss:  # ... and the best one at every scale
        i = order[np.flatnonzero(g[order, 3] == sv)[0]]
        if distinct(g[i]):
            starts.append(g[i])
    starts.append(np.zeros(4))
    opts = {"xatol": 5e-3, "fatol": 1e-5, "maxiter": 400}
    n_keep = 4
    cands = [minimize(fun, s0, args=(P0,), method="Nelder-Mead", options=opts) for s0 in starts]
    cands = [r.x for r in sorted(cands, key=lambda r: r.fun)[:n_keep]]
    # carry the best few basins through every finer blur; keep the best at the finest
    for sig in sigmas[1:]:
        P = make_map(sig)
        res = [minimize(fun, q, args=(P,), method="Nelder-Mead", options=opts) for q in cands]
        cands = [r.x for r in sorted(res, key=lambda r: r.fun)]
    p = cands[0]
    if model == "affine":
        P = make_map(sigmas[-1])
        p = minimize(fun, np.r_[p, 0.0, 0.0], args=(P,), method="Nelder-Mead",
                     options={**opts, "maxiter": 1200}).x
    dots_info = {"used": False}
    if fiducial_dots is not False and lat is not None:
        p, dots_info = _fit_array_dots(thumb, mask, lat, xy_in, M0, p, c, unit_t, unit_r, thumb_um,
                                       float(sample.spot_diameter_um) / 2, force=bool(fiducial_dots))
    D = _delta(p, c, unit_t, unit_r)[0]
    # the correction lives in thumbnail px: conjugate back to full-res image px
    D_img = np.linalg.inv(A) @ D @ A
    T = D_img @ T0
    Pfin = make_map(sigmas[-1])
    sc_before = float(score_batch(Pfin, np.zeros((1, len(p))))[0])
    sc_after = float(score_batch(Pfin, p[None])[0])
    f_before = _frac(mask, pin_all)
    f_after = _frac(mask, apply_affine(D, pin_all))
    # keep the input unless the correction is significant (see keep_margin / min_shift_pitch)
    move_pitch = float(np.max(np.linalg.norm(apply_affine(D, pin_all) - pin_all, axis=1))) / pitch_t
    dots_t = float(dots_info.get("t_gain", 0.0)) if dots_info.get("used") else 0.0
    gain = sc_after - sc_before
    significant = move_pitch >= min_shift_pitch and (gain >= keep_margin or dots_t >= 3.0)
    kept = not significant
    if kept:
        proposed = D_img
        D_img, T, f_after, sc_after = np.eye(3), T0.copy(), f_before, sc_before
    # report the correction in physical units
    cen_img = apply_affine(np.linalg.inv(A), c[None])[0]
    shift_px = apply_affine(D_img, cen_img[None])[0] - cen_img
    info = {
        "kept": kept, "move_pitch": move_pitch, "score_gain": float(gain),
        "delta": {"shift_um": tuple(float(v) for v in shift_px * sample.um_per_px),
                  "rotation_deg": float(math.degrees(math.atan2(D_img[1, 0], D_img[0, 0]))),
                  "scale": float(math.sqrt(abs(np.linalg.det(D_img[:2, :2]))))},
        "thumb_shape": tuple(int(v) for v in thumb.shape[:2]),
        "thumb_um_per_px": thumb_um,
        "n_in": int(n_in), "n_empty_sites": int(len(pout)),
        "n_grid": int(len(g)), "sigmas_thumb_px": [float(v) for v in sigmas],
        "lattice": None if lat is None else {"kind": lat.kind, "pitch_px": lat.pitch_px},
        "array_dots": dots_info,
    }
    if kept:
        info["proposed_shift_um"] = tuple(float(v) for v in
                                          (apply_affine(proposed, cen_img[None])[0] - cen_img) * sample.um_per_px)
    return RegistrationResult(T, "refine", model, frac_on_tissue_before=f_before, frac_on_tissue_after=f_after,
                              score_before=sc_before, score_after=sc_after,
                              seconds=time.perf_counter() - t_start, info=info)
