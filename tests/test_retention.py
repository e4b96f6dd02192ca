"""Retention the archive enforces (`[archive] object_lock`), read back from real servers.

A store is served in-process (tests/unit/harness.py, no FUSE: what is tested here is the
replicator and the archive) and replicated by the real `Replicator` into SeaweedFS and
Azurite. Retention is read back through boto3, independently of vnafs's own code.

What these tests prove is that the retention is *set* (mode and date). They do not prove that
a server *enforces* it: SeaweedFS 4.x refuses to delete a locked version here, but its
releases have been reported not to enforce retention on every delete path, so docs/admin.md
names AWS S3 and Azure Blob as the stores that enforce it. Azurite does not implement
immutability policies at all, which is the "not supported" case.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BUCKET, Fs, run_vnafs
from tests.unit.harness import SOURCE, B, Vfs, open_vfs, pattern
from tools.servers import Azurite, SeaweedFS
from vnafs.archive import log as alog
from vnafs.archive import verify
from vnafs.archive.backend import open_backend
from vnafs.archive.replicator import Replicator
from vnafs.meta.db import read_u64
from vnafs.store.lifecycle import mkfs, open_store

LOCKED = "vnafs-locked"
DAY = 86400 * 10**9


@pytest.fixture(scope="module")
def locked_bucket(seaweed: SeaweedFS) -> Iterator[str]:
    """A versioned bucket with Object Lock enabled, in the session's SeaweedFS."""
    seaweed.create_bucket(LOCKED, object_lock=True)
    yield LOCKED


@asynccontextmanager
async def served(workdir: Path, url: str, env: dict[str, str], object_lock: str,
                 retention_days: int = 7) -> AsyncIterator[tuple[Vfs, Replicator]]:
    creds = workdir / "archive.cred"
    if "AWS_ACCESS_KEY_ID" in env:
        creds.write_text(f'[s3]\naccess_key_id = "{env["AWS_ACCESS_KEY_ID"]}"\n'
                         f'secret_access_key = "{env["AWS_SECRET_ACCESS_KEY"]}"\n')
    else:
        creds.write_text(f'[azure]\naccount_key = "{env["AZURE_STORAGE_ACCOUNT_KEY"]}"\n')
    creds.chmod(0o600)
    mkfs(workdir / "hot", SOURCE, archive_url=url, uid=os.getuid(), gid=os.getgid(),
         credentials=str(creds))
    store = open_store(workdir / "hot", SOURCE)
    try:
        cfg = store.config.archive
        cfg.object_lock, cfg.retention_days = object_lock, retention_days
        async with open_vfs(store) as vfs:
            backend = open_backend(url, credentials_file=creds)
            yield vfs, Replicator(store.root, store.ns, vfs.engine, backend, cfg)
    finally:
        store.close()


def s3_client(srv: SeaweedFS) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=srv.endpoint, region_name=srv.region,
        aws_access_key_id=srv.access_key, aws_secret_access_key=srv.secret_key,
        config=Config(s3={"addressing_style": "path"}))


def retention_of(client: Any, bucket: str, key: str) -> tuple[str, int]:
    got = client.get_object_retention(Bucket=bucket, Key=key)["Retention"]
    until: datetime = got["RetainUntilDate"]
    return got["Mode"], int(until.timestamp()) * 10**9


def block_names(vfs: Vfs, ino: int) -> set[str]:
    return {alog.block_name(r.block_id) for r in vfs.block_refs(ino).values()}


