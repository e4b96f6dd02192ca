"""One small synchronous object-store interface over a directory, S3 and Azure Blob.

Replication needs only a handful of operations (put, create-only put, get, ranged get, size,
delete, list, check), but it needs them to behave the same on every store: the same
create-only semantics, the same "absent" answers, and the same three error classes with
one-sentence messages that name the fix and never contain a secret. This module is that
contract; everything above it is store-agnostic.

- `file:///abs/dir` is implemented here, not through obstore, because durability is the point:
  every object is written to a temp file, fsynced, linked (create-only) or renamed (overwrite)
  into place, and its directory is fsynced.
- `s3://bucket/prefix?endpoint=...&region=...` and `azure://container/prefix?account=...` use
  obstore's synchronous API (it releases the GIL). Credentials come from the environment or a
  TOML credentials file, never from the URL, and reach obstore through a credential provider so
  stray `AWS_*` / `AZURE_*` variables in the process environment cannot override them.
- obstore retries little here (vnafs has its own backoff) and times out in seconds, so an
  unreachable archive is reported in about ten seconds, not after obstore's default 3 minutes.
- Object retention (`[archive] object_lock`: S3 Object Lock, Azure version-level immutability)
  goes through boto3 and azure-storage-blob, made on first use: obstore has no such calls.

Object names are relative to the URL's site prefix ("blocks/ab/cdef...", "meta/HEAD"); two sites
with different prefixes in one bucket never see each other's objects. All calls block: run them
in worker threads, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import errno
import math
import os
import re
import stat
import tempfile
import threading
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import AzureStore, S3Store

from vnafs.archive.url import AZURE_ACCOUNT, ArchiveConfigError, ArchiveURL, parse_url
from vnafs.errors import VnafsError

if TYPE_CHECKING:
    from obstore.store import (
        AzureAccessKey,
        ClientConfig,
        ObjectStore,
        RetryConfig,
        S3Credential,
    )


class ArchiveError(VnafsError):
    """The archive failed: unreachable, a server error, or a missing bucket. Worth retrying."""


class ArchiveAuthError(ArchiveError):
    """The archive rejected the credentials, or there are none."""


class ArchiveMissing(ArchiveError):
    """The object does not exist (`get`, `get_range`)."""


# --- object retention ------------------------------------------------------------------------

RETENTION_MODES = ("governance", "compliance")  # weakest first: a mode only ever goes up


@dataclass(frozen=True)
class RetentionSupport:
    """Whether the archive enforces object retention itself, by which mechanism, and if not,
    why (one sentence naming the fix)."""

    mechanism: str
    reason: str = ""

    @property
    def supported(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class Retention:
    """An object's retention as the archive reports it."""

    mode: str  # one of RETENTION_MODES
    until_ns: int


def _until_s(until_ns: int) -> datetime:
    """A retain-until date in whole seconds (what S3 keeps), rounded up: never earlier."""
    return datetime.fromtimestamp(math.ceil(until_ns / 1e9), UTC)


def _ns(when: datetime) -> int:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp()) * 10**9


# --- names -----------------------------------------------------------------------------------

def _check_name(name: str) -> str:
    """Object names are relative, normalized paths; anything else is a caller bug."""
    segments = name.split("/")
    if (not name or "\0" in name or segments[0] == ".tmp"
            or any(s in ("", ".", "..") for s in segments)):
        raise ValueError(f"invalid archive object name {name!r}")
    return name


def _check_prefix(prefix: str) -> str:
    if prefix.startswith("/") or "\0" in prefix or any(
            s in (".", "..") for s in prefix.split("/")[:-1]) or "//" in prefix:
        raise ValueError(f"invalid archive list prefix {prefix!r}")
    return prefix


# --- credentials -----------------------------------------------------------------------------

_CRED_KEYS = {"s3": {"access_key_id", "secret_access_key", "session_token"},
              "azure": {"account_key"}}


