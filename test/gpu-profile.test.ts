// The per-kernel profile of the GPU check (benches/gpu/profile.ts), without a GPU: the parser of
// ncu's CSV on a small table written the way ncu writes it, the aggregation and categories, the
// lookup of ncu, and the runner against a stand-in ncu (a Node script) for the normal, missing and
// timed-out cases. The PyTorch half (time_step.py --profile) runs on the CPU where torch is found.
import test from 'ava';
import { execFile } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { findTorch } from '../benches/pretrain.js';
import {
  findNcu,
  kernelCategory,
  launchesToEntries,
  NCU_OPTIONS,
  parseNcuRawCsv,
  profileMarkdown,
  runUnderNcu,
  splitCsvLine,
  summarizeKernels,
} from '../benches/gpu/profile.js';
import { ROOT } from './helpers.js';

// As ncu writes it with --csv --page raw --print-units base --metrics gpu__time_duration.sum:
// its progress lines, a header, a units row, one row per launch (every field quoted; template
// names and block sizes hold commas; large values with thousands separators).
const NCU_CSV = [
  '==PROF== Connected to process 4242 (/tmp/w/node)',
  '==PROF== Profiling "sdwconv_gather_k5_bf16" - 0: 0%....50%....100% - 1 pass',
  '==WARNING== Note: Running with uncontrolled GPU clocks.',
  '==PROF== Disconnected from process 4242',
  '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","gpu__time_duration.sum"',
  '"","","","","","","","","","","","nsecond"',
  '"0","4242","node","127.0.0.1","sdwconv_gather_k5_bf16","1","13","(256, 1, 1)","(1536, 1, 1)","0","9.0","12,500"',
  '"1","4242","node","127.0.0.1","void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>(T1::Params)","1","13","(128, 1, 1)","(96, 4, 1)","0","9.0","40,000"',
  '"2","4242","node","127.0.0.1","ucopy_bf16","1","13","(1024, 1, 1)","(300, 1, 1)","0","9.0","7,500"',
  '"3","4242","node","127.0.0.1","sdwconv_gather_k5_bf16","1","13","(256, 1, 1)","(1536, 1, 1)","0","9.0","12,500"',
  '"4","4242","node","127.0.0.1","nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","25000"',
  '"5","4242","node","127.0.0.1","adamw_f32","1","13","(256, 1, 1)","(2048, 1, 1)","0","9.0","2,500"',
  '"6","4242","node","127.0.0.1","curand_setup_kernel","1","13","(64, 1, 1)","(64, 1, 1)","0","9.0","n/a"',
].join('\n');

test('splitCsvLine keeps quoted commas and doubled quotes', (t) => {
  t.deepEqual(splitCsvLine('"a","(256, 1, 1)","say ""hi""",3'), ['a', '(256, 1, 1)', 'say "hi"', '3']);
  t.deepEqual(splitCsvLine('""'), ['']);
});

test('parseNcuRawCsv finds the columns by name, skips the units row and ==PROF== lines, keeps warnings', (t) => {
  const p = parseNcuRawCsv(NCU_CSV);
  t.true(p.header);
  t.is(p.unit, 'nsecond');
  t.deepEqual(
    p.launches.map((l) => [l.id, l.name.slice(0, 20), l.ns]),
    [
      [0, 'sdwconv_gather_k5_bf', 12500],
      [1, 'void cutlass::Kernel', 40000],
      [2, 'ucopy_bf16', 7500],
      [3, 'sdwconv_gather_k5_bf', 12500],
      [4, 'nvjet_tst_128x256_64', 25000],
      [5, 'adamw_f32', 2500],
    ],
  );
  t.is(p.skipped, 1, 'the "n/a" row is counted as skipped, not read as 0');
  t.deepEqual(p.messages, ['==WARNING== Note: Running with uncontrolled GPU clocks.']);
  t.deepEqual(p.profiledNames, ['sdwconv_gather_k5_bf16']);
});

