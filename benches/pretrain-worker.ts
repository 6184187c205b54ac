/**
 * One measurement of our pretraining step, in a process of its own (so its peak RSS is ours alone):
 *
 *   RAYON_NUM_THREADS=2 node dist/benches/pretrain-worker.js --preset convmae-base --batch 8 --warmup 2 --steps 5
 *
 * Creates a Pretrainer (f32), feeds random uint8 [B,H,W,3] batches, and times `pretrainStep`
 * (normalize, mask, forward, backward, AdamW). Prints one JSON line. The batches are filled
 * before the clock starts (four, used in turn), as time_step.py fills PyTorch's.
 *
 * `--in-flight N` (default 2) keeps N steps queued, as the pretraining driver does: the next
 * step is started before the last one's promise is awaited, so that a GPU model builds step
 * k + 1 while the device runs step k. A step's time is then the interval between
 * completions, over the last N steps and divided by N, which in a steady stream is what each
 * step costs. With `--in-flight 1` each step is awaited before the next starts (as before
 * overlapped steps).
 */
// The API only (no data pipeline, so no sharp): the GPU check runs this where only Node, the
// native addon and dist/ exist.
import { Pretrainer, resolveConfig, type ConvMaeConfig, type DeviceName, type Precision } from '../src/api/index.js';
import { fillRandom, intFlag, parseArgs, stepTimes, stepWorkerFlags } from './lib.js';
import { peakMemoryMb } from './peak-memory.js';

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2));
  const flags = stepWorkerFlags(opts, 1.5e-4);
  const { preset, batch, warmup, steps, seed, lr } = flags;
  const device = flags.device as DeviceName;
  const precision = flags.precision as Precision;
  const dtype = (opts.flags.dtype ?? 'f32') as 'f32' | 'f64';
  const convPath = (opts.flags.path ?? 'sparse') as 'sparse' | 'dense';
  const inFlight = intFlag(opts, 'in-flight', 2);

  const importRssMb = process.resourceUsage().maxRSS / 1024;
  // Overrides of the preset, e.g. {"complementary_masking":true} (the suite's --masking).
  const overrides = opts.flags.config === undefined ? undefined : (JSON.parse(opts.flags.config) as Partial<ConvMaeConfig>);
  const config = resolveConfig({ preset, config: overrides });
  const side = config.img_size;
  const p = Pretrainer.create({ preset, config: overrides, dtype, seed, path: convPath, device, precision });
  const rng = { s: 0x9e3779b9 ^ seed };
  const batches = Array.from({ length: 4 }, () => {
    const images = new Uint8Array(batch * side * side * 3);
    fillRandom(images, rng);
    return images;
  });

  try {
    // finished[i]: when step i's promise settled; the clock of step i runs from the end of
    // step i - 1 (from the first call for step 0).
    const finished: number[] = [];
    // Each step's loss, in step order: the run's trajectory, which runs that differ only in how
    // they schedule or differentiate the same ops must repeat to the bit (benches/gpu/check.ts).
    const losses: number[] = [];
    const queued: Promise<void>[] = [];
    const t0 = performance.now();
    for (let i = 0; i < warmup + steps; i++) {
      const images = batches[i % batches.length];
      const step = p.pretrainStep({ images, batchSize: batch, height: side, width: side }, { lr }).then((r) => {
        if (!Number.isFinite(r.loss)) throw new Error(`loss is ${r.loss} at step ${i + 1}`);
        finished[i] = performance.now();
        losses[i] = r.loss;
      });
      // Awaited below; marked handled so that a failure reports the first step's error, not
      // an unhandled rejection of a step queued behind it.
      step.catch(() => undefined);
      queued.push(step);
      if (queued.length >= inFlight) await queued.shift();
    }
    // A failed step fails the run; the ones queued behind it fail too, and are awaited here.
    for (const q of queued) await q;
    // A step's time: the interval between completions over the last `inFlight` steps, divided
    // by them. With steps queued, answers may come in bursts (on the CPU, where a step cannot
    // overlap the next, two at once and then nothing for two steps' time: the GPU check's
    // rehearsal, 2026-11-27), which single intervals would split into a full and an empty one.
    // Steps before the `inFlight`-th have no full window: theirs runs from the first call, over
    // every step so far (a window of one there could fall inside a burst and read about 0: with
    // --warmup 1, ConvMAE-B's step read 2.1 s at batch 32 against 7.9 s, 2026-11-28).
    const perStep = (i: number) => (i >= inFlight ? (finished[i]! - finished[i - inFlight]!) / inFlight : (finished[i]! - t0) / (i + 1));
    const times = Array.from({ length: steps }, (_, k) => perStep(warmup + k));
    const out = {
      suite: 'pretrain',
      impl: convPath === 'sparse' ? 'ours' : 'ours-dense',
      preset,
      batch,
      dtype: precision === 'bf16' ? 'bf16' : dtype,
      device,
      threads: Number(process.env.RAYON_NUM_THREADS ?? 0) || null,
      ...stepTimes(batch, times, losses, warmup, steps),
      in_flight: inFlight,
      peak_mem_mb: peakMemoryMb(device),
      host_rss_mb: process.resourceUsage().maxRSS / 1024,
      import_rss_mb: importRssMb,
    };
    process.stdout.write(JSON.stringify(out) + '\n');
  } finally {
    p.dispose();
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`pretrain-worker: ${e instanceof Error ? e.stack ?? e.message : String(e)}\n`);
  process.exit(1);
});
