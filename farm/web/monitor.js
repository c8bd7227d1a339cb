// Farm's Batch Monitor: one page, no build step, no external files.
// It loads the lists once, then follows the controller's event stream (server-sent events
// read through fetch, so that the token travels in a header, never in a URL).
"use strict";

const TERMINAL = new Set(["done", "failed", "cancelled"]);
const STATE_COLOURS = ["done", "running", "failed", "timed_out", "lost", "cancelled"];
const $ = (id) => document.getElementById(id);

const view = {
  token: "", batches: new Map(), jobs: new Map(), nodes: [], expanded: new Set(),
  selected: null, detail: null, lastEvent: 0, renderQueued: false, detailTimer: null,
  shown: 50, // newest batches drawn; a busy controller holds thousands
  search: "", stateFilter: "", // what the batch list is narrowed to (words, one state)
  fetching: new Map(), // batch id -> whether events came while it was being read
  thumbs: new Map(), // job id -> { key, url } of its latest preview (refetched when segments_done moves)
  pictures: new Map(), // attempt id -> object URL of its preview (an attempt's preview never changes)
  previews: [], // the selected job's previews, in segment order
  logFollow: null, // { attempt, next } while the log shown is of a running attempt
  transfers: [], // GET /api/transfers: files moving to and from nodes without shared storage
};
const TRANSFERS_SHOWN = 20; // the newest transfers listed; the nodes' totals count all the controller keeps

// -- talking to the controller -----------------------------------------------------------

class Refused extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const options = { method, headers: { Authorization: `Bearer ${view.token}` } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (!response.ok) {
    throw new Refused(response.status, (data && data.error) || `${response.status} ${response.statusText}`);
  }
  return { data, events: Number(response.headers.get("X-Farm-Events") || 0) };
}

