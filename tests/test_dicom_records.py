"""The typed records of the DICOM index read and write exactly the JSON of docs/format.md 5.5.

Why this exists: the index's records became dataclasses (`vnafs/dicom/index.py`), but their
bytes on disk must not change: stores written before must still read, and a record without the
newer optional fields must come out byte for byte as it went in. The strongest check is the
frozen format-1 store (tests/data/format1, written by vnafs 0.1.0): every DICOM record in it is
decoded into its typed record and encoded again, and must give the same JSON bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_format1 import copy_fixture
from vnafs.dicom.header import Status
from vnafs.dicom.index import (
    AccessionLookup,
    CopyCheck,
    DateLookup,
    FileEntry,
    InstanceRecord,
    PatientLookup,
    ProblemRecord,
    SeriesRecord,
    StudyRecord,
    _dump,
    pair,
)
from vnafs.keys import resolve_kek_source
from vnafs.store.lifecycle import open_store


def test_every_dicom_record_of_the_frozen_store_round_trips(workdir: Path) -> None:
    fs = copy_fixture(workdir)
    store = open_store(fs.hot, resolve_kek_source(str(fs.key), None))
    seen: dict[str, int] = {}
    try:
        db = store.db
        with db.begin() as txn:
            for ident, body in db.vscan(txn, "dicom_files", b""):
                n = int.from_bytes(body[:4], "big")
                obj = json.loads(body[4 : 4 + n])
                entry = FileEntry.unpack(int.from_bytes(ident, "big"), body)
                # the JSON re-encodes to the same bytes, and the entry packs the same header
                assert _dump({**entry.record.to_json(), "hz": obj["hz"]}) == body[4 : 4 + n]
                assert FileEntry.unpack(entry.ino, entry.pack()) == entry
                seen["files"] = seen.get("files", 0) + 1
            for table, kind in (("dicom_study", StudyRecord), ("dicom_series", SeriesRecord)):
                for _, body in db.vscan(txn, table, b""):
                    assert _dump(kind.from_json(json.loads(body)).to_json()) == body
                    seen[table] = seen.get(table, 0) + 1
            kinds = {b"p": PatientLookup, b"a": AccessionLookup, b"d": DateLookup,
                     b"!": ProblemRecord}
            for key, body in db.vscan(txn, "dicom_lookup", b""):
                kind = kinds.get(key[:1])
                if kind is None:
                    assert key[:1] == b"F"  # facets: value -> count, kept as dicts
                    continue
                assert _dump(kind.from_json(json.loads(body)).to_json()) == body
                seen[key[:1].decode()] = seen.get(key[:1].decode(), 0) + 1
    finally:
        store.close()
    # the fixture has two studies of one series, three indexed files (one of them
    # truncated), patient, accession and date lookups and one problem
    assert seen == {"files": 3, "dicom_study": 2, "dicom_series": 2, "p": 2, "a": 1, "d": 2,
                    "!": 1}


def _record(**changes: object) -> InstanceRecord:
    base: dict[str, object] = dict(
        status=Status.OK, problem="", sop="1.2.3.4", sop_class="1.2.840.10008.5.1.4.1.1.2",
        study="1.2.3", series="1.2.3.1", transfer_syntax="1.2.840.10008.1.2.1",
        modality="CT", date="20250102", time="101500", accession="A1", accession_issuer="",
        patient_id="P1", issuer="HOSP", series_number=1, instance_number=None,
        charset="ISO_IR 100", size=1234, digest="ab" * 32, in_views=True, gen=1)
    base.update(changes)
    return InstanceRecord(**base)  # type: ignore[arg-type]


def test_instance_record_fields_are_the_documented_names() -> None:
    rec = _record()
    assert sorted(rec.to_json()) == sorted([
        "status", "problem", "sop", "class", "study", "series", "ts", "modality", "date",
        "time", "acc", "acc_issuer", "pid", "issuer", "series_no", "inst_no", "charset",
        "size", "digest", "in_views", "gen"])
    assert InstanceRecord.from_json(rec.to_json()) == rec
    # the optional fields appear only when set, and come back
    dup = _record(ds_digest="cd" * 32, ds_diff={"ef" * 32: ("(0008,103E)",)})
    obj = dup.to_json()
    assert obj["ds_digest"] == "cd" * 32 and obj["ds_diff"] == {"ef" * 32: ["(0008,103E)"]}
    assert InstanceRecord.from_json(json.loads(_dump(obj))) == dup
    # unknown fields are ignored (a later vnafs may add some)
    assert InstanceRecord.from_json({**rec.to_json(), "later": 1}) == rec


def test_study_record_keeps_patients_as_lists() -> None:
    obj = {"uid": "1.2.3", "date": "20250102", "time": "", "acc": "", "acc_issuer": "",
           "patients": [["HOSP", "P1", 2], ["", "P1", 1]], "modalities": {"CT": 3},
           "instances": 3, "bytes": 99, "series": 1}
    study = StudyRecord.from_json(obj)
    assert [(p.issuer, p.patient_id, p.instances) for p in study.patients] == [
        ("HOSP", "P1", 2), ("", "P1", 1)]
    assert study.to_json() == obj
    study.incomplete = 2
    assert study.to_json() == {**obj, "incomplete": 2}


@pytest.mark.parametrize("problem", [
    ProblemRecord("incomplete", "truncated: data ends before byte 1066"),
    ProblemRecord("sop_conflict", "another file ...", ("(0008,103E)", "(7FE0,0010)")),
])
def test_problem_record_round_trips_and_reads_as_one_line(problem: ProblemRecord) -> None:
    assert ProblemRecord.from_json(json.loads(_dump(problem.to_json()))) == problem
    assert "\n" not in problem.text() and problem.text().startswith(problem.kind + ": ")
    assert ("tags" in problem.to_json()) == bool(problem.tags)


def test_copy_check_gives_each_copy_its_differences() -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    check = CopyCheck({1: "x", 2: "y", 3: "z"}, {1: a, 2: b, 3: c},
                      {pair(b, a): ("(0010,0010)",), pair(a, c): ()})
    assert check.diff_for(a) == {b: ("(0010,0010)",), c: ()}
    assert check.diff_for(b) == {a: ("(0010,0010)",)}
    assert check.diff_for("") == {}
