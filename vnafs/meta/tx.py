"""One metadata write transaction and what it leaves for after the commit.

Why a module of its own: every mutation of the metadata (namespace, block references, DICOM
index, snapshots, replication bookkeeping) runs inside one LMDB write transaction on the single
writer thread, and several layers need to say what must happen once that transaction has
committed: block files to delete, inodes that lost their last name, files whose content
changed. `Tx` carries those facts out of the transaction as plain lists, so the code inside it
never calls back into the layers above (docs/architecture.md, "Wiring").

`TxHooks` is the one way a layer above the namespace takes part in a namespace transaction: the
DICOM index keeps its change marks and removes a deleted file's entries in the same commit as
the change itself. The engine that opens the transaction hands the hooks in; offline tools (fsck,
restore) use `NO_HOOKS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import lmdb


class TxHooks(Protocol):
    """Called by the namespace inside its write transaction, on the writer thread."""

    def content_changed(self, tx: Tx, ino: int) -> None:
        """A linked regular file's content or size changed in this transaction."""

    def last_unlink(self, tx: Tx, ino: int) -> None:
        """A regular file lost its last name in this transaction."""


class _NoHooks:
    def content_changed(self, tx: Tx, ino: int) -> None:
        return None

    def last_unlink(self, tx: Tx, ino: int) -> None:
        return None


NO_HOOKS: TxHooks = _NoHooks()


@dataclass
class Tx:
    """One write transaction (`txn`, opened at wall time `now`, ns) and its outcomes.

    The outcome lists are filled inside the transaction and read by the committer only after
    LMDB has committed; an aborted transaction's lists are thrown away with it.
    """

    txn: lmdb.Transaction
    now: int
    hooks: TxHooks = NO_HOOKS
    # Blocks whose last reference went away: their hot files are deleted after the commit
    # (unless a writer still holds the id pending; see fs/engine.py).
    freed_blocks: list[bytes] = field(default_factory=list)
    # Inodes that lost their last name; freed once no handle holds them (fs/files.py).
    orphaned: list[int] = field(default_factory=list)
    # Linked regular files whose content or size changed (the DICOM indexer parses them when
    # their last handle closes).
    changed: list[int] = field(default_factory=list)
    # Change of the sealed bytes held in the hot store (blocks pending or archived) and of
    # those held only by the archive (evicted); the tiering accounts add them after the
    # commit (vnafs/tier/).
    resident_delta: int = 0
    evicted_delta: int = 0
