/**
 * Shared pieces of the benchmark harness: the suite interface, option parsing, child processes
 * that report one JSON line, statistics, machine/version facts and the results files.
 * A suite (benches/pretrain.ts, later benches/kernels.ts) only measures; run.ts prints and saves.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root: dist/benches/lib.js -> ../..; benches/lib.ts (ts-node style) -> ... */
export const REPO_ROOT: string = (() => {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    if (existsSync(path.join(dir, 'package.json')) && existsSync(path.join(dir, 'benches'))) return dir;
    dir = path.dirname(dir);
  }
  return process.cwd();
})();

/** One measured configuration; the first keys are the stable JSON-line format. */
export interface Measurement {
  suite: string;
  impl: string;
  preset: string;
  batch: number;
  dtype: string;
  device: string;
  threads: number;
  images_per_s: number;
  peak_mem_mb: number;
  ms_per_step_median: number;
  /** Anything else the suite wants kept in the results file (not printed on the JSON line). */
  details?: Record<string, unknown>;
}

/** The JSON line printed per measured configuration (stable key order). */
export function jsonLine(m: Measurement): string {
  const { suite, impl, preset, batch, dtype, device, threads, images_per_s, peak_mem_mb, ms_per_step_median } = m;
  const k = m.details as { kernel?: string; shape?: number[]; pass?: string; ms?: number; input_std?: number } | undefined;
  if (k?.kernel !== undefined) {
    // Kernel rows: what ran on which shape (and input spread, where it matters), and its time, instead of images/s.
    return JSON.stringify({ suite, impl, kernel: k.kernel, pass: k.pass, shape: k.shape, input_std: k.input_std, preset, batch, dtype, device, threads, ms: k.ms, peak_mem_mb });
  }
  if (suite === 'data') {
    // Data pipeline rows: workers (= cores used) instead of a model and threads.
    const d = m.details as { images_per_s_per_core?: number; image_size?: number } | undefined;
    return JSON.stringify({ suite, impl, workers: threads, images_per_s, images_per_s_per_core: d?.images_per_s_per_core, batch, image_size: d?.image_size });
  }
  return JSON.stringify({ suite, impl, preset, batch, dtype, device, threads, images_per_s, peak_mem_mb, ms_per_step_median });
}

export interface SuiteResult {
  measurements: Measurement[];
  /** Lines for the report: skipped implementations, caveats. */
  notes: string[];
  /** Extra version facts the suite discovered (e.g. torch). */
  versions?: Record<string, string>;
}

export interface Options {
  /** Flags as given: `--preset a,b` -> preset: 'a,b'; bare `--flag` -> 'true'. */
  flags: Record<string, string>;
  positional: string[];
}

export interface Suite {
  name: string;
  /** One line for `run.js --help`. */
  summary: string;
  /** Flags the suite reads, with their help text, for `--help` and for rejecting typos. */
  flags: Record<string, string>;
  run(opts: Options, log: (line: string) => void): Promise<SuiteResult>;
  /** Renders the markdown table of a run (run.ts supplies a generic one when absent). */
  table?(ms: Measurement[]): string;
}

/** Flags that never take a value. */
export const BOOLEAN_FLAGS = new Set(['no-save', 'quiet', 'help']);

export function parseArgs(argv: string[], booleans: Set<string> = BOOLEAN_FLAGS): Options {
  const flags: Record<string, string> = {};
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      if (eq > 0) {
        flags[a.slice(2, eq)] = a.slice(eq + 1);
      } else if (!booleans.has(a.slice(2)) && i + 1 < argv.length && !argv[i + 1].startsWith('--')) {
        flags[a.slice(2)] = argv[++i];
      } else {
        flags[a.slice(2)] = 'true';
      }
    } else {
      positional.push(a);
    }
  }
  return { flags, positional };
}

export function intFlag(opts: Options, name: string, dflt: number, min = 1): number {
  const v = opts.flags[name];
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw new RangeError(`--${name} must be an integer >= ${min}, got '${v}'`);
  return n;
}

