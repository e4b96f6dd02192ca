"""Open files: write buffers, the sealing pipeline, reads and truncation, per inode.

State is per inode, not per handle, because POSIX wants every descriptor of a file to see every
write at once. A write lands in a 1 MiB plaintext buffer; a buffer that reaches the end of its
block is sealed in the background while the writer continues. `flush` (every close) seals what is
left, waits for the pipeline and commits the new block map, size and times in one transaction;
until then reads are served from the buffers and the sealed-but-uncommitted blocks.

A per-inode lock serialises the steps that change the buffers (write, truncate, flush), because a
read-modify-write of a partial block awaits a block load in the middle. Reads take no lock.
A failed seal (a full disk) puts the buffer back and reports the error at the next flush, so the
data is not lost and can be retried once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import trio

from vnafs.dicom.sniff import is_encapsulated
from vnafs.fs.engine import Engine, StoreCommitError
from vnafs.meta.namespace import NewBlock
from vnafs.meta.records import BLOCK_SIZE, BlockRef, Inode
from vnafs.meta.tx import Tx

log = logging.getLogger("vnafs.files")

# Partial blocks one file may buffer before the oldest is sealed (random writers), and all files
# together (many concurrent writers): plaintext held in memory stays bounded whatever the load.
MAX_DIRTY_BLOCKS = 8
MAX_TOTAL_DIRTY_BLOCKS = 64  # the default of `[store] max_dirty_mib`
READAHEAD_BLOCKS = 8
DAY_NS = 86_400 * 10**9


@dataclass(frozen=True, slots=True)
class ClosedFile:
    """Sent when the last handle of a file whose content changed is released (the DICOM
    indexer listens): its size and the committed block references of its first and last
    block, whose plaintext is most likely still in the block cache."""

    ino: int
    size: int
    first: BlockRef | None = None
    last: BlockRef | None = None


@dataclass(eq=False)
class OpenFile:
    """The state of one open inode, shared by all its handles (docs/concurrency.md).

    Everything here lives on the trio loop; worker threads never see an `OpenFile`. "Lock"
    below means `lock`, held across awaits by `write`, `flush` and truncation; "loop" means
    the field changes only between two awaits (trio runs one task at a time), so readers need
    no lock. Invariant: every block index of the file is findable in exactly one of `dirty`,
    `inflight` (then `sealed` once done) or LMDB, so a reader never sees a hole that is not
    one.
    """

    ino: int
    # Size, times as writers see them; written under the lock (and by setattr), read anywhere.
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    # File handles holding this state (loop); the state goes when it drops to 0.
    handles: int = 0
    # Serialises the steps that change buffers: write, flush, truncation.
    lock: trio.Lock = field(default_factory=trio.Lock)
    # Block index -> plaintext not yet handed to a seal task (lock).
    dirty: dict[int, bytearray] = field(default_factory=dict)
    # Block index -> sealed block waiting for the commit (None: a block truncated away).
    # Added by seal tasks (loop), cleared by the commit under the lock.
    sealed: dict[int, NewBlock | None] = field(default_factory=dict)
    # Block index -> event set when its seal task ends (loop); a block is here from the
    # moment it leaves `dirty` until it is in `sealed` or back in `dirty` after a failure.
    inflight: dict[int, trio.Event] = field(default_factory=dict)
    # Ids this file's seal tasks produced and the engine keeps pending (never deleted) until
    # the commit that references them, or the discard after a failed flush (loop).
    pending_ids: list[bytes] = field(default_factory=list)
    # Block map records already in LMDB, so sequential reads do not look each one up (and
    # decrypt it) once per 128 KiB request. Cleared by truncation, updated by commits (loop).
    committed: dict[int, BlockRef | None] = field(default_factory=dict)
    # The first seal failure since the last flush (a full disk); reported by that flush (loop).
    error: OSError | None = None
    # Size or times changed and not committed yet (lock or loop).
    meta_dirty: bool = False
    # Sequential-read detection and the next block readahead will request (loop).
    last_read_end: int = -1
    readahead_next: int = 0
    # False once block 0 shows an encapsulated DICOM transfer syntax (already compressed).
    compress: bool = True
    # A file seen through a snapshot: its blocks are those of `source` at `epoch`, and it is
    # never written (`ino` is the snapshot inode number the kernel knows). Set at attach.
    epoch: int | None = None
    source: int = 0
    # A commit changed the content or size since the file was opened: `closed` hears of it
    # at the last release (loop).
    changed: bool = False

    @property
    def busy(self) -> bool:
        return bool(self.dirty or self.sealed or self.inflight or self.meta_dirty)


class Files:
    """The open-file table of a mounted store. Runs on the trio loop only.

    `orphans` receives inode numbers that lost their last name (the engine sends them after
    each commit); one task here frees each once no handle holds it. `closed` is sent a
    `ClosedFile` whenever the last handle of a file whose content changed goes away.
    """

    def __init__(self, engine: Engine, nursery: trio.Nursery, *, sync_on_close: bool,
                 readonly: bool = False,
                 orphans: trio.MemoryReceiveChannel[int] | None = None,
                 closed: trio.MemorySendChannel[ClosedFile] | None = None,
                 max_dirty_blocks: int = MAX_TOTAL_DIRTY_BLOCKS) -> None:
        self.engine = engine
        # Partial blocks across all open files before the oldest is sealed early (memory).
        self.max_dirty_blocks = max_dirty_blocks
        self.ns = engine.ns
        self.nursery = nursery
        self.sync_on_close = sync_on_close
        # A read-only archive mount: nothing is ever committed, not even atime.
        self.readonly = readonly
        # Inode -> its open state, while at least one file handle holds it.
        self.open: dict[int, OpenFile] = {}
        # Directory inode -> open directory handles (an unlinked directory is freed at 0).
        self.dir_handles: Counter[int] = Counter()
        self._readahead = trio.CapacityLimiter(READAHEAD_BLOCKS * 2)
        self._closed = closed
        if orphans is not None:
            nursery.start_soon(self._reap_orphans, orphans)

    # -- lifecycle ------------------------------------------------------------------------------

    def attach(self, node: Inode, *, epoch: int | None = None, source: int = 0) -> OpenFile:
        of = self.open.get(node.ino)
        if of is None:
            of = OpenFile(node.ino, node.size, node.atime_ns, node.mtime_ns, node.ctime_ns,
                          epoch=epoch, source=source or node.ino)
            self.open[node.ino] = of
        of.handles += 1
        return of

    async def release(self, ino: int) -> None:
        of = self.open[ino]
        of.handles -= 1
        if of.handles > 0:
            return
        try:
            if of.busy:
                await self.flush(ino)
        finally:
            if of.handles == 0:
                del self.open[ino]
                if of.changed:
                    self._send_closed(of)
                if of.pending_ids:
                    # A failed flush (a full disk) leaves sealed blocks nothing will reference.
                    self.engine.release_pending(of.pending_ids)
                    await self.engine.discard_unreferenced(of.pending_ids)
                await self._free_if_orphan(ino)

    async def release_dir(self, ino: int) -> None:
        self.dir_handles[ino] -= 1
        if self.dir_handles[ino] <= 0:
            del self.dir_handles[ino]
            await self._free_if_orphan(ino)

    def open_dir(self, ino: int) -> None:
        self.dir_handles[ino] += 1

    def is_open(self, ino: int) -> bool:
        return ino in self.open

    def _in_use(self, ino: int) -> bool:
        return ino in self.open or ino in self.dir_handles

    async def _reap_orphans(self, orphans: trio.MemoryReceiveChannel[int]) -> None:
        async for ino in orphans:
            if not self._in_use(ino):
                self.nursery.start_soon(self._free_if_orphan, ino)

    def _send_closed(self, of: OpenFile) -> None:
        if self._closed is None:
            return
        last = (of.size - 1) // BLOCK_SIZE if of.size else 0
        self._closed.send_nowait(ClosedFile(of.ino, of.size, of.committed.get(0),
                                            of.committed.get(last)))

    async def _free_if_orphan(self, ino: int) -> None:
        # The read is what every close of a linked file pays; a write transaction here cost
        # each close one more trip through the writer thread.
        if self._in_use(ino) or not self.ns.is_orphan(ino):
            return
        try:
            await self.engine.commit(self.ns.free_orphan, ino)
        except OSError as exc:
            log.warning("freeing inode %d failed (%s); it is freed at the next mount", ino,
                        exc.strerror)

    def overlay(self, node: Inode) -> Inode:
        """The inode as open handles see it (size and times not yet committed)."""
        of = self.open.get(node.ino)
        if of is not None:
            node.size = of.size
            node.atime_ns, node.mtime_ns = of.atime_ns, of.mtime_ns
            node.ctime_ns = max(node.ctime_ns, of.ctime_ns)
        return node

    # -- block content ----------------------------------------------------------------------------

    async def _ref(self, of: OpenFile, index: int) -> BlockRef | None:
        while index in of.inflight:
            await of.inflight[index].wait()
        if index in of.sealed:
            new = of.sealed[index]
            return None if new is None else new.ref
        if index in of.committed:
            return of.committed[index]
        with self.ns.db.begin() as txn:
            ref = self.ns.block_ref(txn, of.source, index, of.epoch)
        of.committed[index] = ref
        return ref

    async def _content(self, of: OpenFile, index: int) -> bytes | bytearray | memoryview:
        """The block's bytes that belong to the file (may be shorter than the block)."""
        buf = of.dirty.get(index)
        if buf is not None:
            return buf
        ref = await self._ref(of, index)
        buf = of.dirty.get(index)  # a writer may have filled it while we waited
        if buf is not None:
            return buf
        if ref is None:
            return b""
        data = await self.engine.load_block(ref.block_id, ino=of.source)
        return memoryview(data)[: ref.length]

    # -- writing ----------------------------------------------------------------------------------

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        of = self.open[ino]
        async with of.lock:
            if of.error is not None and of.error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise of.error
            pos, view = offset, memoryview(data)
            while view:
                index, boff = divmod(pos, BLOCK_SIZE)
                n = min(len(view), BLOCK_SIZE - boff)
                buf = of.dirty.get(index)
                if buf is None:
                    if (boff == 0 and n == BLOCK_SIZE) or index * BLOCK_SIZE >= of.size:
                        buf = bytearray()
                    else:
                        buf = bytearray(await self._content(of, index))
                    of.dirty[index] = buf
                if len(buf) < boff:
                    buf.extend(bytes(boff - len(buf)))
                buf[boff : boff + n] = view[:n]
                pos += n
                view = view[n:]
                of.size = max(of.size, pos)
                if boff + n == BLOCK_SIZE:
                    await self._seal(of, index)
            now = time.time_ns()
            of.mtime_ns = of.ctime_ns = now
            of.meta_dirty = True
            while len(of.dirty) > MAX_DIRTY_BLOCKS or (
                of.dirty and self._dirty_blocks() > self.max_dirty_blocks
            ):
                await self._seal(of, min(of.dirty))
        return len(data)

    def _dirty_blocks(self) -> int:
        return sum(len(f.dirty) for f in self.open.values())

    async def _seal(self, of: OpenFile, index: int) -> None:
        # A block must always be findable by readers: in `dirty`, `inflight`, `sealed` or
        # LMDB. So the buffer leaves `dirty` only in the same step that marks it in flight.
        while index in of.inflight:
            await of.inflight[index].wait()
        buf = of.dirty.pop(index)
        done = of.inflight[index] = trio.Event()
        try:
            await self.engine.inflight.acquire()
        except BaseException:
            of.dirty.setdefault(index, buf)
            del of.inflight[index]
            done.set()
            raise
        self.nursery.start_soon(self._seal_task, of, index, buf, done)

    async def _seal_task(self, of: OpenFile, index: int, buf: bytearray, done: trio.Event) -> None:
        try:
            self._check_encapsulated(of, index, buf)
            block_id, stored = await self.engine.store_block(buf, compress=of.compress)
            of.pending_ids.append(block_id)
            length = min(len(buf), of.size - index * BLOCK_SIZE)
            of.sealed[index] = NewBlock(BlockRef(block_id, length), stored) if length > 0 else None
        except OSError as exc:
            self._write_failed(of, exc)
            of.error = exc
            of.dirty.setdefault(index, buf)  # keep the data; the next flush retries
        except Exception:
            log.exception("writing a block of inode %d failed", of.ino)
            of.error = OSError(errno.EIO, os.strerror(errno.EIO))
            of.dirty.setdefault(index, buf)
        finally:
            del of.inflight[index]
            self.engine.inflight.release()
            done.set()

    @staticmethod
    def _check_encapsulated(of: OpenFile, index: int, buf: bytearray) -> None:
        # Compressed pixel data (JPEG...) is not worth compressing again.
        if index == 0 and is_encapsulated(buf):
            of.compress = False

    def _write_failed(self, of: OpenFile, exc: OSError) -> None:
        log.error("writing a block of inode %d failed: %s", of.ino, exc.strerror)
        self.engine.health.report("block_write", f"writing a block failed: {exc.strerror}")

    async def _drain(self, of: OpenFile) -> None:
        while of.inflight:
            await next(iter(of.inflight.values())).wait()

    async def flush(self, ino: int, *, durable: bool = False) -> None:
        of = self.open.get(ino)
        if of is None:
            if durable:
                await self.engine.barrier()
            return
        async with of.lock:
            # A block that failed to seal earlier (a full disk) is retried here: the space
            # may be back.
            of.error = None
            try:
                if len(of.dirty) == 1 and not of.inflight and self.engine.idle_for_one_hop():
                    await self._seal_and_commit(of)
                else:
                    for index in sorted(of.dirty):
                        await self._seal(of, index)
                    await self._drain(of)
                    if of.error is not None:
                        raise of.error
                    if of.sealed or of.meta_dirty:
                        await self._commit(of)
            except OSError:
                # The caller (close, fsync) gets the error, and the file is at once what it
                # was at its last successful commit, for every reader, from now on.
                await self._drop_uncommitted(of)
                raise
            finally:
                of.error = None
            if durable or self.sync_on_close:
                # One syncfs after the commit covers the blocks and the LMDB pages together.
                await self.engine.barrier()

    async def _seal_and_commit(self, of: OpenFile) -> None:
        """`flush` of a file whose one unsealed block is its last: the seal and the commit in
        one hop to the writer thread (`Engine.store_and_commit`), one thread round trip less
        per close than `_seal` + `_commit`. Same states for readers as `_seal`: the block
        leaves `dirty` only as it enters `inflight`, and `committed` has it before the event
        is set. The caller holds `of.lock` and handles errors as for the two-step path."""
        (index, buf), = of.dirty.items()
        del of.dirty[index]
        done = of.inflight[index] = trio.Event()
        try:
            await self.engine.inflight.acquire()
        except BaseException:
            of.dirty[index] = buf
            del of.inflight[index]
            done.set()
            raise
        try:
            self._check_encapsulated(of, index, buf)
            length = min(len(buf), of.size - index * BLOCK_SIZE)
            sealed = dict(of.sealed)
            try:
                block_id, _, _, tx = await self.engine.store_and_commit(
                    buf, of.compress, self._commit_with, of.ino, index, length, sealed,
                    of.size, of.mtime_ns, of.ctime_ns, of.atime_ns)
            except StoreCommitError as exc:
                of.pending_ids.append(exc.block_id)
                of.dirty[index] = buf
                raise exc.__cause__ or OSError(errno.EIO, os.strerror(errno.EIO)) from None
            except OSError as exc:
                self._write_failed(of, exc)
                of.dirty[index] = buf
                raise
            of.pending_ids.append(block_id)
            sealed[index] = NewBlock(BlockRef(block_id, length), 0) if length > 0 else None
            self._committed(of, tx, sealed)
        finally:
            del of.inflight[index]
            self.engine.inflight.release()
            done.set()

    def _commit_with(self, tx: Tx, block_id: bytes, stored: int, ino: int, index: int,
                     length: int, sealed: dict[int, NewBlock | None], size: int,
                     mtime_ns: int, ctime_ns: int, atime_ns: int) -> Inode:
        """The commit of `_seal_and_commit`, in the writer thread: `_commit`'s, with the block
        just stored added to the sealed ones."""
        blocks = dict(sealed)
        blocks[index] = NewBlock(BlockRef(block_id, length), stored) if length > 0 else None
        return self.ns.commit_file(tx, ino, blocks, size=size, mtime_ns=mtime_ns,
                                   ctime_ns=ctime_ns, atime_ns=atime_ns)

    async def _drop_uncommitted(self, of: OpenFile) -> None:
        """Forget every change of `of` since its last commit (the caller holds `of.lock`):
        buffers, sealed blocks (their files go unless something else references them), size
        and times come back from LMDB (docs/architecture.md, "Data path", on errors)."""
        await self._drain(of)
        of.dirty.clear()
        of.sealed.clear()
        pending, of.pending_ids = of.pending_ids, []
        if pending:
            self.engine.release_pending(pending)
            await self.engine.discard_unreferenced(pending)
        node = self.ns.get_inode(of.source, of.epoch)
        of.size = node.size
        of.atime_ns, of.mtime_ns, of.ctime_ns = node.atime_ns, node.mtime_ns, node.ctime_ns
        of.meta_dirty = False
        of.last_read_end = -1
        of.readahead_next = 0
        log.warning("inode %d: changes since its last commit dropped after a failed close or "
                    "fsync; it reads as committed", of.ino)

    async def _commit(self, of: OpenFile) -> None:
        """Commit the sealed blocks, size and times; the caller holds `of.lock`, which keeps
        writers and seal tasks out, and the sealed blocks stay visible to readers until LMDB
        has them."""
        sealed = dict(of.sealed)
        _, tx = await self.engine.commit_tx(
            self.ns.commit_file, of.ino, sealed, size=of.size,
            mtime_ns=of.mtime_ns, ctime_ns=of.ctime_ns, atime_ns=of.atime_ns,
        )
        self._committed(of, tx, sealed)

    def _committed(self, of: OpenFile, tx: Tx, blocks: dict[int, NewBlock | None]) -> None:
        """After the commit of `blocks` (the caller holds `of.lock`): they are in LMDB now, so
        they move to `committed`, and the ids they hold pending are released."""
        of.changed = of.changed or bool(tx.changed)
        for index, new in blocks.items():
            of.committed[index] = None if new is None else new.ref
        of.sealed.clear()
        of.meta_dirty = False
        pending, of.pending_ids = of.pending_ids, []
        self.engine.release_pending(pending)

    async def setattr(self, ino: int, changes: dict[str, int]) -> Inode:
        """Commit attribute changes (`Namespace.setattr` keywords), keeping the open state of
        `ino`, if any, in step: a size change first commits what writers buffered, then cuts
        the buffers and the committed block map together."""
        if "size" in changes:
            await self.flush(ino)
            await self._truncate(ino, changes["size"])
        of = self.open.get(ino)
        if of is not None:
            of.atime_ns = changes.get("atime_ns", of.atime_ns)
            of.mtime_ns = changes.get("mtime_ns", of.mtime_ns)
        node, tx = await self.engine.commit_tx(self._setattr_tx, ino, changes)
        if of is not None:
            if "size" in changes:
                of.committed.clear()  # LMDB's block map changed under the cache
                of.mtime_ns = node.mtime_ns
            of.ctime_ns = node.ctime_ns
            of.changed = of.changed or bool(tx.changed)
        elif tx.changed and self._closed is not None:
            self._closed.send_nowait(ClosedFile(ino, node.size))
        return node

    def _setattr_tx(self, tx: Tx, ino: int, changes: dict[str, int]) -> Inode:
        return self.ns.setattr(tx, ino, **changes)

    async def _truncate(self, ino: int, size: int) -> None:
        """Cut the open state of `ino` to `size`; the caller commits the inode's new size."""
        of = self.open.get(ino)
        if of is None:
            return
        async with of.lock:
            await self._drain(of)
            first_gone = -(-size // BLOCK_SIZE)
            cut = size % BLOCK_SIZE
            for index in [i for i in of.dirty if i >= first_gone]:
                del of.dirty[index]
            for index in [i for i in of.sealed if i >= first_gone]:
                of.sealed[index] = None
            if cut:
                last = first_gone - 1
                if last in of.dirty:
                    del of.dirty[last][cut:]
                new = of.sealed.get(last)
                if new is not None and new.ref.length > cut:
                    of.sealed[last] = NewBlock(BlockRef(new.ref.block_id, cut), new.stored)
            of.size = size
            of.committed.clear()  # the caller's commit shortens or drops LMDB records
            of.readahead_next = 0
            of.mtime_ns = of.ctime_ns = time.time_ns()

    # -- reading ----------------------------------------------------------------------------------

    async def read(self, ino: int, offset: int, size: int, *, touch_atime: bool = True
                   ) -> bytes:
        return bytes(await self.read_view(ino, offset, size, touch_atime=touch_atime))

    async def read_view(self, ino: int, offset: int, size: int, *, touch_atime: bool = True
                        ) -> bytes | bytearray | memoryview:
        """`read` without the final copy when the range lies in one block: then the answer is
        a view of the cached block, which the FUSE reply copies anyway; the caller must not
        keep it."""
        of = self.open[ino]
        end = min(offset + size, of.size)
        if offset >= end:
            return b""
        parts: list[bytes | bytearray | memoryview] = []
        for index in range(offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1):
            start = index * BLOCK_SIZE
            lo, hi = max(offset, start) - start, min(end, start + BLOCK_SIZE) - start
            data = await self._content(of, index)
            piece = data[lo:hi]
            parts.append(piece)
            if len(piece) < hi - lo:
                parts.append(bytes(hi - lo - len(piece)))
        if offset == of.last_read_end:
            self._start_readahead(of, end)
        of.last_read_end = end
        if touch_atime and not self.readonly and of.epoch is None:
            self._touch_atime(of)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _start_readahead(self, of: OpenFile, end: int) -> None:
        # Keep READAHEAD_BLOCKS blocks ahead of the reader; each block is requested once.
        ahead = -(-end // BLOCK_SIZE)
        first = max(ahead, of.readahead_next)
        last = min(ahead + READAHEAD_BLOCKS, -(-of.size // BLOCK_SIZE))
        if first >= last:
            return
        of.readahead_next = last
        todo = [i for i in range(first, last)
                if i not in of.committed and i not in of.sealed and i not in of.dirty]
        if todo:
            with self.ns.db.begin() as txn:
                for i in todo:
                    of.committed[i] = self.ns.block_ref(txn, of.source, i, of.epoch)
        for i in range(first, last):
            ref = of.committed.get(i)
            if ref is not None and not self.engine.loading(ref.block_id):
                self.nursery.start_soon(self._prefetch, ref.block_id, of.source)

    async def _prefetch(self, block_id: bytes, ino: int) -> None:
        async with self._readahead:
            with contextlib.suppress(OSError):  # the read that needs the block reports it
                await self.engine.load_block(block_id, reader=False, ino=ino)

    def _touch_atime(self, of: OpenFile) -> None:
        # relatime: only when atime is older than mtime/ctime or a day old, so reads rarely cost
        # a metadata write.
        now = time.time_ns()
        if of.atime_ns <= max(of.mtime_ns, of.ctime_ns) or now - of.atime_ns > DAY_NS:
            of.atime_ns = now
            of.meta_dirty = True
