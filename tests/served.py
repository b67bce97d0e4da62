"""An app served by a real uvicorn on 127.0.0.1 (a free port) inside the test's event loop, for tests that
need real HTTP framing (chunked bodies, SSE) rather than httpx's ASGI transport; stopped on exit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI


@contextlib.asynccontextmanager
async def served(app: FastAPI, timeout_s: float = 10.0) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` served by uvicorn (lifespan off: the test builds the app's state itself)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.02)
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout_s) as client:
            yield client
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
