"""Model freshness at the trainer: never train on a model older than one already seen.

A sealed checkpoint is confidential and authentic, not fresh: the aggregator's host can
put back an older checkpoint file and restart it, and the genuine aggregator resumes
from it. Each trainer remembers, in its own state directory, the highest model version
it was served for each plan (the plan's hash names the federation), and refuses an
aggregator that serves a lower one. See docs/security.md, "Freshness at trainers".
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from hfl_common.errors import ConfigError, PermissionDeniedError
from hfl_common.sealing import write_atomic

FILE_NAME = "aggregator_seen.json"


class ModelVersionMemory:
    """The highest model version seen per plan hash, in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{self.path} does not hold the model versions seen: {exc}") from None
        plans = data.get("plans") if isinstance(data, dict) else None
        if not isinstance(plans, dict):
            raise ConfigError(f'{self.path} does not hold the model versions seen: no "plans"')
        return plans

    def seen(self, plan_sha256: str) -> int:
        entry = self._load().get(plan_sha256, {})
        version = entry.get("model_version", 0) if isinstance(entry, dict) else 0
        if not isinstance(version, int) or version < 0:
            raise ConfigError(f"{self.path}: bad model version for plan {plan_sha256[:12]}")
        return version

    def check(self, plan_sha256: str, federation: str, version: int) -> None:
        """Refuse a model version below the highest seen for this plan; remember a higher one."""
        with self._lock:
            plans = self._load()
            seen = self.seen(plan_sha256)
            if version < seen:
                raise PermissionDeniedError(
                    f"the aggregator of federation {federation!r} serves model version "
                    f"{version}, but this trainer was already served version {seen}: its "
                    "state went back (an older sealed checkpoint was put back); refusing to "
                    f"train on it. If this is intended, remove {self.path}",
                    "aggregator_rollback",
                )
            if version > seen:
                plans[plan_sha256] = {"federation": federation, "model_version": version}
                write_atomic(self.path, json.dumps({"plans": plans}, sort_keys=True).encode())
