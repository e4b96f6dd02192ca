"""What is evictable, what a file's state is, and pins: the metadata side of tiering.

Why a module of its own: the tiering daemon (`tier/tierer.py`) decides *when*; everything that
reads the metadata to decide *what* lives here, runs in worker threads inside one read
transaction, and knows nothing of trio, so fsck and the tests use it as it is.

An eviction unit is a whole study (DICOM, `[tiering] evict_by = "study"`) or a file. Its
candidates are the blocks that only the unit's files name, counting every record version (the
live file and what snapshots froze of it): a block that some other file also uses stays
resident, so evicting one study never makes another one slow. Blocks that only snapshots still
name are candidates of their own, taken first. Only archived blocks (state 2) are candidates;
pending ones (not yet in the archive) never leave.
"""

from __future__ import annotations

import json
import stat
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import lmdb

from vnafs.dicom.index import DicomIndex
from vnafs.meta.blocks import BlockUsage
from vnafs.meta.db import INF, read_u64, records, u64
from vnafs.meta.namespace import Namespace
from vnafs.meta.records import STATE_EVICTED, STATE_HOT, STATE_REPLICATED, BlockRef, Inode, RefCount
from vnafs.meta.tx import Tx

# `tier_pins` keys (docs/format.md 5.3).
PIN_STUDY = b"s"
PIN_FILE = b"i"

PENDING, ARCHIVED, EVICTED, PARTIAL, RECALLING = (
    "pending", "archived", "evicted", "partial", "recalling")


def study_pin_key(index: DicomIndex, uid: str) -> bytes:
    return PIN_STUDY + index.study_key(uid)


def file_pin_key(ino: int) -> bytes:
    return PIN_FILE + u64(ino)


def pin(tx: Tx, ns: Namespace, key: bytes) -> None:
    ns.db.put(tx.txn, "tier_pins", key, json.dumps({"pinned_ns": tx.now}).encode())


def unpin(tx: Tx, ns: Namespace, key: bytes) -> bool:
    return ns.db.delete(tx.txn, "tier_pins", key)


def pins(ns: Namespace, txn: lmdb.Transaction) -> set[bytes]:
    return {key for key, _ in ns.db.scan(txn, "tier_pins")}


# -- blocks of files ------------------------------------------------------------------------------


def live_blocks(ns: Namespace, txn: lmdb.Transaction, ino: int) -> list[bytes]:
    return [ref.block_id for _, ref in ns.block_refs(txn, ino)]


def file_state(ns: Namespace, txn: lmdb.Transaction, ino: int, *,
               recalling: Collection[bytes] = ()) -> str:
    """`user.vnafs.state`: pending (some block not yet in the archive), recalling (a block of
    it is being fetched), evicted (every block only in the archive), partial (some), archived
    (every block in both). A file without blocks is archived once nothing of it is pending."""
    states = set()
    for block_id in live_blocks(ns, txn, ino):
        if block_id in recalling:
            return RECALLING
        rc = ns.blocks.get(txn, block_id)
        states.add(STATE_HOT if rc is None else rc.state)
    if STATE_HOT in states:
        return PENDING
    if STATE_EVICTED in states:
        return EVICTED if states == {STATE_EVICTED} else PARTIAL
    return ARCHIVED


