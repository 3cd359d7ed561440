"""``napari-diffst benchmark``: every method trained on the same sections and scored on every test section.

    napari-diffst benchmark --train DIR [DIR ...] --val DIR --test DIR [DIR ...] --scale 2 --n-genes 25 \\
        --methods all --budget quick --seed 0 --out results.json [--save-maps DIR] [--markdown FILE]
    napari-diffst benchmark --synthetic --budget quick --out synthetic.json      # 5× and 10×, HR truth

Protocol (see docs/benchmark.md)
--------------------------------
* ``DIR`` is anything :func:`napari_diffst.pipeline.load_data` opens (legacy-ST section folder, Space
  Ranger ``outs``, ``.h5ad``, ``synthetic:SEED``).  A bare name that does not exist is looked up beside the
  first ``--train`` path (``--train ../shared/data/her2st/C2 C3 C4 --val C5 --test C6``).
* Genes are chosen on the **training sections only**: among genes present in every section (train, val
  and test) and detected (count > 0) in ≥ 50 % of the pooled in-tissue training spots, the ``n`` with the
  largest variance of log1p(CP10k) over those spots (:func:`select_genes_variance`).  Sections with HR
  truth only (synthetic) use their truth genes (:func:`napari_diffst.pipeline.choose_genes`).
* Without HR truth the data-pipeline degradation is used (``make_field(mode='degrade')``): LR = sums of
  ``s × s`` blocks of lattice spots, HR truth = the spots.  With HR truth (synthetic) the truth maps are
  scored at any scale (``mode='truth'``).  ``gene_scale`` (model units) comes from the training sections.
* Every method is fitted once (``fit(train_fields, val_field, seed, budget)``) and predicts every test
  section; scores come from :func:`napari_diffst.metrics.score_field` (gene means of PCC, RMSE and SSIM
  on truth-min–max maps, detail-PCC).  ``ceiling_pcc`` is the section's split-half noise ceiling
  (``split_half_ceiling``: sqrt of the Spearman–Brown-stepped split-half r); ``null`` for noise-free
  synthetic truth.
* ``seconds``: wall time of the method's ``fit`` plus its ``predict`` on that section.
  ``peak_mb``: peak resident-set-size increase of this process during ``fit`` + that ``predict``
  (MiB above the RSS just before ``fit``, after ``gc.collect()`` and, on glibc, ``malloc_trim(0)`` so
  memory freed by earlier methods is returned to the OS first), sampled every 50 ms from
  ``/proc/self/status`` (VmRSS) by a background thread (psutil elsewhere; where neither exists,
  the increase of ``ru_maxrss``).  It is the *extra* memory a method needed, not the process footprint;
  freed memory the allocator keeps and reuses can still make it an underestimate.  With a CUDA device
  the diffusion methods also report ``gpu_peak_mb`` (``torch.cuda.max_memory_allocated``).

JSON (:func:`validate_result` checks it)::

    {"genes": [...], "scale": 2, "budget": "quick", "device": "cpu", "synthetic": false, "seed": 0,
     "meta": {...}, "sections": {"C6": {"n_spots": 178, "ceiling_pcc": 0.85,
        "methods": {"diffst": {"pcc", "rmse", "ssim", "detail_pcc", "seconds", "peak_mb", "trained_steps"},
                    ...}}}}

``trained_steps``: the optimiser steps the method's ``fit`` ran.  Budgets are step counts (no wall-clock
cap anywhere), so with a seed the same machine gives the same scores at any load.

``--synthetic`` writes ``{"synthetic": true, "budget", "device", "seed", "scales": [5, 10], "meta",
"runs": {"5": <the document above for 5×>, "10": ...}}``; every printed table is headed "SYNTHETIC".
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import DataFormatError, DiffSTError

__all__ = ["DIFFUSION_BUDGETS", "METHOD_NAMES", "METRICS", "Method", "DiffusionMethod", "make_method",
           "select_genes_variance", "score_row", "parse_methods", "run_benchmark", "run_synthetic",
           "validate_result", "format_table",
           "format_markdown", "PeakRSS", "add_commands", "cmd_benchmark", "parse_diffst_set"]

#: Knobs of the two diffusion methods per budget: they live with the method object
#: (:data:`napari_diffst.method.DIFFUSION_BUDGETS`, re-exported here).
from .method import DIFFUSION_BUDGETS, DiffST  # noqa: E402

#: ``prior``: the map the denoiser's condition and residual start from — ``'cubic'`` (edge-aware cubic LR↑;
#: ``tiny``), ``'histosge'`` (the HisToSGE-style regressor's prediction) or ``'cell'`` (``quick``/``full``: the
#: ridge map from cell-level H&E features, :class:`napari_diffst.prior.CellRidgePrior`; the plain conditional
#: diffusion, which has no cell level, uses ``'histosge'`` instead).  Regression priors are cross-fitted (leave
#: one training section out) on the training sections and fitted on all of them for the validation/test sections.
#: ``shrink``: scale the detail the diffusion adds to that base by the least-squares factor α ∈ [0, 1] fitted
#: on the validation field (as ``histosge`` does for its residual).

#: Method names in table order; ``--methods all`` runs them all.
METHOD_NAMES: tuple[str, ...] = ("diffst", "bicubic", "nearest", "tesla", "istar", "unet", "cond_diffusion",
                                 "histosge")
#: Ablations that ``all`` leaves out: ``histosge_cell`` is the ``histosge`` regressor given Diff-ST's cell-level
#: features too (how much of Diff-ST's cell-level prior a supervised regressor reaches).
EXTRA_METHODS: tuple[str, ...] = ("histosge_cell",)
#: Per-method metric keys in the JSON (in order).
METRICS: tuple[str, ...] = ("pcc", "rmse", "ssim", "detail_pcc", "seconds", "peak_mb")
_OPTIONAL_METHOD_KEYS = ("gpu_peak_mb", "trained_steps")
#: the diffusion rows' self-check a level further down (an object) and their scores without it (an object)
_CHECK_KEYS = ("self_check", "unchecked")
_RUN_KEYS = ("genes", "scale", "budget", "device", "sections")
_RUN_OPTIONAL = ("synthetic", "seed", "meta")
_SYNTH_KEYS = ("synthetic", "budget", "device", "scales", "runs")
_SYNTH_OPTIONAL = ("seed", "meta")
_SECTION_KEYS = ("n_spots", "ceiling_pcc", "methods")
BUDGETS = ("tiny", "quick", "full")


# ----------------------------------------------------------------------------------------------- methods
@runtime_checkable
class Method(Protocol):
    """What the benchmark runs: fit once on the training fields, then predict any field.

    ``predict`` returns (G, H, W) float32 in the field's model units (log1p(CP10k) / gene_scale) on its HR
    grid; the baselines of :mod:`napari_diffst.baselines` satisfy this protocol."""

    name: str

    def fit(self, train_fields, val_field=None, seed: int = 0, budget="quick"): ...

    def predict(self, field) -> np.ndarray: ...


class DiffusionMethod(DiffST):
    """The benchmark's view of :class:`napari_diffst.method.DiffST` (the one method object the dock and the CLI
    run too): Diff-ST (``ablate_all=False``) or the plain conditional diffusion ablation (``ablate_all=True``:
    ``use_cam = use_cigc = use_hier = False`` — no cross-modal modulation (Diff-ST Eq. 3–4), no co-expression
    graph (Eq. 5–6), no hierarchical cell-level histology) as a :class:`Method`: ``fit(train, val, seed,
    budget)`` sets the seed and budget and runs :meth:`DiffST.fit`; ``predict(field)`` is
    :meth:`DiffST.predict_map` (the shrunk, masked mean in model units, no projection on truth/degrade fields).
    Knobs come from :data:`DIFFUSION_BUDGETS` for the ``budget`` given to ``fit`` (a dict budget overrides
    entries of 'quick'); keyword ``knobs`` override both — ``model_overrides`` and ``train_overrides`` are
    merged key by key into the budget's (so ``model_overrides={'use_align': True}`` keeps the budget's
    ``distill``).  The validation field only fits the shrink α (no early stopping)."""

    def __init__(self, ablate_all: bool = False, device: str = "auto", verbose: bool = False, **knobs):
        super().__init__(budget="quick", seed=0, device=device, ablate="all" if ablate_all else (),
                         verbose=verbose, **knobs)

    def fit(self, train_fields, val_field=None, seed: int = 0, budget="quick", **kw):
        self.seed, self.budget = int(seed), budget
        self.seed_ = self.seed
        return super().fit(train_fields, val_field, **kw)

    def predict(self, field, sample=None) -> np.ndarray:
        return self.predict_map(field, sample=sample)

    def __repr__(self):
        return f"DiffusionMethod(ablate_all={self.ablate_all}, knobs={self.knobs})"


def make_method(name: str, device: str = "auto", verbose: bool = False, **kwargs) -> Method:
    """A fresh :class:`Method` by name (:data:`METHOD_NAMES`)."""
    from .baselines import BASELINES, make_baseline

    if name == "diffst":
        return DiffusionMethod(False, device=device, verbose=verbose, **kwargs)
    if name == "cond_diffusion":
        return DiffusionMethod(True, device=device, verbose=verbose, **kwargs)
    if name == "histosge_cell":
        return make_baseline("histosge", cell_features=True, **kwargs)
    if name in BASELINES:
        return make_baseline(name, **kwargs)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES + EXTRA_METHODS)} or 'all'")


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """``'all'`` or a comma list → method names (checked, order kept, duplicates dropped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip().lower() for s in items if s and s.strip()]
    if not items:
        raise DiffSTError("--methods is empty; use 'all' or a comma list such as nearest,bicubic")
    out: list[str] = []
    for it in items:
        names = list(METHOD_NAMES) if it == "all" else [it]
        for n in names:
            if n not in METHOD_NAMES + EXTRA_METHODS:
                raise DiffSTError(f"unknown method {n!r}; choose from {', '.join(METHOD_NAMES + EXTRA_METHODS)} "
                                  "or 'all'")
            if n not in out:
                out.append(n)
    return out


