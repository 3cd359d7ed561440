"""Engine sub-commands of the ``napari-diffst`` console script: train / sample / evaluate.

(benchmark and bench-speed are added by :mod:`napari_diffst.benchmark` when present.)"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .errors import DataFormatError


def _bar(total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=1.0)


def _drain(events, bar):
    """Run a sampling generator to its end, showing its ``done``/``total`` on ``bar``; return its result."""
    res = None
    for ev in events:
        if "result" in ev:
            res = ev["result"]
        elif "stage" in ev:
            print(ev.get("message", ev["stage"]), file=sys.stderr)
        else:
            bar.total, bar.n = ev["total"], ev["done"]
            bar.refresh()
    bar.close()
    return res


def _split_genes(s: str | None):
    return [g.strip() for g in s.split(",") if g.strip()] if s else None


def _ablation(args) -> tuple:
    """The Diff-ST components switched off by ``--no-cam`` / ``--no-cigc`` / ``--no-hier``."""
    return tuple(key for flag, key in (("no_cam", "cam"), ("no_cigc", "cigc"), ("no_hier", "hier"))
                 if getattr(args, flag, False))


def train_knobs(args) -> dict:
    """:class:`napari_diffst.method.DiffST` knobs from the command line: ``--steps`` / ``--batch-size`` /
    ``--lr-size`` and every ``--set KEY=VALUE`` (a knob of the budget, a model config key or a TrainConfig
    field, :func:`napari_diffst.benchmark.parse_diffst_set`); everything else is the budget's — the knobs the
    benchmark measured."""
    kn: dict = {}
    if getattr(args, "set", None):  # engine options, e.g. --set hist_features=handcrafted --set adv_weight=0.01
        from .benchmark import parse_diffst_set

        kn.update(parse_diffst_set(args.set))
    for flag, key in (("steps", "steps"), ("batch_size", "batch_size"), ("lr_size", "lr_size")):
        if getattr(args, flag, None) is not None:
            kn[key] = int(getattr(args, flag))
    return kn


def cmd_train(args) -> int:
    from . import pipeline as P
    from .method import DiffST
    from .train.checkpoint import prepare_run_dir

    t0 = time.time()
    # a folder that holds a checkpoint: refuse, resume it (--resume) or move it aside (--overwrite)
    resume = prepare_run_dir(args.out, resume=args.resume, overwrite=args.overwrite,
                             log=lambda m: print(m, file=sys.stderr))
    samples = [P.load_data(d, seed=args.seed) for d in args.data]
    for s in samples:
        print(f"data: {s.summary()}", file=sys.stderr)
    genes = P.choose_genes(samples, n_genes=args.n_genes, genes=_split_genes(args.genes))
    fields, gene_scale = P.make_fields(samples, genes, args.scale)
    val_sample = val_field = None
    if getattr(args, "val", None):  # a held-out section: fits the shrink of the added detail
        val_sample = P.load_data(args.val, seed=args.seed)
        (val_field,), _ = P.make_fields([val_sample], genes, args.scale, gene_scale=gene_scale)
    method = DiffST(budget=args.budget, seed=args.seed, device=args.device, ablate=_ablation(args),
                    **train_knobs(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kn = method.resolved_knobs()
    print(f"training Diff-ST on {len(fields)} section(s), {len(genes)} genes, {args.scale}×, {kn['steps']} steps, "
          f"prior {kn['prior']} → {out}", file=sys.stderr)
    bar = _bar(kn["steps"], "train")
    last = None
    method.prepare_fit(fields, val_field, train_samples=samples, val_sample=val_sample, out_dir=out, resume=resume,
                       provenance={"data": [str(d) for d in args.data], "genes_from": "training data"})
    if resume is not None:  # on CPU: the thread count of the run that wrote the checkpoint (bit-for-bit resume)
        note = method.trainer.match_checkpoint_threads()
        if note:
            print(note, file=sys.stderr)
    for ev in method.iter_train():
        if last is None:  # the trainer exists now: the resolved settings beside the checkpoint
            resolved = {
                "data": [str(d) for d in args.data], "val": getattr(args, "val", None), "scale": args.scale,
                "genes": list(genes), "gene_scale": [float(x) for x in gene_scale], "budget": args.budget,
                "seed": args.seed, "method": method.name, "knobs": json.loads(json.dumps(kn, default=str)),
                "fields": [{"name": f.name, "mode": "truth" if s.hr_truth else "degrade",
                            "lr_shape": list(f.lr.shape), "hr_um": f.hr_um, "he_per_hr": f.he_per_hr}
                           for f, s in zip(fields, samples)],
                "train": method.trainer.config.to_dict(), "device": str(method.trainer.device),
            }
            (out / "resolved_config.json").write_text(json.dumps(resolved, indent=2))
        last = ev
        if ev.kind == "step":
            bar.n = ev.step
            bar.set_postfix({k: f"{v:.4f}" for k, v in ev.losses.items() if k in ("loss", "mse", "disentangle")})
            bar.refresh()
    bar.close()
    if last is not None and last.kind in ("done", "cancelled"):
        extra = f"; shrink α {method.alpha_:.3f}" if val_field is not None and kn.get("shrink") else ""
        print(f"{last.kind} at step {last.step} in {time.time() - t0:.1f} s{extra}; checkpoint: "
              f"{method.trainer.last_checkpoint}")
    return 0 if last is None or last.kind != "error" else 1


def _field_for(sample, genes, scale, gene_scale, mode, he_per_hr=None):
    """The field a checkpoint is applied to; ``he_per_hr`` must be the network's (H&E px per HR px)."""
    from . import pipeline as P

    m = mode if mode != "auto" else ("truth" if sample.hr_truth else "native")
    fields, _ = P.make_fields([sample], genes, scale, mode=m, gene_scale=gene_scale, he_per_hr=he_per_hr)
    return fields[0], m


