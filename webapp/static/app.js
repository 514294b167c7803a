// maskq's click-to-segment page: a client of the public API (API.md), in plain JavaScript.
//
// Every change of the prompts, the image or the model submits a job with `Prefer: wait`; a newer
// change aborts the older request and cancels its job, and an answer that arrives for anything but
// the latest change is dropped, so a stale mask never replaces a newer one.
"use strict";

const MAX_CANVAS_SIDE = 2048;  // larger photos are shown scaled down; prompts are sent in image pixels
const RECENT_JOBS = 20;
const COLOURS = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
                 [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40], [128, 0, 0]];
const MASK_ALPHA = 140;
const QUICK_ANSWER_S = 2;  // Prefer: wait on submit; past it, the job's event stream shows its progress

const $ = (id) => document.getElementById(id);

const state = {
  key: "",
  maxWait: 30,
  models: [],          // from GET /v1/models
  routes: {},          // GET /v1/models `routes`: which model a job naming none goes to, by prompt kind
  file: null,          // the chosen File
  video: false,        // the File is a clip: prompts go on its first frame, the answer plays back
  playback: null,      // the object URL of the overlay playing, to let go of when replaced
  bitmap: null,        // the browser's upright decoding of it (a clip's first frame), or null when it cannot
  width: 0, height: 0, // image pixels
  scale: 1,            // canvas pixels per image pixel
  prompts: [],         // {kind: "point", x, y, label} | {kind: "box", box: [x0, y0, x1, y1]}, in order
  change: 0,           // bumped on every change: answers for an older one are dropped
  controller: null,    // aborts the latest change's requests
  pendingJob: null,    // the id of the latest change's job while it has not ended
  job: null,           // the job whose masks are shown
  recent: [],
};

// ---------- the API ----------

function authHeaders(extra = {}) {
  return state.key ? {...extra, Authorization: `Bearer ${state.key}`} : extra;
}

class ApiProblem extends Error {
  constructor(status, body) {
    const detail = body && typeof body === "object" && body.detail ? body.detail : null;
    super(detail || `the service answered ${status}`);
    this.status = status;
    this.title = body && body.title;
    this.detail = detail;
  }
}

async function readAnswer(response) {
  const type = response.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await response.json().catch(() => null) : null;
  if (!response.ok) throw new ApiProblem(response.status, body);
  return body;
}

async function api(path, options = {}) {
  const response = await fetch(path, {...options, headers: authHeaders(options.headers || {})});
  return readAnswer(response);
}

// ---------- COCO compressed RLE (pycocotools' rleFrString), column-major over an h x w mask ----------

function rleRuns(counts) {
  const runs = [];
  let p = 0;
  while (p < counts.length) {
    let value = 0, shift = 0, more = true;
    while (more) {
      if (p >= counts.length) throw new Error("counts ends in the middle of a run");
      const c = counts.charCodeAt(p) - 48;
      value |= (c & 0x1f) << shift;
      more = (c & 0x20) !== 0;
      p += 1;
      shift += 5;
      if (!more && (c & 0x10)) value |= -1 << shift;
    }
    if (runs.length > 2) value += runs[runs.length - 2];
    runs.push(value);
  }
  return runs;
}

// Paint the mask's pixels with `colour` into `pixels` (a Uint32Array over a w x h RGBA image).
function paintRle(rle, pixels, colour) {
  const [h, w] = rle.size;
  let index = 0, on = false;
  for (const run of rleRuns(rle.counts)) {
    if (on) {
      let x = Math.floor(index / h), y = index - x * h;
      for (let k = 0; k < run; k++) {
        pixels[y * w + x] = colour;
        if (++y === h) { y = 0; x++; }
      }
    }
    index += run;
    on = !on;
  }
}

function rgba([r, g, b], a) {
  // ImageData is RGBA in memory; a Uint32Array over it is little-endian on every browser platform.
  return ((a << 24) | (b << 16) | (g << 8) | r) >>> 0;
}

// ---------- drawing ----------

function setupCanvases() {
  const w = Math.max(1, Math.round(state.width * state.scale));
  const h = Math.max(1, Math.round(state.height * state.scale));
  for (const id of ["image-layer", "mask-layer", "mark-layer"]) {
    const canvas = $(id);
    canvas.width = w;
    canvas.height = h;
  }
  const ctx = $("image-layer").getContext("2d");
  ctx.fillStyle = "#444";
  ctx.fillRect(0, 0, w, h);
  if (state.bitmap) ctx.drawImage(state.bitmap, 0, 0, w, h);
  $("stage").hidden = false;
}

