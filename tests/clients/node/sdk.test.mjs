// The official `openai` Node SDK against a running `pictor serve`, unchanged.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { after, before, test } from 'node:test';
import zlib from 'node:zlib';
import OpenAI, { toFile } from 'openai';

const MODEL = 'tiny-flux-schnell';
let server;

before(() => {
  const out = execFileSync(new URL('../server.sh', import.meta.url).pathname, { encoding: 'utf8' });
  const [url, key, pid] = out.trim().split(/\s+/);
  server = { url, key, pid: Number(pid) };
});

after(() => process.kill(server.pid, 'SIGTERM'));

const client = (key = server.key) => new OpenAI({ baseURL: `${server.url}/v1`, apiKey: key });

function pngSize(buf) {
  assert.equal(buf.subarray(1, 4).toString(), 'PNG');
  return [buf.readUInt32BE(16), buf.readUInt32BE(20)];
}

test('url response downloads a png', async () => {
  const r = await client().images.generate({ model: MODEL, prompt: 'a white siamese cat', size: '64x64', response_format: 'url' });
  assert.equal(r.data.length, 1);
  const res = await fetch(r.data[0].url);
  assert.equal(res.status, 200);
  assert.deepEqual(pngSize(Buffer.from(await res.arrayBuffer())), [64, 64]);
});

test('b64_json with n=2 and the same seed twice', async () => {
  const body = { model: MODEL, prompt: 'a red circle', size: '64x48', n: 2, response_format: 'b64_json', seed: 99 };
  const a = await client().images.generate(body);
  const b = await client().images.generate(body);
  assert.equal(a.data.length, 2);
  assert.deepEqual(pngSize(Buffer.from(a.data[0].b64_json, 'base64')), [64, 48]);
  assert.equal(a.data[0].b64_json, b.data[0].b64_json);
  assert.notEqual(a.data[0].b64_json, a.data[1].b64_json);
});

test('errors map to the SDK classes', async () => {
  await assert.rejects(client('sk-wrong').images.generate({ model: MODEL, prompt: 'x' }), OpenAI.AuthenticationError);
  await assert.rejects(client().images.generate({ model: MODEL, prompt: 'x', size: '100x100' }), (e) => {
    assert.ok(e instanceof OpenAI.BadRequestError);
    assert.equal(e.param, 'size');
    return true;
  });
  await assert.rejects(client().images.generate({ model: 'no-such-model', prompt: 'x' }), OpenAI.NotFoundError);
});

test('a dev model takes guidance_scale in the body and says which it used', async () => {
  const body = { model: 'tiny-flux-dev', prompt: 'a red circle', size: '64x64', response_format: 'b64_json', seed: 5, steps: 4 };
  const guided = await client().images.generate({ ...body, guidance_scale: 2.5 });
  const plain = await client().images.generate(body);
  assert.equal(guided.data[0].guidance, 2.5);
  assert.equal(plain.data[0].guidance, 3.5);
  assert.notEqual(guided.data[0].b64_json, plain.data[0].b64_json);
  await assert.rejects(client().images.generate({ model: MODEL, prompt: 'x', guidance_scale: 2 }), (e) => {
    assert.ok(e instanceof OpenAI.BadRequestError);
    assert.equal(e.param, 'guidance_scale');
    return true;
  });
});

test('loras in the body are applied and reported with their hashes', async () => {
  const body = { model: MODEL, prompt: 'a red circle', size: '64x64', response_format: 'b64_json', seed: 9, steps: 2 };
  const styled = await client().images.generate({ ...body, loras: [{ name: 'pixel-kohya', scale: 0.8 }] });
  const plain = await client().images.generate(body);
  assert.notEqual(styled.data[0].b64_json, plain.data[0].b64_json);
  assert.equal(styled.data[0].loras[0].name, 'pixel-kohya');
  assert.equal(styled.data[0].loras[0].sha256.length, 64);
  await assert.rejects(client().images.generate({ ...body, loras: [{ name: 'pixel-kohya', scale: 50 }] }), (e) => {
    assert.ok(e instanceof OpenAI.BadRequestError);
    assert.equal(e.param, 'loras');
    return true;
  });
});

async function imagesGenerated() {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const line = text
    .split('\n')
    .find((l) => l.startsWith('pictor_images_generated_total') && l.includes(`model="${MODEL}"`));
  return line ? Number(line.split(' ').pop()) : 0;
}

