/**
 * One measurement of a downstream task's training step, in a process of its own (its peak memory
 * is its own): the segmenter (UperNet) or the detector (Mask R-CNN) on a ConvMAE backbone,
 * trained on made-up labelled images (benches/synthetic-scenes.ts), so that it runs where no
 * dataset is installed (the GPU check). Prints one JSON line.
 *
 *   node dist/benches/task-worker.js --task segment --preset convmae-base --img 512 --batch 8 --device cuda
 *   node dist/benches/task-worker.js --task detect --preset convmae-base --img 1024 --batch 2 --device cuda
 *
 * `--precision bf16`: the networks in bf16 over f32 weights (default fp32).
 *
 * The heads are the official ones (segmenter: 768 / 256 channels, PPM (1, 2, 3, 6); detector:
 * windows of 16 tokens at 1024 px with blocks 0, 3, 6, 10 global, FPN width 256, 4conv1fc, 512
 * regions an image) unless `--window` or `--global-blocks` say otherwise (smaller images need a
 * window that divides their token grid), or `--small-heads` (the GPU check's CPU rehearsal: the
 * task probes' narrow heads). Each step is awaited before the next (a task step
 * returns when it is done); the time of a step is the median over `--steps` after `--warmup`.
 */
import { Detector } from '../src/api/detector.js';
import { resolveConfig, type ConvMaeConfig } from '../src/api/config.js';
import type { DeviceName, Precision } from '../src/api/pretrainer.js';
import { Segmenter } from '../src/api/segmenter.js';
import { intFlag, parseArgs, stepTimes } from './lib.js';
import { peakMemoryMb } from './peak-memory.js';
import { rectangleScenes, SMALL_DETECTOR_HEAD, stripeLabels } from './synthetic-scenes.js';

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2), new Set(['small-heads']));
  const task = opts.flags.task;
  if (task !== 'segment' && task !== 'detect') throw new Error(`--task must be segment or detect, got '${task ?? ''}'`);
  const preset = opts.flags.preset ?? 'convmae-base';
  const side = intFlag(opts, 'img', task === 'segment' ? 512 : 1024);
  const batch = intFlag(opts, 'batch', task === 'segment' ? 8 : 2);
  const warmup = intFlag(opts, 'warmup', 2, 0);
  const steps = intFlag(opts, 'steps', 5);
  const device = (opts.flags.device ?? 'cpu') as DeviceName;
  const dtype = (opts.flags.dtype ?? 'f32') as 'f32' | 'f64';
  const precision = (opts.flags.precision ?? 'fp32') as Precision;
  const config: Partial<ConvMaeConfig> = { img_size: side };
  const { img_size } = resolveConfig({ preset, config });
  // The head's window and global blocks where the flags give them (else the small head's, or
  // the official ones).
  const windows = {
    ...(opts.flags.window === undefined ? {} : { window: intFlag(opts, 'window', 16) }),
    ...(opts.flags['global-blocks'] === undefined ? {} : { globalBlocks: opts.flags['global-blocks'].split(',').map(Number) }),
  };

  const small = opts.flags['small-heads'] === 'true';
  const model =
    task === 'segment'
      ? Segmenter.create({ preset, config, numClasses: 150, device, dtype, precision, seed: 0, ...(small ? { channels: 32, auxChannels: 16 } : {}) })
      : Detector.create({ preset, config, numClasses: 80, device, dtype, precision, seed: 0, ...(small ? SMALL_DETECTOR_HEAD : {}), ...windows });
  try {
    const times: number[] = [];
    const losses: number[] = [];
    for (let i = 0; i < warmup + steps; i++) {
      const t0 = performance.now();
      const loss =
        model instanceof Segmenter
          ? (await model.train(stripeLabels(batch, img_size, 150, i), { lr: 1e-4 })).loss
          : (await (model as Detector).train(rectangleScenes(batch, img_size, i + 1), { lr: 1e-4 })).loss;
      if (!Number.isFinite(loss)) throw new Error(`loss is ${loss} at step ${i + 1}`);
      losses.push(loss);
      if (i >= warmup) times.push(performance.now() - t0);
    }
    process.stdout.write(
      JSON.stringify({
        suite: 'task',
        impl: `ours-${task}`,
        preset,
        batch,
        img_size,
        dtype,
        precision,
        device,
        ...stepTimes(batch, times, losses, warmup, steps),
        peak_mem_mb: peakMemoryMb(device),
      }) + '\n',
    );
  } finally {
    model.dispose();
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`task-worker: ${e instanceof Error ? e.stack ?? e.message : String(e)}\n`);
  process.exit(1);
});
