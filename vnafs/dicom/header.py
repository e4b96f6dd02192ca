"""Identity, completeness and header bytes of one stored DICOM file, read without its pixel data.

Why this exists: the DICOM index needs, for every file a writer closes, (1) whether it is DICOM
at all, (2) whether it is complete (no common writer writes to a temporary name and renames, see
DICOM.md, so a file may be read while it is still being written, or after a writer died), (3) the
identity keys the study views are built from, and (4) the file's raw header bytes, kept in the
index so that a later reindex needs no recall of the file. The files sit behind an encrypted
store whose reads are expensive, so this module reads the header (median 1.5 KB) in one or a
few reads, and after it only *seeks* over values: 8 bytes per element header or pixel data
fragment, never pixel data (a 20 MiB image costs 4 KiB of reads).

`parse` returns a `Parsed` with one `Status`:

- `NOT_DICOM`: no `DICM` at offset 128, and the bytes are not a data set without preamble:
  one is tried only when the first element looks like a group 0002 or 0008 tag (little or
  big endian, `_looks_like_dataset`), and accepted only when a SOP Instance UID comes out.
  Plain `force=True` is never used: pydicom "reads" READMEs, JSON and random bytes with it.
  Empty files and files under 8 bytes are NOT_DICOM.
- `INCOMPLETE` (only with `check_complete`): the structure shows that data is missing; see
  "The completeness check" below.
- `INVALID`: DICOM that cannot be parsed (`DICM` followed by no file meta information and no
  data set, a corrupt zlib stream, malformed encapsulated pixel data, ...), or whose SOP
  Instance, Study Instance or Series Instance UID is missing, empty or not a valid UID
  (`names.valid_uid`). The instance is still filled in when the three UIDs exist but one is
  invalid, so the caller can report it.
- `OK`: everything else.

The checks run in that order: a file that is both truncated and missing a UID is `INCOMPLETE`,
because a file cut before its UIDs (by a writer that has not finished) is missing them too.

The completeness check (DICOM.md, "pydicom for indexing"). pydicom parses truncated files
without an exception or a warning (it returns fewer elements), so completeness is checked from
the structure, with every value skipped by its declared length (`defer_size=0`):

- every element's declared length must end within the file, and the parse must end exactly at
  the file's size; a read that asks for bytes beyond the end (a cut inside a tag, a length or
  a value) counts as truncation;
- undefined-length sequences and items must be closed by their delimiters before the end;
- encapsulated pixel data is walked item by item (8 bytes read per fragment) and must end with
  its sequence delimiter; pydicom's own reader falls back to reading the whole rest of the
  file when that walk fails, which is why this module walks the pixel data itself;
- the file meta information must not end before its group length says, and the file's last
  byte must be readable (skipped values are never read, so a file that shrank after its size
  was taken would otherwise pass);
- a deflated data set must decompress to the end of its zlib stream (bytes after it are
  allowed, as pydicom allows them; only a cut gzip-style CRC/length trailer counts);
- an image storage SOP class (`needs_pixel_data`) must have pixel data. This also catches
  most cuts that fall exactly on an element boundary before the pixel data, which no
  structural check can see. Unlike the other INCOMPLETE verdicts it is no proof of a cut
  (stripped copies of images exist, and other archives show them), so `viewable` lets such an
  instance into the views, flagged, when its three UIDs are valid.

What `pydicom.config` is and is not used for. DICOM.md's check ran with
`settings.reading_validation_mode = RAISE`. That setting is global to the process (no reading
function takes it as an argument), so setting it here would change every other thread's
pydicom calls; this module never changes pydicom's configuration. During a structural read
RAISE only adds two things: (a) it raises on a missing delimiter at the end of the file, which
pydicom otherwise reports by rewinding to the start of the element, and the end-position check
above sees exactly that; (b) it raises when a file declares explicit VR but is implicit (or the
reverse), a known writer quirk that pydicom reads correctly and that says nothing about
completeness, so it is accepted. Value validation (RAISE's other effect) is not needed: the
identity values are decoded and validated here, from the raw bytes, so pydicom never validates
(and never warns about) a value.

Thread safety and silence: `parse` may run in several threads at once. Everything it builds is
per call. pydicom reports oddities both as log records and as `UserWarning`s, and some of its
messages contain values (PHI), so:

- log records of the `pydicom` logger are dropped while the emitting thread is inside `parse`
  (a logger filter with a thread-local flag): other threads' pydicom logging is unchanged;
- warnings cannot be silenced per thread (`warnings.catch_warnings` swaps process-wide state
  and is not thread-safe), so a process-wide filter ignores `UserWarning`s raised from
  pydicom's modules. It is installed at import, and `parse` puts it back at the front of the
  list whenever something has removed it or put another filter before it (a test runner's
  `catch_warnings`, `-W error`, which would also turn pydicom's warnings into exceptions in
  the middle of a parse). It also silences pydicom's `UserWarning`s for the rest of vnafs,
  which is what the no-PHI-in-logs rule wants anyway (pydicom puts values in some of them).

Besides `parse`, two functions read a whole file, for the index's comparison of two files with
one SOP Instance UID (docs/architecture.md section 8): `dataset_digest` (a keyed digest of the
data set bytes, everything after group 0002) and `dataset_diff` (the tags of the top-level
elements in which two data sets differ). They are called only when such copies exist.

Problems (`Parsed.problem`) never contain a DICOM value: only element keywords, byte offsets and
exception class names (exception messages can contain values). I/O errors raised by `fp` are
not DICOM problems: they propagate unchanged, even when pydicom caught and wrapped them.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import hmac
import io
import logging
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, cast

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.values import TEXT_VR_DELIMS, convert_SQ, converters

from vnafs.dicom.names import text_of, valid_uid

__all__ = [
    "MAX_HEADER", "NO_PIXEL_DATA", "Instance", "Parsed", "Status", "dataset_diff",
    "dataset_digest", "needs_pixel_data", "parse", "viewable",
]  # fmt: skip

# Header bytes longer than this are not kept in the index (the p90 header is 3.4 KB).
MAX_HEADER = 256 * 1024


class Status(enum.Enum):
    OK = "ok"
    NOT_DICOM = "not_dicom"
    INCOMPLETE = "incomplete"
    INVALID = "invalid"


# The one INCOMPLETE verdict that need not be a truncation: an image storage instance without
# pixel data. Such instances exist (stripped copies, test corpora): Orthanc and dcm4chee store
# and show them, so the views show them too, flagged (see `viewable`). It stays INCOMPLETE
# because it is also what a cut exactly between two elements before the pixel data looks like.
NO_PIXEL_DATA = "image storage SOP class without pixel data"


def viewable(status: Status, problem: str, sop_uid: str, study_uid: str,
             series_uid: str) -> bool:
    """Whether an instance with this verdict and these UIDs belongs in the DICOM views:
    complete ones, and those whose only fault is missing pixel data while their three UIDs
    are valid (a file cut before its UIDs lacks its pixel data too, and stays out). Truncated
    and invalid files stay out: a viewer reading a half-written file would show garbage."""
    if status is Status.OK:
        return True
    return (status is Status.INCOMPLETE and problem == NO_PIXEL_DATA
            and all(valid_uid(u) for u in (sop_uid, study_uid, series_uid)))


@dataclass(frozen=True, slots=True)
class Instance:
    """The identity of one instance. Every field is PHI: never log one."""

    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    # From the file meta information; for files without one, the encoding the data set was
    # found to use (implicit or explicit VR little endian, or explicit VR big endian).
    transfer_syntax: str
    patient_id: str
    # IssuerOfPatientID (0010,0021), or when that is empty the first item of
    # IssuerOfPatientIDQualifiersSequence (0010,0024): UniversalEntityID, else
    # LocalNamespaceEntityID.
    patient_issuer: str
    modality: str
    study_date: str  # "YYYYMMDD", or "" when absent or not a valid date
    study_time: str  # "HH[MM[SS[.F{1,6}]]]", or "" when absent or not a valid time
    accession: str
    # IssuerOfAccessionNumberSequence (0008,0051), first item: LocalNamespaceEntityID, else
    # UniversalEntityID; "" when absent.
    accession_issuer: str
    series_number: int | None
    instance_number: int | None
    charset: str  # SpecificCharacterSet values joined with "\\"; "" when absent


@dataclass(frozen=True, slots=True)
class Parsed:
    status: Status
    # None for NOT_DICOM, and when the identity could not be read (a UID missing, or the
    # header unparseable).
    instance: Instance | None
    # The file's bytes from offset 0 up to (not including) the top-level pixel data element,
    # or the whole file when it has none; b"" when longer than MAX_HEADER, for NOT_DICOM, and
    # when the header could not be parsed. A deflated file's pixel data cannot be cut out of
    # its zlib stream, so its header is the whole file (or b"" above MAX_HEADER).
    header: bytes
    # "" for OK and NOT_DICOM; otherwise a short reason that contains no DICOM value.
    problem: str


# --- tags and constants -----------------------------------------------------------------------

_SPECIFIC_CHARACTER_SET = 0x00080005
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_DATE = 0x00080020
_STUDY_TIME = 0x00080030
_ACCESSION_NUMBER = 0x00080050
_ISSUER_OF_ACCESSION_NUMBER_SEQUENCE = 0x00080051
_MODALITY = 0x00080060
_PATIENT_ID = 0x00100020
_ISSUER_OF_PATIENT_ID = 0x00100021
_ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE = 0x00100024
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_SERIES_NUMBER = 0x00200011
_INSTANCE_NUMBER = 0x00200013
_LOCAL_NAMESPACE_ENTITY_ID = 0x00400031
_UNIVERSAL_ENTITY_ID = 0x00400032
_META_GROUP_LENGTH = 0x00020000
_MEDIA_STORAGE_SOP_CLASS_UID = 0x00020002
_TRANSFER_SYNTAX_UID = 0x00020010
# Pixel Data, Float Pixel Data, Double Float Pixel Data: the same set pydicom's
# stop_before_pixels uses.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_UNDEFINED_LENGTH = 0xFFFFFFFF

# Values are never read by the structural parse, only skipped (DICOM.md). The identity values
# are read afterwards from their recorded offsets, which the prefix cache normally holds.
_DEFER_SIZE = 0
# The first read of a file; the cache doubles from there. 4 KiB covers about 90% of headers
# in one read, and is all a large image costs besides one 8-byte read per pixel fragment.
_FIRST_READ = 4096
# Compressed bytes inflated per step for deflated data sets.
_INFLATE_CHUNK = 16 * 1024
# CRC-32 and length of the inflated data, as gzip writes them after a deflate stream.
_GZIP_TRAILER = struct.Struct("<LL")
# The most inflated bytes kept in memory (the header must lie within them).
_INFLATE_KEEP = 64 * 1024 * 1024
# The shortest thing that can be a data set here: one 8-byte element header.
_MIN_SIZE = 8

# Deflated Explicit VR Little Endian, JPIP Referenced Deflate, JPIP HTJ2K Referenced Deflate:
# the whole data set after the file meta information is one raw deflate stream (PS3.5 A.5).
_DEFLATED = frozenset(
    {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)
_KNOWN_VRS = frozenset(str(vr) for vr in converters)

# --- image storage SOP classes --------------------------------------------------------------

_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
# Storage SOP classes whose IODs include pixel data (PS3.4 table B.5-1), as the UID components
# after _STORAGE_ROOT. An entry covers itself and every UID below it ("7" covers "7", "7.1",
# "7.4", not "77"). Built from the classes pydicom 3.0 names "... Image Storage", plus
# Segmentation, Parametric Map, Enhanced US Volume and the ophthalmic and corneal maps.
_IMAGE_FAMILIES = (
    "1", "2", "3", "4", "5", "6", "7", "12", "13", "14", "20", "30", "66.4", "77", "81.1",
    "82.1", "128", "130", "481.1", "481.23", "481.24", "501.1", "501.2", "601",
)  # fmt: skip
# Inside those families but without pixel data, or not known to have it: MR Spectroscopy,
# an unnamed retired XA class, Stereometric Relationship, OCT B-scan Volume Analysis.
_NOT_IMAGE = ("4.2", "12.77", "77.1.5.3", "77.1.5.8")


def _within(rest: str, families: tuple[str, ...]) -> bool:
    return any(rest == f or rest.startswith(f + ".") for f in families)


def needs_pixel_data(sop_class: str) -> bool:
    """Whether a complete instance of `sop_class` must contain pixel data.

    True for the image storage classes (see `_IMAGE_FAMILIES`). Everything else is False: SR
    and key object documents, presentation states, waveforms, encapsulated documents, RT
    plans, structure sets and records, registrations, raw data, measurements, private and
    unknown classes. RT Dose is False too: its pixel data is optional (a dose may be DVHs
    only). A class missing from the list only weakens the check (a cut just before its pixel
    data goes unnoticed); a wrong entry would mark every complete file of a class
    INCOMPLETE, so the list errs on the side of leaving classes out.
    """
    if not sop_class.startswith(_STORAGE_ROOT):
        return False
    rest = sop_class[len(_STORAGE_ROOT) :]
    return _within(rest, _IMAGE_FAMILIES) and not _within(rest, _NOT_IMAGE)


# --- silence ----------------------------------------------------------------------------------

_QUIET = threading.local()
_PYDICOM_LOGGER = logging.getLogger("pydicom")
_WARNING_MODULES = r"pydicom(\.|$)"


class _DropWhileParsing(logging.Filter):
    """Drops pydicom's log records emitted by a thread that is inside `parse`."""

    vnafs_header_quiet = True  # marks the filter so a module reload does not add a second

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_QUIET, "depth", 0)


