"""Faults found by running vnafs the way hospitals run it: full disks, kill -9, first use.

Why this exists: each test reproduces one report of the hardening issue (disk full and
crashes, first use) against a real mount made by the real command line, and pins the fix:
a failed close leaves the file as readers see it, health reflects the present, a crash's
leftover block files are collected by the next mount and are no damage to fsck, fsck
checks the archive before it calls a block lost, mkfs writes the archive at once, every
time takes a date or a duration, and progress bars stay out of logs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BUCKET, Fs, run_vnafs
from tests.requires import need_program
from tools.servers import SeaweedFS

MIB = 1 << 20


def _blocks(fs: Fs) -> list[Path]:
    return [p for p in (fs.hot / "blocks").rglob("*") if p.is_file()]


@pytest.fixture
def small_fs(workdir: Path) -> Iterator[Fs]:
    """A mounted file system whose hot store is its own 24 MiB tmpfs."""
    need_program("mount", "mount")
    fs = Fs(workdir)
    fs.hot.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(fs.hot)],
                   check=True)
    try:
        fs.create()
        yield fs.mount()
    finally:
        fs.cleanup()
        if subprocess.run(["umount", str(fs.hot)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(fs.hot)], capture_output=True)


def _write_until_full(path: Path, mib: int, mode: int = os.O_WRONLY | os.O_CREAT) -> list[int]:
    """Write `mib` MiB of random data in 1 MiB writes, then close; the errnos seen."""
    errors = []
    fd = os.open(path, mode, 0o644)
    try:
        for _ in range(mib):
            try:
                os.write(fd, os.urandom(MIB))
            except OSError as exc:
                errors.append(exc.errno)
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            errors.append(exc.errno)
    return errors


def test_failed_close_leaves_what_readers_see_and_health_recovers(small_fs: Fs) -> None:
    fs = small_fs
    kept = os.urandom(MIB)
    with open(fs.mnt / "kept", "wb") as f:
        f.write(kept)
        os.fsync(f.fileno())

    errors = _write_until_full(fs.mnt / "big", 49)
    assert errno.ENOSPC in errors, errors
    # What a reader sees right after the failed close stays what it is (it used to show
    # 49 MiB, then 0 bytes two seconds later).
    first = ((fs.mnt / "big").stat().st_size, (fs.mnt / "big").read_bytes())
    time.sleep(2.5)  # past the kernel's attribute timeout
    again = ((fs.mnt / "big").stat().st_size, (fs.mnt / "big").read_bytes())
    assert first == again == (0, b"")  # dropped at once: nothing of it was committed

    # A failed append to a committed file leaves the committed file.
    errors = _write_until_full(fs.mnt / "kept", 40, os.O_WRONLY | os.O_APPEND)
    assert errno.ENOSPC in errors, errors
    assert (fs.mnt / "kept").stat().st_size == MIB
    time.sleep(2.5)
    assert (fs.mnt / "kept").read_bytes() == kept

    st = fs.status()
    assert st["health"] == "degraded" and st["problems"]["active"], st["problems"]

    # Space is back: health follows the present, the history stays in the counters.
    (fs.mnt / "big").unlink()
    new = os.urandom(2 * MIB)
    with open(fs.mnt / "after", "wb") as f:
        f.write(new)
        os.fsync(f.fileno())
    st = fs.status()
    assert st["health"] == "ok", st["problems"]
    assert st["problems"]["active"] == []
    assert st["problems"]["problems"].get("block_write", 0) > 0
    human = run_vnafs("status", str(fs.mnt)).stdout
    assert "health: ok" in human and "now: none; since mount: block_write" in human
    assert (fs.mnt / "after").read_bytes() == new
    assert (fs.mnt / "kept").read_bytes() == kept


def test_leftover_blocks_of_a_crash_are_collected_and_are_no_damage(fs: Fs) -> None:
    # Full blocks are sealed in the background while the writer goes on: after kill -9
    # they are block files no committed record names.
    (fs.mnt / "committed").write_bytes(os.urandom(2 * MIB))
    before = len(_blocks(fs))
    fd = os.open(fs.mnt / "never-closed", os.O_WRONLY | os.O_CREAT)
    for _ in range(5):
        os.write(fd, os.urandom(MIB))
    deadline = time.monotonic() + 30
    while len(_blocks(fs)) < before + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_blocks(fs)) == before + 5
    fs.kill9()
    with contextlib.suppress(OSError):
        os.close(fd)  # the connection is gone; the kernel drops the handle anyway

    res = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot), check=False)
    assert res.returncode == 0, res.stdout
    assert "DAMAGE" not in res.stdout
    assert "leftover from an interrupted run: block files of writes never committed: 5" \
        in res.stdout
    assert res.stdout.strip().endswith("clean")

    fs.mount()  # the mount's own recovery collects them
    deadline = time.monotonic() + 30
    while len(_blocks(fs)) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_blocks(fs)) == before
    assert "removed 5 block files of writes that were never committed" in fs.log()
    assert (fs.mnt / "committed").stat().st_size == 2 * MIB
    fs.umount()
    res = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot))
    assert "leftover" not in res.stdout and res.stdout.strip().endswith("clean")


@pytest.fixture
def archived(workdir: Path) -> Iterator[Fs]:
    fs = Fs(workdir / "site", archive=f"file://{workdir / 'archive'}")
    fs.root.mkdir()
    fs.create()
    try:
        yield fs.mount()
    finally:
        fs.cleanup()


def test_fsck_checks_the_archive_before_calling_a_block_lost(archived: Fs) -> None:
    fs = archived
    data = os.urandom(3 * MIB)
    (fs.mnt / "study").write_bytes(data)
    fs.wait_replicated()
    fs.umount()
    lost = sorted(_blocks(fs))[0]
    lost.unlink()

    res = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot), check=False)
    assert res.returncode == 2, res.stdout
    assert "DAMAGE" not in res.stdout
    assert ("blocks missing or damaged in the hot store: 1 (intact in the archive: reads "
            "recall them; fsck --repair fetches them now)") in res.stdout
    res = run_vnafs("fsck", "--repair", "--key-file", str(fs.key), str(fs.hot))
    assert "fetched back from the archive" in res.stdout
    assert lost.exists()
    assert run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot)).stdout.strip() \
        .endswith("clean")

    # Gone from both: that is damage, named by block id.
    lost.unlink()
    archive = Path(str(fs.archive).removeprefix("file://"))
    (archive / "blocks" / lost.parent.name / lost.name).unlink()
    res = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot), check=False)
    assert res.returncode == 2
    assert f"DAMAGE: block {lost.parent.name}{lost.name} is missing" in res.stdout
    fs.mount()
    with pytest.raises(OSError) as exc:
        (fs.mnt / "study").read_bytes()
    assert exc.value.errno == errno.EIO


def test_mkfs_checks_and_writes_the_archive_at_once(workdir: Path) -> None:
    key = workdir / "site.key"
    run_vnafs("keygen", str(key))
    missing = workdir / "no-such-archive"
    res = run_vnafs("mkfs", "--key-file", str(key), "--archive", f"file://{missing}",
                    str(workdir / "hot"), check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == (f"vnafs: archive directory {missing} does not exist: create "
                                  "it (mkdir -p), or mount the archive file system first")
    assert not missing.exists() and not (workdir / "hot").exists()

    archive = workdir / "archive"
    archive.mkdir()
    run_vnafs("mkfs", "--key-file", str(key), "--archive", f"file://{archive}",
              str(workdir / "hot"))
    assert (archive / "keyring").read_bytes() == (workdir / "hot" / "keyring").read_bytes()
    assert (archive / "meta" / "HEAD").exists()
    # Never mounted, and still a restore gives a working (empty) file system.
    run_vnafs("restore", "--key-file", str(key), f"file://{archive}", str(workdir / "again"))
    mnt = workdir / "mnt"
    mnt.mkdir()
    run_vnafs("mount", "--key-file", str(key), str(workdir / "again"), str(mnt))
    try:
        assert os.listdir(mnt) == []
        (mnt / "works").write_bytes(b"yes")
    finally:
        run_vnafs("umount", str(mnt))


def test_mkfs_refuses_a_missing_bucket_and_leaves_nothing(workdir: Path,
                                                        seaweed: SeaweedFS) -> None:
    key = workdir / "site.key"
    run_vnafs("keygen", str(key))
    env = {**os.environ, **seaweed.env()}
    url = seaweed.url("no-such-bucket-" + uuid.uuid4().hex[:6], "site")
    res = run_vnafs("mkfs", "--key-file", str(key), "--archive", url, str(workdir / "hot"),
                    env=env, check=False)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr and not (workdir / "hot").exists()
    good = seaweed.url(BUCKET, uuid.uuid4().hex[:8] + "/site")
    run_vnafs("mkfs", "--key-file", str(key), "--archive", good, str(workdir / "hot"), env=env)
    from vnafs.archive.backend import open_backend

    names = {name for name, _ in open_backend(good, env=seaweed.env()).list("")}
    assert {"keyring", "config", "meta/HEAD"} <= names


def test_every_time_takes_a_date_or_a_duration(fs: Fs) -> None:
    run_vnafs("snapshot", "create", str(fs.mnt), "a", "--lock-until", "2h")
    run_vnafs("snapshot", "create", str(fs.mnt), "b")
    run_vnafs("snapshot", "lock", str(fs.mnt), "b", "--until", "30d")
    future = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 90 * 86400))
    run_vnafs("snapshot", "create", str(fs.mnt), "c", "--lock-until", future)
    snaps = {s["name"]: s for s in json.loads(
        run_vnafs("snapshot", "list", str(fs.mnt), "--json").stdout)}
    now = time.time_ns()
    assert abs(snaps["a"]["lock_until_ns"] - (now + 2 * 3600 * 10**9)) < 120 * 10**9
    assert abs(snaps["b"]["lock_until_ns"] - (now + 30 * 86400 * 10**9)) < 120 * 10**9
    assert snaps["c"]["lock_until_ns"] > now + 88 * 86400 * 10**9
    res = run_vnafs("snapshot", "lock", str(fs.mnt), "b", "--until", "soon", check=False)
    assert res.returncode == 1 and res.stderr.strip() == (
        "vnafs: 'soon' is neither a duration nor a date: write a duration from now such as "
        "30d or 10y, or a UTC date YYYY-MM-DD[Thh:mm:ss]")


def test_no_progress_bar_when_not_on_a_terminal(archived: Fs, workdir: Path) -> None:
    (archived.mnt / "f").write_bytes(os.urandom(2 * MIB))
    archived.wait_replicated()
    res = run_vnafs("restore", "--key-file", str(archived.key), str(archived.archive),
                    str(workdir / "restored"))
    assert "restoring blocks" not in res.stderr and "%|" not in res.stderr, res.stderr
    assert res.stderr == ""
