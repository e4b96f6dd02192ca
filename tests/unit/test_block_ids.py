"""Format 2 block ids (keyed BLAKE3) and the store format version that selects them.

1. **Known-answer vectors** (docs/format.md 7.6). The ```` ```vectors-format2 ```` block of
   format.md is recomputed here from the text alone, with a BLAKE3 written in this file from the
   BLAKE3 specification (the reference implementation's structure: compression function, chunks
   of 1024 bytes, a binary tree whose left subtree holds the largest power-of-two number of
   chunks) and HKDF and AES-GCM from `cryptography`: no code of vnafs, and not the `blake3`
   package vnafs hashes with (that package is only compared with the one here). Then vnafs
   must agree: its keyring derives the same key from the format-1 keyring vector of 7.1, its
   format-2 sealer computes the same ids and opens the format-2 envelope vector.
2. **Stores.** `mkfs` writes format 2 unless asked for 1; the ids a format-2 store records are
   keyed BLAKE3 of the content (checked with the `blake3` package, which agrees with the
   implementation above), a format-1 store's are HMAC-SHA256; dedup works; fsck recomputes ids, so tampering (a flipped byte, a FORMAT file
   changed to the other version) is reported; an unknown format is one line.
3. **The archive.** HEAD carries the format; a format-2 store replicated in-process restores to a
   format-2 store, and the read-only archive store (what `mount --archive-only` serves) reads it
   with format-2 ids; an unknown HEAD format is one line.

Run `python -m tests.unit.test_block_ids` to print the vectors (for writing format.md only).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from pathlib import Path

import blake3 as blake3_pkg
import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vnafs import __version__, fsck
from vnafs.errors import VnafsError
from vnafs.keys import KekSource, Keyring
from vnafs.meta.db import INF, read_u64, records
from vnafs.meta.records import BlockRef
from vnafs.seal import KIND_BLOCK, Sealer
from vnafs.store.lifecycle import Store, mkfs, open_store
from vnafs.store.marker import read_format

from .harness import SOURCE, open_vfs, pattern

REPO = Path(__file__).resolve().parents[2]
FORMAT_MD = REPO / "docs" / "format.md"

# ------------------------------------------------------------------------------------------------
# BLAKE3 from its specification (keyed mode, 32-byte output)
# ------------------------------------------------------------------------------------------------

_IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
       0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
_PERMUTATION = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
_CHUNK_START, _CHUNK_END, _PARENT, _ROOT, _KEYED_HASH = 1, 2, 4, 8, 16
_BLOCK_LEN, _CHUNK_LEN = 64, 1024
_M32 = 0xFFFFFFFF


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & _M32


def _g(s: list[int], a: int, b: int, c: int, d: int, mx: int, my: int) -> None:
    s[a] = (s[a] + s[b] + mx) & _M32
    s[d] = _rotr(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & _M32
    s[b] = _rotr(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b] + my) & _M32
    s[d] = _rotr(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & _M32
    s[b] = _rotr(s[b] ^ s[c], 7)


def _compress(cv: tuple[int, ...], block: bytes, counter: int, block_len: int, flags: int
              ) -> list[int]:
    m = list(struct.unpack("<16I", block.ljust(_BLOCK_LEN, b"\0")))
    s = [*cv, *_IV[:4], counter & _M32, (counter >> 32) & _M32, block_len, flags]
    for r in range(7):
        _g(s, 0, 4, 8, 12, m[0], m[1])
        _g(s, 1, 5, 9, 13, m[2], m[3])
        _g(s, 2, 6, 10, 14, m[4], m[5])
        _g(s, 3, 7, 11, 15, m[6], m[7])
        _g(s, 0, 5, 10, 15, m[8], m[9])
        _g(s, 1, 6, 11, 12, m[10], m[11])
        _g(s, 2, 7, 8, 13, m[12], m[13])
        _g(s, 3, 4, 9, 14, m[14], m[15])
        if r < 6:
            m = [m[i] for i in _PERMUTATION]
    for i in range(8):
        s[i] ^= s[i + 8]
        s[i + 8] ^= cv[i]
    return s


# An "output": what the last compression of a node takes (its CV input, block, counter, length
# and flags), kept unevaluated because the root compresses it once more with the ROOT flag.
_Output = tuple[tuple[int, ...], bytes, int, int, int]


def _chunk(data: bytes, counter: int, key: tuple[int, ...], flags: int) -> _Output:
    blocks = [data[i : i + _BLOCK_LEN] for i in range(0, len(data), _BLOCK_LEN)] or [b""]
    cv = key
    for i, block in enumerate(blocks[:-1]):
        cv = tuple(_compress(cv, block, counter, _BLOCK_LEN,
                             flags | (_CHUNK_START if i == 0 else 0))[:8])
    start = _CHUNK_START if len(blocks) == 1 else 0
    return cv, blocks[-1], counter, len(blocks[-1]), flags | start | _CHUNK_END


def _node(data: bytes, counter: int, key: tuple[int, ...], flags: int) -> _Output:
    if len(data) <= _CHUNK_LEN:
        return _chunk(data, counter, key, flags)
    # The left subtree: the largest power of two number of whole chunks that leaves some input
    # to the right.
    chunks = -(-len(data) // _CHUNK_LEN)
    left_chunks = 1 << ((chunks - 1).bit_length() - 1)
    left = _cv(_node(data[: left_chunks * _CHUNK_LEN], counter, key, flags))
    right = _cv(_node(data[left_chunks * _CHUNK_LEN :], counter + left_chunks, key, flags))
    return key, struct.pack("<16I", *left, *right), 0, _BLOCK_LEN, flags | _PARENT


def _cv(out: _Output) -> tuple[int, ...]:
    return tuple(_compress(*out)[:8])


def blake3_keyed(key: bytes, data: bytes) -> bytes:
    """BLAKE3 keyed hash, 32 bytes of output (one root compression, output counter 0)."""
    assert len(key) == 32
    cv, block, _, block_len, flags = _node(data, 0, struct.unpack("<8I", key), _KEYED_HASH)
    return struct.pack("<8I", *_compress(cv, block, 0, block_len, flags | _ROOT)[:8])


# ------------------------------------------------------------------------------------------------
# 1. Known-answer vectors
# ------------------------------------------------------------------------------------------------


def parse_vectors(text: str, fence: str) -> dict[str, bytes]:
    """name -> bytes from every ```<fence> block (format.md section 7's notation: `name = hex`
    with spaces ignored, `#` comments, indented continuation lines; no quoted text is used in
    the format-2 block, but the format-1 block of 7.1 has some, kept as the UTF-8 bytes)."""
    out: dict[str, bytes] = {}
    for block in re.findall(rf"^```{fence}\n(.*?)^```", text, flags=re.S | re.M):
        name: str | None = None
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace():
                assert name is not None
                out[name] += _value(line.strip())
                continue
            m = re.fullmatch(r"([a-z0-9_]+)\s*=\s*(.*)", line)
            assert m, f"not a vector line: {line!r}"
            name = m.group(1)
            assert name not in out, f"vector {name} given twice"
            out[name] = _value(m.group(2).strip())
    assert out, f"docs/format.md has no ```{fence} block"
    return out


def _value(text: str) -> bytes:
    if text.startswith('"'):
        return text[1:-1].encode("utf-8")
    digits = text.split("#", 1)[0].replace(" ", "")
    assert re.fullmatch(r"(?:[0-9a-f]{2})*", digits), f"not lower-case hex bytes: {text!r}"
    return bytes.fromhex(digits)


def _pattern(start: int, n: int) -> bytes:
    return bytes((start + i) & 0xFF for i in range(n))


def plaintexts() -> dict[str, bytes]:
    """The plaintexts of format.md 7.2 and 7.6, from their description."""
    return {
        "block_raw": _pattern(0, 100),
        "block_zstd": b"vnafs format 1 known-answer vector\n" * 30,
        "block_planes": b"".join(struct.pack("<H", 2000 + i % 10) for i in range(500)) + b"\xff",
        "empty": b"",
        "tree": bytes(i % 251 for i in range(65537)),
    }


def compute_vectors() -> dict[str, bytes]:
    """Every vector of format.md 7.6, from format.md alone."""
    master = _pattern(0x20, 32)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"vnafs block-id blake3 v2").derive(master)
    v = {"blake3_key": key}
    for name, plain in plaintexts().items():
        v[f"{name}_v2_id"] = blake3_keyed(key, plain)
    # block_raw of 7.2 sealed in a format-2 store: the same header (nonce 80 ... 8b), its new id
    # as the AAD context. GCM's ciphertext does not depend on the AAD; the tag does.
    header = b"VNS1" + bytes([0x42, 0]) + bytes(2) + struct.pack(">II", 1, 100) + _pattern(0x80, 12)
    aad = header + v["block_raw_v2_id"]
    sealed = AESGCM(_pattern(0x40, 32)).encrypt(_pattern(0x80, 12), plaintexts()["block_raw"], aad)
    v["block_raw_v2_aad"] = aad
    v["block_raw_v2_ciphertext"] = sealed[:-16]
    v["block_raw_v2_tag"] = sealed[-16:]
    return v


def test_reference_blake3_agrees_with_the_blake3_package() -> None:
    """The implementation above is BLAKE3: at every length where the tree changes shape."""
    key = bytes(range(32))
    for n in (0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 2049, 3072, 4097, 5 * 1024 + 7):
        data = bytes(i % 251 for i in range(n))
        assert blake3_keyed(key, data) == blake3_pkg.blake3(data, key=key).digest(), n


def test_reference_blake3_gives_the_published_vectors() -> None:
    """Anchors the implementation above to BLAKE3's own test vectors (BLAKE3-team/BLAKE3,
    test_vectors/test_vectors.json: `keyed_hash`, first 32 bytes, input byte i = i mod 251)."""
    key = b"whats the Elvish word for friend"
    published = {
        0: "92b2b75604ed3c761f9d6f62392c8a9227ad0ea3f09573e783f1498a4ed60d26",
        1: "6d7878dfff2f485635d39013278ae14f1454b8c0a3a2d34bc1ab38228a80c95b",
        64: "ba8ced36f327700d213f120b1a207a3b8c04330528586f414d09f2f7d9ccb7e6",
        1024: "75c46f6f3d9eb4f55ecaaee480db732e6c2105546f1e675003687c31719c7ba4",
    }
    for n, digest in published.items():
        assert blake3_keyed(key, bytes(i % 251 for i in range(n))).hex() == digest, n


def test_format2_vectors_in_format_md_match_an_independent_implementation() -> None:
    doc = parse_vectors(FORMAT_MD.read_text(), "vectors-format2")
    ours = compute_vectors()
    assert sorted(doc) == sorted(ours), "format.md 7.6 and the test list different vectors"
    for name, value in ours.items():
        assert doc[name] == value, f"format.md vector {name} is wrong: expected {value.hex()}"
    # 7.6 says the ciphertext is that of 7.2's block_raw: only the tag changes with the id.
    v1 = parse_vectors(FORMAT_MD.read_text(), "vectors")
    assert doc["block_raw_v2_ciphertext"] == v1["block_raw_ciphertext"]
    assert doc["block_raw_v2_tag"] != v1["block_raw_tag"]


def _vector_keyring(tmp_path: Path) -> Keyring:
    """The keyring file of format.md 7.1 (master 20 21 ... 3f), opened by vnafs."""
    v1 = parse_vectors(FORMAT_MD.read_text(), "vectors")
    path = tmp_path / "keyring"
    path.write_bytes(v1["keyring_header"] + v1["keyring_ciphertext"] + v1["keyring_tag"])
    return Keyring.open(path, KekSource(key=v1["kek"], origin="format.md vector"))


def test_vnafs_computes_the_format2_vectors(tmp_path: Path) -> None:
    doc = parse_vectors(FORMAT_MD.read_text(), "vectors-format2")
    v1 = parse_vectors(FORMAT_MD.read_text(), "vectors")
    keyring = _vector_keyring(tmp_path)
    assert keyring.blake3_key == doc["blake3_key"]
    v2 = Sealer(keyring, format_version=2)
    assert v2.format_version == 2 and v2.block_id_algorithm == "keyed BLAKE3"
    for name, plain in plaintexts().items():
        assert v2.block_id(plain) == doc[f"{name}_v2_id"], name
        assert v2.block_id(memoryview(plain)) == doc[f"{name}_v2_id"], name
    # Format 1 is unchanged: the same keyring gives the HMAC ids of 7.2.
    v1_sealer = Sealer(keyring, format_version=1)
    assert v1_sealer.block_id(plaintexts()["block_raw"]) == v1["block_raw_id"]
    envelope = (v1["block_raw_header"] + doc["block_raw_v2_ciphertext"]
                + doc["block_raw_v2_tag"])
    assert v2.open(KIND_BLOCK, doc["block_raw_v2_id"], envelope) == plaintexts()["block_raw"]
    # Bound to its id: under the format-1 id the same envelope does not open.
    with pytest.raises(Exception, match="failed authentication"):
        v2.open(KIND_BLOCK, v1["block_raw_id"], envelope)


# ------------------------------------------------------------------------------------------------
# 2. Stores
# ------------------------------------------------------------------------------------------------


def _mkfs(root: Path, version: int | None, archive_url: str | None = None) -> None:
    """mkfs as `vnafs mkfs` does it: without a format (the default) or with `--format`."""
    if version is None:
        mkfs(root, SOURCE, archive_url=archive_url, uid=os.getuid(), gid=os.getgid())
    else:
        mkfs(root, SOURCE, archive_url=archive_url, uid=os.getuid(), gid=os.getgid(),
             format_version=version)


def _store(root: Path, version: int | None) -> Store:
    _mkfs(root, version)
    return open_store(root, SOURCE)


async def _write(store: Store, files: dict[bytes, bytes]) -> dict[bytes, int]:
    async with open_vfs(store) as vfs:
        return {name: await vfs.write_file(name, data) for name, data in files.items()}


def _live_ids(store: Store) -> dict[int, list[bytes]]:
    """ino -> the block ids of its live block map records, in block order."""
    out: dict[int, list[bytes]] = {}
    with store.db.begin() as txn:
        for key, value in records(txn.cursor(db=store.db.dbs["blockmap"])):
            plain = store.db.open_record("blockmap", key, value)
            if read_u64(plain) == INF:
                out.setdefault(read_u64(key), []).append(BlockRef.unpack(plain[8:]).block_id)
    return out


B = 1 << 20
FILES = {b"a.bin": pattern(B + 5000), b"b.bin": pattern(B + 5000), b"c.bin": pattern(300, 7)}


@pytest.mark.parametrize("version", [None, 1])
async def test_new_store_ids_dedup_and_fsck(tmp_path: Path, version: int | None) -> None:
    """mkfs writes format 2 by default (1 on request); ids are the format's keyed hash of the
    content; two equal files share their blocks; fsck recomputes every id and finds it clean."""
    store = _store(tmp_path / "hot", version)
    try:
        expected = version or 2
        assert (tmp_path / "hot" / "FORMAT").read_text() == f"vnafs-hot-store {expected}\n"
        assert read_format(tmp_path / "hot") == expected == store.sealer.format_version
        inos = await _write(store, FILES)
        ids = _live_ids(store)
        for name, data in FILES.items():
            blocks = [data[i : i + B] for i in range(0, len(data), B)]
            if expected == 2:
                # The package, not blake3_keyed: 1 MiB in pure Python takes seconds, and the
                # two agree (test_reference_blake3_agrees_with_the_blake3_package).
                want = [blake3_pkg.blake3(b, key=store.keyring.blake3_key).digest()
                        for b in blocks]
            else:
                want = [hmac.digest(store.keyring.dedup_key, b, "sha256") for b in blocks]
            assert ids[inos[name]] == want, name
        # a.bin and b.bin are equal: 2 blocks stored for the two of them, plus c.bin's one.
        assert ids[inos[b"a.bin"]] == ids[inos[b"b.bin"]]
        assert set(store.hot.ids()) == {i for v in ids.values() for i in v}
        assert len(set(store.hot.ids())) == 3
        report = fsck.check(store, progress=False)
        assert report.clean and report.checked_blocks == 3, report.summary()
        assert report.block_id_algorithm == ("keyed BLAKE3" if expected == 2 else "HMAC-SHA256")
    finally:
        store.close()


async def test_fsck_detects_tampering_and_a_wrong_format(tmp_path: Path) -> None:
    root = tmp_path / "hot"
    store = _store(root, None)
    try:
        inos = await _write(store, FILES)
        assert fsck.check(store, progress=False).clean
    finally:
        store.close()
    # FORMAT changed to 1 behind vnafs's back: every block is misnamed under HMAC-SHA256, and
    # fsck says so (the data itself still reads back).
    (root / "FORMAT").write_text("vnafs-hot-store 1\n")
    store = open_store(root, SOURCE)
    try:
        report = fsck.check(store, progress=False)
        assert not report.clean and not report.damage
        assert len(report.misnamed_blocks) == 3
        assert "not the HMAC-SHA256 of their content: 3" in report.summary()
        assert "FORMAT" in report.summary()
    finally:
        store.close()
    (root / "FORMAT").write_text("vnafs-hot-store 2\n")
    # One flipped byte in a block file: fsck reports it damaged, naming the inode.
    store = open_store(root, SOURCE)
    try:
        victim = _live_ids(store)[inos[b"c.bin"]][0]
        path = store.hot.path(victim)
        raw = bytearray(path.read_bytes())
        raw[-20] ^= 1
        path.write_bytes(bytes(raw))
        report = fsck.check(store, progress=False)
        assert report.corrupt_blocks == {victim.hex(): [inos[b"c.bin"]]}
        assert not report.misnamed_blocks
    finally:
        store.close()


@pytest.mark.parametrize(("text", "ending"), [
    ("vnafs-hot-store 3\n", f"has format version 3, newer than this vnafs ({__version__}, "
     "formats 1, 2) understands: upgrade vnafs"),
    ("vnafs-hot-store 0\n", "FORMAT is damaged: restore it from a backup"),
])
def test_unknown_store_format_is_one_line(tmp_path: Path, text: str, ending: str) -> None:
    root = tmp_path / "hot"
    mkfs(root, SOURCE, archive_url=None, uid=os.getuid(), gid=os.getgid())
    (root / "FORMAT").write_text(text)
    with pytest.raises(VnafsError) as err:
        open_store(root, SOURCE)
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith(ending), msg
    with pytest.raises(VnafsError, match="unknown store format 3"):
        mkfs(tmp_path / "other", SOURCE, archive_url=None, uid=0, gid=0, format_version=3)


# ------------------------------------------------------------------------------------------------
# 3. The archive
# ------------------------------------------------------------------------------------------------


async def _replicated_store(tmp_path: Path, version: int | None) -> tuple[Path, str]:
    """A store of `version` with FILES, replicated once to a file:// archive; (hot, url)."""
    from vnafs.archive.replicator import replicate_once
    from vnafs.store.lifecycle import archive_backend

    archive = tmp_path / "archive"
    archive.mkdir()
    url = f"file://{archive}"
    hot = tmp_path / "hot"
    _mkfs(hot, version, url)
    store = open_store(hot, SOURCE)
    try:
        await _write(store, FILES)
        backend = archive_backend(store)
        assert backend is not None
        await replicate_once(store, backend)
    finally:
        store.close()
    return hot, url


