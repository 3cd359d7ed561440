"""Reverse-process samplers as generators (DDPM ancestral, respaced, DDIM).

Every ``*_progressive`` sampler is a generator that yields one dict per reverse step::

    {"i": step number (0 … K−1), "t": original timestep just denoised (int), "n_steps": K,
     "x_t": the new sample x_{t−1} (B, G, H, W) in [-1, 1], "x0_pred": the step's prediction of x_0}

The last dict's ``x_t`` is the final sample. **Cancelling**: the consumer simply stops iterating (``break``,
or ``gen.close()``) — nothing runs between two ``next()`` calls, so no work is wasted and no state is left
behind. An optional ``should_stop()`` callable is polled before every step; when it returns True the generator
ends early (the consumer sees fewer than ``n_steps`` dicts). :func:`sample`, which returns a value, raises
:class:`~napari_diffst.errors.CancelledError` instead.

The network contract is ``model(x_t, t, cond) -> (out, aux)``, ``t`` long *original* timesteps (a respaced
schedule maps its indices back, :meth:`GaussianDiffusion.model_timesteps`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from ..errors import CancelledError
from .schedule import GaussianDiffusion, _call_model, to_model_units

__all__ = ["ddpm_sample_progressive", "ddim_sample_progressive", "sample_progressive", "sample",
           "final_sample", "make_generator", "diffusion_for_model"]


def make_generator(seed: int | torch.Generator | None, device) -> torch.Generator:
    """A torch.Generator on ``device`` (``seed`` may already be a generator; None → nondeterministic seed)."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=torch.device(device))
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _prepare(diffusion: GaussianDiffusion, steps):
    return diffusion if steps is None else diffusion.respace(steps)


def _progressive(model, shape, cond, diffusion: GaussianDiffusion, *, kind: str, eta: float,
                 generator, clip_x0: bool, x_T, should_stop, device, amp, noise_fn=None) -> Iterator[dict]:
    if device is None:
        tensors = [v for v in cond.values() if torch.is_tensor(v)]
        device = x_T.device if x_T is not None else tensors[0].device if tensors else "cpu"
    device = torch.device(device)
    gen = make_generator(generator, device)
    with torch.no_grad():
        def draw(i):  # i = -1 for x_T, else the step number
            if noise_fn is not None:
                return noise_fn(i, tuple(shape)).to(device=device, dtype=torch.float32)
            return torch.randn(tuple(shape), generator=gen, device=device)

        x = x_T.to(device=device, dtype=torch.float32) if x_T is not None else draw(-1)
        n = diffusion.num_timesteps
        for i, idx in enumerate(range(n - 1, -1, -1)):
            if should_stop is not None and should_stop():
                return
            t = torch.full((x.shape[0],), idx, dtype=torch.long, device=device)
            with _autocast(device, amp):
                out, _ = _call_model(model, x, diffusion.model_timesteps(t), cond)
            out = out.float()
            if kind == "ddpm":
                noise = draw(i)
                step = diffusion.p_sample_step(out, x, t, noise, clip_x0=clip_x0)
            else:
                noise = draw(i) if eta > 0 else torch.zeros_like(x)
                step = diffusion.ddim_step(out, x, t, noise, eta=eta, clip_x0=clip_x0)
            x = step["sample"]
            yield {"i": i, "t": int(diffusion.timestep_map[idx]), "n_steps": n, "x_t": x,
                   "x0_pred": step["x0_pred"]}


