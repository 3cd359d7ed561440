"""``napari-diffst benchmark --truth DIR ...``: super-resolution scored against **real** HR truth from
imaging-based ST (MERSCOPE, Xenium).

    napari-diffst benchmark --truth ../shared/data/merscope_mouse_brain_mini --lr-um 50 --scale 5 10 --folds 2 \\
        --n-genes 25 --methods all --budget quick --seed 0 --out results.json [--self-supervised]

Protocol (docs/benchmark.md, "Real HR truth")
---------------------------------------------
* The molecules of each DIR (:attr:`Sample.molecules`; a Xenium bundle without transcripts uses its cells'
  counts at their centroids) are binned on one square grid: LR squares of ``lr_um``, HR squares of
  ``lr_um / scale``, both anchored at the lower-left molecule (partial squares at the far edges are dropped, so
  every LR square is exactly ``scale × scale`` HR squares and **LR counts = sums of HR counts**, exactly).
* Values: HR = ``log1p(count)`` per HR square, LR = ``log1p(count / scale²)`` (the LR count as a mean per HR
  square), so both are log counts per HR-square area.  No per-bin library normalisation: at 5–10 µm most HR
  squares hold 0–3 molecules of a gene and a handful in total, and dividing by such a library (CP10k) turns
  one molecule into a huge value; empty HR squares inside the tissue are kept as true zeros.
* Tissue (:func:`truth_tissue_mask`): LR squares whose total molecule count (all genes) is at least 1/10 of the
  median over non-empty squares and (with an image) with tissue evidence in the image: for a fluorescence image
  ≥ 2 % of the square with nuclear-stain signal, for H&E ≥ ¼ of the square in the tissue mask; HR squares
  inherit their LR square's mask.
* Genes: the ``n_genes`` most abundant genes by total LR count of the region (the LR is what a user has).
* Spatial folds: the LR grid is cut into ``folds`` stripes across its longer axis.  For each fold every method
  is fitted on the other stripes (split into two training fields; the second one also serves as the
  validation field, so no held-out stripe is ever seen) and predicts the whole region from its LR (a user has
  the LR everywhere), of which only the held stripe is kept.  The held-out
  predictions are put together into one map of the whole region, which is scored once (pooled over folds).
* Supervised (default, the paper's setting): training fields carry their HR truth.  ``--self-supervised``: no
  method sees any HR truth: each training field is made by aggregating its LR further (HR := the LR squares,
  LR := ``scale × scale`` sums of them, partial blocks averaged over the squares they hold), with the image
  sampled at the same pixels per HR square.
* ``ceiling_pcc``: split-half ceiling of the truth — the HR counts binomially thinned (p = ½) into two halves,
  each ×2 and log1p'd, per-gene PCC over the tissue stepped up with Spearman–Brown, square-rooted, averaged.
* Methods that sample (``diffst``, ``cond_diffusion``) also get ``crps`` (ensemble CRPS of the per-pixel samples
  against the truth, model units, mean over tissue pixels and genes) and ``coverage90`` (fraction of truth
  pixels inside the per-pixel 5–95 % range of the samples).

JSON: the spot benchmark's document (``genes, scale, budget, device, sections → n_spots, ceiling_pcc, methods``)
with one section per DIR and scale, named ``"<name>@<scale>x"``; ``scale`` is the list of scales.
"""
from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from .errors import DataFormatError, DiffSTError

__all__ = ["TruthGrid", "truth_grid", "truth_tissue_mask", "top_genes", "stripes", "validate_truth_result",
           "format_truth_table",
           "cmd_truth_benchmark", "split_half_log_ceiling", "crps_coverage",
           "run_truth_benchmark", "SAMPLING_METHODS"]

#: methods whose ``predict`` averages samples; they also get ``crps`` / ``coverage90``
SAMPLING_METHODS = ("diffst", "cond_diffusion")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- grid
@dataclass
class TruthGrid:
    """Counts of every gene on the HR and LR grids of one region (full-res px frame of the sample)."""

    sample: object
    genes: list           # all genes (columns of the count matrices)
    scale: int
    lr_um: float
    origin_px: tuple      # (x0, y0) top-left corner of square (0, 0) in full-res px
    lr_shape: tuple       # (h, w)
    hr_counts: sp.csr_matrix   # (h·s · w·s) × genes
    lr_counts: sp.csr_matrix   # (h · w) × genes
    lr_mask: np.ndarray   # (h, w) bool

    @property
    def hr_shape(self) -> tuple:
        return (self.lr_shape[0] * self.scale, self.lr_shape[1] * self.scale)

    @property
    def lr_px(self) -> float:
        return self.lr_um / float(self.sample.um_per_px)