async def test_s3_object_lock_keeps_locked_snapshots_and_tombstones(
        workdir: Path, seaweed: SeaweedFS, locked_bucket: str) -> None:
    prefix = f"ret-{uuid.uuid4().hex[:8]}"
    url = seaweed.url(locked_bucket, prefix)
    client = s3_client(seaweed)
    async with served(workdir, url, seaweed.env(), "compliance") as (vfs, rep):
        kept = await vfs.write_file(b"kept.dcm", pattern(3 * B, 1))
        lock_until = time.time_ns() + 2 * DAY
        await vfs.snapshots.create("s1", lock_until_ns=lock_until)
        # Two backlog objects per cycle: the pass over the snapshot's three blocks takes two
        # cycles, the second of which has nothing else to ship.
        rep.retention_batch = 2
        t0 = time.monotonic()
        assert await rep.cycle()
        first_cycle = time.monotonic() - t0
        ret = rep.status()["retention"]
        assert ret["backlog_objects"] == 1 and ret["snapshots_retained"] == 0
        assert ret["since_mount_objects_set"] == 2
        assert await rep.cycle()

        ret = rep.status()["retention"]
        assert ret["summary"] == "enforced by the archive (S3 Object Lock, compliance)"
        assert ret["enforced"] and not ret["unenforced"] and ret["snapshots_retained"] == 1

        # Every object the locked snapshot needs, read back through the S3 API.
        head = alog.Head.from_json(alog.open_object(
            vfs.store.db.sealer, alog.HEAD_NAME, rep.backend.get(alog.HEAD_NAME)))
        needed = block_names(vfs, kept) | {n for _, n in head.parts_after(0)} | {
            alog.HEAD_NAME, alog.KEYRING_NAME, alog.CONFIG_NAME}
        assert len(needed) >= 7
        for name in sorted(needed):
            mode, until = retention_of(client, locked_bucket, f"{prefix}/{name}")
            assert mode == "COMPLIANCE" and until >= lock_until, name
        assert ret["since_mount_objects_set"] == len(needed) and ret["backlog_objects"] == 0
        assert not await rep.cycle()  # the pass is done: nothing left to do

        # A replicated block that loses its last reference: tombstone + retention_days.
        gone = await vfs.write_file(b"gone.dcm", pattern(B, 2))
        gone_blocks = block_names(vfs, gone)
        assert await rep.cycle()
        await vfs.unlink(b"gone.dcm")
        await vfs.settle()
        assert await rep.cycle()
        db = vfs.store.db
        with db.begin() as txn:
            tombs = {alog.block_name(k): read_u64(v) for k, v in db.scan(txn, "tombstones")}
        assert set(tombs) == gone_blocks
        for name, when in tombs.items():
            mode, until = retention_of(client, locked_bucket, f"{prefix}/{name}")
            assert mode == "COMPLIANCE" and until >= when + 7 * DAY

        # Retention only moves later, and compliance never becomes governance.
        name = next(iter(gone_blocks))
        before = retention_of(client, locked_bucket, f"{prefix}/{name}")
        assert not rep.backend.set_retention(name, "governance", time.time_ns() + DAY)
        assert retention_of(client, locked_bucket, f"{prefix}/{name}") == before

        # gc with a retention of 0 days (what a compromised admin would try): the archive's
        # retention still holds, so gc deletes nothing and keeps the tombstones.
        report = verify.GcReport()
        verify.collect_blocks(db, rep.backend, [bytes.fromhex(n[7:].replace("/", ""))
                                                for n in tombs], 0, time.time_ns(), report,
                              locked=True)
        assert report.blocks_deleted == 0 and report.blocks_retained == len(tombs)
        with db.begin() as txn:
            assert {alog.block_name(k) for k, _ in db.scan(txn, "tombstones")} == set(tombs)
        assert all(rep.backend.size(n) for n in tombs)
    print(f"first cycle with two objects of a lock pass: {first_cycle:.2f} s")


def test_s3_purge_deletes_every_version_unless_one_is_retained(
        seaweed: SeaweedFS, locked_bucket: str) -> None:
    """What gc uses on a versioned bucket: a plain delete would only add a delete marker."""
    prefix = f"purge-{uuid.uuid4().hex[:8]}"
    backend = open_backend(seaweed.url(locked_bucket, prefix), env=seaweed.env())
    client = s3_client(seaweed)

    def versions(name: str) -> int:
        listing = client.list_object_versions(Bucket=locked_bucket, Prefix=f"{prefix}/{name}")
        return len(listing.get("Versions", [])) + len(listing.get("DeleteMarkers", []))

    for name in ("free", "kept"):
        backend.put(name, b"one")
        backend.put(name, b"two")
        assert versions(name) == 2
    assert backend.set_retention("kept", "governance", time.time_ns() + DAY)
    assert backend.purge("free") and versions("free") == 0
    assert backend.size("free") is None
    # SeaweedFS refuses to delete the retained version (the older one has no retention).
    assert not backend.purge("kept") and versions("kept") == 1
    assert verify.retained(backend, "kept", time.time_ns())
    assert not verify.retained(backend, "free", time.time_ns())


