"""Archive URLs: parsing and validation, with no I/O.

Why a module of its own: the configuration (`vnafs/config.py`) validates the archive URL when
it loads `vnafs.toml`, and the object-store clients (`backend.py`) open what it names. Keeping
the parser apart lets the configuration sit below the clients in the layer order
(docs/architecture.md section 1), and lets a URL be checked without importing obstore.

A URL never carries a secret: anything that looks like a credential in it is refused, because
URLs end up in `vnafs.toml`, logs, `vnafs status` and shell history.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass, field

from vnafs.errors import VnafsError


class ArchiveConfigError(VnafsError):
    """The archive URL or the credentials file is wrong: fix the configuration, do not retry."""


_OPTIONS = {"file": frozenset(), "s3": frozenset({"endpoint", "region"}),
            "azure": frozenset({"account", "endpoint"})}
# Query names that look like credentials. Refused outright: URLs end up in vnafs.toml, logs,
# `vnafs status` and shell history.
_SECRET_WORDS = ("key", "secret", "token", "sas", "sig", "password", "credential")
_NO_SECRETS = ("credentials never go in the archive URL; put them in the environment or the "
               "credentials file")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_AZURE_CONTAINER = re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
AZURE_ACCOUNT = re.compile(r"[a-z0-9]{3,24}")
_SEGMENT = re.compile(r"[A-Za-z0-9._~=+-]+")
_REGION = re.compile(r"[a-z0-9-]{1,40}")


@dataclass(frozen=True)
class ArchiveURL:
    scheme: str  # "file" | "s3" | "azure"
    container: str  # bucket or container; "" for file
    prefix: str  # site prefix inside the bucket, no leading/trailing "/"; file: the directory
    options: dict[str, str] = field(default_factory=dict)  # endpoint, region, account
    given: str = field(default="", compare=False)

    def display(self) -> str:
        """The URL as given; safe to log because `parse_url` refuses credentials in it."""
        if self.given:
            return self.given
        if self.scheme == "file":
            return f"file://{self.prefix}"
        query = urllib.parse.urlencode(sorted(self.options.items()), safe=":/")
        return f"{self.scheme}://{self.container}/{self.prefix}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.display()


def _bare(url: str) -> str:
    """The URL without query string, fragment and user info, for error messages about a URL
    that may hold a secret."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path
    except ValueError:
        return "(unparsable URL)"


def parse_url(url: str) -> ArchiveURL:
    """Parse and validate an archive URL; `ArchiveConfigError` says what to fix."""
    bare = _bare(url)
    try:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        raise ArchiveConfigError(f"archive URL {bare} cannot be parsed: write file:///path, "
                                 "s3://bucket/prefix or azure://container/prefix") from None
    if "@" in parts.netloc or any(
            any(w in k.lower() for w in _SECRET_WORDS) for k, _ in query):
        raise ArchiveConfigError(f"archive URL {bare}: {_NO_SECRETS}")
    scheme = parts.scheme
    if scheme not in _OPTIONS:
        raise ArchiveConfigError(f"archive URL {bare} has an unsupported scheme: use "
                                 "file:///path, s3://bucket/prefix or azure://container/prefix")
    if parts.fragment:
        raise ArchiveConfigError(f"archive URL {bare} must not have a #fragment; remove it")
    options: dict[str, str] = {}
    for key, value in query:
        if key not in _OPTIONS[scheme]:
            known = ", ".join(sorted(_OPTIONS[scheme])) or "none"
            raise ArchiveConfigError(f"archive URL {bare}: unknown option {key!r}; "
                                     f"{scheme} URLs take {known}")
        if key in options:
            raise ArchiveConfigError(f"archive URL {bare}: option {key} is given twice; "
                                     "keep one")
        if not value:
            raise ArchiveConfigError(f"archive URL {bare}: option {key} needs a value")
        options[key] = value

    if scheme == "file":
        path = urllib.parse.unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ArchiveConfigError(f"archive URL {bare} must name an absolute directory: "
                                     "write file:///absolute/path")
        if "\0" in path:
            raise ArchiveConfigError(f"archive URL {bare} contains a NUL byte; fix the path")
        return ArchiveURL("file", "", os.path.normpath(path), options, url)

    container = parts.netloc
    word = "bucket" if scheme == "s3" else "container"
    if not container:
        raise ArchiveConfigError(f"archive URL {bare} names no {word}: write "
                                 f"{scheme}://{word}/prefix")
    pattern = _S3_BUCKET if scheme == "s3" else _AZURE_CONTAINER
    if not pattern.fullmatch(container):
        raise ArchiveConfigError(
            f"archive URL {bare}: {container!r} is not a valid {word} name (3-63 lowercase "
            f"letters, digits and hyphens); put the server address in ?endpoint=")
    # One leading and one trailing slash are separators; any other empty segment is an error
    # (S3 would treat "bucket//p" as the key prefix "/p").
    prefix = parts.path.removeprefix("/").removesuffix("/")
    if prefix and not all(_SEGMENT.fullmatch(s) and s not in (".", "..")
                          for s in prefix.split("/")):
        raise ArchiveConfigError(
            f"archive URL {bare}: the prefix {prefix!r} may only contain letters, digits and "
            "._~=+- separated by single slashes; rename it")
    endpoint = options.get("endpoint")
    if endpoint is not None:
        ep = urllib.parse.urlsplit(endpoint)
        if (ep.scheme not in ("http", "https") or not ep.hostname or "@" in ep.netloc
                or ep.query or ep.fragment):
            raise ArchiveConfigError(f"archive URL {bare}: endpoint {endpoint!r} is not an "
                                     "http:// or https:// server address; fix it")
        options["endpoint"] = endpoint.rstrip("/")
    if "region" in options and not _REGION.fullmatch(options["region"]):
        raise ArchiveConfigError(f"archive URL {bare}: region {options['region']!r} is not a "
                                 "region name such as us-east-1; fix it")
    if "account" in options and not AZURE_ACCOUNT.fullmatch(options["account"]):
        raise ArchiveConfigError(f"archive URL {bare}: account {options['account']!r} is not a "
                                 "storage account name (3-24 lowercase letters and digits)")
    return ArchiveURL(scheme, container, prefix, options, url)