def _head(url: str, keyring: Keyring) -> dict[str, object]:
    import json

    from vnafs.archive import log as alog
    from vnafs.archive.backend import open_backend

    raw = open_backend(url).get(alog.HEAD_NAME)
    return dict(json.loads(alog.open_object(Sealer(keyring), alog.HEAD_NAME, raw)))


@pytest.mark.parametrize("version", [None, 1])
async def test_restore_and_archive_only_keep_the_format(tmp_path: Path,
                                                        version: int | None) -> None:
    from vnafs.archive.backend import open_backend
    from vnafs.archive.follower import open_archive_store
    from vnafs.archive.restore import restore

    expected = version or 2
    hot, url = await _replicated_store(tmp_path, version)
    original = open_store(hot, SOURCE)
    try:
        assert _head(url, original.keyring)["format"] == expected
        want_ids = _live_ids(original)
    finally:
        original.close()
    # Restore: a new store of the archive's format, clean under fsck (which recomputes ids),
    # and its new writes dedup against the restored blocks.
    restored = tmp_path / "restored"
    report = await trio.to_thread.run_sync(
        lambda: restore(open_backend(url), restored, SOURCE, progress=False, workers=2))
    assert not report.missing and not report.corrupt
    assert (restored / "FORMAT").read_text() == f"vnafs-hot-store {expected}\n"
    store = open_store(restored, SOURCE)
    try:
        assert store.sealer.format_version == expected
        assert sorted(_live_ids(store).values()) == sorted(want_ids.values())
        assert fsck.check(store, progress=False).clean
        before = set(store.hot.ids())
        async with open_vfs(store) as vfs:
            a_ino = vfs.lookup("a.bin").ino
            assert await vfs.read_file(a_ino) == FILES[b"a.bin"]
            ino = await vfs.write_file(b"again.bin", FILES[b"a.bin"])
        # The restored store computes ids as the original did: a copy dedups against the
        # restored blocks.
        assert _live_ids(store)[ino] == want_ids[a_ino]
        assert set(store.hot.ids()) == before
    finally:
        store.close()
    # The read-only archive store (what `mount --archive-only` serves): HEAD's format, and
    # every file reads back (blocks recalled from the archive by id).
    ro, backend = await trio.to_thread.run_sync(
        lambda: open_archive_store(url, SOURCE, tmp_path / "cache"))
    try:
        assert ro.sealer.format_version == expected
        ids = _live_ids(ro)
        assert sorted(ids.values()) == sorted(want_ids.values())
        for ino_ids in ids.values():
            for bid in ino_ids:
                env = backend.get(f"blocks/{bid.hex()[:2]}/{bid.hex()[2:]}")
                plain = ro.sealer.open(KIND_BLOCK, bid, env)
                assert ro.sealer.block_id(plain) == bid
    finally:
        ro.close()


