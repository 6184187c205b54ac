/**
 * The native half of the pretraining transform (crates/convmae-core
 * src/imaging.rs): a batch of JPEG files decoded, cropped, resized
 * (Pillow's bicubic) and flipped on the native decode threads, in one call.
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

let loaded: Promise<DecodeCropBatch | undefined> | undefined;

/**
 * The native batch decoder, or undefined when the native module cannot be
 * loaded (then every image goes through sharp). Loaded lazily so the data
 * pipeline works without it.
 */
export function nativeDecoder(): Promise<DecodeCropBatch | undefined> {
  loaded ??= import('../native.js').then(
    (m) => (typeof m.native.decodeCropBatch === 'function' ? (m.native.decodeCropBatch as DecodeCropBatch) : undefined),
    () => undefined,
  );
  return loaded;
}

/** Runs `jobs` through the native decoder with `threads` decode threads. */
export async function decodeCropBatch(decode: DecodeCropBatch, jobs: NativeCropJob[], size: number, threads: number): Promise<NativeCropResult> {
  const crops = new Int32Array(jobs.length * 5);
  jobs.forEach((job, i) => {
    crops.set([job.crop.left, job.crop.top, job.crop.width, job.crop.height, job.flip ? 1 : 0], i * 5);
  });
  return decode(
    jobs.map((j) => j.bytes),
    jobs.map((j) => j.path),
    crops,
    size,
    threads,
  );
}
