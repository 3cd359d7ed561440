"""Section 5 — Sample: super-resolve the section with a checkpoint (respaced reverse steps, several samples).

Sampling runs in a napari thread worker (:func:`.workers.sample_job`). While it runs, a preview image
in the dock shows the network's current denoised estimate x̂₀ of the first gene (at most 4×/s; the worker
renders it as a small RGBA image, the main thread only wraps it in a pixmap; kept out of the canvas so
that the viewer never re-renders during the run). Events only store what they carry; the runner's UI timer
applies it (progress bar, preview, status) in one repaint per tick. The result is
added as image layers, one per gene (``<gene> · Diff-ST``, its own colormap, translucent or additive over
the H&E, contrast limits in log1p(CP10k), NaN = transparent outside the tissue) plus one uncertainty layer
per gene (``<gene> · Diff-ST σ``, the standard deviation over samples, hidden). Layers are added one per
event-loop turn so the viewer stays responsive; earlier results are never replaced (napari numbers
repeated names)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (QComboBox, QFileDialog, QLineEdit, QPushButton, QSpinBox,
                            QToolButton)

from . import settings
from ._common import (ImageView, Section, StatusText, notify_error, notify_warning, progress_bar,
                      row as _row, save_later, set_bar)
from ..layer_data import OVERLAY_OPACITY, find_map_layer, map_layer_name, overlay_colormap
from .workers import (GENE_COLORMAPS, Job, JobRunner, colormap_lut, format_eta, raster_layer_kwargs,
                      sample_job)

#: (key, short text shown in the box, the full explanation as its tooltip): short texts fit the dock's width
TARGETS = (("auto", "auto", "auto: against the HR truth where it is known (synthetic), else native"),
           ("native", "native (pitch / s)", "native: the observed spots are the input; output pixels are pitch / s"),
           ("degrade", "benchmark (s×s blocks)",
            "benchmark: s×s blocks of spots are the input, the spots themselves the truth (scores real data)"))
#: the live preview's size in the dock (px, longest side); larger maps are downsampled in the worker
PREVIEW_PX = 200



def format_report(rep: dict) -> str:
    """One line of the true-to-the-spots figures (:func:`napari_diffst.spot_consistency.spot_report`)."""
    def f(k, fmt="{:.3f}"):
        v = rep.get(k)
        return "n/a" if v is None else fmt.format(v)

    from ..method import format_self_check

    line = (f"True to the spots ({rep.get('n_spots', 0)}): PCC {f('spot_pcc')} (min {f('spot_pcc_min')}), "
            f"bias {f('spot_bias', '{:+.1%}')}, genes alike {f('alike_maps', '{:.2f}')} "
            f"(spots {f('alike_spots', '{:.2f}')}), lattice {f('lattice', '{:.2f}')}, "
            f"masked in spots {f('masked_in_spots', '{:.1%}')}")
    sc = format_self_check(rep.get("self_check"))
    return line + ("\n" + sc if sc else "")


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
        for i, (k, t, tip) in enumerate(TARGETS):
            self.target_combo.addItem(t, k)
            self.target_combo.setItemData(i, tip, Qt.ItemDataRole.ToolTipRole)
        self.target_combo.setToolTip("\n".join(tip for *_, tip in TARGETS))
        self.blend_combo = self.add_row("Blending", QComboBox())
        self.blend_combo.addItems(["translucent", "additive"])
        self.run_btn = QPushButton("Super-resolve")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.add_row(None, _row(self.run_btn, self.cancel_btn))
        self.progress = self.add_widget(progress_bar())
        self.preview = ImageView(PREVIEW_PX)  # shown from the click on: no relayout when previews arrive
        self.preview.setVisible(False)
        self.add_widget(self.preview)
        self.status = self.add_widget(StatusText("Train a model (section 4) or choose a checkpoint.", lines=2))
        #: after a native Sample: how true the maps are to the section's own spots (spot_consistency.spot_report)
        self.report_text = self.add_widget(StatusText("", lines=8))
        self.report_text.setToolTip(
            "True to the spots (native maps, no truth needed): each spot's disk averaged back in expression space "
            "vs the spot (PCC, mean relative bias; the maps are projected so that they match), how alike the "
            "genes' maps are vs the spots, the lattice imprint (|r| of a pixel's deviation from its cell mean with "
            "the distance to the spot centre) and the share of spot-disk area masked out.")

        self.runner: JobRunner | None = None
        self.result = None
        self.report = None
        self.field = None
        self.info = None
        self.mode = None
        self.n_previews = 0
        self.preview_image = None
        self._pending_preview = None   # (rgba, caption) for the next UI tick
        self._show_preview = False     # show the preview area at the next UI tick
        self._status_text = None       # text for the status label at the next UI tick
        self.result_layers: list = []
        self.queue = LayerQueue(viewer, self)
        self._t0, self._done0, self._outcome = None, 0, None  # ETA clock; how the last run ended

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
        save_later([("sample/checkpoint", ck)])  # a QSettings save writes and syncs a file: not in the click
        st.set_busy(True)
        self.queue.hold()
        self._show_preview = False
        self.n_previews = 0
        self._pending_preview = self._status_text = None
        self._t0, self._done0, self._outcome = None, 0, None
        self.status.setText("Loading the checkpoint…")
        self.preview.clear()  # (shown when the checkpoint is loaded: the dock's relayout is not in the click)
        self.preview.setText("x̂₀ preview of the first gene appears here")
        job = Job("sample")
        # the first gene's colormap (GENE_COLORMAPS[0]); its lookup table is made here, on the main thread
        gen = sample_job(job, Path(ck).expanduser(), st.sample, steps=self.steps_spin.value(),
                         n_samples=self.n_spin.value(), seed=self.seed_spin.value(),
                         mode=self.target_combo.currentData(), device=st.device,
                         preview_lut=colormap_lut(GENE_COLORMAPS[0]),
                         preview_px=PREVIEW_PX)
        self.runner = JobRunner(self.viewer, job, gen, self._on_event, desc="napari-diffst: super-resolving",
                                total=self.steps_spin.value() * self.n_spin.value(), on_done=self._on_done,
                                bar=self.progress, on_tick=self._refresh)
        self._update_enabled()

    def cancel(self):
        if self.runner is not None and self.runner.running:
            self.runner.cancel()
            self.status.setText("Cancelling…")

    def _refresh(self) -> None:
        """The runner's UI tick (4×/s and once at the end): preview and status, one repaint."""
        if self._show_preview and not self.preview.isVisible():
            self.preview.setVisible(True)
        if self._pending_preview is not None:
            rgba, caption = self._pending_preview
            self._pending_preview = None
            self._preview(rgba, caption)
        if self._status_text is not None:
            self.status.setText(self._status_text)
            self._status_text = None

    def _on_event(self, d):
        kind = d["kind"]
        if kind == "prepare":
            self._status_text = d["message"]
        elif kind == "ready":
            self.info, self.mode, fld = d["info"], d["mode"], d["field"]
            self.field = fld
            self._show_preview = True
            g = self.info["genes"]
            sel = self.state.genes
            warn = ""
            if sel and list(sel) != list(g):
                warn = " (the checkpoint's genes differ from section 3: the checkpoint's are used)"
            self._status_text = (f"{len(g)} genes ({', '.join(g[:4])}{'…' if len(g) > 4 else ''}) at "
                                 f"{self.info['scale']}× on {d['device']} — {self.mode}, HR {fld.hr_um:.3g} µm, "
                                 f"grid {fld.hr_shape[0]}×{fld.hr_shape[1]}{warn}"
                                 + (f"; {d['tiling']}" if d.get("tiling") and "tiled" in d["tiling"]
                                    and "untiled" not in d["tiling"] else ""))
        elif kind == "progress":
            now = time.perf_counter()
            if self._t0 is None:  # the first step's time includes start-up: the ETA counts from it
                self._t0, self._done0 = now, d["done"]
            eta = None
            if d["done"] > self._done0:
                eta = (now - self._t0) / (d["done"] - self._done0) * (d["total"] - d["done"])
            self.runner.set_progress(d["done"], total=d["total"],
                                     desc=(d.get("desc") or
                                           f"napari-diffst: sample {d['sample'] + 1}, step {d['done']}/{d['total']}")
                                          + f" · ETA {format_eta(eta)}")
            if "preview" in d:
                self._pending_preview = (d["preview"], f"(sample {d['sample'] + 1}, step {d['done']}/{d['total']})")
        elif kind == "result":
            self._outcome = "done"
            self._show_result(d["result"], d if "maps" in d else None)
        elif kind == "cancelled":
            self._outcome = "cancelled"
            self._status_text = d["message"] + "; no layers were added."
            self._pending_preview = None
            notify_warning(d["message"])
            self._remove_preview()
        elif kind == "error":
            self._outcome = "failed"
            notify_error(d["message"])
            self._status_text = d["message"]
            self._pending_preview = None
            self._remove_preview()

    def _preview(self, rgba: np.ndarray, caption: str = ""):
        """Show an RGBA preview (made by the worker, :func:`.workers.preview_rgba`) of the first gene's current
        denoised estimate in the dock: a QLabel pixmap, enlarged by a whole factor up to ``PREVIEW_PX``."""
        self.preview_image = rgba
        h, w = rgba.shape[:2]
        img = QImage(rgba.data, w, h, 4 * w, QImage.Format.Format_RGBA8888).copy()
        k = max(1, PREVIEW_PX // max(h, w))
        pm = QPixmap.fromImage(img)
        if k > 1:
            pm = pm.scaled(w * k, h * k, Qt.KeepAspectRatio, Qt.FastTransformation)
        self.preview.setPixmap(pm)
        g = self.info["genes"][0] if self.info else "the first gene"
        self.preview.setToolTip(f"denoised estimate x̂₀ of {g} {caption}")
        self.n_previews += 1

    def _remove_preview(self):
        self._show_preview = False
        self.preview.setVisible(False)

    def _show_report(self, rep: dict | None) -> None:
        self.report = rep
        self.report_text.setText(format_report(rep) if rep else "")
        warning = ((rep or {}).get("self_check") or {}).get("warning")
        if warning:  # histology does not help on this section: say so where the user looks
            notify_warning(f"Self-check: {warning}")

    def _show_result(self, res, data: dict | None = None):
        """Queue the result layers (added once the worker has finished). ``data``: the worker's
        :func:`.workers.result_layer_data` (masked maps and contrast limits; computed here without it)."""
        self.result = res
        fld = res.field
        genes = list(res.genes)
        self._show_report(getattr(res, "report", None))
        if data is None:
            from .workers import result_layer_data

            data = result_layer_data(res)
        mean, std = data["maps"], data["std_maps"]
        place = raster_layer_kwargs(fld, "hr")
        blend = self.blend_combo.currentText()
        self.result_layers = []
        ck = self.info.get("path") if self.info else None
        from ..io.scverse import SectionFrame

        frame = SectionFrame.from_field(fld, self.state.sample)   # File ▸ Save as .h5ad: the section's frame
        for i, g in enumerate(genes):
            cl = tuple(data["clims"][i])
            cmap = gene_colormap(genes, g)
            md = {"diffst_role": "sr", "gene": g, "genes": [g], "mask": data.get("mask", fld.hr_mask),
                  "units": "log1p(CP10k)",
                  "hr_um": fld.hr_um, "checkpoint": ck, "mode": self.mode, "steps": res.steps,
                  "n_samples": res.n_samples, "diffst_frame": frame,
                  "spot_report": getattr(res, "report", None)}
            self.queue.put(self._adder(mean[i], dict(name=map_layer_name(g), colormap=overlay_colormap(cmap),
                                                    contrast_limits=cl, blending=blend, opacity=OVERLAY_OPACITY,
                                                    visible=(i == 0), metadata=md,
                                                    units=("um", "um"), **place)))
            mdu = dict(md, diffst_role="sr_uncertainty")
            self.queue.put(self._adder(std[i], dict(name=map_layer_name(g, extra="uncertainty"), colormap=overlay_colormap(cmap),
                                                    contrast_limits=tuple(data["std_clims"][i]), blending=blend,
                                                    opacity=OVERLAY_OPACITY, visible=False, metadata=mdu,
                                                    units=("um", "um"),
                                                    **place)))

        def finish():
            self.state.field = fld
            self.state.set_results({"Diff-ST": res})
            self.status.setText(f"Added {len(genes)} gene layers + {len(genes)} uncertainty layers "
                                f"({res.n_samples} sample{'s' if res.n_samples != 1 else ''} × {res.steps} steps, "
                                f"HR {fld.hr_um:.3g} µm). "
                                "Toggle genes in the layer list; compare in section 6.")
            # no toast here: the status line says it, and a notification fading in over the canvas costs
            # 100–170 ms per window flush on software GL

        self.queue.on_empty = finish

    def _adder(self, data, kwargs):
        def add():
            # one layer per (gene, method): a new result replaces the layer of the same name, in its place
            old = find_map_layer(self.viewer.layers, kwargs["name"])
            at = None
            if old is not None:
                at = self.viewer.layers.index(old)
                self.viewer.layers.remove(old)
            ly = self.viewer.add_image(data, **kwargs)
            if at is not None:
                self.viewer.layers.move(self.viewer.layers.index(ly), at)
            self.result_layers.append(ly)
            return ly
        return add

    def _on_done(self):
        if self._outcome != "done":  # never leave "super-resolving" / a step count in the bar after a stop
            set_bar(self.progress, 0, 1, {"cancelled": "cancelled", "failed": "failed — see the message above"}
                    .get(self._outcome, "stopped"))
        self.state.set_busy(False)
        self._update_enabled()
        self.queue.release()  # add the result layers now that the worker has finished

    def layers_for(self, role: str = "sr"):
        return [ly for ly in self.result_layers if ly in self.viewer.layers and ly.metadata.get("diffst_role") == role]
