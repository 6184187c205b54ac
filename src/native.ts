/**
 * Loads the native module built by `npm run build:native` (napi-rs), with an error that says
 * what to do when it is missing. `CONVMAE_NATIVE` (or napi's NAPI_RS_NATIVE_LIBRARY_PATH) may
 * point at another build, e.g. the CUDA one.
 */
import { createRequire } from 'node:module';
import type * as Native from '../index.js';

const require = createRequire(import.meta.url);

function load(): typeof Native {
  if (process.env.CONVMAE_NATIVE && !process.env.NAPI_RS_NATIVE_LIBRARY_PATH) {
    process.env.NAPI_RS_NATIVE_LIBRARY_PATH = process.env.CONVMAE_NATIVE;
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
    throw new Error(`convmae: cannot load the native module (${reasons.join('; ')}). Build it with \`npm run build:native\` (needs cargo).`);
  }
}

export const native: typeof Native = load();
export type { Native };
