/**
 * The typed detector: Mask R-CNN on a ConvMAE backbone, as the official DET code builds it
 * (detectron2: the `ConvViTDet` backbone with windowed and global stage-3 attention, FPN, RPN,
 * the 4conv1fc box head and the mask head), or with `variant: 'vitdet'` as Official-ConvMAE-Det
 * does (ViTDet's simple feature pyramid on the stage-3 map, LayerNorm in the heads, decomposed
 * relative positions, padded 14-token windows), on its own Rust worker thread. Every method
 * returns a Promise; the event loop stays free while a step runs.
 */
import { native } from '../native.js';
import { resolveConfig, type ConvMaeConfig, type ModelSpec } from './config.js';
import { checkImageBatch, type DeviceName, type ImageBatch, type Precision, type Threads } from './pretrainer.js';
import { checkTaskOptions, TaskModel } from './task-model.js';

/** x1, y1, x2, y2 in pixels (continuous coordinates; width = x2 - x1). */
export type BoxXyxy = [number, number, number, number];

/** AdamW of the official recipes: betas (0.9, 0.999), weight decay 0.1 (none on norms, pos_embed, DET's relative tables). */
export interface DetectorAdamWOptions {
  beta1?: number;
  beta2?: number;
  eps?: number;
  weight_decay?: number;
  /** Layer-wise lr decay, in (0, 1]: default 1 (none, DET's) or 0.8 for 'vitdet' (Official-ConvMAE-Det's). */
  layer_decay?: number;
}

/** Which official detector: the in-repo `DET/` ('det', spec 6.1) or `Official-ConvMAE-Det` ('vitdet', spec 6.2). */
export type DetectorVariant = 'det' | 'vitdet';

/** The detector's architecture and detectron2's sampling and test settings; absent ones take the official values. */
export interface DetectorOptions extends ModelSpec {
  /** Object classes (no background class). */
  numClasses: number;
  /**
   * 'det' (default): the in-repo DET code (FPN with BatchNorm on four backbone levels, frozen
   * pos_embed at the detection grid, shared relative position bias tables). 'vitdet':
   * Official-ConvMAE-Det (simple feature pyramid and heads with LayerNorm, learnable pos_embed
   * at `posGrid` resized in each forward, per-block decomposed relative positions, windows that
   * pad the grid).
   */
  variant?: DetectorVariant;
  /**
   * Side of a stage-3 attention window in tokens. Default 16 (DET, 1024-px images; it must
   * divide the token grid, img_size / 16) or 14 ('vitdet', which pads the grid to a multiple).
   */
  window?: number;
  /** Stage-3 blocks with global attention. Default [0, 3, 6, 10] (DET) or [1, 4, 7, 10] ('vitdet'). */
  globalBlocks?: number[];
  /** 'vitdet': side of the learnable pos_embed table (default 14, a 224-px pretraining's grid). */
  posGrid?: number;
  /** Width of the FPN and the heads' convs. Default 256. */
  channels?: number;
  /** Anchor size of each of p2..p6. Default [32, 64, 128, 256, 512]. */
  anchorSizes?: number[];
  /** Anchor aspect ratios (h / w). Default [0.5, 1, 2]. */
  aspectRatios?: number[];
  /** Default 2. */
  rpnConvs?: number;
  /** Default 4. */
  boxConvs?: number;
  /** Width of the box head's fc. Default 1024. */
  boxFc?: number;
  /** Default 4. */
  maskConvs?: number;
  /** Stochastic depth of the backbone's last block (rates rise linearly). Default 0.1 (official). */
  dropPath?: number;
  /** Anchors sampled per image for the RPN's losses. Default 256. */
  rpnBatchPerImage?: number;
  rpnPositiveFraction?: number;
  /** Proposals kept per level before NMS in training (2000) and testing (1000). */
  rpnPreNmsTrain?: number;
  rpnPreNmsTest?: number;
  /** Proposals kept per image after NMS in training (1000) and testing (1000). */
  rpnPostNmsTrain?: number;
  rpnPostNmsTest?: number;
  rpnNms?: number;
  /** Regions sampled per image for the ROI heads. Default 512. */
  roiBatchPerImage?: number;
  roiPositiveFraction?: number;
  /** Test: detections scoring at most this are dropped. Default 0.05. */
  scoreThreshold?: number;
  /** Test: NMS per class. Default 0.5. */
  testNms?: number;
  detectionsPerImage?: number;
  /** 'f32' (default) or 'f64'. */
  dtype?: 'f32' | 'f64';
  /**
   * 'cpu' (default), 'cuda' or 'cuda:N': the CUDA addon (`npm run build:cuda`, loaded with
   * CONVMAE_NATIVE), with TF32 matmuls for f32; not yet measured on a GPU (see docs/cuda.md).
   */
  device?: DeviceName;
  /**
   * 'fp32' (default) or 'bf16': the backbone, the neck and the heads compute in bfloat16 over
   * float32 master weights; BatchNorm, ROIAlign, the five losses and the box geometry stay f32,
   * as detectron2's AMP runs them (needs dtype 'f32').
   */
  precision?: Precision;
  /** CPU models: a thread count or 'auto' (see `Threads`). */
  threads?: Threads;
  /** Seeds the init, stochastic depth and sampling. Default 0. */
  seed?: number;
  optimizer?: DetectorAdamWOptions;
}