async def test_s3_bucket_without_object_lock_is_reported_not_supported(
        workdir: Path, seaweed: SeaweedFS) -> None:
    url = seaweed.url(BUCKET, f"ret-{uuid.uuid4().hex[:8]}")
    async with served(workdir, url, seaweed.env(), "compliance") as (vfs, rep):
        await vfs.write_file(b"a.dcm", pattern(B, 3))
        await vfs.snapshots.create("s", lock_until_ns=time.time_ns() + DAY)
        assert await rep.cycle()  # replication goes on: the hot store keeps the lock
        ret = rep.status()["retention"]
        assert ret["summary"] == (f"not supported by this archive: bucket {BUCKET} has no "
                                  "versioning, which Object Lock needs; use a bucket created "
                                  "with Object Lock enabled")
        assert ret["unenforced"] and not ret["enforced"] and ret["snapshots_retained"] == 0


async def test_azurite_without_immutability_is_reported_not_supported(
        workdir: Path, azurite: Azurite) -> None:
    url = azurite.url(BUCKET, f"ret-{uuid.uuid4().hex[:8]}")
    async with served(workdir, url, azurite.env(), "governance") as (vfs, rep):
        await vfs.write_file(b"a.dcm", pattern(B, 4))
        assert await rep.cycle()
        ret = rep.status()["retention"]
        assert ret["summary"] == (f"not supported by this archive: container {BUCKET} has no "
                                  "version-level immutability; use a container created with "
                                  "version-level immutability support")
        assert ret["unenforced"] and ret["mechanism"] == "Azure version-level immutability"
        assert rep.backend.size(alog.HEAD_NAME)


def test_status_of_a_mount_says_a_file_archive_cannot_enforce_a_lock(workdir: Path) -> None:
    """`vnafs status`, human and --json, through a real mount and the control socket."""
    fs = Fs(workdir, archive=f"file://{workdir / 'archive'}").create()
    toml = fs.hot / "vnafs.toml"
    toml.write_text(toml.read_text().replace('object_lock = "off"',
                                             'object_lock = "compliance"'))
    try:
        fs.mount()
        (fs.mnt / "a.bin").write_bytes(b"a" * 1000)
        fs.wait_replicated()
        st = fs.status()
        ret = st["archive"]["retention"]
        assert ret["requested"] == "compliance" and ret["enforced"] is False
        assert ret["summary"].startswith("not supported by this archive: a file:// archive")
        assert st["health"] == "degraded"  # asked for, and not done: never a silent pass
        human = run_vnafs("status", str(fs.mnt)).stdout
        assert f"  retention     {ret['summary']}\n" in human
    finally:
        fs.cleanup()


async def test_s3_resealed_objects_are_retained_again(
        workdir: Path, seaweed: SeaweedFS, locked_bucket: str) -> None:
    """`vnafs key reseal` overwrites archive blocks, which makes new object versions: the
    locks must be set again on them (the old versions keep theirs, under the old key)."""
    import trio

    from vnafs import keyadmin
    from vnafs.reseal import Resealer

    prefix = f"ret-{uuid.uuid4().hex[:8]}"
    url = seaweed.url(locked_bucket, prefix)
    client = s3_client(seaweed)
    async with served(workdir, url, seaweed.env(), "compliance") as (vfs, rep):
        kept = await vfs.write_file(b"kept.dcm", pattern(2 * B, 3))
        lock_until = time.time_ns() + 2 * DAY
        await vfs.snapshots.create("s1", lock_until_ns=lock_until)
        assert await rep.cycle()
        assert rep.status()["retention"]["snapshots_retained"] == 1

        store = vfs.store
        keyadmin.apply(store.keyring, keyadmin.ROTATE, SOURCE)
        report = await trio.to_thread.run_sync(
            Resealer(store.db, store.hot, store.sealer, rep.backend).run)
        assert report.archive_resealed >= 2
        rep.after_reseal()
        assert rep.status()["retention"]["snapshots_retained"] == 0
        assert await rep.cycle()
        assert rep.status()["retention"]["snapshots_retained"] == 1
        for name in sorted(block_names(vfs, kept)):
            key = f"{prefix}/{name}"
            versions = client.list_object_versions(Bucket=locked_bucket, Prefix=key)
            assert len(versions["Versions"]) == 2, name
            current = client.get_object(Bucket=locked_bucket, Key=key, Range="bytes=0-27")
            assert int.from_bytes(current["Body"].read()[8:12], "big") == 2
            mode, until = retention_of(client, locked_bucket, key)
            assert mode == "COMPLIANCE" and until >= lock_until, name
