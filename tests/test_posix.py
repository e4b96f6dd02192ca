"""POSIX semantics of a mounted vnafs, checked through ordinary system calls.

Why this file exists: PACS software, backup tools (`cp -a`, `rsync -aHAX`) and NFS/SMB re-exports
expect vnafs to behave like a boring local POSIX filesystem. These tests pin that contract down
one behaviour per test (open flags, offsets around vnafs's 1 MiB blocks, sparse files, truncation,
every rename variant, link counts, timestamps, permissions under `default_permissions`, xattrs,
readdir while the directory changes, concurrent writers), so that a regression in the namespace
or the data path shows up as a named broken behaviour instead of as a damaged study.

The tests are deliberately generic. They only use the `mnt` fixture (provided by conftest.py):
the root directory of a freshly created, mounted, empty filesystem, mounted with `allow_other`
and `default_permissions`, owned by root, mode 0755. They must pass unchanged on a plain ext4
directory, which is how the file itself is validated. Where Linux filesystems legitimately
differ (st_blocks accounting, atime under relatime) nothing is asserted. A few tests check Linux
behaviour that POSIX leaves to the implementation (setgid-directory inheritance, chown clearing
set-id bits, ctime on setxattr, the 64 KiB xattr value limit); their docstrings say so.

Requirements: run as root; uid/gid 65534 (and uid 1234 for the ACL test) must be able to
traverse to `mnt`; `cp` and `rsync` must be installed. Tests never look at the contents of
`mnt` itself beyond what they create, so virtual directories at the root do not disturb them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import random
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
BLOCK = MIB  # vnafs block size: offsets around multiples of this are where bugs hide
NOBODY = 65534
SEC = 1_000_000_000
OLD_NS = 1_000_000_000 * SEC + 123_456_789  # 2001-09-09, long before any test runs
TIME_SLACK_NS = 2 * SEC

# <fcntl.h>, <linux/fs.h>, <sys/stat.h>
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
XATTR_SIZE_MAX = 65536  # the Linux VFS limit for one xattr value

# Scale of test_concurrent_writers_distinct_files; a larger variant is run separately.
CONCURRENT_WRITERS = 16
FILES_PER_WRITER = 50
CONCURRENT_FILE_SIZE = 20 * KIB


# --------------------------------------------------------------------------------------------
# syscall wrappers and helpers
# --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.renameat2.restype = ctypes.c_int
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.utimensat.restype = ctypes.c_int


def renameat2(src: Path, dst: Path, flags: int) -> None:
    """renameat2(2) with RENAME_NOREPLACE / RENAME_EXCHANGE, raising OSError like os.rename."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def ts(ns: int) -> tuple[int, int]:
    """A (tv_sec, tv_nsec) pair for utimensat."""
    return divmod(ns, SEC)


NOW = (0, UTIME_NOW)
OMIT = (0, UTIME_OMIT)


def utimensat(
    path: Path, atime: tuple[int, int], mtime: tuple[int, int], *, follow: bool = True
) -> None:
    """utimensat(2), which (unlike os.utime) accepts UTIME_NOW and UTIME_OMIT per timestamp."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    flags = 0 if follow else AT_SYMLINK_NOFOLLOW
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))


def assert_errno(func: Callable[[], object], *codes: int) -> OSError:
    """Call func and check that it fails with one of the given errno values."""
    with pytest.raises(OSError) as info:
        func()
    got = info.value.errno
    names = [errno.errorcode[c] for c in codes]
    assert got in codes, f"expected {names}, got {errno.errorcode.get(got or 0, got)}: {info.value}"
    return info.value


def write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    """write(2) or pwrite(2) until every byte is written."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        assert n > 0
        view = view[n:]
        if offset is not None:
            offset += n


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """pread(2) up to size bytes, looping over short reads; shorter only at end of file."""
    chunks: list[bytes] = []
    while size > 0:
        chunk = os.pread(fd, min(size, 8 * MIB), offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_file(path: Path | bytes) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks: list[bytes] = []
        while chunk := os.read(fd, 4 * MIB):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def make_file(path: Path, data: bytes = b"", mode: int = 0o644) -> Path:
    """Create a new file with exactly this content and mode (independent of the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)
    return path


def make_dir(path: Path, mode: int = 0o755) -> Path:
    os.mkdir(path)
    os.chmod(path, mode)
    return path


def rand_bytes(size: int, seed: object) -> bytes:
    return random.Random(str(seed)).randbytes(size)


def age(path: Path) -> None:
    """Set atime and mtime far into the past, so a later update is unambiguous."""
    os.utime(path, ns=(OLD_NS, OLD_NS), follow_symlinks=False)


def tick() -> None:
    """Let the clock move on, so a ctime set now differs from one set before (coarse clocks)."""
    time.sleep(0.05)


def assert_recent(ns: int, since: int) -> None:
    """ns is a timestamp taken between `since` and now (with slack for coarse clocks)."""
    assert since - TIME_SLACK_NS <= ns <= time.time_ns() + TIME_SLACK_NS, (ns, since)


def _world_executable(path: str) -> bool:
    real = Path(os.path.realpath(path))
    if not real.is_file():
        return False
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (real, *real.parents))


def _unprivileged_python() -> str:
    """An interpreter an unprivileged user can run (pyenv under /root is not one)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if candidate and _world_executable(candidate):
            return candidate
    raise AssertionError("no python3 executable by other users was found")


_PROLOGUE = "import errno, fcntl, os, sys\ntry:\n"
_EPILOGUE = """
except OSError as exc:
    print(errno.errorcode.get(exc.errno or 0, exc.errno))
else:
    print("OK")
"""


def run_py(body: str, *args: str | Path, uid: int | None = None, gid: int | None = None) -> str:
    """Run `body` in a new Python process, optionally as uid/gid with no supplementary groups.

    `args` are `sys.argv[1:]`. Returns "OK", or the errno name of the OSError that escaped
    (anything else, such as a failed assert, fails the calling test).
    """
    code = _PROLOGUE + textwrap.indent(textwrap.dedent(body).strip(), "    ") + _EPILOGUE

    def drop_privileges() -> None:
        if uid is not None:
            os.setgroups([])
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)

    python = sys.executable if uid is None else _unprivileged_python()
    proc = subprocess.run(
        [python, "-I", "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        cwd="/",
        preexec_fn=drop_privileges,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def as_nobody(body: str, *args: str | Path) -> str:
    """run_py as uid 65534, gid 65534, no supplementary groups."""
    return run_py(body, *args, uid=NOBODY, gid=NOBODY)


# --------------------------------------------------------------------------------------------
# open(2) flags
# --------------------------------------------------------------------------------------------


def test_o_excl_on_existing_file_fails_with_eexist(mnt: Path) -> None:
    path = make_file(mnt / "f", b"keep me")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC
    assert_errno(lambda: os.open(path, flags, 0o644), errno.EEXIST)
    assert read_file(path) == b"keep me"


def test_o_excl_on_existing_directory_and_dangling_symlink_fails_with_eexist(mnt: Path) -> None:
    make_dir(mnt / "d")
    os.symlink("nowhere", mnt / "dangling")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    assert_errno(lambda: os.open(mnt / "d", flags, 0o644), errno.EEXIST)
    assert_errno(lambda: os.open(mnt / "dangling", flags, 0o644), errno.EEXIST)
    assert not (mnt / "nowhere").exists()


# Child processes are separate interpreters (not multiprocessing forks), so these tests stay
# safe when the filesystem daemon runs in a thread of the pytest process itself.

_RACER = """
import errno, os, sys
base, rounds, me = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
outcome = []
for r in range(rounds):
    print("ready", flush=True)
    if sys.stdin.readline() != "go\\n":
        sys.exit("no go")
    try:
        fd = os.open(f"{base}-{r}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        outcome.append(errno.errorcode.get(exc.errno, str(exc.errno)))
    else:
        os.write(fd, str(me).encode())
        os.close(fd)
        outcome.append("WON")
print(" ".join(outcome), flush=True)
"""


def spawn_py(code: str, *args: object, stdin: int | None = None) -> subprocess.Popen[str]:
    """Start `code` in a new interpreter (as root) with sys.argv[1:] = args."""
    return subprocess.Popen(
        [sys.executable, "-I", "-c", code, *map(str, args)],
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )


def wait_all(procs: list[subprocess.Popen[str]], timeout: float = 600) -> list[str]:
    """Wait for every process; each must exit 0. Returns their remaining stdout."""
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs)
    return outputs


def test_o_excl_race_between_8_processes_has_exactly_one_winner(mnt: Path) -> None:
    racers, rounds = 8, 20
    base = mnt / "race"
    procs = [spawn_py(_RACER, base, rounds, me, stdin=subprocess.PIPE) for me in range(racers)]
    try:
        for _ in range(rounds):
            for proc in procs:  # every racer is ready before any is released
                assert proc.stdout is not None
                assert proc.stdout.readline() == "ready\n"
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
    finally:
        outputs = wait_all(procs, timeout=120)
    table = [line.split() for line in outputs]
    for r in range(rounds):
        outcomes = [table[me][r] for me in range(racers)]
        assert sorted(outcomes) == ["EEXIST"] * (racers - 1) + ["WON"], outcomes
        assert read_file(Path(f"{base}-{r}")) == str(outcomes.index("WON")).encode()


def test_o_creat_without_o_excl_opens_existing_file_untouched(mnt: Path) -> None:
    path = make_file(mnt / "f", b"original", 0o600)
    ino = os.stat(path).st_ino
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o777)
    try:
        assert os.fstat(fd).st_ino == ino
        assert os.read(fd, 100) == b"original"
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_open_missing_file_without_o_creat_fails_with_enoent(mnt: Path) -> None:
    assert_errno(lambda: os.open(mnt / "missing", os.O_RDONLY), errno.ENOENT)
    assert_errno(lambda: os.open(mnt / "missing" / "x", os.O_RDONLY), errno.ENOENT)


