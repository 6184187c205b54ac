// Multi-head self-attention on packed qkv rows, forward and backward (src/attention.rs defines
// the semantics and holds the CPU kernels): the fused FMA kernels, and the two layout kernels
// of the gemm form (cuBLAS tensor-core gemms around rows.cu's scores softmax), at the end.
//
// Layouts (row-major): qkv [B, N, 3, H, HD] (timm's qkv projection output: q heads, k heads, v
// heads), out and its gradient [B, N, H, HD], the qkv gradient like qkv.
//
// One thread per query row (forward, dq) or key row (dk, dv), ATT_ROWS rows per block and a
// block per (image, head, row block): ConvMAE's attention is 49 to 196 tokens with head dims 32
// and 64, too small per head for tensor-core tiles to pay, and the whole point here is to never
// write the [N, N] scores and probabilities to memory. The other side's rows pass through
// shared memory ATT_TILE at a time (all threads of a warp read the same element: a broadcast,
// no bank conflicts). Each thread keeps its own row, its accumulator, and the softmax statistics
// in registers, in f32 whatever the storage type.
//
// The backward recomputes the probabilities from the log-sum-exp of each query row, which the
// dq kernel computes and leaves for the dk and dv kernels (launched after it on the same
// stream), with delta = rowsum(dO * O). Every output element is written by one thread, with no
// atomics: the gradients are the same bits on every run.

#include "common.cuh"

namespace convmae {

constexpr int ATT_ROWS = 64;
constexpr int ATT_TILE = 32;

// Four consecutive floats of a shared-memory tile row. The tiles are 16-byte aligned and HD is
// a multiple of 4, so on the GPU this is one 128-bit shared load (LDS.128) instead of four:
// with one FMA per element read, scalar loads would bound the inner loops, not the FMAs.
// (Only ever applied to shared memory: taking the address of a register array as a float4
// would push the array to local memory.)
__device__ __forceinline__ float4 shared4(const float* p) {
#ifdef CONVMAE_HOST_EMULATION
    return float4{p[0], p[1], p[2], p[3]};
#else
    return *reinterpret_cast<const float4*>(p);
#endif
}

// sum_d a[d] * b[d], a in registers, b a shared tile row, in four interleaved partial sums: four
// independent FMA chains instead of one (latency, not throughput, bounds a single chain).
template <int HD>
__device__ __forceinline__ float dot(const float* a, const float* b_shared) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll
    for (int d = 0; d < HD; d += 4) {
        const float4 b = shared4(b_shared + d);
        s0 += a[d] * b.x;
        s1 += a[d + 1] * b.y;
        s2 += a[d + 2] * b.z;
        s3 += a[d + 3] * b.w;
    }
    return (s0 + s1) + (s2 + s3);
}

// acc[d] += c * row[d], acc in registers, row a shared tile row.
template <int HD>
__device__ __forceinline__ void add_scaled(float* acc, float c, const float* row_shared) {
#pragma unroll
    for (int d = 0; d < HD; d += 4) {
        const float4 r = shared4(row_shared + d);
        acc[d] += c * r.x;
        acc[d + 1] += c * r.y;
        acc[d + 2] += c * r.z;
        acc[d + 3] += c * r.w;
    }
}

// Where this block's rows are: image b, head h, and this thread's row (maybe past n).
struct AttentionRow {
    int64_t b, h, row;
    __device__ AttentionRow(int64_t heads) {
        const int64_t bh = blockIdx.x;
        b = bh / heads;
        h = bh % heads;
        row = (int64_t)blockIdx.y * ATT_ROWS + threadIdx.x;
    }
};

// Offset of (image b, token i, part s = 0 q / 1 k / 2 v, head h) in the packed qkv rows.
__device__ __forceinline__ int64_t packed_at(int64_t b, int64_t i, int s, int64_t h, int64_t n, int64_t heads, int64_t hd) {
    return ((b * n + i) * 3 + s) * heads * hd + h * hd;
}

