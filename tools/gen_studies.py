"""Seeded generator of realistic DICOM studies, for tests and benchmarks of the DICOM index.

Why it exists. The index has to be tested and measured on data that looks like an archive: the
pydicom test corpus is small files of odd shapes (DICOM.md), and the interesting cases of a
real archive (two patients sharing a PatientID under different issuers, a patient without a
PatientID, non-ASCII names, 0.5 MiB CT slices by the thousand, a 60 MiB multi-frame object) are
not in it. This module writes such studies, reproducibly from a seed, in pure Python (numpy is
not a dependency of vnafs and is not needed here).

What it writes. Valid Part 10 files (preamble, `DICM`, file meta with the SOP class and instance
and the transfer syntax; explicit VR little endian, one study of each preset in implicit VR)
with the keys the index reads (PatientID + IssuerOfPatientID, Study/Series/SOP Instance UIDs,
SOP class, AccessionNumber + IssuerOfAccessionNumberSequence, StudyDate/Time, Modality,
SeriesNumber, InstanceNumber, SpecificCharacterSet) and the PHI a sanitiser must hide (names,
IDs, birth date, sex, age, accession, institution, physician). Pixel data is 12 bits stored in
16 (BitsStored 12, HighBit 11, unsigned): a smooth phantom plus gaussian noise of a few units,
so zstd compresses it about as much as real CT (roughly 2x), and no two slices are equal (no
accidental deduplication).

Where it writes. `generate` lays files out as `<out>/p01/s01/se01/0001.dcm`: patient, study,
series and instance numbers only, never a value from the data, so a test that greps file
names, listings or the store for PHI finds only what vnafs put there. Nothing else (no manifest)
is written: the returned `GenInstance` list is the manifest. Both writers refuse an `out` that
is not empty, so two runs can never mix.

Determinism. Everything comes from `random.Random` seeded from the seed (UIDs under the fixed
root `UID_ROOT`, IDs, dates, noise), so the same seed gives byte-identical files on any machine
with the same pydicom version (pydicom writes its version into the file meta).

Speed. A 512 x 512 slice costs about 1.5 ms of pixel synthesis (the phantom is computed once per
shape and depth level and kept as one big integer whose 16-bit "lanes" are the samples; the
noise is `randbytes` mapped through a gaussian table with `bytes.translate`, spread into the low
bytes of the lanes, and added with one big-integer addition, which cannot carry between lanes
because every sample stays below 2**16) plus about 1.5 ms of pydicom encoding: about 3 ms per
0.5 MiB slice in memory, 5 ms written to disk (2,000 slices in under 10 s), on a 2-core VM.

Raw chunks. `CtData` is the input of the throughput benchmarks (tools.bench,
tools.bench_snapshots): distinct 1 MiB chunks of raw 16-bit samples of the same chest phantom
(`CT_SHAPES` on `AIR`, noise sigma `CT_NOISE_SIGMA`), without DICOM around them.

Command line, from the repository root:

    .venv/bin/python -m tools.gen_studies OUT [--seed N] [--preset small|full]
    .venv/bin/python -m tools.gen_studies OUT [--seed N] --ct-slices 2000

`--ct-slices N` writes only one CT series of N slices (`write_ct_series`, the ingest benchmark's
input) instead of a preset. One summary line goes to stdout; exit status 0 on success, 1 when
writing failed, 2 for a usage problem (including a non-empty OUT).
"""

from __future__ import annotations

import argparse
import array
import copy
import datetime
import functools
import hashlib
import io
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite

__all__ = [
    "ACCESSION_ISSUER",
    "ACCESSION_PREFIX",
    "AIR",
    "CHUNK",
    "CT_NOISE_SIGMA",
    "CT_SHAPES",
    "ISSUERS",
    "MODALITIES",
    "PATIENT_ID_PREFIX",
    "PRESETS",
    "UID_ROOT",
    "CtData",
    "GenInstance",
    "Patient",
    "generate",
    "main",
    "make_patients",
    "make_study",
    "phantom_pattern",
    "write_ct_series",
]

# pydicom's registered root, which pydicom's own generate_uid uses for generated data. Every
# UID here is this root plus one random component of 120 bits: at most 37 digits, so at most
# 26 + 37 = 63 characters, and a Python int never has leading zeros.
UID_ROOT = "1.2.826.0.1.3680043.8.498."
_UID_BITS = 120

# Distinctive prefixes, so a test can grep a store or a log for any generated ID or accession.
PATIENT_ID_PREFIX = "VNAPID"
ACCESSION_PREFIX = "VNAACC"
# Assigning authorities of patient IDs. The second also carries a universal entity ID in
# IssuerOfPatientIDQualifiersSequence (0010,0024), the other way DICOM qualifies an issuer.
ISSUERS = ("VNA-HOSP-NORTH", "VNA-HOSP-SOUTH", "VNA-CLINIC-EAST")
_ISSUER_UNIVERSAL = {ISSUERS[1]: UID_ROOT + "77.1"}
ACCESSION_ISSUER = "VNA-RIS"

