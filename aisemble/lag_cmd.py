"""``aisemble lag``: every aisemble consumer group's lag, consumption rate and time to drain.

One-shot (default): two samples ``--interval`` apart (so rates and drain times are known), printed as a
table, or as one JSON document with ``--json`` (the same document ``GET /lag`` returns). ``--watch``
refreshes a live table every ``--interval`` seconds (with ``--json``: one JSON document per line) until
Ctrl-C. The figures come from ``streams.lag_probe.LagMonitor`` (the broker's committed, beginning and end
offsets) and ``streams.lag`` (the arithmetic). Exit status 1 when the broker cannot be asked.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from streams.lag import LagReport
    from streams.lag_probe import LagMonitor


def _number(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.1f}{unit}"


def render(report: LagReport, prefix: str) -> Table:
    """A rich table: one bold row per group (its totals), a row per lane of a service's group (interactive,
    bulk), then one row per partition."""
    from rich.table import Table

    from streams.lag import drain_text

    interval = "first sample: no rates yet" if report.interval_s is None else f"rates over {report.interval_s:.1f} s"
    table = Table(title=f"consumer lag, prefix {prefix} ({interval})", title_justify="left")
    for column in ("group", "state", "members", "topic", "partition", "committed", "end", "lag", "rate/s", "drain"):
        numeric = column in {"members", "partition", "committed", "end", "lag", "rate/s"}
        table.add_column(column, justify="right" if numeric else "left", no_wrap=True)
    for group in report.groups:
        total = group.total
        table.add_row(
            group.group, group.state, str(group.members), "(all)", "", "", "", f"{total.lag:,}",
            _number(total.rate_per_s), drain_text(total.lag, total.drain_s), style="bold",
        )
        for lane, t in group.lanes.items():  # a service's lanes, each with its own time to drain
            table.add_row(
                "", "", "", f"({lane})", "", "", "", f"{t.lag:,}", _number(t.rate_per_s), drain_text(t.lag, t.drain_s),
            )
        for p in group.partitions:
            table.add_row(
                "", "", "", p.topic, str(p.partition), "-" if p.committed is None else f"{p.committed:,}",
                f"{p.end:,}", f"{p.lag:,}", _number(p.rate_per_s), drain_text(p.lag, p.drain_s),
            )
    if not report.groups:
        table.caption = "no aisemble consumer groups"
    return table


async def _one_shot(monitor: LagMonitor, interval_s: float) -> LagReport:
    report = await monitor.read()
    if interval_s > 0:
        await asyncio.sleep(interval_s)
        report = await monitor.read()
    return report


async def _watch(monitor: LagMonitor, interval_s: float, as_json: bool, prefix: str) -> None:
    from rich.live import Live

    from streams.lag import lag_document
    from streams.lag_probe import LagUnavailable

    if as_json:
        while True:
            report = await monitor.read()
            typer.echo(json.dumps(lag_document(report, prefix)))
            await asyncio.sleep(interval_s)
    with Live(auto_refresh=False) as live:
        while True:
            try:
                live.update(render(await monitor.read(), prefix), refresh=True)
            except LagUnavailable as exc:  # keep watching: the broker may come back
                live.update(f"[red]{exc}[/red]", refresh=True)
            await asyncio.sleep(interval_s)


def lag(
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every --interval seconds until Ctrl-C.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document (with --watch: one per line), as GET /lag returns.")
    ] = False,
    interval: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds between the two samples that give rates (0: one sample, no rates)."),
    ] = 1.0,
) -> None:
    """Lag of every aisemble consumer group per topic and partition: committed and end offsets, lag, rate, drain.

    Groups: {prefix}-{service}-agents of every configured service (even without members or commits), and {prefix}-*.

    Lag: end offset minus the committed offset (the log start when the group has not committed).

    Rate: committed offsets per second between two samples. Drain: lag / rate ("not draining" at rate 0).
    """
    from rich.console import Console

    from streams.lag import lag_document
    from streams.lag_probe import LagMonitor, LagUnavailable
    from streams.settings import get_settings

    settings = get_settings()
    prefix = settings.topic_prefix

    async def main() -> LagReport | None:
        async with LagMonitor(settings, min_interval_s=0.0) as monitor:
            if watch:
                await _watch(monitor, max(interval, 0.2), as_json, prefix)
                return None
            return await _one_shot(monitor, interval)

    try:
        report = asyncio.run(main())
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except LagUnavailable as exc:
        typer.echo(f"aisemble lag: {exc}", err=True)
        raise typer.Exit(1) from None
    if report is None:
        return
    if as_json:
        typer.echo(json.dumps(lag_document(report, prefix)))
    else:
        console = Console()
        if not console.is_terminal:  # piped: don't cut names to 80 columns
            console = Console(width=200)
        console.print(render(report, prefix))
