/**
 * The per-kernel profile of the GPU check (`check.js --profile`): where the GPU time of one
 * pretraining step goes, for ours and for PyTorch, by kernel and by kind of kernel.
 *
 * Ours: the pretraining worker (one warmup step, then one profiled sparse bf16 step of
 * convmae-base, bracketed by cuProfilerStart / cuProfilerStop: CONVMAE_CUDA_PROFILE_STEP) under
 * Nsight Compute, one metric (gpu__time_duration.sum) per kernel launch, printed as CSV (the
 * "raw" page: one row per launch). Nsight Systems would be the lighter tool, but the GPU machine
 * has only ncu. ncu serializes launches and times each on its own, so the sum is the GPU-busy
 * time of the step without overlap, and launch gaps (host overhead) are not in it.
 * PyTorch: benches/baselines/time_step.py --profile, torch.profiler over one step after warmup,
 * which reports each CUDA kernel's total device time and calls.
 *
 * Everything that needs a GPU lives in runOursUnderNcu / check.ts; the parsing, the aggregation
 * and the lookup of ncu are plain functions, tested in test/gpu-profile.test.ts.
 */
import { spawn } from 'node:child_process';
import { accessSync, constants, existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { markdownTable } from '../lib.js';

// ---------------------------------------------------------------------------------------------
// CSV

/** Splits one CSV line (RFC 4180 quoting: "a,b" is one field, "" inside quotes is a quote). */
export function splitCsvLine(line: string): string[] {
  const fields: string[] = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quoted) {
      if (c === '"' && line[i + 1] === '"') {
        field += '"';
        i++;
      } else if (c === '"') {
        quoted = false;
      } else {
        field += c;
      }
    } else if (c === '"') {
      quoted = true;
    } else if (c === ',') {
      fields.push(field);
      field = '';
    } else {
      field += c;
    }
  }
  fields.push(field);
  return fields;
}

/** Nanoseconds per unit, for the units ncu prints for a duration (base "nsecond" with --print-units base). */
const NS_PER_UNIT: Record<string, number> = {
  nsecond: 1,
  ns: 1,
  usecond: 1e3,
  us: 1e3,
  msecond: 1e6,
  ms: 1e6,
  second: 1e9,
  s: 1e9,
};

/** A metric value as ncu prints it: "4,712" (thousands separators in the en locale), "1.5e+03", "n/a". */
export function parseNcuNumber(text: string): number {
  const t = text.trim().replace(/,/g, '');
  if (t === '' || !/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(t)) return NaN;
  return Number(t);
}

export interface NcuLaunch {
  /** ncu's launch ID (per process, in launch order) when the column is there. */
  id?: number;
  name: string;
  ns: number;
}

export interface NcuParse {
  launches: NcuLaunch[];
  /** The duration column's unit as printed (from the units row), when there was one. */
  unit?: string;
  /** Whether the header row was found at all. */
  header: boolean;
  /** ncu's own "==ERROR==" / "==WARNING==" lines (the reason when no rows came out). */
  messages: string[];
  /** Kernel names from "==PROF== Profiling "name" ..." progress lines, one per launch: what was
   *  profiled even when the run was cut before ncu printed its table. */
  profiledNames: string[];
  /** Data rows that did not parse (wrong field count, no duration). */
  skipped: number;
}

const DURATION_METRIC = 'gpu__time_duration.sum';

/**
 * Parses what `ncu --csv --page raw --metrics gpu__time_duration.sum` writes: a header row with
 * "ID", "Kernel Name", ..., "gpu__time_duration.sum" (one column per metric), then a units row
 * (empty identification fields, the metrics' units), then one row per kernel launch. Columns are
 * found by header name, so the other columns (their number changes across ncu versions) do not
 * matter. Lines that are not CSV (ncu's "==PROF==" progress, the application's own output when
 * both go to one stream) are skipped; "==ERROR==" / "==WARNING==" lines are kept as messages.
 */
