/**
 * Loads the native module built by `npm run build:native` (napi-rs), with an error that says
 * what to do when it is missing. `CONVMAE_NATIVE` (or napi's NAPI_RS_NATIVE_LIBRARY_PATH) may
 * point at another build, e.g. the CUDA one.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import type * as Native from '../index.js';

const require = createRequire(import.meta.url);

function load(): typeof Native {
  // candle runs its own CPU ops on a thread pool of its own, beside rayon's, which our kernels
  // use; its idle workers spin 25,000 times after each op before they sleep, taking a core from
  // rayon's threads on a small machine. Sleeping at once made the demo (convmae-tiny, 2 cores)
  // take 0.81x the time and left ConvMAE-B within noise (benches/results/candle-spin-2026-11-27.md).
  // Read once, when candle's pool starts (its first parallel op), so it is set before the
  // module loads; a value the user set is kept.
  process.env.CANDLE_BARRIER_POOL_SPIN_LIMIT ??= '0';
  if (process.env.CONVMAE_NATIVE && !existsSync(process.env.CONVMAE_NATIVE)) {
    throw new Error(`convmae: CONVMAE_NATIVE=${process.env.CONVMAE_NATIVE} does not exist (it names the native module to load, e.g. ./convmae.linux-x64-gnu.cuda.node from \`npm run build:cuda\`)`);
  }
  if (process.env.CONVMAE_NATIVE && !process.env.NAPI_RS_NATIVE_LIBRARY_PATH) {
    // Absolute: napi's loader would resolve a relative path against its own folder, not the
    // working directory the user wrote it from.
    process.env.NAPI_RS_NATIVE_LIBRARY_PATH = path.resolve(process.env.CONVMAE_NATIVE);
  }
  try {
    // dist/src/native.js -> the package root, where napi writes native.cjs and the .node file.
    return require('../../native.cjs') as typeof Native;
  } catch (e) {
    // napi's loader puts the real reasons (e.g. a missing libcublas.so.13) in the cause chain
    // under a generic message; surface them.
    const reasons: string[] = [];
    for (let c: unknown = e; c instanceof Error && reasons.length < 8; c = c.cause) reasons.push(c.message.split('\n')[0]);
    // The generic message and the failed fallbacks (WASI, package names) say less than the rest.
    const specific = reasons.filter((r) => !/^Cannot find (native binding|module)/.test(r));
    if (specific.length > 0) reasons.splice(0, reasons.length, ...specific);
    if (reasons.length === 0) reasons.push(String(e));
    // With CONVMAE_NATIVE the file exists but its libraries may not (a CUDA addon without a
    // driver or CUDA's libraries); building the CPU module again would not help there.
    const advice = process.env.CONVMAE_NATIVE
      ? `CONVMAE_NATIVE=${process.env.CONVMAE_NATIVE}: check that the libraries named above can be found (a CUDA addon needs the NVIDIA driver and CUDA 13's cuBLAS, cuRAND, cudart and NVRTC on the loader path)`
      : 'Build it with `npm run build:native` (needs cargo)';
    throw new Error(`convmae: cannot load the native module (${reasons.join('; ')}). ${advice}.`);
  }
}

export const native: typeof Native = load();
export type { Native };
