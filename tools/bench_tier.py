"""Benchmark of tiering: cold recall, time to first byte, reads during an outage, eviction.

Why it exists. Tiering (docs/architecture.md section 11) makes the hot store a bounded cache
over the archive, and its promise is that this costs nothing one can feel: a study read back
from the archive comes about as fast as the object store can deliver it, the first byte of an
evicted file waits barely longer than one GET, files still in the hot store are read at full
speed while the archive hangs, and eviction keeps pace without slowing the ingest. The targets
are stated relative to what the object store and the same client library do without vnafs,
measured in the same run against the same server, so the figures say what vnafs adds on top
of the network and the server: cold recall at least 0.9x the throughput of plain GETs of the
very same objects, first byte of an evicted file less than 20 ms after one plain GET, resident
reads while 20 recalls hang at least 0.9x of the idle rate. Everything runs on real mounts made
with the real CLI (`vnafs keygen/mkfs/mount/umount/evict/recall`), against one SeaweedFS
(`weed mini`, tools/servers.py) on 127.0.0.1 that this tool starts and stops.

What it does, under --dir (default /var/tmp/vnafs-bench-tier, one disk for everything). The
parts recall, ttfb and outage share one store with an s3 archive (`[archive] interval = 1`,
`[tiering] min_age = 0`, `recall_timeout = 60`, `prefetch_priors = 0`) that holds one CT study
of --size-mib (1024) of 0.5 MiB slices from tools/gen_studies.write_ct_series (2 slices per
MiB, one block each), copied in and waited for until it is indexed and replicated (nothing
pending); the study's sealed blocks are its hot store's `blocks/` files, which must match the
archive's `blocks/` listing.

1. recall: `vnafs evict MNT --study UID`, then `vnafs umount`, drop_caches, `vnafs mount`, and
   every file of the study is read like `cat` (open, 1 MiB reads until EOF, close), one after
   another in path order, each checked against the SHA-256 of what was written (hashing is not
   timed). `[tiering] read_ahead_studies` is on (the default): the first read that waits on
   the archive queues a background recall of the rest of the study; parts 2 and 3 turn it off,
   since they time one recall and need each hanging reader on a file of its own. Baseline: a plain GET (obstore through `open_backend`, as the daemon uses) of every
   block object of the study, 8 threads (the 8 blocks of sequential readahead vnafs keeps in
   flight inside a file), each written to a file, then one `sync`. vnafs and the baseline
   alternate (vnafs first in even runs), --repeat times (2); the ratio is of the median times
   (the same objects either way, so a time ratio is a throughput ratio). For information, once
   after the others: the same GETs with 1 thread (what a reader that fetches one block at a
   time can get: each slice is one block, so the readahead inside a file has nothing to do),
   the vnafs read (evict, remount) by 8 readers at once, file i by reader i mod 8, each file
   read whole into memory and checked after the clock stops; and the sequential read once
   more after a remount, with the study resident again (recalled blocks are kept), for what
   the per-file path costs without the archive.
2. ttfb: the study evicted again, remount and drop_caches, then --ttfb-files (20) files spread
   evenly over the study, one at a time: `stat` (not timed: a viewer found it by listing), then
   open + read(4096) + close timed, the 4096 bytes checked. Each is followed (or, every other
   time, preceded) by one timed plain GET of a whole block object of the study (a recall
   fetches the whole block) and one of its first 4 KiB (information). Medians, and the
   difference of the medians against the target.
3. outage: a resident file of --resident-mib (512) of tools.bench's CT-like 1 MiB chunks is
   written into the same store (tools/harness.wl_write) and replicated, the study evicted, the
   store remounted and the file read once (not timed). Then, --repeat times, alternating:
   idle, the file read cold (drop_caches; 1 MiB reads, SHA-256 checked, harness.wl_read; the
   file is larger than the daemon's 128 MiB block cache, whose LRU a sequential read therefore
   always misses, so every block comes from the hot store); blocked, SeaweedFS suspended with
   SIGSTOP (by its PID: connections hang as on a dead network), --blocked (20) threads each
   reading a different evicted file of the study until all 20 files show
   `user.vnafs.state = recalling`, then the same cold read of the resident file, then SIGCONT.
   The blocked readers must still be waiting when the read ends (checked), and are joined
   after the server is resumed (they finish, or fail with EIO; counted). The ratio is of the
   median throughputs.
4. evict: a second store, same settings, with --studies (20) CT studies of --study-mib (20)
   each (new patient and study per seed), indexed and replicated. Eviction rate: `vnafs evict
   MNT --study UID --json` for each study, one after another (each command reads and
   authenticates the archive copy of every block, commits, deletes the files), timed in all;
   studies/s and MiB/s of CT data and of sealed bytes freed. Cost to an ingest: --ingest-files
   (400) CT slices of a new study per run (read into memory first) copied file by file (open,
   one write, close) into the store, alone, and while the same eviction loop runs in a thread
   (started just before), --repeat times each in alternating order (alone first in even runs)
   after one uncounted warm-up ingest. Between runs everything is replicated and indexed, and
   the studies are brought back with `vnafs recall --study UID` for each (queued; timed until
   the status's scan of the block records counts no evicted byte, information). The eviction
   loop runs alone once before the ingests and once after; its rate is the median of those
   two, and the overlap of each concurrent loop with its ingest is shown. What the command
   itself costs (Python start-up, one control request) is shown from 5 refused `vnafs evict`
   of an unknown UID, and the rate without it.

How to read the output. Times are wall clock (time.perf_counter); MiB/s is 2^20 bytes per second
of sealed (compressed and encrypted) block bytes, "CT data" marks 2^20 bytes of file content
per second; ratios are vnafs / plain throughput (1.0 = as fast as the bare client). "CPU" is
user + system time from /proc/PID/stat (the vnafs daemon, weed) or os.times (this process, for
the plain client). The load average is printed per part: on two shared cores every figure moves
by 10-30 % with other work, so compare ratios from one run. Speed is measured, never asserted:
a missed target is a row marked MISS, not a failure.

Run it as root from the repository root with the project's virtualenv:

    .venv/bin/python -m tools.bench_tier [--quick] [--only recall,ttfb,outage,evict]
                                         [--json FILE] [--dir DIR]

--quick uses a 256 MiB study, a 256 MiB resident file, 10 studies of 10 MiB, 200 ingest files
and one run of everything. --py-spy DIR records py-spy profiles (raw collapsed stacks) of the
daemon during the cold recall reads and the blocked resident reads; they perturb the timings,
so leave it off for figures. Every mount is unmounted and SeaweedFS resumed and stopped (by its
PID) on exit, also on Ctrl-C or SIGTERM, and the work directory is removed unless --keep is
given. Exit status: 0 when every part ran, 1 when one failed (the reason is printed under the
table), 2 for a usage problem, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
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

from tools.bench_archive import ArchiveTarget, PySpy, block_files, copy_files, mib, own_cpu, rate
from tools.gen_studies import CHUNK, CtData, write_ct_series
from tools.harness import (
    FAILURES,
    MIB,
    BenchError,
    RunDir,
    banner,
    cpu_seconds,
    drop_caches,
    load_sources,
    loadavg,
    parse_run_args,
    preflight,
    run_part,
    signals_ignored,
    sigterm_as_interrupt,
    vm_hwm_kib,
    wl_read,
    wl_write,
)
from tools.report import Report, conclude, median, p95, say
from tools.servers import SeaweedFS
from vnafs import config as config_mod
from vnafs.archive.backend import Backend, open_backend
from vnafs.control import control_request

DEFAULT_DIR = "/var/tmp/vnafs-bench-tier"
PARTS = ("recall", "ttfb", "outage", "evict")
DEFAULT_SIZES = {"size_mib": 1024, "repeat": 2, "ttfb_files": 20, "resident_mib": 512,
                 "blocked": 20, "studies": 20, "study_mib": 20, "ingest_files": 400}
QUICK_SIZES = {"size_mib": 256, "repeat": 1, "ttfb_files": 20, "resident_mib": 256,
               "blocked": 20, "studies": 10, "study_mib": 10, "ingest_files": 200}
SLICES_PER_MIB = 2  # write_ct_series makes 512 x 512 x 16-bit slices, 0.5 MiB of pixels
SEED = 20241201
BUCKET = "vnafs-bench"
RECALL_TARGET = 0.9  # cold recall / plain GET throughput, at least
TTFB_TARGET = 0.020  # first byte of an evicted file minus one plain GET, seconds, less than
OUTAGE_TARGET = 0.9  # resident read throughput with recalls blocked / idle, at least
GET_THREADS = 8  # READAHEAD_BLOCKS of vnafs/fs/files.py: blocks a sequential reader has ahead
RECALL_TIMEOUT = 60  # [tiering] recall_timeout: the blocked readers must outlast a measurement
ARCHIVE_SETTINGS = {"interval": 1}
TIERING_SETTINGS = {"min_age": 0, "recall_timeout": RECALL_TIMEOUT, "prefetch_priors": 0}
HEAD = 4096  # bytes of the time-to-first-byte read
REPLICATE_DEADLINE = 600.0  # seconds for a backlog to be shipped
BLOCKED_DEADLINE = 20.0  # seconds for the blocked readers to show `recalling`
RESIDENT_DEADLINE = 120.0  # seconds for recalled blocks to be recorded resident


# -- the file systems -----------------------------------------------------------------------------


class TierTarget(ArchiveTarget):
    """A vnafs file system with an s3 archive and `[tiering]` settings for benchmarks."""

    def __init__(self, root: Path, exe: str, *, archive: str, env: dict[str, str],
                 tiering: dict[str, int]) -> None:
        super().__init__(root, exe, archive=archive, env=env, settings=dict(ARCHIVE_SETTINGS))
        self.tiering_settings = dict(tiering)

    def create(self) -> None:
        super().create()
        self.set_tiering(**self.tiering_settings)

    def set_tiering(self, **settings: int | bool) -> None:
        """Write `[tiering]` settings into vnafs.toml; they apply at the next mount."""
        cfg = config_mod.load(self.hot)
        for key, value in settings.items():
            if not hasattr(cfg.tiering, key):
                raise BenchError(f"no tiering setting {key!r}")
            setattr(cfg.tiering, key, value)
        (self.hot / config_mod.CONFIG_NAME).write_text(cfg.to_toml())
        got = config_mod.load(self.hot).tiering
        if any(getattr(got, k) != v for k, v in settings.items()):
            raise BenchError(f"setting {settings} in {self.hot}/vnafs.toml did not take")

    def tiering(self) -> dict[str, Any]:
        return dict(self.status()["tiering"])

    def index_wait(self) -> None:
        """Until the daemon has indexed every closed file (bounded)."""
        for _ in range(20):
            reply = control_request(self.hot, {"op": "index_wait", "timeout": 25}, 60)
            if reply["pending"] == 0:
                return
        raise BenchError("the DICOM index did not catch up within 500 s")

    def settle(self) -> None:
        """Indexed and replicated: nothing the next measurement would compete with."""
        self.index_wait()
        self.wait_replicated(REPLICATE_DEADLINE)

    def evict_study(self, uid: str) -> dict[str, Any]:
        """`vnafs evict MNT --study UID --json`: units, blocks, bytes_freed."""
        return dict(json.loads(self.vnafs("evict", "--json", str(self.path), "--study", uid,
                                          timeout=1800)))

    def queue_recall(self, uid: str) -> None:
        """`vnafs recall MNT --study UID`: queued, not waited for (`--wait` polls every 0.5 s,
        which would be most of what it measures); wait_resident() waits."""
        self.vnafs("recall", str(self.path), "--study", uid)

    def wait_resident(self) -> dict[str, Any]:
        """Until no block is evicted (recalled blocks are recorded in batches). Asks the
        status's scan of the block records (top-level `evicted_bytes`): `tiering` has an
        `evicted_bytes` too, but the daemon overwrites it with the bytes evicted since the
        mount (`Tierer.stats` is merged over it), which a recall never lowers."""
        deadline = time.monotonic() + RESIDENT_DEADLINE
        while True:
            st = self.status()
            if not st["evicted_bytes"]:
                return st
            if time.monotonic() > deadline:
                raise BenchError(f"{st['evicted_bytes']} bytes still counted evicted "
                                 f"{RESIDENT_DEADLINE:.0f} s after the recall")
            time.sleep(0.1)

    def cold_remount(self) -> None:
        """Nothing cached: not the kernel's page cache, not the daemon's block cache."""
        self.umount()
        drop_caches()
        self.mount()


def state_of(path: Path) -> str:
    return os.getxattr(path, "user.vnafs.state").decode()


@dataclass
class Bench:
    """The run: where file systems go, the SeaweedFS server, and what to clean up."""

    rundir: Path
    exe: str
    keep: bool
    seaweed: SeaweedFS
    profile_dir: Path | None
    targets: list[TierTarget] = field(default_factory=list)
    weed_hwm_kib: list[int] = field(default_factory=list)
    prefixes: int = 0
    suspended: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.seaweed.env()}

    def s3_url(self, name: str) -> str:
        self.prefixes += 1
        return self.seaweed.url(BUCKET, f"{self.prefixes:02d}-{name}")

    def s3(self, url: str) -> Backend:
        return open_backend(url, env=self.seaweed.env())

    def new_fs(self, name: str) -> TierTarget:
        t = TierTarget(self.rundir / name, self.exe, archive=self.s3_url(name), env=self.env,
                       tiering=TIERING_SETTINGS)
        self.targets.append(t)
        t.create()
        return t

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

    def suspend_weed(self) -> None:
        """SIGSTOP SeaweedFS by its PID: the archive stops answering, connections hang."""
        pid = self.weed_pid()
        if pid is None:
            raise BenchError("SeaweedFS is not running")
        self.suspended = True
        os.kill(pid, signal.SIGSTOP)

    def resume_weed(self) -> None:
        pid = self.weed_pid()
        if self.suspended and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.suspended = False

    def stop_weed(self) -> None:
        self.resume_weed()
        self.sample_weed()
        self.seaweed.stop()


def daemon_cpu(t: TierTarget) -> float:
    return cpu_seconds(t.pid()) or 0.0


# -- the study store (recall, ttfb, outage) -------------------------------------------------------


@dataclass
class StudyFile:
    rel: str  # path below the mount
    sha256: str
    size: int
    head: bytes  # the first HEAD bytes


@dataclass
class Study:
    """The store the first three parts share, and what was written into it."""

    target: TierTarget
    url: str
    uid: str
    files: list[StudyFile]
    blocks: list[tuple[str, int]]  # archive object name, size
    data_bytes: int
    setup: dict[str, float]

    @property
    def block_bytes(self) -> int:
        return sum(s for _, s in self.blocks)

    def evict(self) -> dict[str, Any]:
        """Evict the whole study (after waiting until nothing is pending: a read moved atimes)."""
        t = self.target
        t.wait_replicated(REPLICATE_DEADLINE)
        rep = t.evict_study(self.uid)
        for f in (self.files[0], self.files[len(self.files) // 2], self.files[-1]):
            st = state_of(t.path / f.rel)
            if st != "evicted":
                raise BenchError(f"{f.rel} is {st!r} after vnafs evict --study, not evicted")
        return rep


def make_study(b: Bench, size_mib: int) -> Study:
    slices = size_mib * SLICES_PER_MIB
    src = b.rundir / "src-study"
    t0 = time.perf_counter()
    written = write_ct_series(src, seed=SEED, count=slices)
    uids = {g.study_uid for g in written}
    if len(uids) != 1:
        raise BenchError(f"write_ct_series made {len(uids)} studies, expected one")
    data = load_sources(src)  # the sources stay on disk until the end (see bench_archive)
    gen = time.perf_counter() - t0
    files = [StudyFile(f"study/{rel}", hashlib.sha256(d).hexdigest(), len(d), d[:HEAD])
             for rel, d in data]
    total = sum(f.size for f in files)
    say(f"generated {len(files)} CT slices, {mib(total):.0f} MiB, in {gen:.1f} s (not timed)")
    t = b.new_fs("study")
    t.mount()
    t.wait_replicated(60)
    t0 = time.perf_counter()
    copy_files(t.path / "study", data)
    copied = time.perf_counter() - t0
    del data
    t0 = time.perf_counter()
    t.settle()
    settled = time.perf_counter() - t0
    blocks = [(name, size) for name, _, size in block_files(t.hot)]
    listed = sorted(b.s3(t.archive or "").list("blocks/"))
    if listed != blocks:
        raise BenchError(f"the archive lists {len(listed)} block objects, the hot store holds "
                         f"{len(blocks)} block files (or they differ)")
    study = Study(t, t.archive or "", uids.pop(), files, blocks, total,
                  {"generate": gen, "copy": copied, "index_and_replicate": settled})
    say(f"study store: {len(files)} files copied in {copied:.1f} s, indexed and replicated "
        f"{settled:.1f} s later; {len(blocks)} blocks, {mib(study.block_bytes):.1f} MiB sealed")
    return study


# -- plain client baselines -----------------------------------------------------------------------


@dataclass
class PlainRun:
    seconds: float
    nbytes: int
    objects: int
    threads: int
    cpu_client: float
    cpu_weed: float

    @property
    def mib_s(self) -> float:
        return rate(self.nbytes, self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "mib_s": self.mib_s}


def plain_get_files(b: Bench, url: str, blocks: list[tuple[str, int]], to: Path,
                    threads: int) -> PlainRun:
    """GET every object of `blocks` under `url`, `threads` at a time, each written to a file
    of the same name under `to`, then one sync: the bytes a recall must fetch and keep."""
    backend = b.s3(url)
    for sub in {name.rsplit("/", 1)[0] for name, _ in blocks}:
        (to / sub).mkdir(parents=True, exist_ok=True)

    def get(item: tuple[str, int]) -> int:
        name, size = item
        data = backend.get_view(name)
        if len(data) != size:
            raise BenchError(f"{name}: got {len(data)} bytes, expected {size}")
        with open(to / name, "wb") as f:
            f.write(data)
        return len(data)

    c0, w0 = own_cpu(), b.weed_cpu()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        total = sum(pool.map(get, blocks))
    os.sync()
    seconds = time.perf_counter() - t0
    return PlainRun(seconds, total, len(blocks), threads, own_cpu() - c0, b.weed_cpu() - w0)


# -- part 1: cold recall of a study ---------------------------------------------------------------


@dataclass
class RecallRun:
    seconds: float  # reading every file, hashing excluded
    data_bytes: int
    block_bytes: int
    evict_seconds: float  # the `vnafs evict --study` command (information)
    recalls: int  # blocks the daemon fetched from the archive during the read
    latency_p50: float | None  # the daemon's recall latency (fetch, authenticate, store)
    ttfb_p50: float | None  # the daemon's time to first byte of recalled blocks
    cpu_daemon: float
    cpu_weed: float
    cpu_reader: float

    @property
    def mib_s(self) -> float:
        return rate(self.block_bytes, self.seconds)

    @property
    def data_mb_s(self) -> float:
        return self.data_bytes / 1e6 / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "mib_s": self.mib_s, "data_mb_s": self.data_mb_s}


def read_files(top: Path, files: list[StudyFile]) -> float:
    """`cat` of every file in order: open, CHUNK reads until EOF, close; each checked against
    its SHA-256 (hashing is not timed). Seconds."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    excluded = 0.0
    t0 = time.perf_counter()
    for f in files:
        h = hashlib.sha256()
        total = 0
        with open(top / f.rel, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                g0 = time.perf_counter()
                h.update(view[:n])
                total += n
                excluded += time.perf_counter() - g0
        if total != f.size or h.hexdigest() != f.sha256:
            raise BenchError(f"{f.rel}: read back {total} bytes that differ from the "
                             f"{f.size} written")
    return time.perf_counter() - t0 - excluded


def read_files_parallel(top: Path, files: list[StudyFile], threads: int) -> float:
    """The same reads by `threads` readers at once (file i by reader i mod `threads`), each
    file read whole into memory; checked after the clock stops. Seconds."""
    def read(f: StudyFile) -> bytes:
        with open(top / f.rel, "rb", buffering=0) as fh:
            return fh.read()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        contents = list(pool.map(read, files))
    seconds = time.perf_counter() - t0
    for f, data in zip(files, contents, strict=True):
        if len(data) != f.size or hashlib.sha256(data).hexdigest() != f.sha256:
            raise BenchError(f"{f.rel}: read back {len(data)} bytes that differ from the "
                             f"{f.size} written")
    return seconds


def recall_once(b: Bench, s: Study, run: int, readers: int = 1) -> RecallRun:
    t = s.target
    t0 = time.perf_counter()
    rep = s.evict()
    evict_s = time.perf_counter() - t0
    if rep["blocks"] != len(s.blocks) and run == 1:
        say(f"  note: vnafs evict --study evicted {rep['blocks']} blocks of {len(s.blocks)}")
    t.cold_remount()
    before = t.tiering()
    pid = t.pid()
    spy = PySpy(b.profile_dir if readers == 1 else None, f"recall-read-{run}")
    spy.attach(pid)
    c_d, c_w, c_r = daemon_cpu(t), b.weed_cpu(), own_cpu()
    try:
        seconds = (read_files(t.path, s.files) if readers == 1
                   else read_files_parallel(t.path, s.files, readers))
    finally:
        spy.detach()
    cpu = (daemon_cpu(t) - c_d, b.weed_cpu() - c_w, own_cpu() - c_r)
    after = t.tiering()
    recalls = after["recall"]["recalls"] - before["recall"]["recalls"]
    # With read-ahead of studies a block can be fetched twice (a reader and the background
    # recall racing for it): more recalls than blocks cost GETs and are shown, never fewer.
    if recalls < len(s.blocks):
        raise BenchError(f"the read recalled {recalls} blocks, the study has {len(s.blocks)}")
    if recalls > len(s.blocks):
        say(f"  note: {recalls - len(s.blocks)} blocks were fetched twice")
    res = RecallRun(seconds, s.data_bytes, s.block_bytes, evict_s, recalls,
                    after["recall"]["latency_p50_s"], after["time_to_first_byte_p50_s"],
                    cpu[0], cpu[1], cpu[2])
    t.wait_resident()
    how = "" if readers == 1 else f", {readers} readers"
    say(f"  run {run}{how}: vnafs cold read {seconds:.2f} s, {res.mib_s:.1f} MiB/s sealed "
        f"({res.data_mb_s:.0f} MB/s CT data), {recalls} recalls, recall p50 "
        f"{ms(res.latency_p50)}; daemon CPU {cpu[0]:.1f} s, weed {cpu[1]:.1f} s (evict "
        f"{evict_s:.1f} s)")
    return res


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f} ms"


