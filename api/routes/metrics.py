"""``GET /metrics``: the edge's Prometheus metrics (text format; see ``api.metrics`` for the families).

Needs an API key when keys are configured and ``AISEMBLE_METRICS_REQUIRE_KEY`` is true (the default);
``api.app`` applies ``auth_dependencies(settings, route="metrics")``. The load gauges are read from the edge
at each scrape; the consumer lag comes from the edge's lag monitor (``app.state.lag``, ``streams.lag_probe``,
cached 1 s): a lag read that fails or takes longer than ``LAG_READ_TIMEOUT_S`` leaves the last values in place
rather than failing or stalling the scrape.
"""

from __future__ import annotations

import asyncio
import logging
import math

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from api.deps import get_edge
from api.edge import Edge
from api.metrics import CONTENT_TYPE, EdgeLoad, EdgeMetrics, ServiceLag
from streams.lag import LagReport
from streams.lag_probe import LagMonitor

log = logging.getLogger(__name__)

router = APIRouter(tags=["metrics"])

LAG_READ_TIMEOUT_S = 2.0  # a scrape waits this long for the lag monitor (broker away: no lag samples)


def edge_load(edge: Edge) -> EdgeLoad:
    load = edge.load
    return EdgeLoad(
        in_flight=load["in_flight"],
        max_in_flight=load["max_in_flight"],
        peak=load["peak"],
        rejected=load["rejected"],
        waiting=len(edge.router),
        replies_dropped=edge.router.dropped,
        replies_foreign=edge.router.foreign,
    )


async def read_lag(request: Request) -> dict[str, ServiceLag] | None:
    """The lag per service from the edge's lag monitor (``app.state.lag``, ``streams.lag_probe``), or None
    (no monitor, or it could not be read now)."""
    return await read_lag_of(getattr(request.app.state, "lag", None))


async def read_lag_of(monitor: LagMonitor | None) -> dict[str, ServiceLag] | None:
    """``read_lag`` of a lag monitor (None: no monitor): the status history's sampler has no request."""
    if monitor is None:
        return None
    try:  # shielded: a slow sample goes on (and is cached for /lag and the next scrape) when this gives up
        report = await asyncio.wait_for(asyncio.shield(monitor.read()), LAG_READ_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001  (a scrape must not fail for the lag; the last values stay)
        log.warning("consumer lag unavailable for /metrics: %r", exc)
        return None
    return lag_by_service(report)


def lag_by_service(report: LagReport) -> dict[str, ServiceLag]:
    """``{service: ServiceLag}``: each service's agent group's lag and drain time. A group with lag that is
    not draining (no rate, e.g. no live agent) drains in +Inf seconds; before a second sample (no rates
    yet) the drain time is unknown (no sample)."""

    def drain_of(lag: int, drain_s: float | None) -> float | None:
        return math.inf if drain_s is None and lag > 0 and report.interval_s is not None else drain_s

    out: dict[str, ServiceLag] = {}
    for service, group in report.services.items():
        lanes = {lane: ServiceLag(float(t.lag), drain_of(t.lag, t.drain_s)) for lane, t in group.lanes.items()}
        out[service] = ServiceLag(float(group.lag), drain_of(group.lag, group.drain_s), lanes)
    return out


@router.get(
    "/metrics",
    response_class=Response,
    include_in_schema=False,  # not part of the JSON API (the OpenAPI contract); documented in the README
)
async def metrics(request: Request, edge: Edge = Depends(get_edge)) -> Response:
    """The edge's metrics in Prometheus' text format."""
    registry: EdgeMetrics = request.app.state.metrics
    body = registry.scrape(edge_load(edge), await read_lag(request))
    return Response(body, media_type=CONTENT_TYPE)
