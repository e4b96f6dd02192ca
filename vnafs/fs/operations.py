"""pyfuse3 `Operations`: translates kernel requests into namespace and file operations.

This layer decides nothing. It resolves the inode numbers the kernel sends (`inodes.py`: live,
inside a snapshot, `/.snapshots`, a DICOM view directory), converts arguments, calls
`Namespace` (through the engine's writer thread for changes) or `Files`, and converts results
and errors back: `OSError` becomes its errno, an integrity failure becomes EIO with one log
line, and any other exception is logged once and answered with EIO, because an exception
escaping a pyfuse3 handler would stop the file system.

File handles are inode numbers: all state is per inode (see `files.py`), and the kernel does the
permission checks (`default_permissions`). Everything under `/.snapshots` and the views is
read-only (`EROFS`); moving or linking out of a snapshot is `EXDEV`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from vnafs.audit.recorder import AuditRecorder
from vnafs.errors import IntegrityError
from vnafs.fs.engine import Engine
from vnafs.fs.files import Files
from vnafs.fs.inodes import Inodes, Live, SnapshotsDir, Snapshotted, Stored, ViewDir
from vnafs.fs.kernel_cache import KernelCache
from vnafs.fs.snapshot_service import SnapshotService
from vnafs.fs.views import PROBLEM_XATTR, Child, dir_mode
from vnafs.meta.namespace import NAME_MAX, fail
from vnafs.meta.records import ROOT_INO, Inode
from vnafs.meta.snapshots import SNAPDIR_INO, SNAPDIR_NAME, SnapshotError

log = logging.getLogger("vnafs.fs")
P = ParamSpec("P")
R = TypeVar("R")

ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 1.0


# The operations `translated` wraps, by name: the metrics endpoint creates the latency series
# of each one at mount, so they all exist from zero.
FUSE_OPS: list[str] = []


@dataclasses.dataclass(frozen=True)
class Meters:
    """What this layer reports to the metrics endpoint (`vnafs/metrics.py` builds it):
    `latency` maps an operation's name to the function that records one answer's seconds;
    the byte counters take the size of each read reply and each write request. Labels are
    operation names only, never a file name."""

    latency: Mapping[str, Callable[[float], None]]
    read_bytes: Callable[[float], None]
    written_bytes: Callable[[float], None]


def translated(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    name = fn.__name__
    FUSE_OPS.append(name)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        # Without metrics `timers` is empty: the cost is this one lookup.
        observe = args[0].timers.get(name)  # type: ignore[attr-defined]
        start = time.perf_counter() if observe is not None else 0.0
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
        finally:
            if observe is not None:
                observe(time.perf_counter() - start)

    return wrapper


def _name_ok(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))


def _live(node: object) -> Live:
    """The node of an operation that changes something: only the live tree may change."""
    if not isinstance(node, Live):
        raise fail(errno.EROFS)
    return node


# Extended attributes under this prefix are answered by vnafs (tiering state), never stored.
VNAFS_XATTR = b"user.vnafs."

# Handles of virtual directories (views, /.snapshots): above every inode number, so they never
# meet a real handle.
_VIRTUAL_FH = 1 << 63


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, engine: Engine, files: Files, inodes: Inodes, kernel: KernelCache, *,
                 block_size: int, views_name: str = ".dicom",
                 snapshots: SnapshotService | None = None, snapshot_mkdir: bool = False,
                 snapshots_visible: bool = False,
                 file_state: Callable[[int], str] | None = None,
                 meters: Meters | None = None, audit: AuditRecorder | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.ns = engine.ns
        self.files = files
        self.inodes = inodes
        self.kernel = kernel
        self.block_size = block_size
        self.views_name = views_name.encode()
        # /.snapshots (docs/architecture.md section 10): reads go to the records
        # (`inodes.snaps`); mkdir/rmdir go through the service, which logs and wakes the
        # collector like a request from the CLI.
        self.snapshots = snapshots
        self.snapshot_mkdir = snapshot_mkdir
        self.snapshots_visible = snapshots_visible and inodes.snaps is not None
        # Open virtual directories: handle -> the listing made at opendir, so readdir offsets
        # stay stable between calls.
        self._virtual: dict[int, list[tuple[bytes, Callable[[], pyfuse3.EntryAttributes]]]] = {}
        self._next_fh = _VIRTUAL_FH
        # `user.vnafs.state` of a live file (tiering), None without an archive.
        self.file_state = file_state
        # (inode, name) pairs known to have no such xattr. The kernel asks for
        # security.capability before every write; all xattr changes pass through here, so this
        # negative cache is exact.
        self._no_xattr: set[tuple[int, bytes]] = set()
        # The metrics endpoint's meters (docs/admin.md, "Metrics"); empty/None when it is off.
        self.timers: dict[str, Callable[[float], None]] = \
            dict(meters.latency) if meters is not None else {}
        self._count_read = meters.read_bytes if meters is not None else None
        self._count_written = meters.written_bytes if meters is not None else None
        # The access audit (`[audit] enabled`), None when off: then each hook below costs one
        # comparison.
        self.audit = audit

    # -- attributes -----------------------------------------------------------------------------

    def _entry(self, node: Inode, outer: int | None = None) -> pyfuse3.EntryAttributes:
        """Attributes of a stored inode; `outer` is the number the kernel knows it by (a
        snapshot inode), default its own."""
        node = self.files.overlay(node) if outer is None else node
        e = pyfuse3.EntryAttributes()
        e.st_ino = cast(pyfuse3.InodeT, node.ino if outer is None else outer)
        e.generation = node.generation
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = cast(pyfuse3.ModeT, node.mode)
        e.st_nlink = node.nlink
        views = self.inodes.views
        if views is not None and node.flags:
            e.st_nlink += views.index.view_links(node.flags)
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

    def _stored_entry(self, at: Stored, ino: int) -> pyfuse3.EntryAttributes:
        """Attributes of stored inode `ino` seen from `at` (the live tree or a snapshot)."""
        node = self.ns.get_inode(ino, at.epoch)
        return self._entry(node) if isinstance(at, Live) else self._entry(node, at.outer(ino))

    def _virtual_entry(self, ino: int) -> pyfuse3.EntryAttributes:
        """A read-only directory that exists only in the daemon (views, /.snapshots)."""
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

    def _snapdir_entry(self) -> pyfuse3.EntryAttributes:
        """/.snapshots: its times follow the newest snapshot, so clients that cache listings
        by mtime (NFS) see new ones; st_nlink counts them as subdirectories."""
        e = self._virtual_entry(SNAPDIR_INO)
        assert self.inodes.snaps is not None
        snaps = self.inodes.snaps.all()
        if snaps:
            newest = max(s.created_ns for s in snaps)
            e.st_mtime_ns = e.st_ctime_ns = max(e.st_mtime_ns, newest)
        e.st_nlink = 2 + len(snaps)
        return e

    def _attrs(self, node: Live | Snapshotted | SnapshotsDir | ViewDir
               ) -> pyfuse3.EntryAttributes:
        match node:
            case ViewDir():
                node.views.path_of(node.fuse_ino)  # ESTALE if it is not a known directory
                return self._virtual_entry(node.fuse_ino)
            case SnapshotsDir():
                return self._snapdir_entry()
            case Live() | Snapshotted():
                return self._stored_entry(node, node.ino)

    # -- lookups --------------------------------------------------------------------------------

    def _snapdir_lookup(self, name: bytes) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._snapdir_entry()
        if name == b"..":
            return self._entry(self.ns.get_inode(ROOT_INO))
        assert self.inodes.snaps is not None
        snap = self.inodes.snaps.by_name(os.fsdecode(name))
        if snap is None:
            raise fail(errno.ENOENT)
        return self._stored_entry(Snapshotted(snap.id, snap.epoch, ROOT_INO), ROOT_INO)

    def _view_lookup(self, d: ViewDir, name: bytes) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._virtual_entry(d.fuse_ino)
        if name == b"..":
            up = d.views.parent(d.fuse_ino)
            if up is None:
                return self._stored_entry(d.leaf(ROOT_INO), ROOT_INO)
            return self._virtual_entry(d.views.ino_of(up))
        child = d.views.lookup(d.fuse_ino, os.fsdecode(name))
        if child.path is not None:
            return self._virtual_entry(d.views.ino_of(child.path))
        return self._stored_entry(d.leaf(child.ino), child.ino)

    def _stored_lookup(self, at: Stored, name: bytes) -> pyfuse3.EntryAttributes:
        if at.ino == ROOT_INO:
            views_root = self.inodes.views_root(at) if name == self.views_name else None
            if views_root is not None:
                return self._virtual_entry(views_root.fuse_ino)
            if self.inodes.snaps is not None and (
                    (isinstance(at, Live) and name == SNAPDIR_NAME)
                    or (isinstance(at, Snapshotted) and name == b"..")):
                return self._snapdir_entry()
        node = self.ns.lookup(at.ino, name, at.epoch)
        return self._entry(node) if isinstance(at, Live) else self._entry(node,
                                                                          at.outer(node.ino))

    @translated
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        match self.inodes.resolve(parent_inode):
            case ViewDir() as d:
                return self._view_lookup(d, name)
            case SnapshotsDir():
                return self._snapdir_lookup(name)
            case Live() | Snapshotted() as at:
                return self._stored_lookup(at, name)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        return None  # nothing is kept per looked-up inode; open files are tracked by handles

    @translated
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self.inodes.resolve(inode))

    # -- changes --------------------------------------------------------------------------------

    def _guard(self, parent: int, name: bytes | None = None) -> Live:
        """The live directory `parent` of a change; refuses changes inside the views and
        snapshots, and real names that would hide them."""
        at = _live(self.inodes.resolve(parent))
        if at.ino == ROOT_INO and (
                (self.inodes.views is not None and name == self.views_name)
                or (self.inodes.snaps is not None and name == SNAPDIR_NAME)):
            raise fail(errno.EEXIST)
        return at

    async def _change(self, fn: Callable[..., R], *args: Any) -> R:
        """Commit a namespace change, then drop what the kernel caches of the view names the
        commit removed (the DICOM index forgets a file in its last unlink's commit)."""
        result = await self.engine.commit(fn, *args)
        await self.kernel.drop()
        return result

    @translated
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        at = _live(self.inodes.resolve(inode))
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
        node = await self.files.setattr(at.ino, changes)
        if fields.update_size and self.audit is not None:
            self.audit.truncated(at.ino, ctx.uid, ctx.gid, ctx.pid)
        return self._entry(node)

    @translated
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        at = self.inodes.stored(inode)
        node = self.ns.get_inode(at.ino, at.epoch)
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
        at = self._guard(parent_inode, name)
        node = await self.engine.commit(self._audited(self.ns.mknod, "create", ctx), at.ino,
                                        name, mode, ctx.uid, ctx.gid, rdev)
        return self._entry(node)

    def _audited(self, fn: Callable[..., R], action: str, ctx: pyfuse3.RequestContext,
                 target: tuple[int, bytes] | None = None) -> Callable[..., R]:
        """`fn`, or with the audit on, `fn` appending its audit record in its transaction."""
        if self.audit is None:
            return fn
        return self.audit.audited(fn, action, ctx.uid, ctx.gid, ctx.pid, target)

    @translated
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        _name_ok(name)
        if isinstance(self.inodes.resolve(parent_inode), SnapshotsDir):
            await self._snapdir_change(name, create=True)
            return self._snapdir_lookup(name)
        at = self._guard(parent_inode, name)
        node = await self.engine.commit(self.ns.mknod, at.ino, name,
                                        stat.S_IFDIR | stat.S_IMODE(mode), ctx.uid, ctx.gid)
        return self._entry(node)

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

    @translated
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        _name_ok(name)
        at = self._guard(parent_inode, name)
        node = await self.engine.commit(self.ns.mknod, at.ino, name, stat.S_IFLNK | 0o777,
                                        ctx.uid, ctx.gid, 0, target)
        return self._entry(node)

    @translated
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        at = self._guard(parent_inode)
        if self.audit is not None:
            await self.audit.before_change()
        await self._change(self._audited(self.ns.unlink, "delete", ctx, (at.ino, name)), at.ino,
                           name)

    @translated
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        if isinstance(self.inodes.resolve(parent_inode), SnapshotsDir):
            await self._snapdir_change(name, create=False)
            return
        at = self._guard(parent_inode)
        if self.audit is not None:
            await self.audit.before_change()
        await self.engine.commit(self._audited(self.ns.rmdir, "delete", ctx, (at.ino, name)),
                                 at.ino, name)

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
        old = self.inodes.resolve(parent_inode_old)
        if isinstance(old, Snapshotted) and not isinstance(
                self.inodes.resolve(parent_inode_new), Snapshotted):
            raise fail(errno.EXDEV)  # mv copies out of a snapshot instead
        src = self._guard(parent_inode_old)
        dst = self._guard(parent_inode_new, name_new)
        if self.audit is not None:
            await self.audit.before_change()
        await self._change(self._audited(self.ns.rename, "rename", ctx, (src.ino, name_old)),
                           src.ino, name_old, dst.ino, name_new, int(flags))

    @translated
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        _name_ok(new_name)
        at = self._guard(new_parent_inode, new_name)
        target = self.inodes.resolve(inode)
        if not isinstance(target, Live):
            raise fail(errno.EXDEV)
        node = await self.engine.commit(self.ns.link, target.ino, at.ino, new_name)
        return self._entry(node)

    # -- files ----------------------------------------------------------------------------------

    @translated
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        match self.inodes.resolve(inode):
            case ViewDir() | SnapshotsDir():
                raise fail(errno.EISDIR)
            case Snapshotted() as at:
                fi = self._open_in_snapshot(at, flags)
                if self.audit is not None:
                    self.audit.opened(at.ino, ctx.uid, ctx.gid, ctx.pid, flags)
                return fi
            case Live() as at:
                pass
        node = self.ns.get_inode(at.ino)
        if stat.S_ISDIR(node.mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        self.files.attach(node)
        if flags & os.O_TRUNC and stat.S_ISREG(node.mode):
            # libfuse enables atomic O_TRUNC: the kernel sends no separate truncate.
            try:
                await self.files.setattr(at.ino, {"size": 0})
            except BaseException:
                await self.files.release(at.ino)
                raise
        if self.audit is not None:
            self.audit.opened(at.ino, ctx.uid, ctx.gid, ctx.pid, flags)
            if flags & os.O_TRUNC and stat.S_ISREG(node.mode) and node.size:
                self.audit.wrote(at.ino)  # the truncation is this open's one write record
        return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, at.ino),
                                keep_cache=not self.files.readonly)

    def _open_in_snapshot(self, at: Snapshotted, flags: int) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise fail(errno.EROFS)
        node = self.ns.get_inode(at.ino, at.epoch)
        if stat.S_ISDIR(node.mode):
            raise fail(errno.EISDIR)
        self.files.attach(dataclasses.replace(node, ino=at.fuse_ino), epoch=at.epoch,
                          source=at.ino)
        # A snapshot never changes: the kernel may keep its pages.
        return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, at.fuse_ino), keep_cache=True)

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
        at = self._guard(parent_inode, name)
        exclusive = bool(flags & os.O_EXCL)
        node = await self.engine.commit(self._audited(self.ns.mknod, "create", ctx), at.ino,
                                        name, stat.S_IFREG | stat.S_IMODE(mode), ctx.uid,
                                        ctx.gid, 0, b"", exclusive)
        self.files.attach(node)
        if self.audit is not None:
            self.audit.created(node.ino, ctx.uid, ctx.gid, ctx.pid)
        if flags & os.O_TRUNC and node.size:  # create() on an existing file (no O_EXCL)
            node = await self.files.setattr(node.ino, {"size": 0})
        # A read-only archive mount's files can change under it (a newer replicated cycle), so
        # its page cache is not kept across opens.
        fi = pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, node.ino),
                              keep_cache=not self.files.readonly)
        return fi, self._entry(node)

    @translated
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        # pyfuse3 replies from any contiguous buffer (PyObject_GetBuffer); its stub says bytes.
        data = cast(bytes, await self.files.read_view(fh, off, size))
        if self._count_read is not None:
            self._count_read(len(data))
        return data

    @translated
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        self.engine.last_write = trio.current_time()
        if self.audit is not None:
            self.audit.wrote(fh)
        written = await self.files.write(fh, off, buf)
        if self._count_written is not None:
            self._count_written(written)
        return written

    async def _committing(self, fh: int, commit: Coroutine[Any, Any, None]) -> None:
        """A close or fsync: when it fails, `Files` has dropped the uncommitted changes, and
        the kernel must drop the pages and size it cached from those writes too."""
        try:
            await commit
        except OSError:
            await self.kernel.forget_content(fh)
            raise

    @translated
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        await self._committing(fh, self.files.flush(fh))

    @translated
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        await self._committing(fh, self.files.release(fh))

    @translated
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self._committing(fh, self.files.flush(fh, durable=True))

    # -- directories ----------------------------------------------------------------------------

    def _new_virtual_handle(
            self, listing: list[tuple[bytes, Callable[[], pyfuse3.EntryAttributes]]]
    ) -> pyfuse3.FileHandleT:
        fh = self._next_fh
        self._next_fh += 1
        self._virtual[fh] = listing
        return cast(pyfuse3.FileHandleT, fh)

    def _view_listing(self, d: ViewDir, children: list[Child]
                      ) -> list[tuple[bytes, Callable[[], pyfuse3.EntryAttributes]]]:
        def attrs(child: Child) -> Callable[[], pyfuse3.EntryAttributes]:
            if child.path is not None:
                path = child.path
                return lambda: self._virtual_entry(d.views.ino_of(path))
            return lambda: self._stored_entry(d.leaf(child.ino), child.ino)

        return [(os.fsencode(child.name), attrs(child)) for child in children]

    @translated
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        match self.inodes.resolve(inode):
            case ViewDir() as d:
                # The listing is computed once per handle: readdir is called again for every
                # kernel buffer, and offsets must stay stable between those calls.
                children = await trio.to_thread.run_sync(d.views.listing, d.fuse_ino,
                                                         limiter=self.engine.io)
                return self._new_virtual_handle(self._view_listing(d, children))
            case SnapshotsDir():
                assert self.inodes.snaps is not None
                snaps = [(os.fsencode(s.name), Snapshotted(s.id, s.epoch, ROOT_INO))
                         for s in self.inodes.snaps.all()]
                return self._new_virtual_handle([
                    (name, functools.partial(self._stored_entry, at, ROOT_INO))
                    for name, at in snaps])
            case Live() | Snapshotted() as at:
                node = self.ns.get_inode(at.ino, at.epoch)
                if not stat.S_ISDIR(node.mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                self.files.open_dir(at.fuse_ino)
                return cast(pyfuse3.FileHandleT, at.fuse_ino)

    @translated
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        listing = self._virtual.get(fh)
        if listing is not None:
            for cookie in range(start_id, len(listing)):
                name, attrs = listing[cookie]
                try:
                    entry = attrs()
                except OSError:
                    continue  # unlinked since the listing was made
                if not pyfuse3.readdir_reply(token, name, entry, cookie + 1):
                    return
            return
        at = self.inodes.stored(fh)
        offset = start_id
        if fh == ROOT_INO and self.snapshots_visible and offset == 0:
            # Listed first with cookie 1 (real entries have cookies >= 2, and offset 1 lists
            # them from the start): an NFS server reconnecting a snapshot directory's handle
            # looks for its name in this listing.
            if not pyfuse3.readdir_reply(token, SNAPDIR_NAME, self._snapdir_entry(), 1):
                return
            offset = 1
        while True:
            batch = self.ns.readdir(at.ino, offset, limit=256, epoch=at.epoch)
            if not batch:
                return
            for name, node, cookie in batch:
                entry = (self._entry(node) if isinstance(at, Live)
                         else self._entry(node, at.outer(node.ino)))
                if not pyfuse3.readdir_reply(token, name, entry, cookie):
                    return
                offset = cookie

    @translated
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        if self._virtual.pop(fh, None) is not None:
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
        at = _live(self.inodes.resolve(inode))
        if name.startswith(VNAFS_XATTR):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))  # answered, never stored
        if name.startswith(b"system.posix_acl_"):
            # The kernel would not enforce a stored ACL (no FUSE_POSIX_ACL): refuse cleanly.
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        self._no_xattr.discard((at.ino, name))
        await self.engine.commit(self.ns.setxattr, at.ino, name, value, 0)

    @translated
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if (inode, name) in self._no_xattr:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        if name.startswith(VNAFS_XATTR):
            return await self._vnafs_xattr(self.inodes.resolve(inode), name)
        match self.inodes.resolve(inode):
            case ViewDir() | SnapshotsDir():
                raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
            case Snapshotted() as at:
                return self.ns.getxattr(at.ino, name, at.epoch)
            case Live() as at:
                pass
        try:
            return self.ns.getxattr(at.ino, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                if len(self._no_xattr) > 100_000:
                    self._no_xattr.clear()
                self._no_xattr.add((at.ino, name))
            raise

    async def _vnafs_xattr(self, node: Live | Snapshotted | SnapshotsDir | ViewDir,
                           name: bytes) -> bytes:
        """Attributes vnafs answers about a file and never stores (`getfattr -n`):
        `user.vnafs.state` (tiering) and `user.vnafs.dicom.problem` (why `vnafs find
        --problems` lists the file). They are not listed, so `cp -a` and `rsync -X` do not
        copy a stale verdict along with the file."""
        if name == VNAFS_XATTR + b"state" and isinstance(node, Live) \
                and self.file_state is not None:
            if not stat.S_ISREG(self.ns.get_inode(node.ino).mode):
                raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
            # One record per block of the file: a worker thread, not the loop.
            found = await trio.to_thread.run_sync(self.file_state, node.ino,
                                                  limiter=self.engine.io)
            return found.encode()
        views = self.inodes.views
        if name == PROBLEM_XATTR and views is not None \
                and isinstance(node, (Live, Snapshotted)):
            value = await trio.to_thread.run_sync(views.derived_xattr, node.ino, node.epoch,
                                                  name, limiter=self.engine.io)
            if value is not None:
                return value
        raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))

    @translated
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> list[pyfuse3.XAttrNameT]:
        match self.inodes.resolve(inode):
            case ViewDir() | SnapshotsDir():
                return []
            case Live() | Snapshotted() as at:
                return cast(list[pyfuse3.XAttrNameT], self.ns.listxattr(at.ino, at.epoch))

    @translated
    async def removexattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        at = _live(self.inodes.resolve(inode))
        await self.engine.commit(self.ns.removexattr, at.ino, name)

    async def access(
        self, inode: pyfuse3.InodeT, mode: pyfuse3.ModeT, ctx: pyfuse3.RequestContext
    ) -> bool:
        return True  # default_permissions: the kernel checks
