"""Section 5 — Sample: super-resolve the section with a checkpoint (respaced reverse steps, several samples).

Sampling runs in a napari thread worker (:func:`.workers.sample_job`). While it runs, a preview image
in the dock shows the network's current denoised estimate x̂₀ of the first gene (updated at most 4×/s;
kept out of the canvas so that the viewer never re-renders during the run). The result is
added as image layers, one per gene (``<gene> · Diff-ST``, its own colormap, translucent or additive over
the H&E, contrast limits in log1p(CP10k), NaN = transparent outside the tissue) plus one uncertainty layer
per gene (``<gene> · Diff-ST σ``, the standard deviation over samples, hidden). Layers are added one per
event-loop turn so the viewer stays responsive; earlier results are never replaced (napari numbers
repeated names)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (QComboBox, QFileDialog, QLabel, QLineEdit, QPushButton, QSpinBox,
                            QToolButton)

from . import settings
from ._common import Section, info_label, notify_error, notify_info, notify_warning, row as _row
from .workers import (GENE_COLORMAPS, Job, JobRunner, contrast_limits, masked_expression, raster_layer_kwargs,
                      sample_job)

TARGETS = (("auto", "auto (truth if known, else native)"), ("native", "native: spots → pitch / s"),
           ("degrade", "benchmark: s×s blocks → spots (truth = spots)"))
PREVIEW_PX = 200


def colormap_image(a: np.ndarray, cmap: str, clim) -> np.ndarray:
    """(H, W) values → (H, W, 4) uint8 RGBA with a napari colormap; NaN → transparent."""
    from napari.utils.colormaps import ensure_colormap

    lo, hi = float(clim[0]), float(clim[1])
    v = np.clip((np.nan_to_num(a, nan=lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    rgba = ensure_colormap(cmap).map(v.ravel()).reshape(*v.shape, 4)
    rgba[..., 3] = np.where(np.isfinite(a), 1.0, 0.0)
    return np.ascontiguousarray((rgba * 255).astype(np.uint8))



def gene_colormap(genes, gene) -> str:
    genes = list(genes)
    i = genes.index(gene) if gene in genes else 0
    return GENE_COLORMAPS[i % len(GENE_COLORMAPS)]


class LayerQueue:
    """Adds napari layers one per event-loop turn (a QTimer with 0 ms), so a batch of result layers never
    blocks the main thread for the sum of their creation times. ``on_empty`` runs after the last one."""

    def __init__(self, viewer, parent):
        self.viewer = viewer
        self.items: list = []
        self.added: list = []
        self.on_empty = None
        self.held = False
        self._timer = QTimer(parent)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._tick)

    def hold(self):
        """Queue without adding until :meth:`release` (a job's worker is still running)."""
        self.held = True

    def release(self):
        self.held = False
        if (self.items or self.on_empty is not None) and not self._timer.isActive():
            self._timer.start()

    def put(self, fn):
        """``fn()`` is called on the main thread later; it returns the layer it added (or None)."""
        self.items.append(fn)
        if not self.held and not self._timer.isActive():
            self._timer.start()

    def _tick(self):
        if not self.items:
            self._timer.stop()
            cb, self.on_empty = self.on_empty, None
            if cb is not None:
                cb()
            return
        fn = self.items.pop(0)
        ly = fn()
        if ly is not None:
            self.added.append(ly)

    @property
    def busy(self) -> bool:
        return bool(self.items) or self._timer.isActive() or (self.held and self.on_empty is not None)


class SampleSection(Section):
    def __init__(self, viewer, state, parent=None):
        super().__init__("5 · Sample", viewer, state, parent)
        self.ckpt_edit = QLineEdit(settings.load("sample/checkpoint", ""))
        self.ckpt_edit.setPlaceholderText("checkpoint folder (set by Train)")
        self.ckpt_btn = QToolButton()
        self.ckpt_btn.setText("…")
        self.add_row("Checkpoint", _row(self.ckpt_edit, self.ckpt_btn, stretch=0))
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1000)
        self.steps_spin.setValue(settings.load("sample/steps", 50, int))
        self.steps_spin.setToolTip("Reverse diffusion steps (the schedule is respaced to this many)")
        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 64)
        self.n_spin.setValue(settings.load("sample/n_samples", 4, int))
        self.n_spin.setToolTip("Samples averaged into the map; their spread is the uncertainty layer")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setValue(settings.load("sample/seed", 0, int))
        self.add_row("Steps / samples", _row(self.steps_spin, self.n_spin, stretch=None))
        self.add_row("Seed", self.seed_spin)
        self.target_combo = self.add_row("Target", QComboBox())
        for k, t in TARGETS:
            self.target_combo.addItem(t, k)
        self.blend_combo = self.add_row("Blending", QComboBox())
        self.blend_combo.addItems(["translucent", "additive"])
        self.run_btn = QPushButton("Super-resolve")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.add_row(None, _row(self.run_btn, self.cancel_btn))
        self.preview = QLabel()
        self.preview.setAlignment(Qt.AlignCenter)
        self.preview.setVisible(False)
        self.add_widget(self.preview)
        self.status = self.add_widget(info_label("Train a model (section 4) or choose a checkpoint."))

        self.runner: JobRunner | None = None
        self.result = None
        self.field = None
        self.info = None
        self.mode = None
        self.n_previews = 0
        self.preview_image = None
        self.result_layers: list = []
        self.queue = LayerQueue(viewer, self)

        self.ckpt_btn.clicked.connect(self._choose_ckpt)
        self.ckpt_edit.textChanged.connect(lambda *_: self._update_enabled())
        self.steps_spin.valueChanged.connect(lambda v: settings.save("sample/steps", int(v)))
        self.n_spin.valueChanged.connect(lambda v: settings.save("sample/n_samples", int(v)))
        self.seed_spin.valueChanged.connect(lambda v: settings.save("sample/seed", int(v)))
        self.blend_combo.currentTextChanged.connect(self._set_blending)
        self.run_btn.clicked.connect(self.start)
        self.cancel_btn.clicked.connect(self.cancel)
        state.checkpoint_changed.connect(self._on_checkpoint)
        for sig in (state.sample_changed, state.busy_changed):
            sig.connect(lambda *_: self._update_enabled())
        self._update_enabled()

    # -- options -------------------------------------------------------------------------------
    def _on_checkpoint(self, path):
        self.ckpt_edit.setText(str(path))

    def _choose_ckpt(self):
        start = self.ckpt_edit.text() or settings.load("train/ckpt_parent", str(Path.home()))
        d = QFileDialog.getExistingDirectory(self, "Checkpoint folder", start)
        if d:
            self.ckpt_edit.setText(d)

    def _update_enabled(self):
        running = self.runner is not None and self.runner.running
        ok = self.state.sample is not None and bool(self.ckpt_edit.text().strip())
        self.run_btn.setEnabled(ok and not self.state.busy and not running)
        self.cancel_btn.setEnabled(running)

    def _set_blending(self, mode):
        for ly in self.result_layers:
            if ly in self.viewer.layers:
                ly.blending = mode

    # -- run -----------------------------------------------------------------------------------
    def start(self):
        st = self.state
        ck = self.ckpt_edit.text().strip()
        if st.sample is None or not ck or st.busy:
            return
        if not Path(ck).expanduser().exists():
            notify_error(f"Checkpoint {ck} not found. Train a model in section 4 or choose a checkpoint folder.")
            return
        settings.save("sample/checkpoint", ck)
        st.set_busy(True)
        self.queue.hold()
        self.n_previews = 0
        self.status.setText("Loading the checkpoint…")
        job = Job("sample")
        gen = sample_job(job, Path(ck).expanduser(), st.sample, steps=self.steps_spin.value(),
                         n_samples=self.n_spin.value(), seed=self.seed_spin.value(),
                         mode=self.target_combo.currentData())
        self.runner = JobRunner(self.viewer, job, gen, self._on_event, desc="napari-diffst: super-resolving",
                                total=self.steps_spin.value() * self.n_spin.value(), on_done=self._on_done)
        self._update_enabled()

    def cancel(self):
        if self.runner is not None and self.runner.running:
            self.runner.cancel()
            self.status.setText("Cancelling…")

    def _on_event(self, d):
        kind = d["kind"]
        if kind == "prepare":
            self.status.setText(d["message"])
        elif kind == "ready":
            self.info, self.mode, fld = d["info"], d["mode"], d["field"]
            self.field = fld
            g = self.info["genes"]
            sel = self.state.genes
            warn = ""
            if sel and list(sel) != list(g):
                warn = " (the checkpoint's genes differ from section 3: the checkpoint's are used)"
            self.status.setText(f"{len(g)} genes ({', '.join(g[:4])}{'…' if len(g) > 4 else ''}) at "
                                f"{self.info['scale']}× on {d['device']} — {self.mode}, HR {fld.hr_um:.3g} µm, "
                                f"grid {fld.hr_shape[0]}×{fld.hr_shape[1]}{warn}")
        elif kind == "progress":
            self.runner.set_progress(d["done"], total=d["total"],
                                     desc=f"napari-diffst: sample {d['sample'] + 1}, step {d['done']}/{d['total']}")
            if "x0_pred" in d:
                self._preview(d["x0_pred"], f"(sample {d['sample'] + 1}, step {d['done']}/{d['total']})")
        elif kind == "result":
            self._show_result(d["result"])
        elif kind == "cancelled":
            self.status.setText(d["message"] + "; no layers were added.")
            notify_warning(d["message"])
            self._remove_preview()
        elif kind == "error":
            notify_error(d["message"])
            self.status.setText(d["message"])
            self._remove_preview()

    def _preview(self, x0, caption: str = ""):
        """Show the current denoised estimate of the first gene in the dock (cheap: a QLabel pixmap)."""
        fld = self.field
        a = masked_expression(x0[:1], fld.gene_scale[:1], fld.hr_mask)[0]
        g = self.info["genes"][0]
        rgba = colormap_image(a, gene_colormap(self.info["genes"], g), contrast_limits(a))
        self.preview_image = rgba
        h, w = rgba.shape[:2]
        img = QImage(rgba.data, w, h, 4 * w, QImage.Format.Format_RGBA8888).copy()
        k = max(1, PREVIEW_PX // max(h, w))
        pm = QPixmap.fromImage(img).scaled(w * k, h * k, Qt.KeepAspectRatio, Qt.FastTransformation)
        self.preview.setPixmap(pm)
        self.preview.setToolTip(f"denoised estimate x̂₀ of {g} {caption}")
        self.preview.setVisible(True)
        self.n_previews += 1

    def _remove_preview(self):
        self.preview.setVisible(False)

    def _show_result(self, res):
        self.result = res
        fld = res.field
        genes = list(res.genes)
        mean = masked_expression(res.mean, fld.gene_scale, fld.hr_mask)
        std = masked_expression(res.std, fld.gene_scale, fld.hr_mask)
        place = raster_layer_kwargs(fld, "hr")
        blend = self.blend_combo.currentText()
        self.result_layers = []
        ck = self.info.get("path") if self.info else None
        for i, g in enumerate(genes):
            cl = contrast_limits(mean[i])
            cmap = gene_colormap(genes, g)
            md = {"diffst_role": "sr", "gene": g, "genes": [g], "mask": fld.hr_mask, "units": "log1p(CP10k)",
                  "hr_um": fld.hr_um, "checkpoint": ck, "mode": self.mode, "steps": res.steps,
                  "n_samples": res.n_samples}
            self.queue.put(self._adder(mean[i], dict(name=f"{g} · Diff-ST", colormap=cmap, contrast_limits=cl,
                                                    blending=blend, opacity=0.75, visible=(i == 0), metadata=md,
                                                    units=("um", "um"), **place)))
            mdu = dict(md, diffst_role="sr_uncertainty")
            self.queue.put(self._adder(std[i], dict(name=f"{g} · Diff-ST σ", colormap=cmap,
                                                    contrast_limits=contrast_limits(std[i]), blending=blend,
                                                    opacity=0.75, visible=False, metadata=mdu, units=("um", "um"),
                                                    **place)))

        def finish():
            self.state.field = fld
            self.state.set_results({"Diff-ST": res})
            self.status.setText(f"Added {len(genes)} gene layers + {len(genes)} uncertainty layers "
                                f"({res.n_samples} sample{'s' if res.n_samples != 1 else ''} × {res.steps} steps, "
                                f"HR {fld.hr_um:.3g} µm). "
                                "Toggle genes in the layer list; compare in section 6.")
            notify_info(f"Super-resolved {len(genes)} genes of {fld.name}")

        self.queue.on_empty = finish

    def _adder(self, data, kwargs):
        def add():
            ly = self.viewer.add_image(data, **kwargs)
            self.result_layers.append(ly)
            return ly
        return add

    def _on_done(self):
        self.state.set_busy(False)
        self._update_enabled()
        self.queue.release()  # add the result layers now that the worker has finished

    def layers_for(self, role: str = "sr"):
        return [ly for ly in self.result_layers if ly in self.viewer.layers and ly.metadata.get("diffst_role") == role]