def load_credentials(path: Path) -> dict[str, dict[str, str]]:
    """Read the TOML credentials file; refuse it when other users can read it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ArchiveConfigError(f"credentials file {path} does not exist; create it "
                                 "(mode 0600) or drop the option") from None
    except OSError as exc:
        raise ArchiveConfigError(f"credentials file {path} cannot be read ({exc.strerror}); "
                                 "fix its permissions") from None
    if st.st_mode & 0o077:
        raise ArchiveConfigError(
            f"credentials file {path} is accessible by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ArchiveConfigError(f"credentials file {path} cannot be read ({exc}); "
                                 "fix the file") from None
    except tomllib.TOMLDecodeError as exc:
        # The decoder names a line and column, never the value.
        raise ArchiveConfigError(f"credentials file {path} is not valid TOML ({exc}); "
                                 "fix the file") from None
    out: dict[str, dict[str, str]] = {}
    for section, table in data.items():
        if section not in _CRED_KEYS or not isinstance(table, dict):
            raise ArchiveConfigError(f"credentials file {path}: unknown section [{section}]; "
                                     "use [s3] and [azure]")
        for key, value in table.items():
            if key not in _CRED_KEYS[section]:
                known = ", ".join(sorted(_CRED_KEYS[section]))
                raise ArchiveConfigError(f"credentials file {path}: unknown key {section}.{key}; "
                                         f"[{section}] takes {known}")
            if not isinstance(value, str) or not value:
                raise ArchiveConfigError(f"credentials file {path}: {section}.{key} must be a "
                                         "non-empty quoted string")
        out[section] = dict(table)
    return out


# --- the interface ---------------------------------------------------------------------------

class Backend(ABC):
    """An object store holding one site's objects under its prefix. Thread-safe."""

    url: ArchiveURL

    @abstractmethod
    def put(self, name: str, data: bytes | memoryview, *, create: bool = False,
            sync: bool = True) -> bool:
        """Store `data` as `name`; True when written. With `create`, atomically create-only:
        False (and the object unchanged) when it already exists. With `sync=False` the
        object may be durable only after the next `flush()` (object stores: at once)."""

    def flush(self) -> None:  # noqa: B027  (deliberately not abstract: a no-op by default)
        """Make every object put with `sync=False` so far durable. Object stores acknowledge
        a PUT only once it is stored, so there is nothing to do; `file://` syncs here."""

    @abstractmethod
    def get(self, name: str) -> bytes:
        """The whole object; `ArchiveMissing` if absent."""

    def get_view(self, name: str) -> memoryview:
        """Like `get`, as a read-only view: object stores hand over their download buffer
        without the copy into `bytes` (restore moves every block through here)."""
        return memoryview(self.get(name))

    @abstractmethod
    def get_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object, shorter if the object ends sooner (like a slice);
        `ArchiveMissing` if absent."""

    @abstractmethod
    def size(self, name: str) -> int | None:
        """The object's size, None if absent."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete the object; deleting an absent object is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(name, size) of every object whose name starts with `prefix` (a plain string
        prefix: "a" matches "a/x" and "ab/y"; "a/" only the former). Order unspecified."""

    @abstractmethod
    def check(self) -> None:
        """Raise the matching `ArchiveError` unless the archive is reachable, accepts the
        credentials and its bucket / directory exists."""

    # Object retention: only S3 (Object Lock) and Azure (version-level immutability) have it.

    def retention_support(self) -> RetentionSupport:
        """Whether this archive can hold objects under a retention it enforces itself."""
        return RetentionSupport("", "this kind of archive cannot hold objects under retention")

    def get_retention(self, name: str) -> Retention | None:
        """The object's retention, None when it has none; `ArchiveMissing` if absent."""
        return None

    def set_retention(self, name: str, mode: str, until_ns: int) -> bool:
        """Keep the object until at least `until_ns` in at least `mode`. Retention only ever
        moves later and a mode never weakens: the current one is read first, and False
        means it already held as much (nothing was changed)."""
        raise ArchiveError(f"archive {self.url.display()} cannot hold objects under "
                           "retention; set [archive] object_lock = \"off\"")

    def purge(self, name: str) -> bool:
        """Delete the object with every old version a versioned bucket keeps of it; False
        when the archive refused because a version is still under retention."""
        self.delete(name)
        return True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url.display()}>"


