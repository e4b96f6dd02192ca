"""Snapshots: records, inode numbers, locks, the tamper-resistant clock, collection and diff.

A snapshot is an epoch number (docs/architecture.md section 10): taking one records the
current epoch and advances it, so the snapshot goes on seeing the record versions that were
live then. Everything else about snapshots that does not involve FUSE lives here: the
`snapshots` table, the `snap_id << 40 | ino` inode numbering, the lock and expiry rules with
a clock that cannot be wound back, the collector that frees versions no snapshot sees once a
snapshot is deleted, the unique-bytes count and `diff`.

Mutating functions take a `Tx` and run inside the engine's writer transaction.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import lmdb

from vnafs.errors import VnafsError
from vnafs.meta.db import INF, read_u64, records, u64
from vnafs.meta.namespace import Namespace
from vnafs.meta.records import ROOT_INO, BlockRef, Inode, RefCount, unpack_dirent
from vnafs.meta.tx import Tx

SNAP_SHIFT = 40
LIVE_LIMIT = 1 << SNAP_SHIFT  # live inode numbers stay below this
SNAPDIR_ID = (1 << 22) - 1
SNAPDIR_INO = SNAPDIR_ID << SNAP_SHIFT  # the /.snapshots directory itself
SNAPDIR_NAME = b".snapshots"
CLOCK_SLACK_NS = 300 * 10**9

# Versioned tables: every one of them is frozen by a snapshot and collected after one goes.
VERSIONED = ("inodes", "dirents", "blockmap", "xattrs", "dicom_files", "dicom_sop",
             "dicom_study", "dicom_series", "dicom_member", "dicom_lookup")


class SnapshotError(VnafsError):
    """A refused snapshot operation; `errno` is what the FUSE path answers."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


@dataclass
class Snapshot:
    id: int
    name: str
    epoch: int
    created_ns: int
    expiry_ns: int = 0
    lock_until_ns: int = 0
    schedule: str = ""

    def pack(self) -> bytes:
        d = asdict(self)
        del d["id"]
        return json.dumps(d).encode()

    @classmethod
    def unpack(cls, snap_id: int, body: bytes) -> Snapshot:
        d = json.loads(body)
        return cls(snap_id, str(d["name"]), int(d["epoch"]), int(d["created_ns"]),
                   int(d.get("expiry_ns", 0)), int(d.get("lock_until_ns", 0)),
                   str(d.get("schedule", "")))

    def locked(self, now: int) -> bool:
        return now < self.lock_until_ns


def encode(snap_id: int, ino: int) -> int:
    return snap_id << SNAP_SHIFT | ino


def decode(ino: int) -> tuple[int, int]:
    """(snapshot id, live inode number) of a snapshot inode; id 0 means a live inode."""
    return ino >> SNAP_SHIFT, ino & (LIVE_LIMIT - 1)


def default_name(now_ns: int) -> str:
    return time.strftime("@GMT-%Y.%m.%d-%H.%M.%S", time.gmtime(now_ns / 1e9))


def check_name(name: str) -> None:
    raw = name.encode("utf-8", "surrogateescape")
    if not raw or len(raw) > 255 or "/" in name or "\0" in name or name in (".", ".."):
        raise SnapshotError(f"{name!r} is not a valid snapshot name: use 1-255 bytes without "
                            "'/' (for example @GMT-2026.11.22-08.00.00)", errno.EINVAL)


