"""The numbers of a replay or a ``produce --collect`` run: latency statistics, output comparison, the report
file, the side-by-side comparison of two reports and the plots. Pure: no Kafka (matplotlib only in
``write_plots``).

Latency, per answered request, in milliseconds (all from wall clocks, so hops that cross hosts include their
clock skew):

* ``end_to_end``: measured by the sender, from handing the event to its producer to reading the reply;
* ``queue``: ``timings_ms.queue_ms``, from the request record's timestamp (set when produced) to the agent
  picking it up;
* ``agent``: ``timings_ms.total_ms``, from pick-up to the reply produced (absent on cache hits);
* ``inference``: ``timings_ms.inference_ms``, the batch's model call (part of ``agent``);
* ``reply``: ``end_to_end - queue - agent`` (at least 0): the reply's way back (broker, fetch) plus the
  request's way to the broker.

Output comparison (a replay whose recording holds replies): per pair of replies with the same original id,
``differ`` counts pairs whose outcome changed (ok vs error, another error code) or whose output changed by
the task's rule: embeddings (``nlp``/``embed``) by cosine distance above ``cosine_tol``; labels
(``nlp``/``sentiment``, ``nlp``/``classify``, ``vision``/``classify``) by a changed label; an LLM completion
sampled with ``temperature > 0`` and no ``seed`` is not compared (``skipped``); every other task by exact
JSON equality.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from streams.stats import percentile

REPORT_VERSION = 1
HOPS = ("end_to_end", "queue", "agent", "inference", "reply")
PLOTS = ("latency_over_time.png", "latency_histogram.png", "batch_sizes.png")


@dataclass(frozen=True, slots=True)
class Sample:
    """One sent request and what came of it."""

    index: int
    id: str
    original_id: str
    scheduled_s: float
    sent_ms: float
    send_error: str | None = None
    received_ms: float | None = None
    reply: dict[str, object] | None = None

    @property
    def end_to_end_ms(self) -> float | None:
        return None if self.received_ms is None else self.received_ms - self.sent_ms


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p95, p99 and max of ``values`` (rounded to 0.001; None when empty)."""

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {
        "count": len(values),
        "mean": r(sum(values) / len(values)) if values else None,
        "p50": r(percentile(values, 50)) if values else None,
        "p95": r(percentile(values, 95)) if values else None,
        "p99": r(percentile(values, 99)) if values else None,
        "max": r(max(values)) if values else None,
    }


def _timing(reply: dict[str, object], name: str) -> float | None:
    timings = reply.get("timings_ms")
    if not isinstance(timings, dict):
        return None
    value = timings.get(name)
    return float(value) if isinstance(value, int | float) else None


def hops(sample: Sample) -> dict[str, float]:
    """The latency hops of one answered sample (see the module docstring); empty when unanswered."""
    e2e, reply = sample.end_to_end_ms, sample.reply
    if e2e is None or reply is None:
        return {}
    out = {"end_to_end": e2e}
    queue, agent, inference = (_timing(reply, n) for n in ("queue_ms", "total_ms", "inference_ms"))
    if queue is not None:
        out["queue"] = queue
    if agent is not None:
        out["agent"] = agent
    if inference is not None:
        out["inference"] = inference
    if queue is not None:
        out["reply"] = max(0.0, e2e - queue - (agent or 0.0))
    return out


# --- output comparison -------------------------------------------------------------------------------

LABEL_TASKS = {("nlp", "sentiment"), ("nlp", "classify"), ("vision", "classify")}


def cosine_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """1 - cosine similarity; 1.0 for vectors of different length or a zero vector."""
    if len(a) != len(b) or not a:
        return 1.0
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    if na == 0 or nb == 0:
        return 1.0
    return 1.0 - dot / (na * nb)


def _items(output: object) -> list[object]:
    """The per-text outputs of an output (``{"results": [...]}`` for ``texts``), else the output itself."""
    if isinstance(output, dict) and isinstance(output.get("results"), list):
        return list(output["results"])
    return [output]


def _labels(output: object) -> list[object]:
    out: list[object] = []
    for item in _items(output):
        if isinstance(item, dict):
            labels = item.get("labels")
            if "label" in item:
                out.append(item["label"])
            elif isinstance(labels, list) and labels and isinstance(labels[0], dict):  # vision classify
                out.append(labels[0].get("label"))
            else:
                out.append(None)
        else:
            out.append(None)
    return out


def _vectors(output: object) -> list[list[float]]:
    return [
        [float(x) for x in item["vector"]]
        for item in _items(output)
        if isinstance(item, dict) and isinstance(item.get("vector"), list)
    ]


