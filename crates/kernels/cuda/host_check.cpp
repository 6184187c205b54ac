// Runs the kernels on the CPU, as plain C++ with the CUDA built-ins emulated (every block and
// thread of the launch in turn), against references written straight from the definitions in
// double. This checks the kernels' index math, grid coverage (outputs start as NaN, so an
// element no thread writes fails), the partial-sum reductions and the alignment of every vector
// access where there is no GPU, in f32 and, for the kernels pretraining runs in bf16, in bf16
// (a bit-exact stand-in for the GPU's type); the GPU check's agreement run is still what says
// they are right on a GPU (real warps and tensor cores, f16, the Rust launch code). The row kernels' warps are emulated
// with 32 OS threads meeting at a barrier for each shuffle; the attention kernels' blocks with
// an OS thread per CUDA thread meeting at a barrier for each __syncthreads, their __shared__
// arrays as statics (one block runs at a time).
//
//   g++ -std=c++20 -O1 -pthread -o /tmp/host_check crates/kernels/cuda/host_check.cpp && /tmp/host_check
//   (scripts/check-cuda-ptx.sh runs it)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <algorithm>
#include <barrier>
#include <thread>
#include <span>
#include <type_traits>
#include <vector>

// ---- the CUDA built-ins the kernels use ----
#define CONVMAE_HOST_EMULATION
#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
// bf16 as the GPU stores it (the upper half of an f32), with CUDA's conversions: widening is
// exact; narrowing rounds to nearest even, NaN staying NaN. So the kernels' 16-bit forms (8
// elements to a 16-byte vector, 2-byte rows in shared memory) run here too, bit for bit in
// what they store.
struct __nv_bfloat16 {
    uint16_t bits;
};
static inline float __bfloat162float(__nv_bfloat16 v) {
    const uint32_t u = (uint32_t)v.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40u)};  // a quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
// The GPU's rule for vector accesses (common.cuh CONVMAE_EXPECT_ALIGNED): a misaligned one
// stops the check where the GPU would fault.
static void emulated_expect_aligned(const void* p, size_t bytes, const char* file, int line) {
    if (reinterpret_cast<uintptr_t>(p) % bytes == 0) return;
    std::fprintf(stderr, "%s:%d: a %zu-byte vector access at %p is misaligned (a fault on the GPU)\n", file, line, bytes, p);
    std::abort();
}
struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
// Per emulated thread (the warp launches run each lane on an OS thread of its own).
static thread_local Dim3 blockIdx, threadIdx;
static Dim3 blockDim, gridDim;
using std::min;

// One block's barrier: all its threads meet (launch_blocks runs a block at a time).
static std::barrier<>* block_barrier = nullptr;
static void __syncthreads() { block_barrier->arrive_and_wait(); }
// And one per warp of the block: a warp's lanes meet at __syncwarp and shuffles, whatever the
// block's other warps do (the flash kernels' idle warps leave after their first __syncthreads).
static std::barrier<>* warp_barriers[32] = {};
static void __syncwarp() { warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

// A shuffle: every lane publishes its value, all meet, each reads its partner's. In a warp
// launch (launch_warps, one warp at a time) the 32 lanes of that warp; in a block launch, the
// lanes of each warp by its own barrier.
static float shfl_values[1024];
static std::barrier<>* shfl_barrier = nullptr;
static float __shfl_xor_sync(unsigned, float v, int offset) {
    std::barrier<>* meet = shfl_barrier ? shfl_barrier : warp_barriers[threadIdx.x / 32];
    const unsigned slot = shfl_barrier ? threadIdx.x % 32 : threadIdx.x;
    shfl_values[slot] = v;
    meet->arrive_and_wait();
    const float other = shfl_values[slot ^ (unsigned)offset];
    meet->arrive_and_wait();
    return other;
}

// The flash kernels' dynamic shared memory (set per launch) and tensor-core products. A
// fragment here is the whole 16x16 tile, row-major, held by every lane (on the GPU each lane
// holds an unspecified share): the kernels only load, multiply, fill and store fragments, whose
// results do not depend on that share. Stores are made by lane 0, which the kernels' __syncwarp
// after each store makes visible to the other lanes, as on the GPU.
static unsigned char* emulated_dynamic_shared = nullptr;
static unsigned emulated_dynamic_shared_bytes = 0;
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int num_elements = M * N;
    T x[M * N];
};
// The wmma rules (CUDA C++ Programming Guide, "Warp Matrix Functions"): the pointer 256-bit
// aligned, the leading dimension a multiple of 16 bytes.
template <typename T>
static void expect_wmma_layout(const T* p, unsigned ldm) {
    emulated_expect_aligned(p, 32, "wmma load/store pointer", 0);
    if (ldm * sizeof(T) % 16 != 0) {
        std::fprintf(stderr, "wmma: leading dimension %u of %zu-byte elements is not a multiple of 16 bytes\n", ldm, sizeof(T));
        std::abort();
    }
}
static float widened(float v) { return v; }
static float widened(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename Use, typename T, typename Layout>
static void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    expect_wmma_layout(p, ldm);
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c];
}
template <typename T, typename LayoutB>
static void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
    float result[256];
    for (int r = 0; r < 16; ++r)
        for (int col = 0; col < 16; ++col) {
            float s = c.x[r * 16 + col];
            for (int k = 0; k < 16; ++k) s += widened(a.x[r * 16 + k]) * widened(b.x[k * 16 + col]);
            result[r * 16 + col] = s;
        }
    std::copy(result, result + 256, d.x);
}
static void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t) {
    expect_wmma_layout(p, ldm);
    if (threadIdx.x % 32 != 0) return;
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.x[r * 16 + c];
}
template <typename F, typename V>
static void fill_fragment(F& f, V v) {
    std::fill(f.x, f.x + F::num_elements, v);
}
}  // namespace wmma

// mma.sync.m16n8k16 of one warp (flash.cu's one-pass forward), from the fragment layouts of
// the PTX ISA ("Matrix Fragments for mma.m16n8k16"), written out here on their own: every lane
// publishes its elements of A (16x16), B (16x8) and C (16x8) at their places, the warp meets,
// each lane computes its four elements of D = C + A B in f32 (k in order), and the warp meets
// again before the matrices are reused.
static float mma_a[32][16][16], mma_b[32][16][8], mma_c[32][16][8];
static void mma_m16n8k16_emulated(float d[4], const float a[8], const float b[4]) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // a_i: row g for i < 2 and 4 <= i < 6, else g + 8; column 2t + (i & 1), + 8 for i >= 4.
    for (int i = 0; i < 8; ++i) mma_a[w][(i < 2 || (i >= 4 && i < 6)) ? g : g + 8][2 * t + (i & 1) + (i >= 4 ? 8 : 0)] = a[i];
    // b_i: row (k) 2t + (i & 1), + 8 for i >= 2; column g.
    for (int i = 0; i < 4; ++i) mma_b[w][2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = b[i];
    // c_i: row g for i < 2, else g + 8; column 2t + (i & 1).
    for (int i = 0; i < 4; ++i) mma_c[w][i < 2 ? g : g + 8][2 * t + (i & 1)] = d[i];
    __syncwarp();
    for (int i = 0; i < 4; ++i) {
        const int r = i < 2 ? g : g + 8, c = 2 * t + (i & 1);
        float s = mma_c[w][r][c];
        for (int k = 0; k < 16; ++k) s += mma_a[w][r][k] * mma_b[w][k][c];
        d[i] = s;
    }
    __syncwarp();
}

// roi_align.cu's double arithmetic: the _rn intrinsics round each operation on its own, as
// C++ does here (g++ contracts nothing in ISO mode, and x86-64 without -mfma has no fused
// multiply-add). Its float atomics: launch() runs one thread at a time, so a plain
// read-add-write is atomic here.
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
template <typename T>
static T atomicAdd(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}

#include "attention.cu"
#include "depthwise.cu"
#include "elementwise.cu"
#include "flash.cu"
#include "roi_align.cu"
#include "rows.cu"

// Runs `kernel` for every (block, thread) of a 1-D launch, like the Rust side sizes it.
template <typename F>
static void launch(int64_t threads, unsigned block, F kernel) {
    const int64_t blocks = std::max<int64_t>(1, (threads + block - 1) / block);
    blockDim.x = block;
    gridDim.x = (unsigned)blocks;
    for (int64_t b = 0; b < blocks; ++b) {
        blockIdx.x = (unsigned)b;
        for (unsigned t = 0; t < block; ++t) {
            threadIdx.x = t;
            kernel();
        }
    }
}

// A launch of warp-per-row kernels: blocks of `block` threads, each warp's 32 lanes run together.
template <typename F>
static void launch_warps(int64_t threads, unsigned block, F kernel) {
    const int64_t blocks = std::max<int64_t>(1, (threads + block - 1) / block);
    blockDim.x = block;
    gridDim.x = (unsigned)blocks;
    std::barrier<> barrier(32);
    shfl_barrier = &barrier;
    for (int64_t b = 0; b < blocks; ++b)
        for (unsigned warp = 0; warp < block / 32; ++warp) {
            std::vector<std::thread> lanes;
            for (unsigned lane = 0; lane < 32; ++lane)
                lanes.emplace_back([&, b, warp, lane] {
                    blockIdx.x = (unsigned)b;
                    threadIdx.x = warp * 32 + lane;
                    kernel();
                });
            for (auto& t : lanes) t.join();
        }
    shfl_barrier = nullptr;
}

// A 2-D grid of blocks of `block` threads, every thread of a block on an OS thread of its own
// (they meet at __syncthreads), one block at a time.
template <typename F>
static void launch_blocks(unsigned grid_x, unsigned grid_y, unsigned block, F kernel) {
    blockDim = Dim3{block, 1, 1};
    gridDim = Dim3{grid_x, grid_y, 1};
    std::barrier<> barrier(block);
    block_barrier = &barrier;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (unsigned w = 0; w * 32 < block; ++w) {
        warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - w * 32)));
        warp_barriers[w] = warps.back().get();
    }
    for (unsigned by = 0; by < grid_y; ++by)
        for (unsigned bx = 0; bx < grid_x; ++bx) {
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < block; ++t)
                threads.emplace_back([&, bx, by, t] {
                    blockIdx = Dim3{bx, by, 0};
                    threadIdx = Dim3{t, 0, 0};
                    kernel();
                });
            for (auto& th : threads) th.join();
        }
    block_barrier = nullptr;
    std::fill(std::begin(warp_barriers), std::end(warp_barriers), nullptr);
}

static int failures = 0;

// `got` in f32, or in f64 for the kernels that have an f64 form (roi_align.cu).
template <typename G>
static void check(const char* what, const std::vector<G>& got, const std::vector<double>& want, double tol) {
    double diff = 0, scale = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double d = std::fabs(got[i] - want[i]);
        if (!(d <= diff)) diff = d;  // NaN wins
        scale = std::max(scale, std::fabs(want[i]));
    }
    const double rel = scale > 0 ? diff / scale : diff;
    const bool ok = rel <= tol && got.size() == want.size();
    if (!ok) ++failures;
    std::printf("%-58s rel %.2e %s\n", what, rel, ok ? "ok" : "FAIL");
}

