// Shared helpers of the model tests (not a test file itself).
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root (dist/test/helpers.js -> ../..). */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
/** The golden fixtures: $CONVMAE_GOLDEN, or ../shared/golden beside the repository. */
export const GOLDEN = process.env.CONVMAE_GOLDEN ?? path.resolve(ROOT, '..', 'shared', 'golden');
export const golden = (name: string) => path.join(GOLDEN, name);
export const CLI = path.join(ROOT, 'bin', 'convmae.js');

/** Deterministic pseudo-random uint8 images [n, size, size, 3]. */
export function randomImages(n: number, size: number, seed = 1): Uint8Array {
  const px = new Uint8Array(n * size * size * 3);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < px.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    px[i] = (x >>> 0) & 0xff;
  }
  return px;
}

export interface SafetensorsFile {
  header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] } | Record<string, string>>;
  dataStart: number;
  bytes: Buffer;
}

/** Parses a safetensors file: 8-byte little-endian header length, JSON header, raw data. */
export async function readSafetensors(file: string): Promise<SafetensorsFile> {
  const bytes = await readFile(file);
  const n = Number(bytes.readBigUInt64LE(0));
  return { header: JSON.parse(bytes.subarray(8, 8 + n).toString('utf8')), dataStart: 8 + n, bytes };
}

/** The raw bytes of one tensor of a parsed safetensors file. */
export function tensorBytes(f: SafetensorsFile, name: string): Buffer {
  const entry = f.header[name] as { data_offsets: [number, number] };
  return f.bytes.subarray(f.dataStart + entry.data_offsets[0], f.dataStart + entry.data_offsets[1]);
}
