/**
 * COCO's detection evaluation (the protocol of pycocotools' COCOeval, iouType 'bbox' or 'segm'),
 * so that detection and instance segmentation runs report the numbers papers quote (ConvMAE's
 * Mask R-CNN results are COCO box AP and mask AP) without a Python round trip.
 *
 * The protocol, step by step as COCOeval runs it:
 * - per image and category: detections sorted by score (stable) and cut to the last maxDets
 *   (100); ground truths ignored when crowd or outside the area range, the others first;
 *   greedy matching in detection order at each IoU threshold;
 * - per category, area range and maxDets: the kept detections of all images (in ascending image
 *   id) sorted by score, cumulative TP / FP, the precision envelope read at 101 recall points;
 * - the 12 summary numbers: means over the defined entries (-1 where none is).
 * Masks are kept as runs of set pixels, as COCO keeps RLEs: a raw mask per detection would not
 * fit in memory at COCO's size (5000 images x 100 detections x ~300k pixels).
 */

/** x1, y1, x2, y2 in pixels. */
export type Box = [number, number, number, number];

export type IouType = 'bbox' | 'segm';

export interface EvalImage {
  id: number;
  width: number;
  height: number;
}

export interface EvalGroundTruth {
  imageId: number;
  category: number;
  /** x1, y1, x2, y2 in pixels. */
  box: Box;
  /** COCO's annotation area (what the area ranges test). Default: the mask's pixel count if a mask is given, else the box's area. */
  area?: number;
  /** height * width of the image, row-major, nonzero = inside. Required for 'segm'. */
  mask?: Uint8Array;
  /** A crowd region: never a false negative, and detections on it are neither TP nor FP. */
  iscrowd?: boolean;
}

export interface EvalDetection {
  imageId: number;
  category: number;
  score: number;
  /** x1, y1, x2, y2 in pixels. */
  box: Box;
  /** height * width of the image, row-major, nonzero = inside. Required for 'segm'. */
  mask?: Uint8Array;
}

/** The names of COCOeval.summarize()'s 12 numbers, in its order. */
export const SUMMARY_KEYS = ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl'] as const;
export type SummaryKey = (typeof SUMMARY_KEYS)[number];

/** COCOeval.summarize()'s 12 numbers as fractions in [0, 1]; -1 where COCO prints -1 (nothing defined). */
export interface DetectionScores {
  /** IoU .50:.95, area all, maxDets 100 (the headline AP). */
  AP: number;
  AP50: number;
  AP75: number;
  APs: number;
  APm: number;
  APl: number;
  /** Area all; maxDets 1, 10, 100. */
  AR1: number;
  AR10: number;
  AR100: number;
  /** maxDets 100. */
  ARs: number;
  ARm: number;
  ARl: number;
  /** AP at IoU .50:.95, area all, maxDets 100, per category (as detectron2 reports it); -1 where undefined. */
  perCategoryAP: Map<number, number>;
  images: number;
  groundTruths: number;
  detections: number;
}

/** numpy's linspace(start, stop, num): i * step + start with the last point set to stop, so thresholds compare as in COCO (.75 is exactly 0.75, .9 is 0.8999999999999999). */
function linspace(start: number, stop: number, num: number): number[] {
  const step = (stop - start) / (num - 1);
  const values = Array.from({ length: num }, (_, i) => i * step + start);
  values[num - 1] = stop;
  return values;
}

/** COCO's iouThrs: .50:.05:.95. */
export const IOU_THRESHOLDS: readonly number[] = linspace(0.5, 0.95, 10);
/** COCO's recThrs: 0:.01:1. */
export const RECALL_THRESHOLDS: readonly number[] = linspace(0, 1, 101);
export const MAX_DETS: readonly number[] = [1, 10, 100];
/** COCO's areaRng, inclusive at both ends (an area is outside when < lo or > hi). */
export const AREA_RANGES: Readonly<Record<'all' | 'small' | 'medium' | 'large', readonly [number, number]>> = {
  all: [0, 1e10],
  small: [0, 32 ** 2],
  medium: [32 ** 2, 96 ** 2],
  large: [96 ** 2, 1e10],
};
const AREAS = [AREA_RANGES.all, AREA_RANGES.small, AREA_RANGES.medium, AREA_RANGES.large];

/** Set pixels as sorted [start, end) runs over the row-major pixels, with their count. */
interface Runs {
  runs: Uint32Array;
  area: number;
}

