/**
 * `gelu` suite: GELU (erf form), our op next to candle's built-in `gelu_erf`, forward and forward +
 * backward, f32 on the CPU, at ConvMAE-B's MLP hidden size. Inputs are N(0, std^2) for each
 * --std: erf's cost depends on |x| (libm-style erf takes a slower path above ~1), and a
 * pretrained encoder's MLP activations spread wider than a fresh one's. Timing runs inside Rust
 * (crates/convmae-core/src/bench.rs), one warm-up then --iters.
 */
import { native } from '../src/native.js';
import { coreCount, fmt, intFlag, listFlag, markdownTable, median, type Measurement, type Suite } from './lib.js';

interface GeluTiming {
  implementation: string;
  elements: number;
  input_std: number;
  forward_ms: number[];
  forward_backward_ms: number[];
}

export const geluSuite: Suite = {
  name: 'gelu',
  summary: 'GELU (erf) ours vs candle, forward and forward+backward, at the MLP hidden size (CPU, f32)',
  flags: {
    batch: 'images (default 8): elements = batch x 196 tokens x 3072 (ConvMAE-B MLP hidden, fine-tuning)',
    std: 'input standard deviations, comma separated (default 1,3)',
    iters: 'timed iterations per measurement (default 10)',
  },
  async run(opts, log) {
    const batch = intFlag(opts, 'batch', 8);
    const iters = intFlag(opts, 'iters', 10);
    const stds = listFlag(opts, 'std', ['1', '3']).map((v) => {
      const n = Number(v);
      if (!Number.isFinite(n) || n <= 0) throw new RangeError(`--std: '${v}' is not a positive number`);
      return n;
    });
    const elements = batch * 196 * 3072;
    const threads = Number(process.env.RAYON_NUM_THREADS ?? coreCount());
    const measurements: Measurement[] = [];
    for (const std of stds) {
      log(`[gelu ${elements} elements, std ${std}] timing ...`);
      const timings = JSON.parse(await native.benchGelu(elements, std, iters)) as GeluTiming[];
      for (const t of timings) {
        for (const [pass, times] of [
          ['forward', t.forward_ms],
          ['forward+backward', t.forward_backward_ms],
        ] as const) {
          const ms = median(times);
          measurements.push({
            suite: 'gelu',
            impl: t.implementation,
            preset: 'convmae-base',
            batch,
            dtype: 'f32',
            device: 'cpu',
            threads,
            images_per_s: batch / (ms / 1000),
            peak_mem_mb: process.resourceUsage().maxRSS / 1024,
            ms_per_step_median: ms,
            details: { kernel: 'gelu_erf', shape: [t.elements], pass, elements: t.elements, input_std: t.input_std, ms, melem_per_s: t.elements / (ms / 1000) / 1e6, times },
          });
        }
      }
    }
    return { measurements, notes: ['"ours" is convmae_kernels::gelu_erf (vectorized f32 erf, exact derivative); "candle" is Tensor::gelu_erf (scalar erf; its backward uses 0.398942 for 1/sqrt(2 pi)).'] };
  },
  table(ms) {
    const rows = ms.map((m) => {
      const d = m.details as { pass: string; elements: number; input_std: number; ms: number; melem_per_s: number };
      const candle = ms.find((o) => {
        const od = o.details as typeof d;
        return o.impl === 'candle' && od.pass === d.pass && od.input_std === d.input_std && o.batch === m.batch;
      });
      return [String(d.input_std), m.impl, d.pass, String(d.elements), fmt(d.ms), fmt(d.melem_per_s), candle ? `${fmt(candle.ms_per_step_median / m.ms_per_step_median)}×` : ''];
    });
    return markdownTable(['input std', 'impl', 'pass', 'elements', 'ms (median)', 'Melem/s', 'vs candle'], rows);
  },
};