# ------------------------------------------------------------------------------------------ memory / time
def _rss_mb_proc() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _rss_mb() -> tuple[float, str]:
    v = _rss_mb_proc()
    if v is not None:
        return v, "VmRSS"
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2 ** 20, "psutil"
    except Exception:  # noqa: BLE001
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (r / 2 ** 20 if sys.platform == "darwin" else r / 1024.0), "ru_maxrss"


def _release_free_memory() -> None:
    """``gc.collect()`` and, on glibc, ``malloc_trim(0)`` so memory freed by earlier methods goes back to the
    OS and does not hide the next method's allocations from the RSS."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # pragma: no cover - non-glibc
            pass


class PeakRSS:
    """Context manager sampling this process's RSS every ``interval`` s in a background thread.

    ``start_mb`` (after ``gc.collect()`` and glibc ``malloc_trim``), ``peak_mb`` (max seen, including at enter/exit), ``source``.
    Re-entering continues the same peak (so fit and predict can be measured as one span)."""

    def __init__(self, interval: float = 0.05):
        self.interval = float(interval)
        self.start_mb: float | None = None
        self.peak_mb = 0.0
        self.source = ""
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        v, src = _rss_mb()
        self.source = src
        if v > self.peak_mb:
            self.peak_mb = v

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        if self.start_mb is None:
            _release_free_memory()
            self.start_mb, self.source = _rss_mb()
            self.peak_mb = self.start_mb
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="PeakRSS", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return False

    @property
    def increase_mb(self) -> float:
        return max(0.0, self.peak_mb - (self.start_mb or 0.0))


# ------------------------------------------------------------------------------------------ gene panel
def select_genes_variance(train, n: int = 25, apply_to: Sequence = (), min_frac_detected: float = 0.5) -> list[str]:
    """The benchmark's panel: the ``n`` genes with the largest variance of log1p(CP10k) over the pooled
    in-tissue training spots, among genes present in every section and detected in ≥ ``min_frac_detected``
    of those spots (``select_genes(method='variance')``; the Seurat dispersion flavour favours noisy
    low-count genes on legacy ST)."""
    from .data.genes import select_genes

    return select_genes(list(train), method="variance", n=n, min_frac_detected=min_frac_detected,
                        apply_to=list(apply_to))


def _resolve_spec(spec: str, base: Path | None) -> str:
    s = str(spec)
    if s.startswith("synthetic") or Path(s).exists() or base is None:
        return s
    alt = base / s
    return str(alt) if alt.exists() else s


def _finite(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _unique_names(samples) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in samples:
        n = str(s.name)
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        else:
            seen[n] = 0
        out.append(n)
    return out


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _device_type(device: str) -> tuple[str, str]:
    from .device import device_label, resolve_device

    dev = resolve_device(device)
    return dev.type, device_label(dev)


from .runinfo import loadavg as _loadavg, machine_info as _machine  # noqa: E402  (one home: runinfo)


def _save_maps(path: Path, field, preds: dict, genes, scale: int, synthetic: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    he = np.clip(np.asarray(field.he, np.float32), 0, 1)
    k = int(field.he_per_hr)
    step = max(1, k // 4)  # H&E kept at ≥ 4 px per HR pixel, as uint8
    arrs = {"genes": np.asarray(genes, dtype=str), "methods": np.asarray(list(preds), dtype=str),
            "truth": np.asarray(field.hr, np.float32), "lr": np.asarray(field.lr, np.float32),
            "hr_mask": np.asarray(field.hr_mask, bool), "lr_mask": np.asarray(field.lr_mask, bool),
            "gene_scale": np.asarray(field.gene_scale, np.float32), "scale": np.int64(scale),
            "hr_um": np.float64(field.hr_um), "section": np.asarray(field.name, dtype=str),
            "synthetic": np.bool_(synthetic), "he": (he[:, ::step, ::step] * 255 + 0.5).astype(np.uint8),
            "he_per_hr": np.int64(-(-k // step))}
    for m, p in preds.items():
        arrs[f"pred_{m}"] = np.asarray(p, np.float32)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrs)
    os.replace(tmp, path)


def score_row(pred: np.ndarray, field, seed: int = 0) -> tuple[dict, float | None]:
    """``({'pcc', 'rmse', 'ssim', 'detail_pcc'}, ceiling_pcc)`` of a (G, H, W) prediction in model units,
    gene means from :func:`napari_diffst.metrics.score_field` (NaN → None, so the JSON stays valid).
    Non-finite predicted values are replaced by 0 first."""
    from .metrics import score_field

    sc = score_field(np.nan_to_num(np.asarray(pred, np.float32)), field, seed=seed)
    return ({k: _finite(sc.get(k)) for k in ("pcc", "rmse", "ssim", "detail_pcc")},
            _finite(sc.get("split_half_ceiling")))


def run_benchmark(train: Sequence, val, test: Sequence, *, scale: int = 2, n_genes: int = 25,
                  genes: Sequence[str] | None = None, methods: str | Sequence[str] = "all", budget="quick",
                  seed: int = 0, device: str = "auto", save_maps: str | Path | None = None,
                  method_kwargs: dict | None = None, quiet: bool = False, _loaded: dict | None = None,
                  self_check: bool = True) -> dict:
    """Fit every method on ``train`` (+ ``val``) and score it on every ``test`` section; returns the JSON dict.

    ``train``/``val``/``test`` are paths / specs for :func:`~napari_diffst.pipeline.load_data` or loaded
    :class:`~napari_diffst.data.sample.Sample` objects.  ``method_kwargs`` maps a method name to keyword
    arguments of :func:`make_method` (e.g. ``{'diffst': {'steps': 50}}``).  ``save_maps``: folder that gets
    ``<section>.npz`` (truth, LR, masks, H&E, genes and ``pred_<method>`` maps in model units).
    ``self_check``: the diffusion rows run :meth:`DiffST.self_check` on each test section a level further down
    (``scale``×``scale`` blocks of its LR blocks → its LR blocks; no test truth) and keep per gene only the detail
    that helped there, as a user's prediction does; the row records the check and the ``unchecked`` scores."""
    from . import pipeline as P

    t_start = time.perf_counter()
    load_start = _loadavg()
    train, test = list(train), list(test)
    names = parse_methods(methods)
    if budget not in BUDGETS and not isinstance(budget, dict):
        raise DiffSTError(f"unknown budget {budget!r}; use one of {', '.join(BUDGETS)}")
    scale = int(scale)
    if not 2 <= scale <= 16:
        raise DiffSTError(f"scale must be an integer between 2 and 16, not {scale}")
    dev_type, dev_label = _device_type(device)
    if not train:
        raise DiffSTError("benchmark needs at least one --train section")
    if not test:
        raise DiffSTError("benchmark needs at least one --test section")

    def load(spec):
        if hasattr(spec, "adata"):
            return spec
        if _loaded is not None and str(spec) in _loaded:
            return _loaded[str(spec)]
        smp = P.load_data(spec, seed=seed)
        if _loaded is not None:
            _loaded[str(spec)] = smp
        return smp

    base = None
    t0 = train[0]
    if not hasattr(t0, "adata") and not str(t0).startswith("synthetic"):
        base = Path(str(t0)).parent
    specs = [_resolve_spec(s, base) if not hasattr(s, "adata") else s for s in train + [val] + test]
    tl = time.perf_counter()
    samples = [load(s) for s in specs]
    n_tr = len(train)
    tr_s, va_s, te_s = samples[:n_tr], samples[n_tr], samples[n_tr + 1:]
    for s in samples:
        _log(f"data: {s.summary()}", quiet)
    synthetic = any((s.provenance or {}).get("technology") == "synthetic" for s in samples)
    load_s = time.perf_counter() - tl

    # genes: chosen on the training sections only, present everywhere
    others = [va_s] + list(te_s)
    if genes:
        panel = P.choose_genes(tr_s, genes=list(genes), apply_to=others)
    elif all(s.hr_truth for s in samples):
        panel = P.choose_genes(tr_s, n_genes=n_genes)
    else:
        panel = select_genes_variance(tr_s, n_genes, apply_to=others)
    _log(f"genes ({len(panel)}, chosen on {', '.join(s.name for s in tr_s)}): {', '.join(panel)}", quiet)

    tf = time.perf_counter()
    train_f, gene_scale = P.make_fields(tr_s, panel, scale)
    (val_f,), _ = P.make_fields([va_s], panel, scale, gene_scale=gene_scale)
    test_f, _ = P.make_fields(te_s, panel, scale, gene_scale=gene_scale)
    fields_s = time.perf_counter() - tf
    test_names = _unique_names(te_s)
    for f in train_f + [val_f] + test_f:
        if f.hr is None:  # pragma: no cover - make_fields gives truth or degrade
            raise DataFormatError(None, f"section {f.name} has no HR truth", "degrade or truth fields")

    sections: dict = {}
    for nm, f in zip(test_names, test_f):
        sections[nm] = {"n_spots": int(len(f.extra.get("spot_obs_index", ()))) or int(f.hr_counts.shape[0]),
                        "ceiling_pcc": None, "methods": {}}
    preds_by_section: dict = {nm: {} for nm in test_names}
    mkw = dict(method_kwargs or {})
    method_knobs: dict = {}
    import torch

    cell_s: dict | None = None  # seconds spent on cell-level features: {'fit': train + val, <section>: test}

    def cell_features() -> dict:
        """Cell-level H&E features for every field (once; for methods whose prior needs them)."""
        from .data.cellfeatures import add_cell_features

        t = {}
        tc = time.perf_counter()
        # the windows Diff-ST fixes from the training geometry (DiffST.feature_windows), for every method
        win = DiffST.feature_windows(train_f[0], tr_s[0])
        add_cell_features(train_f[0], tr_s[0], windows_um=win)
        mod = train_f[0].extra["cell_modality"]  # the training image's kind for all (a black background is no DAPI)
        for f, smp in zip(train_f + [val_f], tr_s + [va_s]):
            add_cell_features(f, smp, windows_um=win, modality=mod)
        t["fit"] = time.perf_counter() - tc
        for nm, f, smp in zip(test_names, test_f, te_s):
            tc = time.perf_counter()
            add_cell_features(f, smp, windows_um=win, modality=mod)
            t[nm] = time.perf_counter() - tc
        _log(f"cell-level features: {sum(t.values()):.1f} s for {len(t) + len(train_f)} section(s)", quiet)
        return t

    for name in names:
        bud_s = budget if isinstance(budget, str) else "custom"
        _log(f"[{name}] fitting on {len(train_f)} section(s) (budget {bud_s})", quiet)
        kw = dict(mkw.get(name, {}))
        if name in ("diffst", "cond_diffusion"):
            kw.setdefault("device", device)
            kw.setdefault("verbose", not quiet)
        method = make_method(name, **kw)
        uses_cells = bool(getattr(method, "needs_cell_features", lambda b: False)(budget))
        if uses_cells and cell_s is None:
            cell_s = cell_features()
        torch.manual_seed(seed)
        cuda = dev_type == "cuda" and name in ("diffst", "cond_diffusion")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        mem = PeakRSS()
        t1 = time.perf_counter()
        with mem:
            method.fit(train_f, val_f, seed=seed, budget=budget)
        fit_s = time.perf_counter() - t1 + (cell_s["fit"] if uses_cells else 0.0)
        fit_peak = mem.peak_mb
        if isinstance(method, DiffusionMethod):  # the options used and how far training got (time caps)
            method_knobs[name] = dict(json.loads(json.dumps(method.knobs_, default=str)),
                                      trained_steps=int(getattr(method.trainer, "step", 0)),
                                      shrink_alpha=round(float(getattr(method, "alpha_", 1.0)), 4))
        for nm, f, smp in zip(test_names, test_f, te_s):
            mem.peak_mb = fit_peak  # this section's span = fit + its own predict
            t2 = time.perf_counter()
            check, unchecked = None, None
            with mem:
                pred = np.asarray(method.predict(f), np.float32)
                if isinstance(method, DiffusionMethod) and self_check:
                    # as a user's prediction: the section's own LR one level further down decides, per gene, how
                    # much of the histology's detail to keep (no test truth is used)
                    check = method.self_check(smp, bin_lattice=scale)
                    if check.get("beta") is not None:
                        unchecked = pred
                        pred = np.asarray(method.apply_check(pred, None, f, check)[0] * f.hr_mask[None],
                                          np.float32)
            pred_s = time.perf_counter() - t2
            row, ceiling = score_row(pred, f, seed=seed)
            extra_row = {}
            if check is not None:
                extra_row["self_check"] = {k: check.get(k) for k in ("level", "pcc", "detail_pcc", "beta", "base",
                                                                    "fallback", "warning", "skipped") if k in check}
                if unchecked is not None:
                    un, _ = score_row(unchecked, f, seed=seed)
                    extra_row["unchecked"] = {k: un[k] for k in ("pcc", "detail_pcc", "rmse", "ssim") if k in un}
            if uses_cells:
                pred_s += cell_s.get(nm, 0.0)
            if isinstance(method, DiffusionMethod) and getattr(method, "prior_", None) is not None:  # the prior alone, for reference
                pr, _ = score_row(method.predict_prior(f), f, seed=seed)
                method_knobs[name].setdefault("prior_scores", {})[nm] = dict(pr)
            row["seconds"] = round(fit_s + pred_s, 3)
            row["peak_mb"] = round(mem.increase_mb, 1)
            row["trained_steps"] = trained_steps(method)
            row.update(extra_row)
            if cuda:
                row["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
            sections[nm]["methods"][name] = row
            if sections[nm]["ceiling_pcc"] is None:
                sections[nm]["ceiling_pcc"] = ceiling
            if save_maps:
                preds_by_section[nm][name] = pred
            _log(f"[{name}] {nm}: pcc {_fmt(row['pcc'])} detail {_fmt(row['detail_pcc'])} "
                 f"({row['seconds']:.1f} s, +{row['peak_mb']:.0f} MiB)", quiet)
        del method
        gc.collect()

    if save_maps:
        for nm, f in zip(test_names, test_f):
            _save_maps(Path(save_maps) / f"{nm}.npz", f, preds_by_section[nm], panel, scale, synthetic)
    mem_src = _rss_mb()[1]
    out = {
        "genes": list(panel), "scale": scale, "budget": budget if isinstance(budget, str) else "custom",
        "device": dev_type, "synthetic": bool(synthetic), "seed": int(seed), "sections": sections,
        "meta": {
            "train": [s.name for s in tr_s], "val": va_s.name, "test": list(test_names),
            "data": [str(s) if not hasattr(s, "adata") else s.name for s in specs],
            "mode": {f.name: f.extra.get("mode") for f in train_f + [val_f] + test_f},
            "methods": names,
            "gene_selection": ("names" if genes else "truth genes" if all(s.hr_truth for s in samples)
                               else "variance of log1p(CP10k), detected in >= 50% of training spots"),
            "gene_scale": [float(x) for x in gene_scale],
            "peak_mb_source": mem_src, "diffusion_knobs": _jsonable_knobs(budget, names),
            "method_knobs": method_knobs,
            "load_seconds": round(load_s, 2), "fields_seconds": round(fields_s, 2),
            "total_seconds": round(time.perf_counter() - t_start, 2), "machine": _machine(dev_label, load_start),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    return out


def trained_steps(method) -> int:
    """Optimiser steps ``method``'s ``fit`` ran (0 for methods with nothing to train): the budget is a step
    count, so this equals the budget's steps for every learned method, whatever the machine load."""
    if getattr(method, "trainer", None) is not None:
        return int(getattr(method.trainer, "step", 0))
    return int(getattr(method, "trained_steps_", 0) or 0)


def _jsonable_knobs(budget, names) -> dict | None:
    if not any(n in ("diffst", "cond_diffusion") for n in names):
        return None
    try:
        return json.loads(json.dumps(DiffusionMethod().resolved_knobs(budget)))
    except (TypeError, ValueError):  # pragma: no cover
        return None


def run_synthetic(*, scales: Sequence[int] = (5, 10), train=("synthetic:1", "synthetic:2"), val="synthetic:3",
                  test=("synthetic:0",), n_genes: int = 25, synthetic_kw: dict | None = None, quiet: bool = False,
                  **kw) -> dict:
    """The benchmark on seeded synthetic sections with HR truth at each scale (default 5× and 10×, the
    Diff-ST paper's scales).  ``synthetic_kw`` goes to :func:`~napari_diffst.data.synthetic.make_synthetic`
    (e.g. ``{'size_um': (1600, 1600)}`` for a small test); ``save_maps`` gets one sub-folder per scale
    (``5x/``, ``10x/``).  Other keywords go to :func:`run_benchmark`.  Returns
    ``{'synthetic': True, 'scales': [...], 'runs': {'5': ..., '10': ...}}``."""
    from . import pipeline as P

    seed = int(kw.get("seed", 0))
    t0 = time.perf_counter()
    cache: dict = {}
    for spec in list(train) + [val] + list(test):
        cache[str(spec)] = P.load_data(spec, seed=seed, **(synthetic_kw or {}))
    runs = {}
    save_maps = kw.pop("save_maps", None)
    for s in scales:
        if not quiet:
            print(f"=== SYNTHETIC benchmark at {int(s)}× ===", file=sys.stderr)
        runs[str(int(s))] = run_benchmark(list(train), val, list(test), scale=int(s), n_genes=n_genes, quiet=quiet,
                                          save_maps=Path(save_maps) / f"{int(s)}x" if save_maps else None,
                                          _loaded=cache, **kw)
        runs[str(int(s))]["synthetic"] = True
    first = next(iter(runs.values()))
    return {"synthetic": True, "budget": first["budget"], "device": first["device"], "seed": seed,
            "scales": [int(s) for s in scales],
            "meta": {"train": list(map(str, train)), "val": str(val), "test": list(map(str, test)),
                     "synthetic_kw": json.loads(json.dumps(synthetic_kw or {}, default=list)),
                     "total_seconds": round(time.perf_counter() - t0, 2),
                     "machine": first["meta"]["machine"],
                     "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "runs": runs}


# ------------------------------------------------------------------------------------------ schema
def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_keys(obj, required, optional, where) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: expected an object, got {type(obj).__name__}"]
    errs = []
    missing = [k for k in required if k not in obj]
    extra = [k for k in obj if k not in required and k not in optional]
    if missing:
        errs.append(f"{where}: missing keys {missing}")
    if extra:
        errs.append(f"{where}: unexpected keys {extra}")
    return errs


def _validate_run(obj, where="result") -> list[str]:
    errs = _check_keys(obj, _RUN_KEYS, _RUN_OPTIONAL, where)
    if not isinstance(obj, dict):
        return errs
    g = obj.get("genes")
    if not (isinstance(g, list) and g and all(isinstance(x, str) and x for x in g)):
        errs.append(f"{where}.genes: expected a non-empty list of gene names")
    elif len(set(x.lower() for x in g)) != len(g):
        errs.append(f"{where}.genes: duplicate names")
    sc = obj.get("scale")
    if not (isinstance(sc, int) and not isinstance(sc, bool) and sc >= 2):
        errs.append(f"{where}.scale: expected an integer ≥ 2, got {sc!r}")
    if obj.get("budget") not in BUDGETS + ("custom",):
        errs.append(f"{where}.budget: expected one of {BUDGETS}, got {obj.get('budget')!r}")
    if not (isinstance(obj.get("device"), str) and obj.get("device") in ("cpu", "cuda", "mps")):
        errs.append(f"{where}.device: expected 'cpu', 'cuda' or 'mps', got {obj.get('device')!r}")
    if "synthetic" in obj and not isinstance(obj["synthetic"], bool):
        errs.append(f"{where}.synthetic: expected true/false")
    if "seed" in obj and not (isinstance(obj["seed"], int) and not isinstance(obj["seed"], bool)):
        errs.append(f"{where}.seed: expected an integer")
    if "meta" in obj and not isinstance(obj["meta"], dict):
        errs.append(f"{where}.meta: expected an object")
    secs = obj.get("sections")
    if not (isinstance(secs, dict) and secs):
        errs.append(f"{where}.sections: expected a non-empty object")
        return errs
    for sn, sec in secs.items():
        w = f"{where}.sections[{sn!r}]"
        e = _check_keys(sec, _SECTION_KEYS, (), w)
        errs += e
        if not isinstance(sec, dict):
            continue
        ns = sec.get("n_spots")
        if not (isinstance(ns, int) and not isinstance(ns, bool) and ns > 0):
            errs.append(f"{w}.n_spots: expected a positive integer, got {ns!r}")
        c = sec.get("ceiling_pcc")
        if c is not None and not (_is_num(c) and 0 <= c <= 1):
            errs.append(f"{w}.ceiling_pcc: expected null or a number in [0, 1], got {c!r}")
        ms = sec.get("methods")
        if not (isinstance(ms, dict) and ms):
            errs.append(f"{w}.methods: expected a non-empty object")
            continue
        for mn, row in ms.items():
            wm = f"{w}.methods[{mn!r}]"
            if mn not in METHOD_NAMES + EXTRA_METHODS:
                errs.append(f"{wm}: unknown method (expected one of {METHOD_NAMES + EXTRA_METHODS})")
            errs += _check_keys(row, METRICS, _OPTIONAL_METHOD_KEYS + _CHECK_KEYS, wm)
            if not isinstance(row, dict):
                continue
            for k in ("pcc", "detail_pcc"):
                v = row.get(k)
                if v is not None and not (_is_num(v) and -1 - 1e-9 <= v <= 1 + 1e-9):
                    errs.append(f"{wm}.{k}: expected null or a number in [-1, 1], got {v!r}")
            for k in _CHECK_KEYS:
                if k in row and not isinstance(row[k], dict):
                    errs.append(f"{wm}.{k}: expected an object, got {type(row[k]).__name__}")
            v = row.get("ssim")
            if v is not None and not (_is_num(v) and -1 - 1e-9 <= v <= 1 + 1e-9):
                errs.append(f"{wm}.ssim: expected null or a number in [-1, 1], got {v!r}")
            v = row.get("rmse")
            if v is not None and not (_is_num(v) and v >= 0):
                errs.append(f"{wm}.rmse: expected null or a number ≥ 0, got {v!r}")
            for k in ("seconds", "peak_mb") + _OPTIONAL_METHOD_KEYS:
                if k in row and not (_is_num(row[k]) and row[k] >= 0):
                    errs.append(f"{wm}.{k}: expected a number ≥ 0, got {row[k]!r}")
    return errs


def validate_result(obj) -> list[str]:
    """Problems with a benchmark JSON document (empty list = valid).  Checks exact key sets, types and
    ranges for the single-scale document and for the ``--synthetic`` document with its ``runs``."""
    if isinstance(obj, dict) and "runs" in obj:
        errs = _check_keys(obj, _SYNTH_KEYS, _SYNTH_OPTIONAL, "result")
        if obj.get("synthetic") is not True:
            errs.append("result.synthetic: a multi-scale document must be synthetic: true")
        scales = obj.get("scales")
        runs = obj.get("runs")
        if not (isinstance(scales, list) and scales and all(isinstance(s, int) and not isinstance(s, bool)
                                                             for s in scales)):
            errs.append("result.scales: expected a non-empty list of integers")
        elif not isinstance(runs, dict) or sorted(runs) != sorted(str(s) for s in scales):
            errs.append("result.runs: expected one run per scale, keyed by the scale")
        if isinstance(runs, dict):
            for k, run in runs.items():
                errs += _validate_run(run, f"result.runs[{k!r}]")
                if isinstance(run, dict):
                    if run.get("synthetic") is not True:
                        errs.append(f"result.runs[{k!r}].synthetic: expected true")
                    if str(run.get("scale")) != str(k):
                        errs.append(f"result.runs[{k!r}].scale: {run.get('scale')!r} does not match its key")
        return errs
    return _validate_run(obj)


# ------------------------------------------------------------------------------------------ tables
def _fmt(v, nd: int = 3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


_COLS = (("pcc", 3), ("rmse", 3), ("ssim", 3), ("detail_pcc", 3), ("seconds", 1), ("peak_mb", 0))


def _section_title(run: dict, sn: str, sec: dict) -> str:
    tag = "SYNTHETIC — " if run.get("synthetic") else ""
    ceil = sec.get("ceiling_pcc")
    ceil_s = f"split-half ceiling PCC {ceil:.3f}" if ceil is not None else "noise-free HR truth (no ceiling)"
    return (f"{tag}{sn}: {sec['n_spots']} spots, {ceil_s}; {run['scale']}×, {len(run['genes'])} genes, "
            f"budget {run['budget']}, {run['device']}")


def _iter_runs(result: dict):
    if "runs" in result:
        for k in result["runs"]:
            yield result["runs"][k]
    else:
        yield result


def format_table(result: dict) -> str:
    """Plain-text table(s): method × metric, one block per test section (and scale)."""
    lines = []
    for run in _iter_runs(result):
        for sn, sec in run["sections"].items():
            lines.append(_section_title(run, sn, sec))
            lines.append(f"{'method':<16}" + "".join(f"{c:>12}" for c, _ in _COLS))
            for mn, row in sec["methods"].items():
                lines.append(f"{mn:<16}" + "".join(f"{_fmt(row.get(c), nd):>12}" for c, nd in _COLS))
            lines.append("")
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The same tables in Markdown (for docs/benchmark.md)."""
    out = []
    for run in _iter_runs(result):
        for sn, sec in run["sections"].items():
            out.append(f"**{_section_title(run, sn, sec)}**\n")
            out.append("| method | PCC ↑ | RMSE ↓ | SSIM ↑ | detail-PCC ↑ | seconds | peak MiB |")
            out.append("|---|---:|---:|---:|---:|---:|---:|")
            for mn, row in sec["methods"].items():
                out.append(f"| {mn} | " + " | ".join(_fmt(row.get(c), nd) for c, nd in _COLS) + " |")
            out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ CLI
def _write_json(path, obj) -> None:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    os.replace(tmp, p)


def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise DiffSTError(f"--synthetic-scales {s!r}: expected comma-separated integers such as 5,10") from None
    if not out or any(v < 2 for v in out):
        raise DiffSTError(f"--synthetic-scales {s!r}: expected integers ≥ 2")
    return out


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        low = text.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text


def parse_diffst_set(items: Sequence[str] | None) -> dict:
    """``['KEY=VALUE', ...]`` (``--diffst-set``) -> :class:`DiffusionMethod` knobs for ``diffst``.

    ``KEY`` is a knob of :data:`DIFFUSION_BUDGETS` (``steps``, ``sample_steps``, ``n_samples``, ...), a model
    config key (``use_align``, ``gene_chunk``, ``hist_features``, ``distill``, ... → ``model_overrides``) or a
    :class:`~napari_diffst.train.TrainConfig` field (``adv_weight``, ``lr``, ``warmup_steps``, ... →
    ``train_overrides``); ``model.KEY`` / ``train.KEY`` force the target.  ``VALUE`` is JSON (``true``, ``0.01``,
    ``[1, 2]``, ``"x"``) or else a plain string (``file:/path/model.pt``).  Values are validated here, before any
    data is loaded."""
    import dataclasses

    from .model import DEFAULT_CONFIG, default_config
    from .train import TrainConfig

    knobs: dict = {}
    model_o: dict = {}
    train_o: dict = {}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    plain = set(DIFFUSION_BUDGETS["quick"]) - {"model_overrides", "train_overrides"}
    for item in items or ():
        key, sep, val = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise DiffSTError(f"--diffst-set {item!r}: expected KEY=VALUE, e.g. use_align=true or adv_weight=0.01")
        v = _parse_value(val)
        if key.startswith("model."):
            model_o[key[6:]] = v
        elif key.startswith("train."):
            train_o[key[6:]] = v
        elif key in plain:
            knobs[key] = v
        elif key in DEFAULT_CONFIG:
            model_o[key] = v
        elif key in train_fields:
            train_o[key] = v
        else:
            raise DiffSTError(f"--diffst-set {key!r}: not a diffusion knob ({', '.join(sorted(plain))}), model "
                              "config key (napari_diffst.model.DEFAULT_CONFIG) or TrainConfig field")
    try:
        if model_o:
            default_config(**model_o)
        if train_o:
            TrainConfig(**train_o)
    except TypeError as exc:
        raise DiffSTError(f"--diffst-set: {exc}") from None
    if model_o:
        knobs["model_overrides"] = model_o
    if train_o:
        knobs["train_overrides"] = train_o
    return knobs


def cmd_benchmark(args) -> int:
    if getattr(args, "truth", None):  # real HR truth from imaging-based ST (napari_diffst.truth_bench)
        from .truth_bench import cmd_truth_benchmark

        return cmd_truth_benchmark(args)
    if isinstance(args.scale, list):  # --scale takes several values only with --truth
        if len(args.scale) != 1:
            raise DiffSTError("--scale takes one value here; several (--scale 5 10) only with --truth")
        args.scale = args.scale[0]
    t0 = time.time()
    parse_methods(args.methods)  # fail before loading any data
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
    diffst_set = parse_diffst_set(getattr(args, "diffst_set", None))
    common = dict(n_genes=args.n_genes, genes=genes, methods=args.methods, budget=args.budget, seed=args.seed,
                  device=args.device, quiet=args.quiet)
    if diffst_set:
        common["method_kwargs"] = {"diffst": diffst_set}
    if args.synthetic:
        size = args.synthetic_size_um
        skw = {"size_um": (float(size), float(size))} if size else None
        result = run_synthetic(scales=_int_list(args.synthetic_scales), synthetic_kw=skw, save_maps=args.save_maps,
                               **common)
    else:
        if not args.train or not args.val or not args.test:
            raise DiffSTError("benchmark needs --train DIR [DIR ...] --val DIR --test DIR [DIR ...] "
                              "(or --synthetic)")
        result = run_benchmark(args.train, args.val, args.test, scale=args.scale, save_maps=args.save_maps,
                               self_check=getattr(args, "self_check", True), **common)
    if diffst_set:  # the options of this row, as given on the command line
        for run in _iter_runs(result):
            run["meta"]["diffst_set"] = list(args.diffst_set)
        if "runs" in result:
            result["meta"]["diffst_set"] = list(args.diffst_set)
    problems = validate_result(result)
    if problems:  # pragma: no cover - a bug, not bad input
        raise DiffSTError("benchmark produced an invalid result: " + "; ".join(problems[:5]))
    print(format_table(result))
    wall = time.time() - t0
    print(f"{'SYNTHETIC benchmark' if result.get('synthetic') else 'benchmark'} finished in {wall:.1f} s")
    if args.out:
        _write_json(args.out, result)
        print(f"wrote {args.out}")
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(result))
        print(f"wrote {args.markdown}")
    return 0


def add_commands(sub) -> None:
    """Add the ``benchmark`` sub-command to the ``napari-diffst`` parser."""
    b = sub.add_parser("benchmark", help="train/fit every method on the same sections and score them on each "
                                         "test section (table + JSON)",
                       description="Benchmark Diff-ST against the baselines (see docs/benchmark.md).")
    b.add_argument("--train", nargs="+", help="training sections (reader paths or synthetic:SEED); a bare name "
                                              "is looked up beside the first one")
    b.add_argument("--val", help="validation section")
    b.add_argument("--test", nargs="+", help="test sections (each gets a table)")
    b.add_argument("--scale", type=int, nargs="+", default=[2],
                   help="super-resolution factor (default 2: 2×2 spot blocks); with --truth one or more (5 10)")
    b.add_argument("--truth", nargs="+", default=None, metavar="DIR",
                   help="imaging-based datasets (MERSCOPE region / Xenium folder) as real HR truth: LR = --lr-um "
                        "squares, HR = lr-um/scale squares, spatial folds (see docs/benchmark.md)")
    b.add_argument("--lr-um", type=float, default=50.0, help="with --truth: LR square side in µm (default 50)")
    b.add_argument("--folds", type=int, default=2, help="with --truth: spatial stripes (default 2)")
    b.add_argument("--self-supervised", action="store_true",
                   help="with --truth: no method sees HR truth (training pairs from aggregating the LR further)")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--n-genes", type=int, default=25, help="panel size chosen on the training sections")
    g.add_argument("--genes", help="comma-separated gene names instead of --n-genes")
    b.add_argument("--methods", default="all", help=f"'all' or a comma list of {','.join(METHOD_NAMES + EXTRA_METHODS)} "
                   "(histosge_cell is an ablation that 'all' leaves out)")
    b.add_argument("--budget", choices=list(BUDGETS), default="quick",
                   help="quick: ≤ 15 min on 2 CPU cores for the dev split; full: for a GPU; tiny: tests")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (diffusion methods)")
    b.add_argument("--out", default=None, help="write the results as JSON")
    b.add_argument("--markdown", default=None, help="write the tables as Markdown")
    b.add_argument("--no-self-check", dest="self_check", action="store_false",
                   help="score the diffusion rows without the self-check a level further down on each test section "
                        "(the check keeps, per gene, only the histology's detail that helped there)")
    b.add_argument("--save-maps", default=None, help="folder for <section>.npz maps (truth, LR, each method)")
    b.add_argument("--synthetic", action="store_true",
                   help="seeded synthetic sections with HR truth (train synthetic:1,2, val :3, test :0) "
                        "at 5× and 10×")
    b.add_argument("--synthetic-scales", default="5,10", help="scales of --synthetic (default 5,10)")
    b.add_argument("--synthetic-size-um", type=float, default=None,
                   help="side of each synthetic section in µm (default 3000)")
    b.add_argument("--diffst-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a diffst knob, model config key or TrainConfig field (repeatable), e.g. "
                        "--diffst-set use_align=true --diffst-set adv_weight=0.01 --diffst-set gene_chunk=8 "
                        "--diffst-set hist_features=handcrafted; recorded in the JSON meta")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=cmd_benchmark)
