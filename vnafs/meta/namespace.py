"""POSIX namespace operations on the metadata store, independent of FUSE.

Each mutating operation is one function that checks and changes state inside a single LMDB write
transaction, which makes the races PACS writers rely on exact: `O_EXCL` create, concurrent
`mkdir` of one study folder, `RENAME_NOREPLACE`. Callers run mutations on one writer thread
(`Tx` carries the transaction, the time and the block ids whose last reference was dropped, which
the caller deletes after the commit). Read helpers open their own short read transactions and may
run anywhere.

Errors are `OSError` with the errno POSIX prescribes; the FUSE layer passes the errno through.
Inodes whose last link goes away are put in the `orphans` table rather than freed at once: only the
caller knows whether a handle is still open, and an orphan left behind by a crash is freed at the
next mount.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import lmdb

from vnafs.meta.blocks import Blocks
from vnafs.meta.db import MetaDB, read_u64, u64
from vnafs.meta.records import (
    BLOCK_SIZE,
    ROOT_INO,
    BlockRef,
    Inode,
    pack_dirent,
    pack_xattr,
    unpack_dirent,
    unpack_xattr,
)
from vnafs.meta.tx import Tx

NAME_MAX = 255
XATTR_CREATE = 1
XATTR_REPLACE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# Inode numbers stay below 2**40 so snapshot inodes can be `snap_id << 40 | ino`.
MAX_INO = (1 << 40) - 1


def fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass(frozen=True, slots=True)
class NewBlock:
    """A block sealed by a writer, ready to be linked into a file's block map."""

    ref: BlockRef
    stored: int


