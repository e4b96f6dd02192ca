"""The daemon task that replicates a hot store into its archive, one way and asynchronously.

Ingest never waits for it: every commit leaves dirty marks and new-block entries in LMDB (the
durable outbox, `vnafs/meta/db.py`), and this task ships them in *cycles*, each a consistent
point in time: blocks first, then the sealed metadata parts, then `meta/HEAD`, the commit
marker; only then are the marks it shipped cleared. docs/architecture.md section 9 explains why
that order makes every state the archive can be in (also after a crash at any point) a state
the hot store really had, and docs/format.md section 6 gives the bytes.

Failures end the cycle and are retried with exponential backoff and jitter; the last error and
the recovery point are published through `vnafs status`.

With `[archive] object_lock`, each cycle also sets object retention on what locked snapshots
and new tombstones need (`retention.py` decides what), after HEAD and before the commit, so a
failure leaves the work to the next cycle.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from vnafs.archive import log as alog
from vnafs.archive import retention as aret
from vnafs.archive.backend import (
    ArchiveAuthError,
    ArchiveError,
    ArchiveMissing,
    Backend,
    RetentionSupport,
)
from vnafs.archive.log import load_state, save_state
from vnafs.config import ArchiveConfig
from vnafs.errors import IntegrityError, VnafsError
from vnafs.fs.engine import Engine
from vnafs.meta.db import REPLICATED, TABLES, MetaDB, records
from vnafs.meta.namespace import Namespace
from vnafs.meta.records import STATE_HOT, RefCount
from vnafs.meta.tx import Tx
from vnafs.seal import Sealer
from vnafs.store.lifecycle import Store

T = TypeVar("T")
log = logging.getLogger("vnafs.replicator")

# Upload progress is committed every this many blocks: a crash re-sends at most one batch.
BATCH_BLOCKS = 16
CHECKPOINT_MIN_LOG = 64 << 20
MAX_BACKOFF = 60.0


@dataclass
class Plan:
    """One cycle: what read transaction T saw."""

    cycle: int
    checkpoint: bool
    t_ns: int
    blocks: list[tuple[bytes, int]]
    marks: list[tuple[bytes, bytes]]
    parts: list[Path]
    nbytes: int = 0
    # Retention to set before the commit (None: object_lock off or not supported here).
    retention: aret.Targets | None = None


class TokenBucket:
    """Caps the upload rate (bytes/s); 0 means no cap."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = 0.0

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        start = max(now, self._next)
        self._next = start + n / self.rate
        await trio.sleep_until(start)


