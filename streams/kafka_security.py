"""Kafka security settings -> the arguments of every aiokafka client aisemble makes, and clear failures.

``client_options(settings)`` turns ``AISEMBLE_KAFKA_SECURITY_PROTOCOL`` (PLAINTEXT, SSL, SASL_PLAINTEXT,
SASL_SSL), ``_SASL_MECHANISM`` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), ``_SASL_USERNAME`` / ``_PASSWORD``
and ``_SSL_CAFILE`` / ``_CERTFILE`` / ``_KEYFILE`` / ``_KEY_PASSWORD`` into aiokafka keyword arguments
(``security_protocol``, ``sasl_*``, ``ssl_context``). The edge's producer and reply listener, the admin
client, infra's readiness checks and the tests use it; the Faust agents get the same through
``streams.app.faust_credentials``.

Guarantees:
- A combination that cannot work is refused before any connection, with a :class:`KafkaSecurityConfigError`
  naming the setting: SASL without a mechanism, user name or password; credentials or certificates given
  with a protocol that would ignore them; a key file without a certificate; a file that does not exist or
  does not load (an encrypted key with no or a wrong password). An encrypted key without a password never
  prompts on the terminal.
- TLS always verifies the broker's certificate and host name; without ``_SSL_CAFILE`` the system's CA store
  is used.
- ``start_client`` starts a client; when the start fails to bootstrap, it connects once more per bootstrap
  address (bounded by ``timeout_s`` each) to say why: a refused SASL login (wrong user or password), a SASL
  mechanism the broker does not enable, a TLS handshake that failed (an unknown CA, a wrong host name) or a
  connection the broker closed during the handshake (protocol mismatch). Those raise
  :class:`KafkaSecurityFailure` (not retriable: retrying a wrong password only locks accounts), so a process
  with wrong credentials stops at start-up within about a second instead of retrying.

What can go wrong: a broker that is away is no security failure: the client's own error is re-raised.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Literal, Protocol

from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from streams.settings import Settings

log = logging.getLogger(__name__)

EXPLAIN_TIMEOUT_S = 5.0

FailureKind = Literal["sasl_authentication", "sasl_mechanism", "tls", "protocol"]


class KafkaSecurityConfigError(ValueError):
    """The Kafka security settings cannot work together; ``setting`` names the one to change."""

    def __init__(self, message: str, *, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


class KafkaSecurityFailure(RuntimeError):
    """The broker refused this client's security: wrong credentials, mechanism, certificate or protocol."""

    retriable = False

    def __init__(self, message: str, *, kind: FailureKind, address: str, detail: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.address = address
        self.detail = detail


class StartableClient(Protocol):
    async def start(self) -> None: ...


def _env(field: str) -> str:
    return f"AISEMBLE_{field.upper()}"


def _check_file(field: str, value: object) -> str:
    path = str(value)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise KafkaSecurityConfigError(f"{_env(field)}={path}: cannot read it ({exc.strerror})", setting=field) from exc
    return path


def build_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of a client: ``kafka_ssl_cafile`` (else the system CA store), and the client
    certificate and key for mutual TLS when set. Host names are always checked.

    Raises:
        KafkaSecurityConfigError: a file is missing or unreadable, the key does not match the certificate,
            or the key is encrypted and its password is missing or wrong.
    """
    cafile = _check_file("kafka_ssl_cafile", settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
    certfile = _check_file("kafka_ssl_certfile", settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None
    keyfile = _check_file("kafka_ssl_keyfile", settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None
    key_password = settings.kafka_ssl_key_password.get_secret_value() if settings.kafka_ssl_key_password else None
    encrypted = _key_is_encrypted(keyfile or certfile)
    if encrypted and key_password is None:
        raise KafkaSecurityConfigError(
            f"the client key {keyfile or certfile} is encrypted: set AISEMBLE_KAFKA_SSL_KEY_PASSWORD",
            setting="kafka_ssl_key_password",
        )
    if cafile is not None:
        try:
            ssl.create_default_context(cafile=cafile)
        except ssl.SSLError as exc:
            raise KafkaSecurityConfigError(
                f"AISEMBLE_KAFKA_SSL_CAFILE={cafile} holds no usable CA certificate: {exc}", setting="kafka_ssl_cafile"
            ) from exc
    try:
        return create_ssl_context(
            cafile=cafile,
            certfile=certfile,
            keyfile=keyfile,
            # A callable, so an encrypted key without a password fails here instead of prompting on a tty.
            password=key_password if key_password is not None else (lambda: ""),
        )
    except ssl.SSLError as exc:
        # The CA loaded above; an encrypted key that fails to load most likely has the wrong password.
        field = "kafka_ssl_certfile"
        if encrypted and "KEY_VALUES_MISMATCH" not in str(exc):
            field = "kafka_ssl_key_password"
        raise KafkaSecurityConfigError(
            f"cannot load the Kafka TLS files (check {_env(field)}): {exc}", setting=field
        ) from exc


def _key_is_encrypted(path: str | None) -> bool:
    """Whether a PEM file holds an encrypted private key (PKCS#8 ``ENCRYPTED PRIVATE KEY`` or legacy
    ``Proc-Type: 4,ENCRYPTED``)."""
    if path is None:
        return False
    with open(path, "rb") as file:
        text = file.read(1 << 20)
    return b"ENCRYPTED PRIVATE KEY" in text or b"Proc-Type: 4,ENCRYPTED" in text


def client_options(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for ``settings``' Kafka security (``{"security_protocol": "PLAINTEXT"}``
    when there is none); pass them to every ``AIOKafkaProducer``/``Consumer``/``AdminClient``.

    Raises:
        KafkaSecurityConfigError: the combination cannot work (see the module docstring).
    """
    protocol = settings.kafka_security_protocol
    sasl = protocol.startswith("SASL_")
    tls = protocol.endswith("SSL")
    if not sasl:
        for field in ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password"):
            if getattr(settings, field) is not None:
                raise KafkaSecurityConfigError(
                    f"{_env(field)} is set but AISEMBLE_KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL: "
                    f"set the protocol to SASL_SSL (or SASL_PLAINTEXT), or unset {_env(field)}",
                    setting=field,
                )
    if not tls:
        for field in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", "kafka_ssl_key_password"):
            if getattr(settings, field) is not None:
                raise KafkaSecurityConfigError(
                    f"{_env(field)} is set but AISEMBLE_KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS: "
                    f"set the protocol to SSL or SASL_SSL, or unset {_env(field)}",
                    setting=field,
                )
    if settings.kafka_ssl_keyfile is not None and settings.kafka_ssl_certfile is None:
        raise KafkaSecurityConfigError(
            "AISEMBLE_KAFKA_SSL_KEYFILE is set without AISEMBLE_KAFKA_SSL_CERTFILE (the client certificate)",
            setting="kafka_ssl_certfile",
        )
    if settings.kafka_ssl_key_password is not None and settings.kafka_ssl_certfile is None:
        raise KafkaSecurityConfigError(
            "AISEMBLE_KAFKA_SSL_KEY_PASSWORD is set without a client certificate (AISEMBLE_KAFKA_SSL_CERTFILE)",
            setting="kafka_ssl_certfile",
        )
    options: dict[str, Any] = {"security_protocol": protocol}
    if sasl:
        if settings.kafka_sasl_mechanism is None:
            raise KafkaSecurityConfigError(
                f"AISEMBLE_KAFKA_SECURITY_PROTOCOL={protocol} needs AISEMBLE_KAFKA_SASL_MECHANISM "
                f"(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)",
                setting="kafka_sasl_mechanism",
            )
        for field in ("kafka_sasl_username", "kafka_sasl_password"):
            value = getattr(settings, field)
            text = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            if not text:
                raise KafkaSecurityConfigError(f"{protocol} needs {_env(field)}", setting=field)
        if protocol == "SASL_PLAINTEXT":
            log.warning("Kafka SASL over PLAINTEXT: the login is not encrypted (%s)", settings.kafka_sasl_mechanism)
        assert settings.kafka_sasl_password is not None  # checked above
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password.get_secret_value(),
        )
    if tls:
        options["ssl_context"] = build_ssl_context(settings)
    return options


