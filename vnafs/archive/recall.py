"""Fetching blocks from the archive when the hot store does not have them.

Three callers: a read of an evicted block (tiering), a read of a block whose hot file is missing
or damaged but which the archive holds (the hot copy is repaired), and the read-only archive
mount, whose hot store is only a metadata cache with a bounded block cache. Background recalls
(`vnafs recall`, prior-study prefetch) fetch without decrypting (`fetch_only`).

Recalls have their own limiter and timeout: a slow or unreachable archive must not take the
worker threads that hot reads need, and a reader gets EIO after `timeout` seconds rather than
hanging forever. Every fetched object is authenticated against its block id before it is used
or stored. Whether a fetched block is kept in the hot store is the caller's budget (`keep`):
above it, the data is served and not kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable

import trio

from vnafs.archive.backend import ArchiveError, ArchiveMissing, Backend
from vnafs.archive.log import block_name
from vnafs.errors import IntegrityError, Unavailable
from vnafs.meta.blocks import Blocks
from vnafs.meta.records import STATE_EVICTED
from vnafs.seal import KIND_BLOCK
from vnafs.store.hot import HotStore

log = logging.getLogger("vnafs.recall")

LATENCY_SAMPLES = 1024
# Recently stored blocks remembered, so a reader that just missed a fetch reads its file.
JUST_KEPT = 4096


def percentile(samples: deque[float] | list[float], p: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]


class Recall:
    """`blocks` tells evicted blocks (quietly recalled, and reported on `kept` when their file
    is written back) from damaged ones (logged, always repaired); None on a read-only archive
    mount, whose cache files are not metadata. Runs on the trio loop; fetches in threads."""

    def __init__(self, backend: Backend, store: HotStore, *, timeout: float,
                 concurrency: int = 8, blocks: Blocks | None = None,
                 keep: Callable[[int], bool] = lambda size: True,
                 kept: trio.MemorySendChannel[bytes] | None = None) -> None:
        self.backend = backend
        self.store = store
        self.blocks = blocks
        self.timeout = timeout
        self.keep = keep
        self._kept = kept
        self.limiter = trio.CapacityLimiter(concurrency)
        # Blocks being fetched now (for `user.vnafs.state` = recalling), and the queue depth.
        self.active: set[bytes] = set()
        self.waiting = 0
        # Block id -> event set when the fetch under way ends (loop): a reader waits for a
        # background fetch of the same block instead of starting a second one.
        self._inflight: dict[bytes, trio.Event] = {}
        # Blocks a fetch stored in the hot store lately, oldest first (loop; bounded).
        self._just_kept: dict[bytes, None] = {}
        # Seconds per recall (fetch, authenticate, store), newest last.
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.stats = {"recalls": 0, "recalled_bytes": 0, "kept": 0, "not_kept": 0,
                      "failures": 0}

    async def __call__(self, block_id: bytes) -> bytes:
        """The plaintext of a block from the archive; IntegrityError (EIO) if it cannot be
        fetched, authenticated, or in time."""
        fetching = self._inflight.get(block_id)
        if fetching is not None or block_id in self._just_kept:
            # A background recall is fetching it right now (or stored it a moment ago, after
            # the reader found no file): wait for that one, then read the file it stored (if
            # it was kept), rather than fetch the block twice.
            if fetching is not None:
                await fetching.wait()
            with contextlib.suppress(IntegrityError):
                # Not on `limiter`: those slots may all be held by fetches hanging on the
                # archive, and this is a read of the hot store.
                stored = await trio.to_thread.run_sync(self.store.get, block_id)
                return bytes(stored)
        _, _, plain = await self._fetch(block_id, open_it=True)
        assert plain is not None
        return plain

    async def fetch_only(self, block_id: bytes) -> int:
        """Fetch, authenticate and store a block without opening it (background recalls);
        the bytes kept (0 if the budget did not allow it)."""
        if block_id in self._inflight:
            return 0  # a reader or another job is fetching it
        envelope, kept, _ = await self._fetch(block_id, open_it=False)
        return len(envelope) if kept else 0

    async def _fetch(self, block_id: bytes, *, open_it: bool
                     ) -> tuple[bytes | memoryview, bool, bytes | None]:
        """(envelope, whether it is now stored in the hot store, its plaintext if `open_it`).
        Opening happens in the fetch thread: decrypting and decompressing a block on the
        event loop would hold up every FUSE request meanwhile."""
        name = block_name(block_id)
        done = self._inflight.setdefault(block_id, trio.Event())
        start = trio.current_time()
        self.waiting += 1
        self.active.add(block_id)
        try:
            with trio.move_on_after(self.timeout):
                try:
                    envelope, kept, evicted, plain = await trio.to_thread.run_sync(
                        self._fetch_thread, block_id, name, open_it, limiter=self.limiter,
                        abandon_on_cancel=True)
                except ArchiveMissing as exc:
                    # Gone from the archive: lost data, not an outage.
                    self.stats["failures"] += 1
                    raise IntegrityError(f"block {block_id.hex()} could not be recalled from "
                                         f"the archive: {exc}") from None
                except ArchiveError as exc:
                    self.stats["failures"] += 1
                    raise Unavailable(f"block {block_id.hex()} could not be recalled from "
                                      f"the archive: {exc}") from None
                except IntegrityError:
                    self.stats["failures"] += 1
                    raise
                self.latencies.append(trio.current_time() - start)
                self.stats["recalls"] += 1
                self.stats["recalled_bytes"] += len(envelope)
                self.stats["kept" if kept else "not_kept"] += 1
                # A cache file of the archive mount, or an evicted block made resident again.
                if kept and (evicted or self.blocks is None) and self._kept is not None:
                    self._kept.send_nowait(block_id)
                if kept:
                    self._just_kept[block_id] = None
                    if len(self._just_kept) > JUST_KEPT:
                        del self._just_kept[next(iter(self._just_kept))]
                return envelope, kept, plain
            self.stats["failures"] += 1
            raise Unavailable(f"block {block_id.hex()} could not be recalled from the "
                              f"archive within {self.timeout:g} s")
        finally:
            self.waiting -= 1
            self.active.discard(block_id)
            if self._inflight.get(block_id) is done:
                del self._inflight[block_id]
                done.set()

    def _fetch_thread(self, block_id: bytes, name: str, open_it: bool
                      ) -> tuple[bytes | memoryview, bool, bool, bytes | None]:
        """(envelope, kept, was evicted, plaintext if `open_it`); runs in a worker thread.
        The envelope is authenticated before anything is stored (by opening it, or by the
        cheaper check when the plaintext is not wanted)."""
        envelope = self.backend.get(name)
        plain: bytes | None = None
        if open_it:
            plain = self.store.sealer.open(KIND_BLOCK, block_id, envelope,
                                           name=f"archive block {block_id.hex()}")
        else:
            self.store.sealer.check(KIND_BLOCK, block_id, envelope,
                                    name=f"archive block {block_id.hex()}")
        evicted = self.blocks is not None and self.blocks.state(block_id) == STATE_EVICTED
        if self.blocks is not None and not evicted:
            # Its hot file was lost or damaged behind our back: always repaired.
            self.store.put_envelope(block_id, envelope)
            log.warning("block %s was missing or damaged in the hot store; restored it from "
                        "the archive", block_id.hex())
            return envelope, True, False, plain
        kept = self.keep(len(envelope))
        if kept:
            self.store.put_envelope(block_id, envelope)
        return envelope, kept, evicted, plain

    def status(self) -> dict[str, object]:
        return {"queue": self.waiting, "active": len(self.active),
                "latency_p50_s": percentile(self.latencies, 0.5),
                "latency_p99_s": percentile(self.latencies, 0.99), **self.stats}
