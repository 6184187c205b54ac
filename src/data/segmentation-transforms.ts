/**
 * The official SEG data pipeline (mmseg 0.11 as `configs/_base_/datasets/ade20k.py` sets it),
 * for an image and its label map at their original size:
 *
 * - train: Resize to the scale (4S, S) times a ratio drawn from [0.5, 2] keeping the aspect
 *   (labels by cv2's INTER_NEAREST exactly; the image bilinear, within 1 of cv2's fixed-point
 *   INTER_LINEAR), RandomCrop S x S retried up to 10 times until no class covers 75% or more of
 *   the crop's labelled pixels, flip with p 0.5, PhotoMetricDistortion, Pad to S x S (image 0,
 *   labels 255). S is the model's img_size (512).
 * - test: Resize to (4S, S) keeping the aspect; the model then slides S x S windows over it
 *   (stride 2S/3, 341 for 512) and the logits are resized back to the original size.
 *
 * PhotoMetricDistortion's saturation and hue steps convert through HSV in floating point, where
 * mmcv goes through cv2's 8-bit HSV (hue in [0, 180)); its brightness and contrast steps are
 * exact (in float32, as numpy computes them; test/oracles.test.ts).
 */
import { randInt, uniform, type Rng } from './rng.js';
import type { SegmentationSample } from './segmentation.js';

const IGNORE = 255;
/** RandomCrop's cat_max_ratio and retries. */
const CAT_MAX_RATIO = 0.75;
const CROP_TRIES = 10;

/** mmcv's rescale_size: the factor that fits (w, h) inside `scale` = (long, short) edges. */
export function rescaledSize(width: number, height: number, long: number, short: number): [number, number] {
  const factor = Math.min(long / Math.max(width, height), short / Math.min(width, height));
  return [Math.floor(width * factor + 0.5), Math.floor(height * factor + 0.5)];
}

/**
 * cv2.resize INTER_LINEAR of RGB uint8: half-pixel centres, source clamped at the edges, rounded.
 * In floating point: cv2's 8-bit path rounds its weights to 11 bits, so a value may differ from
 * cv2's by 1 (test/oracles.test.ts).
 */
export function resizeBilinearRgb(src: Uint8Array, width: number, height: number, outWidth: number, outHeight: number): Uint8Array {
  const out = new Uint8Array(outWidth * outHeight * 3);
  const axis = (inp: number, outp: number) => {
    const i0 = new Int32Array(outp);
    const i1 = new Int32Array(outp);
    const t = new Float64Array(outp);
    const scale = inp / outp;
    for (let o = 0; o < outp; o++) {
      let s = (o + 0.5) * scale - 0.5;
      if (s < 0) s = 0;
      let lo = Math.floor(s);
      if (lo > inp - 1) lo = inp - 1;
      i0[o] = lo;
      i1[o] = Math.min(lo + 1, inp - 1);
      t[o] = s - lo;
    }
    return { i0, i1, t };
  };
  const xs = axis(width, outWidth);
  const ys = axis(height, outHeight);
  for (let y = 0; y < outHeight; y++) {
    const r0 = ys.i0[y]! * width;
    const r1 = ys.i1[y]! * width;
    const ty = ys.t[y]!;
    for (let x = 0; x < outWidth; x++) {
      const c0 = xs.i0[x]!;
      const c1 = xs.i1[x]!;
      const tx = xs.t[x]!;
      for (let c = 0; c < 3; c++) {
        const top = src[(r0 + c0) * 3 + c]! * (1 - tx) + src[(r0 + c1) * 3 + c]! * tx;
        const bottom = src[(r1 + c0) * 3 + c]! * (1 - tx) + src[(r1 + c1) * 3 + c]! * tx;
        out[(y * outWidth + x) * 3 + c] = Math.round(top * (1 - ty) + bottom * ty);
      }
    }
  }
  return out;
}

