"""``GET /lag``: every aisemble consumer group's lag, rate and drain time, as ``aisemble lag --json`` prints it.

The figures come from the edge's ``streams.lag_probe.LagMonitor`` (``app.state.lag``, made in the app's
lifespan), which asks the broker at most once per second however often this route is called (concurrent
calls share one sample). Rates are measured between the monitor's last two samples, so the first call after
start-up has lag but no rates yet (``interval_s`` null).

Access: like ``/metrics`` (operational data): open when ``AISEMBLE_METRICS_REQUIRE_KEY`` is false, else it
needs an API key when keys are configured (``api.app`` wires both). Status 503 with ``{"status":
"unavailable", "error"}`` when the broker cannot be asked (cached for the same second).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse

from api.errors import UnavailableError, error_response
from schemas.http import ErrorBody
from streams.lag import lag_document
from streams.lag_probe import LagMonitor, LagUnavailable

router = APIRouter(tags=["lag"])


@router.get(
    "/lag",
    responses={
        200: {"description": "lag, consumption rate and drain time per group, topic and partition"},
        503: {"model": ErrorBody, "description": "the broker could not be asked for offsets"},
    },
)
async def lag(request: Request) -> ORJSONResponse:
    """The consumer lag of every aisemble group (the scaling signal; see the README's "Consumer lag")."""
    monitor: LagMonitor = request.app.state.lag
    try:
        report = await monitor.read()
    except LagUnavailable as exc:
        return error_response(UnavailableError(f"consumer lag unavailable: {exc}"))
    return ORJSONResponse(lag_document(report, monitor.settings.topic_prefix))
