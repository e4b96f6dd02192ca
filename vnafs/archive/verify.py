"""`vnafs verify --archive` and `vnafs gc --archive`: checking and pruning the archive.

Verification re-reads and authenticates every object under the site's prefix, because an
archive is only worth what can be read back from it: blocks must open under their own id, the
metadata parts HEAD names must open and parse, and every block the hot store believes is
replicated must be there. What can be repaired is: a missing or damaged block whose hot copy is
intact is uploaded again, and a damaged or missing metadata part makes the next replication
cycle a checkpoint, so HEAD stops depending on it.

Garbage collection is the only code that deletes archive data (deletes become tombstones; see
docs/architecture.md section 9): blocks whose tombstone is older than the retention, metadata
parts older than the newest checkpoint, and the leftovers of crashed cycles. Every deletion is
logged by object name (opaque). On an archive that enforces object retention (S3 Object Lock,
Azure immutability) an object still under retention is left alone, with its tombstone, and a
deletion removes every version of the object (a plain delete would only hide it).

Both run in the daemon (they need the keys and the outbox) in worker threads.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vnafs.archive import log as alog
from vnafs.archive.backend import ArchiveMissing, Backend
from vnafs.errors import IntegrityError
from vnafs.meta.db import MetaDB, read_u64, records
from vnafs.meta.records import STATE_EVICTED, STATE_REPLICATED, RefCount
from vnafs.seal import KIND_BLOCK, Sealer
from vnafs.store.hot import HotStore

log = logging.getLogger("vnafs.verify")


@dataclass
class VerifyReport:
    objects: int = 0
    bytes: int = 0
    done_bytes: int = 0
    total_bytes: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)
    checkpoint_needed: bool = False
    finished: bool = False
    error: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class Verifier:
    def __init__(self, db: MetaDB, hot: HotStore, backend: Backend, *,
                 workers: int = 8) -> None:
        self.db = db
        self.hot = hot
        self.sealer: Sealer = db.sealer
        self.backend = backend
        self.workers = workers
        self.report = VerifyReport()

    def run(self) -> VerifyReport:
        started = time.monotonic()
        rep = self.report
        # The hot store's view first: a block replicated after the listing is then never
        # mistaken for a missing one.
        with self.db.begin() as txn:
            # Evicted blocks are archived too (and the archive is their only copy).
            replicated = {key for key, value in records(txn.cursor(db=self.db.dbs["refs"]))
                          if RefCount.unpack(self.db.open_record("refs", key, value)).state
                          in (STATE_REPLICATED, STATE_EVICTED)}
        listing = dict(self.backend.list(""))
        rep.total_bytes = sum(listing.values())
        head = self._check_head(listing)
        needed_parts = {name for _, name in head.parts_after(0)} if head else set()
        for name in sorted(needed_parts - set(listing)):
            self._bad(name, missing=True)
            rep.checkpoint_needed = True
        for wanted in sorted(replicated):
            name = alog.block_name(wanted)
            if name not in listing:
                self._bad(name, missing=True)
                self._repair_block(wanted, name)
        # The keyring is what a restore needs first: it must be there and be this store's.
        self._check_keyring(listing)
        names = [n for n in sorted(listing) if n not in (alog.HEAD_NAME, alog.KEYRING_NAME)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for name, ok in zip(names, pool.map(self._check, names), strict=True):
                rep.objects += 1
                rep.bytes += listing[name]
                rep.done_bytes += listing[name]
                if ok:
                    continue
                self._bad(name, missing=False)
                block_id = alog.block_id_of(name)
                if block_id is not None:
                    self._repair_block(block_id, name)
                elif name in needed_parts:
                    rep.checkpoint_needed = True
                else:
                    rep.unrepaired.append(name)
        rep.seconds = time.monotonic() - started
        rep.finished = True
        log.info("archive verify: %d objects, %d bytes, %d damaged, %d missing, %d repaired",
                 rep.objects, rep.bytes, len(rep.corrupt), len(rep.missing),
                 len(rep.repaired))
        return rep

    def _bad(self, name: str, *, missing: bool) -> None:
        (self.report.missing if missing else self.report.corrupt).append(name)
        log.error("archive object %s is %s", name, "missing" if missing else "damaged")

    def _check_head(self, listing: dict[str, int]) -> alog.Head | None:
        if alog.HEAD_NAME not in listing:
            self._bad(alog.HEAD_NAME, missing=True)
            self.report.checkpoint_needed = True
            return None
        self.report.objects += 1
        try:
            head = self.backend.get(alog.HEAD_NAME)
            return alog.Head.from_json(alog.open_object(self.sealer, alog.HEAD_NAME, head))
        except (IntegrityError, ArchiveMissing):
            self._bad(alog.HEAD_NAME, missing=False)
            self.report.checkpoint_needed = True
            return None

    def _check(self, name: str) -> bool:
        """Whether one object reads back and authenticates."""
        try:
            data = self.backend.get(name)
        except ArchiveMissing:
            return False
        try:
            block_id = alog.block_id_of(name)
            if block_id is not None:
                self.sealer.check(KIND_BLOCK, block_id, data, name=name)
            elif name.startswith("meta/"):
                for _ in alog.read_part(self.sealer, name, data):
                    pass
            elif name == alog.CONFIG_NAME:
                alog.open_object(self.sealer, name, data)
        except IntegrityError:
            return False
        return True

    def _check_keyring(self, listing: dict[str, int]) -> None:
        """The archived keyring must be the hot store's, byte for byte. The daemon cannot
        authenticate it (it does not keep the KEK), but it holds the current keyring: a
        missing, damaged or different copy (an older one the next cycle would replace, or
        one put there behind our back) is replaced with it, so a restore works."""
        local = self.sealer.keyring.path.read_bytes()
        if alog.KEYRING_NAME in listing:
            self.report.objects += 1
            self.report.bytes += listing[alog.KEYRING_NAME]
            self.report.done_bytes += listing[alog.KEYRING_NAME]
            try:
                if self.backend.get(alog.KEYRING_NAME) == local:
                    return
            except ArchiveMissing:
                pass
            self._bad(alog.KEYRING_NAME, missing=False)
        else:
            self._bad(alog.KEYRING_NAME, missing=True)
        self.backend.put(alog.KEYRING_NAME, local)
        self.report.repaired.append(alog.KEYRING_NAME)
        log.warning("archive object %s uploaded again from the hot store", alog.KEYRING_NAME)

    def _repair_block(self, block_id: bytes, name: str) -> None:
        try:
            envelope = self.hot.envelope(block_id)
        except (OSError, IntegrityError):
            self.report.unrepaired.append(name)
            return
        self.backend.put(name, envelope)
        self.report.repaired.append(name)
        log.warning("archive object %s uploaded again from the hot store", name)




# -- garbage collection ---------------------------------------------------------------------------


@dataclass
class GcReport:
    blocks_deleted: int = 0
    bytes_freed: int = 0
    parts_deleted: int = 0
    tombstones_kept: int = 0
    # Expired by our clock but still under the archive's own retention: left for a later gc.
    blocks_retained: int = 0
    parts_retained: int = 0
    # Progress of a run: expired blocks found, how many were looked at, and whether it ended
    # (with `error` if it stopped early).
    blocks_expired: int = 0
    blocks_done: int = 0
    finished: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def expired_tombstones(db: MetaDB, retention_ns: int, now: int) -> tuple[list[bytes], int]:
    """Block ids whose tombstone is older than the retention, and how many are younger."""
    old: list[bytes] = []
    young = 0
    with db.begin() as txn:
        for key, body in db.scan(txn, "tombstones"):
            if now - read_u64(body) >= retention_ns:
                old.append(key)
            else:
                young += 1
    return old, young


def retained(backend: Backend, name: str, now: int) -> bool:
    """Whether the archive still holds `name` under a retention of its own."""
    try:
        ret = backend.get_retention(name)
    except ArchiveMissing:
        return False
    return ret is not None and ret.until_ns > now


def collect_blocks(db: MetaDB, backend: Backend, ids: list[bytes], retention_ns: int,
                   now: int, report: GcReport, *, locked: bool = False) -> None:
    """Delete one batch of expired blocks. The caller holds the metadata writer, so a resend
    that would revive a tombstone cannot run between the tombstone's removal (committed
    first, so a crash never leaves a tombstone naming a deleted object) and the deletion.
    `locked`: the archive enforces object retention; a block still under it keeps its
    tombstone, and one the archive refuses to delete gets it back."""
    doomed: list[tuple[bytes, bytes]] = []
    report.blocks_done += len(ids)
    if locked:
        held = {b for b in ids if retained(backend, alog.block_name(b), now)}
        report.blocks_retained += len(held)
        ids = [b for b in ids if b not in held]
    with db.begin(write=True) as txn:
        for block_id in ids:
            body = db.get(txn, "tombstones", block_id)
            if body is None or now - read_u64(body) < retention_ns:
                continue
            if db.get(txn, "refs", block_id) is not None:
                continue
            db.delete(txn, "tombstones", block_id)
            doomed.append((block_id, body))
    refused: list[tuple[bytes, bytes]] = []
    for block_id, body in doomed:
        name = alog.block_name(block_id)
        size = backend.size(name) or 0
        if locked:
            if not backend.purge(name):
                # The server's clock says the retention lasts a little longer than ours does.
                refused.append((block_id, body))
                report.blocks_retained += 1
                continue
        else:
            backend.delete(name)
        report.blocks_deleted += 1
        report.bytes_freed += size
        log.info("archive gc: deleted %s (tombstone older than the retention)", name)
    if refused:
        with db.begin(write=True) as txn:
            for block_id, body in refused:
                if db.get(txn, "refs", block_id) is None:
                    db.put(txn, "tombstones", block_id, body)


def collect_parts(backend: Backend, sealer: Sealer, committed: int, report: GcReport, *,
                  locked: bool = False) -> None:
    """Delete metadata parts no reader needs: older than HEAD's checkpoint, or left by a
    crashed cycle (not listed in HEAD, numbered below HEAD's cycle). `locked`: parts a locked
    snapshot keeps under the archive's retention stay until it ends."""
    try:
        raw = backend.get(alog.HEAD_NAME)
    except ArchiveMissing:
        return
    head = alog.Head.from_json(alog.open_object(sealer, alog.HEAD_NAME, raw))
    if head.cycle != committed:
        return  # a cycle is under way: look again next time
    keep = {name for _, name in head.parts_after(0)}
    for name, size in list(backend.list("meta/")):
        if name == alog.HEAD_NAME or name in keep:
            continue
        try:
            cycle = int(name.rsplit("/", 1)[1].split("-")[0], 16)
        except (IndexError, ValueError):
            continue
        if cycle <= head.cycle:
            now = time.time_ns()
            if locked and (retained(backend, name, now) or not backend.purge(name)):
                report.parts_retained += 1
                continue
            if not locked:
                backend.delete(name)
            report.parts_deleted += 1
            report.bytes_freed += size
            log.info("archive gc: deleted %s (superseded metadata)", name)