function drawMasks(job) {
  const canvas = $("mask-layer");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const result = job && job.result;
  const instances = (result && result.instances) || [];
  if (result && instances.some((i) => i.mask)) {
    const full = document.createElement("canvas");
    full.width = result.width;
    full.height = result.height;
    const fullCtx = full.getContext("2d");
    const image = fullCtx.createImageData(result.width, result.height);
    const pixels = new Uint32Array(image.data.buffer);
    instances.forEach((instance, i) => {
      if (instance.mask) paintRle(instance.mask, pixels, rgba(COLOURS[i % COLOURS.length], MASK_ALPHA));
    });
    fullCtx.putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;  // a pixel is in a mask or not: no blended edges
    ctx.drawImage(full, 0, 0, canvas.width, canvas.height);
  }
  $("stage").dataset.jobId = job ? job.id : "";
  if (!job) showModelRan(null);
  drawMarks(instances, result);
  listInstances(instances);
}

function drawMarks(instances = (state.job && state.job.result && state.job.result.instances) || [],
                   result = state.job && state.job.result) {
  const canvas = $("mark-layer");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const s = state.scale;
  ctx.font = "13px system-ui, sans-serif";
  ctx.textBaseline = "bottom";
  const labels = [];  // the labels drawn, as text too (screen readers and tests cannot read a canvas)
  if (result) {
    const sx = canvas.width / result.width, sy = canvas.height / result.height;
    instances.forEach((instance, i) => {
      const [x, y] = instance.bbox;
      const text = `${instance.label || "mask"} ${instance.score.toFixed(2)}`;
      const tw = ctx.measureText(text).width + 6;
      const left = Math.min(Math.max(0, x * sx), canvas.width - tw), top = Math.max(16, y * sy);
      ctx.fillStyle = `rgb(${COLOURS[i % COLOURS.length].join(",")})`;
      ctx.fillRect(left, top - 16, tw, 16);
      ctx.fillStyle = "#fff";
      ctx.fillText(text, left + 3, top - 2);
      labels.push(text);
    });
  }
  canvas.setAttribute("aria-label", labels.join("; "));
  for (const prompt of state.prompts) {
    if (prompt.kind === "point") {
      ctx.beginPath();
      ctx.arc(prompt.x * s, prompt.y * s, 6, 0, 2 * Math.PI);
      ctx.fillStyle = prompt.label ? "#2ecc40" : "#ff4136";
      ctx.fill();
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#fff";
      ctx.stroke();
    } else {
      const [x0, y0, x1, y1] = prompt.box;
      ctx.setLineDash([6, 4]);
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#ffdc00";
      ctx.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
      ctx.setLineDash([]);
    }
  }
}

function listInstances(instances) {
  const list = $("instances");
  list.replaceChildren(...instances.map((instance, i) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = `rgb(${COLOURS[i % COLOURS.length].join(",")})`;
    item.append(swatch, `${instance.label || "mask"} — score ${instance.score.toFixed(2)}, ${instance.area} px`);
    return item;
  }));
  const ended = state.job && state.job.status === "succeeded";
  $("download-coco").disabled = !ended;
  $("download-masks").disabled = !(ended && instances.some((i) => i.png_url));
}

// ---------- status and errors ----------

function showStatus(text, stateName) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = stateName;
}

function showError(error) {
  const box = $("error");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.replaceChildren();
  if (error instanceof ApiProblem && error.title) {
    const title = document.createElement("strong");
    title.textContent = `${error.title} (${error.status}): `;
    box.append(title);
  }
  const detail = document.createElement("span");
  detail.className = "detail";
  detail.textContent = error instanceof ApiProblem ? error.message : `Something went wrong: ${error.message}`;
  box.append(detail);
  box.hidden = false;
}

