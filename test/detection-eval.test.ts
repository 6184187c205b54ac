// COCO detection evaluation (COCOeval's protocol for 'bbox' and 'segm'): the perfect and empty
// cases, hand-computed 101-point APs, maxDets, area ranges, crowds, duplicates, greedy best-IoU
// matching, mask IoU against box IoU, and the errors that name the offending instance.
import test, { type ExecutionContext } from 'ava';
import { boxIoU, DetectionEvaluator, formatDetectionScores, IOU_THRESHOLDS, maskIoU, RECALL_THRESHOLDS, type Box, type EvalDetection, type EvalGroundTruth, type IouType } from '../src/tasks/detection-eval.js';

/** Within a few ulps: COCO's precision is tp / (tp + fp + eps), so a perfect 1 reads 1 - 2.2e-16. */
function close(t: ExecutionContext, actual: number, expected: number, what: string): void {
  t.true(Math.abs(actual - expected) < 1e-12, `${what}: ${actual}, expected ${expected}`);
}

/** A width x height mask with the box's pixels set. */
function rect(width: number, height: number, box: Box): Uint8Array {
  const mask = new Uint8Array(width * height);
  for (let y = box[1]; y < box[3]; y++) for (let x = box[0]; x < box[2]; x++) mask[y * width + x] = 1;
  return mask;
}

/** Ground truths and detections on plain boxes in one 100x100 (or given) image. */
function boxEval(gts: Box[], dts: [Box, number][], options: { crowd?: boolean[]; size?: number } = {}) {
  const size = options.size ?? 100;
  const ev = new DetectionEvaluator([{ id: 1, width: size, height: size }], [1], 'bbox');
  ev.addGroundTruth(gts.map((box, i) => ({ imageId: 1, category: 1, box, iscrowd: options.crowd?.[i] ?? false })));
  ev.addDetections(dts.map(([box, score]) => ({ imageId: 1, category: 1, box, score })));
  return ev.evaluate();
}

test('the thresholds are numpy linspace values: .7 and .75 exact, .9 one ulp low as in COCO', (t) => {
  t.is(IOU_THRESHOLDS.length, 10);
  t.is(IOU_THRESHOLDS[4], 0.7);
  t.is(IOU_THRESHOLDS[5], 0.75);
  t.is(IOU_THRESHOLDS[8], 0.8999999999999999);
  t.is(RECALL_THRESHOLDS.length, 101);
  t.is(RECALL_THRESHOLDS[50], 0.5);
  t.is(RECALL_THRESHOLDS[100], 1);
});

