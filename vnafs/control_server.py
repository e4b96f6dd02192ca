"""The daemon's control socket and its request handlers.

Why a module of its own: every `vnafs` command that talks to a running mount (`status`, `find`,
`reindex`, `snapshot ...`, `verify --archive`, `gc --archive`, `key ...`) arrives here as one
JSON line on `<hot>/control.sock` (mode 0600: root only), and the table below is the whole of
that protocol. The CLI side is `vnafs/control.py`, which imports neither trio nor LMDB.

A request is `{"op": NAME, ...fields}`; the answer `{"ok": true, "result": ...}` or
`{"ok": false, "error": "one sentence"}`. An unknown `op`, a missing field and a refused
operation are answered as errors, never by dropping the connection.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from vnafs import __version__, keyadmin
from vnafs.archive.follower import ArchiveFollower
from vnafs.archive.maintenance import ArchiveMaintenance
from vnafs.archive.replicator import Replicator
from vnafs.audit.chain import AuditLog, Query, select
from vnafs.audit.recorder import AuditRecorder
from vnafs.dicom import query
from vnafs.dicom.index import DicomIndex
from vnafs.errors import VnafsError
from vnafs.fs.engine import Engine
from vnafs.fs.files import Files
from vnafs.fs.indexer import Indexer
from vnafs.fs.snapshot_service import SnapshotService, parse_until
from vnafs.meta.snapshots import Snapshot, diff
from vnafs.reseal import Resealer
from vnafs.store.lifecycle import Store
from vnafs.tier.cache import ArchiveCache
from vnafs.tier.tierer import Tierer

log = logging.getLogger("vnafs.control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

RESEAL = "key_reseal"
RESEAL_PROGRESS = "key_reseal_progress"


class BadRequest(VnafsError):
    """A request the CLI should never send (a missing or malformed field)."""


@dataclass
class Mounted:
    """The running parts of one mounted store that requests are answered from. `index` and
    `indexer` are None with `[dicom] index = false`; a read-only archive mount has `follower`
    and no `indexer`, `replicator` or `maintenance`."""

    store: Store
    mountpoint: Path
    engine: Engine
    files: Files
    snapshots: SnapshotService
    index: DicomIndex | None = None
    indexer: Indexer | None = None
    replicator: Replicator | None = None
    maintenance: ArchiveMaintenance | None = None
    follower: ArchiveFollower | None = None
    tierer: Tierer | None = None
    cache: ArchiveCache | None = None
    audit: AuditRecorder | None = None
    # Where background jobs started by a request run (a re-seal); the daemon's nursery.
    nursery: trio.Nursery | None = None

    @property
    def readonly(self) -> bool:
        return self.follower is not None


def _field(req: dict[str, Any], name: str) -> Any:
    try:
        return req[name]
    except KeyError:
        raise BadRequest(f"bad control request: field {name!r} is missing") from None


class ControlServer:
    """JSON-lines requests on a Unix socket; one task per connection."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
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
            reply = await self.answer(buf.split(b"\n", 1)[0])
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    async def answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            op = req.get("op") if isinstance(req, dict) else None
        except ValueError:
            return {"ok": False, "error": "bad control request: not a JSON object"}
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown request {op!r}: this mount does not "
                    "offer it (is the vnafs command newer than the running daemon?)"}
        try:
            return {"ok": True, "result": await handler(req)}
        except VnafsError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:
            log.exception("control request %s failed", op)
            return {"ok": False, "error": "internal error; see the vnafs log"}


# -- the handlers ---------------------------------------------------------------------------------


def handlers(m: Mounted) -> dict[str, Handler]:
    """The request table of one mount."""
    table: dict[str, Handler] = {"status": lambda req: status(m),
                                 "wait_idle": lambda req: wait_idle(m)}
    table.update(_dicom_handlers(m))
    table.update(_snapshot_handlers(m))
    if m.maintenance is not None:
        table.update(_archive_handlers(m.maintenance))
    table.update(_tier_handlers(m))
    table.update(_key_handlers(m))
    table.update(_audit_handlers(m))
    return table


