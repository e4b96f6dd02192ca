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
4. walk:   --meta-files (default 20000) files of 100 bytes in 100 directories are created (timed
           for information only), then after a remount and a cache drop, os.walk plus os.lstat of
           every entry is timed: what `ls -lR` or a backup scan does.

The data is CT-like: 16-bit little-endian samples of a smooth phantom (air, water, soft tissue,
lungs, bone, contrast) plus gaussian noise of a few units, generated once as an 8 MiB pattern.
Every 1 MiB chunk is a different rotation of the pattern with its sequence number mixed into the
low byte of 4 samples per 4 KiB page, so no two chunks (or files) are equal and vnafs cannot
deduplicate them, while each chunk compresses like real pixel data (the zstd-1 ratio is printed).
The same chunks go to every target. Generating and hashing data is excluded from the timings.

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
import array
import contextlib
import hashlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

KIB = 1 << 10
MIB = 1 << 20
PAGE = 4 * KIB
CHUNK = MIB
PATTERN_BYTES = 8 * MIB
SLICE_SIDE = 512  # 512 x 512 x 2 bytes = 512 KiB per slice, 16 slices per pattern
NOISE_SIGMA = 6.0  # detector noise in stored units; gives about 2x with zstd level 1
SEED = 20240601
SMALL_FILE_BYTES = 512 * KIB
INGEST_DIRS = 20
META_DIRS = 100
META_FILE_BYTES = 100
# Chunk sequence numbers: the sequential file uses 0.., the small files start here.
INGEST_SEQ_BASE = 1 << 21

DEFAULT_DIR = "/var/tmp/vnafs-bench"
ALL_TARGETS = ("vnafs", "plain", "gocryptfs")
DEFAULT_SIZES = {"size_mib": 1024, "files": 2000, "meta_files": 20000}
QUICK_SIZES = {"size_mib": 256, "files": 500, "meta_files": 5000}


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    target: float | None  # the goal for the vnafs/gocryptfs time ratio


@dataclass
class Result:
    seconds: float | None = None
    amount: float = 0.0  # bytes for MB/s, else a count
    unit: str = "MB/s"
    cold: bool | None = None  # None: not a cold workload
    error: str | None = None

    @property
    def rate(self) -> float | None:
        if self.seconds is None or self.seconds <= 0:
            return None
        return self.amount / self.seconds / (1e6 if self.unit == "MB/s" else 1.0)

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "amount": self.amount, "unit": self.unit,
                "rate": self.rate, "cold": self.cold, "error": self.error}


class BenchError(Exception):
    """A workload or a mount failed; the message says how."""


# -- helpers --------------------------------------------------------------------------------------


def say(msg: str) -> None:
    print(msg, flush=True)


def run(argv: list[str], *, timeout: float = 300.0, env: dict[str, str] | None = None) -> str:
    """Run a command, return its output, raise BenchError with the output if it fails."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None
    if res.returncode != 0:
        out = (res.stdout + res.stderr).strip()
        raise BenchError(f"{' '.join(argv)} failed ({res.returncode}): {out}")
    return res.stdout


def _unescape(field_: str) -> str:
    return field_.encode().decode("unicode_escape").encode("latin-1").decode(
        "utf-8", "surrogateescape")


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) of every mount, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rf = left.split(), right.split()
            if len(fields) >= 5 and rf:
                found.append((_unescape(fields[4]), rf[0], _unescape(rf[1]) if len(rf) > 1 else ""))
    return found


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    return any(mp == target for mp, _, _ in _mounts())


def mounted_under(path: Path) -> list[str]:
    top = os.path.realpath(path)
    return [mp for mp, _, _ in _mounts() if mp == top or mp.startswith(top + "/")]


def fs_of(path: Path) -> tuple[str, str]:
    """(fs type, source) of the file system holding `path`."""
    real = os.path.realpath(path)
    best = ("", "?", "?")
    for mp, kind, src in _mounts():
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and len(mp) >= len(best[0]):
            best = (mp, kind, src)
    return best[1], best[2]


def proc_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("State:"):
            return line.split()[1] != "Z"
    return True


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def vm_hwm_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while proc_alive(pid):
        if time.monotonic() > deadline:
            return False
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    return True


def kill_if(pid: int | None, marker: str) -> None:
    """SIGKILL a daemon this run started, by PID, if it still runs and is what we think it is."""
    if pid is None or not proc_alive(pid):
        return
    argv = proc_cmdline(pid)
    if argv and marker in os.path.basename(argv[0]) + " " + " ".join(argv[1:2]):
        say(f"  killing {marker} daemon {pid} that survived its unmount")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10.0)


def disk_usage(path: Path) -> int:
    """Bytes allocated under `path` (like du), following no symlinks."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


