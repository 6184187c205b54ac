/**
 * The official DET data pipeline (detectron2's large-scale jitter, LSJ, as the in-repo
 * `DET/configs/convmae` configs set it), for an image and its objects at their original size:
 *
 * - train: ResizeScale (a scale drawn from U(min, max), default [0.1, 2.0], of the target
 *   S x S: the image scaled by min(scale S / h, scale S / w), sides rounded; resized by PIL's
 *   BILINEAR, antialiased when shrinking, as detectron2's ResizeTransform resizes uint8 images),
 *   then FixedSizeCrop S x S (one uniform draw u, offset round(u * max(0, new - S)) on
 *   each axis) padded right and bottom to S x S, then RandomFlip (horizontal, p 0.5) of the whole
 *   S x S canvas, padding included. Crowd regions are dropped from the training targets, as
 *   detectron2's mapper drops them. S is the model's img_size (1024 officially).
 *   Objects with polygons (COCO's, the official configs' mask format) are moved as detectron2
 *   moves PolygonMasks: their vertices scaled, clipped to the crop, shifted and mirrored;
 *   `recompute_boxes` takes the box of the moved vertices, and the mask at S x S is their
 *   rasterization as pycocotools does it. The clipping is Sutherland-Hodgman's, its zero-area
 *   spikes removed and slivers of zero area dropped; detectron2 uses shapely, which splits a
 *   polygon the crop cuts in two (ours keeps it whole, its parts joined along the crop's border:
 *   the same pixels and vertices) and first repairs a self-intersecting polygon by buffer(0),
 *   which drops some of its lobes (ours clips it as it is). Against shapely and pycocotools on
 *   random star-shaped polygons, masks and boxes are the same for every case of valid polygons
 *   and differ in about a fifth of the cases with a self-intersecting one
 *   (benches/results/polygon-clip-2026-11-28.md). Objects given by a mask alone (the digit
 *   scenes, RLE) have it resized nearest (PIL's NEAREST, pixel centres, as detectron2's
 *   BitMasks) and the box is the mask's tight box. Objects left without a box of positive size
 *   are dropped (detectron2's `filter_empty_instances`).
 * - test: ResizeShortestEdge(S, max S), which for a square S is a scale of S / max(h, w),
 *   PIL's BILINEAR, then FixedSizeCrop's padding right and bottom to S x S.
 *
 * Padding: pixels are padded with 128, FixedSizeCrop's default `pad_value`, which the configs
 * keep; masks with 0.
 *
 * With `imageList` (Official-ConvMAE-Det, spec section 6.2): FixedSizeCrop(pad=False) and the
 * flip first, so the flip mirrors the image itself, not the padded canvas, and the crop is not
 * padded; the sample keeps the S x S layout with the image at the top left, its size in
 * `extent`, and the rest 0, which the model then pads as detectron2's ImageList does (0 after
 * normalizing: `AnnotatedBatch.extents`). Flipping first then cropping at offset round(u * m)
 * is cropping at m - round(u * m) then flipping the crop: the same distribution, drawn here from
 * the same u. The test transform is the same resize without the padding, its extent the resized
 * size.
 */
import { uniform, type Rng } from './rng.js';
import { rasterizePolygons, type DetectionInstance, type DetectionSample } from './detection.js';
import { native } from '../native.js';

/** What padding pixels hold: detectron2 FixedSizeCrop's `pad_value`. */
export const DETECTION_PAD_PIXEL = 128;
/** detectron2 LSJ's ResizeScale range. */
export const LSJ_SCALE_RANGE: readonly [number, number] = [0.1, 2.0];

/** detectron2 ResizeScale's output [height, width] of an h x w image at `scale` of the S x S target. */
export function lsjResizedSize(height: number, width: number, size: number, scale: number): [number, number] {
  const factor = Math.min((scale * size) / height, (scale * size) / width);
  // np.round: halves to even.
  return [Math.max(1, roundHalfEven(height * factor)), Math.max(1, roundHalfEven(width * factor))];
}

