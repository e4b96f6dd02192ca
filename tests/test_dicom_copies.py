"""Several files with one SOP Instance UID: duplicates and conflicts, through a real mount.

Why this exists: a VNA receives the same instance through several senders all the time, and
every sender writes its own file meta information (group 0002). Before, the index compared
whole files and flagged such copies as SOP conflicts (156 of 158 "conflicts" in one run were
this), so a real conflict drowned in noise. Now two files are the same instance when their data
sets (everything outside group 0002) are equal; only a difference there is a conflict, and the
report names the differing elements by tag, never by value. Duplicates are not shown twice: the
views show the first-stored copy (docs/architecture.md section 8).
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
from pathlib import Path

import pytest
from conftest import Fs, run_vnafs
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from test_phi import phi_found

UID_ROOT = "1.2.826.0.1.3680043.8.498."
SOP = UID_ROOT + "777.1.1.1"
STUDY = UID_ROOT + "777.1"
SERIES = UID_ROOT + "777.1.1"
# Values that must never reach the log or the output of `find --problems`.
DESCRIPTION = "VNAFSDESC^ORIGINAL"
OTHER_DESCRIPTION = "VNAFSDESC^EDITED"
PATIENT = "VNAFSCOPY^PATIENT"
PATIENT_ID = "VNAFS-COPY-0001"
PROBLEM_XATTR = "user.vnafs.dicom.problem"


def instance(**changes: object) -> Dataset:
    """One small CT slice (64x64, 16-bit) with fixed UIDs; `changes` set data elements."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = SOP
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "VNAFSACC7"
    ds.Modality = "CT"
    ds.SeriesDescription = DESCRIPTION
    ds.PatientName = PATIENT
    ds.PatientID = PATIENT_ID
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rnd = random.Random("vnafs-copies")
    ds.PixelData = b"".join(rnd.randrange(4096).to_bytes(2, "little") for _ in range(64 * 64))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def encode(ds: Dataset, *, implementation: str | None = None, implicit: bool = False) -> bytes:
    """The file as a sender would write it: `implementation` names another writer in the file
    meta information (as Orthanc or storescp put their own)."""
    if implementation is not None:
        ds.file_meta.ImplementationClassUID = UID_ROOT + "999." + str(len(implementation))
        ds.file_meta.ImplementationVersionName = implementation
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=implicit)
    return out.getvalue()


def series_dir(fs: Fs) -> Path:
    return fs.mnt / ".dicom" / "by-study" / STUDY / SERIES


def problems(fs: Fs) -> dict[int, dict]:
    res = run_vnafs("find", str(fs.mnt), "--problems", "--json", "--wait")
    return {p["ino"]: p for p in json.loads(res.stdout)}


def ino(path: Path) -> int:
    return os.stat(path).st_ino


def assert_no_values(text: str, *, uids: bool = False) -> None:
    """No value of the differing elements, nor the patient's, in `text`; no UID either unless
    `uids` (the output of `find` names the instance and study it is about: that is its point)."""
    values = [DESCRIPTION, OTHER_DESCRIPTION, PATIENT, PATIENT_ID]
    for value in values if uids else [*values, SOP, STUDY]:
        assert value not in text
    assert phi_found(text.encode()) == []


