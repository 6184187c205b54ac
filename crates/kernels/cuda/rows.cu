// Row-wise ops over the last dimension: LayerNorm (forward, input / weight / bias gradients),
// softmax (forward, input gradient), and the two row-parallel pieces of the fused linear layer
// around its cuBLAS gemms (the bias broadcast into every output row, and the bias gradient's
// column sums), MAE's loss over patch rows, and the decoder's entry (the token rows put back in
// image order). The CPU kernels (src/layer_norm.rs, src/softmax.rs, src/linear.rs,
// src/patch_loss.rs, src/restore_tokens.rs) define the semantics.
//
// One warp per row, ROW_WARPS rows per block: ConvMAE's rows are 49 to 768 long, too short to
// split across a block, and a warp reduces with shuffles, without shared memory or barriers.
// The row index comes from blockIdx.x (up to 2^31 - 1 blocks), so B*L rows in the millions fit.
// Statistics are f32 whatever the storage type.

#include "common.cuh"

namespace convmae {

constexpr int ROW_WARPS = 4;

// The row this warp owns, or -1 past the end (the whole warp then returns together, so the
// shuffles below always run with all 32 lanes).
__device__ __forceinline__ int64_t warp_row(int64_t rows) {
    const int64_t row = (int64_t)blockIdx.x * ROW_WARPS + threadIdx.x / 32;
    return row < rows ? row : -1;
}

// The row kernels below read and write 16 bytes a lane (PACK<T> elements, one vector load or
// store) where the row length keeps every row 16-byte aligned and every pointer is; else one
// element a lane (V = 1), as before (run 7: the LayerNorm kernels' 2-byte loads, 2.3 ms of its
// step). A lane takes elements [lane * V, lane * V + V), then 32 * V further on, and so on.
// Their `vectors` argument 0 keeps them to one element a lane (src/cuda.rs vector_kernels:
// CONVMAE_VECTOR_KERNELS=off, the A/B and safety valve of the vector forms).
template <typename T>
constexpr int PACK = 16 / (int)sizeof(T);

template <typename T>
__device__ __forceinline__ bool rows_packable(int64_t d, const void* a, const void* b, const void* c = nullptr,
                                              const void* e = nullptr, const void* f = nullptr) {
    return d % PACK<T> == 0 && (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)e | (uintptr_t)f) & 15) == 0;
}

// Mean and 1/sqrt(biased variance + eps) of one row, in two passes (mean, then the mean of the
// squared deviations) like the CPU kernel: the one-pass E[x^2] - E[x]^2 loses digits to
// cancellation when the mean is large against the spread.
template <typename T, int V>
__device__ __forceinline__ void row_stats(const T* __restrict__ xr, int64_t d, float eps, float& mean, float& rstd) {
    const int lane = threadIdx.x % 32;
    float s = 0.f;
    for (int64_t j = lane * V; j < d; j += 32 * V) {
        float xv[V];
        load_lanes<T, V>(xr + j, xv);
#pragma unroll
        for (int e = 0; e < V; ++e) s += xv[e];
    }
    mean = warp_sum(s) / (float)d;
    float v = 0.f;
    for (int64_t j = lane * V; j < d; j += 32 * V) {
        float xv[V];
        load_lanes<T, V>(xr + j, xv);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const float t = xv[e] - mean;
            v += t * t;
        }
    }
    // 1/sqrtf rather than rsqrtf: rsqrtf is only accurate to a couple of ulps.
    rstd = 1.f / sqrtf(warp_sum(v) / (float)d + eps);
}