test('perfect detections score 1 for bbox and segm; no detections score 0, and -1 where an area has no gt', (t) => {
  const images = [
    { id: 1, width: 100, height: 100 },
    { id: 2, width: 200, height: 150 },
  ];
  // A small, a medium and a large gt in category 1, a medium one in category 2.
  const gts: EvalGroundTruth[] = [
    { imageId: 1, category: 1, box: [10, 10, 30, 30] },
    { imageId: 1, category: 2, box: [0, 0, 60, 50] },
    { imageId: 2, category: 1, box: [0, 0, 150, 120] },
    { imageId: 2, category: 1, box: [160, 100, 170, 110] },
  ];
  for (const iouType of ['bbox', 'segm'] as IouType[]) {
    const withMasks = <T extends { imageId: number; box: Box }>(o: T): T => (iouType === 'segm' ? { ...o, mask: rect(images[o.imageId - 1]!.width, images[o.imageId - 1]!.height, o.box) } : o);
    const ev = new DetectionEvaluator(images, [2, 1], iouType);
    ev.addGroundTruth(gts.map(withMasks));
    ev.addDetections(gts.map((g, i) => withMasks({ imageId: g.imageId, category: g.category, box: g.box, score: 0.9 - i / 10 })));
    const s = ev.evaluate();
    for (const key of ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl'] as const) close(t, s[key], 1, `${iouType} ${key}`);
    // maxDets 1 finds one of image 2's two category-1 gts: recall 2/3 there, 1 for category 2.
    close(t, s.AR1, (2 / 3 + 1) / 2, `${iouType} AR1`);
    t.deepEqual([...s.perCategoryAP.keys()], [1, 2]);
    for (const ap of s.perCategoryAP.values()) close(t, ap, 1, `${iouType} per-category AP`);
    t.deepEqual([s.images, s.groundTruths, s.detections], [2, 4, 4]);

    const empty = new DetectionEvaluator(images, [1, 2, 5], iouType);
    empty.addGroundTruth(gts.filter((g) => g.category === 1).map(withMasks));
    const e = empty.evaluate();
    t.deepEqual([e.AP, e.AP50, e.APs, e.APl, e.AR1, e.AR100], [0, 0, 0, 0, 0, 0], iouType);
    // No category-1 gt is medium; categories 2 and 5 have no gt at all.
    t.deepEqual([e.APm, e.ARm], [-1, -1]);
    t.deepEqual([...e.perCategoryAP], [[1, 0], [2, -1], [5, -1]]);
  }
});

test('AP50 and AP over .50:.95 of a hand-worked case, with an IoU of exactly .7', (t) => {
  const images = [
    { id: 1, width: 100, height: 100 },
    { id: 2, width: 100, height: 100 },
  ];
  const ev = new DetectionEvaluator(images, [7], 'bbox');
  ev.addGroundTruth([
    { imageId: 1, category: 7, box: [0, 0, 10, 10] },
    { imageId: 1, category: 7, box: [20, 20, 30, 30] },
    { imageId: 2, category: 7, box: [40, 40, 50, 50] },
  ]);
  const loose: Box = [20, 20, 30, 27];
  t.is(boxIoU(loose, [20, 20, 30, 30]), 0.7);
  // In two batches, out of score order.
  ev.addDetections([
    { imageId: 2, category: 7, score: 0.6, box: [40, 40, 50, 50] },
    { imageId: 1, category: 7, score: 0.7, box: loose },
  ]);
  ev.addDetections([
    { imageId: 2, category: 7, score: 0.8, box: [70, 70, 80, 80] },
    { imageId: 1, category: 7, score: 0.9, box: [0, 0, 10, 10] },
  ]);
  const s = ev.evaluate();
  // By score: TP, FP, TP, TP of 3 gts at IoU .5 -> recall 1/3, 1/3, 2/3, 1; precision 1, 1/2,
  // 2/3, 3/4, made non-increasing from the right: 1, 3/4, 3/4, 3/4. Recall points 0..0.33 (34)
  // read 1, 0.34..1 (67) read 3/4.
  const ap50 = (34 * 1 + 67 * 0.75) / 101;
  close(t, s.AP50, ap50, 'AP50');
  // Above .7 the loose detection is an FP: TP, FP, FP, TP -> recall 1/3, 1/3, 1/3, 2/3,
  // precision envelope 1, 1/2, 1/2, 1/2: 34 points read 1, 33 read 1/2, 34 (recall > 2/3) read 0.
  const apHigh = (34 * 1 + 33 * 0.5) / 101;
  close(t, s.AP75, apHigh, 'AP75');
  // It counts at .50, .55, .60, .65 and .70, and not at the five thresholds above.
  close(t, s.AP, (5 * ap50 + 5 * apHigh) / 10, 'AP');
  close(t, s.AR100, (5 * 1 + 5 * (2 / 3)) / 10, 'AR100');
  // Every gt is 10x10: small.
  close(t, s.APs, s.AP, 'APs');
  t.deepEqual([s.APm, s.APl], [-1, -1]);
  t.is(formatDetectionScores(s), `AP ${(s.AP * 100).toFixed(3)} | AP50 ${(ap50 * 100).toFixed(3)} | AP75 50.000 | APs ${(s.AP * 100).toFixed(3)} | APm nan | APl nan`);
});

test('maxDets: AR1 sees the top detection of an image, AR10 all; the 101st detection of an image is dropped', (t) => {
  const gts: Box[] = [
    [0, 0, 20, 20],
    [30, 0, 50, 20],
    [60, 0, 80, 20],
  ];
  const s = boxEval(gts, [
    [gts[0]!, 0.9],
    [gts[1]!, 0.8],
    [gts[2]!, 0.7],
  ]);
  close(t, s.AR1, 1 / 3, 'AR1');
  close(t, s.AR10, 1, 'AR10');
  close(t, s.AR100, 1, 'AR100');
  // 100 misses outscore the one hit: it is cut before matching.
  const misses: [Box, number][] = Array.from({ length: 100 }, () => [[90, 90, 95, 95], 0.5]);
  const cut = boxEval([gts[0]!], [...misses, [gts[0]!, 0.1]]);
  t.deepEqual([cut.AR100, cut.AP], [0, 0]);
  const kept = boxEval([gts[0]!], [...misses.slice(1), [gts[0]!, 0.1]]);
  close(t, kept.AR100, 1, 'AR100 with 100 detections');
});

test('area ranges: a small gt counts only in APs, and an unmatched small detection is ignored in APl', (t) => {
  // Small gt (400 px) left undetected; large gt (22500 px) found; a small miss outscores the hit.
  const s = boxEval(
    [
      [0, 0, 20, 20],
      [100, 100, 250, 250],
    ],
    [
      [[200, 0, 210, 10], 0.95],
      [[100, 100, 250, 250], 0.9],
    ],
    { size: 300 },
  );
  t.is(s.APs, 0);
  t.is(s.ARs, 0);
  close(t, s.APl, 1, 'APl');
  close(t, s.ARl, 1, 'ARl');
  t.deepEqual([s.APm, s.ARm], [-1, -1]);
  // Area all: FP then TP of 2 gts: recall 0, 1/2; precision envelope 1/2; points 0..0.5 (51) read 1/2.
  close(t, s.AP, (51 * 0.5) / 101, 'AP');
  close(t, s.AR100, 0.5, 'AR100');
});

test('a detection on a crowd region is neither TP nor FP, however many there are; the crowd is no gt to find', (t) => {
  const person: Box = [0, 0, 20, 20];
  const crowd: Box = [100, 100, 200, 200];
  const inCrowd: Box = [120, 120, 140, 140];
  t.is(boxIoU(inCrowd, crowd, true), 1);
  t.is(boxIoU(inCrowd, crowd), 400 / 10000);
  const dts: [Box, number][] = [
    [inCrowd, 0.97],
    [[150, 150, 170, 170], 0.95],
    [person, 0.9],
  ];
  const s = boxEval([person, crowd], dts, { crowd: [false, true] });
  close(t, s.AP, 1, 'AP with a crowd');
  close(t, s.AR100, 1, 'AR100 with a crowd');
  // The same region as an ordinary gt: two FPs ahead of the hit, and a gt never found.
  const plain = boxEval([person, crowd], dts);
  t.true(plain.AP < 0.5, `AP without the crowd flag: ${plain.AP}`);
  close(t, plain.AR100, 0.5, 'AR100 without the crowd flag');
  // Once matched to a counted gt (IoU .6), a detection stays there even though the crowd it
  // lies in scores 1: a TP up to .60, then (the gt out of reach) ignored on the crowd.
  const half: Box = [0, 0, 10, 6];
  const s2 = boxEval([person.map((v) => v / 2) as Box, [0, 0, 100, 100]], [[half, 0.9]], { crowd: [false, true] });
  close(t, s2.AP50, 1, 'AP50 of a match kept from the crowd');
  close(t, s2.AR100, 3 / 10, 'AR100 of a match kept from the crowd');
  t.is(s2.AP75, 0);
});

test('a second detection on a matched gt is an FP; each detection takes its best-IoU free gt', (t) => {
  const gts: Box[] = [
    [0, 0, 10, 10],
    [20, 0, 30, 10],
    [40, 0, 50, 10],
  ];
  const dts: [Box, number][] = [
    [gts[0]!, 0.9],
    [[0, 0, 10, 9], 0.8],
    [gts[1]!, 0.7],
    [gts[2]!, 0.6],
  ];
  const dup = boxEval(gts, dts);
  // TP, FP, TP, TP as in the hand-worked case.
  close(t, dup.AP50, (34 + 67 * 0.75) / 101, 'AP50 with a duplicate');
  close(t, dup.AR100, 1, 'AR100 with a duplicate');
  close(t, boxEval(gts, dts.filter((_, i) => i !== 1)).AP50, 1, 'AP50 without it');
  // The first detection overlaps both gts (IoU 70/130 with the one listed first, 80/120 with the
  // other) and takes the better; the second then finds its gt taken: TP, FP of 2 gts.
  const left: Box = [0, 0, 10, 10];
  const right: Box = [5, 0, 15, 10];
  const greedy = boxEval([right, left], [
    [[2, 0, 12, 10], 0.9],
    [left, 0.8],
  ]);
  close(t, greedy.AP50, 51 / 101, 'AP50 of best-IoU matching');
  // The best is neither the first nor the last gt over the threshold: the first detection
  // overlaps gts 1 and 3 at 100/180 and gt 2 at .8, takes gt 2, and leaves the second
  // detection (exactly gt 2, 80/180 with the others) an FP: TP, FP of 3 gts.
  const middle = boxEval(
    [
      [0, 8, 10, 26],
      [0, 10, 10, 18],
      [0, 0, 10, 18],
    ],
    [
      [[0, 8, 10, 18], 0.9],
      [[0, 10, 10, 18], 0.8],
    ],
  );
  close(t, middle.AP50, 34 / 101, 'AP50 when the best-IoU gt is in the middle');
});

test('segm IoU counts mask pixels: an L-shaped gt in a full box matches as a box but not as a mask', (t) => {
  const image = { id: 4, width: 10, height: 10 };
  const box: Box = [0, 0, 10, 10];
  // Two left columns and two bottom rows: 20 + 16 = 36 pixels with the full 10x10 box.
  const ell = rect(10, 10, [0, 0, 2, 10]);
  rect(10, 10, [2, 8, 10, 10]).forEach((v, i) => (ell[i] ||= v));
  const full = rect(10, 10, box);
  t.is(maskIoU(full, ell), 0.36);
  t.is(maskIoU(rect(10, 10, [0, 0, 2, 2]), ell, true), 1);
  t.is(boxIoU(box, box), 1);
  const run = (iouType: IouType, mask: Uint8Array) => {
    const ev = new DetectionEvaluator([image], [1], iouType);
    ev.addGroundTruth([{ imageId: 4, category: 1, box, mask: ell }]);
    ev.addDetections([{ imageId: 4, category: 1, box, mask, score: 0.5 }]);
    return ev.evaluate();
  };
  close(t, run('bbox', full).AP, 1, 'bbox AP');
  t.is(run('segm', full).AP, 0);
  close(t, run('segm', ell).AP, 1, 'segm AP of the L itself');
  // The gt's area is its 36 pixels, not the box's 100 (both small here, so APs follows AP).
  t.is(run('segm', full).APs, 0);
});

test('errors name the image and the instance; a call that throws keeps nothing', (t) => {
  const images = [
    { id: 3, width: 10, height: 12 },
    { id: 8, width: 4, height: 4 },
  ];
  t.throws(() => new DetectionEvaluator(images, [1], 'keypoints' as IouType), { message: /iouType must be 'bbox' or 'segm', got keypoints/ });
  t.throws(() => new DetectionEvaluator([...images, { id: 3, width: 1, height: 1 }], [1], 'bbox'), { message: /images\[2\]: image 3 is given twice/ });
  t.throws(() => new DetectionEvaluator([{ id: 5, width: 0, height: 4 }], [1], 'bbox'), { message: /images\[0\] \(image 5\): width must be a positive integer, got 0/ });
  const ev = new DetectionEvaluator(images, [1], 'segm');
  const good: EvalDetection = { imageId: 8, category: 1, score: 0.5, box: [0, 0, 2, 2], mask: rect(4, 4, [0, 0, 2, 2]) };
  t.throws(() => ev.addDetections([good, { imageId: 3, category: 1, score: 0.5, box: [0, 0, 2, 2], mask: new Uint8Array(100) }]), {
    message: /detections\[1\] \(image 3\): mask holds 100 values, expected 120 \(12x10\)/,
  });
  t.throws(() => ev.addGroundTruth([{ imageId: 3, category: 1, box: [0, 0, 2, 2], mask: new Uint8Array(120) }, { imageId: 99, category: 1, box: [0, 0, 2, 2] }]), {
    message: /groundTruths\[1\]: image 99 is not one of the 2 images/,
  });
  t.throws(() => ev.addGroundTruth([{ imageId: 8, category: 1, box: [0, 0, 2, 2] }]), { message: /groundTruths\[0\] \(image 8\): iouType 'segm' needs a mask/ });
  t.throws(() => ev.addDetections([{ ...good, category: 2 }]), { message: /detections\[0\] \(image 8\): category 2 is not one of the evaluator's categories/ });
  t.throws(() => ev.addDetections([{ ...good, score: Number.NaN }]), { message: /detections\[0\] \(image 8\): score must be a finite number, got NaN/ });
  t.throws(() => ev.addDetections([{ ...good, box: [3, 0, 2, 2] }]), { message: /detections\[0\] \(image 8\): box \[3, 0, 2, 2\] has x2 < x1/ });
  t.throws(() => maskIoU(new Uint8Array(4), new Uint8Array(5)), { message: /the masks differ in size: 4 and 5 pixels/ });
  const s = ev.evaluate();
  t.deepEqual([s.groundTruths, s.detections], [0, 0]);
});
