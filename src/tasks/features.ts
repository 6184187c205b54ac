/**
 * Features of a whole dataset from a trained encoder: the pooled vector of every image (what a
 * classifier's head reads; an embedding for retrieval, k-NN or a head trained elsewhere), written
 * as one safetensors file.
 */
import { mkdir, open, rename, rm, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { Classifier, type Pooling } from '../api/classifier.js';
import type { ConvMaeConfig, PresetName } from '../api/config.js';
import type { DeviceName, Precision } from '../api/pretrainer.js';
import { native } from '../native.js';
import { BatchLoader, openDataset, unseenImages, type SkippedSample } from '../data/index.js';
import { positiveInt } from './run.js';

export interface FeaturesOptions {
  /**
   * Any checkpoint with a ConvMAE encoder: ours (pretraining or classifier; the model is read from
   * it) or an official .pth (pretrained or fine-tuned; give `preset` / `config`). The encoder and,
   * when present, `fc_norm` / `norm` are loaded as the official fine-tune script loads them.
   */
  checkpoint: string;
  /** Images (see `openDataset`); default: the MNIST test split. */
  data?: string;
  /** Where the safetensors file goes; default `features.safetensors`. */
  out?: string;
  /** For files without our metadata (official .pth); default convmae-base. */
  preset?: PresetName | string;
  config?: Partial<ConvMaeConfig>;
  /** Default: the classifier checkpoint's pooling, else 'global' (token mean + fc_norm). */
  pool?: Pooling;
  /** Default 128. */
  batchSize?: number;
  device?: DeviceName;
  precision?: Precision;
  /** CPU threads of the encoder (default all of rayon's). */
  threads?: number;
  /** Images decoded at once. */
  concurrency?: number;
  /** After each batch: images written so far, of the dataset's length. */
  onProgress?: (done: number, total: number) => void;
  /** Each image that cannot be read (it is left out of the file). */
  onSkip?: (skipped: SkippedSample) => void;
}

export interface FeaturesSummary {
  out: string;
  dataset: string;
  /** Rows written: the dataset's images less the skipped ones. */
  count: number;
  dim: number;
  skipped: number;
}

/**
 * Writes `features` (float32 [count, dim]: row i is image `indices[i]` of the dataset),
 * `indices` (int64 [count]) and `labels` (int64 [count], -1 where the dataset has none) to
 * `out`, atomically. Unreadable images are skipped and counted (metadata `skipped`). The rows
 * go to a temporary file beside `out` as they come (memory stays one batch's), then into `out`.
 */
export async function extractFeatures(options: FeaturesOptions): Promise<FeaturesSummary> {
  const out = options.out ?? 'features.safetensors';
  const batchSize = positiveInt(options.batchSize ?? 128, 'batchSize');
  // A count only: 'auto' times training steps, and extraction has none.
  if (options.threads !== undefined) positiveInt(options.threads, 'threads');
  // Before any compute: the output's folder, made if missing, as a run's outDir is.
  await mkdir(path.dirname(path.resolve(out)), { recursive: true }).catch((e: Error) => {
    throw new Error(`features: cannot make the folder of out '${out}': ${e.message}`);
  });
  const dataset = await openDataset(options.data ?? 'mnist:t10k');
  const meta = JSON.parse(await native.checkpointMetadata(options.checkpoint)) as Record<string, string>;
  const head = meta.head ? (JSON.parse(meta.head) as { pool: Pooling }) : undefined;
  const config = meta.config ? (JSON.parse(meta.config) as ConvMaeConfig) : options.config;
  const pool = options.pool ?? head?.pool ?? 'global';
  // The head is never used here: one class keeps it small.
  const model = Classifier.create({
    preset: meta.config ? undefined : (options.preset ?? 'convmae-base'),
    config,
    numClasses: 1,
    pool,
    device: options.device,
    precision: options.precision,
    threads: options.threads,
  });
  try {
    await model.initFrom(options.checkpoint);
    const imageSize = model.config.img_size;
    const loader = new BatchLoader({
      dataset,
      batchSize,
      imageSize,
      seed: 0,
      transform: 'eval',
      shuffle: false,
      dropLast: false,
      endStep: Math.ceil(dataset.length / batchSize),
      concurrency: options.concurrency,
      onSkip: options.onSkip,
    });
    const seen = new Uint8Array(dataset.length);
    const indices: number[] = [];
    const labels: number[] = [];
    let dim = 0;
    const rowsFile = `${out}.rows-${process.pid}`;
    const rows = await open(rowsFile, 'w');
    try {
      try {
        for await (const b of loader) {
          // Each image once (a skipped image's slot holds a later one, which comes again).
          const u = unseenImages(b, seen);
          if (u.batchSize === 0) continue;
          const f = await model.features({ images: u.images, batchSize: u.batchSize, height: imageSize, width: imageSize });
          dim = f.dim;
          await rows.write(new Uint8Array(f.pooled.buffer, f.pooled.byteOffset, f.pooled.byteLength));
          indices.push(...u.indices);
          labels.push(...u.labels);
          options.onProgress?.(indices.length, dataset.length);
        }
      } finally {
        loader.close();
        await rows.close();
      }
      if (indices.length === 0) throw new Error(`features: dataset '${dataset.name}' yielded no images`);
      await writeSafetensors(
        out,
        {
          features: { dtype: 'F32', shape: [indices.length, dim], data: { file: rowsFile, byteLength: indices.length * dim * 4 } },
          indices: { dtype: 'I64', shape: [indices.length], data: BigInt64Array.from(indices, BigInt) },
          labels: { dtype: 'I64', shape: [labels.length], data: BigInt64Array.from(labels, BigInt) },
        },
        {
          checkpoint: options.checkpoint,
          dataset: dataset.name,
          pool,
          skipped: String(loader.skipped.length),
          config: JSON.stringify(model.config),
        },
      );
    } finally {
      await rm(rowsFile, { force: true });
    }
    return { out, dataset: dataset.name, count: indices.length, dim, skipped: loader.skipped.length };
  } finally {
    model.dispose();
  }
}

interface TensorEntry {
  dtype: 'F32' | 'I64';
  shape: number[];
  /** The bytes, or the file that holds them. */
  data: Float32Array | BigInt64Array | { file: string; byteLength: number };
}

/** A safetensors file of `tensors` (in the given order) and string `metadata`: written to a temporary file, synced, then renamed over `file`. */
async function writeSafetensors(file: string, tensors: Record<string, TensorEntry>, metadata: Record<string, string>): Promise<void> {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  // The data starts 8-byte aligned: the header is padded with spaces, as the format allows.
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const head = Buffer.alloc(8 + Buffer.byteLength(json));
  head.writeBigUInt64LE(BigInt(Buffer.byteLength(json)), 0);
  head.write(json, 8, 'utf8');
  const tmp = `${file}.tmp-${process.pid}`;
  const fh = await open(tmp, 'w');
  try {
    await fh.write(head);
    for (const { data } of Object.values(tensors)) {
      if ('file' in data) {
        await copyInto(fh, data.file, data.byteLength);
      } else {
        await fh.write(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
      }
    }
    await fh.sync();
  } catch (e) {
    await fh.close();
    await rm(tmp, { force: true });
    throw e;
  }
  await fh.close();
  await rename(tmp, file);
}

/** Appends the first `byteLength` bytes of `file` to `fh`, a chunk at a time; a shorter file is an error. */
async function copyInto(fh: FileHandle, file: string, byteLength: number): Promise<void> {
  const src = await open(file, 'r');
  try {
    const chunk = Buffer.alloc(Math.min(byteLength, 8 << 20));
    for (let copied = 0; copied < byteLength; ) {
      const { bytesRead } = await src.read(chunk, 0, Math.min(chunk.length, byteLength - copied), copied);
      if (bytesRead === 0) throw new Error(`${file}: ${copied} bytes where ${byteLength} were written`);
      await fh.write(chunk.subarray(0, bytesRead));
      copied += bytesRead;
    }
  } finally {
    await src.close();
  }
}
