"""The aggregator hands the heap a round freed back to the kernel (hfl_aggregator.heap)."""

from __future__ import annotations

import os

import pytest

from hfl_aggregator import heap
from tests.aggregator.test_rounds import join, make_engine, send

glibc_only = pytest.mark.skipif(
    not heap.available(), reason="malloc_trim is glibc's; this C library has none"
)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@glibc_only
def test_trim_returns_freed_chunk_sized_buffers_to_the_kernel() -> None:
    # Once a 1 MiB buffer is freed, glibc serves later ones from the heap (its mmap
    # threshold rises): freed, they stay in the RSS until trimmed.
    first = bytearray(1 << 20)
    del first
    chunks = [bytearray(1 << 20) for _ in range(64)]
    pinned = bytearray(1 << 20)  # above them: the heap's top cannot shrink past it
    del chunks
    before = _rss_bytes()
    assert heap.trim_heap() is True
    assert before - _rss_bytes() >= 32 << 20
    del pinned


@glibc_only
def test_each_aggregated_round_trims_the_heap_once() -> None:
    engine, _, registry = make_engine()
    a, b = join(engine, "a"), join(engine, "b")
    for round_ in (1, 2):
        send(engine, a, 1.0, round_=round_, version=round_ - 1)
        send(engine, b, 2.0, round_=round_, version=round_ - 1)
    assert engine.model()[1] == 2

    def trims(result: str) -> float:
        value = registry.get_sample_value("hfl_aggregator_heap_trims_total", {"result": result})
        return value or 0.0

    assert trims("released") + trims("none") == 2.0
    assert trims("unavailable") == 0.0


def test_trim_says_when_the_c_library_has_none() -> None:
    assert (heap.trim_heap() is None) is (not heap.available())