async def wait_idle(m: Mounted) -> dict[str, Any]:
    """Return once the store has nothing left to do for what was written so far: no partial
    blocks of open files, no block waiting to be sealed, nothing queued for the indexer (which
    then runs at once instead of standing back). Replication is not waited for. The
    benchmark's "sustained" figures end here (tools/bench.py); the seconds waited."""
    started = trio.current_time()
    if m.indexer is not None:
        await m.indexer.wait_idle()
    while (m.engine.inflight.value < m.engine.inflight_max
           or any(of.dirty for of in m.files.open.values())):
        await trio.sleep(0.005)
    return {"seconds": round(trio.current_time() - started, 6)}


async def status(m: Mounted) -> dict[str, Any]:
    """`vnafs status`: everything an admin checks first. The table statistics decrypt every
    block record, so they are computed in a worker thread, never on the event loop."""
    store, engine = m.store, m.engine
    st = store.hot.usage()
    tables = await trio.to_thread.run_sync(store.ns.stats, limiter=engine.io)
    health = engine.health.as_dict()
    out: dict[str, Any] = {
        "version": __version__,
        "format": store.sealer.format_version,
        "block_id": store.sealer.block_id_algorithm,
        "hot_store": str(store.root),
        "mountpoint": str(m.mountpoint),
        "archive": store.config.archive_url,
        "health": health["state"],
        "problems": health,
        "pid": os.getpid(),
        "disk": {
            "size_bytes": st.f_blocks * st.f_frsize,
            "free_bytes": st.f_bavail * st.f_frsize,
        },
        "metadata_bytes": os.path.getsize(store.root / "meta" / "data.mdb"),
        "keys": {
            "current_version": store.keyring.current_version,
            "versions": len(store.keyring.versions),
            "data_key_versions": store.keyring.versions,
            "retired": store.keyring.retired,
        },
        **tables,
        "counters": dict(engine.stats),
        "cache_bytes": engine.cache.size,
        "open_files": len(m.files.open),
        "dirty_blocks": sum(len(of.dirty) for of in m.files.open.values()),
    }
    if m.index is not None:
        counts = await trio.to_thread.run_sync(query.counts, m.index, limiter=engine.io)
        indexer = m.indexer
        out["dicom"] = {**counts, "pending": indexer.pending if indexer else 0,
                        **{f"since_mount_{k}": v
                           for k, v in (indexer.stats if indexer else {}).items()}}
    if m.replicator is not None:
        out["archive"] = await trio.to_thread.run_sync(m.replicator.status, limiter=engine.io)
        if out["archive"]["state"] != "ok" and out["health"] == "ok":
            out["health"] = "degraded"  # behind its RPO, or failing
        if out["archive"]["retention"]["unenforced"] and out["health"] == "ok":
            out["health"] = "degraded"  # object_lock asked for, and the archive cannot do it
    if m.follower is not None:
        out["archive"] = m.follower.status()
    if m.audit is not None:
        # Events seen, records written, reads collapsed into an earlier record (since mount).
        out["audit"] = dict(m.audit.stats)
    out["snapshots"] = {"count": len(m.snapshots.snaps.all()),
                        "gc": dict(m.snapshots.gc_progress)}
    if m.tierer is not None:
        out["tiering"] = await m.tierer.status()
    elif m.cache is not None:
        out["tiering"] = m.cache.status()
    else:
        out["tiering"] = {"capacity_bytes": None, "resident_bytes": tables["resident_bytes"],
                          "evicted_bytes": tables["evicted_bytes"],
                          "mode": "off: tiering needs an archive"}
    return out


def _dicom_handlers(m: Mounted) -> dict[str, Handler]:
    """`vnafs find`, `reindex`: queries work on every mount with an index, including the
    read-only archive mount (whose index is replicated); reindexing needs the indexer."""
    index, indexer, engine = m.index, m.indexer, m.engine
    if index is None:
        return {}

    async def settle(req: dict[str, Any]) -> None:
        if req.get("wait") and indexer is not None:
            await indexer.wait_idle()

    async def find(req: dict[str, Any]) -> Any:
        q = query.Query.from_request(req)
        await settle(req)
        return await trio.to_thread.run_sync(query.find, index, q, limiter=engine.io)

    async def problems(req: dict[str, Any]) -> Any:
        await settle(req)
        return await trio.to_thread.run_sync(query.problems, index, limiter=engine.io)

    async def wait(req: dict[str, Any]) -> Any:
        if indexer is None:
            return {"pending": 0}
        with trio.move_on_after(float(req.get("timeout", 25))):
            await indexer.wait_idle()
        return {"pending": indexer.pending}

    table: dict[str, Handler] = {"find": find, "problems": problems, "index_wait": wait}
    if indexer is not None:
        async def reindex(req: dict[str, Any]) -> Any:
            return {"queued": await indexer.reindex()}

        async def progress(req: dict[str, Any]) -> Any:
            return {"pending": indexer.pending, "total": indexer.reindex_total}

        table.update({"reindex": reindex, "index_progress": progress})
    return table


