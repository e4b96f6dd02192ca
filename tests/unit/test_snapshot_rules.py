"""Snapshot rules without a mount: the clock that cannot be wound back, locks, expiry, retention.

`SnapshotService` and `meta/snapshots.py` over the real engine (tests/unit/harness.py), so
every rule is checked in the write transactions the daemon runs, and wall-clock tricks that a
real mount cannot show (a system clock set back by a year) are testable. (These tests used to
live in tests/test_snapshot_rules.py with a stand-in engine.)
"""

from __future__ import annotations

import errno
import time

import pytest
import trio

from vnafs.config import Schedule, SnapshotConfig
from vnafs.fs.snapshot_service import SnapshotService
from vnafs.meta.db import u64
from vnafs.meta.snapshots import SnapshotError
from vnafs.meta.tx import Tx

from .harness import B, Vfs, pattern

DAY = 86400 * 10**9


async def set_clock_high(vfs: Vfs, value: int) -> None:
    def put(tx: Tx) -> None:
        vfs.store.db.set_counter(tx.txn, "clock_high", value)

    await vfs.engine.commit(put)


async def backdate(vfs: Vfs, name: str, created_ns: int) -> None:
    def put(tx: Tx) -> None:
        snap = vfs.snaps.by_name(name, tx.txn)
        assert snap is not None
        snap.created_ns = created_ns
        vfs.store.db.put(tx.txn, "snapshots", u64(snap.id), snap.pack())

    await vfs.engine.commit(put)


async def refused(match: str, code: int, step: object) -> None:
    with pytest.raises(SnapshotError, match=match) as info:
        await step  # type: ignore[misc]
    assert info.value.errno == code


async def test_winding_the_clock_back_unlocks_nothing(vfs: Vfs) -> None:
    future = time.time_ns() + 365 * DAY
    # The highest time seen is a year ahead: as if the clock had been set back a year.
    await set_clock_high(vfs, future)
    await vfs.snapshots.create("s", lock_until_ns=future - DAY // 2)
    # By the system clock (set back) the lock has half a year to run, but time already
    # reached `future` once: the lock is over, and a clock set back cannot revive it.
    await vfs.snapshots.delete("s")
    await vfs.snapshots.create("t", lock_until_ns=future + DAY)
    await refused("locked until", errno.EPERM, vfs.snapshots.delete("t"))
    with vfs.store.db.begin() as txn:
        assert vfs.snaps.now(txn) >= future


async def test_the_clock_only_moves_forward(vfs: Vfs) -> None:
    await vfs.engine.commit(vfs.snaps.tick)
    with vfs.store.db.begin() as txn:
        first = vfs.store.db.counter(txn, "clock_high")
    assert abs(first - time.time_ns()) < 60 * 10**9
    await set_clock_high(vfs, first + 10 * DAY)
    now = await vfs.engine.commit(vfs.snaps.tick)
    assert now == first + 10 * DAY  # the system clock is behind: the stored time wins


async def test_setting_the_clock_forward_does_not_expire_locks(
        vfs: Vfs, monkeypatch: pytest.MonkeyPatch) -> None:
    await vfs.snapshots.create("s", lock_until_ns=time.time_ns() + DAY)
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 30 * DAY)  # the attacker's clock
    await refused("locked until", errno.EPERM, vfs.snapshots.delete("s"))


