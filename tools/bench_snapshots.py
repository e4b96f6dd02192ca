"""What snapshots cost: creation time against tree size, reads through a snapshot, and writes
with many snapshots present (`python -m tools.bench_snapshots`, as root).

Snapshots are promised to be O(1) to create and free for readers and writers
(docs/architecture.md section 10); this tool measures those claims on real mounts made with
the real CLI, side by side in one run, and prints ratios (it asserts nothing):

- create: a tree of N files (built offline through `Namespace.mknod`, 5,000 per transaction,
  so 100,000 files take seconds), mounted; `snapshot_create` through the control socket, 5
  times, median; and the wall time of the `vnafs snapshot create` command;
- read: one CT-like file (`--read-mib`) read cold (remount + drop_caches) live, then cold
  through a snapshot of it;
- write: small-file ingest (`--files` x 0.5 MiB) into a fresh file system without snapshots
  and into one with `--snapshots` snapshots, each taken after overwriting 20 files of a base
  set, so the metadata holds many versions; an uncounted warm-up first.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tools.gen_studies import CtData
from tools.harness import (
    MIB,
    SMALL_FILE_BYTES,
    BenchError,
    Result,
    RunDir,
    VnafsTarget,
    drop_caches,
    loadavg,
    parse_run_args,
    preflight,
    sigterm_as_interrupt,
    wl_ingest,
    wl_read,
    wl_write,
)
from tools.report import say
from vnafs.control import control_request
from vnafs.keys import resolve_kek_source
from vnafs.meta.records import ROOT_INO
from vnafs.meta.tx import Tx
from vnafs.store.lifecycle import open_store

DEFAULT_DIR = "/var/tmp/vnafs-bench-snapshots"
PARTS = ("create", "read", "write")
DEFAULT_SIZES = {"read_mib": 512, "files": 1000}
QUICK_SIZES = {"read_mib": 128, "files": 300}


def _rate(res: Result) -> float:
    if res.rate is None:
        raise BenchError("a workload took no measurable time")
    return float(res.rate)


def build_tree(t: VnafsTarget, files: int) -> None:
    """`files` empty files in directories of 1,000, written straight into LMDB (unmounted)."""
    store = open_store(t.hot, resolve_kek_source(str(t.key), None))
    try:
        ns = store.ns
        made = 0
        d = 0
        while made < files:
            with store.db.begin(write=True) as txn:
                tx = Tx(txn, time.time_ns())
                parent = ns.mknod(tx, ROOT_INO, f"d{d:04d}".encode(), stat.S_IFDIR | 0o755,
                                  0, 0).ino
                for k in range(min(1000, files - made)):
                    ns.mknod(tx, parent, f"f{k:04d}".encode(), stat.S_IFREG | 0o644, 0, 0)
                made += min(1000, files - made)
            d += 1
    finally:
        store.close()


def part_create(rundir: Path, exe: str, sizes: list[int], out: dict[str, Any]) -> None:
    for n in sizes:
        t = VnafsTarget(rundir / f"create-{n}", exe)
        try:
            t.create()
            t0 = time.perf_counter()
            build_tree(t, n)
            say(f"  built {n} files offline in {time.perf_counter() - t0:.1f} s")
            t.mount()
            socket_ms = []
            for i in range(5):
                t0 = time.perf_counter()
                control_request(t.hot, {"op": "snapshot_create", "name": f"s{i}"})
                socket_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            t.vnafs("snapshot", "create", str(t.path), "cli")
            cli_ms = (time.perf_counter() - t0) * 1000
            listed = len(os.listdir(t.path / ".snapshots" / "cli"))
            if listed != -(-n // 1000):
                raise BenchError(f"the snapshot of {n} files lists {listed} directories")
            out[f"create_{n}"] = {"socket_ms_median": statistics.median(socket_ms),
                                  "socket_ms_all": socket_ms, "cli_ms": cli_ms}
            say(f"  {n} files: snapshot_create median {statistics.median(socket_ms):.2f} ms "
                f"(socket), command {cli_ms:.0f} ms")
        finally:
            t.discard()


def part_read(rundir: Path, exe: str, data: CtData, size_mib: int, out: dict[str, Any]
              ) -> None:
    t = VnafsTarget(rundir / "read", exe)
    try:
        t.create()
        t.mount()
        _, digest = wl_write(t.path, data, size_mib)
        t.vnafs("snapshot", "create", str(t.path), "r")
        results = {}
        for label, path in (("live", t.path), ("snapshot", t.path / ".snapshots" / "r")):
            t.umount()
            drop_caches()
            t.mount()
            res = wl_read(path, size_mib * MIB, digest)
            results[label] = _rate(res)
            say(f"  cold read {label}: {results[label]:.0f} MB/s")
        out["read"] = {"live_mb_s": results["live"], "snapshot_mb_s": results["snapshot"],
                       "ratio": results["snapshot"] / results["live"]}
    finally:
        t.discard()


def _ingest_fs(rundir: Path, exe: str, name: str, data: CtData, files: int, snapshots: int
               ) -> float:
    t = VnafsTarget(rundir / name, exe)
    try:
        t.create()
        t.mount()
        if snapshots:
            base = t.path / "base"
            base.mkdir()
            for k in range(100):
                (base / f"b{k:03d}").write_bytes(data.chunk(900_000 + k)[:SMALL_FILE_BYTES])
            for i in range(snapshots):
                for k in range(20):  # every snapshot keeps 20 old versions alive
                    victim = base / f"b{(i * 20 + k) % 100:03d}"
                    victim.write_bytes(data.chunk(1_000_000 + i * 20 + k)[:SMALL_FILE_BYTES])
                control_request(t.hot, {"op": "snapshot_create", "name": f"s{i:03d}"})
        return _rate(wl_ingest(t.path, data, files))
    finally:
        t.discard()


def part_write(rundir: Path, exe: str, data: CtData, files: int, snapshots: int,
               out: dict[str, Any]) -> None:
    _ingest_fs(rundir, exe, "warm-up", data, files, 0)
    rates: dict[str, list[float]] = {"none": [], "many": []}
    for _ in range(2):
        rates["none"].append(_ingest_fs(rundir, exe, "w0", data, files, 0))
        rates["many"].append(_ingest_fs(rundir, exe, "wN", data, files, snapshots))
        say(f"  ingest: none {rates['none'][-1]:.0f} MB/s, {snapshots} snapshots "
            f"{rates['many'][-1]:.0f} MB/s")
    none, many = statistics.median(rates["none"]), statistics.median(rates["many"])
    out["write"] = {"no_snapshots_mb_s": none, "with_snapshots_mb_s": many,
                    "snapshots": snapshots, "ratio": many / none, "runs": rates}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_snapshots", description=__doc__)
    p.add_argument("--read-mib", type=int)
    p.add_argument("--files", type=int)
    p.add_argument("--snapshots", type=int, default=50)
    args = parse_run_args(p, argv, default_dir=DEFAULT_DIR, names=PARTS,
                          quick_help="smaller sizes (about a minute)",
                          default_sizes=DEFAULT_SIZES, quick_sizes=QUICK_SIZES,
                          positive=("snapshots",))
    exe = preflight("bench_snapshots")
    if exe is None:
        return 2
    parts = set(args.only)
    sizes = [1_000, 10_000] if args.quick else [10_000, 100_000]
    read_mib, files = args.read_mib, args.files
    # One file system at a time, at most the read file, or the ingest with the base set and
    # every overwritten version the snapshots keep (uncompressed, so an upper bound).
    need = max(read_mib * MIB, (files + 100 + 20 * args.snapshots) * SMALL_FILE_BYTES)
    run_dir = RunDir.create(args.dir, need)
    if run_dir is None:
        return 2
    rundir = run_dir.path
    data = CtData()
    out: dict[str, Any] = {"load_before": loadavg()}
    with sigterm_as_interrupt():
        try:
            if "create" in parts:
                say("snapshot creation against tree size")
                part_create(rundir, exe, sizes, out)
            if "read" in parts:
                say(f"cold read of {read_mib} MiB, live and through a snapshot")
                part_read(rundir, exe, data, read_mib, out)
            if "write" in parts:
                say(f"ingest of {files} x 0.5 MiB with 0 and {args.snapshots} snapshots")
                part_write(rundir, exe, data, files, args.snapshots, out)
        finally:
            run_dir.remove(args.keep)
    out["load_after"] = loadavg()
    print("\nresults")
    for n in sizes:
        c = out.get(f"create_{n}")
        if c:
            print(f"  snapshot create, {n:>7} files: {c['socket_ms_median']:.2f} ms (socket, "
                  f"median of 5), {c['cli_ms']:.0f} ms (command)")
    if "read" in out:
        r = out["read"]
        print(f"  cold read: live {r['live_mb_s']:.0f} MB/s, snapshot {r['snapshot_mb_s']:.0f} "
              f"MB/s, ratio {r['ratio']:.2f}")
    if "write" in out:
        w = out["write"]
        print(f"  ingest: no snapshots {w['no_snapshots_mb_s']:.0f} MB/s, {w['snapshots']} "
              f"snapshots {w['with_snapshots_mb_s']:.0f} MB/s, ratio {w['ratio']:.2f} "
              "(target >= 0.90)")
    print(f"  load average {out['load_before']:.2f} -> {out['load_after']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
