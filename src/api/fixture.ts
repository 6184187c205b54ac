/** Runs fixtures in the golden format (shared/golden/README.md) through our model. */
import { native } from '../native.js';
import type { DeviceName } from './pretrainer.js';

export interface TensorError {
  name: string;
  max_abs: number;
  max_rel: number;
}

export interface FixtureReport {
  fixture: string;
  kind: 'pretrain' | 'finetune';
  dtype: 'f32' | 'f64';
  tolerance: number;
  pass: boolean;
  worst: string;
  worst_rel: number;
  /** Pretraining fixtures: how stages 1-2 were computed. */
  path: 'sparse' | 'dense' | null;
  errors: TensorError[];
}

/** Runs a golden fixture through the model on `device` (default the CPU) and reports every error. */
export async function checkFixture(
  path: string,
  dtype: 'f32' | 'f64' = 'f64',
  convPath: 'sparse' | 'dense' = 'sparse',
  device: DeviceName = 'cpu',
): Promise<FixtureReport> {
  return JSON.parse(await native.checkFixture(path, dtype, convPath, device)) as FixtureReport;
}
