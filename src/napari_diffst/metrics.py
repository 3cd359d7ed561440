"""Scores of a super-resolved map against the HR truth of an :class:`~napari_diffst.data.pairs.SRField`.

Everything is computed **per gene over in-tissue HR pixels** (``field.hr_mask``) and then averaged
over genes with :func:`numpy.nanmean`; per-gene values are returned as well.  Values are in the
field's "model units" (``log1p(CP10k) / gene_scale``).

Metrics (the first three are the ones reported by Diff-ST, Wang et al. MICCAI 2024, and by the
super-resolution ST literature it compares against):

``pcc``
    Pearson correlation of prediction and truth over masked pixels.  Invariant to a per-gene affine
    rescaling of the prediction (``a·truth + b`` scores 1 for ``a > 0``).
``rmse``
    Root-mean-square error after **per-gene min–max normalisation by the truth**: both maps are
    mapped with ``(x - min_t) / (max_t - min_t)`` where ``min_t``/``max_t`` are the truth's extremes
    over the mask.  The prediction is *not* clipped, so over/undershoot is penalised; the number is
    comparable across genes of different dynamic range.
``ssim``
    :func:`skimage.metrics.structural_similarity` on the same min–max maps with ``data_range=1``.
    Masked-out pixels are set to 0 in both maps (so windows straddling the border see the same
    "background"), the full SSIM map is computed and then **averaged over in-mask pixels only**.
    The Gaussian-free uniform window is ``win_size = min(7, largest odd ≤ min(H, W))``; a grid
    smaller than 3 pixels gives NaN.
``detail_pcc``
    Pearson correlation of ``pred − LR↑`` with ``truth − LR↑`` over masked pixels, where ``LR↑`` is the
    LR input block-copied to the HR grid (``field.lr_upsampled(0)``).  It measures only the sub-LR-pixel
    detail a method adds.  A method that just copies the LR (zero residual everywhere) gets **0**
    (its residual is constant, so the correlation is undefined; we define it as "no detail" = 0).
    When the *truth* residual is constant the value is NaN (nothing to recover) and the gene is
    excluded.
``consistency_pcc`` / ``consistency_rmse``
    Downsample consistency: the prediction aggregated back to LR (mean over the in-mask HR pixels of
    each s×s block) against the LR input, over LR pixels inside ``lr_mask`` that contain at least one
    in-mask HR pixel.  RMSE is in model units (no normalisation).  An SR map whose block means equal
    the LR exactly scores PCC 1 / RMSE 0.
``split_half``
    Noise-ceiling reference of the *truth itself* (needs ``field.hr_counts``): the raw counts are
    binomially thinned (p = 0.5, seeded) into two independent halves, each normalised like the truth
    (``log1p(CP10k)`` using the half library), and the per-gene PCC ``r_half`` between the halves is
    stepped up to full depth with the Spearman–Brown formula ``r = 2 r_half / (1 + r_half)``.  This is the
    expected correlation between two *replicate* measurements at full depth; the best PCC a perfect
    predictor of the underlying expression can reach against the noisy truth is ≈ ``sqrt(r)``
    (``split_half_ceiling``).  Library sizes come from ``field.extra['hr_library_size']`` (full
    library per spot, as :func:`napari_diffst.data.grids.make_field` stores it) when present; pixels
    are mapped to spots with ``field.hr_spot_index`` so spots are weighted like in the pixel PCC.
    Not computed for ``extra['mode'] == 'truth'`` fields (noise-free synthetic truth).
    The ceiling holds for predictions whose errors are independent of the truth's counting noise;
    in ``mode='degrade'`` the LR blocks *contain* the truth spots' own counts, so LR-driven
    predictions (even ``nearest``) can exceed it.

Note: with ``make_field(mode='degrade')`` the LR is ``log1p`` of the *summed counts* of each block,
not the block mean of the HR values, so even the truth has consistency slightly below 1 and a
nonzero ``consistency_rmse``; compare methods against ``score_field(field.hr, field)``.

Constant genes: when the truth (or, for PCC, the prediction) has zero variance over the mask, the
correlation is undefined and returned as NaN; NaN genes are excluded from the means (``nanmean``),
and ``n_genes`` reports how many genes were scored for PCC.  A constant truth also makes the min–max
normalisation undefined, so RMSE and SSIM are NaN for that gene too.
"""
from __future__ import annotations