class Replicator:
    def __init__(self, root: Path, ns: Namespace, engine: Engine, backend: Backend,
                 cfg: ArchiveConfig, reopen: Callable[[], Backend] | None = None) -> None:
        self.root = root
        self.ns = ns
        self.db: MetaDB = ns.db
        self.sealer: Sealer = ns.db.sealer
        self.engine = engine
        self.backend = backend
        # Builds a new client: after a credentials error the credentials file (or its
        # rotation) is read again, so fixing it needs no remount.
        self.reopen = reopen
        self.cfg = cfg
        self.state = load_state(self.db)
        # Whether this mount's first cycle has looked for parts beyond our reservation.
        self._parts_checked = False
        self.uploads = trio.CapacityLimiter(cfg.uploads)
        self.bucket = TokenBucket(cfg.bandwidth_mib * (1 << 20))
        self.wakeup = trio.Event()
        self.last_error: str | None = None
        self.last_error_time: float | None = None
        self.failures = 0
        self.running = False
        self.stats: dict[str, int] = {"cycles": 0, "checkpoints": 0, "blocks_uploaded": 0,
                                      "bytes_uploaded": 0, "blocks_present": 0,
                                      "records_shipped": 0}
        self._missing_reported: set[bytes] = set()
        # Object retention: what the archive can do (None: not asked yet this mount), what is
        # done (repl_state), and this mount's counts and the pass under way (for status).
        self.support: RetentionSupport | None = None
        self.support_error: str | None = None
        self._support_asked = False
        self.retention_state = aret.load_state(self.db)
        self.retention_stats: dict[str, int] = {"objects_set": 0, "objects_held": 0,
                                                "objects_missing": 0}
        self.retention_pass: dict[str, int] | None = None
        # Backlog objects (locked snapshots' blocks, a first sweep) left for later cycles.
        self.retention_backlog = 0
        self.retention_batch = aret.BATCH

    # -- the loop -------------------------------------------------------------------------------

    def nudge(self) -> None:
        self.wakeup.set()

    def after_reseal(self) -> None:
        """Everything was sealed again (`vnafs key reseal`): the next cycle is a checkpoint
        that also uploads `config` again, and the retention of locks and tombstones is set
        again, on the objects' new versions."""
        self.state.config_sha256 = ""
        self.retention_state = aret.RetentionState()
        self.force_checkpoint()

    def force_checkpoint(self) -> None:
        """Make the next cycle a checkpoint (verify found a damaged or missing metadata part:
        a new checkpoint means HEAD no longer depends on it)."""
        self.state.since_checkpoint = max(self.state.since_checkpoint,
                                          self.cfg.checkpoint_every)
        self.nudge()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        wait = 0.0  # the first cycle runs at once: a mount catches up on what the last left
        while True:
            with trio.move_on_after(wait):
                await self.wakeup.wait()
            self.wakeup = trio.Event()
            try:
                self.running = True
                await self.cycle()
            except (ArchiveError, IntegrityError, OSError) as exc:
                self.failures += 1
                message = str(exc) if not isinstance(exc, OSError) else (
                    f"replication failed: {exc.strerror or exc}")
                if message != self.last_error:
                    log.error("%s (retrying)", message)
                self.last_error, self.last_error_time = message, time.time()
                self.engine.health.report("archive", message)
                if isinstance(exc, ArchiveAuthError) and self.reopen is not None:
                    await self._reopen()
                # Exponential backoff with "equal jitter": never hammer a struggling archive,
                # never let several sites retry in lockstep.
                base = min(MAX_BACKOFF, 2.0 ** min(self.failures, 6))
                wait = base / 2 + random.uniform(0, base / 2)
                continue
            finally:
                self.running = False
            if self.failures:
                log.info("archive reachable again; replication resumed")
            self.engine.health.clear("archive")
            self.failures = 0
            self.last_error = None
            wait = self.cfg.interval

    async def _reopen(self) -> None:
        assert self.reopen is not None
        try:
            self.backend = await trio.to_thread.run_sync(self.reopen)
        except VnafsError as exc:  # e.g. the credentials file is unreadable right now
            log.error("%s", exc)
        self.support, self._support_asked = None, False  # ask the new client again

    async def cycle(self) -> bool:
        """Run one replication cycle if there is anything to ship; True if one ran."""
        st = self.state
        # First, even with nothing to ship: status says at once whether retention is enforced.
        await self._probe_retention()
        # A retention pass left for later cycles runs on even when nothing else changed.
        backlog = self._retaining() and bool(self.retention_state.after)
        if not (self._checkpoint_due() or backlog or await self._run(self._has_work)):
            return False
        prior = st.cycle
        if not self._parts_checked:
            # Once per mount: number above every part already in the archive. A power loss
            # can lose the reservation of a cycle whose parts were uploaded (LMDB commits are
            # not synced one by one), and parts are create-only: a cycle of the same number
            # would take the stale parts for its own.
            prior = max(prior, await self._run(alog.highest_part_cycle, self.backend))
            self._parts_checked = True
        number = prior + 1
        await self._run(self._check_head, prior)
        checkpoint = self._checkpoint_due()
        await self.engine.commit(self._reserve, number)
        plan = await self._run(self._plan, number, checkpoint)
        try:
            # Read after T, so the keyring uploaded covers every seal the cycle ships.
            await self._upload_small()
            await self._upload_blocks(plan.blocks)
            for i, path in enumerate(plan.parts):
                kind = alog.KIND_CHECKPOINT if checkpoint else alog.KIND_LOG
                data = await trio.to_thread.run_sync(path.read_bytes)
                await self._put(alog.part_name(kind, number, i), data, create=True, sync=False)
            # Every block and part this HEAD names is durable before HEAD is written.
            await self._flush()
            if checkpoint:
                head_ckpt, logs = (number, len(plan.parts)), []
            else:
                head_ckpt, logs = st.checkpoint, [*st.logs, (number, len(plan.parts))]
            head = alog.Head(self.sealer.keyring.fs_id.hex(), number, plan.t_ns, head_ckpt,
                             logs, st.keyring_sha256, time.time_ns(),
                             self.sealer.format_version)
            await self._put(alog.HEAD_NAME,
                            alog.seal_object(self.sealer, alog.HEAD_NAME, head.to_json()))
            if plan.retention is not None:
                await self._retain(plan.retention, head)
            await self.engine.commit(self._finish, plan, head)
        finally:
            await trio.to_thread.run_sync(_discard, plan.parts)
        self.stats["cycles"] += 1
        self.stats["checkpoints"] += checkpoint
        self.stats["records_shipped"] += len(plan.marks)
        return True

    def _checkpoint_due(self) -> bool:
        """A full checkpoint when there is none, after `checkpoint_every` cycles, or when the
        logs since the last one outgrow it (and 64 MiB): restore and archive mounts then read
        at most about twice the metadata, and a big store is not re-sent every few minutes."""
        st = self.state
        return (st.checkpoint[0] == 0 or st.since_checkpoint >= self.cfg.checkpoint_every
                or st.log_bytes >= max(st.checkpoint_bytes, CHECKPOINT_MIN_LOG))

    async def _upload_small(self) -> None:
        """The keyring and vnafs.toml, when they changed since they were last uploaded."""
        st = self.state
        keyring = await trio.to_thread.run_sync((self.root / "keyring").read_bytes)
        if alog.sha256(keyring) != st.keyring_sha256:
            await self._put(alog.KEYRING_NAME, keyring)
            st.keyring_sha256 = alog.sha256(keyring)
        config = await trio.to_thread.run_sync((self.root / "vnafs.toml").read_bytes)
        if alog.sha256(config) != st.config_sha256:
            sealed = alog.seal_object(self.sealer, alog.CONFIG_NAME, config)
            await self._put(alog.CONFIG_NAME, sealed)
            st.config_sha256 = alog.sha256(config)

    async def _probe_retention(self) -> None:
        """Ask the archive once per mount whether it enforces object retention. With a lock
        requested, an archive that cannot answer fails the cycle like any archive error; with
        none requested, the answer is only for `vnafs status` and failing to get it is not
        worth a retry."""
        wanted = self.cfg.object_lock != "off"
        if self.support is not None or (self._support_asked and not wanted):
            return
        self._support_asked = True
        try:
            self.support = await self._run(self.backend.retention_support)
        except ArchiveError as exc:
            self.support_error = str(exc)
            if wanted:
                raise
            return
        self.support_error = None
        if wanted and not self.support.supported:
            log.warning("[archive] object_lock = %s is set, but %s", self.cfg.object_lock,
                        self.support.reason)

    def _retaining(self) -> bool:
        return (self.cfg.object_lock != "off" and self.support is not None
                and self.support.supported)

    async def _retain(self, targets: aret.Targets, head: alog.Head) -> None:
        """Set the retention `targets` ask for, plus that of the metadata `head` needs when a
        snapshot lock is in them: `uploads` calls at a time, each in a worker thread."""
        objects = dict(targets.objects)
        if targets.meta_until:
            names = [name for _, name in head.parts_after(0)]
            for name in [*names, alog.HEAD_NAME, alog.KEYRING_NAME, alog.CONFIG_NAME]:
                objects[name] = max(objects.get(name, 0), targets.meta_until)
        if not objects:
            return
        mode = self.cfg.object_lock
        progress = self.retention_pass = {"objects": len(objects), "done": 0}
        window = trio.Semaphore(self.cfg.uploads * 2)

        async def one(name: str, until: int) -> None:
            try:
                changed = await trio.to_thread.run_sync(
                    self.backend.set_retention, name, mode, until, limiter=self.uploads)
                self.retention_stats["objects_set" if changed else "objects_held"] += 1
            except ArchiveMissing:
                # A block the hot store lost before it reached the archive (reported by the
                # upload); retrying cannot bring it back.
                self.retention_stats["objects_missing"] += 1
                log.error("archive object %s is missing: no retention set on it", name)
            finally:
                progress["done"] += 1
                window.release()

        try:
            async with trio.open_nursery() as nursery:
                for name, until in sorted(objects.items()):
                    await window.acquire()
                    nursery.start_soon(one, name, until)
        finally:
            self.retention_pass = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.engine.io)

    async def _put(self, name: str, data: bytes, *, create: bool = False,
                   sync: bool = True) -> bool:
        await self.bucket.take(len(data))
        written: bool = await trio.to_thread.run_sync(
            lambda: self.backend.put(name, data, create=create, sync=sync),
            limiter=self.uploads)
        return written

    async def _flush(self) -> None:
        await trio.to_thread.run_sync(self.backend.flush, limiter=self.uploads)

    # -- the parts of a cycle -------------------------------------------------------------------

    def _has_work(self) -> bool:
        """Anything dirty or pending, or a keyring or vnafs.toml not uploaded as it is."""
        with self.db.begin() as txn:
            if (txn.stat(self.db.dbs["repl_dirty"])["entries"]
                    or txn.stat(self.db.dbs["repl_blocks"])["entries"]):
                return True
        st = self.state
        return (alog.sha256((self.root / "keyring").read_bytes()) != st.keyring_sha256
                or alog.sha256((self.root / "vnafs.toml").read_bytes()) != st.config_sha256)

    def _check_head(self, prior: int) -> None:
        """Refuse to write into a prefix another hot store writes to (a restored copy started
        while the original still runs, or a URL given to two sites): their HEADs would
        overwrite each other. Our own HEAD has a cycle between our last committed one and our
        last reserved one (a cycle can crash after writing HEAD, before committing)."""
        try:
            envelope = self.backend.get(alog.HEAD_NAME)
        except ArchiveMissing:
            if self.state.committed:
                log.warning("the archive lost its meta/HEAD (deleted behind our back?); this "
                            "cycle writes a new checkpoint and HEAD")
                self.state.since_checkpoint = self.cfg.checkpoint_every
            return
        try:
            head = alog.Head.from_json(alog.open_object(self.sealer, alog.HEAD_NAME, envelope))
        except alog.UnknownFormat as exc:
            raise ArchiveError(str(exc)) from None
        except IntegrityError:
            raise ArchiveError(f"the archive {self.backend.url.display()} holds another file "
                               "system's HEAD: give each hot store its own prefix") from None
        if head.format != self.sealer.format_version:
            # Same keyring, other block-id algorithm: a restored or copied store whose FORMAT
            # was changed. Its blocks would not deduplicate against the archive's.
            raise ArchiveError(
                f"the archive {self.backend.url.display()} is of store format {head.format} and "
                f"this hot store of format {self.sealer.format_version}: they must be the same; "
                "restore the hot store from the archive")
        if head.fs_id != self.sealer.keyring.fs_id.hex() or not (
                self.state.committed <= head.cycle <= prior):
            raise ArchiveError(
                f"another hot store is replicating into {self.backend.url.display()} (its HEAD "
                f"is at cycle {head.cycle}, ours at {self.state.committed}): only one hot "
                "store may write to an archive prefix; unmount the other one")

    def _reserve(self, tx: Tx, number: int) -> None:
        self.state.cycle = number
        save_state(self.db, tx.txn, self.state)

    def _plan(self, number: int, checkpoint: bool) -> Plan:
        dbs = self.db.dbs
        writer = alog.PartWriter(self.sealer, self.root / "tmp", alog.KIND_CHECKPOINT
                                 if checkpoint else alog.KIND_LOG, number)
        try:
            with self.db.begin() as txn:
                t_ns = time.time_ns()
                marks = list(records(txn.cursor(db=dbs["repl_dirty"])))
                pending = {key for key, _ in records(txn.cursor(db=dbs["repl_blocks"]))}
                blocks: list[tuple[bytes, int]] = []
                # A checkpoint also takes blocks written before an archive was configured.
                for key, value in records(txn.cursor(db=dbs["refs"])):
                    if key in pending or checkpoint:
                        rc = RefCount.unpack(self.db.open_record("refs", key, value))
                        if key in pending or rc.state == STATE_HOT:
                            blocks.append((key, rc.stored))
                if checkpoint:
                    for name in sorted(REPLICATED):
                        tag = TABLES[name]
                        for key, value in records(txn.cursor(db=dbs[name])):
                            writer.add(tag, key, value)
                else:
                    for dkey, _ in marks:
                        tag, key = dkey[:1], dkey[1:]
                        name = alog.TAG_TABLES[tag]
                        writer.add(tag, key, cast(bytes | None, txn.get(key, db=dbs[name])))
                retention = None
                if self._retaining():
                    tomb = TABLES["tombstones"]
                    retention = aret.plan(self.db, txn, self.retention_state,
                                          self.cfg.object_lock, self.cfg.retention_days, t_ns,
                                          (k[1:] for k, _ in marks if k[:1] == tomb),
                                          batch=self.retention_batch)
            parts = writer.close()
        except BaseException:
            _discard(writer.paths)
            raise
        return Plan(number, checkpoint, t_ns, blocks, marks, parts,
                    sum(p.stat().st_size for p in parts), retention)

    async def _upload_blocks(self, blocks: list[tuple[bytes, int]]) -> None:
        """Upload with `uploads` always busy (a window, not batches that wait for their
        slowest member), recording progress every BATCH_BLOCKS while uploads go on."""
        done: list[bytes] = []
        window = trio.Semaphore(self.cfg.uploads * 2)

        async def one(block_id: bytes) -> None:
            try:
                await self._upload_block(block_id, done)
            finally:
                window.release()

        async def record() -> None:
            batch = done[:]
            del done[:]
            await self._flush()  # durable in the archive before the outbox forgets them
            await self.engine.commit(self.ns.blocks.release_replicated, batch)

        async with trio.open_nursery() as nursery:
            for block_id, _ in blocks:
                await window.acquire()
                nursery.start_soon(one, block_id)
                if len(done) >= BATCH_BLOCKS:
                    await record()
        if done:
            await record()

    async def _upload_block(self, block_id: bytes, done: list[bytes]) -> None:
        path = self.engine.store.path(block_id)
        name = alog.block_name(block_id)

        def send() -> tuple[bool, int]:
            # Read and upload in one worker-thread hop: two hops per block cost more loop
            # time than the upload itself (measured with py-spy while draining a backlog).
            data = path.read_bytes()
            return self.backend.put(name, data, create=True, sync=False), len(data)

        try:
            if self.bucket.rate > 0:
                data = await trio.to_thread.run_sync(path.read_bytes)
                written, size = await self._put(name, data, create=True, sync=False), len(data)
            else:
                written, size = await trio.to_thread.run_sync(send, limiter=self.uploads)
        except FileNotFoundError:
            if block_id not in self._missing_reported:
                self._missing_reported.add(block_id)
                message = (f"block {block_id.hex()} is missing from the hot store and cannot be "
                           "replicated; run vnafs fsck")
                log.error("%s", message)
                self.engine.health.report("integrity", message)
            return
        self.stats["blocks_uploaded" if written else "blocks_present"] += 1
        self.stats["bytes_uploaded"] += size if written else 0
        done.append(block_id)

    def _finish(self, tx: Tx, plan: Plan, head: alog.Head) -> None:
        dirty = self.db.dbs["repl_dirty"]
        for dkey, mark in plan.marks:
            if tx.txn.get(dkey, db=dirty) == mark:
                tx.txn.delete(dkey, db=dirty)
        st = self.state
        st.committed = plan.cycle
        st.rp_ns = plan.t_ns
        st.checkpoint = head.checkpoint
        st.logs = list(head.logs)
        st.since_checkpoint = 0 if plan.checkpoint else st.since_checkpoint + 1
        if plan.checkpoint:
            st.checkpoint_bytes, st.log_bytes = plan.nbytes, 0
        else:
            st.log_bytes += plan.nbytes
        save_state(self.db, tx.txn, st)
        if plan.retention is not None:
            self.retention_state = aret.commit(self.retention_state, self.cfg.object_lock,
                                               plan.retention)
            self.retention_backlog = plan.retention.backlog_left
            aret.save_state(self.db, tx.txn, self.retention_state)
        elif self.retention_state != aret.RetentionState():
            # Not retaining now: when it starts again, everything is looked at again.
            self.retention_state = aret.RetentionState()
            aret.save_state(self.db, tx.txn, self.retention_state)

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For `vnafs status` (runs in a worker thread: it scans the outbox)."""
        dbs = self.db.dbs
        pending_bytes = 0
        with self.db.begin() as txn:
            records_pending = txn.stat(dbs["repl_dirty"])["entries"]
            blocks_pending = 0
            for key, _ in records(txn.cursor(db=dbs["repl_blocks"])):
                blocks_pending += 1
                body = self.db.get(txn, "refs", key)
                if body is not None:
                    pending_bytes += RefCount.unpack(body).stored
        st = self.state
        now = time.time_ns()
        pending = bool(records_pending or blocks_pending)
        lag = (now - st.rp_ns) / 1e9 if pending and st.rp_ns else 0.0
        if self.last_error:
            state = "retrying"
        elif pending:
            state = "catching up" if lag > self.cfg.rpo else "ok"
        else:
            state = "ok"
        return {
            "url": self.backend.url.display(),
            "state": state,
            "recovery_point": iso_time(st.rp_ns) if st.rp_ns else None,
            "recovery_point_ns": st.rp_ns or None,
            "lag_seconds": round(lag, 3) if st.rp_ns else None,
            "rpo_seconds": self.cfg.rpo,
            "pending_records": records_pending,
            "pending_blocks": blocks_pending,
            "pending_bytes": pending_bytes,
            "cycle": st.committed,
            "checkpoint_cycle": st.checkpoint[0],
            "last_error": self.last_error,
            "last_error_time": self.last_error_time,
            "retention": self.retention_status(),
            **{f"since_mount_{k}": v for k, v in self.stats.items()},
        }

    def retention_status(self) -> dict[str, Any]:
        """Whether the archive enforces locks and tombstones, in one line and in figures."""
        mode = self.cfg.object_lock
        sup = self.support
        if sup is None:
            why = self.support_error or "the archive has not been asked yet"
            summary = f"unknown: {why}"
        elif not sup.supported:
            summary = f"not supported by this archive: {sup.reason}"
        elif mode == "off":
            summary = (f"off: the archive supports {sup.mechanism}; set [archive] object_lock "
                       "to have it enforce snapshot locks and tombstones")
        else:
            summary = f"enforced by the archive ({sup.mechanism}, {mode})"
        return {
            "requested": mode,
            "enforced": self._retaining(),
            # A lock was asked for and this archive cannot do it: status marks the health.
            "unenforced": mode != "off" and sup is not None and not sup.supported,
            "mechanism": sup.mechanism if sup is not None and sup.mechanism else None,
            "summary": summary,
            "snapshots_retained": len(self.retention_state.snapshots),
            "pass": dict(self.retention_pass) if self.retention_pass else None,
            "backlog_objects": self.retention_backlog if self._retaining() else 0,
            **{f"since_mount_{k}": v for k, v in self.retention_stats.items()},
        }


def _discard(paths: list[Path]) -> None:
    """Remove a cycle's spooled parts (blocking: call from a worker thread)."""
    for path in paths:
        path.unlink(missing_ok=True)


def iso_time(ns: int) -> str:
    """A recovery point as status shows it: UTC, ISO 8601, milliseconds."""
    millis = ns % 10**9 // 10**6
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{millis:03d}Z"


async def replicate_once(store: Store, backend: Backend) -> None:
    """One replication cycle outside a mount (`vnafs mkfs --archive`): the archive then holds
    the keyring, the configuration and a checkpoint from the first minute, so a restore works
    even if the store is never mounted. Raises `ArchiveError` with the one-line reason."""
    engine = Engine(store.ns, store.hot)
    replicator = Replicator(store.root, store.ns, engine, backend, store.config.archive)
    await replicator.cycle()
    await engine.barrier()
