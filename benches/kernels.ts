/**
 * `kernels` suite: the 5x5 depthwise conv of ConvMAE's conv stages at their real shapes,
 * dense with the mask on its input (the official computation) vs sparse over the visible
 * positions only; forward and forward + backward; achieved GFLOP/s and GB/s. CPU, f32.
 * The timing loop runs inside Rust (crates/convmae-core/src/bench.rs), one warm-up then --iters.
 */
import { native } from '../src/native.js';
import { coreCount, fmt, intFlag, listFlag, markdownTable, median, type Measurement, type Suite } from './lib.js';

interface KernelTiming {
  kernel: string;
  implementation: string;
  shape: [number, number, number, number];
  positions: number;
  forward_ms: number[];
  forward_backward_ms: number[];
  forward_macs: number;
  forward_bytes: number;
}

export const kernelsSuite: Suite = {
  name: 'kernels',
  summary: 'depthwise 5x5 conv, dense-masked vs sparse, forward and forward+backward, at the conv-stage shapes (CPU, f32)',
  flags: {
    preset: 'model preset whose stage shapes are used (default convmae-base)',
    batch: 'images (default 8)',
    iters: 'timed iterations per measurement (default 10)',
    stage: 'conv stages, comma separated: 1,2 (default both)',
  },
  async run(opts, log) {
    const preset = opts.flags.preset ?? 'convmae-base';
    const batch = intFlag(opts, 'batch', 8);
    const iters = intFlag(opts, 'iters', 10);
    const stages = listFlag(opts, 'stage', ['1', '2']).map(Number);
    const threads = Number(process.env.RAYON_NUM_THREADS ?? coreCount());
    const measurements: Measurement[] = [];
    for (const stage of stages) {
      log(`[${preset} stage ${stage} b${batch}] timing ...`);
      const timings = JSON.parse(await native.benchDepthwiseConv(preset, stage, batch, iters)) as KernelTiming[];
      for (const t of timings) {
        for (const [pass, times, flopsFactor] of [
          ['forward', t.forward_ms, 1],
          ['forward+backward', t.forward_backward_ms, 3],
        ] as const) {
          const ms = median(times);
          const gflops = (2 * t.forward_macs * flopsFactor) / (ms / 1000) / 1e9;
          const gbs = (t.forward_bytes * flopsFactor) / (ms / 1000) / 1e9;
          measurements.push({
            suite: 'kernels',
            impl: t.implementation,
            preset,
            batch,
            dtype: 'f32',
            device: 'cpu',
            threads,
            images_per_s: batch / (ms / 1000),
            peak_mem_mb: process.resourceUsage().maxRSS / 1024,
            ms_per_step_median: ms,
            details: { kernel: t.kernel, pass, shape: t.shape, stage, ms, positions: t.positions, gflops, gbs, times },
          });
        }
      }
    }
    return { measurements, notes: ['GFLOP/s count 2 x MACs of the positions each kernel computes; GB/s counts one read of the input rows and one write of the output (x3 for forward+backward).'] };
  },
  table(ms) {
    const rows = ms.map((m) => {
      const d = m.details as { kernel: string; pass: string; shape: number[]; stage: number; ms: number; positions: number; gflops: number; gbs: number };
      const dense = ms.find((o) => {
        const od = o.details as typeof d;
        return o.impl === 'dense-masked' && od.stage === d.stage && od.pass === d.pass && o.batch === m.batch;
      });
      const speedup = dense ? `${fmt(dense.ms_per_step_median / m.ms_per_step_median)}×` : '';
      return [String(d.stage), `[${d.shape.join(',')}]`, m.impl, d.pass, String(d.positions), fmt(d.ms), fmt(d.gflops), fmt(d.gbs), speedup];
    });
    return markdownTable(['stage', 'map [B,H,W,C]', 'impl', 'pass', 'positions', 'ms (median)', 'GFLOP/s', 'GB/s', 'vs dense'], rows);
  },
};
