"""True to the spots: native super-resolved maps checked against (and projected onto) the section's own spots.

At native resolution there is no HR truth, but every in-tissue spot measured the expression of the tissue under
its disk.  A super-resolved map is *true to the spots* when, averaged back over each spot's disk **in expression
space** (CP10k, not log), it gives the spot's measured log1p(CP10k):

    ŷ_k,g = log1p( Σ_p w_kp · expm1(m_g,p) )      w_kp = the fraction of spot k's disk area in HR pixel p
                                                   (8×8 sub-samples per pixel), normalised over the pixels
                                                   inside the tissue mask

:func:`project_to_spots` enforces it (iterative back-projection: the per-spot residual ``y − ŷ`` in log1p
units, spread over the HR grid, added, clipped at 0,
repeated; the residual is spread from the spots' real centres with a normalised Gaussian of σ = 0.4 pitch,
:func:`spread_matrix`, so square, hexagonal and offset lattices are treated alike) and :func:`spot_report`
measures it, with no truth needed:

``spot_pcc``        per gene, Pearson r of ŷ and y over the in-tissue spots (mean over genes; ``per_gene``)
``spot_bias``       per gene, (mean ŷ − mean y) / mean y (mean over genes)
``alike_maps``      mean gene–gene Pearson r of the maps over the HR pixels inside the mask
``alike_spots``     the same over the spots' log1p(CP10k) (what the data says)
``lattice``         per gene, Pearson r between a pixel's deviation from its lattice-cell mean and its
                    distance to the cell's spot centre (pixels inside the mask); ``lattice`` = mean |r|
``masked_in_spots`` fraction of the in-tissue spot disks' area on HR pixels outside the mask (or NaN); on native
                    predictions the mask is the tissue at HR resolution (:func:`napari_diffst.data.grids.display_mask`)

The spot geometry comes from :func:`napari_diffst.data.grids.make_field` (``extra['spot_hr_cr']``,
``extra['spot_radius_hr']``, ``extra['spot_log1p']``) for fields whose LR is the spots (``native``, ``truth``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .errors import DataFormatError

__all__ = ["SpotDisks", "spot_disks", "disk_means", "spread_matrix", "project_to_spots", "project_bands",
           "window_spots", "spot_report", "REPORT_KEYS"]

#: the figures of :func:`spot_report` (``napari-diffst sample --report``, OME-Zarr metadata, the dock)
REPORT_KEYS = ("spot_pcc", "spot_bias", "alike_maps", "alike_spots", "lattice", "masked_in_spots")


@dataclass
class SpotDisks:
    """Area weights of each in-tissue spot's disk on the HR grid.

    ``W`` (n_spots × H·W, CSR): fraction of spot k's disk in pixel p (rows sum to 1 over all pixels);
    ``y`` (n, G) the spots' log1p(CP10k); ``cr`` (n, 2) spot centres in HR (col, row); ``radius`` in HR px."""

    W: sp.csr_matrix
    y: np.ndarray
    cr: np.ndarray
    radius: float
    shape: tuple


def spot_disks(field, sub: int = 8) -> SpotDisks:
    """The disks of ``field``'s in-tissue spots on its HR grid (``sub`` × ``sub`` sub-samples per pixel)."""
    ex = field.extra
    if "spot_hr_cr" not in ex or "spot_log1p" not in ex:
        raise DataFormatError(None, f"field {field.name!r} ({ex.get('mode')}) has no spot geometry",
                              "a field made by make_field in mode 'native' or 'truth' (the spots are its LR)")
    cr = np.asarray(ex["spot_hr_cr"], float)
    rad = float(ex["spot_radius_hr"])
    H, W = field.hr_shape
    n = len(cr)
    off = (np.arange(sub) + 0.5) / sub - 0.5
    ext = int(np.ceil(rad + 1))
    rows, cols, vals = [], [], []
    for k in range(n):
        cx, cy = cr[k]
        c0, c1 = max(int(np.floor(cx - ext)), 0), min(int(np.ceil(cx + ext)) + 1, W)
        r0, r1 = max(int(np.floor(cy - ext)), 0), min(int(np.ceil(cy + ext)) + 1, H)
        if c1 <= c0 or r1 <= r0:
            continue
        pr, pc = np.mgrid[r0:r1, c0:c1]
        # sub-sample positions of every pixel, distance to the spot centre
        dy = pr[..., None, None] + off[:, None] - cy
        dx = pc[..., None, None] + off[None, :] - cx
        frac = ((dx * dx + dy * dy) <= rad * rad).mean(axis=(2, 3))
        if not frac.any():  # a disk smaller than a sub-sample: its centre pixel
            rr, cc = int(np.clip(round(cy), 0, H - 1)), int(np.clip(round(cx), 0, W - 1))
            frac = np.zeros_like(frac, float)
            frac[rr - r0, cc - c0] = 1.0
        nz = frac > 0
        rows.append(np.full(int(nz.sum()), k))
        cols.append((pr[nz] * W + pc[nz]).astype(np.int64))
        vals.append(frac[nz] / frac[nz].sum())
    Wm = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, H * W))
    return SpotDisks(Wm, np.asarray(ex["spot_log1p"], np.float64), cr, rad, (H, W))


