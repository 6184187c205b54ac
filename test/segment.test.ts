// Semantic segmentation through the API, the driver and the CLI: the metric arithmetic, the
// digit scenes, the segmenter's steps and errors, initialization from a pretraining checkpoint,
// and exact resume.
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import sharp from 'sharp';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { createRng, evaluateSegmenter, openDataset, openDigitScenes, openMnist, openSegmentationFolder, polyLrAt, pretrain, segment, Segmenter, SegmentationMeter } from '../src/index.js';
import { rescaledSize, resizeBilinearRgb, resizeNearest, segmentationTrainTransform } from '../src/data/segmentation-transforms.js';
import { native } from '../src/native.js';
import { CLI } from './helpers.js';

const run = promisify(execFile);
const small = { preset: 'convmae-tiny', channels: 16, auxChannels: 8 } as const;

/** The first two digit scenes of t10k as one labelled batch. */
async function sceneBatch() {
  const scenes = await openDigitScenes('t10k', { limit: 2 });
  const samples = await Promise.all([0, 1].map((i) => scenes.sample(i)));
  const images = new Uint8Array(2 * 64 * 64 * 3);
  const labels = new Uint8Array(2 * 64 * 64);
  samples.forEach((s, i) => {
    images.set(s.image, i * 64 * 64 * 3);
    labels.set(s.labels, i * 64 * 64);
  });
  return { images, labels, batchSize: 2, height: 64, width: 64 };
}

test('the meter scores areas as mmseg does: classes with an empty union leave the mean', (t) => {
  const meter = new SegmentationMeter(3);
  // Class 2 never appears in labels or predictions.
  meter.add({ intersect: [6, 1, 0], union: [8, 4, 0], predicted: [7, 2, 0], label: [7, 3, 0] });
  meter.add({ intersect: [2, 1, 0], union: [2, 2, 0], predicted: [2, 2, 0], label: [2, 1, 0] });
  const s = meter.score();
  t.deepEqual(meter.areas.intersect, [8, 2, 0]);
  t.is(s.pixels, 13);
  t.true(Math.abs(s.aAcc - 10 / 13) < 1e-12);
  t.true(Math.abs(s.mIoU - (8 / 10 + 2 / 6) / 2) < 1e-12);
  t.true(Math.abs(s.mAcc - (8 / 9 + 2 / 4) / 2) < 1e-12);
  t.true(Number.isNaN(s.iou[2]!));
  t.throws(() => meter.add({ intersect: [1], union: [1], predicted: [1], label: [1] }), { message: /areas.intersect has 1 classes, this meter 3/ });
});

test('polyLrAt follows mmcv: linear warmup from 1e-6 of the poly value, then (1 - t)^power', (t) => {
  const s = { lr: 1e-4, minLr: 0, power: 1, totalSteps: 100, warmupSteps: 10, warmupRatio: 1e-6 };
  t.true(Math.abs(polyLrAt(s, 0) - 1e-4 * 1e-6) < 1e-18);
  t.true(Math.abs(polyLrAt(s, 5) - 1e-4 * 0.95 * (1 - 0.5 * (1 - 1e-6))) < 1e-18);
  t.true(Math.abs(polyLrAt(s, 10) - 0.9e-4) < 1e-18);
  t.is(polyLrAt(s, 100), 0);
});

