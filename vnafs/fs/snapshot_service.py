"""The daemon's snapshot work: requests, schedules, retention, and the version collector.

`meta/snapshots.py` knows what a snapshot is; this module decides when things happen. Requests
from the CLI (through the control socket) and from `mkdir`/`rmdir` in `/.snapshots` run as one
commit each. A background task wakes once a minute to raise the stored clock, take the
snapshots schedules ask for (one per schedule after downtime, not one per missed slot), delete
what retention and expiry allow, and after any deletion the collector frees, in batches of
small transactions so writers never wait long, the record versions no snapshot sees any more.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

import trio

from vnafs import timespec
from vnafs.config import SnapshotConfig
from vnafs.fs.engine import Engine
from vnafs.meta.snapshots import VERSIONED, Snapshot, SnapshotError, Snapshots, default_name
from vnafs.meta.tx import Tx

log = logging.getLogger("vnafs.snapshots")

TICK_SECONDS = 60
NS = 10**9


def parse_until(text: str) -> int:
    """Nanoseconds of a lock or expiry time: a duration from now ("30d") or a UTC date."""
    try:
        return timespec.parse_when(text)
    except ValueError as exc:
        raise SnapshotError(str(exc), errno.EINVAL) from None


class SnapshotService:
    def __init__(self, engine: Engine, snaps: Snapshots, cfg: SnapshotConfig) -> None:
        self.engine = engine
        self.snaps = snaps
        self.cfg = cfg
        self.gc_wakeup = trio.Event()
        self.gc_progress: dict[str, Any] = {"running": False, "table": None,
                                            "versions_freed": 0}

    # -- requests -------------------------------------------------------------------------------

    async def create(self, name: str | None = None, *, lock_until_ns: int = 0,
                     schedule: str = "") -> Snapshot:
        try:
            snap: Snapshot = await self.engine.commit(self.snaps.create, name,
                                                      lock_until_ns=lock_until_ns,
                                                      schedule=schedule)
        except BaseException:
            self.snaps.reload_epoch()
            raise
        log.info("snapshot %d created at epoch %d%s", snap.id, snap.epoch,
                 f" by schedule {schedule}" if schedule else "")
        return snap

    async def delete(self, name: str, *, by: str = "request") -> Snapshot:
        snap: Snapshot = await self.engine.commit(self.snaps.delete, name)
        log.info("snapshot %d deleted (%s)", snap.id, by)
        self.gc_wakeup.set()
        return snap

    async def lock(self, name: str, until_ns: int) -> Snapshot:
        snap: Snapshot = await self.engine.commit(self.snaps.lock, name, until_ns)
        log.info("snapshot %d locked until %s", snap.id,
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until_ns / NS)))
        return snap

    async def listing(self) -> list[dict[str, Any]]:
        def build() -> list[dict[str, Any]]:
            unique = self.snaps.unique_bytes()
            with self.snaps.db.begin() as txn:
                now = self.snaps.now(txn)
                return [{"name": s.name, "id": s.id, "epoch": s.epoch,
                         "created_ns": s.created_ns, "expiry_ns": s.expiry_ns or None,
                         "lock_until_ns": s.lock_until_ns or None,
                         "locked": s.locked(now), "schedule": s.schedule or None,
                         "unique_bytes": unique.get(s.id, 0)} for s in self.snaps.all(txn)]

        result: list[dict[str, Any]] = await trio.to_thread.run_sync(build,
                                                                     limiter=self.engine.io)
        return result

    # -- background -----------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._collector)
            task_status.started()
            while True:
                try:
                    await self.tick()
                except (SnapshotError, OSError) as exc:
                    log.error("scheduled snapshot work failed: %s", exc)
                await trio.sleep(TICK_SECONDS)

    async def tick(self) -> None:
        """Raise the clock, run due schedules, apply retention and expiry."""
        snaps = self.snaps.all()
        if not snaps and not self.cfg.schedule:
            # Nothing the clock protects: no commit (and, with an archive, no replication
            # cycle) every minute on an idle store.
            return
        now: int = await self.engine.commit(lambda tx: self.snaps.tick(tx))
        for sch in self.cfg.schedule:
            mine = sorted((s for s in snaps if s.schedule == sch.name),
                          key=lambda s: s.created_ns)
            # A minute of slack, so a schedule of "1h" does not drift by one tick each hour.
            if not mine or now - mine[-1].created_ns >= (sch.every_s - TICK_SECONDS / 2) * NS:
                name = default_name(now)
                if self.snaps.by_name(name) is None:
                    lock = now + sch.lock_s * NS if sch.lock_s else 0
                    mine.append(await self.create(name, lock_until_ns=lock,
                                                  schedule=sch.name))
            for old in mine[:-sch.keep] if len(mine) > sch.keep else []:
                if not old.locked(now):
                    await self.delete(old.name, by=f"retention of schedule {sch.name}")
        for s in self.snaps.all():
            if s.expiry_ns and now >= s.expiry_ns and not s.locked(now):
                await self.delete(s.name, by="expiry")

    async def _collector(self) -> None:
        while True:
            if not self.snaps.gc_pending():
                await self.gc_wakeup.wait()
            self.gc_wakeup = trio.Event()
            try:
                await self.collect()
            except OSError as exc:
                log.error("snapshot collection failed (%s); it is retried", exc.strerror)
                await trio.sleep(TICK_SECONDS)

    async def collect(self) -> int:
        """Free the record versions no snapshot sees; returns how many."""
        generation = await trio.to_thread.run_sync(self._gc_generation)
        freed = 0
        self.gc_progress.update(running=True, versions_freed=0)
        try:
            for table in VERSIONED:
                self.gc_progress["table"] = table
                key: bytes | None = b""
                while key is not None:
                    key, n = await self.engine.commit(self.snaps.gc_batch, table, key)
                    freed += n
                    self.gc_progress["versions_freed"] = freed
            await self.engine.commit(self._gc_done, generation)
        finally:
            self.gc_progress.update(running=False, table=None)
        if freed:
            log.info("snapshot collection freed %d record versions", freed)
        return freed

    def _gc_generation(self) -> int:
        with self.snaps.db.begin() as txn:
            return self.snaps.db.counter(txn, "snap_gc")

    def _gc_done(self, tx: Tx, generation: int) -> None:
        # A deletion during the pass bumped the counter: its versions may sit in tables
        # already passed, so the flag stays and the collector runs again.
        if self.snaps.db.counter(tx.txn, "snap_gc") == generation:
            self.snaps.gc_done(tx)
        else:
            self.gc_wakeup.set()