function describeWaiting(job) {
  if (job.status === "queued") {
    return job.queue_position !== undefined ? `Queued — position ${job.queue_position} in the ${job.lane} lane`
                                           : "Queued";
  }
  if (job.progress) {
    const {frames_done: done, frames_total: total, eta_s: eta} = job.progress;
    return `Following ${job.model.name}: frame ${done} of ${total}${eta !== null ? `, about ${Math.ceil(eta)} s left` : ""}…`;
  }
  return `Running on ${job.model.name}…`;
}

// ---------- following a job live ----------
//
// GET /v1/jobs/{id}/events is a Server-Sent Events stream, read here with fetch(): an EventSource cannot
// send the Authorization header. The server closes a stream after a while; it is resumed with
// Last-Event-ID. Where the stream is refused (the key's waits in use: 429, a busy server: 503) or keeps
// failing, short long-polls take over.

async function followJob(job, signal, onChange) {
  onChange(job);
  // A clip's progress (frames done) is no state move, so no event announces it: poll, as a fallback does.
  if (job.progress) return pollJob(job, signal, onChange);
  try {
    const ended = await streamJob(job, signal, onChange);
    if (ended) return ended;
  } catch (error) {
    if (error.name === "AbortError") throw error;
  }
  return pollJob(job, signal, onChange);
}

// The ended job, or null when the stream kept closing without news (the caller polls then).
async function streamJob(job, signal, onChange) {
  let lastId = null;
  let current = job;
  for (let quiet = 0; quiet < 3;) {
    const headers = authHeaders(lastId === null ? {Accept: "text/event-stream"}
                                                : {Accept: "text/event-stream", "Last-Event-ID": lastId});
    const response = await fetch(`/v1/jobs/${job.id}/events`, {headers, signal});
    if (response.status === 204) return api(`/v1/jobs/${job.id}`, {signal});  // its end was seen already
    if (!response.ok) await readAnswer(response);  // throws the problem
    quiet += 1;
    for await (const event of readEvents(response.body)) {
      quiet = 0;
      if (event.id !== null) lastId = event.id;
      if (event.type === "end") return event.data;
      current = event.type === "position" ? {...current, ...event.data} : event.data;
      onChange(current);
    }
  }
  return null;
}

async function pollJob(job, signal, onChange) {
  while (job.status === "queued" || job.status === "running") {
    // Short long-polls, so that the queue position stays current while the job waits.
    job = await api(`/v1/jobs/${job.id}?wait=${Math.min(2, state.maxWait)}`, {signal});
    if (job.status === "queued" || job.status === "running") onChange(job);
  }
  return job;
}

// The events of a text/event-stream body: {type, id, data (parsed JSON)}; comments (heartbeats) are skipped.
async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", type = "", id = null, data = [];
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();  // the line not finished yet
      for (const line of lines) {
        if (line === "") {  // a blank line ends an event
          if (data.length) yield {type: type || "message", id, data: JSON.parse(data.join("\n"))};
          type = "";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") type = text;
          else if (field === "data") data.push(text);
          else if (field === "id" && !text.includes("\0")) id = text;
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // the end came, or the change was overtaken: close the stream
  }
}

// ---------- jobs ----------

function currentModel() {
  return state.models.find((m) => m.name === $("model").value) || null;
}

// The model that finds objects by name: where a job with text and no model goes (`routes.text`), "objects" as
// config/models.toml names it. Its text comes from the objects box; any other text model's from the text box.
function objectsModelName() {
  return state.routes.text || "objects";
}

function isObjectsModel(model) {
  return Boolean(model) && model.name === objectsModelName();
}

function names(input) {
  return input.value.split(",").map((t) => t.trim()).filter(Boolean);
}

function buildRequest() {
  const model = currentModel();
  const kinds = new Set(model ? model.prompt_kinds : []);
  const prompts = {};
  const text = names(isObjectsModel(model) ? $("objects-prompt") : $("text-prompt"));
  if (kinds.has("text") && text.length) prompts.text = text;
  const points = state.prompts.filter((p) => p.kind === "point").map((p) => [p.x, p.y, p.label]);
  if (kinds.has("points") && points.length) prompts.points = points;
  const boxes = state.prompts.filter((p) => p.kind === "box").map((p) => p.box);
  if (kinds.has("boxes") && boxes.length) prompts.boxes = boxes;
  const request = {outputs: state.video ? ["rle"] : ["rle", "png"]};
  if (state.video) request.video = {overlay: true};  // the masks drawn on the clip, to play back
  if (model) request.model = model.name;
  if (Object.keys(prompts).length) request.prompts = prompts;
  return request;
}