def _molecule_arrays(sample):
    """(x, y, gene codes, weights, gene names): the molecules, or cells' counts at their centroids."""
    mol = getattr(sample, "molecules", None)
    if mol is not None and len(mol):
        return (mol["x"].to_numpy(np.float64), mol["y"].to_numpy(np.float64), mol["gene"].cat.codes.to_numpy(),
                None, [str(g) for g in mol["gene"].cat.categories])
    X = sample.counts().tocoo()
    xy = np.asarray(sample.adata.obsm["spatial"], np.float64)
    return xy[X.row, 0], xy[X.row, 1], X.col, X.data.astype(np.int64), list(map(str, sample.adata.var_names))


#: fluorescence tissue evidence: a thumbnail pixel has stain signal when its smoothed nuclear stain (stretched to
#: [0, 1] by the reader's percentiles) exceeds STAIN_LEVEL; a square needs MIN_STAIN_FRAC of its area with signal
STAIN_LEVEL, MIN_STAIN_FRAC = 0.05, 0.02
#: brightfield: a square needs this fraction of its area inside registration's tissue mask
MIN_TISSUE_FRAC = 0.25
#: counts: a square needs this fraction of the median total count of the non-empty squares
MIN_COUNT_FRAC = 0.1


def _image_tissue_fraction(sample, origin, lr_px, shape) -> np.ndarray | None:
    """Fraction of each LR square with tissue evidence in the image (None without an image).

    Brightfield: covered by registration's tissue mask (:func:`~napari_diffst.data.registration.tissue_mask`).
    Fluorescence: with nuclear-stain signal (smoothed stain > :data:`STAIN_LEVEL`).  DAPI marks nuclei only, so an
    intensity/Otsu "tissue" mask of a brain region keeps the dense cell layers and drops neuropil and white matter
    that hold as many molecules; any stain signal in the square is the evidence instead."""
    from scipy import ndimage as ndi

    from .data.fluorescence import image_modality
    from .data.registration import tissue_mask

    img = sample.image
    if img is None:
        return None
    thumb, f = img.thumbnail(1024)
    if image_modality(img) == "fluorescence":
        a = np.asarray(thumb, np.float32)
        a = (a[..., 0] if a.ndim == 3 else a) / (255.0 if a.max() > 1.5 else 1.0)
        m = (ndi.gaussian_filter(a, 4.0) > STAIN_LEVEL).astype(np.float32)
    else:
        m = tissue_mask(thumb, modality="brightfield").astype(np.float32)
    h, w = shape
    fr = float(getattr(img, "fullres_per_px", 1.0) or 1.0)
    ys = (np.arange(m.shape[0]) + 0.5) / f * fr
    xs = (np.arange(m.shape[1]) + 0.5) / f * fr
    r = np.floor((ys - origin[1]) / lr_px).astype(int)
    c = np.floor((xs - origin[0]) / lr_px).astype(int)
    rr, cc = np.meshgrid(r, c, indexing="ij")
    ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    cnt = np.bincount((rr * w + cc)[ok], minlength=h * w).reshape(h, w)
    tis = np.bincount((rr * w + cc)[ok], weights=m[ok], minlength=h * w).reshape(h, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(cnt > 0, tis / np.maximum(cnt, 1), 0.0)
    return out.astype(np.float32)


def truth_tissue_mask(total_counts: np.ndarray, image_fraction: np.ndarray | None,
                      modality: str = "brightfield") -> np.ndarray:
    """LR tissue mask from the truth's total counts per square (h, w) and the image's tissue fraction
    (:func:`_image_tissue_fraction`; None without an image): counts ≥ :data:`MIN_COUNT_FRAC` × the median of
    the non-empty squares, and image evidence ≥ :data:`MIN_STAIN_FRAC` (fluorescence) or
    :data:`MIN_TISSUE_FRAC` (brightfield) of the square."""
    tot = np.asarray(total_counts, np.float64)
    nz = tot[tot > 0]
    mask = tot >= MIN_COUNT_FRAC * (np.median(nz) if nz.size else 1.0)
    mask &= tot > 0
    if image_fraction is not None:
        mask &= image_fraction >= (MIN_STAIN_FRAC if modality == "fluorescence" else MIN_TISSUE_FRAC)
    return mask


def truth_grid(sample, lr_um: float, scale: int) -> TruthGrid:
    """Bin a region's molecules into LR (``lr_um``) and HR (``lr_um/scale``) squares with LR = Σ HR exactly."""
    from .data.molecules import aggregate_bins, bin_counts

    s = int(scale)
    x, y, codes, wts, genes = _molecule_arrays(sample)
    if len(x) == 0:
        raise DataFormatError(sample.provenance.get("path"), "no molecules or cell counts to bin",
                              "an imaging-based dataset (MERSCOPE/Xenium) with transcripts or cells")
    lr_px = float(lr_um) / float(sample.um_per_px)
    x0, y0 = float(x.min()), float(y.min())
    if sample.image is not None:  # keep the grid on the image
        H_img, W_img = sample.image.shape
        fr = float(getattr(sample.image, "fullres_per_px", 1.0) or 1.0)
        W_e, H_e = W_img * fr, H_img * fr
        # snap to the image edges when the molecules reach within one LR square of them
        x0 = 0.0 if x0 < lr_px else x0
        y0 = 0.0 if y0 < lr_px else y0
        x1 = W_e if W_e - float(x.max()) < lr_px else float(x.max())
        y1 = H_e if H_e - float(y.max()) < lr_px else float(y.max())
    else:
        x1, y1 = float(x.max()), float(y.max())
    w, h = int(math.floor((x1 - x0) / lr_px)), int(math.floor((y1 - y0) / lr_px))
    if w < 2 or h < 2:
        raise DataFormatError(sample.provenance.get("path"), f"region {x1 - x0:.0f}×{y1 - y0:.0f} px holds only "
                              f"{w}×{h} LR squares of {lr_um:g} µm", "at least 2×2 LR squares (a smaller --lr-um)")
    G = len(genes)
    if wts is None:
        hr, _ = bin_counts(x, y, codes, G, origin=(x0, y0), bin_size=lr_px / s, shape=(h * s, w * s))
    else:
        hr, _ = bin_counts(x, y, codes, G, origin=(x0, y0), bin_size=lr_px / s, shape=(h * s, w * s), weights=wts)
    lr, _ = aggregate_bins(hr, (h * s, w * s), s)
    from .data.fluorescence import image_modality

    tot = np.asarray(lr.sum(axis=1)).ravel().reshape(h, w)
    frac = _image_tissue_fraction(sample, (x0, y0), lr_px, (h, w))
    mask = truth_tissue_mask(tot, frac, image_modality(sample.image))
    return TruthGrid(sample, genes, s, float(lr_um), (x0, y0), (h, w), hr.tocsr(), lr.tocsr(), mask)


def top_genes(grid: TruthGrid, n: int) -> list[str]:
    """The ``n`` most abundant genes by total LR count (ties by name)."""
    tot = np.asarray(grid.lr_counts.sum(axis=0)).ravel()
    order = sorted(range(len(tot)), key=lambda i: (-tot[i], grid.genes[i]))
    return [grid.genes[i] for i in order[:n]]


def stripes(n: int, folds: int) -> list[tuple[int, int]]:
    """``folds`` contiguous [a, b) ranges covering 0..n (sizes differ by at most one)."""
    if folds < 2 or folds > n:
        raise DiffSTError(f"--folds must be between 2 and the number of LR squares across the region ({n}), "
                          f"not {folds}")
    edges = np.round(np.linspace(0, n, folds + 1)).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


# ----------------------------------------------------------------------------------------------- fields
def _dense(counts: sp.csr_matrix, cols: list[int], shape: tuple[int, int]) -> np.ndarray:
    """(G, H, W) float64 counts of the chosen gene columns."""
    return np.asarray(counts[:, cols].toarray(), np.float64).T.reshape(len(cols), *shape)


def _square_affine(x0: float, y0: float, px: float) -> np.ndarray:
    """(col, row, 1) of a grid of ``px``-px squares with top-left corner (x0, y0) → square-centre px."""
    return np.array([[px, 0, x0 + px / 2], [0, px, y0 + px / 2], [0, 0, 1.0]])


def _make_field(sample, name, genes, s, hr_c, hr_mask, lr_c, lr_mask, n_per_lr, origin, hr_px, gene_scale,
                he_per_hr, counts_csr):
    """An SRField from dense HR counts (G, H, W) and LR sums (G, h, w) (``n_per_lr``: HR squares per LR square)."""
    from .data.grids import sample_image
    from .data.pairs import SRField

    G = len(genes)
    gs = np.asarray(gene_scale, np.float32).reshape(G, 1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        lr_v = np.log1p(lr_c / np.maximum(n_per_lr, 1)[None]) / gs
    hr_v = (np.log1p(hr_c) / gs) if hr_c is not None else None
    lr_v[:, ~lr_mask] = 0.0
    if hr_v is not None:
        hr_v[:, ~hr_mask] = 0.0
    H, W = hr_mask.shape
    k = int(he_per_hr)
    A_hr = _square_affine(origin[0], origin[1], hr_px)
    A_lr = _square_affine(origin[0], origin[1], hr_px * s)
    A_he = _square_affine(origin[0], origin[1], hr_px / k)
    he = sample_image(sample, A_he, (H * k, W * k)) if sample.image is not None else np.zeros((3, H * k, W * k),
                                                                                               np.float32)
    um = float(sample.um_per_px)
    modality = "fluorescence" if getattr(sample.image, "modality", None) == "fluorescence" else "brightfield"
    extra = {"mode": "imaging_truth", "hr_affine": A_hr, "lr_affine": A_lr, "he_affine": A_he,
             "lr_um": hr_px * s * um, "he_um_per_px": hr_px / k * um, "modality": modality}
    if modality == "fluorescence":  # one nucleus definition (the image's Otsu threshold) for every field
        from .data.fluorescence import nuclear_threshold

        extra["nuclear_threshold"] = nuclear_threshold(sample.image)
    return SRField(name=name, genes=list(genes), scale=s, lr=lr_v.astype(np.float32), lr_mask=lr_mask,
                   hr=None if hr_v is None else hr_v.astype(np.float32), hr_mask=hr_mask, he=he, he_per_hr=k,
                   hr_um=float(hr_px * um), gene_scale=np.asarray(gene_scale, np.float32).reshape(-1),
                   origin_px=(float(origin[0]), float(origin[1])), um_per_px=um, hr_spot_index=None,
                   hr_counts=counts_csr, extra=extra)


class _Dense:
    """The whole region's panel counts as dense arrays (HR (G, H, W), LR sums (G, h, w))."""

    def __init__(self, grid: TruthGrid, genes: list[str]):
        cols = [grid.genes.index(g) for g in genes]
        self.grid, self.genes = grid, genes
        self.hr = _dense(grid.hr_counts, cols, grid.hr_shape)
        s = grid.scale
        G, H, W = self.hr.shape
        self.lr = self.hr.reshape(G, H // s, s, W // s, s).sum(axis=(2, 4))
        self.lr_mask = grid.lr_mask
        self.hr_mask = np.repeat(np.repeat(grid.lr_mask, s, 0), s, 1)


def _cols_axis(grid: TruthGrid) -> int:
    """The axis cut into stripes: the longer one (columns on ties)."""
    return 1 if grid.lr_shape[1] >= grid.lr_shape[0] else 0


def _crop_sup(d: _Dense, a: int, b: int, axis: int, name: str, gene_scale, k: int, hr_truth: bool = True):
    """Supervised field of LR squares [a, b) along ``axis`` (HR truth kept when ``hr_truth``)."""
    g, s = d.grid, d.grid.scale
    sl_lr = [slice(None), slice(None)]
    sl_lr[axis] = slice(a, b)
    sl_hr = [slice(None), slice(None)]
    sl_hr[axis] = slice(a * s, b * s)
    hr_c = d.hr[(slice(None), *sl_hr)]
    lr_c = d.lr[(slice(None), *sl_lr)]
    hr_px = g.lr_px / s
    ox = g.origin_px[0] + (a * g.lr_px if axis == 1 else 0.0)
    oy = g.origin_px[1] + (a * g.lr_px if axis == 0 else 0.0)
    n_per = np.full(lr_c.shape[1:], float(s * s))
    G = hr_c.shape[0]
    counts = sp.csr_matrix(hr_c.reshape(G, -1).T)
    return _make_field(g.sample, name, d.genes, s, hr_c if hr_truth else None, d.hr_mask[tuple(sl_hr)], lr_c,
                       d.lr_mask[tuple(sl_lr)], n_per, (ox, oy), hr_px, gene_scale, k, counts)


def _crop_selfsup(d: _Dense, a: int, b: int, axis: int, name: str, gene_scale, k: int):
    """Self-supervised training field of LR squares [a, b): HR := those LR squares' counts, LR := s×s sums of
    them (partial blocks at the edges averaged over the squares they hold); no HR truth is used."""
    g, s = d.grid, d.grid.scale
    sl = [slice(None), slice(None)]
    sl[axis] = slice(a, b)
    hr_c = d.lr[(slice(None), *sl)] / float(s * s)  # LR counts as a mean per (test) HR square → same units
    hr_mask = d.lr_mask[tuple(sl)]
    G, H0, W0 = hr_c.shape
    h, w = -(-H0 // s), -(-W0 // s)
    pad = np.zeros((G, h * s, w * s))
    pad[:, :H0, :W0] = hr_c
    pm = np.zeros((h * s, w * s), bool)
    pm[:H0, :W0] = hr_mask
    lr_sum = (pad * pm).reshape(G, h, s, w, s).sum(axis=(2, 4))
    n_per = pm.reshape(h, s, w, s).sum(axis=(1, 3)).astype(float)
    lr_mask = n_per > 0
    ox = g.origin_px[0] + (a * g.lr_px if axis == 1 else 0.0)
    oy = g.origin_px[1] + (a * g.lr_px if axis == 0 else 0.0)
    # HR values must be log1p(count per test-HR-square area): the LR count / s² (not rounded)
    fld = _make_field(g.sample, name, d.genes, s, pad, pm, lr_sum, lr_mask, n_per, (ox, oy), g.lr_px, gene_scale, k,
                      sp.csr_matrix(np.rint(d.lr[(slice(None), *sl)]).reshape(G, -1).T))
    fld.extra["self_supervised"] = True
    return fld


def split_half_log_ceiling(hr_counts: np.ndarray, mask: np.ndarray, seed: int = 0) -> tuple[float, np.ndarray]:
    """Split-half ceiling of log1p HR counts (G, H, W): thin each count into halves (p = ½), PCC of
    log1p(2a) vs log1p(2b) over ``mask`` per gene, Spearman–Brown, √; returns (mean, per gene)."""
    from .metrics import pearson, thin_counts

    rng = np.random.default_rng(seed)
    a, b = thin_counts(hr_counts, rng)
    m = np.asarray(mask, bool)
    out = np.full(hr_counts.shape[0], np.nan)
    for g in range(hr_counts.shape[0]):
        r = pearson(np.log1p(2.0 * a[g][m]), np.log1p(2.0 * b[g][m]))
        if np.isfinite(r) and r > -1:
            sb = 2 * r / (1 + r)
            out[g] = math.sqrt(max(sb, 0.0))
    return (float(np.nanmean(out)) if np.isfinite(out).any() else float("nan")), out


def crps_coverage(samples: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Ensemble CRPS (mean over masked pixels and genes) and the fraction of truth values inside the per-pixel
    5–95 % range of ``samples`` (S, G, H, W)."""
    m = np.asarray(mask, bool)
    X = np.asarray(samples, np.float64)[:, :, m]   # (S, G, P)
    y = np.asarray(truth, np.float64)[:, m]        # (G, P)
    S = X.shape[0]
    t1 = np.abs(X - y[None]).mean(axis=0)
    t2 = np.abs(X[:, None] - X[None, :]).sum(axis=(0, 1)) / (2.0 * S * S)
    crps = float((t1 - t2).mean())
    lo, hi = np.percentile(X, [5, 95], axis=0)
    cov = float(((y >= lo) & (y <= hi)).mean())
    return crps, cov


def _diffusion_samples(method, field, n: int, seed: int) -> np.ndarray | None:
    """(n, G, H, W) individual reverse-diffusion samples of a fitted Diff-ST (:meth:`DiffST.draw_samples`: its
    prior and validation-fitted shrink applied as in its ``predict``); None when the method has no samples."""
    draw = getattr(method, "draw_samples", None)
    return None if draw is None else draw(field, n, seed=seed)


# ------------------------------------------------------------------------------------------------ driver
def run_truth_benchmark(truth: Sequence, *, lr_um: float = 50.0, scales: Sequence[int] = (5, 10), folds: int = 2,
                        n_genes: int = 25, methods="all", budget="quick", seed: int = 0, device: str = "auto",
                        self_supervised: bool = False, method_kwargs: dict | None = None, save_maps=None,
                        quiet: bool = False) -> dict:
    """Run the real-truth benchmark (module docstring); returns the JSON document."""
    import torch

    from . import pipeline as P
    from .method import DiffST
    from .benchmark import (BUDGETS, PeakRSS, _device_type, _fmt, _loadavg, _machine,
                            make_method, parse_methods, score_row)
    from .data.cellfeatures import add_cell_features

    t_start = time.perf_counter()
    load_start = _loadavg()
    names = parse_methods(methods)
    if budget not in BUDGETS and not isinstance(budget, dict):
        raise DiffSTError(f"unknown budget {budget!r}; use one of {', '.join(BUDGETS)}")
    dev_type, dev_label = _device_type(device)
    scales = [int(s) for s in scales]
    for s in scales:
        if not 2 <= s <= 16:
            raise DiffSTError(f"scale must be an integer between 2 and 16, not {s}")
    if not truth:
        raise DiffSTError("benchmark --truth needs at least one imaging-based dataset folder")
    samples = [P.load_data(t, seed=seed) if not hasattr(t, "adata") else t for t in truth]
    for smp in samples:
        _log(f"data: {smp.summary()}", quiet)
    mkw = dict(method_kwargs or {})
    sections: dict = {}
    panel_all: list | None = None
    knobs_used: dict = {}
    for smp in samples:
        for s in scales:
            sec_name = f"{smp.name}@{s}x"
            grid = truth_grid(smp, lr_um, s)
            genes = top_genes(grid, n_genes)
            panel_all = panel_all or genes
            d = _Dense(grid, genes)
            axis = _cols_axis(grid)
            n_across = grid.lr_shape[axis]
            parts = stripes(n_across, folds)
            hr_px = grid.lr_px / s
            k = P.default_he_per_hr(hr_px * float(smp.um_per_px))
            _log(f"{sec_name}: LR {grid.lr_shape[0]}×{grid.lr_shape[1]} squares of {lr_um:g} µm "
                 f"({int(grid.lr_mask.sum())} in tissue), HR {lr_um / s:g} µm, {folds} stripes along "
                 f"{'x' if axis == 1 else 'y'}, {'self-supervised' if self_supervised else 'supervised'}; "
                 f"genes: {', '.join(genes)}", quiet)
            # per fold: training fields (two halves of the other stripes) and the held stripe
            fold_data = []
            for fi, (a, b) in enumerate(parts):
                rest = [r for r in range(n_across) if not a <= r < b]
                runs = _contiguous(rest)
                pieces = []
                for (ra, rb) in runs:
                    if rb - ra >= 2:
                        mid = (ra + rb) // 2
                        pieces += [(ra, mid), (mid, rb)]
                    else:
                        pieces.append((ra, rb))
                if self_supervised:
                    lr_vals = [np.log1p(d.lr[(slice(None), *_sl(axis, ra, rb))] / (s * s))
                               [:, d.lr_mask[_sl(axis, ra, rb)]] for ra, rb in pieces]
                    gs = _gene_scale(np.concatenate(lr_vals, axis=1))
                    train = [_crop_selfsup(d, ra, rb, axis, f"{smp.name}:train{fi}.{j}", gs, k)
                             for j, (ra, rb) in enumerate(pieces)]
                else:
                    hr_vals = [np.log1p(d.hr[(slice(None), *_sl(axis, ra * s, rb * s))])
                               [:, d.hr_mask[_sl(axis, ra * s, rb * s)]] for ra, rb in pieces]
                    gs = _gene_scale(np.concatenate(hr_vals, axis=1))
                    train = [_crop_sup(d, ra, rb, axis, f"{smp.name}:train{fi}.{j}", gs, k)
                             for j, (ra, rb) in enumerate(pieces)]
                # the held stripe is predicted from the whole region's LR (a user has the LR everywhere; only the
                # stripe's HR truth is held out), and only its pixels are kept
                train = [f for f in train if f.hr_mask.any()]  # pieces without tissue carry nothing to learn
                if not train:
                    raise DataFormatError(smp.provenance.get("path"), f"fold {fi}: no tissue outside the held "
                                          "stripe", "tissue in every stripe (fewer --folds or a smaller --lr-um)")
                test = _crop_sup(d, 0, n_across, axis, f"{smp.name}:fold{fi}", gs, k)
                fold_data.append((train, train[-1], test, gs, (a, b)))
            # the whole region in each fold's units is assembled in expression units (× gene_scale)
            full_gs = np.ones(len(genes), np.float32)
            full = _crop_sup(d, 0, n_across, axis, sec_name, full_gs, k)
            full.hr_counts = None
            ceiling, _ = split_half_log_ceiling(d.hr, d.hr_mask, seed=seed)
            sec = {"n_spots": int(grid.lr_mask.sum()), "ceiling_pcc": round(ceiling, 4), "methods": {}}
            cell_done = False
            maps: dict = {}
            for name in names:
                kw = dict(mkw.get(name, {}))
                if name in SAMPLING_METHODS:
                    kw.setdefault("device", device)
                    kw.setdefault("verbose", not quiet)
                pred_full = np.zeros((len(genes), *grid.hr_shape), np.float32)
                samples_full = None
                secs, peak = 0.0, 0.0
                for fi, (train, val, test, gs, (a, b)) in enumerate(fold_data):
                    method = make_method(name, **kw)
                    uses_cells = bool(getattr(method, "needs_cell_features", lambda b_: False)(budget)) or \
                        name == "histosge_cell"
                    tc = time.perf_counter()
                    if uses_cells and not cell_done:
                        for fd in fold_data:
                            # the fixed windows of the fold's training geometry (DiffST.feature_windows)
                            win = DiffST.feature_windows(fd[0][0], smp)
                            for f in fd[0] + [fd[2]]:
                                add_cell_features(f, smp, windows_um=win)
                    cell_s = time.perf_counter() - tc if uses_cells and not cell_done else 0.0
                    cell_done = cell_done or uses_cells
                    torch.manual_seed(seed)
                    mem = PeakRSS()
                    t1 = time.perf_counter()
                    with mem:
                        method.fit(train, val, seed=seed, budget=budget)
                        pred = np.asarray(method.predict(test), np.float32)
                    secs += time.perf_counter() - t1 + cell_s
                    peak = max(peak, mem.increase_mb)
                    sl = (slice(None), *_sl(axis, a * s, b * s))
                    pred_full[sl] = (pred * gs[:, None, None])[sl]
                    if isinstance(method, DiffST):
                        n_s = max(int(method.knobs_.get("n_samples", 4)), 2)
                        smps = _diffusion_samples(method, test, n_s, seed)
                        if smps is not None:
                            if samples_full is None:
                                samples_full = np.zeros((n_s, len(genes), *grid.hr_shape), np.float32)
                            samples_full[(slice(None), *sl)] = (smps * gs[None, :, None, None])[(slice(None), *sl)]
                        knobs_used[name] = dict(json.loads(json.dumps(method.knobs_, default=str)))
                        knobs_used[name].setdefault("trained_steps", {})[sec_name + f"/fold{fi}"] = int(
                            method.trained_steps_)
                        knobs_used[name].setdefault("shrink_alpha", {})[sec_name + f"/fold{fi}"] = round(
                            float(getattr(method, "alpha_", 1.0)), 4)
                    del method
                    gc.collect()
                row, _ = score_row(pred_full, full, seed=seed)
                row = {k2: (None if v is None else round(float(v), 4)) for k2, v in row.items()}
                row["seconds"] = round(secs, 2)
                row["peak_mb"] = round(peak, 1)
                if samples_full is not None:
                    crps, cov = crps_coverage(samples_full, full.hr, full.hr_mask)
                    row["crps"], row["coverage90"] = round(crps, 4), round(cov, 4)
                sec["methods"][name] = row
                maps[name] = pred_full
                _log(f"[{name}] {sec_name}: pcc {_fmt(row['pcc'])} detail {_fmt(row['detail_pcc'])} "
                     f"({row['seconds']:.1f} s, +{row['peak_mb']:.0f} MiB)", quiet)
            sections[sec_name] = sec
            if save_maps:
                _save_truth_maps(Path(save_maps) / f"{smp.name}@{s}x.npz", full, maps, genes, s)
    return {
        "genes": list(panel_all or []), "scale": scales, "budget": budget if isinstance(budget, str) else "custom",
        "device": dev_type, "synthetic": False, "seed": int(seed), "sections": sections,
        "meta": {"truth": [str(t) if not hasattr(t, "adata") else t.name for t in truth], "lr_um": float(lr_um),
                 "folds": int(folds), "setting": "self-supervised" if self_supervised else "supervised",
                 "normalisation": "HR log1p(count per HR square); LR log1p(count / scale^2)",
                 "gene_selection": f"{n_genes} most abundant by total LR count", "methods": names,
                 "method_knobs": knobs_used, "total_seconds": round(time.perf_counter() - t_start, 2),
                 "machine": _machine(dev_label, load_start),
                 "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }


def _sl(axis: int, a: int, b: int) -> tuple:
    return (slice(None), slice(a, b)) if axis == 1 else (slice(a, b), slice(None))


def _contiguous(idx: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            runs.append((start, v + 1))
            start = None
    return runs


def _gene_scale(vals: np.ndarray, q: float = 99.0) -> np.ndarray:
    """Per-gene divisor (G,) from training values (G, P): the q-th percentile, else the max, else 1."""
    if vals.size == 0:
        return np.ones(vals.shape[0], np.float32)
    gs = np.percentile(vals, q, axis=1)
    mx = vals.max(axis=1)
    return np.where(gs > 1e-6, gs, np.where(mx > 1e-6, mx, 1.0)).astype(np.float32)


def _save_truth_maps(path: Path, full, maps: dict, genes, scale: int) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    arrs = {"genes": np.asarray(genes, dtype=str), "methods": np.asarray(list(maps), dtype=str),
            "truth": np.asarray(full.hr, np.float32), "lr": np.asarray(full.lr, np.float32),
            "hr_mask": np.asarray(full.hr_mask, bool), "lr_mask": np.asarray(full.lr_mask, bool),
            "scale": np.int64(scale), "hr_um": np.float64(full.hr_um),
            "he": (np.clip(full.he, 0, 1) * 255 + 0.5).astype(np.uint8), "he_per_hr": np.int64(full.he_per_hr)}
    for m, p in maps.items():
        arrs[f"pred_{m}"] = np.asarray(p, np.float32)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrs)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- JSON and tables
_TRUTH_OPTIONAL = ("crps", "coverage90", "gpu_peak_mb")


def validate_truth_result(obj) -> list[str]:
    """Problems with a ``--truth`` document (empty = valid): the spot benchmark's checks with ``scale`` a list of
    scales, sections named ``<name>@<s>x`` and the optional ``crps``/``coverage90`` per method."""
    from .benchmark import _validate_run

    if not isinstance(obj, dict):
        return ["result: expected an object"]
    errs = []
    sc = obj.get("scale")
    if not (isinstance(sc, list) and sc and all(isinstance(s, int) and s >= 2 for s in sc)):
        errs.append(f"result.scale: expected a non-empty list of integers ≥ 2, got {sc!r}")
        sc = [2]
    probe = dict(obj, scale=int(sc[0]))
    probe["sections"] = {}
    for sn, sec in (obj.get("sections") or {}).items():
        if "@" not in sn or not sn.endswith("x"):
            errs.append(f"result.sections[{sn!r}]: expected a name '<dataset>@<scale>x'")
        sec2 = dict(sec)
        sec2["methods"] = {}
        for mn, row in (sec.get("methods") or {}).items():
            row = dict(row)
            for k in ("crps", "coverage90"):
                v = row.pop(k, None)
                if v is not None and not (isinstance(v, (int, float)) and v >= 0 and (k != "coverage90" or v <= 1)):
                    errs.append(f"result.sections[{sn!r}].methods[{mn!r}].{k}: bad value {v!r}")
            sec2["methods"][mn] = row
        probe["sections"][sn] = sec2
    return errs + _validate_run(probe)


_TCOLS = (("pcc", 3), ("detail_pcc", 3), ("rmse", 3), ("ssim", 3), ("crps", 3), ("coverage90", 2), ("seconds", 0),
          ("peak_mb", 0))


def format_truth_table(result: dict, markdown: bool = False) -> str:
    """Tables of a ``--truth`` document, one per section (plain text or Markdown)."""
    from .benchmark import _fmt

    setting = (result.get("meta") or {}).get("setting", "supervised")
    lines = []
    for sn, sec in result["sections"].items():
        title = (f"{sn}: {sec['n_spots']} LR squares of {(result.get('meta') or {}).get('lr_um', '?')} µm, "
                 f"split-half ceiling PCC {_fmt(sec.get('ceiling_pcc'))}; {setting}, {len(result['genes'])} genes, "
                 f"budget {result['budget']}, {result['device']}")
        if markdown:
            lines += [f"**{title}**", "", "| method | PCC ↑ | detail-PCC ↑ | RMSE ↓ | SSIM ↑ | CRPS ↓ | cov90 | "
                      "seconds | peak MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for mn, row in sec["methods"].items():
                lines.append(f"| {mn} | " + " | ".join(_fmt(row.get(c), nd) for c, nd in _TCOLS) + " |")
        else:
            lines += [title, f"{'method':<16}" + "".join(f"{c:>12}" for c, _ in _TCOLS)]
            for mn, row in sec["methods"].items():
                lines.append(f"{mn:<16}" + "".join(f"{_fmt(row.get(c), nd):>12}" for c, nd in _TCOLS))
        lines.append("")
    return "\n".join(lines)


def cmd_truth_benchmark(args) -> int:
    """``napari-diffst benchmark --truth DIR ...`` (dispatched from :func:`napari_diffst.benchmark.cmd_benchmark`)."""
    from .benchmark import _write_json, parse_diffst_set, parse_methods

    t0 = time.time()
    parse_methods(args.methods)
    if getattr(args, "genes", None):
        raise DiffSTError("--genes is not supported with --truth; use --n-genes (the most abundant genes)")
    diffst_set = parse_diffst_set(getattr(args, "diffst_set", None))
    scales = args.scale if isinstance(args.scale, list) else [args.scale]
    result = run_truth_benchmark(args.truth, lr_um=args.lr_um, scales=scales, folds=args.folds,
                                 n_genes=args.n_genes, methods=args.methods, budget=args.budget, seed=args.seed,
                                 device=args.device, self_supervised=args.self_supervised,
                                 method_kwargs={"diffst": diffst_set} if diffst_set else None,
                                 save_maps=args.save_maps, quiet=args.quiet)
    if diffst_set:
        result["meta"]["diffst_set"] = list(args.diffst_set)
    problems = validate_truth_result(result)
    if problems:  # pragma: no cover - a bug, not bad input
        raise DiffSTError("benchmark produced an invalid result: " + "; ".join(problems[:5]))
    print(format_truth_table(result))
    print(f"real-truth benchmark finished in {time.time() - t0:.1f} s")
    if args.out:
        _write_json(args.out, result)
        print(f"wrote {args.out}")
    if args.markdown:
        Path(args.markdown).write_text(format_truth_table(result, markdown=True))
        print(f"wrote {args.markdown}")
    return 0
