"""Multi-process training with DistributedDataParallel (gloo on CPU, nccl on CUDA).

Launch with torchrun (one process per GPU; ``batch_size`` in the config is per process)::

    torchrun --standalone --nproc_per_node=4 -m napari_diffst.train.ddp --config cfg.json --out runs/ddp

``cfg.json`` is a :class:`TrainConfig` (see ``TrainConfig.to_json``). The network is built with
``model_factory`` ('module:callable', called with the ``model`` dict) or else
``napari_diffst.model.build_model(config['model'])``. The data come from ``config['data']``:

* ``{"source": "synthetic", "genes": 4, "scale": 2, "he_per_hr": 2}`` — a toy source for smoke tests;
* ``{"source": "package.module:callable", ...kwargs}`` — called as ``callable(config, **kwargs)``; it returns a
  list of :class:`~napari_diffst.data.pairs.SRField` (patches are drawn with ``random_patches``), a
  ``batch_fn(step, rng)``, or a dict with ``fields`` / ``batch_fn`` and optionally ``genes``, ``gene_scale``,
  ``provenance``.

All ranks start from the same weights (DDP broadcasts rank 0's), draw different data (per-rank seeds) and
average gradients; only rank 0 writes checkpoints and prints events (one JSON object per line on stdout).
Without torchrun (no ``RANK`` in the environment) the same command trains in a single process.
``--resume DIR`` continues from a checkpoint folder.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import resolve_device
from ..errors import DiffSTError
from .checkpoint import resolve_callable
from .config import TrainConfig
from .trainer import Trainer, synthetic_batch_fn

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "build_model_from_config", "build_data",
           "make_trainer", "free_port", "main"]


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None


def free_port() -> int:
    """A free TCP port on localhost (for a local process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(rank: int | None = None, world_size: int | None = None, *, backend: str | None = None,
                     master_addr: str = "127.0.0.1", master_port: int | None = None,
                     device: str = "auto") -> DistInfo:
    """Join (or create) the process group.

    Under torchrun ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` come from the environment; for
    ``torch.multiprocessing.spawn`` pass ``rank``, ``world_size`` and ``master_port``. The backend is nccl when
    CUDA is used, else gloo. Returns a single-process :class:`DistInfo` when world_size is 1."""
    env = os.environ
    rank = int(env.get("RANK", 0)) if rank is None else int(rank)
    world_size = int(env.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    local_rank = int(env.get("LOCAL_RANK", rank))
    if world_size <= 1:
        return DistInfo(0, 1, 0, resolve_device(device), None)
    use_cuda = torch.cuda.is_available() and str(device).split(":")[0] in ("auto", "cuda")
    dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if use_cuda else "gloo")
    if "MASTER_ADDR" not in env or master_port is not None:
        os.environ["MASTER_ADDR"] = master_addr
    if master_port is not None:
        os.environ["MASTER_PORT"] = str(master_port)
    elif "MASTER_PORT" not in env:
        raise DiffSTError("no MASTER_PORT: launch with torchrun, or pass master_port")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev, backend)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def build_model_from_config(cfg: TrainConfig):
    """The network of a training config (``model_factory`` or ``napari_diffst.model.build_model``)."""
    if cfg.model_factory:
        return resolve_callable(cfg.model_factory)(dict(cfg.model))
    try:
        from ..model import build_model
    except ImportError as e:
        raise DiffSTError(f"napari_diffst.model.build_model is unavailable ({e}); set model_factory") from None
    return build_model(dict(cfg.model))


def build_data(cfg: TrainConfig) -> dict:
    """Resolve ``cfg.data`` into Trainer keyword arguments (``batch_fn`` or ``fields`` and metadata)."""
    spec = dict(cfg.data or {})
    source = spec.pop("source", None)
    if source is None:
        raise DiffSTError("the training config has no data source: set data={'source': 'module:callable', ...} "
                          "or {'source': 'synthetic'}")
    if source == "synthetic":
        return {"batch_fn": synthetic_batch_fn(batch_size=cfg.batch_size, lr_size=cfg.lr_size, **spec)}
    res = resolve_callable(source)(cfg, **spec)
    if callable(res):
        return {"batch_fn": res}
    if isinstance(res, dict):
        return {k: v for k, v in res.items() if k in ("batch_fn", "fields", "genes", "gene_scale", "provenance")}
    return {"fields": list(res)}


def make_trainer(cfg: TrainConfig, info: DistInfo, *, model=None, resume=None, out_dir=None, should_stop=None,
                 **data) -> Trainer:
    """A Trainer for this process (wrapping in DDP when ``info.world_size > 1``)."""
    data = data or build_data(cfg)
    if resume:
        return Trainer.from_checkpoint(resume, model=model, out_dir=out_dir, should_stop=should_stop,
                                       device=info.device, rank=info.rank, world_size=info.world_size,
                                       overrides={"steps": cfg.steps},
                                       **{k: v for k, v in data.items() if k in ("batch_fn", "fields")})
    if model is None:
        torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        model = build_model_from_config(cfg)
    return Trainer(model, cfg, out_dir=out_dir, should_stop=should_stop, device=info.device, rank=info.rank,
                   world_size=info.world_size, **data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m napari_diffst.train.ddp",
                                 description="Diff-ST training (single process or under torchrun / DDP).")
    ap.add_argument("--config", required=True, help="TrainConfig JSON file")
    ap.add_argument("--out", default=None, help="checkpoint folder (default: config out_dir)")
    ap.add_argument("--resume", default=None,
                    help="continue from this checkpoint folder (with its saved config; only --steps overrides)")
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps")
    args = ap.parse_args(argv)
    cfg = TrainConfig.from_json(args.config)
    if args.steps is not None:
        cfg = cfg.replace(steps=args.steps)
    rc, info = 0, None
    try:
        info = init_distributed(device=cfg.device)
        cfg = cfg.replace(device=str(info.device))
        tr = make_trainer(cfg, info, resume=args.resume, out_dir=args.out or cfg.out_dir)
        for ev in tr.iter_train():
            print(json.dumps(ev.to_dict()), flush=True)
    except DiffSTError as e:
        if info is None or info.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        rc = 1
    finally:
        cleanup_distributed()
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