/** The head fields of DetectorOptions, with the Rust names. */
const HEAD_FIELDS = {
  variant: 'variant',
  window: 'window',
  globalBlocks: 'global_blocks',
  posGrid: 'pos_grid',
  channels: 'channels',
  anchorSizes: 'anchor_sizes',
  aspectRatios: 'aspect_ratios',
  rpnConvs: 'rpn_convs',
  boxConvs: 'box_convs',
  boxFc: 'box_fc',
  maskConvs: 'mask_convs',
  dropPath: 'drop_path',
  rpnBatchPerImage: 'rpn_batch_per_image',
  rpnPositiveFraction: 'rpn_positive_fraction',
  rpnPreNmsTrain: 'rpn_pre_nms_train',
  rpnPreNmsTest: 'rpn_pre_nms_test',
  rpnPostNmsTrain: 'rpn_post_nms_train',
  rpnPostNmsTest: 'rpn_post_nms_test',
  rpnNms: 'rpn_nms',
  roiBatchPerImage: 'roi_batch_per_image',
  roiPositiveFraction: 'roi_positive_fraction',
  scoreThreshold: 'score_threshold',
  testNms: 'test_nms',
  detectionsPerImage: 'detections_per_image',
} as const satisfies Partial<Record<keyof DetectorOptions, string>>;

/** One annotated object: its class (0-based), box and binary mask at the image's size. */
export interface TargetInstance {
  category: number;
  box: BoxXyxy;
  /** [height * width], nonzero = object. */
  mask: Uint8Array;
  /**
   * The polygons the mask was drawn from ([x1, y1, ...] in input pixels), where there are any:
   * the mask head's targets are then rasterized from them inside each region, as detectron2's
   * PolygonMasks.crop_and_resize does, instead of cropped from `mask`.
   */
  polygons?: number[][];
}

/** Images with their objects: `instances[i]` are image i's. */
export interface AnnotatedBatch extends ImageBatch {
  instances: TargetInstance[][];
  /**
   * Per image, the [height, width] it fills at the top left of its input (detectron2's
   * `image_size`, the 'vitdet' pipeline's inputs): outside it the normalized input is 0, as
   * detectron2 pads after normalizing, and proposals are clipped to it. Default: all of it.
   */
  extents?: [number, number][];
}

/** `extents` as the native flat array, checked against the batch (undefined when absent). */
function flatExtents(extents: [number, number][] | undefined, batch: ImageBatch): Uint32Array | undefined {
  if (extents === undefined) return undefined;
  const fits = ([h, w]: [number, number]) => Number.isInteger(h) && Number.isInteger(w) && h > 0 && w > 0 && h <= batch.height && w <= batch.width;
  if (!Array.isArray(extents) || extents.length !== batch.batchSize || !extents.every(fits)) {
    throw new RangeError(`extents must hold a positive integer [height, width] within ${batch.height}x${batch.width} per image (${batch.batchSize})`);
  }
  return Uint32Array.from(extents.flat());
}

