"""`napari-diffst benchmark`: scores on known inputs, the JSON schema, gene selection, and two in-process
runs of the command (tiny synthetic with Diff-ST; real her2st C6 with the cheap baselines)."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from napari_diffst import cli
from napari_diffst.benchmark import (DIFFUSION_BUDGETS, METHOD_NAMES, METRICS, DiffusionMethod, Method, PeakRSS, format_markdown,
                                     format_table, make_method, parse_diffst_set, parse_methods, score_row,
                                     select_genes_variance, validate_result)
from napari_diffst.errors import DiffSTError
from toy_fields import make_toy_field

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ scores on known inputs
@pytest.fixture(scope="module")
def toy():
    return make_toy_field(0)


def test_score_row_perfect_prediction(toy):
    row, ceiling = score_row(toy.hr, toy)
    assert set(row) == {"pcc", "rmse", "ssim", "detail_pcc"}
    assert row["pcc"] == pytest.approx(1.0, abs=1e-9)
    assert row["rmse"] == pytest.approx(0.0, abs=1e-9)
    assert row["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert row["detail_pcc"] == pytest.approx(1.0, abs=1e-9)
    assert ceiling is None  # toy field has no counts → no split-half ceiling (null, not NaN)


def test_score_row_affine_and_lr_copy(toy):
    m = toy.hr_mask[None]
    row, _ = score_row((2.0 * toy.hr + 0.5) * m, toy)
    assert row["pcc"] == pytest.approx(1.0, abs=1e-9)     # PCC ignores a per-gene affine map
    assert row["rmse"] > 0.4                                # but RMSE (truth min–max units) does not
    up = toy.lr_upsampled(0)
    row, _ = score_row((up + 3.0 * (toy.hr - up)) * m, toy)  # detail-PCC: only the residual's shape counts
    assert row["detail_pcc"] == pytest.approx(1.0, abs=1e-9)
    assert row["pcc"] < 0.999
    row, _ = score_row(toy.lr_upsampled(0) * m, toy)       # LR block copy: no sub-pixel detail
    assert row["detail_pcc"] == 0.0
    assert 0.5 < row["pcc"] < 1.0


def test_score_row_rmse_known_value_and_nan_to_none(toy):
    # truth min–max normalised RMSE of a prediction offset by 10 % of each gene's range is 0.1
    rng = (toy.hr[:, toy.hr_mask].max(1) - toy.hr[:, toy.hr_mask].min(1))[:, None, None]
    row, _ = score_row(toy.hr + 0.1 * rng, toy)
    assert row["rmse"] == pytest.approx(0.1, rel=1e-5)
    one = dataclasses.replace(toy, genes=["flat"], hr=np.where(toy.hr_mask, 0.3, 0)[None].astype(np.float32),
                              lr=np.where(toy.lr_mask, 0.3, 0)[None].astype(np.float32),
                              gene_scale=np.ones(1, np.float32))
    row, _ = score_row(one.hr, one)  # a constant truth gene: every metric undefined → None (valid JSON)
    assert row == {"pcc": None, "rmse": None, "ssim": None, "detail_pcc": None}


# ------------------------------------------------------------------------------ methods / helpers
def test_method_registry_and_parse():
    assert parse_methods("all") == list(METHOD_NAMES)
    assert parse_methods("bicubic, nearest,bicubic") == ["bicubic", "nearest"]
    with pytest.raises(DiffSTError, match="unknown method 'bicubik'"):
        parse_methods("bicubik")
    for n in METHOD_NAMES:
        m = make_method(n)
        assert isinstance(m, Method)
    assert make_method("diffst").ablate_all is False and make_method("cond_diffusion").ablate_all is True
    with pytest.raises(ValueError, match="unknown diffusion knobs"):
        DiffusionMethod(stepz=3)
    kn = DiffusionMethod(steps=7).resolved_knobs("tiny")
    assert kn["steps"] == 7 and kn["model_preset"] == "tiny"


def test_peak_rss_sees_a_large_allocation():
    with PeakRSS() as mem:
        a = np.ones(120 * 2 ** 20 // 8)  # 120 MiB, every page touched; still alive when the span ends
    del a
    assert 90 <= mem.increase_mb <= 400
    assert mem.source in ("VmRSS", "psutil", "ru_maxrss")


def _adata(counts, genes, name):
    import anndata as ad

    a = ad.AnnData(X=np.asarray(counts, np.float32))
    a.var_names = genes
    a.obs_names = [f"{name}_{i}" for i in range(a.n_obs)]
    return a


def test_select_genes_variance_known_ranking():
    rng = np.random.default_rng(0)
    n = 40
    hi = np.r_[np.full(n // 2, 1), np.full(n // 2, 60)]       # strongly bimodal → largest variance
    mid = rng.poisson(20, n) + np.r_[np.zeros(n // 2), np.full(n // 2, 15)]
    flat = np.full(n, 30)                                    # constant CP10k (constant library) → excluded
    rare = np.r_[np.full(n // 4, 50), np.zeros(n - n // 4)]  # detected in 25 % of spots → excluded
    fill = 1000 - (hi + mid + flat + rare)                   # every spot's library is exactly 1000
    C = np.stack([flat, rare, mid, hi, fill], 1)
    genes = ["FLAT", "RARE", "MID", "HI", "FILL"]
    a, b = _adata(C[: n // 2 + 5], genes, "a"), _adata(C[n // 2 - 5:], genes, "b")
    assert select_genes_variance([a, b], 2) == ["HI", "MID"]
    assert select_genes_variance([a, b], 10) == ["HI", "MID", "FILL"]  # only three are eligible
    # a gene missing from an apply_to section is never chosen
    other = _adata(C[:, [0, 1, 2, 4]], ["FLAT", "RARE", "MID", "FILL"], "c")
    assert select_genes_variance([a, b], 2, apply_to=[other]) == ["MID", "FILL"]


# ------------------------------------------------------------------------------ schema
def _valid_doc():
    row = {"pcc": 0.6, "rmse": 0.15, "ssim": 0.8, "detail_pcc": 0.2, "seconds": 1.5, "peak_mb": 12.0}
    return {"genes": ["A", "B"], "scale": 2, "budget": "quick", "device": "cpu", "synthetic": False, "seed": 0,
            "meta": {}, "sections": {"C6": {"n_spots": 178, "ceiling_pcc": 0.85,
                                            "methods": {"nearest": dict(row), "bicubic": dict(row)}}}}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("genes"), "missing keys ['genes']"),
    (lambda d: d.update(extra=1), "unexpected keys ['extra']"),
    (lambda d: d.update(scale="2"), "scale"),
    (lambda d: d.update(budget="medium"), "budget"),
    (lambda d: d.update(device="gpu"), "device"),
    (lambda d: d["sections"]["C6"].update(n_spots=178.0), "n_spots"),
    (lambda d: d["sections"]["C6"].update(ceiling_pcc=1.2), "ceiling_pcc"),
    (lambda d: d["sections"]["C6"]["methods"]["nearest"].pop("ssim"), "missing keys ['ssim']"),
    (lambda d: d["sections"]["C6"]["methods"]["nearest"].update(pcc=float("nan")), "pcc"),
    (lambda d: d["sections"]["C6"]["methods"]["nearest"].update(seconds=-1), "seconds"),
    (lambda d: d["sections"]["C6"]["methods"].update(magic=d["sections"]["C6"]["methods"]["nearest"]),
     "unknown method"),
    (lambda d: d.update(sections={}), "sections"),
])
def test_validate_result_flags_each_problem(mutate, message):
    doc = _valid_doc()
    assert validate_result(doc) == []
    mutate(doc)
    errs = validate_result(doc)
    assert errs and any(message in e for e in errs), errs


def test_validate_synthetic_document_and_tables():
    run = _valid_doc()
    run["synthetic"] = True
    run["sections"]["C6"]["ceiling_pcc"] = None
    r5, r10 = copy.deepcopy(run), copy.deepcopy(run)
    r5["scale"], r10["scale"] = 5, 10
    doc = {"synthetic": True, "budget": "quick", "device": "cpu", "seed": 0, "scales": [5, 10],
           "runs": {"5": r5, "10": r10}}
    assert validate_result(doc) == []
    bad = copy.deepcopy(doc)
    bad["runs"]["10"]["scale"] = 5
    assert any("does not match its key" in e for e in validate_result(bad))
    bad = copy.deepcopy(doc)
    bad["runs"]["5"]["synthetic"] = False
    assert any("synthetic: expected true" in e for e in validate_result(bad))
    txt = format_table(doc)
    titles = [ln for ln in txt.splitlines() if "spots" in ln]
    assert len(titles) == 2 and all(t.startswith("SYNTHETIC") for t in titles)
    assert "no ceiling" in titles[0]
    md = format_markdown(_valid_doc())
    assert "| nearest | 0.600 | 0.150 | 0.800 | 0.200 | 1.5 | 12 |" in md


# ------------------------------------------------------------------------------ the command, in-process
def _check_run(run, genes_n, methods, sections):
    assert validate_result(run) == []
    assert set(run) == {"genes", "scale", "budget", "device", "synthetic", "seed", "meta", "sections"}
    assert len(run["genes"]) == genes_n and run["device"] == "cpu" and run["budget"] == "tiny"
    assert list(run["sections"]) == sections
    for sec in run["sections"].values():
        assert set(sec) == {"n_spots", "ceiling_pcc", "methods"}
        assert list(sec["methods"]) == methods
        for name, row in sec["methods"].items():
            assert tuple(row)[:len(METRICS) + 1] == METRICS + ("trained_steps",)
            # the diffusion rows' self-check a level further down (or why it was skipped) and unchecked scores
            assert set(tuple(row)[len(METRICS) + 1:]) <= ({"self_check", "unchecked"}
                                                          if name in ("diffst", "cond_diffusion") else set())
            if name in ("diffst", "cond_diffusion"):  # the budget's step count, whatever the load
                assert row["trained_steps"] == DIFFUSION_BUDGETS["tiny"]["steps"]
            elif name in ("nearest", "bicubic"):
                assert row["trained_steps"] == 0
            assert all(isinstance(row[k], float) for k in METRICS)


def test_cli_synthetic_tiny_with_diffst(tmp_path, capsys):
    out, maps = tmp_path / "syn.json", tmp_path / "maps"
    rc = cli.main(["benchmark", "--synthetic", "--synthetic-size-um", "1000", "--n-genes", "2",
                   "--methods", "nearest,diffst", "--budget", "tiny", "--device", "cpu", "--quiet",
                   "--out", str(out), "--save-maps", str(maps)])
    assert rc == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert validate_result(doc) == [] and doc["synthetic"] is True and doc["scales"] == [5, 10]
    for s, run in doc["runs"].items():
        _check_run(run, 2, ["nearest", "diffst"], ["synthetic0"])
        assert run["synthetic"] is True and run["scale"] == int(s)
        sec = run["sections"]["synthetic0"]
        assert sec["ceiling_pcc"] is None                      # noise-free truth
        assert sec["methods"]["nearest"]["detail_pcc"] == 0.0
        assert sec["methods"]["diffst"]["seconds"] > 0
        z = np.load(maps / f"{s}x" / "synthetic0.npz")
        assert list(z["methods"]) == ["nearest", "diffst"]
        assert z["truth"].shape == z["pred_diffst"].shape == (2,) + tuple(np.array(z["lr"].shape[1:]) * int(s))
        assert run["meta"]["mode"]["synthetic0"] == "truth"
    titles = [ln for ln in printed.splitlines() if " spots" in ln]
    assert len(titles) == 2 and all(t.startswith("SYNTHETIC") for t in titles)
    assert "SYNTHETIC benchmark finished" in printed


def test_cli_her2st_c6_cheap_baselines(her2st_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # bare section names resolve beside the first --train path
    out = tmp_path / "c6.json"
    rc = cli.main(["benchmark", "--train", str(her2st_dir / "C4"), "--val", "C5", "--test", "C6", "--scale", "2",
                   "--n-genes", "5", "--methods", "nearest,bicubic", "--budget", "tiny", "--device", "cpu",
                   "--quiet", "--out", str(out), "--save-maps", str(tmp_path / "maps")])
    assert rc == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    _check_run(doc, 5, ["nearest", "bicubic"], ["C6"])
    assert doc["scale"] == 2 and doc["synthetic"] is False
    c6 = doc["sections"]["C6"]
    assert c6["n_spots"] == 178
    assert 0.5 < c6["ceiling_pcc"] < 1.0
    near, bic = c6["methods"]["nearest"], c6["methods"]["bicubic"]
    assert near["detail_pcc"] == 0.0 and bic["detail_pcc"] > 0.05
    assert 0.3 < near["pcc"] <= 1.0 and 0.3 < bic["pcc"] <= 1.0
    assert doc["meta"]["train"] == ["C4"] and doc["meta"]["val"] == "C5"
    assert doc["meta"]["mode"]["C6"] == "degrade"
    printed = capsys.readouterr().out
    assert "C6: 178 spots, split-half ceiling PCC" in printed and "SYNTHETIC" not in printed
    z = np.load(tmp_path / "maps" / "C6.npz")
    assert z["truth"].shape[0] == 5 and z["pred_bicubic"].shape == z["truth"].shape
    assert z["lr"].shape[1] * 2 == z["truth"].shape[1]


def test_diffst_set_routes_and_merges_options():
    kn = parse_diffst_set(["use_align=true", "adv_weight=0.01", "steps=5", "hist_features=file:/x/m.pt",
                           "gene_chunk=8", "model.distill=false", "train.lr=1e-3"])
    assert kn == {"steps": 5, "model_overrides": {"use_align": True, "hist_features": "file:/x/m.pt",
                                                  "gene_chunk": 8, "distill": False},
                  "train_overrides": {"adv_weight": 0.01, "lr": 0.001}}
    assert parse_diffst_set([]) == {}
    for bad, msg in (("nokey", "KEY=VALUE"), ("magic=1", "not a diffusion knob"), ("gene_chunk=-2", "gene_chunk"),
                     ("adv_weight=-1", "adv_weight"), ("hist_features=nope", "hist_features")):
        with pytest.raises(DiffSTError, match=msg):
            parse_diffst_set([bad])
    # the override dicts merge into the budget's: the quick budget's distillation head stays on
    res = DiffusionMethod(**parse_diffst_set(["use_align=true", "adv_weight=0.01"])).resolved_knobs("quick")
    assert res["model_overrides"] == {"distill": True, "use_align": True}
    assert res["train_overrides"] == {"lr": 5e-4, "adv_weight": 0.01}


def test_cli_diffst_set_options_row(tmp_path, capsys):
    out = tmp_path / "opt.json"
    rc = cli.main(["benchmark", "--synthetic", "--synthetic-scales", "5", "--synthetic-size-um", "1000",
                   "--n-genes", "3", "--methods", "diffst", "--budget", "tiny", "--device", "cpu", "--quiet",
                   "--out", str(out), "--diffst-set", "use_align=true", "--diffst-set", "adv_weight=0.1",
                   "--diffst-set", "gene_chunk=2", "--diffst-set", "gene_chunk_train=1",
                   "--diffst-set", "hist_features=handcrafted"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert validate_result(doc) == []
    assert doc["meta"]["diffst_set"][0] == "use_align=true"
    run = doc["runs"]["5"]
    assert run["meta"]["diffst_set"] == doc["meta"]["diffst_set"]
    kn = run["meta"]["method_knobs"]["diffst"]
    assert kn["model_overrides"] == {"use_align": True, "gene_chunk": 2, "gene_chunk_train": 1,
                                     "hist_features": "handcrafted"}
    assert kn["train_overrides"]["adv_weight"] == 0.1 and kn["trained_steps"] == 3
    assert run["sections"]["synthetic0"]["methods"]["diffst"]["pcc"] is not None
    assert cli.main(["benchmark", "--synthetic", "--diffst-set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_cli_errors_are_one_line(capsys):
    assert cli.main(["benchmark", "--test", "x"]) == 2
    assert "needs --train" in capsys.readouterr().err
    assert cli.main(["benchmark", "--synthetic", "--methods", "magic"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err


def test_diffst_regression_prior_is_cross_fitted(monkeypatch):
    """prior='histosge': each training field's condition comes from a regressor that did not see it; the
    fields passed in are left untouched; prediction uses the regressor fitted on all training fields."""
    from napari_diffst.baselines import HisToSGEStyle

    monkeypatch.setitem(HisToSGEStyle.BUDGETS, "tiny", {**HisToSGEStyle.BUDGETS["tiny"], "steps": 5,
                                                         "val_every": 5})
    train = [make_toy_field(i) for i in (1, 2)]
    before = [f.lr_upsampled(3).copy() for f in train]
    m = DiffusionMethod(prior="histosge", model_overrides={"use_cigc": False})  # toy fields: no counts
    seen = {}
    real = m._with_prior

    def spy(field, prior):
        seen[field.name] = prior
        return real(field, prior)

    monkeypatch.setattr(m, "_with_prior", spy)
    m.fit(train, make_toy_field(10), seed=0, budget="tiny")
    assert set(seen) == {f.name for f in train}
    for f, b in zip(train, before):  # the caller's fields keep their cubic condition
        np.testing.assert_array_equal(f.lr_upsampled(3), b)
        assert not np.allclose(seen[f.name], b)
    test = make_toy_field(0)
    pred = m.predict(test)
    assert pred.shape == test.hr.shape and np.isfinite(pred).all()
    assert m.knobs_["prior"] == "histosge" and m.prior_ is not None
    with pytest.raises(ValueError, match="prior"):
        DiffusionMethod(prior="magic").fit(train, seed=0, budget="tiny")


def test_diffst_shrink_fits_alpha_on_the_validation_field():
    train = [make_toy_field(i) for i in (1, 2)]
    val, test = make_toy_field(10), make_toy_field(0)
    m = DiffusionMethod(shrink=True, model_overrides={"use_cigc": False}).fit(train, val, seed=0, budget="tiny")
    assert 0.0 <= m.alpha_ <= 1.0
    raw, base = m._predict_raw(test)
    pred = m.predict(test)
    mask = test.hr_mask.astype(np.float32)[None]
    np.testing.assert_allclose(pred, (base + m.alpha_ * (raw - base)) * mask, atol=1e-5)
    m.alpha_ = 0.0  # no detail kept: the base map itself
    np.testing.assert_allclose(m.predict(test), base * mask, atol=1e-6)
    assert DiffusionMethod(model_overrides={"use_cigc": False}).fit(train, val, budget="tiny").alpha_ == 1.0
