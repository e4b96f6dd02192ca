"""Answers to `vnafs find` and the DICOM part of `vnafs status`, from one read transaction.

Why a module of its own: the queries are the index's public face (the CLI, later the control API
of a VNA), and they must stay one prefix scan each, whatever the size of the archive. Results
carry DICOM values, because showing them to the administrator who asked is the point; callers
must never log them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lmdb

from vnafs.dicom.index import DicomIndex
from vnafs.errors import VnafsError


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
        if sum(x is not None for x in (q.patient, q.study, q.accession)) != 1:
            raise VnafsError("give exactly one of --patient, --study or --accession")
        return q


def _issuers(index: DicomIndex, txn: lmdb.Transaction, facet: str, given: str | None
             ) -> list[str]:
    return [given] if given is not None else sorted(index.facet(txn, facet))


def find(index: DicomIndex, q: Query) -> list[dict[str, Any]]:
    """Studies matching `q`, newest first, each with its counts and view path."""
    with index.db.begin() as txn:
        uids: list[str] = []
        if q.study is not None:
            uids = [q.study]
        elif q.patient is not None:
            for issuer in _issuers(index, txn, "pissuers", q.issuer):
                uids += [i["study"] for i in
                         index.lookup(txn, index.patient_prefix(issuer, q.patient))]
        else:
            assert q.accession is not None
            for issuer in _issuers(index, txn, "aissuers", q.accession_issuer):
                uids += [i["study"] for i in
                         index.lookup(txn, index.accession_prefix(issuer, q.accession))]
        out = []
        for uid in dict.fromkeys(uids):
            study = index.study(txn, uid)
            if study is None or not _matches(study, q):
                continue
            out.append(_summary(study))
            if len(out) >= q.limit:
                break
    out.sort(key=lambda s: (s["date"], s["time"], s["study"]), reverse=True)
    return out


def _matches(study: dict[str, Any], q: Query) -> bool:
    if q.modality is not None and q.modality.upper() not in study["modalities"]:
        return False
    if q.date_from is not None and not (study["date"] and study["date"] >= q.date_from):
        return False
    return q.date_to is None or bool(study["date"] and study["date"] <= q.date_to)


def _summary(study: dict[str, Any]) -> dict[str, Any]:
    return {
        "study": study["uid"], "date": study["date"], "time": study["time"],
        "accession": study["acc"], "accession_issuer": study["acc_issuer"],
        "patients": [{"issuer": p[0], "patient_id": p[1], "instances": p[2]}
                     for p in study["patients"]],
        "patient_conflict": len(study["patients"]) > 1,
        "modalities": sorted(study["modalities"]), "series": study["series"],
        "instances": study["instances"], "bytes": study["bytes"],
        "view": f"by-study/{study['uid']}",
    }


def problems(index: DicomIndex, limit: int = 10_000) -> list[dict[str, Any]]:
    """Files that are stored but not (cleanly) indexed, and studies with two patient keys."""
    out: list[dict[str, Any]] = []
    with index.db.begin() as txn:
        for ino, problem in index.problems(txn):
            entry = index.entry(txn, ino)
            rec = entry.record if entry is not None else {}
            out.append({"ino": ino, "kind": problem["kind"], "problem": problem["problem"],
                        "sop": rec.get("sop", ""), "study": rec.get("study", "")})
            if len(out) >= limit:
                return out
        if index.facet(txn, "counts").get("patient_conflicts"):
            for study in index.studies(txn):
                if len(study["patients"]) > 1:
                    out.append({"ino": None, "kind": "patient_conflict",
                                "problem": "one StudyInstanceUID under several patient keys",
                                "sop": "", "study": study["uid"]})
                    if len(out) >= limit:
                        return out
    return out


def counts(index: DicomIndex) -> dict[str, int]:
    with index.db.begin() as txn:
        return index.counts(txn)
