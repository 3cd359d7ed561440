"""Hierarchical cell-to-tissue histology encoder (Diff-ST, Wang et al. MICCAI 2024, Sec. 2.2).

Two levels of H&E features, both ending on the HR grid of the expression maps:

* **tissue level** — a strided conv stem turns each block of ``k x k`` H&E pixels (``k`` =
  ``he_per_hr``) into one HR pixel, followed by context ResBlocks: ``F_t`` (B, C, H, W);
* **cell level** — the H&E tile is cut into ``M`` non-overlapping square patches of
  ``cell_patch_px`` H&E pixels (default ``2k``, i.e. a patch covers 2 x 2 HR pixels); each patch is
  encoded by a small CNN into a C-vector ``F_c`` (B, M, C).

**Dynamic cross-attention** (the paper's cell->tissue attention): per HR pixel,
``Q = W_q F_t``, ``K = W_k F_c``, ``V = W_v F_c``, ``F = F_t + W_o softmax(Q K^T / sqrt(d)) V``,
where the softmax runs only over the *kept* patches.

**Entropy curriculum**: each patch gets the Shannon entropy of its grey-level histogram,
``E = -sum_b p_b log p_b / log(n_bins)`` (normalised to [0, 1], computed without gradients).
Only patches with ``E > gamma`` are attended to; ``gamma`` rises linearly from ``gamma_start`` to
``gamma_end`` as training progresses (:meth:`HistologyEncoder.set_progress`), so training moves from
"all patches" to "only the informative, tissue-rich patches"; at eval ``gamma = gamma_end``. The
highest-entropy patch of each tile is always kept, so the attention is never empty.

Default thresholds were chosen on her2st C2 (H&E at ~3 um/px, 32-px patches): background
patches have E ~ 0.0-0.2, tissue patches E ~ 0.78-0.91 (10th-90th percentile), so
``gamma_end = 0.7`` removes background and faint tissue at the end of the curriculum.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ResBlock, norm, sinusoidal_2d

__all__ = [
    "TissueEncoder", "CellEncoder", "CellTissueAttention", "HistologyEncoder",
    "extract_patches", "patch_entropy",
]

_GRAY = (0.299, 0.587, 0.114)


def _stem(cin: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1), norm(w), nn.SiLU()]
        cin = w
    return nn.Sequential(*layers)


def _widths(n: int, channels: int, start: int = 16) -> list[int]:
    return [min(channels, start * 2 ** i) for i in range(n)]


class TissueEncoder(nn.Module):
    """Tissue-level features: (B, 3, H*k, W*k) H&E in [0, 1] -> (B, C, H, W).

    ``floor(log2 k)`` stride-2 convs (widths 16, 32, 64, ... capped at C), an adaptive average
    pool onto the (H, W) grid when ``k`` is not a power of two, a 1x1 conv to C channels and
    ``context_blocks`` ResBlocks at HR resolution (receptive field of several HR pixels)."""

    def __init__(self, he_per_hr: int, channels: int, context_blocks: int = 2):
        super().__init__()
        n = max(int(math.floor(math.log2(he_per_hr))), 0) if he_per_hr >= 2 else 0
        widths = _widths(n, channels) or [16]
        self.stem = _stem(3, widths) if n else nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), norm(16), nn.SiLU())
        self.proj = nn.Conv2d(widths[-1], channels, 1)
        self.context = nn.ModuleList([ResBlock(channels, channels) for _ in range(context_blocks)])

    def forward(self, he: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h = self.stem(he * 2 - 1)
        if tuple(h.shape[-2:]) != tuple(hw):
            h = F.adaptive_avg_pool2d(h, hw)
        h = self.proj(h)
        for blk in self.context:
            h = blk(h)
        return h


class CellEncoder(nn.Module):
    """Cell-level patch encoder: (N, 3, p, p) -> (N, C).

    Stride-2 convs until the patch is ~4 px wide, a 3x3 conv, then global mean- and max-pooling
    concatenated and a linear layer. Each patch is encoded independently (GroupNorm is per sample),
    so one patch cannot influence another's feature."""

    def __init__(self, patch_px: int, channels: int):
        super().__init__()
        n = max(int(math.floor(math.log2(max(patch_px, 1)))) - 2, 1)
        widths = _widths(n, channels)
        self.stem = _stem(3, widths)
        self.conv = nn.Sequential(nn.Conv2d(widths[-1], widths[-1], 3, padding=1), norm(widths[-1]), nn.SiLU())
        self.head = nn.Linear(2 * widths[-1], channels)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.stem(patches * 2 - 1))
        pooled = torch.cat([h.mean(dim=(-2, -1)), h.amax(dim=(-2, -1))], dim=1)
        return self.head(pooled)


