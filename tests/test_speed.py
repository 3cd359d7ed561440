"""`napari-diffst bench-speed` (full 1000-step vs respaced sampling, throughput) and `sample --tile`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from napari_diffst import cli
from napari_diffst.speed import bench_speed, format_speed, validate_speed

#: CI-size: a tiny network, a 600 µm synthetic section (30 × 30 HR px at 5×), a few training steps
MINI = dict(size_um=600.0, n_genes=3, train_steps=4, respaced_steps=20, curve=[5], n_samples=1,
            tp_batch=2, tp_tile=16, tp_reps=1)


@pytest.fixture(scope="module")
def speed_result(tmp_path_factory):
    """One run of the real command (the 1000-step sampler is the slow part), read back from its JSON."""
    import napari_diffst.speed as S

    mp = pytest.MonkeyPatch()
    mp.setitem(S.SPEED_BUDGETS, "tiny", {**S.SPEED_BUDGETS["tiny"], **MINI})
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    try:
        assert cli.main(["bench-speed", "--budget", "tiny", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    finally:
        mp.undo()
    return json.loads(out.read_text())


def test_bench_speed_runs_both_samplers_on_the_same_inputs(speed_result):
    r = speed_result
    assert validate_speed(r) == []
    assert r["full_steps"] == 1000 and r["respaced_steps"] == 20
    assert r["calls_full"] == 1000 and r["calls_respaced"] == 20
    assert r["calls_full"] // r["calls_respaced"] >= 20          # ≥ 20× fewer denoiser calls
    steps = [row["steps"] for row in r["curve"]]
    assert steps == sorted(steps) and {5, 20, 1000} <= set(steps)
    for row in r["curve"]:
        assert -1 <= row["pcc"] <= 1 and row["seconds"] > 0
    # wall time tracks the number of calls: the 1000-step run is the slowest by far
    assert r["seconds_full"] > 5 * r["seconds_respaced"]
    assert r["speedup"] == pytest.approx(r["seconds_full"] / r["seconds_respaced"], rel=0.01)
    assert r["device"] == "cpu" and r["train"]["steps"] >= 1 and r["budget"] == "tiny"
    tp = r["throughput"]
    assert tp["rows"]["fp32"]["tiles_per_s"] > 0
    assert tp["flops_per_forward"] and tp["flops_per_forward"] > 1e6
    assert tp["bf16_peak_tflops"] is None                           # no GPU here: no peak fraction
    text = format_speed(r)
    assert "full (T=1000)" in text and "speedup" in text
    json.dumps(r)  # serialisable


def test_validate_speed_flags_bad_documents(speed_result):
    bad = dict(speed_result)
    bad["respaced_steps"] = 100
    del bad["pcc_full"]
    probs = validate_speed(bad)
    assert any("pcc_full" in p for p in probs) and any("respaced_steps" in p for p in probs)
    with pytest.raises(ValueError):
        bench_speed(MINI, respaced_steps=60, device="cpu", quiet=True)


def test_throughput_compile_failure_falls_back(monkeypatch):
    import torch

    from napari_diffst import pipeline as P
    from napari_diffst.speed import throughput

    smp = P.load_data("synthetic:0", size_um=(800.0, 800.0), technology="visium")
    genes = list(smp.adata.var_names[:2])
    fields, _ = P.make_fields([smp], genes, 5)
    model = P.build_diffst_model(fields, [smp], budget="tiny")

    def boom(*a, **k):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", boom)
    tp = throughput(model, fields[0], batch=1, tile=16, reps=1, variants=["fp32", "fp32_compile"])
    assert tp["rows"]["fp32"]["tiles_per_s"] > 0
    assert "no compiler" in tp["rows"]["fp32_compile"]["error"]


def test_cli_sample_tiled_writes_ome_zarr(tmp_path):
    from napari_diffst.io.writers import read_maps

    ck = tmp_path / "run"
    assert cli.main(["train", "--data", "synthetic:0", "--scale", "5", "--n-genes", "2", "--budget", "tiny",
                     "--steps", "2", "--set", "hist_features=handcrafted", "--out", str(ck)]) == 0
    from napari_diffst.train import load_checkpoint

    model, _, _ = load_checkpoint(ck, device="cpu")
    assert model.config["hist_features"] == "handcrafted"      # the engine option reached the network
    assert cli.main(["train", "--data", "synthetic:0", "--budget", "tiny", "--set", "bogus=1",
                     "--out", str(tmp_path / "bad")]) == 2
    out = tmp_path / "maps.ome.zarr"
    assert cli.main(["sample", "--checkpoint", str(ck), "--data", "synthetic:0", "--steps", "2", "--n-samples", "1",
                     "--tile", "24", "--overlap", "8", "--mode", "native", "--out", str(out)]) == 0
    mf = read_maps(out)
    assert mf.maps.shape[0] == 2 and "uncertainty" in mf.extra
    assert np.isfinite(mf.maps).any() and np.isnan(mf.maps).any()   # tissue filled, background NaN
    assert mf.metadata.get("tile") == [24, 24] or mf.metadata.get("napari_diffst", {}).get("tile") == [24, 24]
