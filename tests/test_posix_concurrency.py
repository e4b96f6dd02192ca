"""POSIX tests, concurrency: writers in separate processes, many files at once and
O_APPEND records into one file.

The contract these tests pin down, what they assume and how to run them on any directory
(--posix-dir) are described in tests/posix_helpers.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.posix_helpers import (
    KIB,
    make_dir,
    make_file,
    rand_bytes,
    read_file,
    spawn_py,
    wait_all,
)

# Scale of test_concurrent_writers_distinct_files; a larger variant is run separately.
CONCURRENT_WRITERS = 16
FILES_PER_WRITER = 50
CONCURRENT_FILE_SIZE = 20 * KIB


# --------------------------------------------------------------------------------------------
# concurrency
# --------------------------------------------------------------------------------------------


def _concurrent_content(writer: int, index: int) -> bytes:
    return rand_bytes(CONCURRENT_FILE_SIZE, f"{writer}/{index}")


_WRITER = """
import os, random, sys
d, writer, files, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for index in range(files):
    data = random.Random(f"{writer}/{index}").randbytes(size)  # same as _concurrent_content
    fd = os.open(f"{d}/w{writer:03d}-{index:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    for start in range(0, size, 4096):
        chunk = data[start : start + 4096]
        assert os.write(fd, chunk) == len(chunk)
    os.close(fd)
"""


def test_concurrent_writers_distinct_files(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    args = (FILES_PER_WRITER, CONCURRENT_FILE_SIZE)
    wait_all([spawn_py(_WRITER, d, w, *args) for w in range(CONCURRENT_WRITERS)])
    assert len(os.listdir(d)) == CONCURRENT_WRITERS * FILES_PER_WRITER
    for w in range(CONCURRENT_WRITERS):
        for index in range(FILES_PER_WRITER):
            got = hashlib.sha256(read_file(d / f"w{w:03d}-{index:04d}")).digest()
            assert got == hashlib.sha256(_concurrent_content(w, index)).digest(), (w, index)


_APPENDER = """
import os, sys
path, writer, records = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
for i in range(records):
    record = f"{writer:02d}:{i:05d}:".ljust(63, "x").encode() + b"\\n"
    assert os.write(fd, record) == 64
os.close(fd)
"""


def test_concurrent_o_append_writers_never_overwrite_each_other(posix_dir: Path) -> None:
    path = make_file(posix_dir / "log")
    writers, records = 8, 300
    wait_all([spawn_py(_APPENDER, path, w, records) for w in range(writers)])
    data = read_file(path)
    assert len(data) == writers * records * 64
    lines = [data[i : i + 64] for i in range(0, len(data), 64)]
    per_writer: dict[int, list[int]] = {}
    for line in lines:
        assert line.endswith(b"x\n"), line
        writer, index = line.split(b":")[:2]
        per_writer.setdefault(int(writer), []).append(int(index))
    assert per_writer == {w: list(range(records)) for w in range(writers)}