def test_same_instance_with_other_file_meta_is_a_duplicate_not_a_conflict(fs: Fs) -> None:
    original = fs.mnt / "original.dcm"
    original.write_bytes(encode(instance()))
    fs.wait_indexed()
    # the same instance as another writer stores it: only group 0002 differs
    other = fs.mnt / "orthanc.dcm"
    other.write_bytes(encode(instance(), implementation="ORTHANC_1_10"))
    assert other.read_bytes() != original.read_bytes()
    st = fs.wait_indexed()
    assert st["sop_conflict"] == 0 and st["instances"] == 1 and st["studies"] == 1
    assert problems(fs) == {}
    # the views show the first-stored copy once; the duplicate has no view names
    assert os.listdir(series_dir(fs)) == [f"{SOP}.dcm"]
    assert ino(series_dir(fs) / f"{SOP}.dcm") == ino(original)
    assert os.stat(original).st_nlink == 1 + 2 + 1  # its name, by-study, by-date, by-accession
    assert os.stat(other).st_nlink == 1
    found = json.loads(run_vnafs("find", str(fs.mnt), "--study", STUDY, "--json").stdout)
    assert found[0]["instances"] == 1
    # the shown copy goes: the duplicate takes its place, at once
    os.unlink(original)
    assert ino(series_dir(fs) / f"{SOP}.dcm") == ino(other)
    assert os.stat(other).st_nlink == 4
    st = fs.wait_indexed()
    assert st["instances"] == 1 and st["sop_conflict"] == 0
    # a file written implicit VR holds the same values in other bytes: still a duplicate
    (fs.mnt / "implicit.dcm").write_bytes(encode(instance(), implicit=True))
    st = fs.wait_indexed()
    assert st["sop_conflict"] == 0 and st["instances"] == 1
    assert os.listdir(series_dir(fs)) == [f"{SOP}.dcm"]
    assert st["since_mount_dataset_diffs"] >= 1  # compared element by element
    assert_no_values(fs.log())


def test_changed_element_is_a_conflict_naming_only_that_tag(fs: Fs) -> None:
    original = fs.mnt / "original.dcm"
    original.write_bytes(encode(instance()))
    fs.wait_indexed()
    edited = fs.mnt / "edited.dcm"
    edited.write_bytes(encode(instance(SeriesDescription=OTHER_DESCRIPTION),
                              implementation="OTHER_WRITER"))
    st = fs.wait_indexed()
    assert st["sop_conflict"] == 2 and st["instances"] == 2
    found = problems(fs)
    a, b = ino(original), ino(edited)
    assert set(found) == {a, b}
    for me, them in ((a, b), (b, a)):
        assert found[me]["kind"] == "sop_conflict"
        assert found[me]["tags"] == ["(0008,103E)"]  # SeriesDescription, and only it
        assert found[me]["copies"] == [them] and found[me]["in_views"]
    # both are shown: the first-stored under the plain name
    assert sorted(os.listdir(series_dir(fs))) == sorted([f"{SOP}.dcm", f"{SOP}~{b}.dcm"])
    assert ino(series_dir(fs) / f"{SOP}.dcm") == a
    text = run_vnafs("find", str(fs.mnt), "--problems").stdout
    assert "(0008,103E)" in text and f"inode {a}" in text and f"inode {b}" in text
    assert_no_values(text + json.dumps(found), uids=True)
    # a changed pixel instead: a conflict in the pixel data alone
    os.unlink(edited)
    assert fs.wait_indexed()["sop_conflict"] == 0
    pixels = bytearray(instance().PixelData)
    pixels[1000] ^= 0x01
    (fs.mnt / "pixel.dcm").write_bytes(encode(instance(PixelData=bytes(pixels))))
    assert fs.wait_indexed()["sop_conflict"] == 2
    assert {tuple(p["tags"]) for p in problems(fs).values()} == {("(7FE0,0010)",)}
    assert_no_values(fs.log())


def test_copies_written_together_are_compared(fs: Fs) -> None:
    """Copies indexed in one batch cannot see each other before it commits: the index asks
    for them to be compared again, and the outcome is the same as one by one."""
    dup = encode(instance(), implementation="SENDER_B")
    edited = encode(instance(SeriesDescription=OTHER_DESCRIPTION))
    for name, data in (("a.dcm", encode(instance())), ("b.dcm", dup), ("c.dcm", edited)):
        (fs.mnt / name).write_bytes(data)
    st = fs.wait_indexed()
    a, b, c = (ino(fs.mnt / n) for n in ("a.dcm", "b.dcm", "c.dcm"))
    found = problems(fs)
    # a and b are one version (a shown), c another: all three flagged, two shown
    assert set(found) == {a, b, c} and st["sop_conflict"] == 3
    assert all(p["tags"] == ["(0008,103E)"] for p in found.values())
    assert not found[b]["in_views"] and found[a]["in_views"] and found[c]["in_views"]
    assert sorted(os.listdir(series_dir(fs))) == sorted([f"{SOP}.dcm", f"{SOP}~{c}.dcm"])
    # removing the edited copy leaves two copies of one version: no conflict, one shown
    os.unlink(fs.mnt / "c.dcm")
    st = fs.wait_indexed()
    assert st["sop_conflict"] == 0 and problems(fs) == {}
    assert os.listdir(series_dir(fs)) == [f"{SOP}.dcm"]


