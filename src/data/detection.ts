/**
 * Datasets for instance detection and segmentation (Mask R-CNN): images with a list of objects,
 * each a class, a box and a pixel mask.
 *
 * The embedded default is the digit detection scenes: the digit segmentation scenes
 * (segmentation.ts) seen object by object, one instance per drawn digit. Both are cut from one
 * drawing (`drawDigitScene`), so scene i has the same pixels in both views.
 *
 * `openCocoFolder` reads COCO's layout (`<root>/<split>/` images and
 * `<root>/annotations/instances_<split>.json`), with the masks' polygons rasterized and RLEs
 * decoded here as pycocotools does (without it), and category ids mapped to contiguous ids as
 * detectron2 maps them.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import { drawDigitScene, setupDigitScenes, type DigitSceneDrawing, type DigitScenesOptions } from './segmentation.js';
import { IGNORE_LABEL } from '../api/segmenter.js';
import { native } from '../native.js';

export interface DetectionInstance {
  /** 0-based class id; there is no background class. */
  category: number;
  /** x1, y1, x2, y2 in pixels, x2 and y2 exclusive: a one-pixel object at column 3 spans 3..4. */
  box: [number, number, number, number];
  /** [height, width], 1 = object. */
  mask: Uint8Array;
  /** The mask's pixel count; for COCO, the annotation's `area` (a polygon's area, not its pixels). */
  area: number;
  /** A COCO crowd region: one mask over many objects, which training ignores rather than matches. */
  iscrowd: boolean;
  /**
   * The polygons the mask was rasterized from ([x1, y1, x2, y2, ...] in pixels), where the
   * annotation has them. The train transform then moves these, as detectron2 moves its
   * PolygonMasks (the official configs' mask format), and recomputes box and mask from them.
   */
  polygons?: number[][];
}

export interface DetectionSample {
  /** [height, width, 3] RGB. */
  image: Uint8Array;
  width: number;
  height: number;
  instances: DetectionInstance[];
  /** The scene index, or the COCO image id. */
  id: number;
}

export interface DetectionDataset {
  readonly name: string;
  readonly length: number;
  /** Class names; `category` indexes into it. */
  readonly classes: string[];
  sample(index: number): Promise<DetectionSample>;
  describe(index: number): string;
}

function checkIndex(index: number, length: number, name: string): void {
  if (!Number.isInteger(index) || index < 0 || index >= length) throw new RangeError(`index ${index} is out of range for dataset "${name}" of ${length} samples`);
}

// ---------------------------------------------------------------------------
// Digit detection scenes

export const DIGIT_DETECTION_CLASSES: readonly string[] = ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'];

/**
 * The instances of a drawn scene: per digit, the pixels its stroke won at full strength, that is
 * exactly the pixels the segmentation scene labels with its class (rims are ignored there, so
 * they belong to no mask here). A digit covered entirely by later ones has no instance.
 */
export function digitSceneInstances(drawing: DigitSceneDrawing): DetectionInstance[] {
  const { owner, labels, digits, width, height } = drawing;
  const instances: DetectionInstance[] = digits.map((digit) => ({ category: digit, box: [width, height, 0, 0], mask: new Uint8Array(width * height), area: 0, iscrowd: false }));
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const p = y * width + x;
      const d = owner[p]!;
      if (d < 0 || labels[p] === IGNORE_LABEL) continue;
      const instance = instances[d]!;
      instance.mask[p] = 1;
      instance.area++;
      const box = instance.box;
      if (x < box[0]) box[0] = x;
      if (y < box[1]) box[1] = y;
      if (x + 1 > box[2]) box[2] = x + 1;
      if (y + 1 > box[3]) box[3] = y + 1;
    }
  }
  return instances.filter((instance) => instance.area > 0);
}

/**
 * Digit detection scenes from MNIST 'train' or 't10k': scene i is the image of digit segmentation
 * scene i with one instance per visible digit (classes '0'-'9'), id = i.
 */
