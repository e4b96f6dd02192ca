"""Tiering: the hot store as a bounded cache over the archive, with real mounts and archives.

Why this exists: evicting is the one operation in vnafs that deletes the hot copy of data on
purpose, so each safety rule of docs/architecture.md section 11 has a test here: only blocks the
archive verifiably holds leave, never those of pinned studies, open files or data newer than
the recovery point; kill -9 at any moment leaves every file readable; snapshots and restores
read evicted data back; an archive outage fails only the reads that need it. Studies are made
of DICOM files with random pixel data, so their stored size is their size and the watermark
arithmetic below is exact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.uid import generate_uid

from tests.conftest import BUCKET, Fs, run_vnafs, set_config
from tools.servers import SeaweedFS

MIB = 1 << 20


def make_study(out: Path, *, patient: str, files: int, size: int = MIB, date: str = "20240101",
               issuer: str = "HOSP") -> str:
    """A study of `files` instances whose pixel data is `size` random bytes; its UID."""
    src = pydicom.data.get_testdata_file("CT_small.dcm")
    assert src is not None
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        ds = pydicom.dcmread(src)
        ds.PatientID = patient
        ds.IssuerOfPatientID = issuer
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = date
        ds.InstanceNumber = i + 1
        ds.PixelData = os.urandom(size)
        ds.save_as(out / f"{i:03d}.dcm")
    return str(study)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*"))
            if p.is_file()}


def state_of(path: Path) -> str:
    return os.getxattr(path, "user.vnafs.state").decode()


def drop_caches(fs: Fs) -> None:
    """Make reads come from the daemon, not the kernel's page cache or the block cache."""
    fs.umount()
    fs.mount()


def tiering(fs: Fs) -> dict[str, Any]:
    return dict(fs.status()["tiering"])


@pytest.fixture
def tiered(workdir: Path) -> Iterator[Fs]:
    """A file system with a file:// archive replicating every second, min_age 0."""
    fs = Fs(workdir / "site", archive=f"file://{workdir / 'archive'}")
    fs.root.mkdir()
    fs.create()
    set_config(fs, "archive", interval=1, recall_timeout=10)
    set_config(fs, "tiering", min_age="0s")
    try:
        yield fs.mount()
    finally:
        fs.cleanup()


def wait_for(check: Any, timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} not reached in {timeout} s")


# -- by hand ------------------------------------------------------------------------------------