// Offset of (image b, token i, head h) in [B, N, H, HD].
__device__ __forceinline__ int64_t unpacked_at(int64_t b, int64_t i, int64_t h, int64_t n, int64_t heads, int64_t hd) {
    return (b * n + i) * heads * hd + h * hd;
}

template <typename T, int HD>
__device__ __forceinline__ void load_row(const T* __restrict__ src, float* dst) {
#pragma unroll
    for (int d = 0; d < HD; ++d) dst[d] = load(src[d]);
}

// Stages rows [r0, r0 + count) of `src` (row r at src + at(r)) into tile[ATT_TILE][HD] as f32;
// the whole block takes part, one element per thread per pass.
template <typename T, int HD, typename At>
__device__ __forceinline__ void stage_tile(const T* __restrict__ src, At at, int64_t r0, int count, float (*tile)[HD]) {
    for (int e = threadIdx.x; e < count * HD; e += blockDim.x) {
        const int r = e / HD, d = e % HD;
        tile[r][d] = load(src[at(r0 + r) + d]);
    }
}

// out = softmax(q k^T * scale) v, one query row per thread, with an online softmax: the running
// max m, the running sum l of exp(s - m), and acc = sum exp(s - m) v, rescaled when m grows.
template <typename T, int HD>
__device__ __forceinline__ void attention_fwd(const T* __restrict__ qkv, T* __restrict__ out, int64_t n, int64_t heads, float scale) {
    __shared__ __align__(16) float ks[ATT_TILE][HD];
    __shared__ __align__(16) float vs[ATT_TILE][HD];
    const AttentionRow at(heads);
    const bool active = at.row < n;
    float q[HD], acc[HD];
    if (active) load_row<T, HD>(qkv + packed_at(at.b, at.row, 0, at.h, n, heads, HD), q);
#pragma unroll
    for (int d = 0; d < HD; ++d) acc[d] = 0.f;
    float m = -INFINITY, l = 0.f;
    for (int64_t j0 = 0; j0 < n; j0 += ATT_TILE) {
        const int count = (int)min((int64_t)ATT_TILE, n - j0);
        __syncthreads();  // the previous tile is no longer read
        stage_tile<T, HD>(qkv, [&](int64_t j) { return packed_at(at.b, j, 1, at.h, n, heads, HD); }, j0, count, ks);
        stage_tile<T, HD>(qkv, [&](int64_t j) { return packed_at(at.b, j, 2, at.h, n, heads, HD); }, j0, count, vs);
        __syncthreads();
        if (!active) continue;
        for (int r = 0; r < count; ++r) {
            const float s = dot<HD>(q, ks[r]) * scale;
            if (s > m) {
                // exp(-inf) = 0 on the first key: l and acc start at 0 and stay so.
                const float c = expf(m - s);
                l *= c;
#pragma unroll
                for (int d = 0; d < HD; ++d) acc[d] *= c;
                m = s;
            }
            const float p = expf(s - m);
            l += p;
            add_scaled<HD>(acc, p, vs[r]);
        }
    }
    if (!active) return;
    T* o = out + unpacked_at(at.b, at.row, at.h, n, heads, HD);
    const float inv = 1.f / l;
#pragma unroll
    for (int d = 0; d < HD; ++d) o[d] = store<T>(acc[d] * inv);
}

