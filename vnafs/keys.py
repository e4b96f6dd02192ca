"""The key hierarchy: where the KEK comes from, and the keyring it unlocks.

The KEK never lives in the hot store; it comes from a key file, a passphrase (given in an
environment variable, on a file descriptor, typed at a prompt) or the output of a command, or a
systemd credential. It seals the keyring file (`docs/format.md` section 3), which holds the master
secret (the name and block-id HMAC keys derive from it) and the versioned AES-256-GCM data keys.

A keyring has one of two layouts. Version 1 (what `mkfs` writes) is sealed directly under its one
KEK. Version 2 seals the same payload under a random keyring key, which each of up to eight key
slots wraps under its own KEK (a site key, an offline recovery key, a passphrase), as LUKS does.
The first key operation (`rewrap`, `add_slot`, `remove_slot`, `rotate`) turns a version 1 keyring
into a version 2 one; replacing or adding a KEK never re-encrypts data. `rotate` adds a data key
and replaces the keyring key; `retire` removes an old data key once vnafs/reseal.py has shown
that nothing is sealed under it.

The keyring also enforces the per-key nonce budget (NIST SP 800-38D: at most 2^32 random-nonce
seals per key). Seal counts are reserved in chunks that are persisted *before* use, so a crash can
only waste part of a chunk, never let a key be used beyond its budget. This module knows nothing of
LMDB, trio or FUSE so that offline tools (fsck, restore) can use it without a mount.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import hashlib
import hmac
import json
import os
import re
import selectors
import shlex
import struct
import subprocess
import threading
import time
import unicodedata
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
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
# Version 1: one KEK seals the payload; byte 8 of the file is its kdf (0 or 1).
KEYRING_VERSION = 1
# Version 2: key slots wrap a random keyring key, which seals the payload; byte 8 is 2.
KEYRING_VERSION_SLOTS = 2
LAYOUT_SLOTS = 2
MAX_SLOTS = 8
MAX_LABEL_BYTES = 64
KDF_DIRECT = 0
KDF_SCRYPT = 1
KIND_KEY_FILE = "key-file"
KIND_PASSPHRASE = "passphrase"
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
# A version 2 slot record: number, kdf, log N, r, p, salt, created (Unix seconds), label
# length; the label, the 12-byte nonce and the 48-byte wrapped keyring key follow.
_SLOT_HEAD = struct.Struct(">BBBBB16sQB")
_WRAPPED_LEN = KEK_BYTES + _TAG_LEN
# Data key versions go into a u32 envelope field.
_MAX_KEY_VERSION = 2**32 - 1
_KEY_FILE_READ_LIMIT = 4096
# Passphrases from a file descriptor or a command, and a command's output.
_SECRET_READ_LIMIT = 64 * 1024
KEY_COMMAND_TIMEOUT = 120.0

_HEX64 = re.compile(rb"[0-9a-fA-F]{64}")
_LOWER_HEX = re.compile(r"[0-9a-f]+")

_INFO_NAME = b"vnafs name-hmac v1"
_INFO_DEDUP = b"vnafs block-id v1"
# Format 2 block ids (keyed BLAKE3): a key of their own, so ids of the two formats are unrelated.
_INFO_BLOCK_ID_BLAKE3 = b"vnafs block-id blake3 v2"
# The access audit's chain MAC (vnafs/audit/chain.py, docs/format.md 5.6).
_INFO_AUDIT = b"vnafs audit v1"


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
    *,
    passphrase_fd: int | None = None,
    key_command: str | None = None,
    passphrase_prompt: bool = False,
    prompt: str = "Passphrase: ",
    passphrase_only: bool = False,
) -> KekSource:
    """Pick the KEK source: --key-file, --passphrase-env, --passphrase-fd, --key-command,
    --passphrase-prompt, then the systemd credential.

    With `environ` None the variable of --passphrase-env is read from the process environment
    and then removed from it (and from the block /proc/PID/environ shows), so a daemon forked
    afterwards does not carry the passphrase. `passphrase_only` (for `vnafs key passwd`) takes a
    key command's output as a passphrase whatever it looks like and refuses a key file.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    if key_file:
        if passphrase_only:
            raise VnafsError("this command changes a passphrase, not a key file: "
                             "use 'vnafs key rewrap' to replace a key file")
        return KekSource(key=read_key_file(Path(key_file)), origin=f"key file {key_file}")
    if passphrase_env:
        return _env_passphrase(passphrase_env, env, forget=environ is None,
                               other="--key-file FILE")
    if passphrase_fd is not None:
        return KekSource(passphrase=read_passphrase_fd(passphrase_fd, "--passphrase-fd"),
                         origin=f"the passphrase read from file descriptor {passphrase_fd}")
    if key_command is not None:
        return key_command_source(key_command, "--key-command", passphrase_only=passphrase_only)
    if passphrase_prompt:
        return KekSource(passphrase=prompt_passphrase(prompt, flag="--passphrase-prompt"),
                         origin="the passphrase typed")
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir and not passphrase_only:
        cred = Path(cred_dir) / "vnafs.key"
        if cred.exists():
            return KekSource(key=read_key_file(cred), origin=f"systemd credential {cred}")
    raise VnafsError(
        "no key given: pass --key-file FILE or --passphrase-env VAR, "
        "or run under systemd with LoadCredential=vnafs.key"
    )


