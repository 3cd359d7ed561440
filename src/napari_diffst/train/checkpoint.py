"""Checkpoints: one folder holding ``model.pt`` (everything needed to sample from or resume a run) and a
human-readable ``config.json``; both written atomically (temporary file + ``os.replace``), so an interrupted
save never destroys the previous checkpoint.

``model.pt`` holds plain containers and tensors only (loadable with ``torch.load(weights_only=True)``):
model / EMA / optimizer state dicts (and the adversarial discriminator and its optimizer when
``adv_weight`` > 0), the step, the training, model and diffusion configs, the gene list,
the normalisation (``gene_scale``: model units × gene_scale = log1p(CP10k)), data provenance, the package
version and the RNG states (torch CPU / CUDA, the trainer's torch generator, numpy ``Generator`` bit-generator
state, python ``random``).
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import importlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import DataFormatError, DiffSTError
from ..io.writers import atomic_path
from .config import atomic_write_text

__all__ = ["save_checkpoint", "read_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state",
           "checkpoint_file", "resolve_callable", "unwrap_model", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "model.pt"
FORMAT = "napari-diffst-checkpoint"
FORMAT_VERSION = 1


def _version() -> str:
    try:
        from .. import __version__
        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def unwrap_model(model):
    """The underlying module of a DistributedDataParallel / DataParallel / compiled wrapper."""
    while True:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None or inner is model or not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def checkpoint_file(path) -> Path:
    """``path/model.pt`` for a checkpoint folder (``path`` may also be the ``.pt`` file itself)."""
    p = Path(path)
    return p if p.suffix == ".pt" else p / CHECKPOINT_NAME


def resolve_callable(spec: str):
    """Import ``'package.module:attr'`` (or ``'package.module.attr'``)."""
    mod, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise DiffSTError(f"cannot import {spec!r} ({e}); expected 'package.module:callable'") from None
    return obj


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng_state(np_rng: np.random.Generator | None = None,
                      torch_gen: torch.Generator | None = None) -> dict:
    """All RNG states a training step depends on (plain containers / tensors)."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["torch_cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    if np_rng is not None:
        st["numpy"] = np_rng.bit_generator.state
    if torch_gen is not None:
        st["torch_gen"] = torch_gen.get_state()
        st["torch_gen_device"] = str(torch_gen.device)
    return st


