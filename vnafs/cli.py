"""The `vnafs` command.

Each subcommand is a thin function over `daemon` (and `fsck`); every error a user can cause
arrives here as a `VnafsError` and is printed as one line, exit status 1. `mount` forks after
parsing so that the parent can wait for the daemon to report that the file system is mounted,
or why it is not: the exit status of `vnafs mount` is always the truth.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vnafs import FORMAT_VERSION, __version__, logs
from vnafs.errors import VnafsError

if TYPE_CHECKING:
    from vnafs.archive.follower import ArchiveFollower
    from vnafs.keys import KekSource
    from vnafs.store.lifecycle import Store

log = logging.getLogger("vnafs")


def _key_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--key-file", help="file holding the 256-bit key (from 'vnafs keygen')")
    g.add_argument("--passphrase-env", metavar="VAR",
                   help="environment variable holding a passphrase (stretched with scrypt; "
                   "removed from the environment once read)")
    g.add_argument("--passphrase-prompt", action="store_true",
                   help="ask for the passphrase on the terminal")
    g.add_argument("--passphrase-fd", metavar="N", type=int,
                   help="read the passphrase from file descriptor N (its first line)")
    g.add_argument("--key-command", metavar="CMD",
                   help="run CMD (split as by a shell, run without one) and use what it prints: "
                   "a key if 64 hex digits or 32 bytes, else a passphrase")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help='report as one JSON object (docs/admin.md, "JSON output")')


def _source(args: argparse.Namespace, *, prompt: str = "Passphrase: ",
            passphrase_only: bool = False) -> KekSource:
    from vnafs.keys import resolve_kek_source

    fd = getattr(args, "passphrase_fd", None)
    source = resolve_kek_source(
        args.key_file, args.passphrase_env, passphrase_fd=fd,
        key_command=getattr(args, "key_command", None),
        passphrase_prompt=getattr(args, "passphrase_prompt", False), prompt=prompt,
        passphrase_only=passphrase_only)
    # A daemon forked later must not inherit the descriptor (unless the new key comes next).
    if fd is not None and fd != getattr(args, "new_passphrase_fd", None):
        _close_fd(fd)
    return source


def _close_fd(fd: int | None) -> None:
    import contextlib

    if fd is not None and fd > 2:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- subcommands ----------------------------------------------------------------------------------

# The version of every `--json` output (docs/admin.md, "JSON output"): fields are only ever
# added within a version; a change that removes or renames one bumps it.
JSON_SCHEMA = 1


def _report(args: argparse.Namespace, text: str, data: dict[str, Any]) -> None:
    """One line for people, or with --json one object for programs."""
    if getattr(args, "json", False):
        print(json.dumps({"schema": JSON_SCHEMA, **data}, indent=2, sort_keys=True))
    else:
        print(text)


def cmd_keygen(args: argparse.Namespace) -> int:
    from vnafs.keys import generate_key_file

    generate_key_file(Path(args.path))
    print(f"wrote a new 256-bit key to {args.path} (mode 0600); keep a copy off this machine: "
          "without it the data cannot be read")
    return 0


# -- vnafs key: rewrap, passwd, add-slot, remove-slot, slots (docs/admin.md, "Keys") ------------


def _new_key_args(p: argparse.ArgumentParser, *, passphrase_only: bool = False) -> None:
    g = p.add_mutually_exclusive_group()
    if not passphrase_only:
        g.add_argument("--new-key-file", metavar="FILE",
                       help="the new 256-bit key (from 'vnafs keygen')")
    g.add_argument("--new-passphrase-prompt", action="store_true",
                   help="ask for the new passphrase on the terminal (twice)")
    g.add_argument("--new-passphrase-fd", metavar="N", type=int,
                   help="read the new passphrase from file descriptor N (its first line; the "
                   "next line when the old one came from N too)")
    g.add_argument("--new-passphrase-env", metavar="VAR",
                   help="environment variable holding the new passphrase")
    g.add_argument("--new-key-command", metavar="CMD",
                   help="run CMD and use what it prints as the new key or passphrase")


def _key_given(args: argparse.Namespace) -> bool:
    return bool(args.key_file or args.passphrase_env or args.passphrase_prompt
                or args.passphrase_fd is not None or args.key_command is not None)


def _new_key_given(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "new_key_file", None) or args.new_passphrase_env
                or args.new_passphrase_prompt or args.new_passphrase_fd is not None
                or args.new_key_command is not None)


def _key_target(path: str) -> tuple[Path, bool]:
    """(hot store, mounted) for the HOT|MNT argument of `vnafs key`."""
    from vnafs import control, keyadmin

    target = Path(path).resolve()
    found = control.find_mount(target)
    if found is not None:
        if found[0] != "fuse.vnafs":
            raise VnafsError(f"{target} is a mount of {found[0]}, not of vnafs: give a vnafs "
                             "mount point or hot store")
        return Path(found[1]), True
    return keyadmin.check_hot(target), False


def cmd_key(args: argparse.Namespace) -> int:
    from vnafs import control, keyadmin
    from vnafs.keys import resolve_new_kek_source

    action = args.key_action
    hot, mounted = _key_target(args.target)
    if action == "slots":
        listing = keyadmin.list_slots(hot, _source(args) if _key_given(args) else None)
        _print_slots(args, listing)
        return 0
    if action == "reseal":
        return _key_reseal(args, hot, mounted)
    passwd = action == "passwd"
    if passwd and not _key_given(args):
        args.passphrase_prompt = True
    if passwd and not _new_key_given(args):
        args.new_passphrase_prompt = True
    auth = _source(args, prompt=f"{'Current passphrase' if passwd else 'Passphrase'} of {hot}: ",
                   passphrase_only=passwd)
    new = None
    if action not in ("remove-slot", "rotate", "retire"):
        new = resolve_new_kek_source(
            getattr(args, "new_key_file", None), args.new_passphrase_env,
            passphrase_fd=args.new_passphrase_fd, key_command=args.new_key_command,
            passphrase_prompt=args.new_passphrase_prompt, passphrase_only=passwd)
        _close_fd(args.new_passphrase_fd)
        _close_fd(args.passphrase_fd)
    op = {"rewrap": keyadmin.REWRAP, "passwd": keyadmin.REWRAP, "add-slot": keyadmin.ADD_SLOT,
          "remove-slot": keyadmin.REMOVE_SLOT, "rotate": keyadmin.ROTATE,
          "retire": keyadmin.RETIRE}[action]
    label = getattr(args, "label", None)
    slot = getattr(args, "slot", None)
    drop = bool(getattr(args, "drop_other_slots", False))
    version = getattr(args, "version", None)
    started = time.perf_counter()
    result = None if mounted else keyadmin.change_offline(
        hot, op, auth, new, label=label, slot=slot, drop_other_slots=drop, version=version)
    if result is None:
        result = control.control_request(
            hot, keyadmin.request(op, auth, new, label=label, slot=slot, drop_other_slots=drop,
                                  version=version),
            timeout=keyadmin.REQUEST_TIMEOUT)
    result["total_seconds"] = round(time.perf_counter() - started, 6)
    via = " through its mount" if result["through"] == "mount" else ""
    if op == keyadmin.RETIRE:
        _report(args, f"retired data key version {result['version']} of {hot}{via}: nothing in "
                f"the hot store{' or the archive' if result['archive_checked'] else ''} is "
                f"sealed under it; versions left: "
                f"{', '.join(map(str, result['data_key_versions']))}", result)
        return 0
    changed = result["slot"]
    what = f"key slot {changed['slot']} ({changed['kind']}" + (
        f", label {changed['label']!r})" if changed["label"] else ")")
    if result["archive"]:
        follows = ("; the archive's copy follows with the next replication cycle"
                   if result["through"] == "mount" else
                   "; the archive's copy follows with the first replication cycle once mounted")
    else:
        follows = ""
    if op == keyadmin.ROTATE:
        dropped = "".join(f"; removed slot {d['slot']}" + (f" ({d['label']})" if d["label"]
                                                            else "") for d in result["dropped"])
        text = (f"data key version {result['data_key_version']} of {hot} is current{via}: new "
                f"writes are sealed under it, older data stays readable (re-seal it with 'vnafs "
                f"key reseal'); the keyring key is new and {what} wraps it{dropped}{follows}")
    elif op == keyadmin.REWRAP:
        assert new is not None
        text = (f"{what} of {hot} now opens with {new.origin}, and {auth.origin} no longer "
                f"does: the keyring was resealed{via}, no data was re-encrypted{follows}")
    elif op == keyadmin.ADD_SLOT:
        assert new is not None
        text = f"added {what} to {hot}{via}: {new.origin} opens it too{follows}"
    else:
        text = (f"removed {what} from {hot}{via}; {len(result['slots'])} "
                f"slot{'s' if len(result['slots']) != 1 else ''} left{follows}")
    _report(args, text, result)
    return 0


def _key_reseal(args: argparse.Namespace, hot: Path, mounted: bool) -> int:
    """`vnafs key reseal`: offline at once, or through the mount as a background job whose
    progress this polls."""
    from tqdm import tqdm

    from vnafs import control, keyadmin

    started = time.perf_counter()
    rep: dict[str, Any] | None = None
    if not mounted:
        auth = _source(args, prompt=f"Passphrase of {hot}: ")
        _close_fd(args.passphrase_fd)
        report = keyadmin.reseal_offline(hot, auth)
        rep = None if report is None else {**report.as_dict(), "through": "offline"}
    if rep is None:
        rep = control.control_request(hot, {"op": "key_reseal"})
        with tqdm(total=None, unit="block", desc="re-seal",
                  disable=args.json or (not sys.stderr.isatty() and not args.progress)) as bar:
            while not rep["finished"]:
                time.sleep(0.5)
                rep = control.control_request(hot, {"op": "key_reseal_progress"})
                bar.total = rep["blocks_total"] or bar.total
                bar.update(rep["blocks_checked"] - bar.n)
        rep["through"] = "mount"
    if rep.get("error"):
        raise VnafsError(f"re-seal stopped: {rep['error']}; run it again, it goes on where "
                         "anything is still sealed under an old key")
    rep["total_seconds"] = round(time.perf_counter() - started, 6)
    archive = (f", {rep['archive_resealed']} of {rep['archive_checked']} archive blocks"
               if rep["archive_checked"] else "")
    follows = (" the archive's metadata follows with the next replication cycle (a checkpoint)"
               if rep["through"] == "mount" else
               " the archive's metadata follows with the first replication cycle once mounted")
    _report(args, f"re-sealed under data key version {rep['to_version']}: "
            f"{rep['records_resealed']} of {rep['records_checked']} metadata records, "
            f"{rep['blocks_resealed']} of {rep['blocks_checked']} block files{archive} "
            f"({rep['bytes_resealed'] / (1 << 20):.1f} MiB in {rep['seconds']:.1f} s);{follows}",
            rep)
    return 0


def _print_slots(args: argparse.Namespace, listing: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA, **listing}, indent=2, sort_keys=True))
        return
    slots = listing["slots"]
    print(f"keyring of {listing['hot']}: version {listing['keyring_version']}, "
          f"{len(slots)} key slot{'s' if len(slots) != 1 else ''}")
    print(f"{'SLOT':>4}  {'KIND':10}  {'CREATED (UTC)':19}  LABEL")
    for s in slots:
        created = (s["created"] or "-").replace("T", " ").removesuffix("Z")
        print(f"{s['slot']:>4}  {s['kind']:10}  {created:19}  {s['label'] or '-'}")
    if listing["opened_by"] is not None:
        print(f"the key given opens slot {listing['opened_by']}")


def cmd_mkfs(args: argparse.Namespace) -> int:
    from vnafs.store.lifecycle import mkfs

    hot = Path(args.hot).resolve()
    existed = hot.exists()
    source = _source(args)
    mkfs(hot, source, archive_url=args.archive, uid=os.getuid(), gid=os.getgid(),
         credentials=args.credentials, format_version=args.format)
    if args.archive:
        try:
            _first_replication(hot, source)
        except VnafsError as exc:
            # Nothing half-made stays behind: the directory was empty or absent before.
            for child in hot.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            if not existed:
                hot.rmdir()
            raise VnafsError(f"{exc} (nothing was created)") from None
        _report(args, f"created vnafs hot store {hot}; its keyring and first checkpoint are "
                f"in the archive {args.archive}", {"hot": str(hot), "archive": args.archive})
        return 0
    _report(args, f"created vnafs hot store {hot}", {"hot": str(hot), "archive": None})
    return 0


def _first_replication(hot: Path, source: KekSource) -> None:
    """Write the keyring, the configuration and a first checkpoint into the archive now, so
    the archive is checked for writing and a restore works from the first minute."""
    import trio

    from vnafs.archive.backend import ArchiveError
    from vnafs.archive.replicator import replicate_once
    from vnafs.store.lifecycle import archive_backend, open_store

    store = open_store(hot, source)
    try:
        backend = archive_backend(store)
        assert backend is not None
        trio.run(replicate_once, store, backend)
    except ArchiveError as exc:
        raise VnafsError(f"the archive cannot be written: {exc}") from None
    finally:
        store.close()


def cmd_mount(args: argparse.Namespace) -> int:
    from vnafs import config, daemon
    from vnafs.store import marker

    mnt = Path(args.mountpoint).resolve()
    source = _source(args)
    daemon.check_dev_fuse()
    daemon.check_mountpoint(mnt, None if args.archive_only else Path(args.hot))
    if args.archive_only:
        from vnafs.archive.follower import default_cache

        url = config.validate_archive_url(args.hot)
        hot = Path(args.cache).resolve() if args.cache else default_cache(url, mnt)
        config.apply_mount_options(config.Config(), args.options)
        credentials = Path(args.credentials) if args.credentials else None
        opener: Callable[[], tuple[Store, ArchiveFollower | None]] = partial(
            _open_archive, url, source, hot, credentials, args.options)
    else:
        hot = Path(args.hot).resolve()
        marker.read_format(hot)
        config.apply_mount_options(config.load(hot), args.options)  # validate before forking
        opener = partial(_open_hot, hot, source, args.options)
    if "," in str(hot):
        raise VnafsError("the hot store path must not contain a comma: move or rename it")
    if args.foreground:
        hot.mkdir(mode=0o700, parents=True, exist_ok=True)
        logs.setup(hot, stderr=True)
        return _run_daemon(hot, mnt, opener, lambda msg: None, args.options)

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        code = 1
        try:
            hot.mkdir(mode=0o700, parents=True, exist_ok=True)
            logs.setup(hot, stderr=False)

            def report(msg: str | None) -> None:
                os.write(write_fd, b"OK\n" if msg is None else b"ERR " + msg.encode() + b"\n")

            code = _run_daemon(hot, mnt, opener, report, args.options)
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line == "OK":
        what = f"archive {args.hot} (read-only)" if args.archive_only else str(hot)
        _report(args, f"mounted {what} at {mnt}",
                {"mountpoint": str(mnt), "hot": str(hot), "read_only": args.archive_only,
                 "archive": args.hot if args.archive_only else None})
        return 0
    if line.startswith("ERR "):
        raise VnafsError(line[4:])
    raise VnafsError(f"the vnafs daemon exited during start-up: see {hot}/vnafs.log")


def _open_hot(hot: Path, source: KekSource, options: list[str]) -> tuple[Store, None]:
    from vnafs import config
    from vnafs.store.lifecycle import open_store

    store = open_store(hot, source)
    config.apply_mount_options(store.config, options)
    return store, None


def _open_archive(url: str, source: KekSource, cache: Path, credentials: Path | None,
                  options: list[str]) -> tuple[Store, ArchiveFollower]:
    from vnafs import config
    from vnafs.archive.follower import ArchiveFollower, open_archive_store

    store, backend = open_archive_store(url, source, cache, credentials)
    config.apply_mount_options(store.config, options)
    return store, ArchiveFollower(store, backend, poll=store.config.archive.poll)


def _run_daemon(hot: Path, mnt: Path,
                opener: Callable[[], tuple[Store, ArchiveFollower | None]],
                report: Callable[[str | None], None], options: list[str]) -> int:
    import trio

    from vnafs import daemon, heap

    heap.keep_freed_buffers()
    reported = False

    def ready(msg: str | None) -> None:
        nonlocal reported
        reported = True
        report(msg)

    try:
        store, follower = opener()
    except VnafsError as exc:
        ready(str(exc))
        if report is not None:
            print(f"vnafs: {exc}", file=sys.stderr)
        return 1
    logs.set_level(store.config.log.level)
    try:
        try:
            trio.run(partial(daemon.serve, follower=follower, options=options), store, mnt,
                     ready)
        except BaseExceptionGroup as group:
            # trio's nurseries wrap what their tasks raise: a VnafsError from one of them is
            # still the one line for the admin, not an internal error.
            matched, _ = group.split(VnafsError)
            first: BaseException | None = matched
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            if first is None:
                raise
            raise first from None
        return 0
    except VnafsError as exc:
        log.error("%s", exc)
        if not reported:
            ready(str(exc))
        return 1
    except BaseException:
        log.exception("vnafs daemon failed")
        if not reported:
            ready(f"internal error; see {hot}/vnafs.log")
        return 1
    finally:
        store.close()


def cmd_umount(args: argparse.Namespace) -> int:
    from vnafs.control import hot_store_of
    from vnafs.store.lifecycle import lock_store

    mnt = Path(args.mountpoint).resolve()
    hot = hot_store_of(mnt)
    res = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        if "busy" in res.stderr.lower():
            raise VnafsError(f"{mnt} is busy: close the files and shells using it "
                             f"(fuser -vm {mnt} lists them), then try again")
        raise VnafsError(f"unmounting {mnt} failed: {res.stderr.strip()}")
    # The daemon commits and closes its stores after the kernel lets go: wait for its lock.
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            fd = lock_store(hot)
        except VnafsError:
            time.sleep(0.05)
            continue
        os.close(fd)
        _report(args, f"unmounted {mnt}", {"mountpoint": str(mnt), "hot": str(hot)})
        return 0
    raise VnafsError(f"{mnt} is unmounted but the daemon has not finished after "
                     f"{args.timeout:.0f} s: see {hot}/vnafs.log")


def cmd_status(args: argparse.Namespace) -> int:
    from vnafs import control  # light: no trio, no LMDB

    hot = control.hot_store_of(Path(args.mountpoint))
    st = control.control_request(hot, {"op": "status"})
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA, **st}, indent=2, sort_keys=True))
        return 0
    gib = 1 << 30
    print(f"vnafs {st['version']} (format {st['format']})  health: {st['health']}")
    print(f"  mount point   {st['mountpoint']}")
    disk = st["disk"]
    print(f"  hot store     {st['hot_store']}  "
          f"({disk['free_bytes'] / gib:.1f} GiB free of {disk['size_bytes'] / gib:.1f})")
    _print_archive(st.get("archive"))
    print(f"  inodes        {st['inodes']}   directory entries {st['dirents']}")
    print(f"  blocks        {st['blocks']}  ({st['block_bytes_stored'] / (1 << 20):.1f} MiB "
          "sealed on disk)")
    print(f"  open files    {st.get('open_files', 0)}   dirty blocks {st.get('dirty_blocks', 0)}")
    keys = st["keys"]
    retired = (f", retired {', '.join(map(str, keys['retired']))}"
               if keys.get("retired") else "")
    print(f"  data key      version {keys['current_version']} (held: "
          f"{', '.join(map(str, keys.get('data_key_versions', [])))}{retired})")
    dicom = st.get("dicom")
    if dicom is not None:
        print(f"  DICOM         {dicom['instances']} instances in {dicom['studies']} studies, "
              f"{dicom['series']} series; {dicom['pending']} files waiting to be indexed")
        print(f"  DICOM issues  incomplete {dicom['incomplete']}, invalid {dicom['invalid']}, "
              f"SOP UID conflicts {dicom['sop_conflict']}, "
              f"patient conflicts {dicom['patient_conflicts']}  (vnafs find --problems)")
    tier = st.get("tiering") or {}
    if tier.get("capacity_bytes"):
        cap = tier["capacity_bytes"]
        recall = tier.get("recall") or {}
        p50 = recall.get("latency_p50_s")
        hit = tier.get("hit_ratio")
        print(f"  tiering       {_mib(tier['resident_bytes'])} resident of {_mib(cap)} "
              f"({100 * tier.get('used_bytes', tier['resident_bytes']) / cap:.0f}% used), "
              f"{_mib(tier['evicted_bytes'])} evicted")
        if "recall_queue" in tier:
            print(f"  recalls       queue {tier['recall_queue']}, "
                  f"{recall.get('recalls', 0)} done"
                  + (f", p50 {p50 * 1000:.0f} ms" if p50 is not None else "")
                  + (f", hit ratio {hit:.2f}" if hit is not None else "")
                  + f"; studies evicted {tier.get('evicted_studies', 0)}, "
                  f"pinned {tier.get('pinned_studies', 0)}; "
                  f"evictions {tier.get('evictions', 0)}")
    snaps = st.get("snapshots")
    if snaps is not None:
        gc = snaps["gc"]
        busy = f"; freeing space ({gc['versions_freed']} versions so far)" if gc["running"] else ""
        print(f"  snapshots     {snaps['count']}{busy}  (vnafs snapshot list)")
    problems = st.get("problems", {})
    if problems.get("last_problem"):
        now = ", ".join(problems.get("active", [])) or "none"
        counts = ", ".join(f"{k} {v}" for k, v in sorted(problems["problems"].items()))
        print(f"  problems      now: {now}; since mount: {counts}; newest: "
              f"{problems['last_problem']}")
    return 0


def _print_archive(a: dict[str, Any] | str | None) -> None:
    if not isinstance(a, dict):
        print(f"  archive       {a or 'none configured'}")
        return
    print(f"  archive       {a['url']}  ({a.get('mode', 'replicating')}: {a['state']})")
    rp = a.get("recovery_point") or "none yet"
    lag = a.get("lag_seconds")
    lag_text = f", lag {lag:.1f} s" if isinstance(lag, (int, float)) else ""
    print(f"  recovery pt   {rp} (cycle {a.get('cycle', 0)}{lag_text})")
    if "pending_blocks" in a:
        print(f"  pending       {a['pending_blocks']} blocks "
              f"({a['pending_bytes'] / (1 << 20):.1f} MiB), {a['pending_records']} records")
    if a.get("last_error"):
        print(f"  archive error {a['last_error']}")
    ret = a.get("retention")
    if isinstance(ret, dict):
        busy = ret.get("pass")
        progress = (f"  (setting {busy['done']}/{busy['objects']} objects)" if busy else "")
        if ret.get("backlog_objects"):
            progress += f"  ({ret['backlog_objects']} objects left for the next cycles)"
        print(f"  retention     {ret['summary']}{progress}")


def _date(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    digits = value.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        raise VnafsError(f"{flag} {value!r} is not a date: write it as YYYY-MM-DD")
    return digits


def cmd_find(args: argparse.Namespace) -> int:
    import datetime
    import re

    from vnafs import control  # light: no trio, no LMDB

    def usage(message: str) -> int:
        print(f"vnafs find: {message}", file=sys.stderr)
        return 2

    def date_range(text: str) -> tuple[str | None, str | None]:
        """--date as DICOM range matching writes it: DAY, FROM-TO, FROM- or -TO, each day
        YYYYMMDD or YYYY-MM-DD; one day is a range of one."""
        day = r"(\d{8}|\d{4}-\d{2}-\d{2})"
        m = re.fullmatch(f"{day}?(-{day}?)?", text.strip())
        bad = VnafsError(f"--date {text!r} is not a date or a range: write it as 20250101, "
                         "2025-01-01, 20250101-20250131, 20250101- or -20250131")
        if m is None or not (m.group(1) or m.group(3)):
            raise bad
        first, last = (g.replace("-", "") if g else None for g in (m.group(1), m.group(3)))
        for d in (first, last):
            try:
                if d is not None:
                    datetime.date(int(d[:4]), int(d[4:6]), int(d[6:]))
            except ValueError:
                raise bad from None
        if m.group(2) is None:
            return first, first
        if first and last and first > last:
            raise VnafsError(f"--date {text!r} ends before it starts: write it as FROM-TO")
        return first, last

    keys = [k for k in ("patient", "study", "accession") if getattr(args, k) is not None]
    narrowing = [args.modality, args.date, args.date_from, args.date_to]
    if not args.problems:
        if not keys and all(c is None for c in narrowing):
            return usage("give a criterion: --patient ID [--issuer I], --study UID, "
                         "--accession A [--accession-issuer I], --date FROM[-TO], "
                         "--modality M, or --problems")
        if len(keys) > 1:
            return usage("give only one of --patient, --study or --accession (narrow it down "
                         "with --date or --modality)")
        if args.issuer is not None and args.patient is None:
            return usage("--issuer goes with --patient: give both")
        if args.accession_issuer is not None and args.accession is None:
            return usage("--accession-issuer goes with --accession: give both")
        if args.date is not None and (args.date_from or args.date_to):
            return usage("give either --date FROM-TO or --from/--to, not both")
    hot = control.hot_store_of(Path(args.mountpoint))
    mnt = Path(args.mountpoint).resolve()
    if args.problems:
        found = control.control_request(hot, {"op": "problems", "wait": args.wait})
        if args.json:
            print(json.dumps(found, indent=2, ensure_ascii=False))
        for p in [] if args.json else found:
            where = f"inode {p['ino']}" if p["ino"] is not None else f"study {p['study']}"
            tags = f": {' '.join(p['tags'])}" if p.get("tags") else ""
            also = (f"  (same SOP Instance UID: inode {', '.join(map(str, p['copies']))})"
                    if p.get("copies") else "")
            print(f"{p['kind']:<17} {where}  {p['problem']}{tags}{also}")
        return 0
    if args.date is not None:
        date_from, date_to = date_range(args.date)
    else:
        date_from, date_to = _date(args.date_from, "--from"), _date(args.date_to, "--to")
    req = {"op": "find", "patient": args.patient, "issuer": args.issuer, "study": args.study,
           "accession": args.accession, "accession_issuer": args.accession_issuer,
           "modality": args.modality, "date_from": date_from, "date_to": date_to,
           "wait": args.wait}
    found = control.control_request(hot, req)
    views = control.views_dir(hot)
    for study in found:
        study["view"] = str(mnt / views / study["view"]) if views else None
    if args.json:
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return 0 if found else 3
    for s in found:
        date = f"{s['date'][:4]}-{s['date'][4:6]}-{s['date'][6:]}" if s["date"] else "----------"
        patients = ", ".join(f"{p['patient_id'] or '(empty)'} ({p['issuer'] or 'no issuer'})"
                             for p in s["patients"])
        flag = "  PATIENT CONFLICT" if s["patient_conflict"] else ""
        if s.get("incomplete"):
            flag += f"  {s['incomplete']} INCOMPLETE (no pixel data)"
        print(f"{date}  {'/'.join(s['modalities']) or '-':<8} {s['series']:>3} series "
              f"{s['instances']:>6} inst  acc {s['accession'] or '-'}  {patients}{flag}")
        print(f"            {s['view'] or s['study']}")
    if not found:
        print("no matching studies", file=sys.stderr)
    return 0 if found else 3


def cmd_reindex(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vnafs import control  # light: no trio, no LMDB

    hot = control.hot_store_of(Path(args.mountpoint))
    total = control.control_request(hot, {"op": "reindex"})["queued"]
    with tqdm(total=total, unit="file", desc="reindex",
              disable=args.json or (not sys.stderr.isatty() and not args.progress)) as bar:
        while True:
            pending = control.control_request(hot, {"op": "index_progress"})["pending"]
            bar.update(max(0, total - pending - bar.n))
            if pending == 0:
                break
            time.sleep(0.2)
    st = control.control_request(hot, {"op": "status"})["dicom"]
    problems = st["incomplete"] + st["invalid"] + st["sop_conflict"]
    _report(args, f"indexed {total} files: {st['instances']} instances in {st['studies']} "
            f"studies; {problems} problem files",
            {"files": total, "instances": st["instances"], "studies": st["studies"],
             "problem_files": problems})
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from vnafs import fsck
    from vnafs.store.lifecycle import archive_backend, open_store

    store = open_store(Path(args.hot), _source(args))
    try:
        report = fsck.check(store, repair=args.repair, verify_data=not args.no_data,
                            progress=not args.json, archive=archive_backend(store))
    finally:
        store.close()
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA, **report.as_dict()}, indent=2,
                         sort_keys=True))
    else:
        print(report.summary())
    return 0 if report.clean or (args.repair and not report.damage) else 2


def cmd_restore(args: argparse.Namespace) -> int:
    from vnafs import config
    from vnafs.archive.backend import open_backend
    from vnafs.archive.restore import restore

    url = config.validate_archive_url(args.url)
    credentials = Path(args.credentials) if args.credentials else None
    # No backend.check(): fetching the keyring is the first request and fails with the same
    # one-line errors, and check() would create a missing file:// directory.
    backend = open_backend(url, credentials_file=credentials)
    # A bar only on a terminal: under systemd or in a script it would fill the log.
    report = restore(backend, Path(args.hot), _source(args),
                     progress=not args.no_progress and not args.json and sys.stderr.isatty(),
                     credentials=credentials)
    mib = report.bytes_downloaded / (1 << 20)
    rp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report.recovery_point_ns / 1e9)) \
        if report.recovery_point_ns else "this run's earlier pass"
    _report(args, f"restored {Path(args.hot).resolve()} as of {rp}: {report.blocks} blocks "
            f"({report.blocks_downloaded} downloaded now, {mib:.1f} MiB) in "
            f"{report.seconds:.1f} s",
            {"hot": str(Path(args.hot).resolve()), "archive": url,
             "recovery_point_ns": report.recovery_point_ns or None, "blocks": report.blocks,
             "blocks_downloaded": report.blocks_downloaded,
             "bytes_downloaded": report.bytes_downloaded, "seconds": round(report.seconds, 3),
             "missing_blocks": len(report.missing), "damaged_blocks": len(report.corrupt)})
    if report.missing or report.corrupt:
        print(f"vnafs: {len(report.missing)} blocks are missing and {len(report.corrupt)} "
              "damaged in the archive; the files that use them read EIO (vnafs fsck names "
              "them)", file=sys.stderr)
        return 2
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vnafs import control

    hot = control.hot_store_of(Path(args.mountpoint))
    rep = control.control_request(hot, {"op": "archive_verify"})
    with tqdm(total=rep["total_bytes"] or None, unit="B", unit_scale=True, unit_divisor=1024,
              desc="verifying archive", disable=args.json or None) as bar:
        while not rep["finished"]:
            time.sleep(0.5)
            rep = control.control_request(hot, {"op": "archive_verify_progress"})
            bar.total = rep["total_bytes"] or bar.total
            bar.update(rep["done_bytes"] - bar.n)
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA, **rep}, indent=2, sort_keys=True))
    else:
        print(f"checked {rep['objects']} archive objects ({rep['bytes'] / (1 << 20):.1f} MiB) "
              f"in {rep['seconds']:.1f} s")
        for label in ("corrupt", "missing", "repaired", "unrepaired"):
            for name in rep[label]:
                print(f"  {label:10} {name}")
        if rep["checkpoint_needed"]:
            print("  metadata: the next replication cycle writes a new checkpoint")
    if rep.get("error"):
        raise VnafsError(f"archive verification failed: {rep['error']}")
    return 2 if rep["unrepaired"] else 0


def _tier_request(args: argparse.Namespace, mnt: Path) -> dict[str, Any]:
    """What a tiering command names: studies by UID, patient or accession, or files by path
    (sent as their inode numbers; each must be a regular file inside this mount)."""
    req: dict[str, Any] = {"study": getattr(args, "study", None),
                           "patient": getattr(args, "patient", None),
                           "issuer": getattr(args, "issuer", None),
                           "accession": getattr(args, "accession", None)}
    dev = os.stat(mnt).st_dev
    inos = []
    for path in getattr(args, "paths", []) or []:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise VnafsError(f"{path}: {exc.strerror}; give files inside {mnt}") from None
        if st.st_dev != dev:
            raise VnafsError(f"{path} is not inside the vnafs mount {mnt}: give files inside it")
        if not os.path.isfile(path):
            raise VnafsError(f"{path} is not a regular file: give files (or --study)")
        inos.append(st.st_ino)
    req["inos"] = inos
    return req


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def cmd_evict(args: argparse.Namespace) -> int:
    from vnafs import control

    mnt = Path(args.mountpoint).resolve()
    hot = control.hot_store_of(mnt)
    rep = control.control_request(hot, {"op": "evict", **_tier_request(args, mnt)},
                                  timeout=3600)
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA, **rep}, indent=2, sort_keys=True))
    else:
        print(f"evicted {rep['blocks']} blocks of {rep['units']} "
              f"{'study' if args.study or args.patient else 'item'}(s): {_mib(rep['bytes_freed'])}"
              " freed")
    return 0


def cmd_recall(args: argparse.Namespace) -> int:
    from vnafs import control

    mnt = Path(args.mountpoint).resolve()
    hot = control.hot_store_of(mnt)
    rep = control.control_request(hot, {"op": "recall", **_tier_request(args, mnt)})
    if args.wait:
        from tqdm import tqdm

        with tqdm(total=rep["total_blocks"] or None, unit="block", desc="recalling",
                  disable=args.json or None) as bar:
            while not rep["done"]:
                time.sleep(0.5)
                rep = control.control_request(hot, {"op": "recall_progress",
                                                    "jobs": rep["jobs"]})
                bar.total = rep["total_blocks"] or bar.total
                bar.update(rep["fetched_blocks"] + rep["skipped_blocks"] - bar.n)
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA, **rep}, indent=2, sort_keys=True))
    elif args.wait:
        print(f"recalled {rep['fetched_blocks']} of {rep['total_blocks']} evicted blocks"
              + (f"; {rep['skipped_blocks']} not kept (the hot store is at capacity)"
                 if rep["skipped_blocks"] else ""))
    else:
        print(f"recall queued ({len(rep['jobs'])} job(s)); vnafs status shows the queue")
    if rep.get("errors"):
        raise VnafsError(f"recall failed: {rep['errors'][0]}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    from vnafs import control

    mnt = Path(args.mountpoint).resolve()
    hot = control.hot_store_of(mnt)
    pinned = args.command == "pin"
    rep = control.control_request(hot, {"op": "pin" if pinned else "unpin",
                                        **_tier_request(args, mnt)})
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA, **rep}, indent=2, sort_keys=True))
    else:
        print(f"{'pinned' if pinned else 'unpinned'} {rep['changed']} item(s)")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    import dataclasses

    from vnafs import config

    hot = Path(args.hot)
    cfg = config.load(hot)  # every check of a mount, without mounting; VnafsError -> 1 line
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA, "ok": True, "path": str(hot / config.CONFIG_NAME),
                          "config": dataclasses.asdict(cfg)}, indent=2, sort_keys=True))
    else:
        print(f"{hot / config.CONFIG_NAME}: ok")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vnafs import control

    hot = control.hot_store_of(Path(args.mountpoint))
    rep = control.control_request(hot, {"op": "archive_gc"})
    # A bar only on a terminal (disable=None) and never with --json.
    with tqdm(total=rep["blocks_expired"] or None, unit="block", desc="archive gc",
              disable=args.json or None) as bar:
        while not rep["finished"]:
            time.sleep(0.5)
            rep = control.control_request(hot, {"op": "archive_gc_progress"})
            bar.total = rep["blocks_expired"] or bar.total
            bar.update(rep["blocks_done"] - bar.n)
    if rep.get("error"):
        raise VnafsError(f"archive gc stopped: {rep['error']}; what was deleted is logged, run "
                         "it again once the archive answers")
    _report(args, f"archive gc: deleted {rep['blocks_deleted']} blocks and "
            f"{rep['parts_deleted']} metadata parts ({rep['bytes_freed'] / (1 << 20):.1f} MiB); "
            f"{rep['tombstones_kept']} deleted blocks are still within the retention period",
            dict(rep))
    return 0


def _when(ns: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9)) if ns else "-"


def cmd_snapshot(args: argparse.Namespace) -> int:
    from vnafs import control

    hot = control.hot_store_of(Path(args.mountpoint))
    op = args.snap_command
    if op == "create":
        snap = control.control_request(hot, {"op": "snapshot_create", "name": args.name,
                                             "lock_until": args.lock_until})
        _report(args, f"created snapshot {snap['name']}", {"snapshot": snap})
    elif op == "delete":
        control.control_request(hot, {"op": "snapshot_delete", "name": args.name})
        _report(args, f"deleted snapshot {args.name}; its space is freed in the background",
                {"deleted": args.name})
    elif op == "lock":
        snap = control.control_request(hot, {"op": "snapshot_lock", "name": args.name,
                                             "until": args.until})
        _report(args, f"snapshot {snap['name']} is locked until "
                f"{_when(snap['lock_until_ns'])} UTC", {"snapshot": snap})
    elif op == "list":
        rows = control.control_request(hot, {"op": "snapshot_list"}, timeout=600)
        if args.json:
            print(json.dumps(rows, indent=2, sort_keys=True))
            return 0
        print(f"{'NAME':32} {'CREATED (UTC)':19}  {'EXPIRES (UTC)':19}  {'LOCKED':6} "
              f"{'UNIQUE':>10}")
        for r in rows:
            print(f"{r['name']:32} {_when(r['created_ns']):19}  {_when(r['expiry_ns']):19}  "
                  f"{'yes' if r['locked'] else 'no':6} {r['unique_bytes'] / (1 << 20):>6.1f} MiB")
    elif op == "diff":
        rows = control.control_request(hot, {"op": "snapshot_diff", "old": args.old,
                                             "new": args.new}, timeout=3600)
        if args.json:
            changes = [{"change": kind, "path": path, "new_path": new_path or None}
                       for kind, path, new_path in rows]
            _report(args, "", {"old": args.old, "new": args.new, "changes": changes})
            return 0
        for kind, path, new_path in rows:
            print(f"{kind}\t{path}" + (f"\t{new_path}" if new_path else ""))
    return 0


def _audit_offline(path: Path, args: argparse.Namespace, req: dict[str, Any]) -> Any:
    """`vnafs audit` on an unmounted hot store, with its key (like fsck)."""
    from vnafs.audit.chain import AuditLog, Query, select
    from vnafs.dicom.index import DicomIndex
    from vnafs.store.lifecycle import open_store

    store = open_store(path, _source(args))
    try:
        audit_log = AuditLog(store.db, store.keyring.audit_key)
        if req["op"] == "audit_verify":
            return audit_log.verify().as_dict()
        index = DicomIndex(store.ns) if store.config.dicom.index else None
        return select(audit_log, index, Query.from_request(req))
    finally:
        store.close()


def cmd_audit(args: argparse.Namespace) -> int:
    from vnafs import control, timespec  # light: no trio, no LMDB

    verify = args.verify
    path = Path(args.target)
    if verify:
        req: dict[str, Any] = {"op": "audit_verify", "archived": args.archived}
    else:
        since = None
        if args.since is not None:
            seconds = timespec.duration(args.since)
            try:
                since = time.time_ns() - seconds * timespec.NS if seconds is not None \
                    else timespec.parse_when(args.since)
            except ValueError as exc:
                raise VnafsError(f"--since: {exc}") from None
        req = {"op": "audit", "study": args.study, "patient": args.patient,
               "issuer": args.issuer, "uid": args.uid, "since_ns": since,
               "archived": args.archived}
    if _key_given(args):
        result = _audit_offline(path, args, req)
    else:
        result = control.control_request(control.hot_store_of(path), req, timeout=300)
    if verify:
        if args.json:
            print(json.dumps({"schema": JSON_SCHEMA, **result}, indent=2, sort_keys=True))
        elif result["ok"]:
            print(f"audit chain intact: {result['records']} records, head {result['head_seq']}")
        if not result["ok"]:
            print(f"vnafs audit verify: {result['problem']}", file=sys.stderr)
            return 1
        return 0
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA, "records": result}, indent=2,
                         ensure_ascii=False))
        return 0
    for r in result:
        what = f"study {r['study']}" if r["study"] else (
            f"study key {r['study_key']}" if r["study_key"] else "")
        ino = f"inode {r['ino']}" if r["ino"] else "whole store"
        print(f"{r['time']}  {r['action']:<7} uid {r['uid']} gid {r['gid']} pid {r['pid']} "
              f"({r['process']})  {ino}  {what}".rstrip())
    if not result:
        print("no matching audit records", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vnafs import demo

    return demo.run(Path(args.dir))


# -- entry point ---------------------------------------------------------------------------------


def _tier_args(s: argparse.ArgumentParser, *, accession: bool, patient: bool = True) -> None:
    s.add_argument("mountpoint")
    s.add_argument("paths", nargs="*", metavar="PATH", help="files inside the mount")
    s.add_argument("--study", metavar="UID", help="StudyInstanceUID")
    if patient:
        s.add_argument("--patient", metavar="ID", help="every study of this PatientID")
        s.add_argument("--issuer", metavar="ISSUER", help="IssuerOfPatientID of --patient")
    if accession:
        s.add_argument("--accession", metavar="A", help="AccessionNumber")
    s.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vnafs",
        description="Encrypted, compressed archive file system for medical imaging.",
    )
    p.add_argument("--version", action="version", version=f"vnafs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("keygen", help="create a new 256-bit key file (mode 0600)")
    s.add_argument("path")
    s.set_defaults(fn=cmd_keygen)

    s = sub.add_parser("key", help="replace the key (rewrap, passwd), add, remove and list key "
                       "slots, rotate the data key, re-seal, retire old data keys")
    ksub = s.add_subparsers(dest="key_action", required=True, metavar="ACTION")
    target_help = "a hot store (unmounted: changed offline under its lock) or a mount point"
    t = ksub.add_parser("rewrap", help="replace the KEK of the slot the given key opens")
    _json_arg(t)
    _key_args(t)
    _new_key_args(t)
    t.add_argument("target", metavar="HOT|MNT", help=target_help)
    t = ksub.add_parser("passwd", help="change a passphrase (asked on the terminal unless "
                        "given otherwise)")
    _json_arg(t)
    _key_args(t)
    _new_key_args(t, passphrase_only=True)
    t.add_argument("target", metavar="HOT|MNT", help=target_help)
    t = ksub.add_parser("add-slot", help="add a key slot (e.g. an offline recovery key), "
                        "authorised by a key of any slot")
    _json_arg(t)
    _key_args(t)
    _new_key_args(t)
    t.add_argument("--label", default="", help="a name for the slot (at most 64 bytes)")
    t.add_argument("target", metavar="HOT|MNT", help=target_help)
    t = ksub.add_parser("remove-slot", help="remove a key slot (never the last; authorised by "
                        "the key of a slot that stays)")
    _json_arg(t)
    _key_args(t)
    which = t.add_mutually_exclusive_group(required=True)
    which.add_argument("--slot", type=int, metavar="N", help="the slot number")
    which.add_argument("--label", help="the slot's label")
    t.add_argument("target", metavar="HOT|MNT", help=target_help)
    t = ksub.add_parser("rotate", help="start a new data key for new writes and a new keyring "
                        "key (old data stays readable; 'reseal' moves it)")
    _json_arg(t)
    _key_args(t)
    t.add_argument("--drop-other-slots", action="store_true",
                   help="remove the other key slots (they wrap the old keyring key); add them "
                   "again with add-slot")
    t.add_argument("target", metavar="HOT|MNT", help=target_help)
    t = ksub.add_parser("reseal", help="re-seal every record and block (hot store and archive) "
                        "under the current data key; through a mount it runs in the background")
    _json_arg(t)
    _key_args(t)
    t.add_argument("--progress", action="store_true", help="show the bar even when not a tty")
    t.add_argument("target", metavar="HOT|MNT", help=target_help)
    t = ksub.add_parser("retire", help="remove an old data key for good, once nothing in the "
                        "hot store or the archive is sealed under it")
    _json_arg(t)
    _key_args(t)
    t.add_argument("--version", type=int, required=True, metavar="N",
                   help="the data key version to retire ('vnafs status' lists them)")
    t.add_argument("target", metavar="HOT|MNT", help=target_help)
    t = ksub.add_parser("slots", help="list the key slots (number, kind, created, label); "
                        "with a key, also which slot it opens")
    _json_arg(t)
    _key_args(t)
    t.add_argument("target", metavar="HOT|MNT", help=target_help)
    s.set_defaults(fn=cmd_key)

    s = sub.add_parser("mkfs", help="create a hot store")
    _json_arg(s)
    _key_args(s)
    s.add_argument("--archive", metavar="URL", help="archive URL (file://, s3://, azure://)")
    s.add_argument("--credentials", metavar="FILE",
                   help="archive credentials file (TOML, mode 0600); kept in vnafs.toml")
    s.add_argument("--format", type=int, choices=(1, 2), default=FORMAT_VERSION,
                   help=f"store format (default {FORMAT_VERSION}: keyed BLAKE3 block ids; 1: "
                   "HMAC-SHA256 block ids, for a store an older vnafs must read)")
    s.add_argument("hot")
    s.set_defaults(fn=cmd_mkfs)

    s = sub.add_parser("mount", help="mount a hot store (or an archive, read-only)")
    _json_arg(s)
    _key_args(s)
    s.add_argument("-o", dest="options", action="append", default=[],
                   help="mount options: allow_other, sync_on_close, cache_mib=N, poll=SECONDS")
    s.add_argument("--foreground", "-f", action="store_true", help="do not detach")
    s.add_argument("--archive-only", action="store_true",
                   help="HOT is an archive URL: mount it read-only, following replication")
    s.add_argument("--cache", metavar="DIR", help="metadata cache of an --archive-only mount "
                   "(default: under /var/cache/vnafs)")
    s.add_argument("--credentials", metavar="FILE",
                   help="archive credentials file for --archive-only (TOML, mode 0600)")
    s.add_argument("hot", metavar="HOT|URL")
    s.add_argument("mountpoint")
    s.set_defaults(fn=cmd_mount)

    s = sub.add_parser("umount", help="unmount (waits until everything is committed)")
    _json_arg(s)
    s.add_argument("--timeout", type=float, default=120.0)
    s.add_argument("mountpoint")
    s.set_defaults(fn=cmd_umount)

    s = sub.add_parser("status", help="show the state of a mounted file system")
    s.add_argument("--json", action="store_true")
    s.add_argument("mountpoint")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("find", help="find DICOM studies by patient, study, accession, date "
                       "or modality; list problem files")
    s.add_argument("mountpoint")
    s.add_argument("--patient", metavar="ID", help="PatientID (with --issuer; without it, "
                   "every issuer's patient of that ID is listed separately)")
    s.add_argument("--issuer", metavar="ISSUER", help="IssuerOfPatientID")
    s.add_argument("--study", metavar="UID", help="StudyInstanceUID")
    s.add_argument("--accession", metavar="A", help="AccessionNumber")
    s.add_argument("--accession-issuer", metavar="ISSUER", help="issuer of the accession")
    s.add_argument("--modality", metavar="M", help="studies with this modality (CT, MR, ...); "
                   "alone, or to narrow down the other criteria")
    s.add_argument("--date", metavar="FROM[-TO]", help="study date or range, as in DICOM "
                   "queries: 20250101, 2025-01-01, 20250101-20250131, 20250101- or -20250131; "
                   "alone, or to narrow down the other criteria")
    s.add_argument("--from", dest="date_from", metavar="YYYY-MM-DD",
                   help="study date from (the same as --date FROM-)")
    s.add_argument("--to", dest="date_to", metavar="YYYY-MM-DD",
                   help="study date up to (the same as --date -TO)")
    s.add_argument("--problems", action="store_true",
                   help="list incomplete, invalid and conflicting files instead")
    s.add_argument("--wait", action="store_true",
                   help="first wait until files closed so far are indexed")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_find)

    s = sub.add_parser("reindex", help="rebuild the DICOM index of a mounted file system")
    _json_arg(s)
    s.add_argument("--progress", action="store_true", help="show the bar even when not a tty")
    s.add_argument("mountpoint")
    s.set_defaults(fn=cmd_reindex)

    s = sub.add_parser("fsck", help="check (and repair) an unmounted hot store")
    _key_args(s)
    s.add_argument("--repair", action="store_true", help="fix what can be fixed safely")
    s.add_argument("--no-data", action="store_true", help="skip reading every block")
    s.add_argument("--json", action="store_true")
    s.add_argument("hot")
    s.set_defaults(fn=cmd_fsck)

    s = sub.add_parser("snapshot", help="create, list, delete, lock and compare snapshots")
    snap = s.add_subparsers(dest="snap_command", required=True, metavar="ACTION")
    t = snap.add_parser("create", help="take a snapshot (name: @GMT-YYYY.MM.DD-hh.mm.ss)")
    _json_arg(t)
    t.add_argument("mountpoint")
    t.add_argument("name", nargs="?")
    t.add_argument("--lock-until", metavar="WHEN",
                   help="lock it for a duration (30d, 10y) or until a UTC date (YYYY-MM-DD)")
    t = snap.add_parser("list", help="name, time, expiry, lock and unique bytes")
    t.add_argument("mountpoint")
    t.add_argument("--json", action="store_true")
    t = snap.add_parser("delete", help="delete a snapshot (not a locked one)")
    _json_arg(t)
    t.add_argument("mountpoint")
    t.add_argument("name")
    t = snap.add_parser("lock", help="lock a snapshot until a date (only ever later)")
    _json_arg(t)
    t.add_argument("mountpoint")
    t.add_argument("name")
    t.add_argument("--until", required=True, metavar="WHEN",
                   help="a duration from now (30d, 10y) or a UTC date YYYY-MM-DD[Thh:mm:ss]")
    t = snap.add_parser("diff", help="what changed between two snapshots, or one and now")
    _json_arg(t)
    t.add_argument("mountpoint")
    t.add_argument("old")
    t.add_argument("new", help="a snapshot name, or live")
    s.set_defaults(fn=cmd_snapshot)

    s = sub.add_parser("verify", help="re-read and authenticate every archived object")
    s.add_argument("--archive", action="store_true", required=True,
                   help="verify the archive (the only kind of verification so far)")
    s.add_argument("--json", action="store_true")
    s.add_argument("mountpoint")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("evict", help="move studies or files out of the hot store (only what "
                       "the archive verifiably holds)")
    _tier_args(s, accession=False)
    s.set_defaults(fn=cmd_evict)

    s = sub.add_parser("recall", help="bring evicted studies or files back into the hot store")
    _tier_args(s, accession=True)
    s.add_argument("--wait", action="store_true", help="wait until done (a bar on a terminal)")
    s.set_defaults(fn=cmd_recall)

    for name, text in (("pin", "keep studies or files in the hot store (never evicted)"),
                       ("unpin", "let pinned studies or files be evicted again")):
        s = sub.add_parser(name, help=text)
        _tier_args(s, accession=False, patient=False)
        s.set_defaults(fn=cmd_pin)

    s = sub.add_parser("config", help="check a hot store's configuration")
    csub = s.add_subparsers(dest="config_command", required=True, metavar="check")
    c = csub.add_parser("check", help="validate HOT/vnafs.toml without mounting (exit 1 and "
                        "one line naming the setting if it is wrong)")
    c.add_argument("--json", action="store_true")
    c.add_argument("hot", metavar="HOT")
    c.set_defaults(fn=cmd_config_check)

    s = sub.add_parser("gc", help="delete archived data whose retention has expired (logged)")
    _json_arg(s)
    s.add_argument("--archive", action="store_true", required=True,
                   help="collect in the archive (the only kind of collection)")
    s.add_argument("mountpoint")
    s.set_defaults(fn=cmd_gc)

    s = sub.add_parser("audit", help="who read, created, wrote, renamed, deleted or exported "
                       "what (vnafs audit verify MNT: check the chain)")
    _key_args(s)
    s.add_argument("target", metavar="[verify] MOUNTPOINT",
                   help="a mount point; with a key option, an unmounted hot store instead")
    # `vnafs audit verify ...` arrives as --verify (see `_audit_verify_argv`).
    s.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--study", metavar="UID", help="records of this StudyInstanceUID")
    s.add_argument("--patient", metavar="ID", help="records of this PatientID's studies")
    s.add_argument("--issuer", metavar="ISSUER", help="IssuerOfPatientID (with --patient)")
    s.add_argument("--uid", type=int, metavar="N", help="records of this user id")
    s.add_argument("--since", metavar="T", help="records from T on: a duration ago (2h, 7d) "
                   "or a UTC date YYYY-MM-DD[Thh:mm:ss]")
    s.add_argument("--archived", action="store_true",
                   help="on a read-only archive mount: the hot store's replicated records "
                   "instead of this mount's own")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_audit)

    s = sub.add_parser("restore", help="rebuild a hot store from the archive")
    _json_arg(s)
    _key_args(s)
    s.add_argument("--credentials", metavar="FILE", help="archive credentials file (TOML, 0600)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("url", metavar="ARCHIVE_URL")
    s.add_argument("hot", metavar="NEW_HOT")
    s.set_defaults(fn=cmd_restore)

    s = sub.add_parser("demo", help="create, mount and fill a demonstration file system")
    s.add_argument("--dir", default="/var/tmp/vnafs-demo")
    s.set_defaults(fn=cmd_demo)
    return p


# fstab options mount(8) and mount.fuse3 hand to the helper that are about the mount table or
# the kernel's generic flags, not vnafs: accepted and ignored.
_FSTAB_IGNORED = {"defaults", "rw", "auto", "noauto", "user", "users", "nouser", "owner",
                  "group", "nofail", "_netdev", "suid", "nosuid", "dev", "nodev", "exec",
                  "noexec", "async", "atime", "noatime", "relatime", "strictatime", "nodiratime"}
# fstab options that become command-line options of `vnafs mount`.
_FSTAB_ARGS = {"key_file": "--key-file", "passphrase_env": "--passphrase-env",
               "cache": "--cache", "credentials": "--credentials"}


def mount_helper_argv(prog: str, argv: list[str]) -> list[str] | None:
    """The `vnafs` arguments for a call in the form mount(8) uses for /etc/fstab entries of
    type `fuse.vnafs`, or None for an ordinary call. Two forms arrive: `mount.fuse.vnafs
    SOURCE DIR [-o OPTS] [-n -s -v -f]` (the helper installed by `make install`, also
    `umount.fuse.vnafs DIR`), and `vnafs SOURCE DIR -o OPTS`, which is what mount.fuse3 runs
    when no helper of our own is installed."""
    name = os.path.basename(prog)
    if name.startswith("umount."):
        dirs = [a for a in argv if not a.startswith("-")]
        return ["umount", *dirs[:1]]
    # A command name never contains "/": a first argument that does is a SOURCE (a hot store
    # path or an archive URL), which only the mount-helper form puts there.
    if not name.startswith("mount.") and (len(argv) < 2 or "/" not in argv[0]):
        return None
    positional: list[str] = []
    options: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options += next(it, "").split(",")
        elif arg.startswith("-o") and len(arg) > 2:
            options += arg[2:].split(",")
        elif arg == "-t":
            next(it, None)  # the type: fuse.vnafs
        elif arg.startswith("-"):
            continue  # -n (no mtab), -s (sloppy), -v (verbose), -f (fake): nothing to do
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise VnafsError("a mount helper call needs SOURCE and DIRECTORY, as in /etc/fstab: "
                         "/srv/vnafs/hot /mnt/vna fuse.vnafs key_file=/etc/vnafs/site.key 0 0")
    out = ["mount"]
    passed: list[str] = []
    read_only = False
    for opt in filter(None, options):
        key, eq, value = opt.partition("=")
        if key in _FSTAB_IGNORED or key.startswith(("x-", "comment")):
            continue
        if key in _FSTAB_ARGS and eq:
            out += [_FSTAB_ARGS[key], value]
        elif key == "archive_only":
            out.append("--archive-only")
        elif key == "ro" and not eq:
            read_only = True
        else:
            passed.append(opt)
    if read_only and "--archive-only" not in out:
        raise VnafsError("a hot store is always mounted read-write: remove ro, or mount the "
                         "archive read-only with archive_only")
    if passed:
        out += ["-o", ",".join(passed)]
    return out + positional


def _audit_verify_argv(argv: list[str]) -> list[str]:
    """`vnafs audit verify [options] MNT` as `vnafs audit --verify [options] MNT`: argparse
    cannot tell a leading word from the positional argument once options come between them."""
    if len(argv) >= 2 and argv[0] == "audit" and argv[1] == "verify":
        return ["audit", "--verify", *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        translated = mount_helper_argv(sys.argv[0], sys.argv[1:] if argv is None else argv)
    except VnafsError as exc:
        print(f"vnafs: {exc}", file=sys.stderr)
        return 1
    if translated is not None:
        argv = translated
    args = parser.parse_args(_audit_verify_argv(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.fn(args))
    except VnafsError as exc:
        print(f"vnafs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `vnafs find ... | head`: the reader has what it wanted. Point stdout at /dev/null so
        # the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
