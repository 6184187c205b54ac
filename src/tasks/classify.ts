/**
 * Fine-tuning and linear-probing drivers (main_finetune.py / main_linprobe.py): data and
 * augmentation, the per-iteration schedule, evaluation with top-1 / top-5, JSONL logs,
 * checkpoints and exact resume. `evaluate` scores a saved classifier.
 *
 * Recipes (spec section 4):
 * - finetune: RandomResizedCrop(0.08-1) + flip + RandAugment(m9, mstd 0.5) + random erasing
 *   (0.25) + mixup 0.8 / cutmix 1.0 with label smoothing 0.1, AdamW (0.9, 0.999), weight decay
 *   0.05, layer decay 0.65, drop path 0.1, blr 5e-4, warmup 5 of 100 epochs, min lr 1e-6.
 * - linprobe: RandomResizedCrop(0.08-1) + flip, frozen encoder, BatchNorm + Linear head, LARS,
 *   no weight decay, blr 0.1, warmup 10 of 90 epochs, cosine to 0, plain cross-entropy.
 */
import { appendFile, mkdir } from 'node:fs/promises';
import path from 'node:path';
import { BatchLoader, openDataset, unseenImages, type ImageDataset, type SkippedSample } from '../data/index.js';
import { sampleErasing, type EraseBox, type ErasingOptions } from '../data/erasing.js';
import { mixedTargets, sampleMix, type MixupOptions } from '../data/mixup.js';
import { randAugment, type RandAugmentOptions } from '../data/randaugment.js';
import { createRng, deriveSeed } from '../data/rng.js';
import { classBalancedSubset } from '../data/subset.js';
import type { ConvMaeConfig, PresetName } from '../api/config.js';
import type { DeviceName, Precision } from '../api/pretrainer.js';
import { Classifier, type ClassifierLoadReport, type HeadKind, type Pooling } from '../api/classifier.js';
import { native } from '../native.js';
import { positiveInt, runLength, startRun, windowPeriod, type TrainingProgress, type TrainingRunOptions } from './run.js';
import { lrAt, scaledLr } from './schedule.js';

/**
 * Fine-tuning / linear-probing options; defaults are the recipe's (module comment), MNIST train
 * without `data`, convmae-base, one epoch, outDir runs/<recipe>.
 */
export interface ClassifyRunOptions extends TrainingRunOptions {
  /** Evaluation data. Default: the matching test split for MNIST / IDX files, none otherwise. */
  evalData?: string;
  /** Pretrained checkpoint to start from (ours or the official .pth); random init when absent. */
  init?: string;
  pool?: Pooling;
  weightDecay?: number;
  /** Fine-tune only. */
  layerDecay?: number;
  dropPath?: number;
  labelSmoothing?: number;
  mixup?: MixupOptions | false;
  randAugment?: RandAugmentOptions | false;
  erasing?: ErasingOptions | false;
  /**
   * Train on a class-balanced subset of this many images per class, drawn with `seed`
   * (low-label evaluation; the eval split stays whole). Default: the whole training set.
   */
  labelsPerClass?: number;
  /**
   * Evaluate (and checkpoint) every N micro-steps, a multiple of accumSteps; default: once per
   * epoch (rounded down to a window boundary) and at the end.
   */
  evalEvery?: number;
  onEval?: (e: EvalSummary) => void;
}

export type ClassifyProgress = TrainingProgress;

export interface EvalSummary {
  step: number;
  /** Percentages, as the official logs print them. */
  acc1: number;
  acc5: number;
  loss: number;
  count: number;
}

export interface ClassifyRunSummary {
  kind: HeadKind;
  steps: number;
  firstLoss: number | undefined;
  lastLoss: number | undefined;
  evals: EvalSummary[];
  checkpoint: string;
  log: string;
  init: ClassifierLoadReport | undefined;
  skipped: SkippedSample[];
  /** Name of the training set (a subset's name says so). */
  dataset: string;
  /** Images in the training set (the subset's size with labelsPerClass). */
  trainImages: number;
  seconds: number;
}

/** Loop state saved with each checkpoint. */
interface RunState {
  /** Micro-batches done. */
  step: number;
  totalSteps: number;
  batchSize: number;
  /** Absent in checkpoints written before accumulation existed: 1. */
  accumSteps?: number;
  seed: number;
  schedule: { lr: number; minLr: number; warmupSteps: number; totalSteps: number };
}

interface Recipe {
  kind: HeadKind;
  blr: number;
  minLr: number;
  warmupEpochs: number;
  scale: [number, number];
}

const RECIPES: Record<HeadKind, Recipe> = {
  finetune: { kind: 'finetune', blr: 5e-4, minLr: 1e-6, warmupEpochs: 5, scale: [0.08, 1] },
  'linear-probe': { kind: 'linear-probe', blr: 0.1, minLr: 0, warmupEpochs: 10, scale: [0.08, 1] },
};

