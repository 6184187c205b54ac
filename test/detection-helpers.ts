// Shared helpers of the detection tests (not a test file itself).
import { readFile } from 'node:fs/promises';
import { openDigitDetectionScenes, type AnnotatedBatch } from '../src/index.js';

/** The first `n` digit detection scenes of t10k (64 px) as a detector's batch. */
export async function sceneBatch(n: number): Promise<AnnotatedBatch> {
  const scenes = await openDigitDetectionScenes('t10k', { limit: n });
  const samples = await Promise.all(Array.from({ length: n }, (_, i) => scenes.sample(i)));
  const images = new Uint8Array(n * 64 * 64 * 3);
  samples.forEach((s, i) => images.set(s.image, i * 64 * 64 * 3));
  return { images, batchSize: n, height: 64, width: 64, instances: samples.map((s) => s.instances.map(({ category, box, mask }) => ({ category, box, mask }))) };
}

/** A run's `log.jsonl`, its training steps only (events left out). */
export async function stepLines(log: string): Promise<{ step?: number; loss?: number; lr?: number }[]> {
  return (await readFile(log, 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { step?: number; loss?: number; lr?: number; event?: string })
    .filter((l) => l.event === undefined);
}
