//! A small seeded PRNG (xoshiro256**, seeded through splitmix64) for weight init and mask noise.
//! Ours rather than a crate's so that streams stay identical across dependency upgrades:
//! resumed runs and recorded benchmarks depend on it.

#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        Self { s: [splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x)] }
    }

    /// A stream derived from several integers (e.g. seed and step), independent of call order elsewhere.
    pub fn derived(parts: &[u64]) -> Self {
        let mut x = 0x1234_5678_9ABC_DEF0u64;
        for &p in parts {
            x ^= p;
            x = splitmix64(&mut x);
        }
        Self::new(x)
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Normal(0, std) truncated to [-2, 2] absolute (timm's trunc_normal_ default bounds), by rejection.
    pub fn trunc_normal(&mut self, std: f64) -> f64 {
        loop {
            let v = self.normal() * std;
            if (-2.0..=2.0).contains(&v) {
                return v;
            }
        }
    }
}
