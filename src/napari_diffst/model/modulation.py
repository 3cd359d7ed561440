"""Cross-modal adaptive modulation (CAM) and multi-modal disentangling (Diff-ST, Sec. 2.1).

Given ST features ``A_y`` and histology features ``A_h`` (both (B, C, H, W)):

1. **Adaptive filters.** For every pixel, take the ``a x a`` neighbourhoods of both maps
   (``unfold``, zero padded), ``N_y, N_h`` (C, a^2). Their affinity ``A_y^T A_h`` is the
   ``a^2 x a^2`` matrix ``S = N_y^T N_h / sqrt(C)`` (after GroupNorm). A fully connected layer maps the
   flattened ``S`` to ``a^2`` logits and a softmax over the ``a^2`` taps gives the filter
   ``w = softmax(FC(A_y^T A_h))`` (weights >= 0, sum 1). It is applied to A_y's neighbourhood,
   ``M_y = N_y w`` (histology -> ST modulation). The reverse direction uses ``S^T`` and its own FC:
   ``M_h = N_h softmax(FC'(A_h^T A_y))`` (ST -> histology).
2. **Disentangling.** A shared encoder ``E_s`` and modality-unique encoders ``E_u^y``, ``E_u^h``:
   ``S_y = E_s(M_y)``, ``S_h = E_s(M_h)``, ``U_y = E_u^y(M_y)``, ``U_h = E_u^h(M_h)``.
   Output to the U-Net: ``A_y + Fuse([ (S_y + S_h)/2, U_y, U_h ])`` (1x1 conv, residual).
3. **Disentangling loss** (our choice, the paper only names the two distances): on per-pixel
   L2-normalised feature vectors (hat), ::

       L_dis = mean_p ||S^_y - S^_h||_2 + lambda * mean_p relu(margin - ||U^_y - U^_h||_2)

   pulls the shared codes together and pushes the unique codes at least ``margin`` apart.
   Normalising removes the trivial minimum of shrinking all features to zero; the hinge keeps
   the loss bounded below (>= 0) — a ratio ``||dS|| / ||dU||`` could be driven to 0 by inflating
   ``U``. Defaults ``lambda = 1``, ``margin = 1`` (||a^ - b^|| = 1 <=> cosine 0.5).
   With a mask (e.g. ``hr_mask``) the means run over masked pixels only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import norm

__all__ = ["AdaptiveFilter", "CrossModalModulation", "disentangle_loss", "neighbourhoods"]


def neighbourhoods(x: torch.Tensor, a: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, a*a, H*W) zero-padded ``a x a`` neighbourhoods (row-major taps)."""
    B, C, H, W = x.shape
    return F.unfold(x, a, padding=a // 2).reshape(B, C, a * a, H * W)


class AdaptiveFilter(nn.Module):
    """``w = softmax(FC(vec(S)))`` with ``S`` the (a^2 x a^2) neighbourhood affinity.

    The FC is initialised with small weights and a +2 bias on the centre tap, so at start the
    filter is ~48 % identity + a little smoothing rather than a plain box blur."""

    def __init__(self, a: int = 3):
        super().__init__()
        self.a = a
        self.fc = nn.Linear(a ** 4, a ** 2)
        nn.init.normal_(self.fc.weight, std=0.02)
        with torch.no_grad():
            self.fc.bias.zero_()
            self.fc.bias[(a * a) // 2] = 2.0

    def forward(self, affinity: torch.Tensor) -> torch.Tensor:
        """affinity (B, HW, a^2, a^2) -> weights (B, HW, a^2), softmax over taps."""
        return torch.softmax(self.fc(affinity.flatten(-2)), dim=-1)


def _encoder(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), norm(c), nn.SiLU(), nn.Conv2d(c, c, 1))


def disentangle_loss(s_y, s_h, u_y, u_h, lam: float = 1.0, margin: float = 1.0,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean ||S^_y - S^_h|| + lam * mean relu(margin - ||U^_y - U^_h||)`` over pixels (see module doc).

    Features (B, C, H, W); ``mask`` (B, 1, H, W) weights in [0, 1] or None."""
    d_s = (F.normalize(s_y, dim=1) - F.normalize(s_h, dim=1)).norm(dim=1, keepdim=True)
    d_u = (F.normalize(u_y, dim=1) - F.normalize(u_h, dim=1)).norm(dim=1, keepdim=True)
    per_px = d_s + lam * F.relu(margin - d_u)
    if mask is None:
        return per_px.mean()
    m = mask.to(per_px.dtype)
    return (per_px * m).sum() / m.sum().clamp_min(1e-6)  # all-masked -> 0


class CrossModalModulation(nn.Module):
    """CAM + disentangling at one U-Net resolution.

    ``forward(a_y, hist, mask=None) -> (a_y', loss)``; ``hist`` (B, C_hist, H, W) is projected to the
    level's channels by a 1x1 conv first (``A_h``)."""

    def __init__(self, channels: int, hist_channels: int, kernel: int = 3, lam: float = 1.0, margin: float = 1.0):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"CAM kernel must be odd and >= 1, got {kernel}")
        self.a, self.lam, self.margin = kernel, lam, margin
        self.hist_in = nn.Conv2d(hist_channels, channels, 1)
        self.norm_y, self.norm_h = norm(channels), norm(channels)
        self.filter_h2y = AdaptiveFilter(kernel)   # histology -> ST, modulates A_y
        self.filter_y2h = AdaptiveFilter(kernel)   # ST -> histology, modulates A_h
        self.shared = _encoder(channels)           # E_s
        self.unique_y = _encoder(channels)         # E_u^y
        self.unique_h = _encoder(channels)         # E_u^h
        self.fuse = nn.Conv2d(3 * channels, channels, 1)

    def filter_weights(self, a_y: torch.Tensor, a_h: torch.Tensor):
        """Both per-pixel filters for already-projected A_y, A_h: (w_h2y, w_y2h), each (B, a^2, H, W)."""
        B, C, H, W = a_y.shape
        w1, w2, _, _ = self._filters(a_y, a_h)
        return w1.transpose(1, 2).reshape(B, -1, H, W), w2.transpose(1, 2).reshape(B, -1, H, W)

    def _filters(self, a_y, a_h):
        C = a_y.shape[1]
        n_y = neighbourhoods(self.norm_y(a_y), self.a)
        n_h = neighbourhoods(self.norm_h(a_h), self.a)
        s = torch.einsum("bcip,bcjp->bpij", n_y, n_h) / C ** 0.5   # A_y^T A_h per pixel
        w_h2y = self.filter_h2y(s)
        w_y2h = self.filter_y2h(s.transpose(-1, -2))             # A_h^T A_y
        return w_h2y, w_y2h, n_y, n_h

    def forward(self, a_y: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor | None = None):
        B, C, H, W = a_y.shape
        a_h = self.hist_in(hist)
        w_h2y, w_y2h, _, _ = self._filters(a_y, a_h)
        # filters are applied to the raw (un-normalised) neighbourhoods
        m_y = torch.einsum("bcip,bpi->bcp", neighbourhoods(a_y, self.a), w_h2y).reshape(B, C, H, W)
        m_h = torch.einsum("bcip,bpi->bcp", neighbourhoods(a_h, self.a), w_y2h).reshape(B, C, H, W)
        s_y, s_h = self.shared(m_y), self.shared(m_h)
        u_y, u_h = self.unique_y(m_y), self.unique_h(m_h)
        loss = disentangle_loss(s_y, s_h, u_y, u_h, self.lam, self.margin, mask)
        out = a_y + self.fuse(torch.cat([(s_y + s_h) / 2, u_y, u_h], dim=1))
        return out, loss
