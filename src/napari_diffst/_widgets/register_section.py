"""Section 2 — Register: spots onto the H&E from metadata, by landmarks, or by automatic refinement.

The result is ``Sample.transform`` (3×3 on (x, y, 1) full-res px, spot frame → image frame), shown as the
spots layer's napari ``affine`` (:func:`napari_diffst.data.sample.xy_affine_to_napari`); the image is never
resampled. Every applied registration is pushed on an undo stack.

Landmarks: two linked Points layers — ``landmarks · H&E`` (image frame; click on a structure of the
H&E) and ``landmarks · spots`` (spot frame; it carries the spots' current affine, so clicks land where the
spots are drawn). Pair *i* is point *i* of each layer; both show the pair number in the same colour and
the dock alternates the active layer after each click. The residual per pair and the RMS (µm) of a
similarity/affine fit (:func:`napari_diffst.data.registration.fit_landmarks`) update live."""
from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import (QAbstractItemView, QComboBox, QHBoxLayout, QHeaderView, QLabel, QPushButton,
                            QTableWidget, QTableWidgetItem, QWidget)

from ._common import Section, info_label, notify_error, notify_info
from .state import unwrap
from .workers import Job, JobRunner, register_job

LM_HE = "landmarks · H&E"
LM_SPOTS = "landmarks · spots"
PAIR_COLOURS = ("#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55")


def _row(*widgets):
    w = QWidget()
    h = QHBoxLayout(w)
    h.setContentsMargins(0, 0, 0, 0)
    for x in widgets:
        h.addWidget(x)
    return w


