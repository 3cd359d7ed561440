"""High-level, Qt-free steps shared by the CLI, the napari dock and the benchmark.

    samples = [load_data(p) for p in paths]                      # readers / synthetic
    genes = choose_genes(samples, n_genes=25)                     # on training sections only
    fields, gene_scale = make_fields(samples, genes, scale=5)     # SRField per section
    trainer = make_trainer(fields, budget="quick", out_dir="runs/x")
    for event in trainer.iter_train(): ...                        # progress, cancel between steps
    for update in super_resolve_iter(model, field, steps=50): ... # live preview, cancel between steps
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .data.pairs import SRField
from .data.sample import Sample
from .errors import CancelledError, DataFormatError, DiffSTError

__all__ = ["load_data", "choose_genes", "make_fields", "model_config_for", "build_diffst_model",
           "make_trainer", "super_resolve_iter", "super_resolve", "SRResult", "MODEL_PRESETS",
           "default_he_per_hr", "cond_from_field", "network_config"]

#: Network sizes per budget (see docs/model.md). ``tiny`` is for tests and smoke runs.
MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, hist_channels=8, attn_heads=2,
                 cigc_dim=2, dropout=0.0),
    "quick": dict(base_channels=32, channel_mults=[1, 2], num_res_blocks=1, hist_channels=32, attn_heads=4,
                  cigc_dim=4, dropout=0.0),
    "full": dict(),
}


#: How LR maps are brought to the HR grid as the denoiser's condition (and residual base): the edge-aware
#: cubic spline of :meth:`SRField.lr_upsampled` (see docs/model.md).
DEFAULT_UPSAMPLE = "cubic"


def load_data(spec: str | Path, *, seed: int = 0, **kw) -> Sample:
    """A Sample from a path any reader opens, or ``'synthetic'`` / ``'synthetic:SEED'``."""
    s = str(spec)
    if s == "synthetic" or s.startswith("synthetic:"):
        from .data.synthetic import make_synthetic

        if ":" in s:
            try:
                seed = int(s.split(":", 1)[1])
            except ValueError:
                raise DataFormatError(None, f"bad synthetic spec {s!r}", "'synthetic' or 'synthetic:SEED'") from None
        smp = make_synthetic(seed=seed, **kw)
        smp.name = f"synthetic{seed}" if ":" in s else smp.name
        return smp
    from .io import read

    return read(spec)


def choose_genes(train: Sequence[Sample], n_genes: int = 25, genes: Sequence[str] | None = None,
                 method: str = "hvg", apply_to: Sequence[Sample] = ()) -> list[str]:
    """A gene panel chosen on the training sections only (or the named genes, checked everywhere)."""
    from .data.genes import select_genes

    if genes:
        return select_genes(list(train), method="names", names=list(genes), apply_to=list(apply_to))
    truth_genes = [s.hr_truth["genes"] for s in train if s.hr_truth]
    if truth_genes and len(truth_genes) == len(train):  # synthetic: genes with HR truth only
        common = [g for g in truth_genes[0] if all(g in t for t in truth_genes)]
        return common[:n_genes]
    return select_genes(list(train), method=method, n=n_genes, apply_to=list(apply_to))


def default_he_per_hr(hr_um: float, target_um: float = 4.0, lo: int = 4, hi: int = 32) -> int:
    """H&E pixels per HR pixel so the H&E is sampled near ``target_um`` µm/px (clamped to [lo, hi])."""
    return int(np.clip(round(hr_um / target_um), lo, hi))


def make_fields(samples: Sequence[Sample], genes: Sequence[str], scale: int, *, mode: str | None = None,
                gene_scale: np.ndarray | None = None, he_per_hr: int | None = None,
                he_um_per_px: float | None = None, bin_lattice: int = 1) -> tuple[list[SRField], np.ndarray]:
    """One SRField per sample, sharing ``gene_scale`` (computed on ``samples`` when not given).

    ``mode`` None: 'truth' where the sample has HR truth, else 'degrade' (self-supervised pairs)."""
    from .data.grids import compute_gene_scale, make_field

    samples = list(samples)
    if gene_scale is None:
        gene_scale = compute_gene_scale(samples, genes)
    fields = []
    for smp in samples:
        m = mode or ("truth" if smp.hr_truth else "degrade")
        pitch = smp.lattice_pitch_um or smp.spot_diameter_um
        hr_um = (pitch / scale if m in ("truth", "native") else pitch) * int(bin_lattice)
        k = he_per_hr or (None if he_um_per_px else default_he_per_hr(hr_um))
        fields.append(make_field(smp, genes, scale=scale, mode=m, gene_scale=gene_scale, he_per_hr=k,
                                 he_um_per_px=he_um_per_px, bin_lattice=int(bin_lattice)))
    return fields, np.asarray(gene_scale, float)


def _gene_counts(samples: Sequence[Sample], genes: Sequence[str]) -> np.ndarray:
    from .data.genes import resolve_genes

    rows = []
    for smp in samples:
        cols = resolve_genes(smp, list(genes), section=smp.name)
        rows.append(smp.counts()[:, cols].toarray())
    return np.concatenate(rows, 0)


def model_config_for(fields: Sequence[SRField], budget: str = "quick", **overrides) -> dict:
    """Network config matching the fields (genes, H&E pixels per HR pixel) and the budget's size."""
    return network_config(fields[0].G, fields[0].he_per_hr, budget, **overrides)


