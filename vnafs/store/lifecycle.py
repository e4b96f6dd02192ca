"""Opening, locking, creating and recovering a hot store.

Why a module of its own: the mounted daemon, `fsck`, the read-only archive mount and the tests
all need the same sequence (check the format version, which also picks the block-id algorithm,
take the store's lock, unlock the keyring, open LMDB) with the same one-line errors when
something is wrong, and none of them should have to import the daemon for it. `recover` is the
crash cleanup every mount runs before it answers (docs/architecture.md section 7).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vnafs import FORMAT_VERSION
from vnafs import config as config_mod
from vnafs.archive.backend import Backend, open_backend
from vnafs.archive.url import parse_url
from vnafs.config import Config
from vnafs.errors import IntegrityError, VnafsError
from vnafs.keys import KekSource, Keyring
from vnafs.meta.db import MetaDB
from vnafs.meta.namespace import Namespace
from vnafs.meta.tx import Tx
from vnafs.seal import Sealer
from vnafs.store.hot import HotStore
from vnafs.store.marker import KNOWN_FORMATS, read_format, write_format

log = logging.getLogger("vnafs.store")


@dataclass
class Store:
    """One opened hot store. `lock_fd` holds `<root>/lock` (flock) while it is open for
    writing; `close` releases everything."""

    root: Path
    config: Config
    keyring: Keyring
    sealer: Sealer
    db: MetaDB
    ns: Namespace
    hot: HotStore
    lock_fd: int | None = None

    def close(self) -> None:
        self.hot.close()
        self.db.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def lock_store(root: Path) -> int:
    """Take the store's exclusive lock (one daemon or offline tool at a time); the fd."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VnafsError(f"hot store {root} is in use by a running vnafs (mounted?): unmount it "
                         "first") from None
    return fd


def open_store(root: Path, source: KekSource, *, lock: bool = True) -> Store:
    root = root.resolve()
    version = read_format(root)
    cfg = config_mod.load(root)
    lock_fd = lock_store(root) if lock else None
    try:
        keyring = Keyring.open(root / "keyring", source)
        sealer = Sealer(keyring, zstd_level=cfg.store.zstd_level, format_version=version)
        db = MetaDB(root / "meta", sealer, journal=bool(cfg.archive.url))
        try:
            ns = Namespace(db)
        except IntegrityError as exc:
            db.close()
            raise VnafsError(f"the metadata of hot store {root} is damaged ({exc}): restore the "
                             "store from the archive or a backup") from None
        hot = HotStore(root, sealer)
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    return Store(root, cfg, keyring, sealer, db, ns, hot, lock_fd)


def mkfs(root: Path, source: KekSource, *, archive_url: str | None, uid: int, gid: int,
         credentials: str | None = None, format_version: int = FORMAT_VERSION) -> None:
    """Create a hot store of `format_version` (docs/format.md: 2, keyed BLAKE3 block ids, unless
    an older vnafs must read it: 1)."""
    root = root.resolve()
    if format_version not in KNOWN_FORMATS:
        raise VnafsError(f"unknown store format {format_version}: give --format "
                         f"{' or '.join(map(str, KNOWN_FORMATS))}")
    if root.exists() and not root.is_dir():
        raise VnafsError(f"{root} is a file, not a directory: give an empty or new directory for "
                         "the hot store")
    if root.exists() and any(root.iterdir()):
        raise VnafsError(f"{root} is not empty: give an empty or new directory for the hot store")
    cfg = Config()
    if archive_url:
        cfg.archive.url = config_mod.validate_archive_url(archive_url)
        if credentials:
            cfg.archive.credentials = str(Path(credentials).resolve())
        check_new_archive(cfg.archive.url, Path(credentials) if credentials else None)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    keyring = Keyring.create(root / "keyring", source)
    sealer = Sealer(keyring, zstd_level=cfg.store.zstd_level, format_version=format_version)
    db = MetaDB(root / "meta", sealer)
    try:
        Namespace.format(db, uid, gid, time.time_ns())
    finally:
        db.close()
    HotStore(root, sealer).create_layout()
    (root / config_mod.CONFIG_NAME).write_text(cfg.to_toml())
    write_format(root, format_version)


def archive_backend(store: Store) -> Backend | None:
    """The archive backend of a hot store, None without an archive. Contacts nothing: a bad
    URL or credentials file is a one-line error, an unreachable archive is not."""
    a = store.config.archive
    if not a.url:
        return None
    return open_backend(a.url, credentials_file=Path(a.credentials) if a.credentials else None)


def check_new_archive(url: str, credentials: Path | None = None) -> None:
    """mkfs: the archive must be reachable, accept the credentials, and must not hold another
    file system already (two hot stores replicating under one prefix would overwrite each
    other's HEAD). A missing `file://` directory is refused rather than created: it is most
    often a typo or an archive file system that is not mounted, and replicating onto the
    local disk instead would look like success."""
    from vnafs.archive import log as alog

    backend = open_backend(url, credentials_file=credentials)
    parsed = parse_url(url)
    if parsed.scheme == "file" and not Path(parsed.prefix).is_dir():
        raise VnafsError(f"archive directory {parsed.prefix} does not exist: create it (mkdir "
                         "-p), or mount the archive file system first")
    backend.check()
    if backend.size(alog.HEAD_NAME) is not None or backend.size(alog.KEYRING_NAME) is not None:
        raise VnafsError(f"archive {url} already holds a file system: give each hot store its "
                         "own prefix, or rebuild from it with vnafs restore")


def recover(store: Store) -> dict[str, int]:
    """Clean up after a crash: half-written blocks and inodes that were unlinked while open."""
    swept = store.hot.sweep_tmp()
    orphans = store.ns.orphans()
    for ino in orphans:
        with store.db.begin(write=True) as txn:
            tx = Tx(txn, time.time_ns())
            store.ns.free_orphan(tx, ino)
        for block_id in tx.freed_blocks:
            store.hot.delete(block_id)
    if swept or orphans:
        log.info("recovery: removed %d unfinished blocks, freed %d orphaned inodes", swept,
                 len(orphans))
    return {"tmp_swept": swept, "orphans_freed": len(orphans)}
