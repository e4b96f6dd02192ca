"""The archive backend contract, on a real directory, a real S3 server and a real Azurite.

One parametrized set of tests runs unchanged against file://, s3:// (SeaweedFS) and azure://
(Azurite): the replicator relies on exactly these semantics, so every store must show them.
The servers start once per module and are always stopped; every test works in its own site
prefix inside the shared bucket, so tests cannot see each other's objects.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import BUCKET
from tools.servers import Azurite, SeaweedFS
from vnafs.archive.backend import (
    ArchiveAuthError,
    ArchiveError,
    ArchiveMissing,
    Backend,
    open_backend,
)
from vnafs.archive.url import ArchiveConfigError, parse_url

Opener = Callable[[str], Backend]


@pytest.fixture(params=["file", "s3", "azure"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens (and checks) the backend of one site prefix, in a namespace private to the test."""
    run = uuid.uuid4().hex[:12]
    if request.param == "file":
        def open_file(prefix: str) -> Backend:
            root = tmp_path / "archive" / run / prefix
            root.parent.mkdir(parents=True, exist_ok=True)
            backend = open_backend(f"file://{root}")
            backend.check()
            return backend
        return open_file
    srv: SeaweedFS | Azurite = request.getfixturevalue(
        "seaweed" if request.param == "s3" else "azurite")

    def open_remote(prefix: str) -> Backend:
        backend = open_backend(srv.url(BUCKET, f"{run}/{prefix}"), env=srv.env())
        backend.check()
        return backend
    return open_remote


@pytest.fixture
def store(make: Opener) -> Backend:
    return make("site")


def server(request: pytest.FixtureRequest, kind: str) -> SeaweedFS | Azurite:
    srv: SeaweedFS | Azurite = request.getfixturevalue(
        "seaweed" if kind == "s3" else "azurite")
    return srv


# --- the contract, on every store ------------------------------------------------------------

def test_round_trip_small_and_empty(store: Backend) -> None:
    assert store.put("meta/HEAD", b"head v1") is True
    assert store.put("meta/empty", b"") is True
    assert store.get("meta/HEAD") == b"head v1"
    assert store.get("meta/empty") == b""
    assert store.size("meta/HEAD") == 7
    assert store.size("meta/empty") == 0


def test_round_trip_20_mib(store: Backend) -> None:
    data = os.urandom(20 << 20)
    assert store.put("blocks/ab/big", data, create=True) is True
    assert store.size("blocks/ab/big") == len(data)
    assert store.get("blocks/ab/big") == data


def test_put_accepts_memoryview(store: Backend) -> None:
    buf = bytearray(b"..payload..")
    assert store.put("blocks/mv", memoryview(buf)[2:9]) is True
    assert store.get("blocks/mv") == b"payload"


def test_create_only_never_replaces(store: Backend) -> None:
    assert store.put("keyring", b"first", create=True) is True
    assert store.put("keyring", b"second, longer", create=True) is False
    assert store.get("keyring") == b"first"
    assert store.size("keyring") == 5


def test_concurrent_create_only_has_one_winner(store: Backend) -> None:
    """Create-only is atomic: racing writers of one name (as two replicators of one site
    would be) see exactly one success, and the object holds the winner's bytes."""
    payloads = [f"writer {i} ".encode() * 1000 for i in range(8)]
    start = threading.Barrier(len(payloads))

    def race(data: bytes) -> bool:
        start.wait()
        return store.put("meta/lock", data, create=True)

    with ThreadPoolExecutor(len(payloads)) as pool:
        results = list(pool.map(race, payloads))
    assert results.count(True) == 1
    assert store.get("meta/lock") == payloads[results.index(True)]


def test_overwrite_replaces(store: Backend) -> None:
    store.put("meta/HEAD", b"old contents")
    assert store.put("meta/HEAD", b"new") is True
    assert store.get("meta/HEAD") == b"new"
    assert store.size("meta/HEAD") == 3


