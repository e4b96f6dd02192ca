"""vnafs re-exported over NFS by a real nfs-ganesha: data, big listings, renames, handles, snapshots.

Why this file exists: sites read PACS exports over NFS as well as SMB, and an NFS server is a
harsher user of a FUSE file system than a local process. It reaches files by handle, not
by path, so a re-export is only usable if those handles stay valid across a server restart and a
vnafs remount; it caches attributes and listings, while the PACS keeps writing to the mount
directly; and it holds the mount busy while it exports it. These tests run a real Ganesha
(tools/servers.Ganesha: FSAL_VFS over a real vnafs mount, NFSv3 and v4 in a network namespace
of its own with its own rpcbind) and a real client, libnfs: its commands (nfs-cp, nfs-ls,
nfs-cat) and, for what they cannot do (mkdir, rename, unlink, keeping a file handle across a
restart), the library itself through ctypes.

Writes go through NFSv3: libnfs 4.0 fails every NFSv4 write of 4 KiB or more in its own
encoder, so an NFSv4 put would test the client's bug. Reads and listings are checked over both.
Measured figures are printed (run with -s to see them). docs/admin.md ("NFS re-export") is the
administrator's side of what is checked here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Fs, run_vnafs
from tests.requires import fail_if_missing, need_file
from tools.servers import Ganesha

MiB = 1 << 20


# -- libnfs through ctypes --------------------------------------------------------------------

class NfsFh(ctypes.Structure):
    """libnfs's `struct nfs_fh`: the raw NFS file handle of an open file."""

    _fields_ = [("len", ctypes.c_int), ("val", ctypes.POINTER(ctypes.c_ubyte))]