def extract_patches(he: torch.Tensor, patch_px: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut (B, 3, Hh, Wh) into non-overlapping ``patch_px`` squares -> ((B, M, 3, p, p), (mh, mw)).

    The image is padded with white (1.0) on the bottom/right up to a multiple of ``patch_px``;
    patches are ordered row-major."""
    B, C, Hh, Wh = he.shape
    p = patch_px
    mh, mw = -(-Hh // p), -(-Wh // p)
    if mh * p != Hh or mw * p != Wh:
        he = F.pad(he, (0, mw * p - Wh, 0, mh * p - Hh), value=1.0)
    x = he.reshape(B, C, mh, p, mw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, mh * mw, C, p, p)
    return x, (mh, mw)


@torch.no_grad()
def patch_entropy(patches: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Normalised Shannon entropy of each patch's grey-level histogram, in [0, 1].

    ``patches`` (..., 3, p, p) RGB in [0, 1]; grey = 0.299 R + 0.587 G + 0.114 B; ``bins`` equal
    bins on [0, 1]; ``E = -sum_b p_b ln p_b / ln(bins)``. No gradients."""
    lead = patches.shape[:-3]
    w = torch.tensor(_GRAY, dtype=patches.dtype, device=patches.device)
    gray = torch.einsum("...chw,c->...hw", patches, w).reshape(-1, patches.shape[-2] * patches.shape[-1])
    idx = (gray * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(gray.shape[0], bins, device=patches.device, dtype=torch.float32)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
    p = counts / gray.shape[1]
    ent = -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-12)), torch.zeros_like(p))).sum(1)
    return (ent / math.log(bins)).reshape(lead)


