/**
 * The semantic segmentation driver (the official SEG recipe, spec section 7): UperNet with the
 * auxiliary FCN head on a ConvMAE backbone, AdamW lr 1e-4 (betas 0.9 / 0.999, weight decay 0.05,
 * layer decay 0.75), mmcv's poly schedule (power 1, min lr 0) with a linear warmup from 1e-6 of
 * the lr, batch 16, evaluation by mIoU / mAcc / aAcc, JSONL logs, checkpoints and exact resume.
 *
 * The official run is 160k iterations with 1500 warmup iterations; here the warmup defaults to
 * the same share of the run (1500 / 160000), which is the official 1500 at the official length.
 * Data: the digit scenes of src/data/segmentation.ts (the embedded default; generated at the
 * model's size, no transform, whole-image evaluation) or a folder in ADE20K's layout (the
 * official train transform and slide evaluation of src/data/segmentation-transforms.ts).
 */
import { appendFile, mkdir } from 'node:fs/promises';
import path from 'node:path';
import { Segmenter, SegmentationMeter, type SegmentationScore, type SegmenterLoadReport } from '../api/segmenter.js';
import { openDigitScenes, openSegmentationFolder, segmentationBatches, type SegmentationDataset, type SkippedSegmentationSample } from '../data/segmentation.js';
import { segmentationTestResize, segmentationTrainTransform } from '../data/segmentation-transforms.js';
import { positiveInt, runLength, startRun, type TrainingProgress } from './run.js';
import { polyLrAt, type PolySchedule } from './schedule.js';
import { resolveConfig, type ConvMaeConfig, type PresetName } from '../api/config.js';
import { native } from '../native.js';
import type { DeviceName, Precision, Threads } from '../api/pretrainer.js';

/** The official run's warmup share: 1500 of 160k iterations. */
const OFFICIAL_WARMUP_SHARE = 1500 / 160000;

export interface SegmentRunOptions {
  /**
   * 'digits' (default): digit scenes from MNIST train, evaluated on scenes from MNIST t10k. Or a
   * folder in ADE20K's layout (images/training + annotations/training, evaluated on
   * images/validation + annotations/validation).
   */
  data?: string;
  /** Folder data: ADE20K's reduce_zero_label (default true). */
  reduceZeroLabel?: boolean;
  /** Folder data: the class count (default: classes.txt, else 150). */
  numClasses?: number;
  preset?: PresetName | string;
  config?: Partial<ConvMaeConfig>;
  dtype?: 'f32' | 'f64';
  /** 'cpu' (default), 'cuda' or 'cuda:N' (the CUDA addon; see `SegmenterOptions.device`). */
  device?: DeviceName;
  /** 'fp32' (default) or 'bf16' (see `SegmenterOptions.precision`). */
  precision?: Precision;
  threads?: Threads;
  /** Pretrained encoder to start from (ours or the official .pth); random init when absent. */
  init?: string;
  /** UPerHead width (official 768) and the auxiliary head's (official 256). */
  channels?: number;
  auxChannels?: number;
  /** Backbone stochastic depth, default 0.2. */
  dropPath?: number;
  /** Default 16 (official). */
  batchSize?: number;
  /** Run length in steps (default 1 epoch). */
  steps?: number;
  epochs?: number;
  /** Peak lr, default 1e-4. */
  lr?: number;
  minLr?: number;
  /** Default: 1500 / 160000 of the run (see the module comment). */
  warmupSteps?: number;
  weightDecay?: number;
  layerDecay?: number;
  seed?: number;
  /** Evaluate (and checkpoint) every N steps; default: at the end only. */
  evalEvery?: number;
  /** Evaluate on the first N images of the evaluation set (default: all). */
  evalLimit?: number;
  /** Where checkpoint.safetensors and log.jsonl go; default runs/segment. */
  outDir?: string;
  /** Continue from outDir/checkpoint.safetensors (or this path) exactly where it stopped. */
  resume?: boolean | string;
  onProgress?: (p: TrainingProgress) => void;
  onEval?: (e: SegEvalSummary) => void;
  onSkip?: (s: SkippedSegmentationSample) => void;
  /** Stops the run after the current step, with a checkpoint. */
  signal?: AbortSignal;
}

export interface SegEvalSummary {
  step: number;
  /** Percentages, as mmseg prints them. */
  mIoU: number;
  mAcc: number;
  aAcc: number;
  /** Per class, percent; NaN for a class with an empty union. */
  iou: number[];
  /** Mean decode loss (whole-image evaluation only; slide evaluation computes none, as mmseg). */
  loss: number | undefined;
  images: number;
  /** Evaluation images that could not be read (left out of the scores). */
  skipped: number;
}

