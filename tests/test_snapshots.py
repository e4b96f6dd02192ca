"""Snapshots under /.snapshots: what they show, what they refuse, what deleting them frees.

Real mounts and the real CLI; every test compares a snapshot's tree with the tree recorded
before the change it must not see.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Fs, run_vnafs
from tests.requires import need_program
from tests.test_replication import _set_archive, tree

SNAP = ".snapshots"


def snap(fs: Fs, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_vnafs("snapshot", args[0], str(fs.mnt), *args[1:], check=check)


def listing(fs: Fs) -> list[dict[str, object]]:
    return list(json.loads(snap(fs, "list", "--json").stdout))


def populate(mnt: Path) -> None:
    (mnt / "study" / "series").mkdir(parents=True)
    (mnt / "study" / "series" / "1.dcm").write_bytes(os.urandom(3 << 20))
    (mnt / "study" / "series" / "2.dcm").write_bytes(b"two" * 1000)
    (mnt / "study" / "empty").mkdir()
    (mnt / "notes.txt").write_text("first version\n")
    os.link(mnt / "notes.txt", mnt / "study" / "notes-link")
    os.symlink("series/2.dcm", mnt / "study" / "latest")
    os.setxattr(mnt / "notes.txt", "user.tag", b"v1")
    os.chmod(mnt / "study" / "series" / "2.dcm", 0o640)


def test_snapshot_keeps_the_tree_through_every_kind_of_change(fs: Fs) -> None:
    populate(fs.mnt)
    before = tree(fs.mnt)
    snap(fs, "create", "before")
    mnt = fs.mnt
    with open(mnt / "study" / "series" / "1.dcm", "r+b") as f:  # overwrite in place
        f.seek(1 << 20)
        f.write(b"X" * 4096)
    os.truncate(mnt / "study" / "series" / "2.dcm", 10)
    with open(mnt / "notes.txt", "a") as f:
        f.write("appended\n")
    os.unlink(mnt / "study" / "notes-link")
    os.rename(mnt / "study" / "series", mnt / "study" / "moved")
    os.rmdir(mnt / "study" / "empty")
    os.chmod(mnt / "notes.txt", 0o600)
    os.setxattr(mnt / "notes.txt", "user.tag", b"v2")
    os.unlink(mnt / "study" / "latest")
    (mnt / "new-after").write_text("not in the snapshot")
    view = mnt / SNAP / "before"
    assert tree(view) == before
    assert os.getxattr(view / "notes.txt", "user.tag") == b"v1"
    assert os.readlink(view / "study" / "latest") == "series/2.dcm"
    # The snapshot survives a remount unchanged.
    fs.umount()
    fs.mount()
    assert tree(fs.mnt / SNAP / "before") == before
    assert tree(fs.mnt) != before


def test_a_file_open_during_the_snapshot(fs: Fs) -> None:
    path = fs.mnt / "growing"
    with open(path, "wb") as f:
        f.write(b"A" * 100_000)
        f.flush()
        os.fsync(f.fileno())  # committed: the snapshot sees it
        f.write(b"B" * 100_000)  # not committed yet: the snapshot does not
        snap(fs, "create", "mid")
        f.write(b"C" * 100_000)
    assert (fs.mnt / SNAP / "mid" / "growing").read_bytes() == b"A" * 100_000
    assert path.read_bytes() == b"A" * 100_000 + b"B" * 100_000 + b"C" * 100_000


def test_everything_under_snapshots_is_read_only(fs: Fs, workdir: Path) -> None:
    cp = need_program("cp", "coreutils")
    populate(fs.mnt)
    snap(fs, "create", "ro")
    s = fs.mnt / SNAP / "ro"
    refusals = {
        "create": lambda: (s / "new").write_text("x"),
        "write": lambda: open(s / "notes.txt", "r+b").close(),
        "truncate": lambda: os.truncate(s / "notes.txt", 0),
        "mkdir": lambda: os.mkdir(s / "d"),
        "unlink": lambda: os.unlink(s / "notes.txt"),
        "rmdir": lambda: os.rmdir(s / "study" / "empty"),
        "rename inside": lambda: os.rename(s / "notes.txt", s / "n2"),
        "chmod": lambda: os.chmod(s / "notes.txt", 0o777),
        "chown": lambda: os.chown(s / "notes.txt", 1, 1),
        "utime": lambda: os.utime(s / "notes.txt", (1, 1)),
        "setxattr": lambda: os.setxattr(s / "notes.txt", "user.x", b"1"),
        "removexattr": lambda: os.removexattr(s / "notes.txt", "user.tag"),
        "symlink": lambda: os.symlink("x", s / "l"),
        "link into": lambda: os.link(fs.mnt / "notes.txt", s / "l2"),
        "mkdir in .snapshots": lambda: os.mkdir(fs.mnt / SNAP / "new"),
        "rmdir in .snapshots": lambda: os.rmdir(s),
        "file in .snapshots": lambda: (fs.mnt / SNAP / "f").write_text("x"),
    }
    for what, action in refusals.items():
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno == errno.EROFS, what
    for what, action in {"rename out": lambda: os.rename(s / "notes.txt", fs.mnt / "n"),
                         "link out": lambda: os.link(s / "notes.txt", fs.mnt / "n")}.items():
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno == errno.EXDEV, what
    # Restoring a file is a copy; mv falls back to one too (EXDEV).
    os.unlink(fs.mnt / "notes.txt")
    subprocess.run([cp, "-a", str(s / "notes.txt"), str(fs.mnt / "notes.txt")], check=True)
    assert (fs.mnt / "notes.txt").read_text() == "first version\n"
    assert os.getxattr(fs.mnt / "notes.txt", "user.tag") == b"v1"
    # .snapshots is hidden from the root listing by default, like .dicom.
    assert SNAP not in os.listdir(fs.mnt)
    with pytest.raises(OSError) as exc:
        os.mkdir(fs.mnt / SNAP)
    assert exc.value.errno == errno.EEXIST


def test_inode_numbers_are_distinct_stable_and_decodable(fs: Fs, workdir: Path) -> None:
    rsync = need_program("rsync", "rsync")
    find = need_program("find", "findutils")
    populate(fs.mnt)
    snap(fs, "create", "a")
    sid = int(listing(fs)[0]["id"])  # type: ignore[call-overload]
    live = {p: os.lstat(fs.mnt / p).st_ino for p in ("notes.txt", "study", "study/series")}
    inside = {p: os.lstat(fs.mnt / SNAP / "a" / p).st_ino for p in live}
    for p in live:
        assert inside[p] != live[p]
        assert inside[p] >> 40 == sid and inside[p] & ((1 << 40) - 1) == live[p]
    # Hard links inside a snapshot share an inode: rsync -H keeps them linked.
    s = fs.mnt / SNAP / "a"
    assert os.lstat(s / "notes.txt").st_ino == os.lstat(s / "study" / "notes-link").st_ino
    copy = workdir / "copy"
    subprocess.run([rsync, "-aHX", f"{s}/", f"{copy}/"], check=True)
    assert os.lstat(copy / "notes.txt").st_ino == os.lstat(copy / "study" / "notes-link").st_ino
    assert _no_dir_sizes(tree(copy)) == _no_dir_sizes(tree(s))
    found = subprocess.run([find, str(s), "-name", "*.dcm"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(found) == 2
    assert os.lstat(s / "study" / "..").st_ino == os.lstat(s).st_ino
    assert os.lstat(s / "..").st_ino == os.lstat(fs.mnt / SNAP).st_ino
    fs.umount()
    fs.mount()
    assert {p: os.lstat(fs.mnt / SNAP / "a" / p).st_ino for p in live} == inside


def _no_dir_sizes(t: dict[str, tuple[int, int, str]]) -> dict[str, tuple[int, int, str]]:
    """Directory sizes are the file system's own business (ext4 says 4096, vnafs 0)."""
    return {k: (m, 0 if stat.S_ISDIR(m) else n, d) for k, (m, n, d) in t.items()}