import warnings

import numpy as np

from .errors import DataFormatError

__all__ = [
    "pearson",
    "pcc_per_gene",
    "minmax_by_truth",
    "rmse_per_gene",
    "ssim_per_gene",
    "detail_pcc_per_gene",
    "block_mean",
    "consistency_per_gene",
    "thin_counts",
    "normalise_counts",
    "split_half_reference",
    "score_field",
]

_EPS = 1e-12


# --------------------------------------------------------------------------------------- helpers
def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally sized vectors; NaN if either has zero variance."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size < 2:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    na, nb = np.sqrt((a * a).sum()), np.sqrt((b * b).sum())
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1.0)
    if na <= _EPS * scale * np.sqrt(a.size) or nb <= _EPS * scale * np.sqrt(b.size):
        return float("nan")
    return float(np.clip((a * b).sum() / (na * nb), -1.0, 1.0))


def _is_constant(x: np.ndarray) -> bool:
    x = np.asarray(x, np.float64).ravel()
    if x.size == 0:
        return True
    return bool(np.ptp(x) <= 1e-9 * max(1.0, np.abs(x).max()))


def _check(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred, np.float64)
    truth = np.asarray(truth, np.float64)
    mask = np.asarray(mask, bool)
    if pred.ndim == 2:
        pred = pred[None]
    if truth.ndim == 2:
        truth = truth[None]
    if pred.shape != truth.shape:
        raise DataFormatError(None, f"prediction shape {pred.shape} does not match truth shape {truth.shape}",
                              "a (G, H, W) prediction on the field's HR grid")
    if mask.shape != truth.shape[1:]:
        raise DataFormatError(None, f"mask shape {mask.shape} does not match the HR grid {truth.shape[1:]}",
                              "an (H, W) boolean in-tissue mask")
    return pred, truth, mask


