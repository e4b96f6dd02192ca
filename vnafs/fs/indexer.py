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
"""

from __future__ import annotations

import dataclasses
import errno
import io
import logging
import stat
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO, cast

import trio

from vnafs.dicom.header import Parsed, Status, parse
from vnafs.dicom.index import DicomIndex
from vnafs.errors import IntegrityError
from vnafs.fs.engine import Engine
from vnafs.fs.files import ClosedFile, Files
from vnafs.meta.records import BLOCK_SIZE, Inode

log = logging.getLogger("vnafs.indexer")

# What `_keep_edges` copies of each closed file: enough for nearly every header (median
# 1.5 KiB, p90 3.4 KiB) and for the completeness check at the end.
HEAD_BYTES = 64 << 10
TAIL_BYTES = 4 << 10
MAX_EDGE_BYTES = 256 << 20
# Files read and parsed at once (parsing itself is capped by the engine's CPU limiter), and
# the most parse results committed in one transaction.
TASKS = 4
MAX_BATCH = 64
# While files are being written, indexing waits until writes pause for QUIET_SECONDS, the
# oldest queued file has waited max_lag seconds (`[dicom] index_lag`), or this many wait.
QUIET_SECONDS = 0.25
DEFAULT_MAX_LAG = 10
MAX_QUEUE_BEFORE_RUN = 10_000


@dataclasses.dataclass(eq=False)
class _Result:
    ino: int
    parsed: Parsed | None
    mark: int | None
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

    def __init__(self, size: int, pieces: list[tuple[int, bytes]],
                 fetch: Callable[[int, int], bytes]) -> None:
        self._size = size
        self._pieces = [p for p in pieces if p[1]]
        self._fetch = fetch
        self._window: tuple[int, bytes] = (0, b"")
        self._pos = 0

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

    def _piece_at(self, pos: int) -> tuple[int, bytes]:
        for start, data in (*self._pieces, self._window):
            if start <= pos < start + len(data):
                return start, data
        want = min(self.WINDOW, self._size - pos)
        self._window = (pos, self._fetch(pos, want))
        if not self._window[1]:
            raise OSError(errno.EIO, "file shorter than its size while indexing")
        return self._window

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), max(0, self._size - self._pos))
        done = 0
        while done < want:
            start, data = self._piece_at(self._pos)
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
                 max_lag: float = DEFAULT_MAX_LAG) -> None:
        self.engine = engine
        self.files = files
        self.index = index
        self.ns = engine.ns
        self.max_lag = max_lag
        self._closed = closed
        self._invalidate = invalidate
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
                      "from_header": 0}
        self.reindex_total = 0

    # -- what the open-file layer tells us --------------------------------------------------------

    async def _intake(self) -> None:
        async for closed in self._closed:
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
        return len(self._queue) + self._busy

    async def wait_idle(self) -> None:
        """Return once nothing is queued or being indexed (`vnafs find --wait`, tests).

        A waiter opens the gate (`_quiet_enough`): somebody wants the answer now."""
        self._urgent += 1
        self._wakeup.set()
        try:
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
        for ino in inos:
            self.enqueue(ino)
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
            task_status.started()

    async def _worker(self) -> None:
        while True:
            if not self._queue:
                if not self._busy:
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
                if not self._queue and not self._busy:
                    self._idle.set()

    async def _sleep(self) -> None:
        # All workers share one event; it is replaced only once it has fired, so a worker
        # never waits on an event nobody will set.
        if self._wakeup.is_set():
            self._wakeup = trio.Event()
        await self._wakeup.wait()

    async def index_one(self, ino: int) -> None:
        edges = self._take_edges(ino)
        with self.ns.db.begin() as txn:
            mark = self.index.mark(txn, ino)
            node = self.ns.inode(txn, ino)
            entry = self.index.entry(txn, ino)
            digest = self.index.digest(txn, ino) if entry is not None else ""
        parsed: Parsed | None = None
        if (entry is not None and entry.header and entry.record.get("gen", 0) != self.index.gen
                and entry.record["digest"] == digest):
            # A reindex of an unchanged file: its stored header bytes are enough.
            parsed = await trio.to_thread.run_sync(_reparse, entry.record, entry.header,
                                                   limiter=self.engine.cpu)
            self.stats["from_header"] += 1
        if parsed is None and node is not None and node.nlink and stat.S_ISREG(node.mode) \
                and node.size:
            parsed = await self._parse(node, edges)
        item = _Result(ino, parsed, mark)
        self._results.append(item)
        self._results_ready.set()
        await item.done.wait()
        if item.error is not None:
            raise item.error
        if parsed is None or parsed.status is Status.NOT_DICOM:
            self.stats["not_dicom"] += 1
        elif parsed.status is Status.OK:
            self.stats["indexed"] += 1
        else:
            self.stats["problems"] += 1
            # One line, no PHI: the inode number and a reason without values.
            log.warning("DICOM file inode %d is %s: %s", ino, parsed.status.value,
                        parsed.problem)

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
        await self.engine.commit(self.index.apply_many,
                                 [(r.ino, r.parsed, r.mark) for r in batch])
        await self._invalidate([r.ino for r in batch])

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
        of = self.files.attach(node)
        try:
            size = of.size
            if edges is None:
                head = await self.files.read(ino, 0, min(size, HEAD_BYTES), touch_atime=False)
                if not _may_be_dicom(head):
                    return None
                pieces = [(0, head)]
            else:
                pieces = [(0, edges[1]), (size - len(edges[2]), edges[2])]

            def fetch(offset: int, length: int) -> bytes:
                return trio.from_thread.run(self._read_plain, ino, offset, length)

            reader = _FileReader(size, pieces, fetch)
            return await trio.to_thread.run_sync(parse, cast(BinaryIO, reader), size,
                                                 limiter=self.engine.cpu)
        finally:
            await self.files.release(ino)

    async def _read_plain(self, ino: int, offset: int, length: int) -> bytes:
        return await self.files.read(ino, offset, length, touch_atime=False)


def _reparse(record: dict[str, Any], header: bytes) -> Parsed | None:
    """Identity from stored header bytes; the completeness verdict of the full file is kept."""
    parsed = parse(io.BytesIO(header), len(header), check_complete=False)
    if parsed.instance is None or parsed.status is Status.NOT_DICOM:
        return None  # cannot happen for a header we stored; read the file instead
    status = Status(record["status"])
    if status is Status.OK and parsed.status is not Status.OK:
        return None
    return dataclasses.replace(parsed, status=status, problem=record["problem"], header=header)


def _may_be_dicom(head: bytes) -> bool:
    """Whether the parser should look at a file: it has the DICM marker, or (rare, old files
    without a preamble) starts like a raw dataset (group 0002 or 0008). The parser decides."""
    if head[128:132] == b"DICM":
        return True
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)