function toRuns(mask: Uint8Array): Runs {
  const runs: number[] = [];
  let area = 0;
  let start = -1;
  for (let i = 0; i < mask.length; i++) {
    if (mask[i] !== 0) {
      if (start < 0) start = i;
    } else if (start >= 0) {
      runs.push(start, i);
      area += i - start;
      start = -1;
    }
  }
  if (start >= 0) {
    runs.push(start, mask.length);
    area += mask.length - start;
  }
  return { runs: Uint32Array.from(runs), area };
}

function runsIntersection(a: Uint32Array, b: Uint32Array): number {
  let i = 0;
  let j = 0;
  let total = 0;
  while (i < a.length && j < b.length) {
    const lo = Math.max(a[i]!, b[j]!);
    const hi = Math.min(a[i + 1]!, b[j + 1]!);
    if (hi > lo) total += hi - lo;
    if (a[i + 1]! < b[j + 1]!) i += 2;
    else j += 2;
  }
  return total;
}

/** COCO's maskUtils.iou of one pair: intersection / union, or intersection / detection area against a crowd; 0 without overlap. */
function runsIoU(dt: Runs, gt: Runs, crowd: boolean): number {
  const inter = runsIntersection(dt.runs, gt.runs);
  if (inter === 0) return 0;
  return inter / (crowd ? dt.area : dt.area + gt.area - inter);
}

/** x, y, w, h as COCO stores boxes (w = x2 - x1, no +1), so the IoU arithmetic rounds as COCO's does. */
type Xywh = [number, number, number, number];

function toXywh(box: Box): Xywh {
  return [box[0], box[1], box[2] - box[0], box[3] - box[1]];
}

/** COCO's bbIou of one pair (maskApi.c), on x, y, w, h boxes. */
function xywhIoU(d: Xywh, g: Xywh, crowd: boolean): number {
  const w = Math.min(d[2] + d[0], g[2] + g[0]) - Math.max(d[0], g[0]);
  if (w <= 0) return 0;
  const h = Math.min(d[3] + d[1], g[3] + g[1]) - Math.max(d[1], g[1]);
  if (h <= 0) return 0;
  const i = w * h;
  const da = d[2] * d[3];
  return i / (crowd ? da : da + g[2] * g[3] - i);
}

/**
 * COCO's box IoU of a detection box and a ground-truth box (x1, y1, x2, y2). Against a crowd
 * region the overlap is divided by the detection's area alone: a detection inside a crowd counts
 * as on it however large the crowd is.
 */
export function boxIoU(detection: Box, groundTruth: Box, crowd = false): number {
  return xywhIoU(toXywh(detection), toXywh(groundTruth), crowd);
}

/** COCO's mask IoU of two same-size masks (nonzero = inside); against a crowd, intersection / detection pixels. */
export function maskIoU(detection: Uint8Array, groundTruth: Uint8Array, crowd = false): number {
  if (detection.length !== groundTruth.length) throw new RangeError(`the masks differ in size: ${detection.length} and ${groundTruth.length} pixels`);
  return runsIoU(toRuns(detection), toRuns(groundTruth), crowd);
}

interface StoredGroundTruth {
  box: Xywh;
  area: number;
  crowd: boolean;
  mask?: Runs;
}

interface StoredDetection {
  box: Xywh;
  /** What the area ranges test: w * h for 'bbox', the pixel count for 'segm' (as COCO's loadRes sets it). */
  area: number;
  score: number;
  mask?: Runs;
}

interface Cell {
  gts: StoredGroundTruth[];
  dts: StoredDetection[];
}

/** One image and category under one area range: COCOeval.evaluateImg's result, detections in score order. */
interface ImageEval {
  scores: Float64Array;
  /** [threshold * D + d]: matched to some gt (COCO's dtMatches > 0). */
  matched: Uint8Array;
  /** [threshold * D + d]: COCO's dtIgnore. */
  ignored: Uint8Array;
  /** Ground truths that count (COCO's gtIgnore == 0). */
  counted: number;
}

const T = IOU_THRESHOLDS.length;
const R = RECALL_THRESHOLDS.length;
const A = AREAS.length;
const M = MAX_DETS.length;