static std::vector<float> random_values(size_t n, unsigned seed) {
    std::vector<float> v(n);
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (auto& x : v) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        x = (float)((double)(s >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
    }
    return v;
}

// ---- f32 and bf16 ----
// The checks templated on the storage type T run each kernel's f32 form and its bf16 form,
// whose vectors hold 8 elements, not 4, and whose shared-memory rows are 2-byte: inputs are
// drawn as f32, made representable in T (so the double references see what the kernel reads),
// outputs widened back. A bf16 result is rounded once, to 2^-9 of itself, so its tolerance is
// at least 8e-3 of the largest reference value; bitwise checks stay bitwise.
template <typename T> static const char* const type_name = "f32";
template <> const char* const type_name<__nv_bfloat16> = "bf16";

template <typename T>
static std::vector<T> narrowed(const std::vector<float>& v) {
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = convmae::store<T>(v[i]);
    return out;
}
template <typename T>
static std::vector<float> as_f32(const std::vector<T>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = convmae::load(v[i]);
    return out;
}
template <typename T>
static std::vector<float> representable(const std::vector<float>& v) {
    return as_f32(narrowed<T>(v));
}
template <typename T>
static std::vector<T> nans(size_t n) {
    return std::vector<T>(n, convmae::store<T>(NAN));
}
template <typename T>
static void check_t(const char* what, const std::vector<T>& got, const std::vector<double>& want, double f32_tol, double bf16_tol = 8e-3) {
    char name[160];
    std::snprintf(name, sizeof name, "[%s] %s", type_name<T>, what);
    const double tol = std::is_same_v<T, float> || f32_tol == 0 ? f32_tol : std::max(f32_tol, bf16_tol);
    check(name, as_f32(got), want, tol);
}
// A kernel by storage type: the f32 or the bf16 instantiation of the same source.
template <typename T, typename F32, typename BF16>
static auto by_type(F32 f32, BF16 bf16) {
    if constexpr (std::is_same_v<T, float>)
        return f32;
    else
        return bf16;
}
#define TYPED(name) by_type<T>(name##_f32, name##_bf16)

static const char* k_suffix(int k) { return k == 3 ? "k3" : k == 5 ? "k5" : k == 7 ? "k7" : "kany"; }

// The kernels by kernel size, as src/cuda.rs picks them by name.
#define PICK(prefix, k)                                                      \
    ((k) == 3 ? prefix##_k3_f32 : (k) == 5 ? prefix##_k5_f32 : (k) == 7 ? prefix##_k7_f32 \
                                                                        : prefix##_kany_f32)

#define PICK_FIXED(prefix, k) ((k) == 3 ? prefix##_k3_f32 : (k) == 5 ? prefix##_k5_f32 : prefix##_k7_f32)
#define PICK_IN(prefix, k, S) \
    ((k) == 3 ? prefix##_k3_##S : (k) == 5 ? prefix##_k5_##S : (k) == 7 ? prefix##_k7_##S : prefix##_kany_##S)
#define PICK_T(prefix, k) by_type<T>(PICK_IN(prefix, k, f32), PICK_IN(prefix, k, bf16))
#define PICK_FIXED_IN(prefix, k, S) ((k) == 3 ? prefix##_k3_##S : (k) == 5 ? prefix##_k5_##S : prefix##_k7_##S)
#define PICK_FIXED_T(prefix, k) by_type<T>(PICK_FIXED_IN(prefix, k, f32), PICK_FIXED_IN(prefix, k, bf16))

static void check_dense(int64_t nb, int64_t h, int64_t w, int64_t c, int k, int64_t target_parts) {
    const int p = k / 2, kk = k * k;
    const auto x = random_values(nb * h * w * c, 1 + k), wt = random_values(c * kk, 2 + k), g = random_values(nb * h * w * c, 3 + k);
    auto at = [&](const std::vector<float>& t, int64_t b, int64_t y, int64_t xx, int64_t ch) -> double {
        if (y < 0 || y >= h || xx < 0 || xx >= w) return 0;
        return t[((b * h + y) * w + xx) * c + ch];
    };
    // Reference: forward, input gradient by scattering through the forward's taps, weight grad.
    std::vector<double> fwd(x.size(), 0), gin(x.size(), 0), gw(c * kk, 0);
    for (int64_t b = 0; b < nb; ++b)
        for (int64_t y = 0; y < h; ++y)
            for (int64_t xx = 0; xx < w; ++xx)
                for (int64_t ch = 0; ch < c; ++ch)
                    for (int i = 0; i < k; ++i)
                        for (int j = 0; j < k; ++j) {
                            const int64_t yy = y + i - p, xs = xx + j - p;
                            const int64_t o = ((b * h + y) * w + xx) * c + ch;
                            fwd[o] += (double)wt[ch * kk + i * k + j] * at(x, b, yy, xs, ch);
                            if (yy >= 0 && yy < h && xs >= 0 && xs < w) {
                                gin[((b * h + yy) * w + xs) * c + ch] += (double)wt[ch * kk + i * k + j] * g[o];
                                gw[ch * kk + i * k + j] += (double)g[o] * x[((b * h + yy) * w + xs) * c + ch];
                            }
                        }
    char name[128];
    std::vector<float> out(x.size(), NAN);
    auto correlate = PICK(dwconv_correlate, k);
    launch(nb * h * ((w + 3) / 4) * c, 256, [&] { correlate(x.data(), wt.data(), out.data(), nb, h, w, c, k, 0); });
    std::snprintf(name, sizeof name, "dense forward %s B%lld H%lld W%lld C%lld", k_suffix(k), (long long)nb, (long long)h, (long long)w, (long long)c);
    check(name, out, fwd, 1e-5);
    std::fill(out.begin(), out.end(), NAN);
    launch(nb * h * ((w + 3) / 4) * c, 256, [&] { correlate(g.data(), wt.data(), out.data(), nb, h, w, c, k, 1); });
    std::snprintf(name, sizeof name, "dense input grad %s", k_suffix(k));
    check(name, out, gin, 1e-5);
    // Weight gradient: the split of src/cuda.rs (`split`) with a small target so there are
    // several parts, then the fixed-order reduction into [C, K, K].
    const int64_t rows = nb * h;
    const int64_t per_part = std::max<int64_t>(1, (rows + target_parts - 1) / target_parts);
    const int64_t parts = (rows + per_part - 1) / per_part;
    std::vector<float> partials(parts * kk * c, NAN), wgrad(c * kk, NAN);
    auto partial = PICK(dwconv_weight_partials, k);
    launch(parts * c, 256, [&] { partial(x.data(), g.data(), partials.data(), nb, h, w, c, k, per_part, parts); });
    launch_warps(kk * c * 32, 256, [&] { dw_reduce_partials_f32(partials.data(), wgrad.data(), parts, kk, c, 1); });
    std::snprintf(name, sizeof name, "dense weight grad %s (%lld parts of %lld rows)", k_suffix(k), (long long)parts, (long long)per_part);
    check(name, wgrad, gw, 1e-5);
}

template <typename T>
static void check_sparse(int64_t nb, int64_t h, int64_t w, int64_t c, int k, int64_t target_parts) {
    const int p = k / 2, kk = k * k;
    // Visible positions: a pseudo-random half of the grid; row n of position (b, y, x).
    std::vector<int> row_of(nb * h * w, -1);
    std::vector<int64_t> pos;
    const auto coin = random_values(nb * h * w, 7 + k);
    for (int64_t cell = 0; cell < nb * h * w; ++cell)
        if (coin[cell] > 0) {
            row_of[cell] = (int)pos.size();
            pos.push_back(cell);
        }
    const int64_t rows = (int64_t)pos.size();
    std::vector<int32_t> nbr(rows * kk, -1);
    for (int64_t n = 0; n < rows; ++n) {
        const int64_t b = pos[n] / (h * w), y = pos[n] / w % h, xx = pos[n] % w;
        for (int i = 0; i < k; ++i)
            for (int j = 0; j < k; ++j) {
                const int64_t yy = y + i - p, xs = xx + j - p;
                if (yy >= 0 && yy < h && xs >= 0 && xs < w) nbr[n * kk + i * k + j] = row_of[(b * h + yy) * w + xs];
            }
    }
    const auto x = representable<T>(random_values(rows * c, 4 + k)), wt = representable<T>(random_values(c * kk, 5 + k)),
               g = representable<T>(random_values(rows * c, 6 + k));
    const auto xt = narrowed<T>(x), wtt = narrowed<T>(wt), gt = narrowed<T>(g);
    std::vector<double> fwd(rows * c, 0), gin(rows * c, 0), gw(c * kk, 0);
    for (int64_t n = 0; n < rows; ++n)
        for (int t = 0; t < kk; ++t) {
            const int m = nbr[n * kk + t];
            if (m < 0) continue;
            for (int64_t ch = 0; ch < c; ++ch) {
                fwd[n * c + ch] += (double)wt[ch * kk + t] * x[m * c + ch];
                gin[m * c + ch] += (double)wt[ch * kk + t] * g[n * c + ch];  // scatter, no symmetry used
                gw[ch * kk + t] += (double)g[n * c + ch] * x[m * c + ch];
            }
        }
    char name[128];
    auto out = nans<T>(rows * c);
    auto gather = PICK_T(sdwconv_gather, k);
    launch((rows + 7) / 8 * c, 256, [&] { gather(xt.data(), wtt.data(), nbr.data(), out.data(), rows, c, k, 0); });
    std::snprintf(name, sizeof name, "sparse forward %s rows %lld C%lld", k_suffix(k), (long long)rows, (long long)c);
    check_t(name, out, fwd, 1e-5);
    out = nans<T>(rows * c);
    launch((rows + 7) / 8 * c, 256, [&] { gather(gt.data(), wtt.data(), nbr.data(), out.data(), rows, c, k, 1); });
    std::snprintf(name, sizeof name, "sparse input grad %s", k_suffix(k));
    check_t(name, out, gin, 1e-5);
    const int64_t per_part = std::max<int64_t>(1, (rows + target_parts - 1) / target_parts);
    const int64_t parts = (rows + per_part - 1) / per_part;
    std::vector<float> partials(parts * kk * c, NAN);
    auto wgrad = nans<T>(c * kk);
    auto partial = PICK_T(sdwconv_weight_partials, k);
    auto reduce = TYPED(dw_reduce_partials);
    launch(parts * c, 256, [&] { partial(xt.data(), gt.data(), nbr.data(), partials.data(), rows, c, k, per_part, parts); });
    launch_warps(kk * c * 32, 256, [&] { reduce(partials.data(), wgrad.data(), parts, kk, c, 1); });
    std::snprintf(name, sizeof name, "sparse weight grad %s (%lld parts of %lld rows)", k_suffix(k), (long long)parts, (long long)per_part);
    check_t(name, wgrad, gw, 1e-5);
    if (k != 3 && k != 5 && k != 7) return;  // the vector forms exist for the kernel sizes compiled fixed

    // The vector forms (16 bytes of channels a thread in the gather: 4 in f32, 8 in bf16; 2
    // channels in the weight partials), where C allows them, launched as src/cuda.rs does.
    const int lanes = 16 / (int)sizeof(T);
    if (c % lanes == 0) {
        auto w_t = nans<T>(kk * c);
        launch(kk * c, 256, [&] { TYPED(dw_taps_major)(wtt.data(), w_t.data(), c, kk); });
        std::vector<double> want_t(kk * c);
        for (int64_t ch = 0; ch < c; ++ch)
            for (int t = 0; t < kk; ++t) want_t[t * c + ch] = wt[ch * kk + t];
        check_t("sparse taps-major weight", w_t, want_t, 0);
        auto gather_lanes = PICK_FIXED_T(sdwconv_gather_lanes, k);
        const int64_t threads = rows * (c / lanes);
        out = nans<T>(rows * c);
        launch(threads, 256, [&] { gather_lanes(xt.data(), w_t.data(), nbr.data(), out.data(), rows, c, 0); });
        std::snprintf(name, sizeof name, "sparse forward, %d channels a thread %s C%lld", lanes, k_suffix(k), (long long)c);
        check_t(name, out, fwd, 1e-5);
        out = nans<T>(rows * c);
        launch(threads, 256, [&] { gather_lanes(gt.data(), w_t.data(), nbr.data(), out.data(), rows, c, 1); });
        std::snprintf(name, sizeof name, "sparse input grad, %d channels a thread", lanes);
        check_t(name, out, gin, 1e-5);
    }
    if (c % 2 == 0) {
        std::fill(partials.begin(), partials.end(), NAN);
        wgrad = nans<T>(c * kk);
        auto partial_lanes = PICK_FIXED_T(sdwconv_weight_partials_lanes, k);
        launch(parts * (c / 2), 256, [&] { partial_lanes(xt.data(), gt.data(), nbr.data(), partials.data(), rows, c, per_part, parts); });
        launch_warps(kk * c * 32, 256, [&] { reduce(partials.data(), wgrad.data(), parts, kk, c, 1); });
        std::snprintf(name, sizeof name, "sparse weight grad, 2 channels a thread %s C%lld", k_suffix(k), (long long)c);
        check_t(name, wgrad, gw, 1e-5);
    }
}

// GELU (erf) forward and backward on n elements not a multiple of a vector (4 f32, 8 bf16: the
// tail), on a grid smaller than n / 256 (the grid-stride loop), then on views one element in
// (not 16-byte aligned: the element path).
template <typename T>
static void check_gelu() {
    const int64_t n = 70001;
    auto x = random_values(n, 11);
    for (auto& v : x) v *= 4;
    x = representable<T>(x);
    const auto g = representable<T>(random_values(n, 12));
    const auto xt = narrowed<T>(x), gt = narrowed<T>(g);
    std::vector<double> y(n), gx(n);
    for (int64_t i = 0; i < n; ++i) {
        const double xv = x[i];
        y[i] = 0.5 * xv * (1 + std::erf(xv / std::sqrt(2.0)));
        gx[i] = (0.5 * (1 + std::erf(xv / std::sqrt(2.0))) + xv * std::exp(-0.5 * xv * xv) / std::sqrt(2 * M_PI)) * g[i];
    }
    auto out = nans<T>(n);
    launch(64 * 256, 256, [&] { TYPED(gelu_erf_fwd)(xt.data(), out.data(), n, 1); });
    check_t("gelu forward (grid-stride, vectors)", out, y, 1e-6);
    out = nans<T>(n);
    launch(64 * 256, 256, [&] { TYPED(gelu_erf_bwd)(xt.data(), gt.data(), out.data(), n, 1); });
    check_t("gelu backward (exact derivative, vectors)", out, gx, 1e-6);
    // Views one element in, the gradient's only, then the output's only.
    std::vector<T> shifted_g(n + 1, convmae::store<T>(0.f));
    std::copy(gt.begin(), gt.end(), shifted_g.begin() + 1);
    auto shifted_out = nans<T>(n + 1);
    launch(64 * 256, 256, [&] { TYPED(gelu_erf_bwd)(xt.data(), shifted_g.data() + 1, shifted_out.data() + 1, n, 1); });
    check_t("gelu backward (unaligned views)", std::vector<T>(shifted_out.begin() + 1, shifted_out.end()), gx, 1e-6);
    shifted_out = nans<T>(n + 1);
    launch(64 * 256, 256, [&] { TYPED(gelu_erf_fwd)(xt.data(), shifted_out.data() + 1, n, 1); });
    check_t("gelu forward (unaligned output)", std::vector<T>(shifted_out.begin() + 1, shifted_out.end()), y, 1e-6);
    // `vectors` 0 (CONVMAE_VECTOR_KERNELS=off): the element path on aligned views.
    out = nans<T>(n);
    launch(64 * 256, 256, [&] { TYPED(gelu_erf_bwd)(xt.data(), gt.data(), out.data(), n, 0); });
    check_t("gelu backward (vectors off)", out, gx, 1e-6);
}

static void check_elementwise() {
    const int64_t n = 70001;  // not a multiple of the block; more than one grid-stride round below
    const auto g = random_values(n, 12);
    auto p = random_values(n, 13), m = random_values(n, 14), v = random_values(n, 15);
    for (auto& e : m) e *= 0.01f;
    for (auto& e : v) e = std::fabs(e) * 0.01f;
    const double lr = 1e-3, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.05;
    const int t = 7;
    std::vector<double> wp(n), wm(n), wv(n);
    for (int64_t i = 0; i < n; ++i) {
        wm[i] = b1 * m[i] + (1 - b1) * g[i];
        wv[i] = b2 * v[i] + (1 - b2) * (double)g[i] * g[i];
        const double denom = std::sqrt(wv[i]) / std::sqrt(1 - std::pow(b2, t)) + eps;
        wp[i] = p[i] * (1 - lr * wd) - lr / (1 - std::pow(b1, t)) * wm[i] / denom;
    }
    launch(64 * 256, 256, [&] {
        adamw_f32(p.data(), m.data(), v.data(), g.data(), n, (float)b1, (float)(1 - b1), (float)b2, (float)(1 - b2),
                  (float)(1 - lr * wd), (float)(lr / (1 - std::pow(b1, t))), (float)std::sqrt(1 - std::pow(b2, t)), (float)eps);
    });
    check("adamw parameter", p, wp, 1e-6);
    check("adamw first moment", m, wm, 1e-6);
    check("adamw second moment", v, wv, 1e-6);
    // The mixed-precision form through the same template (here with an f32 shadow: the host has
    // no bf16): the same update again from the results above, and the shadow gets the new
    // parameter.
    std::vector<double> wp2(n);
    for (int64_t i = 0; i < n; ++i) {
        const double mm = b1 * m[i] + (1 - b1) * g[i], vv = b2 * v[i] + (1 - b2) * (double)g[i] * g[i];
        wp2[i] = p[i] * (1 - lr * wd) - lr / (1 - std::pow(b1, t)) * mm / (std::sqrt(vv) / std::sqrt(1 - std::pow(b2, t)) + eps);
    }
    std::vector<float> shadow(n, NAN);
    launch(64 * 256, 256, [&] {
        adamw<float, float, float>(p.data(), m.data(), v.data(), g.data(), shadow.data(), n, (float)b1, (float)(1 - b1), (float)b2,
                                   (float)(1 - b2), (float)(1 - lr * wd), (float)(lr / (1 - std::pow(b1, t))),
                                   (float)std::sqrt(1 - std::pow(b2, t)), (float)eps);
    });
    check("adamw with a shadow: parameter", p, wp2, 1e-6);
    check("adamw with a shadow: the shadow", shadow, wp2, 1e-6);
}

// The multi-tensor AdamW, launched as src/cuda.rs adamw_many builds it: three tensors of
// different sizes and parameter groups (decay, step size), cut into chunks of at most 100
// elements (a tensor smaller than a chunk, one ending mid-chunk), on a grid smaller than the
// chunk count; gradients bf16 (tensor 1) and f32; bf16 compute copies but on tensor 1, whose
// copy is none; the first two 4 elements a thread (vec4, with tails of 1 and 2 past the last
// whole vector of a chunk), the third one at a time. A copy must be its new master rounded, to
// the bit. `guard`: none, a finite loss (the same update) or a non-finite one (every tensor
// untouched).
static void check_adamw_many(const char* label, const float* guard) {
    using bf16 = __nv_bfloat16;
    const bool applies = !guard || std::isfinite(*guard);
    const int64_t sizes[3] = {37, 250, 1};
    const bool half_grad[3] = {false, true, false}, has_copy[3] = {true, false, true};
    const double b1 = 0.9, b2 = 0.95, eps = 1e-8;
    const double lrs[3] = {1e-3, 2e-3, 5e-4}, wds[3] = {0.05, 0.0, 0.05};
    const int t = 4;
    std::vector<std::vector<float>> p, m, v, g;
    std::vector<std::vector<bf16>> g16, copy;
    std::vector<std::vector<double>> wp;
    std::vector<AdamWTensor> tensors;
    std::vector<AdamWChunk> chunks;
    for (int k = 0; k < 3; ++k) {
        const int64_t n = sizes[k];
        p.push_back(random_values(n, 40 + k));
        m.push_back(random_values(n, 50 + k));
        v.push_back(random_values(n, 60 + k));
        g.push_back(half_grad[k] ? representable<bf16>(random_values(n, 70 + k)) : random_values(n, 70 + k));
        g16.push_back(narrowed<bf16>(g[k]));
        copy.push_back(nans<bf16>(n));
        for (auto& e : m[k]) e *= 0.01f;
        for (auto& e : v[k]) e = std::fabs(e) * 0.01f;
        std::vector<double> want(n);
        for (int64_t i = 0; i < n; ++i) {
            const double mm = b1 * m[k][i] + (1 - b1) * g[k][i], vv = b2 * v[k][i] + (1 - b2) * (double)g[k][i] * g[k][i];
            want[i] = p[k][i] * (1 - lrs[k] * wds[k]) - lrs[k] / (1 - std::pow(b1, t)) * mm / (std::sqrt(vv) / std::sqrt(1 - std::pow(b2, t)) + eps);
        }
        wp.push_back(want);
    }
    for (int k = 0; k < 3; ++k) {
        const void* grad = half_grad[k] ? (const void*)g16[k].data() : (const void*)g[k].data();
        tensors.push_back(AdamWTensor{p[k].data(), m[k].data(), v[k].data(), grad, has_copy[k] ? copy[k].data() : nullptr, sizes[k],
                                      (float)(1 - lrs[k] * wds[k]), (float)(lrs[k] / (1 - std::pow(b1, t))), half_grad[k], k < 2});
        for (int64_t start = 0; start < sizes[k]; start += 100) chunks.push_back(AdamWChunk{k, 0, start, std::min<int64_t>(100, sizes[k] - start)});
    }
    const auto p0 = p, m0 = m, v0 = v;
    launch(2 * 64, 64, [&] {
        adamw_many_f32(tensors.data(), chunks.data(), (int64_t)chunks.size(), guard, (float)b1, (float)(1 - b1), (float)b2, (float)(1 - b2),
                       (float)std::sqrt(1 - std::pow(b2, t)), (float)eps);
    });
    auto copy_untouched = [&](int k) { return std::all_of(copy[k].begin(), copy[k].end(), [](bf16 x) { return std::isnan(convmae::load(x)); }); };
    if (!applies) {
        // Skipped: weights, moments and copies exactly as they were.
        bool untouched = true;
        for (int k = 0; k < 3; ++k) untouched = untouched && p[k] == p0[k] && m[k] == m0[k] && v[k] == v0[k] && copy_untouched(k);
        if (!untouched) ++failures;
        char name[96];
        std::snprintf(name, sizeof name, "adamw many (%s): nothing written", label);
        std::printf("%-58s %s\n", name, untouched ? "ok" : "FAIL");
        return;
    }
    for (int k = 0; k < 3; ++k) {
        char name[96];
        std::snprintf(name, sizeof name, "adamw many (%s): tensor %d of %lld", label, k, (long long)sizes[k]);
        check(name, p[k], wp[k], 1e-6);
        if (!has_copy[k]) continue;
        const auto rounded = narrowed<bf16>(p[k]);
        bool same = true;
        for (int64_t i = 0; i < sizes[k]; ++i) same = same && copy[k][i].bits == rounded[i].bits;
        if (!same) ++failures;
        std::printf("%-58s %s\n", "adamw many: its bf16 copy is the new master rounded", same ? "ok" : "FAIL");
    }
    const bool untouched = copy_untouched(1);
    if (!untouched) ++failures;
    std::printf("%-58s %s\n", "adamw many: no copy written where there is none", untouched ? "ok" : "FAIL");
}

// The neighbour table of a mask's visible token blocks, against one built the other way
// round (src/sparse_depthwise_conv.rs from_positions): list every visible position in row
// order, map each grid cell to its row, then read each tap off the map. Random masks, cells of
// 1, 2 and 4 positions, several kernel sizes; a grid stride (fewer threads than entries).
static void check_visible_neighbors(int images, int grid, int cell, int len_keep, int k, unsigned seed) {
    const int tokens = grid * grid, side = grid * cell, cc = cell * cell;
    std::vector<uint32_t> ids_keep;
    std::vector<int32_t> slot(images * tokens, -1);
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 7;
    for (int b = 0; b < images; ++b) {
        std::vector<uint32_t> order(tokens);
        for (int t = 0; t < tokens; ++t) order[t] = t;
        for (int t = tokens - 1; t > 0; --t) {
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;
            std::swap(order[t], order[s % (t + 1)]);
        }
        for (int v = 0; v < len_keep; ++v) {
            ids_keep.push_back(order[v]);
            slot[b * tokens + order[v]] = v;
        }
    }
    const int64_t rows = (int64_t)images * len_keep * cc, n = rows * k * k;
    std::vector<int32_t> map(images * side * side, -1), want(n, -1);
    std::vector<int64_t> py(rows), px(rows), pb(rows);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / (len_keep * cc), v = r / cc % len_keep, q = r % cc, t = ids_keep[b * len_keep + v];
        pb[r] = b, py[r] = t / grid * cell + q / cell, px[r] = t % grid * cell + q % cell;
        map[(b * side + py[r]) * side + px[r]] = (int32_t)r;
    }
    for (int64_t r = 0; r < rows; ++r)
        for (int i = 0; i < k; ++i)
            for (int j = 0; j < k; ++j) {
                const int64_t y = py[r] + i - k / 2, x = px[r] + j - k / 2;
                if (y >= 0 && x >= 0 && y < side && x < side) want[(r * k + i) * k + j] = map[(pb[r] * side + y) * side + x];
            }
    std::vector<int32_t> got(n, -2);
    launch(std::max<int64_t>(1, n / 3), 64, [&] { ::visible_neighbors(ids_keep.data(), slot.data(), got.data(), n, k, cell, grid, len_keep); });
    const bool same = got == want;
    if (!same) ++failures;
    char name[96];
    std::snprintf(name, sizeof name, "visible neighbours: %d images, grid %d, cell %d, %d kept, k %d", images, grid, cell, len_keep, k);
    std::printf("%-58s %s\n", name, same ? "ok" : "FAIL");
}

// The image normalization against the host path's f32 formula: the same bits.
static void check_normalize() {
    const int64_t n = 3 * 1000 + 3;
    std::vector<uint8_t> px(n);
    for (int64_t i = 0; i < n; ++i) px[i] = (uint8_t)((i * 37 + 11) % 256);
    const float mean[3] = {0.485f, 0.456f, 0.406f}, sd[3] = {0.229f, 0.224f, 0.225f};
    std::vector<double> want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = ((float)px[i] / 255.0f - mean[i % 3]) / sd[i % 3];
    std::vector<float> out(n, NAN);
    launch(3 * 256, 256, [&] { normalize_rgb_u8(px.data(), out.data(), n, mean[0], mean[1], mean[2], sd[0], sd[1], sd[2]); });
    check("normalize uint8 RGB (grid-stride, bitwise)", out, want, 0);
}

// LayerNorm and softmax over `rows` rows of `d`, launched as src/cuda.rs does (4 warps a block):
// 16 bytes a lane where d allows (4 f32, 8 bf16), else an element.
template <typename T>
static void check_rows(int64_t rows, int64_t d, int64_t target_parts) {
    const float eps = 1e-6f;
    auto x = random_values(rows * d, 21);
    for (int64_t i = 0; i < rows * d; ++i) x[i] = 3 * x[i] + 0.5f;  // a mean away from zero
    x = representable<T>(x);
    const auto w = representable<T>(random_values(d, 22)), bias = representable<T>(random_values(d, 23)),
               g = representable<T>(random_values(rows * d, 24));
    const auto xt = narrowed<T>(x), wt = narrowed<T>(w), bt = narrowed<T>(bias), gt = narrowed<T>(g);
    std::vector<double> y(rows * d), gx(rows * d), gwb(2 * d, 0), stats(2 * rows);
    for (int64_t r = 0; r < rows; ++r) {
        double mean = 0, var = 0;
        for (int64_t j = 0; j < d; ++j) mean += x[r * d + j];
        mean /= d;
        for (int64_t j = 0; j < d; ++j) var += (x[r * d + j] - mean) * (x[r * d + j] - mean);
        var /= d;
        const double rstd = 1 / std::sqrt(var + eps);
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
        double sgw = 0, sgwx = 0;
        for (int64_t j = 0; j < d; ++j) {
            const double xhat = (x[r * d + j] - mean) * rstd;
            y[r * d + j] = xhat * w[j] + bias[j];
            sgw += (double)g[r * d + j] * w[j];
            sgwx += (double)g[r * d + j] * w[j] * xhat;
            gwb[j] += g[r * d + j] * xhat;
            gwb[d + j] += g[r * d + j];
        }
        for (int64_t j = 0; j < d; ++j) {
            const double xhat = (x[r * d + j] - mean) * rstd;
            gx[r * d + j] = rstd * (g[r * d + j] * w[j] - sgw / d - xhat * sgwx / d);
        }
    }
    char name[128];
    auto out = nans<T>(rows * d);
    std::vector<float> st(2 * rows, NAN);
    launch_warps(rows * 32, 128, [&] { TYPED(layer_norm_fwd)(xt.data(), wt.data(), bt.data(), out.data(), st.data(), rows, d, eps, 1); });
    std::snprintf(name, sizeof name, "layer_norm forward rows %lld D%lld", (long long)rows, (long long)d);
    check_t(name, out, y, 1e-5);
    check_t("layer_norm saved (mean, rstd)", st, stats, 1e-5);
    std::vector<float> st2(2 * rows, NAN);
    launch_warps(rows * 32, 128, [&] { TYPED(layer_norm_stats)(xt.data(), st2.data(), rows, d, eps, 1); });
    check_t("layer_norm recomputed (mean, rstd)", st2, stats, 1e-5);
    // The packed [rows + 2, d] gradient, as src/cuda.rs lays it out.
    auto packed = nans<T>((rows + 2) * d);
    launch_warps(rows * 32, 128, [&] { TYPED(layer_norm_bwd_input)(xt.data(), wt.data(), gt.data(), st.data(), packed.data(), rows, d, 1); });
    const int64_t per_part = std::max<int64_t>(1, (rows + target_parts - 1) / target_parts);
    const int64_t parts = (rows + per_part - 1) / per_part;
    std::vector<float> partials(parts * 2 * d, NAN);
    auto reduce = TYPED(rows_reduce_partials);
    launch(parts * d, 256, [&] { TYPED(layer_norm_param_partials)(xt.data(), gt.data(), st.data(), partials.data(), rows, d, per_part, parts, 0); });
    launch_warps(2 * d * 32, 256, [&] { reduce(partials.data(), packed.data() + rows * d, parts, 2, d, 0); });
    check_t("layer_norm input grad", std::vector<T>(packed.begin(), packed.begin() + rows * d), gx, 1e-5);
    // The sublayer's form: the residual's gradient (here x) added in the same pass.
    auto with_residual = nans<T>(rows * d);
    launch_warps(rows * 32, 128, [&] { TYPED(layer_norm_bwd_input_add)(xt.data(), wt.data(), gt.data(), st.data(), xt.data(), with_residual.data(), rows, d, 1); });
    std::vector<double> gx_plus(rows * d);
    for (int64_t i = 0; i < rows * d; ++i) gx_plus[i] = gx[i] + x[i];
    check_t("layer_norm input grad + the residual's", with_residual, gx_plus, 1e-5);
    // `vectors` 0 (CONVMAE_VECTOR_KERNELS=off): one element a lane however d and the addresses allow.
    out = nans<T>(rows * d);
    launch_warps(rows * 32, 128, [&] { TYPED(layer_norm_fwd)(xt.data(), wt.data(), bt.data(), out.data(), st2.data(), rows, d, eps, 0); });
    check_t("layer_norm forward (vectors off)", out, y, 1e-5);
    with_residual = nans<T>(rows * d);
    launch_warps(rows * 32, 128, [&] { TYPED(layer_norm_bwd_input_add)(xt.data(), wt.data(), gt.data(), st.data(), xt.data(), with_residual.data(), rows, d, 0); });
    check_t("layer_norm input grad + the residual's (vectors off)", with_residual, gx_plus, 1e-5);
    std::snprintf(name, sizeof name, "layer_norm weight + bias grads (%lld parts)", (long long)parts);
    check_t(name, std::vector<T>(packed.begin() + rows * d, packed.end()), gwb, 1e-5);
    const int64_t columns = 8 / (int64_t)sizeof(T);  // a thread's 8 bytes: 2 f32, 4 bf16
    if (d % columns == 0) {
        // As src/cuda.rs launches it where it can.
        std::fill(partials.begin(), partials.end(), NAN);
        std::fill(packed.begin() + rows * d, packed.end(), convmae::store<T>(NAN));
        launch(parts * d / columns, 256, [&] { TYPED(layer_norm_param_partials)(xt.data(), gt.data(), st.data(), partials.data(), rows, d, per_part, parts, 1); });
        launch_warps(2 * d * 32, 256, [&] { reduce(partials.data(), packed.data() + rows * d, parts, 2, d, 0); });
        std::snprintf(name, sizeof name, "layer_norm weight + bias grads, %lld columns a thread (%lld parts)", (long long)columns, (long long)parts);
        check_t(name, std::vector<T>(packed.begin() + rows * d, packed.end()), gwb, 1e-5);
    }

    std::vector<double> sm(rows * d), sgx(rows * d);
    for (int64_t r = 0; r < rows; ++r) {
        double m = -INFINITY, s = 0, dot = 0;
        for (int64_t j = 0; j < d; ++j) m = std::max(m, (double)x[r * d + j]);
        for (int64_t j = 0; j < d; ++j) s += std::exp(x[r * d + j] - m);
        for (int64_t j = 0; j < d; ++j) sm[r * d + j] = std::exp(x[r * d + j] - m) / s;
        for (int64_t j = 0; j < d; ++j) dot += sm[r * d + j] * g[r * d + j];
        for (int64_t j = 0; j < d; ++j) sgx[r * d + j] = sm[r * d + j] * (g[r * d + j] - dot);
    }
    // The backward reads the forward's output as stored (rounded, in bf16), as on the GPU; the
    // reference is the exact softmax's, within the tolerance.
    out = nans<T>(rows * d);
    launch_warps(rows * 32, 128, [&] { TYPED(softmax_fwd)(xt.data(), out.data(), rows, d); });
    std::snprintf(name, sizeof name, "softmax forward rows %lld D%lld", (long long)rows, (long long)d);
    check_t(name, out, sm, 1e-5);
    auto grad = nans<T>(rows * d);
    launch_warps(rows * 32, 128, [&] { TYPED(softmax_bwd)(out.data(), gt.data(), grad.data(), rows, d); });
    check_t("softmax input grad", grad, sgx, 1e-5);
    // The attention gemm form's instantiations: f32 scores and their gradient in, T out.
    out = nans<T>(rows * d);
    launch_warps(rows * 32, 128, [&] { TYPED(scores_softmax_fwd)(x.data(), out.data(), rows, d); });
    check_t("scores softmax forward", out, sm, 1e-5);
    grad = nans<T>(rows * d);
    launch_warps(rows * 32, 128, [&] { TYPED(scores_softmax_bwd)(out.data(), g.data(), grad.data(), rows, d); });
    check_t("scores softmax input grad", grad, sgx, 1e-5);
}

// The gemm form's layout kernels, launched as src/cuda.rs's permute_heads does (a block per
// token and part, fewer threads than a row so the loop over it runs): packed [B, N, P, H, HD]
// to heads-major [P, B, H, N, HD] against the index map written out, and back.
static void check_permute_heads(int64_t nb, int64_t n, int64_t heads, int hd, unsigned parts) {
    const int64_t total = nb * n * parts * heads * hd;
    const std::vector<float> packed = random_values(total, 31);
    std::vector<double> want(total);
    for (int64_t b = 0; b < nb; ++b)
        for (int64_t i = 0; i < n; ++i)
            for (int64_t p = 0; p < parts; ++p)
                for (int64_t h = 0; h < heads; ++h)
                    for (int64_t d = 0; d < hd; ++d)
                        want[(((p * nb + b) * heads + h) * n + i) * hd + d] = packed[(((b * n + i) * parts + p) * heads + h) * hd + d];
    auto run = [&](auto kernel) {
        blockDim = Dim3{64, 1, 1};
        gridDim = Dim3{(unsigned)(nb * n), parts, 1};
        for (unsigned by = 0; by < parts; ++by)
            for (unsigned bx = 0; bx < nb * n; ++bx)
                for (unsigned t = 0; t < 64; ++t) {
                    blockIdx = Dim3{bx, by, 0};
                    threadIdx = Dim3{t, 0, 0};
                    kernel();
                }
    };
    std::vector<float> split(total, NAN), back(total, NAN);
    run([&] { attention_to_heads_f32(packed.data(), split.data(), nb, n, heads, hd); });
    char name[96];
    std::snprintf(name, sizeof name, "attention to heads B%lld N%lld P%u H%lld HD%d", (long long)nb, (long long)n, parts, (long long)heads, hd);
    check(name, split, want, 0);
    run([&] { attention_from_heads_f32(split.data(), back.data(), nb, n, heads, hd); });
    check("attention from heads (round trip)", back, std::vector<double>(packed.begin(), packed.end()), 0);
}

// The fused linear layer's own kernels (its gemms are cuBLAS): the bias broadcast into every
// output row, on a grid smaller than the tensor (the grid-stride loop must cover the rest), and
// the bias gradient's column sums as partials and their reduction.
static void check_linear_pieces(int64_t rows, int64_t d, int64_t target_parts) {
    auto bias = random_values(d, 31), g = random_values(rows * d, 32);
    std::vector<double> want(rows * d), sums(d, 0);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < d; ++j) {
            want[r * d + j] = bias[j];
            sums[j] += g[r * d + j];
        }
    char name[128];
    std::vector<float> out(rows * d, NAN);
    launch(std::min<int64_t>(rows, 4) * 32, 32, [&] { rows_broadcast_f32(bias.data(), out.data(), rows, d); });
    std::snprintf(name, sizeof name, "linear bias broadcast rows %lld D%lld", (long long)rows, (long long)d);
    check(name, out, want, 0);
    auto res = random_values(rows * d, 33);
    for (int64_t i = 0; i < rows * d; ++i) want[i] = (double)res[i] + bias[i % d];
    std::fill(out.begin(), out.end(), NAN);
    launch(std::min<int64_t>(rows, 4) * 32, 32, [&] { rows_add_broadcast_f32(res.data(), bias.data(), out.data(), rows, d); });
    std::snprintf(name, sizeof name, "mlp residual + bias rows %lld D%lld", (long long)rows, (long long)d);
    check(name, out, want, 1e-7);
    const int64_t per_part = std::max<int64_t>(1, (rows + target_parts - 1) / target_parts);
    const int64_t parts = (rows + per_part - 1) / per_part;
    std::vector<float> partials(parts * d, NAN), db(d, NAN);
    launch(parts * d, 256, [&] { column_sum_partials_f32(g.data(), partials.data(), rows, d, per_part, parts); });
    launch_warps(d * 32, 256, [&] { rows_reduce_partials_f32(partials.data(), db.data(), parts, 1, d, 0); });
    std::snprintf(name, sizeof name, "linear bias grad (column sums, %lld parts)", (long long)parts);
    check(name, db, sums, 1e-5);
}

// Random packed qkv [B, N, 3, H, HD] and output gradient, with softmax(q k^T * scale) v and its
// qkv gradient written out in double: the reference both attention forms are checked against.
struct AttentionCase {
    float scale;
    std::vector<float> qkv, g;
    std::vector<double> ref_out, ref_grad;
};

// `inputs` makes the drawn values the kernel's (representable<T>: what a bf16 kernel reads).
template <int HD>
static AttentionCase attention_case(int64_t nb, int64_t n, int64_t heads,
                                    std::vector<float> (*inputs)(const std::vector<float>&) = representable<float>) {
    const int64_t d = heads * HD, row = 3 * d;
    const float scale = 1.f / std::sqrt((float)HD);
    const std::vector<float> qkv = inputs(random_values(nb * n * row, 31 + (unsigned)n));
    std::vector<float> g = inputs(random_values(nb * n * d, 37 + (unsigned)n));
    std::vector<double> ref_out(nb * n * d), ref_grad(nb * n * row);
    auto at = [&](int64_t b, int64_t i, int s, int64_t h) { return (b * n + i) * row + s * d + h * HD; };
    for (int64_t b = 0; b < nb; ++b)
        for (int64_t h = 0; h < heads; ++h) {
            std::vector<double> p(n * n), dp(n * n);
            for (int64_t i = 0; i < n; ++i) {
                double mx = -INFINITY;
                for (int64_t j = 0; j < n; ++j) {
                    double s = 0;
                    for (int e = 0; e < HD; ++e) s += (double)qkv[at(b, i, 0, h) + e] * qkv[at(b, j, 1, h) + e];
                    p[i * n + j] = s * scale;
                    mx = std::max(mx, p[i * n + j]);
                }
                double sum = 0;
                for (int64_t j = 0; j < n; ++j) sum += p[i * n + j] = std::exp(p[i * n + j] - mx);
                for (int64_t j = 0; j < n; ++j) p[i * n + j] /= sum;
            }
            for (int64_t i = 0; i < n; ++i)
                for (int e = 0; e < HD; ++e) {
                    double o = 0;
                    for (int64_t j = 0; j < n; ++j) o += p[i * n + j] * qkv[at(b, j, 2, h) + e];
                    ref_out[(b * n + i) * d + h * HD + e] = o;
                }
            // dp = g v^T; ds = p (dp - rowsum(p dp)); dq = scale ds k; dk = scale ds^T q; dv = p^T g.
            for (int64_t i = 0; i < n; ++i) {
                double rowsum = 0;
                for (int64_t j = 0; j < n; ++j) {
                    double s = 0;
                    for (int e = 0; e < HD; ++e) s += (double)g[(b * n + i) * d + h * HD + e] * qkv[at(b, j, 2, h) + e];
                    dp[i * n + j] = s;
                    rowsum += p[i * n + j] * s;
                }
                for (int64_t j = 0; j < n; ++j) dp[i * n + j] = p[i * n + j] * (dp[i * n + j] - rowsum);
            }
            for (int64_t i = 0; i < n; ++i)
                for (int e = 0; e < HD; ++e) {
                    double dq = 0, dk = 0, dv = 0;
                    for (int64_t j = 0; j < n; ++j) {
                        dq += dp[i * n + j] * qkv[at(b, j, 1, h) + e];
                        dk += dp[j * n + i] * qkv[at(b, j, 0, h) + e];
                        dv += p[j * n + i] * g[(b * n + j) * d + h * HD + e];
                    }
                    ref_grad[at(b, i, 0, h) + e] = dq * scale;
                    ref_grad[at(b, i, 1, h) + e] = dk * scale;
                    ref_grad[at(b, i, 2, h) + e] = dv;
                }
        }
    return AttentionCase{scale, qkv, g, ref_out, ref_grad};
}

// The fused kernels, launched as src/cuda.rs does (a block per image, head and 64 rows).
template <int HD, typename Fwd, typename BwdQ, typename BwdK, typename BwdV>
static void check_attention(int64_t nb, int64_t n, int64_t heads, Fwd fwd, BwdQ bwd_q, BwdK bwd_k, BwdV bwd_v) {
    const int64_t d = heads * HD, row = 3 * d;
    const auto [scale, qkv, g, ref_out, ref_grad] = attention_case<HD>(nb, n, heads);
    const unsigned gx = (unsigned)(nb * heads), gy = (unsigned)((n + 63) / 64);
    std::vector<float> out(nb * n * d, NAN), grad(nb * n * row, NAN), stats(2 * nb * heads * n, NAN);
    launch_blocks(gx, gy, 64, [&] { fwd(qkv.data(), out.data(), n, heads, scale); });
    char name[96];
    std::snprintf(name, sizeof name, "attention forward B%lld N%lld H%lld HD%d", (long long)nb, (long long)n, (long long)heads, HD);
    check(name, out, ref_out, 2e-6);
    // The backward reads the forward's (rounded) output, as it does on the GPU.
    launch_blocks(gx, gy, 64, [&] { bwd_q(qkv.data(), out.data(), g.data(), grad.data(), stats.data(), n, heads, scale); });
    launch_blocks(gx, gy, 64, [&] { bwd_k(qkv.data(), g.data(), stats.data(), grad.data(), n, heads, scale); });
    launch_blocks(gx, gy, 64, [&] { bwd_v(qkv.data(), g.data(), stats.data(), grad.data(), n, heads, scale); });
    std::snprintf(name, sizeof name, "attention qkv grad B%lld N%lld H%lld HD%d", (long long)nb, (long long)n, (long long)heads, HD);
    check(name, grad, ref_grad, 1e-5);
}

#define CHECK_ATTENTION(HD, nb, n, heads)                                                                       \
    check_attention<HD>(nb, n, heads, attention_fwd_hd##HD##_f32, attention_bwd_q_hd##HD##_f32, attention_bwd_k_hd##HD##_f32, \
                        attention_bwd_v_hd##HD##_f32)

// The tensor-core flash kernels, launched as src/cuda.rs flash_attention_* does: a block of
// FLASH_WARPS warps per image, head and 16 * FLASH_WARPS rows, with FlashShared's bytes of
// dynamic shared memory (128-byte aligned, as the GPU's is). Then once with a byte too few,
// which must leave NaN everywhere. In bf16 the probabilities and ds are rounded to bf16 before
// their products, as on the GPU: a tolerance of 1e-2 of the largest value (the GPU check's
// agreement allows 3e-2).
template <typename T, int HD, typename Fwd, typename BwdQ, typename BwdKV>
static void check_flash(int64_t nb, int64_t n, int64_t heads, Fwd fwd, BwdQ bwd_q, BwdKV bwd_kv, Fwd mma_fwd, BwdQ mma_bwd_q, BwdKV mma_bwd_kv,
                        bool misaligned = false) {
    using namespace convmae;
    constexpr double bf16_tol = 1e-2;
    const int64_t d = heads * HD, row = 3 * d;
    auto [scale, qkv_f32, g_f32, ref_out, ref_grad] = attention_case<HD>(nb, n, heads, representable<T>);
    const auto qkv_aligned = narrowed<T>(qkv_f32), g = narrowed<T>(g_f32);
    // `misaligned`: qkv one element past a 16-byte boundary, so the staging takes its
    // element-by-element path instead of 16-byte pieces.
    std::vector<T> shifted(qkv_aligned.size() + 1);
    std::copy(qkv_aligned.begin(), qkv_aligned.end(), shifted.begin() + 1);
    const std::span<const T> qkv = misaligned ? std::span<const T>(shifted).subspan(1) : std::span<const T>(qkv_aligned);
    const int64_t n_pad = (n + FLASH_TILE - 1) / FLASH_TILE * FLASH_TILE;
    const unsigned gx = (unsigned)(nb * heads), gy = (unsigned)((n_pad / FLASH_TILE + FLASH_WARPS - 1) / FLASH_WARPS);
    const unsigned block = 32 * FLASH_WARPS;
    const size_t shared_bytes = FlashShared<T, HD>::bytes(n_pad);
    std::vector<unsigned char> shared_buffer(shared_bytes + 128);
    const uintptr_t base = reinterpret_cast<uintptr_t>(shared_buffer.data());
    emulated_dynamic_shared = shared_buffer.data() + (128 - base % 128) % 128;
    // The dq kernel with the forward's log-sum-exp (`have_lse`, as src/cuda.rs runs it) or
    // finding it again.
    auto run = [&](unsigned bytes, int have_lse) {
        emulated_dynamic_shared_bytes = bytes;
        auto out = nans<T>(nb * n * d), grad = nans<T>(nb * n * row);
        std::vector<float> stats(2 * nb * heads * n, NAN), lse(nb * heads * n, NAN);
        launch_blocks(gx, gy, block, [&] { fwd(qkv.data(), out.data(), lse.data(), n, heads, scale); });
        launch_blocks(gx, gy, block, [&] { bwd_q(qkv.data(), out.data(), g.data(), lse.data(), have_lse, grad.data(), stats.data(), n, heads, scale); });
        launch_blocks(gx, gy, block, [&] { bwd_kv(qkv.data(), g.data(), stats.data(), grad.data(), n, heads, scale); });
        return std::pair{out, grad};
    };
    auto all_nan = [](const std::vector<T>& a, const std::vector<T>& b) {
        auto nan = [](T v) { return std::isnan(load(v)); };
        return std::all_of(a.begin(), a.end(), nan) && std::all_of(b.begin(), b.end(), nan);
    };
    char name[96];
    for (int have_lse : {1, 0}) {
        const auto [out, grad] = run((unsigned)shared_bytes, have_lse);
        std::snprintf(name, sizeof name, "flash attention forward B%lld N%lld H%lld HD%d%s", (long long)nb, (long long)n, (long long)heads, HD, misaligned ? " misaligned" : "");
        if (have_lse) check_t(name, out, ref_out, 2e-6, bf16_tol);
        std::snprintf(name, sizeof name, "flash attention qkv grad B%lld N%lld H%lld HD%d%s", (long long)nb, (long long)n, (long long)heads, HD, have_lse ? "" : " (lse found again)");
        check_t(name, grad, ref_grad, 1e-5, bf16_tol);
    }
    const auto [short_out, short_grad] = run((unsigned)shared_bytes - 1, 1);
    const bool short_nan = all_nan(short_out, short_grad);
    if (!short_nan) ++failures;
    std::printf("[%s] %-52s %s\n", type_name<T>, "flash attention with too little shared memory: all NaN", short_nan ? "ok" : "FAIL");
    // The kernels on mma.sync (their own, smaller shared memory): the one-pass forward, then
    // the backward by the wmma kernels from its log-sum-exp and by the mma kernels.
    const unsigned mma_bytes = (unsigned)(2 * n_pad * (HD + FLASH_PAD) * sizeof(T) + 2 * n_pad * sizeof(float));
    auto run_mma = [&](unsigned bytes, bool mma_backward) {
        auto out = nans<T>(nb * n * d), grad = nans<T>(nb * n * row);
        std::vector<float> stats(2 * nb * heads * n, NAN), lse(nb * heads * n, NAN);
        emulated_dynamic_shared_bytes = bytes;
        launch_blocks(gx, gy, block, [&] { mma_fwd(qkv.data(), out.data(), lse.data(), n, heads, scale); });
        if (mma_backward) {
            launch_blocks(gx, gy, block, [&] { mma_bwd_q(qkv.data(), out.data(), g.data(), lse.data(), 1, grad.data(), stats.data(), n, heads, scale); });
            launch_blocks(gx, gy, block, [&] { mma_bwd_kv(qkv.data(), g.data(), stats.data(), grad.data(), n, heads, scale); });
        } else {
            emulated_dynamic_shared_bytes = (unsigned)shared_bytes;  // the wmma kernels' own
            launch_blocks(gx, gy, block, [&] { bwd_q(qkv.data(), out.data(), g.data(), lse.data(), 1, grad.data(), stats.data(), n, heads, scale); });
            launch_blocks(gx, gy, block, [&] { bwd_kv(qkv.data(), g.data(), stats.data(), grad.data(), n, heads, scale); });
        }
        return std::pair{out, grad};
    };
    const auto [mma_out, wmma_grad] = run_mma(mma_bytes, false);
    std::snprintf(name, sizeof name, "flash mma forward B%lld N%lld H%lld HD%d%s", (long long)nb, (long long)n, (long long)heads, HD, misaligned ? " misaligned" : "");
    check_t(name, mma_out, ref_out, 2e-6, bf16_tol);
    check_t("  and the qkv grad by the wmma kernels from its lse", wmma_grad, ref_grad, 1e-5, bf16_tol);
    check_t("  and the qkv grad by the mma kernels", run_mma(mma_bytes, true).second, ref_grad, 1e-5, bf16_tol);
    const auto [short_out_mma, short_grad_mma] = run_mma(mma_bytes - 1, true);
    const bool mma_nan = all_nan(short_out_mma, short_grad_mma);
    if (!mma_nan) ++failures;
    std::printf("[%s] %-52s %s\n", type_name<T>, "flash mma kernels with too little shared memory: all NaN", mma_nan ? "ok" : "FAIL");
    emulated_dynamic_shared = nullptr;
}

// MAE's loss on `b` images of gh x gw patches of p x p pixels of c channels, launched as
// src/cuda.rs does (4 warps a block for the rows, one block for the total), against a double
// reference: the loss, the saved statistics and the prediction's gradient. The prediction is
// in T (the decoder's output: bf16 in mixed precision); images, mask and statistics are f32.
template <typename T>
static void check_patch_loss(int64_t b, int64_t gh, int64_t gw, int64_t p, int64_t c, int norm_pix, unsigned total_threads) {
    const int64_t tokens = gh * gw, rows = b * tokens, n = p * p * c, h = gh * p, w = gw * p;
    auto pred = representable<T>(random_values(rows * n, 41)), imgs = random_values(b * h * w * c, 42), coin = random_values(rows, 43);
    const auto pred_t = narrowed<T>(pred);
    for (auto& v : imgs) v = 2 * v + 0.3f;
    std::vector<float> mask(rows);
    for (int64_t r = 0; r < rows; ++r) mask[r] = coin[r] > -0.4f ? 1.f : 0.f;
    const float grad = 0.75f;
    std::vector<double> stats(2 * rows), gpred(rows * n);
    double total = 0, mask_sum = 0;
    for (int64_t r = 0; r < rows; ++r) mask_sum += mask[r];
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t bi = r / tokens, l = r % tokens, gy = l / gw, gx = l % gw;
        std::vector<double> t(n);
        for (int64_t i = 0; i < p; ++i)
            for (int64_t j = 0; j < p; ++j)
                for (int64_t ch = 0; ch < c; ++ch) t[(i * p + j) * c + ch] = imgs[((bi * h + gy * p + i) * w + gx * p + j) * c + ch];
        double mean = 0, var = 0, sd = 1;
        if (norm_pix) {
            for (double v : t) mean += v;
            mean /= n;
            for (double v : t) var += (v - mean) * (v - mean);
            sd = std::sqrt(var / (n - 1) + 1e-6);
        }
        stats[2 * r] = mean;
        stats[2 * r + 1] = sd;
        double s = 0;
        for (int64_t e = 0; e < n; ++e) {
            const double d = pred[r * n + e] - (t[e] - mean) / sd;
            s += d * d;
            gpred[r * n + e] = grad * mask[r] / mask_sum * 2.0 / n * d;
        }
        total += s / n * mask[r];
    }
    std::vector<float> row_loss(rows, NAN), st(2 * rows, NAN), loss(1, NAN), msum(1, NAN);
    auto out = nans<T>(rows * n);
    launch_warps(rows * 32, 128, [&] {
        TYPED(patch_mse_rows)(pred_t.data(), imgs.data(), mask.data(), row_loss.data(), st.data(), rows, tokens, gw, p, c, h, w, norm_pix);
    });
    launch_blocks(1, 1, total_threads, [&] { patch_mse_total(row_loss.data(), mask.data(), loss.data(), msum.data(), rows); });
    char name[128];
    std::snprintf(name, sizeof name, "[%s] patch loss %lldx%lld of %lldx%lldx%lld, norm_pix %d, %u threads", type_name<T>, (long long)gh,
                  (long long)gw, (long long)p, (long long)p, (long long)c, norm_pix, total_threads);
    check(name, loss, {total / mask_sum}, 1e-5);
    check("patch loss: mask sum", msum, {mask_sum}, 0);
    check("patch loss: saved (mean, std)", st, stats, 1e-5);
    launch_warps(rows * 32, 128, [&] {
        TYPED(patch_mse_bwd)(pred_t.data(), imgs.data(), mask.data(), st.data(), msum.data(), &grad, out.data(), rows, tokens, gw, p, c, h, w);
    });
    check_t("patch loss: prediction gradient", out, gpred, 1e-5);
}

// The patch layout's copies on b images of h x w x c in k x k patches, launched as src/cuda.rs
// does (a warp per patch row, 256-thread blocks): image -> patches against the index formula,
// then back, bit for bit.
template <typename T>
static void check_patch_rows(int64_t b, int64_t h, int64_t w, int64_t c, int64_t k) {
    const int64_t n = b * h * w * c, ho = h / k, wo = w / k, rows = b * ho * wo * k;
    const auto img = representable<T>(random_values(n, 51));
    const auto img_t = narrowed<T>(img);
    std::vector<double> want(n);
    for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t y = 0; y < ho; ++y)
            for (int64_t x = 0; x < wo; ++x)
                for (int64_t i = 0; i < k; ++i)
                    for (int64_t j = 0; j < k; ++j)
                        for (int64_t ch = 0; ch < c; ++ch)
                            want[((((bi * ho + y) * wo + x) * k + i) * k + j) * c + ch] = img[((bi * h + y * k + i) * w + x * k + j) * c + ch];
    auto blocks = nans<T>(n), back = nans<T>(n);
    launch(rows * 32, 256, [&] { TYPED(patch_rows)(img_t.data(), blocks.data(), rows, k, wo, ho, h, w, c, 0); });
    char name[128];
    std::snprintf(name, sizeof name, "patch rows %lldx%lldx%lld in %lldx%lld patches (bitwise)", (long long)h, (long long)w, (long long)c, (long long)k, (long long)k);
    check_t(name, blocks, want, 0);
    launch(rows * 32, 256, [&] { TYPED(patch_rows)(blocks.data(), back.data(), rows, k, wo, ho, h, w, c, 1); });
    check_t("patch rows: back to the image (bitwise)", back, std::vector<double>(img.begin(), img.end()), 0);
}

