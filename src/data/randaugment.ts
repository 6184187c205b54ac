/**
 * RandAugment as the official fine-tune recipe configures it (timm 0.3.2
 * `rand-m9-mstd0.5-inc1`): per image, 2 ops drawn uniformly with replacement from the 15
 * "increasing" ops; each applies with probability 0.5 at a magnitude drawn from N(9, 0.5)
 * clipped to [0, 10]. Geometric ops resample bicubically and fill with the ImageNet mean
 * colour; signed magnitudes are negated with probability 0.5.
 *
 * Works in place on uint8 RGB HWC pixels (a region of the batch buffer), after the crop and
 * flip, before normalization. The ops compute what Pillow computes (ImageOps, ImageEnhance,
 * Image.transform and rotate with BICUBIC), to the byte: test/oracles.test.ts checks each
 * against Pillow itself.
 */
import { normal, type Rng } from './rng.js';

export interface RandAugmentOptions {
  /** Ops per image. Default 2. */
  numOps?: number;
  /** Mean magnitude on the 0..10 scale. Default 9. */
  magnitude?: number;
  /** Std of the per-op magnitude. Default 0.5. */
  magnitudeStd?: number;
  /** Probability of each chosen op. Default 0.5. */
  prob?: number;
}

/** The fill colour of geometric ops: round(255 * ImageNet mean). */
const FILL = [124, 116, 104];
const MAX_LEVEL = 10;

/** An image view: `size` x `size` RGB at `offset` in `px`. */
interface View {
  px: Uint8Array;
  offset: number;
  size: number;
}

type Op = (v: View, level: number, rng: Rng) => void;

const negate = (x: number, rng: Rng) => (rng() > 0.5 ? -x : x);
const clip8 = (x: number) => (x <= 0 ? 0 : x >= 255 ? 255 : x);

function applyLut(v: View, lut: (channel: number) => Uint8Array): void {
  const luts = [lut(0), lut(1), lut(2)];
  const end = v.offset + v.size * v.size * 3;
  for (let i = v.offset; i < end; i += 3) {
    v.px[i] = luts[0][v.px[i]];
    v.px[i + 1] = luts[1][v.px[i + 1]];
    v.px[i + 2] = luts[2][v.px[i + 2]];
  }
}

function histogram(v: View, channel: number): Uint32Array {
  const h = new Uint32Array(256);
  const end = v.offset + v.size * v.size * 3;
  for (let i = v.offset + channel; i < end; i += 3) h[v.px[i]]++;
  return h;
}

function lutOf(f: (i: number) => number): Uint8Array {
  const lut = new Uint8Array(256);
  for (let i = 0; i < 256; i++) lut[i] = clip8(f(i));
  return lut;
}

/** ImageOps.autocontrast (cutoff 0): stretch each channel's [min, max] to [0, 255]. */
function autoContrast(v: View): void {
  applyLut(v, (c) => {
    const h = histogram(v, c);
    let lo = 0;
    while (lo < 256 && h[lo] === 0) lo++;
    let hi = 255;
    while (hi >= 0 && h[hi] === 0) hi--;
    if (hi <= lo) return lutOf((i) => i);
    const scale = 255 / (hi - lo);
    const offset = -lo * scale;
    return lutOf((i) => Math.trunc(i * scale + offset));
  });
}

/** ImageOps.equalize: per-channel histogram equalization with PIL's step rule. */
function equalize(v: View): void {
  applyLut(v, (c) => {
    const h = histogram(v, c);
    const nonzero = Array.from(h).filter((n) => n > 0);
    if (nonzero.length <= 1) return lutOf((i) => i);
    const step = Math.floor((nonzero.reduce((a, b) => a + b, 0) - nonzero[nonzero.length - 1]) / 255);
    if (step === 0) return lutOf((i) => i);
    const lut = new Uint8Array(256);
    let n = Math.floor(step / 2);
    for (let i = 0; i < 256; i++) {
      lut[i] = clip8(Math.floor(n / step));
      n += h[i];
    }
    return lut;
  });
}

/** PIL's "L" conversion: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16. */
function luma(r: number, g: number, b: number): number {
  return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
}

/**
 * Image.blend(degenerate, image, factor) per pixel: deg + factor * (img - deg), clipped,
 * truncated; in float32, as Pillow's Blend.c computes it (its alpha is a C float), since the
 * truncation can fall either side of an integer.
 */
function blend(v: View, factor: number, degenerate: (i: number, channel: number) => number): void {
  const alpha = Math.fround(factor);
  const end = v.offset + v.size * v.size * 3;
  for (let i = v.offset; i < end; i += 3) {
    for (let c = 0; c < 3; c++) {
      const d = degenerate(i, c);
      v.px[i + c] = Math.trunc(clip8(Math.fround(d + Math.fround(alpha * (v.px[i + c] - d)))));
    }
  }
}

