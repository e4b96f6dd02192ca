"""The DICOM index in LMDB: instances by inode, studies, series, lookups, conflicts, problems.

Why this exists: a PACS writes files in its own layout; administrators, VNA servers and the later
tiering and prefetch features think in patients, studies and series. This module keeps a second,
study-shaped description of the same files, exact under every namespace change, inside the same
LMDB environment (so one transaction changes a file and its index entries together).

Everything here runs inside a caller's transaction and knows nothing of FUSE or trio: `apply`
and `last_unlink` run on the engine's writer thread, the queries on any thread. The record
layouts are in docs/format.md section 5.5; the design in docs/architecture.md section 8.

The records are typed (`InstanceRecord`, `StudyRecord`, `SeriesRecord`, the lookups,
`ProblemRecord`): each has `to_json`/`from_json` giving and taking exactly the JSON field names
of format.md 5.5, so what an older vnafs wrote still reads, and what this one writes reads in
an older one (readers ignore fields they do not know; new optional fields are left out while
they are empty, which keeps records without them byte-identical to before).

Keys are HMACs (`h`), never values: LMDB holds no UID, name or ID in plaintext. View names of
free-text values come from `names.value_name` under the name key, and the lookup keys are built
from those names, so a view lookup and a `vnafs find` for the same value meet at one key.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import lmdb
import zstandard

from vnafs.dicom.header import MAX_HEADER, Instance, Parsed, Status, viewable
from vnafs.dicom.names import value_name
from vnafs.meta.db import MetaDB, read_u64, u64
from vnafs.meta.namespace import Namespace
from vnafs.meta.records import FLAG_DICOM_ACCESSION, FLAG_DICOM_VIEWS, Inode
from vnafs.meta.tx import Tx

T = TypeVar("T")
_U32 = struct.Struct(">I")
# Not thread-safe: only `FileEntry.pack` uses it, and that runs on the writer thread alone.
_ZSTD = zstandard.ZstdCompressor(level=3)
KEY_LEN = 16
SCHEMA = 1

# Problem kinds (`ProblemRecord.kind`); the first two are also instance statuses.
INCOMPLETE = Status.INCOMPLETE.value
INVALID = Status.INVALID.value
SOP_CONFLICT = "sop_conflict"
_CONFLICT = "another file has the same SOP Instance UID and a different data set"
_CONFLICT_UNCOMPARED = ("another file has the same SOP Instance UID and a different data set "
                        "(its elements could not be compared)")
_CONFLICT_PENDING = ("another file has the same SOP Instance UID; the data sets are being "
                     "compared")


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def _load(body: bytes) -> dict[str, Any]:
    value = json.loads(body)
    assert isinstance(value, dict)
    return value


# -- records (docs/format.md section 5.5) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """The `dicom_files` record of one indexed file. Every field from `sop` to `charset` is a
    DICOM value (PHI): never log one."""

    status: Status  # OK, INCOMPLETE or INVALID (NOT_DICOM files get no record)
    problem: str  # "" for OK; a reason that contains no DICOM value
    sop: str
    sop_class: str
    study: str
    series: str
    transfer_syntax: str
    modality: str
    date: str
    time: str
    accession: str
    accession_issuer: str
    patient_id: str
    issuer: str
    series_number: int | None
    instance_number: int | None
    charset: str
    size: int
    # Hex SHA-256 over the file's block ids and valid lengths: equal content, equal digest.
    digest: str
    # Whether the file has view names: a viewable instance that is not a duplicate of another
    # copy (see `DicomIndex._settle`).
    in_views: bool
    gen: int  # the index generation it was made in
    # Set only once another file with the same SOP Instance UID appeared: an HMAC of the data
    # set bytes (`header.dataset_digest`), equal for copies whose data sets are equal.
    ds_digest: str = ""
    # For a copy in a SOP conflict: the elements its data set differs in from each other
    # version, by that version's `ds_digest` (an empty tuple: not comparable).
    ds_diff: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def viewable(self) -> bool:
        return viewable(self.status, self.problem, self.sop, self.study, self.series)

    def own_problem(self) -> ProblemRecord | None:
        """The problem its own verdict gives (conflicts with other copies aside)."""
        if self.status is Status.OK:
            return None
        return ProblemRecord(self.status.value, self.problem)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status.value, "problem": self.problem, "sop": self.sop,
            "class": self.sop_class, "study": self.study, "series": self.series,
            "ts": self.transfer_syntax, "modality": self.modality, "date": self.date,
            "time": self.time, "acc": self.accession, "acc_issuer": self.accession_issuer,
            "pid": self.patient_id, "issuer": self.issuer, "series_no": self.series_number,
            "inst_no": self.instance_number, "charset": self.charset, "size": self.size,
            "digest": self.digest, "in_views": self.in_views, "gen": self.gen,
        }
        if self.ds_digest:
            out["ds_digest"] = self.ds_digest
        if self.ds_diff:
            out["ds_diff"] = {k: list(v) for k, v in self.ds_diff.items()}
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> InstanceRecord:
        return cls(
            status=Status(obj["status"]), problem=obj["problem"], sop=obj["sop"],
            sop_class=obj["class"], study=obj["study"], series=obj["series"],
            transfer_syntax=obj["ts"], modality=obj["modality"], date=obj["date"],
            time=obj["time"], accession=obj["acc"], accession_issuer=obj["acc_issuer"],
            patient_id=obj["pid"], issuer=obj["issuer"], series_number=obj["series_no"],
            instance_number=obj["inst_no"], charset=obj["charset"], size=obj["size"],
            digest=obj["digest"], in_views=bool(obj.get("in_views", False)),
            gen=int(obj.get("gen", 0)), ds_digest=obj.get("ds_digest") or "",
            ds_diff={k: tuple(v) for k, v in (obj.get("ds_diff") or {}).items()},
        )


@dataclass(slots=True)
class PatientCount:
    """One patient key of a study and how many of its instances carry it."""

    issuer: str
    patient_id: str
    instances: int

    def to_json(self) -> list[Any]:
        return [self.issuer, self.patient_id, self.instances]

    @classmethod
    def from_json(cls, item: list[Any]) -> PatientCount:
        issuer, pid, instances = item
        return cls(issuer, pid, instances)


@dataclass(slots=True)
class StudyRecord:
    """A `dicom_study` record. Mutable: it is a set of counters, updated in place per instance.
    Identity fields come from the first instance; every value is PHI."""

    uid: str
    date: str
    time: str
    accession: str
    accession_issuer: str
    # More than one entry is a patient conflict.
    patients: list[PatientCount] = field(default_factory=list)
    modalities: dict[str, int] = field(default_factory=dict)  # modality -> instances
    instances: int = 0
    size: int = 0  # bytes of its instances
    series: int = 0
    incomplete: int = 0  # instances shown although flagged incomplete (no pixel data)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "uid": self.uid, "date": self.date, "time": self.time, "acc": self.accession,
            "acc_issuer": self.accession_issuer,
            "patients": [p.to_json() for p in self.patients],
            "modalities": dict(self.modalities), "instances": self.instances,
            "bytes": self.size, "series": self.series,
        }
        if self.incomplete:
            out["incomplete"] = self.incomplete
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StudyRecord:
        return cls(
            uid=obj["uid"], date=obj["date"], time=obj["time"], accession=obj["acc"],
            accession_issuer=obj["acc_issuer"],
            patients=[PatientCount.from_json(p) for p in obj["patients"]],
            modalities=dict(obj["modalities"]), instances=obj["instances"],
            size=obj["bytes"], series=obj.get("series", 0),
            incomplete=obj.get("incomplete", 0),
        )


@dataclass(slots=True)
class SeriesRecord:
    """A `dicom_series` record (mutable: `instances` is a counter)."""

    uid: str
    modality: str
    number: int | None
    instances: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"uid": self.uid, "modality": self.modality, "number": self.number,
                "instances": self.instances}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SeriesRecord:
        return cls(obj["uid"], obj["modality"], obj["number"], obj["instances"])


@dataclass(frozen=True, slots=True)
class PatientLookup:
    """`dicom_lookup` "p": a study of one patient key."""

    issuer: str
    patient_id: str
    study: str

    def to_json(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "pid": self.patient_id, "study": self.study}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PatientLookup:
        return cls(obj["issuer"], obj["pid"], obj["study"])


@dataclass(frozen=True, slots=True)
class AccessionLookup:
    """`dicom_lookup` "a": a study of one (accession issuer, accession number)."""

    issuer: str
    accession: str
    study: str

    def to_json(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "acc": self.accession, "study": self.study}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AccessionLookup:
        return cls(obj["issuer"], obj["acc"], obj["study"])


@dataclass(frozen=True, slots=True)
class DateLookup:
    """`dicom_lookup` "d": a study of one study date."""

    date: str
    study: str

    def to_json(self) -> dict[str, Any]:
        return {"date": self.date, "study": self.study}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DateLookup:
        return cls(obj["date"], obj["study"])


LookupRecord = PatientLookup | AccessionLookup | DateLookup
# The record type behind each lookup kind (the first byte of its key).
_LOOKUPS: dict[bytes, type[PatientLookup] | type[AccessionLookup] | type[DateLookup]] = {
    b"p": PatientLookup, b"a": AccessionLookup, b"d": DateLookup}


@dataclass(frozen=True, slots=True)
class ProblemRecord:
    """`dicom_lookup` "!": why a file is listed by `vnafs find --problems`. Never a DICOM value:
    `problem` is a fixed reason, `tags` name data elements ("(0010,0010)") by tag only."""

    kind: str  # INCOMPLETE, INVALID or SOP_CONFLICT
    problem: str
    tags: tuple[str, ...] = ()

    def text(self) -> str:
        """One line for users (the view entry's `user.vnafs.dicom.problem` attribute)."""
        tags = f" in {', '.join(self.tags)}" if self.tags else ""
        return f"{self.kind}: {self.problem}{tags}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "problem": self.problem}
        if self.tags:
            out["tags"] = list(self.tags)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ProblemRecord:
        return cls(obj["kind"], obj["problem"], tuple(obj.get("tags") or ()))


_NO_IDENTITY = Instance(
    sop_uid="", sop_class="", study_uid="", series_uid="", transfer_syntax="", patient_id="",
    patient_issuer="", modality="", study_date="", study_time="", accession="",
    accession_issuer="", series_number=None, instance_number=None, charset="")


@dataclass(frozen=True, slots=True)
class RemovedInstance:
    """An instance whose view names went away: its record, and "series"/"study" in `gone`
    when those view directories disappeared with it."""

    ino: int
    record: InstanceRecord
    gone: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NewStudy:
    """A study the index had no record of until now, and the patient key of its first
    instance (tiering prefetches that patient's prior studies)."""

    issuer: str
    patient_id: str
    study: str


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One indexed file: its instance record and the header bytes kept for reindexing."""

    ino: int
    record: InstanceRecord
    header: bytes

    def pack(self) -> bytes:
        # Headers are zstd-compressed (about 3x): LMDB moves values over ~2 KiB to overflow
        # pages of their own, which doubled the size of this table.
        header = _ZSTD.compress(self.header) if self.header else b""
        body = _dump({**self.record.to_json(), "hz": bool(header)})
        return _U32.pack(len(body)) + body + header

    @classmethod
    def unpack(cls, ino: int, plain: bytes) -> FileEntry:
        (n,) = _U32.unpack_from(plain)
        obj = _load(plain[4 : 4 + n])
        header = plain[4 + n :]
        if obj.pop("hz", False):
            header = zstandard.ZstdDecompressor().decompress(header, max_output_size=MAX_HEADER)
        return cls(ino, InstanceRecord.from_json(obj), header)


Pair = tuple[str, str]


def pair(a: str, b: str) -> Pair:
    """The key of two data set digests, in either order."""
    return (a, b) if a <= b else (b, a)


@dataclass(frozen=True, slots=True)
class CopyCheck:
    """What the indexer found, off the writer thread, about the copies of one SOP Instance
    UID: the content digest of each copy when it looked (`copies`, so the writer can tell
    whether the group changed since), their data set digests (`ds`: equal for copies whose
    data sets are equal, also when their bytes differ) and, for every two versions, the
    elements they differ in (`diffs`; an empty tuple: not comparable)."""

    copies: dict[int, str]
    ds: dict[int, str] = field(default_factory=dict)
    diffs: dict[Pair, tuple[str, ...]] = field(default_factory=dict)

    def diff_for(self, ds: str) -> dict[str, tuple[str, ...]]:
        """`InstanceRecord.ds_diff` of a copy whose data set digest is `ds`."""
        if not ds:
            return {}
        return {(b if a == ds else a): tags for (a, b), tags in self.diffs.items()
                if ds in (a, b)}


@dataclass(frozen=True, slots=True)
class IndexResult:
    """What `apply` commits for one file: the parse (None: not DICOM, or gone), the change
    mark read before the file was (the mark is cleared only if unchanged), and the copy check."""

    ino: int
    parsed: Parsed | None
    mark: int | None
    copies: CopyCheck | None = None


class DicomIndex:
    """The index tables of one store, and the only code that changes them."""

    def __init__(self, ns: Namespace, *, by_patient: bool = False) -> None:
        self.ns = ns
        self.db: MetaDB = ns.db
        self.by_patient = by_patient
        self.name_key = self.db.sealer.keyring.name_key
        # None: the live index. A copy made by `at(epoch)` reads what a snapshot froze.
        self.read_epoch: int | None = None
        self._batch: dict[tuple[str, bytes], bytes | None] | None = None
        self._batch_txn: lmdb.Transaction | None = None
        with self.db.begin() as txn:
            # Index generation: bumped by `reset`; records of older generations have no
            # derived entries left (see `_remove`).
            self.gen = self.db.counter(txn, "dicom_gen", 0)
        # Appended on the writer thread, taken on the event loop (deques: appends and pops are
        # thread-safe). A transaction that aborts after appending leaves an entry behind,
        # which only costs needless work later.
        # Instances that left the views, oldest first (`take_removed`: the kernel may still
        # cache their view names).
        self._removed: collections.deque[RemovedInstance] = collections.deque()
        # Files whose view names came or went because of another file (a duplicate shown in
        # place of a copy that went away): the kernel caches their link counts.
        self._relinked: collections.deque[int] = collections.deque()
        # Studies that got their first instance (`take_new_studies`); bounded, since nothing
        # takes them on a mount without tiering.
        self._new_studies: collections.deque[NewStudy] = collections.deque(maxlen=10_000)
        # Files whose SOP group needs the indexer to compare data sets (`take_recheck`).
        self._recheck: collections.deque[int] = collections.deque()

    # -- keys and names ---------------------------------------------------------------------------

    def h(self, text: str | bytes) -> bytes:
        raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        return self.db.sealer.name_hmac(b"dicom\0" + raw)[:KEY_LEN]

    def name(self, value: str) -> str:
        """The view name of a free-text value (accession, issuer, PatientID)."""
        return value_name(value, key=self.name_key)

    def study_key(self, uid: str) -> bytes:
        return self.h("study\0" + uid)

    def series_key(self, study_uid: str, series_uid: str) -> bytes:
        return self.study_key(study_uid) + self.h("series\0" + series_uid)

    def _sop_prefix(self, uid: str) -> bytes:
        return self.h("sop\0" + uid)

    def name_prefix(self, kind: bytes, *names: str) -> bytes:
        """A `dicom_lookup` prefix from view names: `kind` (b"p" or b"a"), issuer, value."""
        return kind + b"".join(self.h(n) for n in names)

    def patient_prefix(self, issuer: str, pid: str) -> bytes:
        return self.name_prefix(b"p", self.name(issuer), self.name(pid))

    def accession_prefix(self, issuer: str, acc: str) -> bytes:
        return self.name_prefix(b"a", self.name(issuer), self.name(acc))

    def date_prefix(self, date: str) -> bytes:
        return b"d" + self.h(date)

    # -- small helpers over versioned JSON records ------------------------------------------------

    def _get(self, txn: lmdb.Transaction, table: str, key: bytes) -> dict[str, Any] | None:
        if self._batch is not None and txn is self._batch_txn and (table, key) in self._batch:
            body = self._batch[(table, key)]
        else:
            body = self.db.vget(txn, table, key, self.read_epoch)
        return None if body is None else _load(body)

    def _put(self, tx: Tx, table: str, key: bytes, value: dict[str, Any]) -> None:
        if self._batch is not None:
            self._batch[(table, key)] = _dump(value)
        else:
            self.db.vput(tx.txn, table, key, _dump(value), self.ns.epoch)

    def _del(self, tx: Tx, table: str, key: bytes) -> None:
        if self._batch is not None:
            self._batch[(table, key)] = None
        else:
            self.db.vdelete(tx.txn, table, key, self.ns.epoch)

    def _study_at(self, txn: lmdb.Transaction, skey: bytes) -> StudyRecord | None:
        obj = self._get(txn, "dicom_study", skey)
        return None if obj is None else StudyRecord.from_json(obj)

    def _series_at(self, txn: lmdb.Transaction, sekey: bytes) -> SeriesRecord | None:
        obj = self._get(txn, "dicom_series", sekey)
        return None if obj is None else SeriesRecord.from_json(obj)

    def _facet_add(self, tx: Tx, facet: str, field: str, delta: int) -> None:
        key = b"F" + facet.encode()
        data = self._get(tx.txn, "dicom_lookup", key) or {}
        value = data.get(field, 0) + delta
        if value:
            data[field] = value
        else:
            data.pop(field, None)
        self._put(tx, "dicom_lookup", key, data)

    def facet(self, txn: lmdb.Transaction, facet: str) -> dict[str, int]:
        return self._get(txn, "dicom_lookup", b"F" + facet.encode()) or {}

    # -- change marks (written by namespace hooks in the data commit) -----------------------------

    def content_changed(self, tx: Tx, ino: int) -> None:
        """`TxHooks`: the change mark commits with the data, so a crash before indexing
        loses nothing (marks left over are queued again at mount)."""
        self.db.put(tx.txn, "dicom_todo", u64(ino), u64(tx.now))

    def take_removed(self) -> list[RemovedInstance]:
        """The instances removed from the views since the last call (see `_removed`)."""
        return _drain(self._removed)

    def take_new_studies(self) -> list[NewStudy]:
        """The studies that got their first instance since the last call."""
        return _drain(self._new_studies)

    def take_relinked(self) -> list[int]:
        """Files whose view link count changed since the last call (see `_relinked`)."""
        return _drain(self._relinked)

    def take_recheck(self) -> list[int]:
        """Files to index again so that the indexer compares their copies (see `_settle`)."""
        return _drain(self._recheck)

    def mark(self, txn: lmdb.Transaction, ino: int) -> int | None:
        body = self.db.get(txn, "dicom_todo", u64(ino))
        return None if body is None else read_u64(body)

    def marked(self) -> list[int]:
        with self.db.begin() as txn:
            return [read_u64(k) for k, _ in self.db.scan(txn, "dicom_todo")]

    def schema(self) -> int:
        with self.db.begin() as txn:
            return self.db.counter(txn, "dicom_schema", 0)

    def set_schema(self, tx: Tx) -> None:
        self.db.set_counter(tx.txn, "dicom_schema", SCHEMA)

    # -- reading the instance records -------------------------------------------------------------

    def entry(self, txn: lmdb.Transaction, ino: int) -> FileEntry | None:
        body = self.db.vget(txn, "dicom_files", u64(ino), self.read_epoch)
        return None if body is None else FileEntry.unpack(ino, body)

    def _write_entry(self, tx: Tx, entry: FileEntry) -> None:
        self.db.vput(tx.txn, "dicom_files", u64(entry.ino), entry.pack(), self.ns.epoch)

    def digest(self, txn: lmdb.Transaction, ino: int) -> str:
        """A digest of the file's content: block ids are keyed hashes of the plaintext."""
        h = hashlib.sha256()
        for index, ref in self.ns.block_refs(txn, ino):
            h.update(u64(index) + ref.block_id + _U32.pack(ref.length))
        return h.hexdigest()

    # -- the mutations ----------------------------------------------------------------------------

    def apply_many(self, tx: Tx, results: list[IndexResult]) -> None:
        """`apply` for several files in one transaction.

        Study, series, lookup and facet records touched by several files of the batch (all the
        slices of one series, the counters) are read and sealed once per batch instead of once
        per file: the records live as JSON in `_batch` until the end.
        """
        self._batch, self._batch_txn = {}, tx.txn
        try:
            for r in results:
                self.apply(tx, r.ino, r.parsed, r.mark, r.copies)
            batch = self._batch
        finally:
            self._batch, self._batch_txn = None, None
        for (table, key), body in batch.items():
            if body is None:
                self.db.vdelete(tx.txn, table, key, self.ns.epoch)
            else:
                self.db.vput(tx.txn, table, key, body, self.ns.epoch)

    def apply(self, tx: Tx, ino: int, parsed: Parsed | None, mark: int | None,
              copies: CopyCheck | None = None) -> None:
        """Replace the entries of `ino` by what `parsed` says (None: not DICOM, or gone).

        The change mark is cleared only if it is still `mark`, the one seen before the file was
        read: a write that raced the parse left a newer mark, and the file is indexed again.
        `copies` is the indexer's comparison with the other files of its SOP Instance UID.
        """
        txn = tx.txn
        current = self.mark(txn, ino)
        if current is not None and current == mark:
            self.db.delete(txn, "dicom_todo", u64(ino))
        node = self.ns.inode(txn, ino)
        old = self.entry(txn, ino)
        old_sop = ""
        if old is not None:
            self._remove(tx, old, settle=False)
            if old.record.gen == self.gen:
                old_sop = old.record.sop
        if (node is None or node.nlink == 0 or not stat.S_ISREG(node.mode) or parsed is None
                or parsed.status is Status.NOT_DICOM
                or (parsed.instance is None and parsed.status is Status.OK)):
            if node is not None and node.nlink:
                self._set_flags(tx, node, 0)
            if old_sop:
                self._settle(tx, old_sop, None)
            return
        # A file pydicom cannot parse at all still gets a record, so it is listed as a problem.
        inst = parsed.instance or _NO_IDENTITY
        digest = self.digest(txn, ino)
        ds_digest, ds_diff = "", {}
        if old is not None and old.record.digest == digest:
            # Same content as when it was last indexed (a reindex, a recheck, an identical
            # resend): what was learnt about its data set still holds.
            ds_digest, ds_diff = old.record.ds_digest, dict(old.record.ds_diff)
        if copies is not None and copies.copies.get(ino) == digest and copies.ds.get(ino):
            ds_digest = copies.ds[ino]
            ds_diff.update(copies.diff_for(ds_digest))
        record = InstanceRecord(
            status=parsed.status, problem=parsed.problem, sop=inst.sop_uid,
            sop_class=inst.sop_class, study=inst.study_uid, series=inst.series_uid,
            transfer_syntax=inst.transfer_syntax, modality=inst.modality,
            date=inst.study_date, time=inst.study_time, accession=inst.accession,
            accession_issuer=inst.accession_issuer, patient_id=inst.patient_id,
            issuer=inst.patient_issuer, series_number=inst.series_number,
            instance_number=inst.instance_number, charset=inst.charset, size=node.size,
            digest=digest, in_views=False, gen=self.gen, ds_digest=ds_digest, ds_diff=ds_diff)
        # The common case: the only file of its SOP Instance UID, shown at once.
        alone = record.viewable and all(i == ino for i in self.sop_inos(txn, inst.sop_uid))
        if alone:
            record = dataclasses.replace(record, in_views=True)
        entry = FileEntry(ino, record, parsed.header)
        self._write_entry(tx, entry)
        if inst.sop_uid:
            self.db.vput(txn, "dicom_sop", self._sop_prefix(inst.sop_uid) + u64(ino), b"",
                         self.ns.epoch)
        if copies is not None:
            self._learn(tx, copies, skip=ino)
        problem = record.own_problem()
        if alone:
            self._add_to_views(tx, entry)
            self._set_flags(tx, node, _view_flags(record))
            if problem is not None:
                self._put(tx, "dicom_lookup", b"!" + u64(ino), problem.to_json())
        elif not record.viewable:
            assert problem is not None  # every status but OK is a problem
            self._put(tx, "dicom_lookup", b"!" + u64(ino), problem.to_json())
            self._set_flags(tx, node, 0)
        else:
            # Shown or not, flagged or not: decided together with the other copies.
            self._settle(tx, inst.sop_uid, copies, node)
        if old_sop and old_sop != (inst.sop_uid if record.viewable else ""):
            self._settle(tx, old_sop, None)

    def _learn(self, tx: Tx, check: CopyCheck, skip: int) -> None:
        """Store the data set digests and differences the indexer found in the records of the
        other copies, as long as their content is still what it compared."""
        for ino, digest in check.copies.items():
            if ino == skip:
                continue
            entry = self.entry(tx.txn, ino)
            if entry is None or entry.record.digest != digest or entry.record.gen != self.gen:
                continue
            rec = entry.record
            ds = check.ds.get(ino) or rec.ds_digest
            new = dataclasses.replace(rec, ds_digest=ds,
                                      ds_diff={**rec.ds_diff, **check.diff_for(ds)})
            if new != rec:
                self._write_entry(tx, FileEntry(ino, new, entry.header))

    def _set_flags(self, tx: Tx, node: Inode, flags: int) -> None:
        mask = FLAG_DICOM_VIEWS | FLAG_DICOM_ACCESSION
        if node.flags & mask != flags:
            node.flags = (node.flags & ~mask) | flags
            self.ns.save(tx, node)

    def last_unlink(self, tx: Tx, ino: int) -> None:
        """`TxHooks`: remove `ino` from the index in the commit that took its last name, so
        the views never show a file that has no name."""
        old = self.entry(tx.txn, ino)
        if old is not None:
            self._remove(tx, old)
        self.db.delete(tx.txn, "dicom_todo", u64(ino))

    def reset(self, tx: Tx) -> list[int]:
        """Start a new index generation and mark every regular file (`vnafs reindex`).

        Everything derived is dropped; the instance records stay, tagged with the old
        generation, so the indexer can rebuild a file whose content is unchanged from its
        stored header bytes instead of reading (later: recalling) the file.
        """
        # Record by record, not a table drop: snapshots keep seeing the versions of their
        # time, and every deletion reaches the archive through the replication journal.
        for table in ("dicom_sop", "dicom_study", "dicom_series", "dicom_member",
                      "dicom_lookup"):
            for ident, _ in list(self.db.vscan(tx.txn, table, b"")):
                self.db.vdelete(tx.txn, table, ident, self.ns.epoch)
        for key, _ in list(self.db.scan(tx.txn, "dicom_todo")):
            self.db.delete(tx.txn, "dicom_todo", key)
        inos: set[int] = set()
        for ident, body in self.db.vscan(tx.txn, "inodes", b""):
            node = Inode.unpack(read_u64(ident), body)
            if stat.S_ISREG(node.mode) and node.nlink:
                self.db.put(tx.txn, "dicom_todo", ident, u64(tx.now))
                inos.add(node.ino)
        for ident, _ in list(self.db.vscan(tx.txn, "dicom_files", b"")):
            if read_u64(ident) not in inos:
                self.db.vdelete(tx.txn, "dicom_files", ident, self.ns.epoch)
        self.gen += 1
        self.db.set_counter(tx.txn, "dicom_gen", self.gen)
        self.set_schema(tx)
        return sorted(inos)

    def _remove(self, tx: Tx, old: FileEntry, *, settle: bool = True) -> None:
        rec, ino = old.record, old.ino
        self.db.vdelete(tx.txn, "dicom_files", u64(ino), self.ns.epoch)
        if rec.gen != self.gen:
            return  # made before a reindex, which already dropped everything derived from it
        self._del(tx, "dicom_lookup", b"!" + u64(ino))
        if rec.sop:
            self.db.vdelete(tx.txn, "dicom_sop", self._sop_prefix(rec.sop) + u64(ino),
                            self.ns.epoch)
        if rec.in_views:
            gone = self._remove_from_views(tx, old)
            self._removed.append(RemovedInstance(ino, rec, gone))
        if settle and rec.sop:
            self._settle(tx, rec.sop, None)

    # -- copies of one SOP Instance UID -----------------------------------------------------------

    def sop_inos(self, txn: lmdb.Transaction, uid: str) -> list[int]:
        return [read_u64(ident) for ident, _ in
                self.db.vscan(txn, "dicom_sop", self._sop_prefix(uid),
                              epoch=self.read_epoch)]

    def _settle(self, tx: Tx, uid: str, check: CopyCheck | None,
                node: Inode | None = None) -> None:
        """Decide, for the viewable files of SOP Instance UID `uid`, which are shown and which
        are flagged as conflicting (docs/architecture.md section 8).

        Copies whose data sets are equal are one *version* of the instance; the first-stored
        copy (lowest inode) of each version is shown, later ones are duplicates and have no
        view names. Two or more versions are a conflict: every copy is flagged, with the
        elements the versions differ in. Truncated and invalid copies take no part.
        """
        txn = tx.txn
        copies: dict[int, FileEntry] = {}
        for ino in self.sop_inos(txn, uid):
            entry = self.entry(txn, ino)
            if entry is not None and entry.record.viewable:
                copies[ino] = entry
        if not copies:
            return
        covered = check is not None and check.copies == {
            i: e.record.digest for i, e in copies.items()}
        versions, tags, pending = _versions(copies)
        if pending and not covered:
            self._recheck.append(min(copies))  # the indexer compares them, then settles again
        conflict: ProblemRecord | None = None
        if len(versions) > 1:
            reason = (_CONFLICT_PENDING if pending and not covered
                      else _CONFLICT if tags else _CONFLICT_UNCOMPARED)
            conflict = ProblemRecord(SOP_CONFLICT, reason, tags)
        shown = {min(v) for v in versions}
        for ino, entry in sorted(copies.items()):
            rec = entry.record
            want = ino in shown
            if want != rec.in_views:
                if want:
                    self._add_to_views(tx, entry)
                else:
                    gone = self._remove_from_views(tx, entry)
                    self._removed.append(RemovedInstance(ino, rec, gone))
                rec = dataclasses.replace(rec, in_views=want)
                self._write_entry(tx, FileEntry(ino, rec, entry.header))
                self._relinked.append(ino)
            inode = node if node is not None and node.ino == ino else self.ns.inode(txn, ino)
            if inode is not None and inode.nlink:
                self._set_flags(tx, inode, _view_flags(rec) if want else 0)
            self._set_problem(tx, ino, conflict or rec.own_problem())

    def _set_problem(self, tx: Tx, ino: int, problem: ProblemRecord | None) -> None:
        key = b"!" + u64(ino)
        have = self._get(tx.txn, "dicom_lookup", key)
        if problem is None:
            if have is not None:
                self._del(tx, "dicom_lookup", key)
        elif have is None or ProblemRecord.from_json(have) != problem:
            self._put(tx, "dicom_lookup", key, problem.to_json())

    # -- studies, series and lookups --------------------------------------------------------------

    def _add_to_views(self, tx: Tx, entry: FileEntry) -> None:
        rec, txn = entry.record, tx.txn
        skey = self.study_key(rec.study)
        sekey = self.series_key(rec.study, rec.series)
        self.db.vput(txn, "dicom_member", sekey + u64(entry.ino), rec.sop.encode(),
                     self.ns.epoch)
        series = self._series_at(txn, sekey)
        study = self._study_at(txn, skey)
        if study is None:
            study = StudyRecord(rec.study, rec.date, rec.time, rec.accession,
                                rec.accession_issuer)
            self._new_studies.append(NewStudy(rec.issuer, rec.patient_id, rec.study))
            self._facet_add(tx, "counts", "studies", 1)
            if rec.date:
                self._put(tx, "dicom_lookup", self.date_prefix(rec.date) + skey,
                          DateLookup(rec.date, rec.study).to_json())
                self._facet_add(tx, "dates", rec.date, 1)
            if rec.accession:
                self._put(tx, "dicom_lookup",
                          self.accession_prefix(rec.accession_issuer, rec.accession) + skey,
                          AccessionLookup(rec.accession_issuer, rec.accession,
                                          rec.study).to_json())
                self._facet_add(tx, "aissuers", rec.accession_issuer, 1)
        if series is None:
            series = SeriesRecord(rec.series, rec.modality, rec.series_number)
            study.series += 1
            self._facet_add(tx, "counts", "series", 1)
        series.instances += 1
        self._put(tx, "dicom_series", sekey, series.to_json())
        study.instances += 1
        study.size += rec.size
        if rec.status is Status.INCOMPLETE:
            study.incomplete += 1
        study.modalities[rec.modality] = study.modalities.get(rec.modality, 0) + 1
        for p in study.patients:
            if p.issuer == rec.issuer and p.patient_id == rec.patient_id:
                p.instances += 1
                break
        else:
            study.patients.append(PatientCount(rec.issuer, rec.patient_id, 1))
            self._put(tx, "dicom_lookup",
                      self.patient_prefix(rec.issuer, rec.patient_id) + skey,
                      PatientLookup(rec.issuer, rec.patient_id, rec.study).to_json())
            self._facet_add(tx, "pissuers", rec.issuer, 1)
            if len(study.patients) == 2:
                self._facet_add(tx, "counts", "patient_conflicts", 1)
        self._put(tx, "dicom_study", skey, study.to_json())
        self._facet_add(tx, "counts", "instances", 1)
        self._facet_add(tx, "counts", "bytes", rec.size)

    def _remove_from_views(self, tx: Tx, entry: FileEntry) -> tuple[str, ...]:
        rec, txn = entry.record, tx.txn
        skey = self.study_key(rec.study)
        sekey = self.series_key(rec.study, rec.series)
        self.db.vdelete(txn, "dicom_member", sekey + u64(entry.ino), self.ns.epoch)
        self._facet_add(tx, "counts", "instances", -1)
        self._facet_add(tx, "counts", "bytes", -rec.size)
        series = self._series_at(txn, sekey)
        study = self._study_at(txn, skey)
        if series is None or study is None:
            return ()  # already inconsistent; a reindex rebuilds it
        gone: tuple[str, ...] = ()
        series.instances -= 1
        if series.instances <= 0:
            gone = ("series",)
            self._del(tx, "dicom_series", sekey)
            study.series -= 1
            self._facet_add(tx, "counts", "series", -1)
        else:
            self._put(tx, "dicom_series", sekey, series.to_json())
        study.instances -= 1
        study.size -= rec.size
        if rec.status is Status.INCOMPLETE:
            study.incomplete = max(0, study.incomplete - 1)
        mods = study.modalities
        mods[rec.modality] = mods.get(rec.modality, 1) - 1
        if mods[rec.modality] <= 0:
            del mods[rec.modality]
        for p in study.patients:
            if p.issuer == rec.issuer and p.patient_id == rec.patient_id:
                p.instances -= 1
                if p.instances <= 0:
                    study.patients.remove(p)
                    self._drop_patient(tx, skey, p.issuer, p.patient_id)
                    if len(study.patients) == 1:
                        self._facet_add(tx, "counts", "patient_conflicts", -1)
                break
        if study.instances > 0:
            self._put(tx, "dicom_study", skey, study.to_json())
            return gone
        for p in study.patients:
            self._drop_patient(tx, skey, p.issuer, p.patient_id)
        self._del(tx, "dicom_study", skey)
        self._facet_add(tx, "counts", "studies", -1)
        if study.date:
            self._del(tx, "dicom_lookup", self.date_prefix(study.date) + skey)
            self._facet_add(tx, "dates", study.date, -1)
        if study.accession:
            self._del(tx, "dicom_lookup",
                      self.accession_prefix(study.accession_issuer, study.accession) + skey)
            self._facet_add(tx, "aissuers", study.accession_issuer, -1)
        return (*gone, "study")

    def _drop_patient(self, tx: Tx, skey: bytes, issuer: str, pid: str) -> None:
        self._del(tx, "dicom_lookup", self.patient_prefix(issuer, pid) + skey)
        self._facet_add(tx, "pissuers", issuer, -1)

    # -- queries (any thread, inside the caller's read transaction) -------------------------------

    def study(self, txn: lmdb.Transaction, uid: str) -> StudyRecord | None:
        return self._study_at(txn, self.study_key(uid))

    def studies(self, txn: lmdb.Transaction) -> Iterator[StudyRecord]:
        for _, body in self.db.vscan(txn, "dicom_study", b"", epoch=self.read_epoch):
            yield StudyRecord.from_json(_load(body))

    def series_of(self, txn: lmdb.Transaction, study_uid: str) -> Iterator[SeriesRecord]:
        for _, body in self.db.vscan(txn, "dicom_series", self.study_key(study_uid),
                                     epoch=self.read_epoch):
            yield SeriesRecord.from_json(_load(body))

    def series(self, txn: lmdb.Transaction, study_uid: str, series_uid: str
               ) -> SeriesRecord | None:
        return self._series_at(txn, self.series_key(study_uid, series_uid))

    def members(self, txn: lmdb.Transaction, study_uid: str, series_uid: str
                ) -> Iterator[tuple[int, str]]:
        """(ino, SOP Instance UID) of the instances in a series, in inode order."""
        for ident, body in self.db.vscan(txn, "dicom_member",
                                         self.series_key(study_uid, series_uid),
                                         epoch=self.read_epoch):
            yield read_u64(ident), body.decode()

    def lookup(self, txn: lmdb.Transaction, prefix: bytes) -> Iterator[LookupRecord]:
        """The study lookups under `prefix`, which starts with their kind (b"p", b"a", b"d")."""
        kind = _LOOKUPS[prefix[:1]]
        for _, body in self.db.vscan(txn, "dicom_lookup", prefix, epoch=self.read_epoch):
            yield kind.from_json(_load(body))

    def problems(self, txn: lmdb.Transaction) -> Iterator[tuple[int, ProblemRecord]]:
        for ident, body in self.db.vscan(txn, "dicom_lookup", b"!", epoch=self.read_epoch):
            yield read_u64(ident), ProblemRecord.from_json(_load(body))

    def problem(self, txn: lmdb.Transaction, ino: int) -> ProblemRecord | None:
        obj = self._get(txn, "dicom_lookup", b"!" + u64(ino))
        return None if obj is None else ProblemRecord.from_json(obj)

    def counts(self, txn: lmdb.Transaction) -> dict[str, int]:
        out = {"instances": 0, "studies": 0, "series": 0, "bytes": 0, "patient_conflicts": 0,
               INCOMPLETE: 0, INVALID: 0, SOP_CONFLICT: 0}
        out.update(self.facet(txn, "counts"))
        for _, problem in self.problems(txn):
            out[problem.kind] = out.get(problem.kind, 0) + 1
        return out

    def at(self, epoch: int) -> DicomIndex:
        """A read-only copy of the index as a snapshot at `epoch` sees it."""
        frozen = copy.copy(self)
        frozen.read_epoch = epoch
        return frozen

    def view_links(self, flags: int) -> int:
        """How many view names an indexed file has (added to its st_nlink)."""
        if not flags & FLAG_DICOM_VIEWS:
            return 0
        return 2 + bool(flags & FLAG_DICOM_ACCESSION) + self.by_patient


def _drain(queue: collections.deque[T]) -> list[T]:
    out = []
    with contextlib.suppress(IndexError):
        while True:
            out.append(queue.popleft())
    return out


def _view_flags(rec: InstanceRecord) -> int:
    """The inode flags of a file shown in the views (they give its view names' link count)."""
    return FLAG_DICOM_VIEWS | (FLAG_DICOM_ACCESSION if rec.accession else 0)


def _versions(copies: dict[int, FileEntry]
              ) -> tuple[list[list[int]], tuple[str, ...], bool]:
    """The versions among the viewable copies of one instance (lists of inodes, each in inode
    order), the elements they differ in, and whether that is still to be found out (a copy
    whose data set was never digested, or two versions never compared)."""
    if len(copies) == 1 or len({e.record.digest for e in copies.values()}) == 1:
        return [sorted(copies)], (), False  # one file, or identical files
    by_content = {e.record.digest: e.record.ds_digest for e in copies.values()
                  if e.record.ds_digest}
    groups: dict[str, list[int]] = {}
    pending = False
    for ino, entry in sorted(copies.items()):
        key = entry.record.ds_digest or by_content.get(entry.record.digest, "")
        if not key:
            # Not digested yet: a version of its own until the indexer has compared it.
            key, pending = "content:" + entry.record.digest, True
        groups.setdefault(key, []).append(ino)
    tags: set[str] = set()
    for a, b in itertools.combinations(groups, 2):
        if a.startswith("content:") or b.startswith("content:"):
            continue
        found = _diff_of(copies, groups[a], b)
        if found is None:
            found = _diff_of(copies, groups[b], a)
        if found is None:
            pending = True
        else:
            tags.update(found)
    return list(groups.values()), tuple(sorted(tags)), pending


def _diff_of(copies: dict[int, FileEntry], inos: list[int], other: str
             ) -> tuple[str, ...] | None:
    for ino in inos:
        found = copies[ino].record.ds_diff.get(other)
        if found is not None:
            return found
    return None


__all__ = ["SCHEMA", "AccessionLookup", "CopyCheck", "DateLookup", "DicomIndex", "FileEntry",
           "IndexResult", "InstanceRecord", "LookupRecord", "PatientCount", "PatientLookup",
           "ProblemRecord", "RemovedInstance", "SeriesRecord", "StudyRecord", "pair"]
