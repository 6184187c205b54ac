// Fine-tuning and linear probing through the API, the task drivers and the CLI: official init
// from pretrained files, resume, evaluation, and a Rust panic surfacing as a JS Error.
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { BatchLoader, Classifier, evaluate, evaluateDataset, finetune, linprobe, openImageFolder, openMnist, pretrain } from '../src/index.js';
import { encodeIdx, tempDir, writeImage } from './fixtures/data/helpers.js';
import { CLI, golden, randomImages, readSafetensors, tensorBytes } from './helpers.js';

const run = promisify(execFile);

/** `n` MNIST images of a split as IDX files in `dir` (train-* or t10k-*), so eval defaults apply. */
async function mnistIdx(dir: string, split: 'train' | 't10k', n: number): Promise<string> {
  const ds = await openMnist(split);
  const px = new Uint8Array(n * 28 * 28);
  const labels = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const s = ds.source(i);
    if (s.kind !== 'raw') throw new Error('MNIST sources are raw');
    px.set(s.pixels.subarray(0, 28 * 28), i * 28 * 28);
    labels[i] = ds.label(i)!;
  }
  const images = path.join(dir, `${split}-images-idx3-ubyte`);
  await writeFile(images, encodeIdx([n, 28, 28], px));
  await writeFile(path.join(dir, `${split}-labels-idx1-ubyte`), encodeIdx([n], labels));
  return images;
}

async function smallMnist(): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-cls-'));
  await mnistIdx(dir, 't10k', 24);
  return mnistIdx(dir, 'train', 48);
}

const tiny = { preset: 'convmae-tiny', batchSize: 8, concurrency: 2 } as const;

test('a Rust panic on the worker rejects with an Error and the model keeps working', async (t) => {
  const model = Classifier.create({ preset: 'convmae-tiny', numClasses: 3 });
  await t.throwsAsync(model.debugPanic(), { message: /Rust panic.*panic requested/ });
  const images = randomImages(2, 64);
  const r = await model.train({ images, batchSize: 2, height: 64, width: 64 }, { lr: 1e-3, labels: Int32Array.from([0, 2]) });
  t.true(Number.isFinite(r.loss));
  t.is(r.step, 1);
  model.dispose();
});