/**
 * cv2.resize INTER_NEAREST of a label map: source index floor(o * (1 / (out / in))), computed as
 * cv2 computes it (the reciprocal of the scale, not in / out, so that where o * in / out is an
 * integer the index can land one below it, as cv2's does).
 */
export function resizeNearest(src: Uint8Array, width: number, height: number, outWidth: number, outHeight: number): Uint8Array {
  const out = new Uint8Array(outWidth * outHeight);
  const inverseX = 1 / (outWidth / width);
  const inverseY = 1 / (outHeight / height);
  for (let y = 0; y < outHeight; y++) {
    const sy = Math.min(Math.floor(y * inverseY), height - 1);
    for (let x = 0; x < outWidth; x++) {
      out[y * outWidth + x] = src[sy * width + Math.min(Math.floor(x * inverseX), width - 1)]!;
    }
  }
  return out;
}

/** mmseg RandomCrop's acceptance test: more than one labelled class, none reaching cat_max_ratio. */
function balancedEnough(labels: Uint8Array, width: number, top: number, left: number, h: number, w: number): boolean {
  const counts = new Map<number, number>();
  for (let y = top; y < top + h; y++) {
    for (let x = left; x < left + w; x++) {
      const v = labels[y * width + x]!;
      if (v !== IGNORE) counts.set(v, (counts.get(v) ?? 0) + 1);
    }
  }
  if (counts.size <= 1) return false;
  let total = 0;
  let max = 0;
  for (const c of counts.values()) {
    total += c;
    max = Math.max(max, c);
  }
  return max / total < CAT_MAX_RATIO;
}

/**
 * `convert` of PhotoMetricDistortion, in place: x * alpha + beta, clipped to [0, 255], truncated
 * to uint8. In float32, as numpy computes `img.astype(np.float32) * alpha + beta` (the Python
 * floats taken as float32), since the truncation can fall either side of an integer.
 */
export function photometricConvert(pixels: Uint8Array, alpha: number, beta: number): void {
  const [a, b] = [Math.fround(alpha), Math.fround(beta)];
  for (let i = 0; i < pixels.length; i++) pixels[i] = Math.trunc(Math.min(255, Math.max(0, Math.fround(Math.fround(pixels[i]! * a) + b))));
}

/** RGB (0-255) to HSV with hue in [0, 360), saturation and value in [0, 1]. */
function rgbToHsv(r: number, g: number, b: number): [number, number, number] {
  const max = Math.max(r, g, b);
  const min = Math.min(r, g, b);
  const d = max - min;
  let h = 0;
  if (d > 0) {
    if (max === r) h = (60 * (g - b)) / d;
    else if (max === g) h = 120 + (60 * (b - r)) / d;
    else h = 240 + (60 * (r - g)) / d;
  }
  if (h < 0) h += 360;
  return [h, max > 0 ? d / max : 0, max / 255];
}

function hsvToRgb(h: number, s: number, v: number): [number, number, number] {
  const c = v * s;
  const hp = (((h % 360) + 360) % 360) / 60;
  const x = c * (1 - Math.abs((hp % 2) - 1));
  const [r, g, b] = hp < 1 ? [c, x, 0] : hp < 2 ? [x, c, 0] : hp < 3 ? [0, c, x] : hp < 4 ? [0, x, c] : hp < 5 ? [x, 0, c] : [c, 0, x];
  const m = v - c;
  return [Math.round((r + m) * 255), Math.round((g + m) * 255), Math.round((b + m) * 255)];
}

/** Scales saturation by `alpha` (clipped) and shifts hue by `hueShift` degrees, per pixel. */
function adjustHsv(pixels: Uint8Array, alpha: number, hueShift: number): void {
  for (let i = 0; i < pixels.length; i += 3) {
    const [h, s, v] = rgbToHsv(pixels[i]!, pixels[i + 1]!, pixels[i + 2]!);
    const [r, g, b] = hsvToRgb(h + hueShift, Math.min(1, s * alpha), v);
    pixels[i] = r;
    pixels[i + 1] = g;
    pixels[i + 2] = b;
  }
}