function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** A row-major RGB image mirrored left to right. */
function flipRgb(src: Uint8Array, width: number, height: number): Uint8Array {
  const out = new Uint8Array(src.length);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const s = (y * width + x) * 3;
      const d = (y * width + width - 1 - x) * 3;
      out[d] = src[s]!;
      out[d + 1] = src[s + 1]!;
      out[d + 2] = src[s + 2]!;
    }
  }
  return out;
}

export interface DetectionTrainTransformOptions {
  /** ResizeScale's [min, max] scale of S; default [0.1, 2.0] (official). */
  scaleRange?: readonly [number, number];
  /** Official-ConvMAE-Det's layout (see the module comment): the image at the top left, unpadded, its size in `extent`. */
  imageList?: boolean;
}

/** A transformed sample: S x S, with the [height, width] the image fills at its top left where the model pads (`imageList`). */
export interface TransformedDetectionSample extends DetectionSample {
  extent?: [number, number];
}

/**
 * The train transform of the module comment: an S x S sample whose instances (crowd regions
 * left out) carry masks at S x S, boxes recomputed from them and area = their pixel count.
 * Draws from `rng` in the order of the augmentations: scale, crop offset, flip.
 */
export function detectionTrainTransform(sample: DetectionSample, size: number, rng: Rng, options: DetectionTrainTransformOptions = {}): TransformedDetectionSample {
  const [minScale, maxScale] = options.scaleRange ?? LSJ_SCALE_RANGE;
  if (!(Number.isFinite(minScale) && Number.isFinite(maxScale) && minScale > 0 && maxScale >= minScale)) {
    throw new RangeError(`scaleRange must be [min, max] with 0 < min <= max, got [${String(minScale)}, ${String(maxScale)}]`);
  }
  const { width: w, height: h } = sample;
  const scale = uniform(rng, minScale, maxScale);
  const [nh, nw] = lsjResizedSize(h, w, size, scale);
  const u = uniform(rng, 0, 1);
  const flip = uniform(rng, 0, 1) < 0.5;
  const top = Math.round(Math.max(0, nh - size) * u);
  const left = Math.round(Math.max(0, nw - size) * u);
  const ch = Math.min(size, nh);
  const cw = Math.min(size, nw);

  const imageList = options.imageList === true;
  // The width the flip mirrors: the padded canvas (DET) or the image itself (ImageList layout).
  const mirrored = imageList ? cw : size;
  const resized = resizeBilinearPil(sample.image, w, h, nw, nh);
  const canvas = new Uint8Array(size * size * 3).fill(imageList ? 0 : DETECTION_PAD_PIXEL);
  for (let y = 0; y < ch; y++) {
    const row = resized.subarray(((top + y) * nw + left) * 3, ((top + y) * nw + left + cw) * 3);
    canvas.set(flip && imageList ? flipRgb(row, cw, 1) : row, y * size * 3);
  }
  const image = flip && !imageList ? flipRgb(canvas, size, size) : canvas;

  // Nearest resize of a mask (PIL's NEAREST, as detectron2 resizes BitMasks), read only where
  // the crop keeps it; flipped with the canvas.
  const sourceRows = pilNearestSource(h, nh);
  const sourceCols = pilNearestSource(w, nw);
  const rows = new Int32Array(ch);
  for (let y = 0; y < ch; y++) rows[y] = sourceRows[top + y]! * w;
  const cols = sourceCols.subarray(left, left + cw);
  const instances: DetectionInstance[] = [];
  for (const instance of sample.instances) {
    if (instance.iscrowd) continue;
    if (instance.polygons) {
      const moved = movePolygons(instance.polygons, { scaleX: nw / w, scaleY: nh / h, left, top, cropWidth: cw, cropHeight: ch, flipWidth: flip ? mirrored : undefined });
      const box = polygonsBox(moved);
      // detectron2's Boxes.nonempty threshold.
      if (!(box[2] - box[0] > 1e-5 && box[3] - box[1] > 1e-5)) continue;
      const mask = rasterizePolygons(moved, size, size);
      instances.push({ category: instance.category, box, mask, area: mask.reduce((n, v) => n + v, 0), iscrowd: false, polygons: moved });
      continue;
    }
    const mask = new Uint8Array(size * size);
    let x1 = size;
    let y1 = size;
    let x2 = 0;
    let y2 = 0;
    let area = 0;
    for (let y = 0; y < ch; y++) {
      const row = rows[y]!;
      for (let cx = 0; cx < cw; cx++) {
        if (instance.mask[row + cols[cx]!] === 0) continue;
        const x = flip ? mirrored - 1 - cx : cx;
        mask[y * size + x] = 1;
        area++;
        if (x < x1) x1 = x;
        if (x + 1 > x2) x2 = x + 1;
        if (y < y1) y1 = y;
        y2 = y + 1;
      }
    }
    if (area === 0) continue;
    instances.push({ category: instance.category, box: [x1, y1, x2, y2], mask, area, iscrowd: false });
  }
  return { image, width: size, height: size, instances, id: sample.id, ...(imageList ? { extent: [ch, cw] as [number, number] } : {}) };
}

