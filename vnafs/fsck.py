"""Offline consistency check and repair of a hot store (`vnafs fsck`).

It recomputes from first principles what the metadata should say (link counts from directory
entries, reference counts from block maps, parents from entries, and each block's id from its
content with the store's block-id algorithm) and compares. Repairs are the
conservative ones only: delete what nothing references (half-written blocks, orphan blocks,
orphaned inodes), fix counts, and move unreachable files to `/lost+found` rather than deleting
them. Damage that cannot be repaired (a missing or corrupt block, an unreadable record) is
reported by inode number and block id, never by name: names are PHI.
"""

from __future__ import annotations

import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vnafs.archive.backend import ArchiveError, ArchiveMissing, Backend
from vnafs.archive.log import block_name
from vnafs.audit.chain import AuditLog
from vnafs.errors import IntegrityError
from vnafs.meta.db import INF, TABLES, UNSEALED, read_u64, records, u64
from vnafs.meta.records import (
    ROOT_INO,
    STATE_EVICTED,
    STATE_HOT,
    BlockRef,
    Inode,
    RefCount,
    unpack_dirent,
)
from vnafs.meta.tx import Tx
from vnafs.seal import KIND_BLOCK
from vnafs.store.lifecycle import Store

LOST_FOUND = b"lost+found"


@dataclass
class Report:
    checked_inodes: int = 0
    checked_blocks: int = 0
    # Leftovers of an interrupted run: expected after a crash, harmless, removed by the next
    # mount (and by --repair). They do not make the store unclean.
    tmp_files: int = 0
    orphan_inodes: list[int] = field(default_factory=list)
    orphan_blocks: list[str] = field(default_factory=list)
    # Inconsistencies --repair fixes.
    bad_nlink: list[int] = field(default_factory=list)
    bad_parent: list[int] = field(default_factory=list)
    bad_refcount: list[str] = field(default_factory=list)
    dangling_entries: int = 0
    unreachable: list[int] = field(default_factory=list)
    # Blocks missing or damaged in the hot store whose archive copy is intact (read and
    # authenticated): reads recall them; --repair fetches them back now.
    in_archive: dict[str, list[int]] = field(default_factory=dict)
    archive_error: str | None = None
    # Evicted blocks (tiering): only in the archive by design; with an archive configured,
    # each is looked up there (a missing one is damage).
    evicted_blocks: int = 0
    # Damage: what neither the hot store nor the archive can give back.
    damaged_records: list[str] = field(default_factory=list)
    missing_blocks: dict[str, list[int]] = field(default_factory=dict)
    corrupt_blocks: dict[str, list[int]] = field(default_factory=dict)
    # Blocks that authenticate but whose id is not the store's block-id hash of their content:
    # reads are right, dedup is not. All of them at once means FORMAT names the wrong format.
    misnamed_blocks: dict[str, list[int]] = field(default_factory=dict)
    block_id_algorithm: str = ""
    # The access audit's chain (vnafs/audit/chain.py): the first gap or edit, None when it
    # verifies. Tamper evidence, not damage: fsck never "repairs" an audit record.
    audit_problem: str | None = None
    audit_records: int = 0
    repaired: bool = False

    @property
    def damage(self) -> bool:
        return bool(self.damaged_records or self.missing_blocks or self.corrupt_blocks)

    @property
    def leftovers(self) -> bool:
        return bool(self.tmp_files or self.orphan_inodes or self.orphan_blocks)

    @property
    def clean(self) -> bool:
        return not (self.damage or self.bad_nlink or self.bad_parent or self.bad_refcount
                    or self.dangling_entries or self.unreachable or self.misnamed_blocks
                    or self.audit_problem or (self.in_archive and not self.repaired))

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()} | {"clean": self.clean,
                                                       "damage": self.damage,
                                                       "leftovers": self.leftovers}

    def summary(self) -> str:
        lines = [f"checked {self.checked_inodes} inodes and {self.checked_blocks} blocks"
                 + (f" ({self.evicted_blocks} evicted to the archive)"
                    if self.evicted_blocks else "")]
        removed = "removed" if self.repaired else (
            "harmless; the next mount or fsck --repair removes them")
        for label, n in (
            ("half-written blocks in tmp/", self.tmp_files),
            ("inodes unlinked while open", len(self.orphan_inodes)),
            ("block files of writes never committed", len(self.orphan_blocks)),
        ):
            if n:
                lines.append(f"  leftover from an interrupted run: {label}: {n} ({removed})")
        fixes = "fixed" if self.repaired else "found (run with --repair to fix)"
        for label, n in (
            ("wrong link counts", len(self.bad_nlink)),
            ("wrong directory parents", len(self.bad_parent)),
            ("wrong block reference counts", len(self.bad_refcount)),
            ("entries naming a missing inode", self.dangling_entries),
            ("unreachable inodes (moved to /lost+found)", len(self.unreachable)),
        ):
            if n:
                lines.append(f"  {label}: {n} {fixes}")
        if self.in_archive:
            done = "fetched back from the archive" if self.repaired else (
                "intact in the archive: reads recall them; fsck --repair fetches them now")
            lines.append(f"  blocks missing or damaged in the hot store: {len(self.in_archive)} "
                         f"({done})")
        if self.archive_error:
            lines.append(f"  the archive could not be checked ({self.archive_error}); the "
                         "blocks below may still be there")
        for ino_list, label in ((self.missing_blocks, "missing"), (self.corrupt_blocks,
                                                                    "corrupt")):
            for block, inos in sorted(ino_list.items()):
                lines.append(f"  DAMAGE: block {block} is {label}; it is used by inodes "
                             f"{', '.join(map(str, sorted(set(inos))))} (reads of it give EIO)")
        if self.misnamed_blocks:
            lines.append(f"  blocks whose id is not the {self.block_id_algorithm} of their "
                         f"content: {len(self.misnamed_blocks)} (their data reads back intact "
                         "but does not deduplicate; if FORMAT was edited, put back the version "
                         "the store was made with)")
        for rec in self.damaged_records:
            lines.append(f"  DAMAGE: {rec} failed authentication")
        if self.audit_problem:
            lines.append(f"  AUDIT: {self.audit_problem} (the chain of {self.audit_records} "
                         "records no longer verifies: keep the store as it is and report it; "
                         "vnafs audit verify names the record)")
        if self.clean:
            lines.append("clean")
        return "\n".join(lines)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="block", file=sys.stderr)


