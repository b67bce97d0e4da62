"""Unit tests of infra's pure parts: address parsing, the loopback rule, broker config rendering,
version and jar-cache logic, pid-file safety, the shared start/stop steps (on short-lived Python
processes) and the shipped config files. No server is started."""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

import infra
from infra import kafka_jars
from infra.addresses import (
    local_kafka_port,
    local_redis_port,
    parse_bootstrap,
    parse_redis_url,
)
from infra.errors import InfraError, NotLoopback, PortInUse, StartFailed, ToolMissing
from infra.kafka import broker_config, default_data_dir, new_cluster_id, render_properties
from infra.process import (
    cache_root,
    claim_pid_file,
    free_port,
    require_port_free,
    spawn_detached,
    status_data_dir,
    stop_by_pid_file,
    stop_started,
    stopped_on_failure,
    tail,
    wait_until_ready,
    write_pid,
)
from infra.redis import find_redis_server, redis_server_command

ROOT = Path(__file__).resolve().parents[1]


def _parse_properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {k: v for k, v in pairs}


# --- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bootstrap", "expected"),
    [
        ("127.0.0.1:9092", [("127.0.0.1", 9092)]),
        ("localhost", [("localhost", 9092)]),
        ("a:1, b:2 ,", [("a", 1), ("b", 2)]),
        ("PLAINTEXT://127.0.0.1:19092", [("127.0.0.1", 19092)]),
        ("[::1]:9093", [("::1", 9093)]),
        ("kafka:9092", [("kafka", 9092)]),
    ],
)
def test_parse_bootstrap(bootstrap: str, expected: list[tuple[str, int]]) -> None:
    assert parse_bootstrap(bootstrap) == expected


@pytest.mark.parametrize("bad", ["", " , ", "host:notaport", "host:0", "host:70000", ":9092"])
def test_parse_bootstrap_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_bootstrap(bad)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", ("127.0.0.1", 6379, 0)),
        ("redis://localhost", ("localhost", 6379, 0)),
        ("redis://127.0.0.1:16379/3", ("127.0.0.1", 16379, 3)),
        ("redis://:secret@redis:6380/1", ("redis", 6380, 1)),
    ],
)
def test_parse_redis_url(url: str, expected: tuple[str, int, int]) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize("bad", ["http://127.0.0.1:6379", "redis://h:port/0", "redis://h/x", "unix:///tmp/r.sock"])
def test_parse_redis_url_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_redis_url(bad)


def test_local_ports_accept_loopback_only() -> None:
    assert local_kafka_port("127.0.0.1:19092") == 19092
    assert local_kafka_port("localhost:9092,10.0.0.2:9092") == 9092  # the first entry decides
    assert local_redis_port("redis://LOCALHOST:16379/0") == 16379
    for bootstrap in ("kafka:9092", "10.0.0.5:9092", "0.0.0.0:9092", "[::1]:9092"):
        with pytest.raises(NotLoopback):
            local_kafka_port(bootstrap)
    with pytest.raises(NotLoopback):
        local_redis_port("redis://redis:6379/0")
    with pytest.raises(ValueError, match="TLS"):
        local_redis_port("rediss://127.0.0.1:6380/0")


def test_not_loopback_is_an_infra_error_with_a_useful_message() -> None:
    with pytest.raises(InfraError, match=r"127\.0\.0\.1") as info:
        local_kafka_port("broker.example.com:9092")
    assert info.value.address == "broker.example.com:9092"  # type: ignore[attr-defined]


def test_ensure_refuses_non_loopback_without_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(infra.kafka, "kafka_answers", lambda bootstrap, timeout=3.0, options=None: False)
    monkeypatch.setattr(infra.kafka, "start_kafka", _fail_if_called)
    with pytest.raises(NotLoopback):
        infra.ensure_kafka("kafka:9092")
    monkeypatch.setattr(infra.redis, "redis_answers", lambda url, timeout=2.0: False)
    monkeypatch.setattr(infra.redis, "start_redis", _fail_if_called)
    with pytest.raises(NotLoopback):
        infra.ensure_redis("redis://redis:6379/0")


