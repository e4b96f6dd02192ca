"""Keep the daemon's freed block buffers in its heap instead of handing them back to the kernel.

The data path allocates and frees 1 MiB buffers all the time (FUSE write payloads, block
plaintext, envelopes). With glibc's defaults, buffers of that size are either `mmap`ed and
unmapped one by one, or freed into a worker thread's arena that is trimmed (`MADV_DONTNEED`) as
soon as its free top passes the trim threshold. Either way the next buffer of the same size
starts on fresh pages, and the kernel zeroes every one of them on first touch: `perf` of a
512 MiB write+fsync put 16 % of the daemon's CPU in `clear_page_erms`, under `memmove` into
new buffers (docs/performance.md). Fixed thresholds keep such buffers in the heap for reuse.

Memory stays bounded by what the daemon holds at its peak (the block cache plus the blocks in
flight), which it needs anyway; only the release to the kernel after a peak is given up, up to
`TRIM_THRESHOLD`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("vnafs.heap")

# mallopt() parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# Above the largest buffer of the data path (a 1 MiB block plus envelope overhead), so blocks
# come from the heap; far below what a big LMDB read or a listing might ask for.
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 16 << 20
# One arena for every thread: a buffer freed by one worker thread is reused by the next, instead
# of each thread's arena keeping its own peak (measured: 261 -> 217 MiB peak RSS over a 512 MiB
# cold read, same CPU). Contention is no concern: small objects come from Python's own
# allocator, and the data path makes a handful of malloc calls per 1 MiB block.
ARENA_MAX = 1


def keep_freed_buffers() -> bool:
    """Set glibc's malloc thresholds for the daemon; False (and nothing changed) elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    # mallopt() refuses bad values but accepts unknown parameters, so its answer is only a
    # first check; tests/test_heap.py looks at the allocator's statistics for the effect.
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) for param, value in (
        (_M_ARENA_MAX, ARENA_MAX), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not ok:
        log.warning("could not tune malloc thresholds; writes cost more CPU")
    return ok