/** Streams that must not share random numbers within a step. */
const STREAM = { randAugment: 1, erasing: 2, mix: 3, subset: 4 } as const;



/** The evaluation split that goes with a training spec: MNIST/IDX 'train' files map to 't10k'. */
export function defaultEvalData(data: string | undefined): string | undefined {
  if (data === undefined || data === '' || /^mnist(:train)?$/i.test(data)) return 'mnist:t10k';
  const base = path.basename(data);
  if (/^train-images[-.]idx3-ubyte(\.gz)?$/.test(base)) return path.join(path.dirname(data), base.replace(/^train/, 't10k'));
  return undefined;
}

function numClassesOf(dataset: ImageDataset): number {
  if (dataset.classes && dataset.classes.length > 0) return dataset.classes.length;
  let max = -1;
  for (let i = 0; i < dataset.length; i++) {
    const l = dataset.label(i);
    if (l === undefined) throw new Error(`dataset '${dataset.name}' has no labels (sample ${dataset.describe(i)}); classification needs them`);
    if (l > max) max = l;
  }
  return max + 1;
}

/** Scores `model` on every image of `dataset` with the eval transform (resize + center crop). */
export async function evaluateDataset(model: Classifier, dataset: ImageDataset, batchSize: number, concurrency?: number): Promise<Omit<EvalSummary, 'step'>> {
  const imageSize = model.config.img_size;
  const loader = new BatchLoader({ dataset, batchSize, imageSize, seed: 0, transform: 'eval', shuffle: false, dropLast: false, endStep: Math.ceil(dataset.length / batchSize), concurrency });
  let top1 = 0;
  let top5 = 0;
  let lossSum = 0;
  let count = 0;
  const seen = new Uint8Array(dataset.length);
  try {
    for await (const b of loader) {
      const u = unseenImages(b, seen);
      if (u.batchSize === 0) continue;
      const r = await model.evaluate({ images: u.images, batchSize: u.batchSize, height: imageSize, width: imageSize }, u.labels);
      top1 += r.top1;
      top5 += r.top5;
      lossSum += r.lossSum;
      count += r.count;
    }
  } finally {
    loader.close();
  }
  if (count === 0) throw new Error(`evaluation dataset '${dataset.name}' yielded no images`);
  return { acc1: (100 * top1) / count, acc5: (100 * top5) / count, loss: lossSum / count, count };
}