# The first patients of every `make_patients` list are these fixed cases, in this order, so a
# preset of N patients always contains the first N of them. ("same-as-0" reuses patient 0's
# PatientID under another issuer; "" is an empty PatientID.) Names are in DICOM PN form.
_FIXED_PATIENTS: tuple[tuple[str, str, str], ...] = (
    # (name, issuer, id rule)
    ("Okafor^Chinedu", ISSUERS[0], "new"),
    ("Müller^Jörg", ISSUERS[1], "same-as-0"),
    ("Ωμέγα^Άλφα", "", ""),
    ("Lindqvist^Annika", ISSUERS[0], "new"),
    ("Иванова^Мария", ISSUERS[2], "new"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", ISSUERS[1], "new"),
    ("Brennan^Siobhan", ISSUERS[2], ""),
)
# Further patients get unusual (grep-friendly) ASCII names from these lists.
_FAMILY_NAMES = ("Abernethy", "Delacroix", "Haraldsen", "Nakashima", "Okonjo", "Quispe",
                 "Szymanski", "Thorvaldsen", "Vukovic", "Zelenko")
_GIVEN_NAMES = ("Aurelio", "Brigid", "Casimir", "Dagny", "Eero", "Fenella", "Gideon",
                "Hyacinth", "Ignatius", "Jolanda")

# Samples are 12 bits stored in 16, like most CT and MR.
_BITS_STORED = 12
_MAX_SAMPLE = (1 << _BITS_STORED) - 1
# The phantom changes with depth in this many steps; each step is computed once and cached.
_LEVELS = 8

# A chest cross-section: (centre x, centre y, radius x, radius y, value) as fractions of the
# slice, painted in order; values are CT numbers + 1024 (air 24, water 1024, bone about 1900).
# The CT phantom of the DICOM objects and of the raw chunks of `CtData` (tools.bench).
CT_SHAPES: tuple[tuple[float, float, float, float, int], ...] = (
    (0.50, 0.52, 0.40, 0.30, 1024),  # body outline, water
    (0.50, 0.52, 0.37, 0.27, 1060),  # soft tissue
    (0.33, 0.45, 0.10, 0.13, 300),   # lungs
    (0.67, 0.45, 0.10, 0.13, 300),
    (0.45, 0.55, 0.06, 0.05, 1080),  # heart
    (0.58, 0.62, 0.03, 0.03, 1300),  # contrast-filled vessel
    (0.50, 0.70, 0.05, 0.04, 1900),  # vertebra
    (0.50, 0.70, 0.025, 0.02, 1150),  # spinal canal
)
AIR = 24  # CT number of air + 1024: the background of CT_SHAPES
# Detector noise of CT in stored units: about 2x with zstd level 1, like real CT slices.
CT_NOISE_SIGMA = 6.0


@dataclass(frozen=True)
class Patient:
    """A generated patient: the values written into every object of theirs.

    `patient_id` is `PATIENT_ID_PREFIX` + 7 digits, or "" for a patient without an ID; `issuer`
    is the IssuerOfPatientID ("" = element absent); `name` is a DICOM PN (`Family^Given`, maybe
    with `=`-separated ideographic and phonetic groups), possibly non-ASCII; `birth_date` is
    YYYYMMDD. All of them are PHI.
    """

    patient_id: str
    issuer: str
    name: str
    birth_date: str


@dataclass(frozen=True)
class GenInstance:
    """One file that `generate` or `write_ct_series` wrote. `path` is relative to `out`."""

    path: Path
    sop_uid: str
    study_uid: str
    series_uid: str
    patient: Patient
    modality: str
    study_date: str
    accession: str
    size: int


@dataclass(frozen=True)
class _Phantom:
    """A smooth test object: ellipses painted in order over a background, in stored units."""

    background: int
    # (centre x, centre y, radius x, radius y, value), as fractions of the image.
    shapes: tuple[tuple[float, float, float, float, int], ...]
    # Added from 0 at the top to `gradient` at the bottom row, so regions are not flat.
    gradient: int
    # Standard deviation of the noise in stored units: what sets the compression ratio.
    sigma: float


_PHANTOMS: dict[str, _Phantom] = {
    # The chest cross-section CT_SHAPES (CT numbers + 1024).
    "ct": _Phantom(AIR, CT_SHAPES, 12, CT_NOISE_SIGMA),
    # A T2-like head: dark background and skull, grey brain, bright ventricles.
    "mr": _Phantom(20, (
        (0.50, 0.50, 0.40, 0.45, 350),  # scalp
        (0.50, 0.50, 0.37, 0.42, 60),  # skull
        (0.50, 0.50, 0.34, 0.39, 820),  # grey matter
        (0.50, 0.50, 0.28, 0.33, 700),  # white matter
        (0.45, 0.47, 0.04, 0.10, 1500),  # ventricles
        (0.55, 0.47, 0.04, 0.10, 1500),
    ), 30, 5.0),
    # A projection radiograph (CR, DX, mammography, angiography): nested ellipses make a smooth
    # dome of attenuation, with a stronger top-to-bottom gradient.
    "xr": _Phantom(180, (
        (0.50, 0.50, 0.46, 0.48, 900),
        (0.50, 0.50, 0.40, 0.44, 1300),
        (0.50, 0.50, 0.33, 0.38, 1700),
        (0.50, 0.50, 0.25, 0.30, 2100),
        (0.36, 0.45, 0.09, 0.22, 1500),  # two lower-density lobes
        (0.64, 0.45, 0.09, 0.22, 1500),
        (0.50, 0.50, 0.03, 0.40, 2800),  # a dense column
    ), 400, 7.0),
}


@dataclass(frozen=True)
class _Modality:
    single: str  # SOP class of a single-frame object
    multi: str | None  # SOP class when frames > 1 (None: that modality has none here)
    phantom: str
    third_image_type: str  # ImageType value 3
    study: str  # StudyDescription
    body_part: str


MODALITIES: dict[str, _Modality] = {
    "CT": _Modality(dicom_uid.CTImageStorage, dicom_uid.EnhancedCTImageStorage, "ct", "AXIAL",
                    "CT THORAX WITH CONTRAST", "CHEST"),
    "MR": _Modality(dicom_uid.MRImageStorage, dicom_uid.EnhancedMRImageStorage, "mr", "OTHER",
                    "MR BRAIN", "HEAD"),
    "CR": _Modality(dicom_uid.ComputedRadiographyImageStorage, None, "xr", "",
                    "CHEST PA", "CHEST"),
    "DX": _Modality(dicom_uid.DigitalXRayImageStorageForPresentation, None, "xr", "",
                    "CHEST PA AND LATERAL", "CHEST"),
    "MG": _Modality(dicom_uid.DigitalMammographyXRayImageStorageForPresentation, None, "xr",
                    "", "SCREENING MAMMOGRAPHY", "BREAST"),
    "XA": _Modality(dicom_uid.XRayAngiographicImageStorage,
                    dicom_uid.XRayAngiographicImageStorage, "xr", "SINGLE PLANE",
                    "CORONARY ANGIOGRAPHY", "HEART"),
}
# Mammography views in the order a screening exam takes them.
_MG_VIEWS = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))


