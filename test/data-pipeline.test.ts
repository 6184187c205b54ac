// The high-throughput data path: native JPEG decoding against sharp, JPEG
// headers, tar shards, file lists, rank sharding and the shard epoch order.
import test from 'ava';
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import {
  BatchLoader,
  applyPretrainParams,
  decodeCropBatch,
  expandShardPattern,
  listTar,
  cropPixelBatch,
  createRng,
  deriveSeed,
  nativeDecoder,
  nativePixelCropper,
  openDataset,
  openFileList,
  openImage,
  openImageFolder,
  openTarShards,
  readJpegHeader,
  readSourceBytes,
  samplePretrainParams,
  type Batch,
  type ImageDataset,
  type PretrainParams,
} from '../src/data/index.js';
import { pretrain } from '../src/index.js';
import { encodeTar, photoLike, tempDir } from './fixtures/data/helpers.js';

async function jpegOf(pixels: Uint8Array, width: number, height: number, options: sharp.JpegOptions = {}, channels: 1 | 3 = 3): Promise<Buffer> {
  const image = sharp(pixels, { raw: { width, height, channels } });
  return (channels === 1 ? image.toColourspace('b-w') : image).jpeg({ quality: 90, ...options }).toBuffer();
}

function maxAbsDiff(a: Uint8Array, b: Uint8Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

function meanAbsDiff(a: Uint8Array, b: Uint8Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i] - b[i]);
  return s / a.length;
}

async function collect(loader: BatchLoader, n: number): Promise<Batch[]> {
  const out: Batch[] = [];
  for await (const b of loader) {
    out.push({ ...b, images: b.images.slice(), labels: b.labels.slice(), indices: [...b.indices] });
    if (out.length === n) break;
  }
  await loader.close();
  return out;
}

// ---------------------------------------------------------------------------
// JPEG headers and the native decoder

test('readJpegHeader reads dimensions and components; non-JPEG and damaged headers give undefined', async (t) => {
  const rgb = await jpegOf(photoLike(37, 23), 37, 23);
  t.deepEqual(readJpegHeader(rgb), { width: 37, height: 23, components: 3, progressive: false });
  const grey = await jpegOf(new Uint8Array(20 * 10).fill(90), 20, 10, {}, 1);
  t.is(readJpegHeader(grey)?.components, 1);
  const progressive = await jpegOf(photoLike(16, 16), 16, 16, { progressive: true });
  t.true(readJpegHeader(progressive)?.progressive);
  t.is(readJpegHeader(await sharp(photoLike(8, 8), { raw: { width: 8, height: 8, channels: 3 } }).png().toBuffer()), undefined);
  t.is(readJpegHeader(rgb.subarray(0, 30)), undefined);
});

// The two decoders differ in IDCT and chroma upsampling rounding, and the
// resamplers differ (Pillow's bicubic natively, libvips' cubic in sharp), so
// agreement is close but not bit-exact. Measured with sharp 0.34.5: mean
// |diff| 0.09-0.44 levels when shrinking, 1.46 when enlarging (where the
// kernels differ most), max 7. Tolerance: mean <= 2.5, max <= 16; a wrong
// crop, flip or channel order gives means of tens of levels.
const MEAN_TOLERANCE = 2.5;
const MAX_TOLERANCE = 16;

test('native decode + crop + resize + flip agrees with sharp on the same crop (RGB 4:2:0, 4:4:4, progressive, greyscale)', async (t) => {
  const decode = await nativeDecoder();
  if (!decode) return t.fail('native module not built');
  const size = 32;
  const cases: { name: string; bytes: Buffer; params: PretrainParams }[] = [
    { name: '4:2:0', bytes: await jpegOf(photoLike(120, 90, 1), 120, 90), params: { crop: { left: 10, top: 7, width: 80, height: 61 }, flip: false } },
    { name: '4:4:4 flipped', bytes: await jpegOf(photoLike(90, 120, 2), 90, 120, { chromaSubsampling: '4:4:4' }), params: { crop: { left: 0, top: 30, width: 90, height: 71 }, flip: true } },
    { name: 'upscale', bytes: await jpegOf(photoLike(40, 30, 3), 40, 30), params: { crop: { left: 5, top: 3, width: 20, height: 17 }, flip: false } },
    { name: 'progressive', bytes: await jpegOf(photoLike(100, 80, 5), 100, 80, { progressive: true }), params: { crop: { left: 20, top: 10, width: 70, height: 60 }, flip: false } },
    {
      name: 'greyscale',
      bytes: await jpegOf(photoLike(64, 48, 4).filter((_, i) => i % 3 === 0), 64, 48, {}, 1),
      params: { crop: { left: 8, top: 4, width: 50, height: 40 }, flip: true },
    },
  ];
  const jobs = cases.map((c) => ({ bytes: c.bytes, path: c.name, ...c.params }));
  const result = await decodeCropBatch(decode, jobs, size, 2);
  const block = size * size * 3;
  for (const [k, c] of cases.entries()) {
    t.is(result.errors[k] ?? null, null, c.name);
    const ours = result.pixels.subarray(k * block, (k + 1) * block);
    const ref = new Uint8Array(block);
    await applyPretrainParams(await openImage({ kind: 'file', path: c.name }, c.bytes), c.params, size, ref, 0);
    const mean = meanAbsDiff(ours, ref);
    const max = maxAbsDiff(ours, ref);
    t.log(`${c.name}: mean |native - sharp| ${mean.toFixed(2)}, max ${max}`);
    t.true(mean <= MEAN_TOLERANCE && max <= MAX_TOLERANCE, `${c.name}: mean ${mean.toFixed(2)}, max ${max}`);
    if (c.name === 'greyscale') {
      for (let i = 0; i < ours.length; i += 3) if (ours[i] !== ours[i + 1] || ours[i] !== ours[i + 2]) return t.fail('grey not replicated');
    }
  }
});

