// Fine-tuning and linear probing through the API, the task drivers and the CLI: official init
// from pretrained files, resume, evaluation, and a Rust panic surfacing as a JS Error.
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { Classifier, evaluate, finetune, linprobe, openMnist, pretrain } from '../src/index.js';
import { encodeIdx } from './fixtures/data/helpers.js';
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