async function runClassifier(recipe: Recipe, options: ClassifyRunOptions): Promise<ClassifyRunSummary> {
  const started = performance.now();
  const outDir = options.outDir ?? path.join('runs', recipe.kind);
  const batchSize = positiveInt(options.batchSize ?? (recipe.kind === 'finetune' ? 64 : 256), 'batchSize');
  const accumSteps = positiveInt(options.accumSteps ?? 1, 'accumSteps');
  const seed = options.seed ?? 0;
  const finetune = recipe.kind === 'finetune';
  const mixup = finetune && options.mixup !== false ? (options.mixup ?? {}) : undefined;
  if (mixup && batchSize % 2 !== 0) throw new RangeError(`mixup / cutmix pair images within a batch: batchSize must be even, got ${batchSize}`);
  const smoothing = finetune ? (options.labelSmoothing ?? 0.1) : (options.labelSmoothing ?? 0);
  const randAug = finetune && options.randAugment !== false ? (options.randAugment ?? {}) : undefined;
  const erasing = finetune && options.erasing !== false ? (options.erasing ?? {}) : undefined;

  const fullDataset = await openDataset(options.data);
  const dataset = options.labelsPerClass === undefined ? fullDataset : classBalancedSubset(fullDataset, options.labelsPerClass, deriveSeed(seed, STREAM.subset));
  const evalSpec = options.evalData ?? defaultEvalData(options.data);
  const evalDataset = evalSpec ? await openDataset(evalSpec) : undefined;
  const numClasses = numClassesOf(fullDataset);
  const optimizer =
    recipe.kind === 'finetune'
      ? { kind: 'adamw' as const, weight_decay: options.weightDecay ?? 0.05, layer_decay: options.layerDecay ?? 0.65 }
      : { kind: 'lars' as const, weight_decay: options.weightDecay ?? 0 };
  const model = Classifier.create({
    preset: options.preset,
    config: options.config,
    dtype: options.dtype,
    device: options.device,
    precision: options.precision,
    threads: options.threads,
    numClasses,
    kind: recipe.kind,
    pool: options.pool ?? 'global',
    dropPath: finetune ? (options.dropPath ?? 0.1) : 0,
    seed,
    optimizer,
  });
  try {
    const imageSize = model.config.img_size;
    const probe = new BatchLoader({ dataset, batchSize, imageSize, seed, prefetch: 0 });
    const stepsPerEpoch = probe.stepsPerEpoch;
    probe.close();
    const totalSteps = runLength(options, stepsPerEpoch, accumSteps);
    const evalEvery =
      options.evalEvery !== undefined ? windowPeriod(options.evalEvery, 'evalEvery', accumSteps) : Math.max(accumSteps, stepsPerEpoch - (stepsPerEpoch % accumSteps));
    const peakLr = options.lr ?? scaledLr(options.blr ?? recipe.blr, batchSize * accumSteps);
    const warmupSteps = options.warmupSteps ?? Math.round((options.warmupEpochs ?? recipe.warmupEpochs) * stepsPerEpoch);
    let state: RunState = {
      step: 0,
      totalSteps,
      batchSize,
      accumSteps,
      seed,
      schedule: { lr: peakLr, minLr: options.minLr ?? recipe.minLr, warmupSteps: Math.min(warmupSteps, totalSteps), totalSteps },
    };

    await mkdir(outDir, { recursive: true });
    const checkpoint = path.join(outDir, 'checkpoint.safetensors');
    const log = path.join(outDir, 'log.jsonl');
    const start = await startRun(model, options, checkpoint, log);
    if (start.resumed) {
      const { state: saved, from } = start.resumed as unknown as { state: RunState; from: string };
      const savedAccum = saved.accumSteps ?? 1;
      if (saved.batchSize !== batchSize || savedAccum !== accumSteps) {
        throw new Error(`--resume: '${from}' was trained with batch ${saved.batchSize} x accum ${savedAccum}, this run asks for ${batchSize} x ${accumSteps}`);
      }
      state = { ...saved, totalSteps: Math.max(saved.totalSteps, totalSteps), schedule: { ...saved.schedule } };
    }
    const init = start.init;

    const skipped: SkippedSample[] = [];
    const loader = new BatchLoader({
      dataset,
      batchSize,
      imageSize,
      seed,
      scale: recipe.scale,
      startStep: state.step,
      endStep: state.totalSteps,
      concurrency: options.concurrency,
      decodeThreads: options.decodeThreads,
      onSkip: (s) => {
        skipped.push(s);
        options.onSkip?.(s);
        void appendFile(log, JSON.stringify({ event: 'skip', path: s.path, reason: s.reason, step: s.step }) + '\n');
      },
    });
    const evals: EvalSummary[] = [];
    const runEval = async () => {
      if (!evalDataset) return;
      const r = { step: state.step, ...(await evaluateDataset(model, evalDataset, Math.min(256, Math.max(batchSize, 32)), options.concurrency)) };
      evals.push(r);
      options.onEval?.(r);
      await appendFile(log, JSON.stringify({ event: 'eval', ...r, time: new Date().toISOString() }) + '\n');
    };
    const save = async () => model.save(checkpoint, state as unknown as Record<string, unknown>);
    let firstLoss: number | undefined;
    let lastLoss: number | undefined;
    const loopStart = performance.now();
    const startStep = state.step;
    try {
      for await (const batch of loader) {
        // A stop request takes effect between accumulation windows, where a checkpoint is exact.
        if (options.signal?.aborted && state.step % accumSteps === 0) break;
        const b = batch.batchSize;
        const pixels = batch.images.subarray(0, b * imageSize * imageSize * 3);
        const labels = batch.labels.subarray(0, b);
        const stepSeed = (stream: number) => deriveSeed(seed, state.step, stream);
        if (randAug) {
          const rng = createRng(stepSeed(STREAM.randAugment));
          for (let i = 0; i < b; i++) randAugment(pixels, i * imageSize * imageSize * 3, imageSize, rng, randAug);
        }
        const erase: EraseBox[] = [];
        if (erasing) {
          const rng = createRng(stepSeed(STREAM.erasing));
          for (let i = 0; i < b; i++) {
            const box = sampleErasing(rng, i, imageSize, imageSize, erasing);
            if (box) erase.push(box);
          }
        }
        let targets: Float64Array | undefined;
        let mix;
        if (mixup || smoothing > 0) {
          const draw = mixup ? sampleMix(createRng(stepSeed(STREAM.mix)), imageSize, imageSize, mixup) : { mix: undefined, lam: 1 };
          mix = draw.mix;
          targets = mixedTargets(labels, numClasses, draw.lam, smoothing);
        }
        // As in pretraining, the lr is set at the start of each accumulation window.
        const windowStart = state.step - (state.step % accumSteps);
        const lr = lrAt({ lr: state.schedule.lr, minLr: state.schedule.minLr, warmup: state.schedule.warmupSteps, total: state.schedule.totalSteps }, windowStart);
        const r = await model.train(
          { images: pixels, batchSize: b, height: imageSize, width: imageSize },
          { lr, labels: targets ? undefined : Int32Array.from(labels), targets, augment: erase.length > 0 || mix ? { erase, mix } : undefined, accumSteps },
        );
        state.step += 1;
        firstLoss ??= r.loss;
        lastLoss = r.loss;
        const elapsed = (performance.now() - loopStart) / 1000;
        const done = state.step - startStep;
        const imagesPerSec = (done * batchSize) / elapsed;
        await appendFile(log, JSON.stringify({ step: state.step, epoch: batch.epoch, loss: r.loss, lr, images_per_s: imagesPerSec, threads: model.threads, time: new Date().toISOString() }) + '\n');
        options.onProgress?.({ step: state.step, totalSteps: state.totalSteps, epoch: batch.epoch, loss: r.loss, lr, imagesPerSec, etaSeconds: ((state.totalSteps - state.step) * elapsed) / done });
        // Checkpoints (and so evaluations) only fall between accumulation windows.
        if (state.step % evalEvery === 0 && state.step < state.totalSteps) {
          await save();
          await runEval();
        }
      }
    } finally {
      loader.close();
    }
    // A stop inside an accumulation window cannot be checkpointed exactly; say so rather than lose it silently.
    if (state.step % accumSteps !== 0) {
      throw new Error(`stopped at micro-step ${state.step}, inside an accumulation window of ${accumSteps}; the last checkpoint stands`);
    }
    await save();
    if (evals.at(-1)?.step !== state.step) await runEval();
    return {
      kind: recipe.kind,
      steps: state.step,
      firstLoss,
      lastLoss,
      evals,
      checkpoint,
      log,
      init,
      skipped,
      dataset: dataset.name,
      trainImages: dataset.length,
      seconds: (performance.now() - started) / 1000,
    };
  } finally {
    model.dispose();
  }
}

