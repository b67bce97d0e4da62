"""Errors raised while fetching, starting, checking or stopping the local Kafka broker and Redis.

Every failure in ``infra`` is an :class:`InfraError` (so a CLI can catch one type and print its message);
the subclasses carry the data a caller may branch on::

    InfraError                 anything in infra went wrong; .retriable says whether trying again may help
    +-- ToolMissing            java, mvn or redis-server is not installed (.tool, .install_hint)
    +-- NotLoopback            asked to *start* a server for an address that is not 127.0.0.1/localhost
    +-- PortInUse              the port is taken by something that is not the expected server (.port)
    +-- StartFailed            the server exited or did not answer in time (.log_tail: its last lines)

Messages are written for a person at a terminal: they say what to install or what to do instead.
"""

from __future__ import annotations


class InfraError(Exception):
    """Root of the errors of the ``infra`` package."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ToolMissing(InfraError):
    """A program that infra needs is not installed (or too old)."""

    def __init__(self, tool: str, install_hint: str) -> None:
        super().__init__(f"{tool} not found: {install_hint}")
        self.tool = tool
        self.install_hint = install_hint


class NotLoopback(InfraError):
    """infra only starts servers on 127.0.0.1; the address asked for is elsewhere."""

    def __init__(self, address: str, what: str) -> None:
        super().__init__(
            f"{what} at {address!r} does not answer, and infra only starts a local {what} on "
            f"127.0.0.1/localhost: start it yourself, or point the setting at 127.0.0.1"
        )
        self.address = address


class PortInUse(InfraError):
    """The port a server should bind is already taken by something else."""

    def __init__(self, port: int, what: str, detail: str = "") -> None:
        message = f"port {port} on 127.0.0.1 is in use, and what listens there is not a working {what}"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.port = port


class StartFailed(InfraError):
    """A server process exited during start-up or did not answer before the deadline."""

    retriable = True

    def __init__(self, message: str, log_tail: str = "") -> None:
        full = f"{message}\n--- last lines of the log ---\n{log_tail}" if log_tail else message
        super().__init__(full)
        self.log_tail = log_tail
