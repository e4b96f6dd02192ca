"""POSIX tests, permissions as another user (uid 65534 in a child process): read, write,
search, create, delete, sticky directories, and chmod, chown, utime and setxattr by a non-owner.

The contract these tests pin down, what they assume and how to run them on any directory
(--posix-dir) are described in tests/posix_helpers.py.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from tests.posix_helpers import (
    CREATE,
    NOBODY,
    OPEN_READ,
    OPEN_WRITE,
    age,
    as_nobody,
    assert_recent,
    make_dir,
    make_file,
    read_file,
)

# --------------------------------------------------------------------------------------------
# permissions as another user (default_permissions)
# --------------------------------------------------------------------------------------------



def test_setuid_and_setgid_cleared_when_non_owner_writes(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
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


def test_other_user_cannot_write_root_0644_file_but_can_read_it(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    f = make_file(d / "f", b"root data", 0o644)
    assert as_nobody(OPEN_WRITE, f) == "EACCES"
    assert as_nobody("os.truncate(sys.argv[1], 0)", f) == "EACCES"
    assert as_nobody("assert open(sys.argv[1], 'rb').read() == b'root data'", f) == "OK"
    assert read_file(f) == b"root data"


def test_other_user_cannot_read_root_0600_file(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f", b"secret", 0o600)
    assert as_nobody(OPEN_READ, f) == "EACCES"


def test_other_user_cannot_create_or_delete_in_root_0755_dir(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d", 0o755)
    victim = make_file(d / "victim", b"x", 0o666)
    assert as_nobody(CREATE, d / "new") == "EACCES"
    assert as_nobody("os.mkdir(sys.argv[1])", d / "newdir") == "EACCES"
    assert as_nobody("os.unlink(sys.argv[1])", victim) == "EACCES"
    assert as_nobody("os.rename(sys.argv[1], sys.argv[2])", victim, d / "moved") == "EACCES"
    assert sorted(os.listdir(d)) == ["victim"]


def test_other_user_can_create_in_0777_dir_and_owns_the_file(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d", 0o777)
    assert as_nobody(CREATE, d / "mine") == "OK"
    assert as_nobody("os.mkdir(sys.argv[1])", d / "mydir") == "OK"
    for name in ("mine", "mydir"):
        st = os.stat(d / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


def test_other_user_cannot_search_0700_dir(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "private", 0o700)
    make_file(d / "f", b"x", 0o644)
    assert as_nobody("os.stat(sys.argv[1])", d / "f") == "EACCES"
    assert as_nobody("os.listdir(sys.argv[1])", d) == "EACCES"
    os.chmod(d, 0o711)  # search without read: known names work, listing does not
    assert as_nobody("os.stat(sys.argv[1])", d / "f") == "OK"
    assert as_nobody("os.listdir(sys.argv[1])", d) == "EACCES"


def test_group_class_bits_apply_to_group_members(posix_dir: Path) -> None:
    """A member of the file's group gets the group bits, even when "other" would allow more."""
    grant = make_file(posix_dir / "grant", b"g", 0o460)
    deny = make_file(posix_dir / "deny", b"d", 0o604)
    for f in (grant, deny):
        os.chown(f, 0, NOBODY)
        os.chmod(f, 0o460 if f is grant else 0o604)
    assert as_nobody(OPEN_WRITE, grant) == "OK"
    assert as_nobody(OPEN_READ, deny) == "EACCES"


def test_sticky_dir_stops_other_users_deleting_roots_file(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "tmp", 0o1777)
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


def test_other_user_cannot_chmod_or_chown_roots_file(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f", b"x", 0o666)
    assert as_nobody("os.chmod(sys.argv[1], 0o777)", f) == "EPERM"
    assert as_nobody("os.chown(sys.argv[1], 65534, 65534)", f) == "EPERM"
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_utime_permissions_for_non_owner(posix_dir: Path) -> None:
    """Setting times to now needs write access; setting explicit times needs ownership."""
    writable = make_file(posix_dir / "w", b"x", 0o666)
    readonly = make_file(posix_dir / "r", b"x", 0o644)
    age(writable)
    start = time.time_ns()
    assert as_nobody("os.utime(sys.argv[1])", writable) == "OK"
    assert_recent(os.stat(writable).st_mtime_ns, start)
    assert as_nobody("os.utime(sys.argv[1], ns=(5, 5))", writable) == "EPERM"
    assert as_nobody("os.utime(sys.argv[1])", readonly) == "EACCES"


def test_other_user_xattr_write_needs_write_permission(posix_dir: Path) -> None:
    readonly = make_file(posix_dir / "r", b"x", 0o644)
    writable = make_file(posix_dir / "w", b"x", 0o666)
    body = "os.setxattr(sys.argv[1], 'user.who', b'nobody')"
    assert as_nobody(body, readonly) == "EACCES"
    assert as_nobody(body, writable) == "OK"
    assert os.getxattr(writable, "user.who") == b"nobody"
    assert "user.who" not in os.listxattr(readonly)
