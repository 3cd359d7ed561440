"""Section 7 — Domains: cluster super-resolved gene maps into spatial domains (:mod:`napari_diffst.domains`).

Source: the latest super-resolved result (section 5; its field gives the tissue mask, the LR spots and the
H&E) or any image layer holding a (genes, H, W) stack. "Compute domains" runs in a napari thread worker
(:func:`domains_job`): domains of the SR maps, the same procedure on the LR spots, and their agreement (ARI,
NMI over in-tissue HR pixels, LR labels upsampled by nearest). The result is a napari Labels layer placed
exactly like the SR maps (same scale / translate / rotate / shear, so it sits over the H&E), a legend (colour,
share of the tissue, top marker genes by mean z-score) and, on "Export to AnnData", ``obs['diffst_domain']``
(each spot's majority SR domain, categorical) plus the label map in ``uns['diffst_domain']`` of the sample's
AnnData; the spots layer gets the column as a feature too."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QDoubleSpinBox, QHeaderView, QPushButton,
                            QSpinBox, QTableWidget, QTableWidgetItem)

from . import settings
from ._common import Section, info_label, notify_error, notify_info, notify_warning, row as _row
from .workers import Job, JobRunner, _guard, raster_layer_kwargs

RESULT_SOURCE = "__latest_result__"
OBS_KEY = "diffst_domain"


# --------------------------------------------------------------------------------------------- Qt-free
def domains_job(job: Job, maps: np.ndarray, mask: np.ndarray | None, field, k: int, *,
                include_histology: bool = False, smooth_lr_px: float = 0.5, seed: int = 0,
                genes=None) -> Iterator[dict]:
    """Domains of ``maps`` (G, H, W) and, when ``field`` is the maps' field (same HR grid), of its LR spots
    by the same procedure, with their agreement.

    Yields ``progress`` → ``result`` with ``sr`` / ``lr`` (:class:`~napari_diffst.domains.DomainResult`,
    ``lr`` None without a field), ``agree`` (``{'ari', 'nmi', 'n_pixels'}`` or None) and ``legend``."""

    def body():
        from .. import domains as D

        on_field = field is not None and tuple(maps.shape[1:]) == tuple(field.hr_shape)
        yield {"kind": "progress", "done": 0, "total": 2, "message": f"clustering the SR maps into {k} domains"}
        if on_field:
            sr = D.sr_domains(field, maps, k, include_histology=include_histology, smooth_lr_px=smooth_lr_px,
                              seed=seed)
        else:
            if include_histology:
                raise ValueError("histology features need the SR result's field; this layer has none "
                                 "(untick 'Include histology')")
            sr = D.compute_domains(maps, mask, k, smooth_sigma=float(smooth_lr_px), seed=seed)
        if job.cancelled:
            yield {"kind": "cancelled", "message": "domains cancelled"}
            return
        lr = agree = None
        if on_field:
            yield {"kind": "progress", "done": 1, "total": 2, "message": "clustering the LR spots"}
            lr = D.lr_domains(field, k, include_histology=include_histology, smooth_lr_px=smooth_lr_px, seed=seed)
            agree = D.compare_domains(sr.labels, lr.labels, field.scale)
        names = list(genes) if genes is not None else (list(field.genes) if on_field else
                                                       [f"channel {i}" for i in range(maps.shape[0])])
        legend = D.domain_legend(sr.labels, maps, names, k=sr.k)
        yield {"kind": "result", "sr": sr, "lr": lr, "agree": agree, "legend": legend}

    return _guard(job, "domain clustering", body())


def layer_place_2d(layer) -> dict:
    """scale / translate / rotate / shear / affine of the last two (displayed) axes of an image layer."""
    n = int(layer.ndim)
    rot = np.asarray(layer.rotate, float)[-2:, -2:]
    sh = np.asarray(layer.shear, float)
    shear = sh[-1:] if n > 2 else sh
    A = np.asarray(layer.affine.affine_matrix, float)
    aff = np.eye(3)
    aff[:2, :2] = A[-3:-1, -3:-1]
    aff[:2, 2] = A[-3:-1, -1]
    return {"scale": tuple(float(v) for v in layer.scale[-2:]), "translate": tuple(float(v) for v in layer.translate[-2:]),
            "rotate": rot, "shear": shear, "affine": aff}


def label_colormap(k: int):
    """napari colormap: 0 transparent, domain d the legend's colour."""
    from napari.utils.colormaps import DirectLabelColormap

    from ..domains import domain_colours

    cd = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for d, c in enumerate(domain_colours(k), start=1):
        cd[d] = c
    return DirectLabelColormap(color_dict=cd)


