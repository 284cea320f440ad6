"""Before/after table of two bench_e2e result files (e.g. main before and after a merge).

    .venv/bin/python benchmarks/compare_e2e.py benchmarks/results/e2e-baseline-acb752b.json \\
        benchmarks/results/e2e-<commit>.json

Prints, per scenario found in both, the figures that docs/performance.md tracks. Each
file's ratios are against its own run's raw-TLS rate, so the two compare even if the
machine's speed changed between the runs; absolute seconds do not.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

FIGURES = (
    ("round p50 / bound", "round_over_bound", "{:.2f}x"),
    ("round p99 / p50", "p99_over_p50", "{:.2f}x"),
    ("agg (peak - idle) / model", "aggregator_peak_over_model", "{:.2f}x"),
    ("agg peak RSS", "aggregator_peak_rss_bytes", "{:.0f} MB"),
    (
        "agg CPU s / trainer-round / 100 MB",
        "aggregator_cpu_s_per_trainer_round_per_100MB",
        "{:.3f}",
    ),
    ("trainer extra / model", "client_extra_peak_per_trainer_over_model", "{:.2f}x"),
    ("download / raw TLS", "download_over_raw_tls", "{:.2f}x"),
    ("upload / raw TLS", "upload_over_raw_tls", "{:.2f}x"),
    ("round close (s)", "round_close_extra_s", "{:.2f}"),
    ("failed trainers", "failed_trainers", "{:.0f}"),
    ("retried calls", "retries", "{:.0f}"),
    ("DEADLINE_EXCEEDED", "deadline_exceeded", "{:.0f}"),
)


def _value(s: dict[str, Any], key: str, spec: str) -> str:
    v = s.get(key)
    if not isinstance(v, int | float) or not math.isfinite(v):
        return "-"
    return spec.format(v / 1e6 if key.endswith("_bytes") else v)


def table(before: dict[str, Any], after: dict[str, Any]) -> str:
    b = {s["scenario"]: s for s in before["scenarios"]}
    a = {s["scenario"]: s for s in after["scenarios"]}
    lines = [
        f"| scenario | figure | before ({before['label']}) | after ({after['label']}) |",
        "| --- | --- | --- | --- |",
    ]
    for name in [n for n in b if n in a]:
        for label, key, spec in FIGURES:
            x, y = _value(b[name], key, spec), _value(a[name], key, spec)
            if x == y == "-":
                continue
            lines.append(f"| {name} | {label} | {x} | {y} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    before, after = (json.loads(Path(p).read_text()) for p in sys.argv[1:3])
    print(table(before, after))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