class Snapshots:
    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.db = ns.db
        # (trusted time, monotonic time) when this process first asked: while it runs, the
        # trusted time advances no faster than the monotonic clock (plus slack), so setting
        # the system clock forward does not expire locks early.
        self._anchor: tuple[int, int] | None = None

    # -- reading ---------------------------------------------------------------------------------

    def all(self, txn: lmdb.Transaction | None = None) -> list[Snapshot]:
        if txn is None:
            with self.db.begin() as t:
                return self.all(t)
        return sorted((Snapshot.unpack(read_u64(k), body)
                       for k, body in self.db.scan(txn, "snapshots")), key=lambda s: s.epoch)

    def by_id(self, snap_id: int) -> Snapshot | None:
        with self.db.begin() as txn:
            body = self.db.get(txn, "snapshots", u64(snap_id))
        return None if body is None else Snapshot.unpack(snap_id, body)

    def by_name(self, name: str, txn: lmdb.Transaction | None = None) -> Snapshot | None:
        return next((s for s in self.all(txn) if s.name == name), None)

    def need(self, name: str, txn: lmdb.Transaction | None = None) -> Snapshot:
        snap = self.by_name(name, txn)
        if snap is None:
            raise SnapshotError(f"there is no snapshot named {name!r}: vnafs snapshot list "
                                "shows them", errno.ENOENT)
        return snap

    def now(self, txn: lmdb.Transaction) -> int:
        """The time locks and expiry go by: never before the highest time seen (a clock set
        back changes nothing) and, while the daemon runs, never further ahead of it than the
        monotonic clock has advanced (a clock set forward does not expire locks early)."""
        high = self.db.counter(txn, "clock_high")
        system = time.time_ns()
        mono = time.monotonic_ns()
        if self._anchor is None:
            self._anchor = (max(high, system), mono)
        base, since = self._anchor
        return max(high, min(system, base + (mono - since) + CLOCK_SLACK_NS))

    # -- changing --------------------------------------------------------------------------------

    def tick(self, tx: Tx) -> int:
        """Raise the stored highest time to now; returns the trusted now."""
        now = self.now(tx.txn)
        if now > self.db.counter(tx.txn, "clock_high"):
            self.db.set_counter(tx.txn, "clock_high", now)
        return now

    def create(self, tx: Tx, name: str | None = None, *, expiry_ns: int = 0,
               lock_until_ns: int = 0, schedule: str = "") -> Snapshot:
        now = self.tick(tx)
        name = name or default_name(now)
        check_name(name)
        if self.by_name(name, tx.txn) is not None:
            raise SnapshotError(f"a snapshot named {name!r} exists already (default names "
                                "are one per second): give a name or try again",
                                errno.EEXIST)
        snap_id = self.db.counter(tx.txn, "next_snap") + 1
        if snap_id >= SNAPDIR_ID:
            raise SnapshotError("no snapshot ids are left: this file system has had 4 million "
                                "snapshots", errno.ENOSPC)
        epoch = self.ns.epoch
        snap = Snapshot(snap_id, name, epoch, tx.now, expiry_ns,
                        lock_until_ns, schedule)
        if lock_until_ns:
            snap.expiry_ns = max(expiry_ns, lock_until_ns)
        self.db.set_counter(tx.txn, "next_snap", snap_id)
        self.db.put(tx.txn, "snapshots", u64(snap_id), snap.pack())
        self.db.set_counter(tx.txn, "epoch", epoch + 1)
        # Every later write in this process must see the new epoch: set it before the commit
        # (the writer thread runs one transaction at a time); `reload_epoch` undoes it if the
        # commit fails.
        self.ns.epoch = epoch + 1
        return snap

    def reload_epoch(self) -> None:
        with self.db.begin() as txn:
            self.ns.epoch = self.db.counter(txn, "epoch", 1)

    def delete(self, tx: Tx, name: str) -> Snapshot:
        snap = self.need(name, tx.txn)
        now = self.tick(tx)
        if snap.locked(now):
            until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap.lock_until_ns / 1e9))
            raise SnapshotError(f"snapshot {name!r} is locked until {until}: it cannot be "
                                "deleted before then", errno.EPERM)
        self.db.delete(tx.txn, "snapshots", u64(snap.id))
        # The collector has work (also after a crash); a count, so a pass that started before
        # this deletion does not clear it.
        self.db.set_counter(tx.txn, "snap_gc", self.db.counter(tx.txn, "snap_gc") + 1)
        return snap

    def lock(self, tx: Tx, name: str, until_ns: int) -> Snapshot:
        snap = self.need(name, tx.txn)
        now = self.tick(tx)
        if until_ns <= now:
            raise SnapshotError("a lock must end in the future: give a later --until",
                                errno.EINVAL)
        if until_ns < max(snap.lock_until_ns, snap.expiry_ns):
            raise SnapshotError(f"snapshot {name!r} is kept until a later time already; a lock "
                                "or expiry can only move later", errno.EPERM)
        snap.lock_until_ns = until_ns
        snap.expiry_ns = max(snap.expiry_ns, until_ns)
        self.db.put(tx.txn, "snapshots", u64(snap.id), snap.pack())
        return snap

    # -- collecting versions no snapshot sees ----------------------------------------------------

    def gc_pending(self) -> bool:
        with self.db.begin() as txn:
            return bool(self.db.counter(txn, "snap_gc"))

    def gc_batch(self, tx: Tx, table: str, start: bytes, limit: int = 2000
                 ) -> tuple[bytes | None, int]:
        """Delete, from `start` on, up to `limit` visited versions of `table` that neither the
        live tree nor any snapshot sees. Returns (key to continue from or None, deleted)."""
        epochs = sorted(s.epoch for s in self.all(tx.txn))
        cur = tx.txn.cursor(db=self.db.dbs[table])
        if not cur.set_range(start):
            return None, 0
        doomed: list[tuple[bytes, bytes]] = []
        visited = 0
        next_key: bytes | None = None
        for key, value in records(cur):
            if visited >= limit:
                next_key = key
                break
            visited += 1
            plain = self.db.open_record(table, key, value)
            death = read_u64(plain)
            if death == INF:
                continue
            birth = INF - read_u64(key, len(key) - 8)
            if not any(birth <= s < death for s in epochs):
                doomed.append((key, plain[8:]))
        for key, body in doomed:
            self.db.delete(tx.txn, table, key)
            if table == "blockmap":
                self.ns.blocks.drop_ref(tx, BlockRef.unpack(body).block_id)
        return next_key, len(doomed)

    def gc_done(self, tx: Tx) -> None:
        self.db.set_counter(tx.txn, "snap_gc", 0)

    # -- accounting ------------------------------------------------------------------------------

    def unique_bytes(self) -> dict[int, int]:
        """Per snapshot id: stored bytes of the blocks only that snapshot sees."""
        snaps = self.all()
        seen: dict[bytes, set[int]] = {}
        with self.db.begin() as txn:
            for key, value in records(txn.cursor(db=self.db.dbs["blockmap"])):
                plain = self.db.open_record("blockmap", key, value)
                death = read_u64(plain)
                block_id = BlockRef.unpack(plain[8:]).block_id
                who = seen.setdefault(block_id, set())
                if death == INF:
                    who.add(0)
                    continue
                birth = INF - read_u64(key, len(key) - 8)
                who.update(s.id for s in snaps if birth <= s.epoch < death)
            out = {s.id: 0 for s in snaps}
            for block_id, who in seen.items():
                if len(who) == 1 and 0 not in who:
                    body = self.db.get(txn, "refs", block_id)
                    if body is not None:
                        out[next(iter(who))] += RefCount.unpack(body).stored
        return out


