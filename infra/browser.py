"""The headless browser the status page test drives: find Chromium and its driver, installing them when missing.

``find_browser(install=True)`` returns the paths of ``chromium`` and ``chromedriver``; when either is missing
and we are root on Debian it installs Debian's ``chromium`` and ``chromium-driver`` first (the way
:mod:`infra.redis` installs ``redis-server``: :func:`infra.apt.apt_install`). ``python -m infra.browser``
does the same from a shell (``make test`` runs it before pytest, so the download is not timed as a test).

Guarantees: nothing is installed when both are found, nor without ``install``; a returned path exists
and is executable. The browser is never started here (the test starts it headless, and quits it).

What can go wrong: not root or not Debian, no network, no such package: :class:`ToolMissing` naming
the packages to install.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass

from infra.apt import apt_install
from infra.errors import ToolMissing

log = logging.getLogger(__name__)

BINARIES = ("chromium", "chromium-browser")  # Debian names it chromium; Ubuntu's snap shim chromium-browser
DRIVER = "chromedriver"
PACKAGES = ("chromium", "chromium-driver")
INSTALL_HINT = (
    "apt-get install chromium chromium-driver (Debian/Ubuntu), brew install --cask chromium chromedriver (macOS)"
)

__all__ = ["Browser", "find_browser"]


@dataclass(frozen=True)
class Browser:
    """Where the browser and its WebDriver are."""

    binary: str
    driver: str


def _which() -> Browser | None:
    binary = next((path for name in BINARIES if (path := shutil.which(name)) is not None), None)
    driver = shutil.which(DRIVER)
    return Browser(binary, driver) if binary is not None and driver is not None else None


def find_browser(install: bool = True) -> Browser:
    """Chromium and chromedriver; installs Debian's packages when one is missing, ``install`` and root on Debian.

    Raises:
        ToolMissing: not installed and not installable here.
    """
    found = _which()
    if found is not None:
        return found
    if not install:
        raise ToolMissing("chromium and chromedriver", INSTALL_HINT)
    apt_install("chromium and chromedriver", PACKAGES, INSTALL_HINT)
    found = _which()
    if found is None:
        raise ToolMissing("chromium and chromedriver", f"installed, yet not on PATH; {INSTALL_HINT}")
    return found


def main() -> int:
    """``python -m infra.browser``: install when missing; 0 and the paths, or 1 and what to install."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        browser = find_browser()
    except ToolMissing as exc:
        log.error("infra.browser: %s", exc)
        return 1
    log.info("infra.browser: %s, %s", browser.binary, browser.driver)
    return 0


if __name__ == "__main__":
    sys.exit(main())
