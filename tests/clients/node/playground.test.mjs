// The playground page (`GET /`) in a real headless Chromium (Debian's `chromium`, driven by
// playwright-core): a key is asked for and a wrong one shows the server's message, a
// generation shows a preview then the final image, a long job is cancelled and its slot
// freed, an edit with a painted mask, the gallery survives a reload, and a phone-width
// layout. Screenshots of each state go to $PICTOR_ARTIFACTS (default
// tests/clients/artifacts/playground). No JavaScript error may reach the console.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { chromium } from 'playwright-core';

const MODEL = 'tiny-flux-schnell';
const artifacts = process.env.PICTOR_ARTIFACTS
  || new URL('../artifacts/playground', import.meta.url).pathname;
let server;
let browser;
let page;
const jsErrors = [];

before(async () => {
  const out = execFileSync(new URL('../server.sh', import.meta.url).pathname, {
    encoding: 'utf8', env: { ...process.env, PICTOR_TEST_WITH_SHIPPED: '1' },
  });
  const [url, key, pid] = out.trim().split(/\s+/);
  server = { url, key, pid: Number(pid) };
  fs.mkdirSync(artifacts, { recursive: true });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: server.url });
  page = await context.newPage();
  page.on('pageerror', (e) => jsErrors.push(`pageerror: ${e.message}`));
  page.on('console', (m) => {
    // A refused request (the 401 of a wrong key) is logged by the browser itself, not by
    // the page's JavaScript.
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) jsErrors.push(m.text());
  });
});

after(async () => {
  await browser?.close();
  if (server) process.kill(server.pid, 'SIGTERM');
});

const shot = (name) => page.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });

async function queueDepth() {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`pictor_queue_depth{model="${MODEL}"}`));
  return line ? Number(line.split(' ').pop()) : 0;
}

async function pick(model, { steps, size, partials } = {}) {
  await page.selectOption('#model', model);
  if (size) await page.selectOption('#size', size);
  await page.fill('#steps', steps ? String(steps) : '');
  await page.selectOption('#partials', String(partials ?? 2));
}

test('the page asks for a key, shows a wrong key\'s error, then lists the models', async () => {
  const response = await page.goto(`${server.url}/`);
  assert.equal(response.status(), 200);
  assert.match(response.headers()['content-security-policy'], /default-src 'self'/);
  await page.waitForSelector('#key-box:not([hidden])');
  await page.fill('#key', 'sk-wrong');
  await page.click('#key-save');
  await page.waitForFunction(() => /API key/i.test(document.querySelector('#error').textContent));
  assert.equal(await page.isVisible('#error'), true);
  await shot('1-wrong-key');
  await page.fill('#key', server.key);
  await page.click('#key-save');
  await page.waitForSelector('#key-box', { state: 'hidden' });
  const options = await page.$$eval('#model option', (os) => os.map((o) => o.textContent));
  assert.ok(options.includes(MODEL), options.join());
  assert.ok(options.some((o) => o === 'gpt-image-1 (alias of tiny-flux-schnell)'), options.join());
  // Every control has a label a screen reader can read.
  const unlabelled = await page.$$eval('input, select, textarea', (els) => els
    .filter((e) => e.type !== 'file' && e.type !== 'checkbox' && !(e.labels && e.labels.length))
    .map((e) => e.id));
  assert.deepEqual(unlabelled, []);
});

test('the shipped model shows a preview, then the final image with its receipt in the gallery', async () => {
  await page.fill('#prompt', 'a large yellow star on a blue background in the centre');
  await pick('pictor-tiny', { steps: 12, partials: 2 });
  await page.click('#go');
  await page.waitForSelector('#live img[data-kind="partial"]', { polling: 'mutation' });
  await shot('2-preview');
  await page.waitForSelector('#gallery li');
  await page.waitForFunction(() => /Done/.test(document.querySelector('#status').textContent));
  await shot('3-final');
  const receipt = await page.textContent('#gallery li pre');
  assert.match(receipt, /seed \d+, 12 steps, 128x128, pictor-tiny/);
  // The snippet to copy is the same request for curl.
  await page.click('#gallery li button:has-text("Copy curl")');
  const snippet = await page.getAttribute('#gallery li button[data-snippet]', 'data-snippet');
  assert.match(snippet, /\/v1\/images\/generations/);
  assert.match(snippet, /"seed":\d+/);
});

