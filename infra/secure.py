"""A local Kafka broker with a SASL_SSL client listener: test certificates, SCRAM users, the listener config.

``make_certificates(folder)`` writes a throw-away certificate authority, a broker certificate for
``127.0.0.1``/``localhost`` (subject alternative names, so clients verify the host name), a client
certificate for mutual TLS, and the broker's PKCS12 keystore and truststore; it returns their paths.
``sasl_ssl_config(...)`` gives the server.properties entries of a broker whose client port speaks SASL_SSL
(SCRAM-SHA-256 and -512 over TLS) while the inter-broker and controller listeners stay PLAINTEXT on other
loopback ports. ``scram_flags(users)`` are the ``kafka-storage format --add-scram`` flags that create
SCRAM users at format time (KRaft keeps them in the metadata log). ``start_secure_kafka`` puts the three
together through ``infra.kafka.start_kafka`` and waits until a SCRAM client is answered over TLS.

Guarantees: every listener binds 127.0.0.1; the keys never leave the folder given; certificates live
``days`` days (default 2: they are for tests and local trials, not for production).

What can go wrong: no ``openssl`` or ``keytool`` (:class:`ToolMissing`), either exiting non-zero
(:class:`InfraError` with its output), and everything ``start_kafka`` raises. A data dir formatted without
the users keeps its old users: formatting happens once, so use a fresh data dir.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.errors import InfraError, ToolMissing
from infra.kafka import KafkaHandle, start_kafka
from infra.process import free_port

DEFAULT_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
CLIENT_LISTENER = "SASL_SSL"
INTERNAL_LISTENER = "INTERNAL"
TOOL_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The files ``make_certificates`` wrote; ``password`` protects both PKCS12 stores."""

    ca_cert: Path  # PEM: what clients trust (AISEMBLE_KAFKA_SSL_CAFILE)
    broker_cert: Path  # PEM, signed by the CA, SAN 127.0.0.1 and localhost
    keystore: Path  # PKCS12: the broker's key and certificate chain
    truststore: Path  # PKCS12: the CA, for a broker that checks client certificates
    client_cert: Path  # PEM, signed by the CA (mutual TLS)
    client_key: Path  # PEM, unencrypted
    password: str


def _run(cmd: list[str], cwd: Path) -> None:
    if shutil.which(cmd[0]) is None:
        raise ToolMissing(cmd[0], "apt-get install openssl openjdk-17-jre-headless")
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise InfraError(f"{cmd[0]} did not finish within {TOOL_TIMEOUT_S:g} s: {' '.join(cmd[:3])}") from exc
    if out.returncode != 0:
        raise InfraError(f"{' '.join(cmd[:3])} failed (exit {out.returncode}): {(out.stdout + out.stderr)[-2000:]}")


