// Instance detection through the API, the driver and the CLI: the schedule, the LSJ transform,
// the detector's steps and errors, initialization from a pretraining checkpoint, COCO folders
// with an unreadable image, exact resume, and `convmae detect` / `convmae eval`.
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import sharp from 'sharp';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import {
  clipPolygonToBox,
  createRng,
  detect,
  detectionLrAt,
  detectionTestResize,
  detectionTrainTransform,
  Detector,
  evaluateDetection,
  evaluateDetector,
  lsjResizedSize,
  maskBox,
  openCocoFolder,
  pretrain,
  rasterizePolygons,
  type AnnotatedBatch,
  type BoxXyxy,
  type DetectionSample,
  type ImageBatch,
  type ImageDetections,
} from '../src/index.js';
import { SMALL_DETECTOR_HEAD } from '../benches/synthetic-scenes.js';
import { withoutSpikes } from '../src/data/detection-transforms.js';
import { native } from '../src/native.js';
import { sceneBatch, stepLines } from './detection-helpers.js';
import { CLI } from './helpers.js';

const run = promisify(execFile);
/** A tiny detector: convmae-tiny (64 px, token grid 4), narrow heads, small sampling sizes. */
// The GPU check's detector probe uses the same narrow head (benches/synthetic-scenes.ts).
const small = { preset: 'convmae-tiny', ...SMALL_DETECTOR_HEAD } as const;
const smallRun = { ...small, globalBlocks: [...small.globalBlocks], anchorSizes: [...small.anchorSizes] };
const smallFlags = ['--channels', '16', '--box-fc', '32', '--box-convs', '1', '--mask-convs', '1', '--rpn-batch', '64', '--roi-batch', '16', '--rpn-pre-nms-train', '200', '--rpn-post-nms-train', '50', '--rpn-pre-nms-test', '100', '--rpn-post-nms-test', '50'];

test('detectionLrAt is detectron2 WarmupParamScheduler over a cosine: 0.001 of the lr, a linear ramp, then cosine to 0', (t) => {
  const s = { lr: 1e-3, steps: 100, warmupSteps: 10, warmupFactor: 0.001 };
  const close = (a: number, b: number) => t.true(Math.abs(a - b) < 1e-15, `${a} vs ${b}`);
  close(detectionLrAt(0, s), 1e-6);
  // Halfway through the warmup: halfway from 0.001 lr to the cosine's value at step 10.
  const atWarmupEnd = 1e-3 * 0.5 * (1 + Math.cos(Math.PI * 0.1));
  close(detectionLrAt(5, s), 1e-6 + (atWarmupEnd - 1e-6) / 2);
  close(detectionLrAt(10, s), atWarmupEnd);
  close(detectionLrAt(50, s), 0.5e-3);
  close(detectionLrAt(100, s), 0);
  // Without warmup it is the plain cosine.
  close(detectionLrAt(0, { ...s, warmupSteps: 0 }), 1e-3);
  close(detectionLrAt(25, { ...s, warmupSteps: 0 }), 1e-3 * 0.5 * (1 + Math.cos(Math.PI / 4)));
});

/** A 32 x 32 sample: a 10 x 6 block (class 1, with a loose box), a single pixel (class 2) and a crowd region. */
function blockSample(): DetectionSample {
  const size = 32;
  const image = new Uint8Array(size * size * 3).map((_, i) => (Math.floor(i / 3) % size) * 7 + (i % 3));
  const rect = (x1: number, y1: number, x2: number, y2: number) => {
    const mask = new Uint8Array(size * size);
    for (let y = y1; y < y2; y++) mask.fill(1, y * size + x1, y * size + x2);
    return mask;
  };
  return {
    image,
    width: size,
    height: size,
    id: 7,
    instances: [
      { category: 1, box: [0, 0, 32, 32], mask: rect(4, 8, 14, 14), area: 60, iscrowd: false },
      { category: 2, box: [1, 1, 2, 2], mask: rect(1, 1, 2, 2), area: 1, iscrowd: false },
      { category: 0, box: [20, 20, 30, 30], mask: rect(20, 20, 30, 30), area: 100, iscrowd: true },
    ],
  };
}

