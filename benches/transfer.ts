/**
 * The transfer suite: does pretraining help? Pretrains a small preset for a fixed budget, then
 * linear-probes and fine-tunes it with the official recipes, next to the same schedules from a
 * randomly initialized encoder, and reports top-1 / top-5 on the test split.
 *
 *   npm run bench -- transfer                                  # Fashion-MNIST when installed, else MNIST
 *   npm run bench -- transfer --pretrained runs/x/checkpoint.safetensors --pretrain-steps 4000
 *   npm run bench -- transfer --pretrained ... --labels-per-class 100 --finetune-epochs 30 --seeds 0,1,2
 *
 * Fashion-MNIST comes from the Debian package dataset-fashion-mnist
 * (/usr/share/datasets/fashion-mnist/*-idx*-ubyte.gz; `apt-get download` + `dpkg -x` works
 * without root: pass --data to the extracted train-images file).
 *
 * `--labels-per-class N` trains each classifier on N labeled images per class (a class-balanced
 * subset drawn with the row's seed; the same subset for both inits) and evaluates on the whole test
 * split: the low-label setting, where pretraining matters most. `--seeds` repeats every pair.
 *
 * Each row's `images_per_s` is the training throughput of that run; accuracies and budgets are in
 * the details and the table. On 2 cores (benches/results/transfer-2026-11-28.md): pretraining
 * takes about 3 minutes, each classifier run 1 to 5.
 */
import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { finetune, linprobe, pretrain, type ClassifyRunSummary } from '../src/index.js';
import { REPO_ROOT, fmt, intFlag, listFlag, markdownTable, maskingFlag, type Measurement, type Options, type Suite } from './lib.js';

const FASHION = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz';

function numFlag(opts: Options, name: string, dflt: number): number {
  const v = opts.flags[name];
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new RangeError(`--${name} must be a positive number, got '${v}'`);
  return n;
}

interface Details {
  recipe: string;
  init: string;
  blr: number;
  acc1: number;
  acc5: number;
  eval_loss: number;
  eval_images: number;
  steps: number;
  train_images: number;
  seconds: number;
  seed: number;
  labels_per_class?: number;
  train_set: number;
  data: string;
  pretrain?: Record<string, unknown>;
}

/**
 * One line per recipe with several seeds: the mean top-1 of each init and the paired differences
 * (pretrained minus random, same seed and same training images), so a reader sees the spread.
 */
function pairedSummary(rows: Details[]): string[] {
  const lines: string[] = [];
  for (const recipe of [...new Set(rows.map((d) => d.recipe))]) {
    const of = (init: string) => rows.filter((d) => d.recipe === recipe && d.init === init);
    const pre = of('pretrained');
    const diffs = pre.flatMap((p) => {
      const r = of('random').find((x) => x.seed === p.seed);
      return r ? [p.acc1 - r.acc1] : [];
    });
    if (diffs.length < 2) continue;
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    const signed = (x: number) => (x >= 0 ? '+' : '') + x.toFixed(2);
    lines.push(
      `${recipe}: mean top-1 over ${diffs.length} seeds ${mean(pre.map((d) => d.acc1)).toFixed(2)}% pretrained vs ${mean(of('random').map((d) => d.acc1)).toFixed(2)}% random; ` +
        `pretrained minus random per seed: ${diffs.map(signed).join(', ')} (mean ${signed(mean(diffs))}, ahead in ${diffs.filter((d) => d > 0).length} of ${diffs.length})`,
    );
  }
  return lines;
}