// Pictures are read with the token in a header too, and shown through object URLs.
async function picture(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${view.token}` } });
  if (!response.ok) return null;
  return URL.createObjectURL(await response.blob());
}

function thumbOf(job) {
  const key = `${job.segments_done}/${job.state}`;
  const known = view.thumbs.get(job.id);
  if (!known || known.key !== key) {
    const entry = { key, url: known ? known.url : null };
    view.thumbs.set(job.id, entry);
    picture(`/api/jobs/${encodeURIComponent(job.id)}/preview`).then((url) => {
      if (!url) return;
      if (entry.url) URL.revokeObjectURL(entry.url);
      entry.url = url;
      render();
    });
  }
  return view.thumbs.get(job.id).url;
}

async function loadPreviews(jobId) {
  try {
    const { data } = await api("GET", `/api/jobs/${encodeURIComponent(jobId)}/previews`);
    await Promise.all(data.filter((p) => !view.pictures.has(p.attempt)).map(async (p) => {
      view.pictures.set(p.attempt, await picture(`/api/attempts/${encodeURIComponent(p.attempt)}/preview`));
    }));
    if (view.selected === jobId) view.previews = data.filter((p) => view.pictures.get(p.attempt));
  } catch (error) {
    console.warn("previews", jobId, error);
  }
}

async function loadAll() {
  const [cluster, batches, jobs, nodes] = await Promise.all([
    api("GET", "/api/cluster"), api("GET", "/api/batches"), api("GET", "/api/jobs"), api("GET", "/api/nodes"),
  ]);
  $("cluster").textContent = `cluster ${cluster.data.cluster} · ${cluster.data.api}`;
  view.batches = new Map(batches.data.map((b) => [b.id, b]));
  view.jobs = new Map(jobs.data.map((j) => [j.id, j]));
  view.nodes = nodes.data;
  // the oldest of the three: an event seen twice changes nothing, one missed would
  view.lastEvent = Math.min(batches.events, jobs.events, nodes.events);
  if (view.selected) await loadDetail();
  render();
}

// Transfers are not events: they are read once a second while one moves (or a job is
// unfinished, since its next segment may start one), every five seconds otherwise.
async function followTransfers() {
  for (;;) {
    try {
      view.transfers = (await api("GET", "/api/transfers")).data;
      render();
    } catch (error) {
      if (error.status === 401) return;
      console.warn("transfers", error);
    }
    const busy = view.transfers.some((t) => t.active)
      || [...view.jobs.values()].some((j) => !TERMINAL.has(j.state) && j.state !== "paused");
    await new Promise((resolve) => setTimeout(resolve, busy ? 1000 : 5000));
  }
}

async function follow() {
  for (;;) {
    try {
      const response = await fetch(`/api/events/stream?after=${view.lastEvent}`,
        { headers: { Authorization: `Bearer ${view.token}` } });
      if (response.status === 401) return askForToken("the token was refused");
      if (!response.ok || !response.body) throw new Error(`stream answered ${response.status}`);
      setLive("live");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of block.split("\n")) {
            if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
          }
        }
      }
    } catch (error) {
      console.warn("event stream:", error);
    }
    setLive("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, 2000));
    // the controller may have restarted (event ids start again): read the state afresh
    try { await loadAll(); } catch (error) { if (error.status === 401) return askForToken("the token was refused"); }
  }
}

// -- events ----------------------------------------------------------------------------------

function onEvent(event) {
  view.lastEvent = Math.max(view.lastEvent, event.id);
  if (event.kind === "nodes") {
    view.nodes = event.nodes;
  } else if (event.kind === "batch_submitted") {
    refreshBatch(event.batch);
  } else if (event.job) {
    const job = view.jobs.get(event.job);
    if (!job) {
      refreshBatch(event.batch);
    } else {
      for (const key of ["state", "segments", "segments_done", "error", "waiting", "priority"]) {
        if (key in event) job[key] = event[key];
      }
      if (event.kind === "segment_started" && !job.started) job.started = event.ts;
      if (event.outputs) job.outputs = event.outputs;
      summariseBatch(job.batch);
    }
    if (event.job === view.selected) scheduleDetail();
  }
  render();
}

async function refreshBatch(batchId) {
  // a new batch's first events come together: read it once, and once more if events came meanwhile
  if (view.fetching.has(batchId)) { view.fetching.set(batchId, true); return; }
  view.fetching.set(batchId, false);
  try {
    const { data } = await api("GET", `/api/batches/${encodeURIComponent(batchId)}`);
    const { job_list: jobs, ...batch } = data;
    view.batches.set(batch.id, batch);
    for (const job of jobs) view.jobs.set(job.id, job);
    render();
  } catch (error) {
    console.warn("batch", batchId, error);
  } finally {
    const again = view.fetching.get(batchId);
    view.fetching.delete(batchId);
    if (again) refreshBatch(batchId);
  }
}

function batchState(states) {
  if (states.some((s) => !TERMINAL.has(s))) {
    for (const s of ["running", "assembling", "queued", "paused", "interrupted"]) {
      if (states.includes(s)) return s === "assembling" ? "running" : s;
    }
  }
  if (states.every((s) => s === "done")) return "done";
  return states.includes("failed") ? "failed" : "cancelled";
}

function summariseBatch(batchId) {
  const batch = view.batches.get(batchId);
  if (!batch) return;
  const members = [...view.jobs.values()].filter((j) => j.batch === batchId);
  if (!members.length) return;
  batch.segments = members.reduce((n, j) => n + j.segments, 0);
  batch.segments_done = members.reduce((n, j) => n + j.segments_done, 0);
  batch.state = batchState(members.map((j) => j.state));
  batch.progress = batch.segments ? batch.segments_done / batch.segments : (batch.state === "done" ? 1 : 0);
  const starts = members.map((j) => j.started).filter(Boolean);
  batch.started = starts.length ? Math.min(...starts) : null;
  batch.jobs = members.length;
}

function eta(batch) {
  if (!batch.started || !["running", "queued"].includes(batch.state)) return "";
  const p = batch.progress;
  if (p <= 0 || p >= 1) return "";
  const seconds = (Date.now() / 1000 - batch.started) * (1 - p) / p;
  return `ETA ${duration(seconds)}`;
}

function duration(seconds) {
  if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

// -- drawing -----------------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function pill(state) { return el("span", { class: "pill", "data-state": state }, state); }

function bar(progress, state, label) {
  return el("div", { class: "bar", "data-state": state, role: "progressbar", "aria-label": label,
                     "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(progress * 100) },
            el("span", { style: { width: `${(progress * 100).toFixed(1)}%` } }));
}

function render() {
  if (view.renderQueued) return;
  view.renderQueued = true;
  requestAnimationFrame(() => {
    view.renderQueued = false;
    renderBatches();
    renderNodes();
    renderTransfers();
    renderDetail();
  });
}

// What a batch is, in words: its profiles, its inputs, where it came from (a droplet, a
// chained job, a person's token), so that a row says more than its id.
function batchNames(batch) {
  const members = [...view.jobs.values()].filter((j) => j.batch === batch.id).sort((a, b) => a.created - b.created);
  const profiles = [...new Set(members.map((j) => j.profile))];
  const inputs = members.map((j) => (j.input ? j.input.split("/").pop() : null)).filter(Boolean);
  const origin = batch.origin || "";
  const source = origin.startsWith("droplet:") ? `droplet ${origin.slice(8)}`
    : origin.startsWith("then:") ? `after job ${origin.slice(5)}`
    : origin.startsWith("api:") ? `submitted by ${origin.split(":")[1]}` : `from ${origin}`;
  const shownInputs = inputs.length === 0 ? "no input"
    : inputs.slice(0, 3).join(", ") + (inputs.length > 3 ? ` and ${inputs.length - 3} more` : "");
  return { title: profiles.join(", ") || batch.id, inputs: shownInputs, source,
           states: new Set(members.map((j) => j.state)),
           text: [batch.id, origin, source, ...profiles, ...members.map((j) => `${j.id} ${j.input || ""}`)].join(" ").toLowerCase() };
}

function batchShown(batch, names) {
  const wanted = view.stateFilter;
  if (wanted && batch.state !== wanted && !names.states.has(wanted)) return false;
  const words = view.search.toLowerCase().split(/\s+/).filter(Boolean);
  return words.every((word) => names.text.includes(word));
}

function renderBatches() {
  const everything = [...view.batches.values()].sort((a, b) => b.created - a.created);
  const names = new Map(everything.map((batch) => [batch.id, batchNames(batch)]));
  const all = everything.filter((batch) => batchShown(batch, names.get(batch.id)));
  const batches = all.slice(0, view.shown);
  $("no-batches").hidden = everything.length > 0;
  $("no-match").hidden = !everything.length || all.length > 0;
  const older = all.length - batches.length;
  const more = older > 0 ? el("button", { id: "more-batches", onclick: () => { view.shown += 50; render(); } },
    `Show older batches (${older} more)`) : "";
  $("batches").replaceChildren(...batches.map((batch) => {
    const open = view.expanded.has(batch.id);
    const toggle = () => { open ? view.expanded.delete(batch.id) : view.expanded.add(batch.id); render(); };
    const named = names.get(batch.id);
    const head = el("div", { class: "head", onclick: toggle, "data-batch": batch.id },
      el("strong", { class: "name" }, `${open ? "▾" : "▸"} ${named.title}`),
      bar(batch.progress, batch.state, `batch ${batch.id} progress`),
      pill(batch.state),
      el("div", { class: "inputs name" }, named.inputs, el("span", { class: "muted" }, ` · ${named.source}`)),
      el("div", { class: "facts muted" },
        `${batch.segments_done}/${batch.segments} segments · ${batch.jobs} job${batch.jobs === 1 ? "" : "s"} · `
        + `batch ${batch.id} · ${new Date(batch.created * 1000).toLocaleString()} `,
        el("span", { class: "eta" }, eta(batch)), " ",
        TERMINAL.has(batch.state) ? null : el("button", {
          class: "cancel-batch", onclick: (e) => { e.stopPropagation(); act(`cancel batch ${batch.id} and every unfinished job in it?`, "POST", `/api/batches/${batch.id}/cancel`); },
        }, "Cancel batch")));
    const box = el("div", { class: "batch", "data-state": batch.state, id: `batch-${batch.id}` }, head);
    if (open) box.append(jobTable(batch.id));
    return box;
  }), more);
}

function jobTable(batchId) {
  const jobs = [...view.jobs.values()].filter((j) => j.batch === batchId);
  return el("table", { class: "stack" },
    el("thead", {}, el("tr", {}, ["Job", "Input", "Progress", "State", "Priority", ""].map((h) => el("th", {}, h)))),
    el("tbody", {}, jobs.map((job) => {
      const progress = job.segments ? job.segments_done / job.segments : (job.state === "done" ? 1 : 0);
      const path = `/api/jobs/${job.id}`;
      const open = !TERMINAL.has(job.state);
      return el("tr", { class: `job${job.id === view.selected ? " selected" : ""}`, "data-job": job.id,
                        onclick: () => selectJob(job.id) },
        el("td", { class: "name" }, job.id, el("div", { class: "muted" }, job.profile),
           thumbOf(job) ? el("img", { class: "thumb", src: thumbOf(job), alt: `latest picture of job ${job.id}` }) : null),
        el("td", { class: "name" }, job.input ? job.input.split("/").pop() : "(no input)",
           job.error ? el("div", { class: "reason" }, job.error) : null,
           job.waiting && open ? el("div", { class: "waiting" }, `waiting: ${job.waiting}`) : null),
        el("td", {}, bar(progress, job.state, `job ${job.id} progress`),
           el("div", { class: "muted" }, `${job.segments_done}/${job.segments}`)),
        el("td", {}, pill(job.state)),
        el("td", {}, open ? prioritySelect(job) : String(job.priority)),
        el("td", { class: "actions", onclick: (e) => e.stopPropagation() },
          ["queued", "running"].includes(job.state) ? el("button", { onclick: () => act(null, "POST", `${path}/pause`) }, "Pause") : null,
          job.state === "paused" ? el("button", { onclick: () => act(null, "POST", `${path}/resume`) }, "Resume") : null,
          open ? el("button", { class: "cancel", onclick: () => act(`cancel job ${job.id}? Its running segments are stopped.`, "POST", `${path}/cancel`) }, "Cancel") : null,
          ["failed", "cancelled"].includes(job.state) ? [
            el("button", { onclick: () => act(null, "POST", `${path}/retry`, { segments: "failed" }) }, "Retry failed"),
            el("button", { onclick: () => act(`run every segment of job ${job.id} again?`, "POST", `${path}/retry`, { segments: "all" }) }, "Retry all"),
          ] : null));
    })));
}

function prioritySelect(job) {
  const names = { 10: "high", 0: "normal", "-10": "low" };
  const select = el("select", { "aria-label": `priority of job ${job.id}`,
                                onchange: (e) => act(null, "POST", `/api/jobs/${job.id}/priority`, { priority: e.target.value }) },
    ["high", "normal", "low"].map((name) => el("option", { value: name, selected: names[job.priority] === name }, name)));
  if (!(String(job.priority) in names)) select.prepend(el("option", { value: job.priority, selected: true }, job.priority));
  return select;
}

function renderNodes() {
  $("no-nodes").hidden = view.nodes.length > 0;
  $("nodes").replaceChildren(view.nodes.length ? el("table", { class: "stack" },
    el("thead", {}, el("tr", {}, ["Node", "State", "Load", "Capabilities", ""].map((h) => el("th", {}, h)))),
    el("tbody", {}, view.nodes.map((node) => el("tr", { "data-node": node.name },
      el("td", { class: "name" }, node.name, el("div", { class: "muted" }, node.address),
        nodeTransfers(node.name)),
      el("td", {}, pill(node.state), node.reason ? el("div", { class: "waiting" }, node.reason) : null),
      el("td", {}, el("div", { class: "load", title: `${node.running} of ${node.slots} slots busy` },
        Array.from({ length: node.slots }, (_, i) => el("i", { class: i < node.running ? "on" : "" }))),
        el("div", { class: "muted" }, `${node.running}/${node.slots}`)),
      el("td", { class: "muted name", title: Object.keys(node.capabilities).join(", ") }, capabilities(node)),
      el("td", { class: "actions" }, node.farm === false ? null : node.state === "paused"
        ? el("button", { onclick: () => act(null, "POST", `/api/nodes/${encodeURIComponent(node.name)}/resume`) }, "Resume")
        : el("button", { onclick: () => act(null, "POST", `/api/nodes/${encodeURIComponent(node.name)}/pause`) }, "Pause")))))) : "");
}

function mib(bytes) { return `${(bytes / 1048576).toFixed(1)} MiB`; }

// What went through the controller for a node without shared storage (as `farm nodes` says it).
function nodeTransfers(name) {
  const mine = view.transfers.filter((t) => t.node === name);
  if (!mine.length) return null;
  const sum = (way) => mine.filter((t) => t.direction === way).reduce((n, t) => n + t.bytes, 0);
  const moving = mine.filter((t) => t.active);
  const now = moving.length ? `, ${moving.length} moving at ${mib(moving.reduce((n, t) => n + t.rate, 0))}/s` : "";
  return el("div", { class: "transfer-total", "data-node-transfers": name },
    `no shared storage: ${mib(sum("out"))} sent to it, ${mib(sum("in"))} sent back${now}`);
}

function transferRow(t) {
  const way = t.direction === "out" ? `→ ${t.node}` : `← ${t.node}`;
  const state = t.active ? "moving" : "done";
  const progress = t.size ? (t.offset + t.bytes) / t.size : 1;
  return el("tr", { "data-transfer": `${t.direction}:${t.node}:${t.name}`, "data-state": state },
    el("td", { class: "name" }, t.name, el("div", { class: "muted" }, way)),
    el("td", { class: "name muted" }, t.job || ""),
    el("td", {}, bar(progress, t.active ? "running" : "done", `${t.name} ${way}`),
      el("div", { class: "moved" }, `${mib(t.bytes)} of ${mib(t.size)}${t.offset ? ` (from byte ${t.offset.toLocaleString()})` : ""}`)),
    el("td", { class: "rate" }, `${mib(t.rate)}/s`),
    el("td", {}, pill(state)));
}

function renderTransfers() {
  const shown = [...view.transfers].sort((a, b) => b.started - a.started).slice(0, TRANSFERS_SHOWN);
  $("transfers-section").hidden = !shown.length;
  $("transfers").replaceChildren(shown.length ? el("table", { class: "stack" },
    el("thead", {}, el("tr", {}, ["File", "Job", "Moved", "Rate", ""].map((h) => el("th", {}, h)))),
    el("tbody", {}, shown.map(transferRow))) : "");
}

function capabilities(node) {
  const names = Object.keys(node.capabilities).filter((c) => !c.startsWith("processor:"));
  const encoders = names.filter((c) => c.startsWith("ffmpeg-encoder:")).length;
  const shown = names.filter((c) => !c.startsWith("ffmpeg-encoder:"))
    .map((c) => (node.capabilities[c] ? `${c} ${node.capabilities[c]}` : c));
  return shown.join(", ") + (encoders ? ` (+${encoders} encoders)` : "");
}

// -- one job: its segments on a timeline, per node ------------------------------------------

function selectJob(jobId) {
  view.selected = jobId;
  view.previews = [];
  view.logFollow = null;
  $("log").hidden = $("log-title").hidden = true;
  loadDetail().then(render);
}

function scheduleDetail() {
  clearTimeout(view.detailTimer);
  view.detailTimer = setTimeout(() => loadDetail().then(render), 300);
}

async function loadDetail() {
  try {
    view.detail = (await api("GET", `/api/jobs/${view.selected}`)).data;
    await loadPreviews(view.selected);
  } catch (error) {
    view.detail = null;
    toast(error.message);
  }
}

function renderDetail() {
  const job = view.detail;
  $("job-detail").hidden = !job;
  if (!job) return;
  $("job-title").textContent = `Job ${job.id}`;
  const state = (view.jobs.get(job.id) || job).state; // events may be newer than this detail
  $("job-summary").replaceChildren(el("p", {}, pill(state), ` ${job.profile} · ${job.input || "(no input)"} → ${job.destination}`),
    job.error ? el("p", { class: "reason" }, job.error) : "",
    job.outputs.length ? el("p", { class: "muted name" }, `${job.outputs.length} output(s): ${job.outputs.slice(0, 3).join(", ")}${job.outputs.length > 3 ? " …" : ""}`) : "",
    jobTransfers(job.id));
  $("strip-title").hidden = !view.previews.length;
  $("strip").replaceChildren(...view.previews.map((p) => el("figure", { "data-attempt": p.attempt },
    el("img", { src: view.pictures.get(p.attempt), alt: `${p.label} on ${p.node}`, title: `${p.label} on ${p.node}`,
                onclick: () => showLog(p.attempt) }),
    el("figcaption", {}, p.label))));
  const attempts = job.segment_list.flatMap((s) => s.attempts.map((a) => ({ ...a, label: s.label })));
  const now = Date.now() / 1000;
  const t0 = Math.min(...attempts.map((a) => a.started));
  const t1 = Math.max(...attempts.map((a) => a.ended || now), t0 + 1);
  const lanes = [...new Set(attempts.map((a) => a.node))].sort();
  const waiting = job.segment_list.filter((s) => s.state === "queued").length;
  $("timeline").replaceChildren(
    ...lanes.map((node) => {
      const rows = packRows(attempts.filter((a) => a.node === node), now);
      return el("div", { class: "lane", "data-lane": node },
        el("span", { class: "name" }, node),
        el("div", { class: "track", style: { height: `${rows.length * 1.2 + 0.3}rem` } }, rows.flatMap((row, r) => row.map((a) => {
          const left = ((a.started - t0) / (t1 - t0)) * 100;
          const width = (((a.ended || now) - a.started) / (t1 - t0)) * 100;
          const text = `${a.label} · ${a.state} · ${duration((a.ended || now) - a.started)}${a.reason ? ` · ${a.reason}` : ""}`;
          return el("button", { class: "seg", "data-state": a.state, "data-attempt": a.id, title: text, "aria-label": text,
                                style: { left: `${left}%`, width: `${Math.max(width, 0.4)}%`, top: `${r * 1.2 + 0.15}rem` },
                                onclick: () => showLog(a.id) });
        }))));
    }),
    attempts.length ? "" : el("p", { class: "muted" }, "No segment has started yet."),
    waiting ? el("p", { class: "muted" }, `${waiting} segment(s) waiting`) : "");
  $("legend").replaceChildren(...STATE_COLOURS.map((s) => el("span", {}, el("i", { class: "seg-key", style: { background: `var(--${s === "timed_out" ? "failed" : s})` } }), s)));
}

// A job's files moved for nodes without shared storage: its totals (from the transfers the page follows).
function jobTransfers(jobId) {
  const mine = view.transfers.filter((t) => t.job === jobId);
  if (!mine.length) return "";
  const out = mine.filter((t) => t.direction === "out").reduce((n, t) => n + t.bytes, 0);
  const back = mine.filter((t) => t.direction === "in").reduce((n, t) => n + t.bytes, 0);
  const moving = mine.filter((t) => t.active).length;
  return el("p", { class: "muted", id: "job-transfers" },
    `transfers: ${mib(out)} sent to nodes without shared storage, ${mib(back)} sent back`
    + (moving ? `, ${moving} moving` : ""));
}

// A node runs several segments at once (its slots): attempts that overlap go on rows of their own.
function packRows(attempts, now) {
  const rows = [];
  for (const attempt of [...attempts].sort((a, b) => a.started - b.started)) {
    const row = rows.find((r) => (r[r.length - 1].ended || now) <= attempt.started);
    if (row) row.push(attempt); else rows.push([attempt]);
  }
  return rows;
}

// A running attempt's log grows on the page as its node writes it (read every second
// from where the last read ended); once the attempt ends, the stored log replaces it.
async function showLog(attemptId) {
  view.logFollow = null;
  try {
    const { data } = await api("GET", `/api/attempts/${encodeURIComponent(attemptId)}/log`);
    $("log-title").textContent = `Log of ${data.id} on ${data.node} (${data.state}${data.exit_status !== null ? `, exit ${data.exit_status}` : ""})`;
    $("log").textContent = [data.reason ? `reason: ${data.reason}\n` : "", data.log || (data.live ? "" : "(no output)")].join("");
    $("log").hidden = $("log-title").hidden = false;
    if (data.live) {
      view.logFollow = { attempt: attemptId, next: data.next };
      setTimeout(() => followLog(view.logFollow), 1000);
    }
  } catch (error) {
    toast(error.message);
  }
}

async function followLog(following) {
  if (view.logFollow !== following) return; // another log was opened meanwhile
  try {
    const { data } = await api("GET", `/api/attempts/${encodeURIComponent(following.attempt)}/log?after=${following.next}`);
    if (view.logFollow !== following) return;
    if (!data.live) return showLog(following.attempt);
    if (data.log) $("log").append(data.log);
    following.next = data.next;
  } catch (error) {
    console.warn("log", following.attempt, error);
  }
  setTimeout(() => followLog(following), 1000);
}

// -- actions ---------------------------------------------------------------------------------

async function act(question, method, path, body) {
  if (question && !(await confirmed(question))) return;
  try {
    await api(method, path, body);
    toast(`${path.split("/").slice(-2).join(" ")}: done`);
  } catch (error) {
    toast(error.message);
  }
}

function confirmed(question) {
  const dialog = $("confirm");
  $("confirm-text").textContent = question[0].toUpperCase() + question.slice(1);
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
    dialog.showModal();
  });
}

let toastTimer = null;
function toast(message) {
  $("toast").textContent = message;
  $("toast").hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { $("toast").hidden = true; }, 4000);
}

function setLive(state) {
  $("live").dataset.state = state;
  $("live").textContent = state;
}

// -- starting ----------------------------------------------------------------------------------

function askForToken(message) {
  sessionStorage.removeItem("farm-token");
  $("monitor").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setLive("offline");
}

async function start() {
  try {
    await loadAll();
  } catch (error) {
    return askForToken(error.status === 401 ? "the token was refused" : error.message);
  }
  sessionStorage.setItem("farm-token", view.token);
  $("login").hidden = true;
  $("monitor").hidden = false;
  follow();
  followTransfers();
  setInterval(render, 5000); // ETAs and running bars move with the clock
}

$("batch-search").addEventListener("input", (event) => { view.search = event.target.value; render(); });
$("batch-state").addEventListener("change", (event) => { view.stateFilter = event.target.value; render(); });

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  view.token = $("token").value.trim();
  start();
});

const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromLink) history.replaceState(null, "", location.pathname); // keep the token out of history
view.token = fromLink || sessionStorage.getItem("farm-token") || "";
if (view.token) start(); else askForToken();
