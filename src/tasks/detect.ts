/**
 * The detection driver, with the two official recipes (`RECIPES`):
 *
 * - DET (spec section 6.1, the default): Mask R-CNN (detectron2's FPN, RPN and
 *   StandardROIHeads) on a ConvMAE backbone, AdamW lr 8e-5 (betas 0.9 / 0.999, weight decay 0.1,
 *   none on norms and position tables), batch 32, detectron2's cosine schedule with a linear
 *   warmup from 0.001 of the lr. The official run is 92187 iterations (25 epochs of COCO at
 *   batch 32) with 461 warmup iterations.
 * - Official-ConvMAE-Det (`variant: 'vitdet'`, spec 6.2): ViTDet's simple feature pyramid, AdamW
 *   lr 1e-4 with layer decay 0.8, batch 16, a step decay (x0.1 at iteration 163889, x0.01 at
 *   177546 of 184375) after 250 warmup iterations; the crop unpadded and the image padded by the
 *   model (`imageList` in src/data/detection-transforms.ts).
 *
 * Warmups and milestones default to the same shares of the run as the official ones (the
 * warmup rounded up, the milestones to the nearest step), which are the official iterations at
 * the official length. Both use the large-scale-jitter train transform
 * (src/data/detection-transforms.ts), evaluation by COCO box AP and mask AP
 * (src/tasks/detection-eval.ts), JSONL logs, checkpoints and exact resume. Data: the digit
 * detection scenes of src/data/detection.ts (the embedded default, scored on the first scenes of
 * the test split) or a folder in COCO's layout (train2017 / val2017 by default).
 */
import { appendFile, mkdir } from 'node:fs/promises';
import path from 'node:path';
import { Detector, type DetectorOptions, type DetectorVariant, type TargetInstance } from '../api/detector.js';
import type { TaskLoadReport } from '../api/task-model.js';
import type { DeviceName, Precision, Threads } from '../api/pretrainer.js';
import { resolveConfig, type ConvMaeConfig, type PresetName } from '../api/config.js';
import { decodeRle, encodeRle, openCocoFolder, openDigitDetectionScenes, type DetectionDataset, type DetectionSample } from '../data/detection.js';
import { detectionTestResize, detectionTrainTransform, LSJ_SCALE_RANGE, type TransformedDetectionSample } from '../data/detection-transforms.js';
import { createRng, deriveSeed, type Rng } from '../data/rng.js';
import { stepBatches, type SkippedStepSample } from '../data/step-batches.js';

import { DetectionEvaluator, SUMMARY_KEYS, type SummaryKey, type Box, type DetectionScores, type EvalDetection, type EvalGroundTruth, type EvalImage } from './detection-eval.js';
import { positiveInt, runLength, startRun, type TrainingProgress } from './run.js';
import { checkStepDecay, detectionLrAt, vitdetStepDecay, type DetectionSchedule } from './schedule.js';
import { native } from '../native.js';

/**
 * Each official recipe's run defaults (see the module comment; the layer decay is the model's,
 * `DetectorAdamWOptions.layer_decay`); the warmup is a share of the run.
 */
const RECIPES: Record<DetectorVariant, { lr: number; batchSize: number; warmup: number; officialSteps: number; stepDecay: boolean }> = {
  det: { lr: 8e-5, batchSize: 32, warmup: 461, officialSteps: 92187, stepDecay: false },
  vitdet: { lr: 1e-4, batchSize: 16, warmup: 250, officialSteps: 184375, stepDecay: true },
};
/** Evaluation batches hold at most this many images (each detection's mask comes back at the image's size). */
const EVAL_BATCH = 8;

/** The detector's architecture and sampling settings (DetectorOptions less the model spec and run settings). */
export type DetectorHeadOptions = Omit<DetectorOptions, 'numClasses' | 'preset' | 'config' | 'dtype' | 'precision' | 'threads' | 'seed' | 'optimizer'>;

/** An image that could not be read, and what took its place. */
export type SkippedDetectionSample = SkippedStepSample;