def ddpm_sample_progressive(model, shape, cond: dict, diffusion: GaussianDiffusion, generator=None, *,
                            seed: int | None = None, steps: int | str | None = None, clip_x0: bool = True,
                            x_T: torch.Tensor | None = None, should_stop: Callable[[], bool] | None = None,
                            device=None, amp: bool = False, noise_fn=None) -> Iterator[dict]:
    """Ancestral sampling with Diff-ST Eq. 2, ``x_{t−1} ~ p_θ(x_{t−1} | x_t, y, h)`` from ``x_T ~ N(0, I)``.

    ``steps`` (int or section string) respaces the schedule (:func:`space_timesteps`, recomputed betas) — with
    ``steps = T`` the result equals the full sampler exactly for the same noise; None uses ``diffusion`` as is.
    ``generator`` (torch.Generator) or ``seed`` fixes the noise (x_T first, then one draw per step);
    ``noise_fn(i, shape)`` replaces the generator (``i = -1`` for x_T, then the step number), e.g. noise locked
    to slide positions so overlapping tiles share it (:mod:`napari_diffst.tiling`)."""
    return _progressive(model, shape, cond, _prepare(diffusion, steps), kind="ddpm", eta=1.0,
                        generator=generator if generator is not None else seed, clip_x0=clip_x0, x_T=x_T,
                        should_stop=should_stop, device=device, amp=amp, noise_fn=noise_fn)


def ddim_sample_progressive(model, shape, cond: dict, diffusion: GaussianDiffusion, generator=None, *,
                            seed: int | None = None, steps: int | str | None = None, eta: float = 0.0,
                            clip_x0: bool = True, x_T: torch.Tensor | None = None,
                            should_stop: Callable[[], bool] | None = None, device=None,
                            amp: bool = False, noise_fn=None) -> Iterator[dict]:
    """DDIM sampling (Song et al. 2021) over ``steps`` respaced timesteps; ``eta = 0`` is deterministic given
    ``x_T``, ``eta = 1`` matches ancestral DDPM on the same respaced schedule (fixed-small variance)."""
    return _progressive(model, shape, cond, _prepare(diffusion, steps), kind="ddim", eta=float(eta),
                        generator=generator if generator is not None else seed, clip_x0=clip_x0, x_T=x_T,
                        should_stop=should_stop, device=device, amp=amp, noise_fn=noise_fn)


