"""Key operations on a hot store: replace a KEK (rewrap), add and remove key slots, list them,
rotate the data key, re-seal, retire an old data key.

Why a module of its own: the same operations run offline, on an unmounted hot store under its
lock (as `fsck` does), and inside a running daemon, through the control socket on the keyring
the daemon holds (so that its seal-count reservations, which rewrite the keyring too, and the key
change never race). This is the one place that turns an operation into `Keyring` calls and a
report; the CLI only resolves the key sources and picks the route, and the control server only
hands the request over. The slot operations re-encrypt no data: the payload (master secret, data
keys) is sealed under a keyring key that the slots wrap (docs/format.md section 3); re-sealing
data is vnafs/reseal.py's, and `retire` asks it first.

The control requests carry the key material (hex) on the control socket, which is mode 0600 and
root's; it is never logged, and the daemon keeps none of it after the request.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vnafs import config as config_mod
from vnafs.errors import VnafsError
from vnafs.keys import KEK_BYTES, KekSource, Keyring, Slot, read_slots
from vnafs.reseal import Resealer, ResealReport, find_sealed
from vnafs.store.lifecycle import Store, archive_backend, lock_store, open_store
from vnafs.store.marker import read_format

if TYPE_CHECKING:
    from vnafs.archive.backend import Backend

log = logging.getLogger("vnafs.keys")

REWRAP = "key_rewrap"
ADD_SLOT = "key_add_slot"
REMOVE_SLOT = "key_remove_slot"
ROTATE = "key_rotate"
RETIRE = "key_retire"
OPS = (REWRAP, ADD_SLOT, REMOVE_SLOT, ROTATE, RETIRE)
# Requests whose scrypt runs may take a while (several passphrase slots tried).
REQUEST_TIMEOUT = 300.0


# -- key sources on the control socket -------------------------------------------------------------


def source_to_wire(source: KekSource) -> dict[str, str]:
    if source.key is not None:
        return {"key": source.key.hex(), "origin": source.origin}
    assert source.passphrase is not None
    return {"passphrase": source.passphrase.hex(), "origin": source.origin}


def source_from_wire(doc: Any, field: str) -> KekSource:
    bad = VnafsError(f"bad control request: field {field!r} is not a key source")
    if not isinstance(doc, dict) or not isinstance(doc.get("origin", ""), str):
        raise bad
    try:
        if isinstance(doc.get("key"), str):
            key = bytes.fromhex(doc["key"])
            if len(key) != KEK_BYTES:
                raise bad
            return KekSource(key=key, origin=doc.get("origin", ""))
        if isinstance(doc.get("passphrase"), str):
            phrase = bytes.fromhex(doc["passphrase"])
            if not phrase:
                raise bad
            return KekSource(passphrase=phrase, origin=doc.get("origin", ""))
    except ValueError:
        raise bad from None
    raise bad


def request(op: str, auth: KekSource, new: KekSource | None = None, *,
            label: str | None = None, slot: int | None = None,
            drop_other_slots: bool = False, version: int | None = None) -> dict[str, Any]:
    """The control request for `op` (one of OPS)."""
    req: dict[str, Any] = {"op": op, "auth": source_to_wire(auth)}
    if drop_other_slots:
        req["drop_other_slots"] = True
    if version is not None:
        req["version"] = version
    if new is not None:
        req["new"] = source_to_wire(new)
    if label is not None:
        req["label"] = label
    if slot is not None:
        req["slot"] = slot
    return req


# -- the operations --------------------------------------------------------------------------------


def apply(ring: Keyring, op: str, auth: KekSource, new: KekSource | None = None, *,
          label: str | None = None, slot: int | None = None,
          drop_other_slots: bool = False) -> dict[str, Any]:
    """Run one key operation on an open keyring; the report (no secrets). Either the keyring
    file is replaced whole (atomically, durably) or, on any error, not touched."""
    started = time.perf_counter()
    changed: Slot
    extra: dict[str, Any] = {}
    if op == ROTATE:
        version, changed, dropped = ring.rotate(auth, drop_other_slots=drop_other_slots)
        done = "rotated"
        extra = {"data_key_version": version, "dropped": [s.public() for s in dropped],
                 "data_key_versions": ring.versions}
        log.info("data key rotated: version %d is current, the keyring key is new, %d other "
                 "slots dropped", version, len(dropped))
    elif op == REWRAP:
        if new is None:
            raise VnafsError("bad control request: field 'new' is missing")
        changed = ring.rewrap(auth, new)
        done = "rewrapped"
    elif op == ADD_SLOT:
        if new is None:
            raise VnafsError("bad control request: field 'new' is missing")
        changed = ring.add_slot(auth, new, label=label or "")
        done = "added"
    elif op == REMOVE_SLOT:
        changed = ring.remove_slot(auth, number=slot, label=label)
        done = "removed"
    else:
        raise VnafsError(f"bad control request: unknown key operation {op!r}")
    seconds = time.perf_counter() - started
    if op != ROTATE:
        log.info("key slot %d (%s%s) %s; keyring version %d, %d slots", changed.number,
                 changed.kind, f", label {changed.label!r}" if changed.label else "", done,
                 ring.format_version, len(ring.slots))
    return {"op": op, "done": done, "slot": changed.public(),
            "slots": [s.public() for s in ring.slots], "keyring_version": ring.format_version,
            "seconds": round(seconds, 6), **extra}


def retire(store: Store, backend: Backend | None, auth: KekSource, version: Any
           ) -> dict[str, Any]:
    """`vnafs key retire`: drop data key `version` once nothing is sealed under it any more,
    in the hot store or in the archive (vnafs/reseal.py `find_sealed`); else one line saying
    what still is, and nothing changes."""
    if not isinstance(version, int) or isinstance(version, bool):
        raise VnafsError("bad control request: field 'version' is not a number")
    started = time.perf_counter()
    store.keyring.check_retirable(version)
    sealed = find_sealed(store.db, store.hot, backend, version)
    if sealed.total:
        where = ", ".join(f"{n} {what}" for n, what in (
            (sealed.records, "metadata records"), (sealed.blocks, "block files"),
            (sealed.archive_objects, "archive objects")) if n)
        raise VnafsError(
            f"data key version {version} still seals {where} (e.g. {sealed.examples[0]}): run "
            "'vnafs key reseal', let replication catch up ('vnafs status': nothing pending), "
            "then retry (nothing was changed)")
    store.keyring.retire(auth, version)
    log.info("data key version %d retired; versions left %s", version, store.keyring.versions)
    return {"op": RETIRE, "done": "retired", "version": version,
            "data_key_versions": store.keyring.versions, "retired": store.keyring.retired,
            "archive_checked": backend is not None,
            "seconds": round(time.perf_counter() - started, 6)}


def apply_request(store: Store, req: dict[str, Any]) -> dict[str, Any]:
    """A key request arriving on a mounted store's control socket (in a worker thread)."""
    op = req.get("op")
    auth = source_from_wire(req.get("auth"), "auth")
    if op == RETIRE:
        result = retire(store, archive_backend(store), auth, req.get("version"))
        return {**result, "hot": str(store.root), "through": "mount",
                "archive": store.config.archive_url}
    new = source_from_wire(req.get("new"), "new") if op in (REWRAP, ADD_SLOT) else None
    label, slot = req.get("label"), req.get("slot")
    if label is not None and not isinstance(label, str):
        raise VnafsError("bad control request: field 'label' is not text")
    if slot is not None and (not isinstance(slot, int) or isinstance(slot, bool)):
        raise VnafsError("bad control request: field 'slot' is not a number")
    result = apply(store.keyring, str(op), auth, new, label=label, slot=slot,
                   drop_other_slots=req.get("drop_other_slots") is True)
    return {**result, "hot": str(store.root), "through": "mount",
            "archive": store.config.archive_url}