def open_backend(url: str | ArchiveURL, *, credentials_file: Path | None = None,
                 env: Mapping[str, str] | None = None, timeout: float = 30.0) -> Backend:
    """The backend for `url`. Credentials come from `credentials_file` (wins) or `env`
    (default: the process environment). Contacts nothing: call `check()` for that."""
    parsed = parse_url(url) if isinstance(url, str) else url
    if parsed.scheme == "file":
        return FileBackend(parsed)
    environ: Mapping[str, str] = os.environ if env is None else env
    creds = load_credentials(credentials_file) if credentials_file is not None else {}
    if parsed.scheme == "s3":
        section = creds.get("s3")
        if section is not None:
            key_id = section.get("access_key_id", "")
            secret = section.get("secret_access_key", "")
            token = section.get("session_token")
        else:
            key_id = environ.get("AWS_ACCESS_KEY_ID", "")
            secret = environ.get("AWS_SECRET_ACCESS_KEY", "")
            token = environ.get("AWS_SESSION_TOKEN") or None
        if not key_id or not secret:
            raise ArchiveAuthError(
                f"archive {parsed.display()} has no credentials; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or put them in the credentials file")
        return S3Backend(parsed, key_id, secret, token, timeout)
    account = parsed.options.get("account") or environ.get("AZURE_STORAGE_ACCOUNT", "")
    if not account:
        raise ArchiveConfigError(f"archive URL {parsed.display()} names no storage account; "
                                 "add ?account=NAME or set AZURE_STORAGE_ACCOUNT")
    if not AZURE_ACCOUNT.fullmatch(account):
        raise ArchiveConfigError(f"AZURE_STORAGE_ACCOUNT {account!r} is not a storage account "
                                 "name (3-24 lowercase letters and digits)")
    section = creds.get("azure")
    if section is not None:
        key = section.get("account_key", "")
    else:
        key = environ.get("AZURE_STORAGE_ACCOUNT_KEY") or environ.get("AZURE_STORAGE_KEY", "")
    if not key:
        raise ArchiveAuthError(
            f"archive {parsed.display()} has no credentials; set AZURE_STORAGE_ACCOUNT_KEY or "
            "put account_key in the credentials file")
    try:
        base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise ArchiveAuthError(f"the account key for archive {parsed.display()} is not valid "
                               "base64; copy it again from the storage account's access keys"
                               ) from None
    return AzureBackend(parsed, account, key, timeout)


