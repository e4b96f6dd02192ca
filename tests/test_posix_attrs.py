"""POSIX tests, inode attributes: chmod, chown, set-id bits, the umask, utimensat, and which
operations update mtime and ctime.

The contract these tests pin down, what they assume and how to run them on any directory
(--posix-dir) are described in tests/posix_helpers.py.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from tests.posix_helpers import (
    BLOCK,
    NOW,
    OLD_NS,
    OMIT,
    SEC,
    age,
    assert_recent,
    make_dir,
    make_file,
    rand_bytes,
    read_file,
    tick,
    ts,
    utimensat,
    write_all,
)

# --------------------------------------------------------------------------------------------
# chmod, chown, utimes
# --------------------------------------------------------------------------------------------


def test_chmod_sets_exact_permission_bits(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    d = make_dir(posix_dir / "d")
    for mode in (0o644, 0o600, 0o000, 0o777, 0o4755, 0o2750, 0o1644, 0o7777, 0o400):
        os.chmod(f, mode)
        assert stat.S_IMODE(os.stat(f).st_mode) == mode
        assert stat.S_ISREG(os.stat(f).st_mode)
    for mode in (0o700, 0o1777, 0o2775, 0o555):
        os.chmod(d, mode)
        assert stat.S_IMODE(os.stat(d).st_mode) == mode
        assert stat.S_ISDIR(os.stat(d).st_mode)


def test_chown_as_root(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(f, -1, 999)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 999)
    d = make_dir(posix_dir / "d")
    os.chown(d, 4321, 8765)
    assert (os.stat(d).st_uid, os.stat(d).st_gid) == (4321, 8765)


def test_lchown_changes_symlink_not_target(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    os.symlink("f", posix_dir / "link")
    os.chown(posix_dir / "link", 1234, 5678, follow_symlinks=False)
    assert (os.lstat(posix_dir / "link").st_uid, os.lstat(posix_dir / "link").st_gid) == (1234, 5678)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (0, 0)


def test_chown_clears_setuid_and_setgid(posix_dir: Path) -> None:
    """Linux clears S_ISUID (and S_ISGID with group-exec) on chown of a file, even by root."""
    f = make_file(posix_dir / "f", b"#!", 0o6755)
    os.chown(f, 1234, 5678)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755


def test_setgid_directory_passes_group_and_bit_to_new_entries(posix_dir: Path) -> None:
    """Linux (BSD) semantics, which POSIX permits and shared PACS directories rely on."""
    d = make_dir(posix_dir / "shared")
    os.chown(d, 0, 4321)
    os.chmod(d, 0o2775)
    f = make_file(d / "f")
    sub = d / "sub"
    os.mkdir(sub, 0o755)
    assert os.stat(f).st_gid == 4321
    assert os.stat(sub).st_gid == 4321
    assert os.stat(sub).st_mode & stat.S_ISGID


def test_umask_is_applied_on_create_mkdir_and_mkfifo(posix_dir: Path) -> None:
    old = os.umask(0o027)
    try:
        os.close(os.open(posix_dir / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.mkdir(posix_dir / "d", 0o777)
        os.mkfifo(posix_dir / "p", 0o666)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(posix_dir / "f").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(posix_dir / "d").st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(posix_dir / "p").st_mode) == 0o640


def test_utime_sets_explicit_nanosecond_times(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    atime = 1_234_567_890 * SEC + 123_456_789
    mtime = 4_102_444_800 * SEC + 987_654_321  # 2100-01-01: beyond 2038
    os.utime(f, ns=(atime, mtime))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    d = make_dir(posix_dir / "d")
    os.utime(d, ns=(OLD_NS, OLD_NS + 1))
    assert (os.stat(d).st_atime_ns, os.stat(d).st_mtime_ns) == (OLD_NS, OLD_NS + 1)


def test_utime_omit_leaves_that_timestamp_alone(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    new = OLD_NS + 86_400 * SEC + 5
    utimensat(f, OMIT, ts(new))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (OLD_NS, new)
    utimensat(f, ts(new + 1), OMIT)
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (new + 1, new)


def test_utime_now_sets_times_close_to_now(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
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


def test_utime_on_symlink_without_following(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    os.symlink("f", posix_dir / "link")
    os.utime(posix_dir / "link", ns=(OLD_NS + 5, OLD_NS + 7), follow_symlinks=False)
    assert os.lstat(posix_dir / "link").st_mtime_ns == OLD_NS + 7
    assert os.stat(f).st_mtime_ns == OLD_NS


def test_new_file_times_are_now(posix_dir: Path) -> None:
    start = time.time_ns()
    f = make_file(posix_dir / "f", b"x")
    st = os.stat(f)
    for ns in (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns):
        assert_recent(ns, start)


# --------------------------------------------------------------------------------------------
# ctime / mtime bookkeeping
# --------------------------------------------------------------------------------------------


def test_write_updates_mtime_and_ctime(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f", b"before")
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


def test_chmod_updates_ctime_not_mtime(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    age(f)
    before = os.stat(f)
    tick()
    os.chmod(f, 0o600)
    after = os.stat(f)
    assert after.st_mtime_ns == OLD_NS
    assert after.st_ctime_ns > before.st_ctime_ns


def test_chown_updates_ctime_not_mtime(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    age(f)
    before = os.stat(f)
    tick()
    os.chown(f, 1234, 5678)
    after = os.stat(f)
    assert after.st_mtime_ns == OLD_NS
    assert after.st_ctime_ns > before.st_ctime_ns


def test_rename_updates_ctime_of_moved_file(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    age(f)
    before = os.stat(f)
    tick()
    os.rename(f, posix_dir / "g")
    after = os.stat(posix_dir / "g")
    assert after.st_ctime_ns > before.st_ctime_ns
    assert after.st_mtime_ns == OLD_NS


@pytest.mark.parametrize("same_dir", [False, True], ids=["across", "within"])
def test_rename_updates_mtime_and_ctime_of_parent_dirs(posix_dir: Path, same_dir: bool) -> None:
    a = make_dir(posix_dir / "a")
    b = a if same_dir else make_dir(posix_dir / "b")
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
def test_creating_an_entry_updates_parent_mtime_and_ctime(posix_dir: Path, kind: str) -> None:
    d = make_dir(posix_dir / "d")
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
def test_removing_an_entry_updates_parent_mtime_and_ctime(posix_dir: Path, kind: str) -> None:
    d = make_dir(posix_dir / "d")
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


def test_link_and_unlink_update_ctime_of_the_inode(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f", b"x")
    age(f)
    before = os.stat(f)
    tick()
    os.link(f, posix_dir / "g")
    linked = os.stat(f)
    assert linked.st_ctime_ns > before.st_ctime_ns
    assert linked.st_mtime_ns == OLD_NS
    tick()
    os.unlink(posix_dir / "g")
    unlinked = os.stat(f)
    assert unlinked.st_ctime_ns > linked.st_ctime_ns
    assert unlinked.st_mtime_ns == OLD_NS


def test_reading_does_not_change_mtime_or_ctime(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f", rand_bytes(BLOCK + 5, "read"))
    age(f)
    before = os.stat(f)
    tick()
    assert len(read_file(f)) == BLOCK + 5
    after = os.stat(f)
    assert after.st_mtime_ns == OLD_NS
    assert after.st_ctime_ns == before.st_ctime_ns


@pytest.mark.parametrize("how", ["truncate", "ftruncate", "o_trunc"])
def test_truncation_updates_mtime_and_ctime(posix_dir: Path, how: str) -> None:
    f = make_file(posix_dir / "f", b"some content")
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


def test_setxattr_updates_ctime_not_mtime(posix_dir: Path) -> None:
    """Linux updates ctime on xattr changes; incremental backups rely on it."""
    f = make_file(posix_dir / "f")
    age(f)
    before = os.stat(f)
    tick()
    os.setxattr(f, "user.note", b"value")
    after = os.stat(f)
    assert after.st_ctime_ns > before.st_ctime_ns
    assert after.st_mtime_ns == OLD_NS
