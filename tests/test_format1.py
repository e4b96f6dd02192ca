"""Format 1 stays readable: known-answer vectors, and a frozen store and archive.

Two halves, both about docs/format.md:

1. **Known-answer vectors** (format.md section 7). The ```` ```vectors ```` blocks of
   docs/format.md are parsed (`name = hex` lines, `name = "text"` lines, indented continuation
   lines), every value is recomputed here by an implementation of format.md that uses only
   `cryptography` (AES-GCM, HMAC, HKDF), `hashlib`, `struct` and `zstandard` (no vnafs code),
   and the two must agree name by name, so the document cannot drift from the test. The same
   vectors are then fed to vnafs itself: its `Keyring` must open the keyring vector, its
   `Sealer` must open every envelope and give the same block ids and name HMACs, its LMDB layer
   must find the record vectors under their versioned keys, its archive reader must parse the
   log part, and what vnafs seals (with a random nonce) must equal the independent envelope
   made with that nonce. The zstd frames in the vectors are what python-zstandard produced when
   they were written; a later zstd may compress differently, so the frames are taken from the
   document (and only checked to decompress to the plaintext), never recomputed.

   `python -m tests.test_format1` prints every vector as a `name = hex` line from the
   independent code (zstd frames freshly compressed): for writing format.md, never to "fix" a
   failing test.

2. **The frozen store** (tests/data/format1/, made once by tools/make_format1_fixture.py with
   the vnafs of its day; see its MANIFEST.json). Every later vnafs must still mount the hot
   store, restore the archive and mount the archive read-only, with every file, link, xattr,
   snapshot entry and DICOM view path exactly as recorded. The fixture is copied first (to a
   directory under /tmp/vnafs-t, mode 0755, from conftest's `workdir`), never used in place:
   mounting writes to a store. The hot store's `vnafs.toml` names the archive by the absolute
   `file://` path it had at generation time, so the copy's `vnafs.toml` gets that one line
   (`url = ...` under `[archive]`) rewritten to the copied archive: the rest of the file, like
   every other byte of the fixture, is used as frozen.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import stat
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.conftest import Fs, run_vnafs

REPO = Path(__file__).resolve().parent.parent
FORMAT_MD = REPO / "docs" / "format.md"
FIXTURE = REPO / "tests" / "data" / "format1"

# ------------------------------------------------------------------------------------------------
# 1. Known-answer vectors
# ------------------------------------------------------------------------------------------------

INF = 2**64 - 1
# 2026-01-01T00:00:00Z in nanoseconds: every time field of the record vectors.
T0 = 1_767_225_600_000_000_000


def parse_vectors(text: str) -> dict[str, bytes]:
    """name -> bytes from every ```vectors block of `text`.

    `name = hex` (spaces between hex digits are ignored), `name = "text"` (the UTF-8 bytes
    between the first and the last quote, no escapes), lines starting with whitespace continue
    the previous value (hex, or a further "quoted" piece); `#` starts a comment (on hex lines
    and on lines of their own)."""
    out: dict[str, bytes] = {}
    blocks = re.findall(r"^```vectors\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks, "docs/format.md has no ```vectors block"
    name: str | None = None
    for block in blocks:
        name = None
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace():
                assert name is not None, f"continuation without a name: {line!r}"
                out[name] += _value(line.strip())
                continue
            m = re.fullmatch(r"([a-z0-9_]+)\s*=\s*(.*)", line)
            assert m, f"not a vector line: {line!r}"
            name = m.group(1)
            assert name not in out, f"vector {name} given twice"
            out[name] = _value(m.group(2).strip())
    return out


def _value(text: str) -> bytes:
    if text.startswith('"'):
        assert text.endswith('"') and len(text) >= 2, f"unterminated text: {text!r}"
        return text[1:-1].encode("utf-8")
    digits = text.split("#", 1)[0].replace(" ", "")
    assert re.fullmatch(r"(?:[0-9a-f]{2})*", digits), f"not lower-case hex bytes: {text!r}"
    return bytes.fromhex(digits)


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _pattern(start: int, n: int) -> bytes:
    return bytes((start + i) & 0xFF for i in range(n))


def _envelope(key: bytes, kind: int, codec: int, version: int, length: int, nonce: bytes,
              body: bytes, context: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(header, aad, ciphertext, tag) of format.md section 4, from the text alone."""
    header = b"VNS1" + bytes([kind, codec]) + b"\0\0" + struct.pack(">II", version, length)
    header += nonce
    assert len(header) == 28
    aad = header + context
    sealed = AESGCM(key).encrypt(nonce, body, aad)
    return header, aad, sealed[:-16], sealed[-16:]