def check(store: Store, *, repair: bool = False, verify_data: bool = True,
          progress: bool = True, archive: Backend | None = None) -> Report:
    """Check (and with `repair` fix) an unmounted store. With `archive`, blocks missing or
    damaged in the hot store are looked up there before they are called damage."""
    rep = Report(block_id_algorithm=store.sealer.block_id_algorithm)
    db = store.db
    rep.tmp_files = sum(1 for _ in store.hot.tmp.iterdir())

    inodes: dict[int, Inode] = {}
    links: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    entry_parent: dict[int, int] = {}
    block_users: dict[bytes, list[int]] = {}
    ref_counts: Counter[bytes] = Counter()
    stored_refs: dict[bytes, RefCount] = {}
    dangling: list[tuple[int, bytes]] = []

    with db.begin() as txn:
        for ident, body in _safe_vscan(rep, db, txn, "inodes"):
            ino = read_u64(ident)
            inodes[ino] = Inode.unpack(ino, body)
        for ident, body in _safe_vscan(rep, db, txn, "dirents"):
            parent = read_u64(ident)
            child, name = unpack_dirent(body)
            if child not in inodes:
                dangling.append((parent, name))
                continue
            links[child] += 1
            if stat.S_ISDIR(inodes[child].mode):
                subdirs[parent] += 1
                entry_parent[child] = parent
        # Reference counts count every version of a block map record, live or not.
        for key, value in records(txn.cursor(db=db.dbs["blockmap"])):
            try:
                plain = db.open_record("blockmap", key, value)
            except IntegrityError as exc:
                rep.damaged_records.append(str(exc))
                continue
            ref = BlockRef.unpack(plain[8:])
            ref_counts[ref.block_id] += 1
            if read_u64(plain) == INF:
                block_users.setdefault(ref.block_id, []).append(read_u64(key))
        for key, body in _safe_scan(rep, db, txn, "refs"):
            stored_refs[key] = RefCount.unpack(body)
        orphan_set = {read_u64(k) for k, _ in _safe_scan(rep, db, txn, "orphans")}
        # Every other record (counters, xattrs, the DICOM index, snapshots, pins, tombstones,
        # replication state, and the older versions of inodes and dirents that snapshots
        # read) is only authenticated here; its meaning is checked by use.
        _authenticate_rest(rep, db, txn)

    rep.checked_inodes = len(inodes)
    rep.dangling_entries = len(dangling)
    rep.orphan_inodes = sorted(orphan_set | {i for i, n in inodes.items()
                                             if n.nlink == 0 and i != ROOT_INO})
    for ino, node in inodes.items():
        if ino == ROOT_INO or ino in orphan_set:
            continue
        if stat.S_ISDIR(node.mode):
            if node.nlink != 2 + subdirs[ino]:
                rep.bad_nlink.append(ino)
            if ino in entry_parent and node.parent != entry_parent[ino]:
                rep.bad_parent.append(ino)
            if ino not in entry_parent:
                rep.unreachable.append(ino)
        elif links[ino] == 0 and node.nlink > 0:
            rep.unreachable.append(ino)
        elif node.nlink != links[ino]:
            rep.bad_nlink.append(ino)
    root = inodes.get(ROOT_INO)
    if root is not None and root.nlink != 2 + subdirs[ROOT_INO]:
        rep.bad_nlink.append(ROOT_INO)

    for block_id in set(ref_counts) | set(stored_refs):
        rc = stored_refs.get(block_id)
        if rc is None or rc.count != ref_counts[block_id]:
            rep.bad_refcount.append(block_id.hex())

    on_disk = set(store.hot.ids())
    # A block whose last reference went away before it reached the archive keeps its file
    # and a count-0 record until the replicator has uploaded it (architecture.md 9).
    awaiting_upload = {b for b, rc in stored_refs.items() if rc.count == 0
                       and rc.state == STATE_HOT}
    rep.orphan_blocks = sorted(b.hex() for b in on_disk - set(ref_counts) - awaiting_upload)
    bar = _progress(len(ref_counts), progress and verify_data, "verifying blocks")
    evicted = {b for b, rc in stored_refs.items() if rc.state == STATE_EVICTED}
    in_archive: set[str] | None = None
    if archive is not None and evicted - on_disk:
        try:
            in_archive = {name for name, _ in archive.list("blocks/")}
        except ArchiveError as exc:
            rep.archive_error = str(exc)
    for block_id in ref_counts:
        rep.checked_blocks += 1
        users = block_users.get(block_id, [])
        if block_id in evicted and block_id not in on_disk:
            # Evicted: the archive holds the only copy; reads recall it.
            rep.evicted_blocks += 1
            if in_archive is not None and block_name(block_id) not in in_archive:
                rep.missing_blocks[block_id.hex()] = users
        elif block_id not in on_disk:
            rep.missing_blocks[block_id.hex()] = users
        elif verify_data:
            try:
                content = store.hot.get(block_id)
            except IntegrityError:
                rep.corrupt_blocks[block_id.hex()] = users
            else:
                if store.sealer.block_id(content) != block_id:
                    rep.misnamed_blocks[block_id.hex()] = users
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    audit = AuditLog(db, store.keyring.audit_key).verify()
    rep.audit_records, rep.audit_problem = audit.records, audit.problem
    if archive is not None and (rep.missing_blocks or rep.corrupt_blocks):
        _check_archive(store, archive, rep, stored_refs, repair)
    if repair:
        _repair(store, rep, inodes, links, subdirs, entry_parent, ref_counts, stored_refs,
                dangling)
    return rep