def test_deleting_a_snapshot_frees_exactly_its_unique_blocks(fs: Fs) -> None:
    shared = os.urandom(2 << 20)
    only_old = os.urandom(3 << 20)
    (fs.mnt / "shared").write_bytes(shared)
    (fs.mnt / "old").write_bytes(only_old)
    snap(fs, "create", "s1")
    os.unlink(fs.mnt / "old")  # its 3 blocks now live only in s1
    (fs.mnt / "later").write_bytes(os.urandom(1 << 20))
    snap(fs, "create", "s2")
    rows = {r["name"]: r for r in listing(fs)}
    assert 3 << 20 < int(rows["s1"]["unique_bytes"]) * 3 < 3 * (4 << 20)  # compressed-ish
    assert rows["s2"]["unique_bytes"] == 0
    blocks_before = fs.status()["blocks"]
    snap(fs, "delete", "s1")
    deadline = time.monotonic() + 30
    while fs.status()["blocks"] != blocks_before - 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fs.status()["blocks"] == blocks_before - 3
    assert (fs.mnt / "shared").read_bytes() == shared
    assert (fs.mnt / SNAP / "s2" / "shared").read_bytes() == shared
    assert not (fs.mnt / SNAP / "s1").exists()
    fs.umount()
    res = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot), check=False)
    assert res.returncode == 0, res.stdout
    fs.mount()


