"""Reading a file system back out of its archive: `vnafs restore` and the read-only mount.

Both start the same way: fetch the keyring (the KEK must open it, so a wrong key fails before
anything is written), fetch `meta/HEAD`, and apply the checkpoint and the cycles it lists into an
LMDB environment (docs/format.md section 6). Restore then rebuilds the block reference counts
and downloads every block, checking each before it is written; the read-only mount keeps only
the metadata and lets the engine recall blocks as they are read, and re-applies HEAD whenever
a newer cycle appears.

Restore is measured against a plain GET of the same objects (docs/performance.md), so its block
stage is a pipeline: the archive listing runs while the metadata is applied, `workers` threads
download and authenticate blocks, and the calling thread alone writes them (one writer costs the
kernel less than eight competing ones) straight to their final names (no tmp/ and rename: two
system calls fewer per block), with a `syncfs` every 64 MiB in the background so the last one has
little left to do.

The restored store has the archive's format (HEAD's `format`: its block-id algorithm), so it
goes on computing ids the way the lost store did and its new blocks dedup against the archived
ones; the read-only mount takes its format from HEAD in the same way.

Crash notes: restore marks the store `RESTORING` until its last step and writes `FORMAT` last, so
an interrupted restore is never mounted. The marker carries HEAD's format, so a resumed restore
writes the same `FORMAT` without reading HEAD again. The marker moves from the metadata stage to
the block stage only after a `syncfs`, so the metadata it vouches for is on disk. Because blocks
are written in place rather than through `tmp/` and a rename, a crash can leave a torn block
file; running restore again skips the metadata if that stage had finished, authenticates every
block file already present and downloads the ones that are missing or fail. The read-only mount
applies each new HEAD in one write transaction, so its readers see the old state or the new,
never a mixture.

Everything here is synchronous (offline tools and worker threads).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from vnafs import config as config_mod
from vnafs.archive import log as alog
from vnafs.archive.backend import ArchiveMissing, Backend
from vnafs.archive.log import ReplState, save_state
from vnafs.audit.chain import AuditLog, Event
from vnafs.errors import IntegrityError, VnafsError
from vnafs.keys import KekSource, Keyring
from vnafs.meta.db import MetaDB, records
from vnafs.seal import FORMAT_HMAC_SHA256, KIND_BLOCK, Sealer
from vnafs.store.hot import HotStore
from vnafs.store.marker import RESTORING, write_format

log = logging.getLogger("vnafs.restore")

SYNC_EVERY = 64 << 20
# Downloaded blocks waiting for the writer, per worker: enough to keep every worker busy while
# the writer catches up, few enough to bound memory (at most 4 x workers x 1 MiB and a bit).
WINDOW_PER_WORKER = 4
FOLLOW_KEY = b"follow"


def read_head(backend: Backend, sealer: Sealer) -> alog.Head:
    try:
        envelope = backend.get(alog.HEAD_NAME)
    except ArchiveMissing:
        raise VnafsError(f"archive {backend.url.display()} holds no replicated file system yet "
                         "(no meta/HEAD): check the URL and prefix, or wait for the first "
                         "replication cycle") from None
    try:
        head = alog.Head.from_json(alog.open_object(sealer, alog.HEAD_NAME, envelope))
    except alog.UnknownFormat as exc:
        raise VnafsError(str(exc)) from None
    except IntegrityError as exc:
        raise VnafsError(f"{exc}: the archive's HEAD is damaged or not this file system's; "
                         "check the URL and run vnafs verify --archive on the source") from None
    if head.fs_id != sealer.keyring.fs_id.hex():
        raise VnafsError("the archive's HEAD belongs to another file system than its keyring: "
                         "the archive prefix is shared by mistake; check the URL")
    return head


def get_keyring(backend: Backend) -> bytes:
    """The archive's keyring bytes: the first request, so it reports a wrong URL, missing
    bucket or rejected credentials before anything is written locally."""
    try:
        return backend.get(alog.KEYRING_NAME)
    except ArchiveMissing:
        raise VnafsError(f"archive {backend.url.display()} holds no keyring: check the URL and "
                         "prefix (no file system has replicated there)") from None


def install_keyring(raw: bytes, path: Path, source: KekSource) -> Keyring:
    """Write the keyring durably to `path` and open it with the KEK."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(raw)
    os.chmod(tmp, 0o600)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(path)
    return Keyring.open(path, source)


def fetch_config(backend: Backend, sealer: Sealer, root: Path, url: str,
                 credentials: Path | None = None) -> config_mod.Config:
    """The source store's vnafs.toml, pointing at the archive it was read from with the
    credentials it was read with (the source's credentials file may not exist here)."""
    cfg_path = root / config_mod.CONFIG_NAME
    try:
        text = alog.open_object(sealer, alog.CONFIG_NAME, backend.get(alog.CONFIG_NAME))
        cfg_path.write_bytes(text)
        cfg = config_mod.load(root)
    except ArchiveMissing:
        cfg = config_mod.Config()
    cfg.archive.url = url
    cfg.archive.credentials = str(credentials.resolve()) if credentials else ""
    cfg_path.write_text(cfg.to_toml())
    return cfg