function hasPrompts(request) {
  return Boolean(request.prompts);
}

// A change happened: submit the image with the prompts that fit the model (unless there is nothing to ask).
async function submit({force = false} = {}) {
  const change = ++state.change;
  if (state.controller) state.controller.abort();
  cancelPending();
  const controller = new AbortController();
  state.controller = controller;
  const stale = () => change !== state.change;
  showError(null);
  if (!state.file) return;
  const request = buildRequest();
  if (!hasPrompts(request) && !force) {
    state.job = null;
    drawMasks(null);
    showStatus(promptHint(), "idle");
    return;
  }
  if (!state.key) {
    showStatus("An API key is needed: paste one above.", "idle");
    return;
  }
  const form = new FormData();
  form.append("image", state.file, state.file.name || "upload");
  form.append("request", JSON.stringify(request));
  showStatus("Sending…", "sending");
  try {
    // A quick job is answered in this one round trip; a slower one is followed live (its queue position).
    let job = await api("/v1/jobs", {method: "POST", body: form, signal: controller.signal,
                                     headers: {Prefer: `wait=${Math.min(QUICK_ANSWER_S, state.maxWait)}`}});
    if (stale()) return;
    remember(job);
    state.pendingJob = job.id;
    if (job.status === "queued" || job.status === "running") {
      job = await followJob(job, controller.signal, (now) => {
        if (stale()) return;
        showStatus(describeWaiting(now), now.status);
        remember(now);
      });
      if (stale()) return;
      remember(job);
    }
    state.pendingJob = null;
    showJob(job);
  } catch (error) {
    if (stale() || error.name === "AbortError") return;
    state.pendingJob = null;
    showStatus("Refused.", "error");
    showError(error);
  }
}

function cancelPending() {
  // The job of a change that was overtaken is of no use to anyone: free its worker (best effort).
  const id = state.pendingJob;
  state.pendingJob = null;
  if (id) fetch(`/v1/jobs/${id}`, {method: "DELETE", headers: authHeaders()}).catch(() => {});
}

function showJob(job) {
  state.job = job;
  if (!state.bitmap && job.result) {  // an image only the service could read: draw its masks on grey
    state.width = job.result.width;
    state.height = job.result.height;
    state.scale = Math.min(1, MAX_CANVAS_SIDE / Math.max(state.width, state.height));
    setupCanvases();
  }
  drawMasks(job);
  showModelRan(job);
  showPlayback(job);
  if (job.status === "succeeded" && job.result.video) {
    const objects = job.result.annotations.length;
    showStatus(`${objects} object${objects === 1 ? "" : "s"} followed through ${job.result.video.length} frames ` +
               `by ${job.model.name}.`, "succeeded");
  } else if (job.status === "succeeded") {
    const n = job.result.instances.length;
    const took = job.metrics && job.metrics.total !== undefined ? ` in ${Number(job.metrics.total).toFixed(2)} s` : "";
    showStatus(`${n} mask${n === 1 ? "" : "s"} from ${job.model.name}${took}${job.cached ? " (cached)" : ""}.`,
               "succeeded");
  } else {
    showStatus(`The job ${job.status}.`, job.status);
    if (job.error) showError(new Error(job.error.message || job.error.code));
  }
}

// A clip's answer: its frames with the masks drawn (the job's overlay MP4), played in a loop under the first frame.
async function showPlayback(job) {
  const player = $("playback");
  if (state.playback) URL.revokeObjectURL(state.playback);
  state.playback = null;
  const url = job && job.result && job.result.video && job.result.video.overlay_url;
  player.hidden = !url;
  if (!url) {
    player.removeAttribute("src");
    return;
  }
  // Fetched with the key (a <video src> cannot send it), then played from memory.
  const response = await fetch(new URL(url, location.href).pathname, {headers: authHeaders()});
  if (!response.ok || state.job !== job) return;
  state.playback = URL.createObjectURL(await response.blob());
  player.src = state.playback;
  player.play().catch(() => {});  // autoplay refused: the controls are there
}