export async function openDigitDetectionScenes(split: 'train' | 't10k' = 'train', options: DigitScenesOptions = {}): Promise<DetectionDataset> {
  const { mnist, size, maxDigits, length } = await setupDigitScenes(split, options, 'digit detection scenes');
  const name = `digit-detection-${split}`;
  return {
    name,
    length,
    classes: [...DIGIT_DETECTION_CLASSES],
    sample(index: number): Promise<DetectionSample> {
      checkIndex(index, length, name);
      const drawing = drawDigitScene(mnist, index, size, maxDigits);
      return Promise.resolve({ image: drawing.image, width: size, height: size, instances: digitSceneInstances(drawing), id: index });
    },
    describe(index: number): string {
      return `${name}#${index}`;
    },
  };
}

// ---------------------------------------------------------------------------
// Masks: polygons and COCO run-length encoding

/** The largest polygon coordinate `rasterizePolygons` takes, in pixels (2^24). */
const MAX_POLYGON_COORDINATE = 2 ** 24;

/**
 * Rasterizes polygons ([x1, y1, x2, y2, ...] in pixels) into a [height, width] mask as
 * pycocotools does (`frPyObjects` then `merge`, which COCO's evaluation and detectron2's
 * `polygons_to_bitmask` use), so that ground-truth masks and mask AP match theirs pixel for
 * pixel: the union over the polygons, within one polygon the even-odd rule (a polygon traced
 * twice covers nothing). The native module does it (crates/convmae-core/src/polygons.rs, which
 * says how), the same code that rasterizes the detector's mask targets.
 */
export function rasterizePolygons(polygons: readonly (readonly number[])[], height: number, width: number): Uint8Array {
  polygons.forEach((p, i) => {
    // The walk visits every fine grid point along each edge, so a coordinate far off the image
    // would take as long as it is far; pycocotools has no bound either.
    if (p.length % 2 !== 0 || !p.every((v) => Number.isFinite(v) && Math.abs(v) <= MAX_POLYGON_COORDINATE)) {
      throw new RangeError(`polygons[${i}] must hold (x, y) pairs of finite numbers within ±${MAX_POLYGON_COORDINATE} pixels`);
    }
  });
  if (!(Number.isInteger(height) && Number.isInteger(width) && height >= 0 && width >= 0)) throw new RangeError(`rasterizePolygons: height and width must be non-negative integers, got ${height} x ${width}`);
  const lengths = Uint32Array.from(polygons, (p) => p.length);
  const coords = new Float64Array(lengths.reduce((n, l) => n + l, 0));
  let at = 0;
  polygons.forEach((p, i) => {
    coords.set(p, at);
    at += lengths[i]!;
  });
  return native.rasterizePolygons(lengths, coords, height, width);
}

/** A COCO run-length encoding: runs over the mask in column-major order, 0s first. */
export interface Rle {
  /** [height, width]. */
  size: [number, number];
  /** Run lengths (uncompressed RLE), or COCO's compressed string. */
  counts: number[] | string;
}

/**
 * The run lengths of COCO's compressed RLE string (pycocotools' rleFrString): each value is a
 * sequence of 6-bit chunks stored as char code - 48, low chunk first, 0x20 marking that another
 * chunk follows and 0x10 of the last chunk its sign; from the fourth value on, each is a delta
 * from the value two before (the previous run of the same colour). `where` names the field.
 */
export function rleCountsFromString(s: string, where = 'RLE counts'): number[] {
  const counts: number[] = [];
  let p = 0;
  while (p < s.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      if (p >= s.length) throw new Error(`${where}: the string ends inside value ${counts.length} (its last character has the continuation bit 0x20)`);
      const c = s.charCodeAt(p) - 48;
      if (c < 0 || c > 63) throw new Error(`${where}: character ${JSON.stringify(s[p])} at ${p} is not a COCO RLE digit ('0'..'o')`);
      // Arithmetic, not bitwise: values past 2^30 take 7 chunks, beyond 32-bit shifts.
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && (c & 0x10) !== 0) x -= 2 ** (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2]!;
    if (x < 0) throw new Error(`${where}: run ${counts.length} has negative length ${x}`);
    counts.push(x);
  }
  return counts;
}

