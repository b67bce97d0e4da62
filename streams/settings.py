"""Process settings, read from ``AISEMBLE_*`` environment variables (pydantic-settings).

Nested per-service settings use a double underscore: ``AISEMBLE_NLP__MAX_BATCH=32``.
``get_settings()`` caches one instance per process; tests build their own ``Settings(...)`` and pass it
down explicitly, so nothing reads the environment behind their back.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import SERVICES, Service


class ServiceSettings(BaseModel):
    """Settings every service has."""

    max_batch: int = Field(default=16, ge=1, le=4096, description="Most events in one micro-batch.")
    max_wait_ms: int = Field(
        default=0, ge=0, le=60_000, description="Linger for more events after the first (0 = never wait)."
    )
    cache_ttl_s: int = Field(default=3600, ge=1, description="TTL of cached results.")
    max_batch_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Cost cap of one micro-batch: the sum of its events' sizes in bytes (None = count only).",
    )
    threads: int | None = Field(
        default=None, ge=1, description="Torch/OpenCV threads; None = library default."
    )
    bulk_lane: bool = Field(
        default=True,
        description=(
            "Serve the bulk lane (``{prefix}.{service}.bulk``) too; False: the agents read only the interactive "
            "request topic and bulk events wait in their topic (served once it is switched back on)."
        ),
    )
    bulk_min_share: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description=(
            "Share of the micro-batch slots kept for bulk events while bulk waits, however much interactive work "
            "waits (bounds bulk's starvation; 0: bulk only gets the slots interactive leaves)."
        ),
    )
    bulk_fill_while_interactive: int = Field(
        default=1,
        ge=0,
        le=4096,
        description=(
            "Most bulk events a micro-batch carries beyond bulk's min share while interactive traffic is live "
            "(seen within the last second): keeps batches short so interactive latency stays near idle; with no "
            "interactive traffic bulk batches are full (max_batch)."
        ),
    )
    bulk_yield_while_interactive: float = Field(
        default=1.0,
        ge=0.0,
        le=10.0,
        description=(
            "While interactive traffic is live and only bulk waits, the batch loop waits this many times its last "
            "batch's duration (at most 100 ms) before a bulk-only batch, and takes an interactive event the moment "
            "one arrives: bulk leaves the CPU to the edge and an interactive request seldom finds a bulk batch "
            "running. 0: never (the LLM's continuous loop never waits)."
        ),
    )


class DataSettings(ServiceSettings):
    max_records: int = Field(default=200_000, ge=1)
    max_fields: int = Field(default=2_000, ge=1, description="Distinct field names per analyze request.")
    max_cells: int = Field(default=1_000_000, ge=1, description="Field occurrences (all records) per request.")


class NlpSettings(ServiceSettings):
    # 64: the encoder's best batch for short texts (9-15 words: 291 items/s at 64 vs 225 at 32 in one quiet run);
    # long texts lose nothing, the runner cuts a micro-batch into passes of at most 8,192 padded tokens.
    max_batch: int = 64
    embed_model: str = Field(
        default="", description="HF model name or path; empty = shipped all-MiniLM-L6-v2."
    )
    sentiment_model: str = Field(
        default="",
        description="HF text-classification model name or path; empty = the built-in head trained on the embeddings.",
    )


class LlmSettings(ServiceSettings):
    max_batch: int = 8
    runtime: Literal["auto", "llama_cpp", "torch"] = Field(
        default="auto",
        description=(
            "auto: llama_cpp for a GGUF file (the shipped default or a configured .gguf) on CPU, torch for a "
            "Hugging Face checkpoint or a CUDA device; llama_cpp: llama-cpp-python (GGUF only); torch: transformers."
        ),
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads of the model; None: torch's default, for llama.cpp the usable cores - 1 (1 to 8).",
    )
    model: str = Field(
        default="", description="HF causal LM name or path; empty = shipped SmolLM2-135M-Instruct."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    compile: bool = Field(default=False, description="torch.compile the model (slow start, faster steps).")
    max_prompt_tokens: int = Field(default=1024, ge=16)
    chat_template: bool = Field(default=True, description="Wrap prompts in the model's chat template.")
    batching: Literal["continuous", "static"] = Field(
        default="continuous",
        description=(
            "continuous: rows join and leave between decode steps (agents.llm_engine); "
            "static: one generate per group."
        ),
    )
    max_prefill_tokens: int = Field(
        default=512,
        ge=16,
        description="Prompt tokens prefilled per decode step (continuous batching); longer ones are chunked.",
    )
    prompt_cache_mb: int = Field(
        default=256,
        ge=0,
        description=(
            "llama.cpp runtime: memory for the KV cells of finished rows, kept by their tokens (least recently "
            "used first out) so a later prompt that shares a prefix with one prefills only the rest; 0: off."
        ),
    )
    stream_interval: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Streaming: a row's first token is sent at once, then its text is sent every this many tokens (the "
            "final reply carries the rest). Fewer partial records wake the agent's event loop, the broker and the "
            "edge less often, which matters when the decode threads have every core; 1: every token."
        ),
    )


class VisionSettings(ServiceSettings):
    max_batch: int = 16
    max_batch_bytes: int | None = 4 * 1024 * 1024  # inline images: a batch holds at most ~4 MiB of them
    classify_model: str = Field(default="", description="HF image-classification model; empty = none.")
    max_pixels: int = Field(default=40_000_000, ge=1, description="Decoded images and outputs above this are refused.")
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024, description="HTTP body limit for images."
    )
    inline_max_bytes: int = Field(default=512 * 1024, ge=1024, description="Larger images go by claim check.")
    claim_ttl_s: int = Field(default=600, ge=1)


class BatchSettings(BaseModel):
    """The Batch API (``api.batches``, ``api.batch_runner``): ``AISEMBLE_BATCH__<NAME>``."""

    runner: bool = Field(default=True, description="This edge runs batches (joins the batch runners' group).")
    max_file_bytes: int = Field(
        default=100 * 1024 * 1024,
        ge=1024,
        description="Largest file POST /v1/files takes (its body limit is this, capped at max_in_flight_bytes).",
    )
    max_lines: int = Field(default=50_000, ge=1, description="Most requests (non-blank lines) in one input file.")
    max_in_flight_lines: int = Field(
        default=256, ge=1, description="Lines of one batch produced and not yet answered, at most."
    )
    line_timeout_s: float = Field(
        default=600.0, gt=0, description="A line unanswered this long is produced again (same request id)."
    )
    line_attempts: int = Field(
        default=3, ge=1, description="Times a line is produced before it is answered with a timeout error."
    )
    cancel_grace_s: float = Field(
        default=30.0, ge=0, description="After a cancel, how long the lines in flight may still be answered."
    )
    progress_interval_s: float = Field(
        default=1.0, gt=0, description="How often a running batch's request_counts are written."
    )
    driver_attempts: int = Field(
        default=5, ge=1, description="Times a batch's runner is restarted after an error before the batch fails."
    )


class ApiKey(BaseModel):
    """One entry of ``AISEMBLE_API_KEYS``: a key and, optionally, its quotas (``api.quota_gate``).

    A plain string entry is ``ApiKey(key=...)``: no limits, every service. ``name`` labels the key in metrics,
    logs and the status page (never the key itself); default ``key-<index>``, unique across entries. ``rpm``:
    requests per minute; ``tpm``: LLM tokens per minute (prompt estimate + ``max_tokens`` at admission,
    corrected by the reply's usage); ``max_in_flight``: concurrent requests across edges; ``services``: the
    services the key may use (None: all). Validation errors name the entry's index, never its key
    (``hide_input_in_errors``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    key: SecretStr
    name: str = Field(default="", max_length=64, pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._-]*$")
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute (None: unlimited).")
    tpm: int | None = Field(default=None, ge=1, description="LLM tokens per minute (None: unlimited).")
    max_in_flight: int | None = Field(default=None, ge=1, description="Concurrent requests (None: unlimited).")
    services: tuple[Service, ...] | None = Field(default=None, description="Services allowed (None: all).")

    @property
    def limited(self) -> bool:
        """Whether any quota applies to this key (a plain-string key has none: the edge never asks Redis)."""
        return self.rpm is not None or self.tpm is not None or self.max_in_flight is not None

    def allows(self, service: str) -> bool:
        return self.services is None or service in self.services

    def get_secret_value(self) -> str:
        """The key itself, as ``SecretStr.get_secret_value`` (what a plain-string entry was before)."""
        return self.key.get_secret_value()


TRACE_ID_FIELD = "{trace_id}"


def check_trace_url_template(template: str) -> str:
    """``template`` when it is an absolute http(s) URL holding ``{trace_id}`` and no other placeholder, no
    whitespace or control character (``AISEMBLE_TRACE_URL_TEMPLATE``); a ``ValueError`` naming the rule otherwise.
    The page only ever gets the URL with a trace id (32 hex digits) put in, never a script (``javascript:``)."""
    if TRACE_ID_FIELD not in template:
        raise ValueError(f"the trace URL template must hold {TRACE_ID_FIELD}")
    rest = template.replace(TRACE_ID_FIELD, "")
    if "{" in rest or "}" in rest:
        raise ValueError(f"the trace URL template may hold no placeholder but {TRACE_ID_FIELD}")
    if any(c.isspace() or not c.isprintable() for c in template):
        raise ValueError("the trace URL template may hold no whitespace or control character")
    parts = urlsplit(template.replace(TRACE_ID_FIELD, "0" * 32))
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError("the trace URL template must be an absolute http:// or https:// URL")
    return template


class Settings(BaseSettings):
    """Everything a process of aisemble needs to know; one instance per process."""

    # hide_input_in_errors: a validation error never echoes a value (an API key, a password), only where it is.
    model_config = SettingsConfigDict(
        env_prefix="AISEMBLE_", env_nested_delimiter="__", extra="ignore", hide_input_in_errors=True
    )

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    topic_prefix: str = Field(default="aisemble", pattern=r"^[a-zA-Z0-9_-][a-zA-Z0-9._-]*$")
    partitions: int = Field(default=4, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1)
    edge_host: str = "127.0.0.1"
    edge_port: int = 8080
    edge_id: str = Field(default_factory=lambda: socket.gethostname().replace(".", "-"))
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    sse_keepalive_s: float = Field(
        default=15.0, gt=0, description="A streamed answer sends an SSE comment after this long without an event."
    )
    max_event_bytes: int = Field(default=1024 * 1024, ge=1024, description="Producer max_request_size.")
    session_timeout_s: float = Field(
        default=10.0, ge=6.0, description="Kafka group session timeout: how soon a dead agent's partitions move."
    )
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_ttl_s: float = Field(default=10.0, gt=0)
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "aisemble")
    log_level: str = "INFO"
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto",
        description="The event loop of the edge and the agents: uvloop (libuv, in C) or asyncio's own; auto = "
        "uvloop where it is installed (uvicorn[standard] brings it on Linux and macOS). Each Kafka hop, HTTP "
        "request and thread hand-over goes through it: uvloop cut a 1-client light request's round trip by 15-20%.",
    )
    services: list[Service] = Field(
        default_factory=lambda: list(SERVICES), description="Services this deployment runs (health, run)."
    )

    # Reliability: shutdown, retries, overload, outages (issue 6).
    shutdown_grace_s: float = Field(
        default=20.0, ge=0, description="SIGTERM: finish the batch in hand within this, else exit uncommitted."
    )
    delivery_retry_s: float = Field(
        default=60.0, gt=0, description="Retry a retriable send failure this long, then exit (redelivered)."
    )
    max_in_flight: int = Field(default=1000, ge=1, description="Requests the edge holds at once; past it 429.")
    produce_timeout_s: float = Field(
        default=1.0, gt=0, description="How long the edge waits for Kafka to take a request before 503."
    )
    redis_timeout_s: float = Field(default=0.5, gt=0, description="Socket timeout of every Redis call.")
    redis_breaker_failures: int = Field(default=3, ge=1, description="Redis failures in a row that open the breaker.")
    redis_breaker_reset_s: float = Field(default=5.0, gt=0, description="How long an open breaker skips Redis.")
    async_result_ttl_s: int = Field(
        default=3600, ge=1, description="How long GET /requests/{id} keeps an asynchronous request's result."
    )
    max_pending_async_per_key: int = Field(
        default=100, ge=1, description="Asynchronous requests one API key may have pending at an edge; past it 429."
    )
    max_in_flight_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="Request body bytes the edge holds at once (uploads above all); past it 429. At least the "
        "largest body limit (max_body_bytes, vision.max_upload_bytes).",
    )
    async_deadline_s: float = Field(
        default=600.0,
        gt=0,
        description="How long an asynchronous request may take: its deadline at the agent (GET answers 504 after).",
    )
    deadline_margin_ms: int = Field(
        default=500,
        ge=0,
        description=(
            "The agent's deadline is the edge's wait less this margin (at most 10% of the wait), so work "
            "that finishes in time reaches the edge before its 504."
        ),
    )

    # The edge's Kafka clients (issue 15): latency at low load without losing batching under load.
    edge_linger_ms: int = Field(
        default=1,
        ge=0,
        le=1000,
        description=(
            "The edge producer's linger while one of its requests is already in flight (a burst is batched); "
            "a request produced while none is in flight is sent at once. 0: never linger."
        ),
    )
    edge_fetch_max_wait_ms: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description=(
            "How long the edge's reply consumer lets the broker hold a fetch that has no data (fetch_min_bytes "
            "is 1: a reply ends the wait at once). Longer: fewer empty fetches while idle, no added latency."
        ),
    )

    # The status page (issue 17): a short history for its charts, the slowest recent requests, trace links.
    status_history_interval_s: float = Field(
        default=5.0,
        ge=0.5,
        le=300.0,
        description="How often the edge samples /status.json's figures for /status/history.json.",
    )
    status_history_window_s: float = Field(
        default=900.0, ge=60.0, le=86_400.0, description="How far back the history and the slowest requests reach."
    )
    status_slow_requests: int = Field(
        default=20, ge=1, le=1000, description="How many of the slowest recent requests the edge keeps and shows."
    )
    trace_url_template: str | None = Field(
        default=None,
        description="An http(s) URL with {trace_id} (e.g. http://127.0.0.1:16686/trace/{trace_id}): the status "
        "page links each slow request's trace id there. None: trace ids are shown without a link.",
    )

    # Security (issue 7): where agents may write, who the edge answers, a secured Kafka.
    reply_to_allow: list[str] = Field(
        default_factory=lambda: ["{prefix}.replies.*", "{prefix}.edge.*.replies"],
        description="Globs a request's reply_to must match ({prefix} = topic_prefix); others are dead-lettered.",
    )
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="When set, every service route needs one of these (X-API-Key or Bearer): a key string, or an "
        'object {"key", "name", "rpm", "tpm", "max_in_flight", "services"} with its quotas (ApiKey).',
    )
    metrics_require_key: bool = Field(default=True, description="Whether /metrics needs an API key too.")
    agent_metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Agent metrics port (None = off, 0 = a free one); `aisemble run` gives its agents port, port+1...",
    )  # fmt: skip
    agent_metrics_host: str = Field(default="127.0.0.1", description="Where agents serve their metrics.")
    allow_insecure: bool = Field(
        default=False, description="Let the edge listen on a non-loopback address without API keys."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle that signed the brokers' certificates.")
    kafka_ssl_certfile: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    kafka_ssl_keyfile: Path | None = Field(default=None, description="Client private key (mutual TLS).")
    kafka_ssl_key_password: SecretStr | None = None

    data: DataSettings = DataSettings()
    nlp: NlpSettings = NlpSettings()
    llm: LlmSettings = LlmSettings()
    vision: VisionSettings = VisionSettings()
    batch: BatchSettings = BatchSettings()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_as_entries(cls, value: object) -> object:
        """A string (or ``SecretStr``) entry is a key without limits; each entry gets its default name."""
        if not isinstance(value, list | tuple):
            return value
        entries: list[object] = []
        for index, entry in enumerate(value):
            if isinstance(entry, str | SecretStr):
                entry = {"key": entry}
            if isinstance(entry, dict) and not entry.get("name"):
                entry = {**entry, "name": f"key-{index}"}
            elif isinstance(entry, ApiKey) and not entry.name:
                entry = entry.model_copy(update={"name": f"key-{index}"})
            entries.append(entry)
        return entries

    @field_validator("trace_url_template")
    @classmethod
    def _trace_url_template_is_http(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else check_trace_url_template(value.strip())

    @model_validator(mode="after")
    def _key_names_are_unique(self) -> Settings:
        seen: dict[str, int] = {}
        for index, entry in enumerate(self.api_keys):
            if entry.name in seen:
                raise ValueError(
                    f"AISEMBLE_API_KEYS[{index}]: the name {entry.name!r} is the name of entry {seen[entry.name]} "
                    "already (names label metrics and must be unique)"
                )
            seen[entry.name] = index
        return self

    @model_validator(mode="after")
    def _one_upload_fits_the_byte_budget(self) -> Settings:
        largest = max(self.max_body_bytes, self.vision.max_upload_bytes)
        if self.max_in_flight_bytes < largest:
            raise ValueError(
                f"max_in_flight_bytes ({self.max_in_flight_bytes}) must be at least the largest body limit "
                f"({largest}): a body that size could never be admitted"
            )
        return self

    def service(self, name: Service) -> ServiceSettings:
        """The settings of one service."""
        settings: ServiceSettings = getattr(self, name)
        return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
