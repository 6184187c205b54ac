// Pieces shared by the kernels of this crate: element loads and stores, warp reductions, and
// the fixed-order reduction of per-block partial sums.
//
// Every kernel reads its operands in their storage type (f32, bf16 or f16) and computes in
// f32: sums over a row or over many pixels need more mantissa than bf16's 8 bits (PyTorch's
// autocast does the same). Results are rounded once, to nearest even, when stored.
//
// Sizes and element indices are int64_t: B*H*W*C of a ConvMAE stage-1 activation at batch 128
// is ~100M elements, and products of two such quantities overflow 32 bits.
#pragma once

// host_check.cpp compiles the kernels as plain C++ (f32 only) with the CUDA built-ins emulated,
// to test their index math on a machine without a GPU; it provides the definitions instead.
#ifndef CONVMAE_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <stdint.h>

namespace convmae {

// (Host emulation has bf16, as host_check.cpp's bit-exact stand-in, but no f16.)
__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
#ifndef CONVMAE_HOST_EMULATION
__device__ __forceinline__ float load(__half v) { return __half2float(v); }
#endif

template <typename T> __device__ __forceinline__ T store(float v);
template <> __device__ __forceinline__ float store<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
#ifndef CONVMAE_HOST_EMULATION
template <> __device__ __forceinline__ __half store<__half>(float v) { return __float2half_rn(v); }
#endif

// A vector access of `bytes` at p must be aligned to them: on the GPU a misaligned one is a
// fault that poisons the CUDA context (the whole process's work), so host emulation, where it
// would pass silently, stops there instead (host_check.cpp).
#ifdef CONVMAE_HOST_EMULATION
#define CONVMAE_EXPECT_ALIGNED(p, bytes) emulated_expect_aligned((const void*)(p), (bytes), __FILE__, __LINE__)
#else
#define CONVMAE_EXPECT_ALIGNED(p, bytes) ((void)0)
#endif

// The raw word one vector load or store of `BYTES` bytes moves (the CUDA vector types).
template <int BYTES> struct RawWord;
template <> struct RawWord<2> { using type = uint16_t; };
template <> struct RawWord<4> { using type = uint32_t; };
template <> struct RawWord<8> { using type = uint2; };
template <> struct RawWord<16> { using type = uint4; };

// V consecutive elements of T at p (aligned to V * sizeof(T) bytes) as f32, in one vector load.
template <typename T, int V>
__device__ __forceinline__ void load_lanes(const T* __restrict__ p, float (&out)[V]) {
    using Raw = typename RawWord<(int)sizeof(T) * V>::type;
    CONVMAE_EXPECT_ALIGNED(p, sizeof(Raw));
    const Raw raw = *reinterpret_cast<const Raw*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = load(e[i]);
}

// V values rounded to T, stored at p (aligned to V * sizeof(T) bytes) in one vector store.
template <typename T, int V>
__device__ __forceinline__ void store_lanes(T* __restrict__ p, const float (&v)[V]) {
    using Raw = typename RawWord<(int)sizeof(T) * V>::type;
    Raw raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) e[i] = store<T>(v[i]);
    CONVMAE_EXPECT_ALIGNED(p, sizeof(Raw));
    *reinterpret_cast<Raw*>(p) = raw;
}

// Global index of this thread in a 1-D launch, widened before the multiply so grids of more
// than 2^31 threads (in total) index correctly.
__device__ __forceinline__ int64_t global_thread() {
    return (int64_t)blockIdx.x * (int64_t)blockDim.x + (int64_t)threadIdx.x;
}

// What one thread of a partial-sums launch sums (weight and LayerNorm parameter gradients):
// threads are (part, group of V columns), columns fastest, so a warp reads consecutive
// columns; the thread takes columns [col, col + V) over rows [r0, r1) of its part.
struct PartSpan {
    int64_t part, col, r0, r1;
};

// This thread's span, or false past the last (part, group).
__device__ __forceinline__ bool part_span(int64_t cols, int v, int64_t rows, int64_t rows_per_part, int64_t parts, PartSpan& s) {
    const int64_t groups = cols / v;
    const int64_t idx = global_thread();
    if (idx >= parts * groups) return false;
    s.col = (idx % groups) * v;
    s.part = idx / groups;
    s.r0 = s.part * rows_per_part;
    s.r1 = min(s.r0 + rows_per_part, rows);
    return true;
}

// Butterfly reductions: every lane ends with the same value, combined in the same order on
// every run, so the results are deterministic.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// out[i, j] (or out[j, i] when `transpose`) = the sum over p of partials[p, i, j], for partials
// laid out [parts, a, b] in f32. A warp per output element: lane l sums parts l, l + 32, ... in
// increasing order, then the lanes combine by butterfly, so the order is fixed and the sum the
// same bits on every run (weight gradients are summed this way instead of with float atomics
// for that reason). A thread per element, summing ~512 parts one after another, left the GPU
// mostly idle: 30 us per reduction on an H100, 4.5 ms of a ConvMAE-B step.
template <typename T>
__device__ __forceinline__ void reduce_partials(const float* __restrict__ partials, T* __restrict__ out,
                                                int64_t parts, int64_t a, int64_t b, int transpose) {
    const int64_t idx = global_thread() / 32;
    if (idx >= a * b) return;  // the whole warp: its 32 threads share idx
    const int lane = threadIdx.x % 32;
    const int64_t stride = a * b;
    float s = 0.f;
    for (int64_t p = lane; p < parts; p += 32) s += partials[p * stride + idx];
    s = warp_sum(s);
    if (lane == 0) {
        const int64_t i = idx / b, j = idx % b;
        out[transpose ? j * a + i : idx] = store<T>(s);
    }
}

}  // namespace convmae

// Instantiates `body` once per storage type as an extern "C" kernel named <name>_<suffix>, the
// names the Rust side loads (src/cuda.rs picks the suffix from the tensor's dtype).
#ifndef CONVMAE_HOST_EMULATION
#define CONVMAE_FOR_EACH_TYPE(M) \
    M(float, f32)                \
    M(__nv_bfloat16, bf16)       \
    M(__half, f16)
#else
#define CONVMAE_FOR_EACH_TYPE(M) \
    M(float, f32)                \
    M(__nv_bfloat16, bf16)
#endif
