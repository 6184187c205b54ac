/**
 * One correctness probe of the GPU check in a process of its own, so that a fault in an untested
 * CUDA kernel (an illegal address poisons the CUDA context; a crash takes the process) costs that
 * probe only, not the rest of the check. Prints one JSON line.
 *
 *   node dist/benches/gpu/probe-worker.js parity <fixture.safetensors> <f32|f64> <sparse|dense>
 *   node dist/benches/gpu/probe-worker.js agreement
 *   node dist/benches/gpu/probe-worker.js mma    (the agreement rows of the mma.sync flash kernels alone)
 *   node dist/benches/gpu/probe-worker.js timing <batch> <reps>
 *   node dist/benches/gpu/probe-worker.js overlap [device]   (default cuda; cpu runs the same probe there)
 *   node dist/benches/gpu/probe-worker.js segmenter [device] (the segmenter on the device against the CPU; run it with CONVMAE_TF32=off)
 *   node dist/benches/gpu/probe-worker.js detector [device]  (the detector likewise)
 *   node dist/benches/gpu/probe-worker.js detector-vitdet [device]  (its Official-ConvMAE-Det variant, with extents)
 *
 * CONVMAE_PROBE_DEVICE=cpu runs every probe on the CPU instead of CUDA (check.ts --rehearse).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { checkFixture } from '../../src/api/fixture.js';
import { Pretrainer, type DeviceName, type Precision } from '../../src/api/pretrainer.js';
import { Detector } from '../../src/api/detector.js';
import { Segmenter } from '../../src/api/segmenter.js';
import { native } from '../../src/native.js';
// The tests' safetensors reader (plain Node, no test framework; dist/test travels with dist/).
import { readSafetensors, tensorBytes } from '../../test/helpers.js';
import { rectangleScenes, SMALL_DETECTOR_HEAD, stripeLabels } from '../synthetic-scenes.js';

/**
 * How far a task model's losses in bf16 may be from f32's (relative): bf16 keeps 8 bits of
 * mantissa, so each rounding moves a value by at most 0.4%; a route that lost a term or a scale
 * misses by far more.
 */
const BF16_TOLERANCE = 0.05;

/** A task model in bf16 against the CPU's f32 losses, or what stopped it. */
type Bf16Check = { pass: boolean; worst: string; worst_rel: number; tolerance: number } | { pass: false; error: string };

/**
 * Runs `steps` on a fresh bf16 model and compares each loss it returns with `reference` (the CPU's
 * f32 losses of the same steps, by name). Its own check: an error here (an op without a bf16 form
 * on the device) is reported, and leaves the f32 comparison standing.
 */
async function bf16Check<M extends { dispose(): void }>(make: () => M, steps: (model: M) => Promise<[string, number][]>, reference: Map<string, number>): Promise<Bf16Check> {
  let model: M | undefined;
  try {
    model = make();
    const worst = new WorstDifference();
    for (const [name, value] of await steps(model)) worst.note(`bf16 ${name}`, value, reference.get(name) ?? NaN);
    return { pass: worst.rel <= BF16_TOLERANCE, worst: worst.name, worst_rel: worst.rel, tolerance: BF16_TOLERANCE };
  } catch (e) {
    return { pass: false, error: e instanceof Error ? e.message : String(e) };
  } finally {
    model?.dispose();
  }
}

/**
 * Overlapped steps on the GPU (the answers, and the weights and AdamW state after, of steps
 * queued all at once against the same steps awaited one by one, on two models from one seed in
 * this process): bf16, convmae-tiny, two micro-batches a window, so the guarded one-launch
 * AdamW, the pinned uploads and readbacks and the accumulation all take part. `worst_rel` is the
 * largest relative difference of a loss or a tensor element (0: the same bits).
 */