test('cancel closes the stream and the server frees the slot', async () => {
  await page.fill('#prompt', 'a long one');
  await pick(MODEL, { steps: 50, size: '512x512', partials: 3 });
  await page.click('#go');
  await page.waitForSelector('#live img[data-kind="partial"]', { polling: 'mutation', timeout: 60000 });
  // The bar follows every step (pictor.progress events), not only the previews.
  await page.waitForFunction(() => /^Step \d+ of 50$/.test(document.querySelector('#status').textContent),
    null, { polling: 'raf' });
  assert.ok(await page.$eval('#progress', (p) => p.max === 50 && p.value > 0));
  assert.equal(await queueDepth(), 1, 'the job runs');
  await page.click('#cancel');
  await page.waitForFunction(() => /Cancelled/.test(document.querySelector('#status').textContent));
  await shot('4-cancelled');
  for (let i = 0; i < 100 && (await queueDepth()) !== 0; i++) await new Promise((r) => setTimeout(r, 100));
  assert.equal(await queueDepth(), 0, 'the slot is free again');
});

test('an edit with a painted mask lands in the gallery', async () => {
  const before = await page.$$eval('#gallery li', (l) => l.length);
  await page.click('#tab-edit');
  const png = Buffer.from(await page.evaluate(async () => {
    const c = document.createElement('canvas');
    c.width = 64; c.height = 64;
    const x = c.getContext('2d');
    x.fillStyle = '#2060c0'; x.fillRect(0, 0, 64, 64);
    x.fillStyle = '#e02020'; x.beginPath(); x.arc(32, 32, 16, 0, 7); x.fill();
    const blob = await new Promise((r) => c.toBlob(r, 'image/png'));
    return [...new Uint8Array(await blob.arrayBuffer())];
  }));
  await page.setInputFiles('#image', { name: 'in.png', mimeType: 'image/png', buffer: png });
  await page.waitForSelector('#mask:not([hidden])');
  const box = await page.locator('#mask').boundingBox();
  await page.mouse.move(box.x + box.width * 0.3, box.y + box.height * 0.3);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * 0.7, box.y + box.height * 0.7, { steps: 5 });
  await page.mouse.up();
  await page.fill('#prompt', 'a green square');
  await pick(MODEL, { steps: 8, partials: 1 });
  await page.click('#go');
  await page.waitForFunction((n) => document.querySelectorAll('#gallery li').length > n, before);
  await shot('5-edit');
  // The newest card is the edit: its Python snippet edits input.png.
  await page.click('#gallery li:first-child button:has-text("Copy python")');
  const python = await page.getAttribute('#gallery li:first-child button[data-snippet]', 'data-snippet');
  assert.match(python, /client\.images\.edit\(image=open\("input\.png", "rb"\), model="tiny-flux-schnell", prompt="a green square"/);
  assert.match(python, /"strength": 0\.75/);
  await page.click('#tab-generate');
});

test('the gallery survives a reload, and the page fits a phone', async () => {
  const count = await page.$$eval('#gallery li', (l) => l.length);
  assert.ok(count >= 2, `${count}`);
  await page.reload();
  await page.waitForSelector('#gallery li');
  assert.equal(await page.$$eval('#gallery li', (l) => l.length), count);
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the page is ${overflow}px wider than a phone`);
  await shot('6-phone');
  await page.setViewportSize({ width: 1280, height: 900 });
  await shot('playground');
  assert.deepEqual(jsErrors, []);
});
