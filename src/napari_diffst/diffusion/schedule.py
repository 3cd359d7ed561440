"""Gaussian diffusion over gene-expression maps (no network inside).

Follows the notation of Ho et al. 2020 (DDPM) and Nichol & Dhariwal 2021 (improved-diffusion),
as used by Diff-ST (Wang et al., MICCAI 2024):

* forward process, Diff-ST Eq. 1: ``q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)`` — :meth:`GaussianDiffusion.q_sample`;
* reverse step, Diff-ST Eq. 2: ``p_θ(x_{t−1} | x_t, y, h) = N(μ_θ(x_t, t, y, h), Σ_t)`` with the LR map ``y`` and
  the H&E image ``h`` as conditions — :meth:`GaussianDiffusion.p_mean_variance`;
* training objective: the (masked) simple loss ``E‖target − f_θ(x_t, t, y, h)‖²`` — :meth:`GaussianDiffusion.training_losses`.

The schedule is defined by ``ᾱ_t`` (``alphas_cumprod``); ``β_t = 1 − ᾱ_t / ᾱ_{t−1}`` is derived from it by one
function, so a respaced schedule (:func:`space_timesteps`, :class:`SpacedDiffusion`) over *all* T steps is
bit-identical to the original one. Timestep indices are 0-based: index ``i`` is the paper's step ``t = i + 1``.

Data convention: the diffusion runs on values in [-1, 1]; :func:`to_diffusion_units` / :func:`to_model_units`
convert from / to the "model units" of :mod:`napari_diffst.data.pairs` (``x = 2v − 1``).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "linear_betas", "cosine_betas", "make_betas", "alphas_cumprod_from_betas", "betas_from_alphas_cumprod",
    "GaussianDiffusion", "SpacedDiffusion", "NoiseSchedule", "space_timesteps", "masked_mse",
    "to_diffusion_units", "to_model_units", "TARGETS", "SCHEDULES",
]

TARGETS = ("eps", "x0", "v")
SCHEDULES = ("linear", "cosine")


# ---------------------------------------------------------------------------------------------- schedules
def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Linear β schedule of DDPM (Ho et al. 2020, Sec. 4): β_1 = 1e-4 … β_T = 0.02 for T = 1000.

    For other T the end points are rescaled by ``1000 / T`` (improved-diffusion convention) so the
    total amount of noise stays comparable."""
    scale = 1000.0 / T
    return np.linspace(beta_start * scale, beta_end * scale, T, dtype=np.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17): ``ᾱ_t = f(t)/f(0)``,
    ``f(t) = cos²(((t/T) + s)/(1 + s) · π/2)``; ``β_t = 1 − ᾱ_t/ᾱ_{t−1}`` clipped to ``max_beta``."""
    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=np.float64)


def make_betas(schedule: str = "linear", T: int = 1000) -> np.ndarray:
    """β schedule by name (``'linear'`` or ``'cosine'``)."""
    if schedule == "linear":
        return linear_betas(T)
    if schedule == "cosine":
        return cosine_betas(T)
    raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {SCHEDULES}")


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """``ᾱ_t = ∏_{s≤t} (1 − β_s)`` (float64)."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def betas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """``β_t = 1 − ᾱ_t / ᾱ_{t−1}`` with ``ᾱ_0 := 1`` (the inverse of :func:`alphas_cumprod_from_betas`)."""
    acp = np.asarray(alphas_cumprod, dtype=np.float64)
    prev = np.append(1.0, acp[:-1])
    return 1.0 - acp / prev


def to_diffusion_units(v):
    """Model units (≈[0, 1]) → diffusion units [-1, 1]: ``x = 2v − 1``."""
    return v * 2.0 - 1.0


def to_model_units(x):
    """Diffusion units [-1, 1] → model units: ``v = (x + 1) / 2``."""
    return (x + 1.0) * 0.5


def _extract(arr: np.ndarray, t: torch.Tensor, ndim: int, dtype=torch.float32) -> torch.Tensor:
    """``arr[t]`` as a tensor on ``t``'s device, shaped (B, 1, 1, ...) for broadcasting over ``ndim`` dims."""
    src = torch.from_numpy(arr)
    if t.device.type == "mps":  # no float64 on Apple GPUs
        src = src.float()
    out = src.to(device=t.device)[t.long()].to(dtype)
    return out.reshape(out.shape + (1,) * (ndim - 1))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over valid pixels.

    ``mask`` (B, 1, H, W) (or broadcastable) weights pixels; each sample's error is averaged over its own valid
    pixels × channels, then over the batch (samples without a valid pixel contribute 0)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    m = mask.float().expand_as(err)
    dims = tuple(range(1, err.ndim))
    per = (err * m).sum(dims) / m.sum(dims).clamp_min(1.0)
    return per.mean()


