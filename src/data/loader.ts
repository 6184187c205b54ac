/**
 * Batch loader of the pretraining pipeline: deterministic, resumable,
 * prefetching, with bounded decode concurrency and reuse of batch buffers.
 */
import os from 'node:os';
import type { ImageDataset } from './datasets.js';
import { createRng, deriveSeed, permutation } from './rng.js';
import { evalTransform, pretrainTransform, type PretrainTransformOptions } from './transforms.js';

export interface Batch {
  /** Global step (0-based) across epochs. */
  step: number;
  epoch: number;
  /** Index of this batch within its epoch. */
  stepInEpoch: number;
  /**
   * [batchSize, imageSize, imageSize, 3] uint8 RGB, HWC, packed. A view of a
   * reused buffer: see `BatchLoader`.
   */
  images: Uint8Array;
  /** Class index per image, -1 when the dataset is unlabeled. Reused buffer too. */
  labels: Int32Array;
  /** Dataset index of each image. */
  indices: number[];
  /** Number of images (smaller than the configured size only for a final partial batch with dropLast=false). */
  batchSize: number;
  imageSize: number;
}

export interface SkippedSample {
  /** File path, or "name#index" for in-memory datasets. */
  path: string;
  reason: string;
  /** Index of the sample in the dataset. */
  index: number;
  /** Epoch and step of the batch that first tried the sample. */
  epoch: number;
  step: number;
}

export interface BatchLoaderOptions extends PretrainTransformOptions {
  dataset: ImageDataset;
  batchSize: number;
  imageSize: number;
  seed: number;
  /** Batches decoded ahead of the consumer. Default 2. */
  prefetch?: number;
  /** Images decoding at once. Default os.availableParallelism(). */
  concurrency?: number;
  /** First global step to produce (to resume a run). Default 0. */
  startStep?: number;
  /** Global step to stop before (exclusive). Default: never stop. */
  endStep?: number;
  /** Default 'pretrain'. */
  transform?: 'pretrain' | 'eval';
  /** Drop the last incomplete batch of each epoch. Default true. */
  dropLast?: boolean;
  /** Shuffle each epoch. Default true. */
  shuffle?: boolean;
  /** Called once per sample that cannot be loaded. Throwing from it aborts the batch. */
  onSkip?: (skipped: SkippedSample) => void;
}

class ClosedError extends Error {
  constructor() {
    super('BatchLoader was closed');
  }
}

/** Bounded concurrency with priority (lower first, FIFO among equals). */
class Limiter {
  private active = 0;
  private seq = 0;
  private closed = false;
  private queue: { prio: number; seq: number; resolve: () => void; reject: (e: Error) => void }[] = [];

  constructor(private readonly max: number) {}

  async run<T>(prio: number, fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw new ClosedError();
    if (this.active < this.max) {
      this.active++;
    } else {
      await new Promise<void>((resolve, reject) => {
        const item = { prio, seq: this.seq++, resolve, reject };
        // Binary search for the insertion point keeping (prio, seq) order.
        let lo = 0;
        let hi = this.queue.length;
        while (lo < hi) {
          const mid = (lo + hi) >> 1;
          const q = this.queue[mid];
          if (q.prio < prio || (q.prio === prio && q.seq < item.seq)) lo = mid + 1;
          else hi = mid;
        }
        this.queue.splice(lo, 0, item);
      });
    }
    try {
      return await fn();
    } finally {
      const next = this.queue.shift();
      if (next) next.resolve(); // the slot passes on to the next task
      else this.active--;
    }
  }

  close(): void {
    this.closed = true;
    const queued = this.queue;
    this.queue = [];
    for (const q of queued) q.reject(new ClosedError());
  }
}

interface Slot {
  images: Uint8Array;
  labels: Int32Array;
}

function positiveInt(value: number, name: string, min = 1): number {
  if (!Number.isInteger(value) || value < min) throw new RangeError(`BatchLoader: ${name} must be an integer >= ${min}, got ${String(value)}`);
  return value;
}