test('parseNcuRawCsv scales other time units to ns and reads columns in any order', (t) => {
  const csv = ['"gpu__time_duration.sum","Kernel Name","ID"', '"usecond","",""', '"1.5","badd_f32","0"', '"2","badd_f32","1"'].join('\r\n');
  const p = parseNcuRawCsv(csv);
  t.deepEqual(p.launches, [
    { id: 0, name: 'badd_f32', ns: 1500 },
    { id: 1, name: 'badd_f32', ns: 2000 },
  ]);
});

test('parseNcuRawCsv on output without a table: no header, the error kept as the reason', (t) => {
  const p = parseNcuRawCsv('==PROF== Connected to process 1\n==ERROR== ERR_NVGPUCTRPERM - The user does not have permission\n{"suite":"pretrain"}\n');
  t.false(p.header);
  t.is(p.launches.length, 0);
  t.deepEqual(p.messages, ['==ERROR== ERR_NVGPUCTRPERM - The user does not have permission']);
});

test('summarizeKernels adds launches up by name, ranks them, and rolls them up by category', (t) => {
  const s = summarizeKernels(launchesToEntries(parseNcuRawCsv(NCU_CSV).launches), 3);
  t.is(s.total_us, 100);
  t.is(s.launches, 6);
  t.is(s.distinct_kernels, 5);
  t.deepEqual(
    s.top.map((k) => [k.name.slice(0, 14), k.calls, k.total_us, k.share, k.category]),
    [
      ['void cutlass::', 1, 40, 0.4, 'gemm (cuBLAS / CUTLASS)'],
      ['nvjet_tst_128x', 1, 25, 0.25, 'gemm (cuBLAS / CUTLASS)'],
      ['sdwconv_gather', 2, 25, 0.25, 'ours: depthwise conv'],
    ],
  );
  t.is(s.all.length, 5);
  t.deepEqual(
    s.categories.map((c) => [c.category, c.kernels, c.calls, c.total_us]),
    [
      ['gemm (cuBLAS / CUTLASS)', 2, 2, 65],
      ['ours: depthwise conv', 1, 2, 25],
      ['candle copy (strided / 2d)', 1, 1, 7.5],
      ['ours: adamw', 1, 1, 2.5],
    ],
  );
  t.is(Math.round(s.categories.reduce((a, c) => a + c.share, 0) * 1e9), 1e9);
  t.is(s.memory_activity_us, 0);
});

test('summarizeKernels on torch.profiler entries: copies and memsets are set apart from the kernels', (t) => {
  const s = summarizeKernels([
    { name: 'void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)', calls: 30, total_us: 300 },
    { name: 'sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas', calls: 10, total_us: 600 },
    { name: 'void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(int, float, c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, float*, c10::BFloat16*)', calls: 5, total_us: 100 },
    { name: 'Memcpy HtoD (Pageable -> Device)', calls: 1, total_us: 50 },
    { name: 'Memset (Device)', calls: 2, total_us: 1 },
  ]);
  t.is(s.total_us, 1000);
  t.is(s.launches, 45);
  t.is(s.memory_activity_us, 51);
  t.deepEqual(s.memory_activity.map((m) => m.name), ['Memcpy HtoD (Pageable -> Device)', 'Memset (Device)']);
  t.deepEqual(
    s.categories.map((c) => [c.category, c.share]),
    [
      ['gemm (cuBLAS / CUTLASS)', 0.6],
      ['torch elementwise', 0.3],
      ['torch reduce / norm / softmax', 0.1],
    ],
  );
});