def resolve_new_kek_source(
    key_file: str | None = None,
    passphrase_env: str | None = None,
    *,
    passphrase_fd: int | None = None,
    key_command: str | None = None,
    passphrase_prompt: bool = False,
    passphrase_only: bool = False,
    environ: Mapping[str, str] | None = None,
    ask: Callable[[str], str] | None = None,
) -> KekSource:
    """The new KEK of `vnafs key rewrap`, `passwd` and `add-slot` (the --new-... options).

    A typed new passphrase is asked twice. A key command's output is a key when it is 64 hex
    digits or exactly 32 bytes (as a key file), a passphrase otherwise."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    if key_file:
        if passphrase_only:
            raise VnafsError("'vnafs key passwd' sets a passphrase: use 'vnafs key rewrap "
                             "--new-key-file FILE' to switch to a key file")
        return KekSource(key=read_key_file(Path(key_file)),
                         origin=f"new key file {key_file}")
    if passphrase_env:
        source = _env_passphrase(passphrase_env, env, forget=environ is None,
                                 other="--new-key-file FILE")
        return replace(source, origin=f"the new passphrase in ${passphrase_env}")
    if passphrase_fd is not None:
        return KekSource(passphrase=read_passphrase_fd(passphrase_fd, "--new-passphrase-fd"),
                         origin=f"the new passphrase read from file descriptor {passphrase_fd}")
    if key_command is not None:
        return key_command_source(key_command, "--new-key-command",
                                  passphrase_only=passphrase_only)
    if passphrase_prompt:
        return KekSource(passphrase=prompt_passphrase("New passphrase: ", confirm=True,
                                                      flag="--new-passphrase-prompt", ask=ask),
                         origin="the new passphrase typed")
    raise VnafsError("no new key given: pass --new-key-file FILE, --new-passphrase-prompt, "
                     "--new-passphrase-fd N, --new-passphrase-env VAR or --new-key-command CMD")


def _env_passphrase(name: str, env: Mapping[str, str], *, forget: bool,
                    other: str) -> KekSource:
    value = env.get(name)
    if not value:
        raise VnafsError(
            f"environment variable {name} is not set or is empty: "
            f"put the passphrase in {name} or pass {other}"
        )
    if forget:
        forget_environment_variable(name)
    # surrogateescape gives back the exact bytes of a non-UTF-8 environment value.
    return KekSource(
        passphrase=value.encode("utf-8", "surrogateescape"),
        origin=f"the passphrase in ${name}",
    )


def forget_environment_variable(name: str) -> None:
    """Remove `name` from this process's environment: from os.environ and the C library's
    environment (what child processes get), and overwrite it in the initial environment block
    that /proc/PID/environ shows (which no unsetenv touches), so a forked daemon does not keep
    the passphrase readable there."""
    os.environ.pop(name, None)
    with contextlib.suppress(OSError, ValueError):
        os.unsetenv(name)
    _scrub_initial_environ(name)


def _scrub_initial_environ(name: str) -> None:
    """Zero `name=value` in the environment block the kernel set up at exec (Linux; best
    effort: on any surprise it leaves the block alone)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat_line = f.read()
        # Fields after "(comm) ": index 0 is field 3; env_start and env_end are fields 50, 51.
        fields = stat_line[stat_line.rindex(b")") + 2 :].split()
        start, end = int(fields[47]), int(fields[48])
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
        if not start or len(block) > end - start:
            return
        needle = name.encode("utf-8", "surrogateescape") + b"="
        offset = 0
        hits: list[tuple[int, int]] = []
        for entry in block.split(b"\0"):
            if entry.startswith(needle):
                hits.append((start + offset, len(entry)))
            offset += len(entry) + 1
        if not hits:
            return
        # Writing through /proc/self/mem fails cleanly (OSError) where a raw write would crash.
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            for address, length in hits:
                mem.seek(address)
                mem.write(bytes(length))
    except (OSError, ValueError, IndexError):
        return


def read_passphrase_fd(fd: int, flag: str = "--passphrase-fd") -> bytes:
    """The first line of what file descriptor `fd` holds (without its newline), read a byte at
    a time so that a second read of the same descriptor gets the next line."""
    if fd < 0:
        raise VnafsError(f"{flag} {fd} is not a file descriptor: give a number such as 3 "
                         f"(with 3<FILE in the shell)")
    try:
        os.fstat(fd)
    except OSError:
        raise VnafsError(f"{flag} {fd}: file descriptor {fd} is not open: open it for "
                         f"reading, e.g. '{flag} {fd} {fd}<FILE' in the shell") from None
    buf = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1)
        except OSError as err:
            raise VnafsError(f"{flag} {fd}: cannot read file descriptor {fd} "
                             f"({err.strerror}): open it for reading") from None
        if not chunk or chunk == b"\n":
            break
        buf += chunk
        if len(buf) > _SECRET_READ_LIMIT:
            raise VnafsError(f"{flag} {fd}: the first line is longer than "
                             f"{_SECRET_READ_LIMIT // 1024} KiB: that is no passphrase")
    if buf.endswith(b"\r"):
        del buf[-1:]
    if not buf:
        raise VnafsError(f"{flag} {fd}: file descriptor {fd} gave an empty passphrase "
                         "(nothing before the first newline)")
    return bytes(buf)


