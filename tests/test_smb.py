"""vnafs re-exported over SMB by a real smbd: Previous Versions from snapshots, plain file work.

A real Samba (tools/servers.py) serves a real vnafs mount as share `vna` with vfs_shadow_copy2
over `/.snapshots`; a real smbclient talks to it. The default snapshot names
(`@GMT-YYYY.MM.DD-hh.mm.ss`, UTC) are what shadow_copy2 expects, so a snapshot is a Windows
"Previous Version" with no configuration on the vnafs side.
"""

from __future__ import annotations

import os
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


def ok(srv: Samba, *commands: str) -> str:
    """smbclient output of commands that must all succeed."""
    res = srv.smbclient(*commands)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "NT_STATUS_" not in out, f"{commands}: {out}"
    return out


def refused(srv: Samba, command: str) -> str:
    """The NT status of one command that must fail."""
    res = srv.smbclient(command)
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