test('kernelCategory: our kernels, candle 0.11, cuBLAS / cuDNN and PyTorch names', (t) => {
  const cases: [string, string][] = [
    ['sdwconv_gather_k5_bf16', 'ours: depthwise conv'],
    ['sdwconv_weight_partials_kany_f16', 'ours: depthwise conv'],
    ['dwconv_correlate_k7_f32', 'ours: depthwise conv'],
    ['dw_reduce_partials_bf16', 'ours: depthwise conv'],
    ['layer_norm_param_partials_bf16', 'ours: layernorm / softmax'],
    ['rows_reduce_partials_f32', 'ours: layernorm / softmax'],
    ['rows_broadcast_bf16', 'ours: linear bias'],
    ['column_sum_partials_f32', 'ours: linear bias'],
    ['softmax_fwd_bf16', 'ours: layernorm / softmax'],
    ['gelu_erf_bwd_bf16', 'ours: gelu'],
    ['adamw_f32', 'ours: adamw'],
    ['attention_fwd_hd64_bf16', 'ours: attention'],
    ['attention_bwd_q_hd32_f16', 'ours: attention'],
    ['attention_bwd_v_hd8_f32', 'ours: attention'],
    ['flash_fwd_hd32_bf16', 'ours: attention'],
    ['flash_bwd_kv_hd64_f16', 'ours: attention'],
    ['flash_mma_fwd_hd32_bf16', 'ours: attention'],
    ['flash_mma_bwd_kv_hd64_f16', 'ours: attention'],
    ['visible_neighbors', 'ours: depthwise conv'],
    ['patch_mse_rows_bf16', 'ours: loss'],
    ['patch_mse_bwd_f32', 'ours: loss'],
    ['patch_mse_total', 'ours: loss'],
    ['attention_to_heads_bf16', 'ours: attention'],
    ['scores_softmax_bwd_f32', 'ours: attention'],
    ['adamw_many_f32', 'ours: adamw'],
    ['sdwconv_gather_lanes_k5_bf16', 'ours: depthwise conv'],
    ['sdwconv_weight_partials_lanes_k5_bf16', 'ours: depthwise conv'],
    ['dw_taps_major_bf16', 'ours: depthwise conv'],
    ['layer_norm_bwd_input_add_bf16', 'ours: layernorm / softmax'],
    ['rows_add_broadcast_bf16', 'ours: linear bias'],
    ['add_bf16', 'ours: element-wise'],
    ['normalize_rgb_u8', 'ours: element-wise'],
    ['void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>(Flash_fwd_params)', 'torch fused attention'],
    ['fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>::Params)', 'torch fused attention'],
    ['ucopy_bf16', 'candle copy (strided / 2d)'],
    ['copy2d_f32', 'candle copy (strided / 2d)'],
    ['cast_f32_bf16', 'candle cast'],
    ['bmul_bf16', 'candle elementwise'],
    ['affine_f32', 'candle elementwise'],
    ['where_u8_f32', 'candle elementwise'],
    ['ugelu_erf_f32', 'candle elementwise'],
    ['const_set_bf16', 'candle elementwise'],
    ['fast_sum_f32', 'candle reduce / norm'],
    ['softmax_f32', 'candle reduce / norm'],
    ['is_u32_bf16', 'candle indexing'],
    ['gather_i64_f32', 'candle indexing'],
    ['im2col_bf16', 'candle conv / pool'],
    ['sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc', 'conv (cuDNN / torch)'],
    ['void at::native::conv_depthwise2d_forward_kernel<5, c10::BFloat16, int>(...)', 'conv (cuDNN / torch)'],
    ['nvjet_tst_64x8_64x16_4x1_v_bz_TNT', 'gemm (cuBLAS / CUTLASS)'],
    ['void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>(cublasSplitKParams<float>, ...)', 'gemm (cuBLAS / CUTLASS)'],
    ['void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<4>, ...>', 'torch optimizer'],
    ['void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, at::native::sum_functor<float, float, float>::operator()>, unsigned int, float, 4, 4> >(...)', 'torch reduce / norm / softmax'],
    ['void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}, ...>', 'torch copy / index / cat'],
    ['void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(...)>', 'torch elementwise'],
    ['curand_setup_kernel', 'other'],
  ];
  for (const [name, category] of cases) t.is(kernelCategory(name), category, name);
});

