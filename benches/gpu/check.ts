/**
 * The one-shot GPU check (issue: CUDA backend), run on the GPU machine by benches/gpu/run.sh:
 *
 *   node dist/benches/gpu/check.js --out $OUT --golden benches/gpu/payload/golden [--quick] [--kernels-only | --throughput-only] [--profile] [--no-op-timings] [--rehearse]
 *
 * (a) parity of the CUDA build with the golden fixtures (f32 and f64, sparse and dense) and the
 *     agreement of every op on CUDA with the CPU kernels, by our CUDA kernels and by candle's
 *     ops, in f32 and bf16; then each op's forward and forward + backward time by both, at the
 *     shapes of a convmae-base step of 64 images (op-timings.ts);
 * (b) pretraining throughput of convmae-base at batch 64 and 128 (--quick: every row at 64, then
 *     the comparison of ours sparse bf16 with eager and torch.compile at 128, then the A/B rows
 *     of changes runs 1-7 measured): ours sparse / dense x fp32 /
 *     bf16, each in a process of its own (so the memory peak is its own), one sparse bf16 run
 *     checking after every step that the bf16 compute copies are the masters rounded
 *     (CONVMAE_CHECK_COPIES=on), plus one sparse bf16
 *     run at the first batch with CONVMAE_KERNELS=composite (candle's ops instead of our CUDA
 *     kernels: the A/B) and one with CONVMAE_ATTENTION=composite (our kernels but attention: the
 *     attention kernels' A/B). The default runs leave attention to CONVMAE_ATTENTION=auto, whose
 *     per-shape timings and picks (stderr) are kept with each row. Our rows keep two steps
 *     queued (overlapped steps, as the pretraining driver runs them); `ours-in-flight-1`, right
 *     after the batch-64 comparison, awaits each step before the next, and `ours-serial-steps`
 *     also finishes each on the device before answering it (CONVMAE_STEPS=serial): their A/B;
 *     `ours-new-ops-composite` runs the ops written after run 7 as candle's ops (their A/B), `ours-candle-backward`
 *     the step's backward by candle instead of on the tape (its A/B),
 *     `ours-no-gemm-epilogue` every linear layer's bias by our row kernels instead of
 *     cuBLASLt's epilogues (CONVMAE_GEMM_EPILOGUE=off: their A/B), and `ours-no-vector-kernels`
 *     every kernel in its one-element form (CONVMAE_VECTOR_KERNELS=off: the vector forms' A/B);
 * (c) the PyTorch baseline on the same GPU: eager fp32, eager with autocast bf16, torch.compile
 *     with bf16 (benches/baselines/time_step.py);
 * (d) peak GPU memory of each (ours: the CUDA memory pool's high-water mark; PyTorch:
 *     max_memory_allocated).
 * --throughput-only skips (a): for a second call after a --kernels-only one, when device time is
 * short (the device tool lends 15 minutes a session, start-up included). --profile-only runs (e)
 * alone. --deadline S: the whole check ends within S seconds (what no longer fits is recorded as
 * skipped), so that it ends inside a device call's time limit with its files written.
 * --no-op-timings leaves the op timings out of (a) (17 s of an H100 in run 4).
 * --rehearse runs all of it on the CPU addon with convmae-tiny at batch 8 (test/gpu-check.test.ts):
 * the check's own flow where there is no GPU; its numbers measure nothing.
 * (e) with --profile, right after the batch-64 comparison of ours sparse bf16, eager and compile
 *     (after (a) alone with --kernels-only): the per-kernel profile of one sparse bf16 step at batch 64, ours under Nsight Compute and PyTorch eager bf16 under
 *     torch.profiler (benches/gpu/profile.ts says how), written to profile.json, ncu-raw.csv.gz
 *     (ncu's table, one row per launch) and a "Per-kernel profile" section of the markdown.
 *     --ncu PATH picks the ncu binary (else CONVMAE_NCU, PATH, the CUDA toolkit, Nsight Compute's
 *     installs); --profile-timeout S caps the ncu run (default 150).
 * Writes gpu-<date>.jsonl (one harness-format line per measurement), gpu-<date>.md and
 * check.json under --out. Each child has a time limit so the whole run stays within its budget;
 * what times out is recorded as such.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { fmt, intFlag, localDate, markdownTable, parseArgs, REPO_ROOT } from '../lib.js';
import { attentionPicks, attentionPicksEnv, autoAttentionForm, autoChoices, hostProfile, opTimingTable, type HostProfile, type OpTiming } from './op-timings.js';
import { findNcu, ncuArgs, PROFILED_STEP_ENV, profileMarkdown, runUnderNcu, shellQuote, summarizeKernels, type KernelEntry, type NcuRunResult, type ProfileReport, type TorchProfileResult } from './profile.js';

interface Row {
  suite: string;
  impl: string;
  preset: string;
  batch: number;
  dtype: string;
  device: string;
  images_per_s: number;
  peak_mem_mb: number;
  ms_per_step_median: number;
  path?: string;
  error?: string;
  /** What the run chose by itself: the addon's `CONVMAE_ATTENTION=auto` lines (both timings and the pick). */
  choices?: string[];
  /** Ours, the issue's row: the host time of a step by part, medians (CONVMAE_PROFILE=1). */
  host_ms?: HostProfile;
  /** Ours: every step's loss, warmup included, in step order (the run's trajectory). */
  losses?: number[];
  /** 'complementary': FastConvMAE's complementary masking (4 views per image), ours and PyTorch's. */
  masking?: string;
}

/** The config override of FastConvMAE's rows, for our worker and PyTorch's alike. */
const COMPLEMENTARY_CONFIG = ['--config', JSON.stringify({ complementary_masking: true })];

