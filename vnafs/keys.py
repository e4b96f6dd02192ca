"""The key hierarchy: where the KEK comes from, and the keyring it unlocks.

The KEK never lives in the hot store; it comes from a key file, a passphrase or a systemd
credential. It seals the keyring file (`docs/format.md` section 3), which holds the master secret
(the name and block-id HMAC keys derive from it) and the versioned AES-256-GCM data keys.

The keyring also enforces the per-key nonce budget (NIST SP 800-38D: at most 2^32 random-nonce
seals per key). Seal counts are reserved in chunks that are persisted *before* use, so a crash can
only waste part of a chunk, never let a key be used beyond its budget. This module knows nothing of
LMDB, trio or FUSE so that offline tools (fsck, restore) can use it without a mount.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vnafs.errors import IntegrityError, VnafsError

KEK_BYTES = 32

KEYRING_MAGIC = b"VNAFSKR1"
KEYRING_VERSION = 1
KDF_DIRECT = 0
KDF_SCRYPT = 1
DEFAULT_NONCE_BUDGET = 2**32
DEFAULT_RESERVE_CHUNK = 2**20
DEFAULT_SCRYPT_LOG_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
# 128 MiB bounds scrypt's memory, which also caps log N at 16 for r = 8.
SCRYPT_MAXMEM = 2**27
MIN_SCRYPT_LOG_N = 10
MAX_SCRYPT_LOG_N = 16

# magic, kdf, log N, r, p, salt; the 12-byte nonce follows (offset 28), ciphertext at 40.
_HEADER_PREFIX = struct.Struct(">8sBBBB16s")
_NONCE_LEN = 12
_HEADER_LEN = _HEADER_PREFIX.size + _NONCE_LEN
_TAG_LEN = 16
# Data key versions go into a u32 envelope field.
_MAX_KEY_VERSION = 2**32 - 1
_KEY_FILE_READ_LIMIT = 4096

_HEX64 = re.compile(rb"[0-9a-fA-F]{64}")
_LOWER_HEX = re.compile(r"[0-9a-f]+")

_INFO_NAME = b"vnafs name-hmac v1"
_INFO_DEDUP = b"vnafs block-id v1"


def _fsync_dir(path: Path) -> None:
    """Make a rename or create in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def generate_key_file(path: Path) -> None:
    """Write a new random KEK to `path` as 64 hex digits, readable by the owner only."""
    path = Path(path)
    key = os.urandom(KEK_BYTES)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise VnafsError(
            f"refusing to overwrite existing key file {path}: "
            "choose another path or remove it first"
        ) from None
    except OSError as err:
        raise VnafsError(
            f"cannot create key file {path} ({err.strerror}): choose a path in a writable directory"
        ) from None
    try:
        # The umask may only have narrowed the mode, but be explicit: this file is the secret.
        os.fchmod(fd, 0o600)
        _write_all(fd, key.hex().encode("ascii") + b"\n")
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        # A truncated key file would later read as "wrong format"; better that it not exist.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise VnafsError(
            f"cannot write key file {path} ({err.strerror}): free space or choose another path"
        ) from None
    os.close(fd)
    try:
        _fsync_dir(path.parent)
    except OSError as err:
        raise VnafsError(
            f"cannot sync the directory of key file {path} ({err.strerror}): "
            "check that file system and run keygen again"
        ) from None


