// Pictor's playground: a page over the public API only (GET /v1/models, POST
// /v1/images/generations and /v1/images/edits, streamed), with a gallery kept in this
// browser's IndexedDB. Plain modules, no build step.

const $ = (id) => document.getElementById(id);
const state = { models: [], loras: [], running: null, lastSeed: null, mode: 'generate', maskDirty: false };

// ---- the API key, kept in this browser only --------------------------------------------
const keyOf = () => localStorage.getItem('pictor.key') || '';
function headers(json) {
  const h = {};
  if (json) h['Content-Type'] = 'application/json';
  if (keyOf()) h.Authorization = `Bearer ${keyOf()}`;
  return h;
}
function askForKey(message) {
  $('key-box').hidden = false;
  showError(message);
  $('key').focus();
}

// ---- errors, as the server says them ---------------------------------------------------
function showError(message, param) {
  const box = $('error');
  box.textContent = param ? `${message} (parameter: ${param})` : message;
  box.hidden = !message;
}
async function errorOf(response) {
  try {
    const body = await response.json();
    return body.error || { message: `HTTP ${response.status}` };
  } catch {
    return { message: `HTTP ${response.status}` };
  }
}

// ---- models and their rules --------------------------------------------------------------
async function loadModels() {
  const r = await fetch('/v1/models', { headers: headers(false) });
  if (r.status === 401) {
    const e = await errorOf(r);
    askForKey(`This server needs an API key: ${e.message}`);
    return false;
  }
  if (!r.ok) {
    const e = await errorOf(r);
    showError(e.message, e.param);
    return false;
  }
  state.models = (await r.json()).data;
  const select = $('model');
  select.replaceChildren();
  for (const m of state.models) {
    const option = new Option(m.alias_of ? `${m.id} (alias of ${m.alias_of})` : m.id, m.id);
    option.disabled = !m.ready;
    select.append(option);
  }
  const first = state.models.find((m) => m.ready && !m.alias_of);
  if (first) select.value = first.id;
  onModel();
  return true;
}

function current() {
  const chosen = state.models.find((m) => m.id === $('model').value);
  if (!chosen) return null;
  return chosen.alias_of ? state.models.find((m) => m.id === chosen.alias_of) || chosen : chosen;
}

function sizesFor(rules) {
  const out = new Set([rules.default_size]);
  const grid = rules.multiple || 16;
  const ok = (w, h) => w >= rules.min_side && h >= rules.min_side && w <= rules.max_side
    && h <= rules.max_side && w % grid === 0 && h % grid === 0 && w * h <= rules.max_pixels;
  for (const [w, h] of [[256, 256], [512, 512], [768, 768], [1024, 1024], [1024, 768], [768, 1024],
    [1280, 720], [720, 1280], [1536, 1024], [1024, 1536], [2048, 2048]]) {
    if (ok(w, h)) out.add(`${w}x${h}`);
  }
  return [...out];
}

function onModel() {
  const m = current();
  const rules = m && m.rules;
  const size = $('size');
  size.replaceChildren();
  if (!rules) return;
  for (const s of sizesFor(rules)) size.append(new Option(s === rules.default_size ? `${s} (default)` : s, s));
  $('steps').max = rules.max_steps;
  $('steps-hint').textContent = `(default ${rules.default_steps}, at most ${rules.max_steps})`;
  $('guidance-box').hidden = !rules.guidance;
  $('guidance').placeholder = rules.default_guidance ?? '';
  state.loras = [];
  renderLoras();
  const available = (rules.loras && m.loras) || [];
  $('lora-box').hidden = available.length === 0;
  $('lora-name').replaceChildren(...available.map((l) => new Option(l.name, l.name)));
}

// ---- LoRAs ----------------------------------------------------------------------------------
function renderLoras() {
  $('lora-list').replaceChildren(...state.loras.map((l, i) => {
    const li = document.createElement('li');
    li.textContent = `${l.name} × ${l.scale} `;
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.textContent = 'Remove';
    remove.setAttribute('aria-label', `Remove ${l.name}`);
    remove.onclick = () => { state.loras.splice(i, 1); renderLoras(); };
    li.append(remove);
    return li;
  }));
}

