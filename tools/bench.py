"""Side-by-side benchmark: vnafs, a plain directory and gocryptfs, same disk, same data, one run.

Why it exists. vnafs adds FUSE, compression, deduplication and AES-GCM to every byte a PACS
writes. Whether that is affordable is a relative question, so this tool answers it relative to
two fixed points measured in the same run on the same disk: a *plain directory* (the floor: the
disk and the page cache, no FUSE, no crypto) and *gocryptfs* (the usual way to encrypt such a
directory today: FUSE plus per-file encryption, no compression). The issue's performance targets
are stated as vnafs/gocryptfs time ratios; vnafs/plain shows the total cost of the file system.

What it does. Each target gets a fresh file system under --dir (default /var/tmp/vnafs-bench, so
the plain directory, the vnafs hot store and the gocryptfs cipher directory share one disk), and
runs, in this order:

1. write:  one SIZE file (--size-mib, default 1024) in 1 MiB writes, then fsync and close;
2. read:   that file read back in 1 MiB reads, cold: FUSE targets are unmounted and remounted
           (no daemon cache survives) and the kernel caches are dropped; the SHA-256 of what was
           read must equal that of what was written;
3. ingest: --files (default 2000) files of 512 KiB, open(O_CREAT|O_WRONLY), one write, close, no
           fsync, spread over 20 directories: one CT study arriving from a PACS;
   (1-3 run on CT-like data, then again on random bytes as "write:random" and so on; --data
   picks one or both)
4. smallw: a quarter as many 512 KiB files, each in 8 KiB writes: pydicom's `save_as` and
           storescp `+B`;
5. create: --meta-files (default 20000) files of 100 bytes in 100 directories;
6. walk:   after a remount and a cache drop, os.walk plus os.lstat of every entry of 5: what
           `ls -lR` or a backup scan does.

Every write workload (1, 3, 4, 5) is reported twice: when the writer got its last answer, and
"sustained", when the file system was idle again (for vnafs its control request `wait_idle`: no
block left unsealed, nothing queued for the DICOM indexer; gocryptfs and a plain directory do
their work inside each call). A file system that answers before it has finished (an intent log,
a write-back cache) shows it as a gap between the two.

The data is CT-like: 16-bit little-endian samples of a smooth phantom (air, water, soft tissue,
lungs, bone, contrast) plus gaussian noise of a few units, generated once as an 8 MiB pattern.
Every 1 MiB chunk is a different rotation of the pattern with its sequence number mixed into the
low byte of 4 samples per 4 KiB page, so no two chunks (or files) are equal and vnafs cannot
deduplicate them, while each chunk compresses like real pixel data (the zstd-1 ratio is printed).
The same chunks go to every target. Generating and hashing data is excluded from the timings.
The data is tools/gen_studies.CtData; the targets, the write, read and ingest workloads and the
run directory are tools/harness.py, shared with the other benchmarks.

How to read the output. Times are wall-clock seconds from time.perf_counter (lower is better),
rates are MB/s (10^6 bytes per second) or entries per second. vnafs/gocryptfs and vnafs/plain are
time ratios: 0.50 means vnafs needed half the time. The target column holds the issue's goal for
vnafs/gocryptfs and whether this run met it. "peak RSS" is the highest VmHWM of the file system
daemons, read just before each unmount (a remount starts a new daemon, so the maximum over the
daemon instances is shown); "stored" is the disk space the target's backing directory uses after
all workloads. One run on a busy or virtualised machine varies by 10-20 %: compare runs on the
same machine, and repeat before concluding.

Run it as root from the repository root with the project's virtualenv:

    .venv/bin/python -m tools.bench [--quick] [--only vnafs,plain,gocryptfs] [--json FILE]

Every mount it makes is unmounted on exit, also on Ctrl-C or SIGTERM, and the work directory is
removed unless --keep is given. Exit status: 0 when every workload ran, 1 when one failed (the
reason is printed under the table), 2 for a usage problem, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tools.gen_studies import CT_NOISE_SIGMA, CtData, RandomData
from tools.harness import (
    FAILURES,
    INGEST_DIRS,
    INGEST_SEQ_BASE,
    KIB,
    MIB,
    SMALL_FILE_BYTES,
    BenchError,
    Chunks,
    GocryptfsTarget,
    PlainTarget,
    Result,
    RunDir,
    Target,
    VnafsTarget,
    banner,
    disk_usage,
    drop_caches,
    find_vnafs,
    loadavg,
    parse_run_args,
    require_root,
    signals_ignored,
    sigterm_as_interrupt,
    store_file,
    wl_ingest,
    wl_read,
    wl_small_writes,
    wl_write,
)
from tools.report import say

PAGE = 4 * KIB
META_DIRS = 100
META_FILE_BYTES = 100

DEFAULT_DIR = "/var/tmp/vnafs-bench"
ALL_TARGETS = ("vnafs", "plain", "gocryptfs")
DEFAULT_SIZES = {"size_mib": 1024, "files": 2000, "meta_files": 20000}
QUICK_SIZES = {"size_mib": 256, "files": 500, "meta_files": 5000}


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    target: float | None  # the goal for the vnafs/gocryptfs time ratio
    # A write workload: also timed until the target is idle again ("sustained").
    writes: bool = False


# -- workloads ------------------------------------------------------------------------------------


@dataclass
class Sizes:
    size_mib: int
    files: int
    meta_files: int

    @property
    def small_write_files(self) -> int:
        """Files of the 8 KiB-writes workload: a quarter of the ingest's (64 writes each)."""
        return max(1, self.files // 4)


@dataclass
class TargetRun:
    """What one target produced."""

    version: str = ""
    results: dict[str, Result] = field(default_factory=dict)
    stored_bytes: int | None = None
    loadavg: list[float] = field(default_factory=list)  # at the start and at the end

def wl_meta_create(path: Path, count: int) -> Result:
    top = path / "meta"
    dirs = [top / f"d{d:03d}" for d in range(META_DIRS)]
    names = [str(dirs[k % META_DIRS] / f"f{k:06d}") for k in range(count)]
    contents = [(f"{k:09d}\n" * 10)[:META_FILE_BYTES].encode() for k in range(count)]
    t0 = time.perf_counter()
    top.mkdir()
    for d in dirs:
        d.mkdir()
    for name, content in zip(names, contents, strict=True):
        store_file(name, content)
    return Result(time.perf_counter() - t0, count, "files/s")


def wl_walk(path: Path, count: int) -> Result:
    top = str(path / "meta")
    entries = 0
    t0 = time.perf_counter()
    os.lstat(top)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.lstat(os.path.join(root, name))
            entries += 1
    seconds = time.perf_counter() - t0
    if entries != count + META_DIRS:
        raise BenchError(f"walked {entries} entries, expected {count + META_DIRS}")
    return Result(seconds, entries, "entries/s")


# Targets: docs/performance.md (issue 16's table). "random" runs the same workload on random
# bytes, which vnafs stores raw: the sealing without the compression.
WORKLOADS = (
    Workload("write", "seq write+fsync", 0.55, writes=True),
    Workload("read", "cold seq read", 0.45),
    Workload("ingest", "small-file ingest", 0.7, writes=True),
    Workload("smallw", "8 KiB writes", 1.0, writes=True),
    Workload("create", "creates", 1.0, writes=True),
    Workload("walk", "cold walk+lstat", 0.8),
    Workload("write:random", "seq write+fsync, random", 0.55, writes=True),
    Workload("read:random", "cold seq read, random", 0.45),
    Workload("ingest:random", "small-file ingest, random", 0.7, writes=True),
)
DATA_KINDS = ("ct", "random")


def run_target(t: Target, data: CtData, sizes: Sizes, out: TargetRun,
               kinds: tuple[str, ...] = DATA_KINDS) -> None:
    """All workloads on a fresh `t`, in order, into `out`; a failed workload is recorded.
    A write workload is timed twice: when the writer got its last answer (`seconds`), and
    when the target was idle again (`sustained`, `Target.wait_idle`)."""
    out.loadavg.append(loadavg())
    say(f"\n== {t.name}: {t.root}  (load average {out.loadavg[0]:.2f})")
    t.create()
    out.version = t.version()
    say(f"  {out.version}")
    t.mount()
    writes = {w.key for w in WORKLOADS if w.writes}

    def attempt(key: str, fn: Callable[[], Result], *, cold: bool = False) -> Result:
        try:
            dropped: bool | None = None
            if cold:  # a new daemon and empty kernel caches, untimed
                t.remount()
                dropped = drop_caches()
            t.served.append(key)
            t.check_ready()
            res = fn()
            if key in writes and res.seconds is not None:
                t1 = time.perf_counter()
                t.wait_idle()
                res.sustained = res.seconds + time.perf_counter() - t1
            res.cold = dropped
        except FAILURES as exc:
            res = Result(error=str(exc))
            say(f"  {key:<13} FAILED: {exc}")
        else:
            rate = res.rate
            note = "" if res.cold is None else ("  (cold)" if res.cold else "  (WARM)")
            idle = "" if res.sustained is None else f"  sustained {res.sustained:.2f} s"
            say(f"  {key:<13} {res.seconds or 0:9.2f} s  {rate or 0:10.1f} {res.unit}{note}{idle}")
        out.results[key] = res
        return res

    size = sizes.size_mib * MIB
    sources: dict[str, Chunks] = {"ct": data, "random": RandomData()}

    def sequential(kind: str) -> None:
        suffix = "" if kind == "ct" else f":{kind}"
        name = f"series-{kind}.raw"
        digest = ""

        def do_write() -> Result:
            nonlocal digest
            os.sync()
            res, digest = wl_write(t.path, sources[kind], sizes.size_mib, name)
            return res

        def do_read() -> Result:
            if not digest:
                raise BenchError("skipped: the write failed")
            return wl_read(t.path, size, digest, name)

        attempt("write" + suffix, do_write)
        attempt("read" + suffix, do_read, cold=True)

    def ingest(kind: str) -> None:
        suffix = "" if kind == "ct" else f":{kind}"

        def do_ingest() -> Result:
            os.sync()
            return wl_ingest(t.path, sources[kind], sizes.files, f"study-{kind}")

        attempt("ingest" + suffix, do_ingest)

    def do_small_writes() -> Result:
        os.sync()
        return wl_small_writes(t.path, data, sizes.small_write_files)

    def do_create() -> Result:
        os.sync()
        return wl_meta_create(t.path, sizes.meta_files)

    def do_walk() -> Result:
        if out.results["create"].error:
            raise BenchError("skipped: creating the files failed")
        return wl_walk(t.path, sizes.meta_files)

    for kind in kinds:
        sequential(kind)
        ingest(kind)
    attempt("smallw", do_small_writes)
    attempt("create", do_create)
    attempt("walk", do_walk, cold=True)
    t.umount()  # samples the daemon's VmHWM first
    out.loadavg.append(loadavg())
    with contextlib.suppress(OSError):
        out.stored_bytes = disk_usage(t.store)
    if t.peak_rss_kib is not None:
        say(f"  peak RSS {t.peak_rss_kib / 1024:.1f} MiB")


# -- the access audit's cost -----------------------------------------------------------------------

class VnafsAuditTarget(VnafsTarget):
    """vnafs with `[audit] enabled = true` (every create, write and open is recorded)."""

    name = "vnafs+audit"

    def create(self) -> None:
        super().create()
        cfg = self.hot / "vnafs.toml"
        lines = cfg.read_text().splitlines()
        at = lines.index("[audit]")
        lines.insert(at + 1, "enabled = true")
        cfg.write_text("\n".join(ln for i, ln in enumerate(lines)
                                 if not (i > at + 1 and ln == "enabled = false")) + "\n")


def daemon_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) the daemon `pid` has used so far; 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compare_audit(rundir: RunDir, exe: str, data: CtData, sizes: Sizes, rounds: int
                  ) -> dict[str, dict[str, list[float]]]:
    """The cost of the audit, measured so that a busy machine disturbs it least: two stores,
    audit off and on, mounted side by side; each round runs the same step on both, in
    alternating order, back to back: an ingest of `sizes.files` files of 512 KiB into a new
    directory (create, one write, close), then a cold read of those files (remount, drop
    caches, open and read each: one audited open per file, as a viewer loads a study). Per
    step and target: the wall time and the daemon's CPU time. Returns, per step, the lists of
    on/off ratios of both, one per round."""
    off = VnafsTarget(rundir.path / "audit-off", exe)
    on = VnafsAuditTarget(rundir.path / "audit-on", exe)
    out: dict[str, dict[str, list[float]]] = {
        step: {"wall": [], "cpu": []} for step in ("ingest", "cold read")}
    try:
        for t in (off, on):
            t.create()
            t.mount()
        for n in range(rounds):
            seen: dict[tuple[str, str], tuple[float, float]] = {}
            pair = (off, on) if n % 2 == 0 else (on, off)
            for step in ("ingest", "cold read"):
                for t in pair:
                    if step == "cold read":
                        t.remount()
                        drop_caches()
                    cpu0, t0 = daemon_cpu(t.pid()), time.perf_counter()
                    if step == "ingest":
                        _ingest_round(t.path / f"round{n}", data, sizes.files, n)
                    else:
                        _read_round(t.path / f"round{n}")
                    seen[(step, t.name)] = (time.perf_counter() - t0,
                                            daemon_cpu(t.pid()) - cpu0)
                (w_off, c_off), (w_on, c_on) = seen[(step, off.name)], seen[(step, on.name)]
                out[step]["wall"].append(w_on / w_off)
                if c_off > 0 and c_on > 0:
                    out[step]["cpu"].append(c_on / c_off)
                say(f"  round {n + 1} {step:<9} off {w_off:6.2f} s ({c_off:5.2f} s CPU)  "
                    f"on {w_on:6.2f} s ({c_on:5.2f} s CPU)")
    finally:
        for t in (off, on):
            with signals_ignored():
                t.cleanup()
                t.discard(False)
    return out


