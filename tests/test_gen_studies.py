"""Tests of tools/gen_studies.py, the seeded generator of DICOM studies.

Why: index, ingest and PHI tests trust this generator to produce valid Part 10 files with the
identity cases of a real archive (a PatientID shared by two issuers, an empty PatientID, UTF-8
names), realistic slice sizes and compressibility, PHI-free paths and byte-for-byte
reproducibility. These tests check exactly those promises on the "small" preset (about 15 MiB,
a fraction of a second to generate). The 60 MiB multi-frame object of "full" is only exercised
through a 2-frame make_study call here.
"""

from __future__ import annotations

import array
import io
import random
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import zstandard
from pydicom.uid import (
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

# tools/ is not installed; pytest's `pythonpath = ["."]` (pyproject.toml) makes it importable.
from tools import gen_studies as gs

ROOT = Path(__file__).resolve().parents[1]
UID_RE = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))*$", re.ASCII)
MIB = 1 << 20


def valid_uid(value: str) -> bool:
    return len(value) <= 64 and UID_RE.fullmatch(value) is not None


def files_under(out: Path) -> dict[Path, bytes]:
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[gs.GenInstance]]:
    out = tmp_path_factory.mktemp("small") / "out"
    return out, gs.generate(out, seed=7, preset="small")


def test_every_file_matches_what_generate_returned(small: tuple[Path, list[gs.GenInstance]]) -> None:
    out, written = small
    assert written
    assert set(files_under(out)) == {g.path for g in written}  # nothing else is written
    for g in written:
        raw = (out / g.path).read_bytes()
        assert g.size == len(raw)
        assert raw[128:132] == b"DICM"
        ds = pydicom.dcmread(io.BytesIO(raw))
        assert ds.SOPInstanceUID == g.sop_uid
        assert ds.StudyInstanceUID == g.study_uid
        assert ds.SeriesInstanceUID == g.series_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == g.sop_uid
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.Modality == g.modality
        assert ds.StudyDate == g.study_date
        assert re.fullmatch(r"\d{6}", ds.StudyTime)
        assert ds.AccessionNumber == g.accession
        assert str(ds.PatientName) == g.patient.name
        assert ds.PatientID == g.patient.patient_id
        assert ds.get("IssuerOfPatientID", "") == g.patient.issuer
        assert ds.PatientBirthDate == g.patient.birth_date
        assert ds.SeriesNumber >= 1 and ds.InstanceNumber >= 1
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        frames = int(ds.get("NumberOfFrames", 1))
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2 * frames
        assert max(array.array("H", ds.PixelData)) <= 4095  # fits BitsStored


def test_sop_classes_and_transfer_syntaxes(small: tuple[Path, list[gs.GenInstance]]) -> None:
    out, written = small
    seen = set()
    for g in written:
        ds = pydicom.dcmread(out / g.path, stop_before_pixels=True)
        assert ds.SOPClassUID == gs.MODALITIES[g.modality].single
        seen.add((g.modality, ds.file_meta.TransferSyntaxUID))
    assert {m for m, _ in seen} >= {"CT", "MR"}
    assert {"CR", "DX"} & {m for m, _ in seen}
    assert ("CT", ExplicitVRLittleEndian) in seen
    assert ("CT", ImplicitVRLittleEndian) in seen  # one study in implicit VR


def test_uids_valid_and_unique(small: tuple[Path, list[gs.GenInstance]]) -> None:
    _, written = small
    for g in written:
        for uid in (g.sop_uid, g.study_uid, g.series_uid):
            assert valid_uid(uid), uid
            assert uid.startswith(gs.UID_ROOT)
    assert len({g.sop_uid for g in written}) == len(written)
    # A series belongs to one study, and study and series UIDs never coincide with others.
    series_study = {g.series_uid: g.study_uid for g in written}
    assert all(series_study[g.series_uid] == g.study_uid for g in written)
    all_uids = {g.sop_uid for g in written} | set(series_study) | set(series_study.values())
    assert len(all_uids) == len(written) + len(series_study) + len(set(series_study.values()))


