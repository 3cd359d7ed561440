"""The Diff-ST denoiser: a compact conditional U-Net ``model(x_t, t, cond) -> (out, aux)``.

Inputs (all on the HR grid of H x W pixels, G genes as channels):

* ``x_t`` (B, G, H, W) noisy maps in [-1, 1]; ``t`` (B,) integer timesteps in [0, T);
* ``cond['lr_up']`` (B, G, H, W) the LR maps upsampled to the HR grid, in [-1, 1];
* ``cond['lr_mask']`` (B, 1, H, W) where LR data exist;
* ``cond['he']`` (B, 3, H*k, W*k) H&E in [0, 1] (``k = he_per_hr``; uint8 is accepted and scaled);
* ``cond['hr_mask']`` (B, 1, H, W) optional: tissue mask, restricts the disentangling loss.

Architecture (see docs/model.md):

1. histology features ``A_h`` (B, C_h, H, W) from the hierarchical cell->tissue encoder
   (:mod:`.histology`); they depend only on ``he``, so in eval mode under ``torch.no_grad`` they
   are cached per ``he`` tensor object (samplers calling the model T times on one tile pay once);
2. U-Net input = ``[x_t, CIGC(x_t) (G*D ch), lr_up, lr_mask]`` (:mod:`.gene_graph`);
3. encoder levels (channels ``base * mult``), ResBlocks with FiLM time conditioning, CAM with the
   (average-pooled) histology features after every encoder level (:mod:`.modulation`), self-attention
   in the bottleneck at the lowest resolution, decoder with skip connections, 3x3 output conv.

Ablations (paper Table 2): ``use_cam=False`` -> the histology features are concatenated to the
U-Net input instead (no CAM modules); ``use_cigc=False`` -> no gene graph, ``x_t`` enters as plain
channels; ``use_hier=False`` -> tissue-level histology features only. All three off is a plain
conditional diffusion U-Net (histology concatenated at the input).

``predict`` in {'eps', 'x0', 'v'} is stored in the config for the diffusion code. With
``predict='x0'`` and ``residual_lr=True`` the network output is added to ``lr_up`` so it only
has to learn the high-frequency detail: ``x0_hat = lr_up + net(...)``.
"""
from __future__ import annotations

import copy
import json
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataFormatError, DiffSTError
from .gene_graph import GeneGraph
from .histology import HistologyEncoder
from .layers import Downsample, ResBlock, SelfAttention2d, TimeEmbedding, Upsample, norm
from .modulation import CrossModalModulation

__all__ = ["DiffSTDenoiser", "build_model", "default_config", "DEFAULT_CONFIG"]

DEFAULT_CONFIG: dict = {
    "n_genes": 25,             # G: output / input gene channels
    "he_per_hr": 16,           # k: H&E pixels per HR pixel
    "base_channels": 64,
    "channel_mults": [1, 2, 2],  # 3 resolutions: H, H/2, H/4
    "num_res_blocks": 2,
    "attn_heads": 4,
    "dropout": 0.1,
    "hist_channels": 64,       # C_h of the histology features
    "hist_context_blocks": 2,
    "cell_patch_px": None,     # H&E px per cell patch; None -> 2 * he_per_hr (2 x 2 HR px)
    "entropy_bins": 32,
    "gamma_start": 0.0,        # curriculum: entropy threshold at progress 0 (keep all)
    "gamma_end": 0.7,          # ... at progress 1 and at eval (drops background)
    "hier_posenc": True,
    "cam_kernel": 3,           # a: a x a adaptive filters
    "dis_lambda": 1.0,
    "dis_margin": 1.0,
    "disentangle_weight": 0.1,  # suggested weight of aux['disentangle'] in the total loss
    "cigc_dim": 8,             # D: node feature maps per gene
    "cigc_alpha": 0.5,         # float in [0, 1] or "learnable"
    "use_cam": True,
    "use_cigc": True,
    "use_hier": True,
    "predict": "eps",          # 'eps' | 'x0' | 'v'
    "residual_lr": False,      # only with predict='x0': output = lr_up + net
    "encoder_weights": None,   # optional local state-dict file for model.histology
    "distill": False,          # HaDM-ST-style semantic distillation: a histology head predicts the HR detail
                               # (x0 - lr_up) from [histology features, lr_up]; its prediction conditions the
                               # U-Net and its masked MSE is aux['distill'] (training only, needs
                               # cond['x0_target'])
    "distill_weight": 1.0,     # suggested weight of aux['distill']
    "distill_hidden": 32,
    "diffusion": None,         # optional dict, carried untouched for the diffusion code (its 'target'
                               # must equal 'predict' when both are given)
}


