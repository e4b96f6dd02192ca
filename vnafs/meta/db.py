"""The LMDB environment of a hot store, with sealed values and epoch-versioned records.

Every value vnafs keeps in LMDB is a sealed envelope (docs/format.md section 4) whose AAD binds it
to its table and key, so a flipped, truncated or transplanted value is an `IntegrityError`, never
wrong metadata. Keys never hold plaintext names: callers build them from inode numbers and HMACs.

Namespace tables are *versioned*: each record lives in epochs `[birth, death)` and the key ends
with `INF - birth`, so the newest version of a prefix sorts first and a read at epoch `s` is one
cursor seek. A snapshot (meta/snapshots.py) only advances the epoch and reads at an older one;
a change to a record born in the current epoch rewrites it in place. Keeping this logic here,
in four small functions, is what lets the rest of the engine stay ignorant of it.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import lmdb

from vnafs.errors import IntegrityError
from vnafs.seal import KIND_RECORD, Sealer

INF = 2**64 - 1
_U64 = struct.Struct(">Q")

# Table name -> one-byte tag used in the AAD (docs/format.md section 5).
TABLES: dict[str, bytes] = {
    "counters": b"c",
    "inodes": b"i",
    "dirents": b"d",
    "blockmap": b"b",
    "refs": b"r",
    "xattrs": b"x",
    "orphans": b"o",
    # The DICOM index (vnafs/dicom/index.py, docs/format.md section 5.5).
    "dicom_files": b"F",
    "dicom_sop": b"S",
    "dicom_study": b"T",
    "dicom_series": b"E",
    "dicom_member": b"M",
    "dicom_lookup": b"L",
    "dicom_todo": b"q",
    # Snapshots (vnafs/meta/snapshots.py, docs/architecture.md section 10).
    "snapshots": b"n",
    # Tiering: pinned studies and files (vnafs/tier/, docs/format.md 5.3).
    "tier_pins": b"P",
    # Archive replication (vnafs/archive/, docs/format.md sections 5.3 and 6).
    "tombstones": b"t",
    "repl_state": b"z",
    "repl_dirty": b"y",
    "repl_blocks": b"u",
    # The access audit's chained records (vnafs/audit/, docs/format.md 5.6), and the chain a
    # read-only archive mount keeps of its own accesses (never replicated).
    "audit": b"A",
    "audit_local": b"a",
}
TAG_TABLES = {tag: name for name, tag in TABLES.items()}
# Tables whose values are not sealed envelopes (docs/format.md section 5): the outbox marks.
UNSEALED = frozenset({"repl_dirty", "repl_blocks"})

# Tables whose changes go to the archive. `refs` is rebuilt from `blockmap` on restore (its
# replication state differs between the hot store and the archive by definition), and the
# replication bookkeeping describes this hot store's outbox, not the file system; a read-only
# archive mount's own audit chain describes that mount.
REPLICATED = frozenset(TABLES) - {"refs", "repl_state", "repl_dirty", "repl_blocks",
                                  "audit_local"}

# LMDB reserves address space, not disk: the file grows only as records are written.
MAP_SIZE = 1 << 40
# Kernel readahead on the LMDB map only while the file is at most this share of physical memory
# (docs/architecture.md section 3).
READAHEAD_MAX_FRACTION = 0.25


def records(cur: lmdb.Cursor) -> Iterator[tuple[bytes, bytes]]:
    """A cursor's (key, value) pairs. py-lmdb's stubs allow memoryviews, which it returns only
    with `buffers=True`; vnafs never asks for that, so they are bytes."""
    return cast(Iterator[tuple[bytes, bytes]], iter(cur))


def u64(n: int) -> bytes:
    return _U64.pack(n)


def read_u64(b: bytes | memoryview, offset: int = 0) -> int:
    return int(_U64.unpack_from(b, offset)[0])


def use_readahead(data_file: Path, memory: int | None = None) -> bool:
    """Whether to map `data_file` with readahead: yes while it fits comfortably in memory.

    With readahead a cold walk faults in neighbouring pages with each miss (0.55 -> 0.38 s for
    20,100 entries); for a file much larger than memory LMDB advises against it, since random
    lookups would read far more than they use and evict the pages that matter.
    """
    if memory is None:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        size = data_file.stat().st_size
    except FileNotFoundError:
        size = 0
    return size <= memory * READAHEAD_MAX_FRACTION


class MetaDB:
    """One hot store's LMDB environment.

    Write transactions must come from a single thread at a time (the daemon's writer limiter);
    read transactions may be opened from any thread.
    """

    def __init__(self, path: Path, sealer: Sealer, *, readonly: bool = False,
                 journal: bool = False) -> None:
        path.mkdir(mode=0o700, exist_ok=True)
        self.sealer = sealer
        # Commits are not synced one by one: on ext4 every fdatasync forces a journal commit
        # carrying every new block file, which made a small-file close cost 5-40 ms. A commit
        # in the page cache already survives a daemon crash; power-loss durability comes from
        # the engine's shared barrier (syncfs) at fsync, sync_on_close and every few seconds.
        self.env = lmdb.open(
            str(path),
            map_size=MAP_SIZE,
            max_dbs=len(TABLES) + 2,
            readonly=readonly,
            sync=False,
            metasync=False,
            readahead=use_readahead(path / "data.mdb"),
            max_readers=512,
        )
        self.dbs = {
            name: self.env.open_db(name.encode(), create=not readonly) for name in TABLES
        }
        # True when an archive is configured: every change of a replicated table then leaves a
        # dirty mark for the replicator in the same transaction (docs/architecture.md 9).
        self.journal = journal
        self._last_mark = 0
        self._dirty = self.dbs["repl_dirty"]

    def close(self) -> None:
        self.env.close()

    # -- transactions -------------------------------------------------------------------------

    def begin(self, *, write: bool = False) -> lmdb.Transaction:
        return self.env.begin(write=write)

    # -- sealed values --------------------------------------------------------------------------

    def seal_record(self, table: str, key: bytes, plaintext: bytes) -> bytes:
        """The sealed LMDB value of `plaintext` stored under `key` in `table`."""
        return self.sealer.seal(KIND_RECORD, TABLES[table] + key, plaintext, compress=False)

    def open_record(self, table: str, key: bytes, value: bytes) -> bytes:
        """The plaintext of a raw LMDB value read from `table` under `key` (for callers that
        walk a cursor themselves); `IntegrityError` if it was not sealed there."""
        return self.sealer.open(
            KIND_RECORD, TABLES[table] + key, value, name=f"{table} record {key.hex()[:16]}"
        )

    def get(self, txn: lmdb.Transaction, table: str, key: bytes) -> bytes | None:
        value = cast(bytes | None, txn.get(key, db=self.dbs[table]))
        return None if value is None else self.open_record(table, key, value)

    def put(self, txn: lmdb.Transaction, table: str, key: bytes, plaintext: bytes) -> None:
        txn.put(key, self.seal_record(table, key, plaintext), db=self.dbs[table])
        if self.journal and table in REPLICATED:
            self.mark_dirty(txn, TABLES[table] + key)

    def delete(self, txn: lmdb.Transaction, table: str, key: bytes) -> bool:
        existed = bool(txn.delete(key, db=self.dbs[table]))
        if existed and self.journal and table in REPLICATED:
            self.mark_dirty(txn, TABLES[table] + key)
        return existed

    def mark_dirty(self, txn: lmdb.Transaction, tagged_key: bytes) -> None:
        """Record that a replicated record changed. The mark is a strictly increasing clock
        value, so the replicator can clear exactly the marks it shipped: a mark that changed
        after its read means the record changed again and goes in the next cycle."""
        mark = max(self._last_mark + 1, time.time_ns())
        self._last_mark = mark
        txn.put(tagged_key, _U64.pack(mark), db=self._dirty)

    def scan(
        self, txn: lmdb.Transaction, table: str, prefix: bytes = b"", start: bytes = b""
    ) -> Iterator[tuple[bytes, bytes]]:
        """Unversioned records whose key starts with `prefix`, from `prefix + start` on."""
        cur = txn.cursor(db=self.dbs[table])
        if not cur.set_range(prefix + start):
            return
        for key, value in records(cur):
            if not key.startswith(prefix):
                return
            yield key, self.open_record(table, key, value)

    def counter(self, txn: lmdb.Transaction, name: str, default: int = 0) -> int:
        value = self.get(txn, "counters", name.encode())
        return default if value is None else read_u64(value)

    def set_counter(self, txn: lmdb.Transaction, name: str, value: int) -> None:
        self.put(txn, "counters", name.encode(), u64(value))

    # -- versioned records --------------------------------------------------------------------

    def vget(
        self, txn: lmdb.Transaction, table: str, prefix: bytes, epoch: int | None = None
    ) -> bytes | None:
        """The body (plaintext after `death`) of the version of `prefix` visible at `epoch`.

        `epoch=None` means the live view: the newest version, if it has not died.
        """
        found = self._vfind(txn, table, prefix, epoch)
        return None if found is None else found[2]

    def _vfind(
        self, txn: lmdb.Transaction, table: str, prefix: bytes, epoch: int | None
    ) -> tuple[bytes, int, bytes] | None:
        cur = txn.cursor(db=self.dbs[table])
        seek = prefix if epoch is None else prefix + u64(INF - epoch)
        if not cur.set_range(seek):
            return None
        key, value = cast(tuple[bytes, bytes], cur.item())
        if len(key) != len(prefix) + 8 or not key.startswith(prefix):
            return None
        plain = self.open_record(table, key, value)
        death = read_u64(plain)
        visible = death == INF if epoch is None else death > epoch
        return (key, death, plain[8:]) if visible else None

    def vput(
        self, txn: lmdb.Transaction, table: str, prefix: bytes, body: bytes, epoch: int
    ) -> bytes | None:
        """Make `body` the live version of `prefix`.

        Returns the body of a version that was physically replaced (so the caller can release
        what it referenced), or None when the old version was kept for older epochs or absent.
        """
        replaced = None
        old = self._vfind(txn, table, prefix, None)
        if old is not None:
            key, _, old_body = old
            birth = INF - read_u64(key, len(prefix))
            if birth == epoch:
                replaced = old_body
            else:
                self.put(txn, table, key, u64(epoch) + old_body)
        new_key = prefix + u64(INF - epoch)
        self.put(txn, table, new_key, u64(INF) + body)
        return replaced

    def vdelete(
        self, txn: lmdb.Transaction, table: str, prefix: bytes, epoch: int
    ) -> tuple[bool, bytes | None]:
        """End the live version of `prefix`.

        Returns (existed, body physically removed or None if it is kept for older epochs).
        """
        old = self._vfind(txn, table, prefix, None)
        if old is None:
            return False, None
        key, _, old_body = old
        birth = INF - read_u64(key, len(prefix))
        if birth == epoch:
            self.delete(txn, table, key)
            return True, old_body
        self.put(txn, table, key, u64(epoch) + old_body)
        return True, None

    def vscan(
        self,
        txn: lmdb.Transaction,
        table: str,
        prefix: bytes,
        start: bytes = b"",
        epoch: int | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """(key part after `prefix`, body) of every record under `prefix` visible at `epoch`.

        Records are visited in key order starting at `prefix + start`; the version suffix is
        stripped from the yielded key part.
        """
        cur = txn.cursor(db=self.dbs[table])
        if not cur.set_range(prefix + start):
            return
        last_ident: bytes | None = None
        for key, value in records(cur):
            if not key.startswith(prefix):
                return
            ident = key[:-8]
            if ident == last_ident:
                continue  # an older version of a record already decided
            birth = INF - read_u64(key, len(key) - 8)
            if epoch is not None and birth > epoch:
                continue  # born after the epoch; an older version may still be visible
            last_ident = ident
            plain = self.open_record(table, key, value)
            death = read_u64(plain)
            if (death == INF) if epoch is None else (death > epoch):
                yield ident[len(prefix):], plain[8:]


def check_record(plain: bytes | None, what: str) -> bytes:
    """Narrow an Optional record body for callers that know it must exist."""
    if plain is None:
        raise IntegrityError(f"{what} is missing from the metadata")
    return plain
