"""The read-only study-level views under `/<views>/` (default `/.dicom/`), served from the index.

Why virtual: the views are a second set of names for the stored files, computed from the DICOM
index; materialising them as real directories would double every namespace change and could
drift from the index. Here a view directory is a path of names that is resolved against the
index on demand, and a leaf is the stored file's own inode (hard-link semantics).

Directory inode numbers are `VIEW_BIT | hash(path)`: stable across restarts without storing
anything, and disjoint from real inodes (below 2^40) and snapshot inodes (`snap << 40 | ino`).
A path is remembered once it has been looked up or listed, so later `getattr`s resolve; a handle
for a view directory the daemon has never seen since it started (an NFS handle kept over a
restart) gets ESTALE, which NFS clients answer with a fresh lookup.

The layout (docs/architecture.md section 8):

    by-study/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm
    by-date/<YYYY>/<MM>/<DD>/<StudyUID>/...
    by-accession/<issuer>/<Accession~hash>/<StudyUID>/...
    by-patient/<issuer>/<PatientID~hash>/<StudyUID>/...      (only with dicom.by_patient)
"""

from __future__ import annotations

import errno
import hashlib
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import lmdb

from vnafs.dicom.index import (
    AccessionLookup,
    DicomIndex,
    LookupRecord,
    PatientLookup,
    RemovedInstance,
)
from vnafs.dicom.names import valid_uid
from vnafs.meta.namespace import fail

# The attribute vnafs answers, read-only and never stored, on a stored file the index flags (a
# view leaf is the stored file's own inode, so it answers through the views and the PACS's path
# alike). fs/operations.py serves `user.vnafs.*` names, refuses to set them, and does not list
# them, so `cp -a` and `rsync -X` do not copy a stale verdict along with the file.
PROBLEM_XATTR = b"user.vnafs.dicom.problem"

VIEW_BIT = 1 << 62
_MASK = (1 << 61) - 1
LEAF_SUFFIX = ".dcm"
# The `dicom_lookup` record kind behind each view keyed by free-text names.
_KINDS = {"by-accession": b"a", "by-patient": b"p"}

Path = tuple[str, ...]


def is_view_ino(ino: int) -> bool:
    return bool(ino & VIEW_BIT)


def view_ino(path: Path, salt: int = 0) -> int:
    """The inode number of a view directory; `salt` is the snapshot id for the views inside
    a snapshot (0 for the live ones), so the same path in two snapshots differs."""
    text = "/".join(path) if not salt else f"{salt}\0" + "/".join(path)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                             digest_size=8, person=b"vnafs-view").digest()
    return VIEW_BIT | (int.from_bytes(digest, "big") & _MASK)


@dataclass(frozen=True, slots=True)
class Child:
    """One entry of a view directory: a sub-directory (`path`) or a stored file (`ino`)."""

    name: str
    path: Path | None = None
    ino: int = 0


