"""Structured logs: JSON lines for machines, readable lines for people."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from hfl_common.errors import ConfigError
from hfl_common.logs import configure_logging


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_service_logger_message_and_extra_fields() -> None:
    out = io.StringIO()
    configure_logging("aggregator", "INFO", json=True, stream=out)

    logging.getLogger("hfl_aggregator.rounds").info(
        "round %d closed", 3, extra={"round": 3, "updates": 2}
    )

    entry = json.loads(out.getvalue())
    assert entry["level"] == "INFO"
    assert entry["logger"] == "hfl_aggregator.rounds"
    assert entry["service"] == "aggregator"
    assert entry["msg"] == "round 3 closed"
    assert (entry["round"], entry["updates"]) == (3, 2)
    assert entry["ts"].endswith("Z")
    assert len(entry["ts"]) == len("2025-01-31T12:00:00.123Z")


def test_json_line_of_an_exception_holds_the_traceback() -> None:
    out = io.StringIO()
    configure_logging("trainer", "INFO", json=True, stream=out)
    try:
        raise KeyError("missing")
    except KeyError:
        logging.getLogger("t").exception("step failed")

    entry = json.loads(out.getvalue())
    assert entry["msg"] == "step failed"
    assert "Traceback" in entry["exc"]
    assert "KeyError: 'missing'" in entry["exc"]


def test_terminal_gets_human_readable_lines_when_json_is_not_forced() -> None:
    out = Terminal()
    configure_logging("attestation", "DEBUG", stream=out)

    logging.getLogger("hfl_attestation.policy").debug("policy loaded", extra={"roles": 3})

    line = out.getvalue().rstrip("\n")
    assert line.endswith("attestation hfl_attestation.policy: policy loaded roles=3")
    assert " DEBUG " in line


def test_a_pipe_gets_json_when_json_is_not_forced() -> None:
    out = io.StringIO()
    configure_logging("attestation", "INFO", stream=out)
    logging.getLogger("x").info("hello")
    assert json.loads(out.getvalue())["msg"] == "hello"


def test_records_below_the_level_are_dropped() -> None:
    out = io.StringIO()
    configure_logging("trainer", "warning", json=True, stream=out)
    logging.getLogger("t").info("not shown")
    logging.getLogger("t").warning("shown")
    assert [json.loads(line)["msg"] for line in out.getvalue().splitlines()] == ["shown"]


def test_configuring_twice_replaces_the_handler_instead_of_doubling_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("trainer", "INFO", json=True, stream=first)
    configure_logging("trainer", "INFO", json=True, stream=second)
    logging.getLogger("t").info("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1


def test_unknown_level_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        configure_logging("trainer", "LOUD")
    assert str(caught.value) == (
        "log level 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    )
