"""Telling the kernel to forget names and attributes that changed behind its back.

Why a module of its own: the kernel caches lookups and attributes for `ENTRY_TIMEOUT` /
`ATTR_TIMEOUT` seconds, which is right for changes made through the mount (the kernel sees
them) but wrong for changes vnafs makes on its own: the DICOM index adds and removes view
names and changes link counts (view names count as hard links) when it indexes a file, or in
the commit of an unlink. Both the FUSE operations (before they reply) and the indexer (after
each batch) need to drop those entries; this is the one place that does it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import cast

import pyfuse3
import trio

from vnafs.dicom.index import DicomIndex
from vnafs.fs.views import Views


def _invalidate(entries: list[tuple[int, str]], inos: Sequence[int]) -> None:
    """Runs in a worker thread: the kernel may need a request answered before it returns."""
    # OSError (ENOENT) means the kernel has nothing cached: nothing to forget.
    for parent, name in entries:
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_entry(cast(pyfuse3.InodeT, parent), os.fsencode(name))
    for ino in inos:
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_inode(cast(pyfuse3.InodeT, ino), attr_only=True)


def _forget_content(ino: int) -> None:
    with contextlib.suppress(OSError):
        pyfuse3.invalidate_inode(cast(pyfuse3.InodeT, ino), attr_only=False)


class KernelCache:
    def __init__(self, index: DicomIndex | None, views: Views | None,
                 limiter: trio.CapacityLimiter) -> None:
        self.index = index
        self.views = views
        self.limiter = limiter

    async def forget_content(self, ino: int) -> None:
        """Make the kernel drop the cached pages and attributes of `ino` (a failed close or
        fsync dropped its uncommitted changes). Only from FLUSH, FSYNC and RELEASE: while a
        WRITE is being answered the kernel holds page locks that the invalidation needs."""
        await trio.to_thread.run_sync(_forget_content, ino, limiter=self.limiter)

    async def drop(self, inos: Sequence[int] = ()) -> None:
        """Make the kernel forget the view names the index removed since the last call, and
        the cached attributes of `inos` and of the files the index showed or hid in place of
        another copy of their instance (their link counts count view names)."""
        if self.index is None or self.views is None:
            return
        stale = [name for removed in self.index.take_removed()
                 for name in self.views.stale_names(removed)]
        inos = [*inos, *self.index.take_relinked()]
        if stale or inos:
            await trio.to_thread.run_sync(_invalidate, stale, list(inos), limiter=self.limiter)
