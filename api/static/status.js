// aisemble status page: polls this edge's /status.json and /status/history.json every few seconds and renders
// them: the table of the present, one small SVG chart per figure and service for the last 15 minutes, and the
// slowest recent requests. No framework, no external resources, no inline style (the CSP forbids it). Values only
// ever reach the page as text (textContent) or SVG attributes, never as HTML.
// With API keys configured, /status.json answers 401 until the page sends a key: the page asks for one, keeps it
// in sessionStorage (this tab only) and sends it as X-API-Key.
"use strict";

(() => {
  const REFRESH_MS = 3000;
  const TIMEOUT_MS = 4000;
  const KEY_STORE = "aisemble.apiKey";
  const DASH = "—";
  const COLUMNS = ["health", "agents", "lag", "drain", "throughput", "p95", "batch"];

  let timer = null;
  let generation = 0; // a restart (key given or forgotten) ends the previous polling chain

  const $ = (id) => document.getElementById(id);

  function known(value) {
    return typeof value === "number" && Number.isFinite(value);
  }

  function fixed(value, digits) {
    return known(value) ? value.toFixed(digits) : DASH;
  }

  function fmtRate(value) {
    return known(value) ? `${value.toFixed(value < 10 ? 2 : 1)} items/s` : DASH;
  }

  function fmtMs(value) {
    if (!known(value)) return DASH;
    return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${value.toFixed(1)} ms`;
  }

  function fmtDuration(seconds) {
    if (!known(seconds)) return DASH;
    if (seconds < 120) return `${seconds.toFixed(1)} s`;
    if (seconds < 7200) return `${(seconds / 60).toFixed(1)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  function fmtDrain(service) {
    if (service.lag === 0) return "drained";
    if (service.draining === false) return "not draining";
    return fmtDuration(service.drain_s);
  }

  function text(value) {
    return value === null || value === undefined || value === "" ? DASH : String(value);
  }

  function setState(element, state) {
    const name = ["ok", "degraded", "down"].includes(state) ? state : "unknown";
    element.className = `pill state-${name}`;
    element.dataset.state = name;
    element.textContent = name !== "unknown" ? name : state === "unknown" ? "unknown" : DASH;
  }

  function serviceRow(name) {
    const id = `svc-${name}`;
    let row = $(id);
    if (row) return row;
    row = document.createElement("tr");
    row.id = id;
    const title = document.createElement("td");
    title.textContent = name;
    row.appendChild(title);
    for (const column of COLUMNS) {
      const cell = document.createElement("td");
      cell.id = `${id}-${column}`;
      if (column === "health") {
        const pill = document.createElement("span");
        pill.id = `${id}-health-pill`;
        cell.appendChild(pill);
        setState(pill, null);
      } else {
        cell.textContent = DASH;
      }
      row.appendChild(cell);
    }
    $("service-rows").appendChild(row);
    return row;
  }

  // The figure of the whole service, then one small line per lane (interactive, bulk) when known.
  function setWithLanes(cell, main, lanes, format) {
    if (!lanes || main === DASH) {
      cell.textContent = main;
      return;
    }
    const detail = document.createElement("div");
    detail.className = "lanes";
    detail.id = `${cell.id}-lanes`;
    detail.textContent = Object.entries(lanes)
      .map(([lane, figures]) => `${lane} ${format(figures)}`)
      .join(" · ");
    cell.replaceChildren(document.createTextNode(main), detail);
  }

  function renderService(name, service) {
    const id = serviceRow(name).id;
    setState($(`${id}-health-pill`), service.status);
    $(`${id}-agents`).textContent = known(service.agents) ? String(service.agents) : DASH;
    setWithLanes($(`${id}-lag`), known(service.lag) ? String(service.lag) : DASH, service.lanes,
      (lane) => (known(lane.lag) ? String(lane.lag) : DASH));
    setWithLanes($(`${id}-drain`), fmtDrain(service), service.lanes, fmtDrain);
    $(`${id}-throughput`).textContent = fmtRate(service.items_per_s);
    $(`${id}-p95`).textContent = fmtMs(service.p95_ms);
    $(`${id}-batch`).textContent = fixed(service.batch_mean, 2);
  }

  function showBanner(lines) {
    const banner = $("banner");
    banner.replaceChildren(
      ...lines.map((line) => {
        const p = document.createElement("p");
        p.textContent = line;
        return p;
      }),
    );
    banner.hidden = lines.length === 0;
  }

  function render(doc) {
    setState($("overall"), doc.status);
    $("updated").textContent = known(doc.taken_at) ? new Date(doc.taken_at * 1000).toLocaleTimeString() : DASH;
    $("window").textContent = known(doc.window_s) ? `${doc.window_s.toFixed(0)} s` : DASH;

    const kafka = doc.kafka || {};
    const redis = doc.redis || {};
    setState($("kafka-state"), kafka.ok === true ? "ok" : kafka.ok === false ? "down" : null);
    setState($("redis-state"), redis.ok === true ? "ok" : redis.ok === false ? "down" : null);
    $("kafka-detail").textContent = kafka.ok ? "broker answers" : text(kafka.last_error);
    $("redis-detail").textContent = redis.ok ? `breaker ${text(redis.breaker)}` : text(redis.error || redis.breaker);

    const edge = doc.edge || {};
    $("edge-in-flight").textContent = known(edge.in_flight) ? String(edge.in_flight) : DASH;
    $("edge-limit").textContent = known(edge.max_in_flight) ? String(edge.max_in_flight) : DASH;
    $("edge-rejected").textContent = known(edge.rejected) ? String(edge.rejected) : DASH;

    const lines = [];
    if (kafka.ok === false) {
      lines.push("Kafka is down: the edge refuses requests (503) until the broker answers again.");
    }
    if (redis.ok === false) {
      lines.push("Redis is down: requests run without the cache, and the agents' heartbeats cannot be read.");
    }
    showBanner(lines);

    for (const [name, service] of Object.entries(doc.services || {})) {
      renderService(name, service || {});
    }
    renderKeys(doc.keys || {});
  }

  // One row per API key name (never the key): requests, tokens, 429s at this edge.
  function renderKeys(keys) {
    const names = Object.keys(keys);
    $("keys").hidden = names.length === 0;
    $("key-rows").replaceChildren(
      ...names.map((name) => {
        const row = document.createElement("tr");
        const counts = keys[name] || {};
        for (const value of [name, counts.requests, counts.tokens, counts.rate_limited]) {
          const cell = document.createElement("td");
          cell.textContent = known(value) ? String(value) : DASH;
          row.appendChild(cell);
        }
        row.dataset.key = name;
        return row;
      }),
    );
  }

  // ---- charts: inline SVG built with DOM calls (no library, no inline style: the CSP stays strict) ----------

  const SVG_NS = "http://www.w3.org/2000/svg";
  const CHART = { width: 300, height: 130, left: 48, right: 10, top: 12, bottom: 22 };

  function svg(name, attributes, text) {
    const element = document.createElementNS(SVG_NS, name);
    for (const [key, value] of Object.entries(attributes || {})) element.setAttribute(key, String(value));
    if (text !== undefined) element.textContent = text;
    return element;
  }

  // A round upper bound for the y axis (1, 2 or 5 times a power of ten), never 0.
  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
    return 10 * power;
  }

  function fmtMinutes(seconds) {
    return seconds >= 60 ? `${Math.round(seconds / 60)} min` : `${Math.round(seconds)} s`;
  }

  // One chart: `series` is [{name, values}] aligned with `at` (epoch s); null values are gaps. The x axis ends at
  // `now` and spans the history kept (at least a minute, at most `windowS`, 15 min), so a young edge's few points
  // are not squeezed into the last pixel; the y axis starts at 0. With no value at all it shows an empty state.
  function chart(id, title, unit, at, series, now, historyS, format) {
    const windowS = historyS;
    const { width, height, left, right, top, bottom } = CHART;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const values = series.flatMap((s) => s.values.filter(known));
    const yMax = niceMax(Math.max(0, ...values));
    const x = (t) => left + Math.min(1, Math.max(0, (t - (now - windowS)) / windowS)) * plotW;
    const y = (v) => top + plotH - (Math.min(v, yMax) / yMax) * plotH;

    const figure = document.createElement("figure");
    figure.className = "chart";
    const caption = document.createElement("figcaption");
    caption.textContent = `${title} (${unit})`;
    if (series.length > 1) {
      series.forEach((s, i) => {
        const key = document.createElement("span");
        key.className = `legend legend-${i}`;
        key.textContent = s.name;
        caption.appendChild(key);
      });
    }
    const root = svg("svg", {
      id, class: "chart-svg", viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": `${title} over the last ${fmtMinutes(windowS)}`, "data-points": values.length,
    });
    // Axes and grid: 0 and the top of the y axis labelled with the unit; the window's start and now on x.
    root.appendChild(svg("line", { class: "grid", x1: left, y1: top, x2: left + plotW, y2: top }));
    root.appendChild(svg("line", { class: "grid", x1: left, y1: top + plotH / 2, x2: left + plotW, y2: top + plotH / 2 }));
    root.appendChild(svg("line", { class: "axis", x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH }));
    root.appendChild(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: top + plotH }));
    root.appendChild(svg("text", { class: "tick", x: left - 4, y: top + 4, "text-anchor": "end" }, format(yMax)));
    root.appendChild(svg("text", { class: "tick", x: left - 4, y: top + plotH, "text-anchor": "end" }, "0"));
    root.appendChild(svg("text", { class: "tick", x: left, y: height - 6 }, `-${fmtMinutes(windowS)}`));
    root.appendChild(svg("text", { class: "tick", x: left + plotW, y: height - 6, "text-anchor": "end" }, "now"));

    if (values.length === 0) {
      root.classList.add("empty");
      root.appendChild(svg("text", { class: "empty-text", x: left + plotW / 2, y: top + plotH / 2 + 4,
        "text-anchor": "middle" }, "no data yet"));
    }
    series.forEach((s, i) => {
      let run = [];
      const flush = () => {
        if (run.length > 1) {
          root.appendChild(svg("polyline", { class: `line series-${i}`, points: run.join(" ") }));
        } else if (run.length === 1) {
          const [cx, cy] = run[0].split(",");
          root.appendChild(svg("circle", { class: `dot series-${i}`, cx, cy, r: 1.5 }));
        }
        run = [];
      };
      s.values.forEach((value, k) => {
        if (known(value) && known(at[k])) run.push(`${x(at[k]).toFixed(1)},${y(value).toFixed(1)}`);
        else flush();
      });
      flush();
      // The last known value, marked and labelled.
      for (let k = s.values.length - 1; k >= 0; k -= 1) {
        if (!known(s.values[k]) || !known(at[k])) continue;
        const cx = x(at[k]);
        const cy = y(s.values[k]);
        root.appendChild(svg("circle", { class: `last-dot series-${i}`, cx: cx.toFixed(1), cy: cy.toFixed(1), r: 2.5 }));
        const label = svg("text", { class: `last series-text-${i}`, x: (cx - 5).toFixed(1),
          y: Math.max(top + 8, cy - 5 - 10 * i).toFixed(1), "text-anchor": "end" }, format(s.values[k]));
        label.id = `${id}-last-${i}`;
        root.appendChild(label);
        break;
      }
    });
    figure.append(caption, root);
    return figure;
  }

  function fmtNumber(value) {
    if (!known(value)) return DASH;
    if (value >= 1000) return `${(value / 1000).toFixed(value >= 10000 ? 0 : 1)}k`;
    return value >= 10 || Number.isInteger(value) ? value.toFixed(0) : value.toFixed(1);
  }

  // Per lane when the history has lanes (interactive, bulk), else the service's own figure.
  function laneSeries(service, column) {
    const lanes = Object.entries(service.lanes || {});
    if (lanes.length === 0) return [{ name: "all", values: service[column] || [] }];
    return lanes.map(([lane, figures]) => ({ name: lane, values: (figures || {})[column] || [] }));
  }

  function renderHistory(doc) {
    const now = known(doc.taken_at) ? doc.taken_at : Date.now() / 1000;
    const windowS = known(doc.window_s) ? doc.window_s : 900;
    $("history-window").textContent = fmtMinutes(windowS);
    $("slow-window").textContent = fmtMinutes(windowS);
    $("history-interval").textContent = known(doc.interval_s) ? `${doc.interval_s} s` : DASH;
    $("history-error").hidden = true;
    const blocks = Object.entries(doc.services || {}).map(([name, service]) => {
      const at = service.at || [];
      const span = Math.min(windowS, Math.max(60, known(at[0]) ? now - at[0] : 0));
      const block = document.createElement("div");
      block.className = "service-charts";
      block.id = `charts-${name}`;
      const heading = document.createElement("h3");
      heading.textContent = name;
      const id = (metric) => `chart-${name}-${metric}`;
      block.append(
        heading,
        chart(id("throughput"), "Throughput", "items/s", at, [{ name, values: service.items_per_s || [] }], now,
          span, fmtNumber),
        chart(id("p95"), "p95 latency", "ms", at, [{ name, values: service.p95_ms || [] }], now, span, fmtNumber),
        chart(id("lag"), "Lag", "records", at, laneSeries(service, "lag"), now, span, fmtNumber),
        chart(id("drain"), "Time to drain", "s", at, laneSeries(service, "drain_s"), now, span, fmtNumber),
      );
      return block;
    });
    if (blocks.length === 0) {
      const empty = document.createElement("p");
      empty.className = "muted";
      empty.id = "charts-empty";
      empty.textContent = "No history yet: the edge takes its first point within one interval.";
      blocks.push(empty);
    }
    $("charts").replaceChildren(...blocks);
    renderSlow(doc.slow || []);
  }

  // The slowest recent requests; a trace id links to the operator's trace UI only through an http(s) URL the
  // edge built from its template (never a javascript: URL), opened without access to this page (noopener).
  function renderSlow(rows) {
    $("slow-empty").hidden = rows.length > 0;
    $("slow-rows").replaceChildren(
      ...rows.map((request) => {
        const row = document.createElement("tr");
        const finished = known(request.at) ? new Date(request.at * 1000).toLocaleTimeString() : DASH;
        const cells = [fmtMs(request.total_ms), text(request.service), text(request.task), text(request.route),
          text(request.status), finished, text(request.request_id)];
        for (const value of cells) {
          const cell = document.createElement("td");
          cell.textContent = value;
          row.appendChild(cell);
        }
        const trace = document.createElement("td");
        const url = typeof request.trace_url === "string" ? request.trace_url : "";
        if (request.trace_id && /^https?:\/\//i.test(url)) {
          const link = document.createElement("a");
          link.className = "trace";
          link.href = url;
          link.target = "_blank";
          link.rel = "noopener noreferrer";
          link.textContent = request.trace_id;
          trace.appendChild(link);
        } else {
          trace.textContent = text(request.trace_id);
        }
        row.appendChild(trace);
        row.dataset.requestId = text(request.request_id);
        return row;
      }),
    );
  }

  async function refreshHistory(headers, signal) {
    const response = await fetch("/status/history.json", { headers, cache: "no-store", signal });
    if (!response.ok) {
      $("history-error").textContent = `The edge answered ${response.status} for /status/history.json.`;
      $("history-error").hidden = false;
      return;
    }
    renderHistory(await response.json());
  }

  function askForKey(message) {
    $("key-form").hidden = false;
    $("key-error").textContent = message || "";
    $("key-input").focus();
  }

  async function refresh() {
    timer = null;
    const mine = generation;
    const key = sessionStorage.getItem(KEY_STORE);
    const headers = key ? { "X-API-Key": key } : {};
    const controller = new AbortController();
    const abort = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      const response = await fetch("/status.json", { headers, cache: "no-store", signal: controller.signal });
      if (response.status === 401) {
        askForKey(key ? "That key was refused." : "");
        return; // polling resumes once a key is given (the finally below runs first)
      }
      if (!response.ok) {
        showBanner([`The edge answered ${response.status} for /status.json.`]);
      } else {
        $("key-form").hidden = true;
        $("forget-key").hidden = !key;
        render(await response.json());
        await refreshHistory(headers, controller.signal);
      }
    } catch (error) {
      showBanner([`The edge does not answer (${error.name === "AbortError" ? "timed out" : error.message}).`]);
      setState($("overall"), "down");
    } finally {
      clearTimeout(abort);
    }
    if (mine === generation) timer = setTimeout(refresh, REFRESH_MS);
  }

  function restart() {
    generation += 1;
    if (timer !== null) clearTimeout(timer);
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("key").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("key-input").value.trim();
      if (!value) return;
      sessionStorage.setItem(KEY_STORE, value);
      $("key-input").value = "";
      restart();
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      restart();
    });
    refresh();
  });
})();