# --- file:// ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBackend(Backend):
    """Objects as files under a directory, each one durable when `put` returns.

    Writes go to `.tmp/` first, so a crash leaves garbage only there; a temp file is linked
    (create-only: EEXIST means the object exists, atomically) or renamed over the target.
    """

    def __init__(self, url: ArchiveURL) -> None:
        self.url = url
        self.root = Path(url.prefix)
        self.tmp = self.root / ".tmp"

    def _error(self, exc: OSError, op: str, name: str) -> ArchiveError:
        where = f"archive directory {self.root}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return ArchiveError(f"{where} is full; free space or grow the volume")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return ArchiveError(f"{where} is not writable by uid {os.getuid()} "
                                f"({exc.strerror}); fix its owner, mode or mount")
        return ArchiveError(f"{where}: cannot {op} {name or 'the directory'} ({exc.strerror}); "
                            "check the archive volume")

    def _missing_root(self) -> ArchiveError | None:
        if self.root.is_dir():
            return None
        return ArchiveError(f"archive directory {self.root} does not exist (is the archive "
                            "volume mounted?); create it or fix the archive URL")

    def _absent(self, name: str) -> ArchiveError:
        return self._missing_root() or ArchiveMissing(
            f"archive object {name} does not exist in {self.url.display()}")

    def _makedirs(self, path: Path) -> None:
        """Create `path` and missing parents below the root (mode 0700), each one durable."""
        missing: list[Path] = []
        while not path.is_dir():
            if path == self.root:
                raise self._missing_root() or FileNotFoundError(errno.ENOENT, "root vanished")
            missing.append(path)
            path = path.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:
                continue  # a concurrent put made it, and fsyncs it
            _fsync_dir(d.parent)

    def put(self, name: str, data: bytes | memoryview, *, create: bool = False,
            sync: bool = True) -> bool:
        path = self.root / _check_name(name)
        try:
            self._makedirs(self.tmp)
            self._makedirs(path.parent)
            fd, tmp = tempfile.mkstemp(dir=self.tmp)
            try:
                try:
                    rest = memoryview(data).cast("B")
                    while rest:
                        rest = rest[os.write(fd, rest):]
                    if sync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                written = True
                if create:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        written = False
                else:
                    os.rename(tmp, path)
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(tmp)
            if sync:
                # Also when the object already existed: its writer may not have synced yet.
                _fsync_dir(path.parent)
            return written
        except OSError as exc:
            raise self._error(exc, "write", name) from exc

    def flush(self) -> None:
        # One syncfs covers every object written since the last: an fsync per block file made
        # each one force an ext4 journal commit (measured: replication into a file:// archive
        # cut a concurrent ingest to 0.64x).
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _libc.syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error(exc, "sync", "") from exc

    def get(self, name: str) -> bytes:
        try:
            return (self.root / _check_name(name)).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._absent(name) from None
        except OSError as exc:
            raise self._error(exc, "read", name) from exc

    def get_range(self, name: str, start: int, end: int) -> bytes:
        if not 0 <= start <= end:
            raise ValueError(f"invalid range [{start}, {end})")
        try:
            with open(self.root / _check_name(name), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._absent(name) from None
        except OSError as exc:
            raise self._error(exc, "read", name) from exc

    def size(self, name: str) -> int | None:
        try:
            st = os.stat(self.root / _check_name(name))
        except (FileNotFoundError, NotADirectoryError):
            if err := self._missing_root():
                raise err from None
            return None
        except OSError as exc:
            raise self._error(exc, "stat", name) from exc
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def delete(self, name: str) -> None:
        path = self.root / _check_name(name)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            if err := self._missing_root():
                raise err from None
            return
        except OSError as exc:
            raise self._error(exc, "delete", name) from exc
        try:
            _fsync_dir(path.parent)
        except OSError as exc:
            raise self._error(exc, "delete", name) from exc

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        _check_prefix(prefix)
        if err := self._missing_root():
            raise err
        # Start in the deepest directory the prefix names; below it, descend only into
        # directories that can hold matching names.
        base = prefix.rpartition("/")[0]
        stack = [base]
        while stack:
            rel = stack.pop()
            try:
                with os.scandir(self.root / rel) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise self._error(exc, "list", rel) from exc
            for entry in entries:
                child = f"{rel}/{entry.name}" if rel else entry.name
                if child == ".tmp":
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if child.startswith(prefix) or prefix.startswith(child + "/"):
                        stack.append(child)
                elif child.startswith(prefix) and entry.is_file(follow_symlinks=False):
                    try:
                        size = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue  # deleted while listing
                    yield child, size

    def check(self) -> None:
        try:
            if not self.root.is_dir():
                if not self.root.parent.is_dir():
                    raise ArchiveError(
                        f"archive directory {self.root} does not exist and neither does its "
                        "parent; create it first")
                with suppress(FileExistsError):
                    self.root.mkdir(mode=0o700)
                _fsync_dir(self.root.parent)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise ArchiveError(f"archive directory {self.root} is not writable by uid "
                                   f"{os.getuid()}; fix its owner or mode")
            self._makedirs(self.tmp)
        except OSError as exc:
            raise self._error(exc, "create", "") from exc

    def retention_support(self) -> RetentionSupport:
        return RetentionSupport("", "a file:// archive is a plain directory, which anyone "
                                "who can write to it can delete from; use S3 with Object Lock "
                                "or Azure with version-level immutability")


# --- S3 and Azure through obstore ------------------------------------------------------------

_AUTH_CODES = re.compile(
    r"SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied|ExpiredToken|InvalidToken|"
    r"AuthenticationFailed|AuthorizationFailure|AuthorizationPermissionMismatch|"
    r"InvalidAuthenticationInfo|status code: 40[13]")
_NO_BUCKET = re.compile(r"NoSuchBucket|ContainerNotFound|container does not exist")
_STATUS = re.compile(r"status code: (\d{3}[^:\n]*)")
_CODE = re.compile(r"<Code>([^<]{1,80})</Code>")


class _ObjectStoreBackend(Backend):
    _kind = ""  # "bucket" or "container"
    _cred_hint = ""

    def __init__(self, url: ArchiveURL, store: ObjectStore, secrets: tuple[str, ...]) -> None:
        self.url = url
        self._store = store
        self._secrets = tuple(s for s in secrets if len(s) >= 4)

    @staticmethod
    def _client(endpoint: str, timeout: float) -> tuple[ClientConfig, RetryConfig]:
        client: ClientConfig = {
            "allow_http": endpoint.startswith("http://"),
            "connect_timeout": timedelta(seconds=min(5.0, timeout)),
            "timeout": timedelta(seconds=timeout),
        }
        # vnafs backs off itself; one quick retry covers a dropped keep-alive connection.
        retry: RetryConfig = {
            "max_retries": 1,
            "retry_timeout": timedelta(seconds=10),
            "backoff": {"init_backoff": timedelta(milliseconds=200),
                        "max_backoff": timedelta(seconds=2), "base": 2},
        }
        return client, retry

    def _key(self, name: str) -> str:
        """The full object key of `name` (with the site prefix), for the retention clients,
        which do not work relative to a prefix as obstore's store does."""
        name = _check_name(name)
        return f"{self.url.prefix}/{name}" if self.url.prefix else name

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, exc: Exception, op: str, name: str) -> ArchiveError:
        """Translate an obstore failure into one sentence that names the fix."""
        text = str(exc)
        where = self.url.display()
        code = m.group(1) if (m := _CODE.search(text)) else ""
        status = m.group(1).strip() if (m := _STATUS.search(text)) else ""
        detail = " ".join(filter(None, (status, f"({code})" if code else "")))
        if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or _AUTH_CODES.search(
                text):
            msg = (f"archive {where} rejected the credentials{f' ({code})' if code else ''}; "
                   f"check {self._cred_hint} or the credentials file")
            return ArchiveAuthError(self._scrub(msg))
        if _NO_BUCKET.search(text):
            return ArchiveError(self._scrub(
                f"{self._kind} {self.url.container} does not exist at {where}; create it first"))
        if isinstance(exc, (FileNotFoundError, NotFoundError)):
            return ArchiveMissing(f"archive object {name} does not exist in {where}")
        if not status:
            low = text.lower()
            if "connection refused" in low:
                reason = "connection refused"
            elif "dns error" in low or "failed to lookup" in low:
                reason = "host name not found"
            elif "timed out" in low or "timeout" in low:
                reason = "timed out"
            elif "reset" in low or "broken pipe" in low:
                reason = "connection reset"
            elif "error sending request" in low or "http error" in low or "connect" in low:
                reason = "connection failed"
            else:
                reason = ""
            if reason:
                return ArchiveError(self._scrub(f"archive {where} is unreachable: {reason}; "
                                                "check the endpoint and network"))
            first = text.splitlines()[0][:200] if text else type(exc).__name__
            return ArchiveError(self._scrub(f"archive {where} failed to {op} {name} ({first}); "
                                            "check the archive server"))
        return ArchiveError(self._scrub(f"archive {where} answered {detail} to {op} {name}; "
                                        "retry later or check the archive server"))

    def put(self, name: str, data: bytes | memoryview, *, create: bool = False,
            sync: bool = True) -> bool:
        try:
            # A single PUT: atomic, and the only way create-only (If-None-Match) holds on both
            # stores. Objects are blocks of a few MiB, far below the single-PUT limit (5 GiB).
            obstore.put(self._store, _check_name(name), data,
                        mode="create" if create else "overwrite", use_multipart=False)
        except (AlreadyExistsError, PreconditionError) as exc:
            if create:
                return False
            raise self._error(exc, "write", name) from exc
        except (BaseError, OSError) as exc:
            raise self._error(exc, "write", name) from exc
        return True

    def get(self, name: str) -> bytes:
        try:
            return bytes(obstore.get(self._store, _check_name(name)).bytes())
        except (BaseError, OSError) as exc:
            raise self._error(exc, "read", name) from exc

    def get_view(self, name: str) -> memoryview:
        try:
            return memoryview(obstore.get(self._store, _check_name(name)).bytes())
        except (BaseError, OSError) as exc:
            raise self._error(exc, "read", name) from exc

    def get_range(self, name: str, start: int, end: int) -> bytes:
        if not 0 <= start <= end:
            raise ValueError(f"invalid range [{start}, {end})")
        _check_name(name)
        if start == end:  # obstore refuses empty ranges
            if self.size(name) is None:
                raise ArchiveMissing(f"archive object {name} does not exist in "
                                     f"{self.url.display()}")
            return b""
        try:
            return bytes(obstore.get_range(self._store, name, start=start, end=end))
        except (BaseError, OSError) as exc:
            err = self._error(exc, "read", name)
            if type(err) is ArchiveError:
                # 416 / "range starting at N": the range starts at or after the end. Servers
                # word this differently, so ask for the size instead of parsing messages.
                size = self.size(name)
                if size is not None and start >= size:
                    return b""
            raise err from exc

    def size(self, name: str) -> int | None:
        try:
            return int(obstore.head(self._store, _check_name(name))["size"])
        except (FileNotFoundError, NotFoundError):
            # A HEAD carries no body, so a missing bucket also looks like this; check()
            # tells them apart.
            return None
        except (BaseError, OSError) as exc:
            raise self._error(exc, "stat", name) from exc

    def delete(self, name: str) -> None:
        try:
            obstore.delete(self._store, _check_name(name))
        except (FileNotFoundError, NotFoundError) as exc:
            if _NO_BUCKET.search(str(exc)):  # Azure answers 404 for a missing blob
                raise self._error(exc, "delete", name) from exc
        except (BaseError, OSError) as exc:
            raise self._error(exc, "delete", name) from exc

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        # obstore lists whole path segments ("a" means "a/..."), so list the deepest directory
        # the prefix names and filter by the string prefix.
        base = _check_prefix(prefix).rpartition("/")[0]
        stream = iter(obstore.list(self._store, prefix=base or None, chunk_size=1000))
        while True:
            try:
                batch = next(stream, None)
            except (BaseError, OSError) as exc:
                raise self._error(exc, "list", prefix or "the site") from exc
            if batch is None:
                return
            for meta in batch:
                if meta["path"].startswith(prefix):
                    yield meta["path"], int(meta["size"])

    def check(self) -> None:
        try:
            next(iter(obstore.list(self._store, chunk_size=1)), None)
        except (BaseError, OSError) as exc:
            raise self._error(exc, "list", "the site") from exc


