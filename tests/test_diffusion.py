"""Closed-form checks of the diffusion process and the samplers (CPU, tiny)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from napari_diffst.diffusion import (GaussianDiffusion, SpacedDiffusion, cosine_betas, ddim_sample_progressive,
                                     ddpm_sample_progressive, final_sample, linear_betas, masked_mse, sample,
                                     space_timesteps)
from napari_diffst.errors import CancelledError

from standin import StandIn

torch.set_num_threads(1)


def _cond(B=2, G=2, H=8, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"lr_up": torch.rand(B, G, H, H, generator=g) * 2 - 1, "lr_mask": torch.ones(B, 1, H, H),
            "he": torch.rand(B, 3, H * k, H * k, generator=g), "hr_mask": torch.ones(B, 1, H, H)}


def _model(seed=0, **cfg):
    torch.manual_seed(seed)
    return StandIn(cfg).eval()


# ------------------------------------------------------------------------------------------- schedules
def test_linear_and_cosine_schedules_match_formulas():
    b = linear_betas(1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    d = GaussianDiffusion(b)
    assert np.all(np.diff(d.alphas_cumprod) < 0) and 0 < d.alphas_cumprod[-1] < d.alphas_cumprod[0] < 1
    # ᾱ_T of the linear schedule is tiny (x_T ≈ pure noise)
    assert d.alphas_cumprod[-1] < 1e-4

    T, s = 1000, 0.008
    dc = GaussianDiffusion(cosine_betas(T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 10, 500, 900):  # index i is step t = i + 1; unclipped region
        assert dc.alphas_cumprod[i] == pytest.approx(f(i + 1) / f(0), rel=1e-10)
    assert np.all(np.diff(dc.alphas_cumprod) < 0)
    assert cosine_betas(T).max() <= 0.999
    # betas are recovered from ᾱ exactly enough
    np.testing.assert_allclose(d.betas, b, rtol=1e-9, atol=1e-15)


def test_q_sample_matches_closed_form_moments():
    d = GaussianDiffusion.from_config({"schedule": "linear"})
    N = 200_000
    g = torch.Generator().manual_seed(1)
    for ti in (0, 100, 500, 999):
        x0 = torch.full((N,), 0.6, dtype=torch.float64)
        t = torch.full((N,), ti, dtype=torch.long)
        xt = d.q_sample(x0, t, torch.randn(N, generator=g, dtype=torch.float64))
        a = d.alphas_cumprod[ti]
        se = math.sqrt((1 - a) / N)
        assert abs(xt.mean().item() - math.sqrt(a) * 0.6) < 5 * se
        assert xt.var().item() == pytest.approx(1 - a, rel=0.02)
        m, v, _ = d.q_mean_variance(x0[:1], t[:1])
        assert m.item() == pytest.approx(math.sqrt(a) * 0.6, rel=1e-6) and v.item() == pytest.approx(1 - a, rel=1e-6)


def test_posterior_matches_bayes_rule():
    d = GaussianDiffusion.from_config({"schedule": "cosine"})
    x0 = torch.tensor([0.3, -0.7], dtype=torch.float64)
    xt = torch.tensor([0.1, 0.9], dtype=torch.float64)
    for ti in (1, 50, 700):
        t = torch.full((2,), ti)
        mean, var, _ = d.q_posterior_mean_variance(x0, xt, t)
        ab_prev, alpha, beta = d.alphas_cumprod[ti - 1], d.alphas[ti], d.betas[ti]
        # product of q(x_{t-1}|x0) = N(√ᾱ_{t-1} x0, 1-ᾱ_{t-1}) and q(x_t|x_{t-1}) = N(√α x_{t-1}, β)
        prec = 1 / (1 - ab_prev) + alpha / beta
        want_mean = (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(alpha) * xt / beta) / prec
        torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-7)
        assert var[0].item() == pytest.approx(1 / prec, rel=1e-5)
    # first step: the posterior collapses onto x0
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert var.abs().max().item() < 1e-12


def test_eps_x0_v_conversions_round_trip():
    d = GaussianDiffusion.from_config({"schedule": "linear"})
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 300, 800, 999])
    xt = d.q_sample(x0, t, eps)
    v = d.v_from_x0_eps(x0, t, eps)
    torch.testing.assert_close(d.x0_from_eps(xt, t, eps), x0, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d.eps_from_x0(xt, t, x0), eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d.x0_from_v(xt, t, v), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.eps_from_v(xt, t, v), eps, rtol=1e-9, atol=1e-9)
    # p_mean_variance given the true target of each parametrisation gives the true posterior
    want, _, _ = d.q_posterior_mean_variance(x0, xt, t)
    for target, out in (("eps", eps), ("x0", x0), ("v", v)):
        dd = GaussianDiffusion.from_config({"schedule": "linear", "target": target})
        got = dd.p_mean_variance(out, xt, t, clip_x0=False)
        torch.testing.assert_close(got["mean"], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["x0_pred"], x0, rtol=1e-5, atol=1e-5)


def test_training_loss_masked_and_aux_weighted():
    d = GaussianDiffusion.from_config({"target": "eps", "aux_weights": {"disentangle": 0.5}})
    x0 = torch.zeros(2, 1, 4, 4)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1

    def oracle(x_t, t, cond):  # exact where masked, wrong by 3 outside the mask
        out = noise + 3 * (1 - mask)
        return out, {"disentangle": torch.tensor(2.0)}

    t = torch.tensor([5, 900])
    L = d.training_losses(oracle, x0, {}, t, mask=mask, noise=noise)
    assert L["mse"].item() == pytest.approx(0.0, abs=1e-12)
    assert L["loss"].item() == pytest.approx(0.5 * 2.0)
    L = d.training_losses(oracle, x0, {}, t, mask=None, noise=noise)
    assert L["mse"].item() == pytest.approx(9.0 * 0.5)
    assert masked_mse(torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.ones(1, 1, 2, 2)).item() == 1.0


# ------------------------------------------------------------------------------------------- samplers
def test_space_timesteps_like_improved_diffusion():
    assert space_timesteps(1000, [1000]) == set(range(1000))
    s = sorted(space_timesteps(1000, [10]))
    assert len(s) == 10 and s[0] == 0 and s[-1] == 999
    assert sorted(space_timesteps(100, "ddim10")) == list(range(0, 100, 10))
    assert len(space_timesteps(300, [10, 5, 1])) == 16
    base = GaussianDiffusion.from_config({"schedule": "linear"})
    sp = base.respace(50)
    assert sp.num_timesteps == 50 and sp.timestep_map[-1] == 999
    # the respaced ᾱ are the base ᾱ at the kept steps; betas recomputed
    np.testing.assert_array_equal(sp.alphas_cumprod, base.alphas_cumprod[sp.timestep_map])
    assert sp.betas[1] == pytest.approx(1 - base.alphas_cumprod[sp.timestep_map[1]] /
                                        base.alphas_cumprod[sp.timestep_map[0]])


def test_respaced_with_all_steps_equals_full_ddpm_exactly():
    model, cond = _model(), _cond()
    base = GaussianDiffusion.from_config({"schedule": "linear", "target": "eps"})
    shape = (2, 2, 8, 8)
    full = list(ddpm_sample_progressive(model, shape, cond, base, seed=123))
    resp = list(ddpm_sample_progressive(model, shape, cond, base, seed=123, steps=1000))
    assert isinstance(base.respace(1000), SpacedDiffusion)
    assert len(full) == len(resp) == 1000
    assert [s["t"] for s in full] == list(range(999, -1, -1)) == [s["t"] for s in resp]
    assert torch.equal(full[-1]["x_t"], resp[-1]["x_t"])
    assert torch.equal(full[500]["x0_pred"], resp[500]["x0_pred"])
    # a coarser schedule gives a different (but finite, in-range) result
    short = final_sample(ddpm_sample_progressive(model, shape, cond, base, seed=123, steps=25))
    assert torch.isfinite(short).all() and not torch.equal(short, full[-1]["x_t"])


def test_ddim_eta0_deterministic_and_eta1_is_ddpm():
    model, cond = _model(), _cond()
    base = GaussianDiffusion.from_config({"schedule": "cosine", "target": "v"})
    shape = (2, 2, 8, 8)
    xT = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    a = final_sample(ddim_sample_progressive(model, shape, cond, base, seed=1, steps=20, eta=0.0, x_T=xT))
    b = final_sample(ddim_sample_progressive(model, shape, cond, base, seed=2, steps=20, eta=0.0, x_T=xT))
    assert torch.equal(a, b)
    c = final_sample(ddim_sample_progressive(model, shape, cond, base, seed=1, steps=20, eta=0.5, x_T=xT))
    d = final_sample(ddim_sample_progressive(model, shape, cond, base, seed=2, steps=20, eta=0.5, x_T=xT))
    assert not torch.allclose(c, d)
    # η = 1 reproduces ancestral sampling on the same respaced schedule with the same noise
    e = final_sample(ddim_sample_progressive(model, shape, cond, base, seed=9, steps=20, eta=1.0))
    f = final_sample(ddpm_sample_progressive(model, shape, cond, base, seed=9, steps=20))
    torch.testing.assert_close(e, f, rtol=1e-4, atol=1e-4)


def test_sample_mean_std_and_cancel():
    base = GaussianDiffusion.from_config({"schedule": "linear", "target": "x0"})

    class Const(nn.Module):  # predicts x0 = 0.2 everywhere → every sample ends exactly there
        config = {"predict": "x0"}  # sample() takes the target from here when no diffusion is given

        def forward(self, x_t, t, cond):
            return torch.full_like(x_t, 0.2), {}

    cond = _cond(B=3)
    mean, std = sample(Const(), cond, n_samples=4, steps=10, batch_size=5)
    assert mean.shape == std.shape == (3, 2, 8, 8)
    torch.testing.assert_close(mean, torch.full_like(mean, 0.6), atol=1e-5, rtol=0)  # (0.2 + 1) / 2
    assert std.max().item() < 1e-4

    model = _model()
    calls = []
    m, s, xs = sample(model, cond, n_samples=3, steps=8, sampler="ddim", eta=1.0, diffusion=base, seed=0,
                      progress=lambda i, n: calls.append((i, n)), return_samples=True)
    assert calls[-1] == (8, 8) and xs.shape == (3, 3, 2, 8, 8)
    torch.testing.assert_close(m, xs.mean(0))
    torch.testing.assert_close(s, xs.std(0, correction=0))
    assert s.mean().item() > 0  # stochastic sampler: samples differ

    n = {"k": 0}

    def stop():
        n["k"] += 1
        return n["k"] > 3

    steps = list(ddpm_sample_progressive(model, (1, 2, 8, 8), _cond(B=1), base, seed=0, steps=10,
                                         should_stop=stop))
    assert len(steps) == 3
    n["k"] = 0
    with pytest.raises(CancelledError):
        sample(model, cond, n_samples=2, steps=10, diffusion=base, should_stop=stop)
