"""The ``aisemble`` command: parses arguments and calls into the packages; no logic of its own.

aisemble run                  Kafka, Redis, every agent and the edge, in the foreground
aisemble edge                 the REST edge (127.0.0.1:8080 by default)
aisemble agent SERVICE        one service's agent (data, nlp, llm, vision)
aisemble infra up|down|status the local Kafka (KRaft) and Redis
aisemble schemas export|check the JSON Schema files of the wire contract
aisemble monitor              the brief's performance monitor: latency and success per endpoint
aisemble batch submit|status|results  the OpenAI Batch API of an edge (aisemble/batch_cmd.py)
aisemble bench llm            TTFT, ITL, TPOT, e2e, tokens/s and goodput of the LLM (bench/llm_serve.py)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from aisemble import batch_cmd, lag_cmd, monitor
from schemas import SERVICES
from streams.settings import get_settings

log = logging.getLogger("aisemble.cli")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Kafka-native AI inference pipeline.")
infra_app = typer.Typer(no_args_is_help=True, help="Local Kafka (KRaft) and Redis on 127.0.0.1.")
schemas_app = typer.Typer(no_args_is_help=True, help="JSON Schema files of the wire contract.")
app.add_typer(infra_app, name="infra")
app.add_typer(schemas_app, name="schemas")
topics_app = typer.Typer(no_args_is_help=True, help="Create aisemble's topics (the broker creates none on demand).")
app.add_typer(topics_app, name="topics")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (the bench extra's drivers, run from a checkout).")
app.add_typer(bench_app, name="bench")
app.add_typer(batch_cmd.app, name="batch")  # aisemble/batch_cmd.py
app.command("lag")(lag_cmd.lag)  # aisemble/lag_cmd.py
app.command("monitor")(monitor.monitor)  # aisemble/monitor.py


def _logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _check_bind(host: str) -> None:
    """Exit 2 with the reason, before anything binds, when the edge would be exposed without API keys."""
    from api.auth import InsecureBindError, InvalidApiKeysError, check_bind

    try:
        check_bind(host, get_settings())
    except (InsecureBindError, InvalidApiKeysError) as exc:
        typer.echo(f"aisemble: {exc}", err=True)
        raise typer.Exit(2) from None


def _check_service(service: str) -> str:
    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; expected one of {', '.join(SERVICES)}")
    return service


@app.command()
def edge(
    host: Annotated[str | None, typer.Option(help="Bind address (default AISEMBLE_EDGE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default AISEMBLE_EDGE_PORT).")] = None,
) -> None:
    """Run the REST edge (refused on a non-loopback address without API keys; see AISEMBLE_ALLOW_INSECURE)."""
    settings = get_settings()
    bind = host or settings.edge_host
    _check_bind(bind)  # before uvicorn is even imported: an exposed edge without keys never listens

    import uvicorn

    from api.app import create_app

    _logging()
    uvicorn.run(
        create_app(settings),
        host=bind,
        port=port or settings.edge_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        loop=settings.event_loop,
    )


@app.command()
def agent(
    service: Annotated[str, typer.Argument(callback=_check_service, help="data, nlp, llm or vision")],
    runner: Annotated[
        str | None, typer.Option(help="Serve a custom ModelRunner: 'module:function' taking the settings.")
    ] = None,
) -> None:
    """Run one service's agent (exit status 3 when its delivery retries ran out; restart it)."""
    from agents.worker import run_agent

    _logging()
    run_agent(service, get_settings(), runner)  # type: ignore[arg-type]


Cluster = Annotated[bool, typer.Option("--cluster", help="A 3-node KRaft cluster on 127.0.0.1:19092,19094,19096.")]


@topics_app.command("create")
def topics_create(
    reply: Annotated[
        list[str] | None,
        typer.Option(help="Also create the reply topic {prefix}.replies.NAME for a raw client (repeatable)."),
    ] = None,
    partitions: Annotated[int, typer.Option(help="Partitions of each reply topic.")] = 1,
) -> None:
    """Create every service's request, results and DLQ topics, and the named reply topics (idempotent)."""
    import asyncio

    from streams.topics import ensure_service_topics, ensure_topics, reply_topic_name

    _logging()
    settings = get_settings()

    async def create() -> list[str]:
        created = await ensure_service_topics(settings, settings.services)
        names = [reply_topic_name(settings.topic_prefix, name) for name in reply or []]
        return created + await ensure_topics(settings, [(name, partitions) for name in names])

    created = asyncio.run(create())
    typer.echo("created: " + (", ".join(created) if created else "nothing (all exist)"))
    for name in reply or []:
        typer.echo(f"reply topic: {reply_topic_name(settings.topic_prefix, name)}")