/**
 * mmseg 0.11's PhotoMetricDistortion on RGB uint8, in place: brightness (delta 32), then
 * contrast (0.5-1.5) first or last, saturation (0.5-1.5) and hue (18 of cv2's 180 steps, so
 * 36 degrees); each applied with probability 1/2.
 */
export function photometricDistortion(pixels: Uint8Array, rng: Rng): void {
  const coin = () => randInt(rng, 0, 1) === 1;
  if (coin()) photometricConvert(pixels, 1, uniform(rng, -32, 32));
  const contrastFirst = coin();
  const contrast = () => {
    if (coin()) photometricConvert(pixels, uniform(rng, 0.5, 1.5), 0);
  };
  if (contrastFirst) contrast();
  if (coin()) adjustHsv(pixels, uniform(rng, 0.5, 1.5), 0);
  if (coin()) adjustHsv(pixels, 1, 2 * randInt(rng, -18, 18));
  if (!contrastFirst) contrast();
}

/** The train transform of the module comment: an S x S image and label map from a sample. */
export function segmentationTrainTransform(sample: SegmentationSample, size: number, rng: Rng): SegmentationSample {
  const ratio = uniform(rng, 0.5, 2.0);
  const [w, h] = rescaledSize(sample.width, sample.height, Math.trunc(4 * size * ratio), Math.trunc(size * ratio));
  const image = resizeBilinearRgb(sample.image, sample.width, sample.height, w, h);
  const labels = resizeNearest(sample.labels, sample.width, sample.height, w, h);
  const ch = Math.min(size, h);
  const cw = Math.min(size, w);
  // As mmseg: a crop, then up to 10 checks each followed by a new draw on failure (so the 11th
  // draw is kept unchecked).
  let top = randInt(rng, 0, h - ch);
  let left = randInt(rng, 0, w - cw);
  for (let attempt = 0; attempt < CROP_TRIES; attempt++) {
    if (balancedEnough(labels, w, top, left, ch, cw)) break;
    top = randInt(rng, 0, h - ch);
    left = randInt(rng, 0, w - cw);
  }
  const flip = uniform(rng, 0, 1) < 0.5;
  const outImage = new Uint8Array(size * size * 3);
  const outLabels = new Uint8Array(size * size).fill(IGNORE);
  for (let y = 0; y < ch; y++) {
    for (let x = 0; x < cw; x++) {
      const sx = left + (flip ? cw - 1 - x : x);
      const s = (top + y) * w + sx;
      const d = y * size + x;
      outLabels[d] = labels[s]!;
      outImage[d * 3] = image[s * 3]!;
      outImage[d * 3 + 1] = image[s * 3 + 1]!;
      outImage[d * 3 + 2] = image[s * 3 + 2]!;
    }
  }
  // The distortion runs before the pad in mmseg, so padded pixels stay 0.
  const cropped = outImage.subarray(0, size * size * 3);
  if (ch === size && cw === size) photometricDistortion(cropped, rng);
  else {
    const region = new Uint8Array(ch * cw * 3);
    for (let y = 0; y < ch; y++) region.set(outImage.subarray(y * size * 3, y * size * 3 + cw * 3), y * cw * 3);
    photometricDistortion(region, rng);
    for (let y = 0; y < ch; y++) outImage.set(region.subarray(y * cw * 3, (y + 1) * cw * 3), y * size * 3);
  }
  return { image: outImage, labels: outLabels, width: size, height: size };
}

/** The test resize of the module comment: the image at (4S, S) keeping the aspect; labels untouched. */
export function segmentationTestResize(sample: SegmentationSample, size: number): { image: Uint8Array; width: number; height: number } {
  const [w, h] = rescaledSize(sample.width, sample.height, 4 * size, size);
  return { image: resizeBilinearRgb(sample.image, sample.width, sample.height, w, h), width: w, height: h };
}
