/* sd35's generation page, on the native job API (no framework, no build step).
 *
 * Calls: GET /v1/info (model, defaults, names, limits), POST /v1/tokenize (token counts), POST /v1/jobs
 * (the GenerateRequest as JSON), GET /v1/jobs/{id}/events (Server-Sent Events, read with fetch() because
 * EventSource cannot send the API key), DELETE /v1/jobs/{id} (cancel), GET /v1/jobs (the gallery),
 * GET /v1/images/{name} (fetched as blobs, for the same reason), GET /sdapi/v1/loras and
 * POST /sdapi/v1/png-info (the settings a dropped PNG carries).
 */
"use strict";

(() => {
  const KEY_STORE = "sd35.apiKey";
  const JOB_STORE = "sd35.job"; // the job this tab follows, so a reload reconnects to it
  const STALL_MS = 20000; // no byte for this long (the server sends keep-alives every 5 s): reconnect
  const $ = (id) => document.getElementById(id);

  const state = {
    key: sessionStorage.getItem(KEY_STORE),
    info: null,
    loras: [],
    job: null, // {id, started, final, abort}
    lastSeed: null,
    init: null, // {dataUrl, width, height, name}
    items: new Map(), // gallery: "jobid/i" -> item
    keyPrompt: null,
  };

  // What the page rendered, for tests and debugging: every progress step drawn, and the job events.
  const trace = { progress: [], events: [] };
  window.sd35page = trace;

  // ------------------------------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, message, param, retryAfter) {
      super(message);
      this.status = status;
      this.param = param || null;
      this.retryAfter = retryAfter;
    }
  }

  function askKey(message) {
    if (!state.keyPrompt) {
      state.keyPrompt = new Promise((resolve) => {
        const dialog = $("key-dialog");
        $("key-message").textContent = message;
        $("key-input").value = "";
        $("key-form").onsubmit = (e) => {
          e.preventDefault();
          const key = $("key-input").value.trim();
          if (!key) return;
          state.key = key;
          sessionStorage.setItem(KEY_STORE, key);
          $("key-button").hidden = false;
          dialog.close();
          state.keyPrompt = null;
          resolve();
        };
        dialog.showModal();
        $("key-input").focus();
      });
    }
    return state.keyPrompt;
  }

  async function errorOf(res) {
    let message = `${res.status} ${res.statusText}`;
    let param = null;
    try {
      const body = await res.json();
      if (body && typeof body.error === "object" && body.error) {
        message = body.error.message || message;
        param = body.error.param;
      } else if (body && body.detail) {
        message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      }
    } catch (_) {
      /* not JSON: keep the status line */
    }
    const retry = Number(res.headers.get("Retry-After")) || null;
    if (res.status === 413) {
      const mb = state.info ? Number((state.info.limits.max_body_bytes / 2 ** 20).toPrecision(3)) : "?";
      message = `The request is too large for this server (at most ${mb} MB): use a smaller image.`;
      param = param || (state.init ? "edit.image" : null);
    } else if (res.status === 429) {
      message = `${message} Try again in ${retry || 5} s.`;
    }
    return new ApiError(res.status, message, param, retry);
  }

  // fetch() with the API key; asks for the key on a 401 and tries again. Returns the JSON, or with
  // raw the Response; a 4xx/5xx is thrown as an ApiError.
  async function api(path, { method = "GET", body, signal, raw = false } = {}) {
    for (;;) {
      const headers = {};
      if (state.key) headers.Authorization = `Bearer ${state.key}`;
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const res = await fetch(path, {
        method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (res.status === 401) {
        await askKey(state.key ? "The server did not accept this key; enter it again." : "This server needs an API key.");
        continue;
      }
      if (!res.ok) throw await errorOf(res);
      return raw ? res : res.json();
    }
  }

  const samePath = (url) => new URL(url, location.href).pathname;

  async function blobUrl(url) {
    const res = await api(samePath(url), { raw: true });
    return URL.createObjectURL(await res.blob());
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // --------------------------------------------------------------------------- messages by field

  function fieldFor(param) {
    // "slg.layers" -> the input #slg-layers and the message #err-slg-layers; a deeper name
    // ("slg.layers.0") falls back to its parent, an unknown one to the general message.
    let parts = String(param || "").split(".").filter(Boolean);
    while (parts.length) {
      const id = parts.join("-");
      if ($(`err-${id}`)) return id;
      parts = parts.slice(0, -1);
    }
    return "general";
  }

  function showError(param, message, { focus = true } = {}) {
    const id = fieldFor(param);
    const box = $(`err-${id}`);
    box.textContent = message;
    box.hidden = false;
    const input = $(id);
    const section = box.closest("details");
    if (section) section.open = true;
    if (input && id !== "general") {
      input.setAttribute("aria-invalid", "true");
      if (focus) input.focus({ preventScroll: true });
    }
    if (focus) box.scrollIntoView({ block: "center" });
  }

  function clearError(id) {
    const box = $(`err-${id}`);
    if (box) {
      box.hidden = true;
      box.textContent = "";
    }
    const input = $(id);
    if (input) input.removeAttribute("aria-invalid");
  }

  function clearErrors() {
    document.querySelectorAll(".error").forEach((box) => {
      if (box.id.startsWith("err-")) clearError(box.id.slice(4));
    });
  }

  let toastTimer = null;
  function toast(message) {
    const t = $("toast");
    t.textContent = message;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => (t.hidden = true), 5000);
  }

  function setConnection(message, kind = "warn") {
    const c = $("connection");
    c.hidden = !message;
    c.textContent = message || "";
    c.classList.toggle("error", kind === "error");
  }

  function handleError(e, fallbackParam = null) {
    if (e instanceof ApiError) {
      showError(e.param || fallbackParam, e.message);
    } else if (e.name !== "AbortError") {
      showError(null, `Cannot reach the server (${e.message}).`);
    }
  }

  // ------------------------------------------------------------------------------------ the form

  const NUMBERS = ["width", "height", "steps", "cfg", "shift", "seed", "num_images"];

  function option(value, label) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    return o;
  }

  function num(id) {
    const v = $(id).value.trim();
    if (v === "") return undefined;
    const n = Number(v);
    return Number.isFinite(n) ? n : v; // the server names what is wrong with it
  }

  function setValue(id, value) {
    $(id).value = value === undefined || value === null ? "" : String(value);
  }

  // The model-dependent choices and hints (the selected values are kept where they still exist).
  function fillChoices(info) {
    const d = info.defaults;
    const keep = ["model", "sampler", "scheduler", "hires-upscaler"].map((id) => [id, $(id).value]);
    $("model").replaceChildren(...info.models.map((m) => option(m, m)));
    $("sampler").replaceChildren(option("", "model default"), ...info.samplers.map((s) => option(s.name, s.label)));
    $("scheduler").replaceChildren(option("", "model default"), ...info.schedulers.map((s) => option(s.name, s.label)));
    $("hires-upscaler").replaceChildren(...info.upscalers.map((u) => option(u, u)));
    for (const [id, value] of keep) if (value && [...$(id).options].some((o) => o.value === value)) $(id).value = value;
    if (!keep[0][1]) $("model").value = info.default_model;
    $("preset").replaceChildren(
      option("", "Custom"),
      ...info.size_presets.map((p) => option(`${p.width}x${p.height}`, `${p.label} — ${p.width} × ${p.height}`)),
    );
    for (const id of ["width", "height"]) $(id).max = info.limits.max_size;
    $("steps").max = info.limits.max_steps;
    $("num_images").max = info.limits.max_batch;
    $("slg-hint").textContent =
      `Joint blocks to skip (0 to ${d.depth - 1}; this model's: ${d.slg.layers.join(",")}), ` +
      "and the window as fractions of the steps.";
    $("slg-layers").placeholder = d.slg.layers.join(",");
    $("edit-section").hidden = !d.img2img;
  }

  const MODEL_FIELDS = ["width", "height", "steps", "cfg", "shift", "sampler", "scheduler"];

  // The loaded model's defaults in the model-dependent fields (with onlyBlank: in those left empty).
  function applyDefaults({ onlyBlank = false } = {}) {
    const d = state.info.defaults;
    for (const id of MODEL_FIELDS) if (!onlyBlank || $(id).value === "") setValue(id, d[id]);
    syncPreset();
  }

  // The loaded model's defaults, SLG and hires off, no LoRAs (the current init image stays).
  function resetForm() {
    const d = state.info.defaults;
    applyDefaults();
    setValue("seed", -1);
    setValue("num_images", 1);
    $("slg-on").checked = false;
    setValue("slg-layers", d.slg.layers.join(","));
    setValue("slg-scale", d.slg.scale);
    setValue("slg-start", d.slg.start);
    setValue("slg-end", d.slg.end);
    $("hires-on").checked = false;
    setValue("hires-scale", 2);
    setValue("hires-steps", "");
    setValue("hires-strength", 0.5);
    $("hires-upscaler").value = state.info.upscalers[0];
    $("lora-list").replaceChildren();
    $("control-list").replaceChildren();
    setValue("edit-strength", "");
    setValue("edit-mask_blur", "");
    syncPreset();
    syncBadges();
  }

  function syncPreset() {
    const value = `${$("width").value}x${$("height").value}`;
    const known = [...$("preset").options].some((o) => o.value === value);
    $("preset").value = known ? value : "";
  }

  function syncBadges() {
    $("slg-badge").hidden = !$("slg-on").checked;
    $("hires-badge").hidden = !$("hires-on").checked;
    const n = $("lora-list").children.length;
    $("loras-badge").hidden = n === 0;
    $("loras-badge").textContent = String(n);
    const units = $("control-list").children.length;
    $("controls-badge").hidden = units === 0;
    $("controls-badge").textContent = String(units);
    $("edit-badge").hidden = !state.init;
    $("edit-badge").textContent = state.init ? (maskPainted() ? "inpaint" : "img2img") : "";
  }

  function parseLayers(text) {
    const parts = text.split(/[\s,]+/).filter(Boolean);
    if (!parts.length) return undefined;
    const layers = parts.map(Number);
    if (layers.some((n) => !Number.isInteger(n))) {
      throw new FieldError("slg.layers", `Layers are block numbers separated by commas, such as ${state.info.defaults.slg.layers.join(",")}.`);
    }
    return layers;
  }

  class FieldError extends Error {
    constructor(param, message) {
      super(message);
      this.param = param;
    }
  }

  // The request the form describes: a JobCreate (a field left empty takes the model's default).
  function readForm() {
    const body = { model: $("model").value || undefined, prompt: $("prompt").value, negative_prompt: $("negative_prompt").value };
    for (const id of NUMBERS) body[id] = num(id);
    body.sampler = $("sampler").value || undefined;
    body.scheduler = $("scheduler").value || undefined;
    if ($("slg-on").checked) {
      body.slg = {
        layers: parseLayers($("slg-layers").value),
        scale: num("slg-scale"),
        start: num("slg-start"),
        end: num("slg-end"),
      };
    }
    if ($("hires-on").checked) {
      body.hires = {
        scale: num("hires-scale"),
        steps: num("hires-steps"),
        strength: num("hires-strength"),
        upscaler: $("hires-upscaler").value,
      };
    }
    const loras = [...$("lora-list").children].map((li) => ({
      name: li.dataset.name,
      strength: Number(li.querySelector("input").value || 1),
    }));
    if (loras.length) body.loras = loras;
    const controls = [...$("control-list").children].map((li) => {
      const [strength, start, end] = [...li.querySelectorAll("input")].map((i) => Number(i.value));
      const { name, image, preprocess, resize } = li.dataset;
      return { model: name, image, preprocess, resize_mode: resize, strength, start, end };
    });
    if (controls.length) body.controls = controls;
    if (state.init) {
      body.edit = { image: state.init.dataUrl, strength: num("edit-strength"), mask_blur: num("edit-mask_blur") };
      if (maskPainted()) body.edit.mask = maskDataUrl();
    }
    return JSON.parse(JSON.stringify(body)); // drops the undefined fields
  }

  // Fill the form from a job's resolved settings (a JobCreate without its images).
  function fillForm(s, { model } = {}) {
    resetForm();
    $("prompt").value = s.prompt || "";
    $("negative_prompt").value = s.negative_prompt || "";
    for (const id of NUMBERS) if (s[id] !== undefined) setValue(id, s[id]);
    if (s.sampler) $("sampler").value = s.sampler;
    if (s.scheduler) $("scheduler").value = s.scheduler;
    if (s.slg) {
      $("slg-on").checked = true;
      if (s.slg.layers) setValue("slg-layers", s.slg.layers.join(","));
      for (const k of ["scale", "start", "end"]) if (s.slg[k] !== undefined) setValue(`slg-${k}`, s.slg[k]);
    }
    if (s.hires) {
      $("hires-on").checked = true;
      for (const k of ["scale", "steps", "strength"]) if (s.hires[k] !== undefined) setValue(`hires-${k}`, s.hires[k]);
      if (s.hires.upscaler) $("hires-upscaler").value = s.hires.upscaler;
    }
    const missing = [];
    for (const ref of s.loras || []) {
      if (state.loras.includes(ref.name)) addLora(ref.name, ref.strength);
      else missing.push(ref.name);
    }
    // a job's settings keep no images: its ControlNet units cannot be filled back in
    if ((s.controls || []).length) missing.push("ControlNet images");
    if (s.edit) {
      if (s.edit.strength !== undefined) setValue("edit-strength", s.edit.strength);
      if (s.edit.mask_blur !== undefined) setValue("edit-mask_blur", s.edit.mask_blur);
    }
    if (model) {
      if (state.info.models.includes(model)) $("model").value = model;
      else missing.push(`model ${model}`);
    }
    syncPreset();
    syncBadges();
    countTokens("prompt");
    countTokens("negative_prompt");
    return missing;
  }

  // ------------------------------------------------------------------------------------ LoRAs

  // A list entry's "Remove" button (LoRAs and ControlNet units).
  function removeButton(li, name) {
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "quiet";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove ${name}`);
    remove.onclick = () => {
      li.remove();
      syncBadges();
    };
    return remove;
  }

  function addLora(name, strength = 1) {
    const list = $("lora-list");
    const existing = [...list.children].find((li) => li.dataset.name === name);
    if (existing) {
      existing.querySelector("input").value = strength;
      return;
    }
    const li = document.createElement("li");
    li.dataset.name = name;
    const label = document.createElement("label");
    label.className = "name";
    label.textContent = name;
    label.htmlFor = `lora-strength-${list.children.length}-${name}`;
    const input = document.createElement("input");
    Object.assign(input, { type: "number", step: "0.05", value: String(strength), id: label.htmlFor, inputMode: "decimal" });
    input.setAttribute("aria-label", `${name} strength`);
    li.append(label, input, removeButton(li, name));
    list.append(li);
    syncBadges();
  }

  async function loadLoras() {
    const list = await api("/sdapi/v1/loras");
    state.loras = list.map((l) => l.name);
    $("lora-pick").replaceChildren(...state.loras.map((n) => option(n, n)));
    $("lora-empty").hidden = state.loras.length > 0;
    $("lora-pick").disabled = $("lora-add").disabled = state.loras.length === 0;
  }

  // ------------------------------------------------------------------------------------ ControlNet

  function numberInput(value, step, label, min, max) {
    const input = document.createElement("input");
    Object.assign(input, { type: "number", step, value: String(value), min, max, inputMode: "decimal" });
    input.setAttribute("aria-label", label);
    return input;
  }

  async function addControl() {
    const name = $("control-pick").value;
    const file = $("control-file").files[0];
    if (!name || !file) {
      showError("controls", "Pick a ControlNet and a control image first.");
      return;
    }
    clearError("controls");
    const li = document.createElement("li");
    Object.assign(li.dataset, {
      name,
      image: await readDataUrl(file),
      preprocess: $("control-preprocess").value,
      resize: $("control-resize").value,
    });
    const thumb = document.createElement("img");
    thumb.src = li.dataset.image;
    thumb.alt = `control image for ${name}`;
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = `${name} (${li.dataset.preprocess})`;
    li.append(
      thumb,
      label,
      numberInput(1, "0.05", `${name} strength`, "0", "10"),
      numberInput(0, "0.05", `${name} start`, "0", "1"),
      numberInput(1, "0.05", `${name} end`, "0", "1"),
      removeButton(li, name),
    );
    $("control-list").append(li);
    $("control-file").value = "";
    syncBadges();
  }

  function loadControlNets() {
    const names = state.info.controlnets || [];
    $("control-pick").replaceChildren(...names.map((n) => option(n, n)));
    $("control-empty").hidden = names.length > 0;
    $("control-pick").disabled = $("control-add").disabled = names.length === 0;
  }

  // ------------------------------------------------------------------------------- token counts

  const tokenTimers = {};
  function countTokens(id) {
    clearTimeout(tokenTimers[id]);
    tokenTimers[id] = setTimeout(async () => {
      const out = $(`${id}-tokens`);
      const prompt = $(id).value;
      if (!prompt.trim()) {
        out.textContent = "";
        out.classList.remove("warn");
        return;
      }
      try {
        const c = await api("/v1/tokenize", { method: "POST", body: { prompt } });
        if ($(id).value !== prompt) return; // a newer count is on its way
        let text = `CLIP ${c.clip.tokens} / ${c.clip.limit}`;
        if (c.t5) text += ` · T5 ${c.t5.tokens} / ${c.t5.limit} tokens`;
        const notes = [];
        if (c.t5 && c.t5.dropped) {
          notes.push(`T5 reads at most ${c.t5.limit} tokens (the model card's limit): the last ${c.t5.dropped} are cut`);
        }
        if (c.clip.dropped) notes.push(`CLIP sees the first ${c.clip.limit}; ${c.clip.dropped} more reach T5 only`);
        out.textContent = notes.length ? `${text} — ${notes.join("; ")}.` : text;
        out.classList.toggle("warn", Boolean(c.t5 && c.t5.dropped));
      } catch (e) {
        if (e instanceof ApiError && e.status === 429) { // a model is loading: count again when it is
          out.textContent = "";
          setTimeout(() => countTokens(id), (e.retryAfter || 5) * 1000);
          return;
        }
        out.textContent = e instanceof ApiError ? e.message : "";
      }
    }, 250);
  }

  // ------------------------------------------------------------------------- img2img and mask

  const initCanvas = $("init-canvas");
  const maskCanvas = $("mask-canvas");
  const maskCtx = maskCanvas.getContext("2d");
  let maskDirty = false; // whether anything is painted (kept, so a read of the pixels is rarely needed)

  function readDataUrl(blob) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);
      r.onerror = () => reject(r.error);
      r.readAsDataURL(blob);
    });
  }

  async function loadInitImage(blob, name = "image") {
    let bitmap;
    try {
      bitmap = await createImageBitmap(blob);
    } catch (_) {
      showError("edit.image", `${name} cannot be read as an image (PNG, JPEG or WebP).`);
      return;
    }
    clearError("edit-image");
    const dataUrl = await readDataUrl(blob);
    state.init = { dataUrl, width: bitmap.width, height: bitmap.height, name };
    for (const c of [initCanvas, maskCanvas]) {
      c.width = bitmap.width;
      c.height = bitmap.height;
    }
    initCanvas.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    clearMask();
    $("editor").hidden = false;
    $("edit-section").open = true;
    // the size of the result: the image's, fitted to the model and rounded down to multiples of 16
    const d = state.info.defaults;
    const largest = Math.min(d.trained_size, state.info.limits.max_size, d.max_image_size);
    const scale = Math.min(1, largest / Math.max(state.init.width, state.init.height));
    setValue("width", Math.max(16, Math.floor((state.init.width * scale) / 16) * 16));
    setValue("height", Math.max(16, Math.floor((state.init.height * scale) / 16) * 16));
    syncPreset();
    syncBadges();
  }

  function removeInitImage() {
    state.init = null;
    $("editor").hidden = true;
    clearMask();
    syncBadges();
  }

  function clearMask() {
    maskCtx.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
    maskDirty = false;
    syncBadges();
  }

  function maskPainted() {
    if (!state.init || !maskDirty) return false;
    const { data } = maskCtx.getImageData(0, 0, maskCanvas.width, maskCanvas.height);
    for (let i = 3; i < data.length; i += 4) if (data[i]) return true;
    return false;
  }

  function invertMask() {
    const img = maskCtx.getImageData(0, 0, maskCanvas.width, maskCanvas.height);
    const d = img.data;
    for (let i = 0; i < d.length; i += 4) {
      d[i] = 255;
      d[i + 1] = 40;
      d[i + 2] = 100;
      d[i + 3] = 255 - d[i + 3];
    }
    maskCtx.putImageData(img, 0, 0);
    maskDirty = true;
    syncBadges();
  }

  // The mask as the API takes it: a PNG of the image's size, white = repaint, black = keep.
  function maskDataUrl() {
    const { width, height } = maskCanvas;
    const white = document.createElement("canvas");
    Object.assign(white, { width, height });
    const w = white.getContext("2d");
    w.drawImage(maskCanvas, 0, 0);
    w.globalCompositeOperation = "source-in";
    w.fillStyle = "#fff";
    w.fillRect(0, 0, width, height);
    const out = document.createElement("canvas");
    Object.assign(out, { width, height });
    const o = out.getContext("2d");
    o.fillStyle = "#000";
    o.fillRect(0, 0, width, height);
    o.drawImage(white, 0, 0);
    return out.toDataURL("image/png");
  }

  function setupBrush() {
    let last = null;
    const point = (e) => {
      const r = maskCanvas.getBoundingClientRect();
      return {
        x: ((e.clientX - r.left) * maskCanvas.width) / r.width,
        y: ((e.clientY - r.top) * maskCanvas.height) / r.height,
        scale: maskCanvas.width / r.width,
      };
    };
    const stroke = (from, to) => {
      maskCtx.globalCompositeOperation = $("brush-erase").checked ? "destination-out" : "source-over";
      maskCtx.strokeStyle = maskCtx.fillStyle = "rgb(255, 40, 100)";
      maskCtx.lineCap = maskCtx.lineJoin = "round";
      maskCtx.lineWidth = Number($("brush-size").value) * to.scale;
      maskCtx.beginPath();
      maskCtx.moveTo(from.x, from.y);
      maskCtx.lineTo(to.x + 0.01, to.y);
      maskCtx.stroke();
      maskCtx.globalCompositeOperation = "source-over";
      maskDirty = true;
    };
    maskCanvas.addEventListener("pointerdown", (e) => {
      if (e.button !== 0) return;
      e.preventDefault();
      maskCanvas.setPointerCapture(e.pointerId);
      last = point(e);
      stroke(last, last);
    });
    maskCanvas.addEventListener("pointermove", (e) => {
      if (!last) return;
      const p = point(e);
      stroke(last, p);
      last = p;
    });
    const end = () => {
      if (last) syncBadges();
      last = null;
    };
    maskCanvas.addEventListener("pointerup", end);
    maskCanvas.addEventListener("pointercancel", end);
  }

  // ------------------------------------------------------------------------------ dropped PNGs

  const A1111_FIELDS = {
    Steps: "steps", "CFG scale": "cfg", Seed: "seed", Shift: "shift",
  };

  function byLabel(choices, text) {
    const key = String(text || "").trim().toLowerCase();
    return choices.find((c) => c.label.toLowerCase() === key || c.name === key);
  }

  // A PNG's A1111/sd35 "parameters" (as /sdapi/v1/png-info parses them) as JobCreate settings.
  function settingsFromInfotext(p) {
    const info = state.info;
    const notes = [];
    const s = { negative_prompt: p["Negative prompt"] || "", loras: [] };
    // <lora:name:weight> tags in the prompt are LoRAs (A1111's way); sd35 writes a "LoRA" field instead
    s.prompt = (p.Prompt || "").replace(/<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>/gi, (_, name, w) => {
      s.loras.push({ name: name.trim(), strength: w ? Number(w) : 1 });
      return "";
    }).replace(/\s{2,}/g, " ").trim();
    for (const part of String(p.LoRA || "").split(",")) {
      const m = part.trim().match(/^(.+):([-\d.eE]+)$/);
      if (m) s.loras.push({ name: m[1].trim(), strength: Number(m[2]) });
    }
    for (const [label, field] of Object.entries(A1111_FIELDS)) {
      if (p[label] !== undefined && p[label] !== "" && Number.isFinite(Number(p[label]))) s[field] = Number(p[label]);
    }
    const size = String(p.Size || "").match(/^(\d+)x(\d+)$/);
    if (size) [s.width, s.height] = [Number(size[1]), Number(size[2])];
    if (p.Sampler) {
      let sampler = byLabel(info.samplers, p.Sampler);
      if (!sampler) { // pre-1.9 A1111: "DPM++ 2M Karras" carries its schedule
        for (const sch of info.schedulers) {
          const suffix = ` ${sch.label.toLowerCase()}`;
          const name = p.Sampler.toLowerCase();
          if (name.endsWith(suffix) && (sampler = byLabel(info.samplers, name.slice(0, -suffix.length)))) {
            s.scheduler = sch.name;
            break;
          }
        }
      }
      if (sampler) s.sampler = sampler.name;
      else notes.push(`sampler ${p.Sampler}`);
    }
    if (p["Schedule type"] && p["Schedule type"].toLowerCase() !== "automatic") {
      const sch = byLabel(info.schedulers, p["Schedule type"]);
      if (sch) s.scheduler = sch.name;
      else notes.push(`schedule ${p["Schedule type"]}`);
    }
    if (p["SLG layers"]) {
      s.slg = { layers: p["SLG layers"].split(/[\s,]+/).filter(Boolean).map(Number) };
      for (const k of ["scale", "start", "end"]) if (p[`SLG ${k}`]) s.slg[k] = Number(p[`SLG ${k}`]);
    }
    if (p["Hires upscale"]) {
      s.hires = { scale: Number(p["Hires upscale"]) };
      if (p["Hires steps"]) s.hires.steps = Number(p["Hires steps"]);
      const strength = p["Hires strength"] || p["Denoising strength"];
      if (strength) s.hires.strength = Number(strength);
      if (p["Hires upscaler"]) s.hires.upscaler = /latent/i.test(p["Hires upscaler"]) ? "latent" : "lanczos";
    } else if (p["Denoising strength"] || p["Mask blur"]) {
      s.edit = {};
      if (p["Denoising strength"]) s.edit.strength = Number(p["Denoising strength"]);
      if (p["Mask blur"]) s.edit.mask_blur = Number(p["Mask blur"]);
    }
    return { settings: s, model: p.Model, notes };
  }

  async function readPngSettings(file) {
    const dataUrl = await readDataUrl(file);
    const res = await api("/sdapi/v1/png-info", { method: "POST", body: { image: dataUrl } });
    return res.parameters && res.parameters.Prompt !== undefined && res.info ? res.parameters : null;
  }

  async function dropFile(file, { toEditor = false } = {}) {
    if (!file || !file.type.startsWith("image/")) {
      toast("Drop a PNG, JPEG or WebP image.");
      return;
    }
    if (!toEditor && file.type === "image/png") {
      let params = null;
      try {
        params = await readPngSettings(file);
      } catch (e) {
        handleError(e, "edit.image");
        return;
      }
      if (params) {
        const { settings, model, notes } = settingsFromInfotext(params);
        clearErrors();
        const missing = fillForm(settings, { model });
        const unknown = [...notes, ...missing];
        toast(`Settings read from ${file.name}` + (unknown.length ? ` (not on this server: ${unknown.join(", ")})` : "") + ".");
        return;
      }
      toast(`${file.name} carries no generation settings; it is open for img2img.`);
    }
    await loadInitImage(file, file.name);
  }

  function setupDrops() {
    const overlay = $("drop-overlay");
    const zone = $("drop-zone");
    let depth = 0;
    const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
    window.addEventListener("dragenter", (e) => {
      if (!hasFiles(e)) return;
      depth += 1;
      overlay.hidden = false;
    });
    window.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) overlay.hidden = true;
    });
    window.addEventListener("dragover", (e) => {
      if (!hasFiles(e)) return;
      e.preventDefault();
      zone.classList.toggle("over", zone.contains(e.target));
    });
    window.addEventListener("drop", (e) => {
      if (!hasFiles(e)) return;
      e.preventDefault();
      depth = 0;
      overlay.hidden = true;
      zone.classList.remove("over");
      const toEditor = zone.contains(e.target) || $("editor").contains(e.target);
      dropFile(e.dataTransfer.files[0], { toEditor });
    });
    window.addEventListener("paste", (e) => {
      if (!e.clipboardData) return;
      const typing = e.target.matches && e.target.matches("textarea, input");
      if (typing && e.clipboardData.types.includes("text/plain")) return; // text into a text field
      const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
      if (!item) return;
      e.preventDefault();
      loadInitImage(item.getAsFile(), "pasted image");
    });
    $("init-file").addEventListener("change", (e) => {
      if (e.target.files[0]) loadInitImage(e.target.files[0], e.target.files[0].name);
      e.target.value = "";
    });
    zone.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        $("init-file").click();
      }
    });
  }

  // ------------------------------------------------------------------------------ jobs and events

  function formatSeconds(s) {
    if (!Number.isFinite(s)) return "";
    s = Math.max(0, Math.round(s));
    return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
  }

  function setProgress(fraction, text) {
    $("progress").value = fraction;
    $("progress-text").textContent = text;
  }

  function setBusy(busy) {
    $("generate").disabled = busy;
    $("cancel").disabled = !busy;
  }

  function showStageImage(src) {
    const img = $("preview");
    img.src = src;
    img.hidden = false;
    $("stage-empty").hidden = true;
  }

  function showWarnings(list) {
    const ul = $("warnings");
    ul.replaceChildren(...(list || []).map((w) => Object.assign(document.createElement("li"), { textContent: w })));
    ul.hidden = !ul.children.length;
  }

  async function generate() {
    if (state.job || !state.info) return;
    clearErrors();
    let body;
    try {
      body = readForm();
    } catch (e) {
      if (e instanceof FieldError) return showError(e.param, e.message);
      throw e;
    }
    if (!body.prompt.trim() && !body.edit) {
      showError("prompt", "Type a prompt first.");
      return;
    }
    setBusy(true);
    setProgress(0, "Sending…");
    showWarnings([]);
    try {
      const accepted = await api("/v1/jobs", { method: "POST", body });
      follow(accepted.id);
      if (window.matchMedia("(max-width: 899px)").matches) $("stage").closest(".panel").scrollIntoView({ behavior: "smooth" });
    } catch (e) {
      setBusy(false);
      setProgress(0, "Ready");
      handleError(e);
    }
  }

  async function cancel() {
    const job = state.job;
    if (!job) return;
    $("cancel").disabled = true;
    setProgress($("progress").value, "Cancelling…");
    try {
      await api(`/v1/jobs/${job.id}`, { method: "DELETE" });
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 409)) handleError(e); // 409: it ended meanwhile
    }
  }

  // Follow a job's events until it ends, reconnecting when the connection drops.
  async function follow(id) {
    const job = { id, started: null, final: false, abort: null };
    state.job = job;
    sessionStorage.setItem(JOB_STORE, id);
    setBusy(true);
    let attempt = 0;
    while (!job.final) {
      const abort = new AbortController();
      job.abort = abort;
      try {
        const res = await api(`/v1/jobs/${id}/events`, { raw: true, signal: abort.signal });
        await readEvents(res.body, abort, (event) => {
          if (attempt) setConnection(null);
          attempt = 0;
          onEvent(job, event);
        });
        if (!job.final) throw new Error("the event stream ended early");
      } catch (e) {
        if (job.final) break;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500 && e.status !== 429) {
          endJob(job); // the job is gone (deleted after --keep-days): nothing to follow
          handleError(e);
          break;
        }
        attempt += 1;
        setConnection("Connection lost, reconnecting…");
        await sleep(Math.min(250 * 2 ** attempt, 4000));
      }
    }
  }

  // Read Server-Sent Events frames (id:/event:/data: lines, a blank line ends one) from a stream.
  async function readEvents(stream, abort, onFrame) {
    const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let stall = setTimeout(() => abort.abort(), STALL_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        clearTimeout(stall);
        if (done) return;
        stall = setTimeout(() => abort.abort(), STALL_MS);
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = parseFrame(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (frame) onFrame(frame);
        }
      }
    } finally {
      clearTimeout(stall);
    }
  }

  function parseFrame(text) {
    let event = "message";
    let id = null;
    const data = [];
    for (const line of text.split("\n")) {
      if (!line || line.startsWith(":")) continue; // a comment: the server's keep-alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
    return data.length ? { id, event, data: JSON.parse(data.join("\n")) } : null;
  }

  function onEvent(job, { event, data }) {
    if (job.final) return;
    trace.events.push(event);
    if (event === "status") {
      if (["done", "failed", "cancelled"].includes(data.status)) return finish(job, data.status, data);
      if (data.status === "queued") {
        const ahead = data.queue_position;
        setProgress(0, ahead ? `Queued, ${ahead} ahead` : "Queued");
      } else {
        job.started = job.started || (data.started ? data.started * 1000 : Date.now());
        setProgress(data.progress, "Running…");
      }
    } else if (event === "running") {
      job.started = Date.now();
      setProgress(0, "Starting…");
    } else if (event === "progress") {
      job.started = job.started || Date.now();
      const elapsed = (Date.now() - job.started) / 1000;
      const eta = data.progress > 0 ? (elapsed * (1 - data.progress)) / data.progress : NaN;
      const stage = data.stage === "hires" ? " (hires pass)" : "";
      const image = data.images > 1 && data.image ? `, image ${data.image + 1} of ${data.images}` : "";
      setProgress(data.progress, `Step ${data.step} / ${data.steps}${stage}${image} · ETA ${formatSeconds(eta)}`);
      if (data.preview) showStageImage(`data:image/png;base64,${data.preview}`);
      trace.progress.push({ step: data.step, steps: data.steps, progress: data.progress });
    } else if (["done", "failed", "cancelled"].includes(event)) {
      finish(job, event, data);
    }
  }

  function endJob(job) {
    job.final = true;
    if (job.abort) job.abort.abort();
    if (state.job === job) state.job = null;
    sessionStorage.removeItem(JOB_STORE);
    setBusy(false);
    setConnection(null);
  }

  async function finish(job, status, view) {
    endJob(job);
    if (status === "done") {
      const took = view.started && view.finished ? ` in ${formatSeconds(view.finished - view.started)}` : "";
      setProgress(1, `Done${took}`);
      showWarnings(view.warnings);
      if (view.seeds.length) {
        state.lastSeed = view.seeds[view.seeds.length - 1];
        $("seed-reuse").disabled = false;
      }
      if (view.model !== state.info.model) refreshInfo();
      const items = addJobToGallery(view, { fresh: true });
      if (items.length) {
        await loadThumb(items[0]);
        showStageImage(items[0].src);
        $("preview").dataset.job = view.id;
      }
    } else if (status === "cancelled") {
      setProgress(0, "Cancelled");
    } else {
      setProgress(0, "Failed");
      const err = view.error || {};
      showError(err.param, err.message || "The job failed; see the server's log.");
    }
  }

  // ------------------------------------------------------------------------------------ gallery

  const thumbObserver = "IntersectionObserver" in window
    ? new IntersectionObserver((entries) => {
      for (const entry of entries) {
        if (!entry.isIntersecting) continue;
        thumbObserver.unobserve(entry.target);
        const item = state.items.get(entry.target.dataset.key);
        if (item) loadThumb(item);
      }
    }, { rootMargin: "200px" })
    : null;

  async function loadThumb(item) {
    if (!item.loading) {
      item.loading = blobUrl(item.url).then((src) => {
        item.src = src;
        item.img.src = src;
        return src;
      }).catch(() => {
        item.img.alt = "image not available (deleted after --keep-days?)";
      });
    }
    return item.loading;
  }

  function addJobToGallery(view, { fresh = false } = {}) {
    const gallery = $("gallery");
    const s = view.settings || {};
    const made = [];
    view.images.forEach((url, i) => {
      const key = `${view.id}/${i}`;
      if (state.items.has(key)) return;
      const item = {
        key, url, index: i, job: view.id, model: view.model, seed: view.seeds[i],
        infotext: view.infotexts[i] || "", settings: s, src: null,
      };
      const figure = document.createElement("figure");
      if (fresh) figure.className = "new";
      figure.dataset.key = key;
      const button = document.createElement("button");
      button.type = "button";
      const img = document.createElement("img");
      img.alt = `${s.prompt || "image"} (seed ${item.seed})`;
      button.append(img);
      button.title = item.infotext;
      button.onclick = () => openViewer(item);
      const caption = document.createElement("figcaption");
      caption.textContent = `${s.width}×${s.height} · seed ${item.seed} · ${s.steps} steps`;
      figure.append(button, caption);
      item.img = img;
      item.figure = figure;
      state.items.set(key, item);
      made.push(item);
    });
    if (fresh) {
      gallery.querySelectorAll("figure.new").forEach((f) => f.classList.remove("new"));
      gallery.prepend(...made.map((m) => m.figure));
      made.forEach((m) => m.figure.classList.add("new"));
      made.forEach(loadThumb);
    } else {
      gallery.append(...made.map((m) => m.figure));
      made.forEach((m) => (thumbObserver ? thumbObserver.observe(m.figure) : loadThumb(m)));
    }
    $("gallery-empty").hidden = state.items.size > 0;
    return made;
  }

  // The server loaded another model: its defaults, presets and names (the form keeps what is set).
  async function refreshInfo() {
    try {
      state.info = await api("/v1/info");
    } catch (_) {
      return;
    }
    fillChoices(state.info);
    if ($("model").value === state.info.model) applyDefaults({ onlyBlank: true });
    document.title = `sd35 — ${state.info.model}`;
  }

  async function loadHistory() {
    const { jobs } = await api("/v1/jobs?limit=50");
    for (const view of jobs) if (view.status === "done") addJobToGallery(view);
    const mine = sessionStorage.getItem(JOB_STORE);
    const running = jobs.find((j) => j.id === mine && !["done", "failed", "cancelled"].includes(j.status));
    if (running) follow(running.id);
    else sessionStorage.removeItem(JOB_STORE);
  }

  let viewing = null;
  async function openViewer(item) {
    viewing = item;
    const s = item.settings;
    $("viewer-title").textContent = s.prompt ? s.prompt.slice(0, 80) : "Image";
    $("viewer-seed").textContent = String(item.seed);
    $("viewer-size").textContent = `${s.width} × ${s.height}`;
    $("viewer-model").textContent = item.model;
    $("viewer-params").textContent = item.infotext;
    const src = await loadThumb(item);
    $("viewer-img").src = src || "";
    $("viewer-img").alt = item.img.alt;
    $("viewer-download").href = src || "#";
    $("viewer-download").download = `sd35-${item.job.slice(0, 8)}-${item.index}-${item.seed}.png`;
    $("viewer").showModal();
  }

  // ------------------------------------------------------------------------------------ start

  function wire() {
    $("generate").onclick = generate;
    $("cancel").onclick = cancel;
    $("form").addEventListener("submit", (e) => e.preventDefault());
    document.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        generate();
      }
    });
    for (const id of ["prompt", "negative_prompt"]) $(id).addEventListener("input", () => countTokens(id));
    $("form").addEventListener("input", (e) => {
      const id = e.target.id;
      if (id) clearError(id.replace(/^lora-strength.*/, "loras"));
      if (id === "width" || id === "height") syncPreset();
      if (id === "slg-on" || id === "hires-on") syncBadges();
    });
    $("model").addEventListener("change", () => {
      clearError("model");
      if ($("model").value === state.info.model) return applyDefaults({ onlyBlank: true });
      // another model: its defaults are known once it is loaded, so its settings are left to the server
      for (const id of MODEL_FIELDS) setValue(id, "");
      syncPreset();
      toast(`${$("model").value} loads with the first job; the empty settings take its defaults.`);
    });
    $("preset").addEventListener("change", () => {
      const [w, h] = $("preset").value.split("x");
      if (!w) return;
      setValue("width", w);
      setValue("height", h);
      clearError("width");
      clearError("height");
    });
    $("swap-size").onclick = () => {
      const w = $("width").value;
      setValue("width", $("height").value);
      setValue("height", w);
      syncPreset();
    };
    $("seed-random").onclick = () => setValue("seed", -1);
    $("seed-reuse").onclick = () => {
      if (state.lastSeed !== null) setValue("seed", state.lastSeed);
    };
    // editing an SLG or hires value switches it on
    for (const [prefix, box] of [["slg-", "slg-on"], ["hires-", "hires-on"]]) {
      document.querySelectorAll(`[id^="${prefix}"]`).forEach((el) => {
        if (el.id !== box && el.matches("input, select")) {
          el.addEventListener("change", () => {
            $(box).checked = true;
            syncBadges();
          });
        }
      });
    }
    $("lora-add").onclick = () => {
      if ($("lora-pick").value) addLora($("lora-pick").value);
      clearError("loras");
    };
    $("control-add").onclick = () => addControl().catch((e) => handleError(e, "controls"));
    $("mask-clear").onclick = clearMask;
    $("mask-invert").onclick = invertMask;
    $("init-remove").onclick = removeInitImage;
    $("viewer-close").onclick = () => $("viewer").close();
    $("viewer-use").onclick = () => {
      const missing = fillForm({ ...viewing.settings, seed: viewing.seed }, { model: viewing.model });
      $("viewer").close();
      toast(missing.length ? `Settings filled in (not on this server: ${missing.join(", ")}).` : "Settings filled in.");
    };
    $("viewer-img2img").onclick = async () => {
      const res = await api(samePath(viewing.url), { raw: true });
      await loadInitImage(await res.blob(), `image ${viewing.seed}`);
      $("viewer").close();
      $("edit-section").scrollIntoView({ behavior: "smooth", block: "start" });
    };
    $("viewer").addEventListener("click", (e) => {
      if (e.target === $("viewer")) $("viewer").close(); // a click on the backdrop
    });
    $("key-button").onclick = () => askKey("Enter the API key for this server.");
    setupBrush();
    setupDrops();
  }

  async function start() {
    wire();
    $("key-button").hidden = !state.key;
    for (let attempt = 0; ; attempt++) {
      try {
        state.info = await api("/v1/info");
        setConnection(null);
        break;
      } catch (e) {
        if (e instanceof ApiError && e.status !== 429 && e.status < 500) {
          setConnection(e.message, "error");
          return;
        }
        const why = e instanceof ApiError ? e.message : `Cannot reach the server (${e.message}).`;
        setConnection(`${why} Retrying…`, "error");
        await sleep(Math.min(1000 * 2 ** attempt, 10000));
      }
    }
    fillChoices(state.info);
    resetForm();
    loadControlNets();
    document.title = `sd35 — ${state.info.model}`;
    await Promise.all([loadLoras(), loadHistory()]).catch((e) => handleError(e));
    document.body.dataset.ready = "true";
  }

  start();
})();
