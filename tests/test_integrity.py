"""Damaged sealed data reads as EIO with one log line naming the object, never as wrong bytes.

This file exists for the integrity invariant of docs/format.md section 4: every block file and
every LMDB value is an AES-GCM envelope bound to where it must be found, so a flipped byte, a cut
file, two swapped block files, a deleted block or a damaged metadata record must give the reader
`EIO` (and `vnafs fsck` must report it), never different data. The damage is done to a real,
unmounted hot store with plain file I/O, then the store is mounted again by the real daemon.

A record rolled back to an older, authentic version (an old LMDB page put back) is out of scope:
sealing cannot detect it, because the old envelope is genuine for the same table and key; that
needs a version counter outside LMDB and belongs to a later issue.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from conftest import Fs, run_vnafs

from vnafs.keys import KekSource, Keyring, read_key_file
from vnafs.seal import Sealer
from vnafs.store.marker import read_format

MIB = 1 << 20
SEED = 20240611
RECORD_MAGIC = b"VNS1R"  # envelope magic "VNS1" + kind 'R' (metadata record)
COUNTER_KEYS = (b"epoch", b"generation", b"next_ino")
P_LEAF = 0x02
P_DIRTY = 0x10
F_BIGDATA = 0x01
F_SUBDATA = 0x02
F_DUPDATA = 0x04

Chunk = tuple[str, int]  # (file name, 1 MiB block index)


# -- helpers ---------------------------------------------------------------------------------------


def sample_files() -> dict[str, bytes]:
    rng = random.Random(SEED)
    return {"big.bin": rng.randbytes(3 * MIB), "small.bin": rng.randbytes(1000)}


def write_files(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(mnt / name, "wb") as f:
            f.write(data)


def block_files(hot: Path) -> list[Path]:
    return sorted(p for p in hot.glob("blocks/*/*") if p.is_file())


def block_hex(path: Path) -> str:
    """blocks/XX/REST holds the block whose id is XX + REST in hex."""
    return path.parent.name + path.name


def chunks_of(files: dict[str, bytes]) -> dict[Chunk, bytes]:
    return {(name, i): data[i * MIB:(i + 1) * MIB]
            for name, data in files.items() for i in range(-(-len(data) // MIB))}


def block_owners(fs: Fs, files: dict[str, bytes]) -> dict[str, Chunk]:
    """Block id hex -> the chunk it holds, computed with the store's own block-id key and
    algorithm (its FORMAT: keyed BLAKE3 in format 2, HMAC-SHA256 in format 1)."""
    keyring = Keyring.open(fs.hot / "keyring",
                           KekSource(key=read_key_file(fs.key), origin="test key"))
    sealer = Sealer(keyring, format_version=read_format(fs.hot))
    owners = {sealer.block_id(data).hex(): chunk for chunk, data in chunks_of(files).items()}
    on_disk = {block_hex(p) for p in block_files(fs.hot)}
    assert on_disk == set(owners), "the hot store does not hold exactly the expected blocks"
    return owners


def read_chunks(mnt: Path, files: dict[str, bytes]) -> dict[Chunk, bytes | int]:
    """Each chunk's bytes as read through the mount, or the errno of the failed read."""
    out: dict[Chunk, bytes | int] = {}
    for name, index in chunks_of(files):
        fd = os.open(mnt / name, os.O_RDONLY)
        try:
            out[(name, index)] = os.pread(fd, MIB, index * MIB)
        except OSError as exc:
            out[(name, index)] = exc.errno if exc.errno is not None else -1
        finally:
            os.close(fd)
    return out


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " level=error " in line]


def check_damaged_reads(fs: Fs, files: dict[str, bytes], owners: dict[str, Chunk],
                        damaged: set[str], reason: str) -> None:
    """Mount, read everything: damaged blocks give EIO, the others their exact bytes."""
    log_start = len(fs.log())
    fs.mount()
    try:
        got = read_chunks(fs.mnt, files)
    finally:
        fs.umount()
    expected = chunks_of(files)
    bad = {owners[h] for h in damaged}
    for chunk, result in got.items():
        if chunk in bad:
            assert result == errno.EIO, f"{chunk}: damaged block gave {result!r:.80}"
        else:
            assert result == expected[chunk], f"{chunk}: intact block read wrong"
    log = fs.log()[log_start:]
    assert "Traceback" not in log
    lines = error_lines(log)
    for hexid in damaged:
        assert any(hexid in line and reason in line for line in lines), (hexid, lines)
    intact = set(owners) - damaged
    for line in lines:
        assert not any(h in line for h in intact), f"an intact block was blamed: {line}"