def _ingest_round(top: Path, data: CtData, files: int, seq: int) -> None:
    top.mkdir()
    base = INGEST_SEQ_BASE + seq * files  # new chunks every round: nothing deduplicates
    for k in range(files):
        store_file(top / f"IM{k:06d}.dcm", data.chunk(base + k)[:SMALL_FILE_BYTES])


def _read_round(top: Path) -> None:
    for path in sorted(top.iterdir()):
        with open(path, "rb", buffering=0) as f:
            while f.read(CHUNK_READ):
                pass


CHUNK_READ = 1 << 20


# -- report ---------------------------------------------------------------------------------------


def _seconds(res: Result, sustained: bool) -> float | None:
    return res.sustained if sustained else res.seconds


def _cell(res: Result | None, sustained: bool = False) -> str:
    if res is None:
        return "-"
    secs = _seconds(res, sustained)
    if res.error is not None or secs is None or secs <= 0:
        return "FAILED"
    rate = res.amount / secs / (1e6 if res.unit == "MB/s" else 1.0)
    unit = "MB/s" if res.unit == "MB/s" else "/s"
    warm = "*" if res.cold is False else " "
    return f"{secs:8.2f} s {rate:8.0f} {unit:<4}{warm}"


def ratio(runs: dict[str, TargetRun], a: str, b: str, key: str, *,
          sustained: bool = False) -> float | None:
    ra = runs[a].results.get(key) if a in runs else None
    rb = runs[b].results.get(key) if b in runs else None
    if ra is None or rb is None or ra.error or rb.error:
        return None
    sa, sb = _seconds(ra, sustained), _seconds(rb, sustained)
    if sa is None or sb is None or sb <= 0:
        return None
    return sa / sb


