"""Gene lookup and panel selection (napari_diffst.data.genes).

Known answers:
* lookup is case-insensitive over symbols and Ensembl ids (with/without version) and returns the
  same genes in sections whose columns are ordered differently;
* a miss raises GeneNotFoundError naming the section with difflib near-matches (ERB2 → ERBB2);
* Moran's I = −1 for a checkerboard and 8/9 for the diagonal ramp i + j on a 10×10 rook lattice;
  NaN if constant;
* 'hvg' picks the over-dispersed genes, 'moran' the spatially structured ones, only among genes
  detected in ≥ min_frac of training spots and present in every section;
* her2st: a panel chosen on C2 + C3 resolves in C4.
"""
from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_diffst.data.genes import (
    check_genes,
    gene_scores,
    hvg_dispersion,
    morans_i,
    resolve_genes,
    select_genes,
    spot_neighbour_graph,
)
from napari_diffst.errors import DiffSTError, GeneNotFoundError


def grid_xy(n):
    j, i = np.mgrid[0:n, 0:n]
    return np.c_[i.ravel(), j.ravel()].astype(float) * 100.0


N_FILL = 160


def make_section(seed, n=20, order=None, drop=(), name=None):
    """Spots on an n×n square lattice with designed genes:
    SMOOTH (spatial ramp, Moran ≈ 1), NOISY (over-dispersed, spatially random), FLAT (Poisson,
    detected everywhere), RARE (detected in ~20 % of spots), plus Poisson filler genes whose means
    span the range (so every dispersion bin holds several genes)."""
    rng = np.random.default_rng(seed)
    xy = grid_xy(n)
    N = len(xy)
    ramp = (xy[:, 0] + xy[:, 1]) / xy.max()
    genes = {
        "SMOOTH": rng.poisson(5 + 40 * ramp),
        "NOISY": rng.poisson(rng.gamma(0.7, 30.0, N)),
        "FLAT": rng.poisson(20.0, N),
        "RARE": rng.poisson(np.where(rng.random(N) < 0.2, 50.0, 0.0)),
    }
    for g, mu in enumerate(np.logspace(0.5, 2.5, N_FILL)):  # Poisson genes over a range of means
        genes[f"FILL{g}"] = rng.poisson(mu, N)
    names = [g for g in genes if g not in drop]
    if order is not None:
        names = [names[i] for i in order(len(names))]
    X = np.stack([genes[g] for g in names], 1).astype(np.int32)
    var = pd.DataFrame({"gene_ids": [f"ENSG{1000 + list(genes).index(g):011d}" for g in names]}, index=names)
    a = ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(N)]), var=var)
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {name or f"sec{seed}": {}}
    return a


# ------------------------------------------------------------------------------------------------
# lookup
# ------------------------------------------------------------------------------------------------
def test_resolve_case_insensitive_symbols_and_ensembl():
    a = make_section(0)
    b = make_section(1, order=lambda n: list(range(n))[::-1])  # reversed columns
    for sec in (a, b):
        idx = resolve_genes(sec, ["smooth", "Noisy", "ENSG00000001000", "ensg00000001002.7"])
        names = list(sec.var_names[idx])
        assert names == ["SMOOTH", "NOISY", "SMOOTH", "FLAT"]
    assert [list(x.var_names[i]) for x, i in zip((a, b), check_genes([a, b], ["flat"]))] == [["FLAT"], ["FLAT"]]


def test_versioned_ensembl_var_names_match_the_bare_id():
    """STUtility counts tables name genes by versioned Ensembl ids (issue 17, item 17)."""
    a = make_section(0, name="A1")
    a.var = pd.DataFrame(index=[f"ENSMUSG{22548 + k:011d}.{14 - k % 3}" for k in range(a.n_vars)])
    first, third = a.var_names[0], a.var_names[2]
    bare0, bare2 = first.split(".")[0], third.split(".")[0]
    assert list(a.var_names[resolve_genes(a, [bare0, bare2.lower(), first])]) == [first, third, first]
    assert list(a.var_names[resolve_genes(a, [bare0 + ".99"])]) == [first]  # another version: same gene
    with pytest.raises(GeneNotFoundError) as ei:
        resolve_genes(a, ["ENSMUSG00000022548X"])
    assert ei.value.suggestions["ENSMUSG00000022548X"][0] == first  # the suggestion names the real var name
    b = a.copy()
    b.var = pd.DataFrame(index=[v.split(".")[0] + ".1" for v in a.var_names])  # other release, other versions
    names = select_genes([a, b], method="names", names=[bare2])
    assert list(names) == [third]
    assert [list(x.var_names[i]) for x, i in zip((a, b), check_genes([a, b], [bare2]))] == [
        [third], [bare2 + ".1"]]