/** Runs a command, returns its last JSON line (or the error), killing it after `seconds`. */
function child(cmd: string, args: string[], seconds: number, env: NodeJS.ProcessEnv = process.env): Promise<{ json?: Record<string, unknown>; error?: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      p.kill('SIGKILL');
    }, seconds * 1000);
    // A command that cannot start (no python3 there) is one failed row, not the end of the check.
    let done = false;
    p.on('error', (e) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      resolve({ error: `could not start ${cmd}: ${e.message}`, stderr: err });
    });
    p.on('close', (code, signal) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      const last = out.trim().split('\n').filter((l) => l.startsWith('{')).at(-1);
      if (code === 0 && last) resolve({ json: JSON.parse(last) as Record<string, unknown>, stderr: err });
      else {
        // A process ended by a signal has no exit code: name the signal (run 8's composite row
        // said only "exit null" after a crash with nothing on stderr).
        const how = signal === 'SIGKILL' && timedOut ? `timed out after ${seconds} s` : signal ? `killed by ${signal}` : `exit ${code}`;
        resolve({ error: `${how}: ${err.trim().split('\n').slice(-3).join(' | ') || '(nothing on stderr)'}`, stderr: err });
      }
    });
  });
}

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2), new Set(['quick', 'kernels-only', 'throughput-only', 'profile', 'profile-only', 'no-op-timings', 'rehearse']));
  // --rehearse: the whole check on this machine's CPU addon, with convmae-tiny at batch 8 (the
  // probes and every row, the fallbacks, the report): the check's own flow end to end where
  // there is no GPU, for its test. What it measures says nothing about a GPU.
  const rehearse = opts.flags.rehearse === 'true';
  const device = rehearse ? 'cpu' : 'cuda';
  const preset = rehearse ? 'convmae-tiny' : 'convmae-base';
  const firstBatch = rehearse ? 8 : 64;
  // The probes read their device from here (probe-worker.ts).
  if (rehearse) process.env.CONVMAE_PROBE_DEVICE = 'cpu';
  const out = path.resolve(opts.flags.out ?? 'gpu-out');
  const golden = path.resolve(opts.flags.golden ?? path.join(REPO_ROOT, 'benches', 'gpu', 'payload', 'golden'));
  const python = opts.flags.python ?? 'python3';
  const quick = opts.flags.quick === 'true';
  // Parity and kernel agreement only (a minute or two): whether the CUDA kernels are right,
  // before spending the rest of the device time on throughput.
  const kernelsOnly = opts.flags['kernels-only'] === 'true';
  // (b)-(d) without (a), for a second call after a --kernels-only one.
  const throughputOnly = opts.flags['throughput-only'] === 'true';
  if (kernelsOnly && throughputOnly) throw new RangeError('--kernels-only and --throughput-only exclude each other (together they would measure nothing)');
  // The profile alone, for a call of its own after the measurements.
  const profileOnly = opts.flags['profile-only'] === 'true';
  if (profileOnly && (kernelsOnly || throughputOnly)) throw new RangeError('--profile-only excludes --kernels-only and --throughput-only');
  // Where the GPU time of a step goes, by kernel (a few minutes: ncu times every launch alone).
  const profile = profileOnly || opts.flags.profile === 'true';
  const profileTimeout = intFlag(opts, 'profile-timeout', 150);
  // The whole check's budget in seconds: each child gets at most what is left (less a margin for
  // writing the results), and what no longer fits is recorded as skipped, so a check run inside a
  // device call's time limit ends by itself with its files written instead of being killed.
  const deadlineS = opts.flags.deadline === undefined ? Infinity : intFlag(opts, 'deadline', 0);
  mkdirSync(out, { recursive: true });
  const log = (s: string) => process.stderr.write(`[gpu-check ${new Date().toISOString().slice(11, 19)}] ${s}\n`);
  const started = Date.now();
  const secondsLeft = () => deadlineS - (Date.now() - started) / 1000 - 5;
  // `child` within the --deadline: a child that would get under 15 s is not started.
  const run = (cmd: string, args: string[], seconds: number, env?: NodeJS.ProcessEnv) =>
    secondsLeft() < 15 ? Promise.resolve({ error: `skipped: --deadline ${deadlineS} s reached`, stderr: '' } as Awaited<ReturnType<typeof child>>) : child(cmd, args, Math.min(seconds, Math.floor(secondsLeft())), env);
  // The addon is loaded here rather than imported, so that a load failure (a missing CUDA
  // library) is recorded and the PyTorch half of the check still runs. Loading runs no kernel;
  // everything that does runs in child processes (probe-worker.js, pretrain-worker.js), so a
  // faulting kernel costs one probe, not the check.
  let loadError: string | undefined;
  try {
    const { native } = await import('../../src/native.js');
    if (!native.cudaBuild() && !rehearse) loadError = 'this is not the CUDA build: set CONVMAE_NATIVE to convmae.linux-x64-gnu.cuda.node';
  } catch (e) {
    loadError = (e as Error).message;
  }
  if (loadError) log(`our addon is unusable, only PyTorch will be measured: ${loadError}`);
  const probe = path.join(REPO_ROOT, 'dist', 'benches', 'gpu', 'probe-worker.js');

  const parity: Record<string, unknown>[] = [];
  // One row per op x dtype (f32, bf16) x path ("kernels": our CUDA kernels; "composite": candle's
  // ops, what CONVMAE_KERNELS=composite selects). An addon built before the CUDA kernels
  // reports only op / forward_rel / gradient_rel (f32, composite), hence the optional fields.
  let agreement: { op: string; forward_rel: number; gradient_rel: number; path?: string; dtype?: string; kernel?: boolean; gradient_rels?: number[]; tolerance?: number; pass?: boolean }[] = [];
  let agreementError: string | undefined;
  let opTimings: OpTiming[] = [];
  let opTimingError: string | undefined;
  const rows: Row[] = [];
  let profileReport: ProfileReport | undefined;
  // Rewritten after every probe and measurement, so a run cut short still leaves its results.
  // run.sh's arguments as given (it adds --out and --golden itself), for the report.
  const runArgs = process.argv.slice(2).filter((a, i, all) => !['--out', '--golden'].includes(a) && !['--out', '--golden'].includes(all[i - 1] ?? ''));
  const save = () => writeResults({ out, started, runArgs, rehearse, preset, firstBatch, loadError, parity, agreement, agreementError, opTimings, opTimingError, rows, profile: profileReport });

  // (a0) The newest form of attention (the flash form on mma.sync, written
  // without a GPU at hand) alone first, in a process of its own: should it fail or fault, every
  // later process leaves it out (CONVMAE_FLASH_MMA=off: `auto` does not try it, the agreement
  // and timing tables skip it), so that it cannot take the other rows down with it.
  let mmaProbeRows: typeof agreement = [];
  if (!loadError && !profileOnly) {
    const r = await run(process.execPath, [probe, 'mma'], 90);
    mmaProbeRows = (r.json?.rows as typeof agreement | undefined) ?? [];
    const ok = mmaProbeRows.length > 0 && mmaProbeRows.every((a) => a.pass !== false);
    for (const a of mmaProbeRows) log(`mma probe: ${a.op} ${a.dtype ?? ''}: forward ${a.forward_rel.toExponential(2)} gradient ${a.gradient_rel.toExponential(2)}${a.pass === false ? ' FAIL' : ''}`);
    if (!ok) {
      process.env.CONVMAE_FLASH_MMA = 'off';
      if (!mmaProbeRows.length) mmaProbeRows = [{ op: `self_attention:flash_mma (probe: ${r.error ?? 'no rows'})`, forward_rel: NaN, gradient_rel: NaN, pass: false }];
      log(`the mma.sync flash kernels' probe failed${r.error ? ` (${r.error})` : ''}: every later process runs with CONVMAE_FLASH_MMA=off`);
    }
  }

  // (a) kernel agreement first (it says which kernel is wrong), then parity.
  if (!loadError && !throughputOnly && !profileOnly) {
    const r = await run(process.execPath, [probe, 'agreement'], 180);
    if (r.json) {
      agreement = r.json.rows as typeof agreement;
      // The mma probe's failing rows, which the table itself then left out.
      if (process.env.CONVMAE_FLASH_MMA === 'off') agreement.push(...mmaProbeRows);
      for (const a of agreement) {
        const verdict = a.pass === undefined ? '' : a.pass ? ' pass' : ` FAIL (tolerance ${a.tolerance})`;
        log(`kernel ${a.op} ${a.path ?? ''} ${a.dtype ?? 'f32'}: forward ${a.forward_rel.toExponential(2)} gradient ${a.gradient_rel.toExponential(2)}${verdict}`);
      }
    } else {
      agreementError = r.error;
      log(`kernel agreement: error ${r.error}`);
    }
    save();
  }
  // The golden fixtures, and FastConvMAE's fixture (made by our PyTorch rewrite of its
  // computation: test/fixtures, carried with the working tree).
  const fastConvMae = path.join(REPO_ROOT, 'test', 'fixtures', 'fastconvmae_small.safetensors');
  for (const [file, dtype, convPath] of loadError || throughputOnly || profileOnly ? [] : ([
    ['pretrain_small.safetensors', 'f32', 'sparse'],
    ['pretrain_small.safetensors', 'f32', 'dense'],
    ['pretrain_small.safetensors', 'f64', 'sparse'],
    ['finetune_small.safetensors', 'f32', 'sparse'],
    ['finetune_small.safetensors', 'f64', 'sparse'],
    [fastConvMae, 'f32', 'sparse'],
    [fastConvMae, 'f64', 'sparse'],
  ] as const)) {
    const r = await run(process.execPath, [probe, 'parity', path.isAbsolute(file) ? file : path.join(golden, file), dtype, convPath], 120);
    if (r.json) {
      const j = r.json as { kind: string; pass: boolean; worst: string; worst_rel: number; tolerance: number };
      parity.push({ fixture: path.basename(file), dtype, path: j.kind === 'pretrain' ? convPath : null, pass: j.pass, worst: j.worst, worst_rel: j.worst_rel, tolerance: j.tolerance });
      log(`parity ${path.basename(file)} ${dtype} ${convPath}: ${j.pass ? 'pass' : 'FAIL'} (worst ${j.worst} ${j.worst_rel.toExponential(2)})`);
    } else {
      parity.push({ fixture: path.basename(file), dtype, path: convPath, pass: false, error: r.error });
      log(`parity ${path.basename(file)} ${dtype} ${convPath}: error ${r.error}`);
    }
    save();
  }

  // Overlapped steps against steps one at a time, on the GPU: the same bits (probe-worker.ts).
  if (!loadError && !throughputOnly && !profileOnly) {
    const r = await run(process.execPath, [probe, 'overlap'], 90);
    const j = r.json as { pass: boolean; worst: string; worst_rel: number; tolerance: number } | undefined;
    parity.push(j ? { fixture: 'overlapped steps = one at a time (convmae-tiny)', dtype: 'bf16', path: 'sparse', ...j } : { fixture: 'overlapped steps = one at a time (convmae-tiny)', dtype: 'bf16', path: 'sparse', pass: false, error: r.error });
    log(`overlapped steps: ${j ? `${j.pass ? 'pass' : 'FAIL'} (worst ${j.worst} ${j.worst_rel.toExponential(2)})` : `error ${r.error}`}`);
    save();
  }

  // The segmenter and the detector on the GPU against the same ones on the CPU (f32, TF32 off):
  // their CUDA routes (candle's im2col and BatchNorm, our ROIAlign kernel, our kernels
  // elsewhere) were written without a GPU. Each probe then trains the same model in bf16 on the
  // GPU, a row of its own: its losses within 5% of the CPU's f32 ones.
  type TaskBf16 = { bf16?: { pass: boolean; worst?: string; worst_rel?: number; tolerance?: number; error?: string } };
  const pushBf16 = (name: string, what: string, bf16: TaskBf16['bf16'], probeError?: string) => {
    const fixture = `${name} in bf16 on the GPU ~ f32 on the CPU (${what}, within 5%)`;
    const error = bf16?.error ?? (bf16 ? undefined : probeError ?? 'the probe reported no bf16 check');
    parity.push(error === undefined && bf16 ? { fixture, dtype: 'bf16', path: null, pass: bf16.pass, worst: bf16.worst, worst_rel: bf16.worst_rel, tolerance: bf16.tolerance } : { fixture, dtype: 'bf16', path: null, pass: false, error });
    log(`${name} bf16: ${error === undefined && bf16 ? `${bf16.pass ? 'pass' : 'FAIL'} (worst ${bf16.worst} ${bf16.worst_rel?.toExponential(2)})` : `error ${error}`}`);
  };
  if (!loadError && !throughputOnly && !profileOnly) {
    const r = await run(process.execPath, [probe, 'segmenter'], 120, { ...process.env, CONVMAE_TF32: 'off' });
    const j = r.json as ({ pass: boolean; worst: string; worst_rel: number; tolerance: number; predictions_differ: number } & TaskBf16) | undefined;
    const fixture = 'segmenter on the GPU = on the CPU (convmae-tiny, 3 steps and an evaluation)';
    const differ = j ? `predictions differing ${(100 * j.predictions_differ).toFixed(3)}%` : '';
    const { bf16, ...f32 } = j ?? {};
    parity.push(j ? { fixture, dtype: 'f32', path: null, ...(f32 as Omit<typeof j, 'bf16'>), worst: `${j.worst}; ${differ}` } : { fixture, dtype: 'f32', path: null, pass: false, error: r.error });
    log(`segmenter: ${j ? `${j.pass ? 'pass' : 'FAIL'} (worst ${j.worst} ${j.worst_rel.toExponential(2)}, ${differ})` : `error ${r.error}`}`);
    pushBf16('segmenter', '3 steps', bf16, r.error);
    save();
    // The DET detector, then Official-ConvMAE-Det's (its pyramid, LayerNorm heads, decomposed
    // relative positions and extents, also written without a GPU).
    for (const [name, probeName, what] of [
      ['detector', 'detector', 'convmae-tiny, 2 steps'],
      ['detector (vitdet)', 'detector-vitdet', 'vitdet variant, convmae-tiny, 2 steps with extents'],
    ] as const) {
      const d = await run(process.execPath, [probe, probeName], 120, { ...process.env, CONVMAE_TF32: 'off' });
      const k = d.json as ({ pass: boolean; worst: string; worst_rel: number; tolerance: number; detections: [number, number]; score_diff: number } & TaskBf16) | undefined;
      const detFixture = `${name} on the GPU = on the CPU (${what}; detections reported)`;
      const detections = k ? `detections ${k.detections[0]} on the GPU, ${k.detections[1]} on the CPU, scores within ${k.score_diff.toExponential(2)}` : '';
      const { bf16, ...f32 } = k ?? {};
      parity.push(k ? { fixture: detFixture, dtype: 'f32', path: null, ...(f32 as Omit<typeof k, 'bf16'>), worst: `${k.worst}; ${detections}` } : { fixture: detFixture, dtype: 'f32', path: null, pass: false, error: d.error });
      log(`${name}: ${k ? `${k.pass ? 'pass' : 'FAIL'} (worst ${k.worst} ${k.worst_rel.toExponential(2)}, ${detections})` : `error ${d.error}`}`);
      pushBf16(name, 'RPN losses of 2 steps', bf16, d.error);
      save();
    }
  }

  // Each op's time by our kernels and by candle's compositions at a step's shapes (seconds):
  // whether each kernel pays, which the throughput rows cannot say op by op.
  // --no-op-timings: the agreement and parity without the op timings (17 s of run 4 on an H100),
  // for a call whose device time is short.
  if (!loadError && !throughputOnly && !profileOnly && opts.flags['no-op-timings'] !== 'true') {
    const r = await run(process.execPath, [probe, 'timing', String(firstBatch), '5'], 150);
    if (r.json) {
      opTimings = r.json.rows as OpTiming[];
      for (const t of opTimings) log(`time ${t.op} ${t.path} ${t.dtype}: forward ${fmt(t.forward_ms)} ms, forward+backward ${fmt(t.forward_backward_ms)} ms`);
    } else {
      opTimingError = r.error;
      log(`op timings: error ${r.error}`);
    }
    save();
  }

  // (b)-(d) throughput and memory.
  const batches = kernelsOnly || profileOnly ? [] : quick ? [firstBatch] : [firstBatch, 2 * firstBatch];
  const worker = path.join(REPO_ROOT, 'dist', 'benches', 'pretrain-worker.js');
  const baseline = path.join(REPO_ROOT, 'benches', 'baselines', 'time_step.py');
  const record = (r: { json?: Record<string, unknown>; error?: string; stderr?: string }, fallback: Omit<Row, 'images_per_s' | 'peak_mem_mb' | 'ms_per_step_median'>) => {
    const j = r.json ?? {};
    const choices = autoChoices(r.stderr ?? '');
    const host = hostProfile(r.stderr ?? '', STEPS);
    const row: Row = {
      ...fallback,
      // The row's own label: the workers report plain "ours" / "pytorch", which would hide
      // which A/B run a row is.
      impl: fallback.impl,
      device: (j.device as string) ?? fallback.device,
      images_per_s: (j.images_per_s as number) ?? NaN,
      peak_mem_mb: (j.peak_mem_mb as number) ?? NaN,
      ms_per_step_median: (j.ms_per_step_median as number) ?? NaN,
      error: r.error,
      ...(choices.length ? { choices } : {}),
      ...(host ? { host_ms: host } : {}),
      ...(Array.isArray(j.losses) ? { losses: j.losses as number[] } : {}),
    };
    rows.push(row);
    for (const c of choices) log(`  ${c}`);
    save();
    log(`${row.impl} ${row.path ?? ''} ${row.dtype} b${row.batch}: ${r.error ?? `${fmt(row.images_per_s)} img/s, peak ${fmt(row.peak_mem_mb)} MB`}`);
  };
  // A kernel that faults takes its process down, CONVMAE_ATTENTION=auto tries every form of
  // attention that serves a shape, and AdamW updates every tensor in one launch: should a flash
  // row or the one-launch AdamW row of the agreement have failed (or the agreement probe itself),
  // our rows run without them, rather than all fault alike.
  const failed = (op: (name: string) => boolean) => agreementError !== undefined || agreement.some((a) => op(a.op) && a.pass === false);
  // (The flash kernels on mma.sync have a switch of their own, below.)
  const flashSuspect = failed((op) => op.includes('flash') && !op.includes('flash_mma'));
  const manySuspect = failed((op) => op === 'adamw_update:many');
  // Should the mma rows have passed their own probe but failed in the full table, they are left
  // out from here on.
  if (agreement.some((a) => a.op.includes('flash_mma') && a.pass === false)) process.env.CONVMAE_FLASH_MMA = 'off';
  // Likewise the pinned uploads and readbacks, and the neighbour tables built on the GPU (both
  // written after run 7 without a GPU): should their agreement rows fail, our rows go back to
  // candle's transfers and to tables built on the host.
  const transfersSuspect = failed((op) => op === 'transfer:upload,read_later');
  const tablesSuspect = failed((op) => op === 'sparse_neighbors:of_visible_tokens');
  // cuBLASLt's bias epilogues (written after run 7 without a GPU) serve every linear layer,
  // in the linear op and inside the sublayer ops: should a row of those fail other than the
  // plain-gemm rows (or the agreement), our rows run without them (CONVMAE_GEMM_EPILOGUE=off).
  const epilogueSuspect = failed((op) => /^(linear|linear_gelu|mlp_residual|attention_residual|conv_residual)(:|$)/.test(op) && !op.endsWith(':plain_gemm'));
  // The kernels' vector forms (GELU, LayerNorm, the sparse depthwise conv, the one-launch AdamW,
  // written after run 7 without a GPU; host emulation checks them in f32 and bf16): should a
  // row that runs one fail (the ops themselves or the sublayers around them), our rows run
  // without them (CONVMAE_VECTOR_KERNELS=off), whatever else that failure also switches off.
  const vectorSuspect = failed((op) => /^(layer_norm|gelu_erf|sparse_depthwise_conv2d|adamw_update:many|mlp_residual|attention_residual|conv_residual)(:|$)/.test(op));
  // The sublayer ops' backward writes its gradients in place since run 7: should their rows
  // fail (or the agreement), the sublayers run as their separate ops (CONVMAE_SUBLAYER=composite),
  // unless the epilogues explain it: they are suspect and the MLP sublayer's plain-gemm row passed.
  const plainSublayerPassed = agreement.some((a) => a.op === 'mlp_residual:plain_gemm' && a.path === 'kernels' && a.pass === true);
  // The packed sublayer's row (its packs' gradients through a sink, as pretraining's bf16 copies
  // take them; written after run 7) failing where the unpacked one passed points at the packing
  // or the sink, not at the epilogues: the sublayers then run as their separate ops too.
  const rowFailed = (op: string) => agreement.some((a) => a.op === op && a.path === 'kernels' && a.pass === false);
  const rowPassed = (op: string) => agreement.some((a) => a.op === op && a.path === 'kernels' && a.pass === true);
  const packedSuspect = rowFailed('mlp_residual:packed') && rowPassed('mlp_residual') && !rowFailed('mlp_residual');
  const sublayerSuspect = (failed((op) => /^(mlp_residual|attention_residual)/.test(op)) && !(epilogueSuspect && plainSublayerPassed)) || packedSuspect;
  if (epilogueSuspect && !loadError && !profileOnly) log('a linear layer\'s agreement row failed (or the agreement did): our rows run with CONVMAE_GEMM_EPILOGUE=off');
  if (sublayerSuspect && !loadError && !profileOnly) log('a sublayer op\'s agreement row failed (or the agreement did): our rows run with CONVMAE_SUBLAYER=composite');
  // And the ops CONVMAE_COMPOSITE_OPS can switch one by one (written after run 7 without a
  // GPU): each whose kernel row failed goes to candle's ops in our rows; all of them should the
  // agreement itself have failed.
  // The sublayer chain and the tape's backward are judged against their twins (the links one
  // by one, candle's backward: rows `:links`, `:candle`), not by their tolerance: when right
  // they give their twins' bits, so that any difference in the errors the two rows report (or
  // a row without its twin) is theirs.
  const differsFromTwin = (op: string) =>
    agreement.some(
      (a) =>
        a.op === op &&
        a.path === 'kernels' &&
        !agreement.some((b) => b.op === `${op}:${JUDGED_BY_TWIN[op]}` && b.path === a.path && b.dtype === a.dtype && b.forward_rel === a.forward_rel && JSON.stringify(b.gradient_rels) === JSON.stringify(a.gradient_rels)),
    );
  const opFailed = (op: string) => (op in JUDGED_BY_TWIN ? differsFromTwin(op) : agreement.some((a) => a.op === op && a.path === 'kernels' && a.pass === false));
  const compositeOps = NEW_OPS.filter((op) => agreementError !== undefined || opFailed(op));
  if (compositeOps.length && !loadError && !profileOnly) log(`agreement rows failed (or the agreement did): our rows run with CONVMAE_COMPOSITE_OPS=${compositeOps.join(',')}`);
  if (transfersSuspect && !loadError && !profileOnly) log('the pinned transfers\' agreement row failed (or the agreement did): our rows run with CONVMAE_TRANSFERS=plain');
  if (tablesSuspect && !loadError && !profileOnly) log('the GPU neighbour tables\' agreement row failed (or the agreement did): our rows run with CONVMAE_NEIGHBOUR_TABLES=host');
  // Likewise overlapped steps, should they not give the answers of steps one at a time: the
  // probe failed to run, or differs by more than a rounding could (the probe passes only at the
  // same bits; a difference in the last bits would say the GPU's arithmetic is not repeatable
  // run to run, not that overlapping is wrong).
  const overlapSuspect = parity.some((p) => String(p.fixture).startsWith('overlapped steps') && p.pass === false && !((p.worst_rel as number) <= 1e-3));
  const attentionFallback: NodeJS.ProcessEnv = {
    ...(flashSuspect ? { CONVMAE_ATTENTION: 'gemm' } : {}),
    ...(manySuspect ? { CONVMAE_ADAMW: 'per-tensor' } : {}),
    ...(overlapSuspect ? { CONVMAE_STEPS: 'serial' } : {}),
    ...(transfersSuspect ? { CONVMAE_TRANSFERS: 'plain' } : {}),
    ...(tablesSuspect ? { CONVMAE_NEIGHBOUR_TABLES: 'host' } : {}),
    ...(compositeOps.length ? { CONVMAE_COMPOSITE_OPS: compositeOps.join(',') } : {}),
    ...(sublayerSuspect ? { CONVMAE_SUBLAYER: 'composite' } : {}),
    ...(epilogueSuspect ? { CONVMAE_GEMM_EPILOGUE: 'off' } : {}),
    ...(vectorSuspect ? { CONVMAE_VECTOR_KERNELS: 'off' } : {}),
  };
  if (vectorSuspect && !loadError && !profileOnly) log('a row of an op with vector forms failed (or the agreement did): our rows run with CONVMAE_VECTOR_KERNELS=off');
  if (overlapSuspect && !loadError && !profileOnly) log('overlapped steps did not match steps one at a time: our rows run with CONVMAE_STEPS=serial');
  if (flashSuspect && !loadError && !profileOnly) log('the flash attention rows of the agreement failed (or the agreement did): our rows run with CONVMAE_ATTENTION=gemm');
  if (manySuspect && !loadError && !profileOnly) log('the one-launch AdamW row of the agreement failed (or the agreement did): our rows run with CONVMAE_ADAMW=per-tensor');
  const ours = (batch: number, precision: 'bf16' | 'fp32', convPath: 'sparse' | 'dense', impl: string, env: NodeJS.ProcessEnv = {}, args: string[] = []) =>
    run(process.execPath, [worker, '--preset', preset, '--batch', String(batch), '--warmup', '2', '--steps', String(STEPS), '--device', device, '--precision', precision, '--path', convPath, ...args], 150, { ...process.env, ...attentionFallback, ...env }).then((r) =>
      record(r, { suite: 'gpu', impl, preset, batch, dtype: precision === 'bf16' ? 'bf16' : 'f32', device, path: convPath }),
    );
  // The downstream tasks' training steps on the GPU (f32, then bf16; ours only: no PyTorch
  // baseline of them is installed there): the segmenter at 512 px, batch 8, and the detector at
  // 1024 px, batch 2, with the official heads (task-worker.ts, made-up labelled images). The
  // rehearsal runs them at 64 px with the task probes' narrow heads.
  const taskWorker = path.join(REPO_ROOT, 'dist', 'benches', 'task-worker.js');
  const tasks = async () => {
    if (loadError) return;
    const size = { segment: rehearse ? 64 : 512, detect: rehearse ? 64 : 1024 };
    const batch = { segment: rehearse ? 2 : 8, detect: 2 };
    const steps = rehearse ? ['--warmup', '1', '--steps', '1', '--small-heads'] : ['--warmup', '2', '--steps', '5'];
    for (const precision of ['fp32', 'bf16'] as const) {
      for (const task of ['segment', 'detect'] as const) {
        const args = [taskWorker, '--task', task, '--preset', preset, '--img', String(size[task]), '--batch', String(batch[task]), '--device', device, '--precision', precision, ...steps];
        const r = await run(process.execPath, args, 180);
        record(r, { suite: 'gpu', impl: `ours-${task}-${size[task]}px`, preset, batch: batch[task], dtype: precision === 'bf16' ? 'bf16' : 'f32', device });
      }
    }
  };
  const pytorch = async (batch: number, amp: 'bf16' | 'none', compile: boolean, masking?: 'complementary') => {
    const args = [baseline, '--preset', preset, '--batch', String(batch), '--device', device, '--amp', amp, '--warmup', compile ? '3' : '2', '--steps', '5', ...(masking ? COMPLEMENTARY_CONFIG : [])];
    if (compile) args.push('--compile');
    const r = await run(python, args, compile ? 240 : 120);
    const impl = (compile ? 'pytorch-compile' : 'pytorch') + (masking ? `-${masking}` : '');
    record(r, { suite: 'gpu', impl, preset, batch, dtype: amp === 'bf16' ? 'bf16' : 'f32', device, ...(masking ? { masking } : {}) });
  };
  // Fine-tuning (the official ConvViT, 1000 classes, stochastic depth 0.1, soft targets, AdamW
  // with layer decay; benches/finetune-worker.ts and time_step.py --task finetune): ours in bf16
  // against PyTorch eager with autocast bf16, at the first batch.
  const finetuneWorker = path.join(REPO_ROOT, 'dist', 'benches', 'finetune-worker.js');
  const finetune = async () => {
    if (!loadError) {
      const args = [finetuneWorker, '--preset', preset, '--batch', String(firstBatch), '--warmup', '2', '--steps', String(STEPS), '--device', device, '--precision', 'bf16'];
      record(await run(process.execPath, args, 150, { ...process.env, ...attentionFallback }), { suite: 'gpu', impl: 'ours-finetune', preset, batch: firstBatch, dtype: 'bf16', device });
    }
    const args = [baseline, '--task', 'finetune', '--preset', preset, '--batch', String(firstBatch), '--device', device, '--amp', 'bf16', '--warmup', '2', '--steps', '5'];
    record(await run(python, args, 120), { suite: 'gpu', impl: 'pytorch-finetune', preset, batch: firstBatch, dtype: 'bf16', device });
  };
  // FastConvMAE's complementary masking (4 views of each image: stage 3 and the decoder 4 times,
  // every position of stages 1-2 once): ours sparse bf16 against PyTorch eager bf16 computing as
  // models_fastconvmae.py does, at the first batch.
  const complementary = async () => {
    if (!loadError) {
      const r = await run(process.execPath, [worker, '--preset', preset, '--batch', String(firstBatch), '--warmup', '2', '--steps', String(STEPS), '--device', device, '--precision', 'bf16', '--path', 'sparse', ...COMPLEMENTARY_CONFIG], 150, { ...process.env, ...attentionFallback });
      record(r, { suite: 'gpu', impl: 'ours-complementary', preset, batch: firstBatch, dtype: 'bf16', device, path: 'sparse', masking: 'complementary' });
    }
    await pytorch(firstBatch, 'bf16', false, 'complementary');
  };
  // (e) the per-kernel profile of a batch-64 step: right after the issue's comparison at batch 64
  // (it needs our row's attention pick), before the other configurations, so that a run cut short
  // by its --deadline loses those rather than the profile (run 3 of 2026-11-26 left ncu 21 s).
  const runProfile = async () => {
    const batch = firstBatch;
    // Under ncu every launch is serialized and timed, which would skew CONVMAE_ATTENTION=auto's
    // own timing (the first GPU run's profile got the fused form where the throughput run had
    // picked the gemms): the profiled run is told the form the throughput run picked.
    // (The gemm form where the comparison's row of ours had to be rerun with it.)
    const headline = rows.find((r) => ['ours', ...RETRIES.map((x) => x.impl)].includes(r.impl) && r.path === 'sparse' && r.dtype === 'bf16' && r.batch === batch && !r.error);
    const retry = RETRIES.find((x) => x.impl === headline?.impl);
    const attentionForm = retry ? retry.env.CONVMAE_ATTENTION : autoAttentionForm(headline?.choices ?? []);
    const profileEnv: NodeJS.ProcessEnv = retry ? { ...retry.env } : { ...attentionFallback, ...(attentionForm ? { CONVMAE_ATTENTION: attentionForm } : {}) };
    const attentionNote = attentionForm ? `attention in the ${attentionForm} form, as the throughput run picked` : 'attention as CONVMAE_ATTENTION=auto picks under the profiler';
    const workload = `One pretraining step of ${preset} at batch ${batch}, sparse path, bf16 (ours: CUDA kernels as by default, ${attentionNote}; PyTorch: eager with autocast bf16).`;
    // One warmup step (module loads, first allocations), then the profiled step.
    const workerArgs = ['--preset', preset, '--batch', String(batch), '--warmup', '1', '--steps', '1', '--device', device, '--precision', 'bf16', '--path', 'sparse'];
    const ncu = findNcu({ explicit: opts.flags.ncu ?? process.env.CONVMAE_NCU });
    const tmp = mkdtempSync(path.join(os.tmpdir(), 'convmae-ncu-'));
    const logFile = path.join(tmp, 'ncu-raw.csv');
    let ours: NcuRunResult;
    if (loadError) {
      ours = { status: 'skipped', reason: `our addon is unusable: ${loadError}`, command: shellQuote(['ncu', ...ncuArgs(logFile, process.execPath, [worker, ...workerArgs])]) };
    } else {
      log(ncu.path ? `profile: ours under ${ncu.path} (at most ${profileTimeout} s)` : `profile: ${ncu.reason}`);
      ours = await runUnderNcu({ ncu, app: process.execPath, appArgs: [worker, ...workerArgs], logFile, timeoutS: Math.max(1, Math.min(profileTimeout, Math.floor(secondsLeft() - 30))), env: { ...process.env, ...PROFILED_STEP_ENV, ...profileEnv } });
    }
    // ncu's own table, compressed (one row per launch: what the summary was made from).
    if (existsSync(logFile)) {
      const gz = gzipSync(readFileSync(logFile));
      if (gz.length < 15 * 2 ** 20) writeFileSync(path.join(out, 'ncu-raw.csv.gz'), gz);
      else log(`profile: ncu's table is ${gz.length} bytes compressed, over what the device tool brings back; not kept`);
    }
    rmSync(tmp, { recursive: true, force: true });
    profileReport = { workload, ours };
    log(`profile ours: ${ours.status}${ours.reason ? ` (${ours.reason})` : ''}${ours.summary ? `, ${fmt(ours.summary.total_us / 1000)} ms of kernels in ${ours.summary.launches} launches` : ''}`);
    save();

    const torchArgs = [baseline, '--preset', preset, '--batch', String(batch), '--device', device, '--amp', 'bf16', '--warmup', '1', '--steps', '1', '--profile'];
    const r = await run(python, torchArgs, 120);
    const pytorch: TorchProfileResult = { status: 'ok', command: shellQuote([python, ...torchArgs]) };
    const p = r.json?.profile as { kernels?: KernelEntry[]; time_attr?: string; step_ms?: number } | undefined;
    if (p?.kernels) {
      pytorch.summary = summarizeKernels(p.kernels);
      pytorch.torch = r.json?.torch as string | undefined;
      pytorch.time_attr = p.time_attr;
      pytorch.step_ms = p.step_ms;
      if (!p.kernels.length) Object.assign(pytorch, { status: 'failed', reason: 'torch.profiler reported no CUDA kernels' });
    } else {
      pytorch.status = r.error?.startsWith('timed out') ? 'timed_out' : 'failed';
      pytorch.reason = r.error ?? 'no "profile" in its JSON line';
    }
    profileReport = { workload, ours, pytorch };
    log(`profile PyTorch: ${pytorch.status}${pytorch.reason ? ` (${pytorch.reason})` : ''}${pytorch.summary ? `, ${fmt(pytorch.summary.total_us / 1000)} ms of kernels in ${pytorch.summary.launches} launches` : ''}`);
  };

  // The A/B rows of changes made before run 7, measured then (once, at the first batch size).
  const earlierABs = async (batch: number) => {
    if (loadError) return;
    // Our CUDA kernels: the same sparse bf16 run with candle's ops instead (CONVMAE_KERNELS=composite);
    await ours(batch, 'bf16', 'sparse', 'ours-composite', { CONVMAE_KERNELS: 'composite' });
    // the attention kernels alone: everything else ours, attention as cuBLAS + softmax;
    await ours(batch, 'bf16', 'sparse', 'ours-attention-composite', { CONVMAE_ATTENTION: 'composite' });
    // two host-side changes made after run 3 of 2026-11-26: the batch normalized on the host
    // (as before), and a cast of every weight every forward instead of the bf16 compute copies
    // (as before);
    await ours(batch, 'bf16', 'sparse', 'ours-host-normalize', { CONVMAE_NORMALIZE: 'host', CONVMAE_PROFILE: '1' });
    await ours(batch, 'bf16', 'sparse', 'ours-weight-casts', { CONVMAE_COMPUTE_COPIES: 'off' });
    // the one-launch AdamW: a launch per tensor, as before it.
    await ours(batch, 'bf16', 'sparse', 'ours-adamw-per-tensor', { CONVMAE_ADAMW: 'per-tensor', CONVMAE_PROFILE: '1' });
  };

  // The issue's comparison first (ours sparse bf16 against PyTorch eager bf16 and torch.compile),
  // so that a run that meets its --deadline has it; then the other configurations and the A/Bs.
  for (const batch of batches) {
    // With the addon's per-step host timing (one line a step): whether the GPU waits on the host.
    if (!loadError) {
      await ours(batch, 'bf16', 'sparse', 'ours', { CONVMAE_PROFILE: '1' });
      // Should it fail (a fault in a form of attention auto tried, or in the one-launch AdamW,
      // say), once more with the gemm form and AdamW per tensor, which have run on GPUs before;
      // and should that fail too, with every path written since run 7 switched off, so that
      // the comparison has a row of ours.
      for (const retry of RETRIES) {
        const last = rows[rows.length - 1];
        if (!last.error || last.error.startsWith('skipped')) break;
        await ours(batch, 'bf16', 'sparse', retry.impl, { CONVMAE_PROFILE: '1', ...retry.env });
      }
    }
    await pytorch(batch, 'bf16', false);
    await pytorch(batch, 'bf16', true);
    // The profile right after the comparison, before the A/B rows: should the deadline cut the
    // run short, where the step's time goes says more than any one A/B.
    if (profile && batch === firstBatch) await runProfile();
    if (!loadError && batch === batches[0]) {
      // The rows that must repeat the headline row's losses take its forms of attention, shape
      // by shape, rather than timing them again (two forms within noise of each other could be
      // picked differently in another process: run 8b compared one of these four rows).
      const headline = rows.find((r) => r.impl === 'ours' && r.batch === batch && r.dtype === 'bf16' && r.path === 'sparse' && !r.error);
      const picks = attentionPicksEnv(headline?.choices ?? []);
      const samePicks: NodeJS.ProcessEnv = picks ? { CONVMAE_ATTENTION_PICKS: picks } : {};
      // The backward on the tape against candle's backward: an A/B, and with the trajectories
      // compared (the same losses to the bit) the GPU's whole-step check of the tape, the newest
      // path; first, so that a deadline cuts the others before it.
      await ours(batch, 'bf16', 'sparse', 'ours-candle-backward', { CONVMAE_PROFILE: '1', CONVMAE_COMPOSITE_OPS: 'tape_backward', ...samePicks });
      // The same run of ours, checking after every optimizer step that each bf16 compute copy is
      // its master rounded (the packed copies are written in place by the fused AdamW): the row
      // fails, naming the tensor, if one is not.
      await ours(batch, 'bf16', 'sparse', 'ours-copies-checked', { CONVMAE_CHECK_COPIES: 'on', ...samePicks });
      // The A/B of overlapped steps: each step awaited before the next starts (the host builds a
      // step once the device has finished the last one's forward), and each step finished on the
      // device before it is answered (CONVMAE_STEPS=serial: as before overlapped steps).
      await ours(batch, 'bf16', 'sparse', 'ours-in-flight-1', { CONVMAE_PROFILE: '1', ...samePicks }, ['--in-flight', '1']);
      await ours(batch, 'bf16', 'sparse', 'ours-serial-steps', { CONVMAE_PROFILE: '1', CONVMAE_STEPS: 'serial', ...samePicks }, ['--in-flight', '1']);
      // And of the ops written after run 7 without a GPU (the conv block's first half, the loss,
      // the patch layout, the decoder's entry, the chains of sublayers, the patch convs' kernel
      // rows, the backward on the tape): all seven as before them.
      await ours(batch, 'bf16', 'sparse', 'ours-new-ops-composite', { CONVMAE_PROFILE: '1', CONVMAE_COMPOSITE_OPS: NEW_OPS.join(',') });
      // And of cuBLASLt's bias epilogues: every bias by our row kernels, as before them.
      await ours(batch, 'bf16', 'sparse', 'ours-no-gemm-epilogue', { CONVMAE_PROFILE: '1', CONVMAE_GEMM_EPILOGUE: 'off' });
      // And of the kernels' vector forms: one element a thread, as before them.
      await ours(batch, 'bf16', 'sparse', 'ours-no-vector-kernels', { CONVMAE_PROFILE: '1', CONVMAE_VECTOR_KERNELS: 'off' });
    }
    if (!loadError) {
      await ours(batch, 'bf16', 'dense', 'ours-dense');
      await ours(batch, 'fp32', 'sparse', 'ours');
      await ours(batch, 'fp32', 'dense', 'ours-dense');
    }
    await pytorch(batch, 'none', false);
    if (!quick && batch === batches[0]) await earlierABs(batch);
  }
  if (!quick && !kernelsOnly && !profileOnly) {
    await tasks();
    await finetune();
  }
  // --quick: the issue's rows at twice the batch too, in whatever the --deadline leaves (the
  // issue asks for batch 128 as well): first the comparison (ours sparse bf16 against eager and
  // torch.compile), which says whether ours scales with the batch as PyTorch does, then the rest
  // of its matrix (ours sparse / dense x fp32 / bf16, eager fp32: run 8 had only the
  // comparison at 128; these add about 30 s on an H100). The A/B rows stay at the first batch,
  // and those of the changes runs 1-7 measured already come last.
  if (quick && !kernelsOnly && !profileOnly) {
    const batch = 2 * firstBatch;
    if (!loadError) await ours(batch, 'bf16', 'sparse', 'ours', { CONVMAE_PROFILE: '1' });
    await pytorch(batch, 'bf16', false);
    await pytorch(batch, 'bf16', true);
    if (!loadError) {
      await ours(batch, 'bf16', 'dense', 'ours-dense');
      await ours(batch, 'fp32', 'sparse', 'ours');
      await ours(batch, 'fp32', 'dense', 'ours-dense');
    }
    await pytorch(batch, 'none', false);
    await tasks();
    await complementary();
    await finetune();
    await earlierABs(firstBatch);
  }
  // --profile-only, --kernels-only --profile: no throughput rows before it.
  if (profile && !batches.includes(firstBatch)) await runProfile();


  save();
  log(`wrote ${out}/gpu-${localDate(new Date())}.{jsonl,md} in ${Math.round((Date.now() - started) / 1000)} s`);
}

