"""The documented upgrade of a format-1 store to format 2 (docs/admin.md, "Store formats").

A format-1 store's block ids (HMAC-SHA256) cannot be changed in place: every block map record
and block file name would change. The path admin.md gives is a copy through the file system:
`vnafs mkfs` a new store (format 2 by default), mount both, `rsync -aHAX --numeric-ids`, and
this test runs exactly that on a copy of the frozen format-1 store (tests/data/format1): the new
store is format 2, shows every path, mode, owner, link count, size, mtime, content, symlink
target and xattr of the old one's live tree, rebuilds its DICOM views from the copied files,
and is clean under fsck (which recomputes every block id with keyed BLAKE3).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import Fs, run_vnafs
from tests.requires import need_program
from tests.test_format1 import assert_fsck_clean, assert_tree, copy_fixture, manifest


def _view_contents(root: Path) -> list[str]:
    """SHA-256 of every file under a `.dicom/by-study` tree. The view *names* carry HMACs
    under the store's own name key, so a new store names them differently; what it shows
    must be the same instances."""
    out = []
    for dirpath, _, filenames in os.walk(root / ".dicom" / "by-study"):
        for name in filenames:
            out.append(hashlib.sha256((Path(dirpath) / name).read_bytes()).hexdigest())
    return sorted(out)


def test_format1_store_upgrades_to_format2_by_rsync(workdir: Path) -> None:
    need_program("rsync", "rsync")
    old = copy_fixture(workdir)
    new = Fs(workdir / "new")
    new.root.mkdir(mode=0o755)
    try:
        # The same key file serves both stores (each has its own keyring and master secret).
        shutil.copy(old.key, new.key)
        new.create()
        assert (old.hot / "FORMAT").read_text() == "vnafs-hot-store 1\n"
        assert (new.hot / "FORMAT").read_text() == "vnafs-hot-store 2\n"
        old.mount()
        new.mount()
        subprocess.run(["rsync", "-aHAX", "--numeric-ids", f"{old.mnt}/", f"{new.mnt}/"],
                       check=True, capture_output=True, timeout=300)
        # The copy is indexed as it is written; a DICOM file's link count includes its view
        # names (format.md 5.2), so compare once the index has caught up.
        new.wait_indexed()
        assert_tree(manifest()["live"], new.mnt)
        old_views = _view_contents(old.mnt)
        assert old_views and _view_contents(new.mnt) == old_views
        new.umount()
        old.umount()
    finally:
        new.cleanup()
        old.cleanup()
    assert_fsck_clean(new, new.hot)
    report = run_vnafs("fsck", "--key-file", str(new.key), str(new.hot)).stdout
    assert "clean" in report
