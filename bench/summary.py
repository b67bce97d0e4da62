"""SUMMARY.md from the suite's result: the tables, then each target with the figure reached and met / not met.

``summary_md(result)`` reads the dict ``bench/suite.py`` writes to suite.json. A section that failed or was
skipped shows as such (``failed: ...`` / ``skipped: ...``) and its targets as "no figure", never as met.
Every ratio is between figures of the same run.
"""

from __future__ import annotations

import math
from typing import Any

from bench.aiperf_llm import suite_rows as aiperf_rows
from bench.lanes import target_rows as lanes_targets
from bench.llm_serve import summary_rows as llm_serve_rows
from bench.llm_server import summary_rows as llm_server_rows
from bench.llm_server import target_rows as llm_server_targets
from bench.profiling import summary_md as profile_md
from bench.tracing_cost import summary_rows as tracing_cost_rows

RSS_TARGET_MB = 3e9 / 2**20  # 3 GB (decimal) in MiB, as VmHWM is reported


def get(d: Any, *keys: Any) -> Any:
    """``d[k1][k2]...`` or None where any step is missing (a failed or skipped section)."""
    for k in keys:
        in_list = isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d)
        if (isinstance(d, dict) and k in d) or in_list:
            d = d[k]
        else:
            return None
    return d


def f1(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.1f}" if isinstance(x, int | float) else str(x)


def one_line(text: str, head: int = 120, tail: int = 300) -> str:
    """``text`` on one line, its start and its end (a traceback's last line says what failed)."""
    flat = " ".join(str(text).split()).replace("|", "/")
    return flat if len(flat) <= head + tail else f"{flat[:head]} … {flat[-tail:]}"


def why(section: Any) -> str | None:
    """'failed: ...' / 'skipped: ...' (one line) for a section that has no figures, else None."""
    if isinstance(section, dict):
        for k in ("failed", "skipped"):
            if k in section:
                return f"{k}: {one_line(section[k])}"
    return None if section is not None else "not run"


def point(points: Any, clients: int) -> dict[str, Any] | None:
    if isinstance(points, dict):
        points = points.get("points")
    if not isinstance(points, list):
        return None
    return next((p for p in points if p.get("clients") == clients), None)