def _install_log_filter() -> None:
    if not any(getattr(f, "vnafs_header_quiet", False) for f in _PYDICOM_LOGGER.filters):
        _PYDICOM_LOGGER.addFilter(_DropWhileParsing())


def _ensure_warning_filter() -> None:
    """Put the filter that ignores pydicom's UserWarnings first in the process-wide list.

    First, not just present: a filter before it (`simplefilter("error")`, `-W error`) would
    otherwise turn pydicom's warnings into exceptions in the middle of a parse, or show them.
    """
    filters = warnings.filters
    if filters:
        action, _message, category, module, _lineno = filters[0]
        if (
            action == "ignore"
            and category is UserWarning
            and module is not None
            and module.pattern == _WARNING_MODULES
        ):
            return
    # filterwarnings removes an equal entry before inserting at the front. Two threads may
    # both get here and leave it in the list twice: harmless.
    warnings.filterwarnings("ignore", category=UserWarning, module=_WARNING_MODULES)


_install_log_filter()
_ensure_warning_filter()


# --- reading ------------------------------------------------------------------------------------


class _Source:
    """The file-like object pydicom reads from: `fp` limited to `size` bytes.

    The first bytes of the file (up to MAX_HEADER) are read ahead into a cache in a few large
    reads, because pydicom makes one small read per tag, length and value; the cache is also
    where the header bytes and the identity values come from. Reads beyond the cache go to
    `fp` directly. Seeking beyond the end is allowed (that is how a value whose declared
    length runs past the end shows up). The flags record what the completeness check needs.
    """

    def __init__(self, fp: BinaryIO, size: int, *, cache_limit: int = MAX_HEADER) -> None:
        self._fp = fp
        self.size = size
        self._pos = 0
        self._cache = bytearray()
        self._cache_limit = min(cache_limit, size)
        # A read began before the end and asked for bytes beyond it.
        self.short_read = False
        # A read asked for bytes at or beyond the end. (A complete parse does this once, to
        # find the end; it only means truncation when an exception or a check follows.)
        self.eof_read = False
        # The furthest byte (exclusive) a read that began before the end asked for.
        self.need = 0
        # `fp` held fewer than `size` bytes.
        self.short_file = False
        # The first exception `fp` raised; parse re-raises it.
        self.error: BaseException | None = None

    # the file-like interface pydicom uses

    def read(self, n: int | None = -1) -> bytes:
        pos = self._pos
        if n is None or n < 0:
            n = max(self.size - pos, 0)
        end = pos + n
        if n and pos >= self.size:
            self.eof_read = True
        elif pos < self.size < end:
            self.short_read = True
        if pos < self.size:
            self.need = max(self.need, end)
        data = self.pread(pos, n)
        self._pos = pos + len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    # for this module

    def ran_out(self) -> bool:
        """Whether a read found less data than it asked for."""
        return self.short_read or self.eof_read or self.short_file

    def wanted(self) -> int:
        """The end of the data the reads and seeks so far expected: past `size` after ran_out
        (at least one byte past it, when all that is known is that a read found nothing)."""
        return max(self.need, self._pos, self.size + 1)

    def freeze(self) -> None:
        """Stop growing the cache: what follows the header is only skipped over, and reading
        it ahead (fragment headers of encapsulated pixel data, say) would read pixel data."""
        self._cache_limit = len(self._cache)

    def pread(self, pos: int, n: int) -> bytes:
        """Up to `n` bytes at `pos` (fewer at the end); does not move or set any flag."""
        end = min(pos + n, self.size)
        if pos >= end:
            return b""
        if pos < self._cache_limit:
            if end > len(self._cache):
                self._fill(min(max(end, 2 * len(self._cache), _FIRST_READ), self._cache_limit))
            cached = len(self._cache)
            if end <= cached:
                return bytes(self._cache[pos:end])
            if pos < cached:
                return bytes(self._cache[pos:]) + self._direct(cached, end - cached)
        return self._direct(pos, end - pos)

    def _fill(self, target: int) -> None:
        have = len(self._cache)
        if target <= have:
            return
        data = self._direct(have, target - have)
        self._cache += data
        if len(self._cache) < target:
            # fp is shorter than size: stop caching, later reads see the real end
            self._cache_limit = len(self._cache)

    def _direct(self, pos: int, n: int) -> bytes:
        chunks: list[bytes] = []
        try:
            self._fp.seek(pos)
            while n > 0:
                chunk = self._fp.read(n)
                if not chunk:
                    self.short_file = True
                    break
                chunks.append(chunk)
                n -= len(chunk)
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise
        return b"".join(chunks)


