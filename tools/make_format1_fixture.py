"""Make the frozen format-1 store and archive under tests/data/format1 (run once, as root).

Why it exists. docs/format.md promises that every later vnafs reads what vnafs 1 wrote; the
only convincing proof is a store that vnafs 1 itself wrote, kept byte for byte, and mounted by
every later version (tests/test_format1.py). This tool made that store. It is kept so that the
way the store was made can be read, and so that a *new* format version can get a frozen store
of its own (into another directory): never rerun it over tests/data/format1, whose point is that
it does not change.

What it does, with the real command line only (`vnafs keygen`, `mkfs` with a `file://`
archive, `mount -o allow_other`, `snapshot create`, `find --wait`, `status --json`, `umount`):

- a tree with directories (modes 0755 and 0700), a file of 1 MiB + 1 byte (two blocks, the
  first zstd-compressed), a small incompressible file (a raw block), a duplicate file (one
  block shared), an empty file, a sparse file (holes before its only block), a file truncated
  after writing (a block map valid length shorter than its block), a hard link, a symlink and a
  dangling one, a non-ASCII name, xattrs (text and binary), an owner other than root, and two
  DICOM files: pydicom's `CT_small.dcm` as shipped (16-bit CT, a byte-plane block) and a copy
  of it turned into a second study with an accession number (so `.dicom/by-accession` has an
  entry), plus a truncated DICOM file (an index problem);
- one snapshot, then changes it must not see: a file deleted, one appended to, an xattr
  changed, a file renamed, a new directory;
- waits until the DICOM index has caught up and the archive holds everything (`status --json`:
  nothing pending, a recovery point), records the manifest, unmounts (which ships what is
  left) and checks that the hot store's replication outbox (`repl_dirty`, `repl_blocks`) is
  empty, so the hot store and the archive describe the same file system;
- copies into OUT: `site.key`, `hot/` (without `vnafs.log`, `lock`, `control.sock`,
  `daemon.pid` and LMDB's `lock.mdb`, which are the state of a running daemon), `archive/`
  (without the backend's `.tmp/`), and `MANIFEST.json`: every path of the live tree and of the
  snapshot with its type, mode, owner, link count, size, mtime, SHA-256 or symlink target and
  xattrs, every path under `.dicom/` (live and in the snapshot), the archive URL the hot store's
  `vnafs.toml` names, and every directory of `hot/` and `archive/` (git keeps no empty
  directories, so the test recreates them from this list).

Usage, from the repository root:

    .venv/bin/python -m tools.make_format1_fixture [OUT]     (default tests/data/format1)

OUT must not exist. The work directory is /tmp/vnafs-t/format1-fixture (removed at the end);
the hot store's `vnafs.toml` keeps that absolute archive path, which the test rewrites in its
copy.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import vnafs as vnafs_pkg

REPO = Path(__file__).resolve().parent.parent
VNAFS = str(Path(sys.executable).with_name("vnafs"))
WORK = Path("/tmp/vnafs-t/format1-fixture")
SNAPSHOT = "format1"
# Runtime state of a mounted daemon, not part of the store.
HOT_SKIP = {"vnafs.log", "lock", "control.sock", "daemon.pid", "meta/lock.mdb"}
ARCHIVE_SKIP = {".tmp"}
GITATTRIBUTES = """\
# The frozen format-1 store (tests/test_format1.py): every byte exactly as vnafs wrote it,
# so no end-of-line conversion, ever.
* -text
"""


def vnafs(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([VNAFS, *args], capture_output=True, text=True, timeout=300)
    if res.returncode not in ok:
        raise SystemExit(f"vnafs {' '.join(args)} failed ({res.returncode}): "
                         f"{res.stdout}{res.stderr}")
    return res


def mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def stop(hot: Path, mnt: Path) -> None:
    """Unmount and stop the daemon this tool started (by its PID), whatever state it is in:
    a daemon still there 15 s after the unmount is killed."""
    if mounted(mnt):
        res = subprocess.run([VNAFS, "umount", "--timeout", "60", str(mnt)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    try:
        pid = int((hot / "daemon.pid").read_text())
    except (FileNotFoundError, ValueError):
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if b"vnafs" not in cmdline:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# -- content --------------------------------------------------------------------------------------

def stream(seed: str, n: int) -> bytes:
    """`n` pseudo-random bytes from `seed` (SHA-256 in counter mode)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def dicom_files() -> dict[str, bytes]:
    """CT_small.dcm as pydicom ships it, a second study made from it, a truncated file."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ct_path = get_testdata_file("CT_small.dcm")
    assert ct_path is not None, "pydicom's test file CT_small.dcm is missing"
    ct = Path(ct_path).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(ct))
    seed = ["vnafs format 1 fixture"]
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*seed, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*seed, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.AccessionNumber = "F1-ACC-0001"
    ds.StudyDate = "20260101"
    ds.PatientID = "F1-PATIENT"
    ds.IssuerOfPatientID = "FORMAT1"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return {"ct_small.dcm": ct, "second-study.dcm": buf.getvalue(), "truncated.dcm": ct[:1000]}


def populate(mnt: Path) -> None:
    (mnt / "incoming" / "a").mkdir(parents=True)
    (mnt / "private").mkdir(mode=0o700)
    os.chmod(mnt / "private", 0o700)
    (mnt / "empty-dir").mkdir()
    (mnt / "study" / "CT").mkdir(parents=True)
    a = mnt / "incoming" / "a"
    # 1 MiB + 1 byte: a 4 KiB pattern repeated (block 0 compresses to a few KiB), then "!".
    (a / "big.bin").write_bytes(stream("big", 4096) * 256 + b"!")
    (a / "random.bin").write_bytes(stream("random", 8192))  # incompressible: a raw block
    (a / "hello.txt").write_bytes(b"hello, format 1\n")
    (a / "hello-copy.txt").write_bytes(b"hello, format 1\n")  # same block as hello.txt
    os.chmod(a / "hello-copy.txt", 0o640)
    (mnt / "incoming" / "empty").write_bytes(b"")
    with open(mnt / "incoming" / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"tail after three holes")
    with open(mnt / "incoming" / "truncated", "wb") as f:
        f.write(stream("truncated", 10_000))
    os.truncate(mnt / "incoming" / "truncated", 5_000)
    os.link(a / "hello.txt", mnt / "incoming" / "hello-link")
    os.symlink("a/hello.txt", mnt / "incoming" / "latest")
    os.symlink("no/such/target", mnt / "incoming" / "dangling")
    (mnt / "incoming" / "Zürich – ü.txt").write_text("non-ASCII name\n", encoding="utf-8")
    os.setxattr(a / "hello.txt", "user.note", b"kept")
    os.setxattr(mnt / "incoming", "user.bin", bytes(range(16)))
    (mnt / "owned").write_bytes(b"owned by 1000:1000\n")
    os.chown(mnt / "owned", 1000, 1000)
    (mnt / "notes.txt").write_bytes(b"first version\n")
    os.setxattr(mnt / "notes.txt", "user.version", b"v1")
    (mnt / "deleted-after-snapshot.txt").write_bytes(b"only in the snapshot\n")
    (mnt / "renamed-after-snapshot.txt").write_bytes(b"renamed later\n")
    for name, data in dicom_files().items():
        (mnt / "study" / "CT" / name).write_bytes(data)


def change_after_snapshot(mnt: Path) -> None:
    os.unlink(mnt / "deleted-after-snapshot.txt")
    with open(mnt / "notes.txt", "ab") as f:
        f.write(b"second version\n")
    os.setxattr(mnt / "notes.txt", "user.version", b"v2")
    os.rename(mnt / "renamed-after-snapshot.txt", mnt / "study" / "renamed.txt")
    (mnt / "after").mkdir()
    (mnt / "after" / "new.txt").write_bytes(b"not in the snapshot\n")


# -- the manifest ---------------------------------------------------------------------------------

def describe(root: Path) -> dict[str, dict[str, Any]]:
    """Every path under `root` (hidden view directories are not listed by readdir, so they are
    not walked), with what a reader must see."""
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in ["", *sorted(dirnames + filenames)]:
            if name == "" and Path(dirpath) != root:
                continue
            path = Path(dirpath) / name if name else Path(dirpath)
            st = path.lstat()
            entry: dict[str, Any] = {
                "mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
                "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            }
            if stat.S_ISREG(st.st_mode):
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            else:
                entry["xattrs"] = {x: os.getxattr(path, x).hex()
                                   for x in sorted(os.listxattr(path))}
            out[str(path.relative_to(root))] = entry
    return out


def describe_views(root: Path) -> dict[str, str]:
    """Path -> "dir" or the SHA-256 of the file, for every path under a `.dicom` view."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root))] = "dir"
        for name in filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(out.items()))


