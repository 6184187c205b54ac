/**
 * The pretraining driver: data -> native steps -> schedule, logs, checkpoints, resume, and the
 * reconstruction picture at the end. Mirrors main_pretrain.py + engine_pretrain.py.
 */
import { appendFile, mkdir } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import { BatchLoader, openDataset, type ImageDataset, type SkippedSample } from '../data/index.js';
import type { ConvMaeConfig } from '../api/config.js';
import { Pretrainer, type AdamWOptions, type ConvPath, type LoadReport, type StepResult } from '../api/pretrainer.js';
import { positiveInt, runLength, startRun, windowPeriod, type TrainingProgress, type TrainingRunOptions } from './run.js';
import { lrAt, scaledLr } from './schedule.js';

/** Pretraining defaults: convmae-base, batch 64, one epoch, blr 1.5e-4, warmup 0, outDir runs/pretrain. */
export interface PretrainRunOptions extends TrainingRunOptions {
  /** 'sparse' (default): compute only visible positions of stages 1-2; 'dense': the official way. */
  path?: ConvPath;
  adamw?: AdamWOptions;
  /** Checkpoint every N micro-steps, a multiple of accumSteps (and always at the end); 0 = only at the end. */
  checkpointEvery?: number;
  /** Images in the reconstruction picture (0 = none). Default 8. */
  reconstructions?: number;
  /**
   * Weights to start from (`Pretrainer.initFrom`): the released encoder-only `.pth`, or one of
   * our pretraining or classifier checkpoints; the optimizer and schedule start anew. Random init
   * when absent.
   */
  init?: string;
}

export type PretrainProgress = TrainingProgress;

export interface PretrainSummary {
  steps: number;
  firstLoss: number | undefined;
  lastLoss: number | undefined;
  checkpoint: string;
  log: string;
  reconstruction: string | undefined;
  skipped: SkippedSample[];
  dataset: string;
  config: ConvMaeConfig;
  /** The CPU threads the last steps ran on (see `Threads`). */
  threads: number;
  /** What `init` loaded and what kept its fresh init; undefined without `init` (or on resume). */
  init: LoadReport | undefined;
}

/** Loop state saved with each checkpoint, so that --resume continues exactly. */
interface RunState {
  step: number;
  totalSteps: number;
  batchSize: number;
  accumSteps: number;
  seed: number;
  dataset: string;
  schedule: { lr: number; minLr: number; warmupSteps: number; totalSteps: number };
}