@infra_app.command("up")
def infra_up(cluster: Cluster = False) -> None:
    """Start Kafka and Redis on 127.0.0.1 unless they already answer (they keep running)."""
    import infra

    _logging()
    if cluster:
        status = infra.cluster_status()
        handle = None if status["answers"] else infra.start_cluster()
        redis = infra.ensure_redis(get_settings().redis_url)
        typer.echo(f"kafka cluster: {status['bootstrap']} ({'started' if handle else 'already running'})")
        typer.echo(f"redis: {get_settings().redis_url} ({'started' if redis else 'already running'})")
        typer.echo(f"use: AISEMBLE_KAFKA_BOOTSTRAP={status['bootstrap']} AISEMBLE_REPLICATION_FACTOR=3")
        return
    started = infra.start_local(get_settings())
    typer.echo(f"kafka: {started.kafka_bootstrap} ({'started' if started.kafka else 'already running'})")
    typer.echo(f"redis: {started.redis_url} ({'started' if started.redis else 'already running'})")


@infra_app.command("down")
def infra_down(cluster: Cluster = False) -> None:
    """Stop the Kafka and Redis that ``infra up`` started (``--cluster``: the cluster's nodes only)."""
    import infra

    _logging()
    if cluster:
        typer.echo({"cluster nodes stopped": infra.stop_cluster()})
        return
    typer.echo(infra.stop_local(get_settings()))


@infra_app.command("status")
def infra_status(cluster: Cluster = False) -> None:
    """Say whether Kafka (``--cluster``: the local cluster) and Redis answer."""
    import infra

    status = infra.local_status(get_settings())
    if cluster:
        status["kafka"] = infra.cluster_status()
    for name, values in status.items():
        typer.echo(f"{name}: {values}")
    raise typer.Exit(0 if all(v.get("answers") for v in status.values()) else 1)


@schemas_app.command("export")
def schemas_export() -> None:
    """Regenerate schemas/jsonschema/*.json from the pydantic models."""
    from schemas.export import export

    for path in export():
        typer.echo(path)


@schemas_app.command("check")
def schemas_check() -> None:
    """Exit 1 when the schema files are stale."""
    from schemas.export import stale

    names = stale()
    if names:
        typer.echo(f"stale: {', '.join(names)}; run 'aisemble schemas export'", err=True)
        raise typer.Exit(1)
    typer.echo("schemas up to date")


@app.command()
def run(
    services: Annotated[
        str | None, typer.Option(help="Comma-separated services to run (default AISEMBLE_SERVICES, all four).")
    ] = None,
    log_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="AISEMBLE_RUN_LOG_DIR",
            help="Write each agent's and the edge's output to <dir>/<prefix>-<name>.log instead of this terminal.",
        ),
    ] = None,
) -> None:
    """Kafka, Redis, the agents and the edge in the foreground, supervised; Ctrl-C (or SIGTERM) stops them all.

    An agent or edge that exits is restarted with backoff (logged); the rest keeps serving meanwhile.
    """
    import signal
    import time

    import infra
    from aisemble.pipeline import Pipeline
    from aisemble.supervisor import supervise

    settings = get_settings()
    _check_bind(settings.edge_host)  # the edge it starts binds AISEMBLE_EDGE_HOST: refuse before starting anything
    _logging()
    chosen: list[str] = [_check_service(s.strip()) for s in services.split(",")] if services else [*settings.services]
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    started = time.monotonic()
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(settings, chosen, log_dir)
    local: infra.LocalInfra | None = None
    try:
        # The agents import their code and load their models while Kafka and Redis are checked (or started):
        # each waits for the broker before it makes its topics. The edge starts once both answer.
        pipeline.spawn_agents()
        log.info("startup: agents spawned")
        local = infra.start_local(settings)
        log.info("startup: Kafka and Redis answer after %.2fs", time.monotonic() - started)
        pipeline.spawn_edge()
        pipeline.wait_healthy()
        log.info("startup: healthy after %.2fs", time.monotonic() - started)
        typer.echo(f"aisemble: ready on {pipeline.url} with agents {', '.join(chosen)}; Ctrl-C stops")
        host = settings.agent_metrics_host
        ports = ", ".join(f"{n} http://{host}:{p}/metrics" for n, p in pipeline.metrics_ports.items())
        typer.echo(f"aisemble: metrics on {pipeline.url}/metrics" + (f"; agents: {ports}" if ports else ""))
        supervise(pipeline, should_stop=lambda: bool(stopping))
        typer.echo("aisemble: stopping (SIGTERM)")
    except KeyboardInterrupt:
        typer.echo("aisemble: stopping")
    finally:
        pipeline.stop()
        if local is not None:
            local.stop()  # only what this command started


