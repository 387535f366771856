/* comfyfleet operator dashboard.
 *
 * Asks for an operator token once (kept in sessionStorage), loads GET /v1/dashboard, then
 * follows GET /v1/dashboard/stream. The stream is read with fetch() and a stream reader
 * because EventSource cannot send the Authorization header; the token never goes into a URL.
 *
 * Everything that comes from the server is put into the page as text (textContent,
 * setAttribute): names, tags and error messages are typed by users. Markup is never parsed
 * from data.
 */
(() => {
  "use strict";

  const TOKEN_KEY = "comfyfleet.operatorToken";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const TERMINAL = new Set(["completed", "failed", "cancelled", "invalid"]);
  const GIB = 1024 ** 3;

  const state = {
    token: null,
    generation: 0, // bumped on sign-in and sign-out: a stream loop of an older one stops
    controller: null, // AbortController of the open stream
    clockOffset: 0, // server clock minus this browser's, in ms
  };

  const byId = (id) => document.getElementById(id);

  // -- building DOM (text only) ----------------------------------------------------------

  function el(tag, opts, children) {
    const node = document.createElement(tag);
    applyOpts(node, opts);
    appendAll(node, children);
    return node;
  }

  function svg(tag, attrs, children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    appendAll(node, children);
    return node;
  }

  function applyOpts(node, opts) {
    if (!opts) return;
    if (opts.className) node.className = opts.className;
    if (opts.text !== undefined && opts.text !== null) node.textContent = String(opts.text);
    if (opts.title) node.title = String(opts.title);
    for (const [key, value] of Object.entries(opts.data || {})) {
      if (value !== undefined && value !== null) node.dataset[key] = String(value);
    }
    for (const [key, value] of Object.entries(opts.attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(key, String(value));
    }
  }

  function appendAll(node, children) {
    for (const child of children || []) {
      if (child === null || child === undefined || child === false) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
  }

  // -- formatting ---------------------------------------------------------------------------

  const serverNow = () => Date.now() + state.clockOffset;

  function secondsSince(iso) {
    return iso ? (serverNow() - Date.parse(iso)) / 1000 : null;
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
    const s = Math.max(0, seconds);
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.floor(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${String(Math.floor(s % 60)).padStart(2, "0")} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  function agoText(iso) {
    if (!iso) return "never";
    const s = secondsSince(iso);
    return s < 1.5 ? "just now" : `${fmtDuration(s)} ago`;
  }

  function fmtGiB(bytes) {
    if (bytes === null || bytes === undefined) return "?";
    const gib = bytes / GIB;
    return gib >= 100 ? gib.toFixed(0) : gib.toFixed(1);
  }

  function fmtPct(value) {
    return value === null || value === undefined ? "—" : `${Math.round(value)}%`;
  }

  function clockTime(iso) {
    return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
  }

  function level(pct) {
    if (pct === null || pct === undefined) return "lvl-none";
    if (pct >= 90) return "lvl-high";
    if (pct >= 70) return "lvl-mid";
    return "lvl-low";
  }

  // Elements whose text is a live duration: refreshed every second between snapshots.
  function agoNode(tag, iso, className) {
    return el(tag, { className, text: agoText(iso), data: { ago: iso }, title: iso || "" });
  }

  function sinceNode(tag, iso, className) {
    return el(tag, { className, text: fmtDuration(secondsSince(iso)), data: { since: iso } });
  }

  function tick() {
    for (const node of document.querySelectorAll("[data-ago]")) node.textContent = agoText(node.dataset.ago);
    for (const node of document.querySelectorAll("[data-since]")) {
      node.textContent = fmtDuration(secondsSince(node.dataset.since));
    }
  }

  // -- widgets ------------------------------------------------------------------------------

  function meter(kind, label, pct, valueText) {
    const known = pct !== null && pct !== undefined;
    const fill = el("div", { className: "meter-fill" });
    fill.style.width = `${known ? Math.min(100, Math.max(0, pct)) : 0}%`;
    const bar = el(
      "div",
      {
        className: "meter-bar",
        attrs: { role: "meter", "aria-label": label, "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": known ? Math.round(pct) : null },
      },
      [fill],
    );
    return el("div", { className: `meter meter-${kind} ${level(kind === "progress" ? null : pct)}` }, [
      el("span", { className: "meter-label", text: label }),
      bar,
      el("span", { className: "meter-value", text: valueText }),
    ]);
  }

  function statusBadge(status, extra) {
    return el("span", { className: `wf-status status-${status}`, text: extra ? `${status} ${extra}` : status });
  }

  function tagList(tags, emptyText) {
    const box = el("div", { className: "tags" });
    if (!tags.length) box.append(el("span", { className: "tag tag-any", text: emptyText }));
    for (const tag of tags) box.append(el("span", { className: "tag", text: tag }));
    return box;
  }

  function progressText(progress) {
    return progress === null || progress === undefined ? "" : `${Math.round(progress * 100)}%`;
  }

  // -- sections -----------------------------------------------------------------------------

  function renderSummary(snap) {
    const s = snap.summary;
    const tile = (label, value, className) =>
      el("div", { className: `tile ${className || ""}` }, [
        el("div", { className: "tile-value", text: value }),
        el("div", { className: "tile-label", text: label }),
      ]);
    byId("summary").replaceChildren(
      tile("runners online", `${s.runners_online} / ${s.runners}`, s.runners_online ? "tile-ok" : ""),
      tile("GPUs online", s.gpus_online),
      tile("jobs on runners", s.jobs_running, s.jobs_running ? "tile-info" : ""),
      tile("waiting", s.waiting, s.waiting ? "tile-warn" : ""),
      tile("completed · last hour", s.completed_last_hour, "tile-ok"),
      tile("failed · last hour", s.failed_last_hour, s.failed_last_hour ? "tile-bad" : ""),
    );
    byId("account-name").textContent = `account ${snap.account.name}`;
  }

  function gpuView(gpu) {
    const mem =
      gpu.memory_total_bytes !== null
        ? `${fmtGiB(gpu.memory_used_bytes)} / ${fmtGiB(gpu.memory_total_bytes)} GiB`
        : "—";
    const power =
      gpu.power_draw_w !== null
        ? `${Math.round(gpu.power_draw_w)}${gpu.power_limit_w !== null ? ` / ${Math.round(gpu.power_limit_w)}` : ""} W`
        : null;
    const temp = gpu.temperature_c;
    return el("div", { className: "gpu", data: { gpuIndex: gpu.index } }, [
      el("div", { className: "gpu-head" }, [
        el("span", { className: "gpu-name", text: `GPU ${gpu.index}${gpu.name ? ` · ${gpu.name}` : ""}` }),
        el("span", { className: "gpu-figures" }, [
          temp !== null
            ? el("span", { className: `gpu-temp ${temp >= 83 ? "hot" : temp >= 70 ? "warm" : ""}`, text: `${Math.round(temp)} °C` })
            : null,
          power ? el("span", { className: "gpu-power", text: power }) : null,
        ]),
      ]),
      meter("util", "util", gpu.utilization_pct, fmtPct(gpu.utilization_pct)),
      meter("mem", "mem", gpu.memory_pct, mem),
    ]);
  }

  function jobView(job) {
    const running = job.status === "running";
    const meta = [];
    if (job.node) meta.push(el("span", { className: "job-node", text: job.node }));
    if (job.queue_number !== null) meta.push(el("span", { text: `#${job.queue_number} in ComfyUI's queue` }));
    if (job.attempt > 1) meta.push(el("span", { text: `attempt ${job.attempt}` }));
    if (running && job.started_at) meta.push(el("span", {}, ["running ", sinceNode("span", job.started_at, "job-time")]));
    return el("div", { className: "job", data: { workflowId: job.id } }, [
      el("div", { className: "job-head" }, [
        el("span", { className: "job-name", text: job.name, title: job.id }),
        statusBadge(job.status),
      ]),
      meter("progress", "done", job.progress === null ? 0 : job.progress * 100, progressText(job.progress) || "—"),
      meta.length ? el("div", { className: "job-meta" }, meta) : null,
    ]);
  }

  function runnerView(r) {
    const badges = [
      el("span", { className: `badge ${r.online ? "badge-online" : "badge-offline"} runner-online`, text: r.online ? "online" : "offline" }),
      el("span", { className: `badge badge-${r.status} runner-status`, text: r.status }),
    ];
    if (r.healthy === false) {
      badges.push(el("span", { className: "badge badge-unhealthy", text: "unhealthy", title: r.unhealthy_reason || "" }));
    }
    const meta = [el("span", {}, ["last seen ", agoNode("time", r.last_seen, "runner-last-seen")])];
    if (r.online && r.slots !== null) meta.push(el("span", { text: `${r.free_slots} of ${r.slots} slot${r.slots === 1 ? "" : "s"} free` }));
    if (r.comfyui_version) meta.push(el("span", { text: `ComfyUI ${r.comfyui_version}` }));
    if (r.driver_version) meta.push(el("span", { text: `driver ${r.driver_version}${r.cuda_version ? ` · CUDA ${r.cuda_version}` : ""}` }));

    const gpus = el("div", { className: "gpus" });
    if (!r.gpus.length) {
      gpus.append(el("div", { className: "muted small", text: r.online ? "no GPU reported" : "no GPU known" }));
    }
    for (const gpu of r.gpus) gpus.append(gpuView(gpu));

    const jobs = el("div", { className: "jobs" });
    if (r.jobs.length) for (const job of r.jobs) jobs.append(jobView(job));
    else jobs.append(el("div", { className: "job-idle muted small", text: r.online ? "idle" : "—" }));

    const classes = ["runner", r.online ? "is-online" : "is-offline"];
    if (r.status === "disabled") classes.push("is-disabled");
    return el("article", { className: classes.join(" "), data: { runnerId: r.id } }, [
      el("header", { className: "runner-head" }, [
        el("h3", { className: "runner-name", text: r.name, title: r.id }),
        el("div", { className: "badges" }, badges),
      ]),
      tagList(r.tags, "any tags"),
      el("div", { className: "runner-meta" }, meta),
      gpus,
      jobs,
    ]);
  }

  function renderRunners(runners) {
    const box = byId("runners");
    const online = runners.filter((r) => r.online).length;
    byId("runners-note").textContent = runners.length ? `${online} of ${runners.length} online` : "";
    if (!runners.length) {
      box.replaceChildren(
        el("p", { className: "empty", text: "No runners yet: create one (POST /v1/runner) and start an agent with its token." }),
      );
      return;
    }
    box.replaceChildren(...runners.map(runnerView));
  }

  function table(headers, rows, className) {
    return el("table", { className }, [
      el("thead", {}, [el("tr", {}, headers.map((h) => el("th", { text: h })))]),
      el("tbody", {}, rows),
    ]);
  }

  function renderQueue(queue) {
    byId("queue-note").textContent = queue.total ? `${queue.total} waiting` : "";
    if (!queue.groups.length) {
      byId("queue").replaceChildren(el("p", { className: "empty", text: "Nothing waiting." }));
      return;
    }
    const rows = queue.groups.map((g) =>
      el("tr", { className: "queue-group", data: { tags: g.tags.join(",") } }, [
        el("td", {}, [tagList(g.tags, "untagged")]),
        el("td", { className: "num queue-count", text: g.count }),
        el("td", {}, [sinceNode("span", g.oldest_created_at, "queue-age")]),
        el("td", {
          className: `num ${g.runners_online ? "" : "warn-text"}`,
          text: g.runners_online ? g.runners_online : "none online",
        }),
      ]),
    );
    byId("queue").replaceChildren(table(["tags", "waiting", "oldest", "runners that fit"], rows, "grid queue-table"));
  }

  function renderThroughput(tp) {
    const width = 480;
    const height = 150;
    const left = 28;
    const right = 4;
    const bottom = 20;
    const top = 8;
    const plotH = height - bottom - top;
    const slot = (width - left - right) / tp.buckets.length;
    const barW = Math.max(4, slot * 0.68);
    const max = Math.max(1, ...tp.buckets.map((b) => b.completed + b.failed));
    const y = (n) => (n / max) * plotH;
    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`,
      class: "chart",
      role: "img",
      "aria-label": `${tp.completed} completed and ${tp.failed} failed in the last hour`,
    });
    chart.append(
      svg("line", { x1: left, x2: width - right, y1: top, y2: top, class: "grid-line" }),
      svg("line", { x1: left, x2: width - right, y1: top + plotH, y2: top + plotH, class: "axis-line" }),
      svg("text", { x: left - 6, y: top + 4, class: "axis-label", "text-anchor": "end" }, [String(max)]),
      svg("text", { x: left - 6, y: top + plotH, class: "axis-label", "text-anchor": "end" }, ["0"]),
    );
    tp.buckets.forEach((b, i) => {
      const x = left + i * slot + (slot - barW) / 2;
      const okH = y(b.completed);
      const badH = y(b.failed);
      const end = new Date(Date.parse(b.start) + tp.bucket_s * 1000).toISOString();
      const group = svg("g", { class: "bucket", "data-start": b.start }, [
        svg("title", {}, [`${clockTime(b.start)}–${clockTime(end)}: ${b.completed} completed, ${b.failed} failed`]),
        svg("rect", { x, y: top + plotH - okH, width: barW, height: okH, class: "bar-ok" }),
        svg("rect", { x, y: top + plotH - okH - badH, width: barW, height: badH, class: "bar-bad" }),
      ]);
      chart.append(group);
      const lastOne = i === tp.buckets.length - 1;
      if (i % 3 === 0 || lastOne) {
        // The last label ends at the chart's edge rather than running past it.
        const attrs = lastOne
          ? { x: width - right, "text-anchor": "end" }
          : { x: x + barW / 2, "text-anchor": "middle" };
        chart.append(svg("text", { ...attrs, y: height - 5, class: "axis-label" }, [clockTime(b.start)]));
      }
    });
    const legend = el("div", { className: "legend" }, [
      el("span", { className: "swatch swatch-ok" }),
      el("span", { className: "throughput-completed", text: `${tp.completed} completed` }),
      el("span", { className: "swatch swatch-bad" }),
      el("span", { className: "throughput-failed", text: `${tp.failed} failed` }),
      el("span", { className: "muted", text: `per ${Math.round(tp.bucket_s / 60)} min` }),
    ]);
    byId("throughput-note").textContent = "";
    byId("throughput").replaceChildren(chart, legend);
  }

  function recentRow(wf) {
    const active = !TERMINAL.has(wf.status);
    const waiting = active && !wf.started_at;
    const queued = waiting ? sinceNode("span", wf.created_at) : el("span", { text: fmtDuration(wf.queued_s) });
    const run =
      active && wf.started_at ? sinceNode("span", wf.started_at) : el("span", { text: fmtDuration(wf.run_s) });
    const errorParts = [];
    if (wf.exception_message || wf.exception_type) {
      const text = [wf.exception_type, wf.exception_message].filter(Boolean).join(": ");
      errorParts.push(el("div", { className: "error-text", text, title: text }));
      if (wf.error_node) errorParts.push(el("div", { className: "muted small", text: `node ${wf.error_node}` }));
    }
    return el("tr", { className: `wf-row row-${wf.status}`, data: { workflowId: wf.id } }, [
      el("td", { className: "wf-cell" }, [
        el("div", { className: "wf-name", text: wf.name }),
        el("div", { className: "wf-sub" }, [
          el("code", { className: "wf-id", text: wf.id.slice(0, 8), title: wf.id }),
          ...wf.tags.map((t) => el("span", { className: "tag tag-small", text: t })),
        ]),
      ]),
      el("td", {}, [statusBadge(wf.status, wf.status === "running" ? progressText(wf.progress) : "")]),
      el("td", { className: "wf-runner", text: wf.runner_name || "—" }),
      el("td", { className: "num" }, [queued]),
      el("td", { className: "num" }, [run]),
      el("td", {}, [agoNode("time", wf.created_at)]),
      el("td", { className: "wf-error" }, errorParts),
    ]);
  }

  function renderRecent(recent) {
    byId("recent-note").textContent = recent.length ? `last ${recent.length}` : "";
    if (!recent.length) {
      byId("recent").replaceChildren(el("p", { className: "empty", text: "No workflows yet." }));
      return;
    }
    byId("recent").replaceChildren(
      table(["workflow", "status", "runner", "queued", "run", "created", "error"], recent.map(recentRow), "grid recent-table"),
    );
  }

  function render(snap) {
    state.clockOffset = Date.parse(snap.generated_at) - Date.now();
    renderSummary(snap);
    renderRunners(snap.runners);
    renderQueue(snap.queue);
    renderThroughput(snap.throughput);
    renderRecent(snap.recent);
    document.body.dataset.generatedAt = snap.generated_at;
  }

  // -- connection ---------------------------------------------------------------------------

  function setConn(kind, text) {
    const node = byId("conn-state");
    node.dataset.state = kind;
    node.textContent = text || { idle: "not connected", connecting: "connecting…", live: "live", reconnecting: "reconnecting…" }[kind];
    byId("board").classList.toggle("stale", kind === "reconnecting");
  }

  function authHeaders(token) {
    return { Authorization: `Bearer ${token}` };
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && typeof body.message === "string") return body.message;
    } catch (_err) {
      // not JSON: fall through
    }
    return `the control plane answered ${resp.status}`;
  }

  function showLogin(message) {
    byId("board").hidden = true;
    byId("sign-out").hidden = true;
    byId("login").hidden = false;
    byId("login-error").textContent = message || "";
    byId("account-name").textContent = "";
    setConn("idle");
    byId("token-input").focus();
  }

  function showBoard() {
    byId("login").hidden = true;
    byId("board").hidden = false;
    byId("sign-out").hidden = false;
    byId("login-error").textContent = "";
  }

  function stopStream() {
    state.generation += 1;
    if (state.controller) state.controller.abort();
    state.controller = null;
  }

  function signOut(message) {
    stopStream();
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(message);
  }

  async function signIn(token) {
    stopStream();
    setConn("connecting");
    let resp;
    try {
      resp = await fetch("/v1/dashboard", { headers: authHeaders(token), cache: "no-store" });
    } catch (err) {
      showLogin(`Cannot reach the control plane: ${err.message}`);
      return;
    }
    if (!resp.ok) {
      const message = await errorMessage(resp);
      if (resp.status === 401 || resp.status === 403) sessionStorage.removeItem(TOKEN_KEY);
      showLogin(message);
      return;
    }
    const snap = await resp.json();
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    byId("token-input").value = "";
    showBoard();
    render(snap);
    follow(state.generation);
  }

  async function follow(generation) {
    let delayMs = 1000;
    while (generation === state.generation) {
      const controller = new AbortController();
      state.controller = controller;
      try {
        const resp = await fetch("/v1/dashboard/stream", {
          headers: { ...authHeaders(state.token), Accept: "text/event-stream" },
          cache: "no-store",
          signal: controller.signal,
        });
        if (resp.status === 401 || resp.status === 403) {
          if (generation === state.generation) signOut(await errorMessage(resp));
          return;
        }
        if (!resp.ok || !resp.body) throw new Error(`the stream answered ${resp.status}`);
        setConn("live");
        delayMs = 1000;
        await readEvents(resp.body, generation);
      } catch (_err) {
        // A dropped connection or an aborted one: retried below unless signed out.
      }
      if (generation !== state.generation) return;
      setConn("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, delayMs)); // back-off before retrying
      delayMs = Math.min(delayMs * 2, 10000);
    }
  }

  async function readEvents(body, generation) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      if (generation !== state.generation) {
        reader.cancel().catch(() => {});
        return;
      }
      buffer += value;
      let cut = buffer.indexOf("\n\n");
      while (cut >= 0) {
        handleEvent(buffer.slice(0, cut), generation);
        buffer = buffer.slice(cut + 2);
        cut = buffer.indexOf("\n\n");
      }
    }
  }

  function handleEvent(block, generation) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length || generation !== state.generation) return;
    const payload = JSON.parse(data.join("\n"));
    if (event === "snapshot") render(payload);
    else if (event === "error" && (payload.status === 401 || payload.status === 403)) signOut(payload.message);
  }

  // -- start --------------------------------------------------------------------------------

  function start() {
    byId("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = byId("token-input").value.trim();
      if (token) signIn(token);
    });
    byId("sign-out").addEventListener("click", () => signOut(""));
    setInterval(tick, 1000);
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) signIn(saved);
    else showLogin("");
  }

  start();
})();
