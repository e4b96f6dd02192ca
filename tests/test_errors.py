"""Every error a user can cause: one line on stderr, a fix named, exit status 1, no traceback.

The issue "Clear one-line errors, each with a test" asks for exactly this file: one test per bad
input an administrator can give vnafs (a wrong or missing key, a bad mount point, a missing or
foreign hot store, a bad setting, a full disk, a busy mount). Each test runs the real `vnafs`
command and checks the policy of `vnafs/errors.py`: stderr is a single line starting with
"vnafs: " that says what to do, the exit status is 1, no Python traceback is shown, and the
failure leaves nothing half-done behind (no stray mount, no daemon, data still intact).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import VNAFS, Fs, alive, run_vnafs

from tests.requires import need_program

MIB = 1 << 20
NOBODY = 65534


# -- helpers ---------------------------------------------------------------------------------------


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Check the error policy and that the message contains every needle (case-insensitive)."""
    err = res.stderr
    assert res.returncode == 1, f"exit {res.returncode}, stdout {res.stdout!r}, stderr {err!r}"
    assert "Traceback" not in err, err
    assert err.startswith("vnafs: "), err
    assert err.strip().count("\n") == 0, err
    assert res.stdout == "", res.stdout
    for needle in needles:
        assert needle.lower() in err.lower(), f"{needle!r} not in {err!r}"
    return err


def mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def env_without_key() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CREDENTIALS_DIRECTORY", None)
    return env


def mount_args(fs: Fs, *extra: str) -> list[str]:
    return ["mount", "--key-file", str(fs.key), *extra, str(fs.hot), str(fs.mnt)]


def assert_not_mounted(fs: Fs) -> None:
    assert not mounted(fs.mnt)
    assert fs.pid() is None, "a daemon was left running after a failed mount"


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# -- keys ------------------------------------------------------------------------------------------


def test_wrong_key(new_fs: Fs) -> None:
    data = os.urandom(3 * MIB + 123)
    new_fs.mount()
    write_file(new_fs.mnt / "study.bin", data)
    new_fs.umount()

    other = new_fs.root / "other.key"
    run_vnafs("keygen", str(other))
    res = run_vnafs("mount", "--key-file", str(other), str(new_fs.hot), str(new_fs.mnt),
                    check=False)
    assert_one_line_error(res, "wrong key")
    assert_not_mounted(new_fs)

    new_fs.mount()
    assert (new_fs.mnt / "study.bin").read_bytes() == data


def test_no_key_given(new_fs: Fs) -> None:
    res = run_vnafs("mount", str(new_fs.hot), str(new_fs.mnt), check=False,
                    env=env_without_key())
    assert_one_line_error(res, "no key given", "--key-file")
    assert_not_mounted(new_fs)


def test_credentials_directory_without_key_file(new_fs: Fs) -> None:
    creds = new_fs.root / "creds"
    creds.mkdir()
    env = env_without_key() | {"CREDENTIALS_DIRECTORY": str(creds)}
    res = run_vnafs("mount", str(new_fs.hot), str(new_fs.mnt), check=False, env=env)
    assert_one_line_error(res, "no key given")
    assert_not_mounted(new_fs)


def test_key_file_does_not_exist(new_fs: Fs) -> None:
    missing = new_fs.root / "no-such.key"
    res = run_vnafs("mount", "--key-file", str(missing), str(new_fs.hot), str(new_fs.mnt),
                    check=False)
    assert_one_line_error(res, str(missing), "does not exist")
    assert_not_mounted(new_fs)


def test_key_file_is_not_a_key(new_fs: Fs) -> None:
    bogus = new_fs.root / "bogus.key"
    bogus.write_text("this is not a key\n")
    res = run_vnafs("mount", "--key-file", str(bogus), str(new_fs.hot), str(new_fs.mnt),
                    check=False)
    assert_one_line_error(res, "not a vnafs key", "keygen")
    assert_not_mounted(new_fs)


def test_key_from_credentials_directory(new_fs: Fs) -> None:
    """Positive: systemd's LoadCredential=vnafs.key is used when no --key-file is given."""
    creds = new_fs.root / "creds"
    creds.mkdir(mode=0o700)
    shutil.copy(new_fs.key, creds / "vnafs.key")
    env = env_without_key() | {"CREDENTIALS_DIRECTORY": str(creds)}
    run_vnafs("mount", "-o", "allow_other", str(new_fs.hot), str(new_fs.mnt), env=env)
    assert mounted(new_fs.mnt)
    data = os.urandom(MIB + 7)
    write_file(new_fs.mnt / "f", data)
    new_fs.umount()
    new_fs.mount()  # the same key through --key-file opens what the credential wrote
    assert (new_fs.mnt / "f").read_bytes() == data