/** COCO's compressed RLE string of run lengths (pycocotools' rleToString); see rleCountsFromString. */
export function rleCountsToString(counts: ArrayLike<number>): string {
  let s = '';
  for (let i = 0; i < counts.length; i++) {
    let x = counts[i]!;
    if (i > 2) x -= counts[i - 2]!;
    let more = true;
    while (more) {
      let c = ((x % 32) + 32) % 32;
      x = Math.floor(x / 32);
      // The last chunk's 0x10 is the sign, so a value whose top chunk has it set needs one more.
      more = (c & 0x10) !== 0 ? x !== -1 : x !== 0;
      if (more) c |= 0x20;
      s += String.fromCharCode(c + 48);
    }
  }
  return s;
}

/** Checks that `counts` are non-negative integers covering `pixels` exactly. */
function checkCounts(counts: readonly unknown[], pixels: number, where: string): void {
  let sum = 0;
  for (let i = 0; i < counts.length; i++) {
    const c = counts[i];
    if (typeof c !== 'number' || !Number.isInteger(c) || c < 0) throw new Error(`${where}[${i}] must be a non-negative integer run length, got ${JSON.stringify(c)}`);
    sum += c;
  }
  if (sum !== pixels) throw new Error(`${where}: the runs cover ${sum} pixels, the mask has ${pixels}`);
}

function checkSize(size: unknown, where: string): [number, number] {
  if (!Array.isArray(size) || size.length !== 2 || !size.every((v) => Number.isInteger(v) && (v as number) >= 0)) {
    throw new Error(`${where} must be [height, width] of two non-negative integers, got ${JSON.stringify(size)}`);
  }
  return [size[0] as number, size[1] as number];
}

/**
 * Decodes a COCO RLE (uncompressed run lengths or the compressed string) into a row-major
 * [height, width] mask. The runs must cover the mask exactly; `where` names the RLE in errors.
 */
export function decodeRle(rle: Rle, where = 'RLE'): Uint8Array {
  const [height, width] = checkSize(rle.size, `${where}.size`);
  const counts = typeof rle.counts === 'string' ? rleCountsFromString(rle.counts, `${where}.counts`) : rle.counts;
  if (!Array.isArray(counts)) throw new Error(`${where}.counts must be an array of run lengths or a compressed string, got ${typeof counts}`);
  checkCounts(counts, height * width, `${where}.counts`);
  const mask = new Uint8Array(height * width);
  let i = 0;
  for (let r = 0; r < counts.length; r++) {
    const end = i + counts[r]!;
    if (r % 2 === 1) {
      for (; i < end; i++) mask[(i % height) * width + Math.floor(i / height)] = 1;
    }
    i = end;
  }
  return mask;
}

/** The compressed COCO RLE of a row-major [height, width] mask (nonzero = object). */
export function encodeRle(mask: Uint8Array, height: number, width: number): { size: [number, number]; counts: string } {
  if (mask.length !== height * width) throw new RangeError(`encodeRle: the mask holds ${mask.length} values, ${height}x${width} is ${height * width}`);
  const counts: number[] = [];
  let value = 0;
  let run = 0;
  for (let x = 0; x < width; x++) {
    for (let y = 0; y < height; y++) {
      const v = mask[y * width + x] !== 0 ? 1 : 0;
      if (v !== value) {
        counts.push(run);
        run = 0;
        value = v;
      }
      run++;
    }
  }
  counts.push(run);
  return { size: [height, width], counts: rleCountsToString(counts) };
}

// ---------------------------------------------------------------------------
// COCO folders

export interface CocoFolderOptions {
  /** The images' folder under root, and the annotation file's suffix. Default 'val2017'. */
  split?: string;
  /** Default: root/annotations/instances_<split>.json. */
  annotations?: string;
  /** Use only the first N images (in image id order). */
  limit?: number;
}

export interface CocoDataset extends DetectionDataset {
  readonly root: string;
  /** The COCO category id of each contiguous class id. */
  readonly categoryIds: number[];
  /** The COCO image id of each sample, ascending. */
  readonly imageIds: number[];
  /**
   * Annotations left out because no polygon of theirs has 3 points (detectron2 drops these too),
   * over the whole file (not only the first `limit` images).
   */
  readonly droppedAnnotations: number;
}