/**
 * Async iterator of batches.
 *
 * Order: epoch e visits the dataset in a Fisher-Yates permutation seeded by
 * deriveSeed(seed, e) (identity with shuffle=false); global step s is batch
 * s % stepsPerEpoch of epoch floor(s / stepsPerEpoch). Augmentation of
 * sample i in epoch e uses deriveSeed(seed, e, i). Batches therefore depend
 * only on (seed, step) and a loader created with startStep=k yields exactly
 * the batches k, k+1, ... of a loader started at 0, whatever `concurrency`.
 *
 * Prefetch: while the consumer works on batch s, batches s+1..s+prefetch are
 * being decoded (never more), with at most `concurrency` images decoding at
 * once, earlier batches first.
 *
 * Buffers: batches are written into a ring of prefetch+2 preallocated
 * buffers. `images` and `labels` of a batch stay valid while the consumer
 * holds it and during the following batch; the call of next() that asks for
 * the second batch after it hands the buffer back to the decoders. Copy them
 * (e.g. `images.slice()`) to keep them longer.
 *
 * Unreadable samples (corrupt file, unsupported format, I/O error) are
 * skipped: they are recorded once in `skipped` (and reported to `onSkip`),
 * and their slot is filled with the next samples of the epoch order after the
 * batch (wrapping to the start of the epoch), so batches keep their size and
 * stay deterministic. If no sample of the dataset can be read (or too few to
 * fill a batch), the batch fails with an Error.
 */
export class BatchLoader implements AsyncIterableIterator<Batch> {
  readonly dataset: ImageDataset;
  readonly batchSize: number;
  readonly imageSize: number;
  readonly seed: number;
  readonly prefetch: number;
  readonly concurrency: number;
  readonly startStep: number;
  readonly endStep: number | undefined;
  readonly transform: 'pretrain' | 'eval';
  readonly dropLast: boolean;
  readonly shuffle: boolean;
  /** Samples that could not be loaded, each listed once. */
  readonly skipped: SkippedSample[] = [];

  private readonly onSkip?: (skipped: SkippedSample) => void;
  private readonly augment: PretrainTransformOptions;
  private readonly imageBytes: number;
  private readonly ring: (Slot | undefined)[];
  private readonly limiter: Limiter;
  private readonly bad = new Map<number, SkippedSample>();
  private readonly pending = new Map<number, Promise<Batch>>();
  private readonly perms = new Map<number, Uint32Array>();
  private cursor: number;
  private scheduledUntil: number;
  private closed = false;
  private failure: unknown;

  constructor(options: BatchLoaderOptions) {
    const { dataset } = options;
    if (!dataset || typeof dataset.source !== 'function') throw new TypeError('BatchLoader: dataset is required');
    this.dataset = dataset;
    this.batchSize = positiveInt(options.batchSize, 'batchSize');
    this.imageSize = positiveInt(options.imageSize, 'imageSize');
    if (!Number.isSafeInteger(options.seed)) throw new RangeError(`BatchLoader: seed must be an integer, got ${String(options.seed)}`);
    this.seed = options.seed;
    this.prefetch = positiveInt(options.prefetch ?? 2, 'prefetch', 0);
    this.concurrency = positiveInt(options.concurrency ?? os.availableParallelism(), 'concurrency');
    this.startStep = positiveInt(options.startStep ?? 0, 'startStep', 0);
    if (options.endStep !== undefined) positiveInt(options.endStep, 'endStep', 0);
    this.endStep = options.endStep;
    this.transform = options.transform ?? 'pretrain';
    if (this.transform !== 'pretrain' && this.transform !== 'eval') {
      throw new RangeError(`BatchLoader: transform must be 'pretrain' or 'eval', got ${String(this.transform)}`);
    }
    this.dropLast = options.dropLast ?? true;
    this.shuffle = options.shuffle ?? true;
    this.onSkip = options.onSkip;
    this.augment = { scale: options.scale, ratio: options.ratio, hflipProb: options.hflipProb };

    const n = dataset.length;
    if (!Number.isInteger(n) || n <= 0) throw new Error(`BatchLoader: dataset "${dataset.name}" is empty`);
    if (this.dropLast && n < this.batchSize) {
      throw new Error(
        `BatchLoader: dataset "${dataset.name}" has ${n} images, fewer than one batch of ${this.batchSize} (dropLast is on; lower batchSize or set dropLast: false)`,
      );
    }
    this.imageBytes = this.imageSize * this.imageSize * 3;
    this.ring = new Array(this.prefetch + 2).fill(undefined);
    this.limiter = new Limiter(this.concurrency);
    this.cursor = this.startStep;
    this.scheduledUntil = this.startStep;
  }

