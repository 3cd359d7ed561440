"""Co-expression-based gene-correlation graph (CIGC; Diff-ST, Sec. 2.3).

Graph: genes are nodes; the edge weight is the symmetrised conditional co-expression probability
over the training spots,

    A_ij = 1/2 ( p(i | j) + p(j | i) ),   p(i | j) = #spots(i and j expressed) / #spots(j expressed)

with "expressed" meaning ``count > threshold``, ``p(i | j) = 0`` when gene ``j`` is never expressed,
and ``A_ii = 1``. The GCN uses the symmetric normalisation ``Â = D^-1/2 A D^-1/2``,
``D = diag(sum_j A_ij)``.

Layer: every noisy gene map ``x_t[:, g]`` is encoded by the same small conv net into D feature
maps, plus a learned per-gene embedding: node features ``F`` (B, G, D, H, W). One graph
convolution ``δ(Â F W_g)`` (δ = SiLU, ``W_g`` a D x D linear) mixes information between
co-expressed genes; the output is the residual mix ``α · GCN + (1 - α) · F`` (α fixed, or
learnable as ``sigmoid(θ)``). The denoiser flattens it to G·D input channels of the U-Net.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataFormatError

__all__ = ["coexpression_matrix", "normalized_adjacency", "GeneGraph"]


def coexpression_matrix(counts, threshold: float = 0) -> np.ndarray:
    """(n_spots, G) counts (numpy, scipy.sparse or anything ``np.asarray`` accepts) -> (G, G) float32.

    ``A_ij = (p(i|j) + p(j|i)) / 2`` with ``p(i|j) = P(count_i > threshold | count_j > threshold)``
    estimated over the given spots; diagonal 1; symmetric; values in [0, 1]."""
    try:
        import scipy.sparse as sp
    except Exception:  # pragma: no cover
        sp = None
    if sp is not None and sp.issparse(counts):
        e = sp.csr_matrix(counts > threshold, dtype=np.float64)
        if e.ndim != 2:
            raise DataFormatError(None, f"counts must be 2-D, got {e.ndim}-D", "(n_spots, n_genes) array")
        n_ij = np.asarray((e.T @ e).todense(), dtype=np.float64)
    else:
        x = np.asarray(counts)
        if x.ndim != 2:
            raise DataFormatError(None, f"counts must be 2-D, got shape {x.shape}", "(n_spots, n_genes) array")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataFormatError(None, "counts contain NaN or inf", "finite counts")
        e = (x > threshold).astype(np.float64)
        n_ij = e.T @ e
    n_j = np.diag(n_ij).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        p_i_given_j = np.where(n_j[None, :] > 0, n_ij / n_j[None, :], 0.0)  # [i, j] = p(i | j)
    a = 0.5 * (p_i_given_j + p_i_given_j.T)
    np.fill_diagonal(a, 1.0)
    return a.astype(np.float32)


def normalized_adjacency(a) -> torch.Tensor:
    """``D^-1/2 A D^-1/2`` with ``D = diag(row sums)`` (row sums must be > 0)."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float32) if not torch.is_tensor(a) else a, dtype=torch.float32)
    d = a.sum(1)
    inv = d.clamp_min(1e-12).rsqrt()
    return inv[:, None] * a * inv[None, :]


class GeneGraph(nn.Module):
    """CIGC layer: (B, G, H, W) noisy maps -> (B, G, D, H, W) graph-mixed node features."""

    def __init__(self, n_genes: int, dim: int = 8, alpha: float | str = 0.5):
        super().__init__()
        self.n_genes, self.dim = int(n_genes), int(dim)
        self.node_enc = nn.Sequential(nn.Conv2d(1, dim, 3, padding=1), nn.SiLU(), nn.Conv2d(dim, dim, 3, padding=1))
        self.gene_emb = nn.Parameter(torch.randn(n_genes, dim) * 0.1)
        self.w_g = nn.Linear(dim, dim)
        if alpha == "learnable":
            self.alpha_logit = nn.Parameter(torch.zeros(()))
            self._alpha = None
        else:
            a = float(alpha)
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"cigc_alpha must be in [0, 1] or 'learnable', got {alpha!r}")
            self._alpha = a
        self.register_buffer("coexpr", torch.eye(n_genes))
        self.register_buffer("adj", torch.eye(n_genes))

    @property
    def alpha(self):
        return torch.sigmoid(self.alpha_logit) if self._alpha is None else self._alpha

    def set_graph(self, a) -> None:
        """Install a (G, G) co-expression matrix (e.g. from :func:`coexpression_matrix`)."""
        a = torch.as_tensor(np.asarray(a.detach().cpu() if torch.is_tensor(a) else a, dtype=np.float32))
        G = self.n_genes
        if a.shape != (G, G):
            raise DataFormatError(None, f"gene graph has shape {tuple(a.shape)}", f"a ({G}, {G}) matrix for {G} genes")
        if not torch.isfinite(a).all() or (a < 0).any():
            raise DataFormatError(None, "gene graph has negative or non-finite entries", "non-negative finite weights")
        if (a.sum(1) <= 0).any():
            raise DataFormatError(None, "gene graph has an all-zero row", "a positive diagonal (A_ii = 1)")
        self.coexpr.copy_(a)
        self.adj.copy_(normalized_adjacency(a))

    def node_features(self, x: torch.Tensor, genes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, H, W) maps of the genes ``genes`` (default: all G in order) -> node features (B, n, D, H, W)."""
        B, n, H, W = x.shape
        f = self.node_enc(x.reshape(B * n, 1, H, W)).reshape(B, n, self.dim, H, W)
        emb = self.gene_emb if genes is None else self.gene_emb[genes]
        return f + emb[None, :, :, None, None].to(f.dtype)

    def mix(self, f: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Graph convolution of node features (B, G, D, H, W): ``α δ(Â F W_g) + (1 − α) F`` for the genes
        ``rows`` (default all) -> (B, len(rows), D, H, W). Every row still sees all G genes through Â."""
        adj = self.adj if rows is None else self.adj[rows]
        af = torch.einsum("ij,bjdhw->bidhw", adj.to(f.dtype), f)            # Â F (selected rows)
        gcn = F.silu(torch.einsum("bidhw,ed->biehw", af, self.w_g.weight)
                     + self.w_g.bias[None, None, :, None, None])            # δ(Â F W_g)
        a = self.alpha
        return a * gcn + (1 - a) * (f if rows is None else f[:, rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.node_features(x))
