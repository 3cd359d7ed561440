"""Whole-slide super-resolution in overlapping tiles with bounded memory (Qt-free).

A slide's HR grid is covered by a regular grid of ``tile × tile`` windows that overlap by ``overlap`` pixels.
Each window is sampled by the diffusion model on its own (batched: ``batch_tiles`` windows × ``n_samples``
rows per sampler call), and the windows are blended with separable linear ramps over the overlaps,
normalised so the weights sum to one at every pixel (a partition of unity, also for an irregular last tile).

Seams: every tile draws its noise (``x_T`` and one draw per reverse step) from one noise field locked to
slide positions — :class:`PositionNoise` generates it in fixed ``32 × 32`` blocks keyed by
``(seed, sample, step, block row, block col)`` — so two overlapping tiles see *the same* noise where they
overlap and their trajectories differ only through their context. Together with the ramps this leaves no
visible seam (``tests/test_tiling.py`` measures the jump at tile borders against the interior).

Memory: a :class:`SlideSource` keeps only the LR maps (spots × genes) and the HR tissue mask; the
LR condition of a tile is upsampled from an LR crop with a margin, and its H&E is read from the image
(pyramid level chosen by :func:`~napari_diffst.data.grids.sample_image`) for that tile only. With ``out=``
an OME-Zarr path, tiles are added into the store chunk by chunk (:meth:`OmeZarrWriter.add_tile`), so peak
memory depends on the tile size and batch, not on the slide size (measured in docs/performance.md).

    src = SlideSource.from_sample(sample, genes, scale=10, gene_scale=gs)   # or FieldSource(field)
    for ev in super_resolve_tiled_iter(model, src, tile=64, overlap=16, steps=20, out="maps.ome.zarr"):
        ...   # progress per reverse step; stop iterating to cancel

Method: pass a :class:`~napari_diffst.method.DiffST` (``DiffST.load(checkpoint)``) as ``model`` and each tile
runs the whole method, as the untiled ``DiffST.iter_predict``: the cell-level prior of the tile (features from
the image for the tile plus a context margin, :meth:`~napari_diffst.method.DiffST.prepare_tile`) as its
condition / residual base, then the shrink ``base + α·(mean − base)`` and the self-check's β; the tiles are
blended as above, and native output is then projected onto the spots band by band
(:func:`~napari_diffst.spot_consistency.project_bands`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .data.pairs import GeneGrid, SRField
from .errors import CancelledError, DataFormatError

#: field.extra keys a window field keeps (placement helpers)
PLACEMENT_KEYS = ("pitch_um", "lr_um", "he_um_per_px", "mode")
#: field.extra keys a tile source keeps: placement helpers and the spot geometry (projection, spot report)
SOURCE_KEYS = PLACEMENT_KEYS + ("spot_hr_cr", "spot_radius_hr", "spot_log1p")

__all__ = ["TilePlan", "plan_tiles", "axis_windows", "seam_ratio", "PositionNoise", "FieldSource", "SlideSource",
           "TiledResult", "super_resolve_tiled_iter", "super_resolve_tiled", "SamplingPlan", "plan_sampling",
           "untiled_mb", "untiled_budget_mb", "auto_tile", "IN_MEMORY_MAPS_MB"]

NOISE_BLOCK = 32


# ------------------------------------------------------------------------------------------ plan
def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis of length ``n`` (the last window ends at ``n``)."""
    if tile >= n:
        return [0]
    stride = tile - overlap
    st = list(range(0, n - tile, stride))
    st.append(n - tile)
    return sorted(set(st))


def axis_windows(n: int, tile: int, overlap: int) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """Starts, per-window 1-D weights (linear ramps of length ``overlap`` on the sides that meet another
    window, 1 elsewhere) and their sum per position (the normaliser, > 0 everywhere)."""
    tile = min(int(tile), int(n))
    starts = _starts(n, tile, overlap)
    norm = np.zeros(n, np.float64)
    wins = []
    for j, s0 in enumerate(starts):
        w = np.ones(tile, np.float64)
        if j > 0:  # ramp up over the part shared with the previous window
            ov = starts[j - 1] + tile - s0
            if ov > 0:
                w[:ov] = np.minimum(w[:ov], (np.arange(ov) + 0.5) / ov)
        if j < len(starts) - 1:
            ov = s0 + tile - starts[j + 1]
            if ov > 0:
                w[tile - ov:] = np.minimum(w[tile - ov:], (ov - np.arange(ov) - 0.5) / ov)
        wins.append(w)
        norm[s0:s0 + tile] += w
    return starts, wins, norm


