/**
 * The batches of a training run over a dataset of whole samples (segmentation, detection):
 * a shuffled order per epoch drawn from (seed, epoch), the last partial batch dropped,
 * micro-steps `startStep` (a resume) to `endStep`, the next batch read while the current one
 * trains. Which sample fills slot i of step s depends only on (seed, s, i) and on which samples
 * could be used, so a resumed run sees the same batches.
 */
import { createRng, deriveSeed, permutation } from './rng.js';

/** A sample that could not be read, and what took its place. */
export interface SkippedStepSample {
  index: number;
  path: string;
  reason: string;
  step: number;
}

export interface StepBatchOptions<S> {
  dataset: { readonly name: string; readonly length: number; describe(index: number): string };
  batchSize: number;
  seed: number;
  startStep: number;
  endStep: number;
  /**
   * Sample `index` made ready for slot `slot` of step `step` (read, checked, transformed), or
   * undefined to pass it over (the caller reports why). A throw marks it unreadable: reported
   * through `onSkip`. Either way the next sample of the epoch's order takes the slot.
   */
  read(index: number, step: number, slot: number): Promise<S | undefined>;
  onSkip?: (s: SkippedStepSample) => void;
  /** Completes "no sample could be read" when every sample was passed over. */
  unusable?: string;
}

export interface StepBatch<S> {
  samples: S[];
  /** The dataset index of each sample. */
  indices: number[];
  epoch: number;
}

export async function* stepBatches<S>(options: StepBatchOptions<S>): AsyncGenerator<StepBatch<S>> {
  const { dataset, batchSize, seed } = options;
  const stepsPerEpoch = Math.floor(dataset.length / batchSize);
  if (stepsPerEpoch < 1) throw new RangeError(`dataset '${dataset.name}' has ${dataset.length} samples, fewer than one batch of ${batchSize}`);
  const orders = new Map<number, Uint32Array>();
  const orderOf = (epoch: number) => {
    let order = orders.get(epoch);
    if (!order) {
      orders.clear();
      order = permutation(dataset.length, createRng(deriveSeed(seed, epoch)));
      orders.set(epoch, order);
    }
    return order;
  };
  const readAt = async (order: Uint32Array, position: number, step: number, slot: number): Promise<[number, S]> => {
    for (let tries = 0; tries < dataset.length; tries++) {
      const index = order[(position + tries) % dataset.length]!;
      try {
        const sample = await options.read(index, step, slot);
        if (sample !== undefined) return [index, sample];
      } catch (e) {
        options.onSkip?.({ index, path: dataset.describe(index), reason: (e as Error).message, step });
      }
    }
    throw new Error(`dataset '${dataset.name}': no sample could be read${options.unusable ? ` ${options.unusable}` : ''}`);
  };
  const load = async (step: number): Promise<StepBatch<S>> => {
    const epoch = Math.floor(step / stepsPerEpoch);
    const order = orderOf(epoch);
    const at = (step % stepsPerEpoch) * batchSize;
    const read = await Promise.all(Array.from({ length: batchSize }, (_, i) => readAt(order, at + i, step, i)));
    return { samples: read.map(([, s]) => s), indices: read.map(([index]) => index), epoch };
  };
  let next = options.startStep < options.endStep ? load(options.startStep) : undefined;
  for (let step = options.startStep; step < options.endStep; step++) {
    const current = await next!;
    next = step + 1 < options.endStep ? load(step + 1) : undefined;
    // A rejected prefetch surfaces when awaited; keep it from counting as unhandled meanwhile.
    next?.catch(() => undefined);
    yield current;
  }
}