def check_hot(hot: Path) -> Path:
    """`hot` resolved, once it is known to be a hot store (before any passphrase is asked)."""
    hot = Path(hot).resolve()
    read_format(hot)
    return hot


def _lock_unless_mounted(hot: Path) -> int | None:
    """The store's lock (its fd), or None when a running daemon holds the store (its control
    socket is there): the operation then goes to that daemon."""
    try:
        return lock_store(hot)
    except VnafsError:
        if (hot / "control.sock").exists():
            return None
        raise


def change_offline(hot: Path, op: str, auth: KekSource, new: KekSource | None = None, *,
                   label: str | None = None, slot: int | None = None,
                   drop_other_slots: bool = False, version: int | None = None
                   ) -> dict[str, Any] | None:
    """Run `op` on an unmounted hot store, under its lock. None when a running daemon holds the
    store (its control socket is there): the request then goes to that daemon."""
    hot = check_hot(hot)
    fd = _lock_unless_mounted(hot)
    if fd is None:
        return None
    try:
        if op == RETIRE:
            store = open_store(hot, auth, lock=False)
            try:
                result = retire(store, archive_backend(store), auth, version)
            finally:
                store.close()
        else:
            ring = Keyring.open(hot / "keyring", auth)
            result = apply(ring, op, auth, new, label=label, slot=slot,
                           drop_other_slots=drop_other_slots)
    finally:
        os.close(fd)
    try:
        archive = config_mod.load(hot).archive_url
    except VnafsError:
        archive = None
    return {**result, "hot": str(hot), "through": "offline", "archive": archive}


