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
from ..io.safety import recover_temps, write_errors
from ..io.writers import atomic_path
from .config import atomic_write_text

__all__ = ["save_checkpoint", "read_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state",
           "checkpoint_file", "resolve_callable", "unwrap_model", "CHECKPOINT_NAME", "RUN_FILES",
           "CheckpointExistsError", "existing_checkpoint", "describe_checkpoint", "move_checkpoint_aside",
           "prepare_run_dir", "config_differences", "check_resume_config"]

CHECKPOINT_NAME = "model.pt"
#: the files of a run folder that belong to its checkpoint (moved aside together by ``--overwrite``)
RUN_FILES = (CHECKPOINT_NAME, "config.json", "resolved_config.json")
#: training options that may differ when a run is resumed: they change where / how long / how often, not what
#: is trained (``steps``: train longer or shorter — the LR schedule follows the new total)
RESUME_FREE_KEYS = frozenset({"steps", "device", "out_dir", "time_limit_s", "log_every", "checkpoint_every",
                              "checkpoint_on_cancel"})
FORMAT = "napari-diffst-checkpoint"
#: 2: adds ``method`` (the method object's prior, shrink α, knobs and geometry: :mod:`napari_diffst.method`);
#: version-1 checkpoints (no ``method``) still load
FORMAT_VERSION = 2


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
                    extra: dict | None = None, discriminator=None, disc_optimizer=None,
                    method: dict | None = None) -> Path:
    """Write a checkpoint folder atomically and return the path of its ``model.pt``.

    ``method``: the method object's state (:meth:`napari_diffst.method.DiffST.save`: prior regressor as tensors,
    shrink α, knobs, geometry; plain containers and tensors), saved as ``state['method']``.

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
        "method": method,
    }
    target = directory / CHECKPOINT_NAME
    for name in (CHECKPOINT_NAME, "config.json"):  # temporaries left by a save that was killed
        recover_temps(directory / name)
    prev = existing_checkpoint(directory)
    keep = (f"the previous checkpoint ({describe_checkpoint(prev)}) is intact" if prev else "no checkpoint was written")
    with write_errors(target, "checkpoint", previous=keep):
        with atomic_path(target) as tmp:  # temp sibling + rename; the old checkpoint survives a failed save
            torch.save(state, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        summary = {k: state[k] for k in ("format", "format_version", "package_version", "saved_at", "step",
                                         "model_config", "train_config", "diffusion", "genes", "gene_scale",
                                         "provenance")}
        if method is not None:  # the method's settings (tensors left out of the human-readable file)
            summary["method"] = _jsonable({k: v for k, v in method.items() if k != "prior"})
            pr = method.get("prior")
            summary["method"]["prior"] = None if pr is None else _jsonable(
                {k: v for k, v in pr.items() if not isinstance(v, torch.Tensor)})
        atomic_write_text(directory / "config.json", json.dumps(summary, indent=2) + "\n")
    return target


# ---------------------------------------------------------------------------------------------- run folders
class CheckpointExistsError(DiffSTError):
    """A new training run was pointed at a folder that already holds a checkpoint."""


def existing_checkpoint(directory) -> dict | None:
    """``{'path', 'step', 'steps', 'saved_at'}`` of the checkpoint in ``directory`` (None when it has none).

    Reads the small ``config.json`` beside ``model.pt`` (``step`` / ``steps`` None when it is unreadable)."""
    f = Path(directory) / CHECKPOINT_NAME
    if not f.is_file():
        return None
    info = {"path": str(f), "step": None, "steps": None, "saved_at": None}
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        js = json.loads((f.parent / "config.json").read_text())
        info.update(step=js.get("step"), steps=(js.get("train_config") or {}).get("steps"),
                    saved_at=js.get("saved_at"))
    return info


def describe_checkpoint(info: dict | None) -> str:
    """'step 120 of 400, saved 2026-01-01T10:00:00+00:00' for :func:`existing_checkpoint`'s answer."""
    if not info:
        return "none"
    if info.get("step") is None:
        return "step unknown"
    out = f"step {info['step']}" + (f" of {info['steps']}" if info.get("steps") else "")
    return out + (f", saved {info['saved_at']}" if info.get("saved_at") else "")