def test_passphrase_env(workdir: Path) -> None:
    """Positive: --passphrase-env for mkfs and mount; a wrong passphrase is a wrong key."""
    fs = Fs(workdir)
    fs.mnt.mkdir(mode=0o755)
    var = "VNAFS_TEST_PASSPHRASE"
    env = env_without_key() | {var: "correct horse battery staple"}
    try:
        run_vnafs("mkfs", "--passphrase-env", var, str(fs.hot), env=env)
        run_vnafs("mount", "--passphrase-env", var, str(fs.hot), str(fs.mnt), env=env)
        data = os.urandom(2 * MIB + 5)
        write_file(fs.mnt / "f", data)
        fs.umount()

        wrong = env | {var: "incorrect horse battery staple"}
        res = run_vnafs("mount", "--passphrase-env", var, str(fs.hot), str(fs.mnt),
                        check=False, env=wrong)
        assert_one_line_error(res, "wrong key")
        assert_not_mounted(fs)

        run_vnafs("mount", "--passphrase-env", var, str(fs.hot), str(fs.mnt), env=env)
        assert (fs.mnt / "f").read_bytes() == data
    finally:
        fs.cleanup()


def test_passphrase_env_unset(new_fs: Fs) -> None:
    res = run_vnafs("mount", "--passphrase-env", "VNAFS_TEST_UNSET", str(new_fs.hot),
                    str(new_fs.mnt), check=False, env=env_without_key())
    assert_one_line_error(res, "VNAFS_TEST_UNSET", "not set")
    assert_not_mounted(new_fs)


def test_passphrase_for_key_file_store(new_fs: Fs) -> None:
    var = "VNAFS_TEST_PASSPHRASE"
    env = env_without_key() | {var: "some passphrase"}
    res = run_vnafs("mount", "--passphrase-env", var, str(new_fs.hot), str(new_fs.mnt),
                    check=False, env=env)
    assert_one_line_error(res, "created with a key file", "--key-file")
    assert_not_mounted(new_fs)


# -- mount points ----------------------------------------------------------------------------------


def test_mountpoint_missing(new_fs: Fs) -> None:
    missing = new_fs.root / "no-such-dir"
    res = run_vnafs("mount", "--key-file", str(new_fs.key), str(new_fs.hot), str(missing),
                    check=False)
    assert_one_line_error(res, str(missing), "does not exist", "create")
    assert not missing.exists()
    assert new_fs.pid() is None


def test_mountpoint_not_empty(new_fs: Fs) -> None:
    (new_fs.mnt / "leftover").write_text("x")
    res = run_vnafs(*mount_args(new_fs), check=False)
    assert_one_line_error(res, "not empty", "empty directory")
    assert_not_mounted(new_fs)
    assert (new_fs.mnt / "leftover").read_text() == "x"


def test_mountpoint_already_mounted(fs: Fs) -> None:
    data = os.urandom(MIB + 1)
    write_file(fs.mnt / "before", data)
    pid = fs.pid()
    res = run_vnafs(*mount_args(fs), check=False)
    assert_one_line_error(res, "already a mount point", "unmount")
    # The first mount is untouched and still serves reads and writes.
    assert fs.pid() == pid
    assert (fs.mnt / "before").read_bytes() == data
    write_file(fs.mnt / "after", b"still works")
    assert (fs.mnt / "after").read_bytes() == b"still works"
    fs.umount()
    assert not mounted(fs.mnt)


def test_mountpoint_is_a_file(new_fs: Fs) -> None:
    target = new_fs.root / "a-file"
    target.write_text("x")
    res = run_vnafs("mount", "--key-file", str(new_fs.key), str(new_fs.hot), str(target),
                    check=False)
    assert_one_line_error(res, str(target), "not a directory")
    assert not mounted(target)
    assert new_fs.pid() is None


def test_store_mounted_twice(fs: Fs) -> None:
    second = fs.root / "mnt2"
    second.mkdir(mode=0o755)
    try:
        res = run_vnafs("mount", "--key-file", str(fs.key), str(fs.hot), str(second),
                        check=False)
        assert_one_line_error(res, "in use", "unmount")
        assert not mounted(second)
        write_file(fs.mnt / "f", b"first mount still works")
        assert (fs.mnt / "f").read_bytes() == b"first mount still works"
    finally:
        if mounted(second):
            run_vnafs("umount", str(second), check=False)


