"""Each enclave holds only what it needs: no TensorFlow outside the trainer."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"tensorflow", "tensorflow-cpu", "keras", "tf-keras", "torch", "jax"}


def resolved_dependencies(package: str) -> set[str]:
    """The transitive runtime dependency set of a workspace package, from uv.lock."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    seen: set[str] = set()
    todo = [package]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in packages[name].get("dependencies", []):
            todo.append(dep["name"])
    return seen - {package}


@pytest.mark.parametrize("package", ["hfl-aggregator", "hfl-attestation", "hfl-common"])
def test_service_without_tensorflow_resolves_no_ml_framework(package: str) -> None:
    deps = resolved_dependencies(package)
    assert "numpy" in deps or package == "hfl-attestation"
    assert not deps & HEAVY, f"{package} pulls in {sorted(deps & HEAVY)}"


def test_trainer_resolves_tensorflow() -> None:
    # The check above can fail: the same resolution does find TensorFlow here.
    assert "tensorflow-cpu" in resolved_dependencies("hfl-trainer")


@pytest.mark.parametrize("module", ["hfl_aggregator.main", "hfl_attestation.main"])
def test_service_imports_no_tensorflow_at_run_time(module: str) -> None:
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')); "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""