@dataclass
class TilePlan:
    """The tile grid over an ``(H, W)`` HR raster; ``tiles`` lists ``(row index, col index)`` of the windows
    that touch tissue (the others are skipped: they hold no in-tissue pixel)."""

    shape: tuple[int, int]
    tile: tuple[int, int]
    overlap: int
    row_starts: list[int]
    col_starts: list[int]
    row_w: list[np.ndarray]
    col_w: list[np.ndarray]
    row_norm: np.ndarray
    col_norm: np.ndarray
    tiles: list[tuple[int, int]] = dc_field(default_factory=list)

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    def bbox(self, t: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(r0, c0, h, w)`` of tile ``t``."""
        i, j = t
        return self.row_starts[i], self.col_starts[j], self.tile[0], self.tile[1]

    def weight(self, t: tuple[int, int]) -> np.ndarray:
        """Blending weights (h, w) of tile ``t``, normalised: summed over all tiles they are 1 per pixel."""
        i, j = t
        r0, c0, h, w = self.bbox(t)
        wr = self.row_w[i] / self.row_norm[r0:r0 + h]
        wc = self.col_w[j] / self.col_norm[c0:c0 + w]
        return (wr[:, None] * wc[None, :]).astype(np.float32)


def plan_tiles(shape: tuple[int, int], tile: int = 64, overlap: int = 16, mask: np.ndarray | None = None,
               multiple: int = 1) -> TilePlan:
    """Plan ``tile``-pixel windows overlapping by ``overlap`` over an HR raster of ``shape``.

    ``tile`` is rounded up to a multiple of ``multiple`` (the network's padding multiple); windows larger than
    the raster shrink to it. With ``mask`` (H, W) only windows containing tissue are kept."""
    H, W = int(shape[0]), int(shape[1])
    tile = int(tile)
    overlap = int(overlap)
    if tile < 4 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need tile ≥ 4 and 0 ≤ overlap < tile (got tile={tile}, overlap={overlap})")
    m = max(1, int(multiple))
    tile = int(math.ceil(tile / m) * m)
    rs, rw, rn = axis_windows(H, tile, overlap)
    cs, cw, cn = axis_windows(W, tile, overlap)
    th, tw = min(tile, H), min(tile, W)
    plan = TilePlan((H, W), (th, tw), overlap, rs, cs, rw, cw, rn, cn)
    for i, r0 in enumerate(rs):
        for j, c0 in enumerate(cs):
            if mask is None or bool(np.asarray(mask[r0:r0 + th, c0:c0 + tw]).any()):
                plan.tiles.append((i, j))
    return plan


def seam_ratio(maps: np.ndarray, plan: TilePlan, mask: np.ndarray) -> float:
    """Mean |difference| between horizontally and vertically adjacent in-tissue pixels that straddle a tile
    border (a window starts or ends there), divided by the same mean away from borders. ≈ 1: no seam."""
    maps = np.asarray(maps, np.float64)
    mask = np.asarray(mask, bool)
    vals = []
    for axis, starts, size in ((2, plan.col_starts, plan.tile[1]), (1, plan.row_starts, plan.tile[0])):
        n = maps.shape[axis]
        d = np.abs(np.diff(maps, axis=axis))
        ok = (mask[:, 1:] & mask[:, :-1]) if axis == 2 else (mask[1:, :] & mask[:-1, :])
        border = np.zeros(n - 1, bool)
        for s0 in starts[1:]:
            border[s0 - 1] = True          # between s0 - 1 and s0: a window starts
        for s0 in starts[:-1]:
            if s0 + size - 1 < n - 1:
                border[s0 + size - 1] = True  # a window ends
        b = border[None, :] if axis == 2 else border[:, None]
        vals.append((d[:, ok & b].sum(), (ok & b).sum() * d.shape[0], d[:, ok & ~b].sum(), (ok & ~b).sum() * d.shape[0]))
    at = sum(v[0] for v in vals) / max(sum(v[1] for v in vals), 1)
    inside = sum(v[2] for v in vals) / max(sum(v[3] for v in vals), 1)
    return float(at / inside) if inside > 0 else float("nan")


# ------------------------------------------------------------------------------------------ noise
class PositionNoise:
    """Standard-normal noise locked to slide positions: the value at HR pixel (r, c) of gene g for sample m at
    reverse step i is the same whichever tile asks for it. Generated in ``block × block`` pieces
    (NumPy PCG64 seeded by ``(seed, m, i, block row, block col)``), never for the whole slide."""

    def __init__(self, seed: int, G: int, block: int = NOISE_BLOCK):
        self.seed, self.G, self.block = int(seed) & 0xFFFFFFFF, int(G), int(block)

    def _block(self, m: int, i: int, br: int, bc: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(m), int(i) + 1, int(br), int(bc)])
        return rng.standard_normal((self.G, self.block, self.block), dtype=np.float32)

    def crop(self, m: int, i: int, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """(G, h, w) noise of sample ``m`` at step ``i`` (−1 = x_T) for the window at (r0, c0)."""
        B = self.block
        out = np.empty((self.G, h, w), np.float32)
        for br in range(r0 // B, (r0 + h - 1) // B + 1):
            for bc in range(c0 // B, (c0 + w - 1) // B + 1):
                blk = self._block(m, i, br, bc)
                a0, a1 = max(r0, br * B), min(r0 + h, (br + 1) * B)
                b0, b1 = max(c0, bc * B), min(c0 + w, (bc + 1) * B)
                out[:, a0 - r0:a1 - r0, b0 - c0:b1 - c0] = blk[:, a0 - br * B:a1 - br * B, b0 - bc * B:b1 - bc * B]
        return out


# ------------------------------------------------------------------------------------------ sources
def _crop(a: np.ndarray, r0: int, c0: int, h: int, w: int, fill: float = 0.0) -> np.ndarray:
    """``a[..., r0:r0+h, c0:c0+w]`` with ``fill`` outside."""
    out = np.full(a.shape[:-2] + (h, w), fill, a.dtype)
    H, W = a.shape[-2:]
    rr0, rr1, cc0, cc1 = max(r0, 0), min(r0 + h, H), max(c0, 0), min(c0 + w, W)
    if rr1 > rr0 and cc1 > cc0:
        out[..., rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = a[..., rr0:rr1, cc0:cc1]
    return out


def _upsample_crop(lr: np.ndarray, lr_mask: np.ndarray, s: int, r0: int, c0: int, h: int, w: int,
                   mode: str, margin: int = 8) -> np.ndarray:
    """The LR map upsampled ``s``× on the HR window (r0, c0, h, w), computed from an LR crop with ``margin``
    LR pixels of context (nearest / bilinear / the edge-aware cubic of :meth:`SRField.lr_upsampled`)."""
    if mode == "nearest":
        a0, b0 = r0 // s, c0 // s
        a1, b1 = (r0 + h - 1) // s + 1, (c0 + w - 1) // s + 1
        sub = _crop(lr, a0, b0, a1 - a0, b1 - b0)
        up = np.repeat(np.repeat(sub, s, axis=1), s, axis=2)
        return up[:, r0 - a0 * s:r0 - a0 * s + h, c0 - b0 * s:c0 - b0 * s + w]
    a0, b0 = r0 // s - margin, c0 // s - margin
    a1, b1 = (r0 + h - 1) // s + 1 + margin, (c0 + w - 1) // s + 1 + margin
    hL, wL = lr.shape[1:]
    a0c, b0c, a1c, b1c = max(a0, 0), max(b0, 0), min(a1, hL), min(b1, wL)
    sub, subm = lr[:, a0c:a1c, b0c:b1c], lr_mask[a0c:a1c, b0c:b1c]
    if mode == "cubic":
        from .data.upsample import cubic_upsample

        up = cubic_upsample(sub, s, subm, order=3)
    elif mode == "bilinear":
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(sub, np.float32))[None]
        up = F.interpolate(t, scale_factor=s, mode="bilinear", align_corners=False)[0].numpy()
    else:
        raise ValueError(f"unknown upsample {mode!r}; expected 'nearest', 'bilinear' or 'cubic'")
    return _crop(up, r0 - a0c * s, c0 - b0c * s, h, w)


class TileSource(GeneGrid):
    """What the tiled sampler needs from a section: LR maps, masks, and the model condition of a window."""

    genes: list
    scale: int
    he_per_hr: int
    hr_um: float
    gene_scale: np.ndarray
    lr: np.ndarray          # (G, h, w) model units
    lr_mask: np.ndarray     # (h, w) bool
    hr_mask: np.ndarray     # (H, W) bool
    hr_affine: np.ndarray   # HR pixel index (col, row, 1) → full-res image px
    name: str = "section"

    def _take(self, fld: SRField) -> None:
        """Copy what tiling needs (names, sizes, LR maps, masks, placement) from a field."""
        self.name = fld.name
        self.genes, self.scale, self.he_per_hr = list(fld.genes), int(fld.scale), int(fld.he_per_hr)
        self.hr_um, self.gene_scale = float(fld.hr_um), np.asarray(fld.gene_scale, np.float32)
        self.lr, self.lr_mask, self.hr_mask = fld.lr, np.asarray(fld.lr_mask, bool), np.asarray(fld.hr_mask, bool)
        self.hr_affine = np.asarray(fld.extra.get("hr_affine", np.eye(3)), float)
        self.um_per_px = float(fld.um_per_px)
        self.hr_spot_index = getattr(fld, "hr_spot_index", None)  # (H, W) spot of each HR pixel's lattice cell

    def output_mask(self) -> np.ndarray:
        """(H, W) pixels written to a file (NaN elsewhere): the HR mask here, the tissue for a slide."""
        return self.hr_mask

    def he_tile(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    #: the Sample the source reads (cell-level features of a window are computed from it); None: none
    sample = None

    def window_field(self, r0: int, c0: int, h: int, w: int, context_lr: int = 8) -> tuple[SRField, tuple[int, int]]:
        """The HR window (r0, c0, h, w) with ``context_lr`` LR pixels of context on every side, cut on whole LR
        blocks (clamped to the section), as an :class:`SRField` without H&E or truth: LR maps, masks and the
        placement (``extra['hr_affine']``) of that crop, so anything computed on a field (the cubic LR↑, a
        regression prior, cell-level features from the image) can be computed for one tile.  Returns the field
        and the window's offset ``(dr, dc)`` inside it.  Cell-level features the source already holds are
        cropped along (``extra['cell_features']``)."""
        s = int(self.scale)
        hL, wL = self.lr.shape[1:]
        c = max(0, int(context_lr))
        a0, b0 = max(r0 // s - c, 0), max(c0 // s - c, 0)
        a1, b1 = min(-(-(r0 + h) // s) + c, hL), min(-(-(c0 + w) // s) + c, wL)
        A = np.asarray(self.hr_affine, float) @ np.array([[1, 0, b0 * s], [0, 1, a0 * s], [0, 0, 1]], float)
        extra = {k: v for k, v in (getattr(self, "extra", None) or {}).items() if k in PLACEMENT_KEYS}
        extra["hr_affine"] = A
        F = self._cell_features()
        if F is not None:
            extra["cell_features"] = np.asarray(F[:, a0 * s:a1 * s, b0 * s:b1 * s], np.float32)
        fld = SRField(name=f"{self.name}[{r0}:{r0 + h},{c0}:{c0 + w}]", genes=list(self.genes), scale=s,
                      lr=np.asarray(self.lr[:, a0:a1, b0:b1]), lr_mask=np.asarray(self.lr_mask[a0:a1, b0:b1]),
                      hr=None, hr_mask=np.asarray(self.hr_mask[a0 * s:a1 * s, b0 * s:b1 * s]),
                      he=np.zeros((3, 0, 0), np.float32), he_per_hr=int(self.he_per_hr), hr_um=float(self.hr_um),
                      gene_scale=np.asarray(self.gene_scale), um_per_px=float(getattr(self, "um_per_px", 1.0)),
                      extra=extra)
        return fld, (r0 - a0 * s, c0 - b0 * s)

    def _cell_features(self):
        """Cell-level features (F, H, W) the source holds for the whole section, or None (computed per tile)."""
        return None

    def cond_tile(self, r0: int, c0: int, h: int, w: int, upsample: str = "cubic") -> dict:
        """Numpy condition of one window: ``lr_up`` (G, h, w) in [-1, 1], ``lr_mask`` / ``hr_mask`` (1, h, w),
        ``he`` (3, h·k, w·k) in [0, 1] — the same values :func:`napari_diffst.pipeline.cond_from_field` gives
        for that window of the whole field (up to the LR context margin)."""
        s = self.scale
        lr_up = _upsample_crop(self.lr, self.lr_mask, s, r0, c0, h, w, upsample) * 2 - 1
        lm = np.repeat(np.repeat(self.lr_mask.astype(np.float32), s, 0), s, 1)
        return {"lr_up": lr_up.astype(np.float32),
                "lr_mask": _crop(lm[None], r0, c0, h, w),
                "hr_mask": _crop(self.hr_mask.astype(np.float32)[None], r0, c0, h, w),
                "he": self.he_tile(r0, c0, h, w)}


class FieldSource(TileSource):
    """Tiles of an in-memory :class:`~napari_diffst.data.pairs.SRField` (its H&E raster already sampled)."""

    def __init__(self, fld: SRField, sample=None):
        self.field = fld
        self.sample = sample
        self._take(fld)
        self.extra = {k: v for k, v in fld.extra.items() if k in SOURCE_KEYS}

    def he_tile(self, r0, c0, h, w):
        k = self.he_per_hr
        return _crop(self.field.he, r0 * k, c0 * k, h * k, w * k)

    def _cell_features(self):
        return self.field.extra.get("cell_features")


class SlideSource(TileSource):
    """A section read lazily: LR maps and masks from :func:`~napari_diffst.data.grids.make_field`
    (``with_he=False``; ``mode='native'`` super-resolves the observed spots), the H&E of each window
    sampled from the image on demand (:func:`~napari_diffst.data.grids.sample_image`)."""

    def __init__(self, sample, fld: SRField):
        self.sample = sample
        self._take(fld)
        # H&E pixel (col, row) → spot-frame px (sample_image applies sample.transform on top)
        T = np.asarray(sample.transform, float)
        self._A_he_spot = np.linalg.inv(T) @ np.asarray(fld.extra["he_affine"], float)
        self.extra = {k: v for k, v in fld.extra.items() if k in SOURCE_KEYS}

    @classmethod
    def from_sample(cls, sample, genes: Sequence[str], scale: int, *, gene_scale=None, mode: str = "native",
                    he_per_hr: int | None = None, he_um_per_px: float | None = None, **kw) -> "SlideSource":
        from .data.grids import make_field

        fld = make_field(sample, genes, scale, mode=mode, gene_scale=gene_scale, he_per_hr=he_per_hr,
                         he_um_per_px=he_um_per_px, with_he=False, **kw)
        fld.he = np.zeros((3, 0, 0), np.float32)  # never materialise the slide-sized H&E raster
        return cls(sample, fld)

    def output_mask(self) -> np.ndarray:
        """The map's shown extent: :func:`~napari_diffst.data.grids.display_mask` (follows the tissue)."""
        from .data.grids import display_mask

        return display_mask(self.sample, self)

    def he_tile(self, r0, c0, h, w):
        from .data.grids import sample_image

        k = self.he_per_hr
        shift = np.array([[1, 0, c0 * k], [0, 1, r0 * k], [0, 0, 1]], float)
        if self.sample.image is None:
            return np.zeros((3, h * k, w * k), np.float32)
        return sample_image(self.sample, self._A_he_spot @ shift, (h * k, w * k))


# ------------------------------------------------------------------------------------------ plan: tiled or not
def untiled_mb(hr_shape: tuple[int, int], n_genes: int, he_per_hr: int, n_samples: int) -> float:
    """MiB of the rasters an untiled run holds at once (float32): the H&E raster (3 × H·k × W·k) and the
    maps (condition, running sums, mean and std of ``n_samples`` samples: ~(2·n_samples + 4) × G × H × W)."""
    H, W = int(hr_shape[0]), int(hr_shape[1])
    k = int(he_per_hr)
    return 4.0 * (3.0 * H * k * W * k + (2 * int(n_samples) + 4) * int(n_genes) * H * W) / 2 ** 20


def untiled_budget_mb() -> float:
    """The memory budget of untiled sampling: the H&E raster :func:`~napari_diffst.data.grids.make_field` agrees
    to build (:data:`~napari_diffst.data.grids.MAX_HE_VALUES` float32 values, 192 MiB)."""
    from .data.grids import MAX_HE_VALUES

    return 4.0 * MAX_HE_VALUES / 2 ** 20


#: Largest in-memory result of a tiled run (mean + std maps and their display copies, MiB); above it only
#: streaming to OME-Zarr (``napari-diffst sample … --out maps.ome.zarr``) can hold the maps.
IN_MEMORY_MAPS_MB = 4096.0


def auto_tile(he_per_hr: int) -> tuple[int, int]:
    """Tile side and overlap (HR px) for automatic tiling: each tile's H&E at most ~2048² px, tiles of
    16–256 HR px in steps of 16, a quarter of the tile as overlap (64 / 16 at 32 H&E px per HR px)."""
    t = (2048 // max(1, int(he_per_hr))) // 16 * 16
    t = int(min(256, max(16, t)))
    return t, t // 4


@dataclass
class SamplingPlan:
    """How a section is sampled: untiled (one field, H&E raster in memory) or tiled (:class:`SlideSource`)."""

    tiled: bool
    auto: bool                 # tiled because the untiled rasters exceed the budget (not asked for)
    tile: int
    overlap: int
    hr_shape: tuple[int, int]
    hr_um: float
    untiled_mb: float
    budget_mb: float
    mode: str
    field: SRField             # the section's field without H&E (LR maps, masks, placement)
    sample: object = None

    @property
    def n_tiles(self) -> int:
        if not self.tiled:
            return 1
        return plan_tiles(self.hr_shape, self.tile, self.overlap, mask=self.field.hr_mask).n_tiles

    def source(self) -> "SlideSource":
        """The lazy tile source (H&E read per tile)."""
        return SlideSource(self.sample, self.field)

    def describe(self) -> str:
        """One line for progress text and logs."""
        H, W = self.hr_shape
        if not self.tiled:
            return f"untiled ({H}×{W} px, {self.untiled_mb:.0f} MiB ≤ {self.budget_mb:.0f} MiB budget)"
        why = (f"tiled automatically: the untiled rasters would take {_fmt_mb(self.untiled_mb)} > "
               f"{_fmt_mb(self.budget_mb)} budget" if self.auto else "tiled")
        return f"{why}; {self.n_tiles} tiles of {self.tile} px (overlap {self.overlap}) over {H}×{W} px"


def _fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def plan_sampling(sample, genes: Sequence[str], scale: int, *, gene_scale=None, mode: str = "native",
                  he_per_hr: int, n_samples: int = 4, tile: int = 0, overlap: int | None = None,
                  budget_mb: float | None = None, in_memory: bool = False) -> SamplingPlan:
    """Decide how to sample a section: untiled when its rasters fit ``budget_mb`` (default
    :func:`untiled_budget_mb`), else tiled automatically (:func:`auto_tile`); ``tile > 0`` always tiles.

    Builds the section's field **without** H&E (cheap: spots, lattice, masks) to know the HR grid. A
    tiled run super-resolves the observed spots (``'truth'`` becomes ``'native'``). With ``in_memory``
    (the dock: maps kept as layers) a result larger than :data:`IN_MEMORY_MAPS_MB` raises a one-line
    :class:`~napari_diffst.errors.DataFormatError` — the only case that really cannot be done there."""
    from .data.grids import make_field

    budget = untiled_budget_mb() if budget_mb is None else float(budget_mb)
    G = len(list(genes))

    def bare(m):
        fld = make_field(sample, genes, scale, mode=m, gene_scale=gene_scale, he_per_hr=he_per_hr, with_he=False)
        fld.he = np.zeros((3, 0, 0), np.float32)  # never materialise the slide-sized H&E raster here
        return fld

    fld = bare(mode)
    need = untiled_mb(fld.hr_shape, G, he_per_hr, n_samples)
    tiled = int(tile or 0) > 0 or need > budget
    auto = tiled and not int(tile or 0) > 0
    if not tiled:
        return SamplingPlan(False, False, 0, 0, fld.hr_shape, fld.hr_um, need, budget, mode, fld, sample)
    if mode == "truth":
        mode = "native"
        fld = bare(mode)
    if int(tile or 0) > 0:
        t = int(tile)
        ov = int(min(16, t // 4) if overlap is None else overlap)
    else:
        t, ov = auto_tile(he_per_hr)
        if overlap is not None:
            ov = min(int(overlap), t - 1)
    H, W = fld.hr_shape
    maps_mb = 4.0 * 4 * G * H * W / 2 ** 20  # mean + std, and their masked display copies
    if in_memory and maps_mb > IN_MEMORY_MAPS_MB:
        raise DataFormatError(None, f"the {int(scale)}× maps of {G} genes on a {H}×{W} px grid would take "
                              f"{_fmt_mb(maps_mb)} in memory (limit {_fmt_mb(IN_MEMORY_MAPS_MB)})",
                              "a lower scale or fewer genes, or the CLI, which streams tiles to disk: "
                              "napari-diffst sample … --out maps.ome.zarr")
    return SamplingPlan(True, auto, t, ov, fld.hr_shape, fld.hr_um, need, budget, mode, fld, sample)


# ------------------------------------------------------------------------------------------ sampling
@dataclass
class TiledResult:
    """Output of a tiled run: in memory (``mean``/``std`` in model units, 0 outside tissue) or the OME-Zarr
    ``path`` (log1p CP10k, NaN outside tissue; the genes, then one 'uncertainty' channel per gene)."""

    genes: list
    hr_um: float
    hr_shape: tuple[int, int]
    gene_scale: np.ndarray
    n_tiles: int
    steps: int
    n_samples: int
    seconds: float
    denoiser_calls: int
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    path: Path | None = None
    report: dict | None = None
    projection: dict | None = None

    def expression(self) -> np.ndarray:
        if self.mean is None:
            raise ValueError("the maps were written to OME-Zarr; read them with napari_diffst.io.read_maps")
        return self.mean * np.asarray(self.gene_scale, np.float32)[:, None, None]


def super_resolve_tiled_iter(model, source: TileSource, *, tile: int = 64, overlap: int = 16, steps: int = 20,
                             n_samples: int = 2, seed: int = 0, sampler: str = "ddpm", eta: float = 0.0,
                             batch_tiles: int = 4, out: str | Path | None = None, ngff_version: str = "0.4",
                             device=None, amp: bool | str = "auto", upsample: str | None = None,
                             with_std: bool = True, should_stop=None, noise: str = "position",
                             project: bool | str = "auto", report: bool | str = "auto",
                             self_check: dict | None = None) -> Iterator[dict]:
    """Generator: super-resolve ``source`` tile by tile. Yields after every reverse step
    ``{'done', 'total', 'tiles_done', 'n_tiles', 'i', 'n_steps', 'bboxes'}`` (cancel by stopping the iteration
    or with ``should_stop()``; an OME-Zarr target is then left untouched), and finally ``{'result': TiledResult}``.

    ``out``: an OME-Zarr path → tiles are blended into the store (memory bounded by the tile batch); None →
    in-memory maps (G, H, W). ``batch_tiles`` windows × ``n_samples`` samples share one sampler call.
    ``noise``: ``'position'`` (default; one noise field locked to slide positions, shared by overlapping tiles)
    or ``'tile'`` (independent noise per tile — only for measuring what the shared field buys).

    ``model``: the network, or a :class:`napari_diffst.method.DiffST` — then every tile runs the method as the
    untiled :meth:`~napari_diffst.method.DiffST.iter_predict` does: its base map (the prior) from
    :meth:`~napari_diffst.method.DiffST.prepare_tile` is the tile's condition / residual base, and the shrink
    ``base + α·(mean − base)`` (std × α) is applied to the tile's mean before blending.  A DiffST without a
    prior and with α = 1 (a version-1 checkpoint) samples exactly as the bare network.

    ``project``: make the blended maps true to the spots (``'auto'``: a DiffST on a native source, as the untiled
    ``iter_predict``), band by band (:func:`napari_diffst.spot_consistency.project_bands`, memory by the band) in
    the store or in memory, before the pyramid is built.  ``report``: the spot report of the result
    (:func:`napari_diffst.spot_consistency.spot_report`, with the raw blend's figures under
    ``'before_projection'``) in ``TiledResult.report`` and the OME-Zarr metadata; it needs the maps whole, so
    ``'auto'`` = only in memory.  ``self_check``: a :meth:`~napari_diffst.method.DiffST.self_check` result — its
    per-gene β is applied per tile as untiled (``cubic + β·(map − cubic)``, std × β) and it goes into the report
    and the metadata."""
    import torch

    from .diffusion.samplers import diffusion_for_model, sample_progressive
    from .diffusion.schedule import to_model_units

    method = model if hasattr(model, "prepare_tile") else None
    if method is not None:
        model = method.model_
        if model is None:
            raise RuntimeError(f"{method.name}: call fit() or DiffST.load() before sampling")
    alpha = float(method.alpha_) if method is not None else 1.0
    beta = None if not (self_check or {}).get("beta") else np.asarray(self_check["beta"], np.float32)[:, None, None]
    block = np.asarray([k == "block" for k in ((self_check or {}).get("base") or [])], bool)
    G = source.G
    if G != model.config.get("n_genes", G):
        raise DataFormatError(None, f"the model was trained for {model.config['n_genes']} genes, the data has {G}",
                              "the checkpoint's gene panel")
    if int(model.config.get("he_per_hr", source.he_per_hr)) != source.he_per_hr:
        raise DataFormatError(None, f"the model expects {model.config['he_per_hr']} H&E px per HR px, the slide "
                              f"source has {source.he_per_hr}", "the checkpoint's he_per_hr")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if amp == "auto":
        amp = device.type == "cuda"
    if upsample is None:
        upsample = (model.config.get("diffusion") or {}).get("upsample", "nearest")
    model.eval()
    diffusion = diffusion_for_model(model)
    if steps and steps < diffusion.num_timesteps:
        diffusion = diffusion.respace(int(steps))
    n = diffusion.num_timesteps
    M = max(1, int(n_samples))
    H, W = source.hr_shape
    plan = plan_tiles((H, W), tile, overlap, mask=source.hr_mask, multiple=getattr(model, "pad_multiple", 1))
    th, tw = plan.tile
    bt = max(1, int(batch_tiles))
    batches = [plan.tiles[i:i + bt] for i in range(0, plan.n_tiles, bt)]
    total = n * len(batches)
    if noise not in ("position", "tile"):
        raise ValueError(f"noise must be 'position' or 'tile', not {noise!r}")
    pnoise = PositionNoise(seed, G)

    def crop_noise(m, i, r0, c0, h, w):
        if noise == "position":
            return pnoise.crop(m, i, r0, c0, h, w)
        return PositionNoise(int(seed) * 1000003 + r0 * 7919 + c0 * 104729, G).crop(m, i, 0, 0, h, w)
    t_start = time.perf_counter()

    writer = None
    mean_acc = std_acc = None
    if out is not None:
        from .data.grids import index_affine_um
        from .io.writers import OmeZarrWriter

        A, um_px = source.hr_affine, float(getattr(source, "um_per_px", 1.0))
        writer = OmeZarrWriter(out, (G * (2 if with_std else 1), H, W), source.genes, None,
                               affine_um=index_affine_um(A, um_px),
                               extra_channels=["uncertainty"] if with_std else [], ngff_version=ngff_version,
                               chunks=(1, 256, 256),
                               metadata={"source": source.name, "scale": source.scale, "steps": n,
                                         "n_samples": M, "tile": [th, tw], "overlap": plan.overlap,
                                         "gene_scale": [float(x) for x in source.gene_scale],
                                         "hr_affine_px": np.asarray(A).tolist(), "um_per_px_fullres": um_px,
                                         "units": "log1p(CP10k)"})
    else:
        mean_acc = np.zeros((G, H, W), np.float32)
        std_acc = np.zeros((G, H, W), np.float32) if with_std else None
    gs = np.asarray(source.gene_scale, np.float32)[:, None, None]
    out_mask = source.output_mask() if writer is not None else None
    done = 0
    calls = 0
    finished = False
    try:
        with torch.no_grad():
            for bi, batch in enumerate(batches):
                boxes = [plan.bbox(t) for t in batch]
                conds = [source.cond_tile(r0, c0, h, w, upsample) for r0, c0, h, w in boxes]
                bases = [method.prepare_tile(source, *b) if method is not None else None for b in boxes]
                for c, b in zip(conds, bases):
                    if b is not None and upsample == "cubic":  # as cond_from_field: the base is the cubic LR↑
                        c["lr_up"] = (b * 2 - 1).astype(np.float32)
                # rows: tile-major, M samples per tile
                cond = {key: torch.from_numpy(np.stack([c[key] for c in conds for _ in range(M)])).to(device)
                        for key in conds[0]}
                rows = len(boxes) * M

                def noise_fn(i, shape, boxes=boxes):
                    arr = np.stack([crop_noise(m, i, r0, c0, h, w) for (r0, c0, h, w) in boxes for m in range(M)])
                    return torch.from_numpy(arr)

                x, last_i = None, -1
                for st in sample_progressive(model, (rows, G, th, tw), cond, diffusion, sampler=sampler, eta=eta,
                                             device=device, amp=amp, noise_fn=noise_fn, should_stop=should_stop):
                    done += 1
                    calls += 1
                    x, last_i = st["x_t"], st["i"]
                    yield {"done": done, "total": total, "tiles_done": bi * bt, "n_tiles": plan.n_tiles,
                           "i": st["i"], "n_steps": n, "bboxes": boxes}
                if x is None or last_i != n - 1:
                    raise CancelledError("tiled super-resolution cancelled")
                v = to_model_units(x).double().cpu().numpy().reshape(len(boxes), M, G, th, tw)
                mu = v.mean(axis=1)
                sd = v.std(axis=1) if with_std else None
                for k, t in enumerate(batch):
                    r0, c0, h, w = boxes[k]
                    wgt = plan.weight(t)
                    hm = source.hr_mask[r0:r0 + h, c0:c0 + w]
                    mu_k, sd_k = mu[k], (sd[k] if with_std else None)
                    if bases[k] is not None and alpha != 1.0:  # the method's shrink, as DiffST.iter_predict
                        mu_k = mu_k.astype(np.float32)
                        mu_k = bases[k] + alpha * (mu_k - bases[k])
                        sd_k = sd_k * alpha if with_std else None
                    if beta is not None:  # the self-check's share of the histology's detail, as untiled
                        fb = _upsample_crop(source.lr, source.lr_mask, source.scale, r0, c0, h, w,
                                            "cubic").astype(np.float32)
                        if block.any():  # genes falling back on the spots' block copy
                            fb[block] = _upsample_crop(source.lr, source.lr_mask, source.scale, r0, c0, h, w,
                                                       "nearest").astype(np.float32)[block]
                        mu_k = fb + beta * (np.asarray(mu_k, np.float32) - fb)
                        sd_k = sd_k * beta if with_std else None
                    tile_mu = (mu_k * wgt).astype(np.float32)
                    tile_sd = (sd_k * wgt).astype(np.float32) if with_std else None
                    if writer is not None:  # the OME-Zarr holds expression units, NaN outside tissue
                        hm = out_mask[r0:r0 + h, c0:c0 + w]
                        tile_mu *= gs
                        tile_mu[:, ~hm] = np.nan
                        writer.add_tile(r0, c0, tile_mu, channels=slice(0, G))
                        if with_std:
                            tile_sd *= gs
                            tile_sd[:, ~hm] = np.nan
                            writer.add_tile(r0, c0, tile_sd, channels=slice(G, 2 * G))
                    else:
                        mean_acc[:, r0:r0 + h, c0:c0 + w] += tile_mu * hm
                        if with_std:
                            std_acc[:, r0:r0 + h, c0:c0 + w] += tile_sd * hm
        if project == "auto":
            project = method is not None and (getattr(source, "extra", None) or {}).get("mode") == "native"
        if report == "auto":
            report = bool(project) and writer is None
        rep = _project_tiled(source, writer, mean_acc, gs, bool(project), bool(report))
        if self_check:
            rep = dict(rep or {})
            rep["self_check"] = self_check
            if rep.get("spot_report") is not None:
                rep["spot_report"]["self_check"] = self_check
        if writer is not None and rep is not None:
            # where the untiled `sample` keeps them: read_maps(path).metadata['napari_diffst'][...]
            writer.metadata = dict(writer.metadata or {}, napari_diffst=rep)
        path = writer.close() if writer is not None else None
        finished = True
    finally:
        if writer is not None and not finished:
            writer.abort()
    res = TiledResult(list(source.genes), float(source.hr_um), (H, W), np.asarray(source.gene_scale), plan.n_tiles,
                      n, M, time.perf_counter() - t_start, calls, mean_acc, std_acc, path,
                      (rep or {}).get("spot_report"), (rep or {}).get("projection"))
    yield {"result": res}


def _project_tiled(source, writer, mean_acc, gs, project: bool, report: bool) -> dict | None:
    """The blended maps (in the store or in memory) projected onto the source's spots band by band, and their
    spot report: ``{'projection': ..., 'spot_report': ...}`` (what was done), or None."""
    if not (project or report):
        return None
    ex = getattr(source, "extra", None) or {}
    if "spot_hr_cr" not in ex:
        raise DataFormatError(None, f"{source.name}: no spot geometry to project onto or report against",
                              "a native source (the section's spots as its LR)")
    from .spot_consistency import project_bands, spot_disks, spot_report

    G = len(source.genes)
    hm = np.asarray(source.hr_mask, bool)
    if writer is not None:  # expression units, NaN outside the shown mask
        def read(r0, r1):
            return writer.read_rows(r0, r1, slice(0, G))

        def write(r0, t):
            writer.write_tile(r0, 0, t, channels=slice(0, G))
    else:  # model units, 0 outside the HR mask; the report and projection count only the tissue (shown) pixels
        om = getattr(source, "output_mask", None)
        hm = hm & np.asarray(om(), bool) if callable(om) else hm

        def read(r0, r1):
            return np.where(hm[None, r0:r1], mean_acc[:, r0:r1] * gs, np.nan)

        def write(r0, t):
            mean_acc[:, r0:r0 + t.shape[1]] = np.where(np.isfinite(t), t / gs, 0.0)

    out, disks, before = {}, None, None
    if report:
        disks = spot_disks(source)
        before = spot_report(read(0, source.hr_shape[0]), source, disks=disks)
    if project:
        out["projection"] = project_bands(read, write, source)
    if report:
        rep = spot_report(read(0, source.hr_shape[0]), source, disks=disks)
        if project:
            rep["projection"] = out["projection"]
            rep["before_projection"] = {k: before[k] for k in before if k != "per_gene"}
        out["spot_report"] = rep
    return out


def super_resolve_tiled(model, source: TileSource, **kw) -> TiledResult:
    """Run :func:`super_resolve_tiled_iter` to the end."""
    res = None
    for ev in super_resolve_tiled_iter(model, source, **kw):
        res = ev.get("result", res)
    if res is None:
        raise CancelledError("tiled super-resolution did not finish")
    return res