interface Results {
  out: string;
  started: number;
  runArgs: string[];
  /** --rehearse: the CPU addon, `preset` convmae-tiny at `firstBatch` 8. */
  rehearse: boolean;
  preset: string;
  firstBatch: number;
  loadError?: string;
  parity: Record<string, unknown>[];
  agreement: { op: string; forward_rel: number; gradient_rel: number; path?: string; dtype?: string; kernel?: boolean; gradient_rels?: number[]; tolerance?: number; pass?: boolean }[];
  agreementError?: string;
  opTimings: OpTiming[];
  opTimingError?: string;
  rows: Row[];
  profile?: ProfileReport;
}

/** Writes gpu-<date>.jsonl (harness format), gpu-<date>.md, check.json (everything but the profile's
 *  kernel lists) and, with a profile, profile.json. */
function writeResults({ out, started, runArgs, rehearse, preset, firstBatch, loadError, parity, agreement, agreementError, opTimings, opTimingError, rows, profile }: Results): void {
  const date = localDate(new Date());
  const lines = rows.map((r) => JSON.stringify({ ...r, suite: 'gpu' }));
  writeFileSync(path.join(out, `gpu-${date}.jsonl`), lines.join('\n') + '\n');
  // A row compares with PyTorch's of its batch and masking (FastConvMAE's rows with its eager row).
  const eagerBf16 = (r: Row) => rows.find((o) => o.impl.startsWith('pytorch') && !o.impl.startsWith('pytorch-compile') && o.dtype === 'bf16' && o.batch === r.batch && o.masking === r.masking);
  const compiled = (r: Row) => rows.find((o) => o.impl.startsWith('pytorch-compile') && o.batch === r.batch && o.masking === r.masking);
  const table = markdownTable(
    ['impl', 'path', 'precision', 'batch', 'images/s', 'ms/step', 'peak GPU MB', 'vs eager bf16', 'vs compile', 'mem vs eager bf16'],
    rows.map((r) => {
      const e = eagerBf16(r);
      const c = compiled(r);
      return [r.impl, r.path ?? '', r.dtype, String(r.batch), r.error ? r.error : fmt(r.images_per_s), fmt(r.ms_per_step_median), fmt(r.peak_mem_mb), e ? fmt(r.images_per_s / e.images_per_s) : '', c ? fmt(r.images_per_s / c.images_per_s) : '', e ? fmt(r.peak_mem_mb / e.peak_mem_mb) : ''];
    }),
  );
  const device = rows.find((r) => r.impl.startsWith('pytorch') && !r.error)?.device ?? 'cuda';
  const md = [
    `# GPU check, ${date}`,
    '',
    `Device: ${device}. Command: \`${['bash benches/gpu/run.sh', ...runArgs].join(' ')}\` (node dist/benches/gpu/check.js). Wall time ${Math.round((Date.now() - started) / 1000)} s.`,
    ...(rehearse ? ['', `A rehearsal (\`--rehearse\`): the check's flow on the CPU addon with ${preset} at batch ${firstBatch}; its numbers say nothing about a GPU.`] : []),
    ...(loadError ? ['', `Our CUDA addon could not be used: ${loadError}`] : []),
    ...(agreementError ? ['', `Kernel agreement did not finish: ${agreementError}`] : []),
    '',
    '## Parity (CUDA build, golden fixtures)',
    '',
    markdownTable(['fixture', 'dtype', 'path', 'pass', 'worst tensor', 'worst rel', 'tolerance'], parity.map((p) => [String(p.fixture), String(p.dtype), String(p.path ?? ''), String(p.pass), String(p.worst ?? p.error ?? ''), p.worst_rel === undefined ? '' : (p.worst_rel as number).toExponential(2), String(p.tolerance ?? '')])),
    '',
    '## Ops on CUDA vs the CPU kernels (f32 reference)',
    '',
    'path "kernels": our CUDA kernels where one exists (column "ours"); "composite": candle\'s ops (CONVMAE_KERNELS=composite). Errors are max |a - b| / max |b|; gradients per input in argument order.',
    '',
    markdownTable(
      ['op', 'path', 'dtype', 'ours', 'forward rel', 'gradient rel (each input)', 'tolerance', 'pass'],
      agreement.map((a) => [a.op, a.path ?? 'composite', a.dtype ?? 'f32', String(a.kernel ?? false), a.forward_rel.toExponential(2), (a.gradient_rels ?? [a.gradient_rel]).map((g) => g.toExponential(2)).join(', '), a.tolerance === undefined ? '' : String(a.tolerance), a.pass === undefined ? '' : String(a.pass)]),
    ),
    '',
    '## Op timings: our CUDA kernels vs candle\'s ops',
    '',
    `Each op at the shapes of a ${preset} step of ${firstBatch} images (75% masked), medians of 5 runs with the device synchronized around each (launch overhead included). fwd+bwd: the forward and the gradients of sum(out * probe), less what that probe costs alone (check.json has both).`,
    ...(opTimingError ? ['', `Op timings did not finish: ${opTimingError}`] : []),
    '',
    opTimingTable(opTimings),
    '',
    `## Pretraining throughput, ${preset}`,
    '',
    table,
    '',
    ...autoChoiceLines(rows),
    ...hostProfileLines(rows),
    ...trajectoryLines(rows),
    ...(profile ? [profileMarkdown(profile), ''] : []),
  ].join('\n');
  writeFileSync(path.join(out, `gpu-${date}.md`), md);
  const profileStatus = profile && {
    ours: { status: profile.ours.status, reason: profile.ours.reason ?? null, kernel_ms: profile.ours.summary ? profile.ours.summary.total_us / 1000 : null },
    pytorch: profile.pytorch && { status: profile.pytorch.status, reason: profile.pytorch.reason ?? null, kernel_ms: profile.pytorch.summary ? profile.pytorch.summary.total_us / 1000 : null },
  };
  writeFileSync(path.join(out, 'check.json'), JSON.stringify({ load_error: loadError ?? null, agreement_error: agreementError ?? null, parity, agreement, op_timing_error: opTimingError ?? null, op_timings: opTimings, rows, profile: profileStatus ?? null }, null, 2));
  if (profile) writeFileSync(path.join(out, 'profile.json'), JSON.stringify(profile, null, 2));
}

