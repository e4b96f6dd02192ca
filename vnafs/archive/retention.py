"""Which archive objects must be kept until when, so that the archive itself enforces them.

Snapshot locks and tombstone retention are promises the hot store keeps; anyone holding the
archive's credentials could still delete the objects behind them. With `[archive]
object_lock` the replicator also sets object retention (S3 Object Lock, Azure version-level
immutability; `backend.py` makes the calls) on those objects. This module decides *what*:
from one read transaction it lists, for each object name, the date it must be kept until
(docs/architecture.md section 9, "Retention the archive enforces"):

- every block a locked snapshot sees, until its `lock_until`, for locks not yet applied at
  that date (`RetentionState.snapshots` remembers which were);
- the metadata objects the cycle's HEAD needs to read it back (the caller adds them, with
  `Targets.meta_until`);
- every block tombstoned since the last cycle (all of them once, after the lock is first
  turned on or its mode changes), until its tombstone time plus `retention_days`.

The new tombstones of a cycle are always all in it (their dirty marks go with the cycle). The
rest, the *backlog* (a locked snapshot's blocks, the first sweep of all tombstones), can be
millions of objects at two requests each, so a cycle takes at most `BATCH` of it, in name
order, and the state remembers where it stopped; the pass is recorded as done (and the
metadata retained) by the cycle that takes its last object. Measured with SeaweedFS on this
machine: about 250 objects/s with `uploads = 4`, so one batch adds about 16 s to a cycle.

It also keeps that state (`repl_state["retention"]`, format.md 5.3). Pure functions over LMDB:
no network, no trio; the caller runs them in worker threads.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import lmdb

from vnafs.archive.log import block_name
from vnafs.meta.db import INF, MetaDB, read_u64, records
from vnafs.meta.records import BlockRef
from vnafs.meta.snapshots import Snapshot

STATE_KEY = b"retention"
DAY_NS = 86400 * 10**9
# Backlog objects per cycle (see the module docstring): bounds what one cycle adds to the RPO.
BATCH = 4096


@dataclass
class RetentionState:
    """What this hot store has made the archive keep (table `repl_state`, key `retention`)."""

    mode: str = "off"
    # snapshot id -> the lock_until_ns its blocks and metadata were retained until
    snapshots: dict[int, int] = field(default_factory=dict)
    # Whether every tombstone (not only new ones) got its retention under `mode`.
    swept: bool = False
    # A backlog pass under way: which one (`pass_key`) and the last object name it set.
    pass_key: str = ""
    after: str = ""

    def to_json(self) -> bytes:
        return json.dumps({"mode": self.mode, "swept": self.swept,
                           "snapshots": {str(k): v for k, v in self.snapshots.items()},
                           "pass_key": self.pass_key, "after": self.after}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RetentionState:
        d = json.loads(raw)
        return cls(str(d.get("mode", "off")),
                   {int(k): int(v) for k, v in dict(d.get("snapshots", {})).items()},
                   bool(d.get("swept", False)), str(d.get("pass_key", "")),
                   str(d.get("after", "")))


def load_state(db: MetaDB, txn: lmdb.Transaction | None = None) -> RetentionState:
    if txn is None:
        with db.begin() as t:
            return load_state(db, t)
    raw = db.get(txn, "repl_state", STATE_KEY)
    return RetentionState() if raw is None else RetentionState.from_json(raw)


def save_state(db: MetaDB, txn: lmdb.Transaction, st: RetentionState) -> None:
    db.put(txn, "repl_state", STATE_KEY, st.to_json())


@dataclass
class Targets:
    """One cycle's retention work: object name -> retain-until (ns)."""

    objects: dict[str, int] = field(default_factory=dict)
    # Locks this work completes (id -> lock_until_ns), recorded when the cycle commits.
    snapshots: dict[int, int] = field(default_factory=dict)
    # The metadata HEAD names must be kept this long (0: no snapshot lock in this work).
    meta_until: int = 0
    # This work covers every tombstone, not only the new ones.
    sweep: bool = False
    # Ids of every snapshot at T: state for the others is dropped at commit.
    present: set[int] = field(default_factory=set)
    # The backlog pass: its key, the last name this cycle takes ("" when it completes the
    # pass), and how many objects it leaves for later cycles.
    pass_key: str = ""
    after: str = ""
    backlog_left: int = 0

    def add(self, name: str, until_ns: int) -> None:
        if until_ns > self.objects.get(name, 0):
            self.objects[name] = until_ns