# ---------------------------------------------------------------------------------------------- diffusion
class GaussianDiffusion:
    """A discrete Gaussian diffusion with T steps (improved-diffusion style; no network inside).

    Parameters
    ----------
    betas : β_1..β_T (float64), or use ``alphas_cumprod`` instead
    target : what the network predicts: ``'eps'`` (noise), ``'x0'`` (clean map) or ``'v'``
        (``v = √ᾱ ε − √(1−ᾱ) x_0``, Salimans & Ho 2022)
    var_type : ``'fixed_small'`` (Σ_t = β̃_t, posterior variance) or ``'fixed_large'`` (Σ_t = β_t)
    aux_weights : weights of the network's auxiliary losses (``aux`` dict) in the total loss;
        keys that are not listed get ``default_aux_weight``
    timestep_map : for respaced diffusions, the original timestep of each index (passed to the network)
    """

    def __init__(self, betas: np.ndarray | None = None, *, alphas_cumprod: np.ndarray | None = None,
                 target: str = "eps", var_type: str = "fixed_small", aux_weights: dict | None = None,
                 default_aux_weight: float = 1.0, timestep_map: Sequence[int] | None = None,
                 schedule: str | None = None):
        if target not in TARGETS:
            raise ValueError(f"unknown prediction target {target!r}; expected one of {TARGETS}")
        if var_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unknown var_type {var_type!r}; expected 'fixed_small' or 'fixed_large'")
        if alphas_cumprod is None:
            if betas is None:
                raise ValueError("give betas or alphas_cumprod")
            alphas_cumprod = alphas_cumprod_from_betas(betas)
        acp = np.asarray(alphas_cumprod, dtype=np.float64)
        if acp.ndim != 1 or not (np.all(acp > 0) and np.all(acp <= 1) and np.all(np.diff(acp) < 0)):
            raise ValueError("alphas_cumprod must be 1-D, in (0, 1] and strictly decreasing")
        self.schedule = schedule
        self.target = target
        self.var_type = var_type
        self.aux_weights = dict(aux_weights or {})
        self.default_aux_weight = float(default_aux_weight)
        self.num_timesteps = T = len(acp)
        self.timestep_map = np.arange(T, dtype=np.int64) if timestep_map is None else \
            np.asarray(list(timestep_map), dtype=np.int64)
        if len(self.timestep_map) != T:
            raise ValueError("timestep_map must have one entry per timestep")

        self.alphas_cumprod = acp
        self.betas = betas_from_alphas_cumprod(acp)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod_prev = np.append(1.0, acp[:-1])
        self.alphas_cumprod_next = np.append(acp[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1.0)
        # posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eqs. 6-7)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - acp)
        # log clipped: the posterior variance is 0 at the first step
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]) if T > 1
            else np.maximum(self.posterior_variance, 1e-20))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - acp)

    # ------------------------------------------------------------------ construction / config
    @classmethod
    def from_config(cls, config: dict | None = None) -> "GaussianDiffusion":
        """Build from ``{'schedule': 'linear'|'cosine', 'T': 1000, 'target': 'eps'|'x0'|'v', 'var_type': …,
        'aux_weights': {...}}`` (all optional)."""
        c = dict(config or {})
        schedule = c.get("schedule") or "linear"
        return cls(make_betas(schedule, int(c.get("T", 1000))), target=c.get("target", "eps"),
                   var_type=c.get("var_type", "fixed_small"), aux_weights=c.get("aux_weights"),
                   default_aux_weight=float(c.get("default_aux_weight", 1.0)), schedule=schedule)

    @property
    def config(self) -> dict:
        """JSON-able description (for checkpoints)."""
        if isinstance(self, SpacedDiffusion):
            return self.base.config
        return {"schedule": self.schedule, "T": self.num_timesteps, "target": self.target, "var_type": self.var_type,
                "aux_weights": dict(self.aux_weights), "default_aux_weight": self.default_aux_weight}

    @property
    def is_respaced(self) -> bool:
        return not np.array_equal(self.timestep_map, np.arange(self.num_timesteps))

    def respace(self, steps: int | str | Sequence[int]) -> "SpacedDiffusion":
        """A diffusion over a subset of this one's timesteps (see :func:`space_timesteps`)."""
        if isinstance(steps, (int, str)):
            use = space_timesteps(self.num_timesteps, [steps] if isinstance(steps, int) else steps)
        else:
            use = set(int(s) for s in steps)
        return SpacedDiffusion(self, use)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps (long) to hand to the network for indices ``t`` of this schedule."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t.long()]

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of ``q(x_t | x_0)`` (Diff-ST Eq. 1)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
        var = _extract(1.0 - self.alphas_cumprod, t, x0.ndim)
        logvar = _extract(np.log(1.0 - self.alphas_cumprod), t, x0.ndim)
        return mean, var, logvar

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Diff-ST Eq. 1 (forward process): ``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε``, ε ~ N(0, I), i.e. a draw of
        ``q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)``."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim, x0.dtype) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim, x0.dtype) * noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Posterior ``q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I)`` (Ho et al. 2020, Eqs. 6–7):
        ``μ̃_t = β_t √ᾱ_{t−1}/(1−ᾱ_t) x_0 + (1−ᾱ_{t−1}) √α_t/(1−ᾱ_t) x_t``, ``β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t``.

        Returns ``(mean, variance, log_variance_clipped)``."""
        n = x_t.ndim
        mean = (_extract(self.posterior_mean_coef1, t, n, x_t.dtype) * x0
                + _extract(self.posterior_mean_coef2, t, n, x_t.dtype) * x_t)
        return (mean, _extract(self.posterior_variance, t, n, x_t.dtype),
                _extract(self.posterior_log_variance_clipped, t, n, x_t.dtype))

    # ------------------------------------------------------------------ parametrisation conversions
    def x0_from_eps(self, x_t, t, eps):
        """``x_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t`` (inverse of Eq. 1)."""
        n = x_t.ndim
        return (_extract(self.sqrt_recip_alphas_cumprod, t, n, x_t.dtype) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, n, x_t.dtype) * eps)

    def eps_from_x0(self, x_t, t, x0):
        """``ε = (x_t − √ᾱ_t x_0) / √(1−ᾱ_t)``."""
        n = x_t.ndim
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, n, x_t.dtype) * x_t - x0)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, n, x_t.dtype))

    def v_from_x0_eps(self, x0, t, eps):
        """``v = √ᾱ_t ε − √(1−ᾱ_t) x_0`` (Salimans & Ho 2022)."""
        n = x0.ndim
        return (_extract(self.sqrt_alphas_cumprod, t, n, x0.dtype) * eps
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, n, x0.dtype) * x0)

    def x0_from_v(self, x_t, t, v):
        """``x_0 = √ᾱ_t x_t − √(1−ᾱ_t) v``."""
        n = x_t.ndim
        return (_extract(self.sqrt_alphas_cumprod, t, n, x_t.dtype) * x_t
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, n, x_t.dtype) * v)

    def eps_from_v(self, x_t, t, v):
        """``ε = √(1−ᾱ_t) x_t + √ᾱ_t v``."""
        n = x_t.ndim
        return (_extract(self.sqrt_one_minus_alphas_cumprod, t, n, x_t.dtype) * x_t
                + _extract(self.sqrt_alphas_cumprod, t, n, x_t.dtype) * v)

    def target_for(self, x0, t, noise):
        """The regression target of the configured parametrisation for (x_0, t, ε)."""
        if self.target == "eps":
            return noise
        if self.target == "x0":
            return x0
        return self.v_from_x0_eps(x0, t, noise)

    def split_model_output(self, model_out, x_t, t, clip_x0: bool = True):
        """``(x0_pred, eps_pred)`` from the network output of the configured target.

        With ``clip_x0`` the x_0 prediction is clipped to [-1, 1] and ε re-derived from it (as in DDIM)."""
        if self.target == "eps":
            eps = model_out
            x0 = self.x0_from_eps(x_t, t, eps)
        elif self.target == "x0":
            x0 = model_out
            eps = None
        else:
            x0 = self.x0_from_v(x_t, t, model_out)
            eps = self.eps_from_v(x_t, t, model_out)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = None
        if eps is None:
            eps = self.eps_from_x0(x_t, t, x0)
        return x0, eps

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_x0: bool = True) -> dict:
        """Diff-ST Eq. 2 (reverse step): ``p_θ(x_{t−1} | x_t, y, h) = N(μ_θ, Σ_t)``.

        ``model_out`` is the network's prediction f_θ(x_t, t, y, h) of the configured target; it is turned into
        x̂_0, and ``μ_θ = μ̃_t(x̂_0, x_t)`` (posterior mean, :meth:`q_posterior_mean_variance`); Σ_t is fixed
        (β̃_t for ``'fixed_small'``, β_t for ``'fixed_large'``).

        Returns a dict with ``mean``, ``variance``, ``log_variance``, ``x0_pred``, ``eps_pred``."""
        x0, eps = self.split_model_output(model_out.to(x_t.dtype), x_t, t, clip_x0)
        mean, var, logvar = self.q_posterior_mean_variance(x0, x_t, t)
        if self.var_type == "fixed_large":
            big = np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else self.betas
            var = _extract(big, t, x_t.ndim, x_t.dtype)
            logvar = _extract(np.log(big), t, x_t.ndim, x_t.dtype)
        return {"mean": mean, "variance": var, "log_variance": logvar, "x0_pred": x0, "eps_pred": eps}

    def p_sample_step(self, model_out, x_t, t, noise, clip_x0: bool = True) -> dict:
        """One ancestral step ``x_{t−1} = μ_θ + σ_t z`` (no noise at the last step, index 0)."""
        out = self.p_mean_variance(model_out, x_t, t, clip_x0)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        out["sample"] = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return out

    def ddim_step(self, model_out, x_t, t, noise, eta: float = 0.0, clip_x0: bool = True) -> dict:
        """DDIM update (Song et al. 2021, Eq. 12) from index t to t−1 of this schedule:
        ``x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1−ᾱ_{t−1}−σ²) ε̂ + σ z`` with
        ``σ = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_{t−1})``; η = 0 is deterministic, η = 1 is DDPM."""
        x0, eps = self.split_model_output(model_out.to(x_t.dtype), x_t, t, clip_x0)
        n = x_t.ndim
        a = _extract(self.alphas_cumprod, t, n, x_t.dtype)
        a_prev = _extract(self.alphas_cumprod_prev, t, n, x_t.dtype)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
        mean = x0 * torch.sqrt(a_prev) + torch.sqrt((1 - a_prev - sigma ** 2).clamp_min(0)) * eps
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (n - 1)))
        return {"sample": mean + nonzero * sigma * noise, "x0_pred": x0, "eps_pred": eps}

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
        """Uniform timesteps ``t ~ U{0..T−1}`` (long)."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    def training_losses(self, model, x0: torch.Tensor, cond: dict, t: torch.Tensor,
                        mask: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                        aux_weights: dict | None = None) -> dict:
        """Diff-ST training objective: masked simple loss (Ho et al. 2020, Eq. 14)
        ``L = E_{x_0, ε, t} [ m ⊙ ‖target − f_θ(x_t, t, y, h)‖² ]`` with ``x_t`` from Eq. 1 and the target of the
        configured parametrisation (ε, x_0 or v), plus the network's auxiliary losses (``aux`` dict, e.g. the
        disentangling loss) times their weights.

        ``mask`` defaults to ``cond['hr_mask']`` when present. Returns a dict of scalar tensors:
        ``loss`` (total, to back-propagate), ``mse`` and one entry per aux loss (unweighted)."""
        if noise is None:
            noise = torch.randn_like(x0)
        if mask is None:
            mask = cond.get("hr_mask") if isinstance(cond, dict) else None
        x_t = self.q_sample(x0, t, noise)
        out, aux = _call_model(model, x_t, self.model_timesteps(t), cond)
        target = self.target_for(x0, t, noise)
        mse = masked_mse(out, target, mask)
        losses = {"mse": mse}
        total = mse
        weights = dict(self.aux_weights)
        weights.update(aux_weights or {})
        for k, v in (aux or {}).items():
            w = float(weights.get(k, self.default_aux_weight))
            v = v.float().mean() if torch.is_tensor(v) else torch.as_tensor(float(v), device=mse.device)
            losses[k] = v
            if w != 0.0:
                total = total + w * v
        losses["loss"] = total
        return losses