test('the LSJ train transform moves polygons as detectron2 moves PolygonMasks: scaled, clipped to the crop, mirrored; box from the vertices, mask rasterized', (t) => {
  // Draws in order: scale, crop offset u, flip (< 0.5 flips).
  const scripted = (...values: number[]) => () => values.shift()!;
  const triangle = [10, 10, 60, 10, 10, 40];
  const sample = {
    image: new Uint8Array(100 * 50 * 3).fill(50),
    width: 100,
    height: 50,
    id: 1,
    instances: [{ category: 3, box: [0, 0, 100, 50] as [number, number, number, number], mask: rasterizePolygons([triangle], 50, 100), area: 750, iscrowd: false, polygons: [triangle] }],
  };
  // Scale 1 at S = 64: factor min(64 / 50, 64 / 100) = 0.64, 32 x 64, nothing cropped.
  const plain = detectionTrainTransform(sample, 64, scripted(0, 0.3, 0.9), { scaleRange: [1, 1] });
  const moved = [[6.4, 6.4, 38.4, 6.4, 6.4, 25.6]];
  const close = (a: number[][], b: number[][]) => a.length === b.length && a.every((p, i) => p.length === b[i]!.length && p.every((v, j) => Math.abs(v - b[i]![j]!) < 1e-12));
  t.true(close(plain.instances[0]!.polygons!, moved), JSON.stringify(plain.instances[0]!.polygons));
  // The box of the vertices, not of the rasterized pixels.
  t.true(close([plain.instances[0]!.box], [[6.4, 6.4, 38.4, 25.6]]), JSON.stringify(plain.instances[0]!.box));
  t.deepEqual(plain.instances[0]!.mask, rasterizePolygons(plain.instances[0]!.polygons!, 64, 64));
  t.true(plain.instances[0]!.area > 200);
  // Flipped: x -> 64 - x over the whole canvas.
  const flipped = detectionTrainTransform(sample, 64, scripted(0, 0.3, 0.1), { scaleRange: [1, 1] });
  t.true(close(flipped.instances[0]!.polygons!, [[57.6, 6.4, 25.6, 6.4, 57.6, 25.6]]), JSON.stringify(flipped.instances[0]!.polygons));
  t.true(close([flipped.instances[0]!.box], [[25.6, 6.4, 57.6, 25.6]]));
  // Scale 2: factor 1.28, 64 x 128, cropped to 64 x 64 at left round(64 u) = 32 for u = 0.5. The
  // triangle (12.8, 12.8) (76.8, 12.8) (12.8, 51.2) is cut at x = 32, where its hypotenuse has
  // y = 51.2 - (38.4 / 64) (32 - 12.8) = 39.68: the triangle (32, 12.8) (76.8, 12.8) (32, 39.68),
  // shifted by -32.
  const cropped = detectionTrainTransform(sample, 64, scripted(0, 0.5, 0.9), { scaleRange: [2, 2] });
  t.true(close(cropped.instances[0]!.polygons!, [[0, 12.8, 44.8, 12.8, 0, 39.68]]), JSON.stringify(cropped.instances[0]!.polygons));
  t.true(close([cropped.instances[0]!.box], [[0, 12.8, 44.8, 39.68]]), JSON.stringify(cropped.instances[0]!.box));
  // u = 1 crops at left 64: a triangle wholly left of x = 64 is gone, and its instance dropped.
  const beyond = { ...sample, instances: [{ ...sample.instances[0]!, polygons: [[10, 10, 40, 10, 10, 40]] }] };
  t.deepEqual(detectionTrainTransform(beyond, 64, scripted(0, 1, 0.9), { scaleRange: [2, 2] }).instances, []);
  // The clip itself: a U open at the top, cut below its bar's top, covers the same pixels as the
  // two arms and the bar cut separately would (Sutherland-Hodgman joins them along the edge).
  const u = [0, 0, 2, 0, 2, 6, 4, 6, 4, 0, 6, 0, 6, 8, 0, 8];
  const clipped = clipPolygonToBox(u, 0, 3, 6, 8);
  t.deepEqual(rasterizePolygons([clipped], 10, 10), rasterizePolygons([[0, 3, 2, 3, 2, 6, 4, 6, 4, 3, 6, 3, 6, 8, 0, 8]], 10, 10));
  t.deepEqual(clipPolygonToBox(u, 10, 10, 20, 20), []);
  // A polygon whose outside part runs around the crop's top-left corner (4, 6): the clip leaves a
  // spike out to that corner and back, which is removed, so the part is shapely's triangle and
  // the box recomputed from it is not stretched to the corner (benches/polygon-clip). Its
  // crossings of x = 4: 8.584 + 8.579 * 0.98 / 11.254 and 17.163 + 8.994 * 10.274 / 16.334.
  const wrapped = [14.274, 17.163, -2.06, 26.157, -2.361, 25.995, -4.334, 21.413, -5.952, 17.775, -4.526, 6.744, 5.393, -4.894, 3.02, 8.584];
  const part = clipPolygonToBox(wrapped, 4, 6, 32, 32);
  const want = [4, 9.33106, 14.274, 17.163, 4, 22.82018];
  t.true(part.length === want.length && part.every((v, i) => Math.abs(v - want[i]!) < 1e-5), JSON.stringify(part));
  t.deepEqual(withoutSpikes([0, 0, 5, 0, 5, 5, 5, 9, 5, 5, 0, 5, 0, 5]), [0, 0, 5, 0, 5, 5, 0, 5], 'a spike out and back, and a repeated vertex');
});

