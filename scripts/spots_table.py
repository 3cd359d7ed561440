"""Markdown table of ``scripts/spots_her2st.py`` JSON files (one or more; rows per section and scale): the
true-to-the-spots figures after the projection, the raw sampler mean's, and the self-check one level coarser.

    python3 scripts/spots_table.py docs/spots_diffst/C*.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(paths):
    for p in paths:
        doc = json.loads(Path(p).read_text())
        for sec, scales in doc["sections"].items():
            for s, r in scales.items():
                yield sec, s, r, doc


def table(paths) -> str:
    head = ("| section | scale | spot_pcc | spot_bias | alike maps (spots) | lattice | masked_in_spots | raw spot_pcc "
            "| raw spot_bias | self-check PCC method / prior alone / cubic / block / kept | β mean | genes on block copy | steps |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for sec, s, r, doc in rows(paths):
        if "error" in r:
            out.append(f"| {sec} | {s}× | failed: {r['error'][:80]} |" + " |" * 10)
            continue
        b = r.get("before_projection", {})
        sc = r.get("self_check") or {}
        p = sc.get("pcc") or {}
        chk = (f"{p.get('method')} / {p.get('prior')} / {p.get('cubic')} / {p.get('nearest')} / {p.get('kept')}" if p
               else sc.get("skipped", "—"))
        beta = f"{sum(sc['beta']) / len(sc['beta']):.2f}" if sc.get("beta") else "—"
        base = sc.get("base")
        blk = f"{sum(b == 'block' for b in base)} of {len(base)}" if base else "—"
        out.append(f"| {sec} | {s}× | {r['spot_pcc']} | {r['spot_bias']} | {r['alike_maps']} ({r['alike_spots']}) "
                   f"| {r['lattice']} | {r['masked_in_spots']} | {b.get('spot_pcc')} | {b.get('spot_bias')} | {chk} "
                   f"| {beta} | {blk} | {r.get('trained_steps')} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