def planes(p: bytes) -> bytes:
    """Byte planes (format.md section 4, codec 2): even offsets, odd offsets, odd tail."""
    k = len(p) // 2
    return p[0 : 2 * k : 2] + p[1 : 2 * k : 2] + p[2 * k :]


def zstd_plaintext() -> bytes:
    return b"vnafs format 1 known-answer vector\n" * 30


def planes_plaintext() -> bytes:
    samples = b"".join(struct.pack("<H", 2000 + i % 10) for i in range(500))
    return samples + b"\xff"


def inode_fields() -> tuple[int, ...]:
    # generation, mode, uid, gid, nlink, size, rdev, atime, mtime, ctime, parent, birth,
    # flags, target length
    return (1, stat.S_IFDIR | 0o755, 0, 0, 2, 0, 0, T0, T0, T0, 1, T0, 0, 0)


def compute_vectors(frames: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Every vector of format.md section 7, from format.md alone.

    `frames`: the zstd frames of the codec 1 and 2 blocks (`block_zstd_frame`,
    `block_planes_frame`) as the document gives them; None compresses afresh (level 1, no
    checksum, content size in the frame header, as section 4 says)."""
    v: dict[str, bytes] = {}
    v["kek"] = kek = _pattern(0x00, 32)
    v["master"] = master = _pattern(0x20, 32)
    v["data_key_1"] = dk = _pattern(0x40, 32)
    v["fs_id"] = fs_id = _pattern(0x60, 16)
    v["name_key"] = name_key = _hkdf(master, b"vnafs name-hmac v1")
    v["dedup_key"] = dedup_key = _hkdf(master, b"vnafs block-id v1")

    # Keyring file (section 3): kdf 0, so logN, r, p and the salt are zero.
    payload = json.dumps({
        "version": 1, "fs_id": fs_id.hex(), "master": master.hex(),
        "data_keys": {"1": dk.hex()}, "current": 1, "nonce_budget": 2**32,
        "reserved": {"1": 2**20}, "created": "2026-01-01T00:00:00Z",
    }, separators=(",", ":")).encode()
    v["keyring_payload"] = payload
    v["keyring_nonce"] = knonce = _pattern(0x70, 12)
    header = b"VNAFSKR1" + bytes([0, 0, 0, 0]) + bytes(16) + knonce
    sealed = AESGCM(kek).encrypt(knonce, payload, header)
    v["keyring_header"] = header
    v["keyring_ciphertext"] = sealed[:-16]
    v["keyring_tag"] = sealed[-16:]

    # Blocks (section 4): context = block id.
    v["planes_example_in"] = pin = bytes([1, 2, 3, 4, 5])
    v["planes_example_out"] = planes(pin)
    raw = _pattern(0x00, 100)
    v["block_raw_plaintext"] = raw
    blocks = [("block_raw", raw, 0, raw, 0x80)]
    frames = frames or {}
    zp = zstd_plaintext()
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=False)
    zframe = frames.get("block_zstd_frame") or cctx.compress(zp)
    v["block_zstd_plaintext_sha256"] = hashlib.sha256(zp).digest()
    v["block_zstd_frame"] = zframe
    blocks.append(("block_zstd", zp, 1, zframe, 0x90))
    pp = planes_plaintext()
    pframe = frames.get("block_planes_frame") or cctx.compress(planes(pp))
    v["block_planes_plaintext_sha256"] = hashlib.sha256(pp).digest()
    v["block_planes_frame"] = pframe
    blocks.append(("block_planes", pp, 2, pframe, 0xA0))
    for name, plain, codec, body, nonce_start in blocks:
        bid = _hmac(dedup_key, plain)
        v[f"{name}_id"] = bid
        h, aad, ct, tag = _envelope(dk, 0x42, codec, 1, len(plain), _pattern(nonce_start, 12),
                                    body, bid)
        v[f"{name}_header"], v[f"{name}_aad"] = h, aad
        v[f"{name}_ciphertext"], v[f"{name}_tag"] = ct, tag

    # Records (section 5): versioned keys, context = table tag || key.
    born = struct.pack(">Q", INF - 1)  # born in epoch 1
    live = struct.pack(">Q", INF)  # death = INF
    v["inode_key"] = ikey = struct.pack(">Q", 1) + born
    v["inode_plaintext"] = iplain = live + struct.pack(">QIIIIQQqqqQqQI", *inode_fields())
    v["dirent_name_hmac"] = dh = _hmac(name_key, b"study")
    v["dirent_key"] = dkey = struct.pack(">Q", 1) + dh[:16] + born
    v["dirent_plaintext"] = dplain = live + struct.pack(">QH", 2, 5) + b"study"
    records = [("inode", b"i", ikey, iplain, 0xB0), ("dirent", b"d", dkey, dplain, 0xC0)]
    for name, tag_byte, key, plain, nonce_start in records:
        h, aad, ct, tag = _envelope(dk, 0x52, 0, 1, len(plain), _pattern(nonce_start, 12),
                                    plain, tag_byte + key)
        v[f"{name}_header"], v[f"{name}_aad"] = h, aad
        v[f"{name}_ciphertext"], v[f"{name}_tag"] = ct, tag
    v["xattr_name_hmac"] = xh = _hmac(name_key, b"x" + b"user.note")
    v["xattr_key"] = struct.pack(">Q", 2) + xh[:16] + born
    v["xattr_plaintext"] = live + struct.pack(">H", 9) + b"user.note" + b"kept"
    v["blockmap_key"] = struct.pack(">QQ", 3, 0) + born
    v["blockmap_plaintext"] = live + v["block_raw_id"] + struct.pack(">I", len(raw))

    # Archive log part (section 6): one entry, the inode record exactly as LMDB holds it.
    v["log_part_name"] = pname = b"meta/log/0000000000000001-0000"
    inode_env = v["inode_header"] + v["inode_ciphertext"] + v["inode_tag"]
    part = b"VNAFSLG1" + struct.pack(">BQI", 1, 1, 0)
    part += struct.pack(">BH", ord("i"), len(ikey)) + ikey + struct.pack(">I", len(inode_env))
    part += inode_env
    v["log_part_plaintext"] = part
    h, aad, ct, tag = _envelope(dk, 0x52, 0, 1, len(part), _pattern(0xD0, 12), part,
                                b"archive\0" + pname)
    v["log_part_header"], v["log_part_aad"] = h, aad
    v["log_part_ciphertext"], v["log_part_tag"] = ct, tag
    return v


def doc_vectors() -> dict[str, bytes]:
    return parse_vectors(FORMAT_MD.read_text())


def test_vectors_in_format_md_match_an_independent_implementation() -> None:
    doc = doc_vectors()
    frames = {k: doc[k] for k in ("block_zstd_frame", "block_planes_frame") if k in doc}
    ours = compute_vectors(frames)
    assert sorted(doc) == sorted(ours), "format.md and the test list different vectors"
    for name, value in ours.items():
        assert doc[name] == value, f"format.md vector {name} is wrong: expected {value.hex()}"
    # The zstd frames, which are taken from the document, really hold the plaintexts, and
    # carry their content size and no checksum, as section 4 says.
    d = zstandard.ZstdDecompressor()
    for name, plain in (("block_zstd", zstd_plaintext()),
                        ("block_planes", planes(planes_plaintext()))):
        frame = doc[f"{name}_frame"]
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size == len(plain) and not params.has_checksum
        assert d.decompress(frame) == plain


def _keyring(tmp: Path, doc: dict[str, bytes]) -> Any:
    from vnafs.keys import KekSource, Keyring

    path = tmp / "keyring"
    path.write_bytes(doc["keyring_header"] + doc["keyring_ciphertext"] + doc["keyring_tag"])
    return Keyring.open(path, KekSource(key=doc["kek"], origin="format.md vector"))


def test_vnafs_opens_the_vectors(tmp_path: Path) -> None:
    from vnafs.errors import IntegrityError
    from vnafs.seal import KIND_BLOCK, KIND_RECORD, Sealer

    doc = doc_vectors()
    keyring = _keyring(tmp_path, doc)
    assert keyring.fs_id == doc["fs_id"]
    assert keyring.name_key == doc["name_key"] and keyring.dedup_key == doc["dedup_key"]
    assert keyring.versions == [1] and keyring.current_version == 1
    sealer = Sealer(keyring)
    for name, plain in (("block_raw", doc["block_raw_plaintext"]),
                        ("block_zstd", zstd_plaintext()),
                        ("block_planes", planes_plaintext())):
        bid = doc[f"{name}_id"]
        assert sealer.block_id(plain) == bid
        env = doc[f"{name}_header"] + doc[f"{name}_ciphertext"] + doc[f"{name}_tag"]
        assert sealer.open(KIND_BLOCK, bid, env) == plain
        assert bytes(sealer.open_block(bid, env)) == plain
        sealer.check(KIND_BLOCK, bid, env)
        # Bound to its id: under any other id it fails.
        other = doc["block_zstd_id" if name == "block_raw" else "block_raw_id"]
        with pytest.raises(IntegrityError, match="failed authentication"):
            sealer.open(KIND_BLOCK, other, env)
    assert sealer.name_hmac(b"study") == doc["dirent_name_hmac"]
    assert sealer.name_hmac(b"xuser.note") == doc["xattr_name_hmac"]
    for name, tag in (("inode", b"i"), ("dirent", b"d")):
        env = doc[f"{name}_header"] + doc[f"{name}_ciphertext"] + doc[f"{name}_tag"]
        assert sealer.open(KIND_RECORD, tag + doc[f"{name}_key"], env) == doc[f"{name}_plaintext"]
        # Bound to its table: the same key under another table tag fails.
        with pytest.raises(IntegrityError, match="failed authentication"):
            sealer.open(KIND_RECORD, b"x" + doc[f"{name}_key"], env)


def test_vnafs_records_and_log_part_agree_with_the_vectors(tmp_path: Path) -> None:
    """The record layouts, versioned keys and the archive part reader of vnafs itself."""
    from vnafs.archive import log as alog
    from vnafs.meta.db import MetaDB
    from vnafs.meta.namespace import Namespace
    from vnafs.meta.records import BlockRef, Inode, pack_xattr, unpack_dirent
    from vnafs.seal import Sealer

    doc = doc_vectors()
    sealer = Sealer(_keyring(tmp_path, doc))
    root = Inode(1, *inode_fields()[:13])
    assert root.pack() == doc["inode_plaintext"][8:]
    assert Inode.unpack(1, doc["inode_plaintext"][8:]) == root
    assert unpack_dirent(doc["dirent_plaintext"][8:]) == (2, b"study")
    assert pack_xattr(b"user.note", b"kept") == doc["xattr_plaintext"][8:]
    assert BlockRef.unpack(doc["blockmap_plaintext"][8:]) == BlockRef(doc["block_raw_id"], 100)

    db = MetaDB(tmp_path / "meta", sealer)
    try:
        ns = Namespace(db)
        assert ns.dirent_key(1, b"study") == doc["dirent_key"][:-8]
        assert ns.xattr_key(2, b"user.note") == doc["xattr_key"][:-8]
        assert ns.block_key(3, 0) == doc["blockmap_key"][:-8]
        # Raw LMDB puts of the sealed vectors; vnafs finds them as the live versions.
        with db.begin(write=True) as txn:
            for name, table in (("inode", "inodes"), ("dirent", "dirents")):
                env = doc[f"{name}_header"] + doc[f"{name}_ciphertext"] + doc[f"{name}_tag"]
                txn.put(doc[f"{name}_key"], env, db=db.dbs[table])
        with db.begin() as txn:
            assert ns.inode(txn, 1) == root
            assert ns.child(txn, 1, b"study") == 2
            assert ns.inode(txn, 1, epoch=1) == root
        # The same records sealed by vnafs (random nonce) equal the vectors made with that
        # nonce by the independent code: same header, same AAD.
        with db.begin(write=True) as txn:
            db.vput(txn, "inodes", struct.pack(">Q", 1), root.pack(), 1)
            db.vput(txn, "dirents", doc["dirent_key"][:-8], doc["dirent_plaintext"][8:], 1)
        dk = doc["data_key_1"]
        with db.begin() as txn:
            for name, table, tag in (("inode", "inodes", b"i"), ("dirent", "dirents", b"d")):
                env = bytes(txn.get(doc[f"{name}_key"], db=db.dbs[table]))
                assert env[:16] == doc[f"{name}_header"][:16]
                h, _, ct, t = _envelope(dk, 0x52, 0, 1, len(doc[f"{name}_plaintext"]),
                                        env[16:28], doc[f"{name}_plaintext"],
                                        tag + doc[f"{name}_key"])
                assert env == h + ct + t
    finally:
        db.close()

    name = doc["log_part_name"].decode()
    part = doc["log_part_header"] + doc["log_part_ciphertext"] + doc["log_part_tag"]
    inode_env = doc["inode_header"] + doc["inode_ciphertext"] + doc["inode_tag"]
    assert list(alog.read_part(sealer, name, part)) == [(b"i", doc["inode_key"], inode_env)]
    assert alog.part_name(alog.KIND_LOG, 1, 0) == name
    sealed = alog.seal_object(sealer, name, doc["log_part_plaintext"])
    h, _, ct, t = _envelope(doc["data_key_1"], 0x52, 0, 1, len(doc["log_part_plaintext"]),
                            sealed[16:28], doc["log_part_plaintext"],
                            b"archive\0" + doc["log_part_name"])
    assert sealed == h + ct + t


def test_vnafs_seals_the_raw_block_as_the_vector_says(tmp_path: Path) -> None:
    from vnafs.seal import KIND_BLOCK, Sealer

    doc = doc_vectors()
    sealer = Sealer(_keyring(tmp_path, doc))
    plain = doc["block_raw_plaintext"]
    env = sealer.seal(KIND_BLOCK, doc["block_raw_id"], plain)
    # 100 bytes of 00..63 do not compress by 1/32: the writer keeps them raw.
    h, _, ct, t = _envelope(doc["data_key_1"], 0x42, 0, 1, len(plain), env[16:28], plain,
                            doc["block_raw_id"])
    assert env == h + ct + t
    # A codec 1 or 2 block sealed by vnafs opens with the independent reader.
    for plain in (zstd_plaintext(), planes_plaintext()):
        bid = sealer.block_id(plain)
        env = sealer.seal(KIND_BLOCK, bid, plain)
        assert independent_open_block(doc["data_key_1"], bid, env) == plain


def independent_open_block(key: bytes, block_id: bytes, env: bytes) -> bytes:
    """format.md section 4's reader, for a block, without vnafs."""
    magic, kind, codec, reserved, version, length = struct.unpack(">4sBBHII", env[:16])
    assert (magic, kind, reserved, version) == (b"VNS1", 0x42, 0, 1)
    body = AESGCM(key).decrypt(env[16:28], env[28:], env[:28] + block_id)
    if codec == 0:
        plain = body
    else:
        unpacked = zstandard.ZstdDecompressor().decompress(body)
        if codec == 1:
            plain = unpacked
        else:
            assert codec == 2
            k = len(unpacked) // 2
            out = bytearray(len(unpacked))
            out[0 : 2 * k : 2], out[1 : 2 * k : 2] = unpacked[:k], unpacked[k : 2 * k]
            out[2 * k :] = unpacked[2 * k :]
            plain = bytes(out)
    assert len(plain) == length
    return plain


# ------------------------------------------------------------------------------------------------
# 2. The frozen store and archive
# ------------------------------------------------------------------------------------------------

SNAPDIR = ".snapshots"


def manifest() -> dict[str, Any]:
    return dict(json.loads((FIXTURE / "MANIFEST.json").read_text(encoding="utf-8")))


def copy_fixture(workdir: Path) -> Fs:
    """A private copy of the frozen store: `site/site.key`, `site/hot`, and `archive`.

    git keeps no empty directories, so the ones the manifest lists (the 256 `blocks/XX`
    fan-out directories, `tmp/`) are recreated, mode 0700 as vnafs makes them; the hot store's
    `vnafs.toml` gets its archive URL, an absolute path of the machine that made the fixture,
    rewritten to the copied archive. Nothing else is touched."""
    m = manifest()
    site = workdir / "site"
    site.mkdir(mode=0o755)
    (site / "mnt").mkdir(mode=0o755)
    shutil.copy(FIXTURE / m["key_file"], site / "site.key")
    os.chmod(site / "site.key", 0o600)
    shutil.copytree(FIXTURE / "hot", site / "hot")
    shutil.copytree(FIXTURE / "archive", workdir / "archive")
    for base, dirs in ((site / "hot", m["store_dirs"]["hot"]),
                       (workdir / "archive", m["store_dirs"]["archive"])):
        for d in dirs:
            (base / d).mkdir(mode=0o700, parents=True, exist_ok=True)
    url = f"file://{workdir / 'archive'}"
    cfg = site / "hot" / "vnafs.toml"
    old = f"url = {json.dumps(m['archive_url'])}"
    text = cfg.read_text()
    assert text.count(old + "\n") == 1, f"{cfg} does not name the archive as {old}"
    cfg.write_text(text.replace(old + "\n", f"url = {json.dumps(url)}\n"))
    return Fs(site, archive=url)


def describe(root: Path) -> dict[str, dict[str, Any]]:
    """What a reader sees under `root`, in the manifest's terms (walked with readdir, so the
    hidden `.snapshots` and `.dicom` are not in it)."""
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        paths = [Path(dirpath) / n for n in dirnames + filenames]
        if Path(dirpath) == root:
            paths.append(root)
        for path in paths:
            st = path.lstat()
            entry: dict[str, Any] = {
                "mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                "nlink": st.st_nlink, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            }
            if stat.S_ISREG(st.st_mode):
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            else:
                entry["xattrs"] = {x: os.getxattr(path, x).hex() for x in os.listxattr(path)}
            out[str(path.relative_to(root))] = entry
    return out


def describe_views(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root))] = "dir"
        for name in filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_tree(expected: dict[str, dict[str, Any]], root: Path) -> None:
    got = describe(root)
    assert sorted(got) == sorted(expected), f"paths under {root} differ"
    for path, entry in expected.items():
        assert got[path] == entry, f"{root / path}: expected {entry}, got {got[path]}"