def _masked_weights(d: SpotDisks, ok: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Disk weights restricted to pixels ``ok`` (H·W bool) and renormalised; the kept fraction per spot."""
    Wm = d.W @ sp.diags(ok.astype(np.float64))
    kept = np.asarray(Wm.sum(axis=1)).ravel()
    Wn = sp.diags(np.divide(1.0, kept, out=np.zeros_like(kept), where=kept > 0)) @ Wm
    return Wn.tocsr(), kept


def disk_means(expr: np.ndarray, d: SpotDisks, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ŷ (n, G): ``log1p`` of the disk-weighted mean of ``expm1(expr)`` (expr (G, H, W) in log1p(CP10k)) over
    the pixels inside ``mask`` with finite values; and the kept fraction of each disk (n,)."""
    G = expr.shape[0]
    flat = np.asarray(expr, np.float64).reshape(G, -1)
    ok = np.isfinite(flat).all(axis=0)
    if mask is not None:
        ok &= np.asarray(mask, bool).ravel()
    Wn, kept = _masked_weights(d, ok)
    lin = np.expm1(np.clip(np.where(ok[None], flat, 0.0), 0.0, None))
    return np.log1p(np.asarray(Wn @ lin.T)), kept


def spread_matrix(field, d: SpotDisks, sigma_pitch: float = 0.4) -> sp.csr_matrix:
    """(H·W × n) normalised Gaussian weights (σ = ``sigma_pitch`` × the lattice pitch, cut at 3σ) that spread
    per-spot values from the spots' real centres to the HR pixels — any lattice (square, hexagonal, offset),
    no holes where the array has no index."""
    from scipy.spatial import cKDTree

    H, W = d.shape
    sig = float(sigma_pitch) * float(field.scale)  # LR pitch = s HR px
    rr, cc = np.mgrid[0:H, 0:W]
    pts = np.c_[cc.ravel(), rr.ravel()].astype(float)
    pairs = cKDTree(pts).sparse_distance_matrix(cKDTree(d.cr), 3 * sig, output_type="coo_matrix")
    w = np.exp(-0.5 * (pairs.data / sig) ** 2)
    # a pixel exactly at a spot centre has distance 0, which the sparse matrix drops: add those back
    ctr = np.round(d.cr).astype(int)
    exact = np.flatnonzero(np.all(np.abs(ctr - d.cr) < 1e-12, axis=1) & (ctr[:, 0] >= 0) & (ctr[:, 0] < W)
                           & (ctr[:, 1] >= 0) & (ctr[:, 1] < H))
    rows = np.concatenate([pairs.row, ctr[exact, 1] * W + ctr[exact, 0]])
    cols = np.concatenate([pairs.col, exact])
    S = sp.csr_matrix((np.concatenate([w, np.ones(len(exact))]), (rows, cols)), shape=(H * W, len(d.cr)))
    tot = np.asarray(S.sum(axis=1)).ravel()
    return (sp.diags(np.divide(1.0, tot, out=np.zeros_like(tot), where=tot > 0)) @ S).tocsr()


def project_to_spots(expr: np.ndarray, field, mask: np.ndarray | None = None, n_iter: int = 100,
                     tol: float = 1e-4, disks: SpotDisks | None = None,
                     fixed: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Make ``expr`` (G, H, W) log1p(CP10k) true to the spots: afterwards each in-tissue spot's disk mean (in
    expression space, :func:`disk_means`) reproduces its measured log1p(CP10k), up to ``tol`` (max abs) or
    ``n_iter`` rounds.  Values stay ≥ 0; pixels outside ``mask`` (default ``field.hr_mask``) are untouched.
    ``fixed`` (H, W) bool: pixels that count in the disk means but are never changed (band-wise projection:
    rows an earlier band already wrote).
    Returns the projected maps (float32) and ``{'iterations', 'max_residual'}``."""
    d = disks if disks is not None else spot_disks(field)
    mask = np.asarray(field.hr_mask if mask is None else mask, bool)
    free = mask if fixed is None else mask & ~np.asarray(fixed, bool)
    S = spread_matrix(field, d)
    G = expr.shape[0]
    x = np.where(mask[None], np.clip(np.asarray(expr, np.float64), 0.0, None), 0.0)
    fixable = disk_means(x, d, free)[1] > 0  # spots with some changeable disk area inside the mask
    it, res = 0, np.inf
    for it in range(1, int(n_iter) + 1):
        yhat, _ = disk_means(x, d, mask)
        delta = np.where(fixable[:, None], d.y - yhat, 0.0)
        res = float(np.abs(delta).max()) if delta.size else 0.0
        if res <= tol:
            it -= 1
            break
        step = np.asarray(S @ delta).T.reshape(G, *d.shape)
        x = np.where(free[None], np.clip(x + step, 0.0, None), x) * mask[None]
    out = np.where(mask[None], x, np.asarray(expr, np.float64)).astype(np.float32)
    return out, {"iterations": int(it), "max_residual": round(res, 6)}


def window_spots(field, r0: int, r1: int, mask: np.ndarray | None = None):
    """The rows ``r0:r1`` of ``field``'s HR grid as a light field for :func:`project_to_spots` /
    :func:`spot_disks`: the spots whose centres fall inside, their (col, row) shifted to the window, the window's
    HR mask (``mask``: that window's own mask, default ``field.hr_mask`` cut).  Returns ``(window field, index of
    the kept spots in field's spot list)``."""
    from types import SimpleNamespace

    ex = field.extra
    cr = np.asarray(ex["spot_hr_cr"], float)
    keep = np.flatnonzero((cr[:, 1] >= r0 - 0.5) & (cr[:, 1] < r1 - 0.5))
    W = int(field.hr_shape[1])
    hm = np.asarray(field.hr_mask[r0:r1] if mask is None else mask, bool)
    sub = SimpleNamespace(name=f"{field.name}[rows {r0}:{r1}]", hr_shape=(r1 - r0, W), scale=int(field.scale),
                          hr_mask=hm, genes=list(field.genes), hr_um=float(field.hr_um),
                          extra={"spot_hr_cr": cr[keep] - np.array([0.0, r0]),
                                 "spot_radius_hr": float(ex["spot_radius_hr"]),
                                 "spot_log1p": np.asarray(ex["spot_log1p"])[keep], "mode": ex.get("mode")})
    return sub, keep


def project_bands(read, write, field, *, band_lr: int = 16, context_lr: int = 4, n_iter: int = 100,
                  tol: float = 1e-4) -> dict:
    """:func:`project_to_spots` for maps too large to hold at once (tiled whole-slide output), band by band.

    ``read(r0, r1)`` → (G, r1 − r0, W) log1p(CP10k) of HR rows r0:r1 (NaN outside the shown mask);
    ``write(r0, projected)`` stores rows back.  Bands are ``band_lr`` LR rows; each is projected inside a window
    ``context_lr`` LR rows taller on both sides.  Bands go top to bottom; the rows above a band were written by
    the band before, so in its window they count in the disk means but stay as written (``fixed``), and the
    context rows below a band are written too, as the next band's starting point (it rewrites them): a spot whose
    disk straddles the edge is finished from where the band above left it, so the seam does not jump.  Memory follows the band, not the slide; :func:`spot_report` on the result measures
    what is left.  Returns ``{'bands', 'iterations' (max), 'max_residual' (max over bands)}``."""
    s = int(field.scale)
    H = int(field.hr_shape[0])
    band, ctx = max(1, int(band_lr)) * s, max(0, int(context_lr)) * s
    its, res, n = 0, 0.0, 0
    for b0 in range(0, H, band):
        b1 = min(H, b0 + band)
        w0, w1 = max(0, b0 - ctx), min(H, b1 + ctx)
        expr = np.asarray(read(w0, w1), np.float64)
        fin = np.isfinite(expr).all(axis=0)
        sub, keep = window_spots(field, w0, w1, np.asarray(field.hr_mask[w0:w1], bool) & fin)
        n += 1
        if len(keep) == 0 or not sub.hr_mask.any():
            continue
        done = np.zeros(sub.hr_shape, bool)
        done[:b0 - w0] = True  # written by the band above
        out, info = project_to_spots(np.where(fin[None], expr, 0.0), sub, n_iter=n_iter, tol=tol, fixed=done)
        out = np.where(fin[None], out, np.nan).astype(np.float32)
        write(b0, out[:, b0 - w0:])  # the band, and below it the next band's starting point
        its, res = max(its, info["iterations"]), max(res, info["max_residual"])
    return {"bands": n, "band_lr": int(band_lr), "context_lr": int(context_lr), "iterations": int(its),
            "max_residual": round(float(res), 6)}


def _pcc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _mean_offdiag_corr(X: np.ndarray) -> float:
    """Mean off-diagonal Pearson r between the rows of X (G, N); constant rows are left out."""
    X = np.asarray(X, float)
    X = X[X.std(axis=1) > 0]
    if len(X) < 2:
        return float("nan")
    C = np.corrcoef(X)
    return float(C[~np.eye(len(C), dtype=bool)].mean())


def _r(v) -> float | None:
    v = float(v)
    return round(v, 4) if np.isfinite(v) else None


def spot_report(expr: np.ndarray, field, mask: np.ndarray | None = None, disks: SpotDisks | None = None) -> dict:
    """The true-to-the-spots figures (module docstring) of ``expr`` (G, H, W) log1p(CP10k) on ``field``'s HR
    grid; NaN pixels count as masked.  JSON-ready: ``{key: float, ..., 'per_gene': {...}, 'n_spots', ...}``."""
    d = disks if disks is not None else spot_disks(field)
    expr = np.asarray(expr, np.float64)
    G = expr.shape[0]
    mask = np.asarray(field.hr_mask if mask is None else mask, bool) & np.isfinite(expr).all(axis=0)
    yhat, kept = disk_means(expr, d, mask)
    use = kept > 0
    y = d.y
    pcc = np.array([_pcc(yhat[use, g], y[use, g]) for g in range(G)])
    my = y[use].mean(axis=0)
    bias = np.where(my > 0, (yhat[use].mean(axis=0) - my) / np.where(my > 0, my, 1.0), np.nan)
    inside = expr[:, mask]
    alike_maps = _mean_offdiag_corr(inside)
    alike_spots = _mean_offdiag_corr(y.T)
    # lattice imprint: deviation from the cell mean vs distance to the cell's spot centre
    cell = np.asarray(field.hr_spot_index)
    sel = mask & (cell >= 0)
    rr, cc = np.nonzero(sel)
    k = cell[sel]
    dist = np.hypot(cc - d.cr[k, 0], rr - d.cr[k, 1])
    cnt = np.bincount(k, minlength=len(d.cr)).astype(float)
    lat_r = []
    for g in range(G):
        v = expr[g][sel]
        mu = np.bincount(k, weights=v, minlength=len(d.cr)) / np.maximum(cnt, 1)
        lat_r.append(_pcc(v - mu[k], dist))
    lat_r = np.array(lat_r)
    disk_area = np.asarray(d.W.sum(axis=1)).ravel()
    masked = 1.0 - float(kept.sum() / disk_area.sum()) if disk_area.sum() > 0 else float("nan")
    return {
        "spot_pcc": _r(np.nanmean(pcc)), "spot_bias": _r(np.nanmean(bias)), "alike_maps": _r(alike_maps),
        "alike_spots": _r(alike_spots), "lattice": _r(np.nanmean(np.abs(lat_r))) if np.isfinite(lat_r).any() else None, "masked_in_spots": _r(masked),
        "spot_pcc_min": _r(np.nanmin(pcc)) if np.isfinite(pcc).any() else None,
        "n_spots": int(use.sum()), "hr_um": float(field.hr_um), "scale": int(field.scale),
        "spot_radius_hr": round(float(d.radius), 4),
        "per_gene": {"gene": [str(g) for g in field.genes], "spot_pcc": [_r(v) for v in pcc],
                     "spot_bias": [_r(v) for v in bias], "lattice_r": [_r(v) for v in lat_r]},
    }
