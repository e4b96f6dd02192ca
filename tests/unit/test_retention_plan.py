"""Which archive objects must be retained until when (vnafs/archive/retention.py), without servers.

The plan is computed over a real store served in-process (tests/unit/harness.py) with a
`file://` archive, replicated by the real `Replicator`: which blocks a locked snapshot sees,
which tombstones need retention, what is remembered as done, and what `vnafs status` says
when the archive cannot enforce anything. The calls that set retention on S3 and Azure are
tested against the servers in tests/test_retention.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vnafs import cli, fsck
from vnafs.archive import log as alog
from vnafs.archive import retention as aret
from vnafs.archive.backend import open_backend
from vnafs.archive.replicator import Replicator
from vnafs.meta.db import read_u64
from vnafs.meta.snapshots import Snapshot
from vnafs.store.lifecycle import mkfs, open_store

from .harness import SOURCE, B, Vfs, open_vfs, pattern

DAY = 86400 * 10**9


@pytest.fixture
async def avfs(tmp_path: Path) -> AsyncIterator[Vfs]:
    """A store replicating into a file:// archive, served in-process; fsck after the test."""
    archive = tmp_path / "archive"
    archive.mkdir()
    mkfs(tmp_path / "hot", SOURCE, archive_url=f"file://{archive}", uid=os.getuid(),
         gid=os.getgid())
    store = open_store(tmp_path / "hot", SOURCE)
    try:
        async with open_vfs(store) as v:
            yield v
        report = fsck.check(store, progress=False)
        assert report.clean, f"fsck after the test: {report.summary()}"
    finally:
        store.close()


def replicator(vfs: Vfs, object_lock: str = "off") -> Replicator:
    cfg = vfs.store.config.archive
    cfg.object_lock = object_lock
    return Replicator(vfs.store.root, vfs.ns, vfs.engine, open_backend(cfg.url), cfg)


def blocks_of(vfs: Vfs, ino: int, epoch: int | None = None) -> set[str]:
    return {alog.block_name(ref.block_id) for ref in vfs.block_refs(ino, epoch).values()}


def plan(vfs: Vfs, st: aret.RetentionState, mode: str = "compliance", days: int = 7,
         new_tombstones: tuple[bytes, ...] = (), batch: int = aret.BATCH) -> aret.Targets:
    db = vfs.store.db
    with db.begin() as txn:
        return aret.plan(db, txn, st, mode, days, time.time_ns(), new_tombstones, batch=batch)


def test_due_snapshots_are_locked_ones_not_yet_retained_that_late() -> None:
    now = 1000 * DAY
    snaps = [Snapshot(1, "unlocked", 1, 0), Snapshot(2, "expired", 2, 0, lock_until_ns=now - 1),
             Snapshot(3, "new", 3, 0, lock_until_ns=now + DAY),
             Snapshot(4, "done", 4, 0, lock_until_ns=now + DAY),
             Snapshot(5, "extended", 5, 0, lock_until_ns=now + 9 * DAY)]
    done = {4: now + DAY, 5: now + DAY}
    assert aret.snapshots_due(snaps, done, now) == {3: now + DAY, 5: now + 9 * DAY}


async def test_plan_names_what_a_locked_snapshot_sees_and_remembers_it(avfs: Vfs) -> None:
    old = await avfs.write_file(b"old.dcm", pattern(3 * B, 1))
    changed = await avfs.write_file(b"changed.dcm", pattern(2 * B, 2))
    until = time.time_ns() + 30 * DAY
    snap = await avfs.snapshots.create("s1", lock_until_ns=until)
    frozen = blocks_of(avfs, old) | blocks_of(avfs, changed)
    # After the snapshot: a rewrite of one file and a new file, which the snapshot never saw.
    avfs.open(changed)
    await avfs.write(changed, 0, pattern(2 * B, 3))
    await avfs.close(changed)
    later = await avfs.write_file(b"later.dcm", pattern(B, 4))
    unseen = blocks_of(avfs, later) | blocks_of(avfs, changed)
    assert unseen and not unseen & frozen

    st = aret.RetentionState()
    targets = plan(avfs, st)
    assert targets.objects == dict.fromkeys(frozen, until)
    assert targets.snapshots == {snap.id: until} and targets.meta_until == until
    assert targets.sweep and targets.present == {snap.id}

    # Once committed, the same lock needs nothing more; a later lock needs the pass again.
    st = aret.commit(st, "compliance", targets)
    assert st == aret.RetentionState("compliance", {snap.id: until}, True)
    assert plan(avfs, st).objects == {}
    await avfs.snapshots.lock("s1", until + DAY)
    again = plan(avfs, st)
    assert again.objects == dict.fromkeys(frozen, until + DAY) and not again.sweep
    # Another mode starts over: governance retention is not compliance retention.
    assert plan(avfs, st, mode="governance").snapshots == {snap.id: until + DAY}