test('initFrom loads the official .pth files like main_finetune.py: head and fc_norm missing', async (t) => {
  for (const file of ['pretrain_small_official.pth', 'pretrain_small_encoder_only.pth']) {
    const model = Classifier.create({ preset: 'convmae-golden-small', numClasses: 10 });
    const r = await model.initFrom(golden(file));
    t.deepEqual([...r.missing].sort(), ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight'], file);
    t.true(r.unexpected.includes('norm.weight'), file);
    t.true(r.unexpected.every((n) => /^(decoder|stage|mask_token|norm\.)/.test(n)), `${file}: ${r.unexpected}`);
    model.dispose();
  }
  const probe = Classifier.create({ preset: 'convmae-golden-small', numClasses: 10, kind: 'linear-probe', pool: 'token' });
  const r = await probe.initFrom(golden('pretrain_small_official.pth'));
  // Token pooling keeps the pretrained `norm`; the probe head is fresh.
  t.false(r.unexpected.includes('norm.weight'));
  t.deepEqual([...r.missing].sort(), ['head.0.running_mean', 'head.0.running_var', 'head.1.bias', 'head.1.weight']);
  probe.dispose();
});

test('features: the pooled vector is fc_norm of the stage-3 map\'s mean, maps are NCHW at strides 4, 8, 16', async (t) => {
  const model = Classifier.create({ preset: 'convmae-golden-small', numClasses: 10 });
  await model.initFrom(golden('pretrain_small_official.pth'));
  const batch = { images: randomImages(2, 224, 7), batchSize: 2, height: 224, width: 224 };
  const f = await model.features(batch, { maps: true });
  t.is(f.dim, 64);
  t.is(f.pooled.length, 2 * 64);
  t.deepEqual(f.maps.map((m) => [m.name, ...m.shape]), [['stage1', 2, 32, 56, 56], ['stage2', 2, 48, 28, 28], ['stage3', 2, 64, 14, 14]]);
  for (const m of f.maps) t.is(m.data.length, m.shape.reduce((a, b) => a * b, 1));
  // initFrom leaves fc_norm fresh (weight 1, bias 0): pooled = LayerNorm(mean of the stage-3 map over its grid), eps 1e-6.
  const stage3 = f.maps[2]!;
  const [, c, h, w] = stage3.shape;
  for (let b = 0; b < 2; b++) {
    const mean = Array.from({ length: c }, (_, ch) => {
      let sum = 0;
      for (let i = 0; i < h * w; i++) sum += stage3.data[(b * c + ch) * h * w + i]!;
      return sum / (h * w);
    });
    const mu = mean.reduce((a, v) => a + v, 0) / c;
    const variance = mean.reduce((a, v) => a + (v - mu) ** 2, 0) / c;
    const worst = Math.max(...mean.map((v, ch) => Math.abs((v - mu) / Math.sqrt(variance + 1e-6) - f.pooled[b * c + ch]!)));
    t.true(worst < 1e-4, `image ${b}: worst ${worst}`);
  }
  const pooledOnly = await model.features(batch);
  t.deepEqual(pooledOnly.maps, []);
  t.deepEqual(pooledOnly.pooled, f.pooled);
  await t.throwsAsync(model.features({ images: randomImages(1, 64), batchSize: 1, height: 64, width: 64 }), { message: /features: images are 64x64, the model's img_size is 224/ });
  model.dispose();
});

test('CLI features: one row per readable image, in a safetensors file; an unreadable image is skipped and counted', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  for (let i = 0; i < 5; i++) await writeImage(path.join(dir, `img${i}.jpg`), 40 + 3 * i, 36 + i, i);
  await writeFile(path.join(dir, 'fake.png'), 'this is not a png\n');
  const out = path.join(dir, 'features.safetensors');
  const pth = golden('pretrain_small_official.pth');
  const { stdout, stderr } = await run(process.execPath, [CLI, 'features', pth, '--preset', 'convmae-golden-small', '--data', dir, '--batch-size', '4', '--out', out, '--no-progress']);
  t.deepEqual(JSON.parse(stdout), { out, dataset: path.basename(dir), count: 5, dim: 64, skipped: 1 });
  t.regex(stderr, /skipped .*fake\.png/);

  const file = await readSafetensors(out);
  const shapes = Object.fromEntries(['features', 'indices', 'labels'].map((k) => [k, (file.header[k] as { shape: number[] }).shape]));
  t.deepEqual(shapes, { features: [5, 64], indices: [5], labels: [5] });
  t.is((file.header.__metadata__ as Record<string, string>).skipped, '1');
  const bytes = (name: string) => tensorBytes(file, name);
  const indices = Array.from(new BigInt64Array(bytes('indices').buffer.slice(bytes('indices').byteOffset, bytes('indices').byteOffset + bytes('indices').length)), Number);
  const labels = Array.from(new BigInt64Array(bytes('labels').buffer.slice(bytes('labels').byteOffset, bytes('labels').byteOffset + bytes('labels').length)), Number);
  const rows = new Float32Array(bytes('features').buffer.slice(bytes('features').byteOffset, bytes('features').byteOffset + bytes('features').length));
  const ds = await openImageFolder(dir);
  const fake = Array.from({ length: ds.length }, (_, i) => i).find((i) => ds.describe(i).endsWith('fake.png'))!;
  t.deepEqual([...indices].sort(), Array.from({ length: 6 }, (_, i) => i).filter((i) => i !== fake));
  t.deepEqual(labels, [-1, -1, -1, -1, -1]);

  // Each row is the API's pooled features of that image (eval transform, same checkpoint).
  const model = Classifier.create({ preset: 'convmae-golden-small', numClasses: 1 });
  await model.initFrom(pth);
  const loader = new BatchLoader({ dataset: ds, batchSize: 4, imageSize: 224, seed: 0, transform: 'eval', shuffle: false });
  const first = (await loader.next()).value!;
  const f = await model.features({ images: first.images, batchSize: 4, height: 224, width: 224 });
  loader.close();
  model.dispose();
  for (let i = 0; i < 4; i++) {
    const row = indices.indexOf(first.indices[i]!);
    const worst = Math.max(...Array.from({ length: 64 }, (_, c) => Math.abs(rows[row * 64 + c]! - f.pooled[i * 64 + c]!)));
    t.true(worst < 1e-5, `image ${first.indices[i]}: worst ${worst}`);
  }
  const e = await t.throwsAsync(run(process.execPath, [CLI, 'features', pth, '--preset', 'convmae-golden-small', '--pool', 'mean']));
  t.regex(String((e as { stderr?: string }).stderr), /--pool must be global or token, got 'mean'/);
});

test('evaluateDataset counts each readable image once when one is unreadable', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.teardown(cleanup);
  const clean = path.join(dir, 'clean');
  const broken = path.join(dir, 'broken');
  for (const root of [clean, broken]) {
    for (let i = 0; i < 5; i++) await writeImage(path.join(root, i % 2 ? 'b' : 'a', `img${i}.jpg`), 40 + i, 36, i);
  }
  // Sorts first in class 'a': its slot in the first batch is filled with a later image.
  await writeFile(path.join(broken, 'a', 'bad.jpg'), 'not a jpeg\n');
  const model = Classifier.create({ preset: 'convmae-tiny', numClasses: 2 });
  const withBad = await evaluateDataset(model, await openImageFolder(broken), 4);
  const without = await evaluateDataset(model, await openImageFolder(clean), 4);
  model.dispose();
  t.is(withBad.count, 5);
  t.is(withBad.acc1, without.acc1);
  t.true(Math.abs(withBad.loss - without.loss) < 1e-6, `${withBad.loss} vs ${without.loss}`);
});

test('bad classifier options name the option', (t) => {
  t.throws(() => Classifier.create({ preset: 'convmae-tiny', numClasses: 0 }), { message: /numClasses/ });
  t.throws(() => Classifier.create({ preset: 'convmae-tiny', numClasses: 2, kind: 'linear-probe', dropPath: 0.1 }), { message: /drop_path/ });
  t.throws(() => Classifier.create({ preset: 'convmae-tiny', numClasses: 2, optimizer: { kind: 'sgd' } as never }), { message: /optimizer/ });
});

test('finetune from a pretraining checkpoint: evaluates, checkpoints, resumes exactly, and eval reads the checkpoint', async (t) => {
  const data = await smallMnist();
  const pre = await mkdtemp(path.join(os.tmpdir(), 'convmae-pre-'));
  const p = await pretrain({ ...tiny, data, steps: 2, outDir: pre, reconstructions: 0 });
  const common = { ...tiny, data, init: p.checkpoint, steps: 6, warmupSteps: 2, blr: 1e-3 };

  const straightDir = await mkdtemp(path.join(os.tmpdir(), 'convmae-ft-'));
  const straight = await finetune({ ...common, outDir: straightDir });
  t.is(straight.steps, 6);
  t.deepEqual([...straight.init!.missing].sort(), ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']);
  const last = straight.evals.at(-1)!;
  t.is(last.step, 6);
  t.is(last.count, 24);
  t.true(last.acc1 >= 0 && last.acc1 <= last.acc5 && last.acc5 <= 100);

  const splitDir = await mkdtemp(path.join(os.tmpdir(), 'convmae-ft-'));
  const stop = new AbortController();
  const first = await finetune({ ...common, outDir: splitDir, signal: stop.signal, onProgress: (q) => q.step === 3 && stop.abort() });
  t.is(first.steps, 3);
  const second = await finetune({ ...common, outDir: splitDir, resume: true });
  t.is(second.steps, 6);
  const a = await readSafetensors(path.join(straightDir, 'checkpoint.safetensors'));
  const b = await readSafetensors(path.join(splitDir, 'checkpoint.safetensors'));
  for (const name of ['head.weight', 'blocks3.0.attn.qkv.weight', 'patch_embed1.proj.weight', 'optimizer.exp_avg.head.weight']) {
    t.true(tensorBytes(a, name).equals(tensorBytes(b, name)), `${name} differs after resume`);
  }
  t.is(second.evals.at(-1)!.acc1, last.acc1);

  const e = await evaluate({ checkpoint: path.join(straightDir, 'checkpoint.safetensors'), data: path.join(path.dirname(data), 't10k-images-idx3-ubyte') });
  t.is(e.acc1, last.acc1);
  t.is(e.count, 24);
  const log = (await readFile(path.join(straightDir, 'log.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
  t.is(log[0].event, 'init');
  t.true(log.some((l) => l.event === 'eval' && l.step === 6));
});

test('finetune with accumulation and bf16: windows of micro-batches, exact resume, a low-label subset, clear errors', async (t) => {
  const data = await smallMnist();
  // 2 labels per class (20 of the 48 images); 2 micro-batches of 4 images per update.
  const common = { ...tiny, data, batchSize: 4, accumSteps: 2, precision: 'bf16' as const, steps: 6, warmupSteps: 2, blr: 1e-3, labelsPerClass: 2, evalEvery: 2 };
  const straightDir = await mkdtemp(path.join(os.tmpdir(), 'convmae-acc-'));
  const straight = await finetune({ ...common, outDir: straightDir });
  t.is(straight.steps, 6);
  t.is(straight.trainImages, 20);
  t.true(straight.dataset.endsWith('(2 per class)'), straight.dataset);
  t.deepEqual(
    straight.evals.map((e) => e.step),
    [2, 4, 6],
  );
  const log = (await readFile(straight.log, 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
  const lrs = log.filter((l) => l.step !== undefined && l.event === undefined).map((l) => l.lr);
  t.is(lrs.length, 6);
  for (let i = 0; i < 6; i += 2) t.is(lrs[i], lrs[i + 1], 'the lr is set once per accumulation window');

  // A stop request mid-window takes effect at the window's end, so the resumed run is exact.
  const splitDir = await mkdtemp(path.join(os.tmpdir(), 'convmae-acc-'));
  const stop = new AbortController();
  const first = await finetune({ ...common, outDir: splitDir, signal: stop.signal, onProgress: (q) => q.step === 3 && stop.abort() });
  t.is(first.steps, 4);
  const second = await finetune({ ...common, outDir: splitDir, resume: true });
  t.is(second.steps, 6);
  const a = await readSafetensors(straight.checkpoint);
  const b = await readSafetensors(second.checkpoint);
  for (const name of ['head.weight', 'blocks3.0.attn.qkv.weight', 'optimizer.exp_avg.patch_embed1.proj.weight']) {
    t.true(tensorBytes(a, name).equals(tensorBytes(b, name)), `${name} differs after resume`);
  }
  t.is(a.header['head.weight'].dtype, 'F32', 'bf16 precision keeps f32 master weights');

  await t.throwsAsync(finetune({ ...common, outDir: splitDir, steps: 5 }), { message: /steps \(5\) must be a multiple of accumSteps \(2\)/ });
  const logBefore = await readFile(second.log, 'utf8');
  await t.throwsAsync(finetune({ ...common, outDir: splitDir, evalEvery: 3 }), { message: /evalEvery \(3\) must be a multiple of accumSteps \(2\)/ });
  t.is(await readFile(second.log, 'utf8'), logBefore, 'a rejected option leaves the run directory alone');
  await t.throwsAsync(finetune({ ...common, outDir: splitDir, resume: true, accumSteps: 1, steps: 8 }), { message: /batch 4 x accum 2, this run asks for 4 x 1/ });
  t.throws(() => Classifier.create({ preset: 'convmae-tiny', numClasses: 3, precision: 'bf16', dtype: 'f64' }), { message: /bf16' needs dtype f32/ });
  t.throws(() => Classifier.create({ preset: 'convmae-tiny', numClasses: 3, precision: 'half' as 'bf16' }), { message: /precision must be 'fp32' or 'bf16'/ });
});

test('linprobe trains only the head, with LARS, in both pooling modes', async (t) => {
  const data = await smallMnist();
  for (const pool of ['global', 'token'] as const) {
    const out = await mkdtemp(path.join(os.tmpdir(), 'convmae-lin-'));
    const r = await linprobe({ ...tiny, data, steps: 3, warmupSteps: 1, pool, outDir: out });
    t.is(r.steps, 3);
    t.is(r.kind, 'linear-probe');
    const f = await readSafetensors(r.checkpoint);
    t.truthy(f.header['head.0.running_mean']);
    t.truthy(f.header['head.0.num_batches_tracked']);
    t.truthy(f.header['optimizer.momentum_buffer.head.1.weight']);
    t.falsy(f.header['optimizer.momentum_buffer.blocks3.0.attn.qkv.weight'], 'the encoder is frozen');
    t.is(Boolean(f.header['norm.weight']), pool === 'token');
    t.is(Boolean(f.header['fc_norm.weight']), pool === 'global');
  }
});

test('CLI: finetune then eval print their results; mis-typed options are named', async (t) => {
  const data = await smallMnist();
  const out = await mkdtemp(path.join(os.tmpdir(), 'convmae-cli-'));
  const { stderr } = await run('node', [CLI, 'finetune', '--data', data, '--steps', '2', '--batch-size', '8', '--out', out, '--no-progress'], { timeout: 300_000 });
  t.regex(stderr, /no --init/);
  t.regex(stderr, /done: 2 steps .* acc@1 [\d.]+% acc@5 [\d.]+%/);
  const { stdout } = await run('node', [CLI, 'eval', path.join(out, 'checkpoint.safetensors'), '--data', path.join(path.dirname(data), 't10k-images-idx3-ubyte')]);
  const r = JSON.parse(stdout);
  t.is(r.count, 24);
  const bad = await run('node', [CLI, 'linprobe', '--data', data, '--pool', 'mean']).catch((e: { stderr: string; code: number }) => e);
  t.regex((bad as { stderr: string }).stderr, /--pool must be global or token/);
});
