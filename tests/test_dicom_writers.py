"""Real DICOM writers into a real vnafs mount: dcmtk storescp (plain, --fork, +B, resend) and
Orthanc (StorageDirectory on the mount, SQLite index on local disk).

Every server and client runs inside a private network namespace (tests/dicomnet.py), so nothing
listens outside it. The instances are generated here with pydicom: 2 patients/studies x 2 series x
3 CT slices, explicit VR little endian, 64x64 16-bit pixel data.

What holds byte-exact (measured with dcmtk 3.6.7 and Orthanc 1.10): both storescp modes and
Orthanc's C-STORE path write their own file meta group (ImplementationClassUID and VersionName of
DCMTK, storescp adds SourceApplicationEntityTitle), so the whole file never equals the sent one;
the data set after group 0002 is byte-identical to the sent data set for all of them. An instance
uploaded to Orthanc over REST is stored exactly as posted. What vnafs returns is always compared
with what the writer wrote, byte for byte.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Fs, alive, run_vnafs
from dicomnet import Netns, Orthanc, StoreSCP, group_members, orthanc, storescp, storescu
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

UID_ROOT = "1.2.826.0.1.3680043.8.498."
STUDIES, SERIES, INSTANCES = 2, 2, 3
SCP_PORT = 11112


# --- test data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    path: Path
    sop: str
    study: str
    series: str


def _uid(*parts: object) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=["vnafs-test-writers", *map(str, parts)])


def make_instances(outdir: Path, *, version: str = "v1", size: int = 64,
                   studies: int = STUDIES, series: int = SERIES,
                   instances: int = INSTANCES) -> list[Sent]:
    """Small CT instances. The same (study, series, instance) always gets the same UIDs, so a
    second `version` (other pixels, other size) is a resend of the same instances."""
    outdir.mkdir(parents=True, exist_ok=True)
    sent = []
    for st in range(studies):
        for se in range(series):
            for i in range(instances):
                ds = Dataset()
                ds.SpecificCharacterSet = "ISO_IR 100"
                ds.SOPClassUID = CTImageStorage
                ds.SOPInstanceUID = _uid(st, se, i)
                ds.StudyDate = "20240102"
                ds.StudyTime = "101500"
                ds.AccessionNumber = f"VNAFSACC{st}"
                ds.Modality = "CT"
                ds.PatientName = f"VNAFSWRITER^PATIENT{st}^{version.upper()}"
                ds.PatientID = f"VNAFS-WR-{st:03d}"
                ds.PatientBirthDate = "19700101"
                ds.PatientSex = "O"
                ds.StudyInstanceUID = _uid(st)
                ds.SeriesInstanceUID = _uid(st, se)
                ds.StudyID = str(st + 1)
                ds.SeriesNumber = se + 1
                ds.InstanceNumber = i + 1
                ds.ImagePositionPatient = [0, 0, float(i)]
                ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                ds.SliceThickness = 1
                ds.PixelSpacing = [0.5, 0.5]
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.Rows = size
                ds.Columns = size
                ds.BitsAllocated = 16
                ds.BitsStored = 12
                ds.HighBit = 11
                ds.PixelRepresentation = 0
                ds.RescaleIntercept = -1024
                ds.RescaleSlope = 1
                rnd = random.Random(f"{version}/{st}/{se}/{i}")
                # 12-bit values in 16-bit words: high byte plane compressible, low one random
                ds.PixelData = b"".join(rnd.randrange(4096).to_bytes(2, "little")
                                        for _ in range(size * size))
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = ds.SOPClassUID
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta = meta
                path = outdir / f"{version}_st{st}_se{se}_i{i}.dcm"
                ds.save_as(path, enforce_file_format=True)
                sent.append(Sent(path, ds.SOPInstanceUID, ds.StudyInstanceUID,
                                 ds.SeriesInstanceUID))
    return sent


def split_meta(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta group, data set) of a DICOM file with a group length element."""
    assert data[128:132] == b"DICM", "no DICM prefix"
    assert data[132:138] == b"\x02\x00\x00\x00UL", "no (0002,0000) group length first"
    end = 144 + int.from_bytes(data[140:144], "little")
    return data[:end], data[end:]