@cache
def libnfs() -> ctypes.CDLL:
    """libnfs 4.0's synchronous API (nfsc/libnfs.h), typed."""
    lib = ctypes.CDLL(str(need_file("/usr/lib/*/libnfs.so.13", "libnfs13")), use_errno=True)
    vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "nfs_init_context": (vp, []),
        "nfs_destroy_context": (None, [vp]),
        "nfs_get_error": (cp, [vp]),
        "nfs_set_autoreconnect": (None, [vp, ci]),
        "nfs_set_timeout": (None, [vp, ci]),
        "nfs_mount": (ci, [vp, cp, cp]),
        "nfs_open": (ci, [vp, cp, ci, ctypes.POINTER(vp)]),
        "nfs_close": (ci, [vp, vp]),
        "nfs_pread": (ci, [vp, vp, ctypes.c_uint64, ctypes.c_uint64, vp]),
        "nfs_mkdir": (ci, [vp, cp]),
        "nfs_rmdir": (ci, [vp, cp]),
        "nfs_unlink": (ci, [vp, cp]),
        "nfs_rename": (ci, [vp, cp, cp]),
        "nfs_get_fh": (ctypes.POINTER(NfsFh), [vp]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


class Nfs3:
    """One NFSv3 client session (a libnfs context mounted on the export), run in the server's
    network namespace. It reconnects by itself when the server comes back after a restart and
    then resends requests with the handles it holds: exactly what a kernel client does."""

    def __init__(self, srv: Ganesha) -> None:
        self.srv = srv
        self.lib = libnfs()
        self.ctx = self.lib.nfs_init_context()
        assert self.ctx, "nfs_init_context failed"
        self.files: list[ctypes.c_void_p] = []
        self.lib.nfs_set_autoreconnect(self.ctx, 10)
        self.lib.nfs_set_timeout(self.ctx, 30_000)
        try:
            self._call("mount", self.lib.nfs_mount, b"127.0.0.1", srv.pseudo.encode())
        except BaseException:
            self.lib.nfs_destroy_context(self.ctx)
            raise

    def _call(self, what: str, fn: Any, *args: Any) -> int:
        with self.srv.netns():  # a reconnect opens its socket in the calling thread's namespace
            rc = int(fn(self.ctx, *args))
        if rc < 0:
            msg = (self.lib.nfs_get_error(self.ctx) or b"").decode(errors="replace")
            raise OSError(-rc, f"NFS {what}: {msg}")
        return rc

    def mkdir(self, path: str) -> None:
        self._call(f"mkdir {path}", self.lib.nfs_mkdir, b"/" + path.encode())

    def rmdir(self, path: str) -> None:
        self._call(f"rmdir {path}", self.lib.nfs_rmdir, b"/" + path.encode())

    def unlink(self, path: str) -> None:
        self._call(f"unlink {path}", self.lib.nfs_unlink, b"/" + path.encode())

    def rename(self, old: str, new: str) -> None:
        self._call(f"rename {old} {new}", self.lib.nfs_rename, b"/" + old.encode(),
                   b"/" + new.encode())

    def open(self, path: str) -> ctypes.c_void_p:
        """An open file (LOOKUP from the export's root): libnfs keeps its NFS handle."""
        fh = ctypes.c_void_p()
        self._call(f"open {path}", self.lib.nfs_open, b"/" + path.encode(), os.O_RDONLY,
                   ctypes.byref(fh))
        self.files.append(fh)
        return fh

    def pread(self, fh: ctypes.c_void_p, size: int, offset: int = 0) -> bytes:
        """One READ by handle (the tests read small files: one request each)."""
        buf = ctypes.create_string_buffer(size)
        n = self._call("read", self.lib.nfs_pread, fh, offset, size, buf)
        return buf.raw[:n]

    def handle(self, fh: ctypes.c_void_p) -> bytes:
        raw = self.lib.nfs_get_fh(fh).contents
        return bytes(raw.val[:raw.len])

    def set_handle(self, fh: ctypes.c_void_p, value: bytes) -> None:
        """Overwrite the handle libnfs holds for an open file (same length)."""
        raw = self.lib.nfs_get_fh(fh).contents
        assert raw.len == len(value)
        for i, b in enumerate(value):
            raw.val[i] = b

    def close(self) -> None:
        for fh in self.files:
            # Closing an NFSv3 file sends nothing that could fail (no state on the server).
            self.lib.nfs_close(self.ctx, fh)
        self.files.clear()
        self.lib.nfs_destroy_context(self.ctx)


@pytest.fixture
def nfs_fs(new_fs: Fs) -> Fs:
    """A vnafs mounted as docs/admin.md says for an NFS re-export: allow_other (the Fs
    default) and `[snapshots] visible = true`."""
    cfg = new_fs.hot / "vnafs.toml"
    cfg.write_text(cfg.read_text().replace("visible = false", "visible = true"))
    return new_fs.mount()


@pytest.fixture
def ganesha(nfs_fs: Fs, workdir: Path) -> Iterator[Ganesha]:
    """Ganesha exporting nfs_fs.mnt; stopped with its rpcbind, by PID, at teardown (before
    the mount is cleaned up). Fails with one line naming the package if one is missing."""
    with fail_if_missing(), Ganesha(workdir / "ganesha", nfs_fs.mnt) as srv:
        yield srv


@pytest.fixture
def nfs3(ganesha: Ganesha) -> Iterator[Nfs3]:
    client = Nfs3(ganesha)
    try:
        yield client
    finally:
        client.close()


def nfs_ls(srv: Ganesha, path: str = "", version: int = 3) -> dict[str, str]:
    """name -> `ls -l` style line of one directory listed through NFS."""
    out = srv.client(srv.nfs_ls, srv.url(path, version)).stdout.decode()
    return {line.split(None, 5)[5]: line for line in out.splitlines() if line.strip()}


def nfs_cat(srv: Ganesha, path: str, version: int = 3) -> bytes:
    return srv.client("nfs-cat", srv.url(path, version)).stdout


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:.0f} MiB/s"


# -- data ---------------------------------------------------------------------------------------

def test_put_and_get_through_nfs_are_byte_exact(nfs_fs: Fs, ganesha: Ganesha, nfs3: Nfs3,
                                                workdir: Path) -> None:
    data = os.urandom(24 * MiB) + b"not block aligned"
    src, back = workdir / "src.bin", workdir / "back.bin"
    src.write_bytes(data)
    nfs3.mkdir("study")
    t = time.monotonic()
    ganesha.client("nfs-cp", str(src), ganesha.url("study/image.dcm"))
    put_s = time.monotonic() - t
    assert (nfs_fs.mnt / "study" / "image.dcm").read_bytes() == data
    t = time.monotonic()
    ganesha.client("nfs-cp", ganesha.url("study/image.dcm"), str(back))
    get_s = time.monotonic() - t
    assert back.read_bytes() == data
    t = time.monotonic()
    assert nfs_cat(ganesha, "study/image.dcm", version=4) == data
    get4_s = time.monotonic() - t
    print(f"\nNFS put {len(data) / MiB:.0f} MiB (v3, nfs-cp): {rate(len(data), put_s)}; "
          f"get (v3, nfs-cp): {rate(len(data), get_s)}; get (v4, nfs-cat): "
          f"{rate(len(data), get4_s)}")

    # Written on the mount, read through NFS; then rewritten longer and shorter, as a PACS
    # rewrites a file: NFS sees each version whole, not cut to a size it cached.
    for size in (3 * MiB, 5 * MiB + 1, 4096):
        other = os.urandom(size)
        (nfs_fs.mnt / "study" / "local.dcm").write_bytes(other)
        assert nfs_cat(ganesha, "study/local.dcm") == other
        assert nfs_cat(ganesha, "study/local.dcm", version=4) == other