// y = (x - mean) * rstd * w + b; (mean, rstd) of each row saved to stats[row, 0..2] for the
// backward.
template <typename T, int V>
__device__ __forceinline__ void ln_fwd_v(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                                         T* __restrict__ y, float* __restrict__ stats, int64_t row, int64_t d, float eps) {
    const int lane = threadIdx.x % 32;
    const T* xr = x + row * d;
    float mean, rstd;
    row_stats<T, V>(xr, d, eps, mean, rstd);
    T* yr = y + row * d;
    for (int64_t j = lane * V; j < d; j += 32 * V) {
        float xv[V], wv[V], bv[V], yv[V];
        load_lanes<T, V>(xr + j, xv);
        load_lanes<T, V>(weight + j, wv);
        load_lanes<T, V>(bias + j, bv);
#pragma unroll
        for (int e = 0; e < V; ++e) yv[e] = (xv[e] - mean) * rstd * wv[e] + bv[e];
        store_lanes<T, V>(yr + j, yv);
    }
    if (lane == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

template <typename T>
__device__ __forceinline__ void ln_fwd(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                                       T* __restrict__ y, float* __restrict__ stats, int64_t rows, int64_t d, float eps,
                                       int vectors) {
    const int64_t row = warp_row(rows);
    if (row < 0) return;
    if (vectors && rows_packable<T>(d, x, weight, bias, y))
        ln_fwd_v<T, PACK<T>>(x, weight, bias, y, stats, row, d, eps);
    else
        ln_fwd_v<T, 1>(x, weight, bias, y, stats, row, d, eps);
}

// Only the statistics, for a backward whose forward left none (see src/layer_norm.rs).
template <typename T>
__device__ __forceinline__ void ln_stats(const T* __restrict__ x, float* __restrict__ stats, int64_t rows, int64_t d, float eps,
                                         int vectors) {
    const int64_t row = warp_row(rows);
    if (row < 0) return;
    float mean, rstd;
    if (vectors && rows_packable<T>(d, x, nullptr))
        row_stats<T, PACK<T>>(x + row * d, d, eps, mean, rstd);
    else
        row_stats<T, 1>(x + row * d, d, eps, mean, rstd);
    if (threadIdx.x % 32 == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

// gx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)), xhat = (x - mean) * rstd; plus
// `residual_grad` where it is not null: a sublayer's input gradient (the residual's, which is
// its output's, plus the LayerNorm's) in one pass and one rounding.
template <typename T, int V>
__device__ __forceinline__ void ln_bwd_input_v(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ g,
                                               const float* __restrict__ stats, const T* __restrict__ residual_grad,
                                               T* __restrict__ gx, int64_t row, int64_t d) {
    const int lane = threadIdx.x % 32;
    const float mean = stats[2 * row];
    const float rstd = stats[2 * row + 1];
    const T* xr = x + row * d;
    const T* gr = g + row * d;
    float sum_gw = 0.f, sum_gw_xhat = 0.f;
    for (int64_t j = lane * V; j < d; j += 32 * V) {
        float xv[V], wv[V], gv[V];
        load_lanes<T, V>(xr + j, xv);
        load_lanes<T, V>(weight + j, wv);
        load_lanes<T, V>(gr + j, gv);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const float gw = gv[e] * wv[e];
            sum_gw += gw;
            sum_gw_xhat += gw * ((xv[e] - mean) * rstd);
        }
    }
    const float mean_gw = warp_sum(sum_gw) / (float)d;
    const float mean_gw_xhat = warp_sum(sum_gw_xhat) / (float)d;
    T* out = gx + row * d;
    const T* rg = residual_grad ? residual_grad + row * d : nullptr;
    for (int64_t j = lane * V; j < d; j += 32 * V) {
        float xv[V], wv[V], gv[V], rv[V] = {}, ov[V];
        load_lanes<T, V>(xr + j, xv);
        load_lanes<T, V>(weight + j, wv);
        load_lanes<T, V>(gr + j, gv);
        if (rg) load_lanes<T, V>(rg + j, rv);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const float xhat = (xv[e] - mean) * rstd;
            const float ln = rstd * (gv[e] * wv[e] - mean_gw - xhat * mean_gw_xhat);
            ov[e] = rg ? rv[e] + ln : ln;
        }
        store_lanes<T, V>(out + j, ov);
    }
}

template <typename T>
__device__ __forceinline__ void ln_bwd_input(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ g,
                                             const float* __restrict__ stats, const T* __restrict__ residual_grad,
                                             T* __restrict__ gx, int64_t rows, int64_t d, int vectors) {
    const int64_t row = warp_row(rows);
    if (row < 0) return;
    if (vectors && rows_packable<T>(d, x, weight, g, residual_grad, gx))
        ln_bwd_input_v<T, PACK<T>>(x, weight, g, stats, residual_grad, gx, row, d);
    else
        ln_bwd_input_v<T, 1>(x, weight, g, stats, residual_grad, gx, row, d);
}

// partials[part, 0, j] = sum of g * xhat and partials[part, 1, j] = sum of g over the rows of
// the part, for columns j of the thread: V consecutive columns (one 8-byte load per operand and
// row, 4 bf16 or 2 f32, where the host found the width and the addresses allow it; else V = 1,
// as before), so a warp reads 32 V consecutive columns.
template <typename T, int V>
__device__ __forceinline__ void ln_param_partials_v(const T* __restrict__ x, const T* __restrict__ g,
                                                    const float* __restrict__ stats, float* __restrict__ partials,
                                                    int64_t rows, int64_t d, int64_t rows_per_part, int64_t parts) {
    PartSpan span;
    if (!part_span(d, V, rows, rows_per_part, parts, span)) return;
    const int64_t j = span.col, part = span.part;
    float aw[V] = {}, ab[V] = {};
    for (int64_t r = span.r0; r < span.r1; ++r) {
        float gv[V], xv[V];
        load_lanes<T, V>(g + r * d + j, gv);
        load_lanes<T, V>(x + r * d + j, xv);
        const float mean = stats[2 * r], rstd = stats[2 * r + 1];
#pragma unroll
        for (int e = 0; e < V; ++e) {
            aw[e] += gv[e] * ((xv[e] - mean) * rstd);
            ab[e] += gv[e];
        }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
        partials[(part * 2) * d + j + e] = aw[e];
        partials[(part * 2 + 1) * d + j + e] = ab[e];
    }
}

// The vector width of `ln_param_partials`: 8 bytes of each operand a thread.
template <typename T>
constexpr int PARAM_PACK = 8 / (int)sizeof(T);

template <typename T>
__device__ __forceinline__ void ln_param_partials(const T* __restrict__ x, const T* __restrict__ g,
                                                  const float* __restrict__ stats, float* __restrict__ partials,
                                                  int64_t rows, int64_t d, int64_t rows_per_part, int64_t parts, int packed) {
    if (packed)
        ln_param_partials_v<T, PARAM_PACK<T>>(x, g, stats, partials, rows, d, rows_per_part, parts);
    else
        ln_param_partials_v<T, 1>(x, g, stats, partials, rows, d, rows_per_part, parts);
}

// Every row of out ([rows, d]) = row ([d]): the linear layer's output starts as the bias, and
// the gemm then accumulates x W^T onto it (beta = 1), so the bias costs no pass of its own.
// A block per row (striding over rows when there are more rows than blocks), its threads along
// the columns: no division per element. (A flat grid-stride loop with `row[i % d]` spent its
// time in the 64-bit modulo: 47 us a launch on an H100, ~3x the bandwidth's worth.)
template <typename T>
__device__ __forceinline__ void broadcast_row(const T* __restrict__ row, T* __restrict__ out, int64_t rows, int64_t d) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[r * d + j] = row[j];
}

// out = res + row broadcast over the rows: the MLP op's fc2 output starts as the residual plus
// the bias, and the gemm accumulates onto it, so the residual add costs no pass of its own.
// Launched like broadcast_row.
template <typename T>
__device__ __forceinline__ void add_broadcast_row(const T* __restrict__ res, const T* __restrict__ row, T* __restrict__ out,
                                                  int64_t rows, int64_t d) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[r * d + j] = store<T>(load(res[r * d + j]) + load(row[j]));
}

