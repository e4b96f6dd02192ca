"""The access audit through a real mount, the real CLI, replication and restore.

One mount with `[audit] enabled = true` replicating to a `file://` archive: generated DICOM
studies are written into it, read by other processes under another uid (500 opens of one study
by one process), renamed and deleted; `vnafs audit` must answer per study, patient, uid and time
with exactly the records expected, `vnafs audit verify` must pass, nothing of the patients'
names, IDs or study UIDs may be found in the hot store, the archive or the log, and a restore
must bring the chain back (plus its own `export` record). Then the unmounted store is tampered
with behind vnafs's back (a record removed, one edited, two swapped) and `vnafs audit verify`
must fail with one line naming the record. The chain and collapsing logic in detail are in
tests/unit/test_audit.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from tests.conftest import Fs, run_vnafs, set_config
from tests.posix_helpers import _unprivileged_python as unprivileged_python
from tools.gen_studies import GenInstance, generate
from vnafs.meta.db import u64

READER_UID = 1234


@pytest.fixture
def audited(workdir: Path) -> Iterator[Fs]:
    """A mounted file system with the audit on, replicating to a file:// archive every second."""
    fs = Fs(workdir / "site", archive=f"file://{workdir / 'archive'}")
    fs.root.mkdir()
    fs.create()
    set_config(fs, "archive", interval=1)
    set_config(fs, "audit", enabled=True)
    try:
        yield fs.mount()
    finally:
        fs.cleanup()


def audit(fs: Fs, *args: str, check: bool = True) -> Any:
    res = run_vnafs("audit", *args, "--json", str(fs.mnt), check=check)
    doc = json.loads(res.stdout)
    assert doc["schema"] == 1
    return doc["records"]


def offline(fs: Fs, hot: Path, *args: str, check: bool = True) -> Any:
    return run_vnafs("audit", *args, "--key-file", str(fs.key), str(hot), check=check)


