"""Talking to a running daemon: find the hot store of a mount point and send it a request.

Why a module of its own: `vnafs status`, `find` and `umount` run often (scripts, monitoring),
and importing the daemon pulls in trio, LMDB and the crypto stack (about 130 ms) for what is one
JSON line over a Unix socket.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vnafs import mountinfo
from vnafs.errors import VnafsError


def find_mount(mountpoint: Path) -> tuple[str, str] | None:
    """(fs type, source) of the mount at `mountpoint`, from /proc/self/mountinfo."""
    found = mountinfo.find_mount(mountpoint)
    return None if found is None else (found.fs_type, found.source)


def hot_store_of(mountpoint: Path) -> Path:
    found = find_mount(mountpoint)
    if found is None or found[0] != "fuse.vnafs":
        raise VnafsError(f"{mountpoint} is not a mounted vnafs file system: give the mount "
                         "point, or mount it with 'vnafs mount'")
    return Path(found[1])


def views_dir(hot: Path) -> str | None:
    """The name of the DICOM views directory of a hot store, None if indexing is off."""
    from vnafs import config

    cfg = config.load(hot)
    return cfg.dicom.views if cfg.dicom.index else None


def control_request(hot: Path, request: dict[str, Any], timeout: float = 30.0) -> Any:
    import socket

    path = hot / "control.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise VnafsError(f"the vnafs daemon for {hot} is not answering: check its log "
                         f"{hot}/vnafs.log") from None
    except TimeoutError:
        raise VnafsError(f"the vnafs daemon for {hot} did not answer within {timeout:.0f} s: "
                         f"check its log {hot}/vnafs.log") from None
    reply = json.loads(data)
    if not reply.get("ok"):
        raise VnafsError(reply.get("error", "request failed"))
    return reply["result"]