// Column sums of g ([rows, d]) over blocks of rows_per_part rows, in f32 whatever T, as
// [parts, d] partials for rows_reduce_partials: the linear layer's bias gradient. Thread
// (part, j) walks column j down its rows; adjacent threads read adjacent columns (coalesced),
// and the fixed split keeps the sum's order, so the result is the same bits on every run.
template <typename T>
__device__ __forceinline__ void column_sum_partials(const T* __restrict__ g, float* __restrict__ partials, int64_t rows,
                                                    int64_t d, int64_t rows_per_part, int64_t parts) {
    const int64_t idx = global_thread();
    if (idx >= parts * d) return;
    const int64_t j = idx % d;
    const int64_t part = idx / d;
    const int64_t r0 = part * rows_per_part;
    const int64_t r1 = min(r0 + rows_per_part, rows);
    float s = 0.f;
    for (int64_t r = r0; r < r1; ++r) s += load(g[r * d + j]);
    partials[part * d + j] = s;
}

// y = exp(x - max) / sum(exp(x - max)).
// In and Out differ for attention's gemm form: f32 scores in, probabilities in the storage type
// out (the dtype of the gemm that multiplies them with v).
template <typename In, typename Out = In>
__device__ __forceinline__ void softmax_fwd(const In* __restrict__ x, Out* __restrict__ y, int64_t rows, int64_t d) {
    const int64_t row = warp_row(rows);
    if (row < 0) return;
    const int lane = threadIdx.x % 32;
    const In* xr = x + row * d;
    float m = -INFINITY;
    for (int64_t j = lane; j < d; j += 32) m = fmaxf(m, load(xr[j]));
    m = warp_max(m);
    float s = 0.f;
    for (int64_t j = lane; j < d; j += 32) s += expf(load(xr[j]) - m);
    s = warp_sum(s);
    Out* yr = y + row * d;
    for (int64_t j = lane; j < d; j += 32) yr[j] = store<Out>(expf(load(xr[j]) - m) / s);
}

