"""The in-process layer: a hot store and the trio-side engine, wired as a mount, without FUSE.

`open_vfs` builds what `vnafs.daemon.serve` builds, in the same order and with the same
collaborators (docs/architecture.md, "Wiring"): the `Engine` with the DICOM index as its
transaction hooks and the `orphans` channel, `Files` with `orphans` and `closed`, the
`Indexer` listening on `closed`, `Views`, `Snapshots` and the `SnapshotService`. What it leaves
out is everything that needs the kernel: pyfuse3, `Operations`, `KernelCache` and the control
socket. Tests call the layer below `Operations` the way `Operations` does: namespace changes
through `engine.commit(store.ns.<op>, ...)`, file data through `files.attach`, `write`, `read`,
`flush`, `setattr` and `release`.

On a clean exit `open_vfs` does what an unmount does (commit what open files hold, index what is
queued) and then cancels its tasks; the `vfs` fixture then runs `fsck` over the store, so every
test also proves that it left the store consistent.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
import trio.testing

from vnafs.dicom.index import DicomIndex
from vnafs.fs.engine import BlockCache, Engine
from vnafs.fs.files import ClosedFile, Files
from vnafs.fs.indexer import Indexer
from vnafs.fs.snapshot_service import SnapshotService
from vnafs.fs.views import Views
from vnafs.keys import KekSource
from vnafs.meta.db import u64
from vnafs.meta.namespace import Namespace
from vnafs.meta.records import BLOCK_SIZE, ROOT_INO, BlockRef, Inode, RefCount
from vnafs.meta.snapshots import Snapshot, Snapshots, encode
from vnafs.store.lifecycle import Store, mkfs, open_store, recover

B = BLOCK_SIZE
SOURCE = KekSource(key=bytes(range(32)), origin="unit tests")
# What the kernel sends per WRITE request by default.
CHUNK = 128 << 10
REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


def corpus(name: str) -> Path:
    """A file of pydicom's test corpus (only files that ship with pydicom: no download)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return Path(path)


def make_store(root: Path) -> Store:
    """A new, empty hot store at `root`, opened (and locked) for writing."""
    mkfs(root, SOURCE, archive_url=None, uid=os.getuid(), gid=os.getgid())
    return open_store(root, SOURCE)


