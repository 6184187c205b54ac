/**
 * One measurement of our fine-tuning step, in a process of its own (so its peak RSS is ours
 * alone), the counterpart of `time_step.py --task finetune`:
 *
 *   RAYON_NUM_THREADS=2 node dist/benches/finetune-worker.js --preset convmae-base --batch 8 --warmup 2 --steps 5
 *
 * A finetune Classifier of 1000 classes (stochastic depth 0.1, the official AdamW with layer
 * decay), random uint8 [B, H, W, 3] batches and label-smoothed (0.1) one-hot targets, filled
 * before the clock starts (four, used in turn); each `train` is awaited before the next. No
 * mixup or erasing (the PyTorch side has none either). Prints one JSON line.
 */
import { Classifier, type DeviceName, type Precision } from '../src/api/index.js';
import { fillRandom, parseArgs, stepTimes, stepWorkerFlags } from './lib.js';
import { peakMemoryMb } from './peak-memory.js';

/** ImageNet-1k's classes and the official label smoothing, as time_step.py's fine-tuning step. */
const NUM_CLASSES = 1000;
const SMOOTHING = 0.1;

async function main(): Promise<void> {
  const flags = stepWorkerFlags(parseArgs(process.argv.slice(2)), 2e-3);
  const { preset, batch, warmup, steps, seed, lr } = flags;
  const device = flags.device as DeviceName;
  const precision = flags.precision as Precision;

  const importRssMb = process.resourceUsage().maxRSS / 1024;
  const model = Classifier.create({ preset, numClasses: NUM_CLASSES, kind: 'finetune', dropPath: 0.1, device, precision, seed });
  const side = model.config.img_size;
  const rng = { s: 0x9e3779b9 ^ seed };
  const batches = Array.from({ length: 4 }, (_, k) => {
    const images = new Uint8Array(batch * side * side * 3);
    fillRandom(images, rng);
    const targets = new Float64Array(batch * NUM_CLASSES).fill(SMOOTHING / NUM_CLASSES);
    for (let i = 0; i < batch; i++) targets[i * NUM_CLASSES + ((rng.s + 7919 * (k * batch + i)) % NUM_CLASSES)] += 1 - SMOOTHING;
    return { images, targets };
  });
  try {
    const times: number[] = [];
    const losses: number[] = [];
    for (let i = 0; i < warmup + steps; i++) {
      const { images, targets } = batches[i % batches.length]!;
      const t0 = performance.now();
      const r = await model.train({ images, batchSize: batch, height: side, width: side }, { lr, targets });
      const ms = performance.now() - t0;
      if (!Number.isFinite(r.loss)) throw new Error(`loss is ${r.loss} at step ${i + 1}`);
      losses.push(r.loss);
      if (i >= warmup) times.push(ms);
    }
    process.stdout.write(
      JSON.stringify({
        suite: 'finetune',
        impl: 'ours',
        preset,
        batch,
        dtype: precision === 'bf16' ? 'bf16' : 'f32',
        device,
        threads: Number(process.env.RAYON_NUM_THREADS ?? 0) || null,
        ...stepTimes(batch, times, losses, warmup, steps),
        peak_mem_mb: peakMemoryMb(device),
        host_rss_mb: process.resourceUsage().maxRSS / 1024,
        import_rss_mb: importRssMb,
      }) + '\n',
    );
  } finally {
    model.dispose();
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`finetune-worker: ${e instanceof Error ? e.stack ?? e.message : String(e)}\n`);
  process.exit(1);
});
