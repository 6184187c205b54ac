/** What every training run (pretrain, finetune, linprobe) shares: progress reports and option checks. */
import { stat } from 'node:fs/promises';

/** Whether a path exists (for --resume checks). */
export async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}

/** Validates a count option (batch size, steps, epochs), naming it in the error. */
export function positiveInt(value: number, name: string): number {
  if (!Number.isInteger(value) || value < 1) throw new RangeError(`${name} must be a positive integer, got ${value}`);
  return value;
}

/** What a training loop reports after each step (pretraining and classification alike). */
export interface TrainingProgress {
  step: number;
  totalSteps: number;
  epoch: number;
  loss: number;
  lr: number;
  imagesPerSec: number;
  etaSeconds: number;
}
