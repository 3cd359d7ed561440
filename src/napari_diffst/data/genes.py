"""Gene lookup and gene-panel selection across sections.

A gene panel is chosen **once on the training sections** and then applied, by name, to every
other section (the model has one output channel per gene, Diff-ST §2.3 / CIGC graph over genes).

* Names are matched case-insensitively against ``var_names`` (symbols) and, when present,
  ``var['gene_ids']`` (Ensembl ids, with or without a ``.version`` suffix).  A miss raises
  :class:`~napari_diffst.errors.GeneNotFoundError` naming the section and listing near matches
  (:mod:`difflib`).
* ``method='hvg'``: Seurat-style highly-variable genes on log1p(CP10k) — per gene the mean and
  the pooled *within-section* variance of log1p(CP10k) over the training spots (so differences
  between sections do not count as variability), dispersion = var/mean, log-dispersion z-scored
  within 20 equal-width bins of log1p(mean) (the binning of
  ``scanpy.pp.highly_variable_genes(flavor='seurat')``), ranked by that normalised dispersion.
  Computing it on log values rather than on CP10k (as scanpy's seurat flavour does) keeps spots
  with small libraries from inflating low-count genes: on her2st C2+C3 the CP10k version ranked
  housekeeping genes first (ACO2, SPAG7, …), the log version FABP7, CHGA, CEACAM6, JCHAIN, LYZ,
  SCGB2A2, immunoglobulins, …
* ``method='variance'``: the plain variance of log1p(CP10k) over the pooled in-tissue training
  spots (no binning; favours well-expressed variable genes; ties → higher mean, then name).
* ``method='moran'``: Moran's I of log1p(CP10k) on the spot lattice neighbour graph (spots closer
  than 1.25 × the nearest-neighbour distance are neighbours; binary weights), averaged over the
  training sections weighted by spot count.
* ``method='names'``: the given names, checked in every section.

Only genes detected (count > 0) in at least ``min_frac_detected`` of the pooled in-tissue training
spots and present in every section passed (training + ``apply_to``) are eligible.
"""
from __future__ import annotations

import difflib
import re
import warnings
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from ..errors import DiffSTError, GeneNotFoundError
from .normalise import cp10k_factor, log_cp10k  # noqa: F401  (log_cp10k: re-exported, its home is normalise)

__all__ = [
    "resolve_genes",
    "check_genes",
    "select_genes",
    "gene_scores",
    "log_cp10k",
    "hvg_dispersion",
    "morans_i",
    "spot_neighbour_graph",
]

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d+", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# access helpers (Sample or AnnData)
# --------------------------------------------------------------------------------------------
def _adata(x):
    return x.adata if hasattr(x, "adata") and hasattr(x, "technology") else x


def _section_name(x, i: int = 0) -> str:
    if hasattr(x, "technology") and hasattr(x, "name"):
        return str(x.name)
    ad = _adata(x)
    sp_ = getattr(ad, "uns", {}).get("spatial", {}) if hasattr(ad, "uns") else {}
    if isinstance(sp_, dict) and len(sp_) == 1:
        return str(next(iter(sp_)))
    return f"section {i}"


def _counts(x) -> sp.csr_matrix:
    ad = _adata(x)
    X = ad.layers["counts"] if "counts" in getattr(ad, "layers", {}) else ad.X
    return X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))


def _in_tissue(x) -> np.ndarray:
    ad = _adata(x)
    if "in_tissue" in ad.obs:
        return np.asarray(ad.obs["in_tissue"]).astype(bool)
    return np.ones(ad.n_obs, bool)


def _symbols(x) -> list[str]:
    return [str(v) for v in _adata(x).var_names]


def _gene_ids(x) -> list[str] | None:
    var = _adata(x).var
    for col in ("gene_ids", "gene_id", "ensembl_id"):
        if col in var.columns:
            return [str(v) for v in var[col]]
    return None


def _lookup(x) -> dict[str, int]:
    """lower-case symbol / Ensembl id (with and without version) → column index (first wins)."""
    table: dict[str, int] = {}
    ids = _gene_ids(x)
    if ids is not None:
        for i, g in enumerate(ids):
            k = g.lower()
            table.setdefault(k, i)
            table.setdefault(k.split(".")[0], i)
    sym: dict[str, int] = {}
    bare: dict[str, int] = {}
    for i, s in enumerate(_symbols(x)):  # first occurrence wins; symbols take precedence over ids
        sym.setdefault(s.lower(), i)
        bare.setdefault(_gene_key(s), i)  # var_names that are versioned Ensembl ids also match bare
    for k, i in bare.items():
        table.setdefault(k, i)
    table.update(sym)
    return table


