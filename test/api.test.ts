import test from 'ava';
import { execFile } from 'node:child_process';
import { copyFile, mkdtemp, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { checkFixture, checkpointConfig, modelInfo, Pretrainer, resolveConfig, Classifier, Detector, Segmenter } from '../src/index.js';
import { native } from '../src/native.js';
import { CLI, golden, randomImages, readSafetensors, ROOT, tensorBytes } from './helpers.js';

const run = promisify(execFile);

test('float64 parity with the official pretraining model (golden fixture)', async (t) => {
  const r = await checkFixture(golden('pretrain_small.safetensors'), 'f64');
  t.is(r.kind, 'pretrain');
  t.is(r.path, 'sparse');
  t.true(r.errors.every((e) => e.max_rel < 1e-9), 'sparse issue: 1e-9 relative');
  t.true(r.pass, `worst ${r.worst} ${r.worst_rel}`);
  t.true(r.worst_rel < 1e-8);
  // loss, pred, latent and every gradient are compared
  const names = new Set(r.errors.map((e) => e.name));
  for (const n of ['output.loss', 'output.pred', 'output.latent', 'grad.blocks1.0.attn.weight', 'grad.decoder_pred.bias']) t.true(names.has(n), n);
  t.is(r.errors.filter((e) => e.name.startsWith('grad.')).length, 117);
});

test('the dense masked path (the official computation) matches the golden fixture too', async (t) => {
  const r = await checkFixture(golden('pretrain_small.safetensors'), 'f64', 'dense');
  t.is(r.path, 'dense');
  t.true(r.pass, `worst ${r.worst} ${r.worst_rel}`);
  t.true(r.errors.every((e) => e.max_rel < 1e-9), 'sparse issue: 1e-9 relative');
});

test('CONVMAE_COMPOSITE_OPS: with the conv block\'s first half, the loss, the patch layout and the decoder entry as candle\'s ops, parity still holds; an unknown name is warned about', async (t) => {
  const script = `import(${JSON.stringify(path.join(ROOT, 'dist', 'src', 'index.js'))}).then(async (m) => {
    const out = [];
    for (const p of ['sparse', 'dense']) out.push((await m.checkFixture(${JSON.stringify(golden('pretrain_small.safetensors'))}, 'f64', p)).pass);
    console.log(JSON.stringify(out));
  })`;
  const { stdout, stderr } = await run(process.execPath, ['--input-type=module', '-e', script], {
    timeout: 120_000,
    env: { ...process.env, CONVMAE_COMPOSITE_OPS: 'conv_residual,masked_patch_mse, patch_blocks,restore_tokens,bogus_op' },
  });
  t.deepEqual(JSON.parse(stdout.trim()), [true, true]);
  t.regex(stderr, /CONVMAE_COMPOSITE_OPS names 'bogus_op', which is not one of/);
});

test('float32 parity with the official pretraining model within 1e-4', async (t) => {
  const r = await checkFixture(golden('pretrain_small.safetensors'), 'f32');
  t.true(r.pass, `worst ${r.worst} ${r.worst_rel}`);
});

test('float64 parity with the official fine-tune model (golden fixture)', async (t) => {
  const r = await checkFixture(golden('finetune_small.safetensors'), 'f64');
  t.is(r.kind, 'finetune');
  t.true(r.pass, `worst ${r.worst} ${r.worst_rel}`);
});

test('check-fixture prints one JSON line and exits 0 on the golden fixture', async (t) => {
  const { stdout } = await run(process.execPath, [CLI, 'check-fixture', golden('pretrain_small.safetensors'), '--path', 'dense']);
  const lines = stdout.trim().split('\n');
  t.is(lines.length, 1);
  const r = JSON.parse(lines[0]!);
  t.true(r.pass);
  t.is(r.path, 'dense');
  t.true(r.errors['output.loss'].rel < 1e-8);
});

test('check-fixture exits 1 when the reference disagrees with the model', async (t) => {
  // A copy of the fixture whose recorded loss is off by 1%.
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-fx-'));
  const file = path.join(dir, 'tampered.safetensors');
  await copyFile(golden('pretrain_small.safetensors'), file);
  const f = await readSafetensors(file);
  const loss = tensorBytes(f, 'output.loss');
  loss.writeDoubleLE(loss.readDoubleLE(0) * 1.01, 0);
  await writeFile(file, f.bytes);
  const err = await t.throwsAsync(run(process.execPath, [CLI, 'check-fixture', file]));
  t.is((err as unknown as { code: number }).code, 1);
  const r = JSON.parse((err as unknown as { stdout: string }).stdout.trim());
  t.false(r.pass);
  t.is(r.worst, 'output.loss');
});

test('convmae-base info equals the official counts', (t) => {
  const info = modelInfo({ preset: 'convmae-base' });
  t.is(info.count, 313);
  t.is(info.elements, 115_041_408);
  t.is(info.encoderElements, 84_605_824);
  t.is(Math.round(info.macs.pretrain_dense / 1e7) / 100, 17.22);
  t.is(Math.round(info.macs.pretrain_sparse / 1e7) / 100, 11.2);
});

test('invalid config is an error that names the field, before any compute', (t) => {
  t.throws(() => Pretrainer.create({ preset: 'convmae-tiny', config: { img_size: 100 } }), { message: /img_size/ });
  t.throws(() => Pretrainer.create({ preset: 'convmae-tiny', config: { num_heads: 3 } }), { message: /num_heads/ });
  t.throws(() => Pretrainer.create({ preset: 'convmae-nope' }), { message: /unknown preset 'convmae-nope'/ });
  t.throws(() => resolveConfig({ config: { embed_dim: 'wide' as unknown as [number, number, number] } }), { message: /invalid config: 'embed_dim': invalid type/ });
  t.throws(() => Pretrainer.create({ preset: 'convmae-tiny', dtype: 'f16' as 'f32' }), { message: /dtype/ });
});

test('the event loop keeps running while a step computes', async (t) => {
  const p = Pretrainer.create({ preset: 'convmae-tiny', seed: 3 });
  try {
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    const started = Date.now();
    const r = await p.pretrainStep({ images: randomImages(32, 64), batchSize: 32, height: 64, width: 64 }, { lr: 1e-4 });
    const elapsed = Date.now() - started;
    clearInterval(timer);
    t.true(Number.isFinite(r.loss));
    t.true(elapsed > 20, `the step took ${elapsed} ms, too short to tell`);
    t.true(ticks >= 5, `only ${ticks} timer ticks during a ${elapsed} ms step`);
  } finally {
    p.dispose();
  }
});

test('steps started before the last is awaited answer in order, as steps taken one at a time do', async (t) => {
  // Overlapped steps: the worker launches step k + 1 before settling step k (on a GPU the host
  // then builds k + 1 while the device runs k). Same losses, same counters, same weights.
  const batches = [0, 1, 2, 3].map((k) => randomImages(4, 64, k + 1));
  const one = Pretrainer.create({ preset: 'convmae-tiny', seed: 9 });
  const two = Pretrainer.create({ preset: 'convmae-tiny', seed: 9 });
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-overlap-'));
  try {
    const step = (p: Pretrainer, k: number) => p.pretrainStep({ images: batches[k]!, batchSize: 4, height: 64, width: 64 }, { lr: 1e-3, accumSteps: 2 });
    const sequential = [];
    for (let k = 0; k < batches.length; k++) sequential.push(await step(one, k));
    // All four queued at once; the images buffers are not needed after each call returns.
    const overlapped = await Promise.all(batches.map((_, k) => step(two, k)));
    t.deepEqual(overlapped, sequential);
    await one.save(path.join(dir, 'one.safetensors'));
    await two.save(path.join(dir, 'two.safetensors'));
    const [a, b] = [await readSafetensors(path.join(dir, 'one.safetensors')), await readSafetensors(path.join(dir, 'two.safetensors'))];
    t.deepEqual(a.header, b.header, 'the same tensors, shapes, offsets and metadata (optimizer step included)');
    const names = Object.keys(a.header).filter((k) => k !== '__metadata__');
    t.true(names.length > 100);
    for (const name of names) t.true(tensorBytes(a, name).equals(tensorBytes(b, name)), `${name}: the same bits`);
  } finally {
    one.dispose();
    two.dispose();
  }
});

test('threads: steps on 1, 2 and auto threads give the same bits; auto tries the counts then keeps one; bad values are named', async (t) => {
  // Auto's plan on this machine: 3 warmup steps on all of rayon's threads, then 2 rounds of 3
  // steps on each of all, all / 2, ..., 1; then 3 steps more.
  const probe = Pretrainer.create({ preset: 'convmae-tiny', seed: 3 });
  await probe.pretrainStep({ images: randomImages(4, 64), batchSize: 4, height: 64, width: 64 }, { lr: 1e-3 });
  const all = probe.threads;
  probe.dispose();
  const countsTried = Math.floor(Math.log2(all)) + 1;
  const batches = Array.from({ length: 3 + (countsTried > 1 ? 6 * countsTried : 0) + 3 }, (_, k) => randomImages(4, 64, k + 1));
  const models = [1, 2, 'auto' as const].map((threads) => Pretrainer.create({ preset: 'convmae-tiny', seed: 3, threads }));
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-threads-'));
  try {
    const counts: number[] = [];
    const losses = [];
    for (const model of models) {
      const run = [];
      for (const images of batches) {
        run.push((await model.pretrainStep({ images, batchSize: 4, height: 64, width: 64 }, { lr: 1e-3 })).loss);
        if (model === models[2]) counts.push(model.threads);
      }
      losses.push(run);
    }
    t.is(models[0]!.threads, 1);
    t.is(models[1]!.threads, 2);
    t.deepEqual(losses[1], losses[0]);
    t.deepEqual(losses[2], losses[0]);
    t.is(counts[0], all);
    if (all > 1) t.true(counts.includes(1) && counts.includes(Math.floor(all / 2)), `${counts}`);
    t.is(new Set(counts.slice(-3)).size, 1, `the last 3 steps come after the choice: ${counts}`);
    await models[0]!.save(path.join(dir, 'one.safetensors'));
    await models[2]!.save(path.join(dir, 'auto.safetensors'));
    const [a, b] = [await readSafetensors(path.join(dir, 'one.safetensors')), await readSafetensors(path.join(dir, 'auto.safetensors'))];
    for (const name of Object.keys(a.header).filter((k) => k !== '__metadata__')) t.true(tensorBytes(a, name).equals(tensorBytes(b, name)), `${name}: the same bits`);
  } finally {
    for (const m of models) m.dispose();
  }
  for (const threads of [0, -1, 1.5, 2000]) {
    t.throws(() => Pretrainer.create({ preset: 'convmae-tiny', threads }), { message: /threads must be 'auto' or an integer from 1 to 1024/ });
    t.throws(() => Classifier.create({ preset: 'convmae-tiny', numClasses: 2, threads }), { message: /threads must be 'auto' or an integer/ });
  }
});

test('a step queued behind one whose loss is not finite is rejected, not applied', async (t) => {
  const p = Pretrainer.create({ preset: 'convmae-tiny', seed: 4 });
  try {
    const batch = { images: randomImages(2, 64), batchSize: 2, height: 64, width: 64 };
    // An lr of 1e30 throws the weights far enough that the next loss is not finite.
    t.true(Number.isFinite((await p.pretrainStep(batch, { lr: 1e30 })).loss));
    const bad = p.pretrainStep(batch, { lr: 1e-4 });
    const behind = p.pretrainStep(batch, { lr: 1e-4 });
    await t.throwsAsync(bad, { message: /^loss is (NaN|inf|-inf) at micro step 1; weights were not updated/ });
    await t.throwsAsync(behind, { message: /micro step 2 was not applied: the one before it failed/ });
  } finally {
    p.dispose();
  }
});

test('wrong image sizes and a disposed model are clear errors', async (t) => {
  const p = Pretrainer.create({ preset: 'convmae-tiny' });
  await t.throwsAsync(p.pretrainStep({ images: randomImages(2, 32), batchSize: 2, height: 32, width: 32 }, { lr: 1e-4 }), {
    message: /32x32, the model's img_size is 64/,
  });
  await t.throwsAsync(p.pretrainStep({ images: new Uint8Array(10), batchSize: 2, height: 64, width: 64 }, { lr: 1e-4 }), {
    message: /holds 10 bytes/,
  });
  p.dispose();
  await t.throwsAsync(p.pretrainStep({ images: randomImages(2, 64), batchSize: 2, height: 64, width: 64 }, { lr: 1e-4 }), { message: /disposed/ });
});

test('official checkpoints load: full, and encoder-only with the decoder listed missing', async (t) => {
  const p = Pretrainer.create({ preset: 'convmae-golden-small' });
  try {
    const full = await p.load(golden('pretrain_small_official.pth'));
    t.is(full.format, 'pth');
    t.is(full.missing.length, 0);
    t.is(full.loaded.length, 119);
    await t.throwsAsync(p.load(golden('pretrain_small_encoder_only.pth')), { message: /lacks .* tensor\(s\).*strict: false/ });
    const enc = await p.load(golden('pretrain_small_encoder_only.pth'), { strict: false });
    t.true(enc.missing.includes('mask_token'));
    t.true(enc.missing.includes('stage1_output_decode.weight'));
    t.true(enc.missing.every((n) => /^(mask_token|decoder|stage[12]_output_decode)/.test(n)));
    t.deepEqual(enc.unexpected, []);
  } finally {
    p.dispose();
  }
});

test('initFrom: the released encoder-only file seeds the encoder; the decoder, mask token, fusion convs and sin-cos tables stay fresh; no optimizer state', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-init-'));
  const encoderOnly = golden('pretrain_small_encoder_only.pth');
  const fresh = Pretrainer.create({ preset: 'convmae-golden-small', seed: 3 });
  const seeded = Pretrainer.create({ preset: 'convmae-golden-small', seed: 3 });
  const loaded = Pretrainer.create({ preset: 'convmae-golden-small', seed: 3 });
  try {
    const report = await seeded.initFrom(encoderOnly);
    t.is(report.format, 'pth');
    t.false(report.optimizerRestored);
    t.deepEqual(report.reinitialized, ['pos_embed'], 'the encoder-only file has no decoder_pos_embed');
    t.deepEqual(report.unexpected, []);
    t.true(report.missing.includes('mask_token') && report.missing.includes('stage1_output_decode.weight'));
    t.true(report.missing.every((n) => /^(mask_token|decoder|stage[12]_output_decode)/.test(n)), report.missing.join(', '));
    await loaded.load(encoderOnly, { strict: false });
    const files = { fresh: path.join(dir, 'fresh.safetensors'), seeded: path.join(dir, 'seeded.safetensors'), loaded: path.join(dir, 'loaded.safetensors') };
    await Promise.all([fresh.save(files.fresh), seeded.save(files.seeded), loaded.save(files.loaded)]);
    const [a, b, c] = await Promise.all([readSafetensors(files.fresh), readSafetensors(files.seeded), readSafetensors(files.loaded)]);
    const weights = Object.keys(b.header).filter((k) => k !== '__metadata__' && !k.startsWith('optimizer.'));
    t.true(weights.length > 100);
    const fixedTables = ['pos_embed', 'decoder_pos_embed'];
    for (const name of weights) {
      const keptFresh = report.missing.includes(name) || fixedTables.includes(name);
      // What stayed fresh is the fresh model's; the rest is what load(strict: false) takes from the file.
      t.true(tensorBytes(b, name).equals(tensorBytes(keptFresh ? a : c, name)), `${name} should equal the ${keptFresh ? 'fresh' : 'loaded'} model's`);
      if (!keptFresh) t.false(tensorBytes(b, name).equals(tensorBytes(a, name)), `${name} still holds its fresh init`);
    }
    t.is((b.header.__metadata__ as Record<string, string>).optimizer_step, '0');
  } finally {
    for (const p of [fresh, seeded, loaded]) p.dispose();
  }
});

