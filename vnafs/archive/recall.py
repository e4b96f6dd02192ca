"""Fetching blocks from the archive when the hot store does not have them.

Two callers: the hot mount, when a block file is missing or damaged but the archive holds the
block (the read succeeds and the hot copy is repaired), and the read-only archive mount, whose
hot store is only a metadata cache, so every block comes from here. Recalls have their own
limiter and timeout: a slow archive must not take the worker threads
that hot reads need, and a reader gets EIO rather than hanging forever.
"""

from __future__ import annotations

import logging

import trio

from vnafs.archive.backend import ArchiveError, Backend
from vnafs.archive.log import block_name
from vnafs.errors import IntegrityError
from vnafs.seal import KIND_BLOCK
from vnafs.store.hot import HotStore

log = logging.getLogger("vnafs.recall")


class Recall:
    def __init__(self, backend: Backend, store: HotStore, *, repair: bool, timeout: float,
                 concurrency: int = 4) -> None:
        self.backend = backend
        self.store = store
        self.repair = repair
        self.timeout = timeout
        self.limiter = trio.CapacityLimiter(concurrency)

    async def __call__(self, block_id: bytes) -> bytes:
        name = block_name(block_id)
        with trio.move_on_after(self.timeout):
            try:
                return await trio.to_thread.run_sync(self._fetch, block_id, name,
                                                     limiter=self.limiter,
                                                     abandon_on_cancel=True)
            except ArchiveError as exc:
                raise IntegrityError(f"block {block_id.hex()} could not be recalled from the "
                                     f"archive: {exc}") from None
        raise IntegrityError(f"block {block_id.hex()} could not be recalled from the archive "
                             f"within {self.timeout:g} s")

    def _fetch(self, block_id: bytes, name: str) -> bytes:
        envelope = self.backend.get(name)
        plaintext = self.store.sealer.open(KIND_BLOCK, block_id, envelope,
                                           name=f"archive block {block_id.hex()}")
        if self.repair:
            self.store.put_envelope(block_id, envelope)
            log.warning("block %s was missing or damaged in the hot store; restored it from "
                        "the archive", block_id.hex())
        return plaintext
