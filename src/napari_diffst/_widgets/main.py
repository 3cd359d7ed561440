"""The "Super-resolve ST" dock: sections a user walks through top to bottom."""
from __future__ import annotations

from qtpy.QtCore import QEvent, Qt
from qtpy.QtWidgets import QApplication, QLabel, QMainWindow, QMessageBox, QScrollArea, QVBoxLayout, QWidget

from .state import DockState

#: modules a first training / sampling / comparison run would otherwise import in its worker thread.
#: Importing a large module holds the GIL for a long stretch (unmarshalling), which would stall the
#: main thread mid-run, so the dock imports them once, in the background, when it opens.
WARM_IMPORTS = ("napari_diffst.pipeline", "napari_diffst.train", "napari_diffst.model",
                "napari_diffst.diffusion.samplers", "napari_diffst.baselines", "napari_diffst.metrics", "napari_diffst.data.registration",
                "napari_diffst.data.grids", "napari_diffst.io.writers", "torch._dynamo", "torch.onnx",
                "torch.distributed.tensor", "torch.utils._sympy.functions", "skimage.metrics",
                "torch.profiler._cupti_monitor", "PIL.ImageFile")


def warm_imports(names=WARM_IMPORTS) -> list[str]:
    """Import ``names`` (ignoring those that fail); returns the ones that failed."""
    import importlib

    failed = []
    for n in names:
        try:
            importlib.import_module(n)
        except Exception:  # noqa: BLE001 - optional speed-up only
            failed.append(n)
    try:  # the first network built in a process holds the GIL ~0.1 s (torch init paths): do it here, off
        # the main thread, before a train/sample worker would do it while the user watches the canvas
        from ..model import build_model
        from ..pipeline import MODEL_PRESETS

        build_model({**MODEL_PRESETS["tiny"], "n_genes": 1, "he_per_hr": 4}, load_weights=False)
    except Exception:  # noqa: BLE001 - optional speed-up only
        failed.append("build_model warm-up")
    return failed


def _section_classes():
    from .data_section import DataSection

    classes = [DataSection]
    # Later sections register themselves here as they are built.
    for modname, clsname in (
        ("register_section", "RegisterSection"),
        ("genes_section", "GenesSection"),
        ("train_section", "TrainSection"),
        ("sample_section", "SampleSection"),
        ("compare_section", "CompareSection"),
        ("domains_section", "DomainsSection"),
    ):
        try:
            mod = __import__(f"{__package__}.{modname}", fromlist=[clsname])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(modname):
                continue
            raise
        classes.append(getattr(mod, clsname))
    return classes


