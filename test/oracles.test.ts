// Our code against the reference implementations themselves, on random cases drawn here
// (test/oracles/*.py run them): pycocotools for the polygon rasterizer (COCO's ground-truth masks,
// detectron2's bitmasks) and the evaluator's 12 summary numbers for 'bbox' and 'segm'; OpenCV for
// the segmentation pipeline's resizes (mmcv's imresize is cv2.resize); Pillow for the detection
// pipeline's resizes (detectron2 resizes uint8 images with PIL's BILINEAR and BitMasks with its
// NEAREST), the pretraining crops' (torchvision's BICUBIC) and timm's RandAugment ops; numpy for
// PhotoMetricDistortion's arithmetic. They come from
// `bash scripts/setup-test-oracles.sh` (.cache/test-oracles, which .ci/run installs); where one
// is missing its tests are skipped, unless CONVMAE_REQUIRE_ORACLES=1 makes that a failure.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { createRng, randInt, uniform, type Rng } from '../src/data/rng.js';
import { rasterizePolygons } from '../src/data/detection.js';
import { photometricConvert, photometricHue, photometricSaturation, resizeBilinearRgb, resizeNearest } from '../src/data/segmentation-transforms.js';
import { pilNearestSource } from '../src/data/detection-transforms.js';
import { RAND_AUGMENT_OPS } from '../src/data/randaugment.js';
import { native } from '../src/native.js';
import { DetectionEvaluator, SUMMARY_KEYS, type Box, type EvalDetection, type EvalGroundTruth, type IouType } from '../src/tasks/detection-eval.js';
import { ROOT } from './helpers.js';

const PYTHON = process.env.CONVMAE_ORACLE_PYTHON ?? 'python3';
const PYTHONPATH = [path.join(ROOT, '.cache', 'test-oracles'), process.env.PYTHONPATH].filter(Boolean).join(path.delimiter);

/** Runs test/oracles/<name>_oracle.py on one request; throws with its stderr when it fails. */
function oracle<T>(name: string, request: object): T {
  const script = path.join(ROOT, 'test', 'oracles', `${name}_oracle.py`);
  const run = spawnSync(PYTHON, [script], { input: JSON.stringify(request), env: { ...process.env, PYTHONPATH }, maxBuffer: 1 << 28, encoding: 'utf8' });
  if (run.status !== 0) throw new Error(`${name} oracle exited ${run.status}: ${run.error?.message ?? run.stderr}`);
  return JSON.parse(run.stdout) as T;
}

/** `test`, or `test.skip` when `modules` cannot be imported (a failure under CONVMAE_REQUIRE_ORACLES=1). */
function withOracle(modules: string): typeof test | typeof test.skip {
  const probe = spawnSync(PYTHON, ['-c', `import ${modules}`], { env: { ...process.env, PYTHONPATH }, encoding: 'utf8' });
  if (probe.status === 0) return test;
  const why = `${PYTHON} cannot import ${modules} (run scripts/setup-test-oracles.sh): ${probe.error?.message ?? probe.stderr.trim().split('\n').pop()}`;
  if (process.env.CONVMAE_REQUIRE_ORACLES === '1') throw new Error(`CONVMAE_REQUIRE_ORACLES=1 but ${why}`);
  return test.skip;
}

const withCoco = withOracle('pycocotools.mask, pycocotools.cocoeval');
const withCv2 = withOracle('cv2');
const withPil = withOracle('PIL.Image');

const bits = (mask: Uint8Array): string => Array.from(mask, (v) => (v ? '1' : '0')).join('');

/** A coordinate of one of three kinds: on a quarter-pixel grid, on a tenth grid (5x + 0.5 lands on .0 and .5), or anywhere. */
function coordinate(rng: Rng, kind: number, low: number, high: number): number {
  if (kind === 0) return randInt(rng, Math.ceil(low * 4), Math.floor(high * 4)) / 4;
  if (kind === 1) return randInt(rng, Math.ceil(low * 10), Math.floor(high * 10)) / 10;
  return uniform(rng, low, high);
}

