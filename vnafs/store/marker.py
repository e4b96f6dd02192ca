"""The files that say what a hot store directory is: `FORMAT` and `RESTORING`.

A directory is a hot store only once `FORMAT` exists, and `FORMAT` is the last thing `mkfs`
and `restore` write, so an unfinished store can never be mounted. Its version also says how the
store computes block ids (docs/format.md: 1 = HMAC-SHA256, 2 = keyed BLAKE3), so every opener
reads it here and hands it to the `Sealer`. `restore` also keeps a
`RESTORING` marker for its whole run; a store holding it is refused with the command that
finishes it. This module imports nothing heavy, so the offline commands that need these checks
(restore, fsck) do not pay for the daemon's imports.
"""

from __future__ import annotations

import os
from pathlib import Path

from vnafs import FORMAT_VERSION, __version__
from vnafs.errors import VnafsError

FORMAT_FILE = "FORMAT"
FORMAT_MAGIC = "vnafs-hot-store"
# Every format this vnafs reads and writes; `mkfs` writes FORMAT_VERSION unless told otherwise.
KNOWN_FORMATS = (1, 2)
RESTORING = "RESTORING"


def read_format(root: Path) -> int:
    """The store's format version, or a one-line error saying what the directory is instead."""
    if not root.exists():
        raise VnafsError(f"hot store {root} does not exist: create it with 'vnafs mkfs'")
    if not root.is_dir():
        raise VnafsError(f"hot store {root} is not a directory: give the directory 'vnafs mkfs' "
                         "created")
    if (root / RESTORING).exists():
        raise VnafsError(f"hot store {root} is an unfinished restore: run the same vnafs restore "
                         "command again to finish it")
    try:
        text = (root / FORMAT_FILE).read_text()
    except FileNotFoundError:
        raise VnafsError(f"{root} is not a vnafs hot store (no {FORMAT_FILE} file): create one "
                         "with 'vnafs mkfs'") from None
    magic, _, version = text.strip().partition(" ")
    if magic != FORMAT_MAGIC or not version.isdigit():
        raise VnafsError(f"{root}/{FORMAT_FILE} is damaged: restore it from a backup")
    if int(version) > FORMAT_VERSION:
        raise VnafsError(
            f"hot store {root} has format version {int(version)}, newer than this vnafs "
            f"({__version__}, formats {', '.join(map(str, KNOWN_FORMATS))}) understands: "
            "upgrade vnafs"
        )
    if int(version) not in KNOWN_FORMATS:
        # No vnafs ever wrote it: damage or a hand edit, not a newer store.
        raise VnafsError(f"{root}/{FORMAT_FILE} is damaged: restore it from a backup")
    return int(version)


def write_format(root: Path, version: int = FORMAT_VERSION) -> None:
    """FORMAT is written last: a store without it is unfinished (mkfs, restore), never used."""
    if version not in KNOWN_FORMATS:
        raise VnafsError(f"unknown store format {version}: give one of "
                         f"{', '.join(map(str, KNOWN_FORMATS))}")
    tmp = root / (FORMAT_FILE + ".tmp")
    tmp.write_text(f"{FORMAT_MAGIC} {version}\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(root / FORMAT_FILE)
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
