"""Shared by the container tests: images built once per session, removed at its end."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def images_to_remove() -> Iterator[set[str]]:
    """Images a test built; removed when the session ends, so that a later module
    (tests/deploy/test_compose_trainer_only.py after test_compose_e2e.py) reuses them
    instead of building them again."""
    images: set[str] = set()
    yield images
    # Base images last: an image is removed only once nothing is built on it.
    bases = sorted(i for i in images if i.startswith("hfl-base/"))
    for batch in (sorted(images - set(bases)), bases):
        if batch:
            subprocess.run(["docker", "rmi", *batch], capture_output=True, check=False, timeout=600)