def assert_same_instance(sent: Path, got: bytes, what: str) -> None:
    """The received file carries the sent data set byte for byte (file meta may differ)."""
    want = sent.read_bytes()
    a, b = dcmread(io.BytesIO(want)), dcmread(io.BytesIO(got))
    for kw in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID",
               "PatientName", "PatientID", "InstanceNumber", "Rows"):
        assert a[kw].value == b[kw].value, f"{what}: {kw}"
    assert a.PixelData == b.PixelData, f"{what}: PixelData"
    assert b.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID, what
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID, what
    assert split_meta(got)[1] == split_meta(want)[1], f"{what}: data set bytes differ"


def regular_files(root: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            if stat.S_ISREG(p.lstat().st_mode):
                out.append(p)
    return sorted(out)


def storescp_layout(sent: list[Sent], *, by_study: bool = True) -> set[str]:
    """Where storescp -su STUDY -fe .dcm puts each instance (flat without -su)."""
    return {(f"STUDY_{s.study}/" if by_study else "") + f"CT.{s.sop}.dcm" for s in sent}


def check_storescp_tree(incoming: Path, sent: list[Sent], *, by_study: bool = True) -> None:
    files = regular_files(incoming)
    rel = sorted(str(p.relative_to(incoming)) for p in files)
    assert len(rel) == len(set(rel)) == len(sent)
    assert set(rel) == storescp_layout(sent, by_study=by_study)
    for s in sent:
        name = (f"STUDY_{s.study}/" if by_study else "") + f"CT.{s.sop}.dcm"
        assert_same_instance(s.path, (incoming / name).read_bytes(), name)


def assert_clean_scp_log(scp: StoreSCP) -> None:
    errors = [line for line in scp.log().splitlines() if line.startswith(("E:", "F:"))]
    assert not errors, "storescp reported errors:\n" + "\n".join(errors[-20:])


def check_views(fs: Fs, files: list[Path]) -> None:
    """Every stored instance is indexed, and its by-study view name is the same inode."""
    st = fs.wait_indexed()
    assert st["instances"] == len(files), st
    assert st["incomplete"] == st["invalid"] == st["sop_conflict"] == 0, st
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        leaf = (fs.mnt / ".dicom" / "by-study" / ds.StudyInstanceUID / ds.SeriesInstanceUID
                / f"{ds.SOPInstanceUID}.dcm")
        assert os.stat(leaf).st_ino == os.stat(f).st_ino, f


def vnafs_problems(fs: Fs) -> list[str]:
    return [line for line in fs.log().splitlines()
            if "Traceback" in line or " level=error " in line or " level=critical " in line]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[Netns]:
    with Netns() as ns:
        yield ns
    assert not alive(ns.pid)


@pytest.fixture
def sent(workdir: Path) -> list[Sent]:
    return make_instances(workdir / "sent")


# --- dcmtk storescp -------------------------------------------------------------------------


def test_storescp_sorted_by_study(fs: Fs, netns: Netns, sent: list[Sent]) -> None:
    """storescp -su STUDY -fe .dcm: every instance arrives once, data set byte-exact, and stays
    so across a remount (storescp never fsyncs: close() must be enough)."""
    incoming = fs.mnt / "incoming"
    incoming.mkdir()
    with storescp(netns, incoming, SCP_PORT) as scp:
        storescu(netns, SCP_PORT, [s.path for s in sent])
        assert_clean_scp_log(scp)
        # storescp answered each C-STORE right after close(): the files are complete now
        check_storescp_tree(incoming, sent)
    assert not alive(scp.proc.pid)
    assert sorted(os.listdir(incoming)) == sorted(f"STUDY_{_uid(st)}" for st in range(STUDIES))
    check_views(fs, regular_files(incoming))
    fs.umount()
    fs.mount()
    check_storescp_tree(incoming, sent)
    assert not vnafs_problems(fs), "\n".join(vnafs_problems(fs))


def test_storescp_fork_concurrent_clients(fs: Fs, netns: Netns, sent: list[Sent]) -> None:
    """storescp --fork with 3 clients at once: concurrent mkdir of the same study folders, then
    the same instances written by concurrent processes (O_TRUNC over each other)."""
    incoming = fs.mnt / "incoming"
    incoming.mkdir()
    clients = 3
    with storescp(netns, incoming, SCP_PORT, fork=True) as scp:
        # Round 1: disjoint slices, every client sends into both studies.
        slices = [[s.path for s in sent[c::clients]] for c in range(clients)]
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda files: storescu(netns, SCP_PORT, files), slices))
        check_storescp_tree(incoming, sent)
        # Round 2: every client sends everything, in a different order.
        orders = [[s.path for s in sent], [s.path for s in reversed(sent)],
                  [s.path for s in sent[6:] + sent[:6]]]
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda files: storescu(netns, SCP_PORT, files), orders))
        assert_clean_scp_log(scp)
        check_storescp_tree(incoming, sent)
    check_views(fs, regular_files(incoming))
    fs.umount()
    fs.mount()
    check_storescp_tree(incoming, sent)
    assert not vnafs_problems(fs), "\n".join(vnafs_problems(fs))


