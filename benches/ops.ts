/**
 * `ops` suite: every op of crates/kernels at the shapes of a ConvMAE-B pretraining step (75%
 * masked, --batch images), forward and forward + backward, by our kernels and by candle's
 * compositions of its own tensor ops (crates/kernels/src/op_timing.rs, timed inside Rust with the
 * device synchronized around each run). On the CPU in f32 by default; with the CUDA addon
 * (CONVMAE_NATIVE=./convmae.linux-x64-gnu.cuda.node) `--device cuda --dtype bf16,f32` is the
 * table the GPU check records.
 */
import { native } from '../src/native.js';
import { opTimingTable, netForwardBackward, type OpTiming } from './gpu/op-timings.js';
import { coreCount, intFlag, listFlag, type Measurement, type Suite } from './lib.js';

export const opsSuite: Suite = {
  name: 'ops',
  summary: 'each kernel vs candle\'s composition at ConvMAE-B step shapes, forward and forward+backward (CPU f32; CUDA with the CUDA addon)',
  flags: {
    batch: 'images whose step shapes are used (default 8)',
    reps: 'timed runs per measurement (default 5)',
    device: "'cpu' (default) or 'cuda[:N]' (needs the CUDA addon)",
    dtype: "dtypes, comma separated: f32, bf16 (default f32; bf16 on the CPU runs candle's ops only)",
  },
  async run(opts, log) {
    const batch = intFlag(opts, 'batch', 8);
    const reps = intFlag(opts, 'reps', 5);
    const device = opts.flags.device ?? 'cpu';
    const dtypes = listFlag(opts, 'dtype', ['f32']);
    log(`[ops batch ${batch} on ${device}, ${dtypes.join(', ')}] timing ...`);
    const timings = JSON.parse(await native.timeKernels(device, batch, reps, dtypes)) as OpTiming[];
    const threads = device === 'cpu' ? Number(process.env.RAYON_NUM_THREADS ?? coreCount()) : 0;
    const measurements: Measurement[] = timings.map((t) => ({
      suite: 'ops',
      impl: t.path === 'kernels' && t.kernel ? 'ours' : 'candle',
      preset: 'convmae-base',
      batch,
      dtype: t.dtype,
      device: device.startsWith('cuda') ? 'cuda' : 'cpu',
      threads,
      images_per_s: batch / (netForwardBackward(t) / 1000),
      peak_mem_mb: process.resourceUsage().maxRSS / 1024,
      ms_per_step_median: netForwardBackward(t),
      details: { kernel: t.op, shape: t.shapes[0], pass: 'forward+backward', ms: netForwardBackward(t), timing: t },
    }));
    return {
      measurements,
      notes: [
        '"ours": our kernel; "candle": the composition of candle ops in crates/kernels/src/composite.rs (what CONVMAE_KERNELS=composite runs).',
        'fwd+bwd: the forward and the gradients of sum(out * probe) for every input, less what that probe chain costs alone on a tensor of the output\'s shape (on the CPU mostly page faults of fresh buffers).',
      ],
    };
  },
  table(ms) {
    return opTimingTable(ms.map((m) => (m.details as { timing: OpTiming }).timing));
  },
};
