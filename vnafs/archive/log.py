"""Metadata in the archive: log and checkpoint parts, HEAD, and applying them to LMDB.

The hot store's LMDB values are already sealed envelopes bound to their table and key, so the
archive carries them verbatim: a part is a list of (table, key, value-or-delete) entries, sealed
once more as a whole so its object name is authenticated too (docs/format.md section 6). This
module is the only place that knows those bytes; the replicator writes parts, restore and the
read-only archive mount read them, and both apply them with `apply_part`. `ReplState` is the
hot store's own record of what it has shipped; restore writes it too, so it lives here rather
than beside the replicator's trio code.

Everything here is synchronous (worker threads only).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from vnafs.archive.backend import Backend
from vnafs.errors import IntegrityError
from vnafs.meta.db import REPLICATED, TABLES, TAG_TABLES, MetaDB, records
from vnafs.meta.records import STATE_REPLICATED, BlockRef, RefCount
from vnafs.seal import BLOCK_ID_ALGORITHMS, FORMAT_HMAC_SHA256, KIND_RECORD, Sealer

MAGIC = b"VNAFSLG1"
KIND_LOG = 1
KIND_CHECKPOINT = 2
DELETE = 0xFFFFFFFF
PART_BYTES = 16 << 20

_HEADER = struct.Struct(">8sBQI")
_ENTRY = struct.Struct(">BH")
_VLEN = struct.Struct(">I")

HEAD_NAME = "meta/HEAD"
KEYRING_NAME = "keyring"
CONFIG_NAME = "config"

REPLICATED_TAGS = frozenset(TABLES[name] for name in REPLICATED)


def part_name(kind: int, cycle: int, part: int) -> str:
    folder = "log" if kind == KIND_LOG else "checkpoint"
    return f"meta/{folder}/{cycle:016x}-{part:04x}"


def highest_part_cycle(backend: Backend) -> int:
    """The highest cycle number of any metadata part in the archive (0 if none)."""
    highest = 0
    for name, _ in backend.list("meta/"):
        stem = name.rsplit("/", 1)[-1]
        if name.startswith(("meta/log/", "meta/checkpoint/")) and "-" in stem:
            try:
                highest = max(highest, int(stem.split("-")[0], 16))
            except ValueError:
                continue
    return highest


def block_name(block_id: bytes) -> str:
    h = block_id.hex()
    return f"blocks/{h[:2]}/{h[2:]}"


def block_id_of(name: str) -> bytes | None:
    """The block id of an archive object name, None if it is not a block."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "blocks" or len(parts[1] + parts[2]) != 64:
        return None
    try:
        return bytes.fromhex(parts[1] + parts[2])
    except ValueError:
        return None


def _context(name: str) -> bytes:
    return b"archive\0" + name.encode()


def seal_object(sealer: Sealer, name: str, plaintext: bytes) -> bytes:
    return sealer.seal(KIND_RECORD, _context(name), plaintext, compress=False)


def open_object(sealer: Sealer, name: str, envelope: bytes) -> bytes:
    return sealer.open(KIND_RECORD, _context(name), envelope, name=f"archive object {name}")


# -- parts ----------------------------------------------------------------------------------------


class PartWriter:
    """Cuts a stream of entries into sealed parts of at most PART_BYTES, spooled to files."""

    def __init__(self, sealer: Sealer, spool: Path, kind: int, cycle: int) -> None:
        self.sealer = sealer
        self.spool = spool
        self.kind = kind
        self.cycle = cycle
        self.paths: list[Path] = []
        self.entries = 0
        self._buf = bytearray()
        self._start()

    def _start(self) -> None:
        self._buf = bytearray(_HEADER.pack(MAGIC, self.kind, self.cycle, len(self.paths)))

    def add(self, tag: bytes, key: bytes, value: bytes | None) -> None:
        self._buf += _ENTRY.pack(tag[0], len(key)) + key
        if value is None:
            self._buf += _VLEN.pack(DELETE)
        else:
            self._buf += _VLEN.pack(len(value)) + value
        self.entries += 1
        if len(self._buf) >= PART_BYTES:
            self._finish()

    def _finish(self) -> None:
        name = part_name(self.kind, self.cycle, len(self.paths))
        path = self.spool / f"repl-{self.cycle:016x}-{len(self.paths):04x}"
        path.write_bytes(seal_object(self.sealer, name, bytes(self._buf)))
        self.paths.append(path)
        self._start()

    def close(self) -> list[Path]:
        """Seal the last part (a cycle always has at least one, possibly empty, part)."""
        if len(self._buf) > _HEADER.size or not self.paths:
            self._finish()
        return self.paths


def read_part(sealer: Sealer, name: str, envelope: bytes
              ) -> Iterator[tuple[bytes, bytes, bytes | None]]:
    """(table tag, key, value or None for a delete) of every entry of one part."""
    plain = open_object(sealer, name, envelope)
    magic, _, _, _ = _HEADER.unpack_from(plain)
    if magic != MAGIC:
        raise IntegrityError(f"archive object {name} is not a metadata part")
    pos = _HEADER.size
    end = len(plain)
    try:
        while pos < end:
            tag, klen = _ENTRY.unpack_from(plain, pos)
            pos += _ENTRY.size
            key = plain[pos:pos + klen]
            pos += klen
            (vlen,) = _VLEN.unpack_from(plain, pos)
            pos += _VLEN.size
            if vlen == DELETE:
                value = None
            else:
                value = plain[pos:pos + vlen]
                pos += vlen
                if len(value) != vlen:
                    raise struct.error("short value")
            if bytes([tag]) not in REPLICATED_TAGS or len(key) != klen:
                raise struct.error("bad entry")
            yield bytes([tag]), key, value
    except struct.error:
        raise IntegrityError(f"archive object {name} is malformed") from None