def _load_ckpt(path, device):
    """``(network, meta, genes, scale, gene_scale)`` of a checkpoint (the bare network; :meth:`DiffST.load` for
    the whole method)."""
    from .method import DiffST

    m = DiffST.load(path, device=device)
    return m.model_, m.meta_, list(m.genes_), int(m.geometry_["scale"]), np.asarray(m.gene_scale_, float)


def cmd_sample(args) -> int:
    from . import pipeline as P
    from .io.scverse import SectionFrame
    from .io.writers import choose_format, write_maps

    fmt = choose_format(args.out, args.format)
    if getattr(args, "tile", 0) and fmt != "ome-zarr":
        raise DataFormatError(args.out, f"--tile writes OME-Zarr tile by tile (bounded memory), not {fmt}",
                              "an .ome.zarr output with --tile, or no --tile for .h5ad/.ome.tif/SpatialData")
    from .io.safety import recover_temps, refuse_existing

    # partial outputs of a killed earlier `sample --out` to this target go (a folder it had moved aside comes back)
    recover_temps(args.out, log=lambda m: print(m, file=sys.stderr))
    refuse_existing(args.out, getattr(args, "overwrite", False))  # an existing output is replaced only if asked
    from .tiling import plan_sampling

    from .method import DiffST

    method = DiffST.load(args.checkpoint, device=args.device)
    model, genes, scale = method.model_, list(method.genes_), int(method.geometry_["scale"])
    gene_scale = np.asarray(method.gene_scale_, float)
    steps = int(args.steps or method.knobs_["sample_steps"])
    n_samples = int(args.n_samples or method.knobs_["n_samples"])
    args.steps, args.n_samples = steps, n_samples
    args.sampler = args.sampler or method.knobs_.get("sampler", "ddpm")
    sample = P.load_data(args.data, seed=args.seed_data)
    mode = args.mode if args.mode != "auto" else ("truth" if sample.hr_truth else "native")
    plan = plan_sampling(sample, genes, scale, gene_scale=gene_scale, mode=mode, he_per_hr=model.config["he_per_hr"],
                         n_samples=n_samples, tile=getattr(args, "tile", 0) or 0,
                         overlap=getattr(args, "overlap", None), budget_mb=getattr(args, "max_untiled_mb", None))
    if plan.tiled:
        if fmt != "ome-zarr":
            raise DataFormatError(args.out, f"this section needs tiled sampling ({plan.describe()}), which writes "
                                  f"OME-Zarr tile by tile, not {fmt}", "an .ome.zarr output")
        return _sample_tiled(args, method, sample, genes, scale, gene_scale, plan)
    field = method.make_field(sample, mode)
    print(f"super-resolving {sample.name} ({mode}) {len(genes)} genes at {scale}× "
          f"(HR {field.hr_um:.4g} µm) with {args.steps} steps × {args.n_samples} samples — {plan.describe()}",
          file=sys.stderr)
    t0 = time.time()
    res = _drain(method.iter_predict(field, sample=sample, steps=steps, n_samples=n_samples, seed=args.seed,
                                     self_check="auto" if getattr(args, "self_check", True) else False,
                                     sampler=args.sampler), _bar(steps * n_samples, "sample"))
    secs = time.time() - t0
    from .data.grids import display_mask, field_napari_affine, shown_maps

    A = np.asarray(field.extra.get("hr_affine", np.eye(3)), float)
    gs = np.asarray(gene_scale, np.float32)[:, None, None]
    outside = ~display_mask(sample, field)[None]  # NaN outside the tissue (0 means "no expression")
    md = {"napari_diffst": {"checkpoint": str(args.checkpoint), "data": str(args.data), "mode": mode,
                            "scale": scale, "steps": args.steps, "n_samples": args.n_samples, "seed": args.seed,
                            "hr_um": field.hr_um, "units": "log1p(CP10k)", "hr_affine_px": A.tolist(),
                            "um_per_px_fullres": field.um_per_px, "seconds": secs,
                            "gene_scale": [float(x) for x in gene_scale], "method": method.name,
                            "prior": (method.knobs_ or {}).get("prior") if method.prior_ is not None else "cubic",
                            "shrink_alpha": float(method.alpha_), "trained_steps": int(method.trained_steps_)}}
    if res.report is not None:  # true to the spots (native): the figures travel with the maps
        md["napari_diffst"]["spot_report"] = res.report
        _print_report(res.report, sample.name)
    if getattr(args, "report", None):
        _write_report(args.report, sample.name, res.report, mode)
    shown = ~outside[0]
    write_maps(args.out, shown_maps(res.mean * gs, field.hr_mask, shown), genes, field.hr_um, fmt=fmt, mask=shown,
               extra_channels={"uncertainty": shown_maps(res.std * gs, field.hr_mask, shown)}, metadata=md,
               frame=SectionFrame.from_field(field, sample), affine_um=field_napari_affine(field, "hr"))
    print(f"wrote {args.out} as {fmt} ({len(genes)} genes + uncertainty, {field.hr_shape[0]}×{field.hr_shape[1]} px at "
          f"{field.hr_um:.4g} µm) in {secs:.1f} s")
    return 0