def _bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for entry in bootstrap.split(","):
        host, _, port = entry.strip().rpartition(":")
        if host and port.isdigit():
            out.append((host.strip("[]"), int(port)))
    return out


def _failure(kind: FailureKind, address: str, detail: str, settings: Settings) -> KafkaSecurityFailure:
    user, mechanism = settings.kafka_sasl_username, settings.kafka_sasl_mechanism
    protocol = settings.kafka_security_protocol
    if kind == "sasl_authentication":
        message = (
            f"Kafka SASL authentication failed at {address} for user {user!r} with {mechanism}: {detail}. "
            f"Check AISEMBLE_KAFKA_SASL_USERNAME, AISEMBLE_KAFKA_SASL_PASSWORD and AISEMBLE_KAFKA_SASL_MECHANISM"
        )
    elif kind == "sasl_mechanism":
        message = (
            f"Kafka SASL authentication failed at {address}: the broker does not enable mechanism {mechanism} "
            f"({detail}); set AISEMBLE_KAFKA_SASL_MECHANISM to one it enables"
        )
    elif kind == "tls":
        message = (
            f"Kafka TLS handshake failed at {address}: {detail}. Check AISEMBLE_KAFKA_SSL_CAFILE (the CA that "
            f"signed the broker's certificate) and that the bootstrap host name is in the certificate"
        )
    else:
        message = (
            f"Kafka at {address} closed the connection during the handshake with security protocol {protocol} "
            f"({detail}): the listener probably expects another AISEMBLE_KAFKA_SECURITY_PROTOCOL"
        )
    return KafkaSecurityFailure(message, kind=kind, address=address, detail=detail)