def test_reindex_keeps_what_was_compared_without_reading_again(fs: Fs) -> None:
    (fs.mnt / "a.dcm").write_bytes(encode(instance()))
    fs.wait_indexed()
    (fs.mnt / "b.dcm").write_bytes(encode(instance(), implementation="SENDER_B"))
    (fs.mnt / "c.dcm").write_bytes(encode(instance(SeriesDescription=OTHER_DESCRIPTION)))
    before = fs.wait_indexed()
    found = problems(fs)
    listing = sorted(os.listdir(series_dir(fs)))
    run_vnafs("reindex", str(fs.mnt))
    after = fs.wait_indexed()
    assert problems(fs) == found and sorted(os.listdir(series_dir(fs))) == listing
    # every file came from its stored header, and no data set was read or compared again
    assert after["since_mount_dataset_digests"] == before["since_mount_dataset_digests"]
    assert after["since_mount_dataset_diffs"] == before["since_mount_dataset_diffs"]
    assert after["instances"] == before["instances"] == 2


def test_problem_attribute_on_view_entries(fs: Fs) -> None:
    """`user.vnafs.dicom.problem` answers on a flagged file, through the views and its own
    path: an image without pixel data (shown, flagged incomplete) and a conflict. Needs the
    getxattr hook in vnafs/fs/operations.py (derived attributes, fs/views.py)."""
    stripped = instance(SOPInstanceUID=SOP + ".2")
    del stripped.PixelData
    stripped.file_meta.MediaStorageSOPInstanceUID = stripped.SOPInstanceUID
    (fs.mnt / "stripped.dcm").write_bytes(encode(stripped))
    (fs.mnt / "a.dcm").write_bytes(encode(instance()))
    (fs.mnt / "b.dcm").write_bytes(encode(instance(SeriesDescription=OTHER_DESCRIPTION)))
    st = fs.wait_indexed()
    assert st["incomplete"] == 1 and st["sop_conflict"] == 2 and st["instances"] == 3
    leaf = series_dir(fs) / f"{SOP}.2.dcm"
    assert ino(leaf) == ino(fs.mnt / "stripped.dcm")
    want = b"incomplete: image storage SOP class without pixel data"
    assert os.getxattr(leaf, PROBLEM_XATTR) == want
    assert os.getxattr(fs.mnt / "stripped.dcm", PROBLEM_XATTR) == want
    conflict = os.getxattr(series_dir(fs) / f"{SOP}.dcm", PROBLEM_XATTR).decode()
    assert conflict.startswith("sop_conflict: ") and conflict.endswith(" in (0008,103E)")
    assert_no_values(conflict)
    # derived: not listed (cp -a must not copy it), not settable, absent on clean files
    assert PROBLEM_XATTR not in os.listxattr(leaf)
    with pytest.raises(OSError) as exc:
        os.setxattr(leaf, PROBLEM_XATTR, b"fixed")
    assert exc.value.errno in (errno.EPERM, errno.EROFS)
    with pytest.raises(OSError) as exc:
        os.setxattr(fs.mnt / "a.dcm", PROBLEM_XATTR, b"fixed")
    assert exc.value.errno == errno.EPERM
    os.unlink(fs.mnt / "b.dcm")
    fs.wait_indexed()
    with pytest.raises(OSError) as exc:
        os.getxattr(fs.mnt / "a.dcm", PROBLEM_XATTR)
    assert exc.value.errno == errno.ENODATA
    # the stripped instance is shown in find's output too, counted as incomplete
    found = json.loads(run_vnafs("find", str(fs.mnt), "--study", STUDY, "--json").stdout)
    assert found[0]["incomplete"] == 1 and found[0]["instances"] == 2
    assert "1 INCOMPLETE" in run_vnafs("find", str(fs.mnt), "--study", STUDY).stdout
    assert dcmread(leaf, stop_before_pixels=True).SOPInstanceUID == SOP + ".2"
