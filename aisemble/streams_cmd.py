"""``aisemble produce``, ``aisemble record`` and ``aisemble replay``: traffic tools on a service's topics.

Arguments are parsed here; the work is in ``streams.replay`` (Kafka), ``streams.recording`` (the file format,
windows, pacing) and ``streams.replay_report`` (statistics, comparison, plots). Exit status 2 when a tool
cannot run as asked (a missing topic, an unreadable file, conflicting options), with the reason.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import orjson
import typer

from schemas import SERVICES
from streams.settings import Settings, get_settings

T = TypeVar("T")


def _service(value: str) -> str:
    if value not in SERVICES:
        raise typer.BadParameter(f"unknown service {value!r}; expected one of {', '.join(SERVICES)}")
    return value


Service = Annotated[str, typer.Argument(callback=_service, help="data, nlp, llm or vision")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object (machine output).")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"aisemble: {message}", err=True)
    return typer.Exit(2)


@contextmanager
def _progress(label: str, quiet: bool) -> Iterator[Callable[[int, int, int], None] | None]:
    """A rich progress bar on stderr (sent / answered); nothing when ``quiet``."""
    if quiet:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"{label} {{task.fields[text]}}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None, text="")

        def update(sent: int, answered: int, total: int) -> None:
            bar.update(task, total=total, completed=answered, text=f"sent {sent}/{total} answered {answered}")

        yield update


def _run(coro: Coroutine[object, object, T]) -> T:
    from streams.kafka_security import KafkaSecurityConfigError, KafkaSecurityFailure
    from streams.recording import RecordingError
    from streams.replay import TrafficError

    try:
        return asyncio.run(coro)
    except (TrafficError, RecordingError, KafkaSecurityConfigError, KafkaSecurityFailure) as exc:
        raise _fail(str(exc)) from None


def _print_summary(report: dict[str, object], extra: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(report.get("title", "")), show_header=True)
    for column in ("hop (ms)", "count", "p50", "p95", "p99", "max"):
        table.add_column(column, justify="right" if column != "hop (ms)" else "left")
    latency = report.get("latency_ms")
    for hop, stats in (latency or {}).items() if isinstance(latency, dict) else []:
        table.add_row(hop, *(str(stats.get(k, "-")) for k in ("count", "p50", "p95", "p99", "max")))
    console = Console()
    keys = ("sent", "answered", "unanswered", "errors", "send_errors", "duration_s", "throughput_rps", "outputs")
    console.print({**{k: report.get(k) for k in keys}, **extra})
    console.print(table)


@contextmanager
def _logging_quiet() -> Iterator[None]:
    import logging

    logging.basicConfig(level=get_settings().log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    yield


def produce(
    service: Service,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSON Lines: inputs (--task) or events.")],
    task: Annotated[
        str | None, typer.Option(help="Each line is this task's input; without it each line is a request event.")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(min=0.001, help="Requests per second (default: as fast as possible).")
    ] = None,
    collect: Annotated[bool, typer.Option("--collect", help="Gather the replies; report counts and latency.")] = False,
    reply: Annotated[
        str | None, typer.Option(help="With --collect: reply topic {prefix}.replies.NAME (default produce-<random>).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.1, help="Seconds the run may take (default: the send schedule + 30).")
    ] = None,
    report: Annotated[Path | None, typer.Option(help="With --collect: write report.json and plots here.")] = None,
    bulk: Annotated[
        bool, typer.Option("--bulk", help="Send to the bulk lane ({prefix}.SERVICE.bulk): served with spare capacity.")
    ] = False,
    json_out: JsonOut = False,
) -> None:
    """Publish requests from FILE to SERVICE's request topic (with --bulk: its bulk topic) at --rate per second.

    With --collect the events' reply_to is a reply topic created for the run (and kept, so `aisemble record
    --with-replies` finds the replies); the replies are gathered and counts and latencies printed.

    Example: aisemble produce data inputs.jsonl --task analyze --rate 200 --collect
    """
    from streams.recording import RecordingError
    from streams.replay import events_from_lines
    from streams.replay import produce as run_produce
    from streams.replay_report import build_report, write_report

    settings = get_settings()
    run = uuid.uuid4().hex[:8]
    try:
        outgoing = events_from_lines(file.read_bytes().splitlines(), task, run)
    except RecordingError as exc:
        raise _fail(f"{file}: {exc}") from None
    if not outgoing:
        raise _fail(f"{file} holds no requests")
    reply_name = (reply or f"produce-{run}") if collect else None
    budget = timeout if timeout is not None else (len(outgoing) / rate if rate else 0.0) + 30.0
    with _logging_quiet(), _progress(f"produce {service}", json_out) as progress:
        result = _run(run_produce(
            settings, service, outgoing, rate=rate, reply_name=reply_name, timeout_s=budget, progress=progress,
            bulk=bulk,
        ))
    meta = {**result.meta, "title": f"produce {service}", "reply_topic": result.reply_topic, "file": str(file)}
    summary = build_report(result.samples, meta=meta)
    if not collect:
        for key in ("answered", "unanswered", "ok", "cached", "errors", "latency_ms", "batch_size", "throughput_rps"):
            summary.pop(key, None)
    if report is not None and collect:
        write_report(report, summary, result.samples)
    if json_out:
        typer.echo(orjson.dumps(summary).decode())
    elif collect:
        _print_summary(summary, {"reply_topic": result.reply_topic})
    else:
        typer.echo(f"sent {summary['sent']} of {summary['count']} in {summary['send_span_s']} s; "
                   f"send errors {summary['send_errors'] or 0}")
    if summary["sent"] != summary["count"]:
        raise typer.Exit(1)


def record(
    service: Service,
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="The recording (JSON Lines) to write.")],
    last: Annotated[int | None, typer.Option(min=1, help="The N latest requests of the topic.")] = None,
    since: Annotated[
        str | None, typer.Option(help="From this time: epoch ms, ISO 8601 (UTC unless zoned) or a duration ago (15m).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Up to this time (excluded); same forms as --since.")] = None,
    from_offset: Annotated[
        str | None, typer.Option(help="From this offset: N for every partition, or P:N,P:N.")
    ] = None,
    to_offset: Annotated[str | None, typer.Option(help="Up to this offset (excluded); same forms.")] = None,
    with_replies: Annotated[
        bool, typer.Option("--with-replies", help="Also capture each request's reply (results and reply topics).")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds the reads may take; then what was read is kept.")
    ] = 60.0,
    json_out: JsonOut = False,
) -> None:
    """Capture SERVICE's request events (partition, offset, timestamp, event) into a recording.

    Without a window, the whole topic as it is now. The reads are bounded: records produced after the
    command started are not captured, and partitions unfinished at --timeout are named in the header.

    Example: aisemble record data --out rec.jsonl --last 2000 --with-replies
    """
    import time

    from streams.recorder import Window
    from streams.recorder import record as run_record
    from streams.recording import RecordingError, parse_offsets, parse_time, write_recording

    if last is not None and any(v is not None for v in (since, until, from_offset, to_offset)):
        raise _fail("--last cannot be combined with --since/--until or --from-offset/--to-offset")
    if (since or until) and (from_offset or to_offset):
        raise _fail("use a time window (--since/--until) or an offset window (--from-offset/--to-offset), not both")
    now_ms = int(time.time() * 1000)
    try:
        window = Window(
            last=last,
            since_ms=parse_time(since, now_ms) if since else None,
            until_ms=parse_time(until, now_ms) if until else None,
            from_offsets=parse_offsets(from_offset) if from_offset else None,
            to_offsets=parse_offsets(to_offset) if to_offset else None,
        )
    except RecordingError as exc:
        raise _fail(str(exc)) from None
    settings = get_settings()
    with _logging_quiet():
        recording = _run(run_record(settings, service, window, with_replies=with_replies, timeout_s=timeout))
    write_recording(out, recording)
    counts = {
        "file": str(out),
        "topic": recording.topic,
        "recorded": len(recording.requests),
        "with_replies": recording.with_replies,
        "skipped": recording.header.get("skipped", 0),
        "span_s": round(recording.span_s, 3),
        "incomplete": recording.header.get("incomplete", []),
    }
    typer.echo(orjson.dumps(counts).decode() if json_out else " ".join(f"{k}={v}" for k, v in counts.items()))


def replay(
    file: Annotated[Path | None, typer.Argument(dir_okay=False, help="A recording from `aisemble record`.")] = None,
    speed: Annotated[
        float, typer.Option(min=0.001, help="Scale the recorded inter-arrival times (2 = twice as fast).")
    ] = 1.0,
    max_: Annotated[bool, typer.Option("--max", help="Send as fast as possible (ignores --speed).")] = False,
    prefix: Annotated[
        str | None, typer.Option(help="Replay into the deployment with this AISEMBLE_TOPIC_PREFIX (a shadow).")
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Write report.json, samples.jsonl and PNG plots here.")] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.1, help="Seconds the replay may take (default: recorded span / speed + 60).")
    ] = None,
    keep_cache: Annotated[
        bool, typer.Option("--keep-cache", help="Keep the events' cache field (default: cache off, run the model).")
    ] = False,
    cosine_tol: Annotated[float, typer.Option(help="Embeddings differ above this cosine distance.")] = 1e-4,
    compare: Annotated[
        tuple[Path, Path] | None, typer.Option(help="Print two reports side by side (A then B) and exit.")
    ] = None,
    json_out: JsonOut = False,
) -> None:
    """Re-publish a recording open loop (original timing scaled by --speed, or --max), with new ids and a
    reply topic of its own, and report what came back.

    Examples: aisemble replay rec.jsonl --speed 1 --report out/1x;
    AISEMBLE_TOPIC_PREFIX=live aisemble replay rec.jsonl --max --prefix shadow --report out/shadow;
    aisemble replay --compare out/1x/report.json out/shadow/report.json
    """
    if compare is not None:
        _compare(*compare, json_out)
        return
    if file is None:
        raise _fail("give a recording FILE, or --compare A.json B.json")
    from streams.recording import RecordingError, read_recording
    from streams.replay import replay as run_replay
    from streams.replay_report import build_report, write_report

    try:
        recording = read_recording(file)
    except (RecordingError, OSError) as exc:
        raise _fail(str(exc)) from None
    settings: Settings = get_settings()
    if prefix:
        settings = settings.model_copy(update={"topic_prefix": prefix})
    with _logging_quiet(), _progress(f"replay {file.name}", json_out) as progress:
        result = _run(run_replay(
            settings,
            recording,
            speed=None if max_ else speed,
            timeout_s=timeout,
            keep_cache=keep_cache,
            cosine_tol=cosine_tol,
            progress=progress,
        ))
    meta = {**result.meta, "recording": str(file), "title": f"{recording.service} {result.meta['mode']}"}
    summary = build_report(result.samples, meta=meta, outputs=result.outputs)
    extra: dict[str, object] = {}
    if report is not None:
        extra["report"] = [str(p) for p in write_report(report, summary, result.samples)]
    if json_out:
        typer.echo(orjson.dumps({**summary, **extra}).decode())
    else:
        _print_summary(summary, extra)


def _compare(a: Path, b: Path, json_out: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from streams.replay_report import compare_rows

    try:
        ra, rb = orjson.loads(a.read_bytes()), orjson.loads(b.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise _fail(f"cannot read the reports: {exc}") from None
    rows = compare_rows(ra, rb)
    if json_out:
        typer.echo(orjson.dumps([dict(zip(("metric", "A", "B", "B/A"), r, strict=True)) for r in rows]).decode())
        return
    console = Console()
    console.print(f"A: {a}\nB: {b}", soft_wrap=True)
    table = Table()
    table.add_column("metric")
    for column in (f"A {ra.get('mode', '')}", f"B {rb.get('mode', '')}", "B/A"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the three commands to the ``aisemble`` CLI."""
    app.command()(produce)
    app.command()(record)
    app.command()(replay)