def _file(src: _Source) -> BinaryIO:
    """`src` as the file object pydicom's reader is typed to take (it only calls read, seek
    and tell)."""
    return cast(BinaryIO, src)


class _Problem(Exception):
    """A reason for INCOMPLETE or INVALID, raised inside this module; contains no value."""

    def __init__(self, status: Status, problem: str) -> None:
        super().__init__(problem)
        self.status = status
        self.problem = problem


def _truncated(need: int) -> _Problem:
    return _Problem(Status.INCOMPLETE, f"truncated: data ends before byte {need}")


def _pixel_tag_at(src: _Source, pos: int, little: bool) -> bool:
    raw = src.pread(pos, 4)
    if len(raw) < 4:
        return False
    group, elem = struct.unpack("<HH" if little else ">HH", raw)
    return (group << 16 | elem) in _PIXEL_TAGS


def _at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


def _not_group(group: int) -> Callable[[BaseTag, str | None, int], bool]:
    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        return int(tag) >> 16 != group

    return stop


def _looks_like_dataset(head: bytes, size: int) -> bool:
    """Whether `head` starts like a data set without preamble: a group 0002 or 0008 tag.

    Little endian: explicit VR (a known VR after the tag) or implicit VR (a 32-bit length
    that fits in the file). Big endian is explicit VR only, and has no group 0002 (file meta
    information is always little endian).
    """
    if len(head) < 8:
        return False
    explicit = head[4:6].decode("latin-1") in _KNOWN_VRS
    group_le = struct.unpack("<H", head[0:2])[0]
    if group_le in (0x0002, 0x0008):
        if explicit:
            return True
        length: int = struct.unpack("<L", head[4:8])[0]
        return length <= size - 8
    group_be = struct.unpack(">H", head[0:2])[0]
    return group_be == 0x0008 and explicit


