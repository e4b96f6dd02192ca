"""Durations and points in time as an administrator writes them.

Why a module of its own: the configuration speaks in durations (`every = "1h"`, `lock = "30d"`,
`retention`), the command line in points in time (`snapshot lock --until`), and an admin should
not have to remember which takes which. Every place that takes a time accepts both: a duration
counts from now, a date or date and time is UTC.
"""

from __future__ import annotations

import calendar
import time

from vnafs.errors import VnafsError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%SZ")
NS = 10**9


def duration(text: object) -> int | None:
    """Seconds of "90s", "15m", "1h", "30d", "2w", "10y"; None if `text` is not one."""
    if isinstance(text, str):
        text = text.strip()
        if len(text) >= 2 and text[:-1].isdigit() and text[-1] in UNITS:
            return int(text[:-1]) * UNITS[text[-1]]
    return None


def parse_duration(text: object, what: str, *, allow_zero: bool = False) -> int:
    """Seconds of a duration in a configuration file; one-line error naming `what`."""
    seconds = duration(text)
    if seconds is not None and (seconds > 0 or allow_zero):
        return seconds
    raise VnafsError(f"{what} must be a duration such as \"15m\", \"1h\", \"30d\" or \"2w\"; "
                     "fix the file")


def parse_when(text: str, *, now_ns: int | None = None) -> int:
    """Nanoseconds since the epoch of a duration from now ("30d") or a UTC date
    ("2027-01-31", "2027-01-31T12:00:00"); `ValueError` with a one-line message otherwise."""
    seconds = duration(text)
    if seconds is not None:
        return (time.time_ns() if now_ns is None else now_ns) + seconds * NS
    for fmt in _FORMATS:
        try:
            return calendar.timegm(time.strptime(text.strip(), fmt)) * NS
        except ValueError:
            continue
    raise ValueError(f"{text!r} is neither a duration nor a date: write a duration from now "
                     "such as 30d or 10y, or a UTC date YYYY-MM-DD[Thh:mm:ss]")