// gx = y * (g - sum(g * y)). G differs from T for attention's gemm form (f32 gradients of the
// probabilities, straight from a gemm).
template <typename T, typename G = T>
__device__ __forceinline__ void softmax_bwd(const T* __restrict__ y, const G* __restrict__ g, T* __restrict__ gx,
                                            int64_t rows, int64_t d) {
    const int64_t row = warp_row(rows);
    if (row < 0) return;
    const int lane = threadIdx.x % 32;
    const T* yr = y + row * d;
    const G* gr = g + row * d;
    float dot = 0.f;
    for (int64_t j = lane; j < d; j += 32) dot += load(yr[j]) * load(gr[j]);
    dot = warp_sum(dot);
    T* out = gx + row * d;
    for (int64_t j = lane; j < d; j += 32) out[j] = store<T>(load(yr[j]) * (load(gr[j]) - dot));
}

// ---- MAE's loss (src/patch_loss.rs): the norm-pix target read from the images in place ----

// Where patch row `row`'s values are in channels-last images [B, height, width, chans]: the
// patch's top-left pixel, and value e (ordered row, column, channel) at base + offset(e).
// Patches are row-major over a grid grid_w wide, `tokens` to an image.
struct PatchPixels {
    int64_t base, row_stride;
    int run;  // patch * chans: the contiguous values of one pixel row of the patch
    __device__ __forceinline__ PatchPixels(int64_t row, int64_t tokens, int64_t grid_w, int64_t patch, int64_t chans,
                                           int64_t height, int64_t width) {
        const int64_t b = row / tokens, l = row % tokens;
        const int64_t gy = l / grid_w, gx = l % grid_w;
        base = ((b * height + gy * patch) * width + gx * patch) * chans;
        row_stride = width * chans;
        run = (int)(patch * chans);
    }
    __device__ __forceinline__ int64_t offset(int e) const {
        const int i = e / run;
        return base + i * row_stride + (e - i * run);
    }
};

// The (mean, std) of one patch's target: sqrt(unbiased variance + 1e-6), as MAE's norm-pix;
// (0, 1) without it. Two passes, like row_stats.
__device__ __forceinline__ void patch_stats(const float* __restrict__ imgs, const PatchPixels& px, int n, int norm_pix,
                                            float& mean, float& std) {
    mean = 0.f;
    std = 1.f;
    if (!norm_pix) return;
    const int lane = threadIdx.x % 32;
    float s = 0.f;
    for (int e = lane; e < n; e += 32) s += imgs[px.offset(e)];
    mean = warp_sum(s) / (float)n;
    float v = 0.f;
    for (int e = lane; e < n; e += 32) {
        const float t = imgs[px.offset(e)] - mean;
        v += t * t;
    }
    std = sqrtf(warp_sum(v) / (float)(n - 1) + 1e-6f);
}