class Views:
    def __init__(self, index: DicomIndex, salt: int = 0) -> None:
        self.index = index
        self.db = index.db
        self.salt = salt
        self.root_ino = view_ino((), salt)
        # View directory inode -> its path, for every directory looked up so far (the inode
        # is a hash of the path, so it cannot be reversed).
        self._paths: dict[int, Path] = {self.root_ino: ()}

    def tops(self) -> list[str]:
        names = ["by-study", "by-date", "by-accession"]
        return [*names, "by-patient"] if self.index.by_patient else names

    # -- inode numbers ----------------------------------------------------------------------------

    def path_of(self, ino: int) -> Path:
        path = self._paths.get(ino)
        if path is None:
            raise fail(errno.ESTALE)
        return path

    def knows(self, ino: int) -> bool:
        return ino in self._paths

    def _remember(self, path: Path) -> int:
        ino = view_ino(path, self.salt)
        if len(self._paths) > 1_000_000:
            self._paths = {self.root_ino: ()}
        self._paths[ino] = path
        return ino

    # -- resolving names --------------------------------------------------------------------------

    def lookup(self, parent: int, name: str) -> Child:
        """The child `name` of view directory `parent` (ENOENT if the index has no such thing)."""
        path = self.path_of(parent)
        with self.db.begin() as txn:
            child = self._lookup(txn, path, name)
        if child.path is not None:
            self._remember(child.path)
        return child

    def listing(self, ino: int) -> list[Child]:
        path = self.path_of(ino)
        with self.db.begin() as txn:
            children = list(self._list(txn, path))
        for child in children:
            if child.path is not None:
                self._remember(child.path)
        return children

    def parent(self, ino: int) -> Path | None:
        """The parent path of a view directory; None for the views root (whose parent is /)."""
        path = self.path_of(ino)
        return path[:-1] if path else None

    def ino_of(self, path: Path) -> int:
        return self._remember(path)

    # Every directory shape ends in a study: `<StudyUID>/<SeriesUID>/<leaf>`. `_study_at`
    # says where the study name sits in a path of that top-level view, and `_studies_prefix`
    # which lookup records list the studies of the directory in front of it.

    @staticmethod
    def _study_at(top: str) -> int:
        return {"by-study": 1, "by-date": 4, "by-accession": 3, "by-patient": 3}[top]

    def _studies_prefix(self, path: Path) -> bytes:
        """The `dicom_lookup` prefix of the studies under a by-date, by-accession or
        by-patient directory (the path up to, not including, the study name)."""
        if path[0] == "by-date":
            return self.index.date_prefix(path[1] + path[2] + path[3])
        return self.index.name_prefix(_KINDS[path[0]], *path[1:])

    def _lookup(self, txn: lmdb.Transaction, path: Path, name: str) -> Child:
        if not path:
            if name in self.tops():
                return Child(name, (name,))
            raise fail(errno.ENOENT)
        top, depth = path[0], len(path)
        at = self._study_at(top)
        if depth == at - 1 and top in _KINDS:
            # One seek instead of listing every accession (or patient) of the issuer.
            prefix = self.index.name_prefix(_KINDS[top], path[1], name)
            if next(self.index.lookup(txn, prefix), None) is None:
                raise fail(errno.ENOENT)
            return Child(name, (*path, name))
        if depth < at:
            for child in self._list(txn, path):
                if child.name == name:
                    return child
            raise fail(errno.ENOENT)
        if depth == at:
            if not valid_uid(name) or not self._study_under(txn, path, name):
                raise fail(errno.ENOENT)
            return Child(name, (*path, name))
        if depth == at + 1:
            if not valid_uid(name) or self.index.series(txn, path[at], name) is None:
                raise fail(errno.ENOENT)
            return Child(name, (*path, name))
        if depth == at + 2:
            ino = self._leaf(txn, path[at], path[at + 1], name)
            return Child(name, ino=ino)
        raise fail(errno.ENOENT)

    def _study_under(self, txn: lmdb.Transaction, path: Path, uid: str) -> bool:
        if path[0] == "by-study":
            return self.index.study(txn, uid) is not None
        key = self._studies_prefix(path) + self.index.study_key(uid)
        return next(self.index.lookup(txn, key), None) is not None

    def _leaf(self, txn: lmdb.Transaction, study: str, series: str, name: str) -> int:
        if not name.endswith(LEAF_SUFFIX):
            raise fail(errno.ENOENT)
        stem = name[: -len(LEAF_SUFFIX)]
        sop, _, suffix = stem.partition("~")
        candidates = []
        for ino in self.index.sop_inos(txn, sop):
            entry = self.index.entry(txn, ino)
            if (entry is not None and entry.record.in_views
                    and entry.record.study == study and entry.record.series == series):
                candidates.append(ino)
        if not candidates:
            raise fail(errno.ENOENT)
        candidates.sort()
        if not suffix:
            return candidates[0]
        if suffix.isdigit() and int(suffix) in candidates[1:]:
            return int(suffix)
        raise fail(errno.ENOENT)

    def derived_xattr(self, ino: int, epoch: int | None, name: bytes) -> bytes | None:
        """The value of derived attribute `name` of stored file `ino` as seen at `epoch` (None
        for the live tree), or None when it has none. `user.vnafs.dicom.problem` says why the
        file is listed by `vnafs find --problems` ("incomplete: ...", "sop_conflict: ... in
        (0008,103E)"): a reason and tags, never a DICOM value."""
        if name != PROBLEM_XATTR:
            return None
        index = self.index if epoch is None else self.index.at(epoch)
        with self.db.begin() as txn:
            problem = index.problem(txn, ino)
        return None if problem is None else problem.text().encode()

    def stale_names(self, removed: RemovedInstance) -> list[tuple[int, str]]:
        """(view directory inode, name) of every view name the kernel may still cache for a
        file that just left the index, plus its series and study directories if they went
        too."""
        ino, rec, gone = removed.ino, removed.record, removed.gone
        study, series, date = rec.study, rec.series, rec.date
        bases: list[Path] = [("by-study",)]
        if len(date) == 8 and date.isdigit():
            bases.append(("by-date", date[:4], date[4:6], date[6:]))
        if rec.accession:
            bases.append(("by-accession", self.index.name(rec.accession_issuer),
                          self.index.name(rec.accession)))
        if self.index.by_patient:
            bases.append(("by-patient", self.index.name(rec.issuer),
                          self.index.name(rec.patient_id)))
        out = []
        for base in bases:
            series_dir = (*base, study, series)
            out += [(view_ino(series_dir), f"{rec.sop}{LEAF_SUFFIX}"),
                    (view_ino(series_dir), f"{rec.sop}~{ino}{LEAF_SUFFIX}")]
            if "series" in gone:
                out.append((view_ino((*base, study)), series))
            if "study" in gone:
                out.append((view_ino(base), study))
        return out

    # -- listing ----------------------------------------------------------------------------------

    def _list(self, txn: lmdb.Transaction, path: Path) -> Iterator[Child]:
        if not path:
            for name in self.tops():
                yield Child(name, (name,))
            return
        top, depth = path[0], len(path)
        at = self._study_at(top)
        if depth < at:
            yield from self._list_upper(txn, path)
        elif depth == at:
            for uid in self._studies_under(txn, path):
                yield Child(uid, (*path, uid))
        elif depth == at + 1:
            for series in self.index.series_of(txn, path[at]):
                if valid_uid(series.uid):
                    yield Child(series.uid, (*path, series.uid))
        elif depth == at + 2:
            seen: set[str] = set()
            for ino, sop in self.index.members(txn, path[at], path[at + 1]):
                # Members come in inode order, so the lowest inode of a SOP UID gets the plain
                # name, as `_leaf` expects.
                name = f"{sop}{LEAF_SUFFIX}" if sop not in seen else f"{sop}~{ino}{LEAF_SUFFIX}"
                seen.add(sop)
                yield Child(name, ino=ino)

    def _studies_under(self, txn: lmdb.Transaction, path: Path) -> Iterator[str]:
        if path[0] == "by-study":
            for study in self.index.studies(txn):
                if valid_uid(study.uid):
                    yield study.uid
            return
        for item in self.index.lookup(txn, self._studies_prefix(path)):
            if valid_uid(item.study):
                yield item.study

    def _list_upper(self, txn: lmdb.Transaction, path: Path) -> Iterator[Child]:
        """Directories above the study level: dates, issuers, accessions, patient IDs."""
        top, depth = path[0], len(path)
        if top == "by-date":
            dates = sorted(d for d in self.index.facet(txn, "dates") if _is_date(d))
            parts = {(d[:4], d[4:6], d[6:8]) for d in dates}
            prefix = path[1:]
            names = sorted({p[depth - 1] for p in parts if p[: depth - 1] == prefix})
            for name in names:
                yield Child(name, (*path, name))
            return
        facet = "aissuers" if top == "by-accession" else "pissuers"
        if depth == 1:
            names = sorted({self.index.name(v) for v in self.index.facet(txn, facet)})
            for name in names:
                yield Child(name, (*path, name))
            return
        names = sorted({self.index.name(_free_text(item))
                        for item in self.index.lookup(txn, self.index.name_prefix(_KINDS[top],
                                                                                  path[1]))})
        for name in names:
            yield Child(name, (*path, name))


def _free_text(item: LookupRecord) -> str:
    """The value a by-accession or by-patient directory is named after."""
    if isinstance(item, AccessionLookup):
        return item.accession
    assert isinstance(item, PatientLookup)
    return item.patient_id


def _is_date(value: str) -> bool:
    return len(value) == 8 and value.isdigit()


def dir_mode(root_mode: int) -> int:
    """View directories are read-only copies of the root directory's permissions."""
    return stat.S_IFDIR | (stat.S_IMODE(root_mode) & 0o555)
