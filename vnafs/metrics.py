"""The Prometheus/OpenMetrics endpoint: `/metrics` on `[metrics] listen`, off by default.

Why it exists: `vnafs status` answers an administrator who asks; monitoring needs the same
figures every few seconds as time series, to graph them and to alert on them (a recovery point
that ages, a hot store near its capacity, integrity errors). prometheus_client, the standard
exposition library, serves them in both text formats. There are no second books: a custom
collector reads the daemon's own figures when a scrape arrives (the engine's counters and
block usage, the replicator's state, the tierer's queue, the health). The only figures counted
here are those nothing else counts: the latency of each FUSE operation and the bytes read and
written through the mount, which the FUSE layer reports through its `Meters`.

Threads: prometheus_client answers each HTTP request in a thread of its own, and a scrape never
calls into trio. It copies plain ints and dicts that the loop owns (one step under the GIL: a
figure may be a moment old, never torn), and reads what lives in LMDB itself, from short read
transactions in the scrape thread (entry counts and a few small records, never a scan). At
unmount the server stops and waits for a running scrape before the store is closed.

No PHI: label values are operation names, problem kinds, states and fixed words; never a file
name, a UID or a DICOM value.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vnafs import __version__
from vnafs.archive.recall import Recall, percentile
from vnafs.config import parse_listen
from vnafs.control_server import Mounted
from vnafs.errors import VnafsError
from vnafs.fs.operations import FUSE_OPS, Meters
from vnafs.tier.state import Capacity

log = logging.getLogger("vnafs.metrics")

# FUSE answers take from microseconds (a 64 KiB write into the open file's buffer: most under
# 50 us) to seconds (a recall, an fsync behind a large barrier).
FUSE_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Problem kinds the daemon reports (`Health`); each has its series from zero.
PROBLEM_KINDS = ("archive", "block_write", "index", "integrity", "internal", "metadata_write",
                 "recall", "tiering")
HEALTH_STATES = ("ok", "degraded", "damaged")
REPLICATION_STATES = ("ok", "catching_up", "retrying")
INDEX_RESULTS = ("indexed", "not_dicom", "problems", "errors")
QUANTILES = (0.5, 0.99)
# A part of the figures that fails is logged at most this often (it is left out meanwhile).
FAILURE_LOG_SECONDS = 60.0
NAN = math.nan

# Every family the endpoint serves, with its help text: docs/admin.md ("Metrics") lists the
# same names, and tests/test_metrics.py checks that each one is in the first scrape.
FAMILIES: dict[str, str] = {
    "vnafs_info": "Version and kind of this mount (always 1).",
    "vnafs_health": "1 for the health state vnafs status shows now, 0 for the others.",
    "vnafs_problems": "Problems reported since mount, by kind.",
    "vnafs_problem_active": "1 while a problem of this kind is active.",
    "vnafs_fuse_operation_seconds": "Time to answer a FUSE request, by operation.",
    "vnafs_fuse_read_bytes": "Bytes returned by read requests since mount.",
    "vnafs_fuse_written_bytes": "Bytes accepted by write requests since mount.",
    "vnafs_blocks_sealed": "Blocks sealed since mount: stored as new, or deduplicated.",
    "vnafs_block_bytes": "Block bytes since mount: written (logical), new (plaintext of the "
                         "blocks stored new) and new_sealed (what those take compressed and "
                         "sealed): written/new is the dedup ratio, new/new_sealed the "
                         "compression ratio.",
    "vnafs_block_reads": "Block reads since mount, by where the block came from.",
    "vnafs_commits": "Metadata write transactions since mount.",
    "vnafs_barriers": "Group-commit syncfs barriers since mount.",
    "vnafs_stored_bytes": "Sealed (compressed, deduplicated) block bytes, by where they are.",
    "vnafs_metadata_bytes": "Size of the LMDB metadata file.",
    "vnafs_hot_capacity_bytes": "Capacity of the hot store (tiering.capacity or its disk).",
    "vnafs_hot_used_bytes": "Hot store use counted against the capacity: blocks + metadata.",
    "vnafs_hot_watermark_ratio": "Eviction watermarks as a share of the capacity.",
    "vnafs_open_files": "Files with open handles.",
    "vnafs_block_cache_bytes": "Plaintext held by the block cache.",
    "vnafs_dicom_instances": "DICOM instances in the index (copies counted once).",
    "vnafs_dicom_studies": "Studies in the DICOM index.",
    "vnafs_dicom_series": "Series in the DICOM index.",
    "vnafs_dicom_bytes": "Logical (file) bytes of the indexed DICOM instances.",
    "vnafs_index_pending": "Closed files waiting to be indexed.",
    "vnafs_index_files": "Files the indexer handled since mount, by result.",
    "vnafs_replication_state": "1 for the replication state now, 0 for the others.",
    "vnafs_replication_lag_seconds": "Age of the recovery point while changes are pending, "
                                     "else 0; NaN without an archive.",
    "vnafs_recovery_point_timestamp_seconds": "Everything committed before this time is in "
                                              "the archive; NaN before the first cycle.",
    "vnafs_recovery_point_age_seconds": "Now minus the recovery point; NaN before the first "
                                        "cycle.",
    "vnafs_replication_backlog": "Changes waiting for the archive: records and blocks.",
    "vnafs_replication_cycles": "Replication cycles committed since mount.",
    "vnafs_archive_uploaded_bytes": "Block bytes uploaded to the archive since mount.",
    "vnafs_recall_queue": "Recall jobs queued plus blocks being fetched from the archive.",
    "vnafs_recalls": "Blocks fetched from the archive since mount, by result.",
    "vnafs_recalled_bytes": "Bytes fetched from the archive since mount.",
    "vnafs_recall_latency_seconds": "Recall time (fetch, check, store) over the last 1024 "
                                    "recalls; NaN before the first.",
    "vnafs_evictions": "Eviction units (studies or files) evicted since mount.",
    "vnafs_evicted_bytes": "Bytes evicted from the hot store since mount.",
    "vnafs_snapshots": "Snapshots.",
    "vnafs_snapshots_locked": "Snapshots locked against deletion now.",
    "vnafs_snapshot_gc_running": "1 while the snapshot version collector runs.",
    "vnafs_metrics_collect_seconds": "Time this scrape took to gather the daemon's figures.",
}


def _copy(d: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a dict another thread updates: `dict()` of a dict (or a Counter) is one C
    call under the GIL; the retry is for a resize seen midway by a subclass."""
    for _ in range(3):
        try:
            return dict(d)
        except RuntimeError:
            continue
    return {}


