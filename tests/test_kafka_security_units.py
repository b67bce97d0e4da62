"""Units of the Kafka security settings (no Kafka, no Redis): what every client gets, what is refused.

Certificates are made in ``tmp_path`` with ``infra.secure.make_certificates`` (openssl and keytool), so
the TLS contexts load real files: a client certificate, its key, and the key encrypted with a password.
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr
from redis.asyncio.connection import SSLConnection

from infra.secure import TlsFiles, make_certificates, sasl_ssl_config, scram_flags
from streams.app import create_app, faust_credentials
from streams.kafka_security import KafkaSecurityConfigError, client_options
from streams.redis import connect
from streams.settings import Settings


def settings(**values: Any) -> Settings:
    return Settings(kafka_bootstrap="127.0.0.1:9093", **values)


SCRAM = dict(
    kafka_security_protocol="SASL_SSL",
    kafka_sasl_mechanism="SCRAM-SHA-256",
    kafka_sasl_username="alice",
    kafka_sasl_password=SecretStr("alice-secret"),
)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def encrypted_key(tls: TlsFiles) -> Path:
    out = tls.client_key.with_name("client-encrypted.key")
    subprocess.run(
        ["openssl", "pkey", "-in", str(tls.client_key), "-aes256", "-passout", "pass:key-pw", "-out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def test_plaintext_is_the_default_and_adds_nothing_but_the_protocol() -> None:
    assert client_options(settings()) == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(settings()) is None


def test_sasl_ssl_scram_gives_the_login_and_a_verifying_tls_context(tls: TlsFiles) -> None:
    options = client_options(settings(**SCRAM, kafka_ssl_cafile=tls.ca_cert))
    context = options.pop("ssl_context")
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "alice",
        "sasl_plain_password": "alice-secret",
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "aisemble test CA"),),)]


def test_ssl_without_a_cafile_uses_the_system_ca_store() -> None:
    context = client_options(settings(kafka_security_protocol="SSL"))["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]
    assert context.cert_store_stats()["x509_ca"] == system
    print(f"system CA store: {system} certificates")


@pytest.mark.parametrize(
    ("values", "setting"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "kafka_sasl_mechanism"),
        ({**SCRAM, "kafka_sasl_username": None}, "kafka_sasl_username"),
        ({**SCRAM, "kafka_sasl_username": ""}, "kafka_sasl_username"),
        ({**SCRAM, "kafka_sasl_password": None}, "kafka_sasl_password"),
        ({**SCRAM, "kafka_security_protocol": "PLAINTEXT"}, "kafka_sasl_mechanism"),
        ({"kafka_sasl_username": "alice"}, "kafka_sasl_username"),
        ({**SCRAM, "kafka_security_protocol": "SSL"}, "kafka_sasl_mechanism"),
        ({"kafka_ssl_cafile": Path("/etc/hostname")}, "kafka_ssl_cafile"),
        ({**SCRAM, "kafka_security_protocol": "SASL_PLAINTEXT", "kafka_ssl_cafile": Path("/x")}, "kafka_ssl_cafile"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": Path("/nonexistent/ca.pem")}, "kafka_ssl_cafile"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": Path("/etc/hostname")}, "kafka_ssl_certfile"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_key_password": SecretStr("x")}, "kafka_ssl_certfile"),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_setting(values: dict[str, Any], setting: str) -> None:
    with pytest.raises(KafkaSecurityConfigError) as raised:
        client_options(settings(**values))
    assert raised.value.setting == setting
    assert f"AISEMBLE_{setting.upper()}" in str(raised.value)
    with pytest.raises(KafkaSecurityConfigError):  # the agents validate the same way
        faust_credentials(settings(**values))


def test_a_cafile_that_is_not_a_certificate_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(KafkaSecurityConfigError) as raised:
        client_options(settings(kafka_security_protocol="SSL", kafka_ssl_cafile=bogus))
    assert raised.value.setting == "kafka_ssl_cafile"


def test_mutual_tls_loads_the_client_certificate_and_key(tls: TlsFiles) -> None:
    options = client_options(
        settings(
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=tls.ca_cert,
            kafka_ssl_certfile=tls.client_cert,
            kafka_ssl_keyfile=tls.client_key,
        )
    )
    assert options["security_protocol"] == "SSL" and isinstance(options["ssl_context"], ssl.SSLContext)


def test_an_encrypted_key_needs_its_password_and_never_prompts(tls: TlsFiles, encrypted_key: Path) -> None:
    base = dict(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=tls.ca_cert,
        kafka_ssl_certfile=tls.client_cert,
        kafka_ssl_keyfile=encrypted_key,
    )
    assert client_options(settings(**base, kafka_ssl_key_password=SecretStr("key-pw")))["ssl_context"]
    for password in (None, SecretStr("wrong")):
        with pytest.raises(KafkaSecurityConfigError) as raised:
            client_options(settings(**base, kafka_ssl_key_password=password))
        assert raised.value.setting == "kafka_ssl_key_password", str(raised.value)


def test_a_key_that_does_not_match_the_certificate_is_refused(tls: TlsFiles, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-out", str(other)], check=True, capture_output=True)
    with pytest.raises(KafkaSecurityConfigError) as raised:
        client_options(
            settings(kafka_security_protocol="SSL", kafka_ssl_certfile=tls.client_cert, kafka_ssl_keyfile=other)
        )
    assert raised.value.setting == "kafka_ssl_certfile"


@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT", "SSL"])
def test_faust_gets_what_the_aiokafka_clients_get(protocol: str, tls: TlsFiles) -> None:
    values: dict[str, Any] = {**SCRAM, "kafka_security_protocol": protocol, "kafka_sasl_mechanism": "SCRAM-SHA-512"}
    if protocol == "SSL":
        values = {"kafka_security_protocol": "SSL"}
    if protocol.endswith("SSL"):
        values["kafka_ssl_cafile"] = tls.ca_cert
    ours = client_options(settings(**values))
    credentials = faust_credentials(settings(**values))
    theirs = dict(credentials_to_aiokafka_auth(credentials))  # what Faust hands its consumer and producer
    assert isinstance(credentials, faust.SSLCredentials if protocol == "SSL" else faust.SASLCredentials)
    assert theirs.pop("security_protocol") == ours.pop("security_protocol") == protocol
    assert (theirs.pop("ssl_context") is None) == ("ssl_context" not in ours)
    ours.pop("ssl_context", None)
    assert theirs == ours


def test_the_agents_faust_app_carries_the_credentials(tmp_path: Path, tls: TlsFiles) -> None:
    app = create_app(settings(**SCRAM, kafka_ssl_cafile=tls.ca_cert, cache_dir=tmp_path), "data")
    credentials = app.conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL" and credentials.mechanism.value == "SCRAM-SHA-256"
    assert credentials.username == "alice" and credentials.password == "alice-secret"


def test_the_broker_config_puts_sasl_ssl_on_the_client_port_only(tls: TlsFiles) -> None:
    config = sasl_ssl_config(9093, 9094, 9095, tls)
    assert config["listeners"] == "SASL_SSL://127.0.0.1:9093,INTERNAL://127.0.0.1:9095,CONTROLLER://127.0.0.1:9094"
    assert config["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert config["inter.broker.listener.name"] == "INTERNAL"
    assert "ScramLoginModule" in config["listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config"]
    assert config["ssl.client.auth"] == "none"
    assert sasl_ssl_config(9093, 9094, 9095, tls, client_auth=True)["ssl.client.auth"] == "required"
    assert scram_flags({"alice": "pw"}, ("SCRAM-SHA-256",)) == ("--add-scram", "SCRAM-SHA-256=[name=alice,password=pw]")
    with pytest.raises(ValueError):
        scram_flags({"alice": "p,w"})


@pytest.mark.parametrize(
    ("url", "username", "password", "db"),
    [
        ("rediss://:s3cret@redis.example:6380/2", None, "s3cret", 2),
        ("rediss://app:s%40cret@redis.example:6380/0", "app", "s@cret", 0),
    ],
)
def test_redis_tls_and_password_come_from_the_url(url: str, username: str | None, password: str, db: int) -> None:
    client = connect(settings(redis_url=url))
    pool = client.connection_pool
    assert pool.connection_class is SSLConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis.example", 6380, db)
    assert kwargs.get("username") == username and kwargs["password"] == password
    assert kwargs["socket_timeout"] == Settings().redis_timeout_s  # our timeouts still apply


def test_redis_tls_options_in_the_url_reach_the_connection() -> None:
    url = "rediss://:pw@redis.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/certs/ca-certificates.crt"
    connection = connect(settings(redis_url=url)).connection_pool.make_connection()
    assert isinstance(connection, SSLConnection)
    assert connection.ssl_context.cert_reqs == ssl.CERT_REQUIRED
    assert connection.ssl_context.ca_certs == "/etc/ssl/certs/ca-certificates.crt"