def _gene_key(name: str) -> str:
    """Matching key of a gene name: lower case; an Ensembl id loses its version suffix
    (``ENSMUSG00000022548.14`` → ``ensmusg00000022548``)."""
    k = str(name).strip().lower()
    return k.split(".")[0] if _ENSEMBL.match(k) else k


def _suggest(name: str, x, n: int = 3) -> list[str]:
    symbols = _symbols(x)
    upper = {s.upper(): s for s in symbols}
    hits = difflib.get_close_matches(str(name).upper(), list(upper), n=n, cutoff=0.6)
    return [upper[h] for h in hits]


def resolve_genes(x, names: Sequence[str] | str, *, section: str | None = None) -> np.ndarray:
    """Column indices of ``names`` in a Sample/AnnData (case-insensitive symbols or Ensembl ids).

    Raises
    ------
    GeneNotFoundError
        listing every missing name with up to three near matches, e.g.
        ``gene 'ERB2' not found in section C3 (did you mean: ERBB2, ERBB3?)``.
    """
    if isinstance(names, str):
        names = [names]
    table = _lookup(x)
    idx, missing = [], []
    for nm in names:
        key = str(nm).strip().lower()
        i = table.get(key)
        if i is None and _ENSEMBL.match(key):
            i = table.get(key.split(".")[0])
        if i is None:
            missing.append(str(nm))
        else:
            idx.append(i)
    if missing:
        where = section or _section_name(x)
        sugg = {m: _suggest(m, x) for m in missing}
        parts = []
        for m in missing:
            s = sugg[m]
            parts.append(f"'{m}'" + (f" (did you mean: {', '.join(s)}?)" if s else " (no similar gene names)"))
        noun = "gene" if len(missing) == 1 else "genes"
        err = GeneNotFoundError(f"{noun} {'; '.join(parts)} not found in {where}")
        err.missing = missing
        err.suggestions = sugg
        err.section = where
        raise err
    return np.asarray(idx, dtype=np.int64)


def check_genes(sections: Iterable, genes: Sequence[str]) -> list[np.ndarray]:
    """Resolve ``genes`` in every section (raises GeneNotFoundError naming the first section
    that lacks any of them). Returns the per-section column indices."""
    out = []
    for i, s in enumerate(_as_list(sections)):
        out.append(resolve_genes(s, genes, section=_section_name(s, i)))
    return out