// dq = scale * sum_j p_ij (dp_ij - delta_i) k_j with dp_ij = dO_i . v_j, one query row per
// thread. First pass: the row's log-sum-exp; it and delta_i = dO_i . O_i go to `stats`
// ([B * H * N, 2] f32) for the dk and dv kernels.
template <typename T, int HD>
__device__ __forceinline__ void attention_bwd_q(const T* __restrict__ qkv, const T* __restrict__ out, const T* __restrict__ gout,
                                                T* __restrict__ gqkv, float* __restrict__ stats, int64_t n, int64_t heads, float scale) {
    __shared__ __align__(16) float ks[ATT_TILE][HD];
    __shared__ __align__(16) float vs[ATT_TILE][HD];
    const AttentionRow at(heads);
    const bool active = at.row < n;
    float q[HD], go[HD], dq[HD];
    float delta = 0.f;
    if (active) {
        load_row<T, HD>(qkv + packed_at(at.b, at.row, 0, at.h, n, heads, HD), q);
        load_row<T, HD>(gout + unpacked_at(at.b, at.row, at.h, n, heads, HD), go);
        // O is read once here (its row is used for nothing else), into dq as scratch.
        load_row<T, HD>(out + unpacked_at(at.b, at.row, at.h, n, heads, HD), dq);
#pragma unroll
        for (int d = 0; d < HD; ++d) delta += go[d] * dq[d];
    }
#pragma unroll
    for (int d = 0; d < HD; ++d) dq[d] = 0.f;
    auto k_at = [&](int64_t j) { return packed_at(at.b, j, 1, at.h, n, heads, HD); };
    auto v_at = [&](int64_t j) { return packed_at(at.b, j, 2, at.h, n, heads, HD); };
    float m = -INFINITY, l = 0.f;
    for (int64_t j0 = 0; j0 < n; j0 += ATT_TILE) {
        const int count = (int)min((int64_t)ATT_TILE, n - j0);
        __syncthreads();
        stage_tile<T, HD>(qkv, k_at, j0, count, ks);
        __syncthreads();
        if (!active) continue;
        for (int r = 0; r < count; ++r) {
            const float s = dot<HD>(q, ks[r]) * scale;
            if (s > m) {
                l *= expf(m - s);
                m = s;
            }
            l += expf(s - m);
        }
    }
    const float lse = m + logf(l);
    for (int64_t j0 = 0; j0 < n; j0 += ATT_TILE) {
        const int count = (int)min((int64_t)ATT_TILE, n - j0);
        __syncthreads();
        stage_tile<T, HD>(qkv, k_at, j0, count, ks);
        stage_tile<T, HD>(qkv, v_at, j0, count, vs);
        __syncthreads();
        if (!active) continue;
        for (int r = 0; r < count; ++r) {
            const float p = expf(dot<HD>(q, ks[r]) * scale - lse);
            const float ds = p * (dot<HD>(go, vs[r]) - delta);
            add_scaled<HD>(dq, ds, ks[r]);
        }
    }
    if (!active) return;
    T* g = gqkv + packed_at(at.b, at.row, 0, at.h, n, heads, HD);
#pragma unroll
    for (int d = 0; d < HD; ++d) g[d] = store<T>(dq[d] * scale);
    const int64_t srow = (int64_t)blockIdx.x * n + at.row;
    stats[2 * srow] = lse;
    stats[2 * srow + 1] = delta;
}

// The query side of the dk / dv kernels: query rows, their output-gradient rows and their
// (lse, delta) staged together.
template <int HD>
struct __align__(16) QueryTile {
    float q[ATT_TILE][HD];
    float go[ATT_TILE][HD];
    float lse[ATT_TILE];
    float delta[ATT_TILE];
};

template <typename T, int HD>
__device__ __forceinline__ void stage_queries(const T* __restrict__ qkv, const T* __restrict__ gout, const float* __restrict__ stats,
                                              const AttentionRow& at, int64_t i0, int count, int64_t n, int64_t heads, QueryTile<HD>& tile) {
    stage_tile<T, HD>(qkv, [&](int64_t i) { return packed_at(at.b, i, 0, at.h, n, heads, HD); }, i0, count, tile.q);
    stage_tile<T, HD>(gout, [&](int64_t i) { return unpacked_at(at.b, i, at.h, n, heads, HD); }, i0, count, tile.go);
    for (int r = threadIdx.x; r < count; r += blockDim.x) {
        const int64_t srow = (int64_t)blockIdx.x * n + i0 + r;
        tile.lse[r] = stats[2 * srow];
        tile.delta[r] = stats[2 * srow + 1];
    }
}

