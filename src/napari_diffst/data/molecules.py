"""Molecule tables of imaging-based ST (MERSCOPE, Xenium): control probes, binning into square count rasters.

A molecule table is a :class:`pandas.DataFrame` with ``x``, ``y`` in full-resolution image pixels (the frame of
``adata.obsm['spatial']``) and a categorical ``gene``; readers keep it in :attr:`Sample.molecules`.

Binning is exact: every molecule inside the grid lands in exactly one bin (half-open squares
``[x0 + i·b, x0 + (i+1)·b)``), so summing the ``s × s`` HR bins of an LR square gives the LR square's counts
to the molecule (:func:`bin_counts`, :func:`aggregate_bins`).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["CONTROL_PATTERN", "is_control_probe", "drop_controls", "bin_counts", "aggregate_bins", "describe_imaging",
           "molecules_to_bins_adata"]

#: Control probes and codewords that are not genes: Vizgen ``Blank-N``, Xenium ``NegControlProbe_*``,
#: ``NegControlCodeword_*``, ``BLANK_*``, ``UnassignedCodeword_*``, ``DeprecatedCodeword_*``, ``Intergenic*``
#: and antisense probes.
CONTROL_PATTERN = re.compile(r"^(blank|negcontrol|unassigned|deprecated|intergenic|antisense|negative[ _]?control)"
                             r"|antisense", re.I)


def is_control_probe(name) -> bool:
    """True for control probes / codewords (:data:`CONTROL_PATTERN`)."""
    return bool(CONTROL_PATTERN.search(str(name)))


def drop_controls(genes) -> tuple[np.ndarray, dict]:
    """Boolean keep-mask over ``genes`` and ``{'n_control_probes': k, 'control_probes': [first 20 names]}``."""
    names = [str(g) for g in genes]
    ctrl = np.array([is_control_probe(g) for g in names], bool)
    return ~ctrl, {"n_control_probes": int(ctrl.sum()), "control_probes": [n for n, c in zip(names, ctrl) if c][:20]}


def bin_counts(x, y, gene_codes, n_genes: int, *, origin, bin_size: float, shape: tuple[int, int],
               weights=None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts per square bin: ``(bins × genes CSR, inside)``.

    ``origin`` (x0, y0) is the top-left corner of bin (0, 0), ``bin_size`` the bin side (same units as x, y),
    ``shape`` (rows, cols). Bin ``r * cols + c`` holds the molecules with ``x0 + c·b <= x < x0 + (c+1)·b`` (and the
    same for rows/y). ``inside`` marks the molecules that fell in a bin; the others are not counted. ``weights``:
    integer counts per entry (cells' counts at their centroids) instead of one per molecule."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    g = np.asarray(gene_codes, np.int64)
    H, W = int(shape[0]), int(shape[1])
    c = np.floor((x - float(origin[0])) / float(bin_size)).astype(np.int64)
    r = np.floor((y - float(origin[1])) / float(bin_size)).astype(np.int64)
    inside = (c >= 0) & (c < W) & (r >= 0) & (r < H) & (g >= 0) & (g < n_genes)
    idx = r[inside] * W + c[inside]
    w = np.ones(int(inside.sum()), np.int64) if weights is None else np.asarray(weights, np.int64)[inside]
    M = sp.csr_matrix((w, (idx, g[inside])), shape=(H * W, int(n_genes)))
    M.sum_duplicates()
    return M, inside


def aggregate_bins(counts, shape: tuple[int, int], s: int) -> tuple[sp.csr_matrix, tuple[int, int]]:
    """Sum ``s × s`` blocks of a bins × genes matrix on a (rows, cols) grid whose sides are multiples of ``s``.

    Returns (blocks × genes CSR, (rows/s, cols/s)); block ``R * (cols/s) + C`` as in :func:`bin_counts`."""
    H, W = int(shape[0]), int(shape[1])
    s = int(s)
    if H % s or W % s:
        raise ValueError(f"grid {H}×{W} is not a multiple of {s}")
    h, w = H // s, W // s
    rr, cc = np.divmod(np.arange(H * W), W)
    blk = (rr // s) * w + (cc // s)
    A = sp.csr_matrix((np.ones(H * W, np.int64), (blk, np.arange(H * W))), shape=(h * w, H * W))
    return (A @ sp.csr_matrix(counts)).tocsr(), (h, w)


def molecules_to_bins_adata(mol: pd.DataFrame, genes, *, bin_px: float, um_per_px: float, origin=None,
                            uns: dict | None = None):
    """AnnData of the non-empty square bins of side ``bin_px`` px (cells × genes in the spots' role):
    ``obsm['spatial']`` = bin centres (x, y) in px, ``obs`` with ``array_row``/``array_col``/``in_tissue``."""
    import anndata as ad

    genes = [str(g) for g in genes]
    x, y = mol["x"].to_numpy(np.float64), mol["y"].to_numpy(np.float64)
    if origin is None:
        origin = (np.floor(x.min() / bin_px) * bin_px, np.floor(y.min() / bin_px) * bin_px) if len(x) else (0.0, 0.0)
    W = max(1, int(np.floor((x.max() - origin[0]) / bin_px)) + 1) if len(x) else 1
    H = max(1, int(np.floor((y.max() - origin[1]) / bin_px)) + 1) if len(y) else 1
    M, _ = bin_counts(x, y, mol["gene"].cat.codes.to_numpy(), len(genes), origin=origin, bin_size=bin_px,
                      shape=(H, W))
    tot = np.asarray(M.sum(axis=1)).ravel()
    keep = np.flatnonzero(tot > 0)
    rr, cc = np.divmod(keep, W)
    obs = pd.DataFrame({"in_tissue": np.ones(len(keep), np.int64), "array_row": rr, "array_col": cc},
                       index=[f"bin_{r}_{c}" for r, c in zip(rr, cc)])
    a = ad.AnnData(X=M[keep].astype(np.int64), obs=obs, var=pd.DataFrame(index=genes))
    a.obsm["spatial"] = np.c_[origin[0] + (cc + 0.5) * bin_px, origin[1] + (rr + 0.5) * bin_px]
    a.uns.update(dict(uns or {}))
    a.uns["bin_um"] = float(bin_px * um_per_px)
    return a


def describe_imaging(sample) -> str:
    """The imaging-platform part of :meth:`Sample.summary`: molecules, controls skipped, stains."""
    im = dict(sample.adata.uns.get("imaging", {}))
    parts = []
    if sample.molecules is not None:
        parts.append(f"{len(sample.molecules):,} molecules of {sample.molecules['gene'].cat.categories.size} genes")
    if im.get("n_control_molecules") or im.get("n_control_probes"):
        parts.append(f"{im.get('n_control_probes', 0)} control probes skipped "
                     f"({im.get('n_control_molecules', 0)} molecules)")
    if im.get("n_low_qv"):
        parts.append(f"{im['n_low_qv']} molecules below qv {im.get('min_qv', 20):g} dropped")
    if im.get("unit"):
        parts.append("obs = cells" if im["unit"] == "cells" else f"obs = {im.get('bin_um', 0):g} µm bins")
    img = sample.image
    if img is not None and getattr(img, "modality", None) == "fluorescence":
        parts.append("morphology " + "/".join(getattr(img, "channel_names", []) or ["fluorescence"]))
    return "; " + "; ".join(parts) if parts else ""
