"""The access audit in-process: the chain, its checks, collapsing, study resolution, queries.

`AuditRecorder` runs over the real engine, index and indexer (tests/unit/harness.py) and is
called the way `Operations` calls it; its clocks and the process-name lookup are injected, so
the collapse window is tested without waiting and without timing. The chain is checked against
the known-answer vector of docs/format.md 5.6, computed here from that section with a general
HMAC/HKDF library and none of vnafs's code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import struct
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tools.gen_studies import GenInstance, write_ct_series
from vnafs.audit.chain import AuditLog, Event, Query, chain_mac, encode_fields, select
from vnafs.audit.recorder import AuditRecorder
from vnafs.errors import IntegrityError
from vnafs.meta.db import u64
from vnafs.meta.records import ROOT_INO
from vnafs.meta.tx import Tx

from .harness import Vfs, corpus

FORMAT_MD = Path(__file__).resolve().parents[2] / "docs" / "format.md"
WINDOW = 300.0


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[GenInstance, bytes]]:
    """Six generated CT slices of one series (one study, one patient)."""
    out = tmp_path_factory.mktemp("ct")
    return [(i, (out / i.path).read_bytes()) for i in write_ct_series(out, seed=7, count=6)]


class Clock:
    """Monotonic time the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def audit_log(vfs: Vfs) -> AuditLog:
    return AuditLog(vfs.store.db, vfs.store.keyring.audit_key)


def recorder(vfs: Vfs, clock: Clock) -> AuditRecorder:
    return AuditRecorder(vfs.engine, vfs.ns, audit_log(vfs), vfs.index,
                         collapse_seconds=WINDOW, monotonic=clock,
                         names=lambda pid: f"proc{pid}")


def everything(vfs: Vfs, **criteria: Any) -> list[dict[str, Any]]:
    return select(audit_log(vfs), vfs.index, Query(**criteria))


def event(n: int, action: str = "read") -> Event:
    return Event(1_767_225_600_000_000_000 + n, 1000 + n, 100, 4000 + n, f"p{n}", action, n)


async def append(vfs: Vfs, events: list[Event]) -> None:
    def run(tx: Tx) -> None:
        audit_log(vfs).append(tx.txn, events)

    await vfs.engine.commit(run)


# -- the chain --------------------------------------------------------------------------------------


async def test_appended_records_chain_and_verify(vfs: Vfs) -> None:
    assert audit_log(vfs).verify().as_dict() == {"ok": True, "records": 0, "head_seq": 0,
                                                 "problem": None, "bad_seq": None}
    await append(vfs, [event(1), event(2, "create")])
    await append(vfs, [event(3, "delete")])
    rep = audit_log(vfs).verify()
    assert rep.ok and rep.records == 3 and rep.head_seq == 3
    with vfs.store.db.begin() as txn:
        found = list(audit_log(vfs).records(txn))
    assert found == [(1, event(1)), (2, event(2, "create")), (3, event(3, "delete"))]


def _raw(vfs: Vfs) -> dict[bytes, bytes]:
    db = vfs.store.db
    with db.begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=db.dbs["audit"])}


def _put_raw(vfs: Vfs, table: str, changes: dict[bytes, bytes | None]) -> None:
    db = vfs.store.db
    with db.begin(write=True) as txn:
        for key, value in changes.items():
            if value is None:
                txn.delete(key, db=db.dbs[table])
            else:
                txn.put(key, value, db=db.dbs[table])


async def test_verify_names_the_first_removed_edited_or_swapped_record(vfs: Vfs) -> None:
    vfs.fsck_at_exit = False  # records are damaged on purpose
    await append(vfs, [event(n) for n in range(1, 6)])
    raw = _raw(vfs)
    head = vfs.store.db.env.begin().get(b"audit_head", db=vfs.store.db.dbs["counters"])
    assert head is not None

    def check(changes: dict[bytes, bytes | None], problem: str, bad: int) -> None:
        _put_raw(vfs, "audit", changes)
        rep = audit_log(vfs).verify()
        assert (rep.ok, rep.problem, rep.bad_seq) == (False, problem, bad)
        _put_raw(vfs, "audit", {k: raw[k] for k in changes})
        assert audit_log(vfs).verify().ok

    check({u64(3): None}, "audit record 3 is missing", 3)
    check({u64(2): None, u64(3): None}, "audit records 2 to 3 are missing", 2)
    flipped = bytearray(raw[u64(4)])
    flipped[40] ^= 1
    check({u64(4): bytes(flipped)},
          "audit record 4 fails authentication: it was edited or moved from another place", 4)
    check({u64(2): raw[u64(3)], u64(3): raw[u64(2)]},
          "audit record 2 fails authentication: it was edited or moved from another place", 2)
    check({u64(5): None}, "audit records 5 to 5 are missing (the newest ones)", 5)
    # A removed head with records left is a chain that does not end where it should.
    _put_raw(vfs, "counters", {b"audit_head": None})
    rep = audit_log(vfs).verify()
    assert rep.problem == "audit records 1 to 5 are not covered by the chain head"
    _put_raw(vfs, "counters", {b"audit_head": head})
    assert audit_log(vfs).verify().ok