def _print_report(rep: dict, name: str) -> None:
    from .spot_consistency import REPORT_KEYS

    from .method import format_self_check

    if all(k in rep for k in REPORT_KEYS):
        print(f"true to the spots ({name}): " + ", ".join(f"{k} {rep[k]}" for k in REPORT_KEYS), file=sys.stderr)
    if rep.get("self_check"):
        print(format_self_check(rep["self_check"], full_warning=True), file=sys.stderr)


def _write_report(path, name: str, rep: dict | None, mode: str) -> None:
    """``--report``: the true-to-the-spots figures per section as JSON (``{"sections": {name: {...}}}``)."""
    if rep is None:
        raise DataFormatError(path, f"no spot report for mode {mode!r}: the figures are measured against the "
                              "section's own spots at native resolution", "--mode native (or auto on a section "
                              "without HR truth), untiled")
    doc = {"sections": {name: rep}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}", file=sys.stderr)


def _sample_tiled(args, method, sample, genes, scale, gene_scale, plan) -> int:
    """Whole-slide path (``--tile``, or automatic above the memory budget: :func:`tiling.plan_sampling`): lazy
    H&E per tile, each tile run through the checkpoint's method (its prior as the base, the shrink α), tiles
    blended straight into the OME-Zarr (bounded memory), then (native) projected onto the spots band by band;
    ``--report`` reads the maps whole once for the spot report."""
    from .tiling import super_resolve_tiled_iter

    src = plan.source()
    H, W = src.hr_shape
    what = (f"prior {(method.knobs_ or {}).get('prior')} + shrink α {method.alpha_:.3f} per tile"
            if method.prior_ is not None else f"cubic LR↑, shrink α {method.alpha_:.3f}")
    print(f"super-resolving {sample.name} ({plan.mode}) {len(genes)} genes at {scale}× (HR {src.hr_um:.4g} µm) "
          f"with {args.steps} steps × {args.n_samples} samples — {plan.describe()}; {what}", file=sys.stderr)
    t0 = time.time()
    check = None
    if plan.mode == "native" and getattr(args, "self_check", True):
        from .method import format_self_check

        print(f"self-check on {sample.name}, one level coarser", file=sys.stderr)
        check = method.self_check(sample, steps=args.steps, n_samples=args.n_samples, seed=args.seed,
                                  sampler=args.sampler)
        print(format_self_check(check, full_warning=True), file=sys.stderr)
    res = _drain(super_resolve_tiled_iter(method, src, tile=plan.tile, overlap=plan.overlap, steps=args.steps,
                                          n_samples=args.n_samples, seed=args.seed, sampler=args.sampler,
                                          batch_tiles=args.batch_tiles, out=args.out,
                                          report=bool(getattr(args, "report", None)), self_check=check),
                 _bar(1, "tiles"))
    if res.projection is not None:
        print(f"projected onto the spots in {res.projection['bands']} bands (max residual "
              f"{res.projection['max_residual']} log1p)", file=sys.stderr)
    if res.report is not None:  # (its self-check was printed before sampling)
        _print_report({k: v for k, v in res.report.items() if k != "self_check"}, sample.name)
    if getattr(args, "report", None):
        _write_report(args.report, sample.name, res.report, plan.mode)
    print(f"wrote {args.out} ({len(genes)} genes + uncertainty, {H}×{W} px at {src.hr_um:.4g} µm, "
          f"{res.n_tiles} tiles) in {time.time() - t0:.1f} s")
    return 0