// Which model ran, from the job document's `model` (a pipeline's steps from GET /v1/models).
function showModelRan(job) {
  const line = $("model-ran");
  const ran = job && job.model;
  if (!ran || !ran.name) {
    line.hidden = true;
    line.textContent = "";
    line.dataset.model = "";
    return;
  }
  const known = state.models.find((m) => m.name === ran.name);
  const steps = known && known.steps ? ` (${known.steps.join(" → ")})` : "";
  line.textContent = `Model: ${ran.name}${ran.version ? ` ${ran.version}` : ""}${steps}`;
  line.dataset.model = ran.name;
  line.hidden = false;
}

function promptHint() {
  const model = currentModel();
  if (!model) return "Choose a model.";
  const kinds = new Set(model.prompt_kinds);
  if (kinds.has("points") || kinds.has("boxes")) return "Click on the image to segment the object there.";
  if (isObjectsModel(model)) return "Type the objects to find (e.g. cup, person), or click on the image.";
  if (kinds.has("text")) return "Type the text to find.";
  return "Ready.";
}

// ---------- recent jobs ----------

function remember(job) {
  const entry = {id: job.id, status: job.status, model: job.model && job.model.name,
                 file: state.file ? state.file.name : "", when: new Date()};
  const at = state.recent.findIndex((j) => j.id === job.id);
  if (at >= 0) state.recent[at] = {...state.recent[at], status: job.status};
  else state.recent.unshift(entry);
  state.recent.length = Math.min(state.recent.length, RECENT_JOBS);
  const list = $("recent-jobs");
  list.replaceChildren(...state.recent.map((j) => {
    const item = document.createElement("li");
    item.dataset.jobId = j.id;
    const code = document.createElement("code");
    code.textContent = j.id.slice(0, 8);
    code.title = j.id;
    item.append(code, ` ${j.file} · ${j.model || "?"} · `);
    const status = document.createElement("span");
    status.className = `job-status ${j.status}`;
    status.textContent = j.status;
    item.append(status);
    return item;
  }));
}

// ---------- downloads ----------

function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function toCoco(job, fileName) {
  // As domain/coco.py writes it for `maskq segment`: the image, one annotation per instance (the RLE mask
  // as its segmentation), one category for the model.
  const result = job.result;
  return {
    info: {description: "maskq page"},
    images: [{id: 1, file_name: fileName, width: result.width, height: result.height, maskq_job_id: job.id}],
    annotations: result.instances.map((instance, i) => {
      const annotation = {id: i + 1, image_id: 1, category_id: 1, bbox: instance.bbox, area: instance.area,
                          iscrowd: 0, score: instance.score, label: instance.label ?? null};
      if (instance.mask) annotation.segmentation = instance.mask;
      return annotation;
    }),
    categories: [{id: 1, name: job.model.name}],
    failures: [],
  };
}

async function downloadMasks() {
  const job = state.job;
  for (const [i, instance] of job.result.instances.entries()) {
    if (!instance.png_url) continue;
    const name = `${job.id}-mask-${i}.png`;
    const url = new URL(instance.png_url, location.href);
    const own = url.pathname.match(/\/v1\/jobs\/[0-9a-f]+\/files\/masks\/\d+\.png$/);
    if (!own) {  // presigned storage URL: it carries its own signature and wants no key
      window.open(url.href, "_blank", "noopener");
      continue;
    }
    try {
      // The same path on this page's origin: the file needs the key, so it cannot be a plain link.
      const response = await fetch(own[0], {headers: authHeaders()});
      if (!response.ok) await readAnswer(response);
      saveBlob(await response.blob(), name);
    } catch (error) {
      showError(error);
      return;
    }
  }
}

// ---------- the image ----------

async function chooseFile(file) {
  if (!file) return;
  state.file = file;
  state.prompts = [];
  state.job = null;
  state.video = file.type.startsWith("video/");
  showPlayback(null);
  try {
    // EXIF orientation applied, as the service applies it: prompts are in upright pixels (a clip's on frame 0).
    state.bitmap = state.video ? await firstFrame(file) : await createImageBitmap(file, {imageOrientation: "from-image"});
    state.width = state.bitmap.width;
    state.height = state.bitmap.height;
    state.scale = Math.min(1, MAX_CANVAS_SIDE / Math.max(state.width, state.height));
    setupCanvases();
    drawMasks(null);
    updateButtons();
    submit();
  } catch {
    // The browser cannot read it: let the service say what it makes of it (its problem's detail).
    state.bitmap = null;
    $("stage").hidden = true;
    drawMasks(null);
    updateButtons();
    submit({force: true});
  }
}

