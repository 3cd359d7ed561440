"""Spatial domains on super-resolved gene maps (Qt-free).

A *domain* is a region of tissue with a shared expression profile. This module clusters multi-gene
maps (G, H, W) into an integer label map (H, W): 0 outside the tissue, 1..k inside.

    res = sr_domains(field, maps, k=6)                  # SR maps (G, H, W) on field's HR grid
    lr = lr_domains(field, k=6)                         # the same procedure on the LR spots
    agree = compare_domains(res.labels, lr.labels, field.scale)   # {'ari', 'nmi', 'n_pixels'}
    legend = domain_legend(res.labels, maps, field.genes)          # colour + top genes per domain
    domains_to_anndata(sample.adata, res.labels, field)            # obs['diffst_domain'] (categorical)

The procedure (:func:`compute_domains`):

1. **Features.** Each gene is standardised to z-scores over the in-tissue pixels. With
   ``histology=`` (F, H, W) features (for example :func:`napari_diffst.baselines.histology_features`),
   these are standardised too. The histology block is scaled by ``hist_weight · sqrt(G / F)``, so at
   weight 1 it carries as much total variance as the genes.
2. **PCA** to ``n_components`` (scikit-learn, full SVD; signs fixed so that the largest loading of
   each component is positive).
3. **Optional spatial smoothing** of the embedding: a Gaussian of ``smooth_sigma`` pixels,
   normalised by the smoothed mask, so that only tissue pixels contribute.
4. **k-means** (scikit-learn's ``KMeans``: seeded k-means++ init, ``n_init`` restarts; fitted on at
   most ``max_fit`` random pixels, then every pixel is assigned to its nearest centre). Domains are
   numbered by size: domain 1 is the largest. ``method='leiden'`` uses ``leidenalg`` on a kNN graph
   of the embedding when ``leidenalg`` and ``igraph`` are installed (they are optional).

Agreement (:func:`adjusted_rand_index`, :func:`normalized_mutual_info`) is scikit-learn's
``adjusted_rand_score`` and ``normalized_mutual_info_score`` (arithmetic mean of the two entropies).
LR labels are brought to the HR grid by nearest-neighbour (block) upsampling
(:func:`upsample_labels`). Pixels count only where both maps have a domain.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = ["DomainResult", "compute_domains", "sr_domains", "lr_domains", "kmeans", "pca",
           "standardise", "smooth_embedding", "upsample_labels", "adjusted_rand_index",
           "normalized_mutual_info", "contingency", "compare_domains", "spot_domains", "domain_colours",
           "domain_legend", "domains_to_anndata", "has_leiden", "DOMAIN_PALETTE"]

#: Domain colours (hex), domain 1 first; cycled when k is larger. Colour-blind-friendly qualitative
#: palette (Okabe–Ito, then Tableau 10 extras).
DOMAIN_PALETTE: tuple[str, ...] = ("#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00",
                                   "#cc79a7", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f")


@dataclass
class DomainResult:
    """Domains of one map. ``labels`` (H, W) int32: 0 outside the tissue, 1..k inside."""

    labels: np.ndarray
    k: int
    method: str
    n_components: int
    explained_variance: np.ndarray  # fraction of the feature variance per kept component
    centroids: np.ndarray | None    # (k, n_components) in the (smoothed) embedding; None for Leiden
    inertia: float | None
    seed: int
    params: dict = dc_field(default_factory=dict)

    @property
    def sizes(self) -> np.ndarray:
        """Pixels per domain, domain 1 first."""
        return np.bincount(self.labels.ravel(), minlength=self.k + 1)[1:self.k + 1]


# --------------------------------------------------------------------------------------------- features
def _mask_of(maps: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    finite = np.all(np.isfinite(maps), axis=0)
    if mask is None:
        return finite
    m = np.asarray(mask, bool)
    if m.shape != maps.shape[1:]:
        raise ValueError(f"mask {m.shape} does not match the maps {maps.shape[1:]}")
    return m & finite


def standardise(X: np.ndarray) -> np.ndarray:
    """Columns of ``X`` (n, D) to zero mean, unit variance (constant columns become 0)."""
    X = np.asarray(X, np.float64)
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    return np.where(sd > 1e-12, (X - mu) / np.where(sd > 1e-12, sd, 1.0), 0.0)


def pca(X: np.ndarray, n_components: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal components of ``X`` (n, D): scores (n, c), loadings (D, c), explained variance ratio (c,).

    scikit-learn's :class:`~sklearn.decomposition.PCA` (full SVD, so deterministic), with the sign of
    each component chosen so its largest-magnitude loading is positive."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, np.float64)
    n, D = X.shape
    c = int(max(1, min(n_components, D, max(n - 1, 1))))
    p = PCA(n_components=c, svd_solver="full").fit(X)
    V = p.components_.T.copy()
    sign = np.sign(V[np.argmax(np.abs(V), axis=0), np.arange(c)])
    V = V * np.where(sign == 0, 1.0, sign)
    evr = np.nan_to_num(np.asarray(p.explained_variance_ratio_, np.float64))
    return (X - p.mean_) @ V, V, evr


def smooth_embedding(E: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised Gaussian smoothing of an embedding map ``E`` (C, H, W) inside ``mask``: only tissue
    pixels contribute, and the result is an average (no dimming at the tissue border)."""
    if sigma is None or sigma <= 0:
        return E
    m = np.asarray(mask, np.float64)
    den = ndi.gaussian_filter(m, sigma, mode="constant")
    out = np.empty_like(E, dtype=np.float64)
    for i in range(E.shape[0]):
        num = ndi.gaussian_filter(E[i] * m, sigma, mode="constant")
        out[i] = np.where(den > 1e-9, num / np.maximum(den, 1e-9), 0.0)
    return out