def workload_label(w: Workload, sizes: Sizes) -> str:
    detail = {
        "write": f"{sizes.size_mib} MiB",
        "read": f"{sizes.size_mib} MiB",
        "ingest": f"{sizes.files} x 512 KiB",
        "smallw": f"{sizes.small_write_files} x 512 KiB",
        "walk": f"{sizes.meta_files + META_DIRS} entries",
        "create": f"{sizes.meta_files} x 100 B",
    }[w.key.split(":")[0]]
    return f"{w.label} {detail}"


def report(runs: dict[str, TargetRun], targets: dict[str, Target], sizes: Sizes) -> list[str]:
    names = [n for n in ALL_TARGETS if n in runs]
    label_w = max(len(workload_label(w, sizes)) for w in WORKLOADS) + 4
    col = 26
    head = "workload".ljust(label_w) + "".join(n.rjust(col) for n in names)
    head += "  vnafs/gocryptfs  target        vnafs/plain"
    lines = [head, "-" * len(head)]
    ran = [w for w in WORKLOADS if any(w.key in runs[n].results for n in names)]
    for w in ran:
        for sustained in (False, True) if w.writes else (False,):
            label = ("  ... sustained (until idle)" if sustained
                     else workload_label(w, sizes))
            line = label.ljust(label_w)
            line += "".join(_cell(runs[n].results.get(w.key), sustained).rjust(col)
                            for n in names)
            vg = ratio(runs, "vnafs", "gocryptfs", w.key, sustained=sustained)
            vp = ratio(runs, "vnafs", "plain", w.key, sustained=sustained)
            line += f"  {vg:15.2f}" if vg is not None else "  " + "-".rjust(15)
            if w.target is not None and not sustained:
                verdict = "" if vg is None else ("  ok" if vg <= w.target else "  MISS")
                line += f"  <= {w.target:<4.2f}{verdict}".ljust(14)
            else:
                line += "".ljust(14)
            line += f"{vp:12.2f}" if vp is not None else "-".rjust(12)
            lines.append(line)
    rss = "peak RSS (VmHWM)".ljust(label_w)
    for n in names:
        peak = targets[n].peak_rss_kib
        rss += (f"{peak / 1024:.1f} MiB" if peak is not None else "-").rjust(col)
    lines.append(rss)
    stored = "stored on disk".ljust(label_w)
    for n in names:
        b = runs[n].stored_bytes
        stored += (f"{b / MIB:.1f} MiB" if b is not None else "-").rjust(col)
    lines.append(stored)
    load = "load average (start-end)".ljust(label_w)
    for n in names:
        la = runs[n].loadavg
        load += ("-".join(f"{x:.1f}" for x in la) if la else "-").rjust(col)
    lines.append(load)
    lines.append("")
    lines.append("times in s (lower is better); rates in MB/s = 10^6 B/s, or entries (files) per s;"
                 " ratios are time ratios; * = caches could not be dropped (warm)")
    lines.append("a write workload's first row is when the writer got its last answer, its "
                 "'sustained' row when the file system was idle again (vnafs: nothing unsealed "
                 "or unindexed)")
    for n in names:
        for key, res in runs[n].results.items():
            if res.error:
                lines.append(f"{n} {key} failed: {res.error}")
    return lines


