"""The Diff-ST training loop as a generator of typed events.

Usage (headless, CLI or a napari thread worker)::

    trainer = Trainer(model, TrainConfig.from_preset("quick", out_dir="runs/a"), fields=fields)
    for ev in trainer.iter_train():          # or trainer.run()
        print(ev.kind, ev.step, ev.losses)    # 'step' | 'checkpoint' | 'done' | 'cancelled' | 'error'
    # elsewhere (e.g. a Cancel button):  trainer.cancel()

Batches come from ``batch_fn(step, rng) -> dict`` (``rng`` the trainer's numpy Generator) or from
``fields`` via :func:`napari_diffst.data.pairs.random_patches`. A batch dict holds, in diffusion units [-1, 1]
(what :func:`patches_to_batch` produces): ``x0`` (B, G, H, W) the HR target, ``lr_up`` (B, G, H, W), ``lr_mask``
(B, 1, H, W), ``he`` (B, 3, H·k, W·k) in [0, 1] and optionally ``hr_mask`` (B, 1, H, W) for the masked loss;
numpy arrays are accepted.

Per step: ``t ~ U{0..T−1}`` and ε ~ N(0, I) from the trainer's torch generator, masked loss
(:meth:`GaussianDiffusion.training_losses`), AdamW, gradient clipping, EMA update.

Engine options handled here: a network with gene chunks (``model.sample_train_chunks``, model config
``gene_chunk_train``) is trained on a random subset of its gene chunks per step, the loss restricted to those
genes (``model.gene_mask``); ``TrainConfig.adv_weight`` > 0 adds the channel-aware adversarial term and steps a
per-gene discriminator (:mod:`napari_diffst.model.adversarial`) after every generator step (its weights and
optimizer are saved in checkpoints and restored on resume). Cancelling
(:meth:`Trainer.cancel` or ``should_stop()``) is checked between steps; the current state is then saved
(``checkpoint_on_cancel``) — checkpoints are written atomically, so the previous one stays valid in any case.
Closing the generator (``gen.close()`` / ``break``) abandons the run without saving.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..device import autocast, oom_guard, resolve_device
from ..diffusion.schedule import GaussianDiffusion
from ..errors import DataFormatError, DiffSTError
from .checkpoint import (capture_rng_state, read_checkpoint, restore_rng_state, save_checkpoint,
                         resolve_callable)
from .config import TrainConfig

__all__ = ["Trainer", "TrainEvent", "patches_to_batch", "fields_batch_fn", "synthetic_batch_fn",
           "diffusion_from_config", "BATCH_KEYS"]

BATCH_KEYS = ("x0", "lr_up", "lr_mask", "he", "hr_mask")
EVENT_KINDS = ("step", "checkpoint", "done", "error", "cancelled")


@dataclass
class TrainEvent:
    """One event of a training run.

    ``kind``: 'step' (every ``log_every`` steps; ``losses`` averaged since the previous one), 'checkpoint'
    (``checkpoint`` is the folder), 'done', 'cancelled' (after the cancel checkpoint), 'error' (``error`` holds the
    exception; the generator re-raises it right after)."""

    kind: str
    step: int
    total_steps: int
    losses: dict = field(default_factory=dict)
    lr: float = 0.0
    eta_s: float | None = None
    samples_per_s: float | None = None
    steps_per_s: float | None = None
    elapsed_s: float = 0.0
    checkpoint: str | None = None
    message: str = ""
    error: BaseException | None = None

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("kind", "step", "total_steps", "losses", "lr", "eta_s",
                                           "samples_per_s", "steps_per_s", "elapsed_s", "checkpoint", "message")}
        if self.error is not None:
            d["error"] = f"{type(self.error).__name__}: {self.error}"
        return d


# ---------------------------------------------------------------------------------------------- data
def patches_to_batch(p, upsample: str = "nearest") -> dict:
    """:class:`~napari_diffst.data.pairs.Patches` (model units) → a training batch in diffusion units.

    The LR map and its mask are upsampled to the HR grid (``'nearest'`` = block copy, ``'bilinear'``); values
    map ``v → 2v − 1``; H&E stays in [0, 1]."""
    lr = torch.from_numpy(np.ascontiguousarray(p.lr, dtype=np.float32))
    hr = torch.from_numpy(np.ascontiguousarray(p.hr, dtype=np.float32))
    s = hr.shape[-1] // lr.shape[-1]
    if s * lr.shape[-1] != hr.shape[-1] or s * lr.shape[-2] != hr.shape[-2]:
        raise DataFormatError(None, f"HR patch {tuple(hr.shape[-2:])} is not an integer multiple of the LR patch "
                              f"{tuple(lr.shape[-2:])}", "hr size = lr size × scale")
    if getattr(p, "lr_up", None) is not None and upsample == "cubic":
        lr_up = torch.from_numpy(np.ascontiguousarray(p.lr_up, dtype=np.float32))
    elif upsample == "nearest":
        lr_up = F.interpolate(lr, scale_factor=s, mode="nearest")
    elif upsample == "bilinear":
        lr_up = F.interpolate(lr, scale_factor=s, mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"upsample must be 'nearest', 'bilinear' or 'cubic' (fields' edge-aware cubic), "
                         f"not {upsample!r}")
    lr_mask = F.interpolate(torch.from_numpy(np.ascontiguousarray(p.lr_mask, dtype=np.float32)),
                            scale_factor=s, mode="nearest")
    return {"x0": hr * 2 - 1, "lr_up": lr_up * 2 - 1, "lr_mask": lr_mask,
            "he": torch.from_numpy(np.ascontiguousarray(p.he, dtype=np.float32)),
            "hr_mask": torch.from_numpy(np.ascontiguousarray(p.hr_mask, dtype=np.float32))}


def fields_batch_fn(fields, batch_size: int, lr_size: int, upsample: str = "nearest", augment: bool = True,
                    min_valid: float = 0.3) -> Callable:
    """``batch_fn(step, rng)`` drawing :func:`random_patches` from ``fields`` (list of SRField)."""
    from ..data.pairs import random_patches

    def batch_fn(step, rng):
        return patches_to_batch(random_patches(fields, batch_size, lr_size, rng, augment=augment,
                                               min_valid=min_valid, with_lr_up=upsample == "cubic"), upsample)

    return batch_fn


def synthetic_batch_fn(batch_size: int = 4, genes: int = 4, lr_size: int = 8, scale: int = 2,
                       he_per_hr: int = 2, **_ignored) -> Callable:
    """A toy data source (smoke tests, benchmarking the loop): smooth random HR maps, their block-averaged LR
    map and an 'H&E' image that carries the HR structure."""
    def batch_fn(step, rng):
        H = lr_size * scale
        yy, xx = np.mgrid[0:H, 0:H] / H
        hr = np.empty((batch_size, genes, H, H), np.float32)
        for b in range(batch_size):
            for g in range(genes):
                fy, fx, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
                hr[b, g] = 0.5 + 0.4 * np.sin(2 * np.pi * (fy * yy + fx * xx) + ph)
        lr = hr.reshape(batch_size, genes, lr_size, scale, lr_size, scale).mean((3, 5))
        lr_up = np.repeat(np.repeat(lr, scale, 2), scale, 3)
        he = np.repeat(np.repeat(np.clip(hr[:, :3] if genes >= 3 else np.repeat(hr[:, :1], 3, 1), 0, 1),
                                 he_per_hr, 2), he_per_hr, 3)
        ones = np.ones((batch_size, 1, H, H), np.float32)
        return {"x0": hr * 2 - 1, "lr_up": lr_up * 2 - 1, "lr_mask": ones, "he": he.astype(np.float32),
                "hr_mask": ones}

    return batch_fn


def diffusion_from_config(cfg: TrainConfig, aux_weights: dict | None = None) -> GaussianDiffusion:
    """The :class:`GaussianDiffusion` of a training config (``aux_weights`` default: ``cfg.aux_weights``)."""
    return GaussianDiffusion.from_config({"schedule": cfg.schedule, "T": cfg.timesteps, "target": cfg.target,
                                          "aux_weights": cfg.aux_weights if aux_weights is None else aux_weights})


def _seed_int(*parts) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Trains a Diff-ST denoiser (``model(x_t, t, cond) -> (out, aux)``).

    Parameters
    ----------
    model : the network (moved to the device); ``model.set_progress(frac)`` is called before every step when
        present; ``model.config`` is saved in checkpoints
    config : :class:`TrainConfig` (default: the 'quick' preset)
    batch_fn / fields : the data (one of them); see the module docstring
    genes, gene_scale, provenance : saved in checkpoints (taken from ``fields`` when not given)
    out_dir : checkpoint folder (default ``config.out_dir``; None = no checkpoints)
    should_stop : polled between steps; True cancels like :meth:`cancel`
    rank, world_size : set by :mod:`napari_diffst.train.ddp`; with world_size > 1 the model is wrapped in
        DistributedDataParallel, only rank 0 writes checkpoints and yields events, each rank draws its own data

    Determinism: the trainer owns a numpy Generator (data) and a torch Generator (t, ε), both seeded from
    ``(config.seed, rank)``, and re-seeds torch's global RNG and python ``random`` (dropout etc.) at construction.
    Event ``losses`` hold the averaged ``loss``, ``mse``, each aux loss and ``grad_norm`` (before clipping).
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig | None = None, *, batch_fn=None,
                 fields=None, genes=None, gene_scale=None, provenance: dict | None = None, out_dir=None,
                 should_stop: Callable[[], bool] | None = None, device=None, rank: int = 0, world_size: int = 1):
        cfg = config if config is not None else TrainConfig.from_preset("quick")
        self.config = cfg
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = resolve_device(device if device is not None else cfg.device)
        if batch_fn is None and fields is None:
            raise DiffSTError("Trainer needs training data: pass batch_fn=... or fields=[SRField, ...]")
        if fields is not None:
            fields = list(fields)
            with_truth = [f for f in fields if f.hr is not None]
            if not with_truth:
                raise DiffSTError("none of the training fields has HR truth (SRField.hr is None)")
            g0 = list(with_truth[0].genes)
            for f in with_truth[1:]:
                if list(f.genes) != g0:
                    raise DataFormatError(None, f"field {f.name!r} has a different gene list than "
                                          f"{with_truth[0].name!r}", "the same genes in the same order")
            genes = g0 if genes is None else genes
            gene_scale = with_truth[0].gene_scale if gene_scale is None else gene_scale
            provenance = {"fields": [f.name for f in with_truth], **(provenance or {})}
            if batch_fn is None:
                batch_fn = fields_batch_fn(with_truth, cfg.batch_size, cfg.lr_size, cfg.upsample, cfg.augment,
                                           cfg.min_valid)
        self.batch_fn = batch_fn
        self.genes = list(genes) if genes is not None else None
        self.gene_scale = None if gene_scale is None else np.asarray(gene_scale, dtype=np.float64)
        self.provenance = dict(provenance or {})
        out_dir = out_dir if out_dir is not None else cfg.out_dir
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.should_stop = should_stop
        self._cancel = False

        mcfg = getattr(model, "config", None)
        if isinstance(mcfg, dict):
            for key in ("predict", "target"):
                if key in mcfg and mcfg[key] != cfg.target:
                    raise DiffSTError(f"the network is configured for {key}={mcfg[key]!r} but the training config "
                                      f"says target={cfg.target!r}; make them agree")
        # aux-loss weights: the network's suggestions (``model.aux_weights``), overridden by the config
        aux_w = dict(getattr(model, "aux_weights", None) or {})
        aux_w.update(cfg.aux_weights or {})
        self.diffusion = diffusion_from_config(cfg, aux_weights=aux_w)

        if cfg.deterministic:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        # deterministic seeds: per-rank data / noise streams, and the global RNGs (dropout etc.)
        self.np_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, self.rank]))
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(_seed_int(cfg.seed, self.rank, 1))
        torch.manual_seed(_seed_int(cfg.seed, self.rank, 2))
        random.seed(_seed_int(cfg.seed, self.rank, 3))

        self.model = model.to(self.device)
        self.model.train()
        self.net = self.model
        if self.world_size > 1:  # DDP broadcasts rank 0's weights to all ranks here
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DDP(self.model, device_ids=ids, output_device=ids[0] if ids else None,
                           find_unused_parameters=cfg.ddp_find_unused_parameters)
        self.ema = copy.deepcopy(self.model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           weight_decay=cfg.weight_decay)
        self.discriminator = self.disc_net = self.disc_optimizer = None
        if cfg.adv_weight and cfg.adv_weight > 0:
            self._build_discriminator(mcfg)
        self.step = 0
        self.checkpoint_threads: int | None = None  # set by load_state
        self.last_checkpoint: Path | None = None
        self._checked_batch = False
        #: saved as the checkpoint's ``method`` entry (set by :class:`napari_diffst.method.DiffST`: its prior,
        #: shrink and knobs travel with every checkpoint, periodic ones included, so a resumed run keeps them)
        self.method_state: dict | None = None

    def _build_discriminator(self, mcfg) -> None:
        from ..model.adversarial import GeneDiscriminator

        cfg = self.config
        n_genes = (mcfg or {}).get("n_genes") if isinstance(mcfg, dict) else None
        n_genes = n_genes or (len(self.genes) if self.genes else None)
        if not n_genes:
            raise DiffSTError("adv_weight > 0 needs the number of genes: a network with config['n_genes'] or "
                              "Trainer(genes=[...])")
        torch.manual_seed(_seed_int(cfg.seed, self.rank, 4))
        self.discriminator = GeneDiscriminator(int(n_genes), cfg.adv_hidden).to(self.device)
        torch.manual_seed(_seed_int(cfg.seed, self.rank, 2))  # the global stream as without the discriminator
        self.disc_net = self.discriminator
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.disc_net = DDP(self.discriminator, device_ids=ids, output_device=ids[0] if ids else None)
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.adv_lr or cfg.lr,
                                               betas=tuple(cfg.adv_betas))

    # ------------------------------------------------------------------ control
    def cancel(self) -> None:
        """Ask the run to stop after the current step (thread-safe: sets a flag)."""
        self._cancel = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def lr_at(self, step: int) -> float:
        """Learning rate for the step with 0-based index ``step`` (linear warm-up, then constant or cosine)."""
        cfg = self.config
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            prog = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
            return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))
        return cfg.lr

    # ------------------------------------------------------------------ one step
    def _to_device(self, batch: dict) -> dict:
        if not isinstance(batch, dict) or "x0" not in batch:
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise DataFormatError(None, f"batch_fn returned {got}",
                                  "a dict with 'x0' (B,G,H,W in [-1,1]) and 'lr_up', 'lr_mask', 'he', "
                                  "optional 'hr_mask'")
        out = {}
        for k, v in batch.items():
            if isinstance(v, np.ndarray):
                v = torch.from_numpy(np.ascontiguousarray(v))
            if torch.is_tensor(v):
                v = v.to(self.device, dtype=torch.float32 if v.is_floating_point() else v.dtype,
                         non_blocking=True)
            out[k] = v
        if not self._checked_batch:
            x0 = out["x0"]
            if x0.ndim != 4:
                raise DataFormatError(None, f"batch 'x0' has shape {tuple(x0.shape)}", "(B, G, H, W)")
            if "lr_up" in out and tuple(out["lr_up"].shape) != tuple(x0.shape):
                raise DataFormatError(None, f"batch 'lr_up' {tuple(out['lr_up'].shape)} does not match 'x0' "
                                      f"{tuple(x0.shape)}", "LR maps upsampled to the HR grid")
            self._checked_batch = True
        return out

    def _ema_update(self):
        cfg = self.config
        decay = cfg.ema_decay
        if cfg.ema_warmup:
            decay = min(decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            ema_p = [p for p in self.ema.parameters()]
            src_p = [p.detach() for p in self.model.parameters()]
            floats = [(e, s) for e, s in zip(ema_p, src_p) if e.is_floating_point()]
            if floats:
                torch._foreach_lerp_([e for e, _ in floats], [s for _, s in floats], 1.0 - decay)
            for e, s in zip(self.ema.buffers(), self.model.buffers()):
                e.copy_(s)

    def _adv_inputs(self, x: torch.Tensor, lr_up: torch.Tensor, mask, genes: torch.Tensor):
        from ..model.adversarial import gene_maps

        B, n = x.shape[0], genes.numel()
        m = mask.repeat_interleave(n, 0) if mask is not None else None
        return gene_maps(x, genes), gene_maps(lr_up, genes), m, genes.repeat(B)

    def _adv_genes(self, chunks) -> torch.Tensor:
        """Genes the discriminator judges this step: those being trained, at most ``adv_max_genes``."""
        G = self.discriminator.n_genes
        if chunks is not None and hasattr(self.model, "gene_mask"):
            cand = torch.nonzero(self.model.gene_mask(chunks).reshape(-1)).reshape(-1).to(self.device)
        else:
            cand = torch.arange(G, device=self.device)
        n = self.config.adv_max_genes
        if cand.numel() > n:
            cand = cand[torch.randperm(cand.numel(), generator=self.gen, device=self.device)[:n]].sort().values
        return cand

    def train_step(self) -> dict:
        """One optimisation step; returns the (detached) losses and ``grad_norm`` (plus ``adv_g`` / ``adv_d`` with
        adversarial training)."""
        cfg = self.config
        if hasattr(self.model, "set_progress"):
            self.model.set_progress(self.step / cfg.steps)
        batch = self._to_device(self.batch_fn(self.step, self.np_rng))
        x0 = batch.pop("x0")
        batch["x0_target"] = x0  # for auxiliary heads only (e.g. distillation); never an input of the denoiser
        B = x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=self.gen, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
        # gene chunks (many-gene panels): train a random subset of chunks, loss on their genes only
        chunks = self.model.sample_train_chunks(self.gen, self.device) \
            if hasattr(self.model, "sample_train_chunks") else None
        mask = batch.get("hr_mask")
        if chunks is not None:
            batch["gene_chunks"] = chunks
            gm = self.model.gene_mask(chunks, self.device)
            mask = gm if mask is None else mask * gm
        adv = self.discriminator is not None
        captured: dict = {}

        def capture(x_t, tt, cond, _net=self.net):  # keeps x_t and the output for the x0 prediction
            res = _net(x_t, tt, cond)
            captured["x_t"], captured["out"] = x_t, (res[0] if isinstance(res, tuple) else res)
            return res

        net = capture if adv else self.net
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with oom_guard("training", batch_size=B, tile=cfg.lr_size, tile_name="LR patch size (lr_size)",
                       device=self.device if self.device.type != "cpu" else None):
            with autocast(self.device, cfg.amp):
                losses = self.diffusion.training_losses(net, x0, batch, t, mask=mask, noise=noise)
                if adv:
                    from ..model.adversarial import generator_adv_loss

                    x0_pred = self.diffusion.split_model_output(captured["out"].float(), captured["x_t"], t,
                                                                clip_x0=self.diffusion.target != "x0")[0]
                    genes = self._adv_genes(chunks)
                    hr_mask = batch.get("hr_mask")
                    for p in self.discriminator.parameters():
                        p.requires_grad_(False)
                    fake, lr_maps, m, gi = self._adv_inputs(x0_pred, batch["lr_up"], hr_mask, genes)
                    adv_g = generator_adv_loss(self.discriminator(fake, lr_maps, m, gi), m)
                    for p in self.discriminator.parameters():
                        p.requires_grad_(True)
                    losses["adv_g"] = adv_g
                    losses["loss"] = losses["loss"] + float(cfg.adv_weight) * adv_g
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            else:
                gn = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in
                                                           self.model.parameters() if p.grad is not None]))
            self.optimizer.step()
            if adv:  # discriminator step: real = HR truth, fake = this step's x0 prediction
                from ..model.adversarial import discriminator_loss

                with autocast(self.device, cfg.amp):
                    real, lr_maps, m, gi = self._adv_inputs(x0, batch["lr_up"], hr_mask, genes)
                    fake = self._adv_inputs(x0_pred.detach(), batch["lr_up"], hr_mask, genes)[0]
                    n = real.shape[0]
                    logits = self.disc_net(torch.cat([real, fake]), torch.cat([lr_maps, lr_maps]),
                                           torch.cat([m, m]) if m is not None else None, torch.cat([gi, gi]))
                    d_loss = discriminator_loss(logits[:n], logits[n:], m)
                self.disc_optimizer.zero_grad(set_to_none=True)
                d_loss.backward()
                if cfg.grad_clip and cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), cfg.grad_clip)
                self.disc_optimizer.step()
                losses["adv_d"] = d_loss
        self.step += 1
        self._ema_update()
        out = {k: v.detach().float() for k, v in losses.items()}
        out["grad_norm"] = gn.detach().float()
        self._last_lr = lr
        return out

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory=None) -> Path | None:
        """Write the full state (rank 0 only; returns the folder, None on other ranks / without a folder)."""
        directory = Path(directory) if directory is not None else self.out_dir
        if directory is None or not self.is_main:
            return None
        save_checkpoint(directory, model=self.model, ema_model=self.ema, optimizer=self.optimizer, step=self.step,
                        train_config=self.config.to_dict(), diffusion_config=self.diffusion.config,
                        genes=self.genes, gene_scale=self.gene_scale, provenance=self.provenance,
                        rng_state=capture_rng_state(self.np_rng, self.gen),
                        extra={"world_size": self.world_size, "cpu_threads": torch.get_num_threads()
                               if self.device.type == "cpu" else None},
                        discriminator=self.discriminator,
                        disc_optimizer=self.disc_optimizer, method=self.method_state)
        self.last_checkpoint = directory
        return directory

    def load_state(self, state: dict, restore_rng: bool = True) -> None:
        """Restore model, EMA, optimizer, step, metadata and (rank 0) RNG states from a raw checkpoint dict."""
        self.model.load_state_dict(state["model"])
        if state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        else:
            self.ema.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.discriminator is not None and state.get("discriminator") is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            if state.get("disc_optimizer") is not None:
                self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.step = int(state.get("step", 0))
        # CPU float results depend on torch's intra-op thread count (how sums are split): the run that wrote the
        # checkpoint used this many; a resume with another count continues, but not bit for bit
        # (:meth:`match_checkpoint_threads`). None for checkpoints written before it was recorded.
        saved = (state.get("extra") or {}).get("cpu_threads")
        self.checkpoint_threads = int(saved) if saved else None
        if self.genes is None and state.get("genes") is not None:
            self.genes = list(state["genes"])
        if self.gene_scale is None and state.get("gene_scale") is not None:
            self.gene_scale = np.asarray(state["gene_scale"], dtype=np.float64)
        if not self.provenance and state.get("provenance"):
            self.provenance = dict(state["provenance"])
        if restore_rng and state.get("rng"):
            if self.rank == 0:
                restore_rng_state(state["rng"], self.np_rng, self.gen)
            else:  # other ranks: fresh, distinct streams continuing from this step
                self.np_rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, self.rank,
                                                                            self.step]))
                self.gen.manual_seed(_seed_int(self.config.seed, self.rank, 1, self.step))
                torch.manual_seed(_seed_int(self.config.seed, self.rank, 2, self.step))

    def match_checkpoint_threads(self) -> str | None:
        """On CPU, use the CPU thread count of the run that wrote the resumed checkpoint, so that the resumed run
        ends with the uninterrupted run's weights bit for bit (float sums split over another number of threads
        round differently). Process-wide (:func:`torch.set_num_threads`): for a process that owns the run, such as
        ``napari-diffst train --resume``. Returns a one-line note when the count was changed, else None."""
        want, now = getattr(self, "checkpoint_threads", None), torch.get_num_threads()
        if self.device.type != "cpu" or not want or want == now:
            return None
        torch.set_num_threads(int(want))
        return (f"using {want} CPU thread{'s' if want > 1 else ''} as the run that wrote the checkpoint did (this "
                f"process had {now}), so the resumed run continues it bit for bit")

    @classmethod
    def from_checkpoint(cls, path, *, batch_fn=None, fields=None, builder=None, model=None,
                        overrides: dict | None = None, out_dir=None, should_stop=None, device=None, rank: int = 0,
                        world_size: int = 1) -> "Trainer":
        """Resume a run from a checkpoint folder. ``overrides`` change config entries (e.g. ``{'steps': 5000}``
        to train longer — note the LR schedule and curriculum follow the new total); the network is rebuilt with
        ``builder(model_config)`` (default: the saved ``model_factory`` or ``napari_diffst.model.build_model``)
        unless ``model`` is given. On CPU, resuming continues bit-for-bit, in this process or another one, with the
        thread count of the run that wrote the checkpoint (:meth:`match_checkpoint_threads`)."""
        state = read_checkpoint(path)
        cfgd = dict(state.get("train_config") or {})
        cfgd.update(overrides or {})
        cfg = TrainConfig.from_dict(cfgd)
        if model is None:
            if builder is None:
                if cfg.model_factory:
                    builder = resolve_callable(cfg.model_factory)
                else:
                    from ..model import build_model as builder  # type: ignore
            model = builder(copy.deepcopy(state.get("model_config")))
        tr = cls(model, cfg, batch_fn=batch_fn, fields=fields, genes=state.get("genes"),
                 gene_scale=state.get("gene_scale"), provenance=state.get("provenance"),
                 out_dir=out_dir if out_dir is not None else Path(path) if Path(path).suffix != ".pt"
                 else Path(path).parent, should_stop=should_stop, device=device, rank=rank,
                 world_size=world_size)
        tr.load_state(state)
        return tr

    # ------------------------------------------------------------------ the loop
    def _stop_requested(self) -> bool:
        stop = self._cancel or (self.should_stop is not None and bool(self.should_stop()))
        if self.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item() > 0)
        return stop

    def _event(self, kind, t0, n0, **kw) -> TrainEvent:
        el = time.perf_counter() - t0
        done = self.step - n0
        rate = done / el if el > 0 and done > 0 else None
        B = self.config.batch_size * self.world_size
        eta = (self.config.steps - self.step) / rate if rate else None
        return TrainEvent(kind=kind, step=self.step, total_steps=self.config.steps, lr=getattr(self, "_last_lr", 0.0),
                          eta_s=eta, steps_per_s=rate, samples_per_s=rate * B if rate else None, elapsed_s=el, **kw)

    def iter_train(self, stop_at: int | None = None) -> Iterator[TrainEvent]:
        """Train until ``config.steps`` (or ``stop_at``) yielding :class:`TrainEvent` s (rank 0 only).

        Ends with 'done' (a final checkpoint is written first when there is an output folder), 'cancelled'
        (after :meth:`cancel` / ``should_stop``; state saved if ``checkpoint_on_cancel``) or 'error' (then the
        exception — a :class:`DiffSTError` with advice for out-of-memory — is raised)."""
        cfg = self.config
        end = cfg.steps if stop_at is None else min(int(stop_at), cfg.steps)
        t0, n0 = time.perf_counter(), self.step
        sums: dict = {}
        count = 0
        emit = self.is_main
        try:
            while self.step < end:
                if self._stop_requested():
                    ck = self.save_checkpoint() if cfg.checkpoint_on_cancel else None
                    if emit:
                        yield self._event("cancelled", t0, n0, checkpoint=str(ck) if ck else
                                          (str(self.last_checkpoint) if self.last_checkpoint else None),
                                          message=f"cancelled at step {self.step}")
                    return
                if cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s:
                    break
                losses = self.train_step()
                for k, v in losses.items():
                    sums[k] = sums[k] + v if k in sums else v
                count += 1
                if self.step % cfg.log_every == 0 or self.step == end or self.step == n0 + 1:
                    avg = {k: float(v) / count for k, v in sums.items()}
                    sums, count = {}, 0
                    if not math.isfinite(avg.get("loss", 0.0)):
                        where = f"; the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
                        raise DiffSTError(f"training diverged: loss = {avg.get('loss')} at step {self.step}. "
                                          f"Lower the learning rate (lr={cfg.lr:g}, e.g. to {cfg.lr / 3:.2g}) or "
                                          f"keep grad_clip > 0{where}")
                    if emit:
                        yield self._event("step", t0, n0, losses=avg)
                if self.step % cfg.checkpoint_every == 0 and self.step < end:
                    ck = self.save_checkpoint()
                    if ck is not None and emit:
                        yield self._event("checkpoint", t0, n0, checkpoint=str(ck))
            ck = self.save_checkpoint()
            if self.world_size > 1:
                import torch.distributed as dist

                dist.barrier(device_ids=[self.device.index or 0]) if self.device.type == "cuda" else dist.barrier()
            if emit:
                if ck is not None:
                    yield self._event("checkpoint", t0, n0, checkpoint=str(ck))
                msg = "finished" if self.step >= cfg.steps else (
                    f"stopped at step {self.step}" + (" (time limit)" if self.step < end else ""))
                yield self._event("done", t0, n0, checkpoint=str(ck) if ck else None, message=msg)
        except GeneratorExit:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as an event, then re-raised
            if emit:
                yield self._event("error", t0, n0, message=str(exc), error=exc,
                                  checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)
            raise

    def run(self, stop_at: int | None = None) -> Iterator[TrainEvent]:
        """Alias of :meth:`iter_train` (a generator of :class:`TrainEvent`)."""
        return self.iter_train(stop_at=stop_at)

    def fit(self, on_event: Callable[[TrainEvent], None] | None = None, stop_at: int | None = None) -> TrainEvent | None:
        """Blocking form: consume :meth:`iter_train`, call ``on_event`` for each event, return the last one."""
        last = None
        for last in self.iter_train(stop_at=stop_at):
            if on_event is not None:
                on_event(last)
        return last
