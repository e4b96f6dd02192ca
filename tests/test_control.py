"""The control socket and the mount command as an administrator meets them.

Why this exists: each test reproduces a fault found by reading the code or by using vnafs
(issue "a house the next engineer can change", section 6): `status` blocking every FUSE request
while it decrypted the block records, a handler's missing field answered as "unknown request",
a read-only archive mount refusing `find` and `snapshot list`, and a Python traceback from
`vnafs mount` on the mount point of a killed daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pydicom.data

from tests.conftest import Fs, _mounted, run_vnafs
from vnafs.control import control_request
from vnafs.keys import resolve_kek_source
from vnafs.meta.db import u64
from vnafs.meta.records import RefCount
from vnafs.store.lifecycle import open_store


def _raw_request(hot: Path, line: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(hot / "control.sock"))
        sock.sendall(line + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def test_unknown_request_and_missing_field_are_told_apart(fs: Fs) -> None:
    unknown = _raw_request(fs.hot, b'{"op": "no_such_thing"}')
    assert unknown["ok"] is False and "unknown request 'no_such_thing'" in str(unknown["error"])
    missing = _raw_request(fs.hot, b'{"op": "snapshot_delete"}')
    assert missing["ok"] is False
    assert missing["error"] == "bad control request: field 'name' is missing"
    garbage = _raw_request(fs.hot, b"not json")
    assert garbage == {"ok": False, "error": "bad control request: not a JSON object"}
    # A refused operation is its own one-line error, and the daemon goes on answering.
    refused = _raw_request(fs.hot, b'{"op": "snapshot_delete", "name": "nope"}')
    assert refused["ok"] is False and "nope" in str(refused["error"])
    assert fs.status()["health"] == "ok"
    assert "Traceback" not in fs.log()


def _add_block_records(fs: Fs, count: int) -> None:
    """Give the unmounted store `count` block records (what `status` has to count), fast:
    written straight into LMDB, so the test does not have to store `count` MiB first."""
    store = open_store(fs.hot, resolve_kek_source(str(fs.key), None))
    try:
        with store.db.begin(write=True) as txn:
            for i in range(count):
                block_id = u64(i) * 4
                store.db.put(txn, "refs", block_id, RefCount(0, 2, 1000).pack())
    finally:
        store.close()


def test_stat_answers_while_status_counts_a_large_store(new_fs: Fs) -> None:
    """`status` decrypts every block record; it must do so off the event loop."""
    _add_block_records(new_fs, 150_000)
    new_fs.mount()
    (new_fs.mnt / "probe").write_bytes(b"x")
    done = threading.Event()
    status_seconds: list[float] = []

    def run_status() -> None:
        start = time.monotonic()
        st = control_request(new_fs.hot, {"op": "status"}, timeout=300)
        status_seconds.append(time.monotonic() - start)
        assert st["blocks"] >= 150_000
        done.set()

    worker = threading.Thread(target=run_status)
    worker.start()
    time.sleep(0.05)
    latencies = []
    try:
        while not done.is_set():
            start = time.monotonic()
            os.stat(new_fs.mnt / "probe")
            os.listdir(new_fs.mnt)
            latencies.append(time.monotonic() - start)
            time.sleep(0.01)
    finally:
        worker.join(timeout=300)
    assert status_seconds, "status did not answer"
    # Relative, not a timing threshold: while status ran for T seconds, every stat of the
    # mount answered in a small fraction of T (on the loop it waited the whole T).
    assert len(latencies) >= 5, f"status took only {status_seconds[0]:.2f} s: grow the store"
    assert max(latencies) < status_seconds[0] / 4, (max(latencies), status_seconds[0])


def test_archive_only_mount_answers_find_and_snapshot_list(workdir: Path) -> None:
    archive = workdir / "archive"
    fs = Fs(workdir / "site", archive=f"file://{archive}")
    fs.root.mkdir()
    fs.create()
    ro = workdir / "ro"
    ro.mkdir()
    try:
        fs.mount()
        ct = pydicom.data.get_testdata_file("CT_small.dcm")
        assert ct is not None
        shutil.copyfile(ct, fs.mnt / "ct.dcm")
        study = str(pydicom.dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
        fs.wait_indexed()
        run_vnafs("snapshot", "create", str(fs.mnt), "first")
        fs.wait_replicated()
        run_vnafs("mount", "--archive-only", "--key-file", str(fs.key), "--cache",
                  str(workdir / "cache"), str(fs.archive), str(ro))
        found = json.loads(run_vnafs("find", str(ro), "--study", study, "--json").stdout)
        assert [s["study"] for s in found] == [study]
        assert json.loads(run_vnafs("find", str(ro), "--problems", "--json").stdout) == []
        snaps = json.loads(run_vnafs("snapshot", "list", str(ro), "--json").stdout)
        assert [s["name"] for s in snaps] == ["first"]
        res = run_vnafs("snapshot", "create", str(ro), "second", check=False)
        assert res.returncode == 1
        assert res.stderr.strip() == ("vnafs: this is a read-only archive mount: create, "
                                      "delete and lock snapshots on the mount of the hot store")
    finally:
        if _mounted(ro):
            run_vnafs("umount", str(ro), check=False)
        fs.cleanup()


def test_mount_after_kill_clears_the_dead_mount_point(new_fs: Fs) -> None:
    new_fs.mount()
    (new_fs.mnt / "kept").write_bytes(b"acknowledged")
    pid = new_fs.pid()
    assert pid is not None
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while (Path(f"/proc/{pid}").exists() and time.monotonic() < deadline):
        time.sleep(0.05)
    assert _mounted(new_fs.mnt)  # the kernel still has the dead mount
    res = run_vnafs("mount", "--key-file", str(new_fs.key), "-o", "allow_other",
                    str(new_fs.hot), str(new_fs.mnt), check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.strip() == (f"vnafs: cleared the dead mount at {new_fs.mnt} left by a "
                                  "stopped daemon")
    assert (new_fs.mnt / "kept").read_bytes() == b"acknowledged"
    assert "Traceback" not in new_fs.log()


def test_mount_on_a_dead_mount_of_another_store_is_refused(workdir: Path) -> None:
    first = Fs(workdir / "one")
    second = Fs(workdir / "two")
    for fs in (first, second):
        fs.root.mkdir()
        fs.create()
    try:
        first.mount()
        first_pid = first.pid()
        assert first_pid is not None
        os.kill(first_pid, 9)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{first_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        res = run_vnafs("mount", "--key-file", str(second.key), str(second.hot),
                        str(first.mnt), check=False)
        assert res.returncode == 1
        assert "Traceback" not in res.stderr
        assert res.stderr.strip() == (f"vnafs: mount point {first.mnt} is a dead FUSE mount of "
                                      f"something else: run fusermount3 -u {first.mnt} first")
    finally:
        first.cleanup()
        second.cleanup()


def test_wait_idle_returns_once_closed_files_are_sealed_and_indexed(fs: Fs) -> None:
    """`wait_idle` (what tools/bench.py's "sustained" figures end with): after it, nothing of
    the files written so far is waiting for the indexer."""
    src = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    (fs.mnt / "study").mkdir()
    for i in range(20):
        shutil.copyfile(src, fs.mnt / "study" / f"IM{i:03d}.dcm")
    started = time.monotonic()
    answer = control_request(fs.hot, {"op": "wait_idle"}, timeout=120)
    assert 0 <= answer["seconds"] <= time.monotonic() - started + 0.1
    st = fs.status()
    assert st["dicom"]["pending"] == 0 and st["dirty_blocks"] == 0
    assert st["dicom"]["instances"] >= 1
    # Idle already: it answers again (nothing to wait for).
    assert control_request(fs.hot, {"op": "wait_idle"}, timeout=30)["seconds"] >= 0