/** COCOeval.evaluateImg: greedy matching at every IoU threshold, then the area ignores. */
function evaluateImage(gts: StoredGroundTruth[], dts: StoredDetection[], ious: Float64Array, areaRange: readonly [number, number]): ImageEval {
  const [lo, hi] = areaRange;
  const G = gts.length;
  const D = dts.length;
  const ignore = gts.map((g) => g.crowd || g.area < lo || g.area > hi);
  // Counted ground truths first (stable), as COCO's argsort of _ignore with mergesort.
  const order = [...gts.keys()].sort((a, b) => Number(ignore[a]) - Number(ignore[b]));
  const gtIgnore = order.map((g) => ignore[g]!);
  const crowd = order.map((g) => gts[g]!.crowd);
  const matched = new Uint8Array(T * D);
  const ignored = new Uint8Array(T * D);
  if (G > 0) {
    const gtTaken = new Uint8Array(G);
    for (let t = 0; t < T; t++) {
      gtTaken.fill(0);
      for (let d = 0; d < D; d++) {
        let best = Math.min(IOU_THRESHOLDS[t]!, 1 - 1e-10);
        let m = -1;
        for (let gi = 0; gi < G; gi++) {
          if (gtTaken[gi] && !crowd[gi]) continue;
          // Sorted counted-first: once matched to a counted gt, an ignored one never wins.
          if (m > -1 && !gtIgnore[m] && gtIgnore[gi]) break;
          const iou = ious[d * G + order[gi]!]!;
          if (iou < best) continue;
          best = iou;
          m = gi;
        }
        if (m === -1) continue;
        ignored[t * D + d] = gtIgnore[m] ? 1 : 0;
        matched[t * D + d] = 1;
        gtTaken[m] = 1;
      }
    }
  }
  for (let d = 0; d < D; d++) {
    const a = dts[d]!.area;
    if (a < lo || a > hi) for (let t = 0; t < T; t++) if (!matched[t * D + d]) ignored[t * D + d] = 1;
  }
  return { scores: Float64Array.from(dts, (d) => d.score), matched, ignored, counted: gtIgnore.filter((g) => !g).length };
}

/** Mean of the entries > -1, or -1 when there is none (COCOeval._summarize). */
function definedMean(values: Iterable<number>): number {
  let sum = 0;
  let n = 0;
  for (const v of values) {
    if (v > -1) {
      sum += v;
      n++;
    }
  }
  return n > 0 ? sum / n : -1;
}

function* indices(n: number): Generator<number> {
  for (let i = 0; i < n; i++) yield i;
}

function isBox(box: unknown): box is Box {
  return Array.isArray(box) && box.length === 4 && box.every((v) => typeof v === 'number' && Number.isFinite(v));
}

/**
 * Gathers ground truths and detections (in any number of batches), then scores them with
 * COCO's protocol. Adding is validated whole before anything is kept, so a call that throws
 * leaves the evaluator as it was.
 */
export class DetectionEvaluator {
  readonly iouType: IouType;
  readonly categories: readonly number[];
  #images = new Map<number, EvalImage>();
  /** imageId -> category -> instances, each list in the order added (COCO's annotation order). */
  #cells = new Map<number, Map<number, Cell>>();
  #categorySet: Set<number>;
  #groundTruths = 0;
  #detections = 0;

