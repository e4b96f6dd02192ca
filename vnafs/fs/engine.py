"""The trio-side engine of a mounted store: worker-thread limits, commits, blocks and caches.

Everything that blocks (LMDB commits, sealing, disk I/O) runs in worker threads under
`CapacityLimiter`s, so the event loop only shuffles buffers:

- `commit(fn, ...)` runs one namespace mutation in a write transaction on the single writer
  thread, then deletes block files whose last reference the commit dropped;
- `store_block(data)` computes the block id, skips the write when the block already exists
  (dedup) and otherwise seals and writes it, on the CPU limiter;
- `load_block(id)` returns plaintext from a bounded LRU cache or loads it on the read limiter,
  merging concurrent loads of the same block;
- `barrier()` is the group commit: callers that need durability share one `syncfs`.

Nothing here imports pyfuse3: the engine is reused by tools that work without a mount.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import lmdb
import trio

from vnafs.errors import IntegrityError, Unavailable
from vnafs.meta.blocks import BlockUsage
from vnafs.meta.namespace import Namespace
from vnafs.meta.records import STATE_EVICTED
from vnafs.meta.tx import NO_HOOKS, Tx, TxHooks
from vnafs.seal import Buffer
from vnafs.store.hot import HotStore

log = logging.getLogger("vnafs.engine")
FAILED_LOAD_QUIET = 60.0
T = TypeVar("T")


def _lmdb_error(exc: lmdb.Error) -> OSError:
    text = str(exc)
    if "No space" in text or "MDB_MAP_FULL" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    log.error("metadata write failed: %s", text)
    return OSError(errno.EIO, os.strerror(errno.EIO))


class Health:
    """What is wrong now, for `vnafs status`, plus the history since mount.

    A problem kind is *active* from its report until the operation it concerns succeeds
    again (`clear`): a full disk is no longer a problem once a block is stored, a failed
    metadata write once a commit succeeds, an unreachable archive once a replication cycle
    completes. Kinds nothing clears (an internal error) stay active for `DECAY_SECONDS`
    after their last report. Damaged data (`integrity`) stays until the next mount: it does
    not heal by itself, and `vnafs fsck` says what to do. The counts and the newest message
    are history (the log has every line); messages never carry PHI.
    """

    DECAY_SECONDS = 600.0
    CLEARED_BY_SUCCESS = frozenset({"block_write", "metadata_write", "archive", "index",
                                    "recall", "tiering"})

    def __init__(self) -> None:
        # Reports and clears come from the loop and from the writer thread: every field is
        # guarded by `_lock`.
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        # kind -> time.monotonic() of its newest report, while active.
        self.active: dict[str, float] = {}
        self.last: str | None = None
        self.last_time: float | None = None

    def report(self, kind: str, message: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            self.active[kind] = time.monotonic()
            self.last = message
            self.last_time = time.time()

    def clear(self, kind: str) -> None:
        """The operation `kind` is about just succeeded."""
        if kind in self.active:
            with self._lock:
                self.active.pop(kind, None)

    def current(self) -> set[str]:
        now = time.monotonic()
        with self._lock:
            return {kind for kind, when in self.active.items()
                    if kind in self.CLEARED_BY_SUCCESS or kind == "integrity"
                    or now - when < self.DECAY_SECONDS}

    def as_dict(self) -> dict[str, Any]:
        current = self.current()
        if "integrity" in current:
            state = "damaged"
        elif current:
            state = "degraded"
        else:
            state = "ok"
        with self._lock:
            return {"state": state, "active": sorted(current), "problems": dict(self.counts),
                    "last_problem": self.last, "last_problem_time": self.last_time}


class BlockCache:
    """Plaintext blocks by id, least recently used first out, bounded in bytes. Entries are
    never modified: writes replace blocks, they do not change cached ones."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._items: OrderedDict[bytes, Buffer] = OrderedDict()

    def get(self, block_id: bytes) -> Buffer | None:
        data = self._items.get(block_id)
        if data is not None:
            self._items.move_to_end(block_id)
        return data

    def put(self, block_id: bytes, data: Buffer) -> None:
        if block_id in self._items or len(data) > self.capacity:
            return
        self._items[block_id] = data
        self.size += len(data)
        while self.size > self.capacity:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)


