"""The DICOM index and the `/.dicom/` views, through a real mount (issue 3).

Files are written the way PACS writers do (plain create/write/close, O_TRUNC resends, renames,
unlinks, hard links) and the index is checked against pydicom reading the same bytes: every
instance must appear under its study, series and SOP Instance UID, as the same inode, with the
right link count; every change to the files must show in the views; conflicts and bad files
must be listed, never hidden; and no value may reach the hot store, LMDB or the log in clear.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from conftest import VNAFS, Fs, run_vnafs
from pydicom.data import get_charset_files, get_testdata_files
from test_phi import phi_found

from tools.gen_studies import GenInstance, generate
from vnafs.dicom.header import Status, dataset_diff, parse, viewable

VIEWS = ".dicom"


def find(fs: Fs, *args: str) -> list[dict]:
    res = run_vnafs("find", str(fs.mnt), "--json", "--wait", *args, check=False)
    assert res.returncode in (0, 3), res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[GenInstance]]:
    out = tmp_path_factory.mktemp("studies")
    return out, generate(out, seed=7, preset="small")


def ingest(fs: Fs, studies: tuple[Path, list[GenInstance]]) -> list[GenInstance]:
    src, instances = studies
    shutil.copytree(src, fs.mnt / "incoming")
    fs.wait_indexed()
    return instances


def leaf(mnt: Path, inst: GenInstance) -> Path:
    return mnt / VIEWS / "by-study" / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"


def test_every_instance_appears_in_the_views_as_the_same_inode(fs: Fs, studies) -> None:
    instances = ingest(fs, studies)
    st = fs.wait_indexed()
    assert st["instances"] == len(instances)
    assert st["studies"] == len({i.study_uid for i in instances})
    assert st["series"] == len({(i.study_uid, i.series_uid) for i in instances})
    for inst in instances:
        stored = fs.mnt / "incoming" / inst.path
        view = leaf(fs.mnt, inst)
        a, b = os.stat(stored), os.stat(view)
        assert a.st_ino == b.st_ino
        ds = pydicom.dcmread(view, stop_before_pixels=True)
        assert ds.SOPInstanceUID == inst.sop_uid and ds.StudyInstanceUID == inst.study_uid
        links = 1 + 2 + (1 if inst.accession else 0)
        assert a.st_nlink == links, inst
        assert view.read_bytes() == stored.read_bytes()
        date = inst.study_date
        by_date = (fs.mnt / VIEWS / "by-date" / date[:4] / date[4:6] / date[6:] / inst.study_uid
                   / inst.series_uid / f"{inst.sop_uid}.dcm")
        assert os.stat(by_date).st_ino == a.st_ino


def test_views_are_hidden_read_only_and_listable(fs: Fs, studies) -> None:
    instances = ingest(fs, studies)
    views = fs.mnt / VIEWS
    assert VIEWS not in os.listdir(fs.mnt)  # hidden like ZFS's .zfs: rsync/find skip it
    assert sorted(os.listdir(views)) == ["by-accession", "by-date", "by-study"]
    assert sorted(os.listdir(views / "by-study")) == sorted({i.study_uid for i in instances})
    one = instances[0]
    series_dir = views / "by-study" / one.study_uid / one.series_uid
    expected = sorted(f"{i.sop_uid}.dcm" for i in instances
                      if (i.study_uid, i.series_uid) == (one.study_uid, one.series_uid))
    assert sorted(os.listdir(series_dir)) == expected
    st = os.stat(views / "by-study")
    assert stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o222
    for action in (lambda: os.mkdir(views / "by-study" / "x"),
                   lambda: os.unlink(leaf(fs.mnt, one)),
                   lambda: os.rename(leaf(fs.mnt, one), fs.mnt / "stolen.dcm"),
                   lambda: os.rename(fs.mnt / "incoming" / one.path, series_dir / "x.dcm"),
                   lambda: os.close(os.open(series_dir / "new.dcm", os.O_CREAT | os.O_WRONLY)),
                   lambda: os.link(fs.mnt / "incoming" / one.path, series_dir / "l.dcm"),
                   lambda: os.rmdir(series_dir)):
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno in (errno.EROFS, errno.EACCES), exc.value
    with pytest.raises(FileExistsError):
        os.mkdir(fs.mnt / VIEWS)
    assert os.path.samefile(views / "..", fs.mnt)
    with pytest.raises(FileNotFoundError):
        os.stat(views / "by-study" / "1.2.3.4.5")
    with pytest.raises(FileNotFoundError):
        os.stat(series_dir / "1.2.3.dcm")


def test_unlink_rename_link_and_rewrite_keep_the_index_exact(fs: Fs, studies) -> None:
    instances = ingest(fs, studies)
    first, second = instances[0], instances[1]
    a = fs.mnt / "incoming" / first.path
    # rename: nothing changes in the views
    os.rename(a, fs.mnt / "moved.dcm")
    assert os.stat(leaf(fs.mnt, first)).st_ino == os.stat(fs.mnt / "moved.dcm").st_ino
    # hard link: one more link, same view entry
    before = os.stat(fs.mnt / "moved.dcm").st_nlink
    os.link(fs.mnt / "moved.dcm", fs.mnt / "hard.dcm")
    assert os.stat(leaf(fs.mnt, first)).st_nlink == before + 1
    os.unlink(fs.mnt / "moved.dcm")
    assert leaf(fs.mnt, first).exists()
    # last unlink: gone from the views at once, in the same transaction
    os.unlink(fs.mnt / "hard.dcm")
    assert not leaf(fs.mnt, first).exists()
    assert fs.wait_indexed()["instances"] == len(instances) - 1
    # O_TRUNC rewrite of one instance's file with another instance's bytes (a resend)
    b = fs.mnt / "incoming" / second.path
    third = instances[2]
    with open(b, "wb") as f:  # O_WRONLY|O_CREAT|O_TRUNC, like storescp
        f.write((fs.mnt / "incoming" / third.path).read_bytes())
    fs.wait_indexed()
    assert not leaf(fs.mnt, second).exists()
    assert os.stat(fs.mnt / "incoming" / third.path).st_ino in {
        os.stat(p).st_ino for p in leaf(fs.mnt, third).parent.iterdir()}
    # truncation to a non-DICOM size removes it from the index
    os.truncate(b, 0)
    fs.wait_indexed()
    names = os.listdir(leaf(fs.mnt, third).parent)
    assert names.count(f"{third.sop_uid}.dcm") == 1 and len(
        [n for n in names if n.startswith(third.sop_uid)]) == 1


def test_find_by_patient_issuer_accession_study(fs: Fs, studies) -> None:
    instances = ingest(fs, studies)
    by_key: dict[tuple[str, str], set[str]] = {}
    for i in instances:
        by_key.setdefault((i.patient.issuer, i.patient.patient_id), set()).add(i.study_uid)
    shared = [k for k in by_key if sum(1 for k2 in by_key if k2[1] == k[1]) > 1]
    assert shared, "the generator must give two patients one PatientID under two issuers"
    for (issuer, pid), uids in by_key.items():
        found = find(fs, "--patient", pid, "--issuer", issuer)
        assert {s["study"] for s in found} == uids, (issuer, pid)
        for s in found:
            assert [p["issuer"] for p in s["patients"]] == [issuer]
    pid = shared[0][1]
    found = find(fs, "--patient", pid)  # no issuer: every issuer's patient, kept apart
    assert {s["study"] for s in found} == set().union(
        *(u for (iss, p), u in by_key.items() if p == pid))
    inst = next(i for i in instances if i.accession)
    found = find(fs, "--accession", inst.accession)
    assert inst.study_uid in {s["study"] for s in found}
    found = find(fs, "--study", inst.study_uid)
    assert len(found) == 1 and found[0]["instances"] == sum(
        1 for i in instances if i.study_uid == inst.study_uid)
    assert Path(found[0]["view"]).is_dir()
    assert find(fs, "--study", inst.study_uid, "--modality", "XX") == []
    d = inst.study_date
    day = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    assert find(fs, "--study", inst.study_uid, "--from", day, "--to", day)
    assert find(fs, "--study", inst.study_uid, "--from", "2999-01-01") == []
    res = run_vnafs("find", str(fs.mnt), "--study", "1.2.3", check=False)
    assert res.returncode == 3 and "no matching studies" in res.stderr
    res = run_vnafs("find", str(fs.mnt), "--from", "yesterday", "--study", "1.2", check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "YYYY-MM-DD" in res.stderr
    res = run_vnafs("find", str(fs.mnt), check=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and not res.stdout
    for criterion in ("--patient", "--study", "--accession", "--date", "--modality",
                      "--problems"):
        assert criterion in res.stderr


def test_find_by_date_and_modality(fs: Fs, studies) -> None:
    """--date (DICOM range syntax) and --modality, alone or together, as PACS admins search."""
    instances = ingest(fs, studies)
    dates: dict[str, str] = {}
    modalities: dict[str, set[str]] = {}
    for i in instances:
        dates[i.study_uid] = i.study_date
        modalities.setdefault(i.study_uid, set()).add(i.modality)
    days = sorted(set(dates.values()))
    assert len(days) > 2 and len({m for ms in modalities.values() for m in ms}) > 1

    def uids(*args: str) -> list[str]:
        found = find(fs, *args)
        assert [(s["date"], s["time"]) for s in found] == sorted(
            ((s["date"], s["time"]) for s in found), reverse=True)  # newest first
        return sorted(s["study"] for s in found)

    def studies_where(keep: Callable[[str], bool]) -> list[str]:
        return sorted(u for u in dates if keep(u))

    day, lo, hi = days[1], days[0], days[-2]
    assert uids("--date", day) == studies_where(lambda u: dates[u] == day)
    assert uids("--date", f"{day[:4]}-{day[4:6]}-{day[6:]}") == uids("--date", day)
    assert uids("--date", f"{lo}-{hi}") == studies_where(lambda u: lo <= dates[u] <= hi)
    assert uids("--date", f"{day}-") == studies_where(lambda u: dates[u] >= day)
    assert uids("--date", f"-{day}") == studies_where(lambda u: dates[u] <= day)
    assert uids("--from", f"{day[:4]}-{day[4:6]}-{day[6:]}") == uids("--date", f"{day}-")
    modality = sorted(modalities[next(iter(dates))])[0]
    assert uids("--modality", modality) == studies_where(lambda u: modality in modalities[u])
    assert uids("--modality", modality.lower()) == uids("--modality", modality)
    assert uids("--date", f"{lo}-{hi}", "--modality", modality) == studies_where(
        lambda u: lo <= dates[u] <= hi and modality in modalities[u])
    one = instances[0]
    assert uids("--patient", one.patient.patient_id, "--issuer", one.patient.issuer,
                "--date", dates[one.study_uid]) == sorted(
        {i.study_uid for i in instances if i.patient == one.patient
         and dates[i.study_uid] == dates[one.study_uid]})
    assert find(fs, "--date", "29990101-") == []
    for bad in ("2025-13-01", "20250231", "yesterday", "-", "20250102-20250101"):
        res = run_vnafs("find", str(fs.mnt), "--date", bad, check=False)
        assert res.returncode == 1 and res.stderr.count("\n") == 1, (bad, res.stderr)
        assert "--date" in res.stderr and "Traceback" not in res.stderr
    for args in (("--date", day, "--from", "2025-01-01"), ("--issuer", "X"),
                 ("--study", one.study_uid, "--patient", "P")):
        res = run_vnafs("find", str(fs.mnt), *args, check=False)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and not res.stdout, args


def test_concurrent_waiters_all_return(fs: Fs, studies) -> None:
    """Several `find --wait` at once, while files are still queued: every one returns (the
    waiters share one wakeup; a waiter must never be left on an event nobody sets)."""
    src, instances = studies
    shutil.copytree(src, fs.mnt / "incoming")
    one = instances[0]
    procs = [subprocess.Popen([VNAFS, "find", str(fs.mnt), "--wait", "--json", "--study",
                               one.study_uid], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    try:
        outs = [p.communicate(timeout=20)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)
    assert all(json.loads(out)[0]["study"] == one.study_uid for out in outs)


def test_conflicts_and_bad_files_are_listed_not_hidden(fs: Fs, studies) -> None:
    instances = ingest(fs, studies)
    one = instances[0]
    data = (fs.mnt / "incoming" / one.path).read_bytes()
    # same SOP Instance UID, different bytes
    changed = bytearray(data)
    changed[-1] ^= 0xFF
    (fs.mnt / "conflict.dcm").write_bytes(changed)
    # an identical copy is a duplicate, not a conflict
    other = instances[1]
    (fs.mnt / "dup.dcm").write_bytes((fs.mnt / "incoming" / other.path).read_bytes())
    # truncated
    (fs.mnt / "cut.dcm").write_bytes(data[: len(data) // 2])
    # not DICOM at all
    (fs.mnt / "notes.txt").write_text("not an image\n")
    # a UID with letters, and a file with the DICM marker that pydicom cannot parse
    ds = pydicom.dcmread(fs.mnt / "incoming" / instances[2].path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID we want
        ds.StudyInstanceUID = "1.2.3.ABC"
    ds.save_as(fs.mnt / "bad-uid.dcm", enforce_file_format=True)
    (fs.mnt / "garbage.dcm").write_bytes(bytes(128) + b"DICM" + os.urandom(4000))
    st = fs.wait_indexed()
    assert st["sop_conflict"] == 2 and st["incomplete"] == 1 and st["invalid"] == 2
    problems = {p["ino"]: p for p in json.loads(run_vnafs(
        "find", str(fs.mnt), "--problems", "--json").stdout)}
    ino = os.stat(fs.mnt / "conflict.dcm").st_ino
    assert problems[ino]["kind"] == "sop_conflict"
    assert problems[os.stat(fs.mnt / "cut.dcm").st_ino]["kind"] == "incomplete"
    assert os.stat(fs.mnt / "notes.txt").st_ino not in problems
    assert problems[os.stat(fs.mnt / "bad-uid.dcm").st_ino]["kind"] == "invalid"
    assert problems[os.stat(fs.mnt / "garbage.dcm").st_ino]["kind"] == "invalid"
    assert "1.2.3.ABC" not in fs.log()
    series_dir = leaf(fs.mnt, one).parent
    assert f"{one.sop_uid}~{ino}.dcm" in os.listdir(series_dir)
    assert (series_dir / f"{one.sop_uid}~{ino}.dcm").read_bytes() == bytes(changed)
    # the bad file stays byte-exact
    assert (fs.mnt / "cut.dcm").read_bytes() == data[: len(data) // 2]
    # removing the conflicting copy clears the conflict
    os.unlink(fs.mnt / "conflict.dcm")
    assert fs.wait_indexed()["sop_conflict"] == 0
    text = run_vnafs("status", str(fs.mnt)).stdout
    assert "incomplete 1" in text and "SOP UID conflicts 0" in text


def test_patient_conflict_is_flagged(fs: Fs, studies) -> None:
    instances = ingest(fs, studies)
    one = instances[0]
    ds = pydicom.dcmread(fs.mnt / "incoming" / one.path)
    ds.PatientID = "OTHERPAT1"
    ds.SOPInstanceUID = one.sop_uid + ".9"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(fs.mnt / "other-patient.dcm", enforce_file_format=True)
    st = fs.wait_indexed()
    assert st["patient_conflicts"] == 1
    found = find(fs, "--study", one.study_uid)
    assert found[0]["patient_conflict"] and len(found[0]["patients"]) == 2
    assert find(fs, "--patient", "OTHERPAT1", "--issuer", one.patient.issuer)
    kinds = [p["kind"] for p in json.loads(run_vnafs(
        "find", str(fs.mnt), "--problems", "--json").stdout)]
    assert kinds == ["patient_conflict"]


def test_index_survives_kill9_between_close_and_indexing(new_fs: Fs, studies) -> None:
    fs = new_fs.mount()
    src, instances = studies
    shutil.copytree(src, fs.mnt / "incoming")
    fs.kill9()  # the indexer may not have run yet: the change marks are in LMDB
    fs.mount()
    st = fs.wait_indexed()
    assert st["instances"] == len(instances)
    for inst in instances:
        assert leaf(fs.mnt, inst).exists()


def test_reindex_rebuilds_the_same_index(fs: Fs, studies) -> None:
    instances = ingest(fs, studies)
    data = (fs.mnt / "incoming" / instances[0].path).read_bytes()
    (fs.mnt / "cut.dcm").write_bytes(data[: len(data) // 2])
    before = fs.wait_indexed()
    assert before["incomplete"] == 1
    res = run_vnafs("reindex", str(fs.mnt))
    assert f"indexed {len(instances) + 1} files" in res.stdout
    after = fs.wait_indexed()
    keep = ("instances", "studies", "series", "bytes", "incomplete", "sop_conflict")
    assert {k: after[k] for k in keep} == {k: before[k] for k in keep}
    # unchanged files were rebuilt from their stored header bytes, without reading them
    assert after["since_mount_from_header"] == len(instances) + 1
    assert all(leaf(fs.mnt, i).exists() for i in instances)


def test_remount_keeps_views_and_inode_numbers(fs: Fs, studies) -> None:
    instances = ingest(fs, studies)
    view_root = os.stat(fs.mnt / VIEWS / "by-study").st_ino
    leaves = {i.sop_uid: os.stat(leaf(fs.mnt, i)).st_ino for i in instances}
    fs.umount()
    fs.mount()
    assert os.stat(fs.mnt / VIEWS / "by-study").st_ino == view_root
    assert {i.sop_uid: os.stat(leaf(fs.mnt, i)).st_ino for i in instances} == leaves


def test_no_phi_in_hot_store_lmdb_or_log(fs: Fs, studies) -> None:
    instances = ingest(fs, studies)
    run_vnafs("find", str(fs.mnt), "--study", instances[0].study_uid)
    fs.umount()
    needles = set()
    for i in instances:
        needles |= {i.patient.name, i.patient.patient_id, i.sop_uid, i.study_uid,
                    i.series_uid}
        if i.accession:
            needles.add(i.accession)
    needles.discard("")
    hits = []
    for path in fs.hot.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [(str(path), n) for n in needles if n.encode() in data]
        hits += [(str(path), n) for n in needles if n in str(path)]
    assert hits == []
    assert phi_found(fs.log().encode()) == []


def test_every_parseable_corpus_file_is_indexed(fs: Fs) -> None:
    """Every instance of pydicom's corpus whose UIDs parse is in the views, including the 50
    image storage instances without pixel data (shown, and flagged incomplete); a file is
    either shown itself or is a duplicate of the shown copy (same data set, other bytes)."""
    files = [Path(p) for p in get_testdata_files() if os.path.isfile(p)]
    expected = {}
    bad: dict[Path, Status] = {}
    dest = fs.mnt / "corpus"
    dest.mkdir()
    for i, path in enumerate(files):
        target = dest / f"{i:03d}-{path.name}"
        shutil.copyfile(path, target)
        with open(path, "rb") as f:
            parsed = parse(f, path.stat().st_size)
        inst = parsed.instance
        if inst is not None and viewable(parsed.status, parsed.problem, inst.sop_uid,
                                         inst.study_uid, inst.series_uid):
            expected[target] = (inst, parsed.status)
        if parsed.status not in (Status.OK, Status.NOT_DICOM):
            bad[target] = parsed.status
    # 96 instances are complete and 50 images lack pixel data; the rest are fragments and
    # DICOMDIRs (tests/test_dicom_header.py lists them). Every one not OK is a problem.
    assert sum(st is Status.OK for _, st in expected.values()) > 90
    assert sum(st is Status.INCOMPLETE for _, st in expected.values()) >= 50
    assert len(bad) >= 70
    fs.wait_indexed()
    problems = {p["ino"]: p for p in json.loads(run_vnafs(
        "find", str(fs.mnt), "--problems", "--json").stdout)}
    for target, status in bad.items():
        assert problems[os.stat(target).st_ino]["kind"] == status.value, target.name
    duplicates = 0
    for target, (inst, status) in expected.items():
        ds = pydicom.dcmread(target, stop_before_pixels=True, force=True)
        assert ds.SOPInstanceUID == inst.sop_uid
        view = (fs.mnt / VIEWS / "by-study" / inst.study_uid / inst.series_uid)
        names = os.listdir(view)
        assert f"{inst.sop_uid}.dcm" in names, target.name
        ino = os.stat(target).st_ino
        if ino in {os.stat(view / n).st_ino for n in names}:
            assert problems.get(ino, {}).get("in_views", True), target.name
            continue
        # Not shown: a duplicate of the shown copy, not a problem of its own.
        shown = view / f"{inst.sop_uid}.dcm"
        with open(shown, "rb") as a, open(target, "rb") as b:
            assert dataset_diff(a, shown.stat().st_size, b, target.stat().st_size) == [], (
                target.name)
        assert problems.get(ino, {}).get("kind") in (None, status.value), target.name
        duplicates += 1
    # liver_expb_1frame/liver_1frame, ExplVR_BigEndNoMeta/ExplVR_LitEndNoMeta (other byte
    # orders of equal values) and SC_jpeg_no_color_transform_2/SC_rgb_jpeg_app14_dcmd (other
    # file meta information only): one of each pair is a duplicate.
    assert duplicates == 3


def test_charset_values_make_safe_names(workdir: Path) -> None:
    fs = Fs(workdir).create()
    try:
        toml = fs.hot / "vnafs.toml"
        toml.write_text(toml.read_text().replace("by_patient = false", "by_patient = true"))
        fs.mount()
        dest = fs.mnt / "charsets"
        dest.mkdir()
        count = 0
        for i, path in enumerate(get_charset_files()):
            if not os.path.isfile(path):
                continue
            ds = pydicom.dcmread(path, force=True)
            if "SOPInstanceUID" not in ds:
                continue
            shutil.copyfile(path, dest / f"{i:02d}.dcm")
            count += 1
        fs.wait_indexed()
        assert count > 5
        by_patient = fs.mnt / VIEWS / "by-patient"
        names = [n for issuer in os.listdir(by_patient)
                 for n in os.listdir(by_patient / issuer)]
        assert names, "charset files have patient IDs"
        for name in names:
            assert "/" not in name and "\\" not in name and "~" in name
            assert len(name.encode()) <= 91
        # every listed name can be looked up again (lookups and listings agree)
        for issuer in os.listdir(by_patient):
            for name in os.listdir(by_patient / issuer):
                assert (by_patient / issuer / name).is_dir()
                assert os.listdir(by_patient / issuer / name)
    finally:
        fs.cleanup()
