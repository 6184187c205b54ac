// The benchmark harness (benches/) and the PyTorch baseline (benches/baselines/).
// The PyTorch checks run only where an interpreter with torch is found (CONVMAE_TORCH_PYTHON or
// /work/venv-torch/bin/python, see benches/README.md); elsewhere they are registered as skipped.
import test from 'ava';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { SUITES } from '../benches/run.js';
import {
  jsonLine,
  markdownTable,
  maskingFlag,
  median,
  parseArgs,
  renderResultsMarkdown,
  saveResults,
  type Measurement,
  type RunRecord,
} from '../benches/lib.js';
import { findTorch, pretrainSuite } from '../benches/pretrain.js';
import { checkFixture } from '../src/index.js';
import { GOLDEN, ROOT } from './helpers.js';

const run = promisify(execFile);
const torch = findTorch();
const withTorch = torch.reason ? test.skip : test;
const FIXTURE = path.join(GOLDEN, 'pretrain_small.safetensors');

const JSON_KEYS = ['suite', 'impl', 'preset', 'batch', 'dtype', 'device', 'threads', 'images_per_s', 'peak_mem_mb', 'ms_per_step_median'];

function fake(impl: string, ms: number): Measurement {
  return {
    suite: 'pretrain', impl, preset: 'convmae-tiny', batch: 4, dtype: 'f32', device: 'cpu', threads: 2,
    images_per_s: 4 / (ms / 1000), peak_mem_mb: 100, ms_per_step_median: ms, details: { round_ms_median: [ms] },
  };
}

function record(command: string, results: Measurement[]): RunRecord {
  return {
    command, argv: command.split(' '), started: '2025-01-01T00:00:00.000Z', finished: '2025-01-01T00:01:00.000Z',
    machine: { cpu: 'test cpu', cores: 2, logical_cpus: 2, ram_gb: 1, os: 'Linux', arch: 'x64' },
    versions: { node: process.version }, env: {}, load_avg: { start: [0, 0, 0], end: [0, 0, 0] }, notes: [], results,
  };
}

test('parseArgs reads suites, valued flags, = flags and boolean flags', (t) => {
  const o = parseArgs(['pretrain', '--preset', 'convmae-tiny,convmae-small', '--batch=32', '--no-save', '--quiet', '--steps', '3']);
  t.deepEqual(o.positional, ['pretrain']);
  t.deepEqual(o.flags, { preset: 'convmae-tiny,convmae-small', batch: '32', 'no-save': 'true', quiet: 'true', steps: '3' });
  // a boolean flag never swallows the next word
  t.deepEqual(parseArgs(['--quiet', 'pretrain']).positional, ['pretrain']);
});

test('median, json line format and markdown table', (t) => {
  t.is(median([3, 1, 2]), 2);
  t.is(median([4, 1, 3, 2]), 2.5);
  t.true(Number.isNaN(median([])));
  const line = JSON.parse(jsonLine(fake('ours', 250))) as Record<string, unknown>;
  t.deepEqual(Object.keys(line), JSON_KEYS);
  t.is(line.images_per_s, 16);
  t.is(markdownTable(['a', 'b'], [['1', '2']]), '| a | b |\n| --- | --- |\n| 1 | 2 |');
  const table = pretrainSuite.table!([fake('ours', 250), fake('pytorch', 500)]);
  t.regex(table, /\| convmae-tiny \| 4 \| ours \| 2 \| 250 \| 250 \| 16.0 \| 2.00× \|/);
});

test('the pretrain suite is registered', (t) => {
  t.is(SUITES.pretrain, pretrainSuite);
  for (const f of ['preset', 'batch', 'steps', 'impl', 'threads']) t.true(f in pretrainSuite.flags, f);
});

