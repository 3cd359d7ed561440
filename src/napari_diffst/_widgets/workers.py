"""Long-running dock jobs as plain generators, run in napari thread workers.

The generator bodies (``train_job``, ``sample_job``, ``compare_job``, ``register_job``) are Qt-free:
they call the core (:mod:`napari_diffst.pipeline` …) and *yield* plain dicts ``{'kind': …}``; the dock
turns those into layer and widget updates on the main thread (napari ``GeneratorWorker.yielded``), so no
layer or widget is ever touched from the worker thread. :func:`start_worker` wraps a generator in
``napari.qt.threading.create_worker``.

Cancelling: the dock calls :meth:`Job.cancel`, which sets a thread-safe flag and calls the trainer's
``cancel()``; the trainer stops before its next step, writes its checkpoint and the generator ends after
the ``'cancelled'`` event (so cancel takes at most one step and keeps the last checkpoint). Sampling and
comparison check the flag between reverse steps / baselines; ``worker.quit()`` is only the fallback.

Errors are caught in the generators and yielded as ``{'kind': 'error', 'error': exc, 'message': …}``
with a message that says what to do (:func:`friendly_error`), then the generator ends; the dock shows
them as napari notifications.

Also here: small Qt-free helpers the dock uses (layer placement of SR rasters, contrast limits,
masking, ETA text, the metrics table)."""
from __future__ import annotations

import gc
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

__all__ = ["Job", "train_job", "sample_job", "compare_job", "register_job", "start_worker", "friendly_error",
           "release_memory", "raster_layer_kwargs", "masked_expression", "contrast_limits", "format_eta",
           "metrics_rows", "metrics_csv", "field_for_checkpoint", "grid_shape", "checkpoint_info", "Throttle",
           "preview_rgba", "colormap_lut", "result_layer_data", "JobRunner",
           "GENE_COLORMAPS", "METRIC_COLUMNS"]

from ..layer_data import GENE_COLORMAPS  # noqa: E402  (one home: layer_data.py)
#: (key in score_field's output, column title)
METRIC_COLUMNS = (("pcc", "PCC"), ("rmse", "RMSE"), ("ssim", "SSIM"), ("detail_pcc", "detail-PCC"))


# --------------------------------------------------------------------------------------------- jobs
class Job:
    """What the main thread shares with one running generator: a cancel flag and a done event.

    ``cancel()`` is thread-safe; ``wait(timeout)`` blocks until the generator has finished (its
    ``finally`` ran), used when the viewer closes during a run."""

    def __init__(self, name: str = "job"):
        self.name = name
        self._cancel = threading.Event()
        self.done = threading.Event()
        self.trainer = None
        self.info: dict = {}

    def cancel(self) -> None:
        self._cancel.set()
        tr = self.trainer
        if tr is not None:
            tr.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def is_cancelled(self) -> bool:  # for Trainer(should_stop=...)
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


def release_memory() -> None:
    """Free what a finished run left behind: the young garbage generations (a full ``gc.collect()`` would
    hold the GIL for ~0.3 s in a napari process and stall the viewer; tensors are freed by reference
    counting as soon as the generator drops the trainer/model) and the CUDA cache when there is a GPU."""
    gc.collect(1)
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - torch always importable here
        pass


def friendly_error(exc: BaseException, what: str = "the run") -> str:
    """A one-paragraph message for a notification: what went wrong and what to do about it."""
    from ..errors import CancelledError, DataFormatError, GeneNotFoundError

    try:
        from ..device import OutOfMemoryError, is_oom
    except Exception:  # pragma: no cover
        OutOfMemoryError, is_oom = (), (lambda e: False)
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OutOfMemoryError):
        return msg  # already says what to reduce
    if is_oom(exc) or isinstance(exc, MemoryError):
        return (f"Out of memory during {what}. Reduce the batch size or the patch size, use fewer genes or a "
                f"smaller scale factor, or close other programs using the GPU. ({msg[:200]})")
    if isinstance(exc, GeneNotFoundError):
        return f"{msg}. Pick genes from the list in section 3 (the search box matches any part of a name)."
    if isinstance(exc, CancelledError):
        return f"{what[:1].upper() + what[1:]} was cancelled: {msg}"
    if isinstance(exc, DataFormatError):
        return msg
    return f"{what[:1].upper() + what[1:]} failed: {type(exc).__name__}: {msg}"