test('native decoder errors name the file; corrupt bytes fail only their own image', async (t) => {
  const decode = await nativeDecoder();
  if (!decode) return t.fail('native module not built');
  const good = await jpegOf(photoLike(40, 30), 40, 30);
  const truncated = good.subarray(0, Math.floor(good.length * 0.6));
  const crop = { left: 0, top: 0, width: 40, height: 30 };
  const result = await decodeCropBatch(
    decode,
    [
      { bytes: good, path: '/data/good.jpg', crop, flip: false },
      { bytes: truncated, path: '/data/cut.jpg', crop, flip: false },
      { bytes: good, path: '/data/outside.jpg', crop: { left: 1, top: 0, width: 40, height: 30 }, flip: false },
    ],
    16,
    2,
  );
  t.is(result.errors[0] ?? null, null);
  t.regex(String(result.errors[1]), /^\/data\/cut\.jpg: /);
  t.regex(String(result.errors[2]), /^\/data\/outside\.jpg: crop 40x30 at \(1, 0\) is outside the 40x30 image/);
});

test('loader: native and sharp paths draw the same crops; native output does not depend on decodeThreads', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  for (let i = 0; i < 6; i++) await writeFile(path.join(dir, `${i}.jpg`), await jpegOf(photoLike(96 + 8 * i, 72, i), 96 + 8 * i, 72));
  const dataset = await openImageFolder(dir);
  const make = (nativeJpeg: boolean, decodeThreads: number) => new BatchLoader({ dataset, batchSize: 3, imageSize: 24, seed: 5, nativeJpeg, decodeThreads, endStep: 4 });
  const native1 = await collect(make(true, 1), 4);
  const native2 = await collect(make(true, 2), 4);
  const viaSharp = await collect(make(false, 1), 4);
  for (let s = 0; s < 4; s++) {
    t.deepEqual(native1[s].images, native2[s].images);
    t.deepEqual(native1[s].indices, viaSharp[s].indices);
    const mean = meanAbsDiff(native1[s].images, viaSharp[s].images);
    t.true(mean <= MEAN_TOLERANCE, `step ${s}: mean |native - sharp| ${mean.toFixed(2)}`);
  }
});

