"""POSIX tests, directories and names: statfs, name lengths (255 and 256 bytes), readdir
(also while the directory changes) and inode numbers.

The contract these tests pin down, what they assume and how to run them on any directory
(--posix-dir) are described in tests/posix_helpers.py.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.posix_helpers import (
    assert_errno,
    make_dir,
    make_file,
    read_file,
)

# --------------------------------------------------------------------------------------------
# statfs and name lengths
# --------------------------------------------------------------------------------------------


def test_statvfs_reports_sane_values(posix_dir: Path) -> None:
    sv = os.statvfs(posix_dir)
    assert sv.f_bsize > 0
    assert sv.f_frsize > 0
    assert sv.f_blocks > 0
    assert sv.f_blocks >= sv.f_bfree >= sv.f_bavail
    assert sv.f_namemax == 255


NAME_255 = "n" * 255
NAME_255_MULTIBYTE = "é" * 127 + "x"  # 255 bytes in UTF-8
NAME_256 = "L" * 256


def test_255_byte_name_works_everywhere(posix_dir: Path) -> None:
    assert len(os.fsencode(NAME_255_MULTIBYTE)) == 255
    d = make_dir(posix_dir / "d")
    for name in (NAME_255, NAME_255_MULTIBYTE):
        path = make_file(d / name, b"long name")
        assert os.stat(path).st_size == 9
        assert os.listdir(d) == [name]
        os.rename(path, d / (name[:-1] + "y"))
        assert os.listdir(d) == [name[:-1] + "y"]
        os.unlink(d / (name[:-1] + "y"))
        assert os.listdir(d) == []
    os.mkdir(d / NAME_255)
    os.symlink(NAME_255, d / ("s" * 255))
    assert os.path.isdir(d / ("s" * 255))
    assert sorted(os.listdir(d)) == sorted([NAME_255, "s" * 255])


def _create_and_close(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


_TOO_LONG_OPS: dict[str, Callable[[Path], object]] = {
    "create": lambda d: _create_and_close(d / NAME_256),
    "create_multibyte": lambda d: _create_and_close(d / ("é" * 128)),
    "mkdir": lambda d: os.mkdir(d / NAME_256),
    "rename_target": lambda d: os.rename(d / "src", d / NAME_256),
    "symlink_name": lambda d: os.symlink("src", d / NAME_256),
    "link_name": lambda d: os.link(d / "src", d / NAME_256),
    "mkfifo": lambda d: os.mkfifo(d / NAME_256),
    "stat": lambda d: os.stat(d / NAME_256),
    "unlink": lambda d: os.unlink(d / NAME_256),
}


@pytest.mark.parametrize("op", sorted(_TOO_LONG_OPS))
def test_256_byte_name_fails_with_enametoolong(posix_dir: Path, op: str) -> None:
    d = make_dir(posix_dir / "d")
    make_file(d / "src", b"x")
    assert_errno(lambda: _TOO_LONG_OPS[op](d), errno.ENAMETOOLONG)
    assert os.listdir(d) == ["src"]


# --------------------------------------------------------------------------------------------
# readdir
# --------------------------------------------------------------------------------------------


def _fill(d: Path, count: int, prefix: str = "entry") -> set[str]:
    names = {f"{prefix}-{i:04d}-{'x' * 40}" for i in range(count)}
    for name in names:
        _create_and_close(d / name)
    return names


def test_readdir_of_1000_files_lists_each_exactly_once(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    names = _fill(d, 1000)
    listed = os.listdir(d)
    assert len(listed) == 1000
    assert set(listed) == names
    with os.scandir(d) as it:
        entries = list(it)
    assert sorted(e.name for e in entries) == sorted(names)
    for entry in entries:
        assert entry.is_file(follow_symlinks=False)
        assert entry.inode() == os.lstat(entry.path).st_ino


def test_readdir_of_empty_directory(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    assert os.listdir(d) == []
    with os.scandir(d) as it:
        assert list(it) == []


def test_readdir_reports_entry_types(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    make_file(d / "file")
    make_dir(d / "dir")
    os.symlink("file", d / "link")
    os.mkfifo(d / "fifo")
    with os.scandir(d) as it:
        kinds = {
            e.name: (
                e.is_file(follow_symlinks=False),
                e.is_dir(follow_symlinks=False),
                e.is_symlink(),
            )
            for e in it
        }
    assert kinds == {
        "file": (True, False, False),
        "dir": (False, True, False),
        "link": (False, False, True),
        "fifo": (False, False, False),
    }


ODD_NAMES = [
    "héllo wörld",
    "日本語のファイル名",
    "line\nbreak",
    "tab\there",
    " leading space",
    "trailing space ",
    "emoji 🙂🩻",
    "back\\slash",
    "-dash",
    ".hidden",
    "...",
    "quote'\"",
    "star*question?<>|colon:",
    "CASE",
    "case",
    "nfc \u00e9",
    "nfd e\u0301",
]


def test_readdir_returns_unicode_space_and_newline_names_exactly(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    for i, name in enumerate(ODD_NAMES):
        make_file(d / name, str(i).encode())
    assert sorted(os.listdir(d)) == sorted(ODD_NAMES)
    for i, name in enumerate(ODD_NAMES):
        assert read_file(d / name) == str(i).encode()


def test_names_are_arbitrary_bytes_not_only_utf8(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    raw = [b"latin1-caf\xe9", b"\xff\xfe invalid utf-8", b"ctrl-\x01\x7f"]
    base = os.fsencode(d)
    for name in raw:
        fd = os.open(base + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, name)
        os.close(fd)
    assert sorted(os.listdir(base)) == sorted(raw)
    for name in raw:
        assert read_file(base + b"/" + name) == name


def test_scandir_while_deleting_seen_entries_neither_skips_nor_repeats(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    names = _fill(d, 1000)
    seen: list[str] = []
    with os.scandir(d) as it:
        for k, entry in enumerate(it):
            seen.append(entry.name)
            if k % 2 == 0:
                os.unlink(entry.path)
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    assert set(seen) == names, "surviving entries were skipped"
    assert set(os.listdir(d)) == set(seen[1::2])


def test_scandir_while_deleting_unseen_entries_lists_survivors_once(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    names = _fill(d, 1000)
    rng = random.Random(99)
    deleted: set[str] = set()
    seen: list[str] = []
    with os.scandir(d) as it:
        for entry in it:
            seen.append(entry.name)
            candidates = sorted(names - deleted - set(seen))
            for victim in rng.sample(candidates, min(2, len(candidates))):
                os.unlink(d / victim)
                deleted.add(victim)
    assert len(seen) == len(set(seen))
    survivors = names - deleted
    assert survivors <= set(seen), "surviving entries were skipped"
    assert set(os.listdir(d)) == survivors


def test_scandir_while_creating_lists_existing_entries_once(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    names = _fill(d, 1000)
    created: set[str] = set()
    seen: list[str] = []
    with os.scandir(d) as it:
        for k, entry in enumerate(it):
            seen.append(entry.name)
            # At most 1000 + 2 * 500 names ever exist: more entries means repeats.
            assert k < 2000, "the listing does not end"
            if k % 2 == 0 and k < 1000:
                # Names that sort (and hash) on both sides of the cursor, whatever the order.
                for name in (f"0-new-{k:04d}", f"z-new-{k:04d}"):
                    _create_and_close(d / name)
                    created.add(name)
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    assert names <= set(seen), "existing entries were skipped"
    assert set(seen) - names <= created
    assert set(os.listdir(d)) == names | created


def test_readdir_reflects_rename_and_unlink(posix_dir: Path) -> None:
    d = make_dir(posix_dir / "d")
    make_file(d / "a")
    make_file(d / "b")
    os.listdir(d)
    os.rename(d / "a", d / "c")
    os.unlink(d / "b")
    make_dir(d / "e")
    assert sorted(os.listdir(d)) == ["c", "e"]


# --------------------------------------------------------------------------------------------
# inode numbers
# --------------------------------------------------------------------------------------------


def test_inode_number_is_stable_across_rename(posix_dir: Path) -> None:
    f = make_file(posix_dir / "f", b"x")
    d = make_dir(posix_dir / "d")
    ino_f, ino_d = os.stat(f).st_ino, os.stat(d).st_ino
    os.rename(f, d / "g")
    assert os.stat(d / "g").st_ino == ino_f
    os.rename(d, posix_dir / "e")
    assert os.stat(posix_dir / "e").st_ino == ino_d
    assert os.stat(posix_dir / "e" / "g").st_ino == ino_f
    fd = os.open(posix_dir / "e" / "g", os.O_RDONLY)
    try:
        assert os.fstat(fd).st_ino == ino_f
    finally:
        os.close(fd)


def test_distinct_files_have_distinct_inode_numbers(posix_dir: Path) -> None:
    paths = [make_file(posix_dir / f"f{i}") for i in range(50)]
    paths += [make_dir(posix_dir / f"d{i}") for i in range(10)]
    for i in range(10):
        os.symlink("f0", posix_dir / f"l{i}")
        paths.append(posix_dir / f"l{i}")
    stats = [os.lstat(p) for p in paths]
    assert len({st.st_ino for st in stats}) == len(paths)
    assert len({st.st_dev for st in stats}) == 1
