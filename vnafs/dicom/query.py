"""Answers to `vnafs find` and the DICOM part of `vnafs status`, from one read transaction.

Why a module of its own: the queries are the index's public face (the CLI, later the control API
of a VNA), and they must stay cheap whatever the size of the archive: a patient, study or
accession is one prefix scan, a date range one per study date in it; only a modality alone reads
every study record. The answers are plain dicts because they are an external format (`vnafs
find --json`); they are built from the index's typed records. Results carry DICOM values,
because showing them to the administrator who asked is the point; callers must never log them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lmdb

from vnafs.dicom.index import SOP_CONFLICT, DicomIndex, StudyRecord
from vnafs.errors import VnafsError

# What `vnafs find` accepts (the daemon's answer to a request with no criterion; the CLI,
# which must not import this module, says the same before it asks).
CRITERIA = ("--patient ID [--issuer I], --study UID, --accession A [--accession-issuer I], "
            "--date FROM[-TO], --modality M (--date and --modality also narrow the others)")


@dataclass(frozen=True, slots=True)
class Query:
    patient: str | None = None
    issuer: str | None = None
    study: str | None = None
    accession: str | None = None
    accession_issuer: str | None = None
    modality: str | None = None
    date_from: str | None = None  # YYYYMMDD, inclusive
    date_to: str | None = None
    limit: int = 10_000

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> Query:
        fields = {k: req.get(k) for k in ("patient", "issuer", "study", "accession",
                                          "accession_issuer", "modality", "date_from",
                                          "date_to")}
        q = cls(**fields, limit=int(req.get("limit") or 10_000))
        if sum(x is not None for x in (q.patient, q.study, q.accession)) > 1:
            raise VnafsError("give only one of --patient, --study or --accession (narrow it "
                             "down with --date or --modality)")
        if q.patient is None and q.study is None and q.accession is None and q.modality is None \
                and q.date_from is None and q.date_to is None:
            raise VnafsError(f"give at least one criterion: {CRITERIA}")
        for value in (q.date_from, q.date_to):
            if value is not None and not _is_date(value):
                raise VnafsError("study dates are YYYYMMDD: give --date as 20250101 or "
                                 "20250101-20250131")
        if q.date_from and q.date_to and q.date_from > q.date_to:
            raise VnafsError("the date range ends before it starts: give it as FROM-TO")
        return q


def _is_date(value: str) -> bool:
    return len(value) == 8 and value.isdigit()


def _issuers(index: DicomIndex, txn: lmdb.Transaction, facet: str, given: str | None
             ) -> list[str]:
    return [given] if given is not None else sorted(index.facet(txn, facet))


def find(index: DicomIndex, q: Query) -> list[dict[str, Any]]:
    """Studies matching `q`, newest first (at most `q.limit`), each with its counts and view
    path. A patient, study or accession is one prefix scan per issuer; a date range one per
    study date present in it (from the `dates` facet); a modality alone reads every study
    record, the one query that is not a prefix scan."""
    found: list[StudyRecord] = []
    with index.db.begin() as txn:
        if q.study is not None or q.patient is not None or q.accession is not None:
            for uid in dict.fromkeys(_keyed(index, txn, q)):
                study = index.study(txn, uid)
                if study is not None and _matches(study, q):
                    found.append(study)
                    if len(found) >= q.limit:
                        break
        elif q.date_from is not None or q.date_to is not None:
            days = sorted((d for d in index.facet(txn, "dates") if _is_date(d)
                           and (q.date_from is None or d >= q.date_from)
                           and (q.date_to is None or d <= q.date_to)), reverse=True)
            for day in days:  # newest first, so stopping at the limit keeps the newest
                for item in index.lookup(txn, index.date_prefix(day)):
                    study = index.study(txn, item.study)
                    if study is not None and _matches(study, q):
                        found.append(study)
                if len(found) >= q.limit:
                    break
        else:
            found = [s for s in index.studies(txn) if _matches(s, q)]
    found.sort(key=lambda s: (s.date, s.time, s.uid), reverse=True)
    return [_summary(s) for s in found[: q.limit]]


def _keyed(index: DicomIndex, txn: lmdb.Transaction, q: Query) -> list[str]:
    """Study UIDs of the patient, study or accession asked for."""
    if q.study is not None:
        return [q.study]
    uids: list[str] = []
    if q.patient is not None:
        for issuer in _issuers(index, txn, "pissuers", q.issuer):
            uids += [i.study for i in index.lookup(txn, index.patient_prefix(issuer, q.patient))]
        return uids
    assert q.accession is not None
    for issuer in _issuers(index, txn, "aissuers", q.accession_issuer):
        uids += [i.study for i in index.lookup(txn, index.accession_prefix(issuer, q.accession))]
    return uids


def _matches(study: StudyRecord, q: Query) -> bool:
    if q.modality is not None and q.modality.upper() not in study.modalities:
        return False
    if q.date_from is not None and not (study.date and study.date >= q.date_from):
        return False
    return q.date_to is None or bool(study.date and study.date <= q.date_to)


def _summary(study: StudyRecord) -> dict[str, Any]:
    """A study as `vnafs find --json` prints it (an external format: keep its fields)."""
    return {
        "study": study.uid, "date": study.date, "time": study.time,
        "accession": study.accession, "accession_issuer": study.accession_issuer,
        "patients": [{"issuer": p.issuer, "patient_id": p.patient_id,
                      "instances": p.instances} for p in study.patients],
        "patient_conflict": len(study.patients) > 1,
        "modalities": sorted(study.modalities), "series": study.series,
        "instances": study.instances, "bytes": study.size,
        # instances shown although flagged incomplete (image storage without pixel data)
        "incomplete": study.incomplete,
        "view": f"by-study/{study.uid}",
    }


def problems(index: DicomIndex, limit: int = 10_000) -> list[dict[str, Any]]:
    """Files that are stored but flagged, and studies with two patient keys. `tags` names the
    data elements in which copies of one instance differ; `copies` the other files with the
    same SOP Instance UID; `in_views` whether the file is shown in the views."""
    out: list[dict[str, Any]] = []
    with index.db.begin() as txn:
        for ino, problem in index.problems(txn):
            entry = index.entry(txn, ino)
            rec = entry.record if entry is not None else None
            copies = ([i for i in index.sop_inos(txn, rec.sop) if i != ino]
                      if rec is not None and rec.sop and problem.kind == SOP_CONFLICT else [])
            out.append({"ino": ino, "kind": problem.kind, "problem": problem.problem,
                        "tags": list(problem.tags), "copies": copies,
                        "in_views": bool(rec and rec.in_views),
                        "sop": rec.sop if rec else "", "study": rec.study if rec else ""})
            if len(out) >= limit:
                return out
        if index.facet(txn, "counts").get("patient_conflicts"):
            for study in index.studies(txn):
                if len(study.patients) > 1:
                    out.append({"ino": None, "kind": "patient_conflict",
                                "problem": "one StudyInstanceUID under several patient keys",
                                "tags": [], "copies": [], "in_views": True,
                                "sop": "", "study": study.uid})
                    if len(out) >= limit:
                        return out
    return out


def counts(index: DicomIndex) -> dict[str, int]:
    with index.db.begin() as txn:
        return index.counts(txn)
