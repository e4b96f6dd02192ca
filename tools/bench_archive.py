"""Benchmark of archive replication: throughput, restore, recovery point, cost for the writer.

Why it exists. The archive (docs/architecture.md section 9) is where studies live for decades,
and replication is asynchronous: it must keep up with a PACS, a disaster recovery must not be
slow for reasons of ours, and ingest must not pay for it. The targets are stated relative to what
the object store itself can do, measured in the same run against the same server with the same
client library, so the figures say what vnafs costs on top of the network and the server:
replication at least 0.9x the throughput of plain PUTs of the very same sealed blocks, restore at
least 0.8x that of plain GETs of the same objects, and a recovery point never more than 15 s
(the default `rpo`) behind the newest write under a steady ingest. Everything runs on real mounts
made with the real CLI (`vnafs keygen/mkfs/mount/umount/restore`), against one SeaweedFS
(`weed mini`, tools/servers.py) on 127.0.0.1 that this tool starts and stops.

What it does, under --dir (default /var/tmp/vnafs-bench-archive, one disk for everything):

1. replicate: a hot store with an s3 archive and `[archive] interval = 3600` is mounted (its
   first cycle, at mount, ships the empty file system), then --size-mib (default 1024) of CT
   slices of 0.5 MiB from tools/gen_studies.write_ct_series are copied in: nothing replicates
   meanwhile. SeaweedFS is stopped before `vnafs umount`, so the final cycle at unmount fails
   at once and the whole backlog stays in the outbox (with the server up that cycle would ship
   it, cut short after 30 s, and leave the timed mount little or nothing to do). SeaweedFS is
   started again, `interval` set to 1, and the store mounted again: timed from the return of
   `vnafs mount` until `status` shows no pending record and no pending block (the mount's first
   cycle runs at once and ships the backlog: blocks, the log parts of every dirty record, HEAD;
   the time including the mount command is shown too). MiB/s is over
   `since_mount_bytes_uploaded` of that mount (sealed block bytes). Baseline: the same sealed
   block files, read from `<hot>/blocks/`, PUT (create-only, obstore through `open_backend`, 4
   threads like `[archive] uploads`) under fresh prefixes of the same bucket, once before the
   timed mount and once after. All that --repeat times (2), each time in a new store (new keys,
   so new blocks) from the same data; the ratio is of the medians.
2. restore: `vnafs restore --no-progress` of the first archive into a new directory, timed
   (process start to exit: keyring, metadata, refs, every block fetched, authenticated and
   written, one syncfs), --repeat times, against plain GETs of every `blocks/` object of the
   prefix into memory (a listing plus 8 threads, like restore's 8 workers) before, between and
   after them; the ratio is of the medians. For information, also against a plain GET that
   writes every object to a file and syncs (what a copy tool does: the bytes restore must
   write, without anything vnafs adds), after each restore.
3. rpo: a hot store with the default archive settings (interval 2 s, rpo 15 s) takes one CT
   study of --study-slices (300) slices per minute at an even pace (one slice every 0.2 s) for
   --rpo-minutes (5); `status` is requested through the control socket every 0.5 s. Per poll,
   trailing = wall time of the newest close() that had returned before the poll started minus
   the recovery point (0 when the recovery point is newer). Max, p95 and median of trailing and
   the maximum `lag_seconds` the daemon reported are shown, and how long after the last close
   the recovery point passed it.
4. ingest: --files (2000) CT slices (read into memory first) copied file by file (open, one
   write, close; no fsync) into a fresh mount without archive, one with a `file://` archive (a
   directory on the same disk) and one with the s3 archive, default settings (replication runs
   alongside), --repeat times (2) in alternating order after one uncounted warm-up ingest
   without archive (see tools/bench_dicom.py: the first ingest after the sources were written
   is up to 45 % slower). Timed until the last close() returns; the time until everything was
   replicated is shown for information. Ratios are throughput with archive / without.

How to read the output. Times are wall clock (time.perf_counter); MiB/s is 2^20 bytes per second
of sealed (compressed and encrypted) block bytes unless it says "CT data"; MB/s is 10^6 bytes
per second. Ratios are vnafs / plain throughput (1.0 = as fast as the bare client). "CPU" is user
+ system time from /proc/PID/stat (the vnafs daemon, weed) or os.times (this process, for the
plain client; a child, for restore). The peak RSS of weed is its VmHWM before every stop (it is
restarted once per replicate run), that of vnafs daemons their VmHWM before each unmount. The
load average is printed per part: on two shared cores every figure moves by 10-30 % with other
work, so compare runs from one quiet machine. Speed is measured, never asserted: a missed target
is a row marked MISS, not a failure.

Run it as root from the repository root with the project's virtualenv:

    .venv/bin/python -m tools.bench_archive [--quick] [--only replicate,restore,rpo,ingest]
                                            [--json FILE] [--dir DIR]

--quick uses 256 MiB, 500 ingest files, one run of everything and 2 minutes of rpo (about
3 minutes in all; the full run takes about 9). --no-index makes every store with
`[dicom] index = false`, to separate the cost of the index from that of replication. `restore`
needs the archive that `replicate` makes, so asking for it runs `replicate` too. --py-spy DIR
records py-spy profiles (raw collapsed stacks) of the daemon during the replication drain and
the ingest writes, and of `vnafs restore`; they perturb the timings, so leave it off for
figures. Every mount is unmounted and SeaweedFS stopped (by its PID) on exit, also on Ctrl-C or
SIGTERM, and the work directory is removed unless --keep is given. Exit status: 0 when every
part ran, 1 when one failed (the reason is printed under the table), 2 for a usage problem, 130
when interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.gen_studies import write_ct_series
from tools.harness import (
    FAILURES,
    MIB,
    BenchError,
    RunDir,
    VnafsTarget,
    banner,
    cpu_seconds,
    load_sources,
    loadavg,
    parse_run_args,
    preflight,
    run_part,
    signals_ignored,
    sigterm_as_interrupt,
    store_file,
    vm_hwm_kib,
)
from tools.report import Report, conclude, median, p95, say
from tools.servers import SeaweedFS
from vnafs import config as config_mod
from vnafs.archive.backend import Backend, open_backend
from vnafs.control import control_request

DEFAULT_DIR = "/var/tmp/vnafs-bench-archive"
PARTS = ("replicate", "restore", "rpo", "ingest")
DEFAULT_SIZES = {"size_mib": 1024, "files": 2000, "rpo_minutes": 5, "repeat": 2}
QUICK_SIZES = {"size_mib": 256, "files": 500, "rpo_minutes": 2, "repeat": 1}
SLICES_PER_MIB = 2  # write_ct_series makes 512 x 512 x 16-bit slices, 0.5 MiB of pixels
SEED = 20241130
BUCKET = "vnafs-bench"
REPLICATE_TARGET = 0.9  # vnafs replication / plain PUT throughput, at least
RESTORE_TARGET = 0.8  # vnafs restore / plain GET throughput, at least
RPO_TARGET = 15.0  # seconds the recovery point may trail the newest write, at most
UPLOADS = config_mod.ArchiveConfig().uploads  # concurrent uploads of the replicator (4)
RESTORE_WORKERS = 8  # vnafs.archive.restore.restore(workers=8), what `vnafs restore` uses
DRAIN_POLL = 0.5  # seconds between status requests while a backlog drains
FAST_POLL = 0.05  # ... once at most FAST_POLL_BELOW blocks are pending (a cheaper scan)
FAST_POLL_BELOW = 128
RPO_POLL = 0.5  # seconds between status requests during the rpo part
REPLICATE_DEADLINE = 1800.0  # seconds before a backlog that does not drain counts as stuck
CATCH_UP_DEADLINE = 300.0  # after an ingest, for replication to catch up


# -- helpers --------------------------------------------------------------------------------------


def mib(n: float) -> float:
    return n / MIB


def rate(nbytes: float, seconds: float) -> float:
    return nbytes / MIB / seconds if seconds > 0 else 0.0


def copy_files(top: Path, files: list[tuple[str, bytes]]) -> None:
    """The ingest of a PACS: per file open(O_CREAT), one write, close; no fsync."""
    for d in sorted({(top / rel).parent for rel, _ in files}):
        d.mkdir(parents=True, exist_ok=True)
    for rel, data in files:
        store_file(top / rel, data)


def block_files(hot: Path) -> list[tuple[str, Path, int]]:
    """(archive object name, path, size) of every sealed block file of a hot store.

    The hot store and the archive name blocks alike: blocks/<2 hex>/<62 hex>."""
    out = []
    for path in sorted((hot / "blocks").glob("??/*")):
        if path.is_file():
            out.append((f"blocks/{path.parent.name}/{path.name}", path, path.stat().st_size))
    return out


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


class PySpy:
    """`py-spy record` of one process between attach() and detach() (--py-spy; off by default)."""

    def __init__(self, outdir: Path | None, name: str) -> None:
        self.outdir = outdir
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def attach(self, pid: int | None) -> None:
        exe = Path(sys.executable).with_name("py-spy")
        if self.outdir is None or pid is None or not exe.exists():
            return
        self.outdir.mkdir(parents=True, exist_ok=True)
        out = self.outdir / f"{self.name}.txt"
        self.proc = subprocess.Popen(
            [str(exe), "record", "--pid", str(pid), "--rate", "200", "--threads", "--nonblocking",
             "--format", "raw", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def detach(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        say(f"  py-spy profile: {self.outdir}/{self.name}.txt")


class ArchiveTarget(VnafsTarget):
    """A vnafs file system made with `mkfs --archive URL` (or without), `[archive]` settings set
    after mkfs, and every vnafs command run with the archive credentials in its environment."""

    def __init__(self, root: Path, exe: str, *, archive: str | None, env: dict[str, str],
                 settings: dict[str, int] | None = None, dicom_index: bool = True) -> None:
        super().__init__(root, exe, env=env)
        self.archive = archive
        self.settings = dict(settings or {})
        self.dicom_index = dicom_index

    def mkfs_options(self) -> list[str]:
        return ["--archive", self.archive] if self.archive else []

    def create(self) -> None:
        super().create()
        if not self.dicom_index:
            cfg = config_mod.load(self.hot)
            cfg.dicom.index = False
            (self.hot / config_mod.CONFIG_NAME).write_text(cfg.to_toml())
        if self.settings:
            self.set_archive(**self.settings)

    def set_archive(self, **values: int) -> None:
        """Rewrite `[archive]` settings of vnafs.toml (read at mount)."""
        cfg = config_mod.load(self.hot)
        for key, value in values.items():
            if not hasattr(cfg.archive, key):
                raise BenchError(f"no archive setting {key!r}")
            setattr(cfg.archive, key, value)
        (self.hot / config_mod.CONFIG_NAME).write_text(cfg.to_toml())
        got = config_mod.load(self.hot).archive
        if any(getattr(got, k) != v for k, v in values.items()):
            raise BenchError(f"setting {values} in {self.hot}/vnafs.toml did not take")

    def status(self, timeout: float = 30.0) -> dict[str, Any]:
        return dict(control_request(self.hot, {"op": "status"}, timeout))

    def archive_status(self) -> dict[str, Any]:
        arch = self.status().get("archive")
        if not arch:
            raise BenchError(f"{self.path} has no archive in its status")
        return dict(arch)

    def wait_replicated(self, deadline_s: float, *, after_cycle: int = 0,
                        poll: float = DRAIN_POLL, trace: list[tuple[float, int, int]] | None = None
                        ) -> tuple[float, dict[str, Any], float]:
        """Block until nothing is pending and a cycle after `after_cycle` has committed.

        Returns (seconds waited, the archive status, seconds spent in status requests); with
        `trace`, appends (perf_counter at the reply, pending blocks, pending records) per poll.
        """
        t0 = time.perf_counter()
        in_status = 0.0
        arch: dict[str, Any] = {}
        while True:
            s0 = time.perf_counter()
            arch = self.archive_status()
            s1 = time.perf_counter()
            in_status += s1 - s0
            if trace is not None:
                trace.append((s1, int(arch["pending_blocks"]), int(arch["pending_records"])))
            if (not arch["pending_records"] and not arch["pending_blocks"]
                    and arch["recovery_point_ns"] and arch["cycle"] > after_cycle):
                return s1 - t0, arch, in_status
            if time.perf_counter() - t0 > deadline_s:
                raise BenchError(f"replication did not catch up within {deadline_s:.0f} s: "
                                 f"{arch['pending_blocks']} blocks and {arch['pending_records']}"
                                 f" records pending, state {arch['state']}, last error "
                                 f"{arch['last_error']}")
            # Near the end a status request is cheap (it scans the pending blocks) and the
            # end is what is timed: poll fast then.
            time.sleep(poll if arch["pending_blocks"] > FAST_POLL_BELOW else FAST_POLL)


@dataclass
class Bench:
    """The run: where file systems go, the SeaweedFS server, and what to clean up."""

    rundir: Path
    exe: str
    keep: bool
    seaweed: SeaweedFS
    profile_dir: Path | None
    dicom_index: bool = True
    targets: list[ArchiveTarget] = field(default_factory=list)
    later: list[ArchiveTarget] = field(default_factory=list)  # to drop after the restore part
    weed_hwm_kib: list[int] = field(default_factory=list)
    prefixes: int = 0

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.seaweed.env()}

    def s3_url(self, name: str) -> str:
        """A fresh prefix of the bucket, never used before in this run."""
        self.prefixes += 1
        return self.seaweed.url(BUCKET, f"{self.prefixes:02d}-{name}")

    def s3(self, url: str) -> Backend:
        return open_backend(url, env=self.seaweed.env())

    def new_fs(self, name: str, archive: str | None, settings: dict[str, int] | None = None
               ) -> ArchiveTarget:
        t = ArchiveTarget(self.rundir / name, self.exe, archive=archive, env=self.env,
                          settings=settings, dicom_index=self.dicom_index)
        self.targets.append(t)
        t.create()
        return t

    def drop(self, t: ArchiveTarget) -> None:
        """Unmount (if needed) and delete a file system that is no longer needed."""
        t.discard(self.keep)

    def weed_pid(self) -> int | None:
        proc = self.seaweed.proc
        return proc.pid if proc is not None else None

    def weed_cpu(self) -> float:
        return cpu_seconds(self.weed_pid()) or 0.0

    def sample_weed(self) -> None:
        pid = self.weed_pid()
        hwm = vm_hwm_kib(pid) if pid is not None else None
        if hwm is not None:
            self.weed_hwm_kib.append(hwm)

    def stop_weed(self) -> None:
        self.sample_weed()
        self.seaweed.stop()

    def start_weed(self) -> None:
        self.seaweed.start()


def daemon_rss_mib(t: ArchiveTarget) -> str:
    return "-" if t.peak_rss_kib is None else f"{t.peak_rss_kib / 1024:.0f} MiB"


# -- plain client baselines -----------------------------------------------------------------------


@dataclass
class PlainRun:
    seconds: float
    nbytes: int
    objects: int
    cpu_client: float
    cpu_weed: float

    @property
    def mib_s(self) -> float:
        return rate(self.nbytes, self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "mib_s": self.mib_s}


def plain_put(b: Bench, blocks: list[tuple[str, Path, int]], url: str) -> PlainRun:
    """PUT every block file (read in the worker, like the replicator does) under `url`."""
    backend = b.s3(url)

    def put(item: tuple[str, Path, int]) -> int:
        name, path, _ = item
        data = path.read_bytes()
        if not backend.put(name, data, create=True):
            raise BenchError(f"{name} already exists under the fresh prefix {url}")
        return len(data)

    c0, w0 = own_cpu(), b.weed_cpu()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=UPLOADS) as pool:
        total = sum(pool.map(put, blocks))
    seconds = time.perf_counter() - t0
    return PlainRun(seconds, total, len(blocks), own_cpu() - c0, b.weed_cpu() - w0)


def plain_get(b: Bench, url: str, to: Path | None = None) -> PlainRun:
    """List `blocks/` under `url` and GET every object, RESTORE_WORKERS at a time: into memory,
    or with `to` as a copy tool does, each written to a file of the same name under `to`, then
    one sync (the bytes restore has to write, without anything vnafs adds)."""
    backend = b.s3(url)
    c0, w0 = own_cpu(), b.weed_cpu()
    t0 = time.perf_counter()
    objects = list(backend.list("blocks/"))
    if to is not None:
        for sub in {name.rsplit("/", 1)[0] for name, _ in objects}:
            (to / sub).mkdir(parents=True, exist_ok=True)

    def get(item: tuple[str, int]) -> int:
        name, size = item
        data = backend.get_view(name)
        if len(data) != size:
            raise BenchError(f"{name}: got {len(data)} bytes, listed {size}")
        if to is not None:
            with open(to / name, "wb") as f:
                f.write(data)
        return len(data)

    with ThreadPoolExecutor(max_workers=RESTORE_WORKERS) as pool:
        total = sum(pool.map(get, objects))
    if to is not None:
        os.sync()
    seconds = time.perf_counter() - t0
    return PlainRun(seconds, total, len(objects), own_cpu() - c0, b.weed_cpu() - w0)


def _plain_row(rep: Report, label: str, runs: list[PlainRun]) -> float:
    """One row for the plain runs; returns their median MiB/s."""
    mid = median([r.mib_s for r in runs])
    assert mid is not None
    cpu_c = median([r.cpu_client for r in runs]) or 0.0
    cpu_w = median([r.cpu_weed for r in runs]) or 0.0
    rep.row(label, f"median {mid:.1f} MiB/s  (runs: "
            + ", ".join(f"{r.seconds:.2f} s {r.mib_s:.0f}" for r in runs)
            + f"; CPU client {cpu_c:.1f} s, weed {cpu_w:.1f} s)")
    return mid


# -- part 1: replication throughput ---------------------------------------------------------------


@dataclass
class Archived:
    """What `replicate` leaves for `restore`: the unmounted store and its archive."""

    target: ArchiveTarget
    url: str
    blocks: int
    block_bytes: int


@dataclass
class DrainRun:
    """One replication of a backlog: the vnafs drain and the plain PUTs around it."""

    blocks: int
    block_bytes: int
    ingest: float
    umount: float
    mount: float  # the `vnafs mount` command
    drain: float  # from the mount command's return until nothing was pending
    first_block: float | None  # first poll that saw a block shipped (resolution DRAIN_POLL)
    blocks_done: float | None
    sent: int
    sent_blocks: int
    cycles: int
    cpu_daemon_mount: float  # daemon CPU until the mount command returned
    cpu_daemon_drain: float  # daemon CPU from then until nothing was pending
    cpu_weed: float
    status_seconds: float
    polls: int
    plain: list[PlainRun]
    trace: list[tuple[float, int, int]]
    outbox: dict[str, Any]

    @property
    def mib_s(self) -> float:
        return rate(self.sent, self.drain)

    @property
    def with_mount(self) -> float:
        return self.mount + self.drain

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["plain"] = [p.as_dict() for p in self.plain]
        d["mib_s"] = self.mib_s
        return d


def replicate_once(b: Bench, files: list[tuple[str, bytes]], run: int
                   ) -> tuple[DrainRun, Archived]:
    url = b.s3_url(f"replicate-{run}")
    t = b.new_fs(f"replicate-{run}", url, {"interval": 3600})
    t.mount()
    _, first, _ = t.wait_replicated(60)  # the first cycle, at mount: the empty file system
    t0 = time.perf_counter()
    copy_files(t.path / "incoming", files)
    t_ingest = time.perf_counter() - t0
    before = t.archive_status()
    if before["cycle"] != first["cycle"]:
        raise BenchError(f"a replication cycle ran during the ingest (cycle {first['cycle']} -> "
                         f"{before['cycle']}) although interval = 3600")
    # Stop the archive so that the final cycle at unmount fails and leaves the outbox whole.
    b.stop_weed()
    try:
        t0 = time.perf_counter()
        t.umount()
        t_umount = time.perf_counter() - t0
    finally:
        b.start_weed()
    blocks = block_files(t.hot)
    block_bytes = sum(s for _, _, s in blocks)
    say(f"  run {run}: ingest {t_ingest:.1f} s; outbox {before['pending_blocks']} blocks, "
        f"{mib(before['pending_bytes']):.1f} MiB, {before['pending_records']} records; unmount "
        f"with the archive down {t_umount:.1f} s; {len(blocks)} block files "
        f"({mib(block_bytes):.1f} MiB)")
    t.set_archive(interval=1)

    plain = [plain_put(b, blocks, b.s3_url("plain-put"))]
    say(f"  run {run}: plain PUT {plain[0].seconds:.2f} s, {plain[0].mib_s:.1f} MiB/s")
    spy = PySpy(b.profile_dir, f"replicate-drain-{run}")
    trace: list[tuple[float, int, int]] = []
    cpu_w0 = b.weed_cpu()
    t0 = time.perf_counter()
    try:
        t.mount()
        t_up = time.perf_counter()
        cpu_up = cpu_seconds(t.pid()) or 0.0
        spy.attach(t.pid())
        _, _, in_status = t.wait_replicated(REPLICATE_DEADLINE, after_cycle=before["cycle"],
                                            trace=trace)
    finally:
        spy.detach()
    t_end = trace[-1][0]
    cpu_end = cpu_seconds(t.pid()) or 0.0
    cpu_weed = b.weed_cpu() - cpu_w0
    arch = t.archive_status()
    # The mount's first cycle starts while `vnafs mount` finishes (the replicator task is
    # started just before the control socket and the readiness signal), so the drain is timed
    # from the return of the mount command; the time including the mount is kept too.
    blocks_left = [(tt, pb) for tt, pb, _ in trace]
    res = DrainRun(
        blocks=len(blocks), block_bytes=block_bytes, ingest=t_ingest, umount=t_umount,
        mount=t_up - t0, drain=t_end - t_up,
        first_block=next((tt - t_up for tt, pb in blocks_left if pb < len(blocks)), None),
        blocks_done=next((tt - t_up for tt, pb in blocks_left if pb == 0), None),
        sent=int(arch["since_mount_bytes_uploaded"]),
        sent_blocks=int(arch["since_mount_blocks_uploaded"]),
        cycles=int(arch["since_mount_cycles"]), cpu_daemon_mount=cpu_up,
        cpu_daemon_drain=cpu_end - cpu_up, cpu_weed=cpu_weed, status_seconds=in_status,
        polls=len(trace), plain=plain, trace=[(tt - t_up, pb, pr) for tt, pb, pr in trace],
        outbox=before)
    say(f"  run {run}: vnafs drain {res.drain:.2f} s after the mount returned "
        f"({res.with_mount:.2f} s with it), {res.mib_s:.1f} MiB/s ({res.sent_blocks} blocks, "
        f"{res.cycles} cycle(s))")
    plain.append(plain_put(b, blocks, b.s3_url("plain-put")))
    say(f"  run {run}: plain PUT {plain[1].seconds:.2f} s, {plain[1].mib_s:.1f} MiB/s")
    t.umount()
    if res.sent_blocks + int(arch["since_mount_blocks_present"]) != len(blocks):
        raise BenchError(f"the timed mount shipped {res.sent_blocks} blocks (+ "
                         f"{arch['since_mount_blocks_present']} already present), the hot store "
                         f"has {len(blocks)}")
    if res.sent_blocks != len(blocks):
        say(f"  note: {len(blocks) - res.sent_blocks} blocks were in the archive before the "
            "timed mount (shipped by the unmount's final cycle)")
    return res, Archived(t, url, len(blocks), block_bytes)


def part_replicate(b: Bench, files: list[tuple[str, bytes]], runs: int, rep: Report
                   ) -> Archived:
    """`runs` backlogs, each in a fresh store (new keys, so new blocks) from the same data."""
    data_bytes = sum(len(d) for _, d in files)
    say(f"\n== replicate: backlog of {len(files)} CT slices ({mib(data_bytes):.0f} MiB) vs "
        f"plain PUT, {runs}x (load average {loadavg():.2f})")
    figures: dict[str, Any] = {"files": len(files), "data_bytes": data_bytes}
    rep.data["replicate"] = figures
    results: list[DrainRun] = []
    kept: Archived | None = None
    for run in range(1, runs + 1):
        res, archived = replicate_once(b, files, run)
        results.append(res)
        if kept is None:
            kept = archived  # restore reads the first one
        else:
            # Deleted after the restore part, not now: see the note in part_restore.
            b.later.append(archived.target)
    assert kept is not None
    first = results[0]
    drain = median([r.drain for r in results])
    with_mount = median([r.with_mount for r in results])
    vnafs_rate = median([r.mib_s for r in results])
    vnafs_rate_mount = median([rate(r.sent, r.with_mount) for r in results])
    assert drain is not None and with_mount is not None
    assert vnafs_rate is not None and vnafs_rate_mount is not None
    rep.section(f"replicate: backlog of {len(files)} CT slices, {mib(data_bytes):.0f} MiB of CT "
                f"= {first.blocks} sealed blocks, {mib(first.block_bytes):.1f} MiB "
                f"(median of {runs})")
    rep.row("vnafs: mount returned until nothing pending", f"median {vnafs_rate:.1f} MiB/s  "
            "(runs: " + ", ".join(f"{r.drain:.2f} s {r.mib_s:.0f}" for r in results) + ")")
    rep.row("vnafs: the same including the mount", f"median {vnafs_rate_mount:.1f} MiB/s  "
            f"({with_mount:.2f} s; mount command "
            f"{median([r.mount for r in results]) or 0:.2f} s)")

    def when(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} s"

    rep.row("vnafs: drain timeline (info)", "; ".join(
        f"first block by {when(r.first_block)}, last by {when(r.blocks_done)}, committed at "
        f"{r.drain:.2f} s" for r in results) + f" (polls every {DRAIN_POLL:g} s, "
        f"{FAST_POLL:g} s near the end)")
    rep.row("vnafs: CT data protected per second", f"{rate(data_bytes, drain):.1f} MiB/s")
    plain_runs = [p for r in results for p in r.plain]
    plain_rate = _plain_row(rep, f"plain PUT, {UPLOADS} threads (before, after each)",
                            plain_runs)
    ratio = vnafs_rate / plain_rate
    rep.row("replication / plain PUT", f"{ratio:.2f}x  (including the mount "
            f"{vnafs_rate_mount / plain_rate:.2f}x)", f">= {REPLICATE_TARGET}x",
            ratio >= REPLICATE_TARGET)
    cpu_d = median([r.cpu_daemon_drain for r in results]) or 0.0
    cpu_m = median([r.cpu_daemon_mount for r in results]) or 0.0
    cpu_w = median([r.cpu_weed for r in results]) or 0.0
    rep.row("CPU during the drain", f"daemon {cpu_d:.1f} s (+ {cpu_m:.1f} s to mount), weed "
            f"{cpu_w:.1f} s; status requests {first.status_seconds:.2f} s in {first.polls}")
    rep.row("ingest / unmount, archive down (info)", ", ".join(
        f"{r.ingest:.1f} s / {r.umount:.1f} s" for r in results))
    figures.update(runs=[r.as_dict() for r in results], drain_seconds=drain,
                   drain_with_mount_seconds=with_mount, vnafs_mib_s=vnafs_rate,
                   vnafs_mib_s_with_mount=vnafs_rate_mount, plain_mib_s=plain_rate, ratio=ratio,
                   blocks=first.blocks, block_bytes=first.block_bytes)
    return kept


# -- part 2: restore ------------------------------------------------------------------------------


_RESTORED = re.compile(r": (\d+) blocks \((\d+) downloaded now, ([\d.]+) MiB\) in ([\d.]+) s")


@dataclass
class RestoreRun:
    seconds: float
    own_count: float  # what `vnafs restore` reports (without its start-up and backend check)
    cpu: float
    cpu_weed: float
    nbytes: int

    @property
    def mib_s(self) -> float:
        return rate(self.nbytes, self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "mib_s": self.mib_s}


def restore_once(b: Bench, src: Archived, target: Path, name: str) -> RestoreRun:
    cmd = [b.exe, "restore", "--key-file", str(src.target.key), "--no-progress", src.url,
           str(target)]
    spy = PySpy(b.profile_dir, name)
    c0, w0 = children_cpu(), b.weed_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=b.env, text=True)
    try:
        spy.attach(proc.pid)
        out, err = proc.communicate(timeout=REPLICATE_DEADLINE)
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    finally:
        spy.detach()
    seconds = time.perf_counter() - t0
    cpu, cpu_weed = children_cpu() - c0, b.weed_cpu() - w0
    if proc.returncode != 0:
        raise BenchError(f"vnafs restore failed ({proc.returncode}): {(out + err).strip()}")
    m = _RESTORED.search(out)
    if m is None:
        raise BenchError(f"unexpected output of vnafs restore: {out.strip()!r}")
    n_blocks, n_down, inner = int(m[1]), int(m[2]), float(m[4])
    if n_blocks != src.blocks or n_down != src.blocks:
        raise BenchError(f"vnafs restore brought {n_down} of {n_blocks} blocks, expected "
                         f"{src.blocks}")
    restored = sum(s for _, _, s in block_files(target))
    if restored != src.block_bytes:
        raise BenchError(f"the restored store holds {restored} block bytes, the source "
                         f"{src.block_bytes}")
    return RestoreRun(seconds, inner, cpu, cpu_weed, restored)


def part_restore(b: Bench, src: Archived, runs: int, rep: Report) -> None:
    say(f"\n== restore: {src.blocks} blocks, {mib(src.block_bytes):.1f} MiB, vs plain GET, "
        f"{runs}x (load average {loadavg():.2f})")
    figures: dict[str, Any] = {"blocks": src.blocks, "block_bytes": src.block_bytes}
    rep.data["restore"] = figures
    plain: list[PlainRun] = []
    restores: list[RestoreRun] = []

    def get() -> None:
        plain.append(plain_get(b, src.url))
        say(f"  plain GET {plain[-1].seconds:.2f} s, {plain[-1].mib_s:.1f} MiB/s "
            f"({plain[-1].objects} objects)")
        if plain[-1].objects != src.blocks:
            raise BenchError(f"the archive lists {plain[-1].objects} blocks, the hot store had "
                             f"{src.blocks}")

    to_files: list[PlainRun] = []

    def get_to_files(run: int) -> None:
        to_files.append(plain_get(b, src.url, to=b.rundir / f"plain-get-{run}"))
        say(f"  plain GET to files {to_files[-1].seconds:.2f} s, {to_files[-1].mib_s:.1f} MiB/s")

    for run in range(1, runs + 1):
        get()
        target = b.rundir / f"restored-{run}"
        res = restore_once(b, src, target, f"restore-{run}")
        restores.append(res)
        say(f"  vnafs restore {res.seconds:.2f} s, {res.mib_s:.1f} MiB/s ({res.own_count:.1f} s "
            "by its own count)")
        get_to_files(run)
    get()
    # The restored copies (and the replicate part's stores, main()) are deleted only after
    # this part: this ext4 has no journal, and without one ext4 skips recently freed inodes
    # when it allocates new ones, so deleting a store right before a restore made that restore
    # spend a quarter of its CPU searching the inode tables (perf: recently_deleted,
    # find_inode_bit), which a restore onto a new disk never does.
    if not b.keep:
        for run in range(1, runs + 1):
            shutil.rmtree(b.rundir / f"restored-{run}", ignore_errors=True)
            shutil.rmtree(b.rundir / f"plain-get-{run}", ignore_errors=True)
    vnafs_rate = median([r.mib_s for r in restores])
    assert vnafs_rate is not None
    rep.section(f"restore: {src.blocks} blocks, {mib(src.block_bytes):.1f} MiB "
                f"(median of {runs})")
    cpu = median([r.cpu for r in restores]) or 0.0
    cpu_w = median([r.cpu_weed for r in restores]) or 0.0
    rep.row("vnafs restore --no-progress", f"median {vnafs_rate:.1f} MiB/s  (runs: "
            + ", ".join(f"{r.seconds:.2f} s {r.mib_s:.0f}" for r in restores)
            + f"; its own count {median([r.own_count for r in restores]) or 0:.1f} s; CPU "
            f"{cpu:.1f} s, weed {cpu_w:.1f} s)")
    plain_rate = _plain_row(rep, f"plain GET, {RESTORE_WORKERS} threads (around each)", plain)
    ratio = vnafs_rate / plain_rate
    rep.row("restore / plain GET", f"{ratio:.2f}x", f">= {RESTORE_TARGET}x",
            ratio >= RESTORE_TARGET)
    files_rate = _plain_row(rep, f"plain GET to files + sync, {RESTORE_WORKERS} threads (info)",
                            to_files)
    rep.row("restore / plain GET to files (info)", f"{vnafs_rate / files_rate:.2f}x")
    figures.update(runs=[r.as_dict() for r in restores], mib_s=vnafs_rate,
                   plain=[p.as_dict() for p in plain], plain_mib_s=plain_rate, ratio=ratio,
                   plain_to_files=[p.as_dict() for p in to_files],
                   plain_to_files_mib_s=files_rate)


# -- part 3: recovery point under a steady ingest -------------------------------------------------


@dataclass
class Writer:
    """Writes slices at an even pace in a thread; remembers when the newest close() returned."""

    top: Path
    files: list[tuple[str, bytes]]
    pace: float
    stop: threading.Event = field(default_factory=threading.Event)
    last_close: float = 0.0  # time.time() after the newest close() returned; 0 before
    written: int = 0
    late: float = 0.0  # the most a write started after its due time
    error: BaseException | None = None
    finished: float = 0.0

    def run(self) -> None:
        try:
            for d in sorted({(self.top / rel).parent for rel, _ in self.files}):
                d.mkdir(parents=True, exist_ok=True)
            start = time.monotonic()
            for i, (rel, data) in enumerate(self.files):
                due = start + i * self.pace
                delay = due - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    return
                if self.stop.is_set():
                    return
                self.late = max(self.late, -delay)
                store_file(self.top / rel, data)
                self.last_close = time.time()
                self.written += 1
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.finished = time.time()


def part_rpo(b: Bench, minutes: int, slices: int, rep: Report) -> None:
    pace = 60.0 / slices
    say(f"\n== rpo: one CT study of {slices} slices per minute for {minutes} min, one slice "
        f"every {pace:.2f} s (load average {loadavg():.2f})")
    src = b.rundir / "src-rpo"
    t0 = time.perf_counter()
    files: list[tuple[str, bytes]] = []
    for k in range(minutes):
        out = src / f"study{k + 1:02d}"
        write_ct_series(out, seed=SEED + 1 + k, count=slices)  # a new patient and study each
        files += [(f"study{k + 1:02d}/{rel}", d) for rel, d in load_sources(out)]
    if not b.keep:
        shutil.rmtree(src, ignore_errors=True)
    total = sum(len(d) for _, d in files)
    say(f"  generated {len(files)} slices, {mib(total):.0f} MiB, in "
        f"{time.perf_counter() - t0:.1f} s (not timed); held in memory")
    figures: dict[str, Any] = {"minutes": minutes, "slices_per_study": slices, "pace": pace,
                               "files": len(files), "bytes": total}
    rep.data["rpo"] = figures
    t = b.new_fs("rpo", b.s3_url("rpo"))  # default archive settings
    t.mount()
    t.wait_replicated(60)
    cfg = config_mod.load(t.hot).archive
    writer = Writer(t.path / "rpo", files, pace)
    thread = threading.Thread(target=writer.run, name="rpo-writer", daemon=True)
    samples: list[dict[str, Any]] = []
    caught_up: float | None = None
    try:
        thread.start()
        next_poll = time.monotonic()
        deadline = time.monotonic() + minutes * 60 + CATCH_UP_DEADLINE
        while time.monotonic() < deadline:
            next_poll += RPO_POLL
            newest = writer.last_close
            polled = time.time()
            st = t.status(timeout=10)
            arch = st["archive"]
            rp = (arch["recovery_point_ns"] or 0) / 1e9
            done = not thread.is_alive()
            samples.append({"t": polled, "newest_close": newest, "rp": rp,
                            "trailing": max(0.0, newest - rp) if newest else 0.0,
                            "lag": arch["lag_seconds"] or 0.0, "state": arch["state"],
                            "health": st["health"], "pending_blocks": arch["pending_blocks"],
                            "writing": not done})
            if done and newest and rp >= writer.last_close and not arch["pending_blocks"]:
                caught_up = time.time() - writer.last_close  # observed, so an upper bound
                break
            time.sleep(max(0.0, next_poll - time.monotonic()))
        else:
            raise BenchError(f"replication did not catch up {CATCH_UP_DEADLINE:.0f} s after "
                             "the ingest")
    finally:
        writer.stop.set()
        thread.join(timeout=30)
    if writer.error is not None:
        raise BenchError(f"the rpo writer failed: {writer.error}")
    if writer.written != len(files):
        raise BenchError(f"the rpo writer wrote {writer.written} of {len(files)} slices")
    final = t.archive_status()
    t.umount()
    active = [s for s in samples if s["newest_close"]]
    trailing = [s["trailing"] for s in active]
    lags = [s["lag"] for s in active]
    worst, high, mid = max(trailing), p95(trailing), median(trailing)
    assert high is not None and mid is not None
    not_ok = sum(1 for s in active if s["health"] != "ok")
    rep.section(f"rpo: {minutes} CT studies of {slices} x 0.5 MiB, one a minute "
                f"(interval {cfg.interval} s, rpo {cfg.rpo} s), {len(active)} polls")
    rep.row("recovery point behind the newest close", f"max {worst:.2f} s  p95 {high:.2f} s  "
            f"median {mid:.2f} s", f"<= {RPO_TARGET:g} s", worst <= RPO_TARGET)
    rep.row("lag_seconds reported by the daemon", f"max {max(lags):.2f} s  median "
            f"{median(lags) or 0:.2f} s; health not ok in {not_ok} polls",
            f"<= {cfg.rpo} s", max(lags) <= cfg.rpo)
    rep.row("after the last close: recovery point passes it",
            f"{caught_up:.2f} s" if caught_up is not None else "-")
    rep.row("writer (info)", f"{writer.written} slices, at most {writer.late * 1e3:.0f} ms "
            f"late; {final['since_mount_cycles']} cycles, "
            f"{mib(final['since_mount_bytes_uploaded']):.0f} MiB uploaded; daemon peak RSS "
            f"{daemon_rss_mib(t)}")
    figures.update(samples=samples, trailing_max=worst, trailing_p95=high, trailing_median=mid,
                   lag_max=max(lags), caught_up_seconds=caught_up, writer_late=writer.late,
                   cycles=final["since_mount_cycles"],
                   bytes_uploaded=final["since_mount_bytes_uploaded"], daemon_rss_kib=t.rss)
    b.drop(t)


# -- part 4: ingest with and without an archive ---------------------------------------------------


@dataclass
class IngestRun:
    mode: str
    writes: float
    replicated: float | None = None  # from the first write until nothing was pending
    cpu_writes: float | None = None
    loadavg: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


MODES = ("none", "file", "s3")
MODE_LABELS = {"none": "no archive", "file": "file:// archive", "s3": "s3 archive"}


def part_ingest(b: Bench, files: list[tuple[str, bytes]], repeat: int, warm_up: bool,
                rep: Report) -> None:
    total = sum(len(d) for _, d in files)
    say(f"\n== ingest: {len(files)} CT slices ({mib(total):.0f} MiB) into mounts without "
        f"archive, with file:// and with s3, {repeat}x (load average {loadavg():.2f})")
    runs: list[IngestRun] = []
    counter = [0]

    def one(mode: str, counted: bool = True) -> IngestRun:
        counter[0] += 1
        name = f"ingest-{counter[0]:02d}-{mode}" + ("" if counted else "-warmup")
        if mode == "none":
            archive = None
        elif mode == "file":
            (b.rundir / (name + "-archive")).mkdir()
            archive = f"file://{b.rundir / (name + '-archive')}"
        else:
            archive = b.s3_url(name)
        t = b.new_fs(name, archive)
        try:
            t.mount()
            if archive:
                t.wait_replicated(60)
            la = loadavg()
            os.sync()
            pid = t.pid()
            spy = PySpy(b.profile_dir, name)
            spy.attach(pid)
            cpu0 = cpu_seconds(pid)
            t0 = time.perf_counter()
            try:
                copy_files(t.path / "incoming", files)
            finally:
                spy.detach()
            res = IngestRun(mode, time.perf_counter() - t0, loadavg=la)
            cpu1 = cpu_seconds(pid)
            if cpu0 is not None and cpu1 is not None:
                res.cpu_writes = cpu1 - cpu0
            if archive:
                waited, _, _ = t.wait_replicated(CATCH_UP_DEADLINE)
                res.replicated = res.writes + waited
            t.umount()
        finally:
            b.drop(t)
            if archive and archive.startswith("file://") and not b.keep:
                shutil.rmtree(archive.removeprefix("file://"), ignore_errors=True)
        extra = "" if res.replicated is None else f", all replicated after {res.replicated:.2f} s"
        say(f"  {name}: writes {res.writes:.2f} s ({total / res.writes / 1e6:.1f} MB/s, "
            f"{len(files) / res.writes:.0f} files/s), daemon CPU {res.cpu_writes or 0:.1f} s"
            f"{extra}  (load {res.loadavg:.2f})")
        return res

    warmup = one("none", counted=False).writes if warm_up else None
    for r in range(repeat):
        for mode in (MODES if r % 2 == 0 else tuple(reversed(MODES))):
            runs.append(one(mode))
    med = {m: median([x.writes for x in runs if x.mode == m]) for m in MODES}
    rep.section(f"ingest {len(files)} x {total / len(files) / MIB:.2f} MiB CT "
                f"(median of {repeat}; writes until the last close)")
    for mode in MODES:
        w = med[mode]
        assert w is not None
        repl = median([x.replicated for x in runs if x.mode == mode and x.replicated])
        cpu = median([x.cpu_writes for x in runs if x.mode == mode and x.cpu_writes is not None])
        extra = "" if repl is None else f"; all replicated after {repl:.2f} s"
        rep.row(f"writes, {MODE_LABELS[mode]}", f"{w:.2f} s  {total / w / 1e6:.1f} MB/s  "
                f"{len(files) / w:.0f} files/s  (daemon CPU {cpu or 0:.1f} s{extra})")
    if warmup is not None:
        rep.row("warm-up, no archive (not counted)", f"{warmup:.2f} s")
    base = med["none"]
    assert base is not None
    ratios = {}
    for mode in ("file", "s3"):
        w = med[mode]
        assert w is not None
        ratios[mode] = base / w
        rep.row(f"throughput {MODE_LABELS[mode]} / none", f"{ratios[mode]:.2f}x")
    rep.data["ingest"] = {"files": len(files), "bytes": total, "repeat": repeat,
                          "runs": [x.as_dict() for x in runs], "median_writes": med,
                          "ratios": ratios, "warmup_writes": warmup}


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench_archive",
        description="Benchmark archive replication of vnafs against SeaweedFS: replication and "
                    "restore throughput vs the plain client, recovery point under a steady "
                    "ingest, ingest cost (run as root).")
    p.add_argument("--size-mib", type=int,
                   help="CT data in the replication backlog, MiB (default 1024; 2 slices/MiB)")
    p.add_argument("--files", type=int, help="CT slices per ingest run (default 2000)")
    p.add_argument("--repeat", type=int,
                   help="runs of replicate and restore, ingest runs per mode (default 2, "
                        "--quick 1)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up ingest before the timed ones")
    p.add_argument("--rpo-minutes", type=int,
                   help="minutes of steady ingest in the rpo part (default 5)")
    p.add_argument("--study-slices", type=int, default=300,
                   help="slices per one-minute study in the rpo part (default 300)")
    p.add_argument("--py-spy", metavar="DIR",
                   help="record py-spy profiles of the drain, the restore and the ingest "
                        "writes into DIR")
    p.add_argument("--no-index", action="store_true",
                   help="make every store with [dicom] index = false (default: on, as mkfs)")
    args = parse_run_args(p, argv, default_dir=DEFAULT_DIR, names=PARTS,
                          quick_help="256 MiB, 500 ingest files, 1 run per mode, 2 rpo minutes",
                          default_sizes=DEFAULT_SIZES, quick_sizes=QUICK_SIZES,
                          positive=("study_slices",))
    if "restore" in args.only and "replicate" not in args.only:
        args.only.append("replicate")  # restore reads the archive replicate makes
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exe = preflight("bench_archive")
    if exe is None:
        return 2
    if not Path(sys.executable).with_name("weed").exists():
        say("SeaweedFS (weed) is not installed beside the Python interpreter (make venv)")
        return 2
    slices = args.size_mib * SLICES_PER_MIB if "replicate" in args.only else 0
    n_src = max(slices, args.files if "ingest" in args.only else 0)
    # Sources, hot stores, the restored copy and the objects in SeaweedFS (3 copies of the
    # backlog: vnafs and two plain runs), the rpo data, one ingest store + archive at a time.
    need = (n_src * 0.55 * MIB * 1.5 + slices * 0.2 * MIB * (5 * args.repeat + 2)
            + args.rpo_minutes * args.study_slices * 0.3 * MIB * 3 + args.files * 0.2 * MIB * 8)
    run_dir = RunDir.create(args.dir, need)
    if run_dir is None:
        return 2
    info = banner("vnafs archive benchmark", run_dir)
    say(f"sizes: replicate {args.size_mib} MiB ({slices} slices) and restore x {args.repeat}; "
        f"ingest {args.files} slices x {args.repeat} per mode; rpo {args.rpo_minutes} min of "
        f"{args.study_slices} slices; "
        f"parts {','.join(p for p in PARTS if p in args.only)}; DICOM index "
        f"{'off' if args.no_index else 'on'}")

    rep = Report()
    profile_dir = Path(args.py_spy).resolve() if args.py_spy else None
    seaweed: SeaweedFS | None = None
    b: Bench | None = None
    interrupted = False
    started = time.perf_counter()
    with sigterm_as_interrupt():
        try:
            seaweed = SeaweedFS(run_dir.path / "seaweedfs")
            seaweed.start()
            seaweed.create_bucket(BUCKET)
            bench = b = Bench(run_dir.path, exe, args.keep, seaweed, profile_dir,
                              dicom_index=not args.no_index)
            say(f"SeaweedFS (weed mini) pid {b.weed_pid()} at {seaweed.endpoint}, "
                f"bucket {BUCKET}")
            files: list[tuple[str, bytes]] = []
            if n_src:
                src = run_dir.path / "src-ct"
                t0 = time.perf_counter()
                write_ct_series(src, seed=SEED, count=n_src)
                files = load_sources(src)  # kept on disk until the end: see part_restore's note
                say(f"generated {len(files)} CT slices, "
                    f"{mib(sum(len(d) for _, d in files)):.0f} MiB, in "
                    f"{time.perf_counter() - t0:.1f} s (not timed); held in memory")
            archived: list[Archived] = []

            def do_replicate() -> None:
                archived.append(part_replicate(bench, files[:slices], args.repeat, rep))

            def do_restore() -> None:
                if not archived:
                    raise BenchError("no archive to restore: the replicate part failed")
                part_restore(bench, archived[0], args.repeat, rep)

            parts: dict[str, Callable[[], None]] = {
                "replicate": do_replicate,
                "restore": do_restore,
                "rpo": lambda: part_rpo(bench, args.rpo_minutes, args.study_slices, rep),
                "ingest": lambda: part_ingest(bench, files[:args.files], args.repeat,
                                              not args.no_warmup, rep),
            }
            for name in PARTS:
                if name not in args.only:
                    continue
                try:
                    run_part(name, parts[name], rep)
                finally:
                    bench.sample_weed()
                if name == "restore" or "restore" not in args.only:
                    for t in [*bench.later, *(a.target for a in archived)]:
                        bench.drop(t)
                    bench.later.clear()
                    archived.clear()
        except KeyboardInterrupt:
            interrupted = True
            say("\ninterrupted: unmounting, stopping SeaweedFS and cleaning up")
        except FAILURES as exc:
            rep.errors.append(f"setup: {exc}")
            say(f"FAILED: {exc}")
        finally:
            with signals_ignored():
                if b is not None:
                    for t in reversed(b.targets):
                        t.cleanup()
                    if seaweed is not None:
                        b.stop_weed()
                elif seaweed is not None:
                    seaweed.stop()
                run_dir.remove(args.keep)

    elapsed = time.perf_counter() - started
    weed_peak = max(b.weed_hwm_kib, default=None) if b is not None else None
    daemon_peak = max((t.peak_rss_kib or 0 for t in b.targets), default=0) if b else 0
    rep.section("servers")
    rep.row("SeaweedFS (weed mini) peak RSS",
            "-" if weed_peak is None else f"{weed_peak / 1024:.0f} MiB (VmHWM)")
    rep.row("vnafs daemon peak RSS", "-" if not daemon_peak
            else f"{daemon_peak / 1024:.0f} MiB (VmHWM, highest daemon)")
    return conclude(rep, args, machine=info, elapsed=elapsed, interrupted=interrupted,
                    units="MiB/s = 2^20 B/s of sealed block bytes unless marked CT data; "
                    "MB/s = 10^6 B/s",
                    extra={"weed_vmhwm_kib": b.weed_hwm_kib if b else [],
                           "daemon_vmhwm_kib": daemon_peak})


if __name__ == "__main__":
    sys.exit(main())