def _public(snap: Snapshot) -> dict[str, Any]:
    return {"name": snap.name, "id": snap.id, "epoch": snap.epoch,
            "created_ns": snap.created_ns, "expiry_ns": snap.expiry_ns or None,
            "lock_until_ns": snap.lock_until_ns or None}


def _snapshot_handlers(m: Mounted) -> dict[str, Handler]:
    """`vnafs snapshot ...`: listing and diff everywhere; changes only on a writable mount."""
    service = m.snapshots

    async def listing(req: dict[str, Any]) -> Any:
        return await service.listing()

    async def snapshot_diff(req: dict[str, Any]) -> Any:
        snaps = service.snaps
        old = snaps.need(str(_field(req, "old"))).epoch
        new_name = str(_field(req, "new"))
        new = None if new_name == "live" else snaps.need(new_name).epoch

        def run() -> list[list[str]]:
            return [list(row) for row in diff(snaps.ns, old, new)]

        return await trio.to_thread.run_sync(run, limiter=m.engine.io)

    table: dict[str, Handler] = {"snapshot_list": listing, "snapshot_diff": snapshot_diff}
    if m.readonly:
        async def refuse(req: dict[str, Any]) -> Any:
            raise VnafsError("this is a read-only archive mount: create, delete and lock "
                             "snapshots on the mount of the hot store")

        return table | {op: refuse for op in
                        ("snapshot_create", "snapshot_delete", "snapshot_lock")}

    async def create(req: dict[str, Any]) -> Any:
        until = parse_until(req["lock_until"]) if req.get("lock_until") else 0
        return _public(await service.create(req.get("name") or None, lock_until_ns=until))

    async def delete(req: dict[str, Any]) -> Any:
        return _public(await service.delete(str(_field(req, "name")), by="request"))

    async def lock(req: dict[str, Any]) -> Any:
        until = parse_until(str(_field(req, "until")))
        return _public(await service.lock(str(_field(req, "name")), until))

    return table | {"snapshot_create": create, "snapshot_delete": delete,
                    "snapshot_lock": lock}


def _tier_handlers(m: Mounted) -> dict[str, Handler]:
    """`vnafs evict`, `recall`, `pin`, `unpin`: refused with the reason where there is no
    tiering (no archive, or a read-only archive mount)."""
    tierer = m.tierer
    if tierer is None:
        why = ("this is a read-only archive mount: evict, recall and pin on the mount of the "
               "hot store" if m.readonly else
               "tiering needs an archive: configure [archive] url in vnafs.toml")

        async def refuse(req: dict[str, Any]) -> Any:
            raise VnafsError(why)

        return {op: refuse for op in ("evict", "recall", "recall_progress", "pin", "unpin")}

    async def evict(req: dict[str, Any]) -> Any:
        return await tierer.evict_request(req)

    async def recall(req: dict[str, Any]) -> Any:
        return await tierer.recall_request({**req, "wait": False})

    async def progress(req: dict[str, Any]) -> Any:
        return tierer.job_progress([int(j) for j in _field(req, "jobs")])

    async def pin(req: dict[str, Any]) -> Any:
        return await tierer.pin_request(req, True)

    async def unpin(req: dict[str, Any]) -> Any:
        return await tierer.pin_request(req, False)

    return {"evict": evict, "recall": recall, "recall_progress": progress, "pin": pin,
            "unpin": unpin}


