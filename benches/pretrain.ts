/**
 * The `pretrain` suite: images/s and peak memory of one full pretraining step (uint8 batch ->
 * normalize -> mask -> forward -> backward -> AdamW), ours against the PyTorch reference of the
 * official model (benches/baselines/time_step.py).
 *
 * Every implementation runs in a child process of its own, so peak RSS is per implementation.
 * The implementations run alternately in rounds (ours, pytorch, ours, pytorch, ...): each round
 * is a fresh process with `--warmup` untimed and `--steps` timed steps; a round reports its median
 * ms/step, and the suite reports the median over rounds (peak memory: the largest round), so
 * machine noise hits both implementations alike.
 */
import { existsSync } from 'node:fs';
import path from 'node:path';
import {
  REPO_ROOT,
  alternatingRounds,
  fmt,
  markdownTable,
  maskingFlag,
  roundsFlags,
  roundsMeasurement,
  tryExec,
  type Measurement,
  type Options,
  type Suite,
  type SuiteResult,
} from './lib.js';

/** `ours` is the default (sparse) path; `ours-dense` computes stages 1-2 densely like the official code. */
export const IMPLS = ['ours', 'ours-dense', 'pytorch'] as const;
export type Impl = (typeof IMPLS)[number];

const DEFAULT_TORCH_PYTHON = '/work/venv-torch/bin/python';

/**
 * `impls` as they can run here: without 'pytorch' where no interpreter with torch is found (the
 * reason noted and logged), else with the interpreter, whose torch version goes to `versions`.
 */
export function withTorchIfFound<I extends string>(impls: I[], notes: string[], versions: Record<string, string>, log: (line: string) => void): { active: I[]; torchPython: string } {
  if (!impls.includes('pytorch' as I)) return { active: impls, torchPython: '' };
  const t = findTorch();
  if (t.reason) {
    notes.push(`pytorch skipped: ${t.reason}`);
    log(`note: pytorch skipped: ${t.reason}`);
    return { active: impls.filter((i) => i !== 'pytorch'), torchPython: '' };
  }
  versions.torch = t.torch ?? 'unknown';
  versions.torch_python = t.python;
  return { active: impls, torchPython: t.python };
}

/** The interpreter for the PyTorch baseline and its torch version, or why it cannot be used. */
export function findTorch(): { python: string; torch?: string; reason?: string } {
  const python = process.env.CONVMAE_TORCH_PYTHON || DEFAULT_TORCH_PYTHON;
  if (path.isAbsolute(python) && !existsSync(python)) {
    return { python, reason: `${python} does not exist (set CONVMAE_TORCH_PYTHON, see benches/README.md)` };
  }
  const v = tryExec(python, ['-c', 'import torch; print(torch.__version__)'], 120_000);
  if (!v) return { python, reason: `${python} cannot import torch (see benches/README.md for the install)` };
  return { python, torch: v.split('\n').pop() };
}

export const pretrainSuite: Suite = {
  name: 'pretrain',
  summary: 'images/s and peak RSS of a full f32 pretraining step (forward+backward+AdamW), ours vs PyTorch',
  flags: {
    preset: 'model preset(s), comma separated (default convmae-base)',
    batch: 'batch size(s), comma separated (default 8)',
    steps: 'timed steps per round (default 5)',
    warmup: 'untimed steps per round (default 2; fewer than the worker\'s 2 steps in flight time the first steps with the start)',
    rounds: 'alternating rounds per implementation (default 3)',
    impl: 'implementations, comma separated: ours,ours-dense,pytorch (default all)',
    threads: 'threads for every implementation (default: core count)',
    'timeout-s': 'limit per child process in seconds (default 3600)',
    masking: 'random (ConvMAE, default) or complementary (FastConvMAE: 4 views per image), for every implementation',
  },

  async run(opts: Options, log: (line: string) => void): Promise<SuiteResult> {
    const { presets, batches, steps, warmup, rounds, threads, timeoutMs, impls } = roundsFlags<Impl>(opts, IMPLS);
    const { masking, config } = maskingFlag(opts);
    const configArgs = config ? ['--config', JSON.stringify(config)] : [];

    const notes: string[] = [];
    const versions: Record<string, string> = {};
    const { active, torchPython } = withTorchIfFound(impls, notes, versions, log);
    if ((active.includes('ours') || active.includes('ours-dense')) && !existsSync(path.join(REPO_ROOT, 'dist', 'benches', 'pretrain-worker.js'))) {
      throw new Error('dist/benches/pretrain-worker.js is missing: run `npx tsc -p tsconfig.json` first');
    }

    const env = { ...process.env, RAYON_NUM_THREADS: String(threads), OMP_NUM_THREADS: String(threads) };
    const measurements: Measurement[] = [];
    for (const preset of presets) {
      for (const batch of batches) {
        const common = ['--preset', preset, '--batch', String(batch), '--warmup', String(warmup), '--steps', String(steps), ...configArgs];
        const perImpl = await alternatingRounds(active, rounds, `${preset} batch ${batch}`, batch, (impl) =>
          impl !== 'pytorch'
            ? [process.execPath, [path.join(REPO_ROOT, 'dist', 'benches', 'pretrain-worker.js'), ...common, '--path', impl === 'ours' ? 'sparse' : 'dense']]
            : [torchPython, [path.join(REPO_ROOT, 'benches', 'baselines', 'time_step.py'), ...common, '--threads', String(threads)]],
          env, timeoutMs, notes, log);
        for (const [impl, rs] of perImpl) measurements.push(roundsMeasurement({ suite: 'pretrain', impl, preset, batch, threads }, rs, { masking, warmup, steps }));
      }
    }
    return { measurements, notes, versions };
  },

  table(ms: Measurement[]): string {
    const rows = ms.map((m) => {
      const masking = (m.details?.masking as string | undefined) ?? 'random';
      const ref = ms.find(
        (o) => o.impl === 'pytorch' && o.preset === m.preset && o.batch === m.batch && o.threads === m.threads && ((o.details?.masking as string | undefined) ?? 'random') === masking,
      );
      const speed = ref ? `${(m.images_per_s / ref.images_per_s).toFixed(2)}×` : '—';
      const d = m.details ?? {};
      const rounds = Array.isArray(d.round_ms_median) ? (d.round_ms_median as number[]).map((x) => fmt(x)).join(' / ') : '';
      const importMb = typeof d.import_rss_mb === 'number' ? fmt(d.import_rss_mb) : '—';
      return [masking === 'random' ? m.preset : `${m.preset} (${masking} masking)`, String(m.batch), m.impl, String(m.threads), fmt(m.ms_per_step_median), rounds, fmt(m.images_per_s), speed, fmt(m.peak_mem_mb), importMb];
    });
    return markdownTable(
      ['preset', 'batch', 'impl', 'threads', 'ms/step (median)', 'per-round medians', 'images/s', 'vs pytorch', 'peak RSS MB', 'RSS after import MB'],
      rows,
    );
  },
};
