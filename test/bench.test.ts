import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import sharp from 'sharp';
import { pretrain } from '../src/index.js';
import { ROOT } from './helpers.js';

/** The JSON lines a bench run prints (one per measured configuration). */
function jsonLines(stdout: string): Record<string, unknown>[] {
  return stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

const run = promisify(execFile);

test('npm run bench -- kernels times dense-masked and sparse depthwise conv and prints kernel JSON lines', async (t) => {
  const { stdout } = await run(process.execPath, [
    path.join(ROOT, 'dist', 'benches', 'run.js'),
    'kernels',
    '--preset',
    'convmae-tiny',
    '--batch',
    '2',
    '--iters',
    '1',
    '--no-save',
    '--quiet',
  ]);
  const lines = jsonLines(stdout);
  // 2 stages x 2 implementations x 2 passes
  t.is(lines.length, 8);
  for (const l of lines) {
    t.like(l, { suite: 'kernels', kernel: 'depthwise_conv5x5', preset: 'convmae-tiny', batch: 2, dtype: 'f32', device: 'cpu' });
    t.true(typeof l.ms === 'number' && (l.ms as number) > 0);
  }
  t.deepEqual(new Set(lines.map((l) => l.impl)), new Set(['dense-masked', 'sparse']));
  // convmae-tiny stage 1: 2 x 16 x 16 x 32
  t.deepEqual(lines[0]!.shape, [2, 16, 16, 32]);
  t.regex(stdout, /\| 1 \| \[2,16,16,32\] \| sparse \|/);
});

test('npm run bench -- gelu times our GELU next to candle\'s and prints JSON lines', async (t) => {
  const { stdout } = await run(process.execPath, [path.join(ROOT, 'dist', 'benches', 'run.js'), 'gelu', '--batch', '1', '--std', '2', '--iters', '1', '--no-save', '--quiet']);
  const lines = jsonLines(stdout);
  // 2 implementations x 2 passes
  t.is(lines.length, 4);
  for (const l of lines) {
    t.like(l, { suite: 'gelu', kernel: 'gelu_erf', input_std: 2, dtype: 'f32', device: 'cpu' });
    t.deepEqual(l.shape, [196 * 3072]);
    t.true(typeof l.ms === 'number' && (l.ms as number) > 0);
  }
  t.deepEqual(new Set(lines.map((l) => l.impl)), new Set(['ours', 'candle']));
  t.regex(stdout, /\| 2 \| ours \| forward \| 602112 \|/);
});

test('npm run bench -- ops times each kernel next to candle\'s composition at ConvMAE-B step shapes', async (t) => {
  const { stdout } = await run(process.execPath, [path.join(ROOT, 'dist', 'benches', 'run.js'), 'ops', '--batch', '1', '--reps', '1', '--no-save', '--quiet']);
  const lines = jsonLines(stdout);
  // 23 op cases x (ours, candle)
  t.is(lines.length, 46);
  t.deepEqual(new Set(lines.map((l) => l.impl)), new Set(['ours', 'candle']));
  t.like(lines.find((l) => l.kernel === 'self_attention:decoder' && l.impl === 'ours'), { suite: 'ops', dtype: 'f32', device: 'cpu', shape: [1, 196, 1536] });
  for (const l of lines) t.true(typeof l.ms === 'number' && (l.ms as number) > 0, JSON.stringify(l));
  t.regex(stdout, /\| self_attention:decoder \| f32 \| \[1, 196, 1536\] \|/);
  const bad = await t.throwsAsync(run(process.execPath, [path.join(ROOT, 'dist', 'benches', 'run.js'), 'ops', '--batch', '1', '--dtype', 'f16', '--no-save', '--quiet']));
  t.regex((bad as Error & { stderr: string }).stderr, /dtype must be 'f32' or 'bf16', got 'f16'/);
});

test('npm run bench -- finetune-step times a pretrained-init and a random-init classifier; --init is required', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-bench-ft-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const pre = await pretrain({ preset: 'convmae-tiny', batchSize: 4, steps: 1, outDir: dir, reconstructions: 0 });
  const bench = path.join(ROOT, 'dist', 'benches', 'run.js');
  const { stdout } = await run(process.execPath, [bench, 'finetune-step', '--init', pre.checkpoint, '--batch', '4', '--rounds', '1', '--steps', '1', '--no-save', '--quiet']);
  const lines = jsonLines(stdout);
  t.deepEqual(
    lines.map((l) => l.impl),
    ['finetune-pretrained', 'finetune-random'],
  );
  for (const l of lines) t.true((l.ms_per_step_median as number) > 0);
  const e = await t.throwsAsync(run(process.execPath, [bench, 'finetune-step', '--no-save', '--quiet']));
  t.regex(String((e as { stderr?: string }).stderr), /finetune-step needs --init/);
});

test('npm run bench -- data measures our loader on a folder of JPEGs and prints data JSON lines', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-bench-data-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  for (let i = 0; i < 8; i++) {
    const px = new Uint8Array(96 * 72 * 3).map((_, j) => (j * (i + 5)) % 251);
    await writeFile(path.join(dir, `${i}.jpg`), await sharp(px, { raw: { width: 96, height: 72, channels: 3 } }).jpeg().toBuffer());
  }
  const { stdout } = await run(process.execPath, [
    path.join(ROOT, 'dist', 'benches', 'run.js'),
    'data',
    '--folder',
    dir,
    '--impl',
    'ours,ours-sharp',
    '--workers',
    '1',
    '--rounds',
    '1',
    '--images',
    '16',
    '--batch',
    '4',
    '--no-save',
    '--quiet',
  ]);
  const lines = jsonLines(stdout);
  t.deepEqual(
    lines.map((l) => l.impl),
    ['ours', 'ours-sharp'],
  );
  for (const l of lines) {
    t.like(l, { suite: 'data', workers: 1, batch: 4, image_size: 224 });
    t.true(typeof l.images_per_s === 'number' && (l.images_per_s as number) > 0);
  }
});
