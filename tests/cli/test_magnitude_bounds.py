"""The plans `hfl run` / `hfl init` write carry the magnitude defence (docs/security.md)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from hfl_cli.local import PlanOptions, magnitude_bounds, prepare, weights_norm
from hfl_common.config import parse_plan


def test_the_bounds_follow_the_initial_models_norm_and_the_number_of_trainers() -> None:
    bounds = magnitude_bounds(6.5, 4)
    assert bounds.max_norm == pytest.approx(65.0)
    assert bounds.max_aggregate_norm == pytest.approx(10 * 2 * 65.0)
    # a model of (almost) zeros still gets a usable bound
    assert magnitude_bounds(0.0, 1).max_norm == pytest.approx(1.0)


def test_weights_norm_counts_float_tensors_only() -> None:
    weights = {"w": np.full((2, 2), 1.5, np.float32), "steps": np.array([10**6], np.int64)}
    assert weights_norm(weights) == pytest.approx(3.0)


def test_a_generated_plan_bounds_updates_and_aggregates(tmp_path: Path) -> None:
    prepared = prepare(tmp_path / "fed", PlanOptions(trainers=3, rounds=2))
    plan = parse_plan(prepared.plan.read_text(), str(prepared.plan), base_dir=prepared.directory)
    with np.load(prepared.directory / "initial_weights.npz", allow_pickle=False) as npz:
        norm = weights_norm({k: npz[k] for k in npz.files})
    assert norm > 0
    assert plan.update.max_norm == pytest.approx(10 * norm, rel=1e-5)
    assert plan.update.max_aggregate_norm == pytest.approx(
        10 * math.sqrt(3) * plan.update.max_norm, rel=1e-5
    )
    assert not plan.update.clip, "an update over the bound is refused, not scaled"
