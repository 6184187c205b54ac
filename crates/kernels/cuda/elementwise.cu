// Element-wise ops: GELU (erf form) with its exact derivative, an add, the fused AdamW update, and
// the patch layout's copies.
// The CPU kernels (src/gelu.rs, src/adamw.rs) define the semantics. Grid-stride loops over
// int64_t indices, so any element count fits whatever the grid size the host picks.

#include "common.cuh"

namespace convmae {

// 1/sqrt(2) and 1/sqrt(2*pi) to float precision. candle's own gelu_erf backward uses 0.398942
// for the latter (six digits), which is why this op exists.
constexpr float GELU_FRAC_1_SQRT_2 = 0.70710678118654752440f;
constexpr float GELU_FRAC_1_SQRT_2PI = 0.39894228040143267794f;

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * GELU_FRAC_1_SQRT_2)); }

// d/dx x * Phi(x) = Phi(x) + x * phi(x).
__device__ __forceinline__ float gelu_grad(float x) {
    const float cdf = 0.5f * (1.f + erff(x * GELU_FRAC_1_SQRT_2));
    const float pdf = expf(-0.5f * x * x) * GELU_FRAC_1_SQRT_2PI;
    return cdf + x * pdf;
}

// out[i] = f(a[i], b[i]) (b null: f(a[i], 0)), computed in f32. Where every pointer is 16-byte
// aligned, each thread moves 16 bytes of each operand per step (one vector load or store: 8
// bf16 or 4 f32 elements), the rest one element at a time; a view at an odd offset takes the
// element path throughout. One element a thread, run 7's 12 largest GELU forwards (19-51M bf16
// elements each by the step's shapes, 1.39 GB read and written) took 0.98 ms: ~1.4 TB/s of an
// H100's 3.35 peak. `vectors` 0 takes the element path throughout (src/cuda.rs vector_kernels).
template <typename T, typename F>
__device__ __forceinline__ void map_packed(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n,
                                           int vectors, F f) {
    constexpr int V = 16 / sizeof(T);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t done = 0;
    if (vectors && (((uintptr_t)a | (uintptr_t)b | (uintptr_t)out) & 15) == 0) {
        const int64_t packs = n / V;
        for (int64_t p = global_thread(); p < packs; p += stride) {
            float va[V], vb[V] = {}, vo[V];
            load_lanes<T, V>(a + p * V, va);
            if (b) load_lanes<T, V>(b + p * V, vb);
#pragma unroll
            for (int e = 0; e < V; ++e) vo[e] = f(va[e], vb[e]);
            store_lanes<T, V>(out + p * V, vo);
        }
        done = packs * V;
    }
    for (int64_t i = done + global_thread(); i < n; i += stride) out[i] = store<T>(f(load(a[i]), b ? load(b[i]) : 0.f));
}

template <typename T>
__device__ __forceinline__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ y, int64_t n, int vectors) {
    map_packed<T>(x, nullptr, y, n, vectors, [](float v, float) { return gelu(v); });
}

template <typename T>
__device__ __forceinline__ void gelu_bwd(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ gx, int64_t n,
                                         int vectors) {
    map_packed<T>(x, g, gx, n, vectors, [](float v, float gv) { return gelu_grad(v) * gv; });
}

// One fused AdamW step (torch.optim.AdamW): the moments, then the parameter from the updated
// moments, in one pass instead of three. The host computes the step's constants in f64 and
// rounds them to f32, as the CPU kernel does for f32.
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g^2
//   p = p * decay - step_size * m / (sqrt(v) / bias2_sqrt + eps)
// with decay = 1 - lr * weight_decay, step_size = lr / (1 - beta1^t),
// bias2_sqrt = sqrt(1 - beta2^t). With mixed precision the gradient G comes in the compute dtype
// (it is the gradient of the compute copy) and `shadow`, that compute copy (S: bf16), gets the new
// parameter rounded once, as a cast of it would be; without, G = T and shadow is null.
template <typename T, typename G = T, typename S = T>
__device__ __forceinline__ void adamw(T* __restrict__ p, T* __restrict__ m, T* __restrict__ v, const G* __restrict__ g,
                                      S* __restrict__ shadow, int64_t n, float beta1, float one_minus_beta1, float beta2,
                                      float one_minus_beta2, float decay, float step_size, float bias2_sqrt, float eps) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = global_thread(); i < n; i += stride) {
        const float gv = load(g[i]);
        const float mv = load(m[i]) * beta1 + gv * one_minus_beta1;
        const float vv = load(v[i]) * beta2 + (gv * gv) * one_minus_beta2;
        const float denom = sqrtf(vv) / bias2_sqrt + eps;
        const T pv = store<T>(load(p[i]) * decay - step_size * (mv / denom));
        p[i] = pv;
        m[i] = store<T>(mv);
        v[i] = store<T>(vv);
        if (shadow) shadow[i] = store<S>(load(pv));
    }
}

