"""The one normalisation of expression in napari-diffst: log1p(CP10k).

Every count, rate or map becomes ``log1p(x / library × 10⁴)``, the library being the total over **all** genes of
the spot, bin or pixel (not only the panel), and a zero library giving 0 — scanpy's
``sc.pp.normalize_total(target_sum=1e4)`` + ``sc.pp.log1p``, so maps and spots read as a scanpy user expects.
The readers, gene panels, grids, metrics, layers and the synthetic truth all call these two functions.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp

__all__ = ["CP10K", "cp10k_factor", "log_cp10k"]

#: counts per this many (CP10k)
CP10K = 1e4


def cp10k_factor(library, target: float = CP10K) -> np.ndarray:
    """``target / library`` (float64, same shape), 0 where the library is 0 (or negative)."""
    lib = np.asarray(library, np.float64)
    return np.divide(target, lib, out=np.zeros_like(lib), where=lib > 0)


def log_cp10k(counts, cols: Sequence[int] | None = None, library_size: np.ndarray | None = None,
              dense: bool = True, target: float = CP10K):
    """log1p(counts / library size × 10⁴) of a spots × genes matrix (dense or sparse) for the chosen columns;
    library size = the row sum over *all* genes unless given. Spots with zero counts stay 0.  ``dense=False``
    keeps a CSR matrix."""
    C = counts.tocsr() if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts, np.float64))
    lib = np.asarray(C.sum(axis=1)).ravel().astype(np.float64) if library_size is None else \
        np.asarray(library_size, np.float64).ravel()
    sub = C if cols is None else C[:, np.asarray(cols)]
    sub = (sp.diags(cp10k_factor(lib, target)) @ sub.astype(np.float64)).tocsr()
    sub.data = np.log1p(sub.data)
    return sub.toarray() if dense else sub