def read_key_file(path: Path) -> bytes:
    """Return the 32-byte KEK stored in `path` (64 hex digits, or exactly 32 raw bytes)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # Bounded read: a key path pointing at /dev/zero or a large file must not hang us.
            data = f.read(_KEY_FILE_READ_LIMIT + 1)
    except FileNotFoundError:
        raise VnafsError(
            f"key file {path} does not exist: "
            "pass the key created by 'vnafs keygen' with --key-file"
        ) from None
    except PermissionError:
        raise VnafsError(
            f"cannot read key file {path} (permission denied): run vnafs as a user that can read it"
        ) from None
    except IsADirectoryError:
        raise VnafsError(
            f"key file {path} is a directory: pass the key file itself with --key-file"
        ) from None
    except OSError as err:
        raise VnafsError(
            f"cannot read key file {path} ({err.strerror}): check the path given with --key-file"
        ) from None
    # Group/world-readable key files are accepted on purpose: refusing would break existing
    # deployments for a policy decision that belongs to the administrator.
    stripped = data.strip()
    if _HEX64.fullmatch(stripped):
        return bytes.fromhex(stripped.decode("ascii"))
    if len(data) == KEK_BYTES:
        return data
    raise VnafsError(
        f"key file {path} is not a vnafs key (expected 64 hex digits or 32 raw bytes): "
        "pass the file created by 'vnafs keygen'"
    )


@dataclass(frozen=True)
class KekSource:
    """Where the KEK comes from: a 32-byte key, or a passphrase stretched with scrypt.

    `origin` describes the source for error messages ("key file /etc/vnafs.key"); the secrets are
    kept out of `repr` so that a logged object or traceback never shows them.
    """

    key: bytes | None = field(default=None, repr=False)
    passphrase: bytes | None = field(default=None, repr=False)
    origin: str = ""

    def __post_init__(self) -> None:
        if (self.key is None) == (self.passphrase is None):
            raise ValueError("KekSource needs exactly one of key and passphrase")
        if self.key is not None and len(self.key) != KEK_BYTES:
            raise ValueError(f"a KEK is {KEK_BYTES} bytes")
        if self.passphrase is not None and not self.passphrase:
            raise ValueError("the passphrase is empty")


def resolve_kek_source(
    key_file: str | None,
    passphrase_env: str | None,
    environ: Mapping[str, str] | None = None,
) -> KekSource:
    """Pick the KEK source: --key-file, then --passphrase-env, then the systemd credential."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    if key_file:
        return KekSource(key=read_key_file(Path(key_file)), origin=f"key file {key_file}")
    if passphrase_env:
        value = env.get(passphrase_env)
        if not value:
            raise VnafsError(
                f"environment variable {passphrase_env} is not set or is empty: "
                f"put the passphrase in {passphrase_env} or pass --key-file FILE"
            )
        # surrogateescape gives back the exact bytes of a non-UTF-8 environment value.
        return KekSource(
            passphrase=value.encode("utf-8", "surrogateescape"),
            origin=f"the passphrase in ${passphrase_env}",
        )
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        cred = Path(cred_dir) / "vnafs.key"
        if cred.exists():
            return KekSource(key=read_key_file(cred), origin=f"systemd credential {cred}")
    raise VnafsError(
        "no key given: pass --key-file FILE or --passphrase-env VAR, "
        "or run under systemd with LoadCredential=vnafs.key"
    )


@dataclass
class _Payload:
    """The decrypted keyring contents (format.md section 3); replaced whole, never mutated."""

    fs_id: bytes
    master: bytes
    data_keys: dict[int, bytes]
    current: int
    nonce_budget: int
    reserved: dict[int, int]
    created: str

    def to_json(self) -> bytes:
        doc = {
            "version": KEYRING_VERSION,
            "fs_id": self.fs_id.hex(),
            "master": self.master.hex(),
            "data_keys": {str(v): k.hex() for v, k in sorted(self.data_keys.items())},
            "current": self.current,
            "nonce_budget": self.nonce_budget,
            "reserved": {str(v): n for v, n in sorted(self.reserved.items())},
            "created": self.created,
        }
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    def copy(self) -> _Payload:
        return _Payload(
            fs_id=self.fs_id,
            master=self.master,
            data_keys=dict(self.data_keys),
            current=self.current,
            nonce_budget=self.nonce_budget,
            reserved=dict(self.reserved),
            created=self.created,
        )


class _Damaged(Exception):
    """Internal: the keyring authenticated but its payload does not follow the format."""


def _hex_field(value: Any, nbytes: int) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * nbytes or not _LOWER_HEX.fullmatch(value):
        raise _Damaged
    return bytes.fromhex(value)


def _int_field(value: Any) -> int:
    # bool is an int subclass; JSON true must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Damaged
    return value


def _version_key(value: str) -> int:
    if not value.isdigit() or value != str(int(value)):
        raise _Damaged
    version = int(value)
    if not 1 <= version <= _MAX_KEY_VERSION:
        raise _Damaged
    return version


