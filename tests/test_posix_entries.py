"""POSIX tests, directory entries: unlink, rmdir and mkdir (also of open files and
directories), directory link counts, hard links, symlinks and mknod.

The contract these tests pin down, what they assume and how to run them on any directory
(--posix-dir) are described in tests/posix_helpers.py.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.posix_helpers import (
    BLOCK,
    assert_errno,
    make_dir,
    make_file,
    pread_exact,
    rand_bytes,
    read_file,
    write_all,
)

# --------------------------------------------------------------------------------------------
# unlink, rmdir, mkdir
# --------------------------------------------------------------------------------------------


def test_unlinked_open_file_stays_usable_until_close(posix_dir: Path) -> None:
    path = make_file(posix_dir / "f", rand_bytes(BLOCK + 3, "orphan"))
    fd = os.open(path, os.O_RDWR)
    other = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        assert_errno(lambda: os.stat(path), errno.ENOENT)
        assert "f" not in os.listdir(posix_dir / ".")
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


def test_removed_open_directory_rejects_new_entries(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
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


def test_mkdir_existing_name_fails_with_eexist(posix_dir: Path) -> None:
    make_dir(posix_dir / "d")
    make_file(posix_dir / "f")
    assert_errno(lambda: os.mkdir(posix_dir / "d"), errno.EEXIST)
    assert_errno(lambda: os.mkdir(posix_dir / "f"), errno.EEXIST)
    assert stat.S_ISREG(os.stat(posix_dir / "f").st_mode)


def test_rmdir_non_empty_fails_with_enotempty(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    make_file(d / "f")
    assert_errno(lambda: os.rmdir(d), errno.ENOTEMPTY, errno.EEXIST)
    os.unlink(d / "f")
    os.rmdir(d)
    assert not d.exists()


def test_rmdir_on_file_fails_with_enotdir(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    assert_errno(lambda: os.rmdir(f), errno.ENOTDIR)
    assert f.is_file()


def test_unlink_on_directory_fails_with_eisdir_or_eperm(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    assert_errno(lambda: os.unlink(d), errno.EISDIR, errno.EPERM)
    assert d.is_dir()


def test_unlink_and_rmdir_missing_names_fail_with_enoent(posix_dir: Path) -> None:
    assert_errno(lambda: os.unlink(posix_dir / "missing"), errno.ENOENT)
    assert_errno(lambda: os.rmdir(posix_dir / "missing"), errno.ENOENT)


def test_directory_link_count_is_two_plus_subdirectories(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    assert os.stat(d).st_nlink == 2
    for name in ("s1", "s2", "s3"):
        make_dir(d / name)
    make_file(d / "file1")
    os.symlink("s1", d / "link")
    assert os.stat(d).st_nlink == 5
    os.rmdir(d / "s3")
    assert os.stat(d).st_nlink == 4
    elsewhere = make_dir(posix_dir / "elsewhere")
    os.rename(d / "s2", elsewhere / "s2")
    assert os.stat(d).st_nlink == 3
    assert os.stat(elsewhere).st_nlink == 3
    assert os.stat(d / "s1").st_nlink == 2


def test_dot_and_dotdot_resolve(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    sub = make_dir(d / "sub")
    assert os.stat(d / ".").st_ino == os.stat(d).st_ino
    assert os.stat(sub / "..").st_ino == os.stat(d).st_ino
    assert os.stat(sub / ".." / ".." / "d" / "sub").st_ino == os.stat(sub).st_ino
    assert sorted(os.listdir(d)) == ["sub"]  # no "." or ".." in listings


# --------------------------------------------------------------------------------------------
# hard links and symlinks
# --------------------------------------------------------------------------------------------


def test_hard_links_share_inode_count_and_data(posix_dir: Path) -> None:
    other_dir = make_dir(posix_dir / "other")
    a = make_file(posix_dir / "a", b"first")
    os.link(a, posix_dir / "b")
    os.link(a, other_dir / "c")
    sa, sb, sc = os.stat(a), os.stat(posix_dir / "b"), os.stat(other_dir / "c")
    assert sa.st_ino == sb.st_ino == sc.st_ino
    assert sa.st_nlink == sb.st_nlink == sc.st_nlink == 3
    fd = os.open(posix_dir / "b", os.O_WRONLY | os.O_APPEND)
    try:
        write_all(fd, b"+second")
    finally:
        os.close(fd)
    assert read_file(other_dir / "c") == b"first+second"
    os.chmod(other_dir / "c", 0o600)
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
    os.unlink(a)
    assert os.stat(posix_dir / "b").st_nlink == 2
    os.unlink(posix_dir / "b")
    assert os.stat(other_dir / "c").st_nlink == 1
    assert read_file(other_dir / "c") == b"first+second"


def test_hard_link_to_directory_fails_with_eperm(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    assert_errno(lambda: os.link(d, posix_dir / "dlink"), errno.EPERM)
    assert not os.path.lexists(posix_dir / "dlink")
    assert os.stat(d).st_nlink == 2


def test_hard_link_onto_existing_name_fails_with_eexist(posix_dir: Path) -> None:
    a = make_file(posix_dir / "a", b"a")
    b = make_file(posix_dir / "b", b"b")
    assert_errno(lambda: os.link(a, b), errno.EEXIST)
    assert read_file(b) == b"b"
    assert os.stat(a).st_nlink == 1


def test_symlink_readlink_lstat_and_following(posix_dir: Path) -> None:
    make_dir(posix_dir / "dir")
    target = make_file(posix_dir / "dir" / "target", b"through the link")
    os.symlink("dir/target", posix_dir / "rel")
    os.symlink(str(target), posix_dir / "abs")
    os.symlink("dir", posix_dir / "dirlink")
    for link, text in ((posix_dir / "rel", "dir/target"), (posix_dir / "abs", str(target))):
        assert os.readlink(link) == text
        lst = os.lstat(link)
        assert stat.S_ISLNK(lst.st_mode)
        assert lst.st_size == len(os.fsencode(text))
        assert os.stat(link).st_ino == os.stat(target).st_ino
        assert read_file(link) == b"through the link"
    assert os.listdir(posix_dir / "dirlink") == ["target"]
    assert read_file(posix_dir / "dirlink" / "target") == b"through the link"


def test_dangling_symlink(posix_dir: Path) -> None:
    link = posix_dir / "dangling"
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
    assert read_file(posix_dir / "not-yet") == b"created via link"
    assert stat.S_ISLNK(os.lstat(link).st_mode)


def test_symlink_with_4000_byte_target(posix_dir: Path) -> None:
    target = "/".join(["d" * 99] * 40)  # 40*99 + 39 slashes = 3999 bytes
    target += "x"
    assert len(target) == 4000
    os.symlink(target, posix_dir / "long")
    assert os.readlink(posix_dir / "long") == target
    assert os.lstat(posix_dir / "long").st_size == 4000


def test_o_nofollow_on_symlink_fails_with_eloop(posix_dir: Path) -> None:
    make_file(posix_dir / "target", b"x")
    os.symlink("target", posix_dir / "link")
    assert_errno(lambda: os.open(posix_dir / "link", os.O_RDONLY | os.O_NOFOLLOW), errno.ELOOP)


def test_symlink_onto_existing_name_fails_with_eexist(posix_dir: Path) -> None:
    make_file(posix_dir / "f", b"x")
    assert_errno(lambda: os.symlink("anything", posix_dir / "f"), errno.EEXIST)
    assert stat.S_ISREG(os.lstat(posix_dir / "f").st_mode)


# --------------------------------------------------------------------------------------------
# mknod
# --------------------------------------------------------------------------------------------


def test_mknod_regular_file(posix_dir: Path) -> None:
    path = posix_dir / "reg"
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


def test_mkfifo_and_mknod_fifo_create_working_fifos(posix_dir: Path) -> None:
    os.mkfifo(posix_dir / "fifo1", 0o600)
    os.mknod(posix_dir / "fifo2", stat.S_IFIFO | 0o600)
    for name in ("fifo1", "fifo2"):
        assert stat.S_ISFIFO(os.lstat(posix_dir / name).st_mode)
    reader = os.open(posix_dir / "fifo1", os.O_RDONLY | os.O_NONBLOCK)
    try:
        writer = os.open(posix_dir / "fifo1", os.O_WRONLY)
        try:
            assert os.write(writer, b"through the pipe") == 16
            assert os.read(reader, 100) == b"through the pipe"
        finally:
            os.close(writer)
    finally:
        os.close(reader)


def test_mknod_socket_node(posix_dir: Path) -> None:
    os.mknod(posix_dir / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.lstat(posix_dir / "sock").st_mode)


@pytest.mark.parametrize(
    ("kind", "major", "minor"), [(stat.S_IFCHR, 1, 3), (stat.S_IFBLK, 7, 200)], ids=["chr", "blk"]
)
def test_mknod_device_as_root_works_or_fails_with_eperm(
    posix_dir: Path, kind: int, major: int, minor: int
) -> None:
    path = posix_dir / "dev"
    try:
        os.mknod(path, kind | 0o600, os.makedev(major, minor))
    except OSError as exc:
        assert exc.errno == errno.EPERM, exc
        assert not os.path.lexists(path)
        return
    st = os.lstat(path)
    assert stat.S_IFMT(st.st_mode) == kind
    assert st.st_rdev == os.makedev(major, minor)
