"""The tiered-vs-flat benchmark completes and reports every figure (a smoke run).

It runs `benchmarks/bench_tiered.py --quick` for real: a root and two relay processes,
then one flat aggregator process, with the same no-op trainers (real client library,
mutual RA-TLS, simulated TEE). No timing is asserted, only that each figure is a
measurement and every trainer finished.
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
def test_the_quick_tiered_benchmark_reports_every_tier(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_tiered.py"), "--quick",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=500, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "tiered-quick.json").read_text())
    runs = {r["mode"]: r for r in doc["runs"]}
    assert set(runs) == {"tiered", "flat"}
    assert runs["tiered"]["relays"] == 2
    assert runs["flat"]["relays"] == 0
    for mode, r in runs.items():
        assert r["failed_trainers"] == 0, (mode, r["errors"])
        assert not r["timed_out"], mode
        assert not r["tensorflow_imported"], mode
        assert len(r["round_seconds"]) == doc["rounds"], mode
        assert all(math.isfinite(x) and x > 0 for x in r["round_seconds"]), mode
        assert r["cpu_s"]["root"] > 0, mode
        assert r["cpu_s"]["trainer_workers"] > 0, mode
        assert r["peak_rss_bytes"]["root"] > 0, mode
        assert r["peak_rss_bytes"]["trainer_workers_max"] > 0, mode
    relays = runs["tiered"]
    assert len(relays["cpu_s"]["per_relay"]) == 2
    assert all(x > 0 for x in relays["cpu_s"]["per_relay"])
    assert all(x > 0 for x in relays["peak_rss_bytes"]["per_relay"])
    table = (tmp_path / "tiered-quick.md").read_text()
    assert "| tiered | 2 |" in table
    assert "| flat | 0 |" in table