test('loader: images in memory take the native transform: each slot is its image through it with the crop the loader drew; near sharp\'s pixels when shrinking; one that does not fill its dimensions is skipped with both reasons', async (t) => {
  // Grey (as IDX digits) and RGB images in memory.
  const inMemory = (shapes: [number, number, 1 | 3][], broken?: number): ImageDataset => {
    const pixelsOf = (i: number) => {
      const [w, h, c] = shapes[i];
      const rgb = photoLike(w, h, i);
      if (c === 3) return rgb;
      const grey = new Uint8Array(w * h);
      for (let p = 0; p < w * h; p++) grey[p] = rgb[3 * p + 1];
      return grey;
    };
    return {
      name: 'inmemory',
      length: shapes.length,
      label: () => undefined,
      source: (i) => {
        const [width, height, channels] = shapes[i];
        const pixels = pixelsOf(i);
        return { kind: 'raw', pixels: i === broken ? pixels.subarray(0, 10) : pixels, width, height, channels };
      },
      describe: (i) => `inmemory#${i}`,
    };
  };
  const crop = await nativePixelCropper();
  if (!crop) return t.fail('the native module has no cropPixelBatch');

  // Small images, enlarged (MNIST's case): every slot is exactly the native transform of its
  // image with the crop and flip drawn from its seed, as the sharp path would draw them.
  const small: [number, number, 1 | 3][] = [[28, 28, 1], [40, 30, 3], [28, 28, 1], [33, 47, 3], [20, 20, 1], [64, 48, 3]];
  const dataset = inMemory(small);
  const size = 24;
  const batches = await collect(new BatchLoader({ dataset, batchSize: 3, imageSize: size, seed: 7, decodeThreads: 2, endStep: 2 }), 2);
  for (const [s, batch] of batches.entries()) {
    for (const [k, index] of batch.indices.entries()) {
      const source = dataset.source(index);
      if (source.kind !== 'raw') return t.fail();
      const params = samplePretrainParams(source.width, source.height, createRng(deriveSeed(7, 0, index)), {});
      const alone = await cropPixelBatch(crop, [{ ...source, path: dataset.describe(index), ...params }], size, 1);
      t.is(alone.errors[0] ?? null, null);
      // (pixels is a Buffer: compared as a plain Uint8Array.)
      t.deepEqual(batch.images.slice(k * size * size * 3, (k + 1) * size * size * 3), new Uint8Array(alone.pixels), `step ${s}, image ${index}`);
    }
  }

  // Larger images, shrunk: near sharp's transform with the same crops (the resamplers agree
  // closely when shrinking; enlarging, Pillow's bicubic and libvips' cubic disagree most, at
  // edges). A wrong crop, flip or channel order gives means of tens of levels.
  const large = inMemory([[56, 56, 1], [80, 60, 3], [64, 64, 1], [66, 94, 3], [60, 60, 1], [128, 96, 3]]);
  const make = (nativePixels: boolean) => new BatchLoader({ dataset: large, batchSize: 3, imageSize: 8, seed: 7, nativePixels, endStep: 2 });
  const native = await collect(make(true), 2);
  const viaSharp = await collect(make(false), 2);
  for (let s = 0; s < 2; s++) {
    t.deepEqual(native[s].indices, viaSharp[s].indices);
    const mean = meanAbsDiff(native[s].images, viaSharp[s].images);
    t.true(mean <= MEAN_TOLERANCE, `step ${s}: mean |native - sharp| ${mean.toFixed(2)}`);
  }

  const broken = new BatchLoader({ dataset: inMemory(small, 2), batchSize: 3, imageSize: size, seed: 7, endStep: 2 });
  await collect(broken, 2);
  t.is(broken.skipped.length, 1);
  t.is(broken.skipped[0].path, 'inmemory#2');
  t.regex(broken.skipped[0].reason, /native decoder: inmemory#2: decoded image is shorter than its dimensions/);
});

test('loader: a CMYK JPEG falls back to sharp; a corrupt JPEG is skipped with its path and both decoders\' reasons', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  for (let i = 0; i < 3; i++) await writeFile(path.join(dir, `${i}.jpg`), await jpegOf(photoLike(64, 48, i), 64, 48));
  const cmyk = await sharp(photoLike(64, 48, 9), { raw: { width: 64, height: 48, channels: 3 } }).toColourspace('cmyk').jpeg({ quality: 90 }).toBuffer();
  t.is(readJpegHeader(cmyk)?.components, 4);
  await writeFile(path.join(dir, '3-cmyk.jpg'), cmyk);
  const good = await jpegOf(photoLike(64, 48, 5), 64, 48);
  await writeFile(path.join(dir, '4-cut.jpg'), good.subarray(0, Math.floor(good.length / 2)));
  await writeFile(path.join(dir, '5.jpg'), good);
  const dataset = await openImageFolder(dir);
  const loader = new BatchLoader({ dataset, batchSize: 5, imageSize: 16, seed: 1, shuffle: false, endStep: 1 });
  const [batch] = await collect(loader, 1);
  t.deepEqual(batch.indices, [0, 1, 2, 3, 5]); // the CMYK file (index 3) decoded via sharp; the cut one replaced
  t.is(loader.skipped.length, 1);
  t.is(loader.skipped[0].path, path.join(dir, '4-cut.jpg'));
  t.regex(loader.skipped[0].reason, /native decoder: .*4-cut\.jpg/);
  // The CMYK image equals sharp's own transform of it with the same crop.
  const viaSharp = await collect(new BatchLoader({ dataset, batchSize: 5, imageSize: 16, seed: 1, shuffle: false, endStep: 1, nativeJpeg: false }), 1);
  const block = 16 * 16 * 3;
  t.deepEqual(batch.images.subarray(3 * block, 4 * block), viaSharp[0].images.subarray(3 * block, 4 * block));
});