# --------------------------------------------------------------------------------------------- k-means
def _sqdist(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    d = (X * X).sum(1)[:, None] - 2.0 * X @ C.T + (C * C).sum(1)[None, :]
    return np.maximum(d, 0.0)


def kmeans(X: np.ndarray, k: int, *, seed: int = 0, n_init: int = 10, max_iter: int = 300,
           tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means (scikit-learn's :class:`~sklearn.cluster.KMeans`: k-means++ init seeded by ``seed``,
    ``n_init`` restarts, the lowest inertia wins).

    Returns labels (n,) in 0..k-1, centres (k, D) and the inertia (sum of squared distances)."""
    from sklearn.cluster import KMeans

    X = np.asarray(X, np.float64)
    n = len(X)
    k = int(k)
    if k < 1:
        raise ValueError("k must be ≥ 1")
    if n < k:
        raise ValueError(f"{n} pixels cannot form {k} domains")
    km = KMeans(n_clusters=k, init="k-means++", n_init=max(1, int(n_init)), max_iter=int(max_iter), tol=tol,
                random_state=int(seed)).fit(X)
    return km.labels_.astype(np.int64), np.asarray(km.cluster_centers_, np.float64), float(km.inertia_)


def has_leiden() -> bool:
    """True when the optional ``leidenalg`` and ``igraph`` packages are importable."""
    try:
        import igraph  # noqa: F401
        import leidenalg  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _leiden(X: np.ndarray, *, n_neighbors: int = 15, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """Leiden communities (RBConfiguration, ``resolution``) of the symmetric kNN graph of ``X``."""
    if not has_leiden():
        raise ImportError("method='leiden' needs the optional packages leidenalg and igraph "
                          "(pip install leidenalg igraph); k-means needs nothing extra")
    import igraph as ig
    import leidenalg
    from scipy.spatial import cKDTree

    kk = int(min(n_neighbors + 1, len(X)))
    _, idx = cKDTree(X).query(X, k=kk)
    src = np.repeat(np.arange(len(X)), kk - 1)
    dst = idx[:, 1:].ravel()
    edges = {(int(min(a, b)), int(max(a, b))) for a, b in zip(src, dst) if a != b}
    g = ig.Graph(n=len(X), edges=sorted(edges))
    part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition,
                                    resolution_parameter=float(resolution), seed=int(seed))
    return np.asarray(part.membership, np.int64)


def _relabel_by_size(lab: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Renumber 0..k-1 so that 0 is the largest cluster (ties: lower old label first); returns the new
    labels and ``order`` (old label of each new label)."""
    cnt = np.bincount(lab, minlength=k)
    order = np.lexsort((np.arange(k), -cnt))
    new_of_old = np.empty(k, np.int64)
    new_of_old[order] = np.arange(k)
    return new_of_old[lab], order


# --------------------------------------------------------------------------------------------- domains
def compute_domains(maps: np.ndarray, mask: np.ndarray | None = None, k: int = 6, *,
                    histology: np.ndarray | None = None, hist_weight: float = 1.0, n_components: int = 10,
                    smooth_sigma: float = 0.0, seed: int = 0, method: str = "kmeans", n_init: int = 10,
                    max_fit: int = 100_000, leiden_resolution: float = 1.0,
                    leiden_neighbors: int = 15) -> DomainResult:
    """Cluster multi-gene maps (G, H, W) into spatial domains (see the module docstring).

    Parameters
    ----------
    maps : (G, H, W) expression (any units; each gene is standardised within the tissue)
    mask : (H, W) tissue mask; None → every pixel with finite values. Non-finite pixels never count.
    k : number of domains (k-means)
    histology : optional (F, H, W) histology features on the same grid, appended to the genes
    hist_weight : weight of the histology block (1 = as much total variance as the genes)
    n_components : PCA components kept
    smooth_sigma : Gaussian σ (pixels of this grid) for smoothing the embedding; 0 = none
    seed : seeds the k-means++ init and restarts (and the ``max_fit`` subsample)
    method : 'kmeans' (default) or 'leiden' (optional packages; ``k`` is then ignored)
    """
    maps = np.asarray(maps, np.float64)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (G, H, W), not {maps.shape}")
    G, H, W = maps.shape
    m = _mask_of(maps, mask)
    blocks = [maps[:, m].T]
    if histology is not None:
        hist = np.asarray(histology, np.float64)
        if hist.ndim != 3 or hist.shape[1:] != (H, W):
            raise ValueError(f"histology {hist.shape} is not (F, {H}, {W})")
        m &= np.all(np.isfinite(hist), axis=0)
        blocks = [maps[:, m].T, hist[:, m].T]
    n = int(m.sum())
    if n < max(k, 2):
        raise ValueError(f"only {n} tissue pixels: too few for {k} domains")
    X = standardise(blocks[0])
    if histology is not None and hist_weight > 0:
        Hf = standardise(blocks[1]) * (float(hist_weight) * np.sqrt(G / max(blocks[1].shape[1], 1)))
        X = np.concatenate([X, Hf], axis=1)
    scores, _, evr = pca(X, n_components)
    c = scores.shape[1]
    if smooth_sigma and smooth_sigma > 0:
        E = np.zeros((c, H, W))
        E[:, m] = scores.T
        scores = smooth_embedding(E, m, float(smooth_sigma))[:, m].T
    if method == "kmeans":
        rng = np.random.default_rng(seed)
        fit = scores if n <= max_fit else scores[np.sort(rng.choice(n, int(max_fit), replace=False))]
        _, C, inertia = kmeans(fit, k, seed=seed, n_init=n_init)
        lab = np.argmin(_sqdist(scores, C), axis=1)
        kk = int(k)
        lab, order = _relabel_by_size(lab, kk)
        C = C[order]
        if n > max_fit:
            inertia = float(_sqdist(scores, C)[np.arange(n), lab].sum())
    elif method == "leiden":
        lab = _leiden(scores, n_neighbors=leiden_neighbors, resolution=leiden_resolution, seed=seed)
        kk = int(lab.max()) + 1
        lab, _ = _relabel_by_size(lab, kk)
        C, inertia = None, None
    else:
        raise ValueError(f"unknown method {method!r}; use 'kmeans' or 'leiden'")
    labels = np.zeros((H, W), np.int32)
    labels[m] = lab + 1
    return DomainResult(labels=labels, k=kk, method=method, n_components=c, explained_variance=evr,
                        centroids=C, inertia=inertia, seed=int(seed),
                        params=dict(histology=histology is not None, hist_weight=float(hist_weight),
                                    smooth_sigma=float(smooth_sigma or 0.0), n_init=int(n_init)))


def sr_domains(field, maps: np.ndarray | None = None, k: int = 6, *, include_histology: bool = False,
               smooth_lr_px: float = 0.5, **kw) -> DomainResult:
    """Domains of super-resolved maps (G, H, W) on ``field``'s HR grid (inside ``field.hr_mask``).

    ``maps`` defaults to the field's HR truth. ``smooth_lr_px``: smoothing σ in LR pixels (the same
    physical σ as :func:`lr_domains`). ``include_histology`` appends
    :func:`napari_diffst.baselines.histology_features` of the field."""
    maps = field.hr if maps is None else maps
    if maps is None:
        raise ValueError(f"field {field.name!r} has no HR truth: pass the super-resolved maps")
    hist = None
    if include_histology:
        from .baselines import histology_features

        hist = histology_features(field)
    return compute_domains(maps, field.hr_mask, k, histology=hist,
                           smooth_sigma=float(smooth_lr_px) * int(field.scale), **kw)


def lr_domains(field, k: int = 6, *, include_histology: bool = False, smooth_lr_px: float = 0.5,
               **kw) -> DomainResult:
    """Domains of the LR input ``field.lr`` (the spots; inside ``field.lr_mask``) by the same procedure.
    Histology features, when included, are the HR features averaged over each LR pixel's tissue."""
    hist = None
    if include_histology:
        from .baselines import histology_features

        F = histology_features(field)
        s = int(field.scale)
        hm = np.asarray(field.hr_mask, np.float64)
        Fh, h, w = F.shape[0], field.lr.shape[1], field.lr.shape[2]
        tot = (F * hm).reshape(Fh, h, s, w, s).sum(axis=(2, 4))
        cnt = hm.reshape(h, s, w, s).sum(axis=(1, 3))
        allm = F.reshape(Fh, h, s, w, s).mean(axis=(2, 4))
        hist = np.where(cnt > 0, tot / np.maximum(cnt, 1), allm)
    return compute_domains(field.lr, field.lr_mask, k, histology=hist, smooth_sigma=float(smooth_lr_px), **kw)


def upsample_labels(labels: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour (block) upsampling of a label map by an integer factor."""
    s = int(scale)
    return np.repeat(np.repeat(np.asarray(labels), s, axis=0), s, axis=1)


# --------------------------------------------------------------------------------------------- agreement
def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Contingency table (n_a_labels, n_b_labels) of two labelings of the same items."""
    from sklearn.metrics.cluster import contingency_matrix

    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape} vs {b.shape}")
    if not a.size:
        return np.zeros((0, 0))
    return np.asarray(contingency_matrix(a, b), np.float64)


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985; scikit-learn's ``adjusted_rand_score``) of two
    labelings; 1 = identical partitions, ≈ 0 = chance."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(a).ravel(), np.asarray(b).ravel()))


def normalized_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information, MI / mean(H(a), H(b)) (scikit-learn's
    ``normalized_mutual_info_score``, arithmetic mean). Both labelings with a single cluster: 1."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(a).ravel(), np.asarray(b).ravel(),
                                              average_method="arithmetic"))