def test_gene_not_found_suggests_near_matches():
    a = make_section(0, name="C3")
    a.var_names = ["ERBB2" if v == "FILL0" else ("ERBB3" if v == "FILL1" else v) for v in a.var_names]
    with pytest.raises(GeneNotFoundError) as ei:
        resolve_genes(a, ["ERB2", "FLAT", "XYZZY"])
    err = ei.value
    msg = str(err)
    assert "C3" in msg and "'ERB2'" in msg and "ERBB2" in msg and "XYZZY" in msg
    assert err.missing == ["ERB2", "XYZZY"]
    assert err.suggestions["ERB2"][0] in ("ERBB2", "ERBB3") and set(err.suggestions["ERB2"]) >= {"ERBB2", "ERBB3"}
    assert err.suggestions["XYZZY"] == []
    assert isinstance(err, KeyError)  # GeneNotFoundError is a KeyError


def test_missing_gene_in_one_section_is_a_clear_error():
    a = make_section(0, name="C2")
    b = make_section(1, drop=("SMOOTH",), name="C4")
    with pytest.raises(GeneNotFoundError, match="C4"):
        check_genes([a, b], ["SMOOTH"])
    with pytest.raises(GeneNotFoundError, match="C4"):
        select_genes([a], method="names", names=["smooth"], apply_to=[b])


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------
def test_morans_i_known_answers():
    xy = grid_xy(10)
    W = spot_neighbour_graph(xy)
    assert W.sum() == 2 * 2 * 10 * 9  # rook neighbours, symmetric
    i, j = (xy / 100).astype(int).T
    checker = ((i + j) % 2).astype(float)
    ramp = (i + j).astype(float)
    I = morans_i(np.c_[checker, ramp, np.ones(len(xy))], W)
    assert I[0] == pytest.approx(-1.0)
    assert I[1] == pytest.approx(8 / 9)  # diagonal ramp on a 10×10 rook lattice
    assert np.isnan(I[2])


def test_hvg_dispersion_single_bin_and_ranking():
    mean = np.array([1.0, 1.0, 1.0, 1.0])
    var = np.array([1.0, 2.0, 4.0, 8.0])
    d = hvg_dispersion(mean, var)
    # one bin (all means equal): z-score of log dispersion
    ld = np.log(var / mean)
    np.testing.assert_allclose(d, (ld - ld.mean()) / ld.std(ddof=1))
    assert np.all(np.diff(d) > 0)


# ------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------
def test_select_hvg_and_moran_on_training_sections_applied_to_other():
    train = [make_section(0), make_section(1)]
    other = make_section(2, order=lambda n: list(np.random.default_rng(5).permutation(n)))
    hv = select_genes(train, method="hvg", n=2, apply_to=[other])
    assert set(hv) == {"NOISY", "SMOOTH"}  # the two genes with extra variance
    mo = select_genes(train, method="moran", n=1, apply_to=[other])
    assert mo == ["SMOOTH"]
    # the selection is usable on the other section
    idx = check_genes([other], hv)[0]
    assert list(other.var_names[idx]) == hv
    # RARE (detected in ~20 % of spots) is never eligible at min_frac_detected=0.5 ...
    df = gene_scores(train, "hvg", min_frac_detected=0.5)
    assert not df.loc["RARE", "eligible"] and df.loc["FLAT", "eligible"]
    assert "RARE" not in select_genes(train, method="hvg", n=N_FILL + 3)
    # ... but is when the threshold is lowered
    df01 = gene_scores(train, "hvg", min_frac_detected=0.1)
    assert df01.loc["RARE", "eligible"] and np.isfinite(df01.loc["RARE", "score"])
    assert "RARE" in select_genes(train, method="hvg", n=N_FILL + 4, min_frac_detected=0.1)


