"""Hand the heap that a round freed back to the operating system (glibc `malloc_trim`).

A round allocates and frees many buffers of about a chunk (1 MiB) each: gRPC's
received messages, protobuf copies, the download messages. glibc raises its mmap
threshold once such a buffer is freed, so later ones come from the heap and, once
freed, stay in the process's RSS as free heap that no other allocation may fit.
`malloc_trim(0)` returns every free page of every arena to the kernel
(`MADV_DONTNEED`): it costs a pass over the free lists, once per round, outside the
engine lock. Measured: benchmarks/results/e2e-mem2-*.md, docs/performance.md.

Elsewhere than glibc (musl, macOS) there is no `malloc_trim`: `trim_heap` does nothing
and says so by returning None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        fn = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM = _load()


def available() -> bool:
    """Whether this C library has malloc_trim (glibc)."""
    return _MALLOC_TRIM is not None


def trim_heap() -> bool | None:
    """Return free heap pages to the kernel: True when some were released, False when
    none were, None where the C library has no malloc_trim."""
    if _MALLOC_TRIM is None:
        return None
    return bool(_MALLOC_TRIM(0))
