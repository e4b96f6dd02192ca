"""Tests for the key hierarchy (vnafs.keys) and the sealed envelope (vnafs.seal).

Real files in tmp_path, no mocks. Where it matters the on-disk bytes are checked with an
independent reader written here from docs/format.md, so a bug shared by writer and reader in the
module would still be caught.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import stat
import struct
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vnafs.errors import IntegrityError, VnafsError
from vnafs.keys import (
    KEK_BYTES,
    KekSource,
    Keyring,
    generate_key_file,
    read_key_file,
    resolve_kek_source,
)
from vnafs.seal import (
    CODEC_BYTEPLANE16,
    CODEC_RAW,
    CODEC_ZSTD,
    HEADER_LEN,
    KIND_BLOCK,
    KIND_RECORD,
    OVERHEAD,
    Sealer,
    _from_planes,
    _to_planes,
)

# A stand-in for PHI: it must never show up in sealed bytes or the keyring file.
SECRET = b"DOE^JANE 1.2.840.113619.2.55.3.604688119.868.1234567890.123"
PASSPHRASE = b"correct horse battery staple"
FAST_LOG_N = 10


# -- helpers ---------------------------------------------------------------------------------------


def key_source(key: bytes | None = None) -> KekSource:
    return KekSource(key=key if key is not None else os.urandom(KEK_BYTES), origin="test key")


def pass_source(passphrase: bytes = PASSPHRASE) -> KekSource:
    return KekSource(passphrase=passphrase, origin="test passphrase")


def kek_for(path: Path, source: KekSource) -> bytes:
    """Derive the KEK the way format.md section 2 says, from the keyring header."""
    data = path.read_bytes()
    kdf, log_n, r, p = data[8], data[9], data[10], data[11]
    if kdf == 0:
        assert source.key is not None
        return source.key
    assert kdf == 1 and source.passphrase is not None
    salt = data[12:28]
    return hashlib.scrypt(
        source.passphrase, salt=salt, n=2**log_n, r=r, p=p, maxmem=2**27, dklen=32
    )


def read_keyring(path: Path, kek: bytes) -> dict[str, Any]:
    """Independent reader for format.md section 3."""
    data = path.read_bytes()
    assert data[:8] == b"VNAFSKR1"
    payload = AESGCM(kek).decrypt(data[28:40], data[40:], data[:40])
    doc = json.loads(payload)
    assert isinstance(doc, dict)
    return doc


def write_keyring(path: Path, kek: bytes, header_prefix: bytes, payload: bytes) -> None:
    nonce = os.urandom(12)
    header = header_prefix + nonce
    path.write_bytes(header + AESGCM(kek).encrypt(nonce, payload, header))


def new_keyring(tmp_path: Path, **kwargs: Any) -> tuple[Keyring, KekSource]:
    source = key_source()
    return Keyring.create(tmp_path / "keyring", source, **kwargs), source


def block(seed: int, size: int = 4096) -> bytes:
    """Compressible, distinct plaintext."""
    return (f"block {seed} ".encode() * (size // 8 + 1))[:size]


# -- key files ---------------------------------------------------------------------------------------


def test_generate_key_file_mode_format_and_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "vnafs.key"
    generate_key_file(path)
    text = path.read_bytes()
    assert len(text) == 65 and text.endswith(b"\n")
    assert text[:64] == text[:64].lower() and bytes.fromhex(text[:64].decode())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path) == bytes.fromhex(text[:64].decode())

    with pytest.raises(VnafsError, match="refusing to overwrite existing key file"):
        generate_key_file(path)
    assert path.read_bytes() == text

    other = tmp_path / "other.key"
    generate_key_file(other)
    assert read_key_file(other) != read_key_file(path)


def test_generate_key_file_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(VnafsError, match="cannot create key file"):
        generate_key_file(tmp_path / "nope" / "vnafs.key")


def test_read_key_file_hex_and_raw(tmp_path: Path) -> None:
    key = os.urandom(32)
    hex_file = tmp_path / "hex"
    hex_file.write_bytes(b"  \n" + key.hex().encode() + b"\n\n")
    assert read_key_file(hex_file) == key
    upper = tmp_path / "upper"
    upper.write_bytes(key.hex().upper().encode())
    assert read_key_file(upper) == key

    raw = tmp_path / "raw"
    raw.write_bytes(key)
    assert read_key_file(raw) == key
    # Raw keys may contain whitespace bytes; they must not be stripped.
    spaces = tmp_path / "spaces"
    spaces.write_bytes(b"\n" * 16 + b" " * 16)
    assert read_key_file(spaces) == b"\n" * 16 + b" " * 16

    # Group/world-readable key files are accepted.
    os.chmod(raw, 0o644)
    assert read_key_file(raw) == key


@pytest.mark.parametrize(
    "content",
    [b"", b"a" * 63, b"a" * 65, b"g" * 64, os.urandom(31), os.urandom(33), b"ab" * 32 + b"x"],
)
def test_read_key_file_bad_format(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(VnafsError, match="is not a vnafs key") as info:
        read_key_file(path)
    assert "vnafs keygen" in str(info.value)


def test_read_key_file_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(VnafsError, match="does not exist: pass the key created by 'vnafs keygen'"):
        read_key_file(tmp_path / "missing")
    with pytest.raises(VnafsError, match="is a directory"):
        read_key_file(tmp_path)


def test_kek_source_validation_and_repr() -> None:
    key = os.urandom(32)
    source = KekSource(key=key, origin="key file /x")
    assert key.hex() not in repr(source) and repr(key) not in repr(source)
    assert PASSPHRASE.decode() not in repr(pass_source())
    with pytest.raises(ValueError):
        KekSource()
    with pytest.raises(ValueError):
        KekSource(key=key, passphrase=b"x")
    with pytest.raises(ValueError):
        KekSource(key=b"short")
    with pytest.raises(ValueError):
        KekSource(passphrase=b"")


# -- resolving the KEK source ----------------------------------------------------------------------


def test_resolve_order(tmp_path: Path) -> None:
    key_file = tmp_path / "k"
    generate_key_file(key_file)
    creds = tmp_path / "creds"
    creds.mkdir()
    generate_key_file(creds / "vnafs.key")
    env = {"PW": "sekrit", "CREDENTIALS_DIRECTORY": str(creds)}

    src = resolve_kek_source(str(key_file), "PW", env)
    assert src.key == read_key_file(key_file) and src.passphrase is None
    assert str(key_file) in src.origin

    src = resolve_kek_source(None, "PW", env)
    assert src.passphrase == b"sekrit" and src.key is None
    assert "PW" in src.origin

    src = resolve_kek_source(None, None, env)
    assert src.key == read_key_file(creds / "vnafs.key")
    assert "vnafs.key" in src.origin


def test_resolve_passphrase_is_utf8(tmp_path: Path) -> None:
    src = resolve_kek_source(None, "PW", {"PW": "pässwörd"})
    assert src.passphrase == "pässwörd".encode()


def test_resolve_missing_or_empty_env_var(tmp_path: Path) -> None:
    for env in ({}, {"VNAFS_PW": ""}):
        with pytest.raises(VnafsError, match="VNAFS_PW"):
            resolve_kek_source(None, "VNAFS_PW", env)


def test_resolve_nothing_given(tmp_path: Path) -> None:
    message = (
        "no key given: pass --key-file FILE or --passphrase-env VAR, "
        "or run under systemd with LoadCredential=vnafs.key"
    )
    with pytest.raises(VnafsError) as info:
        resolve_kek_source(None, None, {})
    assert str(info.value) == message
    # A credentials directory without vnafs.key is the same as none.
    with pytest.raises(VnafsError, match="no key given"):
        resolve_kek_source(None, None, {"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_resolve_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(VnafsError, match="does not exist"):
        resolve_kek_source(str(tmp_path / "missing"), None, {})


# -- keyring ---------------------------------------------------------------------------------------


def test_keyring_create_open_roundtrip(tmp_path: Path) -> None:
    ring, source = new_keyring(tmp_path)
    path = tmp_path / "keyring"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (tmp_path / "keyring.tmp").exists()
    assert len(ring.fs_id) == 16
    assert ring.versions == [1] and ring.current_version == 1
    assert ring.nonce_budget == 2**32
    assert len(ring.name_key) == 32 and len(ring.dedup_key) == 32
    assert ring.name_key != ring.dedup_key

    again = Keyring.open(path, source)
    assert again.fs_id == ring.fs_id
    assert again.name_key == ring.name_key and again.dedup_key == ring.dedup_key
    assert again.versions == [1] and again.current_version == 1

    (tmp_path / "other").mkdir()
    other, _ = new_keyring(tmp_path / "other")
    assert other.fs_id != ring.fs_id and other.name_key != ring.name_key


def test_keyring_file_layout(tmp_path: Path) -> None:
    ring, source = new_keyring(tmp_path)
    path = tmp_path / "keyring"
    data = path.read_bytes()
    assert data[:8] == b"VNAFSKR1"
    assert data[8:28] == bytes(20)  # kdf 0: logN, r, p, salt all zero
    doc = read_keyring(path, source.key or b"")
    assert list(doc) == [
        "version",
        "fs_id",
        "master",
        "data_keys",
        "current",
        "nonce_budget",
        "reserved",
        "created",
    ]
    assert doc["version"] == 1 and doc["current"] == 1
    assert doc["fs_id"] == ring.fs_id.hex()
    assert doc["nonce_budget"] == 4294967296
    assert doc["reserved"] == {"1": 1048576}
    assert set(doc["data_keys"]) == {"1"} and len(doc["data_keys"]["1"]) == 64
    assert doc["created"].endswith("Z") and "T" in doc["created"]
    master = bytes.fromhex(doc["master"])
    for info, derived in (
        (b"vnafs name-hmac v1", ring.name_key),
        (b"vnafs block-id v1", ring.dedup_key),
    ):
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info)
        assert hkdf.derive(master) == derived
    # No key material in the clear.
    for secret in (master, bytes.fromhex(doc["data_keys"]["1"]), source.key or b""):
        assert secret not in data and secret.hex().encode() not in data


def test_keyring_create_refuses_existing(tmp_path: Path) -> None:
    _, source = new_keyring(tmp_path)
    before = (tmp_path / "keyring").read_bytes()
    with pytest.raises(VnafsError, match="refusing to overwrite existing keyring"):
        Keyring.create(tmp_path / "keyring", source)
    assert (tmp_path / "keyring").read_bytes() == before


def test_keyring_open_errors(tmp_path: Path) -> None:
    _, source = new_keyring(tmp_path)
    with pytest.raises(VnafsError, match="does not exist"):
        Keyring.open(tmp_path / "missing", source)
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"not a keyring at all, just some bytes of text here" * 2)
    with pytest.raises(VnafsError, match=f"{bogus} is not a vnafs keyring"):
        Keyring.open(bogus, source)
    short = tmp_path / "short"
    short.write_bytes(b"VNAFSKR1")
    with pytest.raises(VnafsError, match="is not a vnafs keyring"):
        Keyring.open(short, source)


def test_keyring_wrong_key(tmp_path: Path) -> None:
    new_keyring(tmp_path)
    wrong = KekSource(key=os.urandom(32), origin="key file /etc/wrong.key")
    with pytest.raises(VnafsError) as info:
        Keyring.open(tmp_path / "keyring", wrong)
    assert str(info.value) == (
        "wrong key: key file /etc/wrong.key does not open this file system's keyring; "
        "use the key it was created with"
    )
    assert wrong.key is not None and wrong.key.hex() not in str(info.value)


def test_keyring_damaged_file_is_wrong_key_or_damaged(tmp_path: Path) -> None:
    _, source = new_keyring(tmp_path)
    path = tmp_path / "keyring"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(VnafsError, match="wrong key"):
        Keyring.open(path, source)


def test_keyring_authentic_but_malformed_payload(tmp_path: Path) -> None:
    _, source = new_keyring(tmp_path)
    path = tmp_path / "keyring"
    kek = source.key or b""
    prefix = path.read_bytes()[:28]
    good = read_keyring(path, kek)
    cases: list[bytes] = [
        b"not json",
        json.dumps({**good, "current": 2}).encode(),
        json.dumps({**good, "reserved": {"1": 2**32 + 1}}).encode(),
        json.dumps({**good, "master": "00"}).encode(),
        json.dumps({**good, "data_keys": {}}).encode(),
        json.dumps({**good, "data_keys": {"0": good["data_keys"]["1"]}}).encode(),
        json.dumps({**good, "nonce_budget": True}).encode(),
    ]
    for payload in cases:
        write_keyring(path, kek, prefix, payload)
        with pytest.raises(VnafsError, match="damaged"):
            Keyring.open(path, source)
    write_keyring(path, kek, prefix, json.dumps({**good, "version": 2}).encode())
    with pytest.raises(VnafsError, match="upgrade vnafs"):
        Keyring.open(path, source)
    # And the untouched payload still opens: the failures above came from the edits.
    write_keyring(path, kek, prefix, json.dumps(good).encode())
    assert Keyring.open(path, source).versions == [1]


def test_keyring_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    ring = Keyring.create(path, pass_source(), scrypt_log_n=FAST_LOG_N)
    data = path.read_bytes()
    assert data[8:12] == bytes([1, FAST_LOG_N, 8, 1])
    assert data[12:28] != bytes(16)  # random salt
    assert PASSPHRASE not in data

    again = Keyring.open(path, pass_source())
    assert again.fs_id == ring.fs_id and again.name_key == ring.name_key
    doc = read_keyring(path, kek_for(path, pass_source()))
    assert doc["fs_id"] == ring.fs_id.hex()

    with pytest.raises(VnafsError, match=r"^wrong key: test passphrase does not open"):
        Keyring.open(path, pass_source(b"incorrect horse"))
    with pytest.raises(VnafsError, match=r"created with a passphrase.*--passphrase-env"):
        Keyring.open(path, key_source())


def test_keyring_key_store_refuses_passphrase(tmp_path: Path) -> None:
    new_keyring(tmp_path)
    with pytest.raises(VnafsError, match=r"created with a key file.*--key-file"):
        Keyring.open(tmp_path / "keyring", pass_source())


def test_keyring_scrypt_range(tmp_path: Path) -> None:
    with pytest.raises(VnafsError, match="scrypt log N"):
        Keyring.create(tmp_path / "keyring", pass_source(), scrypt_log_n=20)
    assert not (tmp_path / "keyring").exists()


def test_aead_unknown_version(tmp_path: Path) -> None:
    ring, _ = new_keyring(tmp_path)
    assert isinstance(ring.aead(1), AESGCM)
    with pytest.raises(IntegrityError, match="unknown data key version 7"):
        ring.aead(7)


def test_add_data_key_is_durable(tmp_path: Path) -> None:
    ring, source = new_keyring(tmp_path)
    sealer = Sealer(ring)
    old = sealer.seal(KIND_BLOCK, b"\x01" * 32, b"old")
    assert ring.add_data_key() == 2
    assert ring.current_version == 2 and ring.versions == [1, 2]
    new = sealer.seal(KIND_BLOCK, b"\x02" * 32, b"new")
    assert Sealer.header_info(new)[2] == 2

    reopened = Sealer(Keyring.open(tmp_path / "keyring", source))
    assert reopened.keyring.current_version == 2
    assert reopened.open(KIND_BLOCK, b"\x01" * 32, old) == b"old"
    assert reopened.open(KIND_BLOCK, b"\x02" * 32, new) == b"new"


# -- nonce budget ------------------------------------------------------------------------------------


def test_nonce_budget_rolls_keys(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    source = key_source()
    ring = Keyring.create(path, source, nonce_budget=8, reserve_chunk=2)
    sealer = Sealer(ring)
    sealed: list[tuple[bytes, bytes, bytes]] = []
    per_version: Counter[int] = Counter()
    for i in range(30):
        ctx = hashlib.sha256(b"%d" % i).digest()
        plain = b"message %d" % i
        env = sealer.seal(KIND_BLOCK, ctx, plain)
        version = Sealer.header_info(env)[2]
        per_version[version] += 1
        sealed.append((ctx, plain, env))
        # The file must already cover every seal handed out, and never exceed the budget.
        doc = read_keyring(path, source.key or b"")
        reserved = {int(v): n for v, n in doc["reserved"].items()}
        assert all(n <= 8 for n in reserved.values())
        for v, count in per_version.items():
            assert count <= reserved[v]
    assert all(count <= 8 for count in per_version.values())
    assert len(per_version) >= 4
    assert ring.versions == sorted(per_version)

    reopened = Sealer(Keyring.open(path, source, reserve_chunk=2))
    assert reopened.keyring.versions == ring.versions
    for ctx, plain, env in sealed:
        assert reopened.open(KIND_BLOCK, ctx, env) == plain
    # The default chunk (2**20) must still work on a keyring with a tiny budget.
    Sealer(Keyring.open(path, source)).seal(KIND_BLOCK, bytes(32), b"x")


def test_reopen_does_not_reuse_reserved_budget(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    source = key_source()
    kek = source.key or b""
    ring = Keyring.create(path, source, nonce_budget=8, reserve_chunk=2)
    Sealer(ring).seal(KIND_RECORD, b"c", b"one")
    assert read_keyring(path, kek)["reserved"] == {"1": 2}

    # One seal of the chunk of 2 is unused, but a new process cannot know: it reserves anew.
    ring = Keyring.open(path, source, reserve_chunk=2)
    assert read_keyring(path, kek)["reserved"] == {"1": 2}
    Sealer(ring).seal(KIND_RECORD, b"c", b"two")
    assert read_keyring(path, kek)["reserved"] == {"1": 4}

    Keyring.open(path, source, reserve_chunk=2)  # opened, never used
    ring = Keyring.open(path, source, reserve_chunk=2)
    Sealer(ring).seal(KIND_RECORD, b"c", b"three")
    assert read_keyring(path, kek)["reserved"] == {"1": 6}
    assert ring.reserved == {1: 6}


def test_reservation_rewrites_are_amortised(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    ring = Keyring.create(path, key_source(), reserve_chunk=5)
    sealer = Sealer(ring)
    before = path.read_bytes()
    for i in range(5):
        sealer.seal(KIND_RECORD, b"c", b"%d" % i)
    # A rewrite uses a fresh nonce, so identical bytes mean no rewrite happened.
    assert path.read_bytes() == before
    sealer.seal(KIND_RECORD, b"c", b"6")
    assert path.read_bytes() != before
    assert ring.reserved == {1: 10}


# -- sealing -----------------------------------------------------------------------------------------


@pytest.fixture
def sealer(tmp_path: Path) -> Sealer:
    ring, _ = new_keyring(tmp_path)
    return Sealer(ring)


@pytest.mark.parametrize(
    "plain",
    [b"", b"x", SECRET, os.urandom(5000), block(1, 1 << 20), os.urandom(1 << 20)],
    ids=["empty", "one", "secret", "random", "1mib-compressible", "1mib-random"],
)
def test_seal_open_roundtrip(sealer: Sealer, plain: bytes) -> None:
    ctx = sealer.block_id(plain)
    env = sealer.seal(KIND_BLOCK, ctx, plain)
    assert sealer.open(KIND_BLOCK, ctx, env) == plain
    assert sealer.open(KIND_BLOCK, ctx, memoryview(env)) == plain
    kind, codec, version, length = Sealer.header_info(env)
    assert (kind, version, length) == (KIND_BLOCK, 1, len(plain))
    assert codec in (CODEC_RAW, CODEC_ZSTD)
    assert len(env) >= OVERHEAD


def test_codec_choice(sealer: Sealer) -> None:
    ctx = bytes(32)
    compressible = block(7, 1 << 16)
    env = sealer.seal(KIND_BLOCK, ctx, compressible)
    assert Sealer.header_info(env)[1] == CODEC_ZSTD
    assert len(env) < len(compressible) // 4

    noise = os.urandom(1 << 16)
    env = sealer.seal(KIND_BLOCK, ctx, noise)
    assert Sealer.header_info(env)[1] == CODEC_RAW
    assert len(env) == len(noise) + OVERHEAD

    env = sealer.seal(KIND_BLOCK, ctx, compressible, compress=False)
    assert Sealer.header_info(env)[1] == CODEC_RAW
    # Metadata records are never compressed (format.md section 4).
    env = sealer.seal(KIND_RECORD, b"i" + bytes(8), compressible)
    assert Sealer.header_info(env)[1] == CODEC_RAW
    assert sealer.open(KIND_RECORD, b"i" + bytes(8), env) == compressible


def test_seal_accepts_buffers(sealer: Sealer) -> None:
    data = bytearray(block(3, 10000))
    ctx = sealer.block_id(data)
    assert ctx == sealer.block_id(bytes(data)) == sealer.block_id(memoryview(data))
    for buf in (data, memoryview(data), memoryview(data)[100:2000]):
        env = sealer.seal(KIND_BLOCK, ctx, buf)
        assert sealer.open(KIND_BLOCK, ctx, env) == bytes(buf)


def test_envelope_layout(sealer: Sealer) -> None:
    """Check the header bytes and decrypt with an independent implementation of section 4."""
    ctx = b"d" + bytes(8) + b"\xaa" * 16
    env = sealer.seal(KIND_RECORD, ctx, SECRET)
    magic, kind, codec, reserved, version, length, nonce = struct.unpack(">4sBBHII12s", env[:28])
    assert (magic, kind, codec, reserved, version, length) == (b"VNS1", 0x52, 0, 0, 1, len(SECRET))
    aead = sealer.keyring.aead(1)
    assert aead.decrypt(nonce, env[28:], env[:28] + ctx) == SECRET
    with pytest.raises(InvalidTag):
        aead.decrypt(nonce, env[28:], env[:28])


def test_no_plaintext_in_envelopes_or_keyring(tmp_path: Path) -> None:
    ring, _ = new_keyring(tmp_path)
    sealer = Sealer(ring)
    for kind, compress in ((KIND_BLOCK, True), (KIND_BLOCK, False), (KIND_RECORD, False)):
        env = sealer.seal(kind, b"ctx", SECRET * 10, compress=compress)
        assert SECRET not in env and SECRET[:8] not in env
    assert SECRET not in (tmp_path / "keyring").read_bytes()


def test_every_flipped_byte_fails(sealer: Sealer) -> None:
    ctx = os.urandom(32)
    for plain, compress in ((SECRET, False), (block(9, 300), True)):
        env = sealer.seal(KIND_BLOCK, ctx, plain, compress=compress)
        for i in range(len(env)):
            for mask in (0x01, 0x80):
                bad = bytearray(env)
                bad[i] ^= mask
                with pytest.raises(IntegrityError, match=r"^block x failed authentication"):
                    sealer.open(KIND_BLOCK, ctx, bytes(bad), name="block x")


def test_truncated_or_extended_envelope_fails(sealer: Sealer) -> None:
    ctx = os.urandom(32)
    env = sealer.seal(KIND_BLOCK, ctx, SECRET)
    for n in range(len(env)):
        with pytest.raises(IntegrityError, match="failed authentication"):
            sealer.open(KIND_BLOCK, ctx, env[:n])
    with pytest.raises(IntegrityError):
        sealer.open(KIND_BLOCK, ctx, env + b"\x00")


def test_context_and_kind_are_bound(sealer: Sealer) -> None:
    id_a, id_b = sealer.block_id(b"a"), sealer.block_id(b"b")
    env = sealer.seal(KIND_BLOCK, id_a, SECRET)
    with pytest.raises(IntegrityError, match=r"^block b failed authentication"):
        sealer.open(KIND_BLOCK, id_b, env, name="block b")
    with pytest.raises(IntegrityError):
        sealer.open(KIND_RECORD, id_a, env)

    key = struct.pack(">QQ", 1, 2)
    rec = sealer.seal(KIND_RECORD, b"b" + key, SECRET)
    assert sealer.open(KIND_RECORD, b"b" + key, rec) == SECRET
    for other in (b"i" + key, b"b" + struct.pack(">QQ", 1, 3), b"b" + key + b"\x00", b"b"):
        with pytest.raises(IntegrityError):
            sealer.open(KIND_RECORD, other, rec)
    with pytest.raises(IntegrityError):
        sealer.open(KIND_BLOCK, b"b" + key, rec)


def test_envelope_from_another_keyring_fails(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Sealer(new_keyring(tmp_path / "a")[0])
    b = Sealer(new_keyring(tmp_path / "b")[0])
    env = a.seal(KIND_BLOCK, bytes(32), SECRET)
    with pytest.raises(IntegrityError, match="failed authentication"):
        b.open(KIND_BLOCK, bytes(32), env)
    b.keyring.add_data_key()
    env2 = b.seal(KIND_BLOCK, bytes(32), SECRET)
    with pytest.raises(IntegrityError, match="unknown data key version 2"):
        a.open(KIND_BLOCK, bytes(32), env2)


def test_unknown_codec_is_refused(sealer: Sealer) -> None:
    # An authentic envelope (built by hand) with a codec number no version has defined.
    ctx = bytes(32)
    nonce = os.urandom(12)
    header = struct.pack(">4sBBHII12s", b"VNS1", KIND_BLOCK, 3, 0, 1, 3, nonce)
    env = header + sealer.keyring.aead(1).encrypt(nonce, b"abc", header + ctx)
    with pytest.raises(IntegrityError, match="unsupported codec"):
        sealer.open(KIND_BLOCK, ctx, env)


def test_byteplane_codec_for_16_bit_samples(sealer: Sealer) -> None:
    # Smooth 16-bit samples with noise in the low byte: the byte-plane split should win.
    rnd = random.Random(7)
    samples = [1000 + (i % 512) // 4 + rnd.randrange(8) for i in range(300_001)]
    for data in (struct.pack(f"<{len(samples)}H", *samples),
                 struct.pack(f"<{len(samples)}H", *samples)[:-1]):  # odd length too
        env = sealer.seal(KIND_BLOCK, bytes(32), data)
        assert Sealer.header_info(env)[1] == CODEC_BYTEPLANE16
        assert len(env) < len(data) // 2
        assert sealer.open(KIND_BLOCK, bytes(32), env) == data
        damaged = bytearray(env)
        damaged[-40] ^= 1
        with pytest.raises(IntegrityError):
            sealer.open(KIND_BLOCK, bytes(32), bytes(damaged))


def test_byte_planes_layout_is_the_format() -> None:
    # format.md: low (even-offset) bytes, then high (odd-offset) bytes, a trailing odd byte last.
    assert bytes(_to_planes(b"\x01\x02\x03\x04\x05")) == b"\x01\x03\x02\x04\x05"
    rnd = random.Random(3)
    for n in (0, 1, 2, 3, 4, 7, 64, 65, 65_537):
        data = rnd.randbytes(n)
        want = data[0 : n & ~1 : 2] + data[1 : n & ~1 : 2] + data[n & ~1 :]
        for given in (data, bytearray(data), memoryview(data)):
            assert bytes(_to_planes(given)) == want
        assert _from_planes(want) == data


def test_open_block_gives_a_read_only_view_of_byte_plane_blocks(sealer: Sealer) -> None:
    rnd = random.Random(11)
    data = struct.pack("<200000H", *(1000 + rnd.randrange(16) for _ in range(200_000)))
    env = sealer.seal(KIND_BLOCK, bytes(32), data)
    assert Sealer.header_info(env)[1] == CODEC_BYTEPLANE16
    view = sealer.open_block(bytes(32), env)
    assert isinstance(view, memoryview) and view.readonly and view == data
    assert type(sealer.open(KIND_BLOCK, bytes(32), env)) is bytes  # open() stays bytes
    raw = sealer.seal(KIND_BLOCK, bytes(32), b"short")
    assert sealer.open_block(bytes(32), raw) == b"short"
    with pytest.raises(IntegrityError):
        sealer.open_block(bytes(31) + b"\x01", env)


def test_incompressible_block_is_stored_raw(sealer: Sealer) -> None:
    data = os.urandom(1 << 20)
    env = sealer.seal(KIND_BLOCK, bytes(32), data)
    assert Sealer.header_info(env)[1] == CODEC_RAW
    assert sealer.open(KIND_BLOCK, bytes(32), env) == data


def test_authentic_length_mismatch_is_refused(sealer: Sealer) -> None:
    ctx = bytes(32)
    nonce = os.urandom(12)
    header = struct.pack(">4sBBHII12s", b"VNS1", KIND_BLOCK, CODEC_RAW, 0, 1, 4, nonce)
    env = header + sealer.keyring.aead(1).encrypt(nonce, b"abc", header + ctx)
    with pytest.raises(IntegrityError, match="length mismatch"):
        sealer.open(KIND_BLOCK, ctx, env)


def test_header_info_rejects_garbage() -> None:
    with pytest.raises(IntegrityError):
        Sealer.header_info(b"VNS1")
    with pytest.raises(IntegrityError):
        Sealer.header_info(b"XXXX" + bytes(60))
    assert HEADER_LEN == 28 and OVERHEAD == 44


def test_block_id_and_name_hmac(sealer: Sealer) -> None:
    ring = sealer.keyring
    assert sealer.block_id(b"abc") == hmac.digest(ring.dedup_key, b"abc", "sha256")
    assert sealer.name_hmac(b"abc") == hmac.digest(ring.name_key, b"abc", "sha256")
    assert sealer.block_id(b"abc") != sealer.name_hmac(b"abc")
    assert len(sealer.block_id(b"")) == 32 and len(sealer.name_hmac(b"")) == 32
    assert sealer.block_id(block(1)) == sealer.block_id(block(1))
    assert sealer.block_id(block(1)) != sealer.block_id(block(2))


def test_errors_name_no_phi(sealer: Sealer) -> None:
    env = sealer.seal(KIND_BLOCK, bytes(32), SECRET)
    bad = bytearray(env)
    bad[-1] ^= 1
    with pytest.raises(IntegrityError) as info:
        sealer.open(KIND_BLOCK, bytes(32), bytes(bad), name="block 00ff")
    assert SECRET.decode() not in str(info.value)
    assert str(info.value).startswith("block 00ff failed authentication")


# -- concurrency -------------------------------------------------------------------------------------


def test_concurrent_sealing(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    source = key_source()
    # Small budget and chunk so that reservations and key rotations race with sealing too.
    ring = Keyring.create(path, source, nonce_budget=600, reserve_chunk=50)
    sealer = Sealer(ring)
    threads_n, per_thread = 8, 250
    results: list[list[tuple[bytes, bytes, bytes]]] = [[] for _ in range(threads_n)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                plain = block(t * 100000 + i, 2048) if i % 2 else os.urandom(512)
                ctx = sealer.block_id(plain)
                results[t].append((ctx, plain, sealer.seal(KIND_BLOCK, ctx, plain)))
        except BaseException as err:  # surfaced below; a thread cannot fail the test itself
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors

    sealed = [item for per in results for item in per]
    assert len(sealed) == threads_n * per_thread
    nonces = {env[16:28] for _, _, env in sealed}
    assert len(nonces) == len(sealed)
    per_version = Counter(Sealer.header_info(env)[2] for _, _, env in sealed)
    assert all(count <= 600 for count in per_version.values())
    doc = read_keyring(path, source.key or b"")
    for v, count in per_version.items():
        assert count <= doc["reserved"][str(v)] <= 600

    reopened = Sealer(Keyring.open(path, source))
    for ctx, plain, env in sealed:
        assert reopened.open(KIND_BLOCK, ctx, env, name="block") == plain


def test_keyring_tampered_kdf_header(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    Keyring.create(path, pass_source(), scrypt_log_n=FAST_LOG_N)
    good = path.read_bytes()
    cases = [
        (9, FAST_LOG_N + 1, "wrong key"),  # plausible cost: caught by the AAD
        (9, 40, "invalid scrypt parameters"),  # absurd cost: refused before running scrypt
        (10, 0, "invalid scrypt parameters"),
        (8, 7, "unknown key derivation"),
    ]
    for offset, value, message in cases:
        bad = bytearray(good)
        bad[offset] = value
        path.write_bytes(bytes(bad))
        with pytest.raises(VnafsError, match=message):
            Keyring.open(path, pass_source())


def test_compression_threshold_is_one_32nd(sealer: Sealer) -> None:
    # Random data with a run of zeros: zstd saves exactly about the run, so the run length
    # walks the saving across the 1/32 threshold.
    noise = os.urandom(8192)
    seen_gap = False
    for zeros in range(0, 700, 20):
        plain = noise + bytes(zeros)
        packed = zstandard.ZstdCompressor(level=1, write_checksum=False).compress(plain)
        keep = 32 * len(packed) <= 31 * len(plain)
        seen_gap |= len(packed) < len(plain) and not keep
        codec = Sealer.header_info(sealer.seal(KIND_BLOCK, bytes(32), plain))[1]
        assert codec == (CODEC_ZSTD if keep else CODEC_RAW), zeros
    assert seen_gap


def test_authentic_nonzero_reserved_field_is_refused(sealer: Sealer) -> None:
    ctx = bytes(32)
    nonce = os.urandom(12)
    header = struct.pack(">4sBBHII12s", b"VNS1", KIND_BLOCK, CODEC_RAW, 1, 1, 3, nonce)
    env = header + sealer.keyring.aead(1).encrypt(nonce, b"abc", header + ctx)
    with pytest.raises(IntegrityError, match="bad header"):
        sealer.open(KIND_BLOCK, ctx, env)
    with pytest.raises(IntegrityError, match="bad header"):
        Sealer.header_info(env)


def test_check_authenticates_without_opening(sealer: Sealer) -> None:
    """check() accepts exactly what open() accepts, for any size in any order (its per-thread
    scratch buffer is reused and grown), and refuses every damaged or misbound envelope."""
    sizes = [1 << 20, 0, 1, 5000, 3 << 20, 100]  # grows past the 1 MiB scratch, then shrinks
    envs = []
    for i, size in enumerate(sizes):
        plain = os.urandom(size) if i % 2 else block(i, size)
        ctx = sealer.block_id(plain)
        envs.append((ctx, sealer.seal(KIND_BLOCK, ctx, plain)))
    for ctx, env in envs + envs[::-1]:
        sealer.check(KIND_BLOCK, ctx, env)
        sealer.check(KIND_BLOCK, ctx, memoryview(env))
    ctx, env = envs[3]
    for pos in range(0, len(env), max(1, len(env) // 97)):
        bad = bytearray(env)
        bad[pos] ^= 0x40
        with pytest.raises(IntegrityError):
            sealer.check(KIND_BLOCK, ctx, bytes(bad))
    with pytest.raises(IntegrityError, match="bad tag"):
        sealer.check(KIND_BLOCK, bytes(32), env)
    with pytest.raises(IntegrityError, match="wrong kind"):
        sealer.check(KIND_RECORD, ctx, env)
    with pytest.raises(IntegrityError, match="truncated"):
        sealer.check(KIND_BLOCK, ctx, env[:OVERHEAD - 1])
    with pytest.raises(IntegrityError):
        sealer.check(KIND_BLOCK, ctx, env[:-1])
