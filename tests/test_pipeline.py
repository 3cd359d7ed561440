"""End-to-end pipeline and CLI on a tiny synthetic section (CPU, seconds)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_diffst import pipeline as P
from napari_diffst.cli import main as cli_main
from napari_diffst.data.pairs import random_patches

SMALL = dict(size_um=(1600, 1600))


@pytest.fixture
def small():
    torch.manual_seed(0)
    smp = P.load_data("synthetic", **SMALL)
    genes = P.choose_genes([smp], n_genes=3)
    fields, gs = P.make_fields([smp], genes, scale=4)
    return smp, genes, fields, gs


def test_fields_from_synthetic_truth(small):
    smp, genes, fields, gs = small
    f = fields[0]
    assert genes == smp.hr_truth["genes"][:3]
    assert f.hr is not None and f.hr.shape == (3, f.lr.shape[1] * 4, f.lr.shape[2] * 4)
    assert f.hr_um == pytest.approx(200 / 4)            # legacy-ST pitch / s
    assert f.he.shape[1] == f.hr.shape[1] * f.he_per_hr
    assert gs.shape == (3,) and np.all(gs > 0)


def test_cubic_lr_up_is_cropped_with_the_patch(small):
    f = small[2][0]
    up = f.lr_upsampled(3)
    assert up.shape == f.hr.shape
    assert np.isfinite(up).all()
    # without augmentation, a patch's lr_up is the same crop of the field-level map as its hr
    from napari_diffst.data.pairs import _crop

    s = f.scale
    p = random_patches([f], 3, 2, np.random.default_rng(0), augment=False, with_lr_up=True)
    assert p.lr_up.shape == p.hr.shape
    h, w = f.lr.shape[1:]
    for b in range(3):
        hits = [(r, c) for r in range(-1, h) for c in range(-1, w)
                if np.array_equal(_crop(f.hr, r * s, c * s, 2 * s), p.hr[b])
                and np.array_equal(_crop(f.lr, r, c, 2), p.lr[b])]
        assert hits, "patch not found in its field"
        r, c = hits[0]
        np.testing.assert_array_equal(p.lr_up[b], _crop(up, r * s, c * s, 2 * s))
    # a constant LR map upsamples to the same constant
    f.lr = np.full_like(f.lr, 0.25)
    f.extra.pop("lr_up3", None)
    np.testing.assert_allclose(f.lr_upsampled(3), 0.25, atol=1e-5)


def test_train_checkpoint_sample_and_cancel(small, tmp_path):
    smp, genes, fields, gs = small
    tr = P.make_trainer(fields, budget="tiny", steps=3, batch_size=2, lr_size=2, out_dir=tmp_path / "ck",
                        train_samples=[smp], model_overrides={"distill": True})
    events = list(tr.iter_train())
    assert events[-1].kind == "done" and events[-1].step == 3
    assert (tmp_path / "ck" / "model.pt").is_file()
    from napari_diffst.train.checkpoint import load_checkpoint

    model, ema, meta = load_checkpoint(tmp_path / "ck")
    assert meta["genes"] == genes and meta["provenance"]["scale"] == 4
    assert ema.config["diffusion"]["upsample"] == P.DEFAULT_UPSAMPLE
    f = fields[0]
    previews = []
    res = None
    for upd in P.super_resolve_iter(ema, f, steps=3, n_samples=2, seed=1):
        if "result" in upd:
            res = upd["result"]
        else:
            previews.append(upd)
    assert len(previews) == 6 and previews[-1]["done"] == previews[-1]["total"] == 6
    assert previews[0]["x0_pred"].shape == f.hr.shape
    assert res.mean.shape == f.hr.shape and res.std.shape == f.hr.shape
    assert np.all(res.mean[:, ~f.hr_mask] == 0)          # masked outside tissue
    assert res.std[:, f.hr_mask].mean() > 0             # two different samples → non-zero spread
    # same seed → same result
    res2 = P.super_resolve(ema, f, steps=3, n_samples=2, seed=1)
    np.testing.assert_allclose(res.mean, res2.mean, atol=1e-6)
    # cancelling = stop iterating: nothing is returned, no error
    gen = P.super_resolve_iter(ema, f, steps=3, n_samples=2)
    next(gen)
    gen.close()


def test_distill_head_aux_loss(small):
    f = small[2][0]
    from napari_diffst.model import build_model

    base = P.model_config_for([f], "tiny")
    m0 = build_model(base)
    m1 = build_model({**base, "distill": True})
    names0 = {n for n, _ in m0.named_parameters()}
    names1 = {n for n, _ in m1.named_parameters()}
    assert not any(n.startswith("distill.") for n in names0)
    assert any(n.startswith("distill.") for n in names1)
    assert m1.aux_weights["distill"] == pytest.approx(1.0)
    cond = P.cond_from_field(f, upsample="cubic")
    x = torch.zeros_like(cond["lr_up"])
    t = torch.tensor([10])
    _, aux = m1(x, t, cond)
    assert float(aux["distill"]) == 0.0                  # no target at inference
    hr = torch.from_numpy(f.hr)[None] * 2 - 1
    _, aux = m1(x, t, {**cond, "x0_target": hr})
    assert float(aux["distill"]) > 0


def test_cli_train_sample_evaluate(tmp_path, capsys):
    ck = tmp_path / "run"
    rc = cli_main(["train", "--data", "synthetic", "--scale", "4", "--n-genes", "2", "--budget", "tiny",
                   "--steps", "2", "--batch-size", "2", "--lr-size", "2", "--out", str(ck)])
    assert rc == 0
    cfg = json.loads((ck / "resolved_config.json").read_text())
    assert cfg["scale"] == 4 and len(cfg["genes"]) == 2 and cfg["fields"][0]["mode"] == "truth"
    out = tmp_path / "maps.zarr"
    rc = cli_main(["sample", "--checkpoint", str(ck), "--data", "synthetic", "--steps", "2", "--n-samples", "1",
                   "--out", str(out)])
    assert rc == 0 and out.is_dir()
    from napari_diffst.io.writers import read_maps

    mf = read_maps(out)
    assert mf.genes == cfg["genes"] and "uncertainty" in " ".join(mf.extra) + str(mf.metadata)
    assert mf.um_per_px == pytest.approx(50.0)
    # outside the tissue the maps are NaN (0 would mean "no expression"), inside finite: as tiled output
    from napari_diffst._cli_engine import _field_for
    from napari_diffst.data.grids import display_mask

    smp = P.load_data("synthetic")
    fld, _ = _field_for(smp, cfg["genes"], 4, None, "auto", he_per_hr=1)
    shown = display_mask(smp, fld)
    assert (~shown).any() and shown.any()
    for a in (mf.maps, mf.extra["uncertainty"]):
        np.testing.assert_array_equal(np.isnan(a), np.broadcast_to(~shown, a.shape))
    scores = tmp_path / "scores.json"
    rc = cli_main(["evaluate", "--pred", str(out), "--data", "synthetic", "--out", str(scores)])
    assert rc == 0
    sc = json.loads(scores.read_text())
    assert -1 <= sc["pcc"] <= 1 and sc["n_genes"] == 2
    assert "pcc" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = cli_main(["sample", "--checkpoint", str(tmp_path / "nope"), "--data", "synthetic", "--out",
                   str(tmp_path / "x.zarr")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nope" in err[0] and "error" in err[0]
    rc = cli_main(["info", str(tmp_path / "missing_folder")])
    assert rc == 2


def test_demo_headless_prints_equivalent(capsys):
    assert cli_main(["demo", "--headless"]) == 0
    out = capsys.readouterr().out
    assert "napari-diffst train" in out and "napari-diffst sample" in out


def test_cli_native_sampling_on_her2st_uses_the_checkpoint_he_per_hr(her2st_dir, tmp_path):
    """Trained on 200 µm block pairs, applied natively at 100 µm HR pixels: the field must be sampled with
    the network's H&E pixels per HR pixel, not the default for the new pixel size."""
    ck = tmp_path / "run"
    assert cli_main(["train", "--data", str(her2st_dir / "C2"), "--scale", "2", "--genes", "ERBB2,KRT19",
                     "--budget", "tiny", "--steps", "1", "--batch-size", "1", "--lr-size", "2",
                     "--out", str(ck)]) == 0
    cfg = json.loads((ck / "resolved_config.json").read_text())
    assert cfg["fields"][0]["mode"] == "degrade" and cfg["fields"][0]["hr_um"] == pytest.approx(200, rel=0.01)
    out = tmp_path / "native.zarr"
    assert cli_main(["sample", "--checkpoint", str(ck), "--data", str(her2st_dir / "C2"), "--steps", "1",
                     "--n-samples", "1", "--out", str(out)]) == 0
    from napari_diffst.io.writers import read_maps

    mf = read_maps(out)
    assert mf.metadata["napari_diffst"]["mode"] == "native"
    assert mf.um_per_px == pytest.approx(100, rel=0.01)   # pitch 200 µm / s


