"""Fixtures that create, mount and always tear down real vnafs file systems.

Every mount is a real FUSE mount made by the real `vnafs` command (a forked daemon), so tests see
what an administrator sees. Teardown unmounts and, if the daemon survived or was killed, cleans
the mount and stops the process by its PID, also when the test failed.

Mount points live under /tmp/vnafs-t (mode 0755), not under pytest's 0700 tmp_path, so tests can
act as an unprivileged user through `allow_other`.

The POSIX tests (tests/test_posix_*.py) use `posix_dir`, which is such a mount, or with
`--posix-dir=DIR` a fresh subdirectory of DIR on any file system: that is how the tests
themselves are checked against a reference file system such as ext4.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.requires import fail_if_missing, need_program

# pytester: tests/test_requires.py runs a small pytest session to show how a missing program fails.
pytest_plugins = ["pytester"]

VNAFS = str(Path(sys.executable).with_name("vnafs"))
BASE = Path("/tmp/vnafs-t")


def run_vnafs(*args: str, check: bool = True, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([VNAFS, *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"vnafs {' '.join(args)} failed ({res.returncode}): "
                             f"{res.stdout}{res.stderr}")
    return res


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--posix-dir", metavar="DIR", default=None,
        help="run the POSIX tests (tests/test_posix_*.py) in fresh subdirectories of DIR, on "
             "whatever file system DIR is, instead of on vnafs mounts; tests marked vnafs_only "
             "are skipped")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vnafs_only(reason): a POSIX test of behaviour only vnafs promises; "
                   "skipped with --posix-dir")
    base = config.getoption("posix_dir")
    if base is None:
        return
    path = Path(base).resolve()
    if not path.is_dir():
        raise pytest.UsageError(f"--posix-dir {base}: not an existing directory")
    # The tests act as uid 65534 (and 1234) too: every directory down to DIR must be searchable.
    for d in (path, *path.parents):
        if not d.stat().st_mode & stat.S_IXOTH:
            raise pytest.UsageError(f"--posix-dir {base}: {d} is not searchable by other users "
                                    "(the POSIX tests also run as uid 65534)")
    config.option.posix_dir = str(path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("posix_dir") is None:
        return
    for item in items:
        marker = item.get_closest_marker("vnafs_only")
        if marker is not None:
            why = marker.args[0] if marker.args else "vnafs behaviour"
            item.add_marker(pytest.mark.skip(reason=f"vnafs only ({why}); --posix-dir given"))


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@dataclass
class Fs:
    """One hot store, its key and its mount point."""

    root: Path
    options: list[str] = field(default_factory=lambda: ["allow_other"])
    # Archive URL given to mkfs, and the environment (archive credentials) of every command.
    archive: str | None = None
    env: dict[str, str] | None = None

    def __post_init__(self) -> None:
        # `vnafs umount` and the forced cleanup below unmount through fusermount3.
        need_program("fusermount3", "fuse3")

    @property
    def key(self) -> Path:
        return self.root / "site.key"

    @property
    def hot(self) -> Path:
        return self.root / "hot"

    @property
    def mnt(self) -> Path:
        return self.root / "mnt"

    def create(self) -> Fs:
        self.mnt.mkdir(mode=0o755, exist_ok=True)
        if not self.key.exists():
            run_vnafs("keygen", str(self.key))
        archive = ["--archive", self.archive] if self.archive else []
        if self.archive and self.archive.startswith("file://"):
            # mkfs refuses a missing archive directory (a typo, an unmounted archive).
            Path(self.archive.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        run_vnafs("mkfs", "--key-file", str(self.key), *archive, str(self.hot), env=self.env)
        return self

    def mount(self, *extra: str) -> Fs:
        opts = [a for o in self.options for a in ("-o", o)]
        run_vnafs("mount", "--key-file", str(self.key), *opts, *extra, str(self.hot),
                  str(self.mnt), env=self.env)
        return self

    def status(self) -> dict[str, Any]:
        return dict(json.loads(run_vnafs("status", "--json", str(self.mnt)).stdout))

    def wait_replicated(self, timeout: float = 90) -> dict[str, Any]:
        """Block until everything committed so far is in the archive; the archive status.

        Nothing pending means every dirty mark was cleared, which happens only when the cycle
        that shipped it has committed. Bounded: fails the test with the last status."""
        deadline = time.monotonic() + timeout
        arch: dict[str, Any] = {}
        while time.monotonic() < deadline:
            arch = self.status()["archive"]
            if (not arch["pending_records"] and not arch["pending_blocks"]
                    and arch["recovery_point_ns"]):
                return arch
            time.sleep(0.2)
        raise AssertionError(f"replication did not catch up in {timeout} s: {arch}")

    def umount(self) -> None:
        run_vnafs("umount", str(self.mnt))

    def pid(self) -> int | None:
        try:
            return int((self.hot / "daemon.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def kill9(self) -> None:
        """Crash the daemon the hard way and clear the dead mount."""
        pid = self.pid()
        assert pid is not None, "daemon is not running"
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)

    def wait_indexed(self) -> dict[str, Any]:
        """Block until the daemon has indexed every closed file; return `status`'s DICOM part."""
        from vnafs.control import control_request

        for _ in range(20):
            reply = control_request(self.hot, {"op": "index_wait", "timeout": 25})
            if reply["pending"] == 0:
                break
        status = json.loads(run_vnafs("status", "--json", str(self.mnt)).stdout)
        return dict(status["dicom"])

    def log(self) -> str:
        path = self.hot / "vnafs.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        if _mounted(self.mnt):
            res = run_vnafs("umount", "--timeout", "30", str(self.mnt), check=False)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        pid = self.pid()
        if pid is not None and alive(pid) and _is_vnafs(pid):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)