test('initFrom a classifier checkpoint: its encoder loads, its head is unexpected, its learned pos_embed is not taken', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-init-'));
  const classifier = Classifier.create({ preset: 'convmae-tiny', numClasses: 3 });
  const p = Pretrainer.create({ preset: 'convmae-tiny' });
  try {
    const file = path.join(dir, 'classifier.safetensors');
    await classifier.save(file);
    const report = await p.initFrom(file);
    t.true(report.loaded.length > 50);
    t.true(report.loaded.some((n) => n.startsWith('blocks3.')));
    t.deepEqual(report.reinitialized, ['pos_embed']);
    t.true(report.unexpected.includes('head.weight'), report.unexpected.join(', '));
    t.true(report.missing.includes('mask_token') && report.missing.includes('decoder_pos_embed'));
  } finally {
    classifier.dispose();
    p.dispose();
  }
});

test('initFrom refuses an encoder of another shape and a file with none of the model\'s tensors, naming the file', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-init-'));
  const other = Pretrainer.create({ preset: 'convmae-golden-small', config: { embed_dim: [16, 48, 64] } });
  const p = Pretrainer.create({ preset: 'convmae-golden-small' });
  try {
    const otherFile = path.join(dir, 'other.safetensors');
    await other.save(otherFile);
    await t.throwsAsync(p.initFrom(otherFile), { message: /other\.safetensors' holds an encoder of another shape/ });
    const unrelated = path.join(dir, 'unrelated.safetensors');
    const header = Buffer.from(JSON.stringify({ 'head.weight': { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }));
    const size = Buffer.alloc(8);
    size.writeBigUInt64LE(BigInt(header.length));
    await writeFile(unrelated, Buffer.concat([size, header, Buffer.alloc(4)]));
    await t.throwsAsync(p.initFrom(unrelated), { message: /unrelated\.safetensors' holds none of the pretraining model's tensors/ });
  } finally {
    other.dispose();
    p.dispose();
  }
});

test('a checkpoint with mis-shaped tensors is an error naming the tensor and both shapes', async (t) => {
  const p = Pretrainer.create({ preset: 'convmae-golden-small', config: { embed_dim: [16, 48, 64] } });
  try {
    await t.throwsAsync(p.load(golden('pretrain_small_official.pth'), { strict: false }), {
      message: /'patch_embed1.proj.weight' has shape \[32, 3, 4, 4\], the model expects \[16, 3, 4, 4\]/,
    });
    await t.throwsAsync(p.load('/nonexistent/ckpt.safetensors'), { message: /cannot read checkpoint '\/nonexistent\/ckpt.safetensors'/ });
  } finally {
    p.dispose();
  }
});

test('device: a CUDA request on the CPU build says how to get the CUDA addon; bad names are named', (t) => {
  if (native.cudaBuild()) {
    t.pass('this is the CUDA build');
  } else {
    t.throws(() => Pretrainer.create({ preset: 'convmae-tiny', device: 'cuda' }), { message: /no CUDA backend.*npm run build:cuda/ });
    t.throws(() => Classifier.create({ preset: 'convmae-tiny', numClasses: 2, device: 'cuda:1' }), { message: /no CUDA backend/ });
    t.throws(() => Segmenter.create({ preset: 'convmae-tiny', numClasses: 2, device: 'cuda' }), { message: /device 'cuda': this build of convmae has no CUDA backend/ });
    t.throws(() => Detector.create({ preset: 'convmae-tiny', numClasses: 2, window: 4, globalBlocks: [0], device: 'cuda:0' }), { message: /device 'cuda:0': this build of convmae has no CUDA backend/ });
  }
  t.throws(() => Pretrainer.create({ preset: 'convmae-tiny', device: 'gpu' as never }), { message: /device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'/ });
  t.throws(() => Segmenter.create({ preset: 'convmae-tiny', numClasses: 2, device: 'gpu' as never }), { message: /device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'/ });
  t.throws(() => Detector.create({ preset: 'convmae-tiny', numClasses: 2, window: 4, globalBlocks: [0], device: 'cuda:x' as never }), { message: /device must be 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'/ });
});

test('a checkpoint gives its model: ours from its metadata, an official .pth from its shapes (heads guessed), on the CLI too', async (t) => {
  const official = await checkpointConfig(golden('pretrain_small_official.pth'));
  t.is(official?.source, 'shapes');
  t.like(official?.config, { img_size: 224, patch_size: [4, 2, 2], embed_dim: [32, 48, 64], depth: [2, 1, 2], decoder_embed_dim: 32, decoder_depth: 2, num_heads: 1 });
  // A golden fixture's own `config` metadata is not ours: its `param.*` shapes speak.
  t.like(await checkpointConfig(golden('finetune_small.safetensors')), { source: 'shapes', config: { embed_dim: [32, 48, 64], depth: [2, 1, 2] } });
  const dir = await mkdtemp(path.join(os.tmpdir(), 'convmae-ckpt-config-'));
  const ours = path.join(dir, 'tiny.safetensors');
  const p = Pretrainer.create({ preset: 'convmae-tiny', config: { num_heads: 2 } });
  try {
    await p.save(ours);
  } finally {
    p.dispose();
  }
  t.deepEqual(await checkpointConfig(ours), { config: resolveConfig({ preset: 'convmae-tiny', config: { num_heads: 2 } }), source: 'metadata' });
  const junk = path.join(dir, 'junk.safetensors');
  await writeFile(junk, 'not a checkpoint');
  await t.throwsAsync(() => checkpointConfig(junk), { message: /junk.safetensors/ });
  const { stdout, stderr } = await run(process.execPath, [CLI, 'info', '--checkpoint', golden('pretrain_small_official.pth'), '--config', '{"num_heads":4}']);
  t.regex(stderr, /num_heads \(1\) is a guess of one head per 64 channels, as is a pretraining file's decoder_num_heads/);
  t.regex(stdout, /"embed_dim":\[32,48,64\].*"num_heads":4/);
  const e = await t.throwsAsync(run(process.execPath, [CLI, 'info', '--checkpoint', golden('pretrain_small_official.pth'), '--preset', 'convmae-tiny']));
  t.regex((e as unknown as { stderr: string }).stderr, /--checkpoint gives the model/);
});