export interface DetTrainResult {
  /** The sum of the five losses. */
  loss: number;
  lossRpnCls: number;
  lossRpnLoc: number;
  lossCls: number;
  lossBoxReg: number;
  lossMask: number;
  /** Foreground regions sampled for the ROI heads over the batch. */
  foreground: number;
  lr: number;
  /** Optimizer updates so far. */
  step: number;
}

/** The detections of one image, best first. */
export interface ImageDetections {
  boxes: BoxXyxy[];
  scores: number[];
  classes: number[];
  /** One binary mask of [height * width] per detection. */
  masks: Uint8Array[];
  height: number;
  width: number;
}


/** The batch's instances as the native flat arrays, every instance checked and named. */
function flattenInstances(batch: AnnotatedBatch, numClasses: number): { counts: Uint32Array; boxes: Float32Array; classes: Uint32Array; masks: Uint8Array; polygons?: FlatPolygons } {
  if (!Array.isArray(batch.instances) || batch.instances.length !== batch.batchSize) {
    throw new RangeError(`instances must hold one array per image (${batch.batchSize}), got ${Array.isArray(batch.instances) ? batch.instances.length : typeof batch.instances}`);
  }
  const pixels = batch.height * batch.width;
  const total = batch.instances.reduce((n, list) => n + list.length, 0);
  const counts = new Uint32Array(batch.batchSize);
  const boxes = new Float32Array(4 * total);
  const classes = new Uint32Array(total);
  const masks = new Uint8Array(total * pixels);
  const polygonCounts: number[] = [];
  const polygonLengths: number[] = [];
  const polygonCoords: number[] = [];
  let at = 0;
  batch.instances.forEach((list, i) => {
    counts[i] = list.length;
    list.forEach((instance, j) => {
      const where = `instances[${i}][${j}]`;
      if (!Number.isInteger(instance.category) || instance.category < 0 || instance.category >= numClasses) {
        throw new RangeError(`${where}: category ${String(instance.category)} is not in 0..${numClasses - 1}`);
      }
      const [x1, y1, x2, y2] = instance.box;
      if (![x1, y1, x2, y2].every(Number.isFinite) || !(x2 > x1 && y2 > y1)) throw new RangeError(`${where}: box [${instance.box.join(', ')}] must be finite with x2 > x1 and y2 > y1`);
      if (!(instance.mask instanceof Uint8Array) || instance.mask.length !== pixels) {
        throw new RangeError(`${where}: mask must be a Uint8Array of ${pixels} values (${batch.height}x${batch.width}), got ${instance.mask instanceof Uint8Array ? instance.mask.length : typeof instance.mask}`);
      }
      boxes.set([x1, y1, x2, y2], 4 * at);
      classes[at] = instance.category;
      masks.set(instance.mask, at * pixels);
      const polygons = instance.polygons ?? [];
      polygons.forEach((p, k) => {
        if (!Array.isArray(p) || p.length < 6 || p.length % 2 !== 0 || !p.every(Number.isFinite)) {
          throw new RangeError(`${where}: polygons[${k}] must hold 3 or more (x, y) pairs of finite numbers`);
        }
      });
      polygonCounts.push(polygons.length);
      for (const p of polygons) {
        polygonLengths.push(p.length);
        for (const v of p) polygonCoords.push(v);
      }
      at++;
    });
  });
  const polygons = polygonLengths.length > 0 ? { counts: Uint32Array.from(polygonCounts), lengths: Uint32Array.from(polygonLengths), coords: Float64Array.from(polygonCoords) } : undefined;
  return { counts, boxes, classes, masks, polygons };
}

/** Every instance's polygons as the native flat arrays: a count per instance, a length per polygon, the numbers. */
interface FlatPolygons {
  counts: Uint32Array;
  lengths: Uint32Array;
  coords: Float64Array;
}

/**
 * Mask R-CNN on a ConvMAE backbone. `initFrom` resizes `pos_embed` to the model's table (DET:
 * the detection grid, 224-px pretraining and 1024-px detection: 14x14 to 64x64; 'vitdet':
 * `posGrid`, 14x14 as it is), leaves the FPN or pyramid, RPN and ROI heads fresh and reports the
 * relative position tables as missing; `load` also reads an official detectron2 model_final
 * (the encoder under `backbone.bottom_up.` or `backbone.net.`).
 */
