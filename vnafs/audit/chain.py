"""The access audit's records: their bytes, the chained append, the chain check and queries.

Why a module of its own, below trio: the records are written by the mounted daemon (through
`vnafs/audit/recorder.py`), by `vnafs restore` (its `export` record) and read by the control
handlers and the offline `vnafs audit --key-file`, so the format, the chain and the checks live
in one place that needs nothing but LMDB (docs/format.md 5.6).

Each record is a sealed value of the replicated `audit` table under its sequence number; its
plaintext ends with `HMAC(audit key, previous MAC || seq || fields)`, and `counters/audit_head`
holds the last sequence number and MAC. Removing, editing, reordering or truncating records
therefore breaks either an envelope (the AAD binds a value to its key), the sequence, a MAC or
the head, and `verify` names the first place where it breaks. Nothing in a record is plaintext
PHI: the study is its keyed hash (`dicom/index.py` study key), a non-DICOM file its inode.
"""

from __future__ import annotations

import hmac
import json
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import lmdb

from vnafs.dicom.index import DicomIndex
from vnafs.errors import IntegrityError, VnafsError
from vnafs.meta.db import MetaDB, read_u64, records, u64

# Action codes (u8 in the record) are the position in this tuple plus one.
ACTIONS = ("read", "create", "write", "rename", "delete", "export")
RECORD_VERSION = 1
HEAD_KEY = b"audit_head"
# A read-only archive mount's own chain: its table is not replicated, and a checkpoint applied
# from the archive clears every replicated table (counters too), so its head lives beside it.
LOCAL_TABLE = "audit_local"
LOCAL_HEAD_KEY = b"head"
ZERO_MAC = bytes(32)
STUDY_LEN = 16
MAC_LEN = 32
# version, action, time_ns, uid, gid, pid, ino, flags, study key, process name length.
_FIXED = struct.Struct(">BBQIIIQB16sB")
_FLAG_STUDY = 1
_MAX_PROCESS = 64
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Event:
    """One audited access. `ino` 0: not about one file (a whole-store export); `study`: the
    keyed study hash when the DICOM index knew the file's study, else None."""

    time_ns: int
    uid: int
    gid: int
    pid: int
    process: str
    action: str
    ino: int
    study: bytes | None = None


def encode_fields(e: Event) -> bytes:
    """The record's plaintext without its MAC (docs/format.md 5.6)."""
    name = e.process.encode("utf-8", "replace")[:_MAX_PROCESS]
    study = e.study if e.study is not None else bytes(STUDY_LEN)
    return _FIXED.pack(RECORD_VERSION, ACTIONS.index(e.action) + 1, e.time_ns,
                       e.uid & 0xFFFFFFFF, e.gid & 0xFFFFFFFF, e.pid & 0xFFFFFFFF, e.ino,
                       _FLAG_STUDY if e.study is not None else 0, study, len(name)) + name


def decode(plain: bytes, what: str) -> tuple[Event, bytes, bytes]:
    """(event, MAC, the fields the MAC covers) of a record's plaintext."""
    if len(plain) < _FIXED.size + MAC_LEN:
        raise IntegrityError(f"{what} is too short")
    version, action, t, uid, gid, pid, ino, flags, study, n = _FIXED.unpack_from(plain)
    if version != RECORD_VERSION or not 1 <= action <= len(ACTIONS) \
            or len(plain) != _FIXED.size + n + MAC_LEN:
        raise IntegrityError(f"{what} has an unknown layout")
    end = _FIXED.size + n
    name = plain[_FIXED.size:end].decode("utf-8", "replace")
    event = Event(t, uid, gid, pid, name, ACTIONS[action - 1], ino,
                  study if flags & _FLAG_STUDY else None)
    return event, plain[end:], plain[:end]


def chain_mac(key: bytes, prev: bytes, seq: int, fields: bytes) -> bytes:
    return hmac.digest(key, prev + u64(seq) + fields, "sha256")


@dataclass
class VerifyReport:
    """What `vnafs audit verify` found: the records checked, the head, the first problem."""

    records: int = 0
    head_seq: int = 0
    problem: str | None = None
    bad_seq: int | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "head_seq": self.head_seq,
                "problem": self.problem, "bad_seq": self.bad_seq}


