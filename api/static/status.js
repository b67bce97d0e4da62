// aisemble status page: polls this edge's /status.json every few seconds and renders it.
// No framework, no external resources. Values only ever reach the page as text (textContent), never as HTML.
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
