"""Install a missing system tool from Debian's packages, the way a fresh machine gets what infra needs.

``apt_install(tool, packages, hint)`` runs ``apt-get install -y --no-install-recommends <packages>`` when
this process may (root, on Debian with apt-get); ``can_apt_install()`` says whether it may. Used for
``redis-server`` (:mod:`infra.redis`) and for the headless browser of the status page test
(:mod:`infra.browser`).

Guarantees: nothing is installed unless the caller asked (``install=True`` upstream) and we are root on
Debian; every apt-get run is bounded (``APT_TIMEOUT_S``) and waits for another apt's lock rather than
failing on it (``DPkg::Lock::Timeout``); a failed install is tried once more after ``apt-get update``
(stale or missing package lists), then raises :class:`ToolMissing` with apt's last words and ``hint``.

What can go wrong: no network or no such package (:class:`ToolMissing`), a hung apt-get (killed at
``APT_TIMEOUT_S``, then :class:`ToolMissing`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from infra.errors import ToolMissing

log = logging.getLogger(__name__)

APT_TIMEOUT_S = 900.0
LOCK_WAIT_S = 300  # another apt-get (a second test process installing the same thing) holds the lock

__all__ = ["APT_TIMEOUT_S", "apt_install", "can_apt_install"]


def _is_debian() -> bool:
    return Path("/etc/debian_version").is_file() and shutil.which("apt-get") is not None


def can_apt_install() -> bool:
    """True when this process may install Debian packages: root, on Debian, with apt-get."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and _is_debian()


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, 124, "", f"{' '.join(cmd)} ran past {APT_TIMEOUT_S:g} s: {exc}")


def apt_install(tool: str, packages: Sequence[str], hint: str) -> None:
    """Install ``packages`` with apt-get so that ``tool`` can be found.

    Raises:
        ToolMissing: not root on Debian, or apt-get failed twice (``hint`` says what to do instead).
    """
    if not can_apt_install():
        raise ToolMissing(tool, hint)
    log.warning("%s not found; installing Debian's %s", tool, " ".join(packages))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_WAIT_S}", "install", "-y", "--no-install-recommends",
           *packages]  # fmt: skip
    done = _run(cmd, env)
    if done.returncode != 0:  # stale or missing package lists: refresh once and retry
        _run(["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_WAIT_S}", "update"], env)
        done = _run(cmd, env)
    if done.returncode != 0:
        raise ToolMissing(tool, f"apt-get install {' '.join(packages)} failed: {done.stderr.strip()[-500:]}; {hint}")
    log.warning("installed %s", " ".join(packages))
