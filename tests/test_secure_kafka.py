"""A secured cluster: a private Kafka 4.1 broker whose client port speaks SASL_SSL (SCRAM-SHA-256).

The broker is started by ``infra.secure.start_secure_kafka`` on free loopback ports with certificates made
in the test's temporary folder (openssl, keytool) and a SCRAM user created with Kafka's own storage tool at
format time. Against it: the whole path (HTTP -> edge -> Kafka -> data agent -> Kafka -> edge -> 200) and a
raw aiokafka client work over SASL_SSL; a wrong password fails fast with an error naming SASL authentication,
in a client, in the edge (its start-up fails) and in an agent (it exits non-zero); a PLAINTEXT client is
refused on that port. Times are printed, never asserted. The broker is stopped by PID at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from pydantic import SecretStr

from aisemble.pipeline import Pipeline
from infra import KafkaHandle
from infra.process import free_port
from infra.secure import TlsFiles, make_certificates, start_secure_kafka
from streams.kafka_security import KafkaSecurityFailure, client_options, start_client
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.kafka_client import RawClient

pytestmark = [pytest.mark.integration, pytest.mark.fault]

USER = "aisemble-app"
PASSWORD = "scram-secret-1"
EXIT_WAIT_S = 90.0


@dataclass
class SecureKafka:
    handle: KafkaHandle
    tls: TlsFiles
    settings: Settings  # the shared Redis, this broker, SASL_SSL with the right password

    def env(self, password: str = PASSWORD) -> dict[str, str]:
        """What a process needs to reach this broker (the Pipeline passes it on)."""
        return {
            "AISEMBLE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "AISEMBLE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "AISEMBLE_KAFKA_SASL_USERNAME": USER,
            "AISEMBLE_KAFKA_SASL_PASSWORD": password,
            "AISEMBLE_KAFKA_SSL_CAFILE": str(self.tls.ca_cert),
        }

    def with_password(self, password: str) -> Settings:
        return self.settings.model_copy(update={"kafka_sasl_password": SecretStr(password)})


@pytest.fixture(scope="module")
def secure(infra_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    folder = tmp_path_factory.mktemp("secure-kafka")
    started = time.monotonic()
    tls = make_certificates(folder / "certs")
    certs_s = time.monotonic() - started
    handle = start_secure_kafka(free_port(), folder / "kafka", tls, {USER: PASSWORD}, heap="384m")
    print(f"SECURE-KAFKA: certificates in {certs_s:.1f} s, SASL_SSL broker at {handle.bootstrap} answered "
          f"after {time.monotonic() - started:.1f} s (pid {handle.pid})")  # fmt: skip
    try:
        settings = infra_settings.model_copy(
            update={
                "kafka_bootstrap": handle.bootstrap,
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_mechanism": "SCRAM-SHA-256",
                "kafka_sasl_username": USER,
                "kafka_sasl_password": SecretStr(PASSWORD),
                "kafka_ssl_cafile": tls.ca_cert,
            }
        )
        yield SecureKafka(handle, tls, settings)
    finally:
        handle.stop()


def _wait_exit(proc: subprocess.Popen[bytes], started: float) -> tuple[int | None, float, str]:
    """The exit status (None: still running after EXIT_WAIT_S, then killed), seconds to exit, and output."""
    try:
        out, _ = proc.communicate(timeout=EXIT_WAIT_S)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        code = None
    return code, time.monotonic() - started, out.decode(errors="replace")


def test_the_whole_path_works_over_sasl_ssl(secure: SecureKafka, tmp_path: Path) -> None:
    pipeline = Pipeline.isolated(secure.settings, ["data"], tmp_path, **secure.env())
    started = time.monotonic()
    pipeline.start(timeout_s=180)
    try:
        healthy_s = time.monotonic() - started
        sent, answered, failed = 20, 0, []
        with httpx.Client(base_url=pipeline.url, timeout=30) as http:
            for i in range(sent):
                records = [{"id": i, "value": i * 10}, {"id": 9, "value": 1}]
                body = {"operation": "analyze", "data": {"records": records}}
                response = http.post("/data/process", json=body, headers={"X-Request-Id": f"sec-{uuid.uuid4().hex}"})
                if response.status_code == 200 and response.json()["ok"]:
                    answered += 1
                else:
                    failed.append(f"{response.status_code} {response.text[:200]}")
    finally:
        pipeline.stop()
    counts = {"test": "secure_whole_path", "sent": sent, "answered": answered, "failed": len(failed),
              "lost": sent - answered - len(failed), "healthy_after_s": round(healthy_s, 1)}  # fmt: skip
    print("FAULT-COUNTS:", json.dumps(counts))
    assert failed == [] and answered == sent, failed[:3]
    assert counts["lost"] == 0


async def test_a_raw_client_speaks_sasl_ssl_to_the_agent_and_back(secure: SecureKafka, tmp_path: Path) -> None:
    pipeline = Pipeline.isolated(secure.settings, ["data"], tmp_path, **secure.env()).start(timeout_s=180)
    try:
        async with RawClient(pipeline.settings) as client:
            ids = [f"raw-{i}-{uuid.uuid4().hex[:6]}" for i in range(10)]
            for rid in ids:
                event = {"id": rid, "task": "analyze", "input": {"records": [{"v": 1}, {"v": 3}]},
                         "reply_to": client.reply_topic, "cache": False}  # fmt: skip
                await client.send_request("data", event)
            replies = await client.read(client.reply_topic, len(ids), timeout_s=60, distinct="id")
    finally:
        pipeline.stop()
    answered = {r["id"] for r in replies if r.get("ok")}
    counts = {"test": "secure_raw_client", "sent": len(ids), "answered": len(answered),
              "lost": len(set(ids) - answered)}  # fmt: skip
    print("FAULT-COUNTS:", json.dumps(counts))
    assert counts["lost"] == 0


async def test_a_wrong_password_fails_a_client_fast_and_says_so(secure: SecureKafka) -> None:
    wrong = secure.with_password("not-the-password")
    started = time.monotonic()
    with pytest.raises(KafkaSecurityFailure) as raised:
        await ensure_topics(wrong, [(f"{wrong.topic_prefix}.never", 1)])
    ours_s = time.monotonic() - started
    assert raised.value.kind == "sasl_authentication"
    assert "SASL authentication failed" in str(raised.value) and USER in str(raised.value)
    assert "not-the-password" not in str(raised.value)

    producer = AIOKafkaProducer(bootstrap_servers=wrong.kafka_bootstrap, **client_options(wrong))
    started = time.monotonic()
    with pytest.raises(KafkaConnectionError):  # aiokafka alone: fast too, but says only "Unable to bootstrap"
        await producer.start()
    raw_s = time.monotonic() - started
    await producer.stop()
    print(f"WRONG-PASSWORD: start_client raised in {ours_s:.2f} s: {raised.value}")
    print(f"WRONG-PASSWORD: a bare aiokafka producer raised KafkaConnectionError in {raw_s:.2f} s")


def test_a_wrong_password_stops_the_edge_and_the_agent_at_start_up(secure: SecureKafka, tmp_path: Path) -> None:
    pipeline = Pipeline.isolated(secure.settings, ["data"], tmp_path, **secure.env("not-the-password"))
    results = {}
    for name, args in {"edge": ["edge"], "agent": ["agent", "data"]}.items():
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "aisemble", *args], env=pipeline.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        code, took, out = _wait_exit(proc, started)
        results[name] = (code, took, out)
        line = next((ln for ln in out.splitlines() if "KafkaSecurityFailure" in ln), "(no KafkaSecurityFailure line)")
        print(f"WRONG-PASSWORD: {name} exited with {code} after {took:.1f} s (process start included): {line[:300]}")
    for name, (code, _, out) in results.items():
        assert code is not None and code != 0, f"{name} did not exit non-zero: {code}\n{out[-3000:]}"
        assert "Kafka SASL authentication failed" in out, f"{name}:\n{out[-3000:]}"
        assert "not-the-password" not in out


async def test_a_plaintext_client_is_refused_on_the_sasl_ssl_port(secure: SecureKafka) -> None:
    plain = Settings(kafka_bootstrap=secure.settings.kafka_bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=plain.kafka_bootstrap, **client_options(plain))
    started = time.monotonic()
    with pytest.raises(KafkaSecurityFailure) as raised:
        await start_client(producer, plain)
    took = time.monotonic() - started
    await producer.stop()
    print(f"PLAINTEXT-CLIENT: refused in {took:.2f} s: {raised.value}")
    assert raised.value.kind == "protocol" and "AISEMBLE_KAFKA_SECURITY_PROTOCOL" in str(raised.value)

    no_ca = secure.settings.model_copy(update={"kafka_ssl_cafile": None})  # the system store lacks our test CA
    with pytest.raises(KafkaSecurityFailure) as tls_failure:
        await ensure_topics(no_ca, [(f"{no_ca.topic_prefix}.never", 1)])
    print(f"NO-CA-CLIENT: {tls_failure.value}")
    assert tls_failure.value.kind == "tls"


def test_infra_asks_the_secured_broker_with_the_settings_security(secure: SecureKafka) -> None:
    import infra

    local = infra.start_local(secure.settings)  # answers over SASL_SSL: starts nothing
    assert local.kafka is None and local.redis is None
    assert infra.local_status(secure.settings)["kafka"]["answers"] is True
    assert infra.kafka_answers(secure.settings.kafka_bootstrap) is False  # PLAINTEXT does not get in