@dataclass
class Unit:
    """One thing that is evicted as a whole: a study or a file."""

    kind: str  # "study" | "file" | "snapshots"
    key: bytes  # the study key, u64(ino), or b"" for snapshot-only blocks
    inos: list[int]
    # Newest use (access or change) and newest change of its files, in ns.
    used_ns: int = 0
    changed_ns: int = 0
    # Candidate blocks: archived, named by nothing outside the unit; id -> sealed size.
    blocks: dict[bytes, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How the logs name it: never PHI (a study key is a keyed hash)."""
        if self.kind == "study":
            return f"study {self.key.hex()[:12]}"
        if self.kind == "file":
            return f"inode {read_u64(self.key)}"
        return "blocks only snapshots use"

    @property
    def bytes(self) -> int:
        return sum(self.blocks.values())


def _versions(ns: Namespace, txn: lmdb.Transaction) -> tuple[
        dict[int, Counter[bytes]], Counter[bytes], Counter[bytes]]:
    """One pass over every block map record version: per inode, the blocks all its versions
    name; and per block, how many live and how many dead versions name it."""
    per_ino: dict[int, Counter[bytes]] = defaultdict(Counter)
    live: Counter[bytes] = Counter()
    dead: Counter[bytes] = Counter()
    db = ns.db
    for key, value in records(txn.cursor(db=db.dbs["blockmap"])):
        plain = db.open_record("blockmap", key, value)
        block_id = BlockRef.unpack(plain[8:]).block_id
        per_ino[read_u64(key)][block_id] += 1
        if read_u64(plain) == INF:
            live[block_id] += 1
        else:
            dead[block_id] += 1
    return per_ino, live, dead


def _times(node: Inode) -> tuple[int, int]:
    changed = max(node.mtime_ns, node.ctime_ns)
    return max(changed, node.atime_ns), changed


def plan(ns: Namespace, index: DicomIndex | None, *, by_study: bool,
         exclude_keys: Collection[bytes] = ()) -> list[Unit]:
    """Every eviction unit with candidate blocks, in no particular order (the caller sorts
    and filters by age, pins, open files and the recovery point). O(block map records):
    worker threads only, and only when the hot store is over its high watermark."""
    with ns.db.begin() as txn:
        per_ino, live, dead = _versions(ns, txn)
        refs: dict[bytes, RefCount] = {}
        for block_id in set(live) | set(dead):
            rc = ns.blocks.get(txn, block_id)
            if rc is not None:
                refs[block_id] = rc
        units: list[Unit] = []
        # Blocks that only dead versions (snapshots) name go first.
        snap = Unit("snapshots", b"", [])
        for block_id, n in dead.items():
            rc = refs.get(block_id)
            if (not live[block_id] and rc is not None and rc.state == STATE_REPLICATED
                    and rc.count == n):
                snap.blocks[block_id] = rc.stored
        if snap.blocks:
            units.append(snap)
        grouped: set[int] = set()
        if by_study and index is not None:
            for key, inos in _study_members(index, txn):
                grouped.update(inos)
                if key not in exclude_keys:
                    units.append(Unit("study", key, inos))
        for ino in per_ino:
            if ino not in grouped and u64(ino) not in exclude_keys:
                units.append(Unit("file", u64(ino), [ino]))
        out = []
        for unit in units:
            if unit.kind != "snapshots":
                _fill(ns, txn, unit, per_ino, refs)
            if unit.blocks:
                out.append(unit)
        return out


def _fill(ns: Namespace, txn: lmdb.Transaction, unit: Unit,
          per_ino: dict[int, Counter[bytes]], refs: dict[bytes, RefCount]) -> None:
    """Times and exclusive archived blocks of `unit`."""
    names: Counter[bytes] = Counter()
    for ino in unit.inos:
        names.update(per_ino.get(ino, Counter()))
        node = ns.inode(txn, ino)
        if node is not None and stat.S_ISREG(node.mode):
            used, changed = _times(node)
            unit.used_ns = max(unit.used_ns, used)
            unit.changed_ns = max(unit.changed_ns, changed)
    for block_id, n in names.items():
        rc = refs.get(block_id)
        if rc is not None and rc.state == STATE_REPLICATED and rc.count == n:
            unit.blocks[block_id] = rc.stored


def _study_members(index: DicomIndex, txn: lmdb.Transaction
                   ) -> Iterable[tuple[bytes, list[int]]]:
    for study in index.studies(txn):
        inos = [ino for series in index.series_of(txn, study.uid)
                for ino, _ in index.members(txn, study.uid, series.uid)]
        yield index.study_key(study.uid), inos


def study_inos(index: DicomIndex, txn: lmdb.Transaction, uid: str) -> list[int]:
    return [ino for series in index.series_of(txn, uid)
            for ino, _ in index.members(txn, uid, series.uid)]


def unit_of(ns: Namespace, index: DicomIndex | None, kind: str, key: bytes, inos: list[int]
            ) -> Unit:
    """One unit by hand (`vnafs evict`): its exclusive archived blocks."""
    with ns.db.begin() as txn:
        per_ino: dict[int, Counter[bytes]] = {}
        ids: set[bytes] = set()
        for ino in inos:
            counts: Counter[bytes] = Counter()
            cur = txn.cursor(db=ns.db.dbs["blockmap"])
            prefix = u64(ino)
            if cur.set_range(prefix):
                for k, v in records(cur):
                    if not k.startswith(prefix):
                        break
                    plain = ns.db.open_record("blockmap", k, v)
                    counts[BlockRef.unpack(plain[8:]).block_id] += 1
            per_ino[ino] = counts
            ids.update(counts)
        refs = {b: rc for b in ids if (rc := ns.blocks.get(txn, b)) is not None}
        unit = Unit(kind, key, inos)
        _fill(ns, txn, unit, per_ino, refs)
        return unit


def blocks_to_recall(ns: Namespace, inos: Iterable[int]) -> dict[bytes, int]:
    """The evicted blocks the live versions of `inos` name; id -> sealed size."""
    out: dict[bytes, int] = {}
    with ns.db.begin() as txn:
        for ino in inos:
            for block_id in live_blocks(ns, txn, ino):
                rc = ns.blocks.get(txn, block_id)
                if rc is not None and rc.state == STATE_EVICTED:
                    out[block_id] = rc.stored
    return out


def count_evicted_studies(ns: Namespace, index: DicomIndex, txn: lmdb.Transaction) -> int:
    """How many studies have at least one evicted block (fully or partly in the archive
    only). One read of every block record of every study: the caller caches the answer."""
    count = 0
    for study in index.studies(txn):
        for ino in study_inos(index, txn, study.uid):
            if any((rc := ns.blocks.get(txn, block_id)) is not None
                   and rc.state == STATE_EVICTED for block_id in live_blocks(ns, txn, ino)):
                count += 1
                break
    return count


class Capacity:
    """The hot store's budget and where usage stands against it. `usage` is the engine's
    `BlockUsage` (loop only); `metadata` is the LMDB file's size, refreshed by the tierer."""

    def __init__(self, usage: BlockUsage, capacity: int, *, high: float, low: float) -> None:
        self.usage = usage
        self.capacity = capacity
        self.high = high
        self.low = low
        self.metadata = 0

    @property
    def used(self) -> int:
        return self.usage.resident + self.metadata

    def over_high(self) -> bool:
        return self.usage.known and self.used > self.capacity * self.high

    def above_low(self) -> int:
        """Bytes to free to get below the low watermark (0 if below)."""
        return max(0, self.used - int(self.capacity * self.low))

    def may_keep(self, size: int) -> bool:
        """Whether a recalled block may stay: only within the capacity (above it, recalled
        data is served and not kept, so a scan of the whole tree cannot overfill the disk)."""
        return self.used + size <= self.capacity

    def may_prefetch(self, size: int) -> bool:
        """Background recalls stop at the high watermark: they never cause an eviction."""
        return self.usage.known and self.used + size <= self.capacity * self.high
