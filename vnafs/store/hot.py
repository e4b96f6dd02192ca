"""The hot store's sealed block files on local disk.

One file per block, named by its block id (an HMAC, so names leak nothing), fanned out over 256
directories. Blocks are written to `tmp/` and renamed into place, so a block file that exists is
complete: a crash can leave garbage only in `tmp/`, which is swept at mount. (`vnafs restore`
writes block files in place, but the store stays unmountable until it has finished and its
resume authenticates every block file it finds.) Files are not
fsynced one by one; durability comes from the daemon's group barrier (`syncfs`), which covers
every block written before it in one system call.

All methods do blocking I/O and CPU work: call them from worker threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from vnafs.errors import IntegrityError
from vnafs.seal import KIND_BLOCK, Sealer

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class HotStore:
    def __init__(self, root: Path, sealer: Sealer) -> None:
        self.root = root
        self.blocks = root / "blocks"
        self.tmp = root / "tmp"
        self._blocks_str = str(self.blocks)
        self._tmp_str = str(self.tmp)
        self.sealer = sealer
        self._dirfd: int | None = None

    def create_layout(self) -> None:
        self.blocks.mkdir(mode=0o700, exist_ok=True)
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        for i in range(256):
            (self.blocks / f"{i:02x}").mkdir(mode=0o700, exist_ok=True)

    def path(self, block_id: bytes) -> Path:
        return Path(self._fspath(block_id))

    def _fspath(self, block_id: bytes) -> str:
        # A plain string: building a Path per block cost the write path ~30 us per block.
        h = block_id.hex()
        return f"{self._blocks_str}/{h[:2]}/{h[2:]}"

    def put(self, block_id: bytes, plaintext: bytes | bytearray, *, compress: bool = True) -> int:
        """Seal and store a block; returns the number of bytes stored."""
        envelope = self.sealer.seal(KIND_BLOCK, block_id, plaintext, compress=compress)
        self.put_envelope(block_id, envelope)
        return len(envelope)

    def put_envelope(self, block_id: bytes, envelope: bytes | memoryview, *,
                     in_place: bool = False) -> None:
        """Store an already sealed block: written to tmp/, then renamed into place, or with
        `in_place` written under its final name (only for `vnafs restore`, whose RESTORING
        marker keeps the store unmounted and whose resume authenticates every block file)."""
        if in_place:
            fd = os.open(self._fspath(block_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, envelope)
            finally:
                os.close(fd)
            return
        tmp = f"{self._tmp_str}/{secrets.token_hex(12)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, envelope)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, self._fspath(block_id))
        except BaseException:
            _unlink(tmp)
            raise

    def get(self, block_id: bytes) -> bytes | memoryview:
        """Read, authenticate and decompress a block (a read-only view for byte-plane blocks);
        IntegrityError if it is damaged or gone."""
        name = f"block {block_id.hex()}"
        return self.sealer.open_block(block_id, self._read(block_id, name), name=name)

    def envelope(self, block_id: bytes) -> bytes:
        """The block file as stored, authenticated but not opened (for copying it elsewhere);
        IntegrityError if it is damaged or gone."""
        name = f"block {block_id.hex()}"
        envelope = self._read(block_id, name)
        self.sealer.check(KIND_BLOCK, block_id, envelope, name=name)
        return envelope

    def _read(self, block_id: bytes, name: str) -> bytes:
        try:
            with open(self._fspath(block_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise IntegrityError(f"{name} is missing from the hot store") from None

    def delete(self, block_id: bytes) -> None:
        _unlink(self._fspath(block_id))

    def ids(self) -> Iterator[bytes]:
        for sub in sorted(self.blocks.iterdir()):
            for entry in os.scandir(sub):
                try:
                    yield bytes.fromhex(sub.name + entry.name)
                except ValueError:
                    continue

    def sweep_tmp(self) -> int:
        """Delete half-written blocks left by a crash; returns how many."""
        n = 0
        for entry in os.scandir(self.tmp):
            os.unlink(entry.path)
            n += 1
        return n

    def syncfs(self) -> None:
        """Make every block written so far durable (one syncfs of the store's file system)."""
        if self._dirfd is None:
            self._dirfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        if _libc.syncfs(self._dirfd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def usage(self) -> os.statvfs_result:
        return os.statvfs(self.root)

    def close(self) -> None:
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