def _guard(job: Job, what: str, gen: Iterator[dict]) -> Iterator[dict]:
    """Run ``gen``; an exception becomes an 'error' dict; ``job.done`` is set and memory released at the end.
    ``job.info['tid']``: the worker thread's native id (for diagnostics: the stall probe in the GUI tests)."""
    job.info["tid"] = threading.get_native_id()
    try:
        yield from gen
    except GeneratorExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported to the user as a notification
        yield {"kind": "error", "error": exc, "message": friendly_error(exc, what)}
    finally:
        job.trainer = None
        release_memory()
        job.done.set()


def train_job(job: Job, sample, genes, scale: int, *, budget: str = "quick", steps: int | None = None,
              batch_size: int | None = None, lr_size: int | None = None, out_dir=None, resume=None,
              device: str = "auto", seed: int = 0, checkpoint_every: int | None = None,
              model_overrides: dict | None = None) -> Iterator[dict]:
    """Build the training fields (:func:`pipeline.make_fields`: HR truth where the sample has it, else
    self-supervised degradation pairs) and train (:meth:`Trainer.iter_train`, one event per step).
    ``model_overrides`` (e.g. ``{'hist_features': 'handcrafted'}``) go to the new network's config; a resumed
    run must describe its checkpoint's run (checked: :func:`pipeline.make_trainer`'s ``resume_check``).

    Yields ``prepare`` → ``ready`` (``fields``, ``gene_scale``, ``total``, ``device``, ``step0``) → one
    ``event`` per TrainEvent (``event``) → ends after the trainer's 'done'/'cancelled' (or ``error``)."""

    def body():
        from .. import pipeline as P
        from ..method import DiffST

        yield {"kind": "prepare", "message": f"rasterising {sample.name}: {len(genes)} genes at {scale}×"}
        fields, gene_scale = P.make_fields([sample], list(genes), int(scale))
        if job.cancelled:
            yield {"kind": "cancelled_early", "message": "cancelled before the first step"}
            return
        over = {"log_every": 1}
        if checkpoint_every:
            over["checkpoint_every"] = int(checkpoint_every)
        knobs = {k: int(v) for k, v in dict(steps=steps, batch_size=batch_size, lr_size=lr_size).items()
                 if v is not None}
        knobs["train_overrides"] = over
        if model_overrides:
            knobs["model_overrides"] = dict(model_overrides)
        # the one Diff-ST method object (the benchmark's): cell-level prior cross-fitted on stripes of this section
        method = DiffST(budget=budget, seed=seed, device=device, **knobs)
        if method.needs_cell_features():
            yield {"kind": "prepare", "message": f"cell-level H&E features and prior for {sample.name}"}
        trainer = method.prepare_fit(fields, train_samples=[sample], out_dir=out_dir, should_stop=job.is_cancelled,
                                     resume=resume or None,
                                     provenance={"data": sample.name, "genes_from": "napari dock"})
        if resume:
            trainer.config.log_every = 1
        job.trainer = trainer
        job.info["model_ref"] = weakref.ref(trainer.model)  # lets tests check the model is freed afterwards
        if job.cancelled:
            trainer.cancel()
        yield {"kind": "ready", "fields": fields, "gene_scale": gene_scale, "total": trainer.config.steps,
               "step0": trainer.step, "device": str(trainer.device), "out_dir": str(trainer.out_dir or ""),
               "batch_size": trainer.config.batch_size, "lr_size": trainer.config.lr_size}
        try:
            for ev in method.iter_train():
                yield {"kind": "event", "event": ev}
                if ev.kind == "error":  # the trainer re-raises right after: report once, here
                    return
        finally:
            trainer = method = None

    return _guard(job, "training", body())