// A warp per patch row: row_loss[row] = mask[row] * mean over the patch of (pred - target)^2,
// the target normalized by the patch's (mean, std), which go to stats[row, 0..2].
template <typename T>
__device__ __forceinline__ void patch_mse_rows(const T* __restrict__ pred, const float* __restrict__ imgs,
                                               const float* __restrict__ mask, float* __restrict__ row_loss,
                                               float* __restrict__ stats, int64_t rows, int64_t tokens, int64_t grid_w,
                                               int64_t patch, int64_t chans, int64_t height, int64_t width, int norm_pix) {
    const int64_t row = warp_row(rows);
    if (row < 0) return;
    const int lane = threadIdx.x % 32;
    const int n = (int)(patch * patch * chans);
    const PatchPixels px(row, tokens, grid_w, patch, chans, height, width);
    float mean, std;
    patch_stats(imgs, px, n, norm_pix, mean, std);
    const T* pr = pred + row * n;
    float s = 0.f;
    for (int e = lane; e < n; e += 32) {
        const float d = load(pr[e]) - (imgs[px.offset(e)] - mean) / std;
        s += d * d;
    }
    s = warp_sum(s);
    if (lane == 0) {
        row_loss[row] = s / (float)n * mask[row];
        stats[2 * row] = mean;
        stats[2 * row + 1] = std;
    }
}

// gpred = grad * mask[row] / mask_sum * 2 / n * (pred - target), a warp per patch row; grad and
// mask_sum are read on the device (the loss's gradient and the forward's sum of the mask), so
// nothing waits for the host.
template <typename T>
__device__ __forceinline__ void patch_mse_bwd(const T* __restrict__ pred, const float* __restrict__ imgs,
                                              const float* __restrict__ mask, const float* __restrict__ stats,
                                              const float* __restrict__ mask_sum, const float* __restrict__ grad,
                                              T* __restrict__ gpred, int64_t rows, int64_t tokens, int64_t grid_w,
                                              int64_t patch, int64_t chans, int64_t height, int64_t width) {
    const int64_t row = warp_row(rows);
    if (row < 0) return;
    const int lane = threadIdx.x % 32;
    const int n = (int)(patch * patch * chans);
    const PatchPixels px(row, tokens, grid_w, patch, chans, height, width);
    const float scale = grad[0] * mask[row] / mask_sum[0] * 2.f / (float)n;
    const float mean = stats[2 * row], std = stats[2 * row + 1];
    const T* pr = pred + row * n;
    T* out = gpred + row * n;
    for (int e = lane; e < n; e += 32) out[e] = store<T>(scale * (load(pr[e]) - (imgs[px.offset(e)] - mean) / std));
}

// ---- the MAE decoder's entry (src/restore_tokens.rs) -----------------------------------------

// out[b, i] = (r < keep ? x[b, r] : mask_token) + pos[i], r = ids[b, i]: a block per output
// row (striding over rows past the grid), its threads along the row.
template <typename T>
__device__ __forceinline__ void restore_tokens_fwd(const T* __restrict__ x, const T* __restrict__ mask_token,
                                                   const T* __restrict__ pos, const uint32_t* __restrict__ ids,
                                                   T* __restrict__ out, int64_t images, int64_t tokens, int64_t keep,
                                                   int64_t d) {
    for (int64_t row = blockIdx.x; row < images * tokens; row += gridDim.x) {
        const int64_t b = row / tokens, i = row % tokens, r = ids[row];
        const T* src = r < keep ? x + (b * keep + r) * d : mask_token;
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[row * d + j] = store<T>(load(src[j]) + load(pos[i * d + j]));
    }
}

// dx[b, r] = g[b, i] for the visible positions (ids[b, i] = r < keep), launched as the forward.
// ids is each image's permutation, so every dx row is written once, by one block.
template <typename T>
__device__ __forceinline__ void restore_tokens_dx(const T* __restrict__ g, const uint32_t* __restrict__ ids,
                                                  T* __restrict__ dx, int64_t images, int64_t tokens, int64_t keep,
                                                  int64_t d) {
    for (int64_t row = blockIdx.x; row < images * tokens; row += gridDim.x) {
        const int64_t b = row / tokens, r = ids[row];
        if (r >= keep) continue;
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) dx[(b * keep + r) * d + j] = g[row * d + j];
    }
}

