"""POSIX tests, extended attributes: user.* set, get, list and remove with their flags and
limits, security.*, and POSIX ACLs (system.posix_acl_access).

The contract these tests pin down, what they assume and how to run them on any directory
(--posix-dir) are described in tests/posix_helpers.py.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from tests.posix_helpers import (
    OPEN_READ,
    XATTR_SIZE_MAX,
    as_nobody,
    assert_errno,
    make_dir,
    make_file,
    rand_bytes,
    run_py,
    user_xattrs,
)

# --------------------------------------------------------------------------------------------
# extended attributes
# --------------------------------------------------------------------------------------------


def test_user_xattr_set_get_list_remove(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
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


def test_many_xattrs_are_all_listed(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    expected = {f"user.attr-{i:03d}": f"value {i}".encode() for i in range(100)}
    for name, value in expected.items():
        os.setxattr(f, name, value)
    assert user_xattrs(f) == expected


def test_missing_xattr_fails_with_enodata(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    assert_errno(lambda: os.getxattr(f, "user.missing"), errno.ENODATA)
    assert_errno(lambda: os.removexattr(f, "user.missing"), errno.ENODATA)


def test_xattr_create_flag_on_existing_fails_with_eexist(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    os.setxattr(f, "user.x", b"first", os.XATTR_CREATE)
    assert_errno(lambda: os.setxattr(f, "user.x", b"second", os.XATTR_CREATE), errno.EEXIST)
    assert os.getxattr(f, "user.x") == b"first"


def test_xattr_replace_flag_on_missing_fails_with_enodata(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    assert_errno(lambda: os.setxattr(f, "user.x", b"v", os.XATTR_REPLACE), errno.ENODATA)
    assert "user.x" not in os.listxattr(f)
    os.setxattr(f, "user.x", b"v")
    os.setxattr(f, "user.x", b"w", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.x") == b"w"


@pytest.mark.vnafs_only("ext4 stores a 64 KiB xattr value only with the ea_inode feature")
def test_xattr_value_of_64_kib(posix_dir: Path) -> None:
    """The Linux VFS maximum value size (XATTR_SIZE_MAX). ext4 only passes with `ea_inode`."""
    f = make_file(posix_dir / "f")
    value = rand_bytes(XATTR_SIZE_MAX, "xattr")
    os.setxattr(f, "user.big", value)
    assert os.getxattr(f, "user.big") == value
    assert "user.big" in os.listxattr(f)


def test_xattrs_survive_rename_and_are_shared_by_hard_links(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
    os.setxattr(f, "user.k", b"v")
    make_dir(posix_dir / "d")
    os.rename(f, posix_dir / "d" / "g")
    assert os.getxattr(posix_dir / "d" / "g", "user.k") == b"v"
    os.link(posix_dir / "d" / "g", posix_dir / "h")
    os.setxattr(posix_dir / "h", "user.k2", b"v2")
    assert user_xattrs(posix_dir / "d" / "g") == {"user.k": b"v", "user.k2": b"v2"}


def test_xattr_on_directory(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    os.setxattr(d, "user.dir", b"on a directory")
    assert os.getxattr(d, "user.dir") == b"on a directory"
    os.rename(d, posix_dir / "e")
    assert user_xattrs(posix_dir / "e") == {"user.dir": b"on a directory"}


def test_user_xattr_on_symlink_is_refused_with_eperm(posix_dir: Path) -> None:
    os.symlink("target", posix_dir / "link")
    assert_errno(
        lambda: os.setxattr(posix_dir / "link", "user.x", b"v", follow_symlinks=False), errno.EPERM
    )


def test_security_xattr_as_root_works_or_is_cleanly_unsupported(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f")
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


def test_posix_acl_works_and_is_enforced_or_is_cleanly_unsupported(posix_dir: Path) -> None:
    """An accepted ACL must mean something: mode group bits follow the mask, uid 1234 may read."""
    f = make_file(posix_dir / "f", b"acl", 0o600)
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