def test_same_seed_same_bytes_other_seed_other_uids(
        small: tuple[Path, list[gs.GenInstance]], tmp_path: Path) -> None:
    out, written = small
    again = gs.generate(tmp_path / "again", seed=7, preset="small")
    assert again == written  # paths are relative, so the records are equal too
    assert files_under(tmp_path / "again") == files_under(out)
    other = gs.generate(tmp_path / "other", seed=8, preset="small")
    assert not {g.sop_uid for g in other} & {g.sop_uid for g in written}
    assert not {g.study_uid for g in other} & {g.study_uid for g in written}


def test_identity_cases(small: tuple[Path, list[gs.GenInstance]]) -> None:
    out, written = small
    patients = {g.patient for g in written}
    assert 3 <= len(patients) <= 4
    by_id: dict[str, set[str]] = {}
    for p in patients:
        if p.patient_id:
            assert re.fullmatch(gs.PATIENT_ID_PREFIX + r"\d+", p.patient_id)
            by_id.setdefault(p.patient_id, set()).add(p.issuer)
    # Two patients share a PatientID under two different issuers.
    assert any(len(issuers) == 2 for issuers in by_id.values())
    # One patient has an empty PatientID, and its files carry the element, empty.
    empty = [g for g in written if not g.patient.patient_id]
    assert empty
    ds = pydicom.dcmread(out / empty[0].path, stop_before_pixels=True)
    assert "PatientID" in ds and ds.PatientID == ""
    # Non-ASCII names are written as UTF-8 with ISO_IR 192; ASCII ones exist too.
    assert any(not p.name.isascii() for p in patients)
    assert any(p.name.isascii() for p in patients)
    for g in written:
        ds = pydicom.dcmread(out / g.path, stop_before_pixels=True)
        if not g.patient.name.isascii():
            assert ds.SpecificCharacterSet == "ISO_IR 192"
            assert g.patient.name.encode() in (out / g.path).read_bytes()


def test_accession_issuer_on_most_studies(small: tuple[Path, list[gs.GenInstance]]) -> None:
    out, written = small
    with_issuer: dict[str, bool] = {}
    for g in written:
        assert g.accession.startswith(gs.ACCESSION_PREFIX)
        ds = pydicom.dcmread(out / g.path, stop_before_pixels=True)
        seq = ds.get("IssuerOfAccessionNumberSequence")
        with_issuer[g.study_uid] = bool(seq) and seq[0].LocalNamespaceEntityID == gs.ACCESSION_ISSUER
    assert sum(with_issuer.values()) > len(with_issuer) / 2
    assert not all(with_issuer.values())  # and one study without, as some modalities send


def test_ct_slice_size_and_compressibility(small: tuple[Path, list[gs.GenInstance]]) -> None:
    out, written = small
    ct = [g for g in written if g.modality == "CT"]
    assert len({g.series_uid for g in ct if g.patient == ct[0].patient}) == 1
    assert len([g for g in ct if g.series_uid == ct[0].series_uid]) >= 15
    raw = (out / ct[0].path).read_bytes()
    assert 0.45 * MIB <= len(raw) <= 0.6 * MIB
    for level in (1, 3):  # vnafs's default level, and zstd's
        ratio = len(raw) / len(zstandard.ZstdCompressor(level=level).compress(raw))
        assert 1.3 <= ratio <= 4, (level, ratio)
    # Every slice has its own noise: no two pixel data blocks are equal (no deduplication).
    assert len({(out / g.path).read_bytes()[-4096:] for g in ct}) == len(ct)


def test_paths_contain_no_phi(small: tuple[Path, list[gs.GenInstance]]) -> None:
    out, written = small
    paths = [str(p) for p in files_under(out)]
    assert all(re.fullmatch(r"p\d\d/s\d\d/se\d\d/\d{4}\.dcm", p) for p in paths)
    secrets = set()
    for g in written:
        secrets |= {g.patient.patient_id, g.patient.name, g.patient.birth_date, g.accession,
                    g.sop_uid, g.study_uid}
        secrets |= set(g.patient.name.replace("=", "^").split("^"))
    secrets.discard("")
    for p in paths:
        for s in secrets:
            assert s not in p


