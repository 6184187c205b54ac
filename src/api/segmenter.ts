/**
 * The typed segmenter: UperNet with the auxiliary FCN head on a ConvMAE backbone, as the
 * official SEG code builds it (mmseg's UPerHead + FCNHead; layer scale and a relative position
 * bias per stage-3 block; a stride-32 level from a 3x3 stride-2 conv), on its own Rust worker
 * thread. Every method returns a Promise; the event loop stays free while a step runs.
 */
import { native } from '../native.js';
import { resolveConfig, type ConvMaeConfig, type ModelSpec } from './config.js';
import { checkImageBatch, type DeviceName, type ImageBatch, type Precision, type Threads } from './pretrainer.js';
import { checkTaskOptions, TaskModel, type TaskLoadReport } from './task-model.js';

/** Label value no loss or metric counts (mmseg's ignore_index; ADE20K's "other" after reduce_zero_label). */
export const IGNORE_LABEL = 255;

/** AdamW of the SEG recipe: betas (0.9, 0.999), weight decay 0.05, layer decay 0.75. */
export interface SegmenterAdamWOptions {
  beta1?: number;
  beta2?: number;
  eps?: number;
  weight_decay?: number;
  /** lr scale of layer i is layer_decay^(depth[2] + 1 - i); stages 1-2, the patch embeds and pos_embed are layer 0, `fpn` and the heads the top. */
  layer_decay?: number;
}

export interface SegmenterOptions extends ModelSpec {
  /** 1..255 (label 255 is ignored). */
  numClasses: number;
  /** Width of UPerHead's convs. Default 768 (official). */
  channels?: number;
  /** Width of the auxiliary FCN head's conv. Default 256 (official). */
  auxChannels?: number;
  /** Output sides of the pyramid pooling module. Default [1, 2, 3, 6] (official). */
  poolScales?: number[];
  /** Dropout2d before each classifier. Default 0.1 (official). */
  dropout?: number;
  /** Stochastic depth of the backbone's last block (rates rise linearly). Default 0.2 (official). */
  dropPath?: number;
  /** Weight of the auxiliary loss. Default 0.4 (official). */
  auxWeight?: number;
  /** 'f32' (default) or 'f64'. */
  dtype?: 'f32' | 'f64';
  /**
   * 'cpu' (default), 'cuda' or 'cuda:N': the CUDA addon (`npm run build:cuda`, loaded with
   * CONVMAE_NATIVE), float32 with TF32 matmuls; not yet measured on a GPU (see docs/cuda.md).
   */
  device?: DeviceName;
  /**
   * 'fp32' (default) or 'bf16': the backbone and the heads compute in bfloat16 over float32
   * master weights; BatchNorm (statistics, affine weights, running averages) and the losses stay
   * f32, as mmseg's fp16 training keeps them (needs dtype 'f32').
   */
  precision?: Precision;
  /** CPU models: a thread count or 'auto' (see `Threads`). */
  threads?: Threads;
  /** Seeds the init, stochastic depth and dropout. Default 0. */
  seed?: number;
  optimizer?: SegmenterAdamWOptions;
}

/** Images with one label per pixel. */
export interface LabelledBatch extends ImageBatch {
  /** [batchSize * height * width] class ids, row-major per image; 255 = ignore. */
  labels: Uint8Array;
}

export interface SegTrainResult {
  /** decodeLoss + auxWeight * auxLoss. */
  loss: number;
  decodeLoss: number;
  auxLoss: number;
  lr: number;
  /** Optimizer updates so far. */
  step: number;
}

/** Per-class pixel counts (pixels labelled 255 left out), as mmseg's intersect_and_union counts them. */
export interface ClassAreas {
  intersect: number[];
  union: number[];
  predicted: number[];
  label: number[];
}

export interface SegEvalResult {
  /** The argmax class of every pixel at the images' size, [batchSize * height * width]. */
  predictions: Uint8Array;
  /** With labels: the decode loss, averaged over the batch's pixels (ignored ones count 0, as mmseg 0.11). */
  loss?: number;
  /** With labels. */
  areas?: ClassAreas;
}

/** mmseg's summary of accumulated areas. */
export interface SegmentationScore {
  /** Mean over classes of intersect / union, classes with an empty union left out. */
  mIoU: number;
  /** Mean over classes of intersect / label, classes never labelled left out. */
  mAcc: number;
  /** All correctly labelled pixels over all labelled pixels. */
  aAcc: number;
  /** Per class; NaN where the class has an empty union. */
  iou: number[];
  /** Pixels counted (labelled, not 255). */
  pixels: number;
}

/** Sums the areas of batches, then scores them (mIoU, mAcc, aAcc) as mmseg's `mean_iou` does. */
export class SegmentationMeter {
  readonly areas: ClassAreas;

  constructor(readonly numClasses: number) {
    const zeros = () => new Array<number>(numClasses).fill(0);
    this.areas = { intersect: zeros(), union: zeros(), predicted: zeros(), label: zeros() };
  }

  add(areas: ClassAreas): void {
    for (const key of ['intersect', 'union', 'predicted', 'label'] as const) {
      if (areas[key].length !== this.numClasses) throw new RangeError(`areas.${key} has ${areas[key].length} classes, this meter ${this.numClasses}`);
      areas[key].forEach((v, c) => (this.areas[key][c] += v));
    }
  }

