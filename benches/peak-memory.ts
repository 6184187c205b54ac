/**
 * A measuring worker's peak memory, for its JSON line (pretrain-worker.ts, task-worker.ts). Not
 * in lib.ts: this loads the native addon, which the GPU check (an importer of lib.ts) loads
 * itself, so as to record a load failure rather than die of it.
 */
import { native } from '../src/native.js';

/**
 * Peak memory in MB: on CUDA the peak of the device's memory pool (where every tensor lives), on
 * the CPU the process's peak RSS.
 */
export function peakMemoryMb(device: string): number {
  if (device === 'cpu') return process.resourceUsage().maxRSS / 1024; // maxRSS is in KiB
  return (JSON.parse(native.cudaPoolPeaks(Number(device.split(':')[1] ?? 0))) as { used_high: number }).used_high / 2 ** 20;
}