class RegisterSection(Section):
    def __init__(self, viewer, state, parent=None):
        super().__init__("2 · Register", viewer, state, parent)
        self.meta_btn = QPushButton("From metadata")
        self.meta_btn.setToolTip("Use the reader's spot pixel coordinates as they are (identity)")
        self.refine_btn = QPushButton("Auto-refine")
        self.refine_btn.setToolTip("Small shift/rotation/scale so that in-tissue spots sit on tissue")
        self.add_row(None, _row(self.meta_btn, self.refine_btn))
        self.lm_btn = QPushButton("Landmarks…")
        self.lm_btn.setToolTip("Add two linked Points layers; click matching points on the H&E and on the spots")
        self.apply_lm_btn = QPushButton("Apply landmarks")
        self.undo_btn = QPushButton("Undo")
        self.add_row(None, _row(self.lm_btn, self.apply_lm_btn, self.undo_btn))
        self.model_combo = self.add_row("Model", QComboBox())
        self.model_combo.addItems(["similarity", "affine"])
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["pair", "residual (µm)"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setMaximumHeight(150)
        self.add_row(None, self.table)
        self.rms_label = self.add_row("RMS", QLabel("–"))
        self.info = self.add_row(None, info_label("Pick an ST layer in section 1."))

        self.undo_stack: list[tuple] = []   # (sample, previous transform)
        self.last_result = None
        self.lm_result = None
        self.runner: JobRunner | None = None
        self._he_layer = None
        self._spot_layer = None
        self._syncing = False

        self.meta_btn.clicked.connect(lambda: self.run("metadata"))
        self.refine_btn.clicked.connect(lambda: self.run("refine"))
        self.lm_btn.clicked.connect(self.add_landmark_layers)
        self.apply_lm_btn.clicked.connect(self.apply_landmarks)
        self.undo_btn.clicked.connect(self.undo)
        self.model_combo.currentIndexChanged.connect(lambda *_: self.update_residuals())
        state.sample_changed.connect(self._on_sample)
        state.busy_changed.connect(lambda *_: self._update_enabled())
        viewer.layers.events.removed.connect(self._on_layer_removed)
        self._on_sample(state.sample)

    # -- state ---------------------------------------------------------------------------------
    @property
    def sample(self):
        return self.state.sample

    def _on_sample(self, sample):
        if sample is None:
            self.info.setText("Pick an ST layer in section 1.")
        else:
            T = np.asarray(sample.transform)
            kind = "identity (from metadata)" if np.allclose(T, np.eye(3)) else "custom transform"
            self.info.setText(f"{sample.name}: {kind}. " + ("" if sample.image is not None else
                                                           "No H&E image: nothing to register to."))
        self._update_enabled()

    def _update_enabled(self):
        has = self.sample is not None and self.sample.image is not None
        idle = not self.state.busy
        for b in (self.meta_btn, self.refine_btn, self.lm_btn):
            b.setEnabled(has and idle)
        self.apply_lm_btn.setEnabled(has and idle and self.lm_result is not None)
        self.undo_btn.setEnabled(bool(self.undo_stack) and idle)

    # -- applying ------------------------------------------------------------------------------
    def spots_layers(self, sample):
        return [ly for ly in self.viewer.layers
                if unwrap(ly.metadata.get("diffst_sample")) is sample and ly.metadata.get("diffst_role") == "spots"]

    def apply_transform(self, sample, T, result=None, push_undo: bool = True):
        """Store ``T`` in the sample and show it as the spots' (and spot landmarks') layer affine."""
        from ..data.sample import xy_affine_to_napari

        T = np.asarray(T, float).reshape(3, 3)
        if push_undo:
            self.undo_stack.append((sample, np.asarray(sample.transform, float).copy()))
        if result is not None:
            result.apply(sample)  # transform + provenance log
        else:
            sample.transform = T.copy()
        A = xy_affine_to_napari(T, sample.um_per_px)
        for ly in self.spots_layers(sample):
            ly.affine = A
        if self._spot_layer is not None and self._spot_layer in self.viewer.layers:
            self._spot_layer.affine = A
        self.state.set_registration(sample)
        self._update_enabled()

    def undo(self):
        if not self.undo_stack:
            return
        sample, T = self.undo_stack.pop()
        self.apply_transform(sample, T, push_undo=False)
        sample.provenance.setdefault("registration", []).append("undo")
        self.info.setText(f"Undone: {sample.name} back to the previous registration.")
        self.last_result = None

    # -- metadata / refine in a worker -----------------------------------------------------------
    def run(self, method: str, landmarks=None):
        sample = self.sample
        if sample is None or self.state.busy:
            return
        self.state.set_busy(True)
        self.info.setText(f"Registering ({method})…")
        job = Job("register")
        gen = register_job(job, sample, method, model=self.model_combo.currentText(), landmarks=landmarks)
        self.runner = JobRunner(self.viewer, job, gen,
                                lambda d: self._on_event(d, sample), desc=f"napari-diffst: registration ({method})",
                                on_done=self._on_done)

    def _on_event(self, d, sample):
        if d["kind"] == "error":
            notify_error(d["message"])
            self.info.setText(d["message"])
        elif d["kind"] == "result":
            res = d["result"]
            self.last_result = res
            # a refinement that found nothing significant keeps the transform: no undo step for a no-op
            self.apply_transform(sample, res.transform, result=res, push_undo=not res.kept)
            # the summary carries the fraction of in-tissue spots on tissue (once)
            self.info.setText(f"{sample.name}: {res.summary()}.")

    def _on_done(self):
        self.state.set_busy(False)
        self._update_enabled()

    # -- landmarks -----------------------------------------------------------------------------
    def add_landmark_layers(self):
        """Create (or re-select) the two linked landmark layers for the current sample."""
        from ..data.sample import xy_affine_to_napari

        sample = self.sample
        if sample is None:
            return
        s = (sample.um_per_px, sample.um_per_px)
        common = dict(size=max(sample.spot_diameter_px * 0.8, 8.0), border_width=0.15, border_color="white",
                      face_color=PAIR_COLOURS[0], units=("um", "um"), ndim=2,
                      text={"string": "{pair}", "color": "white", "size": 13, "anchor": "upper_left"},
                      features={"pair": np.zeros(0, int)})
        if self._he_layer is None or self._he_layer not in self.viewer.layers:
            self._he_layer = self.viewer.add_points(
                np.zeros((0, 2)), name=LM_HE, scale=s, symbol="cross",
                metadata={"diffst_role": "landmarks_he", "diffst_section": sample.name}, **common)
            self._he_layer.events.data.connect(self._on_lm_data)
        if self._spot_layer is None or self._spot_layer not in self.viewer.layers:
            self._spot_layer = self.viewer.add_points(
                np.zeros((0, 2)), name=LM_SPOTS, scale=s, symbol="disc",
                affine=xy_affine_to_napari(sample.transform, sample.um_per_px),
                metadata={"diffst_role": "landmarks_spots", "diffst_section": sample.name}, **common)
            self._spot_layer.events.data.connect(self._on_lm_data)
        self.viewer.layers.selection.active = self._he_layer
        self._he_layer.mode = "add"
        self.info.setText("Landmarks: click a structure on the H&E (cross), then the same place on the spots "
                          "(disc); repeat ≥ 3 times. Residuals update live; press Apply landmarks.")
        self.update_residuals()

    def _on_layer_removed(self, event):
        ly = event.value
        if self._he_layer is not None and ly == self._he_layer:
            self._he_layer = None
        if self._spot_layer is not None and ly == self._spot_layer:
            self._spot_layer = None
        if self._he_layer is None or self._spot_layer is None:
            self.lm_result = None
            self._update_enabled()

    def landmark_pairs(self):
        """(image_xy, spot_xy) in full-res px for the matched pairs (the first min(n_he, n_spots) points)."""
        if self._he_layer is None or self._spot_layer is None:
            return np.zeros((0, 2)), np.zeros((0, 2))
        a = np.asarray(self._he_layer.data, float)[:, -2:][:, ::-1]
        b = np.asarray(self._spot_layer.data, float)[:, -2:][:, ::-1]
        n = min(len(a), len(b))
        return a[:n], b[:n]

    def set_landmarks(self, image_xy, spot_xy):
        """Programmatic landmarks (full-res px, (x, y)) — what clicking does, for scripts and tests."""
        if self._he_layer is None or self._spot_layer is None:
            self.add_landmark_layers()
        self._syncing = True
        try:
            self._he_layer.data = np.asarray(image_xy, float).reshape(-1, 2)[:, ::-1]
            self._spot_layer.data = np.asarray(spot_xy, float).reshape(-1, 2)[:, ::-1]
        finally:
            self._syncing = False
        self._restyle()
        self.update_residuals()

    def _on_lm_data(self, event=None):
        if self._syncing:
            return
        action = getattr(event, "action", None)
        if action is not None and str(action) not in ("added", "removed", "changed", "ActionType.ADDED",
                                                      "ActionType.REMOVED", "ActionType.CHANGED"):
            return
        self._restyle()
        self.update_residuals()
        # linked: after a click in one layer, the next click goes to the other one
        if str(action).lower().endswith("added") and self._he_layer is not None and self._spot_layer is not None:
            nh, ns = len(self._he_layer.data), len(self._spot_layer.data)
            # an unmatched H&E point waits for its spot partner; otherwise the next pair starts on the H&E
            target = self._spot_layer if nh > ns else self._he_layer
            self.viewer.layers.selection.active = target
            target.mode = "add"

    def _restyle(self):
        for ly in (self._he_layer, self._spot_layer):
            if ly is None:
                continue
            n = len(ly.data)
            self._syncing = True
            try:
                ly.features = {"pair": np.arange(1, n + 1)}
                if n:
                    ly.face_color = [PAIR_COLOURS[i % len(PAIR_COLOURS)] for i in range(n)]
                ly.text = {"string": "{pair}", "color": "white", "size": 11, "anchor": "upper_left"}
            finally:
                self._syncing = False

    def update_residuals(self):
        """Refit the landmarks and show the residual per pair and the RMS in µm (live)."""
        img, spot = self.landmark_pairs()
        self.lm_result = None
        self.table.setRowCount(0)
        sample = self.sample
        if sample is None or len(img) < 3:
            self.rms_label.setText(f"– ({len(img)} pair{'s' if len(img) != 1 else ''}; need ≥ 3)")
            self._update_enabled()
            return
        from ..data.registration import fit_landmarks

        try:
            res = fit_landmarks(img, spot, model=self.model_combo.currentText(), um_per_px=sample.um_per_px)
        except Exception as exc:  # collinear points etc.: say so, keep going
            self.rms_label.setText(f"– ({exc})")
            self._update_enabled()
            return
        self.lm_result = res
        self.table.setRowCount(len(img))
        for i, r in enumerate(res.residuals_um):
            self.table.setItem(i, 0, QTableWidgetItem(str(i + 1)))
            self.table.setItem(i, 1, QTableWidgetItem(f"{r:.1f}"))
        self.rms_label.setText(f"{res.rms_um:.1f} µm over {len(img)} pairs ({res.model})")
        self._update_enabled()

    def apply_landmarks(self):
        if self.lm_result is None:
            notify_error("Need at least 3 landmark pairs (a cross on the H&E and a disc on the spots each).")
            return
        img, spot = self.landmark_pairs()
        self.run("landmarks", landmarks=(img, spot))
        notify_info(f"Landmark registration: RMS {self.lm_result.rms_um:.1f} µm over {len(img)} pairs")