/** ImageEnhance.Color: blend with the greyscale image. */
function color(v: View, factor: number): void {
  const grey = new Uint8Array(v.size * v.size);
  for (let p = 0, i = v.offset; p < grey.length; p++, i += 3) grey[p] = luma(v.px[i], v.px[i + 1], v.px[i + 2]);
  blend(v, factor, (i) => grey[(i - v.offset) / 3]);
}

/** ImageEnhance.Contrast: blend with the mean grey level (rounded). */
function contrast(v: View, factor: number): void {
  let sum = 0;
  const end = v.offset + v.size * v.size * 3;
  for (let i = v.offset; i < end; i += 3) sum += luma(v.px[i], v.px[i + 1], v.px[i + 2]);
  const mean = Math.trunc(sum / (v.size * v.size) + 0.5);
  blend(v, factor, () => mean);
}

/** ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3, centre 5, total 13); the border keeps its pixels. */
function sharpness(v: View, factor: number): void {
  const { px, offset, size } = v;
  const smooth = px.slice(offset, offset + size * size * 3);
  for (let y = 1; y < size - 1; y++) {
    for (let x = 1; x < size - 1; x++) {
      for (let c = 0; c < 3; c++) {
        let acc = 0;
        for (let dy = -1; dy <= 1; dy++) {
          for (let dx = -1; dx <= 1; dx++) acc += px[offset + ((y + dy) * size + x + dx) * 3 + c] * (dx === 0 && dy === 0 ? 5 : 1);
        }
        smooth[(y * size + x) * 3 + c] = clip8(Math.round(acc / 13));
      }
    }
  }
  blend(v, factor, (i, c) => smooth[i - offset + c]);
}

/**
 * Pillow's cubic through four samples at fractional position d (its BICUBIC macro of
 * Geometry.c: the a = -1 cubic convolution, not the a = -0.5 of its resize), in its order of
 * operations.
 */
function cubicThrough(v1: number, v2: number, v3: number, v4: number, d: number): number {
  const p1 = v2;
  const p2 = -v1 + v3;
  const p3 = 2 * (v1 - v2) + v3 - v4;
  const p4 = -v1 + v2 - v3 + v4;
  return p1 + d * (p2 + d * (p3 + d * p4));
}

/**
 * Image.transform(AFFINE, (a, b, c, d, e, f), BICUBIC, fillcolor) as Pillow computes it: output
 * pixel centre (x + .5, y + .5) reads the input at (a x' + b y' + c, d x' + e y' + f); a point
 * outside [0, size) keeps the fill colour; inside, four rows of four columns around it (columns
 * clamped to the image, rows past the edge repeating the last one taken) are blended by
 * `cubicThrough`, clipped and truncated.
 */
function affine(v: View, m: readonly [number, number, number, number, number, number]): void {
  const { px, offset, size } = v;
  const src = px.slice(offset, offset + size * size * 3);
  const clamp = (i: number) => (i < 0 ? 0 : i < size ? i : size - 1);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const [xo, yo] = [x + 0.5, y + 0.5];
      let xin = m[0] * xo + m[1] * yo + m[2];
      let yin = m[3] * xo + m[4] * yo + m[5];
      const o = offset + (y * size + x) * 3;
      if (xin < 0 || xin >= size || yin < 0 || yin >= size) {
        px[o] = FILL[0];
        px[o + 1] = FILL[1];
        px[o + 2] = FILL[2];
        continue;
      }
      xin -= 0.5;
      yin -= 0.5;
      const x0 = Math.floor(xin);
      const y0 = Math.floor(yin);
      const [dx, dy] = [xin - x0, yin - y0];
      const cols = [clamp(x0 - 1), clamp(x0), clamp(x0 + 1), clamp(x0 + 2)];
      for (let c = 0; c < 3; c++) {
        const row = (r: number) => {
          const base = r * size;
          return cubicThrough(src[(base + cols[0]!) * 3 + c]!, src[(base + cols[1]!) * 3 + c]!, src[(base + cols[2]!) * 3 + c]!, src[(base + cols[3]!) * 3 + c]!, dx);
        };
        const inside = (r: number) => r >= 0 && r < size;
        const v1 = row(clamp(y0 - 1));
        const v2 = inside(y0) ? row(y0) : v1;
        const v3 = inside(y0 + 1) ? row(y0 + 1) : v2;
        const v4 = inside(y0 + 2) ? row(y0 + 2) : v3;
        const value = cubicThrough(v1, v2, v3, v4, dy);
        px[o + c] = value <= 0 ? 0 : value >= 255 ? 255 : Math.trunc(value);
      }
    }
  }
}

/** Python's round(x, 15), as Pillow rounds its rotation matrix. */
const round15 = (x: number) => Number(x.toFixed(15));

