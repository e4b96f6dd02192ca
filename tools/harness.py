"""The harness the benchmarks in tools/ run on: file systems under test, their daemons, run
directories, and the checks before a run.

Why it exists. tools.bench, bench_dicom, bench_archive and bench_snapshots all make real file
systems with the real CLI, mount and unmount them, measure the daemon (CPU seconds, peak RSS),
drop the page cache for cold figures, work in a fresh run directory that is removed on exit
(also on Ctrl-C or SIGTERM) unless something is still mounted in it, and refuse to start
without root, the vnafs command and fusermount3. That machinery lives here once, so a fix (a
daemon that survives its unmount, a mount left behind) reaches every benchmark. Statistics and
the result table are in tools/report.py, the CT-like test data in tools/gen_studies.py; what one
benchmark measures stays in its own module.

The peers: `PlainTarget` (a directory on the same disk: the floor), `VnafsTarget` (keygen,
mkfs, mount and umount through the vnafs command) and `GocryptfsTarget` (the usual way to
encrypt such a directory today). Each has a `root` in the run directory, a `path` where the
workloads run, `cleanup()`, safe at any time, which unmounts and stops whatever is left (a
daemon only by the PID this run started, after checking its command line), and `discard()`,
which also removes the root. The workloads that more than one benchmark times (a sequential
write and cold read of CT-like data, a small-file ingest) are here too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from tools.gen_studies import CHUNK, CtData, RandomData
from tools.report import Report, say
from vnafs import mountinfo
from vnafs.errors import VnafsError

KIB = 1 << 10
MIB = 1 << 20
SMALL_FILE_BYTES = 512 * KIB  # one file of the small-file ingest: about a CT slice
INGEST_DIRS = 20
# Chunk sequence numbers: the sequential file uses 0.., the small files start here.
INGEST_SEQ_BASE = 1 << 21
SMALL_WRITES_SEQ_BASE = 3 << 20
# The data a workload writes: CT-like or random chunks (tools/gen_studies.py).
Chunks = CtData | RandomData


class BenchError(Exception):
    """A workload or a mount failed; the message says how."""


# What a part of a benchmark may fail with, to be reported while the other parts go on.
FAILURES = (BenchError, OSError, subprocess.SubprocessError, VnafsError)


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


# -- mounts ---------------------------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    return mountinfo.find_mount(path) is not None


def mounted_under(path: Path) -> list[str]:
    """Mount points at or below `path`."""
    top = os.path.realpath(path)
    return [m.mount_point for m in mountinfo.mounts()
            if m.mount_point == top or m.mount_point.startswith(top + "/")]


def fs_of(path: Path) -> tuple[str, str]:
    """(fs type, source) of the file system holding `path`."""
    real = os.path.realpath(path)
    best = ("", "?", "?")
    for m in mountinfo.mounts():
        mp = m.mount_point
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and len(mp) >= len(best[0]):
            best = (mp, m.fs_type, m.source)
    return best[1], best[2]


# -- processes ------------------------------------------------------------------------------------


def _status_field(pid: int, name: str) -> str | None:
    """The first value of line `name:` of /proc/PID/status; None if there is no such process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(name + ":"):
            return line.split()[1]
    return ""


def proc_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    state = _status_field(pid, "State")
    return state is not None and state != "Z"


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a process, KiB."""
    hwm = _status_field(pid, "VmHWM")
    return int(hwm) if hwm else None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far, from /proc/PID/stat."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


# -- the disk and the page cache ------------------------------------------------------------------


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


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def store_file(path: str | Path, data: bytes) -> None:
    """Store a file as a PACS does: open(O_CREAT | O_WRONLY, 0644), one write, close; no fsync."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn()` took (time.perf_counter)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def load_sources(src: Path) -> list[tuple[str, bytes]]:
    """(path relative to `src`, content) of every .dcm file below `src`, in path order."""
    return [(str(p.relative_to(src)), p.read_bytes()) for p in sorted(src.rglob("*.dcm"))]


# -- signals --------------------------------------------------------------------------------------


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Let cleanup finish even if Ctrl-C is pressed again."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt, so a killed run cleans up like Ctrl-C."""
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# -- the file systems under test ------------------------------------------------------------------


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

    def discard(self, keep: bool = False) -> None:
        """cleanup(), then remove `root` unless `keep` or something is still mounted in it."""
        with signals_ignored():
            self.cleanup()
        if not (keep or mounted_under(self.root)):
            shutil.rmtree(self.root, ignore_errors=True)

    def version(self) -> str:
        return ""

    def check_ready(self) -> None:
        if self.fuse and not is_mounted(self.path):
            raise BenchError(f"{self.name} is not mounted at {self.path}")

    def remount(self) -> None:
        self.umount()
        self.mount()

    def wait_idle(self) -> None:
        """Return once the file system has nothing left to do for what was written (vnafs:
        sealing, indexing). A plain directory and gocryptfs finish their work inside each
        call, so there is nothing to wait for."""

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


