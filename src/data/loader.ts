/**
 * Batch loader of the pretraining pipeline: deterministic, resumable,
 * prefetching, with bounded decode concurrency and reuse of batch buffers.
 */
import os from 'node:os';
import sharp from 'sharp';
import type { ImageDataset } from './datasets.js';
import { readJpegHeader } from './jpeg.js';
import { cropPixelBatch, decodeCropBatch, nativeDecoder, nativePixelCropper, type NativeCropJob, type NativeCropResult, type NativePixelJob } from './native-decode.js';
import { createRng, deriveSeed, permutation } from './rng.js';
import {
  applyPretrainParams,
  evalTransform,
  openImage,
  readSourceBytes,
  samplePretrainParams,
  type PretrainParams,
  type PretrainTransformOptions,
} from './transforms.js';

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

/**
 * The images of `batch` not met before in this pass over a dataset, moved to the front of its
 * buffers. A pass in order (shuffle and dropLast off) fills an unreadable image's slot with a
 * later image, which then comes again in its own batch: evaluation and feature extraction count
 * each image once. `seen` holds a flag per dataset index and is updated.
 */
export function unseenImages(batch: Batch, seen: Uint8Array): Pick<Batch, 'images' | 'labels' | 'indices' | 'batchSize'> {
  const block = batch.imageSize * batch.imageSize * 3;
  const indices: number[] = [];
  for (let i = 0; i < batch.batchSize; i++) {
    const index = batch.indices[i]!;
    if (seen[index]) continue;
    seen[index] = 1;
    const to = indices.length;
    if (to !== i) {
      batch.images.copyWithin(to * block, i * block, (i + 1) * block);
      batch.labels[to] = batch.labels[i]!;
    }
    indices.push(index);
  }
  const n = indices.length;
  return { images: batch.images.subarray(0, n * block), labels: batch.labels.subarray(0, n), indices, batchSize: n };
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
  /** Files read, and images decoded by sharp, at once. Default os.availableParallelism(). */
  concurrency?: number;
  /**
   * Decode JPEGs of the pretraining transform natively (src/imaging.rs in
   * the Rust core) when the native module is there. Default true. Other
   * formats, files the native decoder refuses, and the eval transform go
   * through sharp.
   */
  nativeJpeg?: boolean;
  /**
   * Run the pretraining transform of images already in memory (an IDX
   * file's digits, `kind: 'raw'` sources) natively too: the same crop, Pillow's
   * bicubic resample and flip as the JPEG path, without sharp's per-image
   * pipeline, which cost small images far more than their resample. Default
   * true; false sends them through sharp.
   */
  nativePixels?: boolean;
  /** Threads of the native JPEG decoder. Default os.availableParallelism(). */
  decodeThreads?: number;
  /**
   * libvips threads per sharp image (`sharp.concurrency`, process-wide). The
   * loader already decodes `concurrency` images at once, so one thread per
   * image keeps the thread count at the core count instead of its square.
   * Default 1; null leaves sharp's setting alone.
   */
  sharpConcurrency?: number | null;
  /** This process's rank among `worldSize` data-parallel processes. Default 0. */
  rank?: number;
  /** Number of data-parallel processes sharing each epoch. Default 1. */
  worldSize?: number;
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

/** A sample waiting for a native batch: its slot in the batch, its dataset index, what the native call gets, and its augmentation (for sharp, should the native call refuse it). */
interface NativeJob<J> {
  slot: number;
  index: number;
  job: J;
  params: PretrainParams;
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
 * deriveSeed(seed, e) (identity with shuffle=false; the dataset's own
 * `epochOrder(seed, e)` when it has one, as tar shards do); global step s is
 * batch s % stepsPerEpoch of epoch floor(s / stepsPerEpoch). Augmentation
 * of sample i in epoch e uses deriveSeed(seed, e, i). Batches therefore
 * depend only on (seed, step) and a loader created with startStep=k yields
 * exactly the batches k, k+1, ... of a loader started at 0, whatever
 * `concurrency`, `decodeThreads` or decoder.
 *
 * Ranks: with worldSize W, each epoch's order is cut into W contiguous
 * blocks of floor(N / W) samples and rank r reads block r, so ranks see
 * disjoint samples; the N mod W samples at the end of the order are not read
 * that epoch (a different few each epoch, since the order changes).
 *
 * Decoding: for the pretraining transform, files are read and their crop
 * and flip drawn in TypeScript; the batch's JPEGs then go to the native
 * decoder in one call (decoded on `decodeThreads` Rust threads, one batch
 * at a time, earlier steps first), its images already in memory (IDX digits)
 * to the same native transform in another, everything else to sharp. An
 * image the native path refuses is retried with sharp with the same crop and
 * flip.
 * `shrinkOnLoad` (off by default) concerns only the sharp path: the native
 * decoder always decodes the whole frame, so it has an effect on JPEGs only
 * with nativeJpeg: false or for the JPEGs the native decoder refuses.
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
  readonly nativeJpeg: boolean;
  readonly nativePixels: boolean;
  readonly decodeThreads: number;
  readonly rank: number;
  readonly worldSize: number;
  /** Samples that could not be loaded, each listed once. */
  readonly skipped: SkippedSample[] = [];

  private readonly onSkip?: (skipped: SkippedSample) => void;
  private readonly augment: PretrainTransformOptions;
  private readonly imageBytes: number;
  private readonly ring: (Slot | undefined)[];
  private readonly limiter: Limiter;
  /** One native batch at a time: it already uses every decode thread. */
  private readonly nativeLimiter = new Limiter(1);
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
    this.augment = { scale: options.scale, ratio: options.ratio, hflipProb: options.hflipProb, shrinkOnLoad: options.shrinkOnLoad };
    this.nativeJpeg = options.nativeJpeg ?? true;
    this.nativePixels = options.nativePixels ?? true;
    this.decodeThreads = positiveInt(options.decodeThreads ?? os.availableParallelism(), 'decodeThreads');
    this.worldSize = positiveInt(options.worldSize ?? 1, 'worldSize');
    this.rank = positiveInt(options.rank ?? 0, 'rank', 0);
    if (this.rank >= this.worldSize) throw new RangeError(`BatchLoader: rank ${this.rank} must be below worldSize ${this.worldSize}`);
    const sharpThreads = options.sharpConcurrency === undefined ? 1 : options.sharpConcurrency;
    if (sharpThreads !== null) sharp.concurrency(positiveInt(sharpThreads, 'sharpConcurrency'));

    const total = dataset.length;
    if (!Number.isInteger(total) || total <= 0) throw new Error(`BatchLoader: dataset "${dataset.name}" is empty`);
    const n = this.samplesPerRank;
    if (n === 0) throw new Error(`BatchLoader: dataset "${dataset.name}" has ${total} images, fewer than the ${this.worldSize} ranks`);
    if (this.dropLast && n < this.batchSize) {
      const what = this.worldSize > 1 ? `${n} images per rank (${total} over ${this.worldSize} ranks)` : `${n} images`;
      throw new Error(
        `BatchLoader: dataset "${dataset.name}" has ${what}, fewer than one batch of ${this.batchSize} (dropLast is on; lower batchSize or set dropLast: false)`,
      );
    }
    this.imageBytes = this.imageSize * this.imageSize * 3;
    this.ring = new Array(this.prefetch + 2).fill(undefined);
    this.limiter = new Limiter(this.concurrency);
    this.cursor = this.startStep;
    this.scheduledUntil = this.startStep;
  }

  /** Samples each rank reads per epoch: floor(N / worldSize). */
  get samplesPerRank(): number {
    return Math.floor(this.dataset.length / this.worldSize);
  }

  /** Batches per epoch (of this rank): floor(n / B) with dropLast, else ceil(n / B), n = samplesPerRank. */
  get stepsPerEpoch(): number {
    const n = this.samplesPerRank;
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
    this.nativeLimiter.close();
    const inFlight = [...this.pending.values()];
    this.pending.clear();
    await Promise.allSettled(inFlight);
  }

  private locate(step: number): { epoch: number; stepInEpoch: number; start: number; end: number } {
    const spe = this.stepsPerEpoch;
    const epoch = Math.floor(step / spe);
    const stepInEpoch = step - epoch * spe;
    const start = stepInEpoch * this.batchSize;
    const end = Math.min(start + this.batchSize, this.samplesPerRank);
    return { epoch, stepInEpoch, start, end };
  }

  /** This rank's samples of `epoch`, in order. */
  private epochOrder(epoch: number): Uint32Array {
    let perm = this.perms.get(epoch);
    if (!perm) {
      const n = this.dataset.length;
      let full: Uint32Array;
      if (!this.shuffle) {
        full = new Uint32Array(n);
        for (let i = 0; i < n; i++) full[i] = i;
      } else if (this.dataset.epochOrder) {
        full = this.dataset.epochOrder(this.seed, epoch);
        if (full.length !== n) throw new Error(`BatchLoader: dataset "${this.dataset.name}" gave an epoch order of ${full.length} samples, not ${n}`);
      } else {
        full = permutation(n, createRng(deriveSeed(this.seed, epoch)));
      }
      const per = this.samplesPerRank;
      perm = full.subarray(this.rank * per, (this.rank + 1) * per);
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
    const where = this.describe(index);
    const reason = err instanceof Error ? err.message : String(err);
    const info: SkippedSample = { path: where, reason, index, epoch, step };
    this.bad.set(index, info);
    this.skipped.push(info);
    this.onSkip?.(info);
  }

  /**
   * Decodes dataset samples into image slots (`entries` of [slot, index]);
   * one boolean per entry, false when the sample cannot be read.
   */
  private async loadMany(entries: [number, number][], epoch: number, step: number, images: Uint8Array): Promise<boolean[]> {
    if (this.transform === 'eval') {
      return Promise.all(entries.map(([i, index]) => this.attempt(index, epoch, step, () => evalTransform(this.dataset.source(index), this.imageSize, images, i * this.imageBytes))));
    }
    const decode = this.nativeJpeg ? await nativeDecoder() : undefined;
    const cropPixels = this.nativePixels ? await nativePixelCropper() : undefined;
    // Read every file and draw its augmentation; JPEGs and images in memory wait for the native
    // batches, the rest goes through sharp here.
    const jpegs: NativeJob<NativeCropJob>[] = [];
    const inMemory: NativeJob<NativePixelJob>[] = [];
    const direct = await Promise.all(
      entries.map(([i, index]) =>
        this.attempt(index, epoch, step, async () => {
          const source = this.dataset.source(index);
          const rng = createRng(deriveSeed(this.seed, epoch, index));
          if (source.kind === 'raw' && cropPixels) {
            const params = samplePretrainParams(source.width, source.height, rng, this.augment);
            const { pixels, width, height, channels } = source;
            inMemory.push({ slot: i, index, params, job: { pixels, width, height, channels, path: this.describe(index), ...params } });
            return;
          }
          const bytes = source.kind === 'file' ? await readSourceBytes(source) : undefined;
          const header = decode && bytes ? readJpegHeader(bytes) : undefined;
          if (header && bytes) {
            const params = samplePretrainParams(header.width, header.height, rng, this.augment);
            jpegs.push({ slot: i, index, params, job: { bytes, path: this.describe(index), ...params } });
            return;
          }
          const opened = await openImage(source, bytes);
          const params = samplePretrainParams(opened.width, opened.height, rng, this.augment);
          await applyPretrainParams(opened, params, this.imageSize, images, i * this.imageBytes, this.augment);
        }),
      ),
    );
    const ok = new Map<number, boolean>();
    if (decode && jpegs.length > 0) {
      await this.settleNative(jpegs, () => decodeCropBatch(decode, jpegs.map((j) => j.job), this.imageSize, this.decodeThreads), images, epoch, step, ok, (j) => j.bytes);
    }
    if (cropPixels && inMemory.length > 0) {
      await this.settleNative(inMemory, () => cropPixelBatch(cropPixels, inMemory.map((j) => j.job), this.imageSize, this.decodeThreads), images, epoch, step, ok);
    }
    return entries.map(([i], k) => (ok.has(i) ? ok.get(i)! : direct[k]));
  }

  /**
   * Runs one native batch (one at a time: it already uses every decode thread) and writes its
   * images into their slots; an image it refuses (an unsupported JPEG flavour, a damaged file,
   * pixels that do not fill their dimensions) goes to sharp with the same crop and flip, and is
   * skipped, with both reasons, if sharp refuses it too. A failure of the whole call fails the
   * batch.
   */
  private async settleNative<J>(
    jobs: NativeJob<J>[],
    run: () => Promise<NativeCropResult>,
    images: Uint8Array,
    epoch: number,
    step: number,
    ok: Map<number, boolean>,
    bytesOf: (job: J) => Uint8Array | undefined = () => undefined,
  ): Promise<void> {
    const result = await this.nativeLimiter.run(step, () => {
      if (this.closed) throw new ClosedError();
      return run();
    });
    await Promise.all(
      jobs.map(async ({ slot, index, job, params }, k) => {
        const offset = slot * this.imageBytes;
        const nativeError = result.errors[k];
        if (!nativeError) {
          images.set(result.pixels.subarray(k * this.imageBytes, (k + 1) * this.imageBytes), offset);
          ok.set(slot, true);
          return;
        }
        const good = await this.attempt(index, epoch, step, async () => {
          try {
            await applyPretrainParams(await openImage(this.dataset.source(index), bytesOf(job)), params, this.imageSize, images, offset, this.augment);
          } catch (err) {
            throw new Error(`${err instanceof Error ? err.message : String(err)} (native decoder: ${nativeError})`);
          }
        });
        ok.set(slot, good);
      }),
    );
  }

  private describe(index: number): string {
    try {
      return this.dataset.describe(index);
    } catch {
      return `${this.dataset.name}#${index}`;
    }
  }

  /**
   * Runs one sample's reading / sharp decoding under the concurrency limit;
   * false (and a recorded skip) if it throws.
   */
  private async attempt(index: number, epoch: number, step: number, work: () => Promise<void>): Promise<boolean> {
    if (this.bad.has(index)) return false;
    try {
      await this.limiter.run(step, async () => {
        if (this.closed) throw new ClosedError();
        await work();
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

    const ok = await this.loadMany(
      indices.map((index, i) => [i, index]),
      epoch,
      step,
      images,
    );
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
      const results = await this.loadMany(assigned, epoch, step, images);
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
