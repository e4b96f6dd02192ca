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
import shutil
import stat
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tools.bench import (
    MIB,
    SMALL_FILE_BYTES,
    BenchError,
    CtData,
    VnafsTarget,
    drop_caches,
    loadavg,
    preflight,
    run,
    say,
    signals_ignored,
    wl_ingest,
    wl_read,
    wl_write,
)
from vnafs.daemon import control_request, open_store
from vnafs.keys import resolve_kek_source
from vnafs.meta.namespace import Tx
from vnafs.meta.records import ROOT_INO

VNAFS = str(Path(sys.executable).with_name("vnafs"))


def _rate(res: Any) -> float:
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


def part_create(rundir: Path, sizes: list[int], out: dict[str, Any]) -> None:
    for n in sizes:
        t = VnafsTarget(rundir / f"create-{n}", VNAFS)
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
            run([VNAFS, "snapshot", "create", str(t.path), "cli"])
            cli_ms = (time.perf_counter() - t0) * 1000
            listed = len(os.listdir(t.path / ".snapshots" / "cli"))
            if listed != -(-n // 1000):
                raise BenchError(f"the snapshot of {n} files lists {listed} directories")
            out[f"create_{n}"] = {"socket_ms_median": statistics.median(socket_ms),
                                  "socket_ms_all": socket_ms, "cli_ms": cli_ms}
            say(f"  {n} files: snapshot_create median {statistics.median(socket_ms):.2f} ms "
                f"(socket), command {cli_ms:.0f} ms")
        finally:
            with signals_ignored():
                t.cleanup()
            shutil.rmtree(t.root, ignore_errors=True)


def part_read(rundir: Path, data: CtData, size_mib: int, out: dict[str, Any]) -> None:
    t = VnafsTarget(rundir / "read", VNAFS)
    try:
        t.create()
        t.mount()
        _, digest = wl_write(t.path, data, size_mib)
        run([VNAFS, "snapshot", "create", str(t.path), "r"])
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
        with signals_ignored():
            t.cleanup()
        shutil.rmtree(t.root, ignore_errors=True)


def _ingest_fs(rundir: Path, name: str, data: CtData, files: int, snapshots: int) -> float:
    t = VnafsTarget(rundir / name, VNAFS)
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
        with signals_ignored():
            t.cleanup()
        shutil.rmtree(t.root, ignore_errors=True)


def part_write(rundir: Path, data: CtData, files: int, snapshots: int,
               out: dict[str, Any]) -> None:
    _ingest_fs(rundir, "warm-up", data, files, 0)
    rates: dict[str, list[float]] = {"none": [], "many": []}
    for _ in range(2):
        rates["none"].append(_ingest_fs(rundir, "w0", data, files, 0))
        rates["many"].append(_ingest_fs(rundir, "wN", data, files, snapshots))
        say(f"  ingest: none {rates['none'][-1]:.0f} MB/s, {snapshots} snapshots "
            f"{rates['many'][-1]:.0f} MB/s")
    none, many = statistics.median(rates["none"]), statistics.median(rates["many"])
    out["write"] = {"no_snapshots_mb_s": none, "with_snapshots_mb_s": many,
                    "snapshots": snapshots, "ratio": many / none, "runs": rates}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_snapshots", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    p.add_argument("--dir", default="/var/tmp/vnafs-bench-snapshots")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--only", default="create,read,write")
    p.add_argument("--read-mib", type=int)
    p.add_argument("--files", type=int)
    p.add_argument("--snapshots", type=int, default=50)
    args = p.parse_args(argv)
    if preflight("bench_snapshots") is None:
        return 2
    parts = set(args.only.split(","))
    sizes = [1_000, 10_000] if args.quick else [10_000, 100_000]
    read_mib = args.read_mib or (128 if args.quick else 512)
    files = args.files or (300 if args.quick else 1000)
    rundir = Path(args.dir)
    if rundir.exists():
        shutil.rmtree(rundir)
    rundir.mkdir(parents=True)
    data = CtData()
    out: dict[str, Any] = {"load_before": loadavg()}
    try:
        if "create" in parts:
            say("snapshot creation against tree size")
            part_create(rundir, sizes, out)
        if "read" in parts:
            say(f"cold read of {read_mib} MiB, live and through a snapshot")
            part_read(rundir, data, read_mib, out)
        if "write" in parts:
            say(f"ingest of {files} x 0.5 MiB with 0 and {args.snapshots} snapshots")
            part_write(rundir, data, files, args.snapshots, out)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
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
