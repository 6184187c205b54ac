/**
 * Benchmark entry point (`npm run bench -- <suite> [flags]`, i.e. `node dist/benches/run.js`).
 *
 *   npm run bench -- pretrain --preset convmae-base --batch 8 --steps 3
 *   npm run bench -- pretrain --preset convmae-tiny --batch 32 --impl ours --threads 1
 *   npm run bench -- data --workers 1,2
 *
 * Prints a markdown table and one JSON line per measured configuration
 * ({"suite","impl","preset","batch","dtype","device","threads","images_per_s","peak_mem_mb","ms_per_step_median"}),
 * and records the run (machine, date, versions, exact command) in
 * benches/results/<suite>-<YYYY-MM-DD>.json and .md (`--no-save` skips that, `--out DIR` moves it).
 *
 * To add a suite: write benches/<name>.ts exporting a `Suite` (see lib.ts) and list it in SUITES.
 */
import os from 'node:os';
import path from 'node:path';
import {
  REPO_ROOT,
  baseVersions,
  commandLine,
  cpuBusy,
  fmt,
  jsonLine,
  localDate,
  machineInfo,
  markdownTable,
  parseArgs,
  saveResults,
  type Measurement,
  type RunRecord,
  type Suite,
} from './lib.js';
import { dataSuite } from './data.js';
import { finetuneSuite } from './finetune.js';
import { finetuneStepSuite } from './finetune-step.js';
import { geluSuite } from './gelu.js';
import { opsSuite } from './ops.js';
import { kernelsSuite } from './kernels.js';
import { pretrainSuite } from './pretrain.js';
import { transferSuite } from './transfer.js';

export const SUITES: Record<string, Suite> = {
  [pretrainSuite.name]: pretrainSuite,
  [finetuneSuite.name]: finetuneSuite,
  [kernelsSuite.name]: kernelsSuite,
  [geluSuite.name]: geluSuite,
  [opsSuite.name]: opsSuite,
  [finetuneStepSuite.name]: finetuneStepSuite,
  [transferSuite.name]: transferSuite,
  [dataSuite.name]: dataSuite,
};

/** Flags every suite accepts (handled here). */
const COMMON_FLAGS: Record<string, string> = {
  out: 'directory for the results files (default benches/results)',
  'no-save': 'print only; write no results files',
  quiet: 'no progress lines on stderr',
  tag: 'a label kept in the command line of the record: a rerun of the same command replaces its record, a run with another --tag is kept beside it (e.g. builds compared with CONVMAE_NATIVE)',
  help: 'this help',
};

function genericTable(ms: Measurement[]): string {
  return markdownTable(
    ['suite', 'impl', 'preset', 'batch', 'dtype', 'device', 'threads', 'ms/step (median)', 'images/s', 'peak RSS MB'],
    ms.map((m) => [m.suite, m.impl, m.preset, String(m.batch), m.dtype, m.device, String(m.threads), fmt(m.ms_per_step_median), fmt(m.images_per_s), fmt(m.peak_mem_mb)]),
  );
}

function usage(): string {
  const lines = ['usage: node dist/benches/run.js <suite> [flags]   (npm run bench -- <suite> [flags])', '', 'suites:'];
  for (const s of Object.values(SUITES)) {
    lines.push(`  ${s.name}: ${s.summary}`);
    for (const [f, h] of Object.entries(s.flags)) lines.push(`      --${f.padEnd(10)} ${h}`);
  }
  lines.push('', 'every suite:');
  for (const [f, h] of Object.entries(COMMON_FLAGS)) lines.push(`      --${f.padEnd(10)} ${h}`);
  return lines.join('\n');
}

export async function main(argv: string[]): Promise<number> {
  const opts = parseArgs(argv);
  const name = opts.positional[0];
  if (opts.flags.help || !name) {
    (name || opts.flags.help ? process.stdout : process.stderr).write(usage() + '\n');
    return name || opts.flags.help ? 0 : 2;
  }
  const suite = SUITES[name];
  if (!suite) {
    process.stderr.write(`unknown suite '${name}' (known: ${Object.keys(SUITES).join(', ')})\n\n${usage()}\n`);
    return 2;
  }
  const unknown = Object.keys(opts.flags).filter((f) => !(f in suite.flags) && !(f in COMMON_FLAGS));
  if (unknown.length || opts.positional.length > 1) {
    process.stderr.write(`unknown argument(s) for '${name}': ${[...unknown.map((f) => `--${f}`), ...opts.positional.slice(1)].join(' ')}\n\n${usage()}\n`);
    return 2;
  }

  const quiet = opts.flags.quiet === 'true';
  const log = (line: string) => {
    if (!quiet) process.stderr.write(line + '\n');
  };
  const started = new Date();
  const loadStart = os.loadavg();
  const busyBefore = await cpuBusy(2000);
  const machine = machineInfo();
  log(`${suite.name}: ${machine.cpu}, ${machine.cores} cores, ${machine.ram_gb} GiB` + (busyBefore !== undefined ? `, CPUs ${(busyBefore * 100).toFixed(0)}% busy before start` : ''));
  const result = await suite.run(opts, log);
  const finished = new Date();
  const loadEnd = os.loadavg();
  if (busyBefore !== undefined && busyBefore > 0.25) {
    result.notes.push(
      `other work kept the CPUs ${(busyBefore * 100).toFixed(0)}% busy just before this run (1-min load average ${loadStart[0].toFixed(2)} on ${machine.cores} cores): timings are pessimistic and noisy`,
    );
  }

  const render = (ms: Measurement[]) => (suite.table ?? genericTable)(ms);
  process.stdout.write('\n' + render(result.measurements) + '\n');
  for (const n of result.notes) process.stdout.write(`\n> ${n}\n`);
  process.stdout.write('\n');
  for (const m of result.measurements) process.stdout.write(jsonLine(m) + '\n');

  if (opts.flags['no-save'] !== 'true') {
    const envKeys = ['RAYON_NUM_THREADS', 'OMP_NUM_THREADS', 'CONVMAE_TORCH_PYTHON', 'CONVMAE_NATIVE', 'OPENBLAS_CORETYPE'];
    const env: Record<string, string> = {};
    for (const k of envKeys) if (process.env[k] !== undefined) env[k] = process.env[k]!;
    const record: RunRecord = {
      command: commandLine(argv),
      argv,
      started: started.toISOString(),
      finished: finished.toISOString(),
      machine,
      versions: { ...baseVersions(), ...(result.versions ?? {}) },
      env,
      load_avg: { start: loadStart, end: loadEnd },
      cpu_busy_before: busyBefore,
      notes: result.notes,
      results: result.measurements,
    };
    const dir = opts.flags.out ? path.resolve(opts.flags.out) : path.join(REPO_ROOT, 'benches', 'results');
    const files = saveResults(dir, suite.name, localDate(started), record, render);
    log(`wrote ${path.relative(process.cwd(), files.json)} and ${path.relative(process.cwd(), files.md)}`);
  }
  return result.measurements.length > 0 ? 0 : 1;
}

const isMain = process.argv[1] !== undefined && path.resolve(process.argv[1]).replace(/\.ts$/, '.js').endsWith(path.join('benches', 'run.js'));
if (isMain) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (e: unknown) => {
      process.stderr.write(`bench: ${e instanceof Error ? e.message : String(e)}\n`);
      process.exitCode = 1;
    },
  );
}
