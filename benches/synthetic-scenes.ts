/**
 * Made-up labelled images for the task benches and the GPU check's task probes, which run where
 * no dataset is installed (the GPU machine has Node, the addon and dist/ only): deterministic
 * functions of their arguments, so two models (CPU and GPU, or two runs) see the same batches.
 */
import type { AnnotatedBatch, DetectorOptions, TargetInstance } from '../src/api/detector.js';
import type { LabelledBatch } from '../src/api/segmenter.js';

/**
 * `images` images of `side` px, each with three filled rectangles of a few colours as its
 * objects (category 0-2; box, mask, and for every second object the rectangle as a polygon, so
 * that both routes to the mask targets run). Rectangles span 3/16 to 1/2 of the side.
 */
export function rectangleScenes(images: number, side: number, seed: number): AnnotatedBatch {
  const pixels = new Uint8Array(images * side * side * 3);
  const instances: TargetInstance[][] = [];
  let s = seed * 7919 + 1;
  // A linear congruential generator: enough to place rectangles, and the same everywhere.
  const next = (n: number) => ((s = (s * 1103515245 + 12345) % 2147483648), s % n);
  const [smallest, spread] = [Math.max(2, Math.round((3 * side) / 16)), Math.max(1, Math.round((5 * side) / 16))];
  for (let i = 0; i < images; i++) {
    const objects: TargetInstance[] = [];
    for (let o = 0; o < 3; o++) {
      const category = next(3);
      const [w, h] = [smallest + next(spread), smallest + next(spread)];
      const [x0, y0] = [next(side - w), next(side - h)];
      const mask = new Uint8Array(side * side);
      for (let y = y0; y < y0 + h; y++) {
        for (let x = x0; x < x0 + w; x++) {
          mask[y * side + x] = 1;
          pixels.set([60 + 80 * category, 200 - 60 * category, 40 + 30 * o], ((i * side + y) * side + x) * 3);
        }
      }
      const box: [number, number, number, number] = [x0, y0, x0 + w, y0 + h];
      objects.push(o % 2 ? { category, box, mask, polygons: [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]] } : { category, box, mask });
    }
    instances.push(objects);
  }
  return { images: pixels, batchSize: images, height: side, width: side, instances };
}

/**
 * `images` images of `side` px with diagonal stripes of `classes` classes as their label map
 * (every 97th pixel ignored, 255) and pixels that vary with `seed`: a labelling the
 * segmentation loss sees everywhere.
 */
export function stripeLabels(images: number, side: number, classes: number, seed: number): LabelledBatch {
  return {
    images: Uint8Array.from({ length: images * side * side * 3 }, (_, i) => (i * 131 + seed * 977 + 7) % 251),
    labels: Uint8Array.from({ length: images * side * side }, (_, i) => (i % 97 === 0 ? 255 : (((i % side) + Math.floor(i / side) + seed) >> 4) % classes)),
    batchSize: images,
    height: side,
    width: side,
  };
}

/**
 * A narrow detector head for 64-px scenes and convmae-tiny (windows of 2 tokens, blocks 0 and 3
 * global, FPN width 16, one conv in each head, few regions): the GPU check's detector probe and
 * the task bench's rehearsal size.
 */
export const SMALL_DETECTOR_HEAD = {
  window: 2,
  globalBlocks: [0, 3],
  channels: 16,
  boxFc: 32,
  boxConvs: 1,
  maskConvs: 1,
  anchorSizes: [8, 16, 32, 64, 128],
  rpnBatchPerImage: 64,
  roiBatchPerImage: 16,
  rpnPreNmsTrain: 200,
  rpnPostNmsTrain: 50,
  rpnPreNmsTest: 100,
  rpnPostNmsTest: 50,
} satisfies Partial<DetectorOptions>;