def prompt_passphrase(prompt: str, *, confirm: bool = False, flag: str = "--passphrase-prompt",
                      ask: Callable[[str], str] | None = None) -> bytes:
    """Ask on the terminal (getpass: no echo); a new passphrase twice (`confirm`)."""
    if ask is None:
        try:
            os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))
        except OSError:
            raise VnafsError(f"{flag} needs a terminal: in scripts use --passphrase-fd N or "
                             "--key-command CMD (--new-... for the new passphrase)") from None
        ask = getpass.getpass
    try:
        first = ask(prompt)
    except EOFError:
        raise VnafsError("no passphrase was typed: nothing was changed") from None
    if not first:
        raise VnafsError("the passphrase is empty: type one (nothing was changed)")
    if confirm:
        try:
            again = ask("Repeat " + prompt[:1].lower() + prompt[1:])
        except EOFError:
            raise VnafsError("no passphrase was typed: nothing was changed") from None
        if not hmac.compare_digest(again.encode("utf-8", "surrogateescape"),
                                   first.encode("utf-8", "surrogateescape")):
            raise VnafsError("the two passphrases differ: nothing was changed")
    return first.encode("utf-8", "surrogateescape")


def run_key_command(command: str, flag: str = "--key-command",
                    timeout: float = KEY_COMMAND_TIMEOUT) -> tuple[str, bytes]:
    """Run `command` (split like a shell would, but run without one), with the terminal as its
    standard input and error; (program name, its standard output). Any failure is one line
    naming the program, never the command line, which may hold secrets."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise VnafsError(f"{flag} is not a valid command line ({exc}): quote it as for a "
                         "shell") from None
    if not argv:
        raise VnafsError(f"{flag} is empty: give the command that prints the key or passphrase")
    prog = argv[0]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, close_fds=True)
    except FileNotFoundError:
        raise VnafsError(f"{flag}: program {prog} not found: give its full path") from None
    except OSError as err:
        raise VnafsError(f"{flag}: cannot run {prog} ({err.strerror})") from None
    out = bytearray()
    problem = None
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    with proc, selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"did not finish within {timeout:.0f} s"
                break
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if len(out) > _SECRET_READ_LIMIT:
                problem = f"printed more than {_SECRET_READ_LIMIT // 1024} KiB"
                break
        if problem is not None:
            proc.kill()
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            problem = problem or f"did not finish within {timeout:.0f} s"
    if problem is not None:
        raise VnafsError(f"{flag}: {prog} {problem}: nothing was changed")
    if code < 0:
        raise VnafsError(f"{flag}: {prog} was killed by signal {-code}: nothing was changed")
    if code != 0:
        raise VnafsError(f"{flag}: {prog} failed (exit status {code}; its own message, if "
                         "any, is above): nothing was changed")
    if not out.strip():
        raise VnafsError(f"{flag}: {prog} printed nothing: it must print the key or "
                         "passphrase on its standard output")
    return prog, bytes(out)


def key_command_source(command: str, flag: str = "--key-command", *,
                       passphrase_only: bool = False) -> KekSource:
    """A KEK source from a command's output: a key when it is 64 hex digits (a newline
    around them allowed) or exactly 32 bytes, as a key file would be; otherwise a passphrase,
    without one trailing newline."""
    prog, out = run_key_command(command, flag)
    origin = f"the output of {flag} {prog}"
    if not passphrase_only:
        stripped = out.strip()
        if _HEX64.fullmatch(stripped):
            return KekSource(key=bytes.fromhex(stripped.decode("ascii")), origin=origin)
        if len(out) == KEK_BYTES:
            return KekSource(key=out, origin=origin)
    passphrase = out.removesuffix(b"\n").removesuffix(b"\r")
    if not passphrase:
        raise VnafsError(f"{flag}: {prog} printed an empty passphrase")
    return KekSource(passphrase=passphrase, origin=origin)


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
    # Versions removed by `vnafs key retire`, kept so that an envelope sealed under one is
    # reported as retired rather than unknown, and so that no number is ever used twice.
    retired: list[int] = field(default_factory=list)

    def to_json(self, version: int = KEYRING_VERSION) -> bytes:
        doc = {
            "version": version,
            "fs_id": self.fs_id.hex(),
            "master": self.master.hex(),
            "data_keys": {str(v): k.hex() for v, k in sorted(self.data_keys.items())},
            "current": self.current,
            "nonce_budget": self.nonce_budget,
            "reserved": {str(v): n for v, n in sorted(self.reserved.items())},
            "created": self.created,
        }
        if self.retired:
            doc["retired"] = sorted(self.retired)
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
            retired=list(self.retired),
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
    retired_doc = doc.get("retired", [])
    if not isinstance(retired_doc, list):
        raise _Damaged
    retired = [_version_key(str(_int_field(v))) for v in retired_doc]
    if (
        not data_keys
        or current not in data_keys
        or not set(reserved) <= set(data_keys)
        or not 1 <= budget <= DEFAULT_NONCE_BUDGET
        or any(not 0 <= n <= budget for n in reserved.values())
        or not isinstance(created, str)
        or len(set(retired)) != len(retired)
        or set(retired) & set(data_keys)
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
        retired=retired,
    )


def _hkdf(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


def _scrypt(passphrase: bytes, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        passphrase, salt=salt, n=2**log_n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=KEK_BYTES
    )


def _check_scrypt_params(path: Path, log_n: int, r: int, p: int) -> None:
    # The parameters are only authenticated once the KEK exists, so bound the work they ask for.
    if not (1 <= log_n <= MAX_SCRYPT_LOG_N and r >= 1 and p >= 1 and r * p <= 64):
        raise VnafsError(f"keyring {path} has invalid scrypt parameters: restore it from a backup")


def _needs_passphrase(path: Path) -> VnafsError:
    return VnafsError(
        f"keyring {path} was created with a passphrase, not a key file: "
        "pass --passphrase-env VAR (or --passphrase-prompt, --passphrase-fd N, --key-command CMD)"
    )


def _needs_key(path: Path) -> VnafsError:
    return VnafsError(
        f"keyring {path} was created with a key file, not a passphrase: "
        "pass --key-file FILE (or the systemd credential vnafs.key)"
    )


@dataclass(frozen=True)
class Slot:
    """One key slot: how to derive its KEK, and the keyring key wrapped under that KEK.

    A version 1 keyring is shown as one slot, number 0, built from its header (`wrapped` empty,
    `created` 0 when read without the key: the creation time is inside the sealed payload).
    Nothing here is secret; the wrapped key is useless without the slot's KEK.
    """

    number: int
    kdf: int
    log_n: int
    r: int
    p: int
    salt: bytes
    created: int
    label: str
    nonce: bytes = field(default=b"", repr=False)
    wrapped: bytes = field(default=b"", repr=False)

    @property
    def kind(self) -> str:
        return KIND_KEY_FILE if self.kdf == KDF_DIRECT else KIND_PASSPHRASE

    @property
    def created_iso(self) -> str | None:
        if not self.created:
            return None
        try:
            when = datetime.fromtimestamp(self.created, UTC)
        except (OverflowError, ValueError, OSError):  # read without a key: not authenticated
            return None
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")

    def head(self) -> bytes:
        """The record up to the wrapped key: the additional data of the wrapping."""
        label = self.label.encode("utf-8")
        return (_SLOT_HEAD.pack(self.number, self.kdf, self.log_n, self.r, self.p, self.salt,
                                self.created, len(label)) + label + self.nonce)

    def encode(self) -> bytes:
        return self.head() + self.wrapped

    def public(self) -> dict[str, Any]:
        """What `vnafs key slots` shows: never secret material."""
        out: dict[str, Any] = {"slot": self.number, "kind": self.kind, "label": self.label,
                               "created": self.created_iso}
        if self.kdf == KDF_SCRYPT:
            out["scrypt"] = {"log_n": self.log_n, "r": self.r, "p": self.p}
        return out


# Control and format characters (bidi overrides included) and line separators: a label is
# printed as is, so none of these may hide or rearrange what `vnafs key slots` shows.
_BAD_LABEL_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")


def check_label(label: str) -> str:
    """A slot label: UTF-8, at most 64 bytes, no control characters (it is printed as is)."""
    try:
        size = len(label.encode("utf-8"))
    except UnicodeEncodeError:
        raise VnafsError("the slot label is not valid UTF-8 text: choose another") from None
    if size > MAX_LABEL_BYTES:
        raise VnafsError(f"the slot label is {size} bytes long: at most {MAX_LABEL_BYTES} "
                         "(UTF-8) are allowed")
    if any(unicodedata.category(c) in _BAD_LABEL_CATEGORIES for c in label):
        raise VnafsError("the slot label holds control characters: use printable text")
    return label


def _v1_slot(prefix: bytes, created: int) -> Slot:
    _, kdf, log_n, r, p, salt = _HEADER_PREFIX.unpack(prefix)
    return Slot(0, kdf, log_n, r, p, salt, created, "")


def _parse_slots(path: Path, data: bytes) -> tuple[tuple[Slot, ...], int]:
    """The slot table of a version 2 file, and the offset of the payload nonce after it."""
    damaged = VnafsError(f"keyring {path} is damaged: restore it from the archive or a backup")
    if len(data) < 10:
        raise damaged
    count = data[9]
    if not 1 <= count <= MAX_SLOTS:
        raise damaged
    pos = 10
    slots: list[Slot] = []
    for _ in range(count):
        if len(data) < pos + _SLOT_HEAD.size:
            raise damaged
        number, kdf, log_n, r, p, salt, created, label_len = _SLOT_HEAD.unpack_from(data, pos)
        pos += _SLOT_HEAD.size
        end = pos + label_len + _NONCE_LEN + _WRAPPED_LEN
        if label_len > MAX_LABEL_BYTES or len(data) < end:
            raise damaged
        try:
            label = check_label(data[pos : pos + label_len].decode("utf-8"))
        except (UnicodeDecodeError, VnafsError):
            raise damaged from None
        pos += label_len
        nonce, wrapped = data[pos : pos + _NONCE_LEN], data[pos + _NONCE_LEN : end]
        pos = end
        if number >= MAX_SLOTS or (slots and number <= slots[-1].number):
            raise damaged
        if kdf not in (KDF_DIRECT, KDF_SCRYPT):
            raise VnafsError(f"keyring {path} slot {number} uses an unknown key derivation "
                             f"({kdf}): upgrade vnafs")
        if kdf == KDF_DIRECT and (log_n or r or p or any(salt)):
            raise damaged
        slots.append(Slot(number, kdf, log_n, r, p, salt, created, label, nonce, wrapped))
    if len(data) < pos + _NONCE_LEN + _TAG_LEN:
        raise damaged
    return tuple(slots), pos


def _slot_prefix(slots: list[Slot] | tuple[Slot, ...]) -> bytes:
    """Everything of a version 2 file before the payload nonce."""
    return (KEYRING_MAGIC + bytes([LAYOUT_SLOTS, len(slots)])
            + b"".join(slot.encode() for slot in slots))


def _slot_kek(path: Path, slot: Slot, source: KekSource) -> bytes | None:
    """The KEK `source` gives for `slot`; None when the source is of the other kind."""
    if slot.kdf == KDF_DIRECT:
        return source.key
    if slot.kdf != KDF_SCRYPT:
        raise VnafsError(f"keyring {path} uses an unknown key derivation ({slot.kdf}): "
                         "upgrade vnafs")
    if source.passphrase is None:
        return None
    _check_scrypt_params(path, slot.log_n, slot.r, slot.p)
    try:
        return _scrypt(source.passphrase, slot.salt, slot.log_n, slot.r, slot.p)
    except (ValueError, MemoryError):
        raise VnafsError(
            f"keyring {path} has invalid scrypt parameters: restore it from a backup"
        ) from None


def _unwrap(slot: Slot, kek: bytes) -> bytes | None:
    try:
        return AESGCM(kek).decrypt(slot.nonce, slot.wrapped, slot.head())
    except InvalidTag:
        return None


def _wrap(number: int, keyring_key: bytes, source: KekSource, label: str,
          scrypt_log_n: int, created: int | None = None) -> Slot:
    """A new slot `number` wrapping `keyring_key` under the KEK of `source`."""
    if source.passphrase is not None:
        if not MIN_SCRYPT_LOG_N <= scrypt_log_n <= MAX_SCRYPT_LOG_N:
            raise VnafsError(
                f"scrypt log N {scrypt_log_n} is out of range: "
                f"choose a value from {MIN_SCRYPT_LOG_N} to {MAX_SCRYPT_LOG_N}"
            )
        salt = os.urandom(16)
        kek = _scrypt(source.passphrase, salt, scrypt_log_n, SCRYPT_R, SCRYPT_P)
        kdf, log_n, r, p = KDF_SCRYPT, scrypt_log_n, SCRYPT_R, SCRYPT_P
    else:
        assert source.key is not None
        kek, salt = source.key, bytes(16)
        kdf, log_n, r, p = KDF_DIRECT, 0, 0, 0
    slot = Slot(number, kdf, log_n, r, p, salt, int(time.time()) if created is None else created,
                label, os.urandom(_NONCE_LEN))
    return replace(slot, wrapped=AESGCM(kek).encrypt(slot.nonce, keyring_key, slot.head()))


def _same_secret(a: KekSource, b: KekSource) -> bool:
    if a.key is not None and b.key is not None:
        return hmac.compare_digest(a.key, b.key)
    if a.passphrase is not None and b.passphrase is not None:
        return hmac.compare_digest(a.passphrase, b.passphrase)
    return False


def _epoch(created: str) -> int:
    try:
        when = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return 0
    return max(0, int(when.timestamp()))


def read_slots(path: Path) -> tuple[int, list[Slot]]:
    """(keyring version, slots) of the keyring at `path`, from its unauthenticated header: no
    key needed (a version 1 keyring's one slot then has no creation time). Opening the keyring
    with any key authenticates the whole table."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VnafsError(f"keyring {path} does not exist: give the hot store that 'vnafs mkfs' "
                         "created") from None
    except OSError as err:
        raise VnafsError(f"cannot read keyring {path} ({err.strerror}): run vnafs as the hot "
                         "store's owner") from None
    if len(data) < _HEADER_LEN + _TAG_LEN or data[:8] != KEYRING_MAGIC:
        raise VnafsError(f"{path} is not a vnafs keyring: check the hot store path")
    if data[8] == LAYOUT_SLOTS:
        return KEYRING_VERSION_SLOTS, list(_parse_slots(path, data)[0])
    if data[8] not in (KDF_DIRECT, KDF_SCRYPT):
        raise VnafsError(f"keyring {path} uses an unknown key derivation ({data[8]}): "
                         "upgrade vnafs")
    return KEYRING_VERSION, [_v1_slot(data[: _HEADER_PREFIX.size], 0)]