class Namespace:
    def __init__(self, db: MetaDB) -> None:
        self.db = db
        self.blocks = Blocks(db)
        with db.begin() as txn:
            self.epoch = db.counter(txn, "epoch", 1)
            self.generation = db.counter(txn, "generation", 1)

    # -- creation of a new file system --------------------------------------------------------

    @staticmethod
    def format(db: MetaDB, uid: int, gid: int, now: int) -> None:
        with db.begin(write=True) as txn:
            if db.get(txn, "counters", b"next_ino") is not None:
                raise RuntimeError("metadata already formatted")
            db.set_counter(txn, "next_ino", ROOT_INO + 1)
            db.set_counter(txn, "epoch", 1)
            db.set_counter(txn, "generation", 1)
            root = Inode(ROOT_INO, 1, stat.S_IFDIR | 0o755, uid, gid, 2, 0, 0, now, now, now,
                         ROOT_INO, now)
            db.vput(txn, "inodes", u64(ROOT_INO), root.pack(), 1)

    def start_mount(self) -> None:
        """Bump the generation stamped on inodes created by this mount."""
        with self.db.begin(write=True) as txn:
            self.generation = self.db.counter(txn, "generation", 1) + 1
            self.db.set_counter(txn, "generation", self.generation)

    # -- keys -----------------------------------------------------------------------------------

    def dirent_key(self, parent: int, name: bytes) -> bytes:
        return u64(parent) + self.db.sealer.name_hmac(name)[:16]

    def xattr_key(self, ino: int, name: bytes) -> bytes:
        return u64(ino) + self.db.sealer.name_hmac(b"x" + name)[:16]

    @staticmethod
    def block_key(ino: int, index: int) -> bytes:
        return u64(ino) + u64(index)

    # -- reads ----------------------------------------------------------------------------------

    # Every read takes `epoch`: None reads the live tree, a number reads the tree a snapshot
    # froze at that epoch (docs/architecture.md section 10).

    def inode(self, txn: lmdb.Transaction, ino: int, epoch: int | None = None) -> Inode | None:
        body = self.db.vget(txn, "inodes", u64(ino), epoch)
        return None if body is None else Inode.unpack(ino, body)

    def need_inode(self, txn: lmdb.Transaction, ino: int, epoch: int | None = None) -> Inode:
        node = self.inode(txn, ino, epoch)
        if node is None:
            raise fail(errno.ENOENT)
        return node

    def get_inode(self, ino: int, epoch: int | None = None) -> Inode:
        with self.db.begin() as txn:
            return self.need_inode(txn, ino, epoch)

    def child(self, txn: lmdb.Transaction, parent: int, name: bytes,
              epoch: int | None = None) -> int | None:
        body = self.db.vget(txn, "dirents", self.dirent_key(parent, name), epoch)
        return None if body is None else unpack_dirent(body)[0]

    def lookup(self, parent: int, name: bytes, epoch: int | None = None) -> Inode:
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        with self.db.begin() as txn:
            if name == b".":
                return self.need_inode(txn, parent, epoch)
            if name == b"..":
                up = self.need_inode(txn, parent, epoch).parent or ROOT_INO
                return self.need_inode(txn, up, epoch)
            child = self.child(txn, parent, name, epoch)
            if child is None:
                raise fail(errno.ENOENT)
            return self.need_inode(txn, child, epoch)

    def readdir(
        self, parent: int, offset: int, limit: int = 1000, epoch: int | None = None
    ) -> list[tuple[bytes, Inode, int]]:
        """Up to `limit` entries (name, inode, next offset) from the cookie `offset` on.

        The cookie is derived from the entry's name HMAC (62 bits, plus one, never 0), so it stays
        valid while other entries come and go.
        """
        out: list[tuple[bytes, Inode, int]] = []
        start = b"" if offset <= 0 else ((offset - 1) << 2).to_bytes(8, "big")
        with self.db.begin() as txn:
            for ident, body in self.db.vscan(txn, "dirents", u64(parent), start, epoch):
                child, name = unpack_dirent(body)
                node = self.inode(txn, child, epoch)
                if node is None:
                    continue  # should not happen; fsck reports dangling entries
                cookie = (int.from_bytes(ident[:8], "big") >> 2) + 2
                out.append((name, node, cookie))
                if len(out) >= limit:
                    break
        return out

    def is_empty_dir(self, txn: lmdb.Transaction, ino: int) -> bool:
        return next(self.db.vscan(txn, "dirents", u64(ino)), None) is None

    def block_ref(self, txn: lmdb.Transaction, ino: int, index: int,
                  epoch: int | None = None) -> BlockRef | None:
        body = self.db.vget(txn, "blockmap", self.block_key(ino, index), epoch)
        return None if body is None else BlockRef.unpack(body)

    def block_refs(self, txn: lmdb.Transaction, ino: int, epoch: int | None = None
                   ) -> Iterator[tuple[int, BlockRef]]:
        for ident, body in self.db.vscan(txn, "blockmap", u64(ino), epoch=epoch):
            yield read_u64(ident), BlockRef.unpack(body)

    def getxattr(self, ino: int, name: bytes, epoch: int | None = None) -> bytes:
        with self.db.begin() as txn:
            self.need_inode(txn, ino, epoch)
            body = self.db.vget(txn, "xattrs", self.xattr_key(ino, name), epoch)
        if body is None:
            raise fail(errno.ENODATA)
        return unpack_xattr(body)[1]

    def listxattr(self, ino: int, epoch: int | None = None) -> list[bytes]:
        with self.db.begin() as txn:
            self.need_inode(txn, ino, epoch)
            return [unpack_xattr(b)[0]
                    for _, b in self.db.vscan(txn, "xattrs", u64(ino), epoch=epoch)]

    def is_orphan(self, ino: int) -> bool:
        with self.db.begin() as txn:
            return self.db.get(txn, "orphans", u64(ino)) is not None

    def orphans(self) -> list[int]:
        with self.db.begin() as txn:
            return [read_u64(k) for k, _ in self.db.scan(txn, "orphans")]

    # -- building blocks of mutations ---------------------------------------------------------

    def save(self, tx: Tx, node: Inode) -> None:
        self.db.vput(tx.txn, "inodes", u64(node.ino), node.pack(), self.epoch)

    def _dir(self, tx: Tx, ino: int) -> Inode:
        node = self.need_inode(tx.txn, ino)
        if not stat.S_ISDIR(node.mode):
            raise fail(errno.ENOTDIR)
        if node.nlink == 0:
            raise fail(errno.ENOENT)  # removed while a process still had it as cwd
        return node

    def _touch_dir(self, tx: Tx, node: Inode, nlink_delta: int = 0) -> None:
        node.mtime_ns = node.ctime_ns = tx.now
        node.nlink += nlink_delta
        self.save(tx, node)

    def _new_ino(self, tx: Tx) -> int:
        ino = self.db.counter(tx.txn, "next_ino")
        if ino > MAX_INO:
            raise fail(errno.ENOSPC)
        self.db.set_counter(tx.txn, "next_ino", ino + 1)
        return ino

    def _content_changed(self, tx: Tx, ino: int) -> None:
        tx.changed.append(ino)
        tx.hooks.content_changed(tx, ino)

    def link_entry(self, tx: Tx, parent: int, name: bytes, child: int) -> None:
        """Add the entry `name` -> `child` under `parent` and nothing else (no link counts,
        no times): the namespace operations below keep those right; fsck uses it alone to
        link a lost file into /lost+found after fixing the counts itself."""
        self.db.vput(tx.txn, "dirents", self.dirent_key(parent, name), pack_dirent(child, name),
                     self.epoch)

    def _unlink_entry(self, tx: Tx, parent: int, name: bytes) -> None:
        self.db.vdelete(tx.txn, "dirents", self.dirent_key(parent, name), self.epoch)

    def _drop_link(self, tx: Tx, node: Inode) -> None:
        """One name of a non-directory went away."""
        node.nlink -= 1
        node.ctime_ns = tx.now
        self.save(tx, node)
        if node.nlink == 0:
            self.db.put(tx.txn, "orphans", u64(node.ino), b"")
            tx.orphaned.append(node.ino)
            if stat.S_ISREG(node.mode):
                tx.hooks.last_unlink(tx, node.ino)

    def _remove_dir(self, tx: Tx, node: Inode) -> None:
        """An empty directory lost its name; it lives on (nlink 0) while a handle holds it."""
        node.nlink = 0
        node.ctime_ns = tx.now
        self.save(tx, node)
        self.db.put(tx.txn, "orphans", u64(node.ino), b"")
        tx.orphaned.append(node.ino)

    def _free(self, tx: Tx, ino: int) -> None:
        txn = tx.txn
        for index, _ in list(self.block_refs(txn, ino)):
            _, body = self.db.vdelete(txn, "blockmap", self.block_key(ino, index), self.epoch)
            if body is not None:
                self.blocks.drop_ref(tx, BlockRef.unpack(body).block_id)
        for ident, _ in list(self.db.vscan(txn, "xattrs", u64(ino))):
            self.db.vdelete(txn, "xattrs", u64(ino) + ident, self.epoch)
        self.db.vdelete(txn, "inodes", u64(ino), self.epoch)
        self.db.delete(txn, "orphans", u64(ino))

    # -- mutations (run inside a write transaction) -------------------------------------------

    def mknod(
        self,
        tx: Tx,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes = b"",
        exclusive: bool = True,
    ) -> Inode:
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        pnode = self._dir(tx, parent)
        existing = self.child(tx.txn, parent, name)
        if existing is not None:
            node = self.need_inode(tx.txn, existing)
            if exclusive or not stat.S_ISREG(node.mode):
                raise fail(errno.EEXIST)
            return node
        if pnode.mode & stat.S_ISGID:
            gid = pnode.gid  # BSD group semantics, as on ext4
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        is_dir = stat.S_ISDIR(mode)
        node = Inode(
            ino=self._new_ino(tx),
            generation=self.generation,
            mode=mode,
            uid=uid,
            gid=gid,
            nlink=2 if is_dir else 1,
            size=len(target),
            rdev=rdev,
            atime_ns=tx.now,
            mtime_ns=tx.now,
            ctime_ns=tx.now,
            parent=parent if is_dir else 0,
            birthtime_ns=tx.now,
            target=target,
        )
        self.save(tx, node)
        self.link_entry(tx, parent, name, node.ino)
        self._touch_dir(tx, pnode, 1 if is_dir else 0)
        return node

    def link(self, tx: Tx, ino: int, parent: int, name: bytes) -> Inode:
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        node = self.need_inode(tx.txn, ino)
        if stat.S_ISDIR(node.mode):
            raise fail(errno.EPERM)
        if node.nlink == 0:
            raise fail(errno.ENOENT)
        pnode = self._dir(tx, parent)
        if self.child(tx.txn, parent, name) is not None:
            raise fail(errno.EEXIST)
        node.nlink += 1
        node.ctime_ns = tx.now
        self.save(tx, node)
        self.link_entry(tx, parent, name, ino)
        self._touch_dir(tx, pnode)
        return node

    def unlink(self, tx: Tx, parent: int, name: bytes) -> Inode:
        pnode = self._dir(tx, parent)
        child = self.child(tx.txn, parent, name)
        if child is None:
            raise fail(errno.ENOENT)
        node = self.need_inode(tx.txn, child)
        if stat.S_ISDIR(node.mode):
            raise fail(errno.EISDIR)
        self._unlink_entry(tx, parent, name)
        self._touch_dir(tx, pnode)
        self._drop_link(tx, node)
        return node

    def rmdir(self, tx: Tx, parent: int, name: bytes) -> None:
        pnode = self._dir(tx, parent)
        child = self.child(tx.txn, parent, name)
        if child is None:
            raise fail(errno.ENOENT)
        node = self.need_inode(tx.txn, child)
        if not stat.S_ISDIR(node.mode):
            raise fail(errno.ENOTDIR)
        if not self.is_empty_dir(tx.txn, child):
            raise fail(errno.ENOTEMPTY)
        self._unlink_entry(tx, parent, name)
        self._touch_dir(tx, pnode, -1)
        self._remove_dir(tx, node)

    def _is_ancestor(self, txn: lmdb.Transaction, anc: int, ino: int) -> bool:
        seen = 0
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INO or seen > 100_000:
                return False
            ino = self.need_inode(txn, ino).parent
            seen += 1

    def rename(
        self, tx: Tx, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0
    ) -> None:
        if len(n2) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        txn = tx.txn
        src_parent = self._dir(tx, p1)
        dst_parent = src_parent if p1 == p2 else self._dir(tx, p2)
        src_ino = self.child(txn, p1, n1)
        if src_ino is None:
            raise fail(errno.ENOENT)
        src = self.need_inode(txn, src_ino)
        dst_ino = self.child(txn, p2, n2)
        if flags & RENAME_EXCHANGE:
            if dst_ino is None:
                raise fail(errno.ENOENT)
            self._exchange(tx, src_parent, n1, src, dst_parent, n2)
            return
        if dst_ino is not None and flags & RENAME_NOREPLACE:
            raise fail(errno.EEXIST)
        if dst_ino == src_ino:
            return  # same file (or hard links to it): POSIX says do nothing
        src_is_dir = stat.S_ISDIR(src.mode)
        if src_is_dir and p1 != p2 and self._is_ancestor(txn, src_ino, p2):
            raise fail(errno.EINVAL)
        if dst_ino is not None:
            dst = self.need_inode(txn, dst_ino)
            if stat.S_ISDIR(dst.mode):
                if not src_is_dir:
                    raise fail(errno.EISDIR)
                if not self.is_empty_dir(txn, dst_ino):
                    raise fail(errno.ENOTEMPTY)
                dst_parent.nlink -= 1
                self._remove_dir(tx, dst)
            else:
                if src_is_dir:
                    raise fail(errno.ENOTDIR)
                self._drop_link(tx, dst)
        self._unlink_entry(tx, p1, n1)
        self.link_entry(tx, p2, n2, src_ino)
        src.ctime_ns = tx.now
        if src_is_dir and p1 != p2:
            src.parent = p2
            src_parent.nlink -= 1
            dst_parent.nlink += 1
        self.save(tx, src)
        self._touch_dir(tx, src_parent)
        if p1 != p2:
            self._touch_dir(tx, dst_parent)

    def _exchange(
        self, tx: Tx, pa: Inode, na: bytes, a: Inode, pb: Inode, nb: bytes
    ) -> None:
        b = self.need_inode(tx.txn, self.child(tx.txn, pb.ino, nb) or 0)
        if pa.ino != pb.ino:
            for node, new_parent in ((a, pb), (b, pa)):
                if stat.S_ISDIR(node.mode) and self._is_ancestor(tx.txn, node.ino,
                                                                 new_parent.ino):
                    raise fail(errno.EINVAL)
        self.link_entry(tx, pa.ino, na, b.ino)
        self.link_entry(tx, pb.ino, nb, a.ino)
        if pa.ino != pb.ino:
            for node, old_parent, new_parent in ((a, pa, pb), (b, pb, pa)):
                if stat.S_ISDIR(node.mode):
                    node.parent = new_parent.ino
                    old_parent.nlink -= 1
                    new_parent.nlink += 1
        for node in (a, b):
            node.ctime_ns = tx.now
            self.save(tx, node)
        self._touch_dir(tx, pa)
        if pa.ino != pb.ino:
            self._touch_dir(tx, pb)

    def setattr(
        self,
        tx: Tx,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Inode:
        node = self.need_inode(tx.txn, ino)
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
        if uid is not None and uid != 0xFFFFFFFF:
            node.uid = uid
        if gid is not None and gid != 0xFFFFFFFF:
            node.gid = gid
        if size is not None:
            if stat.S_ISDIR(node.mode):
                raise fail(errno.EISDIR)
            if size < node.size:
                self._truncate_blocks(tx, ino, size)
            if size != node.size and node.nlink:
                self._content_changed(tx, ino)
            node.size = size
            node.mtime_ns = tx.now
        if atime_ns is not None:
            node.atime_ns = atime_ns
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
        node.ctime_ns = tx.now
        self.save(tx, node)
        return node

    def _truncate_blocks(self, tx: Tx, ino: int, size: int) -> None:
        txn = tx.txn
        first_gone = -(-size // BLOCK_SIZE)
        cut = size % BLOCK_SIZE
        for index, ref in list(self.block_refs(txn, ino)):
            key = self.block_key(ino, index)
            if index >= first_gone:
                _, body = self.db.vdelete(txn, "blockmap", key, self.epoch)
                if body is not None:
                    self.blocks.drop_ref(tx, BlockRef.unpack(body).block_id)
            elif cut and index == first_gone - 1 and ref.length > cut:
                self._set_block(tx, ino, index, NewBlock(BlockRef(ref.block_id, cut), 0))

    def _set_block(self, tx: Tx, ino: int, index: int, new: NewBlock | None) -> None:
        key = self.block_key(ino, index)
        if new is None:
            _, old = self.db.vdelete(tx.txn, "blockmap", key, self.epoch)
        else:
            self.blocks.add_ref(tx, new.ref.block_id, new.stored)
            old = self.db.vput(tx.txn, "blockmap", key, new.ref.pack(), self.epoch)
        if old is not None:
            self.blocks.drop_ref(tx, BlockRef.unpack(old).block_id)

    def commit_file(
        self,
        tx: Tx,
        ino: int,
        blocks: dict[int, NewBlock | None],
        *,
        size: int,
        mtime_ns: int | None,
        ctime_ns: int | None,
        atime_ns: int | None = None,
    ) -> Inode:
        """Link the blocks a writer sealed into the file and record its size and times."""
        node = self.need_inode(tx.txn, ino)
        for index, new in sorted(blocks.items()):
            self._set_block(tx, ino, index, new)
        if (blocks or size != node.size) and node.nlink:
            self._content_changed(tx, ino)
        node.size = size
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
        if ctime_ns is not None:
            node.ctime_ns = ctime_ns
        if atime_ns is not None:
            node.atime_ns = atime_ns
        self.save(tx, node)
        return node

    def free_orphan(self, tx: Tx, ino: int) -> None:
        if self.db.get(tx.txn, "orphans", u64(ino)) is None:
            return
        node = self.inode(tx.txn, ino)
        if node is not None and node.nlink > 0:
            self.db.delete(tx.txn, "orphans", u64(ino))  # re-linked (link via /proc fd)
            return
        self._free(tx, ino)

    def setxattr(self, tx: Tx, ino: int, name: bytes, value: bytes, flags: int) -> None:
        node = self.need_inode(tx.txn, ino)
        key = self.xattr_key(ino, name)
        exists = self.db.vget(tx.txn, "xattrs", key) is not None
        if flags & XATTR_CREATE and exists:
            raise fail(errno.EEXIST)
        if flags & XATTR_REPLACE and not exists:
            raise fail(errno.ENODATA)
        self.db.vput(tx.txn, "xattrs", key, pack_xattr(name, value), self.epoch)
        node.ctime_ns = tx.now
        self.save(tx, node)

    def removexattr(self, tx: Tx, ino: int, name: bytes) -> None:
        node = self.need_inode(tx.txn, ino)
        existed, _ = self.db.vdelete(tx.txn, "xattrs", self.xattr_key(ino, name), self.epoch)
        if not existed:
            raise fail(errno.ENODATA)
        node.ctime_ns = tx.now
        self.save(tx, node)

    # -- statistics -----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Table sizes for `vnafs status`; O(blocks) through `Blocks.stats`, so the daemon runs
        it in a worker thread."""
        with self.db.begin() as txn:
            dbs = self.db.dbs
            out = {
                "inodes": txn.stat(dbs["inodes"])["entries"],
                "dirents": txn.stat(dbs["dirents"])["entries"],
                "orphans": txn.stat(dbs["orphans"])["entries"],
                "next_ino": self.db.counter(txn, "next_ino"),
                "epoch": self.epoch,
            }
        return out | self.blocks.stats()


__all__ = ["Namespace", "NewBlock", "fail"]