// The query loop of the dk and dv kernels: every query row of this (image, head), a tile at a
// time through `tile` (the whole block stages it), `per_query(r)` for row r of the tile on the
// threads that own a key row.
template <typename T, int HD, typename PerQuery>
__device__ __forceinline__ void for_each_query(const T* __restrict__ qkv, const T* __restrict__ gout, const float* __restrict__ stats,
                                               const AttentionRow& at, int64_t n, int64_t heads, bool active, QueryTile<HD>& tile,
                                               PerQuery per_query) {
    for (int64_t i0 = 0; i0 < n; i0 += ATT_TILE) {
        const int count = (int)min((int64_t)ATT_TILE, n - i0);
        __syncthreads();  // the previous tile is no longer read
        stage_queries<T, HD>(qkv, gout, stats, at, i0, count, n, heads, tile);
        __syncthreads();
        if (!active) continue;
        for (int r = 0; r < count; ++r) per_query(r);
    }
}

// dk = scale * sum_i p_ij (dp_ij - delta_i) q_i, one key row per thread.
template <typename T, int HD>
__device__ __forceinline__ void attention_bwd_k(const T* __restrict__ qkv, const T* __restrict__ gout, const float* __restrict__ stats,
                                                T* __restrict__ gqkv, int64_t n, int64_t heads, float scale) {
    __shared__ QueryTile<HD> tile;
    const AttentionRow at(heads);
    const bool active = at.row < n;
    float k[HD], v[HD], dk[HD];
    if (active) {
        load_row<T, HD>(qkv + packed_at(at.b, at.row, 1, at.h, n, heads, HD), k);
        load_row<T, HD>(qkv + packed_at(at.b, at.row, 2, at.h, n, heads, HD), v);
    }
#pragma unroll
    for (int d = 0; d < HD; ++d) dk[d] = 0.f;
    for_each_query<T, HD>(qkv, gout, stats, at, n, heads, active, tile, [&](int r) {
        const float p = expf(dot<HD>(k, tile.q[r]) * scale - tile.lse[r]);
        const float ds = p * (dot<HD>(v, tile.go[r]) - tile.delta[r]);
        add_scaled<HD>(dk, ds, tile.q[r]);
    });
    if (!active) return;
    T* g = gqkv + packed_at(at.b, at.row, 1, at.h, n, heads, HD);
#pragma unroll
    for (int d = 0; d < HD; ++d) g[d] = store<T>(dk[d] * scale);
}

// dv = sum_i p_ij dO_i, one key row per thread. (A kernel of its own rather than part of the dk
// one: k, v, dk and dv together are 4 * HD = 256 registers at HD 64, past the 255 a thread has.)
template <typename T, int HD>
__device__ __forceinline__ void attention_bwd_v(const T* __restrict__ qkv, const T* __restrict__ gout, const float* __restrict__ stats,
                                                T* __restrict__ gqkv, int64_t n, int64_t heads, float scale) {
    __shared__ QueryTile<HD> tile;
    const AttentionRow at(heads);
    const bool active = at.row < n;
    float k[HD], dv[HD];
    if (active) load_row<T, HD>(qkv + packed_at(at.b, at.row, 1, at.h, n, heads, HD), k);
#pragma unroll
    for (int d = 0; d < HD; ++d) dv[d] = 0.f;
    for_each_query<T, HD>(qkv, gout, stats, at, n, heads, active, tile, [&](int r) {
        const float p = expf(dot<HD>(k, tile.q[r]) * scale - tile.lse[r]);
        add_scaled<HD>(dv, p, tile.go[r]);
    });
    if (!active) return;
    T* g = gqkv + packed_at(at.b, at.row, 2, at.h, n, heads, HD);
#pragma unroll
    for (int d = 0; d < HD; ++d) g[d] = store<T>(dv[d]);
}