export interface DetectRunOptions extends DetectorHeadOptions {
  /**
   * 'digits' (default): digit detection scenes from MNIST train, evaluated on the first scenes of
   * MNIST t10k. Or a folder in COCO's layout: `<DIR>/<split>/` images and
   * `<DIR>/annotations/instances_<split>.json`.
   */
  data?: string;
  /** COCO folder: the training split, default 'train2017'. */
  trainSplit?: string;
  /** COCO folder: the evaluation split, default 'val2017'. */
  evalSplit?: string;
  preset?: PresetName | string;
  config?: Partial<ConvMaeConfig>;
  dtype?: 'f32' | 'f64';
  /** 'cpu' (default), 'cuda' or 'cuda:N' (the CUDA addon; see `DetectorOptions.device`). */
  device?: DeviceName;
  /** 'fp32' (default) or 'bf16' (see `DetectorOptions.precision`). */
  precision?: Precision;
  threads?: Threads;
  /** Pretrained encoder to start from (ours or the official .pth); random init when absent. */
  init?: string;
  /** Default 32 (official DET; 16 for 'vitdet'). */
  batchSize?: number;
  /** Run length in steps (default 1 epoch). */
  steps?: number;
  epochs?: number;
  /** Base lr, absolute (no batch scaling), default 8e-5 (official DET; 1e-4 for 'vitdet'). */
  lr?: number;
  /** Default: 461 / 92187 of the run (DET) or 250 / 184375 ('vitdet'), rounded up (see the module comment). */
  warmupSteps?: number;
  /** The warmup starts at lr * warmupFactor; default 0.001. */
  warmupFactor?: number;
  /** AdamW weight decay, default 0.1 (official). */
  weightDecay?: number;
  /** Layer-wise lr decay, default 1 (none, DET) or 0.8 ('vitdet'). */
  layerDecay?: number;
  /** LSJ's ResizeScale range, default [0.1, 2.0] (official). */
  scaleRange?: [number, number];
  seed?: number;
  /** Evaluate (and checkpoint) every N steps; default: at the end only. */
  evalEvery?: number;
  /** Evaluate on the first N images of the evaluation set (default: all). */
  evalLimit?: number;
  /** Where checkpoint.safetensors and log.jsonl go; default runs/detect. */
  outDir?: string;
  /** Continue from outDir/checkpoint.safetensors (or this path) exactly where it stopped. */
  resume?: boolean | string;
  onProgress?: (p: TrainingProgress) => void;
  onEval?: (e: DetEvalSummary) => void;
  onSkip?: (s: SkippedDetectionSample) => void;
  /** Stops the run after the current step, with a checkpoint. */
  signal?: AbortSignal;
}

/**
 * COCOeval's 12 summary numbers in percent, as detectron2 reports them; NaN where COCO has -1
 * (nothing to score; null in JSON).
 */
export type CocoMetrics = Record<SummaryKey, number> & {
  /** AP per class (indexed as the dataset's classes), percent, NaN where undefined. */
  perClass: number[];
};

export interface DetEvalSummary {
  step: number;
  /** COCO box AP ('bbox') and mask AP ('segm'). */
  box: CocoMetrics;
  mask: CocoMetrics;
  images: number;
  /** Evaluation images that could not be read (left out of the scores). */
  skipped: number;
  /** Detections scored, over all images. */
  detections: number;
}

export interface DetectRunSummary {
  steps: number;
  firstLoss: number | undefined;
  lastLoss: number | undefined;
  evals: DetEvalSummary[];
  /** The last evaluation's box and mask scores. */
  box: CocoMetrics | undefined;
  mask: CocoMetrics | undefined;
  checkpoint: string;
  log: string;
  init: TaskLoadReport | undefined;
  /** Training images that could not be read (each replaced by the next in its epoch's order). */
  skipped: SkippedDetectionSample[];
  /** Training images passed over for holding no object but crowd regions (detectron2 filters them). */
  withoutObjects: number;
  dataset: string;
  classes: string[];
  seconds: number;
}

/** Loop state saved with each checkpoint. */
interface RunState {
  step: number;
  totalSteps: number;
  batchSize: number;
  seed: number;
  scaleRange: [number, number];
  schedule: DetectionSchedule;
}

/** What a dataset spec names, for training or for evaluation only. */
interface DataSpec {
  data?: string;
  trainSplit?: string;
  evalSplit?: string;
  evalLimit?: number;
}

const isDigits = (data: string | undefined) => data === undefined || data === 'digits';

