"""Data key rotation, re-seal and retirement, in process (docs/architecture.md section 4).

What must hold: `rotate` makes a new data key current and seals the keyring under a new keyring
key (so an old keyring copy plus the KEK that opened it cannot read the new data key from a
later copy); other slots are refused unless dropped; `Resealer` moves every LMDB record and
block file to the current key without changing a byte of plaintext, block ids or snapshots;
`find_sealed` finds everything under a version; `retire` refuses while anything is, and after
it the keyring no longer holds the key, and an envelope under it fails with a message that says
the key was retired. Mount-level runs (through the control socket, with an archive, restore
afterwards) are in tests/test_keys_lifecycle.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.unit.harness import SOURCE, Vfs, pattern
from tests.unit.test_keys_lifecycle import key, new_ring, read_v2, unchanged
from vnafs import keyadmin
from vnafs.errors import IntegrityError, VnafsError
from vnafs.keys import Keyring
from vnafs.meta.db import records
from vnafs.reseal import SEALED_TABLES, Resealer, envelope_version, find_sealed
from vnafs.seal import KIND_BLOCK, Sealer


def test_rotate_adds_a_version_and_a_new_keyring_key(tmp_path: Path) -> None:
    ring = new_ring(tmp_path)
    sealer = Sealer(ring)
    old_env = sealer.seal(KIND_BLOCK, b"ctx", b"before" * 100)
    ring.rewrap(key(1), key(2))  # version 2 keyring: a keyring key that the slot wraps
    copy = ring.path.read_bytes()
    _, before = read_v2(copy, {0: bytes([2]) * 32})
    version, slot, dropped = ring.rotate(key(2))
    assert (version, slot.number, dropped) == (2, 0, [])
    assert ring.current_version == 2 and ring.versions == [1, 2]
    new_env = sealer.seal(KIND_BLOCK, b"ctx", b"after" * 100)
    assert envelope_version(new_env, "b") == 2 and envelope_version(old_env, "b") == 1
    again = Keyring.open(ring.path, key(2))
    assert Sealer(again).open(KIND_BLOCK, b"ctx", old_env) == b"before" * 100
    assert Sealer(again).open(KIND_BLOCK, b"ctx", new_env) == b"after" * 100
    _, after = read_v2(ring.path.read_bytes(), {0: bytes([2]) * 32})
    assert after["master"] == before["master"] and after["data_keys"]["1"] == \
        before["data_keys"]["1"] and "2" in after["data_keys"] and after["current"] == 2
    # The keyring key known to whoever held the old copy and its KEK does not open the new file.
    old_key = AESGCM(bytes([2]) * 32).decrypt(copy[40:52], copy[52:100], copy[10:52])
    data = ring.path.read_bytes()
    end = len(data) - len(json.dumps(after, separators=(",", ":"))) - 16 - 12
    with pytest.raises(InvalidTag):
        AESGCM(old_key).decrypt(data[end:end + 12], data[end + 12:], data[:end + 12])


def test_rotate_with_other_slots_needs_drop(tmp_path: Path) -> None:
    ring = new_ring(tmp_path)
    ring.add_slot(key(1), key(3), label="recovery")
    with unchanged(ring.path), pytest.raises(VnafsError, match=r"slots 1 \(recovery\) would "
                                             r"stop opening.*--drop-other-slots"):
        ring.rotate(key(1))
    with unchanged(ring.path), pytest.raises(VnafsError, match="wrong key"):
        ring.rotate(key(9), drop_other_slots=True)
    version, slot, dropped = ring.rotate(key(3), drop_other_slots=True)
    assert version == 2 and slot.label == "recovery" and [s.number for s in dropped] == [0]
    assert [s.number for s in ring.slots] == [1]
    with pytest.raises(VnafsError, match="wrong key"):
        Keyring.open(ring.path, key(1))
    assert Keyring.open(ring.path, key(3)).current_version == 2


def test_retire_rules_and_the_retired_message(tmp_path: Path) -> None:
    ring = new_ring(tmp_path)
    sealer = Sealer(ring)
    old_env = sealer.seal(KIND_BLOCK, b"ctx", b"x" * 100)
    with unchanged(ring.path), pytest.raises(VnafsError, match="version 1 is the current one"):
        ring.retire(key(1), 1)
    ring.rotate(key(1))
    with unchanged(ring.path), pytest.raises(VnafsError, match="no data key version 7"):
        ring.retire(key(1), 7)
    with unchanged(ring.path), pytest.raises(VnafsError, match="wrong key"):
        ring.retire(key(5), 1)
    ring.retire(key(1), 1)
    assert ring.versions == [2] and ring.retired == [1]
    with pytest.raises(VnafsError, match="retired already"):
        ring.retire(key(1), 1)
    reopened = Keyring.open(ring.path, key(1))
    assert reopened.versions == [2] and reopened.retired == [1]
    with pytest.raises(IntegrityError, match="sealed under data key version 1, which was "
                       "retired"):
        Sealer(reopened).open(KIND_BLOCK, b"ctx", old_env, name="block b")
    # Numbers are never used twice.
    assert reopened.rotate(key(1))[0] == 3


def _versions(v: Vfs) -> set[int]:
    store = v.store
    seen = set()
    with store.db.begin() as txn:
        for table in SEALED_TABLES:
            for _, value in records(txn.cursor(db=store.db.dbs[table])):
                seen.add(envelope_version(value, table))
    for block_id in store.hot.ids():
        seen.add(envelope_version(store.hot.path(block_id).read_bytes(), "b"))
    return seen


async def test_reseal_moves_everything_and_retire_then_succeeds(vfs: Vfs) -> None:
    store = vfs.store
    data = {f"f{i}".encode(): pattern((i + 1) * 700_000, seed=i) for i in range(4)}
    inos = {name: await vfs.write_file(name, body) for name, body in data.items()}
    snap = await vfs.snapshots.create("before")
    await vfs.unlink(b"f0")  # its blocks stay for the snapshot
    ids_before = vfs.block_files()
    ring = store.keyring
    keyadmin.apply(ring, keyadmin.ROTATE, SOURCE)
    assert _versions(vfs) == {1}
    with unchanged(ring.path), pytest.raises(VnafsError, match=r"still seals \d+ metadata "
                                             r"records, \d+ block files.*vnafs key reseal"):
        keyadmin.retire(store, None, SOURCE, 1)

    await vfs.write_file(b"new", pattern(300_000, seed=9))
    report = Resealer(store.db, store.hot, store.sealer, None).run()
    assert report.to_version == 2 and report.phase == "done"
    assert report.blocks_resealed == len(ids_before) and report.records_resealed > 10
    assert _versions(vfs) == {2}
    assert find_sealed(store.db, store.hot, None, 1).total == 0
    assert vfs.block_files() >= ids_before  # same ids: nothing re-chunked or re-hashed
    # A second run has nothing to do.
    again = Resealer(store.db, store.hot, store.sealer, None).run()
    assert again.records_resealed == again.blocks_resealed == 0

    result = keyadmin.retire(store, None, SOURCE, 1)
    assert result["data_key_versions"] == [2] and result["retired"] == [1]
    vfs.drop_cache()
    for name, body in data.items():
        if name != b"f0":
            assert await vfs.read_file(inos[name]) == body
    assert await vfs.read_in_snapshot(snap, inos[b"f0"]) == data[b"f0"]


async def test_a_keyring_copy_from_before_retire_is_what_opens_old_blocks(vfs: Vfs,
                                                                         tmp_path: Path) -> None:
    """The point of retiring: the keyring the store (and the archive) keeps no longer holds
    the old key, so it no longer opens a block file copied before the re-seal."""
    store = vfs.store
    ino = await vfs.write_file(b"a", pattern(200_000))
    (block_id,) = {r.block_id for r in vfs.block_refs(ino).values()}
    stolen = store.hot.path(block_id).read_bytes()
    old_keyring = tmp_path / "old-keyring"
    shutil.copy(store.keyring.path, old_keyring)
    keyadmin.apply(store.keyring, keyadmin.ROTATE, SOURCE)
    Resealer(store.db, store.hot, store.sealer, None).run()
    keyadmin.retire(store, None, SOURCE, 1)
    with pytest.raises(IntegrityError, match="retired"):
        store.sealer.open(KIND_BLOCK, block_id, stolen)
    assert Sealer(Keyring.open(old_keyring, SOURCE)).open(KIND_BLOCK, block_id, stolen) == \
        pattern(200_000)


async def test_the_audit_chain_still_verifies_after_reseal_and_retire(vfs: Vfs) -> None:
    """Re-sealing changes every audit record's envelope but not its plaintext, so the chain
    (MACs over the plaintext, docs/format.md 5.6) is unchanged and still verifies."""
    from vnafs.audit.chain import AuditLog, Event
    from vnafs.meta.tx import Tx

    store = vfs.store
    log = AuditLog(store.db, store.keyring.audit_key)
    events = [Event(1_767_225_600_000_000_000 + n, 1000, 100, 4000 + n, "p", "read", n)
              for n in range(1, 4)]

    def append(tx: Tx) -> None:
        log.append(tx.txn, events)

    await vfs.engine.commit(append)
    keyadmin.apply(store.keyring, keyadmin.ROTATE, SOURCE)
    assert Resealer(store.db, store.hot, store.sealer, None).run().records_resealed >= 4
    keyadmin.retire(store, None, SOURCE, 1)
    rep = log.verify()
    assert rep.ok and rep.records == 3
    with store.db.begin() as txn:
        assert [e for _, e in log.records(txn)] == events