# -- main -----------------------------------------------------------------------------------------


class _FormatTarget(VnafsTarget):
    """vnafs made with `mkfs --format N` (docs/performance.md, "Block ids")."""

    def __init__(self, root: Path, exe: str, version: int) -> None:
        super().__init__(root, exe)
        self.store_format = version

    def mkfs_options(self) -> list[str]:
        return ["--format", str(self.store_format)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="Benchmark vnafs against a plain directory and gocryptfs on the same disk "
                    "(run as root).")
    p.add_argument("--size-mib", type=int, help="sequential file size in MiB (default 1024)")
    p.add_argument("--files", type=int, help="small files to ingest (default 2000)")
    p.add_argument("--meta-files", type=int, help="files for the metadata walk (default 20000)")
    p.add_argument("--vnafs-format", type=int, choices=(1, 2),
                   help="store format of the vnafs target (default: what mkfs writes, 2, keyed "
                   "BLAKE3 block ids; 1: HMAC-SHA256 block ids, to compare the two)")
    p.add_argument("--data", default=",".join(DATA_KINDS), metavar="KINDS",
                   help="data for the write, read and ingest workloads: ct, random or both "
                   "(default ct,random)")
    p.add_argument("--audit-rounds", type=int, default=0, metavar="N",
                   help="instead: the cost of [audit] enabled = true, N rounds of ingest and "
                   "cold read of --files files on two stores, audit off and on, side by side")
    return parse_run_args(p, argv, default_dir=DEFAULT_DIR, names=ALL_TARGETS,
                          quick_help="256 MiB, 500 files, 5000 metadata files",
                          default_sizes=DEFAULT_SIZES, quick_sizes=QUICK_SIZES)