# -- diff -----------------------------------------------------------------------------------------


def _tree(ns: Namespace, txn: lmdb.Transaction, epoch: int | None
          ) -> tuple[dict[int, tuple[int, bytes]], dict[tuple[int, bytes], int]]:
    """(inode -> (parent, name) of one of its names, (parent, name) -> inode) at `epoch`."""
    names: dict[int, tuple[int, bytes]] = {}
    entries: dict[tuple[int, bytes], int] = {}
    last = None
    cur = txn.cursor(db=ns.db.dbs["dirents"])
    for key, value in records(cur):
        ident = key[:-8]
        if ident == last:
            continue
        birth = INF - read_u64(key, len(key) - 8)
        if epoch is not None and birth > epoch:
            continue
        last = ident
        plain = ns.db.open_record("dirents", key, value)
        death = read_u64(plain)
        if (death != INF) if epoch is None else (death <= epoch):
            continue
        child, name = unpack_dirent(plain[8:])
        parent = read_u64(key)
        entries[(parent, name)] = child
        names.setdefault(child, (parent, name))
    return names, entries


def _path(names: dict[int, tuple[int, bytes]], parent: int, name: bytes) -> str:
    parts = [name]
    seen = 0
    while parent != ROOT_INO and parent in names and seen < 4096:
        parent, up = names[parent]
        parts.append(up)
        seen += 1
    return "/" + "/".join(os.fsdecode(p) for p in reversed(parts))


def _same(a: Inode, b: Inode) -> bool:
    # atime alone is not a change worth reporting (reads would make every file "M").
    return (a.mode, a.uid, a.gid, a.nlink, a.size, a.mtime_ns, a.ctime_ns, a.target) == (
        b.mode, b.uid, b.gid, b.nlink, b.size, b.mtime_ns, b.ctime_ns, b.target)


def diff(ns: Namespace, old: int, new: int | None) -> Iterator[tuple[str, str, str]]:
    """(kind, path, new path or "") for every difference between epochs `old` and `new`
    (None = live), like `zfs diff`: + created, - removed, R renamed, M modified."""
    with ns.db.begin() as txn:
        names_a, entries_a = _tree(ns, txn, old)
        names_b, entries_b = _tree(ns, txn, new)
        gone = {k: v for k, v in entries_a.items() if entries_b.get(k) != v}
        came = {k: v for k, v in entries_b.items() if entries_a.get(k) != v}
        moved_from = {v: k for k, v in gone.items()}
        for (parent, name), ino in sorted(came.items(), key=lambda kv: kv[0][1]):
            if ino in moved_from:
                op, on = moved_from.pop(ino)
                yield "R", _path(names_a, op, on), _path(names_b, parent, name)
            else:
                yield "+", _path(names_b, parent, name), ""
        for parent, name in moved_from.values():
            yield "-", _path(names_a, parent, name), ""
        for ino in sorted(set(names_a) & set(names_b)):
            a, b = ns.inode(txn, ino, old), ns.inode(txn, ino, new)
            if a is not None and b is not None and not _same(a, b):
                parent, name = names_b[ino]
                yield "M", _path(names_b, parent, name), ""
