"""Encapsulated DICOM pixel data is stored without a second compression (issue 3, item 5).

`dicom/sniff.py` reads the transfer syntax from the file meta group when block 0 is sealed;
these tests hold it to pydicom on every bundled file and check, in the hot store itself, that
an encapsulated file's blocks are stored raw while native pixel data is compressed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydicom
import pytest
from conftest import Fs
from pydicom.data import get_testdata_files

from tools.gen_studies import generate
from vnafs.dicom.sniff import NATIVE, is_encapsulated, transfer_syntax
from vnafs.seal import CODEC_RAW, Sealer

# The corpus is deliberately odd in places; pydicom says so while we read it for reference.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def corpus_with_meta() -> list[tuple[Path, str]]:
    out = []
    for name in get_testdata_files():
        path = Path(name)
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if ts and path.read_bytes()[128:132] == b"DICM":
            out.append((path, str(ts)))
    return out


def test_transfer_syntax_matches_pydicom_on_the_corpus() -> None:
    files = corpus_with_meta()
    assert len(files) > 100
    for path, ts in files:
        assert transfer_syntax(path.read_bytes()[:8192]) == ts, path.name
    assert any(ts not in NATIVE for _, ts in files)


def test_bad_heads_give_none() -> None:
    assert transfer_syntax(b"") is None
    assert transfer_syntax(bytes(128) + b"DICM") is None
    assert transfer_syntax(bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\x00abc") is None
    assert not is_encapsulated(b"not dicom at all" * 20)


def codecs(hot: Path) -> list[int]:
    return [Sealer.header_info(p.read_bytes()[:64])[1]
            for p in (hot / "blocks").rglob("*") if p.is_file()]


def test_encapsulated_blocks_are_stored_raw(new_fs: Fs, tmp_path: Path) -> None:
    fs = new_fs.mount()
    big = max((p for p, ts in corpus_with_meta() if ts not in NATIVE),
              key=lambda p: p.stat().st_size)
    shutil.copyfile(big, fs.mnt / "encapsulated.dcm")
    fs.umount()
    assert codecs(fs.hot) and set(codecs(fs.hot)) == {CODEC_RAW}
    fs.mount()
    assert (fs.mnt / "encapsulated.dcm").read_bytes() == big.read_bytes()
    os.unlink(fs.mnt / "encapsulated.dcm")
    generate(tmp_path / "s", seed=3)
    ct = next((tmp_path / "s").rglob("*.dcm"))
    shutil.copyfile(ct, fs.mnt / "native.dcm")
    fs.umount()
    assert CODEC_RAW not in codecs(fs.hot)  # native 16-bit pixel data is compressed
