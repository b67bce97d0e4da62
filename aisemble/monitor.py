"""``aisemble monitor``: the design brief's performance monitor, as a command and a smoke test.

It calls each endpoint of the brief with the brief's payloads, one request after the other, a number of
times (``--iterations``, else the brief's count per endpoint), and reports per endpoint: requests, success
rate (2xx / requests), average, min, max and p95 latency in ms, the statuses seen and how many answers came
from the cache; then a summary. Output: a table, or ``--json`` (one document on stdout).

The endpoints: ``GET /health`` (50), ``POST /ai/llm/completion`` (10), ``POST /ai/nlp/process`` sentiment (20),
``POST /data/process`` analyze on 100 records (15), and ``POST /ai/vision/analyze`` detect_faces (10) when an
image is at hand (``--image``, else ``tests/data/astronaut.jpg`` when this installation has it; otherwise
vision is skipped with a note). ``--services`` chooses among them (default: health and ``AISEMBLE_SERVICES``).

What it guarantees: every request is bounded by ``--timeout``; a refused connection or a timeout is a failed
request, never a crash; the exit status is 1 when any endpoint succeeded on no request at all (the smoke-test
verdict), else 0. What it is not: a load test (requests are sequential, as in the brief), nor a cold-path
measurement: repeated payloads are served from the cache unless ``--no-cache`` is given (``cached`` counts them).

p95 is the 95th percentile with linear interpolation between the closest ranks (numpy's default,
``streams.stats.percentile``); with one sample it is that sample.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from schemas.http import API_KEY_HEADER
from streams.settings import Settings, get_settings
from streams.stats import percentile

if TYPE_CHECKING:  # imported where used: every ``aisemble`` process (each agent) imports this module
    import httpx

ENDPOINT_NAMES = ("health", "llm", "nlp", "data", "vision")
DEFAULT_IMAGE = Path(__file__).resolve().parent.parent / "tests" / "data" / "astronaut.jpg"


@dataclass(frozen=True, slots=True)
class Probe:
    """One endpoint to measure: ``payload`` None is a GET."""

    name: str
    method: str
    path: str
    payload: dict[str, object] | None
    iterations: int


@dataclass(frozen=True, slots=True)
class Sample:
    """One request's outcome: HTTP status (0: no answer), latency, and whether the answer came from a cache."""

    status: int
    ms: float
    cached: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """The figures of one endpoint (latencies in ms, over every request, failed ones included)."""

    name: str
    endpoint: str
    requests: int
    ok: int
    errors: int
    success_rate: float
    avg_ms: float
    min_ms: float
    max_ms: float
    p95_ms: float
    cached: int
    statuses: dict[str, int]
    first_error: str | None = None


@dataclass(frozen=True, slots=True)
class Summary:
    """All endpoints together; ``failing``: the endpoints that never answered 2xx."""

    endpoints: int
    requests: int
    ok: int
    success_rate: float
    requests_per_s: float
    failing: list[str]


@dataclass(frozen=True, slots=True)
class Report:
    url: str
    started: float
    duration_s: float
    endpoints: list[EndpointStats]
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> Summary:
        total = sum(e.requests for e in self.endpoints)
        ok = sum(e.ok for e in self.endpoints)
        return Summary(
            endpoints=len(self.endpoints),
            requests=total,
            ok=ok,
            success_rate=round(ok / total, 4) if total else 0.0,
            requests_per_s=round(total / self.duration_s, 2) if self.duration_s > 0 else 0.0,
            failing=[e.endpoint for e in self.endpoints if e.ok == 0],
        )

    @property
    def healthy(self) -> bool:
        """The smoke-test verdict: every endpoint answered 2xx at least once."""
        return bool(self.endpoints) and all(e.ok > 0 for e in self.endpoints)

    def as_dict(self) -> dict[str, object]:
        return {
            "url": self.url,
            "timestamp": round(self.started, 3),
            "duration_s": round(self.duration_s, 3),
            "endpoints": [asdict(e) for e in self.endpoints],
            "summary": asdict(self.summary),
            "notes": self.notes,
        }