def apply_head(db: MetaDB, backend: Backend, sealer: Sealer, head: alog.Head,
               applied: int, *, follow_record: bytes | None = None) -> int:
    """Apply every part a reader at cycle `applied` is missing, in one write transaction
    (with the read-only mount's position, `follow_record`, in the same transaction).

    Returns the number of entries applied."""
    n = 0
    with db.begin(write=True) as txn:
        for _, name in head.parts_after(applied):
            if name.startswith("meta/checkpoint/") and name.endswith("-0000"):
                alog.clear_replicated(db, txn)
            try:
                envelope = backend.get(name)
            except ArchiveMissing:
                raise VnafsError(f"archive object {name} named by meta/HEAD is missing: the "
                                 "archive is damaged; run vnafs verify --archive on the "
                                 "source") from None
            n += alog.apply_part(db, txn, alog.read_part(sealer, name, envelope))
        if follow_record is not None:
            db.put(txn, "repl_state", FOLLOW_KEY, follow_record)
    return n


# -- restore --------------------------------------------------------------------------------------


@dataclass
class RestoreReport:
    cycle: int = 0
    recovery_point_ns: int = 0
    records: int = 0
    blocks: int = 0
    blocks_downloaded: int = 0
    bytes_downloaded: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    seconds: float = 0.0


def restore(backend: Backend, root: Path, source: KekSource, *, progress: bool = True,
            workers: int = 8, credentials: Path | None = None) -> RestoreReport:
    """Rebuild a hot store at `root` from the archive (resuming an interrupted restore)."""
    started = time.monotonic()
    root = root.resolve()
    marker = root / RESTORING
    url = backend.url.display()
    stage = "metadata"
    # A marker without a format was left by a vnafs that knew format 1 only.
    fmt = FORMAT_HMAC_SHA256
    if marker.exists():
        state = json.loads(marker.read_text())
        if state.get("url") != url:
            raise VnafsError(f"{root} holds an unfinished restore from another archive "
                             f"({state.get('url')}): finish that one or empty the directory")
        stage = state.get("stage", "metadata")
        fmt = int(state.get("format", FORMAT_HMAC_SHA256))
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise VnafsError(f"{root} is not empty: restore into an empty or new directory")
    raw_keyring = get_keyring(backend) if stage == "metadata" else None
    if stage == "metadata" and root.exists():
        for child in root.iterdir():
            if child.name != RESTORING:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    _mark(marker, url, stage, fmt)

    if raw_keyring is not None:
        keyring = install_keyring(raw_keyring, root / "keyring", source)
    else:
        keyring = Keyring.open(root / "keyring", source)
    # Restore computes no block ids (it authenticates envelopes under the ids the metadata
    # names), so the sealer's format matters only from the next mount, which reads FORMAT.
    sealer = Sealer(keyring, format_version=fmt)
    report = RestoreReport()
    hot = HotStore(root, sealer)
    db = MetaDB(root / "meta", sealer)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="restore")
    try:
        listing = pool.submit(_block_sizes, backend)
        resuming = stage == "blocks"
        if stage == "metadata":
            cfg = fetch_config(backend, sealer, root, url, credentials)
            head = read_head(backend, sealer)
            fmt = head.format
            report.records = apply_head(db, backend, sealer, head, 0)
            reserved = max(head.cycle, alog.highest_part_cycle(backend))
            with db.begin(write=True) as txn:
                alog.rebuild_refs(db, txn, listing.result())
                # The restored store goes on replicating where the lost one stopped, numbering
                # its cycles above every part in the archive: parts beyond HEAD (a cycle whose
                # HEAD was never written, or an older HEAD put back) are create-only objects a
                # new cycle of the same number would silently take for its own.
                save_state(db, txn, ReplState(
                    cycle=reserved, committed=head.cycle, checkpoint=head.checkpoint,
                    logs=list(head.logs), rp_ns=head.rp_ns, since_checkpoint=len(head.logs),
                    keyring_sha256=alog.sha256((root / "keyring").read_bytes())))
                if cfg.audit.enabled:
                    _audit_export(db, txn, keyring)
            report.cycle, report.recovery_point_ns = head.cycle, head.rp_ns
            hot.create_layout()
            # LMDB commits are not synced one by one (MetaDB opens it with sync=False): the
            # metadata must be on disk before the marker says that stage is done, or a power
            # loss could leave a marker for the block stage over an empty or older LMDB, and
            # the rerun would download nothing and call the store restored.
            hot.syncfs()
            stage = "blocks"
            _mark(marker, url, stage, fmt)
        sizes = listing.result()
        with db.begin() as txn:
            wanted = [key for key, _ in records(txn.cursor(db=db.dbs["refs"]))]
        report.blocks = len(wanted)
        todo = [bid for bid in wanted if not (resuming and _intact(hot, bid))]
        total = sum(sizes.get(bid, 0) for bid in todo)
        if progress:
            from tqdm import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc="restoring blocks", leave=True) as bar:
                _download(backend, hot, todo, pool, workers * WINDOW_PER_WORKER, report,
                          lambda bid: bar.update(sizes.get(bid, 0)))
        else:
            _download(backend, hot, todo, pool, workers * WINDOW_PER_WORKER, report,
                      lambda bid: None)
        hot.syncfs()
    finally:
        pool.shutdown(cancel_futures=True)
        db.close()
        hot.close()
    if report.missing or report.corrupt:
        log.error("restore: %d blocks missing and %d damaged in the archive",
                  len(report.missing), len(report.corrupt))
    write_format(root, fmt)
    marker.unlink()
    report.seconds = time.monotonic() - started
    return report


