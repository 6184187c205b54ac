/**
 * WebDataset-style tar shards: each sample is a group of adjacent archive
 * members sharing a key (the member path up to the first dot of its file
 * name), e.g. `n01440764/000123.jpg` + `n01440764/000123.cls`. The image is
 * the sample's first member with an image extension (`jpg`, `png`, ...;
 * one such as `seg.png` only when there is no plain one); the label, when
 * there is one, is the integer text of its `.cls` member.
 *
 * Opening a dataset lists the shards' headers (not their contents), so
 * samples can be addressed as byte ranges of the shard files. Reading
 * follows the epoch order below, which walks the shards one after another
 * and only moves forward within a window of `shuffleBuffer` samples, so the
 * reads stay close to sequential.
 */
import { readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { IMAGE_EXTENSIONS, type ImageDataset, type ImageSource } from './datasets.js';
import { createRng, deriveSeed, permutation } from './rng.js';
import { listTar } from './tar.js';

export const DEFAULT_SHUFFLE_BUFFER = 1000;

export interface ShardDataset extends ImageDataset {
  readonly shards: readonly string[];
  readonly shuffleBuffer: number;
  /** The samples of an epoch in reading order; see `openTarShards`. */
  epochOrder(seed: number, epoch: number): Uint32Array;
}

export interface OpenTarShardsOptions {
  /** Samples held back for shuffling while reading. Default 1000; 1 keeps the shard order. */
  shuffleBuffer?: number;
  name?: string;
}

/** WebDataset's key and extension split: at the first dot of the file name. */
function splitKey(member: string): { key: string; ext: string } {
  const slash = member.lastIndexOf('/');
  const dot = member.indexOf('.', slash + 1);
  if (dot < 0) return { key: member, ext: '' };
  return { key: member.slice(0, dot), ext: member.slice(dot + 1).toLowerCase() };
}

/**
 * Expands numeric brace ranges as WebDataset / braceexpand do:
 * `train-{000000..000002}.tar` -> train-000000.tar, train-000001.tar,
 * train-000002.tar (zero padding follows the first bound). Several ranges
 * multiply out; text without braces is returned as is.
 */
export function expandShardPattern(pattern: string): string[] {
  const m = /\{(\d+)\.\.(\d+)\}/.exec(pattern);
  if (!m) return [pattern];
  const [whole, lo, hi] = m;
  const first = Number(lo);
  const last = Number(hi);
  if (last < first) throw new Error(`shard pattern "${pattern}": range {${lo}..${hi}} is empty`);
  if (last - first >= 1_000_000) throw new Error(`shard pattern "${pattern}": range {${lo}..${hi}} is too large`);
  const width = lo.length;
  const out: string[] = [];
  for (let i = first; i <= last; i++) {
    const expanded = pattern.slice(0, m.index) + String(i).padStart(width, '0') + pattern.slice(m.index + whole.length);
    out.push(...expandShardPattern(expanded));
  }
  return out;
}

/** The `.tar` files directly inside `dir`, sorted by name. */
export async function listShardFiles(dir: string): Promise<string[]> {
  const names = await readdir(dir);
  return names
    .filter((n) => n.toLowerCase().endsWith('.tar') && !n.startsWith('.'))
    .sort()
    .map((n) => path.join(dir, n));
}

/**
 * Opens WebDataset tar shards (in the given order, which fixes sample
 * indices: shard by shard, archive order within).
 *
 * Epoch order (used by BatchLoader when shuffling): the shards are visited
 * in a permutation drawn from (seed, epoch); their samples stream through a
 * buffer of `shuffleBuffer` samples: once the buffer is full, each incoming
 * sample replaces a uniformly chosen buffered one, which is emitted; at the
 * end the rest is emitted in random order. All draws come from one generator
 * seeded by (seed, epoch), so the order is a function of (seed, epoch) alone.
 * Samples with no image member are left out (and said so in no error: a
 * shard may carry metadata-only entries).
 */
export async function openTarShards(shardPaths: readonly string[], options: OpenTarShardsOptions = {}): Promise<ShardDataset> {
  if (shardPaths.length === 0) throw new Error('no tar shards given');
  const shuffleBuffer = options.shuffleBuffer ?? DEFAULT_SHUFFLE_BUFFER;
  if (!Number.isInteger(shuffleBuffer) || shuffleBuffer < 1) throw new RangeError(`shuffleBuffer must be an integer >= 1, got ${shuffleBuffer}`);
  const shards = shardPaths.map((p) => path.resolve(p));

  const sampleShard: number[] = [];
  const sampleOffset: number[] = [];
  const sampleSize: number[] = [];
  const sampleName: string[] = [];
  const sampleLabel: number[] = [];
  const shardStart: number[] = [];
  let labeled = false;
  for (let s = 0; s < shards.length; s++) {
    const file = shards[s];
    try {
      const info = await stat(file);
      if (!info.isFile()) throw new Error('not a file');
    } catch (err) {
      throw new Error(`tar shard "${file}" cannot be opened: ${(err as Error).message}`);
    }
    const members = await listTar(file, { keepContents: (name, size) => splitKey(name).ext === 'cls' && size <= 64 });
    shardStart.push(sampleShard.length);
    let i = 0;
    while (i < members.length) {
      const { key } = splitKey(members[i].name);
      // The image: the first member whose extension is an image type ("jpg"), else the first
      // whose last extension part is ("seg.png": a secondary picture, as WebDataset names them).
      let image = -1;
      let secondaryImage = -1;
      let label = -1;
      for (; i < members.length && splitKey(members[i].name).key === key; i++) {
        const { ext } = splitKey(members[i].name);
        if (image < 0 && IMAGE_EXTENSIONS.includes(ext)) image = i;
        else if (secondaryImage < 0 && IMAGE_EXTENSIONS.includes(ext.slice(ext.lastIndexOf('.') + 1))) secondaryImage = i;
        const text = members[i].contents;
        if (ext === 'cls' && text) {
          const value = Number(Buffer.from(text).toString('utf8').trim());
          if (!Number.isInteger(value) || value < 0) {
            throw new Error(`tar shard "${file}": label "${members[i].name}" is not a non-negative integer`);
          }
          label = value;
          labeled = true;
        }
      }
      if (image < 0) image = secondaryImage;
      if (image < 0) continue;
      sampleShard.push(s);
      sampleOffset.push(members[image].offset);
      sampleSize.push(members[image].size);
      sampleName.push(members[image].name);
      sampleLabel.push(label);
    }
  }
  const length = sampleShard.length;
  if (length === 0) throw new Error(`tar shards ${shards[0]}${shards.length > 1 ? ` (+${shards.length - 1} more)` : ''} hold no images`);
  shardStart.push(length);
  let classes: string[] | undefined;
  if (labeled) {
    const max = Math.max(...sampleLabel);
    classes = Array.from({ length: max + 1 }, (_, c) => String(c));
  }
  const name = options.name ?? path.basename(shards[0]).replace(/\.tar$/i, '');
  const check = (index: number) => {
    if (!Number.isInteger(index) || index < 0 || index >= length) {
      throw new RangeError(`index ${index} is out of range for dataset "${name}" of ${length} samples`);
    }
  };
  return {
    name,
    length,
    classes,
    shards,
    shuffleBuffer,
    label(index: number): number | undefined {
      check(index);
      return labeled && sampleLabel[index] >= 0 ? sampleLabel[index] : undefined;
    },
    source(index: number): ImageSource {
      check(index);
      return { kind: 'file', path: shards[sampleShard[index]], offset: sampleOffset[index], length: sampleSize[index] };
    },
    describe(index: number): string {
      if (!(index >= 0 && index < length)) return `${name}#${index}`;
      return `${shards[sampleShard[index]]}:${sampleName[index]}`;
    },
    epochOrder(seed: number, epoch: number): Uint32Array {
      // A 4-part seed: distinct from the loader's (seed, epoch) permutation and (seed, epoch, index) augmentation seeds.
      const rng = createRng(deriveSeed(seed, epoch, 0, 1));
      const order = new Uint32Array(length);
      const buffer: number[] = [];
      let k = 0;
      for (const s of permutation(shards.length, rng)) {
        for (let index = shardStart[s]; index < shardStart[s + 1]; index++) {
          if (buffer.length < shuffleBuffer) {
            buffer.push(index);
            continue;
          }
          const j = Math.floor(rng() * shuffleBuffer);
          order[k++] = buffer[j];
          buffer[j] = index;
        }
      }
      for (const index of permutation(buffer.length, rng)) order[k++] = buffer[index];
      return order;
    },
  };
}
