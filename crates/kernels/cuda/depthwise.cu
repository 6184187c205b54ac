// Depthwise 2-D convolution (stride 1, zero padding K/2, no bias, cross-correlation like
// PyTorch), dense on channels-last [B, H, W, C] maps and sparse on [N, C] rows of visible
// positions with a neighbour table; forward, input gradient and weight gradient. The CPU
// kernels (src/depthwise_conv.rs, src/sparse_depthwise_conv.rs) define the semantics.
//
// Thread mapping: the channel is always the fastest index, so the 32 lanes of a warp read 32
// consecutive channels of one pixel (one 128-byte line in f32) and share every neighbour-table
// entry. The weight is [C, K, K]; each thread keeps its channel's K*K taps in registers.
//
// Input gradients are the forward correlation with the kernel rotated by 180 degrees (`flip`):
// for the dense map because the adjoint of a zero-padded correlation with an odd kernel and
// padding K/2 is that, and for the sparse rows because the neighbour relation is symmetric
// (nbr[n, t] = m <=> nbr[m, KK-1-t] = n). So both are gathers, with no scatter and no atomics.
//
// Weight gradients are sums over all pixels. Each thread sums one channel over a fixed span of
// pixels into f32 registers and writes them as one partial [KK, C] block; `*_reduce_partials`
// then adds the partials in index order into [C, K, K]. The span depends only on the shape, so
// the result is the same bits on every run (no float atomics).
//
// K = 3, 5, 7 are compiled with the kernel size fixed (taps and the sliding window unrolled
// into registers); `kany` kernels take any odd K at run time, reading the taps from memory.
// For those three the sparse kernels also have vector forms (`*_lanes`: several channels a
// thread, each operand read in one vector load), which src/cuda.rs takes where C and the
// addresses allow: run 7 spent 2.0 ms of its step in the one-channel forms (1.3 ms gathering,
// 0.7 ms of weight partials), their loads of 2 bytes each.


#include "common.cuh"