def set_config(fs: Fs, section: str, **values: object) -> None:
    """Set keys of one section of `<hot>/vnafs.toml` (written by mkfs with every section);
    values are written as JSON, which is TOML for strings, numbers and booleans."""
    cfg = fs.hot / "vnafs.toml"
    lines = cfg.read_text().splitlines()
    for key, value in values.items():
        at = lines.index(f"[{section}]") + 1
        end = next((i for i in range(at, len(lines)) if lines[i].startswith("[")), len(lines))
        lines = [ln for i, ln in enumerate(lines)
                 if not (at <= i < end and ln.startswith(f"{key} ="))]
        lines.insert(at, f"{key} = {json.dumps(value)}")
    cfg.write_text("\n".join(lines) + "\n")


def alive(pid: int) -> bool:
    """Whether a process with this PID exists (for fixtures that stop what they started)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _is_vnafs(pid: int) -> bool:
    try:
        return b"vnafs" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory under /tmp/vnafs-t that anyone may traverse."""
    BASE.mkdir(mode=0o755, exist_ok=True)
    os.chmod(BASE, 0o755)
    path = Path(tempfile.mkdtemp(dir=BASE))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def new_fs(workdir: Path) -> Iterator[Fs]:
    """A created but not mounted file system; unmounted and stopped at teardown."""
    fs = Fs(workdir).create()
    try:
        yield fs
    finally:
        fs.cleanup()


@pytest.fixture
def fs(new_fs: Fs) -> Fs:
    """A created and mounted file system (allow_other, default_permissions)."""
    return new_fs.mount()


@pytest.fixture
def mnt(fs: Fs) -> Path:
    """The root of a freshly created, mounted, empty vnafs."""
    return fs.mnt


@pytest.fixture
def posix_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The directory a POSIX test works in: `mnt`, or with --posix-dir=DIR a fresh, empty
    subdirectory of DIR (mode 0755, owned by the test user), removed afterwards."""
    base = request.config.getoption("posix_dir")
    if base is None:
        yield request.getfixturevalue("mnt")
        return
    path = Path(tempfile.mkdtemp(prefix="posix-", dir=base))
    try:
        os.chown(path, os.getuid(), os.getgid())  # not a setgid DIR's group
        os.chmod(path, 0o755)
        yield path
    finally:
        shutil.rmtree(path)


# -- object stores for the archive tests --------------------------------------------------------

BUCKET = "vnafs-test"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real SeaweedFS (S3) for the session, with bucket BUCKET; stopped at the end.
    Tests that stop it must start it again (tools/servers.py keeps ports and data)."""
    from tools.servers import SeaweedFS

    with fail_if_missing(), SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as srv:
        srv.create_bucket(BUCKET)
        yield srv


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real Azurite (Azure Blob) for the session, with container BUCKET."""
    from tools.servers import Azurite

    with fail_if_missing(), Azurite(tmp_path_factory.mktemp("azurite")) as srv:
        srv.create_container(BUCKET)
        yield srv


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Any]:
    """A formatted metadata store without a mount (Namespace over a fresh LMDB)."""
    from vnafs.keys import KekSource, Keyring
    from vnafs.meta.db import MetaDB
    from vnafs.meta.namespace import Namespace
    from vnafs.seal import Sealer

    keyring = Keyring.create(tmp_path / "keyring", KekSource(key=b"k" * 32, origin="test"))
    db = MetaDB(tmp_path / "meta", Sealer(keyring))
    Namespace.format(db, 0, 0, time.time_ns())
    yield Namespace(db)
    db.close()