def snapshots_due(snaps: Iterable[Snapshot], done: dict[int, int], now: int) -> dict[int, int]:
    """id -> lock_until of the locked snapshots whose lock the archive does not hold yet
    (never retained, or retained until an earlier date). An expired lock needs nothing."""
    return {s.id: s.lock_until_ns for s in snaps
            if s.lock_until_ns > now and done.get(s.id, 0) < s.lock_until_ns}


def snapshot_blocks(db: MetaDB, txn: lmdb.Transaction, due: dict[int, int],
                    epochs: dict[int, int]) -> dict[bytes, int]:
    """block id -> the latest lock_until of the due snapshots that see a block map version
    naming it. One pass over every version of `blockmap` (format.md 5.1: the key ends in
    INF - birth, the plaintext starts with death), whatever the number of snapshots."""
    wanted = [(epochs[sid], until) for sid, until in due.items()]
    out: dict[bytes, int] = {}
    if not wanted:
        return out
    newest = max(e for e, _ in wanted)
    for key, value in records(txn.cursor(db=db.dbs["blockmap"])):
        birth = INF - read_u64(key, len(key) - 8)
        if birth > newest:
            continue  # born after every due snapshot: no record opened
        plain = db.open_record("blockmap", key, value)
        death = read_u64(plain)
        until = max((u for e, u in wanted if birth <= e < death), default=0)
        if until:
            block_id = BlockRef.unpack(plain[8:]).block_id
            if until > out.get(block_id, 0):
                out[block_id] = until
    return out


def plan(db: MetaDB, txn: lmdb.Transaction, st: RetentionState, mode: str,
         retention_days: int, now: int, new_tombstones: Iterable[bytes], *,
         batch: int = BATCH) -> Targets:
    """What must be retained as of read transaction `txn`, given what `st` says is done.
    `new_tombstones`: the tombstone keys dirty in this cycle, all of which are in the result;
    of the backlog (locked snapshots' blocks, the first sweep of all tombstones) at most
    `batch` objects are, continuing where the pass in `st` stopped."""
    fresh = st.mode != mode  # another mode: everything again
    done = {} if fresh else st.snapshots
    snaps = [Snapshot.unpack(read_u64(k), body) for k, body in db.scan(txn, "snapshots")]
    targets = Targets(present={s.id for s in snaps})
    keep_ns = retention_days * DAY_NS

    def tombstone(block_id: bytes, body: bytes, into: dict[str, int]) -> None:
        until = read_u64(body) + keep_ns
        name = block_name(bytes(block_id))
        if until > max(now, into.get(name, 0)):  # a retention already over needs nothing
            into[name] = until

    for block_id in set(new_tombstones):
        if (body := db.get(txn, "tombstones", block_id)) is not None:
            tombstone(block_id, body, targets.objects)

    backlog: dict[str, int] = {}
    due = snapshots_due(snaps, done, now)
    if due:
        epochs = {s.id: s.epoch for s in snaps}
        for block_id, until in snapshot_blocks(db, txn, due, epochs).items():
            backlog[block_name(block_id)] = until
    sweep = fresh or not st.swept
    if sweep:
        for block_id, body in db.scan(txn, "tombstones"):
            tombstone(block_id, body, backlog)
    if not due and not sweep:
        return targets
    # A pass is the same pass while the locks it serves and the sweep are: then it goes on
    # after the last name it set (names are sorted, and what a snapshot sees never changes).
    pass_key = json.dumps({"mode": mode, "due": sorted(due.items()), "sweep": sweep})
    names = sorted(backlog)
    start = 0
    if not fresh and st.pass_key == pass_key and st.after:
        start = bisect.bisect_right(names, st.after)
    chunk = names[start:start + batch]
    for name in chunk:
        targets.add(name, backlog[name])
    targets.pass_key = pass_key
    targets.backlog_left = len(names) - start - len(chunk)
    if targets.backlog_left:
        targets.after = chunk[-1]
    else:  # this cycle completes the pass
        targets.snapshots = due
        targets.meta_until = max(due.values(), default=0)
        targets.sweep = sweep
    return targets


def commit(st: RetentionState, mode: str, targets: Targets) -> RetentionState:
    """The state once `targets` are all set (written by the cycle's commit)."""
    fresh = st.mode != mode
    snapshots = {} if fresh else dict(st.snapshots)
    snapshots.update(targets.snapshots)
    snapshots = {k: v for k, v in snapshots.items() if k in targets.present}
    swept = (st.swept and not fresh) or targets.sweep
    if targets.after:
        return RetentionState(mode, snapshots, swept, targets.pass_key, targets.after)
    return RetentionState(mode, snapshots, swept)