// ---- the request --------------------------------------------------------------------------
function fields() {
  const body = {
    model: $('model').value,
    prompt: $('prompt').value,
    n: Number($('n').value) || 1,
    size: $('size').value || 'auto',
    output_format: $('format').value,
    response_format: 'b64_json',
    stream: true,
    stream_progress: true,
    partial_images: Number($('partials').value),
  };
  // Steps, when given, say more than a quality (which the server maps to steps).
  if ($('steps').value) body.steps = Number($('steps').value);
  else if ($('quality').value) body.quality = $('quality').value;
  if (!$('seed-random').checked && $('seed').value !== '') body.seed = Number($('seed').value);
  if (!$('guidance-box').hidden && $('guidance').value !== '') body.guidance_scale = Number($('guidance').value);
  if (state.loras.length) body.loras = state.loras.map((l) => ({ name: l.name, scale: l.scale }));
  return body;
}

async function maskBlob() {
  if (!state.maskDirty) return null;
  const canvas = $('mask');
  const out = document.createElement('canvas');
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext('2d');
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, out.width, out.height);
  // Transparent (alpha 0) where painted: OpenAI's convention for "change here".
  ctx.globalCompositeOperation = 'destination-out';
  ctx.drawImage(state.strokes, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, 'image/png'));
}

async function send(body) {
  const controller = new AbortController();
  if (state.mode === 'generate') {
    return [controller, fetch('/v1/images/generations', {
      method: 'POST', headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
    })];
  }
  const form = new FormData();
  for (const [k, v] of Object.entries(body)) {
    if (k === 'loras') form.append(k, JSON.stringify(v));
    else form.append(k, String(v));
  }
  form.append('strength', $('strength').value);
  form.append('image', state.image, state.image.name || 'image.png');
  const mask = await maskBlob();
  if (mask) form.append('mask', mask, 'mask.png');
  return [controller, fetch('/v1/images/edits', { method: 'POST', headers: headers(false), body: form, signal: controller.signal })];
}

// Server-sent events from a fetch body: `event:` and `data:` lines, blank-line separated.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let type = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) type = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { type, data: JSON.parse(data.join('\n')) };
    }
  }
}

function setRunning(running) {
  $('go').disabled = running;
  $('cancel').disabled = !running;
}