// The decoder's entry on b images of l positions of width d, `keep` visible, launched as
// src/cuda.rs does (a block per row, here `grid` blocks of `block` threads striding over the
// rows; the columns a thread each; the mask token's reduction a warp per column), against the
// formula: the sequence and [dx | d mask_token | d pos].
template <typename T>
static void check_restore_tokens(int64_t b, int64_t l, int64_t keep, int64_t d, unsigned grid, unsigned block) {
    const auto x = representable<T>(random_values(b * keep * d, 61)), mask = representable<T>(random_values(d, 62)),
               pos = representable<T>(random_values(l * d, 63)), g = representable<T>(random_values(b * l * d, 64));
    const auto xt = narrowed<T>(x), mask_t = narrowed<T>(mask), pos_t = narrowed<T>(pos), gt = narrowed<T>(g);
    std::vector<uint32_t> ids(b * l);
    // A different shuffle per image: position i has rank (i * m + bi) % l, m coprime to l.
    int64_t m = 5;
    while (std::gcd(m, l) != 1) ++m;
    for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t i = 0; i < l; ++i) ids[bi * l + i] = (uint32_t)((i * m + bi) % l);
    std::vector<double> want(b * l * d), grads(b * keep * d + d + l * d, 0);
    for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t i = 0; i < l; ++i) {
            const int64_t r = ids[bi * l + i];
            for (int64_t j = 0; j < d; ++j) {
                const double gv = g[(bi * l + i) * d + j];
                // The f32 sum, rounded once to T, as the kernel stores it.
                const float sum = (r < keep ? x[(bi * keep + r) * d + j] : mask[j]) + pos[i * d + j];
                want[(bi * l + i) * d + j] = convmae::load(convmae::store<T>(sum));
                grads[r < keep ? (bi * keep + r) * d + j : b * keep * d + j] += gv;
                grads[b * keep * d + d + i * d + j] += gv;
            }
        }
    auto out = nans<T>(b * l * d), packed = nans<T>(grads.size());
    std::vector<float> partials(l * d, NAN);
    auto per_row = [&](auto kernel) {
        blockDim.x = block;
        gridDim.x = grid;
        for (unsigned bx = 0; bx < grid; ++bx)
            for (unsigned t = 0; t < block; ++t) {
                blockIdx.x = bx;
                threadIdx.x = t;
                kernel();
            }
    };
    per_row([&] { TYPED(restore_tokens_fwd)(xt.data(), mask_t.data(), pos_t.data(), ids.data(), out.data(), b, l, keep, d); });
    char name[128];
    std::snprintf(name, sizeof name, "restore tokens %lldx%lld keep %lld D%lld (bitwise)", (long long)b, (long long)l, (long long)keep, (long long)d);
    check_t(name, out, want, 0);
    std::fill(packed.begin(), packed.begin() + b * keep * d, convmae::store<T>(0.f));  // the host's memset
    per_row([&] { TYPED(restore_tokens_dx)(gt.data(), ids.data(), packed.data(), b, l, keep, d); });
    launch(l * d, 256, [&] { TYPED(restore_tokens_columns)(gt.data(), ids.data(), packed.data() + b * keep * d + d, partials.data(), b, l, keep, d); });
    launch_warps(d * 32, 256, [&] { TYPED(rows_reduce_partials)(partials.data(), packed.data() + b * keep * d, l, 1, d, 0); });
    check_t("restore tokens: [dx | d mask_token | d pos]", packed, grads, 1e-6);
}

