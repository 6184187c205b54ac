/**
 * Image transforms of the pretraining pipeline, built on sharp.
 *
 * Both transforms write uint8 RGB pixels in HWC order straight into a
 * caller-provided buffer. They do not normalize: the native training step
 * applies the ImageNet mean/std itself.
 */
import { readFile } from 'node:fs/promises';
import sharp from 'sharp';
import { decodeBmp, isBmp } from './bmp.js';
import type { ImageSource } from './datasets.js';
import type { Rng } from './rng.js';
import { readRange } from './tar.js';

export interface CropBox {
  left: number;
  top: number;
  width: number;
  height: number;
}

/** Defaults of the ConvMAE / MAE pretraining augmentation. */
export const DEFAULT_SCALE: readonly [number, number] = [0.2, 1.0];
export const DEFAULT_RATIO: readonly [number, number] = [3 / 4, 4 / 3];
export const DEFAULT_HFLIP_PROB = 0.5;

/** Python 3 `round()`: halves go to the nearest even integer. */
export function roundHalfEven(x: number): number {
  if (Math.abs(x % 1) === 0.5) return 2 * Math.round(x / 2);
  return Math.round(x);
}

function checkDims(width: number, height: number): void {
  if (!Number.isInteger(width) || !Number.isInteger(height) || width <= 0 || height <= 0) {
    throw new RangeError(`image dimensions must be positive integers, got ${width}x${height}`);
  }
}

function checkRange(name: string, range: readonly [number, number]): void {
  if (!(range[0] > 0) || !(range[1] >= range[0]) || !Number.isFinite(range[1])) {
    throw new RangeError(`${name} must be [low, high] with 0 < low <= high, got [${range[0]}, ${range[1]}]`);
  }
}

/**
 * torchvision's `RandomResizedCrop.get_params`: up to 10 attempts at a box of
 * area `U(scale) * W * H` and aspect ratio log-uniform in `ratio`, placed
 * uniformly at random; otherwise a center crop with the aspect ratio clamped
 * to `ratio`. Randomness is consumed in torchvision's order (scale, log ratio,
 * top, left) and rounding is Python's (half to even).
 */
export function sampleRandomResizedCrop(
  width: number,
  height: number,
  scale: readonly [number, number],
  ratio: readonly [number, number],
  rng: Rng,
): CropBox {
  checkDims(width, height);
  checkRange('scale', scale);
  checkRange('ratio', ratio);
  const area = width * height;
  const logLow = Math.log(ratio[0]);
  const logHigh = Math.log(ratio[1]);
  for (let attempt = 0; attempt < 10; attempt++) {
    const targetArea = area * (scale[0] + rng() * (scale[1] - scale[0]));
    const aspect = Math.exp(logLow + rng() * (logHigh - logLow));
    const w = roundHalfEven(Math.sqrt(targetArea * aspect));
    const h = roundHalfEven(Math.sqrt(targetArea / aspect));
    if (w > 0 && w <= width && h > 0 && h <= height) {
      const top = Math.floor(rng() * (height - h + 1));
      const left = Math.floor(rng() * (width - w + 1));
      return { left, top, width: w, height: h };
    }
  }
  // Fallback: central crop.
  const inRatio = width / height;
  let w: number;
  let h: number;
  if (inRatio < Math.min(ratio[0], ratio[1])) {
    w = width;
    h = roundHalfEven(w / Math.min(ratio[0], ratio[1]));
  } else if (inRatio > Math.max(ratio[0], ratio[1])) {
    h = height;
    w = roundHalfEven(h * Math.max(ratio[0], ratio[1]));
  } else {
    w = width;
    h = height;
  }
  // Extreme ratios can round a side to 0; keep the box non-empty (torchvision
  // would fail later in that case).
  w = Math.max(1, Math.min(w, width));
  h = Math.max(1, Math.min(h, height));
  return { left: Math.floor((width - w) / 2), top: Math.floor((height - h) / 2), width: w, height: h };
}

export interface PretrainTransformOptions {
  /** Range of the crop area as a fraction of the image area. Default [0.2, 1]. */
  scale?: readonly [number, number];
  /** Range of the crop aspect ratio (width / height). Default [3/4, 4/3]. */
  ratio?: readonly [number, number];
  /** Probability of a horizontal flip. Default 0.5. */
  hflipProb?: number;
  /**
   * Resample large crops of JPEG files through libjpeg's DCT scaling (libvips
   * shrink-on-load): the image is decoded at 1/2, 1/4 or 1/8 scale and
   * resized straight to the output scale, instead of being decoded in full.
   * It only applies to JPEG files on the sharp path, to crops of at least
   * 2x the output size on both sides for which sharp would decode at a
   * reduced scale (in practice about 3x; see `shrinkOnLoadPlan`); the crop
   * box and flip are drawn exactly as without it. Default false: with it the
   * pixels are no longer resampled from the fully decoded image as
   * torchvision's are (mean difference around a grey level, the box within
   * half an output pixel of its place).
   */
  shrinkOnLoad?: boolean;
}

