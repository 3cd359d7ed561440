"""Baselines for histology-guided ST super-resolution, all on :class:`~napari_diffst.data.pairs.SRField`.

Every baseline is a class with

* ``fit(train_fields, val_field=None, seed=0, budget='quick') -> self`` — ``budget`` is ``'tiny'``
  (tests), ``'quick'`` (about 1.5 min of training on 2 CPU cores), ``'full'``, or a dict
  overriding entries of the class's ``BUDGETS`` table (unset entries come from ``'quick'``).  Budgets
  count optimiser steps and samples, never seconds: training always runs its ``steps`` and the
  learning-rate schedule follows the step count, so a seed gives the same model at any machine load.
  After ``fit`` each learned baseline has ``trained_steps_`` (total optimiser steps run);
* ``predict(field) -> (G, H, W)`` float32 in model units on the field's HR grid (``H = h·s`` with
  ``s = field.scale``).  Pixels outside ``field.hr_mask`` are set to 0 (``mask_output=True``).

and is registered in :data:`BASELINES` under ``nearest``, ``bicubic``, ``tesla``, ``istar``, ``unet``,
``histosge``.

``nearest``  block copy of the LR (the LR input itself on the HR grid).
``bicubic``  cubic B-spline interpolation at HR pixel centres, edge-aware: LR pixels outside tissue are
             first filled with the nearest in-tissue value so the tissue border does not bleed zeros.
             ``consistent=True`` adds iterative back-projection (Irani & Peleg 1991) so the SR map's
             masked block means reproduce the LR.
``tesla``    TESLA-style imputation (Hu et al., Cell Systems 2023): each HR pixel is a weighted mean of
             its ``k`` nearest in-tissue LR spots (LR pixel centres, found with ``cKDTree``), with weights
             ``exp(−d²/2)`` where ``d² = |Δxy|²/(ℓ·s)² + λ·|Δrgb|²/σ²_rgb`` mixes spatial distance (ℓ in LR
             pitches) and the distance of mean H&E colour (pixel vs tissue under the spot; σ_rgb = pooled
             std of in-tissue pixel colour, so λ is dimensionless).  λ = 0 is pure Gaussian spatial
             interpolation.  ``fit`` picks λ from a small grid on training fields with HR truth.
``istar``    iStar-style (Zhang et al., Nat Biotechnol 2024): handcrafted per-HR-pixel histology features
             (mean/std RGB, H&E stain (``rgb2hed``) means, gradient energy, |Laplacian|; at the pixel and
             Gaussian-blurred context at σ = s and 2s HR pixels), standardised on the training fields,
             into a small MLP trained by **weak supervision**: the mean of its predictions over the
             in-tissue HR pixels of each LR pixel must match the LR value (MSE).  An ensemble of seeds is
             averaged.  Like iStar, which trains on the section it predicts, ``transductive=True``
             fine-tunes each member on the target field's own LR (its input) before predicting.
``unet``     supervised U-Net regression: inputs edge-aware bicubic LR↑, LR mask↑ and H&E through a
             stride-``k`` conv stem (k = ``he_per_hr``); predicts a residual on LR↑; masked L1 loss on
             :func:`~napari_diffst.data.pairs.random_patches` of training fields with HR truth.
``histosge`` HisToSGE-style (Shi et al. 2024) spot-level regressor, supervised: each HR pixel ("spot") is
             described by the handcrafted histology features of :func:`histology_features` pooled over
             its H&E pixels plus their blurred context; a feature-learning module (a token per spot in
             the ``(2r+1)²`` neighbourhood with a learned position embedding, multi-head attention from
             the centre spot over its in-tissue neighbours) and an MLP with residual blocks regress the
             spot's expression.  Like ``unet`` it predicts a **residual on the edge-aware cubic LR↑**
             (the centre pixel's LR↑ values are an input too); trained with MSE on in-tissue HR pixels
             of training fields with HR truth, the best validation-PCC state kept, an ensemble of seeds
             averaged, and the residual scaled by a least-squares factor α ∈ [0, 1] fitted on the
             validation field.  (HisToSGE embeds spot crops with a pathology foundation model; no such weights
             are used here.)

Torch models use the process's torch thread setting; pass ``num_threads`` to set it explicitly.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
from scipy import ndimage as ndi

from .errors import DataFormatError

__all__ = [
    "Baseline",
    "Nearest",
    "Bicubic",
    "TeslaStyle",
    "IStarStyle",
    "UNetBaseline",
    "HisToSGEStyle",
    "BASELINES",
    "make_baseline",
    "fill_lr",
    "cubic_upsample",
    "hr_colour",
    "histology_features",
    "field_modality",
]


# ------------------------------------------------------------------------------------------ helpers
# LR → HR upsampling has one home (napari_diffst.data.upsample); re-exported here for the baselines' users
from .data.upsample import cubic_upsample, fill_lr  # noqa: E402


def _masked_block_mean(x: np.ndarray, s: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    G, H, W = x.shape
    h, w = H // s, W // s
    m = mask.astype(np.float64)
    cnt = m.reshape(h, s, w, s).sum(axis=(1, 3))
    tot = (x * m).reshape(G, h, s, w, s).sum(axis=(2, 4))
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0), cnt


def _check_field(field, genes=None) -> None:
    s = int(field.scale)
    G, h, w = field.lr.shape
    if field.hr_mask.shape != (h * s, w * s):
        raise DataFormatError(None, f"field {field.name!r}: hr_mask {field.hr_mask.shape} is not LR {h}×{w} × scale {s}",
                              "hr_mask of shape (h·s, w·s)")
    k = int(field.he_per_hr)
    if field.he.shape != (3, h * s * k, w * s * k):
        raise DataFormatError(None, f"field {field.name!r}: he {field.he.shape} does not match HR grid × he_per_hr={k}",
                              f"he of shape (3, {h * s * k}, {w * s * k})")
    if genes is not None and list(field.genes) != list(genes):
        raise DataFormatError(None, f"field {field.name!r} has genes {list(field.genes)[:5]}… but the baseline was "
                              f"fitted on {list(genes)[:5]}…", "the same gene panel in the same order")


def hr_colour(field) -> np.ndarray:
    """Mean H&E RGB over each HR pixel's ``k × k`` block: (H, W, 3)."""
    k = int(field.he_per_hr)
    he = np.asarray(field.he, np.float32)
    C, Hk, Wk = he.shape
    return he.reshape(C, Hk // k, k, Wk // k, k).mean(axis=(2, 4)).transpose(1, 2, 0)


def field_modality(field, modality: str | None = None) -> str:
    """'brightfield' or 'fluorescence' for a field's image: ``modality`` when given, else the field's
    ``extra['modality']`` (set from the image by the field makers), else detected on the field's own image."""
    from .data.fluorescence import detect_modality

    m = modality or (field.extra or {}).get("modality")
    if m in ("brightfield", "fluorescence"):
        return m
    if m is not None:
        raise ValueError(f"modality must be 'brightfield' or 'fluorescence', not {m!r}")
    return detect_modality(np.asarray(field.he, np.float32).transpose(1, 2, 0))


def _fluor_base_maps(he: np.ndarray, k: int, threshold: float | None) -> list:
    """11 per-HR-pixel maps of a fluorescence field image (C, H·k, W·k) in [0, 1] (channel 0 nuclear, 1 second
    stain): nuclear mean/std, second-stain mean/std, nuclear-pixel fraction (above ``threshold``, else the Otsu
    threshold of this image), nuclear intensity inside nuclei, second stain outside them, gradient energy,
    |Laplacian|, DoG energies (1–2 and 2–4 image pixels) of the nuclear channel."""
    from skimage.filters import threshold_otsu

    C, Hk, Wk = he.shape
    H, W = Hk // k, Wk // k
    dapi, poly = he[0], he[1]
    if threshold is None:
        threshold = float(threshold_otsu(dapi)) if float(dapi.max()) > float(dapi.min()) else 0.5
    ds = ndi.gaussian_filter(dapi, 0.5) if k > 1 else dapi
    nuc = (ds > threshold).astype(np.float32)
    grad = ndi.sobel(ds, 0) ** 2 + ndi.sobel(ds, 1) ** 2
    lap = np.abs(ndi.laplace(ds))
    b1, b2, b4 = (ndi.gaussian_filter(dapi, v) for v in (1.0, 2.0, 4.0))

    def bm(a):
        return a.reshape(H, k, W, k).mean(axis=(1, 3))

    nf = bm(nuc)
    has = nf > 1e-2
    return [bm(dapi), np.sqrt(np.maximum(bm(dapi ** 2) - bm(dapi) ** 2, 0)), bm(poly),
            np.sqrt(np.maximum(bm(poly ** 2) - bm(poly) ** 2, 0)), nf,
            np.where(has, bm(dapi * nuc) / np.maximum(nf, 1e-3), 0.0), bm(poly * (1 - nuc)), bm(grad), bm(lap),
            bm(np.abs(b1 - b2)), bm(np.abs(b2 - b4))]


def histology_features(field, context_sigmas: tuple = (1.0, 2.0), modality: str | None = None) -> np.ndarray:
    """Handcrafted per-HR-pixel histology features (F, H, W), iStar-style.

    Brightfield (H&E), per pixel (over its k×k H&E block): mean RGB (3), std RGB (3), mean H/E/D stain densities
    from :func:`skimage.color.rgb2hed` (3), gradient energy (Sobel² of grey, 1), |Laplacian| of grey (1).
    Fluorescence (DAPI/PolyT; :func:`field_modality` decides, ``modality`` overrides): 11 stain-intensity maps
    instead (:func:`_fluor_base_maps`: nuclear and second-stain mean/std, nuclear fraction, …; no colour
    deconvolution), the nuclear threshold from ``field.extra['nuclear_threshold']`` when the field maker set it.
    Context: the same 11 maps Gaussian-blurred on the HR grid at σ = ``c · s`` for each ``c`` in
    ``context_sigmas`` (s = LR scale)."""
    from skimage.color import rgb2hed

    k, s = int(field.he_per_hr), int(field.scale)
    he = np.clip(np.asarray(field.he, np.float32), 0, 1)
    C, Hk, Wk = he.shape
    H, W = Hk // k, Wk // k
    if field_modality(field, modality) == "fluorescence":
        base = np.stack(_fluor_base_maps(he, k, (field.extra or {}).get("nuclear_threshold"))).astype(np.float32)
        feats = [base]
        for c in context_sigmas:
            feats.append(np.stack([ndi.gaussian_filter(m, c * s, mode="nearest") for m in base]))
        return np.concatenate(feats).astype(np.float32)
    rgb = he.transpose(1, 2, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hed = rgb2hed(rgb).transpose(2, 0, 1).astype(np.float32)
    grey = rgb.mean(axis=2)
    gs = ndi.gaussian_filter(grey, 0.7) if k > 1 else grey
    grad = ndi.sobel(gs, 0) ** 2 + ndi.sobel(gs, 1) ** 2
    lap = np.abs(ndi.laplace(gs))

    def bm(a):
        return a.reshape(H, k, W, k).mean(axis=(1, 3))

    maps = [bm(he[c]) for c in range(3)]
    maps += [np.sqrt(np.maximum(bm(he[c] ** 2) - bm(he[c]) ** 2, 0)) for c in range(3)]
    maps += [bm(hed[c]) for c in range(3)]
    maps += [bm(grad), bm(lap)]
    base = np.stack(maps).astype(np.float32)
    feats = [base]
    for c in context_sigmas:
        feats.append(np.stack([ndi.gaussian_filter(m, c * s, mode="nearest") for m in base]))
    return np.concatenate(feats).astype(np.float32)


def _supervised_fields(train_fields, message: str) -> tuple[list, list]:
    """The training fields with HR truth (ValueError ``message`` when none) and their shared gene list."""
    fields = [f for f in train_fields if f.hr is not None]
    if not fields:
        raise ValueError(message)
    genes = list(fields[0].genes)
    for f in fields:
        _check_field(f, genes)
    return fields, genes


def _resolve_budget(table: dict, budget) -> dict:
    if isinstance(budget, dict):
        out = dict(table["quick"])
        out.update(budget)
        return out
    if budget not in table:
        raise ValueError(f"unknown budget {budget!r}; use one of {sorted(table)} or a dict")
    return dict(table[budget])


def _lr_factor(step: int, steps: int, warmup: float = 0.05) -> float:
    """Warm-up + cosine learning-rate factor on the step fraction ``step / steps`` (no clock)."""
    prog = min(step / max(steps, 1), 1.0)
    if prog < warmup:
        return max(prog / warmup, 0.05)
    return 0.5 * (1 + np.cos(np.pi * (prog - warmup) / (1 - warmup))) * 0.98 + 0.02


class _BestOnVal:
    """The model state with the best validation score seen so far (``update``), put back by ``restore``."""

    def __init__(self):
        self.score, self.state = -np.inf, None

    def update(self, score: float, model) -> None:
        if score > self.score:
            self.score, self.state = score, copy.deepcopy(model.state_dict())

    def restore(self, model) -> float | None:
        """Load the best state into ``model``; its score, or None when nothing was validated."""
        if self.state is None:
            return None
        model.load_state_dict(self.state)
        return float(self.score)


def _set_threads(n):
    if n:
        import torch

        torch.set_num_threads(int(n))


# --------------------------------------------------------------------------------------- baselines
class Baseline:
    """Common interface: ``fit`` (no-op by default) and ``predict``."""

    name = "baseline"
    needs_hr_truth = False

    def __init__(self, mask_output: bool = True):
        self.mask_output = mask_output

    def fit(self, train_fields=(), val_field=None, seed: int = 0, budget="quick"):
        return self

    def predict(self, field) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish(self, pred: np.ndarray, field) -> np.ndarray:
        pred = np.asarray(pred, np.float32)
        if pred.shape != (field.G,) + tuple(field.hr_shape):
            raise RuntimeError(f"{self.name}: prediction {pred.shape} not on the HR grid {field.hr_shape}")
        if self.mask_output:
            pred = pred * np.asarray(field.hr_mask, np.float32)[None]
        return pred

    def __repr__(self):
        return f"{type(self).__name__}()"


class Nearest(Baseline):
    """Block copy: every HR pixel takes its LR pixel's value."""

    name = "nearest"

    def predict(self, field) -> np.ndarray:
        _check_field(field)
        return self._finish(field.lr_upsampled(0), field)


class Bicubic(Baseline):
    """Edge-aware cubic spline interpolation (see :func:`cubic_upsample`).

    ``consistent=True``: iterative back-projection, ``x ← x + up(LR − blockmean(x))`` for ``n_iter``
    iterations (``up`` = the same cubic upsampling, block means over in-tissue HR pixels), which
    drives the aggregate of the SR map towards the LR input without block artefacts."""

    name = "bicubic"

    def __init__(self, consistent: bool = False, n_iter: int = 20, order: int = 3, mask_output: bool = True):
        super().__init__(mask_output)
        self.consistent, self.n_iter, self.order = consistent, n_iter, order

    def predict(self, field) -> np.ndarray:
        _check_field(field)
        s = int(field.scale)
        lr = fill_lr(field.lr, field.lr_mask)
        x = cubic_upsample(lr, s, None, self.order).astype(np.float64)
        if self.consistent:
            m = np.asarray(field.hr_mask, bool)
            valid = field.lr_mask & (_masked_block_mean(x[:1], s, m)[1] > 0)
            for _ in range(self.n_iter):
                agg, _ = _masked_block_mean(x, s, m)
                res = np.where(valid, lr - agg, 0.0)
                x += cubic_upsample(res, s, None, self.order)
        return self._finish(x, field)


class TeslaStyle(Baseline):
    """TESLA-style kNN imputation in (x, y, colour) space; see the module docstring.

    Parameters
    ----------
    k_neighbours : LR spots considered per HR pixel (nearest in xy, via ``scipy.spatial.cKDTree``)
    length : spatial length scale ℓ in LR pitches (σ of the Gaussian in xy = ℓ·s HR pixels)
    colour_weight : λ, weight of the squared standardised colour distance (0 = spatial only)
    tune : let ``fit`` choose (λ, ℓ) from ``colour_grid`` × ``length_grid`` by mean PCC on the training
        (and validation) fields with HR truth; without such fields the given values are kept
    """

    name = "tesla"

    def __init__(self, k_neighbours: int = 9, length: float = 0.5, colour_weight: float = 2.0,
                 tune: bool = True, colour_grid=(0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0), length_grid=(0.5, 0.75, 1.0),
                 mask_output: bool = True):
        super().__init__(mask_output)
        self.k_neighbours, self.length, self.colour_weight = k_neighbours, length, colour_weight
        self.tune, self.colour_grid, self.length_grid = tune, tuple(colour_grid), tuple(length_grid)

    def fit(self, train_fields=(), val_field=None, seed: int = 0, budget="quick"):
        fields = [f for f in list(train_fields) + ([val_field] if val_field is not None else []) if f.hr is not None]
        if not self.tune or not fields:
            return self
        from .metrics import pcc_per_gene

        best, best_par = -np.inf, (self.colour_weight, self.length)
        for length in self.length_grid:
            for lam in self.colour_grid:
                sc = [np.nanmean(pcc_per_gene(self._impute(f, lam, length), f.hr, f.hr_mask)) for f in fields]
                score = np.nanmean(sc) if np.any(np.isfinite(sc)) else -np.inf
                if score > best + 1e-6:
                    best, best_par = score, (lam, length)
        self.colour_weight, self.length = float(best_par[0]), float(best_par[1])
        self.tuned_score_ = float(best)
        return self

    def _impute(self, field, lam: float, length: float | None = None) -> np.ndarray:
        from scipy.spatial import cKDTree

        _check_field(field)
        s = int(field.scale)
        G, h, w = field.lr.shape
        H, W = h * s, w * s
        hr_mask = np.asarray(field.hr_mask, bool)
        lr_mask = np.asarray(field.lr_mask, bool)
        if not lr_mask.any():
            return np.zeros((G, H, W), np.float32)
        col = hr_colour(field)                                   # (H, W, 3)
        # colour of the tissue under each LR spot (falls back to the whole block off-tissue)
        m = hr_mask.astype(np.float32)
        cnt = m.reshape(h, s, w, s).sum(axis=(1, 3))
        tot = (col * m[..., None]).reshape(h, s, w, s, 3).sum(axis=(1, 3))
        allm = col.reshape(h, s, w, s, 3).mean(axis=(1, 3))
        spot_col = np.where(cnt[..., None] > 0, tot / np.maximum(cnt, 1)[..., None], allm)
        sr, sc = np.nonzero(lr_mask)
        spot_xy = np.stack([(sr + 0.5) * s, (sc + 0.5) * s], 1)
        spot_c = spot_col[sr, sc]                               # (n, 3)
        vals = field.lr[:, sr, sc].T.astype(np.float64)         # (n, G)
        pr, pc = np.mgrid[0:H, 0:W]
        pix_xy = np.stack([pr.ravel() + 0.5, pc.ravel() + 0.5], 1)
        pix_c = col.reshape(-1, 3)
        tis = col[hr_mask] if hr_mask.any() else pix_c
        sig2 = float(np.mean(tis.var(axis=0))) + 1e-8
        kk = int(min(self.k_neighbours, len(spot_xy)))
        d, idx = cKDTree(spot_xy).query(pix_xy, k=kk)
        if kk == 1:
            d, idx = d[:, None], idx[:, None]
        d2 = (d / ((self.length if length is None else length) * s)) ** 2
        if lam > 0:
            dc = ((pix_c[:, None, :] - spot_c[idx]) ** 2).sum(-1)
            d2 = d2 + lam * dc / sig2
        wts = np.exp(-0.5 * (d2 - d2.min(axis=1, keepdims=True)))
        wts /= wts.sum(axis=1, keepdims=True)
        out = np.einsum("pk,pkg->pg", wts, vals[idx])
        return out.T.reshape(G, H, W).astype(np.float32)

    def predict(self, field) -> np.ndarray:
        return self._finish(self._impute(field, self.colour_weight), field)


# ------------------------------------------------------------------------------------------ torch
def _torch():
    import torch

    return torch


class _FeatureStats:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def apply(self, F):
        return (F - self.mean[:, None, None]) / self.std[:, None, None]


class IStarStyle(Baseline):
    """iStar-style weakly supervised histology → expression MLP ensemble (module docstring).

    Parameters
    ----------
    hidden : width of the two hidden layers
    transductive : fine-tune on the target field's LR (the way iStar trains on each section)
    context_sigmas : blur scales (× s HR pixels) of the context features
    """

    name = "istar"
    BUDGETS = {
        "tiny": {"steps": 200, "ensemble": 2, "finetune": 100, "lr": 3e-3, "blocks": 256},
        "quick": {"steps": 1000, "ensemble": 3, "finetune": 400, "lr": 2e-3, "blocks": 512},
        "full": {"steps": 6000, "ensemble": 5, "finetune": 2000, "lr": 1e-3, "blocks": 1024},
    }

    def __init__(self, hidden: int = 64, transductive: bool = True, context_sigmas=(1.0, 2.0),
                 num_threads: int | None = None, mask_output: bool = True):
        super().__init__(mask_output)
        self.hidden, self.transductive = hidden, transductive
        self.context_sigmas = tuple(context_sigmas)
        self.num_threads = num_threads
        self.models_, self.stats_, self.genes_ = None, None, None

    # --- data ---------------------------------------------------------------------------------
    def _feats(self, field):
        return histology_features(field, self.context_sigmas)

    def _weak_set(self, field, F):
        """Pixels (N, F) in tissue, their block ids (N,), block targets (B, G)."""
        s = int(field.scale)
        G, h, w = field.lr.shape
        m = np.asarray(field.hr_mask, bool)
        pr, pc = np.nonzero(m)
        blk = (pr // s) * w + (pc // s)
        use = np.asarray(field.lr_mask, bool).ravel()[blk]
        pr, pc, blk = pr[use], pc[use], blk[use]
        ub, inv = np.unique(blk, return_inverse=True)
        X = F[:, pr, pc].T
        T = field.lr.reshape(G, -1)[:, ub].T
        return X.astype(np.float32), inv.astype(np.int64), T.astype(np.float32)

    @staticmethod
    def _concat(sets):
        Xs, Bs, Ts, off = [], [], [], 0
        for X, b, T in sets:
            Xs.append(X)
            Bs.append(b + off)
            Ts.append(T)
            off += len(T)
        return np.concatenate(Xs), np.concatenate(Bs), np.concatenate(Ts)

    def _mlp(self, n_in, G):
        nn = _torch().nn
        return nn.Sequential(nn.Linear(n_in, self.hidden), nn.LeakyReLU(0.1),
                             nn.Linear(self.hidden, self.hidden), nn.LeakyReLU(0.1),
                             nn.Linear(self.hidden, G))

    def _train(self, model, data, steps, lr, n_blocks, rng):
        torch = _torch()
        X, b, T = data
        Xt, bt, Tt = torch.from_numpy(X), torch.from_numpy(b), torch.from_numpy(T)
        nb = len(T)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
        model.train()
        for step in range(steps):
            for gr in opt.param_groups:
                gr["lr"] = lr * _lr_factor(step, steps)
            if nb > n_blocks:
                sel = np.sort(rng.choice(nb, n_blocks, replace=False))
                remap = np.full(nb, -1, np.int64)
                remap[sel] = np.arange(len(sel))
                pix = np.flatnonzero(remap[b] >= 0)
                xb, bb, tb = Xt[pix], torch.from_numpy(remap[b[pix]]), Tt[torch.from_numpy(sel)]
            else:
                xb, bb, tb = Xt, bt, Tt
            y = model(xb)
            agg = torch.zeros(tb.shape, dtype=y.dtype).index_add_(0, bb, y)
            cnt = torch.zeros(tb.shape[0], dtype=y.dtype).index_add_(0, bb, torch.ones_like(bb, dtype=y.dtype))
            loss = ((agg / cnt[:, None] - tb) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        return model

    # --- API ----------------------------------------------------------------------------------
    def fit(self, train_fields=(), val_field=None, seed: int = 0, budget="quick"):
        torch = _torch()
        _set_threads(self.num_threads)
        fields = list(train_fields)
        if not fields:
            raise ValueError("istar: fit needs at least one training field (LR + H&E; no HR truth needed)")
        self.genes_ = list(fields[0].genes)
        for f in fields:
            _check_field(f, self.genes_)
        self.budget_ = _resolve_budget(self.BUDGETS, budget)
        feats = [self._feats(f) for f in fields]
        pix = np.concatenate([F[:, f.hr_mask].T for F, f in zip(feats, fields)])
        mu, sd = pix.mean(0), pix.std(0)
        sd[sd < 1e-6] = 1.0
        self.stats_ = _FeatureStats(mu.astype(np.float32), sd.astype(np.float32))
        self.train_sets_ = [self._weak_set(f, self.stats_.apply(F)) for F, f in zip(feats, fields)]
        data = self._concat(self.train_sets_)
        bud = self.budget_
        self.models_, self.seed_ = [], seed
        self.trained_steps_ = int(bud["ensemble"]) * int(bud["steps"])  # plus ``finetune`` per member in predict
        for e in range(bud["ensemble"]):
            torch.manual_seed(seed * 1000 + e)
            rng = np.random.default_rng(seed * 1000 + e)
            m = self._mlp(data[0].shape[1], len(self.genes_))
            self.models_.append(self._train(m, data, bud["steps"], bud["lr"], bud["blocks"], rng))
        return self

    def predict(self, field) -> np.ndarray:
        torch = _torch()
        _set_threads(self.num_threads)
        if self.models_ is None:
            raise RuntimeError("istar: call fit() before predict()")
        _check_field(field, self.genes_)
        F = self.stats_.apply(self._feats(field))
        Fh = F.reshape(F.shape[0], -1).T
        bud = self.budget_
        preds = []
        for e, m in enumerate(self.models_):
            if self.transductive and bud["finetune"] > 0:
                m = copy.deepcopy(m)
                own = self._weak_set(field, F)
                # the target's own LR weighted like all training fields together, mixed with them
                data = self._concat(self.train_sets_ + [own] * max(1, len(self.train_sets_)))
                rng = np.random.default_rng(self.seed_ * 1000 + e + 7)
                torch.manual_seed(self.seed_ * 1000 + e + 7)
                m = self._train(m, data, bud["finetune"], bud["lr"] * 0.5, bud["blocks"], rng)
            with torch.no_grad():
                preds.append(m(torch.from_numpy(Fh)).numpy())
        P = np.mean(preds, 0).T.reshape(field.G, *field.hr_shape)
        return self._finish(P, field)


def _unet_module(G: int, k: int, c: int):
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(4, o), nn.GELU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(4, o), nn.GELU())

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = k
            if k > 1:
                self.stem = nn.Sequential(nn.Conv2d(3, c, k, stride=k), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU())
            else:
                self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.GELU())
            self.e1 = block(G + 1 + c, c)
            self.e2 = block(c, 2 * c)
            self.e3 = block(2 * c, 4 * c)
            self.u2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
            self.d2 = block(4 * c, 2 * c)
            self.u1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
            self.d1 = block(2 * c, c)
            self.out = nn.Conv2d(c, G, 1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def forward(self, up, mask, he):
            H, W = up.shape[-2:]
            ph, pw = (-H) % 4, (-W) % 4
            if ph or pw:
                up = F.pad(up, (0, pw, 0, ph), mode="replicate")
                mask = F.pad(mask, (0, pw, 0, ph))
                he = F.pad(he, (0, pw * self.k, 0, ph * self.k), mode="replicate")
            x = torch.cat([up, mask, self.stem(he)], 1)
            x1 = self.e1(x)
            x2 = self.e2(F.avg_pool2d(x1, 2))
            x3 = self.e3(F.avg_pool2d(x2, 2))
            y = self.d2(torch.cat([self.u2(x3), x2], 1))
            y = self.d1(torch.cat([self.u1(y), x1], 1))
            return (up + self.out(y))[..., :H, :W]

    return UNet()


class UNetBaseline(Baseline):
    """Supervised U-Net regression (LR↑ + H&E → HR) on random training patches; masked L1 loss.

    Parameters
    ----------
    channels : base width (doubles at each of two poolings)
    patch_lr : LR pixels per patch side (HR patch = patch_lr·s)
    """

    name = "unet"
    needs_hr_truth = True
    BUDGETS = {
        "tiny": {"steps": 60, "batch": 8, "lr": 3e-3, "val_every": 30},
        "quick": {"steps": 800, "batch": 16, "lr": 1e-3, "val_every": 100},
        "full": {"steps": 8000, "batch": 32, "lr": 5e-4, "val_every": 500},
    }

    def __init__(self, channels: int = 16, patch_lr: int | None = None, num_threads: int | None = None,
                 mask_output: bool = True):
        super().__init__(mask_output)
        self.channels, self.patch_lr, self.num_threads = channels, patch_lr, num_threads
        self.model_ = None

    @staticmethod
    def _inputs(lr, lr_mask, s):
        """(B,G,h,w) LR + (B,1,h,w) mask → torch (up (B,G,H,W), mask↑ (B,1,H,W))."""
        torch = _torch()
        filled = np.stack([fill_lr(l, m[0] > 0.5) for l, m in zip(lr, lr_mask)])
        up = torch.nn.functional.interpolate(torch.from_numpy(filled.astype(np.float32)), scale_factor=s,
                                             mode="bicubic", align_corners=False)
        mu = torch.from_numpy(np.repeat(np.repeat(lr_mask.astype(np.float32), s, 2), s, 3))
        return up, mu

    def fit(self, train_fields=(), val_field=None, seed: int = 0, budget="quick"):
        torch = _torch()
        from .data.pairs import random_patches

        _set_threads(self.num_threads)
        fields, self.genes_ = _supervised_fields(train_fields, "unet: fit needs training fields with HR truth "
                                                                 "(supervised)")
        s, k = int(fields[0].scale), int(fields[0].he_per_hr)
        if any(int(f.scale) != s or int(f.he_per_hr) != k for f in fields):
            raise DataFormatError(None, "training fields differ in scale or he_per_hr", "one scale and H&E sampling")
        self.scale_, self.k_ = s, k
        bud = _resolve_budget(self.BUDGETS, budget)
        p = self.patch_lr or max(4, int(np.ceil(24 / s)))
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = _unet_module(len(self.genes_), k, self.channels)
        opt = torch.optim.AdamW(model.parameters(), lr=bud["lr"], weight_decay=1e-4)
        from .metrics import pcc_per_gene

        best = _BestOnVal()
        self.model_ = model
        self.trained_steps_ = int(bud["steps"])
        for step in range(bud["steps"]):
            model.train()
            for gr in opt.param_groups:
                gr["lr"] = bud["lr"] * _lr_factor(step, bud["steps"])
            pt = random_patches(fields, bud["batch"], p, rng)
            up, mu = self._inputs(pt.lr, pt.lr_mask, s)
            y = model(up, mu, torch.from_numpy(pt.he))
            hm = torch.from_numpy(pt.hr_mask)
            loss = ((y - torch.from_numpy(pt.hr)).abs() * hm).sum() / (hm.sum() * y.shape[1] + 1e-6)
            opt.zero_grad()
            loss.backward()
            opt.step()
            last = step == bud["steps"] - 1
            if val_field is not None and val_field.hr is not None and ((step + 1) % bud["val_every"] == 0 or last):
                sc = np.nanmean(pcc_per_gene(self._predict_raw(val_field), val_field.hr, val_field.hr_mask))
                best.update(sc, model)
            if last:
                break
        sc = best.restore(model)
        if sc is not None:
            self.val_score_ = sc
        model.eval()
        return self

    def _predict_raw(self, field) -> np.ndarray:
        torch = _torch()
        self.model_.eval()
        up, mu = self._inputs(field.lr[None], field.lr_mask[None, None], int(field.scale))
        with torch.no_grad():
            y = self.model_(up, mu, torch.from_numpy(np.asarray(field.he, np.float32)[None]))
        return y[0].numpy()

    def predict(self, field) -> np.ndarray:
        _set_threads(self.num_threads)
        if self.model_ is None:
            raise RuntimeError("unet: call fit() before predict()")
        _check_field(field, self.genes_)
        if int(field.scale) != self.scale_ or int(field.he_per_hr) != self.k_:
            raise DataFormatError(None, f"field {field.name!r} has scale {field.scale}/he_per_hr {field.he_per_hr}, "
                                  f"model trained on {self.scale_}/{self.k_}", "the training scale and H&E sampling")
        return self._finish(self._predict_raw(field), field)


# ------------------------------------------------------------------------------------------ HisToSGE
def _dihedral_perms(r: int) -> np.ndarray:
    """(8, (2r+1)²) permutations of a flattened (2r+1)×(2r+1) window under its 8 rotations / flips."""
    n = 2 * r + 1
    base = np.arange(n * n).reshape(n, n)
    out = []
    for k in range(4):
        a = np.rot90(base, k)
        out += [a.ravel(), a[:, ::-1].ravel()]
    return np.stack(out).astype(np.int64)


def _histosge_module(n_feat: int, n_tok: int, G: int, d: int, hidden: int, n_blocks: int, heads: int,
                     use_lr: bool):
    torch = _torch()
    nn = torch.nn

    class ResBlock(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.f = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 2 * w), nn.GELU(), nn.Linear(2 * w, w))

        def forward(self, x):
            return x + self.f(x)

    class Net(nn.Module):
        """Spot tokens (B, N, F) + validity (B, N) + centre LR↑ (B, G) → residual expression (B, G)."""

        def __init__(self):
            super().__init__()
            self.centre = n_tok // 2
            self.embed = nn.Sequential(nn.Linear(n_feat, d), nn.GELU(), nn.Linear(d, d))
            self.pos = nn.Parameter(0.02 * torch.randn(n_tok, d))
            self.norm = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.inp = nn.Linear(2 * d + (G if use_lr else 0), hidden)
            self.blocks = nn.ModuleList([ResBlock(hidden) for _ in range(n_blocks)])
            self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, G))
            nn.init.zeros_(self.head[1].weight)  # starts as the LR↑ itself
            nn.init.zeros_(self.head[1].bias)

        def forward(self, tok, valid, lr):
            e = self.embed(tok) + self.pos
            kv = self.norm(e)
            ctx, _ = self.attn(kv[:, self.centre:self.centre + 1], kv, kv, key_padding_mask=~valid,
                               need_weights=False)
            parts = [e[:, self.centre], ctx[:, 0]] + ([lr] if use_lr else [])
            h = self.inp(torch.cat(parts, 1))
            for b in self.blocks:
                h = b(h)
            return self.head(h)

    return Net()


