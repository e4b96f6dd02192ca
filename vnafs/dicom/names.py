"""File-system names built from DICOM values, for the study-level views under `/.dicom/`.

Why this exists: the views (`by-study/<StudyUID>/...`, `by-accession/<issuer>/<Accession~hash>/...`,
`by-patient/<issuer>/<PatientID~hash>/...`) turn values written by modalities into directory
names. Those values are free text in any character set; they may contain `/`, NUL, control
characters, characters Windows forbids, trailing dots, device names such as `CON`, or be empty.
The views are re-exported over Samba and NFS, so a name must be valid for Linux, for Windows
clients and for NFS at once, and two distinct values must never share a name: merging two
patients' studies in a listing is the one mistake a medical archive cannot make.

The rules (docs/architecture.md section 8, "Identity and conflicts"):

- UIDs are shown verbatim only when they are valid DICOM UIDs (`valid_uid`); a valid UID cannot
  contain anything unsafe and is what a user will search for. Anything else goes through
  `value_name`.
- `value_name` strips DICOM padding, normalises to NFC, replaces unsafe characters with `_`,
  caps the text at `max_bytes` bytes of UTF-8 and **always** appends `~` plus 10 hex digits of a
  hash of the *original* value (before any of those changes).

Why the suffix is always there, not only when sanitising changed something: sanitising is
lossy (`A/B` and `A_B` both become `A_B`; `abc` and `abc ` both become `abc`; long values that
share their first 80 bytes truncate to the same text) and Windows clients compare names without
case (`abc`, `ABC`). A suffix added only "when needed" would still let the unchanged value `A_B`
meet the changed value `A/B`. With the suffix always present the name determines (text, hash),
so two values share a name only if their hashes collide in 40 bits; names also differ under
case folding, and a value's name never changes with the rules' other inputs (stable names for
NFS handles, bookmarks and scripts).

Consequences worth knowing:

- Different strings are different values, even when DICOM would call them equal: `abc` and
  `abc ` (padding), or the NFC and NFD spellings of `é`, share the text part but not the hash.
  The caller decides identity; it should pass the same string it uses for its index key
  (normally with DICOM padding already stripped).
- With `key` (the filesystem's name key) the hash is an HMAC, so a name does not let anyone
  confirm a guess of a truncated or replaced value. Without a key, SHA-256 is used (tests, tools
  without a keyring). Both hash a domain tag first so these short tags are never a prefix of an
  HMAC the index uses as a lookup key.
- Names are PHI (they are built from PHI): never log them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from decimal import Decimal

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

__all__ = [
    "HASH_HEX_CHARS",
    "MAX_NAME_BYTES",
    "MAX_TEXT_BYTES",
    "UID_RE",
    "text_of",
    "uid_name",
    "valid_uid",
    "value_name",
]

# PS3.5 section 9.1: components are digits without leading zeros (except "0" itself), joined by
# dots, at most 64 characters. re.ASCII because `\d` would otherwise accept other scripts' digits
# (for example Arabic-Indic), which are not valid in a UID. Use with fullmatch: `$` alone would
# also accept a trailing newline.
UID_RE = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))*$", re.ASCII)
_UID_MAX_CHARS = 64

# NAME_MAX on Linux, and the longest component most NFS servers and Samba accept.
MAX_NAME_BYTES = 255
# 40 bits: a collision needs two values with the same sanitised text and the same 40-bit hash.
HASH_HEX_CHARS = 10
_SUFFIX_BYTES = 1 + HASH_HEX_CHARS  # "~" + hex
# The largest max_bytes that still keeps a whole name within NAME_MAX.
MAX_TEXT_BYTES = MAX_NAME_BYTES - _SUFFIX_BYTES

# Separates these short display hashes from every other HMAC computed under the same name key.
_HASH_DOMAIN = b"vnafs.dicom.name.v1\x00"

# DICOM pads values to even length with a trailing space (NUL for UIDs); leading spaces are
# insignificant for the text VRs these names come from.
_PAD_TRAILING = " \x00"
_PAD_LEADING = " "


def _unsafe_code_points() -> dict[int, str]:
    """Map every code point a name must not contain to `_` (a str.translate table)."""
    unsafe: set[int] = set()
    # C0 controls (includes NUL, tab, newline), DEL and C1 controls: invalid on Windows, and
    # they break terminals, logs and line-oriented tools on Linux.
    unsafe.update(range(0x00, 0x20))
    unsafe.update(range(0x7F, 0xA0))
    # The path separator, and the characters SMB/Windows forbid in a name.
    unsafe.update(ord(c) for c in '/\\:*?"<>|')
    # Lone surrogates cannot be encoded as UTF-8 at all; `text_of` produces them for bytes that
    # are not UTF-8 (surrogateescape).
    unsafe.update(range(0xD800, 0xE000))
    # Line and paragraph separators act as line breaks in listings; bidi embedding, override
    # and isolate controls reorder what a listing shows (a name could display the hash in the
    # middle, or another patient's ID). Beyond the DICOM.md list: cheap, and never needed in a
    # name (Arabic and Hebrew names display correctly without them).
    unsafe.update((0x2028, 0x2029))
    unsafe.update(range(0x202A, 0x202F))
    unsafe.update(range(0x2066, 0x206A))
    return dict.fromkeys(unsafe, "_")


_UNSAFE = _unsafe_code_points()

# Windows device names: reserved with or without an extension (`CON`, `con.txt`, `NUL .tar`),
# in any case. COM0/LPT0 and the superscript-digit forms are in Microsoft's current list too.
_DEVICE_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"]
)


def valid_uid(value: str) -> bool:
    """Whether `value` is a valid DICOM UID (PS3.5 9.1), so it can be shown verbatim."""
    return len(value) <= _UID_MAX_CHARS and UID_RE.fullmatch(value) is not None


def uid_name(value: str, *, key: bytes | None = None) -> str:
    """The name for a UID: the UID itself when valid, else `value_name(value, key=key)`.

    A valid UID contains only digits and dots, starts and ends with a digit and is at most 64
    bytes, so it is already a safe name. An invalid one (leading zeros, letters, padding, too
    long) still gets a safe name, and can never collide with a valid UID: its name ends with
    `~` and a hash, and a valid UID contains no `~`.
    """
    if valid_uid(value):
        return value
    return value_name(value, key=key)


def value_name(value: str, *, max_bytes: int = 80, key: bytes | None = None) -> str:
    """The file-system name for a free-text DICOM value (accession, issuer, patient ID, ...).

    Steps, in order:

    1. strip DICOM padding: trailing spaces and NULs, leading spaces;
    2. Unicode NFC, so text from different writers looks alike (the hash still sees the
       original, so NFC and NFD spellings get different names);
    3. replace with `_`: `/`, NUL and all C0 controls, DEL, C1 controls, `\\ : * ? " < > |`,
       lone surrogates, line/paragraph separators and bidi controls;
    4. truncate to at most `max_bytes` bytes of UTF-8, on a character boundary;
    5. replace each leading or trailing space or dot with `_` (a leading dot hides the entry
       on Linux; Windows drops trailing ones, which would change the name);
    6. prefix `_` when the text is empty, `.`, `..` or a Windows device name (`CON`, `lpt9`,
       `Con.txt`), re-truncating to `max_bytes`;
    7. append `~` and the first 10 lowercase hex digits of SHA-256 (or HMAC-SHA256 under
       `key`) of the original `value`. See the module docstring for why this is unconditional.

    The result is never empty, contains no unsafe character, never starts or ends with a
    space or dot, and is at most `max_bytes + 11` bytes of valid UTF-8 (at most 255 bytes, as
    `max_bytes` may not exceed `MAX_TEXT_BYTES`).
    """
    if not 1 <= max_bytes <= MAX_TEXT_BYTES:
        raise ValueError(f"max_bytes must be between 1 and {MAX_TEXT_BYTES}, not {max_bytes}")
    text = value.rstrip(_PAD_TRAILING).lstrip(_PAD_LEADING)
    # Normalise before replacing: surrogates pass through NFC unchanged, and replacing after
    # NFC cannot create a new composition (`_` composes with nothing).
    text = unicodedata.normalize("NFC", text).translate(_UNSAFE)
    text = _fix_ends(_truncate(text, max_bytes))
    if _needs_prefix(text):
        # The prefix may push the text past max_bytes; truncating again keeps the leading `_`,
        # which no device name starts with, so one round is enough.
        text = _fix_ends(_truncate("_" + text, max_bytes))
    return f"{text}~{_short_hash(value, key)}"


def text_of(value: object) -> str:
    """The text of a pydicom element value, for `value_name`.

    - `None` (absent or empty element) -> `""`.
    - `str` (pydicom has already decoded it with SpecificCharacterSet) -> unchanged.
    - `PersonName` -> `str(value)`: the decoded groups joined by `=` (alphabetic, ideographic,
      phonetic), for example `Yamada^Tarou=山田^太郎=やまだ^たろう`.
    - multi-valued (`MultiValue`, list, tuple) -> values joined by `\\`, the DICOM separator
      (which `value_name` then replaces).
    - bytes -> decoded as UTF-8 with `surrogateescape`. DICOM's default repertoire (ASCII) and
      ISO_IR 192 decode correctly; any other byte becomes a lone surrogate, which `value_name`
      shows as `_` but still hashes, so distinct byte strings keep distinct names. (Latin-1
      would also be lossless but would turn UTF-8 names into mojibake.)
    - numbers (`IS`, `DS`, int, float, Decimal) -> `str(value)` (pydicom keeps the original
      string of IS/DS values).

    Sequences and datasets have no text and raise `TypeError` (whose message names only the
    type: the value is PHI).
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "surrogateescape")
    if isinstance(value, Sequence | Dataset):
        raise TypeError(f"no text for a DICOM {type(value).__name__}")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(text_of(item) for item in value)
    if isinstance(value, int | float | Decimal):
        return str(value)
    raise TypeError(f"no text for a value of type {type(value).__name__}")