export interface SegmentRunSummary {
  steps: number;
  firstLoss: number | undefined;
  lastLoss: number | undefined;
  evals: SegEvalSummary[];
  checkpoint: string;
  log: string;
  init: SegmenterLoadReport | undefined;
  /** Training samples that could not be read (each replaced by the next in its epoch's order). */
  skipped: SkippedSegmentationSample[];
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
  schedule: PolySchedule;
}

/** How a dataset is trained and scored: generated at the model's size, or the official transforms. */
interface SegmentationData {
  train: SegmentationDataset;
  eval: SegmentationDataset;
  /** Folder data: the official train transform and slide evaluation. */
  official: boolean;
}

/** What a dataset spec names, for training or for evaluation only. */
interface DataSpec {
  data?: string;
  evalLimit?: number;
  reduceZeroLabel?: boolean;
  numClasses?: number;
}

/** The evaluation split of a spec: the test scenes, or a folder's validation split (slide inference). */
async function openEvalData(spec: DataSpec, size: number): Promise<{ dataset: SegmentationDataset; slide: boolean }> {
  if (spec.data === undefined || spec.data === 'digits') return { dataset: await openDigitScenes('t10k', { size, limit: spec.evalLimit }), slide: false };
  const dataset = await openSegmentationFolder(spec.data, { reduceZeroLabel: spec.reduceZeroLabel, numClasses: spec.numClasses, split: 'validation' });
  const limited = spec.evalLimit === undefined ? dataset : { ...dataset, length: Math.min(dataset.length, positiveInt(spec.evalLimit, 'evalLimit')) };
  return { dataset: limited, slide: true };
}

async function openSegmentationData(spec: DataSpec, size: number): Promise<SegmentationData> {
  const evaluation = await openEvalData(spec, size);
  const train =
    spec.data === undefined || spec.data === 'digits'
      ? await openDigitScenes('train', { size })
      : await openSegmentationFolder(spec.data, { reduceZeroLabel: spec.reduceZeroLabel, numClasses: spec.numClasses, split: 'training' });
  return { train, eval: evaluation.dataset, official: evaluation.slide };
}

/**
 * Scores `model` on the dataset: mIoU, mAcc, aAcc (percent). Samples at the model's size (digit
 * scenes) are scored whole, in batches, with the mean decode loss; others (`slide`) one by one
 * with the official test resize and slide inference at their original size. Unreadable samples
 * are skipped and counted.
 */
export async function evaluateSegmentation(
  model: Segmenter,
  dataset: SegmentationDataset,
  batchSize: number,
  slide = false,
  onProgress?: (done: number, total: number) => void,
): Promise<Omit<SegEvalSummary, 'step'>> {
  const size = model.config.img_size;
  const meter = new SegmentationMeter(model.numClasses);
  let lossSum = 0;
  let images = 0;
  let skipped = 0;
  const read = async (i: number) => {
    try {
      return await dataset.sample(i);
    } catch {
      skipped++;
      return undefined;
    }
  };
  if (slide) {
    for (let i = 0; i < dataset.length; i++) {
      const s = await read(i);
      if (!s) continue;
      const resized = segmentationTestResize(s, size);
      const r = await model.evaluateSlide(resized, { originalHeight: s.height, originalWidth: s.width, labels: s.labels });
      meter.add(r.areas!);
      images++;
      onProgress?.(i + 1, dataset.length);
    }
  } else {
    for (let start = 0; start < dataset.length; start += batchSize) {
      const samples = (await Promise.all(Array.from({ length: Math.min(batchSize, dataset.length - start) }, (_, i) => read(start + i)))).filter((s) => s !== undefined);
      if (samples.length === 0) continue;
      const pixels = new Uint8Array(samples.length * size * size * 3);
      const labels = new Uint8Array(samples.length * size * size);
      samples.forEach((s, i) => {
        if (s.width !== size || s.height !== size) throw new RangeError(`${dataset.name}: a sample is ${s.width}x${s.height}, the model takes ${size}x${size}`);
        pixels.set(s.image, i * size * size * 3);
        labels.set(s.labels, i * size * size);
      });
      const r = await model.evaluate({ images: pixels, labels, batchSize: samples.length, height: size, width: size });
      meter.add(r.areas!);
      lossSum += r.loss! * samples.length;
      images += samples.length;
      onProgress?.(Math.min(start + batchSize, dataset.length), dataset.length);
    }
  }
  if (images === 0) throw new Error(`evaluation dataset '${dataset.name}' yielded no images`);
  const score: SegmentationScore = meter.score();
  return { mIoU: 100 * score.mIoU, mAcc: 100 * score.mAcc, aAcc: 100 * score.aAcc, iou: score.iou.map((v) => 100 * v), loss: slide ? undefined : lossSum / images, images, skipped };
}