def assert_views(expected: dict[str, str], root: Path) -> None:
    """`by-study` exactly as recorded; every other recorded view path still there (a later
    vnafs may add views, but must not lose what format 1 shows)."""
    got = describe_views(root)
    study = {p: v for p, v in expected.items() if p.split("/")[0] == "by-study"}
    assert study, "the manifest records no .dicom/by-study paths"
    assert {p: v for p, v in got.items() if p.split("/")[0] == "by-study"} == study
    for path, value in expected.items():
        assert got.get(path) == value, f"{root / path}: expected {value}, got {got.get(path)}"


def assert_manifest(mnt: Path) -> None:
    """Every path, mode, owner, link count, size, mtime, content, symlink target and xattr of
    the live tree and of the snapshot, and the DICOM views of both, as the manifest has them."""
    m = manifest()
    snap = mnt / SNAPDIR / m["snapshot"]
    assert_tree(m["live"], mnt)
    assert_tree(m["snapshot_tree"], snap)
    assert_views(m["dicom"], mnt / ".dicom")
    assert_views(m["snapshot_dicom"], snap / ".dicom")
    names = [s["name"] for s in json.loads(
        run_vnafs("snapshot", "list", str(mnt), "--json").stdout)]
    assert names == [m["snapshot"]]
    res = run_vnafs("find", str(mnt), "--problems", "--json", check=False)
    assert res.returncode in (0, 3), res.stderr
    problems = json.loads(res.stdout or "[]")
    assert [(p["ino"], p["kind"]) for p in problems] == [
        (p["ino"], p["kind"]) for p in m["dicom_problems"]]


