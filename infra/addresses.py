"""Parsing of Kafka bootstrap strings and Redis URLs, and the loopback rule (pure, no I/O).

Guarantees: every function here is deterministic and touches no network or file. ``require_loopback``
is the single place that decides which hosts infra may start a server for: ``127.0.0.1`` and
``localhost`` only, because every server infra starts binds to 127.0.0.1 and nothing else.

What can go wrong: a malformed address raises ``ValueError`` (a programming or settings error, not an
infra failure); a well-formed but non-local one raises :class:`infra.errors.NotLoopback`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from infra.errors import NotLoopback

KAFKA_DEFAULT_PORT = 9092
REDIS_DEFAULT_PORT = 6379
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost"})


def _split_host_port(entry: str, default_port: int) -> tuple[str, int]:
    entry = entry.strip()
    if "://" in entry:  # PLAINTEXT://host:port, as in listener strings
        entry = entry.split("://", 1)[1]
    if not entry:
        raise ValueError("empty address")
    if entry.startswith("["):  # [::1]:9092
        host, sep, rest = entry[1:].partition("]")
        if not sep:
            raise ValueError(f"unclosed '[' in address {entry!r}")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {entry!r}")
    elif entry.count(":") > 1:  # bare IPv6 without a port
        host, port_text = entry, ""
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        raise ValueError(f"no host in address {entry!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in address {entry!r}")
    return host, int(port_text)


def parse_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    """Split ``"host:port,host2:port2"`` into ``[(host, port), ...]``; a missing port means 9092.

    Accepts ``PLAINTEXT://host:port`` and ``[v6]:port`` entries; blank entries are skipped.

    Raises:
        ValueError: no entries, or an entry with a bad port.
    """
    entries = [e for e in bootstrap.split(",") if e.strip()]
    if not entries:
        raise ValueError(f"no broker address in bootstrap {bootstrap!r}")
    return [_split_host_port(e, KAFKA_DEFAULT_PORT) for e in entries]


def parse_redis_url(url: str) -> tuple[str, int, int]:
    """``redis://host:port/db`` -> ``(host, port, db)``; port defaults to 6379 and db to 0.

    Raises:
        ValueError: not a ``redis://`` or ``rediss://`` URL, or a bad port or db.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// URL: {url!r}")
    try:
        port = parts.port or REDIS_DEFAULT_PORT
    except ValueError as exc:
        raise ValueError(f"bad port in Redis URL {url!r}") from exc
    host = parts.hostname or "localhost"
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ValueError(f"bad database number in Redis URL {url!r}")
    return host, port, int(db_text)


def require_loopback(host: str, address: str, what: str) -> None:
    """Raise :class:`NotLoopback` unless ``host`` is one infra may start a server for."""
    if host.lower() not in LOOPBACK_HOSTS:
        raise NotLoopback(address, what)


def local_kafka_port(bootstrap: str) -> int:
    """The port to start a local broker on for ``bootstrap`` (its first entry, which must be loopback)."""
    host, port = parse_bootstrap(bootstrap)[0]
    require_loopback(host, bootstrap, "Kafka")
    return port


def local_redis_port(url: str) -> int:
    """The port to start a local Redis on for ``url`` (plain ``redis://`` on loopback only)."""
    host, port, _db = parse_redis_url(url)
    require_loopback(host, url, "Redis")
    if urlsplit(url).scheme != "redis":
        raise ValueError(f"infra starts Redis without TLS; use redis:// instead of {url!r}")
    return port