/** 3-9 vertices around or across an image (outside it too), sometimes with a repeated vertex. */
function randomPolygon(rng: Rng, height: number, width: number, around?: Box): number[] {
  const kind = randInt(rng, 0, 2);
  const [x1, y1, x2, y2] = around ?? [-3, -3, width + 3, height + 3];
  const polygon: number[] = [];
  for (let k = randInt(rng, 3, 9); k > 0; k--) polygon.push(coordinate(rng, kind, x1, x2), coordinate(rng, kind, y1, y2));
  if (rng() < 0.1) polygon.push(polygon[0]!, polygon[1]!);
  return polygon;
}

withCoco('polygons rasterize to pycocotools\' masks pixel for pixel (frPyObjects + merge + decode)', (t) => {
  const rng = createRng(2026);
  const cases = Array.from({ length: 400 }, (_, i) => {
    const [height, width] = i % 10 === 0 ? [randInt(rng, 60, 160), randInt(rng, 60, 160)] : [randInt(rng, 1, 40), randInt(rng, 1, 40)];
    const polygons = Array.from({ length: randInt(rng, 1, 3) }, () => randomPolygon(rng, height, width));
    return { height, width, polygons };
  });
  const { masks } = oracle<{ masks: string[] }>('pycocotools', { command: 'rasterize', cases });
  let differing = 0;
  let set = 0;
  cases.forEach((c, i) => {
    const ours = bits(rasterizePolygons(c.polygons, c.height, c.width));
    set += ours.split('1').length - 1;
    if (ours !== masks[i]) {
      differing++;
      if (differing <= 3) t.log(`case ${i} differs: ${JSON.stringify(c)}`);
    }
  });
  t.is(differing, 0);
  // Not a vacuous agreement on empty masks.
  t.true(set > 10_000, `${set} pixels set`);
});

interface Scene {
  images: { id: number; width: number; height: number }[];
  categories: number[];
  gts: EvalGroundTruth[];
  dts: EvalDetection[];
}

/** A box on the quarter-pixel grid (exact in xyxy and xywh), inside the image, at least a pixel wide. */
function randomBox(rng: Rng, height: number, width: number, scale: number): Box {
  const w = Math.max(1, Math.round(uniform(rng, 0.1, scale) * width * 4) / 4);
  const h = Math.max(1, Math.round(uniform(rng, 0.1, scale) * height * 4) / 4);
  const x = Math.round(uniform(rng, 0, Math.max(0, width - w)) * 4) / 4;
  const y = Math.round(uniform(rng, 0, Math.max(0, height - h)) * 4) / 4;
  return [x, y, Math.min(width, x + w), Math.min(height, y + h)];
}

/** The box moved and resized by up to `amount` of its size (a near-miss or a hit), clipped. */
function jitter(rng: Rng, [x1, y1, x2, y2]: Box, amount: number, height: number, width: number): Box {
  const q = (v: number) => Math.round(v * 4) / 4;
  const dw = (x2 - x1) * amount;
  const dh = (y2 - y1) * amount;
  const nx1 = Math.min(width - 1, Math.max(0, q(x1 + uniform(rng, -dw, dw))));
  const ny1 = Math.min(height - 1, Math.max(0, q(y1 + uniform(rng, -dh, dh))));
  return [nx1, ny1, Math.max(nx1 + 1, Math.min(width, q(x2 + uniform(rng, -dw, dw)))), Math.max(ny1 + 1, Math.min(height, q(y2 + uniform(rng, -dh, dh))))];
}

/**
 * Images of 20-140 pixels (areas on both sides of 32^2 and 96^2), 1-3 categories, 0-7 objects an
 * image (some crowds), a polygon mask inside each box; detections near objects and elsewhere,
 * scores from a small set (ties, which COCO breaks by order), sometimes over 100 in an image.
 */