def test_locked_snapshot_cannot_be_deleted_or_shortened(new_fs: Fs) -> None:
    cfg = new_fs.hot / "vnafs.toml"
    cfg.write_text(cfg.read_text().replace("mkdir = false", "mkdir = true"))
    fs = new_fs.mount()
    snap(fs, "create", "kept", "--lock-until", "2099-01-01")
    res = snap(fs, "delete", "kept", check=False)
    assert res.returncode == 1 and "locked until 2099-01-01" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = snap(fs, "lock", "kept", "--until", "2098-01-01", check=False)
    assert res.returncode == 1 and "only move later" in res.stderr
    snap(fs, "lock", "kept", "--until", "2100-01-01")
    with pytest.raises(OSError) as exc:
        os.rmdir(fs.mnt / SNAP / "kept")
    assert exc.value.errno == errno.EPERM
    from vnafs import control

    with pytest.raises(Exception, match="locked"):
        control.control_request(fs.hot, {"op": "snapshot_delete", "name": "kept"})
    assert [r["name"] for r in listing(fs)] == ["kept"]
    # mkdir / rmdir in .snapshots when enabled; rmdir frees space like `snapshot delete`.
    (fs.mnt / "only-in-snapshot").write_bytes(os.urandom(1 << 20))
    blocks = fs.status()["blocks"]
    os.mkdir(fs.mnt / SNAP / "by-mkdir")
    assert "by-mkdir" in os.listdir(fs.mnt / SNAP)
    os.unlink(fs.mnt / "only-in-snapshot")
    os.rmdir(fs.mnt / SNAP / "by-mkdir")
    assert "by-mkdir" not in os.listdir(fs.mnt / SNAP)
    deadline = time.monotonic() + 30
    while fs.status()["blocks"] != blocks - 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fs.status()["blocks"] == blocks - 1


def test_default_names_and_diff(fs: Fs) -> None:
    (fs.mnt / "a").write_text("a")
    (fs.mnt / "b").write_text("b")
    out = snap(fs, "create").stdout
    name = out.split()[-1]
    assert name.startswith("@GMT-") and len(name) == len("@GMT-2026.11.22-08.00.00")
    (fs.mnt / "a").write_text("changed")
    os.unlink(fs.mnt / "b")
    os.rename(fs.mnt / "a", fs.mnt / "c")
    (fs.mnt / "d").write_text("new")
    rows = [line.split("\t") for line in snap(fs, "diff", name, "live").stdout.splitlines()]
    assert ["R", "/a", "/c"] in rows and ["-", "/b"] in rows and ["+", "/d"] in rows
    assert ["M", "/c"] in rows


def test_schedule_takes_a_missed_snapshot_at_mount(new_fs: Fs) -> None:
    cfg = new_fs.hot / "vnafs.toml"
    cfg.write_text(cfg.read_text() + '\n[[snapshots.schedule]]\nevery = "1h"\nkeep = 3\n'
                   'lock = "1d"\n')
    fs = new_fs.mount()
    deadline = time.monotonic() + 20
    while not listing(fs) and time.monotonic() < deadline:
        time.sleep(0.2)
    rows = listing(fs)
    assert len(rows) == 1 and str(rows[0]["name"]).startswith("@GMT-")
    assert rows[0]["schedule"] == "every-3600s" and rows[0]["locked"]
    fs.umount()
    fs.mount()  # less than an hour later: nothing new
    time.sleep(1)
    assert len(listing(fs)) == 1


def test_bad_schedule_is_a_one_line_error(new_fs: Fs) -> None:
    cfg = new_fs.hot / "vnafs.toml"
    cfg.write_text(cfg.read_text() + '\n[[snapshots.schedule]]\nevery = "often"\nkeep = 3\n')
    res = run_vnafs("mount", "--key-file", str(new_fs.key), str(new_fs.hot), str(new_fs.mnt),
                    check=False)
    assert res.returncode == 1 and "duration" in res.stderr and "Traceback" not in res.stderr