// One tensor of a multi-tensor AdamW update (src/cuda.rs `adamw_many` fills these; keep the
// two layouts in step): f32 weights and moments, the gradient in f32 or in the 16-bit compute
// type, the 16-bit compute copy or none, and the tensor's own decay and step size (its
// parameter group's lr and weight decay).
struct AdamWTensor {
    float* p;
    float* m;
    float* v;
    const void* g;
    void* copy;  // null: no compute copy
    int64_t n;
    float decay;
    float step_size;
    int32_t g_half;  // the gradient is 16-bit
    int32_t vec4;    // p, m and v 16-byte aligned, g and copy aligned to 4 of their elements
};
// A stretch of one tensor for one block to update.
struct AdamWChunk {
    int32_t tensor;
    int32_t unused;
    int64_t start;
    int64_t len;
};
static_assert(sizeof(AdamWTensor) == 64 && sizeof(AdamWChunk) == 24, "src/cuda.rs mirrors these layouts");

// Every tensor of a model in one launch: each block takes chunks blockIdx.x, + gridDim.x, ...
// The same arithmetic as `adamw`, per element. One launch instead of one per tensor (311 for
// ConvMAE-B, most of them biases and norms whose launches cost more than their updates).
// `guard`, where not null, is the step's loss on the device: a non-finite loss leaves every
// tensor as it was. The update is then queued before the host has read the loss, and the host
// can build the next step meanwhile (src/train.rs, overlapped steps).
template <typename H>
__device__ __forceinline__ void adamw_many(const AdamWTensor* __restrict__ tensors, const AdamWChunk* __restrict__ chunks,
                                           int64_t n_chunks, const float* __restrict__ guard, float beta1,
                                           float one_minus_beta1, float beta2, float one_minus_beta2, float bias2_sqrt,
                                           float eps) {
    // x - x is 0 for finite x and NaN for NaN and +-inf (no fast math here; and no isfinite,
    // which the host emulation's compiler has only as std::isfinite).
    if (guard && !(*guard - *guard == 0.f)) return;
    for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const AdamWChunk ch = chunks[c];
        const AdamWTensor t = tensors[ch.tensor];
        const float* g32 = static_cast<const float*>(t.g);
        const H* g16 = static_cast<const H*>(t.g);
        H* copy = static_cast<H*>(t.copy);
        // m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2, then p, as `adamw`.
        auto update = [&](float& p, float& m, float& v, float g) {
            m = m * beta1 + g * one_minus_beta1;
            v = v * beta2 + (g * g) * one_minus_beta2;
            const float denom = sqrtf(v) / bias2_sqrt + eps;
            p = p * t.decay - t.step_size * (m / denom);
        };
        const int64_t end = ch.start + ch.len;
        int64_t rest = ch.start;
        if (t.vec4) {
            // 4 elements a thread, each operand in one vector load or store (chunks start at
            // multiples of 4); the chunk's last len % 4 below.
            const int64_t vec_end = ch.start + (ch.len & ~(int64_t)3);
            for (int64_t i = ch.start + 4 * (int64_t)threadIdx.x; i < vec_end; i += 4 * (int64_t)blockDim.x) {
                float pv[4], mv[4], vv[4], gv[4];
                load_lanes<float, 4>(t.p + i, pv);
                load_lanes<float, 4>(t.m + i, mv);
                load_lanes<float, 4>(t.v + i, vv);
                if (t.g_half)
                    load_lanes<H, 4>(g16 + i, gv);
                else
                    load_lanes<float, 4>(g32 + i, gv);
#pragma unroll
                for (int e = 0; e < 4; ++e) update(pv[e], mv[e], vv[e], gv[e]);
                store_lanes<float, 4>(t.p + i, pv);
                store_lanes<float, 4>(t.m + i, mv);
                store_lanes<float, 4>(t.v + i, vv);
                if (copy) store_lanes<H, 4>(copy + i, pv);
            }
            rest = vec_end;
        }
        for (int64_t i = rest + threadIdx.x; i < end; i += blockDim.x) {
            float pv = t.p[i], mv = t.m[i], vv = t.v[i];
            update(pv, mv, vv, t.g_half ? load(g16[i]) : g32[i]);
            t.p[i] = pv;
            t.m[i] = mv;
            t.v[i] = vv;
            if (copy) copy[i] = store<H>(pv);
        }
    }
}

// Images as the data pipeline hands them over (uint8 [B, H, W, 3], channels last) to normalized
// f32 on the device: (p / 255 - mean[c]) / std[c] with the host path's f32 constants, in its
// order, so the results are the same bits (IEEE division: no fast math here). Uploading the
// bytes and normalizing here replaces a single-threaded host pass (20 ms for 64 images of 224 on
// one core) and an upload four times the size, during which the GPU had nothing to do.
__device__ __forceinline__ void normalize_rgb(const uint8_t* __restrict__ px, float* __restrict__ out, int64_t n, float m0,
                                              float m1, float m2, float s0, float s1, float s2) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = global_thread(); i < n; i += stride) {
        const int c = (int)(i % 3);
        const float m = c == 0 ? m0 : c == 1 ? m1 : m2;
        const float s = c == 0 ? s0 : c == 1 ? s1 : s2;
        out[i] = ((float)px[i] / 255.f - m) / s;
    }
}

