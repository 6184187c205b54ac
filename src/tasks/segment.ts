/**
 * The semantic segmentation driver (the official SEG recipe, spec section 7): UperNet with the
 * auxiliary FCN head on a ConvMAE backbone, AdamW lr 1e-4 (betas 0.9 / 0.999, weight decay 0.05,
 * layer decay 0.75), mmcv's poly schedule (power 1, min lr 0) with a linear warmup from 1e-6 of
 * the lr, batch 16, evaluation by mIoU / mAcc / aAcc, JSONL logs, checkpoints and exact resume.
 *
 * The official run is 160k iterations with 1500 warmup iterations; here the warmup defaults to
 * the same share of the run (1500 / 160000), which is the official 1500 at the official length.
 * Data: the digit scenes of src/data/segmentation.ts (the embedded default).
 */
import { appendFile, mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Segmenter, SegmentationMeter, type SegmentationScore, type SegmenterLoadReport } from '../api/segmenter.js';
import { openDigitScenes, segmentationBatches, type SegmentationDataset } from '../data/segmentation.js';
import { exists, positiveInt, runLength, type TrainingProgress } from './run.js';
import { polyLrAt, type PolySchedule } from './schedule.js';
import { resolveConfig, type ConvMaeConfig, type PresetName } from '../api/config.js';
import type { Threads } from '../api/pretrainer.js';

/** The official run's warmup share: 1500 of 160k iterations. */
const OFFICIAL_WARMUP_SHARE = 1500 / 160000;

export interface SegmentRunOptions {
  /** 'digits' (default): digit scenes from MNIST train, evaluated on scenes from MNIST t10k. */
  data?: string;
  preset?: PresetName | string;
  config?: Partial<ConvMaeConfig>;
  dtype?: 'f32' | 'f64';
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
  loss: number;
  images: number;
}

export interface SegmentRunSummary {
  steps: number;
  firstLoss: number | undefined;
  lastLoss: number | undefined;
  evals: SegEvalSummary[];
  checkpoint: string;
  log: string;
  init: SegmenterLoadReport | undefined;
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

async function openSegmentationData(spec: string | undefined, split: 'train' | 't10k', size: number, limit?: number): Promise<SegmentationDataset> {
  if (spec === undefined || spec === 'digits') return openDigitScenes(split, { size, limit });
  throw new Error(`--data: unknown segmentation dataset '${spec}'; available: 'digits' (digit scenes from MNIST)`);
}

/** Scores `model` on the dataset: mIoU, mAcc, aAcc (percent) and the mean decode loss. */
export async function evaluateSegmentation(model: Segmenter, dataset: SegmentationDataset, batchSize: number): Promise<Omit<SegEvalSummary, 'step'>> {
  const size = model.config.img_size;
  const meter = new SegmentationMeter(model.numClasses);
  let lossSum = 0;
  for (let start = 0; start < dataset.length; start += batchSize) {
    const indices = Array.from({ length: Math.min(batchSize, dataset.length - start) }, (_, i) => start + i);
    const samples = await Promise.all(indices.map((i) => dataset.sample(i)));
    const images = new Uint8Array(indices.length * size * size * 3);
    const labels = new Uint8Array(indices.length * size * size);
    samples.forEach((s, i) => {
      if (s.width !== size || s.height !== size) throw new RangeError(`${dataset.describe(indices[i]!)} is ${s.width}x${s.height}, the model takes ${size}x${size}`);
      images.set(s.image, i * size * size * 3);
      labels.set(s.labels, i * size * size);
    });
    const r = await model.evaluate({ images, labels, batchSize: indices.length, height: size, width: size });
    meter.add(r.areas!);
    lossSum += r.loss! * indices.length;
  }
  const score: SegmentationScore = meter.score();
  return { mIoU: 100 * score.mIoU, mAcc: 100 * score.mAcc, aAcc: 100 * score.aAcc, iou: score.iou.map((v) => 100 * v), loss: lossSum / dataset.length, images: dataset.length };
}

/** Trains a segmenter with the official recipe (see the module comment). */
export async function segment(options: SegmentRunOptions = {}): Promise<SegmentRunSummary> {
  const started = performance.now();
  const outDir = options.outDir ?? path.join('runs', 'segment');
  const batchSize = positiveInt(options.batchSize ?? 16, 'batchSize');
  const seed = options.seed ?? 0;
  const size = resolveConfig(options).img_size;
  const dataset = await openSegmentationData(options.data, 'train', size);
  const evalDataset = await openSegmentationData(options.data, 't10k', size, options.evalLimit);
  const model = Segmenter.create({
    preset: options.preset,
    config: options.config,
    dtype: options.dtype,
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
    let init: SegmenterLoadReport | undefined;
    if (options.resume) {
      const from = typeof options.resume === 'string' ? options.resume : checkpoint;
      if (!(await exists(from))) throw new Error(`--resume: no checkpoint at '${from}'`);
      const saved = (await model.load(from)).extra as unknown as RunState;
      if (typeof saved.step !== 'number') throw new Error(`--resume: '${from}' holds no training-loop state`);
      if (saved.batchSize !== batchSize) throw new Error(`--resume: '${from}' was trained with batch ${saved.batchSize}, this run asks for ${batchSize}`);
      // A longer run continues past the saved length on the saved schedule (its lr is min_lr there).
      state = { ...saved, totalSteps: Math.max(saved.totalSteps, totalSteps), schedule: { ...saved.schedule } };
    } else {
      await writeFile(log, '');
      if (options.init) {
        init = await model.initFrom(options.init);
        await appendFile(log, JSON.stringify({ event: 'init', from: options.init, missing: init.missing, unexpected: init.unexpected }) + '\n');
      }
    }

    const evals: SegEvalSummary[] = [];
    const runEval = async () => {
      const r = { step: state.step, ...(await evaluateSegmentation(model, evalDataset, batchSize)) };
      evals.push(r);
      options.onEval?.(r);
      await appendFile(log, JSON.stringify({ event: 'eval', ...r, time: new Date().toISOString() }) + '\n');
    };
    const save = async () => model.save(checkpoint, state as unknown as Record<string, unknown>);
    let firstLoss: number | undefined;
    let lastLoss: number | undefined;
    const loopStart = performance.now();
    const startStep = state.step;
    for await (const batch of segmentationBatches(dataset, { batchSize, size, seed, startStep: state.step, endStep: state.totalSteps })) {
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
    return { steps: state.step, firstLoss, lastLoss, evals, checkpoint, log, init, dataset: dataset.name, classes: dataset.classes, seconds: (performance.now() - started) / 1000 };
  } finally {
    model.dispose();
  }
}
