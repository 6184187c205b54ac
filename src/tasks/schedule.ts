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

/** detectron2's `WarmupParamScheduler(CosineParamScheduler(1, 0), warmup_factor, warmup_length)` through `LRMultiplier`, per iteration, as the DET recipe sets it. */
export interface DetectionSchedule {
  /** Base lr (the cosine's start). */
  lr: number;
  /** The run's length: the cosine reaches 0 there. */
  steps: number;
  warmupSteps: number;
  /** The warmup starts at lr * warmupFactor (0.001 officially). */
  warmupFactor: number;
}

/**
 * The lr of iteration `step` (0-based): lr * m(step / steps), where m is the half cosine from 1
 * to 0, except during the warmup (step < warmupSteps), where m rises linearly from
 * warmupFactor * m(0) to the cosine's value where the warmup ends, as fvcore's
 * CompositeParamScheduler joins the two.
 */
export function detectionLrAt(step: number, s: DetectionSchedule): number {
  const cosine = (where: number) => 0.5 * (1 + Math.cos(Math.PI * Math.min(1, where)));
  const where = step / s.steps;
  const warmupEnd = s.warmupSteps / s.steps;
  if (step < s.warmupSteps) {
    const start = s.warmupFactor * cosine(0);
    return s.lr * (start + (cosine(warmupEnd) - start) * (where / warmupEnd));
  }
  return s.lr * cosine(where);
}
