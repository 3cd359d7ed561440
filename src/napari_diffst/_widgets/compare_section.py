"""Section 6 — Compare: Diff-ST vs baselines vs the LR input (vs the HR truth when known), side by side.

Baselines (:data:`napari_diffst.baselines.BASELINES`) are fitted on the training fields and run on the
field that was super-resolved, in a napari thread worker (:func:`.workers.compare_job`), which also scores
every method with :func:`napari_diffst.metrics.score_field` when the field has HR truth. One layer per
(gene, method), named as everywhere (``<gene> · <method>``, :func:`napari_diffst.layer_data.map_layer_name`), with
**one colormap and one contrast range per gene** shared by all methods; Diff-ST's is the Sample section's own
layer of that gene (its contrast range updated), and a layer of the same name from an earlier comparison is
replaced, so each (gene, method) exists once. "Side by side" is napari's grid mode (one camera for all cells = linked pan/zoom,
each cell labelled with its layer name), showing the chosen gene only; leaving it restores the layers'
visibility. The metrics table holds gene means of PCC, RMSE, SSIM and detail-PCC (per-gene values in the
tooltips and in the CSV). Export writes the maps (OME-Zarr / OME-TIFF / .h5ad, with the uncertainty for
Diff-ST) with :mod:`napari_diffst.io.writers` and the table as CSV."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QAbstractItemView, QComboBox, QFileDialog, QMessageBox, QHeaderView, QListWidget,
                            QListWidgetItem, QPushButton, QTableWidget, QTableWidgetItem)

from . import settings
from ._common import Section, narrow_combo, info_label, notify_error, notify_info, notify_warning, row as _row
from ..layer_data import find_map_layer, map_layer_name, overlay_colormap
from .sample_section import LayerQueue, gene_colormap
from .workers import (METRIC_COLUMNS, Job, JobRunner, compare_job, contrast_limits, masked_expression,
                      grid_shape, metrics_csv, metrics_rows, raster_layer_kwargs)

BASELINE_TEXT = {
    "nearest": "nearest (LR block copy)",
    "bicubic": "bicubic (edge-aware)",
    "tesla": "TESLA-style (colour-weighted)",
    "istar": "iStar-style (weak supervision)",
    "unet": "U-Net (supervised)",
    "histosge": "HisToSGE-style (spot regressor)",
}
FORMATS = (("ome-zarr", "OME-Zarr (.ome.zarr)", ".ome.zarr"), ("tiff", "OME-TIFF (.ome.tif)", ".ome.tif"),
           ("h5ad", "AnnData (.h5ad)", ".h5ad"), ("spatialdata", "SpatialData (.sdata.zarr)", ".sdata.zarr"))



def measured_on(field, train_names, report=None) -> str:
    """What the Compare table's numbers were measured on, in one or two sentences (issue 14: honest numbers):
    the section and its truth, whether the model saw that section in training, and the self-check one level
    coarser (a level the model did not see) when the Sample run made one."""
    name = getattr(field, "name", "?")
    mode = (getattr(field, "extra", None) or {}).get("mode")
    if getattr(field, "hr", None) is None:
        text = f"No HR truth on {name}: nothing to score at this resolution."
    else:
        truth = "its HR truth" if mode == "truth" else "its own spots (LR = blocks of spots)"
        seen = (" — the model was trained on this section, so the scores are optimistic"
                if name in set(train_names or ()) else " — a section the model did not see in training")
        text = f"Scored on {name}, against {truth}{seen}."
    sc = (report or {}).get("self_check") or {}
    p = sc.get("pcc") or {}
    if p:
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        text += (f"\nSelf-check ({sc.get('level', 'one level coarser')}): PCC Diff-ST {f(p.get('method'))}, "
                 f"cubic {f(p.get('cubic'))}, block copy {f(p.get('nearest'))}, kept {f(p.get('kept'))}.")
    return text


def _grid(viewer):
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


class CompareSection(Section):
    def __init__(self, viewer, state, parent=None):
        super().__init__("6 · Compare", viewer, state, parent)
        from ..baselines import BASELINES

        self.base_list = QListWidget()
        checked = settings.load("compare/baselines", "nearest,bicubic").split(",")
        for name in BASELINES:
            it = QListWidgetItem(BASELINE_TEXT.get(name, name))
            it.setData(Qt.UserRole, name)
            it.setFlags(it.flags() | Qt.ItemIsUserCheckable)
            it.setCheckState(Qt.Checked if name in checked else Qt.Unchecked)
            self.base_list.addItem(it)
        self.base_list.setMaximumHeight(5 * 20 + 6)
        self.add_row("Baselines", self.base_list)
        self.budget_combo = self.add_row("Baseline budget", QComboBox())
        self.budget_combo.addItems(["tiny", "quick", "full"])
        self.budget_combo.setCurrentText(settings.load("compare/budget", "quick"))
        self.run_btn = QPushButton("Compare")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.add_row(None, _row(self.run_btn, self.cancel_btn))
        self.gene_combo = narrow_combo(QComboBox(), 6)
        self.grid_btn = QPushButton("Side by side")
        self.grid_btn.setCheckable(True)
        self.grid_btn.setToolTip("napari grid mode: one cell per method, one camera (linked pan/zoom)")
        self.add_row("Gene", _row(self.gene_combo, self.grid_btn, stretch=0))
        self.scope = self.add_widget(info_label(""))  # what the table's numbers were measured on
        self.table = QTableWidget(0, 1 + len(METRIC_COLUMNS))
        self.table.setHorizontalHeaderLabels(["method"] + [t for _, t in METRIC_COLUMNS])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeToContents)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setMinimumHeight(60)
        self.add_row(None, self.table)
        self.export_method = narrow_combo(QComboBox(), 6)
        self.export_fmt = narrow_combo(QComboBox(), 6)
        for k, t, _ in FORMATS:
            self.export_fmt.addItem(t, k)
        self.export_btn = QPushButton("Export maps…")
        self.csv_btn = QPushButton("Table → CSV…")
        self.add_row("Export", _row(self.export_method, self.export_fmt, stretch=None))
        self.add_row(None, _row(self.export_btn, self.csv_btn))
        self.status = self.add_widget(info_label("Super-resolve in section 5 first."))

        self.runner: JobRunner | None = None
        self.preds: dict = {}
        self.scores: dict = {}
        self.field = None
        self.result = None
        self.layers: dict = {}      # (gene, method) -> layer (added per gene, when first shown)
        self._maps: dict = {}       # method -> (G, H, W) log1p CP10k, NaN outside tissue
        self._clim: dict = {}
        self._place: dict = {}
        self._saved_visibility = None
        self.queue = LayerQueue(viewer, self)
        #: replaced in tests: (title, suggested path, filter) -> path or ""
        self.ask_save_path = self._ask_save_path
        self.ask_replace = self._ask_replace  # tests replace these two with canned answers

        self.run_btn.clicked.connect(self.start)
        self.cancel_btn.clicked.connect(self.cancel)
        self.gene_combo.currentTextChanged.connect(self._on_gene)
        self.grid_btn.toggled.connect(self.set_grid)
        self.export_btn.clicked.connect(self.export_maps_dialog)
        self.csv_btn.clicked.connect(self.export_csv_dialog)
        self.budget_combo.currentTextChanged.connect(lambda t: settings.save("compare/budget", t))
        self.base_list.itemChanged.connect(lambda *_: settings.save("compare/baselines", ",".join(self.baselines())))
        state.results_changed.connect(self._on_results)
        state.busy_changed.connect(lambda *_: self._update_enabled())
        self._update_enabled()

    # -- options -------------------------------------------------------------------------------
    def baselines(self) -> list[str]:
        out = []
        for i in range(self.base_list.count()):
            it = self.base_list.item(i)
            if it.checkState() == Qt.Checked:
                out.append(it.data(Qt.UserRole))
        return out

    def set_baselines(self, names):
        for i in range(self.base_list.count()):
            it = self.base_list.item(i)
            it.setCheckState(Qt.Checked if it.data(Qt.UserRole) in names else Qt.Unchecked)

    def _on_results(self, results):
        self.result = results.get("Diff-ST")
        if self.result is not None:
            fld = self.result.field
            self.status.setText(f"Ready to compare on {fld.name} ({'with' if fld.hr is not None else 'no'} HR truth).")
        self._update_enabled()

    def _update_enabled(self):
        running = self.runner is not None and self.runner.running
        self.run_btn.setEnabled(self.result is not None and not self.state.busy and not running)
        self.cancel_btn.setEnabled(running)
        has = bool(self.preds)
        for w in (self.gene_combo, self.grid_btn, self.export_method, self.export_fmt, self.export_btn):
            w.setEnabled(has)
        self.csv_btn.setEnabled(bool(self.scores))

    # -- run -----------------------------------------------------------------------------------
    def start(self):
        if self.result is None or self.state.busy:
            return
        self.state.set_busy(True)
        self.queue.hold()
        self.status.setText("Fitting baselines…")
        job = Job("compare")
        train = self.state.train_fields or []
        names = self.baselines()
        if not [f for f in train if f.hr is not None] and any(n in ("tesla", "istar", "unet", "histosge") for n in names):
            notify_warning("No training fields in this session (checkpoint loaded from disk): learned baselines "
                           "fit on the compared field's own LR only.")
        gen = compare_job(job, self.result, names, train, budget=self.budget_combo.currentText())
        self.runner = JobRunner(self.viewer, job, gen, self._on_event, desc="napari-diffst: baselines",
                                total=max(1, len(names)), on_done=self._on_done)
        self._update_enabled()

    def cancel(self):
        if self.runner is not None and self.runner.running:
            self.runner.cancel()

    def _on_event(self, d):
        kind = d["kind"]
        if kind == "progress":
            self.status.setText(d["message"] + "…")
            self.runner.set_progress(d["done"], desc=f"napari-diffst: {d['message']}")
        elif kind == "result":
            self.preds, self.scores, self.field = d["preds"], d["scores"], d["field"]
            names = [f.name for f in (self.state.train_fields or [])]
            self.scope.setText(measured_on(self.field, names, getattr(self.result, "report", None)))
            self._fill_table()
            self._add_layers()
        elif kind == "cancelled":
            self.status.setText(d["message"])
        elif kind == "error":
            notify_error(d["message"])
            self.status.setText(d["message"])

    def _on_done(self):
        self.state.set_busy(False)
        self._update_enabled()
        self.queue.release()

    # -- table ---------------------------------------------------------------------------------
    def _fill_table(self):
        rows = metrics_rows(self.scores)
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            self.table.setItem(r, 0, QTableWidgetItem(row[0]))
            per = self.scores[row[0]].get("per_gene", {})
            for c, v in enumerate(row[1:], start=1):
                it = QTableWidgetItem("–" if not np.isfinite(v) else f"{v:.3f}")
                it.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                key = METRIC_COLUMNS[c - 1][0]
                if key in per:
                    it.setToolTip("\n".join(f"{g}: {x:.3f}" for g, x in zip(per["gene"], per[key])))
                self.table.setItem(r, c, it)
        self.table.resizeRowsToContents()
        self.table.setFixedHeight(self.table.horizontalHeader().height() + self.table.verticalHeader().length()
                                  + 2 * self.table.frameWidth() + 2)

    def table_values(self) -> dict:
        """{method: {column title: float}} as shown (for tests and scripts)."""
        out = {}
        for r in range(self.table.rowCount()):
            m = self.table.item(r, 0).text()
            out[m] = {}
            for c, (_, t) in enumerate(METRIC_COLUMNS, start=1):
                txt = self.table.item(r, c).text()
                out[m][t] = float("nan") if txt == "–" else float(txt)
        return out

    # -- layers --------------------------------------------------------------------------------
    def methods(self) -> list[str]:
        """Cell order (top-left first): truth, Diff-ST, baselines, LR."""
        out = (["truth"] if self.field is not None and self.field.hr is not None else [])
        return out + list(self.preds) + ["LR"]

    def _add_layers(self):
        """Prepare the maps of every gene; add the layers of the first gene (others on demand)."""
        fld = self.field
        genes = list(fld.genes)
        gs = fld.gene_scale
        maps = {m: masked_expression(p, gs, fld.hr_mask) for m, p in self.preds.items()}
        if fld.hr is not None:
            maps["truth"] = masked_expression(fld.hr, gs, fld.hr_mask)
        maps["LR"] = masked_expression(fld.lr, gs, fld.lr_mask)
        ref = maps.get("truth", maps["Diff-ST"])
        self._maps = maps
        self._clim = {g: contrast_limits(ref[i]) for i, g in enumerate(genes)}
        self._place = {"hr": raster_layer_kwargs(fld, "hr"), "lr": raster_layer_kwargs(fld, "lr")}
        self.layers = {}
        self._queue_gene(genes[0])
        order = self.methods()

        def finish():
            self.gene_combo.blockSignals(True)
            self.gene_combo.clear()
            self.gene_combo.addItems(genes)
            self.gene_combo.blockSignals(False)
            self.export_method.clear()
            self.export_method.addItems(list(self.preds))
            self._update_enabled()
            n = len(self.scores)
            self.status.setText(f"{len(order)} maps per gene ({', '.join(order)})"
                                + (f"; {n} methods scored against the HR truth." if n else
                                   "; no HR truth here, so no scores (use the benchmark target in section 5)."))
            if not self.grid_btn.isChecked():
                self.grid_btn.setChecked(True)
            else:
                self.set_grid(True)

        self.queue.on_empty = finish

    def _queue_gene(self, g):
        """Queue one layer per method for gene ``g`` (one colormap and contrast range for all of them)."""
        fld = self.field
        genes = list(fld.genes)
        gi = genes.index(g)
        cmap = gene_colormap(genes, g)
        # napari fills the grid cells in layer-list order (first layer → top-left cell)
        for m in self.methods():
            if (g, m) in self.layers:
                continue
            md = {"diffst_role": "compare", "gene": g, "genes": [g], "method": m, "units": "log1p(CP10k)",
                  "mask": fld.lr_mask if m == "LR" else fld.hr_mask}
            self.queue.put(self._adder((g, m), self._maps[m][gi], dict(
                name=map_layer_name(g, m), colormap=overlay_colormap(cmap), contrast_limits=self._clim[g],
                visible=False, metadata=md,
                units=("um", "um"), **self._place["lr" if m == "LR" else "hr"])))

    def ensure_gene_layers(self, g):
        """Add gene ``g``'s comparison layers now if they do not exist yet."""
        if not self.preds or g not in list(self.field.genes):
            return
        missing = [m for m in self.methods() if (g, m) not in self.layers]
        if missing:
            self._queue_gene(g)

    def _adder(self, key, data, kwargs):
        def add():
            layers = self.viewer.layers
            old = find_map_layer(layers, kwargs["name"])
            if (old is not None and key[1] == "Diff-ST" and old.metadata.get("diffst_role") == "sr"
                    and tuple(np.shape(old.data)) == tuple(np.shape(data))):
                # the Sample section's layer of this gene: reuse it, with the gene's shared contrast range,
                # on top of the list (napari fills the grid cells in layer-list order)
                ly = old
                ly.contrast_limits = kwargs["contrast_limits"]
                ly.metadata["method"] = "Diff-ST"
                layers.move(layers.index(ly), len(layers))
            else:
                if old is not None:  # from an earlier comparison (or another result): replaced
                    layers.remove(old)
                ly = self.viewer.add_image(data, **kwargs)
            try:  # the method's name in each grid cell
                ly.name_overlay.visible = True
                ly.name_overlay.font_size = 9
            except AttributeError:  # napari < 0.6
                pass
            self.layers[key] = ly
            return ly
        return add

    def fit_view(self):
        """Zoom so that one map fills its grid cell (hidden layers such as the H&E are ignored)."""
        shown = [ly for ly in self.layers.values() if ly in self.viewer.layers and ly.visible]
        try:
            self.viewer.reset_view(layers=shown or None, margin=0.08)
        except TypeError:  # napari < 0.6: no layers argument
            self.viewer.reset_view()

    def current_gene(self) -> str | None:
        return self.gene_combo.currentText() or None

    def _on_gene(self, *_):
        g = self.current_gene()
        if not g or not self.preds:
            return
        if any((g, m) not in self.layers for m in self.methods()):
            self._queue_gene(g)
            self.queue.on_empty = lambda: self._on_gene()
            return
        if self.grid_btn.isChecked():
            self._show_gene(g)
            self.fit_view()

    def _show_gene(self, gene):
        for (g, _m), ly in self.layers.items():
            if ly in self.viewer.layers:
                ly.visible = g == gene

    def set_grid(self, on: bool):
        """Enter/leave the side-by-side view (napari grid mode, one shared camera)."""
        grid = _grid(self.viewer)
        if on:
            if not self.layers:
                self.grid_btn.setChecked(False)
                return
            if self._saved_visibility is None:
                self._saved_visibility = {ly: ly.visible for ly in self.viewer.layers}
            mine = set(self.layers.values())
            for ly in self.viewer.layers:
                if ly not in mine:
                    ly.visible = False
            self._show_gene(self.current_gene())
            grid.spacing = 0.05
            try:  # as many columns as make the maps largest on this canvas
                h, w = self.field.hr_shape
                grid.shape = grid_shape(len(self.methods()), self.viewer.canvas.size, (h, w))
            except Exception:  # pragma: no cover - older napari: automatic shape
                pass
            grid.enabled = True
            self.fit_view()
        else:
            grid.enabled = False
            try:
                grid.shape = (-1, -1)
            except Exception:  # pragma: no cover
                pass
            saved, self._saved_visibility = self._saved_visibility, None
            for ly in self.viewer.layers:
                if saved is not None and ly in saved:
                    ly.visible = saved[ly]
                elif ly in set(self.layers.values()):
                    ly.visible = False
            self.viewer.reset_view()

    # -- export --------------------------------------------------------------------------------
    def _ask_save_path(self, title, suggested, filt):
        # the replace question is ours (_ask_replace): Qt's would miss .zarr folders and added extensions
        path, _ = QFileDialog.getSaveFileName(self, title, suggested, filt,
                                              options=QFileDialog.Option.DontConfirmOverwrite)
        return path

    def _ask_replace(self, path) -> bool:
        kind = "folder" if Path(path).is_dir() else "file"
        ans = QMessageBox.question(self, "Replace existing output?",
                                   f"{path} already exists (a {kind}).\nReplace it with the exported maps?",
                                   QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                   QMessageBox.StandardButton.No)
        return ans == QMessageBox.StandardButton.Yes

    def _say(self, line: str) -> None:
        notify_info(line)
        self.status.setText(line)

    def _may_write(self, path) -> bool:
        """False (and a notice) when ``path`` exists and the user does not want it replaced."""
        if not (Path(path).exists() or Path(path).is_symlink()) or self.ask_replace(path):
            return True
        notify_info(f"Not exported: {path} exists and was kept.")
        self.status.setText(f"Not exported: {path} exists and was kept.")
        return False

    def export_maps(self, path, fmt: str | None = "ome-zarr", method: str = "Diff-ST") -> Path:
        """Write one method's maps (log1p CP10k; Diff-ST with its uncertainty) in ``fmt`` (None: by the
        path's suffix, :func:`napari_diffst.io.writers.choose_format`); h5ad and SpatialData in the
        section's frame (:class:`napari_diffst.io.scverse.SectionFrame`)."""
        from ..data.grids import field_napari_affine
        from ..io import writers as W

        fld = self.field
        if method not in self.preds:
            raise ValueError(f"no maps for {method!r}")
        gs = np.asarray(fld.gene_scale, np.float32)[:, None, None]
        from ..data.grids import display_mask

        smp = self.state.sample
        mask = display_mask(smp, fld) if smp is not None and smp.name == fld.name else np.asarray(fld.hr_mask, bool)
        # NaN outside the tissue, as everywhere (0 means "no expression")
        from ..data.grids import shown_maps

        maps = shown_maps(self.preds[method] * gs, fld.hr_mask, mask)
        extra = {}
        if method == "Diff-ST" and self.result is not None:
            extra["uncertainty"] = shown_maps(self.result.std * gs, fld.hr_mask, mask)
        A = np.asarray(fld.extra.get("hr_affine", np.eye(3)), float)
        place = {"affine_um": field_napari_affine(fld, "hr")}
        md = {"napari_diffst": {"method": method, "section": fld.name, "scale": fld.scale, "hr_um": fld.hr_um,
                                "units": "log1p(CP10k)", "hr_affine_px": A.tolist(),
                                "um_per_px_fullres": fld.um_per_px,
                                "gene_scale": [float(x) for x in fld.gene_scale]}}
        if self.result is not None and method == "Diff-ST":
            md["napari_diffst"].update(steps=self.result.steps, n_samples=self.result.n_samples)
        from ..io.scverse import SectionFrame

        frame = SectionFrame.from_field(fld, self.state.sample)
        out = W.write_maps(path, maps, list(fld.genes), fmt=fmt, mask=mask, extra_channels=extra, metadata=md,
                           frame=frame, **place)
        return Path(out)

    def export_maps_dialog(self):
        if not self.preds:
            return
        fmt = self.export_fmt.currentData()
        ext = {k: e for k, _, e in FORMATS}[fmt]
        method = self.export_method.currentText() or "Diff-ST"
        start = Path(settings.load("export_dir", str(Path.home()))) / f"{self.field.name}_{method}{ext}"
        path = self.ask_save_path("Export maps", str(start), f"{self.export_fmt.currentText()};;All files (*)")
        if not path:
            return
        from ..io.writers import OUTPUT_FORMATS

        if not path.lower().endswith(OUTPUT_FORMATS[fmt]) and not (fmt == "spatialdata" and path.endswith(".zarr")):
            path += ext
        from ..io.safety import recover_temps

        # partial outputs of a killed earlier export to this path go (a folder it had moved aside comes back)
        recover_temps(path, log=self._say)
        if not self._may_write(path):
            return
        try:
            out = self.export_maps(path, fmt, method)
        except Exception as exc:
            notify_error(f"Export to {path} failed: {exc}. Choose another folder or format.")
            return
        settings.save("export_dir", str(Path(path).parent))
        notify_info(f"Wrote {out}")
        self.status.setText(f"Wrote {out}")

    def export_csv(self, path) -> Path:
        p = Path(path)
        p.write_text(metrics_csv(self.scores))
        return p

    def export_csv_dialog(self):
        if not self.scores:
            return
        start = Path(settings.load("export_dir", str(Path.home()))) / f"{self.field.name}_metrics.csv"
        path = self.ask_save_path("Export metrics table", str(start), "CSV (*.csv)")
        if not path:
            return
        path = path if path.endswith(".csv") else path + ".csv"
        if not self._may_write(path):
            return
        try:
            out = self.export_csv(path)
        except OSError as exc:
            notify_error(f"Cannot write {path}: {exc}. Choose another folder.")
            return
        settings.save("export_dir", str(Path(path).parent))
        notify_info(f"Wrote {out}")
        self.status.setText(f"Wrote {out}")