test('digit scenes are a pure function of the index, labelled 0-10 with rims ignored', async (t) => {
  const scenes = await openDigitScenes('t10k', { size: 64, limit: 20 });
  const mnist = await openMnist('t10k');
  t.is(scenes.length, 20);
  t.is(scenes.classes.length, 11);
  let firstDigitShown = 0;
  for (let i = 0; i < 20; i++) {
    const a = await scenes.sample(i);
    const b = await scenes.sample(i);
    t.deepEqual(a.image, b.image);
    t.deepEqual(a.labels, b.labels);
    const ids = new Set(a.labels);
    t.true([...ids].every((v) => v <= 10 || v === 255));
    t.true(ids.has(255), 'anti-aliased rims are ignored');
    if (ids.has(mnist.label(i)! + 1)) firstDigitShown++;
  }
  // Scene i always holds MNIST digit i (a later digit may cover it, rarely whole).
  t.true(firstDigitShown >= 18, `${firstDigitShown} of 20`);
  await t.throwsAsync(() => openDigitScenes('t10k', { size: 20 }), { message: /size must be an integer of at least 28/ });
  // The same scenes as plain images, for pretraining on them.
  const images = await openDataset('digit-scenes:t10k');
  t.is(images.length, 10000);
  const source = images.source(3);
  t.true(source.kind === 'raw' && source.width === 64 && source.channels === 3);
  t.deepEqual(source.kind === 'raw' ? source.pixels : undefined, (await scenes.sample(3)).image);
});

test('the segmenter trains, evaluates with areas that count every labelled pixel, and names bad input', async (t) => {
  t.throws(() => Segmenter.create({ ...small, numClasses: 256 }), { message: /numClasses must be an integer in 1..255/ });
  t.throws(() => Segmenter.create({ ...small, numClasses: 3, poolScales: [0] }), { message: /pool_scales/ });
  const model = Segmenter.create({ ...small, numClasses: 11, seed: 2 });
  try {
    const batch = await sceneBatch();
    const { images, labels } = batch;
    const r = await model.train(batch, { lr: 1e-3 });
    t.is(r.step, 1);
    t.true(Number.isFinite(r.loss) && Math.abs(r.loss - (r.decodeLoss + 0.4 * r.auxLoss)) < 1e-5);
    const e = await model.evaluate(batch);
    t.is(e.predictions.length, 2 * 64 * 64);
    const labelled = labels.filter((v) => v !== 255).length;
    t.is(e.areas!.label.reduce((a, b) => a + b, 0), labelled);
    const correct = e.predictions.filter((p, i) => labels[i] !== 255 && p === labels[i]).length;
    t.is(e.areas!.intersect.reduce((a, b) => a + b, 0), correct);
    const unlabelled = await model.evaluate({ images, batchSize: 2, height: 64, width: 64 });
    t.deepEqual(unlabelled.predictions, e.predictions);
    t.is(unlabelled.areas, undefined);
    await t.throwsAsync(() => model.train({ ...batch, labels: labels.subarray(1) }, { lr: 1e-3 }), { message: /labels hold 8191 values, expected 8192/ });
    const bad = labels.slice();
    bad[5] = 11;
    await t.throwsAsync(() => model.train({ ...batch, labels: bad }, { lr: 1e-3 }), { message: /value 11 at pixel 5 is out of range for 11 classes/ });
    await t.throwsAsync(() => model.train({ ...batch, batchSize: 1, images: images.subarray(0, 64 * 64 * 3), labels: labels.subarray(0, 64 * 64) }, { lr: 1e-3 }), {
      message: /BatchNorm.*at least 2 images/,
    });
  } finally {
    model.dispose();
  }
});

test('in bf16 the segmenter starts from the f32 loss within a few percent and trains; bf16 needs f32 weights', async (t) => {
  t.throws(() => Segmenter.create({ ...small, numClasses: 11, dtype: 'f64', precision: 'bf16' }), { message: /precision 'bf16' needs dtype f32 master weights/ });
  const [full, half] = [Segmenter.create({ ...small, numClasses: 11, seed: 2 }), Segmenter.create({ ...small, numClasses: 11, seed: 2, precision: 'bf16' })];
  try {
    t.is(half.precision, 'bf16');
    const batch = await sceneBatch();
    // The first step's loss is the initial weights' (same seed, same draws).
    const [a, b] = [await full.train(batch, { lr: 1e-3 }), await half.train(batch, { lr: 1e-3 })];
    t.true(Math.abs(b.loss - a.loss) < 0.05 * a.loss, `bf16 ${b.loss} vs f32 ${a.loss}`);
    t.not(b.loss, a.loss, 'bf16 computes differently');
    let last = b;
    for (let i = 0; i < 5; i++) last = await half.train(batch, { lr: 1e-3 });
    t.true(last.loss < b.loss, `bf16 loss ${b.loss} -> ${last.loss}`);
    t.is((await half.evaluate(batch)).predictions.length, 2 * 64 * 64);
  } finally {
    full.dispose();
    half.dispose();
  }
});