class FuseTarget(Target):
    """A FUSE file system mounted at `root/mnt` by a daemon of command `exe`."""

    fuse = True

    def __init__(self, root: Path, exe: str) -> None:
        super().__init__(root)
        self.exe = exe
        self._pid: int | None = None

    @property
    def path(self) -> Path:
        return self.root / "mnt"

    def pid(self) -> int | None:
        return self._pid

    def make_dirs(self) -> None:
        self.root.mkdir(parents=True, mode=0o755)
        self.path.mkdir(mode=0o755)

    def find_pid(self) -> int | None:
        """The daemon serving `path`, when this object has not recorded it."""
        raise NotImplementedError

    def unmount_command(self) -> list[str]:
        raise NotImplementedError

    def unmount_quietly(self) -> None:
        """Try to unmount for a cleanup; errors are not reported (a lazy unmount follows)."""
        subprocess.run(self.unmount_command(), capture_output=True, timeout=90,
                       stdin=subprocess.DEVNULL)

    def umount(self) -> None:
        self.sample_rss()
        run(self.unmount_command())
        if self._pid is not None and not wait_gone(self._pid):
            raise BenchError(f"{self.name} daemon {self._pid} still runs after its unmount")
        self._pid = None

    def cleanup(self) -> None:
        pid = self._pid or self.find_pid()
        if is_mounted(self.path):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.unmount_quietly()
            if is_mounted(self.path):
                subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        if pid is not None and not wait_gone(pid, 5.0):
            kill_if(pid, self.name)
        self._pid = None


class VnafsTarget(FuseTarget):
    """A vnafs file system: `vnafs keygen` and `mkfs` in `root`, mounted with allow_other.
    Every vnafs command runs with `env` (None: this process's environment)."""

    name = "vnafs"

    def __init__(self, root: Path, exe: str, *, env: dict[str, str] | None = None) -> None:
        super().__init__(root, exe)
        self.env = env

    @property
    def key(self) -> Path:
        return self.root / "site.key"

    @property
    def hot(self) -> Path:
        return self.root / "hot"

    @property
    def store(self) -> Path:
        return self.hot

    def vnafs(self, *args: str, timeout: float = 300.0) -> str:
        """Run `vnafs ARGS`; BenchError with its output if it fails."""
        return run([self.exe, *args], timeout=timeout, env=self.env)

    def mkfs_options(self) -> list[str]:
        """Options of `vnafs mkfs` besides the key file."""
        return []

    def create(self) -> None:
        self.make_dirs()
        self.vnafs("keygen", str(self.key))
        self.vnafs("mkfs", "--key-file", str(self.key), *self.mkfs_options(), str(self.hot))

    def find_pid(self) -> int | None:
        try:
            return int((self.hot / "daemon.pid").read_text())
        except (OSError, ValueError):
            return None

    def mount(self) -> None:
        super().mount()
        self.vnafs("mount", "--key-file", str(self.key), "-o", "allow_other", str(self.hot),
                   str(self.path))
        self._pid = self.find_pid()

    def unmount_command(self) -> list[str]:
        return [self.exe, "umount", str(self.path)]

    def unmount_quietly(self) -> None:
        subprocess.run([self.exe, "umount", "--timeout", "60", str(self.path)],
                       capture_output=True, timeout=90, stdin=subprocess.DEVNULL, env=self.env)

    def version(self) -> str:
        rev = vnafs_revision()
        return self.vnafs("--version").strip() + (f" (git {rev})" if rev else "")

    def wait_idle(self) -> None:
        """The daemon's `wait_idle` request (no partial or unsealed block, nothing queued for
        the indexer), through its control socket."""
        from vnafs import control
        from vnafs.errors import VnafsError

        try:
            control.control_request(self.hot, {"op": "wait_idle"}, timeout=1800)
        except (VnafsError, OSError) as exc:
            raise BenchError(f"waiting for vnafs to be idle failed: {exc}") from None