// ROIAlignV2 (roi_align.cu), forward and adjoint, in f32 and f64, launched as src/cuda.rs
// roi_align does (a thread per bin element, channels fastest; the map's gradient zeroed
// first), on regions resolved from the boxes as src/roi_align.rs `Geometry::new` does. The
// references are detectron2's algorithm written out per box, bin, channel and sample, with
// the four bilinear taps of its CPU kernel: the forward gathers them, the backward scatters
// through them. The f64 kernels also meet the adjoint identity <fwd(x), g> = <x, bwd(g)>.
struct HostBox {
    int64_t image;
    float x1, y1, x2, y2;  // input-image pixels
};

static std::vector<RoiRegion> roi_regions(const std::vector<HostBox>& boxes, int64_t p, double scale, int64_t ratio) {
    std::vector<RoiRegion> out;
    for (const auto& b : boxes) {
        const double x1 = (double)b.x1 * scale - 0.5, y1 = (double)b.y1 * scale - 0.5;
        const double x2 = (double)b.x2 * scale - 0.5, y2 = (double)b.y2 * scale - 0.5;
        const auto grid = [&](double len) { return ratio > 0 ? ratio : (int64_t)std::max(std::ceil(len / (double)p), 0.0); };
        const int64_t gh = grid(y2 - y1), gw = grid(x2 - x1);
        out.push_back(RoiRegion{y1, x1, (y2 - y1) / (double)p, (x2 - x1) / (double)p, (double)std::max<int64_t>(gh * gw, 1), b.image, gh, gw});
    }
    return out;
}

