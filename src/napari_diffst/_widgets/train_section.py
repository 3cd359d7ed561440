"""Section 4 — Train: budget, steps, batch, checkpoint folder, resume; a live loss plot and ETA.

Training runs in a napari thread worker (:func:`.workers.train_job`): the generator builds the training
fields and yields one event per step; the dock updates the plot, the ETA, the activity-dock bar and the
close-confirmation task status from those events on the main thread. Cancel asks the trainer to stop
before its next step; it writes the checkpoint and the run ends ('cancelled'). GPU memory is released
when the generator ends."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QLabel, QLineEdit, QMessageBox, QPushButton,
                            QSpinBox, QToolButton)

from . import settings
from ._common import (Section, StatusText, narrow_combo, notify_error, notify_info, notify_warning, progress_bar,
                      row as _row,
                      save_later)
from .plots import LossPlot
from .workers import Job, JobRunner, format_eta, train_job

BUDGETS = (("tiny", "tiny (tests, seconds)"), ("quick", "quick (CPU minutes)"), ("full", "full (GPU hours)"))


def budget_default(budget: str, key: str) -> int:
    """A budget's default (``steps``, ``batch_size``, ``lr_size``): the Diff-ST method object's knobs
    (:data:`napari_diffst.method.DIFFUSION_BUDGETS`) — the same the CLI's ``train --budget`` and the benchmark
    use."""
    from ..method import DIFFUSION_BUDGETS

    return int(DIFFUSION_BUDGETS[budget][key])
#: labels of the "Histology features" box (model config ``hist_features``; napari_diffst.feature_names)
FEATURE_LABELS = {"learned": "learned (default)", "handcrafted": "handcrafted (colour + texture)",
                  "file": "pretrained model file…"}
CUDA_MISSING_TIP = ("CUDA is not available (no NVIDIA GPU, or a CPU-only PyTorch build): training runs on the "
                    "CPU and is slow. Use the 'tiny'/'quick' budget here, or train on a GPU machine with "
                    "`napari-diffst train` and load the checkpoint in section 5.")



def device_choices() -> list[str]:
    """The Device box's entries: 'auto', 'cpu', then each CUDA device and Apple MPS where available."""
    out = ["auto", "cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            out += ["cuda"] if n == 1 else [f"cuda:{i}" for i in range(n)]
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            out.append("mps")
    except Exception:  # pragma: no cover - torch always importable here
        pass
    return out


def device_text(choice: str = "auto") -> tuple[str, str, str]:
    """(label, colour, tooltip) for the compute device a run with Device ``choice`` will use."""
    try:
        from ..device import device_label

        name = device_label(choice)
    except Exception as exc:  # pragma: no cover
        return "?", "#e57373", f"device {choice!r} cannot be used: {exc}"
    if name == "CPU":
        if choice == "auto" or not any(c.startswith("cuda") for c in device_choices()):
            return "CPU", "#e5c100", CUDA_MISSING_TIP
        return "CPU", "#e5c100", "training and sampling run on the CPU (slow: use the 'tiny'/'quick' budget)"
    return name, "#3cb043", "training and sampling run on this accelerator"


class TrainSection(Section):
    def __init__(self, viewer, state, parent=None):
        super().__init__("4 · Train", viewer, state, parent)
        self.budget_combo = self.add_row("Budget", QComboBox())
        for k, t in BUDGETS:
            self.budget_combo.addItem(t, k)
        b = settings.load("train/budget", "quick")
        self.budget_combo.setCurrentIndex(max(0, [k for k, _ in BUDGETS].index(b) if b in dict(BUDGETS) else 1))
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1_000_000)
        self.steps_spin.setValue(settings.load("train/steps", budget_default(self.budget, "steps"), int))
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 512)
        self.batch_spin.setValue(settings.load("train/batch", budget_default(self.budget, "batch_size"), int))
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(2, 64)
        self.patch_spin.setValue(settings.load("train/lr_size", 8, int))
        self.patch_spin.setToolTip("LR pixels per side of a training patch (capped at the section size)")
        self.add_row("Steps", self.steps_spin)
        self.add_row("Batch / patch", _row(self.batch_spin, QLabel("patch"), self.patch_spin, stretch=0))
        self.features_combo = self.add_row("Histology features", QComboBox())
        self.features_file = settings.load("train/features_file", "")
        self._fill_features()
        self.ckpt_edit = QLineEdit(settings.load("train/ckpt_dir", ""))
        self.ckpt_edit.setPlaceholderText("checkpoint folder (default: ~/napari-diffst-runs/…)")
        self.ckpt_btn = QToolButton()
        self.ckpt_btn.setText("…")
        self.add_row("Checkpoints", _row(self.ckpt_edit, self.ckpt_btn, stretch=0))
        self.resume_check = QCheckBox("resume from")
        self.resume_edit = QLineEdit(settings.load("train/resume", ""))
        self.resume_edit.setPlaceholderText("checkpoint folder to continue")
        self.resume_btn = QToolButton()
        self.resume_btn.setText("…")
        self.add_row(None, _row(self.resume_check, self.resume_edit, self.resume_btn, stretch=1))
        self.device_combo = narrow_combo(QComboBox(), 6)
        self.device_combo.addItems(device_choices())
        self.device_combo.setToolTip("Where training and sampling run ('auto': a GPU when there is one)")
        saved = settings.load("train/device", "auto")
        self.device_combo.setCurrentIndex(max(0, self.device_combo.findText(saved)))
        self.device_label = QLabel()
        self._show_device()
        self.add_row("Device", _row(self.device_combo, self.device_label, stretch=1))
        self.train_btn = QPushButton("Train")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.add_row(None, _row(self.train_btn, self.cancel_btn))
        self.progress = self.add_widget(progress_bar())
        self.plot = self.add_widget(LossPlot(self))
        self.eta_label = self.add_widget(StatusText("Not trained yet.", lines=3))
        self._status_text = None  # text for eta_label at the next UI tick

        self.ask_existing_checkpoint = self._ask_existing_checkpoint  # tests replace it with a canned answer
        self.runner: JobRunner | None = None
        self._notice = None
        self.last_event = None
        self.history: list = []   # TrainEvents of the current run
        self.fields = None

        self.budget_combo.currentIndexChanged.connect(self._on_budget)
        self.device_combo.currentIndexChanged.connect(self._on_device)
        self.features_combo.activated.connect(self._on_features)
        self.steps_spin.valueChanged.connect(lambda v: settings.save("train/steps", int(v)))
        self.batch_spin.valueChanged.connect(lambda v: settings.save("train/batch", int(v)))
        self.patch_spin.valueChanged.connect(lambda v: settings.save("train/lr_size", int(v)))
        self.ckpt_btn.clicked.connect(self._choose_ckpt)
        self.resume_btn.clicked.connect(self._choose_resume)
        self.train_btn.clicked.connect(self.start)
        self.cancel_btn.clicked.connect(self.cancel)
        for sig in (state.sample_changed, state.genes_changed, state.busy_changed):
            sig.connect(lambda *_: self._update_enabled())
        self._update_enabled()

    # -- options -------------------------------------------------------------------------------
    @property
    def budget(self) -> str:
        return self.budget_combo.currentData()

    def _on_budget(self, *_):
        settings.save("train/budget", self.budget)
        self.steps_spin.setValue(budget_default(self.budget, "steps"))
        self.batch_spin.setValue(budget_default(self.budget, "batch_size"))

    def _fill_features(self):
        from ..feature_names import available_feature_extractors, describe_feature_extractor  # torch-free

        for i, name in enumerate(n for n in available_feature_extractors() if n in FEATURE_LABELS):
            label = FEATURE_LABELS[name]
            if name == "file" and self.features_file:
                label = f"file: {Path(self.features_file).name}"
            self.features_combo.addItem(label, name)
            self.features_combo.setItemData(i, describe_feature_extractor(name), Qt.ItemDataRole.ToolTipRole)
        keys = [self.features_combo.itemData(i) for i in range(self.features_combo.count())]
        saved = settings.load("train/features", "learned")
        self.features_combo.setCurrentIndex(keys.index(saved) if saved in keys else 0)
        self._features_index = self.features_combo.currentIndex()
        self.features_combo.setToolTip("What turns the H&E into tissue-level features for the network: "
                                       "learned from scratch, fixed colour/texture features, or your own "
                                       "pretrained pathology model (TorchScript file, kept frozen)")

    def _on_features(self, index: int):
        if self.features_combo.itemData(index) == "file":
            start = self.features_file or settings.load("train/ckpt_parent", str(Path.home()))
            f, _ = QFileDialog.getOpenFileName(self, "Pretrained feature extractor (TorchScript)", start,
                                               "Models (*.pt *.pt2 *.pth *.ts);;All files (*)")
            if not f and not self.features_file:
                self.features_combo.setCurrentIndex(self._features_index)
                return
            if f:
                self.set_features_file(f)
        self._features_index = self.features_combo.currentIndex()
        settings.save("train/features", self.features_combo.currentData())

    def set_features_file(self, path: str) -> None:
        """Use the pretrained model file ``path`` as the histology feature extractor."""
        self.features_file = str(path)
        settings.save("train/features_file", self.features_file)
        i = self.features_combo.findData("file")
        self.features_combo.setItemText(i, f"file: {Path(self.features_file).name}")
        self.features_combo.setCurrentIndex(i)
        self._features_index = i
        settings.save("train/features", "file")

    @property
    def hist_features(self) -> str:
        """The model config ``hist_features`` of the next training run."""
        key = self.features_combo.currentData() or "learned"
        if key == "file":
            return f"file:{self.features_file}" if self.features_file else "learned"
        return key

    @property
    def device(self) -> str:
        """The Device box's choice ('auto', 'cpu', 'cuda', 'cuda:N', 'mps'); sampling uses it too."""
        return self.device_combo.currentText() or "auto"

    def _show_device(self):
        name, colour, tip = device_text(self.device)
        self.device_label.setText(f"<b style='color:{colour}'>{name}</b>")
        self.device_label.setToolTip(tip)
        self.device_name = name
        self.state.set_device(self.device)

    def _on_device(self, *_):
        settings.save("train/device", self.device)
        self._show_device()

    def _choose_ckpt(self):
        start = self.ckpt_edit.text() or settings.load("train/ckpt_parent", str(Path.home()))
        d = QFileDialog.getExistingDirectory(self, "Checkpoint folder", start)
        if d:
            self.ckpt_edit.setText(d)

    def _choose_resume(self):
        start = self.resume_edit.text() or settings.load("train/ckpt_parent", str(Path.home()))
        d = QFileDialog.getExistingDirectory(self, "Resume from checkpoint folder", start)
        if d:
            self.resume_edit.setText(d)
            self.resume_check.setChecked(True)

    def checkpoint_dir(self) -> Path:
        txt = self.ckpt_edit.text().strip()
        if txt:
            return Path(txt).expanduser()
        name = self.state.sample.name if self.state.sample is not None else "run"
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path.home() / "napari-diffst-runs" / f"{name}-{stamp}"

    def _update_enabled(self):
        running = self.runner is not None and self.runner.running
        ok = self.state.sample is not None and bool(self.state.genes)
        self.train_btn.setEnabled(ok and not self.state.busy and not running)
        self.cancel_btn.setEnabled(running)
        if not running:
            if self.state.sample is None:
                self.train_btn.setToolTip("Pick ST data in section 1")
            elif not self.state.genes:
                self.train_btn.setToolTip("Check genes in section 3")
            else:
                self.train_btn.setToolTip("")

    # -- run -----------------------------------------------------------------------------------
    def start(self):
        st = self.state
        if st.sample is None or not st.genes or st.busy:
            return
        from ..errors import DiffSTError
        from ..train.checkpoint import describe_checkpoint, existing_checkpoint, move_checkpoint_aside

        out = self.checkpoint_dir()
        resume = self.resume_edit.text().strip() if self.resume_check.isChecked() else None
        have = existing_checkpoint(out)
        if have is not None and not (resume and Path(resume).expanduser().resolve() == out.resolve()):
            # never overwrite an earlier checkpoint silently: resume it, move it aside, or do nothing
            choice = self.ask_existing_checkpoint(out, have)
            if choice == "resume":
                resume = str(out)
            elif choice == "overwrite":
                try:
                    moved = move_checkpoint_aside(out)
                except DiffSTError as exc:
                    notify_error(str(exc))
                    return
                notify_info(f"The previous checkpoint ({describe_checkpoint(have)}) was moved to {moved}.")
            else:
                self.eta_label.setText(f"Not started: {out} holds a checkpoint ({describe_checkpoint(have)}).")
                return
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            notify_error(f"Cannot create the checkpoint folder {out}: {exc}. Choose another folder.")
            return
        prefs = [("train/ckpt_parent", str(out.parent))]
        if self.ckpt_edit.text().strip():
            prefs.append(("train/ckpt_dir", self.ckpt_edit.text().strip()))
        if resume:
            prefs.append(("train/resume", resume))
        save_later(prefs)  # each QSettings save writes and syncs a file: not inside the click
        self.plot.clear()
        self.plot.set_total(self.steps_spin.value())
        self.plot.update_now()
        self.history = []
        self.last_event = None
        self.out_dir = out
        self._status_text = None
        self.eta_label.setText(f"Preparing {len(st.genes)} genes at {st.scale}× …")
        st.set_busy(True)
        job = Job("train")
        extra = {}
        if self.hist_features != "learned":  # a resumed run must match its checkpoint's network (checked)
            extra["model_overrides"] = {"hist_features": self.hist_features}
        gen = train_job(job, st.sample, list(st.genes), st.scale, budget=self.budget,
                        steps=self.steps_spin.value(), batch_size=self.batch_spin.value(),
                        lr_size=self.patch_spin.value(), out_dir=out, resume=resume, device=self.device, **extra)
        self.runner = JobRunner(self.viewer, job, gen, self._on_event, desc="napari-diffst: training Diff-ST",
                                total=self.steps_spin.value(), on_done=self._on_done, bar=self.progress,
                                on_tick=self._refresh)
        self._update_enabled()

    def _ask_existing_checkpoint(self, out: Path, have: dict) -> str:
        """'resume' | 'overwrite' | 'cancel': what to do with the checkpoint already in ``out``."""
        from ..train.checkpoint import describe_checkpoint

        box = QMessageBox(QMessageBox.Icon.Question, "Checkpoint folder in use",
                          f"{out} already holds a checkpoint ({describe_checkpoint(have)}).\n\n"
                          "Resume: continue it (the same settings are required and checked).\n"
                          "Overwrite: move it aside to a dated folder next to it and start afresh.", parent=self)
        res = box.addButton("Resume", QMessageBox.ButtonRole.AcceptRole)
        ovr = box.addButton("Overwrite (move aside)", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.exec()
        clicked = box.clickedButton()
        return "resume" if clicked is res else "overwrite" if clicked is ovr else "cancel"

    def cancel(self):
        if self.runner is not None and self.runner.running:
            self.runner.cancel()
            self.eta_label.setText("Cancelling after this step…")
            self.cancel_btn.setEnabled(False)

    def _set_status(self, text: str) -> None:
        """Show ``text`` at the next UI tick (events only store; :meth:`_refresh` updates the widgets)."""
        self._status_text = text

    def _refresh(self) -> None:
        """The runner's UI tick (4×/s and once at the end): status text and loss plot, one repaint."""
        if self._status_text is not None:
            self.eta_label.setText(self._status_text)
            self._status_text = None
        self.plot.update_now()

    def _on_event(self, d):
        kind = d["kind"]
        if kind == "prepare":
            self._set_status(d["message"])
        elif kind == "ready":
            self.fields = d["fields"]
            self.state.set_train_fields(d["fields"])
            self.total = d["total"]
            self.run_device = d["device"]
            if d["total"] != self.steps_spin.value():  # resumed run with another total
                self.plot.set_total(d["total"])
            self.runner.set_progress(d["step0"], total=d["total"])
            self._set_status(f"Training on {d['device']}: batch {d['batch_size']}, patch {d['lr_size']} LR px, "
                             f"{d['total']} steps → {d['out_dir']}")
        elif kind == "event":
            self._on_train_event(d["event"])
        elif kind == "cancelled_early":
            self._set_status("Cancelled before training started.")
        elif kind == "error":
            notify_error(d["message"])
            self._set_status(d["message"])

    def _on_train_event(self, ev):
        self.last_event = ev
        self.history.append(ev)
        if ev.kind == "step":
            self.plot.add(ev.step, ev.losses)
            sps = f"{ev.steps_per_s:.2f} steps/s" if ev.steps_per_s else ""
            loss = ev.losses.get("loss")
            cancelling = "Cancelling after this step… " if self.runner.job.cancelled else ""
            self._set_status(f"{cancelling}step {ev.step}/{ev.total_steps} · loss {loss:.4f} · {sps} · "
                             f"ETA {format_eta(ev.eta_s)}")
            self.runner.set_progress(ev.step, desc=f"napari-diffst: training step {ev.step}/{ev.total_steps}")
        elif ev.kind in ("done", "cancelled"):
            ck = ev.checkpoint
            if ck:
                self.state.set_checkpoint(ck)
            # no toast when training finishes (the status line and the progress bar say so): a napari
            # notification fades in over the canvas, 100–170 ms per window flush on software GL. A cancel's
            # warning is shown once the worker has ended.
            if ev.kind == "done":
                self._set_status(f"Finished {ev.step} steps in {format_eta(ev.elapsed_s)}. Checkpoint: {ck}")
            else:
                self._set_status(f"Cancelled at step {ev.step}; checkpoint kept: {ck}")
                self._notice = (notify_warning, f"Training cancelled at step {ev.step}. The checkpoint {ck} is "
                                                "kept: resume from it or use it in section 5.")
        elif ev.kind == "error":
            where = f" The last checkpoint is {ev.checkpoint}." if ev.checkpoint else ""
            from .workers import friendly_error

            msg = friendly_error(ev.error, "training") if ev.error is not None else ev.message
            notify_error(msg + where)
            self._set_status(msg + where)

    def _on_done(self):
        self.state.set_busy(False)
        self._update_enabled()
        notice, self._notice = self._notice, None
        if notice is not None:
            notice[0](notice[1])
