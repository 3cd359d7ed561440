"""True to the spots on her2st C2–C6 (issue 13): each section trained on itself (self-supervised degrade pairs),
then super-resolved natively; prints the report figures per section and scale and writes them as JSON.

    OMP_NUM_THREADS=1 python3 scripts/spots_her2st.py --scales 2 4 --n-genes 8 --steps 30 \\
        --out docs/spots_her2st.json

``--method diffst``: the method object (:class:`napari_diffst.method.DiffST`: the budget's knobs — cell-level prior
cross-fitted on stripes of the section, diffusion, shrink — with ``--steps`` / ``--sample-steps`` / ``--n-samples``
overriding them) instead of the bare network (``--method network``, the default, which wrote
docs/spots_her2st_8genes.json).

With ``--method diffst`` each row also holds the method's self-check (``self_check``: the section's spots one
level coarser, method vs cubic vs block copy, the per-gene share β of the detail kept natively; the model was
trained on this same section, so the check is in-sample for its network).

Budgets are step counts (``--steps`` training steps, ``--sample-steps`` × ``--n-samples`` reverse steps), so the
figures are reproducible with the seed.  Each row has the raw sampler mean's figures (``before_projection``) and
those after the projection onto the spots (what ``napari-diffst sample`` writes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_diffst import pipeline as P  # noqa: E402
from napari_diffst.spot_consistency import REPORT_KEYS  # noqa: E402
from napari_diffst.tiling import plan_sampling, super_resolve_tiled  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "her2st"))
    ap.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5", "C6"])
    ap.add_argument("--scales", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--n-genes", type=int, default=8)
    ap.add_argument("--budget", default="tiny", choices=["tiny", "quick", "full"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--n-samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="network", choices=["network", "diffst"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows, t_all = {}, time.perf_counter()
    print(f"{'section':<8}{'scale':>6}" + "".join(f"{k:>16}" for k in REPORT_KEYS) + f"{'raw spot_bias':>15}")
    for name in a.sections:
        smp = P.load_data(str(Path(a.data) / name))
        genes = P.choose_genes([smp], n_genes=a.n_genes)
        for s in a.scales:
            t0 = time.perf_counter()
            fields, gs = P.make_fields([smp], genes, s)  # degrade pairs from the section's own spots
            extra = {}
            if a.method == "diffst":
                from napari_diffst.method import DiffST

                m = DiffST(budget=a.budget, seed=a.seed, device="cpu", steps=a.steps, sample_steps=a.sample_steps,
                           n_samples=a.n_samples).fit(fields, train_samples=[smp])
                tr, net = m.trainer, m.model_
                extra = {"method": "diffst", "prior": m.knobs_["prior"], "prior_folds": m.prior_folds_,
                         "shrink_alpha": m.alpha_}
            else:
                tr = P.make_trainer(fields, budget=a.budget, steps=a.steps, seed=a.seed, device="cpu",
                                    train_samples=[smp])
                for _ in tr.iter_train():
                    pass
                net = tr.ema
            # as `napari-diffst sample` does: untiled when the section's rasters fit the memory budget, else tiled
            # (e.g. 8×: the network's H&E pixels per HR pixel at 25 µm make a 4096 × 5120 px raster)
            plan = plan_sampling(smp, genes, s, gene_scale=gs, mode="native", he_per_hr=net.config["he_per_hr"],
                                 n_samples=a.n_samples)
            if plan.tiled and a.method == "diffst":
                check = m.self_check(smp)
                tres = super_resolve_tiled(m, plan.source(), tile=plan.tile, overlap=plan.overlap,
                                           steps=m.knobs_["sample_steps"], n_samples=m.knobs_["n_samples"],
                                           seed=a.seed, device="cpu", report=True, self_check=check)
                res = SimpleNamespace(report=dict(tres.report, tiled=plan.describe()))
            elif plan.tiled:
                rows.setdefault(name, {})[str(s)] = {"error": f"needs tiled sampling ({plan.describe()})"}
                print(f"{name:<8}{s:>6}  needs tiled sampling: use --method diffst", flush=True)
                continue
            else:
                nat = P.make_fields([smp], genes, s, mode="native", gene_scale=gs,
                                    he_per_hr=net.config["he_per_hr"])[0][0]
                if a.method == "diffst":
                    res = m.predict(nat, sample=smp)
                else:
                    res = P.super_resolve(net, nat, steps=a.sample_steps, n_samples=a.n_samples, seed=a.seed)
            rep = dict(res.report, trained_steps=int(tr.step), genes=list(genes),
                       seconds=round(time.perf_counter() - t0, 1), **extra)
            rows.setdefault(name, {})[str(s)] = rep
            sc = rep.get("self_check") or {}
            chk = (f"  self-check PCC method {sc['pcc']['method']} cubic {sc['pcc']['cubic']} block "
                   f"{sc['pcc']['nearest']} kept {sc['pcc']['kept']}, β {np.mean(sc['beta']):.2f}"
                   if "pcc" in sc else "")
            print(f"{name:<8}{s:>6}" + "".join(f"{str(rep[k]):>16}" for k in REPORT_KEYS)
                  + f"{str(rep['before_projection']['spot_bias']):>15}" + chk, flush=True)
    doc = {"command": " ".join(["scripts/spots_her2st.py"] + (argv if argv is not None else sys.argv[1:])),
           "budget": a.budget, "method": a.method, "steps": a.steps, "sample_steps": a.sample_steps, "n_samples": a.n_samples,
           "seed": a.seed, "n_genes": a.n_genes, "total_seconds": round(time.perf_counter() - t_all, 1),
           "date": time.strftime("%Y-%m-%d"), "sections": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