def move_checkpoint_aside(directory) -> Path | None:
    """Move the checkpoint files of ``directory`` (:data:`RUN_FILES`) into a dated sibling folder
    ``<name>.old-YYYYmmdd-HHMMSS`` — a loadable checkpoint folder itself — and return it (None if none)."""
    from ..io.safety import move_aside

    return move_aside(directory, RUN_FILES, tag="old")


def prepare_run_dir(directory, *, resume=None, overwrite: bool = False, log=None):
    """Decide what a training run writing into ``directory`` does with a checkpoint already there.

    ``resume``: None (a new run), True (continue the checkpoint in ``directory``) or another checkpoint folder
    to continue from. A new run (or one resuming from elsewhere) into a folder that holds a checkpoint raises
    :class:`CheckpointExistsError` unless ``overwrite``, which moves the old checkpoint aside
    (:func:`move_checkpoint_aside`) — it is never deleted. ``resume=True`` with no checkpoint in ``directory``
    yet (a run killed before its first save) starts afresh. ``log(message)`` receives what was done.

    Returns the checkpoint folder to resume from, or None for a fresh start."""
    from ..io.safety import recover_temps

    d = Path(directory)
    say = log or (lambda m: None)
    for name in (CHECKPOINT_NAME, "config.json"):
        recover_temps(d / name)
    have = existing_checkpoint(d)
    if resume is True or (resume is not None and Path(resume).absolute() == d.absolute()):
        if overwrite:
            raise CheckpointExistsError(f"--resume (continue the checkpoint in {d}) and --overwrite (move it aside "
                                        f"and start afresh) contradict each other: pass one of them")
        if have is None:
            say(f"no checkpoint in {d} yet: starting from step 0")
            return None
        say(f"resuming the checkpoint in {d} ({describe_checkpoint(have)})")
        return d
    if have is not None:
        if not overwrite:
            raise CheckpointExistsError(
                f"{d} already holds a checkpoint ({describe_checkpoint(have)}); not overwriting it. Rerun with "
                f"--resume to continue it (same settings), or --overwrite to move it aside to a dated folder "
                f"and start afresh")
        moved = move_checkpoint_aside(d)
        say(f"moved the previous checkpoint of {d} ({describe_checkpoint(have)}) to {moved}")
    return Path(resume) if resume is not None else None


def _canon(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else str(o)))


def config_differences(saved: dict, new: dict, ignore=RESUME_FREE_KEYS, prefix: str = "") -> list[str]:
    """``'key: checkpoint X, now Y'`` for each setting (nested dicts flattened) that differs."""
    saved, new = _canon(saved or {}), _canon(new or {})
    out = []
    for k in sorted(set(saved) | set(new)):
        if k in ignore:
            continue
        a, b = saved.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, ignore=(), prefix=f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r}, now {b!r}")
    return out


def check_resume_config(path, state: dict, train_config: dict, genes=None, gene_scale=None) -> None:
    """Raise :class:`DataFormatError` naming every difference between a checkpoint's run and the run that would
    resume it (training + network config, gene panel, normalisation); ``steps`` / ``device`` may differ."""
    diffs = config_differences(state.get("train_config") or {}, train_config)
    if genes is not None and list(map(str, state.get("genes") or [])) != [str(g) for g in genes]:
        diffs.append(f"genes: checkpoint {state.get('genes')}, now {list(genes)}")
    if gene_scale is not None and state.get("gene_scale") is not None:
        a, b = np.asarray(state["gene_scale"], float), np.asarray(gene_scale, float)
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=0):
            diffs.append("gene_scale (the data's normalisation): differs — other data or genes")
    if diffs:
        more = f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise DataFormatError(checkpoint_file(path), "cannot resume: this run's settings differ from the "
                              "checkpoint's: " + "; ".join(diffs[:6]) + more,
                              "the same data, genes, scale, budget and options as the run that wrote it "
                              "(only --steps and --device may change), or --overwrite to start afresh")


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