def test_missing_object(store: Backend) -> None:
    with pytest.raises(ArchiveMissing) as err:
        store.get("blocks/00/absent")
    assert "blocks/00/absent" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ArchiveMissing):
        store.get_range("blocks/00/absent", 0, 10)
    with pytest.raises(ArchiveMissing):
        store.get_range("blocks/00/absent", 3, 3)
    assert store.size("blocks/00/absent") is None


def test_delete_is_idempotent(store: Backend) -> None:
    store.put("blocks/cd/x", b"data")
    store.delete("blocks/cd/x")
    assert store.size("blocks/cd/x") is None
    with pytest.raises(ArchiveMissing):
        store.get("blocks/cd/x")
    store.delete("blocks/cd/x")
    store.delete("never/existed")
    assert list(store.list()) == []


def test_list_uses_string_prefixes(store: Backend) -> None:
    objects = {"a/1": b"1", "a/2": b"22", "ab/3": b"333", "b/4": b"4444", "meta/HEAD": b""}
    for name, data in objects.items():
        store.put(name, data)

    def names(prefix: str) -> dict[str, int]:
        return dict(store.list(prefix))

    assert names("") == {name: len(data) for name, data in objects.items()}
    assert names("a/") == {"a/1": 1, "a/2": 2}
    assert names("a") == {"a/1": 1, "a/2": 2, "ab/3": 3}
    assert names("ab") == {"ab/3": 3}
    assert names("a/1") == {"a/1": 1}
    assert names("meta/") == {"meta/HEAD": 0}
    assert names("zz") == {}
    assert names("a/9") == {}


def test_sites_in_one_bucket_are_isolated(make: Opener) -> None:
    short, longer = make("a"), make("ab")
    short.put("meta/HEAD", b"site a")
    longer.put("meta/HEAD", b"site ab")
    longer.put("blocks/only-ab", b"x")
    assert dict(short.list()) == {"meta/HEAD": 6}
    assert dict(longer.list()) == {"meta/HEAD": 7, "blocks/only-ab": 1}
    assert short.get("meta/HEAD") == b"site a"
    assert short.size("blocks/only-ab") is None
    short.delete("blocks/only-ab")
    assert longer.get("blocks/only-ab") == b"x"


def test_get_range(store: Backend) -> None:
    data = bytes(range(256)) * 4  # 1024 bytes
    store.put("blocks/r", data)
    assert store.get_range("blocks/r", 0, 10) == data[:10]
    assert store.get_range("blocks/r", 100, 356) == data[100:356]
    assert store.get_range("blocks/r", 1000, 2000) == data[1000:]  # clamped like a slice
    assert store.get_range("blocks/r", 1024, 1030) == b""
    assert store.get_range("blocks/r", 5, 5) == b""
    with pytest.raises(ValueError):
        store.get_range("blocks/r", 10, 5)


def test_invalid_names_are_caller_bugs(store: Backend) -> None:
    for name in ("", "/abs", "a//b", "a/../b", "./a", "a/", ".tmp/x"):
        with pytest.raises(ValueError):
            store.put(name, b"x")
    assert list(store.list()) == []


def test_check_passes_and_display_is_the_url(store: Backend) -> None:
    store.check()
    assert store.url.display() in repr(store)


# --- file:// specifics -----------------------------------------------------------------------

def test_file_layout_and_modes(tmp_path: Path) -> None:
    root = tmp_path / "arch"
    backend = open_backend(f"file://{root}")
    backend.check()  # parent exists: creates the directory
    assert root.is_dir() and (root.stat().st_mode & 0o777) == 0o700
    backend.put("blocks/ab/cd", b"sealed", create=True)
    assert (root / "blocks/ab/cd").read_bytes() == b"sealed"
    assert (root / "blocks/ab").stat().st_mode & 0o777 == 0o700
    assert backend.put("blocks/ab/cd", b"other", create=True) is False
    assert list((root / ".tmp").iterdir()) == []  # temp files never linger
    assert dict(backend.list()) == {"blocks/ab/cd": 6}  # .tmp is not listed


