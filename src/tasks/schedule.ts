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

/**
 * detectron2's `WarmupParamScheduler(S, warmup_factor, warmup_length)` through `LRMultiplier`,
 * per iteration, where S is `CosineParamScheduler(1, 0)` (the DET recipe) or, with `milestones`,
 * `MultiStepParamScheduler(values, milestones)` (Official-ConvMAE-Det's step decay).
 */
export interface DetectionSchedule {
  /** Base lr (the multiplier's 1). */
  lr: number;
  /** The run's length: the cosine reaches 0 there. */
  steps: number;
  warmupSteps: number;
  /** The warmup starts at lr * warmupFactor (0.001 officially). */
  warmupFactor: number;
  /** Step decay instead of the cosine: from step milestones[i] on, the multiplier is values[i + 1]. */
  milestones?: number[];
  /** The step decay's multipliers, one more than the milestones (officially [1, 0.1, 0.01]). */
  values?: number[];
}

/**
 * The lr of iteration `step` (0-based): lr * m(step / steps), where m is the half cosine from 1
 * to 0 (or the step decay: values[number of milestones <= step], as fvcore's
 * MultiStepParamScheduler bisects them), except during the warmup (step < warmupSteps), where m
 * rises linearly from warmupFactor * m(0) to m's value where the warmup ends, as fvcore's
 * CompositeParamScheduler joins the two.
 */
export function detectionLrAt(step: number, s: DetectionSchedule): number {
  const multiplier = (at: number) => {
    if (s.milestones === undefined) return 0.5 * (1 + Math.cos(Math.PI * Math.min(1, at / s.steps)));
    return s.values![s.milestones.filter((m) => m <= Math.floor(at)).length]!;
  };
  if (step < s.warmupSteps) {
    const start = s.warmupFactor * multiplier(0);
    return s.lr * (start + (multiplier(s.warmupSteps) - start) * (step / s.warmupSteps));
  }
  return s.lr * multiplier(step);
}

/** Official-ConvMAE-Det's step decay, scaled to a run of `steps`: milestones at 163889 and 177546 of its 184375 iterations, multipliers 1, 0.1, 0.01. */
export function vitdetStepDecay(steps: number): Required<Pick<DetectionSchedule, 'milestones' | 'values'>> {
  return { milestones: [163889, 177546].map((m) => Math.round((m * steps) / 184375)), values: [1, 0.1, 0.01] };
}

/** Checks a step decay's shape (from options or a saved run), naming what is wrong. */
export function checkStepDecay(s: DetectionSchedule): void {
  if (s.milestones === undefined && s.values === undefined) return;
  const { milestones, values } = s;
  if (!Array.isArray(milestones) || !Array.isArray(values) || values.length !== milestones.length + 1) {
    throw new RangeError(`a step decay needs one more multiplier than milestones, got milestones ${JSON.stringify(milestones)} and values ${JSON.stringify(values)}`);
  }
  if (!milestones.every((m, i) => Number.isInteger(m) && m >= 0 && (i === 0 || m >= milestones[i - 1]!)) || !values.every((v) => Number.isFinite(v) && v >= 0)) {
    throw new RangeError(`step decay: milestones must be non-decreasing step numbers and values finite non-negative multipliers, got ${JSON.stringify(milestones)} and ${JSON.stringify(values)}`);
  }
}