export const transferSuite: Suite = {
  name: 'transfer',
  summary: 'pretrain a small preset, then linear-probe and fine-tune it vs a random init (accuracy, not speed)',
  flags: {
    data: `training IDX file (default ${FASHION} when present, else the bundled MNIST)`,
    preset: 'default convmae-tiny',
    pretrained: 'use this pretraining checkpoint instead of pretraining here (say --pretrain-steps it had)',
    'pretrain-steps': 'default 4000 (batch 64, blr 1e-2, warmup 200 steps)',
    masking: 'pretraining masks: random (ConvMAE, default) or complementary (FastConvMAE: 4 views of each image)',
    'linprobe-epochs': 'default 3 (batch 256, warmup 0.3 epoch, LARS)',
    'linprobe-blr': 'default 3: the official 0.1 is tuned for 90 epochs; a 3-epoch probe with it barely moves (LARS steps scale with lr * 0.001)',
    'finetune-epochs': 'default 2 (batch 64, warmup 0.2 epoch, the full official recipe)',
    'finetune-blr': 'default 5e-4 (official)',
    recipes: 'which to run: linprobe,finetune (default both)',
    seed: 'default 0 (pretraining here, and the classifiers when --seeds is absent)',
    seeds: 'classifier seeds, e.g. 0,1,2: each seed runs the pretrained / random pair (default: --seed)',
    'labels-per-class': 'train the classifiers on this many images per class (default: the whole training set)',
    'eval-every': 'evaluate every N steps (default: once per epoch and at the end)',
    work: 'where the runs go (default runs/bench-transfer)',
  },
  async run(opts, log) {
    const data = opts.flags.data ?? (existsSync(FASHION) ? FASHION : 'mnist');
    const preset = opts.flags.preset ?? 'convmae-tiny';
    const seed = intFlag(opts, 'seed', 0, 0);
    const work = path.resolve(opts.flags.work ?? path.join(REPO_ROOT, 'runs', 'bench-transfer'));
    mkdirSync(work, { recursive: true });
    const pretrainSteps = intFlag(opts, 'pretrain-steps', 4000);
    const { masking, config } = maskingFlag(opts);
    const pretrainRecipe = { preset, config, batchSize: 64, steps: pretrainSteps, blr: 1e-2, warmupSteps: 200, seed };
    let checkpoint = opts.flags.pretrained;
    let pretrainInfo: Record<string, unknown> = { ...pretrainRecipe, checkpoint };
    if (!checkpoint) {
      log(`pretraining ${preset} on ${data} for ${pretrainSteps} steps`);
      const started = performance.now();
      const p = await pretrain({ ...pretrainRecipe, data, outDir: path.join(work, 'pretrain'), reconstructions: 8 });
      checkpoint = p.checkpoint;
      pretrainInfo = { ...pretrainRecipe, checkpoint, seconds: (performance.now() - started) / 1000, first_loss: p.firstLoss, last_loss: p.lastLoss };
    }

    const measurements: Measurement[] = [];
    const runs = [
      { recipe: 'linprobe', epochs: numFlag(opts, 'linprobe-epochs', 3), batchSize: 256, warmupEpochs: 0.3, blr: numFlag(opts, 'linprobe-blr', 3) },
      { recipe: 'finetune', epochs: numFlag(opts, 'finetune-epochs', 2), batchSize: 64, warmupEpochs: 0.2, blr: numFlag(opts, 'finetune-blr', 5e-4) },
    ];
    const wanted = listFlag(opts, 'recipes', ['linprobe', 'finetune']);
    const seeds = listFlag(opts, 'seeds', [String(seed)]).map((v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new RangeError(`--seeds: '${v}' is not a non-negative integer`);
      return n;
    });
    const labelsPerClass = opts.flags['labels-per-class'] === undefined ? undefined : intFlag(opts, 'labels-per-class', 1);
    const evalEvery = opts.flags['eval-every'] === undefined ? undefined : intFlag(opts, 'eval-every', 1);
    for (const name of wanted) if (!runs.some((r) => r.recipe === name)) throw new RangeError(`--recipes: unknown recipe '${name}' (linprobe, finetune)`);
    // Each (recipe, seed) runs the pretrained encoder, then the random one, on the same data.
    const jobs = runs
      .filter((r) => wanted.includes(r.recipe))
      .flatMap((r) => seeds.flatMap((runSeed) => (['pretrained', 'random'] as const).map((init) => ({ r, runSeed, init }))));
    for (const { r, runSeed, init } of jobs) {
      const outDir = path.join(work, `${r.recipe}-${init}` + (seeds.length > 1 ? `-seed${runSeed}` : ''));
      log(`${r.recipe} from ${init === 'pretrained' ? checkpoint : 'a random init'}: ${r.epochs} epoch(s), batch ${r.batchSize}, blr ${r.blr}, seed ${runSeed}` + (labelsPerClass ? `, ${labelsPerClass} labels per class` : ''));
      const base = { data, preset, batchSize: r.batchSize, warmupEpochs: r.warmupEpochs, blr: r.blr, seed: runSeed, outDir, init: init === 'pretrained' ? checkpoint : undefined, labelsPerClass, evalEvery };
      // Whole epochs, or the fractional budget in steps.
      const run = async (): Promise<ClassifyRunSummary> => {
        // MNIST and Fashion-MNIST: 10 classes, 60000 training images.
        const trainSet = labelsPerClass ? labelsPerClass * 10 : 60000;
        const steps = Number.isInteger(r.epochs) ? undefined : Math.round(r.epochs * (trainSet / r.batchSize));
        const o = { ...base, epochs: steps ? undefined : r.epochs, steps, onEval: (e: { step: number; acc1: number }) => log(`  step ${e.step}: acc@1 ${e.acc1.toFixed(2)}%`) };
        return r.recipe === 'linprobe' ? linprobe(o) : finetune(o);
      };
      const s = await run();
      const last = s.evals.at(-1);
      if (!last) throw new Error(`${r.recipe} (${init}) found no evaluation split for ${data}`);
      const details: Details = {
        recipe: r.recipe,
        init,
        blr: r.blr,
        acc1: last.acc1,
        acc5: last.acc5,
        eval_loss: last.loss,
        eval_images: last.count,
        steps: s.steps,
        train_images: s.steps * r.batchSize,
        seconds: s.seconds,
        seed: runSeed,
        labels_per_class: labelsPerClass,
        train_set: s.trainImages,
        data: s.dataset,
        pretrain: init === 'pretrained' ? pretrainInfo : undefined,
      };
      log(`  -> acc@1 ${last.acc1.toFixed(2)}%  acc@5 ${last.acc5.toFixed(2)}%  in ${s.seconds.toFixed(0)} s`);
      measurements.push({
        suite: 'transfer',
        impl: `${r.recipe}-${init}`,
        preset,
        batch: r.batchSize,
        dtype: 'f32',
        device: 'cpu',
        threads: 0,
        images_per_s: (s.steps * r.batchSize) / s.seconds,
        peak_mem_mb: process.memoryUsage().rss / 2 ** 20,
        ms_per_step_median: (1000 * s.seconds) / Math.max(1, s.steps),
        details: details as unknown as Record<string, unknown>,
      });
    }
    const notes = [
      ...pairedSummary(measurements.map((m) => m.details as unknown as Details)),
      `pretraining: ${preset}, ${pretrainSteps} steps x batch 64 (${pretrainSteps * 64} images) on ${data}, blr 1e-2, warmup 200, ${masking} masking, checkpoint ${checkpoint}`,
      'threads = 0: the default (all cores); images_per_s includes evaluation passes at each epoch end',
    ];
    return { measurements, notes };
  },
  table(ms) {
    return markdownTable(
      ['recipe', 'encoder init', 'seed', 'train images', 'epochs (steps x batch)', 'blr', 'top-1 %', 'top-5 %', 'eval loss', 'wall s'],
      ms.map((m) => {
        const d = m.details as unknown as Details;
        // Rows recorded before seeds and subsets existed: seed 0 (the default), all 60000 images.
        const trainSet = d.train_set ?? 60000;
        return [d.recipe, d.init, String(d.seed ?? 0), String(trainSet), `${fmt(d.train_images / trainSet)} (${d.steps} x ${m.batch})`, String(d.blr), d.acc1.toFixed(2), d.acc5.toFixed(2), fmt(d.eval_loss), fmt(d.seconds)];
      }),
    );
  },
};
