"""Replication against real object stores: SeaweedFS (S3) and Azurite (Azure Blob).

Disaster recovery end to end, the faults the archive issue names (archive down for a minute
during ingest, wrong credentials, kill -9 in the middle of a cycle), two sites in one bucket,
and a scan of every object in the bucket for the PHI the tests wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BUCKET, Fs, run_vnafs
from tests.test_replication import (
    _set_archive,
    assert_restores,
    restore_to,
    tree,
    write_sample,
)
from tools.servers import Azurite, SeaweedFS
from vnafs.archive.backend import open_backend

NAME = "Oyelaran^Thaddeus"
PID = "MRN-5550-2468"


def site(workdir: Path, srv: SeaweedFS | Azurite, name: str = "site", parent: str = "",
         **archive: object) -> Fs:
    """A created file system replicating under its own prefix of the bucket."""
    prefix = f"{parent or uuid.uuid4().hex[:8]}/{name}"
    fs = Fs(workdir / name, archive=srv.url(BUCKET, prefix), env={**os.environ, **srv.env()})
    fs.root.mkdir()
    fs.create()
    _set_archive(fs, interval=1, **archive)
    return fs


@pytest.fixture
def s3_fs(workdir: Path, seaweed: SeaweedFS) -> Iterator[Fs]:
    fs = site(workdir, seaweed)
    try:
        yield fs.mount()
    finally:
        fs.cleanup()


def objects(srv: SeaweedFS | Azurite, url: str) -> dict[str, bytes]:
    backend = open_backend(url, env=srv.env())
    return {name: backend.get(name) for name, _ in backend.list("")}


def find_study(mnt: Path, uid: str) -> str:
    return run_vnafs("find", "--wait", "--json", "--study", uid, str(mnt)).stdout


def test_s3_disaster_recovery_with_dicom_index(s3_fs: Fs, seaweed: SeaweedFS,
                                               workdir: Path) -> None:
    from tools.gen_studies import Patient, write_ct_series

    write_sample(s3_fs.mnt)
    made = write_ct_series(s3_fs.mnt / "pacs", seed=3, count=4,
                           patient=Patient(PID, "HOSP-B", NAME, "19700101"))
    assert s3_fs.wait_indexed()["instances"] == 4
    study = made[0].study_uid
    found = json.loads(find_study(s3_fs.mnt, study))
    before = tree(s3_fs.mnt)
    views = tree(s3_fs.mnt / ".dicom" / "by-study")
    s3_fs.wait_replicated()

    # Nothing in the bucket names or holds the patient, the IDs or the UIDs.
    assert s3_fs.archive is not None
    stored = objects(seaweed, s3_fs.archive)
    secrets = [NAME.encode(), PID.encode(), *{m.sop_uid.encode() for m in made},
               study.encode()]
    assert len(stored) > 10
    for name, data in stored.items():
        assert not any(s.decode() in name for s in secrets)
        assert not any(s in data for s in secrets), name

    # A read-only archive mount in "the cloud" sees the same files and views.
    ro = workdir / "ro"
    ro.mkdir()
    run_vnafs("mount", "--archive-only", "--key-file", str(s3_fs.key), "--cache",
              str(workdir / "cache"), s3_fs.archive, str(ro), env=s3_fs.env)
    try:
        assert tree(ro) == before
        assert tree(ro / ".dicom" / "by-study") == views
    finally:
        run_vnafs("umount", str(ro))

    s3_fs.kill9()
    shutil.rmtree(s3_fs.hot)
    out = restore_to(s3_fs, s3_fs.hot)
    assert "restored" in out
    s3_fs.mount()
    assert tree(s3_fs.mnt) == before
    assert json.loads(find_study(s3_fs.mnt, study)) == found
    assert tree(s3_fs.mnt / ".dicom" / "by-study") == views


def test_azure_replicates_and_restores(workdir: Path, azurite: Azurite) -> None:
    fs = site(workdir, azurite)
    try:
        fs.mount()
        write_sample(fs.mnt)
        before = tree(fs.mnt)
        fs.wait_replicated()
        fs.umount()
        assert_restores(fs, workdir, before)
    finally:
        fs.cleanup()


def test_archive_down_for_a_minute_during_ingest(s3_fs: Fs, seaweed: SeaweedFS,
                                                 workdir: Path) -> None:
    (s3_fs.mnt / "before").write_bytes(os.urandom(1 << 20))
    s3_fs.wait_replicated()
    seaweed.stop()
    try:
        deadline = time.monotonic() + 60
        i = 0
        while time.monotonic() < deadline:  # ingest goes on at its own pace
            t0 = time.monotonic()
            (s3_fs.mnt / f"during-{i}").write_bytes(os.urandom(256 << 10))
            assert time.monotonic() - t0 < 10, "a write waited for the archive"
            i += 1
            time.sleep(0.5)
        arch = s3_fs.status()["archive"]
        assert arch["state"] == "retrying" and arch["last_error"]
        assert arch["pending_blocks"] >= i
        assert "unreachable" in arch["last_error"] or "connect" in arch["last_error"].lower()
    finally:
        seaweed.start()
    expected = tree(s3_fs.mnt)
    arch = s3_fs.wait_replicated(timeout=180)
    assert arch["state"] == "ok" and arch["last_error"] is None
    s3_fs.umount()
    assert_restores(s3_fs, workdir, expected)


def test_wrong_credentials_are_reported_and_retried(workdir: Path, seaweed: SeaweedFS) -> None:
    creds = workdir / "archive.cred"
    good = (f'[s3]\naccess_key_id = "{seaweed.access_key}"\n'
            f'secret_access_key = "{seaweed.secret_key}"\n')
    creds.write_text(good)
    os.chmod(creds, 0o600)
    url = seaweed.url(BUCKET, f"{uuid.uuid4().hex[:8]}/creds")
    fs = Fs(workdir / "site", archive=url)
    fs.root.mkdir()
    run_vnafs("keygen", str(fs.key))
    wrong = good.replace(seaweed.secret_key, "WRONG-SECRET-123")
    creds.write_text(wrong)
    res = run_vnafs("mkfs", "--key-file", str(fs.key), "--archive", url, "--credentials",
                    str(creds), str(fs.hot), check=False)
    assert res.returncode == 1 and "credentials" in res.stderr
    assert "WRONG-SECRET-123" not in res.stderr and "Traceback" not in res.stderr
    creds.write_text(good)
    fs.mnt.mkdir()
    run_vnafs("mkfs", "--key-file", str(fs.key), "--archive", url, "--credentials",
              str(creds), str(fs.hot))
    _set_archive(fs, interval=1)
    creds.write_text(wrong)  # rotated wrongly while the site is down
    try:
        fs.mount()  # an archive problem never stops the mount
        (fs.mnt / "f").write_bytes(b"study")
        deadline = time.monotonic() + 30
        arch = fs.status()["archive"]
        while not arch["last_error"] and time.monotonic() < deadline:
            time.sleep(0.2)
            arch = fs.status()["archive"]
        assert arch["state"] == "retrying"
        assert "credentials" in arch["last_error"]
        creds.write_text(good)  # fixed: picked up without a remount
        fs.wait_replicated(timeout=120)
        assert "WRONG-SECRET-123" not in fs.log()
        assert seaweed.secret_key not in fs.log()
    finally:
        fs.cleanup()


def test_kill9_in_the_middle_of_replication_resumes_without_gaps(
        workdir: Path, seaweed: SeaweedFS) -> None:
    fs = site(workdir, seaweed, bandwidth_mib=4)
    try:
        fs.mount()
        fs.wait_replicated()
        (fs.mnt / "big").write_bytes(os.urandom(40 << 20))  # 40 blocks at 4 MiB/s
        expected = tree(fs.mnt)
        deadline = time.monotonic() + 60
        while fs.status()["archive"]["pending_blocks"] > 24 and time.monotonic() < deadline:
            time.sleep(0.1)
        done = 40 - fs.status()["archive"]["pending_blocks"]
        fs.kill9()
        assert 16 <= done < 40  # killed in the middle: some batches recorded, not all
        _set_archive(fs, bandwidth_mib=0)
        fs.mount()
        arch = fs.wait_replicated(timeout=120)
        sent = arch["since_mount_blocks_uploaded"] + arch["since_mount_blocks_present"]
        assert sent <= 40 - done  # committed progress is never re-sent
        fs.umount()
        assert_restores(fs, workdir, expected)
    finally:
        fs.cleanup()


def test_two_sites_in_one_bucket_do_not_interfere(workdir: Path, seaweed: SeaweedFS) -> None:
    # "site" is a string prefix of "site2": listings must still not cross.
    parent = uuid.uuid4().hex[:8]
    sites = [site(workdir, seaweed, name, parent) for name in ("site", "site2")]
    try:
        for i, fs in enumerate(sites):
            fs.mount()
            write_sample(fs.mnt, seed=i)
            (fs.mnt / "who").write_text(fs.root.name)
        expected = [tree(fs.mnt) for fs in sites]
        assert expected[0] != expected[1]
        for fs in sites:
            fs.wait_replicated()
            fs.umount()
        for fs, want in zip(sites, expected, strict=True):
            assert_restores(fs, workdir, want, f"restored-{fs.root.name}")
    finally:
        for fs in sites:
            fs.cleanup()


def test_restore_uses_the_credentials_it_was_given(workdir: Path, seaweed: SeaweedFS) -> None:
    """After a disaster the old credentials file is gone with the old machine: the restored
    store replicates with the file given to restore."""
    text = (f'[s3]\naccess_key_id = "{seaweed.access_key}"\n'
            f'secret_access_key = "{seaweed.secret_key}"\n')
    old, new = workdir / "old.cred", workdir / "new.cred"
    for path in (old, new):
        path.write_text(text)
        os.chmod(path, 0o600)
    url = seaweed.url(BUCKET, f"{uuid.uuid4().hex[:8]}/dr")
    fs = Fs(workdir / "site", archive=url)
    fs.root.mkdir()
    fs.mnt.mkdir()
    run_vnafs("keygen", str(fs.key))
    run_vnafs("mkfs", "--key-file", str(fs.key), "--archive", url, "--credentials", str(old),
              str(fs.hot))
    _set_archive(fs, interval=1)
    try:
        fs.mount()
        (fs.mnt / "study").write_bytes(os.urandom(1 << 20))
        fs.wait_replicated()
        fs.kill9()
        shutil.rmtree(fs.hot)
        old.unlink()
        run_vnafs("restore", "--key-file", str(fs.key), "--credentials", str(new),
                  "--no-progress", url, str(fs.hot))
        assert f'credentials = "{new}"' in (fs.hot / "vnafs.toml").read_text()
        fs.mount()
        (fs.mnt / "after").write_bytes(b"replicated with the new credentials file")
        fs.wait_replicated()
        assert fs.status()["archive"]["last_error"] is None
    finally:
        fs.cleanup()
