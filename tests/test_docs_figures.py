"""Headline figures in the README come from JSON committed beside the docs (made by a command in the repo)."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_dev_split_figures_are_the_committed_json():
    readme = (ROOT / "README.md").read_text()
    doc = json.loads((ROOT / "docs" / "bench" / "her2st_dev_split_quick.json").read_text())
    m = re.search(r"Diff-ST at PCC (\d\.\d{3}) / detail-PCC (\d\.\d{3}) against (\d\.\d{3}) / (\d\.\d{3}) for the "
                  r"best baseline", readme)
    assert m, "the README's dev-split sentence moved; keep it tied to docs/bench/her2st_dev_split_quick.json"
    res = doc["sections"]["C6"]["methods"]
    assert (m.group(1), m.group(2)) == (f"{res['diffst']['pcc']:.3f}", f"{res['diffst']['detail_pcc']:.3f}")
    best = max((k for k in res if k != "diffst"), key=lambda k: (res[k]["pcc"], res[k]["detail_pcc"]))
    assert (m.group(3), m.group(4)) == (f"{res[best]['pcc']:.3f}", f"{res[best]['detail_pcc']:.3f}")
    prior = doc["meta"]["method_knobs"]["diffst"]["prior_scores"]["C6"]
    assert f"{prior['pcc']:.3f} / {prior['detail_pcc']:.3f}" in readme
    assert doc["meta"]["method_knobs"]["diffst"]["trained_steps"] == 300  # a step budget, not a time limit


def test_readme_robustness_figures_are_the_committed_json():
    """The README's self-checked C6 figures are the robustness suite's committed JSON (variants clean, black_bg)."""
    readme = (ROOT / "README.md").read_text()
    doc = json.loads((ROOT / "docs" / "bench" / "robustness_her2st.json").read_text())
    sec = doc["result"]["sections"]
    clean, dark = sec["C6/clean"]["methods"]["diffst"], sec["C6/black_bg"]["methods"]["diffst"]
    assert (f"diffst scores {clean['pcc']:.3f} / {clean['detail_pcc']:.3f} on C6 "
            f"({clean['unchecked']['pcc']:.3f} / {clean['unchecked']['detail_pcc']:.3f} unchecked") in " ".join(readme.split())
    assert f"({dark['pcc']:.3f} vs {dark['unchecked']['pcc']:.3f} unchecked" in readme
