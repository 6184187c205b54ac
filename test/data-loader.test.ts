import test from 'ava';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import { BatchLoader, openImageFolder, openMnist, type Batch, type BatchLoaderOptions, type ImageDataset, type SkippedSample } from '../src/data/index.js';
import { subset, tempDir, writeImage } from './fixtures/data/helpers.js';

interface Snapshot {
  step: number;
  epoch: number;
  indices: number[];
  labels: number[];
  images: Uint8Array;
  batchSize: number;
}

function snap(b: Batch): Snapshot {
  return { step: b.step, epoch: b.epoch, indices: [...b.indices], labels: [...b.labels], images: b.images.slice(), batchSize: b.batchSize };
}

async function take(loader: BatchLoader, n: number): Promise<Snapshot[]> {
  const out: Snapshot[] = [];
  for (let i = 0; i < n; i++) {
    const r = await loader.next();
    if (r.done) break;
    out.push(snap(r.value));
  }
  await loader.close();
  return out;
}

let mnistSmall: ImageDataset | undefined;
async function mnist(n = 200): Promise<ImageDataset> {
  mnistSmall ??= await openMnist('train');
  return subset(mnistSmall, n, `mnist-small-${n}`);
}

function opts(dataset: ImageDataset, extra: Partial<BatchLoaderOptions> = {}): BatchLoaderOptions {
  return { dataset, batchSize: 50, imageSize: 32, seed: 1234, ...extra };
}

test('batches have the documented shape and labels', async (t) => {
  const ds = await mnist();
  const loader = new BatchLoader(opts(ds));
  t.is(loader.stepsPerEpoch, 4);
  t.is(loader.ringSize, 4);
  const [b] = await take(loader, 1);
  t.is(b.step, 0);
  t.is(b.epoch, 0);
  t.is(b.batchSize, 50);
  t.is(b.images.length, 50 * 32 * 32 * 3);
  t.is(b.indices.length, 50);
  t.deepEqual(b.labels, b.indices.map((i) => ds.label(i)!));
  // MNIST is grey: all channels equal; images are not blank.
  let grey = true;
  for (let p = 0; p < b.images.length; p += 3) if (b.images[p] !== b.images[p + 1] || b.images[p] !== b.images[p + 2]) grey = false;
  t.true(grey);
  t.true(b.images.some((v) => v > 200));
});

test('same seed gives identical batches, whatever the concurrency and prefetch', async (t) => {
  const ds = await mnist();
  const a = await take(new BatchLoader(opts(ds, { concurrency: 1, prefetch: 0 })), 6);
  const b = await take(new BatchLoader(opts(ds, { concurrency: 8, prefetch: 3 })), 6);
  t.is(a.length, 6);
  t.deepEqual(a, b);
  const c = await take(new BatchLoader(opts(ds, { seed: 999 })), 2);
  t.notDeepEqual(c[0].indices, a[0].indices);
  t.notDeepEqual(c[0].images, a[0].images);
});

test('each epoch is a new permutation covering the dataset once', async (t) => {
  const ds = await mnist();
  const batches = await take(new BatchLoader(opts(ds)), 8);
  const epoch0 = batches.slice(0, 4).flatMap((b) => b.indices);
  const epoch1 = batches.slice(4, 8).flatMap((b) => b.indices);
  t.deepEqual(batches.map((b) => b.epoch), [0, 0, 0, 0, 1, 1, 1, 1]);
  t.deepEqual([...epoch0].sort((x, y) => x - y), Array.from({ length: 200 }, (_, i) => i));
  t.deepEqual([...epoch1].sort((x, y) => x - y), Array.from({ length: 200 }, (_, i) => i));
  t.notDeepEqual(epoch0, epoch1);
  // Without shuffling, the order is the dataset order.
  const plain = await take(new BatchLoader(opts(ds, { shuffle: false, transform: 'eval' })), 1);
  t.deepEqual(plain[0].indices, Array.from({ length: 50 }, (_, i) => i));
});

