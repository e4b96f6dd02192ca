"""The metadata engine without a mount: epoch versioning, reference counts, sealed records.

Snapshots (meta/snapshots.py) depend on one property proven here: after the epoch advances, every
change (overwrite, truncate, unlink, rename, rmdir, chmod, xattr) leaves the view at the older
epoch exactly as it was, and blocks stay referenced while any version names them. These tests
drive `Namespace` directly, as `fsck` does.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vnafs.errors import IntegrityError
from vnafs.meta.db import u64, use_readahead
from vnafs.meta.namespace import Namespace, NewBlock
from vnafs.meta.records import (
    ROOT_INO,
    BlockRef,
    Inode,
    RefCount,
    pack_xattr,
    unpack_dirent,
)
from vnafs.meta.tx import Tx

T = TypeVar("T")


def write(ns: Namespace, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, Tx]:
    with ns.db.begin(write=True) as txn:
        tx = Tx(txn, time.time_ns())
        result = fn(tx, *args, **kwargs)
    return result, tx


def advance_epoch(ns: Namespace) -> int:
    """What taking a snapshot will do: freeze the current epoch and move to the next."""
    with ns.db.begin(write=True) as txn:
        ns.epoch += 1
        ns.db.set_counter(txn, "epoch", ns.epoch)
    return ns.epoch - 1


def listing(ns: Namespace, ino: int, epoch: int | None = None) -> dict[bytes, int]:
    with ns.db.begin() as txn:
        out = {}
        for _, body in ns.db.vscan(txn, "dirents", u64(ino), epoch=epoch):
            child, name = unpack_dirent(body)
            out[name] = child
        return out


def inode_at(ns: Namespace, ino: int, epoch: int | None) -> Inode | None:
    with ns.db.begin() as txn:
        body = ns.db.vget(txn, "inodes", u64(ino), epoch)
        return None if body is None else Inode.unpack(ino, body)


def blocks_at(ns: Namespace, ino: int, epoch: int | None) -> dict[int, BlockRef]:
    with ns.db.begin() as txn:
        return {
            int.from_bytes(ident, "big"): BlockRef.unpack(body)
            for ident, body in ns.db.vscan(txn, "blockmap", u64(ino), epoch=epoch)
        }


def refcount(ns: Namespace, block_id: bytes) -> int:
    with ns.db.begin() as txn:
        body = ns.db.get(txn, "refs", block_id)
    return 0 if body is None else RefCount.unpack(body).count


def new_block(tag: bytes, length: int = 100) -> NewBlock:
    return NewBlock(BlockRef(tag.ljust(32, b"\0"), length), 50)


def test_live_changes_rewrite_in_place_within_an_epoch(ns: Namespace) -> None:
    node, _ = write(ns, ns.mknod, ROOT_INO, b"a", stat.S_IFREG | 0o644, 0, 0)
    for mode in (0o600, 0o640, 0o644):
        write(ns, ns.setattr, node.ino, mode=mode)
    with ns.db.begin() as txn:
        versions = sum(1 for k, _ in txn.cursor(db=ns.db.dbs["inodes"])
                       if k.startswith(u64(node.ino)))
    assert versions == 1  # no snapshot: no history is kept


def test_older_epoch_sees_the_tree_as_it_was(ns: Namespace) -> None:
    d, _ = write(ns, ns.mknod, ROOT_INO, b"study", stat.S_IFDIR | 0o755, 0, 0)
    f, _ = write(ns, ns.mknod, d.ino, b"img1.dcm", stat.S_IFREG | 0o644, 0, 0)
    g, _ = write(ns, ns.mknod, d.ino, b"img2.dcm", stat.S_IFREG | 0o644, 0, 0)
    write(ns, ns.commit_file, f.ino, {0: new_block(b"A"), 1: new_block(b"B")}, size=2 << 20,
          mtime_ns=1, ctime_ns=1)
    write(ns, ns.setxattr, f.ino, b"user.k", b"v1", 0)
    snap = advance_epoch(ns)

    # Every kind of change after the snapshot...
    write(ns, ns.commit_file, f.ino, {0: new_block(b"C")}, size=2 << 20, mtime_ns=2,
          ctime_ns=2)
    write(ns, ns.setattr, f.ino, mode=0o600, size=1000)
    write(ns, ns.setxattr, f.ino, b"user.k", b"v2", 0)
    write(ns, ns.rename, d.ino, b"img2.dcm", ROOT_INO, b"moved.dcm")
    write(ns, ns.unlink, d.ino, b"img1.dcm")
    e, _ = write(ns, ns.mknod, ROOT_INO, b"empty", stat.S_IFDIR | 0o755, 0, 0)
    write(ns, ns.rmdir, ROOT_INO, b"empty")

    # ...is invisible at the snapshot's epoch.
    assert listing(ns, d.ino, snap) == {b"img1.dcm": f.ino, b"img2.dcm": g.ino}
    assert listing(ns, ROOT_INO, snap) == {b"study": d.ino}
    old = inode_at(ns, f.ino, snap)
    assert old is not None and old.nlink == 1 and old.size == 2 << 20
    assert stat.S_IMODE(old.mode) == 0o644
    assert [r.block_id[:1] for r in blocks_at(ns, f.ino, snap).values()] == [b"A", b"B"]
    with ns.db.begin() as txn:
        key = ns.xattr_key(f.ino, b"user.k")
        assert ns.db.vget(txn, "xattrs", key, snap) == pack_xattr(b"user.k", b"v1")
        assert ns.db.vget(txn, "xattrs", key) == pack_xattr(b"user.k", b"v2")

    # The live view has moved on.
    assert listing(ns, d.ino) == {}
    assert listing(ns, ROOT_INO) == {b"study": d.ino, b"moved.dcm": g.ino}
    live = inode_at(ns, f.ino, None)
    assert live is not None and live.nlink == 0 and live.size == 1000
    assert [r.block_id[:1] for r in blocks_at(ns, f.ino, None).values()] == [b"C"]
    assert inode_at(ns, e.ino, snap) is None  # born after the snapshot


def test_blocks_stay_referenced_while_an_old_version_names_them(ns: Namespace) -> None:
    f, _ = write(ns, ns.mknod, ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, 0)
    write(ns, ns.commit_file, f.ino, {0: new_block(b"A")}, size=100, mtime_ns=1, ctime_ns=1)
    a = new_block(b"A").ref.block_id
    assert refcount(ns, a) == 1
    advance_epoch(ns)
    _, tx = write(ns, ns.commit_file, f.ino, {0: new_block(b"B")}, size=100, mtime_ns=2,
                  ctime_ns=2)
    assert tx.freed_blocks == []  # the snapshot's version still names A
    assert refcount(ns, a) == 1
    # Within one epoch an overwrite does free the replaced block.
    _, tx = write(ns, ns.commit_file, f.ino, {0: new_block(b"C")}, size=100, mtime_ns=3,
                  ctime_ns=3)
    assert tx.freed_blocks == [new_block(b"B").ref.block_id]


def test_dedup_counts_every_user(ns: Namespace) -> None:
    f, _ = write(ns, ns.mknod, ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, 0)
    g, _ = write(ns, ns.mknod, ROOT_INO, b"g", stat.S_IFREG | 0o644, 0, 0)
    a = new_block(b"A")
    write(ns, ns.commit_file, f.ino, {0: a, 1: a}, size=2 << 20, mtime_ns=1, ctime_ns=1)
    write(ns, ns.commit_file, g.ino, {0: a}, size=100, mtime_ns=1, ctime_ns=1)
    assert refcount(ns, a.ref.block_id) == 3
    write(ns, ns.unlink, ROOT_INO, b"f")
    _, tx = write(ns, ns.free_orphan, f.ino)
    assert tx.freed_blocks == [] and refcount(ns, a.ref.block_id) == 1
    write(ns, ns.unlink, ROOT_INO, b"g")
    _, tx = write(ns, ns.free_orphan, g.ino)
    assert tx.freed_blocks == [a.ref.block_id]


def test_truncate_shortens_the_boundary_block_without_rewriting(ns: Namespace) -> None:
    f, _ = write(ns, ns.mknod, ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, 0)
    blocks = {i: new_block(bytes([65 + i]), 1 << 20) for i in range(3)}
    write(ns, ns.commit_file, f.ino, blocks, size=3 << 20, mtime_ns=1, ctime_ns=1)
    _, tx = write(ns, ns.setattr, f.ino, size=(1 << 20) + 10)
    refs = blocks_at(ns, f.ino, None)
    assert sorted(refs) == [0, 1]
    assert refs[1].length == 10 and refs[1].block_id == blocks[1].ref.block_id
    assert tx.freed_blocks == [blocks[2].ref.block_id]


def test_rename_rules(ns: Namespace) -> None:
    a, _ = write(ns, ns.mknod, ROOT_INO, b"a", stat.S_IFDIR | 0o755, 0, 0)
    b, _ = write(ns, ns.mknod, a.ino, b"b", stat.S_IFDIR | 0o755, 0, 0)
    with pytest.raises(OSError) as exc:
        write(ns, ns.rename, ROOT_INO, b"a", b.ino, b"x")
    assert exc.value.errno == 22  # EINVAL: into its own subtree
    write(ns, ns.rename, a.ino, b"b", ROOT_INO, b"b2")
    moved = inode_at(ns, b.ino, None)
    assert moved is not None and moved.parent == ROOT_INO
    root = inode_at(ns, ROOT_INO, None)
    assert root is not None and root.nlink == 4  # ., .., a, b2


def test_records_are_bound_to_their_key(ns: Namespace) -> None:
    f, _ = write(ns, ns.mknod, ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, 0)
    g, _ = write(ns, ns.mknod, ROOT_INO, b"g", stat.S_IFREG | 0o644, 0, 0)
    with ns.db.begin(write=True) as txn:
        cur = txn.cursor(db=ns.db.dbs["inodes"])
        keys = {k[:8]: (k, v) for k, v in cur}
        _, vf = keys[u64(f.ino)]
        kg, _ = keys[u64(g.ino)]
        txn.put(kg, vf, db=ns.db.dbs["inodes"])  # transplant f's record under g's key
    with pytest.raises(IntegrityError):
        ns.get_inode(g.ino)
    assert ns.get_inode(f.ino).ino == f.ino


def test_lmdb_readahead_only_while_the_file_fits_in_memory(tmp_path: Path) -> None:
    data = tmp_path / "data.mdb"
    assert use_readahead(data, memory=1 << 30)  # a new store has no file yet
    with open(data, "wb") as f:
        f.truncate(256 << 20)
    assert use_readahead(data, memory=1 << 30)  # a quarter of memory: still on
    assert not use_readahead(data, memory=(1 << 30) - 4096)
    assert use_readahead(data)  # this machine's memory, read from sysconf