@bench_app.command("llm")
def bench_llm(
    url: Annotated[
        str | None, typer.Option(help="An OpenAI-compatible server; default: an isolated pipeline with the llm agent.")
    ] = None,
    goodput: Annotated[
        list[str] | None,
        typer.Option(help="SLOs in ms, METRIC:MS (ttft, tpot, itl, e2el): 'ttft:500 tpot:100', or repeat the option."),
    ] = None,
    concurrency: Annotated[str | None, typer.Option(help="Fixed-concurrency points, e.g. 1,4,8.")] = None,
    rates: Annotated[str | None, typer.Option(help="Poisson request rates in req/s, e.g. 0.5,1; '' for none.")] = None,
    duration: Annotated[float | None, typer.Option(help="Seconds per load point.")] = None,
    output_tokens: Annotated[int | None, typer.Option(help="Tokens per answer (ignore_eos); default 64.")] = None,
    prompts: Annotated[str | None, typer.Option(help="Prompt sets: short, long or short,long.")] = None,
    profile: Annotated[str, typer.Option(help="Points and durations: smoke, quick or default.")] = "default",
    with_llama_server: Annotated[bool, typer.Option(help="Measure llama.cpp's llama-server too (if built).")] = False,
    out: Annotated[Path | None, typer.Option(help="Directory of llm_serve.json (default bench/results).")] = None,
) -> None:
    """The LLM through the streaming /v1/chat/completions in the field's terms (vllm bench serve, AIPerf):
    TTFT, ITL, TPOT, e2e latency (p50/p90/p99), output tokens/s and goodput, at fixed concurrency and Poisson
    request rates; prints the table and writes llm_serve.json. Needs a source checkout (bench/)."""
    try:
        from bench import llm_serve
        from bench.common import RESULTS, write_result
    except ImportError as exc:
        typer.echo(f"aisemble: the benchmarks need a source checkout (bench/): {exc}", err=True)
        raise typer.Exit(2) from None
    if profile not in llm_serve.PROFILES:
        raise typer.BadParameter(f"unknown profile {profile!r}; expected one of {', '.join(llm_serve.PROFILES)}")
    specs = [part for spec in goodput or llm_serve.DEFAULT_SLOS for part in spec.replace(",", " ").split()]
    try:
        llm_serve.parse_slos(specs)
        points, per_s = llm_serve.int_list(concurrency), llm_serve.float_list(rates)
        sets = None if prompts is None else [p.strip() for p in prompts.split(",") if p.strip()]
        for name in sets or []:
            if name not in llm_serve.PROMPT_SETS:
                raise ValueError(f"unknown prompt set {name!r}; expected {', '.join(llm_serve.PROMPT_SETS)}")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = llm_serve.run(
        url, profile, specs, points, per_s, duration, output_tokens,
        sets, with_llama_server=with_llama_server,
    )  # fmt: skip
    path = write_result("llm_serve", result, out or RESULTS)
    typer.echo(llm_serve.table(result))
    typer.echo(f"-> {path}")


from aisemble import streams_cmd  # noqa: E402  (produce, record, replay)

streams_cmd.register(app)


def main() -> None:
    app()