// Thread (i, j) sums column j of position i over the images: dpos[i, j], and into
// mask_partials[i, j] (f32, for rows_reduce_partials over the positions) the same sum over the
// images where position i is masked: the mask token's gradient.
template <typename T>
__device__ __forceinline__ void restore_tokens_columns(const T* __restrict__ g, const uint32_t* __restrict__ ids,
                                                       T* __restrict__ dpos, float* __restrict__ mask_partials,
                                                       int64_t images, int64_t tokens, int64_t keep, int64_t d) {
    const int64_t idx = global_thread();
    if (idx >= tokens * d) return;
    const int64_t i = idx / d, j = idx % d;
    float sp = 0.f, sm = 0.f;
    for (int64_t b = 0; b < images; ++b) {
        const float v = load(g[(b * tokens + i) * d + j]);
        sp += v;
        if (ids[b * tokens + i] >= keep) sm += v;
    }
    dpos[idx] = store<T>(sp);
    mask_partials[idx] = sm;
}

}  // namespace convmae

using namespace convmae;

#define ROW_KERNELS(T, TNAME)                                                                                      \
    extern "C" __global__ void layer_norm_fwd_##TNAME(const T* x, const T* weight, const T* bias, T* y,          \
                                                      float* stats, int64_t rows, int64_t d, float eps,          \
                                                      int vectors) {                                             \
        ln_fwd<T>(x, weight, bias, y, stats, rows, d, eps, vectors);                                             \
    }                                                                                                             \
    extern "C" __global__ void layer_norm_stats_##TNAME(const T* x, float* stats, int64_t rows, int64_t d,        \
                                                        float eps, int vectors) {                                \
        ln_stats<T>(x, stats, rows, d, eps, vectors);                                                            \
    }                                                                                                             \
    extern "C" __global__ void layer_norm_bwd_input_##TNAME(const T* x, const T* weight, const T* g,             \
                                                            const float* stats, T* gx, int64_t rows, int64_t d,  \
                                                            int vectors) {                                       \
        ln_bwd_input<T>(x, weight, g, stats, (const T*)nullptr, gx, rows, d, vectors);                           \
    }                                                                                                             \
    extern "C" __global__ void layer_norm_bwd_input_add_##TNAME(const T* x, const T* weight, const T* g,         \
                                                                const float* stats, const T* residual_grad, T* gx, \
                                                                int64_t rows, int64_t d, int vectors) {          \
        ln_bwd_input<T>(x, weight, g, stats, residual_grad, gx, rows, d, vectors);                               \
    }                                                                                                             \
    extern "C" __global__ void layer_norm_param_partials_##TNAME(const T* x, const T* g, const float* stats,     \
                                                                 float* partials, int64_t rows, int64_t d,       \
                                                                 int64_t rows_per_part, int64_t parts,           \
                                                                 int packed) {                                   \
        ln_param_partials<T>(x, g, stats, partials, rows, d, rows_per_part, parts, packed);                      \
    }                                                                                                             \
    extern "C" __global__ void rows_reduce_partials_##TNAME(const float* partials, T* out, int64_t parts,         \
                                                            int64_t a, int64_t b, int transpose) {               \
        reduce_partials<T>(partials, out, parts, a, b, transpose);                                               \
    }                                                                                                             \
    extern "C" __global__ void rows_broadcast_##TNAME(const T* row, T* out, int64_t rows, int64_t d) {            \
        broadcast_row<T>(row, out, rows, d);                                                                     \
    }                                                                                                             \
    extern "C" __global__ void rows_add_broadcast_##TNAME(const T* res, const T* row, T* out, int64_t rows,        \
                                                         int64_t d) {                                             \
        add_broadcast_row<T>(res, row, out, rows, d);                                                            \
    }                                                                                                             \
    extern "C" __global__ void column_sum_partials_##TNAME(const T* g, float* partials, int64_t rows, int64_t d,   \
                                                           int64_t rows_per_part, int64_t parts) {               \
        column_sum_partials<T>(g, partials, rows, d, rows_per_part, parts);                                      \
    }                                                                                                             \
    extern "C" __global__ void softmax_fwd_##TNAME(const T* x, T* y, int64_t rows, int64_t d) {                  \
        softmax_fwd<T>(x, y, rows, d);                                                                           \
    }                                                                                                             \
    extern "C" __global__ void softmax_bwd_##TNAME(const T* y, const T* g, T* gx, int64_t rows, int64_t d) {     \
        softmax_bwd<T>(y, g, gx, rows, d);                                                                       \
    }                                                                                                             \
    extern "C" __global__ void scores_softmax_fwd_##TNAME(const float* s, T* p, int64_t rows, int64_t d) {        \
        softmax_fwd<float, T>(s, p, rows, d);                                                                    \
    }                                                                                                             \
    extern "C" __global__ void scores_softmax_bwd_##TNAME(const T* p, const float* dp, T* ds, int64_t rows,      \
                                                          int64_t d) {                                           \
        softmax_bwd<T, float>(p, dp, ds, rows, d);                                                               \
    }                                                                                                             \
    extern "C" __global__ void patch_mse_rows_##TNAME(const T* pred, const float* imgs, const float* mask,         \
                                                      float* row_loss, float* stats, int64_t rows, int64_t tokens, \
                                                      int64_t grid_w, int64_t patch, int64_t chans,              \
                                                      int64_t height, int64_t width, int norm_pix) {             \
        patch_mse_rows<T>(pred, imgs, mask, row_loss, stats, rows, tokens, grid_w, patch, chans, height, width,  \
                          norm_pix);                                                                             \
    }                                                                                                             \
    extern "C" __global__ void restore_tokens_fwd_##TNAME(const T* x, const T* mask_token, const T* pos,           \
                                                          const uint32_t* ids, T* out, int64_t images,             \
                                                          int64_t tokens, int64_t keep, int64_t d) {               \
        restore_tokens_fwd<T>(x, mask_token, pos, ids, out, images, tokens, keep, d);                              \
    }                                                                                                             \
    extern "C" __global__ void restore_tokens_dx_##TNAME(const T* g, const uint32_t* ids, T* dx, int64_t images,   \
                                                         int64_t tokens, int64_t keep, int64_t d) {                \
        restore_tokens_dx<T>(g, ids, dx, images, tokens, keep, d);                                                 \
    }                                                                                                             \
    extern "C" __global__ void restore_tokens_columns_##TNAME(const T* g, const uint32_t* ids, T* dpos,            \
                                                              float* mask_partials, int64_t images,                \
                                                              int64_t tokens, int64_t keep, int64_t d) {           \
        restore_tokens_columns<T>(g, ids, dpos, mask_partials, images, tokens, keep, d);                           \
    }                                                                                                             \
    extern "C" __global__ void patch_mse_bwd_##TNAME(const T* pred, const float* imgs, const float* mask,          \
                                                     const float* stats, const float* mask_sum, const float* grad, \
                                                     T* gpred, int64_t rows, int64_t tokens, int64_t grid_w,      \
                                                     int64_t patch, int64_t chans, int64_t height, int64_t width) { \
        patch_mse_bwd<T>(pred, imgs, mask, stats, mask_sum, grad, gpred, rows, tokens, grid_w, patch, chans,      \
                         height, width);                                                                         \
    }

CONVMAE_FOR_EACH_TYPE(ROW_KERNELS)

// The loss from the rows' terms: loss = sum(row_loss) / sum(mask), and the mask's sum kept for
// the backward. One block of PATCH_TOTAL_THREADS threads: thread t sums rows t, t + blockDim,
// ... in order, then the warps and the block combine in a fixed order, so the loss is the same
// bits on every run (no atomics).
extern "C" __global__ void patch_mse_total(const float* row_loss, const float* mask, float* loss, float* mask_sum,
                                           int64_t rows) {
    __shared__ float warp_loss[32], warp_mask[32];
    float sl = 0.f, sm = 0.f;
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
        sl += row_loss[r];
        sm += mask[r];
    }
    sl = warp_sum(sl);
    sm = warp_sum(sm);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        warp_loss[warp] = sl;
        warp_mask[warp] = sm;
    }
    __syncthreads();
    if (warp != 0) return;
    const int warps = (int)(blockDim.x / 32);
    sl = warp_sum(lane < warps ? warp_loss[lane] : 0.f);
    sm = warp_sum(lane < warps ? warp_mask[lane] : 0.f);
    if (lane == 0) {
        loss[0] = sl / sm;
        mask_sum[0] = sm;
    }
}
