"""Sealing as the store uses it: what is on disk is sealed, and sealed bytes moved are damage.

tests/test_keys_seal.py holds the envelope format itself to account (round trips of every
codec, every flipped byte, context and kind binding, keyrings); tests/test_format1.py checks
it against known-answer vectors. This file checks the store around it, in-process: records of
a real file system moved to another table, key or entry fail authentication instead of
becoming wrong metadata, nothing written through the file layer reaches the disk in clear, and
a wrong key opens nothing. (Block files moved, damaged or missing: test_data_path.py; every
codec through the block files: test_data_path.py, test_every_codec_round_trips....)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vnafs import fsck
from vnafs.errors import IntegrityError, VnafsError
from vnafs.keys import KekSource
from vnafs.meta.db import u64
from vnafs.meta.namespace import XATTR_CREATE
from vnafs.meta.records import ROOT_INO
from vnafs.store.lifecycle import open_store

from .harness import SOURCE, B, Vfs, corpus, make_store, pattern


def raw_items(vfs: Vfs, table: str, prefix: bytes) -> list[tuple[bytes, bytes]]:
    """The sealed (key, value) pairs of `table` under `prefix`, as LMDB holds them."""
    with vfs.store.db.begin() as txn:
        cur = txn.cursor(db=vfs.store.db.dbs[table])
        cur.set_range(prefix)
        return [(bytes(k), bytes(v)) for k, v in cur if bytes(k).startswith(prefix)]


def raw_put(vfs: Vfs, table: str, key: bytes, value: bytes) -> None:
    with vfs.store.db.begin(write=True) as txn:
        txn.put(key, value, db=vfs.store.db.dbs[table])


async def test_a_record_moved_to_another_table_fails(vfs: Vfs) -> None:
    ino = await vfs.write_file(b"f", b"data")
    [(key, value)] = raw_items(vfs, "inodes", u64(ino))
    raw_put(vfs, "xattrs", key, value)  # the same key, the same bytes, another table
    vfs.fsck_at_exit = False
    with vfs.store.db.begin() as txn, pytest.raises(IntegrityError, match="xattrs record"):
        vfs.store.db.get(txn, "xattrs", key)
    with pytest.raises(IntegrityError):
        vfs.ns.listxattr(ino)
    assert vfs.inode(ino).size == 4  # the original is untouched


async def test_fsck_finds_a_damaged_xattr_record(vfs: Vfs) -> None:
    ino = await vfs.write_file(b"f", b"data")
    await vfs.engine.commit(vfs.ns.setxattr, ino, b"user.note", b"kept", XATTR_CREATE)
    [(key, value)] = raw_items(vfs, "xattrs", u64(ino))
    damaged = bytearray(value)
    damaged[-1] ^= 1
    raw_put(vfs, "xattrs", key, bytes(damaged))
    vfs.fsck_at_exit = False
    with pytest.raises(IntegrityError):
        vfs.ns.getxattr(ino, b"user.note")  # reading it fails, as it must...
    report = fsck.check(vfs.store, progress=False)
    assert report.damaged_records and not report.clean  # ...and fsck should say so


async def test_block_map_records_swapped_between_blocks_fail(vfs: Vfs) -> None:
    ino = await vfs.write_file(b"f", pattern(2 * B, seed=3))
    (k0, v0), (k1, v1) = raw_items(vfs, "blockmap", u64(ino))
    raw_put(vfs, "blockmap", k0, v1)
    raw_put(vfs, "blockmap", k1, v0)
    vfs.fsck_at_exit = False
    vfs.open(ino)
    # Authentic records in each other's place would serve the blocks in the wrong order:
    # they fail instead (the FUSE layer answers EIO for an IntegrityError).
    for offset in (0, B):
        with pytest.raises(IntegrityError, match="blockmap record"):
            await vfs.files.read(ino, offset, 10)
    await vfs.files.release(ino)
    assert len(fsck.check(vfs.store, progress=False).damaged_records) == 2


async def test_directory_entries_swapped_between_names_fail(vfs: Vfs) -> None:
    a = await vfs.write_file(b"a", b"A")
    b = await vfs.write_file(b"b", b"B")
    entries = raw_items(vfs, "dirents", u64(ROOT_INO))
    assert len(entries) == 2
    (ka, va), (kb, vb) = entries
    raw_put(vfs, "dirents", ka, vb)
    raw_put(vfs, "dirents", kb, va)
    vfs.fsck_at_exit = False
    for name in (b"a", b"b"):  # never a silent rename: each lookup fails
        with pytest.raises(IntegrityError):
            vfs.ns.lookup(ROOT_INO, name)
    assert vfs.inode(a).size == vfs.inode(b).size == 1


async def test_nothing_written_reaches_the_disk_in_clear(vfs: Vfs) -> None:
    secret = b"SECRET-PATIENT-Doe^Jane-4711"
    name = b"Doe^Jane-4711.dcm"
    compressible = secret * 50_000 + pattern(B)
    incompressible = os.urandom(B // 2) + secret + os.urandom(B // 2)
    dicom = corpus("CT_small.dcm").read_bytes()
    d = await vfs.mkdir(b"Study-of-Doe^Jane")
    ino = await vfs.write_file(name, compressible, d.ino)
    await vfs.write_file(b"raw-" + name, incompressible, d.ino)
    await vfs.write_file(b"ct.dcm", dicom, d.ino)
    await vfs.engine.commit(vfs.ns.setxattr, ino, b"user.note", secret, XATTR_CREATE)
    await vfs.settle()  # the DICOM index holds the header too, sealed
    needles = [secret, name, b"Doe^Jane", b"CompressedSamples", b"1.3.6.1.4.1.5962.1.2.1"]
    found = []
    for path in vfs.store.root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            found += [(path.name, n) for n in needles if n in content]
    assert found == []


def test_a_wrong_key_opens_nothing_and_keeps_no_lock(tmp_path: Path) -> None:
    root = tmp_path / "hot"
    make_store(root).close()
    wrong = KekSource(key=bytes(32), origin="wrong key")
    with pytest.raises(VnafsError) as info:
        open_store(root, wrong)
    assert "\n" not in str(info.value)
    open_store(root, SOURCE).close()  # the failed attempt left the store's lock free
