/**
 * The typed pretraining model: a native model living on its own Rust worker thread.
 * Every method returns a Promise; the Node event loop stays free while a step runs.
 */
import { native } from '../native.js';
import { resolveConfig, type ConvMaeConfig, type ModelSpec } from './config.js';

export type DType = 'f32' | 'f64';

export interface AdamWOptions {
  /** Default 0.9. */
  beta1?: number;
  /** Default 0.95 (the pretraining recipe). */
  beta2?: number;
  /** Default 1e-8. */
  eps?: number;
  /** Default 0.05; never applied to 1-D tensors and biases. */
  weight_decay?: number;
}

/**
 * How stages 1-2 run in pretraining: 'sparse' (default) computes only the visible positions,
 * 'dense' computes every position with the mask on the depthwise conv input, as the official
 * code does. Both give the same loss and gradients.
 */
export type ConvPath = 'sparse' | 'dense';

/**
 * 'cpu' (default), 'cuda' or 'cuda:N'. CUDA needs the CUDA addon (`npm run build:cuda`, loaded
 * with CONVMAE_NATIVE); without it the constructor throws and says so.
 */
export type DeviceName = 'cpu' | 'cuda' | `cuda:${number}`;

/** 'fp32' (default): compute in the weights' dtype; 'bf16': activations and matmuls in bfloat16 over float32 master weights. */
export type Precision = 'fp32' | 'bf16';

/**
 * CPU threads a model's steps run on: a count, or 'auto': the first steps are timed on all of
 * rayon's threads, half of them, ... down to one, and the fastest count is kept (a small model
 * on a machine with many cores can run faster on fewer threads). Default: all of rayon's
 * threads, the core count unless RAYON_NUM_THREADS says otherwise. The results are the same bits
 * on any count.
 */
export type Threads = number | 'auto';

/** The native encoding of `threads` (undefined: all of rayon's; 0: auto); throws on anything else. */
export function threadCount(threads: Threads | undefined): number | undefined {
  if (threads === undefined) return undefined;
  if (threads === 'auto') return 0;
  if (!Number.isInteger(threads) || threads < 1 || threads > 1024) throw new RangeError(`threads must be 'auto' or an integer from 1 to 1024, got ${String(threads)}`);
  return threads;
}

export interface PretrainerOptions extends ModelSpec {
  device?: DeviceName;
  precision?: Precision;
  /** CPU models: a thread count or 'auto' (default: all of rayon's threads); see `Threads`. */
  threads?: Threads;
  /** Default 'f32'; 'f64' is the parity path. */
  dtype?: DType;
  /** Default 'sparse'. */
  path?: ConvPath;
  /** Seeds the weight init and the mask noise (default 0). */
  seed?: number;
  adamw?: AdamWOptions;
}

/** uint8 RGB images, channels-last [batchSize, height, width, 3], as the data pipeline packs them. */
export interface ImageBatch {
  images: Uint8Array;
  batchSize: number;
  height: number;
  width: number;
}

export interface StepOptions {
  /** Learning rate of this step (the schedule lives in the task driver). */
  lr: number;
  /** Micro-batches per optimizer update (the official accum_iter); default 1. */
  accumSteps?: number;
  /** Explicit mask noise [batchSize * tokens], one row per image under complementary masking too (tests); otherwise drawn from (seed, step). */
  noise?: Float64Array;
}

export interface StepResult {
  loss: number;
  lr: number;
  microStep: number;
  optimizerStep: number;
  /** Whether this micro-step updated the weights (end of an accumulation window). */
  updated: boolean;
}

export interface LoadOptions {
  /** Require every model tensor in the file (default true). false for the encoder-only official checkpoint. */
  strict?: boolean;
}

export interface LoadReport {
  format: 'convmae' | 'safetensors' | 'pth';
  loaded: string[];
  missing: string[];
  unexpected: string[];
  /** Tensors the file holds that were left at this model's values on purpose (`initFrom`: the sin-cos tables). */
  reinitialized: string[];
  optimizerRestored: boolean;
  /** What the saver passed as `extra` (the training loop's state), {} if none. */
  extra: Record<string, unknown>;
}

export interface Reconstruction {
  /** uint8 RGB, one row per image: original | masked | reconstruction | reconstruction + visible. */
  pixels: Buffer;
  width: number;
  height: number;
  loss: number;
}

/** Throws a RangeError naming the sizes when `images` does not hold the batch it claims to. */
export function checkImageBatch(batch: ImageBatch): void {
  const { images, batchSize, height, width } = batch;
  if (!(images instanceof Uint8Array)) throw new TypeError('images must be a Uint8Array of [batch, height, width, 3] pixels');
  const want = batchSize * height * width * 3;
  if (images.length !== want) {
    throw new RangeError(`images holds ${images.length} bytes, expected ${want} for ${batchSize} images of ${height}x${width}x3`);
  }
}