/** Trains a segmenter with the official recipe (see the module comment). */
export async function segment(options: SegmentRunOptions = {}): Promise<SegmentRunSummary> {
  const started = performance.now();
  const outDir = options.outDir ?? path.join('runs', 'segment');
  const batchSize = positiveInt(options.batchSize ?? 16, 'batchSize');
  // Checked before any data is read: the first step would fail there, after loading.
  if (batchSize < 2) throw new RangeError(`batchSize must be at least 2: the segmenter's BatchNorm in training needs more than one value per channel (the stride-32 level can be 1x1), got ${batchSize}`);
  const seed = options.seed ?? 0;
  const size = resolveConfig(options).img_size;
  const data = await openSegmentationData(options, size);
  const dataset = data.train;
  const model = Segmenter.create({
    preset: options.preset,
    config: options.config,
    dtype: options.dtype,
    device: options.device,
    precision: options.precision,
    threads: options.threads,
    numClasses: dataset.classes.length,
    channels: options.channels,
    auxChannels: options.auxChannels,
    dropPath: options.dropPath,
    seed,
    optimizer: { weight_decay: options.weightDecay ?? 0.05, layer_decay: options.layerDecay ?? 0.75 },
  });
  try {
    const stepsPerEpoch = Math.floor(dataset.length / batchSize);
    const totalSteps = runLength(options, stepsPerEpoch, 1);
    const evalEvery = options.evalEvery === undefined ? totalSteps : positiveInt(options.evalEvery, 'evalEvery');
    const warmupSteps = options.warmupSteps ?? Math.round(totalSteps * OFFICIAL_WARMUP_SHARE);
    if (!Number.isInteger(warmupSteps) || warmupSteps < 0) throw new RangeError(`warmupSteps must be a non-negative integer, got ${warmupSteps}`);
    let state: RunState = {
      step: 0,
      totalSteps,
      batchSize,
      seed,
      schedule: { lr: options.lr ?? 1e-4, minLr: options.minLr ?? 0, power: 1, totalSteps, warmupSteps: Math.min(warmupSteps, totalSteps), warmupRatio: 1e-6 },
    };

    await mkdir(outDir, { recursive: true });
    const checkpoint = path.join(outDir, 'checkpoint.safetensors');
    const log = path.join(outDir, 'log.jsonl');
    const start = await startRun(model, options, checkpoint, log);
    if (start.resumed) {
      const { state: saved, from } = start.resumed as unknown as { state: RunState; from: string };
      if (saved.batchSize !== batchSize) throw new Error(`--resume: '${from}' was trained with batch ${saved.batchSize}, this run asks for ${batchSize}`);
      // A longer run continues past the saved length on the saved schedule (its lr is min_lr there).
      state = { ...saved, totalSteps: Math.max(saved.totalSteps, totalSteps), schedule: { ...saved.schedule } };
    }
    const init = start.init;

    const evals: SegEvalSummary[] = [];
    const runEval = async () => {
      const r = { step: state.step, ...(await evaluateSegmentation(model, data.eval, batchSize, data.official)) };
      evals.push(r);
      options.onEval?.(r);
      await appendFile(log, JSON.stringify({ event: 'eval', ...r, time: new Date().toISOString() }) + '\n');
    };
    const save = async () => model.save(checkpoint, state as unknown as Record<string, unknown>);
    let firstLoss: number | undefined;
    let lastLoss: number | undefined;
    const loopStart = performance.now();
    const startStep = state.step;
    const skipped: SkippedSegmentationSample[] = [];
    const batches = segmentationBatches(dataset, {
      batchSize,
      size,
      seed,
      startStep: state.step,
      endStep: state.totalSteps,
      transform: data.official ? (sample, rng) => segmentationTrainTransform(sample, size, rng) : undefined,
      onSkip: (s) => {
        skipped.push(s);
        options.onSkip?.(s);
        void appendFile(log, JSON.stringify({ event: 'skip', path: s.path, reason: s.reason, step: s.step }) + '\n');
      },
    });
    for await (const batch of batches) {
      if (options.signal?.aborted) break;
      const lr = polyLrAt(state.schedule, state.step);
      const r = await model.train(batch, { lr });
      state.step += 1;
      firstLoss ??= r.loss;
      lastLoss = r.loss;
      const elapsed = (performance.now() - loopStart) / 1000;
      const done = state.step - startStep;
      const imagesPerSec = (done * batchSize) / elapsed;
      await appendFile(
        log,
        JSON.stringify({ step: state.step, epoch: batch.epoch, loss: r.loss, decode_loss: r.decodeLoss, aux_loss: r.auxLoss, lr, images_per_s: imagesPerSec, threads: model.threads, time: new Date().toISOString() }) + '\n',
      );
      options.onProgress?.({ step: state.step, totalSteps: state.totalSteps, epoch: batch.epoch, loss: r.loss, lr, imagesPerSec, etaSeconds: ((state.totalSteps - state.step) * elapsed) / done });
      if (state.step % evalEvery === 0 && state.step < state.totalSteps) {
        await save();
        await runEval();
      }
    }
    await save();
    if (evals.at(-1)?.step !== state.step) await runEval();
    return { steps: state.step, firstLoss, lastLoss, evals, checkpoint, log, init, skipped, dataset: dataset.name, classes: dataset.classes, seconds: (performance.now() - started) / 1000 };
  } finally {
    model.dispose();
  }
}