def comparison_method(service: str, event: dict[str, object]) -> str:
    """``cosine``, ``label``, ``exact`` or ``skip`` (a sampled LLM completion) for a request event."""
    task = str(event.get("task", ""))
    if (service, task) == ("nlp", "embed"):
        return "cosine"
    if (service, task) in LABEL_TASKS:
        return "label"
    if service == "llm":
        data = event.get("input")
        if isinstance(data, dict):
            temperature = data.get("temperature", 0.7)
            if isinstance(temperature, int | float) and temperature > 0 and data.get("seed") is None:
                return "skip"
    return "exact"


@dataclass(frozen=True, slots=True)
class OutputDiff:
    method: str
    differ: bool
    distance: float | None = None


def compare_outputs(
    service: str, event: dict[str, object], old: dict[str, object], new: dict[str, object], cosine_tol: float = 1e-4
) -> OutputDiff:
    """Whether a replayed reply's outcome differs from the recorded one (see the module docstring)."""
    method = comparison_method(service, event)
    if method == "skip":
        return OutputDiff(method, False)
    if bool(old.get("ok")) != bool(new.get("ok")):
        return OutputDiff(method, True)
    if not old.get("ok"):
        old_error, new_error = old.get("error"), new.get("error")
        old_code = old_error.get("code") if isinstance(old_error, dict) else None
        new_code = new_error.get("code") if isinstance(new_error, dict) else None
        return OutputDiff(method, old_code != new_code)
    a, b = old.get("output"), new.get("output")
    if method == "cosine":
        va, vb = _vectors(a), _vectors(b)
        if len(va) != len(vb) or not va:
            return OutputDiff(method, orjson.dumps(a) != orjson.dumps(b))
        distance = max(cosine_distance(x, y) for x, y in zip(va, vb, strict=True))
        return OutputDiff(method, distance > cosine_tol, distance)
    if method == "label":
        return OutputDiff(method, _labels(a) != _labels(b))
    sort = orjson.OPT_SORT_KEYS
    return OutputDiff(method, orjson.dumps(a, option=sort) != orjson.dumps(b, option=sort))


def output_comparison(
    service: str,
    pairs: Sequence[tuple[dict[str, object], dict[str, object], dict[str, object]]],
    cosine_tol: float = 1e-4,
) -> dict[str, object]:
    """Counts over (event, recorded reply, replayed reply) triples: compared, differ, skipped, per method."""
    diffs = [compare_outputs(service, e, old, new, cosine_tol) for e, old, new in pairs]
    distances = [d.distance for d in diffs if d.distance is not None]
    return {
        "compared": sum(1 for d in diffs if d.method != "skip"),
        "differ": sum(1 for d in diffs if d.differ),
        "skipped": sum(1 for d in diffs if d.method == "skip"),
        "methods": dict(Counter(d.method for d in diffs)),
        "max_cosine_distance": round(max(distances), 6) if distances else None,
        "cosine_tol": cosine_tol,
    }


# --- the report ----------------------------------------------------------------------------------------


def build_report(
    samples: Sequence[Sample],
    *,
    meta: dict[str, object],
    outputs: dict[str, object] | None = None,
) -> dict[str, object]:
    """The report of a run: counts, errors by code, durations, throughput, latency per hop, batch sizes."""
    sent = [s for s in samples if s.send_error is None]
    answered = [s for s in samples if s.reply is not None]
    errors: Counter[str] = Counter()
    for s in answered:
        assert s.reply is not None
        error = s.reply.get("error")
        if not s.reply.get("ok"):
            errors[str(error.get("code")) if isinstance(error, dict) else "unknown"] += 1
    send_errors = Counter(s.send_error for s in samples if s.send_error is not None)
    first_send = min((s.sent_ms for s in sent), default=0.0)
    last_send = max((s.sent_ms for s in sent), default=0.0)
    last_reply = max((s.received_ms for s in answered if s.received_ms is not None), default=first_send)
    duration_s = max(0.0, (last_reply - first_send) / 1000.0)
    send_span_s = (last_send - first_send) / 1000.0
    per_hop: dict[str, list[float]] = {h: [] for h in HOPS}
    for s in answered:
        for name, value in hops(s).items():
            per_hop[name].append(value)
    batch_sizes = [b for s in answered if s.reply is not None and (b := _timing(s.reply, "batch_size")) is not None]
    return {
        "aisemble_replay_report": REPORT_VERSION,
        "created_at_ms": int(time.time() * 1000),
        **meta,
        "count": len(samples),
        "sent": len(sent),
        "send_errors": dict(send_errors),
        "answered": len(answered),
        "unanswered": len(sent) - len(answered),
        "ok": sum(1 for s in answered if s.reply is not None and s.reply.get("ok")),
        "cached": sum(1 for s in answered if s.reply is not None and s.reply.get("cached")),
        "errors": dict(errors),
        "send_span_s": round(send_span_s, 3),
        "duration_s": round(duration_s, 3),
        "send_rate_rps": round(len(sent) / send_span_s, 2) if send_span_s > 0 else None,
        "throughput_rps": round(len(answered) / duration_s, 2) if duration_s > 0 else None,
        "latency_ms": {name: summary(values) for name, values in per_hop.items()},
        "batch_size": summary(batch_sizes),
        "outputs": outputs,
    }


