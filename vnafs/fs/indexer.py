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
import io
import logging
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vnafs.dicom.header import Parsed, Status, parse
from vnafs.dicom.index import DicomIndex
from vnafs.errors import IntegrityError
from vnafs.fs.engine import Engine
from vnafs.fs.files import Files

log = logging.getLogger("vnafs.indexer")

PREFIX_BYTES = 1 << 20
# Files read and parsed at once (parsing itself is capped by the engine's CPU limiter), and
# the most parse results committed in one transaction.
TASKS = 4
MAX_BATCH = 64


@dataclasses.dataclass(eq=False)
class _Result:
    ino: int
    parsed: Parsed | None
    mark: int | None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    error: BaseException | None = None


class _FileReader(io.RawIOBase):
    """A read-only, seekable view of a file for pydicom, running in a worker thread."""

    def __init__(self, prefix: bytes, size: int, read: Callable[[int, int], bytes]) -> None:
        self._prefix = prefix
        self._size = size
        self._read = read
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

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), max(0, self._size - self._pos))
        if want == 0:
            return 0
        end = self._pos + want
        if end <= len(self._prefix):
            data = self._prefix[self._pos:end]
        else:
            data = self._read(self._pos, want)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


class Indexer:
    def __init__(self, engine: Engine, files: Files, index: DicomIndex) -> None:
        self.engine = engine
        self.files = files
        self.index = index
        self.ns = engine.ns
        self._queue: set[int] = set()
        self._written_open: set[int] = set()
        self._wakeup = trio.Event()
        self._results: list[_Result] = []
        self._results_ready = trio.Event()
        self._busy = 0
        self._idle = trio.Event()
        self.stats = {"indexed": 0, "not_dicom": 0, "problems": 0, "errors": 0,
                      "from_header": 0}
        self.reindex_total = 0
        # Set by the daemon: drop what the kernel caches about an inode whose link count the
        # index just changed, and view names the index just removed.
        self.invalidate: Callable[[list[int]], Awaitable[None]] = _nothing
        engine.on_changed = self.changed
        files.on_closed = self.closed

    # -- what the engine and the open-file layer tell us ------------------------------------------

    def changed(self, ino: int) -> None:
        """A commit changed `ino`'s content: index it when its last handle closes."""
        if ino in self.files.open:
            self._written_open.add(ino)
        else:
            self.enqueue(ino)

    def closed(self, ino: int) -> None:
        if ino in self._written_open:
            self._written_open.discard(ino)
            self.enqueue(ino)

    def enqueue(self, ino: int) -> None:
        self._queue.add(ino)
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._queue) + self._busy

    async def wait_idle(self) -> None:
        """Return once nothing is queued or being indexed (for `vnafs status --wait`, tests)."""
        while self.pending:
            self._idle = trio.Event()
            await self._idle.wait()

    # -- the tasks --------------------------------------------------------------------------------

    async def reindex(self) -> int:
        """Empty the index and index every regular file again; returns how many are queued."""
        inos = await self.engine.commit(self.index.reset)
        self.reindex_total = len(inos)
        for ino in inos:
            self._queue.add(ino)
        self._wakeup.set()
        log.info("reindex started: %d files", len(inos))
        return len(inos)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            if await trio.to_thread.run_sync(self.index.schema, limiter=self.engine.io) == 0:
                # A store made before the index existed (or never indexed): index it all.
                await self.reindex()
            for ino in await trio.to_thread.run_sync(self.index.marked, limiter=self.engine.io):
                self._queue.add(ino)
        except (IntegrityError, OSError) as exc:
            # Damaged metadata must not stop the mount: reads of the damage give EIO, and
            # `vnafs fsck` says what is wrong. Files closed from now on are still indexed.
            message = f"DICOM index not resumed at mount: {exc}"
            log.error("%s", message)
            self.engine.health.report("index", message)
        async with trio.open_nursery() as nursery:
            for _ in range(TASKS):
                nursery.start_soon(self._worker)
            nursery.start_soon(self._committer)
            task_status.started()

    async def _worker(self) -> None:
        while True:
            if not self._queue:
                self._wakeup = trio.Event()
                if not self._busy:
                    self._idle.set()
                await self._wakeup.wait()
                continue
            ino = self._queue.pop()
            self._busy += 1
            try:
                await self.index_one(ino)
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

    async def index_one(self, ino: int) -> None:
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
            parsed = await self._parse(node.ino)
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
        await self.invalidate([r.ino for r in batch])

    async def _parse(self, ino: int) -> Parsed | None:
        node = self.ns.get_inode(ino)
        of = self.files.attach(node)
        try:
            size = of.size
            head = await self.files.read(ino, 0, 132, touch_atime=False)
            if head[128:132] != b"DICM" and not _may_be_raw_dataset(head):
                # Most non-DICOM files stop here; files without a preamble (rare, old) still
                # go to the parser, which decides.
                return None
            prefix = await self.files.read(ino, 0, min(size, PREFIX_BYTES), touch_atime=False)

            def read(offset: int, length: int) -> bytes:
                return trio.from_thread.run(self._read_plain, ino, offset, length)

            reader = io.BufferedReader(_FileReader(prefix, size, read), 256 << 10)
            return await trio.to_thread.run_sync(parse, reader, size, limiter=self.engine.cpu)
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


async def _nothing(inos: list[int]) -> None:
    return None


def _may_be_raw_dataset(prefix: bytes) -> bool:
    """Whether a file without the DICM marker starts like a raw dataset (group 0002 or 0008)."""
    group_le = int.from_bytes(prefix[0:2], "little")
    group_be = int.from_bytes(prefix[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)
