/**
 * The typed classifier: a ConvMAE encoder with a fine-tuning head (Linear) or a linear-probe
 * head (BatchNorm without affine + Linear, frozen encoder), on its own Rust worker thread.
 * Every method returns a Promise; the event loop stays free while a step runs.
 */
import { native } from '../native.js';
import { resolveConfig, type ConvMaeConfig, type ModelSpec } from './config.js';
import { checkImageBatch, threadCount, type DeviceName, type DType, type ImageBatch, type LoadOptions, type LoadReport, type Precision, type Threads } from './pretrainer.js';

/** 'global': mean of the tokens + fc_norm (official default); 'token': norm + token 0 (the probe's default quirk). */
export type Pooling = 'global' | 'token';
export type HeadKind = 'finetune' | 'linear-probe';

/** AdamW of the fine-tune recipe: betas (0.9, 0.999), weight decay 0.05, layer decay 0.65. */
export interface FinetuneAdamWOptions {
  kind: 'adamw';
  beta1?: number;
  beta2?: number;
  eps?: number;
  weight_decay?: number;
  /** lr scale of layer i is layer_decay^(L - i); stages 1-2 and the patch embeds are layer 0. */
  layer_decay?: number;
}

/** LARS of the linear probe: momentum 0.9, trust coefficient 0.001, no weight decay. */
export interface LarsOptions {
  kind: 'lars';
  momentum?: number;
  trust_coefficient?: number;
  weight_decay?: number;
}

export interface ClassifierOptions extends ModelSpec {
  numClasses: number;
  /** Default 'finetune'. */
  kind?: HeadKind;
  /** Default 'global'. */
  pool?: Pooling;
  /** Stochastic depth of the last block (rates rise linearly over all blocks); fine-tuning only. Default 0. */
  dropPath?: number;
  dtype?: DType;
  /** 'cpu' (default), 'cuda' or 'cuda:N' (needs the CUDA addon). */
  device?: DeviceName;
  /**
   * 'fp32' (default) or 'bf16': the encoder computes in bfloat16; master weights, optimizer
   * state, pooling, the head and the loss stay f32 (needs dtype 'f32').
   */
  precision?: Precision;
  /** CPU models: a thread count or 'auto' (default: all of rayon's threads); see `Threads`. */
  threads?: Threads;
  /** Seeds the head init, stochastic depth and erasing noise. Default 0. */
  seed?: number;
  /** Default: AdamW for 'finetune', LARS for 'linear-probe'. */
  optimizer?: FinetuneAdamWOptions | LarsOptions;
}

/** Augmentations the native step applies to normalized pixels (boxes drawn by src/data). */
export interface NativeAugment {
  erase?: { sample: number; top: number; left: number; height: number; width: number }[];
  mix?: { lam: number; cut?: [number, number, number, number] };
}

export interface TrainOptions {
  lr: number;
  /** Class ids (plain cross-entropy) ... */
  labels?: Int32Array;
  /** ... or [batch, numClasses] probabilities (label smoothing, mixup, cutmix). */
  targets?: Float64Array;
  augment?: NativeAugment;
  /** Micro-batches per optimizer update (the official accum_iter); default 1. */
  accumSteps?: number;
}

export interface TrainResult {
  loss: number;
  lr: number;
  /** Optimizer updates so far. */
  step: number;
  /** Whether this micro-batch ended an accumulation window and updated the weights. */
  updated: boolean;
}

export interface EvalResult {
  /** Sum of per-image cross-entropy (0 without labels). */
  lossSum: number;
  top1: number;
  top5: number;
  count: number;
  /** [count, numClasses] row-major. */
  logits: Float32Array;
}

/** One scale of the encoder's output. */
export interface FeatureMap {
  /** 'stage1' (stride 4, the last conv block of stage 1), 'stage2' (stride 8) or 'stage3' (stride 16, the last transformer block's tokens on their grid, before any norm). */
  name: 'stage1' | 'stage2' | 'stage3';
  /** [batch, channels, height, width]. */
  shape: [number, number, number, number];
  /** float32, row-major in `shape`'s order (PyTorch's NCHW). */
  data: Float32Array;
}

export interface Features {
  /** [batch, dim] row-major: the stage-3 tokens pooled and normalized as `pool` says; what the head reads (the probe's, before its BatchNorm). */
  pooled: Float32Array;
  dim: number;
  /** stage1, stage2 and stage3, with `{ maps: true }`; empty otherwise. */
  maps: FeatureMap[];
}

export interface ClassifierLoadReport extends LoadReport {
  /** Tensors the file has that were drawn fresh on purpose (the classification head). */
  reinitialized: string[];
}

function parseReport(r: { report: string; extra: string }): ClassifierLoadReport {
  return { ...(JSON.parse(r.report) as Omit<ClassifierLoadReport, 'extra'>), extra: JSON.parse(r.extra) as Record<string, unknown> };
}