async function overlapProbe(device: 'cpu' | 'cuda'): Promise<{ pass: boolean; worst: string; worst_rel: number; tolerance: number }> {
  const side = 64;
  const images = [0, 1, 2, 3, 4, 5].map((k) => Uint8Array.from({ length: 8 * side * side * 3 }, (_, i) => (i * 131 + k * 977 + 7) % 251));
  const make = () => Pretrainer.create({ preset: 'convmae-tiny', device, precision: 'bf16', seed: 5 });
  const [one, two] = [make(), make()];
  const dir = mkdtempSync(path.join(os.tmpdir(), 'convmae-overlap-'));
  try {
    const step = (p: Pretrainer, k: number) => p.pretrainStep({ images: images[k]!, batchSize: 8, height: side, width: side }, { lr: 1e-3, accumSteps: 2 });
    const sequential = [];
    for (let k = 0; k < images.length; k++) sequential.push(await step(one, k));
    const overlapped = await Promise.all(images.map((_, k) => step(two, k)));
    let worst = 'none';
    let worstRel = 0;
    const note = (name: string, a: number, b: number) => {
      const rel = a === b || (Number.isNaN(a) && Number.isNaN(b)) ? 0 : Math.abs(a - b) / Math.max(Math.abs(b), 1e-30);
      if (!(rel <= worstRel)) [worst, worstRel] = [name, rel];
    };
    sequential.forEach((r, k) => note(`loss of step ${k + 1}`, overlapped[k]!.loss, r.loss));
    await one.save(path.join(dir, 'one.safetensors'));
    await two.save(path.join(dir, 'two.safetensors'));
    const [a, b] = [await readSafetensors(path.join(dir, 'one.safetensors')), await readSafetensors(path.join(dir, 'two.safetensors'))];
    for (const name of Object.keys(a.header).filter((k) => k !== '__metadata__')) {
      const bytes = tensorBytes(a, name);
      const other = name in b.header ? tensorBytes(b, name) : undefined;
      if (!other || other.length !== bytes.length) [worst, worstRel] = [name, Infinity];
      else if (!bytes.equals(other)) {
        const [x, y] = [new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4), new Float32Array(other.buffer, other.byteOffset, other.length / 4)];
        for (let i = 0; i < x.length; i++) note(name, y[i]!, x[i]!);
      }
    }
    return { pass: worstRel === 0, worst, worst_rel: worstRel, tolerance: 0 };
  } finally {
    one.dispose();
    two.dispose();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The probes' device: cuda, or cpu for the check's rehearsal. */
function probeDevice(): 'cpu' | 'cuda' {
  const d = process.env.CONVMAE_PROBE_DEVICE ?? 'cuda';
  if (d !== 'cpu' && d !== 'cuda') throw new Error(`CONVMAE_PROBE_DEVICE must be 'cpu' or 'cuda', got '${d}'`);
  return d;
}

/** The largest relative difference of the values noted (CPU's second), and where it was. */
class WorstDifference {
  name = 'none';
  rel = 0;
  note(name: string, value: number, reference: number): void {
    const rel = value === reference ? 0 : Math.abs(value - reference) / Math.max(Math.abs(reference), 1e-30);
    // NaN compares false: a NaN difference becomes the worst and fails any tolerance.
    if (!(rel <= this.rel)) [this.name, this.rel] = [name, rel];
  }
}

/**
 * The segmenter on `device` against the same segmenter on the CPU (one seed, f32): the losses of
 * three training steps on the same batches, then an evaluation's loss and its predictions. With
 * CONVMAE_TF32=off both compute in full f32, so they differ only by summation order: the losses
 * within `tolerance` (relative), at most 0.1% of the predicted pixels otherwise (a near tie's
 * argmax may flip). On CUDA the segmenter's im2col and BatchNorm are candle's compositions; a
 * fault in them or in any CUDA kernel it shares with pretraining shows here. Then the same
 * segmenter in bf16 on `device` (`bf16`): its losses of the three steps within `BF16_TOLERANCE`
 * of the CPU's f32 ones.
 */
async function segmenterProbe(device: DeviceName): Promise<{ pass: boolean; worst: string; worst_rel: number; tolerance: number; predictions_differ: number; bf16: Bf16Check }> {
  const side = 64;
  const batchSize = 4;
  const tolerance = 1e-4;
  const make = (d: DeviceName, precision: Precision = 'fp32') =>
    Segmenter.create({ preset: 'convmae-tiny', config: { img_size: side }, numClasses: 5, channels: 32, auxChannels: 16, device: d, precision, seed: 3 });
  const batch = (k: number) => stripeLabels(batchSize, side, 5, k);
  const [cpu, other] = [make('cpu'), make(device)];
  const reference = new Map<string, number>();
  let result;
  try {
    const worst = new WorstDifference();
    for (let k = 0; k < 3; k++) {
      const [a, b] = [await other.train(batch(k), { lr: 1e-3 }), await cpu.train(batch(k), { lr: 1e-3 })];
      worst.note(`loss of step ${k + 1}`, a.loss, b.loss);
      reference.set(`loss of step ${k + 1}`, b.loss);
    }
    const [a, b] = [await other.evaluate(batch(7)), await cpu.evaluate(batch(7))];
    worst.note('evaluation loss', a.loss ?? NaN, b.loss ?? NaN);
    const differ = a.predictions.reduce((n, p, i) => n + (p === b.predictions[i] ? 0 : 1), 0) / b.predictions.length;
    result = { pass: worst.rel <= tolerance && differ <= 1e-3, worst: worst.name, worst_rel: worst.rel, tolerance, predictions_differ: differ };
  } finally {
    cpu.dispose();
    other.dispose();
  }
  const bf16 = await bf16Check(
    () => make(device, 'bf16'),
    async (half) => {
      const losses: [string, number][] = [];
      for (let k = 0; k < 3; k++) losses.push([`loss of step ${k + 1}`, (await half.train(batch(k), { lr: 1e-3 })).loss]);
      return losses;
    },
    reference,
  );
  return { ...result, bf16 };
}

/**
 * The detector on `device` against the same detector on the CPU (one seed, f32, run with
 * CONVMAE_TF32=off): the five losses of two training steps on made-up scenes (the regions the
 * step samples are drawn on the host from the same seed), then the detections of the trained
 * models on other scenes. On CUDA its ROIAlign is our CUDA kernel and its BatchNorm candle's ops.
 * A near tie in a top-k or NMS could change what a step samples, so the losses are held to
 * `tolerance` only; the detections are reported (count and the largest score difference of
 * the detections both kept, in order), not judged. The 'vitdet' variant (Official-ConvMAE-Det:
 * simple feature pyramid, LayerNorm heads, decomposed relative positions, padded windows) runs
 * with the second image's extent smaller than its input, as its pipeline gives them. Then the
 * same detector in bf16 on `device` (`bf16`): its RPN losses of both steps (on the same sampled
 * anchors; the ROI heads' regions follow proposals that rounding may reorder) within
 * `BF16_TOLERANCE` of the CPU's f32 ones.
 */
async function detectorProbe(
  device: DeviceName,
  variant: 'det' | 'vitdet',
): Promise<{ pass: boolean; worst: string; worst_rel: number; tolerance: number; detections: [number, number]; score_diff: number; bf16: Bf16Check }> {
  const side = 64;
  const tolerance = 1e-3;
  const vitdet = variant === 'vitdet' ? { variant, window: 3, globalBlocks: [1], posGrid: 4 } : {};
  const extents: [number, number][] | undefined = variant === 'vitdet' ? [[side, side], [48, 56]] : undefined;
  const make = (d: DeviceName, precision: Precision = 'fp32') => Detector.create({ preset: 'convmae-tiny', numClasses: 3, ...SMALL_DETECTOR_HEAD, ...vitdet, device: d, precision, seed: 2 });
  const batch = (k: number) => ({ ...rectangleScenes(2, side, k + 1), extents });
  const rpnParts = ['lossRpnCls', 'lossRpnLoc'] as const;
  const [cpu, other] = [make('cpu'), make(device)];
  const reference = new Map<string, number>();
  let result;
  try {
    const worst = new WorstDifference();
    for (let k = 0; k < 2; k++) {
      const [a, b] = [await other.train(batch(k), { lr: 1e-3 }), await cpu.train(batch(k), { lr: 1e-3 })];
      for (const part of ['lossRpnCls', 'lossRpnLoc', 'lossCls', 'lossBoxReg', 'lossMask'] as const) worst.note(`${part} of step ${k + 1}`, a[part], b[part]);
      for (const part of rpnParts) reference.set(`${part} of step ${k + 1}`, b[part]);
    }
    const scenes = rectangleScenes(2, side, 9);
    const [a, b] = [await other.detect(scenes, { extents }), await cpu.detect(scenes, { extents })];
    const count = (d: typeof a) => d.reduce((n, image) => n + image.scores.length, 0);
    let scoreDiff = 0;
    a.forEach((image, i) => image.scores.forEach((score, j) => (scoreDiff = Math.max(scoreDiff, Math.abs(score - (b[i]!.scores[j] ?? Infinity))))));
    result = { pass: worst.rel <= tolerance, worst: worst.name, worst_rel: worst.rel, tolerance, detections: [count(a), count(b)] as [number, number], score_diff: scoreDiff };
  } finally {
    cpu.dispose();
    other.dispose();
  }
  const bf16 = await bf16Check(
    () => make(device, 'bf16'),
    async (half) => {
      const losses: [string, number][] = [];
      for (let k = 0; k < 2; k++) {
        const h = await half.train(batch(k), { lr: 1e-3 });
        for (const part of rpnParts) losses.push([`${part} of step ${k + 1}`, h[part]]);
      }
      return losses;
    },
    reference,
  );
  return { ...result, bf16 };
}

async function main(): Promise<void> {
  const [what, fixture, dtype, convPath] = process.argv.slice(2);
  const device = probeDevice();
  if (what === 'parity' && fixture && (dtype === 'f32' || dtype === 'f64') && (convPath === 'sparse' || convPath === 'dense')) {
    const r = await checkFixture(fixture, dtype, convPath, device);
    process.stdout.write(JSON.stringify({ kind: r.kind, pass: r.pass, worst: r.worst, worst_rel: r.worst_rel, tolerance: r.tolerance }) + '\n');
  } else if (what === 'agreement') {
    process.stdout.write(JSON.stringify({ rows: JSON.parse(await native.compareKernels(device)) as unknown[] }) + '\n');
  } else if (what === 'mma') {
    process.stdout.write(JSON.stringify({ rows: JSON.parse(await native.compareKernels(device, 'flash_mma')) as unknown[] }) + '\n');
  } else if (what === 'overlap' && (fixture === undefined || fixture === 'cpu' || fixture === 'cuda')) {
    process.stdout.write(JSON.stringify(await overlapProbe(fixture ?? device)) + '\n');
  } else if ((what === 'detector' || what === 'detector-vitdet') && (fixture === undefined || fixture === 'cpu' || fixture === 'cuda')) {
    process.stdout.write(JSON.stringify(await detectorProbe(fixture ?? device, what === 'detector' ? 'det' : 'vitdet')) + '\n');
  } else if (what === 'segmenter' && (fixture === undefined || fixture === 'cpu' || fixture === 'cuda')) {
    process.stdout.write(JSON.stringify(await segmenterProbe(fixture ?? device)) + '\n');
  } else if (what === 'timing' && Number(fixture) > 0 && Number(dtype) > 0) {
    // Each op at the shapes of a ConvMAE-B step of <batch> images, ours vs candle's, bf16 then f32.
    const rows = JSON.parse(await native.timeKernels(device, Number(fixture), Number(dtype), ['bf16', 'f32'])) as unknown[];
    process.stdout.write(JSON.stringify({ rows }) + '\n');
  } else {
    throw new Error(`usage: probe-worker.js parity <fixture> <f32|f64> <sparse|dense> | agreement | mma | timing <batch> <reps> | overlap [cpu|cuda] | segmenter [cpu|cuda] | detector [cpu|cuda] | detector-vitdet [cpu|cuda] (got ${process.argv.slice(2).join(' ')})`);
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`probe-worker: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = 1;
});