def cmd_evaluate(args) -> int:
    from . import pipeline as P
    from .io.writers import read_maps
    from .metrics import score_field

    mf = read_maps(args.pred)
    md = (mf.metadata or {}).get("napari_diffst", {})
    scale = int(args.scale or md.get("scale") or 0)
    if not scale:
        raise DataFormatError(args.pred, "no scale in the file's metadata", "pass --scale")
    gene_scale = np.asarray(md.get("gene_scale") or [], float)
    sample = P.load_data(args.data, seed=args.seed_data)
    mode = args.mode if args.mode != "auto" else md.get("mode", "truth" if sample.hr_truth else "degrade")
    if mode == "native":
        raise DataFormatError(args.pred, "maps were made at native resolution, where no HR truth exists",
                              "evaluate maps made with --mode truth or degrade")
    field, _ = _field_for(sample, mf.genes, scale, gene_scale if gene_scale.size else None, mode, he_per_hr=1)
    pred = np.asarray(mf.maps, np.float32) / np.asarray(field.gene_scale, np.float32)[:, None, None]
    if pred.shape != field.hr.shape:
        raise DataFormatError(args.pred, f"maps have shape {pred.shape}, the HR truth {field.hr.shape}",
                              "maps sampled from the same data, genes and scale")
    sc = score_field(np.nan_to_num(pred), field)
    print(f"{'metric':<16}{'value':>10}")
    for k in ("pcc", "rmse", "ssim", "detail_pcc", "consistency_pcc", "split_half_ceiling"):
        if k in sc:
            print(f"{k:<16}{sc[k]:>10.4f}")
    if args.out:
        out = {k: v for k, v in sc.items() if k != "per_gene"}
        pg = sc.get("per_gene", {})
        out["per_gene"] = {k: (list(map(str, v)) if k == "gene" else [float(x) for x in np.asarray(v)])
                           for k, v in pg.items()}
        Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    return 0