def apply_part(db: MetaDB, txn: lmdb.Transaction,
               entries: Iterable[tuple[bytes, bytes, bytes | None]]) -> int:
    """Write a part's entries verbatim (they are sealed already) into `txn`."""
    n = 0
    for tag, key, value in entries:
        handle = db.dbs[TAG_TABLES[tag]]
        if value is None:
            txn.delete(key, db=handle)
        else:
            txn.put(key, value, db=handle)
        n += 1
    return n


def clear_replicated(db: MetaDB, txn: lmdb.Transaction) -> None:
    """Empty every replicated table (before a checkpoint is applied over old state)."""
    for name in REPLICATED:
        txn.drop(db.dbs[name], delete=False)


def rebuild_refs(db: MetaDB, txn: lmdb.Transaction,
                 sizes: dict[bytes, int] | None = None) -> dict[bytes, int]:
    """Recount `refs` from every block map version (live or not); all blocks are replicated.

    Returns block id -> reference count."""
    counts: dict[bytes, int] = {}
    for key, value in records(txn.cursor(db=db.dbs["blockmap"])):
        body = db.open_record("blockmap", key, value)
        block_id = BlockRef.unpack(body[8:]).block_id
        counts[block_id] = counts.get(block_id, 0) + 1
    txn.drop(db.dbs["refs"], delete=False)
    for block_id, count in counts.items():
        stored = (sizes or {}).get(block_id, 0)
        db.put(txn, "refs", block_id, RefCount(count, STATE_REPLICATED, stored).pack())
    return counts


# -- what the hot store has shipped -------------------------------------------------------------


@dataclass
class ReplState:
    """What this hot store has put in the archive (table `repl_state`, format.md 5.3)."""

    cycle: int = 0
    committed: int = 0
    checkpoint: tuple[int, int] = (0, 0)
    logs: list[tuple[int, int]] = field(default_factory=list)
    rp_ns: int = 0
    since_checkpoint: int = 0
    log_bytes: int = 0  # sealed log bytes shipped since the checkpoint
    checkpoint_bytes: int = 0
    keyring_sha256: str = ""
    config_sha256: str = ""

    def to_json(self) -> bytes:
        d = dict(vars(self))
        d["checkpoint"] = list(self.checkpoint)
        d["logs"] = [list(x) for x in self.logs]
        return json.dumps(d).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ReplState:
        d = json.loads(raw)
        st = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        st.checkpoint = (int(d["checkpoint"][0]), int(d["checkpoint"][1]))
        st.logs = [(int(c), int(p)) for c, p in d["logs"]]
        return st


STATE_KEY = b"state"


def load_state(db: MetaDB) -> ReplState:
    with db.begin() as txn:
        raw = db.get(txn, "repl_state", STATE_KEY)
    return ReplState() if raw is None else ReplState.from_json(raw)


def save_state(db: MetaDB, txn: Any, st: ReplState) -> None:
    db.put(txn, "repl_state", STATE_KEY, st.to_json())


# -- HEAD -----------------------------------------------------------------------------------------


class UnknownFormat(IntegrityError):
    """HEAD names a store format this vnafs does not know. An IntegrityError for the callers
    that treat any unreadable HEAD alike; restore and the read-only mount show it alone, as
    the one line it is."""


@dataclass
class Head:
    """The commit marker: which checkpoint and cycles make up the archive's state."""

    fs_id: str
    cycle: int
    rp_ns: int
    checkpoint: tuple[int, int]  # (cycle, parts)
    logs: list[tuple[int, int]] = field(default_factory=list)
    keyring_sha256: str = ""
    written_ns: int = 0
    # The hot store's format version (its block-id algorithm; docs/format.md section 6).
    format: int = FORMAT_HMAC_SHA256

    def to_json(self) -> bytes:
        return json.dumps({
            "format": self.format, "fs_id": self.fs_id, "cycle": self.cycle, "rp_ns": self.rp_ns,
            "written_ns": self.written_ns,
            "checkpoint": {"cycle": self.checkpoint[0], "parts": self.checkpoint[1]},
            "logs": [list(x) for x in self.logs], "keyring_sha256": self.keyring_sha256,
        }).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Head:
        try:
            d: dict[str, Any] = json.loads(raw)
            fmt = d.get("format")
            if type(fmt) is not int or fmt not in BLOCK_ID_ALGORITHMS:
                raise UnknownFormat(f"the archive's HEAD has format {fmt}, which this vnafs "
                                    "does not know: upgrade vnafs")
            return cls(str(d["fs_id"]), int(d["cycle"]), int(d["rp_ns"]),
                       (int(d["checkpoint"]["cycle"]), int(d["checkpoint"]["parts"])),
                       [(int(c), int(p)) for c, p in d["logs"]], str(d["keyring_sha256"]),
                       int(d.get("written_ns", 0)), fmt)
        except (ValueError, KeyError, TypeError):
            raise IntegrityError("the archive's HEAD is malformed") from None

    def parts_after(self, applied: int) -> Iterator[tuple[int, str]]:
        """(cycle, object name) of every part a reader at cycle `applied` still needs, in
        order; the checkpoint's parts come first when it is newer than `applied`."""
        ckpt, nparts = self.checkpoint
        if ckpt > applied:
            for p in range(nparts):
                yield ckpt, part_name(KIND_CHECKPOINT, ckpt, p)
            applied = ckpt
        for cycle, nparts in self.logs:
            if cycle > applied:
                for p in range(nparts):
                    yield cycle, part_name(KIND_LOG, cycle, p)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