@dataclass(frozen=True)
class _Sealing:
    """How the payload is sealed. Version 1: `key` is the KEK and `prefix` the 28 header bytes
    before the nonce. Version 2: `key` is the keyring key and `prefix` the magic, layout byte,
    slot count and slot records. Either way the file is prefix || nonce || AES-256-GCM(key,
    nonce, payload, aad = prefix || nonce): replaced whole, never mutated."""

    version: int
    key: bytes = field(repr=False)
    prefix: bytes
    slots: tuple[Slot, ...]


class Keyring:
    """The unlocked keyring: derived HMAC keys, data keys, and the durable seal-count reservations.

    Thread-safe: sealing worker threads call `take_seal` concurrently; `_lock` serialises the
    counters and the file rewrites. Key operations (`rewrap`, `add_slot`, `remove_slot`) are
    serialised by `_admin` and run their KDFs outside `_lock`, so a passphrase's scrypt never
    holds up sealing. Build one with `create` or `open`, not the constructor.
    """

    def __init__(
        self,
        path: Path,
        sealing: _Sealing,
        payload: _Payload,
        *,
        reserve_chunk: int,
        opened_by: tuple[KekSource, int] | None = None,
    ) -> None:
        if reserve_chunk < 1:
            raise ValueError("reserve_chunk must be at least 1")
        self._path = path
        self._sealing = sealing
        self._payload = payload
        # A keyring created with a small budget (tests, or a cautious admin) must still open with
        # the default chunk, so a chunk never exceeds the budget.
        self._chunk = min(reserve_chunk, payload.nonce_budget)
        # Seals handed out since open, per version. Starting at the persisted reservation means
        # whatever a previous process reserved but did not use is treated as spent.
        self._used: dict[int, int] = dict(payload.reserved)
        self._lock = threading.Lock()
        self._admin = threading.Lock()
        self._name_key = _hkdf(payload.master, _INFO_NAME)
        self._dedup_key = _hkdf(payload.master, _INFO_DEDUP)
        self._blake3_key = _hkdf(payload.master, _INFO_BLOCK_ID_BLAKE3)
        self._audit_key = _hkdf(payload.master, _INFO_AUDIT)
        # Copy-on-write, so `aead()` (every open) never waits behind a keyring fsync in take_seal.
        self._aeads: dict[int, AESGCM] = {v: AESGCM(k) for v, k in payload.data_keys.items()}
        # The source this object was opened with and the slot it opened: a key operation given
        # that very source object need not run its KDF again. A weak reference: the keyring
        # keeps no passphrase alive.
        self._opened_slot: int | None = None
        self._opened_by: weakref.ref[KekSource] | None = None
        if opened_by is not None:
            self._opened_by = weakref.ref(opened_by[0])
            self._opened_slot = opened_by[1]

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
        """Create a new keyring (version 1: one KEK) at `path`, which must not exist."""
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
        now = datetime.now(UTC).replace(microsecond=0)
        payload = _Payload(
            fs_id=os.urandom(16),
            master=os.urandom(32),
            data_keys={1: os.urandom(32)},
            current=1,
            nonce_budget=nonce_budget,
            reserved={1: chunk},
            created=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        sealing = _Sealing(KEYRING_VERSION, kek, prefix,
                           (_v1_slot(prefix, int(now.timestamp())),))
        keyring = cls(path, sealing, payload, reserve_chunk=reserve_chunk,
                      opened_by=(source, 0))
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
        """Unlock the keyring at `path` with `source` (version 1, or any slot of version 2)."""
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
        if data[8] == LAYOUT_SLOTS:
            sealing, slot, raw = cls._open_slots(path, data, source)
        else:
            sealing, slot, raw = cls._open_v1(path, data, source)
        try:
            version = json.loads(raw.decode("utf-8")).get("version")
        except (UnicodeDecodeError, ValueError, AttributeError):
            version = None
        if version != sealing.version:
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
        if sealing.version == KEYRING_VERSION:
            sealing = replace(sealing, slots=(_v1_slot(sealing.prefix, _epoch(payload.created)),))
        return cls(path, sealing, payload, reserve_chunk=reserve_chunk,
                   opened_by=(source, slot))

    @staticmethod
    def _open_v1(path: Path, data: bytes, source: KekSource) -> tuple[_Sealing, int, bytes]:
        prefix = data[: _HEADER_PREFIX.size]
        kdf = prefix[8]
        if kdf not in (KDF_DIRECT, KDF_SCRYPT):
            raise VnafsError(
                f"keyring {path} uses an unknown key derivation ({kdf}): upgrade vnafs"
            )
        kek = _slot_kek(path, _v1_slot(prefix, 0), source)
        if kek is None:
            raise _needs_passphrase(path) if kdf == KDF_SCRYPT else _needs_key(path)
        nonce = data[_HEADER_PREFIX.size : _HEADER_LEN]
        try:
            raw = AESGCM(kek).decrypt(nonce, data[_HEADER_LEN:], data[:_HEADER_LEN])
        except InvalidTag:
            raise VnafsError(
                f"wrong key: {source.origin or 'the given key'} does not open this file system's "
                "keyring; use the key it was created with"
            ) from None
        return _Sealing(KEYRING_VERSION, kek, prefix, ()), 0, raw

    @staticmethod
    def _open_slots(path: Path, data: bytes, source: KekSource) -> tuple[_Sealing, int, bytes]:
        slots, end = _parse_slots(path, data)
        for slot in slots:
            kek = _slot_kek(path, slot, source)
            keyring_key = None if kek is None else _unwrap(slot, kek)
            if keyring_key is not None:
                break
        else:
            raise _wrong_key(path, slots, source)
        nonce = data[end : end + _NONCE_LEN]
        try:
            raw = AESGCM(keyring_key).decrypt(nonce, data[end + _NONCE_LEN :],
                                              data[: end + _NONCE_LEN])
        except InvalidTag:
            raise VnafsError(
                f"keyring {path} is damaged (slot {slot.number} opens, but the keyring does not "
                "authenticate): restore it from the archive or a backup"
            ) from None
        return _Sealing(KEYRING_VERSION_SLOTS, keyring_key, data[:end], slots), slot.number, raw

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
    def blake3_key(self) -> bytes:
        """The key of format 2 block ids (docs/format.md section 2)."""
        return self._blake3_key

    @property
    def audit_key(self) -> bytes:
        """The key of the access audit's chain MAC (docs/format.md section 5.6)."""
        return self._audit_key

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

    @property
    def format_version(self) -> int:
        """The keyring file's version: 1 (one KEK) or 2 (key slots)."""
        return self._sealing.version

    @property
    def slots(self) -> list[Slot]:
        return list(self._sealing.slots)

    @property
    def opened_slot(self) -> int | None:
        """The slot the key given to `open` (or `create`) opened."""
        return self._opened_slot

    # -- keys --------------------------------------------------------------------------------------

    @property
    def retired(self) -> list[int]:
        """Data key versions removed by `retire` (their keys are gone from the keyring)."""
        with self._lock:
            return sorted(self._payload.retired)

    def aead(self, version: int) -> AESGCM:
        """The cipher for data key `version`, for opening envelopes sealed under it."""
        aead = self._aeads.get(version)
        if aead is None:
            if version in self._payload.retired:
                raise IntegrityError(f"sealed under data key version {version}, which was "
                                     "retired")
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

    def rotate(self, auth: KekSource, *, drop_other_slots: bool = False,
               scrypt_log_n: int = DEFAULT_SCRYPT_LOG_N) -> tuple[int, Slot, list[Slot]]:
        """Start a new data key version for every seal from now on, and seal the keyring under a
        new keyring key that the slot `auth` opens wraps (same KEK, number, label and creation
        time). (new version, that slot, the slots dropped).

        The keyring key changes too because every holder of an old keyring copy and a KEK that
        opened it knows the old keyring key, and with it would read the new data key from any
        later copy of the keyring (the archive's, say). Other slots wrap the old keyring key and
        their KEKs are not at hand, so they can only be dropped (`drop_other_slots`) and added
        again with `add_slot`; without it, a keyring with other slots is refused unchanged."""
        with self._admin:
            sealing = self._sealing
            number = self._authenticate(sealing, auth)
            others = [s for s in sealing.slots if s.number != number]
            if others and not drop_other_slots:
                listed = ", ".join(str(s.number) + (f" ({s.label})" if s.label else "")
                                   for s in others)
                raise VnafsError(
                    f"rotation replaces the keyring key that every key slot wraps, and slots "
                    f"{listed} would stop opening the keyring: give --drop-other-slots and add "
                    "them again with 'vnafs key add-slot' (nothing was changed)")
            opened = next(s for s in sealing.slots if s.number == number)
            keyring_key = os.urandom(KEK_BYTES)
            slot = _wrap(number, keyring_key, auth, opened.label, scrypt_log_n,
                         created=opened.created)
            new_sealing = _Sealing(KEYRING_VERSION_SLOTS, keyring_key, _slot_prefix([slot]),
                                   (slot,))
            with self._lock:
                payload = self._payload.copy()
                version = self._add_version(payload)
                self._write(payload, exclusive=False, sealing=new_sealing)
                self._sealing = new_sealing
                self._install_locked(payload)
            self._opened_by = None
            return version, slot, others

    def retire(self, auth: KekSource, version: int) -> None:
        """Remove data key `version` from the keyring for good. The caller must have proved
        that nothing is sealed under it any more (vnafs/reseal.py `find_sealed`); this only
        refuses the current version and versions it does not hold."""
        with self._admin:
            self._authenticate(self._sealing, auth)
            with self._lock:
                self._check_retirable_locked(version)
                payload = self._payload.copy()
                del payload.data_keys[version]
                payload.reserved.pop(version, None)
                payload.retired.append(version)
                self._write(payload, exclusive=False)
                aeads = dict(self._aeads)
                aeads.pop(version, None)
                self._aeads = aeads
                self._payload = payload

    def check_retirable(self, version: int) -> None:
        """The one-line refusal of `retire(version)` for a version it can never remove (the
        current one, a retired one, one it never had), so a caller can refuse before the long
        check that nothing is sealed under it."""
        with self._lock:
            self._check_retirable_locked(version)

    def _check_retirable_locked(self, version: int) -> None:
        payload = self._payload
        if version == payload.current:
            raise VnafsError(f"data key version {version} is the current one: rotate first "
                             "(vnafs key rotate), then re-seal (nothing was changed)")
        if version in payload.retired:
            raise VnafsError(f"data key version {version} is retired already "
                             "(nothing was changed)")
        if version not in payload.data_keys:
            raise VnafsError(f"this keyring has no data key version {version}: 'vnafs status' "
                             "shows the versions in use (nothing was changed)")

    # -- key slots (docs/format.md section 3, docs/admin.md "Keys") -------------------------------

    def rewrap(self, old: KekSource, new: KekSource, *,
               scrypt_log_n: int = DEFAULT_SCRYPT_LOG_N) -> Slot:
        """Replace the KEK of the slot `old` opens by `new` (keeping its number and label); the
        payload and the other slots stay as they are. Writes a version 2 keyring."""
        with self._admin:
            sealing = self._sealing
            number = self._authenticate(sealing, old)
            if _same_secret(old, new):
                raise VnafsError("the new key is the same as the old one: nothing was changed")
            self._refuse_duplicate(sealing, new, skip=number)
            keyring_key, slots = self._slots_v2(sealing)
            at = next(i for i, s in enumerate(slots) if s.number == number)
            slots[at] = _wrap(number, keyring_key, new, slots[at].label, scrypt_log_n)
            self._commit_sealing(keyring_key, slots)
            return slots[at]

    def add_slot(self, auth: KekSource, new: KekSource, *, label: str = "",
                 scrypt_log_n: int = DEFAULT_SCRYPT_LOG_N) -> Slot:
        """Add a slot for `new` (the lowest free number), authorised by a key of any slot."""
        label = check_label(label)
        with self._admin:
            sealing = self._sealing
            if len(sealing.slots) >= MAX_SLOTS:
                raise VnafsError(f"keyring {self._path} has all {MAX_SLOTS} key slots in use: "
                                 "remove one first (vnafs key remove-slot)")
            taken = [s.number for s in sealing.slots if label and s.label == label]
            if taken:
                raise VnafsError(f"slot {taken[0]} is labelled {label!r} already: choose "
                                 "another label")
            self._authenticate(sealing, auth)
            self._refuse_duplicate(sealing, new)
            keyring_key, slots = self._slots_v2(sealing)
            number = min(set(range(MAX_SLOTS)) - {s.number for s in slots})
            slot = _wrap(number, keyring_key, new, label, scrypt_log_n)
            slots = sorted([*slots, slot], key=lambda s: s.number)
            self._commit_sealing(keyring_key, slots)
            return slot

    def remove_slot(self, auth: KekSource, *, number: int | None = None,
                    label: str | None = None) -> Slot:
        """Remove the slot given by `number` or `label`. Never the last slot, and `auth` must
        open another slot than the one removed: whoever removes a slot proves that a key which
        stays works, so no removal can lock everyone out."""
        if (number is None) == (label is None):
            raise VnafsError("give the slot to remove: --slot N or --label LABEL")
        with self._admin:
            sealing = self._sealing
            found = [s for s in sealing.slots
                     if (s.number == number if number is not None else s.label == label)]
            if not found:
                what = f"slot {number}" if number is not None else f"slot labelled {label!r}"
                raise VnafsError(f"keyring {self._path} has no {what}: 'vnafs key slots' "
                                 "lists them (nothing was changed)")
            target = found[0]
            if len(sealing.slots) == 1:
                raise VnafsError(f"slot {target.number} is the only key slot: removing it would "
                                 "leave no key that opens the file system; add another first "
                                 "(nothing was changed)")
            opened = self._authenticate(sealing, auth)
            if opened == target.number:
                raise VnafsError(
                    f"{auth.origin} opens slot {target.number}, the slot to remove: "
                    "authenticate with the key of a slot that stays, so that a working key is "
                    "known to remain (nothing was changed)")
            slots = [s for s in sealing.slots if s.number != target.number]
            self._commit_sealing(sealing.key, slots)
            return target

    def _authenticate(self, sealing: _Sealing, source: KekSource) -> int:
        """The slot `source` opens, or a one-line error (a wrong key, or the wrong kind)."""
        if (self._opened_by is not None and self._opened_by() is source
                and self._opened_slot is not None
                and any(s.number == self._opened_slot for s in sealing.slots)):
            return self._opened_slot
        number = self._opens(sealing, source)
        if number is None:
            raise _wrong_key(self._path, sealing.slots, source)
        return number

    def _opens(self, sealing: _Sealing, source: KekSource, skip: int | None = None) -> int | None:
        """The number of the slot `source` opens (other than `skip`), None if none."""
        for slot in sealing.slots:
            if slot.number == skip:
                continue
            kek = _slot_kek(self._path, slot, source)
            if kek is None:
                continue
            if sealing.version == KEYRING_VERSION:
                if hmac.compare_digest(kek, sealing.key):
                    return slot.number
                continue
            keyring_key = _unwrap(slot, kek)
            if keyring_key is not None and hmac.compare_digest(keyring_key, sealing.key):
                return slot.number
        return None

    def _refuse_duplicate(self, sealing: _Sealing, new: KekSource, skip: int | None = None
                          ) -> None:
        number = self._opens(sealing, new, skip)
        if number is not None:
            raise VnafsError(f"{new.origin} opens slot {number} already: give a key that is "
                             "not in the keyring yet (nothing was changed)")

    def _slots_v2(self, sealing: _Sealing) -> tuple[bytes, list[Slot]]:
        """(keyring key, slots) to build a version 2 keyring from. A version 1 keyring gets a
        fresh keyring key, wrapped into slot 0 under its KEK (scrypt's salt and parameters
        kept, so no passphrase is needed again), created when the file system was."""
        if sealing.version == KEYRING_VERSION_SLOTS:
            return sealing.key, list(sealing.slots)
        keyring_key = os.urandom(KEK_BYTES)
        first = replace(sealing.slots[0], nonce=os.urandom(_NONCE_LEN), wrapped=b"")
        first = replace(first, wrapped=AESGCM(sealing.key).encrypt(first.nonce, keyring_key,
                                                                   first.head()))
        return keyring_key, [first]

    def _commit_sealing(self, keyring_key: bytes, slots: list[Slot]) -> None:
        sealing = _Sealing(KEYRING_VERSION_SLOTS, keyring_key, _slot_prefix(slots), tuple(slots))
        with self._lock:
            self._write(self._payload, exclusive=False, sealing=sealing)
            self._sealing = sealing
        # The opening key may just have been rewrapped away or its slot removed: from now on
        # every key operation derives and checks its key in full.
        self._opened_by = None

    # -- internals ---------------------------------------------------------------------------------

    def _add_version(self, payload: _Payload) -> int:
        version = max([*payload.data_keys, *payload.retired]) + 1
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
        self._install_locked(payload)

    def _install_locked(self, payload: _Payload) -> None:
        """Make a payload just written the in-memory state (ciphers for any new version)."""
        new_versions = set(payload.data_keys) - set(self._aeads)
        if new_versions:
            aeads = dict(self._aeads)
            for version in new_versions:
                aeads[version] = AESGCM(payload.data_keys[version])
                self._used[version] = 0
            self._aeads = aeads
        self._payload = payload

    def _write(self, payload: _Payload, *, exclusive: bool,
               sealing: _Sealing | None = None) -> None:
        """Seal `payload` and replace the keyring file atomically and durably."""
        sealing = self._sealing if sealing is None else sealing
        nonce = os.urandom(_NONCE_LEN)
        aad = sealing.prefix + nonce
        sealed = aad + AESGCM(sealing.key).encrypt(nonce, payload.to_json(sealing.version), aad)
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


def _wrong_key(path: Path, slots: tuple[Slot, ...], source: KekSource) -> VnafsError:
    """Why `source` opens none of `slots`: the wrong kind of key, or a wrong one."""
    kinds = {s.kdf for s in slots}
    if source.key is None and kinds == {KDF_DIRECT}:
        return _needs_key(path)
    if source.passphrase is None and kinds == {KDF_SCRYPT}:
        return _needs_passphrase(path)
    what = source.origin or "the given key"
    if len(slots) == 1:
        return VnafsError(f"wrong key: {what} does not open this file system's keyring; use "
                          "the key it was created with or last rewrapped to")
    return VnafsError(f"wrong key: {what} opens none of the {len(slots)} key slots of this file "
                      "system's keyring ('vnafs key slots' lists them)")
