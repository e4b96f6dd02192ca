"""Re-seal everything under the current data key, and prove that an old one is no longer needed.

Why a module of its own: `vnafs key rotate` only starts a new data key for new writes; what was
sealed before stays under the old key, which a compromised keyring copy still opens. Re-sealing
moves every sealed thing the file system owns to the current key, in the hot store (LMDB records
and block files) and in the archive (blocks overwritten in place; the metadata by a new
checkpoint, which leaves the old parts unreachable for `vnafs gc --archive`), and `find_sealed`
is the proof `vnafs key retire` needs before it drops an old key for good: it looks at every
envelope itself rather than trusting a record of what a re-seal did.

Re-sealing decrypts and encrypts again, nothing more: the compressed body, the codec, the
plaintext length and the block id stay the same (docs/format.md section 4), so deduplication,
block maps and snapshots are untouched. The same code runs offline on an unmounted store and in a
running daemon (docs/architecture.md section 4): every step that writes is a short call the
caller runs under the metadata writer (`under_writer`), so commits and block frees never
interleave with it; the reading and the cryptography run outside it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from vnafs.archive import log as alog
from vnafs.archive.backend import ArchiveMissing, Backend
from vnafs.errors import IntegrityError
from vnafs.meta.db import TABLES, UNSEALED, MetaDB, records
from vnafs.meta.records import STATE_HOT, RefCount
from vnafs.seal import HEADER_LEN, KIND_BLOCK, KIND_RECORD, Sealer
from vnafs.store.hot import HotStore

log = logging.getLogger("vnafs.keys")

T = TypeVar("T")
# Called with a step that writes; runs it while no metadata commit runs, and returns its result.
UnderWriter = Callable[[Callable[[], T]], T]

SEALED_TABLES = tuple(sorted(set(TABLES) - UNSEALED))
RECORD_BATCH = 2000
BLOCK_BATCH = 32
ARCHIVE_THREADS = 8


@dataclass
class ResealReport:
    """Progress of one re-seal, as `vnafs key reseal` shows it; JSON-safe."""

    to_version: int = 0
    phase: str = "records"  # records, blocks, archive, done
    records_checked: int = 0
    records_resealed: int = 0
    blocks_checked: int = 0
    blocks_resealed: int = 0
    blocks_total: int = 0
    archive_checked: int = 0
    archive_resealed: int = 0
    bytes_resealed: int = 0
    seconds: float = 0.0
    finished: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _direct(step: Callable[[], T]) -> T:
    return step()


# Unauthenticated: a header that lies only makes the re-seal or the retire check look at the
# object, never skip it.
envelope_version = Sealer.key_version


class Resealer:
    """One re-seal of a hot store (and its archive, when it has one) under the current key."""

    def __init__(self, db: MetaDB, hot: HotStore, sealer: Sealer, backend: Backend | None,
                 *, under_writer: UnderWriter[Any] = _direct) -> None:
        self.db = db
        self.hot = hot
        self.sealer = sealer
        self.backend = backend
        self.under_writer = under_writer
        self.report = ResealReport(to_version=sealer.keyring.current_version)

    def run(self) -> ResealReport:
        """Re-seal everything; the report. Blocking: run it in a worker thread."""
        started = time.monotonic()
        try:
            self.report.phase = "records"
            for table in SEALED_TABLES:
                start: bytes | None = b""
                while start is not None:
                    start = self.under_writer(functools.partial(self._records, table, start))
            self.report.phase = "blocks"
            ids = list(self.hot.ids())
            self.report.blocks_total = len(ids)
            for at in range(0, len(ids), BLOCK_BATCH):
                prepared = self._prepare_blocks(ids[at:at + BLOCK_BATCH])
                if prepared:
                    self.under_writer(functools.partial(self._install_blocks, prepared))
            if self.backend is not None:
                self.report.phase = "archive"
                self._archive_blocks(self.backend)
            self.report.phase = "done"
        finally:
            self.report.seconds = round(time.monotonic() - started, 3)
        log.info("re-seal under data key version %d: %d of %d records, %d of %d block files, "
                 "%d archive blocks, %d bytes, %.1f s", self.report.to_version,
                 self.report.records_resealed, self.report.records_checked,
                 self.report.blocks_resealed, self.report.blocks_checked,
                 self.report.archive_resealed, self.report.bytes_resealed, self.report.seconds)
        return self.report

    # -- LMDB records ------------------------------------------------------------------------------

    def _records(self, table: str, start: bytes) -> bytes | None:
        """Re-seal up to RECORD_BATCH records of `table` from key `start` on, in one write
        transaction; the key to go on from, None when the table is done. The values are put
        back without a replication mark: the checkpoint the caller asks for afterwards ships
        every record as it now is."""
        tag = TABLES[table]
        current = self.sealer.keyring.current_version
        with self.db.begin(write=True) as txn:
            cur = txn.cursor(db=self.db.dbs[table])
            if not cur.set_range(start):
                return None
            n = 0
            for key, value in records(cur):
                if n == RECORD_BATCH:
                    return key
                n += 1
                self.report.records_checked += 1
                name = f"{table} record {key.hex()[:16]}"
                if envelope_version(value, name) == current:
                    continue
                txn.put(key, self.sealer.reseal(KIND_RECORD, tag + key, value, name=name),
                        db=self.db.dbs[table])
                self.report.records_resealed += 1
        return None

    # -- hot block files ---------------------------------------------------------------------------

    def _prepare_blocks(self, ids: list[bytes]) -> list[tuple[bytes, bytes]]:
        """(block id, new envelope) for each block file of `ids` under an old key."""
        current = self.sealer.keyring.current_version
        out = []
        for block_id in ids:
            name = f"block {block_id.hex()}"
            self.report.blocks_checked += 1
            try:
                envelope = self.hot.path(block_id).read_bytes()
            except FileNotFoundError:
                continue  # freed or evicted meanwhile
            if envelope_version(envelope, name) != current:
                out.append((block_id, self.sealer.reseal(KIND_BLOCK, block_id, envelope,
                                                         name=name)))
        return out

    def _install_blocks(self, prepared: list[tuple[bytes, bytes]]) -> None:
        """Replace the files (under the writer: a block freed or evicted since it was read
        stays gone instead of coming back as a file nothing names)."""
        for block_id, envelope in prepared:
            if not self.hot.path(block_id).exists():
                continue
            self.hot.put_envelope(block_id, envelope)
            self.report.blocks_resealed += 1
            self.report.bytes_resealed += len(envelope)

    # -- archive blocks ----------------------------------------------------------------------------

    def _archive_blocks(self, backend: Backend) -> None:
        """Every block the archive holds (`_archived_blocks`) under an old key is put again
        under the current one. Blocks still waiting for the replicator are left to it: it
        uploads the hot store's file, which the previous phase re-sealed."""
        current = self.sealer.keyring.current_version
        counting = threading.Lock()

        def one(block_id: bytes) -> None:
            name = alog.block_name(block_id)
            try:
                head = backend.get_range(name, 0, HEADER_LEN)
            except ArchiveMissing:
                return
            with counting:
                self.report.archive_checked += 1
            if envelope_version(head, f"archive {name}") == current:
                return
            envelope: bytes | None = None
            with contextlib.suppress(FileNotFoundError):
                local = self.hot.path(block_id).read_bytes()
                if envelope_version(local, f"block {block_id.hex()}") == current:
                    self.sealer.check(KIND_BLOCK, block_id, local, name=f"block {block_id.hex()}")
                    envelope = local
            if envelope is None:
                envelope = self.sealer.reseal(KIND_BLOCK, block_id, backend.get(name),
                                              name=f"archive {name}")
            backend.put(name, envelope, sync=False)
            with counting:
                self.report.archive_resealed += 1
                self.report.bytes_resealed += len(envelope)

        with ThreadPoolExecutor(ARCHIVE_THREADS) as pool:
            for _ in pool.map(one, _archived_blocks(self.db)):
                pass
        backend.flush()