// The patch layout of channels-last maps (src/patch_blocks.rs): blocks[b, ho, wo, i, j, c] =
// image[b, ho * k + i, wo * k + j, c]. Row i of a patch (its k * C values over j and c) is
// contiguous in both layouts, so the copy runs over those rows: a warp per row, its lanes along
// it, in either direction (`to_image`: the inverse, the op's backward). candle's strided copy
// works out six coordinates per element from the permuted strides instead (run 7 on an H100:
// 185 us for stage 1's map at batch 64, and 348 us for an add into its strided gradient).
template <typename T>
__device__ __forceinline__ void patch_rows(const T* __restrict__ src, T* __restrict__ dst, int64_t n_rows, int64_t k,
                                           int64_t cols, int64_t rows_of_patches, int64_t height, int64_t width,
                                           int64_t chans, int to_image) {
    const int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (r >= n_rows) return;
    const int lane = threadIdx.x % 32;
    // r = ((b * rows_of_patches + ho) * cols + wo) * k + i
    const int64_t i = r % k, patch = r / k;
    const int64_t wo = patch % cols, bho = patch / cols;
    const int64_t ho = bho % rows_of_patches, b = bho / rows_of_patches;
    const int64_t run = k * chans;
    const int64_t in_image = ((b * height + ho * k + i) * width + wo * k) * chans;
    const int64_t in_blocks = r * run;
    const T* from = src + (to_image ? in_blocks : in_image);
    T* to = dst + (to_image ? in_image : in_blocks);
    for (int64_t e = lane; e < run; e += 32) to[e] = from[e];
}

}  // namespace convmae

using namespace convmae;

#define ELEMENTWISE_KERNELS(T, TNAME)                                                                          \
    extern "C" __global__ void gelu_erf_fwd_##TNAME(const T* x, T* y, int64_t n, int vectors) {               \
        gelu_fwd<T>(x, y, n, vectors);                                                                       \
    }                                                                                                         \
    extern "C" __global__ void gelu_erf_bwd_##TNAME(const T* x, const T* g, T* gx, int64_t n, int vectors) {  \
        gelu_bwd<T>(x, g, gx, n, vectors);                                                                   \
    }                                                                                                         \
    extern "C" __global__ void patch_rows_##TNAME(const T* src, T* dst, int64_t n_rows, int64_t k,                 \
                                                  int64_t cols, int64_t rows_of_patches, int64_t height,         \
                                                  int64_t width, int64_t chans, int to_image) {                  \
        patch_rows<T>(src, dst, n_rows, k, cols, rows_of_patches, height, width, chans, to_image);                 \
    }                                                                                                             \
    extern "C" __global__ void adamw_##TNAME(T* p, T* m, T* v, const T* g, int64_t n, float beta1,            \
                                             float one_minus_beta1, float beta2, float one_minus_beta2,       \
                                             float decay, float step_size, float bias2_sqrt, float eps) {     \
        adamw<T>(p, m, v, g, (T*)nullptr, n, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size,  \
                 bias2_sqrt, eps);                                                                            \
    }

CONVMAE_FOR_EACH_TYPE(ELEMENTWISE_KERNELS)

extern "C" __global__ void normalize_rgb_u8(const uint8_t* px, float* out, int64_t n, float m0, float m1, float m2, float s0,
                                            float s1, float s2) {
    normalize_rgb(px, out, n, m0, m1, m2, s0, s1, s2);
}

// Mixed precision's update (src/cuda.rs adamw_shadowed): f32 master weights and moments, the
// gradient in bf16 (one step's, straight from the compute copy) or f32 (accumulated over
// micro-batches), the bf16 compute copy written with the new weights.
#define ADAMW_SHADOW_KERNEL(G, GNAME)                                                                               \
    extern "C" __global__ void adamw_shadow_f32_g##GNAME(float* p, float* m, float* v, const G* g, S_BF16* shadow,  \
                                                         int64_t n, float beta1, float one_minus_beta1, float beta2, \
                                                         float one_minus_beta2, float decay, float step_size,       \
                                                         float bias2_sqrt, float eps) {                             \
        adamw<float, G, S_BF16>(p, m, v, g, shadow, n, beta1, one_minus_beta1, beta2, one_minus_beta2, decay,       \
                                step_size, bias2_sqrt, eps);                                                        \
    }
#define S_BF16 __nv_bfloat16
ADAMW_SHADOW_KERNEL(__nv_bfloat16, bf16)
ADAMW_SHADOW_KERNEL(float, f32)

// Launch: grid min(chunks, a few per SM), block 256 (src/cuda.rs adamw_many). The 16-bit type
// is bf16.
#define ADAMW_MANY_HALF __nv_bfloat16
extern "C" __global__ void adamw_many_f32(const AdamWTensor* tensors, const AdamWChunk* chunks, int64_t n_chunks,
                                          const float* guard, float beta1, float one_minus_beta1, float beta2,
                                          float one_minus_beta2, float bias2_sqrt, float eps) {
    adamw_many<ADAMW_MANY_HALF>(tensors, chunks, n_chunks, guard, beta1, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt,
                                eps);
}
