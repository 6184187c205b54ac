/**
 * k-NN accuracy of an encoder's pooled features: how well images of a class sit together without
 * any training on labels. For each checkpoint, `extractFeatures` runs over `--data`; the images
 * with even dataset index are the memory bank, those with odd index the queries, and each query
 * takes the label of its nearest bank image by cosine similarity (1-NN) and the vote of its `--k`
 * nearest weighted by exp(similarity / 0.07) (DINO's k-NN).
 *
 *   node dist/benches/knn.js --checkpoints runs/pretrain/checkpoint.safetensors,runs/random/checkpoint.safetensors \
 *     --names pretrained,random [--data mnist:t10k] [--k 20]
 *
 * Prints a markdown table and one JSON line per checkpoint.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { extractFeatures } from '../src/index.js';
import { parseArgs } from './lib.js';

const TEMPERATURE = 0.07;

interface Table {
  features: Float32Array;
  labels: number[];
  indices: number[];
  dim: number;
}

/** The three tensors `extractFeatures` writes. */
async function readFeatures(file: string): Promise<Table> {
  const bytes = await readFile(file);
  const n = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8')) as Record<string, { shape: number[]; data_offsets: [number, number] }>;
  const slice = (name: string) => {
    const [a, b] = header[name]!.data_offsets;
    return bytes.buffer.slice(bytes.byteOffset + 8 + n + a, bytes.byteOffset + 8 + n + b);
  };
  const int64 = (name: string) => Array.from(new BigInt64Array(slice(name)), Number);
  return { features: new Float32Array(slice('features')), labels: int64('labels'), indices: int64('indices'), dim: header.features!.shape[1]! };
}

function unitRows(t: Table, rows: number[]): Float32Array[] {
  return rows.map((r) => {
    const v = t.features.slice(r * t.dim, (r + 1) * t.dim);
    const norm = Math.hypot(...v) || 1;
    return v.map((x) => x / norm);
  });
}

/** (1-NN accuracy, weighted k-NN accuracy), in percent. */
function knnAccuracy(t: Table, k: number): [number, number] {
  const rows = t.indices.map((index, row) => ({ index, row }));
  const bankRows = rows.filter((r) => r.index % 2 === 0).map((r) => r.row);
  const queryRows = rows.filter((r) => r.index % 2 === 1).map((r) => r.row);
  const bank = unitRows(t, bankRows);
  const queries = unitRows(t, queryRows);
  if (t.labels.some((l) => l < 0)) throw new Error('the dataset has unlabeled images: k-NN needs a label for every image');
  const classes = Math.max(...t.labels) + 1;
  let nearestHits = 0;
  let votedHits = 0;
  for (let q = 0; q < queries.length; q++) {
    const query = queries[q]!;
    // The k most similar bank rows, kept sorted by similarity (descending).
    const top: { sim: number; label: number }[] = [];
    for (let b = 0; b < bank.length; b++) {
      const v = bank[b]!;
      let sim = 0;
      for (let d = 0; d < t.dim; d++) sim += query[d]! * v[d]!;
      if (top.length < k || sim > top[top.length - 1]!.sim) {
        const at = top.findIndex((e) => sim > e.sim);
        top.splice(at < 0 ? top.length : at, 0, { sim, label: t.labels[bankRows[b]!]! });
        if (top.length > k) top.pop();
      }
    }
    const truth = t.labels[queryRows[q]!]!;
    if (top[0]!.label === truth) nearestHits++;
    const votes = new Float64Array(classes);
    for (const e of top) votes[e.label]! += Math.exp(e.sim / TEMPERATURE);
    if (votes.indexOf(Math.max(...votes)) === truth) votedHits++;
  }
  return [(100 * nearestHits) / queries.length, (100 * votedHits) / queries.length];
}

async function main(): Promise<void> {
  const { flags } = parseArgs(process.argv.slice(2));
  const checkpoints = (flags.checkpoints ?? '').split(',').filter(Boolean);
  if (checkpoints.length === 0) throw new Error('--checkpoints a,b,...: the encoders to compare');
  const names = flags.names ? flags.names.split(',') : checkpoints;
  if (names.length !== checkpoints.length) throw new Error(`--names gives ${names.length} names for ${checkpoints.length} checkpoints`);
  const k = Number(flags.k ?? 20);
  if (!Number.isInteger(k) || k < 1) throw new RangeError(`--k must be a positive integer, got '${flags.k}'`);
  const data = flags.data ?? 'mnist:t10k';
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-knn-'));
  const rows: string[] = ['| encoder | checkpoint | images | dim | 1-NN top-1 | k-NN top-1 (k = ' + k + ') |', '| --- | --- | --- | --- | --- | --- |'];
  try {
    for (let i = 0; i < checkpoints.length; i++) {
      const out = path.join(dir, `${i}.safetensors`);
      const summary = await extractFeatures({ checkpoint: checkpoints[i]!, data, out });
      const table = await readFeatures(out);
      const [nearest, voted] = knnAccuracy(table, k);
      rows.push(`| ${names[i]} | ${checkpoints[i]} | ${summary.count} | ${summary.dim} | ${nearest.toFixed(2)}% | ${voted.toFixed(2)}% |`);
      console.log(JSON.stringify({ suite: 'knn', encoder: names[i], checkpoint: checkpoints[i], data: summary.dataset, images: summary.count, k, nn1_top1: nearest, knn_top1: voted }));
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  console.log(rows.join('\n'));
}

main().catch((e: unknown) => {
  console.error(`knn: ${(e as Error).message}`);
  process.exit(1);
});