// ---------------------------------------------------------------------------
// Rank sharding

test('ranks read disjoint blocks of each epoch order, floor(N / W) samples each, deterministically', async (t) => {
  const n = 11;
  const dataset: ImageDataset = {
    name: 'raw11',
    length: n,
    label: () => undefined,
    source: (i) => ({ kind: 'raw', pixels: new Uint8Array(4 * 4).fill(i * 20), width: 4, height: 4, channels: 1 }),
    describe: (i) => `raw11#${i}`,
  };
  const world = 3;
  for (const epoch of [0, 1]) {
    const seen: number[] = [];
    for (let rank = 0; rank < world; rank++) {
      const loader = new BatchLoader({ dataset, batchSize: 1, imageSize: 4, seed: 9, rank, worldSize: world });
      t.is(loader.stepsPerEpoch, 3);
      const indices = [0, 1, 2].flatMap((s) => loader.indicesOf(epoch * 3 + s));
      const again = new BatchLoader({ dataset, batchSize: 1, imageSize: 4, seed: 9, rank, worldSize: world });
      t.deepEqual([0, 1, 2].flatMap((s) => again.indicesOf(epoch * 3 + s)), indices);
      seen.push(...indices);
    }
    t.is(new Set(seen).size, 9, `epoch ${epoch}: 9 distinct samples over 3 ranks`);
  }
  const firstEpoch = (rank: number) => new BatchLoader({ dataset, batchSize: 1, imageSize: 4, seed: 9, rank, worldSize: world }).indicesOf(0);
  t.notDeepEqual(firstEpoch(0), firstEpoch(1));
  t.throws(() => new BatchLoader({ dataset, batchSize: 1, imageSize: 4, seed: 9, rank: 3, worldSize: 3 }), { message: /rank 3 must be below worldSize 3/ });
  t.throws(() => new BatchLoader({ dataset, batchSize: 4, imageSize: 4, seed: 9, rank: 0, worldSize: 3 }), { message: /3 images per rank \(11 over 3 ranks\)/ });
});

// ---------------------------------------------------------------------------
// Tar shards and file lists

async function writeShards(dir: string): Promise<string[]> {
  const files: string[] = [];
  let key = 0;
  for (let s = 0; s < 3; s++) {
    const members: { name: string; data: Uint8Array }[] = [];
    for (let i = 0; i < 4; i++, key++) {
      const k = String(key).padStart(6, '0');
      const sample = [
        { name: `${k}.jpg`, data: await jpegOf(photoLike(40, 30, key), 40, 30) },
        { name: `${k}.cls`, data: Buffer.from(String(key % 5)) },
      ];
      if (key === 5) {
        // A secondary picture ahead of the .jpg and an extra member: the sample's image is still its .jpg.
        sample.unshift({ name: `${k}.seg.png`, data: Buffer.from('not a picture: must never be decoded') });
        sample.push({ name: `${k}.json`, data: Buffer.from('{"note": "extra member"}') });
      }
      members.push(...sample);
    }
    // A sample whose key is in a long (pax) path and has no label, and a metadata-only sample.
    members.push({ name: `${'deep/'.repeat(25)}x${s}.png`, data: await sharp(photoLike(20, 20, s), { raw: { width: 20, height: 20, channels: 3 } }).png().toBuffer() });
    members.push({ name: `meta${s}.json`, data: Buffer.from('{}') });
    const file = path.join(dir, `train-${String(s).padStart(6, '0')}.tar`);
    await writeFile(file, encodeTar(members));
    files.push(file);
  }
  return files;
}

