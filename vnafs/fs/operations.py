"""pyfuse3 `Operations`: translates kernel requests into namespace and file operations.

This layer decides nothing. It converts arguments, calls `Namespace` (through the engine's writer
thread for changes) or `Files`, and converts results and errors back: `OSError` becomes its errno,
an integrity failure becomes EIO with one log line, and any other exception is logged once and
answered with EIO, because an exception escaping a pyfuse3 handler would stop the file system.

File handles are inode numbers: all state is per inode (see `files.py`), and the kernel does the
permission checks (`default_permissions`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from vnafs.errors import IntegrityError
from vnafs.fs.engine import Engine
from vnafs.fs.files import Files
from vnafs.fs.snapshot_service import SnapshotService
from vnafs.fs.views import Child, Views, dir_mode, is_view_ino
from vnafs.meta.namespace import NAME_MAX, Namespace, fail
from vnafs.meta.records import ROOT_INO, Inode
from vnafs.meta.snapshots import (
    LIVE_LIMIT,
    SNAPDIR_INO,
    SNAPDIR_NAME,
    SnapshotError,
    Snapshots,
    decode,
    encode,
)

log = logging.getLogger("vnafs.fs")
P = ParamSpec("P")
R = TypeVar("R")

ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 1.0


def translated(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except IntegrityError as exc:
            log.error("%s", exc)
            args[0].engine.health.report("integrity", str(exc))  # type: ignore[attr-defined]
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            args[0].engine.health.report(  # type: ignore[attr-defined]
                "internal", f"internal error in {fn.__name__}; see the log")
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _name_ok(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))


def _invalidate(entries: list[tuple[int, str]], inos: Sequence[int]) -> None:
    """Runs in a worker thread: the kernel may need a request answered before it returns."""
    # OSError (ENOENT) means the kernel has nothing cached: nothing to forget.
    for parent, name in entries:
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_entry(cast(pyfuse3.InodeT, parent), os.fsencode(name))
    for ino in inos:
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_inode(cast(pyfuse3.InodeT, ino), attr_only=True)


# Handles of view directories: above every inode number, so they never meet a real handle.
_VIEW_FH = 1 << 63


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, engine: Engine, files: Files, *, block_size: int,
                 views: Views | None = None, views_name: str = ".dicom",
                 snapshots: SnapshotService | None = None, snapshot_mkdir: bool = False,
                 snapshots_visible: bool = False) -> None:
        super().__init__()
        self.engine = engine
        self.ns: Namespace = engine.ns
        self.files = files
        self.block_size = block_size
        self.views = views
        self.views_name = views_name.encode()
        self._view_handles: dict[int, tuple[int, list[Child]]] = {}
        self._next_view_fh = _VIEW_FH
        # (inode, name) pairs known to have no such xattr. The kernel asks for
        # security.capability before every write; all xattr changes pass through here, so this
        # negative cache is exact.
        self._no_xattr: set[tuple[int, bytes]] = set()
        # /.snapshots (docs/architecture.md section 10): None when snapshots are not served.
        # Reads go to the records (`snaps`); mkdir/rmdir go through the service, which logs
        # and wakes the collector like a request from the CLI.
        self.snapshots = snapshots
        self.snaps: Snapshots | None = snapshots.snaps if snapshots is not None else None
        self.snapshot_mkdir = snapshot_mkdir
        self.snapshots_visible = snapshots_visible and snapshots is not None
        self._snapdir_handles: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        # The DICOM views inside each snapshot that has been looked into (by snapshot id).
        self._snap_views: dict[int, Views] = {}

    # -- attributes -----------------------------------------------------------------------------

    def _entry(self, node: Inode) -> pyfuse3.EntryAttributes:
        node = self.files.overlay(node)
        e = pyfuse3.EntryAttributes()
        e.st_ino = cast(pyfuse3.InodeT, node.ino)
        e.generation = node.generation
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = cast(pyfuse3.ModeT, node.mode)
        e.st_nlink = node.nlink
        if self.views is not None and node.flags:
            e.st_nlink += self.views.index.view_links(node.flags)
        e.st_uid = node.uid
        e.st_gid = node.gid
        e.st_rdev = node.rdev
        e.st_size = node.size
        e.st_blksize = self.block_size
        e.st_blocks = -(-node.size // 512)
        e.st_atime_ns = node.atime_ns
        e.st_mtime_ns = node.mtime_ns
        e.st_ctime_ns = node.ctime_ns
        e.st_birthtime_ns = node.birthtime_ns
        return e

    # -- snapshots (meta/snapshots.py) -----------------------------------------------------------

    @staticmethod
    def _in_snapshot(ino: int) -> bool:
        return ino >= LIVE_LIMIT and not is_view_ino(ino) and ino != SNAPDIR_INO

    def _snap(self, ino: int) -> tuple[int, int, int] | None:
        """(snapshot id, its epoch, live inode number) for an inode inside a snapshot."""
        if not self._in_snapshot(ino):
            return None
        sid, real = decode(ino)
        snap = self.snaps.by_id(sid) if self.snaps is not None else None
        if snap is None:
            raise fail(errno.ESTALE)  # the snapshot was deleted
        return sid, snap.epoch, real

    def _snap_entry(self, sid: int, node: Inode) -> pyfuse3.EntryAttributes:
        return self._entry(dataclasses.replace(node, ino=encode(sid, node.ino)))

    def _snapdir_entry(self) -> pyfuse3.EntryAttributes:
        """/.snapshots: its times follow the newest snapshot, so clients that cache listings
        by mtime (NFS) see new ones; st_nlink counts them as subdirectories."""
        e = self._view_dir_entry(SNAPDIR_INO)
        assert self.snaps is not None
        snaps = self.snaps.all()
        if snaps:
            newest = max(s.created_ns for s in snaps)
            e.st_mtime_ns = e.st_ctime_ns = max(e.st_mtime_ns, newest)
        e.st_nlink = 2 + len(snaps)
        return e

    def _snapdir_lookup(self, name: bytes) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._snapdir_entry()
        if name == b"..":
            return self._entry(self.ns.get_inode(ROOT_INO))
        assert self.snaps is not None
        snap = self.snaps.by_name(os.fsdecode(name))
        if snap is None:
            raise fail(errno.ENOENT)
        return self._snap_entry(snap.id, self.ns.get_inode(ROOT_INO, snap.epoch))

    def _refuse_in_snapshots(self, *inos: int) -> None:
        for ino in inos:
            if ino == SNAPDIR_INO or self._in_snapshot(ino):
                raise fail(errno.EROFS)

    async def _snapdir_change(self, name: bytes, create: bool) -> None:
        """mkdir / rmdir in /.snapshots, when the configuration allows it."""
        if not self.snapshot_mkdir or self.snapshots is None:
            raise fail(errno.EROFS)
        try:
            if create:
                await self.snapshots.create(os.fsdecode(name))
            else:
                await self.snapshots.delete(os.fsdecode(name), by="rmdir")
        except SnapshotError as exc:
            raise OSError(exc.errno, str(exc)) from None

    # -- the read-only DICOM views (fs/views.py) -------------------------------------------------

    def _view_dir_entry(self, ino: int) -> pyfuse3.EntryAttributes:
        root = self.ns.get_inode(ROOT_INO)
        e = pyfuse3.EntryAttributes()
        e.st_ino = cast(pyfuse3.InodeT, ino)
        e.generation = 1
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = cast(pyfuse3.ModeT, dir_mode(root.mode))
        # 1 = "subdirectory count unknown", so find(1) does not skip the leaves.
        e.st_nlink = 1
        e.st_uid = root.uid
        e.st_gid = root.gid
        e.st_blksize = self.block_size
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = root.birthtime_ns
        e.st_birthtime_ns = root.birthtime_ns
        return e

    async def drop_stale(self, inos: Sequence[int] = ()) -> None:
        """Make the kernel forget view names the index removed, and the cached attributes of
        `inos` (their link counts count view names), before the operation that caused it
        replies."""
        if self.views is None:
            return
        stale, self.views.stale = self.views.stale, []
        if stale or inos:
            await trio.to_thread.run_sync(_invalidate, stale, inos, limiter=self.engine.io)

    def _is_view(self, ino: int) -> bool:
        return self.views is not None and is_view_ino(ino)

    def _views_of(self, ino: int) -> tuple[Views, int, int | None]:
        """(views, snapshot id or 0, epoch or None) owning the view directory `ino`."""
        assert self.views is not None
        if self.views.knows(ino):
            return self.views, 0, None
        for sid, views in self._snap_views.items():
            if views.knows(ino):
                snap = self.snaps.by_id(sid) if self.snaps is not None else None
                if snap is not None:
                    return views, sid, snap.epoch
        raise fail(errno.ESTALE)

    def _snapshot_views(self, sid: int, epoch: int) -> Views:
        views = self._snap_views.get(sid)
        if views is None:
            assert self.views is not None
            views = self._snap_views[sid] = Views(self.views.index.at(epoch), salt=sid)
        return views

    def _leaf_entry(self, sid: int, epoch: int | None, ino: int) -> pyfuse3.EntryAttributes:
        if sid:
            return self._snap_entry(sid, self.ns.get_inode(ino, epoch))
        return self._entry(self.ns.get_inode(ino))

    def _guard(self, parent: int, name: bytes | None = None) -> None:
        """Refuse changes inside the views and snapshots, and real names that would hide
        them."""
        if self._is_view(parent):
            raise fail(errno.EROFS)
        self._refuse_in_snapshots(parent)
        if parent == ROOT_INO and (
                (self.views is not None and name == self.views_name)
                or (self.snaps is not None and name == SNAPDIR_NAME)):
            raise fail(errno.EEXIST)

    def _view_lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        views, sid, epoch = self._views_of(parent)
        if name == b".":
            return self._view_dir_entry(parent)
        if name == b"..":
            up = views.parent(parent)
            if up is None:
                return self._leaf_entry(sid, epoch, ROOT_INO)
            return self._view_dir_entry(views.ino_of(up))
        child = views.lookup(parent, os.fsdecode(name))
        if child.path is not None:
            return self._view_dir_entry(views.ino_of(child.path))
        return self._leaf_entry(sid, epoch, child.ino)

    @translated
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self.views is not None:
            if is_view_ino(parent_inode):
                return self._view_lookup(parent_inode, name)
            if parent_inode == ROOT_INO and name == self.views_name:
                return self._view_dir_entry(self.views.root_ino)
        if self.snaps is not None:
            if parent_inode == SNAPDIR_INO:
                return self._snapdir_lookup(name)
            if parent_inode == ROOT_INO and name == SNAPDIR_NAME:
                return self._snapdir_entry()
            snap = self._snap(parent_inode)
            if snap is not None:
                sid, epoch, real = snap
                if real == ROOT_INO and name == b"..":
                    return self._snapdir_entry()
                if real == ROOT_INO and name == self.views_name and self.views is not None:
                    return self._view_dir_entry(self._snapshot_views(sid, epoch).root_ino)
                return self._snap_entry(sid, self.ns.lookup(real, name, epoch))
        return self._entry(self.ns.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        return None  # nothing is kept per looked-up inode; open files are tracked by handles

    @translated
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if self._is_view(inode):
            self._views_of(inode)[0].path_of(inode)
            return self._view_dir_entry(inode)
        if inode == SNAPDIR_INO and self.snaps is not None:
            return self._snapdir_entry()
        snap = self._snap(inode)
        if snap is not None:
            return self._snap_entry(snap[0], self.ns.get_inode(snap[2], snap[1]))
        return self._entry(self.ns.get_inode(inode))

    @translated
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._guard(inode)
        changes: dict[str, int] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_size:
            changes["size"] = attr.st_size
        return self._entry(await self._setattr(inode, changes))

    async def _setattr(self, inode: int, changes: dict[str, int]) -> Inode:
        if "size" in changes:
            await self.files.flush(inode)
            await self.files.truncate(inode, changes["size"])
        of = self.files.open.get(inode)
        if of is not None:
            # Keep the open state's view in step with what this commit sets.
            of.atime_ns = changes.get("atime_ns", of.atime_ns)
            of.mtime_ns = changes.get("mtime_ns", of.mtime_ns)
        node = await self.engine.commit(self._setattr_tx, inode, changes)
        if of is not None and "size" in changes:
            of.committed.clear()  # LMDB's block map changed under the cache
        if of is not None:
            of.ctime_ns = node.ctime_ns
            if "size" in changes:
                of.mtime_ns = node.mtime_ns
        return node

    def _setattr_tx(self, tx: Any, inode: int, changes: dict[str, int]) -> Inode:
        return self.ns.setattr(tx, inode, **changes)

    @translated
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        snap = self._snap(inode)
        node = self.ns.get_inode(inode) if snap is None else self.ns.get_inode(snap[2], snap[1])
        if not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return node.target

    # -- creating and removing names ------------------------------------------------------------

    @translated
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        _name_ok(name)
        self._guard(parent_inode, name)
        node = await self.engine.commit(self.ns.mknod, parent_inode, name, mode, ctx.uid,
                                        ctx.gid, rdev)
        return self._entry(node)

    @translated
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        _name_ok(name)
        if parent_inode == SNAPDIR_INO:
            await self._snapdir_change(name, create=True)
            return self._snapdir_lookup(name)
        self._guard(parent_inode, name)
        node = await self.engine.commit(self.ns.mknod, parent_inode, name,
                                        stat.S_IFDIR | stat.S_IMODE(mode), ctx.uid, ctx.gid)
        return self._entry(node)

    @translated
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        _name_ok(name)
        self._guard(parent_inode, name)
        node = await self.engine.commit(self.ns.mknod, parent_inode, name,
                                        stat.S_IFLNK | 0o777, ctx.uid, ctx.gid, 0, target)
        return self._entry(node)

    @translated
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        self._guard(parent_inode)
        await self.engine.commit(self.ns.unlink, parent_inode, name)
        await self.drop_stale()

    @translated
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        if parent_inode == SNAPDIR_INO:
            await self._snapdir_change(name, create=False)
            return
        self._guard(parent_inode)
        await self.engine.commit(self.ns.rmdir, parent_inode, name)

    @translated
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        _name_ok(name_new)
        if self._in_snapshot(parent_inode_old) and not self._in_snapshot(parent_inode_new):
            raise fail(errno.EXDEV)  # mv copies out of a snapshot instead
        self._guard(parent_inode_old)
        self._guard(parent_inode_new, name_new)
        await self.engine.commit(self.ns.rename, parent_inode_old, name_old, parent_inode_new,
                                 name_new, int(flags))
        await self.drop_stale()

    @translated
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        _name_ok(new_name)
        self._guard(new_parent_inode, new_name)
        if self._in_snapshot(inode):
            raise fail(errno.EXDEV)
        node = await self.engine.commit(self.ns.link, inode, new_parent_inode, new_name)
        return self._entry(node)

    # -- files ----------------------------------------------------------------------------------

    @translated
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if self._is_view(inode) or inode == SNAPDIR_INO:
            raise fail(errno.EISDIR)
        snap = self._snap(inode)
        if snap is not None:
            return self._open_in_snapshot(snap, flags)
        node = self.ns.get_inode(inode)
        if stat.S_ISDIR(node.mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        self.files.attach(node)
        if flags & os.O_TRUNC and stat.S_ISREG(node.mode):
            # libfuse enables atomic O_TRUNC: the kernel sends no separate truncate.
            try:
                await self._setattr(inode, {"size": 0})
            except BaseException:
                await self.files.release(inode)
                raise
        return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, inode),
                                keep_cache=not self.files.readonly)

    def _open_in_snapshot(self, snap: tuple[int, int, int], flags: int) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise fail(errno.EROFS)
        sid, epoch, real = snap
        node = self.ns.get_inode(real, epoch)
        if stat.S_ISDIR(node.mode):
            raise fail(errno.EISDIR)
        self.files.attach(dataclasses.replace(node, ino=encode(sid, real)), epoch=epoch,
                          source=real)
        # A snapshot never changes: the kernel may keep its pages.
        return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, encode(sid, real)),
                                keep_cache=True)

    @translated
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        _name_ok(name)
        self._guard(parent_inode, name)
        exclusive = bool(flags & os.O_EXCL)
        node = await self.engine.commit(self.ns.mknod, parent_inode, name,
                                        stat.S_IFREG | stat.S_IMODE(mode), ctx.uid, ctx.gid, 0,
                                        b"", exclusive)
        self.files.attach(node)
        if flags & os.O_TRUNC and node.size:  # create() on an existing file (no O_EXCL)
            node = await self._setattr(node.ino, {"size": 0})
        # A read-only archive mount's files can change under it (a newer replicated cycle), so
        # its page cache is not kept across opens.
        fi = pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, node.ino),
                              keep_cache=not self.files.readonly)
        return fi, self._entry(node)

    @translated
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        # pyfuse3 replies from any contiguous buffer (PyObject_GetBuffer); its stub says bytes.
        return cast(bytes, await self.files.read_view(fh, off, size))

    @translated
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        self.engine.last_write = trio.current_time()
        return await self.files.write(fh, off, buf)

    @translated
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        await self.files.flush(fh)

    @translated
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        await self.files.release(fh)

    @translated
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.files.flush(fh, durable=True)

    # -- directories ----------------------------------------------------------------------------

    @translated
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if self._is_view(inode):
            # The listing is computed once per handle: readdir is called again for every
            # kernel buffer, and offsets must stay stable between those calls.
            views = self._views_of(inode)[0]
            listing = await trio.to_thread.run_sync(views.listing, inode,
                                                    limiter=self.engine.io)
            fh = self._next_view_fh
            self._next_view_fh += 1
            self._view_handles[fh] = (inode, listing)
            return cast(pyfuse3.FileHandleT, fh)
        if inode == SNAPDIR_INO and self.snaps is not None:
            snapshots = [(os.fsencode(s.name), self._snap_entry(
                s.id, self.ns.get_inode(ROOT_INO, s.epoch))) for s in self.snaps.all()]
            fh = self._next_view_fh
            self._next_view_fh += 1
            self._snapdir_handles[fh] = snapshots
            return cast(pyfuse3.FileHandleT, fh)
        snap = self._snap(inode)
        node = self.ns.get_inode(inode) if snap is None else self.ns.get_inode(snap[2], snap[1])
        if not stat.S_ISDIR(node.mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        self.files.dir_handles[inode] += 1
        return cast(pyfuse3.FileHandleT, inode)

    @translated
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        if fh in self._view_handles:
            self._view_readdir(fh, start_id, token)
            return
        listing = self._snapdir_handles.get(fh)
        if listing is not None:
            for cookie in range(start_id, len(listing)):
                name, attrs = listing[cookie]
                if not pyfuse3.readdir_reply(token, name, attrs, cookie + 1):
                    return
            return
        snap = self._snap(fh)
        offset = start_id
        if fh == ROOT_INO and self.snapshots_visible and offset == 0:
            # Listed first with cookie 1 (real entries have cookies >= 2, and offset 1 lists
            # them from the start): an NFS server reconnecting a snapshot directory's handle
            # looks for its name in this listing.
            if not pyfuse3.readdir_reply(token, SNAPDIR_NAME, self._snapdir_entry(), 1):
                return
            offset = 1
        while True:
            if snap is None:
                batch = self.ns.readdir(fh, offset, limit=256)
            else:
                batch = self.ns.readdir(snap[2], offset, limit=256, epoch=snap[1])
            if not batch:
                return
            for name, node, cookie in batch:
                attrs = self._entry(node) if snap is None else self._snap_entry(snap[0], node)
                if not pyfuse3.readdir_reply(token, name, attrs, cookie):
                    return
                offset = cookie

    def _view_readdir(self, fh: int, start: int, token: pyfuse3.ReaddirToken) -> None:
        ino, listing = self._view_handles[fh]
        views, sid, epoch = self._views_of(ino)
        for cookie in range(start, len(listing)):
            child = listing[cookie]
            try:
                if child.path is not None:
                    attrs = self._view_dir_entry(views.ino_of(child.path))
                else:
                    attrs = self._leaf_entry(sid, epoch, child.ino)
            except OSError:
                continue  # unlinked since the listing was made
            if not pyfuse3.readdir_reply(token, os.fsencode(child.name), attrs, cookie + 1):
                return

    @translated
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        if self._view_handles.pop(fh, None) is not None:
            return
        if self._snapdir_handles.pop(fh, None) is not None:
            return
        await self.files.release_dir(fh)

    @translated
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.engine.barrier()

    # -- file system ----------------------------------------------------------------------------

    @translated
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.engine.store.usage()
        out = pyfuse3.StatvfsData()
        out.f_bsize = self.block_size
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = NAME_MAX
        return out

    # -- extended attributes --------------------------------------------------------------------

    @translated
    async def setxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if len(name) > NAME_MAX:
            raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
        self._guard(inode)
        if name.startswith(b"system.posix_acl_"):
            # The kernel would not enforce a stored ACL (no FUSE_POSIX_ACL): refuse cleanly.
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        self._no_xattr.discard((inode, name))
        await self.engine.commit(self.ns.setxattr, inode, name, value, 0)

    @translated
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if self._is_view(inode) or inode == SNAPDIR_INO or (inode, name) in self._no_xattr:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        snap = self._snap(inode)
        if snap is not None:
            return self.ns.getxattr(snap[2], name, snap[1])
        try:
            return self.ns.getxattr(inode, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                if len(self._no_xattr) > 100_000:
                    self._no_xattr.clear()
                self._no_xattr.add((inode, name))
            raise

    @translated
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> list[pyfuse3.XAttrNameT]:
        if self._is_view(inode) or inode == SNAPDIR_INO:
            return []
        snap = self._snap(inode)
        names = self.ns.listxattr(inode) if snap is None else self.ns.listxattr(snap[2], snap[1])
        return cast(list[pyfuse3.XAttrNameT], names)

    @translated
    async def removexattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        self._guard(inode)
        await self.engine.commit(self.ns.removexattr, inode, name)

    async def access(
        self, inode: pyfuse3.InodeT, mode: pyfuse3.ModeT, ctx: pyfuse3.RequestContext
    ) -> bool:
        return True  # default_permissions: the kernel checks
