"""Snapshot rules without a mount: the clock that cannot be wound back, locks, retention.

`meta/snapshots.py` and `fs/snapshot_service.py` driven directly (the service through a
minimal engine whose commits are plain write transactions), so wall-clock tricks that a real
mount cannot show (a system clock set back by a year) are testable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from tests.test_meta import write
from vnafs.config import Schedule, SnapshotConfig
from vnafs.fs.snapshot_service import SnapshotService
from vnafs.meta.namespace import Namespace
from vnafs.meta.snapshots import SnapshotError, Snapshots
from vnafs.meta.tx import Tx

DAY = 86400 * 10**9


class Engine:
    """Just enough of fs/engine.py: commits run inline in one write transaction."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.io = trio.CapacityLimiter(2)

    async def commit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.ns.db.begin(write=True) as txn:
            return fn(Tx(txn, time.time_ns()), *args, **kwargs)


@pytest.fixture
def snaps(ns: Namespace) -> Iterator[Snapshots]:
    yield Snapshots(ns)


def test_winding_the_clock_back_unlocks_nothing(snaps: Snapshots) -> None:
    future = time.time_ns() + 365 * DAY
    with snaps.db.begin(write=True) as txn:
        # The highest time seen is a year ahead: as if the clock had been set back a year.
        snaps.db.set_counter(txn, "clock_high", future)
    write(snaps.ns, snaps.create, "s", lock_until_ns=future - DAY // 2)
    # By the system clock (set back) the lock has half a year to run, but time already
    # reached `future` once: the lock is over, and a clock set back cannot revive it.
    write(snaps.ns, snaps.delete, "s")
    write(snaps.ns, snaps.create, "t", lock_until_ns=future + DAY)
    with pytest.raises(SnapshotError, match="locked until"):
        write(snaps.ns, snaps.delete, "t")
    with snaps.db.begin() as txn:
        assert snaps.now(txn) >= future


def test_the_clock_only_moves_forward(snaps: Snapshots) -> None:
    _, _ = write(snaps.ns, snaps.tick)
    with snaps.db.begin() as txn:
        first = snaps.db.counter(txn, "clock_high")
    with snaps.db.begin(write=True) as txn:
        snaps.db.set_counter(txn, "clock_high", first + 10 * DAY)
    now, _ = write(snaps.ns, snaps.tick)
    assert now == first + 10 * DAY  # the system clock is behind: the stored time wins


def test_setting_the_clock_forward_does_not_expire_locks(snaps: Snapshots,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    write(snaps.ns, snaps.create, "s", lock_until_ns=time.time_ns() + DAY)
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 30 * DAY)  # the attacker's clock
    with pytest.raises(SnapshotError, match="locked until"):
        write(snaps.ns, snaps.delete, "s")


def test_lock_and_expiry_only_move_later(snaps: Snapshots) -> None:
    now = time.time_ns()
    write(snaps.ns, snaps.create, "s")
    write(snaps.ns, snaps.lock, "s", now + 2 * DAY)
    with pytest.raises(SnapshotError, match="only move later"):
        write(snaps.ns, snaps.lock, "s", now + DAY)
    with pytest.raises(SnapshotError, match="future"):
        write(snaps.ns, snaps.lock, "s", now - DAY)
    snap, _ = write(snaps.ns, snaps.lock, "s", now + 3 * DAY)
    assert snap.lock_until_ns == snap.expiry_ns == now + 3 * DAY


def test_bad_names(snaps: Snapshots) -> None:
    for bad in (".", "..", "a/b", "x" * 256):
        with pytest.raises(SnapshotError, match="not a valid snapshot name"):
            write(snaps.ns, snaps.create, bad)
    write(snaps.ns, snaps.create, "ok")
    with pytest.raises(SnapshotError, match="exists already"):
        write(snaps.ns, snaps.create, "ok")


async def test_schedule_retention_keeps_the_newest_and_spares_locked(snaps: Snapshots) -> None:
    sch = Schedule("every-3600s", 3600, keep=2, lock_s=0)
    service = SnapshotService(Engine(snaps.ns), snaps, SnapshotConfig(schedule=[sch]))
    old = time.time_ns() - 10 * DAY
    for i in range(4):  # made by the schedule over the last days, the second one locked
        lock = time.time_ns() + DAY if i == 1 else 0
        write(snaps.ns, snaps.create, f"old-{i}", lock_until_ns=lock, schedule=sch.name)
        with snaps.db.begin(write=True) as txn:  # backdate it
            s = snaps.by_name(f"old-{i}", txn)
            assert s is not None
            s.created_ns = old + i * DAY
            snaps.db.put(txn, "snapshots", s.id.to_bytes(8, "big"), s.pack())
    await service.tick()  # the newest is 7 days old: one new snapshot, then retention
    names = [s.name for s in snaps.all()]
    assert len(names) == 3 and "old-1" in names and "old-3" in names
    assert any(n.startswith("@GMT-") for n in names)
    await service.tick()  # nothing is due now
    assert len(snaps.all()) == 3


async def test_expired_snapshots_are_deleted_and_collected(snaps: Snapshots) -> None:
    service = SnapshotService(Engine(snaps.ns), snaps, SnapshotConfig())
    write(snaps.ns, snaps.create, "short", expiry_ns=time.time_ns() - 1)
    write(snaps.ns, snaps.create, "long", expiry_ns=time.time_ns() + DAY)
    await service.tick()
    assert [s.name for s in snaps.all()] == ["long"]
    assert snaps.gc_pending()
    await service.collect()
    assert not snaps.gc_pending()


