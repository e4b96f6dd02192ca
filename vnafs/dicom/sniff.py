"""The transfer syntax of a DICOM file from its first bytes, without pydicom, at seal time.

Why this exists: when a file's first block is sealed (often before the writer has closed it),
vnafs decides whether to compress its blocks. Pixel data in an encapsulated transfer syntax
(JPEG, JPEG-LS, JPEG 2000, RLE, MPEG/HEVC, deflated) is already compressed, and zstd over it
costs CPU for a percent or two; the seal path's sampling catches most of it, this makes it
certain. The file meta group (PS3.10 7.1) is always explicit VR little endian and comes right
after the 128-byte preamble and `DICM`, so reading it needs no parser.
"""

from __future__ import annotations

import struct

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_ELEMENT = struct.Struct("<HH2s")

# Native (uncompressed) transfer syntaxes; every other one is encapsulated or deflated.
NATIVE = {
    "1.2.840.10008.1.2",       # implicit VR little endian
    "1.2.840.10008.1.2.1",     # explicit VR little endian
    "1.2.840.10008.1.2.2",     # explicit VR big endian (retired)
}


def transfer_syntax(head: bytes | bytearray | memoryview) -> str | None:
    """The TransferSyntaxUID (0002,0010) in the file meta group, or None if not found."""
    data = bytes(head[:8192])
    if data[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(data):
        group, element, vr = _ELEMENT.unpack_from(data, pos)
        if group != 0x0002:
            return None
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                return None
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        if element == 0x0010:
            value = data[start : start + length]
            if len(value) != length:
                return None
            return value.rstrip(b"\0 ").decode("ascii", "replace")
        pos = start + length
    return None


def is_encapsulated(head: bytes | bytearray | memoryview) -> bool:
    """Whether the file's pixel data is already compressed (False when unknown)."""
    ts = transfer_syntax(head)
    return ts is not None and ts not in NATIVE
