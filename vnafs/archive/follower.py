"""The read-only archive mount: a file system served from the archive alone.

This is how VNA servers in the cloud read the archive, and how a site checks that its disaster
recovery copy really mounts. `open_archive_store` builds a metadata cache (a directory laid out
like a hot store, with an empty block directory) from the archive's HEAD; the daemon then
serves it read-only, recalls blocks from the archive as they are read, and `ArchiveFollower`
applies new replicated cycles every `poll` seconds. It never writes to the archive.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import trio

from vnafs.archive.backend import ArchiveError, Backend, open_backend
from vnafs.archive.replicator import iso_time
from vnafs.archive.restore import (
    fetch_config,
    follow,
    follow_state,
    get_keyring,
    install_keyring,
    read_head,
)
from vnafs.errors import IntegrityError, VnafsError
from vnafs.fs.engine import Engine
from vnafs.keys import KekSource
from vnafs.meta.db import MetaDB
from vnafs.meta.namespace import Namespace
from vnafs.seal import Sealer
from vnafs.store.hot import HotStore
from vnafs.store.lifecycle import Store, lock_store

log = logging.getLogger("vnafs.follower")

CACHE_ROOT = Path("/var/cache/vnafs")


def default_cache(url: str, mountpoint: Path) -> Path:
    """One cache per (archive, mount point): several read-only mounts can run at once."""
    digest = hashlib.sha256(f"{url}\0{mountpoint.resolve()}".encode()).hexdigest()[:16]
    return CACHE_ROOT / f"archive-{digest}"


def open_archive_store(url: str, source: KekSource, cache: Path,
                       credentials: Path | None = None) -> tuple[Store, Backend]:
    """A Store over the archive's metadata as of its HEAD, cached in `cache`."""
    backend = open_backend(url, credentials_file=credentials)
    # The keyring is the first request: a wrong URL, missing bucket or rejected credentials
    # fail here with one line. (Not backend.check(): for file:// it creates a missing
    # directory, and this mount must never write to the archive.)
    raw_keyring = get_keyring(backend)
    cache = cache.resolve()
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_fd = lock_store(cache)
    try:
        keyring = install_keyring(raw_keyring, cache / "keyring", source)
        fs_file = cache / "FSID"
        if fs_file.exists() and fs_file.read_text().strip() != keyring.fs_id.hex():
            # The cache belonged to another file system: start it over.
            shutil.rmtree(cache / "meta", ignore_errors=True)
        fs_file.write_text(keyring.fs_id.hex() + "\n")
        # HEAD says the store's format (its block-id algorithm); opening HEAD needs none.
        sealer = Sealer(keyring, format_version=read_head(backend, Sealer(keyring)).format)
        cfg = fetch_config(backend, sealer, cache, url, credentials)
        db = MetaDB(cache / "meta", sealer)
        try:
            follow(db, backend, sealer)
            ns = Namespace(db)
        except BaseException:
            db.close()
            raise
        hot = HotStore(cache, sealer)
        hot.create_layout()
        hot.sweep_tmp()
    except BaseException:
        os.close(lock_fd)
        raise
    return Store(cache, cfg, keyring, sealer, db, ns, hot, lock_fd), backend


class ArchiveFollower:
    """Applies new replicated cycles to a read-only mount's metadata cache."""

    def __init__(self, store: Store, backend: Backend, *, poll: float) -> None:
        self.store = store
        self.backend = backend
        self.cache: Path = store.root
        self.db: MetaDB = store.db
        self.sealer: Sealer = store.sealer
        self.poll = poll
        self.last_check: float | None = None
        self.last_error: str | None = None
        self.applied_since_mount = 0

    async def run(self, engine: Engine,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.poll)
            await self.poll_once(engine)

    async def poll_once(self, engine: Engine) -> None:
        try:
            result = await trio.to_thread.run_sync(follow, self.db, self.backend, self.sealer,
                                                   limiter=engine.writer)
        except (VnafsError, ArchiveError, IntegrityError) as exc:
            if str(exc) != self.last_error:
                log.error("following the archive failed: %s (retrying)", exc)
            self.last_error = str(exc)
            return
        self.last_check = time.time()
        if self.last_error:
            log.info("archive reachable again")
        self.last_error = None
        if result is not None:
            self.applied_since_mount += 1
            log.info("applied archive cycle %d (%d records)", *result)

    def status(self) -> dict[str, Any]:
        st = follow_state(self.db)
        rp = st.get("rp_ns", 0)
        return {
            "url": self.backend.url.display(),
            "mode": "read-only archive mount",
            "state": "retrying" if self.last_error else "ok",
            "cycle": st.get("cycle", 0),
            "recovery_point_ns": rp or None,
            "recovery_point": iso_time(rp) if rp else None,
            "poll_seconds": self.poll,
            "last_check": self.last_check,
            "last_error": self.last_error,
            "cycles_applied_since_mount": self.applied_since_mount,
        }