/** The timed steps of each throughput run. */
const STEPS = 5;
/**
 * The ops CONVMAE_COMPOSITE_OPS can switch to candle's ops one by one (crates/kernels composite.rs
 * `SWITCHABLE_OPS`), all written after run 7 without a GPU; `sublayer_chain` goes back to its
 * links, each its own op, and `tape_backward` (not an op) to candle's backward.
 */
const NEW_OPS = ['conv_residual', 'masked_patch_mse', 'patch_blocks', 'restore_tokens', 'sublayer_chain', 'conv_weight_rows', 'tape_backward'];

/** The ops of NEW_OPS judged by their twin row's errors (the variant after the colon) rather than by tolerance. */
const JUDGED_BY_TWIN: Record<string, string> = { sublayer_chain: 'links', tape_backward: 'candle' };

/**
 * The headline row's retries, in order, each run only if the one before failed (not if it was
 * skipped): the gemm form of attention and AdamW per tensor (both ran on GPUs before), then
 * every switchable path written after run 7 without a GPU as before it (the flash kernels on
 * mma.sync, overlapped steps, the pinned transfers, the neighbour tables built on the GPU, the
 * ops of NEW_OPS, the sublayers' in-place backward, cuBLASLt's bias epilogues, the kernels'
 * vector forms).
 */
