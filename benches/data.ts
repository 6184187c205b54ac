/**
 * The `data` suite: images/s of the pretraining transform (decode,
 * RandomResizedCrop 224 with scale 0.2-1 and bicubic resampling, flip, uint8
 * out) on a folder of real photographs at ImageNet-like size
 * (benches/photos.ts), ours against PyTorch DataLoader + torchvision (PIL).
 *
 * For each worker count (1, 2, ..., all cores; `--workers`), every
 * implementation runs in a fresh process pinned with taskset to that many
 * cores (0..W-1), so "W workers" means W cores for everything the
 * implementation does (its main thread included), and images/s / W is a
 * per-core figure. Implementations alternate in rounds (ours, ours-sharp,
 * torchvision, ours, ...); the suite reports the median over rounds.
 *
 * impl: `ours` (BatchLoader, native JPEG path, W decode threads),
 * `ours-sharp` (BatchLoader, sharp only, W images in flight), `torchvision`
 * (benches/baselines/torchvision_data.py, W DataLoader worker processes).
 */
import { existsSync } from 'node:fs';
import path from 'node:path';
import { findTorch } from './pretrain.js';
import { benchPhotoFolder } from './photos.js';
import { REPO_ROOT, coreCount, fmt, intFlag, listFlag, markdownTable, median, runChild, tryExec, type Measurement, type Options, type Suite, type SuiteResult } from './lib.js';

/** The pretraining resolution of ConvMAE-B. */
const IMAGE_SIZE = 224;

export const DATA_IMPLS = ['ours', 'ours-sharp', 'torchvision'] as const;
type DataImpl = (typeof DATA_IMPLS)[number];

function workerCounts(opts: Options): number[] {
  const all = coreCount();
  const given = listFlag(opts, 'workers', ['1', '2', 'all']).map((w) => (w === 'all' ? all : Number(w)));
  for (const w of given) if (!Number.isInteger(w) || w < 1) throw new RangeError(`--workers must be positive integers or 'all'`);
  return [...new Set(given)].sort((a, b) => a - b);
}