type CocoSegmentation = { kind: 'polygons'; polygons: number[][] } | { kind: 'rle'; rle: Rle };

interface CocoAnnotation {
  category: number;
  box: [number, number, number, number];
  area: number | undefined;
  iscrowd: boolean;
  segmentation: CocoSegmentation;
  where: string;
}

interface CocoImage {
  id: number;
  file: string;
  width: number;
  height: number;
  annotations: CocoAnnotation[];
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isFiniteNumber = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v);

/** Reads and validates a COCO instances file; every error names the file and the field. */
function parseCoco(text: string, file: string): { images: CocoImage[]; classes: string[]; categoryIds: number[]; dropped: number } {
  const fail = (field: string, message: string): never => {
    throw new Error(`COCO annotations '${file}': ${field} ${message}`);
  };
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new Error(`COCO annotations '${file}' is not valid JSON: ${(e as Error).message}`);
  }
  if (!isObject(json)) return fail('the top level', 'must be an object with images, annotations and categories');
  for (const key of ['images', 'annotations', 'categories']) if (!Array.isArray(json[key])) fail(key, `must be an array, got ${json[key] === undefined ? 'nothing' : typeof json[key]}`);

  const categories = json.categories as unknown[];
  const seenCategories = new Map<number, string>();
  categories.forEach((c, i) => {
    const where = `categories[${i}]`;
    if (!isObject(c)) fail(where, 'must be an object with id and name');
    const { id, name } = c as Record<string, unknown>;
    if (!Number.isSafeInteger(id)) fail(`${where}.id`, `must be an integer, got ${JSON.stringify(id)}`);
    if (typeof name !== 'string') fail(`${where}.name`, `must be a string, got ${JSON.stringify(name)}`);
    if (seenCategories.has(id as number)) fail(`${where}.id`, `${id as number} is used by another category too`);
    seenCategories.set(id as number, name as string);
  });
  if (seenCategories.size === 0) fail('categories', 'is empty');
  // detectron2's contiguous ids: the COCO ids in ascending order.
  const categoryIds = [...seenCategories.keys()].sort((a, b) => a - b);
  const classes = categoryIds.map((id) => seenCategories.get(id)!);
  const contiguous = new Map(categoryIds.map((id, i) => [id, i]));

  const byId = new Map<number, CocoImage>();
  (json.images as unknown[]).forEach((img, i) => {
    const where = `images[${i}]`;
    if (!isObject(img)) fail(where, 'must be an object with id, file_name, width and height');
    const { id, file_name: fileName, width, height } = img as Record<string, unknown>;
    if (!Number.isSafeInteger(id)) fail(`${where}.id`, `must be an integer, got ${JSON.stringify(id)}`);
    if (typeof fileName !== 'string' || fileName.length === 0) fail(`${where}.file_name`, `must be a non-empty string, got ${JSON.stringify(fileName)}`);
    for (const [key, v] of [['width', width], ['height', height]] as const) if (!Number.isInteger(v) || (v as number) < 1) fail(`${where}.${key}`, `must be a positive integer, got ${JSON.stringify(v)}`);
    if (byId.has(id as number)) fail(`${where}.id`, `${id as number} is used by another image too`);
    byId.set(id as number, { id: id as number, file: fileName as string, width: width as number, height: height as number, annotations: [] });
  });

  let dropped = 0;
  (json.annotations as unknown[]).forEach((a, i) => {
    const where = `annotations[${i}]`;
    if (!isObject(a)) fail(where, 'must be an object');
    const ann = a as Record<string, unknown>;
    const image = byId.get(ann.image_id as number);
    if (!Number.isSafeInteger(ann.image_id) || !image) fail(`${where}.image_id`, `${JSON.stringify(ann.image_id)} is no id in images`);
    const category = contiguous.get(ann.category_id as number);
    if (!Number.isSafeInteger(ann.category_id) || category === undefined) fail(`${where}.category_id`, `${JSON.stringify(ann.category_id)} is no id in categories`);
    const bbox = ann.bbox;
    if (!Array.isArray(bbox) || bbox.length !== 4 || !bbox.every(isFiniteNumber) || bbox[2] < 0 || bbox[3] < 0) {
      fail(`${where}.bbox`, `must be [x, y, width, height], four finite numbers with width and height >= 0, got ${JSON.stringify(bbox)}`);
    }
    const [bx, by, bw, bh] = bbox as number[];
    if (ann.area !== undefined && (!isFiniteNumber(ann.area) || ann.area < 0)) fail(`${where}.area`, `must be a non-negative number, got ${JSON.stringify(ann.area)}`);
    const crowd = ann.iscrowd ?? 0;
    if (crowd !== 0 && crowd !== 1 && crowd !== true && crowd !== false) fail(`${where}.iscrowd`, `must be 0 or 1, got ${JSON.stringify(crowd)}`);
    const segm = ann.segmentation;
    let segmentation: CocoSegmentation;
    if (Array.isArray(segm)) {
      const polygons: number[][] = [];
      segm.forEach((poly, j) => {
        if (!Array.isArray(poly) || !poly.every(isFiniteNumber)) fail(`${where}.segmentation[${j}]`, 'must be a polygon, an array of finite numbers x1, y1, x2, y2, ...');
        if ((poly as number[]).length % 2 !== 0) fail(`${where}.segmentation[${j}]`, `has ${(poly as number[]).length} coordinates, an odd count (x, y pairs expected)`);
        if ((poly as number[]).length >= 6) polygons.push(poly as number[]);
      });
      if (polygons.length === 0) {
        dropped++;
        return;
      }
      segmentation = { kind: 'polygons', polygons };
    } else if (isObject(segm)) {
      const size = checkSize(segm.size, `COCO annotations '${file}': ${where}.segmentation.size`);
      if (size[0] !== image!.height || size[1] !== image!.width) {
        fail(`${where}.segmentation.size`, `is [${size.join(', ')}], its image ${image!.id} is ${image!.height}x${image!.width} ([height, width] expected)`);
      }
      const counts = segm.counts;
      if (Array.isArray(counts)) {
        try {
          checkCounts(counts, size[0] * size[1], `${where}.segmentation.counts`);
        } catch (e) {
          throw new Error(`COCO annotations '${file}': ${(e as Error).message}`);
        }
      } else if (typeof counts !== 'string') {
        fail(`${where}.segmentation.counts`, `must be an array of run lengths or a compressed RLE string, got ${JSON.stringify(counts)}`);
      }
      segmentation = { kind: 'rle', rle: { size, counts: counts as number[] | string } };
    } else {
      return fail(`${where}.segmentation`, `must be a list of polygons or an RLE object {counts, size}, got ${JSON.stringify(segm)}`);
    }
    image!.annotations.push({
      category: category!,
      box: [bx!, by!, bx! + bw!, by! + bh!],
      area: ann.area as number | undefined,
      iscrowd: crowd === 1 || crowd === true,
      segmentation,
      where,
    });
  });
  const images = [...byId.values()].sort((a, b) => a.id - b.id);
  return { images, classes, categoryIds, dropped };
}