_drop_warned = False


def drop_caches() -> bool:
    """sync; echo 3 > /proc/sys/vm/drop_caches. False (with one warning) if not allowed."""
    global _drop_warned
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        if not _drop_warned:
            say(f"WARNING: cannot drop the page cache ({exc.strerror}): 'cold' results are warm")
            _drop_warned = True
        return False
    return True


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Let cleanup finish even if Ctrl-C is pressed again."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# -- test data ------------------------------------------------------------------------------------


# (centre x, centre y, radius x, radius y, value) as fractions of the slice, painted in order;
# values are CT numbers + 1024 (air 24, water 1024, bone about 1900).
CT_SHAPES: tuple[tuple[float, float, float, float, int], ...] = (
    (0.50, 0.52, 0.40, 0.30, 1024),  # body outline, water
    (0.50, 0.52, 0.37, 0.27, 1060),  # soft tissue
    (0.33, 0.45, 0.10, 0.13, 300),   # lungs
    (0.67, 0.45, 0.10, 0.13, 300),
    (0.45, 0.55, 0.06, 0.05, 1080),  # heart
    (0.58, 0.62, 0.03, 0.03, 1300),  # contrast-filled vessel
    (0.50, 0.70, 0.05, 0.04, 1900),  # vertebra
    (0.50, 0.70, 0.025, 0.02, 1150),  # spinal canal
)
AIR = 24  # CT number of air + 1024: the background of CT_SHAPES


def phantom_pattern(nbytes: int = PATTERN_BYTES, seed: int = SEED) -> bytes:
    """`nbytes` of consecutive CT slices: a phantom that changes slowly along z, plus noise."""
    rng = random.Random(seed)
    normal = statistics.NormalDist(0.0, NOISE_SIGMA)
    # Noise through a 256-entry inverse-CDF table indexed by random bytes: gaussian and fast.
    # Clamped to 3 sigma < AIR, so no sample goes below zero.
    limit = min(AIR, round(3 * NOISE_SIGMA))
    table = [max(-limit, min(limit, round(normal.inv_cdf((i + 0.5) / 256)))) for i in range(256)]
    n = SLICE_SIDE
    slices = nbytes // (2 * n * n)
    out = bytearray()
    for s in range(slices):
        z = s / max(1, slices)
        values: list[int] = []
        for y in range(n):
            row = [AIR] * n
            fy = (y + 0.5) / n
            for cx, cy, rx, ry, v in CT_SHAPES:
                ry_z = ry * (1 + 0.15 * z)  # organs grow and shrink between slices
                d = 1 - ((fy - cy) / ry_z) ** 2
                if d <= 0:
                    continue
                half = rx * (1 - 0.05 * z) * d**0.5
                x0, x1 = max(0, round((cx - half) * n)), min(n, round((cx + half) * n))
                if x1 > x0:
                    row[x0:x1] = [v] * (x1 - x0)
            values.extend(row)
        noise = rng.randbytes(n * n)
        samples = array.array("H", [p + table[b] for p, b in zip(values, noise, strict=True)])
        if sys.byteorder == "big":
            samples.byteswap()
        out += samples.tobytes()
    return bytes(out)


class CtData:
    """Distinct 1 MiB CT-like chunks, cheap to make, from one pattern."""

    def __init__(self) -> None:
        pattern = phantom_pattern()
        self._ring = pattern + pattern[:CHUNK]  # any 1 MiB window, wrapping around
        self._samples = len(pattern) // 2
        self._xor = [bytes(i ^ c for i in range(256)) for c in range(256)]

    def chunk(self, seq: int) -> bytes:
        """Chunk number `seq`: distinct for every seq below 2**22 (4 TiB of chunks)."""
        # An odd multiplier is a bijection modulo a power of two: distinct rotations.
        off = (seq * 2_654_435_761) % self._samples * 2
        buf = bytearray(self._ring[off:off + CHUNK])
        for k, c in enumerate((seq + 1).to_bytes(4, "little")):
            if c:
                sl = slice(2 * k, None, PAGE)  # low byte of sample k of every 4 KiB page
                buf[sl] = bytes(buf[sl]).translate(self._xor[c])
        return bytes(buf)

    def zstd1_ratio(self, chunks: int = 8) -> float | None:
        """Compression ratio of zstd level 1 over whole 1 MiB chunks, as vnafs compresses."""
        try:
            import zstandard
        except ImportError:
            return None
        cctx = zstandard.ZstdCompressor(level=1)
        sizes = [len(cctx.compress(self.chunk(i))) for i in range(chunks)]
        return chunks * CHUNK / sum(sizes)