test('startStep resumes exactly: batches from k equal batches k.. of a fresh loader', async (t) => {
  const ds = await mnist();
  const fresh = await take(new BatchLoader(opts(ds)), 10);
  for (const k of [1, 3, 4, 7]) {
    const resumed = await take(new BatchLoader(opts(ds, { startStep: k, concurrency: 3 })), 10 - k);
    t.deepEqual(resumed, fresh.slice(k), `startStep ${k}`);
  }
  const loader = new BatchLoader(opts(ds, { startStep: 5 }));
  t.is(loader.nextStep, 5);
  t.deepEqual(loader.indicesOf(5), fresh[5].indices);
  await loader.close();
});

test('endStep stops the iteration; for-await works; close stops it', async (t) => {
  const ds = await mnist();
  const steps: number[] = [];
  for await (const b of new BatchLoader(opts(ds, { startStep: 2, endStep: 6 }))) steps.push(b.step);
  t.deepEqual(steps, [2, 3, 4, 5]);
  const loader = new BatchLoader(opts(ds));
  await loader.next();
  await loader.close();
  t.true((await loader.next()).done);
});

test('batch buffers are reused from a ring and stay valid through the next batch', async (t) => {
  const ds = await mnist();
  const loader = new BatchLoader(opts(ds, { prefetch: 2 }));
  const reference = await take(new BatchLoader(opts(ds, { prefetch: 2 })), 8);
  const buffers: ArrayBufferLike[] = [];
  let previous: Batch | undefined;
  for (let s = 0; s < 8; s++) {
    const { value } = await loader.next();
    const b = value as Batch;
    buffers.push(b.images.buffer);
    t.deepEqual(b.images, reference[s].images);
    if (previous) t.deepEqual(previous.images, reference[s - 1].images, `batch ${s - 1} still intact while ${s} is held`);
    previous = b;
  }
  await loader.close();
  t.is(new Set(buffers).size, 4); // prefetch + 2
  t.is(buffers[0], buffers[4]);
});

test('dropLast=false yields the final partial batch', async (t) => {
  const ds = await mnist(210);
  const loader = new BatchLoader(opts(ds, { dropLast: false }));
  t.is(loader.stepsPerEpoch, 5);
  const batches = await take(loader, 6);
  t.deepEqual(batches.map((b) => b.batchSize), [50, 50, 50, 50, 10, 50]);
  t.is(batches[4].images.length, 10 * 32 * 32 * 3);
  t.is(new Set(batches.slice(0, 5).flatMap((b) => b.indices)).size, 210);
});

test('a dataset smaller than one batch is an error naming both numbers', (t) => {
  const ds: ImageDataset = {
    name: 'tiny',
    length: 3,
    label: () => undefined,
    source: () => ({ kind: 'raw', pixels: new Uint8Array(4), width: 2, height: 2, channels: 1 }),
    describe: (i) => `tiny#${i}`,
  };
  const err = t.throws(() => new BatchLoader({ dataset: ds, batchSize: 8, imageSize: 8, seed: 0 }));
  t.regex(err.message, /"tiny".*3.*8/);
  t.notThrows(() => new BatchLoader({ dataset: ds, batchSize: 8, imageSize: 8, seed: 0, dropLast: false }));
  t.throws(() => new BatchLoader({ dataset: ds, batchSize: 0, imageSize: 8, seed: 0 }), { instanceOf: RangeError });
});

