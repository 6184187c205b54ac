import test from 'ava';
import { mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { pretrain } from '../src/index.js';
import { readSafetensors, tensorBytes } from './helpers.js';

async function imageFolder(n: number): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-imgs-'));
  for (let i = 0; i < n; i++) {
    const cls = path.join(dir, i % 2 ? 'b' : 'a');
    await mkdir(cls, { recursive: true });
    const w = 80 + i;
    const px = new Uint8Array(w * 72 * 3).map((_, j) => (j * (i + 3) + (j >> 5)) % 256);
    await sharp(px, { raw: { width: w, height: 72, channels: 3 } }).jpeg().toFile(path.join(cls, `img${i}.jpg`));
  }
  return dir;
}

const tiny = { preset: 'convmae-tiny', batchSize: 4, blr: 1e-2, warmupSteps: 2, reconstructions: 2, concurrency: 2 } as const;

test('resume: N steps straight equal N/2 + resume + N/2, bitwise', async (t) => {
  const data = await imageFolder(12);
  const straight = await mkdtemp(path.join(os.tmpdir(), 'convmae-run-'));
  await pretrain({ ...tiny, data, steps: 6, outDir: straight, reconstructions: 0 });

  const split = await mkdtemp(path.join(os.tmpdir(), 'convmae-run-'));
  const stop = new AbortController();
  const first = await pretrain({
    ...tiny,
    data,
    steps: 6,
    outDir: split,
    reconstructions: 0,
    signal: stop.signal,
    onProgress: (p) => p.step === 3 && stop.abort(),
  });
  // Step 4 was queued behind step 3 (overlapped steps) when step 3 was reported: it completes.
  t.is(first.steps, 4);
  const second = await pretrain({ ...tiny, data, steps: 6, outDir: split, resume: true, reconstructions: 0 });
  t.is(second.steps, 6);

  const a = await readSafetensors(path.join(straight, 'checkpoint.safetensors'));
  const b = await readSafetensors(path.join(split, 'checkpoint.safetensors'));
  const names = Object.keys(a.header).filter((k) => k !== '__metadata__');
  t.true(names.length > 100);
  for (const name of names) t.true(tensorBytes(a, name).equals(tensorBytes(b, name)), `${name} differs after resume`);
  const log = (await readFile(path.join(split, 'log.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
  t.deepEqual(
    log.map((e) => e.step),
    [1, 2, 3, 4, 5, 6],
  );
});

test('init: a new run starts from another run\'s weights with a fresh optimizer and schedule, and logs what it loaded', async (t) => {
  const data = await imageFolder(8);
  const first = await mkdtemp(path.join(os.tmpdir(), 'convmae-run-'));
  await pretrain({ ...tiny, data, steps: 2, outDir: first, reconstructions: 0 });
  const from = path.join(first, 'checkpoint.safetensors');
  const second = await mkdtemp(path.join(os.tmpdir(), 'convmae-run-'));
  const s = await pretrain({ ...tiny, data, steps: 1, outDir: second, reconstructions: 0, init: from });
  t.is(s.steps, 1);
  t.true(s.init!.loaded.length > 100);
  t.deepEqual(s.init!.missing, []);
  t.false(s.init!.optimizerRestored);
  const log = (await readFile(path.join(second, 'log.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
  t.like(log[0], { event: 'init', from, missing: [], unexpected: [] });
  // Step 1 of a new schedule (warmup from 0) on weights that already learned: not the first run's step 1.
  const firstLog = (await readFile(path.join(first, 'log.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
  t.is(log[1].step, 1);
  t.is(log[1].lr, firstLog[0].lr);
  t.not(log[1].loss, firstLog[0].loss);
  const saved = await readSafetensors(path.join(second, 'checkpoint.safetensors'));
  t.is((saved.header.__metadata__ as Record<string, string>).optimizer_step, '1');
});

test('corrupt and unreadable images are skipped, counted, and the run goes on', async (t) => {
  const data = await imageFolder(8);
  await writeFile(path.join(data, 'a', 'broken.jpg'), Buffer.from([0xff, 0xd8, 0xff, 0xe0, 0, 0x10, 1, 2, 3]));
  await writeFile(path.join(data, 'b', 'notes.png'), 'this is not a png');
  const out = await mkdtemp(path.join(os.tmpdir(), 'convmae-run-'));
  const seen: string[] = [];
  const s = await pretrain({ ...tiny, data, steps: 3, outDir: out, onSkip: (x) => seen.push(x.path) });
  t.is(s.steps, 3);
  t.deepEqual(s.skipped.map((x) => path.basename(x.path)).sort(), ['broken.jpg', 'notes.png']);
  t.is(seen.length, 2);
  const png = await sharp(path.join(out, 'reconstruction.png')).metadata();
  t.is(png.width, 4 * 64);
  t.is(png.height, 2 * 64);
});

test('a missing or empty data folder is an error naming the path', async (t) => {
  const out = await mkdtemp(path.join(os.tmpdir(), 'convmae-run-'));
  await t.throwsAsync(pretrain({ ...tiny, data: '/nonexistent/images', steps: 1, outDir: out }), { message: /\/nonexistent\/images/ });
  const empty = await mkdtemp(path.join(os.tmpdir(), 'convmae-empty-'));
  await t.throwsAsync(pretrain({ ...tiny, data: empty, steps: 1, outDir: out }), { message: new RegExp(empty.replace(/[/.]/g, '\\$&')) });
});

test('an invalid config fails before any data is read', async (t) => {
  await t.throwsAsync(pretrain({ preset: 'convmae-tiny', config: { mask_ratio: 1.5 }, data: '/nonexistent', steps: 1 }), { message: /mask_ratio/ });
});

test('resume refuses a different batch size', async (t) => {
  const data = await imageFolder(8);
  const out = await mkdtemp(path.join(os.tmpdir(), 'convmae-run-'));
  await pretrain({ ...tiny, data, steps: 1, outDir: out, reconstructions: 0 });
  await t.throwsAsync(pretrain({ ...tiny, batchSize: 2, data, steps: 2, outDir: out, resume: true }), { message: /batch 4 x accum 1/ });
});
