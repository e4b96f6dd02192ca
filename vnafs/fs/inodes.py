"""What an inode number the kernel sends us stands for, decided in one place.

Why this exists: one number space holds four kinds of inodes (docs/architecture.md sections 8
and 10): live files and directories (below 2^40), files and directories inside a snapshot
(`snap_id << 40 | ino`), the `/.snapshots` directory itself, and the virtual directories of
the DICOM views (`1 << 62 | hash(path)`, live or inside a snapshot). Every FUSE operation
resolves its inode once into one of the small values below and dispatches on its type, instead
of testing bit patterns again and again.

`Live` and `Snapshotted` are stored inodes: both carry the live inode number `ino`, the epoch
to read it at (`None` for the live tree) and the number the kernel knows (`fuse_ino`), so code
that only reads can treat them alike. Resolution raises `ESTALE` for an inode of a deleted
snapshot or a view directory this daemon has never seen (an NFS handle kept over a restart);
NFS clients answer that with a fresh lookup.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from vnafs.dicom.index import DicomIndex
from vnafs.fs.views import Views, is_view_ino
from vnafs.meta.namespace import fail
from vnafs.meta.snapshots import LIVE_LIMIT, SNAPDIR_INO, Snapshots, decode, encode


@dataclass(frozen=True, slots=True)
class Live:
    """A file or directory of the live tree."""

    ino: int
    epoch: None = None

    @property
    def fuse_ino(self) -> int:
        return self.ino

    def outer(self, ino: int) -> int:
        """The kernel's number for the stored inode `ino` seen from here."""
        return ino


@dataclass(frozen=True, slots=True)
class Snapshotted:
    """A file or directory inside `/.snapshots/<name>/`: live inode `ino` as snapshot `sid`
    froze it at `epoch`. Read-only."""

    sid: int
    epoch: int
    ino: int

    @property
    def fuse_ino(self) -> int:
        return encode(self.sid, self.ino)

    def outer(self, ino: int) -> int:
        return encode(self.sid, ino)


@dataclass(frozen=True, slots=True)
class SnapshotsDir:
    """The `/.snapshots` directory."""

    fuse_ino: int = SNAPDIR_INO


@dataclass(frozen=True, slots=True)
class ViewDir:
    """A directory of the DICOM views; `sid` and `epoch` say which snapshot's views (0 and
    None: the live ones)."""

    fuse_ino: int
    views: Views
    sid: int = 0
    epoch: int | None = None

    def leaf(self, ino: int) -> Live | Snapshotted:
        """A stored file named in this view directory."""
        return Live(ino) if self.epoch is None else Snapshotted(self.sid, self.epoch, ino)


Stored = Live | Snapshotted
Node = Live | Snapshotted | SnapshotsDir | ViewDir


class Inodes:
    """Resolves the kernel's inode numbers for one mount. Runs on the trio loop only.

    `snaps` is None when snapshots are not served, `views` None when the DICOM views are off.
    """

    def __init__(self, snaps: Snapshots | None, views: Views | None) -> None:
        self.snaps = snaps
        self.views = views
        # The DICOM views inside each snapshot that has been looked into, by snapshot id.
        self._snap_views: dict[int, Views] = {}

    def resolve(self, ino: int) -> Node:
        if ino < LIVE_LIMIT:
            return Live(ino)
        if is_view_ino(ino):
            if self.views is None:
                raise fail(errno.ESTALE)
            return self._view_dir(ino)
        if ino == SNAPDIR_INO and self.snaps is not None:
            return SnapshotsDir()
        sid, real = decode(ino)
        return Snapshotted(sid, self.epoch_of(sid), real)

    def stored(self, ino: int) -> Stored:
        """`resolve` for operations that only make sense on stored inodes (readlink): a
        virtual directory is EINVAL there, as for any directory."""
        node = self.resolve(ino)
        if not isinstance(node, Live | Snapshotted):
            raise fail(errno.EINVAL)
        return node

    def epoch_of(self, sid: int) -> int:
        snap = self.snaps.by_id(sid) if self.snaps is not None else None
        if snap is None:
            raise fail(errno.ESTALE)  # the snapshot was deleted
        return snap.epoch

    def views_root(self, at: Stored) -> ViewDir | None:
        """The views directory under the root of the live tree or of a snapshot."""
        if self.views is None:
            return None
        if isinstance(at, Live):
            return ViewDir(self.views.root_ino, self.views)
        views = self._snapshot_views(at.sid, at.epoch)
        return ViewDir(views.root_ino, views, at.sid, at.epoch)

    def _view_dir(self, ino: int) -> ViewDir:
        assert self.views is not None
        if self.views.knows(ino):
            return ViewDir(ino, self.views)
        for sid, views in self._snap_views.items():
            if views.knows(ino):
                snap = self.snaps.by_id(sid) if self.snaps is not None else None
                if snap is not None:
                    return ViewDir(ino, views, sid, snap.epoch)
        raise fail(errno.ESTALE)

    def _snapshot_views(self, sid: int, epoch: int) -> Views:
        views = self._snap_views.get(sid)
        if views is None:
            assert self.views is not None
            index: DicomIndex = self.views.index.at(epoch)
            views = self._snap_views[sid] = Views(index, salt=sid)
        return views