export function listFlag(opts: Options, name: string, dflt: string[]): string[] {
  const v = opts.flags[name];
  if (v === undefined) return dflt;
  const xs = v.split(',').map((s) => s.trim()).filter((s) => s.length > 0);
  if (xs.length === 0) throw new RangeError(`--${name} is empty`);
  return xs;
}

/** `--masking random|complementary` (default random): the pretraining masks, and the config
 *  override that selects them (FastConvMAE's complementary masking), or undefined. */
/** What every step-timing worker reads from its flags (pretrain-worker, finetune-worker). */
export interface StepWorkerFlags {
  preset: string;
  batch: number;
  warmup: number;
  steps: number;
  seed: number;
  lr: number;
  device: string;
  precision: string;
}

/** The step-timing workers' common flags, with their defaults (`lr`: the worker's own). */
export function stepWorkerFlags(opts: Options, defaultLr: number): StepWorkerFlags {
  return {
    preset: opts.flags.preset ?? 'convmae-base',
    batch: intFlag(opts, 'batch', 8),
    warmup: intFlag(opts, 'warmup', 2, 0),
    steps: intFlag(opts, 'steps', 5),
    seed: intFlag(opts, 'seed', 0, 0),
    lr: opts.flags.lr !== undefined ? Number(opts.flags.lr) : defaultLr,
    device: opts.flags.device ?? 'cpu',
    precision: opts.flags.precision ?? 'fp32',
  };
}

/** The timing fields of a worker's JSON line from its timed steps (ms) and what they ran on. */
export function stepTimes(batch: number, times: number[], losses: number[], warmup: number, steps: number): Record<string, unknown> {
  const med = median(times);
  return { images_per_s: batch / (med / 1000), ms_per_step_median: med, ms_per_step: times, losses, warmup, steps };
}

/** The flags of a suite that alternates implementations in rounds (`pretrain`, `finetune`). */
export function roundsFlags<I extends string>(opts: Options, known: readonly I[]) {
  const impls = listFlag(opts, 'impl', [...known]) as I[];
  for (const i of impls) if (!known.includes(i)) throw new RangeError(`unknown --impl '${i}' (known: ${known.join(', ')})`);
  return {
    presets: listFlag(opts, 'preset', ['convmae-base']),
    batches: batchesFlag(opts),
    steps: intFlag(opts, 'steps', 5),
    warmup: intFlag(opts, 'warmup', 2, 0),
    rounds: intFlag(opts, 'rounds', 3),
    threads: intFlag(opts, 'threads', coreCount()),
    timeoutMs: intFlag(opts, 'timeout-s', 3600) * 1000,
    impls,
  };
}

/** `--batch`: positive integers, comma separated (default 8). */
export function batchesFlag(opts: Options): number[] {
  return listFlag(opts, 'batch', ['8']).map((b) => {
    const n = Number(b);
    if (!Number.isInteger(n) || n < 1) throw new RangeError(`--batch must be positive integers, got '${b}'`);
    return n;
  });
}

export function maskingFlag(opts: Options): { masking: 'random' | 'complementary'; config?: { complementary_masking: true } } {
  const masking = opts.flags.masking ?? 'random';
  if (masking !== 'random' && masking !== 'complementary') throw new RangeError(`--masking must be random or complementary, got '${masking}'`);
  return masking === 'complementary' ? { masking, config: { complementary_masking: true } } : { masking };
}

/** One round of a timing worker: its median ms/step, the steps it timed, its peak memory. */
export interface RoundResult {
  ms_median: number;
  ms: number[];
  peak_mem_mb: number;
  import_rss_mb?: number;
}

function num(x: unknown): number {
  return typeof x === 'number' ? x : NaN;
}

/**
 * Runs each implementation's timing worker `rounds` times, alternating (a, b, a, b, ...), each
 * round a fresh process (`command(impl)`), so that machine noise hits them alike and each peak
 * memory is its own. A worker that fails (exit, no JSON line, timeout) is noted in `notes` and
 * not run again. Returns the rounds of every implementation that never failed.
 */