def test_open_directory_for_writing_fails_with_eisdir(mnt: Path) -> None:
    make_dir(mnt / "d")
    assert_errno(lambda: os.open(mnt / "d", os.O_WRONLY), errno.EISDIR)
    assert_errno(lambda: os.open(mnt / "d", os.O_RDWR), errno.EISDIR)


def test_file_used_as_directory_fails_with_enotdir(mnt: Path) -> None:
    path = make_file(mnt / "f", b"x")
    assert_errno(lambda: os.open(path, os.O_RDONLY | os.O_DIRECTORY), errno.ENOTDIR)
    assert_errno(lambda: os.stat(path / "child"), errno.ENOTDIR)
    assert_errno(lambda: os.mkdir(path / "child"), errno.ENOTDIR)


def test_o_trunc_truncates_existing_file(mnt: Path) -> None:
    path = make_file(mnt / "f", rand_bytes(3 * MIB + 5, "trunc"))
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        write_all(fd, b"new")
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 3
    assert read_file(path) == b"new"


def test_o_append_appends_at_end_with_two_interleaved_fds(mnt: Path) -> None:
    path = make_file(mnt / "log")
    fd_a = os.open(path, os.O_WRONLY | os.O_APPEND)
    fd_b = os.open(path, os.O_WRONLY | os.O_APPEND)
    fd_plain = os.open(path, os.O_WRONLY)
    expected = b""
    try:
        for i in range(50):
            for fd, tag in ((fd_a, b"A"), (fd_b, b"B")):
                record = tag + str(i).encode() + b";"
                write_all(fd, record)
                expected += record
        # An explicit seek does not stop O_APPEND from writing at the end.
        os.lseek(fd_a, 0, os.SEEK_SET)
        write_all(fd_a, b"<seeked>")
        expected += b"<seeked>"
        # A non-append writer extends the file past a block boundary; appends follow it.
        write_all(fd_plain, b"!", offset=len(expected) + BLOCK)
        expected += bytes(BLOCK) + b"!"
        write_all(fd_b, b"tail")
        expected += b"tail"
        assert os.lseek(fd_b, 0, os.SEEK_CUR) == len(expected)
    finally:
        for fd in (fd_a, fd_b, fd_plain):
            os.close(fd)
    assert read_file(path) == expected


# --------------------------------------------------------------------------------------------
# data at offsets, block boundaries, holes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [BLOCK - 1, BLOCK, BLOCK + 1])
def test_write_and_read_at_block_boundary_offset(mnt: Path, offset: int) -> None:
    path = mnt / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, b"XYZ", offset=offset)
        assert os.fstat(fd).st_size == offset + 3
        assert os.pread(fd, 3, offset) == b"XYZ"
        assert os.pread(fd, 5, offset - 2) == b"\0\0XYZ"
    finally:
        os.close(fd)
    assert read_file(path) == bytes(offset) + b"XYZ"


def test_write_spanning_three_blocks_inside_existing_data(mnt: Path) -> None:
    model = bytearray(b"\xaa" * (3 * BLOCK + 100))
    path = make_file(mnt / "f", bytes(model))
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


def test_pwrite_beyond_eof_creates_hole_reading_as_zeros(mnt: Path) -> None:
    path = make_file(mnt / "f", b"head")
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


def test_large_sparse_file_at_5_gib(mnt: Path) -> None:
    path = mnt / "sparse"
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


def test_random_pwrite_and_ftruncate_match_in_memory_model(mnt: Path) -> None:
    rng = random.Random(1234567)
    hot = [0, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 3, 2 * BLOCK, 3 * BLOCK + 5]
    model = bytearray()
    path = mnt / "model"
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


def test_lseek_data_and_hole_are_consistent(mnt: Path) -> None:
    """SEEK_DATA/SEEK_HOLE (used by cp) may report holes or not, but never lie about data."""
    path = mnt / "f"
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


def test_truncate_up_extends_with_zeros(mnt: Path) -> None:
    path = make_file(mnt / "f", b"abc")
    os.truncate(path, 2 * BLOCK + 5)
    assert os.stat(path).st_size == 2 * BLOCK + 5
    assert read_file(path) == b"abc" + bytes(2 * BLOCK + 2)


def test_truncate_down_then_extend_reads_zeros_not_old_data(mnt: Path) -> None:
    path = make_file(mnt / "f", b"\xff" * (3 * BLOCK))
    os.truncate(path, 100)
    assert os.stat(path).st_size == 100
    assert read_file(path) == b"\xff" * 100
    os.truncate(path, 3 * BLOCK)
    assert read_file(path) == b"\xff" * 100 + bytes(3 * BLOCK - 100)


@pytest.mark.parametrize("cut", [12345, BLOCK - 1, BLOCK, BLOCK + 12345, 2 * BLOCK + 1])
def test_truncate_to_mid_block_then_extend_by_writing(mnt: Path, cut: int) -> None:
    original = rand_bytes(3 * BLOCK, "mid")
    path = make_file(mnt / "f", original)
    os.truncate(path, cut)
    assert os.stat(path).st_size == cut
    fd = os.open(path, os.O_RDWR)
    try:
        write_all(fd, b"END", offset=3 * BLOCK)
        assert os.pread(fd, 64, cut - 32) == original[cut - 32 : cut] + bytes(32)
    finally:
        os.close(fd)
    assert read_file(path) == original[:cut] + bytes(3 * BLOCK - cut) + b"END"


def test_ftruncate_on_fd_while_writing(mnt: Path) -> None:
    path = mnt / "f"
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


def test_truncate_by_path_is_seen_by_open_fd(mnt: Path) -> None:
    path = make_file(mnt / "f", rand_bytes(BLOCK + 10, "seen"))
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


def test_write_visible_through_second_fd_opened_before_close(mnt: Path) -> None:
    path = mnt / "f"
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


def test_write_visible_through_fd_opened_before_the_write(mnt: Path) -> None:
    path = make_file(mnt / "f", b"old contents")
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


def test_fsync_and_fdatasync_on_file_and_directory(mnt: Path) -> None:
    d = make_dir(mnt / "d")
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


def test_shared_mmap_write_is_visible_to_read(mnt: Path) -> None:
    path = make_file(mnt / "f", rand_bytes(2 * BLOCK + 10, "mmap"))
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


def test_fcntl_record_lock_conflicts_between_processes(mnt: Path) -> None:
    path = make_file(mnt / "lock", b"x")
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


def test_flock_conflicts_between_processes(mnt: Path) -> None:
    path = make_file(mnt / "lock", b"x")
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


# --------------------------------------------------------------------------------------------
# rename
# --------------------------------------------------------------------------------------------


def test_rename_over_existing_file_replaces_it_and_frees_old_inode(mnt: Path) -> None:
    src = make_file(mnt / "src", b"source")
    dst = make_file(mnt / "dst", b"target")
    src_ino = os.stat(src).st_ino
    held = os.open(dst, os.O_RDONLY)
    try:
        os.rename(src, dst)
        assert not src.exists()
        assert os.stat(dst).st_ino == src_ino
        assert read_file(dst) == b"source"
        # The replaced inode has no name left; it lives on only through the open fd.
        assert os.fstat(held).st_nlink == 0
        assert os.pread(held, 100, 0) == b"target"
    finally:
        os.close(held)
    listing = os.listdir(mnt)
    assert listing.count("dst") == 1
    assert "src" not in listing


def test_rename_over_file_with_another_link_decrements_its_count(mnt: Path) -> None:
    src = make_file(mnt / "src", b"source")
    dst = make_file(mnt / "dst", b"target")
    os.link(dst, mnt / "other")
    os.rename(src, dst)
    other = os.stat(mnt / "other")
    assert other.st_nlink == 1
    assert read_file(mnt / "other") == b"target"
    assert read_file(dst) == b"source"