class SuperResolveWidget(QScrollArea):
    """Dock widget. npe2 passes the viewer as ``napari_viewer``."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self._main_window = None
        self.viewer = napari_viewer
        self.state = DockState()
        import napari.qt.threading  # noqa: F401 - every run needs it: imported here, not in the first click
        inner = QWidget()
        lay = QVBoxLayout(inner)
        lay.setContentsMargins(4, 4, 4, 4)
        title = QLabel("<b>Super-resolve ST</b> — Diff-ST: histology-guided super-resolution of gene maps")
        title.setWordWrap(True)
        lay.addWidget(title)
        import threading

        self.warmup = threading.Thread(target=warm_imports, name="napari-diffst-warmup", daemon=True)
        self.warmup.start()
        self.sections = {}
        for cls in _section_classes():
            sec = cls(napari_viewer, self.state, parent=inner)
            key = cls.__name__.replace("Section", "").lower()
            self.sections[key] = sec
            lay.addWidget(sec)
        lay.addStretch(1)
        self.setWidget(inner)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        # never narrower than the sections need (no horizontal scrolling, nothing clipped); checked again
        # when shown, once napari's stylesheet has sized the widgets
        self._fit_width()
        # folders dropped on the canvas that napari-diffst reads open with it (napari would ask which reader,
        # with its builtins preselected, which cannot read a section folder)
        import warnings

        with warnings.catch_warnings():  # napari hands plugins a proxy that warns on private attributes
            warnings.simplefilter("ignore")
            qv = getattr(getattr(napari_viewer, "window", None), "_qt_viewer", None)
        self._qt_viewer = getattr(qv, "__wrapped__", qv)  # the widget itself: eventFilter compares identity
        if self._qt_viewer is not None:
            self._qt_viewer.installEventFilter(self)

    def _fit_width(self) -> None:
        inner = self.widget()
        need = inner.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
        if max(400, need) != self.minimumWidth():
            self.setMinimumWidth(max(400, need))

    def section(self, key: str):
        return self.sections[key]

    # -- closing the viewer during a run ------------------------------------------------------------
    def running_jobs(self) -> list:
        """JobRunners of the sections that are still running."""
        return [sec.runner for sec in self.sections.values()
                if getattr(sec, "runner", None) is not None and sec.runner.running]

    def showEvent(self, event):
        super().showEvent(event)
        self._fit_width()
        if self._main_window is None:
            w = self.parent()
            while w is not None and not isinstance(w, QMainWindow):
                w = w.parent()
            if w is not None:  # the viewer's main window, also when the dock floats
                self._main_window = w
                w.installEventFilter(self)

    def dropped_folders(self, event) -> list[str] | None:
        """The local folders of a drop event when napari-diffst should open them: every dropped path is a folder
        its reader accepts, no napari reader preference covers it and neither Alt (choose the reader) nor
        Shift (stack) is held; else None (napari handles the drop as usual)."""
        import os

        from .._reader import get_reader

        try:
            mods = event.modifiers()
            if mods & (Qt.KeyboardModifier.AltModifier | Qt.KeyboardModifier.ShiftModifier):
                return None
            urls = event.mimeData().urls() if event.mimeData() is not None else []
            paths = [u.toLocalFile() for u in urls if u.isLocalFile()]
            if not paths or len(paths) != len(urls) or not all(os.path.isdir(p) for p in paths):
                return None
            try:
                from napari.plugins.utils import get_preferred_reader
            except ImportError:  # pragma: no cover
                get_preferred_reader = lambda p: None  # noqa: E731
            if any(get_preferred_reader(p) for p in paths) or any(get_reader(p) is None for p in paths):
                return None
            return paths
        except Exception:  # noqa: BLE001 - never break napari's own drop handling
            return None

    def eventFilter(self, obj, event):
        if obj is not None and obj is getattr(self, "_qt_viewer", None) and event.type() == QEvent.Type.Drop:
            paths = self.dropped_folders(event)
            if paths:
                event.acceptProposedAction()
                self.sections["data"]._open_paths(paths)
                return True
            return False
        if obj is not None and obj is getattr(self, "_main_window", None) and event.type() == QEvent.Type.Close:
            jobs = self.running_jobs()
            if jobs:
                if not self.confirm_close(jobs):
                    event.ignore()
                    return True
                self.shutdown_jobs(jobs)
        return super().eventFilter(obj, event)

    def confirm_close(self, jobs) -> bool:
        """Ask before closing the viewer while a run is going on (replaced in tests)."""
        what = "\n".join(f"• {r.status}" for r in jobs)
        ans = QMessageBox.question(
            self._main_window or self, "napari-diffst is running",
            f"{what}\n\nClose the viewer anyway? The run is cancelled after its current step; a training run "
            "keeps its last checkpoint.", QMessageBox.StandardButton.Close | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel)
        return ans == QMessageBox.StandardButton.Close

    def shutdown_jobs(self, jobs=None, timeout_s: float = 60.0) -> bool:
        """Cancel the running jobs and wait until their workers have finished (checkpoint written)."""
        import time

        jobs = self.running_jobs() if jobs is None else jobs
        ok = all([r.shutdown(timeout_s) for r in jobs])
        # let the workers' 'finished' signals through, so napari sees no busy task any more
        t_end = time.perf_counter() + 5.0
        while any(not r.finished for r in jobs) and time.perf_counter() < t_end:
            QApplication.processEvents()
            time.sleep(0.01)
        return ok
