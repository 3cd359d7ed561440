"""One normalisation (issue 13, "one home"): log1p(CP10k) is computed in napari_diffst.data.normalise only, and it
is scanpy's normalize_total(target_sum=1e4) + log1p."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from napari_diffst.data.normalise import cp10k_factor, log_cp10k

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_diffst"


def test_log_cp10k_is_scanpys_normalize_total_and_log1p():
    import anndata as ad
    import scanpy as sc

    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, (30, 12)).astype(np.float64)
    X[3] = 0  # an empty spot stays 0
    a = ad.AnnData(X.copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    np.testing.assert_allclose(log_cp10k(X), a.X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(log_cp10k(sp.csr_matrix(X)), a.X, rtol=1e-12, atol=1e-12)
    assert (log_cp10k(X)[3] == 0).all()
    # a panel of columns keeps the library over all genes
    np.testing.assert_allclose(log_cp10k(X, cols=[1, 5]), a.X[:, [1, 5]], rtol=1e-12, atol=1e-12)
    assert sp.issparse(log_cp10k(X, dense=False))
    np.testing.assert_array_equal(cp10k_factor([0.0, 2.0, -1.0]), [0.0, 5e3, 0.0])


def test_no_other_module_scales_by_ten_thousand():
    pat = re.compile(r"1e4\s*/|/\s*1e4|\*\s*1e4|1e4\s*\*|10_?000\.?0?\s*/")
    hits = [f"{p.relative_to(SRC)}:{i + 1}: {line.strip()}" for p in SRC.rglob("*.py") if p.name != "normalise.py"
            for i, line in enumerate(p.read_text().splitlines()) if pat.search(line.split("#")[0])]
    assert not hits, "log1p(CP10k) computed outside data/normalise.py:\n" + "\n".join(hits)
