"""The DICOM index in-process: files written through `Files`, indexed by the real `Indexer`.

Files are closed the way a PACS closes them; the indexer hears of them on the `closed`
channel, parses them in worker threads and commits the index, exactly as in a mount. The
results are read only through public functions: `vnafs.dicom.query.find`, `problems` and
`counts` (plain dicts) and the `Views` listings, never through the index's record classes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
import trio

from tools.gen_studies import GenInstance, write_ct_series
from vnafs import fsck
from vnafs.dicom.query import Query, counts, find, problems
from vnafs.fs.views import Views
from vnafs.meta.records import ROOT_INO
from vnafs.meta.snapshots import Snapshot
from vnafs.store.lifecycle import open_store

from .harness import SOURCE, Vfs, corpus, make_store, open_vfs


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[GenInstance, bytes]]:
    """Six generated 512 x 512 CT slices (about 0.5 MiB each) of one series."""
    out = tmp_path_factory.mktemp("ct")
    return [(i, (out / i.path).read_bytes()) for i in write_ct_series(out, seed=5, count=6)]


def views_of(vfs: Vfs, snap: Snapshot | None = None) -> Views:
    if snap is None:
        return vfs.views
    return Views(vfs.index.at(snap.epoch), salt=snap.id)


def listing(views: Views, *path: str) -> dict[str, int]:
    """Names in a view directory: leaves map to their stored inode, directories to 0."""
    return {c.name: c.ino for c in views.listing(views.ino_of(path))}


async def write_all(vfs: Vfs, files: dict[bytes, bytes]) -> dict[bytes, int]:
    """Write several files at once, as a PACS storing a series over parallel associations."""
    inos: dict[bytes, int] = {}

    async def one(name: bytes, data: bytes) -> None:
        inos[name] = await vfs.write_file(name, data)

    async with trio.open_nursery() as nursery:
        for name, data in files.items():
            nursery.start_soon(one, name, data)
    return inos


def study(vfs: Vfs, uid: str) -> dict[str, Any]:
    [found] = find(vfs.index, Query(study=uid))
    return found


async def test_a_corpus_file_is_indexed_and_shown_in_the_views(vfs: Vfs) -> None:
    data = corpus("CT_small.dcm").read_bytes()
    ds = pydicom.dcmread(corpus("CT_small.dcm"), stop_before_pixels=True)
    ino = await vfs.write_file(b"ct.dcm", data)
    await vfs.indexed()
    found = study(vfs, ds.StudyInstanceUID)
    assert found["instances"] == 1 and found["series"] == 1 and found["bytes"] == len(data)
    assert found["modalities"] == ["CT"] and found["date"] == ds.StudyDate
    assert found["patients"] == [{"issuer": "", "patient_id": ds.PatientID, "instances": 1}]
    assert not found["patient_conflict"] and found["view"] == f"by-study/{ds.StudyInstanceUID}"
    assert find(vfs.index, Query(patient=ds.PatientID)) == [found]
    assert find(vfs.index, Query(patient=ds.PatientID, issuer="ELSEWHERE")) == []
    assert find(vfs.index, Query(study=ds.StudyInstanceUID, modality="MR")) == []
    assert counts(vfs.index)["instances"] == 1 and problems(vfs.index) == []

    views = vfs.views
    assert listing(views) == {"by-study": 0, "by-date": 0, "by-accession": 0}
    assert listing(views, "by-study") == {ds.StudyInstanceUID: 0}
    leaf = {f"{ds.SOPInstanceUID}.dcm": ino}
    assert listing(views, "by-study", ds.StudyInstanceUID, ds.SeriesInstanceUID) == leaf
    d = ds.StudyDate
    assert listing(views, "by-date", d[:4], d[4:6], d[6:], ds.StudyInstanceUID,
                   ds.SeriesInstanceUID) == leaf
    series_dir = views.ino_of(("by-study", ds.StudyInstanceUID, ds.SeriesInstanceUID))
    assert views.lookup(series_dir, f"{ds.SOPInstanceUID}.dcm").ino == ino
    with pytest.raises(FileNotFoundError):
        views.lookup(series_dir, "1.2.3.dcm")
    # Its two view names count as links, and the leaf is the stored file itself.
    assert vfs.index.view_links(vfs.inode(ino).flags) == 2
    assert await vfs.read_file(ino) == data


async def test_wait_idle_sees_a_file_just_closed(vfs: Vfs) -> None:
    await vfs.write_file(b"ct.dcm", corpus("CT_small.dcm").read_bytes())
    await vfs.indexer.wait_idle()  # what `vnafs find --wait` runs, right after a close
    assert counts(vfs.index)["instances"] == 1


async def test_a_ct_series_written_in_parallel(vfs: Vfs,
                                               ct_series: list[tuple[GenInstance, bytes]]
                                               ) -> None:
    inos = await write_all(vfs, {i.sop_uid.encode(): data for i, data in ct_series})
    await vfs.indexed()
    one = ct_series[0][0]
    found = study(vfs, one.study_uid)
    assert found["instances"] == 6 and found["series"] == 1
    assert found["bytes"] == sum(i.size for i, _ in ct_series)
    assert found["patients"][0]["patient_id"] == one.patient.patient_id
    assert find(vfs.index, Query(accession=one.accession)) == [found]
    series = listing(vfs.views, "by-study", one.study_uid, one.series_uid)
    assert series == {f"{i.sop_uid}.dcm": inos[i.sop_uid.encode()] for i, _ in ct_series}

    # Renames and extra hard links change nothing; the last unlink removes the instance in
    # its own transaction, before any indexing.
    a, b = (i.sop_uid.encode() for i, _ in ct_series[:2])
    await vfs.engine.commit(vfs.ns.rename, ROOT_INO, a, ROOT_INO, b"moved.dcm")
    await vfs.engine.commit(vfs.ns.link, inos[b], ROOT_INO, b"hard.dcm")
    assert listing(vfs.views, "by-study", one.study_uid, one.series_uid) == series
    await vfs.unlink(b)
    assert listing(vfs.views, "by-study", one.study_uid, one.series_uid) == series
    await vfs.unlink(b"hard.dcm")
    gone = f"{ct_series[1][0].sop_uid}.dcm"
    assert listing(vfs.views, "by-study", one.study_uid, one.series_uid) == {
        k: v for k, v in series.items() if k != gone}
    assert study(vfs, one.study_uid)["instances"] == 5
    await vfs.settle()


async def test_problems_and_conflicts_are_listed(vfs: Vfs,
                                                 ct_series: list[tuple[GenInstance, bytes]]
                                                 ) -> None:
    (one, data), (other, other_data) = ct_series[:2]
    changed = bytearray(data)
    changed[-1] ^= 0xFF
    ds = pydicom.dcmread(corpus("CT_small.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID we want
        ds.StudyInstanceUID = "1.2.3.ABC"
    bad_uid = vfs.store.root.parent / "bad-uid.dcm"
    ds.save_as(bad_uid, enforce_file_format=True)
    inos = await write_all(vfs, {
        b"one.dcm": data, b"conflict.dcm": bytes(changed),  # same SOP UID, other bytes
        b"other.dcm": other_data, b"dup.dcm": other_data,  # identical copies: no conflict
        b"cut.dcm": data[: len(data) // 2],
        b"notes.txt": b"not an image\n",
        b"garbage.dcm": bytes(128) + b"DICM" + bytes(range(256)) * 16,
        b"bad-uid.dcm": bad_uid.read_bytes(),
    })
    await vfs.indexed()
    found = {p["ino"]: p["kind"] for p in problems(vfs.index)}
    assert found == {inos[b"one.dcm"]: "sop_conflict", inos[b"conflict.dcm"]: "sop_conflict",
                     inos[b"cut.dcm"]: "incomplete", inos[b"garbage.dcm"]: "invalid",
                     inos[b"bad-uid.dcm"]: "invalid"}
    c = counts(vfs.index)
    assert (c["sop_conflict"], c["incomplete"], c["invalid"]) == (2, 1, 2)
    # Both differing copies are shown, the lowest inode under the plain name; of the
    # identical copies at least one.
    series = listing(vfs.views, "by-study", one.study_uid, one.series_uid)
    low, high = sorted((inos[b"one.dcm"], inos[b"conflict.dcm"]))
    assert series[f"{one.sop_uid}.dcm"] == low and series[f"{one.sop_uid}~{high}.dcm"] == high
    assert series[f"{other.sop_uid}.dcm"] in (inos[b"other.dcm"], inos[b"dup.dcm"])
    # Bad files are stored byte-exact.
    assert await vfs.read_file(inos[b"cut.dcm"]) == data[: len(data) // 2]
    # Removing the differing copy clears the conflict.
    await vfs.unlink(b"conflict.dcm")
    await vfs.settle()
    assert counts(vfs.index)["sop_conflict"] == 0
    assert inos[b"one.dcm"] not in {p["ino"] for p in problems(vfs.index)}


async def test_a_patient_conflict_is_flagged(vfs: Vfs) -> None:
    ds = pydicom.dcmread(corpus("CT_small.dcm"))
    first = await vfs.write_file(b"a.dcm", corpus("CT_small.dcm").read_bytes())
    ds.PatientID = "OTHERPAT1"
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = vfs.store.root.parent / "other.dcm"
    ds.save_as(path, enforce_file_format=True)
    await vfs.write_file(b"b.dcm", path.read_bytes())
    await vfs.indexed()
    found = study(vfs, ds.StudyInstanceUID)
    assert found["patient_conflict"] and found["instances"] == 2
    assert sorted(p["patient_id"] for p in found["patients"]) == ["1CT1", "OTHERPAT1"]
    assert [p["kind"] for p in problems(vfs.index)] == ["patient_conflict"]
    assert find(vfs.index, Query(patient="OTHERPAT1")) == [found]
    assert first in listing(vfs.views, "by-study", ds.StudyInstanceUID,
                            ds.SeriesInstanceUID).values()


async def test_rewrites_and_truncation_reindex_the_file(vfs: Vfs,
                                                       ct_series: list[tuple[GenInstance, bytes]]
                                                       ) -> None:
    (one, data), (two, data2) = ct_series[:2]
    ino = await vfs.write_file(b"x.dcm", data)
    await vfs.indexed()
    path = ("by-study", one.study_uid, one.series_uid)
    assert listing(vfs.views, *path) == {f"{one.sop_uid}.dcm": ino}
    # A resend with O_TRUNC of another instance's bytes into the same file.
    vfs.open(ino)
    await vfs.files.setattr(ino, {"size": 0})
    await vfs.write(ino, 0, data2)
    await vfs.close(ino)
    await vfs.indexed()
    assert listing(vfs.views, *path) == {f"{two.sop_uid}.dcm": ino}
    # Truncated to nothing, with no handle open: not DICOM any more, out of the index.
    await vfs.files.setattr(ino, {"size": 0})
    await vfs.indexed()
    assert counts(vfs.index)["instances"] == 0 and find(
        vfs.index, Query(study=one.study_uid)) == []
    assert vfs.index.view_links(vfs.inode(ino).flags) == 0


async def test_a_file_is_indexed_from_its_block_files_when_the_cache_is_cold(
        vfs: Vfs, ct_series: list[tuple[GenInstance, bytes]]) -> None:
    one, data = ct_series[0]
    ino = await vfs.create(b"x.dcm")
    await vfs.write(ino, 0, data)
    await vfs.files.flush(ino)
    vfs.drop_cache()  # nothing to copy the head and tail from at close
    loaded = vfs.engine.stats["blocks_loaded"]
    await vfs.files.release(ino)
    await vfs.indexed()
    assert vfs.engine.stats["blocks_loaded"] > loaded
    assert study(vfs, one.study_uid)["instances"] == 1


async def test_snapshots_keep_the_views_of_their_time(vfs: Vfs,
                                                     ct_series: list[tuple[GenInstance, bytes]]
                                                     ) -> None:
    inos = await write_all(vfs, {i.sop_uid.encode(): d for i, d in ct_series[:3]})
    await vfs.indexed()
    one = ct_series[0][0]
    path = ("by-study", one.study_uid, one.series_uid)
    before = listing(vfs.views, *path)
    snap = await vfs.snapshots.create("s")
    await vfs.unlink(one.sop_uid.encode())
    await vfs.settle()
    assert len(listing(vfs.views, *path)) == 2
    frozen = views_of(vfs, snap)
    assert listing(frozen, *path) == before
    assert frozen.root_ino != vfs.views.root_ino
    [then] = find(vfs.index.at(snap.epoch), Query(study=one.study_uid))
    assert then["instances"] == 3 and study(vfs, one.study_uid)["instances"] == 2
    # The unlinked instance is still readable in the snapshot, byte for byte.
    assert await vfs.read_in_snapshot(snap, inos[one.sop_uid.encode()]) == ct_series[0][1]


async def test_reindex_rebuilds_the_same_index_from_stored_headers(
        vfs: Vfs, ct_series: list[tuple[GenInstance, bytes]]) -> None:
    files = {i.sop_uid.encode(): d for i, d in ct_series}
    files[b"cut.dcm"] = ct_series[0][1][:1000]
    await write_all(vfs, files)
    await vfs.indexed()
    before = counts(vfs.index)
    found = study(vfs, ct_series[0][0].study_uid)
    assert await vfs.indexer.reindex() == len(files)
    await vfs.indexed()
    assert counts(vfs.index) == before and study(vfs, ct_series[0][0].study_uid) == found
    assert vfs.indexer.stats["from_header"] == len(files)


async def test_change_marks_survive_a_crash_before_indexing(
        tmp_path: Path, ct_series: list[tuple[GenInstance, bytes]]) -> None:
    """A file committed (by fsync, or by a close of another descriptor) but never released
    before the daemon died is indexed at the next mount, from the change mark its commit
    wrote."""
    one, data = ct_series[0]
    store = make_store(tmp_path / "hot")
    try:
        async with open_vfs(store) as vfs:
            ino = await vfs.create(b"x.dcm")
            await vfs.write(ino, 0, data)
            await vfs.files.flush(ino)
            assert vfs.index.marked() == [ino]
            vfs.crashed = True
    finally:
        store.close()
    store = open_store(tmp_path / "hot", SOURCE)
    try:
        async with open_vfs(store) as vfs:
            await vfs.indexed()
            assert study(vfs, one.study_uid)["instances"] == 1
            assert vfs.index.marked() == []
            assert await vfs.read_file(ino) == data
        assert fsck.check(store, progress=False).clean
    finally:
        store.close()