test('the LSJ train transform: flip, ResizeScale sizes, crop and pad to S, boxes recomputed from the masks, empty and crowd instances dropped', (t) => {
  // ResizeScale: min(scale S / h, scale S / w), sides rounded half to even as np.round.
  t.deepEqual(lsjResizedSize(20, 40, 32, 1), [16, 32]);
  t.deepEqual(lsjResizedSize(480, 640, 1024, 2), [1536, 2048]);
  t.deepEqual(lsjResizedSize(5, 3, 10, 0.5), [5, 3]);
  const sample = blockSample();
  // Scale 1 on a 32 x 32 image at S = 32: the identity, flipped or not.
  let flipped = 0;
  for (let seed = 0; seed < 16; seed++) {
    const out = detectionTrainTransform(sample, 32, createRng(seed), { scaleRange: [1, 1] });
    t.deepEqual(out, detectionTrainTransform(sample, 32, createRng(seed), { scaleRange: [1, 1] }), 'a pure function of the generator');
    t.is(out.width, 32);
    t.is(out.image.length, 32 * 32 * 3);
    t.deepEqual(
      out.instances.map((i) => i.category),
      [1, 2],
      'the crowd region is dropped',
    );
    const isFlipped = out.image[0] !== sample.image[0];
    if (isFlipped) {
      flipped++;
      t.is(out.image[0], sample.image[31 * 3]);
      t.deepEqual(out.instances[0]!.box, [18, 8, 28, 14]);
    } else {
      t.deepEqual(out.image, sample.image);
      // The loose box [0, 0, 32, 32] is replaced by the mask's tight box.
      t.deepEqual(out.instances[0]!.box, [4, 8, 14, 14]);
    }
    for (const instance of out.instances) {
      t.deepEqual(instance.box, maskBox(instance.mask, 32, 32));
      t.is(instance.area, instance.mask.reduce((a, b) => a + b, 0));
    }
  }
  t.true(flipped > 2 && flipped < 14, `${flipped} of 16 flipped`);
  // Scale 1/4: 8 x 8, padded with 128 (FixedSizeCrop's pad_value) and empty mask, then the
  // canvas flipped or not; nearest resizing (PIL's: the pixel under each output centre) reads
  // rows and columns 2, 6, 10, ...: the single pixel at (1, 1) vanishes and its instance is dropped.
  for (let seed = 0; seed < 4; seed++) {
    const out = detectionTrainTransform(sample, 32, createRng(seed), { scaleRange: [0.25, 0.25] });
    t.deepEqual(
      out.instances.map((i) => i.category),
      [1],
    );
    const box = out.instances[0]!.box;
    // Flipped, the content sits in columns 24..31 and the padding on the left.
    const flippedCanvas = box[0] >= 24;
    const [from, to] = flippedCanvas ? [24, 32] : [0, 8];
    t.true(box[0] >= from && box[2] <= to && box[3] <= 8 && box[2] > box[0] && box[3] > box[1], JSON.stringify(box));
    for (let p = 0; p < 32 * 32; p++) {
      if (p % 32 < from || p % 32 >= to || p >= 8 * 32) {
        t.is(out.image[3 * p], 128);
        t.is(out.instances[0]!.mask[p], 0);
      }
    }
  }
  // Scale 2: 64 x 64 cropped to 32 x 32, the offset one draw for both axes; every instance the
  // crop cuts off is dropped, the others keep tight boxes inside the crop.
  const seen = new Set<string>();
  for (let seed = 0; seed < 24; seed++) {
    const out = detectionTrainTransform(sample, 32, createRng(seed), { scaleRange: [2, 2] });
    t.is(out.image.length, 32 * 32 * 3);
    for (const instance of out.instances) {
      t.true(instance.area > 0);
      t.deepEqual(instance.box, maskBox(instance.mask, 32, 32));
    }
    seen.add(out.instances.map((i) => i.category).join(','));
  }
  t.true(seen.has('1') || seen.has('1,2'), [...seen].join(' / '));
  t.true(seen.has('') || seen.has('2'), `some crops cut the block off: ${[...seen].join(' / ')}`);
  t.throws(() => detectionTrainTransform(sample, 32, createRng(0), { scaleRange: [0, 1] }), { message: /scaleRange must be \[min, max\] with 0 < min <= max/ });
  // The test resize fits the longer side to S and pads; the canvas is the original longer side.
  const wide = { image: new Uint8Array(40 * 20 * 3).fill(9), width: 40, height: 20 };
  const input = detectionTestResize(wide, 32);
  t.deepEqual([input.resizedHeight, input.resizedWidth, input.canvas, input.scale], [16, 32, 40, 0.8]);
  t.is(input.image[(15 * 32 + 31) * 3], 9);
  t.is(input.image[16 * 32 * 3], 128);
});