def assert_fsck_clean(fs: Fs, hot: Path) -> None:
    res = run_vnafs("fsck", "--json", "--key-file", str(fs.key), str(hot), check=False)
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["clean"], f"fsck of {hot}: {res.stdout}{res.stderr}"
    assert report["checked_blocks"] > 0


@pytest.fixture
def frozen(workdir: Path) -> Iterator[Fs]:
    """A private copy of the frozen store (not mounted); unmounted and stopped at teardown."""
    fs = copy_fixture(workdir)
    try:
        yield fs
    finally:
        fs.cleanup()


def test_frozen_manifest_is_what_the_tests_expect() -> None:
    """The fixture is the one the rest of this file describes (a guard against a regenerated
    or truncated fixture: it is frozen)."""
    m = manifest()
    assert m["format"] == 1 and m["snapshot"]
    assert (FIXTURE / "hot" / "FORMAT").read_text() == "vnafs-hot-store 1\n"
    live = m["live"]
    assert live["incoming/a/big.bin"]["size"] == (1 << 20) + 1
    assert live["incoming/a/hello.txt"]["nlink"] == 2
    assert live["incoming/latest"]["target"] == "a/hello.txt"
    assert live["incoming/a/hello.txt"]["xattrs"] == {"user.note": b"kept".hex()}
    assert "deleted-after-snapshot.txt" in m["snapshot_tree"]
    assert "deleted-after-snapshot.txt" not in live
    assert any(p.startswith("by-study/") and p.endswith(".dcm") for p in m["dicom"])
    for name in ("vnafs.log", "lock", "control.sock", "daemon.pid", "meta/lock.mdb"):
        assert not (FIXTURE / "hot" / name).exists(), f"runtime file {name} in the fixture"


