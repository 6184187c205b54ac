/**
 * The `finetune` suite: images/s and peak memory of one full fine-tuning step (uint8 batch ->
 * normalize -> forward with stochastic depth -> soft-target cross-entropy -> backward -> AdamW
 * with layer decay) of the official ConvViT with 1000 classes, ours (benches/finetune-worker.ts)
 * against the PyTorch reference (benches/baselines/time_step.py --task finetune), each in
 * processes of its own, alternating in rounds as the `pretrain` suite runs them.
 */
import { existsSync } from 'node:fs';
import path from 'node:path';
import { withTorchIfFound } from './pretrain.js';
import { REPO_ROOT, alternatingRounds, fmt, markdownTable, roundsFlags, roundsMeasurement, type Measurement, type Suite } from './lib.js';

const IMPLS = ['ours', 'pytorch'] as const;
type Impl = (typeof IMPLS)[number];

export const finetuneSuite: Suite = {
  name: 'finetune',
  summary: 'images/s and peak RSS of a full f32 fine-tuning step (forward+backward+AdamW, drop path 0.1), ours vs PyTorch',
  flags: {
    preset: 'model preset(s), comma separated (default convmae-base)',
    batch: 'batch size(s), comma separated (default 8)',
    steps: 'timed steps per round (default 5)',
    warmup: 'untimed steps per round (default 2)',
    rounds: 'alternating rounds per implementation (default 3)',
    impl: 'implementations, comma separated: ours,pytorch (default both)',
    threads: 'threads for every implementation (default: core count)',
    'timeout-s': 'limit per child process in seconds (default 3600)',
  },

  async run(opts, log) {
    const { presets, batches, steps, warmup, rounds, threads, timeoutMs, impls } = roundsFlags<Impl>(opts, IMPLS);

    const notes: string[] = [];
    const versions: Record<string, string> = {};
    const { active, torchPython } = withTorchIfFound(impls, notes, versions, log);
    const worker = path.join(REPO_ROOT, 'dist', 'benches', 'finetune-worker.js');
    if (active.includes('ours') && !existsSync(worker)) throw new Error('dist/benches/finetune-worker.js is missing: run `npx tsc -p tsconfig.json` first');

    const env = { ...process.env, RAYON_NUM_THREADS: String(threads), OMP_NUM_THREADS: String(threads) };
    const measurements: Measurement[] = [];
    for (const preset of presets) {
      for (const batch of batches) {
        const common = ['--preset', preset, '--batch', String(batch), '--warmup', String(warmup), '--steps', String(steps)];
        const perImpl = await alternatingRounds(active, rounds, `${preset} batch ${batch}`, batch, (impl) =>
          impl === 'ours'
            ? [process.execPath, [worker, ...common]]
            : [torchPython, [path.join(REPO_ROOT, 'benches', 'baselines', 'time_step.py'), '--task', 'finetune', ...common, '--threads', String(threads)]],
          env, timeoutMs, notes, log);
        for (const [impl, rs] of perImpl) measurements.push(roundsMeasurement({ suite: 'finetune', impl, preset, batch, threads }, rs, { warmup, steps }));
      }
    }
    return { measurements, notes, versions };
  },

  table(ms: Measurement[]): string {
    const rows = ms.map((m) => {
      const ref = ms.find((o) => o.impl === 'pytorch' && o.preset === m.preset && o.batch === m.batch && o.threads === m.threads);
      const rounds = Array.isArray(m.details?.round_ms_median) ? (m.details.round_ms_median as number[]).map((x) => fmt(x)).join(' / ') : '';
      return [m.preset, String(m.batch), m.impl, String(m.threads), fmt(m.ms_per_step_median), rounds, fmt(m.images_per_s), ref ? `${(m.images_per_s / ref.images_per_s).toFixed(2)}×` : '—', fmt(m.peak_mem_mb)];
    });
    return markdownTable(['preset', 'batch', 'impl', 'threads', 'ms/step (median)', 'per-round medians', 'images/s', 'vs pytorch', 'peak RSS MB'], rows);
  },
};