// The four taps (flat index into [B, H, W, C], weight) of the sample at (y, x) of image b,
// channel ch; none when it lies more than a pixel off the map.
static int roi_reference_taps(int64_t h, int64_t w, int64_t c, int64_t b, double y, double x, int64_t ch, int64_t (&at)[4], double (&wt)[4]) {
    if (y < -1.0 || y > (double)h || x < -1.0 || x > (double)w) return 0;
    y = std::max(y, 0.0);
    x = std::max(x, 0.0);
    int64_t y_low = (int64_t)std::floor(y), x_low = (int64_t)std::floor(x), y_high, x_high;
    if (y_low >= h - 1) {
        y_high = y_low = h - 1;
        y = (double)y_low;
    } else {
        y_high = y_low + 1;
    }
    if (x_low >= w - 1) {
        x_high = x_low = w - 1;
        x = (double)x_low;
    } else {
        x_high = x_low + 1;
    }
    const double ly = y - y_low, lx = x - x_low, hy = 1 - ly, hx = 1 - lx;
    const auto idx = [&](int64_t yy, int64_t xx) { return ((b * h + yy) * w + xx) * c + ch; };
    at[0] = idx(y_low, x_low), at[1] = idx(y_low, x_high), at[2] = idx(y_high, x_low), at[3] = idx(y_high, x_high);
    wt[0] = hy * hx, wt[1] = hy * lx, wt[2] = ly * hx, wt[3] = ly * lx;
    return 4;
}