test('saveResults keeps one run per command and renders every run of the day', (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'convmae-bench-'));
  try {
    saveResults(dir, 'pretrain', '2025-01-01', record('npm run bench -- pretrain --batch 8', [fake('ours', 100)]), pretrainSuite.table!);
    saveResults(dir, 'pretrain', '2025-01-01', record('npm run bench -- pretrain --batch 32', [fake('ours', 200)]), pretrainSuite.table!);
    const files = saveResults(dir, 'pretrain', '2025-01-01', record('npm run bench -- pretrain --batch 8', [fake('ours', 300)]), pretrainSuite.table!);
    const json = JSON.parse(readFileSync(files.json, 'utf8')) as { runs: RunRecord[] };
    t.deepEqual(json.runs.map((r) => r.command), ['npm run bench -- pretrain --batch 32', 'npm run bench -- pretrain --batch 8']);
    t.is(json.runs[1].results[0].ms_per_step_median, 300);
    const md = readFileSync(files.md, 'utf8');
    t.is(md, renderResultsMarkdown({ suite: 'pretrain', date: '2025-01-01', ...json }, pretrainSuite.table!));
    t.regex(md, /test cpu, 2 cores/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('npm run bench: the pretrain suite measures ours on a tiny model and prints the JSON line', async (t) => {
  const { stdout } = await run(
    process.execPath,
    [path.join(ROOT, 'dist', 'benches', 'run.js'), 'pretrain', '--preset', 'convmae-tiny', '--batch', '2', '--steps', '1', '--warmup', '0', '--rounds', '1', '--impl', 'ours', '--threads', '1', '--no-save', '--quiet'],
    { cwd: ROOT, timeout: 300_000 },
  );
  const lines = stdout.split('\n').filter((l) => l.startsWith('{'));
  t.is(lines.length, 1);
  const m = JSON.parse(lines[0]) as Record<string, unknown>;
  t.deepEqual(Object.keys(m), JSON_KEYS);
  t.like(m, { suite: 'pretrain', impl: 'ours', preset: 'convmae-tiny', batch: 2, dtype: 'f32', device: 'cpu', threads: 1 });
  t.true((m.images_per_s as number) > 0);
  t.true((m.peak_mem_mb as number) > 10);
  t.regex(stdout, /\| convmae-tiny \| 2 \| ours \| 1 \|/);
});

test('unknown suites and flags are refused with usage', async (t) => {
  const js = path.join(ROOT, 'dist', 'benches', 'run.js');
  const e1 = await t.throwsAsync(run(process.execPath, [js, 'nope'], { cwd: ROOT }));
  t.regex(String((e1 as { stderr?: string }).stderr), /unknown suite 'nope'/);
  const e2 = await t.throwsAsync(run(process.execPath, [js, 'pretrain', '--bogus', '1'], { cwd: ROOT }));
  t.regex(String((e2 as { stderr?: string }).stderr), /--bogus/);
});

test('--masking takes random or complementary, and names itself otherwise', (t) => {
  t.deepEqual(maskingFlag(parseArgs(['pretrain'])), { masking: 'random' });
  t.deepEqual(maskingFlag(parseArgs(['pretrain', '--masking', 'complementary'])), { masking: 'complementary', config: { complementary_masking: true } });
  t.throws(() => maskingFlag(parseArgs(['pretrain', '--masking', 'fast'])), { message: "--masking must be random or complementary, got 'fast'" });
});

(existsSync(FIXTURE) ? withTorch : test.skip)('the PyTorch baseline matches the official float64 golden fixture to 1e-9', async (t) => {
  const { stdout } = await run(torch.python, [path.join(ROOT, 'benches', 'baselines', 'check_golden.py'), '--fixture', FIXTURE], {
    cwd: ROOT,
    timeout: 300_000,
  });
  const r = JSON.parse(stdout.trim().split('\n').pop()!) as { ok: boolean; rel: Record<string, number>; failed: string[] };
  t.true(r.ok, JSON.stringify(r));
  t.is(r.rel.grads_checked, 117);
  for (const k of ['loss', 'pred', 'latent', 'grad_max']) t.true(r.rel[k] < 1e-9, `${k}: ${r.rel[k]}`);
});

const FINETUNE_FIXTURE = path.join(path.dirname(FIXTURE), 'finetune_small.safetensors');

(existsSync(FINETUNE_FIXTURE) ? withTorch : test.skip)('the PyTorch fine-tuning baseline matches the official float64 fine-tune fixture to 1e-9', async (t) => {
  const { stdout } = await run(torch.python, [path.join(ROOT, 'benches', 'baselines', 'check_golden_finetune.py'), '--fixture', FINETUNE_FIXTURE], { cwd: ROOT, timeout: 300_000 });
  const r = JSON.parse(stdout.trim().split('\n').pop()!) as { ok: boolean; rel: Record<string, number>; base_manifest_match: boolean | null };
  t.true(r.ok, JSON.stringify(r));
  t.is(r.rel.grads_checked, 85);
  for (const k of ['features', 'logits', 'loss', 'grad_max']) t.true(r.rel[k]! < 1e-9, `${k}: ${r.rel[k]}`);
  t.true(r.base_manifest_match, 'ConvViT-B has the official 207 fine-tune tensors');
});

withTorch('the finetune suite times ours and time_step.py --task finetune on a tiny model', async (t) => {
  const { stdout } = await run(
    process.execPath,
    [path.join(ROOT, 'dist', 'benches', 'run.js'), 'finetune', '--preset', 'convmae-tiny', '--batch', '2', '--steps', '1', '--warmup', '0', '--rounds', '1', '--threads', '1', '--no-save', '--quiet'],
    { cwd: ROOT, timeout: 300_000, env: { ...process.env, CONVMAE_TORCH_PYTHON: torch.python } },
  );
  const lines = stdout.trim().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
  t.deepEqual(lines.map((m) => [m.suite, m.impl, m.batch]), [['finetune', 'ours', 2], ['finetune', 'pytorch', 2]]);
  t.true(lines.every((m) => (m.images_per_s as number) > 0));
});

withTorch('time_step.py prints the pretrain JSON line for a tiny model', async (t) => {
  const { stdout } = await run(
    torch.python,
    [path.join(ROOT, 'benches', 'baselines', 'time_step.py'), '--preset', 'convmae-tiny', '--batch', '2', '--warmup', '0', '--steps', '1', '--threads', '1'],
    { cwd: ROOT, timeout: 300_000 },
  );
  const m = JSON.parse(stdout.trim().split('\n').pop()!) as Record<string, unknown>;
  t.like(m, { suite: 'pretrain', impl: 'pytorch', preset: 'convmae-tiny', batch: 2, dtype: 'f32', device: 'cpu', threads: 1 });
  t.true((m.images_per_s as number) > 0);
  t.is(m.params, 1167744);
});

withTorch('fastconvmae_fixture.py makes a fixture that ours passes on seeds other than the committed one', async (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'convmae-fastfx-'));
  try {
    const out = path.join(dir, 'fastconvmae.safetensors');
    await run(torch.python, [path.join(ROOT, 'benches', 'baselines', 'fastconvmae_fixture.py'), '--out', out, '--seed', '3', '--batch', '3'], { cwd: ROOT, timeout: 300_000 });
    for (const convPath of ['sparse', 'dense'] as const) {
      const r = await checkFixture(out, 'f64', convPath);
      t.true(r.pass && r.worst_rel < 1e-12, `${convPath}: worst ${r.worst} ${r.worst_rel}`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