/** The evaluation split of a spec: the test scenes, or a COCO folder's evaluation split. */
async function openEvalData(spec: DataSpec, size: number): Promise<DetectionDataset> {
  if (isDigits(spec.data)) return openDigitDetectionScenes('t10k', { size, limit: spec.evalLimit });
  return openCocoFolder(spec.data!, { split: spec.evalSplit ?? 'val2017', limit: spec.evalLimit });
}

async function openDetectionData(spec: DataSpec, size: number): Promise<{ train: DetectionDataset; eval: DetectionDataset }> {
  const train = isDigits(spec.data) ? await openDigitDetectionScenes('train', { size }) : await openCocoFolder(spec.data!, { split: spec.trainSplit ?? 'train2017' });
  const evaluation = await openEvalData(spec, size);
  if (evaluation.classes.join('\n') !== train.classes.join('\n')) {
    throw new Error(`'${evaluation.name}' has other classes than '${train.name}' (${evaluation.classes.length} vs ${train.classes.length}, or in another order); both splits must list the same categories`);
  }
  return { train, eval: evaluation };
}

/** A batch of transformed samples packed for the detector. */
export interface DetectionBatch {
  images: Uint8Array;
  instances: TargetInstance[][];
  /** Per image, the [height, width] it fills at the top left, where the transform leaves the padding to the model. */
  extents?: [number, number][];
  batchSize: number;
  height: number;
  width: number;
  /** Dataset index of each sample. */
  indices: number[];
  epoch: number;
}

export interface DetectionBatchOptions {
  batchSize: number;
  /** The model's img_size: every batch is size x size. */
  size: number;
  seed: number;
  startStep: number;
  endStep: number;
  /** Maps a sample to size x size, drawing from `rng` (the LSJ train transform). */
  transform: (sample: DetectionSample, rng: Rng) => TransformedDetectionSample;
  onSkip?: (s: SkippedDetectionSample) => void;
  /** A sample without objects (none, or only crowd regions) was passed over. */
  onEmpty?: (index: number, step: number) => void;
}

/** Separates the per-sample transform draws from the epoch orders. */
const TRANSFORM_STREAM = 0x6c736a;

/**
 * Batches of a dataset (`stepBatches`). Sample i of step s is transformed with a generator
 * seeded by (seed, s, i), so a resumed run sees the same pixels. An unreadable sample is
 * reported through `onSkip`, a sample without objects (detectron2's filter of images with no
 * usable annotation) through `onEmpty`; either is replaced by the next one in the epoch's order.
 */
export async function* detectionBatches(dataset: DetectionDataset, options: DetectionBatchOptions): AsyncGenerator<DetectionBatch> {
  const { batchSize, size, seed } = options;
  const read = async (index: number, step: number, slot: number): Promise<TransformedDetectionSample | undefined> => {
    const sample = await dataset.sample(index);
    if (!sample.instances.some((instance) => !instance.iscrowd)) {
      options.onEmpty?.(index, step);
      return undefined;
    }
    const out = options.transform(sample, createRng(deriveSeed(seed, step, slot, TRANSFORM_STREAM)));
    if (out.width !== size || out.height !== size) throw new RangeError(`the train transform made ${dataset.describe(index)} ${out.width}x${out.height}, the model takes ${size}x${size}`);
    return out;
  };
  for await (const { samples, indices, epoch } of stepBatches({ ...options, dataset, read, unusable: 'that holds an object' })) {
    const images = new Uint8Array(batchSize * size * size * 3);
    samples.forEach((s, i) => images.set(s.image, i * size * size * 3));
    const instances = samples.map((s) => s.instances.map(({ category, box, mask, polygons }) => ({ category, box, mask, polygons })));
    const extents = samples.some((s) => s.extent) ? samples.map((s) => s.extent ?? ([size, size] as [number, number])) : undefined;
    yield { images, instances, batchSize, height: size, width: size, indices, epoch, ...(extents ? { extents } : {}) };
  }
}

/** COCO's numbers as detectron2 reports them: percent, NaN for -1. */
function toMetrics(s: DetectionScores, classes: number): CocoMetrics {
  const pct = (v: number) => (v >= 0 ? 100 * v : NaN);
  const summary = Object.fromEntries(SUMMARY_KEYS.map((key) => [key, pct(s[key])])) as Record<SummaryKey, number>;
  return { ...summary, perClass: Array.from({ length: classes }, (_, c) => pct(s.perCategoryAP.get(c) ?? -1)) };
}

