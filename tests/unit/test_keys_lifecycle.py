"""Key slots and KEK replacement, in process: the keyring format (version 2) and its rules.

1. **The worked example of docs/format.md section 3** (the ```` ```keyring-v2 ```` block): every
   value is recomputed here from the document's text with `cryptography` and `hashlib` only (no
   vnafs code), the two must agree name by name, and vnafs must open the example file with
   either slot's key and list its slots. What vnafs writes is read back by the same independent
   reader, so the code cannot drift from the document either. `python -m
   tests.unit.test_keys_lifecycle` prints the block (for writing format.md, never to "fix" a
   failing test).
2. **The slot rules**: rewrap, add and remove on version 1 and 2 keyrings; every refused
   operation leaves the keyring file byte-identical; sealing goes on during key changes.
3. **The KEK sources** that need no other process: file descriptors, the prompt (with a fake
   terminal), the environment variable removed after use. Key commands and real mounts are in
   tests/test_keys_lifecycle.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vnafs import keyadmin
from vnafs.errors import VnafsError
from vnafs.keys import (
    KekSource,
    Keyring,
    forget_environment_variable,
    prompt_passphrase,
    read_passphrase_fd,
    read_slots,
    resolve_kek_source,
    resolve_new_kek_source,
)
from vnafs.seal import KIND_BLOCK, Sealer
from vnafs.store.lifecycle import lock_store, mkfs

REPO = Path(__file__).resolve().parents[2]
FORMAT_MD = REPO / "docs" / "format.md"
FAST = 10  # scrypt log N for the tests (the default, 15, costs about 0.2 s per try)
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


def _pattern(start: int, n: int) -> bytes:
    return bytes((start + i) & 0xFF for i in range(n))


def key(n: int) -> KekSource:
    return KekSource(key=bytes([n]) * 32, origin=f"key {n}")


def phrase(text: str) -> KekSource:
    return KekSource(passphrase=text.encode(), origin=f"passphrase {text}")


# -- 1. the worked example --------------------------------------------------------------------------


def compute_vectors() -> dict[str, bytes]:
    """The example of format.md section 3 (version 2), from the document's text alone."""
    v: dict[str, bytes] = {}
    v["kek_site"] = kek_site = _pattern(0x00, 32)
    v["recovery_passphrase"] = passphrase = b"correct horse battery staple"
    v["recovery_salt"] = salt = _pattern(0xE0, 16)
    v["kek_recovery"] = kek_recovery = hashlib.scrypt(passphrase, salt=salt, n=2**10, r=8, p=1,
                                                      maxmem=2**27, dklen=32)
    v["keyring_key"] = keyring_key = _pattern(0x90, 32)
    v["slot_0_nonce"] = nonce0 = _pattern(0x30, 12)
    v["slot_1_nonce"] = nonce1 = _pattern(0x40, 12)
    # number, kdf, logN, r, p, salt, created, label length, label, nonce
    head0 = (struct.pack(">BBBBB16sQB", 0, 0, 0, 0, 0, bytes(16), T0, 4) + b"site" + nonce0)
    head1 = (struct.pack(">BBBBB16sQB", 1, 1, 10, 8, 1, salt, T0 + 86400, 8) + b"recovery"
             + nonce1)
    v["slot_0_head"] = head0
    v["slot_0_wrapped"] = AESGCM(kek_site).encrypt(nonce0, keyring_key, head0)
    v["slot_1_head"] = head1
    v["slot_1_wrapped"] = AESGCM(kek_recovery).encrypt(nonce1, keyring_key, head1)
    prefix = (b"VNAFSKR1" + bytes([2, 2]) + head0 + v["slot_0_wrapped"] + head1
              + v["slot_1_wrapped"])
    # The payload of section 7.1's example, as version 2.
    v["keyring_v2_payload"] = payload = json.dumps({
        "version": 2, "fs_id": _pattern(0x60, 16).hex(), "master": _pattern(0x20, 32).hex(),
        "data_keys": {"1": _pattern(0x40, 32).hex()}, "current": 1, "nonce_budget": 2**32,
        "reserved": {"1": 1048576}, "created": "2026-01-01T00:00:00Z"},
        separators=(",", ":")).encode()
    v["keyring_v2_nonce"] = nonce = _pattern(0x70, 12)
    v["keyring_v2_prefix"] = prefix
    sealed = AESGCM(keyring_key).encrypt(nonce, payload, prefix + nonce)
    v["keyring_v2_ciphertext"] = sealed[:-16]
    v["keyring_v2_tag"] = sealed[-16:]
    return v


