"""Namespace operations, readdir cookies and epoch versioning, through the real engine.

Every change goes through `Engine.commit` (one write transaction on the writer thread), as
`Operations` sends it; the errno of each refusal is what a FUSE caller would get. Snapshots
are taken with the `SnapshotService`, and files inside them are opened the way
`Operations.open` opens `/.snapshots/<name>/...`: `Files.attach(..., epoch=..., source=...)`.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import trio

from vnafs.meta.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE
from vnafs.meta.records import ROOT_INO
from vnafs.meta.snapshots import encode

from .harness import DIR, B, Vfs, pattern


async def fails(code: int, step: Coroutine[Any, Any, Any] | Callable[[], Any]) -> None:
    with pytest.raises(OSError) as info:
        await step if isinstance(step, Coroutine) else step()
    assert info.value.errno == code, info.value


def nlink(vfs: Vfs, ino: int) -> int:
    return vfs.inode(ino).nlink


# -- directories, names and link counts -------------------------------------------------------------


async def test_mkdir_rmdir_and_directory_link_counts(vfs: Vfs) -> None:
    a = await vfs.mkdir(b"a")
    b = await vfs.mkdir(b"b", a.ino)
    f = await vfs.mknod(b"f", a.ino)
    assert nlink(vfs, ROOT_INO) == 3 and nlink(vfs, a.ino) == 3 and nlink(vfs, b.ino) == 2
    assert stat.S_ISDIR(a.mode) and vfs.inode(b.ino).parent == a.ino
    assert vfs.lookup("a/b").ino == b.ino and vfs.ns.lookup(b.ino, b"..").ino == a.ino
    assert vfs.ns.lookup(ROOT_INO, b"..").ino == ROOT_INO
    await fails(errno.EEXIST, vfs.mkdir(b"a"))
    await fails(errno.ENOTDIR, vfs.mknod(b"x", f.ino))
    await fails(errno.ENOTEMPTY, vfs.engine.commit(vfs.ns.rmdir, ROOT_INO, b"a"))
    await fails(errno.ENOTDIR, vfs.engine.commit(vfs.ns.rmdir, a.ino, b"f"))
    await fails(errno.EISDIR, vfs.engine.commit(vfs.ns.unlink, a.ino, b"b"))
    await fails(errno.ENOENT, vfs.engine.commit(vfs.ns.rmdir, a.ino, b"nope"))
    await fails(errno.ENAMETOOLONG, vfs.mknod(b"n" * 256))
    await vfs.mknod(b"n" * 255)
    # A removed directory that a process still has open (its cwd) refuses new entries.
    vfs.files.open_dir(b.ino)
    await vfs.engine.commit(vfs.ns.rmdir, a.ino, b"b")
    assert nlink(vfs, a.ino) == 2
    await vfs.settle()
    await fails(errno.ENOENT, vfs.mknod(b"late", b.ino))
    assert vfs.ns.is_orphan(b.ino)
    await vfs.files.release_dir(b.ino)
    assert not vfs.ns.is_orphan(b.ino) and not vfs.has_inode_record(b.ino)


async def test_hard_links_count_and_keep_the_data(vfs: Vfs) -> None:
    d = await vfs.mkdir(b"d")
    ino = await vfs.write_file(b"f", b"content")
    node = await vfs.engine.commit(vfs.ns.link, ino, d.ino, b"g")
    assert node.nlink == 2 and vfs.lookup("d/g").ino == ino
    await fails(errno.EEXIST, vfs.engine.commit(vfs.ns.link, ino, d.ino, b"g"))
    await fails(errno.EPERM, vfs.engine.commit(vfs.ns.link, d.ino, ROOT_INO, b"d2"))
    await vfs.unlink(b"f")
    await vfs.settle()
    assert nlink(vfs, ino) == 1 and not vfs.ns.is_orphan(ino)
    assert await vfs.read_file(ino) == b"content"
    await vfs.unlink(b"g", d.ino)
    await vfs.settle()
    assert not vfs.has_inode_record(ino) and vfs.block_files() == set()


async def test_rename_variants(vfs: Vfs) -> None:
    ns, commit = vfs.ns, vfs.engine.commit
    a, b = await vfs.mkdir(b"a"), await vfs.mkdir(b"b")
    sub = await vfs.mkdir(b"sub", a.ino)
    f = await vfs.write_file(b"f", b"F", a.ino)
    g = await vfs.write_file(b"g", b"G" * (B + 1), b.ino)
    # Within one directory, and across directories (a file: no link count moves).
    await commit(ns.rename, a.ino, b"f", a.ino, b"f2")
    assert vfs.names(a.ino) == {b"sub": sub.ino, b"f2": f}
    await commit(ns.rename, a.ino, b"f2", b.ino, b"f")
    assert vfs.lookup("b/f").ino == f and nlink(vfs, a.ino) == 3
    # A directory across directories: its parent and both link counts follow.
    await commit(ns.rename, a.ino, b"sub", b.ino, b"sub")
    assert vfs.inode(sub.ino).parent == b.ino
    assert (nlink(vfs, a.ino), nlink(vfs, b.ino)) == (2, 3)
    # Over an existing file: the replaced file loses its name, and its blocks go with it.
    await commit(ns.rename, b.ino, b"f", b.ino, b"g")
    await vfs.settle()
    assert vfs.names(b.ino) == {b"g": f, b"sub": sub.ino}
    assert not vfs.has_inode_record(g) and vfs.block_files() == {
        r.block_id for r in vfs.block_refs(f).values()}
    # Refusals.
    empty = await vfs.mkdir(b"empty", a.ino)
    await vfs.mknod(b"x", sub.ino)
    await fails(errno.EISDIR, commit(ns.rename, b.ino, b"g", a.ino, b"empty"))
    await fails(errno.ENOTDIR, commit(ns.rename, a.ino, b"empty", b.ino, b"g"))
    await fails(errno.ENOTEMPTY, commit(ns.rename, a.ino, b"empty", b.ino, b"sub"))
    await fails(errno.EINVAL, commit(ns.rename, ROOT_INO, b"b", sub.ino, b"loop"))
    await fails(errno.EEXIST, commit(ns.rename, b.ino, b"g", sub.ino, b"x", RENAME_NOREPLACE))
    await fails(errno.ENOENT, commit(ns.rename, b.ino, b"missing", a.ino, b"y"))
    await fails(errno.ENOENT, commit(ns.rename, b.ino, b"g", a.ino, b"y", RENAME_EXCHANGE))
    # A directory over an empty directory replaces it.
    await commit(ns.rename, b.ino, b"sub", a.ino, b"empty")
    await vfs.settle()
    assert vfs.lookup("a/empty").ino == sub.ino and not vfs.has_inode_record(empty.ino)
    assert (nlink(vfs, a.ino), nlink(vfs, b.ino)) == (3, 2)
    # RENAME_EXCHANGE of a file and a directory in different parents.
    await commit(ns.rename, b.ino, b"g", a.ino, b"empty", RENAME_EXCHANGE)
    assert vfs.lookup("a/empty").ino == f and vfs.lookup("b/g").ino == sub.ino
    assert vfs.inode(sub.ino).parent == b.ino
    assert (nlink(vfs, a.ino), nlink(vfs, b.ino)) == (2, 3)
    # Renaming onto another name of the same inode does nothing: both names stay.
    await commit(ns.link, f, a.ino, b"alias")
    await commit(ns.rename, a.ino, b"alias", a.ino, b"empty")
    assert vfs.names(a.ino) == {b"alias": f, b"empty": f} and nlink(vfs, f) == 2


async def test_exclusive_create_is_atomic_under_concurrency(vfs: Vfs) -> None:
    won: list[int] = []
    lost: list[int] = []

    async def create(mode: int) -> None:
        try:
            won.append((await vfs.mknod(b"study", mode=mode)).ino)
        except OSError as exc:
            lost.append(exc.errno or 0)

    async with trio.open_nursery() as nursery:  # 12 writers race for one name
        for i in range(12):
            nursery.start_soon(create, DIR if i % 2 else stat.S_IFREG | 0o644)
    assert len(won) == 1 and lost == [errno.EEXIST] * 11
    assert vfs.names() == {b"study": won[0]}
    # Without O_EXCL an existing regular file is simply opened; a directory is EEXIST.
    await vfs.mknod(b"file")
    plain = await vfs.mknod(b"file", exclusive=False)
    assert plain.ino == vfs.lookup("file").ino
    await fails(errno.EEXIST, vfs.mknod(b"file"))
    await vfs.mkdir(b"dir")
    await fails(errno.EEXIST, vfs.mknod(b"dir", exclusive=False))


async def test_attributes_symlinks_and_xattrs(vfs: Vfs) -> None:
    ns, commit = vfs.ns, vfs.engine.commit
    ino = await vfs.write_file(b"f", b"x")
    node = await commit(ns.setattr, ino, mode=0o600, uid=1234, gid=0xFFFFFFFF)
    assert stat.S_IMODE(node.mode) == 0o600 and stat.S_ISREG(node.mode)
    assert node.uid == 1234 and node.gid == vfs.inode(ino).gid
    link = await vfs.mknod(b"l", mode=stat.S_IFLNK | 0o777)
    assert link.size == 0
    target = await commit(ns.mknod, ROOT_INO, b"l2", stat.S_IFLNK | 0o777, 0, 0, 0, b"f")
    assert vfs.inode(target.ino).target == b"f" and target.size == 1
    await commit(ns.setxattr, ino, b"user.a", b"1", XATTR_CREATE)
    await fails(errno.EEXIST, commit(ns.setxattr, ino, b"user.a", b"2", XATTR_CREATE))
    await fails(errno.ENODATA, commit(ns.setxattr, ino, b"user.b", b"2", XATTR_REPLACE))
    await commit(ns.setxattr, ino, b"user.a", b"2", XATTR_REPLACE)
    assert ns.getxattr(ino, b"user.a") == b"2" and ns.listxattr(ino) == [b"user.a"]
    await commit(ns.removexattr, ino, b"user.a")
    await fails(errno.ENODATA, lambda: ns.getxattr(ino, b"user.a"))
    await fails(errno.EISDIR, commit(ns.setattr, ROOT_INO, size=0))


# -- readdir ----------------------------------------------------------------------------------------


async def test_readdir_cookies_stay_valid_while_entries_change(vfs: Vfs) -> None:
    ns = vfs.ns
    d = await vfs.mkdir(b"d")
    names = [b"e%03d" % i for i in range(300)]

    def make(tx: Any, batch: list[bytes]) -> None:
        for name in batch:
            ns.mknod(tx, d.ino, name, stat.S_IFREG | 0o644, 0, 0)

    await vfs.engine.commit(make, names)
    before = {name: cookie for name, _, cookie in ns.readdir(d.ino, 0, 1000)}
    order = list(before)
    assert sorted(order) == sorted(names) and all(c >= 2 for c in before.values())

    listed: list[bytes] = []
    page = ns.readdir(d.ino, 0, limit=50)
    listed += [name for name, _, _ in page]
    cookie = page[-1][2]
    seen, unseen = order[:50], order[50:]
    # Between two readdir calls: unseen entries go, seen ones go, new ones come.
    gone_unseen, gone_seen = unseen[::10], seen[::5]
    for name in gone_unseen + gone_seen:
        await vfs.unlink(name, d.ino)
    new = [b"new%03d" % i for i in range(40)]
    await vfs.engine.commit(make, new)
    while True:
        page = ns.readdir(d.ino, cookie, limit=50)
        if not page:
            break
        listed += [name for name, _, _ in page]
        cookie = page[-1][2]
    assert len(listed) == len(set(listed))  # nothing twice
    assert set(listed) >= set(order) - set(gone_unseen)  # every survivor exactly once
    assert not set(listed) & set(gone_unseen)  # nothing that went before it was reached
    assert set(listed) <= set(order) | set(new)
    # Survivors keep their cookies, and a cookie of a deleted entry still resumes after it.
    after = {name: cookie for name, _, cookie in ns.readdir(d.ino, 0, 1000)}
    assert all(after[n] == before[n] for n in set(order) - set(gone_seen) - set(gone_unseen))
    gone = gone_seen[1]
    rest = [name for name, _, _ in ns.readdir(d.ino, before[gone], 1000)]
    assert rest == [n for n in after if after[n] > before[gone]]
    await vfs.settle()


# -- epochs: what a snapshot keeps ------------------------------------------------------------------


async def test_files_changed_after_a_snapshot_keep_their_old_content_in_it(vfs: Vfs) -> None:
    old = {name: pattern(size, seed) for name, size, seed in (
        (b"overwritten", 2 * B + 5, 1), (b"truncated", B + 100, 2), (b"unlinked", 3000, 3),
        (b"renamed", 10, 4), (b"appended", B, 5), (b"kept", 100, 6))}
    inos = {name: await vfs.write_file(name, data) for name, data in old.items()}
    inflight = await vfs.create(b"inflight")
    await vfs.write(inflight, 0, b"written before, committed after the snapshot")
    snap = await vfs.snapshots.create("s1")
    await vfs.close(inflight)

    new = dict(old)
    vfs.open(inos[b"overwritten"])
    await vfs.write(inos[b"overwritten"], B + 1, b"XYZ")
    await vfs.close(inos[b"overwritten"])
    new[b"overwritten"] = old[b"overwritten"][: B + 1] + b"XYZ" + old[b"overwritten"][B + 4 :]
    vfs.open(inos[b"truncated"])
    await vfs.files.setattr(inos[b"truncated"], {"size": 10})
    await vfs.close(inos[b"truncated"])
    new[b"truncated"] = old[b"truncated"][:10]
    await vfs.unlink(b"unlinked")
    del new[b"unlinked"]
    await vfs.engine.commit(vfs.ns.rename, ROOT_INO, b"renamed", ROOT_INO, b"moved")
    new[b"moved"] = new.pop(b"renamed")
    vfs.open(inos[b"appended"])
    await vfs.write(inos[b"appended"], B, b"+tail")
    await vfs.close(inos[b"appended"])
    new[b"appended"] = old[b"appended"] + b"+tail"
    await vfs.settle()

    # The live tree has moved on...
    live = vfs.names()
    assert set(live) == {*new, b"inflight"}
    for name, data in new.items():
        assert await vfs.read_file(live[name]) == data, name
    # ...the snapshot has not: names, sizes and bytes as they were committed at the time.
    assert vfs.names(epoch=snap.epoch) == {**inos, b"inflight": inflight}
    assert vfs.inode(inflight, snap.epoch).size == 0
    assert await vfs.read_in_snapshot(snap, inflight) == b""
    for name, data in old.items():
        assert vfs.inode(inos[name], snap.epoch).size == len(data)
        assert await vfs.read_in_snapshot(snap, inos[name]) == data, name
    vfs.drop_cache()  # and from the sealed files, not only from the cache
    for name, data in old.items():
        assert await vfs.read_in_snapshot(snap, inos[name]) == data, name

    # A snapshot file and its live file open at once are two open files.
    outer = vfs.open_in_snapshot(snap, inos[b"appended"])
    vfs.open(inos[b"appended"])
    assert outer == encode(snap.id, inos[b"appended"]) and outer != inos[b"appended"]
    assert await vfs.read(outer) == old[b"appended"]
    assert await vfs.read(inos[b"appended"]) == new[b"appended"]
    await vfs.close(outer)
    await vfs.close(inos[b"appended"])

    # Blocks only the snapshot sees are kept while it exists and freed once it is collected.
    live_blocks = {r.block_id for ino in live.values() for r in vfs.block_refs(ino).values()}
    snap_only = vfs.block_files() - live_blocks
    assert snap_only and vfs.has_inode_record(inos[b"unlinked"])
    await vfs.snapshots.delete("s1")
    assert await vfs.snapshots.collect() > 0
    await vfs.settle()
    assert vfs.block_files() == live_blocks
    assert not vfs.has_inode_record(inos[b"unlinked"])
    for name, data in new.items():
        assert await vfs.read_file(live[name]) == data, name