def _archived_blocks(db: MetaDB) -> Iterator[bytes]:
    """Ids of the blocks that are in the archive: replicated or evicted (`refs`), and deleted
    ones kept there for the retention period (`tombstones`), which must stay readable too."""
    with db.begin() as txn:
        for key, value in records(txn.cursor(db=db.dbs["refs"])):
            rc = RefCount.unpack(db.open_record("refs", key, value))
            if rc.state != STATE_HOT:
                yield key
        for key, _ in records(txn.cursor(db=db.dbs["tombstones"])):
            yield key


# -- the retire check ------------------------------------------------------------------------------


@dataclass
class Sealed:
    """Where envelopes under one data key version were found (counts; a few names)."""

    version: int
    records: int = 0
    blocks: int = 0
    archive_objects: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.records + self.blocks + self.archive_objects

    def add(self, kind: str, name: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 5:
            self.examples.append(name)


def find_sealed(db: MetaDB, hot: HotStore, backend: Backend | None, version: int) -> Sealed:
    """Everything still sealed under `version`: every LMDB value, every block file, and in the
    archive every block the hot store names as archived, `meta/HEAD`, `config`, and every
    metadata part HEAD reaches together with each record inside it."""
    found = Sealed(version)
    with db.begin() as txn:
        for table in SEALED_TABLES:
            for _, value in records(txn.cursor(db=db.dbs[table])):
                if envelope_version(value, table) == version:
                    found.add("records", f"{table} record")
    for block_id in hot.ids():
        try:
            with open(hot.path(block_id), "rb") as f:
                head = f.read(HEADER_LEN)
        except FileNotFoundError:
            continue
        if envelope_version(head, f"block {block_id.hex()}") == version:
            found.add("blocks", f"block {block_id.hex()}")
    if backend is not None:
        _find_in_archive(db, hot.sealer, backend, version, found)
    return found


def _find_in_archive(db: MetaDB, sealer: Sealer, backend: Backend, version: int,
                     found: Sealed) -> None:
    def header(name: str) -> int | None:
        try:
            return envelope_version(backend.get_range(name, 0, HEADER_LEN), f"archive {name}")
        except ArchiveMissing:
            return None

    for name in (alog.HEAD_NAME, alog.CONFIG_NAME):
        if header(name) == version:
            found.add("archive_objects", f"archive {name}")
    try:
        head = alog.Head.from_json(alog.open_object(sealer, alog.HEAD_NAME,
                                                    backend.get(alog.HEAD_NAME)))
    except ArchiveMissing:
        head = None
    except IntegrityError:
        # Sealed under the version being checked, or damaged: either way not retirable yet.
        found.add("archive_objects", f"archive {alog.HEAD_NAME}")
        head = None
    if head is not None:
        for _, name in head.parts_after(0):
            envelope = backend.get(name)
            if envelope_version(envelope, f"archive {name}") == version:
                found.add("archive_objects", f"archive {name}")
                continue
            for _, _, value in alog.read_part(sealer, name, envelope):
                if value is not None and envelope_version(value, name) == version:
                    found.add("archive_objects", f"record in archive {name}")

    names = [alog.block_name(b) for b in _archived_blocks(db)]
    with ThreadPoolExecutor(ARCHIVE_THREADS) as pool:
        for name, got in zip(names, pool.map(header, names), strict=True):
            if got == version:
                found.add("archive_objects", f"archive {name}")