def _check_archive(store: Store, archive: Backend, rep: Report,
                   stored_refs: dict[bytes, RefCount], repair: bool) -> None:
    """Move blocks whose archive copy reads back and authenticates from damage to
    `in_archive`; with `repair`, put that copy back into the hot store."""
    for found in (rep.missing_blocks, rep.corrupt_blocks):
        for hexid in list(found):
            block_id = bytes.fromhex(hexid)
            rc = stored_refs.get(block_id)
            if rc is None or rc.state == STATE_HOT:
                continue  # never replicated: the archive cannot have it
            try:
                envelope = archive.get(block_name(block_id))
                store.sealer.check(KIND_BLOCK, block_id, envelope)
            except ArchiveMissing:
                continue
            except ArchiveError as exc:
                rep.archive_error = str(exc)
                return
            except IntegrityError:
                continue  # damaged there too: stays damage
            rep.in_archive[hexid] = found.pop(hexid)
            if repair:
                store.hot.put_envelope(block_id, envelope)


# Tables whose every record the checks above already opened.
_FULLY_SCANNED = frozenset({"blockmap", "refs", "orphans"})
# Tables whose values are not sealed (docs/format.md 5.3): nothing to authenticate.


def _authenticate_rest(rep: Report, db: Any, txn: Any) -> None:
    seen = set(rep.damaged_records)
    for table in TABLES:
        if table in _FULLY_SCANNED or table in UNSEALED:
            continue
        for key, value in records(txn.cursor(db=db.dbs[table])):
            try:
                db.open_record(table, key, value)
            except IntegrityError as exc:
                if str(exc) not in seen:  # a live inode or dirent is reported once
                    seen.add(str(exc))
                    rep.damaged_records.append(str(exc))