function randomScene(rng: Rng): Scene {
  const categories = [1, 2, 3].slice(0, randInt(rng, 1, 3));
  const images = Array.from({ length: randInt(rng, 1, 4) }, (_, i) => ({ id: 10 + 3 * i, width: randInt(rng, 20, 140), height: randInt(rng, 20, 140) }));
  const gts: EvalGroundTruth[] = [];
  const dts: EvalDetection[] = [];
  const maskIn = (box: Box, height: number, width: number) => rasterizePolygons([randomPolygon(rng, height, width, box)], height, width);
  const score = () => (rng() < 0.3 ? randInt(rng, 1, 4) / 4 : Math.round(rng() * 1000) / 1000);
  for (const image of images) {
    const { height, width, id } = image;
    for (let n = randInt(rng, 0, 7); n > 0; n--) {
      const box = randomBox(rng, height, width, 0.9);
      const mask = maskIn(box, height, width);
      const pixels = mask.reduce((s, v) => s + v, 0);
      const category = categories[randInt(rng, 0, categories.length - 1)]!;
      // COCO's area is the polygon's, not the pixel count: near it, sometimes across a range edge.
      // Now and then exactly on a range's edge (COCO's ranges include both ends).
      const area = rng() < 0.1 ? [32 ** 2, 96 ** 2][randInt(rng, 0, 1)]! : Math.max(0, pixels + randInt(rng, -20, 20));
      gts.push({ imageId: id, category, box, mask, area, iscrowd: rng() < 0.12 });
      for (let d = randInt(rng, 0, 3); d > 0; d--) {
        const near = jitter(rng, box, uniform(rng, 0, 0.5), height, width);
        // Its mask: the object's moved by a few pixels (mask IoUs across the thresholds), at
        // times with a blob of the jittered box added.
        let nearMask = shifted(mask, height, width, randInt(rng, -3, 3), randInt(rng, -3, 3));
        if (rng() < 0.3) {
          const blob = maskIn(near, height, width);
          nearMask = nearMask.map((v, p) => v | blob[p]!);
        }
        dts.push({ imageId: id, category: rng() < 0.85 ? category : categories[randInt(rng, 0, categories.length - 1)]!, score: score(), box: near, mask: nearMask });
      }
    }
    for (let n = rng() < 0.1 ? randInt(rng, 95, 130) : randInt(rng, 0, 4); n > 0; n--) {
      const box = randomBox(rng, height, width, 0.6);
      dts.push({ imageId: id, category: categories[randInt(rng, 0, categories.length - 1)]!, score: score(), box, mask: maskIn(box, height, width) });
    }
  }
  return { images, categories, gts, dts };
}

/** The mask moved by (dx, dy) pixels, what leaves the image dropped. */
function shifted(mask: Uint8Array, height: number, width: number, dx: number, dy: number): Uint8Array {
  const out = new Uint8Array(mask.length);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const [sx, sy] = [x - dx, y - dy];
      if (sx >= 0 && sx < width && sy >= 0 && sy < height) out[y * width + x] = mask[sy * width + sx]!;
    }
  }
  return out;
}

const xywh = ([x1, y1, x2, y2]: Box): Box => [x1, y1, x2 - x1, y2 - y1];

/** COCOeval's stats for each scene, in one run of the oracle. */
function oracleStats(scenes: Scene[], iouType: IouType): number[][] {
  const maskBits = (mask: Uint8Array | undefined) => (iouType === 'segm' ? bits(mask!) : undefined);
  const request = scenes.map((scene) => ({
    iouType,
    images: scene.images,
    categories: scene.categories,
    gts: scene.gts.map((g, i) => ({ id: i + 1, image_id: g.imageId, category_id: g.category, bbox: xywh(g.box), area: g.area, iscrowd: g.iscrowd ? 1 : 0, mask: maskBits(g.mask) })),
    dts: scene.dts.map((d) => ({ image_id: d.imageId, category_id: d.category, score: d.score, bbox: xywh(d.box), mask: maskBits(d.mask) })),
  }));
  return oracle<{ stats: number[][] }>('pycocotools', { command: 'evaluate', scenes: request }).stats;
}

