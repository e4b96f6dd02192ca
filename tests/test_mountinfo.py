"""vnafs.mountinfo: the parser of /proc/self/mountinfo, on sample lines and on the real table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vnafs import control, mountinfo
from vnafs.mountinfo import Mount, parse, parse_line, unescape

# Lines in the kernel's format (proc(5)), with the cases a plain split() gets wrong.
SAMPLE = (
    # no optional field
    b"22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    # one optional field
    b"27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    # two optional fields, a space and a tab in the mount point, a space in the source
    b"45 27 0:40 / /srv/my\\040dir/a\\011b rw,nosuid shared:7 master:2 - fuse.vnafs"
    b" /srv/hot\\040store rw,user_id=0,group_id=0,allow_other\n"
    # a backslash followed by digits in the name: \\134 then a literal "040"
    b"46 27 0:41 / /srv/back\\134040slash rw - tmpfs tmpfs rw\n"
    # a UTF-8 name and a newline in it
    b"47 27 0:42 / /srv/d\xc3\xbcr\\012x rw - tmpfs none rw\n"
    # not in the format: no separator
    b"48 27 0:43 / /srv/broken rw shared:9\n"
    # a second mount on /proc, on top of the first
    b"49 22 0:44 / /proc rw - tmpfs over rw\n"
)


def test_parse_sample_lines() -> None:
    found = parse(SAMPLE)
    assert found == [
        Mount("/proc", "proc", "proc"),
        Mount("/", "ext4", "/dev/vda"),
        Mount("/srv/my dir/a\tb", "fuse.vnafs", "/srv/hot store"),
        Mount("/srv/back\\040slash", "tmpfs", "tmpfs"),
        Mount("/srv/d\u00fcr\nx", "tmpfs", "none"),
        Mount("/proc", "tmpfs", "over"),
    ]


@pytest.mark.parametrize("line", [
    b"",
    b"1 2 3:4 / /x rw",  # no separator
    b"1 2 3:4 / /x rw -",  # nothing after it
    b"1 2 - ext4 /dev/vda rw",  # too few fields before it
])
def test_parse_line_rejects_other_formats(line: bytes) -> None:
    assert parse_line(line) is None


def test_parse_line_without_source() -> None:
    assert parse_line(b"1 2 3:4 / /x rw - tmpfs") == Mount("/x", "tmpfs", "")


def test_unescape_keeps_undecodable_bytes_as_file_names_do() -> None:
    assert unescape(b"/a\\040b") == "/a b"
    assert unescape(b"/bad\xff") == os.fsdecode(b"/bad\xff")
    assert unescape(b"/\\400") == "/\\400"  # not a byte: left alone


def test_find_mount_takes_the_top_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mountinfo, "mounts", lambda: parse(SAMPLE))
    assert mountinfo.find_mount("/proc") == Mount("/proc", "tmpfs", "over")
    assert mountinfo.find_mount("/srv/my dir/a\tb") == Mount(
        "/srv/my dir/a\tb", "fuse.vnafs", "/srv/hot store")
    assert mountinfo.find_mount("/srv/broken") is None


def test_mounts_reads_a_given_table(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_bytes(SAMPLE)
    assert mountinfo.mounts(str(table)) == parse(SAMPLE)


def test_real_mountinfo_has_root() -> None:
    found = mountinfo.mounts()
    assert any(m.mount_point == "/" for m in found)
    root = mountinfo.find_mount("/")
    assert root is not None and root.fs_type
    assert mountinfo.find_mount(Path("/")) == root


def test_real_mountinfo_follows_symlinks(tmp_path: Path) -> None:
    link = tmp_path / "root-link"
    link.symlink_to("/")
    assert mountinfo.find_mount(link) == mountinfo.find_mount("/")


def test_not_a_mount_point(tmp_path: Path) -> None:
    assert mountinfo.find_mount(tmp_path / "nowhere") is None


def test_control_find_mount_keeps_its_shape() -> None:
    root = mountinfo.find_mount("/")
    assert root is not None
    assert control.find_mount(Path("/")) == (root.fs_type, root.source)
