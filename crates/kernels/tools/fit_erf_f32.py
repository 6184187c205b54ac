"""Fits the polynomials of src/erf_f32.rs and measures the f32 evaluation's error.

    python3 crates/kernels/tools/fit_erf_f32.py        (needs numpy)

erf(x) for |x| <= 0.9 is x * P(x^2), P of degree 6 (relative error), evaluated as
x + x * R(x^2) with R = P - 1; for 0.9 < |x| < 4 it is 1 - exp(Q(|x| - 0.9)), Q of degree 11
fitted to log(erfc) (absolute error; shifting by 0.9 keeps Q's rounding small where erfc, and so
its weight in the result, is largest); above 4 erf rounds to 1 in f32. exp on [-ln2/2, ln2/2] is a degree-6 polynomial. Each fit is least squares on Chebyshev
nodes, reweighted (Lawson) towards the minimax fit. The script then evaluates erf exactly as the
Rust code does (f32, plain multiply and add, no FMA) against math.erf and prints the worst error
in units in the last place.
"""
import math

import numpy as np

f32 = np.float32


def fit(fun, lo, hi, deg, var, relative):
    n = 4000
    k = np.arange(n)
    xs = (lo + hi) / 2 + (hi - lo) / 2 * np.cos(np.pi * (k + 0.5) / n)
    ys = np.array([fun(x) for x in xs])
    v = np.vander(var(xs), deg + 1)
    scale = 1 / np.abs(ys) if relative else np.ones(n)
    w = np.ones(n)
    for _ in range(30):
        c, *_ = np.linalg.lstsq(v * (scale * w)[:, None], ys * scale * w, rcond=None)
        err = np.abs(v @ c - ys) * scale
        w = w * np.sqrt(err / err.max()) + 1e-3
    return c, (np.abs(v @ c - ys) * scale).max()


def horner(coefs, u):
    r = np.full_like(u, f32(coefs[0]), dtype=np.float32)
    for c in coefs[1:]:
        r = (r * u).astype(np.float32) + f32(c)
    return r.astype(np.float32)


SMALL, LARGE, SHIFT = 0.9, 4.0, 0.9
p, p_err = fit(lambda t: math.erf(math.sqrt(t)) / math.sqrt(t) if t > 0 else 2 / math.sqrt(math.pi), 0, SMALL**2, 6, lambda t: t, True)
q, q_err = fit(lambda x: math.log(math.erfc(x)), SMALL, LARGE, 11, lambda x: x - SHIFT, False)
e, e_err = fit(math.exp, -0.3466, 0.3466, 6, lambda r: r, True)
print(f"fit errors: P {p_err:.2e} (relative), Q {q_err:.2e} (absolute), exp {e_err:.2e} (relative)")
r = np.concatenate([p[:-1], [p[-1] - 1]])
for name, c in [("R (x^2, highest degree first)", r), ("Q (|x| - 0.9)", q), ("EXP (r)", e)]:
    print(name, ", ".join(f"{v:.9e}" for v in c))

LN2_HI, LN2_LO, LOG2E, MAGIC = f32(0.693359375), f32(-2.12194440e-4), f32(1.4426950408889634), f32(12582912.0)


def exp32(y):
    t = ((y * LOG2E).astype(np.float32) + MAGIC).astype(np.float32)
    n = (t - MAGIC).astype(np.float32)
    r = (y - (n * LN2_HI).astype(np.float32)).astype(np.float32)
    r = (r - (n * LN2_LO).astype(np.float32)).astype(np.float32)
    k = t.view(np.int32) - np.int32(0x4B400000)
    scale = ((k + 127) << 23).astype(np.int32).view(np.float32)
    return (horner(e, r) * scale).astype(np.float32)


def erf32(x):
    a = np.abs(x)
    t = (a * a).astype(np.float32)
    small = (x + (x * horner(r, t)).astype(np.float32)).astype(np.float32)
    big = (f32(1) - exp32(np.minimum(horner(q, (a - f32(SHIFT)).astype(np.float32)), f32(0)))).astype(np.float32)
    big = np.copysign(np.where(a >= f32(LARGE), f32(1), big), x).astype(np.float32)
    return np.where(a <= f32(SMALL), small, big)


rng = np.random.default_rng(0)
# Every 5th f32 in [1e-6, 4.5], random values, and a log sweep down to 1e-30.
dense = np.arange(np.float32(1e-6).view(np.int32), np.float32(4.5).view(np.int32), 5).view(np.float32)
xs = np.concatenate([dense, rng.uniform(-5, 5, 100000), 10.0 ** rng.uniform(-30, 0, 50000)]).astype(np.float32)
ref = np.array([math.erf(float(v)) for v in xs])
ulps = np.abs(erf32(xs).astype(np.float64) - ref) / np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
print(f"erf in f32: worst {ulps.max():.2f} ulp at x = {xs[ulps.argmax()]}, mean {ulps.mean():.3f} ulp")