test('the detector trains on digit scenes, detects at the output size asked for, and names bad instances', async (t) => {
  t.throws(() => Detector.create({ ...smallRun, numClasses: 0 }), { message: /numClasses must be a positive integer/ });
  t.throws(() => Detector.create({ ...smallRun, numClasses: 10, window: 3 }), { message: /window \(3\) must divide the token grid \(4/ });
  const model = Detector.create({ ...smallRun, numClasses: 10, seed: 1 });
  try {
    const batch = await sceneBatch(2);
    const a = await model.train(batch, { lr: 1e-3 });
    t.is(a.step, 1);
    for (const key of ['loss', 'lossRpnCls', 'lossRpnLoc', 'lossCls', 'lossBoxReg', 'lossMask'] as const) t.true(Number.isFinite(a[key]), key);
    t.true(Math.abs(a.loss - (a.lossRpnCls + a.lossRpnLoc + a.lossCls + a.lossBoxReg + a.lossMask)) < 1e-4);
    t.true(a.foreground > 0);
    const b = await model.train(batch, { lr: 1e-3 });
    t.is(b.step, 2);
    const found = await model.detect(batch, { outputSizes: [[32, 48], [64, 64]] });
    t.is(found.length, 2);
    t.deepEqual([found[0]!.height, found[0]!.width, found[1]!.height], [32, 48, 64]);
    t.true(found[0]!.boxes.length > 0, 'an untrained detector scores every class near 1 / 11, above the 0.05 threshold');
    for (const [i, d] of found.entries()) {
      t.is(d.masks.length, d.boxes.length);
      t.true(d.masks.every((m) => m.length === d.height * d.width));
      t.true(d.boxes.every(([x1, y1, x2, y2]) => x1 >= 0 && y1 >= 0 && x2 <= d.width && y2 <= d.height && x2 > x1 && y2 > y1), `image ${i}`);
      t.true(d.scores.every((s, n) => n === 0 || s <= d.scores[n - 1]!), 'best first');
    }
    const bad = structuredClone(batch.instances);
    bad[1]![0]!.category = 10;
    await t.throwsAsync(() => model.train({ ...batch, instances: bad }, { lr: 1e-3 }), { message: /instances\[1\]\[0\]: category 10 is not in 0..9/ });
    const badBox = structuredClone(batch.instances);
    badBox[0]![0]!.box = [5, 5, 5, 9];
    await t.throwsAsync(() => model.train({ ...batch, instances: badBox }, { lr: 1e-3 }), { message: /instances\[0\]\[0\]: box \[5, 5, 5, 9\] must be finite with x2 > x1/ });
    const badMask = structuredClone(batch.instances);
    badMask[1]![0]!.mask = new Uint8Array(10);
    await t.throwsAsync(() => model.train({ ...batch, instances: badMask }, { lr: 1e-3 }), { message: /instances\[1\]\[0\]: mask must be a Uint8Array of 4096 values/ });
    const badPolygon = structuredClone(batch.instances);
    badPolygon[0]![0]!.polygons = [[1, 2, 3, 4, 5, 6], [1, 2, 3]];
    await t.throwsAsync(() => model.train({ ...batch, instances: badPolygon }, { lr: 1e-3 }), { message: /instances\[0\]\[0\]: polygons\[1\] must hold 3 or more \(x, y\) pairs of finite numbers/ });
    // With polygons, the mask head's target comes from them: a triangle instead of the mask
    // changes the mask loss, and nothing else of the first step.
    const fresh = () => Detector.create({ ...smallRun, numClasses: 10, seed: 1 });
    const [plain, drawn] = [fresh(), fresh()];
    try {
      const withPolygon = structuredClone(batch.instances);
      const [x1, y1, x2, y2] = withPolygon[0]![0]!.box;
      withPolygon[0]![0]!.polygons = [[x1, y1, x2, y1, x1, y2]];
      const [p, d] = [await plain.train(batch, { lr: 1e-3 }), await drawn.train({ ...batch, instances: withPolygon }, { lr: 1e-3 })];
      t.not(d.lossMask, p.lossMask);
      t.deepEqual([d.lossRpnCls, d.lossRpnLoc, d.lossCls, d.lossBoxReg, d.foreground], [p.lossRpnCls, p.lossRpnLoc, p.lossCls, p.lossBoxReg, p.foreground]);
    } finally {
      plain.dispose();
      drawn.dispose();
    }
    await t.throwsAsync(() => model.train({ ...batch, instances: [batch.instances[0]!] }, { lr: 1e-3 }), { message: /instances must hold one array per image \(2\), got 1/ });
    await t.throwsAsync(() => model.detect(batch, { outputSizes: [[32, 48]] }), { message: /outputSizes must hold a positive integer \[height, width\] per image \(2\)/ });
  } finally {
    model.dispose();
  }
});

test('in bf16 the detector starts from the f32 RPN losses within a few percent, takes a step and detects; bf16 needs f32 weights', async (t) => {
  t.throws(() => Detector.create({ ...smallRun, numClasses: 10, dtype: 'f64', precision: 'bf16' }), { message: /precision 'bf16' needs dtype f32 master weights/ });
  const [full, half] = [Detector.create({ ...smallRun, numClasses: 10, seed: 1 }), Detector.create({ ...smallRun, numClasses: 10, seed: 1, precision: 'bf16' })];
  try {
    t.is(half.precision, 'bf16');
    const batch = await sceneBatch(2);
    // The first step's RPN losses are the initial weights' on the same sampled anchors (the ROI
    // heads' regions come from the proposals, which rounding may reorder).
    const [a, b] = [await full.train(batch, { lr: 1e-3 }), await half.train(batch, { lr: 1e-3 })];
    for (const key of ['lossRpnCls', 'lossRpnLoc'] as const) t.true(Math.abs(b[key] - a[key]) < 0.05 * a[key], `${key}: bf16 ${b[key]} vs f32 ${a[key]}`);
    for (const key of ['loss', 'lossCls', 'lossBoxReg', 'lossMask'] as const) t.true(Number.isFinite(b[key]), key);
    const found = await half.detect(batch, { outputSizes: [[64, 64], [64, 64]] });
    t.true(found.every((d) => d.masks.length === d.boxes.length && d.scores.every(Number.isFinite)));
  } finally {
    full.dispose();
    half.dispose();
  }
});

test('initFrom a pretraining checkpoint loads the backbone and reports the FPN and heads as missing', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-det-'));
  const p = await pretrain({ preset: 'convmae-tiny', steps: 1, batchSize: 4, outDir: path.join(dir, 'pre'), reconstructions: 0 });
  const model = Detector.create({ ...smallRun, numClasses: 10 });
  try {
    const report = await model.initFrom(p.checkpoint);
    t.true(report.loaded.includes('blocks3.3.attn.qkv.weight') && report.loaded.includes('patch_embed1.proj.weight'), JSON.stringify(report.loaded.slice(0, 8)));
    t.true(report.missing.some((n) => n.startsWith('backbone.fpn_')), JSON.stringify(report.missing.slice(0, 8)));
    t.true(report.missing.some((n) => n.startsWith('roi_heads.')));
    t.true(report.unexpected.includes('decoder_pred.weight'));
    // The driver logs the same report.
    const s = await detect({ ...smallRun, init: p.checkpoint, batchSize: 2, steps: 1, evalLimit: 2, outDir: path.join(dir, 'det') });
    t.deepEqual(s.init!.missing, report.missing);
    t.regex(await readFile(s.log, 'utf8'), /"event":"init","from":"[^"]*checkpoint.safetensors","missing":\[/);
  } finally {
    model.dispose();
  }
});

