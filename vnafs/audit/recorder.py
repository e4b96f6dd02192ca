"""The mounted daemon's side of the access audit: FUSE requests in, chained records out.

Why a module of its own: `fs/operations.py` decides nothing, and the audit has decisions to
make on the hot path that must cost next to nothing there: which opens are reads or writes,
which reads collapse into an earlier record, when to write. This class makes them.

- Changes of the namespace (create, rename, delete) are recorded *in the transaction that makes
  them* (`audited` wraps the namespace function the engine commits): a change that commits has
  its record, one that fails has none, and the chain order is the commit order.
- Opens for reading and the first write after an open for writing have no transaction of their
  own: they are queued on the loop and appended by one background task every `flush_seconds`
  in one transaction on the engine's writer thread (so ingest pays one small commit per second,
  not one per file). A daemon crash loses at most that second of reads and writes.
- Reads collapse twice: on the loop by (pid, inode) within `collapse_seconds`, which costs one
  dict lookup per open, and on the writer thread by (pid, study) once the index has told which
  study the inode belongs to, so a viewer opening 500 instances of a study gives one record.

The process name comes from `/proc/PID/comm`, read on the loop (procfs is kernel memory, no
disk I/O) and kept per pid for `NAME_SECONDS`; a process already gone is recorded as "?".
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from vnafs.audit.chain import AuditLog, Event, study_of
from vnafs.dicom.index import DicomIndex
from vnafs.errors import IntegrityError
from vnafs.fs.engine import Engine
from vnafs.meta.namespace import Namespace
from vnafs.meta.tx import Tx

log = logging.getLogger("vnafs.audit")
T = TypeVar("T")

NAME_SECONDS = 10.0
# Above this many queued events the flusher runs at once instead of at its next tick.
FLUSH_AT = 4096
# Collapse state is pruned of entries older than the window when it grows past this.
PRUNE_AT = 65536
# Events kept for a retry while they cannot be written (a full disk, a damaged chain head);
# beyond this the oldest are dropped and counted as `lost`.
MAX_QUEUE = 1 << 20


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode("utf-8", "replace").strip() or "?"
    except OSError:
        return "?"


class AuditRecorder:
    """Turns requests into audit events (loop) and appends them (writer thread)."""

    def __init__(self, engine: Engine, ns: Namespace, audit_log: AuditLog,
                 index: DicomIndex | None, *, collapse_seconds: float,
                 flush_seconds: float = 1.0,
                 clock: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic,
                 names: Callable[[int], str] = process_name) -> None:
        self.engine = engine
        self.ns = ns
        self.log = audit_log
        self.index = index
        self.collapse = collapse_seconds
        self.flush_seconds = flush_seconds
        self._clock = clock
        self._monotonic = monotonic
        self._names = names
        # Events waiting for the flusher, with the monotonic time they happened (loop).
        self._queue: list[tuple[float, Event]] = []
        # (pid, ino) -> monotonic time of the last read let through (loop).
        self._seen: dict[tuple[int, int], float] = {}
        # (pid, study key or ino) -> monotonic time of the last read record committed; read
        # by the writer thread, changed on the loop only after the commit that wrote it.
        self._recorded: dict[tuple[int, bytes | int], float] = {}
        # Inode -> (uid, gid, pid) of its latest open for writing whose first write is not
        # recorded yet (loop): write requests carry no caller, the open does.
        self._writers: dict[int, tuple[int, int, int]] = {}
        # pid -> (monotonic time read, process name) (loop).
        self._pids: dict[int, tuple[float, str]] = {}
        self._wakeup = trio.Event()
        self._stats = {"events": 0, "records": 0, "collapsed": 0, "lost": 0}
        # Records appended inside the transactions of changes (written on the writer thread
        # only, read on the loop).
        self._change_records = 0

    @property
    def stats(self) -> dict[str, int]:
        """Since mount: events seen, records written, reads collapsed, events lost."""
        return {**self._stats, "records": self._stats["records"] + self._change_records}

    # -- on the loop ------------------------------------------------------------------------------

    def _event(self, uid: int, gid: int, pid: int, action: str, ino: int) -> Event:
        now = self._monotonic()
        cached = self._pids.get(pid)
        if cached is None or now - cached[0] > NAME_SECONDS:
            if len(self._pids) > PRUNE_AT:
                self._pids.clear()
            cached = self._pids[pid] = (now, self._names(pid))
        return Event(self._clock(), uid, gid, pid, cached[1], action, ino)

    def _queue_event(self, event: Event) -> None:
        self._stats["events"] += 1
        self._queue.append((self._monotonic(), event))
        if len(self._queue) >= FLUSH_AT:
            self._wakeup.set()

    def opened(self, ino: int, uid: int, gid: int, pid: int, flags: int) -> None:
        """An open of a stored file (live or in a snapshot) by the caller (uid, gid, pid)."""
        mode = flags & os.O_ACCMODE
        if mode in (os.O_WRONLY, os.O_RDWR):
            if len(self._writers) > PRUNE_AT:
                # Opens for writing that never wrote (O_RDWR readers): a bound, at the price
                # of not recording the first write of the files open at this moment.
                self._writers.clear()
            self._writers[ino] = (uid, gid, pid)
        if mode in (os.O_RDONLY, os.O_RDWR):
            now = self._monotonic()
            last = self._seen.get((pid, ino))
            if last is not None and now - last < self.collapse:
                self._stats["collapsed"] += 1
                return
            self._seen[(pid, ino)] = now
            self._queue_event(self._event(uid, gid, pid, "read", ino))

    def created(self, ino: int, uid: int, gid: int, pid: int) -> None:
        """A file was created and opened for writing by the caller."""
        self._writers[ino] = (uid, gid, pid)

    def wrote(self, ino: int) -> None:
        """A write request to `ino`: the first after an open for writing is recorded, as the
        opener's (one `write` record per open)."""
        who = self._writers.pop(ino, None)
        if who is not None:
            self._queue_event(self._event(*who, "write", ino))

    def truncated(self, ino: int, uid: int, gid: int, pid: int) -> None:
        """A size change through setattr (truncate): a write by the caller."""
        self._queue_event(self._event(uid, gid, pid, "write", ino))

    def audited(self, fn: Callable[..., T], action: str, uid: int, gid: int, pid: int,
                target: tuple[int, bytes] | None = None) -> Callable[..., T]:
        """`fn` (a namespace change run by `engine.commit`) that also appends its record in
        the same transaction. `target` is the (directory, name) of the file changed (rename,
        delete); without it the inode is that of `fn`'s result (create)."""
        base = self._event(uid, gid, pid, action, 0)
        self._stats["events"] += 1

        def run(tx: Tx, *args: Any) -> T:
            ino = 0
            if target is not None:
                ino = self.ns.child(tx.txn, *target) or 0
            # Before the change: a delete removes the file from the index in this transaction.
            study = study_of(self.index, tx.txn, ino) if ino and self.index else None
            result = fn(tx, *args)
            if target is None:
                ino = int(getattr(result, "ino", 0))
            self.log.append(tx.txn, [dataclasses.replace(base, ino=ino, study=study)])
            self._change_records += 1  # counted before the commit: an abort overcounts
            return result

        return run

    async def exported(self) -> None:
        """A read-only archive mount started: the archive is being exported through it. The
        record names this daemon (the caller of `vnafs mount`, or the service manager)."""
        pid = os.getpid()
        event = self._event(os.getuid(), os.getgid(), pid, "export", 0)
        self._stats["events"] += 1

        def run(tx: Tx) -> None:
            self.log.append(tx.txn, [event])

        await self.engine.commit(run)
        self._stats["records"] += 1

    async def before_change(self) -> None:
        """Append what is queued before a rename or delete commits: a queued read of a file
        resolves its study from the index, which forgets the file in the delete's transaction,
        and the chain keeps the order in which things happened. (Creates do not wait: that
        would double the commits of an ingest; their records may precede reads and writes
        queued just before them.)"""
        if self._queue:
            await self._flush_logged()

    # -- the flusher ------------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(self.flush_seconds):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self._flush_logged()

    async def _flush_logged(self) -> None:
        """`flush`, with a failure logged and reported instead of raised: the events stay
        queued for the next attempt."""
        try:
            await self.flush()
        except OSError as exc:
            log.error("audit records could not be written (%s); retrying", exc.strerror)
        except IntegrityError as exc:
            # A damaged chain head: changes fail closed (their records cannot be chained),
            # and `vnafs audit verify` names the damage.
            log.error("audit records could not be written: %s", exc)
            self.engine.health.report("integrity", str(exc))

    async def final_flush(self) -> None:
        """At unmount: write what is queued; what cannot be written is logged as lost."""
        await self._flush_logged()
        if self._queue:
            log.error("%d audit events could not be written before the unmount",
                      len(self._queue))

    async def flush(self) -> int:
        """Append every queued event now; the number of records written."""
        if not self._queue:
            return 0
        batch, self._queue = self._queue, []
        try:
            written, recorded = await self.engine.commit(self._append, batch)
        except BaseException:
            self._queue[:0] = batch
            if len(self._queue) > MAX_QUEUE:
                self._stats["lost"] += len(self._queue) - MAX_QUEUE
                del self._queue[:len(self._queue) - MAX_QUEUE]
            raise
        self._recorded.update(recorded)
        self._stats["records"] += written
        self._stats["collapsed"] += len(batch) - written
        if len(self._seen) > PRUNE_AT or len(self._recorded) > PRUNE_AT:
            now = self._monotonic()
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.collapse}
            self._recorded = {k: t for k, t in self._recorded.items()
                              if now - t < self.collapse}
        return written

    def _append(self, tx: Tx, batch: list[tuple[float, Event]]
                ) -> tuple[int, dict[tuple[int, bytes | int], float]]:
        """Writer thread: resolve studies, collapse reads by (pid, study), append."""
        events: list[Event] = []
        recorded: dict[tuple[int, bytes | int], float] = {}
        studies: dict[int, bytes | None] = {}
        for when, event in batch:
            if event.ino not in studies:
                studies[event.ino] = study_of(self.index, tx.txn, event.ino) \
                    if self.index is not None and event.ino else None
            study = studies[event.ino]
            if event.action == "read":
                key = (event.pid, study if study is not None else event.ino)
                last = recorded.get(key, self._recorded.get(key))
                if last is not None and when - last < self.collapse:
                    continue
                recorded[key] = when
            events.append(dataclasses.replace(event, study=study))
        self.log.append(tx.txn, events)
        return len(events), recorded