def _fail_if_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("must not start anything")


def test_ensure_starts_nothing_when_the_server_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(infra.kafka, "kafka_answers", lambda bootstrap, timeout=3.0, options=None: True)
    monkeypatch.setattr(infra.kafka, "start_kafka", _fail_if_called)
    assert infra.ensure_kafka("broker.example.com:9092") is None  # answering: no loopback rule needed
    monkeypatch.setattr(infra.redis, "redis_answers", lambda url, timeout=2.0: True)
    monkeypatch.setattr(infra.redis, "start_redis", _fail_if_called)
    assert infra.ensure_redis("redis://127.0.0.1:6379/0") is None


# --- broker config -------------------------------------------------------------------------------


def test_broker_config_binds_loopback_and_uses_rf_1(tmp_path: Path) -> None:
    props = _parse_properties(render_properties(broker_config(19092, 19093, tmp_path / "kraft")))
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"].startswith("PLAINTEXT://127.0.0.1:19092")
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert "controller.quorum.voters" not in props  # --standalone needs the bootstrap.servers style
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["log.dirs"] == str(tmp_path / "kraft")
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
        "default.replication.factor",
        "min.insync.replicas",
    ):
        assert props[key] == "1", key
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["num.partitions"] == "4"
    assert props["auto.create.topics.enable"] == "false"
    every_address = ",".join(v for k, v in props.items() if "listeners" in k or "servers" in k)
    assert "0.0.0.0" not in every_address and "localhost" not in every_address


def test_broker_config_extra_overrides_and_rendering_escapes(tmp_path: Path) -> None:
    config = broker_config(9092, 9093, Path("C:\\odd\\dir"), {"num.partitions": "8", "x.y": "a\nb"})
    assert config["num.partitions"] == "8"
    text = render_properties(config)
    assert "log.dirs=C:\\\\odd\\\\dir\n" in text
    assert "x.y=a\\nb\n" in text
    assert text.endswith("\n")


def test_controller_port_sticks_to_a_formatted_data_dir(tmp_path: Path) -> None:
    from infra.kafka import _choose_controller_port

    (tmp_path / "aisemble-kafka.json").write_text(json.dumps({"cluster_id": "x", "controller_port": 19999}))
    assert _choose_controller_port(19092, None, tmp_path, formatted=True) == 19999
    with pytest.raises(InfraError, match="formatted for controller port 19999"):
        _choose_controller_port(19092, 19093, tmp_path, formatted=True)
    (tmp_path / "aisemble-kafka.json").unlink()  # no state file: the server.properties it ran with decides
    (tmp_path / "server.properties").write_text(render_properties(broker_config(19092, 19555, tmp_path)))
    assert _choose_controller_port(19092, None, tmp_path, formatted=True) == 19555
    assert _choose_controller_port(19092, 19777, tmp_path / "new", formatted=False) == 19777


def test_new_cluster_id_is_a_kafka_uuid() -> None:
    ids = {new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cluster_id in ids:
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_default_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AISEMBLE_CACHE_DIR", str(tmp_path / "env-cache"))
    assert cache_root() == tmp_path / "env-cache"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert default_data_dir(19092) == tmp_path / "env-cache" / "run" / "kafka-19092"
    assert infra.redis_data_dir(16379, tmp_path) == tmp_path / "run" / "redis-16379"
    monkeypatch.delenv("AISEMBLE_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "aisemble"


# --- versions and the jar cache ------------------------------------------------------------------


def test_resolve_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AISEMBLE_KAFKA_VERSION", raising=False)
    assert kafka_jars.resolve_version() == "4.1.1"
    monkeypatch.setenv("AISEMBLE_KAFKA_VERSION", "4.0.1")
    assert kafka_jars.resolve_version() == "4.0.1"
    assert kafka_jars.resolve_version("4.2.0") == "4.2.0"  # the argument wins
    for bad in ("3.9.1", "latest", "4.1"):
        with pytest.raises(InfraError):
            kafka_jars.resolve_version(bad)


def test_log4j_version_follows_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AISEMBLE_LOG4J_VERSION", raising=False)
    assert kafka_jars.log4j_version_for("4.0.0") == "2.24.3"
    assert kafka_jars.log4j_version_for("4.1.1") == "2.24.3"
    assert kafka_jars.log4j_version_for("4.2.0") == "2.25.3"
    monkeypatch.setenv("AISEMBLE_LOG4J_VERSION", "2.99.0")
    assert kafka_jars.log4j_version_for("4.1.1") == "2.99.0"


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
        ('java version "1.8.0_392"', 8),
        ('openjdk version "21" 2023-09-19', 21),
        ('openjdk version "11.0.2-ea"', 11),
        ("no version here", None),
    ],
)
def test_parse_java_major(output: str, major: int | None) -> None:
    assert kafka_jars.parse_java_major(output) == major