def part_recall(b: Bench, s: Study, repeat: int, rep: Report) -> None:
    say(f"\n== recall: cold read of a {len(s.files)}-file study ({mib(s.data_bytes):.0f} MiB "
        f"CT, {mib(s.block_bytes):.1f} MiB sealed) vs plain GET, {repeat}x (load average "
        f"{loadavg():.2f})")
    runs: list[RecallRun] = []
    plain: list[PlainRun] = []
    counter = [0]

    def get(threads: int) -> PlainRun:
        counter[0] += 1
        res = plain_get_files(b, s.url, s.blocks, b.rundir / f"plain-get-{counter[0]}", threads)
        say(f"  plain GET to files, {threads} thread(s): {res.seconds:.2f} s, "
            f"{res.mib_s:.1f} MiB/s")
        return res

    for r in range(repeat):
        if r % 2 == 0:
            runs.append(recall_once(b, s, r + 1))
            plain.append(get(GET_THREADS))
        else:
            plain.append(get(GET_THREADS))
            runs.append(recall_once(b, s, r + 1))
    single = get(1)
    parallel = recall_once(b, s, repeat + 1, readers=GET_THREADS)
    # The study is resident again (every recalled block was kept): the same cold read without
    # the archive, for what the per-file path costs by itself.
    t = s.target
    t.wait_replicated(REPLICATE_DEADLINE)
    t.cold_remount()
    c0 = daemon_cpu(t)
    resident = read_files(t.path, s.files)
    resident_cpu = daemon_cpu(t) - c0
    say(f"  vnafs cold read of the resident study: {resident:.2f} s, daemon CPU "
        f"{resident_cpu:.1f} s")
    secs = median([x.seconds for x in runs])
    plain_secs = median([p.seconds for p in plain])
    assert secs is not None and plain_secs is not None
    ratio = plain_secs / secs
    rep.section(f"recall: cold read of one study, {len(s.files)} files, "
                f"{mib(s.data_bytes):.0f} MiB CT = {len(s.blocks)} blocks, "
                f"{mib(s.block_bytes):.1f} MiB sealed (median of {repeat})")
    rep.row("vnafs: evict, remount, read every file", f"median {rate(s.block_bytes, secs):.1f} "
            f"MiB/s, {s.data_bytes / 1e6 / secs:.0f} MB/s CT data  (runs: "
            + ", ".join(f"{x.seconds:.2f} s" for x in runs) + ")")
    rep.row("vnafs: per block (daemon's own count)", f"recall p50 "
            f"{ms(median([x.latency_p50 for x in runs if x.latency_p50 is not None]))}, "
            f"time to first byte p50 "
            f"{ms(median([x.ttfb_p50 for x in runs if x.ttfb_p50 is not None]))}; "
            f"{secs / len(s.blocks) * 1e3:.2f} ms per file for the reader")
    rep.row("vnafs: CPU during the read", f"daemon {median([x.cpu_daemon for x in runs]):.1f} s"
            f", weed {median([x.cpu_weed for x in runs]):.1f} s, reader "
            f"{median([x.cpu_reader for x in runs]):.1f} s")
    rep.row(f"plain GET to files + sync, {GET_THREADS} threads",
            f"median {rate(s.block_bytes, plain_secs):.1f} MiB/s  (runs: "
            + ", ".join(f"{p.seconds:.2f} s" for p in plain)
            + f"; CPU client {median([p.cpu_client for p in plain]):.1f} s, weed "
            f"{median([p.cpu_weed for p in plain]):.1f} s)")
    rep.row("cold recall / plain GET", f"{ratio:.2f}x", f">= {RECALL_TARGET}x",
            ratio >= RECALL_TARGET)
    rep.row("plain GET to files + sync, 1 thread (info)", f"{single.mib_s:.1f} MiB/s  "
            f"({single.seconds:.2f} s, {single.seconds / len(s.blocks) * 1e3:.2f} ms per "
            f"object); cold recall / this: {single.seconds / secs:.2f}x")
    rep.row(f"vnafs: the same with {GET_THREADS} readers at once (info)",
            f"{parallel.mib_s:.1f} MiB/s, {parallel.data_mb_s:.0f} MB/s CT data  "
            f"({parallel.seconds:.2f} s); / plain GET {plain_secs / parallel.seconds:.2f}x")
    rep.row("vnafs: the same read, study resident (info)", f"{resident:.2f} s, "
            f"{s.data_bytes / 1e6 / resident:.0f} MB/s CT data, "
            f"{resident / len(s.files) * 1e3:.2f} ms per file; daemon CPU {resident_cpu:.1f} s")
    n = len(s.files)
    rep.row("per file: recall - resident read (info)", f"{(secs - resident) / n * 1e3:.2f} ms "
            f"(one plain GET to a file, 1 thread: {single.seconds / n * 1e3:.2f} ms; "
            f"{GET_THREADS} threads: {plain_secs / n * 1e3:.2f} ms per object)")
    rep.row("vnafs evict --study of the whole study (info)", ", ".join(
        f"{x.evict_seconds:.2f} s" for x in runs))
    rep.data["recall"] = {"files": len(s.files), "data_bytes": s.data_bytes,
                          "blocks": len(s.blocks), "block_bytes": s.block_bytes,
                          "runs": [x.as_dict() for x in runs],
                          "plain": [p.as_dict() for p in plain],
                          "plain_1_thread": single.as_dict(),
                          "parallel_readers": parallel.as_dict(),
                          "resident_seconds": resident, "resident_cpu": resident_cpu,
                          "median_seconds": secs,
                          "plain_median_seconds": plain_secs, "ratio": ratio}