export async function alternatingRounds<I extends string>(
  impls: readonly I[],
  rounds: number,
  label: string,
  batch: number,
  command: (impl: I) => [string, string[]],
  env: NodeJS.ProcessEnv,
  timeoutMs: number,
  notes: string[],
  log: (line: string) => void,
): Promise<Map<I, RoundResult[]>> {
  const perImpl = new Map<I, RoundResult[]>(impls.map((i) => [i, []]));
  const failed = new Set<I>();
  for (let round = 1; round <= rounds; round++) {
    for (const impl of impls) {
      if (failed.has(impl)) continue;
      const [cmd, args] = command(impl);
      log(`[${label}] round ${round}/${rounds}: ${impl} ...`);
      const r = await runChild(cmd, args, env, timeoutMs);
      const j = r.json;
      if (r.code !== 0 || !j || !Number.isFinite(num(j.ms_per_step_median))) {
        const why = r.timedOut ? `timed out after ${timeoutMs / 1000} s` : `exit ${r.code ?? r.signal}`;
        const tail = r.stderr.trim().split('\n').slice(-5).join(' | ');
        notes.push(`${impl} failed on ${label} (round ${round}, ${why}): ${tail}`);
        log(`  ${impl} failed (${why}): ${tail}`);
        failed.add(impl);
        continue;
      }
      const rr: RoundResult = {
        ms_median: num(j.ms_per_step_median),
        ms: Array.isArray(j.ms_per_step) ? (j.ms_per_step as number[]) : [],
        peak_mem_mb: num(j.peak_mem_mb),
        import_rss_mb: typeof j.import_rss_mb === 'number' ? j.import_rss_mb : undefined,
      };
      perImpl.get(impl)!.push(rr);
      log(`  ${impl}: ${fmt(rr.ms_median)} ms/step, ${fmt(batch / (rr.ms_median / 1000))} images/s, peak ${fmt(rr.peak_mem_mb)} MB`);
    }
  }
  for (const impl of failed) perImpl.delete(impl);
  for (const [impl, rs] of perImpl) if (rs.length === 0) perImpl.delete(impl);
  return perImpl;
}

/** A CPU f32 measurement from an implementation's rounds: the median of their medians, the largest peak. */
export function roundsMeasurement(
  id: { suite: string; impl: string; preset: string; batch: number; threads: number },
  rs: RoundResult[],
  details: Record<string, unknown>,
): Measurement {
  const ms = median(rs.map((r) => r.ms_median));
  return {
    ...id,
    dtype: 'f32',
    device: 'cpu',
    images_per_s: id.batch / (ms / 1000),
    peak_mem_mb: Math.max(...rs.map((r) => r.peak_mem_mb)),
    ms_per_step_median: ms,
    details: {
      ...details,
      rounds: rs.length,
      round_ms_median: rs.map((r) => r.ms_median),
      ms_per_step: rs.map((r) => r.ms),
      round_peak_mem_mb: rs.map((r) => r.peak_mem_mb),
      import_rss_mb: rs[0]!.import_rss_mb,
    },
  };
}

/** xorshift32 bytes: cheap, deterministic random pixels (the timing workers' batches). */
export function fillRandom(buf: Uint8Array, state: { s: number }): void {
  let s = state.s >>> 0 || 1;
  const words = new Uint32Array(buf.buffer, buf.byteOffset, buf.byteLength >> 2);
  for (let i = 0; i < words.length; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    words[i] = s;
  }
  for (let i = words.length << 2; i < buf.length; i++) buf[i] = (i * 131 + s) & 255;
  state.s = s;
}

export function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Default thread count: the cores this process may use. */
export function coreCount(): number {
  return typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
}

export interface ChildResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** The last stdout line that parses as a JSON object. */
  json?: Record<string, unknown>;
  timedOut: boolean;
}

/** Runs a command whose last JSON stdout line is its report; stderr is kept (and echoed when `echo`). */
export function runChild(
  cmd: string,
  args: string[],
  env: NodeJS.ProcessEnv,
  timeoutMs: number,
  echo?: (line: string) => void,
): Promise<ChildResult> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { env, cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
      if (echo) for (const l of d.split('\n')) if (l.trim()) echo(`    ${l}`);
    });
    const finish = (code: number | null, signal: NodeJS.Signals | null) => {
      clearTimeout(timer);
      let json: Record<string, unknown> | undefined;
      for (const line of stdout.trim().split('\n').reverse()) {
        const t = line.trim();
        if (!t.startsWith('{')) continue;
        try {
          json = JSON.parse(t) as Record<string, unknown>;
          break;
        } catch {
          /* not the report line */
        }
      }
      resolve({ code, signal, stdout, stderr, json, timedOut });
    };
    child.on('error', (e) => {
      stderr += String(e);
      finish(null, null);
    });
    child.on('close', finish);
  });
}

