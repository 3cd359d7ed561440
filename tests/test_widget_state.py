"""Qt-free parts of the dock: evented state, job generators (train / sample / compare / register) and the
small helpers the sections use. No viewer, no QApplication, no event loop: the generators are exactly what
the napari thread workers run."""
from __future__ import annotations

import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from napari_diffst._widgets import workers as W  # noqa: E402
from napari_diffst._widgets.state import DockState, unwrap  # noqa: E402


@pytest.fixture(scope="module")
def synth():
    from napari_diffst import pipeline as P

    s = P.load_data("synthetic")
    genes = P.choose_genes([s], n_genes=2)
    return s, genes


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    """A 2-step tiny checkpoint trained through train_job (module-scoped: reused by the sampling tests)."""
    s, genes = synth
    ck = tmp_path_factory.mktemp("ck")
    job = W.Job("train")
    out = list(W.train_job(job, s, genes, 5, budget="tiny", steps=2, batch_size=2, lr_size=4, out_dir=ck))
    return ck, job, out


# --------------------------------------------------------------------------------------------- state
def test_state_signals_and_unwrap(synth):
    from napari.utils._proxies import PublicOnlyProxy

    s, _ = synth
    st = DockState()
    seen = {"sample": [], "genes": [], "reg": []}
    st.sample_changed.connect(seen["sample"].append)
    st.genes_changed.connect(seen["genes"].append)
    st.registration_changed.connect(seen["reg"].append)
    prox = PublicOnlyProxy.create(s)  # what a plugin gets from layer.metadata through the viewer proxy
    assert type(prox).__name__.endswith("PublicOnlyProxy") and unwrap(prox) is s
    st.set_sample(prox, None, None)
    assert st.sample is s and seen["sample"] == [s]
    st.set_sample(PublicOnlyProxy.create(s), None, None)  # same sample again: no second emission
    assert len(seen["sample"]) == 1
    st.field = object()
    st.set_train_fields([1, 2])
    st.set_registration(s)
    assert st.field is None and st.train_fields == [] and seen["reg"] == [s]
    st.set_genes(("ERBB2", "EPCAM"))
    assert seen["genes"] == [["ERBB2", "EPCAM"]] and st.genes == ["ERBB2", "EPCAM"]
    devs = []
    st.device_changed.connect(devs.append)
    assert st.device == "auto"
    st.set_device("cpu")
    st.set_device("cpu")  # unchanged: no second emission
    assert st.device == "cpu" and devs == ["cpu"]


# --------------------------------------------------------------------------------------------- helpers
def test_helpers_known_answers():
    a = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    mask = np.zeros((3, 4), bool)
    mask[1:, 1:] = True
    m = W.masked_expression(a, [2.0], mask)
    assert np.isnan(m[0][~mask]).all() and np.allclose(m[0][mask], 2 * a[0][mask])
    lo, hi = W.contrast_limits(m[0], q=100)
    assert lo == 0.0 and hi == pytest.approx(22.0)
    assert W.contrast_limits(np.full((2, 2), np.nan)) == (0.0, 1.0)
    assert W.format_eta(None) == "–" and W.format_eta(75) == "1:15" and W.format_eta(3725) == "1:02:05"
    thr = W.Throttle(3600)
    assert thr() and not thr() and thr(force=True)
    scores = {"A": {"pcc": 0.5, "rmse": 0.1, "ssim": 0.2, "detail_pcc": 0.0,
                    "per_gene": {"gene": ["g1", "g2"], "pcc": [0.4, 0.6], "rmse": [0.1, 0.1],
                                 "ssim": [0.2, 0.2], "detail_pcc": [0.0, 0.0]}}}
    assert W.metrics_rows(scores) == [["A", 0.5, 0.1, 0.2, 0.0]]
    csv = W.metrics_csv(scores).splitlines()
    assert csv == ["method,gene,pcc,rmse,ssim,detail_pcc", "A,g1,0.4,0.1,0.2,0", "A,g2,0.6,0.1,0.2,0",
                   "A,mean,0.5,0.1,0.2,0"]


def test_preview_rgba_and_result_layer_data():
    lut = np.zeros((256, 4), np.uint8)
    lut[:, 0] = np.arange(256)
    lut[:, 3] = 255
    a = np.zeros((400, 300), np.float32)
    a[:, 150:] = 2.0
    mask = np.ones((400, 300), bool)
    mask[:10] = False
    img = W.preview_rgba(a, 0.5, mask, lut, max_px=200)  # 400 px > 200: every 2nd pixel
    assert img.shape == (200, 150, 4) and img.dtype == np.uint8 and img.flags["C_CONTIGUOUS"]
    assert (img[:5, :, 3] == 0).all() and (img[5:, :, 3] == 255).all()  # transparent outside the mask
    assert (img[5:, :75, 0] == 0).all() and (img[5:, 75:, 0] == 255).all()  # 0 → lut[0], top → lut[255]
    assert W.preview_rgba(a, 1.0, None, lut, max_px=400).shape == (400, 300, 4)

    from types import SimpleNamespace

    fld = SimpleNamespace(gene_scale=np.array([2.0, 1.0]), hr_mask=mask)
    res = SimpleNamespace(field=fld, mean=np.stack([a, a + 1]), std=np.stack([a, a]) * 0.1)
    d = W.result_layer_data(res)
    assert np.allclose(d["maps"], W.masked_expression(res.mean, fld.gene_scale, mask), equal_nan=True)
    assert np.isnan(d["maps"][:, ~mask]).all() and d["std_maps"].shape == (2, 400, 300)
    assert d["clims"] == [W.contrast_limits(m) for m in d["maps"]] and len(d["std_clims"]) == 2


