/**
 * What the downstream task models (Segmenter, Detector) share: a native model with its optimizer
 * on its own Rust worker thread, built from a config, a head and AdamW settings, and its
 * checkpoints (exact restore, initialization of the backbone from an encoder checkpoint, atomic
 * save). Each subclass adds its head's options and its steps.
 */
import type { ConvMaeConfig } from './config.js';
import { threadCount, type DeviceName, type LoadOptions, type LoadReport, type Precision, type Threads } from './pretrainer.js';

export interface TaskLoadReport extends LoadReport {
  /** Tensors the file has that were left fresh on purpose (the heads; relative position tables of another shape). */
  reinitialized: string[];
}

/** The native side every task model has (NativeSegmenter, NativeDetector). */
export interface TaskHandle {
  initFrom(path: string): Promise<{ report: string; extra: string }>;
  load(path: string, strict: boolean): Promise<{ report: string; extra: string }>;
  save(path: string, extra: string): Promise<void>;
  dispose(): void;
  threads(): number;
}

/** The native constructor's arguments besides the head: the resolved config and these options. */
export interface TaskModelOptions {
  dtype?: 'f32' | 'f64';
  /** 'cpu' (default), 'cuda' or 'cuda:N' (the CUDA addon); which devices a task model runs on is its own (see each). */
  device?: DeviceName;
  /** 'fp32' (default) or 'bf16' (needs dtype 'f32'); what stays f32 under bf16 is each model's (see each). */
  precision?: Precision;
  threads?: Threads;
  seed?: number;
  optimizer?: object;
}

type TaskHandleClass<H> = new (config: string, head: string, dtype: string, seed: number, optimizer?: string | null, device?: string | null, precision?: string | null, threads?: number | null) => H;

function parseReport(r: { report: string; extra: string }): TaskLoadReport {
  return { ...(JSON.parse(r.report) as Omit<TaskLoadReport, 'extra'>), extra: JSON.parse(r.extra) as Record<string, unknown> };
}

/** Checks the options every task model takes; throws naming the option. */
export function checkTaskOptions(options: { seed?: number }): void {
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`seed must be a non-negative integer, got ${seed}`);
}

export abstract class TaskModel<H extends TaskHandle> {
  readonly config: ConvMaeConfig;
  readonly dtype: 'f32' | 'f64';
  readonly precision: Precision;
  #native: H | undefined;
  readonly #kind: string;

  /** `head`: the Rust head fields that are set (absent ones take the official values). */
  protected constructor(kind: string, Native: TaskHandleClass<H>, config: ConvMaeConfig, head: Record<string, unknown>, options: TaskModelOptions) {
    this.#kind = kind;
    this.config = config;
    this.dtype = options.dtype ?? 'f32';
    this.precision = options.precision ?? 'fp32';
    const optimizer = options.optimizer ? JSON.stringify(options.optimizer) : undefined;
    this.#native = new Native(JSON.stringify(config), JSON.stringify(head), this.dtype, options.seed ?? 0, optimizer, options.device ?? 'cpu', this.precision, threadCount(options.threads));
  }

  protected get handle(): H {
    if (!this.#native) throw new Error(`this ${this.#kind} was disposed`);
    return this.#native;
  }

  /** The CPU threads the training steps run on now. */
  get threads(): number {
    return this.handle.threads();
  }

  /**
   * Loads a pretrained encoder (pretraining, classifier or task checkpoint; ours or official) into
   * the backbone as the official task code does: strict=False, `pos_embed` resized bicubically to
   * this model's grid, the task's own layers fresh. `missing` lists what the file lacks.
   */
  async initFrom(path: string): Promise<TaskLoadReport> {
    return parseReport(await this.handle.initFrom(path));
  }

  /** Restores a checkpoint of this model exactly (ours with optimizer state, or the official release's file). */
  async load(path: string, options: LoadOptions = {}): Promise<TaskLoadReport> {
    return parseReport(await this.handle.load(path, options.strict ?? true));
  }

  /** Writes weights, optimizer state and `extra` atomically. */
  async save(path: string, extra: Record<string, unknown> = {}): Promise<void> {
    await this.handle.save(path, JSON.stringify(extra));
  }

  dispose(): void {
    this.#native?.dispose();
    this.#native = undefined;
  }
}