def network_config(n_genes: int, he_per_hr: int, budget: str = "quick", **overrides) -> dict:
    """The network config of a ``budget``-size Diff-ST for ``n_genes`` genes and ``he_per_hr`` H&E px per HR px."""
    from .model import default_config

    cfg = dict(MODEL_PRESETS.get(budget, {}))
    cfg.update(n_genes=int(n_genes), he_per_hr=int(he_per_hr), predict="x0", residual_lr=True)
    cfg.update(overrides)
    return default_config(**cfg)


def build_diffst_model(fields: Sequence[SRField], train_samples: Sequence[Sample] | None = None,
                       budget: str = "quick", **overrides):
    """The Diff-ST denoiser for these fields, with its co-expression graph (CIGC) from training counts."""
    from .model import build_model, coexpression_matrix

    cfg = model_config_for(fields, budget, **overrides)
    model = build_model(cfg)
    if cfg.get("use_cigc", True):
        if train_samples:
            counts = _gene_counts(train_samples, fields[0].genes)
        else:
            counts = np.concatenate([np.asarray(f.hr_counts.todense() if hasattr(f.hr_counts, "todense")
                                                else f.hr_counts) for f in fields if f.hr_counts is not None], 0)
        model.set_gene_graph(coexpression_matrix(counts))
    return model


def make_trainer(fields: Sequence[SRField], *, budget: str = "quick", steps: int | None = None,
                 batch_size: int | None = None, lr_size: int | None = None, out_dir=None, seed: int = 0,
                 device: str = "auto", train_samples: Sequence[Sample] | None = None, model=None,
                 model_overrides: dict | None = None, provenance: dict | None = None, should_stop=None,
                 resume: str | Path | None = None, resume_check: bool = False, **train_overrides):
    """A :class:`~napari_diffst.train.Trainer` for the fields (budget presets; resume from a checkpoint).

    ``resume_check``: the run these arguments describe must be the checkpoint's (training and network config,
    genes, normalisation; only ``steps`` and ``device`` may differ), else a :class:`DataFormatError` lists the
    differences; without it the checkpoint's settings win."""
    from .train import Trainer, TrainConfig

    fields = [f for f in fields if f.hr is not None]
    if not fields:
        raise DiffSTError("no training field has HR targets; use mode='degrade' (self-supervised) or truth data")
    if resume:
        over = {k: v for k, v in dict(steps=steps, device=device).items() if v is not None}
        if resume_check:
            from .train.checkpoint import check_resume_config, read_checkpoint

            fresh = make_trainer(fields, budget=budget, steps=steps, batch_size=batch_size, lr_size=lr_size,
                                 seed=seed, device=device, train_samples=train_samples, model=model,
                                 model_overrides=model_overrides, **train_overrides)
            check_resume_config(resume, read_checkpoint(resume), fresh.config.to_dict(), genes=fields[0].genes,
                                gene_scale=fields[0].gene_scale)
            over.update({k: getattr(fresh.config, k) for k in ("log_every", "checkpoint_every")})
            model = fresh.model
        return Trainer.from_checkpoint(resume, fields=fields, out_dir=out_dir, should_stop=should_stop,
                                       model=model, overrides=over)
    from .train.config import PRESETS

    preset = budget if budget in PRESETS else "quick"
    kw = dict(seed=seed, device=device)
    if steps is not None:
        kw["steps"] = int(steps)
    if batch_size is not None:
        kw["batch_size"] = int(batch_size)
    if lr_size is not None:
        kw["lr_size"] = int(lr_size)
    # patches no larger than the smallest field (in LR pixels)
    max_lr = min(min(f.lr.shape[1:]) for f in fields)
    kw.setdefault("lr_size", TrainConfig.from_preset(preset).lr_size)
    kw["lr_size"] = int(max(2, min(kw["lr_size"], max_lr)))
    kw.update(train_overrides)
    if model is None:  # the initial weights are a function of the seed, not of the caller's RNG state
        import torch

        torch.manual_seed(int(seed))
        model = build_diffst_model(fields, train_samples, budget=budget, **(model_overrides or {}))
    kw["target"] = model.config["predict"]
    kw.setdefault("upsample", DEFAULT_UPSAMPLE)
    cfg = TrainConfig.from_preset(preset, **kw)
    # the LR upsampling of the condition is part of the model's contract: inference must use the same
    model.config["diffusion"] = {**(model.config.get("diffusion") or {}), "target": cfg.target,
                                 "schedule": cfg.schedule, "T": cfg.timesteps, "upsample": cfg.upsample}
    cfg.model = copy.deepcopy(model.config)
    prov = {"fields": [f.name for f in fields], "scale": fields[0].scale, **(provenance or {})}
    return Trainer(model, cfg, fields=fields, out_dir=out_dir, provenance=prov, should_stop=should_stop)