def test_evict_recall_pin_by_study_and_path(tiered: Fs) -> None:
    fs = tiered
    uid = make_study(fs.mnt / "pacs" / "a", patient="P-TIER-1", files=3)
    other = fs.mnt / "other.bin"
    other.write_bytes(os.urandom(2 * MIB))
    before = tree_digests(fs.mnt)
    fs.wait_indexed()
    fs.wait_replicated()
    files = sorted((fs.mnt / "pacs" / "a").iterdir())
    assert {state_of(f) for f in files} == {"archived"}

    out = run_vnafs("evict", str(fs.mnt), "--study", uid).stdout
    assert out.startswith("evicted 3 blocks") or out.startswith("evicted 6 blocks"), out
    assert {state_of(f) for f in files} == {"evicted"}
    st = tiering(fs)
    assert st["evicted_bytes"] >= 3 * MIB and st["evictions"] == 1
    assert st["evicted_studies"] == 1
    # ls, stat, find and the views never recall.
    recalls = st["recall"]["recalls"]
    assert len(os.listdir(fs.mnt / "pacs" / "a")) == 3
    assert json.loads(run_vnafs("find", str(fs.mnt), "--study", uid, "--json").stdout)
    assert len(list((fs.mnt / ".dicom" / "by-study" / uid).rglob("*.dcm"))) == 3
    assert tiering(fs)["recall"]["recalls"] == recalls

    drop_caches(fs)
    # After a remount the evicted bytes are counted from the block table, not since mount.
    counted = wait_for(lambda: (t := tiering(fs))["counted"] and t, what="usage counted")
    assert counted["evicted_bytes"] >= 3 * MIB and counted["evictions"] == 0
    assert tree_digests(fs.mnt) == before  # transparent recall, byte-exact
    assert {state_of(f) for f in files} == {"archived"}

    run_vnafs("evict", str(fs.mnt), str(other))
    assert state_of(other) == "evicted"
    res = json.loads(run_vnafs("recall", "--wait", "--json", str(fs.mnt), str(other)).stdout)
    assert res["fetched_blocks"] == res["total_blocks"] == 2
    assert state_of(other) == "archived"

    run_vnafs("pin", str(fs.mnt), "--study", uid)
    res = run_vnafs("evict", str(fs.mnt), "--study", uid, check=False)
    assert res.returncode == 1 and res.stderr.strip().endswith("is not evicted: it is pinned")
    assert tiering(fs)["pinned_studies"] == 1
    run_vnafs("unpin", str(fs.mnt), "--study", uid)
    run_vnafs("evict", str(fs.mnt), "--study", uid)

    for bad, why in ((["--study", "1.2.3.4.5"], "no study with that StudyInstanceUID"),
                     (["/etc/hostname"], "is not inside the vnafs mount"),
                     ([], "name what to evict")):
        res = run_vnafs("evict", str(fs.mnt), *bad, check=False)
        assert res.returncode == 1 and why in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_open_files_and_unarchived_data_are_never_evicted(tiered: Fs) -> None:
    fs = tiered
    kept = fs.mnt / "open.bin"
    kept.write_bytes(os.urandom(MIB))
    fs.wait_replicated()
    with open(kept, "rb"):
        res = run_vnafs("evict", str(fs.mnt), str(kept), check=False)
        assert res.returncode == 1 and "a file of it is open" in res.stderr
    fs.umount()
    set_config(fs, "archive", interval=3600)  # what is written now stays pending
    fs.mount()
    fresh = fs.mnt / "fresh.bin"
    fresh.write_bytes(os.urandom(MIB))
    assert state_of(fresh) == "pending"
    res = run_vnafs("evict", str(fs.mnt), str(fresh), check=False)
    assert res.returncode == 1 and "not archived yet" in res.stderr
    assert state_of(fresh) == "pending"


# -- automatic ----------------------------------------------------------------------------------


def test_watermarks_evict_least_recently_used_studies_first(tiered: Fs) -> None:
    fs = tiered
    studies = {name: make_study(fs.mnt / "pacs" / name, patient=f"P-{name}", files=4)
               for name in ("a", "b", "c", "d")}
    digests = tree_digests(fs.mnt)
    fs.wait_indexed()
    fs.wait_replicated()
    time.sleep(1.1)
    # Use c and d (reads move their atime), pin b: a is the least recently used.
    for name in ("c", "d"):
        for f in (fs.mnt / "pacs" / name).iterdir():
            f.read_bytes()
    run_vnafs("pin", str(fs.mnt), "--study", studies["b"])
    fs.umount()
    st_before = json.loads(run_vnafs("fsck", "--json", "--no-data", "--key-file", str(fs.key),
                                     str(fs.hot)).stdout)
    assert st_before["clean"]
    fs.mount()
    used = wait_for(lambda: tiering(fs)["counted"] and tiering(fs), what="usage counted")
    used_bytes = used["used_bytes"]
    study = 4 * MIB
    fs.umount()
    # Over the high watermark by half a study; the low one needs exactly one study to go.
    high = used_bytes - study // 2
    low = used_bytes - study + study // 4
    capacity = int(high / 0.85)
    set_config(fs, "tiering", capacity=capacity, low_watermark=f"{100 * low / capacity:.3f}%")
    fs.mount()
    st = wait_for(lambda: (t := tiering(fs))["evictions"] and t, what="an eviction")
    states = {name: {state_of(f) for f in (fs.mnt / "pacs" / name).iterdir()} for name in studies}
    assert st["evictions"] == 1 and st["used_bytes"] <= low + MIB, (st, states, used_bytes, low, capacity)
    states = {name: {state_of(f) for f in (fs.mnt / "pacs" / name).iterdir()}
              for name in studies}
    assert states == {"a": {"evicted"}, "b": {"archived"}, "c": {"archived"},
                      "d": {"archived"}}, states
    drop_caches(fs)
    assert tree_digests(fs.mnt) == digests