def test_file_check_needs_the_parent(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}/no/such/dir")
    with pytest.raises(ArchiveError, match="does not exist") as err:
        backend.check()
    assert not (tmp_path / "no").exists()
    assert "\n" not in str(err.value)


def test_file_missing_root_is_an_outage_not_a_missing_object(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}/unmounted")
    for call in (lambda: backend.get("meta/HEAD"), lambda: backend.size("meta/HEAD"),
                 lambda: list(backend.list()), lambda: backend.put("meta/HEAD", b"x")):
        with pytest.raises(ArchiveError, match="does not exist") as err:
            call()
        assert not isinstance(err.value, ArchiveMissing)
    assert not (tmp_path / "unmounted").exists()


# --- errors from real servers ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_wrong_secret_is_an_auth_error_without_the_secret(request: pytest.FixtureRequest,
                                                          kind: str) -> None:
    srv = server(request, kind)
    if kind == "s3":
        wrong = "wrong-" + secrets.token_urlsafe(24)
        env = {"AWS_ACCESS_KEY_ID": srv.env()["AWS_ACCESS_KEY_ID"],
               "AWS_SECRET_ACCESS_KEY": wrong}
        hint = "AWS_SECRET_ACCESS_KEY"
    else:
        wrong = base64.b64encode(os.urandom(64)).decode()
        env = {"AZURE_STORAGE_ACCOUNT_KEY": wrong}
        hint = "AZURE_STORAGE_ACCOUNT_KEY"
    backend = open_backend(srv.url(BUCKET, "wrong-secret"), env=env)
    for call in (backend.check, lambda: backend.put("meta/HEAD", b"x"),
                 lambda: backend.get("meta/HEAD"), lambda: list(backend.list())):
        with pytest.raises(ArchiveAuthError) as err:
            call()
        message = str(err.value)
        assert "rejected the credentials" in message and hint in message
        assert wrong not in message and wrong not in repr(err.value)
        assert "\n" not in message


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_no_credentials(request: pytest.FixtureRequest, kind: str) -> None:
    srv = server(request, kind)
    with pytest.raises(ArchiveAuthError, match="no credentials"):
        open_backend(srv.url(BUCKET, "site"), env={})


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_server_down_then_back(request: pytest.FixtureRequest, kind: str) -> None:
    srv = server(request, kind)
    backend = open_backend(srv.url(BUCKET, f"down-{uuid.uuid4().hex[:8]}"), env=srv.env())
    backend.put("meta/HEAD", b"before")
    srv.stop()
    try:
        for call in (backend.check, lambda: backend.get("meta/HEAD"),
                     lambda: backend.put("meta/HEAD", b"during")):
            t0 = time.monotonic()
            with pytest.raises(ArchiveError) as err:
                call()
            assert time.monotonic() - t0 < 30  # a hang guard, not a timing test
            assert not isinstance(err.value, (ArchiveMissing, ArchiveAuthError))
            assert "unreachable" in str(err.value) and "\n" not in str(err.value)
    finally:
        srv.start()
    backend.check()
    assert backend.get("meta/HEAD") == b"before"
    assert backend.put("meta/HEAD", b"after") is True
    assert backend.get("meta/HEAD") == b"after"


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_hung_server_times_out(request: pytest.FixtureRequest, kind: str) -> None:
    """A server that accepts connections but never answers fails after `timeout` (plus one
    retry), not after obstore's default minutes."""
    srv = server(request, kind)
    backend = open_backend(srv.url(BUCKET, f"hung-{uuid.uuid4().hex[:8]}"), env=srv.env(),
                           timeout=2)
    backend.put("meta/HEAD", b"x")
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(ArchiveError, match="timed out") as err:
            backend.get("meta/HEAD")
        assert time.monotonic() - t0 < 30  # a hang guard, not a timing test
        assert not isinstance(err.value, ArchiveMissing)
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    assert backend.get("meta/HEAD") == b"x"


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_missing_bucket(request: pytest.FixtureRequest, kind: str) -> None:
    srv = server(request, kind)
    backend = open_backend(srv.url("no-such-bucket", "site"), env=srv.env())
    for call in (backend.check, lambda: backend.put("meta/HEAD", b"x"),
                 lambda: backend.get("meta/HEAD")):
        with pytest.raises(ArchiveError) as err:
            call()
        assert type(err.value) is ArchiveError
        assert "no-such-bucket does not exist" in str(err.value)
        assert "create it first" in str(err.value)
    # and the put did not create it behind our back
    with pytest.raises(ArchiveError, match="does not exist"):
        backend.check()


