"""A warm ``make run`` to a healthy ``/health``: where the start-up time goes, phase by phase, over several runs.

    python3 bench/startup.py                        # 3 runs on the shared Kafka and Redis: bench/results/startup.json
    python3 bench/startup.py --runs 5 --own-infra   # aisemble run starts (and stops) its own broker and Redis too

"Warm": installed (.venv synced, so make's install step is a no-op) and the models converted and cached (the
default cache dir, ``~/.cache/aisemble`` or ``$AISEMBLE_CACHE_DIR``); with ``--own-infra`` the broker's data dir
is formatted by an untimed first start, so the timed runs start an already formatted broker, as a second
``make run`` on a machine does. Each run starts ``make run`` in its own session with a topic prefix and an edge
port of its own (``AISEMBLE_RUN_LOG_DIR`` writes each process's log to a file), polls ``GET /health`` every
50 ms until it answers 200 with status ``ok`` and a live agent for every service, then stops everything.

Phases come from the processes' own log lines (timestamped by the logging module) and the health polls, all
as seconds since ``make run`` was started: ``infra`` (the CLI's imports and the Kafka and Redis checks or
starts), then per agent ``imports`` (interpreter, the agent's modules), ``topics`` (its topics exist),
``runner_imports`` (the model code's imports: torch, transformers...), ``model_load`` (weights and warm-up),
``faust_join`` (Faust's start, the consumer group join, the first assignment), ``first_beat`` (until /health
shows the service live); for the edge ``edge_ready`` (its lifespan done) and the first /health answer. Also
each process's CPU seconds at the healthy moment (user + system, from /proc): on a machine with few cores,
the sum of the CPU seconds, not the critical path, bounds the start, and the CPU figures are steadier than
wall times when the machine is shared. The 1-minute load average before each run is recorded.

Guarantees: it stops what it started (SIGINT to make's process group, then SIGKILL to every recorded
descendant still alive); the edge listens on a free port on 127.0.0.1; the shared Kafka and Redis are never
stopped. What can go wrong: a run that is not healthy within ``--timeout`` (recorded with the log tails,
everything stopped, the script exits 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.first_run import SERVICES, alive, descendants, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "startup.json"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Agent log lines (a substring) -> the mark they set.
AGENT_MARKS = (
    ("startup {s}: imports done", "imports_done"),
    ("startup {s}: topics ready", "topics_ready"),
    ("startup {s}: runner built", "runner_built"),
    ("{s} model(s) loaded and warm", "model_loaded"),
    ("Worker ready", "worker_ready"),
    ("startup {s}: first heartbeat", "first_beat_sent"),
)
# Per agent phase: (name, from mark, to mark), on the agent's critical path. The topics are made in a helper
# thread while the runner's imports and the model load run (before that change they came first, in turn):
# ``topics`` is reported either way, ``runner_imports`` starts after the topics when they came first.
PHASE_NAMES = ("imports", "topics", "runner_imports", "model_load", "faust_join", "first_beat")


def agent_phases(marks: dict[str, float | None]) -> dict[str, float | None]:
    """Each phase's seconds from an agent's marks (None where a mark is missing)."""
    topics, built = marks.get("topics_ready"), marks.get("runner_built")
    sequential = topics is not None and built is not None and topics <= built and marks.get("imports_done") is not None
    after_topics = "topics_ready" if sequential else "imports_done"
    loaded, ready = marks.get("model_loaded"), marks.get("topics_ready")
    join_from = "model_loaded" if loaded is None or ready is None or loaded >= ready else "topics_ready"
    return {
        "imports": span(marks, "spawned", "imports_done"),
        "topics": span(marks, "imports_done", "topics_ready"),
        "runner_imports": span(marks, after_topics, "runner_built"),
        "model_load": span(marks, "runner_built", "model_loaded"),
        "faust_join": span(marks, join_from, "worker_ready"),
        "first_beat": span(marks, "worker_ready", "service_ok"),
    }


def stamp_of(line: str) -> float | None:
    """The epoch seconds of a line the logging module timestamped (local time), else None."""
    match = STAMP.match(line)
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def first_stamp(path: Path, needle: str) -> float | None:
    with contextlib.suppress(OSError), path.open(errors="replace") as fh:
        for line in fh:
            if needle in line and (at := stamp_of(line)) is not None:
                return at
    return None


def cpu_seconds(pids: set[int]) -> dict[str, float]:
    """CPU seconds (user + system) of each live process, named by what it runs, summed per name."""
    out: dict[str, float] = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        seconds = (int(stat[11]) + int(stat[12])) / CLK_TCK
        if "-m aisemble agent " in cmd:
            name = "agent " + cmd.split("-m aisemble agent ", 1)[1].split()[0]
        elif "-m aisemble edge" in cmd:
            name = "edge"
        elif "-m aisemble run" in cmd:
            name = "aisemble run"
        elif "kafka.Kafka" in cmd:
            name = "kafka"
        elif "redis-server" in cmd:
            name = "redis"
        else:
            name = "other"
        out[name] = round(out.get(name, 0.0) + seconds, 2)
    return out


def health(port: int) -> tuple[int | None, dict[str, Any] | None]:
    """/health's status and body (a 503's body too: it says which services are live already)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return None, None