def test_rename_dir_over_empty_dir_replaces_it(mnt: Path) -> None:
    parent = make_dir(mnt / "p")
    src = make_dir(parent / "src")
    make_file(src / "inside", b"payload")
    dst = make_dir(parent / "dst")
    assert os.stat(parent).st_nlink == 4
    held = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(src, dst)
        assert os.fstat(held).st_nlink == 0
    finally:
        os.close(held)
    assert sorted(os.listdir(parent)) == ["dst"]
    assert read_file(dst / "inside") == b"payload"
    assert os.stat(parent).st_nlink == 3


def test_rename_dir_over_non_empty_dir_fails_with_enotempty(mnt: Path) -> None:
    src = make_dir(mnt / "src")
    dst = make_dir(mnt / "dst")
    make_file(dst / "occupant", b"stay")
    assert_errno(lambda: os.rename(src, dst), errno.ENOTEMPTY, errno.EEXIST)
    assert src.is_dir()
    assert read_file(dst / "occupant") == b"stay"


def test_rename_file_over_dir_fails_with_eisdir(mnt: Path) -> None:
    src = make_file(mnt / "f", b"file")
    dst = make_dir(mnt / "d")
    assert_errno(lambda: os.rename(src, dst), errno.EISDIR)
    assert read_file(src) == b"file"
    assert dst.is_dir()


def test_rename_dir_over_file_fails_with_enotdir(mnt: Path) -> None:
    src = make_dir(mnt / "d")
    dst = make_file(mnt / "f", b"file")
    assert_errno(lambda: os.rename(src, dst), errno.ENOTDIR)
    assert src.is_dir()
    assert read_file(dst) == b"file"


def test_rename_dir_across_directories_updates_dotdot_and_link_counts(mnt: Path) -> None:
    a = make_dir(mnt / "a")
    b = make_dir(mnt / "b")
    moved = make_dir(a / "moved")
    make_dir(moved / "child")
    make_file(moved / "file", b"content")
    ino = os.stat(moved).st_ino
    os.rename(moved, b / "moved")
    assert not moved.exists()
    assert os.stat(b / "moved").st_ino == ino
    assert os.stat(b / "moved" / "..").st_ino == os.stat(b).st_ino
    assert os.stat(b / "moved" / "child" / ".." / "..").st_ino == os.stat(b).st_ino
    assert read_file(b / "moved" / "file") == b"content"
    assert os.stat(a).st_nlink == 2
    assert os.stat(b).st_nlink == 3


