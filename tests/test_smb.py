"""vnafs re-exported over SMB by a real smbd: Previous Versions from snapshots, plain file work,
and real (non-root) users.

A real Samba (tools/servers.py) serves a real vnafs mount as share `vna` with vfs_shadow_copy2
over `/.snapshots`; a real smbclient talks to it. The default snapshot names
(`@GMT-YYYY.MM.DD-hh.mm.ss`, UTC) are what shadow_copy2 expects, so a snapshot is a Windows
"Previous Version" with no configuration on the vnafs side.

The first tests run the share as root (`force user`); the `users_samba` tests run it the way a
site should (docs/admin.md, "Samba as real users"): two temporary unix accounts, a and b, no
`force user`, so smbd works as the connected user and vnafs (default_permissions) checks the
modes; DOS attributes in `user.DOSATTRIB` and alternate data streams through streams_xattr.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Fs, run_vnafs
from tests.requires import fail_if_missing
from tests.test_replication import tree
from tools.servers import Samba

GMT = re.compile(r"@GMT-\d{4}\.\d\d\.\d\d-\d\d\.\d\d\.\d\d")


@pytest.fixture
def samba(fs: Fs, workdir: Path) -> Iterator[Samba]:
    """smbd serving fs.mnt; stopped (by PID, children included) at teardown. Fails the test
    with one line naming the package if samba, smbclient or samba-vfs-modules is missing."""
    with fail_if_missing(), Samba(workdir / "samba", fs.mnt) as srv:
        yield srv


def ok(srv: Samba, *commands: str, user: str | None = None) -> str:
    """smbclient output of commands that must all succeed (as the account of role `user`)."""
    res = srv.smbclient(*commands, user=user)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "NT_STATUS_" not in out, f"{commands}: {out}"
    return out


def refused(srv: Samba, command: str, user: str | None = None) -> str:
    """The NT status of one command that must fail."""
    res = srv.smbclient(command, user=user)
    status = re.search(r"NT_STATUS_\w+", res.stdout + res.stderr)
    assert status, f"{command} was not refused: {res.stdout}{res.stderr}"
    return status.group()


def snapshot(fs: Fs) -> str:
    """A snapshot with the default name, in a second no earlier snapshot used."""
    name = time.strftime("@GMT-%Y.%m.%d-%H.%M.%S", time.gmtime())
    if (fs.mnt / ".snapshots" / name).exists():
        time.sleep(1.05 - time.time() % 1)
    name = run_vnafs("snapshot", "create", str(fs.mnt)).stdout.split()[-1]
    assert GMT.fullmatch(name), name
    return name


def previous_versions(srv: Samba, path: str) -> list[tuple[str, int | None]]:
    """(snapshot, size) for each Previous Version `allinfo` lists, in the server's order.

    smbclient lists every snapshot of the share, then asks each for the file: size None is a
    snapshot without it (smbclient prints the NT_STATUS_OBJECT_NAME_NOT_FOUND it got)."""
    res = srv.smbclient(f'allinfo "{path}"')
    out = res.stdout + res.stderr
    assert res.returncode == 0 and out.startswith("altname:"), out
    versions = re.findall(r"^(@GMT-\S+)$", res.stdout, re.M)
    sizes: list[int | None] = []
    for name in versions:
        block = res.stdout.split(name + "\n", 1)[1].split("\n@GMT-", 1)[0]
        size = re.search(r"^size: (\d+)$", block, re.M)
        if size:
            sizes.append(int(size.group(1)))
        else:
            assert f"pathinfo({name}\\{path}) failed: NT_STATUS_OBJECT_NAME_NOT_FOUND" in out
            sizes.append(None)
    return list(zip(versions, sizes, strict=True))


def test_previous_versions_through_samba(fs: Fs, samba: Samba, workdir: Path) -> None:
    first = b"first version\n" * 3000
    (fs.mnt / "report.txt").write_bytes(first)
    (fs.mnt / "deleted.txt").write_bytes(b"deleted after the snapshot\n")
    s1 = snapshot(fs)
    second = b"second, shorter version\n" * 100
    (fs.mnt / "report.txt").write_bytes(second)
    os.unlink(fs.mnt / "deleted.txt")
    (fs.mnt / "added.txt").write_text("added after the snapshot\n")

    assert previous_versions(samba, "report.txt") == [(s1, len(first))]
    got = workdir / "got"
    got.mkdir()
    # shadow_copy2 takes the @GMT token as a path component (what a Windows client sends as
    # a timewarp token); a normal get still returns the live file.
    ok(samba, f'get "{s1}/report.txt" "{got}/old"', f'get "report.txt" "{got}/new"',
       f'get "{s1}/deleted.txt" "{got}/deleted"')
    assert (got / "old").read_bytes() == first
    assert (got / "new").read_bytes() == second
    assert (got / "deleted").read_bytes() == b"deleted after the snapshot\n"
    # The previous version of the folder is the tree at the snapshot.
    listing = ok(samba, f'ls "{s1}/*"')
    assert "report.txt" in listing and "deleted.txt" in listing
    assert "added.txt" not in listing
    assert "NT_STATUS_OBJECT_NAME_NOT_FOUND" in refused(samba, f'get "{s1}/added.txt" "{got}/x"')

    # A second snapshot: both listed, newest first (shadow:sort = desc), each with its content.
    s2 = snapshot(fs)
    (fs.mnt / "report.txt").write_bytes(b"third\n")
    assert previous_versions(samba, "report.txt") == [(s2, len(second)), (s1, len(first))]
    ok(samba, f'get "{s2}/report.txt" "{got}/v2"', f'get "{s1}/report.txt" "{got}/v1"',
       f'get "report.txt" "{got}/v3"')
    assert (got / "v2").read_bytes() == second
    assert (got / "v1").read_bytes() == first
    assert (got / "v3").read_bytes() == b"third\n"
    # added.txt was created between the two snapshots: only the newer one has it.
    assert previous_versions(samba, "added.txt") == [(s2, 25), (s1, None)]


def test_smb_reexport_reads_and_writes(fs: Fs, samba: Samba, workdir: Path) -> None:
    data = os.urandom(5 << 20) + b"not block aligned"
    src = workdir / "src.bin"
    src.write_bytes(data)
    ok(samba, "mkdir study", f'put "{src}" "study/image.dcm"')
    assert (fs.mnt / "study" / "image.dcm").read_bytes() == data
    back = workdir / "back.bin"
    ok(samba, f'get "study/image.dcm" "{back}"')
    assert back.read_bytes() == data
    # Written through the mount, read through SMB.
    other = os.urandom(3 << 20)
    (fs.mnt / "study" / "local.dcm").write_bytes(other)
    ok(samba, f'get "study/local.dcm" "{back}"')
    assert back.read_bytes() == other

    ok(samba, "rename study/image.dcm study/renamed.dcm", "mkdir study/series",
       "rename study/local.dcm study/series/moved.dcm", "mkdir scratch", "rmdir scratch",
       f'put "{src}" "study/doomed"', "del study/doomed")
    assert sorted(os.listdir(fs.mnt)) == ["study"]
    assert sorted(os.listdir(fs.mnt / "study")) == ["renamed.dcm", "series"]
    assert (fs.mnt / "study" / "renamed.dcm").read_bytes() == data
    assert (fs.mnt / "study" / "series" / "moved.dcm").read_bytes() == other

    # .snapshots is reachable by path but hidden from the share's listing, and read-only: the
    # EROFS from vnafs arrives as NT_STATUS_MEDIA_WRITE_PROTECTED.
    name = snapshot(fs)
    snaps = fs.mnt / ".snapshots"
    before = tree(snaps / name)
    assert ".snapshots" not in ok(samba, "ls")
    assert name in ok(samba, 'ls ".snapshots/*"')
    for command in (f'put "{src}" ".snapshots/new"', 'mkdir ".snapshots/new"',
                    'rename "study/renamed.dcm" ".snapshots/renamed.dcm"'):
        assert refused(samba, command) == "NT_STATUS_MEDIA_WRITE_PROTECTED", command
    # The same snapshot as a Previous Version: shadow_copy2 or vnafs refuses every change.
    # (Through SMB the snapshot's files are reachable only that way: shadow_copy2 takes the
    # @GMT component of ".snapshots/@GMT-.../x" as a timewarp token.)
    for command in (f'put "{src}" "{name}/new"', f'put "{src}" "{name}/study/renamed.dcm"',
                    f'mkdir "{name}/new"', f'del "{name}/study/renamed.dcm"',
                    f'rmdir "{name}/study/series"', f'rename "{name}/study" "{name}/other"',
                    f'rmdir ".snapshots/{name}"', f'setmode "{name}/study/renamed.dcm" +r',
                    f'hardlink "{name}/study/renamed.dcm" "study/linked.dcm"'):
        refused(samba, command)
    # Moving a previous version out is EXDEV, so a client falls back to copying.
    assert refused(samba, f'rename "{name}/study/renamed.dcm" "study/restored.dcm"') == (
        "NT_STATUS_NOT_SAME_DEVICE")
    ok(samba, f'get "{name}/study/renamed.dcm" "{back}"', f'put "{back}" "study/restored.dcm"')
    assert (fs.mnt / "study" / "restored.dcm").read_bytes() == data
    assert os.listdir(snaps) == [name]
    assert tree(snaps / name) == before
    assert (fs.mnt / "study" / "renamed.dcm").read_bytes() == data
    assert sorted(os.listdir(fs.mnt / "study")) == ["renamed.dcm", "restored.dcm", "series"]


# -- real users -----------------------------------------------------------------------------------

# The share parameters docs/admin.md recommends for real users ("Samba as real users"); Samba
# adds `path`, `valid users` (its accounts) and the shadow_copy2 lines, and no `force user`.
REAL_USERS: dict[str, str | None] = {
    "create mask": "0640",
    "directory mask": "0750",
    "map archive": "no",
    "store dos attributes": "yes",
    "vfs objects": "shadow_copy2 streams_xattr",
}
DENIED = "NT_STATUS_ACCESS_DENIED"


def _gone(names: list[str]) -> None:
    """The accounts (and their own groups) no longer exist."""
    for name in names:
        with pytest.raises(KeyError):
            pwd.getpwnam(name)
        with pytest.raises(KeyError):
            grp.getgrnam(name)


def _homes(srv: Samba, mnt: Path) -> None:
    """A folder per role in the share's root (which stays root's), owned by it, mode 0755."""
    for role, account in srv.accounts.items():
        home = mnt / role
        home.mkdir(mode=0o755)
        os.chown(home, account.uid, account.gid)


@pytest.fixture
def users_samba(fs: Fs, workdir: Path) -> Iterator[Samba]:
    """smbd serving fs.mnt with REAL_USERS to two temporary unix accounts, roles a and b, each
    with its folder `/a`, `/b`. The Samba class creates the accounts (useradd, smbpasswd) when it
    starts and removes them (pdbedit -x, userdel) when the `with` ends, also when the test failed;
    the teardown then checks they are gone."""
    with fail_if_missing(), Samba(workdir / "samba", fs.mnt, users=("a", "b"),
                                  share_options=REAL_USERS) as srv:
        names = [account.name for account in srv.accounts.values()]
        _homes(srv, fs.mnt)
        yield srv
    _gone(names)


def state(path: Path) -> tuple[bytes, int, int, int, int, int, dict[str, bytes]]:
    """Content, mode, owner, group, mtime, ctime and xattrs: what a refused change leaves alone."""
    st = os.stat(path)
    return (path.read_bytes(), st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns,
            {name: os.getxattr(path, name) for name in os.listxattr(path)})


def allinfo(srv: Samba, path: str, user: str | None) -> tuple[str, list[tuple[str, int]]]:
    """The DOS attributes (`HA (22)`: letters, hex value) and the streams (name, size) of path,
    sorted (the server lists them in its xattrs' order, which on vnafs follows keyed hashes)."""
    out = ok(srv, f'allinfo "{path}"', user=user)
    attrs = re.search(r"^attributes: (.+)$", out, re.M)
    assert attrs, out
    streams = re.findall(r"^stream: \[(.*)\], (\d+) bytes$", out, re.M)
    return attrs.group(1), sorted((name, int(size)) for name, size in streams)


def security(srv: Samba, path: str, user: str) -> tuple[str, str, list[tuple[str, int]]]:
    """Owner SID, group SID and the ACEs (SID, access mask) a Windows client sees for path."""
    out = ok(srv, "showacls", f'ls "{path}"', user=user)
    owner = re.search(r"^\s*Owner SID:\s*(S-[\d-]+)$", out, re.M)
    group = re.search(r"^\s*Group SID:\s*(S-[\d-]+)$", out, re.M)
    assert owner and group, out
    aces = re.findall(r"type: ACCESS ALLOWED.*?Permissions: (0x[0-9a-f]+):.*?SID: (S-[\d-]+)",
                      out, re.S)
    return owner.group(1), group.group(1), [(sid, int(mask, 16)) for mask, sid in aces]


def test_smb_real_users_ownership_and_permissions(fs: Fs, users_samba: Samba,
                                                  workdir: Path) -> None:
    srv = users_samba
    a, b = srv.account("a"), srv.account("b")
    data = os.urandom(3 << 20) + b"not block aligned"
    src = workdir / "src.bin"
    src.write_bytes(data)
    back = workdir / "back.bin"
    ok(srv, f'put "{src}" "a/scan.dcm"', 'mkdir "a/series"', f'put "{src}" "a/series/1.dcm"',
       user="a")
    # Owner and group are the connected user's, the modes the share's create and directory masks.
    for path, mode in (("a/scan.dcm", 0o100640), ("a/series", 0o40750),
                       ("a/series/1.dcm", 0o100640)):
        st = os.stat(fs.mnt / path)
        assert (st.st_uid, st.st_gid, st.st_mode) == (a.uid, a.gid, mode), path
    assert (fs.mnt / "a" / "scan.dcm").read_bytes() == data
    ok(srv, f'get "a/scan.dcm" "{back}"', user="a")
    assert back.read_bytes() == data
    # What a Windows client sees: A (its passdb SID) owns the file, the group is A's unix group,
    # and the mode is the ACL: read/write for A, read for the group, nothing for Everyone.
    unix_group = f"S-1-22-2-{a.gid}"
    assert security(srv, "a/scan.dcm", "a") == (
        a.sid, unix_group, [(a.sid, 0x12019F), (unix_group, 0x120089), ("S-1-1-0", 0)])

    # A file of A's that others may read (an administrator's chmod; from Windows, an ACL that
    # gives Everyone read access, see docs/admin.md): B reads it; everything else of A's is
    # closed to B, who is refused with ACCESS_DENIED and changes nothing.
    ok(srv, f'put "{src}" "a/shared.dcm"', user="a")
    os.chmod(fs.mnt / "a" / "shared.dcm", 0o644)
    ok(srv, f'get "a/shared.dcm" "{back}"', user="b")
    assert back.read_bytes() == data
    assert "shared.dcm" in ok(srv, 'ls "a/*"', user="b")  # A's folder is 0755
    files = ("a/scan.dcm", "a/shared.dcm", "a/series/1.dcm")
    before = {path: state(fs.mnt / path) for path in files}
    listing = {d: sorted(os.listdir(fs.mnt / d)) for d in ("a", "a/series", "b")}
    stolen = workdir / "stolen"
    for command in (f'get "a/scan.dcm" "{stolen}"',                # 0640, not B's group
                    'ls "a/series/*"', f'get "a/series/1.dcm" "{stolen}"',  # a 0750 folder
                    f'put "{src}" "a/new.dcm"', 'mkdir "a/new"',   # A's 0755 folder
                    f'put "{src}" "a/shared.dcm"',                 # readable is not writable
                    f'put "{src}" "a/shared.dcm:stream"',
                    'setmode "a/shared.dcm" +h', 'del "a/shared.dcm"',
                    'rename "a/shared.dcm" "a/renamed.dcm"',
                    'rename "a/shared.dcm" "b/taken.dcm"', 'rmdir "a/series"'):
        assert refused(srv, command, user="b") == DENIED, command
    assert not stolen.exists()
    assert {path: state(fs.mnt / path) for path in files} == before
    assert {d: sorted(os.listdir(fs.mnt / d)) for d in listing} == listing
    # B's own folder works for B, with B's ownership; the share's root (root's 0755) takes
    # nothing from either, and A cannot write into B's folder either.
    ok(srv, f'put "{src}" "b/own.dcm"', user="b")
    st = os.stat(fs.mnt / "b" / "own.dcm")
    assert (st.st_uid, st.st_gid, st.st_mode) == (b.uid, b.gid, 0o100640)
    for command, user in ((f'put "{src}" "top.dcm"', "a"), ('mkdir "top"', "b"),
                          (f'put "{src}" "b/from-a.dcm"', "a")):
        assert refused(srv, command, user=user) == DENIED, command
    assert sorted(os.listdir(fs.mnt)) == ["a", "b"]
    assert os.listdir(fs.mnt / "b") == ["own.dcm"]

    # Previous Versions keep owner and mode, so the same rules hold there.
    name = snapshot(fs)
    ok(srv, f'get "{name}/a/scan.dcm" "{back}"', user="a")
    assert back.read_bytes() == data
    assert refused(srv, f'get "{name}/a/scan.dcm" "{stolen}"', user="b") == DENIED
    assert not stolen.exists()

    # A renames, moves and deletes its own files and folders.
    ok(srv, 'rename "a/scan.dcm" "a/renamed.dcm"', 'rename "a/renamed.dcm" "a/series/scan.dcm"',
       'del "a/series/1.dcm"', 'del "a/shared.dcm"', user="a")
    assert os.listdir(fs.mnt / "a") == ["series"]
    assert os.listdir(fs.mnt / "a" / "series") == ["scan.dcm"]
    assert (fs.mnt / "a" / "series" / "scan.dcm").read_bytes() == data
    ok(srv, 'del "a/series/scan.dcm"', 'rmdir "a/series"', user="a")
    assert os.listdir(fs.mnt / "a") == []


def test_smb_dos_attributes(fs: Fs, users_samba: Samba, workdir: Path) -> None:
    """DOS attributes work: Samba keeps them in the xattr user.DOSATTRIB (store dos attributes),
    the unix mode stays what the create mask made it (map archive/readonly = no)."""
    srv = users_samba
    data = os.urandom(1 << 20)
    src = workdir / "src.bin"
    src.write_bytes(data)
    ok(srv, f'put "{src}" "a/f.dcm"', 'mkdir "a/d"', user="a")
    f = fs.mnt / "a" / "f.dcm"
    assert allinfo(srv, "a/f.dcm", "a")[0] == "A (20)"
    ok(srv, 'setmode "a/f.dcm" +h', 'setmode "a/d" +hs', user="a")
    assert allinfo(srv, "a/f.dcm", "a")[0] == "HA (22)"
    assert allinfo(srv, "a/d", "a")[0] == "HSD (16)"
    assert re.search(r"^\s+f\.dcm\s+AH\s", ok(srv, 'ls "a/*"', user="a"), re.M)
    assert "user.DOSATTRIB" in os.listxattr(f)
    assert "user.DOSATTRIB" in os.listxattr(fs.mnt / "a" / "d")
    assert os.stat(f).st_mode == 0o100640
    assert os.stat(fs.mnt / "a" / "d").st_mode == 0o40750

    # Read-only: SMB refuses to overwrite or delete the file (Windows' messages), rename works
    # (as on Windows); the mode is not touched, so only SMB clients see the flag.
    ok(srv, 'setmode "a/f.dcm" -h', 'setmode "a/f.dcm" +r', user="a")
    assert allinfo(srv, "a/f.dcm", "a")[0] == "RA (21)"
    before = state(f)
    assert refused(srv, f'put "{src}" "a/f.dcm"', user="a") == DENIED
    assert refused(srv, 'del "a/f.dcm"', user="a") == "NT_STATUS_CANNOT_DELETE"
    assert state(f) == before
    assert before[1] == 0o100640
    ok(srv, 'rename "a/f.dcm" "a/g.dcm"', user="a")
    assert allinfo(srv, "a/g.dcm", "a")[0] == "RA (21)"
    # B (no write access) cannot change A's attributes.
    os.chmod(fs.mnt / "a" / "g.dcm", 0o644)
    assert refused(srv, 'setmode "a/g.dcm" -r', user="b") == DENIED
    ok(srv, 'setmode "a/g.dcm" -r', 'del "a/g.dcm"', 'setmode "a/d" -hs', 'rmdir "a/d"', user="a")
    assert os.listdir(fs.mnt / "a") == []


def test_smb_alternate_data_streams(fs: Fs, users_samba: Samba, workdir: Path) -> None:
    """Streams work up to 65535 bytes: streams_xattr keeps each in one xattr
    `user.DosStream.NAME:$DATA` (the data and a NUL), and Linux caps an xattr value at 64 KiB
    (XATTR_SIZE_MAX; vnafs stores up to that). A longer stream is refused: by Samba with
    NT_STATUS_FILE_SYSTEM_LIMITATION (smbd max xattr size, default 64 KiB), or, if that is
    raised, by the kernel (E2BIG) as NT_STATUS_ACCESS_DENIED. Either way an empty stream of
    that name stays behind."""
    srv = users_samba
    data = os.urandom(1 << 20)
    src = workdir / "src.bin"
    src.write_bytes(data)
    note = workdir / "note"
    note.write_bytes(b"reviewed, no findings\n" * 10)
    largest = workdir / "largest"
    largest.write_bytes(os.urandom(65535))
    too_big = workdir / "too_big"
    too_big.write_bytes(os.urandom(65536))
    back = workdir / "back"
    f = fs.mnt / "a" / "f.dcm"

    ok(srv, f'put "{src}" "a/f.dcm"', f'put "{note}" "a/f.dcm:note"',
       f'get "a/f.dcm:note" "{back}"', user="a")
    assert back.read_bytes() == note.read_bytes()
    assert allinfo(srv, "a/f.dcm", "a")[1] == [("::$DATA", len(data)), (":note:$DATA", 220)]
    assert os.getxattr(f, "user.DosStream.note:$DATA") == note.read_bytes() + b"\0"
    assert f.read_bytes() == data
    # The stream has the file's permissions: B may not read it (0640).
    assert refused(srv, f'get "a/f.dcm:note" "{back}"', user="b") == DENIED

    ok(srv, f'put "{largest}" "a/f.dcm:largest"', f'get "a/f.dcm:largest" "{back}"', user="a")
    assert back.read_bytes() == largest.read_bytes()
    assert len(os.getxattr(f, "user.DosStream.largest:$DATA")) == 65536
    res = srv.smbclient(f'put "{too_big}" "a/f.dcm:big"', user="a")
    assert "cli_push returned NT_STATUS_FILE_SYSTEM_LIMITATION" in res.stdout + res.stderr, res
    assert allinfo(srv, "a/f.dcm", "a")[1] == [
        ("::$DATA", len(data)), (":big:$DATA", 0), (":largest:$DATA", 65535),
        (":note:$DATA", 220)]
    assert os.getxattr(f, "user.DosStream.big:$DATA") == b"\0"
    assert f.read_bytes() == data

    # Raising smbd max xattr size does not help: the kernel refuses the 65537-byte value.
    with Samba(workdir / "samba-raised", fs.mnt, users=("c",),
               share_options={**REAL_USERS, "smbd max xattr size": str(1 << 20)}) as raised:
        names = [account.name for account in raised.accounts.values()]
        _homes(raised, fs.mnt)
        res = raised.smbclient(f'put "{src}" "c/f.dcm"', f'put "{too_big}" "c/f.dcm:big"',
                               user="c")
        assert "cli_push returned NT_STATUS_ACCESS_DENIED" in res.stdout + res.stderr, res
        assert allinfo(raised, "c/f.dcm", "c")[1] == [("::$DATA", len(data)), (":big:$DATA", 0)]
    _gone(names)


def test_smb_streams_refused_without_streams_xattr(fs: Fs, samba: Samba, workdir: Path) -> None:
    """The `samba` share has no streams_xattr: a named stream is refused with
    NT_STATUS_OBJECT_NAME_INVALID and nothing is stored; the file itself is unaffected."""
    src = workdir / "src.bin"
    src.write_bytes(b"main data\n")
    ok(samba, f'put "{src}" "f.dcm"')
    before = state(fs.mnt / "f.dcm")
    for command in (f'put "{src}" "f.dcm:note"', f'get "f.dcm:note" "{workdir}/note"'):
        assert refused(samba, command) == "NT_STATUS_OBJECT_NAME_INVALID", command
    assert allinfo(samba, "f.dcm", None)[1] == [("::$DATA", 10)]
    assert state(fs.mnt / "f.dcm") == before
    assert os.listxattr(fs.mnt / "f.dcm") == ["user.DOSATTRIB"]