class AuditLog:
    """The `audit` table of one store and its chain head. `append` runs inside a write
    transaction (the daemon's writer thread, or restore); the rest opens read transactions."""

    def __init__(self, db: MetaDB, key: bytes, *, table: str = "audit",
                 head: tuple[str, bytes] = ("counters", HEAD_KEY)) -> None:
        self.db = db
        self.key = key
        self.table = table
        self.head_at = head

    @classmethod
    def local(cls, db: MetaDB, key: bytes) -> AuditLog:
        """The chain of a read-only archive mount's own accesses (docs/format.md 5.6)."""
        return cls(db, key, table=LOCAL_TABLE, head=(LOCAL_TABLE, LOCAL_HEAD_KEY))

    def _entries(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, bytes]]:
        head_table, head_key = self.head_at
        for key, value in records(txn.cursor(db=self.db.dbs[self.table])):
            if not (head_table == self.table and key == head_key):
                yield key, value

    def head(self, txn: lmdb.Transaction) -> tuple[int, bytes]:
        """(last sequence number, its MAC); (0, zeros) before the first record."""
        value = self.db.get(txn, *self.head_at)
        if value is None:
            return 0, ZERO_MAC
        if len(value) != 8 + MAC_LEN:
            raise IntegrityError("the audit chain head has an unknown layout")
        return read_u64(value), value[8:]

    def append(self, txn: lmdb.Transaction, events: Iterable[Event]) -> int:
        """Chain `events` after the head, in order, in `txn`; the new last sequence number.
        The head is read from the transaction, so an aborted transaction leaves no trace."""
        seq, prev = self.head(txn)
        start = seq
        for event in events:
            seq += 1
            fields = encode_fields(event)
            prev = chain_mac(self.key, prev, seq, fields)
            self.db.put(txn, self.table, u64(seq), fields + prev)
        if seq != start:
            self.db.put(txn, *self.head_at, u64(seq) + prev)
        return seq

    def records(self, txn: lmdb.Transaction) -> Iterator[tuple[int, Event]]:
        """(seq, event) in sequence order; every envelope authenticated (not the chain)."""
        for key, value in self._entries(txn):
            plain = self.db.open_record(self.table, key, value)
            yield read_u64(key), decode(plain, f"audit record {read_u64(key)}")[0]

    def verify(self) -> VerifyReport:
        """Walk the chain from record 1: contiguous sequence numbers, every envelope opens,
        every MAC chains, and the last record is the head. Stops at the first problem."""
        rep = VerifyReport()
        with self.db.begin() as txn:
            try:
                rep.head_seq, head_mac = self.head(txn)
            except IntegrityError:
                rep.problem = "the audit chain head fails authentication: it was edited"
                return rep
            expected, prev = 1, ZERO_MAC
            for key, value in self._entries(txn):
                if len(key) != 8:
                    rep.problem = "the audit table holds a record under a malformed key"
                    return rep
                seq = read_u64(key)
                if seq != expected:
                    rep.bad_seq = expected
                    rep.problem = (f"audit record {expected} is missing" if seq == expected + 1
                                   else f"audit records {expected} to {seq - 1} are missing")
                    return rep
                try:
                    plain = self.db.open_record(self.table, key, value)
                    _, mac, fields = decode(plain, f"audit record {seq}")
                except IntegrityError:
                    rep.bad_seq = seq
                    rep.problem = (f"audit record {seq} fails authentication: it was edited "
                                   "or moved from another place")
                    return rep
                if not hmac.compare_digest(chain_mac(self.key, prev, seq, fields), mac):
                    rep.bad_seq = seq
                    rep.problem = (f"audit record {seq} does not chain to record {seq - 1}: "
                                   "a record was replaced, reordered or removed")
                    return rep
                prev, expected = mac, seq + 1
                rep.records += 1
            last = expected - 1
            if last < rep.head_seq:
                rep.bad_seq = last + 1
                rep.problem = (f"audit records {last + 1} to {rep.head_seq} are missing "
                               "(the newest ones)")
            elif last > rep.head_seq:
                rep.bad_seq = rep.head_seq + 1
                rep.problem = (f"audit records {rep.head_seq + 1} to {last} are not covered by "
                               "the chain head")
            elif not hmac.compare_digest(prev, head_mac):
                rep.bad_seq = last
                rep.problem = f"the audit chain head does not match record {last}"
        return rep


