"""`vnafs.toml` and mount options: schema, defaults and validation with one-line errors.

The file lives in the hot store and holds no secret and no PHI. Unknown keys are errors, not
silently ignored: a misspelt setting in a medical archive should stop the mount, not be dropped.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vnafs.errors import VnafsError
from vnafs.timespec import parse_duration

CONFIG_NAME = "vnafs.toml"


@dataclass
class StoreConfig:
    zstd_level: int = 1
    cache_mib: int = 32
    workers: int = 2
    max_inflight_mib: int = 16
    max_dirty_mib: int = 64
    sync_interval: int = 5


@dataclass
class MountConfig:
    sync_on_close: bool = False
    allow_other: bool = False


@dataclass
class DicomConfig:
    index: bool = True
    views: str = ".dicom"
    by_patient: bool = False
    index_lag: int = 10


@dataclass
class ArchiveConfig:
    url: str = ""
    credentials: str = ""
    interval: int = 2
    rpo: int = 15
    uploads: int = 4
    bandwidth_mib: int = 0
    retention_days: int = 3650
    checkpoint_every: int = 1000
    poll: int = 10
    recall_timeout: int = 120
    # "off", "governance" or "compliance": object retention set on the archive objects that
    # locked snapshots and tombstones need (docs/admin.md, "Archive object lock").
    object_lock: str = "off"


OBJECT_LOCK_MODES = ("off", "governance", "compliance")


@dataclass
class Schedule:
    """One `[[snapshots.schedule]]` entry: a snapshot every `every_s` seconds, the newest
    `keep` kept, each locked for `lock_s` seconds (0 = not locked)."""

    name: str
    every_s: int
    keep: int
    lock_s: int = 0


@dataclass
class SnapshotConfig:
    mkdir: bool = False
    visible: bool = False
    schedule: list[Schedule] = field(default_factory=list)


@dataclass
class TieringConfig:
    """`[tiering]`: the hot store as a bounded cache over the archive (docs/admin.md,
    "Tiering"). Sizes in bytes, times in seconds; `capacity` 0 means the size of the file
    system that holds the hot store; `recall_timeout` 0 means `[archive] recall_timeout`."""

    capacity: int = 0
    high_watermark: float = 0.85
    low_watermark: float = 0.70
    min_age: int = 30 * 86400
    evict_by: str = "study"
    prefetch_priors: int = 3
    prefetch_modality: str = ""
    # A read that waits on the archive recalls the rest of the file's study in the background.
    read_ahead_studies: bool = True
    recall_timeout: int = 0
    recalls: int = 8


@dataclass
class MetricsConfig:
    """`[metrics]`: the Prometheus/OpenMetrics endpoint (docs/admin.md, "Metrics"). `listen`
    is "address:port" (an IP address; IPv6 in brackets); empty means off."""

    listen: str = ""


@dataclass
class AuditConfig:
    """`[audit]`: the access audit (docs/admin.md, "Access audit"). Reads of one study (or
    non-DICOM file) by one process within `collapse_seconds` give one record."""

    enabled: bool = False
    collapse_seconds: int = 300


@dataclass
class LogConfig:
    # debug | info | warning | error; reloaded by SIGHUP.
    level: str = "info"


@dataclass
class Config:
    format: int = 1
    store: StoreConfig = field(default_factory=StoreConfig)
    mount: MountConfig = field(default_factory=MountConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    snapshots: SnapshotConfig = field(default_factory=SnapshotConfig)
    tiering: TieringConfig = field(default_factory=TieringConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    @property
    def archive_url(self) -> str | None:
        return self.archive.url or None

    def to_toml(self) -> str:
        lines = [
            "# vnafs hot store configuration (see docs/admin.md). No secrets here.",
            f"format = {self.format}",
            "",
            "[store]",
            f"zstd_level = {self.store.zstd_level}",
            f"cache_mib = {self.store.cache_mib}",
            f"workers = {self.store.workers}",
            f"max_inflight_mib = {self.store.max_inflight_mib}",
            f"max_dirty_mib = {self.store.max_dirty_mib}",
            f"sync_interval = {self.store.sync_interval}",
            "",
            "[mount]",
            f"sync_on_close = {str(self.mount.sync_on_close).lower()}",
            f"allow_other = {str(self.mount.allow_other).lower()}",
            "",
            "[dicom]",
            "# Index DICOM files on close and serve the read-only views (docs/admin.md).",
            f"index = {str(self.dicom.index).lower()}",
            f"views = {_toml_str(self.dicom.views)}",
            "# by-patient names carry PatientIDs (PHI): off unless the site wants them.",
            f"by_patient = {str(self.dicom.by_patient).lower()}",
            "# While a PACS is sending, indexing waits for a pause, at most this many seconds.",
            f"index_lag = {self.dicom.index_lag}",
            "",
            "[archive]",
        ]
        a = self.archive
        if a.url:
            lines.append(f"url = {_toml_str(a.url)}")
        else:
            lines.append('# url = "file:///srv/archive"   (or s3://bucket/prefix?endpoint=...)')
        if a.credentials:
            lines.append(f"credentials = {_toml_str(a.credentials)}")
        else:
            lines.append('# credentials = "/etc/vnafs/archive.cred"   (TOML, mode 0600; or the '
                         'environment)')
        lines += [
            "# Seconds between replication cycles, and the recovery point objective.",
            f"interval = {a.interval}",
            f"rpo = {a.rpo}",
            f"uploads = {a.uploads}",
            "# Upload bandwidth cap in MiB/s (0 = none).",
            f"bandwidth_mib = {a.bandwidth_mib}",
            "# Deleted data stays in the archive this long before 'vnafs gc --archive' removes it.",
            f"retention_days = {a.retention_days}",
            "# At most this many cycles between full metadata checkpoints (sooner when the logs",
            "# since the last one outgrow it).",
            f"checkpoint_every = {a.checkpoint_every}",
            "# Read-only archive mounts look for new replicated changes this often (seconds).",
            f"poll = {a.poll}",
            f"recall_timeout = {a.recall_timeout}",
            "# Retention the archive enforces on what locked snapshots and tombstones need:",
            '# "off", "governance" or "compliance" (S3 Object Lock / Azure immutability).',
            f"object_lock = {_toml_str(a.object_lock)}",
            "",
            "[tiering]",
            "# The hot store as a bounded cache over the archive (needs an archive): above the",
            "# high watermark of the capacity, whole studies least recently used and older than",
            "# min_age are evicted (only what the archive verifiably holds) until usage is",
            "# below the low watermark; reads recall them. capacity 0 = the file system's size.",
            f"capacity = {_toml_str(_size_text(self.tiering.capacity))}",
            f"high_watermark = \"{self.tiering.high_watermark * 100:g}%\"",
            f"low_watermark = \"{self.tiering.low_watermark * 100:g}%\"",
            f"min_age = \"{_duration_text(self.tiering.min_age)}\"",
            f"evict_by = {_toml_str(self.tiering.evict_by)}",
            "# When a new study of a patient arrives, recall their most recent archived studies.",
            f"prefetch_priors = {self.tiering.prefetch_priors}",
            f"prefetch_modality = {_toml_str(self.tiering.prefetch_modality)}",
            "# A read of an evicted DICOM file recalls the rest of its study ahead of the reader.",
            f"read_ahead_studies = {str(self.tiering.read_ahead_studies).lower()}",
            "# Concurrent block fetches from the archive, and their timeout (0: the archive's).",
            f"recalls = {self.tiering.recalls}",
            f"recall_timeout = \"{_duration_text(self.tiering.recall_timeout)}\"",
            "",
            "[metrics]",
            "# Serve Prometheus/OpenMetrics figures at http://ADDRESS:PORT/metrics, such as",
            "# \"127.0.0.1:9471\" (no authentication: bind to loopback or a management network).",
            "# Empty: off.",
            f"listen = {_toml_str(self.metrics.listen)}",
            "",
            "[audit]",
            "# Record who opened, created, wrote, renamed, deleted or exported what (sealed,",
            "# chained; 'vnafs audit MNT' reads it, 'vnafs audit verify MNT' checks it).",
            f"enabled = {str(self.audit.enabled).lower()}",
            "# Reads of one study by one process within this many seconds are one record.",
            f"collapse_seconds = {self.audit.collapse_seconds}",
            "",
            "[log]",
            "# debug | info | warning | error. Changes to this, the schedules, the archive",
            "# intervals and the tiering thresholds take effect on SIGHUP (systemctl reload).",
            f"level = {_toml_str(self.log.level)}",
            "",
            "[snapshots]",
            "# mkdir/rmdir in /.snapshots create and delete snapshots (docs/admin.md).",
            f"mkdir = {str(self.snapshots.mkdir).lower()}",
            "# List /.snapshots in the root (then ls -a, find and rsync walk every snapshot).",
            "# Hidden by default, like ZFS's snapdir=hidden; NFS re-exports need true: a server",
            "# that dropped its caches resolves a snapshot directory's handle by finding its",
            "# name in the listing of its parent.",
            f"visible = {str(self.snapshots.visible).lower()}",
        ]
        for sch in self.snapshots.schedule:
            lines += ["", "[[snapshots.schedule]]", f"every = \"{sch.every_s}s\"",
                      f"keep = {sch.keep}"]
            if sch.lock_s:
                lines.append(f"lock = \"{sch.lock_s}s\"")
        if not self.snapshots.schedule:
            lines += ["# [[snapshots.schedule]]", '# every = "1h"', "# keep = 24",
                      '# lock = "30d"        (optional: each snapshot locked this long)']
        return "\n".join(lines) + "\n"


def _duration_text(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _size_text(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


_INT_RANGES = {
    "zstd_level": (1, 19),
    "cache_mib": (8, 1 << 20),
    "workers": (1, 256),
    "max_inflight_mib": (4, 1 << 16),
    "max_dirty_mib": (8, 1 << 16),
    "sync_interval": (1, 300),
    "index_lag": (0, 3600),
    "interval": (1, 3600),
    "rpo": (1, 86400),
    "uploads": (1, 64),
    "bandwidth_mib": (0, 1 << 20),
    "retention_days": (0, 36500),
    "checkpoint_every": (1, 100000),
    "poll": (1, 3600),
    "recall_timeout": (1, 3600),
    "collapse_seconds": (0, 86400),
}


def _section(path: Path, data: dict[str, Any], name: str, target: object) -> None:
    values = data.get(name, {})
    if not isinstance(values, dict):
        raise VnafsError(f"{path}: [{name}] must be a table; fix the file")
    for key, value in values.items():
        if not hasattr(target, key):
            known = ", ".join(sorted(vars(target)))
            raise VnafsError(f"{path}: unknown setting {name}.{key}; known settings are {known}")
        expected = type(getattr(target, key))
        if expected is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise VnafsError(f"{path}: {name}.{key} must be a whole number")
        if expected is bool and not isinstance(value, bool):
            raise VnafsError(f"{path}: {name}.{key} must be true or false")
        if expected is str and not isinstance(value, str):
            raise VnafsError(f"{path}: {name}.{key} must be a quoted string")
        if key in _INT_RANGES:
            lo, hi = _INT_RANGES[key]
            if not lo <= value <= hi:
                raise VnafsError(f"{path}: {name}.{key} must be between {lo} and {hi}")
        setattr(target, key, value)


def load(hot: Path) -> Config:
    path = hot / CONFIG_NAME
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise VnafsError(f"{path} is missing: this is not a vnafs hot store, or it is damaged"
                         ) from None
    except tomllib.TOMLDecodeError as exc:
        raise VnafsError(f"{path} is not valid TOML ({exc}); fix or restore the file") from None
    cfg = Config()
    unknown = set(data) - {"format", "store", "mount", "dicom", "archive", "snapshots",
                           "tiering", "log", "metrics", "audit"}
    if unknown:
        raise VnafsError(f"{path}: unknown section or key {sorted(unknown)[0]!r}; remove it")
    fmt = data.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise VnafsError(f"{path}: format must be a whole number (1); fix the file")
    if fmt > cfg.format:
        raise VnafsError(f"{path}: configuration format {fmt} is newer than this vnafs "
                         "understands: upgrade vnafs")
    cfg.format = fmt
    _section(path, data, "store", cfg.store)
    _section(path, data, "mount", cfg.mount)
    _section(path, data, "dicom", cfg.dicom)
    _check_view_name(path, cfg.dicom.views)
    _section(path, data, "archive", cfg.archive)
    _snapshots(path, data.get("snapshots", {}), cfg.snapshots)
    _tiering(path, data.get("tiering", {}), cfg.tiering)
    _section(path, data, "log", cfg.log)
    _section(path, data, "metrics", cfg.metrics)
    _section(path, data, "audit", cfg.audit)
    if cfg.metrics.listen:
        parse_listen(cfg.metrics.listen, f"{path}: metrics.listen")
    if cfg.log.level not in LOG_LEVELS:
        raise VnafsError(f"{path}: log.level must be one of {', '.join(LOG_LEVELS)}")
    if cfg.archive.object_lock not in OBJECT_LOCK_MODES:
        raise VnafsError(f"{path}: archive.object_lock must be \"off\", \"governance\" or "
                         "\"compliance\"; fix the file")
    if cfg.archive.url:
        cfg.archive.url = validate_archive_url(cfg.archive.url)
    return cfg


LOG_LEVELS = ("debug", "info", "warning", "error")

# What a SIGHUP can change in a running mount: the settings read afresh where they are used.
# Everything else needs a remount (`reload` says which).
RELOADABLE: dict[str, frozenset[str]] = {
    "dicom": frozenset({"index_lag"}),
    "archive": frozenset({"interval", "rpo", "bandwidth_mib", "retention_days",
                          "checkpoint_every", "poll", "recall_timeout"}),
    "snapshots": frozenset({"schedule"}),
    "tiering": frozenset({"capacity", "high_watermark", "low_watermark", "min_age",
                          "evict_by", "prefetch_priors", "prefetch_modality",
                          "recall_timeout", "read_ahead_studies"}),
    "log": frozenset({"level"}),
}


def reload(running: Config, new: Config) -> tuple[list[str], list[str]]:
    """Copy the reloadable settings of `new` into `running` (in place: the daemon's parts hold
    these section objects); returns (settings changed, settings that need a remount)."""
    changed: list[str] = []
    refused: list[str] = []
    for section in ("store", "mount", "dicom", "archive", "snapshots", "tiering", "log",
                    "metrics", "audit"):
        old_part, new_part = getattr(running, section), getattr(new, section)
        for key, value in vars(new_part).items():
            if getattr(old_part, key) == value:
                continue
            name = f"{section}.{key}"
            if key in RELOADABLE.get(section, frozenset()):
                setattr(old_part, key, value)
                changed.append(name)
            else:
                refused.append(name)
    return changed, refused


def _snapshots(path: Path, values: Any, target: SnapshotConfig) -> None:
    if not isinstance(values, dict):
        raise VnafsError(f"{path}: [snapshots] must be a table; fix the file")
    values = dict(values)
    schedules = values.pop("schedule", [])
    _section(path, {"snapshots": values}, "snapshots", target)
    if not isinstance(schedules, list):
        raise VnafsError(f"{path}: snapshot schedules are written [[snapshots.schedule]]; fix "
                         "the file")
    for i, entry in enumerate(schedules, 1):
        what = f"{path}: snapshots.schedule #{i}"
        if not isinstance(entry, dict) or set(entry) - {"every", "keep", "lock"} \
                or "every" not in entry or "keep" not in entry:
            raise VnafsError(f"{what} takes every, keep and optionally lock; fix the file")
        keep = entry["keep"]
        if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= 100000:
            raise VnafsError(f"{what}: keep must be a whole number from 1 to 100000")
        every = parse_duration(entry["every"], f"{what}: every")
        lock = parse_duration(entry["lock"], f"{what}: lock") if "lock" in entry else 0
        target.schedule.append(Schedule(f"every-{every}s", every, keep, lock))


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
               "G": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TIB": 1 << 40, "P": 1 << 50,
               "PIB": 1 << 50, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15}


def parse_size(value: object, what: str) -> int:
    """Bytes of 2TiB, 500GiB, 750GB, 1048576 (binary units for K/M/G/T alone)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        number = text.rstrip("KMGTPIB")
        unit = text[len(number):]
        try:
            amount = float(number)
        except ValueError:
            amount = -1.0
        if amount >= 0 and unit in _SIZE_UNITS:
            return int(amount * _SIZE_UNITS[unit])
    raise VnafsError(f"{what} must be a size such as \"2TiB\", \"500GiB\" or \"750GB\"; fix "
                     "the file")