def test_a_new_study_prefetches_the_patients_prior_studies(tiered: Fs) -> None:
    fs = tiered
    priors = {name: make_study(fs.mnt / "pacs" / name, patient="P-PRIOR", files=2, date=date)
              for name, date in (("p1", "20220101"), ("p2", "20230101"))}
    other = make_study(fs.mnt / "pacs" / "o", patient="P-OTHER", files=2)
    digests = tree_digests(fs.mnt)
    fs.wait_indexed()
    fs.wait_replicated()
    for uid in (*priors.values(), other):
        run_vnafs("evict", str(fs.mnt), "--study", uid)

    def states(name: str) -> set[str]:
        return {state_of(f) for f in (fs.mnt / "pacs" / name).iterdir()}

    assert states("p1") == states("p2") == states("o") == {"evicted"}
    recalls = tiering(fs)["recall"]["recalls"]
    make_study(fs.mnt / "pacs" / "new", patient="P-PRIOR", files=1, date="20240101")
    fs.wait_indexed()
    wait_for(lambda: states("p1") == states("p2") == {"archived"}, what="priors recalled")
    st = tiering(fs)
    assert st["prefetched_studies"] == 2 and st["recall"]["recalls"] > recalls
    assert states("o") == {"evicted"}  # another patient's study stays in the archive
    # Another new study of the patient: the priors are resident now, nothing is queued.
    make_study(fs.mnt / "pacs" / "new2", patient="P-PRIOR", files=1)
    fs.wait_indexed()
    assert tiering(fs)["prefetched_studies"] == 2
    drop_caches(fs)
    assert {k: v for k, v in tree_digests(fs.mnt).items() if k in digests} == digests


def test_reading_an_evicted_file_recalls_the_rest_of_its_study(tiered: Fs) -> None:
    fs = tiered
    uid = make_study(fs.mnt / "pacs" / "s", patient="P-READ", files=6)
    other = make_study(fs.mnt / "pacs" / "o", patient="P-READ-2", files=2)
    digests = tree_digests(fs.mnt)
    fs.wait_indexed()
    fs.wait_replicated()
    for study in (uid, other):
        run_vnafs("evict", str(fs.mnt), "--study", study)
    drop_caches(fs)
    files = sorted((fs.mnt / "pacs" / "s").iterdir())
    assert files[0].read_bytes()  # a viewer opens the first image of the study...
    # ...and the rest of the study comes back in the background, before anyone reads it.
    wait_for(lambda: {state_of(f) for f in files[1:]} == {"archived"},
             what="the rest of the study recalled")
    assert tiering(fs)["study_read_aheads"] == 1
    assert {state_of(f) for f in (fs.mnt / "pacs" / "o").iterdir()} == {"evicted"}
    assert tree_digests(fs.mnt) == digests

    # Off: a read recalls only what it reads.
    run_vnafs("evict", str(fs.mnt), "--study", uid)
    fs.umount()
    set_config(fs, "tiering", read_ahead_studies=False)
    fs.mount()
    assert files[0].read_bytes()
    time.sleep(2)
    assert {state_of(f) for f in files[1:]} == {"evicted"}


def test_snapshot_only_blocks_go_first_and_snapshots_read_evicted_data(tiered: Fs) -> None:
    fs = tiered
    old = fs.mnt / "old.bin"
    old.write_bytes(os.urandom(3 * MIB))
    expect = digest(old)
    fs.wait_replicated()
    run_vnafs("snapshot", "create", str(fs.mnt), "before")
    old.unlink()  # now only the snapshot names its blocks
    live = fs.mnt / "live.bin"
    live.write_bytes(os.urandom(3 * MIB))
    fs.wait_replicated()
    used = wait_for(lambda: tiering(fs)["counted"] and tiering(fs), what="usage counted")
    fs.umount()
    capacity = int((used["used_bytes"] - MIB) / 0.85)
    set_config(fs, "tiering", capacity=capacity,
               low_watermark=f"{100 * (used['used_bytes'] - 2 * MIB) / capacity:.3f}%")
    fs.mount()
    wait_for(lambda: tiering(fs)["evictions"], what="an eviction")
    assert state_of(live) == "archived"  # the snapshot-only blocks were enough
    snap = fs.mnt / ".snapshots" / "before" / "old.bin"
    assert digest(snap) == expect


