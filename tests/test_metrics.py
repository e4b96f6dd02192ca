"""The Prometheus/OpenMetrics endpoint (`[metrics] listen`) as a monitoring system meets it.

Why this exists (issue 14, item 5): the endpoint is read by machines every few seconds, so it
must be complete from the first scrape (every family of docs/admin.md, counters at zero), move
while the mount works (FUSE operations, bytes in, stored bytes, replication), parse with the
reference parser, answer while files are being written (it runs in its own threads, never on
the event loop), carry no PHI (labels are operation names, kinds and states only), and fail a
mount with one line when its address is wrong or its port taken.
"""

from __future__ import annotations

import math
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Fs, _mounted, run_vnafs, set_config
from tools.servers import free_ports

KIB = 1 << 10
FILES = 200
FILE_SIZE = 256 * KIB
PATIENT_NAME = "Quillfeather^Ottoline"
PATIENT_ID = "PIDMX-48151623"
DICOM_NAME = "ottoline_quillfeather_ct.dcm"
ADMIN = Path(__file__).resolve().parent.parent / "docs" / "admin.md"


def documented_families() -> set[str]:
    """The metric names listed in docs/admin.md, section "Metrics"."""
    text = ADMIN.read_text()
    section = text.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    table = [ln for ln in section.splitlines() if ln.startswith("| `vnafs_")]
    names = {m.group(1) for ln in table if (m := re.match(r"\| `(vnafs_\w+)", ln))}
    assert len(names) > 30, "the Metrics section of docs/admin.md lists the families"
    return {n.removesuffix("_total") for n in names}


class Scrape:
    """One scrape: the text and its samples, parsed by prometheus_client's own parser."""

    def __init__(self, port: int) -> None:
        start = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            self.text = r.read().decode()
        self.seconds = time.monotonic() - start
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def value(self, name: str, **labels: str) -> float:
        for family in self.families.values():
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        raise AssertionError(f"no sample {name} {labels}")

    def label_values(self) -> set[str]:
        return {v for f in self.families.values() for s in f.samples for v in s.labels.values()}


def mount_with_metrics(fs: Fs) -> int:
    (port,) = free_ports(1)
    set_config(fs, "metrics", listen=f"127.0.0.1:{port}")
    fs.mount()
    return port


@pytest.fixture
def archived(workdir: Path) -> Fs:
    fs = Fs(workdir / "site", archive=f"file://{workdir / 'archive'}")
    fs.root.mkdir()
    fs.create()
    set_config(fs, "archive", interval=1)
    return fs


def _write_files(mnt: Path) -> None:
    d = mnt / "ingest"
    d.mkdir()
    for i in range(FILES):
        # Random content: every file is a block of its own, stored raw (no dedup, no
        # compression), so the stored bytes grow by what is written.
        (d / f"scan_{i:04d}.raw").write_bytes(random.Random(i).randbytes(FILE_SIZE))


