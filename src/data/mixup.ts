/**
 * Mixup and CutMix with label smoothing, batch mode, as the official fine-tune recipe uses them
 * (timm 0.3.2 `Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
 * mode='batch', label_smoothing=0.1)`): one mixing weight per batch, each image mixed with its
 * mirror in the batch (image i with image B-1-i), targets mixed the same way.
 *
 * This module draws the parameters and builds the soft targets; the native step applies the
 * mix to the normalized pixels (see `MixSpec`).
 */
import { beta, randInt, type Rng } from './rng.js';

export interface MixupOptions {
  /** Beta(alpha, alpha) for mixup; 0 disables mixup. Default 0.8. */
  mixupAlpha?: number;
  /** Beta(alpha, alpha) for cutmix; 0 disables cutmix. Default 1.0. */
  cutmixAlpha?: number;
  /** Probability of mixing a batch at all. Default 1. */
  prob?: number;
  /** Probability of cutmix rather than mixup when both are enabled. Default 0.5. */
  switchProb?: number;
  /** Label smoothing folded into the targets. Default 0.1. */
  labelSmoothing?: number;
}

/** The mix of one batch as the native step takes it. `cut` = [top, bottom, left, right). */
export interface MixSpec {
  lam: number;
  cut?: [number, number, number, number];
}

export interface MixDraw {
  /** undefined when the batch is not mixed (lam = 1). */
  mix: MixSpec | undefined;
  /** The weight of each image's own label: lam, corrected to the pasted area for cutmix. */
  lam: number;
}

function checkAlpha(name: string, v: number): number {
  if (!(v >= 0) || !Number.isFinite(v)) throw new RangeError(`mixup: ${name} must be a finite number >= 0, got ${v}`);
  return v;
}

/**
 * Draws the mix of a batch of `height` x `width` images: timm's `_params_per_batch` then
 * `rand_bbox` + `correct_lam` for cutmix (box centre uniform over the image, sides
 * int(side * sqrt(1 - lam)), clipped at the border; lam becomes 1 - box area / image area).
 */
export function sampleMix(rng: Rng, height: number, width: number, options: MixupOptions = {}): MixDraw {
  const mixupAlpha = checkAlpha('mixupAlpha', options.mixupAlpha ?? 0.8);
  const cutmixAlpha = checkAlpha('cutmixAlpha', options.cutmixAlpha ?? 1.0);
  const prob = options.prob ?? 1.0;
  const switchProb = options.switchProb ?? 0.5;
  if (mixupAlpha === 0 && cutmixAlpha === 0) return { mix: undefined, lam: 1 };
  if (!(rng() < prob)) return { mix: undefined, lam: 1 };
  let useCutmix: boolean;
  if (mixupAlpha > 0 && cutmixAlpha > 0) useCutmix = rng() < switchProb;
  else useCutmix = cutmixAlpha > 0;
  const alpha = useCutmix ? cutmixAlpha : mixupAlpha;
  const lam = beta(rng, alpha, alpha);
  if (!useCutmix) return { mix: { lam }, lam };
  const ratio = Math.sqrt(1 - lam);
  const cutH = Math.trunc(height * ratio);
  const cutW = Math.trunc(width * ratio);
  const cy = randInt(rng, 0, height - 1);
  const cx = randInt(rng, 0, width - 1);
  const clip = (v: number, hi: number) => Math.min(Math.max(v, 0), hi);
  const top = clip(cy - Math.floor(cutH / 2), height);
  const bottom = clip(cy + Math.floor(cutH / 2), height);
  const left = clip(cx - Math.floor(cutW / 2), width);
  const right = clip(cx + Math.floor(cutW / 2), width);
  const corrected = 1 - ((bottom - top) * (right - left)) / (height * width);
  return { mix: { lam: corrected, cut: [top, bottom, left, right] }, lam: corrected };
}

/**
 * Soft targets [B, K] of a (possibly mixed) batch: label-smoothed one-hot rows (smoothing / K off
 * the label, 1 - smoothing + smoothing / K on it), then `lam * y + (1 - lam) * flip(y)`.
 */
export function mixedTargets(labels: ArrayLike<number>, numClasses: number, lam: number, smoothing: number): Float64Array {
  if (!Number.isInteger(numClasses) || numClasses < 1) throw new RangeError(`numClasses must be a positive integer, got ${numClasses}`);
  if (!(smoothing >= 0 && smoothing < 1)) throw new RangeError(`labelSmoothing must be in [0, 1), got ${smoothing}`);
  const b = labels.length;
  const off = smoothing / numClasses;
  const on = 1 - smoothing + off;
  const out = new Float64Array(b * numClasses).fill(off);
  for (let i = 0; i < b; i++) {
    const own = labels[i];
    const mirror = labels[b - 1 - i];
    for (const l of [own, mirror]) {
      if (!Number.isInteger(l) || l < 0 || l >= numClasses) throw new RangeError(`label ${l} is out of range for ${numClasses} classes`);
    }
    const row = i * numClasses;
    out[row + own] += lam * (on - off);
    out[row + mirror] += (1 - lam) * (on - off);
  }
  return out;
}
