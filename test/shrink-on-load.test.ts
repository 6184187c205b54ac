// JPEG shrink-on-load of the sharp pretraining path (option `shrinkOnLoad`):
// close to the full decode, same random stream, inert where it cannot apply.
import test from 'ava';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import {
  BatchLoader,
  applyPretrainParams,
  createRng,
  openImage,
  openImageFolder,
  pretrainTransform,
  sharpJpegShrinkOnLoad,
  shrinkOnLoadPlan,
  type CropBox,
  type ImageSource,
  type PretrainTransformOptions,
} from '../src/data/index.js';
import { tempDir } from './fixtures/data/helpers.js';

/** A smooth camera-sized test image: two ramps and a slow wave (periods of ~230 and ~330 px). */
function smoothPattern(width: number, height: number): Uint8Array {
  const px = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const o = (y * width + x) * 3;
      px[o] = (x * 255) / (width - 1);
      px[o + 1] = (y * 255) / (height - 1);
      px[o + 2] = 128 + 100 * Math.sin(x / 37) * Math.cos(y / 53);
    }
  }
  return px;
}

function meanAbsDiff(a: Uint8Array, b: Uint8Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i] - b[i]);
  return s / a.length;
}

const WIDTH = 2400;
const HEIGHT = 1800;
const SIZE = 224;

// One large JPEG and PNG for the whole file (encoding them is the slow part).
const files = (async () => {
  const { dir, cleanup } = await tempDir('convmae-shrink-');
  const raw = sharp(smoothPattern(WIDTH, HEIGHT), { raw: { width: WIDTH, height: HEIGHT, channels: 3 } });
  const jpeg = path.join(dir, 'big.jpg');
  await writeFile(jpeg, await raw.clone().jpeg({ quality: 95 }).toBuffer());
  // The PNG is smaller to keep its encoding fast; with a 64 output its crops still qualify by size.
  const png = path.join(dir, 'big.png');
  await sharp(smoothPattern(1200, 900), { raw: { width: 1200, height: 900, channels: 3 } }).png({ compressionLevel: 1 }).toFile(png);
  return { dir, jpeg, png, cleanup };
})();
test.after.always(async () => (await files).cleanup());

async function transform(source: ImageSource, size: number, seed: number, options: PretrainTransformOptions) {
  const out = new Uint8Array(size * size * 3);
  const rng = createRng(seed);
  const result = await pretrainTransform(source, size, rng, out, 0, options);
  // The value after the transform's draws: equal iff the same randomness was consumed.
  return { out, result, nextDraw: rng() };
}

async function applyCrop(file: string, crop: CropBox, flip: boolean, size: number, shrinkOnLoad: boolean): Promise<Uint8Array> {
  const out = new Uint8Array(size * size * 3);
  await applyPretrainParams(await openImage({ kind: 'file', path: file }), { crop, flip }, size, out, 0, { shrinkOnLoad });
  return out;
}

test('sharp JPEG scale rule and shrink-on-load plans', (t) => {
  // The choice sharp 0.34 makes (src/pipeline.cc): never exactly the resize factor.
  t.deepEqual([1.9, 2, 2.9, 3, 4, 4.9, 5, 8, 8.9, 9, 20].map(sharpJpegShrinkOnLoad), [1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8]);
  t.is(shrinkOnLoadPlan(WIDTH, HEIGHT, { left: 0, top: 0, width: 447, height: 1000 }, SIZE), undefined, 'under 2x on a side');
  t.is(shrinkOnLoadPlan(WIDTH, HEIGHT, { left: 0, top: 0, width: 500, height: 480 }, SIZE), undefined, 'no reduced decode between 2x and 3x');
  t.deepEqual(shrinkOnLoadPlan(WIDTH, HEIGHT, { left: 0, top: 0, width: WIDTH, height: HEIGHT }, SIZE), {
    resizeWidth: SIZE,
    resizeHeight: SIZE,
    crop: { left: 0, top: 0, width: SIZE, height: SIZE },
    jpegShrink: 4,
  });
  // Bottom-right crop: the box stays inside the resized image.
  const plan = shrinkOnLoadPlan(WIDTH, HEIGHT, { left: 1599, top: 1001, width: 801, height: 799 }, SIZE)!;
  t.is(plan.jpegShrink, 2);
  t.true(plan.crop.left + SIZE <= plan.resizeWidth && plan.crop.top + SIZE <= plan.resizeHeight);
});

test('shrink-on-load: large JPEG crops stay close to the full decode, with the same crops, flips and random stream', async (t) => {
  const { jpeg } = await files;
  const source: ImageSource = { kind: 'file', path: jpeg };
  let applied = 0;
  const flips = new Set<boolean>();
  for (let seed = 0; seed < 8; seed++) {
    const full = await transform(source, SIZE, seed, {});
    const shrunk = await transform(source, SIZE, seed, { shrinkOnLoad: true });
    t.deepEqual(shrunk.result, full.result, `seed ${seed}: crop, flip and source size`);
    t.is(shrunk.nextDraw, full.nextDraw, `seed ${seed}: random stream`);
    t.is(shrunk.out.length, SIZE * SIZE * 3);
    const { crop, flip } = full.result;
    if (!shrinkOnLoadPlan(WIDTH, HEIGHT, crop, SIZE)) {
      t.deepEqual(shrunk.out, full.out, `seed ${seed}: no plan, same path`);
      continue;
    }
    applied++;
    flips.add(flip);
    const diff = meanAbsDiff(shrunk.out, full.out);
    t.log(`seed ${seed}: crop ${crop.width}x${crop.height} flip ${flip}: mean |diff| ${diff.toFixed(3)}`);
    // Measured 0.19-1.26 levels on this image at 224 (the DCT-scaled decode,
    // the whole-image cubic resample and the box edges up to half an output
    // pixel off); 3 leaves twice that as margin against machine-to-machine
    // libjpeg differences, while a box cut from the wrong place (an
    // unmirrored flip measured 57-70) fails by far. Smaller outputs differ
    // more (about 5 at 64, where the blue wave is 7 output pixels long and
    // the half-pixel placement shows), hence the 224 output here.
    t.true(diff < 3, `seed ${seed}: mean |diff| ${diff}`);
    t.notDeepEqual(shrunk.out, full.out, `seed ${seed}: shrink-on-load was not used`);
  }
  t.true(applied >= 4, `only ${applied} of 8 crops were large enough`);
  t.is(flips.size, 2, 'both flip states were exercised');
});

