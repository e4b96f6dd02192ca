"""POSIX tests, backup tools: `cp -a` and `rsync -aHAX` round trips of a tree with every
kind of entry into the directory under test and back, preserving everything they promise.

The contract these tests pin down, what they assume and how to run them on any directory
(--posix-dir) are described in tests/posix_helpers.py.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.posix_helpers import (
    BLOCK,
    OLD_NS,
    make_dir,
    make_file,
    rand_bytes,
    read_file,
    user_xattrs,
    write_all,
)
from tests.requires import need_program

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
    posix_dir: Path, tmp_path_factory: pytest.TempPathFactory, copy: Callable[[Path, Path], None]
) -> None:
    outside = tmp_path_factory.mktemp("posix-copy")
    src = outside / "src"
    _build_tree(src)
    expected = _snapshot(src)
    assert len(expected[1]) == 1  # the hard-link pair is really there
    inside = posix_dir / "copy"
    copy(src, inside)
    assert _snapshot(inside) == expected
    back = outside / "back"
    copy(inside, back)
    assert _snapshot(back) == expected


def test_cp_a_round_trip_preserves_everything(
    posix_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cp = need_program("cp", "coreutils")
    _check_round_trip(
        posix_dir, tmp_path_factory, lambda s, d: _run(cp, "-a", "--", str(s), str(d))
    )


def test_rsync_ahax_round_trip_preserves_everything(
    posix_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rsync = need_program("rsync", "rsync")
    _check_round_trip(
        posix_dir, tmp_path_factory, lambda s, d: _run(rsync, "-aHAX", f"{s}/", f"{d}/")
    )
