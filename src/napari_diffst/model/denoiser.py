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

Engine options (all off by default; docs/model.md "Engine options"): ``distill`` (semantic distillation
head), ``use_align`` (learned deformable alignment of the histology features, :mod:`.align`),
``hist_features`` (pluggable tissue-level feature extractor, :mod:`.features`), ``gene_chunk`` (genes
processed in chunks that share one histology encoding, for panels of hundreds of genes).

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
from .align import SpatialAlign, smoothness_loss
from .features import make_feature_extractor, parse_feature_spec
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
    # pluggable tissue-level histology features (features.py): "learned" | "handcrafted" | "file:PATH"
    # (TorchScript, frozen) | "timm:ARCH:PATH" (needs timm)
    "hist_features": "learned",
    "hist_features_norm": "imagenet",  # input normalisation of file models: 'imagenet' | 'none'
    "hist_features_patch": None,  # H&E px per patch for models returning one vector per input (None: cell patch)
    "hist_features_input": None,  # resize those patches to this many px (e.g. 224); None: no resize
    "hist_features_dim": None,    # expected channels of the extractor (checked; filled in at build)
    # spatial alignment (align.py): learned per-pixel offsets applied to the histology features
    "use_align": False,
    "align_weight": 0.1,       # suggested weight of aux['align_smooth'] (offset smoothness)
    "align_hidden": 32,
    "align_max_offset": 2.0,   # |offset| <= this many HR pixels (tanh-bounded)
    # many-gene panels: the U-Net runs on chunks of this many genes (0 = all genes at once); every chunk shares
    # the tile's histology encoding, CIGC and distillation; a learned chunk embedding joins the time embedding
    "gene_chunk": 0,
    "gene_chunk_train": 0,     # chunks per training step (drawn by the trainer; 0 = all chunks)
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
    for key in ("use_cam", "use_cigc", "use_hier", "hier_posenc", "residual_lr", "distill", "use_align"):
        cfg[key] = bool(cfg[key])
    for key in ("dropout", "gamma_start", "gamma_end", "dis_lambda", "dis_margin", "disentangle_weight",
                "distill_weight", "align_weight", "align_max_offset"):
        cfg[key] = float(cfg[key])
    for key in ("align_hidden", "gene_chunk", "gene_chunk_train"):
        cfg[key] = int(cfg[key])
        if cfg[key] < (1 if key == "align_hidden" else 0):
            raise DiffSTError(f"model config {key!r} must be >= {1 if key == 'align_hidden' else 0}, got {cfg[key]}")
    parse_feature_spec(cfg["hist_features"])  # known name, argument where needed
    if cfg["hist_features_norm"] not in ("imagenet", "none"):
        raise DiffSTError(f"model config 'hist_features_norm' must be 'imagenet' or 'none', "
                          f"got {cfg['hist_features_norm']!r}")
    for key in ("hist_features_patch", "hist_features_input", "hist_features_dim"):
        if cfg[key] is not None:
            cfg[key] = int(cfg[key])
            if cfg[key] < 1:
                raise DiffSTError(f"model config {key!r} must be None or >= 1, got {cfg[key]}")
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
        extractor = make_feature_extractor(cfg["hist_features"], cfg)
        if extractor is not None:
            if cfg["hist_features_dim"] is not None and cfg["hist_features_dim"] != extractor.out_channels:
                raise DataFormatError(None, f"hist_features {cfg['hist_features']!r} gives {extractor.out_channels} "
                                      "channels", f"{cfg['hist_features_dim']} channels (hist_features_dim)")
            cfg["hist_features_dim"] = int(extractor.out_channels)
        self.histology = HistologyEncoder(
            cfg["he_per_hr"], ch_h, hier=cfg["use_hier"], cell_patch_px=cfg["cell_patch_px"],
            entropy_bins=cfg["entropy_bins"], gamma_start=cfg["gamma_start"], gamma_end=cfg["gamma_end"],
            heads=cfg["attn_heads"], posenc=cfg["hier_posenc"], context_blocks=cfg["hist_context_blocks"],
            extractor=extractor)
        self.time_embed = TimeEmbedding(base, emb)
        self.gene_graph = GeneGraph(G, cfg["cigc_dim"], cfg["cigc_alpha"]) if cfg["use_cigc"] else None
        # genes per U-Net pass: all G, or a chunk of ``gene_chunk`` genes (the last chunk zero-padded)
        c = cfg["gene_chunk"] if 0 < cfg["gene_chunk"] < G else 0
        self.chunk = c
        self.n_chunks = -(-G // c) if c else 1
        gu = c or G
        cin = gu + gu + 1 + (gu * cfg["cigc_dim"] if cfg["use_cigc"] else 0) + (0 if cfg["use_cam"] else ch_h)
        self.distill = None
        if cfg["distill"]:
            hd = cfg["distill_hidden"]
            self.distill = nn.Sequential(nn.Conv2d(ch_h + G + 1, hd, 3, padding=1), nn.SiLU(),
                                         nn.Conv2d(hd, hd, 3, padding=1), nn.SiLU(), nn.Conv2d(hd, G, 1))
            cin += gu
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
        self.out_conv = nn.Conv2d(prev, gu, 3, padding=1)
        # options created last, so the default network draws the same initial weights as before
        self.align = SpatialAlign(ch_h, G, cfg["align_hidden"], cfg["align_max_offset"]) if cfg["use_align"] else None
        self.chunk_embed = None
        if self.chunk:
            self.chunk_embed = nn.Embedding(self.n_chunks, emb)
            nn.init.normal_(self.chunk_embed.weight, std=0.1)
        #: chunks stacked into one batch per U-Net pass (1 = one chunk at a time: least memory); runtime only
        self.chunk_parallel = 1
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
        if self.config.get("use_align"):
            w["align_smooth"] = self.config["align_weight"]
        return w

    # ---- gene chunks ----------------------------------------------------------------------------
    def chunk_genes(self, j: int) -> range:
        """Gene indices of chunk ``j`` (the last chunk may be shorter than ``gene_chunk``)."""
        G = self.config["n_genes"]
        if not self.chunk:
            return range(G)
        return range(j * self.chunk, min(G, (j + 1) * self.chunk))

    def sample_train_chunks(self, generator: torch.Generator | None = None, device=None) -> torch.Tensor | None:
        """The chunks to train on this step (``gene_chunk_train`` of them, sorted; same for the whole batch), or
        None for all genes. The trainer passes them as ``cond['gene_chunks']`` and restricts the loss to
        :meth:`gene_mask`."""
        n = self.config["gene_chunk_train"]
        if not self.chunk or n <= 0 or n >= self.n_chunks:
            return None
        dev = device if device is not None else (generator.device if generator is not None else "cpu")
        return torch.randperm(self.n_chunks, generator=generator, device=dev)[:n].sort().values

    def gene_mask(self, chunks: torch.Tensor | None, device=None) -> torch.Tensor:
        """(1, G, 1, 1) float: 1 for the genes of ``chunks`` (all genes when None)."""
        G = self.config["n_genes"]
        m = torch.zeros(1, G, 1, 1, device=device)
        if chunks is None:
            return m + 1
        for j in chunks.tolist():
            r = self.chunk_genes(int(j))
            m[:, r.start:r.stop] = 1
        return m

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
        ch = cond.get("gene_chunks")
        if ch is not None:
            ch = torch.as_tensor(ch).reshape(-1)
            if not self.chunk or ch.numel() == 0 or int(ch.min()) < 0 or int(ch.max()) >= self.n_chunks:
                raise DataFormatError(None, f"cond['gene_chunks'] = {ch.tolist()}",
                                      f"chunk indices in [0, {self.n_chunks}) of a model with gene_chunk > 0")
        return t

    def _unet(self, h: torch.Tensor, emb: torch.Tensor, hist_levels, mask_levels):
        """U-Net body from the in_conv input to the out_conv output; returns (out, [CAM losses])."""
        h = self.in_conv(h)
        skips, losses = [], []
        for i, blocks in enumerate(self.enc):
            for blk in blocks:
                h = blk(h, emb)
            if self.cam is not None:
                h, loss = self.cam[i](h, hist_levels[i], mask_levels[i])
                losses.append(loss)
            skips.append(h)
            h = self.down[i](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks, up in zip(self.dec, self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for blk in blocks:
                h = blk(h, emb)
            h = up(h)
        return self.out_conv(F.silu(self.out_norm(h))), losses

    def _cigc_nodes(self, x_in: torch.Tensor, genes: list[int]) -> torch.Tensor:
        """CIGC node features of all G genes (B, G, D, H, W), encoded one gene chunk at a time. Only the genes
        in ``genes`` (those trained this step) keep gradients; the others enter the graph convolution as
        constants, which bounds training memory. Under ``no_grad`` only one chunk's intermediates exist at once."""
        gg = self.gene_graph
        want = set(genes)
        feats = []
        for j in range(self.n_chunks):
            r = self.chunk_genes(j)
            idx = torch.arange(r.start, r.stop, device=x_in.device)
            if torch.is_grad_enabled() and not (set(r) & want):  # a chunk not trained this step
                with torch.no_grad():
                    feats.append(gg.node_features(x_in[:, r.start:r.stop], idx))
            else:
                feats.append(gg.node_features(x_in[:, r.start:r.stop], idx))
        return torch.cat(feats, 1) if len(feats) > 1 else feats[0]

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
        aux = {}
        if self.align is not None:
            # deformable alignment of the histology features to the LR expression (identity at init)
            hist, offsets = self.align(hist, lr_up_p, lr_mask)
            aux["align_smooth"] = smoothness_loss(offsets)
        emb = self.time_embed(t)
        detail = None
        if self.distill is not None:
            # semantic distillation (HaDM-ST): expression detail predicted from histology + LR alone
            detail = self.distill(torch.cat([hist, lr_up_p, lr_mask], dim=1))
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
        hist_levels, mask_levels = [], []
        if self.cam is not None:
            for i in range(len(self.enc)):
                f = 2 ** i
                hist_levels.append(F.avg_pool2d(hist, f) if f > 1 else hist)
                mask_levels.append(None if hr_mask is None else
                                   (F.avg_pool2d(hr_mask.to(x_t.dtype), f) if f > 1 else hr_mask.to(x_t.dtype)))

        if not self.chunk:
            parts = [x_in]
            if self.gene_graph is not None:
                parts.append(self.gene_graph(x_in).reshape(B, -1, Hp, Wp))
            parts += [lr_up_p, lr_mask]
            if self.cam is None:
                parts.append(hist)
            if detail is not None:
                parts.append(detail)
            net, losses = self._unet(torch.cat(parts, dim=1), emb, hist_levels, mask_levels)
            out = net[:, :, :H, :W]
        else:
            out, losses = self._forward_chunks(x_in, lr_up_p, lr_mask, hist, detail, emb, hist_levels, mask_levels,
                                               cond.get("gene_chunks"))
            out = out[:, :, :H, :W]
        if cfg["residual_lr"]:
            out = out + lr_up
        dis = torch.stack(losses).mean() if losses else x_t.new_zeros(())
        aux["disentangle"] = dis
        return out, aux

    def _forward_chunks(self, x_in, lr_up, lr_mask, hist, detail, emb, hist_levels, mask_levels, chunks):
        """The U-Net on gene chunks; every chunk reuses the tile's histology features, CIGC graph and distillation
        output. ``chunks`` (None = all) selects which chunks are computed; the other genes' outputs are 0
        (before the residual LR is added). ``chunk_parallel`` chunks are stacked into one batch per pass."""
        B, G, Hp, Wp = x_in.shape
        c = self.chunk
        ids = list(range(self.n_chunks)) if chunks is None else [int(j) for j in torch.as_tensor(chunks).reshape(-1)]
        genes = [g for j in ids for g in self.chunk_genes(j)]
        nodes = self._cigc_nodes(x_in, genes) if self.gene_graph is not None else None   # (B, G, D, Hp, Wp)
        zero = x_in.new_zeros(B, 1, Hp, Wp)

        def chunk_input(j):
            r = self.chunk_genes(j)
            padn = c - len(r)

            def take(v):
                s = v[:, r.start:r.stop]
                return torch.cat([s, zero.expand(B, padn, Hp, Wp)], 1) if padn else s

            parts = [take(x_in)]
            if nodes is not None:  # graph convolution for this chunk's rows only (each row sees all G genes)
                rows = torch.arange(r.start, r.stop, device=x_in.device)
                d = self.gene_graph.mix(nodes, rows).reshape(B, -1, Hp, Wp)
                if padn:
                    d = torch.cat([d, zero.expand(B, padn * self.config["cigc_dim"], Hp, Wp)], 1)
                parts.append(d)
            parts += [take(lr_up), lr_mask]
            if self.cam is None:
                parts.append(hist)
            if detail is not None:
                parts.append(take(detail))
            return torch.cat(parts, 1)

        outs = {}
        losses = []
        step = max(1, int(self.chunk_parallel))
        for s in range(0, len(ids), step):
            group = ids[s:s + step]
            n = len(group)
            h = torch.cat([chunk_input(j) for j in group], 0)
            e = torch.cat([emb + self.chunk_embed.weight[j].to(emb.dtype) for j in group], 0)
            hl = [v.repeat(n, 1, 1, 1) for v in hist_levels] if n > 1 else hist_levels
            ml = [None if v is None else v.repeat(n, 1, 1, 1) for v in mask_levels] if n > 1 else mask_levels
            net, ls = self._unet(h, e, hl, ml)
            losses += ls
            for i, j in enumerate(group):
                outs[j] = net[i * B:(i + 1) * B]
        full = []
        for j in range(self.n_chunks):
            r = self.chunk_genes(j)
            full.append(outs[j][:, :len(r)] if j in outs else x_in.new_zeros(B, len(r), Hp, Wp))
        return torch.cat(full, 1), losses


def build_model(config: dict | None = None, load_weights: bool = True) -> DiffSTDenoiser:
    """Build a :class:`DiffSTDenoiser` from a (partial) config dict; missing keys take defaults.

    ``load_weights=False`` skips ``encoder_weights`` (use it when restoring a full checkpoint, whose
    state dict already holds the encoder)."""
    return DiffSTDenoiser(config, load_weights=load_weights)
