"""The tiering daemon: keeps the hot store under its watermarks, recalls and prefetches.

Why a module of its own: `tier/state.py` says what could go; this decides when, in which order,
and does it safely (docs/architecture.md section 11):

- above the high watermark, whole studies (or files) least recently used and past `min_age`
  are evicted until usage is below the low watermark; blocks only snapshots use go first,
  then studies recalled but not read since, then the rest by last use;
- a block leaves only if it is archived and a read of its archive copy authenticated against
  its id just now; never blocks of open files, pinned studies or files, or files changed
  after the archive's recovery point;
- eviction is crash-safe: one commit marks the verified blocks evicted, then their files are
  deleted; a crash in between leaves files of evicted blocks, which reads still use and the
  next crash recovery makes resident again;
- recalls asked for by hand (`vnafs recall`) and prior-study prefetch run from one queue,
  the hand-made ones first, and stop at the high watermark: a recall never evicts.

Everything runs on the trio loop; scans, verification reads and block fetches in worker
threads under the tier's own limiters, so hot reads and writes keep their speed.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from vnafs.archive.backend import ArchiveError, Backend
from vnafs.archive.log import block_name
from vnafs.archive.recall import Recall, percentile
from vnafs.archive.replicator import Replicator
from vnafs.config import TieringConfig
from vnafs.dicom.index import DicomIndex, NewStudy
from vnafs.errors import IntegrityError, VnafsError
from vnafs.fs.engine import Engine
from vnafs.fs.files import Files
from vnafs.meta.namespace import Namespace
from vnafs.meta.records import STATE_EVICTED
from vnafs.meta.tx import Tx
from vnafs.seal import KIND_BLOCK, Sealer
from vnafs.tier import state
from vnafs.tier.state import Capacity, Unit

log = logging.getLogger("vnafs.tier")

CHECK_SECONDS = 10.0
# Concurrent verification reads of archive copies during eviction.
VERIFY_CONCURRENCY = 4
# Recalled-but-unread studies are kept at least this long before they are first candidates.
RECALL_GRACE_NS = 3600 * 10**9
NS = 10**9
EVICTED_STUDIES_TTL = 60.0
# A study whose files a reader recalls is queued for read-ahead once per this many seconds.
STUDY_READ_AHEAD_QUIET = 600.0
# Blocks one recall job fetches at once (the recall limiter, shared with readers, is larger).
JOB_FETCHES = 4


class Refused(VnafsError):
    """A tiering request that must not be done (one line, for the CLI)."""


@dataclass(order=True)
class _Job:
    priority: int  # 0: asked for by hand, 1: prefetch
    seq: int
    label: str = field(compare=False)
    key: bytes = field(compare=False)
    inos: list[int] = field(compare=False)
    done: trio.Event = field(default_factory=trio.Event, compare=False)
    total: int = field(default=0, compare=False)
    fetched: int = field(default=0, compare=False)
    skipped: int = field(default=0, compare=False)
    error: str | None = field(default=None, compare=False)


class Tierer:
    """Collaborators are given at construction; `kept` receives the ids of evicted blocks
    that a recall wrote back into the hot store (they become resident in one batched commit).
    """

    def __init__(self, engine: Engine, files: Files, index: DicomIndex | None,
                 recall: Recall, capacity: Capacity, cfg: TieringConfig, *,
                 backend: Backend, sealer: Sealer, replicator: Replicator | None,
                 kept: trio.MemoryReceiveChannel[bytes], meta_path: str,
                 new_studies: trio.MemoryReceiveChannel[NewStudy] | None = None,
                 reader_recalls: trio.MemoryReceiveChannel[int] | None = None) -> None:
        self.engine = engine
        self.ns: Namespace = engine.ns
        self.files = files
        self.index = index
        self.recall = recall
        self.capacity = capacity
        self.cfg = cfg
        self.backend = backend
        self.sealer = sealer
        self.replicator = replicator
        self._kept = kept
        # The indexer's word that a study got its first instance: prefetch its priors.
        self._new_studies = new_studies
        # The engine's word that a reader waited on the archive for a block of this inode:
        # recall the rest of its study ahead of the reader (`_read_ahead_studies`).
        self._reader_recalls = reader_recalls
        self._meta_path = meta_path
        self.verify_limiter = trio.CapacityLimiter(VERIFY_CONCURRENCY)
        # One eviction pass at a time (automatic, or `vnafs evict`).
        self.evicting = trio.Lock()
        self._wakeup = trio.Event()
        # Recall queue (loop): jobs by priority, and the event the workers wait on.
        self._jobs: list[_Job] = []
        self._jobs_ready = trio.Event()
        self._seq = itertools.count()
        self._current: dict[int, _Job] = {}
        # Study key -> when a recall brought it back (loop), until something of it is opened.
        self.recalled: dict[bytes, int] = {}
        # Since mount. (`status` reports the evicted bytes held in the archive only as
        # `evicted_bytes`: not to be confused with `freed_bytes`, what evictions freed.)
        self.stats = {"evictions": 0, "evicted_blocks": 0, "freed_bytes": 0,
                      "eviction_passes": 0, "verify_failures": 0, "prefetched_studies": 0,
                      "recall_jobs": 0, "study_read_aheads": 0}
        self.last_error: str | None = None
        self.eviction_seconds: deque[float] = deque(maxlen=64)
        # (time.monotonic() of the count, studies with evicted blocks): a count reads every
        # block record of every study, so `status` refreshes it at most every
        # EVICTED_STUDIES_TTL seconds, and at once after an eviction or recall.
        self._evicted_studies: tuple[float, int] = (-math.inf, 0)

    # -- the tasks ------------------------------------------------------------------------------

    async def run(self, crashed: bool = False,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """`crashed`: the last run did not unmount cleanly; its leftover block files are
        collected first, with evictions held off (a collection racing an eviction could count
        a block resident whose file the eviction deletes next)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._mark_resident)
            for _ in range(2):
                nursery.start_soon(self._recall_worker)
            if self._new_studies is not None:
                nursery.start_soon(self._prefetch_for_new_studies, self._new_studies)
            if self._reader_recalls is not None:
                nursery.start_soon(self._read_ahead_studies, self._reader_recalls)
            task_status.started()
            if crashed:
                async with self.evicting:
                    await self.engine.collect_leftovers()
            await self.engine.count_usage()
            while True:
                await self._refresh_metadata_size()
                if self.capacity.over_high():
                    try:
                        await self.evict_to_low()
                    except (ArchiveError, IntegrityError, OSError) as exc:
                        self._failed(f"eviction stopped: {exc}")
                with trio.move_on_after(CHECK_SECONDS):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()

    def nudge(self) -> None:
        self._wakeup.set()

    def _failed(self, message: str) -> None:
        if message != self.last_error:
            log.error("%s", message)
        self.last_error = message
        self.engine.health.report("tiering", message)

    async def _refresh_metadata_size(self) -> None:
        self.capacity.metadata = await trio.to_thread.run_sync(os.path.getsize,
                                                               self._meta_path)

    async def _mark_resident(self) -> None:
        """Recalled blocks written back become resident: one commit per batch."""
        while True:
            batch = [await self._kept.receive()]
            while len(batch) < 256:
                try:
                    batch.append(self._kept.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self.engine.commit(self.ns.blocks.make_resident, batch)
                self._recount_evicted_studies()
            except OSError as exc:
                # The files stay; the next crash recovery or recall notes them again.
                log.warning("recording %d recalled blocks failed: %s", len(batch),
                            exc.strerror)

    # -- eviction -------------------------------------------------------------------------------

    def _open(self, unit: Unit) -> bool:
        return any(self.files.is_open(ino) for ino in unit.inos)

    def _recovery_point(self) -> int:
        return self.replicator.state.rp_ns if self.replicator is not None else 0

    async def evict_to_low(self) -> int:
        """One automatic pass: evict in order until usage is below the low watermark."""
        async with self.evicting:
            start = trio.current_time()
            units = await trio.to_thread.run_sync(
                lambda: state.plan(self.ns, self.index, by_study=self.cfg.evict_by == "study"),
                limiter=self.engine.io)
            now = time.time_ns()
            with self.ns.db.begin() as txn:
                pinned = state.pins(self.ns, txn)
            rp = self._recovery_point()
            min_age = self.cfg.min_age * NS
            ready = [u for u in units if self._eligible(u, pinned, now, rp, min_age) is None]
            ready.sort(key=lambda u: self._order(u, now))
            freed = 0
            for unit in ready:
                if self.capacity.above_low() <= 0:
                    break
                if self._open(unit):
                    continue
                freed += await self._evict(unit)
            self.stats["eviction_passes"] += 1
            self.eviction_seconds.append(trio.current_time() - start)
            if freed:
                log.info("eviction: %d bytes freed; hot store at %d of %d bytes", freed,
                         self.capacity.used, self.capacity.capacity)
            return freed

    def _order(self, unit: Unit, now: int) -> tuple[int, int]:
        if unit.kind == "snapshots":
            return (0, 0)
        recalled = self.recalled.get(unit.key)
        if recalled is not None and now - recalled > RECALL_GRACE_NS:
            return (1, recalled)
        return (2, unit.used_ns)

    def _eligible(self, unit: Unit, pinned: set[bytes], now: int, rp: int, min_age: int
                  ) -> str | None:
        """None if `unit` may be evicted now, else why not (one phrase, no PHI)."""
        if unit.kind == "snapshots":
            return None
        if (unit.kind == "study" and state.PIN_STUDY + unit.key in pinned) or any(
                state.file_pin_key(ino) in pinned for ino in unit.inos):
            return "it is pinned"
        if self._open(unit):
            return "a file of it is open"
        if unit.changed_ns >= rp:
            return "it changed after the archive's recovery point (not archived yet)"
        if now - unit.used_ns < min_age and unit.key not in self.recalled:
            return f"it was used within min_age ({self.cfg.min_age} s)"
        return None

    async def _evict(self, unit: Unit) -> int:
        """Verify, commit, delete; the bytes freed."""
        ids = list(unit.blocks)
        verified: list[bytes] = []

        async def verify(block_id: bytes) -> None:
            try:
                await trio.to_thread.run_sync(self._verify, block_id,
                                              limiter=self.verify_limiter)
                verified.append(block_id)
            except (ArchiveError, IntegrityError) as exc:
                self.stats["verify_failures"] += 1
                log.error("block %s stays in the hot store: its archive copy did not verify "
                          "(%s)", block_id.hex(), exc)

        async with trio.open_nursery() as nursery:
            for block_id in ids:
                nursery.start_soon(verify, block_id)
        if not verified:
            return 0
        done = await self.engine.commit(self._evict_tx, verified, unit)
        await trio.to_thread.run_sync(self.engine.delete_evicted, done, limiter=self.engine.io)
        freed = sum(unit.blocks[b] for b in done)
        self.recalled.pop(unit.key, None)
        self._recount_evicted_studies()
        self.stats["evictions"] += 1
        self.stats["evicted_blocks"] += len(done)
        self.stats["freed_bytes"] += freed
        log.info("evicted %s: %d blocks, %d bytes", unit.label, len(done), freed)
        return freed

    def _verify(self, block_id: bytes) -> None:
        envelope = self.backend.get(block_name(block_id))
        self.sealer.check(KIND_BLOCK, block_id, envelope,
                          name=f"archive block {block_id.hex()}")

    def _evict_tx(self, tx: Tx, block_ids: list[bytes], unit: Unit) -> list[bytes]:
        # Pins are checked again inside the commit: a pin that raced the verification wins.
        pinned = state.pins(self.ns, tx.txn)
        if (unit.kind == "study" and state.PIN_STUDY + unit.key in pinned) or any(
                state.file_pin_key(ino) in pinned for ino in unit.inos):
            return []
        return self.ns.blocks.evict(tx, block_ids)

    # -- requests (the control socket) ------------------------------------------------------------

    def _units(self, req: dict[str, Any]) -> list[Unit]:
        """The units a request names: --study, --patient [--issuer], --accession, or inodes
        (the CLI resolves paths to inode numbers)."""
        units = []
        with self.ns.db.begin() as txn:
            for uid in self._study_uids(txn, req):
                assert self.index is not None
                inos = state.study_inos(self.index, txn, uid)
                units.append((
                    "study", self.index.study_key(uid), inos))
            for ino in req.get("inos") or []:
                units.append(("file", state.u64(int(ino)), [int(ino)]))
        return [state.unit_of(self.ns, self.index, kind, key, inos)
                for kind, key, inos in units]

    def _study_uids(self, txn: Any, req: dict[str, Any]) -> list[str]:
        if not any(req.get(k) for k in ("study", "patient", "accession")):
            return []
        if self.index is None:
            raise Refused("the DICOM index is off ([dicom] index = false): name files instead")
        index = self.index
        if req.get("study"):
            if index.study(txn, req["study"]) is None:
                raise Refused("no study with that StudyInstanceUID is indexed: check the UID "
                              "(vnafs find --study UID)")
            return [req["study"]]
        if req.get("patient"):
            found = _patient_studies(index, txn, req["patient"], req.get("issuer"))
            if not found:
                raise Refused("no study of that patient is indexed: check the PatientID and "
                              "--issuer (vnafs find --patient ID)")
            return found
        prefix = index.accession_prefix(req.get("accession_issuer") or "", req["accession"])
        found = [rec.study for rec in index.lookup(txn, prefix)]
        if not found:
            raise Refused("no study with that accession number is indexed: check it "
                          "(vnafs find --accession A)")
        return found

    async def evict_request(self, req: dict[str, Any]) -> dict[str, Any]:
        units = await trio.to_thread.run_sync(self._units, req, limiter=self.engine.io)
        if not units:
            raise Refused("name what to evict: --study UID, --patient ID or paths")
        now = time.time_ns()
        with self.ns.db.begin() as txn:
            pinned = state.pins(self.ns, txn)
        rp = self._recovery_point()
        for unit in units:
            why = self._eligible(unit, pinned, now, rp, 0)
            if why is not None:
                raise Refused(f"{unit.label} is not evicted: {why}")
        freed = blocks = 0
        async with self.evicting:
            for unit in units:
                before = self.stats["evicted_blocks"]
                freed += await self._evict(unit)
                blocks += self.stats["evicted_blocks"] - before
        return {"units": len(units), "blocks": blocks, "bytes_freed": freed}

    async def recall_request(self, req: dict[str, Any], *, priority: int = 0) -> dict[str, Any]:
        units = await trio.to_thread.run_sync(self._units, req, limiter=self.engine.io)
        if not units:
            raise Refused("name what to recall: --study UID, --patient ID, --accession A or "
                          "paths")
        jobs = [self._enqueue(u.label, u.key, u.inos, priority) for u in units]
        if req.get("wait"):
            for job in jobs:
                await job.done.wait()
        return self._jobs_report(jobs)

    def _jobs_report(self, jobs: list[_Job]) -> dict[str, Any]:
        return {"jobs": [job.seq for job in jobs], "total_blocks": sum(j.total for j in jobs),
                "fetched_blocks": sum(j.fetched for j in jobs),
                "skipped_blocks": sum(j.skipped for j in jobs),
                "done": all(j.done.is_set() for j in jobs),
                "errors": [j.error for j in jobs if j.error]}

    def job_progress(self, seqs: list[int]) -> dict[str, Any]:
        jobs = [self._current[s] for s in seqs if s in self._current]
        return self._jobs_report(jobs)

    def _enqueue(self, label: str, key: bytes, inos: list[int], priority: int) -> _Job:
        job = _Job(priority, next(self._seq), label, key, inos)
        self._current[job.seq] = job
        if len(self._current) > 4096:
            for seq in sorted(self._current)[:1024]:
                if self._current[seq].done.is_set():
                    del self._current[seq]
        self._jobs.append(job)
        self._jobs.sort()
        self._jobs_ready.set()
        self.stats["recall_jobs"] += 1
        return job

    async def _recall_worker(self) -> None:
        while True:
            if not self._jobs:
                self._jobs_ready = trio.Event()
                await self._jobs_ready.wait()
                continue
            job = self._jobs.pop(0)
            try:
                await self._run_job(job)
            except (IntegrityError, OSError) as exc:
                job.error = str(exc)
                log.error("recall of %s stopped: %s", job.label, exc)
            finally:
                job.done.set()

    async def _run_job(self, job: _Job) -> None:
        todo = await trio.to_thread.run_sync(state.blocks_to_recall, self.ns, job.inos,
                                             limiter=self.engine.io)
        job.total = len(todo)
        fetches = trio.CapacityLimiter(JOB_FETCHES)

        async def fetch(block_id: bytes) -> None:
            try:
                if await self.recall.fetch_only(block_id):
                    job.fetched += 1
                else:
                    job.skipped += 1
            finally:
                fetches.release_on_behalf_of(block_id)

        async with trio.open_nursery() as nursery:
            for block_id, size in todo.items():
                room = (self.capacity.may_keep(size) if job.priority == 0
                        else self.capacity.may_prefetch(size))
                if not room:
                    job.skipped += 1
                    continue
                # Blocks are fetched in the order the files hold them, JOB_FETCHES at once.
                await fetches.acquire_on_behalf_of(block_id)
                nursery.start_soon(fetch, block_id)
        if job.fetched and job.key:
            self.recalled[job.key] = time.time_ns()
        log.info("recalled %s: %d of %d blocks (%d skipped: no room)", job.label, job.fetched,
                 job.total, job.skipped)

    async def pin_request(self, req: dict[str, Any], pinned: bool) -> dict[str, Any]:
        def keys() -> list[bytes]:
            out = []
            with self.ns.db.begin() as txn:
                for uid in self._study_uids(txn, req):
                    assert self.index is not None
                    out.append(state.study_pin_key(self.index, uid))
            out += [state.file_pin_key(int(ino)) for ino in req.get("inos") or []]
            return out

        found = await trio.to_thread.run_sync(keys, limiter=self.engine.io)
        if not found:
            raise Refused("name what to pin: --study UID or paths")

        def change(tx: Tx) -> int:
            n = 0
            for key in found:
                if pinned:
                    state.pin(tx, self.ns, key)
                    n += 1
                else:
                    n += state.unpin(tx, self.ns, key)
            return n

        return {"changed": await self.engine.commit(change), "pinned": pinned}

    # -- prior-study prefetch -------------------------------------------------------------------

    async def _read_ahead_studies(self, inos: trio.MemoryReceiveChannel[int]) -> None:
        """Somebody reads an evicted file: recall the rest of its study in parallel, ahead of
        the reader. A viewer opens whole studies, one file after another, and each file is
        often a single block, which readahead within a file cannot fetch ahead of."""
        index = self.index
        handled: dict[int, float] = {}  # ino -> time.monotonic() its study was queued

        def study_of(ino: int) -> tuple[bytes, list[int]] | None:
            assert index is not None
            with self.ns.db.begin() as txn:
                entry = index.entry(txn, ino)
                if entry is None:
                    return None
                uid = entry.record.study
                return index.study_key(uid), state.study_inos(index, txn, uid)

        async for ino in inos:
            now = time.monotonic()
            if (index is None or not self.cfg.read_ahead_studies
                    or now - handled.get(ino, -math.inf) < STUDY_READ_AHEAD_QUIET):
                continue
            try:
                found = await trio.to_thread.run_sync(study_of, ino, limiter=self.engine.io)
            except (IntegrityError, OSError) as exc:
                self._failed(f"study read-ahead failed: {exc}")
                continue
            handled[ino] = now
            if found is None:
                continue
            key, members = found
            for member in members:
                handled[member] = now
            if len(handled) > 100_000:
                handled = {i: t for i, t in handled.items()
                           if now - t < STUDY_READ_AHEAD_QUIET}
            self._enqueue(f"study {key.hex()[:12]} (being read)", key, members, priority=0)
            self.stats["study_read_aheads"] += 1

    async def _prefetch_for_new_studies(self,
                                        studies: trio.MemoryReceiveChannel[NewStudy]) -> None:
        async for new in studies:
            try:
                await self.prefetch_priors(new.issuer, new.patient_id, new.study)
            except (IntegrityError, OSError) as exc:
                # A damaged index record costs the prefetch, never the mount.
                self._failed(f"prior-study prefetch failed: {exc}")

    async def prefetch_priors(self, issuer: str, patient_id: str, new_study: str) -> int:
        """Queue the most recent archived studies of a patient at low priority; how many."""
        if self.index is None or self.cfg.prefetch_priors <= 0:
            return 0
        index = self.index

        def choose() -> list[tuple[str, bytes, list[int]]]:
            with self.ns.db.begin() as txn:
                studies = []
                for uid in _patient_studies(index, txn, patient_id, issuer):
                    study = index.study(txn, uid)
                    if uid == new_study or study is None:
                        continue
                    modality = self.cfg.prefetch_modality
                    if modality and modality not in study.modalities:
                        continue
                    inos = state.study_inos(index, txn, uid)
                    if state.blocks_to_recall(self.ns, inos):
                        studies.append((study.date + study.time, uid, inos))
                studies.sort(reverse=True)
                return [(uid, index.study_key(uid), inos)
                        for _, uid, inos in studies[: self.cfg.prefetch_priors]]

        chosen = await trio.to_thread.run_sync(choose, limiter=self.engine.io)
        for _, key, inos in chosen:
            self._enqueue(f"study {key.hex()[:12]} (prior)", key, inos, priority=1)
        self.stats["prefetched_studies"] += len(chosen)
        return len(chosen)

    # -- status ---------------------------------------------------------------------------------

    def file_state(self, ino: int) -> str:
        with self.ns.db.begin() as txn:
            return state.file_state(self.ns, txn, ino, recalling=self.recall.active)

    def _recount_evicted_studies(self) -> None:
        self._evicted_studies = (-math.inf, self._evicted_studies[1])

    async def status(self) -> dict[str, Any]:
        cap = self.capacity

        index = self.index
        now = time.monotonic()
        recount = index is not None and now - self._evicted_studies[0] > EVICTED_STUDIES_TTL

        def counts() -> dict[str, int]:
            with self.ns.db.begin() as txn:
                pins = state.pins(self.ns, txn)
                if recount and index is not None:
                    self._evicted_studies = (now, state.count_evicted_studies(self.ns, index,
                                                                              txn))
            return {"pinned_studies": sum(k[:1] == state.PIN_STUDY for k in pins),
                    "pinned_files": sum(k[:1] == state.PIN_FILE for k in pins),
                    "evicted_studies": self._evicted_studies[1]}

        extra = await trio.to_thread.run_sync(counts, limiter=self.engine.io)
        loads = self.engine.stats["cache_hits"] + self.engine.stats["blocks_loaded"]
        recalls = self.engine.stats["reader_recalls"]
        return {
            **self.stats,  # counters since mount first: the current figures below win
            "capacity_bytes": cap.capacity,
            "high_watermark": cap.high,
            "low_watermark": cap.low,
            "resident_bytes": cap.usage.resident,
            "evicted_bytes": cap.usage.evicted,
            "metadata_bytes": cap.metadata,
            "used_bytes": cap.used,
            "counted": cap.usage.known,
            **extra,
            "recall": self.recall.status(),
            "recall_queue": len(self._jobs) + self.recall.waiting,
            "time_to_first_byte_p50_s": percentile(self.engine.ttfb, 0.5),
            "time_to_first_byte_p99_s": percentile(self.engine.ttfb, 0.99),
            "hit_ratio": (loads / (loads + recalls)) if loads + recalls else None,
            "recalled_unread_studies": len(self.recalled),
            "last_error": self.last_error,
        }


def _patient_studies(index: DicomIndex, txn: Any, patient_id: str,
                     issuer: str | None) -> list[str]:
    """Study UIDs of a patient key; without an issuer, of every issuer's patient of that ID."""
    issuers = [issuer] if issuer is not None else list(index.facet(txn, "pissuers"))
    found: list[str] = []
    for iss in issuers:
        for rec in index.lookup(txn, index.patient_prefix(iss, patient_id)):
            uid = rec.study
            if uid not in found:
                found.append(uid)
    return found


__all__ = ["STATE_EVICTED", "Refused", "Tierer"]