# --- URLs ------------------------------------------------------------------------------------

def test_parse_good_urls() -> None:
    url = parse_url("s3://bucket-1/site/a?endpoint=http://127.0.0.1:8333/&region=eu-west-1")
    assert (url.scheme, url.container, url.prefix) == ("s3", "bucket-1", "site/a")
    assert url.options == {"endpoint": "http://127.0.0.1:8333", "region": "eu-west-1"}
    assert url.display() == "s3://bucket-1/site/a?endpoint=http://127.0.0.1:8333/&region=eu-west-1"
    assert parse_url("s3://bucket-1").prefix == ""
    az = parse_url("azure://images/site?account=devstoreaccount1")
    assert (az.scheme, az.container, az.prefix, az.options) == (
        "azure", "images", "site", {"account": "devstoreaccount1"})
    f = parse_url("file:///srv/archive/site/")
    assert (f.scheme, f.container, f.prefix) == ("file", "", "/srv/archive/site")


BAD_URLS = [
    ("ftp://bucket/p", "unsupported scheme"),
    ("/srv/archive", "unsupported scheme"),
    ("s3:///prefix", "names no bucket"),
    ("azure:///prefix?account=abc", "names no container"),
    ("file://relative/dir", "absolute directory"),
    ("file:relative/dir", "absolute directory"),
    ("s3://bucket/p?colour=red", "unknown option 'colour'"),
    ("file:///srv/a?endpoint=http://h", "unknown option 'endpoint'"),
    ("s3://bucket/p?region=us-east-1&region=eu-west-1", "given twice"),
    ("s3://bucket/p?endpoint=", "needs a value"),
    ("s3://bucket/p?endpoint=ftp://host", "not an http:// or https://"),
    ("s3://Bad_Bucket/p", "not a valid bucket name"),
    ("s3://127.0.0.1:8333/bucket", "not a valid bucket name"),
    ("s3://bucket//p", "prefix"),
    ("s3://bucket/a/../b", "prefix"),
    ("s3://bucket/p#frag", "fragment"),
    ("azure://images/p?account=Not_An_Account", "not a storage account name"),
]


@pytest.mark.parametrize("url, words", BAD_URLS, ids=[url for url, _ in BAD_URLS])
def test_bad_url_is_a_config_error(url: str, words: str) -> None:
    with pytest.raises(ArchiveConfigError) as err:
        parse_url(url)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("url", [
    "s3://bucket/p?access_key=AKIAEXAMPLE&secret=TOPSECRET42",
    "s3://bucket/p?aws_secret_access_key=TOPSECRET42",
    "s3://AKIAEXAMPLE:TOPSECRET42@bucket/p",
    "azure://images/p?account=abc&account_key=TOPSECRET42",
    "azure://images/p?account=abc&sas=sv%3D2020%26sig%3DTOPSECRET42",
    "azure://images/p?account=abc&sig=TOPSECRET42",
])
def test_secrets_in_the_url_are_refused(url: str) -> None:
    with pytest.raises(ArchiveConfigError, match="credentials never go in the archive URL") as e:
        open_backend(url, env={})
    assert "TOPSECRET42" not in str(e.value)


