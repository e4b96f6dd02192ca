"""Replication to a `file://` archive, restore from it, and read-only archive mounts.

Real mounts made by the real CLI; the archive is a directory, so these tests need no server.
The same code paths against SeaweedFS and Azurite are in test_replication_servers.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Fs, _mounted, run_vnafs

NAME = "Zzyzx^Quentavius"
PID = "PID-77-31337"


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Everything a restore must bring back: type and mode, size, content or link target."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(path)
            else:
                digest = ""
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, digest)
    return out


def write_sample(mnt: Path, seed: int = 0) -> None:
    """A small but varied tree: sizes across the block boundary, a sparse file, a hard link,
    a symlink, an xattr, an empty directory."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    (mnt / "incoming" / "a").mkdir(parents=True)
    (mnt / "empty").mkdir()
    for i, size in enumerate((0, 1, 4096, (1 << 20) - 1, (1 << 20) + 17, 3 << 20)):
        (mnt / "incoming" / "a" / f"f{i}").write_bytes((rnd * (size // 32 + 1))[:size])
    with open(mnt / "incoming" / "sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"tail")
    os.link(mnt / "incoming" / "a" / "f2", mnt / "incoming" / "hardlink")
    os.symlink("a/f1", mnt / "incoming" / "symlink")
    os.setxattr(mnt / "incoming" / "a" / "f3", "user.note", b"kept")
    os.chmod(mnt / "incoming" / "a" / "f4", 0o640)


@pytest.fixture
def archived(workdir: Path) -> Iterator[Fs]:
    """A mounted file system replicating into a file:// archive every second."""
    archive = workdir / "archive"
    fs = Fs(workdir / "site", archive=f"file://{archive}")
    fs.root.mkdir()
    fs.create()
    _set_archive(fs, interval=1)
    try:
        yield fs.mount()
    finally:
        fs.cleanup()


def _set_archive(fs: Fs, **values: object) -> None:
    cfg = fs.hot / "vnafs.toml"
    text = cfg.read_text()
    for key, value in values.items():
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} =")]
        at = lines.index("[archive]") + 1
        lines.insert(at, f"{key} = {json.dumps(value)}")
        text = "\n".join(lines) + "\n"
    cfg.write_text(text)


def archive_dir(fs: Fs) -> Path:
    assert fs.archive is not None
    return Path(fs.archive.removeprefix("file://"))


def restore_to(fs: Fs, target: Path, *extra: str) -> str:
    res = run_vnafs("restore", "--key-file", str(fs.key), "--no-progress", *extra,
                    str(fs.archive), str(target), env=fs.env, timeout=300)
    return res.stdout


def assert_restores(fs: Fs, workdir: Path, expected: dict[str, tuple[int, int, str]],
                    name: str = "restored") -> None:
    """Restore `fs`'s archive into a new hot store, mount it and compare with `expected`."""
    target, mnt = workdir / name, workdir / f"{name}-mnt"
    restore_to(fs, target)
    mnt.mkdir()
    run_vnafs("mount", "--key-file", str(fs.key), str(target), str(mnt), env=fs.env)
    try:
        assert tree(mnt) == expected
    finally:
        run_vnafs("umount", str(mnt))


def test_status_shows_recovery_point_and_nothing_pending(archived: Fs) -> None:
    (archived.mnt / "x").write_bytes(b"x" * 1000)
    arch = archived.wait_replicated()
    assert arch["state"] == "ok"
    assert arch["url"] == archived.archive
    assert arch["lag_seconds"] == 0
    assert time.time_ns() - arch["recovery_point_ns"] < 60e9
    text = run_vnafs("status", str(archived.mnt)).stdout
    assert "recovery pt" in text and "pending       0 blocks" in text
    names = {p.relative_to(archive_dir(archived)).as_posix()
             for p in archive_dir(archived).rglob("*") if p.is_file()}
    assert {"keyring", "config", "meta/HEAD"} <= names
    assert any(n.startswith("meta/checkpoint/") for n in names)
    assert any(n.startswith("blocks/") for n in names)


def test_disaster_recovery_restores_every_byte(archived: Fs, workdir: Path) -> None:
    write_sample(archived.mnt)
    before = tree(archived.mnt)
    archived.wait_replicated()
    # More changes after the first cycles: overwrite, delete, rename.
    (archived.mnt / "incoming" / "a" / "f2").write_bytes(b"rewritten")
    os.unlink(archived.mnt / "incoming" / "a" / "f5")
    os.rename(archived.mnt / "incoming" / "a" / "f0", archived.mnt / "renamed")
    before = tree(archived.mnt)
    archived.wait_replicated()
    archived.kill9()
    shutil.rmtree(archived.hot)  # the hot store is gone

    restored = Fs(workdir / "site", archive=archived.archive)
    out = restore_to(restored, archived.hot)
    assert "restored" in out
    restored.mount()
    try:
        assert tree(restored.mnt) == before
        assert os.getxattr(restored.mnt / "incoming" / "a" / "f3", "user.note") == b"kept"
        assert os.stat(restored.mnt / "incoming" / "hardlink").st_nlink == 2
        # The restored store goes on replicating into the same archive.
        (restored.mnt / "after-restore").write_bytes(b"new")
        restored.wait_replicated()
    finally:
        restored.umount()
    run_vnafs("fsck", "--key-file", str(restored.key), str(restored.hot))


def test_changes_made_while_daemon_was_killed_are_replicated_after_remount(
        archived: Fs, workdir: Path) -> None:
    archived.umount()
    _set_archive(archived, interval=3600)  # the first cycle runs at mount, then none
    archived.mount()
    archived.wait_replicated()
    (archived.mnt / "late").write_bytes(os.urandom(3 << 20))
    expected = tree(archived.mnt)
    assert archived.status()["archive"]["pending_blocks"] == 3
    archived.kill9()  # the outbox is in LMDB: nothing is lost
    _set_archive(archived, interval=1)
    archived.mount()
    archived.wait_replicated()
    archived.umount()
    assert_restores(archived, workdir, expected)


def test_unmount_ships_the_last_changes(archived: Fs, workdir: Path) -> None:
    archived.umount()
    _set_archive(archived, interval=3600)
    archived.mount()
    (archived.mnt / "last").write_bytes(b"written just before unmount")
    expected = tree(archived.mnt)
    archived.umount()  # the final cycle at unmount ships it
    assert_restores(archived, workdir, expected)


def test_deleted_data_stays_in_the_archive(archived: Fs) -> None:
    data = os.urandom(2 << 20)
    (archived.mnt / "doomed").write_bytes(data)
    archived.wait_replicated()
    blocks = {p for p in (archive_dir(archived) / "blocks").rglob("*") if p.is_file()}
    assert len(blocks) == 2
    os.unlink(archived.mnt / "doomed")
    archived.wait_replicated()
    after = {p for p in (archive_dir(archived) / "blocks").rglob("*") if p.is_file()}
    assert blocks <= after  # deletes never destroy archive data
    assert archived.status()["blocks"] == 0  # but the hot store let them go


def test_resend_of_deleted_data_is_not_uploaded_again(archived: Fs) -> None:
    data = os.urandom(1 << 20)
    (archived.mnt / "a").write_bytes(data)
    archived.wait_replicated()
    os.unlink(archived.mnt / "a")
    archived.wait_replicated()
    uploaded = archived.status()["archive"]["since_mount_blocks_uploaded"]
    (archived.mnt / "b").write_bytes(data)  # the PACS sends the same instance again
    archived.wait_replicated()
    arch = archived.status()["archive"]
    assert arch["since_mount_blocks_uploaded"] == uploaded


def test_nothing_readable_in_the_archive(archived: Fs) -> None:
    from tools.gen_studies import Patient, write_ct_series

    folder = archived.mnt / f"{NAME}_{PID}"
    patient = Patient(PID, "HOSP-A", NAME, "19610203")
    made = write_ct_series(folder, seed=5, count=3, patient=patient)
    os.setxattr(folder, f"user.{NAME}", PID.encode())
    assert archived.wait_indexed()["instances"] == 3
    archived.wait_replicated()
    uids = {u for m in made for u in (m.sop_uid, m.study_uid, m.series_uid)}
    secrets = [NAME.encode(), PID.encode(), b"Quentavius", *(u.encode() for u in uids)]
    files = 0
    for path in archive_dir(archived).rglob("*"):
        assert not any(s.decode() in path.as_posix() for s in secrets)
        if path.is_file():
            files += 1
            data = path.read_bytes()
            assert not any(s in data for s in secrets), path
    assert files > 6


def test_recall_repairs_a_lost_hot_block(archived: Fs) -> None:
    data = os.urandom(1 << 20)
    (archived.mnt / "precious").write_bytes(data)
    archived.wait_replicated()
    archived.umount()
    block_files = [p for p in (archived.hot / "blocks").rglob("*") if p.is_file()]
    assert len(block_files) == 1
    block_files[0].unlink()
    archived.mount()
    assert (archived.mnt / "precious").read_bytes() == data
    assert block_files[0].exists()  # the hot copy was put back
    assert "restored it from the archive" in archived.log()


def test_archive_only_mount_follows_replication(archived: Fs, workdir: Path) -> None:
    write_sample(archived.mnt)
    archived.wait_replicated()
    ro = [workdir / "ro1", workdir / "ro2"]
    for i, mnt in enumerate(ro):
        mnt.mkdir()
        run_vnafs("mount", "--archive-only", "--key-file", str(archived.key),
                  "--cache", str(workdir / f"cache{i}"), "-o", "poll=1", str(archived.archive),
                  str(mnt))
    try:
        for mnt in ro:
            assert tree(mnt) == tree(archived.mnt)
        with pytest.raises(OSError) as exc:
            (ro[0] / "new").write_bytes(b"x")
        assert exc.value.errno == errno.EROFS
        for action in (lambda: os.mkdir(ro[0] / "d"),
                       lambda: os.unlink(ro[0] / "incoming" / "sparse"),
                       lambda: os.rename(ro[0] / "incoming", ro[0] / "elsewhere"),
                       lambda: os.chmod(ro[0] / "incoming", 0o700),
                       lambda: os.setxattr(ro[0] / "incoming", "user.x", b"1")):
            with pytest.raises(OSError) as exc:
                action()
            assert exc.value.errno == errno.EROFS
        # New replicated changes appear within the poll interval.
        (archived.mnt / "incoming" / "later").write_bytes(b"later")
        archived.wait_replicated()
        deadline = time.monotonic() + 15
        while not (ro[1] / "incoming" / "later").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (ro[1] / "incoming" / "later").read_bytes() == b"later"
        st = json.loads(run_vnafs("status", "--json", str(ro[1])).stdout)
        assert st["archive"]["mode"] == "read-only archive mount"
        assert st["archive"]["cycle"] >= 2
    finally:
        for mnt in ro:
            run_vnafs("umount", str(mnt), check=False)


def test_bad_inputs_give_one_line_errors(archived: Fs, workdir: Path) -> None:
    archived.wait_replicated()
    other_key = workdir / "other.key"
    run_vnafs("keygen", str(other_key))
    res = run_vnafs("restore", "--key-file", str(other_key), "--no-progress",
                    str(archived.archive), str(workdir / "r1"), check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "key" in res.stderr.lower() and len(res.stderr.strip().splitlines()) == 1
    busy = workdir / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    res = run_vnafs("restore", "--key-file", str(archived.key), str(archived.archive),
                    str(busy), check=False)
    assert res.returncode == 1 and "not empty" in res.stderr
    empty = workdir / "empty-archive"
    empty.mkdir()
    res = run_vnafs("restore", "--key-file", str(archived.key), f"file://{empty}",
                    str(workdir / "r2"), check=False)
    assert res.returncode == 1 and "keyring" in res.stderr and not (workdir / "r2").exists()
    # A wrong URL fails on the first request, before anything is created locally.
    res = run_vnafs("restore", "--key-file", str(archived.key), f"file://{workdir}/no/such",
                    str(workdir / "r4"), check=False)
    assert res.returncode == 1 and "does not exist" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (workdir / "r4").exists()
    # The read-only archive mount never writes to the archive, not even a missing directory.
    ro = workdir / "ro-typo"
    ro.mkdir()
    try:
        res = run_vnafs("mount", "--archive-only", "--key-file", str(archived.key), "--cache",
                        str(workdir / "cache-typo"), f"file://{workdir}/typo", str(ro),
                        check=False)
    finally:
        if _mounted(ro):  # a wrongly successful mount must not outlive the test
            run_vnafs("umount", str(ro))
    assert res.returncode == 1 and "does not exist" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (workdir / "typo").exists()
    res = run_vnafs("mkfs", "--key-file", str(archived.key), "--archive",
                    str(archived.archive), str(workdir / "second"), check=False)
    assert res.returncode == 1 and "already holds a file system" in res.stderr
    res = run_vnafs("restore", "--key-file", str(archived.key), "ftp://x/y",
                    str(workdir / "r3"), check=False)
    assert res.returncode == 1 and "unsupported scheme" in res.stderr


def test_interrupted_restore_resumes(archived: Fs, workdir: Path) -> None:
    (archived.mnt / "big").write_bytes(os.urandom(6 << 20))
    expected = tree(archived.mnt)
    archived.wait_replicated()
    archived.umount()  # one hot store per archive prefix: the restored one takes over
    target = workdir / "restored"
    restore_to(archived, target)
    # Simulate an interruption during the block download: marker back, three blocks not yet
    # written, one torn (blocks are written in place) and one damaged.
    (target / "FORMAT").unlink()
    (target / "RESTORING").write_text(json.dumps({"url": archived.archive,
                                                  "stage": "blocks"}))
    files = sorted(p for p in (target / "blocks").rglob("*") if p.is_file())
    assert len(files) >= 5
    for p in files[:3]:
        p.unlink()
    torn = files[3].read_bytes()
    files[3].write_bytes(torn[: len(torn) // 2])
    damaged = bytearray(files[4].read_bytes())
    damaged[len(damaged) // 2] ^= 1
    files[4].write_bytes(bytes(damaged))
    ro = workdir / "ro"
    ro.mkdir()
    res = run_vnafs("mount", "--key-file", str(archived.key), str(target), str(ro), check=False)
    assert res.returncode == 1 and "unfinished restore" in res.stderr
    out = restore_to(archived, target)
    assert "5 downloaded now" in out
    assert files[3].read_bytes() == torn
    run_vnafs("mount", "--key-file", str(archived.key), str(target), str(ro))
    try:
        assert tree(ro) == expected
    finally:
        run_vnafs("umount", str(ro))


def _blocks_in(fs: Fs) -> list[Path]:
    return sorted(p for p in (archive_dir(fs) / "blocks").rglob("*") if p.is_file())


def test_verify_reports_and_repairs_damage_behind_our_back(archived: Fs, workdir: Path) -> None:
    for i in range(3):
        (archived.mnt / f"f{i}").write_bytes(os.urandom(1 << 20))
    expected = tree(archived.mnt)
    archived.wait_replicated()
    res = run_vnafs("verify", "--archive", str(archived.mnt))
    assert "checked" in res.stdout and "corrupt" not in res.stdout
    flipped, deleted, _ = _blocks_in(archived)
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0x40
    flipped.write_bytes(bytes(data))
    deleted.unlink()
    part = next((archive_dir(archived) / "meta" / "checkpoint").iterdir())
    part.write_bytes(part.read_bytes()[:-5] + b"XXXXX")
    res = run_vnafs("verify", "--archive", "--json", str(archived.mnt))
    rep = json.loads(res.stdout)
    rel = {p: p.relative_to(archive_dir(archived)).as_posix() for p in (flipped, deleted, part)}
    assert rep["corrupt"] == sorted([rel[flipped], rel[part]])
    assert rep["missing"] == [rel[deleted]]
    assert sorted(rep["repaired"]) == sorted([rel[flipped], rel[deleted]])
    assert rep["checkpoint_needed"] and not rep["unrepaired"]
    assert "damaged" in archived.log()
    # The next cycle writes a new checkpoint; then the archive is whole again.
    deadline = time.monotonic() + 30
    while archived.status()["archive"]["checkpoint_cycle"] == 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    part.unlink()  # the damaged part is no longer needed
    rep = json.loads(run_vnafs("verify", "--archive", "--json", str(archived.mnt)).stdout)
    assert not rep["corrupt"] and not rep["missing"], rep
    archived.umount()
    assert_restores(archived, workdir, expected)


def test_verify_restores_a_damaged_or_missing_archive_keyring(archived: Fs,
                                                              workdir: Path) -> None:
    """Without the keyring nothing in the archive can be restored: verify checks that it is
    the hot store's, byte for byte, and puts it back when it is damaged or gone."""
    (archived.mnt / "f").write_bytes(os.urandom(1 << 20))
    expected = tree(archived.mnt)
    archived.wait_replicated()
    keyring = archive_dir(archived) / "keyring"
    local = (archived.hot / "keyring").read_bytes()
    assert keyring.read_bytes() == local
    data = bytearray(local)
    data[-3] ^= 0x01  # still starts with the keyring's magic
    keyring.write_bytes(bytes(data))
    rep = json.loads(run_vnafs("verify", "--archive", "--json", str(archived.mnt)).stdout)
    assert rep["corrupt"] == ["keyring"] and rep["repaired"] == ["keyring"], rep
    assert keyring.read_bytes() == local
    keyring.unlink()
    rep = json.loads(run_vnafs("verify", "--archive", "--json", str(archived.mnt)).stdout)
    assert rep["missing"] == ["keyring"] and rep["repaired"] == ["keyring"], rep
    assert keyring.read_bytes() == local
    rep = json.loads(run_vnafs("verify", "--archive", "--json", str(archived.mnt)).stdout)
    assert not rep["corrupt"] and not rep["missing"] and not rep["repaired"], rep
    archived.umount()
    assert_restores(archived, workdir, expected)


def test_a_restored_store_never_reuses_cycle_numbers_already_in_the_archive(
        archived: Fs, workdir: Path) -> None:
    """The archive can hold parts of cycles beyond its HEAD: a store that crashed between
    uploading a cycle's parts and its HEAD, or an older HEAD put back. A store restored from
    that HEAD must number its cycles above every part there, or its parts would be taken for
    the stale ones (parts are written create-only) and a later restore would bring back the
    other timeline instead of its changes."""
    fs = archived
    (fs.mnt / "one").write_bytes(b"1" * 1000)
    fs.wait_replicated()
    head = archive_dir(fs) / "meta" / "HEAD"
    old_head = head.read_bytes()
    (fs.mnt / "two").write_bytes(b"2" * 1000)
    fs.wait_replicated()
    fs.kill9()  # the first store is lost; its newest cycle stays in the archive, past...
    head.write_bytes(old_head)  # ...the HEAD a restore now starts from
    second = Fs(workdir / "second", archive=fs.archive)
    second.root.mkdir()
    second.mnt.mkdir()
    shutil.copy(fs.key, second.key)
    restore_to(fs, second.hot)
    try:
        second.mount()
        assert sorted(os.listdir(second.mnt)) == ["one"]
        (second.mnt / "three").write_bytes(b"3" * 1000)
        second.wait_replicated()
        expected = tree(second.mnt)
        second.umount()
    finally:
        second.cleanup()
    assert_restores(fs, workdir, expected, name="third")


def test_a_mount_numbers_its_cycles_above_parts_it_did_not_reserve(archived: Fs,
                                                                   workdir: Path) -> None:
    """What a power loss that lost a cycle's reservation after its parts were uploaded leaves
    (LMDB commits are not synced one by one): a part beyond the store's own numbering. The
    next mount's cycles go above it instead of taking it for their own."""
    fs = archived
    (fs.mnt / "one").write_bytes(b"1" * 1000)
    fs.wait_replicated()
    fs.umount()
    stale = archive_dir(fs) / "meta" / "log" / f"{0x40:016x}-0000"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"a part of a cycle whose reservation was lost")
    fs.mount()
    (fs.mnt / "two").write_bytes(b"2" * 1000)
    arch = fs.wait_replicated()
    assert arch["cycle"] > 0x40, arch
    expected = tree(fs.mnt)
    fs.umount()
    assert_restores(fs, workdir, expected)


def test_gc_deletes_only_what_retention_allows(archived: Fs) -> None:
    keep = os.urandom(1 << 20)
    (archived.mnt / "keep").write_bytes(keep)
    (archived.mnt / "drop").write_bytes(os.urandom(1 << 20))
    archived.wait_replicated()
    os.unlink(archived.mnt / "drop")
    archived.wait_replicated()
    assert len(_blocks_in(archived)) == 2
    out = run_vnafs("gc", "--archive", str(archived.mnt)).stdout
    assert "deleted 0 blocks" in out and "1 deleted blocks are still within" in out
    assert len(_blocks_in(archived)) == 2
    archived.umount()
    _set_archive(archived, retention_days=0)
    archived.mount()
    archived.wait_replicated()
    out = run_vnafs("gc", "--archive", str(archived.mnt)).stdout
    assert "deleted 1 blocks" in out
    assert len(_blocks_in(archived)) == 1
    assert "archive gc: deleted blocks/" in archived.log()
    rep = json.loads(run_vnafs("verify", "--archive", "--json", str(archived.mnt)).stdout)
    assert not rep["corrupt"] and not rep["missing"]
    # A resend after gc uploads the block again.
    (archived.mnt / "again").write_bytes(keep)
    (archived.mnt / "drop2").write_bytes(b"y" * 100)
    archived.wait_replicated()
    assert (archived.mnt / "keep").read_bytes() == keep
