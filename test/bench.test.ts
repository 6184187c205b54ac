import test from 'ava';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { ROOT } from './helpers.js';

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
  const lines = stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
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
