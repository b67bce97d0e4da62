"""First run from a fresh clone to a healthy ``make run``: cold (empty uv cache) and warm (cache populated).

    python3 bench/first_run.py                  # cold, then warm: bench/results/first_run.json
    python3 bench/first_run.py --runs warm      # warm only, with the machine's uv cache (~/.cache/uv)

Each run clones the repository's committed HEAD into a scratch folder and starts ``make run`` there (the
Makefile bootstraps uv, makes .venv from the lock files, installs the project, starts the pipeline), then
polls ``GET /health`` until it answers 200 with status ``ok`` and a live agent for each of the four services.
The times of the phases are read from make's own output (each command line it echoes is timestamped).
``ready_line`` is when ``aisemble run`` printed "ready on"; null when /health was already healthy before that
line (the run is stopped at the first healthy answer).

Guarantees: it stops what it started. ``make run`` gets its own session; the script records every
descendant process it sees, stops them with SIGINT to that process group (what Ctrl-C does), waits, and
then SIGKILLs any recorded PID still alive. The edge listens on a free port on 127.0.0.1 and the topics get
a prefix of their own, so another pipeline on the machine (on 8080, say) is untouched. Kafka and Redis are
used where they already answer (AISEMBLE_KAFKA_BOOTSTRAP / AISEMBLE_REDIS_URL, default 127.0.0.1:9092 and
:6379) and never stopped; when none answers, ``aisemble run`` starts its own and stops it on exit.

What "cold" means here: an empty uv cache (UV_CACHE_DIR in the scratch folder: every wheel, torch's CUDA
build and the nvidia-* wheels included, is downloaded), pip's cache off, and an empty model cache
(AISEMBLE_CACHE_DIR in the scratch folder: the LLM's converted weights and the sentiment head are made
again). Still warm: the machine's Python, Java, Maven and its Kafka jars (~/.m2), the apt packages, and the
page cache. The warm run is a second fresh clone with both caches as the cold run left them.

What can go wrong: no network to PyPI (the cold install fails: reported with make's last lines), a run that
is not healthy within ``--timeout`` (reported as such, everything stopped), a busy disk (a cold run writes
about 12 GB: the uv cache and .venv share files by hardlinks when they are on one filesystem, else twice).
The scratch folder is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "first_run.json"
SERVICES = ("data", "nlp", "llm", "vision")
# Lines make echoes, in order, and the phase each one starts.
PHASES = (
    ("pip install", "uv_bootstrap"),
    ("uv venv", "venv"),
    ("uv pip sync", "sync"),
    ("uv pip install", "project"),
    ("-m aisemble run", "pipeline_start"),
)


@dataclass
class Lines:
    """make's output, each line with its time since the start."""

    start: float
    log: Path
    seen: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pump(self, stream: Any) -> None:
        with self.log.open("w", encoding="utf-8") as out:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                at = time.monotonic() - self.start
                out.write(f"{at:8.2f} {line}\n")
                out.flush()
                with self.lock:
                    self.seen.append((at, line))

    def first(self, needle: str) -> float | None:
        with self.lock:
            return next((at for at, line in self.seen if needle in line), None)

    def tail(self, n: int = 25) -> list[str]:
        with self.lock:
            return [line for _, line in self.seen[-n:]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(root: int) -> set[int]:
    """PIDs of every live process below ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def health(port: int) -> tuple[int | None, dict[str, Any] | None]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError):
        return None, None


def all_live(body: dict[str, Any] | None) -> bool:
    if not body or body.get("status") != "ok":
        return False
    services = body.get("services") or {}
    return all(
        isinstance(services.get(s), dict) and services[s].get("ok") is True and services[s].get("agents")
        for s in SERVICES
    )


def du_bytes(path: Path) -> int | None:
    """Bytes on disk under ``path`` (``du -s``: a file hardlinked twice inside counts once)."""
    if not path.exists():
        return None
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=False)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout else None


def stop(make: subprocess.Popen[bytes], pids: set[int], grace: float) -> dict[str, Any]:
    """SIGINT to make's process group (Ctrl-C), then SIGKILL to every recorded PID still alive."""
    started = time.monotonic()
    pids = pids | descendants(make.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(make.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        make.wait(timeout=grace)
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


def one_run(label: str, scratch: Path, uv_cache: Path, model_cache: Path, timeout: float, cold: bool) -> dict[str, Any]:
    clone = scratch / f"clone-{label}"
    port = free_port()
    env = {
        **os.environ,
        "UV_CACHE_DIR": str(uv_cache),
        "AISEMBLE_CACHE_DIR": str(model_cache),
        "AISEMBLE_EDGE_PORT": str(port),
        "AISEMBLE_EDGE_HOST": "127.0.0.1",
        "AISEMBLE_TOPIC_PREFIX": f"firstrun-{label}-{os.getpid()}",
        "AISEMBLE_EDGE_ID": f"firstrun-{label}-{os.getpid()}",
        "PYTHONUNBUFFERED": "1",  # aisemble's "ready on" line reaches the log when it is printed
    }
    for name in ("VIRTUAL_ENV", "AISEMBLE_API_KEYS", "AISEMBLE_AGENT_METRICS_PORT"):
        env.pop(name, None)
    if cold:
        env.pop("PIP_FIND_LINKS", None)
        env["PIP_NO_CACHE_DIR"] = "1"
    t0 = time.monotonic()
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True, timeout=300)
    clone_s = time.monotonic() - t0
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    lines = Lines(start=time.monotonic(), log=scratch / f"make-run-{label}.log")
    make = subprocess.Popen(
        ["make", "run"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    pump = threading.Thread(target=lines.pump, args=(make.stdout,), daemon=True)
    pump.start()
    pids: set[int] = set()
    first_200: float | None = None
    healthy: float | None = None
    outcome = "timeout"
    try:
        while time.monotonic() - lines.start < timeout:
            pids |= descendants(make.pid)
            if make.poll() is not None:
                outcome = f"make exited with status {make.returncode}"
                break
            code, body = health(port)
            at = time.monotonic() - lines.start
            if code == 200 and first_200 is None:
                first_200 = at
            if code == 200 and all_live(body):
                healthy, outcome = at, "healthy"
                break
            time.sleep(0.5)
    finally:
        stopped = stop(make, pids, grace=60)
        pump.join(timeout=10)
    marks = {name: lines.first(needle) for needle, name in PHASES}
    marks["ready_line"] = lines.first("aisemble: ready on")
    site = next((clone / ".venv" / "lib").glob("python3*/site-packages"), None)
    result: dict[str, Any] = {
        "label": label,
        "outcome": outcome,
        "commit": commit.strip(),
        "clone_s": round(clone_s, 2),
        "make_run_to_healthy_s": None if healthy is None else round(healthy, 1),
        "total_s": None if healthy is None else round(clone_s + healthy, 1),
        "make_run_to_first_200_s": None if first_200 is None else round(first_200, 1),
        "phase_starts_s": {k: None if v is None else round(v, 1) for k, v in marks.items()},
        "edge_port": port,
        "uv_cache_dir": str(uv_cache),
        "model_cache_dir": str(model_cache),
        "sizes_bytes": {
            "venv": du_bytes(clone / ".venv"),
            "venv_nvidia": du_bytes(site / "nvidia") if site else None,
            "venv_torch": du_bytes(site / "torch") if site else None,
            "uv_cache": du_bytes(uv_cache),
            "model_cache": du_bytes(model_cache),
        },
        "stop": stopped,
    }
    if outcome != "healthy":
        result["make_tail"] = lines.tail()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="cold,warm", help="cold,warm (default), cold, or warm")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run to a healthy /health")
    parser.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the clones and caches in the scratch folder")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in ("cold", "warm") for r in runs):
        parser.error("--runs takes cold and/or warm")
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="aisemble-first-run-"))
    scratch.mkdir(parents=True, exist_ok=True)
    model_cache = scratch / "aisemble-cache"
    # Cold: an empty uv cache of its own (the warm run after it reuses it); warm alone: the machine's cache.
    uv_cache = scratch / "uv-cache" if "cold" in runs else Path(os.environ.get("UV_CACHE_DIR", "~/.cache/uv"))
    uv_cache = uv_cache.expanduser()
    if "cold" not in runs:
        model_cache = Path(os.environ.get("AISEMBLE_CACHE_DIR", "~/.cache/aisemble")).expanduser()
    report: dict[str, Any] = {
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "kafka": os.environ.get("AISEMBLE_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        "redis": os.environ.get("AISEMBLE_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "runs": [],
    }
    try:
        for label in runs:
            print(f"first_run: {label} run (uv cache {uv_cache}, model cache {model_cache})", flush=True)
            result = one_run(label, scratch, uv_cache, model_cache, args.timeout, cold=label == "cold")
            report["runs"].append(result)
            print(json.dumps(result), flush=True)
    finally:
        report["finished_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"first_run: wrote {args.out}", flush=True)
        if not args.keep and args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(r["outcome"] == "healthy" for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