@dataclass(frozen=True)
class _Series:
    instances: int
    rows: int = 512
    cols: int = 512
    frames: int = 1


@dataclass(frozen=True)
class _StudyPlan:
    patient: int  # index into the preset's patients
    modality: str
    series: tuple[_Series, ...]
    implicit_vr: bool = False
    accession_issuer: bool = True  # IssuerOfAccessionNumberSequence present
    accession: bool = True  # False: an empty AccessionNumber, as some modalities send


@dataclass(frozen=True)
class _Preset:
    patients: int
    studies: tuple[_StudyPlan, ...]


PRESETS: dict[str, _Preset] = {
    # Unit tests: about 15 MiB, well under a second. Patients 0 and 1 share a PatientID under
    # two issuers, patient 2 has none; patient 3's study is implicit VR without an accession
    # issuer.
    "small": _Preset(4, (
        _StudyPlan(0, "CT", (_Series(20),)),
        _StudyPlan(1, "MR", (_Series(10, 256, 256),)),
        _StudyPlan(2, "CR", (_Series(1, 1280, 1024),)),
        _StudyPlan(3, "CT", (_Series(3),), implicit_vr=True, accession_issuer=False),
    )),
    # Benchmarks and by-hand checks: about 340 MiB in 333 files, about 4 s, peak RSS about
    # 0.5 GiB (cached mammogram phantoms, and the 60 MiB object copied by pydicom's writer).
    # A three-series CT study, a later CR of the same patient, MR, DX, a four-view mammography
    # (26 MiB per image), an Enhanced CT of 120 frames (60 MiB in one object), an XA cine, and
    # a second patient without PatientID (with an issuer this time) whose study has no
    # accession number.
    "full": _Preset(7, (
        _StudyPlan(0, "CT", (_Series(2), _Series(80), _Series(120))),
        _StudyPlan(0, "CR", (_Series(1, 2500, 2048),)),
        _StudyPlan(1, "MR", (_Series(24, 256, 256), _Series(24, 256, 256),
                             _Series(24, 256, 256))),
        _StudyPlan(2, "DX", (_Series(2, 2048, 2048),)),
        _StudyPlan(3, "CT", (_Series(40),), implicit_vr=True, accession_issuer=False),
        _StudyPlan(4, "MG", (_Series(4, 4096, 3328),)),
        _StudyPlan(5, "CT", (_Series(1, frames=120),)),
        _StudyPlan(5, "XA", (_Series(1, frames=30),)),
        _StudyPlan(6, "CT", (_Series(10),), accession=False),
    )),
}


# -- patients and values -------------------------------------------------------------------------


def make_patients(seed: int, count: int) -> list[Patient]:
    """`count` patients, the same for the same seed.

    The first seven are fixed cases (see `_FIXED_PATIENTS`): 0 ASCII name under ISSUERS[0];
    1 a different patient with the *same* PatientID under ISSUERS[1] and a UTF-8 name; 2 an
    empty PatientID and no issuer, Greek name; 3 ASCII; 4 Cyrillic; 5 a three-group Japanese
    name; 6 an empty PatientID with an issuer. So count >= 3 covers the shared-ID and empty-ID
    cases. Further patients get ASCII names and new IDs under a random issuer. IDs and birth
    dates depend on the seed; the fixed names do not.
    """
    if count < 0:
        raise ValueError(f"count must not be negative, not {count}")
    # A string seed gives this list its own random stream (str seeds are hashed with SHA-512,
    # so they are as deterministic as ints).
    rng = random.Random(f"vnafs.gen_studies.patients.{seed}")
    used_ids: set[str] = set()

    def new_id() -> str:
        while True:
            pid = f"{PATIENT_ID_PREFIX}{rng.randrange(10**6, 10**7)}"
            if pid not in used_ids:
                used_ids.add(pid)
                return pid

    extra = [f"{f}^{g}" for f in _FAMILY_NAMES for g in _GIVEN_NAMES]
    rng.shuffle(extra)
    patients: list[Patient] = []
    for i in range(count):
        if i < len(_FIXED_PATIENTS):
            name, issuer, rule = _FIXED_PATIENTS[i]
            pid = patients[0].patient_id if rule == "same-as-0" else new_id() if rule else ""
        else:
            j = i - len(_FIXED_PATIENTS)
            name = extra[j % len(extra)]
            if j >= len(extra):
                name += f"^^^{j // len(extra) + 1}"  # PN suffix component keeps names unique
            issuer, pid = rng.choice(ISSUERS), new_id()
        birth = datetime.date(1935, 1, 1) + datetime.timedelta(days=rng.randrange(75 * 365))
        patients.append(Patient(pid, issuer, name, birth.strftime("%Y%m%d")))
    return patients