test('listTar lists members with their byte ranges, pax long names included', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  const [first] = await writeShards(dir);
  const members = await listTar(first);
  t.is(members.length, 4 * 2 + 2);
  t.is(members[1].name, '000000.cls');
  t.is(members[8].name, `${'deep/'.repeat(25)}x0.png`);
  const cls = await readSourceBytes({ kind: 'file', path: first, offset: members[1].offset, length: members[1].size });
  t.is(Buffer.from(cls).toString(), '0');
  await writeFile(path.join(dir, 'bad.tar'), Buffer.alloc(1024, 7));
  await t.throwsAsync(listTar(path.join(dir, 'bad.tar')), { message: /bad\.tar" at byte 0: header checksum mismatch/ });
});

test('tar shards: samples grouped by key, labels from .cls, readable through the loader; shard patterns and directories open', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  const files = await writeShards(dir);
  const ds = await openTarShards(files, { shuffleBuffer: 3 });
  t.is(ds.length, 3 * 5);
  t.is(ds.label(0), 0);
  t.is(ds.describe(6), `${files[1]}:000005.jpg`); // the sample with an extra .json member
  t.is(ds.label(6), 0);
  t.regex(ds.describe(4), /train-000000\.tar:deep\/.*x0\.png$/);
  t.is(ds.label(4), undefined);
  t.is(ds.describe(5), `${files[1]}:000004.jpg`);
  t.is(ds.label(5), 4);
  t.deepEqual(ds.classes, ['0', '1', '2', '3', '4']);

  // The epoch order is a permutation, a function of (seed, epoch), and differs between epochs.
  const order = ds.epochOrder(3, 0);
  t.deepEqual([...order].sort((a, b) => a - b), Array.from({ length: 15 }, (_, i) => i));
  t.deepEqual(ds.epochOrder(3, 0), order);
  t.notDeepEqual(ds.epochOrder(3, 1), order);
  // With a buffer of 1 the shards are read in order, each front to back.
  const sequential = (await openTarShards(files, { shuffleBuffer: 1 })).epochOrder(3, 0);
  for (let k = 1; k < 15; k++) if (k % 5 !== 0) t.is(sequential[k], sequential[k - 1] + 1);

  const loader = new BatchLoader({ dataset: ds, batchSize: 5, imageSize: 16, seed: 3, endStep: 3 });
  const batches = await collect(loader, 3);
  t.deepEqual(batches.flatMap((b) => b.indices), [...order]);
  t.is(loader.skipped.length, 0);

  t.is((await openDataset(path.join(dir, 'train-{000000..000002}.tar'))).length, 15);
  t.is((await openDataset(dir)).length, 15);
  t.is((await openDataset(files[1])).length, 5);
  t.deepEqual(expandShardPattern('a/s-{08..11}.tar'), ['a/s-08.tar', 'a/s-09.tar', 'a/s-10.tar', 'a/s-11.tar']);
  await t.throwsAsync(openDataset(path.join(dir, 'train-{000003..000004}.tar')), { message: /train-000003\.tar" cannot be opened/ });
});

test('file list: relative paths, labels, comments; mixing labeled and unlabeled lines is an error', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  await mkdir(path.join(dir, 'img'));
  for (let i = 0; i < 3; i++) await writeFile(path.join(dir, 'img', `a b${i}.jpg`), await jpegOf(photoLike(30, 20, i), 30, 20));
  await writeFile(path.join(dir, 'train.txt'), '# path label\nimg/a b0.jpg 2\n\nimg/a b1.jpg 0\n' + `${path.join(dir, 'img', 'a b2.jpg')} 1\n`);
  const ds = await openFileList(path.join(dir, 'train.txt'));
  t.is(ds.length, 3);
  t.deepEqual(ds.files, [0, 1, 2].map((i) => path.join(dir, 'img', `a b${i}.jpg`)));
  t.deepEqual([0, 1, 2].map((i) => ds.label(i)), [2, 0, 1]);
  t.deepEqual(ds.classes, ['0', '1', '2']);
  t.is((await openDataset(path.join(dir, 'train.txt'))).length, 3);
  const [batch] = await collect(new BatchLoader({ dataset: ds, batchSize: 3, imageSize: 8, seed: 0, shuffle: false }), 1);
  t.deepEqual([...batch.labels], [2, 0, 1]);

  await writeFile(path.join(dir, 'mixed.txt'), 'img/a b0.jpg 1\nimg/a b1.jpg\n');
  await t.throwsAsync(openFileList(path.join(dir, 'mixed.txt')), { message: /mixed\.txt" line 2: either every line has a label or none does/ });
  const unlabeled = await openFileList(await writeList(dir, 'plain.txt', 'img/a b0.jpg\nimg/a b1.jpg\n'));
  t.is(unlabeled.label(0), undefined);
});

async function writeList(dir: string, name: string, text: string): Promise<string> {
  const file = path.join(dir, name);
  await writeFile(file, text);
  return file;
}

test('pretrain --data with a shard pattern trains on the shards through this pipeline', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  await writeShards(dir);
  const summary = await pretrain({
    data: path.join(dir, 'train-{000000..000002}.tar'),
    preset: 'convmae-tiny',
    batchSize: 4,
    steps: 2,
    blr: 1e-2,
    warmupSteps: 1,
    reconstructions: 0,
    outDir: path.join(dir, 'run'),
  });
  t.is(summary.steps, 2);
  t.is(summary.dataset, 'train-{000000..000002}');
  t.deepEqual(summary.skipped, []);
  t.true(Number.isFinite(summary.lastLoss));
});
