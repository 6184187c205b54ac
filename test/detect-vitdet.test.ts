// The Official-ConvMAE-Det detector ('vitdet', spec section 6.2) through the API, the driver and
// the CLI: its step-decay schedule, the ImageList layout of the transforms, extents in training
// and detection, exact resume, and `convmae detect --variant vitdet` / `convmae eval`.
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import {
  createRng,
  detect,
  detectionLrAt,
  detectionTestResize,
  detectionTrainTransform,
  Detector,
  maskBox,
  rasterizePolygons as rasterize,
  uniform,
  vitdetStepDecay,
  evaluateDetection,
  type AnnotatedBatch,
  type BoxXyxy,
  type DetectionDataset,
  type DetectionSample,
  type ImageBatch,
  type ImageDetections,
} from '../src/index.js';
import { SMALL_DETECTOR_HEAD } from '../benches/synthetic-scenes.js';
import { native } from '../src/native.js';
import { checkStepDecay } from '../src/tasks/schedule.js';
import { sceneBatch, stepLines } from './detection-helpers.js';
import { CLI } from './helpers.js';

const run = promisify(execFile);
/** convmae-tiny (64 px, token grid 4) as Official-ConvMAE-Det: 3-token windows (the grid padded to 6), block 1 global, a 4x4 pos_embed table. */
const small = { preset: 'convmae-tiny', ...SMALL_DETECTOR_HEAD, variant: 'vitdet', window: 3, globalBlocks: [1], posGrid: 4 } as const;
const smallRun = { ...small, globalBlocks: [...small.globalBlocks], anchorSizes: [...small.anchorSizes] };

test('the vitdet schedule is fvcore MultiStep under the warmup: 0.001 of the lr, a linear ramp to 1, x0.1 and x0.01 at the scaled milestones', (t) => {
  t.deepEqual(vitdetStepDecay(184375), { milestones: [163889, 177546], values: [1, 0.1, 0.01] }, 'the official iterations at the official length');
  const s = { lr: 1e-4, steps: 100, warmupSteps: 4, warmupFactor: 0.001, ...vitdetStepDecay(100) };
  t.deepEqual(s.milestones, [89, 96]);
  const close = (a: number, b: number) => t.true(Math.abs(a - b) < 1e-18, `${a} vs ${b}`);
  close(detectionLrAt(0, s), 1e-7);
  close(detectionLrAt(2, s), 1e-7 + (1e-4 - 1e-7) / 2);
  close(detectionLrAt(4, s), 1e-4);
  close(detectionLrAt(88, s), 1e-4);
  close(detectionLrAt(89, s), 1e-5);
  close(detectionLrAt(95, s), 1e-5);
  close(detectionLrAt(96, s), 1e-6);
  close(detectionLrAt(99, s), 1e-6);
  // A saved run's step decay is checked when it resumes: one more multiplier than milestones.
  t.notThrows(() => checkStepDecay(s));
  t.throws(() => checkStepDecay({ ...s, values: [1, 0.1] }), { message: /a step decay needs one more multiplier than milestones/ });
  t.throws(() => checkStepDecay({ ...s, milestones: [96, 89] }), { message: /milestones must be non-decreasing step numbers/ });
});

/** A 32 x 48 image with a 10 x 6 block (class 1) and a triangle given by a polygon and its rasterization (class 2). */
function sample(): DetectionSample {
  const [w, h] = [48, 32];
  const image = new Uint8Array(w * h * 3);
  for (let i = 0; i < image.length; i++) image[i] = (i * 37) % 251;
  const block = new Uint8Array(w * h);
  for (let y = 8; y < 14; y++) for (let x = 4; x < 14; x++) block[y * w + x] = 1;
  const triangle = [30, 4, 44, 4, 30, 20];
  const drawn = rasterize([triangle], h, w);
  return {
    image,
    width: w,
    height: h,
    id: 0,
    instances: [
      { category: 1, box: [4, 8, 14, 14], mask: block, area: 60, iscrowd: false },
      { category: 2, box: [30, 4, 44, 20], mask: drawn, area: drawn.reduce((n, v) => n + v, 0), iscrowd: false, polygons: [triangle] },
    ],
  };
}

