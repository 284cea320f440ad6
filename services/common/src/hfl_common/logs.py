"""Structured logging for every hfl process, configured once in main().

`configure_logging` installs one handler on the root logger, writing to stderr:

- JSON lines when stderr is not a terminal (containers, CI, log shippers) or when asked:
  ``{"ts": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "hfl_aggregator.engine",
  "service": "aggregator", "msg": "round 3 closed", "round": 3}`` where every field given
  through ``extra={...}`` becomes a key, and a traceback goes to "exc".
- Human-readable lines otherwise: ``12:00:00.123 INFO  aggregator hfl_aggregator.engine:
  round 3 closed round=3``.

Code logs with ``logging.getLogger(__name__)`` and lazy arguments
(``log.info("round %d closed", n, extra={"round": n})``). The only state is the logging
module's own; calling `configure_logging` again replaces the handler it installed.
"""

from __future__ import annotations

import json as jsonlib
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from hfl_common.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Attributes every LogRecord has (logging.LogRecord.__init__, plus what Formatter adds);
# anything else on a record came from `extra=` and is emitted as a field.
_STANDARD_ATTRS = frozenset(
    {
        "args",
        "asctime",
        "created",
        "exc_info",
        "exc_text",
        "filename",
        "funcName",
        "levelname",
        "levelno",
        "lineno",
        "message",
        "module",
        "msecs",
        "msg",
        "name",
        "pathname",
        "process",
        "processName",
        "relativeCreated",
        "stack_info",
        "taskName",
        "thread",
        "threadName",
    }
)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, service, msg, extra fields, exc."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "service": self._service,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return jsonlib.dumps(entry, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """``time LEVEL service logger: message key=value ...`` for a terminal."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created).astimezone()
        line = (
            f"{moment:%H:%M:%S}.{moment.microsecond // 1000:03d} {record.levelname:<5} "
            f"{self._service} {record.name}: {record.getMessage()}"
        )
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class _HflHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure_logging installed, so a second call replaces it."""


def configure_logging(
    service: str, level: str = "INFO", json: bool | None = None, *, stream: TextIO | None = None
) -> None:
    """Send every log record at `level` or above to stderr (or `stream`) for `service`.

    `json` None chooses JSON lines unless the stream is a terminal. Raises ConfigError for
    an unknown level.
    """
    name = level.upper()
    if name not in LEVELS:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    out = stream if stream is not None else sys.stderr
    use_json = json if json is not None else not _is_terminal(out)

    handler = _HflHandler(out)
    handler.setFormatter(JsonFormatter(service) if use_json else HumanFormatter(service))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _HflHandler):
            root.removeHandler(existing)
            existing.close()
    root.addHandler(handler)
    root.setLevel(name)
    logging.captureWarnings(True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
