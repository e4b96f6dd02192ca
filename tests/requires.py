"""Checks that what a test runs is installed; a missing piece FAILS the test with one line.

A test that needs an external program calls `need_program` first (best in the fixture that
starts it, so one check covers every test using it). On a machine where `make test` installed
everything the checks pass silently; on one where a package is missing, the test fails with

    storescp not found: install the Debian package dcmtk (make test installs it)

instead of an obscure error halfway through (a server that does not come up, a copy that
exits 127). Failing, not skipping: a missing install step must be visible, never a quietly
smaller test run.

The server classes in tools/servers.py run the same checks themselves and raise
MissingDependency; fixtures that construct them do so inside `fail_if_missing()`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.servers import MissingDependency, require_file, require_program


def need_program(name: str, package: str) -> str:
    """The path of program `name` on PATH; else fail the test naming Debian `package`."""
    try:
        return require_program(name, package)
    except MissingDependency as exc:
        raise _failure(exc) from None


def need_file(path_or_glob: str | os.PathLike[str], package: str) -> Path:
    """The first file matching `path_or_glob` (a path or a glob); else fail the test naming
    Debian `package` (for files a package provides outside PATH, such as a Samba module)."""
    try:
        return require_file(path_or_glob, package)
    except MissingDependency as exc:
        raise _failure(exc) from None


@contextlib.contextmanager
def fail_if_missing() -> Iterator[None]:
    """Turn a MissingDependency raised inside (by tools/servers.py) into a one-line failure."""
    try:
        yield
    except MissingDependency as exc:
        raise _failure(exc) from None


def _failure(missing: MissingDependency) -> BaseException:
    """pytest.fail's exception, reported as the message alone (`from None` drops the chain)."""
    return pytest.fail.Exception(str(missing), pytrace=False)


__all__ = ["fail_if_missing", "need_file", "need_program"]