export class Classifier {
  readonly config: ConvMaeConfig;
  readonly numClasses: number;
  readonly kind: HeadKind;
  readonly pool: Pooling;
  readonly dtype: DType;
  readonly precision: Precision;
  #native: InstanceType<typeof native.NativeClassifier> | undefined;

  private constructor(config: ConvMaeConfig, options: ClassifierOptions) {
    this.config = config;
    this.numClasses = options.numClasses;
    this.kind = options.kind ?? 'finetune';
    this.pool = options.pool ?? 'global';
    this.dtype = options.dtype ?? 'f32';
    this.precision = options.precision ?? 'fp32';
    const head = { num_classes: this.numClasses, pool: this.pool, kind: this.kind, drop_path: options.dropPath ?? 0 };
    const optimizer = options.optimizer ? JSON.stringify(options.optimizer) : undefined;
    this.#native = new native.NativeClassifier(JSON.stringify(config), JSON.stringify(head), this.dtype, options.seed ?? 0, optimizer, options.device ?? 'cpu', this.precision, threadCount(options.threads));
  }

  /** A fresh classifier (official init: sin-cos pos_embed, trunc-normal head). Invalid options throw here. */
  static create(options: ClassifierOptions): Classifier {
    if (!Number.isInteger(options.numClasses) || options.numClasses < 1) {
      throw new RangeError(`numClasses must be a positive integer, got ${String(options.numClasses)}`);
    }
    const seed = options.seed ?? 0;
    if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`seed must be a non-negative integer, got ${seed}`);
    return new Classifier(resolveConfig(options), options);
  }

  private get handle(): InstanceType<typeof native.NativeClassifier> {
    if (!this.#native) throw new Error('this Classifier was disposed');
    return this.#native;
  }

  /** The CPU threads the training steps run on now (see `Pretrainer.threads`). */
  get threads(): number {
    return this.handle.threads();
  }

  /**
   * Loads a pretrained encoder as main_finetune.py / main_linprobe.py do: strict=False, head left
   * fresh. The report lists missing (expected: head.*, fc_norm.*), unexpected (decoder, norm, ...)
   * and reinitialized tensors.
   */
  async initFrom(path: string): Promise<ClassifierLoadReport> {
    return parseReport(await this.handle.initFrom(path));
  }

  /** Restores a classifier checkpoint exactly (ours with optimizer state, or an official fine-tuned .pth). */
  async load(path: string, options: LoadOptions = {}): Promise<ClassifierLoadReport> {
    return parseReport(await this.handle.load(path, options.strict ?? true));
  }

  async save(path: string, extra: Record<string, unknown> = {}): Promise<void> {
    await this.handle.save(path, JSON.stringify(extra));
  }

  /**
   * One micro-batch of uint8 images (normalized, erased and mixed natively); the weights update
   * at the end of each window of `accumSteps` micro-batches.
   */
  async train(batch: ImageBatch, options: TrainOptions): Promise<TrainResult> {
    checkImageBatch(batch);
    if (!options.labels && !options.targets) throw new TypeError('train: pass labels or targets');
    const accum = options.accumSteps ?? 1;
    if (!Number.isInteger(accum) || accum < 1) throw new RangeError(`accumSteps must be a positive integer, got ${accum}`);
    const augment = options.augment ? JSON.stringify(options.augment) : undefined;
    return this.handle.train(batch.images, batch.batchSize, batch.height, batch.width, options.lr, options.labels, options.targets, augment, accum);
  }

  /** Evaluation-mode logits; loss and top-1 / top-5 hits when labels are given. */
  async evaluate(batch: ImageBatch, labels?: Int32Array): Promise<EvalResult> {
    checkImageBatch(batch);
    return this.handle.evaluate(batch.images, batch.batchSize, batch.height, batch.width, labels);
  }

  /**
   * Evaluation-mode features of uint8 images: the pooled vector the head reads (an embedding for
   * retrieval or k-NN) and, with `{ maps: true }`, the encoder's output at strides 4, 8 and 16
   * (what a detection or segmentation neck takes). Load a pretrained encoder with `initFrom`
   * first; its fresh `fc_norm` is a plain LayerNorm (weight 1, bias 0).
   */
  async features(batch: ImageBatch, options: { maps?: boolean } = {}): Promise<Features> {
    checkImageBatch(batch);
    const r = await this.handle.features(batch.images, batch.batchSize, batch.height, batch.width, options.maps ?? false);
    const maps = r.maps.map((m) => ({ name: m.name as FeatureMap['name'], shape: m.shape as FeatureMap['shape'], data: m.data }));
    return { pooled: r.pooled, dim: r.dim, maps };
  }

  /** Raises a Rust panic on the worker; the Promise rejects and Node lives on (for tests). */
  async debugPanic(): Promise<void> {
    await this.handle.debugPanic();
  }

  dispose(): void {
    this.#native?.dispose();
    this.#native = undefined;
  }
}
