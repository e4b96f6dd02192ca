"""The pure parts of running as a service: log lines, their rate limit, the fstab helper's
argument translation, the reload rules and the notify datagrams.

Why here: each is a function of its input, so every case is cheap to state; tests/test_service.py
shows the same behaviour end to end with a real mount.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from vnafs import config, logs
from vnafs.cli import mount_helper_argv
from vnafs.errors import VnafsError
from vnafs.service import Notifier


def record(msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("vnafs.test", level, __file__, 1, msg, args, None)


def test_key_value_lines_quote_what_needs_it() -> None:
    line = logs.KeyValueFormatter().format(record('a "b" = c\nd'))
    stamp, rest = line.split(" ", 1)
    assert stamp.endswith("Z") and "T" in stamp
    assert rest == 'level=error logger=vnafs.test msg="a \\"b\\" = c\\nd"'
    assert logs.JournalFormatter().format(record("plain", level=logging.WARNING)) == \
        "<4>level=warning logger=vnafs.test msg=plain"


def test_rate_limit_drops_repeats_and_says_how_many(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    limit = logs.RateLimit(burst=3, window=60)
    kept = [limit.filter(record("upload failed: %s", "timeout")) for _ in range(10)]
    assert kept == [True] * 3 + [False] * 7
    # Another line (another block) is its own: never dropped for the first one's sake.
    assert limit.filter(record("block %s missing", "ab12"))
    now[0] += 61
    after = record("upload failed: %s", "timeout")
    assert limit.filter(after)
    assert after.getMessage() == ("upload failed: timeout (7 more like this in the last 60 s "
                                  "were not logged)")


@pytest.mark.parametrize(("prog", "argv", "expected"), [
    ("/sbin/mount.fuse.vnafs", ["/srv/hot", "/mnt/vna", "-o",
                                "rw,allow_other,key_file=/etc/vnafs/k,_netdev,nofail,"
                                "x-systemd.automount,comment=x"],
     ["mount", "--key-file", "/etc/vnafs/k", "-o", "allow_other", "/srv/hot", "/mnt/vna"]),
    ("vnafs", ["/srv/hot", "/mnt/vna", "-o", "key_file=/k,dev,suid"],
     ["mount", "--key-file", "/k", "/srv/hot", "/mnt/vna"]),
    ("/sbin/mount.fuse.vnafs", ["s3://b/p", "/mnt/a", "-n", "-o",
                                "ro,archive_only,key_file=/k,cache=/var/cache/x"],
     ["mount", "--archive-only", "--key-file", "/k", "--cache", "/var/cache/x", "s3://b/p",
      "/mnt/a"]),
    ("/sbin/umount.fuse.vnafs", ["/mnt/vna", "-n"], ["umount", "/mnt/vna"]),
    ("vnafs", ["status", "/mnt/vna"], None),
    ("vnafs", ["mount", "--key-file", "/k", "/srv/hot", "/mnt"], None),
])
def test_fstab_helper_calls_become_vnafs_mount(prog: str, argv: list[str],
                                              expected: list[str] | None) -> None:
    assert mount_helper_argv(prog, argv) == expected


def test_fstab_helper_refuses_ro_hot_mounts_and_missing_arguments() -> None:
    with pytest.raises(VnafsError, match="always mounted read-write"):
        mount_helper_argv("mount.fuse.vnafs", ["/srv/hot", "/mnt", "-o", "ro,key_file=/k"])
    with pytest.raises(VnafsError, match="needs SOURCE and DIRECTORY"):
        mount_helper_argv("mount.fuse.vnafs", ["/srv/hot"])


def test_reload_applies_only_what_a_running_mount_can_change() -> None:
    running, new = config.Config(), config.Config()
    new.tiering.high_watermark = 0.9
    new.archive.interval = 30
    new.log.level = "debug"
    new.dicom.views = ".other"
    new.store.workers = 8
    changed, refused = config.reload(running, new)
    assert changed == ["archive.interval", "tiering.high_watermark", "log.level"]
    assert refused == ["store.workers", "dicom.views"]
    assert running.tiering.high_watermark == 0.9 and running.dicom.views == ".dicom"


def test_notify_sends_one_datagram_per_call_and_nothing_without_a_socket(tmp_path: Path
                                                                         ) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "n.sock"))
    try:
        n = Notifier(str(tmp_path / "n.sock"))
        n.send(READY=1, STATUS="mounted at /mnt")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=mounted at /mnt\n"
        n.close()
    finally:
        receiver.close()
    quiet = Notifier("")
    assert not quiet.enabled
    quiet.send(READY=1)  # nothing to send to: nothing happens