class CellTissueAttention(nn.Module):
    """Masked multi-head cross-attention, queries = tissue pixels, keys/values = cell patches.

    ``Q = W_q LN(F_t + P_t)``, ``K = W_k LN(F_c) + P_c``, ``V = W_v LN(F_c)``,
    ``out = F_t + W_o softmax(Q K^T / sqrt(d) | keep) V``; ``P`` are fixed 2-D sinusoidal codes of
    the pixel / patch centre positions in HR pixels (``posenc=True``), letting the attention learn
    locality without adding parameters. Queries are processed in chunks to bound memory on large
    tiles."""

    def __init__(self, channels: int, heads: int = 4, posenc: bool = True, chunk: int = 4096):
        super().__init__()
        heads = max(1, min(heads, channels))
        while channels % heads:
            heads -= 1
        self.heads, self.posenc, self.chunk = heads, posenc, chunk
        self.norm_q = nn.LayerNorm(channels)
        self.norm_kv = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.o = nn.Linear(channels, channels)

    def forward(self, tissue: torch.Tensor, cells: torch.Tensor, keep: torch.Tensor,
                cell_rc: torch.Tensor | None = None) -> torch.Tensor:
        """tissue (B, C, H, W); cells (B, M, C); keep (B, M) bool; cell_rc (M, 2) patch centres in
        HR px (row, col). Returns (B, C, H, W)."""
        B, C, H, W = tissue.shape
        M = cells.shape[1]
        nh, d = self.heads, C // self.heads
        tq = tissue.flatten(2).transpose(1, 2)  # (B, HW, C)
        kv = self.norm_kv(cells)
        k = self.k(kv)
        if self.posenc and cell_rc is not None:
            rr, cc = torch.meshgrid(torch.arange(H, device=tissue.device) + 0.5,
                                    torch.arange(W, device=tissue.device) + 0.5, indexing="ij")
            pq = sinusoidal_2d(rr.reshape(-1), cc.reshape(-1), C).to(tissue.dtype)
            k = k + sinusoidal_2d(cell_rc[:, 0], cell_rc[:, 1], C).to(tissue.dtype)[None]
        else:
            pq = None
        k = k.reshape(B, M, nh, d).transpose(1, 2)
        v = self.v(kv).reshape(B, M, nh, d).transpose(1, 2)
        mask = keep[:, None, None, :]
        outs = []
        for s in range(0, H * W, self.chunk):
            t = tq[:, s:s + self.chunk]
            if pq is not None:
                t = t + pq[None, s:s + self.chunk]
            q = self.q(self.norm_q(t)).reshape(B, -1, nh, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            outs.append(o.transpose(1, 2).reshape(B, -1, C))
        att = self.o(torch.cat(outs, dim=1))
        return tissue + att.transpose(1, 2).reshape(B, C, H, W)


class HistologyEncoder(nn.Module):
    """Hierarchical cell->tissue encoder: (B, 3, H*k, W*k) -> (B, C, H, W).

    ``hier=False`` keeps only the tissue-level branch (no cell encoder, no cross-attention) — the
    paper's "w/o hierarchical" ablation. ``extractor`` (a :class:`~.features.FeatureExtractor`) replaces the
    learned tissue-level conv stem by that extractor plus a trainable 1x1 projection (``hist_features``)."""

    def __init__(self, he_per_hr: int, channels: int = 64, hier: bool = True, cell_patch_px: int | None = None,
                 entropy_bins: int = 32, gamma_start: float = 0.0, gamma_end: float = 0.7, heads: int = 4,
                 posenc: bool = True, context_blocks: int = 2, extractor: nn.Module | None = None):
        super().__init__()
        self.he_per_hr = int(he_per_hr)
        self.hier = bool(hier)
        self.cell_patch_px = int(cell_patch_px or 2 * he_per_hr)
        self.entropy_bins = int(entropy_bins)
        self.gamma_start, self.gamma_end = float(gamma_start), float(gamma_end)
        self.progress = 0.0
        if extractor is None:
            self.tissue = TissueEncoder(he_per_hr, channels, context_blocks)
        else:  # a pluggable feature extractor (model config 'hist_features', see features.py)
            from .features import ExtractorTissueEncoder

            self.tissue = ExtractorTissueEncoder(extractor, channels, context_blocks)
        if self.hier:
            self.cell_encoder = CellEncoder(self.cell_patch_px, channels)
            self.cross_attn = CellTissueAttention(channels, heads, posenc)

    # ---- curriculum -------------------------------------------------------------------------
    def set_progress(self, frac: float) -> None:
        """Training progress in [0, 1] (clipped): drives ``gamma`` linearly."""
        self.progress = float(min(max(frac, 0.0), 1.0))

    @property
    def gamma(self) -> float:
        """Current entropy threshold: ``gamma_start + progress (gamma_end - gamma_start)`` in training,
        ``gamma_end`` in eval mode."""
        if not self.training:
            return self.gamma_end
        return self.gamma_start + self.progress * (self.gamma_end - self.gamma_start)

    def keep_mask(self, entropy: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
        """(B, M) entropies -> (B, M) bool: ``entropy > gamma``, plus each row's arg-max."""
        g = self.gamma if gamma is None else gamma
        keep = entropy > g
        keep[torch.arange(entropy.shape[0], device=entropy.device), entropy.argmax(dim=1)] = True
        return keep

    # ---- features ---------------------------------------------------------------------------
    def cell_features(self, he: torch.Tensor):
        """-> (cells (B, M, C), entropy (B, M), centres (M, 2) in HR px)."""
        patches, (mh, mw) = extract_patches(he, self.cell_patch_px)
        B, M = patches.shape[:2]
        ent = patch_entropy(patches, self.entropy_bins)
        cells = self.cell_encoder(patches.flatten(0, 1)).reshape(B, M, -1)
        step = self.cell_patch_px / self.he_per_hr
        rr, cc = torch.meshgrid((torch.arange(mh, device=he.device) + 0.5) * step,
                                (torch.arange(mw, device=he.device) + 0.5) * step, indexing="ij")
        return cells, ent, torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=1)

    def forward(self, he: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        if hw is None:
            hw = (he.shape[-2] // self.he_per_hr, he.shape[-1] // self.he_per_hr)
        feats = self.tissue(he, hw)
        if self.hier:
            cells, ent, centres = self.cell_features(he)
            keep = self.keep_mask(ent)
            self.last_keep = keep.detach()
            feats = self.cross_attn(feats, cells, keep, centres)
        return feats