namespace convmae {

// Output columns per thread in the dense correlation: the K + XT - 1 input columns of a tap
// row are loaded once and reused by the XT outputs.
constexpr int DW_XT = 4;
// Rows per thread in the sparse gather: the thread's K*K taps are loaded once for all of them.
constexpr int SPARSE_ROWS = 8;

// ---- dense ---------------------------------------------------------------------------------

// out[b,y,x,c] = sum_{i,j} w[c, t(i,j)] * src[b, y+i-p, x+j-p, c], t = i*K+j, or KK-1-t when
// flip. One thread per (b, y, tile of DW_XT columns, c).
template <typename T, int K>
__device__ __forceinline__ void dw_correlate(const T* __restrict__ src, const T* __restrict__ weight,
                                             T* __restrict__ out, int64_t nb, int64_t h, int64_t w,
                                             int64_t c, int k_rt, int flip) {
    const int k = K > 0 ? K : k_rt;
    const int kk = k * k;
    const int p = k / 2;
    const int64_t tiles = (w + DW_XT - 1) / DW_XT;
    const int64_t idx = global_thread();
    if (idx >= nb * h * tiles * c) return;
    const int64_t ch = idx % c;
    int64_t r = idx / c;
    const int64_t x0 = (r % tiles) * DW_XT;
    r /= tiles;
    const int64_t y = r % h;
    const int64_t b = r / h;

    float acc[DW_XT];
#pragma unroll
    for (int xo = 0; xo < DW_XT; ++xo) acc[xo] = 0.f;

    if constexpr (K > 0) {
        constexpr int KK = K * K;
        float wt[KK];
#pragma unroll
        for (int t = 0; t < KK; ++t) wt[t] = load(weight[ch * KK + (flip ? KK - 1 - t : t)]);
#pragma unroll
        for (int i = 0; i < K; ++i) {
            const int64_t yy = y + i - p;
            if (yy < 0 || yy >= h) continue;
            const T* in_row = src + (b * h + yy) * w * c + ch;
            // win[u] = input column x0 - p + u of this tap row, zero outside the image.
            float win[DW_XT + K - 1];
#pragma unroll
            for (int u = 0; u < DW_XT + K - 1; ++u) {
                const int64_t xx = x0 - p + u;
                win[u] = (xx >= 0 && xx < w) ? load(in_row[xx * c]) : 0.f;
            }
#pragma unroll
            for (int j = 0; j < K; ++j) {
#pragma unroll
                for (int xo = 0; xo < DW_XT; ++xo) acc[xo] += wt[i * K + j] * win[xo + j];
            }
        }
    } else {
        for (int i = 0; i < k; ++i) {
            const int64_t yy = y + i - p;
            if (yy < 0 || yy >= h) continue;
            const T* in_row = src + (b * h + yy) * w * c + ch;
            for (int j = 0; j < k; ++j) {
                const int t = i * k + j;
                const float wv = load(weight[ch * kk + (flip ? kk - 1 - t : t)]);
#pragma unroll
                for (int xo = 0; xo < DW_XT; ++xo) {
                    const int64_t xx = x0 + xo + j - p;
                    if (xx >= 0 && xx < w) acc[xo] += wv * load(in_row[xx * c]);
                }
            }
        }
    }
#pragma unroll
    for (int xo = 0; xo < DW_XT; ++xo) {
        const int64_t x = x0 + xo;
        if (x < w) out[((b * h + y) * w + x) * c + ch] = store<T>(acc[xo]);
    }
}

// partials[part, t, c] = sum over the image rows r = (b, y) in
// [part * rows_per_part, (part + 1) * rows_per_part) and all x of
// gout[b,y,x,c] * inp[b, y+i-p, x+j-p, c], t = i*K+j. One thread per (part, c).
template <typename T, int K>
__device__ __forceinline__ void dw_weight_partials(const T* __restrict__ inp, const T* __restrict__ gout,
                                                   float* __restrict__ partials, int64_t nb, int64_t h,
                                                   int64_t w, int64_t c, int k_rt, int64_t rows_per_part,
                                                   int64_t parts) {
    const int k = K > 0 ? K : k_rt;
    const int kk = k * k;
    const int p = k / 2;
    const int64_t idx = global_thread();
    if (idx >= parts * c) return;
    const int64_t ch = idx % c;
    const int64_t part = idx / c;
    const int64_t r0 = part * rows_per_part;
    const int64_t r1 = min(r0 + rows_per_part, nb * h);
    float* dst = partials + part * kk * c + ch;

    if constexpr (K > 0) {
        constexpr int KK = K * K;
        float acc[KK];
#pragma unroll
        for (int t = 0; t < KK; ++t) acc[t] = 0.f;
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / h;
            const int64_t y = r % h;
            const T* g_row = gout + r * w * c + ch;
            // The K x K input window of output column x, slid one column per step:
            // win[i][u] = inp[b, y+i-p, x-p+u, c] (zero outside the image). Before the loop,
            // columns 1..K-1 hold the window of x = -1, so the shift at x = 0 lines it up.
            const T* in_rows[K];
            bool row_ok[K];
#pragma unroll
            for (int i = 0; i < K; ++i) {
                const int64_t yy = y + i - p;
                row_ok[i] = yy >= 0 && yy < h;
                in_rows[i] = inp + (b * h + (row_ok[i] ? yy : 0)) * w * c + ch;
            }
            float win[K][K];
#pragma unroll
            for (int i = 0; i < K; ++i) {
                win[i][0] = 0.f;
#pragma unroll
                for (int u = 1; u < K; ++u) {
                    const int64_t xx = (int64_t)u - 1 - p;
                    win[i][u] = (row_ok[i] && xx >= 0 && xx < w) ? load(in_rows[i][xx * c]) : 0.f;
                }
            }
            for (int64_t x = 0; x < w; ++x) {
                const int64_t xn = x + p;  // the column entering the window
#pragma unroll
                for (int i = 0; i < K; ++i) {
#pragma unroll
                    for (int u = 0; u < K - 1; ++u) win[i][u] = win[i][u + 1];
                    win[i][K - 1] = (row_ok[i] && xn < w) ? load(in_rows[i][xn * c]) : 0.f;
                }
                const float gv = load(g_row[x * c]);
#pragma unroll
                for (int i = 0; i < K; ++i) {
#pragma unroll
                    for (int u = 0; u < K; ++u) acc[i * K + u] += gv * win[i][u];
                }
            }
        }
#pragma unroll
        for (int t = 0; t < KK; ++t) dst[t * c] = acc[t];
    } else {
        for (int t = 0; t < kk; ++t) {
            const int i = t / k;
            const int j = t % k;
            float acc = 0.f;
            for (int64_t r = r0; r < r1; ++r) {
                const int64_t b = r / h;
                const int64_t y = r % h;
                const int64_t yy = y + i - p;
                if (yy < 0 || yy >= h) continue;
                const T* g_row = gout + r * w * c + ch;
                const T* in_row = inp + (b * h + yy) * w * c + ch;
                for (int64_t x = 0; x < w; ++x) {
                    const int64_t xx = x + j - p;
                    if (xx >= 0 && xx < w) acc += load(g_row[x * c]) * load(in_row[xx * c]);
                }
            }
            dst[t * c] = acc;
        }
    }
}

