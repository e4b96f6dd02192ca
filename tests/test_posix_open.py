"""POSIX tests, open(2) flags: O_EXCL (also raced by 8 processes), O_CREAT, O_TRUNC,
O_APPEND, and the errors for missing names, directories and files used as directories.

The contract these tests pin down, what they assume and how to run them on any directory
(--posix-dir) are described in tests/posix_helpers.py.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

from tests.posix_helpers import (
    BLOCK,
    MIB,
    assert_errno,
    make_dir,
    make_file,
    rand_bytes,
    read_file,
    spawn_py,
    wait_all,
    write_all,
)

# --------------------------------------------------------------------------------------------
# open(2) flags
# --------------------------------------------------------------------------------------------


def test_o_excl_on_existing_file_fails_with_eexist(posix_dir: Path) -> None:
    path = make_file(posix_dir / "f", b"keep me")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC
    assert_errno(lambda: os.open(path, flags, 0o644), errno.EEXIST)
    assert read_file(path) == b"keep me"


def test_o_excl_on_existing_directory_and_dangling_symlink_fails_with_eexist(
    posix_dir: Path,
) -> None:
    make_dir(posix_dir / "d")
    os.symlink("nowhere", posix_dir / "dangling")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    assert_errno(lambda: os.open(posix_dir / "d", flags, 0o644), errno.EEXIST)
    assert_errno(lambda: os.open(posix_dir / "dangling", flags, 0o644), errno.EEXIST)
    assert not (posix_dir / "nowhere").exists()



_RACER = """
import errno, os, sys
base, rounds, me = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
outcome = []
for r in range(rounds):
    print("ready", flush=True)
    if sys.stdin.readline() != "go\\n":
        sys.exit("no go")
    try:
        fd = os.open(f"{base}-{r}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        outcome.append(errno.errorcode.get(exc.errno, str(exc.errno)))
    else:
        os.write(fd, str(me).encode())
        os.close(fd)
        outcome.append("WON")
print(" ".join(outcome), flush=True)
"""



def test_o_excl_race_between_8_processes_has_exactly_one_winner(posix_dir: Path) -> None:
    racers, rounds = 8, 20
    base = posix_dir / "race"
    procs = [spawn_py(_RACER, base, rounds, me, stdin=subprocess.PIPE) for me in range(racers)]
    try:
        for _ in range(rounds):
            for proc in procs:  # every racer is ready before any is released
                assert proc.stdout is not None
                assert proc.stdout.readline() == "ready\n"
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
    finally:
        outputs = wait_all(procs, timeout=120)
    table = [line.split() for line in outputs]
    for r in range(rounds):
        outcomes = [table[me][r] for me in range(racers)]
        assert sorted(outcomes) == ["EEXIST"] * (racers - 1) + ["WON"], outcomes
        assert read_file(Path(f"{base}-{r}")) == str(outcomes.index("WON")).encode()


def test_o_creat_without_o_excl_opens_existing_file_untouched(posix_dir: Path) -> None:
    path = make_file(posix_dir / "f", b"original", 0o600)
    ino = os.stat(path).st_ino
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o777)
    try:
        assert os.fstat(fd).st_ino == ino
        assert os.read(fd, 100) == b"original"
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_open_missing_file_without_o_creat_fails_with_enoent(posix_dir: Path) -> None:
    assert_errno(lambda: os.open(posix_dir / "missing", os.O_RDONLY), errno.ENOENT)
    assert_errno(lambda: os.open(posix_dir / "missing" / "x", os.O_RDONLY), errno.ENOENT)


def test_open_directory_for_writing_fails_with_eisdir(posix_dir: Path) -> None:
    make_dir(posix_dir / "d")
    assert_errno(lambda: os.open(posix_dir / "d", os.O_WRONLY), errno.EISDIR)
    assert_errno(lambda: os.open(posix_dir / "d", os.O_RDWR), errno.EISDIR)


def test_file_used_as_directory_fails_with_enotdir(posix_dir: Path) -> None:
    path = make_file(posix_dir / "f", b"x")
    assert_errno(lambda: os.open(path, os.O_RDONLY | os.O_DIRECTORY), errno.ENOTDIR)
    assert_errno(lambda: os.stat(path / "child"), errno.ENOTDIR)
    assert_errno(lambda: os.mkdir(path / "child"), errno.ENOTDIR)


def test_o_trunc_truncates_existing_file(posix_dir: Path) -> None:
    path = make_file(posix_dir / "f", rand_bytes(3 * MIB + 5, "trunc"))
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        write_all(fd, b"new")
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 3
    assert read_file(path) == b"new"


def test_o_append_appends_at_end_with_two_interleaved_fds(posix_dir: Path) -> None:
    path = make_file(posix_dir / "log")
    fd_a = os.open(path, os.O_WRONLY | os.O_APPEND)
    fd_b = os.open(path, os.O_WRONLY | os.O_APPEND)
    fd_plain = os.open(path, os.O_WRONLY)
    expected = b""
    try:
        for i in range(50):
            for fd, tag in ((fd_a, b"A"), (fd_b, b"B")):
                record = tag + str(i).encode() + b";"
                write_all(fd, record)
                expected += record
        # An explicit seek does not stop O_APPEND from writing at the end.
        os.lseek(fd_a, 0, os.SEEK_SET)
        write_all(fd_a, b"<seeked>")
        expected += b"<seeked>"
        # A non-append writer extends the file past a block boundary; appends follow it.
        write_all(fd_plain, b"!", offset=len(expected) + BLOCK)
        expected += bytes(BLOCK) + b"!"
        write_all(fd_b, b"tail")
        expected += b"tail"
        assert os.lseek(fd_b, 0, os.SEEK_CUR) == len(expected)
    finally:
        for fd in (fd_a, fd_b, fd_plain):
            os.close(fd)
    assert read_file(path) == expected