test('the ImageList layout: the image at the top left, unpadded, mirrored within itself; DET canvas pixels and objects otherwise', (t) => {
  const s = sample();
  const size = 32;
  let flips = 0;
  for (let seed = 0; seed < 24; seed++) {
    const det = detectionTrainTransform(s, size, createRng(seed), { scaleRange: [0.3, 1.5] });
    const list = detectionTrainTransform(s, size, createRng(seed), { scaleRange: [0.3, 1.5], imageList: true });
    t.is(det.extent, undefined);
    const [ch, cw] = list.extent!;
    t.true(ch >= 1 && ch <= size && cw >= 1 && cw <= size);
    // The transform's third draw is the flip (scale, crop offset, flip).
    const draws = createRng(seed);
    uniform(draws, 0, 1);
    uniform(draws, 0, 1);
    const flipped = uniform(draws, 0, 1) < 0.5;
    if (cw < size && flipped) flips++;
    // DET flips the padded canvas, so a flipped crop sits at the right; ImageList keeps it left.
    const shift = flipped ? size - cw : 0;
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        const at = (y * size + x) * 3;
        if (y < ch && x < cw) t.deepEqual([...list.image.subarray(at, at + 3)], [...det.image.subarray(at + shift * 3, at + shift * 3 + 3)], `seed ${seed} (${x}, ${y})`);
        else t.deepEqual([...list.image.subarray(at, at + 3)], [0, 0, 0], "the padding is the model's, 0 here");
      }
    }
    t.deepEqual(
      list.instances.map((i) => i.category),
      det.instances.map((i) => i.category),
    );
    list.instances.forEach((instance, n) => {
      const other = det.instances[n]!;
      t.is(instance.area, other.area);
      // Mirrored polygon vertices are cw - x here, size - x there: equal up to rounding.
      const want = [other.box[0] - shift, other.box[1], other.box[2] - shift, other.box[3]];
      t.true(
        instance.box.every((v, k) => Math.abs(v - want[k]!) < 1e-9),
        `seed ${seed} instance ${n}: ${JSON.stringify(instance.box)} vs ${JSON.stringify(want)}`,
      );
      if (!instance.polygons) t.deepEqual(instance.box, maskBox(instance.mask, size, size));
      t.true(instance.box[2] <= cw && instance.box[3] <= ch, 'inside the extent');
    });
  }
  t.true(flips > 0, 'some crops narrower than S were flipped');
  // The test transform pads with 0 for the model to pad; its extent is the resized size.
  const input = detectionTestResize(s, 32, { imageList: true });
  t.deepEqual([input.resizedHeight, input.resizedWidth], [21, 32]);
  t.is(input.image[(21 * 32 + 5) * 3], 0);
});

test('a vitdet model is evaluated through extents: the ground truth seen through the model input, scaled from the resized size to the original, scores 100', async (t) => {
  const samples = [sample(), { ...sample(), id: 1 }];
  const dataset: DetectionDataset = { name: 'two', length: 2, classes: ['a', 'b', 'c'], sample: async (i) => samples[i]!, describe: (i) => `sample ${i}` };
  const size = 40;
  let next = 0;
  const asked: unknown[] = [];
  // A stand-in for the detector that "finds" each image's objects where the resize put them in
  // its extent, and scales them from the extent to the output size, as Detector.detect does.
  const oracle = {
    config: { img_size: size },
    variant: 'vitdet',
    async detect(batch: ImageBatch, options: { outputSizes?: [number, number][]; extents?: [number, number][] } = {}): Promise<ImageDetections[]> {
      asked.push(options);
      const out: ImageDetections[] = [];
      for (let i = 0; i < batch.batchSize; i++) {
        const s = samples[next++]!;
        const [eh, ew] = options.extents![i]!;
        const [height, width] = options.outputSizes![i]!;
        const input = detectionTestResize(s, size, { imageList: true });
        t.deepEqual([eh, ew], [input.resizedHeight, input.resizedWidth]);
        const [sx, sy] = [(ew / s.width) * (width / ew), (eh / s.height) * (height / eh)];
        out.push({
          boxes: s.instances.map((o) => [o.box[0] * sx, o.box[1] * sy, o.box[2] * sx, o.box[3] * sy] as BoxXyxy),
          scores: s.instances.map(() => 0.9),
          classes: s.instances.map((o) => o.category),
          masks: s.instances.map((o) => (o.polygons ? rasterize(o.polygons, height, width) : o.mask)),
          height,
          width,
        });
      }
      return out;
    },
  } as unknown as Detector;
  const r = await evaluateDetection(oracle, dataset, 2);
  t.deepEqual(asked, [{ extents: [[27, 40], [27, 40]], outputSizes: [[32, 48], [32, 48]] }]);
  t.true(Math.abs(r.box.AP - 100) < 1e-9, JSON.stringify(r.box));
  t.true(Math.abs(r.mask.AP - 100) < 1e-9, JSON.stringify(r.mask));
});

