"""The daemon's DICOM indexer: parses files after their last writer closed them.

Why a separate task: a PACS answers its modality only after `close()` returns, so indexing must
never sit on that path. Closing a written file puts its inode in a set; a few tasks take inodes
from the set, read the file through the open-file layer (a file just written is still in the
block cache), parse it in a worker thread on the CPU limiter and commit the result on the writer
thread. The change mark written with the data (docs/architecture.md section 8) makes this
crash-safe: marks left by a crash are queued again at mount.

The parser reads through `_FileReader`, a seekable file object over the inode: the first bytes
come from one read done on the event loop, anything else from `trio.from_thread.run`, so a
50 MiB multi-frame costs two small reads, not 50 MiB.

The one exception is a second file with the SOP Instance UID of one already indexed (the same
instance from another sender, or a conflicting one): then the files whose content differs are
read in full, through the same reader and limiter, to digest and compare their data sets
(`_compare_copies`; docs/architecture.md section 8). The index remembers the outcome, so that
happens once per content, and asks for a file to be indexed again (`take_recheck`) when copies
indexed at the same time could not see each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import logging
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import BinaryIO, cast

import trio

from vnafs.dicom.header import Parsed, Status, dataset_diff, dataset_digest, parse, viewable
from vnafs.dicom.index import (
    CopyCheck,
    DicomIndex,
    IndexResult,
    InstanceRecord,
    NewStudy,
    pair,
)
from vnafs.errors import IntegrityError
from vnafs.fs.engine import Engine
from vnafs.fs.files import ClosedFile, Files
from vnafs.meta.records import BLOCK_SIZE, Inode

log = logging.getLogger("vnafs.indexer")

# What `_keep_edges` copies of each closed file: enough for nearly every header (median
# 1.5 KiB, p90 3.4 KiB) and for the completeness check at the end. The total is what a 10 s
# index lag of a fast ingest may hold: 256 MiB (64 KiB heads) made up most of the daemon's
# peak RSS in a 2,000-file ingest (302 -> 128 MiB with the block cache at 32 MiB).
HEAD_BYTES = 16 << 10
TAIL_BYTES = 4 << 10
MAX_EDGE_BYTES = 24 << 20
# Files read and parsed at once (parsing itself is capped by the engine's CPU limiter), and
# the most parse results committed in one transaction.
TASKS = 4
MAX_BATCH = 64
# While files are being written, indexing waits until writes pause for QUIET_SECONDS, the
# oldest queued file has waited max_lag seconds (`[dicom] index_lag`), or this many wait.
QUIET_SECONDS = 0.25
DEFAULT_MAX_LAG = 10
MAX_QUEUE_BEFORE_RUN = 10_000


# How often the indexer takes the rechecks the index asked for in transactions other than its
# own (an unlink's); its own commits' rechecks are taken at once.
RECHECK_POLL_SECONDS = 1.0


@dataclasses.dataclass(eq=False)
class _Result:
    result: IndexResult
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    error: BaseException | None = None


class _FileReader(io.RawIOBase):
    """A read-only, seekable view of a file for pydicom, running in a worker thread.

    Reads are served from in-memory pieces of the file (the head and tail kept at close, and
    the last window fetched); anything else is fetched through the event loop in windows of
    `WINDOW` bytes. Every read returns all the bytes asked for up to the end of the file:
    pydicom takes a short read for a truncated file.
    """

    WINDOW = 64 << 10
    # Whole-file reads (comparing copies of an instance) fetch up to this much at once.
    MAX_FETCH = 4 << 20

    def __init__(self, size: int, pieces: list[tuple[int, bytes]],
                 fetch: Callable[[int, int], bytes]) -> None:
        self._size = size
        self._pieces = [p for p in pieces if p[1]]
        self._fetch = fetch
        self._window: tuple[int, bytes] = (0, b"")
        self._pos = 0

    @property
    def size(self) -> int:
        return self._size

    def add(self, start: int, data: bytes) -> None:
        """Serve reads of `data` at `start` from memory (bytes the caller already has)."""
        if data:
            self._pieces.append((start, data))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _piece_at(self, pos: int, wanted: int) -> tuple[int, bytes]:
        for start, data in (*self._pieces, self._window):
            if start <= pos < start + len(data):
                return start, data
        want = min(max(self.WINDOW, min(wanted, self.MAX_FETCH)), self._size - pos)
        self._window = (pos, self._fetch(pos, want))
        if not self._window[1]:
            raise OSError(errno.EIO, "file shorter than its size while indexing")
        return self._window

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), max(0, self._size - self._pos))
        done = 0
        while done < want:
            start, data = self._piece_at(self._pos, want - done)
            chunk = data[self._pos - start : self._pos - start + want - done]
            buffer[done : done + len(chunk)] = chunk
            done += len(chunk)
            self._pos += len(chunk)
        return done


async def _nothing(inos: list[int]) -> None:
    return None


class Indexer:
    """Queues, parses and commits closed files (see the module docstring). Runs on the trio
    loop; parsing runs in worker threads on the engine's CPU limiter.

    Collaborators, all given to the constructor: `closed` delivers the files whose content
    changed when their last handle goes (from `Files`); `invalidate` drops what the kernel
    caches about inodes whose link counts the index changed and about view names it removed
    (`KernelCache.drop`); `max_lag` is `[dicom] index_lag`.
    """

    def __init__(self, engine: Engine, files: Files, index: DicomIndex, *,
                 closed: trio.MemoryReceiveChannel[ClosedFile],
                 invalidate: Callable[[list[int]], Awaitable[None]] = _nothing,
                 new_studies: trio.MemorySendChannel[NewStudy] | None = None,
                 max_lag: float = DEFAULT_MAX_LAG) -> None:
        self.engine = engine
        self.files = files
        self.index = index
        self.ns = engine.ns
        self.max_lag = max_lag
        self._closed = closed
        # `_intake` is (or is about to be) blocked receiving from `closed`; see `pending`.
        self._intake_waiting = False
        self._invalidate = invalidate
        # Hears of each study that got its first instance (tiering: prior-study prefetch),
        # except while a reindex rebuilds the index, when every study is "new".
        self._new_studies = new_studies
        self._reindexing = False
        # Inodes waiting to be indexed (a set: a file closed 100 times is parsed once), and
        # trio.current_time() when the oldest of them arrived.
        self._queue: set[int] = set()
        self._queued_since: float | None = None
        self._wakeup = trio.Event()
        # Parse results waiting for the committer, and the event that wakes it.
        self._results: list[_Result] = []
        self._results_ready = trio.Event()
        # ino -> (size, head, tail) copied at close; bounded by MAX_EDGE_BYTES in total.
        self._edges: dict[int, tuple[int, bytes, bytes]] = {}
        self._edge_bytes = 0
        # Callers of `wait_idle` now waiting: indexing runs at once while any do.
        self._urgent = 0
        # Files being read, parsed or committed right now, and the event set when none are.
        self._busy = 0
        self._idle = trio.Event()
        self.stats = {"indexed": 0, "not_dicom": 0, "problems": 0, "errors": 0,
                      "from_header": 0, "rechecks": 0, "dataset_digests": 0,
                      "dataset_diffs": 0}
        # Queued files whose copies are to be compared again although their content did not
        # change (asked for by the index: `DicomIndex.take_recheck`).
        self._rechecks: set[int] = set()
        self.reindex_total = 0

    # -- what the open-file layer tells us --------------------------------------------------------

    async def _intake(self) -> None:
        while True:
            self._intake_waiting = True
            try:
                closed = await self._closed.receive()
            except trio.EndOfChannel:
                return
            finally:
                self._intake_waiting = False
            self._keep_edges(closed)
            self.enqueue(closed.ino)

    def _keep_edges(self, closed: ClosedFile) -> None:
        """Copy the head and tail of a just-closed file from the block cache, where its last
        writes still are: the parser needs little else, and indexing may run much later, when
        those blocks would have to be loaded and decrypted again."""
        first, last, size = closed.first, closed.last, closed.size
        if self._edge_bytes > MAX_EDGE_BYTES or not size or first is None or last is None:
            return
        head_block = self.engine.cache.get(first.block_id)
        tail_block = self.engine.cache.get(last.block_id)
        last_start = (size - 1) // BLOCK_SIZE * BLOCK_SIZE
        if head_block is None or tail_block is None or last_start + last.length != size:
            return
        head = bytes(head_block[: min(first.length, HEAD_BYTES)])
        tail = bytes(tail_block[max(0, last.length - TAIL_BYTES) : last.length])
        self._take_edges(closed.ino)
        self._edges[closed.ino] = (size, head, tail)
        self._edge_bytes += len(head) + len(tail)

    def enqueue(self, ino: int) -> None:
        if not self._queue:
            self._queued_since = trio.current_time()
        self._queue.add(ino)
        self._wakeup.set()

    @property
    def pending(self) -> int:
        # Files still in the `closed` channel count: a file released a moment ago must hold
        # `wait_idle` as much as one already queued. A send to a waiting receiver skips the
        # buffer: trio hands the file to `_intake` and wakes it, so the one file in its hand
        # shows only as a receiver that stopped waiting before its task ran. (`_intake`
        # enqueues without awaiting in between, so no file is in neither place.)
        channel = self._closed.statistics()
        in_hand = self._intake_waiting and channel.tasks_waiting_receive == 0
        return channel.current_buffer_used + in_hand + len(self._queue) + self._busy

    async def wait_idle(self) -> None:
        """Return once nothing is queued or being indexed (`vnafs find --wait`, tests).

        A waiter opens the gate (`_quiet_enough`): somebody wants the answer now."""
        self._urgent += 1
        self._wakeup.set()
        try:
            self._take_rechecks()
            while self.pending:
                # Shared by every waiter; replaced only once it has fired (see `_sleep`).
                if self._idle.is_set():
                    self._idle = trio.Event()
                await self._idle.wait()
        finally:
            self._urgent -= 1

    def _quiet_enough(self) -> float:
        """0 if indexing may run now, else how long to wait before asking again.

        Indexing costs the daemon about as much CPU per file as a quarter of the write path,
        and both compete for one Python interpreter: while a PACS is sending, the indexer
        stands back and lets files queue (the change marks make that safe), then works
        through them in large batches. It runs anyway once the oldest queued file has waited
        `max_lag` seconds or the queue is long, so a never-ending stream is indexed too.
        """
        if self._urgent or self.max_lag == 0 or len(self._queue) >= MAX_QUEUE_BEFORE_RUN:
            return 0.0
        now = trio.current_time()
        if self._queued_since is not None and now - self._queued_since >= self.max_lag:
            return 0.0
        quiet_for = now - self.engine.last_write
        return 0.0 if quiet_for >= QUIET_SECONDS else max(0.02, QUIET_SECONDS - quiet_for)

    # -- the tasks --------------------------------------------------------------------------------

    async def reindex(self) -> int:
        """Empty the index and index every regular file again; returns how many are queued."""
        inos = await self.engine.commit(self.index.reset)
        self.reindex_total = len(inos)
        self._reindexing = bool(inos)
        for ino in inos:
            self.enqueue(ino)
        if inos:  # a new store has nothing to index: no line about it
            log.info("reindex started: %d files", len(inos))
        return len(inos)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            if await trio.to_thread.run_sync(self.index.schema, limiter=self.engine.io) == 0:
                # A store made before the index existed (or never indexed): index it all.
                await self.reindex()
            for ino in await trio.to_thread.run_sync(self.index.marked, limiter=self.engine.io):
                self.enqueue(ino)
        except (IntegrityError, OSError) as exc:
            # Damaged metadata must not stop the mount: reads of the damage give EIO, and
            # `vnafs fsck` says what is wrong. Files closed from now on are still indexed.
            message = f"DICOM index not resumed at mount: {exc}"
            log.error("%s", message)
            self.engine.health.report("index", message)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._intake)
            for _ in range(TASKS):
                nursery.start_soon(self._worker)
            nursery.start_soon(self._committer)
            nursery.start_soon(self._poll_rechecks)
            task_status.started()

    async def _worker(self) -> None:
        while True:
            if not self._queue:
                if not self.pending:
                    self._reindexing = False
                    self._idle.set()
                await self._sleep()
                continue
            delay = self._quiet_enough()
            if delay:
                with trio.move_on_after(delay):
                    await self._sleep()
                continue
            ino = self._queue.pop()
            if not self._queue:
                self._queued_since = None
            self._busy += 1
            try:
                await self.index_one(ino)
                self.engine.health.clear("index")
            except (IntegrityError, OSError) as exc:
                # Damage (EIO, a failed record) is one line; the mark stays for fsck/reindex.
                self.stats["errors"] += 1
                log.error("indexing inode %d failed: %s", ino, exc)
                self.engine.health.report("index", f"indexing inode {ino} failed: {exc}")
            except Exception:
                # A bug must not stop indexing of other files; the change mark stays, so the
                # file is retried at the next mount or reindex.
                self.stats["errors"] += 1
                log.exception("indexing inode %d failed", ino)
                self.engine.health.report("index", f"indexing inode {ino} failed; see the log")
            finally:
                self._busy -= 1
                if not self.pending:
                    self._idle.set()

    async def _sleep(self) -> None:
        # All workers share one event; it is replaced only once it has fired, so a worker
        # never waits on an event nobody will set.
        if self._wakeup.is_set():
            self._wakeup = trio.Event()
        await self._wakeup.wait()

    async def index_one(self, ino: int) -> None:
        edges = self._take_edges(ino)
        recheck = ino in self._rechecks
        self._rechecks.discard(ino)
        with self.ns.db.begin() as txn:
            mark = self.index.mark(txn, ino)
            node = self.ns.inode(txn, ino)
            entry = self.index.entry(txn, ino)
            digest = self.index.digest(txn, ino) if entry is not None else ""
        parsed: Parsed | None = None
        if (entry is not None and entry.header and entry.record.digest == digest
                and (entry.record.gen != self.index.gen or recheck)):
            # A reindex, or a recheck, of an unchanged file: its stored header bytes are enough.
            parsed = await trio.to_thread.run_sync(_reparse, entry.record, entry.header,
                                                   limiter=self.engine.cpu)
            self.stats["from_header"] += 1
        if parsed is None and node is not None and node.nlink and stat.S_ISREG(node.mode) \
                and node.size:
            parsed = await self._parse(node, edges)
        copies = await self._compare_copies(ino, parsed) if parsed is not None else None
        item = _Result(IndexResult(ino, parsed, mark, copies))
        self._results.append(item)
        self._results_ready.set()
        await item.done.wait()
        if item.error is not None:
            raise item.error
        if recheck:
            self.stats["rechecks"] += 1
        elif parsed is None or parsed.status is Status.NOT_DICOM:
            self.stats["not_dicom"] += 1
        elif parsed.status is Status.OK:
            self.stats["indexed"] += 1
        else:
            self.stats["problems"] += 1
            # One line, no PHI: the inode number and a reason without values.
            log.warning("DICOM file inode %d is %s: %s", ino, parsed.status.value,
                        parsed.problem)

    async def _compare_copies(self, ino: int, parsed: Parsed) -> CopyCheck | None:
        """Compare a file with the other files of its SOP Instance UID (None: there are none).

        Copies with identical content need nothing read. Otherwise every copy whose data set
        was never digested is read in full (`header.dataset_digest`, in a worker thread on the
        CPU limiter), and two versions never compared before are compared element by element
        (`header.dataset_diff`). What was learnt is kept in the instance records, so each file
        is read for this at most once per content, and each two versions compared once.
        """
        inst = parsed.instance
        if inst is None or not viewable(parsed.status, parsed.problem, inst.sop_uid,
                                        inst.study_uid, inst.series_uid):
            return None
        with self.ns.db.begin() as txn:
            records: dict[int, InstanceRecord] = {}
            nodes: dict[int, Inode] = {}
            for other in self.index.sop_inos(txn, inst.sop_uid):
                entry = self.index.entry(txn, other) if other != ino else None
                node = self.ns.inode(txn, other) if entry is not None else None
                if entry is not None and node is not None and node.nlink \
                        and entry.record.viewable:
                    records[other], nodes[other] = entry.record, node
            if not records:
                return None
            mine = self.index.digest(txn, ino)
            own = self.index.entry(txn, ino)
            node = self.ns.inode(txn, ino)
        if node is None:
            return None
        nodes[ino] = node
        copies = {ino: mine} | {other: rec.digest for other, rec in records.items()}
        if len(set(copies.values())) == 1:
            return CopyCheck(copies)  # identical files: one version, nothing to read
        known = list(records.values())
        if own is not None and own.record.digest == mine:
            known.append(own.record)  # unchanged since it was last compared (a recheck)
        by_content = {rec.digest: rec.ds_digest for rec in known if rec.ds_digest}
        diffs = {pair(rec.ds_digest, other): tags for rec in known if rec.ds_digest
                 for other, tags in rec.ds_diff.items()}
        ds: dict[int, str] = {}
        for i in sorted(copies):
            if copies[i] not in by_content:
                try:
                    by_content[copies[i]] = await self._dataset_digest(nodes[i])
                except (IntegrityError, OSError) as exc:
                    log.error("comparing copies of a DICOM instance: reading inode %d failed: "
                              "%s", i, exc)
                    continue
            ds[i] = by_content[copies[i]]
        first: dict[str, int] = {}  # data set digest -> its first-stored copy
        for i in sorted(ds):
            first.setdefault(ds[i], i)
        versions = list(first)  # in the order of their first-stored copies
        merged: dict[str, str] = {}
        for n, a in enumerate(versions):
            for b in versions[n + 1 :]:
                if a in merged or b in merged or pair(a, b) in diffs:
                    continue
                try:
                    tags = await self._dataset_diff(nodes[first[a]], nodes[first[b]])
                except (IntegrityError, OSError) as exc:
                    log.error("comparing copies of a DICOM instance: reading inode %d or %d "
                              "failed: %s", first[a], first[b], exc)
                    continue  # not recorded: compared again when the copies change
                if tags == []:
                    merged[b] = a  # equal elements in other bytes (another VR encoding, say)
                else:
                    diffs[pair(a, b)] = tuple(tags or ())
        return CopyCheck(copies, {i: merged.get(d, d) for i, d in ds.items()}, diffs)

    async def _dataset_digest(self, node: Inode) -> str:
        self.stats["dataset_digests"] += 1
        async with self._reader(node) as reader:
            return await trio.to_thread.run_sync(dataset_digest, cast(BinaryIO, reader),
                                                 reader.size, self.index.name_key,
                                                 limiter=self.engine.cpu)

    async def _dataset_diff(self, a: Inode, b: Inode) -> list[str] | None:
        self.stats["dataset_diffs"] += 1
        async with self._reader(a) as ra, self._reader(b) as rb:
            return await trio.to_thread.run_sync(dataset_diff, cast(BinaryIO, ra), ra.size,
                                                 cast(BinaryIO, rb), rb.size,
                                                 limiter=self.engine.cpu)

    def _take_rechecks(self) -> None:
        for ino in self.index.take_recheck():
            self._rechecks.add(ino)
            self.enqueue(ino)

    async def _poll_rechecks(self) -> None:
        """Rechecks asked for in transactions other than the indexer's (an unlink's)."""
        while True:
            await trio.sleep(RECHECK_POLL_SECONDS)
            self._take_rechecks()

    async def _committer(self) -> None:
        """Commit parse results in batches: while one transaction waits for the writer
        thread, the next batch collects, so a busy ingest costs few index commits."""
        while True:
            if not self._results:
                self._results_ready = trio.Event()
                await self._results_ready.wait()
                continue
            batch, self._results = self._results[:MAX_BATCH], self._results[MAX_BATCH:]
            try:
                await self._commit(batch)
            except (IntegrityError, OSError) as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                else:
                    for item in batch:  # find the file that fails; commit the others
                        try:
                            await self._commit([item])
                        except (IntegrityError, OSError) as one:
                            item.error = one
            except Exception as exc:
                for item in batch:
                    item.error = exc
            for item in batch:
                item.done.set()

    async def _commit(self, batch: list[_Result]) -> None:
        await self.engine.commit(self.index.apply_many, [r.result for r in batch])
        # Before the batch counts as done, so `wait_idle` also waits for the rechecks.
        self._take_rechecks()
        await self._invalidate([r.result.ino for r in batch])
        new = self.index.take_new_studies()
        if self._new_studies is not None and not self._reindexing:
            for study in new:
                self._new_studies.send_nowait(study)

    def _take_edges(self, ino: int) -> tuple[int, bytes, bytes] | None:
        edges = self._edges.pop(ino, None)
        if edges is not None:
            self._edge_bytes -= len(edges[1]) + len(edges[2])
        return edges

    async def _parse(self, node: Inode, edges: tuple[int, bytes, bytes] | None
                     ) -> Parsed | None:
        ino = node.ino
        if edges is not None and edges[0] != node.size:
            edges = None  # changed since it was closed
        if edges is not None and not _may_be_dicom(edges[1]):
            return None  # decided from memory: no block load for most non-DICOM files
        async with self._reader(node) as reader:
            size = reader.size
            if edges is None:
                head = await self.files.read(ino, 0, min(size, HEAD_BYTES), touch_atime=False)
                if not _may_be_dicom(head):
                    return None
                reader.add(0, head)
            else:
                reader.add(0, edges[1])
                reader.add(size - len(edges[2]), edges[2])
            return await trio.to_thread.run_sync(parse, cast(BinaryIO, reader), size,
                                                 limiter=self.engine.cpu)

    @contextlib.asynccontextmanager
    async def _reader(self, node: Inode) -> AsyncIterator[_FileReader]:
        """A `_FileReader` over the file, for a worker thread; holds it open meanwhile."""
        ino = node.ino
        of = self.files.attach(node)
        try:

            def fetch(offset: int, length: int) -> bytes:
                return trio.from_thread.run(self._read_plain, ino, offset, length)

            yield _FileReader(of.size, [], fetch)
        finally:
            await self.files.release(ino)

    async def _read_plain(self, ino: int, offset: int, length: int) -> bytes:
        return await self.files.read(ino, offset, length, touch_atime=False)


def _reparse(record: InstanceRecord, header: bytes) -> Parsed | None:
    """Identity from stored header bytes; the completeness verdict of the full file is kept."""
    parsed = parse(io.BytesIO(header), len(header), check_complete=False)
    if parsed.instance is None or parsed.status is Status.NOT_DICOM:
        return None  # cannot happen for a header we stored; read the file instead
    status = record.status
    if status is Status.OK and parsed.status is not Status.OK:
        return None
    return dataclasses.replace(parsed, status=status, problem=record.problem, header=header)


def _may_be_dicom(head: bytes) -> bool:
    """Whether the parser should look at a file: it has the DICM marker, or (rare, old files
    without a preamble) starts like a raw dataset (group 0002 or 0008). The parser decides."""
    if head[128:132] == b"DICM":
        return True
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)