def test_restore_of_a_store_with_evicted_data(tiered: Fs, workdir: Path) -> None:
    fs = tiered
    uid = make_study(fs.mnt / "s", patient="P-REST", files=2)
    before = tree_digests(fs.mnt)
    fs.wait_indexed()
    fs.wait_replicated()
    run_vnafs("evict", str(fs.mnt), "--study", uid)
    fs.wait_replicated()
    run_vnafs("restore", "--key-file", str(fs.key), str(fs.archive), str(workdir / "r"))
    mnt = workdir / "r-mnt"
    mnt.mkdir()
    run_vnafs("mount", "--key-file", str(fs.key), str(workdir / "r"), str(mnt))
    try:
        assert tree_digests(mnt) == before
    finally:
        run_vnafs("umount", str(mnt))
    fs.umount()
    res = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot))
    assert "evicted to the archive" in res.stdout and res.stdout.strip().endswith("clean")


# -- concurrency and crashes --------------------------------------------------------------------


def test_concurrent_readers_share_one_fetch_per_block(tiered: Fs) -> None:
    fs = tiered
    big = fs.mnt / "big.bin"
    big.write_bytes(os.urandom(24 * MIB))
    expect = digest(big)
    fs.wait_replicated()
    run_vnafs("evict", str(fs.mnt), str(big))
    drop_caches(fs)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(digest(big))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expect] * 4
    st = tiering(fs)
    assert st["recall"]["recalls"] == 24, st["recall"]  # one fetch per block
    assert st["time_to_first_byte_p50_s"] is not None


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_kill_during_eviction_leaves_every_file_readable(tiered: Fs, delay: float) -> None:
    fs = tiered
    uid = make_study(fs.mnt / "s", patient="P-KILL", files=12, size=512 << 10)
    before = tree_digests(fs.mnt)
    fs.wait_indexed()
    fs.wait_replicated()
    pid = fs.pid()
    assert pid is not None
    import subprocess

    from tests.conftest import VNAFS, _wait_gone

    proc = subprocess.Popen([VNAFS, "evict", str(fs.mnt), "--study", uid],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    subprocess.run(["fusermount3", "-uz", str(fs.mnt)], capture_output=True)
    proc.wait(timeout=60)
    fs.mount()
    assert tree_digests(fs.mnt) == before  # nothing half-gone
    fs.umount()
    res = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot), check=False)
    assert res.returncode == 0 and "DAMAGE" not in res.stdout, res.stdout


def test_kill_during_recall_leaves_every_file_readable(tiered: Fs) -> None:
    fs = tiered
    big = fs.mnt / "big.bin"
    big.write_bytes(os.urandom(16 * MIB))
    expect = digest(big)
    fs.wait_replicated()
    run_vnafs("evict", str(fs.mnt), str(big))
    run_vnafs("recall", str(fs.mnt), str(big))  # queued, not waited for
    time.sleep(0.05)
    fs.kill9()
    fs.mount()
    assert digest(big) == expect
    assert state_of(big) in ("archived", "partial", "evicted")
    fs.umount()
    res = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot), check=False)
    assert res.returncode == 0 and "DAMAGE" not in res.stdout, res.stdout


# -- archive outage -----------------------------------------------------------------------------


