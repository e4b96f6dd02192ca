"""POSIX tests, rename(2) and renameat2(2): replacing files and directories, link counts,
the errors, RENAME_NOREPLACE, RENAME_EXCHANGE, and the no-op cases.

The contract these tests pin down, what they assume and how to run them on any directory
(--posix-dir) are described in tests/posix_helpers.py.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from tests.posix_helpers import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    assert_errno,
    make_dir,
    make_file,
    read_file,
    renameat2,
)

# --------------------------------------------------------------------------------------------
# rename
# --------------------------------------------------------------------------------------------


def test_rename_over_existing_file_replaces_it_and_frees_old_inode(posix_dir: Path) -> None:
    src = make_file(posix_dir / "src", b"source")
    dst = make_file(posix_dir / "dst", b"target")
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
    listing = os.listdir(posix_dir)
    assert listing.count("dst") == 1
    assert "src" not in listing


def test_rename_over_file_with_another_link_decrements_its_count(posix_dir: Path) -> None:
    src = make_file(posix_dir / "src", b"source")
    dst = make_file(posix_dir / "dst", b"target")
    os.link(dst, posix_dir / "other")
    os.rename(src, dst)
    other = os.stat(posix_dir / "other")
    assert other.st_nlink == 1
    assert read_file(posix_dir / "other") == b"target"
    assert read_file(dst) == b"source"


def test_rename_dir_over_empty_dir_replaces_it(posix_dir: Path) -> None:
    parent = make_dir(posix_dir / "p")
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


def test_rename_dir_over_non_empty_dir_fails_with_enotempty(posix_dir: Path) -> None:
    src = make_dir(posix_dir / "src")
    dst = make_dir(posix_dir / "dst")
    make_file(dst / "occupant", b"stay")
    assert_errno(lambda: os.rename(src, dst), errno.ENOTEMPTY, errno.EEXIST)
    assert src.is_dir()
    assert read_file(dst / "occupant") == b"stay"


def test_rename_file_over_dir_fails_with_eisdir(posix_dir: Path) -> None:
    src = make_file(posix_dir / "f", b"file")
    dst = make_dir(posix_dir / "d")
    assert_errno(lambda: os.rename(src, dst), errno.EISDIR)
    assert read_file(src) == b"file"
    assert dst.is_dir()


def test_rename_dir_over_file_fails_with_enotdir(posix_dir: Path) -> None:
    src = make_dir(posix_dir / "d")
    dst = make_file(posix_dir / "f", b"file")
    assert_errno(lambda: os.rename(src, dst), errno.ENOTDIR)
    assert src.is_dir()
    assert read_file(dst) == b"file"


def test_rename_dir_across_directories_updates_dotdot_and_link_counts(posix_dir: Path) -> None:
    a = make_dir(posix_dir / "a")
    b = make_dir(posix_dir / "b")
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


def test_rename_dir_into_its_own_subdirectory_fails_with_einval(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    make_dir(d / "sub")
    assert_errno(lambda: os.rename(d, d / "sub" / "inside"), errno.EINVAL)
    assert_errno(lambda: os.rename(d, d / "inside"), errno.EINVAL)
    assert (d / "sub").is_dir()
    assert sorted(os.listdir(d)) == ["sub"]


def test_rename_missing_source_fails_with_enoent(posix_dir: Path) -> None:
    assert_errno(lambda: os.rename(posix_dir / "missing", posix_dir / "new"), errno.ENOENT)
    assert not (posix_dir / "new").exists()


def test_rename_noreplace_onto_existing_fails_with_eexist(posix_dir: Path) -> None:
    src = make_file(posix_dir / "src", b"source")
    dst = make_file(posix_dir / "dst", b"target")
    assert_errno(lambda: renameat2(src, dst, RENAME_NOREPLACE), errno.EEXIST)
    assert read_file(src) == b"source"
    assert read_file(dst) == b"target"
    d = make_dir(posix_dir / "emptydir")
    assert_errno(lambda: renameat2(src, d, RENAME_NOREPLACE), errno.EEXIST)


def test_rename_noreplace_onto_missing_name_succeeds(posix_dir: Path) -> None:
    src = make_file(posix_dir / "src", b"source")
    ino = os.stat(src).st_ino
    renameat2(src, posix_dir / "dst", RENAME_NOREPLACE)
    assert not src.exists()
    assert os.stat(posix_dir / "dst").st_ino == ino
    assert read_file(posix_dir / "dst") == b"source"


def test_rename_exchange_swaps_two_files(posix_dir: Path) -> None:
    a = make_file(posix_dir / "a", b"AAAA", 0o600)
    b = make_file(posix_dir / "b", b"BB", 0o644)
    ino_a, ino_b = os.stat(a).st_ino, os.stat(b).st_ino
    renameat2(a, b, RENAME_EXCHANGE)
    assert read_file(a) == b"BB"
    assert read_file(b) == b"AAAA"
    assert os.stat(a).st_ino == ino_b
    assert os.stat(b).st_ino == ino_a
    assert stat.S_IMODE(os.stat(b).st_mode) == 0o600


def test_rename_exchange_swaps_file_and_directory_across_parents(posix_dir: Path) -> None:
    p1 = make_dir(posix_dir / "p1")
    p2 = make_dir(posix_dir / "p2")
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


def test_rename_exchange_with_missing_target_fails_with_enoent(posix_dir: Path) -> None:
    a = make_file(posix_dir / "a", b"A")
    assert_errno(lambda: renameat2(a, posix_dir / "missing", RENAME_EXCHANGE), errno.ENOENT)
    assert read_file(a) == b"A"
    assert not (posix_dir / "missing").exists()


def test_rename_to_itself_is_a_no_op(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f", b"same")
    d = make_dir(posix_dir / "d")
    before_f, before_d = os.stat(f), os.stat(d)
    os.rename(f, f)
    os.rename(d, d)
    assert read_file(f) == b"same"
    assert os.stat(f).st_ino == before_f.st_ino
    assert os.stat(f).st_nlink == 1
    assert os.stat(d).st_ino == before_d.st_ino
    assert sorted(os.listdir(posix_dir / ".")).count("f") == 1


def test_rename_between_hard_links_of_one_inode_is_a_no_op(posix_dir: Path) -> None:
    a = make_file(posix_dir / "a", b"data")
    os.link(a, posix_dir / "b")
    os.rename(a, posix_dir / "b")
    assert a.exists()
    assert (posix_dir / "b").exists()
    assert os.stat(a).st_nlink == 2
    assert os.stat(a).st_ino == os.stat(posix_dir / "b").st_ino


def test_rename_of_symlink_moves_the_link_not_its_target(posix_dir: Path) -> None:
    target = make_file(posix_dir / "target", b"t")
    os.symlink("target", posix_dir / "link")
    os.rename(posix_dir / "link", posix_dir / "renamed")
    assert os.readlink(posix_dir / "renamed") == "target"
    assert not os.path.lexists(posix_dir / "link")
    assert read_file(target) == b"t"
    assert read_file(posix_dir / "renamed") == b"t"