async def test_a_record_resealed_elsewhere_does_not_chain(vfs: Vfs) -> None:
    """What a holder of the data keys but not of the chain (say, a copy of old records put
    back under new numbers) gets: envelopes that open and MACs that do not chain."""
    vfs.fsck_at_exit = False
    await append(vfs, [event(n) for n in range(1, 4)])
    db = vfs.store.db
    with db.begin() as txn:
        second = db.get(txn, "audit", u64(2))
    assert second is not None
    with db.begin(write=True) as txn:
        db.put(txn, "audit", u64(3), second)  # record 2's plaintext sealed as record 3
    rep = audit_log(vfs).verify()
    assert rep.bad_seq == 3 and "does not chain to record 2" in str(rep.problem)


def _vectors() -> dict[str, bytes]:
    """name -> bytes from the ```audit-vectors block (the notation of format.md section 7)."""
    [block] = re.findall(r"^```audit-vectors\n(.*?)^```", FORMAT_MD.read_text(),
                         flags=re.S | re.M)
    out: dict[str, bytes] = {}
    name = ""
    for line in block.splitlines():
        text = line.split("#", 1)[0]
        if not text.strip():
            continue
        if not line.startswith(" "):
            name, _, text = text.partition("=")
            name = name.strip()
            out[name] = b""
        text = text.strip()
        if text.startswith('"'):
            out[name] += text.strip('"').encode()
        else:
            out[name] += bytes.fromhex(text.replace(" ", ""))
    return out


def test_known_answer_vector_of_the_format_document() -> None:
    v = _vectors()
    # Independent of vnafs: section 2's HKDF, 5.6's layout and MAC.
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"vnafs audit v1").derive(v["master"])
    assert key == v["audit_key"]
    prev = bytes(32)
    for n in (1, 2):
        fields = v[f"record_{n}_fields"]
        mac = hmac.new(key, prev + struct.pack(">Q", n) + fields, hashlib.sha256).digest()
        assert mac == v[f"record_{n}_mac"]
        prev = mac
    assert v["head"] == struct.pack(">Q", 2) + prev
    # And vnafs agrees, field by field.
    first = Event(1_767_225_600_000_000_000, 1000, 1000, 4242, "storescp", "create", 57)
    second = Event(1_767_225_601_000_000_000, 0, 0, 77, "cat", "read", 57,
                   bytes(range(0x10, 0x20)))
    assert encode_fields(first) == v["record_1_fields"]
    assert encode_fields(second) == v["record_2_fields"]
    mac1 = chain_mac(key, bytes(32), 1, encode_fields(first))
    assert mac1 == v["record_1_mac"]
    assert chain_mac(key, mac1, 2, encode_fields(second)) == v["record_2_mac"]


# -- the recorder -----------------------------------------------------------------------------------


async def _write_study(vfs: Vfs, series: list[tuple[GenInstance, bytes]]) -> list[int]:
    inos = [await vfs.write_file(f"ct{n}.dcm".encode(), data)
            for n, (_, data) in enumerate(series)]
    await vfs.indexed()
    return inos


async def test_reads_of_a_study_by_one_process_collapse_into_one_record(
        vfs: Vfs, ct_series: list[tuple[GenInstance, bytes]]) -> None:
    clock = Clock()
    rec = recorder(vfs, clock)
    inos = await _write_study(vfs, ct_series)
    plain = await vfs.write_file(b"notes.txt", b"not dicom")
    for _ in range(3):  # a viewer scrolling through the study three times
        for ino in inos:
            rec.opened(ino, 1000, 1000, 501, os.O_RDONLY)
        clock.now += 10
    for ino in inos[:2]:
        rec.opened(ino, 1001, 1001, 502, os.O_RDONLY)  # another process: its own record
    rec.opened(plain, 1000, 1000, 501, os.O_RDONLY)
    rec.opened(plain, 1000, 1000, 501, os.O_RDONLY)
    assert await rec.flush() == 3
    clock.now += WINDOW  # the window is over: the next read is a new record
    rec.opened(inos[3], 1000, 1000, 501, os.O_RDONLY)
    assert await rec.flush() == 1
    uid = ct_series[0][0].study_uid
    found = everything(vfs, study=uid)
    assert [(r["pid"], r["action"], r["study"], r["process"]) for r in found] == \
        [(501, "read", uid, "proc501"), (502, "read", uid, "proc502"),
         (501, "read", uid, "proc501")]
    assert [r["ino"] for r in everything(vfs) if r["study"] is None] == [plain]
    assert rec.stats["records"] == 4
    assert audit_log(vfs).verify().ok