const RETRIES: { impl: string; env: Record<string, string> }[] = [
  { impl: 'ours-gemm-attention', env: { CONVMAE_ATTENTION: 'gemm', CONVMAE_ADAMW: 'per-tensor' } },
  {
    impl: 'ours-run7-paths',
    env: {
      CONVMAE_ATTENTION: 'gemm',
      CONVMAE_ADAMW: 'per-tensor',
      CONVMAE_FLASH_MMA: 'off',
      CONVMAE_STEPS: 'serial',
      CONVMAE_TRANSFERS: 'plain',
      CONVMAE_NEIGHBOUR_TABLES: 'host',
      CONVMAE_COMPOSITE_OPS: NEW_OPS.join(','),
      CONVMAE_SUBLAYER: 'composite',
      CONVMAE_GEMM_EPILOGUE: 'off',
      CONVMAE_VECTOR_KERNELS: 'off',
    },
  },
];

/** The host-time table of the rows that have one. */
function hostProfileLines(rows: Row[]): string[] {
  const timed = rows.filter((r) => r.host_ms);
  if (!timed.length) return [];
  const table = markdownTable(
    ['impl', 'precision', 'batch', 'ms/step', 'prepare', 'forward', 'backward', 'wait for the loss', 'optimizer'],
    timed.map((r) => {
      const h = r.host_ms!;
      return [r.impl, r.dtype, String(r.batch), fmt(r.ms_per_step_median), fmt(h.prepare), fmt(h.forward), fmt(h.backward), fmt(h.wait), fmt(h.optimizer)];
    }),
  );
  return [
    "Host time of a step by part (ms, medians of the timed steps; `CONVMAE_PROFILE=1`): preparing the batch, building and launching the forward and the backward, queueing the optimizer, and waiting for the loss (the device finishing the forward; with two steps queued, the next step's launch comes before this wait). A wait near zero means the GPU ran out of work before the host queued more.",
    '',
    table,
    '',
  ];
}

