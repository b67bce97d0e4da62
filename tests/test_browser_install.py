"""``infra.find_browser``: found on PATH, installed with apt-get when missing (root on Debian), or a clear
ToolMissing naming the packages. apt-get itself is replaced by a recorder here (pure units); the real install
is what ``make test`` runs first (``python -m infra.browser``), and tests/test_status_page.py uses its paths.
"""

from __future__ import annotations

import subprocess

import pytest

import infra.apt
import infra.browser
from infra.browser import Browser, find_browser
from infra.errors import ToolMissing


def _path(installed: set[str]) -> object:
    return lambda name: f"/usr/bin/{name}" if name in installed else None


def test_found_on_path_installs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(infra.browser.shutil, "which", _path({"chromium", "chromedriver"}))
    monkeypatch.setattr(infra.browser, "apt_install", lambda *a: pytest.fail("installed although found"))
    assert find_browser() == Browser("/usr/bin/chromium", "/usr/bin/chromedriver")


def test_a_missing_driver_alone_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = {"chromium"}
    calls: list[list[str]] = []

    def apt_get(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        installed.update({"chromium", "chromedriver"})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(infra.browser.shutil, "which", _path(installed))
    monkeypatch.setattr(infra.apt, "can_apt_install", lambda: True)
    monkeypatch.setattr(infra.apt.subprocess, "run", apt_get)
    assert find_browser() == Browser("/usr/bin/chromium", "/usr/bin/chromedriver")
    (cmd,) = calls
    assert cmd[0] == "apt-get" and "install" in cmd and "-y" in cmd
    assert cmd[-2:] == ["chromium", "chromium-driver"]


def test_a_failed_install_refreshes_the_lists_once_then_names_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def apt_get(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package chromium")

    monkeypatch.setattr(infra.browser.shutil, "which", _path(set()))
    monkeypatch.setattr(infra.apt, "can_apt_install", lambda: True)
    monkeypatch.setattr(infra.apt.subprocess, "run", apt_get)
    with pytest.raises(ToolMissing, match="apt-get install chromium chromium-driver") as caught:
        find_browser()
    assert "Unable to locate package" in str(caught.value)
    assert [c[-1] for c in calls] == ["chromium-driver", "update", "chromium-driver"]


def test_not_root_or_not_debian_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(infra.browser.shutil, "which", _path(set()))
    monkeypatch.setattr(infra.apt, "can_apt_install", lambda: False)
    monkeypatch.setattr(infra.apt.subprocess, "run", lambda *a, **k: pytest.fail("apt-get ran"))
    with pytest.raises(ToolMissing, match="chromium-driver"):
        find_browser()
    with pytest.raises(ToolMissing, match="chromium-driver"):
        find_browser(install=False)