def test_snapshots_survive_restore_and_show_in_archive_mounts(workdir: Path) -> None:
    fs = Fs(workdir / "site", archive=f"file://{workdir / 'archive'}")
    fs.root.mkdir()
    fs.create()
    _set_archive(fs, interval=1)
    try:
        fs.mount()
        populate(fs.mnt)
        before = tree(fs.mnt)
        snap(fs, "create", "dr", "--lock-until", "2099-01-01")
        shutil.rmtree(fs.mnt / "study")
        fs.wait_replicated()
        ro = workdir / "ro"
        ro.mkdir()
        run_vnafs("mount", "--archive-only", "--key-file", str(fs.key), "--cache",
                  str(workdir / "cache"), str(fs.archive), str(ro))
        try:
            assert tree(ro / SNAP / "dr") == before
        finally:
            run_vnafs("umount", str(ro))
        fs.kill9()
        shutil.rmtree(fs.hot)
        run_vnafs("restore", "--key-file", str(fs.key), "--no-progress", str(fs.archive),
                  str(fs.hot))
        fs.mount()
        assert tree(fs.mnt / SNAP / "dr") == before
        res = snap(fs, "delete", "dr", check=False)
        assert res.returncode == 1 and "locked" in res.stderr
    finally:
        fs.cleanup()


def test_dicom_views_inside_a_snapshot_are_those_of_its_time(fs: Fs) -> None:
    from tools.gen_studies import write_ct_series

    made = write_ct_series(fs.mnt / "pacs", seed=11, count=3)
    assert fs.wait_indexed()["instances"] == 3
    views_before = tree(fs.mnt / ".dicom" / "by-study")
    snap(fs, "create", "s")
    os.unlink(fs.mnt / "pacs" / made[0].path)  # the live index forgets this instance
    write_ct_series(fs.mnt / "pacs2", seed=12, count=2)
    assert fs.wait_indexed()["instances"] == 4
    assert tree(fs.mnt / ".dicom" / "by-study") != views_before
    inside = fs.mnt / SNAP / "s" / ".dicom" / "by-study"
    assert tree(inside) == views_before
    # A reindex rebuilds the live index record by record; the snapshot's stays as it was.
    live_views = tree(fs.mnt / ".dicom" / "by-study")
    run_vnafs("reindex", str(fs.mnt))
    assert fs.wait_indexed()["instances"] == 4
    assert tree(fs.mnt / ".dicom" / "by-study") == live_views
    assert tree(inside) == views_before
    leaf = next(p for p in inside.rglob("*.dcm"))
    assert os.lstat(leaf).st_ino >> 40 == int(listing(fs)[0]["id"])  # type: ignore[call-overload]
    with pytest.raises(OSError) as exc:
        os.unlink(leaf)
    assert exc.value.errno == errno.EROFS


def test_nfs_style_handles_into_a_snapshot_survive_remount(new_fs: Fs) -> None:
    from tests.test_durability import _drop_caches, _handle, _open_by_handle

    cfg = new_fs.hot / "vnafs.toml"
    cfg.write_text(cfg.read_text().replace("visible = false", "visible = true"))
    fs = new_fs.mount()
    assert SNAP in os.listdir(fs.mnt)  # what the kernel needs to reconnect the handles
    populate(fs.mnt)
    snap(fs, "create", "h")
    (fs.mnt / "notes.txt").write_text("changed later\n")
    s = fs.mnt / SNAP / "h"
    handles = {p: _handle(s / p) for p in ("notes.txt", "study/series", "study")}
    fs.umount()
    fs.mount()
    _drop_caches()
    fd = _open_by_handle(fs.mnt, handles["notes.txt"])
    try:
        assert os.read(fd, 100) == b"first version\n"
    finally:
        os.close(fd)
    fd = _open_by_handle(fs.mnt, handles["study/series"])
    try:
        # `..` of a snapshot directory known only by its handle: lookup(dir, "..").
        assert os.stat("..", dir_fd=fd).st_ino == os.lstat(s / "study").st_ino
        assert sorted(os.listdir(fd)) == ["1.dcm", "2.dcm"]
    finally:
        os.close(fd)