for (const iouType of ['bbox', 'segm'] as const) {
  withCoco(`the evaluator's 12 numbers are COCOeval's ('${iouType}', random scenes with crowds, ties, area ranges and over 100 detections)`, (t) => {
    const rng = createRng(iouType === 'bbox' ? 11 : 12);
    const scenes = Array.from({ length: 40 }, () => randomScene(rng));
    const stats = oracleStats(scenes, iouType);
    let worst = 0;
    let nonTrivial = 0;
    scenes.forEach((scene, s) => {
      const evaluator = new DetectionEvaluator(scene.images, scene.categories, iouType);
      evaluator.addGroundTruth(scene.gts);
      evaluator.addDetections(scene.dts);
      const ours = evaluator.evaluate();
      const theirs = stats[s]!;
      SUMMARY_KEYS.forEach((key, i) => {
        const diff = Math.abs(ours[key] - theirs[i]!);
        worst = Math.max(worst, diff);
        if (diff > 1e-12) t.fail(`scene ${s}, ${key}: ours ${ours[key]}, COCOeval ${theirs[i]}`);
      });
      if (theirs[0]! > 0 && theirs[0]! < 1) nonTrivial++;
    });
    t.log(`worst |ours - COCOeval| ${worst.toExponential(2)}; ${nonTrivial} of 40 scenes with AP strictly between 0 and 1`);
    t.true(nonTrivial >= 20, `${nonTrivial} scenes with a non-trivial AP`);
  });
}

withCv2('resizes as mmcv\'s cv2.resize: label maps by INTER_NEAREST to the pixel, images by INTER_LINEAR within 1', (t) => {
  const rng = createRng(7);
  const cases = Array.from({ length: 120 }, (_, i) => {
    const [height, width] = [randInt(rng, 1, 50), randInt(rng, 1, 50)];
    const [outHeight, outWidth] = i % 4 === 0 ? [height * randInt(rng, 1, 3), width * 2] : [randInt(rng, 1, 110), randInt(rng, 1, 110)];
    // Smooth ramps in some cases, noise in the rest.
    const rgb = Array.from({ length: height * width * 3 }, (_, j) => (i % 3 === 0 ? (Math.floor(j / 3) * 7 + (j % 3) * 50) % 256 : randInt(rng, 0, 255)));
    const labels = Array.from({ length: height * width }, () => randInt(rng, 0, 4));
    return { height, width, outHeight, outWidth, rgb, labels };
  });
  const theirs = oracle<{ rgb: number[][]; labels: number[][] }>('cv2', { command: 'resize', cases });
  let labelDiffs = 0;
  let worst = 0;
  let off = 0;
  let values = 0;
  cases.forEach((c, i) => {
    const labels = resizeNearest(Uint8Array.from(c.labels), c.width, c.height, c.outWidth, c.outHeight);
    labels.forEach((v, j) => (labelDiffs += v === theirs.labels[i]![j] ? 0 : 1));
    const rgb = resizeBilinearRgb(Uint8Array.from(c.rgb), c.width, c.height, c.outWidth, c.outHeight);
    rgb.forEach((v, j) => {
      const d = Math.abs(v - theirs.rgb[i]![j]!);
      worst = Math.max(worst, d);
      off += d ? 1 : 0;
    });
    values += rgb.length;
  });
  t.is(labelDiffs, 0);
  // cv2's 8-bit INTER_LINEAR rounds its weights to 11 bits and (in its vector paths) truncates
  // partial sums; ours weighs in floating point and rounds once.
  t.true(worst <= 1, `largest difference ${worst}`);
  t.log(`INTER_LINEAR: ${off} of ${values} values differ from cv2's, by 1`);
});

withPil('masks resize as detectron2\'s BitMasks (PIL\'s NEAREST), to the pixel', (t) => {
  const rng = createRng(8);
  const cases = Array.from({ length: 300 }, () => {
    const [height, width] = [randInt(rng, 1, 60), randInt(rng, 1, 60)];
    const [outHeight, outWidth] = [randInt(rng, 1, 180), randInt(rng, 1, 180)];
    return { height, width, outHeight, outWidth, mask: Array.from({ length: height * width }, () => randInt(rng, 0, 1)) };
  });
  const { masks } = oracle<{ masks: number[][] }>('pil', { command: 'nearest', cases });
  let differing = 0;
  cases.forEach((c, i) => {
    const rows = pilNearestSource(c.height, c.outHeight);
    const cols = pilNearestSource(c.width, c.outWidth);
    const ours = Array.from({ length: c.outHeight * c.outWidth }, (_, p) => c.mask[rows[Math.floor(p / c.outWidth)]! * c.width + cols[p % c.outWidth]!]!);
    if (ours.some((v, p) => v !== masks[i]![p])) differing++;
  });
  t.is(differing, 0);
});