// ---- sparse --------------------------------------------------------------------------------

// out[n, c] = sum_t w[c, t or KK-1-t] * src[nbr[n, t], c], taps with nbr = -1 reading zero,
// summed in increasing t like the CPU kernel. One thread per (chunk of SPARSE_ROWS rows, c).
template <typename T, int K>
__device__ __forceinline__ void sparse_gather(const T* __restrict__ src, const T* __restrict__ weight,
                                              const int32_t* __restrict__ nbr, T* __restrict__ out,
                                              int64_t rows, int64_t c, int k_rt, int flip) {
    const int kk = K > 0 ? K * K : k_rt * k_rt;
    const int64_t chunks = (rows + SPARSE_ROWS - 1) / SPARSE_ROWS;
    const int64_t idx = global_thread();
    if (idx >= chunks * c) return;
    const int64_t ch = idx % c;
    const int64_t n0 = (idx / c) * SPARSE_ROWS;
    const int64_t n1 = min(n0 + SPARSE_ROWS, rows);

    if constexpr (K > 0) {
        constexpr int KK = K * K;
        float wt[KK];
#pragma unroll
        for (int t = 0; t < KK; ++t) wt[t] = load(weight[ch * KK + (flip ? KK - 1 - t : t)]);
        for (int64_t n = n0; n < n1; ++n) {
            const int32_t* row_nbr = nbr + n * KK;
            float acc = 0.f;
#pragma unroll
            for (int t = 0; t < KK; ++t) {
                const int32_t m = row_nbr[t];
                if (m >= 0) acc += wt[t] * load(src[(int64_t)m * c + ch]);
            }
            out[n * c + ch] = store<T>(acc);
        }
    } else {
        for (int64_t n = n0; n < n1; ++n) {
            const int32_t* row_nbr = nbr + n * kk;
            float acc = 0.f;
            for (int t = 0; t < kk; ++t) {
                const int32_t m = row_nbr[t];
                if (m >= 0) acc += load(weight[ch * kk + (flip ? kk - 1 - t : t)]) * load(src[(int64_t)m * c + ch]);
            }
            out[n * c + ch] = store<T>(acc);
        }
    }
}

// w_t[t, c] = w[c, t]: the taps of the weight in rows of channels, as `sparse_gather_lanes`
// reads them. One thread per element.
template <typename T>
__device__ __forceinline__ void taps_major(const T* __restrict__ w, T* __restrict__ w_t, int64_t c, int kk) {
    const int64_t idx = global_thread();
    if (idx >= c * kk) return;
    w_t[idx] = w[(idx % c) * kk + idx / c];
}

// `sparse_gather` on 16 bytes of channels a thread (V = 8 bf16 or 4 f32) and one row: per
// tap one vector load of the neighbour's V channels and one of the taps' (`w_t`, [KK, C] from
// `taps_major`: in L1, as every thread reads the same K*K rows), where the one-channel form
// makes V loads of each and V of the table entry. With the taps not held in registers there
// is nothing to share across rows, so a thread takes one, for as many loads in flight as the
// one-channel form has. The same products, summed in the same order. Needs C a multiple of V
// and src, w_t and out 16-byte aligned (src/cuda.rs checks).
template <typename T, int K>
__device__ __forceinline__ void sparse_gather_lanes(const T* __restrict__ src, const T* __restrict__ w_t,
                                                    const int32_t* __restrict__ nbr, T* __restrict__ out,
                                                    int64_t rows, int64_t c, int flip) {
    constexpr int KK = K * K, V = 16 / (int)sizeof(T);
    const int64_t groups = c / V;
    const int64_t idx = global_thread();
    if (idx >= rows * groups) return;
    const int64_t ch = (idx % groups) * V;
    const int64_t n = idx / groups;
    const int32_t* row_nbr = nbr + n * KK;
    float acc[V] = {};
#pragma unroll
    for (int t = 0; t < KK; ++t) {
        const int32_t m = row_nbr[t];
        if (m >= 0) {
            float w[V], x[V];
            load_lanes<T, V>(w_t + (int64_t)(flip ? KK - 1 - t : t) * c + ch, w);
            load_lanes<T, V>(src + (int64_t)m * c + ch, x);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] += w[e] * x[e];
        }
    }
    store_lanes<T, V>(out + n * c + ch, acc);
}

