"""Every command that reports has `--json`: one object with `"schema": 1` on stdout, nothing
else there, and no progress bar when stderr is not a terminal.

Why this exists: monitoring and orchestration scripts parse these outputs for years; the schema
number is the promise docs/admin.md ("JSON output") makes about them, so each command's object
and its main fields are pinned here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import Fs, run_vnafs


def as_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    res = run_vnafs(*args, "--json", env=env)
    obj = json.loads(res.stdout)
    assert isinstance(obj, dict) and obj["schema"] == 1, obj
    # Not a terminal: no progress bar, no chatter.
    assert res.stderr == "", res.stderr
    return obj


def test_every_reporting_command_answers_one_json_object(workdir: Path) -> None:
    archive = workdir / "archive"
    fs = Fs(workdir, archive=f"file://{archive}")
    fs.mnt.mkdir()
    archive.mkdir()
    run_vnafs("keygen", str(fs.key))
    made = json.loads(run_vnafs("mkfs", "--json", "--key-file", str(fs.key), "--archive",
                                f"file://{archive}", str(fs.hot)).stdout)
    assert made == {"schema": 1, "hot": str(fs.hot), "archive": f"file://{archive}"}
    try:
        mounted = json.loads(run_vnafs("mount", "--json", "--key-file", str(fs.key), "-o",
                                       "allow_other", str(fs.hot), str(fs.mnt)).stdout)
        assert mounted["mountpoint"] == str(fs.mnt) and mounted["read_only"] is False
        (fs.mnt / "a.bin").write_bytes(b"a" * 100_000)
        st = as_json("status", str(fs.mnt))
        assert st["health"] == "ok" and "tiering" in st
        snap = as_json("snapshot", "create", str(fs.mnt), "@GMT-2026.01.01-00.00.00")
        assert snap["snapshot"]["name"] == "@GMT-2026.01.01-00.00.00"
        (fs.mnt / "b.bin").write_bytes(b"b")
        diff = as_json("snapshot", "diff", str(fs.mnt), "@GMT-2026.01.01-00.00.00", "live")
        assert [c["path"] for c in diff["changes"]] == ["/b.bin"], diff
        locked = as_json("snapshot", "lock", "--until", "1d", str(fs.mnt),
                         "@GMT-2026.01.01-00.00.00")
        assert locked["snapshot"]["lock_until_ns"] > 0
        re = as_json("reindex", str(fs.mnt))
        assert re["files"] == 2 and re["instances"] == 0
        fs.wait_replicated()
        ver = as_json("verify", "--archive", str(fs.mnt))
        assert ver["objects"] > 0 and ver["unrepaired"] == []
        gc = as_json("gc", "--archive", str(fs.mnt))
        assert "blocks_deleted" in gc
        um = as_json("umount", str(fs.mnt))
        assert um == {"schema": 1, "mountpoint": str(fs.mnt), "hot": str(fs.hot)}
        cfg = as_json("config", "check", str(fs.hot))
        assert cfg["ok"] is True
        fsck = json.loads(run_vnafs("fsck", "--json", "--key-file", str(fs.key),
                                    str(fs.hot)).stdout)
        assert fsck["schema"] == 1 and fsck["clean"] is True
        restored = as_json("restore", "--key-file", str(fs.key), f"file://{archive}",
                           str(workdir / "restored"))
        assert restored["blocks"] >= 2 and restored["missing_blocks"] == 0
    finally:
        fs.cleanup()