def compare_domains(sr_labels: np.ndarray, lr_labels: np.ndarray, scale: int | None = None,
                    mask: np.ndarray | None = None) -> dict:
    """ARI and NMI between SR-grid domains and LR-grid domains (upsampled by ``scale`` when the grids
    differ), over pixels where both have a domain (label > 0) and ``mask`` is set.

    Returns ``{'ari', 'nmi', 'n_pixels'}``."""
    sr = np.asarray(sr_labels)
    lr = np.asarray(lr_labels)
    if lr.shape != sr.shape:
        s = int(scale) if scale else sr.shape[0] // lr.shape[0]
        lr = upsample_labels(lr, s)
        if lr.shape != sr.shape:
            raise ValueError(f"LR labels {lr_labels.shape} × {s} = {lr.shape} do not match the SR labels {sr.shape}")
    both = (sr > 0) & (lr > 0)
    if mask is not None:
        both &= np.asarray(mask, bool)
    n = int(both.sum())
    if n == 0:
        return {"ari": float("nan"), "nmi": float("nan"), "n_pixels": 0}
    return {"ari": adjusted_rand_index(sr[both], lr[both]), "nmi": normalized_mutual_info(sr[both], lr[both]),
            "n_pixels": n}


# --------------------------------------------------------------------------------------------- spots / export
def spot_domains(labels: np.ndarray, spot_index: np.ndarray, n_spots: int | None = None) -> np.ndarray:
    """Majority domain of each spot over its HR pixels (``spot_index``: pixel → spot, −1 none;
    e.g. ``SRField.hr_spot_index``). 0 where a spot has no labelled pixel; ties → the lower domain."""
    lab = np.asarray(labels).ravel().astype(np.int64)
    idx = np.asarray(spot_index).ravel().astype(np.int64)
    if lab.shape != idx.shape:
        raise ValueError(f"labels {np.shape(labels)} and spot index {np.shape(spot_index)} differ")
    n = int(n_spots if n_spots is not None else (idx.max() + 1 if idx.size else 0))
    use = (idx >= 0) & (idx < n) & (lab > 0)
    k = int(lab.max()) if lab.size else 0
    out = np.zeros(n, np.int64)
    if n == 0 or k == 0 or not use.any():
        return out
    votes = np.bincount(idx[use] * (k + 1) + lab[use], minlength=n * (k + 1)).reshape(n, k + 1)
    has = votes[:, 1:].sum(1) > 0
    out[has] = np.argmax(votes[has, 1:], axis=1) + 1
    return out


