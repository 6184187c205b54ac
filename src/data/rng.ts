/**
 * Small, fast, seeded pseudo random number generation for the data pipeline.
 *
 * Every random decision of the pipeline (epoch permutations, crop boxes,
 * flips) comes from a generator seeded with `deriveSeed(seed, epoch, ...)`,
 * never from shared mutable state, so any batch can be reproduced from
 * (seed, epoch, sampleIndex) alone, whatever the concurrency or the step a
 * run was resumed from.
 */

/** A generator of floats uniformly distributed in [0, 1). */
export type Rng = () => number;

const TWO_POW_32 = 4294967296;

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/** splitmix32 step, used to expand a 32-bit seed into generator state. */
function splitmix32(state: { s: number }): number {
  state.s = (state.s + 0x9e3779b9) | 0;
  let z = state.s;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return (z ^ (z >>> 16)) >>> 0;
}

function checkInteger(value: number, what: string): void {
  if (!Number.isSafeInteger(value)) {
    throw new TypeError(`${what} must be a safe integer, got ${String(value)}`);
  }
}

/**
 * Seeded generator (xoshiro128** with its state initialised by splitmix32).
 * Returns floats in [0, 1) with 32 bits of resolution.
 *
 * `seed` is any safe integer; it is reduced to 32 bits with `deriveSeed`.
 */
export function createRng(seed: number): Rng {
  checkInteger(seed, 'seed');
  const init = { s: deriveSeed(seed) | 0 };
  let a = splitmix32(init) | 0;
  let b = splitmix32(init) | 0;
  let c = splitmix32(init) | 0;
  let d = splitmix32(init) | 0;
  if ((a | b | c | d) === 0) a = 1; // the all-zero state is a fixed point
  return () => {
    const result = Math.imul(rotl(Math.imul(b, 5), 7), 9);
    const t = b << 9;
    c ^= a;
    d ^= b;
    b ^= c;
    a ^= d;
    c ^= t;
    d = rotl(d, 11);
    return (result >>> 0) / TWO_POW_32;
  };
}

function mixWord(h: number, word: number): number {
  let k = Math.imul(word, 0xcc9e2d51);
  k = rotl(k, 15);
  k = Math.imul(k, 0x1b873593);
  h ^= k;
  h = rotl(h, 13);
  return (Math.imul(h, 5) + 0xe6546b64) | 0;
}

/**
 * Hashes a list of integers (each up to 2^53 in magnitude, negatives allowed)
 * into an unsigned 32-bit seed (MurmurHash3-style mixing with a final
 * avalanche). The number of parts takes part in the hash, so
 * `deriveSeed(1) !== deriveSeed(1, 0)`.
 */
export function deriveSeed(...parts: number[]): number {
  let h = 0x2545f491;
  for (const part of parts) {
    checkInteger(part, 'deriveSeed part');
    const lo = part >>> 0;
    const hi = Math.floor(part / TWO_POW_32) >>> 0;
    h = mixWord(h, lo);
    h = mixWord(h, hi);
  }
  h ^= parts.length;
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Uniform float in [low, high). */
export function uniform(rng: Rng, low: number, high: number): number {
  return low + rng() * (high - low);
}

/** Uniform integer in [low, high], both ends inclusive. */
export function randInt(rng: Rng, low: number, high: number): number {
  if (high < low) throw new RangeError(`randInt: empty range [${low}, ${high}]`);
  return low + Math.floor(rng() * (high - low + 1));
}

/**
 * A permutation of 0..n-1 by Fisher-Yates (Durstenfeld) shuffling driven by
 * `rng`.
 */
export function permutation(n: number, rng: Rng): Uint32Array {
  const out = new Uint32Array(n);
  for (let i = 0; i < n; i++) out[i] = i;
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1));
    const t = out[i];
    out[i] = out[j];
    out[j] = t;
  }
  return out;
}

/** Standard normal sample (Box-Muller; the second value of the pair is dropped for simplicity). */
export function normal(rng: Rng): number {
  const u = 1 - rng(); // (0, 1]: log stays finite
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng());
}

/** Gamma(shape, 1) sample by Marsaglia and Tsang; shapes below 1 use the U^(1/shape) boost. */
export function gamma(rng: Rng, shape: number): number {
  if (!(shape > 0)) throw new RangeError(`gamma: shape must be positive, got ${shape}`);
  if (shape < 1) return gamma(rng, shape + 1) * Math.pow(1 - rng(), 1 / shape);
  const d = shape - 1 / 3;
  const c = 1 / Math.sqrt(9 * d);
  for (;;) {
    let x: number;
    let v: number;
    do {
      x = normal(rng);
      v = 1 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const u = 1 - rng();
    if (Math.log(u) < 0.5 * x * x + d - d * v + d * Math.log(v)) return d * v;
  }
}

/** Beta(a, b) sample as X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b). */
export function beta(rng: Rng, a: number, b: number): number {
  const x = gamma(rng, a);
  const y = gamma(rng, b);
  return x / (x + y);
}