def test_scrape_is_complete_moves_during_ingest_and_has_no_phi(archived: Fs) -> None:
    fs = archived
    try:
        port = mount_with_metrics(fs)
        first = Scrape(port)
        with pytest.raises(urllib.error.HTTPError) as other_path:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert other_path.value.code == 404
        # Every documented family is there from the first scrape, and nothing undocumented.
        ours = {n for n in first.families if n.startswith("vnafs_")}
        assert documented_families() == ours
        for op in ("lookup", "getattr", "create", "write", "read", "flush", "release",
                   "unlink", "rename", "fsync", "readdir", "getxattr"):
            first.value("vnafs_fuse_operation_seconds_count", op=op)  # pre-created
        assert first.value("vnafs_fuse_operation_seconds_count", op="write") == 0
        assert first.value("vnafs_fuse_written_bytes_total") == 0
        assert first.value("vnafs_problems_total", kind="integrity") == 0
        assert first.value("vnafs_health", state="ok") == 1
        assert "process_cpu_seconds" in first.families

        before = first
        deadline = time.monotonic() + 30
        while math.isnan(before.value("vnafs_stored_bytes", location="hot")):
            assert time.monotonic() < deadline, "stored bytes never counted"
            time.sleep(0.1)
            before = Scrape(port)

        # Scrape while a thread writes: the endpoint answers during ingest, and values move.
        writer = threading.Thread(target=_write_files, args=(fs.mnt,))
        writer.start()
        during: list[Scrape] = []
        while writer.is_alive():
            during.append(Scrape(port))
            time.sleep(0.05)
        writer.join()
        assert during, "no scrape ran while the files were written"
        assert max(s.seconds for s in during) < 5
        written = [s.value("vnafs_fuse_written_bytes_total") for s in during]
        assert written == sorted(written), "a counter went backwards"
        assert any(0 < w < FILES * FILE_SIZE for w in written), written

        after = Scrape(port)
        assert after.value("vnafs_fuse_written_bytes_total") == FILES * FILE_SIZE
        assert after.value("vnafs_fuse_operation_seconds_count", op="create") >= FILES
        assert after.value("vnafs_fuse_operation_seconds_count", op="write") >= FILES
        assert after.value("vnafs_fuse_operation_seconds_count", op="release") >= FILES
        assert after.value("vnafs_fuse_operation_seconds_bucket", op="write", le="+Inf") \
            == after.value("vnafs_fuse_operation_seconds_count", op="write")
        grown = (after.value("vnafs_stored_bytes", location="hot")
                 - before.value("vnafs_stored_bytes", location="hot"))
        assert grown >= FILES * FILE_SIZE * 0.9, grown
        assert after.value("vnafs_blocks_sealed_total", result="stored") >= FILES
        # Random data: every block new, none compressible (stored raw plus the envelope).
        new = after.value("vnafs_block_bytes_total", kind="new")
        assert after.value("vnafs_block_bytes_total", kind="written") >= new >= FILES * FILE_SIZE
        assert new <= after.value("vnafs_block_bytes_total", kind="new_sealed") < new * 1.01
        assert after.value("vnafs_commits_total") > before.value("vnafs_commits_total")

        # What status shows and what the scrape shows agree.
        fs.wait_replicated()
        status = fs.status()
        settled = Scrape(port)
        assert settled.value("vnafs_stored_bytes", location="hot") \
            == status["tiering"]["resident_bytes"]
        assert settled.value("vnafs_replication_backlog", kind="blocks") == 0
        assert settled.value("vnafs_replication_state", state="ok") == 1
        assert settled.value("vnafs_replication_cycles_total") >= 1
        assert settled.value("vnafs_archive_uploaded_bytes_total") >= FILES * FILE_SIZE * 0.9
        assert 0 <= settled.value("vnafs_recovery_point_age_seconds") < 60
        assert not math.isnan(settled.value("vnafs_replication_lag_seconds"))

        # Reads count bytes out.
        data = (fs.mnt / "ingest" / "scan_0007.raw").read_bytes()
        assert Scrape(port).value("vnafs_fuse_read_bytes_total") >= len(data)

        # A DICOM instance with a known patient: indexed, counted, and in no scrape.
        ct = pydicom.data.get_testdata_file("CT_small.dcm")
        assert isinstance(ct, str)
        ds = pydicom.dcmread(ct)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.save_as(fs.mnt / DICOM_NAME)
        fs.wait_indexed()
        final = Scrape(port)
        assert final.value("vnafs_dicom_instances") == 1
        assert final.value("vnafs_dicom_bytes") > 0
        assert final.value("vnafs_index_files_total", result="indexed") == 1
        needles = [PATIENT_NAME, PATIENT_ID, DICOM_NAME, "ottoline", "quillfeather",
                   "Quillfeather Ottoline", "scan_0", "ingest", str(ds.StudyInstanceUID),
                   str(ds.SOPInstanceUID), str(fs.mnt), str(fs.hot)]
        low = final.text.lower()
        found = [n for n in needles if n.lower() in low]
        assert not found, f"the scrape shows {found}"
        allowed = re.compile(r"^([a-z0-9_.+-]*|\+Inf)$")
        odd = sorted(v for v in final.label_values() if not allowed.match(v))
        assert not odd, f"label values outside op names, kinds and states: {odd}"
    finally:
        fs.cleanup()
    assert not _mounted(fs.mnt)


def test_without_an_archive_stored_bytes_are_the_stores_totals(new_fs: Fs) -> None:
    fs = new_fs
    fs.mount()
    (fs.mnt / "before").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, before metrics
    fs.umount()
    port = mount_with_metrics(fs)
    deadline = time.monotonic() + 30
    scrape = Scrape(port)
    while math.isnan(scrape.value("vnafs_stored_bytes", location="hot")):
        assert time.monotonic() < deadline, "stored bytes never counted"
        time.sleep(0.1)
        scrape = Scrape(port)
    assert scrape.value("vnafs_stored_bytes", location="hot") == fs.status()["resident_bytes"] > 0
    assert scrape.value("vnafs_replication_state", state="ok") == 0
    assert math.isnan(scrape.value("vnafs_recovery_point_age_seconds"))
    assert scrape.value("vnafs_info", mode="hot", archive="false") == 1
    fs.umount()
    assert not _mounted(fs.mnt)


@pytest.mark.parametrize("listen", ["127.0.0.1", "localhost:9471", "127.0.0.1:0",
                                    "::1:9471", "127.0.0.1:99999"])
def test_a_bad_listen_value_stops_the_mount_with_one_line(new_fs: Fs, listen: str) -> None:
    set_config(new_fs, "metrics", listen=listen)
    res = run_vnafs("mount", "--key-file", str(new_fs.key), str(new_fs.hot),
                    str(new_fs.mnt), check=False)
    assert res.returncode == 1
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "metrics.listen must be an IP address and port such as" in lines[0]
    assert "Traceback" not in res.stderr and not _mounted(new_fs.mnt)


def test_a_port_in_use_stops_the_mount_with_one_line_naming_it(new_fs: Fs) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        set_config(new_fs, "metrics", listen=f"127.0.0.1:{port}")
        res = run_vnafs("mount", "--key-file", str(new_fs.key), str(new_fs.hot),
                        str(new_fs.mnt), check=False)
    assert res.returncode == 1
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert f"metrics port {port} on 127.0.0.1 is already in use" in lines[0]
    assert "Traceback" not in res.stderr and not _mounted(new_fs.mnt)
    assert "Traceback" not in new_fs.log()
    # The port free again, the same store mounts and serves.
    set_config(new_fs, "metrics", listen=f"127.0.0.1:{port}")
    new_fs.mount()
    assert Scrape(port).value("vnafs_health", state="ok") == 1
    new_fs.umount()
