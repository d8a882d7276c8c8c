// The live view (addons/admin/liveview.py serves it). Everything a client sent (names,
// references, header values, user agents) is put on the page as text: createElement and
// textContent only, never HTML parsing. The page's CSP also forbids assigning HTML strings
// (Trusted Types), so a mistake here would fail loudly instead of running someone's markup.
"use strict";

(() => {
  const MAX_FLOWS = 5000; // kept in the page
  const MAX_ROWS = 400; // drawn in the table
  const SVG = "http://www.w3.org/2000/svg";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);

  let flows = []; // oldest first
  let paused = false;
  let selected = null;
  let renderQueued = false;
  const tenants = new Set();

  function el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(text(child)));
    }
    return node;
  }

  function text(value) {
    return value === null || value === undefined ? "" : String(value);
  }

  function bytes(n) {
    if (typeof n !== "number") return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }

  function ms(n) {
    if (typeof n !== "number") return "";
    return n >= 1000 ? (n / 1000).toFixed(2) + " s" : n.toFixed(1) + " ms";
  }

  function statusClass(flow) {
    return typeof flow.status === "number" ? Math.floor(flow.status / 100) + "xx" : "none";
  }

  function verdict(flow) {
    return text(flow.decision).split(":")[0];
  }

  function short(reference) {
    // A digest is 71+ characters: its algorithm and first 12 hex digits identify it here;
    // the whole one is in the flow's details.
    const value = text(reference);
    const m = /^(sha256|sha512):([0-9a-f]{12})[0-9a-f]+$/.exec(value);
    return m ? `${m[1]}:${m[2]}…` : value;
  }

  function reason(flow) {
    const parts = [];
    if (flow.rule) parts.push("rule " + text(flow.rule));
    const why = text(flow.decision).split(":").slice(1).join(":");
    if (why) parts.push(why);
    if (flow.error) parts.push("error: " + text(flow.error));
    return parts.join(" · ");
  }

  // --- filters: the same rules as liveview.Filters on the server ---------------------------

  function filters() {
    return {
      tenant: $("f-tenant").value,
      repository: $("f-repository").value,
      status: $("f-status").value,
      decision: $("f-decision").value,
    };
  }

  function matches(flow, f) {
    if (f.tenant && (flow.tenant || "-") !== f.tenant) return false;
    if (f.repository && !text(flow.repository).includes(f.repository)) return false;
    if (f.status && statusClass(flow) !== f.status) return false;
    if (f.decision && verdict(flow) !== f.decision) return false;
    return true;
  }

  function updateDownload() {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(filters())) if (value) query.set(key, value);
    const suffix = query.toString();
    $("download").href = "/live/flows.mitm" + (suffix ? "?" + suffix : "");
  }

  // --- the flow table ----------------------------------------------------------------------

  function row(flow) {
    const cls = "flow s" + statusClass(flow) + " d-" + verdict(flow);
    const tr = el(
      "tr",
      cls + (flow.id === selected ? " selected" : ""),
      el("td", "c-time", text(flow.time).slice(11, 23)),
      el("td", "c-tenant", flow.tenant || "-"),
      el("td", "c-subject", flow.subject),
      el("td", "c-method", flow.method),
      // No repository (the token endpoint, /v2/, a refused target): the path instead.
      flow.repository
        ? el("td", "c-repository", flow.repository)
        : el("td", "c-repository path", text(flow.target).split("?")[0]),
      el("td", "c-reference", short(flow.reference)),
      el("td", "c-status", flow.status === null ? "—" : flow.status),
      el("td", "c-decision", verdict(flow)),
      el("td", "c-rule", reason(flow)),
      el("td", "c-in num", bytes(flow.bytes_in)),
      el("td", "c-out num", bytes(flow.bytes_out)),
      el("td", "c-duration num", ms(flow.duration_ms)),
      el("td", "c-backend num", ms(flow.backend_ms)),
      el("td", "c-host", flow.host),
      el("td", "c-agent", flow.user_agent),
    );
    tr.dataset.id = text(flow.id);
    tr.title = text(flow.method) + " " + text(flow.target);
    return tr;
  }

  function render() {
    const f = filters();
    const rows = [];
    let matching = 0;
    for (let i = flows.length - 1; i >= 0; i--) {
      if (!matches(flows[i], f)) continue;
      matching++;
      if (rows.length < MAX_ROWS) rows.push(row(flows[i]));
    }
    $("flows").tBodies[0].replaceChildren(...rows);
    $("shown").textContent =
      `${matching} of ${flows.length} flows match` +
      (matching > rows.length ? `; the newest ${rows.length} are shown` : "") +
      (paused ? " (paused)" : "");
  }

  function queueRender() {
    if (paused || renderQueued) return;
    renderQueued = true;
    // The first flows at once, then at most five redraws a second under load.
    const delay = $("flows").tBodies[0].rows.length ? 200 : 0;
    setTimeout(() => {
      renderQueued = false;
      if (!paused) render(); // paused meanwhile: the table stays as it is
    }, delay);
  }

  function insert(flow) {
    // Ordered by end time: two workers' batches interleave.
    let i = flows.length;
    while (i > 0 && flows[i - 1].end > flow.end) i--;
    flows.splice(i, 0, flow);
  }

  function addFlows(batch) {
    for (const flow of batch) {
      insert(flow);
      const tenant = flow.tenant || "-";
      if (!tenants.has(tenant)) {
        tenants.add(tenant);
        const option = el("option", "", tenant);
        option.value = tenant;
        $("f-tenant").append(option);
      }
    }
    if (flows.length > MAX_FLOWS) flows = flows.slice(flows.length - MAX_FLOWS);
    queueRender();
  }

  // --- one flow, its headers ---------------------------------------------------------------

  function headerTable(title, fields) {
    const section = el("section", "headers", el("h3", "", title));
    if (!Array.isArray(fields)) {
      section.append(el("p", "hint", "no response"));
      return section;
    }
    const body = el("tbody", "");
    for (const field of fields) {
      body.append(el("tr", "", el("th", "", field[0]), el("td", "", field[1])));
    }
    section.append(el("table", "", body));
    return section;
  }

  function bodySection(title, value, flow) {
    // As text in a <pre>: a manifest or an error's JSON, redacted by the worker.
    const section = el("section", "body", el("h3", "", title));
    if (flow.body_cut) section.append(el("p", "hint", "its first 16 KiB"));
    section.append(el("pre", "body-text", value));
    return section;
  }

  function facts(flow) {
    const list = el("dl", "facts");
    const add = (name, value) => {
      if (value === null || value === undefined || value === "") return;
      list.append(el("dt", "", name), el("dd", "", value));
    };
    add("time", flow.time);
    add("client", flow.client);
    add("worker", flow.worker);
    add("tenant", flow.tenant || "-");
    add("subject", flow.subject);
    add("host", flow.host);
    add("user agent", flow.user_agent);
    add("kind", flow.kind);
    add("repository", flow.repository);
    add("reference", flow.reference);
    add("status", flow.status);
    add("decision", flow.decision);
    add("rule", flow.rule);
    if (flow.cache) add("answered", "from the gateway's cache (the backend was not asked)");
    add("error", flow.error);
    add("bytes in / out", bytes(flow.bytes_in) + " / " + bytes(flow.bytes_out));
    add("duration", ms(flow.duration_ms));
    add("backend latency", ms(flow.backend_ms));
    if (flow.truncated) add("note", "headers cut to 8 KiB per message");
    return list;
  }

  async function select(id) {
    selected = id;
    for (const tr of $("flows").tBodies[0].rows) {
      tr.classList.toggle("selected", tr.dataset.id === String(id));
    }
    const detail = $("detail");
    let flow;
    try {
      const answer = await fetch("/live/flow/" + encodeURIComponent(id));
      flow = await answer.json();
      if (!answer.ok) throw new Error(flow.error || answer.status);
    } catch (e) {
      detail.replaceChildren(el("p", "hint", "flow " + id + ": " + e.message));
      return;
    }
    if (selected !== id) return;
    detail.replaceChildren(
      el("h2", "", text(flow.method) + " " + text(flow.target)),
      facts(flow),
      headerTable("request headers", flow.request_headers),
      headerTable("response headers", flow.response_headers),
    );
    if (typeof flow.request_body === "string") {
      detail.append(bodySection("request body", flow.request_body, flow));
    }
    if (typeof flow.response_body === "string") {
      detail.append(bodySection("response body", flow.response_body, flow));
    }
    if (flow.body_dropped) detail.append(el("p", "hint", "body no longer kept (memory bound)"));
    detail.dataset.id = text(id);
  }

  // --- the overview ------------------------------------------------------------------------

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    return node;
  }

  function chart(target, lines, format) {
    // Drawn in the element's own pixels (no stretching: labels stay legible).
    const width = Math.max(200, Math.round(target.clientWidth)), height = 130;
    const top = 14, bottom = 16;
    target.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const n = lines[0].values.length;
    const max = Math.max(1, ...lines.flatMap((l) => l.values));
    const x = (i) => (i * width) / Math.max(1, n - 1);
    const y = (v) => top + (height - top - bottom) * (1 - v / max);
    const nodes = [
      svg("line", { x1: 0, x2: width, y1: y(0), y2: y(0), class: "axis" }),
      svg("line", { x1: 0, x2: width, y1: y(max), y2: y(max), class: "grid" }),
    ];
    for (const line of lines) {
      const points = line.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`);
      nodes.push(svg("polyline", { points: points.join(" "), class: line.className }));
    }
    const label = (attrs, value) => {
      const node = svg("text", attrs);
      node.textContent = value;
      return node;
    };
    nodes.push(label({ x: 4, y: 11, class: "label" }, format(max)));
    nodes.push(label({ x: 4, y: height - 3, class: "label" }, "−5 min"));
    nodes.push(label({ x: width - 4, y: height - 3, class: "label end" }, "now"));
    target.replaceChildren(...nodes);
  }

  function spark(values) {
    const width = 90, height = 18;
    const max = Math.max(1, ...values);
    const points = values.map(
      (v, i) => `${((i * width) / Math.max(1, values.length - 1)).toFixed(1)},` +
        `${(height - 1 - (height - 2) * (v / max)).toFixed(1)}`,
    );
    const node = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "spark" });
    node.append(svg("polyline", { points: points.join(" ") }));
    return node;
  }

  function percent(rate) {
    return (rate * 100).toFixed(rate > 0 && rate < 0.1 ? 1 : 0) + " %";
  }

  function overview(o) {
    const s = o.series;
    const failed = s["5xx"];
    chart(
      $("chart-requests"),
      [
        { values: s.requests, className: "l-req" },
        { values: s["4xx"], className: "l-4xx" },
        { values: failed, className: "l-5xx" },
      ],
      (v) => v.toFixed(v < 10 ? 1 : 0) + " req/s",
    );
    chart(
      $("chart-bytes"),
      [
        { values: s.bytes_in, className: "l-in" },
        { values: s.bytes_out, className: "l-out" },
      ],
      (v) => bytes(v) + "/s",
    );
    const rows = o.tenants.map((t) =>
      el(
        "tr",
        t.error_rate > 0 ? "failing" : "",
        el("td", "", t.tenant),
        el("td", "num", t.rps.toFixed(2)),
        el("td", "num", percent(t.client_error_rate)),
        el("td", "num", percent(t.error_rate)),
        el("td", "num", bytes(t.bytes_in_per_s) + "/s"),
        el("td", "num", bytes(t.bytes_out_per_s) + "/s"),
        el("td", "", spark(t.spark)),
      ),
    );
    $("tenants").tBodies[0].replaceChildren(...rows);
    const st = o.stats;
    const parts = [
      `ring ${st.ring}/${st.capacity}`,
      `${st.workers_streaming} worker${st.workers_streaming === 1 ? "" : "s"} streaming`,
      `${st.viewers} viewer${st.viewers === 1 ? "" : "s"}`,
    ];
    const lost = st.dropped_by_workers + st.dropped_for_viewer + st.bad_input;
    if (lost) parts.push(`${lost} flows lost (workers ${st.dropped_by_workers}, this page ${st.dropped_for_viewer})`);
    if (st.feed_error) parts.push("no feed: " + st.feed_error);
    $("stats").textContent = parts.join(" · ");
    $("stats").classList.toggle("lossy", lost > 0 || !!st.feed_error);
  }

  // --- capture (the admin endpoint's /capture, with the page's CSRF token) ---------------

  async function capture(method, query) {
    const status = $("capture-status");
    try {
      const answer = await fetch("/capture" + (query || ""), {
        method,
        headers: { "X-CSRF-Token": csrf },
      });
      const body = await answer.json();
      status.textContent = body.active
        ? `writing ${body.id}: ${body.flows} flows`
        : body.id
          ? `last: ${text(body.file)} (${body.flows} flows)`
          : "";
    } catch (e) {
      status.textContent = "capture: " + e.message;
    }
  }

  // --- wiring ------------------------------------------------------------------------------

  function connect() {
    const events = new EventSource("/live/events");
    events.addEventListener("open", () => {
      $("status").textContent = "live";
      $("status").className = "status live";
    });
    events.addEventListener("error", () => {
      $("status").textContent = "reconnecting…";
      $("status").className = "status down";
    });
    events.addEventListener("reset", () => {
      flows = [];
      queueRender();
    });
    events.addEventListener("flows", (e) => addFlows(JSON.parse(e.data)));
    events.addEventListener("overview", (e) => overview(JSON.parse(e.data)));
  }

  // One listener for every row, those the server drew into the page included.
  $("flows").tBodies[0].addEventListener("click", (e) => {
    const tr = e.target instanceof Element ? e.target.closest("tr.flow") : null;
    if (tr && tr.dataset.id) select(Number(tr.dataset.id));
  });
  for (const id of ["f-tenant", "f-status", "f-decision", "f-repository"]) {
    $(id).addEventListener("input", () => {
      updateDownload();
      render();
    });
  }
  $("pause").addEventListener("click", () => {
    paused = !paused;
    $("pause").textContent = paused ? "resume" : "pause";
    render();
  });
  $("capture-start").addEventListener("click", () => capture("POST", "?seconds=60&max_mb=64"));
  $("capture-stop").addEventListener("click", () => capture("DELETE"));
  setInterval(() => capture("GET"), 5000);
  capture("GET");
  updateDownload();
  connect();
})();
