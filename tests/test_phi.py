"""No plaintext PHI at rest or in logs: names, contents, xattrs and link targets stay sealed.

This file exists for the PHI invariant (docs/architecture.md "Logging and PHI"): a hospital's hot
store, its log and the output of the admin commands must not reveal patient names, patient ids or
DICOM UIDs, even after renames, deletions and fsyncs leave old copies around. The test writes
made-up PHI through a real mount in every place a PACS would put it, then reads every byte of
every file under the hot store (and every file name) looking for it in UTF-8 and UTF-16-LE, in
any letter case.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from conftest import Fs, run_vnafs

MIB = 1 << 20
NAME = "DOE^JANE"
PID = "PID-778899"
UID = "1.2.826.0.1.3680043.8.498.123456789"
OTHER_NAME = "SMITH^JOHN"
OTHER_PID = "PID-112233"
STUDY_UID = "1.2.826.0.1.3680043.8.498.987654321"
PHI = (NAME, PID, UID, OTHER_NAME, OTHER_PID, STUDY_UID)


def needles() -> list[bytes]:
    """Lower-case byte patterns; haystacks are lower-cased too, so any case variant matches."""
    out: list[bytes] = []
    for s in PHI:
        for variant in {s, s.replace("^", " "), s.replace("^", "_")}:
            out += [variant.lower().encode("utf-8"), variant.lower().encode("utf-16-le")]
    return out


def phi_found(data: bytes) -> list[str]:
    low = data.lower()
    return [n.decode("utf-8", "replace") for n in needles() if n in low]


def compressible_content() -> bytes:
    record = f"PatientName={NAME} PatientID={PID} SOPInstanceUID={UID} StudyUID={STUDY_UID}\n"
    return (record * 40000).encode()  # ~3.5 MiB, compresses well: several zstd blocks


def incompressible_content() -> bytes:
    rng = random.Random(7)
    data = bytearray(rng.randbytes(3 * MIB + 4321))
    marks = [s.encode() for s in PHI] + [s.encode("utf-16-le") for s in PHI]
    for i in range(64):  # PHI strings scattered through random bytes, across block boundaries
        mark = marks[i % len(marks)]
        pos = (i * len(data)) // 64 + (MIB - 7 if i % 8 == 0 else 0)
        pos = min(pos, len(data) - len(mark))
        data[pos:pos + len(mark)] = mark
    return bytes(data)


def write(path: Path, data: bytes, *, fsync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            os.fsync(f.fileno())


def populate(mnt: Path) -> dict[Path, bytes]:
    """Write PHI everywhere a PACS would; returns the files that must survive, with contents."""
    kept: dict[Path, bytes] = {}
    study = mnt / "incoming" / f"{NAME}_{PID}"
    study.mkdir(parents=True)
    dcm = study / f"{UID}.dcm"
    write(dcm, compressible_content(), fsync=True)
    kept[dcm] = compressible_content()
    raw = study / f"{UID}.raw.dcm"
    write(raw, incompressible_content())
    kept[raw] = incompressible_content()
    small = study / f"{PID}.txt"
    write(small, f"{NAME} {PID} {UID}\n".encode("utf-16-le"), fsync=True)
    kept[small] = f"{NAME} {PID} {UID}\n".encode("utf-16-le")

    # xattrs: PHI in names and values; one set then removed.
    os.setxattr(dcm, f"user.{NAME}", f"{PID} {UID}".encode())
    os.setxattr(study, f"user.study.{STUDY_UID}", NAME.encode())
    os.setxattr(raw, f"user.{OTHER_NAME}", OTHER_PID.encode())
    os.removexattr(raw, f"user.{OTHER_NAME}")

    # A symlink whose name and target are PHI.
    link = mnt / "incoming" / f"latest-{OTHER_NAME}"
    os.symlink(f"{NAME}_{PID}/{UID}.dcm", link)

    # Renames: the old names existed once and must not linger.
    other = mnt / "incoming" / f"{OTHER_NAME}_{OTHER_PID}"
    other.mkdir()
    tmp = other / f"{STUDY_UID}.dcm.part"
    write(tmp, f"{OTHER_NAME}|{OTHER_PID}|{STUDY_UID}".encode() * 1000, fsync=True)
    final = other / f"{STUDY_UID}.dcm"
    tmp.rename(final)
    kept[final] = f"{OTHER_NAME}|{OTHER_PID}|{STUDY_UID}".encode() * 1000
    renamed = mnt / "archive" / f"{NAME}_{STUDY_UID}"
    renamed.parent.mkdir()
    (mnt / "incoming" / f"{NAME}_{PID}").rename(renamed)
    kept = {(renamed / p.name if p.parent == study else p): d for p, d in kept.items()}

    # Deletions: a file, a whole study directory and a symlink.
    gone = mnt / "incoming" / f"deleted-{OTHER_PID}"
    gone.mkdir()
    write(gone / f"{OTHER_NAME}.dcm", (OTHER_NAME * 5000).encode(), fsync=True)
    (gone / f"{OTHER_NAME}.dcm").unlink()
    gone.rmdir()
    os.symlink(UID, mnt / f"{PID}-link")
    os.unlink(mnt / f"{PID}-link")
    return kept


def test_no_phi_at_rest_or_in_logs(fs: Fs) -> None:
    kept = populate(fs.mnt)
    # The PHI really is in the file system (otherwise the search below proves nothing).
    for path, data in kept.items():
        assert path.read_bytes() == data
    assert phi_found(b"".join(kept.values()))
    names = "\n".join(str(p) for p in fs.mnt.rglob("*"))
    assert NAME in names and UID in names and STUDY_UID in names
    link = fs.mnt / "incoming" / f"latest-{OTHER_NAME}"
    assert os.readlink(link) == f"{NAME}_{PID}/{UID}.dcm"
    dcm = fs.mnt / "archive" / f"{NAME}_{STUDY_UID}" / f"{UID}.dcm"
    assert os.getxattr(dcm, f"user.{NAME}") == f"{PID} {UID}".encode()

    status = run_vnafs("status", "--json", str(fs.mnt))
    json.loads(status.stdout)
    assert phi_found((status.stdout + status.stderr).encode()) == []
    status = run_vnafs("status", str(fs.mnt))
    assert phi_found((status.stdout + status.stderr).encode()) == []
    fs.umount()

    for extra in ([], ["--json"]):
        res = run_vnafs("fsck", *extra, "--key-file", str(fs.key), str(fs.hot), check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        assert phi_found((res.stdout + res.stderr).encode()) == []

    checked = 0
    leaks: list[str] = []
    for dirpath, dirnames, filenames in os.walk(fs.hot):
        for name in dirnames + filenames:
            leaks += [f"file name {dirpath}/{name}: {n}" for n in phi_found(name.encode())]
        for name in filenames:
            path = Path(dirpath) / name
            leaks += [f"{path}: {n}" for n in phi_found(path.read_bytes())]
            checked += 1
    assert leaks == []
    # blocks, meta/data.mdb, meta/lock.mdb, keyring, vnafs.toml, vnafs.log, FORMAT, lock
    assert checked >= 8
    assert (fs.hot / "vnafs.log").stat().st_size > 0
    assert (fs.hot / "meta" / "data.mdb").stat().st_size > 0