for (const filter of ['bilinear', 'bicubic'] as const) {
  withPil(`images resize as Pillow's ${filter.toUpperCase()} resizes them (${filter === 'bilinear' ? "detectron2's ResizeTransform" : "torchvision's RandomResizedCrop"}), antialiased when shrinking, to the byte`, (t) => {
    const rng = createRng(filter === 'bilinear' ? 9 : 19);
    const cases = Array.from({ length: 150 }, (_, i) => {
      const [height, width] = [randInt(rng, 1, 70), randInt(rng, 1, 70)];
      // Shrinking (down to a tenth), growing, one axis unchanged, both unchanged.
      const pick = (n: number) => (i % 10 === 0 ? n : i % 3 === 0 ? Math.max(1, Math.round(n * uniform(rng, 0.1, 0.9))) : randInt(rng, 1, 160));
      const [outHeight, outWidth] = i % 7 === 0 ? [height, pick(width)] : [pick(height), pick(width)];
      const rgb = Array.from({ length: height * width * 3 }, (_, j) => (i % 2 === 0 ? (Math.floor(j / 3) * 13 + (j % 3) * 70) % 256 : randInt(rng, 0, 255)));
      return { height, width, outHeight, outWidth, rgb };
    });
    const theirs = oracle<{ rgb: number[][] }>('pil', { command: 'resize', filter, cases });
    let differing = 0;
    cases.forEach((c, i) => {
      const ours = native.resizePil(Uint8Array.from(c.rgb), c.width, c.height, c.outWidth, c.outHeight, filter);
      if (ours.length !== theirs.rgb[i]!.length || ours.some((v, p) => v !== theirs.rgb[i]![p])) {
        differing++;
        if (differing <= 3) t.log(`case ${i}: ${c.width}x${c.height} -> ${c.outWidth}x${c.outHeight}`);
      }
    });
    t.is(differing, 0);
  });
}

withCv2('PhotoMetricDistortion\'s brightness and contrast steps as numpy computes them (float32), to the byte', (t) => {
  const rng = createRng(10);
  const pixels = Array.from({ length: 256 }, (_, i) => i);
  // Brightness (alpha 1, beta in [-32, 32]) and contrast (alpha in [0.5, 1.5], beta 0), with
  // values that land exactly on integers among them.
  const cases = Array.from({ length: 400 }, (_, i) => (i % 2 === 0 ? { alpha: 1, beta: i % 8 === 0 ? randInt(rng, -32, 32) + 0.5 : uniform(rng, -32, 32) } : { alpha: i % 6 === 1 ? randInt(rng, 5, 15) / 10 : uniform(rng, 0.5, 1.5), beta: 0 }));
  const theirs = oracle<{ pixels: number[][] }>('cv2', { command: 'convert', cases: cases.map((c) => ({ ...c, pixels })) });
  let differing = 0;
  cases.forEach((c, i) => {
    const ours = Uint8Array.from(pixels);
    photometricConvert(ours, c.alpha, c.beta);
    if (ours.some((v, j) => v !== theirs.pixels[i]![j])) differing++;
  });
  t.is(differing, 0);
});

