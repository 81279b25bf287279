// The wanlite page: a form built from the model's json_request_schema, the queue and history
// from the listing and the event stream.  Plain JavaScript, no build step, same origin only.
"use strict";

(() => {
  const KEY_STORE = "wanlite.apiKey"; // sessionStorage: this tab only
  const FPS = 16; // Wan2.1's frame rate (result duration = frames / 16)
  const HISTORY_PAGE = 50;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const STATUS_TEXT = {
    queued: "Queued",
    processing: "Running",
    succeeded: "Done",
    failed: "Failed",
    cancelled: "Cancelled",
  };

  const $ = (sel, root = document) => root.querySelector(sel);
  const state = {
    schema: null,
    modelId: null,
    inputs: new Map(), // schema field name -> input element
    jobs: new Map(), // generation id -> {li, data}
    pending: new Map(), // generation id -> promise of its first fetch
    keyWaiters: [],
    nextBefore: null,
  };

  // -- the API key --------------------------------------------------------------------------
  const getKey = () => sessionStorage.getItem(KEY_STORE);

  function askKey(message) {
    const dialog = $("#key-dialog");
    $("#key-error").textContent = message || "";
    const waiting = new Promise((resolve) => state.keyWaiters.push(resolve));
    if (!dialog.open) {
      $("#api-key").value = "";
      dialog.showModal();
      $("#api-key").focus();
    }
    return waiting;
  }

  function setupKeyDialog() {
    const dialog = $("#key-dialog");
    dialog.addEventListener("cancel", (ev) => ev.preventDefault()); // nothing works without it
    $("#key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("#api-key").value.trim();
      if (!key) {
        $("#key-error").textContent = "Enter the key the server was started with.";
        return;
      }
      sessionStorage.setItem(KEY_STORE, key);
      $("#api-key").value = "";
      dialog.close();
      for (const resolve of state.keyWaiters.splice(0)) resolve();
    });
  }

  // -- HTTP -----------------------------------------------------------------------------------
  class HttpError extends Error {
    constructor(status, body) {
      const err = (body && body.error) || {};
      super(err.message || (body && body.status_message) || `HTTP ${status}`);
      this.status = status;
      this.param = err.param || null;
    }
  }

  // fetch() with the bearer key; a 401 asks for the key (once for all waiting calls) and retries
  async function api(path, options = {}) {
    for (;;) {
      const key = getKey();
      const headers = new Headers(options.headers || {});
      if (key) headers.set("Authorization", `Bearer ${key}`);
      const r = await fetch(path, { ...options, headers, cache: "no-store" });
      if (r.status !== 401) return r;
      if (key && getKey() === key) sessionStorage.removeItem(KEY_STORE);
      await askKey(key ? "The server refused that key: try again." : "");
    }
  }

  async function getJSON(path) {
    const r = await api(path);
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new HttpError(r.status, body);
    return body;
  }

  // Result links from the server name the address it was reached at; the page keeps its own
  // origin (same-origin video and download, whatever name the page was opened with).
  function sameOrigin(url) {
    const u = new URL(url, location.href);
    return u.pathname + u.search;
  }

  // -- the form, from json_request_schema ---------------------------------------------------
  const title = (name) => {
    const text = name.replace(/^num_/, "number of ").replace(/_/g, " ");
    return text.charAt(0).toUpperCase() + text.slice(1);
  };
  const types = (prop) => (Array.isArray(prop.type) ? prop.type : [prop.type]);

  function buildForm(schema) {
    const box = $("#fields");
    box.replaceChildren();
    const required = new Set(schema.required || []);
    for (const [name, prop] of Object.entries(schema.properties)) {
      const id = `field-${name}`;
      const row = document.createElement("div");
      row.className = types(prop).includes("string") ? "field wide" : "field";
      row.dataset.field = name;
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = title(name) + (required.has(name) ? " (required)" : "");
      let input;
      const t = types(prop);
      if (t.includes("string")) {
        input = document.createElement("textarea");
        input.rows = name === "prompt" ? 3 : 2;
        if (prop.default !== undefined) input.value = prop.default;
      } else {
        input = document.createElement("input");
        input.type = "number";
        input.step = t.includes("integer") ? "1" : "any";
        input.inputMode = t.includes("integer") ? "numeric" : "decimal";
        if (prop.minimum !== undefined) input.min = String(prop.minimum);
        if (prop.maximum !== undefined && prop.maximum <= Number.MAX_SAFE_INTEGER) {
          input.max = String(prop.maximum);
        }
        if (prop.default !== undefined && prop.default !== null) input.value = prop.default;
        else if (t.includes("null")) input.placeholder = "random";
      }
      input.id = id;
      input.name = name;
      if (required.has(name)) input.required = true;
      const hint = document.createElement("p");
      hint.className = "hint muted";
      hint.id = `${id}-hint`;
      hint.textContent = hintText(prop);
      const error = document.createElement("p");
      error.className = "field-error";
      error.id = `${id}-error`;
      error.setAttribute("aria-live", "polite");
      input.setAttribute("aria-describedby", `${hint.id} ${error.id}`);
      input.addEventListener("input", () => showFieldError(name, check(name).error));
      row.append(label, input, hint, error);
      box.append(row);
      state.inputs.set(name, input);
    }
    $("#submit").disabled = false;
  }

  function hintText(prop) {
    const parts = [prop.description || ""];
    const numeric = prop.minimum !== undefined || prop.maximum !== undefined;
    if (numeric && prop.maximum <= Number.MAX_SAFE_INTEGER) {
      parts.push(`${prop.minimum} to ${prop.maximum}`);
    }
    if (prop.default !== undefined && prop.default !== null && String(prop.default).trim()) {
      parts.push(`default ${prop.default}`);
    } else if (types(prop).includes("null")) {
      parts.push("empty = random");
    }
    return parts.filter(Boolean).join(" · ");
  }

  // {value, error} of one field: value undefined = leave it out (the server's default)
  function check(name) {
    const prop = state.schema.properties[name];
    const input = state.inputs.get(name);
    const required = (state.schema.required || []).includes(name);
    const t = types(prop);
    const raw = input.value;
    if (t.includes("string")) {
      if (required && raw.trim().length < Math.max(1, prop.minLength || 0)) {
        return { value: raw, error: `${name} is required` };
      }
      if (!required && raw === "") return { value: undefined };
      return { value: raw };
    }
    const text = raw.trim();
    if (text === "") {
      if (input.validity && input.validity.badInput) {
        return { value: undefined, error: `${name} must be a number` };
      }
      if (required) return { value: undefined, error: `${name} is required` };
      return { value: undefined }; // the server's default (or a random seed)
    }
    const lo = prop.minimum;
    const hi = prop.maximum;
    const range = lo !== undefined && hi !== undefined ? ` in [${lo}, ${hi}]` : "";
    if (t.includes("integer")) {
      const msg = `${name} must be an integer${range}, got ${text}`;
      if (!/^-?\d+$/.test(text)) return { value: Number(text), error: msg };
      const big = BigInt(text);
      const out = (lo !== undefined && big < BigInt(lo)) || (hi !== undefined && big > BigInt(hi));
      return { value: big, error: out ? msg : undefined };
    }
    const num = Number(text);
    const msg = `${name} must be a number${range}, got ${text}`;
    if (!Number.isFinite(num)) return { value: text, error: msg };
    const out = (lo !== undefined && num < lo) || (hi !== undefined && num > hi);
    return { value: num, error: out ? msg : undefined };
  }

  function showFieldError(name, message, source = "page") {
    const input = state.inputs.get(name);
    const el = $(`#${input.id}-error`);
    el.textContent = message || "";
    el.dataset.source = source; // the page's own check, or the server's 400
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }

  // JSON with integers as written: seeds go up to 2**63 - 1, beyond a double's exact range
  function toJSON(body) {
    const mark = `@int${Math.random().toString(36).slice(2)}@`;
    const text = JSON.stringify(body, (_, v) => (typeof v === "bigint" ? mark + v + mark : v));
    return text.replace(new RegExp(`"${mark}(-?\\d+)${mark}"`, "g"), "$1");
  }

  async function submit(ev, { validate = true } = {}) {
    if (ev) ev.preventDefault();
    $("#form-error").textContent = "";
    const body = { model: state.modelId };
    let firstBad = null;
    for (const name of state.inputs.keys()) {
      const { value, error } = check(name);
      showFieldError(name, error);
      if (error && !firstBad) firstBad = name;
      if (value !== undefined) body[name] = value;
    }
    if (firstBad && validate) {
      state.inputs.get(firstBad).focus();
      return;
    }
    const button = $("#submit");
    button.disabled = true;
    try {
      const r = await api("api/ai/queue", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: toJSON(body),
      });
      const data = await r.json().catch(() => null);
      if (!r.ok) throw new HttpError(r.status, data);
      for (const g of data.generations) await ensureJob(g.generation_id);
      announce("Generation queued.");
    } catch (e) {
      showSubmitError(e);
    } finally {
      button.disabled = false;
    }
  }

  function showSubmitError(e) {
    if (e.param && state.inputs.has(e.param)) {
      showFieldError(e.param, e.message, "server");
      state.inputs.get(e.param).focus();
    } else {
      $("#form-error").textContent = e.message || String(e);
    }
  }

  // -- jobs -----------------------------------------------------------------------------------
  function announce(text) {
    $("#announcer").textContent = text;
  }

  function describe(d) {
    const p = d.parameters || d;
    const out = [`${p.width}×${p.height}`, `${p.num_frames} frames`];
    out.push(`${p.num_inference_steps} steps`, `guidance ${p.guidance_scale}`);
    return out.join(", ");
  }

  function createJob(d, atEnd = false) {
    const li = $("#job-template").content.firstElementChild.cloneNode(true);
    li.id = `job-${d.generation_id}`;
    li.dataset.id = d.generation_id;
    const prompt = (d.parameters && d.parameters.prompt) || d.prompt || "";
    $(".job-prompt", li).textContent = prompt;
    $(".job-params", li).textContent = describe(d);
    const cancel = $(".job-cancel", li);
    cancel.setAttribute("aria-label", `Cancel: ${prompt}`);
    cancel.addEventListener("click", () => cancelJob(d.generation_id));
    const reuse = $(".job-reuse", li);
    reuse.addEventListener("click", () => reuseSeed(li.dataset.seed));
    const list = $("#job-list");
    if (atEnd) list.append(li);
    else list.prepend(li);
    $("#no-jobs").hidden = true;
    const job = { li, data: {} };
    state.jobs.set(d.generation_id, job);
    return job;
  }

  // Apply a generation object (listing, GET, cancel) or an event's data to its list item.
  function applyJob(d, atEnd = false) {
    const id = d.generation_id;
    const job = state.jobs.get(id) || createJob(d, atEnd);
    const before = job.data.status;
    const data = Object.assign(job.data, d);
    const li = job.li;
    const status = data.status;
    li.dataset.status = status;
    $(".job-status", li).textContent = STATUS_TEXT[status] || status;
    const step = d.progress ? d.progress.step : d.step;
    const total = d.progress ? d.progress.total : d.total;
    if (step !== undefined && total) {
      const bar = $(".job-bar", li);
      bar.max = total;
      bar.value = step;
      bar.setAttribute("aria-label", `Progress: step ${step} of ${total}`);
      $(".job-step", li).textContent = `step ${step} of ${total}`;
      li.dataset.step = step;
    }
    if (d.frames !== undefined && d.num_frames) {
      // a causal job's chunk: the progress is in frames made (the step is their share)
      const made = `${d.frames} of ${d.num_frames} frames`;
      $(".job-step", li).textContent = made;
      $(".job-bar", li).setAttribute("aria-label", `Progress: ${made}`);
    }
    const preview = $(".job-preview", li);
    if (d.preview) {
      preview.src = d.preview;
      preview.alt = `Live preview at step ${step} of ${total}`;
      preview.hidden = false;
      li.dataset.previewStep = step;
    }
    if (data.seed !== null && data.seed !== undefined) {
      li.dataset.seed = data.seed;
      $(".job-seed", li).textContent = `Seed ${data.seed}`;
      $(".job-reuse", li).hidden = false;
      $(".job-reuse", li).setAttribute("aria-label", `Reuse seed ${data.seed}`);
    }
    const active = !TERMINAL.has(status);
    const cancel = $(".job-cancel", li);
    cancel.hidden = !active;
    if (data.cancel_requested && active) {
      cancel.disabled = true;
      cancel.textContent = "Cancelling…";
    }
    const stopped = status === "failed" || status === "cancelled"; // show where it stopped
    const started = Number(li.dataset.step || 0) > 0;
    $(".job-progress", li).hidden = !(status === "processing" || (stopped && started));
    if (!active) preview.hidden = true;
    if (d.stream_url && d.codecs && status === "processing") startLive(id, li, d);
    if (status === "succeeded" && data.result_url) stopLive(id, li);
    else if (!active) stopLive(id, li, false);
    $(".job-error", li).textContent = status === "succeeded" ? "" : data.error_message || "";
    if (status === "succeeded" && data.result_url) showResult(li, data);
    if (before && before !== status && TERMINAL.has(status)) {
      announce(`Generation ${STATUS_TEXT[status].toLowerCase()}: ${data.prompt || ""}`);
    }
    return job;
  }

  function showResult(li, data) {
    const video = $(".job-video", li);
    if (video.getAttribute("src")) return; // a fresh signature each time: keep the first link
    const url = sameOrigin(data.result_url);
    const preview = $(".job-preview", li);
    if (preview.src) video.poster = preview.src;
    video.src = url;
    const frames = (data.parameters || data).num_frames;
    video.setAttribute("aria-label", `Result video: ${data.prompt || ""}`);
    if (frames) video.dataset.expectedDuration = String(frames / FPS);
    const link = $(".job-download", li);
    link.href = url;
    link.download = `${data.generation_id}.mp4`;
    $(".job-result", li).hidden = false;
  }

  // -- a causal job's video while it is made: MediaSource on its growing fragmented MP4 -----
  // Each media_generation_chunk event carries stream_url and the H.264 codecs string; the
  // first one starts a player that appends the stream's bytes (whole MP4 boxes) as they come.
  // A stream that ends while the job still runs (a worker died: the job restarts) is dropped
  // and the next chunk event starts a new one; the finished result replaces it.
  const live = new Map(); // generation id -> {video, ms, url}

  function startLive(id, li, d) {
    if (live.has(id)) return;
    const note = $(".job-live-note", li);
    const type = `video/mp4; codecs="${d.codecs}"`;
    if (!window.MediaSource || !MediaSource.isTypeSupported(type)) {
      li.dataset.live = "unsupported";
      note.textContent = "This browser cannot play the video while it is made.";
      note.hidden = false;
      return;
    }
    const video = $(".job-live", li);
    const ms = new MediaSource();
    const entry = { video, ms, url: URL.createObjectURL(ms) };
    live.set(id, entry);
    video.src = entry.url;
    video.setAttribute("aria-label", `Video so far: ${d.prompt || ""}`);
    video.hidden = false;
    li.dataset.live = "starting";
    ms.addEventListener("sourceopen", () => feedLive(id, li, entry, d.stream_url, type), {
      once: true,
    });
  }

  function appendTo(sb, bytes) {
    return new Promise((resolve, reject) => {
      sb.addEventListener("updateend", resolve, { once: true });
      sb.addEventListener("error", reject, { once: true });
      sb.appendBuffer(bytes);
    });
  }

  async function feedLive(id, li, entry, url, type) {
    try {
      const sb = entry.ms.addSourceBuffer(type);
      const r = await api(sameOrigin(url));
      if (!r.ok || !r.body) throw new HttpError(r.status, await r.json().catch(() => null));
      const reader = r.body.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done || live.get(id) !== entry) break;
        await appendTo(sb, value);
        li.dataset.live = "playing";
        entry.video.play().catch(() => {});
      }
    } catch (e) {
      console.warn("live video:", e);
    }
    if (live.get(id) !== entry) return;
    const job = state.jobs.get(id);
    if (job && job.data.status === "processing") {
      live.delete(id); // the stream ended early (a restart): the next chunk event starts anew
    } else if (entry.ms.readyState === "open") {
      entry.ms.endOfStream();
    }
  }

  function stopLive(id, li, finished = true) {
    const entry = live.get(id);
    if (!entry) return;
    live.delete(id);
    if (finished || !entry.video.currentTime) entry.video.hidden = true; // the result follows
    entry.video.pause();
    URL.revokeObjectURL(entry.url);
    li.dataset.live = "ended";
  }

  // The full object of a generation first seen in an event (its prompt and parameters).
  function ensureJob(id) {
    if (state.jobs.has(id)) return Promise.resolve(state.jobs.get(id));
    if (!state.pending.has(id)) {
      const p = getJSON(`api/ai/queue/${encodeURIComponent(id)}`)
        .then((d) => applyJob(d))
        .catch(() => null)
        .finally(() => state.pending.delete(id));
      state.pending.set(id, p);
    }
    return state.pending.get(id);
  }

  async function cancelJob(id) {
    const job = state.jobs.get(id);
    const button = $(".job-cancel", job.li);
    button.disabled = true;
    button.textContent = "Cancelling…";
    const r = await api(`api/ai/queue/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    const body = await r.json().catch(() => null);
    if (r.ok) applyJob(body);
    else if (r.status !== 409) {
      $(".job-error", job.li).textContent = new HttpError(r.status, body).message;
    }
  }

  function reuseSeed(seed) {
    const input = state.inputs.get("seed");
    if (!input || seed === undefined) return;
    input.value = seed;
    showFieldError("seed", check("seed").error);
    input.focus();
    announce(`Seed ${seed} set in the form.`);
  }

  async function loadHistory(before = null) {
    let path = `api/ai/queue?status=all&limit=${HISTORY_PAGE}`;
    if (before !== null) path += `&before=${before}`;
    const page = await getJSON(path);
    const gens = page.generations; // oldest first
    if (before === null) for (const d of gens) applyJob(d);
    else for (const d of gens.slice().reverse()) applyJob(d, true);
    if (before === null && state.nextBefore !== null) return; // a resync keeps the cursor
    state.nextBefore = page.next_before;
    $("#older").hidden = state.nextBefore === null;
  }

  // -- the event stream: fetch() and a reader (EventSource cannot send the bearer key) ------
  function handleEvent(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length || !name.startsWith("media_generation_")) return;
    const d = JSON.parse(data.join("\n"));
    if (state.jobs.has(d.generation_id)) applyJob(d);
    else ensureJob(d.generation_id).then(() => applyJob(d));
  }

  async function streamEvents() {
    const status = $("#stream-status");
    for (;;) {
      try {
        const r = await api("api/events", { headers: { Accept: "text/event-stream" } });
        if (!r.ok || !r.body) throw new HttpError(r.status, await r.json().catch(() => null));
        status.textContent = "Live updates on.";
        document.body.dataset.stream = "on";
        await loadHistory(); // whatever happened while disconnected
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r/g, "");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            handleEvent(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
          }
        }
      } catch (e) {
        console.warn("event stream:", e);
      }
      document.body.dataset.stream = "off";
      status.textContent = "Live updates lost: reconnecting…";
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  async function watchReady() {
    const el = $("#model-status");
    for (;;) {
      try {
        const r = await fetch("ready", { cache: "no-store" });
        const body = await r.json();
        if (body.status === "ready") {
          el.textContent = `Model ${body.model}: ready`;
          return;
        }
        el.textContent =
          body.status === "failed"
            ? `The model failed to load: ${body.error}`
            : `Model ${body.model}: loading…`;
        if (body.status === "failed") return;
      } catch {
        el.textContent = "Server unreachable: retrying…";
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  async function main() {
    setupKeyDialog();
    $("#generate").addEventListener("submit", submit);
    $("#older").addEventListener("click", () => loadHistory(state.nextBefore));
    watchReady();
    try {
      const models = await getJSON("api/ai/models");
      state.modelId = models.data[0].id;
      const model = await getJSON(`api/ai/models/${encodeURIComponent(state.modelId)}`);
      state.schema = model.json_request_schema;
      buildForm(state.schema);
      await loadHistory();
    } catch (e) {
      $("#form-error").textContent = `Could not load the page's data: ${e.message}`;
      return;
    }
    document.body.dataset.ready = "1";
    streamEvents();
  }

  // For tests and scripts: submit without the page's own checks (to see the server's 400).
  window.wanlite = { submit: (options) => submit(null, options), state };
  main();
})();