def cond_from_field(field: SRField, device="cpu", upsample: str = "nearest") -> dict:
    """The network's condition dict for a whole field (batch of one), in diffusion units.

    ``upsample`` must be the training config's (``'nearest'``, ``'bilinear'`` or ``'cubic'``)."""
    import torch
    import torch.nn.functional as F

    lr = torch.from_numpy(np.ascontiguousarray(field.lr, np.float32))[None]
    s = field.scale
    if upsample == "cubic":
        lr_up = torch.from_numpy(field.lr_upsampled(3))[None] * 2 - 1
    elif upsample == "bilinear":
        lr_up = F.interpolate(lr, scale_factor=s, mode="bilinear", align_corners=False) * 2 - 1
    else:
        lr_up = F.interpolate(lr, scale_factor=s, mode="nearest") * 2 - 1
    lr_mask = F.interpolate(torch.from_numpy(field.lr_mask.astype(np.float32))[None, None], scale_factor=s,
                            mode="nearest")
    he = torch.from_numpy(np.ascontiguousarray(field.he, np.float32))[None]
    hr_mask = torch.from_numpy(field.hr_mask.astype(np.float32))[None, None]
    return {k: v.to(device) for k, v in dict(lr_up=lr_up, lr_mask=lr_mask, he=he, hr_mask=hr_mask).items()}


@dataclass
class SRResult:
    """Super-resolved maps of one field, in model units (multiply by ``gene_scale`` for log1p CP10k)."""

    mean: np.ndarray   # (G, H, W)
    std: np.ndarray    # (G, H, W) per-pixel standard deviation over samples (uncertainty)
    genes: list
    hr_um: float
    field: SRField
    steps: int
    n_samples: int
    #: true-to-the-spots figures (:func:`napari_diffst.spot_consistency.spot_report`) of ``mean`` at native
    #: resolution, and of the raw sampler mean before the projection (``report['before_projection']``)
    report: dict | None = None

    def expression(self) -> np.ndarray:
        return self.mean * np.asarray(self.field.gene_scale, np.float32)[:, None, None]