def summarize(probe: Probe, samples: Sequence[Sample]) -> EndpointStats:
    """The statistics of one endpoint's samples (at least one)."""
    times = [s.ms for s in samples]
    ok = sum(1 for s in samples if s.ok)
    statuses = Counter(str(s.status) for s in samples)
    return EndpointStats(
        name=probe.name,
        endpoint=f"{probe.method} {probe.path}",
        requests=len(samples),
        ok=ok,
        errors=len(samples) - ok,
        success_rate=round(ok / len(samples), 4),
        avg_ms=round(statistics.fmean(times), 3),
        min_ms=round(min(times), 3),
        max_ms=round(max(times), 3),
        p95_ms=round(percentile(times, 95), 3),
        cached=sum(1 for s in samples if s.cached),
        statuses=dict(sorted(statuses.items())),
        first_error=next((s.error for s in samples if not s.ok), None),
    )


def brief_probes(image: Path | None, cache: bool = True) -> list[Probe]:
    """The brief's endpoints and payloads (vision only with an ``image``); ``cache=False`` asks every
    service request to bypass the result cache."""
    flag: dict[str, object] = {} if cache else {"cache": False}
    probes = [
        Probe("health", "GET", "/health", None, 50),
        Probe("llm", "POST", "/ai/llm/completion",
              {"prompt": "Hello, this is a test prompt.", "max_tokens": 20, "temperature": 0.1, **flag}, 10),
        Probe("nlp", "POST", "/ai/nlp/process",
              {"text": "This is a great product! I love it.", "task": "sentiment", **flag}, 20),
        Probe("data", "POST", "/data/process",
              {"operation": "analyze", "data": {"records": [{"id": i, "value": i * 10} for i in range(100)]},
               **flag}, 15),
    ]  # fmt: skip
    if image is not None:
        b64 = base64.b64encode(image.read_bytes()).decode("ascii")
        probes.append(
            Probe("vision", "POST", "/ai/vision/analyze", {"task": "detect_faces", "image_b64": b64, **flag}, 10)
        )
    return probes


def measure(client: httpx.Client, probe: Probe, iterations: int) -> list[Sample]:
    """Send ``probe`` ``iterations`` times, one after the other; never raises for a failed request."""
    import httpx

    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        try:
            response = client.request(probe.method, probe.path, json=probe.payload)
            body = response.content
        except httpx.HTTPError as exc:
            samples.append(Sample(0, (time.perf_counter() - started) * 1000.0, error=f"{type(exc).__name__}: {exc}"))
            continue
        ms = (time.perf_counter() - started) * 1000.0
        cached, error = False, None
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            cached = parsed.get("cached") is True
            if not response.is_success:
                detail = parsed.get("error") or parsed.get("status")
                error = f"{response.status_code}: {json.dumps(detail)[:200]}"
        elif not response.is_success:
            error = f"{response.status_code}: {body[:200]!r}"
        samples.append(Sample(response.status_code, ms, cached, error))
    return samples