/**
 * The source index of each of `outputs` pixels when PIL resizes `inputs` pixels to them with
 * NEAREST: the position under each output pixel's centre, stepped as PIL steps it (start at half
 * the scale, add the scale per pixel, in floating point, truncate), which can differ from
 * floor((o + 0.5) * inputs / outputs) by one where that lands on an integer.
 */
export function pilNearestSource(inputs: number, outputs: number): Int32Array {
  const source = new Int32Array(outputs);
  const step = inputs / outputs;
  let at = step * 0.5;
  for (let o = 0; o < outputs; o++) {
    source[o] = Math.min(Math.trunc(at), inputs - 1);
    at += step;
  }
  return source;
}

/**
 * An RGB image resized as PIL's Image.resize(BILINEAR) resizes it, which detectron2's
 * ResizeTransform uses for uint8 images (ResizeScale, ResizeShortestEdge): the triangle filter
 * widened by the scale when shrinking (antialiased, unlike cv2's 2-tap bilinear), 22-bit
 * fixed-point taps, the horizontal pass first, rounded to bytes between the passes. The native
 * module does it (crates/convmae-core/src/imaging.rs, Pillow's resampling, which also gives the
 * pretraining crops their BICUBIC); test/oracles.test.ts checks both filters against Pillow.
 */
export function resizeBilinearPil(src: Uint8Array, width: number, height: number, outWidth: number, outHeight: number): Uint8Array {
  return native.resizePil(src, width, height, outWidth, outHeight, 'bilinear');
}

/** How the train transform moves polygon vertices: see movePolygons. */
interface PolygonMove {
  /** ResizeScale's factors: new size / old size per axis. */
  scaleX: number;
  scaleY: number;
  /** FixedSizeCrop's crop of the resized image. */
  left: number;
  top: number;
  cropWidth: number;
  cropHeight: number;
  /** The canvas width when flipped (x becomes width - x), else undefined. */
  flipWidth: number | undefined;
}

/**
 * Polygons through ResizeScale, FixedSizeCrop and RandomFlip, as detectron2 moves PolygonMasks:
 * vertices scaled, each polygon clipped to the crop box (slivers of zero area dropped), shifted
 * to the crop's origin and mirrored.
 */
