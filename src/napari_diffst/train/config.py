"""Training configuration (JSON round-trip) and budget presets."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataFormatError

__all__ = ["TrainConfig", "PRESETS"]

#: Budget presets — the one home of each budget's defaults (the CLI and the dock both read them).
#: ``tiny``: tests and smoke runs (seconds); ``quick``: a few CPU minutes with a small model and small
#: patches (a usable demo model); ``full``: a GPU run at the scale of the Diff-ST paper experiments.
#: ``checkpoint_every``: a killed run loses at most that many steps; quick's 50 is under a minute of CPU work
#: (measured ~1 s per quick step on a shared 2-core machine, docs/model.md "Checkpoints, reruns and faults").
PRESETS: dict[str, dict] = {
    "quick": dict(steps=300, batch_size=4, lr_size=8, lr=2e-4, warmup_steps=20, lr_schedule="constant",
                  ema_decay=0.99, log_every=10, checkpoint_every=50, device="auto"),
    "full": dict(steps=40000, batch_size=16, lr_size=16, lr=1e-4, warmup_steps=500, lr_schedule="cosine",
                 ema_decay=0.9999, log_every=50, checkpoint_every=2000, device="auto"),
}
PRESETS["tiny"] = {**PRESETS["quick"], "steps": 20, "batch_size": 2}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint).

    Diffusion: ``schedule`` ('linear' | 'cosine'), ``timesteps`` (T), ``target`` ('eps' | 'x0' | 'v'),
    ``aux_weights`` (weights of the network's auxiliary losses, e.g. ``{'disentangle': 0.1}``; unlisted → 1).
    Optimisation: AdamW (``lr``, ``weight_decay``, ``adam_betas``), linear ``warmup_steps`` then
    ``lr_schedule`` 'constant' or 'cosine' (down to ``min_lr_frac``·lr), gradient-norm clipping ``grad_clip``
    (0 = off), EMA of the weights with ``ema_decay`` (``ema_warmup``: decay min(d, (1+n)/(10+n))).
    Data: ``batch_size`` per process, ``lr_size`` LR pixels per patch side, ``upsample`` of the LR condition
    ('nearest' | 'bilinear'), ``augment``, ``min_valid``. Runtime: ``seed``, ``device``, ``amp`` (bf16 autocast,
    CUDA only), ``log_every``, ``checkpoint_every``, ``out_dir``, ``time_limit_s``
    (opt-in interactive stop after that many seconds; off by default — budgets are ``steps``, and neither the
    benchmark nor any test sets it, so a seed trains the same model at any machine load).
    Adversarial (HaDM-ST channel-aware, :mod:`napari_diffst.model.adversarial`): ``adv_weight`` > 0 adds
    ``adv_weight`` × the per-gene discriminator's generator loss to the diffusion loss and trains the
    discriminator alternately (Adam, ``adv_lr`` — default ``lr`` —, betas ``adv_betas``, ``adv_hidden`` channels,
    at most ``adv_max_genes`` gene maps per sample per step); 0 = off.
    ``model`` is handed to ``napari_diffst.model.build_model``; ``model_factory`` ('module:callable') and
    ``data`` (``{'source': 'module:callable', ...}``) are used by the command-line / torchrun entry.
    """

    # diffusion / objective
    schedule: str = "linear"
    timesteps: int = 1000
    target: str = "eps"
    aux_weights: dict = field(default_factory=dict)
    # optimisation
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_frac: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    # channel-aware adversarial learning (0 = off)
    adv_weight: float = 0.0
    adv_lr: float | None = None
    adv_betas: list = field(default_factory=lambda: [0.5, 0.999])
    adv_hidden: int = 32
    adv_max_genes: int = 32
    # data
    lr_size: int = 8
    upsample: str = "nearest"
    augment: bool = True
    min_valid: float = 0.3
    # runtime
    seed: int = 0
    device: str = "auto"
    amp: object = "auto"
    deterministic: bool = False
    log_every: int = 10
    checkpoint_every: int = 500
    checkpoint_on_cancel: bool = True
    time_limit_s: float | None = None
    out_dir: str | None = None
    # model / data sources
    model: dict = field(default_factory=dict)
    model_factory: str | None = None
    data: dict = field(default_factory=dict)
    ddp_find_unused_parameters: bool = False
    preset: str | None = None

    def __post_init__(self):
        self.adam_betas = [float(b) for b in self.adam_betas]
        self.adv_betas = [float(b) for b in self.adv_betas]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, path=None) -> "TrainConfig":
        problems = []
        if self.schedule not in ("linear", "cosine"):
            problems.append(f"schedule={self.schedule!r} (expected 'linear' or 'cosine')")
        if self.target not in ("eps", "x0", "v"):
            problems.append(f"target={self.target!r} (expected 'eps', 'x0' or 'v')")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"lr_schedule={self.lr_schedule!r} (expected 'constant' or 'cosine')")
        if self.upsample not in ("nearest", "bilinear", "cubic"):
            problems.append(f"upsample={self.upsample!r} (expected 'nearest', 'bilinear' or 'cubic')")
        for name in ("timesteps", "steps", "batch_size", "lr_size", "log_every", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name}={v!r} (expected a positive integer)")
        if not (0.0 <= float(self.ema_decay) < 1.0):
            problems.append(f"ema_decay={self.ema_decay!r} (expected 0 <= decay < 1)")
        if float(self.lr) <= 0:
            problems.append(f"lr={self.lr!r} (expected > 0)")
        if not (isinstance(self.adv_weight, (int, float)) and not isinstance(self.adv_weight, bool)
                and math.isfinite(self.adv_weight) and self.adv_weight >= 0):
            problems.append(f"adv_weight={self.adv_weight!r} (expected a number >= 0; 0 = off)")
        if self.adv_lr is not None and not (isinstance(self.adv_lr, (int, float)) and self.adv_lr > 0):
            problems.append(f"adv_lr={self.adv_lr!r} (expected None or > 0)")
        for name in ("adv_hidden", "adv_max_genes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name}={v!r} (expected a positive integer)")
        if problems:
            raise DataFormatError(path, "invalid training configuration: " + "; ".join(problems),
                                  "see napari_diffst.train.TrainConfig")
        return self

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        """A config from a budget preset (``'tiny'``, ``'quick'`` or ``'full'``) with keyword overrides."""
        if name not in PRESETS:
            raise DataFormatError(None, f"unknown training preset {name!r}", f"one of {sorted(PRESETS)}")
        kw = dict(PRESETS[name])
        kw.update(overrides)
        kw["preset"] = name
        return cls(**kw)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict, path=None) -> "TrainConfig":
        if not isinstance(d, dict):
            raise DataFormatError(path, "training configuration is not a JSON object", "{\"steps\": 300, ...}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataFormatError(path, f"unknown training option(s) {unknown}",
                                  f"keys among {sorted(names)}")
        d = dict(d)
        if d.get("preset") and d["preset"] in PRESETS:
            base = dict(PRESETS[d["preset"]])
            base.update(d)
            d = base
        try:
            return cls(**d)
        except DataFormatError as e:
            raise DataFormatError(path, e.problem, e.expected) from None
        except TypeError as e:
            raise DataFormatError(path, f"invalid training configuration: {e}", "see TrainConfig") from None

    def to_json(self, path=None, indent: int = 2) -> str:
        """JSON text; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text) -> "TrainConfig":
        """Read a config from a JSON file (or a JSON string starting with ``{``)."""
        s = str(path_or_text)
        if s.lstrip().startswith("{"):
            path, text = None, s
        else:
            path = Path(s)
            try:
                text = path.read_text()
            except OSError as e:
                raise DataFormatError(path, f"cannot read training configuration ({e.strerror})",
                                      "a readable JSON file") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"not valid JSON ({e.msg} at line {e.lineno})",
                                  "a JSON object of TrainConfig options") from None
        return cls.from_dict(d, path=path)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`napari_diffst.io.writers.atomic_path`), fsynced."""
    from ..io.writers import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())