# -- part 2: time to first byte -------------------------------------------------------------------


def part_ttfb(b: Bench, s: Study, count: int, rep: Report) -> None:
    say(f"\n== ttfb: open + read({HEAD}) of {count} evicted files vs one plain GET each "
        f"(load average {loadavg():.2f})")
    t = s.target
    # One recall's latency: the read-ahead of the rest of the study would make the later
    # files resident before they are timed.
    t.set_tiering(read_ahead_studies=False)
    s.evict()
    t.cold_remount()
    n = len(s.files)
    picks = [s.files[i * n // count] for i in range(count)]
    names = [s.blocks[(i * len(s.blocks)) // count][0] for i in range(count)]
    backend = b.s3(s.url)
    for f in picks:
        os.stat(t.path / f.rel)  # found by a listing: lookups are metadata, never recalls
    first: list[float] = []
    whole: list[float] = []
    ranged: list[float] = []

    def vnafs_read(f: StudyFile) -> None:
        t0 = time.perf_counter()
        fd = os.open(t.path / f.rel, os.O_RDONLY)
        try:
            got = os.read(fd, HEAD)
            first.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
        if got != f.head:
            raise BenchError(f"{f.rel}: the first {HEAD} bytes differ from what was written")

    def plain_get(name: str) -> None:
        t0 = time.perf_counter()
        data = backend.get(name)
        whole.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        part = backend.get_range(name, 0, HEAD)
        ranged.append(time.perf_counter() - t0)
        if len(part) != HEAD or data[:HEAD] != part:
            raise BenchError(f"{name}: the ranged GET does not match the whole object")

    for i, (f, name) in enumerate(zip(picks, names, strict=True)):
        if i % 2 == 0:
            vnafs_read(f)
            plain_get(name)
        else:
            plain_get(name)
            vnafs_read(f)
    st = t.tiering()
    med_v, med_g, med_r = median(first), median(whole), median(ranged)
    assert med_v is not None and med_g is not None and med_r is not None
    diff = med_v - med_g
    rep.section(f"ttfb: {count} evicted files, one at a time, after a remount")
    rep.row("vnafs: open + read(4096) + close", f"median {ms(med_v)}  p95 {ms(p95(first))}  "
            f"max {ms(max(first))}")
    rep.row("vnafs: the daemon's own count", f"time to first byte p50 "
            f"{ms(st['time_to_first_byte_p50_s'])}, recall p50 "
            f"{ms(st['recall']['latency_p50_s'])}")
    rep.row("plain GET of one whole block object", f"median {ms(med_g)}  p95 {ms(p95(whole))}"
            f"  (block objects {mib(median([float(sz) for _, sz in s.blocks]) or 0) * 1024:.0f}"
            " KiB median)")
    rep.row("plain GET of its first 4 KiB (info)", f"median {ms(med_r)}  p95 {ms(p95(ranged))}")
    rep.row("first byte - plain GET (medians)", f"{diff * 1e3:+.1f} ms",
            f"< {TTFB_TARGET * 1e3:.0f} ms", diff < TTFB_TARGET)
    rep.data["ttfb"] = {"files": count, "vnafs_seconds": first, "get_seconds": whole,
                        "get_range_seconds": ranged, "median_vnafs": med_v,
                        "median_get": med_g, "median_get_range": med_r, "difference": diff,
                        "daemon_ttfb_p50": st["time_to_first_byte_p50_s"],
                        "daemon_recall_p50": st["recall"]["latency_p50_s"]}


# -- part 3: resident reads while recalls hang ----------------------------------------------------


@dataclass
class BlockedReader:
    path: Path
    size: int
    sha256: str
    outcome: str = "waiting"  # ok | EIO | error: ...
    finished: float | None = None  # time.perf_counter() when it returned

    def run(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            ok = len(data) == self.size and hashlib.sha256(data).hexdigest() == self.sha256
            self.outcome = "ok" if ok else "error: wrong content"
        except OSError as exc:
            self.outcome = "EIO" if exc.errno == errno.EIO else f"error: {exc}"
        except BaseException as exc:  # reported by the main thread
            self.outcome = f"error: {exc!r}"
        finally:
            self.finished = time.perf_counter()


@dataclass
class OutageRun:
    mode: str  # idle | blocked
    seconds: float
    nbytes: int
    cpu_daemon: float
    blocks_loaded: int
    cache_hits: int
    waited: float = 0.0  # until every blocked reader showed `recalling`
    still_blocked: int = 0  # blocked readers still waiting when the read ended
    outcomes: dict[str, int] = field(default_factory=dict)
    join_seconds: float = 0.0  # from SIGCONT until every blocked reader returned

    @property
    def mb_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "mb_s": self.mb_s}


def part_outage(b: Bench, s: Study, repeat: int, resident_mib: int, blocked: int,
                rep: Report) -> None:
    say(f"\n== outage: cold read of a {resident_mib} MiB resident file, idle and while "
        f"{blocked} reads of evicted files hang on a suspended archive, {repeat}x each (load "
        f"average {loadavg():.2f})")
    if len(s.files) < repeat * blocked:
        raise BenchError(f"the study has {len(s.files)} files, {repeat * blocked} are needed "
                         "(raise --size-mib)")
    t = s.target
    # The hanging readers must each wait on their own file, not on a read-ahead of the study.
    t.set_tiering(read_ahead_studies=False)
    top = t.path / "resident"
    top.mkdir()
    written, digest = wl_write(top, CtData(), resident_mib)
    size = resident_mib * MIB
    say(f"  resident file written in {written.seconds:.2f} s")
    s.evict()
    t.cold_remount()
    wl_read(top, size, digest)  # untimed: moves the atime once, so later reads change nothing
    t.wait_replicated(REPLICATE_DEADLINE)
    cache = config_mod.load(t.hot).store.cache_mib
    if resident_mib <= cache:
        say(f"  note: the resident file is not larger than the block cache ({cache} MiB): "
            "reads after the first are partly served from it")
    runs: list[OutageRun] = []

    def read(mode: str) -> tuple[OutageRun, dict[str, int]]:
        """The timed cold read; the daemon's counters before it. The blocked run has dropped
        the caches itself, before the archive was suspended."""
        if mode == "idle":
            drop_caches()
        before = dict(t.status()["counters"])
        spy = PySpy(b.profile_dir if mode == "blocked" else None, f"outage-{len(runs)}")
        spy.attach(t.pid())
        c0 = daemon_cpu(t)
        try:
            res = wl_read(top, size, digest)
        finally:
            spy.detach()
        assert res.seconds is not None
        return OutageRun(mode, res.seconds, size, daemon_cpu(t) - c0, 0, 0), before

    def counted(run: OutageRun, before: dict[str, int]) -> OutageRun:
        after = t.status()["counters"]
        run.blocks_loaded = after.get("blocks_loaded", 0) - before.get("blocks_loaded", 0)
        run.cache_hits = after.get("cache_hits", 0) - before.get("cache_hits", 0)
        return run

    def idle() -> OutageRun:
        run = counted(*read("idle"))
        say(f"  idle: {run.seconds:.2f} s, {run.mb_s:.0f} MB/s; {run.blocks_loaded} blocks "
            f"loaded, {run.cache_hits} cache hits, daemon CPU {run.cpu_daemon:.1f} s")
        return run

    def with_blocked(k: int) -> OutageRun:
        chosen = s.files[k * blocked:(k + 1) * blocked]
        readers = [BlockedReader(t.path / f.rel, f.size, f.sha256) for f in chosen]
        for r in readers:
            if state_of(r.path) != "evicted":
                raise BenchError(f"{r.path} is not evicted before the outage")
        threads = [threading.Thread(target=r.run, name=f"blocked-{i}", daemon=True)
                   for i, r in enumerate(readers)]
        drop_caches()  # before SIGSTOP: sync() must not wait on anything the outage holds
        b.suspend_weed()
        try:
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            while True:
                states = [state_of(r.path) for r in readers]
                if all(x == "recalling" for x in states):
                    break
                if time.perf_counter() - t0 > BLOCKED_DEADLINE:
                    raise BenchError(f"only {states.count('recalling')} of {blocked} reads "
                                     f"of evicted files were recalling after "
                                     f"{BLOCKED_DEADLINE:.0f} s")
                time.sleep(0.05)
            waited = time.perf_counter() - t0
            run, before = read("blocked")
            still = sum(1 for r in readers if r.finished is None)
        finally:
            b.resume_weed()
        resumed = time.perf_counter()
        for th in threads:
            th.join(timeout=RECALL_TIMEOUT + 60)
        if any(th.is_alive() for th in threads):
            raise BenchError("blocked readers still hang after the archive was resumed")
        run = counted(run, before)
        run.waited, run.still_blocked = waited, still
        run.join_seconds = max((r.finished or resumed) for r in readers) - resumed
        for r in readers:
            run.outcomes[r.outcome] = run.outcomes.get(r.outcome, 0) + 1
        say(f"  blocked: {run.seconds:.2f} s, {run.mb_s:.0f} MB/s; {run.blocks_loaded} blocks "
            f"loaded, {run.cache_hits} cache hits, daemon CPU {run.cpu_daemon:.1f} s; "
            f"{still} of {blocked} readers still waiting at the end (all recalling after "
            f"{waited:.2f} s); after SIGCONT: {run.outcomes} in {run.join_seconds:.2f} s")
        return run

    for k in range(repeat):
        runs.append(idle())
        runs.append(with_blocked(k))
    t.wait_replicated(REPLICATE_DEADLINE)
    health = t.status()["health"]
    idle_runs = [r for r in runs if r.mode == "idle"]
    blocked_runs = [r for r in runs if r.mode == "blocked"]
    med_i = median([r.mb_s for r in idle_runs])
    med_b = median([r.mb_s for r in blocked_runs])
    assert med_i is not None and med_b is not None
    ratio = med_b / med_i
    every_block = all(r.blocks_loaded >= resident_mib for r in runs)
    rep.section(f"outage: cold read of a resident {resident_mib} MiB file, {blocked} reads of "
                f"evicted files hanging (SeaweedFS SIGSTOPped), median of {repeat}")
    rep.row("resident read, idle", f"median {med_i:.0f} MB/s  (runs: " + ", ".join(
        f"{r.seconds:.2f} s" for r in idle_runs) + "; daemon CPU "
        f"{median([r.cpu_daemon for r in idle_runs]):.1f} s)")
    rep.row(f"resident read, {blocked} recalls blocked", f"median {med_b:.0f} MB/s  (runs: "
            + ", ".join(f"{r.seconds:.2f} s" for r in blocked_runs) + "; daemon CPU "
            f"{median([r.cpu_daemon for r in blocked_runs]):.1f} s)")
    rep.row("blocked / idle", f"{ratio:.2f}x", f">= {OUTAGE_TARGET}x", ratio >= OUTAGE_TARGET)
    rep.row("blocked readers (info)", "; ".join(
        f"{r.still_blocked}/{blocked} still waiting at the end, then {r.outcomes} "
        f"{r.join_seconds:.2f} s after SIGCONT" for r in blocked_runs)
        + f"; every block from the hot store: {'yes' if every_block else 'no'}; health "
        f"afterwards {health}")
    rep.data["outage"] = {"resident_bytes": size, "blocked": blocked,
                          "runs": [r.as_dict() for r in runs], "median_idle_mb_s": med_i,
                          "median_blocked_mb_s": med_b, "ratio": ratio, "health": health}


# -- part 4: eviction rate and its cost to an ingest ----------------------------------------------


@dataclass
class EvictLoop:
    """`vnafs evict --study` of each study in turn (in a thread for the concurrent runs)."""

    target: TierTarget
    uids: list[str]
    started: float = 0.0
    ended: float = 0.0
    commands: list[float] = field(default_factory=list)
    blocks: int = 0
    bytes_freed: int = 0
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self.started = time.perf_counter()
            for uid in self.uids:
                t0 = time.perf_counter()
                rep = self.target.evict_study(uid)
                self.commands.append(time.perf_counter() - t0)
                self.blocks += int(rep["blocks"])
                self.bytes_freed += int(rep["bytes_freed"])
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.ended = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "commands": self.commands, "blocks": self.blocks,
                "bytes_freed": self.bytes_freed, "started": self.started,
                "ended": self.ended}


@dataclass
class IngestRun:
    mode: str  # alone | evicting
    seconds: float
    nbytes: int
    files: int
    cpu_daemon: float
    loop: EvictLoop | None = None
    overlap: float = 0.0  # share of the ingest during which the eviction loop ran

    @property
    def mb_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k != "loop"}
        d["loop"] = self.loop.as_dict() if self.loop else None
        return {**d, "mb_s": self.mb_s}


def part_evict(b: Bench, n_studies: int, study_mib: int, ingest_files: int, repeat: int,
               rep: Report) -> None:
    say(f"\n== evict: {n_studies} studies of {study_mib} MiB evicted one by one, alone and "
        f"during an ingest of {ingest_files} CT slices, {repeat}x (load average "
        f"{loadavg():.2f})")
    t0 = time.perf_counter()
    studies: list[tuple[str, list[tuple[str, bytes]]]] = []
    for i in range(n_studies):
        out = b.rundir / f"src-evict-{i:02d}"
        written = write_ct_series(out, seed=SEED + 100 + i, count=study_mib * SLICES_PER_MIB)
        studies.append((written[0].study_uid,
                        [(f"s{i:02d}/{rel}", d) for rel, d in load_sources(out)]))
    ingests: list[list[tuple[str, bytes]]] = []
    for j in range(2 * repeat + 1):
        out = b.rundir / f"src-ingest-{j:02d}"
        write_ct_series(out, seed=SEED + 200 + j, count=ingest_files)
        ingests.append(load_sources(out))
    study_bytes = sum(len(d) for _, files in studies for _, d in files)
    say(f"  generated {n_studies} studies ({mib(study_bytes):.0f} MiB) and "
        f"{len(ingests)} ingest sets of {ingest_files} slices in "
        f"{time.perf_counter() - t0:.1f} s (not timed); held in memory")
    uids = [uid for uid, _ in studies]
    if len(set(uids)) != n_studies:
        raise BenchError("the generated studies share StudyInstanceUIDs")
    t = b.new_fs("evict")
    t.mount()
    t.wait_replicated(60)
    copy_files(t.path / "studies", [f for _, files in studies for f in files])
    del studies
    t.settle()

    def evict_alone() -> EvictLoop:
        loop = EvictLoop(t, uids)
        loop.run()
        if loop.error is not None:
            raise BenchError(f"eviction failed: {loop.error}")
        say(f"  evictions alone: {n_studies} in {loop.seconds:.2f} s "
            f"({n_studies / loop.seconds:.1f} studies/s, {rate(study_bytes, loop.seconds):.0f}"
            f" MiB/s CT, {rate(loop.bytes_freed, loop.seconds):.0f} MiB/s sealed; "
            f"{loop.blocks} blocks)")
        return loop

    recalls: list[float] = []

    def recall_all() -> None:
        t0 = time.perf_counter()
        for uid in uids:
            t.queue_recall(uid)
        t.wait_resident()
        recalls.append(time.perf_counter() - t0)
        say(f"  recalled the {n_studies} studies in {recalls[-1]:.2f} s")

    counter = [0]

    def ingest(mode: str) -> IngestRun:
        files = ingests[counter[0]]
        top = t.path / f"ingest-{counter[0]:02d}"
        counter[0] += 1
        nbytes = sum(len(d) for _, d in files)
        loop = EvictLoop(t, uids) if mode == "evicting" else None
        thread = threading.Thread(target=loop.run, name="evict-loop") if loop else None
        os.sync()
        c0 = daemon_cpu(t)
        if thread is not None:
            thread.start()
        t0 = time.perf_counter()
        copy_files(top, files)
        t1 = time.perf_counter()
        res = IngestRun(mode, t1 - t0, nbytes, len(files), daemon_cpu(t) - c0, loop)
        if thread is not None and loop is not None:
            thread.join()
            if loop.error is not None:
                raise BenchError(f"eviction during the ingest failed: {loop.error}")
            res.overlap = max(0.0, min(loop.ended, t1) - max(loop.started, t0)) / (t1 - t0)
        t.settle()
        extra = "" if loop is None else (
            f"; evictions {loop.seconds:.2f} s ({n_studies / loop.seconds:.1f} studies/s), "
            f"running during {res.overlap * 100:.0f} % of the ingest")
        say(f"  ingest {mode}: {res.seconds:.2f} s, {res.mb_s:.0f} MB/s, daemon CPU "
            f"{res.cpu_daemon:.1f} s{extra}")
        if loop is not None:
            recall_all()
        return res

    overhead = []
    for _ in range(5):
        t0 = time.perf_counter()
        res = subprocess.run([b.exe, "evict", str(t.path), "--study", "1.2.3.4.5.6.7"],
                             capture_output=True, text=True, env=b.env, timeout=60,
                             stdin=subprocess.DEVNULL)
        overhead.append(time.perf_counter() - t0)
        if res.returncode != 1 or "no study" not in res.stderr:
            raise BenchError(f"vnafs evict of an unknown UID: {res.returncode} {res.stderr!r}")
    start_up = median(overhead)
    assert start_up is not None
    alone_loops = [evict_alone()]
    recall_all()
    warm = ingest("warm-up")
    runs: list[IngestRun] = []
    for r in range(repeat):
        for mode in (("alone", "evicting") if r % 2 == 0 else ("evicting", "alone")):
            runs.append(ingest(mode))
    alone_loops.append(evict_alone())

    secs = median([x.seconds for x in alone_loops])
    freed = median([float(x.bytes_freed) for x in alone_loops])
    cmd = median([c for x in alone_loops for c in x.commands])
    assert secs is not None and freed is not None and cmd is not None
    during = [x.loop for x in runs if x.loop is not None]
    alone_i = median([x.seconds for x in runs if x.mode == "alone"])
    with_i = median([x.seconds for x in runs if x.mode == "evicting"])
    assert alone_i is not None and with_i is not None
    ratio = alone_i / with_i
    ingest_bytes = runs[0].nbytes
    rep.section(f"evict: {n_studies} studies of {study_mib} MiB CT "
                f"({mib(study_bytes):.0f} MiB, {alone_loops[0].blocks} blocks, "
                f"{mib(freed):.1f} MiB sealed), `vnafs evict --study` one after another")
    rep.row("eviction rate, alone", f"{n_studies / secs:.1f} studies/s, "
            f"{rate(study_bytes, secs):.0f} MiB/s CT data, {rate(freed, secs):.0f} MiB/s "
            f"sealed  (runs: " + ", ".join(f"{x.seconds:.2f} s" for x in alone_loops)
            + f"; {cmd * 1e3:.0f} ms per command, median)")
    inner = max(secs - n_studies * start_up, 1e-3)
    rep.row("the command's own cost (info)", f"{start_up * 1e3:.0f} ms for a refused evict of "
            f"an unknown UID (Python start-up, one control request); without it "
            f"{n_studies / inner:.1f} studies/s, {rate(freed, inner):.0f} MiB/s sealed")
    rep.row("eviction rate, during an ingest (info)", ", ".join(
        f"{n_studies / x.seconds:.1f} studies/s ({x.seconds:.2f} s)" for x in during))
    rep.row(f"ingest {ingest_files} x 0.5 MiB CT, alone", f"median {alone_i:.2f} s, "
            f"{ingest_bytes / 1e6 / alone_i:.0f} MB/s  (runs: " + ", ".join(
                f"{x.seconds:.2f} s" for x in runs if x.mode == "alone")
            + f"; warm-up {warm.seconds:.2f} s, not counted)")
    rep.row(f"ingest {ingest_files} x 0.5 MiB CT, evicting", f"median {with_i:.2f} s, "
            f"{ingest_bytes / 1e6 / with_i:.0f} MB/s  (runs: " + ", ".join(
                f"{x.seconds:.2f} s, evictions during {x.overlap * 100:.0f} %"
                for x in runs if x.mode == "evicting") + ")")
    rep.row("ingest throughput evicting / alone", f"{ratio:.2f}x")
    rep.row("vnafs recall --study of all studies, queued (info)", ", ".join(
        f"{x:.2f} s ({rate(freed, x):.0f} MiB/s sealed)" for x in recalls))
    rep.data["evict"] = {"studies": n_studies, "study_bytes": study_bytes,
                         "alone": [x.as_dict() for x in alone_loops],
                         "ingests": [x.as_dict() for x in runs], "warmup": warm.as_dict(),
                         "recall_seconds": recalls, "ratio": ratio,
                         "command_seconds": overhead,
                         "studies_per_s": n_studies / secs,
                         "mib_s_sealed": rate(freed, secs)}


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench_tier",
        description="Benchmark tiering of vnafs against SeaweedFS: cold recall and time to "
                    "first byte vs the plain client, resident reads during an archive outage, "
                    "eviction rate and its cost to an ingest (run as root).")
    p.add_argument("--size-mib", type=int,
                   help="CT data in the recalled study, MiB (default 1024; 2 slices/MiB)")
    p.add_argument("--repeat", type=int,
                   help="runs of each timed measurement (default 2, --quick 1)")
    p.add_argument("--ttfb-files", type=int, help="evicted files timed for the first byte "
                   "(default 20)")
    p.add_argument("--resident-mib", type=int,
                   help="the resident file read during the outage, MiB (default 512)")
    p.add_argument("--blocked", type=int,
                   help="reads of evicted files hanging during the outage (default 20)")
    p.add_argument("--studies", type=int, help="studies evicted in the evict part (default 20)")
    p.add_argument("--study-mib", type=int, help="size of each of them, MiB (default 20)")
    p.add_argument("--ingest-files", type=int,
                   help="CT slices per ingest run in the evict part (default 400)")
    p.add_argument("--py-spy", metavar="DIR",
                   help="record py-spy profiles of the recall reads and the blocked resident "
                        "reads into DIR")
    return parse_run_args(p, argv, default_dir=DEFAULT_DIR, names=PARTS,
                          quick_help="256 MiB study and resident file, 10 studies of 10 MiB, "
                                     "200 ingest files, 1 run each",
                          default_sizes=DEFAULT_SIZES, quick_sizes=QUICK_SIZES)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exe = preflight("bench_tier")
    if exe is None:
        return 2
    if not Path(sys.executable).with_name("weed").exists():
        say("SeaweedFS (weed) is not installed beside the Python interpreter (make venv)")
        return 2
    study_parts = [p for p in ("recall", "ttfb", "outage") if p in args.only]
    study_mib = args.size_mib if study_parts else 0
    evict_mib = (args.studies * args.study_mib + (2 * args.repeat + 1) * args.ingest_files / 2
                 if "evict" in args.only else 0)
    # Sources, hot stores, the objects in SeaweedFS, the plain GETs' files (3 x sealed).
    need = ((study_mib * 1.1 + study_mib * 0.4 * 6 + args.resident_mib * 0.8) * MIB
            if study_parts else 0) + evict_mib * MIB * 2
    run_dir = RunDir.create(args.dir, need)
    if run_dir is None:
        return 2
    info = banner("vnafs tiering benchmark", run_dir)
    say(f"sizes: study {args.size_mib} MiB, {args.repeat} run(s); ttfb {args.ttfb_files} files;"
        f" outage {args.resident_mib} MiB resident, {args.blocked} blocked; evict "
        f"{args.studies} x {args.study_mib} MiB, ingest {args.ingest_files} slices; parts "
        f"{','.join(p for p in PARTS if p in args.only)}")

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
            bench = b = Bench(run_dir.path, exe, args.keep, seaweed, profile_dir)
            say(f"SeaweedFS (weed mini) pid {b.weed_pid()} at {seaweed.endpoint}, "
                f"bucket {BUCKET}")
            studies: list[Study] = []

            def study() -> Study:
                if not studies:
                    studies.append(make_study(bench, args.size_mib))
                return studies[0]

            parts: dict[str, Callable[[], None]] = {
                "recall": lambda: part_recall(bench, study(), args.repeat, rep),
                "ttfb": lambda: part_ttfb(bench, study(), args.ttfb_files, rep),
                "outage": lambda: part_outage(bench, study(), args.repeat, args.resident_mib,
                                              args.blocked, rep),
                "evict": lambda: part_evict(bench, args.studies, args.study_mib,
                                            args.ingest_files, args.repeat, rep),
            }
            for name in PARTS:
                if name not in args.only:
                    continue
                try:
                    run_part(name, parts[name], rep)
                finally:
                    bench.resume_weed()
                    bench.sample_weed()
        except KeyboardInterrupt:
            interrupted = True
            say("\ninterrupted: unmounting, stopping SeaweedFS and cleaning up")
        except FAILURES as exc:
            rep.errors.append(f"setup: {exc}")
            say(f"FAILED: {exc}")
        finally:
            with signals_ignored():
                if b is not None:
                    b.resume_weed()
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
                    units="MiB/s = 2^20 B/s of sealed block bytes; MB/s = 10^6 B/s of file "
                    "content", extra={"weed_vmhwm_kib": b.weed_hwm_kib if b else [],
                                      "daemon_vmhwm_kib": daemon_peak})


if __name__ == "__main__":
    sys.exit(main())
