"""`make bench`'s end-to-end benchmark completes and reports every figure (a smoke run).

It runs `benchmarks/bench_e2e.py --quick` for real: an aggregator process, no-op trainers
on the real client library over mutual RA-TLS (simulated TEE), the raw-TLS baseline.
No timing is asserted, only that each figure is there and is a measurement.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_quick_end_to_end_benchmark_reports_every_figure(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--quick",
         "--label", "smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=500, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "e2e-smoke-quick.json").read_text())
    assert result["raw_tls"]["bytes_per_second"] > 0
    scenarios = {s["scenario"]: s for s in result["scenarios"]}
    assert set(scenarios) == {"transfer-quick", "rounds-quick-n2", "env-quick-n2", "scale-quick-n8"}
    for name, s in scenarios.items():
        assert s["model_bytes"] == s["params"] * 4, name
        assert not s["timed_out"], name
        assert s["failed_trainers"] == 0, (name, s["errors"])
        assert not s["tensorflow_imported"], name  # the no-op trainers never load TensorFlow
        assert len(s["round_seconds"]) == s["rounds"], name
        assert all(math.isfinite(x) and x > 0 for x in s["round_seconds"]), name
        assert s["aggregator_peak_rss_bytes"] >= s["aggregator_idle_rss_bytes"] > 0, name
        assert s["aggregator_cpu_s_per_trainer_round"] >= 0, name
        assert math.isfinite(s["round_over_bound"]), name
        assert math.isfinite(s["client_extra_peak_per_trainer_over_model"]), name
        # the aggregator's resources per round: RSS and open file descriptors
        assert [r["round"] for r in s["aggregator_per_round"]] == list(range(1, s["rounds"] + 1)), (
            name
        )
        for r in s["aggregator_per_round"]:
            assert r["peak_fds"] >= r["end_fds"] > 0, (name, r)
            assert r["peak_rss_bytes"] >= r["end_rss_bytes"] > 0, (name, r)
        assert s["aggregator_idle_fds"] > 0, name
        assert s["aggregator_final_fds"] > 0, name
    # the aggregator's environment as `hfl run` sets it, and the contrast without it
    assert scenarios["rounds-quick-n2"]["aggregator_env"] == {
        "MALLOC_ARENA_MAX": "2",
        "OPENBLAS_NUM_THREADS": "1",
    }
    assert scenarios["env-quick-n2"]["aggregator_env"] == {}
    transfer = scenarios["transfer-quick"]
    for key in ("download_s", "upload_s", "download_over_raw_tls", "upload_over_raw_tls"):
        assert math.isfinite(transfer[key]), key
        assert transfer[key] > 0, key
    table = (tmp_path / "e2e-smoke-quick.md").read_text()
    assert "| scale-quick-n8 |" in table
    assert "scale-quick-n8: the aggregator's RSS and open file descriptors per round" in table
    assert "download" in table