export function movePolygons(polygons: readonly (readonly number[])[], move: PolygonMove): number[][] {
  const out: number[][] = [];
  const [x0, y0, x1, y1] = [move.left, move.top, move.left + move.cropWidth, move.top + move.cropHeight];
  for (const polygon of polygons) {
    const scaled: number[] = [];
    for (let i = 0; i + 1 < polygon.length; i += 2) scaled.push(polygon[i]! * move.scaleX, polygon[i + 1]! * move.scaleY);
    const clipped = clipPolygonToBox(scaled, x0, y0, x1, y1);
    if (clipped.length < 6 || polygonArea(clipped) === 0) continue;
    for (let i = 0; i < clipped.length; i += 2) {
      const x = clipped[i]! - x0;
      clipped[i] = move.flipWidth === undefined ? x : move.flipWidth - x;
      clipped[i + 1] = clipped[i + 1]! - y0;
    }
    out.push(clipped);
  }
  return out;
}

/**
 * Sutherland-Hodgman clipping of a polygon (x, y pairs) to the box [x0, x1] x [y0, y1], then its
 * zero-area spikes removed (`withoutSpikes`). A concave polygon the box cuts into parts comes
 * back as one polygon whose parts are joined by edges along the box's border, not split as
 * shapely splits it: the same pixels (pycocotools rasterizes the joining edges to nothing) and
 * the same vertices. Where part of the polygon runs outside around a corner of the box, the clip
 * leaves a spike out to that corner and back, which is not a vertex of shapely's intersection
 * and would stretch the box recomputed from the vertices; removing the spikes gives shapely's
 * box (benches/results/polygon-clip-2026-11-28.md).
 */
export function clipPolygonToBox(polygon: readonly number[], x0: number, y0: number, x1: number, y1: number): number[] {
  // Each edge of the box: which side is inside, and where a segment crosses it.
  const edges: [(x: number, y: number) => boolean, (ax: number, ay: number, bx: number, by: number) => [number, number]][] = [
    [(x) => x >= x0, (ax, ay, bx, by) => [x0, ay + ((by - ay) * (x0 - ax)) / (bx - ax)]],
    [(x) => x <= x1, (ax, ay, bx, by) => [x1, ay + ((by - ay) * (x1 - ax)) / (bx - ax)]],
    [(_, y) => y >= y0, (ax, ay, bx, by) => [ax + ((bx - ax) * (y0 - ay)) / (by - ay), y0]],
    [(_, y) => y <= y1, (ax, ay, bx, by) => [ax + ((bx - ax) * (y1 - ay)) / (by - ay), y1]],
  ];
  let points = [...polygon];
  for (const [inside, cross] of edges) {
    const n = points.length / 2;
    if (n === 0) break;
    const kept: number[] = [];
    for (let i = 0; i < n; i++) {
      const [ax, ay] = [points[2 * ((i + n - 1) % n)]!, points[2 * ((i + n - 1) % n) + 1]!];
      const [bx, by] = [points[2 * i]!, points[2 * i + 1]!];
      const aIn = inside(ax, ay);
      const bIn = inside(bx, by);
      if (bIn) {
        if (!aIn) kept.push(...cross(ax, ay, bx, by));
        kept.push(bx, by);
      } else if (aIn) kept.push(...cross(ax, ay, bx, by));
    }
    points = kept;
  }
  return withoutSpikes(points);
}

/**
 * A polygon (x, y pairs) without repeated vertices and without spikes: vertices where the
 * boundary reverses along a line (collinear with both neighbours, the path doubling back), which
 * enclose no area. Repeated until none is left, as removing one can expose another.
 */
export function withoutSpikes(polygon: readonly number[]): number[] {
  let points = [...polygon];
  for (let changed = true; changed && points.length >= 6; ) {
    changed = false;
    const n = points.length / 2;
    for (let i = 0; i < n; i++) {
      const [ux, uy] = [points[2 * ((i + n - 1) % n)]!, points[2 * ((i + n - 1) % n) + 1]!];
      const [vx, vy] = [points[2 * i]!, points[2 * i + 1]!];
      const [wx, wy] = [points[2 * ((i + 1) % n)]!, points[2 * ((i + 1) % n) + 1]!];
      const [ax, ay, bx, by] = [vx - ux, vy - uy, wx - vx, wy - vy];
      const repeated = ax === 0 && ay === 0;
      const reversal = ax * by - ay * bx === 0 && ax * bx + ay * by < 0;
      if (repeated || reversal) {
        points.splice(2 * i, 2);
        changed = true;
        break;
      }
    }
  }
  return points;
}