def domain_colours(k: int) -> list[str]:
    """Hex colour of domains 1..k (:data:`DOMAIN_PALETTE`, cycled)."""
    return [DOMAIN_PALETTE[i % len(DOMAIN_PALETTE)] for i in range(int(k))]


def domain_legend(labels: np.ndarray, maps: np.ndarray | None = None, genes: Sequence[str] | None = None,
                  n_top: int = 3, k: int | None = None) -> list[dict]:
    """One entry per domain 1..k: ``{'domain', 'colour' (hex), 'n_pixels', 'fraction' (of tissue),
    'top_genes' [(gene, mean z-score)], }``. Top marker genes: the highest mean z-score inside the
    domain, each gene standardised over all labelled pixels."""
    labels = np.asarray(labels)
    k = int(k if k is not None else labels.max())
    tissue = labels > 0
    n_tis = max(int(tissue.sum()), 1)
    cols = domain_colours(k)
    Z = None
    if maps is not None and genes is not None and tissue.any():
        X = np.asarray(maps, np.float64)[:, tissue].T
        Z = standardise(np.nan_to_num(X))
        lab = labels[tissue]
    out = []
    for d in range(1, k + 1):
        n = int((labels == d).sum())
        top = []
        if Z is not None and n:
            mz = Z[lab == d].mean(0)
            order = np.argsort(-mz, kind="stable")[:n_top]
            top = [(str(genes[i]), float(mz[i])) for i in order]
        out.append({"domain": d, "colour": cols[d - 1], "n_pixels": n, "fraction": n / n_tis, "top_genes": top})
    return out