def _gauge(name: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, FAMILIES[name], value=value)


def _counter(name: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, FAMILIES[name], value=value)


def _labelled(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str,
              label: str, values: Mapping[str, float]) -> Metric:
    family = kind(name, FAMILIES[name], labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


class DaemonCollector:
    """The daemon's figures, read at scrape time (see the module docstring for the threads).
    `recall` is the archive fetcher (None without an archive); `capacity` the hot store's
    budget, whose `usage` is the engine's block usage."""

    def __init__(self, m: Mounted, capacity: Capacity, recall: Recall | None) -> None:
        self.m = m
        self.capacity = capacity
        self.recall = recall
        self.meta_path = m.store.root / "meta" / "data.mdb"
        # One scrape at a time; `close` takes it too, so no scrape reads a closed store.
        self._lock = threading.Lock()
        self._closed = False
        self._failed_at: dict[str, float] = {}

    def describe(self) -> list[Metric]:
        return []  # the registry does not need the names in advance

    def collect(self) -> list[Metric]:
        with self._lock:
            if self._closed:
                return []
            start = time.perf_counter()
            out: list[Metric] = []
            parts: list[Callable[[], list[Metric]]] = [
                self._info, self._health_and_replication, self._blocks, self._storage,
                self._dicom, self._tiering, self._snapshots]
            for part in parts:
                try:
                    out += part()
                except Exception:
                    self._failed(part.__name__)
            out.append(_gauge("vnafs_metrics_collect_seconds", time.perf_counter() - start))
            return out

    def close(self) -> None:
        """Wait for a running scrape; later ones answer without the daemon's figures."""
        with self._lock:
            self._closed = True

    def _failed(self, part: str) -> None:
        now = time.monotonic()
        if now - self._failed_at.get(part, -math.inf) > FAILURE_LOG_SECONDS:
            self._failed_at[part] = now
            log.exception("metrics: reading %s failed; left out of the scrape", part)

    # -- the parts ------------------------------------------------------------------------------

    def _info(self) -> list[Metric]:
        m = self.m
        info = GaugeMetricFamily("vnafs_info", FAMILIES["vnafs_info"],
                                 labels=["version", "mode", "archive"])
        info.add_metric([__version__, "archive_only" if m.readonly else "hot",
                         "true" if m.store.config.archive_url else "false"], 1)
        return [info]

    def _health_and_replication(self) -> list[Metric]:
        m = self.m
        rp_ns = 0
        lag = NAN
        backlog = {"records": 0, "blocks": 0}
        state: str | None = None
        stats: dict[str, Any] = {}
        if m.replicator is not None:
            repl = m.replicator
            rp_ns = repl.state.rp_ns
            dbs = m.store.db.dbs
            with m.store.db.begin() as txn:
                backlog = {"records": txn.stat(dbs["repl_dirty"])["entries"],
                           "blocks": txn.stat(dbs["repl_blocks"])["entries"]}
            pending = backlog["records"] or backlog["blocks"]
            # As `Replicator.status` decides it.
            lag = (time.time_ns() - rp_ns) / 1e9 if pending and rp_ns else 0.0
            if repl.last_error:
                state = "retrying"
            else:
                state = "catching_up" if pending and lag > repl.cfg.rpo else "ok"
            stats = _copy(repl.stats)
        elif m.follower is not None:
            st = m.follower.status()
            rp_ns = st["recovery_point_ns"] or 0
            lag = 0.0
            state = "retrying" if st["last_error"] else "ok"
        health = m.engine.health.as_dict()
        shown = health["state"]
        if shown == "ok" and state not in (None, "ok"):
            shown = "degraded"  # as `vnafs status` says it
        if (shown == "ok" and m.replicator is not None
                and m.replicator.retention_status()["unenforced"]):
            shown = "degraded"  # object_lock asked for, and the archive cannot do it
        counts: dict[str, int] = dict.fromkeys(PROBLEM_KINDS, 0) | health["problems"]
        active = set(health["active"])
        return [
            _labelled(GaugeMetricFamily, "vnafs_health", "state",
                      {s: float(s == shown) for s in HEALTH_STATES}),
            _labelled(CounterMetricFamily, "vnafs_problems", "kind", counts),
            _labelled(GaugeMetricFamily, "vnafs_problem_active", "kind",
                      {k: float(k in active) for k in counts}),
            _labelled(GaugeMetricFamily, "vnafs_replication_state", "state",
                      {s: float(s == state) for s in REPLICATION_STATES}),
            _gauge("vnafs_replication_lag_seconds", lag),
            _gauge("vnafs_recovery_point_timestamp_seconds", rp_ns / 1e9 if rp_ns else NAN),
            _gauge("vnafs_recovery_point_age_seconds",
                   (time.time_ns() - rp_ns) / 1e9 if rp_ns else NAN),
            _labelled(GaugeMetricFamily, "vnafs_replication_backlog", "kind", backlog),
            _counter("vnafs_replication_cycles", stats.get("cycles", 0)),
            _counter("vnafs_archive_uploaded_bytes", stats.get("bytes_uploaded", 0)),
        ]

    def _blocks(self) -> list[Metric]:
        stats = _copy(self.m.engine.stats)
        return [
            _labelled(CounterMetricFamily, "vnafs_blocks_sealed", "result",
                      {"stored": stats.get("blocks_written", 0),
                       "deduplicated": stats.get("dedup_hits", 0)}),
            _labelled(CounterMetricFamily, "vnafs_block_reads", "source",
                      {"cache": stats.get("cache_hits", 0),
                       "disk": stats.get("blocks_loaded", 0),
                       "archive": stats.get("blocks_recalled", 0)}),
            _labelled(CounterMetricFamily, "vnafs_block_bytes", "kind",
                      {"written": stats.get("block_bytes_written", 0),
                       "new": stats.get("new_block_bytes", 0),
                       "new_sealed": stats.get("new_block_bytes_sealed", 0)}),
            _counter("vnafs_commits", stats.get("commits", 0)),
            _counter("vnafs_barriers", stats.get("barriers", 0)),
        ]

    def _storage(self) -> list[Metric]:
        cap = self.capacity
        usage = cap.usage
        known = usage.known  # before the first count at mount, the totals are partial
        resident, evicted = usage.resident, usage.evicted
        metadata = os.path.getsize(self.meta_path)
        return [
            _labelled(GaugeMetricFamily, "vnafs_stored_bytes", "location",
                      {"hot": resident if known else NAN,
                       "archive_only": evicted if known else NAN}),
            _gauge("vnafs_metadata_bytes", metadata),
            _gauge("vnafs_hot_capacity_bytes", cap.capacity),
            _gauge("vnafs_hot_used_bytes", resident + metadata if known else NAN),
            _labelled(GaugeMetricFamily, "vnafs_hot_watermark_ratio", "level",
                      {"high": cap.high, "low": cap.low}),
            _gauge("vnafs_open_files", len(self.m.files.open)),
            _gauge("vnafs_block_cache_bytes", self.m.engine.cache.size),
        ]

    def _dicom(self) -> list[Metric]:
        m = self.m
        counts: dict[str, int] = {}
        if m.index is not None:
            with m.index.db.begin() as txn:
                counts = m.index.facet(txn, "counts")  # one small record
        indexer = m.indexer
        stats = _copy(indexer.stats) if indexer is not None else {}
        return [
            _gauge("vnafs_dicom_instances", counts.get("instances", 0)),
            _gauge("vnafs_dicom_studies", counts.get("studies", 0)),
            _gauge("vnafs_dicom_series", counts.get("series", 0)),
            _gauge("vnafs_dicom_bytes", counts.get("bytes", 0)),
            _gauge("vnafs_index_pending", indexer.pending if indexer is not None else 0),
            _labelled(CounterMetricFamily, "vnafs_index_files", "result",
                      {r: stats.get(r, 0) for r in INDEX_RESULTS}),
        ]

    def _tiering(self) -> list[Metric]:
        recall, tierer = self.recall, self.m.tierer
        rstats = _copy(recall.stats) if recall is not None else {}
        latencies = list(recall.latencies) if recall is not None else []
        tstats = _copy(tierer.stats) if tierer is not None else {}
        # Queued jobs (`vnafs recall`, prefetch) plus blocks being fetched, as `vnafs status`
        # counts them.
        queue = (len(tierer._jobs) if tierer is not None else 0) + (
            recall.waiting if recall is not None else 0)
        latency = GaugeMetricFamily("vnafs_recall_latency_seconds",
                                    FAMILIES["vnafs_recall_latency_seconds"],
                                    labels=["quantile"])
        for q in QUANTILES:
            value = percentile(latencies, q)
            latency.add_metric([str(q)], NAN if value is None else value)
        return [
            _gauge("vnafs_recall_queue", queue),
            _labelled(CounterMetricFamily, "vnafs_recalls", "result",
                      {"ok": rstats.get("recalls", 0), "failed": rstats.get("failures", 0)}),
            _counter("vnafs_recalled_bytes", rstats.get("recalled_bytes", 0)),
            latency,
            _counter("vnafs_evictions", tstats.get("evictions", 0)),
            _counter("vnafs_evicted_bytes", tstats.get("freed_bytes", 0)),
        ]

    def _snapshots(self) -> list[Metric]:
        service = self.m.snapshots
        snaps = service.snaps.all()  # one read transaction; snapshots are few
        now = time.time_ns()
        gc = _copy(service.gc_progress)
        return [
            _gauge("vnafs_snapshots", len(snaps)),
            _gauge("vnafs_snapshots_locked", sum(s.lock_until_ns > now for s in snaps)),
            _gauge("vnafs_snapshot_gc_running", float(bool(gc.get("running")))),
        ]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (the daemon's log is for events)."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow client never holds up the daemon's exit


class _Server6(_Server):
    address_family = socket.AF_INET6


def _only_metrics(app: Any) -> Any:
    """prometheus_client answers on every path; `/metrics` is the one documented."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO", "") not in ("/metrics", "/metrics/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: the metrics are at /metrics\n"]
        return app(environ, start_response)

    return wsgi


class MetricsEndpoint:
    """The endpoint of one mount. `bind` (before the mount: a port in use stops it with one
    line) and `stop` block, so the daemon calls them in a worker thread; `start` serves from
    a thread of prometheus_client's HTTP server."""

    def __init__(self, listen: str, config_path: Path, ops: Sequence[str] = FUSE_OPS) -> None:
        self.listen = listen
        self.config_path = config_path
        self.address, self.port = parse_listen(listen, f"{config_path}: metrics.listen")
        disable_created_metrics()  # no `_created` series beside every counter
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        latency = Histogram("vnafs_fuse_operation_seconds",
                            FAMILIES["vnafs_fuse_operation_seconds"], ["op"],
                            buckets=FUSE_BUCKETS, registry=self.registry)
        read = Counter("vnafs_fuse_read_bytes", FAMILIES["vnafs_fuse_read_bytes"],
                       registry=self.registry)
        written = Counter("vnafs_fuse_written_bytes", FAMILIES["vnafs_fuse_written_bytes"],
                          registry=self.registry)
        # Every operation's series exists from the first scrape.
        self.meters = Meters(latency={op: latency.labels(op).observe for op in ops},
                             read_bytes=read.inc, written_bytes=written.inc)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._collector: DaemonCollector | None = None

    def bind(self) -> None:
        """Listen on the configured address, and only there (blocking)."""
        server_class = _Server6 if ":" in self.address else _Server
        fix = f"fix metrics.listen in {self.config_path}"
        try:
            self._server = make_server(self.address, self.port,
                                       _only_metrics(make_wsgi_app(self.registry)),
                                       server_class, handler_class=_Quiet)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise VnafsError(f"metrics port {self.port} on {self.address} is already in "
                                 f"use (another program or vnafs mount): stop that or {fix}"
                                 ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise VnafsError(f"metrics address {self.address} is not an address of this "
                                 f"host: {fix}") from None
            raise VnafsError(f"cannot serve metrics on {self.listen} ({exc.strerror}): {fix}"
                             ) from None

    def start(self, collector: DaemonCollector) -> None:
        assert self._server is not None, "bind first"
        self._collector = collector
        self.registry.register(collector)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="vnafs-metrics", daemon=True)
        self._thread.start()
        log.info("metrics served at http://%s/metrics", self.listen)

    def stop(self) -> None:
        """Stop serving and wait for a scrape in progress (blocking)."""
        server = self._server
        if server is None:
            return
        if self._thread is not None:
            server.shutdown()
            self._thread.join()
        server.server_close()
        if self._collector is not None:
            self._collector.close()
        self._server = self._thread = None