# -- targets --------------------------------------------------------------------------------------


class Target:
    """One file system under test. `path` is where the workloads run."""

    name = "?"
    fuse = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rss: list[dict[str, Any]] = []  # one entry per daemon instance
        self.served: list[str] = []  # workloads run by the current daemon instance

    @property
    def path(self) -> Path:
        raise NotImplementedError

    @property
    def store(self) -> Path:
        """The backing directory on the disk (for the space used)."""
        raise NotImplementedError

    def create(self) -> None:
        raise NotImplementedError

    def mount(self) -> None:
        self.served = []

    def umount(self) -> None:
        pass

    def pid(self) -> int | None:
        return None

    def cleanup(self) -> None:
        """Unmount and stop whatever is left, quietly; safe to call at any time."""

    def version(self) -> str:
        return ""

    def check_ready(self) -> None:
        if self.fuse and not is_mounted(self.path):
            raise BenchError(f"{self.name} is not mounted at {self.path}")

    def remount(self) -> None:
        self.umount()
        self.mount()

    def sample_rss(self) -> None:
        pid = self.pid()
        hwm = vm_hwm_kib(pid) if pid is not None else None
        if hwm is not None:
            self.rss.append({"pid": pid, "workloads": list(self.served), "vmhwm_kib": hwm})

    @property
    def peak_rss_kib(self) -> int | None:
        return max((r["vmhwm_kib"] for r in self.rss), default=None)


class PlainTarget(Target):
    name = "plain"

    @property
    def path(self) -> Path:
        return self.root / "data"

    @property
    def store(self) -> Path:
        return self.path

    def create(self) -> None:
        self.path.mkdir(parents=True, mode=0o755)

    def version(self) -> str:
        kind, src = fs_of(self.root)
        return f"{kind} on {src}"


class VnafsTarget(Target):
    name = "vnafs"
    fuse = True

    def __init__(self, root: Path, exe: str) -> None:
        super().__init__(root)
        self.exe = exe
        self._pid: int | None = None

    @property
    def key(self) -> Path:
        return self.root / "site.key"

    @property
    def hot(self) -> Path:
        return self.root / "hot"

    @property
    def path(self) -> Path:
        return self.root / "mnt"

    @property
    def store(self) -> Path:
        return self.hot

    def create(self) -> None:
        self.root.mkdir(parents=True, mode=0o755)
        self.path.mkdir(mode=0o755)
        run([self.exe, "keygen", str(self.key)])
        run([self.exe, "mkfs", "--key-file", str(self.key), str(self.hot)])

    def _pid_file(self) -> int | None:
        try:
            return int((self.hot / "daemon.pid").read_text())
        except (OSError, ValueError):
            return None

    def mount(self) -> None:
        super().mount()
        run([self.exe, "mount", "--key-file", str(self.key), "-o", "allow_other",
             str(self.hot), str(self.path)])
        self._pid = self._pid_file()

    def pid(self) -> int | None:
        return self._pid

    def umount(self) -> None:
        self.sample_rss()
        run([self.exe, "umount", str(self.path)])
        if self._pid is not None and not wait_gone(self._pid):
            raise BenchError(f"vnafs daemon {self._pid} still runs after its unmount")
        self._pid = None

    def cleanup(self) -> None:
        pid = self._pid or self._pid_file()
        if is_mounted(self.path):
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([self.exe, "umount", "--timeout", "60", str(self.path)],
                               capture_output=True, timeout=90, stdin=subprocess.DEVNULL)
            if is_mounted(self.path):
                subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        if pid is not None and not wait_gone(pid, 5.0):
            kill_if(pid, "vnafs")
        self._pid = None

    def version(self) -> str:
        rev = vnafs_revision()
        return run([self.exe, "--version"]).strip() + (f" (git {rev})" if rev else "")