/** detectron2's one-line summary of CocoMetrics: "AP 12.345 | AP50 ... | APl ...", "nan" where undefined. */
export function formatCocoMetrics(m: CocoMetrics): string {
  return (['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'] as const).map((key) => `${key} ${Number.isNaN(m[key]) ? 'nan' : m[key].toFixed(3)}`).join(' | ');
}

/** An instance of one image kept for scoring, its mask as a compressed RLE. */
interface Kept<T> {
  item: Omit<T, 'mask'>;
  rle: { size: [number, number]; counts: string };
}

/**
 * COCO box AP and mask AP of `model` on the dataset: each image through the test transform
 * (resize to fit S x S, pad; a 'vitdet' model pads it itself, given the resized size as the
 * image's extent), detections scaled back to its original size, scored against its original
 * ground truth (crowd regions kept as crowd; each annotation's area). Unreadable images are
 * skipped and counted (and left out of the scores). Scores do not depend on `batchSize`.
 */
export async function evaluateDetection(
  model: Detector,
  dataset: DetectionDataset,
  batchSize: number,
  onProgress?: (done: number, total: number) => void,
): Promise<Omit<DetEvalSummary, 'step'>> {
  const size = model.config.img_size;
  const images: EvalImage[] = [];
  // The evaluators need every image's size up front; masks wait as RLEs until the end.
  const gts: Kept<EvalGroundTruth>[][] = [];
  const dts: Kept<EvalDetection>[][] = [];
  let skipped = 0;
  let detections = 0;
  const read = async (i: number) => {
    try {
      return await dataset.sample(i);
    } catch {
      skipped++;
      return undefined;
    }
  };
  for (let start = 0; start < dataset.length; start += batchSize) {
    const count = Math.min(batchSize, dataset.length - start);
    const samples = (await Promise.all(Array.from({ length: count }, async (_, i) => ({ index: start + i, sample: await read(start + i) })))).filter(
      (s): s is { index: number; sample: DetectionSample } => s.sample !== undefined,
    );
    if (samples.length > 0) {
      const imageList = model.variant === 'vitdet';
      const inputs = samples.map(({ sample }) => detectionTestResize(sample, size, { imageList }));
      const pixels = new Uint8Array(samples.length * size * size * 3);
      inputs.forEach((input, i) => pixels.set(input.image, i * size * size * 3));
      const batch = { images: pixels, batchSize: samples.length, height: size, width: size };
      // detector_postprocess: from the resized image to the original (ImageList layout), or from
      // the whole padded square to the square it covers, cut below.
      const found = imageList
        ? await model.detect(batch, { extents: inputs.map((input) => [input.resizedHeight, input.resizedWidth]), outputSizes: samples.map(({ sample }) => [sample.height, sample.width]) })
        : await model.detect(batch, { outputSizes: inputs.map((input) => [input.canvas, input.canvas]) });
      samples.forEach(({ index, sample }, i) => {
        const { width: w, height: h } = sample;
        images.push({ id: index, width: w, height: h });
        gts.push(
          sample.instances.map((instance) => ({
            item: { imageId: index, category: instance.category, box: instance.box, area: instance.area, iscrowd: instance.iscrowd },
            rle: encodeRle(instance.mask, h, w),
          })),
        );
        const d = found[i]!;
        const canvas = imageList ? undefined : inputs[i]!.canvas;
        const kept: Kept<EvalDetection>[] = [];
        d.boxes.forEach((b, n) => {
          // detector_postprocess: boxes clipped to the image, empty ones dropped.
          const box: Box = [Math.min(Math.max(b[0], 0), w), Math.min(Math.max(b[1], 0), h), Math.min(Math.max(b[2], 0), w), Math.min(Math.max(b[3], 0), h)];
          if (!(box[2] > box[0] && box[3] > box[1])) return;
          let mask = d.masks[n]!;
          if (canvas !== undefined && (canvas !== w || canvas !== h)) {
            const cut = new Uint8Array(h * w);
            for (let y = 0; y < h; y++) cut.set(mask.subarray(y * canvas, y * canvas + w), y * w);
            mask = cut;
          }
          kept.push({ item: { imageId: index, category: d.classes[n]!, score: d.scores[n]!, box }, rle: encodeRle(mask, h, w) });
        });
        detections += kept.length;
        dts.push(kept);
      });
    }
    onProgress?.(start + count, dataset.length);
  }
  if (images.length === 0) throw new Error(`evaluation dataset '${dataset.name}' yielded no images`);
  const classes = dataset.classes.length;
  const categories = Array.from({ length: classes }, (_, c) => c);
  const boxEval = new DetectionEvaluator(images, categories, 'bbox');
  const maskEval = new DetectionEvaluator(images, categories, 'segm');
  images.forEach((_, i) => {
    boxEval.addGroundTruth(gts[i]!.map((g) => g.item));
    boxEval.addDetections(dts[i]!.map((d) => d.item));
    maskEval.addGroundTruth(gts[i]!.map((g) => ({ ...g.item, mask: decodeRle(g.rle) })));
    maskEval.addDetections(dts[i]!.map((d) => ({ ...d.item, mask: decodeRle(d.rle) })));
  });
  return { box: toMetrics(boxEval.evaluate(), classes), mask: toMetrics(maskEval.evaluate(), classes), images: images.length, skipped, detections };
}