export interface PretrainParams {
  crop: CropBox;
  flip: boolean;
}

/** Draws the augmentation of one sample: crop box first, then the flip. */
export function samplePretrainParams(
  width: number,
  height: number,
  rng: Rng,
  options: PretrainTransformOptions = {},
): PretrainParams {
  const crop = sampleRandomResizedCrop(width, height, options.scale ?? DEFAULT_SCALE, options.ratio ?? DEFAULT_RATIO, rng);
  const flip = rng() < (options.hflipProb ?? DEFAULT_HFLIP_PROB);
  return { crop, flip };
}

/** An image opened for transforming: a sharp pipeline and its dimensions. */
export interface OpenedImage {
  image: sharp.Sharp;
  width: number;
  height: number;
  /** Single-channel 8-bit source: processed as one band, replicated to RGB at the end. */
  grey: boolean;
  /** sharp's name of the encoded format ('jpeg', 'png', ...), 'bmp', or 'raw' for in-memory pixels. */
  format: string;
}

/** The encoded bytes of a file source: the whole file, or its byte range. */
export async function readSourceBytes(source: ImageSource & { kind: 'file' }): Promise<Uint8Array> {
  if (source.offset === undefined) return readFile(source.path);
  return readRange(source.path, source.offset, source.length ?? 0);
}

/**
 * Opens an image source with sharp. Files are read into memory once (pass
 * `bytes` when they already are); BMP (which sharp's libvips cannot read) is
 * decoded in JS. No EXIF auto-orientation is applied, matching
 * PIL/torchvision.
 */
export async function openImage(source: ImageSource, bytes?: Uint8Array): Promise<OpenedImage> {
  if (source.kind === 'raw') {
    const { pixels, width, height, channels } = source;
    checkDims(width, height);
    if (channels !== 1 && channels !== 3) throw new RangeError(`raw images need 1 or 3 channels, got ${channels}`);
    if (pixels.length < width * height * channels) {
      throw new RangeError(`raw image has ${pixels.length} bytes, expected ${width * height * channels}`);
    }
    return { image: sharp(pixels, { raw: { width, height, channels } }), width, height, grey: channels === 1, format: 'raw' };
  }
  const data = bytes ?? (await readSourceBytes(source));
  if (data.length === 0) throw new Error('file is empty');
  if (isBmp(data)) {
    const bmp = decodeBmp(data);
    return {
      image: sharp(bmp.pixels, { raw: { width: bmp.width, height: bmp.height, channels: 3 } }),
      width: bmp.width,
      height: bmp.height,
      grey: false,
      format: 'bmp',
    };
  }
  const image = sharp(data, { failOn: 'warning' });
  const meta = await image.metadata();
  if (!meta.width || !meta.height) throw new Error(`could not read the image dimensions (format ${meta.format ?? 'unknown'})`);
  // For multi-page images sharp decodes the first page.
  const height = meta.pageHeight && meta.pages && meta.pages > 1 ? meta.pageHeight : meta.height;
  const grey = meta.space === 'b-w' && meta.depth === 'uchar' && (meta.channels === 1 || meta.channels === 2);
  return { image, width: meta.width, height, grey, format: meta.format ?? 'unknown' };
}

/**
 * Runs the pipeline to raw 8-bit pixels and copies them to `out` at `offset`
 * as exactly 3 channels (grey replicated, alpha dropped).
 */
async function writeRgb(image: sharp.Sharp, grey: boolean, size: number, out: Uint8Array, offset: number): Promise<void> {
  const { data, info } = await image
    .removeAlpha()
    .toColourspace(grey ? 'b-w' : 'srgb')
    .raw({ depth: 'uchar' })
    .toBuffer({ resolveWithObject: true });
  const pixels = size * size;
  if (info.width !== size || info.height !== size || data.length < pixels * info.channels) {
    throw new Error(`internal: transform produced ${info.width}x${info.height}x${info.channels}, expected ${size}x${size}`);
  }
  const c = info.channels;
  if (c === 3) {
    out.set(data.subarray(0, pixels * 3), offset);
    return;
  }
  for (let i = 0, o = offset; i < pixels; i++, o += 3) {
    const p = i * c;
    if (c < 3) {
      const v = data[p];
      out[o] = v;
      out[o + 1] = v;
      out[o + 2] = v;
    } else {
      out[o] = data[p];
      out[o + 1] = data[p + 1];
      out[o + 2] = data[p + 2];
    }
  }
}