def restore_rng_state(state: dict, np_rng: np.random.Generator | None = None,
                      torch_gen: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (restores what the state has and the arguments allow)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "torch_cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all([s.cpu() for s in state["torch_cuda"]])
    if np_rng is not None and "numpy" in state:
        np_rng.bit_generator.state = state["numpy"]
    if torch_gen is not None and "torch_gen" in state:
        torch_gen.set_state(state["torch_gen"].cpu())


# ---------------------------------------------------------------------------------------------- save
def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def save_checkpoint(directory, *, model, ema_model=None, optimizer=None, step: int = 0,
                    train_config: dict | None = None, diffusion_config: dict | None = None,
                    genes=None, gene_scale=None, provenance: dict | None = None, rng_state: dict | None = None,
                    extra: dict | None = None, discriminator=None, disc_optimizer=None) -> Path:
    """Write a checkpoint folder atomically and return the path of its ``model.pt``.

    ``discriminator`` / ``disc_optimizer`` (adversarial training, ``TrainConfig.adv_weight``) are saved as
    ``state['discriminator']`` and ``state['disc_optimizer']`` (None when absent)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    net = unwrap_model(model)
    model_config = getattr(net, "config", None)
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": _version(),
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "step": int(step),
        "model_config": _jsonable(model_config) if model_config is not None else None,
        "train_config": _jsonable(train_config) if train_config is not None else None,
        "diffusion": _jsonable(diffusion_config) if diffusion_config is not None else None,
        "genes": [str(g) for g in genes] if genes is not None else None,
        "gene_scale": [float(x) for x in np.asarray(gene_scale, dtype=np.float64).ravel()]
        if gene_scale is not None else None,
        "provenance": _jsonable(provenance or {}),
        "extra": _jsonable(extra or {}),
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "ema": {k: v.detach().cpu() for k, v in unwrap_model(ema_model).state_dict().items()}
        if ema_model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "discriminator": {k: v.detach().cpu() for k, v in unwrap_model(discriminator).state_dict().items()}
        if discriminator is not None else None,
        "disc_optimizer": disc_optimizer.state_dict() if disc_optimizer is not None else None,
        "rng": rng_state,
    }
    target = directory / CHECKPOINT_NAME
    with atomic_path(target) as tmp:  # temp sibling + rename; the old checkpoint survives a failed save
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    summary = {k: state[k] for k in ("format", "format_version", "package_version", "saved_at", "step",
                                     "model_config", "train_config", "diffusion", "genes", "gene_scale",
                                     "provenance")}
    atomic_write_text(directory / "config.json", json.dumps(summary, indent=2) + "\n")
    return target


# ---------------------------------------------------------------------------------------------- load
def read_checkpoint(path, map_location="cpu") -> dict:
    """The raw checkpoint dict of a folder (or ``.pt`` file), validated; raises :class:`DataFormatError`."""
    f = checkpoint_file(path)
    if not f.is_file():
        raise DataFormatError(f, "checkpoint not found",
                              f"a folder written by napari-diffst training, containing {CHECKPOINT_NAME}")
    try:
        state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated / foreign files
        # torch's own text is long and about pickling; say what it means for the user, whole sentences only
        raise DataFormatError(f, f"cannot read checkpoint: the file is truncated or not a napari-diffst checkpoint "
                              f"(torch.load raised {type(e).__name__})",
                              f"a complete {CHECKPOINT_NAME} written by napari-diffst training; train again or "
                              "choose another checkpoint folder") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise DataFormatError(f, "not a napari-diffst checkpoint", f"a dict with format={FORMAT!r}")
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise DataFormatError(f, f"checkpoint format version {state['format_version']} is newer than this "
                              f"napari-diffst ({_version()}) understands",
                              "upgrade napari-diffst to the version that wrote it "
                              f"({state.get('package_version')})")
    return state


def _default_builder(state):
    spec = (state.get("train_config") or {}).get("model_factory")
    if spec:
        return resolve_callable(spec)
    try:
        from ..model import build_model
    except ImportError as e:
        raise DiffSTError(f"cannot rebuild the network: napari_diffst.model.build_model is unavailable ({e})") \
            from None
    # the checkpoint holds the encoder weights: never re-read a user's ``encoder_weights`` file (it may not
    # exist on this machine)
    return lambda cfg: build_model(cfg, load_weights=False)


def load_checkpoint(path, device="cpu", builder=None):
    """Load a checkpoint folder for inference or fine-tuning.

    The network is rebuilt from the saved model config with ``builder(config)`` — by default the
    ``model_factory`` of the saved training config, else :func:`napari_diffst.model.build_model`.

    Returns ``(model, ema_model, meta)``: the raw weights, the EMA weights (None if not saved), both in eval
    mode on ``device`` with ``diffusion_config`` attached (used by :func:`napari_diffst.diffusion.sample`), and
    ``meta`` — every non-tensor entry (step, train/model/diffusion config, genes, gene_scale, provenance,
    package_version, saved_at, rng, ...) plus ``path``.
    """
    f = checkpoint_file(path)
    state = read_checkpoint(f)
    build = builder or _default_builder(state)
    cfg = state.get("model_config")
    model = build(copy.deepcopy(cfg))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise DataFormatError(f, f"weights do not match the network built from the saved config: {str(e)[:300]}",
                              f"a checkpoint written by a compatible napari-diffst "
                              f"(this one: {state.get('package_version')})") from None
    ema = None
    if state.get("ema") is not None:
        ema = build(copy.deepcopy(cfg))
        ema.load_state_dict(state["ema"])
    for m in (model, ema):
        if m is not None:
            m.to(device).eval()
            m.diffusion_config = state.get("diffusion")
    meta = {k: v for k, v in state.items() if k not in ("model", "ema", "optimizer", "discriminator",
                                                         "disc_optimizer")}
    meta["path"] = str(f.parent)
    return model, ema, meta