  /** Batches per epoch: floor(N / B) with dropLast, else ceil(N / B). */
  get stepsPerEpoch(): number {
    const n = this.dataset.length;
    return this.dropLast ? Math.floor(n / this.batchSize) : Math.ceil(n / this.batchSize);
  }

  /** Global step of the batch the next call of next() yields. */
  get nextStep(): number {
    return this.cursor;
  }

  /** Number of batch buffers in the ring (prefetch + 2). */
  get ringSize(): number {
    return this.ring.length;
  }

  /** Dataset indices of global step `step`, before any skip replacement. */
  indicesOf(step: number): number[] {
    const { epoch, start, end } = this.locate(step);
    return Array.from(this.epochOrder(epoch).subarray(start, end));
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  async next(): Promise<IteratorResult<Batch>> {
    if (this.failure !== undefined) throw this.failure;
    const step = this.cursor;
    if (this.closed || (this.endStep !== undefined && step >= this.endStep)) return { done: true, value: undefined };
    this.cursor++;
    this.schedule(step);
    const pending = this.pending.get(step)!;
    this.pending.delete(step);
    try {
      return { done: false, value: await pending };
    } catch (err) {
      if (err instanceof ClosedError) return { done: true, value: undefined };
      this.failure = err;
      void this.close();
      throw err;
    }
  }

  async return(): Promise<IteratorResult<Batch>> {
    await this.close();
    return { done: true, value: undefined };
  }

  /** Stops prefetching; resolves once in-flight decodes have settled. */
  async close(): Promise<void> {
    this.closed = true;
    this.limiter.close();
    const inFlight = [...this.pending.values()];
    this.pending.clear();
    await Promise.allSettled(inFlight);
  }

  private locate(step: number): { epoch: number; stepInEpoch: number; start: number; end: number } {
    const spe = this.stepsPerEpoch;
    const epoch = Math.floor(step / spe);
    const stepInEpoch = step - epoch * spe;
    const start = stepInEpoch * this.batchSize;
    const end = Math.min(start + this.batchSize, this.dataset.length);
    return { epoch, stepInEpoch, start, end };
  }

  private epochOrder(epoch: number): Uint32Array {
    let perm = this.perms.get(epoch);
    if (!perm) {
      const n = this.dataset.length;
      if (this.shuffle) {
        perm = permutation(n, createRng(deriveSeed(this.seed, epoch)));
      } else {
        perm = new Uint32Array(n);
        for (let i = 0; i < n; i++) perm[i] = i;
      }
      this.perms.set(epoch, perm);
      // Keep the permutations of at most 3 epochs (current, next, previous).
      for (const key of this.perms.keys()) if (this.perms.size > 3 && key !== epoch) this.perms.delete(key);
    }
    return perm;
  }

  /** Starts decoding batches up to step + prefetch. */
  private schedule(step: number): void {
    const last = step + this.prefetch;
    while (this.scheduledUntil <= last && (this.endStep === undefined || this.scheduledUntil < this.endStep)) {
      const s = this.scheduledUntil++;
      const promise = this.produce(s);
      promise.catch(() => {}); // surfaced when the consumer reaches it
      this.pending.set(s, promise);
    }
  }

  private slot(step: number): Slot {
    const k = step % this.ring.length;
    let slot = this.ring[k];
    if (!slot) {
      slot = { images: new Uint8Array(this.batchSize * this.imageBytes), labels: new Int32Array(this.batchSize) };
      this.ring[k] = slot;
    }
    return slot;
  }

  private recordSkip(index: number, epoch: number, step: number, err: unknown): void {
    if (this.bad.has(index)) return;
    let where: string;
    try {
      where = this.dataset.describe(index);
    } catch {
      where = `${this.dataset.name}#${index}`;
    }
    const reason = err instanceof Error ? err.message : String(err);
    const info: SkippedSample = { path: where, reason, index, epoch, step };
    this.bad.set(index, info);
    this.skipped.push(info);
    this.onSkip?.(info);
  }

  /** Decodes dataset sample `index` into image slot `i`; false if it cannot be read. */
  private async load(index: number, epoch: number, step: number, images: Uint8Array, i: number): Promise<boolean> {
    if (this.bad.has(index)) return false;
    try {
      await this.limiter.run(step, async () => {
        if (this.closed) throw new ClosedError();
        const source = this.dataset.source(index);
        const offset = i * this.imageBytes;
        if (this.transform === 'pretrain') {
          const rng = createRng(deriveSeed(this.seed, epoch, index));
          await pretrainTransform(source, this.imageSize, rng, images, offset, this.augment);
        } else {
          await evalTransform(source, this.imageSize, images, offset);
        }
      });
      return true;
    } catch (err) {
      if (err instanceof ClosedError || this.closed) throw new ClosedError();
      this.recordSkip(index, epoch, step, err);
      return false;
    }
  }

  private async produce(step: number): Promise<Batch> {
    const { epoch, stepInEpoch, start, end } = this.locate(step);
    const order = this.epochOrder(epoch);
    const count = end - start;
    const slot = this.slot(step);
    const images = slot.images.subarray(0, count * this.imageBytes);
    const labels = slot.labels.subarray(0, count);
    const indices = Array.from(order.subarray(start, end));

    const ok = await Promise.all(indices.map((index, i) => this.load(index, epoch, step, images, i)));
    let failed: number[] = [];
    ok.forEach((good, i) => {
      if (!good) failed.push(i);
    });

    // Replace unreadable samples, deterministically: failed slots in order
    // take the next samples of the epoch after this batch, wrapping around.
    const n = order.length;
    const others = n - count;
    let next = 0;
    while (failed.length > 0) {
      const assigned: [number, number][] = [];
      for (const i of failed) {
        let index = -1;
        while (next < others) {
          const candidate = order[(end + next++) % n];
          if (!this.bad.has(candidate)) {
            index = candidate;
            break;
          }
        }
        if (index < 0) break;
        assigned.push([i, index]);
      }
      if (assigned.length === 0) {
        throw this.exhausted(count - failed.length, count);
      }
      const results = await Promise.all(assigned.map(([i, index]) => this.load(index, epoch, step, images, i)));
      const still: number[] = failed.slice(assigned.length);
      assigned.forEach(([i, index], k) => {
        if (results[k]) indices[i] = index;
        else still.push(i);
      });
      still.sort((a, b) => a - b);
      failed = still;
    }

    if (this.closed) throw new ClosedError();
    for (let i = 0; i < count; i++) labels[i] = this.dataset.label(indices[i]) ?? -1;
    return { step, epoch, stepInEpoch, images, labels, indices, batchSize: count, imageSize: this.imageSize };
  }

  private exhausted(readable: number, needed: number): Error {
    const { name, length } = this.dataset;
    const first = this.skipped[0];
    const example = first ? ` (first failure: ${first.path}: ${first.reason})` : '';
    if (readable === 0) {
      return new Error(`BatchLoader: every one of the ${length} samples of dataset "${name}" failed to load${example}`);
    }
    return new Error(
      `BatchLoader: only ${readable} of the ${length} samples of dataset "${name}" can be loaded, fewer than the batch of ${needed}${example}`,
    );
  }
}