def _uid(rng: random.Random) -> str:
    return f"{UID_ROOT}{rng.getrandbits(_UID_BITS)}"


def _ds(value: float) -> str:
    """A DS string (at most 16 characters) for a decimal value."""
    return f"{value:.6g}"


def _sex(patient: Patient) -> str:
    # Not a Patient field (the API is fixed), but it must not change between a patient's
    # studies, so it is derived from the patient rather than drawn from the study's rng.
    digest = hashlib.sha256(f"{patient.patient_id}\0{patient.name}".encode()).digest()
    return "FM"[digest[0] & 1]


def _age(birth_date: str, on: datetime.date) -> str:
    born = datetime.datetime.strptime(birth_date, "%Y%m%d").date()
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return f"{max(0, min(999, years)):03d}Y"


# -- pixel data ----------------------------------------------------------------------------------


def _noise_offset(spec: _Phantom) -> int:
    # Noise is clamped to +-3 sigma, so it fits in [0, 2 * offset] once shifted by the offset.
    return round(3 * spec.sigma)


@functools.lru_cache(maxsize=8)
def _noise_table(sigma: float) -> bytes:
    """A `bytes.translate` table: a uniform random byte -> offset + gaussian noise (>= 0)."""
    k = round(3 * sigma)
    normal = statistics.NormalDist(0.0, sigma)
    # Inverse CDF at the 256 bin centres: an exact-enough gaussian from one byte of entropy.
    return bytes(k + max(-k, min(k, round(normal.inv_cdf((i + 0.5) / 256)))) for i in range(256))


@functools.lru_cache(maxsize=48)
def _phantom_lanes(kind: str, rows: int, cols: int, level: int) -> int:
    """The phantom at depth `level`, minus the noise offset, as one little-endian big integer.

    Sample i occupies bits 16*i .. 16*i+15. Rows are assembled from cached full-width rows of
    each value with slice assignments, so even a 3328 x 4096 mammogram takes tens of ms.
    """
    spec = _PHANTOMS[kind]
    k = _noise_offset(spec)
    z = level / _LEVELS
    full_rows: dict[int, bytes] = {}

    def full_row(value: int) -> bytes:
        row = full_rows.get(value)
        if row is None:
            samples = array.array("H", [value - k]) * cols
            if sys.byteorder == "big":
                samples.byteswap()
            row = full_rows[value] = samples.tobytes()
        return row

    out = bytearray()
    for y in range(rows):
        fy = (y + 0.5) / rows
        grad = round(spec.gradient * fy)
        row = bytearray(full_row(spec.background))
        for cx, cy, rx, ry, value in spec.shapes:
            ry_z = ry * (1 + 0.15 * z)  # organs grow and shrink between slices
            d = 1 - ((fy - cy) / ry_z) ** 2
            if d <= 0:
                continue
            half = rx * (1 - 0.05 * z) * math.sqrt(d)
            x0, x1 = max(0, round((cx - half) * cols)), min(cols, round((cx + half) * cols))
            if x1 > x0:
                row[2 * x0:2 * x1] = full_row(value + grad)[2 * x0:2 * x1]
        out += row
    return int.from_bytes(out, "little")


def _frame(rng: random.Random, kind: str, rows: int, cols: int, level: int) -> bytes:
    """One frame: the cached phantom plus fresh gaussian noise, 16-bit little endian."""
    n = rows * cols
    noise = bytearray(2 * n)
    # Noise values are below 256 and go into the low byte of each sample; the sum of the two
    # integers is the lane-wise sum because no sample reaches 2**16 (so nothing carries).
    noise[0::2] = rng.randbytes(n).translate(_noise_table(_PHANTOMS[kind].sigma))
    return (_phantom_lanes(kind, rows, cols, level) + int.from_bytes(noise, "little")).to_bytes(
        2 * n, "little")


def _check_phantoms() -> None:
    # Every sample must fit in BitsStored and not go below 0 after noise; checked at import so
    # an edit of the tables above cannot silently produce invalid pixel data.
    for kind, spec in _PHANTOMS.items():
        k = _noise_offset(spec)
        low = min([spec.background] + [s[4] for s in spec.shapes])
        high = max([spec.background] + [s[4] for s in spec.shapes]) + spec.gradient
        if low < k or high + k > _MAX_SAMPLE or 2 * k > 255:
            raise AssertionError(f"phantom {kind!r} does not fit in {_BITS_STORED} bits")


