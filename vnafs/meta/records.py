"""Plain record types of the namespace and their byte layouts (docs/format.md section 5).

Kept apart from the transaction logic so that the format spec and the code that implements it
can be read side by side.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

BLOCK_SIZE = 1 << 20
ROOT_INO = 1

_INODE = struct.Struct(">QIIIIQQqqqQqQI")
_BLOCKREF = struct.Struct(">32sI")
_REFS = struct.Struct(">QBI")
_U16 = struct.Struct(">H")

STATE_HOT = 1
STATE_REPLICATED = 2
STATE_EVICTED = 3

# Inode flags (docs/format.md 5.2): how many DICOM view names link to the file.
FLAG_DICOM_VIEWS = 1
FLAG_DICOM_ACCESSION = 2


@dataclass(slots=True)
class Inode:
    ino: int
    generation: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    parent: int
    birthtime_ns: int
    flags: int = 0
    target: bytes = field(default=b"", repr=False)

    def pack(self) -> bytes:
        return (
            _INODE.pack(
                self.generation,
                self.mode,
                self.uid,
                self.gid,
                self.nlink,
                self.size,
                self.rdev,
                self.atime_ns,
                self.mtime_ns,
                self.ctime_ns,
                self.parent,
                self.birthtime_ns,
                self.flags,
                len(self.target),
            )
            + self.target
        )

    @classmethod
    def unpack(cls, ino: int, body: bytes) -> Inode:
        (gen, mode, uid, gid, nlink, size, rdev, at, mt, ct, parent, bt, flags, tlen) = (
            _INODE.unpack_from(body)
        )
        target = body[_INODE.size : _INODE.size + tlen]
        return cls(ino, gen, mode, uid, gid, nlink, size, rdev, at, mt, ct, parent, bt, flags,
                   target)


def pack_dirent(child: int, name: bytes) -> bytes:
    return child.to_bytes(8, "big") + _U16.pack(len(name)) + name


def unpack_dirent(body: bytes) -> tuple[int, bytes]:
    child = int.from_bytes(body[:8], "big")
    (n,) = _U16.unpack_from(body, 8)
    return child, body[10 : 10 + n]


@dataclass(frozen=True, slots=True)
class BlockRef:
    """One block of a file: the block id and how many of its plaintext bytes belong to the file.

    `length` may be shorter than the block's plaintext after a truncate; bytes past it read as
    zeros. Truncating therefore never rewrites a block.
    """

    block_id: bytes
    length: int

    def pack(self) -> bytes:
        return _BLOCKREF.pack(self.block_id, self.length)

    @classmethod
    def unpack(cls, body: bytes) -> BlockRef:
        block_id, length = _BLOCKREF.unpack_from(body)
        return cls(block_id, length)


@dataclass(slots=True)
class RefCount:
    count: int
    state: int
    stored: int

    def pack(self) -> bytes:
        return _REFS.pack(self.count, self.state, self.stored)

    @classmethod
    def unpack(cls, body: bytes) -> RefCount:
        return cls(*_REFS.unpack_from(body))


def pack_xattr(name: bytes, value: bytes) -> bytes:
    return _U16.pack(len(name)) + name + value


def unpack_xattr(body: bytes) -> tuple[bytes, bytes]:
    (n,) = _U16.unpack_from(body)
    return body[2 : 2 + n], body[2 + n :]
