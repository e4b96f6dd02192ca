"""Fixtures of the in-process layer (tests/unit/): a temporary hot store served without FUSE.

Nothing here needs root, /dev/fuse or a mount, and an audit hook makes sure of it: while a test
of this directory runs, opening /dev/fuse, importing pyfuse3 or starting a process (mount,
fusermount3, the vnafs command) fails that test.

`vfs` is a fresh store served as a mount would serve it (tests/unit/harness.py); after the
test it is "unmounted" (open files committed, the indexer drained) and checked by `fsck`, so a
test that leaves references, link counts or block files wrong fails even if its own asserts
pass. Tests that damage the store on purpose set `vfs.fsck_at_exit = False`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from vnafs import fsck

from .harness import Vfs, make_store, open_vfs

# -- nothing of FUSE, mounts or other processes ---------------------------------------------------

_seen: list[str] | None = None  # what the running unit test did that it must not; None: off


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _seen is None:
        return
    if event == "open":
        if args[0] in ("/dev/fuse", b"/dev/fuse"):
            _seen.append("opened /dev/fuse")
    elif event == "import":
        if args[0] == "pyfuse3":
            _seen.append("imported pyfuse3")
    elif event in ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.fork", "os.system"):
        _seen.append(f"{event} {args[0]!r}")


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _no_fuse_no_mount_no_processes() -> Iterator[None]:
    global _seen
    _seen = []
    try:
        yield
    finally:
        seen, _seen = _seen, None
    assert not seen, f"the in-process layer must not need FUSE or other processes: {seen}"


# -- the store --------------------------------------------------------------------------------------


@pytest.fixture
async def vfs(tmp_path: Path) -> AsyncIterator[Vfs]:
    """A new hot store served in-process, checked by fsck after the test. (pytest-trio runs
    the fixture's teardown inside the test's own trio run, so it cannot tell whether the test
    passed: after a failed test a complaint of fsck may follow the failure.)"""
    store = make_store(tmp_path / "hot")
    try:
        async with open_vfs(store) as v:
            yield v
        if v.fsck_at_exit:
            report = fsck.check(store, progress=False)
            assert report.clean, f"fsck after the test: {report.summary()}"
    finally:
        store.close()