def test_storescp_bit_preserving(fs: Fs, workdir: Path, netns: Netns) -> None:
    """storescp +B streams the received data set to the file in many small writes. dcmtk does
    not allow +B with -su, so the files land flat. Larger slices (256x256) so that each file takes
    dozens of writes."""
    big = make_instances(workdir / "big", version="big", size=256, series=1)
    incoming = fs.mnt / "incoming"
    incoming.mkdir()
    with storescp(netns, incoming, SCP_PORT, study_prefix=None, bit_preserving=True) as scp:
        storescu(netns, SCP_PORT, [s.path for s in big])
        assert_clean_scp_log(scp)
        check_storescp_tree(incoming, big, by_study=False)
    for s in big:
        got = (incoming / f"CT.{s.sop}.dcm").read_bytes()
        meta = dcmread(io.BytesIO(got)).file_meta
        # +B keeps the data set as received, but the meta group is storescp's own, so the file
        # as a whole is not the sent file.
        assert str(meta.ImplementationVersionName).startswith("OFFIS_DCMBP")  # dcmtk +B
        assert meta.SourceApplicationEntityTitle == "STORESCU"
        assert got != s.path.read_bytes()
    check_views(fs, regular_files(incoming))
    fs.umount()
    fs.mount()
    check_storescp_tree(incoming, big, by_study=False)
    assert not vnafs_problems(fs), "\n".join(vnafs_problems(fs))


def test_storescp_resend_overwrites(fs: Fs, workdir: Path, netns: Netns,
                                    sent: list[Sent]) -> None:
    """A resend reopens the same name with O_TRUNC: identical resend, then a resend of the same
    SOP instances with smaller, different content; never a duplicate or a stale tail."""
    incoming = fs.mnt / "incoming"
    incoming.mkdir()
    files = [s.path for s in sent]
    with storescp(netns, incoming, SCP_PORT) as scp:
        storescu(netns, SCP_PORT, files)
        check_storescp_tree(incoming, sent)
        inodes = {p: p.stat().st_ino for p in regular_files(incoming)}

        storescu(netns, SCP_PORT, files)
        check_storescp_tree(incoming, sent)
        assert {p: p.stat().st_ino for p in regular_files(incoming)} == inodes

        smaller = make_instances(workdir / "v2", version="v2", size=32)
        assert [s.sop for s in smaller] == [s.sop for s in sent]
        storescu(netns, SCP_PORT, [s.path for s in smaller])
        check_storescp_tree(incoming, smaller)
        assert {p: p.stat().st_ino for p in regular_files(incoming)} == inodes
        for s in smaller:
            got = incoming / f"STUDY_{s.study}" / f"CT.{s.sop}.dcm"
            assert got.stat().st_size < 9000
        assert_clean_scp_log(scp)
    check_views(fs, regular_files(incoming))
    fs.umount()
    fs.mount()
    check_storescp_tree(incoming, smaller)
    assert {p: p.stat().st_ino for p in regular_files(incoming)} == inodes
    assert not vnafs_problems(fs), "\n".join(vnafs_problems(fs))