async def explain_failure(
    settings: Settings, options: dict[str, Any] | None = None, timeout_s: float = EXPLAIN_TIMEOUT_S
) -> KafkaSecurityFailure | None:
    """Why clients with ``settings`` cannot bootstrap, if it is a security reason; None when some address
    accepts the connection and login, or when none could be reached at all (not a security matter).

    Connects once per bootstrap address (at most ``timeout_s`` each) with ``options`` (default
    ``client_options(settings)``).
    """
    options = options if options is not None else client_options(settings)
    protocol_failure: KafkaSecurityFailure | None = None
    for host, port in _bootstrap_addresses(settings.kafka_bootstrap):
        address = f"{host}:{port}"
        try:
            async with asyncio.timeout(timeout_s):
                conn = await create_conn(host, port, request_timeout_ms=int(timeout_s * 1000), **options)
        except SaslAuthenticationFailed as exc:
            return _failure("sasl_authentication", address, str(exc.args[0] if exc.args else exc), settings)
        except UnsupportedSaslMechanismError as exc:
            return _failure("sasl_mechanism", address, type(exc).__name__, settings)
        except ssl.SSLError as exc:  # SSLCertVerificationError included: unknown CA, wrong host name
            return _failure("tls", address, getattr(exc, "verify_message", None) or str(exc), settings)
        except KafkaConnectionError as exc:
            # The TCP connection opened, then the broker hung up mid-handshake: TLS spoken to a plaintext
            # listener answers garbage or closes; plaintext spoken to a TLS listener is closed at once.
            protocol_failure = protocol_failure or _failure("protocol", address, str(exc), settings)
            continue
        except (OSError, TimeoutError, KafkaError) as exc:  # away, refused, slow: not a security matter
            log.debug("explaining the bootstrap failure: %s unreachable (%r)", address, exc)
            continue
        try:  # a SASL listener answers ApiVersions before any login: ask what the client's bootstrap asks
            async with asyncio.timeout(timeout_s):
                await conn.send(MetadataRequest([]))
        except KafkaConnectionError as exc:
            protocol_failure = protocol_failure or _failure("protocol", address, str(exc), settings)
            continue
        except (OSError, TimeoutError, KafkaError) as exc:
            log.debug("explaining the bootstrap failure: no metadata from %s (%r)", address, exc)
            continue
        finally:
            conn.close()
        return None
    return protocol_failure


async def start_client(client: StartableClient, settings: Settings, timeout_s: float = EXPLAIN_TIMEOUT_S) -> None:
    """``await client.start()``; a bootstrap failure with a security cause raises :class:`KafkaSecurityFailure`.

    Raises:
        KafkaSecurityFailure: wrong credentials, mechanism, certificate or protocol (see ``explain_failure``).
        KafkaConnectionError: the client's own error, when the cause is not security (a broker away).
    """
    try:
        await client.start()
    except KafkaConnectionError as exc:
        failure = await explain_failure(settings, timeout_s=timeout_s)
        if failure is not None:
            raise failure from exc
        raise