def default_config(**overrides) -> dict:
    """A fresh copy of :data:`DEFAULT_CONFIG` with ``overrides`` applied and validated."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    cfg.update(overrides)
    return _resolve(cfg)


def _resolve(config: dict) -> dict:
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise DiffSTError(f"unknown model config keys {unknown}; valid keys: {sorted(DEFAULT_CONFIG)}")
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    cfg.update(copy.deepcopy(config))
    for key in ("n_genes", "he_per_hr", "base_channels", "num_res_blocks", "hist_channels", "cigc_dim",
                "cam_kernel", "entropy_bins", "attn_heads"):
        if int(cfg[key]) < 1:
            raise DiffSTError(f"model config {key!r} must be >= 1, got {cfg[key]!r}")
        cfg[key] = int(cfg[key])
    if cfg["cam_kernel"] % 2 == 0:
        raise DiffSTError(f"model config 'cam_kernel' must be odd, got {cfg['cam_kernel']}")
    cfg["channel_mults"] = [int(m) for m in cfg["channel_mults"]]
    if not cfg["channel_mults"] or min(cfg["channel_mults"]) < 1:
        raise DiffSTError(f"model config 'channel_mults' must be positive integers, got {cfg['channel_mults']!r}")
    if cfg["cell_patch_px"] is None:
        cfg["cell_patch_px"] = 2 * cfg["he_per_hr"]
    cfg["cell_patch_px"] = int(cfg["cell_patch_px"])
    if cfg["predict"] not in ("eps", "x0", "v"):
        raise DiffSTError(f"model config 'predict' must be 'eps', 'x0' or 'v', got {cfg['predict']!r}")
    if cfg["residual_lr"] and cfg["predict"] != "x0":
        raise DiffSTError("model config 'residual_lr' needs predict='x0' (the output is added to lr_up)")
    if cfg["cigc_alpha"] != "learnable":
        cfg["cigc_alpha"] = float(cfg["cigc_alpha"])
    cfg["distill_hidden"] = int(cfg["distill_hidden"])
    for key in ("use_cam", "use_cigc", "use_hier", "hier_posenc", "residual_lr", "distill"):
        cfg[key] = bool(cfg[key])
    for key in ("dropout", "gamma_start", "gamma_end", "dis_lambda", "dis_margin", "disentangle_weight",
                "distill_weight"):
        cfg[key] = float(cfg[key])
    diff = cfg["diffusion"]
    if diff is not None:
        if not isinstance(diff, dict):
            raise DiffSTError(f"model config 'diffusion' must be a dict or None, got {type(diff).__name__}")
        if "target" in diff and diff["target"] != cfg["predict"]:
            raise DiffSTError(f"model config predict={cfg['predict']!r} but diffusion target={diff['target']!r}; "
                              "they must agree")
    if cfg["encoder_weights"] is not None:
        cfg["encoder_weights"] = str(cfg["encoder_weights"])
    json.dumps(cfg)  # must stay JSON-able
    return cfg


class DiffSTDenoiser(nn.Module):
    """Diff-ST conditional denoiser; build with :func:`build_model` (see module docstring)."""

    def __init__(self, config: dict | None = None, load_weights: bool = True):
        super().__init__()
        cfg = _resolve(config or {})
        self.config = cfg
        G, base, ch_h = cfg["n_genes"], cfg["base_channels"], cfg["hist_channels"]
        emb = 4 * base
        self.histology = HistologyEncoder(
            cfg["he_per_hr"], ch_h, hier=cfg["use_hier"], cell_patch_px=cfg["cell_patch_px"],
            entropy_bins=cfg["entropy_bins"], gamma_start=cfg["gamma_start"], gamma_end=cfg["gamma_end"],
            heads=cfg["attn_heads"], posenc=cfg["hier_posenc"], context_blocks=cfg["hist_context_blocks"])
        self.time_embed = TimeEmbedding(base, emb)
        self.gene_graph = GeneGraph(G, cfg["cigc_dim"], cfg["cigc_alpha"]) if cfg["use_cigc"] else None
        cin = G + G + 1 + (G * cfg["cigc_dim"] if cfg["use_cigc"] else 0) + (0 if cfg["use_cam"] else ch_h)
        self.distill = None
        if cfg["distill"]:
            hd = cfg["distill_hidden"]
            self.distill = nn.Sequential(nn.Conv2d(ch_h + G + 1, hd, 3, padding=1), nn.SiLU(),
                                         nn.Conv2d(hd, hd, 3, padding=1), nn.SiLU(), nn.Conv2d(hd, G, 1))
            cin += G
        self.in_conv = nn.Conv2d(cin, base, 3, padding=1)

        chans = [base * m for m in cfg["channel_mults"]]
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        self.cam = nn.ModuleList() if cfg["use_cam"] else None
        prev = base
        for i, ch in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(cfg["num_res_blocks"]):
                blocks.append(ResBlock(prev, ch, emb, cfg["dropout"]))
                prev = ch
            self.enc.append(blocks)
            if self.cam is not None:
                self.cam.append(CrossModalModulation(ch, ch_h, cfg["cam_kernel"], cfg["dis_lambda"], cfg["dis_margin"]))
            self.down.append(Downsample(ch) if i < len(chans) - 1 else nn.Identity())
        self.mid1 = ResBlock(prev, prev, emb, cfg["dropout"])
        self.mid_attn = SelfAttention2d(prev, cfg["attn_heads"])
        self.mid2 = ResBlock(prev, prev, emb, cfg["dropout"])
        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        for i in reversed(range(len(chans))):
            ch = chans[i]
            blocks = nn.ModuleList([ResBlock(prev + ch, ch, emb, cfg["dropout"])])
            for _ in range(cfg["num_res_blocks"] - 1):
                blocks.append(ResBlock(ch, ch, emb, cfg["dropout"]))
            prev = ch
            self.dec.append(blocks)
            self.up.append(Upsample(ch) if i > 0 else nn.Identity())
        self.out_norm = norm(prev)
        self.out_conv = nn.Conv2d(prev, G, 3, padding=1)
        self._hist_cache = None
        if load_weights and cfg["encoder_weights"]:
            self.load_encoder_weights(cfg["encoder_weights"])

    # ---- public knobs -----------------------------------------------------------------------
    @property
    def pad_multiple(self) -> int:
        """H and W are padded (replicate) up to a multiple of this, and the output cropped back."""
        return 2 ** (len(self.config["channel_mults"]) - 1)

    @property
    def aux_weights(self) -> dict:
        """Suggested weights for the entries of ``aux`` in the training loss."""
        w = {"disentangle": self.config["disentangle_weight"]}
        if self.config.get("distill"):
            w["distill"] = self.config["distill_weight"]
        return w

    def set_progress(self, frac: float) -> None:
        """Training progress in [0, 1]; drives the entropy curriculum of the histology encoder."""
        self.histology.set_progress(frac)
        self._hist_cache = None

    def set_gene_graph(self, a) -> None:
        """Install the (G, G) co-expression matrix for CIGC (no-op when ``use_cigc`` is off)."""
        if self.gene_graph is not None:
            self.gene_graph.set_graph(a)

    def load_encoder_weights(self, path) -> None:
        """Load a local state-dict file (``torch.save(model.histology.state_dict(), path)``) into
        :attr:`histology`. Raises :class:`DataFormatError` if the file is missing, unreadable or its
        keys / shapes do not match this encoder. Never touches the network."""
        p = Path(path)
        expected = ("a state dict saved from model.histology.state_dict() of a model with the same "
                    "he_per_hr, hist_channels, cell_patch_px and use_hier")
        if not p.is_file():
            raise DataFormatError(p, "encoder_weights file not found", expected)
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling problem
            raise DataFormatError(p, f"could not read encoder weights ({type(exc).__name__}: {exc})", expected) from exc
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise DataFormatError(p, "encoder weights are not a dict of tensors", expected)
        own = self.histology.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
        if missing or unexpected or shapes:
            parts = []
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
                if keys:
                    parts.append(f"{len(keys)} {name} key(s), e.g. {keys[:3]}")
            raise DataFormatError(p, "encoder weights do not match the histology encoder: " + "; ".join(parts), expected)
        self.histology.load_state_dict(sd)
        self._hist_cache = None

    # ---- forward ----------------------------------------------------------------------------
    def encode_histology(self, he: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 3, H*k, W*k) -> (B, C_h, H, W) histology features (no caching)."""
        return self.histology(he, hw)

    def _histology_key(self, he_orig: torch.Tensor, hw) -> tuple:
        # the in-place version counters of the encoder's tensors change with every optimiser / EMA
        # step and load_state_dict, so cached features never outlive the weights they came from
        wv = sum(p._version for p in self.histology.parameters()) + sum(b._version for b in self.histology.buffers())
        return (he_orig._version, tuple(hw), wv, self.histology.gamma, he_orig.device, he_orig.dtype)

    def _histology_cached(self, he_orig: torch.Tensor, he: torch.Tensor, hw) -> torch.Tensor:
        use_cache = not self.training and not torch.is_grad_enabled()
        if not use_cache:
            self._hist_cache = None
            return self.histology(he, hw)
        key = self._histology_key(he_orig, hw)
        if self._hist_cache is not None:
            ref, old_key, feats = self._hist_cache
            if ref() is he_orig and old_key == key:
                return feats
        feats = self.histology(he, hw)
        self._hist_cache = (weakref.ref(he_orig), key, feats)
        return feats

    def __getstate__(self):  # pickling / deepcopy (e.g. an EMA copy) never carries the cache
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_hist_cache"] = None
        return state

    def train(self, mode: bool = True):
        self._hist_cache = None
        return super().train(mode)

    def _check(self, x_t, t, cond):
        G, k = self.config["n_genes"], self.config["he_per_hr"]
        if x_t.ndim != 4 or x_t.shape[1] != G:
            raise DataFormatError(None, f"x_t has shape {tuple(x_t.shape)}", f"(B, {G}, H, W) for a {G}-gene model")
        B, _, H, W = x_t.shape
        for key in ("lr_up", "lr_mask", "he"):
            if key not in cond:
                raise DataFormatError(None, f"cond has no {key!r}", "cond with 'lr_up', 'lr_mask', 'he' (and optional 'hr_mask')")
        want = {"lr_up": (B, G, H, W), "lr_mask": (B, 1, H, W), "he": (B, 3, H * k, W * k)}
        if cond.get("hr_mask") is not None:
            want["hr_mask"] = (B, 1, H, W)
        for key, shape in want.items():
            if tuple(cond[key].shape) != shape:
                extra = f" (k = he_per_hr = {k} H&E px per HR px)" if key == "he" else ""
                raise DataFormatError(None, f"cond[{key!r}] has shape {tuple(cond[key].shape)}", f"{shape}{extra}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise DataFormatError(None, f"t has shape {tuple(t.shape)}", f"({B},) integer timesteps")
        return t

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict):
        cfg = self.config
        t = self._check(x_t, t, cond)
        k = cfg["he_per_hr"]
        B, G, H, W = x_t.shape
        he_orig = cond["he"]
        he = he_orig.float() / 255.0 if he_orig.dtype == torch.uint8 else he_orig.to(x_t.dtype)
        lr_up, lr_mask = cond["lr_up"].to(x_t.dtype), cond["lr_mask"].to(x_t.dtype)
        hr_mask = cond.get("hr_mask")
        m = self.pad_multiple
        ph, pw = (-H) % m, (-W) % m
        if ph or pw:
            x_in = F.pad(x_t, (0, pw, 0, ph), mode="replicate")
            lr_up_p = F.pad(lr_up, (0, pw, 0, ph), mode="replicate")
            lr_mask = F.pad(lr_mask, (0, pw, 0, ph))
            he = F.pad(he, (0, pw * k, 0, ph * k), mode="replicate")
            if hr_mask is not None:
                hr_mask = F.pad(hr_mask.to(x_t.dtype), (0, pw, 0, ph))
        else:
            x_in, lr_up_p = x_t, lr_up
        Hp, Wp = H + ph, W + pw

        hist = self._histology_cached(he_orig, he, (Hp, Wp))
        emb = self.time_embed(t)
        parts = [x_in]
        if self.gene_graph is not None:
            parts.append(self.gene_graph(x_in).reshape(B, -1, Hp, Wp))
        parts += [lr_up_p, lr_mask]
        if self.cam is None:
            parts.append(hist)
        aux = {}
        if self.distill is not None:
            # semantic distillation (HaDM-ST): expression detail predicted from histology + LR alone
            detail = self.distill(torch.cat([hist, lr_up_p, lr_mask], dim=1))
            parts.append(detail)
            x0_target = cond.get("x0_target")
            if x0_target is not None:
                err = (detail[:, :, :H, :W] - (x0_target.to(x_t.dtype) - lr_up)) ** 2
                m0 = cond.get("hr_mask")
                if m0 is not None:
                    m0 = m0.to(err.dtype)
                    aux["distill"] = (err * m0).sum() / (m0.sum() * G).clamp_min(1.0)
                else:
                    aux["distill"] = err.mean()
            else:
                aux["distill"] = x_t.new_zeros(())
        h = self.in_conv(torch.cat(parts, dim=1))

        skips, losses = [], []
        for i, blocks in enumerate(self.enc):
            for blk in blocks:
                h = blk(h, emb)
            if self.cam is not None:
                f = 2 ** i
                hist_i = F.avg_pool2d(hist, f) if f > 1 else hist
                mask_i = None
                if hr_mask is not None:
                    mask_i = F.avg_pool2d(hr_mask.to(h.dtype), f) if f > 1 else hr_mask.to(h.dtype)
                h, loss = self.cam[i](h, hist_i, mask_i)
                losses.append(loss)
            skips.append(h)
            h = self.down[i](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks, up in zip(self.dec, self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for blk in blocks:
                h = blk(h, emb)
            h = up(h)
        out = self.out_conv(F.silu(self.out_norm(h)))[:, :, :H, :W]
        if cfg["residual_lr"]:
            out = out + lr_up
        dis = torch.stack(losses).mean() if losses else x_t.new_zeros(())
        aux["disentangle"] = dis
        return out, aux


def build_model(config: dict | None = None, load_weights: bool = True) -> DiffSTDenoiser:
    """Build a :class:`DiffSTDenoiser` from a (partial) config dict; missing keys take defaults.

    ``load_weights=False`` skips ``encoder_weights`` (use it when restoring a full checkpoint, whose
    state dict already holds the encoder)."""
    return DiffSTDenoiser(config, load_weights=load_weights)