export function parseNcuRawCsv(text: string): NcuParse {
  const out: NcuParse = { launches: [], header: false, messages: [], profiledNames: [], skipped: 0 };
  let nameCol = -1;
  let timeCol = -1;
  let idCol = -1;
  let width = 0;
  let scale = 1;
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (line === '') continue;
    if (line.startsWith('==')) {
      const prof = /^==PROF== Profiling "(.*)" - \d+/.exec(line);
      if (prof) out.profiledNames.push(prof[1]);
      else if (/^==(ERROR|WARNING)==/.test(line)) out.messages.push(line);
      continue;
    }
    // CSV rows from ncu quote every field; anything else is not ours to read.
    if (!line.startsWith('"')) continue;
    const fields = splitCsvLine(line);
    if (nameCol < 0) {
      const name = fields.findIndex((f) => f === 'Kernel Name' || f === 'Function Name');
      const time = fields.indexOf(DURATION_METRIC);
      if (name >= 0 && time >= 0) {
        nameCol = name;
        timeCol = time;
        idCol = fields.indexOf('ID');
        width = fields.length;
        out.header = true;
      }
      continue;
    }
    if (fields.length !== width) {
      out.skipped++;
      continue;
    }
    // The units row: no kernel name, the unit under each metric.
    if (fields[nameCol] === '' && (idCol < 0 || fields[idCol] === '')) {
      const unit = fields[timeCol].trim();
      out.unit = unit;
      const s = NS_PER_UNIT[unit];
      if (s === undefined) out.messages.push(`profile: unknown unit "${unit}" for ${DURATION_METRIC}, read as nanoseconds`);
      scale = s ?? 1;
      continue;
    }
    const value = parseNcuNumber(fields[timeCol]);
    if (!fields[nameCol] || !Number.isFinite(value)) {
      out.skipped++;
      continue;
    }
    const launch: NcuLaunch = { name: fields[nameCol], ns: value * scale };
    if (idCol >= 0 && fields[idCol] !== '') launch.id = Number(fields[idCol]);
    out.launches.push(launch);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Categories

/**
 * Kinds of kernel, by name, first match wins. Ours are the extern "C" names of
 * crates/kernels/cuda/*.cu (instantiated per dtype by CONVMAE_FOR_EACH_TYPE: <name>_f32 / _bf16 /
 * _f16; the depthwise ones also per kernel size: _k3 / _k5 / _k7 / _kany). candle's are those of
 * candle-kernels 0.11 (src/*.cu: <op>_<dtype>, e.g. ucopy_bf16, bmul_f32, cast_f32_bf16,
 * where_u8_f32). The PyTorch ones are C++ templates under at:: (and cuDNN / cuBLAS names), so
 * each PyTorch category asks for a torch namespace first. Names not matched are "other".
 * Keep this list in step with the .cu files when kernels are added or renamed.
 */
export const KERNEL_CATEGORIES: { category: string; pattern: RegExp }[] = [
  { category: 'ours: depthwise conv', pattern: /^((sdwconv_gather|sdwconv_weight_partials|dwconv_correlate|dwconv_weight_partials|dw_reduce_partials|dw_taps_major)_|visible_neighbors$)/ },
  { category: 'ours: layernorm / softmax', pattern: /^(layer_norm_fwd|layer_norm_stats|layer_norm_bwd_input|layer_norm_param_partials|rows_reduce_partials|softmax_fwd|softmax_bwd)_/ },
  // The fused linear op's own kernels; its gemms are cuBLAS and land under gemm below.
  { category: 'ours: linear bias', pattern: /^(rows_broadcast|rows_add_broadcast|column_sum_partials)_/ },
  { category: 'ours: gelu', pattern: /^gelu_erf_(fwd|bwd)_/ },
  { category: 'ours: adamw', pattern: /^adamw_/ },
  // All three forms: the fused kernels, the flash kernels (wmma and mma.sync; before PyTorch's
  // "flash" below), and the gemm form's own kernels around its cuBLAS gemms.
  { category: 'ours: attention', pattern: /^(attention_(fwd|bwd_q|bwd_k|bwd_v)_hd\d+|flash_(mma_)?(fwd|bwd_q|bwd_kv)_hd\d+|attention_(to|from)_heads|scores_softmax_(fwd|bwd))_/ },
  { category: 'ours: element-wise', pattern: /^(add|normalize_rgb)_/ },
  { category: 'ours: loss', pattern: /^(patch_mse_(rows|bwd)_|patch_mse_total$)/ },
  { category: 'candle copy (strided / 2d)', pattern: /^(ucopy|copy2d)_/ },
  { category: 'candle cast', pattern: /^cast_/ },
  {
    category: 'candle elementwise',
    pattern:
      /^(u(abs|ceil|cos|elu|erf|exp|floor|gelu|gelu_erf|log|neg|normcdf|powf|recip|relu|round|sigmoid|sign|silu|sin|sqr|sqrt|tanh)|b(add|sub|mul|div|maximum|minimum)|affine|where|fill|const_set|eq|ne|lt|le|gt|ge)_/,
  },
  { category: 'candle reduce / norm', pattern: /^(sum|fast_sum|fast_sum_small|fast_max|fast_min|fast_argmax|fast_argmin|softmax|layernorm|rmsnorm|rope|rope_i|rope_thd|asort_asc|asort_desc)_/ },
  { category: 'candle indexing', pattern: /^(is|ia|s|sa|gather)_(u8|u32|i16|i32|i64)_/ },
  { category: 'candle conv / pool', pattern: /^(conv1d|conv2d|conv_transpose1d|conv_transpose2d|im2col|im2col1d|col2im1d|avg_pool2d|max_pool2d|upsample_nearest2d|upsample_bilinear2d)_/ },
  // PyTorch's fused attention (what torch.compile's pattern matcher may put in): flash / memory-efficient SDPA,
  // before GEMMs (the memory-efficient kernels are CUTLASS-based).
  { category: 'torch fused attention', pattern: /flash|fmha|efficient_attention|attention_kernel/i },
  // cuDNN's and PyTorch's convolutions (implicit GEMMs included) before GEMMs, so "fprop_implicit_gemm" is a conv.
  { category: 'conv (cuDNN / torch)', pattern: /conv(?!ert)|fprop|dgrad|wgrad|depthwise/i },
  // cuBLAS / cuBLASLt / CUTLASS: sm90_xmma_gemm_*, nvjet_* (Hopper cuBLASLt), cutlass::Kernel2<...gemm...>, gemv, split-K reduction.
  { category: 'gemm (cuBLAS / CUTLASS)', pattern: /gemm|gemv|nvjet|xmma|cutlass|cublas|splitKreduce/i },
  { category: 'torch optimizer', pattern: /(\bat::|c10::).*(multi_tensor_apply|adam)|multi_tensor_apply_kernel|fused_adam/i },
  { category: 'torch reduce / norm / softmax', pattern: /(\bat::|c10::|cunn_).*(norm|softmax|reduce)|cunn_SoftMax/i },
  { category: 'torch copy / index / cat', pattern: /(\bat::|c10::).*(copy|cat|index|gather|scatter|transpose|permute)/i },
  { category: 'torch elementwise', pattern: /(\bat::|c10::).*(elementwise|vectorized|unrolled)/i },
];

export function kernelCategory(name: string): string {
  for (const { category, pattern } of KERNEL_CATEGORIES) if (pattern.test(name)) return category;
  return 'other';
}

/** Device work that is no kernel (torch.profiler lists copies and memsets; ncu sees kernels only). */
export function isMemoryActivity(name: string): boolean {
  return /^(Memcpy|Memset)\b/.test(name);
}

// ---------------------------------------------------------------------------------------------
// Aggregation

/** One kernel name's total: `calls` launches taking `total_us` of GPU time together. */
export interface KernelEntry {
  name: string;
  calls: number;
  total_us: number;
}

export interface KernelRow extends KernelEntry {
  category: string;
  /** Of the side's kernel total. */
  share: number;
  mean_us: number;
}

export interface CategoryRow {
  category: string;
  kernels: number;
  calls: number;
  total_us: number;
  share: number;
}

export interface KernelSummary {
  /** Sum of all kernels' GPU time (memory copies / sets excluded), microseconds. */
  total_us: number;
  launches: number;
  distinct_kernels: number;
  /** The `top` kernels by total time. */
  top: KernelRow[];
  /** Every category with any time, largest first. */
  categories: CategoryRow[];
  /** Every kernel name (for profile.json; the markdown shows `top`). */
  all: KernelRow[];
  /** Memcpy / memset activity, when the source reports it (torch.profiler does, ncu does not). */
  memory_activity: KernelEntry[];
  memory_activity_us: number;
}

/** Sums entries with the same name, splits off memory activity, ranks kernels and categories. */
export function summarizeKernels(entries: KernelEntry[], top = 25): KernelSummary {
  const byName = new Map<string, KernelEntry>();
  const memory = new Map<string, KernelEntry>();
  for (const e of entries) {
    if (!Number.isFinite(e.total_us)) continue;
    const into = isMemoryActivity(e.name) ? memory : byName;
    const k = into.get(e.name) ?? { name: e.name, calls: 0, total_us: 0 };
    k.calls += e.calls;
    k.total_us += e.total_us;
    into.set(e.name, k);
  }
  const kernels = [...byName.values()];
  const total = kernels.reduce((a, k) => a + k.total_us, 0);
  const share = (us: number) => (total > 0 ? us / total : 0);
  const all: KernelRow[] = kernels
    .map((k) => ({ ...k, category: kernelCategory(k.name), share: share(k.total_us), mean_us: k.calls > 0 ? k.total_us / k.calls : 0 }))
    .sort((a, b) => b.total_us - a.total_us || a.name.localeCompare(b.name));
  const cats = new Map<string, CategoryRow>();
  for (const k of all) {
    const c = cats.get(k.category) ?? { category: k.category, kernels: 0, calls: 0, total_us: 0, share: 0 };
    c.kernels++;
    c.calls += k.calls;
    c.total_us += k.total_us;
    cats.set(k.category, c);
  }
  const categories = [...cats.values()].map((c) => ({ ...c, share: share(c.total_us) })).sort((a, b) => b.total_us - a.total_us);
  const memoryActivity = [...memory.values()].sort((a, b) => b.total_us - a.total_us);
  return {
    total_us: total,
    launches: all.reduce((a, k) => a + k.calls, 0),
    distinct_kernels: all.length,
    top: all.slice(0, top),
    categories,
    all,
    memory_activity: memoryActivity,
    memory_activity_us: memoryActivity.reduce((a, k) => a + k.total_us, 0),
  };
}

/** ncu launches -> one entry per launch (summarizeKernels adds them up by name). */
export function launchesToEntries(launches: NcuLaunch[]): KernelEntry[] {
  return launches.map((l) => ({ name: l.name, calls: 1, total_us: l.ns / 1000 }));
}

// ---------------------------------------------------------------------------------------------
// Finding and running ncu

function isExecutableFile(p: string): boolean {
  try {
    accessSync(p, constants.X_OK);
    return statSync(p).isFile();
  } catch {
    return false;
  }
}

/** Versioned install folders matching `<dir>/<prefix>*`, newest version first. */
function versionedDirs(dir: string, prefix: string): string[] {
  try {
    return readdirSync(dir)
      .filter((n) => n.startsWith(prefix))
      .sort((a, b) => b.localeCompare(a, undefined, { numeric: true }))
      .map((n) => path.join(dir, n));
  } catch {
    return [];
  }
}

/** Where ncu usually is when it is not on PATH: the CUDA toolkit's bin and Nsight Compute's own installs. */
export function defaultNcuLocations(): string[] {
  return [
    '/usr/local/cuda/bin/ncu',
    ...versionedDirs('/usr/local', 'cuda-').map((d) => path.join(d, 'bin', 'ncu')),
    ...versionedDirs('/opt/nvidia/nsight-compute', '').map((d) => path.join(d, 'ncu')),
    ...versionedDirs('/usr/local/cuda', 'nsight-compute-').map((d) => path.join(d, 'ncu')),
  ];
}

export interface NcuLookup {
  path?: string;
  /** Why there is none (what was looked at). */
  reason?: string;
}

/**
 * Finds ncu: `explicit` when given (the --ncu flag or CONVMAE_NCU; no fallback, so a wrong path
 * says so), else the first `ncu` on `pathEnv`, else the first of `locations`.
 */
export function findNcu(opts: { explicit?: string; pathEnv?: string; locations?: string[] } = {}): NcuLookup {
  if (opts.explicit) {
    return isExecutableFile(opts.explicit) ? { path: opts.explicit } : { reason: `ncu not found: ${opts.explicit} is not an executable file` };
  }
  const onPath = (opts.pathEnv ?? process.env.PATH ?? '')
    .split(path.delimiter)
    .filter((d) => d !== '')
    .map((d) => path.join(d, 'ncu'));
  const locations = opts.locations ?? defaultNcuLocations();
  const hit = [...onPath, ...locations].find(isExecutableFile);
  if (hit) return { path: hit };
  return { reason: `ncu not found on PATH nor at ${locations.length ? locations.join(', ') : '(no other locations)'}` };
}

/**
 * The environment that makes the pretraining worker bracket its second step (after one warmup
 * step) with cuProfilerStart / cuProfilerStop (crates/convmae-core/src/device.rs).
 */
export const PROFILED_STEP_ENV = { CONVMAE_CUDA_PROFILE_STEP: '2' };

/** The ncu options of the profile (see check.ts and docs/cuda.md for why each). */
export const NCU_OPTIONS = [
  '--target-processes', 'all',
  // Only what runs between the addon's cuProfilerStart and cuProfilerStop: the one step that
  // CONVMAE_CUDA_PROFILE_STEP names (PROFILED_STEP_ENV below), not model creation or warmup.
  '--profile-from-start', 'off',
  // Clocks as a normal run has them (ncu locks them to base by default).
  '--clock-control', 'none',
  // Caches as a normal run leaves them (ncu flushes them before every launch by default).
  '--cache-control', 'none',
  '--metrics', DURATION_METRIC,
  '--csv',
  '--page', 'raw',
  '--print-units', 'base',
];

/** Pids of `pid`'s descendants, from /proc (Linux), children before grandchildren. */
export function descendantPids(pid: number): number[] {
  const parentOf = new Map<number, number>();
  try {
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      try {
        const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so read after the last ')'.
        const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
        parentOf.set(Number(entry), ppid);
      } catch {
        /* the process ended meanwhile */
      }
    }
  } catch {
    return [];
  }
  const out: number[] = [];
  const queue = [pid];
  while (queue.length) {
    const p = queue.shift()!;
    for (const [child, parent] of parentOf) {
      if (parent === p && !out.includes(child)) {
        out.push(child);
        queue.push(child);
      }
    }
  }
  return out;
}