def _audit_export(db: MetaDB, txn: lmdb.Transaction, keyring: Keyring) -> None:
    """An `export` record for this restore in the restored store's audit chain, which came
    from the archive with everything else. It is marked for replication (the restored store
    has an archive by definition), so the archive learns of the export at the first cycle."""
    try:
        with open("/proc/self/comm", "rb") as f:
            name = f.read().decode("utf-8", "replace").strip() or "?"
    except OSError:
        name = "?"
    event = Event(time.time_ns(), os.getuid(), os.getgid(), os.getpid(), name, "export", 0)
    journal, db.journal = db.journal, True
    try:
        AuditLog(db, keyring.audit_key).append(txn, [event])
    finally:
        db.journal = journal


def _mark(marker: Path, url: str, stage: str, fmt: int) -> None:
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "stage": stage, "format": fmt}) + "\n")
    tmp.rename(marker)


def _block_sizes(backend: Backend) -> dict[bytes, int]:
    return {bid: size for name, size in backend.list("blocks/")
            if (bid := alog.block_id_of(name)) is not None}


def _download(backend: Backend, hot: HotStore, todo: list[bytes], pool: ThreadPoolExecutor,
              window: int, report: RestoreReport, done: Callable[[bytes], None]) -> None:
    """Fetch and check `todo` in `pool`, at most `window` ahead, and write them here in order."""
    inflight: deque[tuple[bytes, Future[memoryview | None]]] = deque()
    ahead = iter(todo)
    unsynced = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="restore-sync") as syncer:
        while True:
            while len(inflight) < window and (bid := next(ahead, None)) is not None:
                inflight.append((bid, pool.submit(_fetch_checked, backend, hot.sealer, bid)))
            if not inflight:
                return
            bid, future = inflight.popleft()
            try:
                envelope = future.result()
            except ArchiveMissing:
                report.missing.append(bid.hex())
            else:
                if envelope is None:
                    report.corrupt.append(bid.hex())
                else:
                    hot.put_envelope(bid, envelope, in_place=True)
                    report.blocks_downloaded += 1
                    report.bytes_downloaded += len(envelope)
                    unsynced += len(envelope)
            if unsynced >= SYNC_EVERY:
                # Write back while downloading, so the final sync has little left to do.
                syncer.submit(hot.syncfs)
                unsynced = 0
            done(bid)


def _fetch_checked(backend: Backend, sealer: Sealer, block_id: bytes) -> memoryview | None:
    """The block's envelope if it authenticates, None if it is damaged; ArchiveMissing if
    the archive does not have it."""
    envelope = backend.get_view(alog.block_name(block_id))
    try:
        sealer.check(KIND_BLOCK, block_id, envelope, name=f"archive block {block_id.hex()}")
    except IntegrityError:
        return None
    return envelope


def _intact(hot: HotStore, block_id: bytes) -> bool:
    """Whether a block file left by an interrupted restore is whole and authentic."""
    try:
        hot.envelope(block_id)
    except IntegrityError:
        return False
    return True


# -- the read-only archive mount ------------------------------------------------------------------


def follow(db: MetaDB, backend: Backend, sealer: Sealer) -> tuple[int, int] | None:
    """Bring a read-only mount's metadata cache up to the archive's HEAD.

    Returns (cycle, entries applied), or None when nothing changed."""
    with db.begin() as txn:
        raw = db.get(txn, "repl_state", FOLLOW_KEY)
    applied = json.loads(raw)["cycle"] if raw else 0
    head = read_head(backend, sealer)
    if head.format != sealer.format_version:
        raise VnafsError(f"the archive's HEAD changed from store format {sealer.format_version} "
                         f"to {head.format}: it was replaced; remount to start over")
    if head.cycle < applied:
        raise VnafsError(f"the archive's HEAD went back from cycle {applied} to {head.cycle}: "
                         "it was rolled back or replaced; remount to start over")
    if head.cycle == applied:
        return None
    record = json.dumps({"cycle": head.cycle, "rp_ns": head.rp_ns}).encode()
    return head.cycle, apply_head(db, backend, sealer, head, applied, follow_record=record)


def follow_state(db: MetaDB) -> dict[str, int]:
    with db.begin() as txn:
        raw = db.get(txn, "repl_state", FOLLOW_KEY)
    return json.loads(raw) if raw else {"cycle": 0, "rp_ns": 0}
