"""Real DICOM network peers for tests: a private network namespace, dcmtk and Orthanc.

Nothing here listens on a real interface: `Netns` holds a network namespace of its own (made with
`unshare -n`, only `lo` in it, brought up), and every server and client is started inside it with
`nsenter`. Every context manager stops what it started by PID (a process group for storescp, so
`--fork` children go too), with a deadline, also when the test body raised. Each first checks
that the programs it runs are installed (tests/requires.py): a missing one fails the test with
one line naming its Debian package.

    with Netns() as ns, storescp(ns, outdir, 11112, fork=True) as scp:
        storescu(ns, 11112, files)
    with Netns() as ns, orthanc(ns, storage, index, workdir) as pacs:
        storescu(ns, pacs.dicom_port, files, aec="ORTHANC")
        ids = json.loads(pacs.rest("GET", "/instances"))
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.requires import need_program

LOOPBACK = "127.0.0.1"


# --- processes ------------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def stop_process(proc: subprocess.Popen[Any], *, group: bool = False,
                 timeout: float = 10) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL; with `group`, the whole process group that
    `proc` leads (it must have been started with start_new_session=True)."""
    pgid = proc.pid

    def signal_all(sig: int) -> None:
        if group and group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        elif proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def wait_all(deadline: float) -> bool:
        while time.monotonic() < deadline:
            leader_gone = proc.poll() is not None
            if leader_gone and not (group and group_members(pgid)):
                return True
            time.sleep(0.02)
        return False

    signal_all(signal.SIGTERM)
    if not wait_all(time.monotonic() + timeout):
        signal_all(signal.SIGKILL)
        wait_all(time.monotonic() + 5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


class _Capture:
    """An anonymous temp file that takes a process's stdout and stderr; readable at any time."""

    def __init__(self) -> None:
        # closed by close(), when the process it captures has been stopped
        self.file: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115

    def text(self) -> str:
        fd = self.file.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def close(self) -> None:
        self.file.close()


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- the namespace --------------------------------------------------------------------------


class Netns:
    """A private network namespace holding only `lo`, kept alive by a sleeping process.

    `run` and `popen` start programs inside it through `nsenter` (which execs the program, so
    a Popen's pid is the program's own PID). Use as a context manager; `close()` stops the
    holder by its PID.
    """

    def __init__(self, *, ready_timeout: float = 5) -> None:
        need_program("unshare", "util-linux")
        need_program("nsenter", "util-linux")
        need_program("ip", "iproute2")
        self._err = _Capture()
        self.proc = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep 3600"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err.file)
        deadline = time.monotonic() + ready_timeout
        try:
            # after `exec sleep` the namespace exists and lo is up
            while self._comm() != "sleep":
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"unshare -n did not come up (rc={self.proc.poll()}): "
                                       f"{self._err.text()}")
                time.sleep(0.01)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _comm(self) -> str:
        try:
            return Path(f"/proc/{self.proc.pid}/comm").read_text().strip()
        except OSError:
            return ""

    def argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", "--", *[os.fspath(a) for a in argv]]

    def run(self, argv: Sequence[str | os.PathLike[str]], **kw: Any,
            ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the namespace (timeout defaults to 60 s)."""
        kw.setdefault("timeout", 60)
        return subprocess.run(self.argv(argv), **kw)

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen inside the namespace; the caller stops it (see stop_process)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.argv(argv), **kw)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._err.close()

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo(netns: Netns, port: int, aec: str) -> bool:
    """One C-ECHO inside the namespace; True if the peer answered."""
    res = netns.run(["echoscu", "-q", "-to", "1", "-ta", "2", "-aec", aec, LOOPBACK, str(port)],
                    capture_output=True, timeout=10)
    return res.returncode == 0


def _wait_ready(proc: subprocess.Popen[Any], ready: Any, what: str, log: Any,
                timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log())}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout} s:\n{_tail(log())}")
        time.sleep(0.05)


# --- dcmtk ----------------------------------------------------------------------------------


@dataclass
class StoreSCP:
    """A running dcmtk storescp: its process, port and output."""

    proc: subprocess.Popen[bytes]
    port: int
    aet: str
    outdir: Path
    _out: _Capture = field(repr=False)

    def log(self) -> str:
        return self._out.text()


@contextlib.contextmanager
def storescp(netns: Netns, outdir: Path, port: int = 11112, *,
             study_prefix: str | None = "STUDY", extension: str | None = ".dcm",
             bit_preserving: bool = False, fork: bool = False, aet: str = "STORESCP",
             extra_args: Sequence[str] = (), ready_timeout: float = 10) -> Iterator[StoreSCP]:
    """`storescp -aet AET -od OUTDIR [-su PREFIX] [-fe EXT] [+B] [--fork] EXTRA PORT` in `netns`.

    Yields once a C-ECHO is answered; stops the whole process group (--fork children too).
    dcmtk refuses +B together with -su: pass study_prefix=None with bit_preserving=True.
    """
    need_program("storescp", "dcmtk")
    need_program("echoscu", "dcmtk")  # the readiness probe
    argv = ["storescp", "-v", "-aet", aet, "-od", str(outdir)]
    if study_prefix is not None:
        argv += ["-su", study_prefix]
    if extension is not None:
        argv += ["-fe", extension]
    if bit_preserving:
        argv.append("+B")
    if fork:
        argv.append("--fork")
    argv += [*extra_args, str(port)]
    out = _Capture()
    proc = netns.popen(argv, stdout=out.file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        scp = StoreSCP(proc, port, aet, outdir, out)
        _wait_ready(proc, lambda: echo(netns, port, aet), "storescp", scp.log, ready_timeout)
        yield scp
    finally:
        stop_process(proc, group=True)
        out.close()


def storescu(netns: Netns, port: int, files: Sequence[Path], aec: str = "STORESCP", *,
             aet: str = "STORESCU", check: bool = True, timeout: float = 120,
             extra_args: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Send `files` in one association; with `check`, fail unless the exit code is 0 and every
    file got a successful C-STORE response (storescu's exit code alone does not say that)."""
    need_program("storescu", "dcmtk")
    argv = ["storescu", "-v", "-aet", aet, "-aec", aec, *extra_args, LOOPBACK, str(port),
            *map(str, files)]
    res = netns.run(argv, capture_output=True, text=True, timeout=timeout)
    if check:
        ok = (res.stdout + res.stderr).count("Received Store Response (Success)")
        if res.returncode != 0 or ok != len(files):
            raise AssertionError(f"storescu to {aec}:{port}: rc={res.returncode}, "
                                 f"{ok}/{len(files)} stored\n{_tail(res.stdout + res.stderr)}")
    return res


# --- Orthanc --------------------------------------------------------------------------------


class RestError(AssertionError):
    pass


@dataclass
class Orthanc:
    """A running Orthanc: REST through curl inside the namespace, and its logs."""

    netns: Netns
    proc: subprocess.Popen[bytes]
    http_port: int
    dicom_port: int
    aet: str
    logdir: Path
    _out: _Capture = field(repr=False)

    def log(self) -> str:
        parts = [self._out.text()]
        for path in sorted(self.logdir.glob("*")):
            if path.is_file() and not path.is_symlink():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(p for p in parts if p)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log(), lines)

    def rest(self, method: str, path: str, data: bytes | None = None) -> bytes:
        """One HTTP request; returns the body, raises RestError (with the log tail) on >= 400."""
        argv = ["curl", "-sS", "--fail", "--max-time", "60", "-X", method]
        if data is not None:
            argv += ["-H", "Content-Type: application/dicom", "--data-binary", "@-"]
        argv.append(f"http://{LOOPBACK}:{self.http_port}{path}")
        res = self.netns.run(argv, input=data, capture_output=True, timeout=90)
        if res.returncode != 0:
            raise RestError(f"{method} {path}: curl rc={res.returncode} "
                            f"{res.stderr.decode(errors='replace').strip()}\n"
                            f"--- Orthanc log ---\n{self.log_tail()}")
        body: bytes = res.stdout
        return body

    def json(self, method: str, path: str, data: bytes | None = None) -> Any:
        return json.loads(self.rest(method, path, data))

    def _http_ready(self) -> bool:
        res = self.netns.run(["curl", "-s", "-o", "/dev/null", "--fail", "--max-time", "2",
                              f"http://{LOOPBACK}:{self.http_port}/system"],
                             capture_output=True, timeout=10)
        return res.returncode == 0