async def test_writes_are_one_record_per_open_and_changes_are_in_their_transaction(
        vfs: Vfs, ct_series: list[tuple[GenInstance, bytes]]) -> None:
    clock = Clock()
    rec = recorder(vfs, clock)
    (_, data), (_, data2) = ct_series[0], ct_series[1]
    # create as Operations.create does it: the record is appended in the create's commit.
    node = await vfs.engine.commit(rec.audited(vfs.ns.mknod, "create", 1000, 1000, 601),
                                   ROOT_INO, b"in.dcm", 0o100644, 1000, 1000, 0, b"", True)
    assert [r["action"] for r in everything(vfs)] == ["create"]  # no flush needed
    vfs.files.attach(node)
    rec.created(node.ino, 1000, 1000, 601)
    for at in range(0, len(data), 1 << 17):  # many write requests, one record
        rec.wrote(node.ino)
        await vfs.files.write(node.ino, at, data[at:at + (1 << 17)])
    await vfs.close(node.ino)
    await vfs.indexed()
    rec.opened(node.ino, 1000, 1000, 602, os.O_WRONLY)  # reopened for writing, not written
    rec.opened(node.ino, 1000, 1000, 603, os.O_RDWR)
    rec.wrote(node.ino)  # the write belongs to the latest opener for writing
    assert await rec.flush() == 3
    await vfs.engine.commit(rec.audited(vfs.ns.rename, "rename", 0, 0, 604,
                                        (ROOT_INO, b"in.dcm")),
                            ROOT_INO, b"in.dcm", ROOT_INO, b"moved.dcm", 0)
    other = await vfs.write_file(b"other.dcm", data2)
    await vfs.indexed()
    await vfs.engine.commit(rec.audited(vfs.ns.unlink, "delete", 0, 0, 605,
                                        (ROOT_INO, b"moved.dcm")), ROOT_INO, b"moved.dcm")
    uid = ct_series[0][0].study_uid
    rows = [(r["action"], r["pid"], r["ino"]) for r in everything(vfs, study=uid)]
    # The create came before indexing (no study in the record): it matches through the
    # inode's other records. The delete resolved the study before the index forgot the file.
    assert rows == [("create", 601, node.ino), ("write", 601, node.ino),
                    ("read", 603, node.ino), ("write", 603, node.ino),
                    ("rename", 604, node.ino), ("delete", 605, node.ino)]
    assert other not in [r["ino"] for r in everything(vfs)]
    assert audit_log(vfs).verify().records == 6


async def test_a_failed_change_leaves_no_record(vfs: Vfs) -> None:
    rec = recorder(vfs, Clock())
    await vfs.write_file(b"a", b"x")
    with pytest.raises(OSError):
        await vfs.engine.commit(rec.audited(vfs.ns.mknod, "create", 0, 0, 1), ROOT_INO, b"a",
                                0o100644, 0, 0, 0, b"", True)  # O_EXCL on an existing name
    with pytest.raises(OSError):
        await vfs.engine.commit(rec.audited(vfs.ns.unlink, "delete", 0, 0, 1,
                                            (ROOT_INO, b"missing")), ROOT_INO, b"missing")
    assert everything(vfs) == [] and audit_log(vfs).verify().head_seq == 0


async def test_queries_by_patient_uid_and_time(vfs: Vfs) -> None:
    rec = recorder(vfs, Clock())
    data = corpus("CT_small.dcm").read_bytes()
    ds = pydicom.dcmread(corpus("CT_small.dcm"), stop_before_pixels=True)
    ino = await vfs.write_file(b"ct.dcm", data)
    await vfs.indexed()
    rec.opened(ino, 1000, 1000, 700, os.O_RDONLY)
    rec.opened(ino, 2000, 2000, 701, os.O_RDONLY)
    await rec.flush()
    late = dataclasses.replace(event(9), time_ns=2_000_000_000_000_000_000, uid=2000)
    await append(vfs, [late])
    assert [r["pid"] for r in everything(vfs, patient=ds.PatientID)] == [700, 701]
    assert everything(vfs, patient=ds.PatientID, issuer="ELSEWHERE") == []
    assert everything(vfs, patient="nobody") == []
    assert [r["pid"] for r in everything(vfs, uid=2000)] == [701, late.pid]
    assert [r["pid"] for r in everything(vfs, since_ns=late.time_ns)] == [late.pid]
    [one] = everything(vfs, uid=1000)
    assert set(one) >= {"time", "uid", "pid", "process", "action", "study"}
    assert one["study"] == ds.StudyInstanceUID and one["time"].endswith("Z")