test('shrink-on-load: flipped and unflipped fixed crops, corners included, stay close to the full decode', async (t) => {
  const { jpeg } = await files;
  const crops: CropBox[] = [
    { left: 0, top: 0, width: WIDTH, height: HEIGHT },
    { left: 300, top: 200, width: 800, height: 700 },
    { left: WIDTH - 2000, top: HEIGHT - 1700, width: 2000, height: 1700 },
  ];
  for (const crop of crops) {
    for (const flip of [false, true]) {
      const diff = meanAbsDiff(await applyCrop(jpeg, crop, flip, SIZE, true), await applyCrop(jpeg, crop, flip, SIZE, false));
      t.log(`${crop.width}x${crop.height} flip ${flip}: mean |diff| ${diff.toFixed(3)}`);
      t.true(diff < 3, `${crop.width}x${crop.height} at (${crop.left}, ${crop.top}) flip ${flip}: mean |diff| ${diff}`);
    }
  }
});

test('shrink-on-load: crops under 3x the output are bit-identical to the option being off', async (t) => {
  const { jpeg } = await files;
  // Under 2x (no DCT scale possible) and between 2x and 3x (sharp would not decode at a reduced scale).
  for (const crop of [
    { left: 10, top: 20, width: 400, height: 300 },
    { left: 1000, top: 900, width: 500, height: 480 },
  ]) {
    for (const flip of [false, true]) {
      t.deepEqual(await applyCrop(jpeg, crop, flip, SIZE, true), await applyCrop(jpeg, crop, flip, SIZE, false));
    }
  }
});

test('shrink-on-load: PNG input ignores the option (bit-identical)', async (t) => {
  const { png } = await files;
  for (let seed = 0; seed < 4; seed++) {
    const source: ImageSource = { kind: 'file', path: png };
    const full = await transform(source, 64, seed, {});
    const shrunk = await transform(source, 64, seed, { shrinkOnLoad: true });
    t.truthy(shrinkOnLoadPlan(1200, 900, full.result.crop, 64), 'the crop would qualify if the file were a JPEG');
    t.deepEqual(shrunk.result, full.result);
    t.deepEqual(shrunk.out, full.out);
  }
});

test('shrink-on-load: greyscale JPEGs stay one band replicated to RGB', async (t) => {
  const { dir, cleanup } = await tempDir('convmae-shrink-grey-');
  t.teardown(cleanup);
  const width = 1600;
  const height = 1200;
  const grey = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) grey[y * width + x] = (x * 255) / (width - 1) / 2 + (y * 255) / (height - 1) / 2;
  const file = path.join(dir, 'grey.jpg');
  await sharp(grey, { raw: { width, height, channels: 1 } }).toColourspace('b-w').jpeg({ quality: 95 }).toFile(file);
  const crop = { left: 100, top: 150, width: 1400, height: 1000 };
  t.truthy(shrinkOnLoadPlan(width, height, crop, SIZE));
  const shrunk = await applyCrop(file, crop, true, SIZE, true);
  for (let i = 0; i < shrunk.length; i += 3) {
    if (shrunk[i] !== shrunk[i + 1] || shrunk[i] !== shrunk[i + 2]) return t.fail(`pixel ${i / 3} is not grey`);
  }
  t.true(meanAbsDiff(shrunk, await applyCrop(file, crop, true, SIZE, false)) < 3);
});

test('BatchLoader forwards shrinkOnLoad to the sharp path', async (t) => {
  const { dir } = await files;
  const dataset = await openImageFolder(dir); // big.jpg and big.png
  const batch = async (shrinkOnLoad: boolean) => {
    const loader = new BatchLoader({ dataset, batchSize: 2, imageSize: SIZE, seed: 3, shuffle: false, nativeJpeg: false, shrinkOnLoad, endStep: 1 });
    const images: Uint8Array[] = [];
    for await (const b of loader) images.push(b.images.slice());
    return images[0];
  };
  const off = await batch(false);
  const on = await batch(true);
  const bytes = SIZE * SIZE * 3;
  const jpegSlot = dataset.describe(0).endsWith('.jpg') ? 0 : 1;
  const slot = (images: Uint8Array, i: number) => images.subarray(i * bytes, (i + 1) * bytes);
  t.notDeepEqual(slot(on, jpegSlot), slot(off, jpegSlot), 'the JPEG went through shrink-on-load');
  const diff = meanAbsDiff(slot(on, jpegSlot), slot(off, jpegSlot));
  t.log(`JPEG slot: mean |diff| ${diff.toFixed(3)}`);
  t.true(diff < 3, `mean |diff| ${diff}`);
  t.deepEqual(slot(on, 1 - jpegSlot), slot(off, 1 - jpegSlot), 'the PNG did not');
});