// Calls visit(bin element index, tap index, weight / count) for every tap of every sample.
template <typename F>
static void roi_reference(int64_t h, int64_t w, int64_t c, const std::vector<HostBox>& boxes, int64_t p, double scale, int64_t ratio, F visit) {
    for (size_t r = 0; r < boxes.size(); ++r) {
        const auto& bx = boxes[r];
        const double sx = bx.x1 * scale - 0.5, sy = bx.y1 * scale - 0.5, ex = bx.x2 * scale - 0.5, ey = bx.y2 * scale - 0.5;
        const double roi_w = ex - sx, roi_h = ey - sy, bin_w = roi_w / p, bin_h = roi_h / p;
        const int64_t grid_h = ratio > 0 ? ratio : (int64_t)std::ceil(roi_h / p), grid_w = ratio > 0 ? ratio : (int64_t)std::ceil(roi_w / p);
        const double count = (double)std::max<int64_t>(grid_h * grid_w, 1);
        for (int64_t ph = 0; ph < p; ++ph)
            for (int64_t pw = 0; pw < p; ++pw)
                for (int64_t ch = 0; ch < c; ++ch)
                    for (int64_t iy = 0; iy < grid_h; ++iy)
                        for (int64_t ix = 0; ix < grid_w; ++ix) {
                            const double y = sy + ph * bin_h + (iy + 0.5) * bin_h / grid_h, x = sx + pw * bin_w + (ix + 0.5) * bin_w / grid_w;
                            int64_t at[4];
                            double wt[4];
                            const int taps = roi_reference_taps(h, w, c, bx.image, y, x, ch, at, wt);
                            for (int t = 0; t < taps; ++t) visit((((int64_t)r * p + ph) * p + pw) * c + ch, at[t], wt[t] / count);
                        }
    }
}

