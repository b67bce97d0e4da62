"""Apache Kafka broker jars from Maven Central, and the Java and Maven they need.

``fetch_jars`` resolves ``org.apache.kafka:kafka_2.13:<version>`` with its runtime dependencies plus the
SLF4J 1.x -> log4j2 binding (``log4j-slf4j-impl``; Kafka leaves logging out of its POM on purpose,
KAFKA-18466) through ``mvn dependency:copy-dependencies`` against ``infra/pom.xml``, into
``<cache_dir>/kafka-<version>/libs/``.

Guarantees:
- ``libs/`` appears complete or not at all: Maven copies into a temporary folder that is renamed into
  place, and a marker file (``.complete``, listing the jars) is written last. A later call that finds the
  marker and every jar it lists returns at once without running Maven.
- Concurrent callers (two test sessions, a test and the CLI) serialise on a lock file per version.

What can go wrong: no ``java`` / ``mvn`` (:class:`ToolMissing` says what to install), a Java older than
17, no route to Maven Central (the Maven output is in the :class:`InfraError`), or a Kafka version that
does not exist on Maven Central.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from infra.errors import InfraError, ToolMissing
from infra.process import cache_root

log = logging.getLogger(__name__)

DEFAULT_KAFKA_VERSION = "4.1.1"
KAFKA_VERSION_ENV = "AISEMBLE_KAFKA_VERSION"
LOG4J_VERSION_ENV = "AISEMBLE_LOG4J_VERSION"
MARKER = ".complete"
MIN_JAVA = 17
POM = Path(__file__).with_name("pom.xml")
MVN_TIMEOUT_S = 900.0

JAVA_HINT = "apt-get install openjdk-17-jre-headless (or set JAVA_HOME), or use docker compose"
MVN_HINT = "apt-get install maven, or use docker compose"

_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)([.-][0-9A-Za-z.-]+)?$")


def resolve_version(version: str | None = None) -> str:
    """The Kafka version to use: ``version``, else ``$AISEMBLE_KAFKA_VERSION``, else 4.1.1.

    Raises:
        InfraError: not an ``X.Y.Z`` version, or older than 4.0 (3.x needs another config style).
    """
    chosen = (version or os.environ.get(KAFKA_VERSION_ENV) or DEFAULT_KAFKA_VERSION).strip()
    match = _VERSION_RE.match(chosen)
    if match is None:
        raise InfraError(f"Kafka version {chosen!r} is not of the form X.Y.Z")
    if int(match.group(1)) < 4:
        raise InfraError(f"Kafka {chosen} is not supported: infra runs Kafka 4.x in KRaft mode")
    return chosen


def log4j_version_for(kafka_version: str) -> str:
    """The log4j2 version that matches ``kafka_version`` (``$AISEMBLE_LOG4J_VERSION`` overrides).

    Kafka 4.0 and 4.1 build against log4j 2.24.3, 4.2 and later against 2.25.3.
    """
    override = os.environ.get(LOG4J_VERSION_ENV)
    if override:
        return override.strip()
    major, minor = (int(p) for p in kafka_version.split(".")[:2])
    return "2.24.3" if (major, minor) < (4, 2) else "2.25.3"


def parse_java_major(version_output: str) -> int | None:
    """The major version in ``java -version`` output (``"1.8.0_392"`` -> 8, ``"17.0.15"`` -> 17)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?[^"]*"', version_output)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2):
        return int(match.group(2))
    return major


def find_java() -> str:
    """Path of a Java 17+ ``java`` (``$JAVA_HOME/bin/java`` first, then ``PATH``).

    Raises:
        ToolMissing: no java, or one older than 17.
    """
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    java = str(candidate) if candidate is not None and candidate.is_file() else shutil.which("java")
    if java is None:
        raise ToolMissing("Java 17+", JAVA_HINT)
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolMissing("Java 17+", f"{java} -version failed ({exc}); {JAVA_HINT}") from exc
    major = parse_java_major(out.stderr + out.stdout)
    if major is None or major < MIN_JAVA:
        raise ToolMissing("Java 17+", f"{java} is Java {major or '?'}; {JAVA_HINT}")
    return java


def find_mvn() -> str:
    """Path of ``mvn``.

    Raises:
        ToolMissing: Maven is not on PATH.
    """
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ToolMissing("Maven (mvn, to fetch the Kafka jars)", MVN_HINT)
    return mvn


def kafka_home(version: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache_dir>/kafka-<version>``, which holds ``libs/`` and the marker."""
    return cache_root(cache_dir) / f"kafka-{version}"


def _complete_libs(home: Path, log4j_version: str) -> Path | None:
    libs = home / "libs"
    try:
        marker = json.loads((home / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("log4j") != log4j_version:
        return None
    jars = marker.get("jars")
    if not isinstance(jars, list) or not jars or not all((libs / str(j)).is_file() for j in jars):
        return None
    return libs


def fetch_jars(version: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Make sure the broker's jars are in the cache and return their folder (``.../kafka-<v>/libs``).

    The first call runs Maven (tens of seconds with an empty ``~/.m2``); later calls return at once.

    Raises:
        ToolMissing: no ``mvn`` (only checked when a fetch is needed).
        InfraError: Maven failed (message carries its output; ``retriable`` is True).
    """
    version = resolve_version(version)
    log4j = log4j_version_for(version)
    home = kafka_home(version, cache_dir)
    libs = _complete_libs(home, log4j)
    if libs is not None:
        return libs
    home.mkdir(parents=True, exist_ok=True)
    with (home.parent / f"kafka-{version}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        libs = _complete_libs(home, log4j)  # another process may have fetched while we waited
        if libs is not None:
            return libs
        return _fetch_locked(home, version, log4j)


def _fetch_locked(home: Path, version: str, log4j: str) -> Path:
    mvn = find_mvn()
    (home / MARKER).unlink(missing_ok=True)
    staging = home / f"libs.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copyfile(POM, home / "pom.xml")
    cmd = [
        mvn, "-B", "-q", "-f", str(home / "pom.xml"),
        f"-Dkafka.version={version}", f"-Dlog4j.version={log4j}",
        "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={staging}",
    ]  # fmt: skip
    log.info("fetching Kafka %s jars from Maven Central into %s", version, home / "libs")
    started = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=home, capture_output=True, text=True, timeout=MVN_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise InfraError(f"mvn did not finish within {MVN_TIMEOUT_S:.0f} s", retriable=True) from exc
    jars = sorted(p.name for p in staging.glob("*.jar")) if staging.is_dir() else []
    if out.returncode != 0 or not any(j.startswith(f"kafka_2.13-{version}") for j in jars):
        shutil.rmtree(staging, ignore_errors=True)
        output = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
        raise InfraError(
            f"fetching Kafka {version} jars with Maven failed (exit {out.returncode}); it needs access to "
            f"Maven Central (or a mirror in ~/.m2/settings.xml):\n{output}",
            retriable=True,
        )
    libs = home / "libs"
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    marker = {"kafka": version, "log4j": log4j, "jars": jars}
    (home / f"{MARKER}.tmp").write_text(json.dumps(marker, indent=1))
    (home / f"{MARKER}.tmp").replace(home / MARKER)
    log.info("fetched %d jars in %.1f s", len(jars), time.monotonic() - started)
    return libs