def add_commands(sub) -> None:
    t = sub.add_parser("train", help="train a Diff-ST model; writes checkpoints and the resolved config")
    t.add_argument("--data", nargs="+", required=True, help="section paths (any reader) or 'synthetic'")
    t.add_argument("--scale", type=int, default=5, help="super-resolution factor s (2–10)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--n-genes", type=int, default=25, help="panel size chosen on the training data (HVG)")
    g.add_argument("--genes", help="comma-separated gene names (case-insensitive)")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: the budget's)")
    t.add_argument("--val", default=None, help="a held-out section (any reader): fits the shrink α of the detail the "
                                               "diffusion adds to the prior (without it α = 1)")
    t.add_argument("--budget", choices=["tiny", "quick", "full"], default="quick")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr-size", type=int, default=None, help="LR pixels per training patch side")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="FOLDER",
                   help="continue the checkpoint in --out (or in FOLDER) where it stopped; the settings must be "
                        "the same (checked; --steps and --device may change)")
    t.add_argument("--overwrite", action="store_true",
                   help="--out holds a checkpoint: move it aside to a dated sibling folder (never deleted) and "
                        "start afresh (or continue --resume FOLDER there)")
    t.add_argument("--no-cam", action="store_true", help="ablation: no cross-modal adaptive modulation")
    t.add_argument("--no-cigc", action="store_true", help="ablation: no gene co-expression graph")
    t.add_argument("--no-hier", action="store_true", help="ablation: tissue-level histology only")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="engine option (repeatable): a model config key (use_align=true, hist_features=handcrafted, "
                        "gene_chunk=25, distill=true, ...) or a TrainConfig field (adv_weight=0.01, lr=5e-4, ...)")
    t.add_argument("--out", required=True, help="checkpoint folder")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="super-resolve a section with a trained checkpoint → OME-Zarr, OME-TIFF, "
                                      ".h5ad or SpatialData")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", required=True, help="section path or 'synthetic'")
    s.add_argument("--steps", type=int, default=None, help="respaced sampling steps (default: the checkpoint's "
                                                          "budget, what the benchmark measured)")
    s.add_argument("--n-samples", type=int, default=None, help="samples averaged (std = uncertainty; default: the "
                                                               "checkpoint's budget)")
    s.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="default: the checkpoint's")
    s.add_argument("--mode", choices=["auto", "native", "degrade", "truth"], default="auto",
                   help="auto: against HR truth when the data has it, else at native resolution")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seed-data", type=int, default=0, help=argparse_hidden())
    s.add_argument("--device", default="auto")
    s.add_argument("--tile", type=int, default=0,
                   help="HR pixels per tile side: whole-slide tiled sampling with bounded memory (0: one field, "
                        "tiled automatically when its rasters exceed the memory budget)")
    s.add_argument("--overlap", type=int, default=None,
                   help="tile overlap in HR pixels (blended; default 16, or a quarter of an automatic tile)")
    s.add_argument("--batch-tiles", type=int, default=4, help="tiles per denoiser call")
    s.add_argument("--out", required=True,
                   help="output: .ome.zarr/.zarr (OME-Zarr), .ome.tif(f) (OME-TIFF), .h5ad (AnnData for scanpy/squidpy), "
                        ".sdata.zarr (SpatialData); --format overrides the suffix")
    s.add_argument("--format", choices=["ome-zarr", "tiff", "h5ad", "spatialdata"], default=None,
                   help="output format (default: from the --out suffix)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists (else: refused)")
    s.add_argument("--max-untiled-mb", type=float, default=None,
                   help="memory budget (MiB) of untiled sampling; above it tiles are used automatically "
                        "(default: 192, the largest H&E raster built in memory)")
    s.add_argument("--report", default=None, metavar="JSON",
                   help="write the true-to-the-spots figures (spot_pcc, spot_bias, alike_maps, alike_spots, lattice, "
                        "masked_in_spots) of the native maps as JSON; they also go into the OME-Zarr metadata")
    s.add_argument("--no-self-check", dest="self_check", action="store_false",
                   help="skip the self-check on this section one level coarser (s×s blocks of its spots → its spots), "
                        "which by default keeps per gene only the share of the histology's detail that helped there")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="score super-resolved maps against HR truth")
    e.add_argument("--pred", required=True, help="maps written by `napari-diffst sample` (.zarr/.tif/.h5ad)")
    e.add_argument("--data", required=True, help="the section the maps were made from, or 'synthetic'")
    e.add_argument("--mode", choices=["auto", "degrade", "truth"], default="auto")
    e.add_argument("--scale", type=int, default=None)
    e.add_argument("--seed-data", type=int, default=0, help=argparse_hidden())
    e.add_argument("--out", default=None, help="write the scores as JSON")
    e.set_defaults(func=cmd_evaluate)

    from .speed import add_commands as add_speed

    add_speed(sub)
    try:
        from .benchmark import add_commands as add_bench
    except ModuleNotFoundError as exc:  # pragma: no cover
        if exc.name != f"{__package__}.benchmark":
            raise
    else:
        add_bench(sub)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS
