// Multi-head self-attention on the tensor cores (src/attention.rs `CudaForm::Flash`): forward
// and backward in three kernels that never write the [N, N] scores to memory, for 16-bit
// storage (bf16, f16) and head dims 16, 32 and 64. Same semantics and layouts as
// attention.cu: qkv [B, N, 3, H, HD], out and its gradient [B, N, H, HD], the qkv gradient like
// qkv.
//
// Why a third form: on an H100 the fused FMA kernels (attention.cu) took 28 ms of a ConvMAE-B
// step and the gemm form (cuBLAS around f32 scores in memory) about half that, where PyTorch's
// cuDNN flash attention takes 2 ms. ConvMAE's heads are small (49 visible tokens in the encoder,
// 196 in the decoder, head dims 64 and 32), so one (image, head)'s whole K and V (or Q and dO)
// fit in shared memory, and a warp computes 16 rows against them with 16x16x16 wmma products.
// On the H100 (2026-11-26, run 7) this form took 7.5 ms of a step (0.28 ms forward + backward a
// stage-3 block, 1.40 ms a decoder block; the gemm form 0.41 and 1.71), still well above
// cuDNN's 2.2 ms: each score tile goes through shared memory (the elementwise work cannot read a
// wmma accumulator's unspecified layout). mma.sync, whose register layout is documented, keeps
// the scores in registers, as FlashAttention-2 does: the `flash_mma_*` kernels below are the
// three that way (CudaForm::FlashMma; written after run 7, checked by host emulation only so
// far, and tried by CONVMAE_ATTENTION=auto against the others on the GPU).
//
// A block is FLASH_WARPS warps and holds one (image, head)'s "other side" in shared memory:
// K and V for the forward and the dq kernel, Q and dO for the dk/dv kernel. Each warp owns 16
// rows of "its side" (queries, or keys) and walks the other side 16 rows at a time:
//   forward:  pass 1 finds each query row's log-sum-exp from the scores q k^T * scale (kept for
//             the backward); pass 2 recomputes the scores, p = exp(s - lse) exactly normalized,
//             and accumulates p v.
//             Two passes instead of an online softmax because a wmma accumulator's rows cannot
//             be rescaled (its element-to-row mapping is unspecified): recomputing q k^T on the
//             tensor cores costs less than round-tripping the accumulator through shared memory.
//   dq:       delta = rowsum(dO * O) and the log-sum-exp (the forward's, or found again), left in
//             `stats` for the dk/dv kernel; then dq = scale * sum_j ds_j k_j with
//             ds = p * (dO v^T - delta).
//   dk, dv:   per 16 key rows: dv = sum_i p_i^T dO_i, dk = scale * sum_i ds_i^T q_i, the scores
//             transposed (k q^T) so that the keys are the rows again.
// Every sum is accumulated in f32 fragments; the probabilities and ds are rounded to the
// storage type before their products (as FlashAttention and the gemm form do); statistics are
// f32. Every output element is written by one lane, with no atomics: the same bits every run.
//
// Rows past n are zero in shared memory and masked out of the softmax (keys) or not written
// (queries, keys). Shared memory is dynamic (up to ~60 KB for ConvMAE-B's decoder, past the
// 48 KB default: src/cuda.rs raises the kernel's limit) and laid out by FlashShared, whose
// size src/cuda.rs `flash_shared_bytes` mirrors; a kernel given less than it needs writes NaN
// instead of running past the end, so a mismatch fails the agreement check instead of
// corrupting memory.

#include "common.cuh"

#ifndef CONVMAE_HOST_EMULATION
#include <mma.h>
namespace wmma = nvcuda::wmma;
#define CONVMAE_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#else
#define CONVMAE_DYNAMIC_SHARED(name) unsigned char* name = emulated_dynamic_shared
#endif

namespace convmae {

constexpr int FLASH_WARPS = 4;
constexpr int FLASH_TILE = 16;  // the wmma shape: m = n = k = 16
// Padding (elements) at the end of each 16-bit row in shared memory: with rows of 32 or 64
// elements, the eight 16-byte row segments a tensor-core load reads at once would fall in two
// or four banks' worth of addresses; 8 more elements spread them over all 32 banks.
constexpr int FLASH_PAD = 8;

__device__ __forceinline__ unsigned dynamic_shared_bytes() {
#ifdef CONVMAE_HOST_EMULATION
    return emulated_dynamic_shared_bytes;
#else
    unsigned bytes;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
#endif
}

// The shared-memory layout of all three kernels, from the padded row count `n_pad` (n rounded
// up to 16): the block's two full matrices (n_pad rows each) and two f32 vectors (the dk/dv
// kernel's log-sum-exp and delta), then per warp two 16-row tiles, two f32 16x16 scratch
// tiles and two 16x16 tiles in T. Every piece starts on a 32-byte boundary, as wmma loads and
// stores require. src/cuda.rs flash_shared_bytes computes `bytes` the same way.
template <typename T, int HD>
struct FlashShared {
    static constexpr int LD = HD + FLASH_PAD;          // row pitch of the HD-wide matrices
    static constexpr int LDP = FLASH_TILE + FLASH_PAD;  // of the 16x16 tiles in T
    static constexpr int64_t per_warp = 2 * FLASH_TILE * LD * sizeof(T) + 2 * FLASH_TILE * FLASH_TILE * sizeof(float) +
                                        2 * FLASH_TILE * LDP * sizeof(T);
    __device__ static int64_t bytes(int64_t n_pad) {
        return 2 * n_pad * LD * (int64_t)sizeof(T) + 2 * n_pad * (int64_t)sizeof(float) + FLASH_WARPS * per_warp;
    }

    T *full_a, *full_b;
    float *stat_a, *stat_b;
    T *tile_a, *tile_b;  // this warp's
    float *s, *dp;
    T *pa, *pb;

    __device__ FlashShared(unsigned char* base, int64_t n_pad, int warp) {
        unsigned char* p = base;
        full_a = reinterpret_cast<T*>(p), p += n_pad * LD * sizeof(T);
        full_b = reinterpret_cast<T*>(p), p += n_pad * LD * sizeof(T);
        stat_a = reinterpret_cast<float*>(p), p += n_pad * sizeof(float);
        stat_b = reinterpret_cast<float*>(p), p += n_pad * sizeof(float);
        p += warp * per_warp;
        tile_a = reinterpret_cast<T*>(p), p += FLASH_TILE * LD * sizeof(T);
        tile_b = reinterpret_cast<T*>(p), p += FLASH_TILE * LD * sizeof(T);
        s = reinterpret_cast<float*>(p), p += FLASH_TILE * FLASH_TILE * sizeof(float);
        dp = reinterpret_cast<float*>(p), p += FLASH_TILE * FLASH_TILE * sizeof(float);
        pa = reinterpret_cast<T*>(p), p += FLASH_TILE * LDP * sizeof(T);
        pb = reinterpret_cast<T*>(p);
    }
};

// Where a block and warp work: image b, head h, and the first of the warp's 16 rows.
struct FlashPlace {
    int64_t b, h, row0;
    int warp, lane;
    __device__ FlashPlace(int64_t heads) {
        b = (int64_t)blockIdx.x / heads;
        h = (int64_t)blockIdx.x % heads;
        warp = threadIdx.x / 32;
        lane = threadIdx.x % 32;
        row0 = ((int64_t)blockIdx.y * FLASH_WARPS + warp) * FLASH_TILE;
    }
};

// Copies `rows` rows of HD elements from `src` (row r at src + r * stride) to `dst` (pitch LD),
// rows at or past `valid` as zeros; thread `tid` of `threads` takes every threads-th piece.
// Where `src` and `stride` allow it, in 16-byte pieces, STAGE_BATCH loads in flight per thread
// before their stores: staged one 2-byte element at a time, each thread waited out a global
// load's latency ~100 times per block, which made the first version of these kernels slower
// than the gemm form (the H100's op timings of 2026-11-26, run 4).
constexpr int STAGE_BATCH = 4;
template <typename T, int HD, int LD>
__device__ __forceinline__ void stage_rows(T* dst, const T* src, int64_t stride, int64_t rows, int64_t valid, int tid,
                                           int threads) {
    constexpr int VEC = 16 / sizeof(T);  // elements per 16-byte piece
    static_assert(HD % VEC == 0 && LD % VEC == 0, "rows are whole 16-byte pieces");
    const bool aligned = reinterpret_cast<uintptr_t>(src) % 16 == 0 && stride % VEC == 0;
    if (!aligned) {
        for (int64_t i = tid; i < rows * HD; i += threads) {
            const int64_t r = i / HD, d = i % HD;
            dst[r * LD + d] = r < valid ? src[r * stride + d] : store<T>(0.f);
        }
        return;
    }
    constexpr int PER_ROW = HD / VEC;
    const int64_t pieces = rows * PER_ROW;
    for (int64_t first = tid; first < pieces; first += (int64_t)threads * STAGE_BATCH) {
        uint4 v[STAGE_BATCH];
#pragma unroll
        for (int k = 0; k < STAGE_BATCH; ++k) {
            const int64_t i = first + (int64_t)k * threads, r = i / PER_ROW, c = i % PER_ROW;
            if (i < pieces && r < valid) CONVMAE_EXPECT_ALIGNED(src + r * stride + c * VEC, 16);
            v[k] = i < pieces && r < valid ? *reinterpret_cast<const uint4*>(src + r * stride + c * VEC) : uint4{0, 0, 0, 0};
        }
#pragma unroll
        for (int k = 0; k < STAGE_BATCH; ++k) {
            const int64_t i = first + (int64_t)k * threads, r = i / PER_ROW, c = i % PER_ROW;
            if (i < pieces) {
                CONVMAE_EXPECT_ALIGNED(dst + r * LD + c * VEC, 16);
                *reinterpret_cast<uint4*>(dst + r * LD + c * VEC) = v[k];
            }
        }
    }
}

// The lane's share of a 16x16 tile: column lane % 16 of the eight rows 2i + lane / 16,
// i = 0 ... 7 (TILE_ROWS_PER_LANE). At each i the warp reads two whole rows, lanes 0-15 one
// and 16-31 the next: with the f32 tile's 64-byte rows those fall in all 32 banks, and in the
// 16-bit tiles (48-byte rows) in disjoint ones. (Eight consecutive columns of one row per lane,
// the first version's share, made each of those reads an 8-way bank conflict.) A row's
// statistics are then reduced over the 16 lanes of its half-warp (`half_warp_*`).
constexpr int TILE_ROWS_PER_LANE = FLASH_TILE / 2;
__device__ __forceinline__ int tile_col(int lane) { return lane % FLASH_TILE; }
__device__ __forceinline__ int tile_row(int lane, int i) { return 2 * i + lane / FLASH_TILE; }

// Sum and max over the 16 lanes of a half-warp (xor offsets below 16 stay within it).
__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
    for (int offset = FLASH_TILE / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, FLASH_TILE, FLASH_TILE, FLASH_TILE, T, wmma::row_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, FLASH_TILE, FLASH_TILE, FLASH_TILE, T, wmma::row_major>;
template <typename T>
using FragBCol = wmma::fragment<wmma::matrix_b, FLASH_TILE, FLASH_TILE, FLASH_TILE, T, wmma::col_major>;
using FragAcc = wmma::fragment<wmma::accumulator, FLASH_TILE, FLASH_TILE, FLASH_TILE, float>;

// out (16x16, f32, in shared memory) = rows · other_j^T, `rows` as HD / 16 A fragments, other_j
// the 16 rows of a full matrix starting at `other` (pitch LD). Ends with the warp synced.
template <typename T, int HD, int LD>
__device__ __forceinline__ void tile_scores(float* out, const FragA<T>* rows, const T* other) {
    FragAcc acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int k = 0; k < HD / FLASH_TILE; ++k) {
        FragBCol<T> bt;  // other^T: element (d, j) at other[j * LD + d]
        wmma::load_matrix_sync(bt, other + k * FLASH_TILE, LD);
        wmma::mma_sync(acc, rows[k], bt, acc);
    }
    wmma::store_matrix_sync(out, acc, FLASH_TILE, wmma::mem_row_major);
    __syncwarp();
}

// acc[t] += p · other_j[:, 16t ... 16t + 16] for t < HD / 16, p a 16x16 tile in T (pitch LDP).
template <typename T, int HD, int LD, int LDP>
__device__ __forceinline__ void accumulate_product(FragAcc* acc, const T* p, const T* other) {
    FragA<T> pf;
    wmma::load_matrix_sync(pf, p, LDP);
#pragma unroll
    for (int t = 0; t < HD / FLASH_TILE; ++t) {
        FragBRow<T> vf;
        wmma::load_matrix_sync(vf, other + t * FLASH_TILE, LD);
        wmma::mma_sync(acc[t], pf, vf, acc[t]);
    }
}

// The log-sum-exp of each of the warp's 16 rows' scaled scores against the n keys of `keys`
// (a full matrix): lse[i] for the lane's rows tile_row(lane, i). An online softmax per lane
// over its column of each tile, then the 16 lanes of each row combined.
template <typename T, int HD, int LD>
__device__ void rows_lse(const FragA<T>* rows, const T* keys, float* s, int64_t n, int64_t n_pad, float scale, int lane,
                         float* lse) {
    const int col = tile_col(lane);
    float m[TILE_ROWS_PER_LANE], l[TILE_ROWS_PER_LANE];
#pragma unroll
    for (int i = 0; i < TILE_ROWS_PER_LANE; ++i) m[i] = -INFINITY, l[i] = 0.f;
    for (int64_t j = 0; j < n_pad; j += FLASH_TILE) {
        tile_scores<T, HD, LD>(s, rows, keys + j * LD);
        if (j + col < n) {
#pragma unroll
            for (int i = 0; i < TILE_ROWS_PER_LANE; ++i) {
                const float v = s[tile_row(lane, i) * FLASH_TILE + col] * scale;
                if (v > m[i]) {
                    l[i] = l[i] * expf(m[i] - v) + 1.f;  // expf(-inf) = 0 on the first key
                    m[i] = v;
                } else {
                    l[i] += expf(v - m[i]);
                }
            }
        }
        __syncwarp();  // s is rewritten by the next tile
    }
    // Combine the 16 lanes of each row. n >= 1, so one of them saw a key and m is finite.
#pragma unroll
    for (int i = 0; i < TILE_ROWS_PER_LANE; ++i) {
#pragma unroll
        for (int offset = FLASH_TILE / 2; offset > 0; offset >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m[i], offset), l2 = __shfl_xor_sync(0xffffffffu, l[i], offset);
            const float M = fmaxf(m[i], m2);
            l[i] = (m[i] == -INFINITY ? 0.f : l[i] * expf(m[i] - M)) + (m2 == -INFINITY ? 0.f : l2 * expf(m2 - M));
            m[i] = M;
        }
        lse[i] = m[i] + logf(l[i]);
    }
}

// Writes accumulators acc[t] (scaled by `scale`) as the warp's rows row0 ... row0 + 16 (those
// below n) of a packed matrix: row i at dst + i * stride. Goes through the f32 scratch `s`.
template <typename T, int HD>
__device__ void store_rows(FragAcc* acc, float scale, float* s, T* dst, int64_t stride, int64_t row0, int64_t n, int lane) {
    const int col = tile_col(lane);
#pragma unroll
    for (int t = 0; t < HD / FLASH_TILE; ++t) {
        wmma::store_matrix_sync(s, acc[t], FLASH_TILE, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int i = 0; i < TILE_ROWS_PER_LANE; ++i) {
            const int r = tile_row(lane, i);
            if (row0 + r < n) dst[(row0 + r) * stride + t * FLASH_TILE + col] = store<T>(s[r * FLASH_TILE + col] * scale);
        }
        __syncwarp();
    }
}

// NaN in the warp's rows of a packed matrix: what a kernel launched with too little shared
// memory writes instead of its result.
template <typename T, int HD>
__device__ void poison_rows(T* dst, int64_t stride, int64_t row0, int64_t n, int lane) {
    for (int i = lane; i < FLASH_TILE * HD; i += 32) {
        const int64_t row = row0 + i / HD;
        if (row < n) dst[row * stride + i % HD] = store<T>(NAN);
    }
}

// The forward's and the dq kernel's common staging: one (image, head)'s k and v rows whole, for
// the block (q points at the head's q in token 0 of the image; k and v follow at `width`), and
// the warp's 16 query rows.
template <typename T, int HD, int LD>
__device__ __forceinline__ void stage_keys_values_queries(FlashShared<T, HD>& sh, const T* q, int64_t stride, int64_t width,
                                                          int64_t n_pad, int64_t n, const FlashPlace& at) {
    stage_rows<T, HD, LD>(sh.full_a, q + width, stride, n_pad, n, threadIdx.x, blockDim.x);      // k
    stage_rows<T, HD, LD>(sh.full_b, q + 2 * width, stride, n_pad, n, threadIdx.x, blockDim.x);  // v
    stage_rows<T, HD, LD>(sh.tile_a, q + at.row0 * stride, stride, FLASH_TILE, n - at.row0, at.lane, 32);
}

// Launch (all three): grid (B * H, ceil(ceil(n / 16) / FLASH_WARPS)), block 32 * FLASH_WARPS,
// FlashShared<T, HD>::bytes(n_pad) of dynamic shared memory.
template <typename T, int HD>
__device__ void flash_fwd(const T* __restrict__ qkv, T* __restrict__ out, float* __restrict__ lse_out, int64_t n, int64_t heads,
                          float scale) {
    using Sh = FlashShared<T, HD>;
    constexpr int LD = Sh::LD;
    const FlashPlace at(heads);
    const int64_t n_pad = (n + FLASH_TILE - 1) / FLASH_TILE * FLASH_TILE, width = heads * HD;
    const int64_t stride = 3 * width;  // between tokens in qkv
    const T* q = qkv + at.b * n * stride + at.h * HD;
    T* o = out + at.b * n * width + at.h * HD;
    if (dynamic_shared_bytes() < Sh::bytes(n_pad)) {
        poison_rows<T, HD>(o, width, at.row0, n, at.lane);
        return;
    }
    CONVMAE_DYNAMIC_SHARED(base);
    Sh sh(base, n_pad, at.warp);
    stage_keys_values_queries<T, HD, LD>(sh, q, stride, width, n_pad, n, at);
    __syncthreads();
    if (at.row0 >= n) return;  // a warp past the last row (no __syncthreads follows)
    FragA<T> qf[HD / FLASH_TILE];
#pragma unroll
    for (int k = 0; k < HD / FLASH_TILE; ++k) wmma::load_matrix_sync(qf[k], sh.tile_a + k * FLASH_TILE, LD);

    float lse[TILE_ROWS_PER_LANE];
    rows_lse<T, HD, LD>(qf, sh.full_a, sh.s, n, n_pad, scale, at.lane, lse);
    const int col = tile_col(at.lane);
    // Kept for the backward's dq kernel, which then need not find it again.
    if (col == 0) {
#pragma unroll
        for (int i = 0; i < TILE_ROWS_PER_LANE; ++i) {
            const int64_t row = at.row0 + tile_row(at.lane, i);
            if (row < n) lse_out[(int64_t)blockIdx.x * n + row] = lse[i];
        }
    }
    FragAcc acc[HD / FLASH_TILE];
#pragma unroll
    for (int t = 0; t < HD / FLASH_TILE; ++t) wmma::fill_fragment(acc[t], 0.f);
    for (int64_t j = 0; j < n_pad; j += FLASH_TILE) {
        tile_scores<T, HD, LD>(sh.s, qf, sh.full_a + j * LD);
        const bool key = j + col < n;
#pragma unroll
        for (int i = 0; i < TILE_ROWS_PER_LANE; ++i) {
            const int r = tile_row(at.lane, i);
            sh.pa[r * Sh::LDP + col] = store<T>(key ? expf(sh.s[r * FLASH_TILE + col] * scale - lse[i]) : 0.f);
        }
        __syncwarp();
        accumulate_product<T, HD, LD, Sh::LDP>(acc, sh.pa, sh.full_b + j * LD);
        __syncwarp();  // pa and s are rewritten by the next tile
    }
    store_rows<T, HD>(acc, 1.f, sh.s, o, width, at.row0, n, at.lane);
}

// dq, and the statistics the dk/dv kernel reads: stats [2, B * H, n] f32, the log-sum-exp of
// each query row's scaled scores, then delta = rowsum(dO * O).
template <typename T, int HD>
__device__ void flash_bwd_q(const T* __restrict__ qkv, const T* __restrict__ out, const T* __restrict__ gout,
                            const float* __restrict__ lse_in, int have_lse, T* __restrict__ gqkv, float* __restrict__ stats,
                            int64_t n, int64_t heads, float scale) {
    using Sh = FlashShared<T, HD>;
    constexpr int LD = Sh::LD;
    const FlashPlace at(heads);
    const int64_t n_pad = (n + FLASH_TILE - 1) / FLASH_TILE * FLASH_TILE, width = heads * HD;
    const int64_t stride = 3 * width;
    const T* q = qkv + at.b * n * stride + at.h * HD;
    const T* o = out + at.b * n * width + at.h * HD;
    const T* go = gout + at.b * n * width + at.h * HD;
    T* gq = gqkv + at.b * n * stride + at.h * HD;
    if (dynamic_shared_bytes() < Sh::bytes(n_pad)) {
        poison_rows<T, HD>(gq, stride, at.row0, n, at.lane);
        return;
    }
    CONVMAE_DYNAMIC_SHARED(base);
    Sh sh(base, n_pad, at.warp);
    stage_keys_values_queries<T, HD, LD>(sh, q, stride, width, n_pad, n, at);
    stage_rows<T, HD, LD>(sh.tile_b, go + at.row0 * width, width, FLASH_TILE, n - at.row0, at.lane, 32);
    __syncthreads();
    if (at.row0 >= n) return;  // a warp past the last row (no __syncthreads follows)

    const int col = tile_col(at.lane);
    // delta = rowsum(dO * O) in f32: each of a row's 16 lanes takes every 16th element.
    float delta[TILE_ROWS_PER_LANE];
#pragma unroll
    for (int i = 0; i < TILE_ROWS_PER_LANE; ++i) {
        const int r = tile_row(at.lane, i);
        const int64_t row = at.row0 + r;
        float partial = 0.f;
        if (row < n) {
#pragma unroll
            for (int d = col; d < HD; d += FLASH_TILE) partial += load(sh.tile_b[r * LD + d]) * load(o[row * width + d]);
        }
        delta[i] = half_warp_sum(partial);
    }

    FragA<T> qf[HD / FLASH_TILE], gf[HD / FLASH_TILE];
#pragma unroll
    for (int k = 0; k < HD / FLASH_TILE; ++k) {
        wmma::load_matrix_sync(qf[k], sh.tile_a + k * FLASH_TILE, LD);
        wmma::load_matrix_sync(gf[k], sh.tile_b + k * FLASH_TILE, LD);
    }
    // The forward's log-sum-exp when it was kept (`have_lse`, the same for the whole launch),
    // else found again as the forward does.
    float lse[TILE_ROWS_PER_LANE];
    if (have_lse) {
#pragma unroll
        for (int i = 0; i < TILE_ROWS_PER_LANE; ++i) {
            const int64_t row = at.row0 + tile_row(at.lane, i);
            lse[i] = row < n ? lse_in[(int64_t)blockIdx.x * n + row] : 0.f;
        }
    } else {
        rows_lse<T, HD, LD>(qf, sh.full_a, sh.s, n, n_pad, scale, at.lane, lse);
    }
    if (col == 0) {
#pragma unroll
        for (int i = 0; i < TILE_ROWS_PER_LANE; ++i) {
            const int64_t row = at.row0 + tile_row(at.lane, i);
            if (row >= n) continue;
            const int64_t bh_row = (int64_t)blockIdx.x * n + row;
            stats[bh_row] = lse[i];
            stats[(int64_t)gridDim.x * n + bh_row] = delta[i];
        }
    }

    FragAcc acc[HD / FLASH_TILE];
#pragma unroll
    for (int t = 0; t < HD / FLASH_TILE; ++t) wmma::fill_fragment(acc[t], 0.f);
    for (int64_t j = 0; j < n_pad; j += FLASH_TILE) {
        tile_scores<T, HD, LD>(sh.s, qf, sh.full_a + j * LD);   // q k_j^T
        tile_scores<T, HD, LD>(sh.dp, gf, sh.full_b + j * LD);  // dO v_j^T
        const bool key = j + col < n;
#pragma unroll
        for (int i = 0; i < TILE_ROWS_PER_LANE; ++i) {
            const int r = tile_row(at.lane, i), e = r * FLASH_TILE + col;
            const float p = key ? expf(sh.s[e] * scale - lse[i]) : 0.f;
            sh.pa[r * Sh::LDP + col] = store<T>(p * (sh.dp[e] - delta[i]));
        }
        __syncwarp();
        accumulate_product<T, HD, LD, Sh::LDP>(acc, sh.pa, sh.full_a + j * LD);  // ds k_j
        __syncwarp();
    }
    store_rows<T, HD>(acc, scale, sh.s, gq, stride, at.row0, n, at.lane);
}

// dk and dv, the warp's rows being keys; reads flash_bwd_q's stats.
template <typename T, int HD>
__device__ void flash_bwd_kv(const T* __restrict__ qkv, const T* __restrict__ gout, const float* __restrict__ stats,
                             T* __restrict__ gqkv, int64_t n, int64_t heads, float scale) {
    using Sh = FlashShared<T, HD>;
    constexpr int LD = Sh::LD;
    const FlashPlace at(heads);
    const int64_t n_pad = (n + FLASH_TILE - 1) / FLASH_TILE * FLASH_TILE, width = heads * HD;
    const int64_t stride = 3 * width;
    const T* q = qkv + at.b * n * stride + at.h * HD;
    const T* go = gout + at.b * n * width + at.h * HD;
    T* gk = gqkv + at.b * n * stride + width + at.h * HD;
    if (dynamic_shared_bytes() < Sh::bytes(n_pad)) {
        poison_rows<T, HD>(gk, stride, at.row0, n, at.lane);
        poison_rows<T, HD>(gk + width, stride, at.row0, n, at.lane);
        return;
    }
    CONVMAE_DYNAMIC_SHARED(base);
    Sh sh(base, n_pad, at.warp);
    stage_rows<T, HD, LD>(sh.full_a, q, stride, n_pad, n, threadIdx.x, blockDim.x);   // q
    stage_rows<T, HD, LD>(sh.full_b, go, width, n_pad, n, threadIdx.x, blockDim.x);  // dO
    for (int64_t i = threadIdx.x; i < n_pad; i += blockDim.x) {
        const int64_t bh_row = (int64_t)blockIdx.x * n + i;
        sh.stat_a[i] = i < n ? stats[bh_row] : 0.f;
        sh.stat_b[i] = i < n ? stats[(int64_t)gridDim.x * n + bh_row] : 0.f;
    }
    stage_rows<T, HD, LD>(sh.tile_a, q + width + at.row0 * stride, stride, FLASH_TILE, n - at.row0, at.lane, 32);      // k
    stage_rows<T, HD, LD>(sh.tile_b, q + 2 * width + at.row0 * stride, stride, FLASH_TILE, n - at.row0, at.lane, 32);  // v
    __syncthreads();
    if (at.row0 >= n) return;  // a warp past the last row (no __syncthreads follows)

    FragA<T> kf[HD / FLASH_TILE], vf[HD / FLASH_TILE];
#pragma unroll
    for (int k = 0; k < HD / FLASH_TILE; ++k) {
        wmma::load_matrix_sync(kf[k], sh.tile_a + k * FLASH_TILE, LD);
        wmma::load_matrix_sync(vf[k], sh.tile_b + k * FLASH_TILE, LD);
    }
    const int col = tile_col(at.lane);
    FragAcc dk[HD / FLASH_TILE], dv[HD / FLASH_TILE];
#pragma unroll
    for (int t = 0; t < HD / FLASH_TILE; ++t) {
        wmma::fill_fragment(dk[t], 0.f);
        wmma::fill_fragment(dv[t], 0.f);
    }
    for (int64_t i0 = 0; i0 < n_pad; i0 += FLASH_TILE) {
        tile_scores<T, HD, LD>(sh.s, kf, sh.full_a + i0 * LD);   // (q_i k^T)^T
        tile_scores<T, HD, LD>(sh.dp, vf, sh.full_b + i0 * LD);  // (dO_i v^T)^T
        // The lane's column is one query: its statistics once per tile.
        const int64_t query = i0 + col;
        const bool valid = query < n;
        const float lse = valid ? sh.stat_a[query] : 0.f, delta = valid ? sh.stat_b[query] : 0.f;
#pragma unroll
        for (int i = 0; i < TILE_ROWS_PER_LANE; ++i) {
            const int r = tile_row(at.lane, i), e = r * FLASH_TILE + col;
            const float p = valid ? expf(sh.s[e] * scale - lse) : 0.f;
            sh.pa[r * Sh::LDP + col] = store<T>(p);
            sh.pb[r * Sh::LDP + col] = store<T>(p * (sh.dp[e] - delta));
        }
        __syncwarp();
        accumulate_product<T, HD, LD, Sh::LDP>(dv, sh.pa, sh.full_b + i0 * LD);  // p^T dO_i
        accumulate_product<T, HD, LD, Sh::LDP>(dk, sh.pb, sh.full_a + i0 * LD);  // ds^T q_i
        __syncwarp();
    }
    store_rows<T, HD>(dk, scale, sh.s, gk, stride, at.row0, n, at.lane);
    store_rows<T, HD>(dv, 1.f, sh.s, gk + width, stride, at.row0, n, at.lane);
}

// ---- the kernels on mma.sync: scores in registers --------------------------------------------
//
// src/attention.rs `CudaForm::FlashMma`: the kernels above with each warp's scores kept in
// registers, which mma.sync (unlike wmma) allows: its fragments' layout is documented (PTX ISA,
// "Matrix Fragments for mma.m16n8k16"; g = lane / 4, t = lane % 4):
//   A, 16x16 row-major, x[0..7]: (g, 2t) (g, 2t+1) (g+8, 2t) (g+8, 2t+1) (g, 2t+8) (g, 2t+9)
//                                (g+8, 2t+8) (g+8, 2t+9), two to a 32-bit register, in order
//   B, 16x8 (k x n),    x[0..3]: (2t, g) (2t+1, g) (2t+8, g) (2t+9, g)
//   C and D, 16x8 f32,  x[0..3]: (g, 2t) (g, 2t+1) (g+8, 2t) (g+8, 2t+1)
// So a lane holds two rows' (g and g + 8) scores, a row is spread over the 4 lanes of a group
// (max and sum by two shuffles), and the scores of 16 keys (two 16x8 C tiles) are, rounded,
// exactly the A fragment of p for p · v: FlashAttention-2's online softmax, in one pass over
// the keys (each block of 16 rescales the running output by exp(m_old - m_new)), where the wmma
// forward makes two passes and stages every score tile through shared memory. The output is
// the sum of p · v with p = exp(s - m) rounded to T, divided at the end by the f32 sum of the
// unrounded p; the log-sum-exp m + log(l) is kept for the backward. The two backward kernels
// are the wmma ones' arithmetic with the same fragments (the dk/dv kernel's scores transposed,
// keys as the rows).
template <typename T>
struct MmaA {
    T x[8];
};
template <typename T>
struct MmaB {
    T x[4];
};
struct MmaC {
    float x[4];
};

#ifndef CONVMAE_HOST_EMULATION
template <typename T>
__device__ __forceinline__ uint32_t mma_pair(const T* p) {
    return *reinterpret_cast<const uint32_t*>(p);  // p[0] in the low half, as mma.sync reads it
}
// d += a b, f32 accumulation.
__device__ __forceinline__ void mma_16816(MmaC& d, const MmaA<__nv_bfloat16>& a, const MmaB<__nv_bfloat16>& b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3])
                 : "r"(mma_pair(&a.x[0])), "r"(mma_pair(&a.x[2])), "r"(mma_pair(&a.x[4])), "r"(mma_pair(&a.x[6])),
                   "r"(mma_pair(&b.x[0])), "r"(mma_pair(&b.x[2])));
}
__device__ __forceinline__ void mma_16816(MmaC& d, const MmaA<__half>& a, const MmaB<__half>& b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3])
                 : "r"(mma_pair(&a.x[0])), "r"(mma_pair(&a.x[2])), "r"(mma_pair(&a.x[4])), "r"(mma_pair(&a.x[6])),
                   "r"(mma_pair(&b.x[0])), "r"(mma_pair(&b.x[2])));
}
#else
// host_check.cpp's warp-wide emulation of the same fragments (f32, and bf16 widened exactly).
template <typename T>
__device__ __forceinline__ void mma_16816(MmaC& d, const MmaA<T>& a, const MmaB<T>& b) {
    float af[8], bf[4];
    for (int i = 0; i < 8; ++i) af[i] = load(a.x[i]);
    for (int i = 0; i < 4; ++i) bf[i] = load(b.x[i]);
    mma_m16n8k16_emulated(d.x, af, bf);
}
#endif

// The warp's 16 rows of a packed matrix as A fragments, straight from memory: rows[0] and
// rows[1] are the lane's rows g and g + 8 (src + row * stride), rows at or past n as zeros.
template <typename T, int HD>
__device__ __forceinline__ void load_a_rows(MmaA<T>* a, const T* src, int64_t stride, const int64_t rows[2], int64_t n, int t) {
#pragma unroll
    for (int kd = 0; kd < HD / FLASH_TILE; ++kd)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int64_t row = rows[(e / 2) % 2];
            a[kd].x[e] = row < n ? src[row * stride + kd * FLASH_TILE + 2 * t + e % 2 + (e / 4) * 8] : store<T>(0.f);
        }
}

// s[j] = a · X[8j ... 8j + 7]^T for the 16 rows of X at `x` (shared memory, pitch LD): the
// products against 16 rows of the other side, as two 16x8 C tiles. B = X^T, (k = dim, n = row):
// the lane's elements are row 8j + g, dims 2t, 2t + 1, 2t + 8, 2t + 9 of each 16 dims.
template <typename T, int HD, int LD>
__device__ __forceinline__ void products_with_rows(MmaC s[2], const MmaA<T>* a, const T* x, int g, int t) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j].x[e] = 0.f;
#pragma unroll
        for (int kd = 0; kd < HD / FLASH_TILE; ++kd) {
            const T* r = x + (8 * j + g) * LD + kd * FLASH_TILE + 2 * t;
            const MmaB<T> b{{r[0], r[1], r[8], r[9]}};
            mma_16816(s[j], a[kd], b);
        }
    }
}

// acc[dn] += p · X[:, 8dn ... 8dn + 7] for the 16 rows of X at `x` (shared memory, pitch LD), p
// a 16x16 A fragment over those rows. B = X, (k = row, n = dim): rows 2t, 2t + 1, 2t + 8,
// 2t + 9, dim 8dn + g.
template <typename T, int HD, int LD>
__device__ __forceinline__ void accumulate_rows(MmaC* acc, const MmaA<T>& p, const T* x, int g, int t) {
#pragma unroll
    for (int dn = 0; dn < HD / 8; ++dn) {
        const T* c = x + 2 * t * LD + dn * 8 + g;
        const MmaB<T> b{{c[0], c[LD], c[8 * LD], c[9 * LD]}};
        mma_16816(acc[dn], p, b);
    }
}

// Writes acc (scaled) as the warp's rows: rows[r] at dst + row * stride, those below n.
template <typename T, int HD>
__device__ __forceinline__ void store_acc_rows(const MmaC* acc, float scale, T* dst, int64_t stride, const int64_t rows[2], int64_t n,
                                               int t) {
#pragma unroll
    for (int dn = 0; dn < HD / 8; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int64_t row = rows[e / 2];
            if (row < n) dst[row * stride + dn * 8 + 2 * t + e % 2] = store<T>(acc[dn].x[e] * scale);
        }
}

template <typename T, int HD>
__device__ __forceinline__ void zero(MmaC* acc) {
#pragma unroll
    for (int dn = 0; dn < HD / 8; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[dn].x[e] = 0.f;
}

// The shared memory of the mma kernels: the (image, head)'s two "other side" matrices, n_pad
// rows each, pitch HD + FLASH_PAD (with which the lanes' B-fragment reads fall in distinct
// banks), then two f32 vectors of n_pad (the dk/dv kernel's log-sum-exp and delta; the others
// leave them unused). src/cuda.rs flash_mma_shared_bytes mirrors it.
template <typename T, int HD>
__device__ __forceinline__ int64_t flash_mma_shared_bytes(int64_t n_pad) {
    return 2 * n_pad * (HD + FLASH_PAD) * (int64_t)sizeof(T) + 2 * n_pad * (int64_t)sizeof(float);
}

// The block's staging in the mma forward and dq kernels: one (image, head)'s k and v rows
// whole (q points at the head's q in token 0 of the image; k and v follow at `width`).
template <typename T, int HD, int LD>
__device__ __forceinline__ void stage_keys_values(T* keys, T* values, const T* q, int64_t stride, int64_t width, int64_t n_pad,
                                                  int64_t n) {
    stage_rows<T, HD, LD>(keys, q + width, stride, n_pad, n, threadIdx.x, blockDim.x);
    stage_rows<T, HD, LD>(values, q + 2 * width, stride, n_pad, n, threadIdx.x, blockDim.x);
}

// A lane's place in the mma fragments: group g, thread t in it, and its two rows of the warp's
// 16, g and g + 8.
struct MmaLane {
    int g, t;
    int64_t rows[2];
    __device__ explicit MmaLane(const FlashPlace& at) : g(at.lane / 4), t(at.lane % 4), rows{at.row0 + at.lane / 4, at.row0 + at.lane / 4 + 8} {}
};

template <typename T, int HD>
__device__ void flash_mma_fwd(const T* __restrict__ qkv, T* __restrict__ out, float* __restrict__ lse_out, int64_t n,
                              int64_t heads, float scale) {
    constexpr int LD = HD + FLASH_PAD;
    const FlashPlace at(heads);
    const int64_t n_pad = (n + FLASH_TILE - 1) / FLASH_TILE * FLASH_TILE, width = heads * HD;
    const int64_t stride = 3 * width;  // between tokens in qkv
    const T* q = qkv + at.b * n * stride + at.h * HD;
    T* o = out + at.b * n * width + at.h * HD;
    if (dynamic_shared_bytes() < flash_mma_shared_bytes<T, HD>(n_pad)) {
        poison_rows<T, HD>(o, width, at.row0, n, at.lane);
        return;
    }
    CONVMAE_DYNAMIC_SHARED(base);
    T* keys = reinterpret_cast<T*>(base);
    T* values = keys + n_pad * LD;
    stage_keys_values<T, HD, LD>(keys, values, q, stride, width, n_pad, n);
    __syncthreads();
    if (at.row0 >= n) return;  // a warp past the last row (no __syncthreads follows)

    const MmaLane lane(at);
    const int g = lane.g, t = lane.t;
    const int64_t* rows = lane.rows;
    MmaA<T> qa[HD / FLASH_TILE];
    load_a_rows<T, HD>(qa, q, stride, rows, n, t);
    MmaC acc[HD / 8];
    zero<T, HD>(acc);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8: running max, sum
    for (int64_t kb = 0; kb < n_pad; kb += FLASH_TILE) {
        MmaC s[2];  // s[j]: the scores against keys kb + 8j ... kb + 8j + 7
        products_with_rows<T, HD, LD>(s, qa, keys + kb * LD, g, t);
        // Scaled, keys past n out; each row's max over these 16 keys (the 4 lanes of its group).
        float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool key = kb + 8 * j + 2 * t + e % 2 < n;
                s[j].x[e] = key ? s[j].x[e] * scale : -INFINITY;
                block_max[e / 2] = fmaxf(block_max[e / 2], s[j].x[e]);
            }
        float rescale[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 1));
            block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 2));
            // Every block holds a key below n (n_pad - 16 < n), so the new max is finite.
            const float m_new = fmaxf(m[r], block_max[r]);
            rescale[r] = expf(m[r] - m_new);  // 0 on the first block (m = -inf)
            m[r] = m_new;
            l[r] *= rescale[r];
        }