/**
 * Image.rotate(degrees, BICUBIC, fillcolor) about the centre, counter-clockwise for positive
 * degrees, with Pillow's matrix (the angle taken mod 360, cos and sin rounded to 15 decimals)
 * and its shortcuts: 0 a copy, 180 a flip of both axes (90 and 270 need exact multiples, which
 * the magnitudes here never give).
 */
function rotate(v: View, degrees: number): void {
  let angle = degrees % 360;
  if (angle !== 0 && angle < 0) angle += 360;
  if (angle === 0) return;
  const { size } = v;
  if (angle === 180) {
    affine(v, [-1, 0, size, 0, -1, size]);
    return;
  }
  const radians = -(angle * (Math.PI / 180));
  const m: [number, number, number, number, number, number] = [round15(Math.cos(radians)), round15(Math.sin(radians)), 0, round15(-Math.sin(radians)), round15(Math.cos(radians)), 0];
  const centre = size / 2;
  m[2] = m[0] * -centre + m[1] * -centre + m[2] + centre;
  m[5] = m[3] * -centre + m[4] * -centre + m[5] + centre;
  affine(v, m);
}

const enhanceFactor = (level: number, rng: Rng) => 1 + negate((level / MAX_LEVEL) * 0.9, rng);

/** The 15 ops of timm's _RAND_INCREASING_TRANSFORMS, in its order, with their level mappings. */
export const RAND_AUGMENT_OPS: ReadonlyArray<readonly [string, Op]> = [
  ['AutoContrast', (v) => autoContrast(v)],
  ['Equalize', (v) => equalize(v)],
  ['Invert', (v) => applyLut(v, () => lutOf((i) => 255 - i))],
  ['Rotate', (v, level, rng) => rotate(v, negate((level / MAX_LEVEL) * 30, rng))],
  [
    'PosterizeIncreasing',
    (v, level) => {
      const bits = 4 - Math.trunc((level / MAX_LEVEL) * 4);
      if (bits >= 8) return;
      const mask = ~((1 << (8 - bits)) - 1) & 0xff;
      applyLut(v, () => lutOf((i) => i & mask));
    },
  ],
  [
    'SolarizeIncreasing',
    (v, level) => {
      const threshold = 256 - Math.trunc((level / MAX_LEVEL) * 256);
      applyLut(v, () => lutOf((i) => (i < threshold ? i : 255 - i)));
    },
  ],
  [
    'SolarizeAdd',
    (v, level) => {
      const add = Math.trunc((level / MAX_LEVEL) * 110);
      applyLut(v, () => lutOf((i) => (i < 128 ? Math.min(255, i + add) : i)));
    },
  ],
  ['ColorIncreasing', (v, level, rng) => color(v, enhanceFactor(level, rng))],
  ['ContrastIncreasing', (v, level, rng) => contrast(v, enhanceFactor(level, rng))],
  ['BrightnessIncreasing', (v, level, rng) => blend(v, enhanceFactor(level, rng), () => 0)],
  ['SharpnessIncreasing', (v, level, rng) => sharpness(v, enhanceFactor(level, rng))],
  ['ShearX', (v, level, rng) => affine(v, [1, negate((level / MAX_LEVEL) * 0.3, rng), 0, 0, 1, 0])],
  ['ShearY', (v, level, rng) => affine(v, [1, 0, 0, negate((level / MAX_LEVEL) * 0.3, rng), 1, 0])],
  ['TranslateXRel', (v, level, rng) => affine(v, [1, 0, negate((level / MAX_LEVEL) * 0.45, rng) * v.size, 0, 1, 0])],
  ['TranslateYRel', (v, level, rng) => affine(v, [1, 0, 0, 0, 1, negate((level / MAX_LEVEL) * 0.45, rng) * v.size])],
];

/** Applies RandAugment to the `size` x `size` RGB image at `offset` of `pixels`; returns the ops applied. */
export function randAugment(pixels: Uint8Array, offset: number, size: number, rng: Rng, options: RandAugmentOptions = {}): string[] {
  const numOps = options.numOps ?? 2;
  const magnitude = options.magnitude ?? 9;
  const std = options.magnitudeStd ?? 0.5;
  const prob = options.prob ?? 0.5;
  if (offset < 0 || offset + size * size * 3 > pixels.length) {
    throw new RangeError(`randAugment: a ${size}x${size} RGB image at offset ${offset} does not fit ${pixels.length} bytes`);
  }
  const view: View = { px: pixels, offset, size };
  const applied: string[] = [];
  for (let k = 0; k < numOps; k++) {
    const [name, op] = RAND_AUGMENT_OPS[Math.floor(rng() * RAND_AUGMENT_OPS.length)];
    if (prob < 1 && rng() > prob) continue;
    let level = magnitude;
    if (std > 0) level = magnitude + std * normal(rng);
    level = Math.min(MAX_LEVEL, Math.max(0, level));
    op(view, level, rng);
    applied.push(name);
  }
  return applied;
}