/** A COCO-layout folder: `train2017` with `n` images and one unreadable file, `val2017` with 2 images; objects are rectangles of 2 classes, one a crowd. */
async function cocoFolder(n: number): Promise<string> {
  const root = await mkdtemp(path.join(os.tmpdir(), 'convmae-coco-'));
  await mkdir(path.join(root, 'annotations'), { recursive: true });
  const categories = [
    { id: 3, name: 'square' },
    { id: 7, name: 'bar' },
  ];
  for (const [split, count] of [['train2017', n], ['val2017', 2]] as const) {
    await mkdir(path.join(root, split));
    const images: object[] = [];
    const annotations: object[] = [];
    for (let i = 0; i < count; i++) {
      const [w, h] = [48 + 8 * i, 40 - 4 * i];
      const pixels = new Uint8Array(w * h * 3);
      const objects = [
        { category_id: 3, box: [4 + i, 5, 14, 12], iscrowd: 0 },
        { category_id: 7, box: [24, 8 + i, 10, 20], iscrowd: 0 },
        { category_id: 3, box: [2, 30 - 4 * i, 20, 4], iscrowd: i === 0 ? 1 : 0 },
      ];
      for (const [k, o] of objects.entries()) {
        const [x, y, bw, bh] = o.box as [number, number, number, number];
        for (let yy = y; yy < y + bh; yy++) for (let xx = x; xx < x + bw; xx++) pixels.set([200 - 60 * k, 60 * k, 120], (yy * w + xx) * 3);
        annotations.push({
          id: annotations.length + 1,
          image_id: 100 + i,
          category_id: o.category_id,
          bbox: [x, y, bw, bh],
          area: bw * bh,
          iscrowd: o.iscrowd,
          segmentation: [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
        });
      }
      const file = `${String(100 + i).padStart(12, '0')}.png`;
      await sharp(pixels, { raw: { width: w, height: h, channels: 3 } }).png().toFile(path.join(root, split, file));
      images.push({ id: 100 + i, file_name: file, width: w, height: h });
    }
    if (split === 'train2017') {
      await writeFile(path.join(root, split, 'broken.png'), 'not a png');
      images.push({ id: 999, file_name: 'broken.png', width: 32, height: 32 });
      annotations.push({ id: annotations.length + 1, image_id: 999, category_id: 3, bbox: [1, 1, 8, 8], area: 64, iscrowd: 0, segmentation: [[1, 1, 9, 1, 9, 9, 1, 9]] });
    }
    await writeFile(path.join(root, 'annotations', `instances_${split}.json`), JSON.stringify({ images, annotations, categories }));
  }
  return root;
}

test('a COCO folder trains with LSJ, skips and logs an unreadable image, and is scored at the original sizes', async (t) => {
  const root = await cocoFolder(3);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-coco-run-'));
  // 4 images, batch 2, 4 steps: two epochs, so every image (the broken one too) is drawn.
  const s = await detect({ ...smallRun, data: root, batchSize: 2, steps: 4, lr: 1e-3, outDir: dir });
  t.is(s.steps, 4);
  t.deepEqual(s.classes, ['square', 'bar']);
  t.is(s.dataset, `${path.basename(root)}-train2017`);
  t.true(s.skipped.length > 0 && s.skipped.every((k) => k.path.endsWith('broken.png')), JSON.stringify(s.skipped));
  t.regex(s.skipped[0]!.reason, /cannot be read/);
  const log = await readFile(s.log, 'utf8');
  t.regex(log, /"event":"skip","path":"[^"]*broken.png"/);
  const e = s.evals.at(-1)!;
  t.is(e.images, 2);
  t.is(e.skipped, 0);
  t.true(Number.isFinite(e.box.AP) && e.box.AP >= 0 && e.box.AP <= 100);
  t.is(e.box.perClass.length, 2);
  t.deepEqual(s.box, e.box);
  // Scoring the saved model again gives the run's last evaluation.
  const again = await evaluateDetector({ checkpoint: s.checkpoint, data: root, batchSize: 1 });
  t.deepEqual(again.box, e.box);
  t.deepEqual(again.mask, e.mask);
  t.is(again.dataset, `${path.basename(root)}-val2017`);
  await t.throwsAsync(() => detect({ ...smallRun, data: root, trainSplit: 'nope', steps: 1, outDir: dir }), { message: /cannot read the annotations '.*instances_nope.json'/ });
});

test('evaluation maps detections back to the original, non-square images: the ground truth seen through the model input scores 100', async (t) => {
  const root = await cocoFolder(1);
  const val = await openCocoFolder(root, { split: 'val2017' });
  // A stand-in for the detector that "finds" each image's objects in the S x S input and scales
  // them to the output size asked for, as Detector.detect does.
  const size = 64;
  let next = 0;
  const oracle = {
    config: { img_size: size },
    async detect(batch: ImageBatch, options: { outputSizes?: [number, number][] } = {}): Promise<ImageDetections[]> {
      const out: ImageDetections[] = [];
      for (let i = 0; i < batch.batchSize; i++) {
        const s = await val.sample(next++);
        const [height, width] = options.outputSizes![i]!;
        const inputScale = size / Math.max(s.width, s.height);
        const outputScale = height / size;
        const back = inputScale * outputScale;
        const objects = s.instances.filter((o) => !o.iscrowd);
        out.push({
          boxes: objects.map((o) => o.box.map((v) => v * back) as BoxXyxy),
          scores: objects.map(() => 0.9),
          classes: objects.map((o) => o.category),
          masks: objects.map((o) => {
            const mask = new Uint8Array(height * width);
            for (let y = 0; y < height; y++) {
              for (let x = 0; x < width; x++) {
                const [sy, sx] = [Math.floor(y / back), Math.floor(x / back)];
                if (sy < s.height && sx < s.width) mask[y * width + x] = o.mask[sy * s.width + sx]!;
              }
            }
            return mask;
          }),
          height,
          width,
        });
      }
      return out;
    },
  } as unknown as Detector;
  const r = await evaluateDetection(oracle, val, 2);
  t.is(r.images, 2);
  t.true(Math.abs(r.box.AP - 100) < 1e-9, JSON.stringify(r.box));
  t.true(Math.abs(r.mask.AP - 100) < 1e-9, JSON.stringify(r.mask));
});

test('a detection run stopped after 2 of 4 steps resumes exactly', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-det-'));
  const base = { ...smallRun, batchSize: 2, evalLimit: 4, lr: 1e-3, steps: 4, scaleRange: [0.8, 1.25] as [number, number] };
  const straight = await detect({ ...base, outDir: path.join(dir, 'straight') });
  const stop = new AbortController();
  const first = await detect({ ...base, outDir: path.join(dir, 'resumed'), signal: stop.signal, onProgress: (p) => p.step === 2 && stop.abort() });
  t.is(first.steps, 2);
  await t.throwsAsync(() => detect({ ...base, batchSize: 4, outDir: path.join(dir, 'resumed'), resume: true }), { message: /trained with batch 2, this run asks for 4/ });
  const second = await detect({ ...base, outDir: path.join(dir, 'resumed'), resume: true });
  t.is(second.steps, 4);
  const a = await stepLines(straight.log);
  const b = await stepLines(second.log);
  t.deepEqual(
    b.map((l) => l.step),
    [1, 2, 3, 4],
  );
  t.deepEqual(
    b.map((l) => [l.loss, l.lr]),
    a.map((l) => [l.loss, l.lr]),
  );
  t.deepEqual(second.evals.at(-1)!.box, straight.evals.at(-1)!.box);
  t.deepEqual(second.evals.at(-1)!.mask, straight.evals.at(-1)!.mask);
});