# --- values -------------------------------------------------------------------------------------


def _raw(ds: Dataset, tag: int, src: _Source) -> bytes | None:
    """The raw value bytes of `tag` in `ds` (None when absent), without pydicom converting it.

    Conversion would validate the value under pydicom's global validation mode (warning with
    the value in it, or raising); the values are validated here instead.
    """
    elem = ds.get_item(tag, keep_deferred=True)
    if not isinstance(elem, RawDataElement):
        # absent, or a DataElement: pydicom converts only undefined-length SQ/UN while reading
        return None
    if elem.length == 0:
        return b""
    if elem.value is None:  # deferred: read from its recorded offset
        return src.pread(elem.value_tell, elem.length)
    return bytes(elem.value)


def _encodings(ds: Dataset) -> list[str]:
    charset = ds.original_character_set
    return [charset] if isinstance(charset, str) else list(charset)


def _decode(raw: bytes, encodings: list[str]) -> str:
    """Text decoded with the data set's character sets, losslessly.

    pydicom's `decode_bytes` replaces undecodable bytes with U+FFFD (after a warning), which
    would give two different IDs the same text. Without ISO 2022 escapes it only decodes with
    the first encoding, so that case is done strictly here; text that still does not decode
    goes through `text_of` (UTF-8 with surrogateescape), which keeps every byte distinct.
    """
    try:
        if b"\x1b" not in raw:
            return raw.decode(encodings[0])
        return decode_bytes(raw, encodings, TEXT_VR_DELIMS)
    except (LookupError, UnicodeError, ValueError):
        return text_of(raw)


def _text(ds: Dataset, tag: int, src: _Source, encodings: list[str], *, multi: bool) -> str:
    """A text value (SH, LO, UT) without trailing padding, as pydicom would give it."""
    raw = _raw(ds, tag, src)
    if not raw:
        return ""
    text = _decode(raw, encodings)
    parts = text.split("\\") if multi else [text]
    return text_of([part.rstrip("\0 ") for part in parts])


def _ascii(ds: Dataset, tag: int, src: _Source) -> str | None:
    """A value in the default repertoire (UI, CS, DA, TM, IS) without padding; None if absent."""
    raw = _raw(ds, tag, src)
    return None if raw is None else text_of(raw).rstrip("\0 ")


_IS_RE = re.compile(r"[+-]?\d{1,12}(\.0*)?", re.ASCII)
_DATE_RE = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})", re.ASCII)  # also ACR-NEMA YYYY.MM.DD
_TIME_RE = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?", re.ASCII)