function checkOutput(size: number, out: Uint8Array, offset: number): void {
  if (!Number.isInteger(size) || size <= 0) throw new RangeError(`size must be a positive integer, got ${size}`);
  if (!Number.isInteger(offset) || offset < 0 || offset + size * size * 3 > out.length) {
    throw new RangeError(`output buffer of ${out.length} bytes cannot hold a ${size}x${size}x3 image at offset ${offset}`);
  }
}

export interface PretrainResult extends PretrainParams {
  sourceWidth: number;
  sourceHeight: number;
}

/**
 * Pretraining augmentation: RandomResizedCrop(size, scale, ratio, bicubic)
 * followed by a horizontal flip with probability `hflipProb`. Writes
 * size*size*3 uint8 RGB (HWC) bytes to `out` starting at `offset`.
 */
export async function pretrainTransform(
  source: ImageSource,
  size: number,
  rng: Rng,
  out: Uint8Array,
  offset: number,
  options: PretrainTransformOptions = {},
): Promise<PretrainResult> {
  checkOutput(size, out, offset);
  const opened = await openImage(source);
  const params = samplePretrainParams(opened.width, opened.height, rng, options);
  await applyPretrainParams(opened, params, size, out, offset, options);
  return { ...params, sourceWidth: opened.width, sourceHeight: opened.height };
}

/**
 * The libjpeg scale (1, 2, 4 or 8) that sharp 0.34 decodes a JPEG at when it
 * is resized by `shrink` (the smaller of the two axes' factors) with
 * `fastShrinkOnLoad` (sharp's src/pipeline.cc): the largest of 8, 4, 2 not
 * above `shrink`, halved when `shrink` truncates to exactly that factor
 * (sharp's guard against libjpeg rounding the scaled size).
 */
export function sharpJpegShrinkOnLoad(shrink: number): number {
  let factor = shrink >= 8 ? 8 : shrink >= 4 ? 4 : shrink >= 2 ? 2 : 1;
  if (factor > 1 && Math.floor(shrink) === factor) factor /= 2;
  return factor;
}

/** How a crop is resampled with JPEG shrink-on-load. */
export interface ShrinkOnLoadPlan {
  /** The whole image is resized to this size (one cubic resample from the DCT-scaled decode)... */
  resizeWidth: number;
  resizeHeight: number;
  /** ...and this size x size box of the resized image is the output. */
  crop: CropBox;
  /** The libjpeg scale denominator sharp decodes at (2, 4 or 8). */
  jpegShrink: number;
}

/**
 * The shrink-on-load plan for resampling `crop` of a width x height JPEG to
 * size x size, or undefined when shrink-on-load would not decode at a
 * reduced scale (a crop under 2x the output size on a side, or, by sharp's
 * rule, under about 3x).
 *
 * sharp only shrinks on load inside a resize, and only when the resize has
 * no pre-resize extract; and it never decodes at exactly the resize factor
 * (see `sharpJpegShrinkOnLoad`), so a decode at 1/f followed by an exact
 * extract of the scaled box is not expressible: the result would be decoded
 * at 1/(f/2), or not reduced at all for f = 2, and resampled twice. Instead
 * the whole image is resized to the scale that maps the crop box onto
 * size x size (one resample; libvips computes on demand, so only for the
 * extracted part) and a size x size box in whole output pixels is cut from
 * it. Its edges fall within about half an output pixel of the crop's edges
 * (see `fitAxis`): harmless for augmentation, whose box position is random
 * anyway, but the pixels are not those of the full-decode path, which is
 * why the option is off by default.
 */
export function shrinkOnLoadPlan(width: number, height: number, crop: CropBox, size: number): ShrinkOnLoadPlan | undefined {
  // Below 2x no DCT scale is possible (sharp needs a factor of at least 2).
  if (crop.width < 2 * size || crop.height < 2 * size) return undefined;
  const x = fitAxis(width, crop.left, crop.width, size);
  const y = fitAxis(height, crop.top, crop.height, size);
  // What sharp will decide from these dimensions: with no reduced decode the
  // whole-image resize would cost more than the full-decode path.
  const jpegShrink = sharpJpegShrinkOnLoad(Math.min(width / x.resized, height / y.resized));
  if (jpegShrink === 1) return undefined;
  return { resizeWidth: x.resized, resizeHeight: y.resized, crop: { left: x.offset, top: y.offset, width: size, height: size }, jpegShrink };
}

/**
 * One axis of a shrink-on-load plan: the length the image axis is resized
 * to and the offset of the `size` output pixels in it, so that the output
 * covers [start, start + extent) of the source as closely as whole pixels
 * allow. The ideal length, length * size / extent, is rarely an integer and
 * the box's offset in it rarely too; rounding both independently can put
 * a box edge almost a whole output pixel off, while keeping, of a few
 * lengths around the ideal one, the one whose box edges land nearest to the
 * crop's edges kept them within half a pixel (0.35 median) on the large
 * enough crops of 2000 random draws on a 4000x3000 image, 64 and 224 outputs.
 */
