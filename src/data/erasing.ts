/**
 * Random erasing (timm 0.3.2 `RandomErasing(probability=0.25, mode='pixel', max_count=1)`, as
 * in the official fine-tune transform): with probability `prob`, one rectangle of area
 * U(0.02, 1/3) of the image and log-uniform aspect in (0.3, 1/0.3), 10 attempts to fit it.
 * Here only the box is drawn; the native step fills it with standard-normal noise in normalized
 * pixel space (mode 'pixel'), after normalization, as timm does.
 */
import { randInt, type Rng } from './rng.js';

export interface ErasingOptions {
  /** Default 0.25 (the recipe's --reprob). */
  prob?: number;
  /** Area range as a fraction of the image. Default [0.02, 1/3]. */
  area?: readonly [number, number];
  /** Aspect ratio range. Default [0.3, 1/0.3]. */
  aspect?: readonly [number, number];
}

export interface EraseBox {
  sample: number;
  top: number;
  left: number;
  height: number;
  width: number;
}

/** The erasing box of image `sample` of a batch, or undefined when this image is not erased. */
export function sampleErasing(rng: Rng, sample: number, height: number, width: number, options: ErasingOptions = {}): EraseBox | undefined {
  const prob = options.prob ?? 0.25;
  const [minArea, maxArea] = options.area ?? [0.02, 1 / 3];
  const [minAspect, maxAspect] = options.aspect ?? [0.3, 1 / 0.3];
  if (!(rng() < prob)) return undefined;
  const area = height * width;
  const logLo = Math.log(minAspect);
  const logHi = Math.log(maxAspect);
  for (let attempt = 0; attempt < 10; attempt++) {
    const targetArea = area * (minArea + rng() * (maxArea - minArea));
    const aspect = Math.exp(logLo + rng() * (logHi - logLo));
    const h = Math.round(Math.sqrt(targetArea * aspect));
    const w = Math.round(Math.sqrt(targetArea / aspect));
    if (w < width && h < height && w > 0 && h > 0) {
      const top = randInt(rng, 0, height - h);
      const left = randInt(rng, 0, width - w);
      return { sample, top, left, height: h, width: w };
    }
  }
  return undefined;
}