def pattern(n: int, seed: int = 0) -> bytes:
    """`n` bytes that differ at every offset of every block (so a misplaced byte shows) and
    compress well; a different `seed` gives different bytes everywhere."""
    unit = bytes((i * 7 + seed * 31 + (i >> 8) * 13) & 0xFF for i in range(4093))
    return (unit * (n // len(unit) + 1))[:n]


@dataclass
class Vfs:
    """One "mounted" store: its parts, and the few steps every test needs."""

    store: Store
    engine: Engine
    files: Files
    index: DicomIndex
    indexer: Indexer
    views: Views
    snaps: Snapshots
    snapshots: SnapshotService
    nursery: trio.Nursery
    # Run fsck after the test (the fixture): off for tests that damage the store on purpose.
    fsck_at_exit: bool = True
    # Leave `open_vfs` like a killed daemon: nothing flushed, nothing indexed, no barrier.
    crashed: bool = False

    @property
    def ns(self) -> Namespace:
        return self.store.ns

    # -- namespace ------------------------------------------------------------------------------

    async def mknod(self, name: bytes, parent: int = ROOT_INO, mode: int = REG, *,
                    exclusive: bool = True) -> Inode:
        node: Inode = await self.engine.commit(self.ns.mknod, parent, name, mode, os.getuid(),
                                               os.getgid(), 0, b"", exclusive)
        return node

    async def mkdir(self, name: bytes, parent: int = ROOT_INO) -> Inode:
        return await self.mknod(name, parent, DIR)

    def lookup(self, path: str, epoch: int | None = None) -> Inode:
        node = self.ns.get_inode(ROOT_INO, epoch)
        for part in path.strip("/").split("/"):
            node = self.ns.lookup(node.ino, part.encode(), epoch)
        return node

    def inode(self, ino: int, epoch: int | None = None) -> Inode:
        return self.ns.get_inode(ino, epoch)

    def names(self, parent: int = ROOT_INO, epoch: int | None = None) -> dict[bytes, int]:
        return {name: node.ino for name, node, _ in self.ns.readdir(parent, 0, 100_000, epoch)}

    # -- files ----------------------------------------------------------------------------------

    async def create(self, name: bytes, parent: int = ROOT_INO) -> int:
        """open(O_CREAT | O_EXCL): a new file with one handle; returns its inode number."""
        node = await self.mknod(name, parent)
        self.files.attach(node)
        return node.ino

    def open(self, ino: int) -> int:
        self.files.attach(self.ns.get_inode(ino))
        return ino

    async def write(self, ino: int, offset: int, data: bytes, chunk: int = CHUNK) -> None:
        """One write(2) as the kernel delivers it: requests of at most `chunk` bytes."""
        for at in range(0, len(data), chunk):
            n = await self.files.write(ino, offset + at, data[at : at + chunk])
            assert n == len(data[at : at + chunk])

    async def close(self, ino: int) -> None:
        """close(2) of a descriptor that no other process shares: the kernel sends FLUSH,
        then RELEASE (`Files` state is per inode: it goes with the last handle)."""
        await self.files.flush(ino)
        await self.files.release(ino)

    async def write_file(self, name: bytes, data: bytes, parent: int = ROOT_INO) -> int:
        """create, write, close: what a PACS does for every instance."""
        ino = await self.create(name, parent)
        await self.write(ino, 0, data)
        await self.close(ino)
        return ino

    async def read(self, ino: int, offset: int = 0, size: int | None = None) -> bytes:
        """Read through an open handle of `ino` (the file must be open)."""
        if size is None:
            size = self.files.open[ino].size - offset
        return await self.files.read(ino, offset, size)

    async def read_file(self, ino: int) -> bytes:
        """open, read everything in kernel-sized requests, close."""
        self.open(ino)
        try:
            size = self.files.open[ino].size
            parts = [await self.files.read(ino, at, CHUNK) for at in range(0, size, CHUNK)]
            return b"".join(parts)
        finally:
            await self.close(ino)

    async def unlink(self, name: bytes, parent: int = ROOT_INO) -> Inode:
        node: Inode = await self.engine.commit(self.ns.unlink, parent, name)
        return node

    # -- snapshots ------------------------------------------------------------------------------

    def open_in_snapshot(self, snap: Snapshot, ino: int) -> int:
        """What `Operations.open` does for `/.snapshots/<name>/...`: the file as `snap` froze
        it, under the inode number the kernel knows (`snap_id << 40 | ino`)."""
        node = self.ns.get_inode(ino, snap.epoch)
        outer = encode(snap.id, ino)
        self.files.attach(dataclasses.replace(node, ino=outer), epoch=snap.epoch, source=ino)
        return outer

    async def read_in_snapshot(self, snap: Snapshot, ino: int) -> bytes:
        outer = self.open_in_snapshot(snap, ino)
        try:
            return await self.read(outer)
        finally:
            await self.files.release(outer)

    # -- blocks ---------------------------------------------------------------------------------

    def block_refs(self, ino: int, epoch: int | None = None) -> dict[int, BlockRef]:
        with self.store.db.begin() as txn:
            return dict(self.ns.block_refs(txn, ino, epoch))

    def block_files(self) -> set[bytes]:
        """Ids of the block files in the hot store's blocks/ directory."""
        return set(self.store.hot.ids())

    def refcount(self, block_id: bytes) -> int | None:
        with self.store.db.begin() as txn:
            body = self.store.db.get(txn, "refs", block_id)
        return None if body is None else RefCount.unpack(body).count

    def block_path(self, block_id: bytes) -> Path:
        return self.store.hot.path(block_id)

    def drop_cache(self) -> None:
        """Forget every plaintext block, so the next reads open the sealed block files."""
        self.engine.cache = BlockCache(self.engine.cache.capacity)

    def has_inode_record(self, ino: int) -> bool:
        """Whether any version of `ino`'s inode record is left in LMDB."""
        with self.store.db.begin() as txn:
            cur = txn.cursor(db=self.store.db.dbs["inodes"])
            return cur.set_range(u64(ino)) and bytes(cur.key()).startswith(u64(ino))

    # -- waiting --------------------------------------------------------------------------------

    async def indexed(self, timeout: float = 20) -> None:
        """Wait until every file closed so far is indexed, and every task that work woke
        (invalidations, rechecks) has run."""
        with trio.fail_after(timeout):
            await trio.testing.wait_all_tasks_blocked()
            await self.indexer.wait_idle()

    def _busy(self) -> bool:
        engine = self.engine
        unfreed = any(not self.files.is_open(ino) and ino not in self.files.dir_handles
                      for ino in self.ns.orphans())
        # A commit is visible in LMDB before its writer thread has deleted the block files
        # it freed: wait for the worker threads too.
        threads = (engine.writer.borrowed_tokens or engine.cpu.borrowed_tokens
                   or engine.io.borrowed_tokens)
        return bool(unfreed or threads or self.indexer.pending)

    async def settle(self, timeout: float = 20) -> None:
        """Wait until the background work of the last steps is done: the indexer is idle,
        every inode that lost its last name while no handle held it has been freed, and no
        worker thread is still busy with what a commit left to do."""
        with trio.fail_after(timeout):
            await self.indexed()
            while self._busy():
                await trio.sleep(0.002)
                await self.indexed()


@asynccontextmanager
async def open_vfs(store: Store, *, index_lag: float = 10) -> AsyncIterator[Vfs]:
    """Serve `store` in-process as `vnafs.daemon.serve` would, minus FUSE (see the module
    docstring). On a clean exit open files are committed and the indexer drained first, as
    by an unmount; after `vfs.crashed = True` the tasks are just cancelled, as by `kill -9`
    (the caller then closes the store and opens it again, as the next mount would)."""
    cfg = store.config
    recover(store)
    store.ns.start_mount()
    index = DicomIndex(store.ns, by_patient=cfg.dicom.by_patient)
    orphans_send, orphans_recv = trio.open_memory_channel[int](math.inf)
    closed_send, closed_recv = trio.open_memory_channel[ClosedFile](math.inf)
    engine = Engine(
        store.ns,
        store.hot,
        cache_bytes=cfg.store.cache_mib << 20,
        workers=cfg.store.workers,
        max_inflight_blocks=max(2, cfg.store.max_inflight_mib * (1 << 20) // BLOCK_SIZE),
        hooks=index,
        orphans=orphans_send,
    )
    views = Views(index)
    snaps = Snapshots(store.ns)
    async with trio.open_nursery() as nursery:
        files = Files(engine, nursery, sync_on_close=cfg.mount.sync_on_close,
                      orphans=orphans_recv, closed=closed_send)
        indexer = Indexer(engine, files, index, closed=closed_recv, max_lag=index_lag)
        snapshots = SnapshotService(engine, snaps, cfg.snapshots)
        await nursery.start(indexer.run)
        vfs = Vfs(store, engine, files, index, indexer, views, snaps, snapshots, nursery)
        yield vfs
        if vfs.crashed:
            nursery.cancel_scope.cancel()
            return
        # What an unmount does before it lets go of the store.
        for ino in list(files.open):
            await files.flush(ino)
        await vfs.indexed(30)
        # (No final barrier: a syncfs of /tmp's file system costs seconds while other work
        # writes to it, and nothing here is about power loss.)
        nursery.cancel_scope.cancel()
