"""Invariant 1 and 8: nothing acknowledged is lost, and identities are stable.

What a writer has closed (or fsynced) must survive `kill -9` of the daemon; a crash at any moment
must leave a store that mounts again and that `fsck --repair` makes clean. Inode numbers, NFS file
handles and readdir cookies must mean the same thing after a remount.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from conftest import Fs, run_vnafs

SIZES = [0, 1, 4095, 100_000, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3_500_000]


def _content(seed: int, size: int) -> bytes:
    rnd = random.Random(seed)
    # Half compressible, half random, so both codecs are exercised.
    half = size // 2
    return (bytes(rnd.randrange(4) for _ in range(min(half, 4096))) * (half // 4096 + 1))[
        :half
    ] + rnd.randbytes(size - half)


def _write_tree(root: Path, *, fsync: bool) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    (root / "study" / "series").mkdir(parents=True)
    for i, size in enumerate(SIZES):
        rel = f"study/series/f{i}.dcm"
        data = _content(i, size)
        fd = os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        files[rel] = data
    os.link(root / "study/series/f3.dcm", root / "study/hardlink")
    files["study/hardlink"] = files["study/series/f3.dcm"]
    os.symlink("series/f1.dcm", root / "study/sym")
    os.setxattr(root / "study/series/f2.dcm", "user.tag", b"value")
    os.rename(root / "study/series/f4.dcm", root / "study/moved.dcm")
    files["study/moved.dcm"] = files.pop("study/series/f4.dcm")
    (root / "study/series/f5.dcm").unlink()
    files.pop("study/series/f5.dcm")
    # An overwrite in place, then a truncate, the way storescp resends an instance.
    with open(root / "study/series/f6.dcm", "r+b") as f:
        f.seek(10)
        f.write(b"RESENT")
    data6 = bytearray(files["study/series/f6.dcm"])
    data6[10:16] = b"RESENT"
    files["study/series/f6.dcm"] = bytes(data6)
    os.truncate(root / "study/series/f7.dcm", 1_500_000)
    files["study/series/f7.dcm"] = files["study/series/f7.dcm"][:1_500_000]
    return files


def _check_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        got = (root / rel).read_bytes()
        assert len(got) == len(data), rel
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), rel
    assert os.readlink(root / "study/sym") == "series/f1.dcm"
    assert os.getxattr(root / "study/series/f2.dcm", "user.tag") == b"value"
    assert os.stat(root / "study/hardlink").st_nlink == 2
    assert not (root / "study/series/f5.dcm").exists()
    assert sorted(os.listdir(root / "study/series")) == sorted(
        Path(r).name for r in files if r.startswith("study/series/")
    )


def test_closed_files_survive_kill9(fs: Fs) -> None:
    files = _write_tree(fs.mnt, fsync=False)
    fs.kill9()
    fs.mount()
    _check_tree(fs.mnt, files)


def test_fsynced_files_survive_kill9(fs: Fs) -> None:
    files = _write_tree(fs.mnt, fsync=True)
    fs.kill9()
    fs.mount()
    _check_tree(fs.mnt, files)


def test_sync_on_close_mount_option(new_fs: Fs) -> None:
    new_fs.options = ["allow_other", "sync_on_close"]
    new_fs.mount()
    files = _write_tree(new_fs.mnt, fsync=False)
    new_fs.kill9()
    new_fs.mount()
    _check_tree(new_fs.mnt, files)


WRITER = r"""
import os, sys, hashlib
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    data = hashlib.sha256(str(i).encode()).digest() * (1000 + 977 * (i % 70))
    fd = os.open(f"{root}/w{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)
    print(i, flush=True)
"""


def test_kill9_during_ingest_loses_nothing_acknowledged(fs: Fs) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(fs.mnt), "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    acknowledged = -1
    deadline = time.monotonic() + 60
    while acknowledged < 150 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acknowledged = int(line)
    fs.kill9()
    proc.wait(timeout=30)
    for line in proc.stdout.read().split():
        acknowledged = max(acknowledged, int(line))  # closes that returned before the kill
    assert acknowledged >= 150, "writer made no progress"
    fs.mount()
    for i in range(acknowledged + 1):
        expect = hashlib.sha256(str(i).encode()).digest() * (1000 + 977 * (i % 70))
        assert (fs.mnt / f"w{i}").read_bytes() == expect, i
    fs.umount()
    res = run_vnafs("fsck", "--repair", "--key-file", str(fs.key), str(fs.hot), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "DAMAGE" not in res.stdout
    res = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot))
    assert res.stdout.strip().endswith("clean")


def test_unlinked_open_file_freed_after_crash(fs: Fs) -> None:
    path = fs.mnt / "victim"
    path.write_bytes(os.urandom(3 << 20))
    blocks_before = sum(1 for _ in (fs.hot / "blocks").rglob("*") if _.is_file())
    fd = os.open(path, os.O_RDONLY)
    path.unlink()
    assert os.fstat(fd).st_nlink == 0
    assert len(os.pread(fd, 100, 2 << 20)) == 100
    fs.kill9()
    with contextlib.suppress(OSError):
        os.close(fd)  # the connection is gone; the kernel drops the handle anyway
    fs.mount()  # recovery frees the orphan
    blocks_after = sum(1 for _ in (fs.hot / "blocks").rglob("*") if _.is_file())
    assert blocks_after == blocks_before - 3
    fs.umount()
    res = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot))
    assert res.stdout.strip().endswith("clean")


def test_inode_numbers_stable_across_remount(fs: Fs) -> None:
    (fs.mnt / "d" / "e").mkdir(parents=True)
    (fs.mnt / "d" / "f").write_bytes(b"x")
    before = {p: os.lstat(fs.mnt / p).st_ino for p in ("", "d", "d/e", "d/f")}
    assert len(set(before.values())) == 4
    fs.umount()
    fs.mount()
    after = {p: os.lstat(fs.mnt / p).st_ino for p in before}
    assert after == before


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
AT_FDCWD = -100
MAX_HANDLE_SZ = 128


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def _handle(path: Path) -> FileHandle:
    fh = FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    rc = _libc.name_to_handle_at(AT_FDCWD, str(path).encode(), ctypes.byref(fh),
                                 ctypes.byref(mount_id), 0)
    assert rc == 0, os.strerror(ctypes.get_errno())
    return fh


def _open_by_handle(mnt: Path, fh: FileHandle) -> int:
    mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _libc.open_by_handle_at(mfd, ctypes.byref(fh), os.O_RDONLY)
        assert fd >= 0, os.strerror(ctypes.get_errno())
        return int(fd)
    finally:
        os.close(mfd)


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_file_handles_survive_cache_drop_and_remount(fs: Fs) -> None:
    """The path NFS servers use: (nodeid, generation) handles resolved after forgetting."""
    (fs.mnt / "a" / "b").mkdir(parents=True)
    (fs.mnt / "a" / "b" / "f").write_bytes(b"payload")
    handles = {p: _handle(fs.mnt / p) for p in ("a", "a/b", "a/b/f")}
    _drop_caches()
    for p, fh in handles.items():
        fd = _open_by_handle(fs.mnt, fh)
        try:
            assert os.fstat(fd).st_ino == os.lstat(fs.mnt / p).st_ino
        finally:
            os.close(fd)
    fs.umount()
    fs.mount()
    _drop_caches()
    fd = _open_by_handle(fs.mnt, handles["a/b/f"])
    try:
        assert os.read(fd, 100) == b"payload"
    finally:
        os.close(fd)
    fd = _open_by_handle(fs.mnt, handles["a/b"])
    try:
        # `..` of a directory opened by handle resolves through lookup(dir, "..").
        assert os.stat("..", dir_fd=fd).st_ino == os.lstat(fs.mnt / "a").st_ino
    finally:
        os.close(fd)


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


_libc.opendir.restype = ctypes.c_void_p
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.closedir.argtypes = [ctypes.c_void_p]


def _list_from(path: Path, cookie: int | None, stop_after: int | None = None,
               ) -> tuple[list[str], int]:
    d = _libc.opendir(str(path).encode())
    assert d
    names: list[str] = []
    pos = 0
    try:
        if cookie is not None:
            _libc.seekdir(d, cookie)
        while True:
            if stop_after is not None and len(names) == stop_after:
                pos = _libc.telldir(d)
                break
            ent = _libc.readdir(d)
            if not ent:
                break
            name = ent.contents.d_name.decode()
            if name not in (".", ".."):
                names.append(name)
    finally:
        _libc.closedir(d)
    return names, pos


def test_readdir_cookies_stable_across_changes_and_remount(fs: Fs) -> None:
    d = fs.mnt / "many"
    d.mkdir()
    for i in range(1000):
        (d / f"inst{i:04d}.dcm").write_bytes(b"")
    full, _ = _list_from(d, None)
    assert sorted(full) == sorted(f"inst{i:04d}.dcm" for i in range(1000))
    first, cookie = _list_from(d, None, stop_after=400)
    assert first == full[:400]
    # Changes elsewhere in the directory must not shift a saved position...
    for name in first[:50]:
        (d / name).unlink()
    fs.umount()
    fs.mount()
    rest, _ = _list_from(d, cookie)
    assert rest == full[400:]
