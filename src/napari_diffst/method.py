"""Diff-ST as one method object: what the dock, the CLI, ``bench-speed`` and the benchmark all run.

    m = DiffST(budget="quick", seed=0)                        # knobs: DIFFUSION_BUDGETS[budget] (+ overrides)
    for ev in m.iter_fit(train_fields, val_field, train_samples=samples, out_dir="runs/a"):
        ...                                                   # the trainer's events (progress, cancel, resume)
    m.save("runs/a")                                          # one checkpoint folder (model.pt + config.json)
    m = DiffST.load("runs/a")
    field = m.make_field(sample)                              # genes, scale, gene_scale, H&E px from the checkpoint
    res = m.predict(field, sample=sample)                     # pipeline.SRResult (mean, std, report)

The method (docs/model.md, "The method object"):

1. **Prior** (``prior='cell'``, the ``quick``/``full`` budgets): the cell-level ridge map
   (:class:`napari_diffst.prior.CellRidgePrior`) on cell-level H&E features
   (:func:`napari_diffst.data.cellfeatures.add_cell_features`, computed here from the section when the field
   does not carry them yet).  The network must never be trained on a prior fitted on the same pixels, so the
   training fields get *cross-fitted* priors: leave one section out with several training sections; with a
   single section (the user's native case) leave one **stripe** out — the section is cut into
   :data:`PRIOR_STRIPES` stripes of whole LR blocks across its longer side and each stripe's prior comes from a
   ridge fitted on the other stripes.  The prior used at prediction is fitted on all training pixels.
   ``prior='cubic'`` (``tiny``) keeps the edge-aware cubic LR↑; ``'histosge'`` is the tissue-level regressor of
   the plain conditional diffusion ablation (benchmark only: it is not saved in checkpoints).
2. **Diffusion**: :func:`napari_diffst.pipeline.make_trainer` → ``trainer.iter_train()`` on the training fields
   whose condition / residual base (``lr_upsampled(3)``) is that prior; the EMA weights are kept.
3. **Shrink**: the detail the diffusion adds to its base is scaled by the least-squares α ∈ [0, 1] fitted on
   the validation field (α = 1 without a validation field with HR targets).
4. **Self-check** (native fields, issue 14): the section's own spots, one level coarser — s×s blocks of its spots
   as the input, the spots as the truth (:meth:`DiffST.self_check`) — are predicted by the method and by the cubic
   and block-copy upsampling and scored against the spots, with no truth from anywhere else.  Per gene, the
   fallback ``F`` is the better of those two upsamplings there (``base``: 'cubic' | 'block'), and the share
   β ∈ [0, 1] of the histology-driven detail (method − F) that helps there (least squares, down to none) is kept
   at native resolution: ``F + β·(method − F)``; genes with β = 0 fall back to that upsampling of the spots, and
   the report warns when the histology does not help on the section.
5. **Predict**: the mean of ``n_samples`` reverse-diffusion samples (``sample_steps`` respaced steps), the shrink
   applied, the self-check's β applied (native), masked; on native fields projected onto the spots
   (:func:`napari_diffst.pipeline.project_result`) with the true-to-the-spots report and the self-check.

``save``/``load``: the trainer's checkpoint (:mod:`napari_diffst.train.checkpoint`, format version 2) with a
``method`` entry holding everything else ``predict`` needs: the prior's ridge (coefficients, feature
standardisation, strength), the cell-feature resolution in µm/px, α, the knobs and budget, the seed and the
training geometry.  Periodic checkpoints written while training carry it too, so ``--resume`` keeps the prior.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import CancelledError, DataFormatError, DiffSTError

__all__ = ["DiffST", "format_self_check", "DIFFUSION_BUDGETS", "ABLATIONS", "PRIOR_STRIPES", "CELL_UM_PER_PX", "stripe_folds",
           "METHOD_STATE_VERSION"]

#: Knobs of Diff-ST per budget (the lead tunes these).
#: ``model_preset``: network size (:data:`napari_diffst.pipeline.MODEL_PRESETS`; its training preset is
#: 'quick' unless 'full'); ``steps``: training steps; ``batch_size``; ``lr_size``: LR pixels per patch side;
#: ``sample_steps``: respaced reverse steps; ``n_samples``: samples averaged; ``sampler``: 'ddpm' | 'ddim';
#: ``shrink``: fit α on the validation field; ``prior``: 'cubic' | 'histosge' | 'cell' (module docstring);
#: ``train_overrides``: extra :class:`~napari_diffst.train.TrainConfig` fields; ``model_overrides``: extra model
#: config entries.  Engine options (issue #8, off by default) are reached through these: ``model_overrides``
#: ``use_align``, ``gene_chunk`` / ``gene_chunk_train``, ``hist_features``, ``distill``; ``train_overrides``
#: ``adv_weight`` — on the command line with ``--set`` / ``--diffst-set KEY=VALUE``.
DIFFUSION_BUDGETS: dict[str, dict] = {
    "tiny": dict(model_preset="tiny", steps=3, batch_size=2, lr_size=4, sample_steps=2, n_samples=1,
                 sampler="ddim", shrink=False, prior="cubic", train_overrides=dict(log_every=1, warmup_steps=1),
                 model_overrides={}),
    # quick: chosen on the validation section C5 only (docs/benchmark.md, "Tuning"): the distillation head for
    # diffst, lr 5e-4, 20 respaced steps × 4 samples, and (session 2) the HisToSGE-style regression prior as the
    # condition / residual base (C5: PCC 0.654 → 0.669, detail-PCC 0.197 → 0.273 over the cubic LR↑), and the
    # validation-fitted shrink of the added detail (C5: 0.669 → 0.677, 0.273 → 0.282; α fitted on C5 itself);
    # (session 3) the cell-level ridge prior (napari_diffst.prior) instead of the HisToSGE-style one
    # (C5: 0.677 → 0.685, 0.282 → 0.308)
    "quick": dict(model_preset="quick", steps=300, batch_size=4, lr_size=8, sample_steps=20, n_samples=4,
                  sampler="ddpm", shrink=True, prior="cell", train_overrides=dict(lr=5e-4),
                  model_overrides={"distill": True}),
    "full": dict(model_preset="full", steps=40000, batch_size=16, lr_size=16, sample_steps=250, n_samples=8,
                 sampler="ddpm", shrink=True, prior="cell", train_overrides={}, model_overrides={}),
}

#: Diff-ST components that ``ablate`` may switch off (model config ``use_<name>``); all three = the plain
#: conditional diffusion (``cond_diffusion``: no distillation head, tissue-level prior instead of the cell one).
ABLATIONS = ("cam", "cigc", "hier")
#: Stripes of the single-section cross-fit of the prior (fewer when the section has too few LR rows).
PRIOR_STRIPES = 4
#: µm per pixel of the H&E the cell-level features are computed from (the image's own when coarser).
CELL_UM_PER_PX = 1.25
#: version of the checkpoint's ``method`` entry
METHOD_STATE_VERSION = 1


def stripe_folds(field, n: int = PRIOR_STRIPES) -> list[np.ndarray]:
    """Boolean (H, W) masks of ``n`` stripes of whole LR blocks across the field's longer side (fewer when it
    has under 2 LR rows per stripe; [] when not even 2 stripes fit).  Every HR pixel is in exactly one."""
    s = int(field.scale)
    H, W = field.hr_shape
    axis = 0 if H >= W else 1
    n_lr = (H if axis == 0 else W) // s
    k = int(min(n, n_lr // 2))
    if k < 2:
        return []
    edges = np.round(np.linspace(0, n_lr, k + 1)).astype(int) * s
    edges[-1] = H if axis == 0 else W
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        m = np.zeros((H, W), bool)
        if axis == 0:
            m[a:b] = True
        else:
            m[:, a:b] = True
        out.append(m)
    return out


def _ablate_tuple(ablate) -> tuple:
    if ablate in (None, False, ()):
        return ()
    if ablate is True or ablate == "all":
        return ABLATIONS
    items = (ablate,) if isinstance(ablate, str) else tuple(ablate)
    bad = [a for a in items if a not in ABLATIONS]
    if bad:
        raise ValueError(f"unknown ablation(s) {bad}; choose from {ABLATIONS} or 'all'")
    return tuple(a for a in ABLATIONS if a in items)


class DiffST:
    """Diff-ST: prior → conditional diffusion → shrink → (native) projection onto the spots (module docstring).

    ``budget``: a name of :data:`DIFFUSION_BUDGETS` or a dict overriding entries of 'quick'; keyword ``knobs``
    override both (``model_overrides`` / ``train_overrides`` are merged key by key).  ``ablate``: components
    of :data:`ABLATIONS` to switch off (``'all'``: the plain conditional diffusion, ``name = 'cond_diffusion'``).

    Attributes after ``fit`` / ``load``: ``model_`` (EMA network), ``prior_`` (or None), ``alpha_``, ``knobs_``,
    ``genes_``, ``gene_scale_``, ``geometry_``, ``trainer`` (None after ``load``), ``trained_steps_``."""

    def __init__(self, budget="quick", seed: int = 0, device: str = "auto", ablate=(), verbose: bool = False,
                 **knobs):
        unknown = sorted(set(knobs) - set(DIFFUSION_BUDGETS["quick"]))
        if unknown:
            raise ValueError(f"unknown diffusion knobs {unknown}; valid: {sorted(DIFFUSION_BUDGETS['quick'])}")
        self.budget = budget
        self.seed = int(seed)
        self.device = device
        self.ablate = _ablate_tuple(ablate)
        self.verbose = verbose
        self.knobs = dict(knobs)
        self.name = "cond_diffusion" if self.ablate_all else "diffst"
        self.trainer = None
        self.model_ = None
        self.prior_ = None
        self.alpha_ = 1.0
        self.last_event_ = None
        self.train_seconds_ = None
        self.genes_ = None
        self.gene_scale_ = None
        self.geometry_ = None
        self.trained_steps_ = 0
        self.cell_um_per_px = CELL_UM_PER_PX
        #: (spot disk diameter, cell square side) µm of the cell-level feature windows, fixed by the training
        #: geometry at fit (None: the HR pixel's own windows, checkpoints before issue 13's scale consistency)
        self.cell_windows_um = None
        #: 'brightfield' | 'fluorescence': the image modality of the training features, kept for every section the
        #: method predicts (a black-background H&E export must not be read as a fluorescence image); None: detect
        self.cell_modality = None
        self.prior_folds_ = None
        self.holdout_ = None  # the stripe of a single training section kept out of the fit (_hold_out)
        self.train_sections_ = []

    @property
    def ablate_all(self) -> bool:
        return set(self.ablate) == set(ABLATIONS)

    # ------------------------------------------------------------------------------------------ knobs
    def resolved_knobs(self, budget=None) -> dict:
        """The knobs a fit with ``budget`` (default: this object's) runs with."""
        budget = self.budget if budget is None else budget
        if isinstance(budget, dict):
            kn = copy.deepcopy(DIFFUSION_BUDGETS["quick"])
            kn.update(copy.deepcopy(budget))
        elif budget in DIFFUSION_BUDGETS:
            kn = copy.deepcopy(DIFFUSION_BUDGETS[budget])
        else:
            raise ValueError(f"unknown budget {budget!r}; use one of {sorted(DIFFUSION_BUDGETS)} or a dict")
        for k, v in copy.deepcopy(self.knobs).items():
            if k in ("model_overrides", "train_overrides") and isinstance(v, dict):
                kn[k] = {**(kn.get(k) or {}), **v}
            else:
                kn[k] = v
        if self.ablate_all and kn.get("prior") == "cell":  # the cell-level prior belongs to the cell level
            kn["prior"] = "histosge"
        return kn

    def _model_overrides(self, kn) -> dict:
        ov = dict(kn.get("model_overrides") or {})
        for a in self.ablate:
            ov[f"use_{a}"] = False
        if self.ablate_all:  # plain conditional diffusion: no Diff-ST component, no distillation head
            ov["distill"] = False
        return ov

    def needs_cell_features(self, budget=None) -> bool:
        """True when the prior reads cell-level features (``prior='cell'``)."""
        return self.resolved_knobs(budget).get("prior") == "cell"

    # ------------------------------------------------------------------------------------------ features
    def add_features(self, field, sample=None):
        """The features this method's prior needs, on ``field`` (cell-level H&E features computed from ``sample``
        when absent; nothing for a prior-less method); returns the field, modified in place."""
        if not self.needs_cell_features() and getattr(self.prior_, "name", "") != "cell_ridge":
            return field
        return self._ensure_cells(field, sample)

    def _ensure_cells(self, field, sample=None):
        """Cell-level features on ``field`` (computed from ``sample`` when absent); the field, modified in place."""
        want = None if self.cell_windows_um is None else [float(w) for w in self.cell_windows_um]
        same = (field.extra.get("cell_windows_um") == want
                and (self.cell_modality is None or field.extra.get("cell_modality") == self.cell_modality))
        if field.extra.get("cell_features") is not None and (same or sample is None):
            return field
        if sample is None:
            raise DataFormatError(None, f"field {field.name!r}: Diff-ST's cell-level prior needs the section's H&E "
                                  "at cell resolution", "pass the Sample the field was made from (sample= / "
                                  "train_samples=)")
        from .data.cellfeatures import add_cell_features

        return add_cell_features(field, sample, um_per_px=self.cell_um_per_px, windows_um=self.cell_windows_um,
                                 modality=self.cell_modality)

    @staticmethod
    def feature_windows(field, sample=None) -> tuple[float, float]:
        """The fixed physical windows (µm) of the cell-level features for a method trained on ``field``: a disk of
        the spot's diameter (at most the HR pixel) and a square of the HR pixel, both of the *training* geometry.
        Prediction on a finer grid (native: HR pixel = pitch/s) keeps these windows, centred on each of its HR
        pixels, so the prior reads features with the statistics it was fitted on (issue 13, scale consistency;
        ``tests/test_scale_consistency.py``)."""
        hr = float(field.hr_um)
        spot = float(getattr(sample, "spot_diameter_um", 0) or 0) if sample is not None else 0.0
        return (min(spot, hr) if spot > 0 else hr, hr)

    @staticmethod
    def _with_prior(field, prior: np.ndarray):
        """A shallow copy of ``field`` whose condition/residual base (``lr_upsampled(3)``) is ``prior``."""
        f2 = dataclasses.replace(field, extra=dict(field.extra))
        f2.extra["lr_up3"] = np.asarray(prior, np.float32)
        return f2

    # ------------------------------------------------------------------------------------------ prior
    def _fit_prior(self, train_fields, val_field, seed, budget, kind="histosge"):
        """Cross-fitted priors for the training fields (each from a regressor that did not see its pixels) and a
        regressor on all of them for the fields to predict (module docstring)."""
        from .baselines import HisToSGEStyle
        from .prior import CellRidgePrior

        pb = budget if isinstance(budget, str) and budget in HisToSGEStyle.BUDGETS else "quick"

        def make(fields, s):
            if kind == "cell":
                return CellRidgePrior().fit(fields)
            return HisToSGEStyle(mask_output=False).fit(fields, val_field, seed=s, budget=pb)

        out = []
        self.prior_folds_ = None
        for i, f in enumerate(train_fields):
            others = [g for j, g in enumerate(train_fields) if j != i]
            if others:
                out.append(self._with_prior(f, make(others, seed + i).predict(f)))
            elif kind == "cell":  # one section: leave one stripe out
                folds = stripe_folds(f)
                self.prior_folds_ = len(folds)
                out.append(self._with_prior(f, _stripe_cross_fit(f, folds)) if folds else f)
            else:  # the tissue-level regressor needs other sections: keep the cubic
                out.append(f)
        self.prior_ = make(train_fields, seed)
        return out

    def predict_prior(self, field, sample=None) -> np.ndarray | None:
        """The regression prior's own map for ``field`` (masked), or None without a prior."""
        if self.prior_ is None:
            return None
        if self.resolved_knobs().get("prior") == "cell" or getattr(self.prior_, "name", "") == "cell_ridge":
            self._ensure_cells(field, sample)
        return np.asarray(self.prior_.predict(field), np.float32) * np.asarray(field.hr_mask, np.float32)[None]

    # ------------------------------------------------------------------------------------------ fit
    def iter_fit(self, train_fields, val_field=None, train_samples=None, val_sample=None, out_dir=None,
                 resume=None, should_stop=None, provenance: dict | None = None) -> Iterator:
        """Fit, yielding the trainer's :class:`~napari_diffst.train.TrainEvent` s ('step', 'checkpoint', 'done',
        'cancelled', 'error').  ``train_samples``: the Samples the fields were made from (cell-level features
        are computed from them when the prior needs them and the fields lack them).  ``out_dir``: checkpoint
        folder (periodic checkpoints, and the final one with α); ``resume``: a checkpoint folder to continue
        (its settings must be these: checked).  The shrink α is fitted after training, before 'done'.
        Same as :meth:`prepare_fit` followed by :meth:`iter_train`."""
        self.prepare_fit(train_fields, val_field, train_samples=train_samples, val_sample=val_sample,
                         out_dir=out_dir, resume=resume, should_stop=should_stop, provenance=provenance)
        yield from self.iter_train()

    def prepare_fit(self, train_fields, val_field=None, train_samples=None, val_sample=None, out_dir=None,
                    resume=None, should_stop=None, provenance: dict | None = None):
        """Everything before the first training step (cell features, cross-fitted prior, the trainer — resumed
        from ``resume`` when given); returns the :class:`~napari_diffst.train.Trainer` (``self.trainer``:
        progress totals, ``cancel()``).  Then iterate :meth:`iter_train`."""
        from . import pipeline as P

        budget = self.budget
        kn = self.resolved_knobs(budget)
        self.knobs_ = kn
        train_fields = list(train_fields)
        prior = kn.get("prior", "cubic")
        if prior not in ("cubic", "histosge", "cell"):
            raise ValueError(f"{self.name}: prior must be 'cubic', 'histosge' or 'cell', not {prior!r}")
        t0 = time.perf_counter()
        self.prior_ = None
        if prior == "cell":
            smps = list(train_samples) if train_samples is not None else [None] * len(train_fields)
            have = train_fields[0].extra.get("cell_windows_um")  # features already computed by the caller
            self.cell_windows_um = (tuple(float(w) for w in have) if have and smps[0] is None
                                    else self.feature_windows(train_fields[0], smps[0]))
            self.cell_modality = None
            for f, s in zip(train_fields, smps):
                self._ensure_cells(f, s)
            self.cell_modality = train_fields[0].extra.get("cell_modality")
            if val_field is not None and kn.get("shrink"):
                self._ensure_cells(val_field, val_sample)
        self.train_sections_ = [str(f.name) for f in train_fields]
        train_fields = self._hold_out(train_fields, kn)
        fit_fields = train_fields
        if prior in ("histosge", "cell"):
            fit_fields = self._fit_prior(train_fields, val_field, self.seed, budget, kind=prior)
        f0 = next((f for f in train_fields if f.hr is not None), train_fields[0])
        self.genes_ = list(f0.genes)
        self.gene_scale_ = np.asarray(f0.gene_scale, np.float64)
        self.geometry_ = {"scale": int(f0.scale), "hr_um": float(f0.hr_um), "he_per_hr": int(f0.he_per_hr),
                          "um_per_px": float(f0.um_per_px), "mode": f0.extra.get("mode"),
                          "lr_um": float(f0.hr_um) * int(f0.scale)}
        self.model_ = None
        self.alpha_ = 1.0
        prov = {"method": self.name, **(provenance or {})}
        self.trainer = P.make_trainer(list(fit_fields), budget=kn["model_preset"], steps=kn["steps"],
                                      batch_size=kn["batch_size"], lr_size=kn["lr_size"], seed=self.seed,
                                      device=self.device, model_overrides=self._model_overrides(kn), out_dir=out_dir,
                                      provenance=prov, should_stop=should_stop, resume=resume,
                                      resume_check=resume is not None, **dict(kn.get("train_overrides") or {}))
        self.trainer.method_state = self._method_state(with_prior=prior == "cell")  # periodic checkpoints too
        self._fit_ctx = (val_field, kn, t0, out_dir)
        return self.trainer

    def _hold_out(self, train_fields, kn):
        """One training section (the user's self-supervised case): its last stripe of whole LR blocks
        (:func:`stripe_folds`; one LR block in four on a diagonal lattice when fewer than three stripes fit, at
        coarse scales) is kept out of everything the fit sees — the prior's ridge and the network's loss
        and input (truth zeroed, mask off) — so that :meth:`self_check` on that section has pixels the model never
        trained on.  ``self.holdout_``: ``{'section', 'hr_shape', 'mask'}`` or None (several sections, fewer than
        3 stripes, or the knob ``holdout=False``)."""
        self.holdout_ = None
        if not kn.get("holdout", True) or len(train_fields) != 1:
            return train_fields
        f = train_fields[0]
        if f.hr is None or f.extra.get("mode") != "degrade":
            return train_fields
        folds = stripe_folds(f)
        s = int(f.scale)
        if len(folds) >= 3:
            hold, how = folds[-1], f"the last of {len(folds)} stripes of LR blocks"
        else:  # too few LR rows for three stripes (coarse scales): one LR block in four, on a diagonal lattice
            r, c = np.indices(f.hr_shape)
            hold, how = ((r // s) + 2 * (c // s)) % 4 == 3, "one LR block in four (diagonal lattice)"
        hold = hold & np.asarray(f.hr_mask, bool)
        if hold.sum() < 8 or (np.asarray(f.hr_mask, bool) & ~hold).sum() < 16:  # HR pixels here = spots
            return train_fields
        self.holdout_ = {"section": str(f.name), "hr_shape": [int(x) for x in f.hr_shape], "mask": hold,
                         "how": how}
        kept = dataclasses.replace(f, hr=np.where(hold[None], 0, f.hr).astype(np.asarray(f.hr).dtype),
                                   hr_mask=np.asarray(f.hr_mask, bool) & ~hold, extra=dict(f.extra))
        return [kept]

    def _holdout_for(self, field):
        """The held-out pixels (H, W) of ``field`` when it is the training section's degrade field, else None."""
        h = getattr(self, "holdout_", None)
        if not h or str(field.name) != h["section"] or list(field.hr_shape) != list(h["hr_shape"]):
            return None
        return np.asarray(h["mask"], bool)

    def iter_train(self) -> Iterator:
        """The training loop of a :meth:`prepare_fit` (the trainer's events); α is fitted and the final checkpoint
        (with it) written before 'done'."""
        val_field, kn, t0, out_dir = self._fit_ctx
        last, next_print = None, 0.0
        for ev in self.trainer.iter_train():
            last = ev
            if self.verbose and ev.kind == "step" and (time.perf_counter() - t0 >= next_print):
                next_print = time.perf_counter() - t0 + 15.0
                loss = ev.losses.get("loss", float("nan")) if ev.losses else float("nan")
                print(f"  {self.name}: step {ev.step}/{ev.total_steps} loss {loss:.4f}", file=sys.stderr)
            if ev.kind == "done":
                self._finish_fit(val_field, kn, t0)
                if out_dir is not None:
                    self.save(out_dir)
            yield ev
        self.last_event_ = last
        if last is not None and last.kind == "error":  # pragma: no cover - iter_train re-raises
            raise DiffSTError(f"{self.name}: training failed: {last.message}")
        if last is None or last.kind != "done":  # cancelled: usable weights all the same
            self._finish_fit(None, kn, t0)

    def _finish_fit(self, val_field, kn, t0) -> None:
        self.train_seconds_ = time.perf_counter() - t0
        self.model_ = self.trainer.ema
        self.trained_steps_ = int(self.trainer.step)
        self.alpha_ = 1.0
        if kn.get("shrink") and val_field is not None and getattr(val_field, "hr", None) is not None:
            # scale the detail the diffusion adds to its base by the least-squares factor on the validation field
            pred, base = self._predict_raw(val_field)
            m = np.asarray(val_field.hr_mask, bool)
            r, t = (pred - base)[:, m], (np.asarray(val_field.hr) - base)[:, m]
            den = float((r * r).sum())
            self.alpha_ = float(np.clip((r * t).sum() / den, 0.0, 1.0)) if den > 0 else 1.0
        self.trainer.method_state = self._method_state(with_prior=kn.get("prior") == "cell")

    def fit(self, train_fields, val_field=None, **kw) -> "DiffST":
        """Run :meth:`iter_fit` to the end; returns self."""
        for _ in self.iter_fit(train_fields, val_field, **kw):
            pass
        return self

    # ------------------------------------------------------------------------------------------ predict
    def prepare_field(self, field, sample=None):
        """(``field`` with the prior as its condition/residual base, that base (G, H, W), unmasked): the step
        before sampling, for a whole section (:meth:`iter_predict`) and for each tile of a tiled run
        (:meth:`prepare_tile`).  Cell-level features are computed from ``sample`` when the field lacks them."""
        if self.model_ is None:
            raise RuntimeError(f"{self.name}: call fit() or DiffST.load() before predict()")
        if self.prior_ is not None:
            if getattr(self.prior_, "name", "") == "cell_ridge":
                self._ensure_cells(field, sample)
            field = self._with_prior(field, self.prior_.predict(field))
        return field, np.asarray(field.lr_upsampled(3), np.float32)

    _prepared = prepare_field

    @property
    def applies_base(self) -> bool:
        """True when sampling is more than the bare network: a prior as the base, or a shrink α ≠ 1."""
        return self.prior_ is not None or float(self.alpha_) != 1.0

    #: LR pixels of context around a tile for its prior (the cubic LR↑ of a crop matches the whole section's
    #: to ~1e-5 past 8 LR pixels, as :func:`napari_diffst.tiling._upsample_crop`'s condition)
    TILE_CONTEXT_LR = 8
    #: µm of H&E context around a tile for its cell-level features (the widest filter reaches 4σ = 80 µm)
    TILE_FEATURE_CONTEXT_UM = 80.0

    def prepare_tile(self, source, r0: int, c0: int, h: int, w: int) -> np.ndarray | None:
        """The base map (G, h, w) of one tile of a :class:`napari_diffst.tiling.TileSource`: :meth:`prepare_field`
        on the tile's window with :data:`TILE_CONTEXT_LR` LR pixels of context (cell-level features from the
        source's Sample, for a window just :data:`TILE_FEATURE_CONTEXT_UM` wider than the tile, so memory and
        work follow the tile, not the section).  None for the bare network (no prior, α = 1)."""
        if not self.applies_base:
            return None
        sub, (dr, dc) = source.window_field(r0, c0, h, w, self.TILE_CONTEXT_LR)
        if getattr(self.prior_, "name", "") == "cell_ridge" and sub.extra.get("cell_features") is None:
            sample = getattr(source, "sample", None)
            s = int(source.scale)
            ctx = int(np.ceil(self.TILE_FEATURE_CONTEXT_UM / (float(source.hr_um) * s))) + 1
            if ctx >= self.TILE_CONTEXT_LR:
                self._ensure_cells(sub, sample)
            else:
                inner, (dr2, dc2) = source.window_field(r0, c0, h, w, ctx)
                self._ensure_cells(inner, sample)
                Fi = np.asarray(inner.extra["cell_features"], np.float32)
                F = np.zeros((Fi.shape[0],) + tuple(sub.hr_shape), np.float32)
                y0, x0 = dr - dr2, dc - dc2  # the inner window inside the context window (whole LR blocks)
                F[:, y0:y0 + Fi.shape[1], x0:x0 + Fi.shape[2]] = Fi
                sub.extra.update({k: v for k, v in inner.extra.items() if k.startswith("cell_")})
                sub.extra["cell_features"] = F
        _, base = self.prepare_field(sub, None)
        return np.ascontiguousarray(base[:, dr:dr + h, dc:dc + w], np.float32)

    def _predict_raw(self, field, sample=None) -> tuple[np.ndarray, np.ndarray]:
        """(mean of the samples, the base map the network's residual starts from), both (G, H, W)."""
        from . import pipeline as P

        f, base = self.prepare_field(field, sample)
        kn = self.knobs_
        res = P.super_resolve(self.model_, f, steps=int(kn["sample_steps"]), n_samples=int(kn["n_samples"]),
                              seed=self.seed, sampler=kn.get("sampler", "ddpm"), project=False)
        pred = np.asarray(res.mean, np.float32)
        if pred.shape != (field.G,) + tuple(field.hr_shape):
            raise RuntimeError(f"{self.name}: prediction {pred.shape} not on the HR grid {field.hr_shape}")
        return pred, base

    def iter_predict(self, field, sample=None, steps: int | None = None, n_samples: int | None = None,
                     seed: int | None = None, sampler: str | None = None, project="auto",
                     self_check="auto") -> Iterator[dict]:
        """Generator: the sampler's preview dicts (``'x0_pred'``, ``'done'``, ``'total'``, ...; stop iterating to
        cancel), then ``{'result': SRResult}`` — the shrunk, masked mean in model units; on native fields
        (``project='auto'``) projected onto the spots with the report.  ``steps`` / ``n_samples`` / ``seed`` /
        ``sampler`` default to the fitted knobs and seed.  ``self_check``: ``'auto'`` = on native fields with the
        ``sample`` at hand, run :meth:`self_check` first and keep per gene only the detail that helped there
        (``report['self_check']``); ``False``: no check; a dict: a check already run."""
        from . import pipeline as P

        native = field.extra.get("mode") == "native"
        check = None
        if isinstance(self_check, dict):
            check = self_check
        elif self_check is True or (self_check == "auto" and native and sample is not None):
            yield {"stage": "self-check", "message": f"self-check on {sample.name}, one level coarser"}
            check = self.self_check(sample, steps=steps, n_samples=n_samples, seed=seed, sampler=sampler)
        f, base = self.prepare_field(field, sample)
        kn = self.knobs_
        steps = int(kn["sample_steps"] if steps is None else steps)
        n_samples = int(kn["n_samples"] if n_samples is None else n_samples)
        res = None
        for upd in P.super_resolve_iter(self.model_, f, steps=steps, n_samples=n_samples,
                                        seed=self.seed if seed is None else int(seed),
                                        sampler=sampler or kn.get("sampler", "ddpm"), project=False):
            if "result" in upd:
                res = upd["result"]
            else:
                yield upd
        if res is None:  # pragma: no cover
            raise CancelledError("super-resolution did not finish")
        mask = np.asarray(field.hr_mask, np.float32)[None]
        pred, std = np.asarray(res.mean, np.float32), np.asarray(res.std, np.float32)
        a = float(self.alpha_)
        if a != 1.0:
            pred = base + a * (pred - base)
            std = std * np.float32(a)
        pred, std = self.apply_check(pred, std, field, check)
        pred = pred * mask
        report = None
        if project is True or (project == "auto" and native):
            shown = None
            if sample is not None and getattr(sample, "image", None) is not None:
                from .data.grids import display_mask

                shown = display_mask(sample, field)  # the tissue at HR resolution: NaN outside it in every output
            pred, report = P.project_result(pred, field, shown=shown)
        if check is not None:
            report = dict(report or {}, self_check=check)
        yield {"result": P.SRResult(pred, (std * mask).astype(np.float32), list(field.genes), field.hr_um, field,
                                    res.steps, n_samples, report=report)}

    #: genes whose self-check gain (method PCC − the better of cubic and block copy, one level coarser) is below
    #: this count as "histology does not help" in the warning
    SELF_CHECK_MARGIN = 0.0

    def self_check(self, sample, *, steps: int | None = None, n_samples: int | None = None,
                   seed: int | None = None, sampler: str | None = None, bin_lattice: int = 1) -> dict:
        """The method on the section's own spots one level coarser (s×s blocks of spots → the spots, the
        ``degrade`` field; no truth from anywhere else), against the cubic LR↑ and the block copy.

        Returns a JSON-ready dict: ``level``; mean ``pcc`` / ``detail_pcc`` of ``method``, ``cubic``, ``nearest``
        and ``kept`` (the method with only the detail share β kept); ``beta`` (G,) ∈ [0, 1], the least-squares
        share of ``method − cubic`` that fits ``truth − cubic`` there (0: the gene falls back to the cubic LR↑);
        ``per_gene``; ``fallback`` (genes with β = 0); ``warning`` (a sentence, or None).  ``kept`` is scored on
        the level β was fitted on (one number per gene).  A model trained on this same section has seen that
        level (its network, not its cross-fitted prior), so its check is optimistic; a model trained on other
        sections is checked on data it never saw.  ``{'skipped': why}`` when the section has too few spots for
        s×s blocks.  When the model was fitted on this one section, the check scores only the stripe held out of
        that fit (:meth:`_hold_out`; ``held_out``); a training section without one is flagged ``in_sample``."""
        from .data.upsample import cubic_upsample
        from .metrics import detail_pcc_per_gene, pcc_per_gene

        s = int(self.geometry_["scale"])
        try:
            chk = self.make_field(sample, "degrade", bin_lattice=bin_lattice)
        except (DiffSTError, ValueError) as exc:
            return {"skipped": f"no level one coarser on this section ({exc})"}
        mask = np.asarray(chk.hr_mask, bool)
        hold = self._holdout_for(chk)
        in_sample = hold is None and str(chk.name) in (getattr(self, "train_sections_", None) or [])
        if hold is not None:
            mask = mask & hold
        if mask.sum() < 8:
            return {"skipped": f"no level one coarser on this section (only {int(mask.sum())} spots in s×s blocks)"}
        pred = np.asarray(DiffST.predict(self, chk, sample=sample, steps=steps, n_samples=n_samples, seed=seed,
                                         sampler=sampler, project=False, self_check=False).mean, np.float64)
        truth = np.asarray(chk.hr, np.float64)
        cub = cubic_upsample(chk.lr, s, chk.lr_mask, order=3).astype(np.float64)
        near = np.asarray(chk.lr_upsampled(0), np.float64)
        p_cub, p_near = pcc_per_gene(cub, truth, mask), pcc_per_gene(near, truth, mask)
        # per gene, the fallback is the better of the spots' two upsamplings there (a constant block copy, e.g. a
        # single held-out block, has no PCC: cubic)
        use_block = np.nan_to_num(p_near, nan=-np.inf) > np.nan_to_num(p_cub, nan=-np.inf)
        fb = np.where(use_block[:, None, None], near, cub)
        d, r = (pred - fb)[:, mask], (truth - fb)[:, mask]
        dd = (d * d).sum(axis=1)
        beta = np.clip(np.divide((d * r).sum(axis=1), dd, out=np.zeros_like(dd), where=dd > 0), 0.0, 1.0)
        kept = fb + beta[:, None, None] * (pred - fb)
        # the method's starting point (the prior, or the cubic LR↑ without one): what the diffusion adds over it
        start = np.asarray(self.prepare_field(chk, sample)[1], np.float64) * chk.hr_mask[None]
        maps = {"method": pred, "cubic": cub, "nearest": near, "kept": kept, "prior": start}
        pcc = {k: pcc_per_gene(v, truth, mask) for k, v in maps.items()}
        det = {k: detail_pcc_per_gene(v, truth, near, mask) for k, v in maps.items()}
        gain = pcc["method"] - np.fmax(pcc["cubic"], pcc["nearest"])  # fmax: a NaN baseline does not count
        genes = list(chk.genes)
        fallback = [g for g, b in zip(genes, beta) if b == 0.0]
        helps = np.nan_to_num(gain, nan=0.0) > self.SELF_CHECK_MARGIN
        warning = None
        m = lambda a: float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")  # noqa: E731
        if m(gain) <= self.SELF_CHECK_MARGIN or helps.sum() < len(genes) / 2:
            warning = (f"on this section, one level coarser, the histology does not help: method PCC "
                       f"{m(pcc['method']):.3f} vs cubic {m(pcc['cubic']):.3f} / block copy {m(pcc['nearest']):.3f} "
                       f"(better for {int(helps.sum())} of {len(genes)} genes); the maps keep {beta.min():.2f}–"
                       f"{beta.max():.2f} of the histology's detail per gene ({len(fallback)} of {len(genes)} on "
                       f"the spots' upsampling alone; PCC there {m(pcc['kept']):.3f})")

        def r4(v):
            v = float(v)
            return round(v, 4) if np.isfinite(v) else None

        return {
            "level": (f"{s}×{s} blocks of this section's spots → its {int(mask.sum())} spots" if int(bin_lattice) == 1
                      else f"{s}×{s} blocks of {bin_lattice}×{bin_lattice} spot blocks → its {int(mask.sum())} "
                           f"{bin_lattice}×{bin_lattice} blocks")
                     + (" held out of training" if hold is not None
                        else " (seen in training: optimistic)" if in_sample else ""),
            "held_out": None if hold is None else self.holdout_.get("how", "held out"), "in_sample": bool(in_sample),
            "pcc": {k: r4(m(v)) for k, v in pcc.items()},
            "detail_pcc": {k: r4(m(v)) for k, v in det.items()},
            "beta": [round(float(b), 4) for b in beta],
            "base": ["block" if b else "cubic" for b in use_block],
            "fallback": fallback, "warning": warning,
            "per_gene": {"gene": genes, **{f"pcc_{k}": [r4(x) for x in v] for k, v in pcc.items()},
                         "detail_pcc_method": [r4(x) for x in det["method"]]},
        }

    @staticmethod
    def apply_check(pred: np.ndarray, std: np.ndarray | None, field, check: dict | None):
        """(``F + β·(pred − F)``, ``std·β``) per gene with the self-check's β and fallback ``F`` (its ``base``: the
        cubic LR↑ or the block copy of ``field``'s LR); unchanged without a check or β."""
        beta = None if not check else check.get("beta")
        if beta is None:
            return pred, std
        from .data.upsample import cubic_upsample

        b = np.asarray(beta, np.float32)[:, None, None]
        fb = cubic_upsample(field.lr, int(field.scale), field.lr_mask, order=3).astype(np.float32)
        block = np.asarray([k == "block" for k in (check.get("base") or [])], bool)
        if block.any():  # genes whose fallback is the block copy of the spots (self_check's 'base')
            fb[block] = np.asarray(field.lr_upsampled(0), np.float32)[block]
        pred = fb + b * (np.asarray(pred, np.float32) - fb)
        return pred, (None if std is None else std * b)

    def predict(self, field, sample=None, **kw):
        """Run :meth:`iter_predict` to the end: a :class:`napari_diffst.pipeline.SRResult`."""
        res = None
        for upd in self.iter_predict(field, sample=sample, **kw):
            res = upd.get("result", res)
        return res

    def draw_samples(self, field, n: int, seed: int | None = None, sample=None) -> np.ndarray:
        """(n, G, H, W) individual reverse-diffusion samples (one sample each, seeds ``seed + 1000 + j``), the prior
        and the shrink applied as in :meth:`predict`, masked, not projected (for CRPS / coverage)."""
        seed = self.seed if seed is None else int(seed)
        return np.stack([np.asarray(DiffST.predict(self, field, sample=sample, n_samples=1, seed=seed + 1000 + j,
                                                   self_check=False,
                                                   project=False).mean, np.float32) for j in range(int(n))])

    def predict_map(self, field, sample=None) -> np.ndarray:
        """(G, H, W) float32 in model units: what the benchmark scores (no projection on degrade/truth fields)."""
        return np.asarray(DiffST.predict(self, field, sample=sample).mean, np.float32)

    # ------------------------------------------------------------------------------------------ fields
    def make_field(self, sample, mode: str = "auto", bin_lattice: int = 1):
        """The field this fitted / loaded method is applied to: its genes, scale, gene scale and H&E pixels per HR
        pixel; ``mode`` 'auto' = 'truth' where the sample has HR truth, else 'native'.  Cell-level features are
        added when the prior needs them."""
        from . import pipeline as P

        if self.genes_ is None or self.geometry_ is None:
            raise RuntimeError(f"{self.name}: call fit() or DiffST.load() first")
        m = mode if mode != "auto" else ("truth" if sample.hr_truth else "native")
        (f,), _ = P.make_fields([sample], self.genes_, int(self.geometry_["scale"]), mode=m,
                                gene_scale=self.gene_scale_, he_per_hr=int(self.model_.config["he_per_hr"]),
                                bin_lattice=int(bin_lattice))
        if getattr(self.prior_, "name", "") == "cell_ridge":
            self._ensure_cells(f, sample)
        return f

    # ------------------------------------------------------------------------------------------ save / load
    def _method_state(self, with_prior: bool = True) -> dict:
        import torch

        pr = None
        if self.prior_ is not None and getattr(self.prior_, "name", "") == "cell_ridge" and with_prior:
            mu, sd, B, ym = self.prior_.coef_
            pr = {"kind": "cell", "lam": float(self.prior_.lam_), "lams": list(self.prior_.lams),
                  "mu": torch.from_numpy(np.asarray(mu, np.float64).copy()),
                  "sd": torch.from_numpy(np.asarray(sd, np.float64).copy()),
                  "B": torch.from_numpy(np.asarray(B, np.float64).copy()),
                  "ym": torch.from_numpy(np.asarray(ym, np.float64).copy()),
                  "genes": list(self.prior_.genes_), "cell_um_per_px": float(self.cell_um_per_px),
                  "cross_fit": "leave one section out" if self.prior_folds_ is None
                  else f"leave one of {self.prior_folds_} stripes out" if self.prior_folds_
                  else "none: one section too small for stripes (trained on the cubic LR↑)"}
        elif self.prior_ is not None:
            pr = {"kind": "histosge", "saved": False}
        kn = getattr(self, "knobs_", None) or self.resolved_knobs()
        import json

        return {"version": METHOD_STATE_VERSION, "name": self.name, "ablate": list(self.ablate),
                "budget": self.budget if isinstance(self.budget, str) else "custom",
                "knobs": json.loads(json.dumps(kn, default=str)), "seed": int(self.seed),
                "alpha": float(self.alpha_), "prior": pr, "geometry": dict(self.geometry_ or {}),
                "trained_steps": int(self.trainer.step) if self.trainer is not None else int(self.trained_steps_),
                "cell_um_per_px": float(self.cell_um_per_px),
                "cell_windows_um": None if self.cell_windows_um is None else [float(w) for w in self.cell_windows_um],
                "cell_modality": self.cell_modality,
                "train_sections": list(getattr(self, "train_sections_", None) or []),
                "holdout": None if not getattr(self, "holdout_", None) else {
                    "section": self.holdout_["section"], "hr_shape": list(self.holdout_["hr_shape"]),
                    "how": self.holdout_.get("how", ""),
                    "mask": torch.from_numpy(np.asarray(self.holdout_["mask"], np.uint8).copy())}}

    def save(self, path) -> Path:
        """Write one checkpoint folder (``model.pt`` + ``config.json``, atomically) that :meth:`load` restores."""
        from .train.checkpoint import save_checkpoint

        if self.model_ is None:
            raise RuntimeError(f"{self.name}: nothing to save; call fit() first")
        if self.prior_ is not None and getattr(self.prior_, "name", "") != "cell_ridge":
            raise DiffSTError(f"{self.name}: the '{self.knobs_.get('prior')}' prior cannot be saved in a checkpoint "
                              "(benchmark only); use prior='cell' or 'cubic'")
        state = self._method_state()
        if self.trainer is not None:
            self.trainer.method_state = state
            self.trainer.save_checkpoint(path)
            from .train.checkpoint import checkpoint_file

            return checkpoint_file(path)
        meta = self.meta_
        return save_checkpoint(path, model=self.model_, ema_model=self.model_, step=self.trained_steps_,
                               train_config=meta.get("train_config"), diffusion_config=meta.get("diffusion"),
                               genes=self.genes_, gene_scale=self.gene_scale_, provenance=meta.get("provenance"),
                               method=state)

    @classmethod
    def load(cls, path, device: str = "auto") -> "DiffST":
        """A fitted DiffST from a checkpoint folder.  Checkpoints written before the method object (no
        ``method`` entry) load as the bare network: cubic LR↑ condition, no shrink, sampling knobs of 'quick'."""
        from .device import resolve_device
        from .prior import CellRidgePrior
        from .train.checkpoint import load_checkpoint

        model, ema, meta = load_checkpoint(path, device=resolve_device(device))
        genes = meta.get("genes")
        scale = (meta.get("provenance") or {}).get("scale")
        if not genes or meta.get("gene_scale") is None or scale is None:
            raise DataFormatError(path, "checkpoint lacks genes / scale / gene_scale", "a checkpoint written by "
                                  "`napari-diffst train` or DiffST.save")
        st = meta.get("method") or None
        if st:
            m = cls(budget=st.get("budget") if st.get("budget") in DIFFUSION_BUDGETS else "quick",
                    seed=int(st.get("seed", 0)), device=device, ablate=tuple(st.get("ablate") or ()))
            m.knobs_ = dict(st.get("knobs") or m.resolved_knobs())
            m.alpha_ = float(st.get("alpha", 1.0))
            m.cell_um_per_px = float(st.get("cell_um_per_px", CELL_UM_PER_PX))
            w = st.get("cell_windows_um")
            m.cell_windows_um = None if not w else tuple(float(v) for v in w)
            m.cell_modality = st.get("cell_modality")
            m.geometry_ = dict(st.get("geometry") or {})
            m.trained_steps_ = int(st.get("trained_steps", meta.get("step", 0)))
            m.train_sections_ = list(st.get("train_sections") or [])
            h = st.get("holdout")
            m.holdout_ = None if not h else {"section": h["section"], "hr_shape": list(h["hr_shape"]),
                                             "mask": np.asarray(h["mask"].numpy(), bool), "how": h.get("how", "")}
            pr = st.get("prior")
            if pr and pr.get("kind") == "cell":
                p = CellRidgePrior(lams=pr.get("lams") or (0.1, 0.3, 1.0, 3.0))
                p.genes_ = list(pr["genes"])
                p.lam_ = float(pr["lam"])
                p.cv_ = {}
                p.coef_ = tuple(np.asarray(pr[k].numpy(), np.float64) for k in ("mu", "sd", "B", "ym"))
                m.prior_ = p
                m.cell_um_per_px = float(pr.get("cell_um_per_px", m.cell_um_per_px))
            elif pr:
                raise DataFormatError(path, f"the checkpoint's prior {pr.get('kind')!r} was not saved",
                                      "a checkpoint of a Diff-ST with prior 'cell' or 'cubic'")
        else:  # a checkpoint of the bare network (before the method object)
            m = cls(budget="quick", seed=0, device=device, prior="cubic", shrink=False)
            m.knobs_ = m.resolved_knobs()
            m.trained_steps_ = int(meta.get("step", 0))
            m.geometry_ = {"scale": int(scale)}
        m.geometry_.setdefault("scale", int(scale))
        m.model_ = ema if ema is not None else model
        m.genes_ = list(genes)
        m.gene_scale_ = np.asarray(meta["gene_scale"], np.float64)
        m.meta_ = meta
        m.trainer = None
        return m

    def __repr__(self):
        return f"DiffST(budget={self.budget!r}, ablate={self.ablate}, knobs={self.knobs})"


def _stripe_cross_fit(field, folds: Sequence[np.ndarray]) -> np.ndarray:
    """The cell-level ridge prior of one training field, each stripe predicted by a ridge fitted on the other
    stripes' in-tissue pixels (strength: :class:`CellRidgePrior`'s default for one section)."""
    from .prior import CellRidgePrior, prior_design

    lam = CellRidgePrior().lams[len(CellRidgePrior().lams) // 2]
    X = prior_design(field)
    m = np.asarray(field.hr_mask, bool)
    up = np.asarray(field.lr_upsampled(3), np.float32)
    Y = np.asarray(field.hr, np.float32) - up
    out = np.empty((field.G,) + tuple(field.hr_shape), np.float32)
    for st in folds:
        rows = m & ~st
        if not rows.any():
            out[:, st] = up[:, st]
            continue
        params = CellRidgePrior._solve(X[:, rows].T.astype(np.float64), Y[:, rows].T.astype(np.float64), lam)
        out[:, st] = CellRidgePrior._apply(params, field, X)[:, st]
    return out


def _bases(sc: dict) -> str:
    """' (block copy for k genes)' when some genes fall back on the spots' block copy instead of the cubic."""
    k = sum(b == "block" for b in (sc.get("base") or []))
    return f" (block copy for {k})" if k else ""


def format_self_check(sc: dict | None, full_warning: bool = False) -> str:
    """A few lines for the CLI and the dock: the self-check's figures (:meth:`DiffST.self_check`), then whether
    the histology helps (``full_warning``: the whole warning sentence; the dock shows it as a notification)."""
    if not sc:
        return ""
    if "skipped" in sc:
        return f"Self-check: skipped ({sc['skipped']})"
    p, d = sc["pcc"], sc["detail_pcc"]

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    line = (f"Self-check, one level coarser ({sc['level']}): PCC method {f(p['method'])}, cubic {f(p['cubic'])}, "
            f"block copy {f(p['nearest'])}, kept {f(p['kept'])}, prior alone {f(p.get('prior'))}; detail-PCC method "
            f"{f(d['method'])}; detail kept "
            f"per gene {min(sc['beta']):.2f}–{max(sc['beta']):.2f}, {len(sc['fallback'])} of {len(sc['beta'])} "
            f"genes on the spots' upsampling alone{_bases(sc)}")
    if sc.get("warning"):
        line += f"\nWARNING: {sc['warning']}" if full_warning else "\nWARNING: the histology does not help on this section"
    return line