def all_live(body: dict[str, Any] | None, services: tuple[str, ...]) -> bool:
    """/health's body says ``ok`` with a live agent for each of ``services``."""
    if not body or body.get("status") != "ok":
        return False
    views = body.get("services") or {}
    return all(
        isinstance(views.get(s), dict) and views[s].get("ok") is True and views[s].get("agents") for s in services
    )


def span(marks: dict[str, float | None], start: str, end: str) -> float | None:
    a, b = marks.get(start), marks.get(end)
    return None if a is None or b is None else round(b - a, 2)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def one_run(
    index: int, scratch: Path, timeout: float, env_extra: dict[str, str], services: tuple[str, ...]
) -> dict[str, Any]:
    port = free_port()
    prefix = f"startup{index}-{os.getpid()}"
    logs = scratch / f"run-{index}"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "AISEMBLE_EDGE_PORT": str(port),
        "AISEMBLE_EDGE_HOST": "127.0.0.1",
        "AISEMBLE_TOPIC_PREFIX": prefix,
        "AISEMBLE_EDGE_ID": prefix,
        "AISEMBLE_RUN_LOG_DIR": str(logs),
        "AISEMBLE_SERVICES": json.dumps(list(services)),
        "PYTHONUNBUFFERED": "1",
        **env_extra,
    }
    for name in ("VIRTUAL_ENV", "AISEMBLE_API_KEYS", "AISEMBLE_AGENT_METRICS_PORT"):
        env.pop(name, None)
    load = loadavg()
    t0 = time.time()
    cli_log = logs / "make-run.log"
    with cli_log.open("wb") as out:
        make = subprocess.Popen(
            ["make", "run"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    pids: set[int] = set()
    first_answer: float | None = None
    healthy: float | None = None
    service_ok: dict[str, float] = {}
    cpu: dict[str, float] = {}
    outcome = "timeout"
    try:
        while time.time() - t0 < timeout:
            pids |= descendants(make.pid)
            if make.poll() is not None:
                outcome = f"make exited with status {make.returncode}"
                break
            code, body = health(port)
            at = time.time() - t0
            if code is not None and first_answer is None:
                first_answer = at
            for s in services:
                view = ((body or {}).get("services") or {}).get(s)
                if s not in service_ok and isinstance(view, dict) and view.get("ok") is True and view.get("agents"):
                    service_ok[s] = at
            if code == 200 and all_live(body, services):
                healthy, outcome = at, "healthy"
                cpu = cpu_seconds(pids | descendants(make.pid))
                break
            time.sleep(0.05)
    finally:
        stopped = stop(make, pids)

    def rel(at: float | None) -> float | None:
        return None if at is None else round(at - t0, 2)

    infra_ready = rel(first_stamp(cli_log, "startup: Kafka and Redis answer after"))
    # Agents are spawned before the infra check since that change; before it, right after.
    spawned = rel(first_stamp(cli_log, "startup: agents spawned")) or infra_ready
    agents: dict[str, dict[str, Any]] = {}
    for s in services:
        path = logs / f"{prefix}-{s}.log"
        marks: dict[str, float | None] = {m: rel(first_stamp(path, n.format(s=s))) for n, m in AGENT_MARKS}
        marks["service_ok"] = None if s not in service_ok else round(service_ok[s], 2)
        marks["spawned"] = spawned
        agents[s] = {"marks": marks, "phases": agent_phases(marks)}
    edge_log = logs / f"{prefix}-edge.log"
    result: dict[str, Any] = {
        "outcome": outcome,
        "load_avg_1m_before": load,
        "healthy_s": None if healthy is None else round(healthy, 2),
        "agents_spawned_s": spawned,  # make and the CLI's imports (and, before that change, the infra check)
        "infra_s": infra_ready,  # make, the CLI's imports, the Kafka and Redis checks (or starts)
        "edge_ready_s": rel(first_stamp(edge_log, " ready; replies on ")),
        "first_health_answer_s": None if first_answer is None else round(first_answer, 2),
        "agents": agents,
        "cpu_s_at_healthy": cpu,
        "cpu_s_total": round(sum(cpu.values()), 2),
        "stop": stopped,
    }
    if outcome != "healthy":
        result["log_tails"] = {p.name: p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("*.log"))}
    return result


def stop(make: subprocess.Popen[bytes], pids: set[int]) -> dict[str, Any]:
    """SIGINT to make's process group (Ctrl-C), then SIGKILL to every recorded PID still alive."""
    started = time.monotonic()
    pids = pids | descendants(make.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(make.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        make.wait(timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    killed = sorted(p for p in pids | {make.pid} if alive(p))
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if make.poll() is None:
        make.wait(timeout=10)
    return {"stop_s": round(time.monotonic() - started, 1), "processes": len(pids), "sigkilled": killed}


def median_of(runs: list[dict[str, Any]], path: tuple[str, ...]) -> float | None:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            values.append(float(value))
    return round(statistics.median(values), 2) if values else None


def summary(runs: list[dict[str, Any]], services: tuple[str, ...]) -> dict[str, Any]:
    """The median of every figure over the healthy runs."""
    ok = [r for r in runs if r["outcome"] == "healthy"]
    names = sorted({n for r in ok for n in r["cpu_s_at_healthy"]})
    return {
        "healthy_runs": len(ok),
        "healthy_s": median_of(ok, ("healthy_s",)),
        "agents_spawned_s": median_of(ok, ("agents_spawned_s",)),
        "infra_s": median_of(ok, ("infra_s",)),
        "edge_ready_s": median_of(ok, ("edge_ready_s",)),
        "first_health_answer_s": median_of(ok, ("first_health_answer_s",)),
        "load_avg_1m_before": median_of(ok, ("load_avg_1m_before",)),
        "agents": {
            s: {
                "phases": {p: median_of(ok, ("agents", s, "phases", p)) for p in PHASE_NAMES},
                "service_ok_s": median_of(ok, ("agents", s, "marks", "service_ok")),
            }
            for s in services
        },
        "cpu_s_at_healthy": {n: median_of(ok, ("cpu_s_at_healthy", n)) for n in names},
        "cpu_s_total": median_of(ok, ("cpu_s_total",)),
    }


def warm_broker(env_extra: dict[str, str], timeout: float) -> None:
    """Start and stop the own broker and Redis once (untimed), so the timed runs find the storage formatted."""
    env = {**os.environ, **env_extra}
    subprocess.run([sys.executable, "-m", "aisemble", "infra", "up"], cwd=ROOT, env=env, check=True, timeout=timeout)
    subprocess.run([sys.executable, "-m", "aisemble", "infra", "down"], cwd=ROOT, env=env, check=True, timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run to a healthy /health")
    parser.add_argument("--services", default=",".join(SERVICES), help="comma-separated services")
    parser.add_argument(
        "--own-infra",
        action="store_true",
        help="aisemble run starts its own Kafka and Redis (on --kafka-port / --redis-port) in every run",
    )
    parser.add_argument("--kafka-port", type=int, default=19392)
    parser.add_argument("--redis-port", type=int, default=16479)
    parser.add_argument("--label", default="", help="a name for this set of runs, kept in the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--resummarize", type=Path, default=None, help="recompute an earlier JSON's phases and medians, then exit"
    )
    args = parser.parse_args()
    if args.resummarize is not None:
        report = json.loads(args.resummarize.read_text())
        for run in report["runs"]:
            for view in run["agents"].values():
                view["phases"] = agent_phases(view["marks"])
        report["median"] = summary(report["runs"], tuple(report["services"]))
        args.resummarize.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["median"], indent=1))
        return 0
    # Started in the background by a shell, this process may ignore SIGINT, and so would make and every child
    # (an ignored signal stays ignored across exec): give it its default action, so the Ctrl-C that stops each
    # run reaches every process.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    services = tuple(s.strip() for s in args.services.split(",") if s.strip())
    env_extra: dict[str, str] = {}
    if args.own_infra:
        env_extra = {
            "AISEMBLE_KAFKA_BOOTSTRAP": f"127.0.0.1:{args.kafka_port}",
            "AISEMBLE_REDIS_URL": f"redis://127.0.0.1:{args.redis_port}/0",
        }
        warm_broker(env_extra, args.timeout)
    scratch = Path(tempfile.mkdtemp(prefix="aisemble-startup-"))
    report: dict[str, Any] = {
        "label": args.label,
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "own_infra": args.own_infra,
        "kafka": env_extra.get(
            "AISEMBLE_KAFKA_BOOTSTRAP", os.environ.get("AISEMBLE_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
        ),
        "services": list(services),
        "runs": [],
    }
    try:
        for i in range(args.runs):
            result = one_run(i, scratch, args.timeout, env_extra, services)
            report["runs"].append(result)
            print(json.dumps({k: result[k] for k in ("outcome", "healthy_s", "infra_s", "cpu_s_total")}), flush=True)
    finally:
        report["median"] = summary(report["runs"], services)
        report["finished_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["median"], indent=1), flush=True)
        print(f"startup: wrote {args.out} (logs in {scratch})", flush=True)
    return 0 if all(r["outcome"] == "healthy" for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