// ---- The gemm form (src/cuda.rs attention_gemm_fwd / _bwd) ---------------------------------
// Its batched gemms need each (image, head) as a dense [N, HD] matrix at a fixed stride, which
// the packed rows are not (a head's rows are 3 * H * HD apart, and the images further still):
// these two kernels move packed rows [B, N, P, H, HD] (P = 3: qkv or its gradient; P = 1: the
// output or its gradient) to heads-major [P, B, H, N, HD] and back. A block per (token, part),
// its threads along the token's H * HD contiguous packed elements, so the packed side is read or
// written in full rows and each head's HD elements land contiguously on the other side.
template <typename T, bool ToHeads>
__device__ __forceinline__ void permute_heads(const T* __restrict__ src, T* __restrict__ dst, int64_t b, int64_t n, int64_t heads, int hd) {
    const int64_t token = blockIdx.x;  // image * n + token within the image
    const int64_t part = blockIdx.y, parts = gridDim.y;
    const int64_t image = token / n, i = token % n;
    const int width = (int)heads * hd;
    const int64_t packed = (token * parts + part) * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const int h = c / hd, d = c % hd;
        const int64_t split = (((part * b + image) * heads + h) * n + i) * hd + d;
        if (ToHeads) {
            dst[split] = src[packed + c];
        } else {
            dst[packed + c] = src[split];
        }
    }
}

}  // namespace convmae

// Launch: grid (B * N, P), block 256 (src/cuda.rs permute_heads).
#define CONVMAE_PERMUTE_HEADS_KERNELS(T, SUFFIX)                                                                          \
    extern "C" __global__ void attention_to_heads_##SUFFIX(const T* src, T* dst, int64_t b, int64_t n, int64_t heads,     \
                                                           int hd) {                                                     \
        convmae::permute_heads<T, true>(src, dst, b, n, heads, hd);                                                       \
    }                                                                                                                     \
    extern "C" __global__ void attention_from_heads_##SUFFIX(const T* src, T* dst, int64_t b, int64_t n, int64_t heads,   \
                                                             int hd) {                                                   \
        convmae::permute_heads<T, false>(src, dst, b, n, heads, hd);                                                      \
    }

CONVMAE_FOR_EACH_TYPE(CONVMAE_PERMUTE_HEADS_KERNELS)

// Launch: grid (B * H, ceil(N / ATT_ROWS)), block ATT_ROWS threads (src/cuda.rs).
#define CONVMAE_ATTENTION_KERNELS(T, SUFFIX, HD)                                                                                      \
    extern "C" __global__ void attention_fwd_hd##HD##_##SUFFIX(const T* qkv, T* out, int64_t n, int64_t heads, float scale) {        \
        convmae::attention_fwd<T, HD>(qkv, out, n, heads, scale);                                                                     \
    }                                                                                                                                 \
    extern "C" __global__ void attention_bwd_q_hd##HD##_##SUFFIX(const T* qkv, const T* out, const T* gout, T* gqkv, float* stats,   \
                                                                 int64_t n, int64_t heads, float scale) {                             \
        convmae::attention_bwd_q<T, HD>(qkv, out, gout, gqkv, stats, n, heads, scale);                                                \
    }                                                                                                                                 \
    extern "C" __global__ void attention_bwd_k_hd##HD##_##SUFFIX(const T* qkv, const T* gout, const float* stats, T* gqkv, int64_t n, \
                                                                 int64_t heads, float scale) {                                        \
        convmae::attention_bwd_k<T, HD>(qkv, gout, stats, gqkv, n, heads, scale);                                                     \
    }                                                                                                                                 \
    extern "C" __global__ void attention_bwd_v_hd##HD##_##SUFFIX(const T* qkv, const T* gout, const float* stats, T* gqkv, int64_t n, \
                                                                 int64_t heads, float scale) {                                        \
        convmae::attention_bwd_v<T, HD>(qkv, gout, stats, gqkv, n, heads, scale);                                                     \
    }

// The head dims of src/attention.rs's CUDA_HEAD_DIMS.
#define CONVMAE_ATTENTION_ALL_HD(T, SUFFIX)    \
    CONVMAE_ATTENTION_KERNELS(T, SUFFIX, 8)    \
    CONVMAE_ATTENTION_KERNELS(T, SUFFIX, 16)   \
    CONVMAE_ATTENTION_KERNELS(T, SUFFIX, 32)   \
    CONVMAE_ATTENTION_KERNELS(T, SUFFIX, 64)

CONVMAE_FOR_EACH_TYPE(CONVMAE_ATTENTION_ALL_HD)
