"""Process and port plumbing shared by the Kafka and Redis starters: pid files, ports, spawning, waiting
for a server to answer, stopping, log tails.

A starter runs these steps in order: ``claim_pid_file`` (refuse when our server from this data dir still
runs, drop a stale pid file), ``require_port_free``, ``spawn_detached`` (start the server and write its
pid file), ``wait_until_ready`` inside ``stopped_on_failure``; a handle's ``stop()`` is
``stop_started``, and ``stop_by_pid_file`` / ``owned_pid`` serve other processes (``infra down``,
``status``).

Guarantees:
- A server is stopped with SIGTERM, waited for up to a deadline, then SIGKILLed; ``terminate`` returns
  only once the process is gone (or was never there).
- ``stop_by_pid_file``, ``owned_pid`` and ``claim_pid_file`` only trust a pid whose command line
  (``/proc/<pid>/cmdline``, where there is a /proc) still contains the marker given, so a pid file left
  behind never kills, nor blocks a start on, a recycled pid.
- ``spawn_detached`` starts the server in its own session (a Ctrl-C to the caller's terminal does not
  reach it), with stdin from /dev/null and stdout and stderr appended to one file, and writes its pid
  file (atomically) before returning.
- ``wait_until_ready`` checks, in this order, that the process still runs, that the deadline has not
  passed, and whether it answers; it returns only once it answers, and otherwise raises
  :class:`StartFailed` carrying the log tail. A block under ``stopped_on_failure`` stops what was
  started when any exception (KeyboardInterrupt included) escapes it, then re-raises that exception.
- ``run_coroutine`` runs a short coroutine from synchronous code even when the calling thread already
  runs an event loop (it then uses a helper thread), so the sync API is safe in async test fixtures.

What can go wrong: :class:`InfraError` (the caller's own message) when our server still runs from the
data dir, :class:`PortInUse`, :class:`StartFailed`; ``OSError`` when the command cannot be executed or
the data dir is not writable; permissions (signalling another user's process raises
``PermissionError``); and the inherent race between checking that a port is free and the server
binding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from infra.errors import InfraError, PortInUse, StartFailed

log = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_DIR_ENV = "AISEMBLE_CACHE_DIR"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$AISEMBLE_CACHE_DIR``, else ``~/.cache/aisemble``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "aisemble"


def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP connection to ``host:port`` is accepted within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``host:port`` can be bound now (with SO_REUSEADDR, as the JVM and Redis bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (another process may still take it before you)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (zombies of our own children count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def cmdline(pid: int) -> str | None:
    """The process's command line joined by spaces, or None when unknown (no /proc, or gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file``, or None when the file is missing or unreadable."""
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def write_pid(pid_file: Path, pid: int) -> None:
    """Write ``pid`` atomically (write a temp file, then rename)."""
    tmp = pid_file.with_suffix(pid_file.suffix + ".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(pid_file)


def terminate(pid: int, *, timeout: float = 30.0, popen: subprocess.Popen[bytes] | None = None) -> bool:
    """SIGTERM ``pid``, wait up to ``timeout`` s, then SIGKILL. True when it had to be killed.

    Pass ``popen`` when the process is our child, so that it is reaped (no zombie left).
    """
    if popen is not None and popen.poll() is not None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    if _wait_gone(pid, timeout, popen):
        return False
    log.warning("pid %d did not stop within %.0f s after SIGTERM; sending SIGKILL", pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, 10.0, popen)
    return True


def _wait_gone(pid: int, timeout: float, popen: subprocess.Popen[bytes] | None) -> bool:
    if popen is not None:
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def stop_by_pid_file(pid_file: Path, marker: str, *, timeout: float = 30.0) -> bool:
    """Stop the process named by ``pid_file`` if it is alive and its command line contains ``marker``.

    Removes the pid file in every case where the process is gone afterwards. Returns True when a
    process was signalled.
    """
    pid = read_pid(pid_file)
    if pid is None or not pid_alive(pid):
        pid_file.unlink(missing_ok=True)
        return False
    line = cmdline(pid)
    if line is not None and marker not in line:
        log.warning("pid file %s names pid %d, which is not ours (%s); leaving it alone", pid_file, pid, line)
        pid_file.unlink(missing_ok=True)
        return False
    log.info("stopping pid %d (pid file %s)", pid, pid_file)
    terminate(pid, timeout=timeout)
    pid_file.unlink(missing_ok=True)
    return True


def owned_pid(pid_file: Path, marker: str) -> int | None:
    """The pid from ``pid_file`` when that process is alive and (where /proc tells) carries ``marker``."""
    pid = read_pid(pid_file)
    if pid is None or not pid_alive(pid):
        return None
    line = cmdline(pid)
    if line is not None and marker not in line:
        return None
    return pid


def status_data_dir(data_dir: str | Path | None, default: Callable[[], Path]) -> Path | None:
    """``data_dir`` as a Path; when None, ``default()``, or None when that raises :class:`InfraError` or
    ``ValueError`` (the address is not local or malformed, so there is no default data dir)."""
    if data_dir is not None:
        return Path(data_dir)
    try:
        return default()
    except (InfraError, ValueError):
        return None


def claim_pid_file(pid_file: Path, marker: str, already_runs: Callable[[int], InfraError]) -> None:
    """Make way for a new server's ``pid_file``: raise ``already_runs(pid)`` when the pid it names is alive
    and ours (see ``owned_pid``); otherwise remove it (left by a server that is gone, or by another)."""
    running = owned_pid(pid_file, marker)
    if running is not None:
        raise already_runs(running)
    pid_file.unlink(missing_ok=True)


def require_port_free(port: int, what: str, detail: str = "") -> None:
    """Raise :class:`PortInUse` (naming ``what``, with ``detail``) unless ``127.0.0.1:port`` can be bound now."""
    if not port_free(port):
        raise PortInUse(port, what, detail)


def spawn_detached(cmd: Sequence[str], *, cwd: Path, out_path: Path, pid_file: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in ``cwd`` in a session of its own (stdin from /dev/null, stdout and stderr appended to
    ``out_path``), then write its pid to ``pid_file``."""
    with out_path.open("ab") as out:
        popen = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    write_pid(pid_file, popen.pid)
    return popen


def wait_until_ready(
    popen: subprocess.Popen[bytes],
    ready: Callable[[float], bool],
    *,
    timeout: float,
    interval: float,
    exited: Callable[[int], str],
    timed_out: str,
    log_tail: Callable[[], str],
    since: float | None = None,
) -> None:
    """Return once ``ready(seconds_left)`` is True, polling every ``interval`` s.

    Each round checks first that the process still runs, then the deadline (``timeout`` s after
    ``since``, a ``time.monotonic()`` value; default: now), then ``ready``.

    Raises:
        StartFailed: message ``exited(status)`` when the process exits first, ``timed_out`` when the
            deadline passes first; either carrying ``log_tail()``.
    """
    deadline = (time.monotonic() if since is None else since) + timeout
    while True:
        if popen.poll() is not None:
            raise StartFailed(exited(popen.returncode), log_tail())
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StartFailed(timed_out, log_tail())
        if ready(remaining):
            return
        time.sleep(interval)


@contextlib.contextmanager
def stopped_on_failure(stop: Callable[[], object]) -> Iterator[None]:
    """Run the block; when anything escapes it (KeyboardInterrupt included), call ``stop()``, then re-raise."""
    try:
        yield
    except BaseException:
        stop()
        raise


def stop_started(
    popen: subprocess.Popen[bytes] | None,
    pid: int,
    pid_file: Path,
    marker: str,
    *,
    timeout: float,
    logger: logging.Logger,
    label: str,
) -> bool:
    """Stop server ``pid`` that this process spawned as ``popen`` (see ``terminate``) and remove its
    ``pid_file`` unless that names another live server of ours. Idempotent.

    Without a ``popen`` (a server this process did not spawn) it does nothing. Logs ``stopping <label>
    (pid N)`` on ``logger`` when the server was running. True when it had to be SIGKILLed.
    """
    if popen is None:
        return False
    killed = False
    if popen.poll() is None:
        logger.info("stopping %s (pid %d)", label, pid)
        killed = terminate(pid, timeout=timeout, popen=popen)
    if owned_pid(pid_file, marker) is None:
        pid_file.unlink(missing_ok=True)
    return killed


@contextlib.contextmanager
def dir_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (a ``.lock`` file in it) so that two processes starting a
    server from the same data dir take turns; released when the block ends or the process dies."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ("" when it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return ""
        return f"(cannot read {path}: {exc})"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def run_coroutine(factory: Callable[[], Coroutine[object, object, T]]) -> T:
    """Run ``factory()`` to completion from sync code, on a helper thread when a loop already runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="infra-probe") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()
