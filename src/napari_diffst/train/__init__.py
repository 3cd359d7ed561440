"""Training of the Diff-ST engine: config, loop (events), checkpoints; DDP entry in :mod:`.ddp`
(``torchrun -m napari_diffst.train.ddp --config cfg.json``; not imported here so ``-m`` runs cleanly)."""
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .config import PRESETS, TrainConfig
from .trainer import (TrainEvent, Trainer, diffusion_from_config, fields_batch_fn, patches_to_batch,
                      synthetic_batch_fn)

__all__ = ["TrainConfig", "PRESETS", "Trainer", "TrainEvent", "load_checkpoint", "read_checkpoint",
           "save_checkpoint", "patches_to_batch", "fields_batch_fn", "synthetic_batch_fn", "diffusion_from_config"]