/** Full fine-tuning with the official recipe (see the module comment). */
export function finetune(options: ClassifyRunOptions = {}): Promise<ClassifyRunSummary> {
  return runClassifier(RECIPES.finetune, options);
}

/** Linear probing with the official recipe (see the module comment). */
export function linprobe(options: ClassifyRunOptions = {}): Promise<ClassifyRunSummary> {
  return runClassifier(RECIPES['linear-probe'], options);
}

export interface EvaluateOptions {
  /** A classifier checkpoint (ours) or an official fine-tuned .pth. */
  checkpoint: string;
  data?: string;
  preset?: PresetName | string;
  config?: Partial<ConvMaeConfig>;
  /** Needed for files without our metadata (official .pth); read from ours otherwise. */
  numClasses?: number;
  kind?: HeadKind;
  pool?: Pooling;
  /** 'cpu' (default), 'cuda' or 'cuda:N' (the CUDA addon). */
  device?: DeviceName;
  /** 'fp32' (default) or 'bf16': the network in bfloat16 over the checkpoint's float32 weights (see the model's `precision`). */
  precision?: Precision;
  batchSize?: number;
  concurrency?: number;
}

/**
 * Top-1 / top-5 / loss of a saved classifier on a dataset (default: MNIST test split). The model
 * (config, classes, head, pooling) comes from our checkpoint's metadata; for files without it
 * (official .pth) from the options.
 */
export async function evaluate(options: EvaluateOptions): Promise<EvalSummary & { dataset: string }> {
  const dataset = await openDataset(options.data ?? 'mnist:t10k');
  const meta = JSON.parse(await native.checkpointMetadata(options.checkpoint)) as Record<string, string>;
  if (meta.kind === undefined && meta.format !== undefined) {
    throw new Error(`'${options.checkpoint}' is a pretraining checkpoint; fine-tune or linear-probe it first`);
  }
  const head = meta.head ? (JSON.parse(meta.head) as { num_classes: number; pool: Pooling; kind: HeadKind }) : undefined;
  const config = meta.config ? (JSON.parse(meta.config) as ConvMaeConfig) : options.config;
  const model = Classifier.create({
    preset: meta.config ? undefined : options.preset,
    config,
    numClasses: head?.num_classes ?? options.numClasses ?? numClassesOf(dataset),
    kind: head?.kind ?? options.kind ?? 'finetune',
    pool: head?.pool ?? options.pool ?? 'global',
    device: options.device,
    precision: options.precision,
  });
  try {
    await model.load(options.checkpoint);
    const r = await evaluateDataset(model, dataset, options.batchSize ?? 128, options.concurrency);
    return { step: 0, ...r, dataset: dataset.name };
  } finally {
    model.dispose();
  }
}
