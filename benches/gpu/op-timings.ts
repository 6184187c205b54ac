/**
 * The op timings of the GPU check (`probe-worker.js timing`, crates/kernels/src/op_timing.rs):
 * each op's forward and forward + backward at the shapes of a ConvMAE-B step, by our kernels and
 * by candle's compositions, and the table that pairs the two.
 */
import { fmt, markdownTable } from '../lib.js';

export interface OpTiming {
  op: string;
  path: string;
  dtype: string;
  shapes: number[][];
  kernel: boolean;
  forward_ms: number;
  forward_backward_ms: number;
  /** sum(out * probe) and its backward alone: in forward_backward_ms, not the op's. */
  probe_ms: number;
  reps: number;
}

/** Forward + backward less the probe's own cost (never below the forward alone). */
export function netForwardBackward(r: OpTiming): number {
  return Math.max(r.forward_ms, r.forward_backward_ms - r.probe_ms);
}

/**
 * One line per op and dtype: both paths' times (forward + backward net of the probe) and the
 * composition's time over ours (above 1: our kernel is faster). A row whose "kernels" path ran
 * no kernel of ours says so instead of a ratio.
 */
export function opTimingTable(rows: OpTiming[]): string {
  const keys = [...new Set(rows.map((r) => `${r.op}\u0000${r.dtype}`))];
  const lines = keys.map((key) => {
    const [op, dtype] = key.split('\u0000');
    const ours = rows.find((r) => r.op === op && r.dtype === dtype && r.path === 'kernels');
    const theirs = rows.find((r) => r.op === op && r.dtype === dtype && r.path === 'composite');
    const shapes = (ours ?? theirs)!.shapes.map((s) => `[${s.join(', ')}]`).join(' ');
    const ratio = (a?: number, b?: number) => (a !== undefined && b !== undefined && b > 0 ? fmt(a / b) : '');
    const net = (r?: OpTiming) => (r ? netForwardBackward(r) : undefined);
    const speedup = ours && !ours.kernel ? 'no kernel of ours' : ratio(net(theirs), net(ours));
    const cell = (v?: number) => (v === undefined ? '' : fmt(v));
    return [op, dtype, shapes, cell(ours?.forward_ms), cell(theirs?.forward_ms), cell(net(ours)), cell(net(theirs)), speedup];
  });
  return markdownTable(['op', 'dtype', 'shapes', 'ours fwd ms', 'candle fwd ms', 'ours fwd+bwd ms', 'candle fwd+bwd ms', 'candle / ours (fwd+bwd)'], lines);
}

/**
 * The addon's stderr lines reporting a choice it made by measuring (`CONVMAE_ATTENTION=auto`:
 * each form's timing and the pick), and with `CONVMAE_PROFILE` how the pretraining backward ran
 * (on the tape or by candle's), in order.
 */
export function autoChoices(stderr: string): string[] {
  return stderr.split('\n').filter((l) => l.startsWith('convmae: ') && (l.includes('=auto)') || l.startsWith('convmae: the pretraining backward runs')));
}

/** The attention form that every `CONVMAE_ATTENTION=auto` line of a run picked ('gemm',
 *  'fused' or 'flash'), or undefined when the lines are missing or differ by shape. */
export function autoAttentionForm(choices: string[]): AttentionForm | undefined {
  const picked = (line: string): AttentionForm | undefined => {
    const form = /using the (fused kernels|gemms|flash kernels on mma\.sync|flash kernels) \(CONVMAE_ATTENTION=auto\)/.exec(line)?.[1];
    return form === undefined ? undefined : FORM_OF_PICK[form];
  };
  const forms = new Set(choices.filter((c) => c.startsWith('convmae: attention')).map(picked));
  const [only] = forms;
  return forms.size === 1 ? only : undefined;
}

/**
 * What `auto` picked for each attention shape, as one comparable string ("64 x 49 tokens x 12
 * heads of 64: flash kernels; ..."), empty when no line names a pick. Two runs took the same
 * forms of attention where these are equal.
 */
export function attentionPicks(choices: string[]): string {
  return choices
    .map((c) => /attention \[([^\]]+)\].*using the (.+?) \(CONVMAE_ATTENTION=auto\)/.exec(c))
    .filter((m) => m !== null)
    .map((m) => `${m[1]}: ${m[2]}`)
    .join('; ');
}

/**
 * `CONVMAE_ATTENTION_PICKS` for another process to take the same forms of attention as the run
 * whose choice lines these are, shape by shape ("64x49x12x64=flash-mma,..."; attention.rs), or
 * undefined when no line names a pick.
 */
export function attentionPicksEnv(choices: string[]): string | undefined {
  const picks = choices
    .map((c) => /attention \[(\d+) x (\d+) tokens x (\d+) heads of (\d+)\].*using the (.+?) \(CONVMAE_ATTENTION=auto\)/.exec(c))
    .filter((m) => m !== null && FORM_OF_PICK[m[5]!] !== undefined)
    .map((m) => `${m![1]}x${m![2]}x${m![3]}x${m![4]}=${FORM_OF_PICK[m![5]!]}`);
  return picks.length ? picks.join(',') : undefined;
}

/** A `CONVMAE_ATTENTION` value naming one of our op's CUDA forms. */
export type AttentionForm = 'fused' | 'gemm' | 'flash' | 'flash-mma';
const FORM_OF_PICK: Record<string, AttentionForm> = { 'fused kernels': 'fused', gemms: 'gemm', 'flash kernels': 'flash', 'flash kernels on mma.sync': 'flash-mma' };

/** The host time of a step by part (ms), as `CONVMAE_PROFILE=1` makes the addon print it. */
export interface HostProfile {
  prepare: number;
  forward: number;
  backward: number;
  wait: number;
  optimizer: number;
}

/** The medians over the last `steps` `[profile]` lines of a run's stderr (the timed steps; the
 *  warmup steps print first), or undefined when there are fewer lines than that. */
export function hostProfile(stderr: string, steps: number): HostProfile | undefined {
  const parts = ['prepare', 'forward', 'backward', 'wait', 'optimizer'] as const;
  const lines = stderr.split('\n').filter((l) => l.startsWith('[profile] ')).slice(-steps);
  if (steps < 1 || lines.length < steps) return undefined;
  const parsed = lines.map((l) => Object.fromEntries(parts.map((p) => [p, Number(new RegExp(`\\b${p} ([0-9.]+)`).exec(l)?.[1])])) as Record<(typeof parts)[number], number>);
  const median = (v: number[]) => {
    const s = [...v].sort((a, b) => a - b);
    return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  };
  const out = Object.fromEntries(parts.map((p) => [p, median(parsed.map((x) => x[p]))])) as unknown as HostProfile;
  return parts.every((p) => Number.isFinite(out[p])) ? out : undefined;
}