def wait_replicated(mnt: Path, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    arch: dict[str, Any] = {}
    while time.monotonic() < deadline:
        arch = json.loads(vnafs("status", "--json", str(mnt)).stdout)["archive"]
        if (not arch["pending_records"] and not arch["pending_blocks"]
                and arch["recovery_point_ns"]):
            return arch
        time.sleep(0.3)
    raise SystemExit(f"replication did not catch up in {timeout} s: {arch}")


def outbox_empty(hot: Path) -> None:
    """The hot store has nothing left to replicate (the two unsealed outbox tables)."""
    import lmdb

    env = lmdb.open(str(hot / "meta"), readonly=True, lock=False, max_dbs=64)
    try:
        for table in (b"repl_dirty", b"repl_blocks"):
            db = env.open_db(table, create=False)
            with env.begin() as txn:
                n = txn.stat(db)["entries"]
            if n:
                raise SystemExit(f"{table.decode()} still holds {n} entries after unmount")
    finally:
        env.close()


def directories(root: Path) -> list[str]:
    return sorted(str(Path(d).relative_to(root)) for d, _, _ in os.walk(root)
                  if Path(d) != root)


def copy_tree(src: Path, dst: Path, skip: set[str]) -> None:
    def ignore(directory: str, names: list[str]) -> list[str]:
        rel = Path(directory).relative_to(src)
        return [n for n in names if str(rel / n) in skip]

    shutil.copytree(src, dst, ignore=ignore)


def git_commit() -> str:
    """HEAD, and whether vnafs/ had uncommitted changes (the code that actually ran)."""
    res = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                         text=True)
    if res.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "vnafs"],
                           capture_output=True, text=True).stdout.strip()
    return res.stdout.strip() + (" with uncommitted changes in vnafs/" if dirty else "")