export const dataSuite: Suite = {
  name: 'data',
  summary: 'images/s (and per core) of the pretraining transform on real JPEG photos, ours vs PyTorch DataLoader + torchvision',
  flags: {
    workers: "worker counts, comma separated, 'all' = every core (default 1,2,all)",
    impl: 'implementations: ours,ours-sharp,torchvision (default all)',
    rounds: 'alternating rounds per implementation (default 3)',
    images: 'timed images per round (default 1024)',
    batch: 'batch size (default 32)',
    count: 'JPEGs in the benchmark folder (default 400)',
    folder: 'use this folder of JPEGs instead of the built one',
  },

  async run(opts: Options, log: (line: string) => void): Promise<SuiteResult> {
    const workers = workerCounts(opts);
    const rounds = intFlag(opts, 'rounds', 3);
    const images = intFlag(opts, 'images', 1024);
    const batch = intFlag(opts, 'batch', 32);
    const impls = listFlag(opts, 'impl', [...DATA_IMPLS]) as DataImpl[];
    for (const i of impls) if (!DATA_IMPLS.includes(i)) throw new RangeError(`unknown --impl '${i}' (known: ${DATA_IMPLS.join(', ')})`);
    const folder = opts.flags.folder ? path.resolve(opts.flags.folder) : await benchPhotoFolder(intFlag(opts, 'count', 400), log);

    const notes: string[] = [];
    const versions: Record<string, string> = {};
    let active = [...impls];
    let torchPython = '';
    if (active.includes('torchvision')) {
      const t = findTorch();
      const tv = t.reason ? undefined : tryExec(t.python, ['-c', 'import torchvision, PIL; print(torchvision.__version__, PIL.__version__)'], 120_000);
      if (t.reason || !tv) {
        const why = t.reason ?? `${t.python} cannot import torchvision and PIL`;
        notes.push(`torchvision skipped: ${why}`);
        log(`note: torchvision skipped: ${why}`);
        active = active.filter((i) => i !== 'torchvision');
      } else {
        torchPython = t.python;
        const [torchvision, pillow] = tv.split('\n').pop()!.split(' ');
        Object.assign(versions, { torch: t.torch ?? 'unknown', torchvision, pillow, torch_python: t.python });
      }
    }
    const worker = path.join(REPO_ROOT, 'dist', 'benches', 'data-worker.js');
    if (active.some((i) => i !== 'torchvision') && !existsSync(worker)) throw new Error('dist/benches/data-worker.js is missing: run `npm run build:ts` first');
    const sharpVersion = tryExec(process.execPath, ['-e', "console.log(require('sharp/package.json').version)"]);
    if (sharpVersion) versions.sharp = sharpVersion;
    const taskset = tryExec('taskset', ['-V']) !== undefined;
    if (!taskset) notes.push('taskset is missing: processes were not pinned, so the worker count limits threads but not cores');

    const measurements: Measurement[] = [];
    for (const w of workers) {
      const perImpl = new Map<DataImpl, number[]>(active.map((i) => [i, []]));
      const failed = new Set<DataImpl>();
      for (let round = 1; round <= rounds; round++) {
        for (const impl of active) {
          if (failed.has(impl)) continue;
          const common = ['--folder', folder, '--workers', String(w), '--batch', String(batch), '--images', String(images), '--size', String(IMAGE_SIZE)];
          const [cmd, args] =
            impl === 'torchvision'
              ? [torchPython, [path.join(REPO_ROOT, 'benches', 'baselines', 'torchvision_data.py'), ...common]]
              : [process.execPath, [worker, ...common, '--decoder', impl === 'ours' ? 'native' : 'sharp']];
          const cores = `0-${w - 1}`;
          const env = { ...process.env, OMP_NUM_THREADS: '1', UV_THREADPOOL_SIZE: String(Math.max(4, w)) };
          log(`[${w} workers] round ${round}/${rounds}: ${impl} ...`);
          const r = taskset ? await runChild('taskset', ['-c', cores, cmd, ...args], env, 600_000) : await runChild(cmd, args, env, 600_000);
          const rate = typeof r.json?.images_per_s === 'number' ? r.json.images_per_s : NaN;
          if (r.code !== 0 || !Number.isFinite(rate)) {
            const tail = r.stderr.trim().split('\n').slice(-4).join(' | ');
            notes.push(`${impl} failed with ${w} workers (round ${round}): ${tail}`);
            log(`  ${impl} failed: ${tail}`);
            failed.add(impl);
            continue;
          }
          perImpl.get(impl)!.push(rate);
          log(`  ${impl}: ${fmt(rate)} images/s (${fmt(rate / w)} per core)`);
        }
      }
      for (const impl of active) {
        const rates = perImpl.get(impl)!;
        if (failed.has(impl) || rates.length === 0) continue;
        const rate = median(rates);
        measurements.push({
          suite: 'data',
          impl,
          preset: '-',
          batch,
          dtype: 'uint8',
          device: 'cpu',
          threads: w,
          images_per_s: rate,
          peak_mem_mb: NaN,
          ms_per_step_median: (batch / rate) * 1000,
          details: { workers: w, image_size: IMAGE_SIZE, images_per_s_per_core: rate / w, round_images_per_s: rates, images_per_round: images, folder: path.relative(REPO_ROOT, folder) || folder },
        });
      }
    }
    return { measurements, notes, versions };
  },

  table(ms: Measurement[]): string {
    const rows = ms.map((m) => {
      const ref = ms.find((o) => o.impl === 'torchvision' && o.threads === m.threads);
      const vs = ref ? `${(m.images_per_s / ref.images_per_s).toFixed(2)}×` : '—';
      const d = m.details ?? {};
      const rounds = Array.isArray(d.round_images_per_s) ? (d.round_images_per_s as number[]).map((x) => fmt(x)).join(' / ') : '';
      return [m.impl, String(m.threads), fmt(m.images_per_s), fmt(m.images_per_s / m.threads), rounds, vs];
    });
    return markdownTable(['impl', 'workers (= cores)', 'images/s (median)', 'images/s per core', 'per-round images/s', 'vs torchvision'], rows);
  },
};