/** Fraction of all CPU time spent busy over the next `ms` (from /proc/stat); undefined off Linux. */
export async function cpuBusy(ms = 1000): Promise<number | undefined> {
  const sample = (): number[] | undefined => {
    try {
      const line = readFileSync('/proc/stat', 'utf8').split('\n')[0];
      const xs = line.trim().split(/\s+/).slice(1).map(Number);
      const idle = xs[3] + (xs[4] ?? 0);
      const total = xs.reduce((a, b) => a + b, 0);
      return [idle, total];
    } catch {
      return undefined;
    }
  };
  const a = sample();
  await new Promise((r) => setTimeout(r, ms));
  const b = sample();
  if (!a || !b || b[1] === a[1]) return undefined;
  return 1 - (b[0] - a[0]) / (b[1] - a[1]);
}

/** Output of a short command, or undefined when it fails. */
export function tryExec(cmd: string, args: string[], timeoutMs = 60_000): string | undefined {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', timeout: timeoutMs, stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return undefined;
  }
}

export interface Machine {
  cpu: string;
  cores: number;
  logical_cpus: number;
  ram_gb: number;
  os: string;
  arch: string;
}

export function machineInfo(): Machine {
  let cpu = os.cpus()[0]?.model ?? 'unknown';
  try {
    const m = /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    if (m) cpu = m[1].trim();
  } catch {
    /* not Linux */
  }
  return {
    cpu,
    cores: coreCount(),
    logical_cpus: os.cpus().length,
    ram_gb: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    os: `${os.type()} ${os.release()}`,
    arch: os.arch(),
  };
}

/** The checked-out commit, read from .git without running git (undefined when not a checkout). */
export function gitCommit(): string | undefined {
  try {
    let gitDir = path.join(REPO_ROOT, '.git');
    if (!existsSync(gitDir)) return undefined;
    const head = readFileSync(path.join(gitDir, 'HEAD'), 'utf8').trim();
    if (!head.startsWith('ref:')) return head;
    const ref = head.slice(4).trim();
    const loose = path.join(gitDir, ref);
    if (existsSync(loose)) return readFileSync(loose, 'utf8').trim();
    const packed = readFileSync(path.join(gitDir, 'packed-refs'), 'utf8');
    for (const line of packed.split('\n')) {
      const [sha, name] = line.trim().split(' ');
      if (name === ref) return sha;
    }
  } catch {
    /* unreadable */
  }
  return undefined;
}