async function generate(body) {
  showError('');
  if (!body.prompt.trim()) { showError('Write a prompt first.', 'prompt'); $('prompt').focus(); return; }
  if (state.mode === 'edit' && !state.image) { showError('Choose an image to edit.', 'image'); return; }
  const m = current();
  const steps = body.steps || (m && m.rules && m.rules.default_steps) || 1;
  // Images denoise together, so the bar follows the steps of the batch running now.
  const progress = $('progress');
  progress.max = steps;
  progress.value = 0;
  $('live').replaceChildren();
  $('status').textContent = 'Waiting for the model…';
  setRunning(true);
  const started = performance.now();
  let controller;
  try {
    let pending;
    [controller, pending] = await send(body);
    state.running = controller;
    const response = await pending;
    if (!response.ok) {
      const e = await errorOf(response);
      if (response.status === 401) askForKey(e.message);
      else showError(e.message, e.param);
      $('status').textContent = 'Refused.';
      return;
    }
    let done = 0;
    for await (const ev of events(response)) {
      if (ev.type === 'pictor.progress') {
        const p = ev.data;
        if (p.queue_position != null) {
          $('status').textContent = p.queue_position === 0
            ? 'Next in line…' : `Waiting: ${p.queue_position} job${p.queue_position > 1 ? 's' : ''} ahead…`;
        } else if (p.total) {
          progress.max = p.total;
          progress.value = p.step;
          $('status').textContent = `Step ${p.step} of ${p.total}${body.n > 1 ? ` (${body.n} images)` : ''}`;
        }
      } else if (ev.type.endsWith('.partial_image')) {
        const d = ev.data;
        progress.value = Math.max(progress.value, d.step || 0);
        $('status').textContent = `Image ${d.image_index + 1} of ${body.n}: step ${d.step} of ${steps}`;
        showLive(d, 'partial');
      } else if (ev.type.endsWith('.completed')) {
        done += 1;
        progress.value = progress.max;
        showLive(ev.data, 'final');
        await keep(ev.data, body);
        state.lastSeed = ev.data.seed;
      } else if (ev.type === 'error') {
        showError(ev.data.error.message, ev.data.error.param);
      }
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $('status').textContent = done ? `Done: ${done} image${done > 1 ? 's' : ''} in ${seconds} s.` : 'Stopped.';
  } catch (err) {
    if (err.name === 'AbortError') $('status').textContent = 'Cancelled.';
    else { showError(String(err.message || err)); $('status').textContent = 'Failed.'; }
  } finally {
    state.running = null;
    setRunning(false);
  }
}

function dataUrl(d) {
  return `data:image/${d.output_format || 'png'};base64,${d.b64_json}`;
}

function showLive(d, kind) {
  const img = new Image();
  img.src = dataUrl(d);
  img.alt = kind === 'partial' ? `Preview of image ${d.image_index + 1} at step ${d.step}` : `Image ${d.image_index + 1}`;
  img.dataset.kind = kind;
  const live = $('live');
  const old = live.querySelector(`img[data-index="${d.image_index}"]`);
  img.dataset.index = d.image_index;
  if (old) old.replaceWith(img); else live.append(img);
}

// ---- the gallery, in IndexedDB ----------------------------------------------------------------
const db = new Promise((resolve, reject) => {
  const open = indexedDB.open('pictor-playground', 1);
  open.onupgradeneeded = () => open.result.createObjectStore('images', { keyPath: 'id', autoIncrement: true });
  open.onsuccess = () => resolve(open.result);
  open.onerror = () => reject(open.error);
});

async function store(mode, fn) {
  const d = await db;
  return new Promise((resolve, reject) => {
    const tx = d.transaction('images', mode);
    const req = fn(tx.objectStore('images'));
    tx.oncomplete = () => resolve(req && req.result);
    tx.onerror = () => reject(tx.error);
  });
}

async function keep(d, body) {
  const bytes = Uint8Array.from(atob(d.b64_json), (c) => c.charCodeAt(0));
  const { b64_json: _, ...receipt } = d;
  // What makes this image again: its own seed and the steps it ran.
  const request = { ...body, seed: d.seed, steps: d.steps, quality: undefined, n: 1,
    stream: undefined, stream_progress: undefined, partial_images: undefined };
  if (state.mode === 'edit') request.strength = Number($('strength').value);
  const entry = { created: Date.now(), blob: new Blob([bytes], { type: `image/${d.output_format || 'png'}` }), receipt, request, mode: state.mode };
  entry.id = await store('readwrite', (s) => s.add(entry));
  $('gallery').prepend(card(entry));
}

// A value as a Python literal (JSON's, with None, True and False).
function py(v) {
  if (v === null) return 'None';
  if (typeof v === 'boolean') return v ? 'True' : 'False';
  if (Array.isArray(v)) return `[${v.map(py).join(', ')}]`;
  if (typeof v === 'object') {
    return `{${Object.entries(v).filter(([, x]) => x !== undefined).map(([k, x]) => `${JSON.stringify(k)}: ${py(x)}`).join(', ')}}`;
  }
  return JSON.stringify(v);
}

// The call that makes the same image again: curl, Python or Node, for a generation or
// an edit (whose input image the user supplies as input.png).
function snippet(kind, request, mode) {
  const body = { ...request };
  for (const k of ['stream', 'stream_progress', 'partial_images', 'response_format']) delete body[k];
  const base = location.origin;
  const edit = mode === 'edit';
  const { model, prompt, size, n, ...extra } = body;
  const quote = (v) => `'${String(v).replace(/'/g, "'\\''")}'`;
  if (kind === 'curl') {
    if (edit) {
      const fields = Object.entries({ ...body, response_format: 'b64_json' })
        .filter(([, v]) => v !== undefined)
        .map(([k, v]) => `-F ${k}=${quote(typeof v === 'object' ? JSON.stringify(v) : v)}`).join(' \\\n  ');
      return `curl ${base}/v1/images/edits -H "Authorization: Bearer $PICTOR_KEY" \\\n  -F image=@input.png \\\n  ${fields}`;
    }
    return `curl ${base}/v1/images/generations -H 'Content-Type: application/json' \\\n  -H "Authorization: Bearer $PICTOR_KEY" \\\n  -d ${quote(JSON.stringify({ ...body, response_format: 'b64_json' }))}`;
  }
  if (kind === 'python') {
    const call = edit ? `client.images.edit(image=open("input.png", "rb"), ` : 'client.images.generate(';
    return `from openai import OpenAI\nclient = OpenAI(base_url="${base}/v1", api_key="sk-...")\nr = ${call}model=${py(model)}, prompt=${py(prompt)}, size=${py(size)}, n=${n || 1},\n    response_format="b64_json", extra_body=${py(extra)})`;
  }
  if (edit) {
    return `import fs from 'node:fs';\nimport OpenAI from 'openai';\nconst client = new OpenAI({ baseURL: '${base}/v1', apiKey: 'sk-...' });\nconst r = await client.images.edit({ image: fs.createReadStream('input.png'), ...${JSON.stringify({ ...body, response_format: 'b64_json' })} });`;
  }
  return `import OpenAI from 'openai';\nconst client = new OpenAI({ baseURL: '${base}/v1', apiKey: 'sk-...' });\nconst r = await client.images.generate(${JSON.stringify({ ...body, response_format: 'b64_json' })});`;
}

function card(entry) {
  const li = document.createElement('li');
  li.dataset.id = entry.id;
  const url = URL.createObjectURL(entry.blob);
  const img = new Image();
  img.src = url;
  const r = entry.receipt;
  img.alt = `${entry.request.prompt} (seed ${r.seed})`;
  const pre = document.createElement('pre');
  const timing = r.timings ? `, ${r.timings.generation_seconds.toFixed(2)} s` : '';
  const loras = (r.loras || []).map((l) => `${l.name}×${l.scale} (${l.sha256.slice(0, 10)})`).join(', ');
  pre.textContent = `${entry.request.prompt}\nseed ${r.seed}, ${r.steps} steps, ${r.width}x${r.height}, ${r.model}` +
    `${r.model_hash ? ` (${r.model_hash})` : ''}${r.guidance != null ? `, guidance ${r.guidance}` : ''}${timing}` +
    `${loras ? `\nLoRAs: ${loras}` : ''}${r.device ? `\n${r.device}` : ''}`;
  const buttons = document.createElement('div');
  buttons.className = 'buttons';
  const a = document.createElement('a');
  a.href = url;
  a.download = `pictor-${r.seed}.${entry.request.output_format || 'png'}`;
  a.textContent = 'Download';
  buttons.append(a);
  const button = (label, action) => {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = label;
    b.onclick = action;
    buttons.append(b);
    return b;
  };
  for (const kind of ['curl', 'python', 'node']) {
    const b = button(`Copy ${kind}`, async () => {
      const text = snippet(kind, entry.request, entry.mode);
      try { await navigator.clipboard.writeText(text); b.textContent = 'Copied'; } catch { b.textContent = 'Copy failed'; }
      b.dataset.snippet = text;
      setTimeout(() => { b.textContent = `Copy ${kind}`; }, 1500);
    });
  }
  if (entry.mode !== 'edit') button('Regenerate', () => regenerate(entry.request));
  button('Delete', async () => { await store('readwrite', (s) => s.delete(entry.id)); URL.revokeObjectURL(url); li.remove(); });
  li.append(img, pre, buttons);
  return li;
}

async function showGallery() {
  const all = (await store('readonly', (s) => s.getAll())) || [];
  $('gallery').replaceChildren(...all.reverse().map(card));
}

function regenerate(request) {
  setMode('generate');
  $('prompt').value = request.prompt;
  if (state.models.some((m) => m.id === request.model)) { $('model').value = request.model; onModel(); }
  if ([...$('size').options].some((o) => o.value === request.size)) $('size').value = request.size;
  $('steps').value = request.steps || '';
  $('quality').value = request.quality || '';
  $('seed-random').checked = false;
  $('seed').value = request.seed;
  $('format').value = request.output_format || 'png';
  state.loras = (request.loras || []).map((l) => ({ ...l }));
  renderLoras();
  generate({ ...fields(), n: 1 });
}

// ---- edits: the image and a mask brush ---------------------------------------------------------
function setMode(mode) {
  state.mode = mode;
  $('tab-generate').setAttribute('aria-selected', String(mode === 'generate'));
  $('tab-edit').setAttribute('aria-selected', String(mode === 'edit'));
  $('edit-fields').hidden = mode !== 'edit';
  $('go').textContent = mode === 'edit' ? 'Edit' : 'Generate';
}

function useImage(file) {
  if (!file) return;
  state.image = file;
  const img = new Image();
  img.onload = () => {
    const canvas = $('mask');
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    state.picture = img;
    state.strokes = document.createElement('canvas');
    state.strokes.width = canvas.width;
    state.strokes.height = canvas.height;
    state.maskDirty = false;
    canvas.hidden = false;
    drawMask();
  };
  img.src = URL.createObjectURL(file);
}

function drawMask() {
  const canvas = $('mask');
  const ctx = canvas.getContext('2d');
  ctx.drawImage(state.picture, 0, 0);
  ctx.globalAlpha = 0.5;
  ctx.drawImage(state.strokes, 0, 0);
  ctx.globalAlpha = 1;
}

function paint(event) {
  const canvas = $('mask');
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) / box.width) * canvas.width;
  const y = ((event.clientY - box.top) / box.height) * canvas.height;
  const ctx = state.strokes.getContext('2d');
  ctx.fillStyle = '#ff3b6b';
  ctx.beginPath();
  ctx.arc(x, y, (Number($('brush').value) / 2) * (canvas.width / box.width), 0, Math.PI * 2);
  ctx.fill();
  state.maskDirty = true;
  drawMask();
}