def _parse_payload(raw: bytes) -> _Payload:
    """Decode and validate the JSON payload; raise _Damaged on any deviation from the format."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _Damaged from None
    if not isinstance(doc, dict):
        raise _Damaged
    data_keys_doc = doc.get("data_keys")
    reserved_doc = doc.get("reserved")
    if not isinstance(data_keys_doc, dict) or not isinstance(reserved_doc, dict):
        raise _Damaged
    data_keys = {_version_key(v): _hex_field(k, 32) for v, k in data_keys_doc.items()}
    reserved = {_version_key(v): _int_field(n) for v, n in reserved_doc.items()}
    budget = _int_field(doc.get("nonce_budget"))
    current = _int_field(doc.get("current"))
    created = doc.get("created")
    if (
        not data_keys
        or current not in data_keys
        or not set(reserved) <= set(data_keys)
        or not 1 <= budget <= DEFAULT_NONCE_BUDGET
        or any(not 0 <= n <= budget for n in reserved.values())
        or not isinstance(created, str)
    ):
        raise _Damaged
    return _Payload(
        fs_id=_hex_field(doc.get("fs_id"), 16),
        master=_hex_field(doc.get("master"), 32),
        data_keys=data_keys,
        current=current,
        nonce_budget=budget,
        reserved=reserved,
        created=created,
    )


def _hkdf(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


def _scrypt(passphrase: bytes, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        passphrase, salt=salt, n=2**log_n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=KEK_BYTES
    )


def _derive_kek(path: Path, header_prefix: bytes, source: KekSource) -> bytes:
    """The KEK for an existing keyring, as its header's kdf fields say to derive it."""
    _, kdf, log_n, r, p, salt = _HEADER_PREFIX.unpack(header_prefix)
    if kdf == KDF_DIRECT:
        if source.key is None:
            raise VnafsError(
                f"keyring {path} was created with a key file, not a passphrase: "
                "pass --key-file FILE (or the systemd credential vnafs.key)"
            )
        return source.key
    if kdf != KDF_SCRYPT:
        raise VnafsError(f"keyring {path} uses an unknown key derivation ({kdf}): upgrade vnafs")
    if source.passphrase is None:
        raise VnafsError(
            f"keyring {path} was created with a passphrase, not a key file: "
            "pass --passphrase-env VAR"
        )
    # The header is only authenticated once the KEK exists, so bound the work it can ask for.
    if not (1 <= log_n <= MAX_SCRYPT_LOG_N and r >= 1 and p >= 1 and r * p <= 64):
        raise VnafsError(f"keyring {path} has invalid scrypt parameters: restore it from a backup")
    try:
        return _scrypt(source.passphrase, salt, log_n, r, p)
    except (ValueError, MemoryError):
        raise VnafsError(
            f"keyring {path} has invalid scrypt parameters: restore it from a backup"
        ) from None