def sample_progressive(model, shape, cond: dict, diffusion: GaussianDiffusion, *, sampler: str = "ddpm",
                       **kwargs) -> Iterator[dict]:
    """Dispatch to :func:`ddpm_sample_progressive` (``sampler='ddpm'``) or :func:`ddim_sample_progressive`."""
    if sampler == "ddpm":
        kwargs.pop("eta", None)
        return ddpm_sample_progressive(model, shape, cond, diffusion, **kwargs)
    if sampler == "ddim":
        return ddim_sample_progressive(model, shape, cond, diffusion, **kwargs)
    raise ValueError(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")


def final_sample(progressive: Iterator[dict]) -> torch.Tensor | None:
    """Run a progressive sampler to its end and return the final ``x_t`` (None if it stopped before any step)."""
    last = None
    for last in progressive:
        pass
    return None if last is None else last["x_t"]


def diffusion_for_model(model) -> GaussianDiffusion:
    """The diffusion a model was trained with: ``model.diffusion_config`` (set by
    :func:`napari_diffst.train.load_checkpoint`) or ``model.config['diffusion']``, else the defaults with the
    target taken from ``model.config['predict']`` when present."""
    mc = getattr(model, "config", None)
    mc = mc if isinstance(mc, dict) else {}
    cfg = getattr(model, "diffusion_config", None) or mc.get("diffusion") or {}
    cfg = dict(cfg)
    if "target" not in cfg and mc.get("predict") in ("eps", "x0", "v"):
        cfg["target"] = mc["predict"]
    return GaussianDiffusion.from_config(cfg)


def sample(model, cond: dict, n_samples: int = 8, steps: int | str | None = 50, sampler: str = "ddpm", *,
           eta: float = 0.0, diffusion: GaussianDiffusion | None = None, seed: int | torch.Generator | None = 0,
           batch_size: int | None = None, clip_x0: bool = True, should_stop: Callable[[], bool] | None = None,
           progress: Callable[[int, int], None] | None = None, output: str = "model", amp: bool | str = "auto",
           device=None, return_samples: bool = False):
    """Draw ``n_samples`` super-resolved maps per conditioning item and return their per-pixel mean and std.

    Parameters
    ----------
    cond : the network's condition dict for B items (``lr_up`` (B, G, H, W) in [-1, 1], ``lr_mask``, ``he``,
        optional ``hr_mask``); the output shape is taken from ``lr_up``
    n_samples : M samples per item (run batched, ``batch_size`` rows of the B·M at a time; default all)
    steps : number of respaced steps (None = the full schedule)
    sampler : ``'ddpm'`` (ancestral, Diff-ST Eq. 2) or ``'ddim'`` (with ``eta``)
    diffusion : the trained diffusion (default :func:`diffusion_for_model`)
    output : ``'model'`` → returned in model units (``v = (x+1)/2``), ``'diffusion'`` → in [-1, 1]
    progress : ``progress(done_steps, total_steps)`` after every reverse step
    should_stop : polled before every step; True raises :class:`CancelledError`

    Returns
    -------
    ``(mean, std)`` each (B, G, H, W) float32 on the model's device (population std over the M samples); with
    ``return_samples`` also the samples (M, B, G, H, W).
    """
    if output not in ("model", "diffusion"):
        raise ValueError("output must be 'model' or 'diffusion'")
    if n_samples < 1:
        raise ValueError("n_samples must be >= 1")
    diffusion = diffusion if diffusion is not None else diffusion_for_model(model)
    diffusion = _prepare(diffusion, steps)
    if device is None:
        try:
            device = next(model.parameters()).device
        except (StopIteration, AttributeError):
            device = cond["lr_up"].device
    device = torch.device(device)
    if amp == "auto":
        amp = device.type == "cuda"
    cond = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in cond.items()}
    B, G, H, W = cond["lr_up"].shape
    rows = B * n_samples
    bs = rows if not batch_size else max(1, int(batch_size))
    gen = make_generator(seed, device)
    item = torch.arange(rows, device=device) % B          # row r holds sample r // B of item r % B
    total = diffusion.num_timesteps * ((rows + bs - 1) // bs)
    done = 0
    acc = torch.float32 if device.type == "mps" else torch.float64
    s1 = torch.zeros((B, G, H, W), dtype=acc, device=device)
    s2 = torch.zeros_like(s1)
    keep = [] if return_samples else None
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for r0 in range(0, rows, bs):
            idx = item[r0:r0 + bs]
            c = {k: (v[idx] if torch.is_tensor(v) and v.shape[:1] == (B,) else v) for k, v in cond.items()}
            x = None
            for step in ddpm_sample_progressive(model, (len(idx), G, H, W), c, diffusion, gen, clip_x0=clip_x0,
                                                should_stop=should_stop, device=device, amp=amp) \
                    if sampler == "ddpm" else \
                    ddim_sample_progressive(model, (len(idx), G, H, W), c, diffusion, gen, eta=eta,
                                            clip_x0=clip_x0, should_stop=should_stop, device=device, amp=amp) \
                    if sampler == "ddim" else _bad_sampler(sampler):
                x = step["x_t"]
                done += 1
                if progress is not None:
                    progress(done, total)
            if x is None or step["i"] != step["n_steps"] - 1:
                raise CancelledError("sampling cancelled")
            if output == "model":
                x = to_model_units(x)
            xd = x.to(acc)
            s1.index_add_(0, idx, xd)
            s2.index_add_(0, idx, xd * xd)
            if keep is not None:
                keep.append(x)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    mean = s1 / n_samples
    std = (s2 / n_samples - mean * mean).clamp_min(0).sqrt()
    if return_samples:
        allx = torch.cat(keep, 0).reshape(n_samples, B, G, H, W)
        return mean.float(), std.float(), allx
    return mean.float(), std.float()


def _bad_sampler(sampler):
    raise ValueError(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")
