// FastConvMAE's complementary masking (`complementary_masking`, spec section 8.1) through the API
// and the CLI: its loss is the mean of the plain losses of its views, each view a plain mask; the
// flag lives in the config, travels in checkpoints and is checked on resume.
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { checkFixture, modelInfo, Pretrainer, resolveConfig } from '../src/index.js';
import { CLI, randomImages, readSafetensors, ROOT } from './helpers.js';

const run = promisify(execFile);

/** Noise whose plain mask is view `view` of the complementary mask drawn from `noise`: each
 * token's rank moved back by view * keep (modulo the tokens), as the official decoder's roll. */
function viewNoise(noise: Float64Array, images: number, tokens: number, keep: number, view: number): Float64Array {
  const out = new Float64Array(noise.length);
  for (let i = 0; i < images; i++) {
    const row = Array.from(noise.subarray(i * tokens, (i + 1) * tokens));
    const order = row.map((_, t) => t).sort((a, b) => row[a]! - row[b]!);
    order.forEach((t, rank) => (out[i * tokens + t] = (rank - view * keep + tokens) % tokens));
  }
  return out;
}

test('the complementary loss is the mean of its 4 views\' plain losses, through the API', async (t) => {
  const images = randomImages(3, 64, 7);
  const batch = { images, batchSize: 3, height: 64, width: 64 };
  const tokens = 16;
  const noise = Float64Array.from({ length: 3 * tokens }, (_, i) => Math.sin(i * 12.9898) * 43758.5453 % 1);
  const fast = Pretrainer.create({ preset: 'convmae-tiny', dtype: 'f64', seed: 5, config: { complementary_masking: true } });
  const plain = Pretrainer.create({ preset: 'convmae-tiny', dtype: 'f64', seed: 5 });
  try {
    t.true(fast.config.complementary_masking);
    t.false(plain.config.complementary_masking);
    const keep = 4;
    // lr 0: AdamW leaves the weights as they are, so every plain step sees the same model.
    const together = (await fast.pretrainStep(batch, { lr: 0, noise })).loss;
    let mean = 0;
    for (let v = 0; v < 4; v++) mean += (await plain.pretrainStep(batch, { lr: 0, noise: viewNoise(noise, 3, tokens, keep, v) })).loss / 4;
    t.true(Math.abs(together - mean) <= 1e-12 * Math.abs(mean), `${together} vs ${mean}`);
    // A view alone is not the whole: the test would notice a complementary step that ran one view.
    const first = (await plain.pretrainStep(batch, { lr: 0, noise })).loss;
    t.true(Math.abs(first - mean) > 1e-6 * Math.abs(mean));
    // Noise is per image, not per view.
    await t.throwsAsync(fast.pretrainStep(batch, { lr: 0, noise: new Float64Array(12 * tokens) }), { message: /noise: expected 3 x 16/ });
  } finally {
    fast.dispose();
    plain.dispose();
  }
});

// A fixture of FastConvMAE's own computation, made by our PyTorch rewrite of the official model
// (benches/baselines/fastconvmae_fixture.py; that model's ConvMAE path passes the official golden
// fixture): the shared dense stages with one depthwise conv per view, the rolled views and the
// shared unshuffle. Every output, activation and gradient agrees, on both of our paths.
const FASTCONVMAE_FIXTURE = path.join(ROOT, 'test', 'fixtures', 'fastconvmae_small.safetensors');

for (const convPath of ['sparse', 'dense'] as const) {
  test(`FastConvMAE's computation in float64 (PyTorch) agrees with ours, ${convPath} path`, async (t) => {
    const r = await checkFixture(FASTCONVMAE_FIXTURE, 'f64', convPath);
    t.true(r.pass, `worst ${r.worst} ${r.worst_rel}`);
    t.true(r.worst_rel < 1e-12, `worst ${r.worst} ${r.worst_rel}`);
    t.true(r.errors.filter((e) => e.name.startsWith('grad.')).length > 50);
  });
}

test('complementary masking needs len_keep to divide the tokens, and says so by name', (t) => {
  t.true(resolveConfig({ preset: 'convmae-base', config: { complementary_masking: true } }).complementary_masking);
  t.throws(() => resolveConfig({ preset: 'convmae-tiny', config: { complementary_masking: true, mask_ratio: 0.6 } }), {
    message: /complementary_masking with mask_ratio 0.6 on a 64-px image/,
  });
  // FastConvMAE at ConvMAE-B: 4 views, each a plain sparse step's work (the views split the
  // positions of stages 1-2); its official dense computation adds 3 depthwise convs per conv block.
  const plain = modelInfo({ preset: 'convmae-base' }).macs;
  const fast = modelInfo({ preset: 'convmae-base', config: { complementary_masking: true } }).macs;
  t.true(Math.abs(fast.pretrain_sparse - 4 * plain.pretrain_sparse) < 1e-9 * fast.pretrain_sparse);
  const depthwise = 2 * 56 * 56 * 25 * 256 + 2 * 28 * 28 * 25 * 384;
  t.true(Math.abs(fast.pretrain_dense - fast.pretrain_sparse - 3 * depthwise) < 1);
});

test('CLI: --complementary-masking trains, its checkpoint says so, and a resume without it is refused', async (t) => {
  const out = await mkdtemp(path.join(os.tmpdir(), 'convmae-fast-'));
  const args = [CLI, 'pretrain', '--steps', '3', '--batch-size', '4', '--reconstructions', '1', '--no-progress', '--out', out];
  await run(process.execPath, [...args, '--complementary-masking'], { maxBuffer: 1 << 24 });
  const ckpt = await readSafetensors(path.join(out, 'checkpoint.safetensors'));
  const meta = ckpt.header.__metadata__ as unknown as Record<string, string>;
  t.true(JSON.parse(meta.config!).complementary_masking);
  const log = (await readFile(path.join(out, 'log.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
  t.deepEqual(log.map((e) => e.step), [1, 2, 3]);
  t.true(log.every((e) => Number.isFinite(e.loss)));
  const err = await t.throwsAsync(run(process.execPath, [...args.map((a) => (a === '3' ? '4' : a)), '--resume']));
  t.regex(String((err as { stderr?: string }).stderr), /different configuration/);
});