#pragma unroll
        for (int dn = 0; dn < HD / 8; ++dn)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[dn].x[e] *= rescale[e / 2];
        // p = exp(s - m): summed in f32, and rounded, the A fragment of p · v (C tile j is
        // columns 8j ... 8j + 7 of A: its x[0..3] are A's x[4j ... 4j + 3]).
        MmaA<T> pa;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = expf(s[j].x[e] - m[e / 2]);
                l[e / 2] += p;
                pa.x[4 * j + e] = store<T>(p);
            }
        accumulate_rows<T, HD, LD>(acc, pa, values + kb * LD, g, t);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int dn = 0; dn < HD / 8; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[dn].x[e] /= l[e / 2];
    store_acc_rows<T, HD>(acc, 1.f, o, width, rows, n, t);
    // Kept for the backward's dq kernel.
    if (t == 0)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (rows[r] < n) lse_out[(int64_t)blockIdx.x * n + rows[r]] = m[r] + logf(l[r]);
}

// The dq kernel on mma.sync: flash_bwd_q's arithmetic (delta = rowsum(dO * O) and the
// forward's log-sum-exp left in `stats` for the dk/dv kernel; dq = scale * sum_j ds_j k_j with
// ds = p * (dO v^T - delta), rounded to T before its product), the scores and ds in registers.
// Needs the forward's log-sum-exp (`have_lse`; src/cuda.rs takes the wmma dq kernel without).
template <typename T, int HD>
__device__ void flash_mma_bwd_q(const T* __restrict__ qkv, const T* __restrict__ out, const T* __restrict__ gout,
                                const float* __restrict__ lse_in, int have_lse, T* __restrict__ gqkv, float* __restrict__ stats,
                                int64_t n, int64_t heads, float scale) {
    constexpr int LD = HD + FLASH_PAD;
    const FlashPlace at(heads);
    const int64_t n_pad = (n + FLASH_TILE - 1) / FLASH_TILE * FLASH_TILE, width = heads * HD;
    const int64_t stride = 3 * width;
    const T* q = qkv + at.b * n * stride + at.h * HD;
    const T* o = out + at.b * n * width + at.h * HD;
    const T* go = gout + at.b * n * width + at.h * HD;
    T* gq = gqkv + at.b * n * stride + at.h * HD;
    if (!have_lse || dynamic_shared_bytes() < flash_mma_shared_bytes<T, HD>(n_pad)) {
        poison_rows<T, HD>(gq, stride, at.row0, n, at.lane);
        return;
    }
    CONVMAE_DYNAMIC_SHARED(base);
    T* keys = reinterpret_cast<T*>(base);
    T* values = keys + n_pad * LD;
    stage_keys_values<T, HD, LD>(keys, values, q, stride, width, n_pad, n);
    __syncthreads();
    if (at.row0 >= n) return;

    const MmaLane lane(at);
    const int g = lane.g, t = lane.t;
    const int64_t* rows = lane.rows;
    MmaA<T> qa[HD / FLASH_TILE], ga[HD / FLASH_TILE], oa[HD / FLASH_TILE];
    load_a_rows<T, HD>(qa, q, stride, rows, n, t);
    load_a_rows<T, HD>(ga, go, width, rows, n, t);
    load_a_rows<T, HD>(oa, o, width, rows, n, t);
    // delta = rowsum(dO * O) in f32: the lane's elements of its two rows, then its group's.
    float delta[2] = {0.f, 0.f}, lse[2];
#pragma unroll
    for (int kd = 0; kd < HD / FLASH_TILE; ++kd)
#pragma unroll
        for (int e = 0; e < 8; ++e) delta[(e / 2) % 2] += load(ga[kd].x[e]) * load(oa[kd].x[e]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        delta[r] += __shfl_xor_sync(0xffffffffu, delta[r], 1);
        delta[r] += __shfl_xor_sync(0xffffffffu, delta[r], 2);
        lse[r] = rows[r] < n ? lse_in[(int64_t)blockIdx.x * n + rows[r]] : 0.f;
        if (t == 0 && rows[r] < n) {
            const int64_t bh_row = (int64_t)blockIdx.x * n + rows[r];
            stats[bh_row] = lse[r];
            stats[(int64_t)gridDim.x * n + bh_row] = delta[r];
        }
    }
    MmaC acc[HD / 8];
    zero<T, HD>(acc);
    for (int64_t kb = 0; kb < n_pad; kb += FLASH_TILE) {
        MmaC s[2], dp[2];
        products_with_rows<T, HD, LD>(s, qa, keys + kb * LD, g, t);     // q k^T
        products_with_rows<T, HD, LD>(dp, ga, values + kb * LD, g, t);  // dO v^T
        MmaA<T> ds;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool key = kb + 8 * j + 2 * t + e % 2 < n;
                const float p = key ? expf(s[j].x[e] * scale - lse[e / 2]) : 0.f;
                ds.x[4 * j + e] = store<T>(p * (dp[j].x[e] - delta[e / 2]));
            }
        accumulate_rows<T, HD, LD>(acc, ds, keys + kb * LD, g, t);  // ds k
    }
    store_acc_rows<T, HD>(acc, scale, gq, stride, rows, n, t);
}

