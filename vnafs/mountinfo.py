"""The mount table of this process, read from /proc/self/mountinfo.

Why a module of its own: the CLI (which hot store serves a mount point), the daemon (is the
mount point free), the tests and the benchmarks (is it still mounted, what is mounted below a
work directory) all ask the mount table, and its format has two traps a quick `split()` walks
into: paths are octal-escaped (a space in a mount point reads `\\040`, a backslash `\\134`), and
zero or more optional fields (`shared:1`, `master:2`) stand between the mount options and the
` - ` separator, so the file system type and source have no fixed position. One parser, here,
with the standard library only: importing it costs nothing (no trio, no LMDB).

A line, as proc(5) describes it:

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue

mount ID, parent ID, major:minor, root, mount point, mount options, optional fields, `-`, file
system type, source, super options. Only what vnafs uses is kept: mount point, type and source.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["MOUNTINFO", "Mount", "find_mount", "mounts", "parse", "parse_line", "unescape"]

MOUNTINFO = "/proc/self/mountinfo"

# The kernel escapes space, tab, newline and backslash in paths as a backslash and three octal
# digits (one byte each, so the first digit is at most 3).
_ESCAPE = re.compile(rb"\\([0-3][0-7]{2})")


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount: where it is, what file system, and its source (for FUSE, the fsname)."""

    mount_point: str
    fs_type: str
    source: str


def unescape(field: bytes) -> str:
    """A mountinfo field with its octal escapes decoded, as os.fsdecode gives file names."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field))


def parse_line(line: bytes) -> Mount | None:
    """The mount a mountinfo line describes, or None for a line not in that format."""
    fields = line.split()
    # The separator is the first "-" after the six fixed fields; an optional field never is
    # "-", and paths are absolute, so nothing before it can be mistaken for it.
    try:
        sep = fields.index(b"-", 6)
    except ValueError:
        return None
    if sep + 1 >= len(fields):
        return None
    source = unescape(fields[sep + 2]) if sep + 2 < len(fields) else ""
    return Mount(unescape(fields[4]), unescape(fields[sep + 1]), source)


def parse(text: bytes) -> list[Mount]:
    """Every mount of a mountinfo text, in its order (a later mount can hide an earlier one)."""
    return [m for m in map(parse_line, text.splitlines()) if m is not None]


def mounts(path: str = MOUNTINFO) -> list[Mount]:
    """The mounts this process sees, parent mounts before the mounts on top of them."""
    with open(path, "rb") as f:
        return parse(f.read())


def find_mount(path: str | os.PathLike[str]) -> Mount | None:
    """The mount whose mount point is `path` (symlinks resolved), None if it is no mount point.

    When two mounts share a mount point, the later one is on top and is the one returned.
    """
    target = os.path.realpath(path)
    found = None
    for m in mounts():
        if m.mount_point == target:
            found = m
    return found