def domains_to_anndata(adata, labels: np.ndarray, field, key: str = "diffst_domain",
                       legend: list[dict] | None = None, lr_labels: np.ndarray | None = None,
                       info: dict | None = None):
    """Write the per-spot majority SR domain into ``adata.obs[key]`` (categorical '1'..'k'; spots
    without a domain are missing) and the pixel label map into ``adata.uns[key]``.

    ``field`` must be the field whose HR grid ``labels`` lives on (its ``hr_spot_index`` and
    ``extra['spot_obs_index']`` map pixels to ``adata`` rows). ``uns[key]`` holds ``labels`` (H, W),
    ``hr_affine`` (pixel (col, row, 1) → full-res image px), ``hr_um``, ``k``, ``genes`` and, when given,
    the legend's top genes; ``uns[key + '_colors']`` the category colours (scanpy's convention).
    With ``lr_labels`` (the LR-spot domains), ``obs[key + '_lr']`` is written too. Returns ``adata``."""
    import pandas as pd

    labels = np.asarray(labels, np.int32)
    if labels.shape != tuple(field.hr_shape):
        raise ValueError(f"labels {labels.shape} are not on the field's HR grid {field.hr_shape}")
    if field.hr_spot_index is None:
        raise ValueError(f"field {field.name!r} has no pixel → spot index")
    obs_index = np.asarray(field.extra.get("spot_obs_index", np.arange(adata.n_obs)), np.int64)
    k = int(labels.max())
    per_spot = spot_domains(labels, field.hr_spot_index, len(obs_index))
    cats = [str(d) for d in range(1, k + 1)]

    def column(values_per_field_spot):
        full = np.zeros(adata.n_obs, np.int64)
        ok = obs_index < adata.n_obs
        full[obs_index[ok]] = values_per_field_spot[ok]
        return pd.Categorical([str(v) if v > 0 else None for v in full], categories=cats)

    adata.obs[key] = column(per_spot)
    adata.uns[f"{key}_colors"] = domain_colours(k)
    rec = {"labels": labels, "k": k, "hr_um": float(field.hr_um), "scale": int(field.scale),
           "hr_affine": np.asarray(field.extra.get("hr_affine", np.eye(3)), float),
           "genes": [str(g) for g in field.genes], "section": str(field.name)}
    if legend:
        rec["top_genes"] = {str(e["domain"]): [g for g, _ in e["top_genes"]] for e in legend}
    if info:
        rec.update({str(a): b for a, b in info.items() if b is not None})
    adata.uns[key] = rec
    if lr_labels is not None:
        lr = np.asarray(lr_labels)
        lr_idx = field.extra.get("lr_spot_index")
        kl = int(lr.max())
        if lr_idx is not None and np.shape(lr_idx) == lr.shape:
            per = spot_domains(lr, lr_idx, len(obs_index))
        else:  # degrade mode: each spot takes its LR block's domain
            per = spot_domains(upsample_labels(lr, field.scale), field.hr_spot_index, len(obs_index))
        full = np.zeros(adata.n_obs, np.int64)
        ok = obs_index < adata.n_obs
        full[obs_index[ok]] = per[ok]
        adata.obs[f"{key}_lr"] = pd.Categorical([str(v) if v > 0 else None for v in full],
                                                categories=[str(d) for d in range(1, kl + 1)])
        adata.uns[f"{key}_lr_colors"] = domain_colours(kl)
    return adata
