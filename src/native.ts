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
    const reason = e instanceof Error ? e.message : String(e);
    throw new Error(`convmae: cannot load the native module (${reason}). Build it with \`npm run build:native\` (needs cargo).`);
  }
}

export const native: typeof Native = load();
export type { Native };