def make(out: Path) -> None:
    if out.exists():
        raise SystemExit(f"{out} exists: the fixture is frozen; give a new directory")
    if WORK.exists():
        raise SystemExit(f"{WORK} exists (a previous run?): unmount and remove it first")
    WORK.parent.mkdir(mode=0o755, exist_ok=True)
    WORK.mkdir(mode=0o755)
    key, hot, archive, mnt = WORK / "site.key", WORK / "hot", WORK / "archive", WORK / "mnt"
    mnt.mkdir(mode=0o755)
    archive.mkdir(mode=0o700)
    url = f"file://{archive}"
    manifest: dict[str, Any] = {}
    try:
        vnafs("keygen", str(key))
        # Format 1 explicitly: mkfs writes format 2 (keyed BLAKE3 block ids) by default now.
        vnafs("mkfs", "--format", "1", "--key-file", str(key), "--archive", url, str(hot))
        vnafs("mount", "--key-file", str(key), "-o", "allow_other", str(hot), str(mnt))
        populate(mnt)
        vnafs("find", str(mnt), "--problems", "--wait", "--json", ok=(0, 3))
        vnafs("snapshot", "create", str(mnt), SNAPSHOT)
        change_after_snapshot(mnt)
        problems = json.loads(
            vnafs("find", str(mnt), "--problems", "--wait", "--json", ok=(0, 3)).stdout or "[]")
        snap = mnt / ".snapshots" / SNAPSHOT
        manifest = {
            "what": "frozen vnafs format 1 store and archive: see tests/test_format1.py",
            "format": 1,
            "made_by": f"vnafs {vnafs_pkg.__version__}, git {git_commit()}",
            "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "key_file": "site.key",
            "archive_url": url,
            "snapshot": SNAPSHOT,
            "live": describe(mnt),
            "snapshot_tree": describe(snap),
            "dicom": describe_views(mnt / ".dicom"),
            "snapshot_dicom": describe_views(snap / ".dicom"),
            "dicom_problems": problems,
        }
        arch = wait_replicated(mnt)
        manifest["recovery_point_ns"] = arch["recovery_point_ns"]
        vnafs("umount", "--timeout", "120", str(mnt))
        outbox_empty(hot)
    finally:
        stop(hot, mnt)
    manifest["store_dirs"] = {"hot": directories(hot), "archive": [
        d for d in directories(archive) if d.split("/")[0] not in ARCHIVE_SKIP]}
    out.mkdir(parents=True)
    shutil.copy2(key, out / "site.key")
    copy_tree(hot, out / "hot", HOT_SKIP)
    copy_tree(archive, out / "archive", ARCHIVE_SKIP)
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    (out / ".gitattributes").write_text(GITATTRIBUTES)
    shutil.rmtree(WORK)
    print(f"wrote {out}: {len(manifest['live'])} live paths, "
          f"{len(manifest['snapshot_tree'])} in snapshot {SNAPSHOT}, "
          f"{len(manifest['dicom'])} under .dicom")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("out", nargs="?", default=str(REPO / "tests" / "data" / "format1"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root: mounting needs /dev/fuse and allow_other")
    make(Path(args.out).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
