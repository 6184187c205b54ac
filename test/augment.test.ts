// Fine-tune augmentations: mixup / cutmix / label-smoothing targets, random erasing boxes,
// RandAugment ops.
import test from 'ava';
import { createRng, mixedTargets, randAugment, RAND_AUGMENT_OPS, sampleErasing, sampleMix, beta } from '../src/index.js';

const close = (a: number, b: number, tol = 1e-12) => Math.abs(a - b) <= tol;

test('label smoothing puts 1 - s + s/K on the label and s/K elsewhere', (t) => {
  const y = mixedTargets([2, 0], 4, 1, 0.1);
  t.deepEqual(Array.from(y.subarray(0, 4)).map((v) => +v.toFixed(12)), [0.025, 0.025, 0.925, 0.025]);
  t.deepEqual(Array.from(y.subarray(4, 8)).map((v) => +v.toFixed(12)), [0.925, 0.025, 0.025, 0.025]);
});

test('mixed targets are lam * own + (1 - lam) * mirror, rows sum to 1', (t) => {
  const labels = [0, 1, 2, 3];
  const lam = 0.7;
  const y = mixedTargets(labels, 5, lam, 0.1);
  const off = 0.1 / 5;
  const on = 1 - 0.1 + off;
  for (let i = 0; i < 4; i++) {
    const row = Array.from(y.subarray(i * 5, i * 5 + 5));
    const want = new Array(5).fill(0).map((_, k) => lam * (k === labels[i] ? on : off) + (1 - lam) * (k === labels[3 - i] ? on : off));
    t.true(row.every((v, k) => close(v, want[k])), `row ${i}: ${row} vs ${want}`);
    t.true(close(row.reduce((a, b) => a + b, 0), 1));
  }
  t.throws(() => mixedTargets([0, 7], 5, 0.5, 0), { message: /label 7 is out of range for 5 classes/ });
});

test('cutmix boxes are clipped to the image and lam is corrected to the pasted area', (t) => {
  let cutmix = 0;
  let mixup = 0;
  for (let s = 0; s < 400; s++) {
    const d = sampleMix(createRng(s), 32, 48);
    t.truthy(d.mix);
    const { lam, cut } = d.mix!;
    t.true(lam >= 0 && lam <= 1);
    if (cut) {
      cutmix++;
      const [top, bottom, left, right] = cut;
      t.true(0 <= top && top <= bottom && bottom <= 32 && 0 <= left && left <= right && right <= 48, `${cut}`);
      t.true(close(lam, 1 - ((bottom - top) * (right - left)) / (32 * 48)));
    } else mixup++;
    t.is(d.lam, lam);
  }
  // switch_prob 0.5 between the two.
  t.true(cutmix > 150 && mixup > 150, `${cutmix} cutmix, ${mixup} mixup`);
  t.deepEqual(sampleMix(createRng(1), 8, 8, { prob: 0 }), { mix: undefined, lam: 1 });
  t.true(sampleMix(createRng(2), 8, 8, { mixupAlpha: 0 }).mix!.cut !== undefined);
});

test('Beta(0.8, 0.8) samples have the right mean and variance', (t) => {
  const rng = createRng(5);
  const n = 20000;
  const xs = Array.from({ length: n }, () => beta(rng, 0.8, 0.8));
  const mean = xs.reduce((a, b) => a + b, 0) / n;
  const variance = xs.reduce((a, b) => a + (b - mean) ** 2, 0) / n;
  // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 0.0962.
  t.true(Math.abs(mean - 0.5) < 0.01, `mean ${mean}`);
  t.true(Math.abs(variance - 1 / (4 * 2.6)) < 0.005, `variance ${variance}`);
});

test('random erasing boxes fit the image, follow the area and aspect ranges, and happen at the given rate', (t) => {
  const rng = createRng(3);
  let erased = 0;
  for (let i = 0; i < 2000; i++) {
    const box = sampleErasing(rng, i, 64, 48);
    if (!box) continue;
    erased++;
    t.is(box.sample, i);
    t.true(box.top >= 0 && box.left >= 0 && box.top + box.height <= 64 && box.left + box.width <= 48);
    const area = (box.height * box.width) / (64 * 48);
    t.true(area > 0.01 && area < 0.36, `area ${area}`);
    const aspect = box.height / box.width;
    t.true(aspect > 0.2 && aspect < 4.5, `aspect ${aspect}`);
  }
  t.true(erased > 400 && erased < 600, `${erased} of 2000 erased at p = 0.25`);
  t.is(sampleErasing(createRng(1), 0, 8, 8, { prob: 0 }), undefined);
});