def model_rows(result: dict[str, Any]) -> list[str]:
    lines = [
        "## 1. The model's own limit (runner called in-process, default models)",
        "",
        "| service | task | model | batch 1 items/s | best batch | items/s | gain | tokens/s (b1 → best) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    limits = result.get("model_limit") or {}
    if reason := why(limits) if "failed" in limits else None:
        return [*lines, f"| {reason} |||||||| ", ""]
    for service, per in limits.items():
        if reason := why(per) if isinstance(per, dict) and ("failed" in per or "skipped" in per) else None:
            lines.append(f"| {service} | {reason} |||||||")
            continue
        for task, t in per.items():
            if task in ("load_s", "model") or not isinstance(t, dict):
                continue
            b1, best = t.get("batch_1", {}), t.get("best", {})
            gain = best["items_per_s"] / b1["items_per_s"] if b1.get("items_per_s") else None
            tok = f"{f1(b1.get('tokens_per_s'))} → {f1(best.get('tokens_per_s'))}" if "tokens_per_s" in b1 else ""
            lines.append(
                f"| {service} | {task} | {get(per, 'model', task) or ''} | {f1(b1.get('items_per_s'))} | "
                f"{best.get('batch')} | {f1(best.get('items_per_s'))} | {f1(gain)}x | {tok} |"
            )
    return [*lines, ""]


def floor_rows(result: dict[str, Any]) -> list[str]:
    floor: dict[str, Any] = result.get("floor") or {}
    lines = ["## 2. Pipeline floor (no-op runner: edge → Kafka → agent → Kafka → edge)", ""]
    if reason := why(floor) if "open_loop" not in floor else None:
        return [*lines, reason, ""]
    lines += [
        "| load | items/s | p50 ms | p99 ms | err | http p50 | to agent p50 | agent p50 | back p50 | shares of mean "
        "(http/to agent/agent/back) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, key in (
        (f"open loop {f1(get(floor, 'open_loop', 'rate_per_s'))}/s", "open_loop"),
        (f"saturation, {get(floor, 'saturation', 'clients')} clients", "saturation"),
    ):
        p = floor.get(key) or {}
        hops = p.get("hops_p50_ms") or {}
        shares = p.get("hop_share_of_mean") or {}
        lines.append(
            f"| {label} | {f1(p.get('items_per_s'))} | {f1(get(p, 'latency_ms', 'p50'))} | "
            f"{f1(get(p, 'latency_ms', 'p99'))} | {p.get('errors')} | "
            + " | ".join(f1(hops.get(h)) for h in ("http", "to_agent", "agent", "back"))
            + " | "
            + " / ".join(f"{shares.get(h, 0):.0%}" for h in ("http", "to_agent", "agent", "back"))
            + " |"
        )
    bare = floor.get("bare_kafka") or {}
    lines += [
        "",
        f"Bare aiokafka produce → consume round trip on the same broker ({bare.get('round_trips')} sequential): "
        f"p50 {f1(get(bare, 'latency_ms', 'p50'))} ms, p99 {f1(get(bare, 'latency_ms', 'p99'))} ms. "
        "Hops: http = client round trip - edge_ms; to agent = queue_ms; agent = total_ms; "
        "back = edge_ms - queue_ms - total_ms.",
        "",
    ]
    return lines


def side_by_side(result: dict[str, Any], clients: list[int]) -> list[str]:
    rest = result.get("rest") or {}
    kd = get(result, "kafka_direct", "embed") or {}
    lines = [
        "## 3/4. nlp `embed`, cache off: aisemble REST, Kafka-direct, per-request, Ray Serve (same run)",
        "",
        "| design | clients | items/s | p50 ms | p99 ms | aisemble REST items/s ÷ this |",
        "|---|---|---|---|---|---|",
    ]
    for n in clients:
        ours = get(point(rest.get("aisemble"), n), "items_per_s")
        for key, label in (("aisemble", "aisemble REST"), ("per_request", "per-request"), ("ray_serve", "Ray Serve")):
            p = point(rest.get(key), n)
            if p is None:
                reason = why(rest.get(key)) if isinstance(rest.get(key), dict) else None
                lines.append(f"| {label} | {n} | {one_line(reason, 60, 60) if reason else '—'} | | | |")
                continue
            theirs = p.get("items_per_s")
            ratio = "" if key == "aisemble" else f"{ours / theirs:.2f}x" if ours and theirs else "—"
            lines.append(
                f"| {label} | {n} | {f1(theirs)} | {f1(get(p, 'latency_ms', 'p50'))} | "
                f"{f1(get(p, 'latency_ms', 'p99'))} | {ratio} |"
            )
    if kd.get("requests"):
        lines.append(
            f"| Kafka-direct, no edge | {kd['requests']} at once | {f1(kd.get('items_per_s'))} | "
            f"{f1(get(kd, 'reply_ms', 'p50'))} | {f1(get(kd, 'reply_ms', 'p99'))} | |"
        )
    else:
        lines.append(f"| Kafka-direct, no edge | — | {why(kd) or '—'} | | | |")
    lines += [
        "",
        "Latency is the client's round trip; for Kafka-direct, each reply's arrival after the first send (all "
        f"sent at once; agent queue_ms p50 {f1(get(kd, 'queue_ms', 'p50'))}, mean batch {kd.get('batch_size_mean')}).",
    ]
    for key, label in (("per_request", "per-request"), ("ray_serve", "Ray Serve")):
        if reason := why(rest.get(key)) if isinstance(rest.get(key), dict) and "points" not in rest[key] else None:
            lines.append(f"{label}: {reason}.")
    cleanup = get(rest, "ray_serve", "cleanup")
    if cleanup is not None:
        lines.append(
            f"Ray Serve stopped: {cleanup.get('processes_seen')} Ray processes seen, leftovers killed: "
            f"{cleanup.get('leftover_killed') or 'none'}."
        )
    return [*lines, ""]


def services_rows(result: dict[str, Any]) -> list[str]:
    rest = result.get("rest") or {}
    lines = [
        "## 3. Other services through the REST edge (cache off)",
        "",
        "| service (task) | clients | items/s | p50 ms | p99 ms | err |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (
        ("aisemble_sentiment", "nlp (sentiment)"),
        ("aisemble_llm", "llm (completion, greedy)"),
        ("aisemble_vision", "vision (mix)"),
    ):
        points = rest.get(key)
        if not isinstance(points, list):
            lines.append(f"| {label} | {why(points)} |||||")
            continue
        for p in points:
            lines.append(
                f"| {label} | {p['clients']} | {f1(p['items_per_s'])} | {f1(get(p, 'latency_ms', 'p50'))} | "
                f"{f1(get(p, 'latency_ms', 'p99'))} | {p['errors']} |"
            )
    return [*lines, ""]


def direct_ratios(result: dict[str, Any]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(label, Kafka-direct rate, model best-batch rate, ratio) for embed (reviews and short texts), sentiment and
    llm tokens/s."""
    rows: list[tuple[str, float | None, float | None, float | None]] = []
    for label, task, service, key in (
        ("nlp embed items/s", "embed", "nlp", "items_per_s"),
        ("nlp embed, short texts, items/s", "embed_short", "nlp", "items_per_s"),
        ("nlp sentiment items/s", "sentiment", "nlp", "items_per_s"),
        ("llm tokens/s", "completion", "llm", "tokens_per_s"),
    ):
        ours = get(result, "kafka_direct", task, key)
        model = get(result, "model_limit", service, task, "best", key)
        rows.append((label, ours, model, ours / model if ours and model else None))
    return rows


def direct_rows(result: dict[str, Any]) -> list[str]:
    lines = [
        "## 3. Kafka-direct at the agent's maximum rate vs the model's own best batch",
        "",
        "| what | Kafka-direct | model best batch | ratio | answered / sent | mean batch |",
        "|---|---|---|---|---|---|",
    ]
    for (label, ours, model, ratio), task in zip(
        direct_ratios(result), ("embed", "embed_short", "sentiment", "completion"), strict=True
    ):
        kd = get(result, "kafka_direct", task) or {}
        lines.append(
            f"| {label} | {f1(ours)} | {f1(model)} | {f1(ratio) + 'x' if ratio else why(kd) or '—'} | "
            f"{kd.get('answered_ok')} / {kd.get('requests')} | {kd.get('batch_size_mean')} |"
        )
    return [*lines, ""]


def fairness_rows(result: dict[str, Any]) -> list[str]:
    fair = result.get("fairness") or {}
    lines = [f"## 7. Fairness: queue_ms per partition (REST embed, {fair.get('clients')} clients)", ""]
    if reason := why(fair) if "queue_ms_per_partition" not in fair else None:
        return [*lines, reason, ""]
    lines += ["| partition | requests | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    for p, s in fair["queue_ms_per_partition"].items():
        lines.append(f"| {p} | {s['n']} | {f1(s['p50'])} | {f1(s['p99'])} | {f1(s['max'])} |")
    lines += [
        "",
        f"Overall queue_ms p99/p50 {fair.get('queue_p99_over_p50')}; round trip p50 "
        f"{f1(get(fair, 'round_trip_ms', 'p50'))} ms, p99 {f1(get(fair, 'round_trip_ms', 'p99'))} ms "
        f"(p99/p50 {fair.get('round_trip_p99_over_p50')}), {f1(fair.get('items_per_s'))} items/s.",
        "",
    ]
    return lines


def llm_rows(result: dict[str, Any]) -> list[str]:
    st = result.get("llm_streaming") or {}
    lines = ["## 9. LLM streaming (SSE, POST /ai/llm/completion with stream: true)", ""]
    if reason := why(st) if "ttft_ms" not in st else None:
        lines.append(reason)
    else:
        lines.append(
            f"{st['ok']} of {st['streams']} concurrent streams ({st['max_tokens']} tokens max, greedy): time to first "
            f"token p50 {f1(get(st, 'ttft_ms', 'p50'))} ms / max {f1(get(st, 'ttft_ms', 'max'))} ms; tokens/s per "
            f"stream p50 {f1(get(st, 'tokens_per_s_per_stream', 'p50'))} (decode after the first token p50 "
            f"{f1(get(st, 'decode_tokens_per_s_per_stream', 'p50'))}, streams with 2+ text events only); "
            f"{st['text_events_mean']} text events per stream."
        )
        if st.get("problems"):
            lines.append(f"Failed streams ({st.get('failed')}): {one_line('; '.join(st['problems']))}")
        if st.get("not_streamed"):
            lines.append(f"**{st['not_streamed']} of {st['ok']} streams were not streamed**: {st['notes'][0]}.")
    cont = result.get("llm_continuous") or {}
    lines += ["", "LLM continuous vs static batching (`bench/llm_continuous.py --quick`, in-process, open loop):", ""]
    modes = cont.get("modes")
    if not isinstance(modes, dict):
        lines.append(why(cont) or "no figures")
    else:
        lines += [
            f"Workload: {cont.get('workload')}; model {cont.get('model')} on {cont.get('device')}.",
            "",
            "| mode | tokens/s | latency p50 ms | p99 | TTFT p50 ms | p99 | model calls | failures |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mode, m in modes.items():
            lines.append(
                f"| {mode} | {f1(m.get('tokens_per_s'))} | {f1(get(m, 'latency_ms', 'p50'))} | "
                f"{f1(get(m, 'latency_ms', 'p99'))} | {f1(get(m, 'ttft_ms', 'p50'))} | "
                f"{f1(get(m, 'ttft_ms', 'p99'))} | {m.get('model_calls')} | {m.get('failures')} |"
            )
    return [*lines, ""]


def cache_scale_rows(result: dict[str, Any]) -> list[str]:
    cache = result.get("cache") or {}
    scale = result.get("scale") or {}
    rss = result.get("peak_rss_mb") or {}
    four = result.get("four_services") or {}
    lines = ["## 5/6. Cache, scale, memory", ""]
    if "hit" in cache:
        hit, rep = cache["hit"], cache.get("repeats_30pct") or {}
        lines.append(
            f"Cache hit, sequential, {hit['requests']} requests ({hit['hits']} hits): "
            f"p50 {f1(get(hit, 'latency_ms', 'p50'))} ms, p99 {f1(get(hit, 'latency_ms', 'p99'))} ms. "
            f"{rep.get('clients')} clients, 30% repeats, cache on: "
            f"{f1(rep.get('items_per_s'))} items/s, {rep.get('cached')} hits."
        )
    else:
        lines.append(f"Cache: {why(cache)}")
    if "requests" in scale:
        lines.append(
            f"{scale['requests']} data `analyze` requests in flight at once: {scale['answered_200']} answered 200, "
            f"{scale['errors']} errors, all in {scale['seconds']} s, p50 {f1(get(scale, 'latency_ms', 'p50'))} ms, "
            f"p99 {f1(get(scale, 'latency_ms', 'p99'))} ms."
        )
    lines += [
        "",
        "Peak RSS (VmHWM, MiB): " + ", ".join(f"{k} {v}" for k, v in rss.items()) + ".",
        f"Four services with their default models, started together: agents' peak RSS sum "
        f"{f1(four.get('agents_peak_rss_mb_sum'))} MiB ({f1(four.get('with_edge_mb'))} MiB with the edge), "
        "Kafka and Redis aside.",
        "",
    ]
    return lines


def verdict(ok: bool | None) -> str:
    return "no figure" if ok is None else "**met**" if ok else "**not met**"


def targets(result: dict[str, Any], top: int) -> list[str]:
    rows: list[tuple[str, str, bool | None]] = []
    for label, d_rate, m_rate, ratio in direct_ratios(result):
        met = None if ratio is None else ratio >= 0.85
        rows.append(
            (f"Kafka-direct {label} ≥ 0.85x model best batch", f"{f1(d_rate)} / {f1(m_rate)} = {f1(ratio)}x", met)
        )
    rest = result.get("rest") or {}
    ours = point(rest.get("aisemble"), top) or {}
    ray = point(rest.get("ray_serve"), top) or {}
    per = point(rest.get("per_request"), top) or {}
    o_ips, r_ips, p_ips = ours.get("items_per_s"), ray.get("items_per_s"), per.get("items_per_s")
    o99, r99, p99 = get(ours, "latency_ms", "p99"), get(ray, "latency_ms", "p99"), get(per, "latency_ms", "p99")
    o50 = get(ours, "latency_ms", "p50")
    rows += [
        (
            f"REST {top} clients ≥ 2x Ray Serve items/s",
            f"{f1(o_ips)} / {f1(r_ips)} = {f1(o_ips / r_ips if o_ips and r_ips else None)}x",
            None if not (o_ips and r_ips) else o_ips >= 2 * r_ips,
        ),
        (
            f"REST {top} clients ≥ 3x per-request items/s",
            f"{f1(o_ips)} / {f1(p_ips)} = {f1(o_ips / p_ips if o_ips and p_ips else None)}x",
            None if not (o_ips and p_ips) else o_ips >= 3 * p_ips,
        ),
        (
            f"REST {top} clients p99 lower than Ray's and per-request's",
            f"{f1(o99)} vs {f1(r99)} / {f1(p99)} ms",
            None if o99 is None or r99 is None or p99 is None else o99 < r99 and o99 < p99,
        ),
        (
            f"REST {top} clients p99 ≤ 2x p50",
            f"{f1(o99)} / {f1(o50)} = {f1(o99 / o50 if o99 and o50 else None)}x",
            None if not (o99 and o50) else o99 <= 2 * o50,
        ),
    ]
    a50 = get(point(rest.get("aisemble"), 1), "latency_ms", "p50")
    b50 = get(point(rest.get("per_request"), 1), "latency_ms", "p50")
    rows.append(
        (
            "REST 1 client p50 ≤ 1.25x per-request's",
            f"{f1(a50)} / {f1(b50)} ms = {f1(a50 / b50 if a50 and b50 else None)}x",
            None if not (a50 and b50) else a50 <= 1.25 * b50,
        )
    )
    f50 = get(result, "floor", "open_loop", "latency_ms", "p50")
    f99 = get(result, "floor", "open_loop", "latency_ms", "p99")
    rows += [
        ("no-op p50 ≤ 5 ms at 200/s", f"{f1(f50)} ms", None if f50 is None else f50 <= 5),
        ("no-op p99 ≤ 20 ms at 200/s", f"{f1(f99)} ms", None if f99 is None else f99 <= 20),
    ]
    hit = get(result, "cache", "hit", "latency_ms", "p50")
    rows.append(("cache hit p50 ≤ 1.5 ms", f"{f1(hit)} ms", None if hit is None else hit <= 1.5))
    four = get(result, "four_services", "agents_peak_rss_mb_sum")
    rows.append(
        (
            f"four services' peak RSS ≤ 3 GB ({RSS_TARGET_MB:,.0f} MiB)",
            f"{f1(four)} MiB",
            None if not four else four <= RSS_TARGET_MB,
        )
    )
    rows += llm_server_targets(result)
    rows += lanes_targets(result)
    lines = ["## Targets", "", "| target | figure | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {fig} | {verdict(ok)} |" for t, fig, ok in rows]
    return [*lines, ""]


def f3(x: Any) -> str:
    """A ratio with three decimals, or — for none."""
    return "—" if x is None else f"{x:.3f}"


EDGE_POINTS = {"light_1": "light work, 1 client", "light_64": "light work, 64 clients", "embed_1": "embed, 1 client"}


def edge_cost_rows(result: dict[str, Any]) -> list[str]:
    """Section 10 (``bench.edge_cost``): the targets, then per point and design the figures and every process's
    CPU us/request, then the edge's top self-time functions."""
    ec = result.get("edge_cost")
    lines = ["## 10. The edge's own cost (light work and 1-client embed beside the per-request design)", ""]
    if why(ec) is not None or not isinstance(ec, dict):
        return [*lines, why(ec) or "not run", ""]
    cmp = ec.get("compare") or {}
    rows: list[tuple[str, str, bool | None]] = []
    for name, label in (("light_1", "light work, 1 client"), ("light_64", "light work, 64 clients")):
        r = get(cmp, name, "rps_ratio")
        if f"{name}_baseline" in cmp:  # the same target for the baseline checkout, in the same run
            b = get(cmp, f"{name}_baseline", "rps_ratio")
            figure = f"{f1(get(cmp, f'{name}_baseline', 'aisemble_rps'))} / {f1(get(cmp, name, 'per_request_rps'))}"
            rows.append((f"(baseline) {label} ≥ 0.33x per-request req/s", f"{figure} = {f3(b)}x",
                         None if b is None else b >= 0.33))  # fmt: skip
        rows.append((f"{label} ≥ 0.33x per-request req/s",
                     f"{f1(get(cmp, name, 'aisemble_rps'))} / {f1(get(cmp, name, 'per_request_rps'))} = {f3(r)}x",
                     None if r is None else r >= 0.33))  # fmt: skip
    r = get(cmp, "embed_1", "p50_ratio")
    rows.append(("embed 1 client p50 ≤ 1.25x per-request's",
                 f"{f1(get(cmp, 'embed_1', 'aisemble_p50_ms'))} / {f1(get(cmp, 'embed_1', 'per_request_p50_ms'))} ms"
                 f" = {f3(r)}x", None if r is None else r <= 1.25))  # fmt: skip
    lines += ["| target | figure | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {fig} | {verdict(ok)} |" for t, fig, ok in rows]
    lines += ["", f"Driver: {ec.get('driver')}, closed loop, cache off, {ec.get('duration_s')} s per point, best of "
              f"{ec.get('rounds')} round(s). CPU us/request: the process's CPU time over the point / requests answered "
              "(an idle process's share included).", "",
              "| point | design | req/s | p50 ms | p99 ms | driver cores | edge us/req | data agent us/req "
              "| nlp agent us/req | per-request server us/req | hops p50 ms (http / to agent / agent / back) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, label in EDGE_POINTS.items():
        for design, runs in (get(ec, "points", name) or {}).items():
            if not runs:
                continue
            p = max(runs, key=lambda x: x["requests_per_s"])
            cpu = p.get("cpu") or {}
            server = "per_request_nlp" if name.startswith("embed") else "per_request_data"
            hops = p.get("hops_p50_ms") or {}
            hop = " / ".join(f1(hops.get(h)) for h in ("http", "to_agent", "agent", "back")) if hops else "—"
            keys = ("edge", "data_agent", "nlp_agent", server)
            if design == "aisemble_baseline":  # the baseline pipeline's own processes (bench.edge_cost --baseline)
                keys = ("baseline_edge", "baseline_data", "baseline_nlp", server)
            us = [get(cpu, k, "cpu_us_per_request") for k in keys]
            lines.append(f"| {label} | {design} | {f1(p['requests_per_s'])} | {f1(get(p, 'latency_ms', 'p50'))} | "
                         f"{f1(get(p, 'latency_ms', 'p99'))} | {p.get('driver_cpu_cores')} | "
                         + " | ".join(f1(u) for u in us) + f" | {hop} |")  # fmt: skip
    bare = {k: [get(r, "latency_ms", "p50") for r in v] for k, v in (ec.get("bare_kafka") or {}).items()
            if isinstance(v, list)}  # fmt: skip
    shown = "; ".join(f"{k.replace('_', ' ')} ms: {', '.join(f1(x) for x in v)}" for k, v in bare.items())
    lines += ["", f"Bare aiokafka produce → consume round trip p50 (producer linger; each run): {shown or '—'}.", ""]
    lines += [profile_md({k: v for k, v in (ec.get("profile") or {}).items() if isinstance(v, dict)})]
    return lines


def summary_md(result: dict[str, Any]) -> str:
    prof = result.get("profile") or {}
    clients = list(prof.get("clients") or [1])
    shown = sorted({clients[0], clients[-1]})
    lines = [
        f"# Benchmark suite ({result.get('profile_name')}, {get(result, 'machine', 'when')})",
        "",
        f"Machine: {get(result, 'machine', 'cpus')} CPUs, {get(result, 'machine', 'platform')}. One run: every ratio "
        f"below is between figures of this run; the load driver shares the CPUs with the servers. "
        f"{prof.get('duration_s')} s per load point; wall {result.get('wall_s')} s. The broker held "
        f"{result.get('broker_topics', '?')} topics when the run began.",
        "",
    ]
    if result.get("profile_name") == "smoke":
        lines += ["**Smoke profile: a few seconds per point, a handful of clients. The figures are not results.**", ""]
    lines += targets(result, clients[-1])
    lines += side_by_side(result, shown)
    lines += model_rows(result)
    lines += floor_rows(result)
    lines += direct_rows(result)
    lines += services_rows(result)
    lines += fairness_rows(result)
    lines += llm_rows(result)
    lines += llm_server_rows(result)
    lines += llm_serve_rows(result)
    lines += aiperf_rows(result)
    lines += tracing_cost_rows(result)
    lines += cache_scale_rows(result)
    lines += [profile_md(result.get("profile_run") or {})]
    lines += edge_cost_rows(result)
    return "\n".join(lines)