def test_archive_outage_fails_only_reads_that_need_it(workdir: Path,
                                                       seaweed: SeaweedFS) -> None:
    """20 reads of evicted data block on an archive that does not answer (SeaweedFS stopped
    with SIGSTOP, as a dead network looks); each fails with EIO after recall_timeout while
    resident files, listings and writes answer at once."""
    fs = Fs(workdir / "site", archive=seaweed.url(BUCKET, f"{uuid.uuid4().hex[:8]}/outage"),
            env={**os.environ, **seaweed.env()})
    fs.root.mkdir()
    fs.create()
    set_config(fs, "archive", interval=1)
    set_config(fs, "tiering", min_age="0s", recall_timeout="4s")
    try:
        fs.mount()
        cold = [fs.mnt / f"cold{i:02d}.bin" for i in range(20)]
        for path in cold:
            path.write_bytes(os.urandom(256 << 10))
        hot = fs.mnt / "hot.bin"
        hot.write_bytes(os.urandom(4 * MIB))
        fs.wait_replicated()
        for path in cold:
            run_vnafs("evict", str(fs.mnt), str(path), env=fs.env)
        drop_caches(fs)
        hot_digest = digest(hot)
        assert seaweed.proc is not None
        os.kill(seaweed.proc.pid, signal.SIGSTOP)
        try:
            errors: list[int] = []
            started = time.monotonic()

            def read(path: Path) -> None:
                try:
                    path.read_bytes()
                except OSError as exc:
                    errors.append(exc.errno or 0)

            threads = [threading.Thread(target=read, args=(p,)) for p in cold]
            for t in threads:
                t.start()
            time.sleep(0.5)
            # Relative, not a timing threshold: these answer well inside the recall timeout
            # that every blocked read waits for.
            quick = time.monotonic()
            with open(hot, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert digest(hot) == hot_digest
            assert len(os.listdir(fs.mnt)) == 21
            (fs.mnt / "new.bin").write_bytes(b"written during the outage")
            assert time.monotonic() - quick < 2
            for t in threads:
                t.join(timeout=120)
            assert errors == [errno.EIO] * 20
            assert time.monotonic() - started >= 4
            assert fs.log().count("could not be recalled from the archive within 4 s") == 20
            assert fs.status()["health"] == "degraded"
        finally:
            os.kill(seaweed.proc.pid, signal.SIGCONT)
        assert len(cold[0].read_bytes()) == 256 << 10  # back once the archive answers
        # Health follows: recalls work again, replication catches up after its backoff.
        last: dict[str, Any] = {}

        def healthy() -> bool:
            last.update(fs.status())
            return bool(last["health"] == "ok")

        try:
            # Replication retries with backoff of up to a minute after the failed cycles of
            # the outage, each of which may have waited for the client's timeout.
            wait_for(healthy, timeout=240, what="health ok")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {last.get('problems')}; {fs.log()[-3000:]}") from None
    finally:
        fs.cleanup()


# -- the read-only archive mount ----------------------------------------------------------------


def test_archive_only_mount_keeps_a_bounded_block_cache(tiered: Fs, workdir: Path) -> None:
    fs = tiered
    data = fs.mnt / "data.bin"
    data.write_bytes(os.urandom(6 * MIB))
    expect = digest(data)
    fs.wait_replicated()
    ro = workdir / "ro"
    ro.mkdir()
    cache = workdir / "cache"
    run_vnafs("mount", "--archive-only", "--key-file", str(fs.key), "--cache", str(cache),
              str(fs.archive), str(ro))
    try:
        assert digest(ro / "data.bin") == expect
        first = fs_status(ro)["tiering"]
        assert first["resident_bytes"] >= 6 * MIB
        cached = sum(1 for p in (cache / "blocks").rglob("*") if p.is_file())
        assert cached == 6
    finally:
        run_vnafs("umount", str(ro))
    run_vnafs("mount", "--archive-only", "--key-file", str(fs.key), "--cache", str(cache),
              str(fs.archive), str(ro))
    try:
        assert digest(ro / "data.bin") == expect
        assert fs_status(ro)["counters"].get("blocks_recalled", 0) == 0  # from the cache
    finally:
        run_vnafs("umount", str(ro))
        shutil.rmtree(cache, ignore_errors=True)


def fs_status(mnt: Path) -> dict[str, Any]:
    return dict(json.loads(run_vnafs("status", "--json", str(mnt)).stdout))


def test_status_without_archive_says_tiering_is_off(fs: Fs) -> None:
    st = fs.status()["tiering"]
    assert st["mode"] == "off: tiering needs an archive"
    res = run_vnafs("evict", str(fs.mnt), "--study", "1.2.3", check=False)
    assert res.returncode == 1 and "tiering needs an archive" in res.stderr
