// The data side of instance detection: the digit detection scenes (and that the segmentation
// scenes they share a drawing with did not change), COCO's RLE and polygon masks, and the COCO
// folder reader with its errors.
import test from 'ava';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import {
  decodeRle,
  encodeRle,
  maskBox,
  openCocoFolder,
  openDigitDetectionScenes,
  rasterizePolygons,
  rleCountsFromString,
  rleCountsToString,
} from '../src/data/detection.js';
import { openDigitScenes } from '../src/data/segmentation.js';
import { createRng } from '../src/data/rng.js';

/** Row-major mask from rows of '#' (1) and '.' (0). */
function maskOf(rows: string[]): Uint8Array {
  return Uint8Array.from(rows.join('').split(''), (c) => (c === '#' ? 1 : 0));
}

test('digit detection scenes are the segmentation scenes, object by object', async (t) => {
  for (const options of [{}, { size: 48, maxDigits: 5 }]) {
    const detection = await openDigitDetectionScenes('t10k', { ...options, limit: 30 });
    const segmentation = await openDigitScenes('t10k', { ...options, limit: 30 });
    t.is(detection.length, 30);
    t.deepEqual(detection.classes, ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']);
    for (let i = 0; i < 30; i++) {
      const d = await detection.sample(i);
      const s = await segmentation.sample(i);
      t.is(d.id, i);
      t.is(d.width, s.width);
      t.is(d.height, s.height);
      t.deepEqual(d.image, s.image, `scene ${i}: same pixels`);
      t.true(d.instances.length >= 1);
      const covered = new Uint8Array(s.labels.length);
      for (const [k, instance] of d.instances.entries()) {
        const what = `scene ${i} instance ${k}`;
        t.false(instance.iscrowd);
        t.true(instance.category >= 0 && instance.category <= 9, what);
        let area = 0;
        for (let p = 0; p < instance.mask.length; p++) {
          if (instance.mask[p] === 0) continue;
          area++;
          if (s.labels[p] !== instance.category + 1) t.fail(`${what}: pixel ${p} is labelled ${s.labels[p]}, not ${instance.category + 1}`);
          covered[p]++;
        }
        t.true(area > 0, what);
        t.is(instance.area, area, what);
        t.deepEqual(instance.box, maskBox(instance.mask, d.height, d.width), `${what}: tight box`);
      }
      // Every pixel labelled with a digit belongs to exactly one mask, and no other pixel to any.
      for (let p = 0; p < covered.length; p++) {
        const labelled = s.labels[p]! >= 1 && s.labels[p]! <= 10;
        if (covered[p] !== (labelled ? 1 : 0)) t.fail(`scene ${i} pixel ${p}: label ${s.labels[p]}, in ${covered[p]} masks`);
      }
      const labelIds = [...new Set(s.labels)].filter((v) => v >= 1 && v <= 10).sort((a, b) => a - b);
      const categories = [...new Set(d.instances.map((x) => x.category + 1))].sort((a, b) => a - b);
      t.deepEqual(categories, labelIds, `scene ${i}: an instance of each digit class present`);
    }
  }
  await t.throwsAsync(() => openDigitDetectionScenes('t10k', { size: 20 }), { message: /digit detection scenes: size must be an integer of at least 28/ });
  const scenes = await openDigitDetectionScenes('t10k', { limit: 3 });
  t.throws(() => scenes.sample(3), { message: /index 3 is out of range/ });
});

test('a box is x2/y2 exclusive: a one-pixel mask at column 3, row 2 spans 3..4 by 2..3', (t) => {
  const mask = new Uint8Array(5 * 6);
  mask[2 * 6 + 3] = 1;
  t.deepEqual(maskBox(mask, 5, 6), [3, 2, 4, 3]);
  t.deepEqual(maskBox(new Uint8Array(30), 5, 6), [0, 0, 0, 0]);
});

// sha256 over (image, labels) of scenes 0..49, computed with the segmentation.ts of HEAD BEFORE
// drawScene was refactored into drawDigitScene (which the detection scenes share); the refactor
// must leave every pixel and every random draw where it was.
const SCENE_HASHES: [split: 'train' | 't10k', options: { size?: number; maxDigits?: number }, sha256: string][] = [
  ['train', {}, '1944ce808384584097428f553b7cd66e31ee3592089fb68b6a180bc2bc1867bb'],
  ['t10k', {}, '34a7e126037959d07eced5ea8f1c03f9fcd5fa31980eae0865e17bbdb3cd0297'],
  ['t10k', { size: 40, maxDigits: 5 }, '41049b435fc8c38a3e941f5c0b06307cb97369ba8711add9fd55624728431a1c'],
];

test('the segmentation scenes are unchanged by the shared drawing', async (t) => {
  for (const [split, options, expected] of SCENE_HASHES) {
    const scenes = await openDigitScenes(split, { ...options, limit: 50 });
    const hash = createHash('sha256');
    for (let i = 0; i < 50; i++) {
      const s = await scenes.sample(i);
      t.deepEqual(Object.keys(s).sort(), ['height', 'image', 'labels', 'width']);
      hash.update(s.image);
      hash.update(s.labels);
    }
    t.is(hash.digest('hex'), expected, `${split} ${JSON.stringify(options)}`);
  }
});

test('RLE: encoding then decoding gives back random masks of every density and shape', (t) => {
  const rng = createRng(7);
  const shapes: [number, number][] = [[1, 1], [1, 9], [9, 1], [7, 5], [32, 48], [0, 4], [100, 3]];
  for (const [h, w] of shapes) {
    for (const density of [0, 0.02, 0.5, 0.98, 1]) {
      const mask = Uint8Array.from({ length: h * w }, () => (rng() < density ? 1 : 0));
      const rle = encodeRle(mask, h, w);
      t.deepEqual(rle.size, [h, w]);
      t.is(typeof rle.counts, 'string');
      t.deepEqual(decodeRle(rle), mask, `${h}x${w} at ${density}`);
    }
  }
  // Blocks give long runs: multi-chunk values and negative deltas.
  const big = new Uint8Array(300 * 200);
  for (let y = 20; y < 260; y++) for (let x = 30; x < 190; x++) big[y * 200 + x] = (x >> 4) % 3 === 0 ? 0 : 1;
  t.deepEqual(decodeRle(encodeRle(big, 300, 200)), big);
  const counts = [0, 1, 15, 16, 17, 1000, 3, 70000, 2 ** 30 + 5, 2, 2 ** 31 - 1];
  t.deepEqual(rleCountsFromString(rleCountsToString(counts)), counts);
  t.throws(() => encodeRle(new Uint8Array(5), 2, 3), { message: /5 values, 2x3 is 6/ });
});

test('RLE: a hand-written uncompressed RLE decodes column-major, 0s first', (t) => {
  // size [3, 4]: runs 1 zero, 2 ones, 4 zeros, 3 ones, 2 zeros over the column-major order
  // (index i is x = floor(i / 3), y = i % 3): ones at i = 1, 2 (x 0; y 1, 2) and 7, 8, 9
  // (x 2, y 1; x 2, y 2; x 3, y 0).
  t.deepEqual(decodeRle({ size: [3, 4], counts: [1, 2, 4, 3, 2] }), maskOf(['...#', '#.#.', '#.#.']));
  t.throws(() => decodeRle({ size: [3, 4], counts: [1, 2, 4, 3] }, 'ann'), { message: /ann\.counts: the runs cover 10 pixels, the mask has 12/ });
  t.throws(() => decodeRle({ size: [3, 4], counts: [1, -2, 13] }, 'ann'), { message: /ann\.counts\[1\] must be a non-negative integer/ });
});

test('RLE: a compressed string worked out by hand from the format decodes to its mask', (t) => {
  // A 4x6 mask ([height, width]) with ones at (x 0, y 1), (x 0, y 2) and (x 5, y 0).
  // Column-major indices i = x * 4 + y: ones at 1, 2 and 20, so the runs are
  // [1 zero, 2 ones, 17 zeros, 1 one, 3 zeros] = [1, 2, 17, 1, 3].
  // Values 0-2 are stored as they are, from value 3 on the delta from the value two before:
  // [1, 2, 17, 1 - 2 = -1, 3 - 17 = -14].
  // Each value in 5-bit chunks, low first, char = chunk + 48, 0x20 = "more", 0x10 of the last
  // chunk = sign:
  //   1 -> chunk 1, rest 0, no sign bit -> '1' (49)
  //   2 -> '2' (50)
  //   17 -> chunk 17 = 0x11 has 0x10 set, so as a last chunk it would read negative: emit it with
  //        the continuation bit, 17 | 0x20 = 49 -> 'a' (97), then the rest 0 -> '0'
  //   -1 -> chunk 31 (0x1f: sign bit set), the rest is -1 -> done -> 31 + 48 = 'O' (79)
  //   -14 -> -14 & 0x1f = 18 (0x12: sign bit set), the rest is -1 -> done -> 18 + 48 = 'B' (66)
  // So the string is "12a0OB".
  t.deepEqual(rleCountsFromString('12a0OB'), [1, 2, 17, 1, 3]);
  const mask = maskOf(['.....#', '#.....', '#.....', '......']);
  t.deepEqual(decodeRle({ size: [4, 6], counts: '12a0OB' }), mask);
  t.deepEqual(encodeRle(mask, 4, 6), { size: [4, 6], counts: '12a0OB' });
  t.throws(() => rleCountsFromString('12a', 'seg.counts'), { message: /seg\.counts: the string ends inside value 2/ });
  t.throws(() => rleCountsFromString('1~', 'seg.counts'), { message: /seg\.counts: character "~" at 1/ });
  t.throws(() => decodeRle({ size: [4, 6], counts: '12a0O' }), { message: /runs cover 21 pixels, the mask has 24/ });
});

test('polygons are rasterized as pycocotools does: near pixel centres, even-odd, on its 5x grid', (t) => {
  // Centres 1.5, 2.5, 3.5 lie inside 1..4 in both axes; 0.5 and 4.5 do not.
  t.deepEqual(rasterizePolygons([[1, 1, 4, 1, 4, 4, 1, 4]], 6, 6), maskOf(['......', '.###..', '.###..', '.###..', '......', '......']));
  // The same square clockwise or counter-clockwise, and clipped by the image.
  t.deepEqual(rasterizePolygons([[1, 4, 4, 4, 4, 1, 1, 1]], 6, 6), rasterizePolygons([[1, 1, 4, 1, 4, 4, 1, 4]], 6, 6));
  t.deepEqual(rasterizePolygons([[-3, -3, 2, -3, 2, 2, -3, 2]], 3, 3), maskOf(['##.', '##.', '...']));
  // Triangle (0,0) (6,0) (0,3): inside where cx + 2 cy < 6, i.e. x + 2y + 1.5 < 6 (never equal).
  // Row 0 (cy 0.5): x <= 4; row 1 (cy 1.5): x <= 2; row 2 (cy 2.5): x = 0; row 3: none.
  t.deepEqual(rasterizePolygons([[0, 0, 6, 0, 0, 3]], 4, 6), maskOf(['#####.', '###...', '#.....', '......']));
  // Even-odd: a loop that goes round the square twice encloses nothing...
  t.deepEqual(rasterizePolygons([[1, 1, 4, 1, 4, 4, 1, 4, 1, 1, 4, 1, 4, 4, 1, 4]], 6, 6), new Uint8Array(36));
  // ...while two polygons of one annotation are a union, overlap included.
  t.deepEqual(
    rasterizePolygons([[0, 0, 3, 0, 3, 2, 0, 2], [2, 1, 5, 1, 5, 3, 2, 3]], 4, 5),
    maskOf(['###..', '#####', '..###', '.....']),
  );
  // Fewer than 3 points cover nothing.
  t.deepEqual(rasterizePolygons([[0, 0, 3, 3]], 4, 4), new Uint8Array(16));
  // Where the 5x grid decides: x 1.5..3, y 2..3.1 go to fine 8..15 and 10..16 (trunc(5v + 0.5)).
  // Pixel column x is toggled where the walk crosses fine columns 5x+2 | 5x+3: column 2 (12|13)
  // at fine rows 10 and 16, i.e. pixel rows ceil(10.5 / 5 - 0.5) = 2 and ceil(16.5 / 5 - 0.5) = 3;
  // column 1 (7|8) is never crossed, though its centre 1.5 lies on the left edge.
  t.deepEqual(rasterizePolygons([[1.5, 2, 3, 2, 3, 3.1, 1.5, 3.1]], 4, 4), maskOf(['....', '....', '..#.', '....']));
  // Bad input is named, not walked: an odd count, a NaN, a coordinate a billion pixels away.
  for (const bad of [[1, 1, 4, 1, 4], [1, 1, 4, NaN, 4, 4], [1, 1, 1e9, 1, 4, 4]]) {
    t.throws(() => rasterizePolygons([[0, 0, 1, 0, 0, 1], bad], 6, 6), { message: /polygons\[1\] must hold \(x, y\) pairs of finite numbers within ±16777216 pixels/ });
  }
});

async function writeCocoFolder(): Promise<string> {
  const root = await mkdtemp(path.join(os.tmpdir(), 'convmae-coco-'));
  await mkdir(path.join(root, 'val2017'), { recursive: true });
  await mkdir(path.join(root, 'annotations'), { recursive: true });
  // a.png: 8x6 RGBA (the alpha must go); b.png: 5x4 greyscale (must come back as RGB).
  const rgba = Uint8Array.from({ length: 8 * 6 * 4 }, (_, i) => (i % 4 === 3 ? 100 + (i % 50) : (i * 37) % 256));
  await sharp(rgba, { raw: { width: 8, height: 6, channels: 4 } }).png().toFile(path.join(root, 'val2017', 'a.png'));
  const grey = Uint8Array.from({ length: 5 * 4 }, (_, i) => i * 12);
  await sharp(grey, { raw: { width: 5, height: 4, channels: 1 } }).png().toFile(path.join(root, 'val2017', 'b.png'));
  const coco = {
    info: {},
    // Listed out of id order; read back in id order.
    images: [
      { id: 42, file_name: 'b.png', width: 5, height: 4 },
      { id: 99, file_name: 'missing.png', width: 5, height: 4 },
      { id: 3, file_name: 'a.png', width: 8, height: 6 },
    ],
    categories: [
      { id: 7, name: 'dog', supercategory: 'animal' },
      { id: 1, name: 'person', supercategory: 'person' },
    ],
    annotations: [
      // Two polygons: a square and a second square, one object; a float bbox, as COCO's are,
      // not the mask's tight box (boxes are taken as given).
      { id: 1, image_id: 3, category_id: 7, bbox: [1.25, 0.75, 5.5, 4.5], area: 12.5, iscrowd: 0, segmentation: [[1, 1, 4, 1, 4, 4, 1, 4], [5, 3, 7, 3, 7, 5, 5, 5]] },
      // A crowd region as uncompressed RLE over [6, 8]: column 0, rows 2 and 3.
      { id: 2, image_id: 3, category_id: 1, bbox: [0, 2, 1, 2], area: 2, iscrowd: 1, segmentation: { size: [6, 8], counts: [2, 2, 44] } },
      // A compressed RLE over [4, 5]: 5 zeros (column 0, row 0 of column 1), 3 ones (column 1,
      // rows 1-3), 12 zeros; "5" "3" and 12 + 48 = '<'.
      { id: 3, image_id: 42, category_id: 1, bbox: [1, 1, 1, 3], area: 3, iscrowd: 0, segmentation: { size: [4, 5], counts: '53<' } },
      // Only a degenerate polygon (2 points): dropped, as detectron2 drops it.
      { id: 4, image_id: 42, category_id: 7, bbox: [0, 0, 2, 2], area: 0, iscrowd: 0, segmentation: [[0, 0, 2, 2]] },
      // No area: the mask's pixel count stands in.
      { id: 5, image_id: 42, category_id: 7, bbox: [0, 0, 2, 2], segmentation: [[0, 0, 2, 0, 2, 2, 0, 2]] },
    ],
  };
  await writeFile(path.join(root, 'annotations', 'instances_val2017.json'), JSON.stringify(coco));
  return root;
}

test('a COCO folder reads back: contiguous classes, polygon and RLE masks, crowds, RGB images', async (t) => {
  const root = await writeCocoFolder();
  const coco = await openCocoFolder(root);
  t.is(coco.length, 3);
  t.deepEqual(coco.classes, ['person', 'dog']);
  t.deepEqual(coco.categoryIds, [1, 7]);
  t.deepEqual(coco.imageIds, [3, 42, 99]);
  t.is(coco.droppedAnnotations, 1);
  t.is(coco.describe(0), path.join(root, 'val2017', 'a.png'));

  const a = await coco.sample(0);
  t.is(a.id, 3);
  t.is(a.width, 8);
  t.is(a.height, 6);
  const rgb = Uint8Array.from({ length: 8 * 6 * 3 }, (_, i) => ((Math.floor(i / 3) * 4 + (i % 3)) * 37) % 256);
  t.deepEqual(a.image, rgb, 'RGB of the RGBA file, alpha dropped');
  t.is(a.instances.length, 2);
  const [dog, crowd] = a.instances;
  t.is(dog!.category, 1);
  t.deepEqual(dog!.box, [1.25, 0.75, 6.75, 5.25]);
  t.is(dog!.area, 12.5, "the annotation's area, not the pixel count");
  t.false(dog!.iscrowd);
  t.deepEqual(dog!.mask, maskOf(['........', '.###....', '.###....', '.###.##.', '.....##.', '........']));
  t.is(crowd!.category, 0);
  t.true(crowd!.iscrowd);
  t.deepEqual(crowd!.box, [0, 2, 1, 4]);
  t.deepEqual(crowd!.mask, maskOf(['........', '........', '#.......', '#.......', '........', '........']));

  const b = await coco.sample(1);
  t.is(b.id, 42);
  t.is(b.image.length, 5 * 4 * 3);
  t.deepEqual(b.image, Uint8Array.from({ length: 5 * 4 * 3 }, (_, i) => Math.floor(i / 3) * 12), 'greyscale becomes RGB');
  t.deepEqual(
    b.instances.map((x) => [x.category, x.box, x.area, x.iscrowd]),
    [
      [0, [1, 1, 2, 4], 3, false],
      [1, [0, 0, 2, 2], 4, false],
    ],
  );
  t.deepEqual(b.instances[0]!.mask, maskOf(['.....', '.#...', '.#...', '.#...']));

  await t.throwsAsync(() => coco.sample(2), { message: /missing\.png.*image id 99.*cannot be read/ });
  await t.throwsAsync(() => coco.sample(3), { message: /index 3 is out of range/ });
  t.is((await openCocoFolder(root, { limit: 1 })).length, 1);
});

test('a malformed COCO file is refused naming the file and the field', async (t) => {
  const root = await writeCocoFolder();
  const base = {
    images: [{ id: 1, file_name: 'a.png', width: 8, height: 6 }],
    categories: [{ id: 1, name: 'thing' }],
    annotations: [] as unknown[],
  };
  const ok = { id: 1, image_id: 1, category_id: 1, bbox: [0, 0, 2, 2], area: 4, iscrowd: 0, segmentation: [[0, 0, 2, 0, 2, 2]] };
  const cases: [unknown, RegExp][] = [
    [{ ...base, annotations: [ok, { ...ok, bbox: [1, 2, 3] }] }, /annotations\[1\]\.bbox must be \[x, y, width, height\].*\[1,2,3\]/],
    [{ ...base, annotations: [{ ...ok, bbox: [0, 0, -1, 2] }] }, /annotations\[0\]\.bbox/],
    [{ ...base, annotations: [{ ...ok, category_id: 5 }] }, /annotations\[0\]\.category_id 5 is no id in categories/],
    [{ ...base, annotations: [{ ...ok, image_id: 2 }] }, /annotations\[0\]\.image_id 2 is no id in images/],
    [{ ...base, annotations: [{ ...ok, segmentation: [[0, 0, 2, 0, 2]] }] }, /annotations\[0\]\.segmentation\[0\] has 5 coordinates/],
    [{ ...base, annotations: [{ ...ok, segmentation: { size: [8, 6], counts: [48] } }] }, /annotations\[0\]\.segmentation\.size is \[8, 6\], its image 1 is 6x8/],
    [{ ...base, annotations: [{ ...ok, segmentation: { size: [6, 8], counts: [40, 2] } }] }, /annotations\[0\]\.segmentation\.counts: the runs cover 42 pixels/],
    [{ ...base, annotations: [{ ...ok, segmentation: undefined }] }, /annotations\[0\]\.segmentation must be a list of polygons or an RLE/],
    [{ ...base, annotations: [{ ...ok, iscrowd: 2 }] }, /annotations\[0\]\.iscrowd must be 0 or 1/],
    [{ ...base, images: [{ id: 1, file_name: 'a.png', width: 8 }] }, /images\[0\]\.height must be a positive integer/],
    [{ ...base, categories: [{ id: 1, name: 'a' }, { id: 1, name: 'b' }] }, /categories\[1\]\.id 1 is used by another category/],
    [{ images: [], categories: [] }, /annotations must be an array/],
  ];
  for (const [i, [json, message]] of cases.entries()) {
    const file = path.join(root, 'annotations', `bad${i}.json`);
    await writeFile(file, JSON.stringify(json));
    const error = await t.throwsAsync(() => openCocoFolder(root, { annotations: file }), { message });
    t.true(error?.message.includes(file), `case ${i} names the file`);
  }
  const notJson = path.join(root, 'annotations', 'broken.json');
  await writeFile(notJson, '{"images": [');
  await t.throwsAsync(() => openCocoFolder(root, { annotations: notJson }), { message: /broken\.json' is not valid JSON/ });
  await t.throwsAsync(() => openCocoFolder(root, { split: 'train2017' }), { message: /instances_train2017\.json/ });
  // A compressed string is decoded when its sample is read; a bad one fails there, named.
  const lazy = path.join(root, 'annotations', 'lazy.json');
  await writeFile(lazy, JSON.stringify({ ...base, annotations: [{ ...ok, segmentation: { size: [6, 8], counts: '12' } }] }));
  const coco = await openCocoFolder(root, { annotations: lazy });
  await t.throwsAsync(() => coco.sample(0), { message: /lazy\.json': annotations\[0\]\.segmentation\.counts: the runs cover 3 pixels, the mask has 48/ });
});