def _safe_scan(rep: Report, db: Any, txn: Any, table: str) -> Any:
    for key, value in records(txn.cursor(db=db.dbs[table])):
        try:
            yield key, db.open_record(table, key, value)
        except IntegrityError as exc:
            rep.damaged_records.append(str(exc))


def _safe_vscan(rep: Report, db: Any, txn: Any, table: str) -> Any:
    last: bytes | None = None
    for key, value in records(txn.cursor(db=db.dbs[table])):
        ident = key[:-8]
        if ident == last:
            continue
        last = ident
        try:
            plain = db.open_record(table, key, value)
        except IntegrityError as exc:
            rep.damaged_records.append(str(exc))
            continue
        if read_u64(plain) == INF:
            yield ident, plain[8:]


def _repair(store: Store, rep: Report, inodes: dict[int, Inode], links: Counter[int],
            subdirs: Counter[int], entry_parent: dict[int, int], ref_counts: Counter[bytes],
            stored_refs: dict[bytes, RefCount], dangling: list[tuple[int, bytes]]) -> None:
    db, ns = store.db, store.ns
    store.hot.sweep_tmp()
    with db.begin(write=True) as txn:
        tx = Tx(txn, time.time_ns())
        for parent, name in dangling:
            ns._unlink_entry(tx, parent, name)
        for hexid in rep.bad_refcount:
            block_id = bytes.fromhex(hexid)
            n = ref_counts[block_id]
            old = stored_refs.get(block_id)
            if n == 0:
                db.delete(txn, "refs", block_id)
            else:
                rc = RefCount(n, old.state if old else STATE_HOT, old.stored if old else 0)
                db.put(txn, "refs", block_id, rc.pack())
        lost_found = _lost_found(tx, store) if rep.unreachable else None
        for ino in rep.unreachable:
            node = inodes[ino]
            ns.link_entry(tx, lost_found or ROOT_INO, str(ino).encode(), ino)
            if stat.S_ISDIR(node.mode):
                node.parent = lost_found or ROOT_INO
                subdirs[node.parent] += 1
            else:
                node.nlink = links[ino] + 1
            ns.save(tx, node)
        for ino in rep.bad_parent:
            node = ns.need_inode(txn, ino)
            node.parent = entry_parent[ino]
            ns.save(tx, node)
        for ino in rep.bad_nlink:
            node = ns.need_inode(txn, ino)
            node.nlink = 2 + subdirs[ino] if stat.S_ISDIR(node.mode) else links[ino]
            ns.save(tx, node)
            if node.nlink == 0:
                db.put(txn, "orphans", u64(ino), b"")
                rep.orphan_inodes.append(ino)
        for ino in rep.orphan_inodes:
            db.put(txn, "orphans", u64(ino), b"")
            ns.free_orphan(tx, ino)
    for block_id in tx.freed_blocks:
        store.hot.delete(block_id)
    for hexid in rep.orphan_blocks:
        store.hot.delete(bytes.fromhex(hexid))
    rep.repaired = True


def _lost_found(tx: Tx, store: Store) -> int:
    ns = store.ns
    existing = ns.child(tx.txn, ROOT_INO, LOST_FOUND)
    if existing is not None:
        return existing
    node = ns.mknod(tx, ROOT_INO, LOST_FOUND, stat.S_IFDIR | 0o700, 0, 0)
    return node.ino
