"""Never worse than the spots (issue 14): the self-check on the section's own spots one level coarser, the
per-gene share β of the histology-driven detail it keeps, the fallback to the spots' cubic upsampling or block
copy (whichever was better there), and the
report that carries it (CLI, OME-Zarr metadata, dock line)."""
from __future__ import annotations

import numpy as np
import pytest

from napari_diffst import pipeline as P
from napari_diffst.data.grids import display_mask
from napari_diffst.data.synthetic import make_synthetic
from napari_diffst.data.upsample import cubic_upsample
from napari_diffst.method import DiffST, format_self_check


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny fits, one torch thread."""


@pytest.fixture(scope="module")
def fitted():
    import torch

    torch.set_num_threads(1)
    smp = make_synthetic(seed=1, size_um=(2000.0, 2000.0))
    smp.name = "synthetic1"
    (f,), _ = P.make_fields([smp], P.choose_genes([smp], n_genes=3), 2, mode="degrade")
    m = DiffST(budget="tiny", seed=0, device="cpu", prior="cell", n_samples=1, sample_steps=2, verbose=False)
    m.fit([f], train_samples=[smp])
    return m, smp


def _fake_check_level(monkeypatch, make):
    """The method's map on the check level (the degrade field) replaced by ``make(field)``; native unchanged."""
    real = DiffST.predict

    def predict(self, field, sample=None, **kw):
        if field.extra.get("mode") == "degrade":
            return P.SRResult(make(field).astype(np.float32), np.zeros_like(field.hr), list(field.genes),
                              field.hr_um, field, 1, 1)
        return real(self, field, sample=sample, **kw)

    monkeypatch.setattr(DiffST, "predict", predict)


def _cubic(f):
    return cubic_upsample(f.lr, int(f.scale), f.lr_mask, order=3).astype(np.float64)


def test_detail_that_matches_the_spots_is_kept_whole(fitted, monkeypatch):
    m, smp = fitted
    _fake_check_level(monkeypatch, lambda f: np.asarray(f.hr, np.float64))  # the method gets the level exactly
    sc = m.self_check(smp)
    assert sc["beta"] == pytest.approx([1.0] * len(m.genes_), abs=1e-6)
    assert sc["fallback"] == [] and sc["warning"] is None
    assert sc["pcc"]["method"] > max(sc["pcc"]["cubic"], sc["pcc"]["nearest"])
    assert sc["pcc"]["kept"] == pytest.approx(sc["pcc"]["method"], abs=1e-6)
    assert "2×2 blocks" in sc["level"] and "Self-check" in format_self_check(sc)


def test_detail_unrelated_to_the_spots_falls_back_to_the_spots_upsampling_with_a_warning(fitted, monkeypatch):
    m, smp = fitted
    rng = np.random.default_rng(0)

    def wrong(f):  # confident detail pointing the wrong way: minus the real detail, plus noise
        c = _cubic(f)
        return c - (np.asarray(f.hr) - c) + rng.normal(0, 0.05, c.shape)

    _fake_check_level(monkeypatch, wrong)
    sc = m.self_check(smp)
    assert sc["beta"] == [0.0] * len(m.genes_) and sc["fallback"] == list(m.genes_)
    assert set(sc["base"]) <= {"cubic", "block"}
    assert sc["pcc"]["method"] < sc["pcc"]["cubic"]
    # per gene, the fallback is the better of the spots' cubic upsampling and block copy on the check
    pg = sc["per_gene"]
    for c, n, k, b in zip(pg["pcc_cubic"], pg["pcc_nearest"], pg["pcc_kept"], sc["base"]):
        assert k == pytest.approx(max(c, n), abs=1e-4) and b == ("block" if n > c else "cubic")
    assert sc["warning"] and "does not help" in sc["warning"]
    assert "WARNING" in format_self_check(sc)
    # natively every gene is then the spots' cubic upsampling, made true to the spots: never worse than the spots
    nat = m.make_field(smp, "native")
    res = m.predict(nat, sample=smp)
    assert res.report["self_check"]["fallback"] == list(m.genes_)
    gs = np.asarray(nat.gene_scale, np.float32)[:, None, None]
    block = np.array([b == "block" for b in res.report["self_check"]["base"]])
    fb = np.where(block[:, None, None], nat.lr_upsampled(0), _cubic(nat))
    ref, _ = P.project_result((fb * nat.hr_mask[None]).astype(np.float32), nat, shown=display_mask(smp, nat))
    np.testing.assert_allclose(res.mean, ref, atol=1e-5)
    assert not np.allclose(res.mean * gs, m.predict(nat, sample=smp, self_check=False).mean * gs, atol=1e-3)
    assert float(np.abs(res.std).max()) == 0.0  # no detail kept, no spread from it