// partials[part, t, c] = sum over rows n in [part * rows_per_part, (part + 1) * rows_per_part)
// of gout[n, c] * inp[nbr[n, t], c]. One thread per (part, c).
template <typename T, int K>
__device__ __forceinline__ void sparse_weight_partials(const T* __restrict__ inp, const T* __restrict__ gout,
                                                       const int32_t* __restrict__ nbr,
                                                       float* __restrict__ partials, int64_t rows, int64_t c,
                                                       int k_rt, int64_t rows_per_part, int64_t parts) {
    const int kk = K > 0 ? K * K : k_rt * k_rt;
    const int64_t idx = global_thread();
    if (idx >= parts * c) return;
    const int64_t ch = idx % c;
    const int64_t part = idx / c;
    const int64_t n0 = part * rows_per_part;
    const int64_t n1 = min(n0 + rows_per_part, rows);
    float* dst = partials + part * kk * c + ch;

    if constexpr (K > 0) {
        constexpr int KK = K * K;
        float acc[KK];
#pragma unroll
        for (int t = 0; t < KK; ++t) acc[t] = 0.f;
        for (int64_t n = n0; n < n1; ++n) {
            const float gv = load(gout[n * c + ch]);
            const int32_t* row_nbr = nbr + n * KK;
#pragma unroll
            for (int t = 0; t < KK; ++t) {
                const int32_t m = row_nbr[t];
                if (m >= 0) acc[t] += gv * load(inp[(int64_t)m * c + ch]);
            }
        }
#pragma unroll
        for (int t = 0; t < KK; ++t) dst[t * c] = acc[t];
    } else {
        for (int t = 0; t < kk; ++t) {
            float acc = 0.f;
            for (int64_t n = n0; n < n1; ++n) {
                const int32_t m = nbr[n * kk + t];
                if (m >= 0) acc += load(gout[n * c + ch]) * load(inp[(int64_t)m * c + ch]);
            }
            dst[t * c] = acc;
        }
    }
}

// `sparse_weight_partials` on 2 channels a thread (one 4-byte load of bf16, 8 of f32, per
// operand and row or tap: half the loads), the same sums in the same order. 2, not the gather's
// 16 bytes: the thread holds K*K sums per channel. Needs C even and inp and gout aligned to
// two elements (src/cuda.rs checks).
template <typename T, int K>
__device__ __forceinline__ void sparse_weight_partials_lanes(const T* __restrict__ inp, const T* __restrict__ gout,
                                                             const int32_t* __restrict__ nbr, float* __restrict__ partials,
                                                             int64_t rows, int64_t c, int64_t rows_per_part, int64_t parts) {
    constexpr int KK = K * K, V = 2;
    PartSpan span;
    if (!part_span(c, V, rows, rows_per_part, parts, span)) return;
    const int64_t ch = span.col;
    float acc[KK][V] = {};
    for (int64_t n = span.r0; n < span.r1; ++n) {
        float gv[V];
        load_lanes<T, V>(gout + n * c + ch, gv);
        const int32_t* row_nbr = nbr + n * KK;
#pragma unroll
        for (int t = 0; t < KK; ++t) {
            const int32_t m = row_nbr[t];
            if (m >= 0) {
                float x[V];
                load_lanes<T, V>(inp + (int64_t)m * c + ch, x);
#pragma unroll
                for (int e = 0; e < V; ++e) acc[t][e] += gv[e] * x[e];
            }
        }
    }
    float* dst = partials + span.part * KK * c + ch;
#pragma unroll
    for (int t = 0; t < KK; ++t) {
#pragma unroll
        for (int e = 0; e < V; ++e) dst[t * c + e] = acc[t][e];
    }
}

// ---- the neighbour table of a mask's visible token blocks ---------------------------------

// src/sparse_depthwise_conv.rs `VisibleTokens::neighbour`, one thread per (row, tap), grid
// stride: row n is (image b, visible token v, row qi and column qj in the cell); its position
// is the token's cell origin plus (qi, qj); the tap (i, j) looks at the position offset by
// (i - K/2, j - K/2), whose token's slot (its place in ids_keep, or -1 if masked) gives its row.
__device__ __forceinline__ void visible_neighbors(const uint32_t* __restrict__ ids_keep, const int32_t* __restrict__ slot,
                                                  int32_t* __restrict__ table, int64_t n, int k, int cell, int grid,
                                                  int len_keep) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t cc = (int64_t)cell * cell, kk = (int64_t)k * k, side = (int64_t)grid * cell;
    for (int64_t e = global_thread(); e < n; e += stride) {
        const int64_t row = e / kk, t = e % kk;
        const int64_t b = row / (len_keep * cc), v = row / cc % len_keep, q = row % cc;
        const int64_t token = ids_keep[b * len_keep + v];
        const int64_t y = token / grid * cell + q / cell + t / k - k / 2;
        const int64_t x = token % grid * cell + q % cell + t % k - k / 2;
        int32_t out = -1;
        if (y >= 0 && x >= 0 && y < side && x < side) {
            const int32_t s = slot[b * grid * grid + y / cell * grid + x / cell];
            if (s >= 0) out = (int32_t)((b * len_keep + s) * cc + y % cell * cell + x % cell);
        }
        table[e] = out;
    }
}

}  // namespace convmae