// Boxes given in map pixels, as input pixels at `scale`: inside, the whole map, partly off each
// side, tiny (under a pixel), ending on the far edges, off the map, far larger than it (many
// samples a bin), empty, inverted, within the pixel off the left and top edges, past the last
// column, then `random` more of random sizes (several sample counts) and places (some off the
// map), on images 0 .. b - 1.
static std::vector<HostBox> roi_boxes(int64_t b, int64_t h, int64_t w, double scale, int random, unsigned seed) {
    const double fixed[][5] = {
        {0, 1.2, 0.7, 6.3, 5.1},   {1, 0.0, 0.0, 9.0, 7.0},    {2, -2.5, -1.8, 3.1, 2.4}, {0, 5.5, 4.2, 11.0, 9.5},
        {1, 4.3, 3.6, 4.55, 3.8},  {2, 6.0, 4.0, 9.0, 7.0},    {1, 10.5, 8.0, 13.0, 9.5}, {0, -6.0, -6.0, 15.0, 13.0},
        {2, 3.0, 2.0, 3.0, 5.0},   {1, 5.0, 4.0, 2.0, 1.0},    {0, -1.4, -0.9, 0.3, 6.5}, {2, 7.6, -1.3, 10.2, 0.4},
        {1, 0.25, 0.25, 8.75, 1.0},
    };
    std::vector<HostBox> out;
    const auto in_input = [&](double v) { return (float)(v / scale); };
    for (const auto& f : fixed)
        out.push_back(HostBox{(int64_t)f[0] % b, in_input(f[1] * w / 9.0), in_input(f[2] * h / 7.0), in_input(f[3] * w / 9.0), in_input(f[4] * h / 7.0)});
    const auto u = random_values(5 * random, seed);
    for (int i = 0; i < random; ++i) {
        const double cx = (u[5 * i] + 1) / 2 * (w + 4) - 2, cy = (u[5 * i + 1] + 1) / 2 * (h + 4) - 2;
        const double bw = (u[5 * i + 2] + 1) * 4, bh = (u[5 * i + 3] + 1) * 4;
        out.push_back(HostBox{(int64_t)((u[5 * i + 4] + 1) / 2 * b) % b, in_input(cx - bw / 2), in_input(cy - bh / 2), in_input(cx + bw / 2), in_input(cy + bh / 2)});
    }
    return out;
}