  score(): SegmentationScore {
    const { intersect, union, label } = this.areas;
    const mean = (values: number[]) => {
      const kept = values.filter((v) => !Number.isNaN(v));
      return kept.length ? kept.reduce((a, b) => a + b, 0) / kept.length : NaN;
    };
    const iou = intersect.map((i, c) => (union[c] > 0 ? i / union[c] : NaN));
    const acc = intersect.map((i, c) => (label[c] > 0 ? i / label[c] : NaN));
    const pixels = label.reduce((a, b) => a + b, 0);
    const correct = intersect.reduce((a, b) => a + b, 0);
    return { mIoU: mean(iou), mAcc: mean(acc), aAcc: pixels > 0 ? correct / pixels : NaN, iou, pixels };
  }
}

/** What `initFrom` and `load` report (see TaskLoadReport). */
export type SegmenterLoadReport = TaskLoadReport;

function checkLabels(batch: LabelledBatch | ImageBatch, labels: Uint8Array | undefined): void {
  if (labels === undefined) return;
  if (!(labels instanceof Uint8Array)) throw new TypeError('labels must be a Uint8Array (one class id per pixel, 255 = ignore)');
  const want = batch.batchSize * batch.height * batch.width;
  if (labels.length !== want) throw new RangeError(`labels hold ${labels.length} values, expected ${want} (one per pixel of ${batch.batchSize} images of ${batch.height}x${batch.width})`);
}

/**
 * UperNet on a ConvMAE backbone. `initFrom` resizes `pos_embed` to this grid (224-px
 * pretraining, 512-px segmentation: 14x14 to 32x32) and reports the layer scales, relative
 * position tables and `fpn` as missing; `load` also reads an official mmseg UperNet .pth.
 */
export class Segmenter extends TaskModel<InstanceType<typeof native.NativeSegmenter>> {
  readonly numClasses: number;

  private constructor(config: ConvMaeConfig, options: SegmenterOptions) {
    const head: Record<string, unknown> = { num_classes: options.numClasses };
    const optional = { channels: options.channels, aux_channels: options.auxChannels, pool_scales: options.poolScales, dropout: options.dropout, drop_path: options.dropPath, aux_weight: options.auxWeight };
    for (const [key, value] of Object.entries(optional)) if (value !== undefined) head[key] = value;
    super('Segmenter', native.NativeSegmenter, config, head, options);
    this.numClasses = options.numClasses;
  }

  /** A fresh segmenter (the official init of the backbone and heads). Invalid options throw here. */
  static create(options: SegmenterOptions): Segmenter {
    if (!Number.isInteger(options.numClasses) || options.numClasses < 1 || options.numClasses > 255) {
      throw new RangeError(`numClasses must be an integer in 1..255 (label 255 is ignored), got ${String(options.numClasses)}`);
    }
    checkTaskOptions(options);
    return new Segmenter(resolveConfig(options), options);
  }

  /** One optimizer update on uint8 images and their label maps. */
  async train(batch: LabelledBatch, options: { lr: number }): Promise<SegTrainResult> {
    checkImageBatch(batch);
    checkLabels(batch, batch.labels);
    return this.handle.train(batch.images, batch.batchSize, batch.height, batch.width, batch.labels, options.lr);
  }

  /** Evaluation-mode predictions at the images' size; loss and per-class areas when the batch has labels. */
  async evaluate(batch: ImageBatch & { labels?: Uint8Array }): Promise<SegEvalResult> {
    checkImageBatch(batch);
    checkLabels(batch, batch.labels);
    const r = await this.handle.evaluate(batch.images, batch.batchSize, batch.height, batch.width, batch.labels);
    const areas = r.intersect && r.union && r.predicted && r.label ? { intersect: r.intersect, union: r.union, predicted: r.predicted, label: r.label } : undefined;
    return { predictions: r.predictions, loss: r.loss ?? undefined, areas };
  }

  /**
   * mmseg's slide inference of one image of any size (at least the model's side S on each axis;
   * smaller ones are padded): S x S windows at `stride` (default 2S/3 rounded down, the
   * official 341 for 512), overlapping logits averaged, resized to `originalHeight` x
   * `originalWidth` (the label map's size), then the argmax; with labels at that size, the areas.
   */
  async evaluateSlide(image: { image: Uint8Array; height: number; width: number }, options: { originalHeight: number; originalWidth: number; labels?: Uint8Array; stride?: number }): Promise<SegEvalResult> {
    checkImageBatch({ images: image.image, batchSize: 1, height: image.height, width: image.width });
    const stride = options.stride ?? Math.floor((2 * this.config.img_size) / 3);
    if (options.labels !== undefined) checkLabels({ images: image.image, batchSize: 1, height: options.originalHeight, width: options.originalWidth }, options.labels);
    const r = await this.handle.evaluateSlide(image.image, image.height, image.width, options.originalHeight, options.originalWidth, stride, options.labels);
    const areas = r.intersect && r.union && r.predicted && r.label ? { intersect: r.intersect, union: r.union, predicted: r.predicted, label: r.label } : undefined;
    return { predictions: r.predictions, areas };
  }
}
