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

CONFIG_NAME = "vnafs.toml"


@dataclass
class StoreConfig:
    zstd_level: int = 1
    cache_mib: int = 128
    workers: int = 2
    max_inflight_mib: int = 32
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
class Config:
    format: int = 1
    store: StoreConfig = field(default_factory=StoreConfig)
    mount: MountConfig = field(default_factory=MountConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    archive_url: str | None = None

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
        if self.archive_url:
            lines.append(f"url = {_toml_str(self.archive_url)}")
        else:
            lines.append('# url = "file:///srv/archive"   (replication arrives with a later issue)')
        return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


_INT_RANGES = {
    "zstd_level": (1, 19),
    "cache_mib": (8, 1 << 20),
    "workers": (1, 256),
    "max_inflight_mib": (4, 1 << 16),
    "sync_interval": (1, 300),
    "index_lag": (0, 3600),
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
    unknown = set(data) - {"format", "store", "mount", "dicom", "archive"}
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
    archive = data.get("archive", {})
    if not isinstance(archive, dict) or set(archive) - {"url"}:
        raise VnafsError(f"{path}: [archive] takes only url")
    url = archive.get("url")
    cfg.archive_url = validate_archive_url(str(url)) if url else None
    return cfg


def _check_view_name(path: Path, name: str) -> None:
    if (not name or name in (".", "..") or "/" in name or "\0" in name
            or len(name.encode()) > 255):
        raise VnafsError(f"{path}: dicom.views must be a single file name such as \".dicom\"; "
                         "fix the file")


def validate_archive_url(url: str) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("file", "s3", "azure"):
        raise VnafsError(
            f"archive URL {url!r} is not supported: use file:///path, s3://bucket/prefix or "
            "azure://container/prefix"
        )
    return url


# Mount options vnafs understands; everything else is refused with the list.
MOUNT_OPTIONS = {
    "allow_other": "let other users (Samba, NFS servers) access the mount",
    "sync_on_close": "make close() as durable as fsync() (for writers that never fsync)",
    "cache_mib": "plaintext block cache size in MiB",
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