test('a vitdet detector takes the official window and global blocks by default, trains and detects with extents, and names bad ones', async (t) => {
  // The defaults are the official ones, block 4 (vitdet's 1, 4, 7, 10) or 6 (DET's 0, 3, 6, 10)
  // being the first that tiny's 4-block stage 3 lacks.
  t.throws(() => Detector.create({ preset: 'convmae-tiny', numClasses: 2, variant: 'vitdet' }), { message: /global_blocks: block 4 does not exist \(stage 3 has 4 blocks\)/ });
  t.throws(() => Detector.create({ preset: 'convmae-tiny', numClasses: 2, window: 2 }), { message: /global_blocks: block 6 does not exist/ });
  t.throws(() => Detector.create({ preset: 'convmae-tiny', numClasses: 2, variant: 'nope' as 'vitdet' }), { message: /invalid detector head: unknown variant `nope`, expected `det` or `vitdet`/ });
  t.throws(() => Detector.create({ ...smallRun, numClasses: 10, optimizer: { layer_decay: 0 } }), { message: /layer_decay must be in \(0, 1\], got 0/ });
  const model = Detector.create({ ...smallRun, numClasses: 10, seed: 1 });
  try {
    t.is(model.variant, 'vitdet');
    // The official layer decay is the default, as the head's are; a checkpoint records it.
    const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-vitdet-api-'));
    await model.save(path.join(dir, 'fresh.safetensors'));
    const adamw = JSON.parse((JSON.parse(await native.checkpointMetadata(path.join(dir, 'fresh.safetensors'))) as { adamw: string }).adamw) as { layer_decay: number };
    t.is(adamw.layer_decay, 0.8);
    const batch = await sceneBatch(2);
    const a = await model.train({ ...batch, extents: [[64, 64], [48, 40]] }, { lr: 1e-3 });
    t.true(Number.isFinite(a.loss) && a.foreground > 0);
    const found = await model.detect(batch, { extents: [[64, 64], [32, 48]], outputSizes: [[64, 64], [64, 96]] });
    t.deepEqual([found[1]!.height, found[1]!.width], [64, 96]);
    t.true(found[1]!.boxes.every(([x1, y1, x2, y2]) => x1 >= 0 && y1 >= 0 && x2 <= 96 && y2 <= 64), 'boxes inside the scaled extent');
    t.true(found[1]!.masks.every((m) => m.length === 64 * 96));
    await t.throwsAsync(() => model.detect(batch, { extents: [[64, 64]] }), { message: /extents must hold a positive integer \[height, width\] within 64x64 per image \(2\)/ });
    await t.throwsAsync(() => model.train({ ...batch, extents: [[64, 64], [65, 2]] }, { lr: 1e-3 }), { message: /extents must hold a positive integer \[height, width\] within 64x64/ });
  } finally {
    model.dispose();
  }
});

test('a vitdet detection run stopped after 2 of 4 steps resumes exactly, and convmae detect --variant vitdet trains and evaluates as eval does', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-vitdet-'));
  const base = { ...smallRun, batchSize: 2, evalLimit: 4, lr: 1e-3, steps: 4, warmupSteps: 1, scaleRange: [0.5, 1.25] as [number, number] };
  const straight = await detect({ ...base, outDir: path.join(dir, 'straight') });
  const stop = new AbortController();
  await detect({ ...base, outDir: path.join(dir, 'resumed'), signal: stop.signal, onProgress: (p) => p.step === 2 && stop.abort() });
  const second = await detect({ ...base, outDir: path.join(dir, 'resumed'), resume: true });
  const a = await stepLines(straight.log);
  const b = await stepLines(second.log);
  t.deepEqual(
    b.map((l) => [l.step, l.loss, l.lr]),
    a.map((l) => [l.step, l.loss, l.lr]),
  );
  // Milestones at round(163889 / 184375 * 4) = 4 and 4: no decay within 4 steps; the warmup ends at step 1.
  t.deepEqual(
    a.map((l) => l.lr),
    [1e-6, 1e-3, 1e-3, 1e-3],
  );
  t.deepEqual(second.evals.at(-1)!.box, straight.evals.at(-1)!.box);

  const out = path.join(dir, 'cli');
  const flags = ['--variant', 'vitdet', '--window', '3', '--global-blocks', '1', '--channels', '16', '--box-fc', '32', '--box-convs', '1', '--mask-convs', '1', '--rpn-batch', '64', '--roi-batch', '16'];
  const { stderr } = await run(process.execPath, [CLI, 'detect', '--steps', '2', '--batch-size', '2', ...flags, '--eval-limit', '4', '--out', out, '--no-progress']);
  t.regex(stderr, /eval at step 2: box AP [\d.]+ {2}mask AP [\d.]+ {2}\(4 images/);
  // The demo's own lr for vitdet (DET's is 2e-3).
  t.regex(stderr, /demo defaults: .*lr 0\.0005,/);
  const logged = (await readFile(path.join(out, 'log.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { event?: string; box?: unknown; mask?: unknown });
  const lastEval = logged.filter((l) => l.event === 'eval').at(-1)!;
  const scored = JSON.parse((await run(process.execPath, [CLI, 'eval', path.join(out, 'checkpoint.safetensors'), '--eval-limit', '4'])).stdout) as { box: unknown; mask: unknown };
  t.deepEqual([scored.box, scored.mask], [lastEval.box, lastEval.mask]);
  const err = await t.throwsAsync(run(process.execPath, [CLI, 'detect', '--variant', 'vit', '--out', out]));
  t.regex((err as unknown as { stderr: string }).stderr, /--variant must be det or vitdet, got 'vit'/);
});
