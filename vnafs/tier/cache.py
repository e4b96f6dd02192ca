"""The bounded block cache of a read-only archive mount.

Why a module of its own: an archive-only mount has no hot store of its own, only a metadata
cache; without a block cache every re-read downloads again. Here the recalled blocks are kept
as files in the cache directory's `blocks/`, counted against `[tiering] capacity` with the same
watermarks as a hot store, and trimmed oldest first (by the time they were fetched). Nothing
here is metadata: every cached file is a copy of an archive object, so deleting one is always
safe, and the archive mount never writes to LMDB or the archive.
"""

from __future__ import annotations

import logging
import os

import trio

from vnafs.store.hot import HotStore
from vnafs.tier.state import Capacity

log = logging.getLogger("vnafs.tier")

CHECK_SECONDS = 10.0


class ArchiveCache:
    """Runs on the trio loop; `kept` receives the ids of blocks the recall stored."""

    def __init__(self, hot: HotStore, capacity: Capacity, limiter: trio.CapacityLimiter, *,
                 kept: trio.MemoryReceiveChannel[bytes]) -> None:
        self.hot = hot
        self.capacity = capacity
        self.limiter = limiter
        self._kept = kept
        self.stats = {"trimmed_blocks": 0, "trimmed_bytes": 0}

    def _scan(self) -> int:
        total = 0
        for block_id in self.hot.ids():
            try:
                total += self.hot.path(block_id).stat().st_size
            except FileNotFoundError:
                continue
        return total

    def _trim(self, target: int) -> tuple[int, int]:
        """Delete the oldest cached files until `target` bytes are gone."""
        files = []
        for block_id in self.hot.ids():
            try:
                st = self.hot.path(block_id).stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, st.st_size, block_id))
        files.sort()
        freed = n = 0
        for _, size, block_id in files:
            if freed >= target:
                break
            self.hot.delete(block_id)
            freed += size
            n += 1
        return n, freed

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        usage = self.capacity.usage
        task_status.started()
        usage.resident = await trio.to_thread.run_sync(self._scan, limiter=self.limiter)
        usage.known = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._count_kept)
            while True:
                if self.capacity.over_high():
                    n, freed = await trio.to_thread.run_sync(
                        self._trim, self.capacity.above_low(), limiter=self.limiter)
                    usage.resident -= freed
                    self.stats["trimmed_blocks"] += n
                    self.stats["trimmed_bytes"] += freed
                    log.info("block cache: %d blocks (%d bytes) trimmed", n, freed)
                await trio.sleep(CHECK_SECONDS)

    async def _count_kept(self) -> None:
        async for block_id in self._kept:
            try:
                size = (await trio.to_thread.run_sync(os.stat, self.hot.path(block_id))).st_size
            except FileNotFoundError:
                continue
            self.capacity.usage.resident += size

    def status(self) -> dict[str, object]:
        cap = self.capacity
        return {"capacity_bytes": cap.capacity, "resident_bytes": cap.usage.resident,
                "evicted_bytes": 0, "mode": "archive block cache", **self.stats}
