// The GPU check's driver (benches/gpu/check.ts) on a machine without a GPU: with the CPU addon it
// must say that this is not the CUDA build and still write its report files (the PyTorch half
// would go on), and contradictory flags are refused before anything runs.
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { GOLDEN, ROOT } from './helpers.js';

const run = promisify(execFile);
const CHECK = path.join(ROOT, 'dist', 'benches', 'gpu', 'check.js');

test('with the CPU addon the check records that the CUDA build is missing and writes its report', async (t) => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'convmae-gpu-check-'));
  try {
    await run(process.execPath, [CHECK, '--kernels-only', '--out', out], { timeout: 60_000 });
    const files = readdirSync(out).sort();
    t.true(files.includes('check.json'), files.join(', '));
    const md = files.find((f) => /^gpu-\d{4}-\d{2}-\d{2}\.md$/.test(f));
    t.truthy(md, files.join(', '));
    const report = JSON.parse(readFileSync(path.join(out, 'check.json'), 'utf8')) as { load_error: string | null; parity: unknown[]; agreement: unknown[]; rows: unknown[] };
    t.regex(report.load_error ?? '', /not the CUDA build/);
    t.deepEqual([report.parity.length, report.agreement.length, report.rows.length], [0, 0, 0]);
    t.regex(readFileSync(path.join(out, md!), 'utf8'), /Our CUDA addon could not be used: this is not the CUDA build/);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test('--kernels-only with --throughput-only is refused, naming both flags', async (t) => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'convmae-gpu-check-'));
  try {
    const err = await t.throwsAsync(run(process.execPath, [CHECK, '--kernels-only', '--throughput-only', '--out', out], { timeout: 60_000 }));
    t.regex((err as Error & { stderr: string }).stderr, /--kernels-only and --throughput-only exclude each other/);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test('--profile-only with --kernels-only and a --deadline of 0 are refused, naming the flags', async (t) => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'convmae-gpu-check-'));
  try {
    for (const [args, message] of [
      [['--profile-only', '--kernels-only'], /--profile-only excludes --kernels-only and --throughput-only/],
      [['--deadline', '0'], /--deadline must be an integer >= 1, got '0'/],
    ] as const) {
      const err = await t.throwsAsync(run(process.execPath, [CHECK, ...args, '--out', out], { timeout: 60_000 }));
      t.regex((err as Error & { stderr: string }).stderr, message);
    }
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test('a --deadline the run cannot meet records what it skipped and still writes the report', async (t) => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'convmae-gpu-check-'));
  try {
    // One second: every child gets under the 15 s minimum, so each PyTorch row is recorded as skipped.
    await run(process.execPath, [CHECK, '--quick', '--no-op-timings', '--deadline', '1', '--out', out], { timeout: 60_000 });
    const report = JSON.parse(readFileSync(path.join(out, 'check.json'), 'utf8')) as { rows: { impl: string; error?: string }[] };
    t.true(report.rows.length > 0);
    for (const r of report.rows) t.regex(r.error ?? '', /skipped: --deadline 1 s reached/, r.impl);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test('timeKernels runs on the CPU and opTimingTable pairs the two paths of each op', async (t) => {
  const { native } = await import('../src/native.js');
  const { opTimingTable } = await import('../benches/gpu/op-timings.js');
  const rows = JSON.parse(await native.timeKernels('cpu', 1, 1, ['f32'])) as import('../benches/gpu/op-timings.js').OpTiming[];
  // 23 op cases x (kernels, composite)
  t.is(rows.length, 46);
  const attention = rows.filter((r) => r.op === 'self_attention:decoder');
  t.deepEqual(attention.map((r) => [r.path, r.kernel, r.dtype]), [['kernels', true, 'f32'], ['composite', false, 'f32']]);
  const table = opTimingTable(rows);
  const line = table.split('\n').find((l) => l.startsWith('| self_attention:decoder |'));
  t.truthy(line, table);
  const cells = line!.split('|').map((c) => c.trim());
  // op, dtype, shapes, 4 times, ratio
  t.is(cells[2], 'f32');
  t.is(cells[3], '[1, 196, 1536]');
  t.true(Number(cells[8]) > 0, line);
  // A "kernels" row that ran no kernel of ours gets no ratio.
  const bf16 = rows.map((r) => ({ ...r, dtype: 'bf16', kernel: false }));
  t.regex(opTimingTable(bf16), /no kernel of ours/);
  await t.throwsAsync(native.timeKernels('cpu', 1, 1, ['f16']), { message: /dtype must be 'f32' or 'bf16', got 'f16'/ });
});

test('autoChoices keeps the addon lines that report a measured choice, in order', async (t) => {
  const { autoChoices } = await import('../benches/gpu/op-timings.js');
  const stderr = [
    'some warning',
    'convmae: attention [64 x 196 tokens x 16 heads of 32] BF16 on Cuda { gpu_id: 0 }: fused kernels 2.100 ms, gemms 1.400 ms (forward + backward); using the gemms (CONVMAE_ATTENTION=auto)',
    "convmae: CONVMAE_KERNELS='x' is not 'kernels' or 'composite'; using our kernels",
    'convmae: attention [64 x 49 tokens x 12 heads of 64] BF16 on Cuda { gpu_id: 0 }: fused kernels 0.300 ms, composition 0.500 ms (forward + backward); using the fused kernels (CONVMAE_ATTENTION=auto)',
    'convmae: the pretraining backward runs on the tape of our ops',
    '',
  ].join('\n');
  const choices = autoChoices(stderr);
  t.is(choices.length, 3);
  t.regex(choices[0], /196 tokens.*using the gemms/);
  t.regex(choices[1], /49 tokens.*using the fused kernels/);
  t.regex(choices[2], /backward runs on the tape/);
  t.deepEqual(autoChoices('nothing here\n'), []);
});

test('hostProfile takes the medians of the last timed steps, and nothing from too few lines', async (t) => {
  const { hostProfile } = await import('../benches/gpu/op-timings.js');
  const line = (k: number) => `[profile] prepare ${k}.000 forward ${10 * k}.500 backward ${20 * k}.000 wait ${k / 10} optimizer 3.000 ms`;
  // Two warmup lines (100, 200: ignored), then three timed steps.
  const stderr = ['noise', line(100), line(200), line(1), 'convmae: attention ...', line(3), line(2), ''].join('\n');
  t.deepEqual(hostProfile(stderr, 3), { prepare: 2, forward: 20.5, backward: 40, wait: 0.2, optimizer: 3 });
  t.is(hostProfile([line(1), line(2)].join('\n'), 3), undefined);
  t.is(hostProfile('[profile] forward 1 backward 2 optimizer 3\n', 1), undefined, 'the old three-part line is not read as this one');
});

test('autoAttentionForm names the form only when every attention line picked it', async (t) => {
  const { autoAttentionForm } = await import('../benches/gpu/op-timings.js');
  const line = (tokens: number, pick: string) => `convmae: attention [64 x ${tokens} tokens x 12 heads of 64] BF16 on Cuda { gpu_id: 0 }: fused kernels 1.000 ms, gemms 0.500 ms (forward + backward); using the ${pick} (CONVMAE_ATTENTION=auto)`;
  t.is(autoAttentionForm([line(49, 'gemms'), line(196, 'gemms')]), 'gemm');
  t.is(autoAttentionForm([line(49, 'fused kernels')]), 'fused');
  t.is(autoAttentionForm([line(49, 'flash kernels'), line(196, 'flash kernels')]), 'flash');
  t.is(autoAttentionForm([line(49, 'gemms'), line(196, 'fused kernels')]), undefined);
  t.is(autoAttentionForm([line(49, 'flash kernels'), 'convmae: attention [64 x 196 tokens] garbled']), undefined);
  t.is(autoAttentionForm([]), undefined);
  // The mma.sync form's pick has a dot in its name (run 8 missed it, 2026-11-28).
  t.is(autoAttentionForm([line(49, 'flash kernels on mma.sync'), line(196, 'flash kernels on mma.sync')]), 'flash-mma');
  t.is(autoAttentionForm([line(49, 'flash kernels'), line(196, 'flash kernels on mma.sync')]), undefined);
});

test('attentionPicksEnv gives another process the same forms, shape by shape', async (t) => {
  const { attentionPicksEnv } = await import('../benches/gpu/op-timings.js');
  const line = (tokens: number, heads: number, hd: number, pick: string) => `convmae: attention [64 x ${tokens} tokens x ${heads} heads of ${hd}] BF16 on Cuda { gpu_id: 0 }: flash kernels 0.280 ms, flash kernels on mma.sync 0.287 ms (forward + backward); using the ${pick} (CONVMAE_ATTENTION=auto)`;
  t.is(attentionPicksEnv([line(49, 12, 64, 'flash kernels'), line(196, 16, 32, 'flash kernels on mma.sync'), 'convmae: the pretraining backward runs on the tape of our ops']), '64x49x12x64=flash,64x196x16x32=flash-mma');
  t.is(attentionPicksEnv([line(49, 12, 64, 'gemms')]), '64x49x12x64=gemm');
  t.is(attentionPicksEnv(['convmae: the pretraining backward runs on the tape of our ops']), undefined);
});

test('attentionPicks names each shape and its pick, the mma.sync form included', async (t) => {
  const { attentionPicks } = await import('../benches/gpu/op-timings.js');
  const line = (tokens: number, pick: string) => `convmae: attention [64 x ${tokens} tokens x 12 heads of 64] BF16 on Cuda { gpu_id: 0 }: flash kernels 0.280 ms, flash kernels on mma.sync 0.287 ms (forward + backward); using the ${pick} (CONVMAE_ATTENTION=auto)`;
  const mma = attentionPicks([line(49, 'flash kernels on mma.sync'), line(196, 'flash kernels on mma.sync')]);
  t.is(mma, '64 x 49 tokens x 12 heads of 64: flash kernels on mma.sync; 64 x 196 tokens x 12 heads of 64: flash kernels on mma.sync');
  t.not(attentionPicks([line(49, 'flash kernels'), line(196, 'flash kernels on mma.sync')]), mma);
  t.is(attentionPicks(['convmae: the pretraining backward runs on the tape of our ops']), '');
});

test('CONVMAE_NATIVE naming a missing file is an error that names it; a relative path is taken from the working directory', async (t) => {
  const load = (env: NodeJS.ProcessEnv, cwd: string) => {
    const childEnv = { ...process.env, ...env };
    delete childEnv.NAPI_RS_NATIVE_LIBRARY_PATH; // napi's own override would win over CONVMAE_NATIVE
    return run(process.execPath, ['--input-type=module', '-e', `import(${JSON.stringify(path.join(ROOT, 'dist', 'src', 'native.js'))}).then((m) => console.log(m.native.cudaBuild()))`], { env: childEnv, cwd });
  };
  const err = await t.throwsAsync(load({ CONVMAE_NATIVE: '/nonexistent/convmae.node' }, ROOT));
  t.regex((err as Error & { stderr: string }).stderr, /CONVMAE_NATIVE=\/nonexistent\/convmae\.node does not exist/);
  // The CPU module by a path relative to the working directory (the package root's parent here).
  const cpuModule = readdirSync(ROOT).find((f) => /^convmae\..*\.node$/.test(f) && !f.includes('cuda'));
  t.truthy(cpuModule);
  const { stdout } = await load({ CONVMAE_NATIVE: path.join(path.basename(ROOT), cpuModule!) }, path.dirname(ROOT));
  t.is(stdout.trim(), 'false');
});

test("loading the native module puts candle's idle CPU workers to sleep at once, unless the user set CANDLE_BARRIER_POOL_SPIN_LIMIT", async (t) => {
  const spinLimit = async (env: NodeJS.ProcessEnv) => {
    const childEnv = { ...process.env, ...env };
    if (env.CANDLE_BARRIER_POOL_SPIN_LIMIT === undefined) delete childEnv.CANDLE_BARRIER_POOL_SPIN_LIMIT;
    const script = `import(${JSON.stringify(path.join(ROOT, 'dist', 'src', 'native.js'))}).then(() => console.log(process.env.CANDLE_BARRIER_POOL_SPIN_LIMIT))`;
    return (await run(process.execPath, ['--input-type=module', '-e', script], { env: childEnv, cwd: ROOT })).stdout.trim();
  };
  t.is(await spinLimit({ CANDLE_BARRIER_POOL_SPIN_LIMIT: undefined }), '0');
  t.is(await spinLimit({ CANDLE_BARRIER_POOL_SPIN_LIMIT: '777' }), '777');
});

test('the overlapped-steps probe passes on the CPU, with steps overlapped and with CONVMAE_STEPS=serial', async (t) => {
  // The probe the GPU check runs on CUDA (probe-worker.js overlap), here on the CPU, where the
  // same control flow runs: queued steps against steps awaited one by one, losses and every
  // saved tensor to the bit. With CONVMAE_STEPS=serial (the check's fallback) every step is run
  // to its end before it is answered, and the answers are the same.
  const probe = path.join(ROOT, 'dist', 'benches', 'gpu', 'probe-worker.js');
  for (const steps of ['overlapped', 'serial']) {
    const { stdout } = await run(process.execPath, [probe, 'overlap', 'cpu'], { timeout: 120_000, env: { ...process.env, CONVMAE_STEPS: steps } });
    t.deepEqual(JSON.parse(stdout.trim()), { pass: true, worst: 'none', worst_rel: 0, tolerance: 0 }, steps);
  }
});

test('--rehearse runs the whole check on the CPU addon: every probe and row, the report', async (t) => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'convmae-gpu-check-'));
  try {
    await run(process.execPath, [CHECK, '--rehearse', '--quick', '--no-op-timings', '--deadline', '600', '--golden', GOLDEN, '--out', out], { timeout: 660_000 });
    const report = JSON.parse(readFileSync(path.join(out, 'check.json'), 'utf8')) as {
      load_error: string | null;
      agreement_error: string | null;
      parity: { fixture: string; pass: boolean }[];
      agreement: { op: string; pass?: boolean }[];
      rows: { impl: string; path?: string; dtype: string; batch: number; preset: string; device: string; error?: string; images_per_s: number; host_ms?: unknown; choices?: string[]; masking?: string }[];
    };
    t.is(report.load_error, null);
    t.is(report.agreement_error, null);
    t.true(report.agreement.length > 0);
    t.deepEqual(report.agreement.filter((a) => a.pass === false).map((a) => a.op), []);
    // The five golden fixtures, FastConvMAE's two, the overlapped-steps probe, the segmenter
    // and both detectors against the CPU and each of those three in bf16, all passing on the CPU.
    t.is(report.parity.length, 14);
    for (const task of ['segmenter', 'detector', 'detector (vitdet)']) t.true(report.parity.some((p) => p.fixture.startsWith(`${task} in bf16 on the GPU ~ f32 on the CPU`) && p.pass), `${task} bf16`);
    t.deepEqual(report.parity.filter((p) => p.fixture === 'fastconvmae_small.safetensors').map((p) => p.pass), [true, true]);
    for (const task of ['segmenter', 'detector', 'detector (vitdet)']) t.true(report.parity.some((p) => p.fixture.startsWith(`${task} on the GPU = on the CPU`) && p.pass), task);
    t.deepEqual(report.parity.filter((p) => !p.pass).map((p) => p.fixture), []);
    // The downstream tasks' rows (at 64 px, batch 2, with narrow heads), after the batch-16 rows.
    const taskRows = report.rows.filter((r) => /^ours-(segment|detect)-/.test(r.impl));
    t.deepEqual(taskRows.map((r) => [r.impl, r.batch, r.dtype, r.error]), [
      ['ours-segment-64px', 2, 'f32', undefined],
      ['ours-detect-64px', 2, 'f32', undefined],
      ['ours-segment-64px', 2, 'bf16', undefined],
      ['ours-detect-64px', 2, 'bf16', undefined],
    ]);
    t.true(taskRows.every((r) => r.images_per_s > 0));
    const ours = report.rows.filter((r) => r.impl.startsWith('ours') && !taskRows.includes(r));
    // The headline row first (no retry needed), then every A/B row and configuration, each a run of its own.
    t.deepEqual(ours.map((r) => r.impl), [
      'ours',
      'ours-candle-backward',
      'ours-copies-checked',
      'ours-in-flight-1',
      'ours-serial-steps',
      'ours-new-ops-composite',
      'ours-no-gemm-epilogue',
      'ours-no-vector-kernels',
      'ours-dense',
      'ours',
      'ours-dense',
      // --quick: the headline comparison at twice the batch and the rest of the matrix
      // there, then the A/B rows runs 1-7 measured.
      'ours',
      'ours-dense',
      'ours',
      'ours-dense',
      // FastConvMAE's complementary masking, then fine-tuning, at the first batch.
      'ours-complementary',
      'ours-finetune',
      'ours-composite',
      'ours-attention-composite',
      'ours-host-normalize',
      'ours-weight-casts',
      'ours-adamw-per-tensor',
    ]);
    const doubled = [11, 12, 13, 14];
    for (const [i, r] of ours.entries()) {
      t.is(r.error, undefined, `${r.impl} ${r.path} ${r.dtype}`);
      t.true(r.images_per_s > 0, r.impl);
      t.deepEqual([r.preset, r.device, r.batch], ['convmae-tiny', 'cpu', doubled.includes(i) ? 16 : 8]);
    }
    // At both batches: sparse and dense, fp32 and bf16 (the matrix), the comparison first.
    t.deepEqual(doubled.map((i) => `${ours[i]!.path} ${ours[i]!.dtype}`), ['sparse bf16', 'dense bf16', 'sparse f32', 'dense f32']);
    t.deepEqual(ours.slice(0, 11).filter((r) => ['ours', 'ours-dense'].includes(r.impl)).map((r) => `${r.path} ${r.dtype}`), ['sparse bf16', 'dense bf16', 'sparse f32', 'dense f32']);
    t.truthy(ours[0]!.host_ms, 'the headline row has its host-time parts');
    // And how its backward ran: by candle's on the CPU's unpacked path at batch 8, which the
    // tape does not cover.
    t.deepEqual(ours[0]!.choices?.filter((c) => c.includes('pretraining backward')), [
      "convmae: the pretraining backward runs by candle's (an op of candle's, or a composition, stands between the loss and the parameters: the tape does not cover the graph)",
    ]);
    // PyTorch's rows are attempted (without torch here they fail, recorded as such).
    t.deepEqual(report.rows.filter((r) => r.impl.startsWith('pytorch')).map((r) => r.impl), [
      'pytorch',
      'pytorch-compile',
      'pytorch',
      'pytorch',
      'pytorch-compile',
      'pytorch',
      'pytorch-complementary',
      'pytorch-finetune',
    ]);
    t.deepEqual(report.rows.filter((r) => r.impl.startsWith('pytorch')).map((r) => `${r.batch} ${r.dtype}`), ['8 bf16', '8 bf16', '8 f32', '16 bf16', '16 bf16', '16 f32', '8 bf16', '8 bf16']);
    t.deepEqual(report.rows.filter((r) => r.impl.endsWith('-complementary')).map((r) => r.masking), ['complementary', 'complementary']);
    const md = readdirSync(out).find((f) => /^gpu-\d{4}-\d{2}-\d{2}\.md$/.test(f));
    const report_md = readFileSync(path.join(out, md!), 'utf8');
    t.regex(report_md, /A rehearsal \(`--rehearse`\): the check's flow on the CPU addon with convmae-tiny at batch 8/);
    // The rows that only schedule or differentiate the same ops repeat the headline row's
    // losses to the bit (every step's, warmup included: 2 + 5).
    for (const impl of ['ours-in-flight-1', 'ours-serial-steps', 'ours-candle-backward', 'ours-copies-checked']) {
      t.true(report_md.includes(`- \`${impl}\`: the same 7 losses as \`ours\`, to the bit`), impl);
    }
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test("the check's list of switchable ops is the kernels crate's", (t) => {
  // check.ts switches each op of NEW_OPS off on its own should its agreement row fail, and all of
  // them in its A/B row and last retry: an op the crate adds to SWITCHABLE_OPS must be there too.
  const list = (file: string, pattern: RegExp) => {
    const m = pattern.exec(readFileSync(path.join(ROOT, file), 'utf8'));
    if (!m) throw new Error(`no list matching ${pattern} in ${file}`);
    return [...m[1]!.matchAll(/["']([a-z_]+)["']/g)].map((q) => q[1]);
  };
  const crate = list('crates/kernels/src/composite.rs', /pub const SWITCHABLE_OPS: \[&str; \d+\] = \[([^\]]*)\]/);
  const check = list('benches/gpu/check.ts', /const NEW_OPS = \[([^\]]*)\]/);
  t.true(crate.includes('sublayer_chain'), crate.join(', '));
  t.deepEqual(check, crate);
});