class GocryptfsTarget(FuseTarget):
    name = "gocryptfs"

    @property
    def cipher(self) -> Path:
        return self.root / "cipher"

    @property
    def passfile(self) -> Path:
        return self.root / "passfile"

    @property
    def store(self) -> Path:
        return self.cipher

    def create(self) -> None:
        self.make_dirs()
        self.cipher.mkdir(mode=0o700)
        fd = os.open(self.passfile, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
        run([self.exe, "-init", "-q", "-passfile", str(self.passfile), str(self.cipher)])

    def find_pid(self) -> int | None:
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
        self._pid = self.find_pid()
        if res.returncode != 0 or not is_mounted(self.path):
            tail = (self.root / "gocryptfs.log").read_text(errors="replace")[-500:].strip()
            raise BenchError(f"gocryptfs mount failed ({res.returncode}): {tail}")

    def unmount_command(self) -> list[str]:
        return ["fusermount3", "-u", str(self.path)]

    def version(self) -> str:
        out = run([self.exe, "-version"]).strip().splitlines()
        return out[0].split(";")[0] if out else "gocryptfs"


# -- workloads shared by tools.bench and tools.bench_snapshots ------------------------------------


@dataclass
class Result:
    """One timed workload."""

    seconds: float | None = None
    amount: float = 0.0  # bytes for MB/s, else a count
    unit: str = "MB/s"
    cold: bool | None = None  # None: not a cold workload
    error: str | None = None
    # Writes only: seconds until the target had nothing left to do for them (`wait_idle`):
    # `seconds` is when the writer got its last answer.
    sustained: float | None = None

    @property
    def rate(self) -> float | None:
        if self.seconds is None or self.seconds <= 0:
            return None
        return self.amount / self.seconds / (1e6 if self.unit == "MB/s" else 1.0)

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "amount": self.amount, "unit": self.unit,
                "rate": self.rate, "cold": self.cold, "error": self.error,
                "sustained": self.sustained}