def write_report(directory: Path, report: dict[str, object], samples: Sequence[Sample]) -> list[Path]:
    """``report.json``, ``samples.jsonl`` (one line per request) and the plots in ``directory``; the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    report_path = directory / "report.json"
    report_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    samples_path = directory / "samples.jsonl"
    with samples_path.open("wb") as out:
        for s in samples:
            line = {
                "index": s.index,
                "id": s.id,
                "original_id": s.original_id,
                "scheduled_s": round(s.scheduled_s, 4),
                "sent_ms": round(s.sent_ms, 3),
                "received_ms": None if s.received_ms is None else round(s.received_ms, 3),
                "send_error": s.send_error,
                "ok": None if s.reply is None else s.reply.get("ok"),
                "hops_ms": {k: round(v, 3) for k, v in hops(s).items()},
            }
            out.write(orjson.dumps(line) + b"\n")
    return [report_path, samples_path, *write_plots(directory, samples, str(report.get("title", "")))]


def write_plots(directory: Path, samples: Sequence[Sample], title: str = "") -> list[Path]:
    """Latency over time, a latency histogram and the batch sizes as PNG files (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    answered = [s for s in samples if s.end_to_end_ms is not None and s.reply is not None]
    t0 = min((s.sent_ms for s in samples), default=0.0)
    xs = [(s.sent_ms - t0) / 1000.0 for s in answered]
    e2e = [s.end_to_end_ms or 0.0 for s in answered]
    queue = [hops(s).get("queue", math.nan) for s in answered]
    batches = [b for s in answered if s.reply is not None and (b := _timing(s.reply, "batch_size")) is not None]
    paths = [directory / name for name in PLOTS]

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.scatter(xs, e2e, s=4, alpha=0.6, label="end to end")
    ax.scatter(xs, queue, s=4, alpha=0.6, label="queue (agent)")
    ax.set_xlabel("seconds since first send")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"Latency over time {title}".strip())
    if answered:
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no replies", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if e2e:
        ax.hist(e2e, bins=min(60, max(5, len(e2e) // 20)))
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            value = percentile(e2e, q)
            ax.axvline(value, color="black", linestyle=style, label=f"p{q} {value:.1f} ms")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no replies", ha="center", transform=ax.transAxes)
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"Latency histogram {title}".strip())
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if batches:
        counts = Counter(int(b) for b in batches)
        ax.bar(list(counts), list(counts.values()))
    else:
        ax.text(0.5, 0.5, "no batch sizes (cache hits only?)", ha="center", transform=ax.transAxes)
    ax.set_xlabel("batch size (per answered request)")
    ax.set_ylabel("requests")
    ax.set_title(f"Batch sizes {title}".strip())
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths


# --- comparing two reports -----------------------------------------------------------------------------

COMPARE_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sent", ("sent",)),
    ("answered", ("answered",)),
    ("unanswered", ("unanswered",)),
    ("errors", ("errors",)),
    ("duration s", ("duration_s",)),
    ("throughput rps", ("throughput_rps",)),
    ("e2e p50 ms", ("latency_ms", "end_to_end", "p50")),
    ("e2e p95 ms", ("latency_ms", "end_to_end", "p95")),
    ("e2e p99 ms", ("latency_ms", "end_to_end", "p99")),
    ("e2e max ms", ("latency_ms", "end_to_end", "max")),
    ("queue p50 ms", ("latency_ms", "queue", "p50")),
    ("queue p95 ms", ("latency_ms", "queue", "p95")),
    ("inference p50 ms", ("latency_ms", "inference", "p50")),
    ("reply p50 ms", ("latency_ms", "reply", "p50")),
    ("batch size mean", ("batch_size", "mean")),
    ("outputs differ", ("outputs", "differ")),
)


def _get(report: dict[str, object], path: tuple[str, ...]) -> object:
    value: object = report
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if path == ("errors",) and isinstance(value, dict):
        return sum(v for v in value.values() if isinstance(v, int))
    return value


def compare_rows(a: dict[str, object], b: dict[str, object]) -> list[tuple[str, str, str, str]]:
    """(metric, A, B, B/A) rows for two reports; the ratio is blank where it means nothing."""
    rows = []
    for name, path in COMPARE_ROWS:
        va, vb = _get(a, path), _get(b, path)
        ratio = ""
        if isinstance(va, int | float) and isinstance(vb, int | float) and va:
            ratio = f"{vb / va:.2f}x"
        rows.append((name, _fmt(va), _fmt(vb), ratio))
    return rows


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)