/** The detector's head options of `options` that are set. */
function headOptions(options: DetectorHeadOptions): DetectorHeadOptions {
  const keys: (keyof DetectorHeadOptions)[] = [
    'variant',
    'window',
    'globalBlocks',
    'posGrid',
    'channels',
    'anchorSizes',
    'aspectRatios',
    'rpnConvs',
    'boxConvs',
    'boxFc',
    'maskConvs',
    'dropPath',
    'rpnBatchPerImage',
    'rpnPositiveFraction',
    'rpnPreNmsTrain',
    'rpnPreNmsTest',
    'rpnPostNmsTrain',
    'rpnPostNmsTest',
    'rpnNms',
    'roiBatchPerImage',
    'roiPositiveFraction',
    'scoreThreshold',
    'testNms',
    'detectionsPerImage',
  ];
  return Object.fromEntries(keys.filter((k) => options[k] !== undefined).map((k) => [k, options[k]])) as DetectorHeadOptions;
}

function checkScaleRange(range: readonly number[]): [number, number] {
  if (!Array.isArray(range) || range.length !== 2 || !range.every(Number.isFinite) || !(range[0]! > 0 && range[1]! >= range[0]!)) {
    throw new RangeError(`scaleRange must be [min, max] with 0 < min <= max, got ${JSON.stringify(range)}`);
  }
  return [range[0]!, range[1]!];
}

