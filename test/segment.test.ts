// Semantic segmentation through the API, the driver and the CLI: the metric arithmetic, the
// digit scenes, the segmenter's steps and errors, initialization from a pretraining checkpoint,
// and exact resume.
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { openDigitScenes, openMnist, polyLrAt, pretrain, segment, Segmenter, SegmentationMeter } from '../src/index.js';
import { CLI } from './helpers.js';

const run = promisify(execFile);
const small = { preset: 'convmae-tiny', channels: 16, auxChannels: 8 } as const;

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
});

test('the segmenter trains, evaluates with areas that count every labelled pixel, and names bad input', async (t) => {
  t.throws(() => Segmenter.create({ ...small, numClasses: 256 }), { message: /numClasses must be an integer in 1..255/ });
  t.throws(() => Segmenter.create({ ...small, numClasses: 3, poolScales: [0] }), { message: /pool_scales/ });
  const model = Segmenter.create({ ...small, numClasses: 11, seed: 2 });
  try {
    const scenes = await openDigitScenes('t10k', { limit: 2 });
    const samples = await Promise.all([0, 1].map((i) => scenes.sample(i)));
    const images = new Uint8Array(2 * 64 * 64 * 3);
    const labels = new Uint8Array(2 * 64 * 64);
    samples.forEach((s, i) => {
      images.set(s.image, i * 64 * 64 * 3);
      labels.set(s.labels, i * 64 * 64);
    });
    const batch = { images, labels, batchSize: 2, height: 64, width: 64 };
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
  const err = await t.throwsAsync(run(process.execPath, [CLI, 'segment', '--device', 'cuda', '--out', out]));
  t.regex((err as unknown as { stderr: string }).stderr, /--device is not supported/);
  const bad = await t.throwsAsync(run(process.execPath, [CLI, 'segment', '--data', 'ade', '--out', out]));
  t.regex((bad as unknown as { stderr: string }).stderr, /unknown segmentation dataset 'ade'/);
});
