"""The DICOM index in LMDB: instances by inode, studies, series, lookups, conflicts, problems.

Why this exists: a PACS writes files in its own layout; administrators, VNA servers and the later
tiering and prefetch features think in patients, studies and series. This module keeps a second,
study-shaped description of the same files, exact under every namespace change, inside the same
LMDB environment (so one transaction changes a file and its index entries together).

Everything here runs inside a caller's transaction and knows nothing of FUSE or trio: `apply`
and `forget` run on the engine's writer thread, the queries on any thread. The record layouts
are in docs/format.md section 5.5; the design in docs/architecture.md section 8.

Keys are HMACs (`_h`), never values: LMDB holds no UID, name or ID in plaintext. View names of
free-text values come from `names.value_name` under the name key, and the lookup keys are built
from those names, so a view lookup and a `vnafs find` for the same value meet at one key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lmdb
import zstandard

from vnafs.dicom.header import MAX_HEADER, Instance, Parsed, Status
from vnafs.dicom.names import value_name
from vnafs.meta.db import MetaDB, read_u64, u64
from vnafs.meta.namespace import Namespace
from vnafs.meta.records import FLAG_DICOM_ACCESSION, FLAG_DICOM_VIEWS, Inode
from vnafs.meta.tx import Tx

_U32 = struct.Struct(">I")
# Not thread-safe: only `FileEntry.pack` uses it, and that runs on the writer thread alone.
_ZSTD = zstandard.ZstdCompressor(level=3)
KEY_LEN = 16
SCHEMA = 1


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def _load(body: bytes) -> dict[str, Any]:
    value = json.loads(body)
    assert isinstance(value, dict)
    return value


_NO_IDENTITY = Instance(
    sop_uid="", sop_class="", study_uid="", series_uid="", transfer_syntax="", patient_id="",
    patient_issuer="", modality="", study_date="", study_time="", accession="",
    accession_issuer="", series_number=None, instance_number=None, charset="")


@dataclass(frozen=True, slots=True)
class RemovedInstance:
    """An instance whose view names went away: its record, and "series"/"study" in `gone`
    when those view directories disappeared with it."""

    ino: int
    record: dict[str, Any]
    gone: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One indexed file: its instance record and the header bytes kept for reindexing."""

    ino: int
    record: dict[str, Any]
    header: bytes

    def pack(self) -> bytes:
        # Headers are zstd-compressed (about 3x): LMDB moves values over ~2 KiB to overflow
        # pages of their own, which doubled the size of this table.
        header = _ZSTD.compress(self.header) if self.header else b""
        body = _dump({**self.record, "hz": bool(header)})
        return _U32.pack(len(body)) + body + header

    @classmethod
    def unpack(cls, ino: int, plain: bytes) -> FileEntry:
        (n,) = _U32.unpack_from(plain)
        record = _load(plain[4 : 4 + n])
        header = plain[4 + n :]
        if record.pop("hz", False):
            header = zstandard.ZstdDecompressor().decompress(header, max_output_size=MAX_HEADER)
        return cls(ino, record, header)


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
        # Instances that left the views in a write transaction, oldest first; appended on the
        # writer thread, taken on the event loop by `take_removed` (the kernel may still cache
        # their view names). A transaction that aborts after appending leaves an entry behind,
        # which only costs the kernel one needless cache drop.
        self._removed: list[RemovedInstance] = []

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
        out, self._removed = self._removed, []
        return out

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

    def digest(self, txn: lmdb.Transaction, ino: int) -> str:
        """A digest of the file's content: block ids are keyed hashes of the plaintext."""
        h = hashlib.sha256()
        for index, ref in self.ns.block_refs(txn, ino):
            h.update(u64(index) + ref.block_id + _U32.pack(ref.length))
        return h.hexdigest()

    # -- the two mutations ------------------------------------------------------------------------

    def apply_many(self, tx: Tx, results: list[tuple[int, Parsed | None, int | None]]) -> None:
        """`apply` for several files in one transaction.

        Study, series, lookup and facet records touched by several files of the batch (all the
        slices of one series, the counters) are read and sealed once per batch instead of once
        per file: the records live as JSON in `_batch` until the end.
        """
        self._batch, self._batch_txn = {}, tx.txn
        try:
            for ino, parsed, mark in results:
                self.apply(tx, ino, parsed, mark)
            batch = self._batch
        finally:
            self._batch, self._batch_txn = None, None
        for (table, key), body in batch.items():
            if body is None:
                self.db.vdelete(tx.txn, table, key, self.ns.epoch)
            else:
                self.db.vput(tx.txn, table, key, body, self.ns.epoch)

    def apply(self, tx: Tx, ino: int, parsed: Parsed | None, mark: int | None) -> None:
        """Replace the entries of `ino` by what `parsed` says (None: not DICOM, or gone).

        The change mark is cleared only if it is still `mark`, the one seen before the file was
        read: a write that raced the parse left a newer mark, and the file is indexed again.
        """
        txn = tx.txn
        current = self.mark(txn, ino)
        if current is not None and current == mark:
            self.db.delete(txn, "dicom_todo", u64(ino))
        node = self.ns.inode(txn, ino)
        old = self.entry(txn, ino)
        if old is not None:
            self._remove(tx, old)
        if (node is None or node.nlink == 0 or not stat.S_ISREG(node.mode) or parsed is None
                or parsed.status is Status.NOT_DICOM
                or (parsed.instance is None and parsed.status is Status.OK)):
            if node is not None and node.nlink:
                self._set_flags(tx, node, 0)
            return
        # A file pydicom cannot parse at all still gets a record, so it is listed as a problem.
        inst = parsed.instance or _NO_IDENTITY
        record: dict[str, Any] = {
            "status": parsed.status.value, "problem": parsed.problem,
            "sop": inst.sop_uid, "class": inst.sop_class, "study": inst.study_uid,
            "series": inst.series_uid, "ts": inst.transfer_syntax, "modality": inst.modality,
            "date": inst.study_date, "time": inst.study_time, "acc": inst.accession,
            "acc_issuer": inst.accession_issuer, "pid": inst.patient_id,
            "issuer": inst.patient_issuer, "series_no": inst.series_number,
            "inst_no": inst.instance_number, "charset": inst.charset, "size": node.size,
            "digest": self.digest(txn, ino), "in_views": parsed.status is Status.OK,
            "gen": self.gen,
        }
        entry = FileEntry(ino, record, parsed.header)
        self.db.vput(txn, "dicom_files", u64(ino), entry.pack(), self.ns.epoch)
        if inst.sop_uid:
            self.db.vput(txn, "dicom_sop", self._sop_prefix(inst.sop_uid) + u64(ino), b"",
                         self.ns.epoch)
            self._check_sop_conflicts(tx, inst.sop_uid)
        if parsed.status is not Status.OK:
            self._put(tx, "dicom_lookup", b"!" + u64(ino),
                      {"kind": parsed.status.value, "problem": parsed.problem})
            self._set_flags(tx, node, 0)
            return
        self._add_to_views(tx, entry)
        self._set_flags(tx, node, FLAG_DICOM_VIEWS | (FLAG_DICOM_ACCESSION if inst.accession
                                                      else 0))

    def _set_flags(self, tx: Tx, node: Inode, flags: int) -> None:
        # `node` is the record `apply` read: nothing in between writes the inode.
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

    def _remove(self, tx: Tx, old: FileEntry) -> None:
        rec, ino = old.record, old.ino
        self.db.vdelete(tx.txn, "dicom_files", u64(ino), self.ns.epoch)
        if rec.get("gen", 0) != self.gen:
            return  # made before a reindex, which already dropped everything derived from it
        self._del(tx, "dicom_lookup", b"!" + u64(ino))
        if rec.get("sop"):
            self.db.vdelete(tx.txn, "dicom_sop", self._sop_prefix(rec["sop"]) + u64(ino),
                            self.ns.epoch)
            self._check_sop_conflicts(tx, rec["sop"])
        if rec.get("in_views"):
            gone = self._remove_from_views(tx, old)
            self._removed.append(RemovedInstance(ino, rec, gone))

    # -- SOP Instance UID conflicts ---------------------------------------------------------------

    def sop_inos(self, txn: lmdb.Transaction, uid: str) -> list[int]:
        return [read_u64(ident) for ident, _ in
                self.db.vscan(txn, "dicom_sop", self._sop_prefix(uid),
                              epoch=self.read_epoch)]

    def _check_sop_conflicts(self, tx: Tx, uid: str) -> None:
        """Flag every copy of `uid` when the copies differ; unflag them when they agree again."""
        # Only complete copies count: a truncated copy is already reported as incomplete, and
        # must not cast doubt on the good one.
        entries = [e for e in (self.entry(tx.txn, i) for i in self.sop_inos(tx.txn, uid))
                   if e is not None and e.record["status"] == "ok"]
        conflict = len({e.record["digest"] for e in entries}) > 1
        for e in entries:
            key = b"!" + u64(e.ino)
            problem = self._get(tx.txn, "dicom_lookup", key)
            if conflict and problem is None:
                self._put(tx, "dicom_lookup", key, {
                    "kind": "sop_conflict",
                    "problem": "another file has the same SOP Instance UID and other content"})
            elif not conflict and problem is not None and problem["kind"] == "sop_conflict":
                self._del(tx, "dicom_lookup", key)

    # -- studies, series and lookups --------------------------------------------------------------

    def _add_to_views(self, tx: Tx, entry: FileEntry) -> None:
        rec, txn = entry.record, tx.txn
        skey = self.study_key(rec["study"])
        sekey = self.series_key(rec["study"], rec["series"])
        self.db.vput(txn, "dicom_member", sekey + u64(entry.ino), rec["sop"].encode(),
                     self.ns.epoch)
        series = self._get(txn, "dicom_series", sekey)
        study = self._get(txn, "dicom_study", skey)
        if study is None:
            study = {"uid": rec["study"], "date": rec["date"], "time": rec["time"],
                     "acc": rec["acc"], "acc_issuer": rec["acc_issuer"], "patients": [],
                     "modalities": {}, "instances": 0, "bytes": 0, "series": 0}
            self._facet_add(tx, "counts", "studies", 1)
            if rec["date"]:
                self._put(tx, "dicom_lookup", self.date_prefix(rec["date"]) + skey,
                          {"date": rec["date"], "study": rec["study"]})
                self._facet_add(tx, "dates", rec["date"], 1)
            if rec["acc"]:
                self._put(tx, "dicom_lookup",
                          self.accession_prefix(rec["acc_issuer"], rec["acc"]) + skey,
                          {"issuer": rec["acc_issuer"], "acc": rec["acc"], "study": rec["study"]})
                self._facet_add(tx, "aissuers", rec["acc_issuer"], 1)
        if series is None:
            series = {"uid": rec["series"], "modality": rec["modality"],
                      "number": rec["series_no"], "instances": 0}
            study["series"] += 1
            self._facet_add(tx, "counts", "series", 1)
        series["instances"] += 1
        self._put(tx, "dicom_series", sekey, series)
        study["instances"] += 1
        study["bytes"] += rec["size"]
        mods = study["modalities"]
        mods[rec["modality"]] = mods.get(rec["modality"], 0) + 1
        patients: list[list[Any]] = study["patients"]
        for p in patients:
            if p[0] == rec["issuer"] and p[1] == rec["pid"]:
                p[2] += 1
                break
        else:
            patients.append([rec["issuer"], rec["pid"], 1])
            self._put(tx, "dicom_lookup",
                      self.patient_prefix(rec["issuer"], rec["pid"]) + skey,
                      {"issuer": rec["issuer"], "pid": rec["pid"], "study": rec["study"]})
            self._facet_add(tx, "pissuers", rec["issuer"], 1)
            if len(patients) == 2:
                self._facet_add(tx, "counts", "patient_conflicts", 1)
        self._put(tx, "dicom_study", skey, study)
        self._facet_add(tx, "counts", "instances", 1)
        self._facet_add(tx, "counts", "bytes", rec["size"])

    def _remove_from_views(self, tx: Tx, entry: FileEntry) -> tuple[str, ...]:
        rec, txn = entry.record, tx.txn
        skey = self.study_key(rec["study"])
        sekey = self.series_key(rec["study"], rec["series"])
        self.db.vdelete(txn, "dicom_member", sekey + u64(entry.ino), self.ns.epoch)
        self._facet_add(tx, "counts", "instances", -1)
        self._facet_add(tx, "counts", "bytes", -rec["size"])
        series = self._get(txn, "dicom_series", sekey)
        study = self._get(txn, "dicom_study", skey)
        if series is None or study is None:
            return ()  # already inconsistent; a reindex rebuilds it
        gone: tuple[str, ...] = ()
        series["instances"] -= 1
        if series["instances"] <= 0:
            gone = ("series",)
            self._del(tx, "dicom_series", sekey)
            study["series"] -= 1
            self._facet_add(tx, "counts", "series", -1)
        else:
            self._put(tx, "dicom_series", sekey, series)
        study["instances"] -= 1
        study["bytes"] -= rec["size"]
        mods = study["modalities"]
        mods[rec["modality"]] = mods.get(rec["modality"], 1) - 1
        if mods[rec["modality"]] <= 0:
            del mods[rec["modality"]]
        patients: list[list[Any]] = study["patients"]
        for p in patients:
            if p[0] == rec["issuer"] and p[1] == rec["pid"]:
                p[2] -= 1
                if p[2] <= 0:
                    patients.remove(p)
                    self._drop_patient(tx, skey, p[0], p[1])
                    if len(patients) == 1:
                        self._facet_add(tx, "counts", "patient_conflicts", -1)
                break
        if study["instances"] > 0:
            self._put(tx, "dicom_study", skey, study)
            return gone
        for p in patients:
            self._drop_patient(tx, skey, p[0], p[1])
        self._del(tx, "dicom_study", skey)
        self._facet_add(tx, "counts", "studies", -1)
        if study["date"]:
            self._del(tx, "dicom_lookup", self.date_prefix(study["date"]) + skey)
            self._facet_add(tx, "dates", study["date"], -1)
        if study["acc"]:
            self._del(tx, "dicom_lookup",
                      self.accession_prefix(study["acc_issuer"], study["acc"]) + skey)
            self._facet_add(tx, "aissuers", study["acc_issuer"], -1)
        return (*gone, "study")

    def _drop_patient(self, tx: Tx, skey: bytes, issuer: str, pid: str) -> None:
        self._del(tx, "dicom_lookup", self.patient_prefix(issuer, pid) + skey)
        self._facet_add(tx, "pissuers", issuer, -1)

    # -- queries (any thread, inside the caller's read transaction) -------------------------------

    def study(self, txn: lmdb.Transaction, uid: str) -> dict[str, Any] | None:
        return self._get(txn, "dicom_study", self.study_key(uid))

    def studies(self, txn: lmdb.Transaction) -> Iterator[dict[str, Any]]:
        for _, body in self.db.vscan(txn, "dicom_study", b"", epoch=self.read_epoch):
            yield _load(body)

    def series_of(self, txn: lmdb.Transaction, study_uid: str) -> Iterator[dict[str, Any]]:
        for _, body in self.db.vscan(txn, "dicom_series", self.study_key(study_uid),
                                     epoch=self.read_epoch):
            yield _load(body)

    def series(self, txn: lmdb.Transaction, study_uid: str, series_uid: str
               ) -> dict[str, Any] | None:
        return self._get(txn, "dicom_series", self.series_key(study_uid, series_uid))

    def members(self, txn: lmdb.Transaction, study_uid: str, series_uid: str
                ) -> Iterator[tuple[int, str]]:
        """(ino, SOP Instance UID) of the instances in a series, in inode order."""
        for ident, body in self.db.vscan(txn, "dicom_member",
                                         self.series_key(study_uid, series_uid),
                                         epoch=self.read_epoch):
            yield read_u64(ident), body.decode()

    def lookup(self, txn: lmdb.Transaction, prefix: bytes) -> Iterator[dict[str, Any]]:
        for _, body in self.db.vscan(txn, "dicom_lookup", prefix, epoch=self.read_epoch):
            yield _load(body)

    def problems(self, txn: lmdb.Transaction) -> Iterator[tuple[int, dict[str, Any]]]:
        for ident, body in self.db.vscan(txn, "dicom_lookup", b"!", epoch=self.read_epoch):
            yield read_u64(ident), _load(body)

    def counts(self, txn: lmdb.Transaction) -> dict[str, int]:
        out = {"instances": 0, "studies": 0, "series": 0, "bytes": 0, "patient_conflicts": 0,
               "incomplete": 0, "invalid": 0, "sop_conflict": 0}
        out.update(self.facet(txn, "counts"))
        for _, problem in self.problems(txn):
            out[problem["kind"]] = out.get(problem["kind"], 0) + 1
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


__all__ = ["SCHEMA", "DicomIndex", "FileEntry"]