def _key_handlers(m: Mounted) -> dict[str, Handler]:
    """`vnafs key rewrap|passwd|add-slot|remove-slot MNT`: the keyring the daemon holds is
    rewritten by the daemon itself (vnafs/keyadmin.py), under the lock its seal-count
    reservations take too. A read-only archive mount's keyring is the archive's copy: refused."""
    if m.readonly:
        async def refuse(req: dict[str, Any]) -> Any:
            raise VnafsError("this is a read-only archive mount: its keyring is the archive's "
                             "copy; change the keys on the hot store (mounted or not), the "
                             "archive follows")

        return {op: refuse for op in (*keyadmin.OPS, RESEAL, RESEAL_PROGRESS)}

    async def change(req: dict[str, Any]) -> Any:
        return await trio.to_thread.run_sync(keyadmin.apply_request, m.store, req)

    jobs: list[Resealer] = []

    def under_writer(step: Callable[[], Any]) -> Any:
        # Called in the re-seal's worker thread: the step runs while no commit does.
        async def locked() -> Any:
            async with m.engine.writer:
                return await trio.to_thread.run_sync(step)

        return trio.from_thread.run(locked)

    async def run_reseal(job: Resealer) -> None:
        try:
            await trio.to_thread.run_sync(job.run)
            await trio.to_thread.run_sync(m.store.hot.syncfs)
            if m.replicator is not None:
                # Records and config reach the archive under the new key with a checkpoint;
                # the parts sealed before become unreachable (vnafs gc --archive).
                m.replicator.after_reseal()
        except (VnafsError, OSError) as exc:
            job.report.error = str(exc)
            log.error("re-seal stopped: %s", exc)
        finally:
            job.report.finished = True

    async def reseal_start(req: dict[str, Any]) -> Any:
        if not jobs or jobs[-1].report.finished:
            backend = m.replicator.backend if m.replicator is not None else None
            jobs[:] = [Resealer(m.store.db, m.store.hot, m.store.sealer, backend,
                                under_writer=under_writer)]
            assert m.nursery is not None
            m.nursery.start_soon(run_reseal, jobs[-1])
        return jobs[-1].report.as_dict()

    async def reseal_progress(req: dict[str, Any]) -> Any:
        if not jobs:
            raise VnafsError("no re-seal has run since mount: start one with vnafs key reseal")
        return jobs[-1].report.as_dict()

    return {**{op: change for op in keyadmin.OPS}, RESEAL: reseal_start,
            RESEAL_PROGRESS: reseal_progress}


def _archive_handlers(maintenance: ArchiveMaintenance) -> dict[str, Handler]:
    """`vnafs verify --archive` (a background task the CLI polls) and `vnafs gc --archive`."""

    async def verify_start(req: dict[str, Any]) -> Any:
        return maintenance.start_verify().as_dict()

    async def verify_progress(req: dict[str, Any]) -> Any:
        return maintenance.verify_progress().as_dict()

    async def gc_start(req: dict[str, Any]) -> Any:
        return maintenance.start_gc().as_dict()

    async def gc_progress(req: dict[str, Any]) -> Any:
        return maintenance.gc_progress().as_dict()

    return {"archive_verify": verify_start, "archive_verify_progress": verify_progress,
            "archive_gc": gc_start, "archive_gc_progress": gc_progress}



def _audit_handlers(m: Mounted) -> dict[str, Handler]:
    """`vnafs audit MNT ...` and `vnafs audit verify MNT`. They answer on every mount, also
    with `[audit] enabled = false` (records written before it was turned off stay readable).
    A read-only archive mount answers from its own chain, or with `archived` from the
    replicated one of the hot store. What is queued is written first, so the answer includes
    every access made before the request."""
    key = m.store.keyring.audit_key
    replicated = AuditLog(m.store.db, key)
    own = AuditLog.local(m.store.db, key) if m.readonly else replicated

    def chain(req: dict[str, Any]) -> AuditLog:
        return replicated if req.get("archived") else own

    async def flushed() -> None:
        if m.audit is not None:
            await m.audit.flush()

    async def query(req: dict[str, Any]) -> Any:
        q = Query.from_request(req)
        await flushed()
        return await trio.to_thread.run_sync(select, chain(req), m.index, q,
                                             limiter=m.engine.io)

    async def verify(req: dict[str, Any]) -> Any:
        await flushed()
        rep = await trio.to_thread.run_sync(chain(req).verify, limiter=m.engine.io)
        return rep.as_dict()

    return {"audit": query, "audit_verify": verify}