export interface NcuRunResult {
  status: 'ok' | 'skipped' | 'timed_out' | 'failed';
  reason?: string;
  /** The command line, as it ran (for the report). */
  command: string;
  ncu?: string;
  exit_code?: number | null;
  wall_s?: number;
  /** The application's last JSON stdout line (the worker's report), when it printed one. */
  app_json?: Record<string, unknown>;
  parse?: Omit<NcuParse, 'launches' | 'profiledNames'> & { launches: number; profiled_launches: number };
  summary?: KernelSummary;
  /** When no table came back: launch counts per name from ncu's progress lines (no times). */
  profiled_counts?: { name: string; calls: number }[];
  stderr_tail?: string;
}

/** ncu's arguments: NCU_OPTIONS, the log file its table goes to, then the application. */
export function ncuArgs(logFile: string, app: string, appArgs: string[]): string[] {
  return [...NCU_OPTIONS, '--log-file', logFile, app, ...appArgs];
}

export function shellQuote(args: string[]): string {
  return args.map((s) => (/^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`)).join(' ');
}

/**
 * Runs `<ncu> NCU_OPTIONS --log-file <logFile> <app> <appArgs>` and reads the table ncu writes to
 * the log file. After `timeoutS` the application (ncu's descendants) gets SIGTERM, so that ncu
 * can still write what it profiled; 20 s later anything left of the process group is killed.
 * Either way the rows in the log file are read, and the result says it timed out.
 */
export function runUnderNcu(opts: {
  ncu: NcuLookup;
  app: string;
  appArgs: string[];
  logFile: string;
  timeoutS: number;
  env?: NodeJS.ProcessEnv;
  top?: number;
}): Promise<NcuRunResult> {
  const args = ncuArgs(opts.logFile, opts.app, opts.appArgs);
  const command = shellQuote([opts.ncu.path ?? 'ncu', ...args]);
  if (!opts.ncu.path) return Promise.resolve({ status: 'skipped', reason: opts.ncu.reason ?? 'ncu not found', command });
  const ncuPath = opts.ncu.path;
  const started = Date.now();
  return new Promise((resolve) => {
    // Its own process group, so that the group can be killed without killing us.
    const p = spawn(ncuPath, args, { env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    let killTimer: NodeJS.Timeout | undefined;
    p.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    p.stderr.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-20_000)));
    const timer = setTimeout(() => {
      timedOut = true;
      for (const pid of p.pid ? descendantPids(p.pid) : []) {
        try {
          process.kill(pid, 'SIGTERM');
        } catch {
          /* gone already */
        }
      }
      killTimer = setTimeout(() => {
        try {
          if (p.pid) process.kill(-p.pid, 'SIGKILL');
        } catch {
          /* gone already */
        }
      }, 20_000);
    }, opts.timeoutS * 1000);
    const finish = (code: number | null, spawnError?: Error) => {
      clearTimeout(timer);
      if (killTimer) clearTimeout(killTimer);
      const result: NcuRunResult = { status: 'ok', command, ncu: ncuPath, exit_code: code, wall_s: (Date.now() - started) / 1000 };
      let appJson: Record<string, unknown> | undefined;
      for (const line of stdout.trim().split('\n').reverse()) {
        if (!line.startsWith('{')) continue;
        try {
          appJson = JSON.parse(line) as Record<string, unknown>;
          break;
        } catch {
          /* not the report line */
        }
      }
      if (appJson) result.app_json = appJson;
      // ncu writes its table to the log file; stdout only in case a version printed it there
      // instead (never both: the rows would count twice).
      const log = existsSync(opts.logFile) ? readFileSync(opts.logFile, 'utf8') : '';
      let parsed = parseNcuRawCsv(log);
      if (!parsed.header) {
        const fromStdout = parseNcuRawCsv(stdout);
        if (fromStdout.header) parsed = { ...fromStdout, messages: [...parsed.messages, ...fromStdout.messages], profiledNames: parsed.profiledNames.length ? parsed.profiledNames : fromStdout.profiledNames };
      }
      const { launches, profiledNames, ...rest } = parsed;
      result.parse = { ...rest, launches: launches.length, profiled_launches: profiledNames.length };
      if (launches.length) result.summary = summarizeKernels(launchesToEntries(launches), opts.top ?? 25);
      else if (profiledNames.length) {
        const counts = new Map<string, number>();
        for (const n of profiledNames) counts.set(n, (counts.get(n) ?? 0) + 1);
        result.profiled_counts = [...counts].map(([name, calls]) => ({ name, calls })).sort((a, b) => b.calls - a.calls);
      }
      const tail = stderr.trim().split('\n').slice(-5).join(' | ');
      if (tail) result.stderr_tail = tail;
      if (spawnError) {
        result.status = 'failed';
        result.reason = `could not start ${ncuPath}: ${spawnError.message}`;
      } else if (timedOut) {
        result.status = 'timed_out';
        result.reason = `timed out after ${opts.timeoutS} s (${launches.length} launches read)`;
      } else if (code !== 0 || launches.length === 0) {
        // A failed application still leaves the launches ncu timed before it ended: kept, but
        // the result says the run failed.
        result.status = 'failed';
        const error = parsed.messages.find((m) => m.startsWith('==ERROR=='));
        const why = error ?? (launches.length ? `${launches.length} launches read` : parsed.header ? 'no kernel rows' : 'no ncu table in the output');
        result.reason = `exit ${code}: ${why}${tail ? ` (stderr: ${tail})` : ''}`;
      }
      resolve(result);
    };
    p.on('error', (e) => finish(null, e));
    p.on('close', (code) => finish(code));
  });
}

// ---------------------------------------------------------------------------------------------
// The report

export interface TorchProfileResult {
  status: 'ok' | 'skipped' | 'timed_out' | 'failed';
  reason?: string;
  command: string;
  torch?: string;
  /** The attribute the kernel times came from (device_time_total vs cuda_time_total across torch versions). */
  time_attr?: string;
  step_ms?: number;
  summary?: KernelSummary;
}

export interface ProfileReport {
  /** What was profiled, in words. */
  workload: string;
  ours: NcuRunResult;
  pytorch?: TorchProfileResult;
}

const ms = (us: number) => (us / 1000).toFixed(us >= 100_000 ? 0 : us >= 10_000 ? 1 : 2);
const pct = (x: number) => `${(x * 100).toFixed(1)}%`;
/** A kernel name fit for a markdown cell: pipes escaped, long C++ template names cut. */
function cell(name: string, max = 110): string {
  const short = name.length > max ? `${name.slice(0, max - 1)}…` : name;
  return '`' + short.replace(/\|/g, '\\|').replace(/`/g, "'") + '`';
}

function statusLine(label: string, r: { status: string; reason?: string; command: string }): string {
  return `${label}: ${r.status}${r.reason ? ` (${r.reason})` : ''}. Command: \`${r.command}\``;
}

/** The "## Per-kernel profile" section of gpu-<date>.md. */
export function profileMarkdown(report: ProfileReport): string {
  const ours = report.ours.summary;
  const torch = report.pytorch?.summary;
  const lines: string[] = ['## Per-kernel profile', '', report.workload, ''];
  lines.push(`- ${statusLine('ours (ncu)', report.ours)}`);
  if (report.pytorch) {
    const wall = report.pytorch.step_ms !== undefined ? ` The profiled step took ${report.pytorch.step_ms.toFixed(1)} ms of wall time (profiler overhead included).` : '';
    lines.push(`- ${statusLine(`PyTorch (torch.profiler${report.pytorch.torch ? `, torch ${report.pytorch.torch}` : ''})`, report.pytorch)}${wall}`);
  }
  lines.push(
    '',
    'ncu runs each launch on its own (serialized, clocks and caches left as they are) and the times are summed; torch.profiler times the kernels as they ran. ' +
      'Neither counts the gaps between launches, so a total well below the measured ms/step means the step waits on the host (launch overhead, synchronization). ' +
      "Ours: the second step (after one warmup step), bracketed by cuProfilerStart/Stop; PyTorch: one step after warmup. Full lists: profile.json.",
    '',
  );
  if (ours || torch) {
    lines.push('### GPU time by kind of kernel', '');
    const cats = new Map<string, { ours?: CategoryRow; torch?: CategoryRow }>();
    for (const c of ours?.categories ?? []) cats.set(c.category, { ...cats.get(c.category), ours: c });
    for (const c of torch?.categories ?? []) cats.set(c.category, { ...cats.get(c.category), torch: c });
    const order = [...cats.entries()].sort((a, b) => (b[1].ours?.total_us ?? 0) + (b[1].torch?.total_us ?? 0) - (a[1].ours?.total_us ?? 0) - (a[1].torch?.total_us ?? 0));
    const rows = order.map(([name, c]) => [
      name,
      c.ours ? ms(c.ours.total_us) : '',
      c.ours ? pct(c.ours.share) : '',
      c.ours ? String(c.ours.calls) : '',
      c.torch ? ms(c.torch.total_us) : '',
      c.torch ? pct(c.torch.share) : '',
      c.torch ? String(c.torch.calls) : '',
    ]);
    rows.push([
      '**total**',
      ours ? `**${ms(ours.total_us)}**` : '',
      '',
      ours ? String(ours.launches) : '',
      torch ? `**${ms(torch.total_us)}**` : '',
      '',
      torch ? String(torch.launches) : '',
    ]);
    lines.push(markdownTable(['category', 'ours ms', 'ours share', 'ours launches', 'PyTorch ms', 'PyTorch share', 'PyTorch launches'], rows), '');
    if (torch && torch.memory_activity_us > 0) lines.push(`PyTorch memory copies / sets besides (not kernels, not in the totals): ${ms(torch.memory_activity_us)} ms.`, '');
  }
  const topTable = (title: string, s: KernelSummary) => {
    lines.push(`### Top ${s.top.length} kernels, ${title} (of ${s.distinct_kernels} distinct, ${s.launches} launches)`, '');
    lines.push(markdownTable(['kernel', 'category', 'launches', 'total ms', 'share', 'mean us'], s.top.map((k) => [cell(k.name), k.category, String(k.calls), ms(k.total_us), pct(k.share), k.mean_us.toFixed(1)])), '');
  };
  if (ours) topTable('ours', ours);
  else if (report.ours.profiled_counts?.length) {
    lines.push('### Kernels ncu profiled before the run was cut (launch counts only, no times)', '');
    lines.push(markdownTable(['kernel', 'category', 'launches'], report.ours.profiled_counts.slice(0, 25).map((k) => [cell(k.name), kernelCategory(k.name), String(k.calls)])), '');
  }
  if (torch) topTable('PyTorch', torch);
  return lines.join('\n');
}