def _share(value: object, what: str) -> float:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1]) / 100
        except ValueError:
            share = -1.0
        if 0 < share <= 1:
            return share
    raise VnafsError(f"{what} must be a share of the capacity such as \"85%\"; fix the file")


def _tiering(path: Path, values: Any, target: TieringConfig) -> None:
    if not isinstance(values, dict):
        raise VnafsError(f"{path}: [tiering] must be a table; fix the file")
    known = set(vars(target))
    for key in values:
        if key not in known:
            raise VnafsError(f"{path}: unknown setting tiering.{key}; known settings are "
                             f"{', '.join(sorted(known))}")
    what = f"{path}: tiering"
    if "capacity" in values:
        target.capacity = parse_size(values["capacity"], f"{what}.capacity")
    if "high_watermark" in values:
        target.high_watermark = _share(values["high_watermark"], f"{what}.high_watermark")
    if "low_watermark" in values:
        target.low_watermark = _share(values["low_watermark"], f"{what}.low_watermark")
    if target.low_watermark >= target.high_watermark:
        raise VnafsError(f"{what}.low_watermark must be below high_watermark; fix the file")
    if "min_age" in values:
        target.min_age = parse_duration(values["min_age"], f"{what}.min_age", allow_zero=True)
    if "recall_timeout" in values:
        target.recall_timeout = parse_duration(values["recall_timeout"],
                                               f"{what}.recall_timeout", allow_zero=True)
    if "evict_by" in values:
        if values["evict_by"] not in ("study", "file"):
            raise VnafsError(f"{what}.evict_by must be \"study\" or \"file\"; fix the file")
        target.evict_by = values["evict_by"]
    for key, lo, hi in (("prefetch_priors", 0, 100), ("recalls", 1, 256)):
        if key in values:
            value = values[key]
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise VnafsError(f"{what}.{key} must be a whole number from {lo} to {hi}")
            setattr(target, key, value)
    if "prefetch_modality" in values:
        value = values["prefetch_modality"]
        if not isinstance(value, str) or len(value) > 16:
            raise VnafsError(f"{what}.prefetch_modality must be a modality such as \"CT\" "
                             "(or empty for any)")
        target.prefetch_modality = value
    if "read_ahead_studies" in values:
        if not isinstance(values["read_ahead_studies"], bool):
            raise VnafsError(f"{what}.read_ahead_studies must be true or false")
        target.read_ahead_studies = values["read_ahead_studies"]


