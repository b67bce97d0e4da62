"""``aisemble batch submit|status|results``: the Batch API from the command line (HTTP to an edge).

``submit FILE.jsonl --endpoint /v1/embeddings [--wait]`` uploads the file (``POST /v1/files``), creates the
batch (``POST /v1/batches``) and prints its id on stdout; with ``--wait`` it shows a progress bar (rich, on
stderr: completed + failed of total) until the batch ends, then prints the batch, exiting 0 when it
completed and 1 otherwise. ``status ID`` prints the batch as JSON. ``results ID`` prints the output file's
lines (``--errors``: the error file's) on stdout, or writes them to ``--out``.

What can go wrong: an edge that answers an error: its message on stderr and exit 1 (2 for a missing file).
The key is ``--api-key``, else the first of ``AISEMBLE_API_KEYS``; the edge ``--url``, else
``http://AISEMBLE_EDGE_HOST:AISEMBLE_EDGE_PORT``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from aisemble.monitor import default_url
from schemas.http import API_KEY_HEADER
from streams.settings import get_settings

app = typer.Typer(no_args_is_help=True, help="The OpenAI Batch API of an edge: submit, status, results.")

TERMINAL = ("completed", "failed", "expired", "cancelled")
POLL_S = 0.5

Url = Annotated[str | None, typer.Option(help="The edge (default http://AISEMBLE_EDGE_HOST:AISEMBLE_EDGE_PORT).")]
Key = Annotated[str | None, typer.Option(help="Sent as X-API-Key (default: the first of AISEMBLE_API_KEYS).")]


def _client(url: str | None, api_key: str | None) -> httpx.Client:
    settings = get_settings()
    key = api_key or (settings.api_keys[0].get_secret_value() if settings.api_keys else None)
    headers = {API_KEY_HEADER: key} if key else {}
    return httpx.Client(base_url=url or default_url(settings), headers=headers, timeout=60)


def _ok(response: httpx.Response) -> dict[str, object]:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        typer.echo(f"aisemble batch: {response.status_code} {message}", err=True)
        raise typer.Exit(1)
    body: dict[str, object] = response.json()
    return body


def _counts(batch: dict[str, object]) -> tuple[int, int]:
    counts = batch.get("request_counts")
    if not isinstance(counts, dict):
        return 0, 0
    return int(counts.get("completed", 0)) + int(counts.get("failed", 0)), int(counts.get("total", 0))


def wait(client: httpx.Client, batch_id: str, quiet: bool = False) -> dict[str, object]:
    """Poll the batch until it ends, with a progress bar on stderr (none when ``quiet``)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=quiet,
    ) as progress:  # fmt: skip
        task = progress.add_task(batch_id, total=None)
        while True:
            batch = _ok(client.get(f"/v1/batches/{batch_id}"))
            done, total = _counts(batch)
            progress.update(task, completed=done, total=total or None, description=f"{batch_id} {batch['status']}")
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(POLL_S)


@app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(help="A JSONL file of requests ({custom_id, method, url, body} a line).")],
    endpoint: Annotated[str, typer.Option(help="/v1/embeddings, /v1/chat/completions or /v1/completions.")],
    wait_: Annotated[
        bool, typer.Option("--wait", help="Show progress until the batch ends; exit 1 unless completed.")
    ] = False,
    url: Url = None,
    api_key: Key = None,
) -> None:
    """Upload FILE and start a batch on it; prints the batch id (and with --wait, the finished batch)."""
    if not file.is_file():
        typer.echo(f"aisemble batch: no such file {file}", err=True)
        raise typer.Exit(2)
    with _client(url, api_key) as client:
        with file.open("rb") as handle:
            uploaded = _ok(client.post("/v1/files", files={"file": (file.name, handle)}, data={"purpose": "batch"}))
        body = {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h"}
        batch = _ok(client.post("/v1/batches", json=body))
        typer.echo(str(batch["id"]))
        if not wait_:
            return
        batch = wait(client, str(batch["id"]))
    typer.echo(json.dumps(batch, indent=2))
    raise typer.Exit(0 if batch["status"] == "completed" else 1)


@app.command("status")
def status(batch_id: str, url: Url = None, api_key: Key = None) -> None:
    """Print the batch (OpenAI's Batch object) as JSON."""
    with _client(url, api_key) as client:
        typer.echo(json.dumps(_ok(client.get(f"/v1/batches/{batch_id}")), indent=2))


@app.command("results")
def results(
    batch_id: str,
    errors: Annotated[bool, typer.Option("--errors", help="The error file instead of the output file.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the lines here instead of stdout.")] = None,
    url: Url = None,
    api_key: Key = None,
) -> None:
    """Print the batch's output lines (or its error lines); nothing when it has none."""
    with _client(url, api_key) as client:
        batch = _ok(client.get(f"/v1/batches/{batch_id}"))
        file_id = batch["error_file_id" if errors else "output_file_id"]
        if file_id is None:
            typer.echo(f"aisemble batch: {batch_id} ({batch['status']}) has no {'error' if errors else 'output'} file",
                       err=True)  # fmt: skip
            return
        response = client.get(f"/v1/files/{file_id}/content")
        if response.status_code >= 400:
            _ok(response)
    if out is not None:
        out.write_bytes(response.content)
    else:
        typer.echo(response.text, nl=False)
