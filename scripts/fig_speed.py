#!/usr/bin/env python
"""Figures for docs/performance.md from a ``napari-diffst bench-speed`` JSON.

Left: PCC and detail-PCC vs the number of reverse steps (log axis; 1000 = the full ancestral sampler),
with the wall time of each run on a second axis. Right (when the JSON has ``memory``): peak RSS increase of
tiled whole-slide inference vs slide area.

    napari-diffst bench-speed --budget quick --slide ../shared/data/her2st/C6 --memory --out speed.json
    python scripts/fig_speed.py --speed speed.json --out docs/images/steps_vs_pcc.png
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed", required=True, help="bench-speed JSON")
    ap.add_argument("--out", required=True, help="PNG to write")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.load(open(a.speed))
    curve = sorted(r["curve"], key=lambda row: row["steps"])
    mem = r.get("memory") or []
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(10 if mem else 5.5, 3.8), squeeze=False)
    ax = axes[0, 0]
    st = [row["steps"] for row in curve]
    ax.plot(st, [row["pcc"] for row in curve], "o-", color="#1f77b4", label="PCC")
    ax.plot(st, [row["detail_pcc"] for row in curve], "s-", color="#2ca02c", label="detail-PCC")
    ax.axvline(r["respaced_steps"], color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("reverse steps (1000 = full DDPM)")
    ax.set_ylabel("score vs HR truth (SYNTHETIC)")
    ax2 = ax.twinx()
    ax2.plot(st, [row["seconds"] for row in curve], "^--", color="#d62728", label="seconds")
    ax2.set_yscale("log")
    ax2.set_ylabel("wall time (s)", color="#d62728")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    ax.set_title(f"steps vs accuracy ({r['budget']}, {r['device']}, {len(r['genes'])} genes, {r['scale']}×)",
                 fontsize=9)
    if mem:
        bx = axes[0, 1]
        area = [m["hr_shape"][0] * m["hr_shape"][1] / 1e3 for m in mem]
        bx.plot(area, [m["increase_mb"] for m in mem], "o-", label="tiled → OME-Zarr: RSS increase")
        bx.set_xlabel("slide size (thousand HR pixels)")
        bx.set_ylabel("MiB above the RSS before inference")
        bx.set_ylim(bottom=0)
        for m, x in zip(mem, area):
            bx.annotate(f"{m['size_um'] / 1000:.1f} mm, {m['n_tiles']} tiles", (x, m["increase_mb"]),
                        textcoords="offset points", xytext=(4, 6), fontsize=8)
        bx.set_title(f"peak memory of tiled inference ({mem[0]['genes']} genes, {mem[0]['scale']}×)", fontsize=9)
        bx.legend(fontsize=8, loc="lower right")
        bx.margins(x=0.3)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
