"""``napari-diffst bench-speed``: sampling speed vs accuracy, throughput, whole-slide time and memory (Qt-free).

    napari-diffst bench-speed --budget quick --out speed.json [--checkpoint DIR --data SECTION]
        [--slide ../shared/data/her2st/C6 --slide-scale 2] [--memory] [--compile]

One model is trained (or loaded with ``--checkpoint``) and the *same* test field is super-resolved with
the full ``T = 1000``-step ancestral sampler and with the respaced sampler (``--respaced-steps``, ≤ 50),
plus every step count of the steps-vs-PCC curve; each run reports PCC / detail-PCC against the HR truth,
wall time and denoiser calls. JSON (the keys of the issue first)::

    {"full_steps": 1000, "respaced_steps": 50, "pcc_full": …, "pcc_respaced": …, "seconds_full": …,
     "seconds_respaced": …, "speedup": …, "device": "cpu", "calls_full": …, "calls_respaced": …,
     "budget": "quick", "curve": [{"steps", "pcc", "detail_pcc", "seconds", "calls"}, …],
     "train": {...}, "throughput": {...}, "wholeslide": {...} | null, "memory": [...] | null, "machine": {...}}

``throughput``: forward-pass tiles/s of the denoiser on a batch of HR tiles (fp32; on CUDA also bf16
autocast, channels-last and ``torch.compile`` with an eager fallback), FLOPs per forward
(``torch.utils.flop_counter``) and, on a GPU with a known bf16 peak, the achieved fraction of it; training
samples/s from the trainer. ``wholeslide``: tiled sampling (:mod:`napari_diffst.tiling`) of a whole section
(``--slide``) — weights are untrained there when the slide's panel differs from the model's, which does
not change the time. ``memory``: peak RSS of tiled whole-slide inference into OME-Zarr at two slide sizes,
each in a fresh subprocess (:func:`memory_probe`).
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DiffSTError

__all__ = ["SPEED_BUDGETS", "bench_speed", "throughput", "memory_probe", "memory_vs_size", "validate_speed",
           "format_speed", "BF16_PEAK_TFLOPS", "add_commands"]

#: dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.2, "V100": 125.0}

#: per-budget settings: data (train/test synthetic sections with HR truth), model preset, training steps
#: (a step count, never a time limit: the same seed trains the same model at any machine load; 'quick' is the
#: 200 steps that the former 240 s cap reached in docs/speed_quick.json),
#: sampling (respaced steps, curve, samples), throughput batch and whole-slide / memory sizes
SPEED_BUDGETS: dict[str, dict] = {
    "tiny": dict(model_preset="tiny", train=["synthetic:1"], test="synthetic:3", size_um=1000.0, scale=5,
                 n_genes=4, train_steps=20, batch_size=2, lr_size=4, respaced_steps=50,
                 curve=[10, 50], n_samples=1, tp_batch=2, tp_tile=32, tp_reps=2,
                 mem_sizes_um=[1000.0, 2000.0], mem_scale=5, mem_tile=32, mem_steps=2),
    "quick": dict(model_preset="quick", train=["synthetic:1", "synthetic:2"], test="synthetic:3", size_um=2000.0,
                  test_size_um=1200.0, scale=5, n_genes=25, train_steps=200, batch_size=4, lr_size=8,
                  respaced_steps=50, curve=[5, 10, 20, 50, 100, 250], n_samples=2, tp_batch=4, tp_tile=64,
                  tp_reps=5, mem_sizes_um=[3000.0, 6000.0], mem_scale=10, mem_tile=64, mem_steps=3),
    "full": dict(model_preset="full", train=["synthetic:1", "synthetic:2"], test="synthetic:3", size_um=3000.0,
                 scale=5, n_genes=25, train_steps=20000, batch_size=16, lr_size=16,
                 respaced_steps=50, curve=[5, 10, 20, 50, 100, 250], n_samples=4, tp_batch=16, tp_tile=64,
                 tp_reps=20, mem_sizes_um=[3250.0, 6500.0], mem_scale=10, mem_tile=128, mem_steps=20),
}


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _device_label(device) -> str:
    import torch

    d = torch.device(device)
    if d.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(d)})"
    return d.type


def _peak_tflops(device) -> float | None:
    import torch

    d = torch.device(device)
    if d.type != "cuda":
        return None
    name = torch.cuda.get_device_name(d)
    for key, v in BF16_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return v
    return None


def _untrained_config(n_genes: int, he_per_hr: int, preset: str) -> dict:
    """The network config :func:`napari_diffst.pipeline.build_diffst_model` would make (timing/memory probes)."""
    from .pipeline import DEFAULT_UPSAMPLE, network_config

    cfg = network_config(n_genes, he_per_hr, preset)
    cfg["diffusion"] = {"target": "x0", "upsample": DEFAULT_UPSAMPLE}
    return cfg


# ------------------------------------------------------------------------------------------ sampling
def _time_sampling(method, field, steps: int, n_samples: int, seed: int, device) -> dict:
    """Time :meth:`napari_diffst.method.DiffST.predict` (prior, diffusion, shrink: the product) at ``steps``."""
    from .benchmark import score_row

    _sync(device)
    t0 = time.perf_counter()
    res = method.predict(field, steps=int(steps), n_samples=int(n_samples), seed=seed, project=False)
    _sync(device)
    secs = time.perf_counter() - t0
    row, _ = score_row(res.mean, field, seed=seed)
    return {"steps": int(res.steps), "pcc": row["pcc"], "detail_pcc": row["detail_pcc"], "rmse": row["rmse"],
            "seconds": round(secs, 3), "calls": int(res.steps) * int(n_samples)}


# ------------------------------------------------------------------------------------------ throughput
def _flops_per_forward(model, x, t, cond) -> float | None:
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover
        return None
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x, t, cond)
        return float(fc.get_total_flops())
    except Exception:  # noqa: BLE001 - counting is best effort
        return None


def throughput(model, field, *, batch: int = 4, tile: int = 64, reps: int = 5, device="cpu",
               variants: Sequence[str] | None = None, quiet: bool = True) -> dict:
    """Denoiser forward throughput on ``batch`` HR tiles of ``tile`` px cut from ``field``.

    ``variants`` are names made of parts: ``fp32`` or ``bf16`` (autocast), ``_cl`` (channels-last),
    ``_compile`` (``torch.compile``; when compiling fails the row records the error instead). Default: 'fp32'
    on CPU; 'fp32', 'bf16', 'bf16_cl', 'bf16_cl_compile' on CUDA. Each row: ``tiles_per_s``,
    ``ms_per_forward``, ``achieved_tflops`` (counted FLOPs / time) and, for bf16 on a GPU with a known peak,
    ``peak_fraction``. Returns ``{'flops_per_forward', 'batch', 'tile', 'rows': {...}}``."""
    import contextlib

    import torch

    from .tiling import FieldSource

    device = torch.device(device)
    if variants is None:
        variants = ["fp32"] + (["bf16", "bf16_cl", "bf16_cl_compile"] if device.type == "cuda" else [])
    src = FieldSource(field)
    H, W = src.hr_shape
    tile = int(min(tile, H, W))
    tile -= tile % max(1, getattr(model, "pad_multiple", 1))
    upsample = (model.config.get("diffusion") or {}).get("upsample", "cubic")
    c = src.cond_tile(max(0, (H - tile) // 2), max(0, (W - tile) // 2), tile, tile, upsample)
    cond = {k: torch.from_numpy(np.repeat(v[None], batch, 0)).to(device) for k, v in c.items()}
    G = src.G
    x = torch.randn((batch, G, tile, tile), device=device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    model = model.to(device).eval()
    flops = _flops_per_forward(model, x, t, cond)
    peak = _peak_tflops(device)
    rows = {}
    for var in variants:
        m, xin = model, x
        if "_cl" in var:
            m = copy.deepcopy(model).to(memory_format=torch.channels_last)
            xin = x.contiguous(memory_format=torch.channels_last)
        amp = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if var.startswith("bf16")
               else contextlib.nullcontext())
        try:
            if "compile" in var:
                m = torch.compile(m)
            with torch.no_grad(), amp:
                for _ in range(3 if "compile" in var else 2):  # warm-up (compiling happens here)
                    m(xin, t, cond)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(int(reps)):
                    m(xin, t, cond)
                _sync(device)
                dt = (time.perf_counter() - t0) / int(reps)
        except Exception as exc:  # noqa: BLE001 - e.g. inductor without a C++ compiler: record, go on
            if "compile" in var:
                rows[var] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "fallback": "eager rows above"}
                _log(f"  throughput {var}: torch.compile failed ({type(exc).__name__}); eager rows stand", quiet)
                continue
            raise
        row = {"tiles_per_s": round(batch / dt, 3), "ms_per_forward": round(dt * 1e3, 2)}
        if flops:
            row["achieved_tflops"] = round(flops / dt / 1e12, 4)
            if peak and var.startswith("bf16"):
                row["peak_fraction"] = round(flops / dt / 1e12 / peak, 4)
        rows[var] = row
        _log(f"  throughput {var}: {row}", quiet)
    return {"flops_per_forward": flops, "batch": int(batch), "tile": int(tile), "he_per_hr": src.he_per_hr,
            "bf16_peak_tflops": peak, "rows": rows}


# ------------------------------------------------------------------------------------------ memory
def memory_probe(size_um: float, *, scale: int = 10, n_genes: int = 25, preset: str = "tiny", tile: int = 64,
                 overlap: int = 16, steps: int = 3, n_samples: int = 1, batch_tiles: int = 4, tiled: bool = True,
                 seed: int = 0, out_dir: str | None = None) -> dict:
    """Run tiled (or, with ``tiled=False``, whole-field) inference of an untrained ``preset`` network on a
    ``size_um`` square synthetic Visium-like section at ``scale`` and measure this process's RSS: before
    (sample and model loaded) and its peak during inference (sampled every 20 ms). Run it in a fresh process
    (:func:`memory_vs_size`) so earlier work does not hide or inflate the figure."""
    import torch

    from . import pipeline as P
    from .benchmark import PeakRSS
    from .tiling import SlideSource, super_resolve_tiled

    torch.manual_seed(seed)
    smp = P.load_data(f"synthetic:{seed}", size_um=(float(size_um), float(size_um)), technology="visium",
                      um_per_px=2.0, n_genes=n_genes)
    genes = list(smp.adata.var_names[:n_genes])
    src = SlideSource.from_sample(smp, genes, scale, he_per_hr=2)
    from .model import build_model

    model = build_model(_untrained_config(len(genes), 2, preset))
    H, W = src.hr_shape
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp, PeakRSS(interval=0.02) as rss:
        if tiled:
            res = super_resolve_tiled(model, src, tile=tile, overlap=overlap, steps=steps, n_samples=n_samples,
                                      batch_tiles=batch_tiles, out=Path(tmp) / "maps.ome.zarr", seed=seed)
            n_tiles = res.n_tiles
        else:
            fields, _ = P.make_fields([smp], genes, scale, mode="native", he_per_hr=2)
            P.super_resolve(model, fields[0], steps=steps, n_samples=n_samples, seed=seed)
            n_tiles = 1
    return {"size_um": float(size_um), "hr_shape": [int(H), int(W)], "genes": len(genes), "scale": int(scale),
            "tiled": bool(tiled), "tile": int(tile) if tiled else None, "n_tiles": int(n_tiles),
            "rss_before_mb": round(rss.start_mb, 1), "rss_peak_mb": round(rss.peak_mb, 1),
            "increase_mb": round(rss.increase_mb, 1), "seconds": round(time.perf_counter() - t0, 2),
            "rss_source": rss.source}


def memory_vs_size(sizes_um: Sequence[float], *, timeout: float = 1800.0, **kw) -> list[dict]:
    """:func:`memory_probe` for each size, each in a fresh Python process (one thread)."""
    out = []
    for s in sizes_um:
        args = json.dumps({"size_um": float(s), **kw})
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run([sys.executable, "-m", "napari_diffst.speed", "memprobe", args], capture_output=True,
                              text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise DiffSTError(f"memory probe at {s} µm failed:\n{proc.stderr[-2000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# ------------------------------------------------------------------------------------------ whole slide
def wholeslide_time(spec: str, *, scale: int, n_genes: int, preset: str, steps: int, n_samples: int,
                    tile: int, overlap: int = 16, batch_tiles: int = 4, device="cpu", model=None, genes=None,
                    seed: int = 0, size_um: float | None = None) -> dict:
    """Wall time of tiled super-resolution of a whole section (``spec``: a path any reader opens or
    ``synthetic[:SEED]``, optionally ``size_um`` square) at ``scale`` into an in-memory result."""
    from . import pipeline as P
    from .benchmark import select_genes_variance
    from .model import build_model
    from .tiling import SlideSource, super_resolve_tiled

    kw = {"size_um": (float(size_um),) * 2, "technology": "visium"} if size_um and str(spec).startswith(
        "synthetic") else {}
    t_load = time.perf_counter()
    smp = P.load_data(spec, **kw)
    if genes is None or model is None:
        genes = (list(smp.hr_truth.get("genes", []))[:n_genes] if smp.hr_truth else []) or \
            select_genes_variance([smp], n_genes)
    pitch = smp.lattice_pitch_um or smp.spot_diameter_um
    k = P.default_he_per_hr(pitch / scale)
    trained = model is not None and model.config.get("n_genes") == len(genes)
    if not trained:
        model = build_model(_untrained_config(len(genes), k, preset)).to(device)
    k = int(model.config["he_per_hr"])
    src = SlideSource.from_sample(smp, genes, scale, he_per_hr=k)
    load_s = time.perf_counter() - t_load
    _sync(device)
    t0 = time.perf_counter()
    res = super_resolve_tiled(model, src, tile=tile, overlap=overlap, steps=steps, n_samples=n_samples,
                              batch_tiles=batch_tiles, device=device, seed=seed)
    _sync(device)
    secs = time.perf_counter() - t0
    return {"section": smp.name, "scale": int(scale), "hr_shape": list(src.hr_shape), "hr_um": round(src.hr_um, 3),
            "genes": len(genes), "he_per_hr": k, "tile": int(tile), "overlap": int(overlap), "n_tiles": res.n_tiles,
            "steps": res.steps, "n_samples": res.n_samples, "seconds": round(secs, 2),
            "load_seconds": round(load_s, 2), "weights": "trained" if trained else "untrained (timing only)"}


# ------------------------------------------------------------------------------------------ main
def bench_speed(budget: str | dict = "quick", *, checkpoint: str | None = None, data: str | None = None,
                respaced_steps: int | None = None, curve: Sequence[int] | None = None, n_samples: int | None = None,
                seed: int = 0, device: str = "auto", slide: str | None = None, slide_scale: int = 2,
                slide_tile: int = 64, memory: bool = False, compile: bool | None = None,
                quiet: bool = False) -> dict:
    """Train (or load) one model and measure sampling speed vs PCC, throughput, and optionally the time of a
    whole section (``slide``) and memory vs slide size (``memory``). See the module docstring."""
    import torch

    from . import pipeline as P
    from .device import resolve_device
    from .method import DIFFUSION_BUDGETS, DiffST
    from .runinfo import loadavg as _loadavg, machine_info as _machine

    B = copy.deepcopy(SPEED_BUDGETS[budget]) if isinstance(budget, str) else \
        {**copy.deepcopy(SPEED_BUDGETS["tiny"]), **budget}
    bname = budget if isinstance(budget, str) else "custom"
    if respaced_steps is not None:
        B["respaced_steps"] = int(respaced_steps)
    if curve is not None:
        B["curve"] = [int(c) for c in curve]
    if n_samples is not None:
        B["n_samples"] = int(n_samples)
    if B["respaced_steps"] > 50:
        raise ValueError("the respaced sampler is compared at ≤ 50 steps")
    dev = torch.device(resolve_device(device))
    load0 = _loadavg()
    T0 = time.perf_counter()
    train_info: dict
    if checkpoint:
        if not data:
            raise DiffSTError("--checkpoint needs --data (a section with HR truth, e.g. synthetic:3)")
        method = DiffST.load(checkpoint, device=str(dev))
        model = method.model_
        test = P.load_data(data)
        field = method.make_field(test)
        if field.hr is None:
            raise DiffSTError(f"{data}: no HR truth to score the samplers against (use a synthetic section)")
        train_info = {"checkpoint": str(checkpoint), "data": data}
    else:
        size = (B["size_um"], B["size_um"])
        trains = [P.load_data(s, size_um=size, technology="visium") for s in B["train"]]
        ts = float(B.get("test_size_um") or B["size_um"])
        test = P.load_data(data or B["test"], size_um=(ts, ts), technology="visium")
        genes = P.choose_genes(trains, n_genes=B["n_genes"])
        fields, gs = P.make_fields(trains, genes, B["scale"])
        field = P.make_fields([test], genes, B["scale"], gene_scale=gs)[0][0]
        _log(f"bench-speed: training a '{B['model_preset']}' Diff-ST on {len(fields)} synthetic sections "
             f"({len(genes)} genes, {B['scale']}×, {B['train_steps']} steps) on {dev}",
             quiet)
        # the Diff-ST method object with the same-named diffusion budget's prior / sampler, this budget's size
        method = DiffST(budget=bname if bname in DIFFUSION_BUDGETS else "tiny", seed=seed, device=str(dev),
                        model_preset=B["model_preset"], steps=B["train_steps"], batch_size=B["batch_size"],
                        lr_size=B["lr_size"], train_overrides={"log_every": 5})
        tr = method.prepare_fit(fields, train_samples=trains)
        method.add_features(field, test)  # the test field's cell-level features (outside the timings)
        t_tr = time.perf_counter()
        step_times, last = [], None
        for ev in method.iter_train():
            last = ev
            if ev.kind == "step":
                step_times.append((ev.step, time.perf_counter()))
        secs = time.perf_counter() - t_tr
        model = method.model_
        rate = None
        if len(step_times) >= 3:  # skip the first logged step (warm-up)
            (s0, a), (s1, b) = step_times[1], step_times[-1]
            rate = (s1 - s0) * tr.config.batch_size / max(b - a, 1e-9)
        train_info = {"steps": int(getattr(last, "step", 0) or 0), "seconds": round(secs, 1),
                      "samples_per_s": round(rate, 3) if rate else None, "batch_size": tr.config.batch_size,
                      "patch_hr_px": tr.config.lr_size * B["scale"], "preset": B["model_preset"],
                      "train": list(B["train"]), "test": data or B["test"]}
        _log(f"  trained {train_info['steps']} steps in {secs:.0f} s", quiet)
    model.to(dev).eval()
    M = B["n_samples"]
    _log(f"  test field {field.name}: HR {field.hr_shape[0]}×{field.hr_shape[1]}, {field.G} genes, {M} samples",
         quiet)
    full = _time_sampling(method, field, 1000, M, seed, dev)
    _log(f"  1000 steps: PCC {full['pcc']:.4f} in {full['seconds']:.1f} s", quiet)
    curve_rows = {1000: full}
    for k in sorted(set(B["curve"]) | {B["respaced_steps"]}):
        if k >= 1000:
            continue
        curve_rows[k] = _time_sampling(method, field, k, M, seed, dev)
        _log(f"  {k} steps: PCC {curve_rows[k]['pcc']:.4f} in {curve_rows[k]['seconds']:.2f} s", quiet)
    resp = curve_rows[B["respaced_steps"]]
    if dev.type == "cuda":
        variants = ["fp32", "bf16", "bf16_cl"] + ([] if compile is False else ["bf16_cl_compile"])
    else:
        variants = ["fp32"] + (["fp32_compile"] if compile else [])
    tp = throughput(model, field, batch=B["tp_batch"], tile=B["tp_tile"], reps=B["tp_reps"], device=dev,
                    variants=variants, quiet=quiet)
    if tp is not None:
        tp["training_samples_per_s"] = train_info.get("samples_per_s")
    ws = None
    if slide:
        ws = wholeslide_time(slide, scale=slide_scale, n_genes=field.G, preset=B["model_preset"],
                             steps=B["respaced_steps"] if B["respaced_steps"] <= 20 else 20, n_samples=M,
                             tile=slide_tile, device=dev, seed=seed)
        _log(f"  whole section {ws['section']} at {slide_scale}×: {ws['seconds']:.1f} s ({ws['n_tiles']} tiles)", quiet)
    mem = None
    if memory:
        mem = memory_vs_size(B["mem_sizes_um"], scale=B["mem_scale"], tile=B["mem_tile"], steps=B["mem_steps"],
                             preset="tiny" if bname == "tiny" else B["model_preset"])
        for r in mem:
            _log(f"  memory {r['size_um']:.0f} µm ({r['hr_shape'][0]}×{r['hr_shape'][1]} HR px): peak RSS "
                 f"{r['rss_peak_mb']:.0f} MiB (+{r['increase_mb']:.0f} MiB over {r['rss_before_mb']:.0f})", quiet)
    label = _device_label(dev)
    out = {"full_steps": 1000, "respaced_steps": resp["steps"], "pcc_full": full["pcc"],
           "pcc_respaced": resp["pcc"], "seconds_full": full["seconds"], "seconds_respaced": resp["seconds"],
           "speedup": round(full["seconds"] / max(resp["seconds"], 1e-9), 2), "device": label,
           "calls_full": full["calls"], "calls_respaced": resp["calls"],
           "pcc_gap": None if full["pcc"] is None or resp["pcc"] is None else round(full["pcc"] - resp["pcc"], 4),
           "budget": bname, "genes": list(field.genes), "scale": int(field.scale), "n_samples": M, "seed": seed,
           "curve": [curve_rows[k] for k in sorted(curve_rows)], "train": train_info, "throughput": tp,
           "wholeslide": ws, "memory": mem,
           "machine": {**_machine(label, load0), "total_seconds": round(time.perf_counter() - T0, 1),
                       "date": time.strftime("%Y-%m-%d")}}
    problems = validate_speed(out)
    if problems:  # pragma: no cover - a bug, not a user error
        raise DiffSTError("bench-speed produced an invalid result: " + "; ".join(problems))
    return out


def validate_speed(obj: dict) -> list[str]:
    """Problems with a bench-speed JSON document (empty list = valid)."""
    probs = []
    req = {"full_steps": int, "respaced_steps": int, "pcc_full": (float, type(None)),
           "pcc_respaced": (float, type(None)), "seconds_full": (int, float), "seconds_respaced": (int, float),
           "speedup": (int, float), "device": str}
    for k, typ in req.items():
        if k not in obj:
            probs.append(f"missing {k!r}")
        elif not isinstance(obj[k], typ) or isinstance(obj[k], bool):
            probs.append(f"{k!r} has type {type(obj[k]).__name__}")
    if obj.get("full_steps") != 1000:
        probs.append("full_steps must be 1000")
    if isinstance(obj.get("respaced_steps"), int) and not 1 <= obj["respaced_steps"] <= 50:
        probs.append("respaced_steps must be in 1..50")
    for r in obj.get("curve") or []:
        if set(r) < {"steps", "pcc", "seconds"}:
            probs.append(f"curve row {r} lacks steps/pcc/seconds")
    for k in ("pcc_full", "pcc_respaced"):
        v = obj.get(k)
        if isinstance(v, float) and not math.isfinite(v):
            probs.append(f"{k} is not finite")
    return probs


def format_speed(r: dict) -> str:
    f = lambda v, nd=4: "—" if v is None else f"{v:.{nd}f}"  # noqa: E731
    lines = [f"bench-speed ({r['budget']}, {r['device']}, {len(r['genes'])} genes, {r['scale']}×, "
             f"{r['n_samples']} samples per map)",
             f"{'sampler':<22}{'steps':>6}{'calls':>7}{'PCC':>9}{'detail':>9}{'seconds':>10}"]
    for row in r["curve"]:
        name = "full (T=1000)" if row["steps"] == 1000 else \
            ("respaced (compared)" if row["steps"] == r["respaced_steps"] else "respaced")
        lines.append(f"{name:<22}{row['steps']:>6}{row['calls']:>7}{f(row['pcc']):>9}{f(row['detail_pcc']):>9}"
                     f"{row['seconds']:>10.2f}")
    lines.append(f"speedup {r['speedup']:.1f}× with {r['calls_full'] // max(r['calls_respaced'], 1)}× fewer "
                 f"denoiser calls; PCC full − respaced = {f(r['pcc_gap'])}")
    tp = r.get("throughput")
    if tp:
        lines.append(f"throughput ({tp['batch']} tiles of {tp['tile']}² HR px, "
                     f"{(tp['flops_per_forward'] or 0) / 1e9:.2f} GFLOP per forward):")
        for k, v in tp["rows"].items():
            lines.append(f"  {k:<14}" + ("  ".join(f"{a}={b}" for a, b in v.items())))
    ws = r.get("wholeslide")
    if ws:
        lines.append(f"whole section {ws['section']} at {ws['scale']}× ({ws['hr_shape'][0]}×{ws['hr_shape'][1]} HR px, "
                     f"{ws['n_tiles']} tiles, {ws['steps']} steps × {ws['n_samples']}): {ws['seconds']:.1f} s "
                     f"[{ws['weights']}]")
    for m in r.get("memory") or []:
        lines.append(f"memory {m['size_um']:.0f} µm square ({m['hr_shape'][0]}×{m['hr_shape'][1]} HR px, "
                     f"{m['n_tiles']} tiles): peak RSS {m['rss_peak_mb']:.0f} MiB, +{m['increase_mb']:.0f} MiB "
                     "during inference")
    return "\n".join(lines)


def cmd_bench_speed(args) -> int:
    res = bench_speed(args.budget, checkpoint=args.checkpoint, data=args.data, respaced_steps=args.respaced_steps,
                      curve=[int(x) for x in args.curve.split(",")] if args.curve else None,
                      n_samples=args.n_samples, seed=args.seed, device=args.device, slide=args.slide,
                      slide_scale=args.slide_scale, slide_tile=args.slide_tile, memory=args.memory,
                      compile=args.compile, quiet=args.quiet)
    print(format_speed(res))
    if args.out:
        from .io.writers import atomic_path

        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    b = sub.add_parser("bench-speed", help="full 1000-step vs respaced sampling (speed and PCC), throughput, "
                                           "whole-slide time and memory")
    b.add_argument("--budget", choices=sorted(SPEED_BUDGETS), default="quick")
    b.add_argument("--checkpoint", default=None, help="use this trained checkpoint instead of training")
    b.add_argument("--data", default=None, help="test section with HR truth (default: the budget's synthetic)")
    b.add_argument("--respaced-steps", type=int, default=None, help="steps of the respaced sampler (≤ 50)")
    b.add_argument("--curve", default=None, help="comma-separated step counts for the steps-vs-PCC curve")
    b.add_argument("--n-samples", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto")
    b.add_argument("--slide", default=None, help="also time tiled super-resolution of this whole section")
    b.add_argument("--slide-scale", type=int, default=2)
    b.add_argument("--slide-tile", type=int, default=64)
    b.add_argument("--memory", action="store_true", help="peak RSS of tiled inference at two slide sizes")
    b.add_argument("--compile", action=argparse_bool(), default=None,
                   help="also time torch.compile (default: on CUDA only)")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--out", default=None, help="write the JSON here")
    b.set_defaults(func=cmd_bench_speed)


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def _main(argv: list[str]) -> int:  # python -m napari_diffst.speed memprobe '{json kwargs}'
    if len(argv) >= 2 and argv[0] == "memprobe":
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
        print(json.dumps(memory_probe(**json.loads(argv[1]))))
        return 0
    print("usage: python -m napari_diffst.speed memprobe '{\"size_um\": 2000}'", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main(sys.argv[1:]))