test('convmae detect trains and reports box and mask AP, eval reproduces it, and refused options are named', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-det-cli-'));
  const out = path.join(dir, 'run');
  const { stderr } = await run(process.execPath, [CLI, 'detect', '--steps', '2', '--batch-size', '2', ...smallFlags, '--eval-limit', '4', '--out', out, '--no-progress']);
  t.regex(stderr, /eval at step 2: box AP [\d.]+ {2}mask AP [\d.]+ {2}\(4 images/);
  t.regex(stderr, /box {3}AP [\d.]+ \| AP50 [\d.]+ \| AP75 [\d.]+ \| APs [\d.]+ \| APm (nan|[\d.]+) \| APl (nan|[\d.]+)/);
  t.regex(stderr, /done: 2 steps on digit-detection-train/);
  // `eval` recognizes a detector checkpoint and scores the same images the same way.
  const logged = (await readFile(path.join(out, 'log.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { event?: string; box?: { AP: number | null }; mask?: { AP: number | null } });
  const lastEval = logged.filter((l) => l.event === 'eval').at(-1)!;
  const scored = await run(process.execPath, [CLI, 'eval', path.join(out, 'checkpoint.safetensors'), '--eval-limit', '4']);
  const line = JSON.parse(scored.stdout) as { dataset: string; box: { AP: number | null }; mask: { AP: number | null }; images: number };
  t.is(line.dataset, 'digit-detection-t10k');
  t.is(line.images, 4);
  t.deepEqual(line.box, lastEval.box);
  t.deepEqual(line.mask, lastEval.mask);
  const refused = async (args: string[], message: RegExp) => {
    const err = await t.throwsAsync(run(process.execPath, [CLI, ...args]));
    t.regex((err as unknown as { stderr: string }).stderr, message);
  };
  // The CPU build names what a CUDA run needs (the CUDA build would run it).
  if (!native.cudaBuild()) {
    await refused(['detect', '--device', 'cuda', '--steps', '1', '--out', out], /device 'cuda': this build of convmae has no CUDA backend/);
    await refused(['eval', path.join(out, 'checkpoint.safetensors'), '--device', 'cuda'], /device 'cuda': this build of convmae has no CUDA backend/);
  }
  await refused(['detect', '--min-lr', '0.1', '--out', out], /--min-lr is not supported .*official schedule/);
  await refused(['detect', '--precision', 'fp16', '--out', out], /precision must be 'fp32' or 'bf16', got 'fp16'/);
  await refused(['detect', '--scale-range', '0.5', '--out', out], /--scale-range: expected two numbers MIN,MAX/);
  await refused(['detect', '--global-blocks', '0,x', '--out', out], /--global-blocks: expected comma-separated numbers/);
  await refused(['detect', '--train-split', 'train2017', '--out', out], /--train-split is for a COCO folder/);
  await refused(['detect', '--batch-size', '0', '--out', out], /batchSize must be a positive integer, got 0/);
  await refused(['detect', '--data', path.join(dir, 'nowhere'), '--out', out], /COCO folder '.*nowhere': cannot read the annotations/);
  await refused(['eval', path.join(out, 'checkpoint.safetensors'), '--task', 'nope'], /--task must be classify, segment or detect/);
});