def test_a_check_already_run_is_reused_and_degrade_fields_are_not_checked(fitted):
    m, smp = fitted
    sc = m.self_check(smp)
    assert set(sc) >= {"level", "pcc", "detail_pcc", "beta", "fallback", "warning", "per_gene"}
    assert len(sc["beta"]) == len(m.genes_) and all(0.0 <= b <= 1.0 for b in sc["beta"])
    assert sc["pcc"]["prior"] is not None  # the method's starting point, scored on the same level
    nat = m.make_field(smp, "native")
    a = m.predict(nat, sample=smp, self_check=sc)
    b = m.predict(nat, sample=smp)  # 'auto' runs the same check (same seed) again
    np.testing.assert_array_equal(a.mean, b.mean)
    assert a.report["self_check"] == sc
    deg = m.make_field(smp, "degrade")
    assert (m.predict(deg, sample=smp).report or {}).get("self_check") is None
    assert m.predict(nat, sample=None).report.get("self_check") is None  # no section at hand: no check


def test_a_section_too_small_for_blocks_skips_the_check(fitted):
    m, _ = fitted
    tiny = make_synthetic(seed=5, size_um=(400.0, 400.0))
    sc = m.self_check(tiny)
    assert "skipped" in sc and "coarser" in sc["skipped"]
    assert format_self_check(sc).startswith("Self-check: skipped")


def test_a_single_training_section_keeps_a_stripe_out_for_the_check(tmp_path, monkeypatch):
    """The user's case (trained on the section it super-resolves): the last stripe of LR blocks is kept out of
    the prior and the network (truth zeroed, loss masked), the self-check scores only that stripe, and the
    checkpoint carries it to a loaded model."""
    import torch

    torch.set_num_threads(1)
    seen = {}
    real_make_trainer = P.make_trainer

    def make_trainer(fields, **kw):  # what the network is trained on
        seen["fields"] = list(fields)
        return real_make_trainer(fields, **kw)

    monkeypatch.setattr(P, "make_trainer", make_trainer)
    smp = make_synthetic(seed=2, size_um=(3000.0, 3000.0))
    smp.name = "synthetic2"
    (f,), _ = P.make_fields([smp], P.choose_genes([smp], n_genes=3), 2, mode="degrade")
    m = DiffST(budget="tiny", seed=0, device="cpu", prior="cell", n_samples=1, sample_steps=2, verbose=False)
    m.fit([f], train_samples=[smp], out_dir=tmp_path / "ck")
    hold = m.holdout_["mask"]
    assert m.holdout_["section"] == "synthetic2" and 0 < hold.sum() < 0.5 * f.hr_mask.sum()
    (trained,) = seen["fields"]
    assert not np.asarray(trained.hr_mask, bool)[hold].any() and not np.asarray(trained.hr)[:, hold].any()
    assert np.asarray(f.hr)[:, hold].any()  # the stripe had truth to hide
    sc = m.self_check(smp)
    assert "stripes" in sc["held_out"] and not sc["in_sample"] and "held out of training" in sc["level"]
    n_all = int(m.make_field(smp, "degrade").hr_mask.sum())
    assert f"its {int(hold.sum())} spots" in sc["level"] and int(hold.sum()) < n_all
    m2 = DiffST.load(tmp_path / "ck", device="cpu")
    np.testing.assert_array_equal(m2.holdout_["mask"], hold)
    assert m2.train_sections_ == ["synthetic2"]
    assert m2.self_check(smp)["beta"] == sc["beta"]
    # another section is checked whole, and is not in-sample
    other = make_synthetic(seed=3, size_um=(3000.0, 3000.0))
    other.name = "synthetic3"
    sc3 = m.self_check(other)
    assert not sc3["held_out"] and not sc3["in_sample"] and "held out" not in sc3["level"]


def test_a_small_training_section_holds_out_one_block_in_four(fitted):
    m, smp = fitted  # 2000 µm: too few LR rows for three stripes
    assert m.train_sections_ == ["synthetic1"] and "one LR block in four" in m.holdout_["how"]
    hold = m.holdout_["mask"]
    s = int(m.geometry_["scale"])
    blocks = hold.reshape(hold.shape[0] // s, s, hold.shape[1] // s, s).any(axis=(1, 3))
    assert 0.15 < blocks.mean() < 0.35  # a quarter of the LR blocks
    sc = m.self_check(smp)
    assert sc["held_out"] == m.holdout_["how"] and not sc["in_sample"]


def test_several_training_sections_are_flagged_in_sample(tmp_path):
    import torch

    torch.set_num_threads(1)
    smps = [make_synthetic(seed=k, size_um=(2000.0, 2000.0)) for k in (1, 2)]
    for k, x in zip((1, 2), smps):
        x.name = f"synthetic{k}"
    fields, _ = P.make_fields(smps, P.choose_genes(smps, n_genes=3), 2)
    m = DiffST(budget="tiny", seed=0, device="cpu", prior="cell", n_samples=1, sample_steps=2, verbose=False)
    m.fit(fields, train_samples=smps)
    assert m.holdout_ is None and m.train_sections_ == ["synthetic1", "synthetic2"]
    sc = m.self_check(smps[0])
    assert sc["in_sample"] and not sc["held_out"] and "optimistic" in sc["level"]