withCv2("PhotoMetricDistortion's saturation and hue steps in cv2's 8-bit HSV, to the byte", (t) => {
  const rng = createRng(11);
  // Widths below one block of cv2's vector loop (32 pixels), whole blocks, and blocks with a
  // scalar tail; noise, greys (saturation 0), pure and near-pure hues, dark pixels.
  const widths = [1, 7, 31, 32, 33, 64, 100, 129];
  const cases = Array.from({ length: 96 }, (_, i) => {
    const width = widths[i % widths.length]!;
    const height = randInt(rng, 1, 12);
    const kind = i % 4;
    const rgb = Array.from({ length: width * height }, () => {
      if (kind === 1) return Array(3).fill(randInt(rng, 0, 255)) as number[];
      if (kind === 2) return [randInt(rng, 0, 1) * 255, randInt(rng, 0, 255), randInt(rng, 0, 1) * 255];
      if (kind === 3) return [randInt(rng, 0, 12), randInt(rng, 0, 12), randInt(rng, 0, 12)];
      return [randInt(rng, 0, 255), randInt(rng, 0, 255), randInt(rng, 0, 255)];
    }).flat();
    const saturation = i % 2 === 0 ? (i % 6 === 0 ? randInt(rng, 5, 15) / 10 : uniform(rng, 0.5, 1.5)) : null;
    return { height, width, rgb, saturation, hue: saturation === null ? randInt(rng, -18, 18) : null };
  });
  // And a grid of the colour cube (every third level of each channel, 0 and 255 included:
  // 86^3 colours), at the official crop's width (16 blocks a row), the last row filled with black.
  const levels = Array.from({ length: 86 }, (_, k) => 3 * k);
  const grid = levels.flatMap((r) => levels.flatMap((g) => levels.flatMap((b) => [r, g, b])));
  const rows = Math.ceil(grid.length / 3 / 512);
  const padded = grid.concat(Array(rows * 512 * 3 - grid.length).fill(0) as number[]);
  cases.push({ height: rows, width: 512, rgb: padded, saturation: 1.3, hue: null }, { height: rows, width: 512, rgb: padded, saturation: null, hue: 7 });
  const theirs = oracle<{ rgb: number[][] }>('cv2', { command: 'hsv', cases });
  let differing = 0;
  cases.forEach((c, i) => {
    const ours = Uint8Array.from(c.rgb);
    if (c.saturation !== null) photometricSaturation(ours, c.width, c.saturation);
    else photometricHue(ours, c.width, c.hue!);
    const wrong = ours.findIndex((v, j) => v !== theirs.rgb[i]![j]);
    if (wrong >= 0 && ++differing <= 3) t.log(`case ${i} (${c.width} wide, ${c.saturation !== null ? `saturation ${c.saturation}` : `hue ${c.hue}`}): byte ${wrong}, ours ${ours[wrong]}, cv2 ${theirs.rgb[i]![wrong]}`);
  });
  t.is(differing, 0);
});

withPil('each of the 15 RandAugment ops (timm rand-m9-mstd0.5-inc1) computes what Pillow computes, to the byte', (t) => {
  const rng = createRng(21);
  const cases = RAND_AUGMENT_OPS.flatMap(([op]) =>
    Array.from({ length: 24 }, (_, i) => {
      const size = randInt(rng, 3, 24);
      // Noise, a narrow band of values, or smooth ramps; magnitudes from N(9, 0.5) and whole levels.
      const rgb = Array.from({ length: size * size * 3 }, (_, j) => (i % 3 === 0 ? randInt(rng, 0, 255) : i % 3 === 1 ? randInt(rng, 60, 190) : (Math.floor(j / 3) * 11 + (j % 3) * 50) % 256));
      const level = i % 4 === 0 ? randInt(rng, 0, 10) : Math.min(10, Math.max(0, 9 + 0.5 * (uniform(rng, -2, 2))));
      return { op, level, sign: i % 2 === 0 ? 1 : -1, size, rgb };
    }),
  );
  const theirs = oracle<{ rgb: number[][] }>('pil', { command: 'randaugment', fill: [124, 116, 104], cases });
  const differing = new Map<string, number>();
  cases.forEach((c, i) => {
    const op = RAND_AUGMENT_OPS.find(([name]) => name === c.op)![1];
    const px = Uint8Array.from(c.rgb);
    // The ops negate their argument where rng() > 0.5.
    op({ px, offset: 0, size: c.size } as never, c.level, () => (c.sign < 0 ? 0.9 : 0.1));
    if (px.some((v, j) => v !== theirs.rgb[i]![j])) differing.set(c.op, (differing.get(c.op) ?? 0) + 1);
  });
  t.deepEqual(Object.fromEntries(differing), {});
});