class StoreCommitError(Exception):
    """`Engine.store_and_commit` stored its block (the id is pending) but the commit failed;
    the commit's error is `__cause__`."""

    def __init__(self, block_id: bytes) -> None:
        super().__init__(block_id.hex())
        self.block_id = block_id


class Engine:
    """The shared core of a mounted store (see the module docstring).

    Collaborators come in through the constructor: `hooks` take part in every write
    transaction (the DICOM index), `recall` fetches blocks the hot store lacks, and inode
    numbers that lost their last name in a commit are sent to `orphans` (the open-file layer
    frees them once no handle holds them; without a receiver they are freed at the next mount).
    """

    def __init__(
        self,
        ns: Namespace,
        store: HotStore,
        *,
        cache_bytes: int = 128 << 20,
        workers: int = 2,
        max_inflight_blocks: int = 32,
        compress: bool = True,
        hooks: TxHooks = NO_HOOKS,
        recall: Callable[[bytes], Awaitable[bytes]] | None = None,
        orphans: trio.MemorySendChannel[int] | None = None,
        usage: BlockUsage | None = None,
        reader_recalls: trio.MemorySendChannel[int] | None = None,
    ) -> None:
        self.ns = ns
        self.store = store
        self.hooks = hooks
        # Fetches a block the hot store lacks (or holds damaged) from the archive; returns its
        # plaintext or raises IntegrityError (vnafs/archive/recall.py). None: no archive.
        self.recall = recall
        self._orphans = orphans
        # Hears the inode of each file a reader had to wait on the archive for (the tierer
        # then recalls the rest of its study ahead of the reader).
        self._reader_recalls = reader_recalls
        self.compress = compress
        # Plaintext by block id (loop only; entries never change, see BlockCache).
        self.cache = BlockCache(cache_bytes)
        # Worker-thread limits: the one LMDB writer thread; sealing and parsing (CPU); disk and
        # archive reads, syncfs, scans for status (I/O).
        self.writer = trio.CapacityLimiter(1)
        self.cpu = trio.CapacityLimiter(workers)
        self.io = trio.CapacityLimiter(max(8, workers * 4))
        # Bounds plaintext held by blocks waiting to be sealed: memory stays flat under any load.
        self.inflight = trio.Semaphore(max_inflight_blocks)
        self.inflight_max = max_inflight_blocks
        # Block id -> event set when its load ends; one load per block however many readers
        # wait (loop).
        self._loading: dict[bytes, trio.Event] = {}
        # Block ids a writer has produced but not yet committed: never delete their files.
        # Raised by seal threads, lowered on the loop, read by the writer thread after each
        # commit: guarded by `_pending_lock`, the one lock shared with worker threads.
        self._pending: Counter[bytes] = Counter()
        self._pending_lock = threading.Lock()
        # The group barrier's tickets (loop): barriers started and finished so far, whether
        # one is running, and the event its waiters share. A caller that needs durability
        # waits until `_sync_done` reaches a ticket taken after its commit.
        self._sync_started = 0
        self._sync_done = 0
        self._sync_running = False
        self._sync_event = trio.Event()
        # Something was committed since the last barrier started (loop).
        self._unsynced = False
        self.stats: Counter[str] = Counter()
        self.health = Health()
        # Block bytes in the hot store and in the archive only (loop); see `count_usage`.
        self.usage = usage if usage is not None else BlockUsage()
        # Block id -> time.monotonic() of its last failed load, for one log line per minute.
        self._failed_loads: dict[bytes, float] = {}
        # Seconds a read request waited for a block recalled from the archive (loop).
        self.ttfb: deque[float] = deque(maxlen=1024)
        # trio.current_time() of the newest write request (the indexer stands back).
        self.last_write = 0.0

    # -- metadata commits -----------------------------------------------------------------------

    def _run_tx(self, fn: Callable[..., T], args: tuple[Any, ...]) -> tuple[T, Tx]:
        env = self.ns.db.env
        try:
            with env.begin(write=True) as txn:
                tx = Tx(txn, time.time_ns(), self.hooks)
                result = fn(tx, *args)
        except lmdb.Error as exc:
            err = _lmdb_error(exc)
            self.health.report("metadata_write", f"metadata write failed: {err.strerror}")
            raise err from None
        self.health.clear("metadata_write")
        with self._pending_lock:
            for block_id in tx.freed_blocks:
                if not self._pending[block_id]:
                    self.store.delete(block_id)
        return result, tx

    async def commit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(tx, *args, **kwargs)` in its own write transaction on the writer thread."""
        return (await self.commit_tx(fn, *args, **kwargs))[0]

    async def commit_tx(self, fn: Callable[..., T], *args: Any, **kwargs: Any
                        ) -> tuple[T, Tx]:
        """`commit`, also returning the committed `Tx` with its outcomes."""
        call = functools.partial(fn, **kwargs) if kwargs else fn
        result, tx = await trio.to_thread.run_sync(self._run_tx, call, args,
                                                   limiter=self.writer)
        self._committed(tx)
        return result, tx

    def _committed(self, tx: Tx) -> None:
        """What follows every commit on the loop."""
        self.stats["commits"] += 1
        self.usage.apply(tx)
        self._unsynced = True
        if self._orphans is not None:
            for ino in tx.orphaned:
                self._orphans.send_nowait(ino)  # unbounded: never blocks a commit

    def idle_for_one_hop(self) -> bool:
        """No commit and no seal running or waiting: a close may then seal its last block and
        commit in one hop to the writer thread (`store_and_commit`) without holding up anyone.
        Under concurrent writers it keeps the seals on the `cpu` threads, in parallel."""
        return (self.writer.borrowed_tokens == 0 and self.cpu.borrowed_tokens == 0
                and self.writer.statistics().tasks_waiting == 0)

    async def store_and_commit(self, data: bytearray, compress: bool,
                               fn: Callable[..., T], *args: Any) -> tuple[bytes, int, T, Tx]:
        """`store_block` and then `commit_tx(fn, block_id, stored, *args)` in one hop to the
        writer thread: a close of a file whose last block is its only unsealed one saves a
        thread round trip (about 0.1 ms here, docs/performance.md). On an error the block id
        stays pending when the block was stored: `StoreCommitError.block_id` says which."""

        def run() -> tuple[bytes, int, T, Tx]:
            block_id, stored = self._store_block(data, compress)
            try:
                result, tx = self._run_tx(fn, (block_id, stored, *args))
            except BaseException as exc:
                raise StoreCommitError(block_id) from exc
            return block_id, stored, result, tx

        block_id, stored, result, tx = await trio.to_thread.run_sync(run, limiter=self.writer)
        self._stored(block_id, data, stored)
        self._committed(tx)
        return block_id, stored, result, tx

    async def count_usage(self) -> BlockUsage:
        """Count the bytes the hot store and the archive hold (once, at mount): one scan of
        `refs` in a worker thread from a read transaction opened while no commit runs, so the
        deltas of every later commit, already added by `commit_tx`, complete it exactly."""
        async with self.writer:
            txn = self.ns.db.begin()
        try:
            totals = await trio.to_thread.run_sync(self.ns.blocks.usage, txn, limiter=self.io)
        finally:
            txn.abort()
        self.usage.resident += totals["resident_bytes"]
        self.usage.evicted += totals["evicted_bytes"]
        self.usage.known = True
        return self.usage

    # -- durability -----------------------------------------------------------------------------

    async def sync_periodically(self, interval: float) -> None:
        """Bound what a power loss can take from closed-but-not-fsynced files to `interval`."""
        while True:
            await trio.sleep(interval)
            if self._unsynced:
                await self.barrier()

    async def barrier(self) -> None:
        """Return once a syncfs that started after this call has finished (group commit).

        The syncfs covers every block file and the LMDB pages written before it started, so a
        caller that committed first and then waits here is durable against power loss.
        """
        need = self._sync_started + 1
        while self._sync_done < need:
            if self._sync_running:
                await self._sync_event.wait()
                continue
            self._sync_running = True
            self._unsynced = False
            self._sync_started += 1
            ticket = self._sync_started
            try:
                await trio.to_thread.run_sync(self.store.syncfs, limiter=self.io)
            finally:
                self._sync_running = False
                self._sync_done = ticket
                self._sync_event.set()
                self._sync_event = trio.Event()
            self.stats["barriers"] += 1

    # -- blocks ---------------------------------------------------------------------------------

    def _store_block(self, data: bytes | bytearray, compress: bool) -> tuple[bytes, int]:
        block_id = self.store.sealer.block_id(data)
        # Mark the id pending before looking it up, so a concurrent commit that drops its last
        # reference keeps the file (see docs/architecture.md, "Data path").
        with self._pending_lock:
            self._pending[block_id] += 1
        state = self.ns.blocks.state(block_id)
        if state is not None and state != STATE_EVICTED:
            return block_id, 0
        # New, or evicted: then its file is stored again and the commit makes it resident.
        stored = self.store.put(block_id, data, compress=self.compress and compress)
        return block_id, stored

    async def store_block(self, data: bytes | bytearray, *, compress: bool = True
                          ) -> tuple[bytes, int]:
        """Seal and write one block (or find it already stored). The id stays pending until
        `release_pending` is called after the commit that references it. `compress=False`
        skips compression (data known to be compressed already)."""
        block_id, stored = await trio.to_thread.run_sync(self._store_block, data, compress,
                                                         limiter=self.cpu)
        self._stored(block_id, data, stored)
        return block_id, stored

    def _stored(self, block_id: bytes, data: bytes | bytearray, stored: int) -> None:
        """What follows every block stored, on the loop."""
        self.health.clear("block_write")
        self.cache.put(block_id, data)
        # Counted here on the loop (not in the sealing threads, where += could lose counts):
        # all block bytes written, the plaintext of the blocks stored new, and what those
        # take sealed; the ratios are dedup and compression of what was written since mount.
        self.stats["block_bytes_written"] += len(data)
        if stored:
            self.stats["blocks_written"] += 1
            self.stats["new_block_bytes"] += len(data)
            self.stats["new_block_bytes_sealed"] += stored
        else:
            self.stats["dedup_hits"] += 1

    def release_pending(self, ids: list[bytes]) -> None:
        with self._pending_lock:
            for block_id in ids:
                self._pending[block_id] -= 1
                if self._pending[block_id] <= 0:
                    del self._pending[block_id]

    def _discard(self, ids: list[bytes]) -> int:
        deleted = 0
        with self._pending_lock:
            for block_id in ids:
                if not self._pending[block_id] and not self.ns.blocks.has(block_id):
                    self.store.delete(block_id)
                    deleted += 1
        return deleted

    async def discard_unreferenced(self, ids: list[bytes]) -> int:
        """Delete block files that were written but never committed (and nobody else uses);
        how many were deleted."""
        return await trio.to_thread.run_sync(self._discard, ids, limiter=self.io)

    async def collect_leftovers(self, batch: int = 1024) -> int:
        """After a crash: delete block files that no record references, written for data that
        was never committed. Safe while the mount serves requests: each file is checked and
        deleted under the pending lock, so a block a writer is producing right now (pending)
        or that any record version references is never touched."""
        ids = await trio.to_thread.run_sync(lambda: list(self.store.ids()), limiter=self.io)
        removed = 0
        for start in range(0, len(ids), batch):
            removed += await self.discard_unreferenced(ids[start:start + batch])
        if removed:
            log.info("recovery: removed %d block files of writes that were never committed",
                     removed)
        # A crash between an eviction's commit and its deletes, or between a recall's write
        # and its commit, leaves files of evicted blocks: they count as resident again.
        evicted = await trio.to_thread.run_sync(
            lambda: [b for b in ids if self.ns.blocks.state(b) == STATE_EVICTED],
            limiter=self.io)
        if evicted:
            await self.commit(self.ns.blocks.make_resident, evicted)
            log.info("recovery: %d evicted blocks still had their files; resident again",
                     len(evicted))
        return removed

    async def load_block(self, block_id: bytes, *, reader: bool = True,
                         ino: int | None = None) -> Buffer:
        """The plaintext of a block: from the cache, the hot store, or the archive (recall).
        `reader`: a read request waits for it (counted for the hit ratio and time to first
        byte); readahead and background work pass False. `ino`: the file it is read for."""
        while True:
            data = self.cache.get(block_id)
            if data is not None:
                self.stats["cache_hits"] += 1
                return data
            event = self._loading.get(block_id)
            if event is None:
                break
            await event.wait()
        event = self._loading[block_id] = trio.Event()
        start = trio.current_time()
        try:
            try:
                data = await trio.to_thread.run_sync(self.store.get, block_id, limiter=self.io)
                self.stats["blocks_loaded"] += 1
                if self._failed_loads.pop(block_id, None) is not None:
                    # A recall that gave up on this block finished after all (its fetch
                    # thread outlived the timeout) and stored it: the outage is over.
                    self.health.clear("recall")
            except IntegrityError as exc:
                data = await self._recall(block_id, exc)
                if reader:
                    self.stats["reader_recalls"] += 1
                    self.ttfb.append(trio.current_time() - start)
                if ino is not None and self._reader_recalls is not None:
                    # A full channel (a burst of recalls) only costs that hint.
                    with contextlib.suppress(trio.WouldBlock):
                        self._reader_recalls.send_nowait(ino)
            self.cache.put(block_id, data)
            return data
        finally:
            del self._loading[block_id]
            event.set()

    async def _recall(self, block_id: bytes, exc: IntegrityError) -> bytes:
        """The hot copy is missing, evicted or damaged: fetch the archive's, or answer EIO."""
        if self.recall is not None:
            try:
                data = await self.recall(block_id)
                self.stats["blocks_recalled"] += 1
                self.health.clear("recall")
                return data
            except IntegrityError as recall_exc:
                exc = recall_exc
        # The kernel retries a failed read (and readahead asks too): one line per block and
        # minute is enough.
        now = time.monotonic()
        if now - self._failed_loads.get(block_id, -math.inf) > FAILED_LOAD_QUIET:
            log.error("%s", exc)
        self._failed_loads[block_id] = now
        if len(self._failed_loads) > 10_000:
            self._failed_loads.clear()
        if isinstance(exc, Unavailable):
            # The archive did not answer (in time): an outage, not damage.
            self.health.report("recall", str(exc))
        else:
            self.health.report("integrity", str(exc))
        raise OSError(errno.EIO, os.strerror(errno.EIO)) from None

    def delete_evicted(self, ids: list[bytes]) -> None:
        """Delete the files of blocks just marked evicted (worker thread). A block a writer
        holds pending keeps its file: the writer is storing it again right now."""
        with self._pending_lock:
            for block_id in ids:
                if not self._pending[block_id]:
                    self.store.delete(block_id)

    def loading(self, block_id: bytes) -> bool:
        return block_id in self._loading or self.cache.get(block_id) is not None