function image(size: number, f: (x: number, y: number, c: number) => number): Uint8Array {
  const px = new Uint8Array(size * size * 3);
  for (let y = 0; y < size; y++) for (let x = 0; x < size; x++) for (let c = 0; c < 3; c++) px[(y * size + x) * 3 + c] = f(x, y, c);
  return px;
}

function applyOp(name: string, px: Uint8Array, size: number, level: number, rng = createRng(0)): Uint8Array {
  const op = RAND_AUGMENT_OPS.find(([n]) => n === name)![1];
  const copy = px.slice();
  op({ px: copy, offset: 0, size } as never, level, rng);
  return copy;
}

test('RandAugment ops do what PIL defines', (t) => {
  const size = 8;
  const ramp = image(size, (x, y, c) => 40 + x * 10 + y * 5 + c);
  t.deepEqual(applyOp('Invert', ramp, size, 9), ramp.map((v) => 255 - v));
  // Solarize at level 10: threshold 0, everything inverted; posterize at level 10: 0 bits.
  t.deepEqual(applyOp('SolarizeIncreasing', ramp, size, 10), ramp.map((v) => 255 - v));
  t.true(applyOp('PosterizeIncreasing', ramp, size, 10).every((v) => v === 0));
  t.deepEqual(applyOp('PosterizeIncreasing', ramp, size, 0), ramp.map((v) => v & 0xf0));
  // Autocontrast stretches each channel to [0, 255] (PIL truncates i * scale + offset, so the
  // top can land on 254 by rounding).
  const ac = applyOp('AutoContrast', ramp, size, 9);
  for (let c = 0; c < 3; c++) {
    const ch = Array.from(ac).filter((_, i) => i % 3 === c);
    t.is(Math.min(...ch), 0);
    t.true(Math.max(...ch) >= 254);
  }
  // Rotation by 0 and shear by 0 leave the image as it is.
  t.deepEqual(applyOp('Rotate', ramp, size, 0), ramp);
  t.deepEqual(applyOp('ShearX', ramp, size, 0), ramp);
  // Brightness at factor 1 (level 0) is the identity; a flat image is a fixed point of Sharpness.
  t.deepEqual(applyOp('BrightnessIncreasing', ramp, size, 0), ramp);
  const flat = image(size, () => 90);
  t.deepEqual(applyOp('SharpnessIncreasing', flat, size, 9), flat);
});

test('translation shifts pixels by the level and fills the border with the ImageNet mean', (t) => {
  const size = 10;
  const px = image(size, (x, y, c) => (x * 20 + y + c) % 256);
  const op = RAND_AUGMENT_OPS.find(([n]) => n === 'TranslateXRel')![1];
  // level 10 * 0.2 / 0.45 gives a shift of 0.2 * 10 = 2 pixels; rng() > 0.5 decides the sign.
  const out = px.slice();
  op({ px: out, offset: 0, size } as never, (10 * 0.2) / 0.45, () => 0.1);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const o = (y * size + x) * 3;
      if (x + 2 < size) t.is(out[o], px[o + 6], `(${x}, ${y})`);
      else t.deepEqual(Array.from(out.subarray(o, o + 3)), [124, 116, 104]);
    }
  }
});

test('randAugment is reproducible from its generator and stays inside its image', (t) => {
  const size = 16;
  const batch = new Uint8Array(3 * size * size * 3);
  for (let i = 0; i < batch.length; i++) batch[i] = (i * 37) % 256;
  const a = batch.slice();
  const b = batch.slice();
  const opsA = randAugment(a, size * size * 3, size, createRng(9));
  const opsB = randAugment(b, size * size * 3, size, createRng(9));
  t.deepEqual(opsA, opsB);
  t.deepEqual(a, b);
  // Images 0 and 2 of the batch are untouched.
  t.deepEqual(a.subarray(0, size * size * 3), batch.subarray(0, size * size * 3));
  t.deepEqual(a.subarray(2 * size * size * 3), batch.subarray(2 * size * size * 3));
  t.throws(() => randAugment(a, 3 * size * size * 3, size, createRng(1)), { message: /does not fit/ });
});