static void check_roi_align(int64_t b, int64_t h, int64_t w, int64_t c, double scale, int64_t ratio, int64_t p) {
    const auto boxes = roi_boxes(b, h, w, scale, 24, (unsigned)(31 + p + 10 * ratio));
    const auto regions = roi_regions(boxes, p, scale, ratio);
    const int64_t r = (int64_t)boxes.size(), bins = r * p * p * c, map = b * h * w * c;
    const auto x32 = random_values(map, 30), g32 = random_values(bins, 31 + (unsigned)p);
    const std::vector<double> x64(x32.begin(), x32.end()), g64(g32.begin(), g32.end());
    std::vector<double> fwd(bins, 0.0), bwd(map, 0.0);
    roi_reference(h, w, c, boxes, p, scale, ratio, [&](int64_t bin, int64_t at, double weight) {
        fwd[bin] += weight * x64[at];
        bwd[at] += weight * g64[bin];
    });
    char name[128], shape[64];
    std::snprintf(shape, sizeof shape, "s%g r%lld P%lld [%lld,%lld,%lld,%lld]", scale, (long long)ratio, (long long)p, (long long)b,
                  (long long)h, (long long)w, (long long)c);
    // f32: NaN outputs (each must be written), a zeroed gradient (the host's memset).
    std::vector<float> out32(bins, NAN), dx32(map, 0.f);
    launch(bins, 256, [&] { roi_align_fwd_f32(x32.data(), regions.data(), out32.data(), r, h, w, c, p); });
    std::snprintf(name, sizeof name, "roi_align f32 forward %s", shape);
    check(name, out32, fwd, 1e-6);
    launch(bins, 256, [&] { roi_align_bwd_f32(g32.data(), regions.data(), dx32.data(), r, h, w, c, p); });
    std::snprintf(name, sizeof name, "roi_align f32 backward %s", shape);
    check(name, dx32, bwd, 1e-5);
    std::vector<double> out64(bins, NAN), dx64(map, 0.0);
    launch(bins, 256, [&] { roi_align_fwd_f64(x64.data(), regions.data(), out64.data(), r, h, w, c, p); });
    std::snprintf(name, sizeof name, "roi_align f64 forward %s", shape);
    check(name, out64, fwd, 1e-12);
    launch(bins, 256, [&] { roi_align_bwd_f64(g64.data(), regions.data(), dx64.data(), r, h, w, c, p); });
    std::snprintf(name, sizeof name, "roi_align f64 backward %s", shape);
    check(name, dx64, bwd, 1e-12);
    const double lhs = std::inner_product(out64.begin(), out64.end(), g64.begin(), 0.0);
    const double rhs = std::inner_product(x64.begin(), x64.end(), dx64.begin(), 0.0);
    std::snprintf(name, sizeof name, "roi_align f64 adjoint identity %s", shape);
    check(name, std::vector<double>{rhs}, std::vector<double>{lhs}, 1e-12);
    // The reference reads the map and writes its gradient, and some bins (boxes off the map,
    // empty ones) are 0, or the checks above prove little.
    const bool live = std::any_of(fwd.begin(), fwd.end(), [](double v) { return std::fabs(v) > 0.1; }) &&
                      std::any_of(fwd.begin(), fwd.end(), [](double v) { return v == 0.0; }) &&
                      std::any_of(bwd.begin(), bwd.end(), [](double v) { return std::fabs(v) > 0.1; });
    if (!live) ++failures;
    std::snprintf(name, sizeof name, "roi_align reference not trivial %s", shape);
    std::printf("%-58s %s\n", name, live ? "ok" : "FAIL");
}

#define CHECK_FLASH_IN(T, S, HD, nb, n, heads, ...)                                                                          \
    check_flash<T, HD>(nb, n, heads, flash_fwd_hd##HD##_##S, flash_bwd_q_hd##HD##_##S, flash_bwd_kv_hd##HD##_##S,             \
                       flash_mma_fwd_hd##HD##_##S, flash_mma_bwd_q_hd##HD##_##S, flash_mma_bwd_kv_hd##HD##_##S __VA_OPT__(, ) \
                           __VA_ARGS__)
#define CHECK_FLASH(HD, nb, n, heads, ...)                                     \
    CHECK_FLASH_IN(float, f32, HD, nb, n, heads __VA_OPT__(, ) __VA_ARGS__); \
    CHECK_FLASH_IN(__nv_bfloat16, bf16, HD, nb, n, heads __VA_OPT__(, ) __VA_ARGS__)

int main() {
    // C not a multiple of 32 or of the 256-thread block, W not a multiple of the 4-column tile,
    // few parts (the reduction order) and one part per row.
    for (int k : {3, 5, 7, 9, 1}) {
        check_dense(2, 7, 9, 37, k, 5);
        check_dense(1, 5, 4, 3, k, 512);
        check_sparse<float>(2, 7, 9, 37, k, 5);
        check_sparse<float>(1, 6, 5, 3, k, 512);
        // C a multiple of the vector forms' channels a thread: more groups than a warp, fewer.
        check_sparse<float>(2, 7, 9, 40, k, 5);
        check_sparse<float>(1, 6, 5, 4, k, 512);
        check_sparse<float>(1, 5, 6, 2, k, 3);
        // bf16: C a multiple of its 8 lanes (more groups than a warp, one group), of 2 only, neither.
        check_sparse<__nv_bfloat16>(2, 7, 9, 40, k, 5);
        check_sparse<__nv_bfloat16>(1, 6, 5, 8, k, 512);
        check_sparse<__nv_bfloat16>(1, 5, 6, 6, k, 3);
        check_sparse<__nv_bfloat16>(1, 6, 5, 3, k, 512);
    }
    check_visible_neighbors(2, 4, 4, 5, 5, 1);
    check_visible_neighbors(3, 5, 2, 7, 5, 2);
    check_visible_neighbors(1, 3, 1, 9, 3, 3);
    check_visible_neighbors(2, 6, 2, 1, 7, 4);
    check_gelu<float>();
    check_gelu<__nv_bfloat16>();
    check_elementwise();
    check_adamw_many("no guard", nullptr);
    const float finite_loss = 0.75f, nan_loss = NAN, inf_loss = INFINITY;
    check_adamw_many("finite loss", &finite_loss);
    check_adamw_many("NaN loss", &nan_loss);
    check_adamw_many("inf loss", &inf_loss);
    check_normalize();
    // Rows not a multiple of the 4 rows a block holds; D below, at and above the 32 lanes.
    check_rows<float>(9, 49, 4);
    check_rows<float>(6, 32, 512);
    check_rows<float>(3, 5, 2);
    check_rows<float>(5, 100, 3);
    // bf16: D a multiple of its 8 lanes below and above a warp's 256, of 4 only, of neither.
    check_rows<__nv_bfloat16>(9, 40, 4);
    check_rows<__nv_bfloat16>(5, 520, 3);
    check_rows<__nv_bfloat16>(6, 36, 512);
    check_rows<__nv_bfloat16>(3, 49, 2);
    // Non-square grids, rows not a multiple of 4 a block; patch values below, at and above the
    // 32 lanes (and ConvMAE's 16 x 16 x 3); totals over fewer rows than threads, and more.
    check_patch_loss<float>(2, 2, 3, 4, 3, 1, 64);
    check_patch_loss<float>(1, 3, 1, 2, 1, 1, 32);
    check_patch_loss<float>(3, 1, 2, 4, 2, 0, 96);
    check_patch_loss<float>(2, 2, 2, 16, 3, 1, 1024);
    check_patch_loss<__nv_bfloat16>(2, 2, 3, 4, 3, 1, 64);
    check_patch_loss<__nv_bfloat16>(2, 2, 2, 16, 3, 1, 1024);
    // Non-square maps; patch rows shorter and longer than a warp; one patch per image.
    for (auto check_patch_rows_in : {check_patch_rows<float>, check_patch_rows<__nv_bfloat16>}) {
        check_patch_rows_in(2, 6, 4, 3, 2);
        check_patch_rows_in(1, 8, 12, 5, 4);
        check_patch_rows_in(3, 16, 16, 3, 16);
        check_patch_rows_in(1, 5, 5, 40, 1);
    }
    // Fewer blocks than rows (the stride), rows wider than a block, nothing kept, all kept.
    for (auto check_restore_tokens_in : {check_restore_tokens<float>, check_restore_tokens<__nv_bfloat16>}) {
        check_restore_tokens_in(3, 7, 2, 5, 4, 32);
        check_restore_tokens_in(2, 9, 3, 70, 18, 32);
        check_restore_tokens_in(2, 4, 0, 3, 8, 32);
        check_restore_tokens_in(1, 5, 5, 33, 2, 64);
    }
    check_linear_pieces(9, 49, 4);
    check_linear_pieces(37, 3, 512);
    check_linear_pieces(1, 70, 1);
    // Tokens below one key tile, across several tiles and row blocks with ragged ends; one token.
    CHECK_ATTENTION(8, 2, 70, 2);
    CHECK_ATTENTION(16, 1, 33, 3);
    CHECK_ATTENTION(32, 2, 49, 2);
    CHECK_ATTENTION(64, 1, 130, 2);
    CHECK_ATTENTION(64, 2, 1, 1);
    // One token; fewer tokens than a tile; a ragged last tile and a block with idle warps
    // (ConvMAE-B's 49 and 196); more row blocks than one.
    CHECK_FLASH(16, 1, 1, 2);
    CHECK_FLASH(32, 2, 13, 2);
    CHECK_FLASH(64, 2, 49, 2);
    CHECK_FLASH(32, 1, 196, 1);
    CHECK_FLASH(16, 1, 70, 3);
    CHECK_FLASH(32, 2, 21, 2, true);
    // Rows (H * HD) shorter and longer than the 64-thread block; one part and three.
    check_permute_heads(2, 5, 3, 8, 3);
    check_permute_heads(3, 7, 4, 24, 1);
    check_permute_heads(1, 1, 2, 64, 3);
    // Three images; C below and above a warp (37: not a multiple of the block); adaptive
    // sample counts (ratio 0: 1 to 10 a side) and fixed ones; output 1, 2, 3, 4 and 7; the
    // scales of the detector's levels (1/4 .. 1/32) and of its mask targets (1). Then maps of
    // one row and of one column (every tap the last row or column) and of one channel.
    check_roi_align(3, 7, 9, 37, 0.5, 0, 2);
    check_roi_align(3, 7, 9, 37, 0.25, 2, 4);
    check_roi_align(3, 7, 9, 5, 1.0, 0, 7);
    check_roi_align(3, 7, 9, 33, 0.0625, 0, 3);
    check_roi_align(3, 7, 9, 3, 0.03125, 3, 2);
    check_roi_align(3, 7, 9, 2, 0.5, 1, 1);
    check_roi_align(2, 1, 6, 3, 0.5, 0, 2);
    check_roi_align(2, 8, 1, 1, 0.25, 2, 3);
    if (failures) {
        std::printf("host_check: %d FAILED\n", failures);
        return 1;
    }
    std::printf("host_check: all passed\n");
    return 0;
}
