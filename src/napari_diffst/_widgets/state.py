"""The dock's shared, evented state: sections read and write it, and subscribe to its signals.

Qt-free (psygnal only) so it can be unit-tested without a viewer."""
from __future__ import annotations

from psygnal import Signal


class DockState:
    """What the user has chosen so far, walking the sections top to bottom."""

    sample_changed = Signal(object)     # Sample | None
    genes_changed = Signal(list)        # list[str]
    scale_changed = Signal(int)
    checkpoint_changed = Signal(str)    # folder of the last/selected checkpoint
    results_changed = Signal(dict)      # method -> (G, H, W) maps in model units
    busy_changed = Signal(bool)

    def __init__(self):
        self.sample = None
        self.histology_layer = None
        self.spots_layer = None
        self.genes: list[str] = []
        self.scale: int = 5
        self.checkpoint: str = ""
        self.field = None
        self.results: dict = {}
        self.busy = False

    def set_sample(self, sample, histology_layer=None, spots_layer=None):
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

    def set_busy(self, b: bool):
        self.busy = bool(b)
        self.busy_changed.emit(self.busy)