/** Decodes one image file to [h, w, 3] RGB, naming the file on any failure. */
async function decodeRgb(file: string, image: CocoImage): Promise<Uint8Array> {
  let decoded: { data: Buffer; info: sharp.OutputInfo };
  try {
    decoded = await sharp(file, { failOn: 'warning' }).removeAlpha().toColourspace('srgb').raw().toBuffer({ resolveWithObject: true });
  } catch (e) {
    throw new Error(`COCO image '${file}' (image id ${image.id}) cannot be read: ${(e as Error).message}`);
  }
  const { width, height, channels } = decoded.info;
  if (channels !== 3) throw new Error(`COCO image '${file}' (image id ${image.id}) decoded to ${channels} channels, not RGB`);
  if (width !== image.width || height !== image.height) {
    throw new Error(`COCO image '${file}' (image id ${image.id}) is ${width}x${height}, its annotations say ${image.width}x${image.height}`);
  }
  return new Uint8Array(decoded.data.buffer, decoded.data.byteOffset, decoded.data.length);
}

/** The tight x1y1x2y2 box and pixel count of a mask; an empty mask has area 0 and box [0,0,0,0]. */
function maskExtent(mask: Uint8Array, height: number, width: number): { box: [number, number, number, number]; pixels: number } {
  let x1 = width;
  let y1 = height;
  let x2 = 0;
  let y2 = 0;
  let pixels = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (mask[y * width + x] === 0) continue;
      pixels++;
      if (x < x1) x1 = x;
      if (x + 1 > x2) x2 = x + 1;
      if (y < y1) y1 = y;
      y2 = y + 1;
    }
  }
  return pixels === 0 ? { box: [0, 0, 0, 0], pixels } : { box: [x1, y1, x2, y2], pixels };
}