def test_frozen_hot_store_mounts_and_reads_as_recorded(frozen: Fs) -> None:
    assert_fsck_clean(frozen, frozen.hot)  # as frozen, before anything wrote to it
    frozen.mount()
    assert_manifest(frozen.mnt)
    # The archive it replicates to is the frozen one: every object in it authenticates.
    run_vnafs("verify", "--archive", str(frozen.mnt), timeout=300)
    frozen.umount()
    assert_fsck_clean(frozen, frozen.hot)


def test_frozen_archive_restores_into_a_new_hot_store(frozen: Fs, workdir: Path) -> None:
    restored = Fs(workdir / "restored", archive=frozen.archive)
    restored.root.mkdir(mode=0o755)
    restored.mnt.mkdir(mode=0o755)
    shutil.copy(frozen.key, restored.key)
    try:
        run_vnafs("restore", "--key-file", str(restored.key), "--no-progress",
                  str(frozen.archive), str(restored.hot), timeout=300)
        restored.mount()
        assert_manifest(restored.mnt)
        restored.umount()
    finally:
        restored.cleanup()
    assert_fsck_clean(restored, restored.hot)


def test_frozen_archive_mounts_read_only(frozen: Fs, workdir: Path) -> None:
    # The read-only mount's cache directory plays the hot store (its daemon.pid is there), so
    # Fs.cleanup unmounts and stops it like any other mount.
    ro = Fs(workdir / "ro", archive=frozen.archive)
    ro.root.mkdir(mode=0o755)
    ro.mnt.mkdir(mode=0o755)
    try:
        run_vnafs("mount", "--archive-only", "--key-file", str(frozen.key), "--cache",
                  str(ro.hot), "-o", "allow_other", str(frozen.archive), str(ro.mnt))
        m = manifest()
        big = m["live"]["incoming/a/big.bin"]
        data = (ro.mnt / "incoming" / "a" / "big.bin").read_bytes()
        assert len(data) == big["size"] and hashlib.sha256(data).hexdigest() == big["sha256"]
        assert_manifest(ro.mnt)
    finally:
        ro.cleanup()


def _wrap(hexdigits: str, width: int = 64) -> list[str]:
    return [hexdigits[i : i + width] for i in range(0, len(hexdigits), width)] or [""]


def print_vectors() -> None:
    """Print the vectors as `name = hex` lines (for writing format.md; see the docstring)."""
    for name, value in compute_vectors().items():
        text = name in ("keyring_payload", "log_part_name")
        lines = ([f'"{value[i:i + 60].decode()}"' for i in range(0, len(value), 60)] if text
                 else _wrap(value.hex()))
        pad = " " * (len(name) + 3)
        print(f"{name} = {lines[0]}")
        for line in lines[1:]:
            print(pad + line)


if __name__ == "__main__":
    print_vectors()
    sys.exit(0)