# --------------------------------------------------------------------------------------------- widget
class DomainsSection(Section):
    def __init__(self, viewer, state, parent=None):
        super().__init__("7 · Domains", viewer, state, parent)
        self.source_combo = self.add_row("Source", QComboBox())
        self.source_combo.setToolTip("The latest super-resolved result (section 5) or an image layer holding a "
                                     "(genes, H, W) stack")
        self.k_spin = QSpinBox()
        self.k_spin.setRange(2, 20)
        self.k_spin.setValue(settings.load("domains/k", 6, int))
        self.k_spin.setToolTip("Number of domains (k-means)")
        self.smooth_spin = QDoubleSpinBox()
        self.smooth_spin.setRange(0.0, 5.0)
        self.smooth_spin.setSingleStep(0.25)
        self.smooth_spin.setDecimals(2)
        self.smooth_spin.setValue(settings.load("domains/smooth", 0.5, float))
        self.smooth_spin.setToolTip("Gaussian smoothing of the embedding, σ in LR spot pitches (0 = none; for a "
                                    "layer without a field: in its pixels)")
        self.add_row("Domains k / smoothing", _row(self.k_spin, self.smooth_spin, stretch=None))
        self.hist_check = self.add_row(None, QCheckBox("Include histology features"))
        self.hist_check.setChecked(settings.load("domains/histology", 0, int) == 1)
        self.hist_check.setToolTip("Append handcrafted H&E features (colour, stain densities, texture, with "
                                   "context) to the genes before clustering")
        self.run_btn = QPushButton("Compute domains")
        self.export_btn = QPushButton("Export to AnnData")
        self.export_btn.setToolTip(f"Write each spot's majority domain into obs['{OBS_KEY}'] (and the pixel map into "
                                   f"uns['{OBS_KEY}']) of the sample's AnnData")
        self.add_row(None, _row(self.run_btn, self.export_btn))
        self.legend = QTableWidget(0, 3)
        self.legend.setHorizontalHeaderLabels(["", "domain · tissue", "top genes (mean z)"])
        self.legend.verticalHeader().setVisible(False)
        hh = self.legend.horizontalHeader()
        hh.setSectionResizeMode(0, QHeaderView.Fixed)
        hh.setSectionResizeMode(1, QHeaderView.ResizeToContents)
        hh.setSectionResizeMode(2, QHeaderView.Stretch)
        self.legend.setColumnWidth(0, 18)
        self.legend.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.legend.setSelectionMode(QAbstractItemView.NoSelection)
        self.legend.setVisible(False)
        self.add_row(None, self.legend)
        self.agree_label = self.add_widget(info_label(""))
        self.status = self.add_widget(info_label("Super-resolve in section 5 (or add a gene-stack image layer), "
                                                 "then compute domains."))

        self.runner: JobRunner | None = None
        self.result: dict | None = None     # last job result + what it was computed on
        self.layer = None                   # the Labels layer of the last result
        self._pending = None

        self.run_btn.clicked.connect(self.start)
        self.export_btn.clicked.connect(self.export_anndata)
        self.k_spin.valueChanged.connect(lambda v: settings.save("domains/k", int(v)))
        self.smooth_spin.valueChanged.connect(lambda v: settings.save("domains/smooth", float(v)))
        self.hist_check.toggled.connect(lambda b: settings.save("domains/histology", int(bool(b))))
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed):
            ev.connect(self._refresh_sources)
        state.results_changed.connect(self._refresh_sources)
        state.busy_changed.connect(lambda *_: self._update_enabled())
        self._refresh_sources()

    # -- sources ----------------------------------------------------------------------------------
    def _stack_layers(self):
        from napari.layers import Image

        return [ly for ly in self.viewer.layers if isinstance(ly, Image) and not ly.rgb and ly.ndim == 3
                and not ly.multiscale]

    def _refresh_sources(self, *_):
        cur = self.source_combo.currentData()
        self.source_combo.blockSignals(True)
        self.source_combo.clear()
        res = self.state.results.get("Diff-ST") if self.state.results else None
        if res is not None:
            self.source_combo.addItem(f"latest SR result ({res.field.name}, {len(res.genes)} genes)", RESULT_SOURCE)
        for ly in self._stack_layers():
            self.source_combo.addItem(f"layer: {ly.name}", ly.name)
        i = self.source_combo.findData(cur)
        if i >= 0:
            self.source_combo.setCurrentIndex(i)
        self.source_combo.blockSignals(False)
        self._update_enabled()

    def set_source(self, key: str) -> None:
        """Choose the source by key: ``RESULT_SOURCE`` or an image layer's name."""
        i = self.source_combo.findData(key)
        if i < 0:
            raise ValueError(f"no source {key!r}")
        self.source_combo.setCurrentIndex(i)

    def _source(self):
        """(maps (G,H,W) model units or layer values, mask, field or None, placement kwargs, genes, label)."""
        key = self.source_combo.currentData()
        if key == RESULT_SOURCE:
            res = self.state.results.get("Diff-ST")
            if res is None:
                raise ValueError("no super-resolved result yet: run section 5 first")
            fld = res.field
            return (np.asarray(res.mean, np.float32), np.asarray(fld.hr_mask, bool), fld,
                    raster_layer_kwargs(fld, "hr"), list(res.genes), f"{fld.name} SR")
        if key and key in self.viewer.layers:
            ly = self.viewer.layers[key]
            data = np.asarray(ly.data, np.float32)
            mask = np.all(np.isfinite(data), axis=0) & np.any(np.nan_to_num(data) != 0, axis=0)
            fld = self.state.field
            res = self.state.results.get("Diff-ST") if self.state.results else None
            if fld is None and res is not None:
                fld = res.field
            if fld is not None and tuple(fld.hr_shape) != data.shape[1:]:
                fld = None
            genes = ly.metadata.get("genes") if isinstance(ly.metadata.get("genes"), (list, tuple)) else None
            if genes is not None and len(genes) != data.shape[0]:
                genes = None
            if fld is not None:
                mask &= np.asarray(fld.hr_mask, bool)
                if genes is None and len(fld.genes) == data.shape[0]:
                    genes = list(fld.genes)
            return data, mask, fld, layer_place_2d(ly), genes, ly.name
        raise ValueError("choose a source: the latest SR result or a (genes, H, W) image layer")

    def _update_enabled(self):
        running = self.runner is not None and self.runner.running
        self.run_btn.setEnabled(self.source_combo.count() > 0 and not self.state.busy and not running)
        ok = (self.result is not None and self.result.get("field") is not None and self.state.sample is not None
              and not running)
        self.export_btn.setEnabled(bool(ok))

    # -- run --------------------------------------------------------------------------------------
    def start(self):
        if self.state.busy or (self.runner is not None and self.runner.running):
            return
        try:
            maps, mask, fld, place, genes, label = self._source()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_error(exc)
            return
        k = int(self.k_spin.value())
        hist = self.hist_check.isChecked()
        smooth = float(self.smooth_spin.value())
        if hist and fld is None:
            notify_warning("Histology features need the SR result's field; this layer has none, so they are left out.")
            hist = False
        self.state.set_busy(True)
        self._pending = {"field": fld, "place": place, "maps": maps, "genes": genes, "label": label, "k": k,
                         "histology": hist, "smooth": smooth}
        self.status.setText(f"Computing {k} domains of {label}…")
        job = Job("domains")
        gen = domains_job(job, maps, mask, fld, k, include_histology=hist, smooth_lr_px=smooth, genes=genes)
        self.runner = JobRunner(self.viewer, job, gen, self._on_event, desc="napari-diffst: domains", total=2,
                                on_done=self._on_done)
        self._update_enabled()

    def _on_event(self, d):
        kind = d["kind"]
        if kind == "progress":
            self.status.setText(d["message"] + "…")
            self.runner.set_progress(d["done"], total=d["total"], desc=f"napari-diffst: {d['message']}")
        elif kind == "result":
            self._pending.update(sr=d["sr"], lr=d["lr"], agree=d["agree"], legend=d["legend"])
        elif kind == "cancelled":
            self.status.setText(d["message"])
            self._pending = None
        elif kind == "error":
            notify_error(d["message"])
            self.status.setText(d["message"])
            self._pending = None

    def _on_done(self):
        self.state.set_busy(False)
        pend, self._pending = self._pending, None
        if pend is not None and "sr" in pend:
            self._show(pend)
        self._update_enabled()

    # -- result -----------------------------------------------------------------------------------
    def _show(self, r: dict):
        import pandas as pd

        sr, k = r["sr"], r["sr"].k
        legend = r["legend"]
        md = {"diffst_role": "domains", "k": k, "source": r["label"], "histology": r["histology"],
              "agree": r["agree"], "legend": legend}
        feats = pd.DataFrame({"index": np.arange(k + 1),
                              "domain": ["none"] + [str(e["domain"]) for e in legend],
                              "top_genes": [""] + [", ".join(g for g, _ in e["top_genes"]) for e in legend]})
        self.layer = self.viewer.add_labels(sr.labels, name=f"domains k={k} · {r['label']}",
                                            colormap=label_colormap(k), opacity=0.6, metadata=md, features=feats,
                                            units=("um", "um"), **r["place"])
        self.result = r
        self._fill_legend(legend)
        a = r["agree"]
        if a is not None:
            self.agree_label.setText(f"vs LR-spot domains (same procedure, k={k}): <b>ARI {a['ari']:.3f}</b> · "
                                     f"<b>NMI {a['nmi']:.3f}</b> over {a['n_pixels']} tissue pixels")
        else:
            self.agree_label.setText("No LR spots for this source (not on the SR result's grid): no ARI/NMI.")
        self.status.setText(f"Added '{self.layer.name}' ({k} domains"
                            + (", genes + histology" if r["histology"] else "") + ")."
                            + (" Export writes obs['diffst_domain']." if r["field"] is not None else ""))

    def _fill_legend(self, legend):
        self.legend.setRowCount(len(legend))
        for i, e in enumerate(legend):
            sw = QTableWidgetItem("")
            sw.setBackground(QColor(e["colour"]))
            sw.setData(Qt.UserRole, e["colour"])
            self.legend.setItem(i, 0, sw)
            self.legend.setItem(i, 1, QTableWidgetItem(f"{e['domain']} · {100 * e['fraction']:.0f} %"))
            top = QTableWidgetItem(", ".join(g for g, _ in e["top_genes"]) or "–")
            top.setToolTip("\n".join(f"{g}: mean z {z:+.2f}" for g, z in e["top_genes"]))
            self.legend.setItem(i, 2, top)
        self.legend.resizeRowsToContents()
        self.legend.setFixedHeight(self.legend.horizontalHeader().height() + self.legend.verticalHeader().length()
                                   + 2 * self.legend.frameWidth() + 2)
        self.legend.setVisible(True)

    def legend_rows(self) -> list[tuple[str, str, str]]:
        """(colour hex, domain text, top genes) per legend row, as shown (for tests and scripts)."""
        return [(self.legend.item(i, 0).data(Qt.UserRole), self.legend.item(i, 1).text(),
                 self.legend.item(i, 2).text()) for i in range(self.legend.rowCount())]

    # -- export -----------------------------------------------------------------------------------
    def export_anndata(self):
        from ..domains import domains_to_anndata
        from .state import unwrap

        r = self.result
        if r is None or r.get("field") is None:
            notify_warning("Compute domains on the super-resolved result first (a layer without a field has no spots).")
            return
        smp = unwrap(self.state.sample)
        fld = r["field"]
        if smp is None or smp.name != fld.name:
            notify_error(f"The domains belong to {fld.name}, but the chosen sample is "
                         f"{getattr(smp, 'name', 'none')}: choose {fld.name}'s ST layer in section 1.")
            return
        info = {"source": r["label"], "histology": bool(r["histology"]), "smooth_lr_px": float(r["smooth"])}
        if r.get("agree"):
            info.update(ari_vs_lr=float(r["agree"]["ari"]), nmi_vs_lr=float(r["agree"]["nmi"]))
        lr = r["lr"].labels if r.get("lr") is not None else None
        try:
            domains_to_anndata(smp.adata, r["sr"].labels, fld, key=OBS_KEY, legend=r["legend"], lr_labels=lr, info=info)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_error(f"Export to AnnData failed: {exc}")
            return
        col = smp.adata.obs[OBS_KEY]
        self._add_spot_feature(col)
        n = int(col.notna().sum())
        msg = (f"Wrote obs['{OBS_KEY}'] ({n} spots in {r['sr'].k} domains) and uns['{OBS_KEY}'] into "
               f"{smp.name}'s AnnData")
        self.status.setText(msg + ".")
        notify_info(msg)

    def _add_spot_feature(self, col):
        """Add the domain column to the spots layer's features (colour the spots by it in the layer controls)."""
        ly = self.state.spots_layer
        try:
            if ly is None or ly not in self.viewer.layers or len(ly.features) != len(col):
                return
            f = ly.features.copy()
            f[OBS_KEY] = np.asarray(col.astype(str).where(col.notna(), "none"))
            ly.features = f
        except Exception:  # noqa: BLE001 - cosmetic; the AnnData column is what matters
            pass