def _call_model(model, x_t, t, cond):
    """Call ``model(x_t, t, cond)`` and normalise the result to ``(out, aux_dict)``."""
    res = model(x_t, t, cond)
    if isinstance(res, tuple):
        out, aux = res[0], (res[1] if len(res) > 1 else {})
    else:
        out, aux = res, {}
    return out, dict(aux or {})


#: alias in the style of diffusers' schedulers
NoiseSchedule = GaussianDiffusion


# ---------------------------------------------------------------------------------------------- respacing
def space_timesteps(num_timesteps: int, section_counts: str | int | Iterable[int]) -> set[int]:
    """Timesteps to keep from a T-step process (improved-diffusion ``space_timesteps``).

    ``section_counts`` splits [0, T) into equal sections with the given number of (evenly strided, end points
    included) steps each, e.g. ``[10, 15, 20]``; an int or ``"50"`` means one section; ``"ddimN"`` uses the fixed
    stride of the DDIM paper (``range(0, T, stride)`` with N elements)."""
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            if desired == num_timesteps:
                return set(range(num_timesteps))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    section_counts = list(section_counts)
    if any(c < 1 for c in section_counts):
        raise ValueError("every section needs at least one step")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of a base diffusion's timesteps, with recomputed betas
    (``β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}``; improved-diffusion ``SpacedDiffusion``).

    The network still receives original timesteps (:meth:`model_timesteps`). With all T steps kept it is
    identical to the base diffusion."""

    def __init__(self, base: GaussianDiffusion, use_timesteps: Iterable[int]):
        use = sorted(set(int(s) for s in use_timesteps))
        if not use or use[0] < 0 or use[-1] >= base.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {base.num_timesteps})")
        self.base = base
        self.use_timesteps = use
        super().__init__(alphas_cumprod=base.alphas_cumprod[use], target=base.target, var_type=base.var_type,
                         aux_weights=base.aux_weights, default_aux_weight=base.default_aux_weight,
                         timestep_map=base.timestep_map[use], schedule=base.schedule)