async def test_a_clock_step_within_the_slack_is_believed(
        vfs: Vfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the rule above: the trusted time may run ahead of the monotonic
    clock by five minutes (NTP steps, a suspended VM), so a lock that ended by then is over."""
    await vfs.snapshots.create("s", lock_until_ns=time.time_ns() + 60 * 10**9)
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 120 * 10**9)
    await vfs.snapshots.delete("s")
    assert vfs.snaps.all() == []


async def test_lock_and_expiry_only_move_later(vfs: Vfs) -> None:
    now = time.time_ns()
    await vfs.snapshots.create("s")
    await vfs.snapshots.lock("s", now + 2 * DAY)
    await refused("only move later", errno.EPERM, vfs.snapshots.lock("s", now + DAY))
    await refused("future", errno.EINVAL, vfs.snapshots.lock("s", now - DAY))
    await refused("no snapshot named", errno.ENOENT, vfs.snapshots.lock("nope", now + DAY))
    snap = await vfs.snapshots.lock("s", now + 3 * DAY)
    assert snap.lock_until_ns == snap.expiry_ns == now + 3 * DAY
    await refused("locked until", errno.EPERM, vfs.snapshots.delete("s"))
    [listed] = await vfs.snapshots.listing()
    assert listed["locked"] and listed["lock_until_ns"] == now + 3 * DAY


async def test_bad_names_and_duplicates_change_nothing(vfs: Vfs) -> None:
    epoch = vfs.ns.epoch
    for bad in (".", "..", "a/b", "x" * 256, ""):
        if bad:
            await refused("not a valid snapshot name", errno.EINVAL, vfs.snapshots.create(bad))
    snap = await vfs.snapshots.create("ok")
    assert snap.epoch == epoch and vfs.ns.epoch == epoch + 1
    await refused("exists already", errno.EEXIST, vfs.snapshots.create("ok"))
    assert vfs.ns.epoch == epoch + 1  # a refused create does not advance the epoch
    with vfs.store.db.begin() as txn:
        assert vfs.store.db.counter(txn, "epoch") == epoch + 1
    default = await vfs.snapshots.create()  # the Previous Versions name of now
    assert default.name.startswith("@GMT-") and len(default.name) == len("@GMT-2026.11.22-08.00.00")


async def test_schedule_retention_keeps_the_newest_and_spares_locked(vfs: Vfs) -> None:
    sch = Schedule("every-3600s", 3600, keep=2, lock_s=0)
    service = SnapshotService(vfs.engine, vfs.snaps, SnapshotConfig(schedule=[sch]))
    old = time.time_ns() - 10 * DAY
    for i in range(4):  # made by the schedule over the last days, the second one locked
        lock = time.time_ns() + DAY if i == 1 else 0
        await service.create(f"old-{i}", lock_until_ns=lock, schedule=sch.name)
        await backdate(vfs, f"old-{i}", old + i * DAY)
    await service.tick()  # the newest is 7 days old: one new snapshot, then retention
    names = [s.name for s in vfs.snaps.all()]
    assert len(names) == 3 and "old-1" in names and "old-3" in names
    assert any(n.startswith("@GMT-") for n in names)
    await service.tick()  # nothing is due now
    assert len(vfs.snaps.all()) == 3


async def test_expired_snapshots_are_deleted_and_their_blocks_collected(vfs: Vfs) -> None:
    ino = await vfs.write_file(b"f", pattern(2 * B, seed=1))
    first = {r.block_id for r in vfs.block_refs(ino).values()}
    await vfs.engine.commit(vfs.snaps.create, "short", expiry_ns=time.time_ns() - 1)
    await vfs.engine.commit(vfs.snaps.create, "long", expiry_ns=time.time_ns() + DAY)
    vfs.open(ino)
    await vfs.files.setattr(ino, {"size": 0})  # the content now lives in the snapshots only
    await vfs.write(ino, 0, b"new")
    await vfs.close(ino)
    await vfs.snapshots.tick()
    assert [s.name for s in vfs.snaps.all()] == ["long"]
    assert vfs.snaps.gc_pending()
    await vfs.snapshots.collect()
    assert not vfs.snaps.gc_pending()
    assert first <= vfs.block_files()  # "long" still sees them
    [long] = vfs.snaps.all()
    assert await vfs.read_in_snapshot(long, ino) == pattern(2 * B, seed=1)
    unique = {s["name"]: s["unique_bytes"] for s in await vfs.snapshots.listing()}
    assert unique["long"] == sum(vfs.block_path(b).stat().st_size for b in first)
    await vfs.snapshots.delete("long")
    await vfs.snapshots.collect()
    assert not first & vfs.block_files()
    assert await vfs.read_file(ino) == b"new"


async def test_the_background_task_collects_after_a_delete(vfs: Vfs) -> None:
    """`SnapshotService.run` as the daemon starts it: a deletion wakes the collector, which
    frees what only the deleted snapshot saw without anybody asking."""
    ino = await vfs.write_file(b"f", pattern(B, seed=2))
    kept = {r.block_id for r in vfs.block_refs(ino).values()}
    await vfs.snapshots.create("s")
    await vfs.unlink(b"f")
    await vfs.settle()
    assert kept <= vfs.block_files()
    await vfs.nursery.start(vfs.snapshots.run)
    await vfs.snapshots.delete("s")
    with trio.fail_after(10):
        while vfs.snaps.gc_pending() or vfs.snapshots.gc_progress["running"]:
            await trio.sleep(0.01)
    await vfs.settle()
    assert not kept & vfs.block_files()
    assert not vfs.has_inode_record(ino)