def test_listing_5000_files_through_nfs(nfs_fs: Fs, ganesha: Ganesha) -> None:
    d = nfs_fs.mnt / "series"
    d.mkdir()
    # Ganesha lists (and caches) the directory while it is empty; the PACS then fills it on
    # the mount. Every name must show up through NFS.
    assert nfs_ls(ganesha, "series") == {}
    names = {f"IM{i:05d}.dcm" for i in range(5000)}
    for name in names:
        os.mknod(d / name)  # the cheapest create: this test is about listing
    assert len(os.listdir(d)) == 5000
    for version in (3, 4):
        t = time.monotonic()
        listed = nfs_ls(ganesha, "series", version)
        took = time.monotonic() - t
        print(f"\nNFSv{version} listing of 5000 files (nfs-ls, with attributes): {took:.2f} s")
        assert set(listed) == names
        assert took < 60, f"listing 5000 files through NFSv{version} took {took:.1f} s"
    # Removing on the mount shows through NFS at once too.
    for name in sorted(names)[:100]:
        os.unlink(d / name)
    assert set(nfs_ls(ganesha, "series")) == set(sorted(names)[100:])


# -- namespace changes --------------------------------------------------------------------------

def test_rename_and_delete_through_nfs_seen_on_the_mount(nfs_fs: Fs, ganesha: Ganesha,
                                                         nfs3: Nfs3, workdir: Path) -> None:
    m = nfs_fs.mnt
    a, b = os.urandom(300_000), os.urandom(70_000)
    (workdir / "a").write_bytes(a)
    (workdir / "b").write_bytes(b)
    nfs3.mkdir("inbox")
    nfs3.mkdir("study")
    nfs3.mkdir("study/series")
    ganesha.client("nfs-cp", str(workdir / "a"), ganesha.url("inbox/a.tmp"))
    ganesha.client("nfs-cp", str(workdir / "b"), ganesha.url("inbox/b.dcm"))

    nfs3.rename("inbox/a.tmp", "inbox/a.dcm")  # in place, as a writer finishing a file does
    assert sorted(os.listdir(m / "inbox")) == ["a.dcm", "b.dcm"]
    nfs3.rename("inbox/a.dcm", "study/series/1.dcm")  # across directories
    nfs3.rename("inbox/b.dcm", "study/series/2.dcm")
    assert os.listdir(m / "inbox") == []
    assert sorted(os.listdir(m / "study" / "series")) == ["1.dcm", "2.dcm"]
    assert (m / "study" / "series" / "1.dcm").read_bytes() == a
    nfs3.rename("study/series/2.dcm", "study/series/1.dcm")  # replaces the target
    assert os.listdir(m / "study" / "series") == ["1.dcm"]
    assert (m / "study" / "series" / "1.dcm").read_bytes() == b
    nfs3.rename("study", "inbox/study")  # a directory with its contents
    assert sorted(os.listdir(m)) == [".snapshots", "inbox"]
    assert (m / "inbox" / "study" / "series" / "1.dcm").read_bytes() == b
    assert set(nfs_ls(ganesha, "inbox/study/series")) == {"1.dcm"}

    with pytest.raises(OSError) as exc:
        nfs3.rmdir("inbox")
    assert exc.value.errno == errno.ENOTEMPTY
    nfs3.unlink("inbox/study/series/1.dcm")
    assert os.listdir(m / "inbox" / "study" / "series") == []
    nfs3.rmdir("inbox/study/series")
    nfs3.rmdir("inbox/study")
    nfs3.rmdir("inbox")
    assert os.listdir(m) == [".snapshots"]
    with pytest.raises(OSError) as exc:
        nfs3.unlink("inbox")
    assert exc.value.errno == errno.ENOENT
    assert set(nfs_ls(ganesha)) == {".snapshots"}