def test_select_variance_matches_manual_computation():
    train = [make_section(0), make_section(1)]
    vals = []
    for a in train:
        X = a.X.toarray().astype(float)
        vals.append(np.log1p(X / X.sum(1, keepdims=True) * 1e4))
    V = np.concatenate(vals)
    names = np.asarray(train[0].var_names)
    det = (V > 0).mean(0)
    var = np.where(det >= 0.5, V.var(0, ddof=1), -np.inf)
    want = list(names[np.argsort(-var)[:5]])
    assert select_genes(train, method="variance", n=5) == want
    np.testing.assert_allclose(gene_scores(train, "variance")["var_total_log1p"], V.var(0, ddof=1), rtol=1e-9)


def test_select_only_genes_present_everywhere():
    train = [make_section(0)]
    other = make_section(3, drop=("NOISY",))
    assert "NOISY" not in select_genes(train, method="hvg", n=3, apply_to=[other])
    assert "NOISY" in select_genes(train, method="hvg", n=2)


def test_select_names_returns_canonical_symbols():
    a = make_section(0)
    assert select_genes([a], method="names", names=["flat", "ENSG00000001000"]) == ["FLAT", "SMOOTH"]
    with pytest.raises(ValueError, match="same gene"):
        select_genes([a], method="names", names=["smooth", "ENSG00000001000"])
    with pytest.raises(ValueError):
        select_genes([a], method="names")
    with pytest.raises(ValueError, match="method"):
        select_genes([a], method="pca")


def test_too_few_eligible_genes():
    a = make_section(0)
    with pytest.warns(UserWarning, match="eligible"):
        out = select_genes([a], method="hvg", n=1000)
    assert len(out) == N_FILL + 3  # every gene but RARE
    with pytest.raises(DiffSTError, match="min_frac_detected"):
        select_genes([a], method="hvg", n=5, min_frac_detected=1.01)


def test_in_tissue_spots_only():
    a = make_section(0)
    # make FLAT wildly variable, but only in off-tissue spots
    X = a.X.toarray()
    off = np.arange(a.n_obs) % 2 == 0
    col = list(a.var_names).index("FLAT")
    X[off, col] = np.where(np.random.default_rng(0).random(off.sum()) < 0.4, 0, 300)
    a.X = sp.csr_matrix(X)
    all_spots = gene_scores([a], "hvg")["score"]
    assert all_spots["FLAT"] > 2 and "FLAT" in select_genes([a], method="hvg", n=3)
    a.obs["in_tissue"] = (~off).astype(int)
    tissue = gene_scores([a], "hvg")["score"]
    assert tissue["FLAT"] < all_spots["FLAT"] - 1 and "FLAT" not in select_genes([a], method="hvg", n=3)


def test_her2st_panel_chosen_on_training_applied_to_other(her2st_dir):
    from napari_diffst.io.readers import read_legacy_st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        secs = [read_legacy_st(her2st_dir / c) for c in ("C2", "C3", "C4")]
    panel = select_genes(secs[:2], method="hvg", n=25, apply_to=[secs[2]])
    assert len(panel) == 25 == len(set(panel))
    idx = check_genes(secs, panel)
    for s, i in zip(secs, idx):
        assert [g.lower() for g in s.adata.var_names[i]] == [g.lower() for g in panel]
        frac = np.asarray((s.counts()[:, i] > 0).mean(0)).ravel()
        assert frac.min() > 0.3  # detected in most spots of every section
    moran = select_genes(secs[:2], method="moran", n=10, apply_to=[secs[2]])
    df = gene_scores(secs[:2], "moran")
    assert df.loc[moran, "score"].min() > df.loc[df["eligible"], "score"].median()
    print("her2st hvg panel (C2+C3):", ", ".join(panel))
    print("her2st Moran panel (C2+C3):", ", ".join(moran))