def test_loss_plot_ticks():
    from napari_diffst._widgets.plots import nice_step

    assert [nice_step(n) for n in (1, 4, 20, 300, 40000)] == [1, 1, 5, 100, 10000]


def test_friendly_error_messages():
    from napari_diffst.device import OutOfMemoryError, oom_message
    from napari_diffst.errors import GeneNotFoundError

    assert "reduce the batch size from 8 to 4" in W.friendly_error(OutOfMemoryError(oom_message("training", 8)))
    msg = W.friendly_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "sampling")
    assert msg.startswith("Out of memory during sampling") and "batch size" in msg
    g = W.friendly_error(GeneNotFoundError("gene 'ERB2' (did you mean: ERBB2?) not found in C2"))
    assert "did you mean: ERBB2" in g and "section 3" in g
    assert W.friendly_error(ValueError("boom"), "training") == "Training failed: ValueError: boom"


def test_raster_layer_kwargs_reproduce_field_affine():
    from napari.utils.transforms import Affine

    from napari_diffst.data.grids import field_napari_affine
    from napari_diffst.data.pairs import SRField

    th = np.deg2rad(7.0)
    A = np.array([[40 * np.cos(th), -40 * np.sin(th), 120.0], [40 * np.sin(th), 40 * np.cos(th), 80.0], [0, 0, 1]])
    f = SRField("f", ["g"], 5, np.zeros((1, 4, 4), np.float32), np.ones((4, 4), bool), None,
                np.ones((20, 20), bool), np.zeros((3, 80, 80), np.float32), 4, 40.0, np.ones(1), um_per_px=0.5,
                extra={"hr_affine": A, "lr_affine": A})
    kw = W.raster_layer_kwargs(f, "hr")
    B = Affine(scale=kw["scale"], translate=kw["translate"], rotate=kw["rotate"], shear=kw["shear"]).affine_matrix
    assert np.allclose(B, field_napari_affine(f, "hr"), atol=1e-9)
    assert kw["scale"][0] == pytest.approx(20.0) and kw["translate"] == pytest.approx((40.0, 60.0))


# --------------------------------------------------------------------------------------------- jobs
def test_train_job_events_checkpoint_and_memory(trained):
    from napari_diffst.train.checkpoint import read_checkpoint

    ck, job, out = trained
    kinds = [d["kind"] for d in out]
    assert kinds[:2] == ["prepare", "ready"]
    evs = [d["event"] for d in out if d["kind"] == "event"]
    assert [e.step for e in evs if e.kind == "step"] == [1, 2] and evs[-1].kind == "done"
    ready = out[1]
    assert ready["total"] == 2 and ready["fields"][0].hr is not None and ready["device"] == "cpu"
    assert read_checkpoint(ck)["step"] == 2
    assert job.done.is_set() and job.trainer is None
    gc.collect()
    assert job.info["model_ref"]() is None  # nothing keeps the model alive after the run


def test_train_job_cancel_within_one_step(synth, tmp_path):
    from napari_diffst.train.checkpoint import read_checkpoint

    s, genes = synth
    job = W.Job("train")
    seen = []
    for d in W.train_job(job, s, genes, 5, budget="tiny", steps=50, batch_size=2, lr_size=4, out_dir=tmp_path):
        seen.append(d)
        if d["kind"] == "event" and d["event"].kind == "step" and d["event"].step == 1:
            job.cancel()
    last = seen[-1]["event"]
    assert last.kind == "cancelled" and last.step <= 2
    assert read_checkpoint(tmp_path)["step"] == last.step and job.done.is_set()


def test_train_job_bad_gene_is_an_error_event(synth, tmp_path):
    s, _ = synth
    job = W.Job()
    out = list(W.train_job(job, s, ["ERB2"], 5, budget="tiny", steps=1, out_dir=tmp_path))
    assert out[-1]["kind"] == "error" and "did you mean: ERBB2" in out[-1]["message"] and job.done.is_set()