def test_rename_dir_into_its_own_subdirectory_fails_with_einval(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    make_dir(d / "sub")
    assert_errno(lambda: os.rename(d, d / "sub" / "inside"), errno.EINVAL)
    assert_errno(lambda: os.rename(d, d / "inside"), errno.EINVAL)
    assert (d / "sub").is_dir()
    assert sorted(os.listdir(d)) == ["sub"]


def test_rename_missing_source_fails_with_enoent(mnt: Path) -> None:
    assert_errno(lambda: os.rename(mnt / "missing", mnt / "new"), errno.ENOENT)
    assert not (mnt / "new").exists()


def test_rename_noreplace_onto_existing_fails_with_eexist(mnt: Path) -> None:
    src = make_file(mnt / "src", b"source")
    dst = make_file(mnt / "dst", b"target")
    assert_errno(lambda: renameat2(src, dst, RENAME_NOREPLACE), errno.EEXIST)
    assert read_file(src) == b"source"
    assert read_file(dst) == b"target"
    d = make_dir(mnt / "emptydir")
    assert_errno(lambda: renameat2(src, d, RENAME_NOREPLACE), errno.EEXIST)


def test_rename_noreplace_onto_missing_name_succeeds(mnt: Path) -> None:
    src = make_file(mnt / "src", b"source")
    ino = os.stat(src).st_ino
    renameat2(src, mnt / "dst", RENAME_NOREPLACE)
    assert not src.exists()
    assert os.stat(mnt / "dst").st_ino == ino
    assert read_file(mnt / "dst") == b"source"


def test_rename_exchange_swaps_two_files(mnt: Path) -> None:
    a = make_file(mnt / "a", b"AAAA", 0o600)
    b = make_file(mnt / "b", b"BB", 0o644)
    ino_a, ino_b = os.stat(a).st_ino, os.stat(b).st_ino
    renameat2(a, b, RENAME_EXCHANGE)
    assert read_file(a) == b"BB"
    assert read_file(b) == b"AAAA"
    assert os.stat(a).st_ino == ino_b
    assert os.stat(b).st_ino == ino_a
    assert stat.S_IMODE(os.stat(b).st_mode) == 0o600


def test_rename_exchange_swaps_file_and_directory_across_parents(mnt: Path) -> None:
    p1 = make_dir(mnt / "p1")
    p2 = make_dir(mnt / "p2")
    f = make_file(p1 / "x", b"file data")
    d = make_dir(p2 / "y")
    make_file(d / "inner", b"inner data")
    assert (os.stat(p1).st_nlink, os.stat(p2).st_nlink) == (2, 3)
    renameat2(f, d, RENAME_EXCHANGE)
    assert stat.S_ISDIR(os.lstat(p1 / "x").st_mode)
    assert stat.S_ISREG(os.lstat(p2 / "y").st_mode)
    assert read_file(p1 / "x" / "inner") == b"inner data"
    assert read_file(p2 / "y") == b"file data"
    assert os.stat(p1 / "x" / "..").st_ino == os.stat(p1).st_ino
    assert (os.stat(p1).st_nlink, os.stat(p2).st_nlink) == (3, 2)


def test_rename_exchange_with_missing_target_fails_with_enoent(mnt: Path) -> None:
    a = make_file(mnt / "a", b"A")
    assert_errno(lambda: renameat2(a, mnt / "missing", RENAME_EXCHANGE), errno.ENOENT)
    assert read_file(a) == b"A"
    assert not (mnt / "missing").exists()


def test_rename_to_itself_is_a_no_op(mnt: Path) -> None:
    f = make_file(mnt / "f", b"same")
    d = make_dir(mnt / "d")
    before_f, before_d = os.stat(f), os.stat(d)
    os.rename(f, f)
    os.rename(d, d)
    assert read_file(f) == b"same"
    assert os.stat(f).st_ino == before_f.st_ino
    assert os.stat(f).st_nlink == 1
    assert os.stat(d).st_ino == before_d.st_ino
    assert sorted(os.listdir(mnt / ".")).count("f") == 1


def test_rename_between_hard_links_of_one_inode_is_a_no_op(mnt: Path) -> None:
    a = make_file(mnt / "a", b"data")
    os.link(a, mnt / "b")
    os.rename(a, mnt / "b")
    assert a.exists()
    assert (mnt / "b").exists()
    assert os.stat(a).st_nlink == 2
    assert os.stat(a).st_ino == os.stat(mnt / "b").st_ino


def test_rename_of_symlink_moves_the_link_not_its_target(mnt: Path) -> None:
    target = make_file(mnt / "target", b"t")
    os.symlink("target", mnt / "link")
    os.rename(mnt / "link", mnt / "renamed")
    assert os.readlink(mnt / "renamed") == "target"
    assert not os.path.lexists(mnt / "link")
    assert read_file(target) == b"t"
    assert read_file(mnt / "renamed") == b"t"


# --------------------------------------------------------------------------------------------
# unlink, rmdir, mkdir
# --------------------------------------------------------------------------------------------


def test_unlinked_open_file_stays_usable_until_close(mnt: Path) -> None:
    path = make_file(mnt / "f", rand_bytes(BLOCK + 3, "orphan"))
    fd = os.open(path, os.O_RDWR)
    other = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        assert_errno(lambda: os.stat(path), errno.ENOENT)
        assert "f" not in os.listdir(mnt / ".")
        assert os.fstat(fd).st_nlink == 0
        assert pread_exact(fd, BLOCK + 10, 0) == rand_bytes(BLOCK + 3, "orphan")
        write_all(fd, b"still writable", offset=2 * BLOCK)
        assert os.fstat(other).st_size == 2 * BLOCK + 14
        assert os.pread(other, 100, 2 * BLOCK) == b"still writable"
        # A new file under the old name is a different, independent inode.
        make_file(path, b"newcomer")
        assert os.stat(path).st_ino != os.fstat(fd).st_ino
        assert os.pread(fd, 100, 2 * BLOCK) == b"still writable"
    finally:
        os.close(fd)
        os.close(other)
    assert read_file(path) == b"newcomer"


def test_removed_open_directory_rejects_new_entries(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(d)
        assert os.fstat(dfd).st_nlink == 0
        assert_errno(
            lambda: os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd), errno.ENOENT
        )
        assert_errno(lambda: os.mkdir("sub", dir_fd=dfd), errno.ENOENT)
    finally:
        os.close(dfd)
    assert not d.exists()


def test_mkdir_existing_name_fails_with_eexist(mnt: Path) -> None:
    make_dir(mnt / "d")
    make_file(mnt / "f")
    assert_errno(lambda: os.mkdir(mnt / "d"), errno.EEXIST)
    assert_errno(lambda: os.mkdir(mnt / "f"), errno.EEXIST)
    assert stat.S_ISREG(os.stat(mnt / "f").st_mode)


def test_rmdir_non_empty_fails_with_enotempty(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    make_file(d / "f")
    assert_errno(lambda: os.rmdir(d), errno.ENOTEMPTY, errno.EEXIST)
    os.unlink(d / "f")
    os.rmdir(d)
    assert not d.exists()


def test_rmdir_on_file_fails_with_enotdir(mnt: Path) -> None:
    f = make_file(mnt / "f")
    assert_errno(lambda: os.rmdir(f), errno.ENOTDIR)
    assert f.is_file()


def test_unlink_on_directory_fails_with_eisdir_or_eperm(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    assert_errno(lambda: os.unlink(d), errno.EISDIR, errno.EPERM)
    assert d.is_dir()


def test_unlink_and_rmdir_missing_names_fail_with_enoent(mnt: Path) -> None:
    assert_errno(lambda: os.unlink(mnt / "missing"), errno.ENOENT)
    assert_errno(lambda: os.rmdir(mnt / "missing"), errno.ENOENT)


def test_directory_link_count_is_two_plus_subdirectories(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    assert os.stat(d).st_nlink == 2
    for name in ("s1", "s2", "s3"):
        make_dir(d / name)
    make_file(d / "file1")
    os.symlink("s1", d / "link")
    assert os.stat(d).st_nlink == 5
    os.rmdir(d / "s3")
    assert os.stat(d).st_nlink == 4
    elsewhere = make_dir(mnt / "elsewhere")
    os.rename(d / "s2", elsewhere / "s2")
    assert os.stat(d).st_nlink == 3
    assert os.stat(elsewhere).st_nlink == 3
    assert os.stat(d / "s1").st_nlink == 2


def test_dot_and_dotdot_resolve(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    sub = make_dir(d / "sub")
    assert os.stat(d / ".").st_ino == os.stat(d).st_ino
    assert os.stat(sub / "..").st_ino == os.stat(d).st_ino
    assert os.stat(sub / ".." / ".." / "d" / "sub").st_ino == os.stat(sub).st_ino
    assert sorted(os.listdir(d)) == ["sub"]  # no "." or ".." in listings


# --------------------------------------------------------------------------------------------
# hard links and symlinks
# --------------------------------------------------------------------------------------------


def test_hard_links_share_inode_count_and_data(mnt: Path) -> None:
    other_dir = make_dir(mnt / "other")
    a = make_file(mnt / "a", b"first")
    os.link(a, mnt / "b")
    os.link(a, other_dir / "c")
    sa, sb, sc = os.stat(a), os.stat(mnt / "b"), os.stat(other_dir / "c")
    assert sa.st_ino == sb.st_ino == sc.st_ino
    assert sa.st_nlink == sb.st_nlink == sc.st_nlink == 3
    fd = os.open(mnt / "b", os.O_WRONLY | os.O_APPEND)
    try:
        write_all(fd, b"+second")
    finally:
        os.close(fd)
    assert read_file(other_dir / "c") == b"first+second"
    os.chmod(other_dir / "c", 0o600)
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
    os.unlink(a)
    assert os.stat(mnt / "b").st_nlink == 2
    os.unlink(mnt / "b")
    assert os.stat(other_dir / "c").st_nlink == 1
    assert read_file(other_dir / "c") == b"first+second"


def test_hard_link_to_directory_fails_with_eperm(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    assert_errno(lambda: os.link(d, mnt / "dlink"), errno.EPERM)
    assert not os.path.lexists(mnt / "dlink")
    assert os.stat(d).st_nlink == 2


def test_hard_link_onto_existing_name_fails_with_eexist(mnt: Path) -> None:
    a = make_file(mnt / "a", b"a")
    b = make_file(mnt / "b", b"b")
    assert_errno(lambda: os.link(a, b), errno.EEXIST)
    assert read_file(b) == b"b"
    assert os.stat(a).st_nlink == 1


def test_symlink_readlink_lstat_and_following(mnt: Path) -> None:
    make_dir(mnt / "dir")
    target = make_file(mnt / "dir" / "target", b"through the link")
    os.symlink("dir/target", mnt / "rel")
    os.symlink(str(target), mnt / "abs")
    os.symlink("dir", mnt / "dirlink")
    for link, text in ((mnt / "rel", "dir/target"), (mnt / "abs", str(target))):
        assert os.readlink(link) == text
        lst = os.lstat(link)
        assert stat.S_ISLNK(lst.st_mode)
        assert lst.st_size == len(os.fsencode(text))
        assert os.stat(link).st_ino == os.stat(target).st_ino
        assert read_file(link) == b"through the link"
    assert os.listdir(mnt / "dirlink") == ["target"]
    assert read_file(mnt / "dirlink" / "target") == b"through the link"


def test_dangling_symlink(mnt: Path) -> None:
    link = mnt / "dangling"
    os.symlink("not-yet", link)
    assert stat.S_ISLNK(os.lstat(link).st_mode)
    assert os.readlink(link) == "not-yet"
    assert_errno(lambda: os.stat(link), errno.ENOENT)
    assert_errno(lambda: os.open(link, os.O_RDONLY), errno.ENOENT)
    # O_CREAT without O_EXCL follows the link and creates its target.
    fd = os.open(link, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        write_all(fd, b"created via link")
    finally:
        os.close(fd)
    assert read_file(mnt / "not-yet") == b"created via link"
    assert stat.S_ISLNK(os.lstat(link).st_mode)


def test_symlink_with_4000_byte_target(mnt: Path) -> None:
    target = "/".join(["d" * 99] * 40)  # 40*99 + 39 slashes = 3999 bytes
    target += "x"
    assert len(target) == 4000
    os.symlink(target, mnt / "long")
    assert os.readlink(mnt / "long") == target
    assert os.lstat(mnt / "long").st_size == 4000


def test_o_nofollow_on_symlink_fails_with_eloop(mnt: Path) -> None:
    make_file(mnt / "target", b"x")
    os.symlink("target", mnt / "link")
    assert_errno(lambda: os.open(mnt / "link", os.O_RDONLY | os.O_NOFOLLOW), errno.ELOOP)


def test_symlink_onto_existing_name_fails_with_eexist(mnt: Path) -> None:
    make_file(mnt / "f", b"x")
    assert_errno(lambda: os.symlink("anything", mnt / "f"), errno.EEXIST)
    assert stat.S_ISREG(os.lstat(mnt / "f").st_mode)


# --------------------------------------------------------------------------------------------
# mknod
# --------------------------------------------------------------------------------------------


def test_mknod_regular_file(mnt: Path) -> None:
    path = mnt / "reg"
    os.mknod(path, stat.S_IFREG | 0o640)
    os.chmod(path, 0o640)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 0
    fd = os.open(path, os.O_RDWR)
    try:
        write_all(fd, b"usable")
    finally:
        os.close(fd)
    assert read_file(path) == b"usable"


def test_mkfifo_and_mknod_fifo_create_working_fifos(mnt: Path) -> None:
    os.mkfifo(mnt / "fifo1", 0o600)
    os.mknod(mnt / "fifo2", stat.S_IFIFO | 0o600)
    for name in ("fifo1", "fifo2"):
        assert stat.S_ISFIFO(os.lstat(mnt / name).st_mode)
    reader = os.open(mnt / "fifo1", os.O_RDONLY | os.O_NONBLOCK)
    try:
        writer = os.open(mnt / "fifo1", os.O_WRONLY)
        try:
            assert os.write(writer, b"through the pipe") == 16
            assert os.read(reader, 100) == b"through the pipe"
        finally:
            os.close(writer)
    finally:
        os.close(reader)


def test_mknod_socket_node(mnt: Path) -> None:
    os.mknod(mnt / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.lstat(mnt / "sock").st_mode)


@pytest.mark.parametrize(
    ("kind", "major", "minor"), [(stat.S_IFCHR, 1, 3), (stat.S_IFBLK, 7, 200)], ids=["chr", "blk"]
)
def test_mknod_device_as_root_works_or_fails_with_eperm(
    mnt: Path, kind: int, major: int, minor: int
) -> None:
    path = mnt / "dev"
    try:
        os.mknod(path, kind | 0o600, os.makedev(major, minor))
    except OSError as exc:
        assert exc.errno == errno.EPERM, exc
        assert not os.path.lexists(path)
        return
    st = os.lstat(path)
    assert stat.S_IFMT(st.st_mode) == kind
    assert st.st_rdev == os.makedev(major, minor)


# --------------------------------------------------------------------------------------------
# chmod, chown, utimes
# --------------------------------------------------------------------------------------------


def test_chmod_sets_exact_permission_bits(mnt: Path) -> None:
    f = make_file(mnt / "f")
    d = make_dir(mnt / "d")
    for mode in (0o644, 0o600, 0o000, 0o777, 0o4755, 0o2750, 0o1644, 0o7777, 0o400):
        os.chmod(f, mode)
        assert stat.S_IMODE(os.stat(f).st_mode) == mode
        assert stat.S_ISREG(os.stat(f).st_mode)
    for mode in (0o700, 0o1777, 0o2775, 0o555):
        os.chmod(d, mode)
        assert stat.S_IMODE(os.stat(d).st_mode) == mode
        assert stat.S_ISDIR(os.stat(d).st_mode)


def test_chown_as_root(mnt: Path) -> None:
    f = make_file(mnt / "f")
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(f, -1, 999)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 999)
    d = make_dir(mnt / "d")
    os.chown(d, 4321, 8765)
    assert (os.stat(d).st_uid, os.stat(d).st_gid) == (4321, 8765)


def test_lchown_changes_symlink_not_target(mnt: Path) -> None:
    f = make_file(mnt / "f")
    os.symlink("f", mnt / "link")
    os.chown(mnt / "link", 1234, 5678, follow_symlinks=False)
    assert (os.lstat(mnt / "link").st_uid, os.lstat(mnt / "link").st_gid) == (1234, 5678)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (0, 0)


def test_chown_clears_setuid_and_setgid(mnt: Path) -> None:
    """Linux clears S_ISUID (and S_ISGID with group-exec) on chown of a file, even by root."""
    f = make_file(mnt / "f", b"#!", 0o6755)
    os.chown(f, 1234, 5678)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755


def test_setgid_directory_passes_group_and_bit_to_new_entries(mnt: Path) -> None:
    """Linux (BSD) semantics, which POSIX permits and shared PACS directories rely on."""
    d = make_dir(mnt / "shared")
    os.chown(d, 0, 4321)
    os.chmod(d, 0o2775)
    f = make_file(d / "f")
    sub = d / "sub"
    os.mkdir(sub, 0o755)
    assert os.stat(f).st_gid == 4321
    assert os.stat(sub).st_gid == 4321
    assert os.stat(sub).st_mode & stat.S_ISGID


def test_umask_is_applied_on_create_mkdir_and_mkfifo(mnt: Path) -> None:
    old = os.umask(0o027)
    try:
        os.close(os.open(mnt / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.mkdir(mnt / "d", 0o777)
        os.mkfifo(mnt / "p", 0o666)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(mnt / "f").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(mnt / "d").st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(mnt / "p").st_mode) == 0o640


def test_utime_sets_explicit_nanosecond_times(mnt: Path) -> None:
    f = make_file(mnt / "f")
    atime = 1_234_567_890 * SEC + 123_456_789
    mtime = 4_102_444_800 * SEC + 987_654_321  # 2100-01-01: beyond 2038
    os.utime(f, ns=(atime, mtime))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    d = make_dir(mnt / "d")
    os.utime(d, ns=(OLD_NS, OLD_NS + 1))
    assert (os.stat(d).st_atime_ns, os.stat(d).st_mtime_ns) == (OLD_NS, OLD_NS + 1)


def test_utime_omit_leaves_that_timestamp_alone(mnt: Path) -> None:
    f = make_file(mnt / "f")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    new = OLD_NS + 86_400 * SEC + 5
    utimensat(f, OMIT, ts(new))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (OLD_NS, new)
    utimensat(f, ts(new + 1), OMIT)
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (new + 1, new)


def test_utime_now_sets_times_close_to_now(mnt: Path) -> None:
    f = make_file(mnt / "f")
    age(f)
    start = time.time_ns()
    utimensat(f, NOW, NOW)
    st = os.stat(f)
    assert_recent(st.st_atime_ns, start)
    assert_recent(st.st_mtime_ns, start)
    age(f)
    os.utime(f)  # times=NULL means "now" for both
    assert_recent(os.stat(f).st_mtime_ns, start)
    age(f)
    utimensat(f, OMIT, NOW)
    assert os.stat(f).st_atime_ns == OLD_NS
    assert_recent(os.stat(f).st_mtime_ns, start)


def test_utime_on_symlink_without_following(mnt: Path) -> None:
    f = make_file(mnt / "f")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    os.symlink("f", mnt / "link")
    os.utime(mnt / "link", ns=(OLD_NS + 5, OLD_NS + 7), follow_symlinks=False)
    assert os.lstat(mnt / "link").st_mtime_ns == OLD_NS + 7
    assert os.stat(f).st_mtime_ns == OLD_NS


def test_new_file_times_are_now(mnt: Path) -> None:
    start = time.time_ns()
    f = make_file(mnt / "f", b"x")
    st = os.stat(f)
    for ns in (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns):
        assert_recent(ns, start)


# --------------------------------------------------------------------------------------------
# ctime / mtime bookkeeping
# --------------------------------------------------------------------------------------------


def test_write_updates_mtime_and_ctime(mnt: Path) -> None:
    f = make_file(mnt / "f", b"before")
    age(f)
    before = os.stat(f)
    tick()
    start = time.time_ns()
    fd = os.open(f, os.O_WRONLY)
    try:
        write_all(fd, b"after", offset=BLOCK)
    finally:
        os.close(fd)
    after = os.stat(f)
    assert_recent(after.st_mtime_ns, start)
    assert after.st_ctime_ns > before.st_ctime_ns


def test_chmod_updates_ctime_not_mtime(mnt: Path) -> None:
    f = make_file(mnt / "f")
    age(f)
    before = os.stat(f)
    tick()
    os.chmod(f, 0o600)
    after = os.stat(f)
    assert after.st_mtime_ns == OLD_NS
    assert after.st_ctime_ns > before.st_ctime_ns


def test_chown_updates_ctime_not_mtime(mnt: Path) -> None:
    f = make_file(mnt / "f")
    age(f)
    before = os.stat(f)
    tick()
    os.chown(f, 1234, 5678)
    after = os.stat(f)
    assert after.st_mtime_ns == OLD_NS
    assert after.st_ctime_ns > before.st_ctime_ns


def test_rename_updates_ctime_of_moved_file(mnt: Path) -> None:
    f = make_file(mnt / "f")
    age(f)
    before = os.stat(f)
    tick()
    os.rename(f, mnt / "g")
    after = os.stat(mnt / "g")
    assert after.st_ctime_ns > before.st_ctime_ns
    assert after.st_mtime_ns == OLD_NS


@pytest.mark.parametrize("same_dir", [False, True], ids=["across", "within"])
def test_rename_updates_mtime_and_ctime_of_parent_dirs(mnt: Path, same_dir: bool) -> None:
    a = make_dir(mnt / "a")
    b = a if same_dir else make_dir(mnt / "b")
    make_file(a / "f")
    age(a)
    age(b)
    before_a, before_b = os.stat(a), os.stat(b)
    tick()
    start = time.time_ns()
    os.rename(a / "f", b / "g")
    for before, d in ((before_a, a), (before_b, b)):
        after = os.stat(d)
        assert_recent(after.st_mtime_ns, start)
        assert after.st_ctime_ns > before.st_ctime_ns


def _create_entry(kind: str, d: Path) -> None:
    if kind == "file":
        os.close(os.open(d / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elif kind == "mkdir":
        os.mkdir(d / "new")
    elif kind == "symlink":
        os.symlink("target", d / "new")
    elif kind == "mkfifo":
        os.mkfifo(d / "new")
    elif kind == "link":
        os.link(d / "existing", d / "new")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["file", "mkdir", "symlink", "mkfifo", "link"])
def test_creating_an_entry_updates_parent_mtime_and_ctime(mnt: Path, kind: str) -> None:
    d = make_dir(mnt / "d")
    make_file(d / "existing")
    age(d)
    before = os.stat(d)
    tick()
    start = time.time_ns()
    _create_entry(kind, d)
    after = os.stat(d)
    assert os.path.lexists(d / "new")
    assert_recent(after.st_mtime_ns, start)
    assert after.st_ctime_ns > before.st_ctime_ns


@pytest.mark.parametrize("kind", ["unlink", "rmdir"])
def test_removing_an_entry_updates_parent_mtime_and_ctime(mnt: Path, kind: str) -> None:
    d = make_dir(mnt / "d")
    if kind == "unlink":
        make_file(d / "victim")
    else:
        make_dir(d / "victim")
    age(d)
    before = os.stat(d)
    tick()
    start = time.time_ns()
    if kind == "unlink":
        os.unlink(d / "victim")
    else:
        os.rmdir(d / "victim")
    after = os.stat(d)
    assert not os.path.lexists(d / "victim")
    assert_recent(after.st_mtime_ns, start)
    assert after.st_ctime_ns > before.st_ctime_ns


def test_link_and_unlink_update_ctime_of_the_inode(mnt: Path) -> None:
    f = make_file(mnt / "f", b"x")
    age(f)
    before = os.stat(f)
    tick()
    os.link(f, mnt / "g")
    linked = os.stat(f)
    assert linked.st_ctime_ns > before.st_ctime_ns
    assert linked.st_mtime_ns == OLD_NS
    tick()
    os.unlink(mnt / "g")
    unlinked = os.stat(f)
    assert unlinked.st_ctime_ns > linked.st_ctime_ns
    assert unlinked.st_mtime_ns == OLD_NS


def test_reading_does_not_change_mtime_or_ctime(mnt: Path) -> None:
    f = make_file(mnt / "f", rand_bytes(BLOCK + 5, "read"))
    age(f)
    before = os.stat(f)
    tick()
    assert len(read_file(f)) == BLOCK + 5
    after = os.stat(f)
    assert after.st_mtime_ns == OLD_NS
    assert after.st_ctime_ns == before.st_ctime_ns


@pytest.mark.parametrize("how", ["truncate", "ftruncate", "o_trunc"])
def test_truncation_updates_mtime_and_ctime(mnt: Path, how: str) -> None:
    f = make_file(mnt / "f", b"some content")
    age(f)
    before = os.stat(f)
    tick()
    start = time.time_ns()
    if how == "truncate":
        os.truncate(f, 3)
    elif how == "ftruncate":
        fd = os.open(f, os.O_WRONLY)
        os.ftruncate(fd, 3)
        os.close(fd)
    else:
        os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
    after = os.stat(f)
    assert after.st_size == (0 if how == "o_trunc" else 3)
    assert_recent(after.st_mtime_ns, start)
    assert after.st_ctime_ns > before.st_ctime_ns


def test_setxattr_updates_ctime_not_mtime(mnt: Path) -> None:
    """Linux updates ctime on xattr changes; incremental backups rely on it."""
    f = make_file(mnt / "f")
    age(f)
    before = os.stat(f)
    tick()
    os.setxattr(f, "user.note", b"value")
    after = os.stat(f)
    assert after.st_ctime_ns > before.st_ctime_ns
    assert after.st_mtime_ns == OLD_NS


# --------------------------------------------------------------------------------------------
# permissions as another user (default_permissions)
# --------------------------------------------------------------------------------------------

OPEN_WRITE = "os.close(os.open(sys.argv[1], os.O_WRONLY))"
OPEN_READ = "os.close(os.open(sys.argv[1], os.O_RDONLY))"
CREATE = "os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))"


def test_setuid_and_setgid_cleared_when_non_owner_writes(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    f = make_file(d / "f", b"original", 0o6777)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o6777
    body = """
    fd = os.open(sys.argv[1], os.O_WRONLY)
    os.write(fd, b"changed!")
    os.close(fd)
    """
    assert as_nobody(body, f) == "OK"
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o777
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert read_file(f) == b"changed!"


def test_other_user_cannot_write_root_0644_file_but_can_read_it(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    f = make_file(d / "f", b"root data", 0o644)
    assert as_nobody(OPEN_WRITE, f) == "EACCES"
    assert as_nobody("os.truncate(sys.argv[1], 0)", f) == "EACCES"
    assert as_nobody("assert open(sys.argv[1], 'rb').read() == b'root data'", f) == "OK"
    assert read_file(f) == b"root data"


def test_other_user_cannot_read_root_0600_file(mnt: Path) -> None:
    f = make_file(mnt / "f", b"secret", 0o600)
    assert as_nobody(OPEN_READ, f) == "EACCES"


def test_other_user_cannot_create_or_delete_in_root_0755_dir(mnt: Path) -> None:
    d = make_dir(mnt / "d", 0o755)
    victim = make_file(d / "victim", b"x", 0o666)
    assert as_nobody(CREATE, d / "new") == "EACCES"
    assert as_nobody("os.mkdir(sys.argv[1])", d / "newdir") == "EACCES"
    assert as_nobody("os.unlink(sys.argv[1])", victim) == "EACCES"
    assert as_nobody("os.rename(sys.argv[1], sys.argv[2])", victim, d / "moved") == "EACCES"
    assert sorted(os.listdir(d)) == ["victim"]


def test_other_user_can_create_in_0777_dir_and_owns_the_file(mnt: Path) -> None:
    d = make_dir(mnt / "d", 0o777)
    assert as_nobody(CREATE, d / "mine") == "OK"
    assert as_nobody("os.mkdir(sys.argv[1])", d / "mydir") == "OK"
    for name in ("mine", "mydir"):
        st = os.stat(d / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


def test_other_user_cannot_search_0700_dir(mnt: Path) -> None:
    d = make_dir(mnt / "private", 0o700)
    make_file(d / "f", b"x", 0o644)
    assert as_nobody("os.stat(sys.argv[1])", d / "f") == "EACCES"
    assert as_nobody("os.listdir(sys.argv[1])", d) == "EACCES"
    os.chmod(d, 0o711)  # search without read: known names work, listing does not
    assert as_nobody("os.stat(sys.argv[1])", d / "f") == "OK"
    assert as_nobody("os.listdir(sys.argv[1])", d) == "EACCES"


def test_group_class_bits_apply_to_group_members(mnt: Path) -> None:
    """A member of the file's group gets the group bits, even when "other" would allow more."""
    grant = make_file(mnt / "grant", b"g", 0o460)
    deny = make_file(mnt / "deny", b"d", 0o604)
    for f in (grant, deny):
        os.chown(f, 0, NOBODY)
        os.chmod(f, 0o460 if f is grant else 0o604)
    assert as_nobody(OPEN_WRITE, grant) == "OK"
    assert as_nobody(OPEN_READ, deny) == "EACCES"


def test_sticky_dir_stops_other_users_deleting_roots_file(mnt: Path) -> None:
    d = make_dir(mnt / "tmp", 0o1777)
    victim = make_file(d / "roots", b"keep", 0o666)
    assert as_nobody("os.unlink(sys.argv[1])", victim) in ("EPERM", "EACCES")
    assert as_nobody("os.rename(sys.argv[1], sys.argv[2])", victim, d / "x") in ("EPERM", "EACCES")
    own = """
    path = sys.argv[1]
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    os.unlink(path)
    """
    assert as_nobody(own, d / "mine") == "OK"
    assert sorted(os.listdir(d)) == ["roots"]
    assert read_file(victim) == b"keep"


def test_other_user_cannot_chmod_or_chown_roots_file(mnt: Path) -> None:
    f = make_file(mnt / "f", b"x", 0o666)
    assert as_nobody("os.chmod(sys.argv[1], 0o777)", f) == "EPERM"
    assert as_nobody("os.chown(sys.argv[1], 65534, 65534)", f) == "EPERM"
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_utime_permissions_for_non_owner(mnt: Path) -> None:
    """Setting times to now needs write access; setting explicit times needs ownership."""
    writable = make_file(mnt / "w", b"x", 0o666)
    readonly = make_file(mnt / "r", b"x", 0o644)
    age(writable)
    start = time.time_ns()
    assert as_nobody("os.utime(sys.argv[1])", writable) == "OK"
    assert_recent(os.stat(writable).st_mtime_ns, start)
    assert as_nobody("os.utime(sys.argv[1], ns=(5, 5))", writable) == "EPERM"
    assert as_nobody("os.utime(sys.argv[1])", readonly) == "EACCES"


def test_other_user_xattr_write_needs_write_permission(mnt: Path) -> None:
    readonly = make_file(mnt / "r", b"x", 0o644)
    writable = make_file(mnt / "w", b"x", 0o666)
    body = "os.setxattr(sys.argv[1], 'user.who', b'nobody')"
    assert as_nobody(body, readonly) == "EACCES"
    assert as_nobody(body, writable) == "OK"
    assert os.getxattr(writable, "user.who") == b"nobody"
    assert "user.who" not in os.listxattr(readonly)


# --------------------------------------------------------------------------------------------
# extended attributes
# --------------------------------------------------------------------------------------------


def user_xattrs(path: Path) -> dict[str, bytes]:
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
        if name.startswith("user.")
    }


def test_user_xattr_set_get_list_remove(mnt: Path) -> None:
    f = make_file(mnt / "f")
    os.setxattr(f, "user.a", b"alpha")
    os.setxattr(f, "user.b", b"\x00binary\xff\x00")
    os.setxattr(f, "user.empty", b"")
    assert user_xattrs(f) == {
        "user.a": b"alpha",
        "user.b": b"\x00binary\xff\x00",
        "user.empty": b"",
    }
    os.setxattr(f, "user.a", b"replaced, longer than before")
    assert os.getxattr(f, "user.a") == b"replaced, longer than before"
    os.removexattr(f, "user.a")
    assert user_xattrs(f) == {"user.b": b"\x00binary\xff\x00", "user.empty": b""}


def test_many_xattrs_are_all_listed(mnt: Path) -> None:
    f = make_file(mnt / "f")
    expected = {f"user.attr-{i:03d}": f"value {i}".encode() for i in range(100)}
    for name, value in expected.items():
        os.setxattr(f, name, value)
    assert user_xattrs(f) == expected


def test_missing_xattr_fails_with_enodata(mnt: Path) -> None:
    f = make_file(mnt / "f")
    assert_errno(lambda: os.getxattr(f, "user.missing"), errno.ENODATA)
    assert_errno(lambda: os.removexattr(f, "user.missing"), errno.ENODATA)


def test_xattr_create_flag_on_existing_fails_with_eexist(mnt: Path) -> None:
    f = make_file(mnt / "f")
    os.setxattr(f, "user.x", b"first", os.XATTR_CREATE)
    assert_errno(lambda: os.setxattr(f, "user.x", b"second", os.XATTR_CREATE), errno.EEXIST)
    assert os.getxattr(f, "user.x") == b"first"


def test_xattr_replace_flag_on_missing_fails_with_enodata(mnt: Path) -> None:
    f = make_file(mnt / "f")
    assert_errno(lambda: os.setxattr(f, "user.x", b"v", os.XATTR_REPLACE), errno.ENODATA)
    assert "user.x" not in os.listxattr(f)
    os.setxattr(f, "user.x", b"v")
    os.setxattr(f, "user.x", b"w", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.x") == b"w"


def test_xattr_value_of_64_kib(mnt: Path) -> None:
    """The Linux VFS maximum value size (XATTR_SIZE_MAX). ext4 only passes with `ea_inode`."""
    f = make_file(mnt / "f")
    value = rand_bytes(XATTR_SIZE_MAX, "xattr")
    os.setxattr(f, "user.big", value)
    assert os.getxattr(f, "user.big") == value
    assert "user.big" in os.listxattr(f)


def test_xattrs_survive_rename_and_are_shared_by_hard_links(mnt: Path) -> None:
    f = make_file(mnt / "f")
    os.setxattr(f, "user.k", b"v")
    make_dir(mnt / "d")
    os.rename(f, mnt / "d" / "g")
    assert os.getxattr(mnt / "d" / "g", "user.k") == b"v"
    os.link(mnt / "d" / "g", mnt / "h")
    os.setxattr(mnt / "h", "user.k2", b"v2")
    assert user_xattrs(mnt / "d" / "g") == {"user.k": b"v", "user.k2": b"v2"}


def test_xattr_on_directory(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    os.setxattr(d, "user.dir", b"on a directory")
    assert os.getxattr(d, "user.dir") == b"on a directory"
    os.rename(d, mnt / "e")
    assert user_xattrs(mnt / "e") == {"user.dir": b"on a directory"}


def test_user_xattr_on_symlink_is_refused_with_eperm(mnt: Path) -> None:
    os.symlink("target", mnt / "link")
    assert_errno(
        lambda: os.setxattr(mnt / "link", "user.x", b"v", follow_symlinks=False), errno.EPERM
    )


def test_security_xattr_as_root_works_or_is_cleanly_unsupported(mnt: Path) -> None:
    f = make_file(mnt / "f")
    try:
        os.setxattr(f, "security.vnafs-test", b"label")
    except OSError as exc:
        assert exc.errno == errno.EOPNOTSUPP, exc
        assert_errno(lambda: os.getxattr(f, "security.vnafs-test"), errno.ENODATA, errno.EOPNOTSUPP)
        return
    assert os.getxattr(f, "security.vnafs-test") == b"label"


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF


def _acl_blob(entries: list[tuple[int, int, int]]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _acl_entries(blob: bytes) -> set[tuple[int, int, int]]:
    (version,) = struct.unpack_from("<I", blob)
    assert version == 2
    return {struct.unpack_from("<HHI", blob, off) for off in range(4, len(blob), 8)}


def test_posix_acl_works_and_is_enforced_or_is_cleanly_unsupported(mnt: Path) -> None:
    """An accepted ACL must mean something: mode group bits follow the mask, uid 1234 may read."""
    f = make_file(mnt / "f", b"acl", 0o600)
    entries = [
        (ACL_USER_OBJ, 6, ACL_UNDEFINED_ID),
        (ACL_USER, 4, 1234),
        (ACL_GROUP_OBJ, 0, ACL_UNDEFINED_ID),
        (ACL_MASK, 4, ACL_UNDEFINED_ID),
        (ACL_OTHER, 0, ACL_UNDEFINED_ID),
    ]
    try:
        os.setxattr(f, "system.posix_acl_access", _acl_blob(entries))
    except OSError as exc:
        assert exc.errno == errno.EOPNOTSUPP, exc
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        return
    assert _acl_entries(os.getxattr(f, "system.posix_acl_access")) == set(entries)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    assert run_py(OPEN_READ, f, uid=1234, gid=1234) == "OK"
    assert as_nobody(OPEN_READ, f) == "EACCES"


# --------------------------------------------------------------------------------------------
# statfs and name lengths
# --------------------------------------------------------------------------------------------


def test_statvfs_reports_sane_values(mnt: Path) -> None:
    sv = os.statvfs(mnt)
    assert sv.f_bsize > 0
    assert sv.f_frsize > 0
    assert sv.f_blocks > 0
    assert sv.f_blocks >= sv.f_bfree >= sv.f_bavail
    assert sv.f_namemax == 255


NAME_255 = "n" * 255
NAME_255_MULTIBYTE = "é" * 127 + "x"  # 255 bytes in UTF-8
NAME_256 = "L" * 256


def test_255_byte_name_works_everywhere(mnt: Path) -> None:
    assert len(os.fsencode(NAME_255_MULTIBYTE)) == 255
    d = make_dir(mnt / "d")
    for name in (NAME_255, NAME_255_MULTIBYTE):
        path = make_file(d / name, b"long name")
        assert os.stat(path).st_size == 9
        assert os.listdir(d) == [name]
        os.rename(path, d / (name[:-1] + "y"))
        assert os.listdir(d) == [name[:-1] + "y"]
        os.unlink(d / (name[:-1] + "y"))
        assert os.listdir(d) == []
    os.mkdir(d / NAME_255)
    os.symlink(NAME_255, d / ("s" * 255))
    assert os.path.isdir(d / ("s" * 255))
    assert sorted(os.listdir(d)) == sorted([NAME_255, "s" * 255])


def _create_and_close(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


_TOO_LONG_OPS: dict[str, Callable[[Path], object]] = {
    "create": lambda d: _create_and_close(d / NAME_256),
    "create_multibyte": lambda d: _create_and_close(d / ("é" * 128)),
    "mkdir": lambda d: os.mkdir(d / NAME_256),
    "rename_target": lambda d: os.rename(d / "src", d / NAME_256),
    "symlink_name": lambda d: os.symlink("src", d / NAME_256),
    "link_name": lambda d: os.link(d / "src", d / NAME_256),
    "mkfifo": lambda d: os.mkfifo(d / NAME_256),
    "stat": lambda d: os.stat(d / NAME_256),
    "unlink": lambda d: os.unlink(d / NAME_256),
}


@pytest.mark.parametrize("op", sorted(_TOO_LONG_OPS))
def test_256_byte_name_fails_with_enametoolong(mnt: Path, op: str) -> None:
    d = make_dir(mnt / "d")
    make_file(d / "src", b"x")
    assert_errno(lambda: _TOO_LONG_OPS[op](d), errno.ENAMETOOLONG)
    assert os.listdir(d) == ["src"]


# --------------------------------------------------------------------------------------------
# readdir
# --------------------------------------------------------------------------------------------


def _fill(d: Path, count: int, prefix: str = "entry") -> set[str]:
    names = {f"{prefix}-{i:04d}-{'x' * 40}" for i in range(count)}
    for name in names:
        _create_and_close(d / name)
    return names


def test_readdir_of_1000_files_lists_each_exactly_once(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    names = _fill(d, 1000)
    listed = os.listdir(d)
    assert len(listed) == 1000
    assert set(listed) == names
    with os.scandir(d) as it:
        entries = list(it)
    assert sorted(e.name for e in entries) == sorted(names)
    for entry in entries:
        assert entry.is_file(follow_symlinks=False)
        assert entry.inode() == os.lstat(entry.path).st_ino


def test_readdir_of_empty_directory(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    assert os.listdir(d) == []
    with os.scandir(d) as it:
        assert list(it) == []


def test_readdir_reports_entry_types(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    make_file(d / "file")
    make_dir(d / "dir")
    os.symlink("file", d / "link")
    os.mkfifo(d / "fifo")
    with os.scandir(d) as it:
        kinds = {
            e.name: (
                e.is_file(follow_symlinks=False),
                e.is_dir(follow_symlinks=False),
                e.is_symlink(),
            )
            for e in it
        }
    assert kinds == {
        "file": (True, False, False),
        "dir": (False, True, False),
        "link": (False, False, True),
        "fifo": (False, False, False),
    }


ODD_NAMES = [
    "héllo wörld",
    "日本語のファイル名",
    "line\nbreak",
    "tab\there",
    " leading space",
    "trailing space ",
    "emoji 🙂🩻",
    "back\\slash",
    "-dash",
    ".hidden",
    "...",
    "quote'\"",
    "star*question?<>|colon:",
    "CASE",
    "case",
    "nfc \u00e9",
    "nfd e\u0301",
]


def test_readdir_returns_unicode_space_and_newline_names_exactly(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    for i, name in enumerate(ODD_NAMES):
        make_file(d / name, str(i).encode())
    assert sorted(os.listdir(d)) == sorted(ODD_NAMES)
    for i, name in enumerate(ODD_NAMES):
        assert read_file(d / name) == str(i).encode()


def test_names_are_arbitrary_bytes_not_only_utf8(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    raw = [b"latin1-caf\xe9", b"\xff\xfe invalid utf-8", b"ctrl-\x01\x7f"]
    base = os.fsencode(d)
    for name in raw:
        fd = os.open(base + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, name)
        os.close(fd)
    assert sorted(os.listdir(base)) == sorted(raw)
    for name in raw:
        assert read_file(base + b"/" + name) == name


def test_scandir_while_deleting_seen_entries_neither_skips_nor_repeats(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    names = _fill(d, 1000)
    seen: list[str] = []
    with os.scandir(d) as it:
        for k, entry in enumerate(it):
            seen.append(entry.name)
            if k % 2 == 0:
                os.unlink(entry.path)
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    assert set(seen) == names, "surviving entries were skipped"
    assert set(os.listdir(d)) == set(seen[1::2])


def test_scandir_while_deleting_unseen_entries_lists_survivors_once(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    names = _fill(d, 1000)
    rng = random.Random(99)
    deleted: set[str] = set()
    seen: list[str] = []
    with os.scandir(d) as it:
        for entry in it:
            seen.append(entry.name)
            candidates = sorted(names - deleted - set(seen))
            for victim in rng.sample(candidates, min(2, len(candidates))):
                os.unlink(d / victim)
                deleted.add(victim)
    assert len(seen) == len(set(seen))
    survivors = names - deleted
    assert survivors <= set(seen), "surviving entries were skipped"
    assert set(os.listdir(d)) == survivors


def test_scandir_while_creating_lists_existing_entries_once(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    names = _fill(d, 1000)
    created: set[str] = set()
    seen: list[str] = []
    with os.scandir(d) as it:
        for k, entry in enumerate(it):
            seen.append(entry.name)
            # At most 1000 + 2 * 500 names ever exist: more entries means repeats.
            assert k < 2000, "the listing does not end"
            if k % 2 == 0 and k < 1000:
                # Names that sort (and hash) on both sides of the cursor, whatever the order.
                for name in (f"0-new-{k:04d}", f"z-new-{k:04d}"):
                    _create_and_close(d / name)
                    created.add(name)
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    assert names <= set(seen), "existing entries were skipped"
    assert set(seen) - names <= created
    assert set(os.listdir(d)) == names | created


def test_readdir_reflects_rename_and_unlink(mnt: Path) -> None:
    d = make_dir(mnt / "d")
    make_file(d / "a")
    make_file(d / "b")
    os.listdir(d)
    os.rename(d / "a", d / "c")
    os.unlink(d / "b")
    make_dir(d / "e")
    assert sorted(os.listdir(d)) == ["c", "e"]


# --------------------------------------------------------------------------------------------
# inode numbers
# --------------------------------------------------------------------------------------------


def test_inode_number_is_stable_across_rename(mnt: Path) -> None:
    f = make_file(mnt / "f", b"x")
    d = make_dir(mnt / "d")
    ino_f, ino_d = os.stat(f).st_ino, os.stat(d).st_ino
    os.rename(f, d / "g")
    assert os.stat(d / "g").st_ino == ino_f
    os.rename(d, mnt / "e")
    assert os.stat(mnt / "e").st_ino == ino_d
    assert os.stat(mnt / "e" / "g").st_ino == ino_f
    fd = os.open(mnt / "e" / "g", os.O_RDONLY)
    try:
        assert os.fstat(fd).st_ino == ino_f
    finally:
        os.close(fd)


def test_distinct_files_have_distinct_inode_numbers(mnt: Path) -> None:
    paths = [make_file(mnt / f"f{i}") for i in range(50)]
    paths += [make_dir(mnt / f"d{i}") for i in range(10)]
    for i in range(10):
        os.symlink("f0", mnt / f"l{i}")
        paths.append(mnt / f"l{i}")
    stats = [os.lstat(p) for p in paths]
    assert len({st.st_ino for st in stats}) == len(paths)
    assert len({st.st_dev for st in stats}) == 1


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


def test_concurrent_writers_distinct_files(mnt: Path) -> None:
    d = make_dir(mnt / "d")
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


def test_concurrent_o_append_writers_never_overwrite_each_other(mnt: Path) -> None:
    path = make_file(mnt / "log")
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


# --------------------------------------------------------------------------------------------
# cp -a and rsync -aHAX round trips
# --------------------------------------------------------------------------------------------


def _build_tree(root: Path) -> None:
    make_dir(root, 0o755)
    make_file(root / "plain.txt", b"hello\n" * 1000, 0o640)
    os.chown(root / "plain.txt", 1234, 5678)
    make_file(root / "script.sh", b"#!/bin/sh\necho hi\n", 0o755)
    make_file(root / "setuid-bin", b"\x7fELF not really", 0o4755)
    make_file(root / "empty", b"", 0o600)
    make_file(root / "名前 with space", b"unicode name\n", 0o644)
    sub = make_dir(root / "sub", 0o750)
    deep = make_dir(sub / "deep", 0o700)
    make_file(deep / "big", rand_bytes(2 * BLOCK + 333, "tree"), 0o600)
    make_file(root / "linked-a", b"one inode, two names\n", 0o644)
    os.link(root / "linked-a", sub / "linked-b")
    os.symlink("plain.txt", root / "rel-link")
    os.symlink("/nonexistent/target", root / "dangling-link")
    os.symlink("sub", root / "dir-link")
    sparse = root / "sparse"
    fd = os.open(sparse, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, b"start", offset=0)
        write_all(fd, b"end", offset=4 * BLOCK + 17)
    finally:
        os.close(fd)
    os.mkfifo(root / "fifo", 0o600)
    os.setxattr(root / "plain.txt", "user.checksum", b"abc123")
    os.setxattr(root / "linked-a", "user.shared", b"by both links")
    os.setxattr(sub, "user.dir-note", b"\x00\x01 binary")
    os.setxattr(deep / "big", "user.empty", b"")
    # Times last, children before parents, so creating entries does not disturb them.
    walk = sorted(os.walk(root), key=lambda t: -len(Path(t[0]).parts))
    for k, (dirpath, _dirnames, filenames) in enumerate(walk):
        for j, name in enumerate(sorted(filenames)):
            path = Path(dirpath) / name
            if not path.is_symlink():
                os.utime(path, ns=(OLD_NS + j, OLD_NS + j * 1_000_003))
        os.utime(dirpath, ns=(OLD_NS, OLD_NS + k * 7_000_001))


Snapshot = tuple[dict[str, tuple[object, ...]], frozenset[frozenset[str]]]


def _snapshot(root: Path) -> Snapshot:
    """Everything cp -a / rsync -aHAX must preserve, keyed by relative path."""
    entries: dict[str, tuple[object, ...]] = {}
    by_inode: dict[int, set[str]] = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / n for n in dirnames + filenames]
    for path in paths:
        rel = str(path.relative_to(root))
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            entries[rel] = (kind, os.readlink(path), st.st_uid, st.st_gid)
            continue
        record: tuple[object, ...] = (
            kind,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_nlink,
            user_xattrs(path),
        )
        if stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(read_file(path)).hexdigest()
            record += (st.st_size, digest, st.st_mtime_ns)
            by_inode.setdefault(st.st_ino, set()).add(rel)
        elif stat.S_ISDIR(st.st_mode):
            record += (st.st_mtime_ns,)
        entries[rel] = record
    groups = frozenset(frozenset(g) for g in by_inode.values() if len(g) > 1)
    return entries, groups


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}: {proc.stderr}"


def _check_round_trip(
    mnt: Path, tmp_path_factory: pytest.TempPathFactory, copy: Callable[[Path, Path], None]
) -> None:
    outside = tmp_path_factory.mktemp("posix-copy")
    src = outside / "src"
    _build_tree(src)
    expected = _snapshot(src)
    assert len(expected[1]) == 1  # the hard-link pair is really there
    inside = mnt / "copy"
    copy(src, inside)
    assert _snapshot(inside) == expected
    back = outside / "back"
    copy(inside, back)
    assert _snapshot(back) == expected


def test_cp_a_round_trip_preserves_everything(
    mnt: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _check_round_trip(mnt, tmp_path_factory, lambda s, d: _run("cp", "-a", "--", str(s), str(d)))


def test_rsync_ahax_round_trip_preserves_everything(
    mnt: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _check_round_trip(mnt, tmp_path_factory, lambda s, d: _run("rsync", "-aHAX", f"{s}/", f"{d}/"))
