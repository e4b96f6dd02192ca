"""Names for the study-level views: safe on Linux, Samba and NFS, and never shared by two values.

Real data only: pydicom's bundled test files (every UID, accession and patient ID in them) and
its character-set files (patient names in Latin, Greek, Cyrillic, Arabic, Hebrew, Japanese,
Korean and Chinese encodings), plus seeded random strings for the properties.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import unicodedata
import warnings
from decimal import Decimal
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID
from pydicom.valuerep import IS, DSfloat, PersonName

from vnafs.dicom.names import (
    HASH_HEX_CHARS,
    MAX_NAME_BYTES,
    MAX_TEXT_BYTES,
    text_of,
    uid_name,
    valid_uid,
    value_name,
)

# --- an independent checker ------------------------------------------------------------------

# Written from the rules in DICOM.md, not from the module, so the two can disagree.
FORBIDDEN = (
    {chr(c) for c in range(0x20)}
    | {chr(c) for c in range(0x7F, 0xA0)}
    | set('/\\:*?"<>|')
    | {chr(c) for c in range(0xD800, 0xE000)}
    | {"\u2028", "\u2029"}
    | {chr(c) for c in range(0x202A, 0x202F)}
    | {chr(c) for c in range(0x2066, 0x206A)}
)
DEVICES = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{n}" for p in ("COM", "LPT") for n in "123456789"}
SUFFIX = re.compile(rf"~[0-9a-f]{{{HASH_HEX_CHARS}}}\Z")


def assert_safe(name: str) -> None:
    """A name valid on Linux (NAME_MAX, no `/` or NUL), Windows/Samba and NFS."""
    assert isinstance(name, str) and name
    assert name not in (".", "..")
    raw = name.encode("utf-8")  # strict: raises on lone surrogates
    assert raw.decode("utf-8") == name
    assert len(raw) <= MAX_NAME_BYTES
    bad = FORBIDDEN.intersection(name)
    assert not bad, f"forbidden characters {sorted(map(hex, map(ord, bad)))}"
    assert name[0] not in " ." and name[-1] not in " ."
    stem = name.split(".", 1)[0].rstrip(" ").upper()
    assert stem not in DEVICES


def text_part(name: str) -> str:
    """The sanitised text of a value_name result (everything before `~` + hash)."""
    assert SUFFIX.search(name), name
    return name[: -(1 + HASH_HEX_CHARS)]


# --- UIDs ------------------------------------------------------------------------------------

VALID_UIDS = [
    "0",
    "1",
    "1.2.840.10008.1.2",
    "1.2.0.3",
    "2.25.329800735698586629295641978511506172918",
    "1." + "2" * 62,  # 64 characters
]
INVALID_UIDS = [
    "",
    "1.02",  # leading zero in a component
    "01.2",
    "00",
    "1..2",
    ".1",
    "1.",
    "1.2a",
    "abc",
    "1.2.3 ",  # DICOM padding left in
    "1.2.3\x00",
    "1.2.3\n",  # `$` alone would accept this
    " 1.2.3",
    "1.2/3",
    "1." + "2" * 63,  # 65 characters
    "1\u0661.2",  # Arabic-Indic digit after a 1: `\d` without re.ASCII would accept it
    "1.2\uff11",  # fullwidth digit
    "\u0661.\u0662",
    "-1.2",
]


@pytest.mark.parametrize("uid", VALID_UIDS)
def test_valid_uid_is_kept_verbatim(uid: str) -> None:
    assert valid_uid(uid)
    assert uid_name(uid) == uid
    assert uid_name(uid, key=b"k" * 32) == uid
    assert_safe(uid)


@pytest.mark.parametrize("uid", INVALID_UIDS)
def test_invalid_uid_gets_a_sanitised_name(uid: str) -> None:
    assert not valid_uid(uid)
    name = uid_name(uid)
    assert_safe(name)
    assert name == value_name(uid)
    assert name != uid
    # A valid UID has no `~`, so an invalid UID's name never equals any valid UID.
    assert "~" in name and not valid_uid(name)


def test_invalid_uid_names_are_distinct() -> None:
    names = [uid_name(u) for u in INVALID_UIDS]
    assert len(set(names)) == len(names)
    assert not set(names) & set(VALID_UIDS)


def test_uid_name_passes_the_key() -> None:
    assert uid_name("1.02", key=b"a" * 32) == value_name("1.02", key=b"a" * 32)
    assert uid_name("1.02", key=b"a" * 32) != uid_name("1.02")


# --- sanitising -------------------------------------------------------------------------------

REPLACED = [
    "/", "\\", ":", "*", "?", '"', "<", ">", "|",
    "\x00", "\x01", "\t", "\n", "\r", "\x1b", "\x1f",  # C0 controls
    "\x7f",  # DEL
    "\x80", "\x85", "\x9f",  # C1 controls
    "\udc80", "\ud800",  # lone surrogates (from bytes that are not UTF-8)
    "\u2028", "\u2029", "\u202e", "\u2066",  # line separators, bidi override/isolate
]


@pytest.mark.parametrize("char", REPLACED, ids=lambda c: f"U+{ord(c):04X}")
def test_unsafe_character_is_replaced(char: str) -> None:
    name = value_name(f"a{char}b")
    assert_safe(name)
    assert text_part(name) == "a_b"


@pytest.mark.parametrize("char", ["~", "^", "=", "#", "%", "&", "'", "-", "+", ",", ";", "é",
                                  "\u00a0", "\u200d", "山", "😀"])
def test_safe_character_is_kept(char: str) -> None:
    assert text_part(value_name(f"a{char}b")) == f"a{char}b"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("ABC ", "ABC"),  # DICOM pads to even length with a space
        ("ABC\x00", "ABC"),  # ... or a NUL (UIDs)
        ("ABC \x00 ", "ABC"),
        ("  ABC", "ABC"),  # leading spaces are insignificant too
        ("A B", "A B"),  # inner spaces are text
        ("\x00ABC", "_ABC"),  # a leading NUL is not padding
        (".hidden", "_hidden"),  # a leading dot would hide the entry on Linux
        ("...x", "___x"),
        ("name.", "name_"),  # Windows drops trailing dots: the name would change
        ("name..", "name__"),
        ("a . ", "a__"),  # after stripping the padding space, " ." trails
        (" . x . ", "__x__"),
        ("\t x", "_ x"),
    ],
)
def test_padding_and_ends(value: str, text: str) -> None:
    name = value_name(value)
    assert_safe(name)
    assert text_part(name) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("", "_"),
        (" ", "_"),  # only padding: empty after stripping
        ("\x00\x00", "_"),
        (".", "_"),
        ("..", "__"),
        ("...", "___"),
    ],
)
def test_empty_and_dot_names(value: str, text: str) -> None:
    name = value_name(value)
    assert_safe(name)
    assert text_part(name) == text


@pytest.mark.parametrize(
    "value",
    ["CON", "con", "Con", "PRN", "AUX", "NUL", "nul", "COM1", "com9", "LPT1", "LPT9", "lpt9",
     "con.txt", "CON.txt", "NUL.tar.gz", "CON .txt", "COM0", "COM\u00b9", "LPT\u00b3", "CONIN$"],
)
def test_windows_device_names_get_a_prefix(value: str) -> None:
    name = value_name(value)
    assert_safe(name)
    assert text_part(name) == "_" + value


@pytest.mark.parametrize("value", ["CONSOLE", "COM10", "LPT", "COMA", "xCON", "CON_", "AUXILIARY"])
def test_names_that_only_look_like_devices_are_kept(value: str) -> None:
    assert text_part(value_name(value)) == value


def test_device_prefix_respects_max_bytes() -> None:
    value = "CON." + "x" * 100
    name = value_name(value, max_bytes=20)
    assert_safe(name)
    assert text_part(name) == "_CON." + "x" * 15


def test_nfc_composes_but_the_hash_sees_the_original() -> None:
    nfd, nfc = "e\u0301", "\u00e9"
    assert unicodedata.normalize("NFC", nfd) == nfc
    assert text_part(value_name(nfd)) == nfc
    assert text_part(value_name(nfc)) == nfc
    # Different strings are different values (module docstring): same text, different hash.
    assert value_name(nfd) != value_name(nfc)
    # A name from the archive of another writer stays the same name: NFC-only text is kept.
    assert text_part(value_name("Jérôme")) == "Jérôme"
    assert text_part(value_name(unicodedata.normalize("NFD", "Jérôme"))) == "Jérôme"


# --- no collisions ----------------------------------------------------------------------------

TRICKY = ["A/B", "A_B", "A\\B", "A:B", "abc", "ABC", "Abc", "abc ", "abc\x00", "abc  ", " abc",
          "", " ", ".", "..", "_", "__", "CON", "_CON", "con", "e\u0301", "\u00e9", "1.2.3",
          "1.2.3 ", "x" * 80, "x" * 81, "x" * 200]


def test_tricky_values_never_collide() -> None:
    names = [value_name(v) for v in TRICKY]
    for name in names:
        assert_safe(name)
    assert len(set(names)) == len(TRICKY)
    # Windows clients compare names without case: still distinct.
    assert len({n.casefold() for n in names}) == len(TRICKY)


def test_every_unsafe_variant_of_one_value_is_distinct() -> None:
    """All these sanitise to the same text `A_B`; only the hash tells them apart."""
    values = ["A_B"] + [f"A{c}B" for c in REPLACED]
    names = [value_name(v) for v in values]
    assert {text_part(n) for n in names} == {"A_B"}
    assert len(set(names)) == len(values)


def test_long_values_with_a_common_prefix_are_distinct() -> None:
    prefix = "ACC" * 40  # 120 bytes: far beyond max_bytes
    values = [prefix + str(i) for i in range(1000)]
    names = [value_name(v) for v in values]
    assert len({text_part(n) for n in names}) == 1
    assert len(set(names)) == len(values)


def _random_values(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    pool = (
        list("abcXYZ019 ._-~^=")
        + list('/\\:*?"<>|')
        + [chr(c) for c in range(0x20)] + ["\x7f", "\x80", "\x9f", "\u00a0"]
        + list("éÄßΩЖжλ山田太郎やまだ홍길동قبانيשרוןﾔﾏﾀﾞ")
        + ["e\u0301", "\u0301", "😀", "👩\u200d⚕️", "\udcff", "\ud800", "\u202e", "\u2028"]
    )
    values = []
    for _ in range(count):
        length = rng.choice([0, 1, 2, 3, 5, 10, 20, 40, 79, 80, 81, 120])
        chars = []
        for _ in range(length):
            if rng.random() < 0.1:
                chars.append(chr(rng.randrange(0x110000)))  # any code point at all
            else:
                chars.append(rng.choice(pool))
        values.append("".join(chars))
    # Add the same values with DICOM padding, case changes and device names in front.
    values += [v + " " for v in values[:300]] + [v.upper() for v in values[300:600]]
    values += [f"CON.{v}" for v in values[600:700]] + ["." + v for v in values[700:800]]
    return values


def test_random_values_give_safe_distinct_names() -> None:
    values = set(_random_values(seed=20261123, count=4000))
    assert len(values) > 4000
    names: dict[str, str] = {}
    for value in values:
        name = value_name(value)
        assert_safe(name)
        assert len(text_part(name).encode("utf-8")) <= 80
        assert names.setdefault(name, value) == value, "two values share a name"
    assert len(names) == len(values)


def test_random_values_with_other_limits() -> None:
    values = _random_values(seed=7, count=800)
    for max_bytes in (1, 2, 3, 4, 5, 17, MAX_TEXT_BYTES):
        for value in values:
            name = value_name(value, max_bytes=max_bytes)
            assert_safe(name)
            assert len(text_part(name).encode("utf-8")) <= max_bytes


# --- truncation -------------------------------------------------------------------------------

MULTIBYTE = [
    "山田^太郎=やまだ^たろう" * 10,  # 3-byte characters
    "قباني^لنزار" * 10,  # 2-byte characters
    "😀🏥🩻" * 30,  # 4-byte characters
    "Äneas^Rüdiger=Διονυσιος=Люкceмбypг=홍길동😀" * 5,  # mixed widths
]


def _longest_prefix(text: str, max_bytes: int) -> str:
    out = ""
    for ch in text:
        if len((out + ch).encode("utf-8")) > max_bytes:
            break
        out += ch
    return out


@pytest.mark.parametrize("value", MULTIBYTE, ids=["japanese", "arabic", "emoji", "mixed"])
def test_truncation_on_a_character_boundary(value: str) -> None:
    for max_bytes in range(1, 101):
        name = value_name(value, max_bytes=max_bytes)
        assert_safe(name)
        text = text_part(name)
        assert len(text.encode("utf-8")) <= max_bytes
        # As long as possible: the longest prefix that fits, or `_` when not even one
        # character fits.
        assert text == (_longest_prefix(value, max_bytes) or "_")


def test_default_limit_is_80_bytes_and_255_overall() -> None:
    value = "x" * 1000
    assert text_part(value_name(value)) == "x" * 80
    name = value_name(value, max_bytes=MAX_TEXT_BYTES)
    assert len(name.encode("utf-8")) == MAX_NAME_BYTES
    assert_safe(name)


@pytest.mark.parametrize("max_bytes", [0, -1, MAX_TEXT_BYTES + 1, 255])
def test_max_bytes_out_of_range(max_bytes: int) -> None:
    with pytest.raises(ValueError):
        value_name("x", max_bytes=max_bytes)


def test_truncation_does_not_leave_a_trailing_dot() -> None:
    name = value_name("abc." + "d" * 100, max_bytes=4)
    assert text_part(name) == "abc_"


# --- hash, key, stability ---------------------------------------------------------------------

def test_names_are_stable_across_releases() -> None:
    """Users bookmark these paths and NFS clients hold handles: the names must never change."""
    assert value_name("A/B") == "A_B~980dc0b6f0"
    assert value_name("") == "_~2017f4f15a"
    assert value_name("ACC 12345", key=b"\x01" * 32) == value_name("ACC 12345", key=b"\x01" * 32)
    expected = hashlib.sha256(b"vnafs.dicom.name.v1\x00ACC/7").hexdigest()[:HASH_HEX_CHARS]
    assert value_name("ACC/7") == f"ACC_7~{expected}"


def test_key_changes_the_hash_and_same_key_is_stable() -> None:
    key_a, key_b = os.urandom(32), os.urandom(32)
    for value in TRICKY:
        plain = value_name(value)
        with_a = value_name(value, key=key_a)
        assert with_a == value_name(value, key=key_a)  # stable
        assert with_a != value_name(value, key=key_b)
        assert with_a != plain
        assert text_part(with_a) == text_part(plain)  # the key changes only the hash
        assert_safe(with_a)
    keyed = [value_name(v, key=key_a) for v in TRICKY]
    assert len(set(keyed)) == len(TRICKY)


def test_empty_key_is_refused() -> None:
    with pytest.raises(ValueError):
        value_name("x", key=b"")


# --- text_of ----------------------------------------------------------------------------------

def test_text_of_values() -> None:
    assert text_of(None) == ""
    assert text_of("ACC123") == "ACC123"
    uid = text_of(UID("1.2.840.10008.1.2"))
    assert uid == "1.2.840.10008.1.2" and type(uid) is str
    assert text_of(PersonName("Doe^John")) == "Doe^John"
    assert text_of(IS("12")) == "12"
    assert text_of(DSfloat("1.50")) == "1.50"
    assert text_of(Decimal("2.5")) == "2.5"
    assert text_of(7) == "7"
    assert text_of(b"ACC 1") == "ACC 1"
    assert text_of(b"caf\xc3\xa9") == "café"  # ISO_IR 192 / UTF-8 decodes as text
    assert text_of(bytearray(b"ab")) == "ab"
    assert text_of(["A", "B"]) == "A\\B"


def test_text_of_multivalue_from_a_dataset() -> None:
    ds = Dataset()
    ds.PatientName = ["Doe^John", "Roe^Jane"]
    ds.OtherPatientIDs = ["ID1", "ID2"]
    assert isinstance(ds.PatientName, MultiValue)
    assert text_of(ds.PatientName) == "Doe^John\\Roe^Jane"
    assert text_of(ds.OtherPatientIDs) == "ID1\\ID2"
    assert text_part(value_name(text_of(ds.OtherPatientIDs))) == "ID1_ID2"


def test_text_of_bytes_that_are_not_utf8_keep_distinct_names() -> None:
    a, b = text_of(b"M\xfcller"), text_of(b"M\xfdller")  # Latin-1 bytes, not UTF-8
    assert a != b
    name_a, name_b = value_name(a), value_name(b)
    assert_safe(name_a)
    assert_safe(name_b)
    assert text_part(name_a) == text_part(name_b) == "M_ller"
    assert name_a != name_b


def test_text_of_refuses_sequences_without_showing_the_value() -> None:
    item = Dataset()
    item.PatientName = "Secret^Patient"
    for value in (Sequence([item]), item, object()):
        with pytest.raises(TypeError) as info:
            text_of(value)
        assert "Secret" not in str(info.value)


# --- real DICOM -------------------------------------------------------------------------------

CHARSET_FILES = sorted(p for p in get_charset_files() if p.endswith(".dcm"))


def test_charset_corpus_is_present() -> None:
    assert len(CHARSET_FILES) >= 16


@pytest.mark.parametrize("path", CHARSET_FILES, ids=lambda p: Path(p).name)
def test_patient_names_of_every_charset_file(path: str) -> None:
    ds = pydicom.dcmread(path)
    # Some files keep the name inside a sequence item with its own character set.
    values = [elem.value for elem in ds.iterall() if elem.tag == 0x00100010]
    assert values, "no PatientName in the file"
    for value in values:
        text = text_of(value)
        assert text
        name = value_name(text)
        assert_safe(name)
        shown = text_part(name)
        expected = unicodedata.normalize("NFC", text)
        # Patient names carry no unsafe characters here, and all fit in 80 bytes: every
        # character, ASCII or not, must survive, in its own script.
        assert not FORBIDDEN.intersection(expected)
        assert shown == expected
        non_ascii = {c for c in expected if ord(c) > 0x7F}
        assert non_ascii, "the charset files all have non-ASCII names"
        assert non_ascii <= set(shown)
        assert set(shown) != {"_"}
    # And the name is the same under the filesystem's key except for the hash.
    keyed = value_name(text_of(values[0]), key=b"\x02" * 32)
    assert text_part(keyed) == text_part(value_name(text_of(values[0])))


def test_japanese_name_exactly() -> None:
    path = next(p for p in CHARSET_FILES if p.endswith("chrH31.dcm"))
    name = value_name(text_of(pydicom.dcmread(path).PatientName))
    assert text_part(name) == "Yamada^Tarou=山田^太郎=やまだ^たろう"


def _real_instances() -> list[Dataset]:
    out = []
    for path in get_testdata_files():
        if not os.path.isfile(path):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the odd files are odd on purpose
                out.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # the corpus holds non-DICOM and deliberately broken files
    return out


def test_names_for_every_identity_value_in_the_test_corpus() -> None:
    datasets = _real_instances()
    assert len(datasets) > 100
    seen: dict[str, str] = {}
    verbatim = 0
    for ds in datasets:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if keyword not in ds:
                continue
            uid = text_of(ds[keyword].value)
            name = uid_name(uid)
            assert_safe(name)
            assert (name == uid) == valid_uid(uid)
            verbatim += name == uid
            assert seen.setdefault(name, uid) == uid
        for keyword in ("AccessionNumber", "PatientID", "IssuerOfPatientID", "PatientName"):
            if keyword not in ds:
                continue
            value = text_of(ds[keyword].value)
            name = value_name(value)
            assert_safe(name)
            assert seen.setdefault(name, value) == value
    assert verbatim > 100