export class Pretrainer {
  readonly config: ConvMaeConfig;
  readonly dtype: DType;
  readonly seed: number;
  readonly path: ConvPath;
  readonly device: DeviceName;
  readonly precision: Precision;
  #native: InstanceType<typeof native.NativePretrainer> | undefined;

  private constructor(
    config: ConvMaeConfig,
    dtype: DType,
    seed: number,
    adamw: AdamWOptions | undefined,
    path: ConvPath,
    device: DeviceName,
    precision: Precision,
    threads: number | undefined,
  ) {
    this.config = config;
    this.dtype = dtype;
    this.seed = seed;
    this.path = path;
    this.device = device;
    this.precision = precision;
    this.#native = new native.NativePretrainer(JSON.stringify(config), dtype, seed, adamw ? JSON.stringify(adamw) : undefined, path, device, precision, threads);
  }

  /** A fresh model with the official init. Invalid options throw here, before any compute. */
  static create(options: PretrainerOptions = {}): Pretrainer {
    const dtype = options.dtype ?? 'f32';
    if (dtype !== 'f32' && dtype !== 'f64') throw new RangeError(`dtype must be 'f32' or 'f64', got '${String(dtype)}'`);
    const seed = options.seed ?? 0;
    if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`seed must be a non-negative integer, got ${seed}`);
    const path = options.path ?? 'sparse';
    if (path !== 'sparse' && path !== 'dense') throw new RangeError(`path must be 'sparse' or 'dense', got '${String(path)}'`);
    const threads = threadCount(options.threads);
    return new Pretrainer(resolveConfig(options), dtype, seed, options.adamw, path, options.device ?? 'cpu', options.precision ?? 'fp32', threads);
  }

  private get handle(): InstanceType<typeof native.NativePretrainer> {
    if (!this.#native) throw new Error('this Pretrainer was disposed');
    return this.#native;
  }

  /** The CPU threads the steps run on now: with 'auto', the count being timed, then the one chosen (0 before the model's worker has started). */
  get threads(): number {
    return this.handle.threads();
  }

  /**
   * One micro-step: normalize, mask, forward, backward, and AdamW at the end of a window.
   *
   * The images are copied and the step queued before this returns, so steps run in the order
   * of the calls and the buffer may be refilled at once. The promise settles when the step's
   * loss is known; on a GPU its backward and update may still be running then (anything that
   * reads the weights, such as `save`, waits for them).
   *
   * Overlapped steps: start the next step before awaiting this one (keep two queued, as
   * `pretrain` does) and a GPU model builds and queues the next step while the device still
   * runs this one, instead of leaving the device idle while the host works. The answers are
   * the same as one step at a time. If a step's loss is not finite, it rejects and changes
   * nothing, and a step already queued behind it rejects too without being applied.
   */
  async pretrainStep(batch: ImageBatch, options: StepOptions): Promise<StepResult> {
    checkImageBatch(batch);
    const accum = options.accumSteps ?? 1;
    if (!Number.isInteger(accum) || accum < 1) throw new RangeError(`accumSteps must be a positive integer, got ${accum}`);
    return this.handle.step(batch.images, batch.batchSize, batch.height, batch.width, options.lr, accum, options.noise);
  }

  /** Writes weights (official names), optimizer state and `extra` atomically (safetensors). */
  async save(path: string, extra: Record<string, unknown> = {}): Promise<void> {
    await this.handle.save(path, JSON.stringify(extra));
  }

  /** Loads our checkpoints (with optimizer state) or the official .pth files (weights only). */
  async load(path: string, options: LoadOptions = {}): Promise<LoadReport> {
    const r = await this.handle.load(path, options.strict ?? true);
    return { ...(JSON.parse(r.report) as Omit<LoadReport, 'extra'>), extra: JSON.parse(r.extra) as Record<string, unknown> };
  }

  /**
   * Starts from another run's weights, e.g. to continue pretraining from the released
   * encoder-only checkpoint: an official pretraining `.pth`, one of our pretraining checkpoints,
   * or a classifier's. What the file holds of this model is loaded (strict=False) and `missing`
   * lists what keeps its fresh init (for the released file: the fusion convs, `mask_token` and
   * the decoder). The fixed sin-cos tables stay this model's own; the optimizer is not touched
   * (on a fresh model: step 0, zero moments). Unlike `load`, no training state is restored.
   */
  async initFrom(path: string): Promise<LoadReport> {
    const r = await this.handle.initFrom(path);
    return { ...(JSON.parse(r.report) as Omit<LoadReport, 'extra'>), extra: {} };
  }

  /** The MAE visualization for a batch, with a mask drawn from `seed`. */
  async reconstruct(batch: ImageBatch, seed = 0): Promise<Reconstruction> {
    checkImageBatch(batch);
    return this.handle.reconstruct(batch.images, batch.batchSize, batch.height, batch.width, seed);
  }

  /** Frees the native model once queued work finishes; later calls throw. */
  dispose(): void {
    this.#native?.dispose();
    this.#native = undefined;
  }
}