_check_phantoms()


# -- DICOM objects -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Object:
    """One generated file and what `generate` records about it."""

    name: str  # relative to the study directory: "se01/0001.dcm"
    data: bytes
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    study_date: str
    accession: str


def make_study(rng: random.Random, patient: Patient, modality: str, *, instances: int,
               rows: int = 512, cols: int = 512, frames: int = 1,
               accession: str | None = None, study_date: str | None = None,
               series: int = 1, implicit_vr: bool = False,
               accession_issuer: str | None = ACCESSION_ISSUER) -> Iterator[tuple[str, bytes]]:
    """One study of `series` series of `instances` objects each: (relative name, file bytes).

    This is an *iterator*: each file is built when it is asked for and can be dropped after
    being written, so a 2,000-slice study never sits in memory (use `list()` for small ones).
    It draws UIDs, dates and noise from `rng` in order, so the same rng state gives the same
    bytes only if the iterator is consumed to the end (or to the same point).

    `modality` is a key of `MODALITIES` (CT, MR, CR, DX, MG, XA). `frames > 1` makes each
    object a multi-frame one: Enhanced CT or Enhanced MR Image Storage for CT and MR, X-Ray
    Angiographic for XA (CR, DX and MG have no multi-frame class here: ValueError). Names are
    `se01/0001.dcm` (series and instance numbers; the instance number is zero-padded to at
    least 4 digits). `accession=None` draws `ACCESSION_PREFIX` + 8 digits, "" writes an empty
    AccessionNumber; the IssuerOfAccessionNumberSequence holds `accession_issuer` unless that
    is None or the accession is empty. `study_date` is YYYYMMDD (None: a day in 2016-2024).
    Non-ASCII names are written with SpecificCharacterSet ISO_IR 192 (UTF-8); ASCII-only
    patients get no SpecificCharacterSet, as most modalities send.
    """
    objects = _study_objects(rng, patient, modality,
                             [_Series(instances, rows, cols, frames)] * series,
                             accession=accession, study_date=study_date,
                             implicit_vr=implicit_vr, accession_issuer=accession_issuer)
    return ((obj.name, obj.data) for obj in objects)


def _study_objects(rng: random.Random, patient: Patient, modality: str,
                   series: Sequence[_Series], *, accession: str | None,
                   study_date: str | None, implicit_vr: bool,
                   accession_issuer: str | None) -> Iterator[_Object]:
    """Validate, then return the lazy generator of a study's objects (see `make_study`)."""
    mod = MODALITIES.get(modality)
    if mod is None:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    if not series:
        raise ValueError("a study needs at least one series")
    for s in series:
        if min(s.instances, s.rows, s.cols, s.frames) < 1:
            raise ValueError(f"instances, rows, cols and frames must be at least 1: {s}")
        if s.frames > 1 and mod.multi is None:
            raise ValueError(f"no multi-frame SOP class for {modality}")
    if study_date is None:
        day = datetime.date(2016, 1, 1) + datetime.timedelta(days=rng.randrange(9 * 365))
    else:
        day = datetime.datetime.strptime(study_date, "%Y%m%d").date()  # ValueError if bad
    if accession is None:
        accession = f"{ACCESSION_PREFIX}{rng.randrange(10**7, 10**8)}"
    return _generate_objects(rng, patient, modality, mod, series, day, accession,
                             accession_issuer if accession else None, implicit_vr)


def _generate_objects(rng: random.Random, patient: Patient, modality: str, mod: _Modality,
                      series: Sequence[_Series], day: datetime.date, accession: str,
                      accession_issuer: str | None, implicit_vr: bool) -> Iterator[_Object]:
    start = datetime.datetime.combine(day, datetime.time(rng.randrange(7, 19),
                                                         rng.randrange(60), rng.randrange(60)))
    study_uid = _uid(rng)
    frame_of_reference = _uid(rng)
    study_date = day.strftime("%Y%m%d")
    base = _study_dataset(rng, patient, modality, mod, start, accession, accession_issuer,
                          study_uid)
    for number, spec in enumerate(series, start=1):
        series_uid = _uid(rng)
        ds = _series_dataset(base, mod, modality, spec, number, series_uid, frame_of_reference,
                             start + datetime.timedelta(minutes=3 * (number - 1)), implicit_vr)
        width = max(4, len(str(spec.instances)))
        for index in range(spec.instances):
            sop_uid = _uid(rng)
            _fill_instance(rng, ds, mod, modality, spec, index, sop_uid, frame_of_reference)
            buf = io.BytesIO()
            dcmwrite(buf, ds, enforce_file_format=True)
            yield _Object(f"se{number:02d}/{index + 1:0{width}d}.dcm", buf.getvalue(), sop_uid,
                          study_uid, series_uid, modality, study_date, accession)


