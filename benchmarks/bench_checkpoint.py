"""The aggregator's sealed checkpoint: time and peak extra memory against the model size.

For a model of 1M and of 25.6M float32 parameters (160 tensors of log-normal sizes, like
ResNet-50), each in a fresh process so that its peak RSS (VmHWM, reset through
/proc/self/clear_refs) belongs to that one operation:

- streamed: `CheckpointStore.save` / `load` as they are (sealed record by record);
- npz (format 1): what hfl did before, rebuilt here from the public sealing functions:
  np.savez into memory, AES-GCM of the whole buffer, write_atomic; load: read, unseal,
  np.load;
- disk bound: the same bytes written plainly to a file with one fsync (and read back).

It prints, per size and variant, the seconds and the peak RSS above the process's RSS
before the operation, as a multiple of the model (a load must allocate the model itself:
1.0x is the floor there), and writes benchmarks/results/checkpoint-<label>.json / .md.

    .venv/bin/python benchmarks/bench_checkpoint.py
    .venv/bin/python benchmarks/bench_checkpoint.py --params 1000000   # one size
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hfl_aggregator.checkpoint import Checkpoint, CheckpointStore
from hfl_common.sealing import SimulatedSealingKeys, read_sealed, write_sealed

SIZES = (1_000_000, 25_557_032)
VARIANTS = ("streamed", "npz", "disk")
RESULTS = Path(__file__).resolve().parent / "results"
KEYS = SimulatedSealingKeys(b"bench-platform-secret", b"\x5a" * 32)
PLAN = "ab" * 32


def layout(params: int, tensors: int = 160, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=0.0, sigma=2.0, size=tensors)
    sizes = np.maximum(1, np.floor(raw / raw.sum() * params)).astype(np.int64)
    sizes[int(np.argmax(sizes))] += params - int(sizes.sum())
    return [int(s) for s in sizes]


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _measure(op: Any) -> tuple[float, int]:
    _reset_peak()
    before = _kb("VmRSS")
    start = time.perf_counter()
    result = op()
    seconds = time.perf_counter() - start
    peak = _kb("VmHWM")
    del result
    return seconds, (peak - before) * 1024


def _save_npz(path: Path, ckpt: Checkpoint) -> None:
    arrays = {f"w{i}": a for i, a in enumerate(ckpt.weights.values())}
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    write_sealed(KEYS, "bench-npz", path, buf.getvalue())


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    data = read_sealed(KEYS, "bench-npz", path)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _save_disk(path: Path, ckpt: Checkpoint) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        for a in ckpt.weights.values():
            f.write(a.data)
        f.flush()
        os.fsync(f.fileno())


def _load_disk(path: Path, ckpt: Checkpoint) -> dict[str, np.ndarray]:
    out = {}
    with path.open("rb") as f:
        for name, a in ckpt.weights.items():
            arr = np.empty_like(a)
            f.readinto(arr.data)
            out[name] = arr
    return out


def child(variant: str, params: int, directory: Path) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    weights = {f"layer{i:03d}/w": rng.standard_normal(n, dtype=np.float32)
               for i, n in enumerate(layout(params))}  # fmt: skip
    ckpt = Checkpoint(PLAN, 3, 3, weights, {}, [{"round": 1}])
    store = CheckpointStore(directory, KEYS)
    path = directory / f"{variant}.bin"
    if variant == "streamed":
        save_s, save_peak = _measure(lambda: store.save(ckpt))
        load_s, load_peak = _measure(lambda: store.load(PLAN))
        size = store.path.stat().st_size
    elif variant == "npz":
        save_s, save_peak = _measure(lambda: _save_npz(path, ckpt))
        load_s, load_peak = _measure(lambda: _load_npz(path))
        size = path.stat().st_size
    else:
        save_s, save_peak = _measure(lambda: _save_disk(path, ckpt))
        load_s, load_peak = _measure(lambda: _load_disk(path, ckpt))
        size = path.stat().st_size
    model = sum(a.nbytes for a in weights.values())
    return {
        "variant": variant,
        "params": params,
        "model_bytes": model,
        "file_bytes": size,
        "save_s": save_s,
        "load_s": load_s,
        "save_peak_extra_over_model": save_peak / model,
        "load_peak_extra_over_model": load_peak / model,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per cell")
    p.add_argument("--label", default="")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hfl-bench-ckpt-") as tmp:
        for params in args.params:
            for variant in VARIANTS:
                runs = []
                for _ in range(args.repeats):
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", variant, str(params), tmp],
                        check=True, capture_output=True, text=True,
                    )  # fmt: skip
                    runs.append(json.loads(out.stdout))
                row = dict(runs[0])
                for key in ("save_s", "load_s", "save_peak_extra_over_model",
                            "load_peak_extra_over_model"):  # fmt: skip
                    row[key] = float(np.median([r[key] for r in runs]))
                rows.append(row)
    lines = [
        "| model | variant | save | load | save peak extra / model | "
        "load peak extra / model (1.0 = the model itself) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model_bytes'] / 1e6:.0f} MB | {r['variant']} | {r['save_s']:.3f} s | "
            f"{r['load_s']:.3f} s | {r['save_peak_extra_over_model']:.2f}x | "
            f"{r['load_peak_extra_over_model']:.2f}x |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    label = args.label or "latest"
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "rows": rows,
           "cpus": os.cpu_count()}  # fmt: skip
    (args.out / f"checkpoint-{label}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"checkpoint-{label}.md").write_text(table)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))))
        raise SystemExit(0)
    raise SystemExit(main())