test('corrupt files are skipped, counted with their paths, and batches keep their size', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  for (let i = 0; i < 6; i++) await writeImage(path.join(dir, `img${i}.${i % 2 ? 'png' : 'jpg'}`), 40 + i, 30 + i, i);
  // A truncated JPEG and a text file named .png.
  await writeImage(path.join(dir, 'full.jpg'), 64, 64, 9);
  const jpeg = await readFile(path.join(dir, 'full.jpg'));
  const truncated = path.join(dir, 'truncated.jpg');
  await writeFile(truncated, jpeg.subarray(0, Math.floor(jpeg.length / 2)));
  const fake = path.join(dir, 'fake.png');
  await writeFile(fake, 'this is not a png\n');
  const ds = await openImageFolder(dir);
  t.is(ds.length, 9);

  const reported: SkippedSample[] = [];
  const loader = new BatchLoader({ dataset: ds, batchSize: 4, imageSize: 16, seed: 7, onSkip: (s) => reported.push(s) });
  t.is(loader.stepsPerEpoch, 2);
  const batches = await take(loader, 6);
  t.is(batches.length, 6);
  for (const b of batches) {
    t.is(b.batchSize, 4);
    t.is(b.images.length, 4 * 16 * 16 * 3);
    t.is(new Set(b.indices).size, 4, 'no duplicates inside a batch');
    for (const i of b.indices) t.false([truncated, fake].includes(ds.describe(i)));
    t.deepEqual(b.labels, [-1, -1, -1, -1]);
  }
  t.deepEqual(loader.skipped.map((s) => s.path).sort(), [fake, truncated].sort());
  t.deepEqual(reported.map((s) => s.path).sort(), [fake, truncated].sort());
  for (const s of loader.skipped) t.true(s.reason.length > 0);

  // Replacement is deterministic, hence resumable.
  const again = await take(new BatchLoader({ dataset: ds, batchSize: 4, imageSize: 16, seed: 7, concurrency: 1 }), 6);
  t.deepEqual(again, batches);
  const resumed = await take(new BatchLoader({ dataset: ds, batchSize: 4, imageSize: 16, seed: 7, startStep: 3 }), 3);
  t.deepEqual(resumed, batches.slice(3));
});

test('a dataset where every sample fails is an error, not an endless loop', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  for (let i = 0; i < 5; i++) await writeFile(path.join(dir, `bad${i}.jpg`), `garbage ${i}`);
  const ds = await openImageFolder(dir);
  const loader = new BatchLoader({ dataset: ds, batchSize: 2, imageSize: 8, seed: 1 });
  const err = await t.throwsAsync(loader.next());
  t.regex(err.message, /every one of the 5 samples/);
  t.is(loader.skipped.length, 5);
  // The loader stays failed.
  await t.throwsAsync(loader.next());
});

test('too few readable images to fill a batch is an error', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  await writeImage(path.join(dir, 'ok.png'), 10, 10);
  for (let i = 0; i < 3; i++) await writeFile(path.join(dir, `bad${i}.png`), 'nope');
  const ds = await openImageFolder(dir);
  const loader = new BatchLoader({ dataset: ds, batchSize: 2, imageSize: 8, seed: 1 });
  await t.throwsAsync(loader.next(), { message: /only 1 of the 4 samples/ });
});

test('eval transform loader over an image folder with class labels', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  await writeImage(path.join(dir, 'cat', 'a.jpg'), 50, 40, 1);
  await writeImage(path.join(dir, 'cat', 'b.png'), 30, 60, 2);
  await writeImage(path.join(dir, 'dog', 'c.webp'), 64, 64, 3);
  await writeImage(path.join(dir, 'dog', 'd.jpg'), 20, 20, 4);
  const ds = await openImageFolder(dir);
  const loader = new BatchLoader({ dataset: ds, batchSize: 4, imageSize: 24, seed: 0, transform: 'eval', shuffle: false });
  const [b] = await take(loader, 1);
  t.deepEqual(b.indices, [0, 1, 2, 3]);
  t.deepEqual(b.labels, [0, 0, 1, 1]);
  // Image 3 through sharp directly: resize shorter side to round(24*256/224) = 27, center crop 24.
  const expected = await sharp(path.join(dir, 'dog', 'd.jpg')).resize(27, 27, { kernel: 'cubic', fit: 'fill' }).extract({ left: 2, top: 2, width: 24, height: 24 }).raw().toBuffer();
  t.deepEqual(b.images.subarray(3 * 24 * 24 * 3), new Uint8Array(expected));
});