async def test_reads_queued_before_a_delete_keep_their_study_and_their_order(
        vfs: Vfs, ct_series: list[tuple[GenInstance, bytes]]) -> None:
    rec = recorder(vfs, Clock())
    ino = await vfs.write_file(b"ct.dcm", ct_series[0][1])
    await vfs.indexed()
    rec.opened(ino, 1000, 1000, 800, os.O_RDONLY)
    await rec.before_change()  # what Operations.unlink does before its commit
    await vfs.engine.commit(rec.audited(vfs.ns.unlink, "delete", 0, 0, 801, (ROOT_INO, b"ct.dcm")),
                            ROOT_INO, b"ct.dcm")
    # The study left the index with its last instance: the records keep its keyed hash, which
    # a query by its UID still finds.
    key = vfs.index.study_key(ct_series[0][0].study_uid).hex()
    assert [(r["action"], r["study_key"]) for r in everything(vfs)] == \
        [("read", key), ("delete", key)]
    assert [r["action"] for r in everything(vfs, study=ct_series[0][0].study_uid)] == \
        ["read", "delete"]


async def test_an_archive_mounts_own_chain_survives_a_checkpoint_from_the_archive(
        vfs: Vfs) -> None:
    """The local chain (format.md 5.6) keeps its head beside its records: applying a
    checkpoint clears every replicated table, `counters` with the replicated chain's head."""
    from vnafs.archive.log import clear_replicated

    local = AuditLog.local(vfs.store.db, vfs.store.keyring.audit_key)
    await append(vfs, [event(1)])

    def run(tx: Tx) -> None:
        local.append(tx.txn, [event(2, "export"), event(3)])

    await vfs.engine.commit(run)
    with vfs.store.db.begin(write=True) as txn:
        clear_replicated(vfs.store.db, txn)
    vfs.fsck_at_exit = False  # the namespace went with the replicated tables
    rep = local.verify()
    assert rep.ok and rep.records == 2 and rep.head_seq == 2
    assert audit_log(vfs).verify().records == 0
    with vfs.store.db.begin() as txn:
        assert [e.action for _, e in local.records(txn)] == ["export", "read"]


async def test_a_damaged_chain_head_fails_changes_closed_and_keeps_reads_queued(
        vfs: Vfs) -> None:
    vfs.fsck_at_exit = False
    rec = recorder(vfs, Clock())
    ino = await vfs.write_file(b"a", b"x")
    await append(vfs, [event(1)])
    _put_raw(vfs, "counters", {b"audit_head": b"not a sealed value"})
    with pytest.raises(IntegrityError):
        await vfs.engine.commit(rec.audited(vfs.ns.mknod, "create", 0, 0, 1), ROOT_INO, b"b",
                                0o100644, 0, 0, 0, b"", True)
    assert b"b" not in vfs.names()  # no change without its record
    rec.opened(ino, 0, 0, 2, os.O_RDONLY)
    await rec.before_change()  # logged and reported, not raised
    assert vfs.engine.health.as_dict()["state"] == "damaged"
    assert rec.stats["events"] == 2 and rec.stats["records"] == 0
    assert "fails authentication" in str(audit_log(vfs).verify().problem)


async def test_fsck_verifies_the_audit_chain(vfs: Vfs) -> None:
    """fsck reports a broken audit chain as not clean (tamper evidence, never "repaired")."""
    from vnafs import fsck

    vfs.fsck_at_exit = False  # a record is removed on purpose
    await append(vfs, [event(n) for n in range(1, 4)])
    await vfs.settle()
    rep = fsck.check(vfs.store, progress=False)
    assert rep.clean and rep.audit_records == 3 and rep.audit_problem is None
    _put_raw(vfs, "audit", {u64(2): None})
    rep = fsck.check(vfs.store, progress=False)
    assert not rep.clean and rep.audit_problem == "audit record 2 is missing"
    assert "AUDIT: audit record 2 is missing" in rep.summary()
