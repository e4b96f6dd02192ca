"""Wires one opened store into a running, mounted file system.

`serve` is the only place where the parts of a mount meet: it builds them in dependency order,
passing every collaborator to its constructor (the table in docs/architecture.md, "Wiring",
lists each callback and channel), starts FUSE, the control socket and the background tasks in
one trio nursery, and on the way out commits what open files still hold, indexes what is
queued, ships a last replication cycle and syncs before it closes.

The mount-point checks that `vnafs mount` runs before it forks live here too, so their errors
reach the admin's terminal.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

import trio

from vnafs import __version__, config, logs
from vnafs.archive.backend import open_backend
from vnafs.archive.follower import ArchiveFollower
from vnafs.archive.maintenance import ArchiveMaintenance
from vnafs.archive.recall import Recall
from vnafs.archive.replicator import Replicator
from vnafs.audit.chain import AuditLog
from vnafs.audit.recorder import AuditRecorder
from vnafs.control import find_mount
from vnafs.control_server import ControlServer, Mounted, handlers
from vnafs.control_server import status as control_status
from vnafs.dicom.index import DicomIndex, NewStudy
from vnafs.errors import IntegrityError, VnafsError
from vnafs.fs.engine import Engine
from vnafs.fs.files import ClosedFile, Files
from vnafs.fs.indexer import Indexer
from vnafs.fs.inodes import Inodes
from vnafs.fs.kernel_cache import KernelCache
from vnafs.fs.snapshot_service import SnapshotService
from vnafs.fs.views import Views
from vnafs.meta.blocks import BlockUsage
from vnafs.meta.records import BLOCK_SIZE
from vnafs.meta.snapshots import Snapshots
from vnafs.meta.tx import NO_HOOKS
from vnafs.service import Notifier
from vnafs.store.lifecycle import Store, archive_backend, lock_store, recover
from vnafs.tier.cache import ArchiveCache
from vnafs.tier.state import Capacity
from vnafs.tier.tierer import Tierer

log = logging.getLogger("vnafs.daemon")

UNMOUNT_INDEX_SECONDS = 60
# How often the service manager hears the health and recovery point (`systemctl status`).
STATUS_SECONDS = 30.0
UNMOUNT_REPLICATE_SECONDS = 30

# The kernel asks FUSE file systems for 128 KiB at a time by default; 4 MiB of readahead lets it
# send 1 MiB reads (measured: 512 MiB cold read 1.53 s -> 1.25 s).
READ_AHEAD_KB = 4096
# FUSE background requests (see `_raise_background_limits`); the kernel's defaults are 12/9.
FUSE_MAX_BACKGROUND = 64
FUSE_CONGESTION_THRESHOLD = 48


def fuse_options(store: Store, *, readonly: bool) -> set[str]:
    opts = {f"fsname={store.root}", "subtype=vnafs", "default_permissions"}
    if store.config.mount.allow_other:
        opts.add("allow_other")
    if readonly:
        opts.add("ro")
    return opts


def dicom_index(store: Store) -> DicomIndex | None:
    """The DICOM index of the store, None if disabled; checked before anything is mounted."""
    if not store.config.dicom.index:
        return None
    try:
        return DicomIndex(store.ns, by_patient=store.config.dicom.by_patient)
    except IntegrityError as exc:
        raise VnafsError(f"{exc}: the metadata is damaged; run vnafs fsck {store.root}") from None


async def serve(
    store: Store, mountpoint: Path, ready: Callable[[str | None], None], *,
    follower: ArchiveFollower | None = None, options: Sequence[str] = (),
) -> None:
    """Mount `store` at `mountpoint` and serve until unmounted or signalled.

    With `follower`, the store is a read-only archive mount's metadata cache: nothing is
    written, blocks come from the archive, and new replicated cycles are applied."""
    import pyfuse3  # only the mounted daemon needs FUSE

    cfg = store.config
    readonly = follower is not None
    pid_file = store.root / "daemon.pid"
    # The pid file outlives only a daemon that did not unmount cleanly (killed, crashed).
    crashed = pid_file.exists() and not readonly
    if not readonly:
        recover(store)
        store.ns.start_mount()
    backend = follower.backend if follower is not None else archive_backend(store)
    index = dicom_index(store)
    tiering = cfg.tiering
    usage = BlockUsage()
    capacity = Capacity(usage, tiering.capacity or _fs_size(store.root),
                        high=tiering.high_watermark, low=tiering.low_watermark)
    kept_send, kept_recv = trio.open_memory_channel[bytes](math.inf)
    recall = None
    if backend is not None:
        recall = Recall(backend, store.hot,
                        timeout=tiering.recall_timeout or cfg.archive.recall_timeout,
                        concurrency=tiering.recalls,
                        blocks=None if readonly else store.ns.blocks,
                        keep=capacity.may_keep, kept=kept_send)
    # Commit outcomes travel on channels, so the layer that produces them never calls the
    # layer above (docs/architecture.md, "Wiring").
    orphans_send, orphans_recv = trio.open_memory_channel[int](math.inf)
    closed_send, closed_recv = trio.open_memory_channel[ClosedFile](math.inf)
    new_send, new_recv = trio.open_memory_channel[NewStudy](math.inf)
    # Bounded: a burst of reads of evicted blocks is sampled, never queued without limit.
    reads_send, reads_recv = trio.open_memory_channel[int](1024)
    tiering_on = recall is not None and not readonly and backend is not None
    engine = Engine(
        store.ns,
        store.hot,
        cache_bytes=cfg.store.cache_mib << 20,
        workers=cfg.store.workers,
        max_inflight_blocks=max(2, cfg.store.max_inflight_mib * (1 << 20) // BLOCK_SIZE),
        hooks=index if index is not None and not readonly else NO_HOOKS,
        recall=recall,
        orphans=orphans_send,
        usage=usage,
        reader_recalls=reads_send if tiering_on and index is not None else None,
    )
    views = Views(index) if index is not None else None
    snaps = Snapshots(store.ns)
    kernel = KernelCache(index, views, engine.io)
    metrics = None
    if cfg.metrics.listen:
        # Bound before the mount (and outside the nursery, whose errors come wrapped), so a
        # port in use stops it with one line.
        from vnafs.metrics import MetricsEndpoint  # prometheus_client only when asked

        metrics = MetricsEndpoint(cfg.metrics.listen, store.root / "vnafs.toml")
        await trio.to_thread.run_sync(metrics.bind)
    async with trio.open_nursery() as nursery:
        files = Files(engine, nursery, sync_on_close=cfg.mount.sync_on_close,
                      readonly=readonly, orphans=orphans_recv,
                      closed=closed_send if index is not None and not readonly else None,
                      max_dirty_blocks=max(2, cfg.store.max_dirty_mib * (1 << 20) // BLOCK_SIZE))
        indexer = None
        if index is not None and not readonly:
            indexer = Indexer(engine, files, index, closed=closed_recv, invalidate=kernel.drop,
                              new_studies=new_send if tiering_on else None,
                              max_lag=cfg.dicom.index_lag)
        snapshots = SnapshotService(engine, snaps, cfg.snapshots)
        replicator = maintenance = tierer = cache = None
        if backend is not None and not readonly:
            # After a credentials error the replicator builds a new client, so fixing the
            # credentials file needs no remount.
            credentials = Path(cfg.archive.credentials) if cfg.archive.credentials else None
            replicator = Replicator(store.root, store.ns, engine, backend, cfg.archive,
                                    reopen=partial(open_backend, cfg.archive.url,
                                                   credentials_file=credentials))
            maintenance = ArchiveMaintenance(store.db, store.hot, store.sealer, engine,
                                             replicator, nursery,
                                             retention_days=cfg.archive.retention_days)
        if recall is not None and replicator is not None and backend is not None:
            tierer = Tierer(engine, files, index, recall, capacity, tiering, backend=backend,
                            sealer=store.sealer, replicator=replicator, kept=kept_recv,
                            meta_path=str(store.root / "meta" / "data.mdb"),
                            new_studies=new_recv, reader_recalls=reads_recv)
        elif recall is not None:
            cache = ArchiveCache(store.hot, capacity, engine.io, kept=kept_recv)
        # The access audit (docs/architecture.md 12). A read-only archive mount keeps a chain
        # of its own accesses in its cache directory, beside the replicated one.
        audit = None
        if cfg.audit.enabled:
            chain = (AuditLog.local if readonly else AuditLog)(store.db, store.keyring.audit_key)
            audit = AuditRecorder(engine, store.ns, chain, index,
                                  collapse_seconds=cfg.audit.collapse_seconds)
        from vnafs.fs.operations import Operations  # imports pyfuse3

        ops = Operations(engine, files, Inodes(snaps, views), kernel, block_size=BLOCK_SIZE,
                         views_name=cfg.dicom.views, snapshots=snapshots,
                         snapshot_mkdir=cfg.snapshots.mkdir and not readonly,
                         snapshots_visible=cfg.snapshots.visible,
                         file_state=tierer.file_state if tierer is not None else None,
                         meters=metrics.meters if metrics is not None else None,
                         audit=audit)
        try:
            pyfuse3.init(ops, str(mountpoint), fuse_options(store, readonly=readonly))
        except RuntimeError as exc:
            if metrics is not None:
                metrics.stop()  # not serving yet: only closes the socket
            raise VnafsError(f"mounting {mountpoint} failed ({exc}): check that /dev/fuse is "
                             "usable and the mount point is a free directory") from None

        if indexer is not None:
            await nursery.start(indexer.run)
        if replicator is not None:
            await nursery.start(replicator.run)
        if tierer is not None:
            await nursery.start(tierer.run, crashed)
        if cache is not None:
            await nursery.start(cache.run)
        if audit is not None:
            await nursery.start(audit.run)
            if readonly:
                await audit.exported()
        if follower is not None:
            await nursery.start(follower.run, engine)
        else:
            await nursery.start(snapshots.run)
        mounted = Mounted(store, mountpoint, engine, files, snapshots, index, indexer,
                          replicator, maintenance, follower, tierer, cache, audit, nursery)
        control = ControlServer(store.root / "control.sock", handlers(mounted))
        await nursery.start(control.serve)
        notifier = Notifier()
        reloader = partial(_reload, store, list(options), capacity, tierer, notifier, mounted)
        nursery.start_soon(_watch_signals, reloader)
        if not readonly:
            nursery.start_soon(engine.sync_periodically, cfg.store.sync_interval)
        if crashed and tierer is None:
            nursery.start_soon(engine.collect_leftovers)
        nursery.start_soon(_raise_readahead, mountpoint)
        if metrics is not None:
            from vnafs.metrics import DaemonCollector

            if tierer is None and cache is None and not readonly:
                # The stored-bytes totals (the tierer and the archive cache count their own).
                nursery.start_soon(engine.count_usage)
            metrics.start(DaemonCollector(mounted, capacity, recall))
        pid_file.write_text(f"{os.getpid()}\n")
        log.info("mounted %s (vnafs %s%s)", mountpoint, __version__,
                 ", read-only archive mount" if readonly else "")
        ready(None)
        # Only now: READY=1 must mean the mount answers (systemd starts what needs it).
        notifier.send(READY=1, STATUS=await _service_status(mounted))
        nursery.start_soon(_tell_service_manager, notifier, mounted)
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=64)
        finally:
            notifier.send(STOPPING=1, STATUS="unmounting: committing open files, indexing, "
                                              "last replication")
            if metrics is not None:
                # Before the store closes: waits for a scrape in progress.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(metrics.stop)
            for ino in list(files.open):
                try:
                    await files.flush(ino)
                except OSError as exc:
                    log.error("could not commit inode %d at unmount: %s", ino, exc.strerror)
            if audit is not None:
                # Before the last replication cycle, so the archive gets these records too
                # (a failure is logged there).
                await audit.final_flush()
            if indexer is not None:
                # Index what is queued, so the next mount starts clean; what does not fit in
                # the time keeps its change mark and is indexed at the next mount.
                with trio.move_on_after(UNMOUNT_INDEX_SECONDS):
                    await indexer.wait_idle()
            if replicator is not None:
                # One last cycle so the archive is current; an unreachable archive only delays
                # the unmount by this much (the outbox stays for the next mount).
                with trio.move_on_after(UNMOUNT_REPLICATE_SECONDS) as final:
                    try:
                        await replicator.cycle()
                    except (VnafsError, IntegrityError, OSError) as exc:
                        log.warning("final replication at unmount failed (%s); the outbox is "
                                    "kept for the next mount", exc)
                if final.cancelled_caught:
                    log.warning("final replication at unmount did not finish within %d s; "
                                "the archive stays at its last recovery point and the rest is "
                                "kept for the next mount (wait for vnafs status to show "
                                "nothing pending before unmounting to move a store)",
                                UNMOUNT_REPLICATE_SECONDS)
            await engine.barrier()
            pyfuse3.close(unmount=True)
            pid_file.unlink(missing_ok=True)
            log.info("unmounted %s", mountpoint)
            nursery.cancel_scope.cancel()


def _fs_size(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


async def _raise_readahead(mountpoint: Path) -> None:
    try:
        # stat goes through our own FUSE loop, which is running by now.
        dev = (await trio.to_thread.run_sync(os.stat, mountpoint)).st_dev
        path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        await trio.to_thread.run_sync(path.write_text, f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.warning("could not raise the readahead window (%s); reads still work",
                    exc.strerror)
        return
    await trio.to_thread.run_sync(_raise_background_limits, dev)


def _raise_background_limits(dev: int) -> None:
    """The kernel lets a FUSE connection have 12 background requests (readahead, async
    reads) and throttles readahead on every file of the mount past 9. Reads that wait on
    the archive hold such slots for up to `recall_timeout`: with 20 of them hanging, reads of
    resident files ran at 0.5-0.67x of idle (tools/bench_tier.py). The limits are set through
    fusectl, which systemd mounts at boot; mounted here if it is not (worker thread)."""
    connections = Path("/sys/fs/fuse/connections")
    conn = connections / str(os.major(dev) << 20 | os.minor(dev))
    try:
        if connections.is_dir() and not conn.exists() and not os.path.ismount(connections):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)],
                           capture_output=True, check=False, timeout=10)
        (conn / "max_background").write_text(f"{FUSE_MAX_BACKGROUND}\n")
        (conn / "congestion_threshold").write_text(f"{FUSE_CONGESTION_THRESHOLD}\n")
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not raise the FUSE background request limits (%s); reads of "
                    "resident files slow down while many reads wait on the archive", exc)


async def _watch_signals(reload: Callable[[], Awaitable[None]]) -> None:
    """SIGTERM and SIGINT unmount cleanly (open files are committed first: see `serve`);
    SIGHUP reopens the log file and reloads what the configuration allows."""
    import pyfuse3

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await reload()
                continue
            log.info("signal %s received: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _reload(store: Store, options: list[str], capacity: Capacity, tierer: Tierer | None,
                  notifier: Notifier, mounted: Mounted) -> None:
    notifier.send(RELOADING=1, MONOTONIC_USEC=int(time.monotonic() * 1e6))
    logs.reopen()
    try:
        new = await trio.to_thread.run_sync(config.load, store.root)
        config.apply_mount_options(new, options)
    except VnafsError as exc:
        log.error("configuration not reloaded, the running settings stay: %s", exc)
    else:
        changed, refused = config.reload(store.config, new)
        _apply_reloaded(store.config, store.root, capacity, mounted)
        if tierer is not None:
            tierer.nudge()
        log.info("configuration reloaded: %s%s",
                 ", ".join(changed) + " changed" if changed else "nothing changed",
                 f"; needs a remount to change: {', '.join(refused)}" if refused else "")
    notifier.send(READY=1, STATUS=await _service_status(mounted))


def _apply_reloaded(cfg: config.Config, root: Path, capacity: Capacity, m: Mounted) -> None:
    """Hand the reloaded settings to the parts that copied them at mount (the others read
    `cfg`'s section objects, which `config.reload` changed in place)."""
    tiering, archive = cfg.tiering, cfg.archive
    capacity.capacity = tiering.capacity or _fs_size(root)
    capacity.high, capacity.low = tiering.high_watermark, tiering.low_watermark
    logs.set_level(cfg.log.level)
    if m.indexer is not None:
        m.indexer.max_lag = cfg.dicom.index_lag
    if m.replicator is not None:
        m.replicator.bucket.rate = archive.bandwidth_mib * (1 << 20)
    if m.maintenance is not None:
        m.maintenance.retention_ns = archive.retention_days * 86400 * 10**9
    if m.follower is not None:
        m.follower.poll = archive.poll
    if m.tierer is not None:
        m.tierer.recall.timeout = tiering.recall_timeout or archive.recall_timeout


async def _service_status(m: Mounted) -> str:
    """The line `systemctl status` shows: health, and the archive's recovery point."""
    st = await control_status(m)
    parts = [f"health {st['health']}"]
    archive = st.get("archive")
    if isinstance(archive, dict) and archive.get("recovery_point"):
        parts.append(f"recovery point {archive['recovery_point']}")
        if archive.get("lag_seconds") is not None:
            parts.append(f"lag {archive['lag_seconds']:.0f} s")
    return f"mounted at {m.mountpoint}; " + ", ".join(parts)


async def _tell_service_manager(notifier: Notifier, m: Mounted) -> None:
    """STATUS= every STATUS_SECONDS, and WATCHDOG=1 at half the unit's WatchdogSec= (a ping
    comes from the trio loop itself, so a blocked loop is what the watchdog catches)."""
    if not notifier.enabled:
        return
    watchdog = notifier.watchdog_seconds()
    step = min(watchdog or STATUS_SECONDS, STATUS_SECONDS)
    since_status = 0.0
    while True:
        await trio.sleep(step)
        since_status += step
        fields: dict[str, str | int] = {}
        if watchdog is not None:
            fields["WATCHDOG"] = 1
        if since_status >= STATUS_SECONDS:
            since_status = 0.0
            try:
                fields["STATUS"] = await _service_status(m)
            except (VnafsError, OSError) as exc:
                fields["STATUS"] = f"status unavailable: {exc}"
        if fields:
            notifier.send(**fields)


# -- checks before mounting (run by `vnafs mount` before it forks) --------------------------------


def check_mountpoint(mountpoint: Path, hot: Path | None = None) -> None:
    """One clear line for every reason the mount point cannot be used. A dead vnafs mount of
    the same hot store (its daemon was killed, the lock is free) is cleaned up here, with one
    log line, so the mount can simply be repeated after a crash."""
    try:
        st_ok = mountpoint.is_dir()
        exists = st_ok or mountpoint.exists()
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise VnafsError(f"mount point {mountpoint} cannot be used ({exc.strerror})") \
                from None
        _clear_dead_mount(mountpoint, hot)
        st_ok = exists = mountpoint.is_dir()
    if not exists:
        raise VnafsError(f"mount point {mountpoint} does not exist: create the directory first")
    if not st_ok:
        raise VnafsError(f"mount point {mountpoint} is not a directory: give an empty directory")
    if find_mount(mountpoint) is not None or os.path.ismount(mountpoint):
        raise VnafsError(f"{mountpoint} is already a mount point: unmount it first or choose "
                         "another directory")
    if any(mountpoint.iterdir()):
        raise VnafsError(f"mount point {mountpoint} is not empty: choose an empty directory")


def _clear_dead_mount(mountpoint: Path, hot: Path | None) -> None:
    """`mountpoint` answers ENOTCONN: a FUSE mount whose daemon is gone."""
    found = find_mount(mountpoint)
    fix = f"fusermount3 -u {mountpoint}"
    if found is None or found[0] != "fuse.vnafs" or hot is None \
            or Path(found[1]).resolve() != hot.resolve():
        raise VnafsError(f"mount point {mountpoint} is a dead FUSE mount of something else: "
                         f"run {fix} first")
    try:
        os.close(lock_store(hot))  # free: no daemon holds this store any more
    except VnafsError:
        raise VnafsError(f"mount point {mountpoint} does not answer but a vnafs daemon still "
                         f"holds {hot}: stop that daemon (its pid is in {hot}/daemon.pid), "
                         f"then run {fix}") from None
    res = subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise VnafsError(f"mount point {mountpoint} is a dead vnafs mount that could not be "
                         f"cleared ({res.stderr.strip()}): run {fix} as root")
    # Runs in `vnafs mount` before the daemon's log exists: the admin's terminal (or the
    # journal, under systemd) gets the one line.
    print(f"vnafs: cleared the dead mount at {mountpoint} left by a stopped daemon",
          file=sys.stderr)


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