function fitAxis(length: number, start: number, extent: number, size: number): { resized: number; offset: number } {
  const ideal = (length * size) / extent;
  let best = { resized: 0, offset: 0, error: Infinity };
  for (let resized = Math.round(ideal) - 3; resized <= Math.round(ideal) + 3; resized++) {
    if (resized < size) continue;
    const scale = resized / length;
    const offset = Math.min(Math.max(Math.round(start * scale), 0), resized - size);
    // In output pixels: how far the box's two edges fall from the crop's.
    const error = Math.max(Math.abs(offset - start * scale), Math.abs(offset + size - (start + extent) * scale));
    if (error < best.error) best = { resized, offset, error };
  }
  return { resized: best.resized, offset: best.offset };
}

/**
 * The sharp half of the pretraining transform, for augmentation parameters
 * drawn already: crop, bicubic resize to size x size, optional flip. Of the
 * options only `shrinkOnLoad` matters here.
 */
export async function applyPretrainParams(
  opened: OpenedImage,
  params: PretrainParams,
  size: number,
  out: Uint8Array,
  offset: number,
  options: Pick<PretrainTransformOptions, 'shrinkOnLoad'> = {},
): Promise<void> {
  checkOutput(size, out, offset);
  const { crop } = params;
  if (crop.left < 0 || crop.top < 0 || crop.left + crop.width > opened.width || crop.top + crop.height > opened.height) {
    throw new Error(`crop ${crop.width}x${crop.height} at (${crop.left}, ${crop.top}) is outside the ${opened.width}x${opened.height} image`);
  }
  const plan = options.shrinkOnLoad && opened.format === 'jpeg' ? shrinkOnLoadPlan(opened.width, opened.height, crop, size) : undefined;
  let pipeline: sharp.Sharp;
  if (plan) {
    // Resize before extract, so that sharp may decode the JPEG at 1/jpegShrink.
    // sharp mirrors (flop) before a post-resize extract, whatever the call
    // order, so a flipped output is cut from the mirrored position.
    const box = params.flip ? { ...plan.crop, left: plan.resizeWidth - plan.crop.left - plan.crop.width } : plan.crop;
    pipeline = opened.image
      .resize(plan.resizeWidth, plan.resizeHeight, { kernel: 'cubic', fit: 'fill', fastShrinkOnLoad: true })
      .extract(box);
  } else {
    // Pre-resize extract: sharp decodes the full image (no shrink-on-load), so
    // the result is exactly that of the decoded pixels.
    pipeline = opened.image.extract(crop).resize(size, size, { kernel: 'cubic', fit: 'fill' });
  }
  if (params.flip) pipeline = pipeline.flop();
  await writeRgb(pipeline, opened.grey, size, out, offset);
}

/** Resized dimensions and crop box of the eval transform for a W x H image. */
export function evalGeometry(width: number, height: number, size: number): { resizeWidth: number; resizeHeight: number; crop: CropBox } {
  checkDims(width, height);
  // torchvision Resize(int): the shorter side becomes `short`, the longer one
  // int(short * long / shorter).
  const short = roundHalfEven((size * 256) / 224);
  let resizeWidth: number;
  let resizeHeight: number;
  if (width <= height) {
    resizeWidth = short;
    resizeHeight = Math.floor((short * height) / width);
  } else {
    resizeHeight = short;
    resizeWidth = Math.floor((short * width) / height);
  }
  // torchvision CenterCrop: int(round((H - size) / 2)).
  const top = roundHalfEven((resizeHeight - size) / 2);
  const left = roundHalfEven((resizeWidth - size) / 2);
  return { resizeWidth, resizeHeight, crop: { left, top, width: size, height: size } };
}

/**
 * Evaluation transform: resize the shorter side to round(size * 256 / 224)
 * (bicubic), then center crop size x size. Same output convention as
 * `pretrainTransform`.
 */
export async function evalTransform(source: ImageSource, size: number, out: Uint8Array, offset: number): Promise<void> {
  checkOutput(size, out, offset);
  const { image, width, height, grey } = await openImage(source);
  const g = evalGeometry(width, height, size);
  // The full-frame extract before the resize turns off JPEG/WebP
  // shrink-on-load, so results equal those of the fully decoded image.
  const pipeline = image
    .extract({ left: 0, top: 0, width, height })
    .resize(g.resizeWidth, g.resizeHeight, { kernel: 'cubic', fit: 'fill' })
    .extract(g.crop);
  await writeRgb(pipeline, grey, size, out, offset);
}