def read_as(uid: int, paths: list[Path], rounds: int) -> int:
    """Open and read every file of `paths` `rounds` times in one process running as `uid`;
    that process's pid."""
    code = ("import os, sys\n"
            "for _ in range(int(sys.argv[1])):\n"
            "    for p in sys.argv[2:]:\n"
            "        with open(p, 'rb') as f:\n"
            "            f.read(4096)\n"
            "print(os.getpid())\n")

    def drop() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    res = subprocess.run([unprivileged_python(), "-I", "-c", code, str(rounds), *map(str, paths)],
                         capture_output=True, text=True, preexec_fn=drop, cwd="/", timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    return int(res.stdout)


def phi(instances: list[GenInstance]) -> set[bytes]:
    values: set[str] = set()
    for i in instances:
        values |= {i.study_uid, i.patient.patient_id, i.patient.name}
    return {v.encode() for v in values if len(v) >= 6}


def leaks(root: Path, needles: set[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {n!r}" for n in needles if n in data]
    return found


def test_audit_records_resolve_verify_replicate_and_detect_tampering(
        audited: Fs, workdir: Path) -> None:
    fs = audited
    gen = generate(workdir / "gen", seed=3, preset="small")
    studies: dict[str, list[GenInstance]] = {}
    for inst in gen:
        studies.setdefault(inst.study_uid, []).append(inst)
    first, second = (studies[u] for u in list(studies)[:2])  # patients 0 and 1: one PatientID
    assert first[0].patient.patient_id == second[0].patient.patient_id
    dest = fs.mnt / "in"
    for inst in first + second:
        target = dest / inst.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(workdir / "gen" / inst.path, target)
    fs.wait_indexed()
    since = math.ceil(time.time())
    time.sleep(max(0.0, since - time.time()) + 0.05)

    viewer = read_as(READER_UID, [dest / i.path for i in first], rounds=25)  # 500 opens
    other = read_as(READER_UID, [dest / i.path for i in second[:2]], rounds=1)
    os.rename(dest / first[0].path, dest / "renamed.dcm")
    os.unlink(dest / second[0].path)

    records = audit(fs, "--study", first[0].study_uid)
    actions = Counter(r["action"] for r in records)
    assert actions == {"create": 20, "write": 20, "read": 1, "rename": 1}
    [read] = [r for r in records if r["action"] == "read"]
    assert (read["uid"], read["pid"], read["study"]) == (READER_UID, viewer, first[0].study_uid)
    assert read["process"] not in ("", "?") and read["time"].endswith("Z")
    assert {r["uid"] for r in records if r["action"] != "read"} == {0}
    patient = first[0].patient
    by_issuer = audit(fs, "--patient", patient.patient_id, "--issuer", patient.issuer)
    assert [r["seq"] for r in by_issuer] == [r["seq"] for r in records]
    both = audit(fs, "--patient", patient.patient_id)
    assert {r["study"] for r in both} == {first[0].study_uid, second[0].study_uid}
    assert Counter(r["action"] for r in both if r["study"] == second[0].study_uid) == \
        {"create": 10, "write": 10, "read": 1, "delete": 1}
    assert [(r["pid"], r["action"]) for r in audit(fs, "--uid", str(READER_UID))] == \
        [(viewer, "read"), (other, "read")]
    late = audit(fs, "--since", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since)))
    assert [r["action"] for r in late] == ["read", "read", "rename", "delete"]
    lines = run_vnafs("audit", "--uid", str(READER_UID), str(fs.mnt)).stdout.splitlines()
    assert len(lines) == 2 and f"pid {viewer}" in lines[0] and " read " in lines[0]
    res = run_vnafs("audit", "verify", str(fs.mnt))
    total = len(audit(fs))
    assert res.stdout.strip() == f"audit chain intact: {total} records, head {total}"

    fs.wait_replicated()
    fs.umount()
    needles = phi(gen)
    assert not leaks(fs.hot, needles) and not leaks(workdir / "archive", needles)

    restored = workdir / "restored"
    run_vnafs("restore", "--key-file", str(fs.key), "--no-progress",
              f"file://{workdir / 'archive'}", str(restored))
    back = json.loads(offline(fs, restored, "--json").stdout)["records"]
    assert len(back) == total + 1 and back[-1]["action"] == "export"
    assert back[-1]["ino"] is None and back[-1]["uid"] == os.getuid()
    assert offline(fs, restored, "verify").stdout.startswith(f"audit chain intact: {total + 1}")

    # A read-only archive mount keeps a chain of its own (export, then reads), in its cache.
    archive = workdir / "archive"
    objects = {p: p.stat().st_size for p in archive.rglob("*") if p.is_file()}
    ro = workdir / "ro"
    ro.mkdir()
    run_vnafs("mount", "--archive-only", "--key-file", str(fs.key), "-o", "allow_other", "--cache",
              str(workdir / "cache"), f"file://{archive}", str(ro))
    try:
        renamed = ro / "in" / "renamed.dcm"
        reader = read_as(READER_UID, [renamed], rounds=3)
        own = json.loads(run_vnafs("audit", "--json", str(ro)).stdout)["records"]
        assert [(r["action"], r["uid"], r["pid"]) for r in own] == \
            [("export", 0, own[0]["pid"]), ("read", READER_UID, reader)]
        assert own[1]["study"] == first[0].study_uid
        assert run_vnafs("audit", "verify", str(ro)).stdout.startswith("audit chain intact: 2 ")
        archived = json.loads(run_vnafs("audit", "--archived", "--json", "--study",
                                        first[0].study_uid, str(ro)).stdout)["records"]
        assert [r["seq"] for r in archived] == [r["seq"] for r in records]
    finally:
        run_vnafs("umount", str(ro), check=False)
    assert {p: p.stat().st_size for p in archive.rglob("*") if p.is_file()} == objects

    # Tampering with the unmounted hot store, behind vnafs's back.
    env = lmdb.open(str(fs.hot / "meta"), max_dbs=64)
    table = env.open_db(b"audit", create=False)

    def tampered(change: dict[bytes, bytes | None]) -> str:
        with env.begin(write=True) as txn:
            saved = {k: txn.get(k, db=table) for k in change}
            for key, value in change.items():
                if value is None:
                    txn.delete(key, db=table)
                else:
                    txn.put(key, value, db=table)
        res = offline(fs, fs.hot, "verify", check=False)
        with env.begin(write=True) as txn:
            for key, value in saved.items():
                assert value is not None
                txn.put(key, value, db=table)
        assert res.returncode == 1 and res.stdout == ""
        [line] = res.stderr.splitlines()
        return line

    with env.begin() as txn:
        fifth, sixth = txn.get(u64(5), db=table), txn.get(u64(6), db=table)
    assert fifth is not None and sixth is not None
    assert tampered({u64(5): None}) == "vnafs audit verify: audit record 5 is missing"
    flipped = bytearray(sixth)
    flipped[-20] ^= 0x40
    assert tampered({u64(6): bytes(flipped)}) == (
        "vnafs audit verify: audit record 6 fails authentication: it was edited or moved from "
        "another place")
    assert "audit record 5 fails authentication" in tampered({u64(5): sixth, u64(6): fifth})
    env.close()
    assert offline(fs, fs.hot, "verify").returncode == 0
