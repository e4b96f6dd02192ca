"""`vnafs demo`: a working file system in one command, for a first look.

It builds everything under one directory (default /var/tmp/vnafs-demo): a key, a hot store whose
configuration names a local-directory archive, and a mount; then it files the DICOM instances
that ship inside pydicom the way `storescp -su STUDY` does (one folder per study), verifies them
by reading them back, and shows the tree and `vnafs status`. It leaves the file system mounted
so you can look around, and says how to unmount it. Running it again starts afresh.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from vnafs.errors import VnafsError


def _vnafs(*args: str) -> str:
    exe = str(Path(sys.executable).with_name("vnafs"))
    res = subprocess.run([exe, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise VnafsError(res.stderr.strip().removeprefix("vnafs: ") or f"vnafs {args[0]} failed")
    return res.stdout


def _sample_instances() -> list[tuple[str, Path]]:
    """(study folder, file) for every parseable DICOM file bundled with pydicom."""
    import pydicom
    from pydicom.data import get_testdata_files
    from pydicom.errors import InvalidDicomError

    out = []
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the corpus is deliberately odd in places
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, AttributeError, TypeError):
            continue
        study = str(getattr(ds, "StudyInstanceUID", "") or "no-study-uid")
        out.append((study, path))
    return out


def _tree(root: Path, max_lines: int = 25) -> list[str]:
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        depth = Path(dirpath).relative_to(root).parts
        indent = "  " * len(depth)
        lines.append(f"{indent}{Path(dirpath).name}/  ({len(filenames)} files)")
        if len(lines) >= max_lines:
            lines.append("  ...")
            break
    return lines


def _state(path: Path) -> str:
    return os.getxattr(path, "user.vnafs.state").decode()


def run(base: Path) -> int:
    base = base.resolve()
    key, hot, mnt, archive = base / "site.key", base / "hot", base / "mnt", base / "archive"
    if os.path.ismount(mnt):
        _vnafs("umount", str(mnt))
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    archive.mkdir()
    mnt.mkdir()

    print(f"== creating a key, a hot store and a mount under {base}")
    _vnafs("keygen", str(key))
    _vnafs("mkfs", "--key-file", str(key), "--archive", f"file://{archive}", str(hot))
    _vnafs("mount", "--key-file", str(key), "-o", "allow_other", str(hot), str(mnt))

    print("== filing pydicom's sample instances into incoming/<StudyInstanceUID>/")
    instances = _sample_instances()
    digests = {}
    for study, src in instances:
        dst = mnt / "incoming" / study / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        dst.write_bytes(data)
        digests[dst] = hashlib.sha256(data).hexdigest()
    bad = [p for p, d in digests.items() if hashlib.sha256(p.read_bytes()).hexdigest() != d]
    if bad:
        raise VnafsError(f"{len(bad)} files did not read back identically: see {hot}/vnafs.log")
    studies = len({s for s, _ in instances})
    print(f"   {len(instances)} instances in {studies} studies written and read back identically")

    print("== study tree as the PACS wrote it")
    print("\n".join(_tree(mnt / "incoming")))
    from vnafs import control

    control.control_request(hot, {"op": "index_wait", "timeout": 60}, timeout=90)
    print("== the same files in the DICOM view .dicom/by-study/<Study>/<Series>/<SOP>.dcm")
    print("\n".join(_tree(mnt / ".dicom" / "by-study")))
    first = sorted(os.listdir(mnt / ".dicom" / "by-study"))[0]
    print(f"== vnafs find {mnt} --study {first}")
    print(_vnafs("find", str(mnt), "--study", first).rstrip())
    print(f"== vnafs snapshot create {mnt}, then ls .snapshots/")
    _vnafs("snapshot", "create", str(mnt))
    for name in sorted(os.listdir(mnt / ".snapshots")):
        print(f"   .snapshots/{name}/  ({len(os.listdir(mnt / '.snapshots' / name))} entries)")
    # Replication runs every 2 s; show the status once the archive has caught up (bounded).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        arch = control.control_request(hot, {"op": "status"})["archive"]
        if not arch["pending_blocks"] and not arch["pending_records"]:
            break
        time.sleep(0.5)
    print(f"== tiering: vnafs evict {mnt} --study {first}, then read it back")
    members = [p for p in (mnt / ".dicom" / "by-study" / first).rglob("*.dcm")]
    print(f"   user.vnafs.state before: {_state(members[0])}")
    print("   " + _vnafs("evict", str(mnt), "--study", first).strip())
    print(f"   user.vnafs.state after:  {_state(members[0])}  (only the archive holds it now)")
    blocks = sum(1 for f in (hot / "blocks").rglob("*") if f.is_file())
    _vnafs("umount", str(mnt))  # a fresh mount: nothing of it is cached in memory any more
    _vnafs("mount", "--key-file", str(key), "-o", "allow_other", str(hot), str(mnt))
    same = all(hashlib.sha256(p.read_bytes()).hexdigest() == d for p, d in digests.items())
    if not same:
        raise VnafsError(f"an evicted study did not read back identically: see {hot}/vnafs.log")
    after = sum(1 for f in (hot / "blocks").rglob("*") if f.is_file())
    print(f"   every file reads back identically; the read recalled {after - blocks} blocks from "
          f"the archive; state now: {_state(members[0])}")
    print("== status")
    print(_vnafs("status", str(mnt)).rstrip())
    objects = sum(1 for f in archive.rglob("*") if f.is_file())
    print(f"== the archive {archive} holds {objects} sealed objects; rebuild from it with: "
          f"vnafs restore --key-file {key} file://{archive} NEW_HOT")
    plain = sum(p.stat().st_size for p in digests)
    stored = sum(f.stat().st_size for f in (hot / "blocks").rglob("*") if f.is_file())
    print(f"== {plain / 1e6:.1f} MB of DICOM stored as {stored / 1e6:.1f} MB of sealed blocks "
          "(encrypted, compressed, deduplicated)")
    exe = Path(sys.executable).with_name("vnafs")
    print(f"The file system stays mounted at {mnt}; unmount it with: {exe} umount {mnt}")
    return 0
