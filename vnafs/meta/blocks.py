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
  tombstone; referencing it again before archive gc removes the tombstone.

Every function that changes state takes the `Tx` of the caller's write transaction.
"""

from __future__ import annotations

from collections.abc import Iterator

import lmdb

from vnafs.meta.db import MetaDB, records, u64
from vnafs.meta.records import STATE_HOT, STATE_REPLICATED, RefCount
from vnafs.meta.tx import Tx


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
        stored = 0
        with self.db.begin() as txn:
            for _, rc in self.scan(txn):
                stored += rc.stored
            return {"blocks": txn.stat(self.db.dbs["refs"])["entries"],
                    "block_bytes_stored": stored}

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

    def _free(self, tx: Tx, block_id: bytes, *, archived: bool) -> None:
        """Nothing references the block: its hot file goes after the commit, and an archived
        copy gets a tombstone for `vnafs gc --archive`."""
        self.db.delete(tx.txn, "refs", block_id)
        tx.freed_blocks.append(block_id)
        if self.db.journal and archived:
            self.db.put(tx.txn, "tombstones", block_id, u64(tx.now))