def orthanc_config(storage_dir: Path, index_dir: Path, *, http_port: int = 8042,
                   dicom_port: int = 4242, aet: str = "ORTHANC") -> dict[str, Any]:
    return {
        "Name": "vnafs-test",
        "StorageDirectory": str(storage_dir),
        "IndexDirectory": str(index_dir),
        "StorageCompression": False,
        "SyncStorageArea": True,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "DicomServerEnabled": True,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "DicomCheckCalledAet": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "RegisteredUsers": {},
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {},
        "OrthancPeers": {},
        # The Debian package's own /etc/orthanc config loads /usr/share/orthanc/plugins/
        # (ServeFolders, ModalityWorklists); this config is used alone and loads none.
        "Plugins": [],
        "SaveJobs": False,
        "StableAge": 1,
        "LoadPrivateDictionary": False,
    }


@contextlib.contextmanager
def orthanc(netns: Netns, storage_dir: Path, index_dir: Path, workdir: Path, *,
            http_port: int = 8042, dicom_port: int = 4242, aet: str = "ORTHANC",
            ready_timeout: float = 20, stop_timeout: float = 10) -> Iterator[Orthanc]:
    """Orthanc inside `netns` with its own config.json in `workdir` (logs in workdir/logs).

    Yields once both HTTP (/system) and DICOM (C-ECHO) answer; SIGTERM at exit, SIGKILL after
    `stop_timeout`.
    """
    need_program("Orthanc", "orthanc")
    need_program("curl", "curl")  # its REST API
    need_program("echoscu", "dcmtk")  # the readiness probe
    workdir.mkdir(parents=True, exist_ok=True)
    logdir = workdir / "logs"
    logdir.mkdir(exist_ok=True)
    config = workdir / "config.json"
    config.write_text(json.dumps(orthanc_config(storage_dir, index_dir, http_port=http_port,
                                                dicom_port=dicom_port, aet=aet), indent=2))
    out = _Capture()
    proc = netns.popen(["Orthanc", str(config), f"--logdir={logdir}"], cwd=workdir,
                       stdout=out.file, stderr=subprocess.STDOUT)
    try:
        pacs = Orthanc(netns, proc, http_port, dicom_port, aet, logdir, out)
        _wait_ready(proc, lambda: pacs._http_ready() and echo(netns, dicom_port, aet),
                    "Orthanc", pacs.log, ready_timeout)
        yield pacs
    finally:
        stop_process(proc, timeout=stop_timeout)
        out.close()


__all__ = ["LOOPBACK", "Netns", "Orthanc", "RestError", "StoreSCP", "echo", "group_members", "orthanc",
           "orthanc_config", "stop_process", "storescp", "storescu"]