def fsck(fs: Fs, *extra: str) -> tuple[int, str]:
    res = run_vnafs("fsck", *extra, "--key-file", str(fs.key), str(fs.hot), check=False)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, res.stdout + res.stderr


def prepared(fs: Fs) -> tuple[dict[str, bytes], dict[str, Chunk]]:
    files = sample_files()
    fs.mount()
    write_files(fs.mnt, files)
    fs.umount()
    return files, block_owners(fs, files)


# -- blocks ----------------------------------------------------------------------------------------


def test_flipped_byte_in_each_block(new_fs: Fs) -> None:
    files, owners = prepared(new_fs)
    rng = random.Random(SEED)
    for path in block_files(new_fs.hot):
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        try:
            check_damaged_reads(new_fs, files, owners, {block_hex(path)},
                                "failed authentication")
        finally:
            path.write_bytes(original)
    # Repaired by hand: everything reads back again.
    check_damaged_reads(new_fs, files, owners, set(), "failed authentication")


def test_truncated_block(new_fs: Fs) -> None:
    files, owners = prepared(new_fs)
    path = random.Random(SEED).choice(block_files(new_fs.hot))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    hexid = block_hex(path)
    check_damaged_reads(new_fs, files, owners, {hexid}, "failed authentication")
    code, out = fsck(new_fs)
    assert code == 2, out
    assert hexid in out and "corrupt" in out, out