class S3Backend(_ObjectStoreBackend):
    _kind = "bucket"
    _cred_hint = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"

    def __init__(self, url: ArchiveURL, key_id: str, secret: str, token: str | None,
                 timeout: float) -> None:
        region = url.options.get("region", "us-east-1")
        # An explicit endpoint, so AWS_ENDPOINT in the environment cannot redirect the archive.
        endpoint = url.options.get("endpoint", f"https://s3.{region}.amazonaws.com")
        credential: S3Credential = {"access_key_id": key_id, "secret_access_key": secret,
                                    "token": token, "expires_at": None}

        def provider() -> S3Credential:
            return credential

        client, retry = self._client(endpoint, timeout)
        store = S3Store(url.container, prefix=url.prefix or None, endpoint=endpoint,
                        region=region, virtual_hosted_style_request=False,
                        client_options=client, retry_config=retry, credential_provider=provider)
        super().__init__(url, store, (secret, token or ""))
        self._boto_args: dict[str, Any] = {
            "endpoint_url": endpoint, "region_name": region, "aws_access_key_id": key_id,
            "aws_secret_access_key": secret, "aws_session_token": token}
        self._timeout = timeout
        self._boto: Any = None
        self._boto_lock = threading.Lock()

    # -- object retention (boto3: obstore has no Object Lock calls) ------------------------------

    def _s3(self) -> Any:
        """The boto3 client, made on first use (boto3 takes ~0.3 s to import); thread-safe."""
        with self._boto_lock:
            if self._boto is None:
                import boto3
                from botocore.config import Config

                config = Config(s3={"addressing_style": "path"},
                                connect_timeout=min(5.0, self._timeout),
                                read_timeout=self._timeout,
                                retries={"max_attempts": 2, "mode": "standard"})
                # Its own session: explicit arguments, so AWS_* variables and ~/.aws files
                # cannot point the retention calls elsewhere than the objects.
                self._boto = boto3.session.Session().client("s3", config=config,
                                                             **self._boto_args)
            return self._boto

    def _boto_error(self, exc: Exception, op: str, name: str) -> ArchiveError:
        """One sentence for a boto3 failure, in the words `_error` uses for obstore's."""
        from botocore.exceptions import ClientError

        where = self.url.display()
        if not isinstance(exc, ClientError):
            return ArchiveError(self._scrub(f"archive {where} is unreachable or failed to {op} "
                                            f"{name} ({type(exc).__name__}); check the "
                                            "endpoint and network"))
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "404", "NotFound"):
            return ArchiveMissing(f"archive object {name} does not exist in {where}")
        if code == "NoSuchBucket":
            return ArchiveError(f"bucket {self.url.container} does not exist at {where}; "
                                "create it first")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken", "InvalidToken") or status in (401, 403):
            return ArchiveAuthError(self._scrub(
                f"archive {where} refused to {op} {name} ({code or status}); check the "
                "credentials and that they may get and put object retention"))
        return ArchiveError(self._scrub(f"archive {where} answered {status} ({code}) to {op} "
                                        f"{name}; retry later or check the archive server"))

    def retention_support(self) -> RetentionSupport:
        from botocore.exceptions import BotoCoreError, ClientError

        mechanism = "S3 Object Lock"
        bucket = self.url.container
        s3 = self._s3()
        try:
            versioning = s3.get_bucket_versioning(Bucket=bucket).get("Status")
            if versioning != "Enabled":
                return RetentionSupport(mechanism, f"bucket {bucket} has no versioning, which "
                                        "Object Lock needs; use a bucket created with Object "
                                        "Lock enabled")
            try:
                conf = s3.get_object_lock_configuration(Bucket=bucket)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if "ObjectLockConfiguration" in code or code in ("NotImplemented",
                                                                  "InvalidRequest"):
                    return RetentionSupport(mechanism, f"bucket {bucket} has no Object Lock "
                                            "configuration; enable Object Lock on the bucket")
                raise
            if conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
                return RetentionSupport(mechanism, f"bucket {bucket} has Object Lock turned "
                                        "off; enable Object Lock on the bucket")
        except (ClientError, BotoCoreError) as exc:
            raise self._boto_error(exc, "read the Object Lock settings of", bucket) from exc
        return RetentionSupport(mechanism)

    def get_retention(self, name: str) -> Retention | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._s3().get_object_retention(Bucket=self.url.container,
                                                     Key=self._key(name))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchObjectLockConfiguration", "ObjectLockConfigurationNotFoundError"):
                return None  # the object exists and has no retention
            raise self._boto_error(exc, "read the retention of", name) from exc
        except BotoCoreError as exc:
            raise self._boto_error(exc, "read the retention of", name) from exc
        ret = answer.get("Retention") or {}
        if not ret.get("RetainUntilDate"):
            return None
        return Retention(str(ret.get("Mode", "GOVERNANCE")).lower(), _ns(ret["RetainUntilDate"]))

    def set_retention(self, name: str, mode: str, until_ns: int) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        current = self.get_retention(name)
        want = _stronger(mode, current.mode if current else None)
        until = _until_s(until_ns)
        if current is not None and current.mode == want and current.until_ns >= _ns(until):
            return False
        if current is not None and current.until_ns > _ns(until):
            until = datetime.fromtimestamp(current.until_ns / 1e9, UTC)
        args: dict[str, Any] = {"Bucket": self.url.container, "Key": self._key(name),
                                "Retention": {"Mode": want.upper(), "RetainUntilDate": until}}
        if current is not None and current.mode != want:
            # governance -> compliance changes a governance setting: S3 wants the bypass.
            args["BypassGovernanceRetention"] = True
        try:
            self._s3().put_object_retention(**args)
        except (ClientError, BotoCoreError) as exc:
            raise self._boto_error(exc, "set the retention of", name) from exc
        return True

    def purge(self, name: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(name)
        s3 = self._s3()
        kept = False
        try:
            pages = s3.get_paginator("list_object_versions").paginate(
                Bucket=self.url.container, Prefix=key)
            for page in pages:
                for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                    if entry.get("Key") != key:
                        continue
                    try:
                        s3.delete_object(Bucket=self.url.container, Key=key,
                                         VersionId=entry["VersionId"])
                    except ClientError as exc:
                        code = str(exc.response.get("Error", {}).get("Code", ""))
                        if code != "AccessDenied":
                            raise
                        kept = True  # still under retention by the server's clock
        except (ClientError, BotoCoreError) as exc:
            raise self._boto_error(exc, "delete", name) from exc
        return not kept


class AzureBackend(_ObjectStoreBackend):
    _kind = "container"
    _cred_hint = "AZURE_STORAGE_ACCOUNT_KEY"

    def __init__(self, url: ArchiveURL, account: str, key: str, timeout: float) -> None:
        # Not use_emulator: it ignores endpoint= and always goes to port 10000.
        endpoint = url.options.get("endpoint", f"https://{account}.blob.core.windows.net")
        credential: AzureAccessKey = {"access_key": key, "expires_at": None}

        def provider() -> AzureAccessKey:
            return credential

        client, retry = self._client(endpoint, timeout)
        try:
            store = AzureStore(url.container, prefix=url.prefix or None, endpoint=endpoint,
                               account_name=account, client_options=client,
                               retry_config=retry, credential_provider=provider)
        except BaseError as exc:  # never echo obstore's text: it could quote the key
            raise ArchiveConfigError(f"archive {url.display()} cannot be configured "
                                     f"({type(exc).__name__}); check the URL and key") from None
        super().__init__(url, store, (key,))
        self._account = account
        self._account_key = key
        self._endpoint = endpoint
        self._timeout = timeout
        self._container: Any = None
        self._azure_lock = threading.Lock()

    # -- object retention (azure-storage-blob: obstore has no immutability calls) ----------------

    def _blobs(self) -> Any:
        """The container client, made on first use; thread-safe."""
        with self._azure_lock:
            if self._container is None:
                from azure.storage.blob import BlobServiceClient

                service = BlobServiceClient(
                    account_url=self._endpoint,
                    credential={"account_name": self._account,
                                "account_key": self._account_key},
                    connection_timeout=min(5.0, self._timeout), read_timeout=self._timeout,
                    retry_total=1)
                self._container = service.get_container_client(self.url.container)
            return self._container

    def _azure_error(self, exc: Exception, op: str, name: str) -> ArchiveError:
        from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError

        where = self.url.display()
        code = str(getattr(exc, "error_code", "") or "")
        if isinstance(exc, ClientAuthenticationError):
            return ArchiveAuthError(f"archive {where} rejected the credentials ({code}); check "
                                    "AZURE_STORAGE_ACCOUNT_KEY or the credentials file")
        if isinstance(exc, ResourceNotFoundError):
            if "Container" in code:
                return ArchiveError(f"container {self.url.container} does not exist at "
                                    f"{where}; create it first")
            return ArchiveMissing(f"archive object {name} does not exist in {where}")
        status = getattr(exc, "status_code", None)
        return ArchiveError(self._scrub(f"archive {where} answered {status or type(exc).__name__}"
                                        f"{f' ({code})' if code else ''} to {op} {name}; retry "
                                        "later or check the archive server"))

    def retention_support(self) -> RetentionSupport:
        from azure.core.exceptions import AzureError

        mechanism = "Azure version-level immutability"
        try:
            props = self._blobs().get_container_properties()
        except AzureError as exc:
            raise self._azure_error(exc, "read the properties of", self.url.container) from exc
        if not getattr(props, "immutable_storage_with_versioning_enabled", None):
            return RetentionSupport(mechanism, f"container {self.url.container} has no "
                                    "version-level immutability; use a container created with "
                                    "version-level immutability support")
        return RetentionSupport(mechanism)

    def get_retention(self, name: str) -> Retention | None:
        from azure.core.exceptions import AzureError

        try:
            props = self._blobs().get_blob_client(self._key(name)).get_blob_properties()
        except AzureError as exc:
            raise self._azure_error(exc, "read the retention of", name) from exc
        policy = props.immutability_policy
        if policy is None or policy.expiry_time is None:
            return None
        mode = "compliance" if str(policy.policy_mode).lower() == "locked" else "governance"
        return Retention(mode, _ns(policy.expiry_time))

    def set_retention(self, name: str, mode: str, until_ns: int) -> bool:
        from azure.core.exceptions import AzureError
        from azure.storage.blob import ImmutabilityPolicy

        current = self.get_retention(name)
        want = _stronger(mode, current.mode if current else None)
        until = _until_s(until_ns)
        if current is not None and current.mode == want and current.until_ns >= _ns(until):
            return False
        if current is not None and current.until_ns > _ns(until):
            until = datetime.fromtimestamp(current.until_ns / 1e9, UTC)
        policy = ImmutabilityPolicy(expiry_time=until,
                                    policy_mode="Locked" if want == "compliance" else "Unlocked")
        try:
            self._blobs().get_blob_client(self._key(name)).set_immutability_policy(policy)
        except AzureError as exc:
            raise self._azure_error(exc, "set the retention of", name) from exc
        return True

    def purge(self, name: str) -> bool:
        from azure.core.exceptions import AzureError, HttpResponseError

        key = self._key(name)
        blobs = self._blobs()
        kept = False
        try:
            for item in blobs.list_blobs(name_starts_with=key, include=["versions"]):
                if item.name != key:
                    continue
                try:
                    blobs.get_blob_client(key).delete_blob(version_id=item.version_id)
                except HttpResponseError as exc:
                    if exc.status_code != 409:  # 409: the version is immutable for now
                        raise
                    kept = True
        except AzureError as exc:
            raise self._azure_error(exc, "delete", name) from exc
        return not kept


def _stronger(mode: str, current: str | None) -> str:
    """The mode to set: never weaker than the object's current one."""
    if current in RETENTION_MODES and RETENTION_MODES.index(current) > RETENTION_MODES.index(mode):
        return current
    return mode


__all__ = [
    "RETENTION_MODES",
    "ArchiveAuthError",
    "ArchiveConfigError",
    "ArchiveError",
    "ArchiveMissing",
    "ArchiveURL",
    "AzureBackend",
    "Backend",
    "FileBackend",
    "Retention",
    "RetentionSupport",
    "S3Backend",
    "load_credentials",
    "open_backend",
    "parse_url",
]
