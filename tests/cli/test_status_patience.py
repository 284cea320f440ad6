"""`hfl run` tolerates a slow or busy status answer instead of stopping the federation."""

from __future__ import annotations

import grpc

from hfl_cli.run import StatusPatience


def test_slow_or_busy_answers_are_waited_out_for_the_patience_then_given_up() -> None:
    patience = StatusPatience(seconds=120)
    for code in (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
    ):
        assert patience.keep_asking(code, now=1000.0)
    assert patience.keep_asking(grpc.StatusCode.DEADLINE_EXCEEDED, now=1119.0)
    assert not patience.keep_asking(grpc.StatusCode.DEADLINE_EXCEEDED, now=1121.0)


def test_an_answer_resets_the_patience() -> None:
    patience = StatusPatience(seconds=10)
    assert patience.keep_asking(grpc.StatusCode.DEADLINE_EXCEEDED, now=0.0)
    patience.answered()
    assert patience.keep_asking(grpc.StatusCode.DEADLINE_EXCEEDED, now=100.0)
    assert patience.keep_asking(grpc.StatusCode.DEADLINE_EXCEEDED, now=109.0)


def test_a_refusal_ends_the_run_at_once() -> None:
    patience = StatusPatience()
    assert not patience.keep_asking(grpc.StatusCode.PERMISSION_DENIED, now=0.0)
    assert not patience.keep_asking(None, now=0.0)