def test_generate_refuses_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        gs.generate(tmp_path, seed=1)
    with pytest.raises(ValueError):
        gs.generate(tmp_path / "new", preset="huge")


def test_write_ct_series(tmp_path: Path) -> None:
    written = gs.write_ct_series(tmp_path / "ct", seed=3, count=5)
    assert len(written) == 5
    assert len({g.series_uid for g in written}) == 1
    assert len({g.study_uid for g in written}) == 1
    assert len({g.sop_uid for g in written}) == 5
    positions = []
    for n, g in enumerate(written, start=1):
        ds = pydicom.dcmread(tmp_path / "ct" / g.path, stop_before_pixels=True)
        assert ds.SOPClassUID == gs.MODALITIES["CT"].single
        assert (ds.Rows, ds.Columns, ds.InstanceNumber) == (512, 512, n)
        assert 0.45 * MIB <= g.size <= 0.6 * MIB
        positions.append(float(ds.ImagePositionPatient[2]))
    assert positions == sorted(set(positions))


def test_make_study_multiframe_and_errors() -> None:
    patient = gs.make_patients(5, 1)[0]
    objects = gs.make_study(random.Random(1), patient, "CT", instances=1, rows=64, cols=64,
                            frames=2, accession="ACC1", study_date="20200102")
    assert not isinstance(objects, list)  # lazy: big studies are never held in memory
    (name, data), = list(objects)
    assert name == "se01/0001.dcm"
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == EnhancedCTImageStorage
    assert ds.NumberOfFrames == 2
    assert len(ds.PerFrameFunctionalGroupsSequence) == 2
    assert len(ds.PixelData) == 64 * 64 * 2 * 2
    assert (ds.AccessionNumber, ds.StudyDate) == ("ACC1", "20200102")
    two = list(gs.make_study(random.Random(1), patient, "MR", instances=2, rows=32, cols=32,
                             series=2))
    assert [n for n, _ in two] == ["se01/0001.dcm", "se01/0002.dcm", "se02/0001.dcm",
                                   "se02/0002.dcm"]
    with pytest.raises(ValueError):
        gs.make_study(random.Random(1), patient, "US", instances=1)
    with pytest.raises(ValueError):
        gs.make_study(random.Random(1), patient, "CR", instances=1, frames=2)
    with pytest.raises(ValueError):
        gs.make_study(random.Random(1), patient, "CT", instances=0)


def test_make_patients() -> None:
    patients = gs.make_patients(11, 20)
    assert patients == gs.make_patients(11, 20)
    assert patients[:4] == gs.make_patients(11, 4)
    assert len({(p.patient_id, p.issuer, p.name) for p in patients}) == 20
    assert len({p.name for p in patients}) == 20
    assert patients[0].patient_id == patients[1].patient_id
    assert patients[0].issuer != patients[1].issuer
    assert patients[2].patient_id == ""
    assert all(re.fullmatch(r"\d{8}", p.birth_date) for p in patients)
    assert gs.make_patients(12, 1)[0].patient_id != patients[0].patient_id


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.gen_studies", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli(tmp_path: Path) -> None:
    res = run_cli(str(tmp_path / "out"), "--seed", "4", "--ct-slices", "3")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1
    assert res.stdout.startswith("3 files, ")
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 3
    res = run_cli(str(tmp_path / "small"), "--preset", "small")
    assert res.returncode == 0, res.stderr
    for bad in (["--preset", "huge"], ["--ct-slices", "0"], ["--seed", "x"],
                ["--preset", "small", "--ct-slices", "2"], []):
        res = run_cli(str(tmp_path / "bad"), *bad) if bad else run_cli()
        assert res.returncode == 2, (bad, res)
        assert len(res.stderr.splitlines()) == 1, (bad, res.stderr)
        assert "Traceback" not in res.stderr
    res = run_cli(str(tmp_path / "out"))  # not empty
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1