TEXT_VECTORS = ("recovery_passphrase", "keyring_v2_payload")


def parse_block(text: str) -> dict[str, bytes]:
    """name -> bytes from the ```keyring-v2 block (the same notation as section 7: `name = hex`
    with spaces and `#` comments, `name = "text"`, indented continuation lines)."""
    blocks = re.findall(r"^```keyring-v2\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) == 1, "docs/format.md needs exactly one ```keyring-v2 block"
    out: dict[str, bytes] = {}
    name = None
    for line in blocks[0].splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            assert name is not None, line
            out[name] += _value(line.strip())
            continue
        m = re.fullmatch(r"([a-z0-9_]+)\s*=\s*(.*)", line)
        assert m, f"not a vector line: {line!r}"
        name = m.group(1)
        assert name not in out, f"{name} given twice"
        out[name] = _value(m.group(2).strip())
    return out


def _value(text: str) -> bytes:
    if text.startswith('"'):
        assert text.endswith('"') and len(text) >= 2, text
        return text[1:-1].encode()
    digits = text.split("#", 1)[0].replace(" ", "")
    assert re.fullmatch(r"(?:[0-9a-f]{2})*", digits), f"not lower-case hex bytes: {text!r}"
    return bytes.fromhex(digits)


def example_file(doc: dict[str, bytes]) -> bytes:
    return (doc["keyring_v2_prefix"] + doc["keyring_v2_nonce"] + doc["keyring_v2_ciphertext"]
            + doc["keyring_v2_tag"])


def read_v2(data: bytes, kek_for: dict[int, bytes]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """An independent reader of format.md section 3, version 2: (slots, payload). `kek_for`
    maps slot numbers to KEKs; the first slot that has one and unwraps gives the keyring key."""
    assert data[:8] == b"VNAFSKR1" and data[8] == 2
    count, pos = data[9], 10
    slots: list[dict[str, Any]] = []
    keyring_key = None
    for _ in range(count):
        number, kdf, log_n, r, p, salt, created, size = struct.unpack_from(">BBBBB16sQB", data,
                                                                             pos)
        head_end = pos + 30 + size + 12
        head, wrapped = data[pos:head_end], data[head_end : head_end + 48]
        slots.append({"number": number, "kdf": kdf, "log_n": log_n, "r": r, "p": p,
                      "salt": salt, "created": created,
                      "label": data[pos + 30 : pos + 30 + size].decode()})
        if keyring_key is None and number in kek_for:
            keyring_key = AESGCM(kek_for[number]).decrypt(head[-12:], wrapped, head)
        pos = head_end + 48
    assert keyring_key is not None, "no KEK for any slot"
    nonce = data[pos : pos + 12]
    payload = AESGCM(keyring_key).decrypt(nonce, data[pos + 12 :], data[: pos + 12])
    return slots, json.loads(payload)


def test_example_in_format_md_matches_an_independent_implementation() -> None:
    doc = parse_block(FORMAT_MD.read_text())
    ours = compute_vectors()
    assert sorted(doc) == sorted(ours), "format.md and the test list different values"
    for name, value in ours.items():
        assert doc[name] == value, f"format.md value {name} is wrong: expected {value.hex()}"


def test_vnafs_opens_the_example_with_either_slot(tmp_path: Path) -> None:
    doc = parse_block(FORMAT_MD.read_text())
    path = tmp_path / "keyring"
    path.write_bytes(example_file(doc))
    site = KekSource(key=doc["kek_site"], origin="site key")
    recovery = KekSource(passphrase=doc["recovery_passphrase"], origin="recovery passphrase")
    for source, slot in ((site, 0), (recovery, 1)):
        ring = Keyring.open(path, source)
        assert ring.opened_slot == slot and ring.format_version == 2
        assert ring.fs_id == _pattern(0x60, 16) and ring.versions == [1]
        name_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                        info=b"vnafs name-hmac v1").derive(_pattern(0x20, 32))
        assert ring.name_key == name_key
        assert ring.reserved == {1: 1048576}
    version, slots = read_slots(path)
    assert version == 2
    assert [(s.number, s.kind, s.label, s.created_iso) for s in slots] == [
        (0, "key-file", "site", "2026-01-01T00:00:00Z"),
        (1, "passphrase", "recovery", "2026-01-02T00:00:00Z")]
    # The 32-byte passphrase-looking key is not the passphrase: kinds are kept apart.
    with pytest.raises(VnafsError, match="wrong key"):
        Keyring.open(path, KekSource(key=doc["kek_recovery"], origin="derived KEK as a key"))


def test_what_vnafs_writes_reads_back_independently(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    ring = Keyring.create(path, key(1))
    ring.add_slot(key(1), phrase("second"), label="pw", scrypt_log_n=FAST)
    data = path.read_bytes()
    slots, payload = read_v2(data, {0: bytes([1]) * 32})
    assert [(s["number"], s["kdf"], s["label"]) for s in slots] == [(0, 0, ""), (1, 1, "pw")]
    assert (slots[1]["log_n"], slots[1]["r"], slots[1]["p"]) == (FAST, 8, 1)
    assert payload["version"] == 2 and payload["fs_id"] == ring.fs_id.hex()
    kek = hashlib.scrypt(b"second", salt=slots[1]["salt"], n=2**FAST, r=8, p=1, maxmem=2**27,
                         dklen=32)
    assert read_v2(data, {1: kek})[1] == payload
    # A later reservation rewrite seals the payload again under the same slot records.
    prefix = 10 + (30 + 0 + 12 + 48) + (30 + 2 + 12 + 48)
    ring.add_data_key()
    slots_again, payload_again = read_v2(path.read_bytes(), {1: kek})
    assert slots_again == slots and payload_again["current"] == 2
    assert path.read_bytes()[:prefix] == data[:prefix]
    assert path.read_bytes()[prefix : prefix + 12] != data[prefix : prefix + 12]  # new nonce


# -- 2. the slot rules --------------------------------------------------------------------------


def new_ring(tmp_path: Path, source: KekSource | None = None, **kw: Any) -> Keyring:
    return Keyring.create(tmp_path / "keyring", source or key(1), **kw)


def unchanged(path: Path) -> Any:
    """A context checking that the keyring file is byte-identical afterwards."""
    class _Check:
        def __enter__(self) -> None:
            self.before = path.read_bytes()

        def __exit__(self, *exc: object) -> None:
            assert path.read_bytes() == self.before, "a refused operation changed the keyring"
            assert not path.with_name("keyring.tmp").exists()

    return _Check()


def test_version_1_stays_version_1_until_a_key_operation(tmp_path: Path) -> None:
    ring = new_ring(tmp_path, reserve_chunk=2)
    path = ring.path
    sealer = Sealer(ring)
    envelopes = [(i, sealer.seal(KIND_BLOCK, b"ctx", f"block {i}".encode() * 50))
                 for i in range(10)]  # five reservation rewrites
    data = path.read_bytes()
    assert data[8] == 0 and ring.format_version == 1
    assert read_slots(path)[0] == 1
    again = Keyring.open(path, key(1))
    assert again.format_version == 1 and again.opened_slot == 0
    assert again.slots[0].created_iso == json.loads(
        AESGCM(bytes([1]) * 32).decrypt(data[28:40], data[40:], data[:40]))["created"]
    for i, env in envelopes:
        assert Sealer(again).open(KIND_BLOCK, b"ctx", env, name="b") == f"block {i}".encode() * 50


def test_rewrap_replaces_the_kek_and_keeps_everything_else(tmp_path: Path) -> None:
    ring = new_ring(tmp_path, reserve_chunk=3)
    path = ring.path
    sealer = Sealer(ring)
    env = sealer.seal(KIND_BLOCK, b"ctx", b"before the rewrap" * 10)
    reserved, versions, created = ring.reserved, ring.versions, ring.slots[0].created
    slot = ring.rewrap(key(1), key(2))
    assert slot.number == 0 and slot.kind == "key-file" and slot.label == ""
    assert slot.created >= created
    assert ring.format_version == 2 and path.read_bytes()[8] == 2
    with pytest.raises(VnafsError, match=r"^wrong key: key 1 does not open"):
        Keyring.open(path, key(1))
    reopened = Keyring.open(path, key(2))
    assert reopened.reserved == reserved and reopened.versions == versions
    assert reopened.fs_id == ring.fs_id and reopened.name_key == ring.name_key
    assert Sealer(reopened).open(KIND_BLOCK, b"ctx", env, name="b") == b"before the rewrap" * 10
    # Sealing goes on under the same data keys; the reservations now rewrite version 2.
    more = [sealer.seal(KIND_BLOCK, b"ctx", bytes([i]) * 100) for i in range(8)]
    reopened = Keyring.open(path, key(2))
    assert reopened.format_version == 2 and reopened.reserved[1] > reserved[1]
    for i, e in enumerate(more):
        assert Sealer(reopened).open(KIND_BLOCK, b"ctx", e, name="b") == bytes([i]) * 100
    # Rewrapping a version 2 keyring keeps the slot's number and label and the other slots.
    reopened.add_slot(key(2), key(3), label="recovery")
    other = read_slots(path)[1][1].encode()
    reopened.rewrap(key(2), key(4))
    version, slots = read_slots(path)
    assert version == 2
    assert [(s.number, s.label) for s in slots] == [(0, ""), (1, "recovery")]
    assert slots[1].encode() == other
    for source, number in ((key(4), 0), (key(3), 1)):
        assert Keyring.open(path, source).opened_slot == number
    with pytest.raises(VnafsError, match="wrong key"):
        Keyring.open(path, key(2))


def test_rewrap_between_kinds_and_passphrases(tmp_path: Path) -> None:
    ring = new_ring(tmp_path, phrase("first"), scrypt_log_n=FAST)
    salt = ring.path.read_bytes()[12:28]
    ring.rewrap(phrase("first"), phrase("second"), scrypt_log_n=FAST)
    (slot,) = read_slots(ring.path)[1]
    assert slot.kind == "passphrase" and slot.salt != salt  # a fresh salt for a new passphrase
    assert Keyring.open(ring.path, phrase("second")).opened_slot == 0
    with pytest.raises(VnafsError, match="wrong key: passphrase first"):
        Keyring.open(ring.path, phrase("first"))
    ring.rewrap(phrase("second"), key(7))
    assert read_slots(ring.path)[1][0].kind == "key-file"
    with pytest.raises(VnafsError, match="created with a key file"):
        Keyring.open(ring.path, phrase("second"))
    assert Keyring.open(ring.path, key(7)).opened_slot == 0


def test_the_opening_key_is_checked_again_after_a_change(tmp_path: Path) -> None:
    # The source given to open() is trusted without a second KDF run, but only until the first
    # key change: after a rewrap it must not pass for the slot it no longer opens.
    new_ring(tmp_path)
    old = key(1)
    ring = Keyring.open(tmp_path / "keyring", old)
    ring.rewrap(old, key(2))
    with unchanged(ring.path), pytest.raises(VnafsError, match="wrong key: key 1"):
        ring.add_slot(old, key(3))


def test_rewrap_refusals_leave_the_file_alone(tmp_path: Path) -> None:
    ring = new_ring(tmp_path)
    path = ring.path
    with unchanged(path), pytest.raises(VnafsError, match=r"^wrong key: key 9"):
        ring.rewrap(key(9), key(2))
    with unchanged(path), pytest.raises(VnafsError, match="created with a key file"):
        ring.rewrap(phrase("x"), key(2))
    with unchanged(path), pytest.raises(VnafsError, match="same as the old one"):
        ring.rewrap(key(1), KekSource(key=bytes([1]) * 32, origin="the same key again"))
    assert ring.format_version == 1  # nothing converted either
    ring.add_slot(key(1), key(2))
    with unchanged(path), pytest.raises(VnafsError, match="key 2 opens slot 1 already"):
        ring.rewrap(key(1), key(2))
    with unchanged(path), pytest.raises(VnafsError, match="opens none of the 2 key slots"):
        ring.rewrap(key(3), key(4))


def test_add_slot_rules(tmp_path: Path) -> None:
    ring = new_ring(tmp_path)
    path = ring.path
    first = ring.add_slot(key(1), key(2), label="recovery")
    assert (first.number, first.label, ring.format_version) == (1, "recovery", 2)
    with unchanged(path), pytest.raises(VnafsError, match="labelled 'recovery' already"):
        ring.add_slot(key(1), key(3), label="recovery")
    with unchanged(path), pytest.raises(VnafsError, match="opens slot 0 already"):
        ring.add_slot(key(2), key(1))
    with unchanged(path), pytest.raises(VnafsError, match="wrong key"):
        ring.add_slot(key(9), key(3))
    with unchanged(path), pytest.raises(VnafsError, match="at most 64"):
        ring.add_slot(key(1), key(3), label="x" * 65)
    for evil in ("evil\x1b[2J", "a\u202eb", "line\u2028break"):
        with unchanged(path), pytest.raises(VnafsError, match="control characters"):
            ring.add_slot(key(1), key(3), label=evil)
    for n in range(3, 9):
        ring.add_slot(key(2), key(n), label=f"k{n}")
    assert [s.number for s in ring.slots] == list(range(8))
    with unchanged(path), pytest.raises(VnafsError, match="all 8 key slots in use"):
        ring.add_slot(key(1), key(20))
    # The lowest free number is reused, as LUKS does.
    ring.remove_slot(key(1), number=3)
    assert ring.add_slot(key(1), key(21), label="ünïcode ok").number == 3
    for n, source in enumerate([key(1), key(2), key(3), key(21), key(5)]):
        assert Keyring.open(path, source).opened_slot == n


def test_remove_slot_rules(tmp_path: Path) -> None:
    ring = new_ring(tmp_path)
    path = ring.path
    with unchanged(path), pytest.raises(VnafsError, match="slot 0 is the only key slot"):
        ring.remove_slot(key(1), number=0)
    with unchanged(path), pytest.raises(VnafsError, match="has no slot 4"):
        ring.remove_slot(key(1), number=4)
    ring.add_slot(key(1), key(2), label="recovery")
    with unchanged(path), pytest.raises(VnafsError, match="has no slot labelled 'nope'"):
        ring.remove_slot(key(1), label="nope")
    with unchanged(path), pytest.raises(VnafsError, match="opens slot 1, the slot to remove"):
        ring.remove_slot(key(2), label="recovery")
    with unchanged(path), pytest.raises(VnafsError, match="wrong key"):
        ring.remove_slot(key(9), number=1)
    with unchanged(path), pytest.raises(VnafsError, match="--slot N or --label"):
        ring.remove_slot(key(1))
    removed = ring.remove_slot(key(2), number=0)  # the recovery key removes the site key
    assert removed.number == 0 and [s.number for s in ring.slots] == [1]
    with pytest.raises(VnafsError, match=r"^wrong key: key 1 does not open"):
        Keyring.open(path, key(1))
    assert Keyring.open(path, key(2)).opened_slot == 1
    with unchanged(path), pytest.raises(VnafsError, match="slot 1 is the only key slot"):
        ring.remove_slot(key(2), number=1)


def test_kind_messages_with_slots(tmp_path: Path) -> None:
    ring = new_ring(tmp_path)
    ring.add_slot(key(1), key(2))
    with pytest.raises(VnafsError, match="created with a key file, not a passphrase"):
        Keyring.open(ring.path, phrase("x"))
    ring.add_slot(key(1), phrase("pw"), scrypt_log_n=FAST)
    with pytest.raises(VnafsError, match=r"^wrong key: passphrase nope opens none of the 3"):
        Keyring.open(ring.path, phrase("nope"))
    ring.remove_slot(key(1), number=1)
    ring.remove_slot(phrase("pw"), number=0)
    with pytest.raises(VnafsError, match="created with a passphrase, not a key file"):
        Keyring.open(ring.path, key(1))


def test_damaged_or_tampered_version_2_files(tmp_path: Path) -> None:
    ring = new_ring(tmp_path)
    ring.add_slot(key(1), phrase("pw"), label="recovery", scrypt_log_n=FAST)
    path = ring.path
    good = path.read_bytes()
    label_at = good.index(b"recovery")

    def opened_with(data: bytes, source: KekSource) -> str:
        path.write_bytes(data)
        with pytest.raises(VnafsError) as info:
            Keyring.open(path, source)
        return str(info.value)

    # Another slot's label changed: slot 0 still unwraps, the payload does not authenticate.
    bad = bytearray(good)
    bad[label_at] ^= 0x20
    assert "is damaged (slot 0 opens" in opened_with(bytes(bad), key(1))
    for count in (0, 9):
        assert "is damaged" in opened_with(good[:9] + bytes([count]) + good[10:], key(1))
    assert "is damaged" in opened_with(good[:60], key(1))
    assert "is damaged" in opened_with(good[:-40], key(1))  # the tail is too short
    # Slot numbers must rise: swap slot 1's number to 0.
    second = 10 + 30 + 12 + 48
    assert "is damaged" in opened_with(good[:second] + b"\0" + good[second + 1 :], key(1))
    bad = bytearray(good)
    bad[second + 1] = 5
    assert "unknown key derivation (5)" in opened_with(bytes(bad), phrase("pw"))
    bad[second + 1], bad[second + 2] = 1, 40
    assert "invalid scrypt parameters" in opened_with(bytes(bad), phrase("pw"))
    # A key-file slot with a non-zero salt, and a label that is no UTF-8.
    assert "is damaged" in opened_with(good[:15] + b"\1" + good[16:], key(1))
    bad = bytearray(good)
    bad[label_at] = 0xFF
    assert "is damaged" in opened_with(bytes(bad), key(1))
    # Read without a key, an absurd creation time is shown as unknown, not a crash.
    created_at = 10 + 21
    path.write_bytes(good[:created_at] + b"\xff" * 8 + good[created_at + 8 :])
    assert read_slots(path)[1][0].created_iso is None
    path.write_bytes(good)
    assert Keyring.open(path, phrase("pw")).opened_slot == 1


def test_failed_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ring = new_ring(tmp_path)
    path = ring.path

    def refuse(*args: object) -> None:
        raise OSError(28, "No space left on device")

    with unchanged(path):
        monkeypatch.setattr(os, "replace", refuse)
        with pytest.raises(VnafsError, match=r"cannot write keyring.*No space left"):
            ring.rewrap(key(1), key(2))
        monkeypatch.undo()
    # The in-memory keyring is as before too: version 1, and key 1 still authenticates.
    assert ring.format_version == 1
    ring.rewrap(key(1), key(2))
    assert Keyring.open(path, key(2)).opened_slot == 0


def test_sealing_goes_on_during_key_changes(tmp_path: Path) -> None:
    ring = new_ring(tmp_path, reserve_chunk=5)
    sealer = Sealer(ring)
    sealed: list[tuple[bytes, bytes]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def seal() -> None:
        i = 0
        try:
            while not stop.is_set() or i < 200:
                plain = f"{threading.get_ident()} {i}".encode() * 20
                sealed.append((plain, sealer.seal(KIND_BLOCK, b"ctx", plain)))
                i += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=seal) for _ in range(3)]
    for t in threads:
        t.start()
    current = key(1)
    for n in range(2, 12):
        ring.rewrap(current, key(n))
        current = key(n)
        ring.add_slot(current, phrase(f"p{n}"), scrypt_log_n=FAST)
        ring.remove_slot(current, number=next(s.number for s in ring.slots
                                              if s.kind == "passphrase"))
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    reopened = Keyring.open(ring.path, current)
    assert [s.number for s in reopened.slots] == [0]
    total = len(sealed)
    assert reopened.reserved[1] >= total  # every seal was covered by a durable reservation
    check = Sealer(reopened)
    for plain, env in sealed:
        assert check.open(KIND_BLOCK, b"ctx", env, name="b") == plain


# -- keyadmin: offline operations and control requests ---------------------------------------------


def test_offline_operations_take_the_store_lock(tmp_path: Path) -> None:
    hot = tmp_path / "hot"
    mkfs(hot, key(1), archive_url=None, uid=0, gid=0)
    done = keyadmin.change_offline(hot, keyadmin.ADD_SLOT, key(1), key(2), label="recovery")
    assert done is not None
    assert done["through"] == "offline" and done["slot"]["label"] == "recovery"
    assert [s["slot"] for s in done["slots"]] == [0, 1] and done["keyring_version"] == 2
    listing = keyadmin.list_slots(hot, key(2))
    assert listing["opened_by"] == 1 and listing["keyring_version"] == 2
    assert keyadmin.list_slots(hot)["opened_by"] is None
    # Held by another offline tool: refused. Held by a daemon (its socket is there): None, so
    # that the command goes through the daemon instead.
    fd = lock_store(hot)
    try:
        with unchanged(hot / "keyring"), pytest.raises(VnafsError, match="in use"):
            keyadmin.change_offline(hot, keyadmin.REWRAP, key(1), key(3))
        (hot / "control.sock").touch()
        assert keyadmin.change_offline(hot, keyadmin.REWRAP, key(1), key(3)) is None
    finally:
        os.close(fd)
        (hot / "control.sock").unlink()
    with pytest.raises(VnafsError, match="not a vnafs hot store"):
        keyadmin.change_offline(tmp_path, keyadmin.REWRAP, key(1), key(3))


def test_control_request_round_trip_and_validation(tmp_path: Path) -> None:
    hot = tmp_path / "hot"
    mkfs(hot, key(1), archive_url=None, uid=0, gid=0)
    from vnafs.store.lifecycle import open_store

    store = open_store(hot, key(1))
    try:
        req = keyadmin.request(keyadmin.REWRAP, key(1), phrase("new"))
        wire = json.loads(json.dumps(req))
        assert "new" in json.dumps(wire) and b"new".hex() in json.dumps(wire)
        out = keyadmin.apply_request(store, wire)
        assert out["through"] == "mount" and out["slot"]["kind"] == "passphrase"
        for bad in ({**wire, "auth": {"key": "00"}}, {**wire, "auth": None},
                    {**wire, "new": {"passphrase": ""}}, {**wire, "new": {"key": "zz"}},
                    {**wire, "op": "key_nonsense"}, {**wire, "slot": "1"}):
            with unchanged(hot / "keyring"), pytest.raises(VnafsError, match="bad control"):
                keyadmin.apply_request(store, bad)
    finally:
        store.close()
    assert Keyring.open(hot / "keyring", phrase("new")).opened_slot == 0


# -- 3. KEK sources ----------------------------------------------------------------------------------


def test_passphrase_fd_reads_one_line_per_use() -> None:
    r, w = os.pipe()
    os.write(w, b"old secret\nnew secret\r\n\n")
    os.close(w)
    try:
        assert read_passphrase_fd(r) == b"old secret"
        assert resolve_new_kek_source(passphrase_fd=r).passphrase == b"new secret"
        with pytest.raises(VnafsError, match="gave an empty passphrase"):
            read_passphrase_fd(r)
    finally:
        os.close(r)
    with pytest.raises(VnafsError, match=f"file descriptor {r} is not open"):
        read_passphrase_fd(r)
    with pytest.raises(VnafsError, match="not a file descriptor"):
        read_passphrase_fd(-1)
    r, w = os.pipe()
    try:
        with pytest.raises(VnafsError, match="cannot read file descriptor"):
            read_passphrase_fd(w)  # the write end
    finally:
        os.close(r)
        os.close(w)


def test_prompt_asks_twice_for_a_new_passphrase() -> None:
    answers: list[str] = []
    asked: list[str] = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        if not answers:
            raise EOFError
        return answers.pop(0)

    answers[:] = ["pässword", "pässword"]
    assert prompt_passphrase("New passphrase: ", confirm=True, ask=ask) == "pässword".encode()
    assert asked == ["New passphrase: ", "Repeat new passphrase: "]
    answers[:] = ["one", "two"]
    with pytest.raises(VnafsError, match="the two passphrases differ"):
        prompt_passphrase("New passphrase: ", confirm=True, ask=ask)
    answers[:] = [""]
    with pytest.raises(VnafsError, match="empty"):
        prompt_passphrase("Passphrase: ", ask=ask)
    answers[:] = []
    with pytest.raises(VnafsError, match="no passphrase was typed"):
        prompt_passphrase("Passphrase: ", ask=ask)
    answers[:] = ["a", "a"]
    source = resolve_new_kek_source(passphrase_prompt=True, ask=ask)
    assert source.passphrase == b"a" and "typed" in source.origin


def test_new_source_choices() -> None:
    with pytest.raises(VnafsError, match="no new key given"):
        resolve_new_kek_source()
    with pytest.raises(VnafsError, match="sets a passphrase"):
        resolve_new_kek_source(key_file="/nonexistent", passphrase_only=True)
    with pytest.raises(VnafsError, match="changes a passphrase, not a key file"):
        resolve_kek_source("/nonexistent", None, {}, passphrase_only=True)
    source = resolve_new_kek_source(passphrase_env="NEWPW", environ={"NEWPW": "x"})
    assert source.passphrase == b"x" and "$NEWPW" in source.origin
    with pytest.raises(VnafsError, match="NEWPW is not set"):
        resolve_new_kek_source(passphrase_env="NEWPW", environ={})


def test_passphrase_env_is_removed_after_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VNAFS_TEST_PW", "sekrit")
    source = resolve_kek_source(None, "VNAFS_TEST_PW")
    assert source.passphrase == b"sekrit"
    assert "VNAFS_TEST_PW" not in os.environ
    # A given mapping (tests, the fstab helper) is left alone.
    env = {"PW": "x"}
    resolve_kek_source(None, "PW", env)
    assert env == {"PW": "x"}
    forget_environment_variable("VNAFS_TEST_NEVER_SET")  # no error for a missing one


if __name__ == "__main__":
    # Print the ```keyring-v2 block of format.md section 3 from the independent code.
    for name, value in compute_vectors().items():
        if name in TEXT_VECTORS:
            chunks = [value[i : i + 60].decode() for i in range(0, len(value), 60)]
            lines = [f'"{c}"' for c in chunks]
        else:
            h = value.hex()
            lines = [h[i : i + 64] for i in range(0, len(h), 64)]
        pad = " " * (len(name) + 3)
        print(f"{name} = {lines[0]}")
        for line in lines[1:]:
            print(pad + line)
    sys.exit(0)