class GocryptfsTarget(Target):
    name = "gocryptfs"
    fuse = True

    def __init__(self, root: Path, exe: str) -> None:
        super().__init__(root)
        self.exe = exe
        self._pid: int | None = None

    @property
    def cipher(self) -> Path:
        return self.root / "cipher"

    @property
    def passfile(self) -> Path:
        return self.root / "passfile"

    @property
    def path(self) -> Path:
        return self.root / "mnt"

    @property
    def store(self) -> Path:
        return self.cipher

    def create(self) -> None:
        self.root.mkdir(parents=True, mode=0o755)
        self.path.mkdir(mode=0o755)
        self.cipher.mkdir(mode=0o700)
        fd = os.open(self.passfile, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
        run([self.exe, "-init", "-q", "-passfile", str(self.passfile), str(self.cipher)])

    def _find_pid(self) -> int | None:
        """The gocryptfs daemon serving our mount point, found in /proc (never by name)."""
        mnt = str(self.path)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            argv = proc_cmdline(pid)
            if (argv and os.path.basename(argv[0]) == "gocryptfs" and argv[-1] == mnt
                    and proc_alive(pid)):
                return pid
        return None

    def mount(self) -> None:
        super().mount()
        # The daemon keeps the parent's stdout and stderr: give it a log file, not our pipes.
        with open(self.root / "gocryptfs.log", "ab") as log:
            res = subprocess.run(
                [self.exe, "-q", "-nosyslog", "-allow_other", "-passfile", str(self.passfile),
                 str(self.cipher), str(self.path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=120)
        self._pid = self._find_pid()
        if res.returncode != 0 or not is_mounted(self.path):
            tail = (self.root / "gocryptfs.log").read_text(errors="replace")[-500:].strip()
            raise BenchError(f"gocryptfs mount failed ({res.returncode}): {tail}")

    def pid(self) -> int | None:
        return self._pid

    def umount(self) -> None:
        self.sample_rss()
        run(["fusermount3", "-u", str(self.path)])
        if self._pid is not None and not wait_gone(self._pid):
            raise BenchError(f"gocryptfs daemon {self._pid} still runs after its unmount")
        self._pid = None

    def cleanup(self) -> None:
        pid = self._pid or self._find_pid()
        if is_mounted(self.path):
            res = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        if pid is not None and not wait_gone(pid, 5.0):
            kill_if(pid, "gocryptfs")
        self._pid = None

    def version(self) -> str:
        out = run([self.exe, "-version"]).strip().splitlines()
        return out[0].split(";")[0] if out else "gocryptfs"


# -- workloads ------------------------------------------------------------------------------------


@dataclass
class Sizes:
    size_mib: int
    files: int
    meta_files: int


@dataclass
class TargetRun:
    """What one target produced."""

    version: str = ""
    results: dict[str, Result] = field(default_factory=dict)
    stored_bytes: int | None = None
    loadavg: list[float] = field(default_factory=list)  # at the start and at the end


def wl_write(path: Path, data: CtData, size_mib: int) -> tuple[Result, str]:
    h = hashlib.sha256()
    excluded = 0.0
    t0 = time.perf_counter()
    fd = os.open(path / "series.raw", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        for i in range(size_mib):
            g0 = time.perf_counter()
            buf = data.chunk(i)
            h.update(buf)
            excluded += time.perf_counter() - g0
            write_all(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0 - excluded
    return Result(seconds, size_mib * MIB, "MB/s"), h.hexdigest()


def wl_read(path: Path, size: int, digest: str) -> Result:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    excluded = 0.0
    t0 = time.perf_counter()
    with open(path / "series.raw", "rb", buffering=0) as f:
        while n := f.readinto(buf):
            g0 = time.perf_counter()
            h.update(view[:n])
            total += n
            excluded += time.perf_counter() - g0
    seconds = time.perf_counter() - t0 - excluded
    if total != size:
        raise BenchError(f"read back {total} bytes, wrote {size}")
    if h.hexdigest() != digest:
        raise BenchError("the data read back differs from the data written (SHA-256 mismatch)")
    return Result(seconds, size, "MB/s")


def wl_ingest(path: Path, data: CtData, files: int) -> Result:
    top = path / "study"
    dirs = [top / f"series{d:02d}" for d in range(INGEST_DIRS)]
    names = [str(dirs[k % INGEST_DIRS] / f"IM{k:06d}.dcm") for k in range(files)]
    flags = os.O_CREAT | os.O_WRONLY
    excluded = 0.0
    t0 = time.perf_counter()
    top.mkdir()
    for d in dirs:
        d.mkdir()
    for k, name in enumerate(names):
        g0 = time.perf_counter()
        content = data.chunk(INGEST_SEQ_BASE + k)[:SMALL_FILE_BYTES]
        excluded += time.perf_counter() - g0
        fd = os.open(name, flags, 0o644)
        try:
            write_all(fd, content)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t0 - excluded
    return Result(seconds, files * SMALL_FILE_BYTES, "MB/s")


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
        fd = os.open(name, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            write_all(fd, content)
        finally:
            os.close(fd)
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


WORKLOADS = (
    Workload("write", "seq write+fsync", 0.55),
    Workload("read", "cold seq read", 0.5),
    Workload("ingest", "small-file ingest", 0.9),
    Workload("walk", "cold walk+lstat", 1.5),
    Workload("create", "meta create (info)", None),
)


def run_target(t: Target, data: CtData, sizes: Sizes, out: TargetRun) -> None:
    """All workloads on a fresh `t`, in order, into `out`; a failed workload is recorded."""
    out.loadavg.append(loadavg())
    say(f"\n== {t.name}: {t.root}  (load average {out.loadavg[0]:.2f})")
    t.create()
    out.version = t.version()
    say(f"  {out.version}")
    t.mount()

    def attempt(key: str, fn: Callable[[], Result], *, cold: bool = False) -> Result:
        try:
            dropped: bool | None = None
            if cold:  # a new daemon and empty kernel caches, untimed
                t.remount()
                dropped = drop_caches()
            t.served.append(key)
            t.check_ready()
            res = fn()
            res.cold = dropped
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            res = Result(error=str(exc))
            say(f"  {key:<7} FAILED: {exc}")
        else:
            rate = res.rate
            note = "" if res.cold is None else ("  (cold)" if res.cold else "  (WARM)")
            say(f"  {key:<7} {res.seconds or 0:9.2f} s  {rate or 0:10.1f} {res.unit}{note}")
        out.results[key] = res
        return res

    digest = ""
    size = sizes.size_mib * MIB

    def do_write() -> Result:
        nonlocal digest
        os.sync()
        res, digest = wl_write(t.path, data, sizes.size_mib)
        return res

    def do_read() -> Result:
        if not digest:
            raise BenchError("skipped: the write failed")
        return wl_read(t.path, size, digest)

    def do_ingest() -> Result:
        os.sync()
        return wl_ingest(t.path, data, sizes.files)

    def do_create() -> Result:
        os.sync()
        return wl_meta_create(t.path, sizes.meta_files)

    def do_walk() -> Result:
        if out.results["create"].error:
            raise BenchError("skipped: creating the files failed")
        return wl_walk(t.path, sizes.meta_files)

    attempt("write", do_write)
    attempt("read", do_read, cold=True)
    attempt("ingest", do_ingest)
    attempt("create", do_create)
    attempt("walk", do_walk, cold=True)
    t.umount()  # samples the daemon's VmHWM first
    out.loadavg.append(loadavg())
    with contextlib.suppress(OSError):
        out.stored_bytes = disk_usage(t.store)
    if t.peak_rss_kib is not None:
        say(f"  peak RSS {t.peak_rss_kib / 1024:.1f} MiB")


# -- report ---------------------------------------------------------------------------------------


def loadavg() -> float:
    """The 1-minute load average: other work on the machine skews every number here."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def vnafs_revision() -> str:
    """`git describe` of the checkout this tool lives in, or "" outside a git checkout."""
    repo = Path(__file__).resolve().parents[1]
    try:
        res = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def preflight(tool: str) -> str | None:
    """What the vnafs-only benchmarks need before they start: root, the vnafs command and
    fusermount3. The vnafs command, or None after saying what is missing."""
    if os.geteuid() != 0:
        print(f"tools.{tool} must run as root (it mounts file systems and drops the page "
              f"cache): sudo .venv/bin/python -m tools.{tool}", file=sys.stderr)
        return None
    exe = find_vnafs()
    if exe is None or shutil.which("fusermount3") is None:
        say("the vnafs command (make venv) and fusermount3 (apt-get install fuse3) are needed")
        return None
    return exe


def work_dir(arg: str) -> tuple[Path, bool]:
    """The resolved work directory, created if missing, and whether it was created."""
    workdir = Path(arg).resolve()
    made = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir, made


def make_rundir(workdir: Path, need: float) -> Path | None:
    """A fresh run directory (mode 0755, so FUSE mounts in it can allow others) under
    `workdir`; None, after saying why, when the disk has less than `need` bytes free."""
    free = shutil.disk_usage(workdir).free
    if free < need:
        say(f"not enough space in {workdir}: {free / MIB:.0f} MiB free, about "
            f"{need / MIB:.0f} MiB needed")
        return None
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    os.chmod(rundir, 0o755)
    return rundir


def banner(title: str, workdir: Path, rundir: Path) -> dict[str, Any]:
    """Print what a run's figures depend on (machine, load, revision, work dir)."""
    info = machine_info(workdir)
    say(f"{title}  {time.strftime('%Y-%m-%d %H:%M:%S')}  ({vnafs_revision() or 'no git'})")
    say(f"{info['cpu']} x {info['nproc']}, {info['mem_gib']} GiB; Linux {info['kernel']}; "
        f"Python {info['python']}; load average {info['loadavg_start']:.2f}")
    say(f"work dir: {rundir} ({info['workdir_fs']})")
    return info


def machine_info(workdir: Path) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    kind, src = fs_of(workdir)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "workdir": str(workdir),
        "workdir_fs": f"{kind} on {src}",
        "loadavg_start": loadavg(),
    }


def _cell(res: Result | None) -> str:
    if res is None:
        return "-"
    if res.error is not None or res.seconds is None:
        return "FAILED"
    rate = res.rate or 0.0
    unit = "MB/s" if res.unit == "MB/s" else "/s"
    warm = "*" if res.cold is False else " "
    return f"{res.seconds:8.2f} s {rate:8.0f} {unit:<4}{warm}"


def ratio(runs: dict[str, TargetRun], a: str, b: str, key: str) -> float | None:
    ra = runs[a].results.get(key) if a in runs else None
    rb = runs[b].results.get(key) if b in runs else None
    if ra is None or rb is None or ra.seconds is None or rb.seconds is None or rb.seconds <= 0:
        return None
    if ra.error or rb.error:
        return None
    return ra.seconds / rb.seconds


def workload_label(w: Workload, sizes: Sizes) -> str:
    detail = {
        "write": f"{sizes.size_mib} MiB",
        "read": f"{sizes.size_mib} MiB",
        "ingest": f"{sizes.files} x 512 KiB",
        "walk": f"{sizes.meta_files + META_DIRS} entries",
        "create": f"{sizes.meta_files} x 100 B",
    }[w.key]
    return f"{w.label} {detail}"


def report(runs: dict[str, TargetRun], targets: dict[str, Target], sizes: Sizes) -> list[str]:
    names = [n for n in ALL_TARGETS if n in runs]
    label_w = max(len(workload_label(w, sizes)) for w in WORKLOADS) + 2
    col = 26
    head = "workload".ljust(label_w) + "".join(n.rjust(col) for n in names)
    head += "  vnafs/gocryptfs  target        vnafs/plain"
    lines = [head, "-" * len(head)]
    for w in WORKLOADS:
        line = workload_label(w, sizes).ljust(label_w)
        line += "".join(_cell(runs[n].results.get(w.key)).rjust(col) for n in names)
        vg = ratio(runs, "vnafs", "gocryptfs", w.key)
        vp = ratio(runs, "vnafs", "plain", w.key)
        line += f"  {vg:15.2f}" if vg is not None else "  " + "-".rjust(15)
        if w.target is not None:
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
    for n in names:
        for key, res in runs[n].results.items():
            if res.error:
                lines.append(f"{n} {key} failed: {res.error}")
    return lines


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="Benchmark vnafs against a plain directory and gocryptfs on the same disk "
                    "(run as root).")
    p.add_argument("--dir", default=DEFAULT_DIR,
                   help=f"work directory, on the disk to test (default {DEFAULT_DIR})")
    p.add_argument("--size-mib", type=int, help="sequential file size in MiB (default 1024)")
    p.add_argument("--files", type=int, help="small files to ingest (default 2000)")
    p.add_argument("--meta-files", type=int, help="files for the metadata walk (default 20000)")
    p.add_argument("--only", default=",".join(ALL_TARGETS),
                   help="comma-separated targets among vnafs,plain,gocryptfs (default all)")
    p.add_argument("--quick", action="store_true",
                   help="256 MiB, 500 files, 5000 metadata files (explicit sizes still win)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in only if n not in ALL_TARGETS]
    if bad or not only:
        p.error(f"--only takes names among {','.join(ALL_TARGETS)}, not {args.only!r}")
    args.only = only
    base = QUICK_SIZES if args.quick else DEFAULT_SIZES
    for key, default in base.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
        elif getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    return args


def find_vnafs() -> str | None:
    beside = Path(sys.executable).with_name("vnafs")
    if beside.exists():
        return str(beside)
    return shutil.which("vnafs")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("tools.bench must run as root (it mounts file systems and drops the page cache): "
              "sudo .venv/bin/python -m tools.bench", file=sys.stderr)
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

    workdir = Path(args.dir).resolve()
    created_workdir = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    need = (sizes.size_mib * MIB + sizes.files * SMALL_FILE_BYTES
            + sizes.meta_files * PAGE) * (len(wanted) if args.keep else 1)
    rundir = make_rundir(workdir, need * 1.2)
    if rundir is None:
        return 2

    info = machine_info(workdir)
    say(f"vnafs benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}")
    say(f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB RAM, "
        f"kernel {info['kernel']}, Python {info['python']}")
    say(f"work dir: {rundir} ({info['workdir_fs']})")
    busy = info["loadavg_start"] > info["nproc"] / 2
    say(f"load average: {info['loadavg_start']:.2f}"
        + ("  WARNING: the machine is busy; results will be noisy" if busy else ""))
    say(f"sizes: sequential {sizes.size_mib} MiB in 1 MiB writes; ingest {sizes.files} files "
        f"x 512 KiB in {INGEST_DIRS} dirs; walk {sizes.meta_files} files x 100 B in "
        f"{META_DIRS} dirs")
    t0 = time.perf_counter()
    data = CtData()
    ratio_z = data.zstd1_ratio()
    zs = f"{ratio_z:.2f}x" if ratio_z is not None else "n/a (zstandard not importable)"
    say(f"data: CT-like 16-bit phantom + noise (sigma {NOISE_SIGMA:g}); zstd-1 ratio per "
        f"1 MiB chunk {zs}; pattern built in {time.perf_counter() - t0:.1f} s")

    old_term = signal.signal(signal.SIGTERM, _sigterm)
    targets: dict[str, Target] = {}
    runs: dict[str, TargetRun] = {}
    interrupted = False
    try:
        for name in wanted:
            root = rundir / name
            t: Target
            if name == "vnafs":
                assert vnafs_exe is not None
                t = VnafsTarget(root, vnafs_exe)
            elif name == "gocryptfs":
                assert gocryptfs_exe is not None
                t = GocryptfsTarget(root, gocryptfs_exe)
            else:
                t = PlainTarget(root)
            targets[name] = t
            runs[name] = TargetRun()
            try:
                run_target(t, data, sizes, runs[name])
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                say(f"  {name}: FAILED: {exc}")
                runs[name].results["setup"] = Result(error=str(exc))
            finally:
                with signals_ignored():
                    t.cleanup()
            if not args.keep and not mounted_under(root):
                shutil.rmtree(root, ignore_errors=True)
            os.sync()
    except KeyboardInterrupt:
        interrupted = True
        say("\ninterrupted: unmounting and cleaning up")
    finally:
        with signals_ignored():
            for t in reversed(list(targets.values())):
                t.cleanup()
            left = mounted_under(rundir)
            if left:
                say(f"WARNING: still mounted, not removing {rundir}: {', '.join(left)}")
            elif args.keep:
                say(f"kept {rundir}")
            else:
                shutil.rmtree(rundir, ignore_errors=True)
                if created_workdir:
                    with contextlib.suppress(OSError):
                        workdir.rmdir()
        signal.signal(signal.SIGTERM, old_term)

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
            "data": {"zstd1_ratio": ratio_z, "noise_sigma": NOISE_SIGMA},
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