def test_real_network_loss_falls_on_the_synthetic_sample(small):
    """The Diff-ST network (tiny preset, all components on) learns on the synthetic sample: the diffusion
    loss on fixed held-out batches (same t and noise) drops after a short training run."""
    smp, genes, fields, gs = small
    tr = P.make_trainer(fields, budget="tiny", steps=60, batch_size=4, lr_size=2, out_dir=None,
                        train_samples=[smp], lr=2e-3, warmup_steps=0)
    rng = np.random.default_rng(123)
    batches = [tr._to_device(tr.batch_fn(0, rng)) for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    fixed = [(torch.randint(0, 1000, (4,), generator=g), torch.randn(b["x0"].shape, generator=g)) for b in batches]

    def held_out_loss():
        tr.model.eval()
        with torch.no_grad():
            tot = 0.0
            for b, (t, noise) in zip(batches, fixed):
                cond = {k: v for k, v in b.items() if k != "x0"}
                tot += float(tr.diffusion.training_losses(tr.model, b["x0"], cond, t, mask=b["hr_mask"],
                                                          noise=noise)["mse"])
        tr.model.train()
        return tot / len(batches)

    before = held_out_loss()
    for _ in tr.iter_train():
        pass
    after = held_out_loss()
    assert after < 0.8 * before, (before, after)


def test_budget_defaults_are_the_same_in_cli_and_dock(small):
    """``train --budget tiny`` and the dock's 'tiny' budget run the same number of steps with the same batch
    (issue 17: the CLI ran 300 steps, the dock 20), and both are the benchmark's (issue 13: one method object)."""
    import argparse

    from napari_diffst._cli_engine import add_commands, train_knobs
    from napari_diffst._widgets.train_section import budget_default
    from napari_diffst.benchmark import DIFFUSION_BUDGETS
    from napari_diffst.method import DiffST

    ap = argparse.ArgumentParser()
    add_commands(ap.add_subparsers())
    for budget, steps in (("tiny", 3), ("quick", 300)):
        args = ap.parse_args(["train", "--data", "synthetic", "--budget", budget, "--out", "x"])
        kn = DiffST(budget=args.budget, **train_knobs(args)).resolved_knobs()
        assert kn == DIFFUSION_BUDGETS[budget]
        assert kn["steps"] == budget_default(budget, "steps") == steps
        assert kn["batch_size"] == budget_default(budget, "batch_size")
