"""The per-request design, for comparison: FastAPI, one model call per request in the thread pool.

    python bench/alt_per_request.py --service nlp --port 8123

The design the original brief described: no Kafka, no micro-batching; each HTTP request calls the
same runner aisemble's agent uses (``agents.worker.build_runner``, same settings) with
``run_batch([item])`` from Starlette's thread pool. It serves the same paths and bodies as the edge
(``POST /ai/nlp/process``, ``POST /data/process``), so one load driver measures both. ``GET /health``
answers 200 once the model is loaded (503 before). Binds 127.0.0.1 only. A runner failure answers
422 with the failure's code and message; a runner that raises answers 500.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import ORJSONResponse
from starlette.concurrency import run_in_threadpool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.runner import Failure, Item, ModelRunner
from agents.worker import build_runner
from bench.common import base_settings


def make_app(service: str) -> FastAPI:
    """The app for ``service`` (``nlp`` or ``data``); the runner loads in the lifespan."""
    state: dict[str, ModelRunner] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runner = build_runner(service, base_settings())  # type: ignore[arg-type]
        await run_in_threadpool(runner.load)
        state["runner"] = runner
        yield

    app = FastAPI(lifespan=lifespan)

    async def answer(item: Item) -> ORJSONResponse:
        outcome = (await run_in_threadpool(state["runner"].run_batch, [item]))[0]
        if isinstance(outcome, Failure):
            return ORJSONResponse({"ok": False, "error": {"code": outcome.code, "message": outcome.message}}, 422)
        return ORJSONResponse({"ok": True, "output": outcome, "cached": False})

    @app.get("/health")
    async def health() -> ORJSONResponse:
        return ORJSONResponse({"ready": "runner" in state}, 200 if "runner" in state else 503)

    if service == "nlp":

        @app.post("/ai/nlp/process")
        async def nlp(body: dict[str, Any]) -> ORJSONResponse:
            fields = {k: v for k, v in body.items() if k not in ("task", "cache")}
            return await answer(Item(str(body.get("task", "")), fields))

    elif service == "data":

        @app.post("/data/process")
        async def data(body: dict[str, Any]) -> ORJSONResponse:
            return await answer(Item(str(body.get("operation", "")), body.get("data") or {}))

    else:
        raise ValueError(f"unsupported service {service!r}: nlp or data")
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--service", default="nlp", choices=["nlp", "data"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(make_app(args.service), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