using namespace convmae;

extern "C" __global__ void visible_neighbors(const uint32_t* ids_keep, const int32_t* slot, int32_t* table, int64_t n, int k,
                                             int cell, int grid, int len_keep) {
    convmae::visible_neighbors(ids_keep, slot, table, n, k, cell, grid, len_keep);
}

#define DW_KERNELS(K, KNAME, T, TNAME)                                                                        \
    extern "C" __global__ void dwconv_correlate_##KNAME##_##TNAME(                                             \
        const T* src, const T* weight, T* out, int64_t nb, int64_t h, int64_t w, int64_t c, int k, int flip) { \
        dw_correlate<T, K>(src, weight, out, nb, h, w, c, k, flip);                                            \
    }                                                                                                          \
    extern "C" __global__ void dwconv_weight_partials_##KNAME##_##TNAME(                                       \
        const T* inp, const T* gout, float* partials, int64_t nb, int64_t h, int64_t w, int64_t c, int k,      \
        int64_t rows_per_part, int64_t parts) {                                                                \
        dw_weight_partials<T, K>(inp, gout, partials, nb, h, w, c, k, rows_per_part, parts);                   \
    }                                                                                                          \
    extern "C" __global__ void sdwconv_gather_##KNAME##_##TNAME(                                               \
        const T* src, const T* weight, const int32_t* nbr, T* out, int64_t rows, int64_t c, int k, int flip) { \
        sparse_gather<T, K>(src, weight, nbr, out, rows, c, k, flip);                                          \
    }                                                                                                          \
    extern "C" __global__ void sdwconv_weight_partials_##KNAME##_##TNAME(                                      \
        const T* inp, const T* gout, const int32_t* nbr, float* partials, int64_t rows, int64_t c, int k,      \
        int64_t rows_per_part, int64_t parts) {                                                                \
        sparse_weight_partials<T, K>(inp, gout, nbr, partials, rows, c, k, rows_per_part, parts);              \
    }

// The vector forms, for the kernel sizes compiled fixed.
#define DW_LANE_KERNELS(K, KNAME, T, TNAME)                                                                   \
    extern "C" __global__ void sdwconv_gather_lanes_##KNAME##_##TNAME(                                         \
        const T* src, const T* w_t, const int32_t* nbr, T* out, int64_t rows, int64_t c, int flip) {           \
        sparse_gather_lanes<T, K>(src, w_t, nbr, out, rows, c, flip);                                          \
    }                                                                                                          \
    extern "C" __global__ void sdwconv_weight_partials_lanes_##KNAME##_##TNAME(                                \
        const T* inp, const T* gout, const int32_t* nbr, float* partials, int64_t rows, int64_t c,             \
        int64_t rows_per_part, int64_t parts) {                                                                \
        sparse_weight_partials_lanes<T, K>(inp, gout, nbr, partials, rows, c, rows_per_part, parts);          \
    }

#define DW_KERNELS_ALL_K(T, TNAME) \
    DW_KERNELS(3, k3, T, TNAME)    \
    DW_KERNELS(5, k5, T, TNAME)    \
    DW_KERNELS(7, k7, T, TNAME)    \
    DW_KERNELS(0, kany, T, TNAME)  \
    DW_LANE_KERNELS(3, k3, T, TNAME) \
    DW_LANE_KERNELS(5, k5, T, TNAME) \
    DW_LANE_KERNELS(7, k7, T, TNAME) \
    extern "C" __global__ void dw_taps_major_##TNAME(const T* w, T* w_t, int64_t c, int kk) {           \
        taps_major<T>(w, w_t, c, kk);                                                                   \
    }                                                                                                   \
    extern "C" __global__ void dw_reduce_partials_##TNAME(const float* partials, T* out, int64_t parts, \
                                                          int64_t a, int64_t b, int transpose) {          \
        reduce_partials<T>(partials, out, parts, a, b, transpose);                                      \
    }

CONVMAE_FOR_EACH_TYPE(DW_KERNELS_ALL_K)