def _truncate(text: str, max_bytes: int) -> str:
    """At most `max_bytes` bytes of UTF-8, cut on a character boundary."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    # The input is valid UTF-8, so the only invalid sequence is a character cut at the end;
    # "ignore" drops exactly that partial character.
    return raw[:max_bytes].decode("utf-8", "ignore")


def _fix_ends(text: str) -> str:
    """Replace each leading and trailing space or dot with `_` (length is unchanged)."""
    lead = len(text) - len(text.lstrip(" ."))
    if lead == len(text):
        return "_" * lead
    trail = len(text) - len(text.rstrip(" ."))
    return "_" * lead + text[lead : len(text) - trail] + "_" * trail


def _needs_prefix(text: str) -> bool:
    if text in ("", ".", ".."):
        return True
    # Windows ignores the extension and trailing spaces when matching device names.
    stem = text.split(".", 1)[0].rstrip(" ")
    return stem.upper() in _DEVICE_NAMES


def _short_hash(value: str, key: bytes | None) -> str:
    # surrogatepass: every str, including lone surrogates from text_of, maps to distinct bytes.
    data = _HASH_DOMAIN + value.encode("utf-8", "surrogatepass")
    if key is None:
        digest = hashlib.sha256(data).hexdigest()
    else:
        if not key:
            raise ValueError("the name key must not be empty")
        digest = hmac.new(key, data, hashlib.sha256).hexdigest()
    return digest[:HASH_HEX_CHARS]