/** Trains a detector with the official recipe (see the module comment). */
export async function detect(options: DetectRunOptions = {}): Promise<DetectRunSummary> {
  const started = performance.now();
  const outDir = options.outDir ?? path.join('runs', 'detect');
  const variant = options.variant ?? 'det';
  if (variant !== 'det' && variant !== 'vitdet') throw new RangeError(`variant must be 'det' or 'vitdet', got '${String(variant)}'`);
  const recipe = RECIPES[variant];
  const batchSize = positiveInt(options.batchSize ?? recipe.batchSize, 'batchSize');
  const seed = options.seed ?? 0;
  const scaleRange = checkScaleRange(options.scaleRange ?? [...LSJ_SCALE_RANGE]);
  const warmupFactor = options.warmupFactor ?? 0.001;
  if (!(Number.isFinite(warmupFactor) && warmupFactor >= 0 && warmupFactor <= 1)) throw new RangeError(`warmupFactor must be in [0, 1], got ${warmupFactor}`);
  const lr = options.lr ?? recipe.lr;
  if (!(Number.isFinite(lr) && lr >= 0)) throw new RangeError(`lr must be a finite non-negative number, got ${lr}`);
  const size = resolveConfig(options).img_size;
  const data = await openDetectionData(options, size);
  const dataset = data.train;
  const model = Detector.create({
    ...headOptions(options),
    preset: options.preset,
    config: options.config,
    dtype: options.dtype,
    device: options.device,
    precision: options.precision,
    threads: options.threads,
    numClasses: dataset.classes.length,
    seed,
    optimizer: { weight_decay: options.weightDecay ?? 0.1, layer_decay: options.layerDecay },
  });
  try {
    const stepsPerEpoch = Math.floor(dataset.length / batchSize);
    const totalSteps = runLength(options, stepsPerEpoch, 1);
    const evalEvery = options.evalEvery === undefined ? totalSteps : positiveInt(options.evalEvery, 'evalEvery');
    const warmupSteps = options.warmupSteps ?? Math.ceil((totalSteps * recipe.warmup) / recipe.officialSteps);
    if (!Number.isInteger(warmupSteps) || warmupSteps < 0) throw new RangeError(`warmupSteps must be a non-negative integer, got ${warmupSteps}`);
    let state: RunState = {
      step: 0,
      totalSteps,
      batchSize,
      seed,
      scaleRange,
      schedule: { lr, steps: totalSteps, warmupSteps: Math.min(warmupSteps, totalSteps), warmupFactor, ...(recipe.stepDecay ? vitdetStepDecay(totalSteps) : {}) },
    };

    await mkdir(outDir, { recursive: true });
    const checkpoint = path.join(outDir, 'checkpoint.safetensors');
    const log = path.join(outDir, 'log.jsonl');
    const start = await startRun(model, options, checkpoint, log);
    if (start.resumed) {
      const { state: saved, from } = start.resumed as unknown as { state: RunState; from: string };
      if (saved.batchSize !== batchSize) throw new Error(`--resume: '${from}' was trained with batch ${saved.batchSize}, this run asks for ${batchSize}`);
      // A longer run continues past the saved length on the saved schedule (its lr is 0 there).
      state = { ...saved, totalSteps: Math.max(saved.totalSteps, totalSteps), schedule: { ...saved.schedule } };
      checkStepDecay(state.schedule);
    }
    const init = start.init;

    const evals: DetEvalSummary[] = [];
    const runEval = async () => {
      const r = { step: state.step, ...(await evaluateDetection(model, data.eval, Math.min(batchSize, EVAL_BATCH))) };
      evals.push(r);
      options.onEval?.(r);
      await appendFile(log, JSON.stringify({ event: 'eval', ...r, time: new Date().toISOString() }) + '\n');
    };
    const save = async () => model.save(checkpoint, state as unknown as Record<string, unknown>);
    let firstLoss: number | undefined;
    let lastLoss: number | undefined;
    const loopStart = performance.now();
    const startStep = state.step;
    const skipped: SkippedDetectionSample[] = [];
    let withoutObjects = 0;
    const batches = detectionBatches(dataset, {
      batchSize,
      size,
      seed: state.seed,
      startStep: state.step,
      endStep: state.totalSteps,
      transform: (sample, rng) => detectionTrainTransform(sample, size, rng, { scaleRange: state.scaleRange, imageList: variant === 'vitdet' }),
      onSkip: (s) => {
        skipped.push(s);
        options.onSkip?.(s);
        void appendFile(log, JSON.stringify({ event: 'skip', path: s.path, reason: s.reason, step: s.step }) + '\n');
      },
      onEmpty: (index, step) => {
        withoutObjects++;
        void appendFile(log, JSON.stringify({ event: 'no-objects', path: dataset.describe(index), step }) + '\n');
      },
    });
    for await (const batch of batches) {
      if (options.signal?.aborted) break;
      const lrNow = detectionLrAt(state.step, state.schedule);
      const r = await model.train(batch, { lr: lrNow });
      state.step += 1;
      firstLoss ??= r.loss;
      lastLoss = r.loss;
      const elapsed = (performance.now() - loopStart) / 1000;
      const done = state.step - startStep;
      const imagesPerSec = (done * batchSize) / elapsed;
      await appendFile(
        log,
        JSON.stringify({
          step: state.step,
          epoch: batch.epoch,
          loss: r.loss,
          loss_rpn_cls: r.lossRpnCls,
          loss_rpn_loc: r.lossRpnLoc,
          loss_cls: r.lossCls,
          loss_box_reg: r.lossBoxReg,
          loss_mask: r.lossMask,
          foreground: r.foreground,
          lr: lrNow,
          images_per_s: imagesPerSec,
          threads: model.threads,
          time: new Date().toISOString(),
        }) + '\n',
      );
      options.onProgress?.({ step: state.step, totalSteps: state.totalSteps, epoch: batch.epoch, loss: r.loss, lr: lrNow, imagesPerSec, etaSeconds: ((state.totalSteps - state.step) * elapsed) / done });
      if (state.step % evalEvery === 0 && state.step < state.totalSteps) {
        await save();
        await runEval();
      }
    }
    await save();
    if (evals.at(-1)?.step !== state.step) await runEval();
    const last = evals.at(-1);
    return {
      steps: state.step,
      firstLoss,
      lastLoss,
      evals,
      box: last?.box,
      mask: last?.mask,
      checkpoint,
      log,
      init,
      skipped,
      withoutObjects,
      dataset: dataset.name,
      classes: dataset.classes,
      seconds: (performance.now() - started) / 1000,
    };
  } finally {
    model.dispose();
  }
}

