"""Block reference counts, their replication state, and tombstones.

Why a module of its own: a block is shared by every record version that names it (dedup,
snapshots), lives in the hot store, the archive or both, and may only be deleted from either
when nothing needs it. Those rules are about blocks, not about POSIX names, so they live here
and the namespace only says "this version names block X" or "no longer".

Tables (docs/format.md 5.3): `refs` (block id -> count, state, stored size), `tombstones`
(block id -> when its last reference went; archive gc removes the archive copy after the
retention), `repl_blocks` (referenced, not yet in the archive). The rules:

- a block's count is the number of `blockmap` record versions, live or not, naming it;
- with an archive, a block never replicated that loses its last reference keeps its record
  (count 0) and file until the replicator has uploaded it: a replication cycle that read the
  metadata before the deletion may still name it;
- a replicated block that loses its last reference is deleted from the hot store and gets a
  tombstone; referencing it again before archive gc removes the tombstone;
- only an archived block may be evicted (state 3: its file is gone from the hot store, the
  archive holds it); a writer that produces an evicted block again stores its file and makes
  it archived (resident) again, and so does a recall that keeps what it fetched.

Every change of the bytes the hot store holds is added to the transaction's
`resident_delta` / `evicted_delta`, so the tiering accounts stay exact without a scan.

Every function that changes state takes the `Tx` of the caller's write transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import lmdb

from vnafs.meta.db import MetaDB, records, u64
from vnafs.meta.records import STATE_EVICTED, STATE_HOT, STATE_REPLICATED, RefCount
from vnafs.meta.tx import Tx


@dataclass
class BlockUsage:
    """Sealed block bytes held by the hot store (`resident`: pending or archived) and by the
    archive alone (`evicted`). Kept by the engine on the trio loop: every commit adds its
    deltas; `count` adds the totals of one consistent scan once (commits after the scan's
    read transaction began are the deltas), after which `known` is true."""

    resident: int = 0
    evicted: int = 0
    known: bool = False

    def apply(self, tx: Tx) -> None:
        self.resident += tx.resident_delta
        self.evicted += tx.evicted_delta


class Blocks:
    def __init__(self, db: MetaDB) -> None:
        self.db = db

    # -- reads ----------------------------------------------------------------------------------

    def has(self, block_id: bytes) -> bool:
        """Whether any record references the block (or it waits for the replicator)."""
        with self.db.begin() as txn:
            return txn.get(block_id, db=self.db.dbs["refs"]) is not None

    def get(self, txn: lmdb.Transaction, block_id: bytes) -> RefCount | None:
        body = self.db.get(txn, "refs", block_id)
        return None if body is None else RefCount.unpack(body)

    def scan(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, RefCount]]:
        """Every block record (decrypting each one: callers run in worker threads)."""
        for key, value in records(txn.cursor(db=self.db.dbs["refs"])):
            yield key, RefCount.unpack(self.db.open_record("refs", key, value))

    def stats(self) -> dict[str, int]:
        """Counts and stored bytes; O(blocks), so only ever called from a worker thread."""
        with self.db.begin() as txn:
            return {"blocks": txn.stat(self.db.dbs["refs"])["entries"],
                    **self.usage(txn)}

    def usage(self, txn: lmdb.Transaction) -> dict[str, int]:
        """Sealed bytes by where they are: in the hot store (pending or archived) and only in
        the archive (evicted). O(blocks): worker threads only."""
        resident = evicted = 0
        for _, rc in self.scan(txn):
            if rc.state == STATE_EVICTED:
                evicted += rc.stored
            else:
                resident += rc.stored
        return {"block_bytes_stored": resident + evicted, "resident_bytes": resident,
                "evicted_bytes": evicted}

    def state(self, block_id: bytes) -> int | None:
        """The block's state (STATE_*), None if no record names it."""
        with self.db.begin() as txn:
            rc = self.get(txn, block_id)
        return None if rc is None else rc.state

    # -- changes (inside the caller's write transaction) ----------------------------------------

    def add_ref(self, tx: Tx, block_id: bytes, stored: int) -> None:
        """One more record version names `block_id` (`stored`: its sealed size)."""
        db = self.db
        rc = self.get(tx.txn, block_id)
        if rc is None:
            if db.journal and db.get(tx.txn, "tombstones", block_id) is not None:
                # Referenced again before archive gc removed it: the archive still holds it.
                db.delete(tx.txn, "tombstones", block_id)
                rc = RefCount(0, STATE_REPLICATED, stored)
            else:
                rc = RefCount(0, STATE_HOT, stored)
                if db.journal:
                    tx.txn.put(block_id, b"", db=db.dbs["repl_blocks"])
            tx.resident_delta += stored
        elif rc.state == STATE_EVICTED and stored:
            # The writer stored the block's file again (see the module docstring).
            rc.state = STATE_REPLICATED
            tx.resident_delta += rc.stored
            tx.evicted_delta -= rc.stored
        rc.count += 1
        db.put(tx.txn, "refs", block_id, rc.pack())

    def drop_ref(self, tx: Tx, block_id: bytes) -> None:
        """One record version naming `block_id` went away."""
        rc = self.get(tx.txn, block_id)
        if rc is None:
            return  # already inconsistent; fsck reports it
        rc.count = max(0, rc.count - 1)
        if rc.count > 0 or (self.db.journal and rc.state == STATE_HOT):
            # A block never replicated is kept at count 0 until the replicator has uploaded
            # it (see the module docstring).
            self.db.put(tx.txn, "refs", block_id, rc.pack())
        else:
            self._free(tx, block_id, archived=rc.state != STATE_HOT)

    def release_replicated(self, tx: Tx, block_ids: list[bytes]) -> None:
        """The replicator stored these blocks in the archive: mark them replicated, and free
        the ones nothing references any more."""
        for block_id in block_ids:
            tx.txn.delete(block_id, db=self.db.dbs["repl_blocks"])
            rc = self.get(tx.txn, block_id)
            if rc is None:
                continue
            if rc.count == 0:
                self._free(tx, block_id, archived=True)
            elif rc.state == STATE_HOT:
                rc.state = STATE_REPLICATED
                self.db.put(tx.txn, "refs", block_id, rc.pack())

    def evict(self, tx: Tx, block_ids: list[bytes]) -> list[bytes]:
        """Mark archived blocks evicted (their files are deleted after the commit); the ids
        that were still archived and are now evicted."""
        done = []
        for block_id in block_ids:
            rc = self.get(tx.txn, block_id)
            if rc is None or rc.state != STATE_REPLICATED:
                continue  # freed, or not (or no longer) archived: it stays
            rc.state = STATE_EVICTED
            self.db.put(tx.txn, "refs", block_id, rc.pack())
            tx.resident_delta -= rc.stored
            tx.evicted_delta += rc.stored
            done.append(block_id)
        return done

    def make_resident(self, tx: Tx, block_ids: list[bytes]) -> None:
        """A recall wrote these evicted blocks' files back into the hot store."""
        for block_id in block_ids:
            rc = self.get(tx.txn, block_id)
            if rc is None or rc.state != STATE_EVICTED:
                continue
            rc.state = STATE_REPLICATED
            self.db.put(tx.txn, "refs", block_id, rc.pack())
            tx.resident_delta += rc.stored
            tx.evicted_delta -= rc.stored

    def _free(self, tx: Tx, block_id: bytes, *, archived: bool) -> None:
        """Nothing references the block: its hot file goes after the commit, and an archived
        copy gets a tombstone for `vnafs gc --archive`."""
        rc = self.get(tx.txn, block_id)
        if rc is not None:
            if rc.state == STATE_EVICTED:
                tx.evicted_delta -= rc.stored
            else:
                tx.resident_delta -= rc.stored
        self.db.delete(tx.txn, "refs", block_id)
        tx.freed_blocks.append(block_id)
        if self.db.journal and archived:
            self.db.put(tx.txn, "tombstones", block_id, u64(tx.now))