def list_slots(hot: Path, source: KekSource | None = None) -> dict[str, Any]:
    """The slots of a hot store's keyring, read from its header (no key needed, no lock: the
    file is only ever replaced whole). With `source`, the keyring is opened, which
    authenticates the table, and `opened_by` names the slot that key opens. `hot` may also be
    the cache of a read-only archive mount (which holds the archive's keyring, no FORMAT)."""
    hot = Path(hot).resolve()
    path = hot / "keyring"
    opened = None
    if source is None:
        version, slots = read_slots(path)
    else:
        ring = Keyring.open(path, source)
        version, slots, opened = ring.format_version, ring.slots, ring.opened_slot
    return {"hot": str(hot), "keyring_version": version, "slots": [s.public() for s in slots],
            "opened_by": opened}


# -- re-seal (vnafs/reseal.py) ---------------------------------------------------------------------


def reseal_offline(hot: Path, auth: KekSource) -> ResealReport | None:
    """`vnafs key reseal` on an unmounted hot store; None when a daemon holds it. The archive
    gets its blocks at once; its metadata with a checkpoint at the next mount's first cycle."""
    hot = check_hot(hot)
    fd = _lock_unless_mounted(hot)
    if fd is None:
        return None
    try:
        store = open_store(hot, auth, lock=False)
        try:
            report = Resealer(store.db, store.hot, store.sealer, archive_backend(store)).run()
            store.hot.syncfs()
            if store.config.archive_url:
                request_checkpoint(store)
        finally:
            store.close()
    finally:
        os.close(fd)
    report.finished = True
    return report


def request_checkpoint(store: Store) -> None:
    """What `Replicator.after_reseal` does, for the next mount: its first cycle is a checkpoint
    that uploads `config` again, so every record and the config reach the archive sealed under
    the current key, and object retention is set again on the re-sealed objects' versions."""
    from vnafs.archive import retention
    from vnafs.archive.log import load_state, save_state

    state = load_state(store.db)
    state.since_checkpoint = max(state.since_checkpoint, store.config.archive.checkpoint_every)
    state.config_sha256 = ""
    with store.db.begin(write=True) as txn:
        save_state(store.db, txn, state)
        retention.save_state(store.db, txn, retention.RetentionState())
    store.db.env.sync(True)
