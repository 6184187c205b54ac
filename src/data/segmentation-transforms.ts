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
 * PhotoMetricDistortion is mmcv's to the byte: brightness and contrast in float32, as numpy
 * computes them, saturation and hue in cv2's 8-bit HSV as opencv-python's AVX2 build converts
 * (see `editInCvHsv`; test/oracles.test.ts).
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

/**
 * cv2's 8-bit HSV (hue in [0, 180), saturation and value in [0, 255]), which mmseg's
 * PhotoMetricDistortion edits through (mmcv.bgr2hsv / hsv2bgr), reproduced to the byte
 * (test/oracles.test.ts against opencv-python). RGB to HSV is fixed point with two division
 * tables (12 fractional bits, rounded). HSV to RGB is float32 and differs between OpenCV's two
 * code paths: its vector loop (blocks of 32 pixels on x86-64 with AVX2, 4 vectors of 8 lanes)
 * truncates x * 255 to uint8, while the scalar loop for the rest of each row rounds it (half to
 * even); both evaluate 1 - s * h as one fused
 * multiply-add (GCC contracts it where FMA is on). Which pixels take which path depends on the
 * row width and on the CPU's vector width: this follows the AVX2 build, as opencv-python runs
 * on an x86-64 server; cv2 itself gives other bytes on a CPU whose dispatch differs.
 */
const CV_HSV_SHIFT = 12;
const CV_HSV_HALF = 1 << (CV_HSV_SHIFT - 1);
/** round((255 << 12) / v) and round((180 << 12) / (6 * diff)); index 0 holds 0. (No ties occur.) */
const CV_SDIV = Int32Array.from({ length: 256 }, (_, i) => (i === 0 ? 0 : Math.round((255 << CV_HSV_SHIFT) / i)));
const CV_HDIV180 = Int32Array.from({ length: 256 }, (_, i) => (i === 0 ? 0 : Math.round((180 << CV_HSV_SHIFT) / (6 * i))));
/** Pixels per block of cv2's vector HSV-to-RGB loop (AVX2); the rest of a row goes through its scalar loop. */
const CV_HSV2RGB_BLOCK = 32;
/** The tab index cv2 takes for (b, g, r) in each sector of the hue circle. */
const CV_SECTOR_TABS = [
  [1, 3, 0],
  [1, 0, 2],
  [3, 0, 1],
  [0, 2, 1],
  [0, 1, 3],
  [2, 1, 0],
];

/** cv2.cvtColor(RGB2HSV) of one pixel into `hsv` at `o` (the same bytes for BGR2HSV of the pixel's BGR). */
function cvRgbToHsv(r: number, g: number, b: number, hsv: Uint8Array, o: number): void {
  const v = Math.max(r, g, b);
  const diff = v - Math.min(r, g, b);
  const vr = v === r ? -1 : 0;
  const vg = v === g ? -1 : 0;
  const s = (diff * CV_SDIV[v]! + CV_HSV_HALF) >> CV_HSV_SHIFT;
  let h = (vr & (g - b)) + (~vr & ((vg & (b - r + 2 * diff)) + (~vg & (r - g + 4 * diff))));
  h = (h * CV_HDIV180[diff]! + CV_HSV_HALF) >> CV_HSV_SHIFT;
  hsv[o] = h < 0 ? h + 180 : h;
  hsv[o + 1] = s;
  hsv[o + 2] = v;
}

/** 1 - a * b in float32 with one rounding, as a fused multiply-add gives it (a * b of two float32 is exact in a double). */
const fusedOneMinus = (a: number, b: number) => Math.fround(1 - a * b);

/** cvRound: to nearest, ties to even. */
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** cv2.cvtColor(HSV2RGB) of one pixel into `rgb` at `o`, by cv2's vector loop (`vector`) or its scalar loop. */
function cvHsvToRgb(h: number, s8: number, v8: number, vector: boolean, rgb: Uint8Array, o: number): void {
  const third = Math.fround(1 / 255);
  const s = Math.fround(s8 * third);
  const v = Math.fround(v8 * third);
  const scaled = Math.fround(h * Math.fround(6 / 180));
  // The vector loop truncates (hue < 180, so never negative) and reduces the sector modulo 6 in
  // float32; the scalar loop floors: the same integers here. (The scalar loop's shortcut for a
  // grey pixel, saturation 0, gives what every tab below gives then: v.)
  const whole = Math.trunc(scaled);
  const frac = Math.fround(scaled - whole);
  const tabs = [v, Math.fround(v * Math.fround(1 - s)), Math.fround(v * fusedOneMinus(s, frac)), Math.fround(v * fusedOneMinus(s, Math.fround(1 - frac)))];
  const [bi, gi, ri] = CV_SECTOR_TABS[whole % 6]!;
  const [b, g, r] = [tabs[bi!]!, tabs[gi!]!, tabs[ri!]!];
  const toByte = (x: number) => Math.min(255, Math.max(0, vector ? Math.trunc(Math.fround(x * 255)) : roundHalfEven(Math.fround(x * 255))));
  rgb[o] = toByte(r);
  rgb[o + 1] = toByte(g);
  rgb[o + 2] = toByte(b);
}