export interface EvaluateSegmenterOptions {
  /** A segmenter checkpoint (ours: the model is read from it) or an official mmseg UperNet .pth. */
  checkpoint: string;
  /** 'digits' (default: the test scenes) or an ADE20K-layout folder (its validation split, slide inference). */
  data?: string;
  /** Folder data, as for `segment`. */
  reduceZeroLabel?: boolean;
  numClasses?: number;
  /** For files without our metadata (official .pth): the model; defaults convmae-base and the official head. */
  preset?: PresetName | string;
  config?: Partial<ConvMaeConfig>;
  channels?: number;
  auxChannels?: number;
  evalLimit?: number;
  batchSize?: number;
  /** 'cpu' (default), 'cuda' or 'cuda:N' (the CUDA addon). */
  device?: DeviceName;
  /** 'fp32' (default) or 'bf16': the network in bfloat16 over the checkpoint's float32 weights (see the model's `precision`). */
  precision?: Precision;
  onProgress?: (done: number, total: number) => void;
}

/**
 * mIoU / mAcc / aAcc of a saved segmenter. The model (config, head) comes from our checkpoint's
 * metadata; for an official .pth from the options (the official head by default, the classes
 * from the data).
 */
export async function evaluateSegmenter(options: EvaluateSegmenterOptions): Promise<Omit<SegEvalSummary, 'step'> & { dataset: string }> {
  const meta = JSON.parse(await native.checkpointMetadata(options.checkpoint)) as Record<string, string>;
  if (meta.format !== undefined && meta.kind !== 'segmenter') {
    throw new Error(`'${options.checkpoint}' is a ${meta.kind ?? 'pretraining'} checkpoint, not a segmenter's; train one with segment (--init it)`);
  }
  const head = meta.head ? (JSON.parse(meta.head) as { num_classes: number; channels: number; aux_channels: number; pool_scales: number[] }) : undefined;
  const config = meta.config ? (JSON.parse(meta.config) as ConvMaeConfig) : options.config;
  const preset = meta.config ? undefined : (options.preset ?? 'convmae-base');
  const size = resolveConfig({ preset, config }).img_size;
  const data = await openEvalData({ data: options.data, evalLimit: options.evalLimit, reduceZeroLabel: options.reduceZeroLabel, numClasses: options.numClasses ?? head?.num_classes }, size);
  const model = Segmenter.create({
    preset,
    config,
    numClasses: head?.num_classes ?? data.dataset.classes.length,
    channels: head?.channels ?? options.channels,
    auxChannels: head?.aux_channels ?? options.auxChannels,
    poolScales: head?.pool_scales,
    device: options.device,
    precision: options.precision,
  });
  try {
    await model.load(options.checkpoint);
    const r = await evaluateSegmentation(model, data.dataset, options.batchSize ?? 8, data.slide, options.onProgress);
    return { ...r, dataset: data.dataset.name };
  } finally {
    model.dispose();
  }
}