def checkpoint_info(meta: dict) -> dict:
    """Genes, scale, gene_scale, step and H&E pixels per HR pixel of a loaded checkpoint's ``meta``."""
    from ..errors import DataFormatError

    genes = meta.get("genes")
    scale = (meta.get("provenance") or {}).get("scale")
    if not genes or scale is None or meta.get("gene_scale") is None:
        raise DataFormatError(meta.get("path"), "checkpoint lacks genes / scale / gene_scale",
                              "a checkpoint written by the dock's Train section or `napari-diffst train`")
    mc = meta.get("model_config") or {}
    return {"genes": list(genes), "scale": int(scale), "gene_scale": np.asarray(meta["gene_scale"], float),
            "step": int(meta.get("step", 0)), "he_per_hr": mc.get("he_per_hr"), "path": meta.get("path")}


def field_for_checkpoint(sample, info: dict, mode: str = "auto"):
    """The SRField to super-resolve with a checkpoint (its genes, scale, gene_scale and H&E sampling).

    ``mode``: 'auto' (HR truth where the sample has it, else native), 'native' (observed spots as LR,
    HR = pitch / s), 'degrade' (benchmark: s×s blocks of spots as LR, the spots as HR truth), 'truth'.
    The H&E is sampled with the network's ``he_per_hr`` so the condition has the shape it was built for."""
    from .. import pipeline as P

    m = mode
    if m == "auto":
        m = "truth" if sample.hr_truth else "native"
    fields, _ = P.make_fields([sample], info["genes"], info["scale"], mode=m, gene_scale=info["gene_scale"],
                              he_per_hr=info.get("he_per_hr"))
    return fields[0], m


class Throttle:
    """True at most every ``interval_s`` (always True when ``force``)."""

    def __init__(self, interval_s: float):
        self.interval_s = float(interval_s)
        self._last = -1e18

    def __call__(self, force: bool = False) -> bool:
        now = time.perf_counter()
        if force or now - self._last >= self.interval_s:
            self._last = now
            return True
        return False