export interface EvaluateDetectorOptions extends DetectorHeadOptions {
  /** A detector checkpoint (ours: the model is read from it) or an official detectron2 model_final. */
  checkpoint: string;
  /** 'digits' (default: the test scenes) or a COCO-layout folder (its `evalSplit`). */
  data?: string;
  /** COCO folder: default 'val2017'. */
  evalSplit?: string;
  /** For files without our metadata (official): the model; defaults convmae-base and the official head, the classes from the data. */
  preset?: PresetName | string;
  config?: Partial<ConvMaeConfig>;
  numClasses?: number;
  evalLimit?: number;
  /** Images per detection batch, default 8 (the scores do not depend on it). */
  batchSize?: number;
  /** 'cpu' (default), 'cuda' or 'cuda:N' (the CUDA addon). */
  device?: DeviceName;
  /** 'fp32' (default) or 'bf16': the network in bfloat16 over the checkpoint's float32 weights (see the model's `precision`). */
  precision?: Precision;
  threads?: Threads;
  onProgress?: (done: number, total: number) => void;
}

/** `global_blocks` -> `globalBlocks`: the Rust head field names as DetectorOptions names them. */
const camel = (name: string) => name.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());

/**
 * COCO box AP and mask AP of a saved detector. The model (config, head, optimizer settings) comes
 * from our checkpoint's metadata; for an official file from the options (the official head by
 * default, the classes from the data).
 */
export async function evaluateDetector(options: EvaluateDetectorOptions): Promise<Omit<DetEvalSummary, 'step'> & { dataset: string }> {
  const meta = JSON.parse(await native.checkpointMetadata(options.checkpoint)) as Record<string, string>;
  if (meta.format !== undefined && meta.kind !== 'detector') {
    throw new Error(`'${options.checkpoint}' is a ${meta.kind ?? 'pretraining'} checkpoint, not a detector's; train one with detect (--init it)`);
  }
  const head = meta.head ? (JSON.parse(meta.head) as Record<string, unknown>) : undefined;
  const config = meta.config ? (JSON.parse(meta.config) as ConvMaeConfig) : options.config;
  const preset = meta.config ? undefined : (options.preset ?? 'convmae-base');
  const size = resolveConfig({ preset, config }).img_size;
  const dataset = await openEvalData({ data: options.data, evalSplit: options.evalSplit, evalLimit: options.evalLimit }, size);
  const fromMeta = head ? (Object.fromEntries(Object.entries(head).map(([k, v]) => [camel(k), v])) as DetectorHeadOptions & { numClasses: number }) : undefined;
  const numClasses = fromMeta?.numClasses ?? options.numClasses ?? dataset.classes.length;
  if (numClasses !== dataset.classes.length) {
    throw new Error(`the detector in '${options.checkpoint}' has ${numClasses} classes, '${dataset.name}' ${dataset.classes.length}`);
  }
  const model = Detector.create({
    ...(fromMeta ?? headOptions(options)),
    preset,
    config,
    numClasses,
    dtype: meta.dtype === 'f64' ? 'f64' : 'f32',
    device: options.device,
    precision: options.precision,
    threads: options.threads,
    optimizer: meta.adamw ? (JSON.parse(meta.adamw) as DetectorOptions['optimizer']) : undefined,
  });
  try {
    await model.load(options.checkpoint);
    const r = await evaluateDetection(model, dataset, positiveInt(options.batchSize ?? EVAL_BATCH, 'batchSize'), options.onProgress);
    return { ...r, dataset: dataset.name };
  } finally {
    model.dispose();
  }
}
