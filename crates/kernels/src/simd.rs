//! Slice loops compiled for the widest vector extension the CPU has, chosen at run time.
//!
//! The crate is built for baseline x86-64 (SSE2), where the compiler vectorizes 4 f32 lanes at a
//! time. `vectorized!` compiles one loop body three times, plain, with AVX2 and with AVX-512F,
//! and picks the widest the CPU supports on each call (the feature test is cached). The body must
//! only use IEEE multiply, add, compare, select and bit operations, so all three compute the same
//! bits (no FMA, whose single rounding would differ between CPUs).

macro_rules! vectorized {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorized;