def run_monitor(
    url: str,
    probes: Sequence[Probe],
    *,
    iterations: int | None = None,
    api_key: str | None = None,
    timeout_s: float = 35.0,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Measure every probe against the edge at ``url`` (``iterations`` None: each probe's own count)."""
    import httpx

    headers = {API_KEY_HEADER: api_key} if api_key else {}
    started, clock = time.time(), time.perf_counter()
    endpoints = []
    with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as client:
        for probe in probes:
            count = iterations or probe.iterations
            if progress is not None:
                progress(f"Testing {probe.method} {probe.path} x{count}...")
            endpoints.append(summarize(probe, measure(client, probe, count)))
    return Report(url=url, started=started, duration_s=time.perf_counter() - clock, endpoints=endpoints)


def default_url(settings: Settings) -> str:
    host = settings.edge_host
    if host in ("0.0.0.0", "::", ""):  # a wildcard bind is reached on loopback
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.edge_port}"


def render(report: Report) -> object:
    """A rich renderable: one row per endpoint and a summary caption."""
    from rich.table import Table

    table = Table(title=f"aisemble monitor: {report.url}")
    for column in ("endpoint", "requests", "success", "avg ms", "min ms", "max ms", "p95 ms", "cached", "statuses"):
        table.add_column(column, justify="left" if column in ("endpoint", "statuses") else "right")
    for e in report.endpoints:
        rate = f"{e.success_rate * 100:.1f}%"
        table.add_row(
            e.endpoint, str(e.requests), rate if e.ok else f"[red]{rate}[/red]", f"{e.avg_ms:.1f}",
            f"{e.min_ms:.1f}", f"{e.max_ms:.1f}", f"{e.p95_ms:.1f}", str(e.cached),
            " ".join(f"{k}x{v}" for k, v in e.statuses.items()),
        )  # fmt: skip
    s = report.summary
    table.caption = (
        f"{s.requests} requests, {s.success_rate * 100:.1f}% ok, {s.requests_per_s} req/s, {report.duration_s:.1f} s"
        + (f"; no success: {', '.join(s.failing)}" if s.failing else "")
    )
    return table


def monitor(
    url: Annotated[
        str | None, typer.Option(help="The edge (default http://AISEMBLE_EDGE_HOST:AISEMBLE_EDGE_PORT).")
    ] = None,
    iterations: Annotated[
        int | None, typer.Option(min=1, max=100_000, help="Requests per endpoint (default: the brief's counts).")
    ] = None,
    services: Annotated[
        str | None,
        typer.Option(help=f"Comma-separated, of {', '.join(ENDPOINT_NAMES)} (default health + AISEMBLE_SERVICES)."),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Sent as X-API-Key (default: the first of AISEMBLE_API_KEYS).")
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="Image for the vision endpoint (default tests/data/astronaut.jpg).")
    ] = None,
    cache: Annotated[bool, typer.Option(help="--no-cache: ask every request to bypass the result cache.")] = True,
    timeout: Annotated[
        float | None, typer.Option(help="Per-request timeout in s (default: the request timeout + 5).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of the table.")] = False,
) -> None:
    """Measure the brief's endpoints: latency (avg/min/max/p95) and success rate each; exit 1 if one never succeeds."""
    settings = get_settings()
    chosen = [s.strip() for s in services.split(",") if s.strip()] if services else ["health", *settings.services]
    unknown = sorted(set(chosen) - set(ENDPOINT_NAMES))
    if unknown:
        raise typer.BadParameter(f"unknown {', '.join(unknown)}; expected some of {', '.join(ENDPOINT_NAMES)}")
    notes = []
    picture = image or (DEFAULT_IMAGE if DEFAULT_IMAGE.is_file() else None)
    if "vision" in chosen and picture is None:
        notes.append(f"vision skipped: no image ({DEFAULT_IMAGE} is not in this installation; pass --image)")
    probes = [p for p in brief_probes(picture if "vision" in chosen else None, cache) if p.name in chosen]
    key = api_key or (settings.api_keys[0].get_secret_value() if settings.api_keys else None)
    report = run_monitor(
        url or default_url(settings),
        probes,
        iterations=iterations,
        api_key=key,
        timeout_s=timeout or settings.request_timeout_s + 5,
        progress=None if as_json else lambda line: typer.echo(line, err=True),
    )
    report.notes.extend(notes)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        from rich.console import Console

        console = Console()
        console.print(render(report))
        for note in report.notes:
            console.print(f"note: {note}")
        for e in report.endpoints:
            if e.first_error:
                console.print(f"{e.endpoint}: first error {e.first_error}", markup=False)
    raise typer.Exit(0 if report.healthy else 1)