/**
 * The A/B rows that change only how the same ops are scheduled or differentiated (steps in
 * flight, steps finished one at a time, candle's backward instead of the tape, the compute
 * copies checked after each step): from the same seed and batches each must repeat the headline
 * row's losses to the bit, where both ran the same forms of attention (`auto` picks by timing,
 * per process). Run 7's rows compared throughput only; a tape that dropped a gradient would
 * have passed them.
 */
const SAME_TRAJECTORY = ['ours-in-flight-1', 'ours-serial-steps', 'ours-candle-backward', 'ours-copies-checked'];

/** Each SAME_TRAJECTORY row against the headline row of its batch: the same losses, or where they part. */
function trajectoryLines(rows: Row[]): string[] {
  const picks = (r: Row) => attentionPicks(r.choices ?? []);
  const lines: string[] = [];
  for (const r of rows.filter((x) => SAME_TRAJECTORY.includes(x.impl) && !x.error)) {
    const head = rows.find((h) => h.impl === 'ours' && h.batch === r.batch && h.dtype === r.dtype && h.path === r.path && !h.error);
    if (!head?.losses || !r.losses) {
      lines.push(`- \`${r.impl}\`: not compared (no losses${head ? '' : ' and no headline row'})`);
      continue;
    }
    if (picks(r) !== picks(head)) {
      lines.push(`- \`${r.impl}\`: not compared (its attention picks, ${picks(r) || 'none'}, are not the headline row's, ${picks(head) || 'none'})`);
      continue;
    }
    const k = r.losses.findIndex((l, i) => !Object.is(l, head.losses![i]));
    lines.push(
      k < 0 && r.losses.length === head.losses.length
        ? `- \`${r.impl}\`: the same ${r.losses.length} losses as \`ours\`, to the bit`
        : `- \`${r.impl}\`: DIFFERS from \`ours\` at step ${k < 0 ? Math.min(r.losses.length, head.losses.length) + 1 : k + 1} (${r.losses[k] ?? 'none'} against ${head.losses[k] ?? 'none'})`,
    );
  }
  if (!lines.length) return [];
  return ['Trajectories (losses of every step from the same seed and batches; these rows must repeat the headline row\'s to the bit):', '', ...lines, ''];
}

function autoChoiceLines(rows: Row[]): string[] {
  const withChoices = rows.filter((r) => r.choices?.length);
  if (!withChoices.length) return [];
  return ['Choices the addon made (attention by measuring, `CONVMAE_ATTENTION=auto`, the default; with `CONVMAE_PROFILE`, how the backward ran):', '', ...withChoices.flatMap((r) => r.choices!.map((c) => `- ${r.impl} ${r.dtype} b${r.batch}: ${c.replace(/^convmae: /, '')}`)), ''];
}

main().catch((e: unknown) => {
  // A bad flag (RangeError) is the user's to fix: its message says what. Anything else is a
  // fault of the check, whose stack the one-shot GPU run must bring back.
  process.stderr.write(`gpu check: ${e instanceof RangeError ? e.message : e instanceof Error ? e.stack : String(e)}\n`);
  process.exitCode = 1;
});
