"""POSIX tests, file data: reads and writes around block boundaries, holes and sparse files,
truncation, and what one file descriptor sees of another's writes (fsync, shared mmap, record
locks and flock between processes).

The contract these tests pin down, what they assume and how to run them on any directory
(--posix-dir) are described in tests/posix_helpers.py.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
from pathlib import Path

import pytest

from tests.posix_helpers import (
    BLOCK,
    GIB,
    assert_errno,
    make_dir,
    make_file,
    pread_exact,
    rand_bytes,
    read_file,
    run_py,
    write_all,
)

# --------------------------------------------------------------------------------------------
# data at offsets, block boundaries, holes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [BLOCK - 1, BLOCK, BLOCK + 1])
def test_write_and_read_at_block_boundary_offset(posix_dir: Path, offset: int) -> None:
    path = posix_dir / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, b"XYZ", offset=offset)
        assert os.fstat(fd).st_size == offset + 3
        assert os.pread(fd, 3, offset) == b"XYZ"
        assert os.pread(fd, 5, offset - 2) == b"\0\0XYZ"
    finally:
        os.close(fd)
    assert read_file(path) == bytes(offset) + b"XYZ"


def test_write_spanning_three_blocks_inside_existing_data(posix_dir: Path) -> None:
    model = bytearray(b"\xaa" * (3 * BLOCK + 100))
    path = make_file(posix_dir / "f", bytes(model))
    data = rand_bytes(2 * BLOCK, "span")
    offset = BLOCK // 2  # touches blocks 0, 1 and 2
    fd = os.open(path, os.O_RDWR)
    try:
        write_all(fd, data, offset=offset)
        model[offset : offset + len(data)] = data
        assert os.fstat(fd).st_size == len(model)
        for start, length in [
            (BLOCK - 10, 20),
            (2 * BLOCK - 1, 2),
            (offset - 3, 6),
            (offset + len(data) - 3, 6),
            (0, 3 * BLOCK + 100),
        ]:
            assert os.pread(fd, length, start) == model[start : start + length]
    finally:
        os.close(fd)
    assert read_file(path) == model


def test_pwrite_beyond_eof_creates_hole_reading_as_zeros(posix_dir: Path) -> None:
    path = make_file(posix_dir / "f", b"head")
    far = 3 * BLOCK + 100
    fd = os.open(path, os.O_RDWR)
    try:
        write_all(fd, b"tail", offset=far)
        assert os.fstat(fd).st_size == far + 4
        assert os.pread(fd, 10, 0) == b"head" + bytes(6)
        for start in (4, BLOCK - 1, BLOCK, 2 * BLOCK + 7, far - 8):
            assert os.pread(fd, 8, start) == bytes(8)
        assert os.pread(fd, 100, far) == b"tail"
    finally:
        os.close(fd)
    assert read_file(path) == b"head" + bytes(far - 4) + b"tail"


def test_large_sparse_file_at_5_gib(posix_dir: Path) -> None:
    path = posix_dir / "sparse"
    end = 5 * GIB
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.lseek(fd, end, os.SEEK_SET)
        assert os.write(fd, b"Z") == 1
        write_all(fd, b"abcd", offset=4 * GIB - 2)  # straddles the 32-bit offset boundary
        assert os.fstat(fd).st_size == end + 1
    finally:
        os.close(fd)
    assert os.stat(path).st_size == end + 1
    fd = os.open(path, os.O_RDONLY)
    try:
        for start in (0, BLOCK - 1, GIB + 7, 4 * GIB - 8192, 4 * GIB + 2, end - 4096):
            assert pread_exact(fd, 4096, start) == bytes(4096), start
        assert os.pread(fd, 4, 4 * GIB - 2) == b"abcd"
        assert os.pread(fd, 10, end - 2) == b"\0\0Z"
        assert os.pread(fd, 10, end + 1) == b""
        assert os.pread(fd, 10, end + GIB) == b""
    finally:
        os.close(fd)


def test_random_pwrite_and_ftruncate_match_in_memory_model(posix_dir: Path) -> None:
    rng = random.Random(1234567)
    hot = [0, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 3, 2 * BLOCK, 3 * BLOCK + 5]
    model = bytearray()
    path = posix_dir / "model"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for step in range(200):
            if rng.random() < 0.15:
                size = rng.choice([rng.randrange(0, 4 * BLOCK), rng.choice(hot)])
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
            else:
                near = max(0, rng.choice(hot) + rng.randrange(-64, 64))
                offset = rng.choice([rng.randrange(0, 4 * BLOCK), near])
                length = rng.choice([1, 2, 100, 4096, rng.randrange(1, 300_000), BLOCK + 1])
                data = rng.randbytes(length)
                write_all(fd, data, offset=offset)
                if offset + length > len(model):
                    model.extend(bytes(offset + length - len(model)))
                model[offset : offset + length] = data
            if step % 20 == 19:
                assert os.fstat(fd).st_size == len(model)
                assert pread_exact(fd, len(model) + 1, 0) == model, step
    finally:
        os.close(fd)
    assert read_file(path) == model


def test_lseek_data_and_hole_are_consistent(posix_dir: Path) -> None:
    """SEEK_DATA/SEEK_HOLE (used by cp) may report holes or not, but never lie about data."""
    path = posix_dir / "f"
    tail = 3 * BLOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, b"head", offset=0)
        write_all(fd, b"tail", offset=tail)
        size = tail + 4
        assert os.lseek(fd, 0, os.SEEK_END) == size
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert 4 <= os.lseek(fd, 0, os.SEEK_HOLE) <= size
        assert 5 <= os.lseek(fd, 5, os.SEEK_DATA) <= tail
        assert os.lseek(fd, tail, os.SEEK_HOLE) == size
        assert_errno(lambda: os.lseek(fd, size, os.SEEK_DATA), errno.ENXIO)
        assert_errno(lambda: os.lseek(fd, size + 1, os.SEEK_HOLE), errno.ENXIO)
        assert os.read(fd, 10) == b""  # the last lseek that succeeded left us at EOF
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# truncate
# --------------------------------------------------------------------------------------------


def test_truncate_up_extends_with_zeros(posix_dir: Path) -> None:
    path = make_file(posix_dir / "f", b"abc")
    os.truncate(path, 2 * BLOCK + 5)
    assert os.stat(path).st_size == 2 * BLOCK + 5
    assert read_file(path) == b"abc" + bytes(2 * BLOCK + 2)


def test_truncate_down_then_extend_reads_zeros_not_old_data(posix_dir: Path) -> None:
    path = make_file(posix_dir / "f", b"\xff" * (3 * BLOCK))
    os.truncate(path, 100)
    assert os.stat(path).st_size == 100
    assert read_file(path) == b"\xff" * 100
    os.truncate(path, 3 * BLOCK)
    assert read_file(path) == b"\xff" * 100 + bytes(3 * BLOCK - 100)


@pytest.mark.parametrize("cut", [12345, BLOCK - 1, BLOCK, BLOCK + 12345, 2 * BLOCK + 1])
def test_truncate_to_mid_block_then_extend_by_writing(posix_dir: Path, cut: int) -> None:
    original = rand_bytes(3 * BLOCK, "mid")
    path = make_file(posix_dir / "f", original)
    os.truncate(path, cut)
    assert os.stat(path).st_size == cut
    fd = os.open(path, os.O_RDWR)
    try:
        write_all(fd, b"END", offset=3 * BLOCK)
        assert os.pread(fd, 64, cut - 32) == original[cut - 32 : cut] + bytes(32)
    finally:
        os.close(fd)
    assert read_file(path) == original[:cut] + bytes(3 * BLOCK - cut) + b"END"


def test_ftruncate_on_fd_while_writing(posix_dir: Path) -> None:
    path = posix_dir / "f"
    first = rand_bytes(2 * BLOCK, "ftrunc")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, first)
        os.ftruncate(fd, 1000)
        assert os.fstat(fd).st_size == 1000
        assert os.stat(path).st_size == 1000
        # The file offset is unaffected by ftruncate: the next write leaves a hole.
        assert os.lseek(fd, 0, os.SEEK_CUR) == 2 * BLOCK
        write_all(fd, b"more")
        assert os.fstat(fd).st_size == 2 * BLOCK + 4
        os.ftruncate(fd, 3 * BLOCK)
        assert os.pread(fd, 8, 3 * BLOCK - 4) == bytes(4)
    finally:
        os.close(fd)
    assert read_file(path) == first[:1000] + bytes(2 * BLOCK - 1000) + b"more" + bytes(BLOCK - 4)


def test_truncate_by_path_is_seen_by_open_fd(posix_dir: Path) -> None:
    path = make_file(posix_dir / "f", rand_bytes(BLOCK + 10, "seen"))
    fd = os.open(path, os.O_RDWR)
    try:
        os.truncate(path, 10)
        assert os.fstat(fd).st_size == 10
        assert os.pread(fd, 100, 0) == rand_bytes(BLOCK + 10, "seen")[:10]
        assert os.pread(fd, 100, BLOCK) == b""
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# visibility between file descriptors
# --------------------------------------------------------------------------------------------


def test_write_visible_through_second_fd_opened_before_close(posix_dir: Path) -> None:
    path = posix_dir / "f"
    data = rand_bytes(BLOCK + 777, "vis")
    writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(writer, data)
        assert os.stat(path).st_size == len(data)
        reader = os.open(path, os.O_RDONLY)
        try:
            assert os.fstat(reader).st_size == len(data)
            assert pread_exact(reader, len(data) + 1, 0) == data
        finally:
            os.close(reader)
    finally:
        os.close(writer)


def test_write_visible_through_fd_opened_before_the_write(posix_dir: Path) -> None:
    path = make_file(posix_dir / "f", b"old contents")
    reader = os.open(path, os.O_RDONLY)
    try:
        assert os.read(reader, 3) == b"old"
        writer = os.open(path, os.O_WRONLY)
        try:
            write_all(writer, b"NEW", offset=0)
            write_all(writer, b"+grown", offset=12)
            assert os.pread(reader, 100, 0) == b"NEW contents+grown"
            assert os.fstat(reader).st_size == 18
        finally:
            os.close(writer)
    finally:
        os.close(reader)


def test_fsync_and_fdatasync_on_file_and_directory(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    path = d / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, b"durable")
        os.fdatasync(fd)
        write_all(fd, b"!")
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"durable!"
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
        assert os.fstat(dfd).st_ino == os.stat(d).st_ino
    finally:
        os.close(dfd)
    assert read_file(path) == b"durable!"


def test_shared_mmap_write_is_visible_to_read(posix_dir: Path) -> None:
    path = make_file(posix_dir / "f", rand_bytes(2 * BLOCK + 10, "mmap"))
    expected = bytearray(read_file(path))
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as mapped:
            assert mapped[BLOCK - 2 : BLOCK + 2] == expected[BLOCK - 2 : BLOCK + 2]
            mapped[BLOCK - 2 : BLOCK + 2] = b"ABCD"
            mapped[-3:] = b"xyz"
            mapped.flush()
    finally:
        os.close(fd)
    expected[BLOCK - 2 : BLOCK + 2] = b"ABCD"
    expected[-3:] = b"xyz"
    assert read_file(path) == expected


def test_fcntl_record_lock_conflicts_between_processes(posix_dir: Path) -> None:
    path = make_file(posix_dir / "lock", b"x")
    probe = """
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    """
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        assert run_py(probe, path) in ("EAGAIN", "EACCES")
        fcntl.lockf(fd, fcntl.LOCK_UN)
        assert run_py(probe, path) == "OK"
    finally:
        os.close(fd)


def test_flock_conflicts_between_processes(posix_dir: Path) -> None:
    path = make_file(posix_dir / "lock", b"x")
    probe = """
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert run_py(probe, path) == "EAGAIN"
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert run_py(probe, path) == "OK"
    finally:
        os.close(fd)