def preview_rgba(x0: np.ndarray, gene_scale: float, mask, lut: np.ndarray, max_px: int = 200) -> np.ndarray:
    """One gene's map (model units) → a small (h, w, 4) uint8 RGBA image for the live preview: nearest
    downsampling to at most ``max_px`` per side, log1p(CP10k) units (× ``gene_scale``), contrast 0…99.5th
    percentile, colours from ``lut`` ((256, 4) uint8), transparent outside ``mask``. Qt-free and cheap; the
    sampling worker calls it so the main thread only wraps the bytes in a pixmap."""
    a = np.asarray(x0, np.float32)
    m = None if mask is None else np.asarray(mask, bool)
    k = max(1, -(-max(a.shape) // int(max_px)))
    if k > 1:
        a = a[::k, ::k]
        m = None if m is None else m[::k, ::k]
    a = a * np.float32(gene_scale)
    inside = np.isfinite(a) if m is None else (m & np.isfinite(a))
    v = a[inside]
    hi = float(np.percentile(v, 99.5)) if v.size else 1.0
    if not hi > 1e-6:
        hi = max(float(v.max()) if v.size else 1.0, 1e-6)
    idx = np.clip(np.nan_to_num(a, nan=0.0) / hi * 255.0, 0, 255).astype(np.uint8)
    rgba = np.asarray(lut, np.uint8)[idx]
    rgba[..., 3] = np.where(inside, 255, 0).astype(np.uint8)
    return np.ascontiguousarray(rgba)


def colormap_lut(name: str) -> np.ndarray:
    """(256, 4) uint8 lookup table of a napari colormap (call on the main thread: napari's colormap registry
    is not meant for worker threads)."""
    from napari.utils.colormaps import ensure_colormap

    return np.ascontiguousarray((ensure_colormap(name).map(np.linspace(0, 1, 256)) * 255).round().astype(np.uint8))


def result_layer_data(res, sample=None) -> dict:
    """What the result layers show, computed off the main thread: ``maps`` / ``std_maps`` (G, H, W) in
    log1p(CP10k), NaN outside ``mask`` (:func:`masked_expression`; the tissue,
    :func:`~napari_diffst.data.grids.display_mask`, with ``sample``, else the field's HR mask), and their
    per-gene ``clims`` / ``std_clims`` (:func:`contrast_limits`)."""
    from ..data.grids import display_mask

    fld = res.field
    mask = display_mask(sample, fld) if sample is not None else np.asarray(fld.hr_mask, bool)
    mean = masked_expression(res.mean, fld.gene_scale, mask, fld.hr_mask)
    std = masked_expression(res.std, fld.gene_scale, mask, fld.hr_mask)
    return {"maps": mean, "std_maps": std, "mask": mask, "clims": [contrast_limits(a) for a in mean],
            "std_clims": [contrast_limits(a) for a in std]}


def sample_job(job: Job, checkpoint, sample, *, steps: int = 50, n_samples: int = 4, seed: int = 0,
               mode: str = "auto", device: str = "auto", preview_every_s: float = 0.25,
               preview_lut: np.ndarray | None = None, preview_px: int = 200,
               budget_mb: float | None = None) -> Iterator[dict]:
    """Load a checkpoint and super-resolve ``sample`` (:func:`pipeline.super_resolve_iter`), tiled
    automatically when the untiled rasters exceed the memory budget (:func:`tiling.plan_sampling`;
    ``budget_mb`` overrides it): then ``ready`` carries ``tiling`` (a one-line description) and the
    progress events ``desc`` (tiles and steps), without previews.

    Yields ``prepare`` → ``ready`` (``field``, ``info``, ``mode``, ``total``) → ``progress`` per reverse step
    (``done``, ``total``, ``sample``, ``i``, and ``x0_pred`` — the current denoised estimate, model units —
    at most every ``preview_every_s``; with ``preview_lut`` also ``preview``, the first gene's estimate as a
    small RGBA image, :func:`preview_rgba`, made here in the worker) → ``result`` (``result``: SRResult, and
    the layer data of :func:`result_layer_data`) or ``cancelled``/``error``."""

    def body():
        from ..device import resolve_device
        from ..method import DiffST
        from ..tiling import plan_sampling

        yield {"kind": "prepare", "message": f"loading {checkpoint}"}
        dev = resolve_device(device)
        method = DiffST.load(checkpoint, device=str(dev))  # network, prior, shrink: what the benchmark measured
        net = method.model_
        info = checkpoint_info(method.meta_)
        m0 = mode if mode != "auto" else ("truth" if sample.hr_truth else "native")
        he_per_hr = info.get("he_per_hr") or net.config.get("he_per_hr")
        plan = None
        if m0 != "degrade" and he_per_hr:  # degrade fields are spot-sized: never tiled
            plan = plan_sampling(sample, info["genes"], info["scale"], gene_scale=info["gene_scale"], mode=m0,
                                 he_per_hr=int(he_per_hr), n_samples=int(n_samples), budget_mb=budget_mb,
                                 in_memory=True)
        if plan is not None and plan.tiled:
            yield from _tiled_body(method, plan, info, dev)
            return
        m = mode if mode != "auto" else ("truth" if sample.hr_truth else "native")
        if method.needs_cell_features() and method.prior_ is not None:
            yield {"kind": "prepare", "message": f"cell-level H&E features of {sample.name} for the prior"}
        field = method.make_field(sample, m)
        n = int(steps)
        total = None
        yield {"kind": "ready", "field": field, "info": info, "mode": m, "device": str(dev),
               "tiling": plan.describe() if plan is not None else None}
        thr = Throttle(preview_every_s)
        for upd in method.iter_predict(field, sample=sample, steps=n, n_samples=int(n_samples), seed=int(seed)):
            if job.cancelled:
                yield {"kind": "cancelled", "message": f"sampling cancelled after {upd.get('done', 0)} steps"}
                return
            if "result" in upd:
                res = upd["result"]
                yield {"kind": "result", "result": res, "info": info, "mode": m, **result_layer_data(res, sample)}
                return
            if "stage" in upd:  # the self-check before sampling (method.DiffST.self_check)
                yield {"kind": "prepare", "message": upd.get("message", upd["stage"])}
                continue
            total = upd["total"]
            last = upd["done"] == total or upd["i"] == upd["n_steps"] - 1  # end of a sample
            out = {"kind": "progress", "done": upd["done"], "total": total, "sample": upd["sample"],
                   "i": upd["i"], "n_steps": upd["n_steps"]}
            if thr(force=last):
                out["x0_pred"] = upd["x0_pred"]
                if preview_lut is not None:
                    out["preview"] = preview_rgba(upd["x0_pred"][0], float(field.gene_scale[0]), field.hr_mask,
                                                  preview_lut, preview_px)
            yield out

    def _tiled_body(method, plan, info, dev):
        from ..pipeline import SRResult
        from ..tiling import super_resolve_tiled_iter

        src = plan.source()
        fld = plan.field
        fld.extra["tiled"] = {"tile": plan.tile, "overlap": plan.overlap, "auto": plan.auto}
        yield {"kind": "ready", "field": fld, "info": info, "mode": plan.mode, "device": str(dev),
               "tiling": plan.describe()}
        check = None
        if plan.mode == "native":  # as untiled: the self-check first, its β applied per tile
            yield {"kind": "prepare", "message": f"self-check on {sample.name}, one level coarser"}
            check = method.self_check(sample, steps=int(steps), n_samples=int(n_samples), seed=int(seed))
        res = None
        for upd in super_resolve_tiled_iter(method, src, tile=plan.tile, overlap=plan.overlap, steps=int(steps),
                                            n_samples=int(n_samples), seed=int(seed), device=dev,
                                            should_stop=lambda: job.cancelled, self_check=check):
            if job.cancelled:
                yield {"kind": "cancelled", "message": f"sampling cancelled after {upd.get('done', 0)} steps"}
                return
            if "result" in upd:
                res = upd["result"]
                break
            yield {"kind": "progress", "done": upd["done"], "total": upd["total"], "sample": 0,
                   "i": upd["i"], "n_steps": upd["n_steps"],
                   "desc": (f"napari-diffst: tiles {upd['tiles_done']}/{upd['n_tiles']}, "
                            f"step {upd['i'] + 1}/{upd['n_steps']}")}
        if res is None:
            yield {"kind": "cancelled", "message": "sampling cancelled"}
            return
        std = res.std if res.std is not None else np.zeros_like(res.mean)
        out = SRResult(res.mean, std, list(res.genes), res.hr_um, fld, res.steps, res.n_samples, report=res.report)
        yield {"kind": "result", "result": out, "info": info, "mode": plan.mode, **result_layer_data(out)}

    return _guard(job, "super-resolution", body())


def compare_job(job: Job, result, baselines, train_fields, *, budget: str = "quick", seed: int = 0
                ) -> Iterator[dict]:
    """Fit and run baselines on the SR result's field and score everything against its HR truth.

    Yields ``progress`` per baseline → ``result`` with ``preds`` (method → (G,H,W) model units; Diff-ST
    first) and ``scores`` (method → :func:`metrics.score_field` output; empty without truth)."""

    def body():
        from ..baselines import make_baseline
        from ..metrics import score_field

        fld = result.field
        preds = {"Diff-ST": np.asarray(result.mean, np.float32)}
        names = list(baselines)
        for i, name in enumerate(names):
            if job.cancelled:
                yield {"kind": "cancelled", "message": "comparison cancelled"}
                return
            yield {"kind": "progress", "done": i, "total": len(names), "message": f"baseline {name}"}
            b = make_baseline(name)
            tf = [f for f in (train_fields or []) if f.hr is not None]
            b.fit(tf, seed=seed, budget=budget)
            preds[name] = np.asarray(b.predict(fld), np.float32)
        scores = {}
        if fld.hr is not None:
            yield {"kind": "progress", "done": len(names), "total": len(names), "message": "scoring"}
            for m, p in preds.items():
                scores[m] = score_field(p, fld)
            scores["LR (nearest)"] = score_field(fld.lr_upsampled(0), fld)
        yield {"kind": "result", "preds": preds, "scores": scores, "field": fld}

    return _guard(job, "comparison", body())


def register_job(job: Job, sample, method: str, *, model: str = "similarity", landmarks=None) -> Iterator[dict]:
    """A registration (``'metadata'``, ``'landmarks'`` with ``landmarks=(image_xy, spot_xy)``, ``'refine'``)
    and the fraction of in-tissue spots on the tissue mask before/after. Yields ``result``
    (``result``: RegistrationResult with ``frac_on_tissue_before/after`` filled)."""

    def body():
        from ..data import registration as R

        yield {"kind": "prepare", "message": f"registration: {method}"}
        before = R.fraction_on_tissue(sample)
        if method == "metadata":
            res = R.from_metadata(sample)
        elif method == "landmarks":
            img_xy, spot_xy = landmarks
            res = R.fit_landmarks(img_xy, spot_xy, model=model, um_per_px=sample.um_per_px)
        elif method == "refine":
            res = R.refine_registration(sample, model=model)
        else:
            raise ValueError(f"unknown registration method {method!r}")
        if res.frac_on_tissue_before is None:
            res.frac_on_tissue_before = before
        if res.frac_on_tissue_after is None:
            res.frac_on_tissue_after = R.fraction_on_tissue(sample, transform=res.transform)
        yield {"kind": "result", "result": res}

    return _guard(job, "registration", body())


def start_worker(gen, on_yield, on_finish=None, *, desc: str | None = None, start: bool = True):
    """Run a job generator in a napari ``GeneratorWorker``; ``on_yield(dict)`` runs on the main thread.
    ``start=False``: the caller calls ``worker.start()``."""
    from napari.qt.threading import create_worker

    def run():
        yield from gen

    run.__name__ = run.__qualname__ = desc or "napari-diffst job"
    worker = create_worker(run, _start_thread=False)
    worker.yielded.connect(on_yield)
    if on_finish is not None:
        worker.finished.connect(on_finish)
    if start:
        worker.start()
    return worker


# --------------------------------------------------------------------------------------------- layers
def raster_layer_kwargs(fld, which: str = "hr") -> dict:
    """napari ``scale``/``translate``/``rotate``/``shear`` placing a raster of ``fld`` ('hr' or 'lr') in µm
    (the decomposition of :func:`napari_diffst.data.grids.field_napari_affine`). Unlike a raw ``affine``,
    ``scale``/``translate`` carry the pixel size and origin, which the npe2 writers read."""
    from napari.utils.transforms.transform_utils import decompose_linear_matrix

    from ..data.grids import field_napari_affine

    B = field_napari_affine(fld, which)
    rotate, scale, shear = decompose_linear_matrix(B[:2, :2], upper_triangular=True)
    return {"scale": tuple(float(s) for s in scale), "translate": tuple(float(t) for t in B[:2, 2]),
            "rotate": np.asarray(rotate, float), "shear": np.asarray(shear, float)}


def masked_expression(maps: np.ndarray, gene_scale, mask: np.ndarray | None,
                      hr_mask: np.ndarray | None = None) -> np.ndarray:
    """Model units → log1p(CP10k) (× gene_scale), NaN outside ``mask`` (napari draws NaN transparent); with
    ``hr_mask``, the rim of ``mask`` past it takes the nearest predicted value
    (:func:`napari_diffst.data.grids.shown_maps`)."""
    a = np.asarray(maps, np.float32) * np.asarray(gene_scale, np.float32).reshape(-1, 1, 1)
    if mask is not None:
        if hr_mask is not None:
            from ..data.grids import shown_maps

            return shown_maps(a, hr_mask, mask)
        a = np.where(np.asarray(mask, bool)[None], a, np.nan).astype(np.float32)
    return a


def contrast_limits(a: np.ndarray, q: float = 99.5) -> tuple[float, float]:
    """(0, q-th percentile of the finite values) — expression units start at 0 (no counts)."""
    v = np.asarray(a, float)
    v = v[np.isfinite(v)]
    hi = float(np.percentile(v, q)) if v.size else 1.0
    return (0.0, hi if hi > 1e-6 else max(float(v.max()) if v.size else 1.0, 1e-6))


def grid_shape(n: int, canvas_hw, map_hw) -> tuple[int, int]:
    """(rows, cols) for ``n`` equal maps of shape ``map_hw`` (world units) on a canvas ``canvas_hw`` (px)
    that makes the maps largest (ties: fewer rows)."""
    ch, cw = (float(v) for v in canvas_hw)
    mh, mw = (max(float(v), 1e-9) for v in map_hw)
    best, shape = -1.0, (1, max(1, n))
    for cols in range(1, max(1, n) + 1):
        rows = -(-n // cols)
        z = min(cw / (cols * mw), ch / (rows * mh))
        if z > best * (1 + 1e-9):
            best, shape = z, (rows, cols)
    return shape


def format_eta(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "–"
    s = int(round(seconds))
    h, r = divmod(s, 3600)
    m, s = divmod(r, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def metrics_rows(scores: dict) -> list[list]:
    """Rows ``[method, PCC, RMSE, SSIM, detail-PCC]`` (gene means) for the metrics table."""
    return [[m] + [float(sc.get(k, float("nan"))) for k, _ in METRIC_COLUMNS] for m, sc in scores.items()]


def metrics_csv(scores: dict) -> str:
    """CSV text: one row per method and gene plus one 'mean' row per method."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "gene"] + [k for k, _ in METRIC_COLUMNS])
    for m, sc in scores.items():
        per = sc.get("per_gene", {})
        for i, g in enumerate(per.get("gene", [])):
            w.writerow([m, g] + [f"{float(per[k][i]):.6g}" for k, _ in METRIC_COLUMNS])
        w.writerow([m, "mean"] + [f"{float(sc.get(k, float('nan'))):.6g}" for k, _ in METRIC_COLUMNS])
    return buf.getvalue()


@dataclass
class LayerPlan:
    """One layer to add: data, kwargs (napari ``add_image``), applied on the main thread later."""

    data: np.ndarray
    kwargs: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- main thread
class JobRunner:
    """Main-thread side of one job: the napari worker, a progress bar and one UI timer.

    ``on_event(dict)`` runs on the main thread for every yielded dict; ``on_done()`` once at the end.
    :meth:`shutdown` (used when the viewer closes during a run) cancels, waits until the generator has
    ended — the trainer writes its checkpoint on cancel — and quits the worker.

    Responsiveness: every widget change makes Qt repaint and flush the viewer window, and with a GL canvas in
    the window (software GL in particular) one flush costs 15–60 ms however small the change. So the
    sections only *store* what the events say, and the runner's timer (``interval_ms``, 4×/s) applies it:
    the progress bar and then ``on_tick()`` (the section's labels, plot, preview), all in one event-loop
    turn — one window update per tick. ``on_tick`` runs once more when the worker has finished, before
    ``on_done``.

    ``bar``: a ``QProgressBar`` in the dock that shows the progress. Without one, the run gets a progress
    bar in napari's activity panel (``napari.utils.progress``); note that its animated "in progress"
    indicator repaints the window ~30×/s for the whole run, and creating it processes events and relays
    the whole window out."""

    def __init__(self, viewer, job: Job, gen, on_event, *, desc: str, total: int | None = None, on_done=None,
                 close_timeout_s: float = 60.0, bar=None, on_tick=None, interval_ms: int = 250,
                 start_delay_ms: int = 40):
        from qtpy.QtCore import QTimer

        self.viewer = viewer
        self.job = job
        self.desc = desc
        self.on_event = on_event
        self.on_done = on_done
        self.on_tick = on_tick
        self.close_timeout_s = float(close_timeout_s)
        self.closed = False
        self.finished = False
        self.status = desc
        self.bar = bar
        self.pbar = None
        if bar is None:
            from napari.utils import progress

            self.pbar = progress(total=total or 0, desc=desc)
        else:
            from ._common import set_bar

            set_bar(bar, 0, total or 1, _short(desc))
        self._n = 0
        self._pending = (0, total, None)
        self._shown = (0, total, desc)
        self._in_tick = False
        self._timer = QTimer()
        self._timer.setInterval(int(interval_ms))
        self._timer.timeout.connect(self._tick)
        self._timer.start()
        # The worker starts a moment after the click: the click's repaint (buttons disabled, status text)
        # is done first, instead of competing for the CPU and the GIL with the job's start-up (imports,
        # reading data, building the network), which is the busiest stretch of a run.
        self.started = False
        self.worker = start_worker(gen, self._on_yield, self._on_finished, desc=desc, start=False)
        if start_delay_ms > 0:
            QTimer.singleShot(int(start_delay_ms), self._start)
        else:
            self._start()

    def _start(self) -> None:
        if self.started or self.closed:
            return
        self.started = True
        self.worker.start()

    # -- progress ---------------------------------------------------------------------------
    def set_progress(self, n: int, total: int | None = None, desc: str | None = None) -> None:
        """Record progress; the bar is updated by the runner's timer (at most every ``interval_ms``; napari's
        activity-panel bar also calls ``QApplication.processEvents()`` on every change, which must not
        happen inside our event handlers or once per step)."""
        if self.closed or self.finished:
            return
        old_n, old_total, old_desc = self._pending
        self._pending = (int(n), old_total if total is None else int(total), desc or old_desc)
        if desc:
            self.status = desc

    def _apply_progress(self) -> None:
        if self.closed or self._pending == self._shown:
            return
        n, total, desc = self._pending
        self._shown = self._pending
        try:
            if self.bar is not None:
                from ._common import set_bar

                set_bar(self.bar, n, total, _short(desc) if desc else None)
                return
            if total is not None and int(total) != self.pbar.total:
                self.pbar.total = int(total)
            if n > self._n:
                self.pbar.update(n - self._n)
                self._n = n
            if desc:
                self.pbar.set_description(desc)
        except Exception:  # the progress display is cosmetic; never break a run for it
            pass

    def _tick(self) -> None:
        if self._in_tick or self.closed:
            return
        self._in_tick = True
        try:
            self._apply_progress()
            if self.on_tick is not None:
                self.on_tick()
        finally:
            self._in_tick = False

    # -- signals ----------------------------------------------------------------------------
    def _on_yield(self, d) -> None:
        if self.closed:
            return
        self.on_event(d)

    def _on_finished(self) -> None:
        if self.finished:
            return
        self._timer.stop()
        try:
            if not self.closed:
                self._tick()  # the last state, before 'finished' (sections read it in on_done)
        except Exception:  # noqa: BLE001 - a failed widget update must not leave the dock busy
            import traceback

            traceback.print_exc()
        self.finished = True
        if self.pbar is not None:
            try:
                self.pbar.close()
            except Exception:  # pragma: no cover
                pass
        if not self.closed and self.on_done is not None:
            self.on_done()

    # -- control ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return not self.finished and not self.job.done.is_set()

    def cancel(self) -> None:
        """Ask the job to stop (within one step); the generator ends by itself after its last event."""
        self.job.cancel()

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """The viewer is closing: cancel, wait until the generator has ended (the trainer writes its
        checkpoint on cancel), then quit the worker. Returns True when the job ended in time."""
        if self.closed:
            return True
        self.closed = True
        self.job.cancel()
        if not self.started:  # closed before the worker started: nothing ran
            self._timer.stop()
            self.job.done.set()
            self.finished = True
            return True
        ok = self.job.wait(self.close_timeout_s if timeout_s is None else timeout_s)
        self._timer.stop()
        try:
            self.worker.quit()
        except Exception:  # pragma: no cover
            pass
        if self.pbar is not None:
            try:
                self.pbar.close()
            except Exception:  # pragma: no cover
                pass
        return ok


def _short(desc: str) -> str:
    """Progress-bar text in the dock: the description without the plugin prefix."""
    d = str(desc or "")
    return d.split(": ", 1)[1] if d.startswith("napari-diffst: ") else d