def make_certificates(
    folder: str | Path,
    *,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    days: int = 2,
    password: str = "changeit",
) -> TlsFiles:
    """A CA, a broker certificate for ``hosts``, a client certificate, and the broker's PKCS12 stores.

    Raises:
        ToolMissing: no openssl or keytool.
        InfraError: one of them failed (its output is in the message).
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    sans = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
    (out / "broker.ext").write_text(
        f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    (out / "client.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    )
    steps = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", str(days), "-subj", "/CN=aisemble test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
         "-subj", f"/CN={hosts[0]}"],
        ["openssl", "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "broker.pem", "-days", str(days), "-extfile", "broker.ext"],
        ["openssl", "pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key", "-certfile", "ca.pem",
         "-name", "broker", "-out", "broker.keystore.p12", "-passout", f"pass:{password}"],
        ["keytool", "-importcert", "-noprompt", "-alias", "ca", "-file", "ca.pem", "-storetype", "PKCS12",
         "-keystore", "broker.truststore.p12", "-storepass", password],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
         "-subj", "/CN=aisemble-client"],
        ["openssl", "x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "client.pem", "-days", str(days), "-extfile", "client.ext"],
    ]  # fmt: skip
    (out / "broker.truststore.p12").unlink(missing_ok=True)  # keytool refuses to add an alias twice
    for cmd in steps:
        _run(cmd, out)
    return TlsFiles(
        ca_cert=out / "ca.pem",
        broker_cert=out / "broker.pem",
        keystore=out / "broker.keystore.p12",
        truststore=out / "broker.truststore.p12",
        client_cert=out / "client.pem",
        client_key=out / "client.key",
        password=password,
    )


def sasl_ssl_config(
    port: int,
    controller_port: int,
    internal_port: int,
    tls: TlsFiles,
    *,
    mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS,
    client_auth: bool = False,
) -> dict[str, str]:
    """server.properties entries (``start_kafka``'s ``extra_config``) for a SASL_SSL client listener on
    ``port``; inter-broker traffic on PLAINTEXT ``internal_port``, the controller on PLAINTEXT as before.

    ``client_auth``: also require a client certificate signed by the CA (``ssl.client.auth=required``).
    """
    listener = CLIENT_LISTENER.lower()
    config = {
        "listeners": (
            f"{CLIENT_LISTENER}://127.0.0.1:{port},{INTERNAL_LISTENER}://127.0.0.1:{internal_port},"
            f"CONTROLLER://127.0.0.1:{controller_port}"
        ),
        "advertised.listeners": (
            f"{CLIENT_LISTENER}://127.0.0.1:{port},{INTERNAL_LISTENER}://127.0.0.1:{internal_port},"
            f"CONTROLLER://127.0.0.1:{controller_port}"
        ),
        "listener.security.protocol.map": (
            f"{CLIENT_LISTENER}:SASL_SSL,{INTERNAL_LISTENER}:PLAINTEXT,CONTROLLER:PLAINTEXT"
        ),
        "inter.broker.listener.name": INTERNAL_LISTENER,
        "sasl.enabled.mechanisms": ",".join(mechanisms),
        f"listener.name.{listener}.sasl.enabled.mechanisms": ",".join(mechanisms),
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": str(tls.keystore),
        "ssl.keystore.password": tls.password,
        "ssl.key.password": tls.password,
        "ssl.truststore.type": "PKCS12",
        "ssl.truststore.location": str(tls.truststore),
        "ssl.truststore.password": tls.password,
        "ssl.client.auth": "required" if client_auth else "none",
    }
    for mechanism in mechanisms:
        config[f"listener.name.{listener}.{mechanism.lower()}.sasl.jaas.config"] = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        )
    return config


def scram_flags(users: Mapping[str, str], mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS) -> tuple[str, ...]:
    """``kafka-storage format`` flags creating each ``name: password`` user for every SCRAM mechanism.

    Raises:
        ValueError: a name or password with a character the tool's ``[name=...,password=...]`` syntax
            cannot carry (``,``, ``]``, ``=`` or a quote).
    """
    flags: list[str] = []
    for name, password in users.items():
        for value in (name, password):
            if not value or any(c in value for c in ',]="'):
                raise ValueError(f"SCRAM user {name!r}: names and passwords may not be empty or contain , ] = \"")
        for mechanism in mechanisms:
            if mechanism.startswith("SCRAM-"):
                flags += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
    return tuple(flags)


def client_ssl_context(tls: TlsFiles, *, client_cert: bool = False) -> ssl.SSLContext:
    """An SSL context trusting ``tls``'s CA (and presenting its client certificate when asked)."""
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    if client_cert:
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    return context


def start_secure_kafka(
    port: int,
    data_dir: str | Path,
    tls: TlsFiles,
    users: Mapping[str, str],
    *,
    mechanism: str = "SCRAM-SHA-256",
    client_auth: bool = False,
    controller_port: int | None = None,
    internal_port: int | None = None,
    heap: str = "512m",
    timeout: float = 90.0,
) -> KafkaHandle:
    """A broker on ``127.0.0.1:port`` speaking SASL_SSL (SCRAM) there, with ``users`` created at format
    time; returns once the first user was answered a metadata request over TLS with ``mechanism``.

    ``data_dir`` should be fresh: users are only created when the storage is formatted.
    """
    if not users:
        raise ValueError("a SASL_SSL broker needs at least one SCRAM user")
    ctrl = controller_port or free_port()
    internal = internal_port or free_port()
    name, password = next(iter(users.items()))
    ready_options = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": name,
        "sasl_plain_password": password,
        "ssl_context": client_ssl_context(tls, client_cert=client_auth),
    }
    return start_kafka(
        port,
        ctrl,
        data_dir,
        heap,
        timeout=timeout,
        extra_config=sasl_ssl_config(port, ctrl, internal, tls, client_auth=client_auth),
        format_flags=scram_flags(users),
        client_options=ready_options,
    )
