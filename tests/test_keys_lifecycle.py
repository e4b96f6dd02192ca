"""Replacing the KEK and key slots with real mounts, the real CLI and a `file://` archive.

What an administrator does: `vnafs key rewrap` on an unmounted store and through a running mount,
the archive's copy of the keyring following with the next replication cycle, `vnafs restore`
with the new key (the old one refused), recovery-key slots, passphrases given on a file
descriptor, by a command and at a prompt (a pseudo-terminal). Every bad input is one line on
stderr, exit status 1, no traceback, and leaves the keyring file byte-identical. The format and
the slot rules themselves are tested in process in tests/unit/test_keys_lifecycle.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VNAFS, Fs, run_vnafs
from vnafs.errors import VnafsError
from vnafs.keys import KekSource, Keyring, read_key_file

# -- helpers ----------------------------------------------------------------------------------------


def vnafs(*args: str, input: str | None = None, pass_fds: tuple[int, ...] = (),
          env: dict[str, str] | None = None, new_session: bool = False,
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VNAFS, *args], capture_output=True, text=True, input=input,
                          pass_fds=pass_fds, env=env, timeout=timeout,
                          start_new_session=new_session,
                          stdin=subprocess.DEVNULL if input is None else None)


def ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, f"{res.args} failed ({res.returncode}): {res.stdout}{res.stderr}"
    return res


def refused(res: subprocess.CompletedProcess[str], match: str) -> str:
    """Exit status 1, one line on stderr starting with 'vnafs: ', no traceback. (A key
    command's own messages go to the terminal, before that line: `oops` below.)"""
    err = res.stderr.removeprefix("oops\n")
    assert res.returncode == 1, f"{res.args}: exit {res.returncode}: {res.stdout}{err}"
    assert "Traceback" not in err and err.startswith("vnafs: ") and err.count("\n") == 1, err
    assert match in err, err
    return err


def digest(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_files(mnt: Path, tag: str, n: int = 5) -> None:
    (mnt / tag).mkdir()
    for i in range(n):
        seed = hashlib.sha256(f"{tag} {i}".encode()).digest()
        (mnt / tag / f"f{i}").write_bytes(seed * (1000 * (i + 1)))


def set_interval(fs: Fs, seconds: int) -> None:
    cfg = fs.hot / "vnafs.toml"
    lines = [ln for ln in cfg.read_text().splitlines() if not ln.startswith("interval =")]
    at = lines.index("[archive]") + 1
    lines.insert(at, f"interval = {seconds}")
    cfg.write_text("\n".join(lines) + "\n")


def archive_dir(fs: Fs) -> Path:
    assert fs.archive is not None
    return Path(fs.archive.removeprefix("file://"))


def wait_archive_keyring(fs: Fs, timeout: float = 60) -> bytes:
    """Block until the archive's keyring is the hot store's (the next replication cycle)."""
    deadline = time.monotonic() + timeout
    archived = b""
    while time.monotonic() < deadline:
        hot = (fs.hot / "keyring").read_bytes()
        path = archive_dir(fs) / "keyring"
        archived = path.read_bytes() if path.exists() else b""
        if archived == hot:
            return archived
        time.sleep(0.2)
    raise AssertionError(f"the archive's keyring did not follow in {timeout} s")


def opens(data: bytes, source: KekSource, tmp: Path) -> bool:
    path = tmp / "keyring-copy"
    path.write_bytes(data)
    try:
        Keyring.open(path, source)
    except VnafsError as exc:
        assert "wrong key" in str(exc)
        return False
    finally:
        path.unlink()
    return True


def key_source(path: Path) -> KekSource:
    return KekSource(key=read_key_file(path), origin=str(path))


def keygen(path: Path) -> Path:
    run_vnafs("keygen", str(path))
    return path


@pytest.fixture
def archived(workdir: Path) -> Iterator[Fs]:
    """A mounted file system replicating into a file:// archive every second."""
    fs = Fs(workdir / "site", archive=f"file://{workdir / 'archive'}")
    fs.root.mkdir()
    fs.create()
    set_interval(fs, 1)
    try:
        yield fs.mount()
    finally:
        fs.cleanup()


# -- rewrap --------------------------------------------------------------------------------------


def test_offline_rewrap_archive_follows_and_restore_needs_the_new_key(
        archived: Fs, workdir: Path) -> None:
    fs = archived
    write_files(fs.mnt, "before")
    expected = digest(fs.mnt)
    fs.wait_replicated()
    old_archived = wait_archive_keyring(fs)
    fs.umount()
    old, new = key_source(fs.key), key_source(keygen(workdir / "new.key"))

    out = json.loads(ok(vnafs("key", "rewrap", "--json", "--key-file", str(fs.key),
                              "--new-key-file", str(new.origin), str(fs.hot))).stdout)
    assert out["schema"] == 1 and out["through"] == "offline" and out["keyring_version"] == 2
    assert out["slot"] == {"slot": 0, "kind": "key-file", "label": "",
                           "created": out["slot"]["created"]}
    assert new.key is not None and new.key.hex() not in json.dumps(out)

    before = (fs.hot / "keyring").read_bytes()
    refused(vnafs("mount", "--key-file", str(fs.key), str(fs.hot), str(fs.mnt)),
            "wrong key: key file")
    assert (fs.hot / "keyring").read_bytes() == before
    ok(vnafs("mount", "--key-file", new.origin, "-o", "allow_other", str(fs.hot), str(fs.mnt)))
    assert digest(fs.mnt) == expected

    # The replicator sees the keyring's new digest and uploads it with the next cycle.
    archived_now = wait_archive_keyring(fs)
    assert archived_now != old_archived
    assert opens(old_archived, old, workdir) and not opens(archived_now, old, workdir)
    assert opens(archived_now, new, workdir)

    # A read-only archive mount holds the archive's copy: it refuses key changes.
    ro = Fs(workdir / "ro")
    ro.root.mkdir()
    ro.mnt.mkdir()
    try:
        ok(vnafs("mount", "--archive-only", "--key-file", new.origin, "--cache", str(ro.hot),
                 str(fs.archive), str(ro.mnt)))
        refused(vnafs("key", "rewrap", "--key-file", new.origin, "--new-key-file",
                      str(fs.key), str(ro.mnt)), "read-only archive mount")
        listing = json.loads(ok(vnafs("key", "slots", "--json", str(ro.mnt))).stdout)
        assert listing["keyring_version"] == 2
    finally:
        ro.cleanup()
    fs.umount()

    restored = workdir / "restored"
    refused(vnafs("restore", "--key-file", str(fs.key), "--no-progress", str(fs.archive),
                  str(restored)), "wrong key")
    ok(vnafs("restore", "--key-file", new.origin, "--no-progress", str(fs.archive),
             str(restored)))
    other = Fs(workdir / "other")
    other.root.mkdir()
    other.mnt.mkdir()
    try:
        ok(vnafs("mount", "--key-file", new.origin, str(restored), str(other.mnt)))
        assert digest(other.mnt) == expected
    finally:
        if other.mnt.is_mount():
            run_vnafs("umount", str(other.mnt))
        pid_file = restored / "daemon.pid"
        assert not pid_file.exists() or not Path(f"/proc/{pid_file.read_text().strip()}").exists()


def test_rewrap_through_a_mount(archived: Fs, workdir: Path) -> None:
    fs = archived
    write_files(fs.mnt, "before")
    fs.wait_replicated()
    old_archived = wait_archive_keyring(fs)
    old = key_source(fs.key)
    new = key_source(keygen(workdir / "new.key"))
    third = key_source(keygen(workdir / "third.key"))

    started = time.perf_counter()
    out = json.loads(ok(vnafs("key", "rewrap", "--json", "--key-file", str(fs.key),
                              "--new-key-file", new.origin, str(fs.mnt))).stdout)
    elapsed = time.perf_counter() - started
    assert out["through"] == "mount" and out["keyring_version"] == 2 and out["archive"]
    assert out["seconds"] < 1.0 and elapsed < 10
    text = ok(vnafs("key", "rewrap", "--key-file", new.origin, "--new-key-file", third.origin,
                    str(fs.hot))).stdout
    assert "through its mount" in text and "archive's copy follows" in text

    before = (fs.hot / "keyring").read_bytes()
    refused(vnafs("key", "rewrap", "--key-file", str(fs.key), "--new-key-file", new.origin,
                  str(fs.mnt)), "wrong key: key file")
    refused(vnafs("key", "rewrap", "--key-file", third.origin, "--new-key-file", third.origin,
                  str(fs.mnt)), "the new key is the same as the old one")
    assert (fs.hot / "keyring").read_bytes() == before

    # The daemon goes on sealing (and reserving) under the keyring it rewrote.
    write_files(fs.mnt, "after")
    expected = digest(fs.mnt)
    fs.wait_replicated()
    archived_now = wait_archive_keyring(fs)
    assert not opens(archived_now, old, workdir) and not opens(archived_now, new, workdir)
    assert opens(archived_now, third, workdir) and opens(old_archived, old, workdir)
    assert "internal error" not in fs.log() and "Traceback" not in fs.log()
    fs.umount()

    refused(vnafs("mount", "--key-file", str(fs.key), str(fs.hot), str(fs.mnt)), "wrong key")
    ok(vnafs("mount", "--key-file", third.origin, str(fs.hot), str(fs.mnt)))
    assert digest(fs.mnt) == expected
    fs.umount()
    ok(vnafs("fsck", "--key-file", third.origin, "--no-data", str(fs.hot)))


# -- slots ---------------------------------------------------------------------------------------


def test_slots_through_a_mount_and_offline(fs: Fs, workdir: Path) -> None:
    site = key_source(fs.key)
    recovery = key_source(keygen(workdir / "recovery.key"))
    write_files(fs.mnt, "data")
    expected = digest(fs.mnt)
    ring = fs.hot / "keyring"

    listing = json.loads(ok(vnafs("key", "slots", "--json", str(fs.mnt))).stdout)
    assert listing == {"schema": 1, "hot": str(fs.hot), "keyring_version": 1, "opened_by": None,
                       "slots": [{"slot": 0, "kind": "key-file", "label": "", "created": None}]}
    text = ok(vnafs("key", "add-slot", "--key-file", site.origin, "--new-key-file",
                    recovery.origin, "--label", "recovery", str(fs.mnt))).stdout
    assert "added key slot 1 (key-file, label 'recovery')" in text
    # A passphrase slot, its passphrase on a file descriptor.
    r, w = os.pipe()
    os.write(w, b"operator passphrase\n")
    os.close(w)
    try:
        out = json.loads(ok(vnafs("key", "add-slot", "--json", "--key-file", recovery.origin,
                                  "--new-passphrase-fd", str(r), "--label", "operator",
                                  str(fs.mnt), pass_fds=(r,))).stdout)
    finally:
        os.close(r)
    assert out["slot"]["kind"] == "passphrase" and out["slot"]["slot"] == 2

    listing = json.loads(ok(vnafs("key", "slots", "--json", "--key-file", recovery.origin,
                                  str(fs.mnt))).stdout)
    assert listing["opened_by"] == 1 and listing["keyring_version"] == 2
    assert [(s["slot"], s["kind"], s["label"]) for s in listing["slots"]] == [
        (0, "key-file", ""), (1, "key-file", "recovery"), (2, "passphrase", "operator")]
    assert all(s["created"].endswith("Z") for s in listing["slots"])
    raw = json.dumps(listing) + ok(vnafs("key", "slots", str(fs.hot))).stdout
    for secret in (site.key, recovery.key):
        assert secret is not None and secret.hex() not in raw
    assert "operator passphrase" not in raw

    before = ring.read_bytes()
    refused(vnafs("key", "remove-slot", "--key-file", site.origin, "--slot", "5", str(fs.mnt)),
            "has no slot 5")
    refused(vnafs("key", "remove-slot", "--key-file", site.origin, "--label", "nope",
                  str(fs.mnt)), "no slot labelled 'nope'")
    refused(vnafs("key", "remove-slot", "--key-file", recovery.origin, "--label", "recovery",
                  str(fs.mnt)), "the slot to remove")
    refused(vnafs("key", "add-slot", "--key-file", site.origin, "--new-key-file",
                  recovery.origin, str(fs.mnt)), "opens slot 1 already")
    refused(vnafs("key", "add-slot", "--key-file", site.origin, "--new-key-file",
                  str(keygen(workdir / "x.key")), "--label", "recovery", str(fs.mnt)),
            "labelled 'recovery' already")
    assert ring.read_bytes() == before
    fs.umount()

    # Offline: the recovery key removes the site key; the operator's passphrase still opens.
    ok(vnafs("key", "remove-slot", "--key-file", recovery.origin, "--slot", "0", str(fs.hot)))
    refused(vnafs("mount", "--key-file", site.origin, str(fs.hot), str(fs.mnt)),
            "wrong key: key file")
    ok(vnafs("mount", "--passphrase-fd", "0", str(fs.hot), str(fs.mnt),
             input="operator passphrase\n"))
    assert digest(fs.mnt) == expected
    fs.umount()
    ok(vnafs("key", "remove-slot", "--key-file", recovery.origin, "--label", "operator",
             str(fs.hot)))
    before = ring.read_bytes()
    refused(vnafs("key", "remove-slot", "--key-file", recovery.origin, "--slot", "1",
                  str(fs.hot)), "slot 1 is the only key slot")
    assert ring.read_bytes() == before
    fs.key.unlink()
    shutil.copy(recovery.origin, fs.key)
    fs.mount()
    assert digest(fs.mnt) == expected


# -- passphrase sources ------------------------------------------------------------------------------


def run_on_tty(args: list[str], answers: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run vnafs on a pseudo-terminal (its controlling terminal, so getpass uses it), typing
    each answer when a prompt (text ending in ': ') appears."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: nothing may return into pytest from here
        try:
            os.execv(VNAFS, [VNAFS, *args])
        finally:
            os._exit(127)
    out = b""
    since = 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal (exited)
                break
            if not data:
                break
            out += data
            if answers and out[since:].rstrip(b" ").endswith(b":"):
                os.write(fd, answers.pop(0).encode() + b"\n")
                since = len(out)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"vnafs on a terminal did not finish: {out!r}")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_passphrase_sources_and_passwd(workdir: Path) -> None:
    fs = Fs(workdir)
    fs.mnt.mkdir()
    pwfile = workdir / "pw.txt"
    pwfile.write_text("first passphrase\n")
    r = os.open(pwfile, os.O_RDONLY)
    try:
        ok(vnafs("mkfs", "--passphrase-fd", str(r), str(fs.hot), pass_fds=(r,)))
    finally:
        os.close(r)
    try:
        # A command's output (with its newline) is the passphrase.
        ok(vnafs("mount", "--key-command", f"cat {pwfile}", str(fs.hot), str(fs.mnt)))
        write_files(fs.mnt, "data")
        expected = digest(fs.mnt)
        fs.umount()

        # --passphrase-env: gone from the daemon's environment, even from /proc/PID/environ.
        env = {**os.environ, "VNAFS_TEST_PASSPHRASE": "first passphrase"}
        ok(vnafs("mount", "--passphrase-env", "VNAFS_TEST_PASSPHRASE", str(fs.hot),
                 str(fs.mnt), env=env))
        pid = fs.pid()
        assert pid is not None
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"first passphrase" not in environ
        assert not any(e.startswith(b"VNAFS_TEST_PASSPHRASE=") and len(e) > 22
                       for e in environ.split(b"\0"))
        assert digest(fs.mnt) == expected

        # passwd through the mount, both passphrases on standard input (one line each).
        out = json.loads(ok(vnafs("key", "passwd", "--json", "--passphrase-fd", "0",
                                  "--new-passphrase-fd", "0", str(fs.mnt),
                                  input="first passphrase\nsecond passphrase\n")).stdout)
        assert out["through"] == "mount" and out["slot"]["kind"] == "passphrase"
        fs.umount()

        # passwd offline at a prompt: asked once for the current, twice for the new one.
        ring = fs.hot / "keyring"
        before = ring.read_bytes()
        code, text = run_on_tty(["key", "passwd", str(fs.hot)],
                                ["second passphrase", "third", "thrid"])
        assert code == 1 and "the two passphrases differ" in text and "Traceback" not in text
        assert ring.read_bytes() == before
        code, text = run_on_tty(["key", "passwd", str(fs.hot)],
                                ["second passphrase", "third passphrase", "third passphrase"])
        assert code == 0, text
        assert "Current passphrase of" in text and "Repeat new passphrase" in text
        assert "third passphrase" not in text  # never echoed
        # Without a terminal, the prompt is refused rather than read from elsewhere.
        refused(vnafs("key", "passwd", str(fs.hot), new_session=True), "needs a terminal")
        refused(vnafs("mount", "--passphrase-fd", "0", str(fs.hot), str(fs.mnt),
                      input="second passphrase\n"), "wrong key: the passphrase read from")
        code, text = run_on_tty(["mount", "--passphrase-prompt", str(fs.hot), str(fs.mnt)],
                                ["third passphrase"])
        assert code == 0, text
        assert digest(fs.mnt) == expected
        fs.umount()
        assert ring.read_bytes() != before
    finally:
        fs.cleanup()


# -- every bad input: one line, exit 1, nothing written ---------------------------------------------


def test_bad_inputs_change_nothing(new_fs: Fs, workdir: Path) -> None:
    fs = new_fs
    hot, key = str(fs.hot), str(fs.key)
    other = str(keygen(workdir / "other.key"))
    ring = fs.hot / "keyring"
    nothing = workdir / "nothing"
    nothing.mkdir()
    cases: list[tuple[list[str], str]] = [
        (["key", "rewrap", "--key-file", other, "--new-key-file", other, hot],
         "wrong key: key file"),
        (["key", "rewrap", "--key-file", key, "--new-key-file", key, hot],
         "the new key is the same as the old one"),
        (["key", "rewrap", "--key-file", key, hot], "no new key given"),
        (["key", "rewrap", "--key-file", key, "--new-key-file", str(workdir / "missing.key"),
          hot], "does not exist"),
        (["key", "rewrap", "--passphrase-fd", "0", "--new-key-file", other, hot],
         "created with a key file, not a passphrase"),
        (["key", "remove-slot", "--key-file", key, "--slot", "0", hot], "the only key slot"),
        (["key", "remove-slot", "--key-file", key, "--slot", "3", hot], "has no slot 3"),
        (["key", "add-slot", "--key-file", key, "--new-key-file", other, "--label",
          "bad\tlabel", hot], "control characters"),
        (["key", "slots", "--key-file", other, hot], "wrong key"),
        (["key", "rewrap", "--key-command", "sh -c 'echo oops >&2; exit 3'",
          "--new-key-file", other, hot], "--key-command: sh failed (exit status 3"),
        (["key", "rewrap", "--key-command", "true", "--new-key-file", other, hot],
         "--key-command: true printed nothing"),
        (["key", "rewrap", "--key-command", "/nonexistent/vault", "--new-key-file", other, hot],
         "program /nonexistent/vault not found"),
        (["key", "rewrap", "--key-command", "'unbalanced", "--new-key-file", other, hot],
         "not a valid command line"),
        (["key", "rewrap", "--key-file", key, "--new-key-command", "false", hot],
         "--new-key-command: false failed (exit status 1"),
        (["key", "add-slot", "--key-file", key, "--new-key-command", "printf ''", hot],
         "printed nothing"),
        (["key", "rewrap", "--passphrase-fd", "9", "--new-key-file", other, hot],
         "file descriptor 9 is not open"),
        (["key", "rewrap", "--key-file", key, "--new-passphrase-fd", "9", hot],
         "file descriptor 9 is not open"),
        (["key", "passwd", "--key-file", key, "--new-passphrase-fd", "0", hot],
         "changes a passphrase, not a key file"),
        (["key", "passwd", "--passphrase-fd", "0", "--new-passphrase-fd", "0", hot],
         "created with a key file, not a passphrase"),
        (["key", "rewrap", "--key-file", key, "--new-key-file", other, str(nothing)],
         "not a vnafs hot store"),
        (["mount", "--key-command", "sh -c 'exit 2'", hot, str(fs.mnt)],
         "--key-command: sh failed (exit status 2"),
        (["mount", "--passphrase-fd", "9", hot, str(fs.mnt)], "file descriptor 9 is not open"),
    ]
    before = ring.read_bytes()
    for args, message in cases:
        refused(vnafs(*args, input="a\nb\n"), message)
        assert ring.read_bytes() == before, args
        assert not (fs.hot / "keyring.tmp").exists()
    assert not (fs.hot / "daemon.pid").exists()
    # Two key sources at once is a usage error (argparse: exit 2), before anything is read.
    res = vnafs("key", "rewrap", "--key-file", key, "--passphrase-env", "X", "--new-key-file",
                other, hot)
    assert res.returncode == 2 and "not allowed with argument" in res.stderr
    # And the positive counterparts: a key command that prints the key file's contents.
    ok(vnafs("key", "rewrap", "--key-command", f"cat {key}", "--new-key-command",
             f"cat {other}", hot))
    assert ring.read_bytes() != before
    fs.key.unlink()
    shutil.copy(other, fs.key)
    fs.mount()
    fs.umount()


# -- timings --------------------------------------------------------------------------------------


def test_rewrap_timings(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """How long a rewrap takes (printed; run with -s to see): milliseconds for key files (two
    fsyncs), about one scrypt (N=2^15) more than opening for a passphrase."""
    keys = [keygen(workdir / f"k{i}.key") for i in range(6)]
    fs = Fs(workdir / "t")
    fs.root.mkdir()
    shutil.copy(keys[0], fs.key)
    fs.create()
    rows: list[tuple[str, float, float]] = []
    try:
        def rewrap(label: str, *args: str, target: Path, **kw: Any) -> None:
            started = time.perf_counter()
            out = json.loads(ok(vnafs("key", "rewrap", "--json", *args, str(target),
                                      **kw)).stdout)
            rows.append((label, out["seconds"], time.perf_counter() - started))

        rewrap("key file, offline (v1 -> v2)", "--key-file", str(keys[0]), "--new-key-file",
               str(keys[1]), target=fs.hot)
        rewrap("key file, offline", "--key-file", str(keys[1]), "--new-key-file",
               str(keys[2]), target=fs.hot)
        shutil.copy(keys[2], fs.key)
        fs.mount()
        rewrap("key file, through the mount", "--key-file", str(keys[2]), "--new-key-file",
               str(keys[3]), target=fs.mnt)
        rewrap("key file -> passphrase, through the mount", "--key-file", str(keys[3]),
               "--new-passphrase-fd", "0", target=fs.mnt, input="pw one\n")
        rewrap("passphrase -> passphrase, through the mount", "--passphrase-fd", "0",
               "--new-passphrase-fd", "0", target=fs.mnt, input="pw one\npw two\n")
        fs.umount()
        rewrap("passphrase -> passphrase, offline", "--passphrase-fd", "0",
               "--new-passphrase-fd", "0", target=fs.hot, input="pw two\npw three\n")
    finally:
        fs.cleanup()
    with capsys.disabled():
        print("\nrewrap timings (operation inside vnafs / whole command):")
        for label, inner, total in rows:
            print(f"  {label:45} {inner * 1000:8.1f} ms {total * 1000:8.1f} ms")
    assert all(inner < 0.5 for label, inner, _ in rows if "passphrase" not in label)


# -- data key rotation, re-seal, retire -------------------------------------------------------------


def archive_versions(fs: Fs) -> set[int]:
    """The data key versions of every block object and of HEAD in a file:// archive."""
    root = archive_dir(fs)
    paths = [*(root / "blocks").rglob("*"), root / "meta" / "HEAD"]
    return {int.from_bytes(p.read_bytes()[8:12], "big") for p in paths if p.is_file()}


def retire_when_replicated(fs: Fs, target: Path, version: int, timeout: float = 60) -> str:
    """`vnafs key retire` once the archive has caught up (the re-seal's checkpoint cycle);
    until then it must refuse, saying what is still sealed."""
    deadline = time.monotonic() + timeout
    while True:
        res = vnafs("key", "retire", "--key-file", str(fs.key), "--version", str(version),
                    str(target))
        if res.returncode == 0 or time.monotonic() > deadline:
            return ok(res).stdout
        refused(res, f"data key version {version} still seals")
        time.sleep(0.5)


def test_rotate_reseal_retire_through_a_mount_and_offline(archived: Fs, workdir: Path) -> None:
    fs = archived
    write_files(fs.mnt, "v1")
    (fs.mnt / "v1" / "f0").unlink()  # a tombstoned block: still in the archive, still v1
    ok(vnafs("snapshot", "create", str(fs.mnt), "s1"))
    snap = digest(fs.mnt / ".snapshots" / "s1")
    fs.wait_replicated()

    refused(vnafs("key", "retire", "--key-file", str(fs.key), "--version", "1", str(fs.mnt)),
            "version 1 is the current one")
    out = json.loads(ok(vnafs("key", "rotate", "--json", "--key-file", str(fs.key),
                              str(fs.mnt))).stdout)
    assert out["data_key_version"] == 2 and out["through"] == "mount" and out["dropped"] == []
    write_files(fs.mnt, "v2")
    expected = digest(fs.mnt)
    fs.wait_replicated()
    assert archive_versions(fs) == {1, 2}
    refused(vnafs("key", "retire", "--key-file", str(fs.key), "--version", "1", str(fs.mnt)),
            "data key version 1 still seals")

    rep = json.loads(ok(vnafs("key", "reseal", "--json", str(fs.mnt))).stdout)
    assert rep["through"] == "mount" and rep["to_version"] == 2 and rep["phase"] == "done"
    assert rep["blocks_resealed"] >= 4 and rep["archive_resealed"] >= 5
    text = retire_when_replicated(fs, fs.mnt, 1)
    assert "retired data key version 1" in text and "or the archive" in text
    assert archive_versions(fs) == {2}
    status = json.loads(ok(vnafs("status", "--json", str(fs.mnt))).stdout)
    assert status["keys"]["data_key_versions"] == [2] and status["keys"]["retired"] == [1]
    assert digest(fs.mnt) == expected
    assert digest(fs.mnt / ".snapshots" / "s1") == snap
    fs.umount()

    # Offline: rotate, re-seal (archive blocks at once), the checkpoint at the next mount.
    ok(vnafs("key", "rotate", "--key-file", str(fs.key), str(fs.hot)))
    text = ok(vnafs("key", "reseal", "--key-file", str(fs.key), str(fs.hot))).stdout
    assert "re-sealed under data key version 3" in text and "once mounted" in text
    fs.mount()
    assert digest(fs.mnt) == expected
    fs.wait_replicated()
    fs.umount()
    retire_when_replicated(fs, fs.hot, 2)
    assert archive_versions(fs) == {3}
    ok(vnafs("fsck", "--key-file", str(fs.key), str(fs.hot)))

    restored = workdir / "restored"
    ok(vnafs("restore", "--key-file", str(fs.key), "--no-progress", str(fs.archive),
             str(restored)))
    other = Fs(workdir / "other")
    other.root.mkdir()
    other.mnt.mkdir()
    try:
        ok(vnafs("mount", "--key-file", str(fs.key), str(restored), str(other.mnt)))
        assert digest(other.mnt) == expected
        assert digest(other.mnt / ".snapshots" / "s1") == snap
    finally:
        if other.mnt.is_mount():
            run_vnafs("umount", str(other.mnt))