# -- file handles -------------------------------------------------------------------------------

def populate(mnt: Path, dirs: int = 4, files: int = 5) -> dict[str, bytes]:
    """A small tree of distinct files; path (relative to the export) -> content."""
    made: dict[str, bytes] = {}
    for i in range(dirs):
        series = mnt / "study" / f"series{i}"
        series.mkdir(parents=True)
        for j in range(files):
            data = os.urandom(1000 + 997 * j) + f"{i}/{j}".encode()
            (series / f"IM{j}.dcm").write_bytes(data)
            made[f"study/series{i}/IM{j}.dcm"] = data
    return made


def failed_reads(client: Nfs3, handles: dict[str, ctypes.c_void_p],
                 expect: dict[str, bytes]) -> dict[str, str]:
    """path -> error of every file whose open handle no longer reads its content."""
    failed: dict[str, str] = {}
    for path, fh in handles.items():
        try:
            got = client.pread(fh, len(expect[path]) + 10)
        except OSError as exc:
            failed[path] = str(exc)
            continue
        if got != expect[path]:
            failed[path] = f"read {len(got)} bytes, not the {len(expect[path])} written"
    return failed


def test_nfs_handles_survive_a_ganesha_restart(nfs_fs: Fs, ganesha: Ganesha,
                                               nfs3: Nfs3) -> None:
    made = populate(nfs_fs.mnt)
    name = run_vnafs("snapshot", "create", str(nfs_fs.mnt), "handles").stdout.split()[-1]
    assert name == "handles"
    made |= {f".snapshots/handles/{p}": d for p, d in list(made.items())[:5]}
    handles = {p: nfs3.open(p) for p in made}
    assert failed_reads(nfs3, handles, made) == {}

    # While Ganesha exports it, the mount is busy: vnafs refuses to unmount it.
    res = run_vnafs("umount", str(nfs_fs.mnt), check=False)
    assert res.returncode != 0 and "busy" in res.stdout + res.stderr, res
    assert nfs_cat(ganesha, "study/series0/IM0.dcm") == made["study/series0/IM0.dcm"]

    for _ in range(2):
        ganesha.stop()
        ganesha.start()
        # The same session, the same handles: libnfs reconnects and resends them.
        assert failed_reads(nfs3, handles, made) == {}
        # Lookups start from the export's root handle the session got at mount time.
        again = {p: nfs3.open(p) for p in made}
        assert {p: nfs3.handle(fh) for p, fh in again.items()} == {
            p: nfs3.handle(fh) for p, fh in handles.items()}


def test_nfs_handles_across_a_vnafs_remount(nfs_fs: Fs, ganesha: Ganesha, nfs3: Nfs3) -> None:
    """What a vnafs remount does to NFS handles, with Ganesha's FSAL_VFS.

    A Ganesha (4.3) NFS handle is: version, flags, export id (2 bytes), length, then the
    FSAL_VFS handle: flags, an 8-byte fsid, handle type, and the kernel's handle of the file,
    which for a FUSE file system is vnafs's (inode number, generation). Ganesha takes the
    fsid from statfs' f_fsid, and FUSE reports 0 there, so Ganesha uses the mount's device
    number instead (two little-endian u32: major, minor), and a remount may get another one
    (the kernel hands out the lowest free anonymous device number). Ganesha's Filesystem_id
    only sets the fsid attribute clients see, not the one in handles (upstream:
    nfs-ganesha issues 538 and 1359).

    So: vnafs's part of every handle must be the same after the remount (byte for byte, the
    device number aside); with the old device number patched to the new one, as a server
    with a fixed fsid (knfsd's fsid=) would see them, every old handle must read its file
    (0 stale); unpatched, they are stale exactly when the device number changed.
    """
    made = populate(nfs_fs.mnt)
    run_vnafs("snapshot", "create", str(nfs_fs.mnt), "before")
    made |= {f".snapshots/before/{p}": d for p, d in list(made.items())[:5]}
    handles = {p: nfs3.open(p) for p in made}
    old = {p: nfs3.handle(fh) for p, fh in handles.items()}
    dev_old = os.stat(nfs_fs.mnt).st_dev

    def fsid(dev: int) -> bytes:
        return struct.pack("<II", os.major(dev), os.minor(dev))

    fsid_at = slice(6, 14)
    assert {h[fsid_at] for h in old.values()} == {fsid(dev_old)}, old

    ganesha.stop()
    nfs_fs.umount()
    nfs_fs.mount()
    ganesha.start()
    dev_new = os.stat(nfs_fs.mnt).st_dev
    fresh = Nfs3(ganesha)
    try:
        new = {p: fresh.handle(fresh.open(p)) for p in made}
        assert failed_reads(fresh, dict(zip(made, fresh.files, strict=True)), made) == {}
    finally:
        fresh.close()
    patched = {p: h[:fsid_at.start] + fsid(dev_new) + h[fsid_at.stop:] for p, h in old.items()}
    assert new == patched  # vnafs's (inode, generation) part did not change

    stale = failed_reads(nfs3, handles, made)
    print(f"\nvnafs remount: device {os.major(dev_old)}:{os.minor(dev_old)} -> "
          f"{os.major(dev_new)}:{os.minor(dev_new)}; {len(stale)} of {len(made)} Ganesha "
          f"handles stale")
    assert set(stale) == (set() if dev_new == dev_old else set(made))
    for p, fh in handles.items():
        nfs3.set_handle(fh, patched[p])
    assert failed_reads(nfs3, handles, made) == {}