def _fake_libs(cache: Path, jars: list[str], log4j: str = "2.24.3") -> Path:
    home = cache / "kafka-4.1.1"
    (home / "libs").mkdir(parents=True)
    for jar in jars:
        (home / "libs" / jar).write_bytes(b"PK")
    (home / ".complete").write_text(json.dumps({"kafka": "4.1.1", "log4j": log4j, "jars": jars}))
    return home / "libs"


def test_fetch_jars_reuses_a_complete_cache_without_maven(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AISEMBLE_LOG4J_VERSION", raising=False)
    libs = _fake_libs(tmp_path, ["kafka_2.13-4.1.1.jar", "log4j-slf4j-impl-2.24.3.jar"])
    monkeypatch.setattr(kafka_jars, "find_mvn", _fail_if_called)
    assert kafka_jars.fetch_jars("4.1.1", tmp_path) == libs


@pytest.mark.parametrize("damage", ["missing-jar", "other-log4j", "no-marker"])
def test_fetch_jars_refetches_an_incomplete_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    monkeypatch.delenv("AISEMBLE_LOG4J_VERSION", raising=False)
    libs = _fake_libs(tmp_path, ["kafka_2.13-4.1.1.jar"], "2.0.0" if damage == "other-log4j" else "2.24.3")
    if damage == "missing-jar":
        (libs / "kafka_2.13-4.1.1.jar").unlink()
    if damage == "no-marker":
        (libs.parent / ".complete").unlink()
    monkeypatch.setattr(kafka_jars.shutil, "which", lambda name: None)  # no mvn: a fetch must fail loudly
    with pytest.raises(ToolMissing, match="apt-get install maven"):
        kafka_jars.fetch_jars("4.1.1", tmp_path)


def test_find_java_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(kafka_jars.shutil, "which", lambda name: None)
    with pytest.raises(ToolMissing, match=r"Java 17\+ not found: apt-get install openjdk-17-jre-headless"):
        kafka_jars.find_java()


def test_pom_lists_kafka_and_the_slf4j_binding() -> None:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(ROOT / "infra" / "pom.xml").getroot()
    deps = {d.findtext("m:artifactId", namespaces=ns): d for d in root.iterfind("m:dependencies/m:dependency", ns)}
    assert deps["kafka_2.13"].findtext("m:version", namespaces=ns) == "${kafka.version}"
    assert deps["log4j-slf4j-impl"].findtext("m:version", namespaces=ns) == "${log4j.version}"
    assert root.findtext("m:properties/m:kafka.version", namespaces=ns) == kafka_jars.DEFAULT_KAFKA_VERSION


def test_log4j2_yaml_logs_info_to_a_file_in_kafka_logs_dir() -> None:

    config = yaml.safe_load((ROOT / "infra" / "log4j2.yaml").read_text())["Configuration"]
    assert config["Loggers"]["Root"]["level"] == "INFO"
    assert "${sys:kafka.logs.dir}" in config["Appenders"]["RollingFile"]["fileName"]
    assert {logger["level"] for logger in config["Loggers"]["Logger"]} == {"WARN"}


# --- redis ---------------------------------------------------------------------------------------


def test_redis_command_binds_loopback_and_saves_nothing(tmp_path: Path) -> None:
    cmd = redis_server_command("redis-server", 16379, tmp_path)
    pairs = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert pairs["--bind"] == "127.0.0.1"
    assert pairs["--port"] == "16379"
    assert pairs["--save"] == ""
    assert pairs["--appendonly"] == "no"
    assert pairs["--daemonize"] == "no"
    assert pairs["--dir"] == str(tmp_path)


def test_missing_redis_server_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(infra.redis.shutil, "which", lambda name: None)
    with pytest.raises(ToolMissing, match="apt-get install redis-server"):
        find_redis_server(install=False)


# --- local pair ----------------------------------------------------------------------------------


class _Settings:
    kafka_bootstrap = "127.0.0.1:19092"
    redis_url = "redis://127.0.0.1:16379/0"


class _FakeHandle:
    def __init__(self) -> None:
        self.stopped = 0

    def stop(self) -> None:
        self.stopped += 1


def test_start_local_stops_kafka_when_redis_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = _FakeHandle()
    monkeypatch.setattr(infra, "ensure_kafka", lambda *a, **k: kafka)

    def broken_redis(*args: object, **kwargs: object) -> None:
        raise StartFailed("redis-server exited")

    monkeypatch.setattr(infra, "ensure_redis", broken_redis)
    with pytest.raises(StartFailed):
        infra.start_local(_Settings())
    assert kafka.stopped == 1


def test_local_infra_stops_only_what_it_started(monkeypatch: pytest.MonkeyPatch) -> None:
    redis_handle = _FakeHandle()
    monkeypatch.setattr(infra, "ensure_kafka", lambda *a, **k: None)  # Kafka already answered
    monkeypatch.setattr(infra, "ensure_redis", lambda *a, **k: redis_handle)
    with infra.start_local(_Settings()) as local:
        assert local.kafka is None and local.started_any
    assert redis_handle.stopped == 1


def test_kafka_answers_is_false_quickly_when_nothing_listens() -> None:
    started = time.monotonic()
    assert infra.kafka_answers(f"127.0.0.1:{free_port()}", timeout=1.0) is False
    assert infra.kafka_answers("not a bootstrap:x") is False
    assert infra.redis_answers(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0) is False
    assert time.monotonic() - started < 5


# --- pid files -----------------------------------------------------------------------------------


def test_pid_file_of_a_foreign_process_is_never_signalled(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        write_pid(tmp_path / "kafka.pid", sleeper.pid)
        assert stop_by_pid_file(tmp_path / "kafka.pid", "kafka.Kafka") is False
        assert sleeper.poll() is None  # still alive: its command line is not a broker's
        assert not (tmp_path / "kafka.pid").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_pid_file_of_our_process_stops_it(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "kafka.Kafka"])
    try:
        write_pid(tmp_path / "kafka.pid", sleeper.pid)
        assert stop_by_pid_file(tmp_path / "kafka.pid", "kafka.Kafka", timeout=5) is True
        assert sleeper.wait(timeout=5) is not None
        assert not (tmp_path / "kafka.pid").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_pid_file_is_removed(tmp_path: Path) -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    write_pid(tmp_path / "redis.pid", done.pid)
    assert infra.stop_redis(tmp_path) is False
    assert not (tmp_path / "redis.pid").exists()


def _sleeper(*extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", *extra])


def _already_runs(pid: int) -> InfraError:
    return InfraError(f"already runs (pid {pid})", retriable=True)


def test_claim_pid_file_refuses_while_our_server_runs(tmp_path: Path) -> None:
    sleeper = _sleeper("redis-server")
    try:
        write_pid(tmp_path / "redis.pid", sleeper.pid)
        with pytest.raises(InfraError, match=f"already runs \\(pid {sleeper.pid}\\)") as info:
            claim_pid_file(tmp_path / "redis.pid", "redis-server", _already_runs)
        assert info.value.retriable
        assert (tmp_path / "redis.pid").exists()  # still names the running server
    finally:
        sleeper.kill()
        sleeper.wait()
    claim_pid_file(tmp_path / "redis.pid", "redis-server", _already_runs)  # gone now: stale, removed
    assert not (tmp_path / "redis.pid").exists()


def test_claim_pid_file_ignores_a_foreign_pid(tmp_path: Path) -> None:
    sleeper = _sleeper()
    try:
        write_pid(tmp_path / "kafka.pid", sleeper.pid)
        claim_pid_file(tmp_path / "kafka.pid", "kafka.Kafka", _already_runs)
        assert not (tmp_path / "kafka.pid").exists()
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_require_port_free_names_the_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} .* not a working Kafka controller: pick another") as info:
            require_port_free(port, "Kafka controller", "pick another")
        assert info.value.port == port
    require_port_free(free_port(), "Redis")


def test_spawn_detached_appends_output_and_writes_the_pid_file(tmp_path: Path) -> None:
    out = tmp_path / "server.out"
    out.write_text("earlier run\n")
    cmd = [sys.executable, "-c", "import os, sys; print(os.getsid(0), sys.stdin.read() == ''); sys.exit(3)"]
    popen = spawn_detached(cmd, cwd=tmp_path, out_path=out, pid_file=tmp_path / "x.pid")
    assert (tmp_path / "x.pid").read_text() == f"{popen.pid}\n"
    assert popen.wait(timeout=10) == 3
    assert out.read_text() == f"earlier run\n{popen.pid} True\n"  # own session, stdin empty


def test_wait_until_ready_reports_an_exit_with_the_log_tail(tmp_path: Path) -> None:
    out = tmp_path / "server.out"
    cmd = [sys.executable, "-c", "import sys; print('bad config'); sys.exit(2)"]
    popen = spawn_detached(cmd, cwd=tmp_path, out_path=out, pid_file=tmp_path / "x.pid")
    popen.wait(timeout=10)
    with pytest.raises(StartFailed, match="server exited with status 2") as info:
        wait_until_ready(
            popen,
            lambda remaining: True,  # the exit is checked first: a dead server never counts as ready
            timeout=5,
            interval=0.01,
            exited=lambda status: f"server exited with status {status}",
            timed_out="never",
            log_tail=lambda: tail(out),
        )
    assert info.value.log_tail == "bad config"


def test_wait_until_ready_times_out_and_the_server_is_stopped(tmp_path: Path) -> None:
    sleeper = _sleeper()
    stopped: list[int] = []

    def stop() -> None:
        sleeper.kill()
        stopped.append(sleeper.wait())

    seen: list[float] = []

    def never_ready(remaining: float) -> bool:
        seen.append(remaining)
        return False

    started = time.monotonic()
    with pytest.raises(StartFailed, match=r"did not answer within 0\.3 s"), stopped_on_failure(stop):
        wait_until_ready(
            sleeper,
            never_ready,
            timeout=0.3,
            interval=0.02,
            exited=lambda status: "exited",
            timed_out="did not answer within 0.3 s",
            log_tail=lambda: "",
        )
    assert 0.3 <= time.monotonic() - started < 5
    assert len(stopped) == 1 and sleeper.poll() is not None
    assert seen and all(0 < r <= 0.3 for r in seen) and seen == sorted(seen, reverse=True)


def test_wait_until_ready_returns_once_ready_and_counts_from_since() -> None:
    sleeper = _sleeper()
    try:
        answers = iter([False, False, True])
        wait_until_ready(
            sleeper,
            lambda remaining: next(answers),
            timeout=5,
            interval=0.01,
            exited=str,
            timed_out="late",
            log_tail=str,
        )
        with pytest.raises(StartFailed, match="late"):  # the deadline had passed before the first look
            wait_until_ready(
                sleeper,
                lambda remaining: True,
                timeout=1,
                interval=0.01,
                exited=str,
                timed_out="late",
                log_tail=str,
                since=time.monotonic() - 2,
            )
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stopped_on_failure_stops_only_on_failure() -> None:
    calls: list[str] = []
    with stopped_on_failure(lambda: calls.append("stop")):
        pass
    assert calls == []
    with pytest.raises(KeyboardInterrupt), stopped_on_failure(lambda: calls.append("stop")):
        raise KeyboardInterrupt
    assert calls == ["stop"]


def test_stop_started_stops_our_child_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pid_file = tmp_path / "redis.pid"
    sleeper = _sleeper("redis-server")
    write_pid(pid_file, sleeper.pid)
    logger = logging.getLogger("infra.test")
    assert stop_started(None, sleeper.pid, pid_file, "redis-server", timeout=5, logger=logger, label="x") is False
    assert sleeper.poll() is None and pid_file.exists()  # not spawned by us: left alone
    with caplog.at_level(logging.INFO, logger="infra.test"):
        killed = stop_started(sleeper, sleeper.pid, pid_file, "redis-server", timeout=5, logger=logger, label="R at u")
        again = stop_started(sleeper, sleeper.pid, pid_file, "redis-server", timeout=5, logger=logger, label="R at u")
    assert killed is False and again is False
    assert sleeper.returncode is not None and not pid_file.exists()
    assert [r.getMessage() for r in caplog.records] == [f"stopping R at u (pid {sleeper.pid})"]
    assert {r.name for r in caplog.records} == {"infra.test"}


def test_stop_started_keeps_a_pid_file_naming_another_live_server(tmp_path: Path) -> None:
    pid_file = tmp_path / "kafka.pid"
    ours, other = _sleeper("kafka.Kafka"), _sleeper("kafka.Kafka")
    try:
        write_pid(pid_file, other.pid)
        stop_started(ours, ours.pid, pid_file, "kafka.Kafka", timeout=5, logger=logging.getLogger("t"), label="k")
        assert ours.poll() is not None and other.poll() is None
        assert pid_file.read_text() == f"{other.pid}\n"
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()


def test_status_data_dir(tmp_path: Path) -> None:
    def not_local() -> Path:
        raise NotLoopback("kafka:9092", "Kafka")

    def malformed() -> Path:
        return tmp_path / str(local_kafka_port("h:x"))

    assert status_data_dir(str(tmp_path), not_local) == tmp_path
    assert status_data_dir(None, lambda: tmp_path / "d") == tmp_path / "d"
    assert status_data_dir(None, not_local) is None
    assert status_data_dir(None, malformed) is None


def test_status_functions_report_the_owned_pid(tmp_path: Path) -> None:
    sleeper = _sleeper("redis-server")
    try:
        write_pid(tmp_path / "redis.pid", sleeper.pid)
        status = infra.redis_status(f"redis://127.0.0.1:{free_port()}/0", tmp_path)
        assert status["pid"] == sleeper.pid and status["answers"] is False
        assert status["data_dir"] == str(tmp_path)
        assert infra.kafka_status("kafka:9092")["data_dir"] is None  # not local: no default data dir
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (tmp_path / "redis.pid").exists()  # status never removes anything


def test_tail(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, 3) == "line 97\nline 98\nline 99"
    assert tail(tmp_path / "missing.log") == ""


# --- docker compose ------------------------------------------------------------------------------


def test_compose_file_wires_services_to_kafka_and_redis() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    kafka_env = services["kafka"]["environment"]
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert len(base64.urlsafe_b64decode(kafka_env["CLUSTER_ID"] + "==")) == 16
    assert kafka_env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert kafka_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # topics come from aisemble's setup
    commands = {name: svc.get("command") for name, svc in services.items()}
    assert commands["edge"] == ["aisemble", "edge"]
    for agent in ("data", "nlp", "llm", "vision"):
        svc = services[f"agent-{agent}"]
        assert svc["command"] == ["aisemble", "agent", agent]
        assert svc["environment"]["AISEMBLE_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["edge"]["environment"]["AISEMBLE_EDGE_HOST"] == "0.0.0.0"
    assert services["edge"]["environment"]["AISEMBLE_REDIS_URL"] == "redis://redis:6379/0"
    assert services["edge"]["environment"]["AISEMBLE_EDGE_ID"] == "edge-1"  # a stable reply topic
    assert services["edge"]["depends_on"]["redis"]["condition"] == "service_healthy"
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--maxmemory") + 1] == "256mb"
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)