async def test_tombstones_get_their_retention_once_all_and_then_only_new_ones(avfs: Vfs) -> None:
    first = await avfs.write_file(b"a.dcm", pattern(B, 5))
    second = await avfs.write_file(b"b.dcm", pattern(B, 6))
    names = {ino: blocks_of(avfs, ino) for ino in (first, second)}
    assert await replicator(avfs).cycle()  # replicated: losing them now leaves tombstones
    await avfs.unlink(b"a.dcm")
    await avfs.unlink(b"b.dcm")
    await avfs.settle()
    db = avfs.store.db
    with db.begin() as txn:
        tombs = {alog.block_name(k): read_u64(v) for k, v in db.scan(txn, "tombstones")}
    assert set(tombs) == names[first] | names[second]

    swept = plan(avfs, aret.RetentionState(), days=7)
    assert swept.sweep and swept.objects == {n: t + 7 * DAY for n, t in tombs.items()}
    st = aret.commit(aret.RetentionState(), "compliance", swept)
    assert st.swept
    # Swept: only the tombstones dirty in this cycle are looked at.
    only = next(iter(names[second]))
    block_id = bytes.fromhex(only.replace("blocks/", "").replace("/", ""))
    assert alog.block_name(block_id) == only
    assert plan(avfs, st, new_tombstones=(block_id,)).objects == {only: tombs[only] + 7 * DAY}
    assert plan(avfs, st).objects == {}
    # A retention that is already over (retention_days = 0) needs nothing.
    assert plan(avfs, aret.RetentionState(), days=0).objects == {}


async def test_a_file_archive_replicates_and_status_says_it_enforces_nothing(
        avfs: Vfs, capsys: pytest.CaptureFixture[str]) -> None:
    await avfs.write_file(b"x.dcm", pattern(B, 7))
    await avfs.snapshots.create("s", lock_until_ns=time.time_ns() + DAY)
    rep = replicator(avfs, "compliance")
    assert await rep.cycle()
    status = rep.status()
    ret = status["retention"]
    assert ret["summary"].startswith("not supported by this archive: a file:// archive is a "
                                     "plain directory")
    assert ret["requested"] == "compliance" and ret["unenforced"] and not ret["enforced"]
    assert ret["since_mount_objects_set"] == 0
    # The data is replicated all the same: the lock is still kept by the hot store.
    assert rep.backend.size(alog.HEAD_NAME)
    cli._print_archive(status)
    line = next(x for x in capsys.readouterr().out.splitlines() if "retention" in x)
    assert line.split(None, 1)[1].startswith("not supported by this archive: a file://")

    off = replicator(avfs, "off")
    await off.cycle()
    ret = off.status()["retention"]
    assert ret["summary"].startswith("not supported by this archive")
    assert not ret["unenforced"]  # nothing was asked for: no health problem


async def test_a_large_pass_is_spread_over_cycles_and_starts_over_when_the_locks_change(
        avfs: Vfs) -> None:
    ino = await avfs.write_file(b"big.dcm", pattern(5 * B, 8))
    until = time.time_ns() + DAY
    snap = await avfs.snapshots.create("s", lock_until_ns=until)
    names = sorted(blocks_of(avfs, ino))
    assert len(names) == 5

    st, seen = aret.RetentionState("compliance", swept=True), []
    for left in (3, 1, 0):
        t = plan(avfs, st, batch=2)
        assert t.backlog_left == left and not (set(t.objects) & set(seen))
        seen += sorted(t.objects)
        # Metadata and the record of the lock only with the cycle that completes the pass.
        assert (t.snapshots, t.meta_until) == (({snap.id: until}, until) if not left
                                               else ({}, 0))
        st = aret.commit(st, "compliance", t)
    assert seen == names and st.snapshots == {snap.id: until} and not st.after

    # A pass interrupted by a new lock date starts over, for the new date.
    st = aret.commit(aret.RetentionState("compliance", swept=True), "compliance",
                     plan(avfs, aret.RetentionState("compliance", swept=True), batch=2))
    assert st.after == names[1]
    await avfs.snapshots.lock("s", until + DAY)
    t = plan(avfs, st, batch=2)
    assert t.objects == dict.fromkeys(names[:2], until + DAY)
