/**
 * The native half of the pretraining transform (crates/convmae-core
 * src/imaging.rs): a batch of JPEG files decoded, cropped, resized
 * (Pillow's bicubic) and flipped on the native decode threads, in one call;
 * likewise a batch of images already in memory, without the decode.
 * The crops are drawn in TypeScript (transforms.ts), so this path and the
 * sharp path augment identically.
 */
import type { CropBox } from './transforms.js';

export interface NativeCropJob {
  bytes: Uint8Array;
  /** For error messages. */
  path: string;
  crop: CropBox;
  flip: boolean;
}

export interface NativeCropResult {
  /** uint8 [jobs, size, size, 3]. */
  pixels: Uint8Array;
  /** Per job: null when decoded, else why not (naming the file). */
  errors: (string | null | undefined)[];
}

type DecodeCropBatch = (files: Uint8Array[], paths: string[], crops: Int32Array, size: number, threads: number) => Promise<NativeCropResult>;

/**
 * A function of the native module, looked up once, or undefined when the module cannot be
 * loaded or lacks it. Loaded lazily so that the data pipeline works without the module.
 */
function lazyNative<F>(name: 'decodeCropBatch' | 'cropPixelBatch'): () => Promise<F | undefined> {
  let loaded: Promise<F | undefined> | undefined;
  return () =>
    (loaded ??= import('../native.js').then(
      (m) => (typeof m.native[name] === 'function' ? (m.native[name] as F) : undefined),
      () => undefined,
    ));
}

/**
 * The native batch decoder, or undefined when the native module cannot be
 * loaded (then every image goes through sharp).
 */
export const nativeDecoder = lazyNative<DecodeCropBatch>('decodeCropBatch');

/** An image already in memory (e.g. an IDX file's digits) and its augmentation. */
export interface NativePixelJob {
  /** Interleaved rows, `channels` = 1 (grey) or 3 (RGB). */
  pixels: Uint8Array;
  width: number;
  height: number;
  channels: 1 | 3;
  /** For error messages. */
  path: string;
  crop: CropBox;
  flip: boolean;
}

type CropPixelBatch = (images: Uint8Array[], shapes: Int32Array, names: string[], crops: Int32Array, size: number, threads: number) => Promise<NativeCropResult>;

/**
 * The native transform for images in memory (the same crop, Pillow's bicubic resample and flip
 * as the JPEG path, without a decode), or undefined when the native module cannot be loaded
 * (then they go through sharp).
 */
export const nativePixelCropper = lazyNative<CropPixelBatch>('cropPixelBatch');

/** The five crop numbers an image of the native calls: left, top, width, height, flip. */
function cropNumbers(jobs: { crop: CropBox; flip: boolean }[]): Int32Array {
  const crops = new Int32Array(jobs.length * 5);
  jobs.forEach((job, i) => {
    crops.set([job.crop.left, job.crop.top, job.crop.width, job.crop.height, job.flip ? 1 : 0], i * 5);
  });
  return crops;
}

/** Runs `jobs` through the native transform for images in memory with `threads` threads. */
export async function cropPixelBatch(crop: CropPixelBatch, jobs: NativePixelJob[], size: number, threads: number): Promise<NativeCropResult> {
  const shapes = new Int32Array(jobs.length * 3);
  jobs.forEach((job, i) => shapes.set([job.width, job.height, job.channels], i * 3));
  return crop(
    jobs.map((j) => j.pixels),
    shapes,
    jobs.map((j) => j.path),
    cropNumbers(jobs),
    size,
    threads,
  );
}

/** Runs `jobs` through the native decoder with `threads` decode threads. */
export async function decodeCropBatch(decode: DecodeCropBatch, jobs: NativeCropJob[], size: number, threads: number): Promise<NativeCropResult> {
  return decode(
    jobs.map((j) => j.bytes),
    jobs.map((j) => j.path),
    cropNumbers(jobs),
    size,
    threads,
  );
}
