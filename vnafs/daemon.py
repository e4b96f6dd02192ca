"""Wires one hot store into a running file system, and opens stores for offline tools.

`open_store` is the single way in: it checks the format version, unlocks the keyring and opens
LMDB, each with a one-line error when something is wrong. `serve` runs a mounted file system:
it sweeps crash leftovers, starts FUSE, the control socket and the background tasks in one trio
nursery, and on the way out commits what open files still hold before closing the stores.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from vnafs import FORMAT_VERSION, __version__
from vnafs import config as config_mod
from vnafs.config import Config
from vnafs.errors import IntegrityError, VnafsError
from vnafs.keys import KekSource, Keyring
from vnafs.meta.db import MetaDB
from vnafs.meta.namespace import Namespace, Tx
from vnafs.meta.records import BLOCK_SIZE
from vnafs.seal import Sealer
from vnafs.store.hot import HotStore
from vnafs.store.marker import read_format, write_format

log = logging.getLogger("vnafs.daemon")

@dataclass
class Store:
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
    read_format(root)
    cfg = config_mod.load(root)
    lock_fd = lock_store(root) if lock else None
    try:
        keyring = Keyring.open(root / "keyring", source)
        sealer = Sealer(keyring, zstd_level=cfg.store.zstd_level)
        db = MetaDB(root / "meta", sealer)
        db.journal = bool(cfg.archive.url)
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
         credentials: str | None = None) -> None:
    root = root.resolve()
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
    sealer = Sealer(keyring, zstd_level=cfg.store.zstd_level)
    db = MetaDB(root / "meta", sealer)
    try:
        Namespace.format(db, uid, gid, time.time_ns())
    finally:
        db.close()
    HotStore(root, sealer).create_layout()
    (root / config_mod.CONFIG_NAME).write_text(cfg.to_toml())
    write_format(root)


def check_new_archive(url: str, credentials: Path | None = None) -> None:
    """mkfs: the archive must be reachable and must not hold another file system already
    (two hot stores replicating under one prefix would overwrite each other's HEAD)."""
    from vnafs.archive import log as alog
    from vnafs.archive.backend import open_backend

    backend = open_backend(url, credentials_file=credentials)
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


def status_of(store: Store, engine: Any = None, files: Any = None,
              mountpoint: str | None = None, indexer: Any = None) -> dict[str, Any]:
    st = store.hot.usage()
    out: dict[str, Any] = {
        "version": __version__,
        "format": FORMAT_VERSION,
        "hot_store": str(store.root),
        "mountpoint": mountpoint,
        "archive": store.config.archive_url,
        "health": "ok",
        "pid": os.getpid(),
        "disk": {
            "size_bytes": st.f_blocks * st.f_frsize,
            "free_bytes": st.f_bavail * st.f_frsize,
        },
        "metadata_bytes": os.path.getsize(store.root / "meta" / "data.mdb"),
        "keys": {
            "current_version": store.keyring.current_version,
            "versions": len(store.keyring.versions),
        },
        **store.ns.stats(),
    }
    if engine is not None:
        health = engine.health.as_dict()
        out["health"] = health["state"]
        out["problems"] = health
        out["counters"] = dict(engine.stats)
        out["cache_bytes"] = engine.cache.size
    if indexer is not None:
        from vnafs.dicom import query

        out["dicom"] = {**query.counts(indexer.index), "pending": indexer.pending,
                        **{f"since_mount_{k}": v for k, v in indexer.stats.items()}}
    if files is not None:
        out["open_files"] = len(files.open)
        out["dirty_blocks"] = sum(len(of.dirty) for of in files.open.values())
    return out


class ControlServer:
    """JSON-lines requests on `<hot>/control.sock` (mode 0600: root only)."""

    def __init__(self, path: Path, handlers: dict[str, Callable[[dict[str, Any]], Any]]) -> None:
        self.path = path
        self.handlers = handlers

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.path.unlink(missing_ok=True)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._client, [listener])
        finally:
            self.path.unlink(missing_ok=True)

    async def _client(self, stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            with trio.move_on_after(30):
                while b"\n" not in buf and len(buf) < 65536:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    buf += chunk
            try:
                req = json.loads(buf.split(b"\n", 1)[0])
                handler = self.handlers[req["op"]]
                reply = {"ok": True, "result": await _maybe_await(handler(req))}
            except KeyError:
                reply = {"ok": False, "error": "unknown request"}
            except VnafsError as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception:
                log.exception("control request failed")
                reply = {"ok": False, "error": "internal error; see the vnafs log"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _maybe_await(value: Any) -> Any:
    if hasattr(value, "__await__"):
        return await value
    return value


def fuse_options(store: Store, cfg: Config) -> set[str]:
    opts = {f"fsname={store.root}", "subtype=vnafs", "default_permissions"}
    if cfg.mount.allow_other:
        opts.add("allow_other")
    return opts


async def serve(
    store: Store, mountpoint: Path, ready: Callable[[str | None], None], *,
    follower: Any = None,
) -> None:
    """Mount `store` at `mountpoint` and serve until unmounted or signalled.

    With `follower` (an `ArchiveFollower`), the store is a read-only archive mount's metadata
    cache: nothing is written, blocks come from the archive, and new cycles are applied."""
    import pyfuse3  # only the mounted daemon needs FUSE

    from vnafs.fs.engine import Engine
    from vnafs.fs.files import Files
    from vnafs.fs.operations import Operations
    from vnafs.fs.snapshot_service import SnapshotService
    from vnafs.meta.snapshots import Snapshots

    cfg = store.config
    readonly = follower is not None
    if not readonly:
        recover(store)
        store.ns.start_mount()
    engine = Engine(
        store.ns,
        store.hot,
        cache_bytes=cfg.store.cache_mib << 20,
        workers=cfg.store.workers,
        max_inflight_blocks=max(2, cfg.store.max_inflight_mib * (1 << 20) // BLOCK_SIZE),
    )
    backend = follower.backend if readonly else _archive_backend(store)
    replicator = None
    if backend is not None:
        from vnafs.archive.recall import Recall

        engine.recall = Recall(backend, store.hot, repair=not readonly,
                               timeout=cfg.archive.recall_timeout)
    index = _dicom_index(store)
    async with trio.open_nursery() as nursery:
        files = Files(engine, nursery, sync_on_close=cfg.mount.sync_on_close)
        files.readonly = readonly
        indexer, views = _dicom_setup(store, index, engine, files)
        snaps = Snapshots(store.ns)
        snapshots = SnapshotService(engine, snaps, cfg.snapshots)
        ops = Operations(engine, files, block_size=BLOCK_SIZE, views=views,
                         views_name=cfg.dicom.views, snapshots=snapshots,
                         snapshot_mkdir=cfg.snapshots.mkdir and not readonly,
                         snapshots_visible=cfg.snapshots.visible)
        options = fuse_options(store, cfg)
        if readonly:
            options.add("ro")
        try:
            pyfuse3.init(ops, str(mountpoint), options)
        except RuntimeError as exc:
            raise VnafsError(f"mounting {mountpoint} failed ({exc}): check that /dev/fuse is "
                             "usable and the mount point is a free directory") from None

        async def status(req: dict[str, Any]) -> Any:
            out = status_of(store, engine, files, str(mountpoint), indexer)
            if replicator is not None:
                out["archive"] = await trio.to_thread.run_sync(replicator.status,
                                                               limiter=engine.io)
                if out["archive"]["state"] != "ok" and out["health"] == "ok":
                    out["health"] = "degraded"  # behind its RPO, or failing
            if follower is not None:
                out["archive"] = follower.status()
            out["snapshots"] = {"count": len(snaps.all()), "gc": dict(snapshots.gc_progress)}
            return out

        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {"status": status}
        if indexer is not None and not readonly:
            indexer.invalidate = ops.drop_stale
            await nursery.start(indexer.run)
            handlers.update(_dicom_handlers(indexer, engine))
        if backend is not None and not readonly:
            from vnafs.archive.replicator import Replicator

            replicator = Replicator(store.root, store.ns, engine, backend, cfg.archive,
                                    reopen=partial(_archive_backend, store))
            await nursery.start(replicator.run)
            handlers.update(_archive_handlers(store, engine, replicator, nursery))
        if follower is not None:
            await nursery.start(follower.run, engine)
        else:
            await nursery.start(snapshots.run)
            handlers.update(_snapshot_handlers(snapshots))
        control = ControlServer(store.root / "control.sock", handlers)
        await nursery.start(control.serve)
        nursery.start_soon(_watch_signals, nursery)
        if not readonly:
            nursery.start_soon(engine.sync_periodically, cfg.store.sync_interval)
        nursery.start_soon(_raise_readahead, mountpoint)
        pid_file = store.root / "daemon.pid"
        pid_file.write_text(f"{os.getpid()}\n")
        log.info("mounted %s (vnafs %s%s)", mountpoint, __version__,
                 ", read-only archive mount" if readonly else "")
        ready(None)
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=64)
        finally:
            for ino in list(files.open):
                try:
                    await files.flush(ino)
                except OSError as exc:
                    log.error("could not commit inode %d at unmount: %s", ino, exc.strerror)
            if indexer is not None and not readonly:
                # Index what is queued, so the next mount starts clean; what does not fit in
                # the time keeps its change mark and is indexed at the next mount.
                with trio.move_on_after(UNMOUNT_INDEX_SECONDS):
                    await indexer.wait_idle()
            if replicator is not None:
                # One last cycle so the archive is current; an unreachable archive only delays
                # the unmount by this much (the outbox stays for the next mount).
                with trio.move_on_after(UNMOUNT_REPLICATE_SECONDS):
                    try:
                        await replicator.cycle()
                    except (VnafsError, IntegrityError, OSError) as exc:
                        log.warning("final replication at unmount failed (%s); the outbox is "
                                    "kept for the next mount", exc)
            await engine.barrier()
            pyfuse3.close(unmount=True)
            pid_file.unlink(missing_ok=True)
            log.info("unmounted %s", mountpoint)
            nursery.cancel_scope.cancel()


def _archive_backend(store: Store) -> Any:
    """The archive backend of a hot store, None without an archive; checked before mounting
    (a bad URL or credentials file is a one-line error, an unreachable archive is not)."""
    a = store.config.archive
    if not a.url:
        return None
    from vnafs.archive.backend import open_backend

    return open_backend(a.url, credentials_file=Path(a.credentials) if a.credentials else None)


def _dicom_index(store: Store) -> Any:
    """The DICOM index of the store, None if disabled; checked before anything is mounted."""
    if not store.config.dicom.index:
        return None
    from vnafs.dicom.index import DicomIndex

    try:
        return DicomIndex(store.ns, by_patient=store.config.dicom.by_patient)
    except IntegrityError as exc:
        raise VnafsError(f"{exc}: the metadata is damaged; run vnafs fsck {store.root}") from None


def _dicom_setup(store: Store, index: Any, engine: Any, files: Any) -> tuple[Any, Any]:
    """The DICOM indexer and views, wired into the namespace hooks (None, None if disabled)."""
    if index is None:
        return None, None
    from vnafs.fs.indexer import Indexer
    from vnafs.fs.views import Views

    store.ns.on_change = index.mark_changed
    store.ns.on_last_unlink = index.forget
    views = Views(index)
    # Without this the kernel keeps showing a removed view name for up to ENTRY_TIMEOUT.
    index.on_removed = views.note_removed
    indexer = Indexer(engine, files, index)
    indexer.max_lag = store.config.dicom.index_lag
    return indexer, views


def _dicom_handlers(indexer: Any, engine: Any) -> dict[str, Callable[[dict[str, Any]], Any]]:
    from vnafs.dicom import query

    index = indexer.index

    async def find(req: dict[str, Any]) -> Any:
        q = query.Query.from_request(req)
        if req.get("wait"):
            await indexer.wait_idle()
        return await trio.to_thread.run_sync(query.find, index, q, limiter=engine.io)

    async def problems(req: dict[str, Any]) -> Any:
        if req.get("wait"):
            await indexer.wait_idle()
        return await trio.to_thread.run_sync(query.problems, index, limiter=engine.io)

    async def wait(req: dict[str, Any]) -> Any:
        with trio.move_on_after(float(req.get("timeout", 25))):
            await indexer.wait_idle()
        return {"pending": indexer.pending}

    async def reindex(req: dict[str, Any]) -> Any:
        return {"queued": await indexer.reindex()}

    return {"find": find, "problems": problems, "index_wait": wait, "reindex": reindex,
            "index_progress": lambda req: {"pending": indexer.pending,
                                           "total": indexer.reindex_total}}


def _snapshot_handlers(service: Any) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """`vnafs snapshot ...` through the control socket (meta/snapshots.py)."""
    from vnafs.fs.snapshot_service import parse_until
    from vnafs.meta.snapshots import diff

    def public(snap: Any) -> dict[str, Any]:
        return {"name": snap.name, "id": snap.id, "epoch": snap.epoch,
                "created_ns": snap.created_ns, "expiry_ns": snap.expiry_ns or None,
                "lock_until_ns": snap.lock_until_ns or None}

    async def create(req: dict[str, Any]) -> Any:
        until = parse_until(req["lock_until"]) if req.get("lock_until") else 0
        return public(await service.create(req.get("name") or None, lock_until_ns=until))

    async def delete(req: dict[str, Any]) -> Any:
        return public(await service.delete(str(req["name"]), by="request"))

    async def lock(req: dict[str, Any]) -> Any:
        return public(await service.lock(str(req["name"]), parse_until(str(req["until"]))))

    async def listing(req: dict[str, Any]) -> Any:
        return await service.listing()

    async def snapshot_diff(req: dict[str, Any]) -> Any:
        snaps = service.snaps
        old = snaps.need(str(req["old"])).epoch
        new = None if req["new"] == "live" else snaps.need(str(req["new"])).epoch

        def run() -> list[list[str]]:
            return [list(row) for row in diff(snaps.ns, old, new)]

        return await trio.to_thread.run_sync(run, limiter=service.engine.io)

    return {"snapshot_create": create, "snapshot_delete": delete, "snapshot_lock": lock,
            "snapshot_list": listing, "snapshot_diff": snapshot_diff}


def _archive_handlers(store: Store, engine: Any, replicator: Any, nursery: trio.Nursery
                      ) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """`vnafs verify --archive` (a background task the CLI polls) and `vnafs gc --archive`."""
    from vnafs.archive import verify
    from vnafs.archive.backend import ArchiveError

    backend = replicator.backend
    current: list[verify.Verifier] = []

    async def run_verify(verifier: verify.Verifier) -> None:
        try:
            await trio.to_thread.run_sync(verifier.run)
        except (ArchiveError, IntegrityError, OSError) as exc:
            verifier.report.error = str(exc)
            verifier.report.finished = True
        if verifier.report.checkpoint_needed:
            replicator.force_checkpoint()

    def verify_start(req: dict[str, Any]) -> Any:
        if not current or current[-1].report.finished:
            current[:] = [verify.Verifier(store.db, store.hot, backend)]
            nursery.start_soon(run_verify, current[-1])
        return current[-1].report.as_dict()

    def verify_progress(req: dict[str, Any]) -> Any:
        if not current:
            raise VnafsError("no archive verification has run since mount: start one with "
                             "vnafs verify --archive")
        return current[-1].report.as_dict()

    async def gc(req: dict[str, Any]) -> Any:
        retention_ns = store.config.archive.retention_days * 86400 * 10**9
        now = time.time_ns()
        ids, young = await trio.to_thread.run_sync(verify.expired_tombstones, store.db,
                                                   retention_ns, now)
        report = verify.GcReport(tombstones_kept=young)
        for start in range(0, len(ids), 100):
            async with engine.writer:  # see collect_blocks: no resend may run in between
                await trio.to_thread.run_sync(verify.collect_blocks, store.db, backend,
                                              ids[start:start + 100], retention_ns, now,
                                              report)
        await trio.to_thread.run_sync(verify.collect_parts, backend, store.sealer,
                                      replicator.state.committed, report)
        replicator.nudge()
        log.info("archive gc: %d blocks and %d metadata parts deleted, %d bytes freed",
                 report.blocks_deleted, report.parts_deleted, report.bytes_freed)
        return report.as_dict()

    return {"archive_verify": verify_start, "archive_verify_progress": verify_progress,
            "archive_gc": gc}


UNMOUNT_INDEX_SECONDS = 60
UNMOUNT_REPLICATE_SECONDS = 30

# The kernel asks FUSE file systems for 128 KiB at a time by default; 4 MiB of readahead lets it
# send 1 MiB reads (measured: 512 MiB cold read 1.53 s -> 1.25 s).
READ_AHEAD_KB = 4096


async def _raise_readahead(mountpoint: Path) -> None:
    try:
        # stat goes through our own FUSE loop, which is running by now.
        dev = (await trio.to_thread.run_sync(os.stat, mountpoint)).st_dev
        path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        await trio.to_thread.run_sync(path.write_text, f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.warning("could not raise the readahead window (%s); reads still work",
                    exc.strerror)


async def _watch_signals(nursery: trio.Nursery) -> None:
    import pyfuse3

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            log.info("signal received: unmounting")
            pyfuse3.terminate()
            return


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.exists():
        raise VnafsError(f"mount point {mountpoint} does not exist: create the directory first")
    if not mountpoint.is_dir():
        raise VnafsError(f"mount point {mountpoint} is not a directory: give an empty directory")
    if find_mount(mountpoint) is not None or os.path.ismount(mountpoint):
        raise VnafsError(f"{mountpoint} is already a mount point: unmount it first or choose "
                         "another directory")
    if any(mountpoint.iterdir()):
        raise VnafsError(f"mount point {mountpoint} is not empty: choose an empty directory")


def check_dev_fuse() -> None:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except FileNotFoundError:
        raise VnafsError("/dev/fuse is missing: install fuse3 and load the fuse module "
                         "(modprobe fuse)") from None
    except PermissionError:
        raise VnafsError("/dev/fuse is not accessible: run vnafs as root or give this user "
                         "access to /dev/fuse") from None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise VnafsError("/dev/fuse exists but the fuse kernel module is not loaded: run "
                             "modprobe fuse") from None
        raise
    os.close(fd)


# Re-exported: the CLI's light commands import vnafs.control directly (no trio, no LMDB).
from vnafs.control import (  # noqa: E402
    control_request,
    find_mount,
    hot_store_of,
    views_dir,
)

__all__ = ["control_request", "find_mount", "hot_store_of", "views_dir"]
