"""The dock's shared, evented state: sections read and write it, and subscribe to its signals.

Qt-free (psygnal only) so it can be unit-tested without a viewer."""
from __future__ import annotations

from psygnal import Signal


def unwrap(obj):
    """The object behind napari's ``PublicOnlyProxy``. A plugin widget gets a proxied viewer, and the proxy
    also wraps every object whose module starts with "napari" — including ``napari_diffst`` Samples found
    in layer metadata — so ``is`` comparisons fail and attribute access is slow. Unwrap at the boundary."""
    while obj is not None and type(obj).__name__.endswith("PublicOnlyProxy") and hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


class DockState:
    """What the user has chosen so far, walking the sections top to bottom."""

    sample_changed = Signal(object)     # Sample | None
    genes_changed = Signal(list)        # list[str]
    scale_changed = Signal(int)
    checkpoint_changed = Signal(str)    # folder of the last/selected checkpoint
    results_changed = Signal(dict)      # method -> SRResult (Diff-ST) / (G, H, W) maps in model units
    busy_changed = Signal(bool)
    registration_changed = Signal(object)  # the sample whose transform changed
    train_fields_changed = Signal(list)    # SRFields the last training run used (baselines fit on them)
    device_changed = Signal(str)           # 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' (training and sampling)

    def __init__(self):
        self.sample = None
        self.histology_layer = None
        self.spots_layer = None
        self.genes: list[str] = []
        self.scale: int = 5
        self.checkpoint: str = ""
        self.field = None
        self.results: dict = {}
        self.train_fields: list = []
        self.busy = False
        self.device = "auto"

    def set_sample(self, sample, histology_layer=None, spots_layer=None):
        """Choose the sample (unwrapped from napari's plugin proxy, see :func:`unwrap`); setting the same
        sample and layers again emits nothing (re-ranking 15k genes on every layer insert is costly)."""
        sample = unwrap(sample)
        if (sample is self.sample and histology_layer == self.histology_layer
                and spots_layer == self.spots_layer):
            return
        self.sample = sample
        self.histology_layer = histology_layer
        self.spots_layer = spots_layer
        self.field = None
        self.sample_changed.emit(sample)

    def set_genes(self, genes):
        self.genes = list(genes)
        self.field = None
        self.genes_changed.emit(self.genes)

    def set_scale(self, s: int):
        self.scale = int(s)
        self.field = None
        self.scale_changed.emit(self.scale)

    def set_checkpoint(self, path: str):
        self.checkpoint = str(path)
        self.checkpoint_changed.emit(self.checkpoint)

    def set_results(self, results: dict):
        self.results = dict(results)
        self.results_changed.emit(self.results)

    def set_registration(self, sample):
        """The sample's ``transform`` changed: rasters sampled from the H&E must be rebuilt."""
        self.field = None
        self.train_fields = []
        self.registration_changed.emit(sample)

    def set_train_fields(self, fields):
        self.train_fields = list(fields or [])
        self.train_fields_changed.emit(self.train_fields)

    def set_busy(self, b: bool):
        self.busy = bool(b)
        self.busy_changed.emit(self.busy)

    def set_device(self, device: str):
        device = str(device or "auto")
        if device != self.device:
            self.device = device
            self.device_changed.emit(device)