export function baseVersions(): Record<string, string> {
  const v: Record<string, string> = { node: process.version };
  const rustc = tryExec('rustc', ['--version']);
  if (rustc) v.rustc = rustc;
  try {
    const pkg = JSON.parse(readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { version?: string };
    if (pkg.version) v.convmae = pkg.version;
  } catch {
    /* no package.json */
  }
  const commit = gitCommit();
  if (commit) v.commit = commit;
  // The commit need not be what the addon was built from: record when the addon was built.
  try {
    const chosen = process.env.CONVMAE_NATIVE;
    const addon = chosen ?? readdirSync(REPO_ROOT).filter((f) => f.endsWith('.node') && !f.includes('.cuda.')).sort()[0];
    if (addon) v.native_addon = `${addon} built ${statSync(path.resolve(REPO_ROOT, addon)).mtime.toISOString()}${chosen ? ' (CONVMAE_NATIVE)' : ''}`;
  } catch {
    /* no addon */
  }
  return v;
}

/** The command line as the user typed it (npm run bench -- ... when run through npm). */
export function commandLine(argv: string[]): string {
  const quote = (s: string) => (/^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`);
  const args = argv.map(quote).join(' ');
  if (process.env.npm_lifecycle_event === 'bench') return `npm run bench -- ${args}`;
  return `node ${path.relative(REPO_ROOT, process.argv[1] ?? 'dist/benches/run.js') || 'dist/benches/run.js'} ${args}`;
}

export function localDate(d = new Date()): string {
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}`;
}

/** One invocation of run.js, as stored in the results file. */
export interface RunRecord {
  command: string;
  argv: string[];
  started: string;
  finished: string;
  machine: Machine;
  versions: Record<string, string>;
  env: Record<string, string>;
  /** os.loadavg() (1, 5, 15 min) when the run started and ended: other work on the machine skews timings. */
  load_avg: { start: number[]; end: number[] };
  /** Share of the CPUs busy (other work) during 2 s sampled just before the first measurement. */
  cpu_busy_before?: number;
  notes: string[];
  results: Measurement[];
}

export interface ResultsFile {
  suite: string;
  date: string;
  runs: RunRecord[];
}

/**
 * Adds `run` to benches/results/<suite>-<date>.json (replacing an earlier run with the same
 * command, so a rerun updates its numbers) and rewrites the matching .md from all runs of the day.
 */
export function saveResults(
  dir: string,
  suite: string,
  date: string,
  run: RunRecord,
  render: (ms: Measurement[]) => string,
): { json: string; md: string } {
  mkdirSync(dir, { recursive: true });
  const json = path.join(dir, `${suite}-${date}.json`);
  const md = path.join(dir, `${suite}-${date}.md`);
  let file: ResultsFile = { suite, date, runs: [] };
  if (existsSync(json)) {
    try {
      const old = JSON.parse(readFileSync(json, 'utf8')) as ResultsFile;
      if (old && Array.isArray(old.runs)) file = { suite, date, runs: old.runs };
    } catch {
      /* a broken file is replaced */
    }
  }
  file.runs = file.runs.filter((r) => r.command !== run.command);
  file.runs.push(run);
  writeFileSync(json, JSON.stringify(file, null, 2) + '\n');
  writeFileSync(md, renderResultsMarkdown(file, render));
  return { json, md };
}

export function renderResultsMarkdown(file: ResultsFile, render: (ms: Measurement[]) => string): string {
  const out: string[] = [`# \`${file.suite}\` benchmark, ${file.date}`, ''];
  for (const r of file.runs) {
    out.push(`## \`${r.command}\``, '');
    out.push(`- date: ${r.started} → ${r.finished}`);
    out.push(`- machine: ${r.machine.cpu}, ${r.machine.cores} cores usable (${r.machine.logical_cpus} logical CPUs), ${r.machine.ram_gb} GiB RAM, ${r.machine.os} ${r.machine.arch}`);
    out.push(`- versions: ${Object.entries(r.versions).map(([k, v]) => `${k} ${v}`).join('; ')}`);
    const env = Object.entries(r.env);
    if (env.length) out.push(`- environment: ${env.map(([k, v]) => `${k}=${v}`).join(' ')}`);
    if (r.load_avg) {
      const la = (xs: number[]) => xs.map((x) => x.toFixed(2)).join(' ');
      const busy = r.cpu_busy_before !== undefined ? `; CPUs ${(r.cpu_busy_before * 100).toFixed(0)}% busy with other work just before` : '';
      out.push(`- load average (1/5/15 min): ${la(r.load_avg.start)} at start, ${la(r.load_avg.end)} at end${busy}`);
    }
    out.push('');
    out.push(render(r.results));
    if (r.notes.length) {
      out.push('');
      for (const n of r.notes) out.push(`> ${n}`);
    }
    out.push('');
  }
  return out.join('\n');
}

/** A plain markdown table from rows of cells. */
export function markdownTable(header: string[], rows: string[][]): string {
  const line = (cells: string[]) => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...rows.map(line)].join('\n');
}

export function fmt(x: number, digits = 3): string {
  if (!Number.isFinite(x)) return '—';
  if (x === 0) return '0';
  const a = Math.abs(x);
  if (a >= 100) return x.toFixed(0);
  if (a >= 10) return x.toFixed(1);
  return x.toPrecision(digits);
}