// The dk/dv kernel on mma.sync: flash_bwd_kv's arithmetic, per 16 key rows, the scores
// transposed (k q^T, so that keys are the rows): dv = sum_i p_i^T dO_i (p rounded),
// dk = scale * sum_i ds_i^T q_i (ds = p * (dO v^T - delta), rounded), with the log-sum-exp and
// delta of each query (a column now) from `stats`, staged in shared memory.
template <typename T, int HD>
__device__ void flash_mma_bwd_kv(const T* __restrict__ qkv, const T* __restrict__ gout, const float* __restrict__ stats,
                                 T* __restrict__ gqkv, int64_t n, int64_t heads, float scale) {
    constexpr int LD = HD + FLASH_PAD;
    const FlashPlace at(heads);
    const int64_t n_pad = (n + FLASH_TILE - 1) / FLASH_TILE * FLASH_TILE, width = heads * HD;
    const int64_t stride = 3 * width;
    const T* q = qkv + at.b * n * stride + at.h * HD;
    const T* go = gout + at.b * n * width + at.h * HD;
    T* gk = gqkv + at.b * n * stride + width + at.h * HD;
    if (dynamic_shared_bytes() < flash_mma_shared_bytes<T, HD>(n_pad)) {
        poison_rows<T, HD>(gk, stride, at.row0, n, at.lane);
        poison_rows<T, HD>(gk + width, stride, at.row0, n, at.lane);
        return;
    }
    CONVMAE_DYNAMIC_SHARED(base);
    T* queries = reinterpret_cast<T*>(base);
    T* grads = queries + n_pad * LD;
    float* lse = reinterpret_cast<float*>(grads + n_pad * LD);
    float* delta = lse + n_pad;
    stage_rows<T, HD, LD>(queries, q, stride, n_pad, n, threadIdx.x, blockDim.x);
    stage_rows<T, HD, LD>(grads, go, width, n_pad, n, threadIdx.x, blockDim.x);
    for (int64_t i = threadIdx.x; i < n_pad; i += blockDim.x) {
        const int64_t bh_row = (int64_t)blockIdx.x * n + i;
        lse[i] = i < n ? stats[bh_row] : 0.f;
        delta[i] = i < n ? stats[(int64_t)gridDim.x * n + bh_row] : 0.f;
    }
    __syncthreads();
    if (at.row0 >= n) return;

    const MmaLane lane(at);  // its rows are keys here
    const int g = lane.g, t = lane.t;
    const int64_t* rows = lane.rows;
    MmaA<T> ka[HD / FLASH_TILE], va[HD / FLASH_TILE];
    load_a_rows<T, HD>(ka, q + width, stride, rows, n, t);
    load_a_rows<T, HD>(va, q + 2 * width, stride, rows, n, t);
    MmaC dk[HD / 8], dv[HD / 8];
    zero<T, HD>(dk);
    zero<T, HD>(dv);
    for (int64_t qb = 0; qb < n_pad; qb += FLASH_TILE) {
        MmaC s[2], dp[2];
        products_with_rows<T, HD, LD>(s, ka, queries + qb * LD, g, t);  // k q^T
        products_with_rows<T, HD, LD>(dp, va, grads + qb * LD, g, t);   // v dO^T
        MmaA<T> pa, ds;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int64_t query = qb + 8 * j + 2 * t + e % 2;
                const float p = query < n ? expf(s[j].x[e] * scale - lse[query]) : 0.f;
                pa.x[4 * j + e] = store<T>(p);
                ds.x[4 * j + e] = store<T>(p * (dp[j].x[e] - delta[query]));
            }
        accumulate_rows<T, HD, LD>(dv, pa, grads + qb * LD, g, t);    // p^T dO
        accumulate_rows<T, HD, LD>(dk, ds, queries + qb * LD, g, t);  // ds^T q
    }
    store_acc_rows<T, HD>(dk, scale, gk, stride, rows, n, t);
    store_acc_rows<T, HD>(dv, 1.f, gk + width, stride, rows, n, t);
}

}  // namespace convmae

#define CONVMAE_FLASH_KERNELS(T, SUFFIX, HD)                                                                                   \
    extern "C" __global__ void flash_fwd_hd##HD##_##SUFFIX(const T* qkv, T* out, float* lse, int64_t n, int64_t heads,        \
                                                           float scale) {                                                      \
        convmae::flash_fwd<T, HD>(qkv, out, lse, n, heads, scale);                                                             \
    }                                                                                                                          \
    extern "C" __global__ void flash_bwd_q_hd##HD##_##SUFFIX(const T* qkv, const T* out, const T* gout, const float* lse,     \
                                                             int have_lse, T* gqkv, float* stats, int64_t n, int64_t heads,   \
                                                             float scale) {                                                    \
        convmae::flash_bwd_q<T, HD>(qkv, out, gout, lse, have_lse, gqkv, stats, n, heads, scale);                              \
    }                                                                                                                          \
    extern "C" __global__ void flash_bwd_kv_hd##HD##_##SUFFIX(const T* qkv, const T* gout, const float* stats, T* gqkv,        \
                                                              int64_t n, int64_t heads, float scale) {                         \
        convmae::flash_bwd_kv<T, HD>(qkv, gout, stats, gqkv, n, heads, scale);                                                 \
    }                                                                                                                          \
    extern "C" __global__ void flash_mma_fwd_hd##HD##_##SUFFIX(const T* qkv, T* out, float* lse, int64_t n, int64_t heads,    \
                                                               float scale) {                                                  \
        convmae::flash_mma_fwd<T, HD>(qkv, out, lse, n, heads, scale);                                                         \
    }                                                                                                                          \
    extern "C" __global__ void flash_mma_bwd_q_hd##HD##_##SUFFIX(const T* qkv, const T* out, const T* gout, const float* lse, \
                                                                 int have_lse, T* gqkv, float* stats, int64_t n,              \
                                                                 int64_t heads, float scale) {                                 \
        convmae::flash_mma_bwd_q<T, HD>(qkv, out, gout, lse, have_lse, gqkv, stats, n, heads, scale);                          \
    }                                                                                                                          \
    extern "C" __global__ void flash_mma_bwd_kv_hd##HD##_##SUFFIX(const T* qkv, const T* gout, const float* stats, T* gqkv,    \
                                                                  int64_t n, int64_t heads, float scale) {                     \
        convmae::flash_mma_bwd_kv<T, HD>(qkv, gout, stats, gqkv, n, heads, scale);                                             \
    }

// The head dims of src/attention.rs's FLASH_HEAD_DIMS; 16-bit types only (the tensor cores'
// bf16 and f16 products); host emulation runs them in f32 and bf16.
#define CONVMAE_FLASH_ALL_HD(T, SUFFIX) \
    CONVMAE_FLASH_KERNELS(T, SUFFIX, 16) \
    CONVMAE_FLASH_KERNELS(T, SUFFIX, 32) \
    CONVMAE_FLASH_KERNELS(T, SUFFIX, 64)

#ifndef CONVMAE_HOST_EMULATION
CONVMAE_FLASH_ALL_HD(__nv_bfloat16, bf16)
CONVMAE_FLASH_ALL_HD(__half, f16)
#else
CONVMAE_FLASH_ALL_HD(float, f32)
CONVMAE_FLASH_ALL_HD(__nv_bfloat16, bf16)
#endif