export async function pretrain(options: PretrainRunOptions = {}): Promise<PretrainSummary> {
  const outDir = options.outDir ?? path.join('runs', 'pretrain');
  const batchSize = positiveInt(options.batchSize ?? 64, 'batchSize');
  const accumSteps = positiveInt(options.accumSteps ?? 1, 'accumSteps');
  const seed = options.seed ?? 0;
  // The model is created (and its config validated) before any data is touched.
  const model = Pretrainer.create({
    preset: options.preset,
    config: options.config,
    dtype: options.dtype,
    device: options.device,
    precision: options.precision,
    threads: options.threads,
    path: options.path,
    seed,
    adamw: options.adamw,
  });
  try {
    const dataset: ImageDataset = await openDataset(options.data);
    const imageSize = model.config.img_size;
    const probe = new BatchLoader({ dataset, batchSize, imageSize, seed, prefetch: 0 });
    const stepsPerEpoch = probe.stepsPerEpoch;
    probe.close();

    const totalSteps = runLength(options, stepsPerEpoch, accumSteps);
    const every = options.checkpointEvery ? windowPeriod(options.checkpointEvery, 'checkpointEvery', accumSteps) : 0;
    const peakLr = options.lr ?? scaledLr(options.blr ?? 1.5e-4, batchSize * accumSteps);
    const warmupSteps = options.warmupSteps ?? Math.round((options.warmupEpochs ?? 0) * stepsPerEpoch);
    let state: RunState = {
      step: 0,
      totalSteps,
      batchSize,
      accumSteps,
      seed,
      dataset: dataset.name,
      schedule: { lr: peakLr, minLr: options.minLr ?? 0, warmupSteps, totalSteps },
    };

    await mkdir(outDir, { recursive: true });
    const checkpoint = path.join(outDir, 'checkpoint.safetensors');
    const log = path.join(outDir, 'log.jsonl');
    const start = await startRun(model, options, checkpoint, log);
    if (start.resumed) {
      const { state: saved, from } = start.resumed as unknown as { state: RunState; from: string };
      if (saved.batchSize !== batchSize || saved.accumSteps !== accumSteps) {
        throw new Error(
          `--resume: '${from}' was trained with batch ${saved.batchSize} x accum ${saved.accumSteps}, this run asks for ${batchSize} x ${accumSteps}`,
        );
      }
      // The schedule of the original run continues; a longer --steps extends it.
      state = { ...saved, totalSteps: Math.max(saved.totalSteps, totalSteps), schedule: { ...saved.schedule } };
    }

    const skipped: SkippedSample[] = [];
    const loader = new BatchLoader({
      dataset,
      batchSize,
      imageSize,
      seed,
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

    const save = async () => model.save(checkpoint, state as unknown as Record<string, unknown>);
    let firstLoss: number | undefined;
    let lastLoss: number | undefined;
    const started = performance.now();
    const startStep = state.step;
    // Steps started and not yet settled, oldest first: at most two, so that a GPU model builds
    // the next step while the device runs the current one (overlapped steps). A step that ends
    // at a checkpoint, and the run's last, is settled before another starts, so that the
    // checkpoint holds exactly the steps its state counts.
    const queued: { step: number; epoch: number; lr: number; dataWaitMs: number; result: Promise<StepResult> }[] = [];
    const settleOldest = async () => {
      const q = queued.shift()!;
      const r = await q.result;
      state.step = q.step;
      firstLoss ??= r.loss;
      lastLoss = r.loss;
      const elapsed = (performance.now() - started) / 1000;
      const done = state.step - startStep;
      const imagesPerSec = (done * batchSize) / elapsed;
      const etaSeconds = ((state.totalSteps - state.step) * elapsed) / done;
      await appendFile(
        log,
        JSON.stringify({
          step: state.step,
          epoch: q.epoch,
          loss: r.loss,
          lr: q.lr,
          images_per_s: imagesPerSec,
          data_wait_ms: q.dataWaitMs,
          threads: model.threads,
          time: new Date().toISOString(),
        }) + '\n',
      );
      options.onProgress?.({ step: state.step, totalSteps: state.totalSteps, epoch: q.epoch, loss: r.loss, lr: q.lr, imagesPerSec, etaSeconds });
      if (every > 0 && state.step % every === 0 && state.step < state.totalSteps) await save();
    };
    // How long each step waited for its batch: about 0 while the loader keeps ahead of the model.
    let waitStarted = performance.now();
    try {
      for await (const batch of loader) {
        const dataWaitMs = performance.now() - waitStarted;
        const step = state.step + queued.length + 1;
        // A stop request takes effect between accumulation windows, where a checkpoint is exact.
        if (options.signal?.aborted && (step - 1) % accumSteps === 0) break;
        // MAE sets the lr at the start of each accumulation window, from the fractional epoch.
        const windowStart = step - 1 - ((step - 1) % accumSteps);
        const lr = lrAt(
          { lr: state.schedule.lr, minLr: state.schedule.minLr, warmup: state.schedule.warmupSteps, total: state.schedule.totalSteps },
          windowStart,
        );
        const result = model.pretrainStep({ images: batch.images, batchSize: batch.batchSize, height: imageSize, width: imageSize }, { lr, accumSteps });
        // Awaited in settleOldest; marked handled so that a failure surfaces as the first
        // failed step's error, not as an unhandled rejection of the step queued behind it.
        result.catch(() => undefined);
        queued.push({ step, epoch: batch.epoch, lr, dataWaitMs, result });
        const settlesHere = (every > 0 && step % every === 0) || step >= state.totalSteps;
        while (queued.length > (settlesHere ? 0 : 1)) await settleOldest();
        waitStarted = performance.now();
      }
      while (queued.length > 0) await settleOldest();
    } finally {
      loader.close();
    }
    // A stop inside an accumulation window cannot be checkpointed exactly; say so rather than lose it silently.
    if (state.step % accumSteps === 0) await save();
    else throw new Error(`stopped at micro-step ${state.step}, inside an accumulation window of ${accumSteps}; the last checkpoint stands`);

    let reconstruction: string | undefined;
    const count = Math.min(options.reconstructions ?? 8, dataset.length);
    if (count > 0) {
      reconstruction = path.join(outDir, 'reconstruction.png');
      await writeReconstruction(model, dataset, imageSize, count, seed, reconstruction);
    }
    return { steps: state.step, firstLoss, lastLoss, checkpoint, log, reconstruction, skipped, dataset: dataset.name, config: model.config, threads: model.threads, init: start.init };
  } finally {
    model.dispose();
  }
}

/** original | masked | reconstruction | reconstruction + visible, for the first `count` images. */
export async function writeReconstruction(
  model: Pretrainer,
  dataset: ImageDataset,
  imageSize: number,
  count: number,
  seed: number,
  file: string,
): Promise<void> {
  const loader = new BatchLoader({ dataset, batchSize: count, imageSize, seed, transform: 'eval', shuffle: false, prefetch: 0 });
  try {
    const first = await loader.next();
    if (first.done) return;
    const b = first.value;
    const r = await model.reconstruct({ images: b.images, batchSize: b.batchSize, height: imageSize, width: imageSize }, seed);
    const tmp = `${file}.tmp-${process.pid}`;
    await sharp(r.pixels, { raw: { width: r.width, height: r.height, channels: 3 } }).png().toFile(tmp);
    const { rename } = await import('node:fs/promises');
    await rename(tmp, file);
  } finally {
    loader.close();
  }
}
