"""Benchmark of the DICOM index: ingest with the index on and off, view listings, query latency.

Why it exists. The DICOM index (docs/architecture.md section 8) must cost a PACS nothing it can
feel: indexing runs after close() returns, so ingest with `[dicom] index = true` should reach at
least 0.9x the throughput of the same mount with the index off; a series directory of the views
must list quickly even with thousands of instances; and `vnafs find` must answer in a few
milliseconds on an archive of a million instances. This tool measures all three in one run, on
real mounts made with the real CLI (`vnafs keygen/mkfs/mount/umount`, as tools/bench.py does).

What it does, under --dir (default /var/tmp/vnafs-bench-dicom, one disk for everything):

1. ingest: one CT series of --files (default 2000) slices of about 0.5 MiB from
   tools/gen_studies.write_ct_series, generated once into a source directory and read into
   memory (neither is timed), is copied file by file (open, one write, close; no fsync) into a
   fresh mount with the index on and into one with it off, alternately, --repeat times (default
   2; medians are reported), after one warm-up ingest with the index off that is not counted
   (--no-warmup skips it). Timed: until the last close() returns, and with the index on also
   until everything is indexed (control request `index_wait`, then `status` must count every
   instance). With the index on, `ls -l` (scandir + lstat of every entry) of the series view
   `.dicom/by-study/<study>/<series>/` is timed cold (remount + drop_caches) and warm.
2. listing: --list-files (default 5000) small valid CT instances (16 x 16 pixels) in one series
   are written into a mount and indexed; then `ls` (os.listdir) and `ls -l` of the series view
   are timed cold and warm, and, for comparison, of the real directory holding the files.
3. query: an index of --instances (default 1,000,000) synthetic instances (about 2,500 studies
   of 1..2000 instances, 800 patients under 3 issuers, an accession per study, dates over ten
   years) is built offline: the store is opened with `daemon.open_store`, inodes are made with
   `Namespace.mknod` and indexed with `DicomIndex.apply` (each keeping the header bytes of a
   generated CT instance), --batch (5000) per LMDB transaction, and the index schema is set so
   the mount does not reindex files that have no content (their size is 0; the LMDB size and
   the largest tables are shown). Then `query.find` is timed in
   process, the store is mounted, and `find` by patient + issuer, by patient alone, by study
   UID and by accession is timed through the control socket (--reps requests each, 50 by
   default, every one for a different patient, study or accession; the daemon takes one
   request per connection), and the wall time of the `vnafs find` command (--cmd-reps, 10),
   with that of `vnafs --version` for the cost of starting Python.

How to read the output. Times are wall-clock (time.perf_counter); MB/s is 10^6 bytes per second.
"on/off" is the ingest throughput with the index on divided by that with it off (1.0 = free);
the target column holds the issue's goals. "daemon CPU" is user + system time of the vnafs
daemon from /proc/PID/stat. Latencies are median and 95th percentile over the requests. The
load average is printed per part: on two shared cores every figure moves by 10-30 % with other
work, so compare runs on one quiet machine.

Run it as root from the repository root with the project's virtualenv:

    .venv/bin/python -m tools.bench_dicom [--quick] [--only ingest,listing,query] [--json FILE]

--quick uses 200 ingest files, 500 listed instances and 20,000 index records. Every mount is
unmounted on exit, also on Ctrl-C or SIGTERM, and the work directory is removed unless --keep is
given. Exit status: 0 when every part ran and every check passed, 1 when one failed (the reason
is printed under the table), 2 for a usage problem, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.gen_studies import (
    ACCESSION_ISSUER,
    ACCESSION_PREFIX,
    MODALITIES,
    UID_ROOT,
    make_patients,
    make_study,
    write_ct_series,
)
from tools.harness import (
    MIB,
    BenchError,
    RunDir,
    VnafsTarget,
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
    store_file,
    timed,
)
from tools.report import Report, conclude, median, p95, say
from vnafs import config as config_mod
from vnafs.control import control_request
from vnafs.dicom import query
from vnafs.dicom.header import Instance, Parsed, Status, parse
from vnafs.dicom.index import DicomIndex
from vnafs.keys import resolve_kek_source
from vnafs.meta.records import ROOT_INO
from vnafs.meta.tx import Tx
from vnafs.store.lifecycle import Store, open_store

DEFAULT_DIR = "/var/tmp/vnafs-bench-dicom"
PARTS = ("ingest", "listing", "query")
DEFAULT_SIZES = {"files": 2000, "list_files": 5000, "instances": 1_000_000}
QUICK_SIZES = {"files": 200, "list_files": 500, "instances": 20_000}
SEED = 20240601
INGEST_TARGET = 0.9  # index on / index off ingest throughput, at least
QUERY_TARGET_MS = 10.0  # median and p95 of a find through the control socket, below
WARM_REPS = 3  # warm listings are repeated and the median kept
INDEX_DEADLINE = 900.0  # seconds to wait for the indexer before calling it stuck
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
PATIENTS = 800


# -- helpers --------------------------------------------------------------------------------------


def list_names(path: Path, expect: int) -> None:
    """`ls`: the names only."""
    n = len(os.listdir(path))
    if n != expect:
        raise BenchError(f"{path} lists {n} entries, expected {expect}")


def list_long(path: Path, expect: int) -> None:
    """`ls -l`: the names and an lstat of every entry."""
    n = 0
    with os.scandir(path) as it:
        for entry in it:
            os.lstat(entry.path)
            n += 1
    if n != expect:
        raise BenchError(f"{path} lists {n} entries, expected {expect}")


class DicomTarget(VnafsTarget):
    """A vnafs file system whose `[dicom] index` is set after mkfs, with control requests."""

    def __init__(self, root: Path, exe: str, *, index: bool = True) -> None:
        super().__init__(root, exe)
        self.index = index

    def create(self) -> None:
        super().create()
        conf = self.hot / config_mod.CONFIG_NAME
        text, n = re.subn(r"(?m)^index = (true|false)$", f"index = {str(self.index).lower()}",
                          conf.read_text(), count=1)
        if n != 1:
            raise BenchError(f"{conf} has no 'index = ...' line to set")
        conf.write_text(text)
        if config_mod.load(self.hot).dicom.index != self.index:
            raise BenchError(f"{conf}: setting dicom.index = {self.index} did not take")

    def control(self, request: dict[str, Any], timeout: float = 60.0) -> Any:
        return control_request(self.hot, request, timeout)

    def instances(self) -> int:
        return int(self.control({"op": "status"})["dicom"]["instances"])

    def wait_indexed(self, expect: int) -> None:
        """Return once the indexer is idle and `expect` instances are indexed.

        close() may return before FUSE's release queues the last file for the indexer, so an
        idle indexer alone does not prove the work is done: the instance count must match too.
        """
        deadline = time.monotonic() + INDEX_DEADLINE
        while True:
            pending = self.control({"op": "index_wait", "timeout": 25}, timeout=60)["pending"]
            if pending == 0:
                got = self.instances()
                if got == expect:
                    return
                if got > expect:
                    raise BenchError(f"{got} instances indexed, expected {expect}")
                time.sleep(0.02)
            if time.monotonic() > deadline:
                raise BenchError(f"indexing did not finish within {INDEX_DEADLINE:.0f} s "
                                 f"({pending} pending)")


@dataclass
class Workspace:
    """Where the parts make their file systems, and every one made so far (for the cleanup)."""

    rundir: Path
    exe: str
    keep: bool
    targets: list[DicomTarget] = field(default_factory=list)

    @contextlib.contextmanager
    def fs(self, name: str, *, index: bool) -> Iterator[DicomTarget]:
        """A fresh file system (keygen + mkfs); unmounted, then removed unless --keep."""
        t = DicomTarget(self.rundir / name, self.exe, index=index)
        self.targets.append(t)
        try:
            t.create()
            yield t
        finally:
            t.discard(self.keep)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f} ms"


# -- part 1: ingest with the index on and off -----------------------------------------------------


@dataclass
class IngestRun:
    index: bool
    writes: float
    indexed: float | None = None  # from the first write until everything was indexed
    cpu_writes: float | None = None
    cpu_total: float | None = None
    ls_cold: float | None = None
    ls_warm: float | None = None
    loadavg: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def ingest_once(t: DicomTarget, files: list[tuple[str, bytes]], view: Path | None
                ) -> IngestRun:
    """Copy `files` into the fresh mount `t`; with the index on, wait for it and list `view`."""
    top = t.path / "incoming"
    dirs = sorted({str(top / Path(rel).parent) for rel, _ in files})
    paths = [str(top / rel) for rel, _ in files]
    la = loadavg()
    os.sync()
    pid = t.pid()
    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    for d in dirs:
        os.makedirs(d)
    for path, (_, content) in zip(paths, files, strict=True):
        store_file(path, content)
    t_writes = time.perf_counter() - t0
    cpu1 = cpu_seconds(pid)
    out = IngestRun(t.index, t_writes, loadavg=la)
    if cpu0 is not None and cpu1 is not None:
        out.cpu_writes = cpu1 - cpu0
    if not t.index:
        return out
    t.wait_indexed(len(files))
    out.indexed = time.perf_counter() - t0
    cpu2 = cpu_seconds(pid)
    if cpu0 is not None and cpu2 is not None:
        out.cpu_total = cpu2 - cpu0
    if view is not None:
        t.remount()
        drop_caches()
        out.ls_cold = timed(lambda: list_long(view, len(files)))
        out.ls_warm = median([timed(lambda: list_long(view, len(files)))
                              for _ in range(WARM_REPS)])
    return out


def part_ingest(ws: Workspace, count: int, repeat: int, warm_up: bool, rep: Report) -> None:
    say(f"\n== ingest: {count} CT slices, index on vs off, {repeat}x alternately "
        f"(load average {loadavg():.2f})")
    src = ws.rundir / "src-ct"
    t0 = time.perf_counter()
    gen = write_ct_series(src, seed=SEED, count=count)
    files = load_sources(src)
    total = sum(len(b) for _, b in files)
    say(f"  generated {len(gen)} slices, {total / MIB:.0f} MiB, in "
        f"{time.perf_counter() - t0:.1f} s (not timed); held in memory")
    view_rel = Path(".dicom", "by-study", gen[0].study_uid, gen[0].series_uid)

    def one(name: str, on: bool) -> IngestRun:
        with ws.fs(name, index=on) as t:
            t.mount()
            res = ingest_once(t, files, t.path / view_rel if on else None)
            t.umount()
        extra = "" if res.indexed is None else (
            f", indexed after {res.indexed:.2f} s, ls -l view cold {_s(res.ls_cold)} "
            f"warm {_s(res.ls_warm)}")
        say(f"  {name}: writes {res.writes:.2f} s ({total / res.writes / 1e6:.1f} MB/s), "
            f"daemon CPU {res.cpu_writes or 0:.1f} s{extra}  (load {res.loadavg:.2f})")
        return res

    # The first ingest after the sources were made was up to 45 % slower in either mode on the
    # 2-core VM this was written on (first use of fresh page-cache memory, presumably): an
    # untimed warm-up takes that hit instead of whichever mode would run first.
    warmup = one("ingest-warmup-off", False).writes if warm_up else None
    runs: list[IngestRun] = []
    for r in range(repeat):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            runs.append(one(f"ingest-{'on' if on else 'off'}-{r + 1}", on))
    on_runs = [x for x in runs if x.index]
    off_runs = [x for x in runs if not x.index]
    w_on = median([x.writes for x in on_runs])
    w_off = median([x.writes for x in off_runs])
    idx = median([x.indexed for x in on_runs if x.indexed is not None])
    assert w_on is not None and w_off is not None
    ratio = w_off / w_on
    rep.section(f"ingest {count} x {total / count / MIB:.2f} MiB CT (median of {repeat})")
    rep.row("writes, index off", f"{w_off:.2f} s  {total / w_off / 1e6:.1f} MB/s  "
            f"{count / w_off:.0f} files/s")
    rep.row("writes, index on", f"{w_on:.2f} s  {total / w_on / 1e6:.1f} MB/s  "
            f"{count / w_on:.0f} files/s")
    if warmup is not None:
        rep.row("warm-up, index off (not counted)", f"{warmup:.2f} s")
    rep.row("throughput on/off", f"{ratio:.2f}x", f">= {INGEST_TARGET}x", ratio >= INGEST_TARGET)
    if idx is not None:
        rep.row("index on: all indexed after", f"{idx:.2f} s  ({idx - w_on:.2f} s after the "
                f"last close; {count / idx:.0f} files/s end to end)")
    cpu_on = median([x.cpu_total for x in on_runs if x.cpu_total is not None])
    cpu_on_w = median([x.cpu_writes for x in on_runs if x.cpu_writes is not None])
    cpu_off = median([x.cpu_writes for x in off_runs if x.cpu_writes is not None])
    if cpu_on is not None and cpu_off is not None and cpu_on_w is not None:
        rep.row("daemon CPU", f"off {cpu_off:.1f} s; on {cpu_on_w:.1f} s during writes, "
                f"{cpu_on:.1f} s until indexed ({(cpu_on - cpu_off) / count * 1e3:.1f} ms "
                "per file for the index)")
    rep.row(f"ls -l series view ({count}), cold", _s(median(
        [x.ls_cold for x in on_runs if x.ls_cold is not None])))
    rep.row(f"ls -l series view ({count}), warm", _s(median(
        [x.ls_warm for x in on_runs if x.ls_warm is not None])))
    rep.data["ingest"] = {"files": count, "bytes": total, "repeat": repeat,
                          "runs": [x.as_dict() for x in runs],
                          "median_writes_on": w_on, "median_writes_off": w_off,
                          "ratio_on_off": ratio, "median_indexed": idx,
                          "warmup_writes_off": warmup}
    if not ws.keep:
        shutil.rmtree(src, ignore_errors=True)


# -- part 2: listing a large series view ----------------------------------------------------------


def part_listing(ws: Workspace, count: int, repeat: int, rep: Report) -> None:
    say(f"\n== listing: one series of {count} small CT instances "
        f"(load average {loadavg():.2f})")
    rng = random.Random(f"vnafs.bench_dicom.listing.{SEED}")
    patient = make_patients(SEED, 1)[0]
    t0 = time.perf_counter()
    objs = list(make_study(rng, patient, "CT", instances=count, rows=16, cols=16))
    first = parse(io.BytesIO(objs[0][1]), len(objs[0][1])).instance
    if first is None:
        raise BenchError("the generated instance does not parse")
    say(f"  generated {count} instances of {len(objs[0][1])} bytes in "
        f"{time.perf_counter() - t0:.1f} s (not timed)")
    figures: dict[str, Any] = {"files": count}
    rep.data["listing"] = figures
    with ws.fs("listing", index=True) as t:
        t.mount()
        top = t.path / "small"
        os.sync()
        t0 = time.perf_counter()
        for rel, data in objs:
            path = top / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            store_file(path, data)
        t_write = time.perf_counter() - t0
        t.wait_indexed(count)
        t_idx = time.perf_counter() - t0
        rep.section(f"listing one series of {count} small instances")
        rep.row("write / all indexed (info)", f"{t_write:.2f} s / {t_idx:.2f} s  "
                f"({count / t_idx:.0f} files/s end to end)")
        real = top / Path(objs[0][0]).parent
        view = t.path / ".dicom" / "by-study" / first.study_uid / first.series_uid
        figures.update(write=t_write, indexed=t_idx)
        for where, path in (("view", view), ("real dir", real)):
            for what, fn in (("ls", list_names), ("ls -l", list_long)):
                cold = []
                for _ in range(repeat):
                    t.remount()
                    drop_caches()
                    cold.append(timed(functools.partial(fn, path, count)))
                warm = [timed(functools.partial(fn, path, count))
                        for _ in range(WARM_REPS)]
                c, w = median(cold), median(warm)
                info = " (comparison)" if where != "view" else ""
                rep.row(f"{what} {where}{info}", f"cold {_s(c)}  warm {_s(w)}")
                figures[f"{where} {what}"] = {"cold": cold, "warm": warm}
        t.umount()


# -- part 3: query latency on a large index -------------------------------------------------------


@dataclass
class SynthStudy:
    uid: str
    issuer: str
    pid: str
    accession: str
    date: str
    time: str
    modality: str
    series: list[tuple[str, int]]  # (SeriesInstanceUID, instances)


# (modality, share of studies, series per study, instances per study); about 400 instances
# per study on average, so 1,000,000 instances make about 2,500 studies.
_STUDY_MIX = (("CR", 0.35, (1, 2), (1, 4)),
              ("MR", 0.30, (3, 8), (100, 800)),
              ("CT", 0.35, (1, 4), (50, 1500)))


def plan_archive(instances: int, seed: int) -> tuple[list[SynthStudy], int]:
    """Studies summing to `instances`, and how many patients they belong to."""
    rng = random.Random(f"vnafs.bench_dicom.archive.{seed}")
    patients = make_patients(seed, PATIENTS)
    first_day = datetime.date(2015, 1, 1)

    def uid() -> str:
        return f"{UID_ROOT}{rng.getrandbits(120)}"

    studies: list[SynthStudy] = []
    left = instances
    accessions = iter(rng.sample(range(10**7, 10**8), instances // 4 + 10))
    while left > 0:
        modality, _, (s_lo, s_hi), (i_lo, i_hi) = rng.choices(
            _STUDY_MIX, weights=[m[1] for m in _STUDY_MIX])[0]
        total = min(left, rng.randint(i_lo, i_hi), 2000)
        n_series = min(total, rng.randint(s_lo, s_hi))
        sizes = [total // n_series + (k < total % n_series) for k in range(n_series)]
        patient = rng.choice(patients)
        day = first_day + datetime.timedelta(days=rng.randrange(3653))
        studies.append(SynthStudy(
            uid(), patient.issuer, patient.patient_id, f"{ACCESSION_PREFIX}{next(accessions)}",
            day.strftime("%Y%m%d"),
            f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
            modality, [(uid(), n) for n in sizes]))
        left -= total
    used = {(s.issuer, s.pid) for s in studies}
    return studies, len(used)


def sample_header(seed: int) -> bytes:
    """The header bytes (up to PixelData) of a generated CT instance, kept for every record."""
    rng = random.Random(f"vnafs.bench_dicom.header.{seed}")
    _, data = next(iter(make_study(rng, make_patients(seed, 1)[0], "CT", instances=1,
                                   rows=16, cols=16)))
    parsed = parse(io.BytesIO(data), len(data))
    if parsed.status is not Status.OK or not parsed.header:
        raise BenchError("the generated CT instance does not parse")
    return parsed.header


def build_index(store: Store, studies: list[SynthStudy], header: bytes, batch: int,
                seed: int) -> float:
    """Inodes and index entries for every planned instance; returns the seconds it took."""
    ns, db = store.ns, store.db
    index = DicomIndex(ns)
    rng = random.Random(f"vnafs.bench_dicom.sop.{seed}")
    total = sum(n for s in studies for _, n in s.series)
    step = max(batch, total // 10)
    done = 0
    t0 = time.perf_counter()
    txn = db.begin(write=True)
    try:
        tx = Tx(txn, time.time_ns())
        in_txn = 0
        dir_mode, file_mode = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644
        archive = ns.mknod(tx, ROOT_INO, b"archive", dir_mode, 0, 0)
        for k, s in enumerate(studies):
            sdir = ns.mknod(tx, archive.ino, b"%05d" % k, dir_mode, 0, 0)
            for j, (series_uid, n) in enumerate(s.series, start=1):
                sedir = ns.mknod(tx, sdir.ino, b"se%02d" % j, dir_mode, 0, 0)
                for i in range(1, n + 1):
                    node = ns.mknod(tx, sedir.ino, b"%05d.dcm" % i, file_mode, 0, 0)
                    inst = Instance(
                        sop_uid=f"{UID_ROOT}{rng.getrandbits(120)}",
                        sop_class=MODALITIES[s.modality].single, study_uid=s.uid,
                        series_uid=series_uid, transfer_syntax=EXPLICIT_VR_LE,
                        patient_id=s.pid, patient_issuer=s.issuer, modality=s.modality,
                        study_date=s.date, study_time=s.time, accession=s.accession,
                        accession_issuer=ACCESSION_ISSUER, series_number=j,
                        instance_number=i, charset="")
                    index.apply(tx, node.ino, Parsed(Status.OK, inst, header, ""), None)
                    in_txn += 1
                    done += 1
                    if in_txn >= batch:
                        txn.commit()
                        txn = db.begin(write=True)
                        tx = Tx(txn, time.time_ns())
                        in_txn = 0
                    if done % step == 0:
                        dt = time.perf_counter() - t0
                        say(f"    {done:>9,} / {total:,} instances  {dt:6.1f} s  "
                            f"{done / dt:,.0f}/s")
        index.set_schema(tx)
        txn.commit()
    except BaseException:
        txn.abort()
        raise
    return time.perf_counter() - t0


@dataclass
class QueryKind:
    key: str
    label: str
    requests: list[dict[str, Any]]
    expect: list[str]  # a study UID every answer must contain


def query_kinds(studies: list[SynthStudy], reps: int, seed: int) -> list[QueryKind]:
    rng = random.Random(f"vnafs.bench_dicom.queries.{seed}")
    picks = [rng.choice(studies) for _ in range(reps)]
    named = [s for s in studies if s.pid]
    by_patient = [rng.choice(named) for _ in range(reps)]
    return [
        QueryKind("patient_issuer", "find by patient + issuer",
                  [{"patient": s.pid, "issuer": s.issuer} for s in by_patient],
                  [s.uid for s in by_patient]),
        QueryKind("patient", "find by patient, any issuer (info)",
                  [{"patient": s.pid} for s in by_patient], [s.uid for s in by_patient]),
        QueryKind("study", "find by study UID",
                  [{"study": s.uid} for s in picks], [s.uid for s in picks]),
        QueryKind("accession", "find by accession",
                  [{"accession": s.accession} for s in picks], [s.uid for s in picks]),
    ]


def _check_answer(found: list[dict[str, Any]], uid: str, what: str) -> None:
    if uid not in {s["study"] for s in found}:
        raise BenchError(f"{what}: the answer does not contain the expected study")


def time_in_process(index: DicomIndex, kinds: list[QueryKind]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for kind in kinds:
        samples = []
        for req, uid in zip(kind.requests, kind.expect, strict=True):
            q = query.Query(**req)
            t0 = time.perf_counter()
            found = query.find(index, q)
            samples.append(time.perf_counter() - t0)
            _check_answer(found, uid, kind.label)
        out[kind.key] = samples
    return out


def table_sizes(store: Store) -> dict[str, tuple[int, int, int]]:
    """(entries, bytes in pages, overflow pages) of every LMDB table of `store`."""
    out = {}
    with store.db.begin() as txn:
        for name, db in store.db.dbs.items():
            st = txn.stat(db)
            pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            out[name] = (st["entries"], pages * st["psize"], st["overflow_pages"])
    return out


def part_query(ws: Workspace, instances: int, reps: int, cmd_reps: int, batch: int,
               rep: Report) -> None:
    say(f"\n== query: index of {instances:,} synthetic instances "
        f"(load average {loadavg():.2f})")
    studies, patients = plan_archive(instances, SEED)
    n_series = sum(len(s.series) for s in studies)
    say(f"  plan: {len(studies):,} studies, {n_series:,} series, {patients} patients, "
        f"{len({s.issuer for s in studies})} issuers (incl. none)")
    kinds = query_kinds(studies, reps, SEED)
    header = sample_header(SEED)
    say(f"  every record keeps the {len(header)} header bytes of a generated CT instance")
    figures: dict[str, Any] = {"instances": instances, "studies": len(studies),
                               "series": n_series, "patients": patients}
    rep.data["query"] = figures
    rep.section(f"query: {instances:,} instances, {len(studies):,} studies, {patients} patients")
    with ws.fs("query", index=True) as t:
        store = open_store(t.hot, resolve_kek_source(str(t.key), None))
        try:
            build = build_index(store, studies, header, batch, SEED)
            inproc = time_in_process(DicomIndex(store.ns), kinds)
            tables = table_sizes(store)
        finally:
            store.close()
        meta = t.hot / "meta" / "data.mdb"
        st = meta.stat()
        figures.update(build_seconds=build, lmdb_bytes=st.st_size,
                       lmdb_allocated=st.st_blocks * 512)
        rep.row("index build (offline, info)", f"{build:.1f} s  ({instances / build:,.0f} "
                f"instances/s, mknod + apply, {batch} per transaction)")
        rep.row("LMDB size", f"{st.st_size / MIB:,.0f} MiB ({st.st_blocks * 512 / MIB:,.0f} MiB "
                f"allocated; {st.st_size / instances:,.0f} B per instance)")
        top = sorted(tables.items(), key=lambda kv: kv[1][1], reverse=True)[:4]
        rep.row("LMDB largest tables", "; ".join(
            f"{name} {size / MIB:,.0f} MiB ({size / max(1, n):,.0f} B/record"
            + (f", {over:,} overflow pages)" if over else ")")
            for name, (n, size, over) in top))
        figures["tables"] = {name: {"entries": n, "bytes": size, "overflow_pages": over}
                             for name, (n, size, over) in tables.items()}
        for kind in kinds:
            rep.row(f"{kind.label}, in process", f"median {_ms(median(inproc[kind.key]))}  "
                    f"p95 {_ms(p95(inproc[kind.key]))}")
        figures["in_process"] = inproc
        drop_caches()
        mount_s = timed(t.mount)
        got = t.instances()
        if got != instances:
            raise BenchError(f"the mounted index counts {got} instances, expected {instances}")
        status_s = timed(lambda: t.control({"op": "status"}))
        rep.row("mount / status request (info)", f"{mount_s:.2f} s / {_ms(status_s)}")
        figures.update(mount_seconds=mount_s, status_seconds=status_s, socket={}, cold={})
        for kind in kinds:
            drop_caches()
            first = kind.requests[0]
            cold = timed(functools.partial(t.control, {"op": "find", **first}))
            samples = []
            for req, uid in zip(kind.requests, kind.expect, strict=True):
                t0 = time.perf_counter()
                found = t.control({"op": "find", **req})
                samples.append(time.perf_counter() - t0)
                _check_answer(found, uid, kind.label)
            med, high = median(samples), p95(samples)
            assert med is not None and high is not None
            target = "" if kind.key == "patient" else f"< {QUERY_TARGET_MS:g} ms"
            ok = None if not target else high * 1e3 < QUERY_TARGET_MS
            rep.row(f"{kind.label}, socket", f"median {_ms(med)}  p95 {_ms(high)}  "
                    f"(cold first {_ms(cold)})", target, ok)
            figures["socket"][kind.key] = samples
            figures["cold"][kind.key] = cold
        study = kinds[2].requests[0]["study"]
        cmd = [ws.exe, "find", str(t.path), "--study", study]
        walls = []
        for _ in range(cmd_reps):
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
            walls.append(time.perf_counter() - t0)
            if res.returncode != 0:
                raise BenchError(f"vnafs find failed ({res.returncode}): "
                                 f"{res.stderr.decode(errors='replace').strip()}")
        base = []
        for _ in range(cmd_reps):
            t0 = time.perf_counter()
            subprocess.run([ws.exe, "--version"], capture_output=True, stdin=subprocess.DEVNULL,
                           timeout=60, check=True)
            base.append(time.perf_counter() - t0)
        rep.row("vnafs find --study (command)", f"median {_ms(median(walls))}  "
                f"(vnafs --version: {_ms(median(base))})")
        figures.update(command=walls, command_version=base)
        t.umount()


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench_dicom",
        description="Benchmark the DICOM index of vnafs: ingest with it on and off, view "
                    "listings, query latency (run as root).")
    p.add_argument("--files", type=int, help="CT slices to ingest (default 2000)")
    p.add_argument("--list-files", type=int,
                   help="small instances in the listed series (default 5000)")
    p.add_argument("--instances", type=int, help="synthetic index records (default 1000000)")
    p.add_argument("--repeat", type=int, default=2,
                   help="ingest runs per mode, and cold listings (default 2)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up ingest (index off) before the timed ones")
    p.add_argument("--reps", type=int, default=50, help="requests per query kind (default 50)")
    p.add_argument("--cmd-reps", type=int, default=10,
                   help="runs of the vnafs find command (default 10)")
    p.add_argument("--batch", type=int, default=5000,
                   help="index records per LMDB transaction when building (default 5000)")
    return parse_run_args(p, argv, default_dir=DEFAULT_DIR, names=PARTS,
                          quick_help="200 files, 500 listed instances, 20000 records",
                          default_sizes=DEFAULT_SIZES, quick_sizes=QUICK_SIZES,
                          positive=("repeat", "reps", "cmd_reps", "batch"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exe = preflight("bench_dicom")
    if exe is None:
        return 2
    # Sources and one store of CT slices, and about 4 KiB of LMDB per index record.
    need = args.files * 0.6 * MIB * 2.5 + args.instances * 4096 + args.list_files * 8192
    rundir = RunDir.create(args.dir, need)
    if rundir is None:
        return 2
    info = banner("vnafs DICOM index benchmark", rundir)
    say(f"sizes: ingest {args.files} CT slices x {args.repeat} per mode; listing "
        f"{args.list_files}; index {args.instances:,} records; parts {','.join(args.only)}")

    rep = Report()
    ws = Workspace(rundir.path, exe, args.keep)
    interrupted = False
    started = time.perf_counter()
    parts: dict[str, Callable[[], None]] = {
        "ingest": lambda: part_ingest(ws, args.files, args.repeat, not args.no_warmup, rep),
        "listing": lambda: part_listing(ws, args.list_files, args.repeat, rep),
        "query": lambda: part_query(ws, args.instances, args.reps, args.cmd_reps, args.batch,
                                    rep),
    }
    with sigterm_as_interrupt():
        try:
            for name in PARTS:
                if name in args.only:
                    run_part(name, parts[name], rep)
        except KeyboardInterrupt:
            interrupted = True
            say("\ninterrupted: unmounting and cleaning up")
        finally:
            with signals_ignored():
                for t in reversed(ws.targets):
                    t.cleanup()
                rundir.remove(args.keep)

    return conclude(rep, args, machine=info, elapsed=time.perf_counter() - started,
                    interrupted=interrupted, units=f"cold = after unmount/mount and drop_caches; "
                    f"warm = median of {WARM_REPS}; MB/s = 10^6 B/s")


if __name__ == "__main__":
    sys.exit(main())