// A clip's first frame, as the browser decodes it: where its prompts are placed.
async function firstFrame(file) {
  const video = document.createElement("video");
  video.muted = true;
  video.preload = "auto";
  const url = URL.createObjectURL(file);
  try {
    video.src = url;
    await new Promise((resolve, reject) => {
      video.addEventListener("loadeddata", resolve, {once: true});
      video.addEventListener("error", () => reject(new Error("the browser cannot play this clip")), {once: true});
    });
    return await createImageBitmap(video);
  } finally {
    URL.revokeObjectURL(url);
  }
}

// ---------- prompts from the mouse ----------

function imagePoint(event) {
  const rect = $("mark-layer").getBoundingClientRect();
  const x = (event.clientX - rect.left) * (state.width / rect.width);
  const y = (event.clientY - rect.top) * (state.height / rect.height);
  return [Math.round(Math.min(Math.max(x, 0), state.width - 1)), Math.round(Math.min(Math.max(y, 0), state.height - 1))];
}

let drag = null;

function onPointerDown(event) {
  if (!state.bitmap) return;
  drag = {start: imagePoint(event), button: event.button, shift: event.shiftKey, id: event.pointerId};
  $("mark-layer").setPointerCapture(event.pointerId);
  event.preventDefault();
}

function onPointerMove(event) {
  if (!drag || drag.button !== 0) return;
  const [x, y] = imagePoint(event);
  drawMarks();
  const ctx = $("mark-layer").getContext("2d");
  const s = state.scale;
  ctx.setLineDash([6, 4]);
  ctx.strokeStyle = "#ffdc00";
  ctx.lineWidth = 2;
  ctx.strokeRect(drag.start[0] * s, drag.start[1] * s, (x - drag.start[0]) * s, (y - drag.start[1]) * s);
  ctx.setLineDash([]);
}

function onPointerUp(event) {
  if (!drag) return;
  const {start, button, shift} = drag;
  drag = null;
  const end = imagePoint(event);
  const far = Math.hypot((end[0] - start[0]) * state.scale, (end[1] - start[1]) * state.scale) > 5;
  if (far && button === 0) {
    addPrompt({kind: "box", box: [Math.min(start[0], end[0]), Math.min(start[1], end[1]),
                                  Math.max(start[0], end[0]), Math.max(start[1], end[1])]});
  } else if (button === 0 || button === 2) {
    addPrompt({kind: "point", x: start[0], y: start[1], label: button === 2 || shift ? 0 : 1});
  }
}

function addPrompt(prompt) {
  const model = currentModel();
  const kind = prompt.kind === "box" ? "boxes" : "points";
  if (model && !model.prompt_kinds.includes(kind)) {
    $("model-note").textContent = `${model.name} takes no ${kind}; choose a model that does.`;
    drawMarks();
    return;
  }
  state.prompts.push(prompt);
  drawMarks();
  updateButtons();
  submit();
}

function updateButtons() {
  $("undo").disabled = state.prompts.length === 0;
  $("clear").disabled = state.prompts.length === 0;
}

// ---------- settings ----------

async function loadModels() {
  const select = $("model");
  if (!state.key) {
    select.disabled = true;
    return;
  }
  try {
    const body = await api("/v1/models");
    state.models = body.models;
    state.routes = body.routes || {};
    const previous = select.value;
    select.replaceChildren(...body.models.map((m) => {
      const option = document.createElement("option");
      option.value = m.name;
      const note = m.available === false ? " — unavailable" : "";
      option.textContent = `${m.name} (${m.prompt_kinds.join(", ") || "no prompts"})${note}`;
      return option;
    }));
    select.value = body.models.some((m) => m.name === previous) ? previous : (body.default || body.models[0].name);
    select.disabled = false;
    $("key-note").textContent = $("key-note").dataset.source === "link"
      ? "The key from the link is filled in (make run prints the development key's link)." : "Key accepted.";
    onModelChosen({resubmit: false});
  } catch (error) {
    select.disabled = true;
    $("key-note").textContent = "";
    showError(error);
  }
}