test('streaming yields partial images then the same final image', async () => {
  const body = { model: MODEL, prompt: 'a green star', size: '64x64', seed: 78, steps: 4 };
  const stream = await client().images.generate({ ...body, stream: true, partial_images: 2 });
  const events = [];
  for await (const event of stream) events.push(event);
  assert.deepEqual(events.map((e) => e.type), [
    'image_generation.partial_image',
    'image_generation.partial_image',
    'image_generation.completed',
  ]);
  assert.deepEqual(events.slice(0, 2).map((e) => e.partial_image_index), [0, 1]);
  for (const e of events) assert.deepEqual(pngSize(Buffer.from(e.b64_json, 'base64')), [64, 64]);
  const done = events[2];
  assert.equal(done.usage.output_tokens, 16);
  const plain = await client().images.generate({ ...body, response_format: 'b64_json' });
  assert.equal(done.b64_json, plain.data[0].b64_json);
});

test('a retry after a dropped connection does not render twice', async () => {
  const before = await imagesGenerated();
  // Each attempt gives up after 300 ms; the SDK retries the same body, which attaches to
  // the job already running.
  const patient = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: server.key, timeout: 300, maxRetries: 6 });
  const r = await patient.images.generate({ model: MODEL, prompt: 'slow and steady', size: '256x256', response_format: 'b64_json', steps: 30 });
  assert.deepEqual(pngSize(Buffer.from(r.data[0].b64_json, 'base64')), [256, 256]);
  assert.equal((await imagesGenerated()) - before, 1);
});

// A PNG of w x h from pixel(x, y) -> [r, g, b, a], written with node:zlib alone.
function png(w, h, pixel, alpha = false) {
  const channels = alpha ? 4 : 3;
  const rows = Buffer.alloc((w * channels + 1) * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const p = pixel(x, y);
      for (let c = 0; c < channels; c++) rows[y * (w * channels + 1) + 1 + x * channels + c] = p[c];
    }
  }
  const chunk = (kind, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(zlib.crc32(Buffer.concat([Buffer.from(kind), data])));
    return Buffer.concat([len, Buffer.from(kind), data, crc]);
  };
  const header = Buffer.alloc(13);
  header.writeUInt32BE(w, 0);
  header.writeUInt32BE(h, 4);
  header.set([8, alpha ? 6 : 2, 0, 0, 0], 8);
  return Buffer.concat([Buffer.from('\x89PNG\r\n\x1a\n', 'latin1'), chunk('IHDR', header),
    chunk('IDAT', zlib.deflateSync(rows)), chunk('IEND', Buffer.alloc(0))]);
}

const disc = (w, h) => png(w, h, (x, y) => ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2 ? [220, 20, 20] : [255, 255, 255]));
const leftHalfMask = (w, h) => png(w, h, (x) => [0, 0, 0, x < w / 2 ? 0 : 255], true);
const file = (buf, name = 'in.png') => toFile(buf, name, { type: 'image/png' });

test('images.edit with a mask, several images refused, and a stream', async () => {
  const r = await client().images.edit({
    model: MODEL, prompt: 'a blue disc', image: await file(disc(64, 48)), mask: await file(leftHalfMask(64, 48), 'mask.png'),
    response_format: 'b64_json', steps: 2,
  });
  assert.deepEqual(pngSize(Buffer.from(r.data[0].b64_json, 'base64')), [64, 48]);
  assert.equal(r.data[0].strength, 1);
  await assert.rejects(client().images.edit({ model: MODEL, prompt: 'x', image: [await file(disc(64, 48)), await file(disc(64, 48))] }), (e) => {
    assert.ok(e instanceof OpenAI.BadRequestError);
    assert.equal(e.param, 'image');
    return true;
  });
  const stream = await client().images.edit({
    model: MODEL, prompt: 'a blue disc', image: await file(disc(64, 64)), stream: true, partial_images: 1, steps: 4, strength: 1,
  });
  const kinds = [];
  for await (const event of stream) kinds.push(event.type);
  assert.deepEqual(kinds, ['image_edit.partial_image', 'image_edit.completed']);
});

test('images.createVariation', async () => {
  const r = await client().images.createVariation({ image: await file(disc(64, 64)), n: 2, response_format: 'b64_json', steps: 2 });
  assert.equal(r.data.length, 2);
  assert.notEqual(r.data[0].b64_json, r.data[1].b64_json);
});

test('a retried edit attaches to its first attempt', async () => {
  const before = await imagesGenerated();
  const patient = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: server.key, timeout: 300, maxRetries: 6 });
  const r = await patient.images.edit({
    model: MODEL, prompt: 'slow and steady', image: await file(disc(256, 256)), response_format: 'b64_json', steps: 30,
  });
  assert.deepEqual(pngSize(Buffer.from(r.data[0].b64_json, 'base64')), [256, 256]);
  assert.equal((await imagesGenerated()) - before, 1);
});