def _audit_report(rundir: RunDir, exe: str, data: CtData, sizes: Sizes,
                  args: argparse.Namespace) -> int:
    """`--audit-rounds N`: run `compare_audit`, print the ratios (and write --json)."""
    import statistics

    say(f"audit off and on, {args.audit_rounds} rounds of {sizes.files} files x 512 KiB "
        "(ingest, then a cold read of them)")
    try:
        with sigterm_as_interrupt():
            ratios = compare_audit(rundir, exe, data, sizes, args.audit_rounds)
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        with signals_ignored():
            rundir.remove(args.keep)
    say("\naudit on / audit off per round (1.00 = no cost; the goal is <= 1.05)")
    for step, kinds in ratios.items():
        for kind, values in kinds.items():
            cells = " ".join(f"{v:.3f}" for v in values)
            med = f"median {statistics.median(values):.3f}" if values else "no result"
            say(f"  {step:<9} {kind:<4} {cells}  {med}")
    if args.json:
        Path(args.json).write_text(json.dumps({"audit_on_off_ratios": ratios}, indent=2))
    return 0 if all(k["wall"] for k in ratios.values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not require_root("bench"):
        return 2
    sizes = Sizes(args.size_mib, args.files, args.meta_files)
    wanted: list[str] = list(args.only)
    vnafs_exe = find_vnafs()
    gocryptfs_exe = shutil.which("gocryptfs")
    skipped: dict[str, str] = {}
    if "vnafs" in wanted and vnafs_exe is None:
        skipped["vnafs"] = "the vnafs command is not installed (make venv)"
    if "gocryptfs" in wanted and gocryptfs_exe is None:
        skipped["gocryptfs"] = "gocryptfs is not installed (apt-get install gocryptfs)"
    if any(n in wanted for n in ("vnafs", "gocryptfs")) and shutil.which("fusermount3") is None:
        for n in ("vnafs", "gocryptfs"):
            skipped.setdefault(n, "fusermount3 is missing (apt-get install fuse3)")
    wanted = [n for n in wanted if n not in skipped]
    for n, why in skipped.items():
        if n in args.only:
            say(f"{n}: skipped: {why}")
    if not wanted:
        say("nothing to benchmark")
        return 2

    kinds = tuple(k for k in args.data.split(",") if k)
    if not kinds or any(k not in DATA_KINDS for k in kinds):
        say(f"--data: give ct, random or ct,random (got {args.data!r})")
        return 2
    need = (len(kinds) * (sizes.size_mib * MIB + sizes.files * SMALL_FILE_BYTES)
            + sizes.small_write_files * SMALL_FILE_BYTES
            + sizes.meta_files * PAGE) * (len(wanted) if args.keep else 1)
    rundir = RunDir.create(args.dir, need * 1.2)
    if rundir is None:
        return 2
    info = banner("vnafs benchmark", rundir)
    say(f"sizes: sequential {sizes.size_mib} MiB in 1 MiB writes; ingest {sizes.files} files "
        f"x 512 KiB in {INGEST_DIRS} dirs; walk {sizes.meta_files} files x 100 B in "
        f"{META_DIRS} dirs")
    t0 = time.perf_counter()
    data = CtData()
    ratio_z = data.zstd1_ratio()
    zs = f"{ratio_z:.2f}x" if ratio_z is not None else "n/a (zstandard not importable)"
    say(f"data: CT-like 16-bit phantom + noise (sigma {CT_NOISE_SIGMA:g}); zstd-1 ratio per "
        f"1 MiB chunk {zs}; pattern built in {time.perf_counter() - t0:.1f} s")

    if args.audit_rounds:
        assert vnafs_exe is not None
        return _audit_report(rundir, vnafs_exe, data, sizes, args)
    targets: dict[str, Target] = {}
    runs: dict[str, TargetRun] = {}
    interrupted = False
    with sigterm_as_interrupt():
        try:
            for name in wanted:
                root = rundir.path / name
                t: Target
                if name == "vnafs":
                    assert vnafs_exe is not None
                    t = (VnafsTarget(root, vnafs_exe) if args.vnafs_format is None
                         else _FormatTarget(root, vnafs_exe, args.vnafs_format))
                elif name == "gocryptfs":
                    assert gocryptfs_exe is not None
                    t = GocryptfsTarget(root, gocryptfs_exe)
                else:
                    t = PlainTarget(root)
                targets[name] = t
                runs[name] = TargetRun()
                try:
                    run_target(t, data, sizes, runs[name], kinds)
                except FAILURES as exc:
                    say(f"  {name}: FAILED: {exc}")
                    runs[name].results["setup"] = Result(error=str(exc))
                finally:
                    t.discard(args.keep)
                os.sync()
        except KeyboardInterrupt:
            interrupted = True
            say("\ninterrupted: unmounting and cleaning up")
        finally:
            with signals_ignored():
                for t in reversed(list(targets.values())):
                    t.cleanup()
                rundir.remove(args.keep)

    say("")
    for line in report(runs, targets, sizes):
        say(line)
    for n, why in skipped.items():
        if n in args.only:
            say(f"{n}: skipped: {why}")

    if args.json:
        doc = {
            "machine": info,
            "sizes": {"size_mib": sizes.size_mib, "files": sizes.files,
                      "file_bytes": SMALL_FILE_BYTES, "ingest_dirs": INGEST_DIRS,
                      "meta_files": sizes.meta_files, "meta_dirs": META_DIRS,
                      "meta_file_bytes": META_FILE_BYTES},
            "data": {"zstd1_ratio": ratio_z, "noise_sigma": CT_NOISE_SIGMA},
            "targets": {
                n: {"version": runs[n].version,
                    "results": {k: r.as_dict() for k, r in runs[n].results.items()},
                    "peak_rss_kib": targets[n].peak_rss_kib if n in targets else None,
                    "rss": targets[n].rss if n in targets else [],
                    "stored_bytes": runs[n].stored_bytes,
                    "loadavg": runs[n].loadavg}
                for n in runs
            },
            "ratios": {
                w.key: {"vnafs/gocryptfs": ratio(runs, "vnafs", "gocryptfs", w.key),
                        "vnafs/plain": ratio(runs, "vnafs", "plain", w.key),
                        "target_vnafs/gocryptfs": w.target}
                for w in WORKLOADS
            },
            "skipped": skipped,
            "interrupted": interrupted,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        say(f"wrote {args.json}")
    if interrupted:
        return 130
    failed = any(r.error for tr in runs.values() for r in tr.results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
