"""Where the daemon's log lines go, and in what form.

Why a module of its own: a storage daemon runs for years, and its log is read by people under
pressure and by tools. Three rules hold for every line, wherever it goes:

- one line per event, `key=value` after a UTC timestamp (`2026-12-03T06:50:00.123Z
  level=warning logger=vnafs.tier msg="..."`), so `grep level=error` and log shippers work;
- run by systemd (stderr is the journal: `JOURNAL_STREAM` names it), lines go to stderr with
  the `<N>` syslog priority prefix journald understands and no timestamp of our own (journald
  adds it); otherwise to `<hot>/vnafs.log`, rotated at 16 MiB, four old files kept;
- the same line from the same place repeated more than `BURST` times within `WINDOW` seconds
  is dropped, and the next one after the window says how many were (a retry loop during an
  archive outage must not fill the disk). Lines that differ (another block, another inode)
  are all kept.

No PHI: callers log inode numbers, block ids, counts and table names, never file names,
DICOM values or UIDs (tests/test_phi.py greps the logs). `reopen()` is what SIGHUP runs, for
log rotation by an outside tool; `set_level()` what a reloaded `[log] level` does.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
import time
from pathlib import Path

LOG_FILE = "vnafs.log"
MAX_BYTES = 16 << 20
BACKUPS = 4
# Rate limit: at most BURST lines of one message template per WINDOW seconds.
BURST = 10
WINDOW = 60.0
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
# syslog priorities (sd-daemon(3)) of Python's levels.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def _quote(text: str) -> str:
    if text and not any(c in text for c in ' "=\\\n'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class KeyValueFormatter(logging.Formatter):
    """`2026-12-03T06:50:00.123Z level=info logger=vnafs.daemon msg="mounted ..."`."""

    def __init__(self, *, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        line = (f"level={record.levelname.lower()} logger={record.name} "
                f"msg={_quote(msg)}")
        if not self.timestamps:
            return line
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z {line}"


class JournalFormatter(KeyValueFormatter):
    """Lines for journald on stderr: `<4>level=warning logger=... msg=...`."""

    def __init__(self) -> None:
        super().__init__(timestamps=False)

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


class RateLimit(logging.Filter):
    """Drops a line repeated more than BURST times in WINDOW seconds; the first one after the
    window says how many were dropped. Thread-safe: worker threads log too."""

    def __init__(self, burst: int = BURST, window: float = WINDOW) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self._lock = threading.Lock()
        # (logger, level, line) -> [window start, lines in it, lines dropped]
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self.window:
                dropped = int(entry[2]) if entry is not None else 0
                if len(self._seen) > 10_000:
                    self._seen.clear()
                self._seen[key] = [now, 1, 0]
                if dropped:
                    record.msg = f"{key[2]} ({dropped} more like this in the last " \
                                 f"{self.window:.0f} s were not logged)"
                    record.args = None
                return True
            entry[1] += 1
            if entry[1] <= self.burst:
                return True
            entry[2] += 1
            return False


def under_journald() -> bool:
    """True when stderr is the systemd journal (systemd.exec(5): `JOURNAL_STREAM` holds the
    device and inode of the stream, compared so an inherited variable does not fool us)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    dev, _, ino = value.partition(":")
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def setup(hot: Path | None, *, stderr: bool, level: int = logging.INFO) -> None:
    """Configure the root logger (once per process)."""
    root = logging.getLogger()
    root.setLevel(level)
    limit = RateLimit()
    if under_journald():
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(JournalFormatter())
        sh.addFilter(limit)
        root.addHandler(sh)
        return
    if hot is not None:
        fh = logging.handlers.RotatingFileHandler(hot / LOG_FILE, maxBytes=MAX_BYTES,
                                                  backupCount=BACKUPS)
        fh.setFormatter(KeyValueFormatter())
        fh.addFilter(limit)
        root.addHandler(fh)
    if stderr:
        sh = logging.StreamHandler()
        sh.setFormatter(KeyValueFormatter())
        sh.addFilter(limit)
        root.addHandler(sh)


def reopen() -> None:
    """Close and reopen the log file (after an outside tool moved it)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()


def set_level(name: str) -> None:
    logging.getLogger().setLevel(LEVELS[name])
