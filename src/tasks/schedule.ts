/**
 * The MAE learning-rate schedule (util/lr_sched.py): linear warmup from 0, then a half-cycle
 * cosine to min_lr, evaluated per iteration at a fractional epoch.
 */

export interface LrSchedule {
  /** Peak learning rate (after warmup). */
  lr: number;
  minLr: number;
  /** Warmup length and total length, in (fractional) epochs or any consistent unit. */
  warmup: number;
  total: number;
}

/** The official rule: lr = blr * effective batch / 256. */
export function scaledLr(blr: number, effectiveBatch: number): number {
  return (blr * effectiveBatch) / 256;
}

export function lrAt(s: LrSchedule, at: number): number {
  if (at < s.warmup) return (s.lr * at) / s.warmup;
  if (s.total <= s.warmup) return s.lr;
  const progress = Math.min(1, (at - s.warmup) / (s.total - s.warmup));
  return s.minLr + (s.lr - s.minLr) * 0.5 * (1 + Math.cos(Math.PI * progress));
}

/** mmcv's `poly` policy with linear warmup, per iteration, as the SEG config sets it. */
export interface PolySchedule {
  lr: number;
  minLr: number;
  power: number;
  totalSteps: number;
  warmupSteps: number;
  /** The warmup starts at lr * warmupRatio. */
  warmupRatio: number;
}

/**
 * `(lr - minLr) * (1 - step / total)^power + minLr`; during warmup that value times
 * `1 - (1 - step / warmup) * (1 - warmupRatio)` (mmcv's LrUpdaterHook, 'linear').
 */
export function polyLrAt(s: PolySchedule, step: number): number {
  const progress = Math.min(step, s.totalSteps) / s.totalSteps;
  const regular = (s.lr - s.minLr) * (1 - progress) ** s.power + s.minLr;
  if (step >= s.warmupSteps) return regular;
  return regular * (1 - (1 - step / s.warmupSteps) * (1 - s.warmupRatio));
}