test('initFrom a pretraining checkpoint loads the encoder and reports what the segmenter adds', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-seg-'));
  const p = await pretrain({ preset: 'convmae-tiny', steps: 1, batchSize: 4, outDir: path.join(dir, 'pre'), reconstructions: 0 });
  const model = Segmenter.create({ ...small, numClasses: 11 });
  try {
    const report = await model.initFrom(p.checkpoint);
    t.true(report.loaded.includes('blocks3.3.attn.qkv.weight') && report.loaded.includes('pos_embed'));
    for (const name of ['blocks3.0.gamma_1', 'blocks3.0.attn.relative_position_bias_table', 'fpn.0.weight', 'decode_head.conv_seg.weight']) t.true(report.missing.includes(name), name);
    t.true(report.unexpected.includes('decoder_pred.weight'));
  } finally {
    model.dispose();
  }
});

test('a segmentation run stopped after 4 of 6 steps resumes exactly', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-seg-'));
  const base = { ...small, batchSize: 4, evalLimit: 4, lr: 1e-3, steps: 6 };
  const straight = await segment({ ...base, outDir: path.join(dir, 'straight') });
  const stop = new AbortController();
  const first = await segment({ ...base, outDir: path.join(dir, 'resumed'), signal: stop.signal, onProgress: (p) => p.step === 4 && stop.abort() });
  t.is(first.steps, 4);
  const second = await segment({ ...base, outDir: path.join(dir, 'resumed'), resume: true });
  t.is(second.steps, 6);
  const losses = async (file: string) =>
    (await readFile(file, 'utf8'))
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { step?: number; loss?: number; event?: string })
      .filter((l) => l.event === undefined);
  const a = await losses(straight.log);
  const b = await losses(second.log);
  t.deepEqual(b.map((l) => l.step), [1, 2, 3, 4, 5, 6]);
  t.deepEqual(b.map((l) => l.loss), a.map((l) => l.loss));
  t.is(second.evals.at(-1)!.mIoU, straight.evals.at(-1)!.mIoU);
});

