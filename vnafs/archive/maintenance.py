"""The daemon side of `vnafs verify --archive` and `vnafs gc --archive`.

Why a module of its own: `verify.py` holds the synchronous work (list, fetch, authenticate,
delete); running it inside a mounted daemon adds trio concerns that belong with the archive
code, not with the control socket: verification runs as a background task that the CLI polls,
and collection deletes tombstoned blocks in batches under the metadata writer, so a resend of
the same instance cannot race the deletion of its block (see `verify.collect_blocks`).
"""

from __future__ import annotations

import functools
import logging
import time

import trio

from vnafs.archive import verify
from vnafs.archive.backend import ArchiveError
from vnafs.archive.replicator import Replicator
from vnafs.errors import IntegrityError, VnafsError
from vnafs.fs.engine import Engine
from vnafs.meta.db import MetaDB
from vnafs.seal import Sealer
from vnafs.store.hot import HotStore

log = logging.getLogger("vnafs.archive")

GC_BATCH = 100


class ArchiveMaintenance:
    """Runs on the trio loop; the work itself in worker threads."""

    def __init__(self, db: MetaDB, hot: HotStore, sealer: Sealer, engine: Engine,
                 replicator: Replicator, nursery: trio.Nursery, *, retention_days: int) -> None:
        self.db = db
        self.hot = hot
        self.sealer = sealer
        self.engine = engine
        self.replicator = replicator
        self.nursery = nursery
        self.retention_ns = retention_days * 86400 * 10**9
        # The newest verification since mount (None: none yet); replaced only once finished.
        self.verifier: verify.Verifier | None = None
        # The newest collection since mount (None: none yet); replaced only once finished.
        self.gc_report: verify.GcReport | None = None

    # -- verify ---------------------------------------------------------------------------------

    def start_verify(self) -> verify.VerifyReport:
        """Start a verification unless one is running; its report so far."""
        if self.verifier is None or self.verifier.report.finished:
            self.verifier = verify.Verifier(self.db, self.hot, self.replicator.backend)
            self.nursery.start_soon(self._run_verify, self.verifier)
        return self.verifier.report

    def verify_progress(self) -> verify.VerifyReport:
        if self.verifier is None:
            raise VnafsError("no archive verification has run since mount: start one with "
                             "vnafs verify --archive")
        return self.verifier.report

    async def _run_verify(self, verifier: verify.Verifier) -> None:
        try:
            await trio.to_thread.run_sync(verifier.run)
        except (ArchiveError, IntegrityError, OSError) as exc:
            verifier.report.error = str(exc)
            verifier.report.finished = True
        if verifier.report.checkpoint_needed:
            self.replicator.force_checkpoint()

    # -- garbage collection ---------------------------------------------------------------------

    def start_gc(self) -> verify.GcReport:
        """Start a collection unless one is running; its report so far (`vnafs gc --archive`
        polls it for its progress bar)."""
        if self.gc_report is None or self.gc_report.finished:
            self.gc_report = verify.GcReport()
            self.nursery.start_soon(self._run_gc, self.gc_report)
        return self.gc_report

    def gc_progress(self) -> verify.GcReport:
        if self.gc_report is None:
            raise VnafsError("no archive gc has run since mount: start one with vnafs gc "
                             "--archive")
        return self.gc_report

    async def _run_gc(self, report: verify.GcReport) -> None:
        try:
            await self.gc(report)
        except (ArchiveError, IntegrityError, OSError) as exc:
            report.error = str(exc)
            log.error("archive gc stopped: %s", exc)
        finally:
            report.finished = True

    async def gc(self, report: verify.GcReport) -> verify.GcReport:
        """Delete archived blocks whose tombstones passed the retention, and metadata parts no
        HEAD reaches; logged, and counted in `report`."""
        now = time.time_ns()
        backend = self.replicator.backend
        # Whether the archive keeps objects under retention of its own (also one set up by
        # the administrator, without [archive] object_lock): then gc asks before deleting.
        support = self.replicator.support
        if support is None:
            support = await trio.to_thread.run_sync(backend.retention_support)
        locked = support.supported
        ids, young = await trio.to_thread.run_sync(verify.expired_tombstones, self.db,
                                                   self.retention_ns, now)
        report.tombstones_kept = young
        report.blocks_expired = len(ids)
        for start in range(0, len(ids), GC_BATCH):
            async with self.engine.writer:  # see collect_blocks: no resend may run in between
                await trio.to_thread.run_sync(
                    functools.partial(verify.collect_blocks, self.db, backend,
                                      ids[start:start + GC_BATCH], self.retention_ns, now,
                                      report, locked=locked))
        await trio.to_thread.run_sync(
            functools.partial(verify.collect_parts, backend, self.sealer,
                              self.replicator.state.committed, report, locked=locked))
        self.replicator.nudge()
        log.info("archive gc: %d blocks and %d metadata parts deleted, %d bytes freed",
                 report.blocks_deleted, report.parts_deleted, report.bytes_freed)
        return report