function onModelChosen({resubmit = true} = {}) {
  const model = currentModel();
  $("model-note").textContent = model && model.provenance
    ? `${model.version} · ${model.provenance.package} · ${model.provenance.license}` : (model ? model.version : "");
  $("text-field").hidden = !(model && model.prompt_kinds.includes("text")) || isObjectsModel(model);
  if (resubmit) submit(); else if (state.file && !state.job) showStatus(promptHint(), "idle");
}

// The tab's key, kept for its session: from the link `make run` prints (http://127.0.0.1:8000/#key=…), or
// pasted. The server hands out no key: a fragment never leaves the browser, and once read it is taken out
// of the address bar and its history entry.
const KEY_ITEM = "maskq-api-key";

function rememberKey(key) {
  try { sessionStorage.setItem(KEY_ITEM, key); } catch { /* storage off: the key lasts until a reload */ }
}

function useLinkedKey() {
  const linked = new URLSearchParams(location.hash.slice(1)).get("key");
  if (linked) {
    rememberKey(linked);
    history.replaceState(null, "", location.pathname + location.search);
  }
  let key = linked;
  try { key = key || sessionStorage.getItem(KEY_ITEM); } catch { /* storage off */ }
  if (key) {
    $("api-key").value = key;
    state.key = key;
  }
  if (linked) $("key-note").dataset.source = "link";
  return Boolean(linked);
}

async function loadConfig() {
  useLinkedKey();
  window.addEventListener("hashchange", () => useLinkedKey() && loadModels());  // a link opened in this tab
  try {
    const config = await (await fetch("/ui/config")).json();
    state.maxWait = config.max_wait_s || state.maxWait;
  } catch {
    // No settings: the page still works with a pasted key.
  }
  if (!state.key) $("key-note").textContent = "Paste an API key (`maskq keys create --tenant …` prints one).";
  await loadModels();
}

// ---------- wiring ----------

function openChooser() {
  $("file").click();
}

function wire() {
  const zone = $("drop-zone");
  const input = $("file");
  zone.addEventListener("click", openChooser);
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      openChooser();
    }
  });
  input.addEventListener("change", () => chooseFile(input.files[0]).finally(() => { input.value = ""; }));
  for (const target of [zone, $("stage")]) {
    target.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
    target.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    target.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      chooseFile(event.dataTransfer.files[0]);
    });
  }

  const marks = $("mark-layer");
  marks.addEventListener("pointerdown", onPointerDown);
  marks.addEventListener("pointermove", onPointerMove);
  marks.addEventListener("pointerup", onPointerUp);
  marks.addEventListener("contextmenu", (event) => event.preventDefault());

  $("model").addEventListener("change", () => onModelChosen());
  let typing = null;
  $("text-prompt").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => submit(), 600);
  });
  $("text-prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      clearTimeout(typing);
      submit();
    }
  });
  // Object names: typing them chooses the objects model (the one a job with text and no model goes to).
  let naming = null;
  const findObjects = () => {
    const name = objectsModelName();
    if ($("model").value !== name && state.models.some((m) => m.name === name)) {
      $("model").value = name;
      onModelChosen({resubmit: false});
    }
    submit();
  };
  $("objects-prompt").addEventListener("input", () => {
    clearTimeout(naming);
    naming = setTimeout(findObjects, 600);
  });
  $("objects-prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      clearTimeout(naming);
      findObjects();
    }
  });
  let keyTimer = null;
  $("api-key").addEventListener("input", () => {
    clearTimeout(keyTimer);
    keyTimer = setTimeout(() => {
      state.key = $("api-key").value.trim();
      rememberKey(state.key);
      delete $("key-note").dataset.source;
      showError(null);
      loadModels();
    }, 300);
  });
  $("undo").addEventListener("click", () => {
    state.prompts.pop();
    drawMarks();
    updateButtons();
    submit();
  });
  $("clear").addEventListener("click", () => {
    state.prompts = [];
    drawMarks();
    updateButtons();
    submit();
  });
  $("download-coco").addEventListener("click", () => {
    const coco = toCoco(state.job, state.file ? state.file.name : "image");
    saveBlob(new Blob([JSON.stringify(coco, null, 1)], {type: "application/json"}), `${state.job.id}.coco.json`);
  });
  $("download-masks").addEventListener("click", downloadMasks);
}

wire();
loadConfig();