def _number(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not _IS_RE.fullmatch(value):
        return None
    return int(value.split(".")[0])


def _date(value: str | None) -> str:
    match = _DATE_RE.fullmatch((value or "").strip())
    if match is None:
        return ""
    year, month, day = (int(g) for g in match.groups())
    try:
        datetime.date(year, month, day)
    except ValueError:
        return ""
    return "".join(match.groups())


def _time(value: str | None) -> str:
    match = _TIME_RE.fullmatch((value or "").strip())
    if match is None:
        return ""
    hour, minute, second, fraction = match.groups()
    if int(hour) > 23 or int(minute or 0) > 59 or int(second or 0) > 60:
        return ""
    return hour + (minute or "") + (second or "") + (fraction or "")


def _charset(ds: Dataset, src: _Source) -> str:
    raw = _raw(ds, _SPECIFIC_CHARACTER_SET, src)
    if not raw:
        return ""
    values = [v.strip("\0 ") for v in text_of(raw).split("\\")]
    return "\\".join(values) if any(values) else ""


def _first_item(ds: Dataset, tag: int, src: _Source, keyword: str) -> Dataset | None:
    """The first item of the sequence `tag`, or None when it is absent or empty."""
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return None
    items: list[Dataset]
    if isinstance(elem, DataElement):
        # undefined length: pydicom has parsed it
        items = list(elem.value) if isinstance(elem.value, Sequence) else []
    else:
        raw = _raw(ds, tag, src)
        if not raw:
            return None
        implicit, little = elem.is_implicit_VR, elem.is_little_endian
        if elem.VR == "UN":  # PS3.5 6.2.2: a UN value is encoded as implicit VR little endian
            implicit, little = True, True
        try:
            items = list(convert_SQ(raw, implicit, little, _encodings(ds), elem.value_tell))
        except Exception as exc:
            # An issuer that cannot be read must not silently become "": that would put
            # patients of different issuers together.
            raise _Problem(
                Status.INVALID, f"unparseable {keyword} ({type(exc).__name__})"
            ) from None
    return items[0] if items else None


def _issuer(item: Dataset | None, src: _Source, tags: tuple[int, int]) -> str:
    if item is None:
        return ""
    for tag in tags:
        text = _text(item, tag, src, _encodings(item), multi=False)
        if text:
            return text
    return ""


@dataclass(frozen=True, slots=True)
class _Identity:
    instance: Instance | None
    problem: str  # "" when the three UIDs are present and valid


def _identity(ds: Dataset, src: _Source, transfer_syntax: str) -> _Identity:
    uids = {
        "SOPInstanceUID": _ascii(ds, _SOP_INSTANCE_UID, src),
        "StudyInstanceUID": _ascii(ds, _STUDY_INSTANCE_UID, src),
        "SeriesInstanceUID": _ascii(ds, _SERIES_INSTANCE_UID, src),
    }
    for keyword, uid in uids.items():
        if not uid:
            return _Identity(None, f"missing {keyword}")
    encodings = _encodings(ds)
    issuer = _text(ds, _ISSUER_OF_PATIENT_ID, src, encodings, multi=True)
    if not issuer:
        qualifiers = _first_item(
            ds,
            _ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE,
            src,
            "IssuerOfPatientIDQualifiersSequence",
        )
        issuer = _issuer(qualifiers, src, (_UNIVERSAL_ENTITY_ID, _LOCAL_NAMESPACE_ENTITY_ID))
    accession_item = _first_item(
        ds, _ISSUER_OF_ACCESSION_NUMBER_SEQUENCE, src, "IssuerOfAccessionNumberSequence"
    )
    instance = Instance(
        sop_uid=uids["SOPInstanceUID"] or "",
        sop_class=_ascii(ds, _SOP_CLASS_UID, src) or "",
        study_uid=uids["StudyInstanceUID"] or "",
        series_uid=uids["SeriesInstanceUID"] or "",
        transfer_syntax=transfer_syntax,
        patient_id=_text(ds, _PATIENT_ID, src, encodings, multi=True),
        patient_issuer=issuer,
        modality=(_ascii(ds, _MODALITY, src) or "").strip(),
        study_date=_date(_ascii(ds, _STUDY_DATE, src)),
        study_time=_time(_ascii(ds, _STUDY_TIME, src)),
        accession=_text(ds, _ACCESSION_NUMBER, src, encodings, multi=True),
        accession_issuer=_issuer(
            accession_item, src, (_LOCAL_NAMESPACE_ENTITY_ID, _UNIVERSAL_ENTITY_ID)
        ),
        series_number=_number(_ascii(ds, _SERIES_NUMBER, src)),
        instance_number=_number(_ascii(ds, _INSTANCE_NUMBER, src)),
        charset=_charset(ds, src),
    )
    for keyword, uid in uids.items():
        if not valid_uid(uid or ""):
            return _Identity(instance, f"invalid {keyword}")
    return _Identity(instance, "")


# --- structure --------------------------------------------------------------------------------


def _skip_pixel_data(body: _Source, implicit: bool, little: bool) -> None:
    """Move past the pixel data element at the current position, reading only its headers."""
    order = "<" if little else ">"
    head = body.read(8)
    if len(head) < 8:
        raise _truncated(body.wanted())
    if implicit:
        length: int = struct.unpack(order + "L", head[4:8])[0]
    elif head[4:6].decode("latin-1") in EXPLICIT_VR_LENGTH_32:
        extra = body.read(4)
        if len(extra) < 4:
            raise _truncated(body.wanted())
        length = struct.unpack(order + "L", extra)[0]
    else:
        length = struct.unpack(order + "H", head[6:8])[0]
    if length != _UNDEFINED_LENGTH:
        body.seek(length, io.SEEK_CUR)
        return
    # Encapsulated (PS3.5 A.4): a Basic Offset Table item, fragment items, then a sequence
    # delimiter. Skipping each item by its length also gets past fragments whose compressed
    # data happens to contain the delimiter's bytes.
    while True:
        item = body.read(8)
        if len(item) < 8:
            raise _Problem(
                Status.INCOMPLETE,
                "truncated: encapsulated pixel data ends before its sequence delimiter",
            )
        group, elem, item_length = struct.unpack(order + "HHL", item)
        if (group, elem) == _SEQUENCE_DELIMITER:
            return
        if (group, elem) != _ITEM or item_length == _UNDEFINED_LENGTH:
            raise _Problem(Status.INVALID, "malformed encapsulated pixel data")
        body.seek(item_length, io.SEEK_CUR)


def _check_rest(body: _Source, implicit: bool, little: bool, has_pixels: bool) -> None:
    """Check everything from the current position (the pixel data or the end) to the end."""
    if has_pixels:
        _skip_pixel_data(body, implicit, little)
        if body.tell() < body.size:
            # Elements after the pixel data (trailing padding, signatures, private groups).
            try:
                read_dataset(_file(body), implicit, little, defer_size=_DEFER_SIZE)
            except Exception as exc:
                if body.ran_out():
                    raise _truncated(body.wanted()) from None
                raise _Problem(Status.INVALID, f"unparseable ({type(exc).__name__})") from None
    _check_end(body)


def _check_end(body: _Source) -> None:
    pos = body.tell()
    if body.short_file:
        raise _truncated(body.size)
    if body.short_read or pos > body.size:
        raise _truncated(body.wanted())
    if pos < body.size:
        # pydicom stops early without an exception when it reaches the end while looking
        # for a delimiter (it then rewinds to the element), and on a top-level item delimiter.
        if body.ran_out():
            raise _Problem(
                Status.INCOMPLETE, "truncated: an undefined-length element is not closed"
            )
        raise _Problem(Status.INVALID, f"unparseable (parsing stopped at byte {pos})")


def _inflate(src: _Source, start: int, check_complete: bool) -> tuple[bytes, bool]:
    """The inflated data set of a deflated transfer syntax (PS3.5 A.5), read from `start`.

    Returns the data and whether it is all of it: at most _INFLATE_KEEP bytes are kept (a
    small deflated file can inflate to a thousand times its size). With `check_complete` the
    rest is still inflated, and dropped, to see that the stream reaches its end.

    Bytes after the end of the stream are allowed (pydicom ignores them too): writers pad it
    to an even length, and some append a gzip-style CRC-32 and length (pydicom's
    image_dfl.dcm does). Only the start of such a trailer without its end is a truncation.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    kept = 0
    crc = total = 0
    pos = start
    try:
        while pos < src.size and not inflater.eof:
            if kept >= _INFLATE_KEEP and not check_complete:
                break
            chunk = src.pread(pos, _INFLATE_CHUNK)
            if not chunk:
                break
            pos += len(chunk)
            out = inflater.decompress(chunk)
            crc = zlib.crc32(out, crc)
            total += len(out)
            if kept < _INFLATE_KEEP:
                parts.append(out[: _INFLATE_KEEP - kept])
                kept += len(parts[-1])
    except zlib.error:
        raise _Problem(Status.INVALID, "unparseable (corrupt deflate stream)") from None
    if check_complete:
        if src.short_file:
            raise _truncated(src.size)
        if not inflater.eof:
            raise _Problem(Status.INCOMPLETE, "truncated: deflate stream ends early")
        rest = src.size - pos
        if rest <= _GZIP_TRAILER.size:
            trailing = inflater.unused_data + src.pread(pos, rest)
            trailer = _GZIP_TRAILER.pack(crc, total & 0xFFFFFFFF)
            if trailing not in (b"", b"\0", trailer) and trailer.startswith(trailing):
                raise _truncated(src.size + len(trailer) - len(trailing))
    return b"".join(parts), kept < _INFLATE_KEEP


# --- parse ------------------------------------------------------------------------------------


class _File:
    """One parse of one file: the header pass, then (optionally) the completeness check."""

    def __init__(self, src: _Source, has_dicm: bool, check_complete: bool) -> None:
        self.src = src
        self.has_dicm = has_dicm
        self.check = check_complete
        self.body = src  # the data set's bytes: the file, or the inflated data set
        self.ds = Dataset()
        self.meta = Dataset()
        self.meta_end = 0  # where the file meta information should end per its group length
        self.transfer_syntax = ""
        self.deflated = False
        self.inflated_all = True  # False: only the first _INFLATE_KEEP bytes are in body
        self.implicit = True
        self.little = True
        self.body_start = 0
        self.pixel_pos: int | None = None  # offset of the top-level pixel data element

    def _failed(self, exc: Exception, stream: _Source) -> _Problem:
        """The problem for an exception pydicom raised while reading `stream`."""
        if self.check and stream.ran_out():
            return _truncated(stream.wanted())
        return _Problem(Status.INVALID, f"unparseable ({type(exc).__name__})")

    def read_header(self) -> None:
        """Read the file meta information and the data set up to the pixel data."""
        src = self.src
        src.seek(132 if self.has_dicm else 0)
        try:
            self.meta = read_dataset(
                _file(src), False, True, stop_when=_not_group(0x0002), defer_size=_DEFER_SIZE
            )
        except Exception as exc:
            raise self._failed(exc, src) from None
        group_length = _raw(self.meta, _META_GROUP_LENGTH, src)
        if group_length is not None and len(group_length) == 4:
            start = 132 if self.has_dicm else 0
            self.meta_end = start + 12 + struct.unpack("<L", group_length)[0]
        if self.has_dicm and not len(self.meta):
            if src.tell() >= src.size:
                status = Status.INCOMPLETE if self.check else Status.INVALID
                raise _Problem(status, "truncated: file ends after the preamble")
            if not _looks_like_dataset(src.pread(src.tell(), 8), src.size - src.tell()):
                raise _Problem(Status.INVALID, "unparseable (no file meta information)")
        if src.pread(src.tell(), 2) == b"\0\0":
            # Command set elements (group 0000, always implicit VR little endian) before the
            # data set: pydicom's dcmread reads them separately, so does this.
            try:
                read_dataset(
                    _file(src), True, True, stop_when=_not_group(0x0000), defer_size=_DEFER_SIZE
                )
            except Exception as exc:
                raise self._failed(exc, src) from None
        self.body_start = src.tell()
        self._encoding()
        body = self.body
        try:
            self.ds = read_dataset(
                _file(body),
                self.implicit,
                self.little,
                stop_when=_at_pixels,
                defer_size=_DEFER_SIZE,
            )
        except Exception as exc:
            if not self.inflated_all:
                raise _Problem(Status.INVALID, "unparseable (inflated header too large)") from None
            raise self._failed(exc, body) from None
        # pydicom switches to the VR encoding it finds, whatever the transfer syntax says.
        implicit, little = self.ds.original_encoding
        self.implicit = bool(implicit) if implicit is not None else self.implicit
        self.little = bool(little) if little is not None else self.little
        src.freeze()
        if _pixel_tag_at(body, body.tell(), self.little):
            self.pixel_pos = body.tell()
        elif not self.inflated_all:
            raise _Problem(Status.INVALID, "unparseable (inflated header too large)")

    def _encoding(self) -> None:
        """The transfer syntax and the VR encoding of the data set (as pydicom's read_partial)."""
        src = self.src
        ts = _ascii(self.meta, _TRANSFER_SYNTAX_UID, src)
        if not ts:
            # No transfer syntax: guess from the first element like pydicom does. An explicit
            # VR after the tag means explicit VR; a big endian group reads as >= 1024.
            self.implicit, self.little = True, True
            first = src.pread(self.body_start, 6)
            if len(first) == 6 and first[4:6].decode("latin-1") in _KNOWN_VRS:
                self.implicit = False
                self.little = struct.unpack("<H", first[0:2])[0] < 1024
            self.transfer_syntax = str(
                ImplicitVRLittleEndian
                if self.implicit
                else ExplicitVRLittleEndian
                if self.little
                else ExplicitVRBigEndian
            )
            return
        self.transfer_syntax = ts
        self.implicit = ts == ImplicitVRLittleEndian
        self.little = ts != ExplicitVRBigEndian
        if ts in _DEFLATED:
            self.deflated = True
            data, self.inflated_all = _inflate(src, self.body_start, self.check)
            self.body = _Source(io.BytesIO(data), len(data), cache_limit=0)

    def has_sop_instance_uid(self) -> bool:
        return bool(_ascii(self.ds, _SOP_INSTANCE_UID, self.body))

    def header_bytes(self) -> bytes:
        if self.deflated:
            end = self.src.size  # the pixel data cannot be cut out of the zlib stream
        else:
            end = self.pixel_pos if self.pixel_pos is not None else self.src.size
        return self.src.pread(0, end) if end <= MAX_HEADER else b""

    def check_complete(self) -> None:
        src = self.src
        if self.meta_end > src.size:
            raise _truncated(self.meta_end)
        # Everything after the header is skipped, not read: make sure `fp` really holds
        # `size` bytes (it may have been truncated since its size was taken).
        if len(src.pread(src.size - 1, 1)) != 1:
            raise _truncated(src.size)
        if self.body_start >= src.size and not len(self.ds):
            raise _Problem(
                Status.INCOMPLETE, "truncated: no data set after the file meta information"
            )
        if self.inflated_all:
            # (otherwise only the zlib stream's end was checked: the structure after the
            # header is not in memory)
            _check_rest(self.body, self.implicit, self.little, self.pixel_pos is not None)
        if self.pixel_pos is None:
            sop_class = _ascii(self.ds, _SOP_CLASS_UID, self.body) or _ascii(
                self.meta, _MEDIA_STORAGE_SOP_CLASS_UID, src
            )
            if sop_class and needs_pixel_data(sop_class):
                raise _Problem(Status.INCOMPLETE, NO_PIXEL_DATA)


def parse(fp: BinaryIO, size: int, *, check_complete: bool = True) -> Parsed:
    """Classify one file and read its identity and header bytes.

    `fp` is a seekable binary file object at any position; `size` is the file's size, and
    nothing beyond it is read. With `check_complete=False` (re-parsing stored header bytes)
    only the identity is read: the status is OK unless the file is not DICOM, unparseable or
    has a missing or invalid UID. Thread-safe; logs nothing; see the module docstring.
    """
    _ensure_warning_filter()
    src = _Source(fp, size)
    _QUIET.depth = getattr(_QUIET, "depth", 0) + 1
    try:
        result = _parse(src, check_complete)
    finally:
        _QUIET.depth -= 1
    if src.error is not None:
        # pydicom may have caught or wrapped fp's exception: an I/O error is not a DICOM one
        raise src.error
    return result


def _parse(src: _Source, check_complete: bool) -> Parsed:
    not_dicom = Parsed(Status.NOT_DICOM, None, b"", "")
    if src.size < _MIN_SIZE:
        return not_dicom
    head = src.pread(0, 132)
    has_dicm = head[128:132] == b"DICM"
    if not has_dicm and not _looks_like_dataset(head, src.size):
        return not_dicom
    file = _File(src, has_dicm, check_complete)
    try:
        file.read_header()
    except _Problem as exc:
        if not has_dicm:
            return not_dicom
        return Parsed(exc.status, None, b"", exc.problem)
    if not has_dicm and not file.has_sop_instance_uid():
        return not_dicom
    header = file.header_bytes()
    try:
        identity = _identity(file.ds, file.body, file.transfer_syntax)
    except _Problem as exc:
        identity = _Identity(None, exc.problem)
    if check_complete:
        try:
            file.check_complete()
        except _Problem as exc:
            return Parsed(exc.status, identity.instance, header, exc.problem)
    if identity.problem:
        return Parsed(Status.INVALID, identity.instance, header, identity.problem)
    return Parsed(Status.OK, identity.instance, header, "")


# --- data sets: digest and element-by-element comparison --------------------------------------
#
# Two files with one SOP Instance UID are the same instance when their data sets (everything
# after the file meta information) are equal: every sender writes its own group 0002 (Orthanc,
# storescp and a copied original differ only there), so the file as a whole is no measure.
# The DICOM index asks for these only when a second copy of an instance appears, and reads the
# whole file for them (pixel data included): see docs/architecture.md section 8.

# Data set values up to this size are decoded and compared by value; larger ones (pixel data,
# big private blobs) are compared by a digest of their bytes, read in chunks.
_COMPARE_INLINE = 64 * 1024
_HASH_CHUNK = 1 << 20
_DATASET_DOMAIN = b"vnafs.dicom.dataset.v1\0"


class _Quiet:
    """While inside: pydicom's log records from this thread are dropped (see the module
    docstring), and its UserWarnings are ignored process-wide."""

    def __enter__(self) -> None:
        _ensure_warning_filter()
        _QUIET.depth = getattr(_QUIET, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _QUIET.depth -= 1


def _dataset_start(src: _Source) -> int:
    """Where the data set begins: after the preamble, the DICM marker and every group 0002
    element actually present (not where (0002,0000) says: some writers get it wrong)."""
    has_dicm = src.pread(128, 4) == b"DICM"
    start = 132 if has_dicm else 0
    src.seek(start)
    try:
        read_dataset(_file(src), False, True, stop_when=_not_group(0x0002), defer_size=0)
    except Exception:
        return start  # an unreadable file meta group: the data set is all that follows
    return src.tell()


def dataset_digest(fp: BinaryIO, size: int, key: bytes) -> str:
    """HMAC-SHA256 (hex) under `key` of the file's data set bytes: from the end of the file
    meta information (group 0002) to the end of the file. Two copies of one instance that
    differ only in their file meta information get the same digest.

    Reads the whole file (at about 1 GB/s of hashing); I/O errors of `fp` propagate. Keyed,
    because the digest of a data set would let anyone holding it confirm a guessed file."""
    with _Quiet():
        src = _Source(fp, size, cache_limit=_FIRST_READ)
        start = _dataset_start(src)
    if src.error is not None:
        raise src.error
    h = hmac.new(key, _DATASET_DOMAIN, "sha256")
    pos = start
    while pos < size:
        fp.seek(pos)
        chunk = fp.read(min(_HASH_CHUNK, size - pos))
        if not chunk:
            break  # the file shrank: the content digest check of the caller notices
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def tag_name(tag: int) -> str:
    """"(gggg,eeee)": how a data element is named to users. Never its value: values are PHI."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True, slots=True)
class _Large:
    """A value compared by digest: its length and the SHA-256 of its bytes."""

    length: int
    digest: bytes


class _Elements:
    """The top-level data elements of one file, outside group 0002, read for comparison."""

    def __init__(self) -> None:
        self.small: dict[int, RawDataElement | DataElement] = {}
        self.large: dict[int, _Large] = {}
        self.ds = Dataset()

    def tags(self) -> set[int]:
        return set(self.small) | set(self.large)


def _digest_span(src: _Source, start: int, end: int) -> _Large:
    h = hashlib.sha256()
    pos = start
    while pos < end:
        chunk = src.pread(pos, min(_HASH_CHUNK, end - pos))
        if not chunk:
            raise _Problem(Status.INCOMPLETE, "truncated")
        h.update(chunk)
        pos += len(chunk)
    return _Large(end - start, h.digest())


def _read_elements(fp: BinaryIO, size: int) -> _Elements | None:
    """Every top-level element of the data set (None when it cannot be read in full)."""
    src = _Source(fp, size)
    try:
        return _walk_elements(src)
    except Exception:
        if src.error is not None:
            raise src.error from None  # an I/O error is not a DICOM problem
        return None


def _walk_elements(src: _Source) -> _Elements | None:
    file = _File(src, src.pread(128, 4) == b"DICM", check_complete=False)
    file.read_header()
    if not file.inflated_all:
        return None  # a deflated data set too large to inflate in memory
    body, implicit, little = file.body, file.implicit, file.little
    out = _Elements()
    encoding: str | list[str] = "iso8859"
    pos = 0 if file.deflated else file.body_start  # offsets in the inflated data, if deflated
    while pos < body.size:
        body.seek(pos)
        elements = data_element_generator(_file(body), implicit, little, stop_when=_at_pixels,
                                          defer_size=_COMPARE_INLINE, encoding=encoding)
        for elem in elements:
            tag = int(elem.tag)
            if tag >> 16 == 0x0002:
                continue  # file meta information written into the data set: not compared
            if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
                # deferred: a large value, compared by the digest of its bytes; an
                # undefined-length one ends where the reader stopped (after its delimiter)
                end = (body.tell() if elem.length == _UNDEFINED_LENGTH
                       else elem.value_tell + elem.length)
                out.large[tag] = _digest_span(body, elem.value_tell, end)
                continue
            out.small[tag] = elem
            if tag == _SPECIFIC_CHARACTER_SET and isinstance(elem, RawDataElement):
                encoding = convert_encodings(convert_raw_data_element(elem).value)
        pos = body.tell()
        if not _pixel_tag_at(body, pos, little):
            break
        # Pixel data: walked item by item (as the completeness check does) and compared as
        # bytes. The value starts after the element header, whose form differs between
        # implicit and explicit VR, so two encodings of the same pixels compare equal.
        head = body.pread(pos, 6)
        group, elem_no = struct.unpack("<HH" if little else ">HH", head[:4])
        long_header = not implicit and head[4:6].decode("latin-1") in EXPLICIT_VR_LENGTH_32
        _skip_pixel_data(body, implicit, little)
        out.large[group << 16 | elem_no] = _digest_span(
            body, pos + (12 if long_header else 8), body.tell())
        pos = body.tell()
    out.ds = Dataset({BaseTag(t): e for t, e in out.small.items()})
    out.ds.set_original_encoding(implicit, little, encoding)
    return out


def _same_value(a: _Elements, b: _Elements, tag: int) -> bool:
    ea, eb = a.small[tag], b.small[tag]
    if (isinstance(ea, RawDataElement) and isinstance(eb, RawDataElement)
            and ea.VR == eb.VR and ea.is_little_endian == eb.is_little_endian
            and ea.value == eb.value):
        return True  # the same bytes: no need to decode
    try:
        return bool(a.ds[tag].value == b.ds[tag].value)
    except Exception:
        # A value pydicom cannot decode in one of them: only equal bytes are equal.
        va = ea.value if isinstance(ea, RawDataElement) else None
        vb = eb.value if isinstance(eb, RawDataElement) else None
        return va is not None and va == vb


def dataset_diff(a: BinaryIO, a_size: int, b: BinaryIO, b_size: int) -> list[str] | None:
    """The top-level data elements (as `tag_name`s, in tag order) in which the data sets of two
    files differ: present in one only, or with other values. Values are compared decoded (so
    implicit and explicit VR encodings of one value are equal), pixel data and values over
    64 KiB as bytes. Group 0002 is not compared. None when a file cannot be read in full
    (unparseable, or a deflated data set over 64 MiB). Never returns or logs a value."""
    with _Quiet():
        ea = _read_elements(a, a_size)
        eb = _read_elements(b, b_size) if ea is not None else None
        if ea is None or eb is None:
            return None
        differ = []
        for tag in sorted(ea.tags() | eb.tags()):
            if tag in ea.large or tag in eb.large:
                same = tag in ea.large and ea.large[tag] == eb.large.get(tag)
            elif tag in ea.small and tag in eb.small:
                same = _same_value(ea, eb, tag)
            else:
                same = False
            if not same:
                differ.append(tag_name(tag))
        return differ
