"""The daemon's malloc tuning (vnafs/heap.py) takes effect.

mallopt() accepts unknown parameters without complaint, so its answer proves little; the tests
look at the allocator's own statistics instead. They run in child processes, so the test process
keeps its own allocator settings, and each also runs untuned, to show the probe sees glibc's
default behaviour.
"""

from __future__ import annotations

import subprocess
import sys

PREAMBLE = """
import ctypes, ctypes.util, sys, threading
from vnafs import heap

libc = ctypes.CDLL(ctypes.util.find_library("c"))
if sys.argv[1] == "tuned":
    heap.keep_freed_buffers()
"""

# A 2 MiB buffer: above glibc's default mmap threshold (128 KiB), below the daemon's (4 MiB).
# mallinfo2().hblks counts the live chunks malloc got from mmap.
MMAPPED = PREAMBLE + """
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks  # chunks mapped during start-up are still there
buf = bytearray(2 << 20)
print(libc.mallinfo2().hblks - before)
"""

# A thread's first malloc gets an arena of its own unless M_ARENA_MAX forbids it; malloc_info()
# writes one <heap nr=...> element per arena.
ARENAS = PREAMBLE + """
keep = []
thread = threading.Thread(target=lambda: keep.append(bytearray(64 << 10)))
thread.start()
thread.join()
text, size = ctypes.c_char_p(), ctypes.c_size_t()
libc.open_memstream.restype = ctypes.c_void_p
stream = ctypes.c_void_p(libc.open_memstream(ctypes.byref(text), ctypes.byref(size)))
libc.malloc_info(0, stream)
libc.fclose(stream)
print(text.value.decode().count("<heap nr="))
"""


def _probe(script: str, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                         check=True, timeout=60)
    return int(out.stdout)


def test_block_sized_buffers_come_from_the_heap() -> None:
    assert _probe(MMAPPED, "default") == 1
    assert _probe(MMAPPED, "tuned") == 0


def test_all_threads_share_one_arena() -> None:
    assert _probe(ARENAS, "default") >= 2
    assert _probe(ARENAS, "tuned") == 1
