"""Running as a service: systemd's notify protocol, signals, fstab, `make install`, logs.

Why this exists: an admin's boot sequence trusts these behaviours without watching them. READY=1
must mean the mount answers (Samba and NFS servers are ordered after it); SIGHUP must reload and
never unmount; SIGTERM must commit what an open file holds before the mount goes; an fstab line
must mount and `umount` must wait for the daemon; `make install` must give units that
`systemd-analyze verify` accepts. No systemd runs here, so the tests play its part: they bind
the NOTIFY_SOCKET the daemon writes to, and send the signals systemd would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VNAFS, Fs, _mounted, _wait_gone, alive, run_vnafs
from tests.requires import need_program
from vnafs.store.lifecycle import lock_store

ROOT = Path(__file__).resolve().parent.parent


class NotifySocket:
    """The receiving end of sd_notify(3): what systemd would hear from the daemon."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60) -> dict[str, str]:
        """The first message (since the last wait) that has `key` (= `value`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(fields)
            if key in fields and (value is None or fields[key] == value):
                return fields
        raise AssertionError(f"no {key}={value} from the daemon in {timeout} s; heard "
                             f"{self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def service(workdir: Path) -> Iterator[tuple[Fs, NotifySocket, subprocess.Popen[bytes]]]:
    """`vnafs mount --foreground` as systemd runs it: NOTIFY_SOCKET and a watchdog set."""
    (workdir / "site").mkdir()
    fs = Fs(workdir / "site").create()
    notify = NotifySocket(workdir / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}
    proc = subprocess.Popen([VNAFS, "mount", "--foreground", "--key-file", str(fs.key),
                             "-o", "allow_other", str(fs.hot), str(fs.mnt)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield fs, notify, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        fs.cleanup()
        notify.close()


def test_ready_means_mounted_then_status_watchdog_reload_and_clean_stop(
        service: tuple[Fs, NotifySocket, subprocess.Popen[bytes]]) -> None:
    fs, notify, proc = service
    ready = notify.wait_for("READY", "1")
    # At READY=1 the mount already answers: what systemd starts next finds the file system.
    assert _mounted(fs.mnt) and os.listdir(fs.mnt) == []
    assert ready["STATUS"].startswith(f"mounted at {fs.mnt}; health ok"), ready
    notify.wait_for("WATCHDOG", "1", timeout=10)  # WATCHDOG_USEC=2 s: a ping every second

    # SIGHUP: reload, never unmount. One reloadable change, one that needs a remount.
    cfg = fs.hot / "vnafs.toml"
    text = cfg.read_text()
    text = text.replace('level = "info"', 'level = "debug"')
    text = text.replace('views = ".dicom"', 'views = ".dicom2"')
    cfg.write_text(text)
    proc.send_signal(signal.SIGHUP)
    notify.wait_for("RELOADING", "1", timeout=20)
    notify.wait_for("READY", "1", timeout=20)
    assert proc.poll() is None and _mounted(fs.mnt)
    assert re.search(r"configuration reloaded: log\.level changed; needs a remount to change: "
                     r"dicom\.views", fs.log()), fs.log()[-2000:]

    # A bad configuration is refused with one line, and the running settings stay.
    cfg.write_text(text.replace('level = "debug"', 'level = "loud"'))
    proc.send_signal(signal.SIGHUP)
    notify.wait_for("READY", "1", timeout=20)
    assert "configuration not reloaded, the running settings stay" in fs.log()
    assert "log.level must be one of debug, info, warning, error" in fs.log()
    cfg.write_text(text)

    # SIGTERM with a file open and written to: committed before the mount goes.
    fd = os.open(fs.mnt / "open.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 300_000)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1", timeout=30)
        assert proc.wait(timeout=120) == 0
    finally:
        with contextlib.suppress(OSError):  # the mount is gone; the data was committed
            os.close(fd)
    assert not _mounted(fs.mnt)
    fs.mount()
    assert (fs.mnt / "open.bin").read_bytes() == b"x" * 300_000
    fs.umount()


def test_without_notify_socket_nothing_is_sent(workdir: Path) -> None:
    """An ordinary mount (no NOTIFY_SOCKET) works as before and logs nothing about systemd."""
    (workdir / "site").mkdir()
    fs = Fs(workdir / "site").create()
    try:
        fs.mount()
        assert os.listdir(fs.mnt) == []
        fs.umount()
        assert "service manager" not in fs.log()
    finally:
        fs.cleanup()


def test_log_lines_are_key_value_in_utc_and_journal_lines_carry_priorities(
        workdir: Path) -> None:
    (workdir / "site").mkdir()
    fs = Fs(workdir / "site").create()
    try:
        fs.mount()
        fs.umount()
        lines = fs.log().splitlines()
        assert lines and all(
            re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(debug|info|warning|"
                         r"error|critical) logger=vnafs[\w.]* msg=.*", line) for line in lines), lines
        assert any('msg="mounted ' in line for line in lines)
        # The first mount of a new store says nothing about reindexing 0 files.
        assert "reindex started: 0 files" not in fs.log()

        # Under systemd (stderr is the journal, JOURNAL_STREAM names it): priority prefixes,
        # no timestamps of our own, nothing in the hot store's log file.
        before = fs.log()
        err = workdir / "journal.txt"
        with open(err, "wb") as stream:
            st = os.fstat(stream.fileno())
            env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
            proc = subprocess.Popen([VNAFS, "mount", "--foreground", "--key-file", str(fs.key),
                                     str(fs.hot), str(fs.mnt)], env=env, stderr=stream,
                                    stdout=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 60
                while not _mounted(fs.mnt) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert _mounted(fs.mnt)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        journal = err.read_text().splitlines()
        assert any(line.startswith("<6>level=info logger=vnafs.daemon msg=\"mounted ")
                   for line in journal), journal
        assert all(re.match(r"<[2-7]>level=", line) for line in journal), journal
        assert fs.log() == before
    finally:
        fs.cleanup()


# -- fstab ----------------------------------------------------------------------------------------


@pytest.fixture
def mount_helpers() -> Iterator[None]:
    """/sbin/mount.fuse.vnafs and umount.fuse.vnafs pointing at this checkout's vnafs, as
    `make install` makes them (mount(8) looks for helpers only in /sbin). Ones already there
    (an installed vnafs) are put aside and restored."""
    need_program("mount", "mount")
    links = [Path("/sbin/mount.fuse.vnafs"), Path("/sbin/umount.fuse.vnafs")]
    saved: list[tuple[Path, Path]] = []
    try:
        for link in links:
            if link.is_symlink() or link.exists():
                aside = link.with_name(link.name + ".vnafs-test-saved")
                link.rename(aside)
                saved.append((link, aside))
            link.symlink_to(VNAFS)
        yield
    finally:
        for link in links:
            if link.is_symlink():
                link.unlink()
        for link, aside in saved:
            aside.rename(link)


def test_fstab_line_mounts_and_umount_waits_for_the_daemon(workdir: Path,
                                                          mount_helpers: None) -> None:
    (workdir / "site").mkdir()
    fs = Fs(workdir / "site").create()
    fstab = workdir / "fstab"
    fstab.write_text(f"{fs.hot} {fs.mnt} fuse.vnafs "
                     f"allow_other,key_file={fs.key},_netdev,nofail,x-systemd.automount 0 0\n")
    try:
        res = subprocess.run(["mount", "-T", str(fstab), str(fs.mnt)], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert _mounted(fs.mnt)
        (fs.mnt / "a.txt").write_bytes(b"from fstab")
        pid = fs.pid()
        assert pid is not None
        res = subprocess.run(["umount", str(fs.mnt)], capture_output=True, text=True,
                             timeout=180)
        assert res.returncode == 0, res.stderr
        # umount went through umount.fuse.vnafs: the daemon has let go of the store (committed
        # and closed it) when umount returns, not some time later.
        assert not _mounted(fs.mnt)
        os.close(lock_store(fs.hot))
        _wait_gone(pid)
        assert not alive(pid)

        # mount -t fuse.vnafs, the form without fstab.
        res = subprocess.run(["mount", "-t", "fuse.vnafs", "-o", f"key_file={fs.key}",
                              str(fs.hot), str(fs.mnt)], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        assert (fs.mnt / "a.txt").read_bytes() == b"from fstab"
        subprocess.run(["umount", str(fs.mnt)], check=True, timeout=180)

        # Bad fstab options: one line naming the fix, nothing mounted.
        for opts, why in ((f"key_file={fs.key},ro", "always mounted read-write"),
                          (f"key_file={fs.key},bogus", "unknown mount option 'bogus'"),
                          ("allow_other", "no key given")):
            res = subprocess.run(["mount", "-t", "fuse.vnafs", "-o", opts, str(fs.hot),
                                  str(fs.mnt)], capture_output=True, text=True, timeout=120)
            assert res.returncode != 0 and why in res.stderr, (opts, res.stderr)
            assert "Traceback" not in res.stderr and not _mounted(fs.mnt)
    finally:
        fs.cleanup()


# -- make install ---------------------------------------------------------------------------------


def test_make_install_gives_units_systemd_accepts_and_uninstall_removes_them(
        workdir: Path) -> None:
    need_program("systemd-analyze", "systemd")
    need_program("make", "make")
    dirs = {"PREFIX": workdir / "opt", "BINDIR": workdir / "bin", "SBINDIR": workdir / "sbin",
            "UNITDIR": workdir / "units"}
    args = [f"{k}={v}" for k, v in dirs.items()]
    res = subprocess.run(["make", "-C", str(ROOT), "install", *args], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    try:
        vnafs = dirs["BINDIR"] / "vnafs"
        out = subprocess.run([str(vnafs), "--version"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.startswith("vnafs ")
        assert os.readlink(dirs["SBINDIR"] / "mount.fuse.vnafs") == str(dirs["PREFIX"] / "bin"
                                                                           / "vnafs")
        units = sorted(p.name for p in dirs["UNITDIR"].iterdir())
        assert units == ["vnafs-gc@.service", "vnafs-gc@.timer", "vnafs-verify@.service",
                         "vnafs-verify@.timer", "vnafs@.service"]
        # Templates are verified as instances, the way systemd loads them.
        check = workdir / "check"
        check.mkdir()
        for name in units:
            text = (dirs["UNITDIR"] / name).read_text()
            assert "@BINDIR@" not in text
            assert name.endswith(".timer") or f"ExecStart={vnafs} " in text
            (check / name.replace("@.", "@site1.")).write_text(text)
        res = subprocess.run(["systemd-analyze", "verify", *sorted(str(p) for p in
                                                                    check.iterdir())],
                             capture_output=True, text=True, cwd=check, timeout=120)
        assert res.returncode == 0 and not res.stderr.strip(), res.stderr
        service = (dirs["UNITDIR"] / "vnafs@.service").read_text()
        for line in ("Type=notify", "LoadCredential=vnafs.key:/etc/vnafs/%i.key",
                     "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                     "WatchdogSec=", "DeviceAllow=/dev/fuse rw"):
            assert line in service
        # No option that gives the service a mount namespace of its own: the FUSE mount
        # would be invisible outside it.
        settings = [ln.split("=")[0] for ln in service.splitlines() if "=" in ln
                    and not ln.startswith("#")]
        assert not {"ProtectSystem", "PrivateTmp", "ProtectHome", "PrivateMounts"} & set(settings)
    finally:
        res = subprocess.run(["make", "-C", str(ROOT), "uninstall", *args],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not dirs["PREFIX"].exists()
    assert not any(list(dirs[d].iterdir()) for d in ("BINDIR", "SBINDIR", "UNITDIR"))


# -- config check ---------------------------------------------------------------------------------


def test_config_check_validates_without_mounting(new_fs: Fs) -> None:
    fs = new_fs
    res = run_vnafs("config", "check", str(fs.hot))
    assert res.stdout.strip() == f"{fs.hot / 'vnafs.toml'}: ok"
    report = json.loads(run_vnafs("config", "check", "--json", str(fs.hot)).stdout)
    assert report["ok"] is True and report["config"]["tiering"]["high_watermark"] == 0.85
    cfg = fs.hot / "vnafs.toml"
    good = cfg.read_text()
    for bad, why in (('high_watermark = "85%"', 'high_watermark = "185%"'),
                     ("[store]", "[stor]")):
        cfg.write_text(good.replace(bad, why))
        res = run_vnafs("config", "check", str(fs.hot), check=False)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.stderr
    cfg.write_text(good)
    assert not _mounted(fs.mnt)