# -- snapshots ----------------------------------------------------------------------------------

def test_snapshots_through_nfs(nfs_fs: Fs, ganesha: Ganesha, nfs3: Nfs3, workdir: Path) -> None:
    first = os.urandom(2 * MiB + 3)
    (nfs_fs.mnt / "study").mkdir()
    (nfs_fs.mnt / "study" / "report.dcm").write_bytes(first)
    (nfs_fs.mnt / "study" / "deleted.dcm").write_bytes(b"deleted after the snapshot\n")
    name = "@GMT-2026.01.02-03.04.05"
    out = run_vnafs("snapshot", "create", str(nfs_fs.mnt), name).stdout
    assert out.split()[-1] == name
    second = os.urandom(MiB)
    (workdir / "second").write_bytes(second)
    nfs3.unlink("study/report.dcm")  # nfs-cp creates exclusively: replace = unlink + put
    ganesha.client("nfs-cp", str(workdir / "second"), ganesha.url("study/report.dcm"))
    nfs3.unlink("study/deleted.dcm")

    for v in (3, 4):
        assert ".snapshots" in nfs_ls(ganesha, "", v)  # visible = true
        assert set(nfs_ls(ganesha, ".snapshots", v)) == {name}
        assert set(nfs_ls(ganesha, f".snapshots/{name}/study", v)) == {"report.dcm",
                                                                        "deleted.dcm"}
        assert nfs_cat(ganesha, f".snapshots/{name}/study/report.dcm", v) == first
        assert nfs_cat(ganesha, f".snapshots/{name}/study/deleted.dcm", v) == (
            b"deleted after the snapshot\n")
        assert nfs_cat(ganesha, "study/report.dcm", v) == second
    got = workdir / "restored"
    ganesha.client("nfs-cp", ganesha.url(f".snapshots/{name}/study/report.dcm"), str(got))
    assert got.read_bytes() == first

    # Read-only through NFS too: every change is refused, and moving a file out of a snapshot
    # is EXDEV (a client falls back to copying).
    snap = f".snapshots/{name}/study"
    for change, err in ((lambda: nfs3.mkdir(f"{snap}/new"), errno.EROFS),
                        (lambda: nfs3.unlink(f"{snap}/report.dcm"), errno.EROFS),
                        (lambda: nfs3.rename(f"{snap}/report.dcm", f"{snap}/x.dcm"), errno.EROFS),
                        (lambda: nfs3.rename(f"{snap}/report.dcm", "study/old.dcm"),
                         errno.EXDEV)):
        with pytest.raises(OSError) as exc:
            change()
        assert exc.value.errno == err, exc.value
    res = ganesha.client("nfs-cp", str(workdir / "second"), ganesha.url(f"{snap}/new.dcm"),
                         check=False)
    assert res.returncode != 0
    assert sorted(os.listdir(nfs_fs.mnt / snap)) == ["deleted.dcm", "report.dcm"]
    assert (nfs_fs.mnt / snap / "report.dcm").read_bytes() == first