def parse_listen(value: str, what: str) -> tuple[str, int]:
    """(address, port) of "127.0.0.1:9471" or "[::1]:9471": an IP address, so the endpoint
    binds exactly where the file says, and a port from 1 to 65535."""
    import ipaddress

    host, sep, port = value.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
        number = int(port) if port.isdigit() else 0
    except ValueError:
        address, number = None, 0
    if not sep or address is None or not 1 <= number <= 65535 \
            or (address.version == 6) != bracketed:
        raise VnafsError(f"{what} must be an IP address and port such as \"127.0.0.1:9471\" "
                         "or \"[::1]:9471\" (empty turns metrics off); fix the file")
    return str(address), number


def _check_view_name(path: Path, name: str) -> None:
    if (not name or name in (".", "..") or "/" in name or "\0" in name
            or len(name.encode()) > 255):
        raise VnafsError(f"{path}: dicom.views must be a single file name such as \".dicom\"; "
                         "fix the file")


def validate_archive_url(url: str) -> str:
    """The URL itself, if it names a supported archive and carries no secret."""
    from vnafs.archive.url import parse_url

    parse_url(url)
    return url


# Mount options vnafs understands; everything else is refused with the list.
MOUNT_OPTIONS = {
    "allow_other": "let other users (Samba, NFS servers) access the mount",
    "sync_on_close": "make close() as durable as fsync() (for writers that never fsync)",
    "cache_mib": "plaintext block cache size in MiB",
    "poll": "read-only archive mounts: seconds between looks for new replicated changes",
    "default_permissions": "always on: the kernel checks permissions",
    "rw": "always on",
}


def apply_mount_options(cfg: Config, options: list[str]) -> None:
    for group in options:
        for opt in filter(None, group.split(",")):
            name, _, value = opt.partition("=")
            if name not in MOUNT_OPTIONS:
                known = ", ".join(sorted(MOUNT_OPTIONS))
                raise VnafsError(f"unknown mount option {name!r}; known options are {known}")
            if name == "allow_other":
                cfg.mount.allow_other = True
            elif name == "sync_on_close":
                cfg.mount.sync_on_close = value.lower() not in ("0", "false", "no")
            elif name == "cache_mib":
                if not value.isdigit() or not 8 <= int(value) <= 1 << 20:
                    raise VnafsError("mount option cache_mib needs a number from 8 to 1048576")
                cfg.store.cache_mib = int(value)
            elif name == "poll":
                if not value.isdigit() or not 1 <= int(value) <= 3600:
                    raise VnafsError("mount option poll needs a number of seconds from 1 to 3600")
                cfg.archive.poll = int(value)