class HisToSGEStyle(Baseline):
    """HisToSGE-style supervised spot-level histology → expression regressor (module docstring).

    Parameters
    ----------
    radius : neighbourhood radius r in HR pixels: each spot attends over the (2r+1)² spots around it
    dim : token width; hidden : width of the residual MLP; n_blocks : residual blocks; heads : attention heads
    use_lr : feed the centre pixel's LR↑ values to the MLP (the output is always a residual on LR↑)
    context_sigmas : blur scales (× s HR pixels) of the context features (:func:`histology_features`)
    shrink : with a validation field (HR truth), scale the predicted residual by the least-squares factor
        α = ⟨r̂, r⟩ / ⟨r̂, r̂⟩ on its in-tissue pixels (clipped to [0, 1]; ``alpha_``), so a residual that is
        partly noise is not added at full strength; α = 1 without a validation field or with ``shrink=False``
    consistent : after prediction, iterative back-projection (as ``Bicubic(consistent=True)``) so that
        the masked block means reproduce the LR
    cell_features : also use the cell-level features of :mod:`napari_diffst.data.cellfeatures`
        (``field.extra['cell_features']``, plus their context blurs) — the ablation ``histosge_cell`` of the
        benchmark, which shows how much of Diff-ST's cell-level prior a supervised regressor gets; off for
        the ``histosge`` baseline
    """

    name = "histosge"
    needs_hr_truth = True
    BUDGETS = {
        "tiny": {"steps": 150, "batch": 128, "lr": 3e-3, "ensemble": 1, "val_every": 50},
        "quick": {"steps": 1500, "batch": 256, "lr": 2e-3, "ensemble": 2, "val_every": 100},
        "full": {"steps": 8000, "batch": 512, "lr": 1e-3, "ensemble": 4, "val_every": 250},
    }

    def __init__(self, radius: int = 2, dim: int = 32, hidden: int = 64, n_blocks: int = 2, heads: int = 4,
                 use_lr: bool = True, context_sigmas=(1.0, 2.0), shrink: bool = True, consistent: bool = False,
                 n_iter: int = 20,
                 weight_decay: float = 1e-4, num_threads: int | None = None, mask_output: bool = True,
                 cell_features: bool = False):
        super().__init__(mask_output)
        self.cell_features = bool(cell_features)
        if self.cell_features:
            self.name = "histosge_cell"
        self.radius, self.dim, self.hidden, self.n_blocks, self.heads = int(radius), dim, hidden, n_blocks, heads
        self.use_lr, self.context_sigmas = bool(use_lr), tuple(context_sigmas)
        self.shrink, self.consistent, self.n_iter, self.weight_decay = shrink, consistent, n_iter, weight_decay
        self.num_threads = num_threads
        self.models_, self.stats_, self.genes_ = None, None, None

    def needs_cell_features(self, budget=None) -> bool:
        return self.cell_features

    def _features(self, field) -> np.ndarray:
        F = histology_features(field, self.context_sigmas)
        if not self.cell_features:
            return F
        C = field.extra.get("cell_features")
        if C is None:
            raise DataFormatError(None, f"field {field.name!r} has no cell-level features",
                                  "field.extra['cell_features'] (napari_diffst.data.cellfeatures.add_cell_features)")
        C = np.asarray(C, np.float32)
        s = int(field.scale)
        ctx = [np.stack([ndi.gaussian_filter(a, c * s, mode="nearest") for a in C]) for c in self.context_sigmas]
        return np.concatenate([F, C] + ctx).astype(np.float32)

    # --- data ---------------------------------------------------------------------------------
    def _field_arrays(self, field):
        """Standardised features padded by r, flattened (Hp·Wp, F); validity (Hp·Wp,); token index of every
        HR pixel (H·W, N) into them; LR↑ (G, H, W)."""
        r = self.radius
        F = self.stats_.apply(self._features(field))
        Fn, H, W = F.shape
        Fp = np.pad(F, ((0, 0), (r, r), (r, r)))
        vp = np.pad(np.asarray(field.hr_mask, bool), r)
        Wp = W + 2 * r
        rr, cc = np.mgrid[0:H, 0:W]
        dr, dc = np.mgrid[-r:r + 1, -r:r + 1]
        idx = (rr.ravel()[:, None] + r + dr.ravel()[None]) * Wp + (cc.ravel()[:, None] + r + dc.ravel()[None])
        return (Fp.reshape(Fn, -1).T.astype(np.float32), vp.ravel(), idx.astype(np.int64),
                field.lr_upsampled(3).astype(np.float32))

    def _train_set(self, fields):
        feats, valid, idx, lr, tgt, off = [], [], [], [], [], 0
        for f in fields:
            Fp, vp, ix, up = self._field_arrays(f)
            m = np.asarray(f.hr_mask, bool).ravel()
            G = f.G
            feats.append(Fp)
            valid.append(vp)
            idx.append(ix[m] + off)
            lr.append(up.reshape(G, -1)[:, m].T)
            tgt.append((np.asarray(f.hr, np.float32).reshape(G, -1)[:, m] - up.reshape(G, -1)[:, m]).T)
            off += len(Fp)
        return (np.concatenate(feats), np.concatenate(valid), np.concatenate(idx), np.concatenate(lr),
                np.concatenate(tgt))

    def _batch(self, feats, valid, idx, lr, sel, perm=None):
        torch = _torch()
        ix = idx[sel] if perm is None else np.take_along_axis(idx[sel], perm, axis=1)
        v = valid[ix]
        v[:, ix.shape[1] // 2] = True  # the centre token always takes part
        return torch.from_numpy(feats[ix]), torch.from_numpy(v), torch.from_numpy(lr[sel])

    def _predict_residual(self, model, field, arrays=None) -> np.ndarray:
        torch = _torch()
        Fp, vp, ix, up = self._field_arrays(field) if arrays is None else arrays
        G, H, W = up.shape
        lr = up.reshape(G, -1).T.copy()
        out = np.empty((H * W, G), np.float32)
        model.eval()
        with torch.no_grad():
            for a in range(0, H * W, 8192):
                sel = np.arange(a, min(a + 8192, H * W))
                out[sel] = model(*self._batch(Fp, vp, ix, lr, sel)).numpy()
        return out.T.reshape(G, H, W)

    # --- API ----------------------------------------------------------------------------------
    def fit(self, train_fields=(), val_field=None, seed: int = 0, budget="quick"):
        torch = _torch()
        from .metrics import pcc_per_gene

        _set_threads(self.num_threads)
        fields, self.genes_ = _supervised_fields(train_fields, "histosge: fit needs training fields with HR truth "
                                                                 "(supervised spot regression)")
        bud = self.budget_ = _resolve_budget(self.BUDGETS, budget)
        Fs = [self._features(f) for f in fields]
        pix = np.concatenate([F[:, f.hr_mask].T for F, f in zip(Fs, fields)])
        mu, sd = pix.mean(0), pix.std(0)
        sd[sd < 1e-6] = 1.0
        self.stats_ = _FeatureStats(mu.astype(np.float32), sd.astype(np.float32))
        del Fs, pix
        feats, valid, idx, lr, tgt = self._train_set(fields)
        n, N = idx.shape
        perms = _dihedral_perms(self.radius)
        use_val = val_field is not None and val_field.hr is not None
        if use_val:
            _check_field(val_field, self.genes_)
            val_arrays = self._field_arrays(val_field)
        self.models_, self.val_scores_, self.steps_ = [], [], []
        tgt_t = torch.from_numpy(tgt)
        for e in range(int(bud["ensemble"])):
            torch.manual_seed(seed * 1000 + e)
            rng = np.random.default_rng(seed * 1000 + e)
            model = _histosge_module(feats.shape[1], N, len(self.genes_), self.dim, self.hidden, self.n_blocks,
                                     self.heads, self.use_lr)
            opt = torch.optim.AdamW(model.parameters(), lr=bud["lr"], weight_decay=self.weight_decay)
            best, step = _BestOnVal(), 0
            for step in range(int(bud["steps"])):
                model.train()
                for gr in opt.param_groups:
                    gr["lr"] = bud["lr"] * _lr_factor(step, bud["steps"])
                sel = rng.integers(0, n, int(min(bud["batch"], n)))
                perm = perms[rng.integers(0, len(perms), len(sel))]
                tok, v, l = self._batch(feats, valid, idx, lr, sel, perm)
                loss = ((model(tok, v, l) - tgt_t[torch.from_numpy(sel)]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                last = step == bud["steps"] - 1
                if use_val and ((step + 1) % bud["val_every"] == 0 or last):
                    p = self._predict_residual(model, val_field, val_arrays) + val_arrays[3]
                    sc = float(np.nanmean(pcc_per_gene(p, val_field.hr, val_field.hr_mask)))
                    best.update(sc, model)
                if last:
                    break
            self.val_scores_.append(best.restore(model))
            model.eval()
            self.models_.append(model)
            self.steps_.append(step + 1)
        self.trained_steps_ = int(sum(self.steps_))
        self.alpha_ = 1.0
        if use_val and self.shrink:
            r = np.mean([self._predict_residual(m, val_field, val_arrays) for m in self.models_], 0)
            vm = np.asarray(val_field.hr_mask, bool)
            r = r[:, vm].astype(np.float64)
            t = (np.asarray(val_field.hr, np.float64) - val_arrays[3])[:, vm]
            den = float((r * r).sum())
            self.alpha_ = float(np.clip((r * t).sum() / den, 0.0, 1.0)) if den > 0 else 1.0
        return self

    def predict(self, field) -> np.ndarray:
        _set_threads(self.num_threads)
        if self.models_ is None:
            raise RuntimeError("histosge: call fit() before predict()")
        _check_field(field, self.genes_)
        arrays = self._field_arrays(field)
        res = np.mean([self._predict_residual(m, field, arrays) for m in self.models_], axis=0)
        x = (field.lr_upsampled(3) + getattr(self, "alpha_", 1.0) * res).astype(np.float64)
        if self.consistent:
            s = int(field.scale)
            lr = fill_lr(field.lr, field.lr_mask)
            m = np.asarray(field.hr_mask, bool)
            ok = field.lr_mask & (_masked_block_mean(x[:1], s, m)[1] > 0)
            for _ in range(self.n_iter):
                agg, _ = _masked_block_mean(x, s, m)
                x += cubic_upsample(np.where(ok, lr - agg, 0.0), s, None)
        return self._finish(x, field)


#: name → baseline class
BASELINES = {
    "nearest": Nearest,
    "bicubic": Bicubic,
    "tesla": TeslaStyle,
    "istar": IStarStyle,
    "unet": UNetBaseline,
    "histosge": HisToSGEStyle,
}


def make_baseline(name: str, **kwargs) -> Baseline:
    """Instantiate a registered baseline by name."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}") from None
    return cls(**kwargs)