def _study_dataset(rng: random.Random, patient: Patient, modality: str, mod: _Modality,
                   start: datetime.datetime, accession: str, accession_issuer: str | None,
                   study_uid: str) -> Dataset:
    """Patient and study level attributes, shared by every object of the study."""
    ds = Dataset()
    if not (patient.name + patient.patient_id + patient.issuer).isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDate = start.strftime("%Y%m%d")
    ds.StudyTime = start.strftime("%H%M%S")
    ds.AccessionNumber = accession
    if accession_issuer is not None:
        ds.IssuerOfAccessionNumberSequence = [Dataset()]
        ds.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID = accession_issuer
    ds.Modality = modality
    ds.Manufacturer = "VNAFS GEN"
    ds.ManufacturerModelName = "gen_studies"
    ds.InstitutionName = "Vna General Hospital"
    ds.ReferringPhysicianName = "Hausarzt^Vna"
    ds.StationName = f"VNA{modality}{rng.randrange(1, 10)}"
    ds.StudyDescription = mod.study
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id  # type 2: present even when empty
    if patient.issuer:
        ds.IssuerOfPatientID = patient.issuer
        universal = _ISSUER_UNIVERSAL.get(patient.issuer)
        if universal is not None:
            qualifiers = Dataset()
            qualifiers.UniversalEntityID = universal
            qualifiers.UniversalEntityIDType = "ISO"
            ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = _sex(patient)
    ds.PatientAge = _age(patient.birth_date, start.date())
    ds.BodyPartExamined = mod.body_part
    ds.StudyInstanceUID = study_uid
    ds.StudyID = str(rng.randrange(1, 100000))
    return ds


def _series_dataset(base: Dataset, mod: _Modality, modality: str, spec: _Series, number: int,
                    series_uid: str, frame_of_reference: str, when: datetime.datetime,
                    implicit_vr: bool) -> Dataset:
    """A fresh dataset for one series: the study attributes plus series and image constants."""
    # A deep copy: pydicom's setattr changes an existing element in place, and the base's
    # elements must not be shared between series.
    ds = copy.deepcopy(base)
    multi = spec.frames > 1
    sop_class = mod.multi if multi else mod.single
    assert sop_class is not None  # checked in _study_objects
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = dicom_uid.UID(sop_class)
    ds.file_meta.TransferSyntaxUID = (dicom_uid.ImplicitVRLittleEndian if implicit_vr
                                      else dicom_uid.ExplicitVRLittleEndian)
    enhanced = multi and modality in ("CT", "MR")
    image_type = ["ORIGINAL", "PRIMARY"]
    if enhanced:
        image_type += [mod.third_image_type, "NONE"]  # value 4 is required by Enhanced IODs
    elif mod.third_image_type:
        image_type.append(mod.third_image_type)
    ds.ImageType = image_type
    ds.SOPClassUID = sop_class
    ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")
    ds.SeriesDescription = f"{mod.study} {number}"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.cols
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS_STORED
    ds.HighBit = _BITS_STORED - 1
    ds.PixelRepresentation = 0
    if modality in ("CT", "MR"):
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
    if modality == "CT":
        ds.KVP = "120"
        if not enhanced:
            ds.RescaleIntercept = "-1024"
            ds.RescaleSlope = "1"
            ds.WindowCenter = "40"
            ds.WindowWidth = "400"
    elif modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.MagneticFieldStrength = "3"
    elif modality in ("DX", "MG"):
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = ["0.1", "0.1"]
    elif modality == "XA":
        ds.FrameTime = "66.7"
        ds.PositionerPrimaryAngle = "30"
        ds.PositionerSecondaryAngle = "0"
    if multi:
        ds.NumberOfFrames = spec.frames
        if modality == "XA":
            ds.FrameIncrementPointer = 0x00181063  # FrameTime
    if enhanced:
        ds.ContentQualification = "PRODUCT"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.PresentationLUTShape = "IDENTITY"
        ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    return ds