class Keyring:
    """The unlocked keyring: derived HMAC keys, data keys, and the durable seal-count reservations.

    Thread-safe: sealing worker threads call `take_seal` concurrently; `_lock` serialises the
    counters and the file rewrites. Build one with `create` or `open`, not the constructor.
    """

    def __init__(
        self,
        path: Path,
        kek: bytes,
        header_prefix: bytes,
        payload: _Payload,
        *,
        reserve_chunk: int,
    ) -> None:
        if reserve_chunk < 1:
            raise ValueError("reserve_chunk must be at least 1")
        self._path = path
        self._kek = kek
        self._header_prefix = header_prefix
        self._payload = payload
        # A keyring created with a small budget (tests, or a cautious admin) must still open with
        # the default chunk, so a chunk never exceeds the budget.
        self._chunk = min(reserve_chunk, payload.nonce_budget)
        # Seals handed out since open, per version. Starting at the persisted reservation means
        # whatever a previous process reserved but did not use is treated as spent.
        self._used: dict[int, int] = dict(payload.reserved)
        self._lock = threading.Lock()
        self._name_key = _hkdf(payload.master, _INFO_NAME)
        self._dedup_key = _hkdf(payload.master, _INFO_DEDUP)
        # Copy-on-write, so `aead()` (every open) never waits behind a keyring fsync in take_seal.
        self._aeads: dict[int, AESGCM] = {v: AESGCM(k) for v, k in payload.data_keys.items()}

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        source: KekSource,
        *,
        nonce_budget: int = DEFAULT_NONCE_BUDGET,
        scrypt_log_n: int = DEFAULT_SCRYPT_LOG_N,
        reserve_chunk: int = DEFAULT_RESERVE_CHUNK,
    ) -> Keyring:
        """Create a new keyring at `path` (which must not exist) sealed under `source`."""
        path = Path(path)
        if not 1 <= nonce_budget <= DEFAULT_NONCE_BUDGET:
            raise ValueError("nonce_budget must be between 1 and 2**32")
        if path.exists() or path.is_symlink():
            raise VnafsError(
                f"refusing to overwrite existing keyring {path}: "
                "use 'vnafs mkfs' on an empty hot store directory"
            )
        if source.passphrase is not None:
            if not MIN_SCRYPT_LOG_N <= scrypt_log_n <= MAX_SCRYPT_LOG_N:
                raise VnafsError(
                    f"scrypt log N {scrypt_log_n} is out of range: "
                    f"choose a value from {MIN_SCRYPT_LOG_N} to {MAX_SCRYPT_LOG_N}"
                )
            salt = os.urandom(16)
            kek = _scrypt(source.passphrase, salt, scrypt_log_n, SCRYPT_R, SCRYPT_P)
            prefix = _HEADER_PREFIX.pack(
                KEYRING_MAGIC, KDF_SCRYPT, scrypt_log_n, SCRYPT_R, SCRYPT_P, salt
            )
        else:
            assert source.key is not None
            kek = source.key
            prefix = _HEADER_PREFIX.pack(KEYRING_MAGIC, KDF_DIRECT, 0, 0, 0, bytes(16))
        chunk = min(reserve_chunk, nonce_budget)
        payload = _Payload(
            fs_id=os.urandom(16),
            master=os.urandom(32),
            data_keys={1: os.urandom(32)},
            current=1,
            nonce_budget=nonce_budget,
            reserved={1: chunk},
            created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        keyring = cls(path, kek, prefix, payload, reserve_chunk=reserve_chunk)
        # The first chunk is reserved by this very write, so it is free to use.
        keyring._used[1] = 0
        keyring._write(payload, exclusive=True)
        return keyring

    @classmethod
    def open(
        cls,
        path: Path,
        source: KekSource,
        *,
        reserve_chunk: int = DEFAULT_RESERVE_CHUNK,
    ) -> Keyring:
        """Unlock the keyring at `path` with `source`."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise VnafsError(
                f"keyring {path} does not exist: restore it from the archive or a backup, or give "
                f"the hot store that 'vnafs mkfs' created"
            ) from None
        except OSError as err:
            raise VnafsError(
                f"cannot read keyring {path} ({err.strerror}): run vnafs as the hot store's owner"
            ) from None
        if len(data) < _HEADER_LEN + _TAG_LEN or data[:8] != KEYRING_MAGIC:
            raise VnafsError(f"{path} is not a vnafs keyring: check the hot store path")
        prefix = data[: _HEADER_PREFIX.size]
        kek = _derive_kek(path, prefix, source)
        nonce = data[_HEADER_PREFIX.size : _HEADER_LEN]
        try:
            raw = AESGCM(kek).decrypt(nonce, data[_HEADER_LEN:], data[:_HEADER_LEN])
        except InvalidTag:
            raise VnafsError(
                f"wrong key: {source.origin or 'the given key'} does not open this file system's "
                "keyring; use the key it was created with"
            ) from None
        try:
            version = json.loads(raw.decode("utf-8")).get("version")
        except (UnicodeDecodeError, ValueError, AttributeError):
            version = None
        if version != KEYRING_VERSION:
            raise VnafsError(
                f"keyring {path} is damaged or from another vnafs version: "
                "upgrade vnafs or restore the keyring from a backup"
            )
        try:
            payload = _parse_payload(raw)
        except _Damaged:
            raise VnafsError(
                f"keyring {path} is damaged: restore it from the archive or a backup"
            ) from None
        return cls(path, kek, prefix, payload, reserve_chunk=reserve_chunk)

    # -- read-only views --------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def fs_id(self) -> bytes:
        return self._payload.fs_id

    @property
    def name_key(self) -> bytes:
        return self._name_key

    @property
    def dedup_key(self) -> bytes:
        return self._dedup_key

    @property
    def current_version(self) -> int:
        with self._lock:
            return self._payload.current

    @property
    def nonce_budget(self) -> int:
        return self._payload.nonce_budget

    @property
    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._payload.data_keys)

    @property
    def reserved(self) -> dict[int, int]:
        """Seals reserved so far per data key version, as persisted in the keyring file."""
        with self._lock:
            return dict(self._payload.reserved)

    # -- keys --------------------------------------------------------------------------------------

    def aead(self, version: int) -> AESGCM:
        """The cipher for data key `version`, for opening envelopes sealed under it."""
        aead = self._aeads.get(version)
        if aead is None:
            raise IntegrityError(f"unknown data key version {version}")
        return aead

    def take_seal(self) -> tuple[int, AESGCM]:
        """Account for one seal under the current data key and return (version, cipher).

        The common path is a counter increment. When the reservation is used up, the next chunk is
        reserved (or a new data key added, if the chunk would exceed the budget) with a durable
        keyring rewrite before returning, so a seal is never handed out that the file does not
        cover.
        """
        with self._lock:
            version = self._payload.current
            if self._used.get(version, 0) >= self._payload.reserved.get(version, 0):
                version = self._reserve_locked()
            self._used[version] = self._used.get(version, 0) + 1
            return version, self._aeads[version]

    def add_data_key(self) -> int:
        """Add a new current data key version (rotation) durably; return its number."""
        with self._lock:
            payload = self._payload.copy()
            version = self._add_version(payload)
            self._commit_locked(payload)
            return version

    # -- internals ---------------------------------------------------------------------------------

    def _add_version(self, payload: _Payload) -> int:
        version = max(payload.data_keys) + 1
        if version > _MAX_KEY_VERSION:
            raise VnafsError("this file system has used every data key version: migrate its data")
        payload.data_keys[version] = os.urandom(32)
        payload.current = version
        # The new key starts with one chunk reserved so its first seal needs no second rewrite.
        payload.reserved[version] = self._chunk
        return version

    def _reserve_locked(self) -> int:
        payload = self._payload.copy()
        version = payload.current
        wanted = payload.reserved.get(version, 0) + self._chunk
        if wanted > payload.nonce_budget:
            version = self._add_version(payload)
        else:
            payload.reserved[version] = wanted
        self._commit_locked(payload)
        return version

    def _commit_locked(self, payload: _Payload) -> None:
        """Persist `payload`, then (only if that succeeded) make it the in-memory state."""
        self._write(payload, exclusive=False)
        new_versions = set(payload.data_keys) - set(self._aeads)
        if new_versions:
            aeads = dict(self._aeads)
            for version in new_versions:
                aeads[version] = AESGCM(payload.data_keys[version])
                self._used[version] = 0
            self._aeads = aeads
        self._payload = payload

    def _write(self, payload: _Payload, *, exclusive: bool) -> None:
        """Seal `payload` under the KEK and replace the keyring file atomically and durably."""
        nonce = os.urandom(_NONCE_LEN)
        header = self._header_prefix + nonce
        sealed = header + AESGCM(self._kek).encrypt(nonce, payload.to_json(), header)
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(tmp, flags, 0o600)
            try:
                _write_all(fd, sealed)
                os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                self._link_new(tmp)
            else:
                os.replace(tmp, self._path)
            _fsync_dir(self._path.parent)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise VnafsError(
                f"cannot write keyring {self._path} ({err.strerror}): "
                "make its directory writable and free space, then retry"
            ) from None

    def _link_new(self, tmp: Path) -> None:
        """Move `tmp` to the keyring path without ever replacing an existing keyring."""
        try:
            os.link(tmp, self._path)
        except FileExistsError:
            os.unlink(tmp)
            raise VnafsError(
                f"refusing to overwrite existing keyring {self._path}: "
                "use 'vnafs mkfs' on an empty hot store directory"
            ) from None
        except OSError as err:
            # Some file systems have no hard links; fall back to check-then-rename.
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            if self._path.exists():
                os.unlink(tmp)
                raise VnafsError(
                    f"refusing to overwrite existing keyring {self._path}: "
                    "use 'vnafs mkfs' on an empty hot store directory"
                ) from None
            os.rename(tmp, self._path)
        else:
            os.unlink(tmp)