/**
 * A COCO-format dataset under `root`: the images of `root/<split>/` listed in the annotation file,
 * in image id order (as detectron2 lists them), images without annotations included. The file is
 * validated when opened; an image file that is missing, unreadable or not of its listed size
 * makes its `sample()` reject naming the file, so a loader can skip and count it. Boxes are the
 * annotations' bbox (not recomputed from the masks), area is the annotation's `area` (the mask's
 * pixel count where absent). Images are not EXIF-rotated (the annotations refer to the stored
 * pixels, as the listed width and height do).
 */
export async function openCocoFolder(root: string, options: CocoFolderOptions = {}): Promise<CocoDataset> {
  const split = options.split ?? 'val2017';
  const annotationFile = options.annotations ?? path.join(root, 'annotations', `instances_${split}.json`);
  let text: string;
  try {
    text = await readFile(annotationFile, 'utf8');
  } catch (e) {
    throw new Error(`COCO folder '${root}': cannot read the annotations '${annotationFile}' (expected annotations/instances_<split>.json): ${(e as Error).message}`);
  }
  const parsed = parseCoco(text, annotationFile);
  if (options.limit !== undefined && (!Number.isInteger(options.limit) || options.limit < 1)) throw new RangeError(`COCO folder '${root}': limit must be a positive integer, got ${String(options.limit)}`);
  const length = Math.min(parsed.images.length, options.limit ?? parsed.images.length);
  if (length < 1) throw new Error(`COCO annotations '${annotationFile}': images is empty`);
  const images = parsed.images.slice(0, length);
  const imageDir = path.join(root, split);
  const name = `${path.basename(path.resolve(root))}-${split}`;
  return {
    name,
    length,
    root,
    classes: parsed.classes,
    categoryIds: parsed.categoryIds,
    imageIds: images.map((img) => img.id),
    droppedAnnotations: parsed.dropped,
    async sample(index: number): Promise<DetectionSample> {
      checkIndex(index, length, name);
      const image = images[index]!;
      const file = path.join(imageDir, image.file);
      const pixels = await decodeRgb(file, image);
      const instances = image.annotations.map((a): DetectionInstance => {
        let mask: Uint8Array;
        if (a.segmentation.kind === 'polygons') mask = rasterizePolygons(a.segmentation.polygons, image.height, image.width);
        else {
          try {
            mask = decodeRle(a.segmentation.rle, `${a.where}.segmentation`);
          } catch (e) {
            throw new Error(`COCO annotations '${annotationFile}': ${(e as Error).message}`);
          }
        }
        const instance: DetectionInstance = { category: a.category, box: [...a.box], mask, area: a.area ?? maskExtent(mask, image.height, image.width).pixels, iscrowd: a.iscrowd };
        if (a.segmentation.kind === 'polygons') instance.polygons = a.segmentation.polygons.map((p) => [...p]);
        return instance;
      });
      return { image: pixels, width: image.width, height: image.height, instances, id: image.id };
    },
    describe(index: number): string {
      const image = images[index];
      return image ? path.join(imageDir, image.file) : `${name}#${index}`;
    },
  };
}

/** The tight box of a mask, x2/y2 exclusive; [0, 0, 0, 0] when it is empty. */
export function maskBox(mask: Uint8Array, height: number, width: number): [number, number, number, number] {
  return maskExtent(mask, height, width).box;
}