# --- Orthanc --------------------------------------------------------------------------------

ORTHANC_FILE = re.compile(r"^([0-9a-f]{2})/([0-9a-f]{2})/(\1\2[0-9a-f]{4}-[0-9a-f]{4}-"
                          r"[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


def orthanc_storage(storage: Path) -> dict[str, bytes]:
    """SOPInstanceUID -> bytes of every file in Orthanc's storage area (layout checked)."""
    out: dict[str, bytes] = {}
    for p in regular_files(storage):
        rel = str(p.relative_to(storage))
        assert ORTHANC_FILE.match(rel), f"unexpected file in the storage area: {rel}"
        data = p.read_bytes()
        sop = dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        assert sop not in out, f"two files for {sop}"
        out[sop] = data
    return out


def orthanc_instances(pacs: Orthanc) -> dict[str, bytes]:
    """SOPInstanceUID -> GET /instances/{id}/file for every instance Orthanc knows."""
    out: dict[str, bytes] = {}
    for oid in pacs.json("GET", "/instances"):
        sop = pacs.json("GET", f"/instances/{oid}")["MainDicomTags"]["SOPInstanceUID"]
        out[sop] = pacs.rest("GET", f"/instances/{oid}/file")
    return out


def test_orthanc_store_remount_delete(fs: Fs, workdir: Path, netns: Netns,
                                      sent: list[Sent]) -> None:
    """Orthanc with its storage area on vnafs (fdatasync per file, SyncStorageArea) and its
    index on local disk: store by C-STORE and REST, read back, restart Orthanc across a
    remount, read back, delete everything."""
    storage = fs.mnt / "orthanc"
    index = workdir / "orthanc-index"
    owork = workdir / "orthanc"
    by_sop = {s.sop: s for s in sent}
    cstore = [s for s in sent if s.study == _uid(0)]
    posted = [s for s in sent if s.study == _uid(1)]

    with orthanc(netns, storage, index, owork) as pacs:
        storescu(netns, pacs.dicom_port, [s.path for s in cstore], aec=pacs.aet)
        for s in posted:
            reply = pacs.json("POST", "/instances", s.path.read_bytes())
            assert reply["Status"] == "Success", reply
        log = pacs.log_tail()
        served = orthanc_instances(pacs)
        assert sorted(served) == sorted(by_sop), log
        on_disk = orthanc_storage(storage)
        assert sorted(on_disk) == sorted(by_sop), log
        for sop, body in served.items():
            # what Orthanc wrote to vnafs is what it serves
            assert body == on_disk[sop], f"{sop}: REST file != storage file\n{log}"
            assert_same_instance(by_sop[sop].path, body, sop)
        for s in posted:
            # REST uploads are stored as posted: the whole file, byte for byte
            assert served[s.sop] == s.path.read_bytes(), s.sop
        check_views(fs, regular_files(storage))
    assert pacs.proc.returncode == 0, pacs.log_tail()

    fs.umount()
    fs.mount()

    with orthanc(netns, storage, index, owork) as pacs:
        assert orthanc_instances(pacs) == served, pacs.log_tail()
        assert orthanc_storage(storage) == on_disk

        for oid in pacs.json("GET", "/instances"):
            pacs.rest("DELETE", f"/instances/{oid}")
        assert pacs.json("GET", "/instances") == [], pacs.log_tail()
        assert pacs.json("GET", "/studies") == [], pacs.log_tail()
        left = regular_files(storage)
        assert not left, f"files left after DELETE: {left}\n{pacs.log_tail()}"
        errors = [line for line in pacs.log().splitlines() if line.startswith("E")]
        assert not errors, "\n".join(errors)
        assert fs.wait_indexed()["instances"] == 0
        assert os.listdir(fs.mnt / ".dicom" / "by-study") == []
    assert pacs.proc.returncode == 0, pacs.log_tail()
    assert not regular_files(storage)
    assert not vnafs_problems(fs), "\n".join(vnafs_problems(fs))


def test_orthanc_copy_and_copied_original_are_one_instance(fs: Fs, workdir: Path,
                                                            netns: Netns,
                                                            sent: list[Sent]) -> None:
    """The same instance stored by Orthanc (C-STORE: Orthanc writes its own file meta
    information) and copied from its original file next to it is one instance, not a SOP
    conflict: the views show Orthanc's copy (stored first) once. An original with one data
    element changed is a conflict that names that element, and only it."""
    storage = fs.mnt / "orthanc"
    with orthanc(netns, storage, workdir / "orthanc-index", workdir / "orthanc") as pacs:
        storescu(netns, pacs.dicom_port, [s.path for s in sent], aec=pacs.aet)
        assert sorted(orthanc_storage(storage)) == sorted(s.sop for s in sent), pacs.log_tail()
    assert pacs.proc.returncode == 0, pacs.log_tail()
    fs.wait_indexed()
    stored = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
              for p in regular_files(storage)}
    originals = fs.mnt / "originals"
    originals.mkdir()
    for s in sent:
        shutil.copyfile(s.path, originals / s.path.name)
    st = fs.wait_indexed()
    assert st["sop_conflict"] == 0 and st["instances"] == len(sent), st
    for s in sent:
        copy = originals / s.path.name
        assert copy.read_bytes() != stored[s.sop].read_bytes()  # other file meta
        series = fs.mnt / ".dicom" / "by-study" / s.study / s.series
        assert [n for n in os.listdir(series) if n.startswith(s.sop)] == [f"{s.sop}.dcm"]
        assert os.stat(series / f"{s.sop}.dcm").st_ino == os.stat(stored[s.sop]).st_ino
        assert os.stat(copy).st_nlink == 1  # a duplicate: no view names
    ds = dcmread(sent[0].path)
    ds.SeriesDescription = "VNAFS EDITED DESCRIPTION"
    ds.save_as(originals / "edited.dcm", enforce_file_format=True)
    st = fs.wait_indexed()
    # Orthanc's copy, the copied original (its duplicate) and the edited file
    assert st["sop_conflict"] == 3 and st["instances"] == len(sent) + 1, st
    found = json.loads(run_vnafs("find", str(fs.mnt), "--problems", "--json").stdout)
    assert {tuple(p["tags"]) for p in found} == {("(0008,103E)",)}
    assert "VNAFS EDITED" not in json.dumps(found) and "VNAFS EDITED" not in fs.log()
    assert not vnafs_problems(fs), "\n".join(vnafs_problems(fs))


def test_helpers_stop_everything(workdir: Path) -> None:
    """The context managers leave no process behind, also when the body raises."""
    outdir = workdir / "out"
    outdir.mkdir()
    with Netns() as ns:
        with pytest.raises(RuntimeError, match="boom"):
            with storescp(ns, outdir, SCP_PORT, fork=True) as scp:
                storescu(ns, SCP_PORT, [p.path for p in make_instances(workdir / "s",
                                                                       studies=1, series=1,
                                                                       instances=1)])
                raise RuntimeError("boom")
        deadline = time.monotonic() + 5
        while group_members(scp.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(scp.proc.pid)
        assert not group_members(scp.proc.pid)
    assert not alive(ns.pid)