def _as_list(x) -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def hvg_dispersion(mean: np.ndarray, var: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Seurat normalised dispersion from per-gene mean and variance (here of log1p(CP10k)).

    log(var/mean) is z-scored within ``n_bins`` equal-width bins of log1p(mean); genes alone in
    their bin get 1.0 (scanpy's convention); genes with zero dispersion get -inf."""
    import pandas as pd

    mean = np.asarray(mean, np.float64).copy()
    var = np.asarray(var, np.float64)
    mean[mean == 0] = 1e-12
    disp = var / mean
    with np.errstate(divide="ignore"):
        logd = np.where(disp > 0, np.log(np.where(disp > 0, disp, 1.0)), np.nan)
    lm = np.log1p(mean)
    if len(lm) == 0:
        return np.zeros(0)
    bins = pd.cut(lm, bins=n_bins) if np.ptp(lm) > 0 else np.zeros(len(lm), int)
    df = pd.DataFrame({"d": logd, "b": bins})
    g = df.groupby("b", observed=True)["d"]
    mu = g.transform("mean").to_numpy(np.float64)
    sd = g.transform(lambda v: v.std(ddof=1)).to_numpy(np.float64)
    single = ~np.isfinite(sd)
    sd[single] = mu[single]
    mu[single] = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (logd - mu) / sd
    out[single & np.isfinite(logd)] = 1.0
    out[~np.isfinite(out)] = -np.inf
    return out


def spot_neighbour_graph(xy: np.ndarray, factor: float = 1.25) -> sp.csr_matrix:
    """Binary symmetric graph linking spots closer than ``factor`` × nearest-neighbour distance
    (the 4 / 6 lattice neighbours of a square / hexagonal array)."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, float)
    n = len(xy)
    if n < 2:
        return sp.csr_matrix((n, n))
    tree = cKDTree(xy)
    d, _ = tree.query(xy, k=2)
    nn = float(np.median(d[:, 1]))
    pairs = tree.query_pairs(factor * nn, output_type="ndarray")
    if len(pairs) == 0:
        return sp.csr_matrix((n, n))
    W = sp.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return (W + W.T).tocsr()


def morans_i(values: np.ndarray, W: sp.spmatrix) -> np.ndarray:
    """Moran's I per column: ``I = N / ΣW · Σᵢⱼ wᵢⱼ zᵢ zⱼ / Σᵢ zᵢ²`` (z = centred values).

    Constant columns give NaN."""
    X = np.asarray(values, np.float64)
    Z = X - X.mean(axis=0, keepdims=True)
    num = np.einsum("ig,ig->g", Z, np.asarray(W @ Z))
    den = np.einsum("ig,ig->g", Z, Z)
    wsum = float(W.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (len(X) / max(wsum, 1e-12)) * num / den, np.nan)


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------
def _common_genes(sections: list) -> tuple[list[str], list[np.ndarray]]:
    """Genes (canonical symbols of the first section) present in every section, and per-section
    column indices (case-insensitive symbol match; Ensembl ids match across version suffixes)."""
    first = _symbols(sections[0])
    keys = [_gene_key(s) for s in first]
    tables = [{_gene_key(s): i for i, s in reversed(list(enumerate(_symbols(x))))} for x in sections]
    seen: set[str] = set()
    names, cols = [], [[] for _ in sections]
    for k, nm in zip(keys, first):
        if k in seen:
            continue
        seen.add(k)
        if all(k in t for t in tables):
            names.append(nm)
            for j, t in enumerate(tables):
                cols[j].append(t[k])
    return names, [np.asarray(c, np.int64) for c in cols]


def gene_scores(samples_or_adatas, method: str = "hvg", min_frac_detected: float = 0.5,
                apply_to: Sequence = ()) -> "object":
    """Per-gene table (pandas DataFrame indexed by gene symbol) with ``frac_detected``,
    ``mean_cp10k``, ``mean_log1p``, ``var_log1p`` (pooled within-section), ``var_total_log1p``,
    ``score`` (normalised dispersion, variance or Moran's I) and ``eligible``."""
    import pandas as pd

    train = _as_list(samples_or_adatas)
    if not train:
        raise DiffSTError("select_genes needs at least one training section")
    others = _as_list(apply_to) if apply_to is not None else []
    names, cols = _common_genes(train + others)
    if not names:
        raise DiffSTError("the sections share no gene names")
    cols = cols[: len(train)]
    n_tot = 0
    det = np.zeros(len(names))
    s1 = np.zeros(len(names))
    s2 = np.zeros(len(names))
    mats = []
    sq_tot = np.zeros(len(names))
    ss_within = np.zeros(len(names))  # Σ over sections of Σᵢ (vᵢ − section mean)², v = log1p(CP10k)
    for x, c in zip(train, cols):
        C = _counts(x)[_in_tissue(x)]
        lib = np.asarray(C.sum(axis=1)).ravel().astype(np.float64)
        sub = C[:, c]
        det += np.asarray((sub > 0).sum(axis=0)).ravel()
        cp = (sp.diags(cp10k_factor(lib)) @ sub.astype(np.float64)).tocsr()
        lg = cp.copy()
        lg.data = np.log1p(lg.data)
        n = C.shape[0]
        m1 = np.asarray(lg.sum(axis=0)).ravel()
        m2 = np.asarray(lg.multiply(lg).sum(axis=0)).ravel()
        s1 += m1
        s2 += np.asarray(cp.sum(axis=0)).ravel()
        sq_tot += m2
        if n:
            ss_within += np.maximum(m2 - m1 ** 2 / n, 0.0)
        n_tot += n
        mats.append((x, lg, lib))
    if n_tot - len(train) < 1:
        raise DiffSTError("the training sections have too few in-tissue spots")
    frac = det / n_tot
    mean = s1 / n_tot                          # mean log1p(CP10k)
    mean_cp = s2 / n_tot                       # mean CP10k (reported)
    var = ss_within / (n_tot - len(train))     # pooled within-section variance
    var_total = np.maximum(sq_tot - s1 ** 2 / n_tot, 0.0) / (n_tot - 1)  # over all pooled spots
    eligible = frac >= float(min_frac_detected)
    score = np.full(len(names), -np.inf)
    if method == "hvg":
        if eligible.any():
            score[eligible] = hvg_dispersion(mean[eligible], var[eligible])
    elif method == "variance":
        score = np.where(eligible & (var_total > 1e-12), var_total, -np.inf)
    elif method == "moran":
        el = np.flatnonzero(eligible)
        acc = np.zeros(len(el))
        wsum = np.zeros(len(el))
        for x, cp, _lib in mats:
            if cp.shape[0] < 3 or len(el) == 0:
                continue
            xy = np.asarray(_adata(x).obsm["spatial"], float)[_in_tissue(x)]
            W = spot_neighbour_graph(xy)
            vals = cp[:, el].toarray()  # already log1p(CP10k)
            I = morans_i(vals, W)
            ok = np.isfinite(I)
            acc[ok] += I[ok] * cp.shape[0]
            wsum[ok] += cp.shape[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            sc = np.where(wsum > 0, acc / np.maximum(wsum, 1), -np.inf)
        score[el] = sc
    else:
        raise ValueError(f"unknown gene selection method {method!r} "
                         "(expected 'hvg', 'variance', 'moran' or 'names')")
    return pd.DataFrame({"frac_detected": frac, "mean_cp10k": mean_cp, "mean_log1p": mean, "var_log1p": var,
                         "var_total_log1p": var_total, "score": score, "eligible": eligible},
                        index=pd.Index(names, name="gene"))


def select_genes(samples_or_adatas, method: str = "hvg", n: int = 25, names: Sequence[str] | None = None,
                 min_frac_detected: float = 0.5, apply_to: Sequence = ()) -> list[str]:
    """Choose a gene panel on the training sections; returns canonical symbols.

    Parameters
    ----------
    samples_or_adatas : training Sample(s) or AnnData(s) (raw counts; in-tissue spots used).
    method : ``'hvg'`` (Seurat normalised dispersion of log1p(CP10k)), ``'variance'`` (plain
        variance of log1p(CP10k) over the pooled training spots, as the benchmark uses),
        ``'moran'`` (Moran's I on the spot neighbour graph) or ``'names'`` (use ``names`` as
        given, checked in every section).
    n : panel size for 'hvg'/'variance'/'moran'.
    names : genes for ``method='names'`` (symbols or Ensembl ids, any case).
    min_frac_detected : eligibility — fraction of pooled training spots with count > 0.
    apply_to : other sections the panel will be applied to; selected genes must exist there too.

    Raises GeneNotFoundError (with near-match suggestions) when a named gene is missing.
    """
    train = _as_list(samples_or_adatas)
    others = _as_list(apply_to) if apply_to is not None else []
    if method == "names":
        if not names:
            raise ValueError("method='names' needs a list of gene names")
        idx = check_genes(train + others, list(names))
        first = _symbols(train[0])
        out = [first[i] for i in idx[0]]
        if len(set(o.lower() for o in out)) != len(out):
            dup = [o for o in out if [p.lower() for p in out].count(o.lower()) > 1]
            raise ValueError(f"gene names refer to the same gene more than once: {sorted(set(dup))}")
        return out
    n = int(n)
    if n < 1:
        raise ValueError("n must be ≥ 1")
    df = gene_scores(train, method=method, min_frac_detected=min_frac_detected, apply_to=others)
    el = df[df["eligible"] & np.isfinite(df["score"].to_numpy())]
    if len(el) == 0:
        raise DiffSTError(
            f"no gene is detected in ≥ {min_frac_detected:.0%} of training spots and present in every "
            "section; lower min_frac_detected")
    if len(el) < n:
        warnings.warn(f"only {len(el)} genes are eligible (asked for {n}); lower min_frac_detected "
                      "for more", stacklevel=2)
    # stable ranking: score desc, then mean log1p(CP10k) desc, then name
    order = np.lexsort((el.index.to_numpy().astype(str), -el["mean_log1p"].to_numpy(),
                        -el["score"].to_numpy()))
    return [str(g) for g in el.index.to_numpy()[order[:n]]]