def test_azure_needs_an_account(azurite: Azurite) -> None:
    with pytest.raises(ArchiveConfigError, match="account"):
        open_backend(f"azure://{BUCKET}/site?endpoint={azurite.endpoint}", env=azurite.env())
    # ... which may also come from the environment
    backend = open_backend(f"azure://{BUCKET}/site-env?endpoint={azurite.endpoint}",
                           env={**azurite.env(), "AZURE_STORAGE_ACCOUNT": azurite.account})
    backend.check()


def test_azure_key_must_be_base64(azurite: Azurite) -> None:
    key = "not base64 TOPSECRET42!"
    with pytest.raises(ArchiveAuthError, match="not valid base64") as err:
        open_backend(azurite.url(BUCKET, "site"), env={"AZURE_STORAGE_ACCOUNT_KEY": key})
    assert "TOPSECRET42" not in str(err.value)


# --- the credentials file --------------------------------------------------------------------

def write_credentials(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_credentials_file_readable_by_others_is_refused(tmp_path: Path,
                                                        seaweed: SeaweedFS) -> None:
    creds = write_credentials(
        tmp_path / "credentials.toml",
        f'[s3]\naccess_key_id = "{seaweed.access_key}"\n'
        f'secret_access_key = "{seaweed.secret_key}"\n', 0o644)
    with pytest.raises(ArchiveConfigError, match="chmod 600") as err:
        open_backend(seaweed.url(BUCKET, "site"), credentials_file=creds, env={})
    assert seaweed.secret_key not in str(err.value)
    creds.chmod(0o600)
    open_backend(seaweed.url(BUCKET, "site"), credentials_file=creds, env={}).check()


def test_credentials_file_problems(tmp_path: Path, seaweed: SeaweedFS) -> None:
    url = seaweed.url(BUCKET, "site")
    with pytest.raises(ArchiveConfigError, match="does not exist"):
        open_backend(url, credentials_file=tmp_path / "absent.toml")
    bad = write_credentials(tmp_path / "bad.toml", '[s3]\nsecret_key = "TOPSECRET42"\n')
    with pytest.raises(ArchiveConfigError, match=r"unknown key s3\.secret_key") as err:
        open_backend(url, credentials_file=bad)
    assert "TOPSECRET42" not in str(err.value)
    broken = write_credentials(tmp_path / "broken.toml", '[s3]\naccess_key_id = "TOPSECRET42\n')
    with pytest.raises(ArchiveConfigError, match="not valid TOML") as err:
        open_backend(url, credentials_file=broken)
    assert "TOPSECRET42" not in str(err.value)


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_credentials_file_wins_over_environment(request: pytest.FixtureRequest, tmp_path: Path,
                                                kind: str) -> None:
    srv = server(request, kind)
    if isinstance(srv, SeaweedFS):
        good = (f'[s3]\naccess_key_id = "{srv.access_key}"\n'
                f'secret_access_key = "{srv.secret_key}"\n')
        bad = f'[s3]\naccess_key_id = "{srv.access_key}"\nsecret_access_key = "wrong-secret"\n'
        wrong_env = {"AWS_ACCESS_KEY_ID": srv.access_key, "AWS_SECRET_ACCESS_KEY": "wrong"}
    else:
        good = f'[azure]\naccount_key = "{srv.account_key}"\n'
        bad = f'[azure]\naccount_key = "{base64.b64encode(os.urandom(64)).decode()}"\n'
        wrong_env = {"AZURE_STORAGE_ACCOUNT_KEY": base64.b64encode(os.urandom(64)).decode()}
    url = srv.url(BUCKET, "creds-file")
    # Right file, wrong environment: the file is used.
    backend = open_backend(url, credentials_file=write_credentials(tmp_path / "good.toml", good),
                           env=wrong_env)
    backend.check()
    assert backend.put("meta/HEAD", b"via file") is True
    # Wrong file, right environment: still the file, so it fails.
    backend = open_backend(url, credentials_file=write_credentials(tmp_path / "bad.toml", bad),
                           env=srv.env())
    with pytest.raises(ArchiveAuthError):
        backend.check()