def super_resolve_iter(model, field: SRField, *, steps: int = 50, n_samples: int = 4, seed: int = 0,
                       sampler: str = "ddpm", eta: float = 0.0, device=None,
                       upsample: str | None = None, project: bool | str = "auto") -> Iterator[dict]:
    """Generator: yields ``{'sample', 'i', 'n_steps', 'x0_pred' (G,H,W) model units, 'done', 'total'}`` per
    reverse step (live preview; stop iterating to cancel), then ``{'result': SRResult}`` at the end.

    ``project``: make the mean true to the spots (:func:`napari_diffst.spot_consistency.project_to_spots`: each
    in-tissue spot's disk, averaged in expression space, reproduces the spot) and attach the report
    (``SRResult.report``).  ``'auto'`` (default): at native resolution (``field.extra['mode'] == 'native'``), the
    user's job; never on degrade/truth fields, whose scores the benchmark compares.

    Samples are drawn one after another so the preview shows each denoising trajectory."""
    import torch

    from .diffusion.samplers import diffusion_for_model, sample_progressive
    from .diffusion.schedule import to_model_units

    if field.G != model.config.get("n_genes", field.G):
        raise DataFormatError(None, f"the model was trained for {model.config['n_genes']} genes, the data has "
                              f"{field.G}", "the checkpoint's gene panel")
    if device is None:
        device = next(model.parameters()).device
    model.eval()
    if upsample is None:  # the training config's, saved with the model (see make_trainer)
        upsample = (model.config.get("diffusion") or {}).get("upsample", "nearest")
    cond = cond_from_field(field, device, upsample)
    diffusion = diffusion_for_model(model)
    if steps and steps < diffusion.num_timesteps:
        diffusion = diffusion.respace(int(steps))
    n = diffusion.num_timesteps
    G, (H, W) = field.G, field.hr_shape
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    s1 = np.zeros((G, H, W), np.float64)
    s2 = np.zeros((G, H, W), np.float64)
    total = n * n_samples
    done = 0
    with torch.no_grad():
        for m in range(n_samples):
            x = None
            for st in sample_progressive(model, (1, G, H, W), cond, diffusion, sampler=sampler, eta=eta,
                                         generator=gen, device=device):
                done += 1
                x = st["x_t"]
                yield {"sample": m, "i": st["i"], "n_steps": n, "done": done, "total": total,
                       "x0_pred": to_model_units(st["x0_pred"])[0].float().cpu().numpy()}
            v = to_model_units(x)[0].double().cpu().numpy()
            s1 += v
            s2 += v * v
    mean = s1 / n_samples
    std = np.sqrt(np.clip(s2 / n_samples - mean * mean, 0, None))
    mask = field.hr_mask[None]
    mean = (mean * mask).astype(np.float32)
    report = None
    if project is True or (project == "auto" and field.extra.get("mode") == "native"):
        mean, report = project_result(mean, field)
    res = SRResult(mean, (std * mask).astype(np.float32), list(field.genes), field.hr_um, field, n, n_samples,
                   report=report)
    yield {"result": res}


def project_result(mean: np.ndarray, field: SRField, shown: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """``mean`` (G, H, W, model units) projected onto ``field``'s spots, and the spot report of the result (with
    the raw mean's figures under ``'before_projection'`` and the projection's ``iterations``/``max_residual``).
    ``shown`` (H, W) bool: the tissue mask at HR resolution the maps are written and shown on
    (:func:`napari_diffst.data.grids.display_mask`); pixels of the spots' disks outside it are NaN in every output,
    so the projection and the report count only the pixels inside it (``masked_in_spots`` is the disk area it
    leaves out).  None: the field's ``hr_mask``."""
    from .spot_consistency import project_to_spots, spot_disks, spot_report

    gs = np.asarray(field.gene_scale, np.float32)[:, None, None]
    disks = spot_disks(field)
    mask = np.asarray(field.hr_mask, bool)
    if shown is not None:
        mask = mask & np.asarray(shown, bool)
    before = spot_report(mean * gs, field, mask=mask, disks=disks)
    expr, info = project_to_spots(mean * gs, field, mask=mask, disks=disks)
    report = spot_report(expr, field, mask=mask, disks=disks)
    report["projection"] = info
    report["before_projection"] = {k: before[k] for k in before if k != "per_gene"}
    return (expr / gs * field.hr_mask[None]).astype(np.float32), report


def super_resolve(model, field: SRField, **kw) -> SRResult:
    """Run :func:`super_resolve_iter` to the end."""
    res = None
    for upd in super_resolve_iter(model, field, **kw):
        res = upd.get("result", res)
    if res is None:
        raise CancelledError("super-resolution did not finish")
    return res