# --------------------------------------------------------------------------------------- metrics
def pcc_per_gene(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-gene Pearson correlation over ``mask`` (G,), NaN for constant genes."""
    pred, truth, mask = _check(pred, truth, mask)
    return np.array([pearson(p[mask], t[mask]) for p, t in zip(pred, truth)])


def minmax_by_truth(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalise both maps per gene by the truth's min/max over ``mask``.

    Returns ``(pred_n, truth_n, ok)``; ``ok[g]`` is False for genes whose truth is constant over the
    mask (their normalised maps are NaN).  The prediction is not clipped."""
    pred, truth, mask = _check(pred, truth, mask)
    G = truth.shape[0]
    pn = np.full_like(pred, np.nan)
    tn = np.full_like(truth, np.nan)
    ok = np.zeros(G, bool)
    for g in range(G):
        tv = truth[g][mask]
        if tv.size == 0:
            continue
        lo, hi = tv.min(), tv.max()
        if hi - lo <= 1e-9 * max(1.0, abs(hi)):
            continue
        ok[g] = True
        pn[g] = (pred[g] - lo) / (hi - lo)
        tn[g] = (truth[g] - lo) / (hi - lo)
    return pn, tn, ok


def rmse_per_gene(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-gene RMSE over ``mask`` on truth-min–max-normalised maps (G,)."""
    pn, tn, ok = minmax_by_truth(pred, truth, mask)
    out = np.full(len(ok), np.nan)
    for g in np.flatnonzero(ok):
        d = pn[g][mask] - tn[g][mask]
        out[g] = float(np.sqrt(np.mean(d * d)))
    return out


def _ssim_win(shape: tuple[int, int], max_win: int = 7) -> int | None:
    m = min(shape)
    w = min(max_win, m if m % 2 == 1 else m - 1)
    return w if w >= 3 else None


def ssim_per_gene(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, win_size: int | None = None) -> np.ndarray:
    """Per-gene SSIM (G,) on truth-min–max maps, masked pixels set to 0, SSIM map averaged over ``mask``.

    ``win_size`` defaults to ``min(7, largest odd ≤ min(H, W))`` so small grids (e.g. 33×35 spots) work."""
    from skimage.metrics import structural_similarity

    pn, tn, ok = minmax_by_truth(pred, truth, mask)
    out = np.full(len(ok), np.nan)
    win = win_size if win_size is not None else _ssim_win(mask.shape)
    if win is None or not mask.any():
        return out
    for g in np.flatnonzero(ok):
        a = np.where(mask, tn[g], 0.0)
        b = np.where(mask, pn[g], 0.0)
        _, smap = structural_similarity(a, b, data_range=1.0, win_size=win, full=True)
        out[g] = float(smap[mask].mean())
    return out


def detail_pcc_per_gene(pred: np.ndarray, truth: np.ndarray, lr_up: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-gene PCC of ``pred − lr_up`` vs ``truth − lr_up`` over ``mask`` (G,).

    A constant prediction residual (e.g. an LR copy) scores 0; a constant truth residual gives NaN."""
    pred, truth, mask = _check(pred, truth, mask)
    lr_up = np.asarray(lr_up, np.float64)
    out = np.full(truth.shape[0], np.nan)
    for g in range(truth.shape[0]):
        rt = (truth[g] - lr_up[g])[mask]
        rp = (pred[g] - lr_up[g])[mask]
        if _is_constant(rt):
            continue
        out[g] = 0.0 if _is_constant(rp) else pearson(rp, rt)
    return out


def block_mean(x: np.ndarray, scale: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``x`` (G, H, W) over each ``scale × scale`` block, counting only ``mask`` pixels.

    Returns ``(means (G, H/s, W/s), counts (H/s, W/s))``; blocks with no masked pixel get mean 0."""
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        x = x[None]
    G, H, W = x.shape
    s = int(scale)
    if H % s or W % s:
        raise DataFormatError(None, f"HR grid {H}×{W} is not a multiple of the scale {s}",
                              "HR shape = LR shape × scale")
    m = np.ones((H, W), np.float64) if mask is None else np.asarray(mask, np.float64)
    h, w = H // s, W // s
    cnt = m.reshape(h, s, w, s).sum(axis=(1, 3))
    tot = (x * m).reshape(G, h, s, w, s).sum(axis=(2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0)
    return mean, cnt


def consistency_per_gene(pred: np.ndarray, lr: np.ndarray, lr_mask: np.ndarray, hr_mask: np.ndarray,
                         scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Downsample consistency: per-gene (PCC, RMSE) of the masked block mean of ``pred`` vs ``lr``.

    Compared over LR pixels in ``lr_mask`` that hold at least one in-mask HR pixel."""
    agg, cnt = block_mean(pred, scale, hr_mask)
    lr = np.asarray(lr, np.float64)
    valid = np.asarray(lr_mask, bool) & (cnt > 0)
    G = lr.shape[0]
    pcc = np.full(G, np.nan)
    rmse = np.full(G, np.nan)
    if not valid.any():
        return pcc, rmse
    for g in range(G):
        a, b = agg[g][valid], lr[g][valid]
        pcc[g] = pearson(a, b)
        rmse[g] = float(np.sqrt(np.mean((a - b) ** 2)))
    return pcc, rmse


# ------------------------------------------------------------------------------ split-half reference
def thin_counts(counts: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Binomial thinning: each read goes to half A with probability ``p``, else to half B."""
    counts = np.asarray(counts)
    if np.any(counts < 0):
        raise DataFormatError(None, "negative counts cannot be thinned", "raw non-negative integer counts")
    c = np.rint(counts).astype(np.int64)
    a = rng.binomial(c, p)
    return a, c - a


def normalise_counts(counts: np.ndarray, library: np.ndarray | None = None, target: float = 1e4) -> np.ndarray:
    """``log1p(counts / library * target)`` (CP10k); ``library`` defaults to the row sums
    (:func:`napari_diffst.data.normalise.log_cp10k`, the one normalisation)."""
    from .data.normalise import log_cp10k

    return log_cp10k(np.asarray(counts, np.float64), library_size=library, target=target)


def split_half_reference(counts: np.ndarray, library: np.ndarray | None = None, seed: int = 0,
                         rows: np.ndarray | None = None) -> dict:
    """Split-half reliability of a count matrix (spots × genes), stepped up with Spearman–Brown.

    Parameters
    ----------
    counts : raw counts of the scored genes, spots × genes
    library : full library size per spot (total over *all* genes).  When given, the part of the
        library outside the scored genes is thinned too (``Binomial(library − Σ counts, ½)``), which has
        exactly the distribution of the thinned full library.  Default: row sums of ``counts``.
    seed : RNG seed of the thinning
    rows : spot index per scored sample (with repeats), e.g. ``hr_spot_index[hr_mask]`` so that the
        correlation weights spots exactly like the pixel-level PCC does.  Default: every spot once.

    Returns ``{'r_half': (G,), 'spearman_brown': (G,), 'ceiling': (G,), 'mean': float,
    'mean_ceiling': float}``; constant genes give NaN and are left out of the means.
    """
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 2:
        raise DataFormatError(None, f"counts have shape {counts.shape}", "a spots × genes count matrix")
    rng = np.random.default_rng(seed)
    a, b = thin_counts(counts, rng)
    if library is None:
        lib_a, lib_b = a.sum(1), b.sum(1)
    else:
        rest = np.rint(np.asarray(library, np.float64)).astype(np.int64) - np.rint(counts).astype(np.int64).sum(1)
        rest = np.maximum(rest, 0)
        ra = rng.binomial(rest, 0.5)
        lib_a, lib_b = a.sum(1) + ra, b.sum(1) + (rest - ra)
    xa, xb = normalise_counts(a, lib_a), normalise_counts(b, lib_b)
    if rows is not None:
        rows = np.asarray(rows, np.int64)
        rows = rows[rows >= 0]
        xa, xb = xa[rows], xb[rows]
    r = np.array([pearson(xa[:, g], xb[:, g]) for g in range(counts.shape[1])])
    with np.errstate(invalid="ignore", divide="ignore"):
        sb = np.where(r > -1, 2 * r / (1 + r), np.nan)
        ceil = np.sqrt(np.clip(sb, 0, None))
    ceil[np.isnan(sb)] = np.nan
    return {"r_half": r, "spearman_brown": sb, "ceiling": ceil,
            "mean": _nanmean(sb), "mean_ceiling": _nanmean(ceil)}


def _counts_for_genes(hr_counts, genes: list, extra: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Accept ndarray / scipy sparse (spots × G, columns = ``genes``), a DataFrame or an AnnData-like
    object (``.X`` + ``.var_names``) holding all genes.  Returns (counts spots×G, library or None)."""
    library = None
    if extra:
        library = extra.get("hr_library_size", extra.get("hr_library"))
    X, names = None, None
    if hasattr(hr_counts, "X") and hasattr(hr_counts, "var_names"):  # AnnData
        X, names = hr_counts.X, list(map(str, hr_counts.var_names))
    elif hasattr(hr_counts, "columns") and hasattr(hr_counts, "to_numpy"):  # DataFrame
        X, names = hr_counts.to_numpy(), list(map(str, hr_counts.columns))
    else:
        X = hr_counts
    if hasattr(X, "toarray") and not isinstance(X, np.ndarray):
        full_lib = np.asarray(X.sum(axis=1)).ravel()
    else:
        X = np.asarray(X)
        full_lib = X.sum(axis=1) if X.ndim == 2 else None
    if names is not None:
        idx = {n: i for i, n in enumerate(names)}
        missing = [g for g in genes if str(g) not in idx]
        if missing:
            raise DataFormatError(None, f"hr_counts lacks genes {missing[:5]}",
                                  "hr_counts holding every gene of the field")
        cols = [idx[str(g)] for g in genes]
        sub = X[:, cols]
        sub = sub.toarray() if hasattr(sub, "toarray") else np.asarray(sub)
        if library is None:
            library = full_lib
        return np.asarray(sub, np.float64), library
    sub = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    if sub.ndim != 2 or sub.shape[1] != len(genes):
        raise DataFormatError(None, f"hr_counts has shape {getattr(sub, 'shape', None)} for {len(genes)} genes",
                              "spots × genes counts in the order of field.genes (or an AnnData/DataFrame)")
    return np.asarray(sub, np.float64), library


# ----------------------------------------------------------------------------------------- driver
def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    if x.size == 0 or np.all(np.isnan(x)):
        return float("nan")
    return float(np.nanmean(x))


def score_field(pred: np.ndarray, field, *, split_half: bool = True, seed: int = 0,
                ssim_win: int | None = None) -> dict:
    """Score a prediction ``(G, H, W)`` in model units against ``field.hr`` (see module docstring).

    Returns ``{'pcc', 'rmse', 'ssim', 'detail_pcc', 'consistency_pcc', 'consistency_rmse',
    'split_half', 'split_half_ceiling', 'n_genes', 'per_gene': {'gene': [...], 'pcc': (G,), ...}}``
    with gene means as Python floats (NaN genes excluded).  ``split_half*`` are NaN without
    ``field.hr_counts``."""
    if field.hr is None:
        raise DataFormatError(None, f"field {field.name!r} has no HR truth to score against",
                              "an SRField with .hr set")
    pred = np.asarray(pred, np.float64)
    if pred.shape != field.hr.shape:
        raise DataFormatError(None, f"prediction shape {pred.shape} ≠ HR truth shape {field.hr.shape} "
                              f"for field {field.name!r}", "(G, H, W) on the field's HR grid")
    if not np.all(np.isfinite(pred[:, field.hr_mask])):
        raise DataFormatError(None, "prediction has NaN/inf inside the tissue mask", "finite values")
    truth, mask = field.hr, np.asarray(field.hr_mask, bool)
    lr_up = field.lr_upsampled(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per = {
            "gene": list(field.genes),
            "pcc": pcc_per_gene(pred, truth, mask),
            "rmse": rmse_per_gene(pred, truth, mask),
            "ssim": ssim_per_gene(pred, truth, mask, ssim_win),
            "detail_pcc": detail_pcc_per_gene(pred, truth, lr_up, mask),
        }
        per["consistency_pcc"], per["consistency_rmse"] = consistency_per_gene(
            pred, field.lr, field.lr_mask, mask, field.scale)
        G = field.G
        per["split_half"] = np.full(G, np.nan)
        per["split_half_ceiling"] = np.full(G, np.nan)
        # mode 'truth' (synthetic): hr is a noise-free map, hr_counts are the LR spots → no reference
        if split_half and field.hr_counts is not None and (field.extra or {}).get("mode") != "truth":
            counts, library = _counts_for_genes(field.hr_counts, list(field.genes), field.extra)
            rows = None
            if field.hr_spot_index is not None:
                rows = np.asarray(field.hr_spot_index)[mask]
            ref = split_half_reference(counts, library, seed=seed, rows=rows)
            per["split_half"], per["split_half_ceiling"] = ref["spearman_brown"], ref["ceiling"]
    out = {k: _nanmean(v) for k, v in per.items() if k != "gene"}
    out["n_genes"] = int(np.isfinite(per["pcc"]).sum())
    out["per_gene"] = per
    return out