def _fill_instance(rng: random.Random, ds: Dataset, mod: _Modality, modality: str,
                   spec: _Series, index: int, sop_uid: str, frame_of_reference: str) -> None:
    """Set the per-object attributes and pixel data of `ds` in place (it is reused)."""
    ds.file_meta.MediaStorageSOPInstanceUID = dicom_uid.UID(sop_uid)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = index + 1
    ds.ContentTime = ds.SeriesTime
    multi = spec.frames > 1
    spacing = 400 / spec.cols  # a 40 cm field of view for CT and MR
    thickness = 1.0 if multi else 5.0
    if modality in ("CT", "MR") and not multi:
        z = -200 + index * thickness
        ds.ImagePositionPatient = [_ds(-200), _ds(-200), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds(z)
        ds.SliceThickness = _ds(thickness)
        ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    elif modality in ("CR", "DX", "MG"):
        ds.PixelSpacing = ["0.1", "0.1"]
        if modality == "MG":
            laterality, view = _MG_VIEWS[index % len(_MG_VIEWS)]
            ds.ImageLaterality = laterality
            ds.ViewPosition = view
            ds.PatientOrientation = ["P", "L"] if laterality == "R" else ["A", "R"]
        else:
            ds.ViewPosition = "PA" if index % 2 == 0 else "LL"
            ds.PatientOrientation = ["L", "F"]
    if multi and modality in ("CT", "MR"):
        _functional_groups(rng, ds, modality, spec, spacing, thickness, frame_of_reference)
    kind = mod.phantom
    if multi:
        # Depth changes over the frames: a volume for Enhanced CT/MR, motion for XA cine.
        pixels = b"".join(_frame(rng, kind, spec.rows, spec.cols, f * _LEVELS // spec.frames)
                          for f in range(spec.frames))
    else:
        pixels = _frame(rng, kind, spec.rows, spec.cols, index * _LEVELS // spec.instances)
    # OW explicitly: the dictionary VR of PixelData is "OB or OW", resolved here rather than
    # by pydicom's ambiguous-VR pass on every write.
    ds.add_new(0x7FE00010, "OW", pixels)


def _functional_groups(rng: random.Random, ds: Dataset, modality: str, spec: _Series,
                       spacing: float, thickness: float, frame_of_reference: str) -> None:
    """Shared and per-frame functional groups of an Enhanced CT/MR object (PS3.3 C.7.6.16)."""
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [_ds(spacing), _ds(spacing)]
    measures.SliceThickness = _ds(thickness)
    shared.PixelMeasuresSequence = [measures]
    orientation = Dataset()
    orientation.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    shared.PlaneOrientationSequence = [orientation]
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", MODALITIES[modality].third_image_type, "NONE"]
    if modality == "CT":
        transform = Dataset()
        transform.RescaleIntercept = "-1024"
        transform.RescaleSlope = "1"
        transform.RescaleType = "HU"
        shared.PixelValueTransformationSequence = [transform]
        shared.CTImageFrameTypeSequence = [frame_type]
    else:
        shared.MRImageFrameTypeSequence = [frame_type]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for f in range(spec.frames):
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = f + 1
        content.DimensionIndexValues = [1, f + 1]
        position = Dataset()
        position.ImagePositionPatient = [_ds(-200), _ds(-200), _ds(-200 + f * thickness)]
        item = Dataset()
        item.FrameContentSequence = [content]
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    organization = _uid(rng)
    ds.DimensionOrganizationSequence = [Dataset()]
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = organization
    indices = []
    for pointer in (0x00209056, 0x00209057):  # StackID, InStackPositionNumber
        index = Dataset()
        index.DimensionOrganizationUID = organization
        index.DimensionIndexPointer = pointer
        index.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
        indices.append(index)
    ds.DimensionIndexSequence = indices


# -- writers -------------------------------------------------------------------------------------


def _prepare_out(out: Path) -> None:
    """Create `out`, or accept it if it is an empty directory; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty (generated files would mix with others)")


def _write(out: Path, prefix: str, obj: _Object, patient: Patient) -> GenInstance:
    rel = Path(prefix) / obj.name
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:  # "x": never overwrite, out was checked to be empty
        f.write(obj.data)
    return GenInstance(rel, obj.sop_uid, obj.study_uid, obj.series_uid, patient, obj.modality,
                       obj.study_date, obj.accession, len(obj.data))


def generate(out: Path, *, seed: int = 1, preset: str = "small") -> list[GenInstance]:
    """Write the studies of `preset` ("small" or "full", see `PRESETS`) under `out`.

    `out` is created if needed and must be empty. Files go to `p01/s01/se01/0001.dcm`
    (patient, study of that patient, series, instance). Returns what was written, in order.
    The same seed gives byte-identical files.
    """
    plan = PRESETS.get(preset)
    if plan is None:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    _prepare_out(Path(out))
    patients = make_patients(seed, plan.patients)
    # The preset is part of the stream's seed: the presets' studies differ, so they must not
    # share UIDs (the same patients, from make_patients, are shared on purpose).
    rng = random.Random(f"vnafs.gen_studies.generate.{preset}.{seed}")
    studies_of: dict[int, int] = {}
    written: list[GenInstance] = []
    try:
        for study in plan.studies:
            patient = patients[study.patient]
            studies_of[study.patient] = studies_of.get(study.patient, 0) + 1
            prefix = f"p{study.patient + 1:02d}/s{studies_of[study.patient]:02d}"
            for obj in _study_objects(rng, patient, study.modality, study.series,
                                      accession=None if study.accession else "",
                                      study_date=None, implicit_vr=study.implicit_vr,
                                      accession_issuer=ACCESSION_ISSUER
                                      if study.accession_issuer else None):
                written.append(_write(Path(out), prefix, obj, patient))
    finally:
        # The cached phantoms of "full" hold about 150 MiB (mammograms are 26 MiB each).
        _phantom_lanes.cache_clear()
    return written


def write_ct_series(out: Path, *, seed: int, count: int,
                    patient: Patient | None = None) -> list[GenInstance]:
    """`count` CT slices of 512 x 512 x 16 bits (about 0.5 MiB each) in one study and series.

    The ingest benchmark's input: one CT series as it arrives from a scanner. Files go to
    `out/p01/s01/se01/0001.dcm` ... (`out` is created if needed and must be empty); slices are
    made and written one at a time, so memory stays flat for any count. The patient defaults to
    `make_patients(seed, 1)[0]`.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    _prepare_out(Path(out))
    if patient is None:
        patient = make_patients(seed, 1)[0]
    rng = random.Random(f"vnafs.gen_studies.ct_series.{seed}")
    objects = _study_objects(rng, patient, "CT", [_Series(count)], accession=None,
                             study_date=None, implicit_vr=False,
                             accession_issuer=ACCESSION_ISSUER)
    return [_write(Path(out), "p01/s01", obj, patient) for obj in objects]


# -- raw CT-like chunks (tools.bench) ------------------------------------------------------------
#
# The throughput benchmarks write raw pixel data, not DICOM files: distinct 1 MiB chunks that
# compress like CT (the chest phantom above plus gaussian noise) but never deduplicate.

CHUNK = 1 << 20
_PATTERN_BYTES = 8 * CHUNK
_SLICE_SIDE = 512  # 512 x 512 x 2 bytes = 512 KiB per slice, 16 slices per pattern
_PATTERN_SEED = 20240601
_PAGE = 4096


def phantom_pattern(nbytes: int = _PATTERN_BYTES, seed: int = _PATTERN_SEED) -> bytes:
    """`nbytes` of consecutive CT slices: a phantom that changes slowly along z, plus noise."""
    rng = random.Random(seed)
    normal = statistics.NormalDist(0.0, CT_NOISE_SIGMA)
    # Noise through a 256-entry inverse-CDF table indexed by random bytes: gaussian and fast.
    # Clamped to 3 sigma < AIR, so no sample goes below zero.
    limit = min(AIR, round(3 * CT_NOISE_SIGMA))
    table = [max(-limit, min(limit, round(normal.inv_cdf((i + 0.5) / 256)))) for i in range(256)]
    n = _SLICE_SIDE
    slices = nbytes // (2 * n * n)
    out = bytearray()
    for s in range(slices):
        z = s / max(1, slices)
        values: list[int] = []
        for y in range(n):
            row = [AIR] * n
            fy = (y + 0.5) / n
            for cx, cy, rx, ry, v in CT_SHAPES:
                ry_z = ry * (1 + 0.15 * z)  # organs grow and shrink between slices
                d = 1 - ((fy - cy) / ry_z) ** 2
                if d <= 0:
                    continue
                half = rx * (1 - 0.05 * z) * d**0.5
                x0, x1 = max(0, round((cx - half) * n)), min(n, round((cx + half) * n))
                if x1 > x0:
                    row[x0:x1] = [v] * (x1 - x0)
            values.extend(row)
        noise = rng.randbytes(n * n)
        samples = array.array("H", [p + table[b] for p, b in zip(values, noise, strict=True)])
        if sys.byteorder == "big":
            samples.byteswap()
        out += samples.tobytes()
    return bytes(out)


class CtData:
    """Distinct 1 MiB CT-like chunks, cheap to make, from one pattern."""

    def __init__(self) -> None:
        pattern = phantom_pattern()
        self._ring = pattern + pattern[:CHUNK]  # any 1 MiB window, wrapping around
        self._samples = len(pattern) // 2
        self._xor = [bytes(i ^ c for i in range(256)) for c in range(256)]

    def chunk(self, seq: int) -> bytes:
        """Chunk number `seq`: distinct for every seq below 2**22 (4 TiB of chunks)."""
        # An odd multiplier is a bijection modulo a power of two: distinct rotations.
        off = (seq * 2_654_435_761) % self._samples * 2
        buf = bytearray(self._ring[off:off + CHUNK])
        for k, c in enumerate((seq + 1).to_bytes(4, "little")):
            if c:
                sl = slice(2 * k, None, _PAGE)  # low byte of sample k of every 4 KiB page
                buf[sl] = bytes(buf[sl]).translate(self._xor[c])
        return bytes(buf)

    def zstd1_ratio(self, chunks: int = 8) -> float | None:
        """Compression ratio of zstd level 1 over whole 1 MiB chunks, as vnafs compresses."""
        return zstd1_ratio(self, chunks)


class RandomData:
    """Distinct 1 MiB chunks of random bytes (seeded by the chunk number): what compressed
    or encrypted pixel data looks like to a file system. Nothing compresses or deduplicates;
    vnafs stores such blocks raw (its sampled codec choice), so only the sealing costs."""

    def chunk(self, seq: int) -> bytes:
        import numpy as np

        return np.random.default_rng(seq).bytes(CHUNK)

    def zstd1_ratio(self, chunks: int = 8) -> float | None:
        return zstd1_ratio(self, chunks)


def zstd1_ratio(data: CtData | RandomData, chunks: int = 8) -> float | None:
    """Compression ratio of zstd level 1 over whole 1 MiB chunks, as vnafs compresses."""
    try:
        import zstandard
    except ImportError:
        return None
    cctx = zstandard.ZstdCompressor(level=1)
    sizes = [len(cctx.compress(data.chunk(i))) for i in range(chunks)]
    return chunks * CHUNK / sum(sizes)


# -- command line --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m tools.gen_studies",
                description="Write seeded, realistic DICOM studies into an empty directory.")
    p.add_argument("out", metavar="OUT", type=Path, help="output directory (created; must be empty)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--preset", choices=sorted(PRESETS), default="small",
                      help="which studies to write (default small, about 15 MiB; full is "
                           "about 340 MiB)")
    what.add_argument("--ct-slices", type=_positive, metavar="N",
                      help="instead of a preset, one CT series of N 0.5 MiB slices (ingest "
                           "benchmark input)")
    args = p.parse_args(argv)
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        p.error(f"{out} must be an empty directory or not exist")
    t0 = time.perf_counter()
    try:
        if args.ct_slices is not None:
            label = f"{args.ct_slices} CT slices"
            written = write_ct_series(out, seed=args.seed, count=args.ct_slices)
        else:
            label = f"preset {args.preset}"
            written = generate(out, seed=args.seed, preset=args.preset)
    except OSError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    total = sum(g.size for g in written)
    # Counts only: the summary must not contain PHI (it may end up in CI logs).
    print(f"{len(written)} files, {total} bytes ({total / (1 << 20):.1f} MiB) in {seconds:.2f} s "
          f"({label}, seed {args.seed}) -> {os.fspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
