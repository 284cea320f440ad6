"""`hfl run` with central differential privacy, whole: processes, simulated SGX, RA-TLS.

Two trainers, both sampled every round, noise multiplier 2 at delta 1e-5: dp-accounting
gives epsilon 1.99 after one round, 2.94 after two and 3.71 after three, so a budget
of 3.3 lets two rounds run and stops the federation before the third, although the
plan asks for five. The stop reason and epsilon must reach the operator's output,
rounds.json and the provenance of the model each trainer takes home.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfl_aggregator import privacy as dp
from hfl_common.config import load_plan
from tests.cli import clikit

Z = 2.0
DELTA = 1e-5
BUDGET = 3.3


@pytest.mark.slow
def test_run_stops_at_the_privacy_budget_and_reports_epsilon_everywhere(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    expected = [dp.compute_epsilon(Z, [(dp.Sampling(2, 2), k)], DELTA).epsilon for k in (1, 2, 3)]
    assert expected[1] <= BUDGET < expected[2]  # the arithmetic the test relies on

    result = clikit.run_hfl(
        "run",
        "--rounds", "5",
        "--workdir", str(workdir),
        "--central-noise-multiplier", str(Z),
        "--central-clip-norm", "1.0",
        "--max-epsilon", str(BUDGET),
        "--dp-delta", str(DELTA),
        "--no-plot",
        timeout=420,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    plan = load_plan(workdir / "plan.toml")
    assert plan.privacy.mode == "central"
    assert plan.privacy.max_epsilon == BUDGET
    out = result.stdout
    assert "federation done: 2 rounds" in out
    assert "stopped before round 3: privacy budget reached: after 2 rounds epsilon is " in out
    assert f"above the plan's max_epsilon {BUDGET:g}" in out
    assert f"privacy: central DP, epsilon {expected[1]:.4g} of max {BUDGET:g} at delta 1e-05" in out

    rounds = json.loads((workdir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["dp_epsilon"] for r in rounds] == pytest.approx(expected[:2], rel=1e-6)
    assert {r["dp_delta"] for r in rounds} == {DELTA}

    for trainer in ("trainer-1", "trainer-2"):
        provenance = json.loads((workdir / "models" / trainer / "provenance.json").read_text())
        privacy = provenance["privacy"]
        assert provenance["rounds_completed"] == 2
        assert privacy["mode"] == "central"
        assert privacy["epsilon"] == pytest.approx(expected[1], rel=1e-6)
        assert privacy["rounds_accounted"] == 2
        assert privacy["stop_reason"].startswith("privacy budget reached")
        log = (workdir / "logs" / f"{trainer}.log").read_text()
        assert "Traceback" not in log, log[-3000:]
    assert clikit.processes_mentioning(str(workdir)) == []