test('convmae segment trains, reports mIoU and refuses options it does not take', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-seg-cli-'));
  const out = path.join(dir, 'run');
  const { stderr } = await run(process.execPath, [CLI, 'segment', '--steps', '2', '--batch-size', '4', '--channels', '16', '--aux-channels', '8', '--eval-limit', '4', '--out', out, '--no-progress']);
  t.regex(stderr, /eval at step 2: mIoU [\d.]+%/);
  t.regex(stderr, /IoU per class {3}background [\d.]+/);
  // `eval` recognizes a segmenter checkpoint and scores the same images the same way.
  const logged = (await readFile(path.join(out, 'log.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as { event?: string; mIoU?: number });
  const scored = await run(process.execPath, [CLI, 'eval', path.join(out, 'checkpoint.safetensors'), '--eval-limit', '4']);
  const line = JSON.parse(scored.stdout) as { dataset: string; mIoU: number; images: number };
  t.is(line.dataset, 'digit-scenes-t10k');
  t.is(line.images, 4);
  t.is(line.mIoU, logged.filter((l) => l.event === 'eval').at(-1)!.mIoU!);
  // In bf16 the same images are scored by the same weights rounded to bf16.
  const half = JSON.parse((await run(process.execPath, [CLI, 'eval', path.join(out, 'checkpoint.safetensors'), '--eval-limit', '4', '--precision', 'bf16'])).stdout) as typeof line;
  t.is(half.images, 4);
  t.true(half.mIoU >= 0 && half.mIoU <= 100, `bf16 mIoU ${half.mIoU}`);
  const badEval = await t.throwsAsync(run(process.execPath, [CLI, 'eval', path.join(out, 'checkpoint.safetensors'), '--precision', 'half']));
  t.regex((badEval as unknown as { stderr: string }).stderr, /precision must be 'fp32' or 'bf16', got 'half'/);
  // The CPU build names what a CUDA run needs (the CUDA build would run it).
  if (!native.cudaBuild()) {
    for (const args of [['segment', '--device', 'cuda', '--steps', '1', '--out', out], ['eval', path.join(out, 'checkpoint.safetensors'), '--device', 'cuda:1']]) {
      const err = await t.throwsAsync(run(process.execPath, [CLI, ...args]));
      t.regex((err as unknown as { stderr: string }).stderr, /device 'cuda(:1)?': this build of convmae has no CUDA backend/);
    }
  }
  const precision = await t.throwsAsync(run(process.execPath, [CLI, 'segment', '--precision', 'fp16', '--out', out]));
  t.regex((precision as unknown as { stderr: string }).stderr, /precision must be 'fp32' or 'bf16', got 'fp16'/);
  const accum = await t.throwsAsync(run(process.execPath, [CLI, 'segment', '--accum-steps', '2', '--out', out]));
  t.regex((accum as unknown as { stderr: string }).stderr, /--accum-steps is not supported/);
  const one = await t.throwsAsync(run(process.execPath, [CLI, 'segment', '--batch-size', '1', '--out', out]));
  t.regex((one as unknown as { stderr: string }).stderr, /batchSize must be at least 2/);
  const bad = await t.throwsAsync(run(process.execPath, [CLI, 'segment', '--data', 'ade', '--out', out]));
  t.regex((bad as unknown as { stderr: string }).stderr, /segmentation folder 'ade': cannot read the images folder/);
});

test('the official transforms: cv2-style resizes, mmcv rescale sizes, crops padded with ignored labels', (t) => {
  // cv2 INTER_LINEAR doubling [0, 255]: 0, 63.75, 191.25, 255, rounded.
  t.deepEqual(Array.from(resizeBilinearRgb(new Uint8Array([0, 0, 0, 255, 255, 255]), 2, 1, 4, 1)).filter((_, i) => i % 3 === 0), [0, 64, 191, 255]);
  t.deepEqual(Array.from(resizeNearest(new Uint8Array([1, 2, 3, 4]), 4, 1, 2, 1)), [1, 3]);
  t.deepEqual(rescaledSize(683, 512, 2048, 512), [683, 512]);
  t.deepEqual(rescaledSize(300, 200, 2048, 512), [768, 512]);
  // A 20 x 20 sample scales to 64 r px (r drawn from [0.5, 2]): below 64 the crop is the whole
  // image, padded with ignored labels and zero pixels; from 64 on, a full crop.
  const sample = { image: new Uint8Array(20 * 20 * 3).fill(200), labels: new Uint8Array(20 * 20).fill(1), width: 20, height: 20 };
  let padded = 0;
  for (let seed = 0; seed < 12; seed++) {
    const a = segmentationTrainTransform(sample, 64, createRng(seed));
    t.deepEqual(a, segmentationTrainTransform(sample, 64, createRng(seed)), 'a pure function of the generator');
    t.is(a.labels.length, 64 * 64);
    t.is(a.labels[0], 1);
    t.true(a.labels.every((l, p) => (l === 255) === (a.image[3 * p] === 0 && a.image[3 * p + 1] === 0 && a.image[3 * p + 2] === 0) && (l === 1 || l === 255)));
    if (a.labels[64 * 64 - 1] === 255) padded++;
  }
  t.true(padded > 0 && padded < 12, `${padded} of 12 padded`);
});

/** An ADE20K-layout folder: `n` training and 2 validation images of assorted sizes, labels 0-3 (0 ignored). */
async function adeFolder(n: number): Promise<string> {
  const root = await mkdtemp(path.join(os.tmpdir(), 'convmae-ade-'));
  await writeFile(path.join(root, 'classes.txt'), 'sky\ntree\nroad\n');
  for (const [split, count] of [['training', n], ['validation', 2]] as const) {
    await mkdir(path.join(root, 'images', split), { recursive: true });
    await mkdir(path.join(root, 'annotations', split), { recursive: true });
    for (let i = 0; i < count; i++) {
      const [w, h] = [70 + 13 * i, 60 + 7 * i];
      const labels = new Uint8Array(w * h).map((_, p) => ((p % w) * 4) / w);
      const image = new Uint8Array(w * h * 3).map((_, p) => (labels[Math.floor(p / 3)]! * 60 + (p % 3) * 20) & 255);
      const name = `ADE_${split}_${String(i).padStart(4, '0')}`;
      await sharp(image, { raw: { width: w, height: h, channels: 3 } }).jpeg().toFile(path.join(root, 'images', split, `${name}.jpg`));
      await sharp(Buffer.from(labels), { raw: { width: w, height: h, channels: 1 } }).toColourspace('b-w').png().toFile(path.join(root, 'annotations', split, `${name}.png`));
    }
  }
  return root;
}

test('an ADE20K-layout folder trains with the official transform, skips an unreadable image and scores by slide inference', async (t) => {
  const root = await adeFolder(5);
  await writeFile(path.join(root, 'images', 'training', 'ADE_training_9999.jpg'), 'not a jpeg');
  await sharp(Buffer.alloc(4), { raw: { width: 2, height: 2, channels: 1 } }).toColourspace('b-w').png().toFile(path.join(root, 'annotations', 'training', 'ADE_training_9999.png'));
  const ds = await openSegmentationFolder(root);
  t.deepEqual(ds.classes, ['sky', 'tree', 'road']);
  t.is(ds.length, 6);
  const first = await ds.sample(0);
  t.is(first.width, 70);
  // reduce_zero_label: PNG 0 -> 255, 1..3 -> 0..2.
  t.deepEqual([...new Set(first.labels)].sort((a, b) => a - b), [0, 1, 2, 255]);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-ade-run-'));
  const s = await segment({ ...small, data: root, batchSize: 2, steps: 3, outDir: dir });
  t.is(s.steps, 3);
  t.is(s.classes.length, 3);
  t.true(s.skipped.some((k) => k.path.endsWith('ADE_training_9999.jpg')), JSON.stringify(s.skipped));
  const e = s.evals.at(-1)!;
  t.is(e.images, 2);
  t.is(e.loss, undefined);
  t.true(e.mIoU >= 0 && e.mIoU <= 100 && e.iou.length === 3);
  const log = await readFile(s.log, 'utf8');
  t.regex(log, /"event":"skip","path":"[^"]*ADE_training_9999.jpg"/);
  // Scoring the saved model again gives the run's last evaluation.
  const again = await evaluateSegmenter({ checkpoint: s.checkpoint, data: root });
  t.is(again.mIoU, e.mIoU);
  t.is(again.dataset, `${path.basename(root)}-validation`);
  // Colour label files (a palette's colours are not class ids) are named; grey stored as RGB is read.
  const colour = new Uint8Array(70 * 60 * 3).map((_, i) => (i % 3 === 0 ? 9 : 0));
  await sharp(colour, { raw: { width: 70, height: 60, channels: 3 } }).png().toFile(path.join(root, 'annotations', 'training', 'ADE_training_0000.png'));
  await t.throwsAsync(() => ds.sample(0), { message: /ADE_training_0000.png' has 3 channels that differ \(pixel 0\); label maps must be single-channel/ });
});
