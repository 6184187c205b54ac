/**
 * `finetune-step` suite: time per fine-tuning step (forward, backward, AdamW with layer decay,
 * drop path 0.1) of a classifier initialized from a pretraining checkpoint, next to the same model
 * from a random init, interleaved in rounds. The two differ only in their weights, so a gap
 * between them is a cost that depends on values (a slow path in some kernel for some inputs):
 * libm's erf made the pretrained model 1.4x slower until GELU got its own erf (erf_f32.rs).
 *
 *   npm run bench -- finetune-step --init runs/pretrain/checkpoint.safetensors
 *   CONVMAE_NATIVE=/path/to/other.node npm run bench -- finetune-step --init ...   (compare builds)
 */
import { Classifier } from '../src/index.js';
import { coreCount, fmt, intFlag, markdownTable, median, type Measurement, type Suite } from './lib.js';

export const finetuneStepSuite: Suite = {
  name: 'finetune-step',
  summary: 'fine-tuning step time from a pretraining checkpoint vs a random init (CPU, f32)',
  flags: {
    init: 'pretraining checkpoint to initialize from (required)',
    preset: 'default convmae-tiny (must match the checkpoint)',
    batch: 'images per step (default 64)',
    rounds: 'rounds, each timing every init (default 5)',
    steps: 'steps per round (default 3)',
  },
  async run(opts, log) {
    const init = opts.flags.init;
    if (!init) throw new RangeError('finetune-step needs --init <pretraining checkpoint>');
    const preset = opts.flags.preset ?? 'convmae-tiny';
    const batch = intFlag(opts, 'batch', 64);
    const rounds = intFlag(opts, 'rounds', 5);
    const steps = intFlag(opts, 'steps', 3);
    const models = {
      pretrained: Classifier.create({ preset, numClasses: 10, dropPath: 0.1 }),
      random: Classifier.create({ preset, numClasses: 10, dropPath: 0.1 }),
    };
    try {
      await models.pretrained.initFrom(init);
      const size = models.random.config.img_size;
      const images = new Uint8Array(batch * size * size * 3).map((_, i) => (i * 2654435761) % 251);
      const labels = Int32Array.from({ length: batch }, (_, i) => i % 10);
      const step = (m: Classifier) => m.train({ images, batchSize: batch, height: size, width: size }, { lr: 1e-4, labels });
      for (const m of Object.values(models)) await step(m); // warm-up
      const times: Record<keyof typeof models, number[]> = { pretrained: [], random: [] };
      for (let r = 0; r < rounds; r++) {
        for (const name of ['pretrained', 'random'] as const) {
          const t0 = performance.now();
          for (let s = 0; s < steps; s++) await step(models[name]);
          times[name].push((performance.now() - t0) / steps);
        }
        log(`round ${r + 1}/${rounds}: pretrained ${fmt(times.pretrained.at(-1)!)} ms/step, random ${fmt(times.random.at(-1)!)} ms/step`);
      }
      const measurements: Measurement[] = (['pretrained', 'random'] as const).map((name) => {
        const ms = median(times[name]);
        return {
          suite: 'finetune-step',
          impl: `finetune-${name}`,
          preset,
          batch,
          dtype: 'f32',
          device: 'cpu',
          threads: Number(process.env.RAYON_NUM_THREADS ?? coreCount()),
          images_per_s: batch / (ms / 1000),
          peak_mem_mb: process.resourceUsage().maxRSS / 1024,
          ms_per_step_median: ms,
          details: { init: name === 'pretrained' ? init : 'random', times, native: process.env.CONVMAE_NATIVE ?? 'default' },
        };
      });
      return { measurements, notes: [`addon: ${process.env.CONVMAE_NATIVE ?? 'the default one'}; per-round ms/step medians over ${rounds} rounds of ${steps} steps`] };
    } finally {
      for (const m of Object.values(models)) m.dispose();
    }
  },
  table(ms) {
    const random = ms.find((m) => m.impl === 'finetune-random');
    return markdownTable(
      ['init', 'ms/step (median)', 'images/s', 'vs random init'],
      ms.map((m) => [m.impl.replace('finetune-', ''), fmt(m.ms_per_step_median), fmt(m.images_per_s), random ? `${fmt(m.ms_per_step_median / random.ms_per_step_median)}x the time` : '']),
    );
  },
};
