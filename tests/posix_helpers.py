"""Shared helpers of the POSIX tests (tests/test_posix_*.py): constants, syscall wrappers
(renameat2, utimensat), file helpers, and child interpreters run as another user.

Why the POSIX tests exist: PACS software, backup tools (`cp -a`, `rsync -aHAX`) and NFS/SMB
re-exports expect vnafs to behave like a boring local POSIX filesystem. These tests pin that
contract down one behaviour per test (open flags, offsets around vnafs's 1 MiB blocks, sparse
files, truncation, every rename variant, link counts, timestamps, permissions under
`default_permissions`, xattrs, readdir while the directory changes, concurrent writers), so that a
regression in the namespace or the data path shows up as a named broken behaviour instead of as a
damaged study. They are split by subject: open, data, rename, entries, attrs, permissions, xattr,
readdir, concurrency, copy.

The tests are deliberately generic. They only use the `posix_dir` fixture (tests/conftest.py):
normally the root directory of a freshly created, mounted, empty vnafs, mounted with
`allow_other` and `default_permissions`, owned by root, mode 0755. With `--posix-dir=DIR` it is
instead a fresh, empty subdirectory of DIR (mode 0755, removed afterwards) on whatever file system
DIR lives, which is how the tests themselves are validated:

    .venv/bin/python -m pytest -p no:cacheprovider tests/test_posix_*.py \\
        --posix-dir=/var/tmp/posix-ext4

They pass unchanged on a plain ext4 directory, except tests marked `vnafs_only` (behaviour
that vnafs promises and the reference file system need not have, such as 64 KiB xattr values
on ext4 without `ea_inode`), which are skipped under --posix-dir. Where Linux filesystems
legitimately differ (st_blocks accounting, atime under relatime) nothing is asserted. A few tests
check Linux behaviour that POSIX leaves to the implementation (setgid-directory inheritance,
chown clearing set-id bits, ctime on setxattr, the 64 KiB xattr value limit); their docstrings
say so.

Requirements: run as root; uid/gid 65534 (and uid 1234 for the ACL test) must be able to
traverse to `posix_dir`; `cp` and `rsync` must be installed (the copy tests check, and fail
naming the package if not). Tests never look at the contents of `posix_dir` itself beyond what
they create, so virtual directories at the root do not disturb them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import stat
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


# Child processes are separate interpreters (not multiprocessing forks), so these tests stay
# safe when the filesystem daemon runs in a thread of the pytest process itself.


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


# Bodies for run_py and as_nobody: open for writing, open for reading, create (O_EXCL).
OPEN_WRITE = "os.close(os.open(sys.argv[1], os.O_WRONLY))"
OPEN_READ = "os.close(os.open(sys.argv[1], os.O_RDONLY))"
CREATE = "os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))"


def user_xattrs(path: Path) -> dict[str, bytes]:
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
        if name.startswith("user.")
    }