/**
 * `edit` applied to the image's cv2 HSV bytes (hue, saturation, value per pixel), in place:
 * mmcv.bgr2hsv, the edit, mmcv.hsv2bgr, row by row as cv2 converts (see CV_HSV2RGB_BLOCK).
 */
function editInCvHsv(pixels: Uint8Array, width: number, edit: (hsv: Uint8Array) => void): void {
  const hsv = new Uint8Array(pixels.length);
  for (let i = 0; i < pixels.length; i += 3) cvRgbToHsv(pixels[i]!, pixels[i + 1]!, pixels[i + 2]!, hsv, i);
  edit(hsv);
  const vectorEnd = width - (width % CV_HSV2RGB_BLOCK);
  for (let p = 0; p < pixels.length / 3; p++) cvHsvToRgb(hsv[3 * p]!, hsv[3 * p + 1]!, hsv[3 * p + 2]!, p % width < vectorEnd, pixels, 3 * p);
}

/** mmseg's saturation step: S = convert(S, alpha) (float32, clipped, truncated) in cv2's HSV. */
export function photometricSaturation(pixels: Uint8Array, width: number, alpha: number): void {
  const a = Math.fround(alpha);
  editInCvHsv(pixels, width, (hsv) => {
    for (let i = 1; i < hsv.length; i += 3) hsv[i] = Math.trunc(Math.min(255, Math.max(0, Math.fround(hsv[i]! * a))));
  });
}

/** mmseg's hue step: H = (H + delta) mod 180 in cv2's HSV, delta in cv2's hue units (2 degrees). */
export function photometricHue(pixels: Uint8Array, width: number, delta: number): void {
  editInCvHsv(pixels, width, (hsv) => {
    for (let i = 0; i < hsv.length; i += 3) hsv[i] = (((hsv[i]! + delta) % 180) + 180) % 180;
  });
}

/**
 * mmseg 0.11's PhotoMetricDistortion on an RGB uint8 image `width` pixels wide, in place:
 * brightness (delta 32), then contrast (0.5-1.5) first or last, saturation (0.5-1.5) and hue
 * (up to 18 of cv2's 180 steps) in cv2's 8-bit HSV; each applied with probability 1/2.
 */
export function photometricDistortion(pixels: Uint8Array, width: number, rng: Rng): void {
  const coin = () => randInt(rng, 0, 1) === 1;
  if (coin()) photometricConvert(pixels, 1, uniform(rng, -32, 32));
  const contrastFirst = coin();
  const contrast = () => {
    if (coin()) photometricConvert(pixels, uniform(rng, 0.5, 1.5), 0);
  };
  if (contrastFirst) contrast();
  if (coin()) photometricSaturation(pixels, width, uniform(rng, 0.5, 1.5));
  if (coin()) photometricHue(pixels, width, randInt(rng, -18, 18));
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
  if (ch === size && cw === size) photometricDistortion(cropped, size, rng);
  else {
    const region = new Uint8Array(ch * cw * 3);
    for (let y = 0; y < ch; y++) region.set(outImage.subarray(y * size * 3, y * size * 3 + cw * 3), y * cw * 3);
    photometricDistortion(region, cw, rng);
    for (let y = 0; y < ch; y++) outImage.set(region.subarray(y * cw * 3, (y + 1) * cw * 3), y * size * 3);
  }
  return { image: outImage, labels: outLabels, width: size, height: size };
}

/** The test resize of the module comment: the image at (4S, S) keeping the aspect; labels untouched. */
export function segmentationTestResize(sample: SegmentationSample, size: number): { image: Uint8Array; width: number; height: number } {
  const [w, h] = rescaledSize(sample.width, sample.height, 4 * size, size);
  return { image: resizeBilinearRgb(sample.image, sample.width, sample.height, w, h), width: w, height: h };
}
