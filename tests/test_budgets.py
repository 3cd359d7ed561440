"""Budgets count steps, never seconds: a seed gives the same model at any machine load (issue 13)."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from napari_diffst.baselines import HisToSGEStyle, IStarStyle, UNetBaseline
from napari_diffst.benchmark import DIFFUSION_BUDGETS, DiffusionMethod, trained_steps
from napari_diffst.speed import SPEED_BUDGETS
from toy_fields import make_toy_field

SMALL = {
    "istar": (IStarStyle, {"steps": 12, "ensemble": 1, "finetune": 4, "blocks": 32}),
    "unet": (UNetBaseline, {"steps": 6, "batch": 2, "val_every": 3}),
    "histosge": (HisToSGEStyle, {"steps": 10, "batch": 32, "ensemble": 1, "val_every": 5}),
}


def _slow_clock(monkeypatch):
    """Every clock read jumps 10 minutes: a run with any wall-clock cap or time-based schedule would stop
    early or anneal differently."""
    ticks = itertools.count()
    fake = lambda: 600.0 * next(ticks)  # noqa: E731
    for name in ("monotonic", "perf_counter", "time"):
        monkeypatch.setattr(time, name, fake)


def _fit_predict(name, train, val, test):
    if name == "diffst":
        m = DiffusionMethod(device="cpu", model_overrides={"use_cigc": False})  # toy fields carry no counts
        m.fit(train, val, seed=3, budget="tiny")
        torch.manual_seed(0)
        return m.predict(test), trained_steps(m)
    cls, bud = SMALL[name]
    m = cls(num_threads=1).fit(train, val, seed=3, budget=bud)
    return m.predict(test), trained_steps(m)


@pytest.mark.parametrize("name", ["istar", "unet", "histosge", "diffst"])
def test_same_seed_same_map_on_a_slow_clock(name, monkeypatch):
    train = [make_toy_field(i, h=8, w=8) for i in (1, 2)]
    val, test = make_toy_field(10, h=8, w=8), make_toy_field(11, h=8, w=8)
    ref, steps = _fit_predict(name, train, val, test)
    with monkeypatch.context() as mp:
        _slow_clock(mp)
        slow, steps_slow = _fit_predict(name, train, val, test)
    np.testing.assert_array_equal(ref, slow)
    expected = (DIFFUSION_BUDGETS["tiny"]["steps"] if name == "diffst"
                else SMALL[name][1]["steps"] * SMALL[name][1].get("ensemble", 1))
    assert steps == steps_slow == expected


def test_no_budget_table_has_a_time_limit():
    tables = [("diffusion", DIFFUSION_BUDGETS), ("speed", SPEED_BUDGETS)] + [
        (c.__name__, c.BUDGETS) for c in (IStarStyle, UNetBaseline, HisToSGEStyle)]
    for label, table in tables:
        for bname, b in table.items():
            keys = set(b) | set(b.get("train_overrides") or {})
            assert not keys & {"max_seconds", "time_limit_s"}, (label, bname, keys)
