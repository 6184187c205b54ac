/**
 * One correctness probe of the GPU check in a process of its own, so that a fault in an untested
 * CUDA kernel (an illegal address poisons the CUDA context; a crash takes the process) costs that
 * probe only, not the rest of the check. Prints one JSON line.
 *
 *   node dist/benches/gpu/probe-worker.js parity <fixture.safetensors> <f32|f64> <sparse|dense>
 *   node dist/benches/gpu/probe-worker.js agreement
 *   node dist/benches/gpu/probe-worker.js timing <batch> <reps>
 */
import { checkFixture } from '../../src/api/fixture.js';
import { native } from '../../src/native.js';

async function main(): Promise<void> {
  const [what, fixture, dtype, convPath] = process.argv.slice(2);
  if (what === 'parity' && fixture && (dtype === 'f32' || dtype === 'f64') && (convPath === 'sparse' || convPath === 'dense')) {
    const r = await checkFixture(fixture, dtype, convPath, 'cuda');
    process.stdout.write(JSON.stringify({ kind: r.kind, pass: r.pass, worst: r.worst, worst_rel: r.worst_rel, tolerance: r.tolerance }) + '\n');
  } else if (what === 'agreement') {
    process.stdout.write(JSON.stringify({ rows: JSON.parse(await native.compareKernels('cuda')) as unknown[] }) + '\n');
  } else if (what === 'timing' && Number(fixture) > 0 && Number(dtype) > 0) {
    // Each op at the shapes of a ConvMAE-B step of <batch> images, ours vs candle's, bf16 then f32.
    const rows = JSON.parse(await native.timeKernels('cuda', Number(fixture), Number(dtype), ['bf16', 'f32'])) as unknown[];
    process.stdout.write(JSON.stringify({ rows }) + '\n');
  } else {
    throw new Error(`usage: probe-worker.js parity <fixture> <f32|f64> <sparse|dense> | agreement | timing <batch> <reps> (got ${process.argv.slice(2).join(' ')})`);
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`probe-worker: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = 1;
});