# -- resolving studies ----------------------------------------------------------------------------


def study_of(index: DicomIndex, txn: lmdb.Transaction, ino: int) -> bytes | None:
    """The keyed hash of the study the index holds for `ino` now, or None. Reads only the
    instance record's JSON (docs/format.md 5.5), not the header bytes after it."""
    body = index.db.vget(txn, "dicom_files", u64(ino))
    if body is None:
        return None
    (n,) = _U32.unpack_from(body)
    uid = json.loads(body[4:4 + n]).get("study")
    return index.study_key(uid) if isinstance(uid, str) and uid else None


def _study_uid(index: DicomIndex, txn: lmdb.Transaction, key: bytes) -> str | None:
    body = index.db.vget(txn, "dicom_study", key)
    if body is None:
        return None
    uid = json.loads(body).get("uid")
    return uid if isinstance(uid, str) else None


def iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) \
        + f".{ns % 10**9 // 1000:06d}Z"


@dataclass(frozen=True)
class Query:
    """`vnafs audit` criteria; all given ones must hold."""

    study: str | None = None
    patient: str | None = None
    issuer: str | None = None
    uid: int | None = None
    since_ns: int | None = None
    limit: int = 100_000

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> Query:
        uid, since = req.get("uid"), req.get("since_ns")
        q = cls(study=req.get("study"), patient=req.get("patient"), issuer=req.get("issuer"),
                uid=None if uid is None else int(uid),
                since_ns=None if since is None else int(since),
                limit=int(req.get("limit") or 100_000))
        if q.study is not None and q.patient is not None:
            raise VnafsError("give --study or --patient, not both")
        if q.issuer is not None and q.patient is None:
            raise VnafsError("--issuer goes with --patient: give both")
        return q


def select(log: AuditLog, index: DicomIndex | None, q: Query) -> list[dict[str, Any]]:
    """The records matching `q`, oldest first, resolved for an administrator: the study UID
    where the index knows the study. A record without a study (a file created before it was
    indexed) matches a study through another record of the same inode that has one, or
    through the inode's entry in the index now."""
    if (q.study is not None or q.patient is not None) and index is None:
        raise VnafsError("finding audit records by study or patient needs the DICOM index: "
                         "set [dicom] index = true")
    out: list[dict[str, Any]] = []
    with log.db.begin() as txn:
        wanted: set[bytes] | None = None
        if index is not None and q.study is not None:
            wanted = {index.study_key(q.study)}
        elif index is not None and q.patient is not None:
            issuers = [q.issuer] if q.issuer is not None \
                else sorted(index.facet(txn, "pissuers"))
            wanted = {index.study_key(item.study) for issuer in issuers
                      for item in index.lookup(txn, index.patient_prefix(issuer, q.patient))}
        found = list(log.records(txn))
        by_ino: dict[int, bytes] = {}
        for _, e in found:
            if e.study is not None and e.ino:
                by_ino.setdefault(e.ino, e.study)
        now: dict[int, bytes | None] = {}
        uids: dict[bytes, str | None] = {}

        def resolved(e: Event) -> bytes | None:
            if e.study is not None:
                return e.study
            if not e.ino or index is None:
                return None
            if e.ino in by_ino:
                return by_ino[e.ino]
            if e.ino not in now:
                now[e.ino] = study_of(index, txn, e.ino)
            return now[e.ino]

        for seq, e in found:
            if q.uid is not None and e.uid != q.uid:
                continue
            if q.since_ns is not None and e.time_ns < q.since_ns:
                continue
            study = resolved(e)
            if wanted is not None and study not in wanted:
                continue
            uid = None
            if study is not None and index is not None:
                if study not in uids:
                    uids[study] = _study_uid(index, txn, study)
                uid = uids[study]
            out.append({"seq": seq, "time": iso(e.time_ns), "time_ns": e.time_ns,
                        "uid": e.uid, "gid": e.gid, "pid": e.pid, "process": e.process,
                        "action": e.action, "ino": e.ino or None,
                        "study": uid if uid is not None else (q.study if wanted and q.study
                                                              else None),
                        "study_key": study.hex() if study is not None else None})
            if len(out) >= q.limit:
                break
    return out
