"""The data path in-process: `Files` and the `Engine` over a real hot store, no FUSE.

Writes go through `Files.write` in kernel-sized requests, exactly as `Operations.write` passes
them on; reads through `Files.read`. What is checked is what a writer and a reader see (bytes,
sizes, errors) and what the store holds afterwards (block maps, reference counts, block files,
their codecs); `fsck` checks the whole store after every test (conftest.py).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import trio

from vnafs import fsck
from vnafs.meta.records import BlockRef
from vnafs.seal import CODEC_BYTEPLANE16, CODEC_RAW, CODEC_ZSTD, Sealer
from vnafs.store.lifecycle import open_store

from .harness import SOURCE, B, Vfs, corpus, make_store, open_vfs, pattern


def codec(vfs: Vfs, block_id: bytes) -> int:
    return Sealer.header_info(vfs.block_path(block_id).read_bytes()[:64])[1]


def lengths(vfs: Vfs, ino: int) -> dict[int, int]:
    return {i: ref.length for i, ref in vfs.block_refs(ino).items()}


# -- writing and reading ----------------------------------------------------------------------------


async def test_writes_across_block_boundaries(vfs: Vfs) -> None:
    data = pattern(3 * B + B // 2)
    ino = await vfs.create(b"f")
    # Requests of a size that never lines up with a block: every boundary falls inside one.
    await vfs.write(ino, 0, data, chunk=100_003)
    ranges = [(0, 10), (B - 7, 14), (B - 1, 2), (2 * B - 100, B + 200), (0, len(data)),
              (len(data) - 5, 100), (len(data), 10)]
    for off, n in ranges:  # before the flush: from the buffers and sealed blocks
        assert await vfs.files.read(ino, off, n) == data[off : off + n]
    await vfs.close(ino)  # flush commits, release lets go
    assert vfs.inode(ino).size == len(data)
    assert lengths(vfs, ino) == {0: B, 1: B, 2: B, 3: B // 2}
    vfs.open(ino)
    for off, n in ranges:  # after: from the committed block map
        assert await vfs.files.read(ino, off, n) == data[off : off + n]
    await vfs.files.release(ino)


async def test_overwrite_inside_a_block_rewrites_that_block_only(vfs: Vfs) -> None:
    data = bytearray(pattern(2 * B + 1000))
    ino = await vfs.write_file(b"f", bytes(data))
    before = vfs.block_refs(ino)
    vfs.open(ino)
    await vfs.write(ino, B + 100, b"X" * 50)
    data[B + 100 : B + 150] = b"X" * 50
    assert await vfs.read(ino) == data  # the open file sees it at once
    await vfs.files.flush(ino)
    assert await vfs.read(ino) == data
    await vfs.files.release(ino)
    after = vfs.block_refs(ino)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].block_id != before[1].block_id and after[1].length == B
    # The replaced block had no other user: its reference and its file are gone.
    assert vfs.refcount(before[1].block_id) is None
    assert vfs.block_files() == {r.block_id for r in after.values()}
    vfs.drop_cache()
    assert await vfs.read_file(ino) == data


async def test_sparse_writes_read_as_zeros(vfs: Vfs) -> None:
    ino = await vfs.create(b"sparse")
    await vfs.write(ino, 3 * B + 7, b"tail")
    await vfs.write(ino, 5, b"head")
    await vfs.write(ino, 5000, b"gap")  # a hole inside block 0 as well
    want = bytearray(3 * B + 11)
    want[5:9], want[5000:5003], want[3 * B + 7 :] = b"head", b"gap", b"tail"
    assert vfs.files.open[ino].size == len(want)
    assert await vfs.read(ino) == want
    await vfs.files.release(ino)
    # Holes have no blocks at all.
    assert lengths(vfs, ino) == {0: 5003, 3: 3 * B + 11 - 3 * B}
    vfs.drop_cache()
    assert await vfs.read_file(ino) == want
    # Growing a file by writing far past its end leaves zeros between, also in the old last
    # block beyond the old end.
    vfs.open(ino)
    await vfs.write(ino, 5 * B, b"z")
    await vfs.files.release(ino)
    want += bytes(5 * B - len(want)) + b"z"
    assert await vfs.read_file(ino) == want


async def test_truncate_down_and_up(vfs: Vfs) -> None:
    data = pattern(2 * B + B // 2)
    ino = await vfs.write_file(b"f", data)
    old = vfs.block_refs(ino)
    vfs.open(ino)
    node = await vfs.files.setattr(ino, {"size": B + 10})
    assert node.size == B + 10 and vfs.inode(ino).size == B + 10
    assert await vfs.read(ino) == data[: B + 10]
    # The boundary block is shortened, not rewritten; the block past the end is freed.
    assert vfs.block_refs(ino) == {0: old[0], 1: BlockRef(old[1].block_id, 10)}
    assert old[2].block_id not in vfs.block_files()
    # Up again: what lay beyond the cut in the kept block must read as zeros, not come back.
    await vfs.files.setattr(ino, {"size": 3 * B})
    want = data[: B + 10] + bytes(3 * B - (B + 10))
    assert await vfs.read(ino) == want
    await vfs.files.release(ino)
    vfs.drop_cache()
    assert await vfs.read_file(ino) == want
    # Writing just past a cut inside the same block: the bytes between are zeros too.
    vfs.open(ino)
    await vfs.files.setattr(ino, {"size": 10})
    await vfs.write(ino, 20, b"after")
    assert await vfs.read(ino) == data[:10] + bytes(10) + b"after"
    await vfs.files.release(ino)
    assert await vfs.read_file(ino) == data[:10] + bytes(10) + b"after"


async def test_truncate_with_unflushed_writes(vfs: Vfs) -> None:
    ino = await vfs.create(b"f")
    data = pattern(B + B // 2)
    await vfs.write(ino, 0, data)  # block 0 sealed in the background, block 1 still dirty
    await vfs.files.setattr(ino, {"size": B + 100})
    await vfs.write(ino, B + 200, b"!")
    want = data[: B + 100] + bytes(100) + b"!"
    assert await vfs.read(ino) == want
    await vfs.files.setattr(ino, {"size": 100})
    await vfs.files.setattr(ino, {"size": 300})
    assert await vfs.read(ino) == data[:100] + bytes(200)
    await vfs.files.release(ino)
    assert lengths(vfs, ino) == {0: 100}
    assert await vfs.read_file(ino) == data[:100] + bytes(200)


async def test_o_trunc_reopen_frees_the_old_content(vfs: Vfs) -> None:
    ino = await vfs.write_file(b"f", pattern(3 * B))
    old = set(vfs.block_files())
    vfs.open(ino)
    await vfs.files.setattr(ino, {"size": 0})  # what open(O_TRUNC) does
    assert vfs.block_files() == set()
    await vfs.write(ino, 0, b"new")
    await vfs.files.release(ino)
    assert await vfs.read_file(ino) == b"new"
    assert not old & vfs.block_files()


async def test_two_handles_see_each_others_writes_before_any_flush(vfs: Vfs) -> None:
    ino = await vfs.create(b"shared")
    vfs.open(ino)  # a second descriptor of the same file
    await vfs.write(ino, 0, b"one")
    await vfs.write(ino, B - 1, b"two")
    assert await vfs.files.read(ino, 0, B + 2) == b"one" + bytes(B - 4) + b"two"
    assert vfs.files.overlay(vfs.inode(ino)).size == B + 2  # getattr sees the open size
    assert vfs.inode(ino).size == 0  # LMDB does not, yet
    await vfs.close(ino)  # the first close commits
    assert vfs.inode(ino).size == B + 2
    assert vfs.files.is_open(ino)
    await vfs.close(ino)
    assert not vfs.files.is_open(ino)


async def test_flush_commits_block_map_size_and_times(vfs: Vfs) -> None:
    ino = await vfs.create(b"f")
    created = vfs.inode(ino)
    await trio.sleep(0.002)
    await vfs.write(ino, 0, pattern(B + 5))
    assert vfs.inode(ino).size == 0 and vfs.block_refs(ino) == {}
    commits = vfs.engine.stats["commits"]
    await vfs.files.flush(ino)
    node = vfs.inode(ino)
    assert node.size == B + 5 and lengths(vfs, ino) == {0: B, 1: 5}
    assert node.mtime_ns > created.mtime_ns and node.ctime_ns >= node.mtime_ns
    assert vfs.engine.stats["commits"] == commits + 1
    # A flush with nothing new commits nothing (every close() pays for what it changed).
    await vfs.files.flush(ino)
    await vfs.files.release(ino)
    assert vfs.engine.stats["commits"] == commits + 1


async def test_concurrent_writers_on_two_files(vfs: Vfs) -> None:
    a, b = pattern(3 * B + 777, seed=1), pattern(2 * B + 999, seed=2)
    inos = {b"a": await vfs.create(b"a"), b"b": await vfs.create(b"b")}
    seen: list[int] = []
    done = trio.Event()

    async def writer(name: bytes, data: bytes) -> None:
        ino = inos[name]
        for off in range(0, len(data), 65536):
            await vfs.files.write(ino, off, data[off : off + 65536])
            await trio.sleep(0.0005)  # interleave with the other writer and the reader
        await vfs.close(ino)
        if name == b"a":
            done.set()

    async def reader() -> None:
        # Reads of a file being written see a prefix of what was written, never other bytes.
        ino = inos[b"a"]
        vfs.open(ino)
        while not done.is_set():
            size = vfs.files.open[ino].size
            off = max(0, size - 200_000)  # the newest bytes, across block boundaries
            got = await vfs.files.read(ino, off, 300_000)
            assert got == a[off:size]
            seen.append(size)
            await trio.sleep(0.001)
        await vfs.close(ino)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, b"a", a)
        nursery.start_soon(writer, b"b", b)
        nursery.start_soon(reader)
    assert len(set(seen)) > 3  # the reader saw the file grow
    vfs.drop_cache()
    assert await vfs.read_file(inos[b"a"]) == a
    assert await vfs.read_file(inos[b"b"]) == b
    assert len(vfs.block_files()) == 4 + 3


# -- deduplication and freeing ----------------------------------------------------------------------


async def test_same_content_twice_is_stored_once(vfs: Vfs) -> None:
    data = pattern(2 * B + 12345)
    one = await vfs.write_file(b"one", data)
    files_after_one = vfs.block_files()
    two = await vfs.write_file(b"two", data)
    assert vfs.block_files() == files_after_one and len(files_after_one) == 3
    assert vfs.block_refs(one) == vfs.block_refs(two)
    for ref in vfs.block_refs(one).values():
        assert vfs.refcount(ref.block_id) == 2
    assert vfs.engine.stats["dedup_hits"] >= 3
    # Inside one file too: two equal blocks are one block file with two references.
    same = await vfs.write_file(b"same", pattern(B, seed=5) * 2)
    refs = vfs.block_refs(same)
    assert refs[0] == refs[1] and vfs.refcount(refs[0].block_id) == 2
    assert len(vfs.block_files()) == 4
    # Unlinking one user keeps the blocks; unlinking the last one frees them.
    await vfs.unlink(b"one")
    await vfs.settle()
    assert all(vfs.refcount(r.block_id) == 1 for r in vfs.block_refs(two).values())
    assert vfs.block_files() == files_after_one | {refs[0].block_id}
    await vfs.unlink(b"two")
    await vfs.settle()
    assert vfs.block_files() == {refs[0].block_id}
    assert all(vfs.refcount(r.block_id) is None for r in vfs.block_refs(one, 1).values())


async def test_release_frees_an_unlinked_open_file(vfs: Vfs) -> None:
    data = pattern(2 * B + 1)
    ino = await vfs.create(b"tmp")
    await vfs.write(ino, 0, data)
    await vfs.files.flush(ino)
    await vfs.unlink(b"tmp")
    await vfs.settle()  # the orphan is not freed while a handle holds it
    assert vfs.ns.is_orphan(ino) and vfs.inode(ino).nlink == 0
    assert b"tmp" not in vfs.names()
    assert len(vfs.block_files()) == 3
    await vfs.write(ino, len(data), b"more")  # still a file for its holder
    assert await vfs.read(ino) == data + b"more"
    await vfs.files.release(ino)
    assert not vfs.ns.is_orphan(ino)
    assert vfs.block_files() == set() and not vfs.has_inode_record(ino)
    with pytest.raises(FileNotFoundError):
        vfs.inode(ino)


async def test_unlinked_closed_file_is_freed_in_the_background(vfs: Vfs) -> None:
    ino = await vfs.write_file(b"f", pattern(B + 1))
    await vfs.unlink(b"f")  # the engine sends the orphan to Files, which frees it
    await vfs.settle()
    assert vfs.ns.orphans() == [] and not vfs.has_inode_record(ino)
    assert vfs.block_files() == set()


# -- reading from the cache and from block files ----------------------------------------------------


async def test_reads_come_from_the_cache_then_from_the_sealed_files(vfs: Vfs) -> None:
    data = pattern(4 * B)
    ino = await vfs.write_file(b"f", data)
    stats = vfs.engine.stats
    loaded = stats["blocks_loaded"]
    assert await vfs.read_file(ino) == data
    assert stats["blocks_loaded"] == loaded  # the writer's blocks are still cached
    vfs.drop_cache()
    assert await vfs.read_file(ino) == data
    assert stats["blocks_loaded"] == loaded + 4  # each block file opened once
    assert await vfs.read_file(ino) == data
    assert stats["blocks_loaded"] == loaded + 4
    # Concurrent readers of one uncached block share one load.
    vfs.drop_cache()
    vfs.open(ino)
    results: list[bytes] = []

    async def read_at(off: int) -> None:
        results.append(await vfs.files.read(ino, off, 4096))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(read_at, 2 * B + i * 8192 + 17)
    await vfs.files.release(ino)
    assert sorted(results) == sorted(data[2 * B + i * 8192 + 17 :][:4096] for i in range(8))
    assert stats["blocks_loaded"] == loaded + 5


def samples16(n: int, seed: int) -> bytes:
    """CT-like 16-bit samples: a smooth ramp plus a little noise in the low byte."""
    rng = np.random.default_rng(seed)
    values = 1000 + (np.arange(n // 2) % 512) // 4 + rng.integers(0, 8, n // 2)
    return values.astype("<u2").tobytes()


async def test_every_codec_round_trips_through_the_block_files(vfs: Vfs) -> None:
    rnd = random.Random(1)
    words = b"patient study series image normal finding contrast axial slice with no".split()
    text = b"".join(b" ".join(rnd.choices(words, k=rnd.randrange(3, 15))) + b".\n"
                    for _ in range(25_000))
    cases = {CODEC_RAW: os.urandom(B + 100), CODEC_ZSTD: text[: B + 100],
             CODEC_BYTEPLANE16: samples16(B + 100, 3)}
    inos = {c: await vfs.write_file(b"codec%d" % c, data) for c, data in cases.items()}
    vfs.drop_cache()
    for c, data in cases.items():
        refs = vfs.block_refs(inos[c])
        assert [codec(vfs, r.block_id) for r in refs.values()] == [c, c], c
        assert await vfs.read_file(inos[c]) == data
    raw = vfs.block_path(vfs.block_refs(inos[CODEC_RAW])[0].block_id).stat().st_size
    packed = vfs.block_path(vfs.block_refs(inos[CODEC_ZSTD])[0].block_id).stat().st_size
    assert raw > B and packed < B // 4


def private_ob(value: bytes) -> bytes:
    """Explicit VR little endian: private creator (7FE1,0010) and an OB element (7FE1,1010)."""
    creator = struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 6) + b"VNAFS "
    return creator + struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, len(value)) + value


async def test_encapsulated_dicom_is_never_compressed(vfs: Vfs) -> None:
    """dicom/sniff.py: once block 0 shows an encapsulated transfer syntax, every block of the
    file is stored raw, however well it would compress; native pixel data is compressed."""
    cases = (("JPEG2000.dcm", 0, {CODEC_RAW}), ("CT_small.dcm", 1, {CODEC_ZSTD}))
    for name, fill, expect in cases:
        # A private OB element of two megabytes of one byte value after the pixel data: it
        # would shrink a thousandfold. (A different value per file, or dedup would share
        # the blocks.)
        data = corpus(name).read_bytes() + private_ob(bytes([fill]) * (2 * B))
        ino = await vfs.write_file(name.encode(), data)
        codecs = {codec(vfs, r.block_id) for r in vfs.block_refs(ino).values()}
        assert codecs == expect, name
        vfs.drop_cache()
        assert await vfs.read_file(ino) == data


# -- damaged and missing blocks ---------------------------------------------------------------------


async def damaged_file(vfs: Vfs) -> tuple[int, bytes, dict[int, bytes]]:
    data = pattern(3 * B, seed=9)
    ino = await vfs.write_file(b"f", data)
    vfs.fsck_at_exit = False
    return ino, data, {i: r.block_id for i, r in vfs.block_refs(ino).items()}


async def expect_eio(vfs: Vfs, ino: int, off: int, n: int) -> None:
    with pytest.raises(OSError) as info:
        await vfs.files.read(ino, off, n)
    assert type(info.value) is OSError and info.value.errno == errno.EIO


async def test_flipped_byte_in_a_block_file_reads_as_eio(vfs: Vfs,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    ino, data, ids = await damaged_file(vfs)
    path = vfs.block_path(ids[1])
    sealed = bytearray(path.read_bytes())
    sealed[len(sealed) // 2] ^= 0x01
    path.write_bytes(sealed)
    vfs.drop_cache()
    vfs.open(ino)
    with caplog.at_level(logging.ERROR, logger="vnafs.engine"):
        assert await vfs.files.read(ino, 0, 4096) == data[:4096]  # block 0 is fine
        await expect_eio(vfs, ino, B + 10, 100)
        await expect_eio(vfs, ino, B - 10, 100)  # a read that spans into it
        await expect_eio(vfs, ino, B + 10, 100)  # again: a damaged block is not cached
        assert await vfs.files.read(ino, 2 * B, 4096) == data[2 * B : 2 * B + 4096]
    await vfs.files.release(ino)
    # One line per failed load, naming the block id, never the content.
    lines = [r.getMessage() for r in caplog.records if r.name == "vnafs.engine"]
    assert lines and all(ids[1].hex() in line and "authentication" in line for line in lines)
    assert vfs.engine.health.as_dict()["state"] == "damaged"
    report = fsck.check(vfs.store, progress=False)
    assert report.corrupt_blocks == {ids[1].hex(): [ino]}
    # Put the block back: the file reads again (nothing remembered the failure).
    sealed[len(sealed) // 2] ^= 0x01
    path.write_bytes(sealed)
    assert await vfs.read_file(ino) == data


async def test_missing_block_file_reads_as_eio(vfs: Vfs) -> None:
    ino, data, ids = await damaged_file(vfs)
    os.unlink(vfs.block_path(ids[2]))
    vfs.drop_cache()
    vfs.open(ino)
    await expect_eio(vfs, ino, 2 * B, 10)
    assert await vfs.files.read(ino, B, 10) == data[B : B + 10]
    await vfs.files.release(ino)
    assert fsck.check(vfs.store, progress=False).missing_blocks == {ids[2].hex(): [ino]}


async def test_block_file_under_another_blocks_name_reads_as_eio(vfs: Vfs) -> None:
    """The AAD binds a block to its id: a valid envelope in the wrong place is damage."""
    ino, data, ids = await damaged_file(vfs)
    a, b = vfs.block_path(ids[0]), vfs.block_path(ids[1])
    sealed_a, sealed_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(sealed_b)
    b.write_bytes(sealed_a)
    vfs.drop_cache()
    vfs.open(ino)
    await expect_eio(vfs, ino, 0, 10)
    await expect_eio(vfs, ino, B, 10)
    assert await vfs.files.read(ino, 2 * B, 10) == data[2 * B : 2 * B + 10]
    await vfs.files.release(ino)


async def test_writing_a_file_while_its_block_is_damaged_keeps_the_good_parts(vfs: Vfs) -> None:
    """A partial overwrite must load the old block (read-modify-write): when that block is
    damaged the write fails with EIO, and the file is otherwise untouched."""
    ino, data, ids = await damaged_file(vfs)
    os.unlink(vfs.block_path(ids[1]))
    vfs.drop_cache()
    vfs.open(ino)
    with pytest.raises(OSError) as info:
        await vfs.files.write(ino, B + 5, b"x")
    assert info.value.errno == errno.EIO
    await vfs.files.write(ino, 2 * B + 5, b"y")  # other blocks can still be changed
    await vfs.files.release(ino)
    vfs.open(ino)
    assert await vfs.files.read(ino, 2 * B, 10) == data[2 * B : 2 * B + 5] + b"y" + data[
        2 * B + 6 : 2 * B + 10]
    await vfs.files.release(ino)
    assert stat.S_ISREG(vfs.inode(ino).mode) and vfs.inode(ino).size == 3 * B


# -- durability and restarts ------------------------------------------------------------------------


async def test_fsync_commits_then_waits_for_a_barrier(vfs: Vfs) -> None:
    ino = await vfs.create(b"f")
    await vfs.write(ino, 0, b"x" * 1000)
    barriers = vfs.engine.stats["barriers"]
    await vfs.files.flush(ino, durable=True)
    assert vfs.inode(ino).size == 1000 and vfs.engine.stats["barriers"] == barriers + 1
    await vfs.files.release(ino)


async def test_a_restart_keeps_what_was_committed_and_frees_orphans(tmp_path: Path) -> None:
    """What `kill -9` leaves, and what the next mount makes of it (architecture.md 7)."""
    root = tmp_path / "hot"
    store = make_store(root)
    kept_data, partial_data = pattern(B + 3, seed=1), pattern(B + 10, seed=2)
    try:
        async with open_vfs(store) as vfs:
            kept = await vfs.write_file(b"kept", kept_data)
            kept_blocks = {r.block_id for r in vfs.block_refs(kept).values()}
            tmp = await vfs.create(b"tmp")  # unlinked while open: an orphan at the crash
            await vfs.write(tmp, 0, pattern(2 * B, seed=3))
            await vfs.files.flush(tmp)
            await vfs.unlink(b"tmp")
            partial = await vfs.create(b"partial")  # written, never flushed
            await vfs.write(partial, 0, partial_data)
            with trio.fail_after(10):  # block 0 is sealed into blocks/, not committed
                while vfs.files.open[partial].inflight or not vfs.files.open[partial].sealed:
                    await trio.sleep(0.001)
            sealed_only = vfs.block_files() - kept_blocks - {
                r.block_id for r in vfs.block_refs(tmp).values()}
            vfs.crashed = True
    finally:
        store.close()
    assert len(sealed_only) == 1
    store = open_store(root, SOURCE)
    try:
        assert store.ns.orphans() == [tmp]
        async with open_vfs(store) as vfs:  # the mount's recovery frees the orphan
            assert store.ns.orphans() == [] and not vfs.has_inode_record(tmp)
            assert vfs.names() == {b"kept": kept, b"partial": partial}
            assert await vfs.read_file(kept) == kept_data
            assert vfs.inode(partial).size == 0 and await vfs.read_file(partial) == b""
            assert vfs.block_files() == kept_blocks | sealed_only
        # The sealed block nobody committed is what fsck calls an orphan block; --repair
        # deletes it.
        report = fsck.check(store, progress=False)
        assert report.orphan_blocks == [b.hex() for b in sealed_only]
        assert not (report.damage or report.orphan_inodes or report.bad_refcount
                    or report.bad_nlink)
        fsck.check(store, repair=True, progress=False)
        assert fsck.check(store, progress=False).clean
    finally:
        store.close()
