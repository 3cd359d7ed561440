"""Section 3 — Genes & scale: a searchable, ranked gene list (HVG or spatially variable), multi-select by
check box, and the super-resolution factor with the resulting HR pixel size.

Ranking comes from :func:`napari_diffst.data.genes.gene_scores` on the section (in-tissue spots):
``hvg`` = Seurat normalised dispersion, ``moran`` = Moran's I on the spot lattice graph. Genes detected in
fewer than half of the spots are listed last (greyed). Typed names are resolved with
:func:`napari_diffst.data.genes.resolve_genes`; an unknown name becomes a notification with near matches."""
from __future__ import annotations

import numpy as np
from qtpy.QtCore import QSortFilterProxyModel, Qt
from qtpy.QtGui import QBrush, QColor, QStandardItem, QStandardItemModel
from qtpy.QtWidgets import QComboBox, QLabel, QLineEdit, QListView, QPushButton, QSpinBox

from . import settings
from ._common import Section, info_label, notify_error, row

RANKINGS = (("hvg", "highly variable (HVG)"), ("moran", "spatially variable (Moran's I)"))
GENE_ROLE = Qt.UserRole + 1


class GenesSection(Section):
    def __init__(self, viewer, state, parent=None):
        super().__init__("3 · Genes && scale", viewer, state, parent)
        self.rank_combo = self.add_row("Rank by", QComboBox())
        for key, text in RANKINGS:
            self.rank_combo.addItem(text, key)
        k = settings.load("genes/ranking", "hvg")
        self.rank_combo.setCurrentIndex(max(0, [r[0] for r in RANKINGS].index(k) if k in dict(RANKINGS) else 0))
        self.search = QLineEdit()
        self.search.setPlaceholderText("search genes…")
        self.search.setClearButtonEnabled(True)
        self.add_row("Search", self.search)
        self.model = QStandardItemModel(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setFilterCaseSensitivity(Qt.CaseInsensitive)
        self.proxy.setFilterRole(GENE_ROLE)
        self.list = QListView()
        self.list.setModel(self.proxy)
        self.list.setUniformItemSizes(True)
        self.list.setMinimumHeight(140)
        self.list.setMaximumHeight(180)
        self.add_row(None, self.list)
        self.top_spin = QSpinBox()
        self.top_spin.setRange(1, 200)
        self.top_spin.setValue(settings.load("genes/top_n", 4, int))
        self.top_btn = QPushButton("Check top")
        self.clear_btn = QPushButton("Clear")
        self.add_row("Top N", row(self.top_spin, self.top_btn, self.clear_btn, stretch=0))
        self.by_name = QLineEdit()
        self.by_name.setPlaceholderText("add by name: ERBB2, EPCAM …  (Enter)")
        self.add_row("Add", self.by_name)
        self.selected_label = self.add_row(None, info_label("No genes checked."))
        self.scale_spin = QSpinBox()
        self.scale_spin.setRange(2, 10)
        self.scale_spin.setSuffix(" ×")
        self.scale_spin.setValue(settings.load("scale", state.scale, int))
        self.hr_label = QLabel("–")
        self.hr_label.setWordWrap(True)  # may take two lines in a narrow dock
        self.add_row("Scale", row(self.scale_spin, self.hr_label, stretch=1))

        self.scores = None      # pandas DataFrame from gene_scores
        self.selected: list[str] = []
        self._bulk = False

        self.rank_combo.currentIndexChanged.connect(self._on_rank)
        self.search.textChanged.connect(self.proxy.setFilterFixedString)
        self.model.itemChanged.connect(self._on_item_changed)
        self.top_btn.clicked.connect(lambda: self.check_top(self.top_spin.value()))
        self.clear_btn.clicked.connect(lambda: self.set_selected([]))
        self.by_name.returnPressed.connect(self._add_by_name)
        self.scale_spin.valueChanged.connect(self._on_scale)
        state.sample_changed.connect(self._on_sample)
        self.state.set_scale(self.scale_spin.value())
        self._on_sample(state.sample)

    # -- list ----------------------------------------------------------------------------------
    @property
    def ranking(self) -> str:
        return self.rank_combo.currentData()

    def _on_sample(self, sample):
        self.populate()

    def _on_rank(self, *_):
        settings.save("genes/ranking", self.ranking)
        self.populate()

    def populate(self):
        """Rank the sample's genes and fill the list (checked genes stay checked)."""
        sample = self.state.sample
        self.model.clear()
        self.scores = None
        self._update_hr_label()
        if sample is None:
            self.selected_label.setText("No ST data.")
            return
        from ..data.genes import gene_scores

        try:
            df = gene_scores([sample], method=self.ranking)
        except Exception as exc:
            notify_error(f"Cannot rank the genes of {sample.name}: {exc}")
            return
        if sample.hr_truth:  # synthetic: only genes with HR truth can be super-resolved and scored
            keep = [g for g in df.index if g in set(sample.hr_truth["genes"])]
            df = df.loc[keep]
        score = df["score"].to_numpy(float)
        elig = df["eligible"].to_numpy(bool) & np.isfinite(score)
        order = np.lexsort((df.index.to_numpy().astype(str), -np.where(elig, score, -np.inf), ~elig))
        df = df.iloc[order]
        self.scores = df
        keep_sel = [g for g in self.selected if g in df.index]
        grey = QBrush(QColor("#808080"))
        self._bulk = True
        self.proxy.setSourceModel(None)  # fill detached: one reset instead of 15k row insertions
        try:
            for g, sc, el in zip(df.index, df["score"].to_numpy(float), df["eligible"].to_numpy(bool)):
                it = QStandardItem(f"{g}    {sc:.2f}" if (el and np.isfinite(sc)) else f"{g}    (rare)")
                it.setData(str(g), GENE_ROLE)
                it.setCheckable(True)
                it.setEditable(False)
                it.setCheckState(Qt.Checked if g in keep_sel else Qt.Unchecked)
                if not el:
                    it.setForeground(grey)
                self.model.appendRow(it)
        finally:
            self.proxy.setSourceModel(self.model)
            self._bulk = False
        self.set_selected(keep_sel)

    def genes_in_list(self) -> list[str]:
        return [] if self.scores is None else [str(g) for g in self.scores.index]

    def _items(self):
        return {self.model.item(r).data(GENE_ROLE): self.model.item(r) for r in range(self.model.rowCount())}

    def _on_item_changed(self, item):
        if self._bulk:
            return
        g = item.data(GENE_ROLE)
        sel = [x for x in self.selected if x != g]
        if item.checkState() == Qt.Checked:
            sel.append(g)
        self._commit(sel)

    def set_selected(self, genes):
        """Check exactly ``genes`` (in this order)."""
        genes = [str(g) for g in genes]
        items = self._items()
        self._bulk = True
        try:
            for g, it in items.items():
                want = Qt.Checked if g in genes else Qt.Unchecked
                if it.checkState() != want:
                    it.setCheckState(want)
        finally:
            self._bulk = False
        self._commit([g for g in genes if g in items])

    def check_top(self, n: int):
        settings.save("genes/top_n", int(n))
        names = self.genes_in_list()
        if self.scores is not None:
            el = self.scores["eligible"].to_numpy(bool)
            names = [g for g, e in zip(names, el) if e] or names
        self.set_selected(names[: int(n)])

    def _commit(self, sel):
        self.selected = list(dict.fromkeys(sel))
        n = len(self.selected)
        if n:
            shown = ", ".join(self.selected[:8]) + (" …" if n > 8 else "")
            self.selected_label.setText(f"<b>{n} gene{'s' if n != 1 else ''}</b>: {shown}")
        else:
            self.selected_label.setText("No genes checked: check genes in the list or use Check top N.")
        if self.selected != self.state.genes:
            self.state.set_genes(self.selected)

    def _add_by_name(self):
        text = self.by_name.text()
        names = [t.strip() for t in text.replace(";", ",").replace(" ", ",").split(",") if t.strip()]
        if not names or self.state.sample is None:
            return
        if self.add_genes(names):
            self.by_name.clear()

    def add_genes(self, names) -> bool:
        """Resolve typed names (case-insensitive symbols / Ensembl ids) and check them; an unknown gene
        becomes a notification with near matches and nothing changes."""
        from ..data.genes import resolve_genes
        from ..errors import GeneNotFoundError

        sample = self.state.sample
        try:
            idx = resolve_genes(sample, list(names), section=sample.name)
        except GeneNotFoundError as exc:
            notify_error(f"{exc}. Check the spelling or search the list.")
            return False
        syms = [sample.genes[i] for i in idx]
        listed = set(self.genes_in_list())
        missing = [g for g in syms if g not in listed]
        if missing:
            notify_error(f"{', '.join(missing)} cannot be used here"
                         + (": the synthetic sample has HR truth only for the listed genes"
                            if sample.hr_truth else ""))
            return False
        self.set_selected(self.selected + [g for g in syms if g not in self.selected])
        return True

    # -- scale ---------------------------------------------------------------------------------
    def _on_scale(self, v):
        settings.save("scale", int(v))
        self.state.set_scale(int(v))
        self._update_hr_label()

    def pitch_um(self) -> float | None:
        s = self.state.sample
        if s is None:
            return None
        return float(s.lattice_pitch_um or s.spot_diameter_um)

    def hr_um(self) -> float | None:
        p = self.pitch_um()
        return None if p is None else p / self.scale_spin.value()

    def _update_hr_label(self):
        p = self.pitch_um()
        if p is None:
            self.hr_label.setText("HR pixel: –")
            return
        s = self.scale_spin.value()
        self.hr_label.setText(f"HR pixel {p / s:.3g} µm  (pitch {p:g} µm / {s})")
        self.hr_label.setToolTip("Super-resolved maps have this pixel size. Without HR truth the model trains on "
                                 f"{s}×{s} blocks of spots ({p * s:g} µm → {p:g} µm) and is then applied to the "
                                 f"spots themselves ({p:g} µm → {p / s:.3g} µm).")