  constructor(images: readonly EvalImage[], categories: readonly number[], iouType: IouType) {
    if (iouType !== 'bbox' && iouType !== 'segm') throw new RangeError(`iouType must be 'bbox' or 'segm', got ${String(iouType)}`);
    this.iouType = iouType;
    images.forEach((image, i) => {
      if (!Number.isFinite(image.id)) throw new RangeError(`images[${i}]: id must be a finite number, got ${String(image.id)}`);
      if (this.#images.has(image.id)) throw new RangeError(`images[${i}]: image ${image.id} is given twice`);
      for (const key of ['width', 'height'] as const) {
        if (!Number.isInteger(image[key]) || image[key] < 1) throw new RangeError(`images[${i}] (image ${image.id}): ${key} must be a positive integer, got ${String(image[key])}`);
      }
      this.#images.set(image.id, { id: image.id, width: image.width, height: image.height });
    });
    this.#categorySet = new Set();
    categories.forEach((c, i) => {
      if (!Number.isFinite(c)) throw new RangeError(`categories[${i}] must be a finite number, got ${String(c)}`);
      if (this.#categorySet.has(c)) throw new RangeError(`categories[${i}]: category ${c} is given twice`);
      this.#categorySet.add(c);
    });
    // COCO evaluates categories and images in ascending id; the image order decides score ties.
    this.categories = [...categories].sort((a, b) => a - b);
  }

  #cell(imageId: number, category: number): Cell {
    let byCategory = this.#cells.get(imageId);
    if (!byCategory) this.#cells.set(imageId, (byCategory = new Map()));
    let cell = byCategory.get(category);
    if (!cell) byCategory.set(category, (cell = { gts: [], dts: [] }));
    return cell;
  }

  /** Checks what every instance shares; returns the image and, when asked for, the mask's runs. */
  #check(what: string, i: number, instance: EvalGroundTruth | EvalDetection, wantRuns: boolean): { image: EvalImage; mask?: Runs } {
    const image = this.#images.get(instance.imageId);
    if (!image) throw new RangeError(`${what}[${i}]: image ${String(instance.imageId)} is not one of the ${this.#images.size} images given to the evaluator`);
    const where = `${what}[${i}] (image ${image.id})`;
    if (!this.#categorySet.has(instance.category)) throw new RangeError(`${where}: category ${String(instance.category)} is not one of the evaluator's categories`);
    if (!isBox(instance.box)) throw new RangeError(`${where}: box must be 4 finite numbers (x1, y1, x2, y2)`);
    const [x1, y1, x2, y2] = instance.box;
    if (x2 < x1 || y2 < y1) throw new RangeError(`${where}: box [${instance.box.join(', ')}] has x2 < x1 or y2 < y1`);
    if (instance.mask === undefined) {
      if (this.iouType === 'segm') throw new RangeError(`${where}: iouType 'segm' needs a mask`);
      return { image };
    }
    if (!(instance.mask instanceof Uint8Array)) throw new TypeError(`${where}: mask must be a Uint8Array (height * width, nonzero = inside)`);
    const want = image.height * image.width;
    if (instance.mask.length !== want) throw new RangeError(`${where}: mask holds ${instance.mask.length} values, expected ${want} (${image.height}x${image.width})`);
    return { image, mask: wantRuns ? toRuns(instance.mask) : undefined };
  }

  addGroundTruth(groundTruths: readonly EvalGroundTruth[]): void {
    const checked = groundTruths.map((gt, i) => {
      // A gt's mask gives its default area under 'bbox' too (COCO's area is the segment's).
      const { mask } = this.#check('groundTruths', i, gt, true);
      if (gt.area !== undefined && !(Number.isFinite(gt.area) && gt.area >= 0)) throw new RangeError(`groundTruths[${i}] (image ${gt.imageId}): area must be a finite number >= 0, got ${String(gt.area)}`);
      const box = toXywh(gt.box);
      const area = gt.area ?? mask?.area ?? box[2] * box[3];
      const stored: StoredGroundTruth = { box, area, crowd: gt.iscrowd === true };
      if (this.iouType === 'segm') stored.mask = mask;
      return { gt, stored };
    });
    for (const { gt, stored } of checked) this.#cell(gt.imageId, gt.category).gts.push(stored);
    this.#groundTruths += checked.length;
  }

  addDetections(detections: readonly EvalDetection[]): void {
    const checked = detections.map((dt, i) => {
      const { mask } = this.#check('detections', i, dt, this.iouType === 'segm');
      if (typeof dt.score !== 'number' || !Number.isFinite(dt.score)) throw new RangeError(`detections[${i}] (image ${dt.imageId}): score must be a finite number, got ${String(dt.score)}`);
      const box = toXywh(dt.box);
      const stored: StoredDetection = this.iouType === 'segm' ? { box, area: mask!.area, score: dt.score, mask } : { box, area: box[2] * box[3], score: dt.score };
      return { dt, stored };
    });
    for (const { dt, stored } of checked) this.#cell(dt.imageId, dt.category).dts.push(stored);
    this.#detections += checked.length;
  }

  /** COCOeval's evaluate(), accumulate() and summarize() on everything added so far. */
  evaluate(): DetectionScores {
    const K = this.categories.length;
    const maxDet = MAX_DETS[M - 1]!;
    // COCO's eval['precision'] [T][R][K][A][M] and eval['recall'] [T][K][A][M]; -1 = undefined.
    const precision = new Float64Array(T * R * K * A * M).fill(-1);
    const recall = new Float64Array(T * K * A * M).fill(-1);
    const imageIds = [...this.#images.keys()].sort((a, b) => a - b);
    this.categories.forEach((category, k) => {
      // evalImgs of this category per area range, images in ascending id, empty cells left out.
      const evals: ImageEval[][] = AREAS.map(() => []);
      for (const imageId of imageIds) {
        const cell = this.#cells.get(imageId)?.get(category);
        if (!cell || (cell.gts.length === 0 && cell.dts.length === 0)) continue;
        const dts = [...cell.dts].sort((a, b) => b.score - a.score).slice(0, maxDet);
        const ious = this.#ious(dts, cell.gts);
        AREAS.forEach((areaRange, a) => evals[a]!.push(evaluateImage(cell.gts, dts, ious, areaRange)));
      }
      for (let a = 0; a < A; a++) {
        const E = evals[a]!;
        if (E.length === 0) continue;
        for (let m = 0; m < M; m++) this.#accumulate(E, MAX_DETS[m]!, (t) => ((t * K + k) * A + a) * M + m, (t, r) => (((t * R + r) * K + k) * A + a) * M + m, precision, recall);
      }
    });
    const ap = (ts: Iterable<number>, a: number, m: number, ks: Iterable<number> = indices(K)) => {
      const kList = [...ks];
      const values: number[] = [];
      for (const t of ts) for (let r = 0; r < R; r++) for (const k of kList) values.push(precision[(((t * R + r) * K + k) * A + a) * M + m]!);
      return definedMean(values);
    };
    const ar = (a: number, m: number) => {
      const values: number[] = [];
      for (let t = 0; t < T; t++) for (let k = 0; k < K; k++) values.push(recall[((t * K + k) * A + a) * M + m]!);
      return definedMean(values);
    };
    const last = M - 1;
    const t50 = IOU_THRESHOLDS.indexOf(0.5);
    const t75 = IOU_THRESHOLDS.indexOf(0.75);
    return {
      AP: ap(indices(T), 0, last),
      AP50: ap([t50], 0, last),
      AP75: ap([t75], 0, last),
      APs: ap(indices(T), 1, last),
      APm: ap(indices(T), 2, last),
      APl: ap(indices(T), 3, last),
      AR1: ar(0, 0),
      AR10: ar(0, 1),
      AR100: ar(0, 2),
      ARs: ar(1, last),
      ARm: ar(2, last),
      ARl: ar(3, last),
      perCategoryAP: new Map(this.categories.map((c, k) => [c, ap(indices(T), 0, last, [k])])),
      images: this.#images.size,
      groundTruths: this.#groundTruths,
      detections: this.#detections,
    };
  }

  /** COCOeval.computeIoU: [d * G + g], detections in score order, ground truths as added. */
  #ious(dts: StoredDetection[], gts: StoredGroundTruth[]): Float64Array {
    const G = gts.length;
    const ious = new Float64Array(dts.length * G);
    dts.forEach((d, di) =>
      gts.forEach((g, gi) => {
        ious[di * G + gi] = this.iouType === 'segm' ? runsIoU(d.mask!, g.mask!, g.crowd) : xywhIoU(d.box, g.box, g.crowd);
      }),
    );
    return ious;
  }

  /** COCOeval.accumulate for one category, area range and maxDets. */
  #accumulate(E: ImageEval[], maxDet: number, recallAt: (t: number) => number, precisionAt: (t: number, r: number) => number, precision: Float64Array, recall: Float64Array): void {
    const counted = E.reduce((n, e) => n + e.counted, 0);
    if (counted === 0) return;
    // The first maxDet detections of each image, by score over all images: Array sort is
    // stable, as numpy's mergesort of the negated scores is.
    const items: { e: ImageEval; d: number; score: number }[] = [];
    for (const e of E) for (let d = 0; d < Math.min(maxDet, e.scores.length); d++) items.push({ e, d, score: e.scores[d]! });
    items.sort((x, y) => y.score - x.score);
    const nd = items.length;
    const rc = new Float64Array(nd);
    const pr = new Float64Array(nd);
    for (let t = 0; t < T; t++) {
      let tp = 0;
      let fp = 0;
      items.forEach(({ e, d }, j) => {
        const D = e.scores.length;
        if (!e.ignored[t * D + d]) {
          if (e.matched[t * D + d]) tp++;
          else fp++;
        }
        rc[j] = tp / counted;
        // COCO adds np.spacing(1) so leading ignored detections give 0, not 0 / 0.
        pr[j] = tp / (fp + tp + Number.EPSILON);
      });
      recall[recallAt(t)] = nd > 0 ? rc[nd - 1]! : 0;
      for (let j = nd - 1; j > 0; j--) if (pr[j]! > pr[j - 1]!) pr[j - 1] = pr[j]!;
      // np.searchsorted(rc, recThrs, side='left'): the first index with recall >= the threshold.
      let j = 0;
      for (let r = 0; r < R; r++) {
        while (j < nd && rc[j]! < RECALL_THRESHOLDS[r]!) j++;
        precision[precisionAt(t, r)] = j < nd ? pr[j]! : 0;
      }
    }
  }
}

/** detectron2's one-line box / mask AP summary: AP, AP50, AP75, APs, APm, APl in percent, "nan" where COCO has -1. */
export function formatDetectionScores(scores: DetectionScores): string {
  const keys = ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'] as const;
  return keys.map((key) => `${key} ${scores[key] >= 0 ? (scores[key] * 100).toFixed(3) : 'nan'}`).join(' | ');
}