# -- /dev/fuse -------------------------------------------------------------------------------------


def _in_private_dev(script: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run `script` (then `exec "$@"`) in a new mount namespace with a tmpfs over /dev.

    The namespace ends with the process: nothing outlives this call.
    """
    need_program("unshare", "util-linux")
    need_program("mount", "mount")
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs tmpfs /dev && {script} exec "$@"', "sh", *argv],
        capture_output=True, text=True, timeout=60,
    )


def test_dev_fuse_missing(new_fs: Fs) -> None:
    res = _in_private_dev("", VNAFS, *mount_args(new_fs))
    assert_one_line_error(res, "/dev/fuse", "missing")
    assert_not_mounted(new_fs)


def test_dev_fuse_not_permitted(new_fs: Fs) -> None:
    """An unprivileged user meets a root-only /dev/fuse.

    Seen: "vnafs: /dev/fuse is not accessible: run vnafs as root or give this user access to
    /dev/fuse". The key is read before /dev/fuse is checked, so the user gets its own copy; the
    store (mode 0700) is never reached.
    """
    need_program("setpriv", "util-linux")
    key = new_fs.root / "nobody.key"
    shutil.copy(new_fs.key, key)
    os.chown(key, NOBODY, NOBODY)
    res = _in_private_dev(
        "mknod /dev/fuse c 10 229 && chmod 600 /dev/fuse &&",
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        VNAFS, "mount", "--key-file", str(key), str(new_fs.hot), str(new_fs.mnt),
    )
    assert_one_line_error(res, "/dev/fuse", "not accessible")
    assert_not_mounted(new_fs)


# -- hot stores ------------------------------------------------------------------------------------


def test_hot_store_missing(new_fs: Fs) -> None:
    missing = new_fs.root / "no-such-store"
    res = run_vnafs("mount", "--key-file", str(new_fs.key), str(missing), str(new_fs.mnt),
                    check=False)
    assert_one_line_error(res, str(missing), "does not exist", "mkfs")
    assert not mounted(new_fs.mnt)
    assert not missing.exists()


def test_hot_store_is_empty_dir(new_fs: Fs) -> None:
    empty = new_fs.root / "empty"
    empty.mkdir()
    res = run_vnafs("mount", "--key-file", str(new_fs.key), str(empty), str(new_fs.mnt),
                    check=False)
    assert_one_line_error(res, "not a vnafs hot store", "mkfs")
    assert not mounted(new_fs.mnt)
    assert list(empty.iterdir()) == []


def test_hot_store_is_random_dir(new_fs: Fs) -> None:
    other = new_fs.root / "documents"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("not a hot store\n")
    (other / "sub" / "data.bin").write_bytes(os.urandom(100))
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    res = run_vnafs("mount", "--key-file", str(new_fs.key), str(other), str(new_fs.mnt),
                    check=False)
    assert_one_line_error(res, "not a vnafs hot store", "mkfs")
    assert not mounted(new_fs.mnt)
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before


def test_hot_store_is_a_file(new_fs: Fs) -> None:
    target = new_fs.root / "a-file"
    target.write_text("x")
    res = run_vnafs("mount", "--key-file", str(new_fs.key), str(target), str(new_fs.mnt),
                    check=False)
    assert_one_line_error(res, "not a directory")
    assert not mounted(new_fs.mnt)


def test_hot_store_newer_format(new_fs: Fs) -> None:
    (new_fs.hot / "FORMAT").write_text("vnafs-hot-store 99\n")
    res = run_vnafs(*mount_args(new_fs), check=False)
    err = assert_one_line_error(res, "newer", "upgrade vnafs")
    assert "99" in err
    assert_not_mounted(new_fs)
    res = run_vnafs("fsck", "--key-file", str(new_fs.key), str(new_fs.hot), check=False)
    assert_one_line_error(res, "newer", "upgrade vnafs")


def test_hot_store_format_file_damaged(new_fs: Fs) -> None:
    (new_fs.hot / "FORMAT").write_text("something else\n")
    res = run_vnafs(*mount_args(new_fs), check=False)
    assert_one_line_error(res, "FORMAT", "damaged", "restore")
    assert_not_mounted(new_fs)


def test_hot_store_keyring_missing(new_fs: Fs) -> None:
    (new_fs.hot / "keyring").unlink()
    res = run_vnafs(*mount_args(new_fs), check=False)
    err = assert_one_line_error(res, "keyring")
    # The fix must name a command that exists ('vnafs init' does not).
    assert "vnafs init" not in err, err
    assert_not_mounted(new_fs)


def test_fsck_on_store_in_use(fs: Fs) -> None:
    write_file(fs.mnt / "f", b"data")
    res = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot), check=False)
    assert_one_line_error(res, "in use", "unmount")
    # fsck touched nothing: the mount still works and its data is there.
    assert (fs.mnt / "f").read_bytes() == b"data"
    fs.umount()
    run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot))


# -- mkfs and keygen -------------------------------------------------------------------------------


def test_mkfs_refuses_non_empty_dir(workdir: Path) -> None:
    key = workdir / "site.key"
    run_vnafs("keygen", str(key))
    target = workdir / "busy"
    target.mkdir()
    (target / "precious.txt").write_text("keep me\n")
    res = run_vnafs("mkfs", "--key-file", str(key), str(target), check=False)
    assert_one_line_error(res, "not empty", "empty or new directory")
    assert [p.name for p in target.iterdir()] == ["precious.txt"]
    assert (target / "precious.txt").read_text() == "keep me\n"


def test_mkfs_refuses_existing_store(new_fs: Fs) -> None:
    before = (new_fs.hot / "keyring").read_bytes()
    res = run_vnafs("mkfs", "--key-file", str(new_fs.key), str(new_fs.hot), check=False)
    assert_one_line_error(res, "not empty")
    assert (new_fs.hot / "keyring").read_bytes() == before
    new_fs.mount()


def test_mkfs_on_a_file(workdir: Path) -> None:
    key = workdir / "site.key"
    run_vnafs("keygen", str(key))
    target = workdir / "a-file"
    target.write_text("keep me\n")
    res = run_vnafs("mkfs", "--key-file", str(key), str(target), check=False)
    assert_one_line_error(res, str(target))
    assert target.read_text() == "keep me\n"


def test_keygen_refuses_overwrite(workdir: Path) -> None:
    key = workdir / "site.key"
    run_vnafs("keygen", str(key))
    before = key.read_bytes()
    res = run_vnafs("keygen", str(key), check=False)
    assert_one_line_error(res, "refusing to overwrite", str(key))
    assert key.read_bytes() == before


# -- options and settings --------------------------------------------------------------------------


def test_unknown_mount_option(new_fs: Fs) -> None:
    res = run_vnafs(*mount_args(new_fs, "-o", "allow_other,bogus"), check=False)
    assert_one_line_error(res, "'bogus'", "allow_other", "sync_on_close", "cache_mib")
    assert_not_mounted(new_fs)


def test_bad_mount_option_value(new_fs: Fs) -> None:
    res = run_vnafs(*mount_args(new_fs, "-o", "cache_mib=lots"), check=False)
    assert_one_line_error(res, "cache_mib", "number")
    assert_not_mounted(new_fs)


@pytest.mark.parametrize(
    ("old", "new", "needles"),
    [
        ("format = 1\n", "format = 1\nbogus = 1\n", ("unknown", "'bogus'", "remove")),
        ("[store]\n", "[store]\nbogus = 1\n", ("unknown setting store.bogus", "zstd_level")),
        ("zstd_level = 1\n", "zstd_level = 99\n", ("store.zstd_level", "between 1 and 19")),
        ("workers = 2\n", 'workers = "two"\n', ("store.workers", "whole number")),
        ("allow_other = false\n", "allow_other = 1\n", ("mount.allow_other", "true or false")),
        ("[store]\n", "[store\n", ("not valid toml", "fix")),
        # A hand-edited `format` that is not a number is a user error like any other value.
        ("format = 1\n", 'format = "one"\n', ("format",)),
        ('views = ".dicom"\n', 'views = "a/b"\n', ("dicom.views", "single file name")),
        ('views = ".dicom"\n', 'views = ".."\n', ("dicom.views", "single file name")),
        ('views = ".dicom"\n', "views = 1\n", ("dicom.views", "quoted string")),
        ("by_patient = false\n", 'by_patient = "yes"\n', ("dicom.by_patient", "true or false")),
    ],
    ids=["unknown-top-level-key", "unknown-store-key", "zstd-level-99", "workers-not-int",
         "allow-other-not-bool", "broken-toml", "format-not-int", "views-with-slash",
         "views-dotdot", "views-not-string", "by-patient-not-bool"],
)
def test_bad_config(new_fs: Fs, old: str, new: str, needles: tuple[str, ...]) -> None:
    path = new_fs.hot / "vnafs.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    res = run_vnafs(*mount_args(new_fs), check=False)
    assert_one_line_error(res, "vnafs.toml", *needles)
    assert_not_mounted(new_fs)


# -- a full hot store ------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_disk_full(workdir: Path) -> None:
    """ENOSPC reaches the writer; freeing space makes the store fully usable again.

    The hot store is its own 24 MiB tmpfs; the key stays outside it.
    """
    need_program("mount", "mount")
    need_program("umount", "mount")
    fs = Fs(workdir)
    fs.hot.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(fs.hot)],
                   check=True)
    try:
        fs.create()
        fs.mount()
        pid = fs.pid()
        assert pid is not None

        written: dict[Path, str] = {}
        failed: Path | None = None
        error: OSError | None = None
        for i in range(64):  # 128 MiB of random data cannot fit in 24 MiB
            path = fs.mnt / f"f{i:02d}"
            data = os.urandom(2 * MIB)
            try:
                with open(path, "wb") as f:
                    f.write(data)
                    if i % 2:
                        os.fsync(f.fileno())
            except OSError as exc:
                failed, error = path, exc
                break
            written[path] = _sha(data)
        assert error is not None, "the 24 MiB hot store never filled up"
        assert error.errno == errno.ENOSPC, error
        assert len(written) >= 4
        full_free = os.statvfs(fs.hot).f_bavail * os.statvfs(fs.hot).f_frsize

        # The daemon survived and still serves the mount.
        assert alive(pid) and fs.pid() == pid
        assert mounted(fs.mnt)
        assert f"f{0:02d}" in os.listdir(fs.mnt)
        for path, digest in written.items():
            assert _sha(path.read_bytes()) == digest, path

        # Free space: the failed file and the three oldest files.
        assert failed is not None
        failed.unlink()
        for path in list(written)[:3]:
            path.unlink()
            del written[path]
        st = os.statvfs(fs.mnt)
        free = st.f_bavail * st.f_frsize
        assert free > full_free
        assert free >= 4 * MIB, free

        new = os.urandom(2 * MIB)
        with open(fs.mnt / "after-full", "wb") as f:
            f.write(new)
            os.fsync(f.fileno())
        assert (fs.mnt / "after-full").read_bytes() == new
        written[fs.mnt / "after-full"] = _sha(new)
        for path, digest in written.items():
            assert _sha(path.read_bytes()) == digest, path

        fs.umount()
        assert not mounted(fs.mnt)
        check = run_vnafs("fsck", "--key-file", str(fs.key), str(fs.hot), check=False)
        assert check.returncode in (0, 2), check.stdout + check.stderr
        assert "DAMAGE" not in check.stdout and "Traceback" not in check.stderr
        repair = run_vnafs("fsck", "--repair", "--key-file", str(fs.key), str(fs.hot),
                           check=False)
        assert repair.returncode == 0, repair.stdout + repair.stderr
        assert "DAMAGE" not in repair.stdout

        # Everything written around the full disk reads back after a fresh mount.
        fs.mount()
        for path, digest in written.items():
            assert _sha(path.read_bytes()) == digest, path
        assert sorted(os.listdir(fs.mnt)) == sorted(p.name for p in written)
    finally:
        fs.cleanup()
        res = subprocess.run(["umount", str(fs.hot)], capture_output=True)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(fs.hot)], capture_output=True)


# -- status and umount -----------------------------------------------------------------------------


def test_status_of_non_vnafs_path(workdir: Path) -> None:
    res = run_vnafs("status", str(workdir), check=False)
    assert_one_line_error(res, "not a mounted vnafs file system", "vnafs mount")
    res = run_vnafs("status", str(workdir / "no-such-dir"), check=False)
    assert_one_line_error(res, "not a mounted vnafs file system")


def test_umount_of_non_vnafs_path(workdir: Path) -> None:
    res = run_vnafs("umount", str(workdir), check=False)
    assert_one_line_error(res, "not a mounted vnafs file system")


def test_umount_busy(fs: Fs) -> None:
    write_file(fs.mnt / "f", b"in use")
    sleeper = subprocess.Popen([need_program("sleep", "coreutils"), "30"], cwd=fs.mnt)
    try:
        time.sleep(0.2)
        res = run_vnafs("umount", str(fs.mnt), check=False)
        assert_one_line_error(res, "busy", "fuser")
        assert mounted(fs.mnt)
        assert (fs.mnt / "f").read_bytes() == b"in use"
        write_file(fs.mnt / "g", b"still writable")
        assert (fs.mnt / "g").read_bytes() == b"still writable"
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
    fs.umount()
    assert not mounted(fs.mnt)