def test_swapped_blocks(new_fs: Fs) -> None:
    files, owners = prepared(new_fs)
    a, b = random.Random(SEED).sample(block_files(new_fs.hot), 2)
    tmp = a.with_name(a.name + ".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    damaged = {block_hex(a), block_hex(b)}
    check_damaged_reads(new_fs, files, owners, damaged, "failed authentication")
    code, out = fsck(new_fs)
    assert code == 2, out
    assert all(h in out for h in damaged) and "corrupt" in out, out


def test_deleted_block(new_fs: Fs) -> None:
    files, owners = prepared(new_fs)
    path = random.Random(SEED).choice(block_files(new_fs.hot))
    path.unlink()
    hexid = block_hex(path)
    check_damaged_reads(new_fs, files, owners, {hexid}, "missing")
    code, out = fsck(new_fs)
    assert code == 2, out
    assert hexid in out and "missing" in out, out


def test_status_reports_damage_seen_since_mount(new_fs: Fs) -> None:
    files, _ = prepared(new_fs)
    path = random.Random(SEED).choice(block_files(new_fs.hot))
    damaged = bytearray(path.read_bytes())
    damaged[40] ^= 0x10
    path.write_bytes(bytes(damaged))
    new_fs.mount()
    before = json.loads(run_vnafs("status", "--json", str(new_fs.mnt)).stdout)
    assert before["health"] == "ok" and before["problems"]["last_problem"] is None
    read_chunks(new_fs.mnt, files)
    after = json.loads(run_vnafs("status", "--json", str(new_fs.mnt)).stdout)
    assert after["health"] == "damaged"
    assert after["problems"]["problems"]["integrity"] >= 1
    assert block_hex(path) in after["problems"]["last_problem"]
    human = run_vnafs("status", str(new_fs.mnt)).stdout
    assert "damaged" in human and block_hex(path) in human


# -- metadata records ------------------------------------------------------------------------------


def _leaf_values(page: memoryview) -> Iterator[tuple[bytes, int, int]]:
    """(key, value offset, value size) of every inline value on an LMDB leaf page.

    Layout (lmdb mdb.c, 64-bit): page header pgno u64, pad u16, flags u16, lower u16, upper u16;
    then u16 node offsets up to `lower`. A node is size lo u16, size hi u16, flags u16, key size
    u16, key, value.
    """
    flags, lower, upper = struct.unpack_from("<HHH", page, 10)
    if flags & ~P_DIRTY != P_LEAF or not 16 <= lower <= upper <= len(page):
        return
    for i in range((lower - 16) // 2):
        (off,) = struct.unpack_from("<H", page, 16 + 2 * i)
        if not upper <= off <= len(page) - 8:
            return
        lo, hi, node_flags, ksize = struct.unpack_from("<HHHH", page, off)
        size = lo | hi << 16
        start = off + 8 + ksize
        if node_flags & (F_BIGDATA | F_SUBDATA | F_DUPDATA) or start + size > len(page):
            continue
        yield bytes(page[off + 8:start]), start, size


def flip_records(hot: Path, *, keep_counters: bool) -> int:
    """Flip one ciphertext byte of every sealed value on an LMDB leaf page; returns how many.

    Only bytes inside values are touched, never LMDB's own structure, so what is tested is the
    record sealing, not LMDB (which has no page checksums). Values on free pages are flipped
    too, which is harmless. Counters (ASCII keys) are spared when `keep_counters` is set.
    """
    path = hot / "meta" / "data.mdb"
    data = bytearray(path.read_bytes())
    psize = mmap.PAGESIZE
    assert struct.unpack_from("<Q", data, psize)[0] == 1, "unexpected LMDB page size"
    flipped = 0
    view = memoryview(data)
    for base in range(2 * psize, len(data), psize):  # pages 0 and 1 are the meta pages
        for key, off, size in _leaf_values(view[base:base + psize]):
            value = data[base + off:base + off + size]
            if not value.startswith(RECORD_MAGIC) or size <= 30:
                continue
            if keep_counters and key in COUNTER_KEYS:
                continue
            data[base + off + 30] ^= 0x01
            flipped += 1
    view.release()
    path.write_bytes(bytes(data))
    return flipped


def prepared_tree(fs: Fs) -> dict[str, bytes]:
    files = sample_files()
    fs.mount()
    (fs.mnt / "study").mkdir()
    write_files(fs.mnt, files)
    write_files(fs.mnt / "study", {"series.bin": files["small.bin"]})
    os.setxattr(fs.mnt / "big.bin", "user.note", b"an xattr value")
    fs.umount()
    return files


def assert_eio(fn: Callable[..., object], *args: object) -> None:
    name = getattr(fn, "__name__", repr(fn))
    try:
        result = fn(*args)
    except OSError as exc:
        assert exc.errno == errno.EIO, f"{name}{args}: {exc}"
        return
    raise AssertionError(f"{name}{args} returned {result!r:.80} from damaged metadata")


def _read(path: Path) -> bytes:
    return path.read_bytes()


def check_damaged_metadata(fs: Fs) -> None:
    """Mount fails with one clear line, or every access to the damaged tree gives EIO."""
    res = run_vnafs("mount", "--key-file", str(fs.key), str(fs.hot), str(fs.mnt), check=False)
    log = fs.log()
    assert "Traceback" not in res.stderr, res.stderr
    if res.returncode != 0:
        assert res.returncode == 1, res
        assert res.stderr.startswith("vnafs: ") and res.stderr.strip().count("\n") == 0
        assert fs.pid() is None
        # The message may point at the log, so the log must say what failed.
        assert "failed authentication" in log or "failed authentication" in res.stderr, log
    else:
        try:
            assert_eio(os.listdir, fs.mnt)
            assert_eio(os.stat, fs.mnt / "big.bin")
            assert_eio(os.stat, fs.mnt / "study" / "series.bin")
            assert_eio(_read, fs.mnt / "big.bin")
            assert_eio(_read, fs.mnt / "small.bin")
            assert_eio(os.getxattr, fs.mnt / "big.bin", "user.note")
        finally:
            fs.umount()
        log = fs.log()
        assert "failed authentication" in log, log
    assert "Traceback" not in log, log


def check_fsck_reports_damage(fs: Fs) -> None:
    code, out = fsck(fs)
    assert code in (1, 2), out
    assert "failed authentication" in out or "damage" in out.lower(), out


def test_every_lmdb_record_flipped(new_fs: Fs) -> None:
    prepared_tree(new_fs)
    assert flip_records(new_fs.hot, keep_counters=False) > 10
    check_damaged_metadata(new_fs)
    check_fsck_reports_damage(new_fs)


def test_lmdb_records_flipped_except_counters(new_fs: Fs) -> None:
    """The store opens (its counters are intact), so the mounted read paths meet the damage."""
    prepared_tree(new_fs)
    assert flip_records(new_fs.hot, keep_counters=True) > 10
    check_damaged_metadata(new_fs)
    check_fsck_reports_damage(new_fs)