def test_sample_job_preview_result_and_cancel(synth, trained):
    s, genes = synth
    ck = trained[0]
    job = W.Job("sample")
    lut = np.zeros((256, 4), np.uint8)
    out = list(W.sample_job(job, ck, s, steps=3, n_samples=2, preview_every_s=3600, preview_lut=lut))
    ready = next(d for d in out if d["kind"] == "ready")
    assert ready["mode"] == "truth" and ready["info"]["genes"] == genes and ready["info"]["scale"] == 5
    prog = [d for d in out if d["kind"] == "progress"]
    assert [d["done"] for d in prog] == list(range(1, 7)) and prog[-1]["total"] == 6
    # previews: the first step, then only the last step of each sample (throttled)
    assert [d["done"] for d in prog if "x0_pred" in d] == [1, 3, 6]
    assert [d["done"] for d in prog if "preview" in d] == [1, 3, 6]  # rendered in the worker
    assert all(d["preview"].shape == (*ready["field"].hr_shape, 4) for d in prog if "preview" in d)
    res = out[-1]["result"]
    fld = ready["field"]
    assert out[-1]["kind"] == "result" and res.mean.shape == (len(genes), *fld.hr_shape)
    assert out[-1]["maps"].shape == res.mean.shape and len(out[-1]["clims"]) == len(genes)  # layer data too
    assert np.all(res.mean[:, ~fld.hr_mask] == 0) and np.all(res.std >= 0)
    assert fld.he_per_hr == ready["info"]["he_per_hr"]
    job2 = W.Job()
    out2 = []
    for d in W.sample_job(job2, ck, s, steps=3, n_samples=2):
        out2.append(d)
        if d["kind"] == "progress" and d["done"] == 2:
            job2.cancel()
    assert out2[-1]["kind"] == "cancelled" and not any(d["kind"] == "result" for d in out2)


def test_compare_and_register_jobs(synth, trained):
    from napari_diffst import pipeline as P
    from napari_diffst.data.registration import similarity_matrix
    from napari_diffst.data.sample import apply_affine

    s, genes = synth
    from napari_diffst.train.checkpoint import load_checkpoint

    _, ema, meta = load_checkpoint(trained[0])
    fld, mode = W.field_for_checkpoint(s, W.checkpoint_info(meta))
    assert mode == "truth" and fld.he_per_hr == ema.config["he_per_hr"]
    res = P.super_resolve(ema, fld, steps=2, n_samples=1)
    out = list(W.compare_job(W.Job(), res, ["nearest"], []))
    r = out[-1]
    assert r["kind"] == "result" and list(r["preds"]) == ["Diff-ST", "nearest"]
    assert set(r["scores"]) == {"Diff-ST", "nearest", "LR (nearest)"}
    assert r["scores"]["nearest"]["detail_pcc"] == pytest.approx(0.0, abs=1e-9)
    assert r["scores"]["nearest"]["pcc"] == pytest.approx(r["scores"]["LR (nearest)"]["pcc"])

    xy = np.asarray(s.adata.obsm["spatial"], float)[:4] + [[0, 0], [900, 0], [0, 900], [900, 900]]
    T = similarity_matrix(30, -20, 2.0, 1.0)
    out = list(W.register_job(W.Job(), s, "landmarks", landmarks=(apply_affine(T, xy), xy)))
    rr = out[-1]["result"]
    assert np.allclose(rr.transform, T, atol=1e-8) and rr.rms_um < 1e-6
    assert 0 <= rr.frac_on_tissue_after <= 1 and rr.frac_on_tissue_before > 0.9


def test_grid_shape_fits_canvas():
    assert W.grid_shape(5, (850, 550), (60, 55)) == (3, 2)   # tall canvas: 2 columns
    assert W.grid_shape(5, (500, 1500), (60, 55)) == (1, 5)  # wide canvas: one row
    assert W.grid_shape(4, (800, 800), (10, 10)) == (2, 2)
    assert W.grid_shape(1, (800, 600), (10, 10)) == (1, 1)


def test_sample_job_tiles_automatically_above_the_budget(synth, trained):
    """The dock's worker takes the tiled path when the untiled rasters exceed the budget (issue 17):
    the ready event says so, progress names the tiles, the result is a normal SRResult for the layers."""
    s, genes = synth
    out = list(W.sample_job(W.Job("sample"), trained[0], s, steps=2, n_samples=1, budget_mb=0.001))
    ready = next(d for d in out if d["kind"] == "ready")
    assert "tiled automatically" in ready["tiling"] and ready["mode"] == "native"
    prog = [d for d in out if d["kind"] == "progress"]
    assert prog and all(d["desc"].startswith("napari-diffst: tiles ") for d in prog)
    res = out[-1]["result"]
    assert out[-1]["kind"] == "result" and res.mean.shape == (len(genes), *ready["field"].hr_shape)
    assert np.all(np.isnan(out[-1]["maps"][:, ~ready["field"].hr_mask]))
    untiled = next(d for d in W.sample_job(W.Job("sample"), trained[0], s, steps=1, n_samples=1)
                   if d["kind"] == "ready")
    assert "untiled" in untiled["tiling"]
