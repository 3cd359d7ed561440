"""The one Diff-ST method object (napari_diffst.method.DiffST) behind the benchmark, the CLI and the dock:
the benchmark's map equals fit → save → load in a fresh process → predict, bit for bit on CPU; the checkpoint
alone is enough; the single-section prior is cross-fitted on stripes; old checkpoints still load."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import single_thread_env
import torch

from napari_diffst import pipeline as P
from napari_diffst.benchmark import DiffusionMethod, run_benchmark
from napari_diffst.data.synthetic import make_synthetic
from napari_diffst.method import DiffST, stripe_folds
from napari_diffst.train.checkpoint import read_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
SIZE = (1000.0, 1000.0)
BIG = (2000.0, 2000.0)
#: a tiny Diff-ST with the product's prior and shrink switched on
KNOBS = dict(prior="cell", shrink=True, n_samples=2, sample_steps=2)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """The subprocesses run one torch thread; bit-for-bit comparisons need the same here."""


def _env():
    return single_thread_env(SRC)


def _sample(seed, size=SIZE):
    smp = make_synthetic(seed=seed, size_um=size)
    smp.name = f"synthetic{seed}"
    return smp


_PREDICT = r"""
import sys, numpy as np, torch
torch.set_num_threads(1)
from napari_diffst.method import DiffST
from napari_diffst.data.synthetic import make_synthetic
ck, out = sys.argv[1], sys.argv[2]
m = DiffST.load(ck, device="cpu")
smp = make_synthetic(seed=0, size_um=(2000.0, 2000.0))
smp.name = "synthetic0"
field = m.make_field(smp)            # genes, scale, gene scale, H&E px and cell features from the checkpoint alone
check = m.self_check(smp, bin_lattice=2)   # the section's LR one level further down, as the benchmark runs it
np.save(out, m.predict(field, sample=smp, self_check=check).mean)
"""


def test_benchmark_map_equals_fit_save_load_in_a_fresh_process_predict(tmp_path):
    """The benchmark's diffst map of a test section — self-checked a level further down, as a user's prediction
    is — equals fit → save → load (the checkpoint file alone) in a fresh process → self-check → predict."""
    train, val, test = [_sample(1), _sample(2)], _sample(3), _sample(0, BIG)  # big enough for blocks of blocks
    maps = tmp_path / "maps"
    doc = run_benchmark(train, val, [test], scale=2, n_genes=3, methods="diffst", budget="tiny", seed=0,
                        device="cpu", save_maps=maps, quiet=True,
                        method_kwargs={"diffst": dict(KNOBS, verbose=False)})
    kn = doc["meta"]["method_knobs"]["diffst"]
    assert kn["prior"] == "cell" and kn["trained_steps"] == 3
    bench = np.load(maps / "synthetic0.npz")["pred_diffst"]
    genes = doc["genes"]

    # the product path: the method object on fields built as a user would (it computes the cell features)
    fields, gs = P.make_fields(train, genes, 2)
    (vf,), _ = P.make_fields([val], genes, 2, gene_scale=gs)
    m = DiffST(budget="tiny", seed=0, device="cpu", **KNOBS)
    events = list(m.iter_fit(fields, vf, train_samples=train, val_sample=val, out_dir=tmp_path / "ck"))
    assert events[-1].kind == "done" and m.trained_steps_ == 3
    assert "cell_features" in fields[0].extra and m.prior_ is not None
    assert m.alpha_ == pytest.approx(kn["shrink_alpha"], abs=1e-4)
    assert m.alpha_ != 1.0  # the shrink is really applied on this run

    # the checkpoint alone (no config.json, no other file) in a fresh process
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "ck" / "model.pt", alone / "model.pt")
    st = read_checkpoint(alone)
    assert st["format_version"] == 2 and st["method"]["prior"]["kind"] == "cell"
    assert st["method"]["alpha"] == m.alpha_ and st["method"]["geometry"]["scale"] == 2
    out = tmp_path / "pred.npy"
    r = subprocess.run([sys.executable, "-c", _PREDICT, str(alone), str(out)], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    fresh = np.load(out)
    assert fresh.shape == bench.shape and np.isfinite(fresh).all()
    np.testing.assert_array_equal(fresh, bench)
    # and in this process, from the fitted object and from the loaded one
    (tf,), _ = P.make_fields([test], genes, 2, gene_scale=gs)
    row = doc["sections"]["synthetic0"]["methods"]["diffst"]
    assert row["self_check"]["beta"] is not None and "unchecked" in row  # the benchmark's diffst is self-checked

    def checked(meth, field, smp):
        return meth.predict(field, sample=smp, self_check=meth.self_check(smp, bin_lattice=2)).mean

    np.testing.assert_array_equal(checked(m, tf, test), bench)
    m2 = DiffST.load(alone, device="cpu")
    assert m2.prior_ is not None and m2.alpha_ == m.alpha_ and m2.genes_ == genes
    np.testing.assert_array_equal(checked(m2, m2.make_field(_sample(0, BIG)), _sample(0, BIG)), bench)


def test_periodic_checkpoints_carry_the_prior_and_resume(tmp_path):
    train = [_sample(1, BIG)]  # degrade pairs of one section: 10 × 10 spots → 5 × 5 LR blocks, 2 stripes
    (f,), _ = P.make_fields(train, P.choose_genes(train, n_genes=3), 2, mode="degrade")
    knobs = dict(KNOBS, steps=4, train_overrides=dict(checkpoint_every=2, log_every=1, warmup_steps=1))
    m = DiffST(budget="tiny", seed=0, device="cpu", **knobs)
    for ev in m.iter_fit([f], train_samples=train, out_dir=tmp_path / "run"):
        if ev.kind == "checkpoint" and ev.step == 2:
            st = read_checkpoint(tmp_path / "run")
            assert st["step"] == 2 and st["method"]["prior"]["kind"] == "cell"
            assert st["method"]["prior"]["B"].dtype == torch.float64
            break
    # resume from the step-2 checkpoint: same prior, continues to the end
    (f2,), _ = P.make_fields(train, list(f.genes), 2, mode="degrade", gene_scale=f.gene_scale)
    m2 = DiffST(budget="tiny", seed=0, device="cpu", **knobs)
    evs = list(m2.iter_fit([f2], train_samples=train, out_dir=tmp_path / "run", resume=tmp_path / "run"))
    assert evs[-1].kind == "done" and m2.trained_steps_ == 4
    assert m2.alpha_ == 1.0  # no validation field: no shrink
    st = read_checkpoint(tmp_path / "run")
    assert st["step"] == 4 and st["method"]["prior"]["cross_fit"].startswith("leave one of")


def test_one_section_prior_is_cross_fitted_on_stripes():
    """With one training section each stripe's prior comes from a ridge that never saw that stripe's pixels."""
    from napari_diffst.method import _stripe_cross_fit
    from napari_diffst.data.cellfeatures import add_cell_features

    smp = _sample(1, BIG)
    (f,), _ = P.make_fields([smp], P.choose_genes([smp], n_genes=3), 2, mode="degrade")
    add_cell_features(f, smp)
    folds = stripe_folds(f)
    assert len(folds) >= 2
    total = np.sum(folds, axis=0)
    assert (total == 1).all()  # every HR pixel in exactly one stripe
    p = _stripe_cross_fit(f, folds)
    # change the HR targets inside stripe 0 only: stripe 0's prior must not move, the others' must
    import dataclasses

    hr = np.asarray(f.hr, np.float32).copy()
    hr[:, folds[0]] += np.random.default_rng(0).normal(0, 1, hr[:, folds[0]].shape).astype(np.float32)
    g = dataclasses.replace(f, hr=hr, extra=dict(f.extra))
    q = _stripe_cross_fit(g, folds)
    np.testing.assert_array_equal(p[:, folds[0]], q[:, folds[0]])
    assert not np.allclose(p[:, folds[1]], q[:, folds[1]])
    # the method uses it for its single training field
    m = DiffST(budget="tiny", seed=0, device="cpu", **KNOBS)
    fit_fields = m._fit_prior([f], None, 0, "tiny", kind="cell")
    np.testing.assert_array_equal(fit_fields[0].lr_upsampled(3), p)
    assert m.prior_folds_ == len(folds)


def test_cell_prior_needs_the_section_when_features_are_missing():
    smp = _sample(1)
    (f,), _ = P.make_fields([smp], P.choose_genes([smp], n_genes=3), 2, mode="degrade")
    with pytest.raises(Exception, match="cell-level prior needs"):
        DiffST(budget="tiny", device="cpu", **KNOBS).fit([f])


def test_a_checkpoint_without_method_state_loads_as_the_bare_network(tmp_path):
    smp = _sample(1)
    genes = P.choose_genes([smp], n_genes=3)
    (f,), _ = P.make_fields([smp], genes, 2, mode="degrade")
    tr = P.make_trainer([f], budget="tiny", steps=2, batch_size=2, lr_size=4, device="cpu", out_dir=tmp_path / "old",
                        train_samples=[smp], log_every=1, warmup_steps=1)
    list(tr.iter_train())
    assert read_checkpoint(tmp_path / "old").get("method") is None
    m = DiffST.load(tmp_path / "old", device="cpu")
    assert m.prior_ is None and m.alpha_ == 1.0 and m.genes_ == list(genes)
    res = m.predict(m.make_field(smp, mode="native"), steps=2, n_samples=1)
    assert res.mean.shape == (3,) + tuple(res.field.hr_shape) and res.report is not None  # native: projected
    assert isinstance(DiffusionMethod(), DiffST)
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    assert cfg["format_version"] == 2 and "method" not in cfg