export class Detector extends TaskModel<InstanceType<typeof native.NativeDetector>> {
  readonly numClasses: number;
  /** Which official detector this is ('det' or 'vitdet'). */
  readonly variant: DetectorVariant;

  private constructor(config: ConvMaeConfig, options: DetectorOptions) {
    // Absent fields take the official values of the variant (the native side fills them in).
    const head: Record<string, unknown> = { num_classes: options.numClasses };
    for (const [key, name] of Object.entries(HEAD_FIELDS)) {
      const value = options[key as keyof typeof HEAD_FIELDS];
      if (value !== undefined) head[name] = value;
    }
    super('Detector', native.NativeDetector, config, head, options);
    this.numClasses = options.numClasses;
    this.variant = options.variant ?? 'det';
  }

  /** A fresh detector (detectron2's init of the FPN and heads). Invalid options throw here, named. */
  static create(options: DetectorOptions): Detector {
    if (!Number.isInteger(options.numClasses) || options.numClasses < 1) throw new RangeError(`numClasses must be a positive integer, got ${String(options.numClasses)}`);
    checkTaskOptions(options);
    return new Detector(resolveConfig(options), options);
  }

  /** One optimizer update on uint8 images (the model's side) and their objects. */
  async train(batch: AnnotatedBatch, options: { lr: number }): Promise<DetTrainResult> {
    checkImageBatch(batch);
    const t = flattenInstances(batch, this.numClasses);
    const p = t.polygons;
    const extents = flatExtents(batch.extents, batch);
    const r = await this.handle.train(batch.images, batch.batchSize, batch.height, batch.width, t.counts, t.boxes, t.classes, t.masks, options.lr, p?.counts, p?.lengths, p?.coords, extents);
    return { ...r, step: Number(r.step) };
  }

  /**
   * Detections (boxes, scores, classes, masks) of each image, its extent (`extents[i]`, the
   * [height, width] it fills at the top left of its input; default the whole S x S input)
   * scaled to its `outputSizes[i]` ([height, width]; default the input size), as detectron2's
   * `detector_postprocess`. Each axis is scaled on its own: for an image resized with its aspect
   * kept and padded, give its resized size as the extent and ask for its original size, or
   * (DET's inputs, without extents) ask for the square max(h, w) x max(h, w) and cut the masks
   * to h x w (`evaluateDetection` does one or the other).
   */
  async detect(batch: ImageBatch, options: { outputSizes?: [number, number][]; extents?: [number, number][] } = {}): Promise<ImageDetections[]> {
    checkImageBatch(batch);
    const sizes = options.outputSizes;
    if (sizes !== undefined && (sizes.length !== batch.batchSize || !sizes.every(([h, w]) => Number.isInteger(h) && Number.isInteger(w) && h > 0 && w > 0))) {
      throw new RangeError(`outputSizes must hold a positive integer [height, width] per image (${batch.batchSize})`);
    }
    const extents = flatExtents(options.extents, batch);
    const r = await this.handle.detect(batch.images, batch.batchSize, batch.height, batch.width, sizes ? Uint32Array.from(sizes.flat()) : undefined, extents);
    const out: ImageDetections[] = [];
    let at = 0;
    let maskAt = 0;
    r.counts.forEach((count, i) => {
      const [height, width] = sizes ? sizes[i]! : [batch.height, batch.width];
      const image: ImageDetections = { boxes: [], scores: [], classes: [], masks: [], height, width };
      for (let n = 0; n < count; n++, at++) {
        image.boxes.push([r.boxes[4 * at]!, r.boxes[4 * at + 1]!, r.boxes[4 * at + 2]!, r.boxes[4 * at + 3]!]);
        image.scores.push(r.scores[at]!);
        image.classes.push(r.classes[at]!);
        image.masks.push(r.masks.subarray(maskAt, maskAt + height * width));
        maskAt += height * width;
      }
      out.push(image);
    });
    return out;
  }
}