// ---- wiring ------------------------------------------------------------------------------------
function wire() {
  $('form').addEventListener('submit', (e) => { e.preventDefault(); generate(fields()); });
  $('cancel').onclick = () => { if (state.running) state.running.abort(); };
  $('model').onchange = onModel;
  $('seed-reuse').onclick = () => {
    if (state.lastSeed == null) return;
    $('seed').value = state.lastSeed;
    $('seed-random').checked = false;
  };
  $('seed').oninput = () => { $('seed-random').checked = $('seed').value === ''; };
  $('key-save').onclick = async () => {
    localStorage.setItem('pictor.key', $('key').value.trim());
    showError('');
    if (await loadModels()) $('key-box').hidden = true;
  };
  $('lora-add').onclick = () => {
    const name = $('lora-name').value;
    const scale = Number($('lora-scale').value);
    if (!name || state.loras.some((l) => l.name === name)) return;
    state.loras.push({ name, scale: Number.isFinite(scale) ? scale : 1 });
    renderLoras();
  };
  $('tab-generate').onclick = () => setMode('generate');
  $('tab-edit').onclick = () => setMode('edit');
  $('image').onchange = (e) => useImage(e.target.files[0]);
  const drop = $('drop');
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add('over'); };
  drop.ondragleave = () => drop.classList.remove('over');
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove('over'); useImage(e.dataTransfer.files[0]); };
  const canvas = $('mask');
  canvas.onpointerdown = (e) => { canvas.setPointerCapture(e.pointerId); paint(e); };
  canvas.onpointermove = (e) => { if (e.buttons) paint(e); };
  $('mask-clear').onclick = () => {
    if (!state.strokes) return;
    state.strokes.getContext('2d').clearRect(0, 0, state.strokes.width, state.strokes.height);
    state.maskDirty = false;
    drawMask();
  };
  for (const [input, out] of [['brush', 'brush-out'], ['strength', 'strength-out']]) {
    $(input).oninput = () => { $(out).textContent = $(input).value; };
  }
}

wire();
showGallery();
loadModels();