test('findNcu: an explicit path that is not there, an empty PATH, and a found binary', (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ncu-find-'));
  try {
    t.regex(findNcu({ explicit: path.join(dir, 'ncu') }).reason ?? '', /not an executable file/);
    const none = findNcu({ pathEnv: dir, locations: [path.join(dir, 'nope', 'ncu')] });
    t.is(none.path, undefined);
    t.regex(none.reason ?? '', /ncu not found on PATH nor at .*nope\/ncu/);
    writeFileSync(path.join(dir, 'ncu'), '#!/bin/sh\n');
    chmodSync(path.join(dir, 'ncu'), 0o755);
    t.is(findNcu({ pathEnv: `/nonexistent${path.delimiter}${dir}`, locations: [] }).path, path.join(dir, 'ncu'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('runUnderNcu without ncu records the reason and the command instead of failing', async (t) => {
  const r = await runUnderNcu({ ncu: findNcu({ pathEnv: '', locations: [] }), app: process.execPath, appArgs: ['worker.js', '--batch', '64'], logFile: '/tmp/never-written.csv', timeoutS: 5 });
  t.is(r.status, 'skipped');
  t.regex(r.reason ?? '', /^ncu not found/);
  t.regex(r.command, /^ncu --target-processes all --profile-from-start off --clock-control none .* --log-file \/tmp\/never-written\.csv .*worker\.js --batch 64$/);
  t.is(r.summary, undefined);
});

/**
 * A stand-in for ncu: runs the application given after `--log-file FILE` (as ncu does), passes
 * its stdout on, and once it has exited writes $FAKE_NCU_CSV to FILE (ncu prints its table when
 * the application ends). It records its own arguments in $FAKE_NCU_ARGS.
 */
function fakeNcu(dir: string): string {
  const file = path.join(dir, 'ncu');
  writeFileSync(
    file,
    `#!${process.execPath}
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const args = process.argv.slice(2);
fs.writeFileSync(process.env.FAKE_NCU_ARGS, JSON.stringify(args));
const i = args.indexOf('--log-file');
const app = spawn(args[i + 2], args.slice(i + 3), { stdio: ['ignore', 'inherit', 'inherit'] });
app.on('close', (code) => {
  fs.writeFileSync(args[i + 1], fs.readFileSync(process.env.FAKE_NCU_CSV, 'utf8'));
  process.exit(code ?? 0);
});
`,
  );
  chmodSync(file, 0o755);
  return file;
}

test('runUnderNcu runs the application under ncu and summarizes the table ncu wrote', async (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ncu-run-'));
  try {
    const env = { ...process.env, FAKE_NCU_CSV: path.join(dir, 'fixture.csv'), FAKE_NCU_ARGS: path.join(dir, 'args.json') };
    writeFileSync(env.FAKE_NCU_CSV, NCU_CSV);
    const logFile = path.join(dir, 'log.csv');
    const app = ['-e', 'console.log("starting"); console.log(JSON.stringify({ suite: "pretrain", batch: 64 }))'];
    const r = await runUnderNcu({ ncu: { path: fakeNcu(dir) }, app: process.execPath, appArgs: app, logFile, timeoutS: 60, env });
    t.is(r.status, 'ok', r.reason);
    t.is(r.exit_code, 0);
    t.deepEqual(r.app_json, { suite: 'pretrain', batch: 64 });
    t.is(r.summary?.total_us, 100);
    t.is(r.summary?.launches, 6);
    t.is(r.parse?.unit, 'nsecond');
    t.deepEqual(JSON.parse(readFileSync(env.FAKE_NCU_ARGS, 'utf8')), [...NCU_OPTIONS, '--log-file', logFile, process.execPath, ...app]);
    t.true(NCU_OPTIONS.includes('--print-units') && NCU_OPTIONS.includes('gpu__time_duration.sum'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('runUnderNcu past its time limit stops the application, still reads what ncu wrote, and says it timed out', async (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ncu-cap-'));
  try {
    const env = { ...process.env, FAKE_NCU_CSV: path.join(dir, 'fixture.csv'), FAKE_NCU_ARGS: path.join(dir, 'args.json') };
    writeFileSync(env.FAKE_NCU_CSV, NCU_CSV);
    const started = Date.now();
    const r = await runUnderNcu({ ncu: { path: fakeNcu(dir) }, app: process.execPath, appArgs: ['-e', 'setTimeout(() => {}, 60000)'], logFile: path.join(dir, 'log.csv'), timeoutS: 1, env });
    t.true(Date.now() - started < 15_000, 'the application was stopped, not waited for');
    t.is(r.status, 'timed_out');
    t.regex(r.reason ?? '', /timed out after 1 s \(6 launches read\)/);
    t.is(r.summary?.launches, 6);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('runUnderNcu when ncu fails before any table: failed, with ncu\'s error as the reason', async (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ncu-err-'));
  try {
    const env = { ...process.env, FAKE_NCU_CSV: path.join(dir, 'fixture.csv'), FAKE_NCU_ARGS: path.join(dir, 'args.json') };
    writeFileSync(env.FAKE_NCU_CSV, '==PROF== Connected to process 7\n==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance Counters\n');
    const r = await runUnderNcu({ ncu: { path: fakeNcu(dir) }, app: process.execPath, appArgs: ['-e', 'process.exit(0)'], logFile: path.join(dir, 'log.csv'), timeoutS: 30, env });
    t.is(r.status, 'failed');
    t.regex(r.reason ?? '', /^exit 0: ==ERROR== ERR_NVGPUCTRPERM/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('profileMarkdown: the section, both commands, the category table and the top kernels', (t) => {
  const ours = summarizeKernels(launchesToEntries(parseNcuRawCsv(NCU_CSV).launches));
  const torch = summarizeKernels([{ name: 'nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT', calls: 4, total_us: 80 }, { name: 'Memcpy HtoD (Pageable -> Device)', calls: 1, total_us: 30 }]);
  const md = profileMarkdown({
    workload: 'One step.',
    ours: { status: 'ok', command: 'ncu --metrics gpu__time_duration.sum node worker.js', summary: ours },
    pytorch: { status: 'ok', command: 'python3 time_step.py --profile', torch: '2.11.0', summary: torch },
  });
  t.regex(md, /^## Per-kernel profile\n\nOne step\.\n/);
  t.regex(md, /ours \(ncu\): ok\. Command: `ncu --metrics gpu__time_duration\.sum node worker\.js`/);
  t.regex(md, /PyTorch \(torch\.profiler, torch 2\.11\.0\): ok\. Command: `python3 time_step\.py --profile`/);
  t.regex(md, /\| gemm \(cuBLAS \/ CUTLASS\) \| 0\.07 \| 65\.0% \| 2 \| 0\.08 \| 100\.0% \| 4 \|/);
  t.regex(md, /\| \*\*total\*\* \| \*\*0\.10\*\* \|  \| 6 \| \*\*0\.08\*\* \|  \| 4 \|/);
  t.regex(md, /memory copies \/ sets besides .*: 0\.03 ms/);
  t.regex(md, /### Top 5 kernels, ours \(of 5 distinct, 6 launches\)/);
  t.regex(md, /\| `sdwconv_gather_k5_bf16` \| ours: depthwise conv \| 2 \| 0\.03 \| 25\.0% \| 12\.5 \|/);
  t.regex(md, /### Top 1 kernels, PyTorch/);
});

test('profileMarkdown after a cut ncu run lists the launches it saw', (t) => {
  const md = profileMarkdown({ workload: 'w', ours: { status: 'timed_out', reason: 'timed out after 150 s (0 launches read)', command: 'ncu x', profiled_counts: [{ name: 'adamw_f32', calls: 300 }] } });
  t.regex(md, /ours \(ncu\): timed_out \(timed out after 150 s/);
  t.regex(md, /\| `adamw_f32` \| ours: adamw \| 300 \|/);
  t.notRegex(md, /GPU time by kind/);
});

const torch = findTorch();
(torch.reason ? test.skip : test)('time_step.py --profile adds the kernel table to its JSON line (CPU: no device events)', async (t) => {
  const { stdout } = await promisify(execFile)(torch.python, [path.join(ROOT, 'benches', 'baselines', 'time_step.py'), '--preset', 'convmae-tiny', '--batch', '2', '--warmup', '0', '--steps', '1', '--threads', '1', '--profile'], { timeout: 120_000 });
  const line = JSON.parse(stdout.trim().split('\n').filter((l) => l.startsWith('{')).at(-1)!) as Record<string, unknown>;
  t.like(line, { impl: 'pytorch', preset: 'convmae-tiny', batch: 2, steps: 1 });
  const profile = line.profile as { kernels: unknown[]; step_ms: number };
  t.deepEqual(profile.kernels, []);
  t.true(profile.step_ms > 0);
});