async def test_unknown_head_format_is_one_line(tmp_path: Path) -> None:
    import json

    from vnafs.archive import log as alog
    from vnafs.archive.backend import open_backend
    from vnafs.archive.restore import restore

    hot, url = await _replicated_store(tmp_path, None)
    store = open_store(hot, SOURCE)
    try:
        head = _head(url, store.keyring)
        head["format"] = 3
        backend = open_backend(url)
        backend.put(alog.HEAD_NAME, alog.seal_object(store.sealer, alog.HEAD_NAME,
                                                     json.dumps(head).encode()))
    finally:
        store.close()
    with pytest.raises(VnafsError) as err:
        await trio.to_thread.run_sync(
            lambda: restore(open_backend(url), tmp_path / "restored", SOURCE, progress=False))
    assert str(err.value) == "the archive's HEAD has format 3, which this vnafs does not know: " \
        "upgrade vnafs"


def _print_vectors() -> None:
    for name, value in compute_vectors().items():
        h = value.hex()
        lines = [h[i : i + 64] for i in range(0, len(h), 64)] or [""]
        print(f"{name} = {lines[0]}")
        for line in lines[1:]:
            print(" " * (len(name) + 3) + line)


if __name__ == "__main__":
    _print_vectors()
    print(hashlib.sha256(plaintexts()["tree"]).hexdigest())