def wl_write(path: Path, data: Chunks, size_mib: int, name: str = "series.raw"
             ) -> tuple[Result, str]:
    """`path/name`: `size_mib` chunks in 1 MiB writes, fsync, close; and its SHA-256.
    Making and hashing the chunks is not timed."""
    h = hashlib.sha256()
    excluded = 0.0
    t0 = time.perf_counter()
    fd = os.open(path / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
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


def wl_read(path: Path, size: int, digest: str, name: str = "series.raw") -> Result:
    """`path/name` read in 1 MiB reads; its size and SHA-256 must match (hashing is not
    timed)."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    excluded = 0.0
    t0 = time.perf_counter()
    with open(path / name, "rb", buffering=0) as f:
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


def wl_ingest(path: Path, data: Chunks, files: int, top_name: str = "study") -> Result:
    """`files` files of SMALL_FILE_BYTES in INGEST_DIRS directories of `path/study`: open,
    one write, close, no fsync, as a PACS stores a study. Making the data is not timed."""
    top = path / top_name
    dirs = [top / f"series{d:02d}" for d in range(INGEST_DIRS)]
    names = [str(dirs[k % INGEST_DIRS] / f"IM{k:06d}.dcm") for k in range(files)]
    excluded = 0.0
    t0 = time.perf_counter()
    top.mkdir()
    for d in dirs:
        d.mkdir()
    for k, name in enumerate(names):
        g0 = time.perf_counter()
        content = data.chunk(INGEST_SEQ_BASE + k)[:SMALL_FILE_BYTES]
        excluded += time.perf_counter() - g0
        store_file(name, content)
    seconds = time.perf_counter() - t0 - excluded
    return Result(seconds, files * SMALL_FILE_BYTES, "MB/s")


def wl_small_writes(path: Path, data: Chunks, files: int, write_size: int = 8 * KIB,
                    top_name: str = "small") -> Result:
    """`files` files of SMALL_FILE_BYTES, each written in `write_size` writes, then closed:
    how pydicom's `save_as` and storescp `+B` write (8 KiB). Making the data is not timed."""
    top = path / top_name
    excluded = 0.0
    t0 = time.perf_counter()
    top.mkdir()
    for k in range(files):
        g0 = time.perf_counter()
        content = memoryview(data.chunk(SMALL_WRITES_SEQ_BASE + k)[:SMALL_FILE_BYTES])
        excluded += time.perf_counter() - g0
        fd = os.open(top / f"IM{k:06d}.dcm", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            for off in range(0, len(content), write_size):
                write_all(fd, content[off:off + write_size])
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t0 - excluded
    return Result(seconds, files * SMALL_FILE_BYTES, "MB/s")


# -- the machine ----------------------------------------------------------------------------------


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


def banner(title: str, rundir: RunDir) -> dict[str, Any]:
    """Print what a run's figures depend on (machine, load, revision, work dir); return it."""
    info = machine_info(rundir.workdir)
    busy = info["loadavg_start"] > info["nproc"] / 2
    say(f"{title}  {time.strftime('%Y-%m-%d %H:%M:%S')}  ({vnafs_revision() or 'no git'})")
    say(f"{info['cpu']} x {info['nproc']}, {info['mem_gib']} GiB; Linux {info['kernel']}; "
        f"Python {info['python']}; load average {info['loadavg_start']:.2f}"
        + ("  WARNING: the machine is busy; results will be noisy" if busy else ""))
    say(f"work dir: {rundir.path} ({info['workdir_fs']})")
    return info


# -- a run: checks, arguments, run directory, parts -----------------------------------------------


def find_vnafs() -> str | None:
    """The vnafs command beside this Python (the project's virtualenv), else on PATH."""
    beside = Path(sys.executable).with_name("vnafs")
    if beside.exists():
        return str(beside)
    return shutil.which("vnafs")


def require_root(tool: str) -> bool:
    """True when running as root; else False after saying so."""
    if os.geteuid() == 0:
        return True
    print(f"tools.{tool} must run as root (it mounts file systems and drops the page "
          f"cache): sudo .venv/bin/python -m tools.{tool}", file=sys.stderr)
    return False


def preflight(tool: str) -> str | None:
    """What the vnafs-only benchmarks need before they start: root, the vnafs command and
    fusermount3. The vnafs command, or None after saying what is missing."""
    if not require_root(tool):
        return None
    exe = find_vnafs()
    if exe is None or shutil.which("fusermount3") is None:
        say("the vnafs command (make venv) and fusermount3 (apt-get install fuse3) are needed")
        return None
    return exe


def parse_run_args(p: argparse.ArgumentParser, argv: list[str] | None, *, default_dir: str,
                   names: tuple[str, ...], quick_help: str, default_sizes: dict[str, int],
                   quick_sizes: dict[str, int], positive: tuple[str, ...] = (),
                   ) -> argparse.Namespace:
    """Add the options every benchmark has (--dir, --only, --quick, --json, --keep) to `p`
    and parse `argv`. --only, a comma-separated list among `names`, becomes a list; the sizes
    (the keys of `default_sizes`) not given come from `quick_sizes` with --quick, else from
    `default_sizes`; every size and every option in `positive` must be at least 1."""
    p.add_argument("--dir", default=default_dir,
                   help=f"work directory, on the disk to test (default {default_dir})")
    p.add_argument("--only", default=",".join(names),
                   help=f"comma-separated names among {','.join(names)} (default all)")
    p.add_argument("--quick", action="store_true", help=f"{quick_help} (explicit sizes win)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    if not only or any(n not in names for n in only):
        p.error(f"--only takes names among {','.join(names)}, not {args.only!r}")
    args.only = only
    sizes = quick_sizes if args.quick else default_sizes
    vars(args).update({k: v for k, v in sizes.items() if getattr(args, k) is None})
    for key in (*sizes, *positive):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    return args


@dataclass
class RunDir:
    """A fresh directory for one run in the work directory (--dir), which is created if
    missing; `remove` takes both away again, unless something is still mounted."""

    workdir: Path
    path: Path
    made_workdir: bool

    @classmethod
    def create(cls, workdir_arg: str, need: float) -> RunDir | None:
        """A new `run-*` directory (mode 0755, so FUSE mounts in it can allow others) in the
        work directory; None, after saying why, when its disk has less than `need` bytes free."""
        workdir = Path(workdir_arg).resolve()
        made = not workdir.exists()
        workdir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(workdir).free
        if free < need:
            say(f"not enough space in {workdir}: {free / MIB:.0f} MiB free, about "
                f"{need / MIB:.0f} MiB needed")
            return None
        path = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
        os.chmod(path, 0o755)
        return cls(workdir, path, made)

    def remove(self, keep: bool) -> None:
        """Remove this run's directory, and the work directory too if this run created it and
        it is empty; with `keep`, or while something is mounted in it, say so instead."""
        mounts = mounted_under(self.path)
        if mounts or keep:
            say(f"WARNING: not removing {self.path}, still mounted: {', '.join(mounts)}"
                if mounts else f"kept {self.path}")
            return
        shutil.rmtree(self.path, ignore_errors=True)
        # Left alone when not empty: other runs' directories, or files of the user's.
        if self.made_workdir and not any(self.workdir.iterdir()):
            self.workdir.rmdir()


def run_part(name: str, fn: Callable[[], None], rep: Report) -> None:
    """One part of a benchmark, between two load averages; a failure is recorded in `rep` and
    the run goes on."""
    rep.loads[name] = [loadavg()]
    t0 = time.perf_counter()
    try:
        fn()
    except FAILURES as exc:
        rep.errors.append(f"{name}: {exc}")
        say(f"  {name} FAILED: {exc}")
    rep.loads[name].append(loadavg())
    say(f"  ({name} took {time.perf_counter() - t0:.0f} s)")