/** The shoelace area of a polygon (x, y pairs), unsigned. */
function polygonArea(polygon: readonly number[]): number {
  const n = polygon.length / 2;
  let twice = 0;
  for (let i = 0, j = n - 1; i < n; j = i++) twice += polygon[2 * j]! * polygon[2 * i + 1]! - polygon[2 * i]! * polygon[2 * j + 1]!;
  return Math.abs(twice) / 2;
}

/** detectron2's PolygonMasks.get_bounding_boxes: min and max over all vertices; zeros when none. */
function polygonsBox(polygons: readonly (readonly number[])[]): [number, number, number, number] {
  let [x1, y1, x2, y2] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const p of polygons) {
    for (let i = 0; i + 1 < p.length; i += 2) {
      x1 = Math.min(x1, p[i]!);
      x2 = Math.max(x2, p[i]!);
      y1 = Math.min(y1, p[i + 1]!);
      y2 = Math.max(y2, p[i + 1]!);
    }
  }
  return Number.isFinite(x1) ? [x1, y1, x2, y2] : [0, 0, 0, 0];
}

/**
 * detectron2's ResizeShortestEdge.get_output_shape: the short side to `short`, then both scaled
 * down if the long side passes `maxSize`, each rounded by int(x + 0.5), in its order of
 * operations (for the square test input, a scale of S / max(h, w) up to the last bits).
 */
export function shortestEdgeSize(height: number, width: number, short: number, maxSize: number): [number, number] {
  const scale = short / Math.min(height, width);
  let [newHeight, newWidth] = height < width ? [short, scale * width] : [scale * height, short];
  if (Math.max(newHeight, newWidth) > maxSize) {
    const down = maxSize / Math.max(newHeight, newWidth);
    newHeight *= down;
    newWidth *= down;
  }
  return [Math.max(1, Math.trunc(newHeight + 0.5)), Math.max(1, Math.trunc(newWidth + 0.5))];
}

/** An image as the test transform gives it to the model, and how it maps back. */
export interface DetectionTestInput {
  /** [S, S, 3]: the resized image at the top left, padded. */
  image: Uint8Array;
  /** The resized image's size inside the S x S input. */
  resizedHeight: number;
  resizedWidth: number;
  /** Input pixels per original pixel: S / max(h, w). */
  scale: number;
  /**
   * The square in original pixels that the S x S input covers, max(h, w) on each side: the
   * output size to ask `Detector.detect` for, so boxes and masks come back in original pixels
   * (then cut to the image's h x w).
   */
  canvas: number;
}

/** The test transform of the module comment (`imageList`: padded with 0, for the model to pad as ImageList does). */
export function detectionTestResize(sample: Pick<DetectionSample, 'image' | 'width' | 'height'>, size: number, options: { imageList?: boolean } = {}): DetectionTestInput {
  const { width: w, height: h } = sample;
  const canvas = Math.max(w, h);
  const scale = size / canvas;
  const [nh, nw] = shortestEdgeSize(h, w, size, size);
  const resized = resizeBilinearPil(sample.image, w, h, nw, nh);
  if (nh === size && nw === size) return { image: resized, resizedHeight: nh, resizedWidth: nw, scale, canvas };
  const image = new Uint8Array(size * size * 3).fill(options.imageList ? 0 : DETECTION_PAD_PIXEL);
  for (let y = 0; y < nh; y++) image.set(resized.subarray(y * nw * 3, (y + 1) * nw * 3), y * size * 3);
  return { image, resizedHeight: nh, resizedWidth: nw, scale, canvas };
}
